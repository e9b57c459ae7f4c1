//! RTP/RTCP port-pair allocation, sans IO.
//!
//! The range is split into (even RTP, odd RTCP) pairs; pair `i` belongs to worker
//! `i % workers`, so a port always lands on the worker that owns it.
//!
//! Ports an old call's endpoints may still send to are handed out as late as possible:
//! - the first pair handed out is at a random offset into the range (the caller injects
//!   the randomness), so a restarted relay does not give its first calls the ports the
//!   calls of the previous run used;
//! - freed pairs go to the back of their worker's queue (FIFO), and a pair freed less
//!   than the quarantine ago is avoided: a worker whose next pairs are all that fresh is
//!   passed over while another has older ones. The quarantine never refuses a create:
//!   when only fresh pairs are left, the oldest of them is used.

use crate::config::PortRange;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a freed pair is avoided by default.
pub const QUARANTINE: Duration = Duration::from_secs(5);

/// Free port pairs per worker, each with the time it was freed (`None`: never used).
#[derive(Debug)]
pub struct PortAllocator {
    range: PortRange,
    pools: Vec<VecDeque<(u16, Option<Instant>)>>,
    next_worker: usize,
    quarantine: Duration,
}

impl PortAllocator {
    /// All pairs of `range` free, spread over `workers`; the first handed out is pair
    /// `offset % pairs` (pass a random number).
    pub fn new(range: PortRange, workers: usize, offset: u64) -> Self {
        let mut pools = vec![VecDeque::new(); workers.max(1)];
        let pairs = range.pairs();
        let start = if pairs == 0 { 0 } else { (offset % pairs as u64) as usize };
        let n = pools.len();
        for k in 0..pairs {
            let i = (start + k) % pairs;
            let port = range.first_even() + 2 * i as u16;
            pools[i % n].push_back((port, None));
        }
        Self { range, pools, next_worker: start % n, quarantine: QUARANTINE }
    }

    /// Sets the quarantine of freed pairs.
    pub fn with_quarantine(mut self, q: Duration) -> Self {
        self.quarantine = q;
        self
    }

    /// Total pairs in the range.
    pub fn total_pairs(&self) -> usize {
        self.range.pairs()
    }

    /// Free pairs over all workers (quarantined ones included: they are free).
    pub fn free_pairs(&self) -> usize {
        self.pools.iter().map(VecDeque::len).sum()
    }

    /// Free pairs of one worker.
    pub fn free_pairs_of(&self, worker: usize) -> usize {
        self.pools.get(worker).map_or(0, VecDeque::len)
    }

    /// True when the next `pairs` pairs of worker `w` were freed longer ago than the
    /// quarantine. Each queue is in order of freeing, so the last of them decides.
    fn rested(&self, w: usize, pairs: usize, now: Instant) -> bool {
        match self.pools[w].get(pairs.saturating_sub(1)) {
            Some((_, None)) => true,
            Some((_, Some(t))) => now.saturating_duration_since(*t) >= self.quarantine,
            None => false,
        }
    }

    /// The next worker, round robin, that has at least `pairs` free pairs, preferring
    /// one whose pairs are out of quarantine.
    pub fn pick_worker(&mut self, pairs: usize, now: Instant) -> Option<usize> {
        let n = self.pools.len();
        let order = (0..n).map(|k| (self.next_worker + k) % n);
        let w = order
            .clone()
            .find(|&w| self.pools[w].len() >= pairs && self.rested(w, pairs, now))
            .or_else(|| order.clone().find(|&w| self.pools[w].len() >= pairs))?;
        self.next_worker = (w + 1) % n;
        Some(w)
    }

    /// Takes a free pair (its RTP port) from `worker`: the one freed longest ago.
    pub fn take(&mut self, worker: usize) -> Option<u16> {
        self.pools.get_mut(worker)?.pop_front().map(|(p, _)| p)
    }

    /// Returns a pair, freed at `now`, to the back of its owner's queue.
    pub fn put(&mut self, rtp_port: u16, now: Instant) {
        let i = ((rtp_port - self.range.first_even()) / 2) as usize;
        let n = self.pools.len();
        self.pools[i % n].push_back((rtp_port, Some(now)));
    }

