//! The notifier state machine: how each queue's kick reaches its handler.
//!
//! A kick is delivered by **ioeventfd** (KVM signals the queue's eventfd, the I/O thread reads
//! it; the vCPU does not exit to userspace), **sync** (the write exits and the vCPU thread runs
//! the queue handler inline) or is owned by an external backend (**host notifier**: a vhost-user
//! backend reads the eventfd KVM signals; the I/O thread does not watch it). The doorbell is
//! an ioeventfd only while all of these hold:
//!
//! | input              | set by                                       |
//! | ------------------ | -------------------------------------------- |
//! | `ioeventfd=on`     | the device property ([`Notifier::set_ioeventfd`]) |
//! | status DRIVER_OK   | [`Notifier::driver_ok`] / [`Notifier::driver_ok_lost`] (also reset) |
//! | VM running         | [`Notifier::vm_paused`] / [`Notifier::vm_resumed`] |
//! | KVM accepted       | a refused registration ([`SyncReason::KvmRefused`]) is sticky until the property is set on again |
//!
//! Every event recomputes the wanted mode and moves to it ([`Notifier::reconcile`]):
//!
//! | event                         | effect |
//! | ----------------------------- | ------ |
//! | DRIVER_OK                     | register each ready queue's ioeventfd, then add it to the I/O thread |
//! | DRIVER_OK lost / reset        | deregister, remove from the I/O thread, drain the eventfd and process the queue inline |
//! | host notifier taken           | the I/O thread stops watching the eventfds; KVM keeps signalling them, now for the backend. Without an ioeventfd (off, refused, paused) a kick exits and the handler signals the backend's eventfd itself |
//! | host notifier released        | the I/O thread watches the eventfds again (and reads what they hold) |
//! | VM paused                     | deregister and drain; a drained kick is kept and re-signalled on resume |
//! | VM resumed                    | register again, re-signal kept kicks |
//! | restore                       | enable iff the restored status has DRIVER_OK; signal every doorbell once (a spurious kick is harmless, a lost one is not) |
//! | KVM refuses a registration    | undo this device's registrations, stay sync, warn once; the VM runs on |
//! | BAR moved                     | re-register the same eventfds at the new doorbells (nothing to drain) |
//!
//! Switching is loss-free because the order is always: stop KVM signalling the eventfd, stop
//! the I/O thread watching it, then read whatever it holds and act on it.

use std::fmt;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::counters::QueueCounters;
use crate::ioevent::{Doorbell, IoeventRegistrar};

/// Why a queue is in sync mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReason {
    PropertyOff,
    DriverNotReady,
    VmPaused,
    KvmRefused,
    QueueNotReady,
}

/// How a queue's kicks reach its handler right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyMode {
    Ioeventfd,
    Sync(SyncReason),
    HostNotifier,
}

impl fmt::Display for NotifyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotifyMode::Ioeventfd => "ioeventfd",
            NotifyMode::Sync(SyncReason::PropertyOff) => "sync (ioeventfd=off)",
            NotifyMode::Sync(SyncReason::DriverNotReady) => "sync (driver not ready)",
            NotifyMode::Sync(SyncReason::VmPaused) => "sync (VM paused)",
            NotifyMode::Sync(SyncReason::KvmRefused) => "sync (KVM refused the ioeventfd)",
            NotifyMode::Sync(SyncReason::QueueNotReady) => "sync (queue not enabled)",
            NotifyMode::HostNotifier => "host notifier (backend owns the kick)",
        })
    }
}

/// The I/O thread, as far as the state machine is concerned.
pub trait KickWatcher: Send + Sync {
    fn watch(&self, queue: usize, kick: &Arc<EventFd>) -> std::io::Result<()>;
    fn unwatch(&self, queue: usize, kick: &Arc<EventFd>);
}

/// Whoever processes a queue when a kick is found while switching modes.
pub trait KickSink {
    fn process_kick(&self, queue: usize);
}

struct QueueNotify {
    kick: Arc<EventFd>,
    doorbell: Option<Doorbell>,
    registered: bool,
    /// A kick drained while the VM was paused, to be re-signalled on resume.
    deferred: bool,
    mode: NotifyMode,
}

