//! RTP/RTCP port-pair allocation, sans IO.
//!
//! The range is split into (even RTP, odd RTCP) pairs; pair `i` belongs to worker
//! `i % workers`, so a port always lands on the worker that owns it. Freed pairs go to
//! the back of their worker's queue: a port is reused as late as possible, which keeps
//! late packets of an old call from reaching a new one.

use crate::config::PortRange;
use std::collections::VecDeque;

/// Free port pairs per worker.
#[derive(Debug)]
pub struct PortAllocator {
    range: PortRange,
    pools: Vec<VecDeque<u16>>,
    next_worker: usize,
}

impl PortAllocator {
    /// All pairs of `range` free, spread over `workers`.
    pub fn new(range: PortRange, workers: usize) -> Self {
        let mut pools = vec![VecDeque::new(); workers.max(1)];
        for i in 0..range.pairs() {
            let port = range.first_even() + 2 * i as u16;
            let n = pools.len();
            pools[i % n].push_back(port);
        }
        Self { range, pools, next_worker: 0 }
    }

    /// Total pairs in the range.
    pub fn total_pairs(&self) -> usize {
        self.range.pairs()
    }

    /// Free pairs over all workers.
    pub fn free_pairs(&self) -> usize {
        self.pools.iter().map(VecDeque::len).sum()
    }

    /// Free pairs of one worker.
    pub fn free_pairs_of(&self, worker: usize) -> usize {
        self.pools.get(worker).map_or(0, VecDeque::len)
    }

    /// The next worker, round robin, that has at least `pairs` free pairs.
    pub fn pick_worker(&mut self, pairs: usize) -> Option<usize> {
        let n = self.pools.len();
        for k in 0..n {
            let w = (self.next_worker + k) % n;
            if self.pools[w].len() >= pairs {
                self.next_worker = (w + 1) % n;
                return Some(w);
            }
        }
        None
    }

    /// Takes a free pair (its RTP port) from `worker`.
    pub fn take(&mut self, worker: usize) -> Option<u16> {
        self.pools.get_mut(worker)?.pop_front()
    }

    /// Returns a pair to its owner's queue.
    pub fn put(&mut self, rtp_port: u16) {
        let i = ((rtp_port - self.range.first_even()) / 2) as usize;
        let n = self.pools.len();
        self.pools[i % n].push_back(rtp_port);
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
        let mut a = PortAllocator::new("30000-30015".parse().unwrap(), 2);
        assert_eq!(a.total_pairs(), 8);
        assert_eq!(a.free_pairs_of(0), 4);
        let w0 = a.pick_worker(2).unwrap();
        let w1 = a.pick_worker(2).unwrap();
        assert_ne!(w0, w1);
        let p = a.take(1).unwrap();
        assert_eq!(a.owner(p), 1);
        assert_eq!(p % 2, 0);
    }

    #[test]
    fn exhausts_and_recovers() {
        let mut a = PortAllocator::new("30000-30003".parse().unwrap(), 1);
        let w = a.pick_worker(2).unwrap();
        let p1 = a.take(w).unwrap();
        let p2 = a.take(w).unwrap();
        assert_eq!(a.pick_worker(1), None);
        a.put(p1);
        assert_eq!(a.pick_worker(2), None);
        a.put(p2);
        assert_eq!(a.pick_worker(2), Some(0));
        // Freed pairs are reused in FIFO order.
        assert_eq!(a.take(0), Some(p1));
    }
}
