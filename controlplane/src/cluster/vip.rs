//! The shared contact address (report §5.2.3): the LBs elect a holder through the
//! membership backend ([`super::Membership::campaign`]); the holder adds the address to
//! its interface and announces it with gratuitous ARP, so clients and routers on the
//! segment send to it at once; when the holder dies another takes it as soon as the
//! election lease ends.
//!
//! The address is added with a lifetime (`valid_lft`) of a few seconds and refreshed
//! every second while held: a holder that is SIGKILLed (the host lives on) cannot
//! remove it, so the kernel does, instead of answering ARP for a dead process
//! forever. Addresses are changed with iproute2's `ip` (one process per second while
//! holding; a netlink crate would add a dependency for three calls). IPv4 only: IPv6
//! would announce with unsolicited neighbour advertisements instead.

use super::Membership;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The address, its prefix length, and the interface to put it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    /// The shared address.
    pub addr: Ipv4Addr,
    /// Its prefix length on the interface.
    pub prefix: u8,
    /// The interface.
    pub dev: String,
}

/// Errors of the shared address.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// The `--vip` value is not `IPV4[/PREFIX]`.
    #[error("--vip {0:?}: expected an IPv4 address, optionally /PREFIX (e.g. 192.0.2.100/24)")]
    Spec(String),
    /// No interface was given and none routes to the address.
    #[error("no interface for {0}: pass --vip-dev")]
    NoDev(Ipv4Addr),
    /// Adding, refreshing or removing the address failed.
    #[error("ip {0}")]
    Ip(String),
    /// Sending the gratuitous ARP failed.
    #[error("gratuitous ARP on {dev}: {err}")]
    Arp {
        /// The interface.
        dev: String,
        /// What failed.
        err: std::io::Error,
    },
}

/// How long the kernel keeps the address when the holder stops refreshing it.
const LIFETIME_SECS: u32 = 3;
/// How often the holder refreshes the address.
const REFRESH: Duration = Duration::from_secs(1);

impl Vip {
    /// Parses `IPV4[/PREFIX]` (prefix 32 if absent); `dev`: the interface, or the one
    /// the kernel routes the address through.
    pub fn parse(spec: &str, dev: Option<&str>) -> Result<Self, VipError> {
        let (a, p) = spec.split_once('/').unwrap_or((spec, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|_| VipError::Spec(spec.into()))?;
        let prefix: u8 = p.parse().ok().filter(|p| *p <= 32).ok_or_else(|| VipError::Spec(spec.into()))?;
        let dev = match dev {
            Some(d) => d.to_string(),
            None => route_dev(addr).ok_or(VipError::NoDev(addr))?,
        };
        Ok(Self { addr, prefix, dev })
    }

    fn ip(&self, verb: &str, lifetime: bool) -> Result<(), VipError> {
        let cidr = format!("{}/{}", self.addr, self.prefix);
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["-4", "addr", verb, &cidr, "dev", &self.dev]);
        if lifetime {
            let l = LIFETIME_SECS.to_string();
            cmd.args(["valid_lft", &l, "preferred_lft", &l]);
        }
        let out = cmd.output().map_err(|e| VipError::Ip(format!("{verb}: {e}")))?;
        let err = String::from_utf8_lossy(&out.stderr);
        // Removing an address that is not there is what we wanted anyway.
        if out.status.success() || (verb == "del" && err.contains("Cannot assign")) {
            return Ok(());
        }
        Err(VipError::Ip(format!("{verb} {cidr} dev {}: {}", self.dev, err.trim())))
    }

    /// Adds (or refreshes) the address with its short lifetime.
    pub fn add(&self) -> Result<(), VipError> {
        self.ip("replace", true)
    }

    /// Removes the address (absent is fine).
    pub fn remove(&self) -> Result<(), VipError> {
        self.ip("del", false)
    }

    /// Announces the address on its interface: one gratuitous ARP request and one reply
    /// (some hosts heed only one kind), from the interface's MAC.
    pub fn announce(&self) -> Result<(), VipError> {
        let arp = |err| VipError::Arp { dev: self.dev.clone(), err };
        let mac = interface_mac(&self.dev).map_err(arp)?;
        for op in [1u16, 2] {
            send_arp(&self.dev, mac, self.addr, op).map_err(arp)?;
        }
        Ok(())
    }
}

/// The interface the kernel routes `addr` through (`ip -o route get`).
fn route_dev(addr: Ipv4Addr) -> Option<String> {
    let out = std::process::Command::new("ip").args(["-o", "route", "get", &addr.to_string()]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "dev")?;
    words.next().map(str::to_string)
}

