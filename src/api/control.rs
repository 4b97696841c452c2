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
//!
//! Shutdown asks the guest: it presses the ACPI power button (the GED's event, see
//! `devices::acpi`) and the guest powers off through ACPI S5 when it is done. Given a grace
//! period, the main loop ends a guest that has not powered off by then, the way a pause
//! would stop it (in-flight I/O completes first).

use std::time::{Duration, Instant};

use kickvm_virtio::device::BackendValue;
use kickvm_virtio::notifier::{NotifyMode, SyncReason};
use kickvm_virtio::PciDevices;
use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::server::{ApiResponse, VmAction};
use crate::devices::acpi::GedEvents;
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
    pub ged: &'a GedEvents,
    pub vm_fd: &'a kvm_ioctls::VmFd,
    pub serial: Option<&'a std::sync::Mutex<crate::devices::serial::SerialDevice>>,
}

pub struct RunControl {
    state: RunState,
    /// When a `vm.shutdown` with a grace period ends a guest that did not power off.
    shutdown_deadline: Option<Instant>,
    /// Why devices paused the VM (a disk out of host space), until it is resumed.
    pause_reason: Option<String>,
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
            shutdown_deadline: None,
            pause_reason: None,
        }
    }

    /// The instant the main loop must call [`RunControl::shutdown_grace_expired`] at.
    pub fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown_deadline
    }

    /// The guest did not power off within the grace period `vm.shutdown` gave it: quiesce the
    /// VM so every request it submitted has completed, then end it.
    pub fn shutdown_grace_expired(&mut self, vm: &VmView) {
        self.shutdown_deadline = None;
        log::warn!("vm.shutdown: the guest did not power off within its grace period; ending it");
        if self.state == RunState::Running && self.pause(vm).status != 204 {
            log::warn!("vm.shutdown: the pause before ending was incomplete");
        }
        vm.exit.notify(VmExitReason::ApiShutdown);
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// Devices asked for a pause (`reasons`): pause the VM, unless it is paused already, and
    /// say why in `vm.info` until it is resumed.
    pub fn pause_for_devices(&mut self, vm: &VmView, reasons: Vec<String>) {
        if reasons.is_empty() {
            return;
        }
        let reason = reasons.join("; ");
        if self.state == RunState::Running {
            let response = self.pause(vm);
            if response.status != 204 {
                log::warn!("pausing for {reason}: the pause was incomplete");
            }
            log::warn!("VM paused: {reason}; resume it (vm.resume) once that is resolved");
        }
        self.pause_reason = Some(match self.pause_reason.take() {
            Some(earlier) if !earlier.contains(&reason) => format!("{earlier}; {reason}"),
            Some(earlier) => earlier,
            None => reason,
        });
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
            VmAction::Shutdown { grace } => self.shutdown(vm, *grace),
            VmAction::Kill => {
                vm.exit.notify(VmExitReason::ApiKill);
                ApiResponse::no_content()
            }
            VmAction::Snapshot { dir } => {
                if self.state != RunState::Paused {
                    return ApiResponse::error(
                        409,
                        "the VM must be paused for a snapshot: vm.pause first",
                    );
                }
                self.snapshot(vm, dir)
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

    fn snapshot(&self, vm: &VmView, dir: &std::path::Path) -> ApiResponse {
        let started = Instant::now();
        let sources = crate::vmm::snapshot::Sources {
            vm_fd: vm.vm_fd,
            vcpus: vm.vcpus,
            memory: vm.memory,
            serial: vm.serial,
            pci: vm.pci,
        };
        match crate::vmm::snapshot::capture(&sources, dir) {
            Ok(()) => {
                log::info!(
                    "snapshot written to {} in {:?}",
                    dir.display(),
                    started.elapsed()
                );
                ApiResponse::no_content()
            }
            Err(e) => {
                log::warn!("snapshot to {} failed: {e}", dir.display());
                let status = if e.is_config_error() { 400 } else { 500 };
                ApiResponse::error(status, format!("snapshot: {e}"))
            }
        }
    }

    fn shutdown(&mut self, vm: &VmView, grace: Option<Duration>) -> ApiResponse {
        if self.state == RunState::Paused {
            return ApiResponse::error(
                409,
                "the VM is paused, so the guest cannot shut down: resume it first, or use vm.kill",
            );
        }
        if let Err(e) = vm.ged.press_power_button() {
            return ApiResponse::error(500, format!("cannot raise the GED interrupt: {e}"));
        }
        if let Some(grace) = grace {
            let deadline = Instant::now() + grace;
            // A second request may shorten the grace period, never extend it.
            self.shutdown_deadline = Some(match self.shutdown_deadline {
                Some(earlier) => earlier.min(deadline),
                None => deadline,
            });
        }
        log::info!(
            "vm.shutdown: ACPI power button pressed{}",
            grace.map_or(String::new(), |g| format!(
                "; the VM ends in {} s unless the guest powers off",
                g.as_secs()
            ))
        );
        let (presses, taken) = vm.ged.presses();
        ApiResponse {
            status: 202,
            body: Some(json!({
                "requested": "acpi-power-button",
                "timeout_secs": grace.map(|g| g.as_secs()),
                "power_button": { "presses": presses, "taken_by_guest": taken },
            })),
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
        self.pause_reason = None;
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
        let (presses, taken) = vm.ged.presses();
        json!({
            "state": self.state.name(),
            "pause_reason": self.pause_reason,
            "vcpus": vm.vcpus.len(),
            "memory_bytes": memory_bytes,
            "devices": devices,
            "power_button": { "presses": presses, "taken_by_guest": taken },
            "shutdown_deadline_secs": self
                .shutdown_deadline
                .map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64()),
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
        "backend": device
            .backend()
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    BackendValue::Text(text) => json!(text),
                    BackendValue::Number(n) => json!(n),
                    BackendValue::Flag(flag) => json!(flag),
                };
                (key.to_string(), value)
            })
            .collect::<serde_json::Map<String, Value>>(),
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
                        "interrupts": report.interrupt_path(),
                    })
                })
                .collect();
            json!({ "id": id, "queues": queues })
        })
        .collect();
    json!({ "vcpus": vcpus, "devices": devices })
}
