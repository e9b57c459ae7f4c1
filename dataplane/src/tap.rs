//! Lawful-intercept media tap: copies of a tapped session's packets, handed off the
//! packet path through a bounded queue.
//!
//! The worker never waits for interception: a copy goes into a preallocated bounded
//! channel with `try_send`, and when the channel is full the copy is dropped and
//! counted in [`TapCounters`], which only the LI interface exposes.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

/// Largest packet copied whole; longer packets are cut (and flagged).
pub const TAP_MAX: usize = 1500;

/// What a tapped session carries: the task and how to label its packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapSpec {
    /// LI task id (XID), a UUID.
    pub xid: [u8; 16],
    /// Correlation id shared by this call's media and signalling PDUs.
    pub correlation: u64,
    /// The leg (0 or 1) on which the target is: packets received there are "from
    /// target", the others "to target".
    pub target_leg: u8,
}

/// One intercepted packet.
#[derive(Debug, Clone)]
pub struct TapRecord {
    /// Task.
    pub xid: [u8; 16],
    /// Correlation id.
    pub correlation: u64,
    /// True when the target sent it.
    pub from_target: bool,
    /// RTCP rather than RTP.
    pub rtcp: bool,
    /// Source of the packet (the sender as the relay saw it).
    pub src: SocketAddr,
    /// Destination (the relay port it arrived on).
    pub dst: SocketAddr,
    /// Arrival time (wall clock, for the PDU timestamp).
    pub at: SystemTime,
    /// Length of the original packet.
    pub orig_len: u16,
    /// Bytes copied into `data`.
    pub len: u16,
    /// The packet.
    pub data: [u8; TAP_MAX],
}

impl TapRecord {
    /// The copied bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len as usize]
    }
}

/// Interception counters; deliberately not part of the relay's metrics.
#[derive(Debug, Default)]
pub struct TapCounters {
    /// Packets copied into the queue.
    pub copied: AtomicU64,
    /// Copies dropped because the queue was full.
    pub queue_full: AtomicU64,
}