fn interface_mac(dev: &str) -> std::io::Result<[u8; 6]> {
    if dev.contains('/') || dev.contains("..") {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad interface name"));
    }
    let text = std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "no MAC address"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad MAC"))?;
    }
    Ok(mac)
}

/// The ARP packet (RFC 826) announcing `ip` at `mac`: sender and target address both
/// `ip`, as gratuitous ARP has it. `op` 1 = request, 2 = reply.
pub fn arp_packet(mac: [u8; 6], ip: Ipv4Addr, op: u16) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    // Target hardware address: zero in a request, broadcast in a reply.
    if op == 2 {
        p[18..24].copy_from_slice(&[0xff; 6]);
    }
    p[24..28].copy_from_slice(&ip.octets());
    p
}

fn send_arp(dev: &str, mac: [u8; 6], ip: Ipv4Addr, op: u16) -> std::io::Result<()> {
    let name = std::ffi::CString::new(dev).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket call; the descriptor is closed below on every path.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, proto as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto;
    sa.sll_ifindex = ifindex as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let pkt = arp_packet(mac, ip, op);
    // SAFETY: pointers to live buffers of the given lengths.
    let n = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(err);
    }
    Ok(())
}

/// Campaigns for the address as `id` and holds it while elected, until `stop`
/// resolves; then resigns and removes it. `holding` mirrors whether this process
/// holds it (for metrics and the API). The election's lease is `ttl`: a dead holder
/// is replaced about that long after its last renewal.
pub async fn hold(
    membership: Arc<dyn Membership>,
    id: String,
    vip: Vip,
    ttl: Duration,
    holding: Arc<AtomicBool>,
    stop: impl std::future::Future<Output = ()>,
) {
    // Whatever an earlier run of this process left behind is not ours until elected.
    let v = vip.clone();
    let _ = tokio::task::spawn_blocking(move || v.remove()).await;
    let campaign = membership.campaign(&format!("vip-{}", vip.addr), &id, ttl);
    let mut held = campaign.held.clone();
    tokio::pin!(stop);
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now_held = *held.borrow_and_update();
        let was = holding.swap(now_held, Ordering::Relaxed);
        if now_held != was {
            let v = vip.clone();
            let r = tokio::task::spawn_blocking(
                move || {
                    if now_held {
                        v.add().and_then(|_| v.announce())
                    } else {
                        v.remove()
                    }
                },
            )
            .await;
            match r {
                Ok(Ok(())) => tracing::info!(vip = %vip.addr, dev = %vip.dev, held = now_held, "shared address"),
                Ok(Err(e)) => tracing::error!(error = %e, "shared address"),
                Err(e) => tracing::error!(error = %e, "shared address task"),
            }
        }
        tokio::select! {
            r = held.changed() => if r.is_err() { break },
            _ = refresh.tick() => {
                if holding.load(Ordering::Relaxed) {
                    let v = vip.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || v.add()).await {
                        tracing::error!(error = %e, "refreshing the shared address");
                    }
                }
            }
            _ = &mut stop => break,
        }
    }
    drop(campaign);
    holding.store(false, Ordering::Relaxed);
    let v = vip.clone();
    let _ = tokio::task::spawn_blocking(move || v.remove()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_names_the_address_as_sender_and_target() {
        let mac = [2, 0, 0, 0, 0, 7];
        let ip = Ipv4Addr::new(192, 0, 2, 100);
        let req = arp_packet(mac, ip, 1);
        assert_eq!(&req[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&req[8..14], &mac);
        assert_eq!(&req[14..18], &[192, 0, 2, 100]);
        assert_eq!(&req[18..24], &[0; 6]);
        assert_eq!(&req[24..28], &[192, 0, 2, 100]);
        let rep = arp_packet(mac, ip, 2);
        assert_eq!(&rep[6..8], &[0, 2]);
        assert_eq!(&rep[18..24], &[0xff; 6]);
    }

    #[test]
    fn vip_specs_parse_or_fail_clearly() {
        let v = Vip::parse("192.0.2.100/24", Some("eth9")).unwrap();
        assert_eq!((v.addr, v.prefix, v.dev.as_str()), (Ipv4Addr::new(192, 0, 2, 100), 24, "eth9"));
        assert_eq!(Vip::parse("192.0.2.100", Some("eth9")).unwrap().prefix, 32);
        for bad in ["", "192.0.2.100/33", "2001:db8::1", "x/24"] {
            assert!(matches!(Vip::parse(bad, Some("eth9")), Err(VipError::Spec(_))), "{bad}");
        }
    }
}
