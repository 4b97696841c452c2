//! The main thread's side of the control API: owns the run state and carries out each
//! [`VmAction`] on the vCPUs and devices.
//!
//! Pause order (each step needs the one before):
//! 1. every vCPU is kicked out of KVM_RUN (signal + `immediate_exit`) and parked: no new
//!    kick or register access can start;
//! 2. every device pauses ([`kickvm_virtio::VirtioPciDevice::pause`]): handlers stop taking
//!    requests from the rings, the notifier deregisters the ioeventfds and keeps any kick it
//!    drains, and requests in flight complete. Only then is the pause answered.
//!
//! Resume undoes it in the order that loses no kick: devices first (rings open, ioeventfds
//! registered again, kept kicks re-signalled, every queue looked at once), vCPUs last, so a
//! guest write to a doorbell always finds it in its final mode.

use std::time::Instant;

use kickvm_virtio::notifier::{NotifyMode, SyncReason};
use kickvm_virtio::PciDevices;
use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::server::{ApiResponse, VmAction};
use crate::vmm::exit::{ExitNotifier, VmExitReason};
use crate::vmm::memory::GuestMemoryMmap;
use crate::vmm::vcpu::{ExitKind, VcpuHandle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
        }
    }
}

/// What the main thread lends the control API for one request.
pub struct VmView<'a> {
    pub vcpus: &'a [VcpuHandle],
    pub pci: &'a PciDevices,
    pub exit: &'a ExitNotifier,
    pub memory: &'a GuestMemoryMmap,
}

pub struct RunControl {
    state: RunState,
}

impl Default for RunControl {
    fn default() -> Self {
        Self::new()
    }
}

impl RunControl {
    pub fn new() -> Self {
        Self {
            state: RunState::Running,
        }
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    pub fn execute(&mut self, action: &VmAction, vm: &VmView) -> ApiResponse {
        match action {
            VmAction::Info => ApiResponse::ok(self.info(vm)),
            VmAction::Counters => ApiResponse::ok(counters(vm)),
            VmAction::Pause => {
                if self.state == RunState::Paused {
                    return ApiResponse::error(409, "the VM is already paused");
                }
                self.pause(vm)
            }
            VmAction::Resume => {
                if self.state == RunState::Running {
                    return ApiResponse::error(409, "the VM is not paused");
                }
                self.resume(vm);
                ApiResponse::no_content()
            }
            VmAction::Shutdown => {
                // No guest-visible shutdown request exists (no ACPI power button): quiesce the
                // VM so every request the guest submitted has completed, then end it.
                if self.state == RunState::Running {
                    let response = self.pause(vm);
                    if response.status != 204 {
                        log::warn!("vm.shutdown: the pause before ending was incomplete");
                    }
                }
                vm.exit.notify(VmExitReason::ApiShutdown);
                ApiResponse::no_content()
            }
            VmAction::Kill => {
                vm.exit.notify(VmExitReason::ApiKill);
                ApiResponse::no_content()
            }
            VmAction::SetIoeventfd { id, on } => {
                let Some(device) = vm.pci.device(id) else {
                    return ApiResponse::error(404, format!("no device `{id}`"));
                };
                let mut device = device.lock().unwrap();
                device.set_ioeventfd(*on);
                ApiResponse::ok(device_info(id, &device))
            }
        }
    }

    fn pause(&mut self, vm: &VmView) -> ApiResponse {
        let start = Instant::now();
        for vcpu in vm.vcpus {
            vcpu.pause();
        }
        let vcpus_parked = start.elapsed();
        let mut busy = Vec::new();
        for (id, device) in vm.pci.devices() {
            if !device.lock().unwrap().pause() {
                busy.push(id.to_string());
            }
        }
        self.state = RunState::Paused;
        log::info!(
            "VM paused in {:?} (vCPUs parked after {vcpus_parked:?})",
            start.elapsed()
        );
        if busy.is_empty() {
            ApiResponse::no_content()
        } else {
            ApiResponse::error(
                500,
                format!(
                    "the VM is paused, but requests of {} did not complete in time",
                    busy.join(", ")
                ),
            )
        }
    }

    fn resume(&mut self, vm: &VmView) {
        for (_, device) in vm.pci.devices() {
            device.lock().unwrap().resume();
        }
        for vcpu in vm.vcpus {
            vcpu.resume();
        }
        self.state = RunState::Running;
        log::info!("VM resumed");
    }

    fn info(&self, vm: &VmView) -> Value {
        let memory_bytes: u64 = vm.memory.iter().map(|r| r.len()).sum();
        let devices: Vec<Value> = vm
            .pci
            .devices()
            .map(|(id, device)| device_info(id, &device.lock().unwrap()))
            .collect();
        json!({
            "state": self.state.name(),
            "vcpus": vm.vcpus.len(),
            "memory_bytes": memory_bytes,
            "devices": devices,
        })
    }
}

fn device_type_name(device_type: u16) -> &'static str {
    match device_type {
        1 => "virtio-net",
        2 => "virtio-blk",
        _ => "virtio",
    }
}

