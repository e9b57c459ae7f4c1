//! The stateful proxy core (RFC 3261 §16): transactions, routing, registrar dispatch,
//! media anchoring. It takes datagrams and the time and queues datagrams to send; the
//! socket and the clock live in the driver ([`super::driver`]).

use super::registrar;
use crate::proxy::anchor::MediaAnchor;
use crate::store::Store;
use sip::digest::Nonces;
use sip::message::{aor_of, host_port, uri_of, Message, StartLine};
use sip::transaction::{client_key, server_key, Output, State, Transaction};
use sip::{Peer, Transport, MAX_UDP_PAYLOAD};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The domain it is registrar and proxy for.
    pub domain: String,
    /// Its own address as put in Via and Record-Route.
    pub local: SocketAddr,
    /// Secret for stateless nonces (shared by proxies that share a store).
    pub nonce_secret: String,
    /// `HOST[:PORT]` put in Record-Route instead of `local`: a name (or address) that
    /// reaches every proxy of the cluster, so in-dialog requests can be served by any.
    pub record_route: Option<String>,
    /// Requests per second accepted from one source address (bursts of twice that);
    /// more are dropped and counted. 0: no limit.
    pub rate_limit: u32,
}

/// Counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyStats {
    /// Datagrams that did not parse.
    pub malformed: u64,
    /// Requests answered 4xx/5xx by the proxy itself.
    pub rejected: u64,
    /// Requests forwarded.
    pub forwarded: u64,
    /// REGISTERs handled.
    pub registers: u64,
    /// Requests dropped by the per-source rate limit.
    pub rate_limited: u64,
}

/// The proxy's counters, shared with the metrics endpoint (written by the proxy's one
/// thread, read by the API).
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// Messages that did not parse.
    pub malformed: AtomicU64,
    /// Requests answered 4xx/5xx by the proxy itself.
    pub rejected: AtomicU64,
    /// Requests forwarded (each target tried counts).
    pub forwarded: AtomicU64,
    /// REGISTERs handled.
    pub registers: AtomicU64,
    /// Requests dropped by the per-source rate limit.
    pub rate_limited: AtomicU64,
    /// Transactions in progress (gauge).
    pub transactions: AtomicU64,
}

/// A token bucket per source address: `rate` requests per second, bursts of twice that.
#[derive(Debug)]
struct RateLimit {
    rate: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl RateLimit {
    /// Sources tracked before idle ones are forgotten.
    const MAX_SOURCES: usize = 100_000;

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let burst = 2.0 * self.rate;
        if self.buckets.len() >= Self::MAX_SOURCES && !self.buckets.contains_key(&ip) {
            // Forget sources whose bucket has refilled: they lose nothing.
            let rate = self.rate;
            self.buckets.retain(|_, (t, at)| *t + rate * now.duration_since(*at).as_secs_f64() < burst);
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + self.rate * now.duration_since(*at).as_secs_f64()).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

type SKey = (String, String, String);
type CKey = (String, String);

/// A transaction whose timers may have changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TxKey {
    Client(CKey),
    Server(SKey),
}

struct Target {
    uri: String,
    dst: Peer,
    routes: Vec<String>,
}

struct ServerTx {
    tx: Transaction,
    src: Peer,
    /// The request as it will be forwarded (R-URI and Route to be set per target).
    forward: Option<Message>,
    targets: VecDeque<Target>,
    client: Option<CKey>,
    best: Option<Message>,
}

struct ClientTx {
    tx: Transaction,
    dst: Peer,
    server: Option<SKey>,
}

/// The proxy.
pub struct Proxy {
    cfg: ProxyConfig,
    store: Arc<dyn Store>,
    calls: Option<Arc<dyn MediaAnchor>>,
    focus: Option<Arc<crate::proxy::focus::Focus>>,
    li: Option<Arc<crate::li::Li>>,
    nonces: Nonces,
    servers: HashMap<SKey, ServerTx>,
    clients: HashMap<CKey, ClientTx>,
    out: Vec<(Peer, Vec<u8>)>,
    branch: u64,
    metrics: Arc<ProxyMetrics>,
    limit: Option<RateLimit>,
    /// Deadlines, earliest first. An entry may be stale (the transaction moved on or is
    /// gone): it is checked against the transaction when it comes due, so a tick costs
    /// only the timers due, not a scan of every transaction.
    timers: BinaryHeap<Reverse<(Instant, TxKey)>>,
    /// Transactions touched since the last [`Proxy::settle`].
    touched: Vec<TxKey>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("domain", &self.cfg.domain).finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// FNV-1a over two strings: a stable, cheap tag for a dialog.
fn fnv1a(a: &str, b: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.bytes().chain([0]).chain(b.bytes()) {
        h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Our Record-Route URI for a transport.
fn rr_uri(host: &str, t: Transport) -> String {
    match t {
        Transport::Udp => format!("<sip:{host};lr>"),
        Transport::Tcp => format!("<sip:{host};transport=tcp;lr>"),
    }
}

fn resolve(uri: &str) -> Option<Peer> {
    let (host, port) = host_port(uri)?;
    let port = port.unwrap_or(5060);
    let transport = Transport::of_uri(uri);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Peer { transport, addr: SocketAddr::new(ip, port) });
    }
    let addr = (host.as_str(), port).to_socket_addrs().ok()?.next()?;
    Some(Peer { transport, addr })
}

impl Proxy {
    /// A proxy over a store, anchoring media through `calls` when given.
    pub fn new(cfg: ProxyConfig, store: Arc<dyn Store>, calls: Option<Arc<dyn MediaAnchor>>) -> Self {
        let nonces = Nonces::new(cfg.nonce_secret.clone());
        let limit =
            (cfg.rate_limit > 0).then(|| RateLimit { rate: f64::from(cfg.rate_limit), buckets: HashMap::new() });
        Self {
            cfg,
            store,
            calls,
            focus: None,
            li: None,
            nonces,
            servers: HashMap::new(),
            clients: HashMap::new(),
            out: Vec::new(),
            branch: 0,
            metrics: Arc::default(),
            limit,
            timers: BinaryHeap::new(),
            touched: Vec::new(),
        }
    }

