//! The SIP driver: sockets, connections and the clock around the sans-IO proxy core.
//!
//! One core thread owns the [`Proxy`] and takes events from a bounded channel: datagrams
//! from the UDP reader, messages framed off TCP connections, connection failures. Its
//! only blocking is the channel receive, with a deadline at the proxy's next timer. Each
//! TCP connection (accepted, or opened to reach a target) has a reader thread that frames
//! messages by Content-Length and a writer thread fed by a bounded queue, so a slow peer
//! never stalls the core. Connections are keyed by remote address: a response, or a
//! request to a contact that registered over TCP, reuses the connection it came on.

use super::message::{Message, ParseError, MAX_MESSAGE};
use super::proxy::{Peer, Proxy, Transport};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits of the driver.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Events (messages) queued for the core before new ones are dropped and counted.
    pub queue: usize,
    /// TCP connections open at once; more are refused.
    pub max_connections: usize,
    /// A TCP connection that carried nothing (not even a keep-alive) this long is closed.
    pub idle: Duration,
    /// How long connecting to a target may take before it counts as a transport error.
    pub connect_timeout: Duration,
    /// Messages queued for one connection before more are dropped.
    pub per_connection_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue: 65_536,
            max_connections: 4096,
            idle: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(2),
            per_connection_queue: 1024,
        }
    }
}

/// Driver counters.
#[derive(Debug, Default)]
pub struct DriverStats {
    /// Messages dropped because the core's queue was full.
    pub queue_drops: AtomicU64,
    /// TCP connections accepted or opened.
    pub connections: AtomicU64,
    /// TCP connections refused over the limit.
    pub refused: AtomicU64,
    /// Streams closed because they did not frame as SIP.
    pub bad_streams: AtomicU64,
    /// Messages not sent (connection queue full or connection gone).
    pub send_drops: AtomicU64,
}

enum Event {
    Message(Peer, Vec<u8>),
    TransportError(Peer),
}

type Conns = Arc<Mutex<HashMap<SocketAddr, Sender<Vec<u8>>>>>;

/// A running driver.
#[derive(Debug, Clone)]
pub struct Handle {
    /// Counters.
    pub stats: Arc<DriverStats>,
}

/// Serves SIP over UDP on `udp` and, when given, TCP on `tcp` (normally the same
/// address) until the process ends.
pub fn spawn(udp: UdpSocket, tcp: Option<TcpListener>, mut proxy: Proxy, limits: Limits) -> std::io::Result<Handle> {
    let (tx, rx) = bounded::<Event>(limits.queue);
    let stats = Arc::new(DriverStats::default());
    let conns: Conns = Arc::default();
    // UDP reader.
    let reader = udp.try_clone()?;
    let (t, st) = (tx.clone(), stats.clone());
    std::thread::Builder::new().name("hasp-sip-udp".into()).spawn(move || {
        let mut buf = vec![0u8; 65_536];
        loop {
            match reader.recv_from(&mut buf) {
                Ok((n, src)) => offer(&t, &st, Event::Message(Peer::udp(src), buf[..n].to_vec())),
                // ICMP errors from earlier sends surface here on Linux: not fatal.
                Err(_) => continue,
            }
        }
    })?;
    if let Some(listener) = tcp {
        let (t, st, c) = (tx.clone(), stats.clone(), conns.clone());
        std::thread::Builder::new().name("hasp-sip-tcp".into()).spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                let Ok(remote) = s.peer_addr() else { continue };
                if c.lock().unwrap_or_else(|e| e.into_inner()).len() >= limits.max_connections {
                    st.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = s.shutdown(Shutdown::Both);
                    continue;
                }
                let _ = start_connection(s, remote, &c, &t, &st, limits);
            }
        })?;
    }
    let (c, st) = (conns.clone(), stats.clone());
    std::thread::Builder::new().name("hasp-sip".into()).spawn(move || {
        core(&mut proxy, &rx, &tx, &udp, &c, &st, limits);
    })?;
    Ok(Handle { stats })
}

fn offer(tx: &Sender<Event>, stats: &DriverStats, e: Event) {
    if let Err(TrySendError::Full(_)) = tx.try_send(e) {
        stats.queue_drops.fetch_add(1, Ordering::Relaxed);
    }
}

