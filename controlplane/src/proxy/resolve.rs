//! Name resolution for the proxy (interim: IP literals and the system resolver on the
//! blocking pool; replaced by the RFC 3263 resolver).

use sip::{Peer, Transport};
use std::net::ToSocketAddrs;

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// The URI has no host.
    #[error("{0}: not a SIP URI")]
    Invalid(String),
}

/// The resolver.
#[derive(Debug, Default)]
pub struct Resolver;

impl Resolver {
    /// The peers to try for `uri`, in order.
    pub async fn resolve(&self, uri: &str) -> Result<Vec<Peer>, ResolveError> {
        let (host, port) = sip::message::host_port(uri).ok_or_else(|| ResolveError::Invalid(uri.into()))?;
        let transport = Transport::of_uri(uri);
        let port = port.unwrap_or(5060);
        let h = host.clone();
        let addrs = tokio::task::spawn_blocking(move || (h.as_str(), port).to_socket_addrs().map(Vec::from_iter))
            .await
            .map_err(|_| ResolveError::NotFound(host.clone()))?
            .map_err(|_| ResolveError::NotFound(host.clone()))?;
        Ok(addrs.into_iter().map(|addr| Peer { transport, addr }).collect())
    }
}
