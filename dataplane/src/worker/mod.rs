//! The worker thread: one pinned thread, one io_uring, its sessions' sockets.
//!
//! The loop: drain commands, handle every completion (receive → decide → queue a send
//! from the same buffer; send done → buffer back to the ring), push the queued
//! submissions, then one `io_uring_enter` that submits them and waits for the next
//! completion or the housekeeping deadline. A packet costs no syscall of its own: all
//! packets that completed since the last enter share one.
//!
//! One `Worker` struct runs all of it, but its methods are split by role over
//! submodules, each an `impl Worker` block: this file has the public API, the struct
//! and the loop (commands, completion dispatch, housekeeping, events); `ring` the
//! io_uring and its receive modes; `relay` the packet path of relayed sessions; and
//! `conference` the rooms hosted on the worker.

mod conference;
mod relay;
mod ring;

use crate::command::{Command, Event};
use crate::counters::{WorkerCounters, WorkerCountersSnapshot};
use crate::error::Error;
use crate::io::bufs::{Buffers, Slots};
use crate::io::IoMode;
use crate::relay::{SessionSnapshot, SockIdx, Table, TableEvent};
use crate::tap::{TapCounters, TapRecord};
use conference::{ConfHost, Detaching, MixPool};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use io_uring::{cqueue, squeue, IoUring};
use ring::{build_ring, Mode, BGID, OP_MASK, OP_MIXSEND, OP_RECV, OP_SEND, OP_WAKE};
use socket2::Socket;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Data plane settings.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// Number of worker threads.
    pub workers: usize,
    /// Cores to pin workers to (worker i → `cores[i % len]`); empty: no pinning.
    pub cores: Vec<usize>,
    /// Receive mode.
    pub io_mode: IoMode,
    /// Packet buffers per worker (a power of two, at most 32768).
    pub buffers: u16,
    /// Size of one packet buffer in bytes (a larger datagram is dropped as truncated).
    pub buffer_size: usize,
    /// Submission queue entries per ring.
    pub ring_entries: u32,
    /// Capacity of each worker's command queue.
    pub command_capacity: usize,
    /// Capacity of the shared event queue.
    pub event_capacity: usize,
    /// How often a worker checks timeouts, publishes counters and wakes when idle.
    pub housekeeping: Duration,
    /// How often per-session statistics are pushed as events.
    pub stats_interval: Duration,
    /// Once a completion is pending, how long a worker may keep waiting for more before
    /// it runs (Linux 6.12+ min-wait). Fewer wake-ups per packet at the cost of at most
    /// this much added latency; zero wakes for every completion.
    pub batch_wait: Duration,
    /// Most sockets one worker holds at once (sizes its registered file table).
    pub max_sockets: u32,
    /// Capacity of the intercept queue (packets) shared by the workers.
    pub tap_capacity: usize,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            cores: Vec::new(),
            io_mode: IoMode::Auto,
            buffers: 4096,
            buffer_size: 2048,
            ring_entries: 4096,
            command_capacity: 4096,
            event_capacity: 65536,
            housekeeping: Duration::from_millis(50),
            stats_interval: Duration::from_secs(1),
            batch_wait: Duration::ZERO,
            max_sockets: 65536,
            tap_capacity: 4096,
        }
    }
}

