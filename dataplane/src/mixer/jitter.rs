//! A per-participant jitter buffer, sans IO: packets in by sequence number, one frame
//! out per 20 ms tick, reordering fixed, late packets dropped, depth adapting within
//! a bound.

/// Most frames held; also the reorder window.
pub const CAPACITY: usize = 16;
/// Largest payload kept (Opus at 510 kbit/s and 20 ms is 1275 bytes; voice is < 200).
pub const MAX_PAYLOAD: usize = 1280;

/// A slot is written in place (only the payload's bytes) and marked `full`: no
/// 1.3 KB struct is built, zeroed or moved per packet.
#[derive(Clone)]
struct Slot {
    full: bool,
    seq: u16,
    len: u16,
    level: Option<u8>,
    data: Box<[u8; MAX_PAYLOAD]>,
}

/// What the tick gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<'a> {
    /// Not started yet (or stopped after a long gap): play silence, no concealment.
    Idle,
    /// The next frame's payload and its RFC 6464 audio level (−dBov), if sent.
    Frame(&'a [u8], Option<u8>),
    /// The next frame is missing: conceal it.
    Lost,
}

/// Counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JitterStats {
    /// Packets accepted.
    pub received: u64,
    /// Arrived after their playout time.
    pub late: u64,
    /// Same sequence number twice.
    pub duplicate: u64,
    /// Frames concealed.
    pub concealed: u64,
    /// Payloads too large for a slot.
    pub oversize: u64,
    /// Current target depth in frames.
    pub depth: u8,
}

/// The buffer.
pub struct JitterBuffer {
    slots: Vec<Slot>,
    next: Option<u16>,
    playing: bool,
    target: u8,
    max: u8,
    missing_run: u32,
    stats: JitterStats,
    out: Box<[u8; MAX_PAYLOAD]>,
}

impl std::fmt::Debug for JitterBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitterBuffer").field("stats", &self.stats).finish()
    }
}

impl JitterBuffer {
    /// A buffer starting at `target` frames of depth, adapting up to `max`.
    pub fn new(target: u8, max: u8) -> Self {
        let max = max.clamp(1, CAPACITY as u8 - 2);
        Self {
            slots: (0..CAPACITY)
                .map(|_| Slot { full: false, seq: 0, len: 0, level: None, data: Box::new([0; MAX_PAYLOAD]) })
                .collect(),
            next: None,
            playing: false,
            target: target.clamp(1, max),
            max,
            missing_run: 0,
            stats: JitterStats { depth: target, ..JitterStats::default() },
            out: Box::new([0; MAX_PAYLOAD]),
        }
    }

    /// Counters.
    pub fn stats(&self) -> JitterStats {
        JitterStats { depth: self.target, ..self.stats }
    }

    fn buffered(&self) -> usize {
        self.slots.iter().filter(|s| s.full).count()
    }

    /// Takes a packet's payload.
    pub fn push(&mut self, seq: u16, payload: &[u8], level: Option<u8>) {
        if payload.len() > MAX_PAYLOAD {
            self.stats.oversize += 1;
            return;
        }
        match self.next {
            Some(n) if self.playing => {
                let ahead = seq.wrapping_sub(n);
                if ahead >= 0x8000 && n.wrapping_sub(seq) as usize > 4 * CAPACITY {
                    // Far behind: not a late packet but a sender that restarted.
                    self.reset(seq);
                } else if ahead >= 0x8000 {
                    // Behind the playout point: too late to play. A late packet means
                    // the depth is too small.
                    self.stats.late += 1;
                    self.target = (self.target + 1).min(self.max);
                    return;
                }
                if ahead as usize >= CAPACITY - 1 {
                    // A jump beyond the window: the sender restarted; follow it.
                    self.reset(seq);
                }
            }
            Some(n) => {
                // Not playing yet: the earliest packet seen defines the start.
                if seq.wrapping_sub(n) >= 0x8000 {
                    self.next = Some(seq);
                }
                if seq.wrapping_sub(self.next.unwrap_or(seq)) as usize >= CAPACITY - 1 {
                    self.reset(seq);
                }
            }
            None => self.next = Some(seq),
        }
        let slot = &mut self.slots[seq as usize % CAPACITY];
        if slot.full && slot.seq == seq {
            self.stats.duplicate += 1;
            return;
        }
        slot.full = true;
        slot.seq = seq;
        slot.len = payload.len() as u16;
        slot.level = level;
        slot.data[..payload.len()].copy_from_slice(payload);
        self.stats.received += 1;
    }

