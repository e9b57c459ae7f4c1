//! The SIP driver: sockets, connections, the clock and the operations around the
//! sans-IO proxy cores.
//!
//! `--sip-threads N` core instances run side by side, each on its own thread with its
//! own UDP socket bound to the same address (`SO_REUSEPORT`, so the kernel spreads
//! sources over them) and its own transactions. A message belongs to the instance of its
//! Call-ID, or for a response to the instance named in our Via branch
//! ([`sip::steer`]); a thread that reads a message it does not own checks the sender's
//! rate limit and hands it to the owner's inbox. Each thread blocks only in `poll(2)` on
//! its socket and an eventfd, with a deadline at its core's next timer.
//!
//! Operations the cores ask for ([`Op`]: store, media anchoring, name resolution,
//! conference focus) are polled once on the core's thread: one that needs no waiting
//! (the relay in the same process, a local store) completes there and then, without a
//! task or a wake-up; one that waits (a relay, etcd or DNS round trip) has sent its
//! request by then and goes on as a task on the tokio runtime, bounded by its deadline.
//! Blocking backends (etcd's client, the focus's REST calls) run on the blocking pool
//! behind a semaphore. Completions come back through the owner's inbox and ring its
//! eventfd. Nothing on a core's thread waits for another machine.
//!
//! SIP over TCP runs on the same runtime: one task reads and frames each connection, one
//! writes it from a byte-bounded queue with a write timeout; connections are capped in
//! total and per source IP, closed when idle, and the accept loop backs off when the
//! process runs out of descriptors instead of spinning.

use super::anchor::MediaAnchor;
use super::core::{Action, Done, LiveLbs, Op, OpId, Proxy};
use super::focus::{Focus, JoinError};
use crate::error::Error;
use crate::net::admission::{out_of_resources, Admission, Ticket};
use crate::store::Store;
use crossbeam_channel::{bounded, unbounded, Receiver, Sender, TryRecvError, TrySendError};
use sip::message::{Message, ParseError, MAX_MESSAGE};
use sip::{steer, Peer, Transport};
use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

/// Limits of the driver.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages queued for one core instance before new ones are dropped and counted.
    pub queue: usize,
    /// TCP connections open at once; more are refused.
    pub max_connections: usize,
    /// TCP connections accepted from one source IP; more are refused, so one source
    /// cannot take every connection.
    pub max_connections_per_ip: usize,
    /// A TCP connection that carried nothing (not even a keep-alive) this long is closed.
    pub idle: Duration,
    /// How long connecting to a target may take before it counts as a transport error.
    pub connect_timeout: Duration,
    /// How long one write to a connection may take before the connection is closed.
    pub write_timeout: Duration,
    /// Bytes queued for one connection before more messages are dropped and counted.
    pub per_connection_bytes: usize,
    /// Blocking operations (store, focus) running at once; more wait for a slot within
    /// their deadline.
    pub blocking_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue: 65_536,
            max_connections: 4096,
            max_connections_per_ip: 256,
            idle: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            per_connection_bytes: 1 << 20,
            blocking_ops: 64,
        }
    }
}

/// Driver counters.
#[derive(Debug, Default)]
pub struct DriverStats {
    /// Messages dropped because a core's queue was full.
    pub queue_drops: AtomicU64,
    /// TCP connections accepted or opened.
    pub connections: AtomicU64,
    /// TCP connections open now.
    pub open: AtomicU64,
    /// TCP connections refused over a limit (total or per source IP).
    pub refused: AtomicU64,
    /// Streams closed because they did not frame as SIP.
    pub bad_streams: AtomicU64,
    /// Messages not sent (connection queue full or connection gone).
    pub send_drops: AtomicU64,
    /// Messages handed from the instance that read them to the one that owns them.
    pub steered: AtomicU64,
    /// Times the accept loop backed off because descriptors ran out.
    pub accept_backoffs: AtomicU64,
}

