//! NAT latching (symmetric RTP) as a sans-IO state machine.
//!
//! A leg's remote address is learned from the first packet that arrives on its port,
//! because a NATed phone's media comes from an address its SDP does not know. But only
//! a NATed phone's: when the signalled address is a public one, the first packet must
//! come from that IP ([`Admit`]), so a third party who learns the relay's port cannot
//! race the phone for the latch. Once latched, another source may take over only under
//! the configured policy, and only from the latched IP (a NAT rebinding moves the port,
//! not the host) or the signalled one: silence alone (a call on hold) never hands the
//! stream to a stranger ("RTP bleed"). RTCP follows its RTP stream: it is accepted only
//! from the IP the RTP stream latched to (or the signalled one).

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How strictly a leg holds on to the address it latched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LatchMode {
    /// Learn the first source; let another take over only as [`LatchPolicy`] allows.
    #[default]
    Learn,
    /// `strict-source`: accept only the signalled address if one was given, else the
    /// first source; every other source is dropped, forever.
    Strict,
    /// `asymmetric`: never learn; accept from anyone and send to the signalled address
    /// (for endpoints that send from a different port than they receive on).
    Asymmetric,
}

/// Latching policy, set per relay and overridable per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatchPolicy {
    /// Learn or strict.
    pub mode: LatchMode,
    /// In `learn` mode, a new source may re-latch once the latched source has been
    /// silent this long (a phone that changed network). `None` never re-latches on idle.
    #[serde(with = "opt_millis", rename = "relatch_idle_ms")]
    pub relatch_idle: Option<Duration>,
    /// In `learn` mode, a new source that sends a different SSRC may re-latch at once.
    /// Off by default: an attacker can pick any SSRC.
    pub relatch_on_ssrc_change: bool,
}

impl Default for LatchPolicy {
    fn default() -> Self {
        Self { mode: LatchMode::Learn, relatch_idle: Some(Duration::from_millis(2000)), relatch_on_ssrc_change: false }
    }
}

mod opt_millis {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.map(|d| d.as_millis() as u64).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Which sources may become a stream's latched source (first latch or re-latch),
/// besides the source latched now. Computed by the control of the leg when its
/// signalled address changes, not per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admit {
    /// Any source: nothing was signalled, or a private address (the endpoint is behind
    /// NAT, so its packets come from an address the SDP cannot know).
    #[default]
    Any,
    /// Only this IP, from any port: the signalled public IP, or for RTCP the IP its RTP
    /// stream latched to.
    Ip(IpAddr),
    /// Nobody yet: RTCP whose RTP stream has not latched, with no trusted address.
    Nobody,
}

impl Admit {
    /// The admission of an RTP stream whose signalled address is `signalled`.
    pub fn for_signalled(signalled: Option<SocketAddr>) -> Self {
        match signalled {
            Some(a) if !is_behind_nat(a.ip()) => Self::Ip(a.ip().to_canonical()),
            _ => Self::Any,
        }
    }

    /// The admission of an RTCP stream: its RTP stream's latched IP, else what the RTP
    /// stream admits, except that "anyone" waits for the RTP stream to latch.
    #[inline]
    pub fn for_rtcp(rtp: Self, rtp_latched: Option<SocketAddr>) -> Self {
        match (rtp_latched, rtp) {
            (Some(a), _) => Self::Ip(a.ip().to_canonical()),
            (None, Self::Any) => Self::Nobody,
            (None, other) => other,
        }
    }

    #[inline]
    fn allows(self, ip: IpAddr) -> bool {
        match self {
            Self::Any => true,
            Self::Ip(a) => a == ip.to_canonical(),
            Self::Nobody => false,
        }
    }
}

/// True for an address a NAT hides: private (RFC 1918), shared (RFC 6598), link-local,
/// unique local (RFC 4193), or unspecified. Loopback is not: it is this very host.
pub fn is_behind_nat(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private() || a.is_link_local() || a.is_unspecified() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let s = a.segments()[0];
            a.is_unspecified() || (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
        }
    }
}

/// What the latch decided about one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatchDecision {
    /// From the latched address: accept.
    Accept,
    /// First packet: accept and latch to its source.
    Latched,
    /// A new source took over under the policy: accept, latch moves.
    Relatched,
    /// From some other source: drop.
    Reject,
}

/// One stream's latch: the learned remote address and when it was last heard.
#[derive(Debug, Clone, Default)]
pub struct Latch {
    addr: Option<SocketAddr>,
    last_seen: Option<Instant>,
    ssrc: Option<u32>,
}

impl Latch {
    /// The latched address, if any packet has been accepted.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// A latch already holding `addr` (a participant moved from another worker).
    pub fn latched_to(addr: Option<SocketAddr>) -> Self {
        Self { addr, last_seen: None, ssrc: None }
    }

