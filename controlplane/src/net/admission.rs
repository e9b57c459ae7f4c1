//! Connections open per source IP and in total, for every TCP listener (HTTP APIs, NG
//! over TCP, SIP over TCP): one source at its cap leaves room for the others. A
//! [`Ticket`] holds one connection's place and gives it back on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The counts and caps of one listener.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection's place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    /// At most `max_total` connections, `max_per_ip` of them from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self { max_total, max_per_ip, inner: Mutex::default() })
    }

    /// A place for a connection from `ip`, or `None` when a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mine = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max_total || mine >= self.max_per_ip {
            return None;
        }
        c.total += 1;
        c.per_ip.insert(ip, mine + 1);
        Some(Ticket { admission: self.clone(), ip })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        // Sources with no connection are forgotten: the map holds only open ones.
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Whether an accept error means "out of descriptors or memory": the listener stays
/// readable, so retrying at once would spin; back off instead.
pub fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_at_its_cap_leaves_room_for_others_until_the_total_cap() {
        let a = Admission::new(3, 2);
        let (x, y, z): (IpAddr, IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap(), "192.0.2.3".parse().unwrap());
        let t1 = a.admit(x).unwrap();
        let _t2 = a.admit(x).unwrap();
        assert!(a.admit(x).is_none(), "x is at its cap");
        let _t3 = a.admit(y).unwrap();
        assert!(a.admit(z).is_none(), "the total cap");
        drop(t1);
        assert!(a.admit(z).is_some(), "a closed connection gives its place back");
    }

    #[test]
    fn a_source_whose_connections_all_closed_is_forgotten() {
        let a = Admission::new(10, 10);
        let t = a.admit("198.51.100.7".parse().unwrap()).unwrap();
        drop(t);
        let c = a.inner.lock().unwrap();
        assert_eq!((c.total, c.per_ip.len()), (0, 0));
    }
}
