//! The NG listeners (UDP and TCP on one address) and the retransmission cache.

use super::bencode::{decode, DecodeError};
use super::{error_reply, frame, handle_command, split_cookie};
use crate::net::admission::Admission;
use crate::relay::calls::Calls;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;

/// Largest NG message accepted on TCP before the connection is closed.
pub const MAX_TCP_MESSAGE: usize = 1 << 20;
/// Requests handled at once; UDP requests beyond this are dropped and counted.
const MAX_IN_FLIGHT: usize = 256;
/// TCP connections open at once, and from one source IP (so one source cannot take
/// every slot: others still get in).
pub const MAX_TCP_CONNECTIONS: usize = 1024;
/// See [`MAX_TCP_CONNECTIONS`].
pub const MAX_TCP_PER_IP: usize = 32;
/// A TCP connection that sends nothing for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(120);
/// Answers the cache holds, and their bytes in total.
const CACHE_ENTRIES: usize = 16_384;
const CACHE_BYTES: usize = 32 << 20;

type CacheKey = (SocketAddr, Vec<u8>);

/// Answers by (peer, cookie), so a retransmitted request gets the same answer instead
/// of a second allocation, and another peer that happens to use the same cookie gets
/// its own. Bounded in entries, in bytes and in age.
#[derive(Debug)]
pub struct ReplyCache {
    map: HashMap<CacheKey, (Instant, Vec<u8>)>,
    order: VecDeque<CacheKey>,
    cap: usize,
    max_bytes: usize,
    bytes: usize,
    ttl: Duration,
}

impl ReplyCache {
    /// A cache of at most `cap` answers and `max_bytes` bytes (keys included), each
    /// kept `ttl`.
    pub fn new(cap: usize, max_bytes: usize, ttl: Duration) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), cap, max_bytes, bytes: 0, ttl }
    }

    /// The cached answer to `cookie` from `peer`, if fresh.
    pub fn get(&self, peer: SocketAddr, cookie: &[u8], now: Instant) -> Option<&[u8]> {
        self.map
            .get(&(peer, cookie.to_vec()))
            .filter(|(t, _)| now.duration_since(*t) < self.ttl)
            .map(|(_, r)| r.as_slice())
    }

    /// Bytes held (answers and cookies).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn evict_front(&mut self) -> bool {
        let Some(k) = self.order.pop_front() else { return false };
        if let Some((_, r)) = self.map.remove(&k) {
            self.bytes -= r.len() + k.1.len();
        }
        true
    }

    /// Remembers an answer. One larger than the whole budget is not kept.
    pub fn put(&mut self, peer: SocketAddr, cookie: &[u8], reply: Vec<u8>, now: Instant) {
        let size = reply.len() + cookie.len();
        if size > self.max_bytes {
            return;
        }
        let key = (peer, cookie.to_vec());
        if let Some((_, old)) = self.map.remove(&key) {
            // Replaced in place; its place in `order` stays (evicted a little early).
            self.bytes -= old.len() + cookie.len();
        }
        while self.order.len() >= self.cap
            || self.bytes + size > self.max_bytes
            || self
                .order
                .front()
                .is_some_and(|k| self.map.get(k).is_none_or(|(t, _)| now.duration_since(*t) >= self.ttl))
        {
            if !self.evict_front() {
                break;
            }
        }
        self.bytes += size;
        if self.map.insert(key.clone(), (now, reply)).is_none() {
            self.order.push_back(key);
        }
    }
}

/// Counters of the NG listener.
#[derive(Debug, Default)]
pub struct NgCounters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Retransmissions answered from the cache.
    pub retransmissions: AtomicU64,
    /// Messages dropped: no cookie, or overload.
    pub dropped: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

struct Shared {
    calls: Arc<Calls>,
    cache: Mutex<ReplyCache>,
    /// Open TCP connections, per source IP and in total.
    conns: Arc<Admission>,
    counters: Arc<NgCounters>,
    permits: Semaphore,
}

