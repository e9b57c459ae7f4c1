//! hasp SIP: the protocol without the IO.
//!
//! Messages ([`message`]), transactions ([`transaction`], RFC 3261 §17), dialogs
//! ([`dialog`]), digest authentication ([`digest`]), transports ([`transport`]) and
//! steering between core instances ([`steer`]) as sans-IO code: they take
//! bytes and the time and return what to send. The proxy, the load balancer, the smart
//! client and the fuzz targets build on this crate; it depends on no runtime, socket or
//! store, so a whole cluster can later run in one deterministic simulation.

#![deny(missing_docs)]

pub mod dialog;
pub mod digest;
pub mod message;
pub mod steer;
pub mod transaction;
pub mod transport;

pub use message::{Message, ParseError, StartLine};
pub use transport::{Peer, Transport, MAX_UDP_PAYLOAD};