    /// Answers INVITEs to `conf-<room>@<domain>` as conference focus.
    pub fn set_focus(&mut self, focus: Arc<crate::proxy::focus::Focus>) {
        self.focus = Some(focus);
    }

    /// Hands every SIP message received to lawful intercept's X2 hook.
    pub fn set_li(&mut self, li: Arc<crate::li::Li>) {
        self.li = Some(li);
    }

    fn x2(&self, src: Peer, m: &Message, raw: &[u8]) {
        let Some(li) = &self.li else { return };
        let aor = |h: &str| m.header(h).map(uri_of).and_then(aor_of).unwrap_or_default();
        let (from, to) = (aor("From"), aor("To"));
        li.sip_event(&crate::li::SipEvent {
            call_id: m.call_id(),
            from_aor: &from,
            to_aor: &to,
            // A request is sent by its From party, a response by its To party.
            from_caller: matches!(m.start, StartLine::Request { .. }),
            src: src.addr,
            dst: self.cfg.local,
            message: raw,
        });
    }

    /// Counters.
    pub fn stats(&self) -> ProxyStats {
        let m = &self.metrics;
        ProxyStats {
            malformed: m.malformed.load(Ordering::Relaxed),
            rejected: m.rejected.load(Ordering::Relaxed),
            forwarded: m.forwarded.load(Ordering::Relaxed),
            registers: m.registers.load(Ordering::Relaxed),
            rate_limited: m.rate_limited.load(Ordering::Relaxed),
        }
    }

    /// The counters, live, for a metrics endpoint.
    pub fn metrics(&self) -> Arc<ProxyMetrics> {
        self.metrics.clone()
    }

    /// Takes what is to be sent.
    pub fn drain(&mut self) -> Vec<(Peer, Vec<u8>)> {
        std::mem::take(&mut self.out)
    }

    fn is_us(&self, uri: &str) -> bool {
        match host_port(uri) {
            Some((h, p)) => {
                let port_ok = p.unwrap_or(5060) == self.cfg.local.port();
                let rr = self.cfg.record_route.as_deref().and_then(|r| host_port(&format!("sip:{r}")));
                (h.eq_ignore_ascii_case(&self.cfg.domain) && (p.is_none() || port_ok))
                    || (h.parse::<IpAddr>().ok() == Some(self.cfg.local.ip()) && port_ok)
                    || rr.is_some_and(|(rh, rp)| rh.eq_ignore_ascii_case(&h) && rp.unwrap_or(5060) == p.unwrap_or(5060))
            }
            None => false,
        }
    }

    /// Loose routing: Route entries naming us are consumed (two after a double
    /// Record-Route).
    fn consume_own_routes(&self, req: &mut Message) {
        while req.header_values("Route").next().is_some_and(|r| self.is_us(uri_of(r))) {
            req.pop_front("Route");
        }
    }

    fn our_domain(&self, uri: &str) -> bool {
        host_port(uri).is_some_and(|(h, p)| {
            h.eq_ignore_ascii_case(&self.cfg.domain)
                || (h.parse::<IpAddr>().ok() == Some(self.cfg.local.ip()) && p.unwrap_or(5060) == self.cfg.local.port())
        })
    }

    /// The AOR a request for our domain is looked up under: the proxy's own address is
    /// an alias of its domain (as `myself` is in Kamailio), so `sip:alice@IP:PORT` finds
    /// the bindings of `alice@domain`.
    fn local_aor(&self, uri: &str) -> Option<String> {
        let aor = aor_of(uri)?;
        let (user, host) = aor.split_once('@')?;
        if host.parse::<IpAddr>().ok() == Some(self.cfg.local.ip()) {
            return Some(format!("{user}@{}", self.cfg.domain.to_ascii_lowercase()));
        }
        Some(aor)
    }

    /// One UDP datagram from `src`.
    pub fn on_datagram(&mut self, now: Instant, src: SocketAddr, data: &[u8]) {
        self.on_message(now, Peer::udp(src), data);
    }

    /// One message (a datagram, or a message framed off a stream) from `src`.
    pub fn on_message(&mut self, now: Instant, src: Peer, data: &[u8]) {
        self.datagram(now, src, data);
        self.settle();
    }

    /// The transport could not reach `peer` (connection refused or lost): its client
    /// transactions fail at once, as on a timeout, so the next target is tried now
    /// rather than after Timer B (RFC 3263 §4.3).
    pub fn on_transport_error(&mut self, now: Instant, peer: Peer) {
        let failed: Vec<CKey> = self
            .clients
            .iter()
            .filter(|(_, c)| c.dst == peer && matches!(c.tx.state(), State::Calling | State::Trying))
            .map(|(k, _)| k.clone())
            .collect();
        for k in failed {
            if let Some(sk) = self.clients.remove(&k).and_then(|c| c.server) {
                self.next_target(now, &sk);
            }
        }
        self.settle();
    }

