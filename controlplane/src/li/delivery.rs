//! Delivery of X2/X3 PDUs to mediation functions over TCP.
//!
//! One writer thread per destination owns its connection: it reconnects with
//! exponential backoff, sends keep-alives when idle, and drains a byte-bounded queue.
//! Producers (the tap dispatcher, the X2 hook) only append to that queue; past the
//! bound a PDU is dropped and counted. Nothing here can slow the packet path, which
//! only ever `try_send`s into the data plane's tap channel.

use super::tasks::Destination;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often an idle connection sends a keep-alive PDU.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Counters of one destination.
#[derive(Debug, Default, Serialize)]
pub struct DestStats {
    /// PDUs written to the socket.
    pub delivered: AtomicU64,
    /// PDUs dropped because the queue was at its bound.
    pub dropped: AtomicU64,
    /// Bytes waiting.
    pub queued_bytes: AtomicUsize,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// Keep-alives sent.
    pub keepalives: AtomicU64,
    /// Currently connected.
    pub connected: AtomicBool,
}

struct Dest {
    queue: Mutex<VecDeque<Vec<u8>>>,
    ready: Condvar,
    stats: DestStats,
    bound: usize,
    stop: AtomicBool,
}

impl Dest {
    /// Queues PDUs in order, dropping (and counting) those past the bound; one lock and
    /// one wake-up per batch.
    fn push(&self, pdus: impl IntoIterator<Item = Vec<u8>>) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut queued = self.stats.queued_bytes.load(Relaxed);
        let mut added = 0;
        for pdu in pdus {
            if queued + pdu.len() > self.bound {
                self.stats.dropped.fetch_add(1, Relaxed);
                continue;
            }
            queued += pdu.len();
            added += pdu.len();
            q.push_back(pdu);
        }
        if added > 0 {
            self.stats.queued_bytes.fetch_add(added, Relaxed);
            self.ready.notify_one();
        }
    }
}

/// The set of destinations, created on first use.
#[derive(Clone)]
pub struct Delivery {
    dests: Arc<Mutex<HashMap<Destination, Arc<Dest>>>>,
    bound: usize,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("bound", &self.bound).finish()
    }
}

impl Delivery {
    /// Each destination buffers at most `bound` bytes while its mediation function is
    /// slow or away.
    pub fn new(bound: usize) -> Self {
        Self { dests: Arc::new(Mutex::new(HashMap::new())), bound }
    }

    fn dest(&self, addr: &Destination) -> Arc<Dest> {
        let mut m = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = m.get(addr) {
            return d.clone();
        }
        let addr = addr.clone();
        m.entry(addr.clone())
            .or_insert_with(|| {
                let d = Arc::new(Dest {
                    queue: Mutex::new(VecDeque::new()),
                    ready: Condvar::new(),
                    stats: DestStats::default(),
                    bound: self.bound,
                    stop: AtomicBool::new(false),
                });
                let w = d.clone();
                let _ = std::thread::Builder::new().name("hasp-li-x".into()).spawn(move || writer(addr, w));
                d
            })
            .clone()
    }

    /// Queues a PDU for `addr`.
    pub fn send(&self, addr: &Destination, pdu: Vec<u8>) {
        self.dest(addr).push([pdu]);
    }

    /// Queues several PDUs for `addr`, in order.
    pub fn send_many(&self, addr: &Destination, pdus: Vec<Vec<u8>>) {
        self.dest(addr).push(pdus);
    }

    /// Stops destinations no task uses any more (their queued PDUs are discarded).
    pub fn retain(&self, keep: &[Destination]) {
        let mut m = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|a, d| {
            let k = keep.contains(a);
            if !k {
                d.stop.store(true, Relaxed);
                d.ready.notify_all();
            }
            k
        });
    }

    /// Per-destination counters.
    pub fn stats(&self) -> Vec<(SocketAddr, serde_json::Value)> {
        let m = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> =
            m.iter().map(|(a, d)| (a.tcp, serde_json::to_value(&d.stats).unwrap_or_default())).collect();
        v.sort_by_key(|(a, _)| *a);
        v
    }
}

/// A connection to a mediation function: plain TCP or TLS over it.
type Conn = Box<dyn Write + Send>;

fn connect(dest: &Destination) -> std::io::Result<Conn> {
    let c = TcpStream::connect_timeout(&dest.tcp, Duration::from_secs(1))?;
    let _ = c.set_nodelay(true);
    let _ = c.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let Some(tls) = &dest.tls else { return Ok(Box::new(c)) };
    let cfg = tls.client_config().map_err(std::io::Error::other)?;
    let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, c);
    // Complete the handshake now, so a bad certificate counts as a failed connection.
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(Box::new(s))
}

