//! Which remote addresses a session may be told to send media to. Sans IO.
//!
//! A signalled remote is where the relay sends a leg's packets, from its own address.
//! Were it one of the relay's own listeners (NG, RTPproxy, REST, LI, SIP) or its own
//! media range, anyone able to send RTP to the other leg would talk to that listener
//! *as the relay* — a confused deputy: an RTP-shaped `<cookie> d7:command4:pinge` is a
//! valid NG request, and its answer comes back the same way. So every remote (REST,
//! NG, RTPproxy, conference participants) is checked here before it is used, and so is
//! its RTCP port (the remote's port + 1).
//!
//! Operators deny more with `remote_deny` (`--remote-deny CIDR`). When the media
//! address is not itself loopback, loopback, unspecified, multicast and link-local
//! remotes are denied by default: no real phone lives there.

use crate::config::PortRange;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// An IP network, written `ADDR/LEN` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// True when `ip` is inside the network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let net: IpAddr = a.parse().map_err(|_| format!("{s:?} is not ADDR/LEN (e.g. 10.0.0.0/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => {
                l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("bad prefix length in {s:?}"))?
            }
            None => max,
        };
        Ok(Self { net, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Denied by default when the media address is not loopback: loopback, unspecified,
/// multicast and link-local, IPv4 and IPv6.
pub const DEFAULT_DENY: [&str; 8] =
    ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128", "224.0.0.0/4", "ff00::/8", "169.254.0.0/16", "fe80::/10"];

/// The rule a remote broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// The remote (or its RTCP port) is one of the relay's own listeners or media ports.
    #[error("remote {0} is this relay's own address (a control listener or its media ports)")]
    Own(SocketAddr),
    /// The remote is in a denied network.
    #[error("remote {0} is in the denied network {1}")]
    Network(SocketAddr, Cidr),
}

/// The relay's own addresses and the denied networks.
#[derive(Debug, Clone)]
pub struct RemotePolicy {
    own_ips: Vec<IpAddr>,
    own_ports: Vec<u16>,
    media: PortRange,
    deny: Vec<Cidr>,
}

impl RemotePolicy {
    /// The policy of a relay whose media sockets bind `media_ip` in `media`, announced as
    /// `advertised`, with the operator's `deny` list.
    pub fn new(media_ip: IpAddr, advertised: IpAddr, media: PortRange, deny: &[Cidr]) -> Self {
        let mut p = Self { own_ips: Vec::new(), own_ports: Vec::new(), media, deny: deny.to_vec() };
        if !media_ip.is_loopback() && !advertised.is_loopback() {
            p.deny.extend(DEFAULT_DENY.iter().filter_map(|c| c.parse::<Cidr>().ok()));
        }
        p.add_ip(media_ip);
        p.add_ip(advertised);
        p
    }

    fn add_ip(&mut self, ip: IpAddr) {
        let ip = ip.to_canonical();
        if ip.is_unspecified() {
            // A wildcard bind answers on every local address.
            for a in local_ips() {
                self.add_ip(a);
            }
        } else if !self.own_ips.contains(&ip) {
            self.own_ips.push(ip);
        }
    }

    /// Records a listener of this process (NG, RTPproxy, REST, LI, SIP).
    pub fn add_own(&mut self, addr: SocketAddr) {
        self.add_ip(addr.ip());
        if !self.own_ports.contains(&addr.port()) {
            self.own_ports.push(addr.port());
        }
    }

    /// True when `ip` reaches this host: loopback, unspecified, or one of its addresses.
    pub fn is_own_ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || ip.is_unspecified() || self.own_ips.contains(&ip)
    }

    fn is_own_port(&self, port: u16) -> bool {
        self.own_ports.contains(&port) || (self.media.min..=self.media.max).contains(&port)
    }

    /// Checks a remote RTP address (its RTCP goes to the port after it).
    pub fn check(&self, remote: SocketAddr) -> Result<(), Denied> {
        let ip = remote.ip();
        if let Some(n) = self.deny.iter().find(|n| n.contains(ip)) {
            return Err(Denied::Network(remote, *n));
        }
        let rtcp = remote.port().wrapping_add(1);
        if self.is_own_ip(ip) && (self.is_own_port(remote.port()) || self.is_own_port(rtcp)) {
            return Err(Denied::Own(remote));
        }
        Ok(())
    }
}

/// The addresses of this host's interfaces (empty if they cannot be read).
fn local_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let n: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()), "IPv4-mapped IPv6 is IPv4");
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        let h: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(h.to_string(), "192.0.2.7/32");
        assert!(h.contains("192.0.2.7".parse().unwrap()) && !h.contains("192.0.2.8".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        assert!("fe80::/10".parse::<Cidr>().unwrap().contains("fe80::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn own_listeners_and_media_ports_are_refused_on_loopback_too() {
        let mut p = RemotePolicy::new(
            "127.0.0.1".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "40000-40099".parse().unwrap(),
            &[],
        );
        p.add_own(sa("127.0.0.1:2223"));
        // Tests run on loopback: other loopback ports are fine.
        p.check(sa("127.0.0.1:5004")).unwrap();
        assert_eq!(p.check(sa("127.0.0.1:2223")), Err(Denied::Own(sa("127.0.0.1:2223"))));
        assert!(p.check(sa("127.0.0.5:2223")).is_err(), "all of 127/8 is this host");
        assert!(p.check(sa("127.0.0.1:2222")).is_err(), "its RTCP would reach the NG port");
        assert!(p.check(sa("127.0.0.1:40010")).is_err(), "own media range");
        assert!(p.check(sa("[::ffff:127.0.0.1]:2223")).is_err());
        // Someone else's NG port is not ours.
        p.check(sa("198.51.100.1:2223")).unwrap();
    }

    #[test]
    fn default_deny_list_applies_when_media_is_not_loopback() {
        let media: IpAddr = "192.0.2.10".parse().unwrap();
        let extra: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut p = RemotePolicy::new(media, media, "30000-39999".parse().unwrap(), &extra);
        p.add_own(sa("192.0.2.10:8080"));
        for denied in [
            "127.0.0.1:5004",
            "[::1]:5004",
            "0.0.0.1:5004",
            "224.0.0.1:5004",
            "[ff02::1]:5004",
            "169.254.1.1:5004",
            "[fe80::1]:5004",
            "10.9.9.9:5004",
        ] {
            assert!(matches!(p.check(sa(denied)), Err(Denied::Network(..))), "{denied} must be denied");
        }
        assert_eq!(p.check(sa("192.0.2.10:8080")), Err(Denied::Own(sa("192.0.2.10:8080"))));
        assert!(p.check(sa("192.0.2.10:30000")).is_err(), "own media range on the media address");
        p.check(sa("192.0.2.10:5004")).unwrap();
        p.check(sa("198.51.100.20:8080")).unwrap();
        p.check(sa("[2001:db8::5]:5004")).unwrap();
    }
}
