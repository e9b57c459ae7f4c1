//! The NG listeners (UDP and TCP on one address) and the retransmission cache.

use super::bencode::{decode, DecodeError};
use super::{error_reply, frame, handle_command, split_cookie};
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

/// Answers by cookie, so a retransmitted request gets the same answer instead of a
/// second allocation. Bounded in entries and age.
#[derive(Debug)]
pub struct ReplyCache {
    map: HashMap<Vec<u8>, (Instant, Vec<u8>)>,
    order: VecDeque<Vec<u8>>,
    cap: usize,
    ttl: Duration,
}

impl ReplyCache {
    /// A cache of at most `cap` answers, each kept `ttl`.
    pub fn new(cap: usize, ttl: Duration) -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), cap, ttl }
    }

    /// The cached answer to `cookie`, if fresh.
    pub fn get(&self, cookie: &[u8], now: Instant) -> Option<&[u8]> {
        self.map.get(cookie).filter(|(t, _)| now.duration_since(*t) < self.ttl).map(|(_, r)| r.as_slice())
    }

    /// Remembers an answer.
    pub fn put(&mut self, cookie: &[u8], reply: Vec<u8>, now: Instant) {
        while self.order.len() >= self.cap
            || self
                .order
                .front()
                .is_some_and(|c| self.map.get(c).is_some_and(|(t, _)| now.duration_since(*t) >= self.ttl))
        {
            match self.order.pop_front() {
                Some(c) => {
                    self.map.remove(&c);
                }
                None => break,
            }
        }
        if self.map.insert(cookie.to_vec(), (now, reply)).is_none() {
            self.order.push_back(cookie.to_vec());
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
    counters: Arc<NgCounters>,
    permits: Semaphore,
}

/// Handles one message; `None` when it cannot be answered (no cookie).
async fn handle(shared: &Arc<Shared>, msg: Vec<u8>) -> Option<Vec<u8>> {
    let Some((cookie, body)) = split_cookie(&msg) else {
        shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let cookie = cookie.to_vec();
    if let Some(r) = shared.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&cookie, Instant::now()) {
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
    shared.cache.lock().unwrap_or_else(|e| e.into_inner()).put(&cookie, out.clone(), Instant::now());
    Some(out)
}

/// Serves NG on UDP and TCP at `addr` until the task is dropped. Returns the bound
/// address (useful with port 0) once both listeners are up.
pub async fn serve(addr: SocketAddr, calls: Arc<Calls>) -> std::io::Result<(SocketAddr, Arc<NgCounters>)> {
    let udp = UdpSocket::bind(addr).await?;
    let bound = udp.local_addr()?;
    let tcp = TcpListener::bind(bound).await?;
    let counters = Arc::new(NgCounters::default());
    let shared = Arc::new(Shared {
        calls,
        cache: Mutex::new(ReplyCache::new(16_384, Duration::from_secs(30))),
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
                if let Some(r) = handle(&s2, msg).await {
                    let _ = udp2.send_to(&r, peer).await;
                }
                s2.permits.add_permits(1);
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = tcp.accept().await else { continue };
            let s = shared.clone();
            tokio::spawn(async move { tcp_conn(s, conn).await });
        }
    });
    Ok((bound, counters))
}

async fn tcp_conn(s: Arc<Shared>, mut conn: tokio::net::TcpStream) {
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
                    if let Some(r) = handle(&s, msg).await {
                        let _ = conn.write_all(&r).await;
                    }
                    return;
                }
            };
            let msg: Vec<u8> = buf.drain(..used).collect();
            if let Some(r) = handle(&s, msg).await {
                if conn.write_all(&r).await.is_err() {
                    return;
                }
            }
        }
        if buf.len() > MAX_TCP_MESSAGE {
            s.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_expires() {
        let t = Instant::now();
        let mut c = ReplyCache::new(2, Duration::from_secs(30));
        c.put(b"a", b"1".to_vec(), t);
        c.put(b"b", b"2".to_vec(), t);
        c.put(b"c", b"3".to_vec(), t);
        assert_eq!(c.get(b"a", t), None, "oldest evicted");
        assert_eq!(c.get(b"c", t), Some(&b"3"[..]));
        assert_eq!(c.get(b"c", t + Duration::from_secs(31)), None, "expired");
    }
}
