//! A device's I/O thread: an epoll loop over the queues' kick eventfds (while in ioeventfd
//! mode), the backend's completion fds, interrupt resample fds and a control eventfd.
//!
//! While requests are in flight the loop polls for a bounded time instead of sleeping, so a
//! busy device is not woken per completion; the device keeps kicks suppressed (EVENT_IDX /
//! NO_NOTIFY) meanwhile, which is what lets an ioeventfd kick cost no more than KVM's part.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::counters::QueueCounters;
use crate::device::QueueHandler;
use crate::notifier::KickWatcher;

const TOKEN_CONTROL: u64 = 0;
const KIND_SHIFT: u64 = 32;
const KIND_KICK: u64 = 1 << KIND_SHIFT;
const KIND_COMPLETION: u64 = 2 << KIND_SHIFT;
const KIND_CALLBACK: u64 = 3 << KIND_SHIFT;
const KIND_MASK: u64 = !0u64 << KIND_SHIFT;

pub type Callback = Arc<dyn Fn() + Send + Sync>;

struct Shared {
    name: String,
    epoll: Epoll,
    control: EventFd,
    stop: AtomicBool,
    handler: Mutex<Option<Arc<dyn QueueHandler>>>,
    kicks: Mutex<HashMap<usize, Kick>>,
    /// Which queues are in `kicks`, readable without the lock: the polling loop asks on
    /// every turn.
    watched: Box<[AtomicBool]>,
    completion_fds: Mutex<Vec<RawFd>>,
    callbacks: Mutex<HashMap<u64, Callback>>,
    counters: Arc<[QueueCounters]>,
    poll: Duration,
    priority_boost: bool,
}

/// A watched queue's kick eventfd.
struct Kick {
    fd: Arc<EventFd>,
    /// In the epoll set. A queue being polled takes its eventfd out: with no epoll entry on
    /// it, KVM's signal finds no wait-queue entry to call, which is what makes an ioeventfd
    /// kick cost what a bare one does (measured with bench/kick-floor plus a spinning reader:
    /// ~7.7 µs bare, ~8.5 µs with an eventfd nobody polls, 8.5-10.2 µs with it in an epoll
    /// set that is not even slept on).
    in_epoll: bool,
}