/// Where the proxy's operations are performed.
#[derive(Debug)]
pub struct Services {
    /// Credentials and registrations.
    pub store: Arc<dyn Store>,
    /// Media anchoring, if calls' media is anchored.
    pub anchor: Option<Arc<dyn MediaAnchor>>,
    /// The conference focus, if this proxy is one.
    pub focus: Option<Arc<Focus>>,
    /// Name resolution (RFC 3263).
    pub resolver: Arc<super::resolve::Resolver>,
    /// Slots for blocking operations.
    blocking: Arc<Semaphore>,
}

impl Services {
    /// The services, with at most `blocking_ops` blocking operations at once.
    pub fn new(
        store: Arc<dyn Store>,
        anchor: Option<Arc<dyn MediaAnchor>>,
        focus: Option<Arc<Focus>>,
        resolver: Arc<super::resolve::Resolver>,
        blocking_ops: usize,
    ) -> Self {
        Self { store, anchor, focus, resolver, blocking: Arc::new(Semaphore::new(blocking_ops.max(1))) }
    }

    /// Runs a store call: at once for a local store (see [`Store::is_local`]), else on
    /// the blocking pool.
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        if self.store.is_local() {
            return f(&*self.store);
        }
        let st = self.store.clone();
        self.blocking(move || f(&*st)).await
    }

    /// Runs `f` on the blocking pool once a slot is free.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let permit = self.blocking.clone().acquire_owned().await.map_err(|_| Error::Busy("shutting down".into()))?;
        tokio::task::spawn_blocking(move || {
            let r = f();
            drop(permit);
            r
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
    }

    /// Performs one operation.
    pub async fn run(self: Arc<Self>, op: Op) -> Result<Done, Error> {
        let no_anchor = || Error::Config("no media anchor configured".into());
        let no_focus = || Error::Config("no conference focus configured".into());
        match op {
            Op::Password { user, domain } => self.store(move |st| st.secret(&user, &domain)).await.map(Done::Password),
            Op::Bindings { aor, now } => self.store(move |st| st.bindings(&aor, now)).await.map(Done::Bindings),
            Op::SetBindings { aor, bindings } => {
                self.store(move |st| st.set_bindings(&aor, &bindings)).await.map(|()| Done::Stored)
            }
            Op::Resolve { uri } => match self.resolver.resolve(&uri).await {
                Ok(peers) => Ok(Done::Resolved(peers)),
                Err(super::resolve::ResolveError::NotFound) => Ok(Done::Resolved(Vec::new())),
                Err(e) => Err(Error::Invalid(e.to_string())),
            },
            Op::Offer { call_id, from_tag, to_tag, sdp } => {
                let a = self.anchor.clone().ok_or_else(no_anchor)?;
                a.offer(call_id, from_tag, to_tag, sdp).await.map(Done::Sdp)
            }
            Op::Answer { call_id, from_tag, to_tag, sdp } => {
                let a = self.anchor.clone().ok_or_else(no_anchor)?;
                a.answer(call_id, from_tag, to_tag, sdp).await.map(Done::Sdp)
            }
            Op::Delete { call_id } => {
                let a = self.anchor.clone().ok_or_else(no_anchor)?;
                a.delete(call_id).await.map(|()| Done::Deleted)
            }
            Op::Join { room, call_id, offer, in_dialog } => {
                let f = self.focus.clone().ok_or_else(no_focus)?;
                self.blocking(move || {
                    if in_dialog && !f.is_member(&call_id) {
                        return Ok(Done::Joined(Err(JoinError::NoDialog)));
                    }
                    Ok(Done::Joined(f.join(&room, &call_id, &offer)))
                })
                .await
            }
            Op::Leave { call_id } => {
                let f = self.focus.clone().ok_or_else(no_focus)?;
                self.blocking(move || Ok(Done::Left(f.leave(&call_id)))).await
            }
        }
    }
}

enum Event {
    /// A message for this instance; `admitted`: it passed the rate limit already.
    Message {
        peer: Peer,
        bytes: Vec<u8>,
        admitted: bool,
    },
    TransportError(Peer),
}

