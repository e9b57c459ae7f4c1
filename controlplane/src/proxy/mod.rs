//! The SIP proxy role: the sans-IO proxy core ([`core`]), the registrar, the conference
//! focus, the media-anchor clients (NG over UDP or HTTP, or the relay in the same
//! process), and the UDP/TCP driver that performs the core's actions.

pub mod anchor;
pub mod api;
pub mod core;
pub mod driver;
pub mod early_drop;
pub mod focus;
pub mod registrar;
pub mod resolve;
