//! Per-stream counters and RTP reception statistics (RFC 3550 A.1 and A.8).

use serde::Serialize;
use std::time::Instant;

/// Why a packet was not forwarded. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum DropReason {
    /// Too short or not RTP/RTCP version 2.
    Malformed = 0,
    /// From a source other than the latched one (hijack attempt or stray packet).
    SourceMismatch = 1,
    /// The far leg's address is not known yet (neither signalled nor latched).
    NoDestination = 2,
    /// The kernel refused the send.
    SendError = 3,
    /// Arrived for a session that is being deleted.
    Closing = 4,
    /// Larger than the relay's buffers (truncated by the kernel).
    Truncated = 5,
}

impl DropReason {
    /// Number of reasons, for fixed-size counter arrays.
    pub const COUNT: usize = 6;
    /// All reasons, in counter-index order.
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::SourceMismatch,
        DropReason::NoDestination,
        DropReason::SendError,
        DropReason::Closing,
        DropReason::Truncated,
    ];

    /// Stable name used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::SourceMismatch => "source_mismatch",
            DropReason::NoDestination => "no_destination",
            DropReason::SendError => "send_error",
            DropReason::Closing => "closing",
            DropReason::Truncated => "truncated",
        }
    }
}

/// Packet and byte counters of one stream (one port), received side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StreamCounters {
    /// Packets received on this port.
    pub packets: u64,
    /// Bytes received on this port (UDP payload).
    pub bytes: u64,
    /// Packets forwarded from this port to the far leg.
    pub forwarded: u64,
    /// Drops by reason, indexed by `DropReason as usize`.
    #[serde(skip)]
    pub drops: [u64; DropReason::COUNT],
}

