//! Converting between `SocketAddr` and the kernel's sockaddr without allocating.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Storage large enough for an IPv4 or IPv6 socket address.
pub type SockaddrBuf = libc::sockaddr_in6;

/// Length the kernel needs for a name buffer that can hold either family.
pub const SOCKADDR_LEN: usize = std::mem::size_of::<SockaddrBuf>();

/// Writes `addr` into `out`; returns the length to pass as `msg_namelen`.
#[inline]
pub fn write_sockaddr(addr: &SocketAddr, out: &mut SockaddrBuf) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is smaller than sockaddr_in6 and both are plain data
            // with no alignment stricter than u32.
            let sin = unsafe { &mut *(out as *mut SockaddrBuf as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            sin.sin_zero = [0; 8];
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            out.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a socket address from raw name bytes as the kernel wrote them; `None` for a
/// family other than IPv4/IPv6 or a short buffer.
#[inline]
pub fn read_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    if name.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([name[0], name[1]]) as i32;
    match family {
        libc::AF_INET if name.len() >= 8 => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let ip = Ipv4Addr::new(name[4], name[5], name[6], name[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if name.len() >= 28 => {
            let port = u16::from_be_bytes([name[2], name[3]]);
            let flow = u32::from_ne_bytes([name[4], name[5], name[6], name[7]]);
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&name[8..24]);
            let scope = u32::from_ne_bytes([name[24], name[25], name[26], name[27]]);
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(a: SocketAddr) {
        // SAFETY: all-zero is a valid sockaddr_in6.
        let mut buf: SockaddrBuf = unsafe { std::mem::zeroed() };
        let len = write_sockaddr(&a, &mut buf) as usize;
        // SAFETY: buf is plain data of SOCKADDR_LEN bytes.
        let bytes = unsafe { std::slice::from_raw_parts(&buf as *const _ as *const u8, SOCKADDR_LEN) };
        assert_eq!(read_sockaddr(&bytes[..len]), Some(a));
    }

    #[test]
    fn v4_and_v6_round_trip() {
        round_trip("192.0.2.7:40000".parse().unwrap());
        round_trip("[2001:db8::1]:5004".parse().unwrap());
        assert_eq!(read_sockaddr(&[0u8; 16]), None);
        assert_eq!(read_sockaddr(&[2u8]), None);
    }
}
