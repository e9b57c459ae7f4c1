//! Drops the datagrams of banned sources in the kernel, before they are queued on a SIP
//! socket: a classic BPF socket filter (`SO_ATTACH_FILTER`) on every SIP UDP socket
//! compares the IPv4 source address with the ban list and drops a match. A flood from a
//! banned address then costs the kernel's receive path only — it never fills the
//! socket's buffer in front of legitimate datagrams, and the proxy never reads it.
//!
//! Classic BPF needs no eBPF toolchain, map or privilege beyond owning the socket, and
//! the filter is replaced atomically whenever the list changes (bans are rare events).
//! The list is a linear compare, two instructions per address, so it is capped at
//! [`MAX_KERNEL_BANS`] addresses (the cBPF limit is 4,096 instructions); bans beyond
//! that, and IPv6 sources, are dropped in user space before parsing instead.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;
use std::time::Instant;

/// IPv4 addresses the kernel filter holds at most.
pub const MAX_KERNEL_BANS: usize = 1024;

/// `SKF_NET_OFF`: loads relative to the network header (a UDP socket filter otherwise
/// starts at the UDP header).
const SKF_NET_OFF: i32 = -0x100000;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter dropping datagrams from `ips` (and accepting everything else).
pub fn program(ips: &[Ipv4Addr]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut p = Vec::with_capacity(2 + 2 * ips.len());
    // The IPv4 source address: bytes 12-15 of the IP header (loaded in host order).
    p.push(insn(LD_W_ABS, 0, 0, (SKF_NET_OFF + 12) as u32));
    for ip in ips.iter().take(MAX_KERNEL_BANS) {
        // Equal: fall through to "drop"; else skip it.
        p.push(insn(JEQ_K, 0, 1, u32::from(*ip)));
        p.push(insn(RET_K, 0, 0, 0));
    }
    p.push(insn(RET_K, 0, 0, u32::MAX));
    p
}

/// Replaces the filter of socket `fd` with `prog`.
pub fn attach(fd: RawFd, prog: &[libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: fprog points at `prog`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The bans in force and the sockets that enforce them, shared by the SIP threads.
#[derive(Debug, Default)]
pub struct Bans {
    until: HashMap<IpAddr, Instant>,
    fds: Vec<RawFd>,
    /// Filters that could not be attached (counted, logged once).
    pub attach_errors: u64,
}

impl Bans {
    /// Enforces bans on these sockets (they outlive the driver: the process's SIP sockets).
    pub fn new(fds: Vec<RawFd>) -> Self {
        Self { until: HashMap::new(), fds, attach_errors: 0 }
    }

    /// Bans `ip` until `until`.
    pub fn ban(&mut self, ip: IpAddr, until: Instant) {
        let was = self.until.insert(ip, until);
        if was.is_none() {
            self.apply();
        }
    }

    /// Lifts the bans that ended by `now`.
    pub fn expire(&mut self, now: Instant) {
        let before = self.until.len();
        self.until.retain(|_, u| *u > now);
        if self.until.len() != before {
            self.apply();
        }
    }

    /// Bans in force.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Whether none is in force.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    fn apply(&mut self) {
        let mut v4: Vec<(Instant, Ipv4Addr)> = self
            .until
            .iter()
            .filter_map(|(ip, u)| match ip {
                IpAddr::V4(a) => Some((*u, *a)),
                IpAddr::V6(_) => None,
            })
            .collect();
        // Over the cap, the bans that last longest are the kernel's.
        v4.sort_unstable_by(|a, b| b.cmp(a));
        let ips: Vec<Ipv4Addr> = v4.into_iter().map(|(_, a)| a).take(MAX_KERNEL_BANS).collect();
        let prog = program(&ips);
        for fd in &self.fds {
            if let Err(e) = attach(*fd, &prog) {
                if self.attach_errors == 0 {
                    tracing::warn!(error = %e, "SIP ban filter not attached; banned sources are dropped in user space");
                }
                self.attach_errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    #[test]
    fn the_program_drops_listed_sources_and_accepts_the_rest() {
        let p = program(&["192.0.2.7".parse().unwrap(), "198.51.100.1".parse().unwrap()]);
        assert_eq!(p.len(), 1 + 2 * 2 + 1);
        assert_eq!(p[1].k, 0xc000_0207);
        assert_eq!((p[2].k, p[5].k), (0, u32::MAX));
        let many: Vec<Ipv4Addr> = (0..5000u32).map(Ipv4Addr::from).collect();
        assert_eq!(program(&many).len(), 2 + 2 * MAX_KERNEL_BANS, "capped under cBPF's 4,096");
    }

    /// On a real socket: datagrams from a banned loopback address are dropped by the
    /// kernel (counted as socket drops), others arrive, and lifting the ban lets the
    /// banned address through again.
    #[test]
    fn a_banned_source_is_dropped_by_the_kernel_until_the_ban_ends() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = rx.local_addr().unwrap();
        let banned = UdpSocket::bind("127.0.0.2:0").unwrap();
        let fine = UdpSocket::bind("127.0.0.3:0").unwrap();
        let mut bans = Bans::new(vec![rx.as_raw_fd()]);
        let t0 = Instant::now();
        bans.ban("127.0.0.2".parse().unwrap(), t0 + Duration::from_secs(60));
        assert_eq!(bans.attach_errors, 0);
        for _ in 0..10 {
            banned.send_to(b"flood", to).unwrap();
        }
        fine.send_to(b"hello", to).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], fine.local_addr().unwrap()), "the flood never queued");
        bans.expire(t0 + Duration::from_secs(61));
        assert!(bans.is_empty());
        banned.send_to(b"again", to).unwrap();
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"again");
    }
}