/// The control plane's handle on one worker.
#[derive(Debug)]
pub struct WorkerHandle {
    index: usize,
    tx: Sender<Command>,
    wake: Arc<OwnedFd>,
    counters: Arc<WorkerCounters>,
    mode: IoMode,
    core: Option<usize>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Queues a command and wakes the worker. Fails at once if its queue is full.
    pub fn send(&self, cmd: Command) -> Result<(), Error> {
        match self.tx.try_send(cmd) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(Error::QueueFull(self.index)),
            Err(TrySendError::Disconnected(_)) => return Err(Error::WorkerGone(self.index)),
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd we own.
        unsafe { libc::write(self.wake.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        Ok(())
    }

    /// The receive mode this worker runs in (resolved from `auto`).
    pub fn mode(&self) -> IoMode {
        self.mode
    }

    /// The core it is pinned to.
    pub fn core(&self) -> Option<usize> {
        self.core
    }

    /// Its counters.
    pub fn counters(&self) -> &WorkerCounters {
        &self.counters
    }

    /// A shared handle on its counters, for readers that outlive a borrow.
    pub fn counters_arc(&self) -> Arc<WorkerCounters> {
        self.counters.clone()
    }
}

/// The running data plane: its workers.
#[derive(Debug)]
pub struct Dataplane {
    workers: Vec<WorkerHandle>,
    tap_rx: Receiver<TapRecord>,
    tap_counters: Arc<TapCounters>,
}

impl Dataplane {
    /// Starts the workers; returns once every one is running (or the first failure).
    /// Events from all workers arrive on the returned receiver.
    pub fn start(cfg: DataplaneConfig) -> Result<(Self, Receiver<Event>), Error> {
        if cfg.workers == 0 {
            return Err(Error::Config("at least one worker is needed".into()));
        }
        if !cfg.buffers.is_power_of_two() || cfg.buffers > 32768 {
            return Err(Error::Config("buffers must be a power of two up to 32768".into()));
        }
        let nofile = raise_nofile_limit();
        // The registered file table may not be larger than the open-file limit.
        let mut cfg = cfg;
        cfg.max_sockets = cfg.max_sockets.min(nofile.saturating_sub(64).max(64) as u32);
        let (ev_tx, ev_rx) = crossbeam_channel::bounded(cfg.event_capacity);
        let (tap_tx, tap_rx) = crossbeam_channel::bounded(cfg.tap_capacity.max(1));
        let tap_counters = Arc::new(TapCounters::default());
        let mut workers = Vec::with_capacity(cfg.workers);
        for index in 0..cfg.workers {
            let (tx, rx) = crossbeam_channel::bounded(cfg.command_capacity);
            // SAFETY: plain eventfd creation; checked below.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(Error::Uring(io::Error::last_os_error()));
            }
            // SAFETY: efd is a fresh descriptor we own.
            let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
            let counters = Arc::new(WorkerCounters::default());
            let core = (!cfg.cores.is_empty()).then(|| cfg.cores[index % cfg.cores.len()]);
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let (c, w, cnt, ev) = (cfg.clone(), wake.clone(), counters.clone(), ev_tx.clone());
            let (ttx, tcnt) = (tap_tx.clone(), tap_counters.clone());
            let thread = std::thread::Builder::new()
                .name(format!("hasp-worker-{index}"))
                .spawn(move || {
                    let worker = match core.map(crate::affinity::pin_current_thread) {
                        Some(Err(source)) => Err(Error::Affinity { core: core.unwrap_or(0), source }),
                        _ => Worker::new(index, &c, rx, ev, w, cnt, ttx, tcnt),
                    };
                    match worker {
                        Ok(mut w) => {
                            let _ = ready_tx.send(Ok(w.mode));
                            w.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(Error::Thread)?;
            let mode = ready_rx.recv().map_err(|_| Error::WorkerGone(index))??;
            tracing::info!(worker = index, ?core, mode = mode.as_str(), "worker started");
            workers.push(WorkerHandle { index, tx, wake, counters, mode, core, thread: Some(thread) });
        }
        Ok((Self { workers, tap_rx, tap_counters }, ev_rx))
    }

    /// The workers.
    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }

    /// The intercept queue's receiving end (every tapped packet of every worker).
    pub fn tap_receiver(&self) -> Receiver<TapRecord> {
        self.tap_rx.clone()
    }

    /// Intercept counters.
    pub fn tap_counters(&self) -> Arc<TapCounters> {
        self.tap_counters.clone()
    }

    /// Asks every worker to stop and waits for them.
    pub fn shutdown(&mut self) {
        for w in &self.workers {
            let _ = w.send(Command::Shutdown);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Raises the soft limit on open files to the hard limit: every leg holds two sockets,
/// and the default soft limit of 1,024 would cap a relay near 250 sessions.
/// Returns the soft limit in force afterwards.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
            tracing::warn!("cannot raise the open-file limit");
        }
        lim.rlim_cur
    }
}

/// What a socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Relay,
    Conf { conf: u64, pid: u32, rtcp: bool },
}

struct SockIo {
    sock: Socket,
    role: Role,
    /// Its bound address (the destination of what it receives), for intercept records.
    local: Option<std::net::SocketAddr>,
    gen: u16,
    /// user_data of the receive in flight, if any.
    armed: Option<u64>,
    closing: bool,
}

struct Worker {
    // Field order is drop order: the ring goes first, so the kernel lets go of the
    // buffers and slots before they are freed.
    ring: IoUring,
    mode_state: Mode,
    bufs: Buffers,
    slots: Slots,
    mode: IoMode,
    index: usize,
    table: Table,
    socks: Vec<Option<SockIo>>,
    next_gen: u16,
    rx: Receiver<Command>,
    events: Sender<Event>,
    pending_events: VecDeque<Event>,
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    counters: Arc<WorkerCounters>,
    local: WorkerCountersSnapshot,
    cqes: Vec<cqueue::Entry>,
    sqes: Vec<squeue::Entry>,
    to_close: Vec<SockIdx>,
    rearm: Vec<SockIdx>,
    scratch_ids: Vec<u64>,
    scratch_events: Vec<TableEvent>,
    scratch_snaps: Vec<SessionSnapshot>,
    housekeeping: Duration,
    stats_interval: Duration,
    /// Min-wait in µs, 0 when off or unsupported by the kernel.
    batch_wait_us: u32,
    /// Sockets are registered files, indexed by their `SockIdx`.
    fixed_files: bool,
    next_housekeeping: Instant,
    next_stats: Instant,
    shutting_down: bool,
    tap_tx: Sender<TapRecord>,
    tap_counters: Arc<TapCounters>,
    /// Wall-clock time read once per loop, for intercept timestamps.
    wall_now: std::time::SystemTime,
    confs: HashMap<u64, ConfHost>,
    /// Participants whose sockets are closing: sockets still open.
    closing_parts: HashMap<(u64, u32), u8>,
    detaching: HashMap<(u64, u32), Detaching>,
    next_tick: Option<Instant>,
    next_sr: Instant,
    mix: MixPool,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    fn new(
        index: usize,
        cfg: &DataplaneConfig,
        rx: Receiver<Command>,
        events: Sender<Event>,
        wake: Arc<OwnedFd>,
        counters: Arc<WorkerCounters>,
        tap_tx: Sender<TapRecord>,
        tap_counters: Arc<TapCounters>,
    ) -> Result<Self, Error> {
        let ring = build_ring(cfg.ring_entries).map_err(Error::Uring)?;
        let batch_wait_us = if ring.params().is_feature_min_timeout() {
            cfg.batch_wait.as_micros().min(u32::MAX as u128) as u32
        } else {
            0
        };
        let bufs = Buffers::new(cfg.buffers, cfg.buffer_size);
        let slots = Slots::new(cfg.buffers);
        let now = Instant::now();
        let mut w = Self {
            ring,
            mode_state: Mode::Oneshot { free: (0..cfg.buffers).rev().collect(), waiting: VecDeque::new() },
            bufs,
            slots,
            mode: IoMode::Oneshot,
            index,
            table: Table::new(now),
            socks: Vec::new(),
            next_gen: 0,
            rx,
            events,
            pending_events: VecDeque::new(),
            wake,
            wake_buf: Box::new(0),
            counters,
            local: WorkerCountersSnapshot::default(),
            cqes: Vec::with_capacity(1024),
            sqes: Vec::with_capacity(1024),
            to_close: Vec::with_capacity(64),
            rearm: Vec::with_capacity(64),
            scratch_ids: Vec::with_capacity(64),
            scratch_events: Vec::with_capacity(1024),
            scratch_snaps: Vec::new(),
            housekeeping: cfg.housekeeping,
            stats_interval: cfg.stats_interval,
            batch_wait_us,
            fixed_files: false,
            next_housekeeping: now,
            next_stats: now + cfg.stats_interval,
            shutting_down: false,
            tap_tx,
            tap_counters,
            wall_now: std::time::SystemTime::now(),
            confs: HashMap::new(),
            closing_parts: HashMap::new(),
            detaching: HashMap::new(),
            next_tick: None,
            next_sr: now,
            mix: MixPool::new(),
        };
        w.init_receive_mode(cfg)?;
        w.arm_wake();
        Ok(w)
    }

    fn run(&mut self) {
        loop {
            self.drain_commands();
            if self.shutting_down && self.table.is_empty() && self.closing_parts.is_empty() {
                break;
            }
            let now = Instant::now();
            if self.table.tapped() > 0 {
                self.wall_now = std::time::SystemTime::now();
            }
            let mut cqes = std::mem::take(&mut self.cqes);
            loop {
                cqes.clear();
                cqes.extend(self.ring.completion().take(cqes.capacity()));
                if cqes.is_empty() {
                    break;
                }
                self.local.completions += cqes.len() as u64;
                for cqe in &cqes {
                    self.on_completion(now, cqe);
                }
                self.after_batch();
                // A flood of packets must not delay the mixer's tick.
                if self.next_tick.is_some() {
                    let t = Instant::now();
                    if self.next_tick.is_some_and(|d| t >= d) {
                        self.conf_tick(t);
                    }
                }
            }
            self.cqes = cqes;
            if self.next_tick.is_some_and(|t| now >= t) {
                self.conf_tick(now);
            }
            if now >= self.next_housekeeping {
                self.housekeep(now);
            }
            self.flush_events();
            self.counters.publish(&self.local);
            self.enter();
            // Closing only after the sends queued above were submitted: the kernel has
            // taken its own reference to each file, and the fd number cannot be reused
            // under a queued send.
            for idx in std::mem::take(&mut self.to_close) {
                self.close_sock(idx);
            }
        }
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
        tracing::info!(worker = self.index, "worker stopped");
    }

    fn on_completion(&mut self, now: Instant, cqe: &cqueue::Entry) {
        let ud = cqe.user_data();
        match ud & OP_MASK {
            OP_RECV => self.on_recv(now, ud, cqe.result(), cqe.flags()),
            OP_SEND => self.on_send(ud, cqe.result()),
            OP_MIXSEND => self.on_mix_send(ud, cqe.result()),
            OP_WAKE if !self.shutting_down || !self.table.is_empty() || !self.confs.is_empty() => self.arm_wake(),
            _ => {}
        }
    }

    fn drain_commands(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => self.on_command(cmd),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.begin_shutdown();
                    return;
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Add(new) => self.add(*new, now),
            Command::SetRemote { id, leg, remote } => {
                self.table.set_remote(id, leg as usize, remote);
            }
            Command::Remove { id } => self.remove(id),
            Command::Query { id, reply } => {
                let _ = reply.try_send(self.table.snapshot(id, now));
            }
            Command::ConfAdd { conf, cfg } => self.conf_add(conf, cfg, now),
            Command::ConfRemove { conf } => self.conf_remove(conf),
            Command::ParticipantAdd(p) => self.add_participant(*p),
            Command::ParticipantUpdate { conf, id, remote, mute, deaf } => {
                self.participant_update(conf, id, remote, mute, deaf)
            }
            Command::ParticipantRemove { conf, id } => self.remove_participant(conf, id),
            Command::ParticipantMove { conf, id, to } => self.move_participant(conf, id, to),
            Command::ParticipantDetach { conf, id, reply } => self.detach_participant(conf, id, reply),
            Command::ParticipantAttach { conf, p } => self.attach_participant(conf, *p),
            Command::ConfQuery { conf, reply } => self.conf_query(conf, reply),
            Command::SetTap { id, tap } => {
                self.table.set_tap(id, tap);
            }
            Command::Shutdown => self.begin_shutdown(),
        }
        self.local.sessions = self.table.len() as u64;
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        self.close_confs();
        for id in self.table.ids() {
            self.remove(id);
        }
    }

    fn housekeep(&mut self, now: Instant) {
        self.next_housekeeping = now + self.housekeeping;
        let mut ids = std::mem::take(&mut self.scratch_ids);
        self.table.expired(now, &mut ids);
        for &id in &ids {
            self.emit(Event::TimedOut { id }, true);
            self.remove(id);
        }
        ids.clear();
        self.scratch_ids = ids;

        let mut evs = std::mem::take(&mut self.scratch_events);
        self.table.drain_events(&mut evs);
        for e in evs.drain(..) {
            let TableEvent::Latched { id, leg, rtcp, addr, relatch } = e;
            self.emit(Event::Latched { id, leg, rtcp, addr, relatch }, false);
        }
        self.scratch_events = evs;

        if now >= self.next_stats {
            self.next_stats = now + self.stats_interval;
            let mut snaps = std::mem::take(&mut self.scratch_snaps);
            self.table.drain_dirty(now, &mut snaps);
            for s in snaps.drain(..) {
                self.emit(Event::Stats(Box::new(s)), false);
            }
            self.scratch_snaps = snaps;
        }
        self.push_sqes();
    }

    /// Sends an event; critical ones (that free ports or end sessions) are kept and
    /// retried when the queue is full, the rest are counted and dropped.
    fn emit(&mut self, ev: Event, critical: bool) {
        if !self.pending_events.is_empty() && critical {
            self.pending_events.push_back(ev);
            return;
        }
        match self.events.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(ev)) if critical => self.pending_events.push_back(ev),
            Err(_) => self.local.events_dropped += 1,
        }
    }

    fn flush_events(&mut self) {
        while let Some(ev) = self.pending_events.pop_front() {
            match self.events.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) => {
                    self.pending_events.push_front(ev);
                    return;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.pending_events.clear();
                    return;
                }
            }
        }
    }
}