    /// Transactions in progress (client and server).
    pub fn transactions(&self) -> usize {
        self.clients.len() + self.servers.len()
    }

    /// Re-arms the timers of the transactions touched and forgets those that ended (a
    /// server transaction stays while its client transaction runs).
    fn settle(&mut self) {
        while let Some(k) = self.touched.pop() {
            let (next, done) = match &k {
                TxKey::Client(ck) => match self.clients.get(ck) {
                    Some(c) => (c.tx.next_timeout(), c.tx.state() == State::Terminated),
                    None => continue,
                },
                TxKey::Server(sk) => match self.servers.get(sk) {
                    Some(s) => (
                        s.tx.next_timeout(),
                        s.tx.state() == State::Terminated
                            && !s.client.as_ref().is_some_and(|c| self.clients.contains_key(c)),
                    ),
                    None => continue,
                },
            };
            if done {
                match &k {
                    TxKey::Client(ck) => {
                        if let Some(sk) = self.clients.remove(ck).and_then(|c| c.server) {
                            self.touched.push(TxKey::Server(sk));
                        }
                    }
                    TxKey::Server(sk) => {
                        self.servers.remove(sk);
                    }
                }
            } else if let Some(t) = next {
                self.timers.push(Reverse((t, k)));
            }
        }
        self.metrics.transactions.store((self.clients.len() + self.servers.len()) as u64, Ordering::Relaxed);
    }

