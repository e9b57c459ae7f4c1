//! The worker thread: one pinned thread, one io_uring, its sessions' sockets.
//!
//! The loop: drain commands, handle every completion (receive → decide → queue a send
//! from the same buffer; send done → buffer back to the ring), push the queued
//! submissions, then one `io_uring_enter` that submits them and waits for the next
//! completion or the housekeeping deadline. A packet costs no syscall of its own: all
//! packets that completed since the last enter share one.

use crate::command::{Command, ConfSnapshot, DetachedParticipant, Event, NewParticipant, NewSession};
use crate::counters::{WorkerCounters, WorkerCountersSnapshot};
use crate::error::Error;
use crate::io::addr::{read_sockaddr, SOCKADDR_LEN};
use crate::io::bufs::{BufRing, Buffers, Slots, Target};
use crate::io::IoMode;
use crate::mixer::Room;
use crate::relay::latch::{Latch, LatchDecision, LatchPolicy};
use crate::relay::stats::DropReason;
use crate::relay::{SessionSnapshot, SockIdx, Table, TableEvent, Verdict};
use crate::tap::{TapCounters, TapRecord, TAP_MAX};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use io_uring::types::{Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
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

// user_data layout: the top byte is the operation kind.
const OP_RECV: u64 = 1 << 56;
const OP_SEND: u64 = 2 << 56;
const OP_WAKE: u64 = 3 << 56;
const OP_CANCEL: u64 = 4 << 56;
const OP_PROBE: u64 = 5 << 56;
const OP_MIXSEND: u64 = 6 << 56;
/// Send buffers of the mixer per worker.
const MIX_BUFFERS: u16 = 2048;
/// The conference tick.
const TICK: Duration = Duration::from_millis(20);
const OP_MASK: u64 = 0xff << 56;
const BGID: u16 = 0;
/// Completions a worker waits for before the min-wait expires.
const BATCH_WANT: usize = 64;

fn recv_ud(sock: SockIdx, gen: u16, bid: u16) -> u64 {
    OP_RECV | (bid as u64) << 40 | (gen as u64) << 24 | sock as u64
}

fn send_ud(bid: u16, out: SockIdx) -> u64 {
    OP_SEND | (out as u64) << 16 | bid as u64
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

enum Mode {
    Multishot { ring: BufRing, hdr: Box<libc::msghdr> },
    Oneshot { free: Vec<u16>, waiting: VecDeque<SockIdx> },
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

/// A room on this worker and its participants' sockets and addresses.
struct ConfHost {
    room: Room,
    parts: HashMap<u32, PartIo>,
    ticks: u64,
    late_ticks: u64,
}

struct PartIo {
    socks: [SockIdx; 2],
    signalled: Option<std::net::SocketAddr>,
    latch: Latch,
    rtcp_latch: Latch,
}

impl PartIo {
    fn rtp_dest(&self) -> Option<std::net::SocketAddr> {
        self.latch.addr().or(self.signalled)
    }

    fn rtcp_dest(&self) -> Option<std::net::SocketAddr> {
        self.rtcp_latch.addr().or_else(|| {
            self.rtp_dest().map(|mut a| {
                a.set_port(a.port().wrapping_add(1));
                a
            })
        })
    }
}

/// A participant whose receives are being stopped so its sockets can move to another
/// worker.
struct Detaching {
    state: Option<crate::mixer::MovedParticipant>,
    signalled: Option<std::net::SocketAddr>,
    latched: [Option<std::net::SocketAddr>; 2],
    sockets: [Option<Socket>; 2],
    socks: [SockIdx; 2],
    reply: Sender<Box<DetachedParticipant>>,
}

/// Buffers for what the mixer sends (received packets use the ring's own).
struct MixPool {
    bufs: Buffers,
    slots: Slots,
    free: Vec<u16>,
}

fn build_ring(entries: u32) -> io::Result<IoUring> {
    // Single issuer + deferred task work: completions are posted only when this thread
    // enters the kernel, which it does once per loop anyway. Older kernels lack them.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(entries * 4)
        .build(entries)
        .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).build(entries))
        .or_else(|_| IoUring::new(entries))
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
            mix: MixPool {
                bufs: Buffers::new(MIX_BUFFERS, 1536),
                slots: Slots::new(MIX_BUFFERS),
                free: (0..MIX_BUFFERS).rev().collect(),
            },
        };
        match cfg.io_mode {
            IoMode::Oneshot => {}
            IoMode::Multishot => w.enable_multishot().map_err(Error::Uring)?,
            IoMode::Auto => {
                if let Err(e) = w.enable_multishot() {
                    tracing::warn!(worker = index, error = %e, "multishot receive unavailable, using oneshot");
                }
            }
        }
        if w.mode == IoMode::Multishot {
            match w.ring.submitter().register_files_sparse(cfg.max_sockets) {
                Ok(()) => w.fixed_files = true,
                Err(e) => {
                    tracing::warn!(worker = index, error = %e, "no registered file table, using plain descriptors")
                }
            }
        }
        w.arm_wake();
        Ok(w)
    }

    /// Registers a buffer ring and checks, with a real datagram on loopback, that
    /// multishot recvmsg delivers into it.
    fn enable_multishot(&mut self) -> io::Result<()> {
        let mut ring = BufRing::new(self.bufs.count());
        for bid in 0..self.bufs.count() {
            ring.push(bid, self.bufs.ptr(bid), self.bufs.size() as u32);
        }
        ring.publish();
        // SAFETY: the ring memory lives in `mode_state` (or is dropped after unregistering
        // below) and outlives its registration.
        unsafe { self.ring.submitter().register_buf_ring_with_flags(ring.addr(), ring.entries(), BGID, 0)? };
        // SAFETY: zeroed msghdr is valid; only namelen/controllen matter for multishot.
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        hdr.msg_namelen = SOCKADDR_LEN as u32;
        let probe = self.probe_multishot(&hdr);
        match probe {
            Ok(bid) => {
                ring.push(bid, self.bufs.ptr(bid), self.bufs.size() as u32);
                ring.publish();
                self.mode_state = Mode::Multishot { ring, hdr };
                self.mode = IoMode::Multishot;
                Ok(())
            }
            Err(e) => {
                let _ = self.ring.submitter().unregister_buf_ring(BGID);
                Err(e)
            }
        }
    }

    fn probe_multishot(&mut self, hdr: &libc::msghdr) -> io::Result<u16> {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let entry = opcode::RecvMsgMulti::new(Fd(rx.as_raw_fd()), hdr, BGID).build().user_data(OP_PROBE);
        // SAFETY: hdr outlives the operation (cancelled and reaped below).
        unsafe { self.ring.submission().push(&entry).map_err(|_| io::Error::other("submission queue full"))? };
        self.ring.submit()?;
        tx.send_to(b"probe", rx.local_addr()?)?;
        let mut result = Err(io::Error::other("no completion for multishot probe"));
        let mut cancelled = false;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let ts = Timespec::new().nsec(100_000_000);
            match self.ring.submitter().submit_with_args(1, &SubmitArgs::new().timespec(&ts)) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            let mut done = false;
            for cqe in self.ring.completion() {
                if cqe.user_data() != OP_PROBE {
                    continue;
                }
                let more = cqueue::more(cqe.flags());
                if cqe.result() > 0 {
                    if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
                        result =
                            if more { Ok(bid) } else { Err(io::Error::other("multishot receive did not stay armed")) };
                    }
                } else if result.is_err() && cqe.result() < 0 {
                    result = Err(io::Error::from_raw_os_error(-cqe.result()));
                }
                if !more {
                    done = true;
                }
            }
            if done {
                break;
            }
            if result.is_ok() && !cancelled {
                let c = opcode::AsyncCancel::new(OP_PROBE).build().user_data(OP_CANCEL);
                // SAFETY: a cancel op references no memory.
                unsafe { self.ring.submission().push(&c).map_err(|_| io::Error::other("submission queue full"))? };
                cancelled = true;
            }
        }
        // Drain the cancel's own completion.
        for _ in self.ring.completion() {}
        result
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(Fd(self.wake.as_raw_fd()), &mut *self.wake_buf as *mut u64 as *mut u8, 8)
            .build()
            .user_data(OP_WAKE);
        self.sqes.push(e);
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

    fn after_batch(&mut self) {
        if let Mode::Multishot { ring, .. } = &self.mode_state {
            ring.publish();
        }
        for idx in std::mem::take(&mut self.rearm) {
            self.arm_recv(idx);
        }
        self.push_sqes();
    }

    fn enter(&mut self) {
        self.push_sqes();
        let deadline = match self.next_tick {
            Some(t) => t.min(self.next_housekeeping),
            None => self.next_housekeeping,
        };
        let wait = deadline.saturating_duration_since(Instant::now()).min(self.housekeeping);
        let ts = Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
        self.local.enters += 1;
        // With min-wait, ask for a full batch: the kernel returns after `batch_wait_us`
        // with whatever arrived (at least one), or at the timeout with nothing.
        let (want, args) = match self.batch_wait_us {
            0 => (1, SubmitArgs::new().timespec(&ts)),
            us => (BATCH_WANT, SubmitArgs::new().min_wait_usec(us).timespec(&ts)),
        };
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
            Err(e) => tracing::error!(worker = self.index, error = %e, "io_uring_enter failed"),
        }
    }

    fn push_sqes(&mut self) {
        let mut i = 0;
        while i < self.sqes.len() {
            let pushed = {
                let mut sq = self.ring.submission();
                let mut n = 0;
                for e in &self.sqes[i..] {
                    // SAFETY: every entry points into buffers, slots or boxes owned by this
                    // worker that stay put until the operation completes.
                    if unsafe { sq.push(e) }.is_err() {
                        break;
                    }
                    n += 1;
                }
                n
            };
            i += pushed;
            if i < self.sqes.len() {
                // Queue full: hand what we have to the kernel and continue.
                self.local.enters += 1;
                if let Err(e) = self.ring.submit() {
                    if e.raw_os_error() != Some(libc::EBUSY) {
                        tracing::error!(worker = self.index, error = %e, "io_uring submit failed");
                    }
                }
            }
        }
        self.sqes.clear();
    }

    fn on_completion(&mut self, now: Instant, cqe: &cqueue::Entry) {
        let ud = cqe.user_data();
        match ud & OP_MASK {
            OP_RECV => self.on_recv(now, ud, cqe.result(), cqe.flags()),
            OP_SEND => {
                let bid = ud as u16;
                let out = ((ud >> 16) & 0xff_ffff) as SockIdx;
                if cqe.result() < 0 {
                    self.local.drops[DropReason::SendError as usize] += 1;
                    self.table.on_send_error(out);
                } else {
                    self.local.tx_packets += 1;
                    self.local.tx_bytes += cqe.result() as u64;
                }
                self.recycle(bid);
            }
            OP_MIXSEND => {
                if cqe.result() < 0 {
                    self.local.drops[DropReason::SendError as usize] += 1;
                } else {
                    self.local.tx_packets += 1;
                    self.local.tx_bytes += cqe.result() as u64;
                }
                self.mix.free.push(ud as u16);
            }
            OP_WAKE if !self.shutting_down || !self.table.is_empty() || !self.confs.is_empty() => self.arm_wake(),
            _ => {}
        }
    }

    #[inline]
    fn on_recv(&mut self, now: Instant, ud: u64, res: i32, flags: u32) {
        let idx = (ud & 0xff_ffff) as SockIdx;
        let gen = ((ud >> 24) & 0xffff) as u16;
        let multishot = matches!(self.mode_state, Mode::Multishot { .. });
        let bid = if multishot { cqueue::buffer_select(flags) } else { Some((ud >> 40) as u16) };
        let final_cqe = !multishot || !cqueue::more(flags);
        if res >= 0 {
            if let Some(bid) = bid {
                self.on_packet(now, idx, bid, res as usize);
            }
        } else if let Some(bid) = bid {
            self.recycle(bid);
        }
        if res == -libc::ENOBUFS {
            self.local.buffer_exhausted += 1;
        }
        if !final_cqe {
            return;
        }
        let Some(Some(s)) = self.socks.get_mut(idx as usize) else {
            return;
        };
        if s.gen != gen {
            return;
        }
        s.armed = None;
        if s.closing {
            self.to_close.push(idx);
        } else {
            self.rearm.push(idx);
        }
    }

    #[inline]
    fn on_packet(&mut self, now: Instant, idx: SockIdx, bid: u16, res: usize) {
        let (src, payload_off, len, truncated) = match &self.mode_state {
            Mode::Multishot { hdr, .. } => {
                // SAFETY: the kernel finished writing this buffer (its CQE arrived).
                let buf = unsafe { self.bufs.slice(bid, res) };
                match RecvMsgOut::parse(buf, hdr) {
                    Ok(m) => {
                        let off = m.payload_data().as_ptr() as usize - buf.as_ptr() as usize;
                        (read_sockaddr(m.name_data()), off, m.payload_data().len(), m.is_payload_truncated())
                    }
                    Err(()) => (None, 0, 0, true),
                }
            }
            Mode::Oneshot { .. } => {
                let slot = self.slots.get(bid);
                // SAFETY: the slot's address was filled by the completed recvmsg.
                let name = unsafe {
                    std::slice::from_raw_parts(&slot.addr as *const _ as *const u8, slot.hdr.msg_namelen as usize)
                };
                (read_sockaddr(name), 0, res, slot.hdr.msg_flags & libc::MSG_TRUNC != 0)
            }
        };
        self.local.rx_packets += 1;
        self.local.rx_bytes += len as u64;
        if let Some(Some(SockIo { role: Role::Conf { conf, pid, rtcp }, .. })) = self.socks.get(idx as usize) {
            let (conf, pid, rtcp) = (*conf, *pid, *rtcp);
            if let (Some(src), false) = (src, truncated) {
                // SAFETY: as below; the payload lies within the buffer.
                let pkt = unsafe { std::slice::from_raw_parts(self.bufs.ptr(bid).add(payload_off), len) };
                self.conf_packet(now, conf, pid, rtcp, src, pkt);
            } else {
                self.local.drops[DropReason::Malformed as usize] += 1;
            }
            self.recycle(bid);
            return;
        }
        let verdict = match (src, truncated) {
            (Some(src), false) => {
                // SAFETY: as above; the payload lies within the buffer.
                let pkt = unsafe { std::slice::from_raw_parts(self.bufs.ptr(bid).add(payload_off), len) };
                let v = self.table.on_packet(now, idx, src, pkt);
                if self.table.tapped() > 0 && matches!(v, Verdict::Forward { .. }) {
                    self.tap(idx, src, pkt);
                }
                v
            }
            (_, true) => Verdict::Drop(DropReason::Truncated),
            (None, false) => Verdict::Drop(DropReason::Malformed),
        };
        match verdict {
            Verdict::Forward { out, dst } => {
                let Some(Some(o)) = self.socks.get(out as usize) else {
                    self.local.drops[DropReason::Closing as usize] += 1;
                    self.recycle(bid);
                    return;
                };
                let fd = o.sock.as_raw_fd();
                // SAFETY: the payload pointer stays valid until the send completes and
                // the buffer is recycled.
                let base = unsafe { self.bufs.ptr(bid).add(payload_off) };
                let ud = send_ud(bid, out);
                let slot = self.slots.get(bid);
                // SAFETY: the slot and buffer belong to `bid` until its send completes.
                let e = unsafe {
                    match &self.mode_state {
                        Mode::Multishot { .. } => {
                            let t = if self.fixed_files { Target::Fixed(out) } else { Target::Fd(fd) };
                            slot.send_to_entry(t, base, len, &dst, ud)
                        }
                        Mode::Oneshot { .. } => slot.send_entry(fd, base, len, &dst, ud),
                    }
                };
                self.sqes.push(e);
            }
            Verdict::Drop(r) => {
                self.local.drops[r as usize] += 1;
                self.recycle(bid);
            }
        }
    }

    /// Copies an accepted packet of a tapped session into the intercept queue. Never
    /// blocks: a full queue drops the copy (counted for LI administrators only).
    #[cold]
    fn tap(&mut self, idx: SockIdx, src: std::net::SocketAddr, pkt: &[u8]) {
        let Some((spec, leg, rtcp)) = self.table.tap_of(idx) else { return };
        let Some(Some(s)) = self.socks.get(idx as usize) else { return };
        let len = pkt.len().min(TAP_MAX);
        let mut rec = TapRecord {
            xid: spec.xid,
            correlation: spec.correlation,
            from_target: leg == spec.target_leg,
            rtcp,
            src,
            dst: s.local.unwrap_or(src),
            at: self.wall_now,
            orig_len: pkt.len() as u16,
            len: len as u16,
            data: [0; TAP_MAX],
        };
        rec.data[..len].copy_from_slice(&pkt[..len]);
        match self.tap_tx.try_send(rec) {
            Ok(()) => self.tap_counters.copied.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            Err(_) => self.tap_counters.queue_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
    }

    #[inline]
    fn recycle(&mut self, bid: u16) {
        match &mut self.mode_state {
            Mode::Multishot { ring, .. } => ring.push(bid, self.bufs.ptr(bid), self.bufs.size() as u32),
            Mode::Oneshot { free, waiting } => {
                free.push(bid);
                if let Some(idx) = waiting.pop_front() {
                    self.rearm.push(idx);
                }
            }
        }
    }

    fn arm_recv(&mut self, idx: SockIdx) {
        let Some(Some(s)) = self.socks.get_mut(idx as usize) else {
            return;
        };
        if s.armed.is_some() || s.closing {
            return;
        }
        let fd = s.sock.as_raw_fd();
        let gen = s.gen;
        let entry = match &mut self.mode_state {
            Mode::Multishot { hdr, .. } => {
                let ud = recv_ud(idx, gen, 0);
                s.armed = Some(ud);
                if self.fixed_files {
                    opcode::RecvMsgMulti::new(Fixed(idx), &**hdr, BGID).build().user_data(ud)
                } else {
                    opcode::RecvMsgMulti::new(Fd(fd), &**hdr, BGID).build().user_data(ud)
                }
            }
            Mode::Oneshot { free, waiting } => {
                let Some(bid) = free.pop() else {
                    // Every buffer is in flight; the socket waits for the next one freed.
                    waiting.push_back(idx);
                    return;
                };
                let ud = recv_ud(idx, gen, bid);
                s.armed = Some(ud);
                let slot = self.slots.get(bid);
                slot.iov = libc::iovec { iov_base: self.bufs.ptr(bid) as *mut libc::c_void, iov_len: self.bufs.size() };
                slot.hdr.msg_name = &mut slot.addr as *mut _ as *mut libc::c_void;
                slot.hdr.msg_namelen = SOCKADDR_LEN as u32;
                slot.hdr.msg_iov = &mut slot.iov;
                slot.hdr.msg_iovlen = 1;
                slot.hdr.msg_control = std::ptr::null_mut();
                slot.hdr.msg_controllen = 0;
                slot.hdr.msg_flags = 0;
                opcode::RecvMsg::new(Fd(fd), &mut slot.hdr).build().user_data(ud)
            }
        };
        self.sqes.push(entry);
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
            Command::ConfAdd { conf, cfg } => {
                self.confs.entry(conf).or_insert_with(|| ConfHost {
                    room: Room::new(cfg),
                    parts: HashMap::new(),
                    ticks: 0,
                    late_ticks: 0,
                });
                if self.next_tick.is_none() {
                    self.next_tick = Some(now + TICK);
                }
            }
            Command::ConfRemove { conf } => {
                let ids: Vec<u32> =
                    self.confs.get(&conf).map(|c| c.parts.keys().copied().collect()).unwrap_or_default();
                for id in ids {
                    self.remove_participant(conf, id);
                }
                self.confs.remove(&conf);
                if self.confs.is_empty() {
                    self.next_tick = None;
                }
            }
            Command::ParticipantAdd(p) => self.add_participant(*p),
            Command::ParticipantUpdate { conf, id, remote, mute, deaf } => {
                if let Some(c) = self.confs.get_mut(&conf) {
                    c.room.set_flags(id, mute, deaf);
                    if let (Some(r), Some(p)) = (remote, c.parts.get_mut(&id)) {
                        p.signalled = r;
                        p.latch.reset();
                        p.rtcp_latch.reset();
                    }
                }
            }
            Command::ParticipantRemove { conf, id } => self.remove_participant(conf, id),
            Command::ParticipantMove { conf, id, to } => self.move_participant(conf, id, to),
            Command::ParticipantDetach { conf, id, reply } => self.detach_participant(conf, id, reply),
            Command::ParticipantAttach { conf, p } => self.attach_participant(conf, *p),
            Command::ConfQuery { conf, reply } => {
                let snap = self.confs.get(&conf).map(|c| ConfSnapshot {
                    conf,
                    rate: c.room.rate(),
                    talkers: c.room.talkers(),
                    ticks: c.ticks,
                    late_ticks: c.late_ticks,
                    participants: c.room.stats(),
                    remotes: c.parts.iter().map(|(id, p)| (*id, p.rtp_dest())).collect(),
                });
                let _ = reply.try_send(snap);
            }
            Command::SetTap { id, tap } => {
                self.table.set_tap(id, tap);
            }
            Command::Shutdown => self.begin_shutdown(),
        }
        self.local.sessions = self.table.len() as u64;
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        let confs: Vec<(u64, Vec<u32>)> =
            self.confs.iter().map(|(k, c)| (*k, c.parts.keys().copied().collect())).collect();
        for (conf, ids) in confs {
            for id in ids {
                self.remove_participant(conf, id);
            }
        }
        self.confs.clear();
        self.next_tick = None;
        for id in self.table.ids() {
            self.remove(id);
        }
    }

    fn add(&mut self, new: NewSession, now: Instant) {
        let NewSession { spec, sockets } = new;
        let id = spec.id;
        if self.shutting_down {
            drop(sockets);
            self.emit(Event::Released { id }, true);
            return;
        }
        let Some(idx) = self.table.insert(&spec, now) else {
            // Duplicate id: refuse, and free the ports that came with it.
            drop(sockets);
            self.emit(Event::Released { id }, true);
            return;
        };
        for (leg, socks) in sockets.into_iter().enumerate() {
            for (kind, sock) in socks.into_iter().enumerate() {
                let i = idx[leg][kind] as usize;
                if self.socks.len() <= i {
                    self.socks.resize_with(i + 1, || None);
                }
                self.next_gen = self.next_gen.wrapping_add(1);
                if self.fixed_files {
                    if let Err(e) = self.ring.submitter().register_files_update(i as u32, &[sock.as_raw_fd()]) {
                        // The receive below then fails and the socket is closed with its
                        // session; the error says why.
                        tracing::error!(worker = self.index, error = %e, "cannot register socket");
                    }
                }
                let local = sock.local_addr().ok().and_then(|a| a.as_socket());
                self.socks[i] =
                    Some(SockIo { sock, role: Role::Relay, local, gen: self.next_gen, armed: None, closing: false });
                self.arm_recv(i as SockIdx);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(socks) = self.table.begin_remove(id) else {
            return;
        };
        for idx in socks.into_iter().flatten() {
            self.stop_receiving(idx);
        }
    }

    fn add_participant(&mut self, p: NewParticipant) {
        let NewParticipant { conf, id, codec, payload_type, ssrc, remote, sockets } = p;
        let Some(c) = self.confs.get_mut(&conf) else {
            // No such room: the sockets close with the command, the ports come back.
            drop(sockets);
            self.emit(Event::ParticipantReleased { conf, id }, true);
            return;
        };
        if c.room.add(id, codec, payload_type, ssrc).is_err() {
            drop(sockets);
            self.emit(Event::ParticipantReleased { conf, id }, true);
            return;
        }
        let mut idxs = [0; 2];
        for (k, sock) in sockets.into_iter().enumerate() {
            idxs[k] = self.install_conf_socket(sock, Role::Conf { conf, pid: id, rtcp: k == 1 });
        }
        if let Some(c) = self.confs.get_mut(&conf) {
            c.parts.insert(
                id,
                PartIo { socks: idxs, signalled: remote, latch: Latch::default(), rtcp_latch: Latch::default() },
            );
        }
    }

    fn move_participant(&mut self, conf: u64, id: u32, to: u64) {
        if !self.confs.contains_key(&to) {
            return;
        }
        let Some(c) = self.confs.get_mut(&conf) else { return };
        let (Some(state), Some(part)) = (c.room.take(id), c.parts.remove(&id)) else { return };
        for idx in part.socks {
            if let Some(Some(s)) = self.socks.get_mut(idx as usize) {
                if let Role::Conf { rtcp, .. } = s.role {
                    s.role = Role::Conf { conf: to, pid: id, rtcp };
                }
            }
        }
        if let Some(t) = self.confs.get_mut(&to) {
            t.room.insert(state);
            t.parts.insert(id, part);
        }
    }

    fn detach_participant(&mut self, conf: u64, id: u32, reply: Sender<Box<DetachedParticipant>>) {
        let Some(c) = self.confs.get_mut(&conf) else { return };
        let (Some(state), Some(part)) = (c.room.take(id), c.parts.remove(&id)) else { return };
        self.detaching.insert(
            (conf, id),
            Detaching {
                state: Some(state),
                signalled: part.signalled,
                latched: [part.latch.addr(), part.rtcp_latch.addr()],
                sockets: [None, None],
                socks: part.socks,
                reply,
            },
        );
        for idx in part.socks {
            self.stop_receiving(idx);
        }
    }

    fn attach_participant(&mut self, conf: u64, p: DetachedParticipant) {
        let DetachedParticipant { id, sockets, state, signalled, latched } = p;
        let Some(c) = self.confs.get_mut(&conf) else {
            drop(sockets);
            self.emit(Event::ParticipantReleased { conf, id }, true);
            return;
        };
        c.room.insert(state);
        let mut idxs = [0; 2];
        for (k, sock) in sockets.into_iter().enumerate() {
            idxs[k] = self.install_conf_socket(sock, Role::Conf { conf, pid: id, rtcp: k == 1 });
        }
        if let Some(c) = self.confs.get_mut(&conf) {
            c.parts.insert(
                id,
                PartIo {
                    socks: idxs,
                    signalled,
                    latch: Latch::latched_to(latched[0]),
                    rtcp_latch: Latch::latched_to(latched[1]),
                },
            );
        }
    }

    /// Marks a socket closing and stops its receive: cancels the one in flight (the
    /// socket is closed on its final completion) or, with none in flight, queues the
    /// close for after the next submit.
    fn stop_receiving(&mut self, idx: SockIdx) {
        let Some(Some(s)) = self.socks.get_mut(idx as usize) else { return };
        s.closing = true;
        match s.armed {
            Some(ud) => self.sqes.push(opcode::AsyncCancel::new(ud).build().user_data(OP_CANCEL)),
            None => {
                if let Mode::Oneshot { waiting, .. } = &mut self.mode_state {
                    waiting.retain(|&w| w != idx);
                }
                self.to_close.push(idx);
            }
        }
    }

    /// Puts a participant's socket in the slab and the ring's file table and starts
    /// receiving on it.
    fn install_conf_socket(&mut self, sock: Socket, role: Role) -> SockIdx {
        let i = self.table.alloc_external();
        let slot = i as usize;
        if self.socks.len() <= slot {
            self.socks.resize_with(slot + 1, || None);
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        if self.fixed_files {
            if let Err(e) = self.ring.submitter().register_files_update(i, &[sock.as_raw_fd()]) {
                tracing::error!(worker = self.index, error = %e, "cannot register socket");
            }
        }
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        self.socks[slot] = Some(SockIo { sock, role, local, gen: self.next_gen, armed: None, closing: false });
        self.arm_recv(i);
        i
    }

    fn remove_participant(&mut self, conf: u64, id: u32) {
        let Some(c) = self.confs.get_mut(&conf) else { return };
        c.room.remove(id);
        let Some(p) = c.parts.remove(&id) else { return };
        self.closing_parts.insert((conf, id), 2);
        for idx in p.socks {
            self.stop_receiving(idx);
        }
    }

    fn conf_packet(&mut self, now: Instant, conf: u64, pid: u32, rtcp: bool, src: std::net::SocketAddr, pkt: &[u8]) {
        let Some(c) = self.confs.get_mut(&conf) else { return };
        let Some(p) = c.parts.get_mut(&pid) else { return };
        let policy = LatchPolicy::default();
        if rtcp {
            if p.rtcp_latch.on_packet(&policy, None, now, src, None) == LatchDecision::Reject {
                self.local.drops[DropReason::SourceMismatch as usize] += 1;
            }
            return;
        }
        let ssrc = crate::rtp::RtpHeader::parse(pkt).map(|h| h.ssrc);
        if p.latch.on_packet(&policy, p.signalled, now, src, ssrc) == LatchDecision::Reject {
            self.local.drops[DropReason::SourceMismatch as usize] += 1;
            return;
        }
        if c.room.on_rtp(pid, pkt).is_err() {
            self.local.drops[DropReason::Malformed as usize] += 1;
        }
    }

    /// Runs every room's 20 ms tick and queues what it sends.
    fn conf_tick(&mut self, now: Instant) {
        let Some(due) = self.next_tick else { return };
        // Keep the 20 ms grid; after a long stall, start a new grid rather than
        // bursting to catch up.
        self.next_tick = Some(if now.saturating_duration_since(due) > 3 * TICK { now + TICK } else { due + TICK });
        let Self { confs, socks, mix, sqes, local, fixed_files, .. } = self;
        for c in confs.values_mut() {
            c.ticks += 1;
            let parts = &c.parts;
            c.room.tick(&mut |pid, pkt| {
                let Some(p) = parts.get(&pid) else { return };
                let Some(dst) = p.rtp_dest() else { return };
                let Some(Some(s)) = socks.get(p.socks[0] as usize) else { return };
                let Some(bid) = mix.free.pop() else {
                    local.drops[DropReason::SendError as usize] += 1;
                    return;
                };
                let base = mix.bufs.ptr(bid);
                // SAFETY: the buffer is ours until its send completes.
                unsafe { std::ptr::copy_nonoverlapping(pkt.as_ptr(), base, pkt.len().min(mix.bufs.size())) };
                let target = if *fixed_files { Target::Fixed(p.socks[0]) } else { Target::Fd(s.sock.as_raw_fd()) };
                // SAFETY: slot and buffer stay put until the send completes.
                let e =
                    unsafe { mix.slots.get(bid).send_to_entry(target, base, pkt.len(), &dst, OP_MIXSEND | bid as u64) };
                sqes.push(e);
            });
            // A tick that ends more than 20 ms after it was due missed its budget.
            if Instant::now().saturating_duration_since(due) > TICK {
                c.late_ticks += 1;
            }
        }
        if now >= self.next_sr {
            self.next_sr = now + Duration::from_secs(5);
            self.conf_sender_reports();
        }
    }

    fn conf_sender_reports(&mut self) {
        let ntp = {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let secs = t.as_secs() + 2_208_988_800;
            (secs << 32) | (((t.subsec_nanos() as u64) << 32) / 1_000_000_000)
        };
        let Self { confs, socks, mix, sqes, fixed_files, .. } = self;
        for c in confs.values() {
            for (pid, p) in &c.parts {
                let mut sr = [0u8; 28];
                let (Some(dst), true) = (p.rtcp_dest(), c.room.sender_report(*pid, ntp, &mut sr)) else { continue };
                let Some(Some(s)) = socks.get(p.socks[1] as usize) else { continue };
                let Some(bid) = mix.free.pop() else { return };
                let base = mix.bufs.ptr(bid);
                // SAFETY: as in conf_tick.
                unsafe { std::ptr::copy_nonoverlapping(sr.as_ptr(), base, sr.len()) };
                let target = if *fixed_files { Target::Fixed(p.socks[1]) } else { Target::Fd(s.sock.as_raw_fd()) };
                // SAFETY: as in conf_tick.
                let e =
                    unsafe { mix.slots.get(bid).send_to_entry(target, base, sr.len(), &dst, OP_MIXSEND | bid as u64) };
                sqes.push(e);
            }
        }
    }

    fn close_sock(&mut self, idx: SockIdx) {
        if let Some(Some(SockIo { role: Role::Conf { conf, pid, rtcp }, .. })) = self.socks.get(idx as usize) {
            let (key, k) = ((*conf, *pid), *rtcp as usize);
            if self.detaching.get(&key).is_some_and(|d| d.socks[k] == idx) {
                // Not closed: handed over to another worker with its queued packets.
                let sock = self.socks[idx as usize].take().map(|s| s.sock);
                if self.fixed_files {
                    let _ = self.ring.submitter().register_files_update(idx, &[-1]);
                }
                self.table.release_sock(idx);
                let d = self.detaching.get_mut(&key).expect("checked above");
                d.sockets[k] = sock;
                if d.sockets.iter().all(Option::is_some) {
                    let mut d = self.detaching.remove(&key).expect("present");
                    if let (Some(state), [Some(a), Some(b)]) =
                        (d.state.take(), [d.sockets[0].take(), d.sockets[1].take()])
                    {
                        let out = DetachedParticipant {
                            id: key.1,
                            sockets: [a, b],
                            state,
                            signalled: d.signalled,
                            latched: d.latched,
                        };
                        let _ = d.reply.try_send(Box::new(out));
                    }
                }
                return;
            }
            if let Some(left) = self.closing_parts.get_mut(&key) {
                *left -= 1;
                if *left == 0 {
                    self.closing_parts.remove(&key);
                    self.emit(Event::ParticipantReleased { conf: key.0, id: key.1 }, true);
                }
            }
        }
        if let Some(slot) = self.socks.get_mut(idx as usize) {
            // Dropping the socket closes the fd; the port is free once the kernel's last
            // reference (an in-flight send, if any) goes.
            if slot.take().is_some() && self.fixed_files {
                let _ = self.ring.submitter().register_files_update(idx, &[-1]);
            }
        }
        if let Some(id) = self.table.release_sock(idx) {
            self.local.sessions = self.table.len() as u64;
            self.emit(Event::Released { id }, true);
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