impl StreamCounters {
    /// Total drops of all reasons.
    pub fn dropped(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// RTP reception statistics of one stream, per RFC 3550 appendix A.1 (sequence
/// tracking) and A.8 (interarrival jitter).
#[derive(Debug, Clone, Default)]
pub struct RtpStats {
    ssrc: Option<u32>,
    ssrc_changes: u64,
    base_seq: u32,
    max_seq: u16,
    cycles: u32,
    received: u64,
    reordered: u64,
    duplicates: u64,
    /// Relative transit time of the previous packet, in RTP timestamp units.
    transit: Option<i64>,
    /// Jitter estimate scaled by 16, as in A.8's integer form.
    jitter_q4: u64,
}

/// Sequence jumps larger than this are a restart of the sender, not loss (A.1's
/// MAX_DROPOUT).
const MAX_DROPOUT: u16 = 3000;
/// Packets further behind than this are treated as a restart too (A.1's MAX_MISORDER).
const MAX_MISORDER: u16 = 100;

impl RtpStats {
    /// Accounts one RTP packet that arrived at `arrival` (any clock's origin, as long as
    /// it is the same for every packet), with the stream's RTP clock rate.
    #[inline]
    pub fn on_packet(&mut self, arrival: Instant, epoch: Instant, clock_rate: u32, seq: u16, ts: u32, ssrc: u32) {
        if self.ssrc != Some(ssrc) {
            if self.ssrc.is_some() {
                self.ssrc_changes += 1;
            }
            let changes = self.ssrc_changes;
            *self = Self { ssrc: Some(ssrc), ssrc_changes: changes, ..Self::default() };
            self.restart(seq);
        } else {
            let delta = seq.wrapping_sub(self.max_seq);
            if delta == 0 {
                self.duplicates += 1;
                return;
            } else if delta < MAX_DROPOUT {
                if seq < self.max_seq {
                    self.cycles += 1 << 16;
                }
                self.max_seq = seq;
            } else if delta <= u16::MAX - MAX_MISORDER {
                // A large jump: the sender restarted its sequence. Start over rather
                // than report thousands of lost packets.
                self.restart(seq);
                self.transit = None;
            } else {
                self.reordered += 1;
            }
        }
        self.received += 1;

        // A.8: arrival time converted to RTP units; only differences matter, so the
        // epoch is arbitrary but fixed.
        let arrival_units = (arrival.saturating_duration_since(epoch).as_nanos() as u64)
            .wrapping_mul(clock_rate as u64)
            / 1_000_000_000;
        let transit = arrival_units as i64 - ts as i64;
        if let Some(prev) = self.transit {
            let d = (transit - prev).unsigned_abs();
            // Timestamps that jump by hours (a new talk spurt after a restart) would
            // poison the estimate; A.8 does not guard this, we cap the step.
            let d = d.min(clock_rate as u64 * 10);
            self.jitter_q4 = self.jitter_q4 + d - ((self.jitter_q4 + 8) >> 4);
        }
        self.transit = Some(transit);
    }

    fn restart(&mut self, seq: u16) {
        self.base_seq = seq as u32;
        self.max_seq = seq;
        self.cycles = 0;
        self.received = 0;
    }

    /// The current SSRC, if any packet was seen.
    pub fn ssrc(&self) -> Option<u32> {
        self.ssrc
    }

    /// Highest extended sequence number seen.
    pub fn extended_max(&self) -> u64 {
        self.cycles as u64 + self.max_seq as u64
    }

    /// Packets expected from the sequence range seen.
    pub fn expected(&self) -> u64 {
        if self.ssrc.is_none() {
            return 0;
        }
        self.extended_max() + 1 - self.base_seq as u64
    }

    /// Packets lost (expected minus received; never negative).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// Packets that arrived after a later-numbered one.
    pub fn reordered(&self) -> u64 {
        self.reordered
    }

    /// Packets whose sequence number repeated the newest one.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Times the SSRC changed.
    pub fn ssrc_changes(&self) -> u64 {
        self.ssrc_changes
    }

    /// Interarrival jitter in RTP timestamp units.
    pub fn jitter(&self) -> u32 {
        (self.jitter_q4 >> 4) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn feed(s: &mut RtpStats, t0: Instant, seqs: &[u16]) {
        for &q in seqs {
            // Perfect 20 ms pacing: arrival and timestamp advance together.
            let n = q as u64;
            s.on_packet(t0 + Duration::from_millis(20 * n), t0, 8000, q, (160 * n) as u32, 7);
        }
    }

    #[test]
    fn counts_loss_and_reordering() {
        let t0 = Instant::now();
        let mut s = RtpStats::default();
        feed(&mut s, t0, &[1, 2, 3, 5, 4, 7, 8]);
        assert_eq!(s.expected(), 8);
        assert_eq!(s.lost(), 1); // 6 never came
        assert_eq!(s.reordered(), 1);
        assert_eq!(s.jitter(), 0);
    }

    #[test]
    fn handles_sequence_wrap() {
        let t0 = Instant::now();
        let mut s = RtpStats::default();
        for q in [65534u16, 65535, 0, 1] {
            s.on_packet(t0, t0, 8000, q, 0, 1);
        }
        assert_eq!(s.expected(), 4);
        assert_eq!(s.lost(), 0);
        assert_eq!(s.extended_max(), 65536 + 1);
    }

    #[test]
    fn jitter_follows_a8() {
        let t0 = Instant::now();
        let mut s = RtpStats::default();
        // Every packet 10 ms (80 units) late relative to the previous one alternately.
        for n in 0..200u64 {
            let wobble = if n % 2 == 0 { 0 } else { 10 };
            s.on_packet(t0 + Duration::from_millis(20 * n + wobble), t0, 8000, n as u16, (160 * n) as u32, 1);
        }
        // |D| is always 80 units, so J converges to 80.
        assert!((75..=80).contains(&s.jitter()), "jitter {}", s.jitter());
    }

    #[test]
    fn ssrc_change_restarts_sequence_tracking() {
        let t0 = Instant::now();
        let mut s = RtpStats::default();
        feed(&mut s, t0, &[100, 101]);
        s.on_packet(t0, t0, 8000, 9000, 0, 8);
        assert_eq!(s.ssrc_changes(), 1);
        assert_eq!(s.expected(), 1);
        assert_eq!(s.lost(), 0);
    }
}
