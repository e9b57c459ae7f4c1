//! The relay's session table and per-packet decision, sans IO.
//!
//! [`Table::on_packet`] takes the socket a packet arrived on, its source, its bytes and
//! the time, and answers where to send it (or why not). It opens no socket and reads no
//! clock, so latching, statistics and timeouts are tested with a fake clock, and the
//! criterion bench measures exactly the per-packet work.

pub mod latch;
pub mod stats;

use crate::rtp::{rtcp_sender_ssrc, static_clock_rate, RtpHeader};
use latch::{Admit, Latch, LatchDecision, LatchPolicy};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use stats::{DropReason, RtpStats, StreamCounters};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Identifies a session between control plane and data plane.
pub type SessionId = u64;
/// Index of a socket in a worker's socket slab.
pub type SockIdx = u32;

/// RTP or RTCP: index 0 and 1 of a leg's streams.
pub const RTP: usize = 0;
/// See [`RTP`].
pub const RTCP: usize = 1;

/// What to create: everything about a session except its sockets.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Session id, chosen by the control plane.
    pub id: SessionId,
    /// Signalled remote address of each leg (its RTP address; RTCP is port + 1).
    pub remotes: [Option<SocketAddr>; 2],
    /// RTP clock rate of each leg, if known from signalling.
    pub clock_rates: [Option<u32>; 2],
    /// Latching policy.
    pub policy: LatchPolicy,
    /// Silence after which the session is deleted.
    pub inactivity: Duration,
}

/// The decision for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the packet out of socket `out` to `dst`.
    Forward {
        /// Socket to send from (the far leg's port).
        out: SockIdx,
        /// Destination.
        dst: SocketAddr,
    },
    /// Do not forward; already counted.
    Drop(DropReason),
}