/// Handles one message from `peer`; `None` when it cannot be answered (no cookie).
async fn handle(shared: &Arc<Shared>, peer: SocketAddr, msg: Vec<u8>) -> Option<Vec<u8>> {
    let Some((cookie, body)) = split_cookie(&msg) else {
        shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let cookie = cookie.to_vec();
    if let Some(r) = shared.cache.lock().unwrap_or_else(|e| e.into_inner()).get(peer, &cookie, Instant::now()) {
        shared.counters.retransmissions.fetch_add(1, Ordering::Relaxed);
        return Some(r.to_vec());
    }
    let reply = match decode(body) {
        Ok((v, _)) => {
            let s = shared.clone();
            tokio::task::spawn_blocking(move || handle_command(&s.calls, &v))
                .await
                .unwrap_or_else(|_| error_reply("internal error"))
        }
        Err(DecodeError::Incomplete) => error_reply("Incomplete message"),
        Err(e) => error_reply(&format!("Could not decode dictionary: {e}")),
    };
    if reply.get("result").and_then(|v| v.as_str()) == Some("error") {
        shared.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let out = frame(&cookie, &reply);
    shared.cache.lock().unwrap_or_else(|e| e.into_inner()).put(peer, &cookie, out.clone(), Instant::now());
    Some(out)
}

/// UDP and TCP on one address. With port 0 the kernel picks the UDP port, and TCP may
/// already hold that number (an outgoing connection's ephemeral port): pick again.
async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..if addr.port() == 0 { 20 } else { 1 } {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

/// Serves NG on UDP and TCP at `addr` until the task is dropped. Returns the bound
/// address (useful with port 0) once both listeners are up.
pub async fn serve(addr: SocketAddr, calls: Arc<Calls>) -> std::io::Result<(SocketAddr, Arc<NgCounters>)> {
    let (udp, tcp) = bind_pair(addr).await?;
    let bound = udp.local_addr()?;
    let counters = Arc::new(NgCounters::default());
    let shared = Arc::new(Shared {
        calls,
        cache: Mutex::new(ReplyCache::new(CACHE_ENTRIES, CACHE_BYTES, Duration::from_secs(30))),
        conns: Admission::new(MAX_TCP_CONNECTIONS, MAX_TCP_PER_IP),
        counters: counters.clone(),
        permits: Semaphore::new(MAX_IN_FLIGHT),
    });
    let udp = Arc::new(udp);
    let s = shared.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf).await else { continue };
            let Ok(permit) = s.permits.try_acquire() else {
                s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            permit.forget();
            let (s2, udp2, msg) = (s.clone(), udp.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                if let Some(r) = handle(&s2, peer, msg).await {
                    let _ = udp2.send_to(&r, peer).await;
                }
                s2.permits.add_permits(1);
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let (conn, peer) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors (or another transient error): back off rather
                    // than spin on a listener that stays readable.
                    tracing::warn!(error = %e, "NG TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = shared.conns.admit(peer.ip()) else {
                shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %peer.ip(), "NG TCP connection refused: too many open");
                continue;
            };
            let s = shared.clone();
            tokio::spawn(async move {
                tcp_conn(s, conn, peer).await;
                drop(slot);
            });
        }
    });
    Ok((bound, counters))
}

async fn tcp_conn(s: Arc<Shared>, mut conn: tokio::net::TcpStream, peer: SocketAddr) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16384];
    loop {
        // Answer every complete message in the buffer.
        loop {
            let start = buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
            buf.drain(..start);
            if buf.is_empty() {
                break;
            }
            let Some((cookie, body)) = split_cookie(&buf) else {
                if buf.len() > 256 {
                    return; // No cookie in sight: not NG.
                }
                break;
            };
            let used = match decode(body) {
                Ok((_, n)) => cookie.len() + 1 + n,
                Err(DecodeError::Incomplete) => break,
                // The stream cannot be resynchronised: answer, then close.
                Err(_) => {
                    let msg = buf.clone();
                    if let Some(r) = handle(&s, peer, msg).await {
                        let _ = conn.write_all(&r).await;
                    }
                    return;
                }
            };
            let msg: Vec<u8> = buf.drain(..used).collect();
            if let Some(r) = handle(&s, peer, msg).await {
                if conn.write_all(&r).await.is_err() {
                    return;
                }
            }
        }
        if buf.len() > MAX_TCP_MESSAGE {
            s.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match tokio::time::timeout(TCP_IDLE, conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                tracing::debug!(peer = %peer.ip(), "NG TCP connection idle, closed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_expires() {
        let t = Instant::now();
        let p: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut c = ReplyCache::new(2, 1 << 20, Duration::from_secs(30));
        c.put(p, b"a", b"1".to_vec(), t);
        c.put(p, b"b", b"2".to_vec(), t);
        c.put(p, b"c", b"3".to_vec(), t);
        assert_eq!(c.get(p, b"a", t), None, "oldest evicted");
        assert_eq!(c.get(p, b"c", t), Some(&b"3"[..]));
        assert_eq!(c.get(p, b"c", t + Duration::from_secs(31)), None, "expired");
    }

    #[test]
    fn cache_is_bounded_in_bytes_and_keyed_by_peer() {
        let t = Instant::now();
        let (p, q): (SocketAddr, SocketAddr) = ("127.0.0.1:5000".parse().unwrap(), "127.0.0.2:5000".parse().unwrap());
        let mut c = ReplyCache::new(1000, 100, Duration::from_secs(30));
        c.put(p, b"k", vec![1; 40], t);
        c.put(q, b"k", vec![2; 40], t);
        assert_eq!(c.get(p, b"k", t), Some(&[1u8; 40][..]));
        assert_eq!(c.get(q, b"k", t), Some(&[2u8; 40][..]), "same cookie, other peer: its own answer");
        c.put(p, b"z", vec![3; 40], t);
        assert!(c.bytes() <= 100, "{}", c.bytes());
        assert_eq!(c.get(p, b"k", t), None, "oldest evicted to stay within the byte budget");
        assert_eq!(c.get(p, b"z", t).map(<[u8]>::len), Some(40));
        c.put(p, b"huge", vec![0; 1000], t);
        assert_eq!(c.get(p, b"huge", t), None, "larger than the budget: not kept");
        // Replacing an entry keeps the count exact.
        c.put(p, b"z", vec![4; 10], t);
        assert_eq!(c.bytes(), 41 + 11);
    }
}