pub struct Notifier {
    name: String,
    registrar: Arc<dyn IoeventRegistrar>,
    watcher: Arc<dyn KickWatcher>,
    counters: Arc<[QueueCounters]>,
    queues: Vec<QueueNotify>,
    property_on: bool,
    driver_ok: bool,
    running: bool,
    host_notifier: bool,
    refused: bool,
    /// What refused the registration, for reports (KVM's errno, or the --max-ioeventfds cap).
    refusal: Option<String>,
}

impl Notifier {
    /// `kicks` are the queues' eventfds (non-blocking), which live as long as the device.
    pub fn new(
        name: impl Into<String>,
        ioeventfd: bool,
        kicks: Vec<Arc<EventFd>>,
        registrar: Arc<dyn IoeventRegistrar>,
        watcher: Arc<dyn KickWatcher>,
        counters: Arc<[QueueCounters]>,
    ) -> Self {
        let mut notifier = Self {
            name: name.into(),
            registrar,
            watcher,
            counters,
            queues: kicks
                .into_iter()
                .map(|kick| QueueNotify {
                    kick,
                    doorbell: None,
                    registered: false,
                    deferred: false,
                    mode: NotifyMode::Sync(SyncReason::DriverNotReady),
                })
                .collect(),
            property_on: ioeventfd,
            driver_ok: false,
            running: true,
            host_notifier: false,
            refused: false,
            refusal: None,
        };
        notifier.update_modes();
        notifier
    }

    pub fn modes(&self) -> Vec<NotifyMode> {
        self.queues.iter().map(|q| q.mode).collect()
    }

    pub fn mode(&self, queue: usize) -> Option<NotifyMode> {
        self.queues.get(queue).map(|q| q.mode)
    }

    pub fn ioeventfd_property(&self) -> bool {
        self.property_on
    }

    /// Whether the VM runs (not between [`Self::vm_paused`] and [`Self::vm_resumed`]).
    pub fn vm_running(&self) -> bool {
        self.running
    }