fn writer(dest: Destination, d: Arc<Dest>) {
    super::lower_priority();
    let mut backoff = BACKOFF_MIN;
    let mut conn: Option<Conn> = None;
    let mut last_write = Instant::now();
    while !d.stop.load(Relaxed) {
        let Some(c) = conn.as_mut() else {
            match connect(&dest) {
                Ok(c) => {
                    conn = Some(c);
                    d.stats.connected.store(true, Relaxed);
                    backoff = BACKOFF_MIN;
                    last_write = Instant::now();
                }
                Err(_) => {
                    d.stats.connect_failures.fetch_add(1, Relaxed);
                    // Wait out the backoff, but wake for a stop.
                    let q = d.queue.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = d.ready.wait_timeout_while(q, backoff, |_| !d.stop.load(Relaxed));
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            continue;
        };
        // Take everything queued (or wait until something is, or a keep-alive is due).
        let batch: Vec<Vec<u8>> = {
            let mut q = d.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.is_empty() {
                let wait = KEEPALIVE.saturating_sub(last_write.elapsed());
                q = d.ready.wait_timeout(q, wait).map(|(q, _)| q).unwrap_or_else(|e| e.into_inner().0);
            }
            q.drain(..).collect()
        };
        let mut out = Vec::with_capacity(batch.iter().map(Vec::len).sum::<usize>() + 40);
        if batch.is_empty() {
            if last_write.elapsed() < KEEPALIVE {
                continue;
            }
            super::pdu::encode_keepalive(&mut out, false);
        } else {
            for p in &batch {
                out.extend_from_slice(p);
            }
        }
        match c.write_all(&out).and_then(|()| c.flush()) {
            Ok(()) => {
                last_write = Instant::now();
                let bytes: usize = batch.iter().map(Vec::len).sum();
                d.stats.queued_bytes.fetch_sub(bytes, Relaxed);
                if batch.is_empty() {
                    d.stats.keepalives.fetch_add(1, Relaxed);
                } else {
                    d.stats.delivered.fetch_add(batch.len() as u64, Relaxed);
                }
            }
            Err(_) => {
                // The connection failed: keep the batch, in order, for the next one.
                conn = None;
                d.stats.connected.store(false, Relaxed);
                let mut q = d.queue.lock().unwrap_or_else(|e| e.into_inner());
                for p in batch.into_iter().rev() {
                    q.push_front(p);
                }
            }
        }
    }
}

/// Largest pcap file LI writes; packets past it are counted, not written.
pub const PCAP_MAX_BYTES: u64 = 1 << 30;

/// Writes intercepted packets as a pcap file (LINKTYPE_RAW: IPv4/UDP headers are
/// synthesised from the recorded addresses), readable by tshark and Wireshark. The file
/// is private (mode 0600, also when it existed) and stops growing at
/// [`PCAP_MAX_BYTES`].
#[derive(Debug)]
pub struct PcapWriter {
    file: std::io::BufWriter<std::fs::File>,
    bytes: u64,
    dropped: u64,
}

impl PcapWriter {
    /// Creates (or empties) the file and writes the global header.
    pub fn create(path: &str) -> std::io::Result<Self> {
        let f = super::audit::private_file().write(true).create(true).truncate(true).open(path)?;
        super::audit::make_private(&f)?;
        let mut w = Self { file: std::io::BufWriter::new(f), bytes: 0, dropped: 0 };
        w.header()?;
        Ok(w)
    }

    /// Opens the file of a task reinstated at start-up: appends to what it holds (a
    /// restart must not wipe what was captured), or starts it if it is gone or empty.
    pub fn reopen(path: &str) -> std::io::Result<Self> {
        let f = super::audit::private_file().append(true).create(true).open(path)?;
        super::audit::make_private(&f)?;
        let bytes = f.metadata()?.len();
        let mut w = Self { file: std::io::BufWriter::new(f), bytes, dropped: 0 };
        if bytes == 0 {
            w.header()?;
        }
        Ok(w)
    }

    fn header(&mut self) -> std::io::Result<()> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&65535u32.to_le_bytes());
        h.extend_from_slice(&101u32.to_le_bytes()); // LINKTYPE_RAW
        self.file.write_all(&h)?;
        self.file.flush()?;
        self.bytes += h.len() as u64;
        Ok(())
    }

    /// Packets not written because the file reached its bound.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Appends one UDP packet.
    pub fn write(&mut self, at: std::time::SystemTime, src: SocketAddr, dst: SocketAddr, data: &[u8]) {
        let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else { return };
        let t = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let total = 28 + data.len();
        if self.bytes + 16 + total as u64 > PCAP_MAX_BYTES {
            self.dropped += 1;
            return;
        }
        self.bytes += 16 + total as u64;
        let mut p = Vec::with_capacity(16 + total);
        p.extend_from_slice(&(t.as_secs() as u32).to_le_bytes());
        p.extend_from_slice(&t.subsec_micros().to_le_bytes());
        p.extend_from_slice(&(total as u32).to_le_bytes());
        p.extend_from_slice(&(total as u32).to_le_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&s.ip().octets());
        ip[16..20].copy_from_slice(&d.ip().octets());
        let sum = ip.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]]) as u32).sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
        p.extend_from_slice(&ip);
        p.extend_from_slice(&s.port().to_be_bytes());
        p.extend_from_slice(&d.port().to_be_bytes());
        p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(data);
        let _ = self.file.write_all(&p);
        let _ = self.file.flush();
    }
}
