//! hasp data plane: the packet path.
//!
//! Worker threads, one per configured core, each own an io_uring and the UDP sockets of
//! the sessions placed on them. The control plane creates sessions (and binds their
//! sockets) and pushes them to the owning worker over a bounded channel
//! ([`Command`]); workers push [`Event`]s back the same way.
//!
//! The per-packet decision (which leg, latching, statistics, where to forward) is a
//! sans-IO state machine in [`relay`]; rings, sockets and clocks live in [`worker`] and
//! [`io`].

#![deny(missing_docs)]

pub mod affinity;
pub mod command;
pub mod counters;
pub mod error;
pub mod io;
pub mod mixer;
pub mod relay;
pub mod rtp;
pub mod tap;
pub mod worker;

pub use command::{Command, ConfSnapshot, DetachedParticipant, Event, NewParticipant, NewSession};
pub use counters::{WorkerCounters, WorkerCountersSnapshot};
pub use error::Error;
pub use io::IoMode;
pub use relay::latch::{LatchMode, LatchPolicy};
pub use relay::stats::DropReason;
pub use relay::{LegSnapshot, SessionId, SessionSnapshot, StreamSnapshot};
pub use tap::{TapCounters, TapRecord, TapSpec};
pub use worker::{Dataplane, DataplaneConfig, WorkerHandle};