/// Something the control plane should hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEvent {
    /// A stream latched (or re-latched) to a source address.
    Latched {
        /// Session.
        id: SessionId,
        /// Leg index (0 = A, 1 = B).
        leg: u8,
        /// RTCP rather than RTP.
        rtcp: bool,
        /// The address latched.
        addr: SocketAddr,
        /// A re-latch (moved from another address).
        relatch: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct SockOwner {
    session: u32,
    leg: u8,
    kind: u8,
}

#[derive(Debug, Default)]
struct Stream {
    sock: SockIdx,
    latch: Latch,
    counters: StreamCounters,
    rtp: RtpStats,
}

#[derive(Debug, Default)]
struct Leg {
    signalled: Option<SocketAddr>,
    /// Who may become the RTP source: from the signalled address, set with it.
    admit: Admit,
    clock_rate: Option<u32>,
    streams: [Stream; 2],
}

impl Leg {
    fn signalled_for(&self, kind: usize) -> Option<SocketAddr> {
        self.signalled.map(|a| if kind == RTCP { with_port_plus_one(a) } else { a })
    }

    /// Where packets for this leg go: the latched source, else the signalled address,
    /// else (RTCP only) the RTP source's port + 1.
    #[inline]
    fn destination(&self, kind: usize) -> Option<SocketAddr> {
        self.streams[kind]
            .latch
            .addr()
            .or_else(|| self.signalled_for(kind))
            .or_else(|| (kind == RTCP).then(|| self.streams[RTP].latch.addr().map(with_port_plus_one)).flatten())
    }
}

fn with_port_plus_one(mut a: SocketAddr) -> SocketAddr {
    a.set_port(a.port().wrapping_add(1));
    a
}

#[derive(Debug)]
struct Session {
    id: SessionId,
    legs: [Leg; 2],
    policy: LatchPolicy,
    inactivity: Duration,
    last_activity: Instant,
    closing: bool,
    open_socks: u8,
    dirty: bool,
    tap: Option<crate::tap::TapSpec>,
}

/// A worker's sessions and the sockets that belong to them.
#[derive(Debug)]
pub struct Table {
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<u32>,
    socks: Vec<Option<SockOwner>>,
    free_socks: Vec<SockIdx>,
    by_id: HashMap<SessionId, u32>,
    epoch: Instant,
    events: Vec<TableEvent>,
    tapped: usize,
}

impl Table {
    /// An empty table; `epoch` anchors jitter arithmetic and may be any fixed instant.
    pub fn new(epoch: Instant) -> Self {
        Self {
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            socks: Vec::new(),
            free_socks: Vec::new(),
            by_id: HashMap::new(),
            epoch,
            events: Vec::with_capacity(1024),
            tapped: 0,
        }
    }

    /// Number of live sessions (including ones being closed).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Ids of every session.
    pub fn ids(&self) -> Vec<SessionId> {
        self.by_id.keys().copied().collect()
    }

    /// True when no session exists.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds a session; returns its socket indices as `[leg][RTP|RTCP]`, or `None` if the
    /// id exists already.
    pub fn insert(&mut self, spec: &SessionSpec, now: Instant) -> Option<[[SockIdx; 2]; 2]> {
        if self.by_id.contains_key(&spec.id) {
            return None;
        }
        let slot = match self.free_sessions.pop() {
            Some(s) => s,
            None => {
                self.sessions.push(None);
                (self.sessions.len() - 1) as u32
            }
        };
        let mut idx = [[0; 2]; 2];
        let mut legs: [Leg; 2] = Default::default();
        for (l, leg) in legs.iter_mut().enumerate() {
            leg.signalled = spec.remotes[l];
            leg.admit = Admit::for_signalled(spec.remotes[l]);
            leg.clock_rate = spec.clock_rates[l];
            for (k, stream) in leg.streams.iter_mut().enumerate() {
                let owner = SockOwner { session: slot, leg: l as u8, kind: k as u8 };
                let s = match self.free_socks.pop() {
                    Some(s) => {
                        self.socks[s as usize] = Some(owner);
                        s
                    }
                    None => {
                        self.socks.push(Some(owner));
                        (self.socks.len() - 1) as SockIdx
                    }
                };
                stream.sock = s;
                idx[l][k] = s;
            }
        }
        self.sessions[slot as usize] = Some(Session {
            id: spec.id,
            legs,
            policy: spec.policy,
            inactivity: spec.inactivity,
            last_activity: now,
            closing: false,
            open_socks: 4,
            dirty: false,
            tap: None,
        });
        self.by_id.insert(spec.id, slot);
        Some(idx)
    }

    /// Sets (or clears) a leg's signalled remote address. A new address resets the
    /// leg's latches so the next packet (from the admitted host) latches afresh: a
    /// re-signalled remote means the media moved. Clearing it (a hold) keeps the latches
    /// and who may take over: a call on hold is not open to the first stranger.
    pub fn set_remote(&mut self, id: SessionId, leg: usize, remote: Option<SocketAddr>) -> bool {
        let Some(s) = self.session_mut(id) else {
            return false;
        };
        let Some(l) = s.legs.get_mut(leg) else {
            return false;
        };
        l.signalled = remote;
        if remote.is_some() {
            l.admit = Admit::for_signalled(remote);
            for st in &mut l.streams {
                st.latch.reset();
            }
        }
        s.dirty = true;
        true
    }

    /// Starts or stops intercepting a session; false if it does not exist.
    pub fn set_tap(&mut self, id: SessionId, tap: Option<crate::tap::TapSpec>) -> bool {
        let Some(s) = self.session_mut(id) else { return false };
        let was = s.tap.is_some();
        s.tap = tap;
        match (was, tap.is_some()) {
            (false, true) => self.tapped += 1,
            (true, false) => self.tapped -= 1,
            _ => {}
        }
        true
    }

    /// Number of tapped sessions: the worker looks for taps only when this is non-zero.
    #[inline]
    pub fn tapped(&self) -> usize {
        self.tapped
    }

    /// The tap of the session owning `sock`, with the socket's leg and whether it is RTCP.
    #[inline]
    pub fn tap_of(&self, sock: SockIdx) -> Option<(crate::tap::TapSpec, u8, bool)> {
        let owner = (*self.socks.get(sock as usize)?)?;
        let s = self.sessions.get(owner.session as usize)?.as_ref()?;
        s.tap.map(|t| (t, owner.leg, owner.kind as usize == RTCP))
    }

    /// Marks a session as closing and returns its sockets, which the caller must release
    /// with [`Table::release_sock`] once the ring has let go of them.
    pub fn begin_remove(&mut self, id: SessionId) -> Option<[[SockIdx; 2]; 2]> {
        let s = self.session_mut(id)?;
        if s.closing {
            return None;
        }
        s.closing = true;
        Some([
            [s.legs[0].streams[RTP].sock, s.legs[0].streams[RTCP].sock],
            [s.legs[1].streams[RTP].sock, s.legs[1].streams[RTCP].sock],
        ])
    }

    /// Reserves a socket slot for a socket that is not a relay session's (a conference
    /// participant's); [`Table::on_packet`] ignores it and [`Table::release_sock`] frees it.
    pub fn alloc_external(&mut self) -> SockIdx {
        let owner = SockOwner { session: u32::MAX, leg: 0, kind: 0 };
        match self.free_socks.pop() {
            Some(s) => {
                self.socks[s as usize] = Some(owner);
                s
            }
            None => {
                self.socks.push(Some(owner));
                (self.socks.len() - 1) as SockIdx
            }
        }
    }

    /// Frees a socket slot; when it was its session's last, frees the session and returns
    /// its id.
    pub fn release_sock(&mut self, sock: SockIdx) -> Option<SessionId> {
        let owner = self.socks.get_mut(sock as usize)?.take()?;
        self.free_socks.push(sock);
        let s = self.sessions.get_mut(owner.session as usize)?.as_mut()?;
        s.open_socks -= 1;
        if s.open_socks > 0 {
            return None;
        }
        let id = s.id;
        if s.tap.is_some() {
            self.tapped -= 1;
        }
        self.sessions[owner.session as usize] = None;
        self.free_sessions.push(owner.session);
        self.by_id.remove(&id);
        Some(id)
    }

    /// The per-packet decision. Counts the packet and any drop on the receiving stream.
    #[inline]
    pub fn on_packet(&mut self, now: Instant, sock: SockIdx, src: SocketAddr, pkt: &[u8]) -> Verdict {
        let Some(Some(owner)) = self.socks.get(sock as usize).copied() else {
            return Verdict::Drop(DropReason::Closing);
        };
        let Some(s) = self.sessions.get_mut(owner.session as usize).and_then(Option::as_mut) else {
            return Verdict::Drop(DropReason::Closing);
        };
        let (l, k) = (owner.leg as usize, owner.kind as usize);
        let (leg, far) = if l == 0 {
            let [a, b] = &mut s.legs;
            (a, &*b)
        } else {
            let [a, b] = &mut s.legs;
            (b, &*a)
        };
        let signalled = leg.signalled_for(k);
        // RTCP follows its RTP stream's latch (a few compares, no lookup).
        let admit = if k == RTP { leg.admit } else { Admit::for_rtcp(leg.admit, leg.streams[RTP].latch.addr()) };
        let clock_rate = leg.clock_rate;
        let stream = &mut leg.streams[k];
        stream.counters.packets += 1;
        stream.counters.bytes += pkt.len() as u64;
        s.dirty = true;
        if s.closing {
            return drop(stream, DropReason::Closing);
        }
        let (ssrc, rtp) = if k == RTP {
            match RtpHeader::parse(pkt) {
                Some(h) => (h.ssrc, Some(h)),
                None => return drop(stream, DropReason::Malformed),
            }
        } else {
            match rtcp_sender_ssrc(pkt) {
                Some(ssrc) => (ssrc, None),
                None => return drop(stream, DropReason::Malformed),
            }
        };
        match stream.latch.on_packet(&s.policy, signalled, admit, now, src, Some(ssrc)) {
            LatchDecision::Accept => {}
            LatchDecision::Reject => return drop(stream, DropReason::SourceMismatch),
            d @ (LatchDecision::Latched | LatchDecision::Relatched) => self.events.push(TableEvent::Latched {
                id: s.id,
                leg: l as u8,
                rtcp: k == RTCP,
                addr: src,
                relatch: d == LatchDecision::Relatched,
            }),
        }
        if let Some(h) = rtp {
            let rate = clock_rate.or_else(|| static_clock_rate(h.payload_type)).unwrap_or(8000);
            stream.rtp.on_packet(now, self.epoch, rate, h.sequence, h.timestamp, h.ssrc);
        }
        s.last_activity = now;
        match far.destination(k) {
            Some(dst) => {
                stream.counters.forwarded += 1;
                Verdict::Forward { out: far.streams[k].sock, dst }
            }
            None => drop(stream, DropReason::NoDestination),
        }
    }

    /// Counts a send the kernel refused against the stream that received the packet.
    pub fn on_send_error(&mut self, out: SockIdx) {
        // The failed send went out of `out`, which belongs to the far leg; the packet came
        // from the near leg's stream of the same kind.
        let Some(Some(owner)) = self.socks.get(out as usize).copied() else {
            return;
        };
        if let Some(s) = self.sessions.get_mut(owner.session as usize).and_then(Option::as_mut) {
            let st = &mut s.legs[1 - owner.leg as usize].streams[owner.kind as usize];
            st.counters.forwarded = st.counters.forwarded.saturating_sub(1);
            st.counters.drops[DropReason::SendError as usize] += 1;
        }
    }

    /// Appends to `out` the sessions silent for longer than their inactivity timeout.
    pub fn expired(&self, now: Instant, out: &mut Vec<SessionId>) {
        for s in self.sessions.iter().flatten() {
            if !s.closing && now.saturating_duration_since(s.last_activity) >= s.inactivity {
                out.push(s.id);
            }
        }
    }

    /// Takes the events produced since the last call.
    pub fn drain_events(&mut self, out: &mut Vec<TableEvent>) {
        out.append(&mut self.events);
    }

    /// A snapshot of one session's state and statistics.
    pub fn snapshot(&self, id: SessionId, now: Instant) -> Option<SessionSnapshot> {
        let slot = *self.by_id.get(&id)?;
        let s = self.sessions[slot as usize].as_ref()?;
        Some(Self::snap(s, now))
    }

    /// Snapshots of every session whose counters changed since the last call.
    pub fn drain_dirty(&mut self, now: Instant, out: &mut Vec<SessionSnapshot>) {
        for s in self.sessions.iter_mut().flatten() {
            if s.dirty && !s.closing {
                s.dirty = false;
                out.push(Self::snap(s, now));
            }
        }
    }

    fn session_mut(&mut self, id: SessionId) -> Option<&mut Session> {
        let slot = *self.by_id.get(&id)?;
        self.sessions[slot as usize].as_mut()
    }

    fn snap(s: &Session, now: Instant) -> SessionSnapshot {
        let leg = |l: &Leg| {
            let stream = |st: &Stream, rate: u32| StreamSnapshot {
                latched: st.latch.addr(),
                packets: st.counters.packets,
                bytes: st.counters.bytes,
                forwarded: st.counters.forwarded,
                drops: DropCounts(st.counters.drops),
                ssrc: st.rtp.ssrc(),
                expected: st.rtp.expected(),
                lost: st.rtp.lost(),
                reordered: st.rtp.reordered(),
                duplicates: st.rtp.duplicates(),
                jitter: st.rtp.jitter(),
                jitter_ms: st.rtp.jitter() as f64 * 1000.0 / rate as f64,
            };
            let rate = l.clock_rate.unwrap_or(8000);
            LegSnapshot {
                signalled: l.signalled,
                rtp: stream(&l.streams[RTP], rate),
                rtcp: stream(&l.streams[RTCP], rate),
            }
        };
        SessionSnapshot {
            id: s.id,
            legs: [leg(&s.legs[0]), leg(&s.legs[1])],
            idle_ms: now.saturating_duration_since(s.last_activity).as_millis() as u64,
        }
    }
}

fn drop(stream: &mut Stream, reason: DropReason) -> Verdict {
    stream.counters.drops[reason as usize] += 1;
    Verdict::Drop(reason)
}

/// Drop counters by reason; serialises as `{"malformed": n, ...}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts(pub [u64; DropReason::COUNT]);

impl DropCounts {
    /// Count for one reason.
    pub fn get(&self, r: DropReason) -> u64 {
        self.0[r as usize]
    }
}

impl Serialize for DropCounts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(DropReason::COUNT))?;
        for r in DropReason::ALL {
            m.serialize_entry(r.as_str(), &self.0[r as usize])?;
        }
        m.end()
    }
}