    /// Why the last registration was refused, while the refusal is in force.
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref().filter(|_| self.refused)
    }

    /// Status gained DRIVER_OK. `doorbells[q]` is `Some` for every queue the driver enabled.
    pub fn driver_ok(&mut self, doorbells: Vec<Option<Doorbell>>, sink: &dyn KickSink) {
        for (queue, doorbell) in self.queues.iter_mut().zip(doorbells) {
            queue.doorbell = doorbell;
        }
        self.driver_ok = true;
        self.reconcile(sink);
    }

    /// Status lost DRIVER_OK, or the device is being reset. Pending kicks are processed before
    /// this returns, so the caller may reset the queues afterwards.
    pub fn driver_ok_lost(&mut self, sink: &dyn KickSink) {
        self.driver_ok = false;
        self.reconcile(sink);
        for queue in &mut self.queues {
            queue.doorbell = None;
            if queue.deferred {
                // Paused and then reset: the kick belongs to the queue that is going away.
                queue.deferred = false;
            }
        }
        self.update_modes();
    }

    pub fn vm_paused(&mut self, sink: &dyn KickSink) {
        self.running = false;
        self.reconcile(sink);
    }

    pub fn vm_resumed(&mut self, sink: &dyn KickSink) {
        self.running = true;
        self.reconcile(sink);
        self.replay_deferred(sink);
    }

    /// The device was restored from a snapshot (or migrated in) with `driver_ok` status.
    pub fn restored(
        &mut self,
        driver_ok: bool,
        doorbells: Vec<Option<Doorbell>>,
        sink: &dyn KickSink,
    ) {
        for (queue, doorbell) in self.queues.iter_mut().zip(doorbells) {
            queue.doorbell = if driver_ok { doorbell } else { None };
        }
        self.driver_ok = driver_ok;
        self.reconcile(sink);
        if driver_ok {
            for queue in self.queues.iter_mut().filter(|q| q.doorbell.is_some()) {
                queue.deferred = true;
            }
            self.replay_deferred(sink);
        }
    }

    /// The run-time `ioeventfd=on|off` switch. Setting it on also retries after a refusal.
    pub fn set_ioeventfd(&mut self, on: bool, sink: &dyn KickSink) {
        self.property_on = on;
        if on {
            self.refused = false;
        }
        self.reconcile(sink);
    }

    /// An external backend takes the kicks: the transport stops handling them.
    /// What the eventfds hold stays there, for the backend.
    pub fn take_host_notifier(&mut self, sink: &dyn KickSink) {
        if self.host_notifier {
            return;
        }
        self.host_notifier = true;
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.registered {
                self.watcher.unwatch(index, &queue.kick);
            }
        }
        self.reconcile(sink);
    }

    pub fn release_host_notifier(&mut self, sink: &dyn KickSink) {
        if !self.host_notifier {
            return;
        }
        self.host_notifier = false;
        let mut unwatchable = false;
        for index in 0..self.queues.len() {
            let queue = &self.queues[index];
            if queue.registered {
                if let Err(e) = self.watcher.watch(index, &queue.kick) {
                    log::warn!(
                        "{} queue {index}: the I/O thread cannot watch the kick eventfd: {e}",
                        self.name
                    );
                    self.refusal = Some(format!("the I/O thread cannot watch the eventfd: {e}"));
                    unwatchable = true;
                }
            }
        }
        if unwatchable {
            self.refused = true;
        }
        self.reconcile(sink);
    }

    /// Whether an external backend owns the kicks.
    pub fn host_notifier(&self) -> bool {
        self.host_notifier
    }

    /// A BAR holding doorbells moved: registrations follow, keeping their eventfds, so a kick
    /// signalled at the old address is still there to be read.
    pub fn doorbells_moved(&mut self, doorbells: Vec<Option<Doorbell>>, sink: &dyn KickSink) {
        let mut failed = false;
        for (index, (queue, new)) in self.queues.iter_mut().zip(doorbells).enumerate() {
            if queue.registered {
                if let Some(old) = queue.doorbell {
                    let _ = self.registrar.unregister(&queue.kick, old);
                }
                queue.registered = false;
                if let Some(new) = new {
                    match self.registrar.register(&queue.kick, new) {
                        Ok(()) => queue.registered = true,
                        Err(e) => {
                            log::warn!(
                                "{} queue {index}: KVM refused ioeventfd at {:#x?} after BAR \
                                 move: {e}; device stays in sync mode",
                                self.name,
                                new.addr
                            );
                            self.refusal = Some(e.to_string());
                            failed = true;
                        }
                    }
                }
            }
            if queue.doorbell.is_some() {
                queue.doorbell = new;
            }
        }
        if failed {
            self.refused = true;
        }
        self.reconcile(sink);
    }

    /// A doorbell write that exited to the vCPU thread: handled inline, whatever the mode (an
    /// odd-sized or mismatching write can exit even while the ioeventfd is registered).
    pub fn exit_kick(&self, queue: usize, sink: &dyn KickSink) {
        let Some(counters) = self.counters.get(queue) else {
            log::debug!("{}: kick for nonexistent queue {queue} ignored", self.name);
            return;
        };
        QueueCounters::add(&counters.kicks_exit, 1);
        sink.process_kick(queue);
    }

    fn wants_ioeventfd(&self) -> bool {
        self.property_on && self.driver_ok && self.running && !self.refused
    }

    /// Moves every queue to the mode the inputs call for.
    pub fn reconcile(&mut self, sink: &dyn KickSink) {
        if self.wants_ioeventfd() {
            self.enable(sink);
        } else {
            let defer = !self.running && self.driver_ok;
            self.disable(sink, defer);
        }
        self.update_modes();
    }

    fn enable(&mut self, sink: &dyn KickSink) {
        for index in 0..self.queues.len() {
            let queue = &mut self.queues[index];
            let Some(doorbell) = queue.doorbell else {
                continue;
            };
            if queue.registered {
                continue;
            }
            if let Err(e) = self.registrar.register(&queue.kick, doorbell) {
                log::warn!(
                    "{} queue {index}: KVM refused ioeventfd at {:#x?}: {e}; the device stays in \
                     sync mode (kicks exit to the vCPU thread)",
                    self.name,
                    doorbell.addr
                );
                self.refusal = Some(e.to_string());
                self.refused = true;
                self.disable(sink, false);
                return;
            }
            if self.host_notifier {
                // The backend reads the eventfd.
                queue.registered = true;
                continue;
            }
            if let Err(e) = self.watcher.watch(index, &queue.kick) {
                let _ = self.registrar.unregister(&queue.kick, doorbell);
                log::warn!(
                    "{} queue {index}: the I/O thread cannot watch the kick eventfd: {e}; the \
                     device stays in sync mode",
                    self.name
                );
                self.refusal = Some(format!("the I/O thread cannot watch the eventfd: {e}"));
                self.refused = true;
                self.disable(sink, false);
                return;
            }
            queue.registered = true;
        }
    }

    fn disable(&mut self, sink: &dyn KickSink, defer: bool) {
        for index in 0..self.queues.len() {
            let queue = &mut self.queues[index];
            if !queue.registered {
                continue;
            }
            if let Some(doorbell) = queue.doorbell {
                if let Err(e) = self.registrar.unregister(&queue.kick, doorbell) {
                    log::warn!(
                        "{} queue {index}: cannot deregister ioeventfd: {e}",
                        self.name
                    );
                }
            }
            queue.registered = false;
            if self.host_notifier {
                // What KVM signalled before the deregistration is the backend's to read.
                continue;
            }
            self.watcher.unwatch(index, &queue.kick);
            // Anything KVM signalled before the deregistration is still in the eventfd.
            if let Ok(count) = queue.kick.read() {
                QueueCounters::add(&self.counters[index].kicks_ioeventfd, count);
                if defer {
                    queue.deferred = true;
                } else {
                    sink.process_kick(index);
                }
            }
        }
    }

    fn replay_deferred(&mut self, sink: &dyn KickSink) {
        for index in 0..self.queues.len() {
            let queue = &mut self.queues[index];
            if !queue.deferred || !self.running {
                continue;
            }
            queue.deferred = false;
            if queue.registered {
                // The I/O thread picks it up; counted as an ioeventfd kick when read.
                self.counters[index].replay_kick(&queue.kick);
            } else if self.driver_ok {
                sink.process_kick(index);
            }
        }
    }

    fn update_modes(&mut self) {
        for index in 0..self.queues.len() {
            let queue = &self.queues[index];
            let mode = if queue.registered && self.host_notifier {
                NotifyMode::HostNotifier
            } else if queue.registered {
                NotifyMode::Ioeventfd
            } else if !self.property_on {
                NotifyMode::Sync(SyncReason::PropertyOff)
            } else if self.refused {
                NotifyMode::Sync(SyncReason::KvmRefused)
            } else if !self.driver_ok {
                NotifyMode::Sync(SyncReason::DriverNotReady)
            } else if !self.running {
                NotifyMode::Sync(SyncReason::VmPaused)
            } else {
                NotifyMode::Sync(SyncReason::QueueNotReady)
            };
            if mode != queue.mode {
                log::debug!(
                    "{} queue {index}: notify mode {} -> {mode}",
                    self.name,
                    queue.mode
                );
                self.queues[index].mode = mode;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::MockRegistrar;
    use kickvm_bus::IoAddress;
    use std::cell::RefCell;
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Default)]
    struct MockWatcher {
        watched: Mutex<HashSet<usize>>,
    }

    impl KickWatcher for MockWatcher {
        fn watch(&self, queue: usize, _kick: &Arc<EventFd>) -> std::io::Result<()> {
            self.watched.lock().unwrap().insert(queue);
            Ok(())
        }
        fn unwatch(&self, queue: usize, _kick: &Arc<EventFd>) {
            self.watched.lock().unwrap().remove(&queue);
        }
    }

    #[derive(Default)]
    struct RecordingSink {
        processed: RefCell<Vec<usize>>,
    }

    impl KickSink for RecordingSink {
        fn process_kick(&self, queue: usize) {
            self.processed.borrow_mut().push(queue);
        }
    }

    struct Rig {
        registrar: Arc<MockRegistrar>,
        watcher: Arc<MockWatcher>,
        kicks: Vec<Arc<EventFd>>,
        counters: Arc<[QueueCounters]>,
        notifier: Notifier,
        sink: RecordingSink,
    }

    fn doorbell(queue: u16) -> Doorbell {
        Doorbell {
            addr: IoAddress::Pio(0xc010),
            datamatch: queue,
        }
    }

    fn rig(queues: usize, ioeventfd: bool, capacity: Option<usize>) -> Rig {
        let registrar = Arc::new(MockRegistrar {
            capacity,
            ..Default::default()
        });
        let watcher = Arc::new(MockWatcher::default());
        let kicks: Vec<_> = (0..queues)
            .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
            .collect();
        let counters: Arc<[QueueCounters]> =
            (0..queues).map(|_| QueueCounters::default()).collect();
        let notifier = Notifier::new(
            "test-blk",
            ioeventfd,
            kicks.clone(),
            registrar.clone(),
            watcher.clone(),
            counters.clone(),
        );
        Rig {
            registrar,
            watcher,
            kicks,
            counters,
            notifier,
            sink: RecordingSink::default(),
        }
    }

    fn all_doorbells(n: usize) -> Vec<Option<Doorbell>> {
        (0..n).map(|q| Some(doorbell(q as u16))).collect()
    }

    impl Rig {
        fn driver_ok(&mut self) {
            let n = self.kicks.len();
            self.notifier.driver_ok(all_doorbells(n), &self.sink);
        }
        fn registrations(&self) -> usize {
            self.registrar.live.lock().unwrap().len()
        }
        fn processed(&self) -> Vec<usize> {
            self.sink.processed.borrow().clone()
        }
    }

    #[test]
    fn before_driver_ok_every_queue_is_sync_and_nothing_is_registered() {
        let r = rig(2, true, None);
        assert_eq!(
            r.notifier.modes(),
            vec![NotifyMode::Sync(SyncReason::DriverNotReady); 2]
        );
        assert_eq!(r.registrations(), 0);
    }

    #[test]
    fn driver_ok_registers_each_ready_queue_and_adds_it_to_the_io_thread() {
        let mut r = rig(3, true, None);
        r.notifier
            .driver_ok(vec![Some(doorbell(0)), None, Some(doorbell(2))], &r.sink);
        assert_eq!(r.registrations(), 2);
        assert_eq!(*r.watcher.watched.lock().unwrap(), HashSet::from([0, 2]));
        assert_eq!(
            r.notifier.modes(),
            vec![
                NotifyMode::Ioeventfd,
                NotifyMode::Sync(SyncReason::QueueNotReady),
                NotifyMode::Ioeventfd
            ]
        );
        assert!(r.registrar.guest_writes(doorbell(2), &r.kicks));
        assert_eq!(r.kicks[2].read().unwrap(), 1);
    }

    #[test]
    fn property_off_keeps_the_device_sync_after_driver_ok() {
        let mut r = rig(1, false, None);
        r.driver_ok();
        assert_eq!(r.registrations(), 0);
        assert_eq!(
            r.notifier.mode(0),
            Some(NotifyMode::Sync(SyncReason::PropertyOff))
        );
        r.notifier.exit_kick(0, &r.sink);
        assert_eq!(r.processed(), vec![0]);
        assert_eq!(r.counters[0].kicks_exit.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn losing_driver_ok_processes_a_kick_signalled_just_before_deregistration() {
        let mut r = rig(2, true, None);
        r.driver_ok();
        assert!(r.registrar.guest_writes(doorbell(1), &r.kicks));
        r.notifier.driver_ok_lost(&r.sink);
        assert_eq!(
            r.processed(),
            vec![1],
            "the pending kick was processed, not lost"
        );
        assert_eq!(r.registrations(), 0);
        assert!(r.watcher.watched.lock().unwrap().is_empty());
        assert_eq!(r.counters[1].kicks_ioeventfd.load(Ordering::Relaxed), 1);
        assert_eq!(
            r.notifier.mode(1),
            Some(NotifyMode::Sync(SyncReason::DriverNotReady))
        );
    }

    #[test]
    fn refused_registration_leaves_the_whole_device_sync_and_registered_nothing() {
        let mut r = rig(3, true, Some(2));
        r.driver_ok();
        assert_eq!(r.registrations(), 0, "partial registrations were undone");
        assert!(r.watcher.watched.lock().unwrap().is_empty());
        assert_eq!(
            r.notifier.modes(),
            vec![NotifyMode::Sync(SyncReason::KvmRefused); 3]
        );
        // The device still works: kicks exit and are handled.
        r.notifier.exit_kick(2, &r.sink);
        assert_eq!(r.processed(), vec![2]);
        // Reset and DRIVER_OK again: the refusal sticks, no retry storm.
        r.notifier.driver_ok_lost(&r.sink);
        r.driver_ok();
        assert_eq!(r.registrations(), 0);
        assert_eq!(
            r.notifier.mode(0),
            Some(NotifyMode::Sync(SyncReason::KvmRefused))
        );
    }

    #[test]
    fn setting_the_property_on_again_retries_after_a_refusal() {
        let mut r = rig(1, true, Some(1));
        let blocker = EventFd::new(EFD_NONBLOCK).unwrap();
        r.registrar.register(&blocker, doorbell(9)).unwrap();
        r.driver_ok();
        assert_eq!(
            r.notifier.mode(0),
            Some(NotifyMode::Sync(SyncReason::KvmRefused))
        );
        r.registrar.unregister(&blocker, doorbell(9)).unwrap();
        r.notifier.set_ioeventfd(true, &r.sink);
        assert_eq!(r.notifier.mode(0), Some(NotifyMode::Ioeventfd));
    }

    #[test]
    fn runtime_switch_off_and_on_loses_no_kick() {
        let mut r = rig(1, true, None);
        r.driver_ok();
        let mut delivered = 0;
        for round in 0..50 {
            // A kick lands in the eventfd just before the switch.
            assert!(r.registrar.guest_writes(doorbell(0), &r.kicks));
            r.notifier.set_ioeventfd(false, &r.sink);
            assert_eq!(
                r.notifier.mode(0),
                Some(NotifyMode::Sync(SyncReason::PropertyOff))
            );
            assert!(
                !r.registrar.guest_writes(doorbell(0), &r.kicks),
                "round {round}"
            );
            // While off, the write exits.
            r.notifier.exit_kick(0, &r.sink);
            r.notifier.set_ioeventfd(true, &r.sink);
            assert_eq!(r.notifier.mode(0), Some(NotifyMode::Ioeventfd));
            delivered += 2;
        }
        assert_eq!(r.processed().len(), delivered);
        let c = r.counters[0].snapshot();
        assert_eq!(c.kicks_ioeventfd + c.kicks_exit, delivered as u64);
    }

    #[test]
    fn pause_defers_a_drained_kick_and_resume_resignals_it_to_the_io_thread() {
        let mut r = rig(1, true, None);
        r.driver_ok();
        assert!(r.registrar.guest_writes(doorbell(0), &r.kicks));
        r.notifier.vm_paused(&r.sink);
        assert_eq!(
            r.notifier.mode(0),
            Some(NotifyMode::Sync(SyncReason::VmPaused))
        );
        assert!(r.processed().is_empty(), "paused queues stay quiescent");
        assert_eq!(r.registrations(), 0);
        r.notifier.vm_resumed(&r.sink);
        assert_eq!(r.notifier.mode(0), Some(NotifyMode::Ioeventfd));
        assert_eq!(
            r.kicks[0].read().unwrap(),
            1,
            "the kept kick is back in the eventfd"
        );
    }

    #[test]
    fn kicks_kept_over_pauses_are_counted_once_as_the_guest_made_them() {
        let mut r = rig(1, true, None);
        r.driver_ok();
        let mut guest_kicks = 0;
        for _ in 0..10 {
            assert!(r.registrar.guest_writes(doorbell(0), &r.kicks));
            guest_kicks += 1;
            r.notifier.vm_paused(&r.sink);
            r.notifier.vm_resumed(&r.sink);
            // What the I/O thread does with the re-signalled kick.
            let read = r.kicks[0].read().unwrap();
            QueueCounters::add(&r.counters[0].kicks_ioeventfd, read);
        }
        let c = r.counters[0].snapshot();
        assert_eq!(c.kicks_replayed, 10);
        assert_eq!(
            c.kicks_ioeventfd + c.kicks_exit - c.kicks_replayed,
            guest_kicks
        );
    }

    #[test]
    fn pause_in_sync_mode_replays_a_deferred_kick_inline_on_resume() {
        let mut r = rig(1, true, None);
        r.driver_ok();
        assert!(r.registrar.guest_writes(doorbell(0), &r.kicks));
        r.notifier.vm_paused(&r.sink);
        r.notifier.set_ioeventfd(false, &r.sink);
        r.notifier.vm_resumed(&r.sink);
        assert_eq!(r.processed(), vec![0]);
    }

    #[test]
    fn restore_enables_only_with_driver_ok_and_signals_every_doorbell() {
        let mut r = rig(2, true, None);
        r.notifier.restored(false, all_doorbells(2), &r.sink);
        assert_eq!(r.registrations(), 0);
        r.notifier.restored(true, all_doorbells(2), &r.sink);
        assert_eq!(r.notifier.modes(), vec![NotifyMode::Ioeventfd; 2]);
        assert_eq!(r.kicks[0].read().unwrap(), 1);
        assert_eq!(r.kicks[1].read().unwrap(), 1);
    }

    #[test]
    fn a_host_notifier_keeps_the_ioeventfd_for_the_backend_and_the_io_thread_stops_watching() {
        let mut r = rig(1, true, None);
        r.driver_ok();
        assert!(r.watcher.watched.lock().unwrap().contains(&0));
        r.notifier.take_host_notifier(&r.sink);
        assert_eq!(r.notifier.mode(0), Some(NotifyMode::HostNotifier));
        assert!(!r.watcher.watched.lock().unwrap().contains(&0));
        assert!(
            r.registrar.guest_writes(doorbell(0), &r.kicks),
            "KVM still signals the eventfd"
        );
        assert_eq!(
            r.kicks[0].read().unwrap(),
            1,
            "the kick waits for the backend"
        );
        assert!(r.processed().is_empty(), "the transport did not take it");

        // Paused: the doorbell exits, and the handler passes the kick on.
        r.notifier.vm_paused(&r.sink);
        assert_eq!(r.registrations(), 0);
        r.notifier.vm_resumed(&r.sink);
        assert_eq!(r.notifier.mode(0), Some(NotifyMode::HostNotifier));
        assert!(!r.watcher.watched.lock().unwrap().contains(&0));

        r.notifier.release_host_notifier(&r.sink);
        assert_eq!(r.notifier.mode(0), Some(NotifyMode::Ioeventfd));
        assert!(r.watcher.watched.lock().unwrap().contains(&0));
    }

    #[test]
    fn a_host_notifier_with_ioeventfd_off_gets_its_kicks_through_the_handler() {
        let mut r = rig(1, false, None);
        r.notifier.take_host_notifier(&r.sink);
        r.driver_ok();
        assert_eq!(
            r.notifier.mode(0),
            Some(NotifyMode::Sync(SyncReason::PropertyOff))
        );
        assert_eq!(r.registrations(), 0);
        r.notifier.exit_kick(0, &r.sink);
        assert_eq!(r.processed(), vec![0], "the handler signals the backend");
        r.notifier.set_ioeventfd(true, &r.sink);
        assert_eq!(r.notifier.mode(0), Some(NotifyMode::HostNotifier));
        assert!(r.watcher.watched.lock().unwrap().is_empty());
    }

    #[test]
    fn moved_doorbells_are_reregistered_with_the_same_eventfd_keeping_pending_kicks() {
        let mut r = rig(1, true, None);
        r.driver_ok();
        assert!(r.registrar.guest_writes(doorbell(0), &r.kicks));
        let moved = Doorbell {
            addr: IoAddress::Pio(0xd010),
            datamatch: 0,
        };
        r.notifier.doorbells_moved(vec![Some(moved)], &r.sink);
        assert!(!r.registrar.guest_writes(doorbell(0), &r.kicks));
        assert!(r.registrar.guest_writes(moved, &r.kicks));
        assert_eq!(
            r.kicks[0].read().unwrap(),
            2,
            "old and new kicks both wait in the eventfd"
        );
        assert_eq!(r.notifier.mode(0), Some(NotifyMode::Ioeventfd));
        r.notifier.driver_ok_lost(&r.sink);
        assert_eq!(r.registrations(), 0, "deregistered at the new address");
    }

    #[test]
    fn kick_for_a_nonexistent_queue_is_ignored() {
        let r = rig(1, false, None);
        r.notifier.exit_kick(5, &r.sink);
        assert!(r.processed().is_empty());
    }
}