    /// Returns a pair that was taken but never used (a failed bind): it goes back to the
    /// front, as it was.
    pub fn untake(&mut self, rtp_port: u16) {
        let w = self.owner(rtp_port);
        self.pools[w].push_front((rtp_port, None));
    }

    /// The worker that owns a pair.
    pub fn owner(&self, rtp_port: u16) -> usize {
        ((rtp_port - self.range.first_even()) / 2) as usize % self.pools.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_pairs_and_round_robins() {
        let now = Instant::now();
        let mut a = PortAllocator::new("30000-30015".parse().unwrap(), 2, 0);
        assert_eq!(a.total_pairs(), 8);
        assert_eq!(a.free_pairs_of(0), 4);
        let w0 = a.pick_worker(2, now).unwrap();
        let w1 = a.pick_worker(2, now).unwrap();
        assert_ne!(w0, w1);
        let p = a.take(1).unwrap();
        assert_eq!(a.owner(p), 1);
        assert_eq!(p % 2, 0);
    }

    #[test]
    fn starts_at_the_injected_offset() {
        let now = Instant::now();
        let mut a = PortAllocator::new("30000-30019".parse().unwrap(), 1, 3);
        let w = a.pick_worker(2, now).unwrap();
        assert_eq!((a.take(w), a.take(w)), (Some(30006), Some(30008)));
        // The offset wraps around the range, and every pair is still there once.
        let mut b = PortAllocator::new("30000-30019".parse().unwrap(), 2, 10 + 9);
        let mut all = Vec::new();
        for w in 0..2 {
            while let Some(p) = b.take(w) {
                assert_eq!(b.owner(p), w);
                all.push(p);
            }
        }
        all.sort();
        assert_eq!(all, (0..10).map(|i| 30000 + 2 * i).collect::<Vec<u16>>());
        let mut c = PortAllocator::new("30000-30019".parse().unwrap(), 2, 9);
        assert_eq!(c.pick_worker(1, now), Some(1), "pair 9 belongs to worker 1");
        assert_eq!(c.take(1), Some(30018));
    }

    #[test]
    fn exhausts_and_recovers() {
        let now = Instant::now();
        let mut a = PortAllocator::new("30000-30003".parse().unwrap(), 1, 0);
        let w = a.pick_worker(2, now).unwrap();
        let p1 = a.take(w).unwrap();
        let p2 = a.take(w).unwrap();
        assert_eq!(a.pick_worker(1, now), None);
        a.put(p1, now);
        assert_eq!(a.pick_worker(2, now), None);
        a.put(p2, now);
        // Only quarantined pairs are left: they are used rather than refusing.
        assert_eq!(a.pick_worker(2, now), Some(0));
        // Freed pairs are reused in FIFO order.
        assert_eq!(a.take(0), Some(p1));
    }

    #[test]
    fn freed_pairs_come_last_and_quarantine_prefers_rested_workers() {
        let t0 = Instant::now();
        let mut a = PortAllocator::new("30000-30007".parse().unwrap(), 1, 0);
        let (p1, p2) = (a.take(0).unwrap(), a.take(0).unwrap());
        a.put(p1, t0);
        a.put(p2, t0);
        // A create right after a delete gets the other pairs.
        assert_eq!((a.take(0), a.take(0)), (Some(30004), Some(30006)));

        // Two workers: worker 0 has only just-freed pairs, worker 1 untouched ones.
        let mut b = PortAllocator::new("30000-30007".parse().unwrap(), 2, 0).with_quarantine(Duration::from_secs(5));
        let (x, y) = (b.take(0).unwrap(), b.take(0).unwrap());
        b.put(x, t0);
        b.put(y, t0);
        let (u, v) = (b.take(1).unwrap(), b.take(1).unwrap());
        b.put(u, t0 - Duration::from_secs(10));
        b.put(v, t0 - Duration::from_secs(10));
        // Round robin would say worker 0; quarantine says worker 1, twice over.
        assert_eq!(b.pick_worker(2, t0), Some(1));
        assert_eq!(b.pick_worker(2, t0), Some(1));
        // Once the quarantine is over, round robin again.
        assert_eq!(b.pick_worker(2, t0 + Duration::from_secs(5)), Some(0));
    }
}