/// A queue's notify mode as `(mode, reason code)`; the reason is why it is not ioeventfd.
fn notify_mode(mode: NotifyMode) -> (&'static str, Option<&'static str>) {
    match mode {
        NotifyMode::Ioeventfd => ("ioeventfd", None),
        NotifyMode::HostNotifier => ("host-notifier", Some("backend-owns-the-kick")),
        NotifyMode::Sync(reason) => (
            "sync",
            Some(match reason {
                SyncReason::PropertyOff => "ioeventfd-off",
                SyncReason::DriverNotReady => "driver-not-ready",
                SyncReason::VmPaused => "vm-paused",
                SyncReason::KvmRefused => "kvm-refused",
                SyncReason::QueueNotReady => "queue-not-enabled",
            }),
        ),
    }
}

fn device_info(id: &str, device: &kickvm_virtio::VirtioPciDevice) -> Value {
    let refusal = device.ioeventfd_refusal().map(str::to_string);
    let queues: Vec<Value> = device
        .queue_reports()
        .iter()
        .enumerate()
        .map(|(index, report)| {
            let (mode, reason) = notify_mode(report.mode);
            let mut queue = json!({
                "index": index,
                "notify": mode,
                "reason": reason,
                "detail": report.mode.to_string(),
            });
            if report.mode == NotifyMode::Sync(SyncReason::KvmRefused) {
                queue["refusal"] = json!(refusal);
            }
            queue
        })
        .collect();
    json!({
        "id": id,
        "type": device_type_name(device.device_type()),
        "transport": device.transport_kind().name(),
        "ioeventfd": if device.ioeventfd() { "on" } else { "off" },
        "active": device.is_active(),
        "status": device.device_status(),
        "queues": queues,
    })
}

/// Every counter: per vCPU exits by reason, per device queue the notify path and I/O.
pub fn counters(vm: &VmView) -> Value {
    let vcpus: Vec<Value> = vm
        .vcpus
        .iter()
        .map(|vcpu| {
            let stats = &vcpu.shared().stats;
            let exits: serde_json::Map<String, Value> = ExitKind::ALL
                .iter()
                .map(|&kind| (kind.name().to_string(), json!(stats.exits(kind))))
                .collect();
            json!({ "index": vcpu.index(), "exits": exits })
        })
        .collect();
    let devices: Vec<Value> = vm
        .pci
        .devices()
        .map(|(id, device)| {
            let queues: Vec<Value> = device
                .lock()
                .unwrap()
                .queue_reports()
                .iter()
                .enumerate()
                .map(|(index, report)| {
                    let c = report.counters;
                    json!({
                        "index": index,
                        "notify": notify_mode(report.mode).0,
                        "kicks_ioeventfd": c.kicks_ioeventfd,
                        "kicks_exit": c.kicks_exit,
                        "kicks_replayed": c.kicks_replayed,
                        "requests": c.requests,
                        "bytes": c.bytes,
                        "interrupts_sent": c.interrupts_sent,
                        "interrupts_suppressed": c.interrupts_suppressed,
                    })
                })
                .collect();
            json!({ "id": id, "queues": queues })
        })
        .collect();
    json!({ "vcpus": vcpus, "devices": devices })
}
