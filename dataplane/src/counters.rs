//! Per-worker counters, written by the worker once per loop and read by anyone.

use crate::relay::stats::DropReason;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A worker's counters. Only the worker writes them (plain stores of its own running
/// totals, once per loop, so the packet path touches no shared cache line).
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Packets received.
    pub rx_packets: AtomicU64,
    /// Bytes received.
    pub rx_bytes: AtomicU64,
    /// Packets sent.
    pub tx_packets: AtomicU64,
    /// Bytes sent.
    pub tx_bytes: AtomicU64,
    /// Drops, indexed by `DropReason as usize`.
    pub drops: [AtomicU64; DropReason::COUNT],
    /// Calls into the kernel to submit and wait (io_uring_enter).
    pub enters: AtomicU64,
    /// Completions handled.
    pub completions: AtomicU64,
    /// Times a multishot receive stopped because every buffer was in flight.
    pub buffer_exhausted: AtomicU64,
    /// Sessions on this worker.
    pub sessions: AtomicU64,
    /// Events dropped because the control plane's queue was full (statistics only).
    pub events_dropped: AtomicU64,
}

/// A plain copy of [`WorkerCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCountersSnapshot {
    /// See [`WorkerCounters::rx_packets`].
    pub rx_packets: u64,
    /// See [`WorkerCounters::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`WorkerCounters::tx_packets`].
    pub tx_packets: u64,
    /// See [`WorkerCounters::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`WorkerCounters::drops`].
    pub drops: [u64; DropReason::COUNT],
    /// See [`WorkerCounters::enters`].
    pub enters: u64,
    /// See [`WorkerCounters::completions`].
    pub completions: u64,
    /// See [`WorkerCounters::buffer_exhausted`].
    pub buffer_exhausted: u64,
    /// See [`WorkerCounters::sessions`].
    pub sessions: u64,
    /// See [`WorkerCounters::events_dropped`].
    pub events_dropped: u64,
}

impl WorkerCounters {
    /// Publishes the worker's running totals.
    pub(crate) fn publish(&self, s: &WorkerCountersSnapshot) {
        self.rx_packets.store(s.rx_packets, Relaxed);
        self.rx_bytes.store(s.rx_bytes, Relaxed);
        self.tx_packets.store(s.tx_packets, Relaxed);
        self.tx_bytes.store(s.tx_bytes, Relaxed);
        for (a, v) in self.drops.iter().zip(s.drops) {
            a.store(v, Relaxed);
        }
        self.enters.store(s.enters, Relaxed);
        self.completions.store(s.completions, Relaxed);
        self.buffer_exhausted.store(s.buffer_exhausted, Relaxed);
        self.sessions.store(s.sessions, Relaxed);
        self.events_dropped.store(s.events_dropped, Relaxed);
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> WorkerCountersSnapshot {
        WorkerCountersSnapshot {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops: std::array::from_fn(|i| self.drops[i].load(Relaxed)),
            enters: self.enters.load(Relaxed),
            completions: self.completions.load(Relaxed),
            buffer_exhausted: self.buffer_exhausted.load(Relaxed),
            sessions: self.sessions.load(Relaxed),
            events_dropped: self.events_dropped.load(Relaxed),
        }
    }
}
