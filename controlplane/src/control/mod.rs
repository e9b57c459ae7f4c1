//! The three ways to drive a relay: the REST API ([`rest`]), rtpengine's NG protocol
//! ([`ng`]) and RTPproxy's text protocol ([`rtpp`]). All three are front ends over the
//! same relay sessions ([`crate::relay`]).

pub mod ng;
pub mod rest;
pub mod rtpp;
