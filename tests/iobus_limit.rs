//! KVM's own refusal of an ioeventfd, on the real KVM: the notifier state machine falls back
//! to sync mode for the device, says why, still handles kicks, and returns to ioeventfd when
//! asked once there is room.
//!
//! The refusal is the kernel's, not `--max-ioeventfds`: the test first tries to fill the VM's
//! MMIO bus past the kernel's NR_IOBUS_DEVS (1000). Kernels before 4.x refuse there with
//! ENOSPC; later ones exclude ioeventfds from that count ("limited by maximum fd"), so there
//! the test shows KVM refusing a doorbell that another eventfd already claims (EEXIST), the
//! other refusal a VMM meets in practice. It prints which one this kernel gave. Needs /dev/kvm.

mod common;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use kickvm_bus::IoAddress;
use kickvm_virtio::counters::QueueCounters;
use kickvm_virtio::io_thread::IoThread;
use kickvm_virtio::ioevent::{Doorbell, IoeventRegistrar};
use kickvm_virtio::notifier::{KickSink, Notifier, NotifyMode, SyncReason};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// More than the kernel's NR_IOBUS_DEVS.
const FILL_ATTEMPTS: u64 = 1100;
const FILLER_BASE: u64 = 0xd000_0000;
const DOORBELL_BASE: u64 = 0xe000_0000;
const QUEUES: usize = 2;

#[derive(Default)]
struct RecordingSink {
    processed: RefCell<Vec<usize>>,
}

impl KickSink for RecordingSink {
    fn process_kick(&self, queue: usize) {
        self.processed.borrow_mut().push(queue);
    }
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the plain struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Registers eventfds at distinct MMIO addresses until KVM refuses or FILL_ATTEMPTS pass.
fn fill_mmio_bus(vm: &VmFd) -> (Vec<(EventFd, u64)>, Option<kvm_ioctls::Error>) {
    let mut fillers = Vec::new();
    for i in 0..FILL_ATTEMPTS {
        let fd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let addr = FILLER_BASE + i * 8;
        match vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch) {
            Ok(()) => fillers.push((fd, addr)),
            Err(e) => return (fillers, Some(e)),
        }
    }
    (fillers, None)
}

fn doorbell(queue: usize) -> Doorbell {
    Doorbell {
        addr: IoAddress::Mmio(DOORBELL_BASE + queue as u64 * 4),
        datamatch: queue as u16,
    }
}

#[test]
fn kvm_refusing_the_registration_leaves_the_device_in_sync_mode_with_the_reason() {
    common::require_kvm();
    raise_fd_limit();
    let kvm = Kvm::new().expect("opening /dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));

    let (mut fillers, bus_full) = fill_mmio_bus(&vm);
    // Either the bus filled up (old kernel), or KVM took more than NR_IOBUS_DEVS ioeventfds.
    let squatter = match &bus_full {
        Some(e) => {
            assert_eq!(
                e.errno(),
                libc::ENOSPC,
                "KVM refused with {e} after {} registrations",
                fillers.len()
            );
            assert!(
                fillers.len() <= 1000,
                "refused only after {}",
                fillers.len()
            );
            eprintln!(
                "KVM's I/O bus is full after {} ioeventfds (ENOSPC)",
                fillers.len()
            );
            None
        }
        None => {
            eprintln!(
                "KVM accepted {FILL_ATTEMPTS} ioeventfds on one bus (more than NR_IOBUS_DEVS): \
                 this kernel does not count them; showing its EEXIST refusal instead"
            );
            // Queue 1's doorbell is already claimed.
            let squatter = EventFd::new(EFD_NONBLOCK).unwrap();
            IoeventRegistrar::register(vm.as_ref(), &squatter, doorbell(1))
                .expect("claiming a doorbell");
            Some(squatter)
        }
    };

    let counters: Arc<[QueueCounters]> = (0..QUEUES).map(|_| QueueCounters::default()).collect();
    let io_thread = Arc::new(
        IoThread::spawn("iobus-test", counters.clone(), Duration::ZERO, false).expect("I/O thread"),
    );
    let kicks: Vec<Arc<EventFd>> = (0..QUEUES)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let mut notifier = Notifier::new(
        "disk0",
        true,
        kicks.clone(),
        vm.clone(),
        io_thread.clone(),
        counters.clone(),
    );
    let sink = RecordingSink::default();
    notifier.driver_ok((0..QUEUES).map(|q| Some(doorbell(q))).collect(), &sink);

    assert_eq!(
        notifier.modes(),
        vec![NotifyMode::Sync(SyncReason::KvmRefused); QUEUES],
        "the whole device falls back to sync"
    );
    let refusal = notifier.refusal().expect("the refusal is kept").to_string();
    let expected = if bus_full.is_some() {
        "No space left"
    } else {
        "File exists"
    };
    assert!(
        refusal.contains(expected),
        "refusal `{refusal}` is KVM's `{expected}`"
    );
    // The partial registration (queue 0, when queue 1 was refused) was undone: KVM takes a
    // new registration at queue 0's doorbell.
    let probe = EventFd::new(EFD_NONBLOCK).unwrap();
    if bus_full.is_none() {
        IoeventRegistrar::register(vm.as_ref(), &probe, doorbell(0))
            .expect("queue 0's doorbell was released");
        IoeventRegistrar::unregister(vm.as_ref(), &probe, doorbell(0)).unwrap();
    }

    // In sync mode the kick exits and is handled inline.
    notifier.exit_kick(0, &sink);
    notifier.exit_kick(1, &sink);
    assert_eq!(*sink.processed.borrow(), vec![0, 1]);
    assert_eq!(counters[1].snapshot().kicks_exit, 1);

    // Room again (the squatter leaves, or two fillers do), and the switch on retries.
    match squatter {
        Some(squatter) => {
            IoeventRegistrar::unregister(vm.as_ref(), &squatter, doorbell(1)).unwrap();
        }
        None => {
            for (fd, addr) in fillers.drain(..QUEUES) {
                vm.unregister_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                    .unwrap();
            }
        }
    }
    notifier.set_ioeventfd(true, &sink);
    assert_eq!(notifier.modes(), vec![NotifyMode::Ioeventfd; QUEUES]);
    assert_eq!(notifier.refusal(), None);
    // KVM holds the registrations now: the same doorbell cannot be claimed twice.
    let err = IoeventRegistrar::register(vm.as_ref(), &probe, doorbell(1)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "{err}");
    notifier.driver_ok_lost(&sink);
}
