//! Relaying: a received datagram goes through `Table::on_packet` and, if forwarded, out
//! again from the same buffer; relay sockets come and go with their sessions.
//!
//! This is the per-packet path, so it copies nothing: the decision is made on the
//! buffer the kernel filled, and the send points into that buffer, which returns to the
//! ring only when the send completes. Lawful-intercept copies are taken here too, at the
//! one point where a packet is known to be forwarded; that is a single cold function, too
//! small for a module of its own. Sockets of conference participants share the slab and
//! the close path but are otherwise handled in `conference.rs`.

use super::ring::{send_ud, Mode, OP_CANCEL};
use super::{Role, SockIo, Worker};
use crate::command::{Event, NewSession};
use crate::io::addr::read_sockaddr;
use crate::io::bufs::Target;
use crate::relay::stats::DropReason;
use crate::relay::{SockIdx, Verdict};
use crate::tap::{TapRecord, TAP_MAX};
use io_uring::types::RecvMsgOut;
use io_uring::{cqueue, opcode};
use std::os::fd::AsRawFd;
use std::time::Instant;

impl Worker {
    /// A receive completed: handle the packet it carries, then, once the receive has
    /// ended, re-arm it or (the socket closing) queue the close.
    #[inline]
    pub(super) fn on_recv(&mut self, now: Instant, ud: u64, res: i32, flags: u32) {
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

    /// A relayed send completed: count it and give its buffer back.
    #[inline]
    pub(super) fn on_send(&mut self, ud: u64, res: i32) {
        let bid = ud as u16;
        let out = ((ud >> 16) & 0xff_ffff) as SockIdx;
        if res < 0 {
            self.local.drops[DropReason::SendError as usize] += 1;
            self.table.on_send_error(out);
        } else {
            self.local.tx_packets += 1;
            self.local.tx_bytes += res as u64;
        }
        self.recycle(bid);
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

    pub(super) fn add(&mut self, new: NewSession, now: Instant) {
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

    pub(super) fn remove(&mut self, id: u64) {
        let Some(socks) = self.table.begin_remove(id) else {
            return;
        };
        for idx in socks.into_iter().flatten() {
            self.stop_receiving(idx);
        }
    }

    /// Marks a socket closing and stops its receive: cancels the one in flight (the
    /// socket is closed on its final completion) or, with none in flight, queues the
    /// close for after the next submit.
    pub(super) fn stop_receiving(&mut self, idx: SockIdx) {
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

    /// Closes a socket whose receive has ended. The last of a session's sockets releases
    /// the session: only then may the control plane hand its ports out again.
    pub(super) fn close_sock(&mut self, idx: SockIdx) {
        if self.conf_sock_closing(idx) {
            // Handed over to another worker (see conf_sock_closing), not closed.
            return;
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
}