    /// Forgets the latched address (the remote was re-signalled).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Decides about a packet from `src` carrying `ssrc` (if it parsed as RTP/RTCP), given
    /// the address the control plane signalled for this stream, if any, and who may
    /// become its source.
    #[inline]
    pub fn on_packet(
        &mut self,
        policy: &LatchPolicy,
        signalled: Option<SocketAddr>,
        admit: Admit,
        now: Instant,
        src: SocketAddr,
        ssrc: Option<u32>,
    ) -> LatchDecision {
        if policy.mode == LatchMode::Asymmetric {
            self.last_seen = Some(now);
            return LatchDecision::Accept;
        }
        let decision = match self.addr {
            Some(a) if a == src => LatchDecision::Accept,
            None => match (policy.mode, signalled) {
                (LatchMode::Strict, Some(s)) if s != src => LatchDecision::Reject,
                _ if !admit.allows(src.ip()) => LatchDecision::Reject,
                _ => LatchDecision::Latched,
            },
            Some(a) => match policy.mode {
                LatchMode::Strict | LatchMode::Asymmetric => LatchDecision::Reject,
                LatchMode::Learn => {
                    let idle = match (policy.relatch_idle, self.last_seen) {
                        (Some(limit), Some(seen)) => now.saturating_duration_since(seen) >= limit,
                        _ => false,
                    };
                    let new_ssrc =
                        policy.relatch_on_ssrc_change && matches!((ssrc, self.ssrc), (Some(a), Some(b)) if a != b);
                    // The same host on a new port (a NAT rebinding), or the signalled
                    // host; never a stranger, however long the stream was silent.
                    let known = a.ip().to_canonical() == src.ip().to_canonical()
                        || matches!(admit, Admit::Ip(ip) if ip == src.ip().to_canonical());
                    if (idle || new_ssrc) && known {
                        LatchDecision::Relatched
                    } else {
                        LatchDecision::Reject
                    }
                }
            },
        };
        if decision != LatchDecision::Reject {
            self.addr = Some(src);
            self.last_seen = Some(now);
            if ssrc.is_some() {
                self.ssrc = ssrc;
            }
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn host(h: u8, p: u16) -> SocketAddr {
        SocketAddr::from(([203, 0, 113, h], p))
    }

    #[test]
    fn a_public_signalled_ip_admits_only_itself() {
        let p = LatchPolicy::default();
        let t0 = Instant::now();
        let sig = Some(host(1, 4000));
        let admit = Admit::for_signalled(sig);
        assert_eq!(admit, Admit::Ip(host(1, 0).ip()));
        let mut l = Latch::default();
        // A stranger racing the phone for the first packet loses.
        assert_eq!(l.on_packet(&p, sig, admit, t0, host(9, 4000), Some(1)), LatchDecision::Reject);
        assert_eq!(l.addr(), None);
        // The phone's host, from another port than signalled, latches.
        assert_eq!(l.on_packet(&p, sig, admit, t0, host(1, 4444), Some(1)), LatchDecision::Latched);
    }

    #[test]
    fn a_private_signalled_ip_admits_the_first_source() {
        for private in ["10.1.2.3", "172.16.0.9", "192.168.1.20", "100.64.0.1", "169.254.0.1", "fd00::1", "fe80::1"] {
            let ip: IpAddr = private.parse().unwrap();
            assert!(is_behind_nat(ip), "{private}");
            assert_eq!(Admit::for_signalled(Some(SocketAddr::new(ip, 4000))), Admit::Any);
        }
        for public in ["203.0.113.1", "127.0.0.1", "2001:db8::1", "100.128.0.1", "::ffff:198.51.100.1"] {
            assert!(!is_behind_nat(public.parse().unwrap()), "{public}");
        }
        let p = LatchPolicy::default();
        let sig = Some(SocketAddr::from(([192, 168, 1, 20], 4000)));
        let mut l = Latch::default();
        let nat = host(7, 33333);
        assert_eq!(l.on_packet(&p, sig, Admit::for_signalled(sig), Instant::now(), nat, None), LatchDecision::Latched);
    }

    #[test]
    fn silence_lets_only_the_same_or_the_signalled_host_relatch() {
        let p = LatchPolicy::default();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(10);
        // Behind NAT (anyone could latch first), latched to host 1; then on hold.
        let mut l = Latch::default();
        l.on_packet(&p, None, Admit::Any, t0, host(1, 5000), Some(1));
        assert_eq!(l.on_packet(&p, None, Admit::Any, later, host(2, 5000), Some(1)), LatchDecision::Reject);
        assert_eq!(l.on_packet(&p, None, Admit::Any, later, host(1, 5002), Some(1)), LatchDecision::Relatched);
        // A signalled host may take over from whoever latched.
        let mut l = Latch::default();
        l.on_packet(&p, None, Admit::Any, t0, host(1, 5000), Some(1));
        let admit = Admit::Ip(host(3, 0).ip());
        assert_eq!(l.on_packet(&p, None, admit, later, host(3, 6000), Some(1)), LatchDecision::Relatched);
    }

    #[test]
    fn rtcp_follows_its_rtp_stream() {
        let p = LatchPolicy::default();
        let t0 = Instant::now();
        // Nothing trusted and RTP not latched: no RTCP source yet.
        let admit = Admit::for_rtcp(Admit::Any, None);
        assert_eq!(admit, Admit::Nobody);
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, None, admit, t0, host(9, 5001), None), LatchDecision::Reject);
        // RTP latched to host 1: only host 1's RTCP.
        let admit = Admit::for_rtcp(Admit::Any, Some(host(1, 5000)));
        assert_eq!(l.on_packet(&p, None, admit, t0, host(9, 5001), None), LatchDecision::Reject);
        assert_eq!(l.on_packet(&p, None, admit, t0, host(1, 5001), None), LatchDecision::Latched);
        // A signalled public IP admits its RTCP before RTP latched.
        assert_eq!(Admit::for_rtcp(Admit::Ip(host(4, 0).ip()), None), Admit::Ip(host(4, 0).ip()));
    }