    fn datagram(&mut self, now: Instant, src: Peer, data: &[u8]) {
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return; // keep-alive CRLFs
        }
        // Requests are limited per source before any parsing, so a flood costs little;
        // responses belong to our own transactions and are never limited. Dropped, not
        // answered: an answer would amplify the flood.
        if let Some(l) = &mut self.limit {
            if !data.starts_with(b"SIP/") && !l.allow(src.addr.ip(), now) {
                self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        match Message::parse(data, false) {
            Ok((m, _)) => {
                self.x2(src, &m, data);
                match m.start {
                    StartLine::Request { .. } => self.on_request(now, src, m),
                    StartLine::Response { .. } => self.on_response(now, m),
                }
            }
            Err(e) => {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                // Answer a request we can still address; drop anything else.
                if let Some(r) = bad_request_reply(data, &e.to_string()) {
                    self.out.push((src, r));
                }
            }
        }
    }

    fn reply(&mut self, key: &SKey, resp: Message, now: Instant) {
        self.touched.push(TxKey::Server(key.clone()));
        if let Some(s) = self.servers.get_mut(key) {
            s.tx.respond(&resp, now);
            let src = s.src;
            while let Some(o) = s.tx.poll_output() {
                if let Output::Transmit(b) = o {
                    self.out.push((src, b));
                }
            }
        }
    }

    fn on_request(&mut self, now: Instant, src: Peer, mut req: Message) {
        let Some(key) = server_key(&req) else {
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let method = req.method().to_string();
        self.touched.push(TxKey::Server(key.clone()));
        if method == "ACK" {
            if let Some(s) = self.servers.get_mut(&key) {
                if s.tx.state() == State::Completed {
                    s.tx.on_request(&req, now);
                    return;
                }
            }
            self.forward_stateless(req);
            return;
        }
        if let Some(s) = self.servers.get_mut(&key) {
            // A retransmission: the transaction answers it.
            s.tx.on_request(&req, now);
            let src = s.src;
            while let Some(o) = s.tx.poll_output() {
                if let Output::Transmit(b) = o {
                    self.out.push((src, b));
                }
            }
            return;
        }
        self.servers.insert(
            key.clone(),
            ServerTx {
                tx: Transaction::server(req.clone(), src.reliable()),
                src,
                forward: None,
                targets: VecDeque::new(),
                client: None,
                best: None,
            },
        );
        if method == "CANCEL" {
            self.on_cancel(now, &key, &req);
            return;
        }
        match req.max_forwards() {
            Some(0) => return self.reject(&key, &req, 483, "Too Many Hops", now),
            None => return self.reject(&key, &req, 400, "Bad Max-Forwards", now),
            _ => {}
        }
        let me = self.cfg.local.to_string();
        if req.header_values("Via").any(|v| v.contains(&me) && v.contains("z9hG4bK-hasp")) {
            return self.reject(&key, &req, 482, "Loop Detected", now);
        }
        if self.focus_request(now, &key, src, &req) {
            return;
        }
        self.consume_own_routes(&mut req);
        let ruri = match &req.start {
            StartLine::Request { uri, .. } => uri.clone(),
            StartLine::Response { .. } => return,
        };
        let targets: Vec<Target> = if let Some(r) = req.header_values("Route").next() {
            match resolve(uri_of(r)) {
                Some(dst) => vec![Target { uri: ruri.clone(), dst, routes: Vec::new() }],
                None => return self.reject(&key, &req, 404, "Route Unresolvable", now),
            }
        } else if self.our_domain(&ruri) {
            if method == "REGISTER" {
                self.metrics.registers.fetch_add(1, Ordering::Relaxed);
                let resp = registrar::register(
                    &*self.store,
                    &self.nonces,
                    &self.cfg.domain,
                    &req,
                    &src.addr.to_string(),
                    unix_now(),
                );
                return self.reply(&key, resp, now);
            }
            let Some(aor) = self.local_aor(&ruri) else {
                // To the proxy itself (keep-alive OPTIONS and the like).
                let r = req.response(
                    if method == "OPTIONS" { 200 } else { 405 },
                    if method == "OPTIONS" { "OK" } else { "Method Not Allowed" },
                    Some("p"),
                );
                return self.reply(&key, r, now);
            };
            let bindings = match self.store.bindings(&aor, unix_now()) {
                Ok(b) => b,
                Err(_) => {
                    let r = registrar::unavailable(&req);
                    return self.reply(&key, r, now);
                }
            };
            if bindings.is_empty() {
                let (user, dom) = aor.split_once('@').unwrap_or((&aor, ""));
                let known = self.store.password(user, dom).ok().flatten().is_some();
                return if known {
                    self.reject(&key, &req, 480, "Temporarily Unavailable", now)
                } else {
                    self.reject(&key, &req, 404, "Not Found", now)
                };
            }
            // Most recent registration first.
            let mut bindings = bindings;
            bindings.sort_by_key(|b| std::cmp::Reverse(b.expires_at));
            bindings
                .into_iter()
                .filter_map(|b| {
                    let first = b.path.first().map(|p| uri_of(p).to_string());
                    let via = first.as_deref().unwrap_or(&b.contact).to_string();
                    // RFC 3261 routes to the Contact (or the first Path hop); the source
                    // of the REGISTER is kept for NAT handling, not used by default.
                    let dst = resolve(&via)?;
                    Some(Target { uri: b.contact, dst, routes: b.path })
                })
                .collect()
        } else {
            match resolve(&ruri) {
                Some(dst) => vec![Target { uri: ruri.clone(), dst, routes: Vec::new() }],
                None => return self.reject(&key, &req, 404, "Unresolvable", now),
            }
        };
        // Prepare the request as forwarded.
        let mf = req.max_forwards().unwrap_or(70).saturating_sub(1);
        req.set("Max-Forwards", mf.to_string());
        if method == "INVITE" {
            let trying = req.response(100, "Trying", None);
            self.reply(&key, trying, now);
            if let Some(sdp) = self.anchor_offer(&req) {
                req.body = sdp.into_bytes();
            }
        }
        if method == "BYE" {
            if let Some(c) = &self.calls {
                let _ = c.delete(req.call_id());
            }
        }
        if let Some(s) = self.servers.get_mut(&key) {
            s.forward = Some(req);
            s.targets = targets.into();
        }
        self.next_target(now, &key);
    }

    /// Handles a request for the conference focus: a new INVITE to a conference URI of
    /// our domain, or an in-dialog request of a focus dialog. Returns whether it did.
    fn focus_request(&mut self, now: Instant, key: &SKey, src: Peer, req: &Message) -> bool {
        let Some(focus) = self.focus.clone() else { return false };
        let StartLine::Request { uri, method } = &req.start else { return false };
        let mut routes = req.header_values("Route");
        if !routes.all(|r| self.is_us(uri_of(r))) || !self.our_domain(uri) {
            return false;
        }
        let user = aor_of(uri).and_then(|a| a.split_once('@').map(|(u, _)| u.to_string())).unwrap_or_default();
        let Some(room) = crate::proxy::focus::room_of_user(&user) else { return false };
        let method = method.clone();
        let in_dialog = req.to_tag().is_some();
        if in_dialog && !focus.is_member(req.call_id()) {
            let r = req.response(481, "Call/Transaction Does Not Exist", None);
            self.reply(key, r, now);
            return true;
        }
        let resp = match method.as_str() {
            "INVITE" => {
                if !in_dialog {
                    let trying = req.response(100, "Trying", None);
                    self.reply(key, trying, now);
                }
                let offer = std::str::from_utf8(&req.body).unwrap_or("");
                match focus.join(room, req.call_id(), offer) {
                    Ok(answer) => {
                        // The same tag for a retransmitted INVITE (whose 200 was lost):
                        // derived from the dialog, not counted.
                        let tag = format!("hasp-focus-{:016x}", fnv1a(req.call_id(), req.from_tag().unwrap_or("")));
                        let mut r = req.response(200, "OK", Some(&tag));
                        let t = match src.transport {
                            Transport::Udp => "",
                            Transport::Tcp => ";transport=tcp",
                        };
                        r.headers.push(("Contact".into(), format!("<sip:{user}@{}{t}>", self.cfg.local)));
                        r.headers.push(("Content-Type".into(), "application/sdp".into()));
                        r.body = answer.into_bytes();
                        r
                    }
                    Err(crate::proxy::focus::JoinError::NotAcceptable(why)) => {
                        let mut r = req.response(488, "Not Acceptable Here", Some("focus"));
                        r.headers.push(("Warning".into(), format!("304 hasp \"{}\"", why.replace('"', "'"))));
                        r
                    }
                    Err(crate::proxy::focus::JoinError::Unavailable(why)) => {
                        tracing::warn!(room, error = %why, "no media node took a conference participant");
                        let mut r = req.response(503, "Service Unavailable", Some("focus"));
                        r.headers.push(("Retry-After".into(), "5".into()));
                        r
                    }
                }
            }
            "BYE" => {
                focus.leave(req.call_id());
                req.response(200, "OK", None)
            }
            "OPTIONS" | "INFO" | "UPDATE" => req.response(200, "OK", None),
            "CANCEL" => return false, // handled as for any INVITE (answered already)
            _ => req.response(405, "Method Not Allowed", Some("focus")),
        };
        self.reply(key, resp, now);
        true
    }

    fn anchor_offer(&self, req: &Message) -> Option<String> {
        let calls = self.calls.as_ref()?;
        if req.body.is_empty() {
            return None;
        }
        let sdp = std::str::from_utf8(&req.body).ok()?;
        calls.offer(req.call_id(), req.from_tag()?, req.to_tag(), sdp).ok()
    }

    fn anchor_answer(&self, resp: &Message) -> Option<String> {
        let calls = self.calls.as_ref()?;
        if resp.body.is_empty() {
            return None;
        }
        let sdp = std::str::from_utf8(&resp.body).ok()?;
        calls.answer(resp.call_id(), resp.from_tag()?, resp.to_tag()?, sdp).ok()
    }

    fn reject(&mut self, key: &SKey, req: &Message, code: u16, reason: &str, now: Instant) {
        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        let r = req.response(code, reason, Some("rej"));
        self.reply(key, r, now);
    }

    /// Forwards to the next target, or answers with the best response (408 if none).
    fn next_target(&mut self, now: Instant, key: &SKey) {
        let Some(s) = self.servers.get_mut(key) else { return };
        let Some(t) = s.targets.pop_front() else {
            let best = s.best.take();
            let req = s.tx.request().clone();
            let resp = best.unwrap_or_else(|| req.response(408, "Request Timeout", Some("to")));
            if req.method() == "INVITE" {
                if let Some(c) = &self.calls {
                    let _ = c.delete(req.call_id());
                }
            }
            return self.reply(key, resp, now);
        };
        let Some(mut fwd) = s.forward.clone() else { return };
        let inbound = s.src.transport;
        if let StartLine::Request { uri, .. } = &mut fwd.start {
            *uri = t.uri.clone();
        }
        let dialog_creating = matches!(fwd.method(), "INVITE" | "SUBSCRIBE" | "REFER") && fwd.to_tag().is_none();
        let rr_host = self.cfg.record_route.clone().unwrap_or_else(|| self.cfg.local.to_string());
        if dialog_creating {
            // One Record-Route, or two when the transport changes here (RFC 5658): the
            // top one faces the callee, the other the caller.
            if inbound != t.dst.transport {
                fwd.push_front("Record-Route", rr_uri(&rr_host, inbound));
            }
            fwd.push_front("Record-Route", rr_uri(&rr_host, t.dst.transport));
        }
        for r in t.routes.iter().rev() {
            fwd.push_front("Route", r.clone());
        }
        self.branch += 1;
        let branch = format!("z9hG4bK-hasp-{:x}-{}", std::process::id(), self.branch);
        fwd.push_front(
            "Via",
            format!("SIP/2.0/{} {};branch={branch};rport", t.dst.transport.via_name(), self.cfg.local),
        );
        let mut tx = Transaction::client(fwd.clone(), t.dst.reliable(), now);
        let mut sends = Vec::new();
        while let Some(o) = tx.poll_output() {
            if let Output::Transmit(b) = o {
                sends.push(b);
            }
        }
        if t.dst.transport == Transport::Udp && sends.iter().any(|b| b.len() > MAX_UDP_PAYLOAD) {
            // It cannot be sent to this target (RFC 3261 §18.1.1 would want TCP, which
            // the target did not offer): the next one, or 513 at the end.
            if s.best.is_none() {
                let req = s.tx.request();
                s.best = Some(req.response(513, "Message Too Large", Some("big")));
            }
            return self.next_target(now, key);
        }
        self.out.extend(sends.into_iter().map(|b| (t.dst, b)));
        let ck = (branch, fwd.method().to_string());
        self.touched.push(TxKey::Client(ck.clone()));
        self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
        s.client = Some(ck.clone());
        self.clients.insert(ck, ClientTx { tx, dst: t.dst, server: Some(key.clone()) });
    }

    fn on_cancel(&mut self, now: Instant, key: &SKey, cancel: &Message) {
        let ok = cancel.response(200, "OK", Some("c"));
        self.reply(key, ok, now);
        let invite_key = (key.0.clone(), key.1.clone(), "INVITE".to_string());
        let Some(s) = self.servers.get_mut(&invite_key) else { return };
        s.targets.clear();
        let Some(ck) = s.client.clone() else { return };
        let Some(c) = self.clients.get(&ck) else { return };
        if c.tx.state() != State::Proceeding {
            return;
        }
        let inv = c.tx.request().clone();
        let dst = c.dst;
        let mut headers = Vec::new();
        for h in ["Via", "From", "To", "Call-ID"] {
            if let Some(v) = if h == "Via" { inv.header_values("Via").next() } else { inv.header(h) } {
                headers.push((h.to_string(), v.to_string()));
            }
        }
        headers.push(("CSeq".into(), format!("{} CANCEL", inv.cseq().map(|c| c.0).unwrap_or(1))));
        for r in inv.header_values("Route") {
            headers.push(("Route".into(), r.to_string()));
        }
        headers.push(("Max-Forwards".into(), "70".into()));
        let uri = match &inv.start {
            StartLine::Request { uri, .. } => uri.clone(),
            StartLine::Response { .. } => return,
        };
        let c = Message { start: StartLine::Request { method: "CANCEL".into(), uri }, headers, body: Vec::new() };
        let mut tx = Transaction::client(c.clone(), dst.reliable(), now);
        while let Some(o) = tx.poll_output() {
            if let Output::Transmit(b) = o {
                self.out.push((dst, b));
            }
        }
        if let Some(k) = client_key(&c) {
            self.touched.push(TxKey::Client(k.clone()));
            self.clients.insert(k, ClientTx { tx, dst, server: None });
        }
        if let Some(calls) = &self.calls {
            let _ = calls.delete(cancel.call_id());
        }
    }

    fn on_response(&mut self, now: Instant, resp: Message) {
        let Some(ck) = client_key(&resp) else { return };
        let Some(c) = self.clients.get_mut(&ck) else {
            // No transaction (a 2xx retransmission after it ended): forward statelessly.
            self.forward_response_stateless(resp);
            return;
        };
        c.tx.on_response(resp, now);
        self.pump_client(now, &ck);
    }

    fn pump_client(&mut self, now: Instant, ck: &CKey) {
        self.touched.push(TxKey::Client(ck.clone()));
        let Some(c) = self.clients.get_mut(ck) else { return };
        let (dst, server) = (c.dst, c.server.clone());
        let mut outs = Vec::new();
        while let Some(o) = c.tx.poll_output() {
            outs.push(o);
        }
        for o in outs {
            match o {
                Output::Transmit(b) => self.out.push((dst, b)),
                Output::Response(mut r) => {
                    let Some(sk) = server.clone() else { continue };
                    r.pop_front("Via");
                    let code = r.code().unwrap_or(500);
                    if code == 100 {
                        continue;
                    }
                    let invite = r.method() == "INVITE";
                    if (200..300).contains(&code) && invite {
                        if let Some(sdp) = self.anchor_answer(&r) {
                            r.body = sdp.into_bytes();
                        }
                    }
                    if code >= 300 && invite && (code == 408 || code >= 500) {
                        // Serial failover: keep the response in case every target fails.
                        let more = self.servers.get(&sk).is_some_and(|s| !s.targets.is_empty());
                        if more {
                            if let Some(s) = self.servers.get_mut(&sk) {
                                s.best = Some(r);
                            }
                            self.next_target(now, &sk);
                            continue;
                        }
                    }
                    if code >= 300 && invite {
                        if let Some(c) = &self.calls {
                            let _ = c.delete(r.call_id());
                        }
                    }
                    self.reply(&sk, r, now);
                }
                Output::Timeout => {
                    if let Some(sk) = server.clone() {
                        self.next_target(now, &sk);
                    }
                }
                Output::Terminated => {}
            }
        }
    }

    fn forward_stateless(&mut self, mut req: Message) {
        self.consume_own_routes(&mut req);
        if req.header_values("Route").next().is_none() {
            if let StartLine::Request { uri, .. } = &req.start {
                if self.is_us(uri) {
                    return; // for us: the ACK of a 2xx the focus sent
                }
            }
        }
        let next = req.header_values("Route").next().map(|r| uri_of(r).to_string()).or_else(|| match &req.start {
            StartLine::Request { uri, .. } => Some(uri.clone()),
            StartLine::Response { .. } => None,
        });
        let Some(dst) = next.as_deref().and_then(resolve) else { return };
        let mf = req.max_forwards().unwrap_or(70);
        if mf == 0 {
            return;
        }
        req.set("Max-Forwards", (mf - 1).to_string());
        // A stateless branch: the same for retransmissions of the same ACK.
        let b = req.via().and_then(|v| v.branch).unwrap_or_default();
        req.push_front(
            "Via",
            format!(
                "SIP/2.0/{} {};branch=z9hG4bK-hasp-sl-{}",
                dst.transport.via_name(),
                self.cfg.local,
                b.trim_start_matches("z9hG4bK")
            ),
        );
        self.out.push((dst, req.to_bytes()));
    }

    fn forward_response_stateless(&mut self, mut resp: Message) {
        let top = resp.via();
        if !top.as_ref().is_some_and(|v| v.branch.as_deref().is_some_and(|b| b.starts_with("z9hG4bK-hasp"))) {
            return;
        }
        resp.pop_front("Via");
        let Some(v) = resp.via() else { return };
        let host = v.received.clone().unwrap_or(v.host.clone());
        let port = v.rport.flatten().or(v.port).unwrap_or(5060);
        let Ok(ip) = host.parse::<IpAddr>() else { return };
        let transport = if v.transport == "TCP" { Transport::Tcp } else { Transport::Udp };
        if (200..300).contains(&resp.code().unwrap_or(0)) && resp.method() == "INVITE" {
            if let Some(sdp) = self.anchor_answer(&resp) {
                resp.body = sdp.into_bytes();
            }
        }
        self.out.push((Peer { transport, addr: SocketAddr::new(ip, port) }, resp.to_bytes()));
    }

    /// Drives timers: runs the transactions whose deadline has come.
    pub fn on_tick(&mut self, now: Instant) {
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, k))) = self.timers.pop() else { break };
            match &k {
                TxKey::Client(ck) => {
                    let Some(c) = self.clients.get_mut(ck) else { continue };
                    if c.tx.next_timeout().is_none_or(|t| t > now) {
                        continue; // stale entry
                    }
                    c.tx.on_timeout(now);
                    self.pump_client(now, ck);
                }
                TxKey::Server(sk) => {
                    let Some(s) = self.servers.get_mut(sk) else { continue };
                    if s.tx.next_timeout().is_none_or(|t| t > now) {
                        continue;
                    }
                    s.tx.on_timeout(now);
                    let src = s.src;
                    while let Some(o) = s.tx.poll_output() {
                        if let Output::Transmit(b) = o {
                            self.out.push((src, b));
                        }
                    }
                    self.touched.push(k.clone());
                }
            }
        }
        self.settle();
    }

