//! hasp control plane.
//!
//! This crate decides; the data plane forwards. For the relay role it allocates ports,
//! binds sockets, pushes sessions to the data plane's workers and serves the REST
//! session API ([`api`]); the SIP proxy, registrar and conference focus ([`sip`],
//! [`focus`]) live here too, as will the load balancer, DNS and membership.

#![deny(missing_docs)]

pub mod anchor;
pub mod api;
pub mod calls;
pub mod config;
pub mod error;
pub mod focus;
pub mod li;
pub mod metrics;
pub mod ng;
pub mod ports;
pub mod relay;
pub mod rtpp;
pub mod sdp;
pub mod sip;
pub mod store;

pub use config::{Config, PortRange, RelayConfig};
pub use error::Error;
pub use relay::Relay;
