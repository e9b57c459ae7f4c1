//! Conference hosting: rooms on this worker, their participants' sockets, the 20 ms
//! mixer tick and what it sends, and moving a participant to another room or worker.
//!
//! The mixing itself is sans-IO in `crate::mixer`; this is the IO around it. A
//! participant's sockets live in the same slab and ring as relay legs (marked
//! `Role::Conf`), so the worker needs no second receive path: `relay.rs` hands their
//! packets here instead of to the relay table. The mixer sends from a small buffer pool
//! of its own, because its packets are generated rather than received and must not eat
//! into the receive buffers.

use super::ring::OP_MIXSEND;
use super::{Role, SockIo, Worker};
use crate::command::{ConfSnapshot, DetachedParticipant, Event, NewParticipant};
use crate::io::bufs::{Buffers, Slots, Target};
use crate::mixer::{Room, RoomConfig};
use crate::relay::latch::{Admit, Latch, LatchDecision, LatchPolicy};
use crate::relay::stats::DropReason;
use crate::relay::SockIdx;
use crossbeam_channel::Sender;
use socket2::Socket;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Send buffers of the mixer per worker.
const MIX_BUFFERS: u16 = 2048;
/// The conference tick.
const TICK: Duration = Duration::from_millis(20);

/// A room on this worker and its participants' sockets and addresses.
pub(super) struct ConfHost {
    room: Room,
    parts: HashMap<u32, PartIo>,
    ticks: u64,
    late_ticks: u64,
}

struct PartIo {
    socks: [SockIdx; 2],
    signalled: Option<SocketAddr>,
    latch: Latch,
    rtcp_latch: Latch,
}

impl PartIo {
    fn rtp_dest(&self) -> Option<SocketAddr> {
        self.latch.addr().or(self.signalled)
    }