    /// The earliest deadline pending (the driver may sleep until then).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }
}

/// A 400 for a request too broken to parse but with enough to answer (Via, From, To,
/// Call-ID, CSeq lines copied as they are), or a 505 for another SIP version. Only the
/// header section must be text: a body is not looked at.
fn bad_request_reply(data: &[u8], why: &str) -> Option<Vec<u8>> {
    let head = match data.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &data[..i],
        None => data,
    };
    let text = String::from_utf8_lossy(head);
    let first = text.lines().next()?;
    if first.starts_with("SIP/") {
        return None; // a response: never answered
    }
    // A request line is `METHOD URI SIP/2.0`; a missing or other version still lets us
    // answer, as long as it starts with a method token.
    let method = first.split(' ').next().unwrap_or("");
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let version = first.rsplit(' ').next().unwrap_or("");
    let (code, reason) = match version.strip_prefix("SIP/") {
        Some(v) if v != "2.0" => (505, "Version Not Supported"),
        _ => (400, "Bad Request"),
    };
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    let mut have = 0;
    for l in text.lines().skip(1) {
        let name = l.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
        if ["via", "v", "from", "f", "to", "t", "call-id", "i", "cseq"].contains(&name.as_str()) {
            if l.contains('\u{fffd}') {
                return None; // a header we would echo is not text
            }
            out.push_str(l.trim_end());
            out.push_str("\r\n");
            have += 1;
        }
    }
    if have < 5 {
        return None;
    }
    let why: String = why.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(120).collect();
    out.push_str(&format!("Warning: 399 hasp \"{why}\"\r\nContent-Length: 0\r\n\r\n"));
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::focus::Focus;
    use crate::store::{Binding, Store};
    use std::time::Duration;

    fn store(name: &str) -> Arc<dyn Store> {
        let dir = std::env::temp_dir().join(format!("hasp-proxy-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(crate::store::embedded::Embedded::open(&dir.join("s.redb")).unwrap())
    }

    fn proxy(st: Arc<dyn Store>) -> Proxy {
        let cfg = ProxyConfig {
            domain: "unit.test".into(),
            local: "127.0.0.1:5060".parse().unwrap(),
            nonce_secret: "s".into(),
            record_route: None,
            rate_limit: 0,
        };
        Proxy::new(cfg, st, None)
    }

    fn bind(st: &dyn Store, aor: &str, contacts: &[(&str, u64)]) {
        let b: Vec<Binding> = contacts
            .iter()
            .map(|(c, exp)| Binding {
                contact: c.to_string(),
                expires_at: *exp,
                path: vec![],
                call_id: "r".into(),
                cseq: 1,
                received: None,
            })
            .collect();
        st.set_bindings(aor, &b).unwrap();
    }

    fn invite(uri: &str, branch: &str, sdp: &str) -> Vec<u8> {
        format!(
            "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK{branch}\r\nFrom: <sip:a@unit.test>;tag=fa\r\nTo: <{uri}>\r\nCall-ID: call-{branch}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        )
        .into_bytes()
    }

    fn first_line(b: &[u8]) -> String {
        String::from_utf8_lossy(b).lines().next().unwrap_or("").to_string()
    }

    const CALLER: &str = "10.0.0.1:5070";

    #[test]
    fn a_refused_tcp_contact_fails_over_to_the_next_at_once() {
        let st = store("tcp-failover");
        let far = unix_now() + 600;
        // The TCP contact is newer, so it is tried first.
        bind(
            &*st,
            "bob@unit.test",
            &[("sip:bob@10.0.0.2:5080;transport=tcp", far + 10), ("sip:bob@10.0.0.3:5080", far)],
        );
        let mut p = proxy(st);
        let t0 = Instant::now();
        p.on_datagram(t0, CALLER.parse().unwrap(), &invite("sip:bob@unit.test", "1", ""));
        let out = p.drain();
        let tcp = Peer::tcp("10.0.0.2:5080".parse().unwrap());
        assert!(out.iter().any(|(d, b)| *d == tcp && first_line(b).starts_with("INVITE")), "{out:?}");
        let sent = out.iter().find(|(d, _)| *d == tcp).map(|(_, b)| String::from_utf8_lossy(b).to_string()).unwrap();
        assert!(sent.contains("Via: SIP/2.0/TCP 127.0.0.1:5060"), "{sent}");
        assert!(sent.contains("Record-Route: <sip:127.0.0.1:5060;transport=tcp;lr>"), "{sent}");
        assert!(sent.contains("Record-Route: <sip:127.0.0.1:5060;lr>"), "double Record-Route: {sent}");
        // The connection is refused 10 ms later: the UDP contact gets the INVITE now,
        // not after Timer B.
        p.on_transport_error(t0 + Duration::from_millis(10), tcp);
        let out = p.drain();
        let udp = Peer::udp("10.0.0.3:5080".parse().unwrap());
        assert!(out.iter().any(|(d, b)| *d == udp && first_line(b).starts_with("INVITE")), "{out:?}");
    }

    #[test]
    fn an_unanswered_invite_is_retransmitted_then_408_and_forgotten() {
        let st = store("timeout");
        bind(&*st, "bob@unit.test", &[("sip:bob@10.0.0.3:5080", unix_now() + 600)]);
        let mut p = proxy(st);
        let t0 = Instant::now();
        let caller: SocketAddr = CALLER.parse().unwrap();
        p.on_datagram(t0, caller, &invite("sip:bob@unit.test", "2", ""));
        let _ = p.drain();
        // Timer A doubles: retransmissions at 0.5, 1.5, 3.5, 7.5 s …
        let mut sent = 0;
        let mut t = t0;
        let mut final_resp = None;
        while t < t0 + Duration::from_secs(40) {
            t += Duration::from_millis(100);
            p.on_tick(t);
            for (d, b) in p.drain() {
                if d.addr == caller {
                    final_resp = Some((t - t0, first_line(&b)));
                } else {
                    sent += 1;
                }
            }
            if final_resp.is_some() {
                break;
            }
        }
        let (after, line) = final_resp.expect("a final response");
        assert_eq!(line, "SIP/2.0 408 Request Timeout");
        assert!(after >= Duration::from_secs(32) && after < Duration::from_secs(33), "{after:?}");
        assert_eq!(sent, 6, "retransmissions at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s");
        // Nothing is kept once the server transaction ends too (Timer I/J).
        p.on_tick(t + Duration::from_secs(40));
        assert_eq!(p.transactions(), 0);
    }

    #[test]
    fn requests_over_the_per_source_rate_are_dropped_and_counted() {
        let cfg = ProxyConfig {
            domain: "unit.test".into(),
            local: "127.0.0.1:5060".parse().unwrap(),
            nonce_secret: "s".into(),
            record_route: None,
            rate_limit: 10,
        };
        let mut p = Proxy::new(cfg, store("rate"), None);
        let options = |n: u32| {
            format!(
                "OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bKo{n}\r\nFrom: <sip:a@unit.test>;tag=1\r\nTo: <sip:127.0.0.1:5060>\r\nCall-ID: o{n}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
        };
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.1:5070".parse().unwrap(), "10.0.0.2:5070".parse().unwrap());
        let t0 = Instant::now();
        for n in 0..30 {
            p.on_datagram(t0, a, options(n).as_bytes());
        }
        assert_eq!(p.drain().len(), 20, "a burst of twice the rate passes");
        assert_eq!(p.stats().rate_limited, 10);
        p.on_datagram(t0, b, options(100).as_bytes());
        assert_eq!(p.drain().len(), 1, "another source is not affected");
        // One second refills ten tokens.
        for n in 200..215 {
            p.on_datagram(t0 + Duration::from_secs(1), a, options(n).as_bytes());
        }
        assert_eq!(p.drain().len(), 10);
        assert_eq!(p.metrics().rate_limited.load(Ordering::Relaxed), 15);
    }

    #[test]
    fn the_focus_answers_conference_invites_and_byes() {
        let mut p = proxy(store("focus"));
        let focus = Arc::new(Focus::new(vec![Arc::new(crate::proxy::focus::tests::FakeMixer::default())]));
        p.set_focus(focus.clone());
        let sdp = "v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";
        let caller: SocketAddr = CALLER.parse().unwrap();
        let t0 = Instant::now();
        let inv = invite("sip:conf-room@unit.test", "3", sdp);
        p.on_datagram(t0, caller, &inv);
        let out = p.drain();
        let lines: Vec<String> = out.iter().map(|(_, b)| first_line(b)).collect();
        assert_eq!(lines, ["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]);
        let ok = String::from_utf8_lossy(&out[1].1).to_string();
        assert!(
            ok.contains("m=audio 40000 RTP/AVP 0") && ok.contains("Contact: <sip:conf-room@127.0.0.1:5060>"),
            "{ok}"
        );
        let tag = |m: &str| m.lines().find(|l| l.starts_with("To:")).unwrap().to_string();
        // A retransmitted INVITE (the 200 was lost) gets the same answer and To tag.
        p.on_datagram(t0 + Duration::from_millis(500), caller, &inv);
        let again = p.drain().into_iter().map(|(_, b)| String::from_utf8_lossy(&b).to_string()).collect::<Vec<_>>();
        assert_eq!(tag(again.last().unwrap()), tag(&ok));
        assert_eq!(focus.counts(), (1, 1));
        // ACK and BYE are ours: nothing is forwarded, BYE gets 200 and leaves the room.
        let to = tag(&ok);
        let in_dialog = |m: &str, cseq: u32, branch: &str| {
            format!(
                "{m} sip:conf-room@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK{branch}\r\nFrom: <sip:a@unit.test>;tag=fa\r\n{to}\r\nCall-ID: call-3\r\nCSeq: {cseq} {m}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
        };
        p.on_datagram(t0 + Duration::from_secs(1), caller, in_dialog("ACK", 1, "ack").as_bytes());
        assert!(p.drain().is_empty(), "the ACK is absorbed");
        p.on_datagram(t0 + Duration::from_secs(2), caller, in_dialog("BYE", 2, "bye").as_bytes());
        let out = p.drain();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0.addr, first_line(&out[0].1)), (caller, "SIP/2.0 200 OK".to_string()));
        assert_eq!(focus.counts(), (0, 0));
        // A BYE for a dialog the focus does not know: 481.
        p.on_datagram(t0 + Duration::from_secs(3), caller, in_dialog("BYE", 3, "bye2").as_bytes());
        assert_eq!(first_line(&p.drain()[0].1), "SIP/2.0 481 Call/Transaction Does Not Exist");
    }
}