pub struct IoThread {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts the thread. `poll` bounds how long it spins for more work after the last
    /// progress while requests are in flight (zero: never spin). `priority_boost`: run above
    /// the process's priority, for VMs whose vCPUs can fill every host CPU.
    pub fn spawn(
        name: &str,
        counters: Arc<[QueueCounters]>,
        poll: Duration,
        priority_boost: bool,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            epoll: Epoll::new()?,
            control: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            handler: Mutex::new(None),
            kicks: Mutex::new(HashMap::new()),
            watched: counters.iter().map(|_| AtomicBool::new(false)).collect(),
            completion_fds: Mutex::new(Vec::new()),
            callbacks: Mutex::new(HashMap::new()),
            counters,
            poll,
            priority_boost,
        });
        shared.epoll.ctl(
            ControlOperation::Add,
            shared.control.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
        )?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("io-{name}"))
            .spawn(move || run(&thread_shared))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Starts serving an activated device: its completion fds join the epoll set.
    pub fn attach(&self, handler: Arc<dyn QueueHandler>) -> std::io::Result<()> {
        let mut fds = self.shared.completion_fds.lock().unwrap();
        for queue in 0..handler.num_queues() {
            if let Some(fd) = handler.completion_fd(queue) {
                let event = EpollEvent::new(EventSet::IN, KIND_COMPLETION | queue as u64);
                if let Err(e) = self.shared.epoll.ctl(ControlOperation::Add, fd, event) {
                    drop(fds);
                    self.detach();
                    return Err(e);
                }
                fds.push(fd);
            }
        }
        *self.shared.handler.lock().unwrap() = Some(handler);
        Ok(())
    }

    /// Stops serving the device (before it is reset).
    pub fn detach(&self) {
        for fd in self.shared.completion_fds.lock().unwrap().drain(..) {
            let _ = self
                .shared
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        *self.shared.handler.lock().unwrap() = None;
    }

    /// Runs `callback` on this thread whenever `fd` is readable; `id` tells callbacks apart.
    pub fn add_callback(&self, id: u32, fd: RawFd, callback: Callback) -> std::io::Result<()> {
        self.add_callback_on(id, fd, EventSet::IN, callback)
    }

    /// Runs `callback` on this thread once, when the peer of socket `fd` hangs up.
    pub fn add_hangup_callback(
        &self,
        id: u32,
        fd: RawFd,
        callback: Callback,
    ) -> std::io::Result<()> {
        // Not IN: the socket's replies belong to whoever sent the request.
        let events = EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ONE_SHOT;
        self.add_callback_on(id, fd, events, callback)
    }

    fn add_callback_on(
        &self,
        id: u32,
        fd: RawFd,
        events: EventSet,
        callback: Callback,
    ) -> std::io::Result<()> {
        let token = KIND_CALLBACK | u64::from(id);
        self.shared
            .callbacks
            .lock()
            .unwrap()
            .insert(token, callback);
        self.shared
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.control.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl KickWatcher for IoThread {
    fn watch(&self, queue: usize, kick: &Arc<EventFd>) -> std::io::Result<()> {
        let mut kicks = self.shared.kicks.lock().unwrap();
        let event = EpollEvent::new(EventSet::IN, KIND_KICK | queue as u64);
        self.shared
            .epoll
            .ctl(ControlOperation::Add, kick.as_raw_fd(), event)?;
        kicks.insert(
            queue,
            Kick {
                fd: kick.clone(),
                in_epoll: true,
            },
        );
        self.shared.set_watched(queue, true);
        Ok(())
    }

    fn unwatch(&self, queue: usize, kick: &Arc<EventFd>) {
        let mut kicks = self.shared.kicks.lock().unwrap();
        if kicks.get(&queue).is_none_or(|k| k.in_epoll) {
            let _ = self.shared.epoll.ctl(
                ControlOperation::Delete,
                kick.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        kicks.remove(&queue);
        self.shared.set_watched(queue, false);
    }
}

/// Queues the thread is polling (ioeventfd queues it took work from), with the time of the
/// last progress; spinning ends `poll` after that. Then the queues are re-armed, unless kicks
/// keep coming with nothing to take and the handler asks to doze on them
/// ([`QueueHandler::doze_on_idle_kicks`]): then the thread looks at the rings after ever
/// longer sleeps, with the kick eventfds still unwatched, for as long as that goes on.
struct Polling {
    queues: Vec<usize>,
    last_progress: Instant,
    dozing: bool,
    /// How long the next doze lasts: doubling from [`DOZE_FIRST`] up to [`DOZE_LONGEST`].
    doze_interval: Duration,
}

/// The first doze: kicks seen when spinning ends may be those of work already taken, so the
/// thread waits this long to see whether more come without work before it re-arms.
const DOZE_FIRST: Duration = Duration::from_micros(20);
/// The longest doze, which is the most a request that follows a run of empty kicks waits for
/// the thread (drivers kick with nothing new rarely; kick-bench does nothing else). Each doze
/// costs the host a timer interrupt and two context switches: measured on this nested host,
/// dozing every 20 us took a third of a CPU, every 160 us still 11-14%.
const DOZE_LONGEST: Duration = Duration::from_micros(400);

/// How long the polling loop goes without epoll_wait(2): queues it polls need no fd to be
/// looked at (their rings and engines are read directly), so only the control eventfd,
/// callbacks and other queues' kicks wait this long. A system call per turn was ~10% of
/// the polling thread's time.
const EPOLL_INTERVAL: Duration = Duration::from_micros(20);

/// How much more CPU weight the I/O thread asks for than the rest of the process (nice
/// steps), when the VM's vCPUs can fill every host CPU. Then an I/O thread of equal weight
/// waits behind spinning vCPUs whose progress depends on it. Measured, 4k randread polled on
/// 2 cores, 3 interleaved rounds: 2 vCPUs x qd16 111k/111k/133k IOPS at equal weight,
/// 188k/150k/149k boosted; but 1 vCPU x qd32 (where the I/O thread has a core of its own)
/// went 157k/159k/169k -> 145k/170k/139k and by interrupt 150k -> 143k median, so the boost
/// is kept to VMs with at least as many vCPUs as host CPUs.
const PRIORITY_BOOST: libc::c_int = 5;

/// Raises the calling thread's priority by [`PRIORITY_BOOST`] over the process's, where the
/// host allows it (CAP_SYS_NICE or RLIMIT_NICE); otherwise it keeps the process's.
fn boost_priority(name: &str) {
    // SAFETY: plain system calls on the calling thread; getpriority's -1 is a valid nice
    // value, so errno is what tells failure apart.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() != 0 {
            return;
        }
        let wanted = (current - PRIORITY_BOOST).max(-20);
        if libc::setpriority(libc::PRIO_PROCESS, tid, wanted) != 0 {
            log::debug!(
                "{name}: I/O thread keeps nice {current}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// CPUs this process may run on.
pub(crate) fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn run(shared: &Shared) {
    if shared.priority_boost {
        boost_priority(&shared.name);
    }
    let mut events = vec![EpollEvent::default(); 64];
    let mut polling = Polling {
        queues: Vec::new(),
        last_progress: Instant::now(),
        dozing: false,
        doze_interval: DOZE_FIRST,
    };
    let mut busy_until: Option<Instant> = None;
    // Dozing sleeps DOZE_INTERVAL; the default 50 us of timer slack would stretch it to ~70.
    // SAFETY: prctl on the calling thread with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
    loop {
        let wait = if busy_until.is_some() || (!polling.queues.is_empty() && !polling.dozing) {
            Some(Duration::ZERO)
        } else if polling.dozing {
            let interval = polling.doze_interval;
            polling.doze_interval = (interval * 2).min(DOZE_LONGEST);
            Some(interval)
        } else {
            None
        };
        let count = match wait_events(shared, wait, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!(
                    "{}: I/O thread epoll failed: {e}; thread stops",
                    shared.name
                );
                return;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let handler = shared.handler.lock().unwrap().clone();
        for event in &events[..count] {
            dispatch(shared, handler.as_ref(), event.data(), &mut polling);
        }
        let Some(handler) = handler else {
            for queue in polling.queues.drain(..) {
                shared.restore_kick(queue);
            }
            polling.dozing = false;
            busy_until = None;
            continue;
        };
        let mut had_events = count > 0;
        let epoll_due = Instant::now() + EPOLL_INTERVAL;
        loop {
            poll_watched_queues(shared, &handler, &mut polling);
            busy_until = poll_busy_queues(shared, &handler, had_events, busy_until);
            had_events = false;
            if (polling.queues.is_empty() && busy_until.is_none())
                || (polling.dozing && busy_until.is_none())
                || Instant::now() >= epoll_due
                || shared.stop.load(Ordering::Relaxed)
            {
                break;
            }
            std::hint::spin_loop();
        }
    }
}

/// epoll_wait(2) with a timeout in nanoseconds (epoll_pwait2, Linux 5.11+) when `wait` is
/// shorter than a millisecond; `None` waits for an event.
fn wait_events(
    shared: &Shared,
    wait: Option<Duration>,
    events: &mut [EpollEvent],
) -> std::io::Result<usize> {
    let timeout = match wait {
        None => -1,
        Some(d) if d.is_zero() => 0,
        Some(d) if d >= Duration::from_millis(1) => d.as_millis() as i32,
        Some(d) => {
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `events` is a valid buffer of `events.len()` EpollEvents, which are
            // `repr(transparent)` over `epoll_event`; the timespec lives across the call; no
            // signal mask is passed.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    shared.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    &ts as *const libc::timespec,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOSYS) {
                return Err(e);
            }
            // No epoll_pwait2: a zero timeout, so dozing turns into spinning, never into a
            // longer sleep than asked for.
            0
        }
    };
    shared.epoll.wait(timeout, events)
}

impl Shared {
    fn set_watched(&self, queue: usize, watched: bool) {
        if let Some(flag) = self.watched.get(queue) {
            flag.store(watched, Ordering::SeqCst);
        }
    }

    /// Reads (and counts) the kicks `queue`'s eventfd holds; 0 if it is not watched.
    fn collect_kicks(&self, queue: usize) -> u64 {
        let kicks = self.kicks.lock().unwrap();
        let Some(kick) = kicks.get(&queue) else {
            return 0;
        };
        // Another thread may have drained it while switching modes: then nothing to count.
        let count = kick.fd.read().unwrap_or(0);
        if let Some(counters) = self.counters.get(queue) {
            QueueCounters::add(&counters.kicks_ioeventfd, count);
        }
        count
    }

    /// Takes `queue`'s kick eventfd out of the epoll set while the thread polls the queue.
    fn silence_kick(&self, queue: usize) {
        let mut kicks = self.kicks.lock().unwrap();
        let Some(kick) = kicks.get_mut(&queue) else {
            return;
        };
        if kick.in_epoll {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                kick.fd.as_raw_fd(),
                EpollEvent::default(),
            );
            kick.in_epoll = false;
        }
    }

    /// Puts `queue`'s kick eventfd back in the epoll set (level-triggered: a kick signalled
    /// since the last read is reported at once). False if it could not be, so the caller
    /// keeps polling rather than never hear from the queue again.
    fn restore_kick(&self, queue: usize) -> bool {
        let mut kicks = self.kicks.lock().unwrap();
        let Some(kick) = kicks.get_mut(&queue) else {
            return true;
        };
        if !kick.in_epoll {
            let event = EpollEvent::new(EventSet::IN, KIND_KICK | queue as u64);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, kick.fd.as_raw_fd(), event)
            {
                log::error!(
                    "{}: queue {queue}: cannot watch its kicks again: {e}",
                    self.name
                );
                return false;
            }
            kick.in_epoll = true;
        }
        true
    }
}

fn is_watched(shared: &Shared, queue: usize) -> bool {
    shared
        .watched
        .get(queue)
        .is_some_and(|flag| flag.load(Ordering::SeqCst))
}

/// ioeventfd queues: look at the rings without waiting for a kick (the driver was told not to
/// send one), for `poll` after the last progress; then turn notifications back on. A kick
/// that arrived meanwhile counts as progress: the driver is active, and a kick costs it least
/// while nobody sleeps on the eventfd.
fn poll_watched_queues(shared: &Shared, handler: &Arc<dyn QueueHandler>, polling: &mut Polling) {
    if polling.queues.is_empty() {
        return;
    }
    let mut progress = false;
    polling.queues.retain(|&queue| {
        if !is_watched(shared, queue) {
            // Switched to sync mode meanwhile: the queue must not stay silenced.
            handler.rearm(queue);
            return false;
        }
        progress |= handler.poll_queue(queue);
        true
    });
    let now = Instant::now();
    if progress {
        polling.last_progress = now;
        polling.dozing = false;
        polling.doze_interval = DOZE_FIRST;
        return;
    }
    if now.duration_since(polling.last_progress) < shared.poll {
        return;
    }
    let mut kicked = false;
    for &queue in &polling.queues {
        kicked |= shared.collect_kicks(queue) > 0;
    }
    if kicked {
        if handler.doze_on_idle_kicks() {
            // Kicks with nothing to take: spinning for them would only take a CPU from the
            // vCPU that sends them, and sleeping on the eventfd would make each one wake a
            // thread (floor (c) in bench/kick-floor); dozing leaves them at KVM's part.
            polling.dozing = true;
        } else {
            polling.last_progress = now;
        }
        return;
    }
    polling.dozing = false;
    // Notifications on and a last look at the ring first, then the eventfd back in the epoll
    // set: a kick after the look is in the eventfd, which epoll reports once it is back.
    polling.queues.retain(|&queue| {
        handler.rearm(queue);
        !shared.restore_kick(queue)
    });
}

/// Sync-mode queues with requests in flight: reap without waiting for the completion fd, for
/// a bounded time.
fn poll_busy_queues(
    shared: &Shared,
    handler: &Arc<dyn QueueHandler>,
    had_events: bool,
    busy_until: Option<Instant>,
) -> Option<Instant> {
    if shared.poll.is_zero() {
        return None;
    }
    let mut any_busy = false;
    for queue in 0..handler.num_queues() {
        if handler.busy(queue) && !is_watched(shared, queue) {
            any_busy = true;
            handler.process_completions(queue);
        }
    }
    if !any_busy {
        return None;
    }
    let until = match busy_until {
        Some(t) if !had_events => t,
        _ => Instant::now() + shared.poll,
    };
    (Instant::now() < until).then_some(until)
}

fn dispatch(
    shared: &Shared,
    handler: Option<&Arc<dyn QueueHandler>>,
    token: u64,
    polling: &mut Polling,
) {
    let index = (token & !KIND_MASK) as usize;
    let Some(handler) = handler else {
        // Nothing to serve: still consume level-triggered fds so the loop does not spin.
        match token & KIND_MASK {
            0 => drop(shared.control.read()),
            KIND_KICK => {
                if let Some(kick) = shared.kicks.lock().unwrap().get(&index) {
                    let _ = kick.fd.read();
                }
            }
            _ => {}
        }
        return;
    };
    match token & KIND_MASK {
        0 => {
            let _ = shared.control.read();
        }
        KIND_KICK => {
            // Another thread may have drained it while switching modes: then nothing to do.
            if shared.collect_kicks(index) > 0 {
                take_work(shared, handler, index, polling);
            }
        }
        KIND_COMPLETION => {
            if is_watched(shared, index) {
                take_work(shared, handler, index, polling);
            } else {
                handler.process_completions(index);
            }
        }
        KIND_CALLBACK => {
            let callback = shared.callbacks.lock().unwrap().get(&token).cloned();
            if let Some(callback) = callback {
                callback();
            }
        }
        _ => log::debug!("{}: unknown epoll token {token:#x}", shared.name),
    }
}

/// Work on an ioeventfd queue: with polling, leave notifications off and keep looking;
/// without, the plain process-and-rearm.
fn take_work(
    shared: &Shared,
    handler: &Arc<dyn QueueHandler>,
    queue: usize,
    polling: &mut Polling,
) {
    if shared.poll.is_zero() {
        handler.process_queue(queue);
        return;
    }
    if !polling.queues.contains(&queue) {
        shared.silence_kick(queue);
        polling.queues.push(queue);
    }
    handler.poll_queue(queue);
    polling.last_progress = Instant::now();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    struct CountingHandler {
        kicks: mpsc::Sender<usize>,
        completions: AtomicUsize,
        completion_fd: EventFd,
    }

    impl QueueHandler for CountingHandler {
        fn process_queue(&self, queue: usize) {
            self.kicks.send(queue).unwrap();
        }
        fn completion_fd(&self, queue: usize) -> Option<RawFd> {
            (queue == 0).then(|| self.completion_fd.as_raw_fd())
        }
        fn process_completions(&self, _queue: usize) {
            let _ = self.completion_fd.read();
            self.completions.fetch_add(1, Ordering::SeqCst);
        }
        fn busy(&self, _queue: usize) -> bool {
            false
        }
        fn num_queues(&self) -> usize {
            2
        }
    }

    fn counters(n: usize) -> Arc<[QueueCounters]> {
        (0..n).map(|_| QueueCounters::default()).collect()
    }

    #[test]
    fn watched_kick_reaches_the_handler_with_its_queue_index_and_is_counted() {
        let counters = counters(2);
        let io = IoThread::spawn("t", counters.clone(), Duration::ZERO, false).unwrap();
        let (tx, rx) = mpsc::channel();
        let handler = Arc::new(CountingHandler {
            kicks: tx,
            completions: AtomicUsize::new(0),
            completion_fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        });
        io.attach(handler.clone()).unwrap();
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        io.watch(1, &kick).unwrap();
        kick.write(3).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(counters[1].kicks_ioeventfd.load(Ordering::Relaxed), 3);
        handler.completion_fd.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while handler.completions.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "completion never processed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn unwatched_kick_stays_in_its_eventfd_for_the_next_owner() {
        let io = IoThread::spawn("t", counters(1), Duration::ZERO, false).unwrap();
        let (tx, rx) = mpsc::channel();
        io.attach(Arc::new(CountingHandler {
            kicks: tx,
            completions: AtomicUsize::new(0),
            completion_fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        }))
        .unwrap();
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        io.watch(0, &kick).unwrap();
        io.unwatch(0, &kick);
        kick.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        assert_eq!(kick.read().unwrap(), 1);
    }

    /// A queue whose driver kicks with or without work; counts what the thread does.
    struct DozingHandler {
        work: AtomicUsize,
        taken: AtomicUsize,
        /// Order of events: bumped on each take and each re-arm, recorded for the last of each.
        clock: AtomicUsize,
        last_take: AtomicUsize,
        last_rearm: AtomicUsize,
    }

    impl QueueHandler for DozingHandler {
        fn process_queue(&self, queue: usize) {
            self.poll_queue(queue);
        }
        fn poll_queue(&self, _queue: usize) -> bool {
            let work = self.work.swap(0, Ordering::SeqCst);
            if work > 0 {
                let now = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
                self.last_take.store(now, Ordering::SeqCst);
                self.taken.fetch_add(work, Ordering::SeqCst);
            }
            work > 0
        }
        fn rearm(&self, queue: usize) {
            self.poll_queue(queue);
            let now = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
            self.last_rearm.store(now, Ordering::SeqCst);
        }
        fn doze_on_idle_kicks(&self) -> bool {
            true
        }
        fn completion_fd(&self, _queue: usize) -> Option<RawFd> {
            None
        }
        fn process_completions(&self, _queue: usize) {}
        fn busy(&self, _queue: usize) -> bool {
            false
        }
        fn num_queues(&self) -> usize {
            1
        }
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    #[test]
    fn work_after_a_run_of_empty_kicks_is_taken_and_the_thread_rearms_once_kicks_stop() {
        let counters = counters(1);
        let io = IoThread::spawn("t", counters.clone(), Duration::from_micros(50), false).unwrap();
        let handler = Arc::new(DozingHandler {
            work: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
            clock: AtomicUsize::new(0),
            last_take: AtomicUsize::new(0),
            last_rearm: AtomicUsize::new(0),
        });
        io.attach(handler.clone()).unwrap();
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        io.watch(0, &kick).unwrap();
        // Empty kicks for ~20 ms: the thread dozes with the eventfd unwatched.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(20) {
            kick.write(1).unwrap();
            std::thread::sleep(Duration::from_micros(30));
        }
        // Work after them is taken.
        handler.work.store(1, Ordering::SeqCst);
        kick.write(1).unwrap();
        wait_for("work after empty kicks never taken", || {
            handler.taken.load(Ordering::SeqCst) == 1
        });
        assert!(counters[0].kicks_ioeventfd.load(Ordering::Relaxed) > 0);
        // With no more kicks the thread re-arms and sleeps; a kick then still wakes it.
        wait_for("thread never re-armed after kicks stopped", || {
            handler.last_rearm.load(Ordering::SeqCst) > handler.last_take.load(Ordering::SeqCst)
        });
        std::thread::sleep(Duration::from_millis(5));
        handler.work.store(1, Ordering::SeqCst);
        kick.write(1).unwrap();
        wait_for("kick after re-arming never served", || {
            handler.taken.load(Ordering::SeqCst) == 2
        });
    }

    #[test]
    fn dropping_the_thread_stops_it() {
        let io = IoThread::spawn("t", counters(1), Duration::from_micros(50), true).unwrap();
        drop(io);
    }
}