    fn rtcp_dest(&self) -> Option<SocketAddr> {
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
pub(super) struct Detaching {
    state: Option<crate::mixer::MovedParticipant>,
    signalled: Option<SocketAddr>,
    latched: [Option<SocketAddr>; 2],
    sockets: [Option<Socket>; 2],
    socks: [SockIdx; 2],
    reply: Sender<Box<DetachedParticipant>>,
}

/// Buffers for what the mixer sends (received packets use the ring's own).
pub(super) struct MixPool {
    bufs: Buffers,
    slots: Slots,
    free: Vec<u16>,
}

impl MixPool {
    pub(super) fn new() -> Self {
        Self {
            bufs: Buffers::new(MIX_BUFFERS, 1536),
            slots: Slots::new(MIX_BUFFERS),
            free: (0..MIX_BUFFERS).rev().collect(),
        }
    }
}

impl Worker {
    /// Creates a room (an existing one is kept) and starts the tick with the first.
    pub(super) fn conf_add(&mut self, conf: u64, cfg: RoomConfig, now: Instant) {
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

    /// Deletes a room with its participants; the tick stops with the last room.
    pub(super) fn conf_remove(&mut self, conf: u64) {
        let ids: Vec<u32> = self.confs.get(&conf).map(|c| c.parts.keys().copied().collect()).unwrap_or_default();
        for id in ids {
            self.remove_participant(conf, id);
        }
        self.confs.remove(&conf);
        if self.confs.is_empty() {
            self.next_tick = None;
        }
    }

    /// Changes a participant's flags and, if given, its signalled remote (which drops
    /// what it had latched).
    pub(super) fn participant_update(
        &mut self,
        conf: u64,
        id: u32,
        remote: Option<Option<SocketAddr>>,
        mute: Option<bool>,
        deaf: Option<bool>,
    ) {
        if let Some(c) = self.confs.get_mut(&conf) {
            c.room.set_flags(id, mute, deaf);
            if let (Some(r), Some(p)) = (remote, c.parts.get_mut(&id)) {
                p.signalled = r;
                p.latch.reset();
                p.rtcp_latch.reset();
            }
        }
    }

    /// Answers a room query; `None` if the room is not on this worker.
    pub(super) fn conf_query(&self, conf: u64, reply: Sender<Option<ConfSnapshot>>) {
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

    /// On shutdown: removes every participant and room and stops the tick.
    pub(super) fn close_confs(&mut self) {
        let confs: Vec<(u64, Vec<u32>)> =
            self.confs.iter().map(|(k, c)| (*k, c.parts.keys().copied().collect())).collect();
        for (conf, ids) in confs {
            for id in ids {
                self.remove_participant(conf, id);
            }
        }
        self.confs.clear();
        self.next_tick = None;
    }

    /// A mixer send completed: count it and give its buffer back to the pool.
    pub(super) fn on_mix_send(&mut self, ud: u64, res: i32) {
        if res < 0 {
            self.local.drops[DropReason::SendError as usize] += 1;
        } else {
            self.local.tx_packets += 1;
            self.local.tx_bytes += res as u64;
        }
        self.mix.free.push(ud as u16);
    }

    pub(super) fn add_participant(&mut self, p: NewParticipant) {
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

    pub(super) fn move_participant(&mut self, conf: u64, id: u32, to: u64) {
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

    pub(super) fn detach_participant(&mut self, conf: u64, id: u32, reply: Sender<Box<DetachedParticipant>>) {
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

    pub(super) fn attach_participant(&mut self, conf: u64, p: DetachedParticipant) {
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

    pub(super) fn remove_participant(&mut self, conf: u64, id: u32) {
        let Some(c) = self.confs.get_mut(&conf) else { return };
        c.room.remove(id);
        let Some(p) = c.parts.remove(&id) else { return };
        self.closing_parts.insert((conf, id), 2);
        for idx in p.socks {
            self.stop_receiving(idx);
        }
    }

    pub(super) fn conf_packet(&mut self, now: Instant, conf: u64, pid: u32, rtcp: bool, src: SocketAddr, pkt: &[u8]) {
        let Some(c) = self.confs.get_mut(&conf) else { return };
        let Some(p) = c.parts.get_mut(&pid) else { return };
        let policy = LatchPolicy::default();
        let admit = Admit::for_signalled(p.signalled);
        if rtcp {
            let admit = Admit::for_rtcp(admit, p.latch.addr());
            if p.rtcp_latch.on_packet(&policy, None, admit, now, src, None) == LatchDecision::Reject {
                self.local.drops[DropReason::SourceMismatch as usize] += 1;
            }
            return;
        }
        let ssrc = crate::rtp::RtpHeader::parse(pkt).map(|h| h.ssrc);
        if p.latch.on_packet(&policy, p.signalled, admit, now, src, ssrc) == LatchDecision::Reject {
            self.local.drops[DropReason::SourceMismatch as usize] += 1;
            return;
        }
        if c.room.on_rtp(pid, pkt).is_err() {
            self.local.drops[DropReason::Malformed as usize] += 1;
        }
    }

    /// Runs every room's 20 ms tick and queues what it sends.
    pub(super) fn conf_tick(&mut self, now: Instant) {
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

    /// Called as a socket closes. A socket of a participant being detached is handed
    /// over instead of closed (returns true: the caller must leave it alone), and the
    /// participant goes out once both are; for a participant being removed, counts its
    /// sockets down and reports it released after the last.
    pub(super) fn conf_sock_closing(&mut self, idx: SockIdx) -> bool {
        let Some(Some(SockIo { role: Role::Conf { conf, pid, rtcp }, .. })) = self.socks.get(idx as usize) else {
            return false;
        };
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
                if let (Some(state), [Some(a), Some(b)]) = (d.state.take(), [d.sockets[0].take(), d.sockets[1].take()])
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
            return true;
        }
        if let Some(left) = self.closing_parts.get_mut(&key) {
            *left -= 1;
            if *left == 0 {
                self.closing_parts.remove(&key);
                self.emit(Event::ParticipantReleased { conf: key.0, id: key.1 }, true);
            }
        }
        false
    }
}
