//! The data plane's error type.

use std::io;

/// Errors the data plane reports to its caller (never per packet: packet problems are
/// counted drops).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// io_uring could not be set up at all (kernel too old, or blocked by seccomp).
    #[error("io_uring unavailable: {0}")]
    Uring(#[source] io::Error),
    /// Binding or configuring a socket failed.
    #[error("socket error: {0}")]
    Socket(#[source] io::Error),
    /// Pinning a worker to a core failed.
    #[error("cannot pin worker to core {core}: {source}")]
    Affinity {
        /// The requested core.
        core: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Spawning a worker thread failed.
    #[error("cannot start worker thread: {0}")]
    Thread(#[source] io::Error),
    /// The worker's command queue is full; the caller should retry or shed load.
    #[error("worker {0} command queue is full")]
    QueueFull(usize),
    /// The worker has stopped.
    #[error("worker {0} has stopped")]
    WorkerGone(usize),
    /// The configuration is invalid.
    #[error("invalid data plane configuration: {0}")]
    Config(String),
}