    #[test]
    fn latches_first_source_and_rejects_hijack() {
        let p = LatchPolicy::default();
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, Some(addr(1000)), Admit::Any, t0, addr(2000), Some(1)), LatchDecision::Latched);
        assert_eq!(l.addr(), Some(addr(2000)));
        assert_eq!(l.on_packet(&p, None, Admit::Any, t0, addr(2000), Some(1)), LatchDecision::Accept);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.on_packet(&p, None, Admit::Any, t1, addr(3000), Some(1)), LatchDecision::Reject);
        assert_eq!(l.addr(), Some(addr(2000)));
    }

    #[test]
    fn relatches_only_after_idle() {
        let p = LatchPolicy::default();
        let t0 = Instant::now();
        let mut l = Latch::default();
        l.on_packet(&p, None, Admit::Any, t0, addr(2000), Some(1));
        let t1 = t0 + Duration::from_millis(1999);
        assert_eq!(l.on_packet(&p, None, Admit::Any, t1, addr(3000), Some(1)), LatchDecision::Reject);
        // The rejected packet did not refresh the latched source's last-seen time.
        let t2 = t0 + Duration::from_millis(2000);
        assert_eq!(l.on_packet(&p, None, Admit::Any, t2, addr(3000), Some(1)), LatchDecision::Relatched);
        assert_eq!(l.addr(), Some(addr(3000)));
    }

    #[test]
    fn ssrc_change_relatches_only_when_enabled() {
        let t0 = Instant::now();
        let mut p = LatchPolicy { relatch_idle: None, ..LatchPolicy::default() };
        let mut l = Latch::default();
        l.on_packet(&p, None, Admit::Any, t0, addr(2000), Some(1));
        assert_eq!(l.on_packet(&p, None, Admit::Any, t0, addr(3000), Some(2)), LatchDecision::Reject);
        p.relatch_on_ssrc_change = true;
        assert_eq!(l.on_packet(&p, None, Admit::Any, t0, addr(3000), Some(1)), LatchDecision::Reject);
        assert_eq!(l.on_packet(&p, None, Admit::Any, t0, addr(3000), Some(2)), LatchDecision::Relatched);
    }

    #[test]
    fn strict_accepts_only_signalled_source() {
        let p = LatchPolicy { mode: LatchMode::Strict, ..LatchPolicy::default() };
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, Some(addr(1000)), Admit::Any, t0, addr(2000), None), LatchDecision::Reject);
        assert_eq!(l.on_packet(&p, Some(addr(1000)), Admit::Any, t0, addr(1000), None), LatchDecision::Latched);
        let late = t0 + Duration::from_secs(3600);
        assert_eq!(l.on_packet(&p, Some(addr(1000)), Admit::Any, late, addr(2000), None), LatchDecision::Reject);
    }

    #[test]
    fn asymmetric_never_latches() {
        let p = LatchPolicy { mode: LatchMode::Asymmetric, ..LatchPolicy::default() };
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, Some(addr(1000)), Admit::Any, t0, addr(2000), None), LatchDecision::Accept);
        assert_eq!(l.on_packet(&p, Some(addr(1000)), Admit::Any, t0, addr(3000), None), LatchDecision::Accept);
        assert_eq!(l.addr(), None);
    }

    #[test]
    fn strict_without_signalled_locks_first_source() {
        let p = LatchPolicy { mode: LatchMode::Strict, ..LatchPolicy::default() };
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, None, Admit::Any, t0, addr(2000), None), LatchDecision::Latched);
        let late = t0 + Duration::from_secs(3600);
        assert_eq!(l.on_packet(&p, None, Admit::Any, late, addr(3000), None), LatchDecision::Reject);
    }
}
