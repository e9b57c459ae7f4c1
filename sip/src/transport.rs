//! Transports and peers: how a SIP message travels and to whom.

use std::net::SocketAddr;

/// Largest UDP payload over IPv4: a message longer than this cannot go over UDP.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// Datagrams; the transaction layer retransmits.
    Udp,
    /// A stream; reliable, no retransmissions.
    Tcp,
}

impl Transport {
    /// The name in Via headers.
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }

    /// The transport a URI asks for (`;transport=tcp`), UDP by default (RFC 3263 §4.1
    /// without NAPTR).
    pub fn of_uri(uri: &str) -> Self {
        let params = uri.split('>').next().unwrap_or(uri);
        let tcp = params.split(';').skip(1).any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("transport") && v.trim().eq_ignore_ascii_case("tcp")
            })
        });
        if tcp {
            Transport::Tcp
        } else {
            Transport::Udp
        }
    }
}

/// The other end of a message: a transport and an address (for TCP, the connection's
/// remote address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// Transport.
    pub transport: Transport,
    /// Remote address.
    pub addr: SocketAddr,
}

impl Peer {
    /// A UDP peer.
    pub fn udp(addr: SocketAddr) -> Self {
        Self { transport: Transport::Udp, addr }
    }

    /// A TCP peer.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self { transport: Transport::Tcp, addr }
    }

    /// Whether the transport is reliable (no retransmissions).
    pub fn reliable(self) -> bool {
        self.transport == Transport::Tcp
    }
}
