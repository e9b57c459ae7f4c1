//! The worker's io_uring: building it, choosing the receive mode, and queueing work on it.
//!
//! Everything here concerns the ring itself rather than what the packets mean: the
//! user-data encoding that routes each completion back to its socket and buffer, the
//! start-up probe that decides between multishot and oneshot receives, arming receives,
//! returning buffers, and the one `io_uring_enter` per loop. It is kept apart so that
//! the relay and conference code can say "queue this send" without the ring's
//! bookkeeping in the way, and so that the unsafe contracts with the kernel (memory that
//! must stay put until its completion) sit in one place.

use super::{DataplaneConfig, Worker};
use crate::error::Error;
use crate::io::addr::SOCKADDR_LEN;
use crate::io::bufs::BufRing;
use crate::io::IoMode;
use crate::relay::SockIdx;
use io_uring::types::{Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

// user_data layout: the top byte is the operation kind.
pub(super) const OP_RECV: u64 = 1 << 56;
pub(super) const OP_SEND: u64 = 2 << 56;
pub(super) const OP_WAKE: u64 = 3 << 56;
pub(super) const OP_CANCEL: u64 = 4 << 56;
const OP_PROBE: u64 = 5 << 56;
pub(super) const OP_MIXSEND: u64 = 6 << 56;
pub(super) const OP_MASK: u64 = 0xff << 56;
pub(super) const BGID: u16 = 0;
/// Completions a worker waits for before the min-wait expires.
const BATCH_WANT: usize = 64;

/// A receive's user data: the socket (bits 0–23), its generation (24–39, so that a late
/// completion for a slot since reused is recognised) and, in oneshot mode, the buffer
/// (40–55). `on_recv` in `relay.rs` decodes it.
fn recv_ud(sock: SockIdx, gen: u16, bid: u16) -> u64 {
    OP_RECV | (bid as u64) << 40 | (gen as u64) << 24 | sock as u64
}

/// A relayed send's user data: the buffer (bits 0–15), to recycle when the send is done,
/// and the sending socket (16–39), to blame if it failed. `on_send` in `relay.rs` decodes
/// it.
pub(super) fn send_ud(bid: u16, out: SockIdx) -> u64 {
    OP_SEND | (out as u64) << 16 | bid as u64
}

/// Where receives get their buffers; fixed once the worker has started.
pub(super) enum Mode {
    /// One `RecvMsgMulti` per socket stays armed and the kernel picks buffers from
    /// `ring`; `hdr` only tells it how much room to leave for the source address.
    Multishot { ring: BufRing, hdr: Box<libc::msghdr> },
    /// One `RecvMsg` per socket at a time with a buffer from `free`; sockets wait in
    /// `waiting` while every buffer is in flight.
    Oneshot { free: Vec<u16>, waiting: VecDeque<SockIdx> },
}

/// A ring with the cheapest completion delivery the kernel offers.
pub(super) fn build_ring(entries: u32) -> io::Result<IoUring> {
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
    /// Switches to the configured receive mode (`auto`: multishot if the probe passes)
    /// and, in multishot mode, sets up the registered file table.
    pub(super) fn init_receive_mode(&mut self, cfg: &DataplaneConfig) -> Result<(), Error> {
        match cfg.io_mode {
            IoMode::Oneshot => {}
            IoMode::Multishot => self.enable_multishot().map_err(Error::Uring)?,
            IoMode::Auto => {
                if let Err(e) = self.enable_multishot() {
                    tracing::warn!(worker = self.index, error = %e, "multishot receive unavailable, using oneshot");
                }
            }
        }
        if self.mode == IoMode::Multishot {
            match self.ring.submitter().register_files_sparse(cfg.max_sockets) {
                Ok(()) => self.fixed_files = true,
                Err(e) => {
                    tracing::warn!(worker = self.index, error = %e, "no registered file table, using plain descriptors")
                }
            }
        }
        Ok(())
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

    /// Queues a read of the eventfd, so that a command sent to this worker ends its wait.
    pub(super) fn arm_wake(&mut self) {
        let e = opcode::Read::new(Fd(self.wake.as_raw_fd()), &mut *self.wake_buf as *mut u64 as *mut u8, 8)
            .build()
            .user_data(OP_WAKE);
        self.sqes.push(e);
    }

    /// After a batch of completions: publishes returned buffers with one store, re-arms
    /// receives that ended, and queues everything for the next enter.
    pub(super) fn after_batch(&mut self) {
        if let Mode::Multishot { ring, .. } = &self.mode_state {
            ring.publish();
        }
        for idx in std::mem::take(&mut self.rearm) {
            self.arm_recv(idx);
        }
        self.push_sqes();
    }

    /// The loop's one syscall: submits what is queued and waits for a completion, the
    /// next conference tick or housekeeping, whichever comes first.
    pub(super) fn enter(&mut self) {
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

    /// Moves queued entries to the submission queue, submitting early if it fills.
    pub(super) fn push_sqes(&mut self) {
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

    /// Gives a receive buffer back (to the kernel's ring, or to the free list, where a
    /// socket waiting for a buffer gets it).
    #[inline]
    pub(super) fn recycle(&mut self, bid: u16) {
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

    /// Starts a receive on a socket (in oneshot mode, as soon as a buffer is free) unless
    /// one is in flight or the socket is closing.
    pub(super) fn arm_recv(&mut self, idx: SockIdx) {
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
}