    fn reset(&mut self, seq: u16) {
        self.slots.iter_mut().for_each(|s| s.full = false);
        self.next = Some(seq);
        self.playing = false;
        self.missing_run = 0;
    }

    /// The frame for this tick.
    pub fn pop(&mut self) -> Pop<'_> {
        let Some(n) = self.next else { return Pop::Idle };
        if !self.playing {
            if self.buffered() < self.target as usize {
                return Pop::Idle;
            }
            self.playing = true;
        }
        self.next = Some(n.wrapping_add(1));
        let i = n as usize % CAPACITY;
        let hit = self.slots[i].full && self.slots[i].seq == n;
        match hit {
            true => {
                self.slots[i].full = false;
                self.missing_run = 0;
                // Shrink slowly when the buffer holds more than it needs.
                if self.buffered() > self.target as usize + 2 && self.target > 1 {
                    self.target -= 1;
                }
                let s = &self.slots[i];
                let len = s.len as usize;
                self.out[..len].copy_from_slice(&s.data[..len]);
                Pop::Frame(&self.out[..len], s.level)
            }
            false => {
                self.missing_run += 1;
                if self.missing_run > 10 && self.buffered() == 0 {
                    // The sender stopped (hold, DTX, silence suppression): stop
                    // concealing and wait for it to resume.
                    self.playing = false;
                    self.next = None;
                    return Pop::Idle;
                }
                self.stats.concealed += 1;
                Pop::Lost
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(jb: &mut JitterBuffer, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| match jb.pop() {
                Pop::Idle => "idle".to_string(),
                Pop::Lost => "lost".to_string(),
                Pop::Frame(p, _) => p[0].to_string(),
            })
            .collect()
    }

    #[test]
    fn reorders_and_conceals() {
        let mut jb = JitterBuffer::new(2, 8);
        jb.push(10, &[10], None);
        assert_eq!(frames(&mut jb, 1), ["idle"]);
        jb.push(12, &[12], None);
        jb.push(11, &[11], None);
        // 13 is lost, 14 arrives.
        jb.push(14, &[14], None);
        assert_eq!(frames(&mut jb, 5), ["10", "11", "12", "lost", "14"]);
        assert_eq!(jb.stats().concealed, 1);
    }

    #[test]
    fn drops_late_packets_and_grows() {
        let mut jb = JitterBuffer::new(1, 4);
        jb.push(1, &[1], None);
        assert_eq!(frames(&mut jb, 2), ["1", "lost"]);
        jb.push(2, &[2], None); // its time has passed
        assert_eq!(jb.stats().late, 1);
        assert_eq!(jb.stats().depth, 2);
        jb.push(2, &[2], None);
        jb.push(3, &[3], None);
        assert_eq!(frames(&mut jb, 1), ["3"]);
    }

    #[test]
    fn follows_a_restart_and_goes_idle_after_silence() {
        let mut jb = JitterBuffer::new(1, 4);
        jb.push(100, &[1], None);
        assert_eq!(frames(&mut jb, 1), ["1"]);
        jb.push(40000, &[2], None);
        assert_eq!(frames(&mut jb, 1), ["2"]);
        let out = frames(&mut jb, 20);
        assert!(out.ends_with(&["idle".to_string()]), "{out:?}");
        jb.push(40030, &[3], None);
        assert_eq!(frames(&mut jb, 1), ["3"]);
        jb.push(40030, &[3], None);
        jb.push(40031, &[4], None);
        jb.push(40031, &[4], None);
        assert_eq!(jb.stats().duplicate, 1);
    }
}
