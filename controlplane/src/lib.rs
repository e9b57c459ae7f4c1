//! hasp control plane.
//!
//! This crate decides; the data plane forwards. For the relay role it allocates ports,
//! binds sockets, pushes sessions to the data plane's workers and serves the REST
//! session API ([`control`]); the SIP proxy, registrar and conference focus ([`proxy`])
//! live here too, as will the load balancer, DNS and membership (`cluster/`, `lb/`,
//! `dns/`). One folder per role.

#![deny(missing_docs)]

pub mod cluster;
pub mod config;
pub mod control;
pub mod dns;
pub mod error;
pub mod lb;
pub mod li;
pub mod net;
pub mod obs;
pub mod proxy;
pub mod relay;
pub mod store;

pub use config::{Config, PortRange, RelayConfig};
pub use error::Error;
pub use relay::Relay;