fn core(
    proxy: &mut Proxy,
    rx: &Receiver<Event>,
    tx: &Sender<Event>,
    udp: &UdpSocket,
    conns: &Conns,
    stats: &Arc<DriverStats>,
    limits: Limits,
) {
    let max_wait = Duration::from_millis(20);
    loop {
        let now = Instant::now();
        let wait = proxy.next_deadline().map_or(max_wait, |d| d.saturating_duration_since(now).min(max_wait));
        match rx.recv_timeout(wait) {
            Ok(Event::Message(peer, bytes)) => proxy.on_message(Instant::now(), peer, &bytes),
            Ok(Event::TransportError(peer)) => proxy.on_transport_error(Instant::now(), peer),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if proxy.next_deadline().is_some_and(|d| d <= now) {
            proxy.on_tick(now);
        }
        for (peer, bytes) in proxy.drain() {
            match peer.transport {
                Transport::Udp => {
                    // Linux reports an earlier ICMP "port unreachable" on the next call on
                    // an unconnected UDP socket, which then sends nothing: try once more.
                    if udp.send_to(&bytes, peer.addr).is_err() && udp.send_to(&bytes, peer.addr).is_err() {
                        // Failing twice is this message's own failure: its transaction
                        // fails at once rather than at Timer B.
                        stats.send_drops.fetch_add(1, Ordering::Relaxed);
                        offer(tx, stats, Event::TransportError(peer));
                    }
                }
                Transport::Tcp => send_tcp(peer.addr, bytes, conns, tx, stats, limits),
            }
        }
    }
}

/// Queues `bytes` on the connection to `addr`, opening one (in the background) if none.
fn send_tcp(addr: SocketAddr, bytes: Vec<u8>, conns: &Conns, tx: &Sender<Event>, stats: &Arc<DriverStats>, l: Limits) {
    let mut map = conns.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(w) = map.get(&addr) {
        if w.try_send(bytes).is_err() {
            stats.send_drops.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    if map.len() >= l.max_connections {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        offer(tx, stats, Event::TransportError(Peer::tcp(addr)));
        return;
    }
    // The writer queue exists at once so that messages sent while connecting wait in it.
    let (wtx, wrx) = bounded::<Vec<u8>>(l.per_connection_queue);
    let _ = wtx.try_send(bytes);
    map.insert(addr, wtx);
    drop(map);
    let (c, t, st) = (conns.clone(), tx.clone(), stats.clone());
    let spawned = std::thread::Builder::new().name("hasp-sip-connect".into()).spawn(move || {
        match TcpStream::connect_timeout(&addr, l.connect_timeout) {
            Ok(s) => {
                let _ = run_connection(s, addr, wrx, &c, &t, &st, l);
            }
            Err(_) => {
                c.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
                offer(&t, &st, Event::TransportError(Peer::tcp(addr)));
            }
        }
    });
    if spawned.is_err() {
        conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
        offer(tx, stats, Event::TransportError(Peer::tcp(addr)));
    }
}

fn start_connection(
    s: TcpStream,
    remote: SocketAddr,
    conns: &Conns,
    tx: &Sender<Event>,
    stats: &Arc<DriverStats>,
    l: Limits,
) -> std::io::Result<()> {
    let (wtx, wrx) = bounded::<Vec<u8>>(l.per_connection_queue);
    conns.lock().unwrap_or_else(|e| e.into_inner()).insert(remote, wtx);
    let (c, t, st) = (conns.clone(), tx.clone(), stats.clone());
    std::thread::Builder::new().name("hasp-sip-conn".into()).spawn(move || {
        let _ = run_connection(s, remote, wrx, &c, &t, &st, l);
    })?;
    Ok(())
}

/// Runs one connection: a writer thread drains its queue, this thread reads and frames.
/// Whatever ends it (EOF, error, idle, bad framing) removes it from the table.
fn run_connection(
    s: TcpStream,
    remote: SocketAddr,
    out: Receiver<Vec<u8>>,
    conns: &Conns,
    tx: &Sender<Event>,
    stats: &Arc<DriverStats>,
    l: Limits,
) -> std::io::Result<()> {
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(l.idle))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::Builder::new().name("hasp-sip-write".into()).spawn(move || {
        for b in out.iter() {
            if w.write_all(&b).is_err() {
                break;
            }
        }
        let _ = w.shutdown(Shutdown::Both);
    })?;
    let peer = Peer::tcp(remote);
    let mut r = s;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16_384];
    let mut reply_pong = false;
    'read: loop {
        let n = match r.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            // RFC 5626 keep-alive: a double CRLF ping is answered with a CRLF pong; stray
            // CRLFs between messages are skipped.
            let lead = buf.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
            if lead > 0 {
                if buf[..lead].windows(4).any(|w| w == b"\r\n\r\n") {
                    reply_pong = true;
                }
                buf.drain(..lead);
            }
            if reply_pong {
                reply_pong = false;
                if let Some(w) = conns.lock().unwrap_or_else(|e| e.into_inner()).get(&remote) {
                    let _ = w.try_send(b"\r\n".to_vec());
                }
            }
            if buf.is_empty() {
                break;
            }
            match Message::parse(&buf, true) {
                Ok((_, used)) => {
                    let msg: Vec<u8> = buf.drain(..used).collect();
                    offer(tx, stats, Event::Message(peer, msg));
                }
                Err(ParseError::Incomplete) if buf.len() <= 2 * MAX_MESSAGE => break,
                Err(_) => {
                    // The stream cannot be framed past a broken message: close it
                    // (counted); the client reconnects and retransmits.
                    stats.bad_streams.fetch_add(1, Ordering::Relaxed);
                    break 'read;
                }
            }
        }
    }
    conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&remote);
    offer(tx, stats, Event::TransportError(peer));
    let _ = writer.join();
    Ok(())
}