/// State and statistics of one stream (one port) of a leg, as received by the relay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamSnapshot {
    /// The latched source address.
    pub latched: Option<SocketAddr>,
    /// Packets received.
    pub packets: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Packets forwarded to the far leg.
    pub forwarded: u64,
    /// Drops by reason.
    pub drops: DropCounts,
    /// Current SSRC (RTP only).
    pub ssrc: Option<u32>,
    /// Packets expected from the sequence numbers seen (RTP only).
    pub expected: u64,
    /// Packets lost: expected minus received (RTP only).
    pub lost: u64,
    /// Packets that arrived out of order (RTP only).
    pub reordered: u64,
    /// Duplicated packets (RTP only).
    pub duplicates: u64,
    /// Interarrival jitter, RTP timestamp units (RFC 3550 A.8).
    pub jitter: u32,
    /// Interarrival jitter in milliseconds.
    pub jitter_ms: f64,
}

/// One leg of a session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LegSnapshot {
    /// The address the control plane signalled, if any.
    pub signalled: Option<SocketAddr>,
    /// The RTP stream.
    pub rtp: StreamSnapshot,
    /// The RTCP stream.
    pub rtcp: StreamSnapshot,
}

/// A session's state and statistics at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionSnapshot {
    /// Session id.
    pub id: SessionId,
    /// Legs A and B.
    pub legs: [LegSnapshot; 2],
    /// Milliseconds since the last accepted packet (or creation).
    pub idle_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn rtp(seq: u16) -> [u8; 172] {
        let mut p = [0u8; 172];
        RtpHeader { payload_type: 0, marker: false, sequence: seq, timestamp: seq as u32 * 160, ssrc: 9 }
            .write_to(&mut p);
        p
    }

    fn spec(id: SessionId) -> SessionSpec {
        SessionSpec {
            id,
            remotes: [None, None],
            clock_rates: [None, None],
            policy: LatchPolicy::default(),
            inactivity: Duration::from_secs(60),
        }
    }

    #[test]
    fn forwards_after_both_legs_latch() {
        let t = Instant::now();
        let mut tb = Table::new(t);
        let s = tb.insert(&spec(1), t).unwrap();
        // A speaks first: B's address is unknown, so it is dropped (and A latches).
        assert_eq!(tb.on_packet(t, s[0][RTP], a(5000), &rtp(1)), Verdict::Drop(DropReason::NoDestination));
        // B speaks: goes to A's latched address out of A's socket.
        assert_eq!(tb.on_packet(t, s[1][RTP], a(6000), &rtp(1)), Verdict::Forward { out: s[0][RTP], dst: a(5000) });
        assert_eq!(tb.on_packet(t, s[0][RTP], a(5000), &rtp(2)), Verdict::Forward { out: s[1][RTP], dst: a(6000) });
        // RTCP before any RTCP latch goes to the RTP source's port + 1.
        let rtcp = [0x80, 200, 0, 1, 0, 0, 0, 9];
        assert_eq!(tb.on_packet(t, s[0][RTCP], a(5001), &rtcp), Verdict::Forward { out: s[1][RTCP], dst: a(6001) });
        let mut ev = Vec::new();
        tb.drain_events(&mut ev);
        assert_eq!(ev.len(), 3);
    }

    #[test]
    fn signalled_remote_is_used_until_latch() {
        let t = Instant::now();
        let mut tb = Table::new(t);
        let mut sp = spec(1);
        sp.remotes[1] = Some(a(7000));
        let s = tb.insert(&sp, t).unwrap();
        assert_eq!(tb.on_packet(t, s[0][RTP], a(5000), &rtp(1)), Verdict::Forward { out: s[1][RTP], dst: a(7000) });
        // B's real (NATed) source differs from its SDP: it latches, and A's packets follow.
        tb.on_packet(t, s[1][RTP], a(7777), &rtp(1));
        assert_eq!(tb.on_packet(t, s[0][RTP], a(5000), &rtp(2)), Verdict::Forward { out: s[1][RTP], dst: a(7777) });
    }

    #[test]
    fn hijack_and_garbage_are_counted() {
        let t = Instant::now();
        let mut tb = Table::new(t);
        let s = tb.insert(&spec(1), t).unwrap();
        tb.on_packet(t, s[0][RTP], a(5000), &rtp(1));
        assert_eq!(tb.on_packet(t, s[0][RTP], a(6666), &rtp(2)), Verdict::Drop(DropReason::SourceMismatch));
        assert_eq!(tb.on_packet(t, s[0][RTP], a(5000), &[1, 2, 3]), Verdict::Drop(DropReason::Malformed));
        let snap = tb.snapshot(1, t).unwrap();
        assert_eq!(snap.legs[0].rtp.packets, 3);
        assert_eq!(snap.legs[0].rtp.drops.get(DropReason::SourceMismatch), 1);
        assert_eq!(snap.legs[0].rtp.drops.get(DropReason::Malformed), 1);
        assert_eq!(snap.legs[0].rtp.latched, Some(a(5000)));
    }

    #[test]
    fn inactivity_expires_and_release_frees_slots() {
        let t = Instant::now();
        let mut tb = Table::new(t);
        let s = tb.insert(&spec(1), t).unwrap();
        let mut out = Vec::new();
        tb.expired(t + Duration::from_secs(59), &mut out);
        assert!(out.is_empty());
        tb.expired(t + Duration::from_secs(60), &mut out);
        assert_eq!(out, vec![1]);
        let socks = tb.begin_remove(1).unwrap();
        assert_eq!(socks, s);
        assert_eq!(tb.on_packet(t, s[0][RTP], a(5000), &rtp(1)), Verdict::Drop(DropReason::Closing));
        let freed: Vec<_> = socks.iter().flatten().filter_map(|&k| tb.release_sock(k)).collect();
        assert_eq!(freed, vec![1]);
        assert!(tb.is_empty());
        // Slots are reused: no growth over many create/delete cycles.
        for id in 2..1000 {
            let s = tb.insert(&spec(id), t).unwrap();
            tb.begin_remove(id).unwrap();
            for k in s.iter().flatten() {
                tb.release_sock(*k);
            }
        }
        assert_eq!(tb.socks.len(), 4);
        assert_eq!(tb.sessions.len(), 1);
    }

    #[test]
    fn rtcp_follows_the_rtp_latch_and_a_hold_keeps_latches() {
        let t = Instant::now();
        let mut tb = Table::new(t);
        let s = tb.insert(&spec(1), t).unwrap();
        let rtcp = [0x80, 200, 0, 1, 0, 0, 0, 9];
        let (phone, thief) = (SocketAddr::from(([127, 0, 0, 2], 5000)), SocketAddr::from(([127, 0, 0, 3], 5001)));
        // Nothing signalled, RTP not latched: no RTCP source is trusted yet.
        assert_eq!(tb.on_packet(t, s[0][RTCP], thief, &rtcp), Verdict::Drop(DropReason::SourceMismatch));
        tb.on_packet(t, s[0][RTP], phone, &rtp(1));
        assert_eq!(tb.on_packet(t, s[0][RTCP], thief, &rtcp), Verdict::Drop(DropReason::SourceMismatch));
        tb.on_packet(t, s[1][RTP], a(6000), &rtp(1));
        let phone_rtcp = SocketAddr::from(([127, 0, 0, 2], 5001));
        assert_eq!(tb.on_packet(t, s[0][RTCP], phone_rtcp, &rtcp), Verdict::Forward { out: s[1][RTCP], dst: a(6001) });
        // A hold (remote cleared) keeps the latch: after any silence, the thief is refused.
        assert!(tb.set_remote(1, 0, None));
        let later = t + Duration::from_secs(30);
        assert_eq!(tb.on_packet(later, s[0][RTP], thief, &rtp(2)), Verdict::Drop(DropReason::SourceMismatch));
        assert_eq!(tb.on_packet(later, s[1][RTP], a(6000), &rtp(2)), Verdict::Forward { out: s[0][RTP], dst: phone });
    }

    #[test]
    fn set_remote_resets_latch() {
        let t = Instant::now();
        let mut tb = Table::new(t);
        let s = tb.insert(&spec(1), t).unwrap();
        tb.on_packet(t, s[1][RTP], a(6000), &rtp(1));
        assert!(tb.set_remote(1, 1, Some(a(8000))));
        assert_eq!(tb.on_packet(t, s[0][RTP], a(5000), &rtp(1)), Verdict::Forward { out: s[1][RTP], dst: a(8000) });
        assert!(!tb.set_remote(1, 2, None));
        assert!(!tb.set_remote(99, 0, None));
    }
}
