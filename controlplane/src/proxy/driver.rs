//! The SIP driver: sockets, connections and the clock around the sans-IO proxy core.
//!
//! One core thread owns the [`Proxy`] and the UDP socket: it blocks in `poll(2)` on the
//! socket and an eventfd, with a deadline at the proxy's next timer, then reads every
//! datagram waiting (no thread hand-off per datagram on the UDP path). Messages framed
//! off TCP connections and connection failures come through a bounded channel whose
//! senders ring the eventfd. Each
//! TCP connection (accepted, or opened to reach a target) has a reader thread that frames
//! messages by Content-Length and a writer thread fed by a bounded queue, so a slow peer
//! never stalls the core. Connections are keyed by remote address: a response, or a
//! request to a contact that registered over TCP, reuses the connection it came on.

use super::core::Proxy;
use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use sip::message::{Message, ParseError, MAX_MESSAGE};
use sip::{Peer, Transport};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    /// TCP connections open now.
    pub open: AtomicU64,
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

/// The core's inbox for events from other threads: a bounded channel and the eventfd
/// that wakes the core's poll.
#[derive(Clone)]
struct Inbox {
    tx: Sender<Event>,
    wake: Arc<OwnedFd>,
}

impl Inbox {
    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

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
    let tx = Inbox { tx, wake: Arc::new(eventfd()?) };
    let stats = Arc::new(DriverStats::default());
    let conns: Conns = Arc::default();
    udp.set_nonblocking(true)?;
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

fn offer(tx: &Inbox, stats: &DriverStats, e: Event) {
    match tx.tx.try_send(e) {
        Ok(()) => tx.ring(),
        Err(TrySendError::Full(_)) => {
            stats.queue_drops.fetch_add(1, Ordering::Relaxed);
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}

/// Datagrams read per wake-up before timers and the inbox get a turn.
const UDP_BATCH: usize = 256;

fn core(
    proxy: &mut Proxy,
    rx: &Receiver<Event>,
    tx: &Inbox,
    udp: &UdpSocket,
    conns: &Conns,
    stats: &Arc<DriverStats>,
    limits: Limits,
) {
    let max_wait = Duration::from_millis(100);
    let mut buf = vec![0u8; 65_536];
    loop {
        let now = Instant::now();
        let wait = proxy.next_deadline().map_or(max_wait, |d| d.saturating_duration_since(now).min(max_wait));
        let mut fds = [
            libc::pollfd { fd: udp.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: tx.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // Round up so a deadline less than 1 ms away does not spin.
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of two pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        for _ in 0..UDP_BATCH {
            match udp.recv_from(&mut buf) {
                Ok((n, src)) => proxy.on_message(Instant::now(), Peer::udp(src), &buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP errors from earlier sends surface here on Linux: not fatal.
                Err(_) => continue,
            }
        }
        if fds[1].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a valid u64 from our eventfd.
            unsafe { libc::read(tx.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        loop {
            match rx.try_recv() {
                Ok(Event::Message(peer, bytes)) => proxy.on_message(Instant::now(), peer, &bytes),
                Ok(Event::TransportError(peer)) => proxy.on_transport_error(Instant::now(), peer),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
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
                    if send_udp(udp, &bytes, peer.addr).is_err() && send_udp(udp, &bytes, peer.addr).is_err() {
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

/// Sends a datagram on the non-blocking socket, waiting up to 10 ms for room in a full
/// send buffer rather than dropping it.
fn send_udp(udp: &UdpSocket, bytes: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    match udp.send_to(bytes, to) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            let mut fd = libc::pollfd { fd: udp.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut fd, 1, 10) };
            udp.send_to(bytes, to)
        }
        r => r,
    }
}

/// Queues `bytes` on the connection to `addr`, opening one (in the background) if none.
fn send_tcp(addr: SocketAddr, bytes: Vec<u8>, conns: &Conns, tx: &Inbox, stats: &Arc<DriverStats>, l: Limits) {
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
    tx: &Inbox,
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
    tx: &Inbox,
    stats: &Arc<DriverStats>,
    l: Limits,
) -> std::io::Result<()> {
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let r = serve_connection(s, remote, out, conns, tx, stats, l);
    stats.open.fetch_sub(1, Ordering::Relaxed);
    r
}

fn serve_connection(
    s: TcpStream,
    remote: SocketAddr,
    out: Receiver<Vec<u8>>,
    conns: &Conns,
    tx: &Inbox,
    stats: &Arc<DriverStats>,
    l: Limits,
) -> std::io::Result<()> {
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