/// A core instance's inbox: bounded messages, completions (never dropped: their
/// number is bounded by the operations the core started), and the eventfd that wakes
/// its poll.
#[derive(Clone)]
struct Inbox {
    messages: Sender<Event>,
    done: Sender<(OpId, Result<Done, Error>)>,
    wake: Arc<OwnedFd>,
}

/// Wakes a core's `poll`.
fn ring(wake: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
    unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

impl Inbox {
    fn ring(&self) {
        ring(&self.wake);
    }

    fn offer(&self, stats: &DriverStats, e: Event) {
        match self.messages.try_send(e) {
            Ok(()) => self.ring(),
            Err(TrySendError::Full(_)) => {
                stats.queue_drops.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn complete(&self, id: OpId, r: Result<Done, Error>) {
        if self.done.send((id, r)).is_ok() {
            self.ring();
        }
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

/// What every thread and task of the driver shares.
struct Shared {
    inboxes: Vec<Inbox>,
    stats: Arc<DriverStats>,
    services: Arc<Services>,
    rt: tokio::runtime::Handle,
    tcp: Tcp,
    limits: Limits,
    /// Sources banned by a core's rate limit, enforced in the kernel on every UDP socket.
    bans: Mutex<super::early_drop::Bans>,
    /// Accepted TCP connections per source IP.
    accepted: Arc<Admission>,
    /// The live load balancers, as membership last said (`None`: not followed).
    peers: Arc<Peers>,
}

/// The live load balancers for the cores: the latest value only (a core that was busy
/// through two changes needs the last), read by each core between batches — an atomic
/// check per loop, no lock per request.
struct Peers {
    lbs: watch::Sender<Option<LiveLbs>>,
    wakes: Vec<Arc<OwnedFd>>,
}

impl Peers {
    fn set(&self, lbs: LiveLbs) {
        let changed = self.lbs.send_if_modified(|cur| {
            if cur.as_ref() == Some(&lbs) {
                return false;
            }
            *cur = Some(lbs);
            true
        });
        if changed {
            for w in &self.wakes {
                ring(w);
            }
        }
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("lbs", &*self.lbs.borrow()).finish_non_exhaustive()
    }
}

impl Shared {
    fn broadcast(&self, e: impl Fn() -> Event) {
        for i in &self.inboxes {
            i.offer(&self.stats, e());
        }
    }
}

/// A running driver.
#[derive(Debug, Clone)]
pub struct Handle {
    /// Counters.
    pub stats: Arc<DriverStats>,
    /// The address SIP is served on (UDP, and TCP when enabled).
    pub local: SocketAddr,
    peers: Arc<Peers>,
    rt: tokio::runtime::Handle,
}

impl Handle {
    /// Tells every core which load balancers are live (see [`Proxy::on_peers`]). Until
    /// the first call no flow is judged and no source is a load balancer.
    pub fn set_live_lbs(&self, lbs: LiveLbs) {
        self.peers.set(lbs);
    }

    /// Follows cluster membership: the live load balancers of every view
    /// ([`LiveLbs::from_view`]) go to the cores now and on each change, from a task on
    /// the driver's runtime that ends when the membership's sender is dropped. Views
    /// that change only loads or other roles wake no core.
    pub fn follow_membership(&self, mut view: watch::Receiver<crate::cluster::View>) {
        let peers = self.peers.clone();
        self.rt.spawn(async move {
            loop {
                let lbs = LiveLbs::from_view(&view.borrow_and_update());
                peers.set(lbs);
                if view.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// What to serve.
#[derive(Debug, Clone, Copy)]
pub struct Listen {
    /// The address (port 0 picks one).
    pub addr: SocketAddr,
    /// Serve TCP on the same address too.
    pub tcp: bool,
    /// Core instances (threads).
    pub threads: usize,
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_reuse_port(true)?;
    // Room for a burst while the core is busy: 4 MiB (the kernel caps it at rmem_max).
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    // A restart must not wait for the last run's connections in TIME_WAIT.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The UDP sockets (one per core instance, sharing the port) and the TCP listener on
/// the same port. With port 0 the kernel picks the UDP port, which TCP may have in use
/// (an outgoing connection's ephemeral port): then another port is picked, a few times.
fn bind_all(listen: Listen, n: usize) -> std::io::Result<(Vec<UdpSocket>, Option<std::net::TcpListener>)> {
    let tries = if listen.addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let first = udp_socket(listen.addr)?;
        let local = first.local_addr()?;
        let mut socks = vec![first];
        for _ in 1..n {
            socks.push(udp_socket(local)?);
        }
        if !listen.tcp {
            return Ok((socks, None));
        }
        match tcp_listener(local) {
            Ok(l) => return Ok((socks, Some(l))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}

/// Binds SIP on `listen` and serves it with one core per thread, built by `make_core`
/// from its index and the bound address, until the process ends. Operations run on `rt`.
pub fn spawn(
    listen: Listen,
    make_core: impl Fn(usize, SocketAddr) -> Proxy,
    services: Arc<Services>,
    limits: Limits,
    rt: tokio::runtime::Handle,
) -> std::io::Result<Handle> {
    let n = listen.threads.max(1);
    let (socks, tcp_listener) = bind_all(listen, n)?;
    let local = socks[0].local_addr()?;
    let stats = Arc::new(DriverStats::default());
    let mut inboxes = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..n {
        let (mtx, mrx) = bounded(limits.queue);
        let (dtx, drx) = unbounded();
        inboxes.push(Inbox { messages: mtx, done: dtx, wake: Arc::new(eventfd()?) });
        receivers.push((mrx, drx));
    }
    // Each core sends the requests it forwards over UDP from a socket of its own (on an
    // ephemeral port of the same address) and names it in their Via: callees' answers
    // arrive there, never queued behind whatever floods the public port.
    let clients = socks
        .iter()
        .map(|_| udp_socket(SocketAddr::new(local.ip(), 0)))
        .collect::<std::io::Result<Vec<UdpSocket>>>()?;
    let fds = socks.iter().chain(&clients).map(|s| s.as_raw_fd()).collect();
    let bans = Mutex::new(super::early_drop::Bans::new(fds));
    let peers =
        Arc::new(Peers { lbs: watch::Sender::new(None), wakes: inboxes.iter().map(|i| i.wake.clone()).collect() });
    let shared = Arc::new(Shared {
        inboxes,
        stats: stats.clone(),
        services,
        rt: rt.clone(),
        tcp: Tcp::default(),
        accepted: Admission::new(limits.max_connections, limits.max_connections_per_ip),
        limits,
        bans,
        peers: peers.clone(),
    });
    if let Some(l) = tcp_listener {
        let sh = shared.clone();
        let _guard = rt.enter();
        let l = tokio::net::TcpListener::from_std(l)?;
        rt.spawn(accept_loop(l, sh));
    }
    for (i, ((sock, client), (mrx, drx))) in socks.into_iter().zip(clients).zip(receivers).enumerate() {
        let mut core = make_core(i, local);
        core.set_response_addr(client.local_addr()?);
        let sh = shared.clone();
        std::thread::Builder::new().name(format!("hasp-sip-{i}")).spawn(move || {
            run_core(i, n, &mut core, [&sock, &client], &mrx, &drx, &sh);
        })?;
    }
    Ok(Handle { stats, local, peers, rt })
}

/// Datagrams read per wake-up before timers and the inbox get a turn.
const UDP_BATCH: usize = 256;

fn run_core(
    me: usize,
    n: usize,
    core: &mut Proxy,
    [udp, client]: [&UdpSocket; 2],
    messages: &Receiver<Event>,
    done: &Receiver<(OpId, Result<Done, Error>)>,
    sh: &Arc<Shared>,
) {
    let max_wait = Duration::from_millis(100);
    let mut buf = vec![0u8; 65_536];
    let mut actions = Vec::new();
    let mut ready = Vec::new();
    let wake = sh.inboxes[me].wake.clone();
    // Operations are first polled on this thread, and tokio's sockets and timers need
    // the runtime's context.
    let _rt = sh.rt.enter();
    let mut bans_checked = Instant::now();
    // Subscribing then reading misses nothing: a value set before is read here, one set
    // after shows as changed.
    let mut lbs = sh.peers.lbs.subscribe();
    if let Some(l) = lbs.borrow_and_update().clone() {
        core.on_peers(Instant::now(), l);
    }
    loop {
        let now = Instant::now();
        if now.duration_since(bans_checked) >= Duration::from_millis(200) {
            bans_checked = now;
            sh.bans.lock().unwrap_or_else(|e| e.into_inner()).expire(now);
        }
        let wait = core.next_deadline().map_or(max_wait, |d| d.saturating_duration_since(now).min(max_wait));
        let mut fds = [
            libc::pollfd { fd: udp.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: client.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // Round up so a deadline less than 1 ms away does not spin.
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of three pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
        // Membership first: what is read next is judged by it (an LB's requests skip
        // the rate limit).
        if lbs.has_changed().unwrap_or(false) {
            if let Some(l) = lbs.borrow_and_update().clone() {
                core.on_peers(Instant::now(), l);
            }
        }
        // Answers to our own requests first (their socket is never the flooded one), then
        // the public socket.
        for (sock, batch) in [(client, UDP_BATCH), (udp, UDP_BATCH)] {
            for _ in 0..batch {
                match sock.recv_from(&mut buf) {
                    Ok((len, src)) => {
                        let (peer, data, now) = (Peer::udp(src), &buf[..len], Instant::now());
                        let owner = steer::shard_of(data, n);
                        if owner == me {
                            core.on_message(now, peer, data);
                        } else if core.admit(now, peer, data) {
                            sh.stats.steered.fetch_add(1, Ordering::Relaxed);
                            let e = Event::Message { peer, bytes: data.to_vec(), admitted: true };
                            sh.inboxes[owner].offer(&sh.stats, e);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // ICMP errors from earlier sends surface here on Linux: not fatal.
                    Err(_) => continue,
                }
            }
        }
        if fds[1].revents != 0 {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a valid u64 from our eventfd.
            unsafe { libc::read(wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
        while let Ok((id, r)) = done.try_recv() {
            core.on_completion(Instant::now(), id, r);
        }
        loop {
            match messages.try_recv() {
                Ok(Event::Message { peer, bytes, admitted: true }) => core.on_admitted(Instant::now(), peer, &bytes),
                Ok(Event::Message { peer, bytes, admitted: false }) => core.on_message(Instant::now(), peer, &bytes),
                Ok(Event::TransportError(peer)) => core.on_transport_error(Instant::now(), peer),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        let now = Instant::now();
        if core.next_deadline().is_some_and(|d| d <= now) {
            core.on_tick(now);
        }
        // Sending may fail a transaction at once, which may produce more to send (each
        // round consumes a target, so this ends).
        loop {
            core.drain_into(&mut actions);
            if actions.is_empty() {
                break;
            }
            let mut failed = Vec::new();
            for a in actions.drain(..) {
                match a {
                    Action::Send(peer, bytes) => match peer.transport {
                        Transport::Udp => {
                            // Linux reports an earlier ICMP "port unreachable" on the next
                            // call on an unconnected UDP socket, which then sends nothing:
                            // try once more.
                            // Requests go out from this core's own socket (named in
                            // their Via), responses from the public one.
                            let from = if bytes.starts_with(b"SIP/") { udp } else { client };
                            if send_udp(from, &bytes, peer.addr).is_err() && send_udp(from, &bytes, peer.addr).is_err()
                            {
                                // Failing twice is this message's own failure: its
                                // transaction fails at once rather than at Timer B.
                                sh.stats.send_drops.fetch_add(1, Ordering::Relaxed);
                                failed.push(peer);
                            }
                        }
                        Transport::Tcp => sh.tcp.send(sh, peer.addr, bytes),
                    },
                    Action::Ban { ip, until } => {
                        tracing::warn!(%ip, secs = until.saturating_duration_since(Instant::now()).as_secs(), "SIP source over its rate: banned");
                        sh.bans.lock().unwrap_or_else(|e| e.into_inner()).ban(ip, until);
                    }
                    Action::Start { id, op, deadline } => {
                        // Polled once here: an operation that needs no waiting (the relay
                        // in this process, a local store) completes at once, without a
                        // task or a wake-up; one that waits (a network round trip) has
                        // sent its request and goes on as a task.
                        let mut fut = Box::pin(sh.services.clone().run(op));
                        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                            Poll::Ready(r) => ready.push((id, r)),
                            Poll::Pending => {
                                let inbox = sh.inboxes[me].clone();
                                sh.rt.spawn(async move {
                                    let at = tokio::time::Instant::from_std(deadline);
                                    let r = match tokio::time::timeout_at(at, fut).await {
                                        Ok(r) => r,
                                        Err(_) => Err(Error::Busy("deadline passed".into())),
                                    };
                                    inbox.complete(id, r);
                                });
                            }
                        }
                    }
                }
            }
            for p in failed {
                core.on_transport_error(Instant::now(), p);
            }
            for (id, r) in ready.drain(..) {
                core.on_completion(Instant::now(), id, r);
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

/// One connection's writer side, as the table holds it.
struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes queued and not yet written (the queue's bound).
    queued: Arc<AtomicUsize>,
}

impl Conn {
    fn push(&self, bytes: Vec<u8>, limit: usize, stats: &DriverStats) {
        let len = bytes.len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > limit {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            stats.send_drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(bytes).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            stats.send_drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// SIP over TCP: the connections by remote address (a response, or a request to a
/// contact that registered over TCP, reuses the connection it came on), and the
/// accepted ones per source IP. The locks are held for a map operation, never across IO.
#[derive(Default)]
struct Tcp {
    conns: Mutex<HashMap<SocketAddr, Conn>>,
    next_id: AtomicU64,
}

impl Tcp {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `bytes` on the connection to `addr`, opening one (as a task) if none.
    fn send(&self, sh: &Arc<Shared>, addr: SocketAddr, bytes: Vec<u8>) {
        let mut map = self.conns();
        if let Some(c) = map.get(&addr) {
            c.push(bytes, sh.limits.per_connection_bytes, &sh.stats);
            return;
        }
        if map.len() >= sh.limits.max_connections {
            drop(map);
            sh.stats.refused.fetch_add(1, Ordering::Relaxed);
            sh.broadcast(|| Event::TransportError(Peer::tcp(addr)));
            return;
        }
        // The writer queue exists at once, so messages sent while connecting wait in it.
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Conn { id, tx, queued: Arc::default() };
        conn.push(bytes, sh.limits.per_connection_bytes, &sh.stats);
        let queued = conn.queued.clone();
        map.insert(addr, conn);
        drop(map);
        let sh2 = sh.clone();
        sh.rt.spawn(async move {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(sh2.limits.connect_timeout, connect).await {
                Ok(Ok(s)) => serve_connection(s, addr, id, rx, queued, sh2, None).await,
                _ => {
                    sh2.tcp.forget(addr, id);
                    sh2.broadcast(|| Event::TransportError(Peer::tcp(addr)));
                }
            }
        });
    }

    /// Removes the connection `id` to `addr` (not a newer one to the same address).
    fn forget(&self, addr: SocketAddr, id: u64) {
        let mut map = self.conns();
        if map.get(&addr).is_some_and(|c| c.id == id) {
            map.remove(&addr);
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, sh: Arc<Shared>) {
    loop {
        let (s, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) if out_of_resources(&e) => {
                sh.stats.accept_backoffs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "SIP over TCP: accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => continue,
        };
        // The total counts the connections we opened too (the table holds both).
        let room = sh.tcp.conns().len() < sh.limits.max_connections;
        let Some(ticket) = room.then(|| sh.accepted.admit(remote.ip())).flatten() else {
            sh.stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(s);
            continue;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let id = sh.tcp.next_id.fetch_add(1, Ordering::Relaxed);
        let queued: Arc<AtomicUsize> = Arc::default();
        sh.tcp.conns().insert(remote, Conn { id, tx, queued: queued.clone() });
        tokio::spawn(serve_connection(s, remote, id, rx, queued, sh.clone(), Some(ticket)));
    }
}

/// Runs one connection: a writer task drains its queue, this task reads and frames.
/// Whatever ends it (EOF, error, idle, bad framing) removes it from the table and tells
/// the cores, whose transactions to that peer fail at once.
async fn serve_connection(
    s: tokio::net::TcpStream,
    remote: SocketAddr,
    id: u64,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    sh: Arc<Shared>,
    // An accepted connection's place in the per-IP counts, given back when it ends.
    ticket: Option<Ticket>,
) {
    sh.stats.connections.fetch_add(1, Ordering::Relaxed);
    sh.stats.open.fetch_add(1, Ordering::Relaxed);
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.into_split();
    let write_timeout = sh.limits.write_timeout;
    let writer = tokio::spawn(async move {
        while let Some(b) = out.recv().await {
            let len = b.len();
            let ok = matches!(tokio::time::timeout(write_timeout, w.write_all(&b)).await, Ok(Ok(())));
            queued.fetch_sub(len, Ordering::Relaxed);
            if !ok {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    let peer = Peer::tcp(remote);
    let n = sh.inboxes.len();
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16_384];
    'read: loop {
        let read = tokio::time::timeout(sh.limits.idle, r.read(&mut chunk)).await;
        let len = match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(len)) => len,
        };
        buf.extend_from_slice(&chunk[..len]);
        loop {
            // RFC 5626 keep-alive: a double CRLF ping is answered with a CRLF pong; stray
            // CRLFs between messages are skipped.
            let lead = buf.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
            if lead > 0 {
                if buf[..lead].windows(4).any(|w| w == b"\r\n\r\n") {
                    if let Some(c) = sh.tcp.conns().get(&remote) {
                        c.push(b"\r\n".to_vec(), sh.limits.per_connection_bytes, &sh.stats);
                    }
                }
                buf.drain(..lead);
            }
            if buf.is_empty() {
                break;
            }
            match Message::parse(&buf, true) {
                Ok((_, used)) => {
                    let msg: Vec<u8> = buf.drain(..used).collect();
                    let owner = steer::shard_of(&msg, n);
                    sh.inboxes[owner].offer(&sh.stats, Event::Message { peer, bytes: msg, admitted: false });
                }
                Err(ParseError::Incomplete) if buf.len() <= 2 * MAX_MESSAGE => break,
                Err(_) => {
                    // The stream cannot be framed past a broken message: close it
                    // (counted); the client reconnects and retransmits.
                    sh.stats.bad_streams.fetch_add(1, Ordering::Relaxed);
                    break 'read;
                }
            }
        }
    }
    sh.tcp.forget(remote, id);
    drop(ticket);
    sh.broadcast(|| Event::TransportError(peer));
    // The table's sender is gone, so the writer ends once it has written what is queued.
    let _ = writer.await;
    sh.stats.open.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Member, Role, View};
    use crate::proxy::core::ProxyConfig;
    use crate::store::{memory, Binding};

    fn view(lbs: &[SocketAddr]) -> View {
        let members: Vec<Member> = lbs
            .iter()
            .enumerate()
            .map(|(i, a)| Member { sip: Some(a.to_string()), ..Member::new(Role::Lb, format!("lb{i}")) })
            .collect();
        View { revision: lbs.len() as u64, members: members.into() }
    }

    fn invite(proxy: SocketAddr, caller: SocketAddr, n: u32) -> String {
        format!(
            "INVITE sip:carol@unit.test SIP/2.0\r\nVia: SIP/2.0/UDP {caller};branch=z9hG4bKdrv{n}\r\nFrom: <sip:a@elsewhere.test>;tag=a{n}\r\nTo: <sip:carol@unit.test>\r\nCall-ID: drv-{n}@{proxy}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    }

    /// The first line of the next datagram on `s` that is not a 100, if one comes soon.
    fn next_line(s: &UdpSocket) -> Option<String> {
        let mut buf = [0u8; 8192];
        loop {
            let (n, _) = s.recv_from(&mut buf).ok()?;
            let line = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string();
            if !line.starts_with("SIP/2.0 100") {
                return Some(line);
            }
        }
    }

    /// Membership reaches the cores on their own threads: while the LB holding carol's
    /// flow is live her INVITE goes to it; once membership drops it, callers get 430
    /// at once.
    #[test]
    fn the_cores_follow_membership_and_answer_430_once_the_flows_lb_is_gone() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let lb = UdpSocket::bind("127.0.0.1:0").unwrap();
        let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&lb, &caller] {
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        }
        let lb_addr = lb.local_addr().unwrap();
        let store = Arc::new(memory::Memory::new(memory::Limits::default()));
        let now = crate::store::unix_now();
        let flow = Binding {
            contact: "sip:carol@10.0.0.7:5060;ob".into(),
            expires_at: now + 600,
            path: vec![format!("<sip:tok1@{lb_addr};lr;ob>")],
            call_id: "r".into(),
            cseq: 1,
            instance: Some("<urn:uuid:1>".into()),
            reg_id: Some(1),
            ..Binding::default()
        };
        store.set_bindings("carol@unit.test", &[flow]).unwrap();
        let resolver = Arc::new(
            super::super::resolve::Resolver::new(&super::super::resolve::ResolverConfig {
                nameservers: vec!["127.0.0.1:9".parse().unwrap()],
                ..Default::default()
            })
            .unwrap(),
        );
        let services = Arc::new(Services::new(store, None, None, resolver, 4));
        let make_core = |_, local| {
            Proxy::new(
                ProxyConfig {
                    domain: "unit.test".into(),
                    local,
                    nonce_secret: "s".into(),
                    record_route: None,
                    rate_limit: 0,
                    ban: Duration::ZERO,
                    trusted: Vec::new(),
                },
                false,
            )
        };
        let listen = Listen { addr: "127.0.0.1:0".parse().unwrap(), tcp: false, threads: 2 };
        let h = spawn(listen, make_core, services, Limits::default(), rt.handle().clone()).unwrap();
        let (tx, rx) = watch::channel(view(&[lb_addr]));
        h.follow_membership(rx);
        let caller_addr = caller.local_addr().unwrap();
        caller.send_to(invite(h.local, caller_addr, 1).as_bytes(), h.local).unwrap();
        let at_lb = next_line(&lb).expect("the INVITE reaches the live LB");
        assert_eq!(at_lb, "INVITE sip:carol@10.0.0.7:5060;ob SIP/2.0");
        tx.send(view(&[])).unwrap();
        // The cores pick the change up within a loop turn: poll with new INVITEs,
        // bounded.
        let started = Instant::now();
        let mut n = 2;
        loop {
            caller.send_to(invite(h.local, caller_addr, n).as_bytes(), h.local).unwrap();
            match next_line(&caller) {
                Some(l) if l == "SIP/2.0 430 Flow Failed" => break,
                _ => {}
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never 430 after the LB left");
            n += 1;
        }
        // An LB coming back is tried again.
        tx.send(view(&[lb_addr])).unwrap();
        let started = Instant::now();
        loop {
            n += 1;
            caller.send_to(invite(h.local, caller_addr, n).as_bytes(), h.local).unwrap();
            // Retransmissions of the first INVITE may come too: look for this one.
            let mut buf = [0u8; 8192];
            let mut got = false;
            while let Ok((len, _)) = lb.recv_from(&mut buf) {
                got |= String::from_utf8_lossy(&buf[..len]).contains(&format!("Call-ID: drv-{n}@"));
            }
            if got {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "never forwarded after the LB came back");
        }
    }
}
