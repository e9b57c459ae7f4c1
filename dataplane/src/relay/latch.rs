//! NAT latching (symmetric RTP) as a sans-IO state machine.
//!
//! A leg's remote address is learned from the first packet that arrives on its port,
//! because a NATed phone's media comes from an address its SDP does not know. Once
//! latched, another source may take over only under the configured policy, so that a
//! third party who learns the relay's port cannot steal the stream.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
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
    /// the address the control plane signalled for this leg, if any.
    #[inline]
    pub fn on_packet(
        &mut self,
        policy: &LatchPolicy,
        signalled: Option<SocketAddr>,
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
                _ => LatchDecision::Latched,
            },
            Some(_) => match policy.mode {
                LatchMode::Strict | LatchMode::Asymmetric => LatchDecision::Reject,
                LatchMode::Learn => {
                    let idle = match (policy.relatch_idle, self.last_seen) {
                        (Some(limit), Some(seen)) => now.saturating_duration_since(seen) >= limit,
                        _ => false,
                    };
                    let new_ssrc =
                        policy.relatch_on_ssrc_change && matches!((ssrc, self.ssrc), (Some(a), Some(b)) if a != b);
                    if idle || new_ssrc {
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

    #[test]
    fn latches_first_source_and_rejects_hijack() {
        let p = LatchPolicy::default();
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, Some(addr(1000)), t0, addr(2000), Some(1)), LatchDecision::Latched);
        assert_eq!(l.addr(), Some(addr(2000)));
        assert_eq!(l.on_packet(&p, None, t0, addr(2000), Some(1)), LatchDecision::Accept);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.on_packet(&p, None, t1, addr(3000), Some(1)), LatchDecision::Reject);
        assert_eq!(l.addr(), Some(addr(2000)));
    }

    #[test]
    fn relatches_only_after_idle() {
        let p = LatchPolicy::default();
        let t0 = Instant::now();
        let mut l = Latch::default();
        l.on_packet(&p, None, t0, addr(2000), Some(1));
        let t1 = t0 + Duration::from_millis(1999);
        assert_eq!(l.on_packet(&p, None, t1, addr(3000), Some(1)), LatchDecision::Reject);
        // The rejected packet did not refresh the latched source's last-seen time.
        let t2 = t0 + Duration::from_millis(2000);
        assert_eq!(l.on_packet(&p, None, t2, addr(3000), Some(1)), LatchDecision::Relatched);
        assert_eq!(l.addr(), Some(addr(3000)));
    }

    #[test]
    fn ssrc_change_relatches_only_when_enabled() {
        let t0 = Instant::now();
        let mut p = LatchPolicy { relatch_idle: None, ..LatchPolicy::default() };
        let mut l = Latch::default();
        l.on_packet(&p, None, t0, addr(2000), Some(1));
        assert_eq!(l.on_packet(&p, None, t0, addr(3000), Some(2)), LatchDecision::Reject);
        p.relatch_on_ssrc_change = true;
        assert_eq!(l.on_packet(&p, None, t0, addr(3000), Some(1)), LatchDecision::Reject);
        assert_eq!(l.on_packet(&p, None, t0, addr(3000), Some(2)), LatchDecision::Relatched);
    }

    #[test]
    fn strict_accepts_only_signalled_source() {
        let p = LatchPolicy { mode: LatchMode::Strict, ..LatchPolicy::default() };
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, Some(addr(1000)), t0, addr(2000), None), LatchDecision::Reject);
        assert_eq!(l.on_packet(&p, Some(addr(1000)), t0, addr(1000), None), LatchDecision::Latched);
        let late = t0 + Duration::from_secs(3600);
        assert_eq!(l.on_packet(&p, Some(addr(1000)), late, addr(2000), None), LatchDecision::Reject);
    }

    #[test]
    fn asymmetric_never_latches() {
        let p = LatchPolicy { mode: LatchMode::Asymmetric, ..LatchPolicy::default() };
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, Some(addr(1000)), t0, addr(2000), None), LatchDecision::Accept);
        assert_eq!(l.on_packet(&p, Some(addr(1000)), t0, addr(3000), None), LatchDecision::Accept);
        assert_eq!(l.addr(), None);
    }

    #[test]
    fn strict_without_signalled_locks_first_source() {
        let p = LatchPolicy { mode: LatchMode::Strict, ..LatchPolicy::default() };
        let t0 = Instant::now();
        let mut l = Latch::default();
        assert_eq!(l.on_packet(&p, None, t0, addr(2000), None), LatchDecision::Latched);
        let late = t0 + Duration::from_secs(3600);
        assert_eq!(l.on_packet(&p, None, late, addr(3000), None), LatchDecision::Reject);
    }
}
