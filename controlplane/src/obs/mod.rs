//! Observability: Prometheus metrics of the relay ([`relay`]) and of the SIP proxy
//! ([`sip`]).

pub mod relay;
pub mod sip;
