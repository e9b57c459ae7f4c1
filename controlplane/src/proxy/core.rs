//! The stateful proxy core (RFC 3261 §16): transactions, routing, registrar, conference
//! focus and media anchoring — sans IO for real.
//!
//! The core takes messages (with their peer), the time, and the *completions* of
//! operations it asked for, and returns [`Action`]s: datagrams or stream messages to
//! send, and operations to start ([`Op`]: store reads and writes, media anchoring, name
//! resolution, focus join/leave), each with a deadline. The driver
//! ([`super::driver`]) performs operations concurrently and feeds their results back
//! with [`Proxy::on_completion`]; the core waits for none of them. An operation whose
//! completion has not come by its deadline fails inside the core (its own timer), and a
//! completion that arrives later is ignored, so a hung relay, store or DNS server delays
//! only the requests that need it: every other call, REGISTER and OPTIONS proceeds.

use super::focus::JoinError;
use super::registrar;
use crate::error::Error;
use crate::store::Binding;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng};
use sip::digest::{Credentials, Nonces, Replays};
use sip::message::{aor_of, host_port, uri_of, Message, StartLine};
use sip::steer;
use sip::transaction::{client_key, server_key, Output, State, Transaction};
use sip::{Peer, Transport, MAX_UDP_PAYLOAD};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the core gives each kind of operation before it fails it itself.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Store reads and writes: long enough to ride out an etcd leader election (the
    /// etcd backend's own deadline is 5 s), well inside a client's Timer F (32 s).
    pub store: Duration,
    /// Media anchoring (the client tries relays in turn, 500 ms each).
    pub anchor: Duration,
    /// Name resolution (RFC 3263).
    pub resolve: Duration,
    /// Conference focus join/leave on a media node.
    pub focus: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            store: Duration::from_secs(6),
            anchor: Duration::from_secs(3),
            resolve: Duration::from_secs(4),
            focus: Duration::from_secs(3),
        }
    }
}

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
    /// How long a source over its rate is banned (everything from it dropped unread);
    /// zero: no ban, only the excess is dropped.
    pub ban: Duration,
    /// Peers trusted by source address (other proxies, an LB, a trunk): their requests
    /// are neither challenged nor refused as relaying, and not rate limited.
    pub trusted: Vec<ipnet::IpNet>,
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

/// The proxy's counters, shared with the metrics endpoint (written by the core
/// instances, read by the API).
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
    /// Transactions in progress (gauge, summed over the core instances).
    pub transactions: AtomicU64,
    /// Operations started (store, anchor, resolve, focus).
    pub ops_started: AtomicU64,
    /// Operations that failed (an error completion).
    pub ops_failed: AtomicU64,
    /// Operations the core gave up on at their deadline.
    pub ops_timed_out: AtomicU64,
    /// Operations in progress (gauge).
    pub ops_pending: AtomicU64,
    /// Requests challenged for credentials (407) by the relay policy.
    pub challenged: AtomicU64,
    /// Requests refused as relaying (403 Not relaying) or dropped (ACK).
    pub not_relayed: AtomicU64,
    /// Digest answers seen before (replays), challenged again.
    pub replays: AtomicU64,
    /// Sources banned for going over their rate.
    pub bans: AtomicU64,
    /// INVITE branches given up by Timer C (a provisional, then silence).
    pub timer_c: AtomicU64,
    /// Responses dropped because they came from somewhere other than where the request
    /// went.
    pub stray_responses: AtomicU64,
    /// Error answers not sent: the source had its share (a spoofed source must not be
    /// flooded with our answers).
    pub replies_suppressed: AtomicU64,
    /// Bindings not tried because the load balancer holding their flow is no longer a
    /// live member (RFC 5626 flows).
    pub flows_skipped: AtomicU64,
    /// Requests answered 430 Flow Failed at once: every binding's flow was through a
    /// load balancer that is gone.
    pub flow_failed: AtomicU64,
    /// Load balancers live in membership as the proxy last heard (gauge; 0 before any
    /// view, when flows are not judged).
    pub live_lbs: AtomicU64,
}

/// The SIP addresses of the load balancers live now, from cluster membership
/// ([`crate::cluster::View`]). The driver hands every change to each core
/// ([`Proxy::on_peers`]), which keeps its own copy: no request takes a lock to ask.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveLbs(Arc<HashSet<SocketAddr>>);

impl LiveLbs {
    /// The load balancers at `addrs`.
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self(Arc::new(addrs.into_iter().collect()))
    }

    /// The live load balancers of a membership view (their `sip` addresses; a member
    /// without a valid one is left out).
    pub fn from_view(view: &crate::cluster::View) -> Self {
        Self::new(view.of(crate::cluster::Role::Lb).filter_map(crate::cluster::Member::sip_addr))
    }

    /// Whether `addr` is a live load balancer's SIP address.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.0.contains(&addr)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is live.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An operation the core asks the driver to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The password of `user@domain` ([`Done::Password`]).
    Password {
        /// User part.
        user: String,
        /// Domain.
        domain: String,
    },
    /// The unexpired bindings of an AOR at Unix time `now` ([`Done::Bindings`]).
    Bindings {
        /// `user@domain`.
        aor: String,
        /// Unix seconds.
        now: u64,
    },
    /// Replaces the bindings of an AOR ([`Done::Stored`]).
    SetBindings {
        /// `user@domain`.
        aor: String,
        /// The new bindings (empty: none).
        bindings: Vec<Binding>,
    },
    /// Resolves a SIP URI to the peers to try, in order (RFC 3263; [`Done::Resolved`]).
    Resolve {
        /// The URI (a Route, a Request-URI or a contact).
        uri: String,
    },
    /// Anchors an offer ([`Done::Sdp`]).
    Offer {
        /// Call-ID.
        call_id: String,
        /// From tag.
        from_tag: String,
        /// To tag (a re-offer in a dialog).
        to_tag: Option<String>,
        /// The offer.
        sdp: String,
    },
    /// Anchors an answer ([`Done::Sdp`]).
    Answer {
        /// Call-ID.
        call_id: String,
        /// From tag.
        from_tag: String,
        /// To tag.
        to_tag: String,
        /// The answer.
        sdp: String,
    },
    /// Frees a call's media ([`Done::Deleted`]).
    Delete {
        /// Call-ID.
        call_id: String,
    },
    /// Joins a conference room ([`Done::Joined`]).
    Join {
        /// Room name.
        room: String,
        /// The participant's dialog.
        call_id: String,
        /// Its offer.
        offer: String,
        /// A re-INVITE: only an existing participant may send one.
        in_dialog: bool,
    },
    /// Leaves a conference room ([`Done::Left`]).
    Leave {
        /// The participant's dialog.
        call_id: String,
    },
}

impl Op {
    /// Its kind (store, resolve, anchor, focus: operations of one kind share a
    /// deadline length) and how long the core waits for it.
    fn deadline(&self, d: &Deadlines) -> (usize, Duration) {
        match self {
            Op::Password { .. } | Op::Bindings { .. } | Op::SetBindings { .. } => (0, d.store),
            Op::Resolve { .. } => (1, d.resolve),
            Op::Offer { .. } | Op::Answer { .. } | Op::Delete { .. } => (2, d.anchor),
            Op::Join { .. } | Op::Leave { .. } => (3, d.focus),
        }
    }
}

/// A successful completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// The password, if the user exists.
    Password(Option<String>),
    /// The bindings.
    Bindings(Vec<Binding>),
    /// Written.
    Stored,
    /// Peers in the order to try; empty: the name does not exist.
    Resolved(Vec<Peer>),
    /// The anchored SDP to forward.
    Sdp(String),
    /// Freed.
    Deleted,
    /// The focus's answer, or why it refused.
    Joined(Result<String, JoinError>),
    /// Whether the dialog was a participant.
    Left(bool),
}

/// Identifies an operation between [`Action::Start`] and [`Proxy::on_completion`].
pub type OpId = u64;

/// What the driver is to do.
#[derive(Debug)]
pub enum Action {
    /// Send a message to a peer.
    Send(Peer, Vec<u8>),
    /// Start an operation; report its result with [`Proxy::on_completion`] (before
    /// `deadline`, or it is no longer awaited).
    Start {
        /// Its id.
        id: OpId,
        /// What to do.
        op: Op,
        /// When the core stops waiting.
        deadline: Instant,
    },
    /// A source went over its rate: drop everything from it until `until`, as early as
    /// possible (the driver drops it in the kernel, before it is read).
    Ban {
        /// The source.
        ip: IpAddr,
        /// When the ban ends.
        until: Instant,
    },
}

/// A token bucket per source address: `rate` requests per second, bursts of twice that.
/// A source that empties its bucket is banned for `ban` (as Kamailio's pike module
/// does): everything it sends meanwhile is dropped unread.
#[derive(Debug)]
struct RateLimit {
    rate: f64,
    ban: Duration,
    buckets: HashMap<IpAddr, (f64, Instant)>,
    banned: HashMap<IpAddr, Instant>,
}

/// What the rate limit says of one message.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
    /// Drop, and a ban starts now (until then).
    Ban(Instant),
}

impl RateLimit {
    /// Sources tracked before idle ones are forgotten.
    const MAX_SOURCES: usize = 100_000;

    fn new(rate: f64, ban: Duration) -> Self {
        Self { rate, ban, buckets: HashMap::new(), banned: HashMap::new() }
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.check(ip, now) == Verdict::Pass
    }

    fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        if let Some(until) = self.banned.get(&ip) {
            if now < *until {
                return Verdict::Drop;
            }
            self.banned.remove(&ip);
        }
        let burst = 2.0 * self.rate;
        if self.buckets.len() >= Self::MAX_SOURCES && !self.buckets.contains_key(&ip) {
            // Forget sources whose bucket has refilled: they lose nothing.
            let rate = self.rate;
            self.buckets.retain(|_, (t, at)| *t + rate * now.duration_since(*at).as_secs_f64() < burst);
            self.banned.retain(|_, until| *until > now);
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + self.rate * now.saturating_duration_since(*at).as_secs_f64()).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Verdict::Pass;
        }
        if self.ban.is_zero() || self.banned.len() >= Self::MAX_SOURCES {
            return Verdict::Drop;
        }
        // Banned with a full bucket for when the ban ends: no instant re-ban.
        self.buckets.remove(&ip);
        let until = now + self.ban;
        self.banned.insert(ip, until);
        Verdict::Ban(until)
    }
}

type SKey = (String, String, String);
type CKey = (String, String);

/// A transaction with a timer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Client(CKey),
    Server(SKey),
    /// Timer C of an INVITE client transaction (RFC 3261 §16.6 step 11).
    TimerC(CKey),
}

/// Timer C: how long a forwarded INVITE may go without a response once a provisional
/// came (Timer B covers no response at all). RFC 3261 §16.6: more than 3 minutes.
pub const TIMER_C: Duration = Duration::from_secs(181);

/// A place to forward to. `dst` is known for an IP literal or once `hop` is resolved.
#[derive(Debug, Clone)]
struct Target {
    /// The Request-URI to send.
    uri: String,
    /// The URI whose host is the next hop (a Route, a Path, or the Request-URI).
    hop: String,
    /// Route headers to add (a binding's Path).
    routes: Vec<String>,
    dst: Option<Peer>,
}

struct ServerTx {
    tx: Transaction,
    src: Peer,
    /// The request as it will be forwarded (R-URI and Route to be set per target).
    forward: Option<Message>,
    targets: VecDeque<Target>,
    client: Option<CKey>,
    best: Option<Message>,
    /// A CANCEL came: no new branch is started.
    cancelled: bool,
    /// 100 Trying was sent (once per INVITE, also when it waited for its credentials).
    trying: bool,
}

impl ServerTx {
    /// No final response sent yet.
    fn open(&self) -> bool {
        matches!(self.tx.state(), State::Trying | State::Proceeding)
    }
}

struct ClientTx {
    tx: Transaction,
    dst: Peer,
    server: Option<SKey>,
    /// When Timer C fires (INVITE only), pushed back by each provisional response.
    timer_c: Option<Instant>,
    /// Timer C fired and the branch was cancelled: when it fires again (64·T1 later) with
    /// still no final response, the transaction is dropped (RFC 3261 §9.1).
    given_up: bool,
}

/// What a pending operation's completion continues.
enum Pending {
    /// REGISTER: the user's password, to check the digest.
    RegPassword { sk: SKey, aor: String, creds: Box<Credentials> },
    /// REGISTER: the AOR's bindings, to apply the request to.
    RegBindings { sk: SKey, aor: String },
    /// REGISTER: the new bindings being written.
    RegStore { sk: SKey, aor: String, bindings: Vec<Binding> },
    /// The callee's bindings.
    Lookup { sk: SKey },
    /// Whether an AOR without bindings is a user (480) or not (404).
    Known { sk: SKey },
    /// The next hop of a target.
    Resolve { sk: SKey, target: Target },
    /// The next hop of a request forwarded statelessly (an ACK).
    ResolveStateless { req: Message },
    /// The anchored offer of a request.
    Offer { sk: SKey, call_id: String },
    /// The anchored answer of a 2xx.
    Answer { sk: SKey, resp: Message, call_id: String },
    /// The anchored answer of a retransmitted 2xx, forwarded statelessly.
    StatelessAnswer { resp: Message, dst: Peer, call_id: String },
    /// A conference join.
    Join { sk: SKey, user: String, transport: Transport },
    /// A conference leave (BYE).
    Leave { sk: SKey },
    /// A request challenged for proxy authentication came back with credentials: the
    /// user's secret, to check them; then the request proceeds.
    ProxyAuth { sk: SKey, src: Peer, creds: Box<Credentials> },
    /// Nothing waits for the result (media deletes).
    Detached,
}

/// One proxy core instance. Several run side by side (`--sip-threads`), each owning the
/// transactions of the Call-IDs steered to it ([`sip::steer`]).
pub struct Proxy {
    cfg: ProxyConfig,
    /// Whether media is anchored (offer/answer/delete operations are issued).
    anchor: bool,
    /// Whether conference URIs are answered (join/leave operations are issued).
    focus: bool,
    li: Option<Arc<crate::li::Li>>,
    nonces: Nonces,
    deadlines: Deadlines,
    servers: HashMap<SKey, ServerTx>,
    clients: HashMap<CKey, ClientTx>,
    out: Vec<Action>,
    /// This instance's index (written into its branches, so responses find it).
    shard: usize,
    branch: u64,
    next_op: OpId,
    pending: HashMap<OpId, Pending>,
    /// Anchor operations in flight per call, and the calls deleted meanwhile (whose
    /// media is deleted again once those complete, so a late offer leaks nothing).
    anchoring: HashMap<String, u32>,
    doomed: HashSet<String>,
    /// REGISTERs of one AOR are applied one at a time (read, modify, write): the
    /// queue of those waiting, per AOR being written.
    registering: HashMap<String, VecDeque<SKey>>,
    metrics: Arc<ProxyMetrics>,
    /// What this instance last added to the shared gauges.
    reported: (u64, u64),
    limit: Option<RateLimit>,
    /// Transaction deadlines, earliest first. An entry may be stale (the transaction
    /// moved on): it is checked when it comes due, so a tick costs only the timers due,
    /// not a scan of every transaction.
    timers: BinaryHeap<Reverse<(Instant, TimerKey)>>,
    /// Operation deadlines per kind, in the order started, which is deadline order (one
    /// length per kind). Completed operations are dropped from the front as soon as they
    /// get there, so the earliest deadline is always one still awaited: most operations
    /// complete in microseconds, and stale deadlines would wake the driver for nothing.
    op_deadlines: [VecDeque<(Instant, OpId)>; 4],
    /// Transactions touched since the last [`Proxy::settle`].
    touched: Vec<TimerKey>,
    /// The wall clock at one instant, so Unix times derive from the injected `now`.
    epoch: (Instant, u64),
    /// Branch ids, tags and nonce salts: a CSPRNG (seeded from the OS; tests inject a
    /// seed), so none can be guessed by an off-path attacker.
    rng: StdRng,
    /// Nonce-counts seen, shared by every core of the process (a replayed request may be
    /// steered to another core).
    replays: Arc<Replays>,
    /// The address in the Via of requests this instance sends over UDP: its own socket,
    /// apart from the one clients and attackers send to, so the answers of callees are
    /// never queued behind a flood ([`Proxy::set_response_addr`]).
    via_udp: SocketAddr,
    /// Error answers per source (untrusted, over UDP): a request with a forged source
    /// makes the proxy answer the forged address, with retransmissions; this bounds what
    /// any one address receives unasked.
    error_replies: RateLimit,
    /// The live load balancers, once membership said which (`None`: no membership, no
    /// flow is judged, as before there was any).
    lbs: Option<LiveLbs>,
}

/// What the proxy does with a request before routing it (RFC 3261 §16.3 policy: no
/// open relay, local callers authenticate).
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Pass,
    Refuse(u16, &'static str),
    Challenge,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("domain", &self.cfg.domain).field("shard", &self.shard).finish_non_exhaustive()
    }
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

/// The peer of a URI whose host is an IP literal (no resolution needed).
pub fn literal_peer(uri: &str) -> Option<Peer> {
    let (host, port) = host_port(uri)?;
    let ip = host.parse::<IpAddr>().ok()?;
    Some(Peer { transport: Transport::of_uri(uri), addr: SocketAddr::new(ip, port.unwrap_or(5060)) })
}

impl Proxy {
    /// A proxy core; `anchor`: whether media is anchored (the driver performs the
    /// offer/answer/delete operations).
    pub fn new(cfg: ProxyConfig, anchor: bool) -> Self {
        let nonces = Nonces::new(cfg.nonce_secret.clone());
        let limit = (cfg.rate_limit > 0).then(|| RateLimit::new(f64::from(cfg.rate_limit), cfg.ban));
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let cfg_local = cfg.local;
        Self {
            cfg,
            anchor,
            focus: false,
            li: None,
            nonces,
            deadlines: Deadlines::default(),
            servers: HashMap::new(),
            clients: HashMap::new(),
            out: Vec::new(),
            shard: 0,
            branch: 0,
            next_op: 0,
            pending: HashMap::new(),
            anchoring: HashMap::new(),
            doomed: HashSet::new(),
            registering: HashMap::new(),
            metrics: Arc::default(),
            reported: (0, 0),
            limit,
            timers: BinaryHeap::new(),
            op_deadlines: Default::default(),
            touched: Vec::new(),
            epoch: (Instant::now(), unix),
            rng: rand::make_rng(),
            replays: Arc::default(),
            error_replies: RateLimit::new(Self::ERROR_REPLIES_PER_SEC, Duration::ZERO),
            via_udp: cfg_local,
            lbs: None,
        }
    }

    /// Membership changed: `lbs` are the load balancers live now. From the first call
    /// on, a binding whose flow (RFC 5626) goes through a load balancer not among them
    /// is not tried, and requests from one of them skip the per-source rate limit.
    /// Requests already sent to a balancer that has just left and not yet answered fail
    /// now, as on a transport error: the next target (the phone's other flow) is tried
    /// at once, not after Timer B.
    pub fn on_peers(&mut self, now: Instant, lbs: LiveLbs) {
        let gone: HashSet<SocketAddr> = match &self.lbs {
            Some(old) => old.0.iter().filter(|a| !lbs.contains(**a)).copied().collect(),
            None => HashSet::new(),
        };
        self.metrics.live_lbs.store(lbs.len() as u64, Ordering::Relaxed);
        self.lbs = Some(lbs);
        if !gone.is_empty() {
            self.fail_clients(now, |dst| gone.contains(&dst.addr));
        }
        self.settle();
    }

    /// Whether `src` is a live load balancer: it forwards for many clients and limits
    /// each real source itself, so its requests are neither rate limited nor banned
    /// here. It is not trusted: its users' requests are authenticated as anyone's.
    fn is_live_lb(&self, src: Peer) -> bool {
        self.lbs.as_ref().is_some_and(|l| l.contains(src.addr))
    }

    /// The address a request really came from: behind a live load balancer, the one
    /// the balancer saw (received/rport, else sent-by, of the Via after its own);
    /// otherwise the source.
    fn client_addr(&self, src: Peer, req: &Message) -> SocketAddr {
        if !self.is_live_lb(src) {
            return src.addr;
        }
        let Some(v) = req.header_values("Via").nth(1) else { return src.addr };
        // `Message::via` parses the top Via: give it the second one alone.
        let one = Message { start: req.start.clone(), headers: vec![("Via".into(), v.to_string())], body: Vec::new() };
        let Some(via) = one.via() else { return src.addr };
        let host = via.received.as_deref().unwrap_or(&via.host);
        let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() else { return src.addr };
        SocketAddr::new(ip, via.rport.flatten().or(via.port).unwrap_or(5060))
    }

    /// Whether a binding's flow is known dead: membership is known, the first Path hop
    /// is an outbound edge's (`ob`, as `hasp lb` writes it) at an `IP:PORT`, and no live
    /// load balancer is there. Anything else (no Path, a name, an edge outside the
    /// cluster that does not mark its flows) is tried as before.
    fn flow_dead(&self, b: &Binding) -> bool {
        let Some(lbs) = &self.lbs else { return false };
        let Some(hop) = b.path.first().map(|p| uri_of(p)) else { return false };
        if !registrar::uri_has_param(hop, "ob") {
            return false;
        }
        literal_peer(hop).is_some_and(|p| !lbs.contains(p.addr))
    }

    /// Requests sent over UDP name `addr` in their Via (the driver sends them from a
    /// socket bound there): their responses arrive on it.
    pub fn set_response_addr(&mut self, addr: SocketAddr) {
        self.via_udp = addr;
    }

    fn via_addr(&self, t: Transport) -> SocketAddr {
        match t {
            Transport::Udp => self.via_udp,
            Transport::Tcp => self.cfg.local,
        }
    }

    /// Error answers one untrusted UDP source receives per second (bursts of twice that).
    const ERROR_REPLIES_PER_SEC: f64 = 20.0;

    /// Whether an error answer may go to `src`; if not, the server transaction is
    /// dropped silently (it would retransmit the answer).
    fn may_answer_error(&mut self, now: Instant, key: &SKey) -> bool {
        let Some(src) = self.servers.get(key).map(|s| s.src) else { return true };
        if src.reliable()
            || self.trusted(src.addr.ip())
            || self.is_live_lb(src)
            || self.error_replies.allow(src.addr.ip(), now)
        {
            return true;
        }
        self.metrics.replies_suppressed.fetch_add(1, Ordering::Relaxed);
        self.servers.remove(key);
        false
    }

    /// Seeds the random generator (deterministic tests and simulations).
    pub fn seed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// Shares the table of nonce-counts seen with the other cores of the process.
    pub fn set_replays(&mut self, replays: Arc<Replays>) {
        self.replays = replays;
    }

    /// A random To tag for a response the proxy makes itself.
    fn tag(&mut self) -> String {
        format!("{:016x}", self.rng.next_u64())
    }

    fn salts(&mut self) -> [u64; 2] {
        [self.rng.next_u64(), self.rng.next_u64()]
    }

    /// The digest realm: the domain, in lower case (as users' HA1s are kept).
    fn realm(&self) -> String {
        self.cfg.domain.to_ascii_lowercase()
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.cfg.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The relay policy (as Kamailio's default configuration): requests from a caller
    /// claiming one of our users must authenticate; a request for elsewhere from anyone
    /// else is not relayed; conference rooms admit only authenticated users; requests
    /// within a dialog we record-routed, and those of trusted peers, pass.
    fn admission(&self, src: Peer, req: &Message) -> Admission {
        let StartLine::Request { uri, method } = &req.start else { return Admission::Pass };
        if method == "CANCEL" || self.trusted(src.addr.ip()) {
            return Admission::Pass;
        }
        let top_route_is_us = req.header_values("Route").next().is_some_and(|r| self.is_us(uri_of(r)));
        let to_here = req.header_values("Route").all(|r| self.is_us(uri_of(r))) && self.our_domain(uri);
        if req.to_tag().is_some() && (top_route_is_us || to_here) {
            return Admission::Pass;
        }
        let user = aor_of(uri).and_then(|a| a.split_once('@').map(|(u, _)| u.to_string()));
        if to_here && (method == "REGISTER" || user.is_none()) {
            // The registrar authenticates; requests to the proxy itself (keep-alive
            // OPTIONS) are answered here.
            return Admission::Pass;
        }
        let conference = self.focus && to_here && user.as_deref().and_then(super::focus::room_of_user).is_some();
        let from_local = req.header("From").map(uri_of).is_some_and(|f| self.our_domain(f));
        if conference || from_local {
            return Admission::Challenge;
        }
        if !to_here {
            return Admission::Refuse(403, "Not relaying");
        }
        Admission::Pass
    }

    /// A request that must authenticate: challenge it, or check its credentials (the
    /// user's secret is read from the store; the request proceeds once they hold).
    fn authenticate(&mut self, now: Instant, key: &SKey, src: Peer, req: &Message) {
        let (salts, tag, realm, t) = (self.salts(), self.tag(), self.realm(), self.unix(now));
        let who = registrar::Challenger::Proxy;
        match registrar::credentials(&self.nonces, &realm, req, t, salts, who, &tag) {
            Err(r) => {
                self.metrics.challenged.fetch_add(1, Ordering::Relaxed);
                if self.may_answer_error(now, key) {
                    self.reply(key, r, now)
                }
            }
            Ok(creds) => {
                if req.method() == "INVITE" {
                    // The secret is read off this thread: stop the client's retransmissions.
                    self.trying(now, key, req);
                }
                // A caller claiming one of our users must be that user.
                let from_user = req.header("From").map(uri_of).and_then(aor_of);
                let claims_other = from_user.as_deref().is_some_and(|a| {
                    let (u, _) = a.split_once('@').unwrap_or((a, ""));
                    self.our_domain(&format!("sip:{a}")) && u != creds.username
                });
                if claims_other {
                    return self.reject(key, req, 403, "From does not match credentials", now);
                }
                let op = Op::Password { user: creds.username.clone(), domain: realm };
                self.start(now, op, Pending::ProxyAuth { sk: key.clone(), src, creds: Box::new(creds) });
            }
        }
    }

    /// Answers INVITEs to `conf-<room>@<domain>` as conference focus (the driver
    /// performs join/leave).
    pub fn set_focus(&mut self, on: bool) {
        self.focus = on;
    }

    /// Hands every SIP message received to lawful intercept's X2 hook.
    pub fn set_li(&mut self, li: Arc<crate::li::Li>) {
        self.li = Some(li);
    }

    /// This instance's index among `--sip-threads` instances, and the counters they
    /// share.
    pub fn set_shard(&mut self, shard: usize, metrics: Arc<ProxyMetrics>) {
        self.shard = shard;
        self.metrics = metrics;
    }

    /// Operation deadlines.
    pub fn set_deadlines(&mut self, d: Deadlines) {
        self.deadlines = d;
    }

    /// Ties the injected monotonic clock to the wall clock: `at` is Unix time `unix`
    /// (registrations and nonces are in Unix seconds).
    pub fn set_epoch(&mut self, at: Instant, unix: u64) {
        self.epoch = (at, unix);
    }

    fn unix(&self, now: Instant) -> u64 {
        let (at, unix) = self.epoch;
        if now >= at {
            unix + now.duration_since(at).as_secs()
        } else {
            unix.saturating_sub(at.duration_since(now).as_secs())
        }
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

    /// Takes the actions to perform, in order.
    pub fn drain(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    /// Takes the actions into `into` (reusing its allocation).
    pub fn drain_into(&mut self, into: &mut Vec<Action>) {
        into.append(&mut self.out);
    }

    fn send(&mut self, to: Peer, bytes: Vec<u8>) {
        self.out.push(Action::Send(to, bytes));
    }

    fn start(&mut self, now: Instant, op: Op, then: Pending) -> OpId {
        self.next_op += 1;
        let id = self.next_op;
        let (kind, wait) = op.deadline(&self.deadlines);
        let deadline = now + wait;
        self.metrics.ops_started.fetch_add(1, Ordering::Relaxed);
        self.pending.insert(id, then);
        self.op_deadlines[kind].push_back((deadline, id));
        self.out.push(Action::Start { id, op, deadline });
        id
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

    /// Whether a message from `src` passes the per-source rate limit. Requests are
    /// limited before any parsing, so a flood costs little; responses belong to our own
    /// transactions and are never limited. A message refused is counted and must be
    /// dropped, not answered (an answer would amplify the flood).
    pub fn admit(&mut self, now: Instant, src: Peer, data: &[u8]) -> bool {
        if self.trusted(src.addr.ip()) || self.is_live_lb(src) {
            return true;
        }
        let Some(l) = &mut self.limit else { return true };
        if data.starts_with(b"SIP/") {
            return true;
        }
        match l.check(src.addr.ip(), now) {
            Verdict::Pass => return true,
            Verdict::Drop => {}
            Verdict::Ban(until) => {
                self.metrics.bans.fetch_add(1, Ordering::Relaxed);
                self.out.push(Action::Ban { ip: src.addr.ip(), until });
            }
        }
        self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// One UDP datagram from `src`.
    pub fn on_datagram(&mut self, now: Instant, src: SocketAddr, data: &[u8]) {
        self.on_message(now, Peer::udp(src), data);
    }

    /// One message (a datagram, or a message framed off a stream) from `src`, checked
    /// against the rate limit first.
    pub fn on_message(&mut self, now: Instant, src: Peer, data: &[u8]) {
        if self.admit(now, src, data) {
            self.on_admitted(now, src, data);
        }
    }

    /// One message that already passed [`Proxy::admit`] (on the instance that received
    /// it, which handed it to this one, its owner).
    pub fn on_admitted(&mut self, now: Instant, src: Peer, data: &[u8]) {
        self.message(now, src, data);
        self.settle();
    }

    /// The transport could not reach `peer` (connection refused or lost): its client
    /// transactions fail at once, as on a timeout, so the next target is tried now
    /// rather than after Timer B (RFC 3263 §4.3).
    pub fn on_transport_error(&mut self, now: Instant, peer: Peer) {
        self.fail_clients(now, |dst| dst == peer);
        self.settle();
    }

    /// Fails the client transactions to the peers `to` matches that have had no answer
    /// yet; their server transactions go on with their next target.
    fn fail_clients(&mut self, now: Instant, to: impl Fn(Peer) -> bool) {
        let failed: Vec<CKey> = self
            .clients
            .iter()
            .filter(|(_, c)| to(c.dst) && matches!(c.tx.state(), State::Calling | State::Trying))
            .map(|(k, _)| k.clone())
            .collect();
        for k in failed {
            if let Some(sk) = self.clients.remove(&k).and_then(|c| c.server) {
                self.touched.push(TimerKey::Server(sk.clone()));
                self.next_target(now, &sk);
            }
        }
    }

    /// The result of operation `id`. A result for an operation no longer awaited (its
    /// deadline passed, or it was never started) is ignored.
    pub fn on_completion(&mut self, now: Instant, id: OpId, result: Result<Done, Error>) {
        let Some(p) = self.pending.remove(&id) else { return };
        if result.is_err() {
            self.metrics.ops_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.resume(now, p, result);
        self.settle();
    }

    /// Transactions in progress (client and server).
    pub fn transactions(&self) -> usize {
        self.clients.len() + self.servers.len()
    }

    /// Operations awaited.
    pub fn pending_ops(&self) -> usize {
        self.pending.len()
    }

    /// Re-arms the timers of the transactions touched and forgets those that ended (a
    /// server transaction stays while its client transaction runs).
    fn settle(&mut self) {
        while let Some(k) = self.touched.pop() {
            let (next, done) = match &k {
                TimerKey::Client(ck) => match self.clients.get(ck) {
                    Some(c) => (c.tx.next_timeout(), c.tx.state() == State::Terminated),
                    None => continue,
                },
                TimerKey::Server(sk) => match self.servers.get(sk) {
                    Some(s) => (
                        s.tx.next_timeout(),
                        s.tx.state() == State::Terminated
                            && !s.client.as_ref().is_some_and(|c| self.clients.contains_key(c)),
                    ),
                    None => continue,
                },
                // Timer C is armed where it is set, never through `touched`.
                TimerKey::TimerC(_) => continue,
            };
            if done {
                match &k {
                    TimerKey::Client(ck) => {
                        if let Some(sk) = self.clients.remove(ck).and_then(|c| c.server) {
                            self.touched.push(TimerKey::Server(sk));
                        }
                    }
                    TimerKey::Server(sk) => {
                        self.servers.remove(sk);
                    }
                    TimerKey::TimerC(_) => {}
                }
            } else if let Some(t) = next {
                self.timers.push(Reverse((t, k)));
            }
        }
        for q in &mut self.op_deadlines {
            while q.front().is_some_and(|(_, id)| !self.pending.contains_key(id)) {
                q.pop_front();
            }
        }
        // Shared gauges: add what changed since this instance last reported.
        let now = ((self.clients.len() + self.servers.len()) as u64, self.pending.len() as u64);
        let (tx, ops) = self.reported;
        if now.0 != tx {
            self.metrics.transactions.fetch_add(now.0.wrapping_sub(tx), Ordering::Relaxed);
        }
        if now.1 != ops {
            self.metrics.ops_pending.fetch_add(now.1.wrapping_sub(ops), Ordering::Relaxed);
        }
        self.reported = now;
    }

    fn message(&mut self, now: Instant, src: Peer, data: &[u8]) {
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            return; // keep-alive CRLFs
        }
        match Message::parse(data, false) {
            Ok((m, _)) => {
                self.x2(src, &m, data);
                match m.start {
                    StartLine::Request { .. } => self.on_request(now, src, m),
                    StartLine::Response { .. } => self.on_response(now, src, m),
                }
            }
            Err(e) => {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                // Answer a request we can still address; drop anything else.
                if let Some(r) = bad_request_reply(data, &e.to_string()) {
                    self.send(src, r);
                }
            }
        }
    }

    fn reply(&mut self, key: &SKey, resp: Message, now: Instant) {
        self.touched.push(TimerKey::Server(key.clone()));
        if let Some(s) = self.servers.get_mut(key) {
            s.tx.respond(&resp, now);
            let src = s.src;
            while let Some(o) = s.tx.poll_output() {
                if let Output::Transmit(b) = o {
                    self.out.push(Action::Send(src, b));
                }
            }
        }
    }

    /// The request of a server transaction still waiting for its final response.
    fn open_request(&self, sk: &SKey) -> Option<Message> {
        self.servers.get(sk).filter(|s| s.open()).map(|s| s.tx.request().clone())
    }

    fn on_request(&mut self, now: Instant, src: Peer, req: Message) {
        let Some(key) = server_key(&req) else {
            self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let method = req.method().to_string();
        self.touched.push(TimerKey::Server(key.clone()));
        if method == "ACK" {
            if let Some(s) = self.servers.get_mut(&key) {
                if s.tx.state() == State::Completed {
                    s.tx.on_request(&req, now);
                    return;
                }
            }
            if matches!(self.admission(src, &req), Admission::Refuse(..)) {
                // An ACK is never answered: a stranger's ACK for elsewhere is dropped.
                self.metrics.not_relayed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.forward_stateless(now, req);
            return;
        }
        if let Some(s) = self.servers.get_mut(&key) {
            // A retransmission: the transaction answers it.
            s.tx.on_request(&req, now);
            let src = s.src;
            while let Some(o) = s.tx.poll_output() {
                if let Output::Transmit(b) = o {
                    self.out.push(Action::Send(src, b));
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
                cancelled: false,
                trying: false,
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
        let (me, me_udp) = (self.cfg.local.to_string(), self.via_udp.to_string());
        if req
            .header_values("Via")
            .any(|v| (v.contains(&me) || v.contains(&me_udp)) && v.contains(steer::BRANCH_PREFIX))
        {
            return self.reject(&key, &req, 482, "Loop Detected", now);
        }
        match self.admission(src, &req) {
            Admission::Pass => self.proceed(now, &key, src, req),
            Admission::Refuse(code, reason) => {
                self.metrics.not_relayed.fetch_add(1, Ordering::Relaxed);
                self.reject(&key, &req, code, reason, now)
            }
            Admission::Challenge => self.authenticate(now, &key, src, &req),
        }
    }

    /// Answers a request whose digest was refused (counting replays).
    fn digest_refused(&mut self, now: Instant, sk: &SKey, refused: registrar::Refused) {
        if refused.replay {
            self.metrics.replays.fetch_add(1, Ordering::Relaxed);
        }
        self.reply(sk, refused.response, now);
    }

    /// Sends 100 Trying for an INVITE, once.
    fn trying(&mut self, now: Instant, key: &SKey, req: &Message) {
        if self.servers.get_mut(key).is_some_and(|s| !std::mem::replace(&mut s.trying, true)) {
            let trying = req.response(100, "Trying", None);
            self.reply(key, trying, now);
        }
    }

    /// Routes a request the policy admitted (RFC 3261 §16.4 on).
    fn proceed(&mut self, now: Instant, key: &SKey, src: Peer, mut req: Message) {
        let key = key.clone();
        let method = req.method().to_string();
        // Credentials for our realm are consumed here, not forwarded (RFC 3261 §22.3);
        // those for a realm further on stay.
        let realm = self.realm();
        req.headers.retain(|(n, v)| {
            !n.eq_ignore_ascii_case("Proxy-Authorization")
                || sip::digest::parse_credentials(v).is_some_and(|c| !c.realm.eq_ignore_ascii_case(&realm))
        });
        // A 100 at once: the client stops retransmitting while we look things up.
        if method == "INVITE" {
            self.trying(now, &key, &req);
        }
        if self.focus_request(now, &key, src, &req) {
            return;
        }
        self.consume_own_routes(&mut req);
        let ruri = match &req.start {
            StartLine::Request { uri, .. } => uri.clone(),
            StartLine::Response { .. } => return,
        };
        let mf = req.max_forwards().unwrap_or(70).saturating_sub(1);
        req.set("Max-Forwards", mf.to_string());
        let route = req.header_values("Route").next().map(|r| uri_of(r).to_string());
        if let Some(hop) = route {
            let t = Target { uri: ruri, dst: literal_peer(&hop), hop, routes: Vec::new() };
            return self.targets_ready(now, &key, req, vec![t]);
        }
        if !self.our_domain(&ruri) {
            let t = Target { uri: ruri.clone(), dst: literal_peer(&ruri), hop: ruri, routes: Vec::new() };
            return self.targets_ready(now, &key, req, vec![t]);
        }
        if method == "REGISTER" {
            self.metrics.registers.fetch_add(1, Ordering::Relaxed);
            return self.register(now, &key, &req);
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
        if let Some(s) = self.servers.get_mut(&key) {
            s.forward = Some(req);
        }
        let t = self.unix(now);
        self.start(now, Op::Bindings { aor, now: t }, Pending::Lookup { sk: key });
    }

    /// The targets are known: anchor the offer if there is one, then forward.
    fn targets_ready(&mut self, now: Instant, key: &SKey, req: Message, targets: Vec<Target>) {
        let method = req.method().to_string();
        let offer = (self.anchor && method == "INVITE" && !req.body.is_empty())
            .then(|| {
                let sdp = std::str::from_utf8(&req.body).ok()?.to_string();
                Some(Op::Offer {
                    call_id: req.call_id().to_string(),
                    from_tag: req.from_tag()?.to_string(),
                    to_tag: req.to_tag().map(str::to_string),
                    sdp,
                })
            })
            .flatten();
        if method == "BYE" {
            // The media goes now; the BYE does not wait for it.
            self.delete_media(now, req.call_id());
        }
        let call_id = req.call_id().to_string();
        if let Some(s) = self.servers.get_mut(key) {
            s.forward = Some(req);
            s.targets = targets.into();
        }
        match offer {
            Some(op) => {
                *self.anchoring.entry(call_id.clone()).or_default() += 1;
                self.start(now, op, Pending::Offer { sk: key.clone(), call_id });
            }
            None => self.next_target(now, key),
        }
    }

    /// Frees a call's media (not waiting for it). If an offer or answer of the call is
    /// still being anchored, its media is freed again when that completes.
    fn delete_media(&mut self, now: Instant, call_id: &str) {
        if !self.anchor {
            return;
        }
        if self.anchoring.contains_key(call_id) {
            self.doomed.insert(call_id.to_string());
        }
        self.start(now, Op::Delete { call_id: call_id.to_string() }, Pending::Detached);
    }

    /// An anchor offer or answer of `call_id` completed.
    fn anchored(&mut self, now: Instant, call_id: &str) {
        let left = match self.anchoring.get_mut(call_id) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        let doomed = self.doomed.contains(call_id);
        if left == 0 {
            self.anchoring.remove(call_id);
            self.doomed.remove(call_id);
        }
        if doomed {
            self.start(now, Op::Delete { call_id: call_id.to_string() }, Pending::Detached);
        }
    }

    fn register(&mut self, now: Instant, key: &SKey, req: &Message) {
        let (salts, tag, realm) = (self.salts(), self.tag(), self.realm());
        match registrar::start(&self.nonces, &realm, req, self.unix(now), salts, &tag) {
            registrar::Start::Reply(r) => self.reply(key, r, now),
            registrar::Start::Authenticate { aor, user, domain, creds } => {
                self.start(now, Op::Password { user, domain }, Pending::RegPassword { sk: key.clone(), aor, creds });
            }
        }
    }

    /// Reads the AOR's bindings for a REGISTER, or queues it behind the one of the same
    /// AOR being applied.
    fn register_bindings(&mut self, now: Instant, key: SKey, aor: String) {
        if let Some(q) = self.registering.get_mut(&aor) {
            q.push_back(key);
            return;
        }
        self.registering.insert(aor.clone(), VecDeque::new());
        let t = self.unix(now);
        self.start(now, Op::Bindings { aor: aor.clone(), now: t }, Pending::RegBindings { sk: key, aor });
    }

    /// The REGISTER of `aor` being applied is done: the next one waiting goes.
    fn register_next(&mut self, now: Instant, aor: &str) {
        loop {
            let Some(next) = self.registering.get_mut(aor).and_then(VecDeque::pop_front) else {
                self.registering.remove(aor);
                return;
            };
            if self.open_request(&next).is_some() {
                let t = self.unix(now);
                self.start(
                    now,
                    Op::Bindings { aor: aor.to_string(), now: t },
                    Pending::RegBindings { sk: next, aor: aor.to_string() },
                );
                return;
            }
        }
    }

    fn resume(&mut self, now: Instant, p: Pending, r: Result<Done, Error>) {
        match p {
            // The registrar's steps read the request where it lies (a REGISTER is
            // handled at 1,000s per second: no copy of it per step).
            Pending::RegPassword { sk, aor, creds } => {
                let (tag, salts, realm, t) = (self.tag(), self.salts(), self.realm(), self.unix(now));
                let Some(s) = self.servers.get(&sk).filter(|s| s.open()) else { return };
                let check = registrar::Check {
                    nonces: &self.nonces,
                    replays: &self.replays,
                    realm: &realm,
                    now: t,
                    salts,
                    tag: &tag,
                };
                let stored = match &r {
                    Ok(Done::Password(p)) => Some(p.as_deref()),
                    _ => None,
                };
                match check.verify(s.tx.request(), &creds, stored, registrar::Challenger::Registrar) {
                    Ok(()) => self.register_bindings(now, sk, aor),
                    Err(refused) => self.digest_refused(now, &sk, refused),
                }
            }
            Pending::ProxyAuth { sk, src, creds } => {
                let (tag, salts, realm, t) = (self.tag(), self.salts(), self.realm(), self.unix(now));
                let Some(req) = self.open_request(&sk) else { return };
                let check = registrar::Check {
                    nonces: &self.nonces,
                    replays: &self.replays,
                    realm: &realm,
                    now: t,
                    salts,
                    tag: &tag,
                };
                let stored = match &r {
                    Ok(Done::Password(p)) => Some(p.as_deref()),
                    _ => None,
                };
                match check.verify(&req, &creds, stored, registrar::Challenger::Proxy) {
                    Ok(()) => self.proceed(now, &sk, src, req),
                    Err(refused) => self.digest_refused(now, &sk, refused),
                }
            }
            Pending::RegBindings { sk, aor } => {
                let (t, tag) = (self.unix(now), self.tag());
                let Some(s) = self.servers.get(&sk).filter(|s| s.open()) else { return self.register_next(now, &aor) };
                let req = s.tx.request();
                let applied = match r {
                    Ok(Done::Bindings(b)) => {
                        let client = self.client_addr(s.src, req);
                        registrar::apply(req, b, &client.to_string(), t, &tag)
                    }
                    _ => Err(registrar::unavailable(req, &tag)),
                };
                match applied {
                    Ok(bindings) => {
                        let op = Op::SetBindings { aor: aor.clone(), bindings: bindings.clone() };
                        self.start(now, op, Pending::RegStore { sk, aor, bindings });
                    }
                    Err(resp) => {
                        self.reply(&sk, resp, now);
                        self.register_next(now, &aor);
                    }
                }
            }
            Pending::RegStore { sk, aor, bindings } => {
                let (t, tag) = (self.unix(now), self.tag());
                let resp = self.servers.get(&sk).filter(|s| s.open()).map(|s| match r {
                    Ok(Done::Stored) => registrar::accepted(s.tx.request(), &bindings, t, &tag),
                    _ => registrar::unavailable(s.tx.request(), &tag),
                });
                if let Some(resp) = resp {
                    self.reply(&sk, resp, now);
                }
                self.register_next(now, &aor);
            }
            Pending::Lookup { sk } => {
                let Some(req) = self.open_request(&sk) else { return };
                let bindings = match r {
                    Ok(Done::Bindings(b)) => b,
                    _ => {
                        let r = registrar::unavailable(&req, &self.tag());
                        return self.reply(&sk, r, now);
                    }
                };
                if bindings.is_empty() {
                    let ruri = match &req.start {
                        StartLine::Request { uri, .. } => uri.clone(),
                        StartLine::Response { .. } => return,
                    };
                    let aor = self.local_aor(&ruri).unwrap_or_default();
                    let (user, dom) = aor.split_once('@').unwrap_or((&aor, ""));
                    let op = Op::Password { user: user.to_string(), domain: dom.to_string() };
                    self.start(now, op, Pending::Known { sk });
                    return;
                }
                // Flows through a load balancer that is gone are not tried: a client
                // keeping two flows is reached through the other, one with none left
                // gets 430 now rather than a timeout (RFC 5626 §5.3).
                let mut bindings = bindings;
                let before = bindings.len();
                bindings.retain(|b| !self.flow_dead(b));
                let dead = (before - bindings.len()) as u64;
                if dead > 0 {
                    self.metrics.flows_skipped.fetch_add(dead, Ordering::Relaxed);
                    if bindings.is_empty() {
                        self.metrics.flow_failed.fetch_add(1, Ordering::Relaxed);
                        return self.reject(&sk, &req, 430, "Flow Failed", now);
                    }
                }
                // Most recent registration first.
                bindings.sort_by_key(|b| Reverse(b.expires_at));
                let targets = bindings
                    .into_iter()
                    .map(|b| {
                        // RFC 3261 routes to the Contact (or the first Path hop); the
                        // source of the REGISTER is kept for NAT handling, not used by
                        // default.
                        let hop = b.path.first().map(|p| uri_of(p).to_string()).unwrap_or_else(|| b.contact.clone());
                        Target { uri: b.contact, dst: literal_peer(&hop), hop, routes: b.path }
                    })
                    .collect();
                let Some(fwd) = self.servers.get_mut(&sk).and_then(|s| s.forward.take()) else { return };
                self.targets_ready(now, &sk, fwd, targets);
            }
            Pending::Known { sk } => {
                let Some(req) = self.open_request(&sk) else { return };
                match r {
                    Ok(Done::Password(Some(_))) => self.reject(&sk, &req, 480, "Temporarily Unavailable", now),
                    Ok(Done::Password(None)) => self.reject(&sk, &req, 404, "Not Found", now),
                    _ => {
                        let r = registrar::unavailable(&req, &self.tag());
                        self.reply(&sk, r, now)
                    }
                }
            }
            Pending::Resolve { sk, target } => {
                let Some(req) = self.open_request(&sk) else { return };
                let Some(s) = self.servers.get_mut(&sk) else { return };
                match r {
                    Ok(Done::Resolved(peers)) if !peers.is_empty() => {
                        // Every address in order: the next is tried if one fails
                        // (RFC 3263 §4.3).
                        for p in peers.into_iter().rev() {
                            s.targets.push_front(Target { dst: Some(p), ..target.clone() });
                        }
                    }
                    Ok(_) => {
                        if s.best.is_none() {
                            s.best = Some(req.response(404, "Unresolvable", Some("dns")));
                        }
                    }
                    Err(_) => {
                        if s.best.is_none() {
                            let mut r = req.response(503, "Service Unavailable", Some("dns"));
                            r.headers.push(("Warning".into(), "399 hasp \"name resolution failed\"".into()));
                            s.best = Some(r);
                        }
                    }
                }
                self.next_target(now, &sk);
            }
            Pending::ResolveStateless { req } => {
                if let Ok(Done::Resolved(peers)) = r {
                    if let Some(dst) = peers.first() {
                        self.send_stateless(req, *dst);
                    }
                }
            }
            Pending::Offer { sk, call_id } => {
                // A call deleted meanwhile (CANCEL, BYE) has its media freed again by
                // `anchored`; one whose transaction ended otherwise is freed here.
                let doomed = self.doomed.contains(&call_id);
                self.anchored(now, &call_id);
                let open = self.servers.get(&sk).is_some_and(|s| s.open() && !s.cancelled);
                if !open {
                    if r.is_ok() && !doomed {
                        self.start(now, Op::Delete { call_id }, Pending::Detached);
                    }
                    return;
                }
                match r {
                    Ok(Done::Sdp(sdp)) => {
                        if let Some(f) = self.servers.get_mut(&sk).and_then(|s| s.forward.as_mut()) {
                            f.body = sdp.into_bytes();
                        }
                        self.next_target(now, &sk);
                    }
                    other => {
                        let why = match other {
                            Err(e) => e.to_string(),
                            Ok(_) => "unexpected completion".into(),
                        };
                        tracing::warn!(call_id, error = %why, "media could not be anchored");
                        let Some(req) = self.open_request(&sk) else { return };
                        if req.to_tag().is_none() {
                            // A relay that answers late may have made media: free it.
                            self.delete_media(now, &call_id);
                        }
                        let mut resp = req.response(503, "Service Unavailable", Some("media"));
                        resp.headers.push(("Retry-After".into(), "5".into()));
                        resp.headers.push(("Warning".into(), "399 hasp \"no media relay answered\"".into()));
                        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                        self.reply(&sk, resp, now);
                    }
                }
            }
            Pending::Answer { sk, mut resp, call_id } => {
                self.anchored(now, &call_id);
                match r {
                    Ok(Done::Sdp(sdp)) => resp.body = sdp.into_bytes(),
                    // The callee answered: the call goes on, unanchored, rather than
                    // being lost (the relay failed between offer and answer).
                    other => tracing::warn!(call_id, result = ?other.err(), "answer not anchored"),
                }
                self.reply(&sk, resp, now);
            }
            Pending::StatelessAnswer { mut resp, dst, call_id } => {
                self.anchored(now, &call_id);
                if let Ok(Done::Sdp(sdp)) = r {
                    resp.body = sdp.into_bytes();
                }
                self.send(dst, resp.to_bytes());
            }
            Pending::Join { sk, user, transport } => {
                let Some(req) = self.open_request(&sk) else { return };
                let resp = match r {
                    Ok(Done::Joined(Ok(answer))) => {
                        // The same tag for a retransmitted INVITE (whose 200 was lost):
                        // derived from the dialog, not counted.
                        let tag = format!("hasp-focus-{:016x}", fnv1a(req.call_id(), req.from_tag().unwrap_or("")));
                        let mut r = req.response(200, "OK", Some(&tag));
                        let t = match transport {
                            Transport::Udp => "",
                            Transport::Tcp => ";transport=tcp",
                        };
                        r.headers.push(("Contact".into(), format!("<sip:{user}@{}{t}>", self.cfg.local)));
                        r.headers.push(("Content-Type".into(), "application/sdp".into()));
                        r.body = answer.into_bytes();
                        r
                    }
                    Ok(Done::Joined(Err(JoinError::NotAcceptable(why)))) => {
                        let mut r = req.response(488, "Not Acceptable Here", Some("focus"));
                        r.headers.push(("Warning".into(), format!("304 hasp \"{}\"", why.replace('"', "'"))));
                        r
                    }
                    Ok(Done::Joined(Err(JoinError::NoDialog))) => {
                        req.response(481, "Call/Transaction Does Not Exist", None)
                    }
                    other => {
                        let why = match other {
                            Ok(Done::Joined(Err(JoinError::Unavailable(w)))) => w,
                            Err(e) => e.to_string(),
                            _ => "unexpected completion".into(),
                        };
                        tracing::warn!(error = %why, "no media node took a conference participant");
                        let mut r = req.response(503, "Service Unavailable", Some("focus"));
                        r.headers.push(("Retry-After".into(), "5".into()));
                        r
                    }
                };
                self.reply(&sk, resp, now);
            }
            Pending::Leave { sk } => {
                let Some(req) = self.open_request(&sk) else { return };
                let resp = match r {
                    Ok(Done::Left(true)) => req.response(200, "OK", None),
                    Ok(Done::Left(false)) => req.response(481, "Call/Transaction Does Not Exist", None),
                    _ => registrar::unavailable(&req, &self.tag()),
                };
                self.reply(&sk, resp, now);
            }
            Pending::Detached => {}
        }
    }

    /// Handles a request for the conference focus: a new INVITE to a conference URI of
    /// our domain, or an in-dialog request of a focus dialog. Returns whether it did.
    fn focus_request(&mut self, now: Instant, key: &SKey, src: Peer, req: &Message) -> bool {
        if !self.focus {
            return false;
        }
        let StartLine::Request { uri, method } = &req.start else { return false };
        let mut routes = req.header_values("Route");
        if !routes.all(|r| self.is_us(uri_of(r))) || !self.our_domain(uri) {
            return false;
        }
        let user = aor_of(uri).and_then(|a| a.split_once('@').map(|(u, _)| u.to_string())).unwrap_or_default();
        let Some(room) = super::focus::room_of_user(&user) else { return false };
        let (room, call_id) = (room.to_string(), req.call_id().to_string());
        let in_dialog = req.to_tag().is_some();
        match method.as_str() {
            "INVITE" => {
                let offer = String::from_utf8_lossy(&req.body).into_owned();
                let op = Op::Join { room, call_id, offer, in_dialog };
                self.start(now, op, Pending::Join { sk: key.clone(), user, transport: src.transport });
            }
            "BYE" => {
                self.start(now, Op::Leave { call_id }, Pending::Leave { sk: key.clone() });
            }
            "OPTIONS" | "INFO" | "UPDATE" => {
                let r = req.response(200, "OK", None);
                self.reply(key, r, now);
            }
            "CANCEL" => return false, // handled as for any INVITE
            _ => {
                let r = req.response(405, "Method Not Allowed", Some("focus"));
                self.reply(key, r, now);
            }
        }
        true
    }

    fn reject(&mut self, key: &SKey, req: &Message, code: u16, reason: &str, now: Instant) {
        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        if !self.may_answer_error(now, key) {
            return;
        }
        let r = req.response(code, reason, Some(&self.tag()));
        self.reply(key, r, now);
    }

    /// Forwards to the next target (resolving its next hop first if it is a name), or
    /// answers with the best response (408 if none).
    fn next_target(&mut self, now: Instant, key: &SKey) {
        loop {
            let Some(s) = self.servers.get_mut(key) else { return };
            if !s.open() {
                return;
            }
            let Some(t) = s.targets.pop_front() else {
                let best = s.best.take();
                let req = s.tx.request().clone();
                let resp = match best {
                    Some(b) => b,
                    None if s.cancelled => req.response(487, "Request Terminated", Some("can")),
                    None => req.response(408, "Request Timeout", Some("to")),
                };
                if req.method() == "INVITE" && req.to_tag().is_none() {
                    self.delete_media(now, req.call_id());
                }
                return self.reply(key, resp, now);
            };
            let Some(dst) = t.dst else {
                let op = Op::Resolve { uri: t.hop.clone() };
                self.start(now, op, Pending::Resolve { sk: key.clone(), target: t });
                return;
            };
            let Some(mut fwd) = s.forward.clone() else { return };
            let inbound = s.src.transport;
            if let StartLine::Request { uri, .. } = &mut fwd.start {
                *uri = t.uri.clone();
            }
            let dialog_creating = matches!(fwd.method(), "INVITE" | "SUBSCRIBE" | "REFER") && fwd.to_tag().is_none();
            let rr_host = self.cfg.record_route.clone().unwrap_or_else(|| self.cfg.local.to_string());
            if dialog_creating {
                // One Record-Route, or two when the transport changes here (RFC 5658):
                // the top one faces the callee, the other the caller.
                if inbound != dst.transport {
                    fwd.push_front("Record-Route", rr_uri(&rr_host, inbound));
                }
                fwd.push_front("Record-Route", rr_uri(&rr_host, dst.transport));
            }
            for r in t.routes.iter().rev() {
                fwd.push_front("Route", r.clone());
            }
            self.branch += 1;
            // The counter keeps branches unique; the random part makes them unguessable
            // (a forged response must name a live branch).
            let tag = format!("{:x}{:016x}", std::process::id(), self.rng.next_u64());
            let branch = steer::branch(self.shard, &tag, self.branch);
            fwd.push_front(
                "Via",
                format!(
                    "SIP/2.0/{} {};branch={branch};rport",
                    dst.transport.via_name(),
                    if dst.transport == Transport::Udp { self.via_udp } else { self.cfg.local }
                ),
            );
            let mut tx = Transaction::client(fwd.clone(), dst.reliable(), now);
            let mut sends = Vec::new();
            while let Some(o) = tx.poll_output() {
                if let Output::Transmit(b) = o {
                    sends.push(b);
                }
            }
            if dst.transport == Transport::Udp && sends.iter().any(|b| b.len() > MAX_UDP_PAYLOAD) {
                // It cannot be sent to this target (RFC 3261 §18.1.1 would want TCP,
                // which the target did not offer): the next one, or 513 at the end.
                if s.best.is_none() {
                    let req = s.tx.request();
                    s.best = Some(req.response(513, "Message Too Large", Some("big")));
                }
                continue;
            }
            self.out.extend(sends.into_iter().map(|b| Action::Send(dst, b)));
            let ck = (branch, fwd.method().to_string());
            self.touched.push(TimerKey::Client(ck.clone()));
            self.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
            s.client = Some(ck.clone());
            let timer_c = (fwd.method() == "INVITE").then(|| now + TIMER_C);
            if let Some(t) = timer_c {
                self.timers.push(Reverse((t, TimerKey::TimerC(ck.clone()))));
            }
            self.clients.insert(ck, ClientTx { tx, dst, server: Some(key.clone()), timer_c, given_up: false });
            return;
        }
    }

    fn on_cancel(&mut self, now: Instant, key: &SKey, cancel: &Message) {
        let ok = cancel.response(200, "OK", Some("c"));
        self.reply(key, ok, now);
        let invite_key = (key.0.clone(), key.1.clone(), "INVITE".to_string());
        let Some(s) = self.servers.get_mut(&invite_key) else { return };
        s.targets.clear();
        s.cancelled = true;
        let client = s.client.clone().filter(|ck| self.clients.contains_key(ck));
        self.delete_media(now, cancel.call_id());
        let Some(ck) = client else {
            // Nothing forwarded yet (a lookup or the anchoring is still running): the
            // INVITE ends here, and whatever completes later starts nothing.
            if let Some(req) = self.open_request(&invite_key) {
                let r = req.response(487, "Request Terminated", Some("can"));
                self.reply(&invite_key, r, now);
            }
            return;
        };
        self.cancel_branch(now, &ck);
    }

    /// Sends CANCEL for the INVITE of client transaction `ck`, if it got a provisional
    /// response (RFC 3261 §9.1: not before).
    fn cancel_branch(&mut self, now: Instant, ck: &CKey) {
        let Some(c) = self.clients.get(ck) else { return };
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
                self.out.push(Action::Send(dst, b));
            }
        }
        if let Some(k) = client_key(&c) {
            self.touched.push(TimerKey::Client(k.clone()));
            self.clients.insert(k, ClientTx { tx, dst, server: None, timer_c: None, given_up: false });
        }
    }

    fn on_response(&mut self, now: Instant, src: Peer, resp: Message) {
        let Some(ck) = client_key(&resp) else { return };
        let Some(c) = self.clients.get_mut(&ck) else {
            // No transaction (a 2xx retransmission after it ended): forward statelessly.
            self.forward_response_stateless(now, resp);
            return;
        };
        if c.dst.addr != src.addr {
            // Only the peer the request went to answers it: a forged response (a 200 or
            // a 6xx ending someone's call) from anywhere else is dropped.
            self.metrics.stray_responses.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if resp.code().is_some_and(|c| (101..200).contains(&c)) && c.timer_c.is_some() && !c.given_up {
            let t = now + TIMER_C;
            c.timer_c = Some(t);
            self.timers.push(Reverse((t, TimerKey::TimerC(ck.clone()))));
        }
        c.tx.on_response(resp, now);
        self.pump_client(now, &ck);
    }

    /// The Answer operation for a 2xx to an INVITE carrying SDP, if media is anchored.
    fn answer_op(&self, r: &Message) -> Option<Op> {
        if !self.anchor || r.body.is_empty() {
            return None;
        }
        Some(Op::Answer {
            call_id: r.call_id().to_string(),
            from_tag: r.from_tag()?.to_string(),
            to_tag: r.to_tag()?.to_string(),
            sdp: std::str::from_utf8(&r.body).ok()?.to_string(),
        })
    }

    fn pump_client(&mut self, now: Instant, ck: &CKey) {
        self.touched.push(TimerKey::Client(ck.clone()));
        let Some(c) = self.clients.get_mut(ck) else { return };
        let (dst, server) = (c.dst, c.server.clone());
        let mut outs = Vec::new();
        while let Some(o) = c.tx.poll_output() {
            outs.push(o);
        }
        for o in outs {
            match o {
                Output::Transmit(b) => self.out.push(Action::Send(dst, b)),
                Output::Response(mut r) => {
                    let Some(sk) = server.clone() else { continue };
                    r.pop_front("Via");
                    let code = r.code().unwrap_or(500);
                    if code == 100 {
                        continue;
                    }
                    let invite = r.method() == "INVITE";
                    if (200..300).contains(&code) && invite {
                        if let Some(op) = self.answer_op(&r) {
                            let call_id = r.call_id().to_string();
                            *self.anchoring.entry(call_id.clone()).or_default() += 1;
                            self.start(now, op, Pending::Answer { sk, resp: r, call_id });
                            continue;
                        }
                    }
                    // A 430 is an edge telling us the flow it held is gone (RFC 5626
                    // §5.3): the next target (the client's other flow) is tried for any
                    // method.
                    if code >= 300 && ((invite && (code == 408 || code >= 500)) || code == 430) {
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
                    if code >= 300 && invite && r.header("To").is_some() {
                        // A failed initial INVITE frees its media; a failed re-INVITE
                        // leaves the established call alone.
                        let initial = self.servers.get(&sk).is_some_and(|s| s.tx.request().to_tag().is_none());
                        if initial {
                            self.delete_media(now, r.call_id());
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

    fn forward_stateless(&mut self, now: Instant, mut req: Message) {
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
        let Some(next) = next else { return };
        let mf = req.max_forwards().unwrap_or(70);
        if mf == 0 {
            return;
        }
        req.set("Max-Forwards", (mf - 1).to_string());
        match literal_peer(&next) {
            Some(dst) => self.send_stateless(req, dst),
            None => {
                self.start(now, Op::Resolve { uri: next }, Pending::ResolveStateless { req });
            }
        }
    }

    fn send_stateless(&mut self, mut req: Message, dst: Peer) {
        // A stateless branch: the same for retransmissions of the same ACK.
        let b = req.via().and_then(|v| v.branch).unwrap_or_default();
        req.push_front(
            "Via",
            format!(
                "SIP/2.0/{} {};branch={}sl-{}",
                dst.transport.via_name(),
                self.via_addr(dst.transport),
                steer::BRANCH_PREFIX,
                b.trim_start_matches("z9hG4bK")
            ),
        );
        self.send(dst, req.to_bytes());
    }

    fn forward_response_stateless(&mut self, now: Instant, mut resp: Message) {
        let top = resp.via();
        if !top.as_ref().is_some_and(|v| v.branch.as_deref().is_some_and(|b| b.starts_with(steer::BRANCH_PREFIX))) {
            return;
        }
        resp.pop_front("Via");
        let Some(v) = resp.via() else { return };
        let host = v.received.clone().unwrap_or(v.host.clone());
        let port = v.rport.flatten().or(v.port).unwrap_or(5060);
        let Ok(ip) = host.parse::<IpAddr>() else { return };
        let transport = if v.transport == "TCP" { Transport::Tcp } else { Transport::Udp };
        let dst = Peer { transport, addr: SocketAddr::new(ip, port) };
        if (200..300).contains(&resp.code().unwrap_or(0)) && resp.method() == "INVITE" {
            if let Some(op) = self.answer_op(&resp) {
                let call_id = resp.call_id().to_string();
                *self.anchoring.entry(call_id.clone()).or_default() += 1;
                self.start(now, op, Pending::StatelessAnswer { resp, dst, call_id });
                return;
            }
        }
        self.send(dst, resp.to_bytes());
    }

    /// Drives timers: runs the transactions whose deadline has come, and fails the
    /// operations whose deadline passed without a completion.
    pub fn on_tick(&mut self, now: Instant) {
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, k))) = self.timers.pop() else { break };
            match &k {
                TimerKey::Client(ck) => {
                    let Some(c) = self.clients.get_mut(ck) else { continue };
                    if c.tx.next_timeout().is_none_or(|t| t > now) {
                        continue; // stale entry
                    }
                    c.tx.on_timeout(now);
                    self.pump_client(now, ck);
                }
                TimerKey::TimerC(ck) => {
                    let Some(c) = self.clients.get_mut(ck) else { continue };
                    if c.timer_c.is_none_or(|t| t > now) || c.tx.state() != State::Proceeding {
                        continue; // stale, or answered finally meanwhile
                    }
                    if c.given_up {
                        // Cancelled 64·T1 ago and still no final response: forget it.
                        if let Some(sk) = self.clients.remove(ck).and_then(|c| c.server) {
                            self.touched.push(TimerKey::Server(sk));
                        }
                        for sk in self.servers.iter().filter(|(_, s)| s.client.as_ref() == Some(ck)).map(|(k, _)| k) {
                            self.touched.push(TimerKey::Server(sk.clone()));
                        }
                        continue;
                    }
                    // A provisional, then silence: CANCEL the branch and go on as if it
                    // had answered 408 (the next target, or 408 to the caller).
                    let again = now + Duration::from_secs(32);
                    c.timer_c = Some(again);
                    c.given_up = true;
                    self.timers.push(Reverse((again, TimerKey::TimerC(ck.clone()))));
                    let server = c.server.take();
                    self.metrics.timer_c.fetch_add(1, Ordering::Relaxed);
                    self.cancel_branch(now, ck);
                    if let Some(sk) = server {
                        if let Some(s) = self.servers.get_mut(&sk) {
                            if s.best.is_none() {
                                s.best = Some(s.tx.request().response(408, "Request Timeout", Some("timer-c")));
                            }
                        }
                        self.touched.push(TimerKey::Server(sk.clone()));
                        self.next_target(now, &sk);
                    }
                }
                TimerKey::Server(sk) => {
                    let Some(s) = self.servers.get_mut(sk) else { continue };
                    if s.tx.next_timeout().is_none_or(|t| t > now) {
                        continue;
                    }
                    s.tx.on_timeout(now);
                    let src = s.src;
                    while let Some(o) = s.tx.poll_output() {
                        if let Output::Transmit(b) = o {
                            self.out.push(Action::Send(src, b));
                        }
                    }
                    self.touched.push(k.clone());
                }
            }
        }
        for kind in 0..self.op_deadlines.len() {
            while let Some(&(t, id)) = self.op_deadlines[kind].front() {
                if t > now {
                    break;
                }
                self.op_deadlines[kind].pop_front();
                let Some(p) = self.pending.remove(&id) else { continue };
                self.metrics.ops_timed_out.fetch_add(1, Ordering::Relaxed);
                self.resume(now, p, Err(Error::Busy("deadline passed".into())));
            }
        }
        self.settle();
    }

    /// The earliest deadline pending (the driver may sleep until then).
    pub fn next_deadline(&self) -> Option<Instant> {
        let ops = self.op_deadlines.iter().filter_map(|q| q.front().map(|(t, _)| *t));
        self.timers.peek().map(|Reverse((t, _))| *t).into_iter().chain(ops).min()
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
    use crate::proxy::focus::{tests::FakeMixer, Focus};
    use ipnet::IpNet;
    use std::time::Duration;

    /// The outside world of a core under test: the store, the relay and the focus,
    /// answering operations at once unless `hold` says to keep one back (a hung relay,
    /// a slow store), so a test completes it late, out of order, with an error, or never.
    struct World {
        bindings: HashMap<String, Vec<Binding>>,
        passwords: HashMap<String, String>,
        hold: fn(&Op) -> bool,
        held: Vec<(OpId, Op)>,
        started: Vec<Op>,
        sent: Vec<(Peer, String)>,
        banned: Vec<IpAddr>,
        /// Calls with media on the relay, and how many offers made it.
        media: HashMap<String, u32>,
        focus: Focus,
    }

    const T0: u64 = 1_700_000_000;

    impl World {
        fn new() -> Self {
            Self {
                bindings: HashMap::new(),
                passwords: HashMap::new(),
                hold: |_| false,
                held: Vec::new(),
                started: Vec::new(),
                sent: Vec::new(),
                banned: Vec::new(),
                media: HashMap::new(),
                focus: Focus::new(vec![Arc::new(FakeMixer::default())]),
            }
        }

        fn bind(&mut self, aor: &str, contacts: &[(&str, u64)]) {
            let b = contacts
                .iter()
                .map(|(c, exp)| Binding {
                    contact: c.to_string(),
                    expires_at: T0 + exp,
                    path: vec![],
                    call_id: "r".into(),
                    cseq: 1,
                    ..Binding::default()
                })
                .collect();
            self.bindings.insert(aor.into(), b);
        }

        fn perform(&mut self, op: &Op) -> Result<Done, Error> {
            Ok(match op {
                Op::Password { user, domain } => {
                    Done::Password(self.passwords.get(&format!("{user}@{domain}")).cloned())
                }
                Op::Bindings { aor, now } => Done::Bindings(
                    self.bindings.get(aor).into_iter().flatten().filter(|b| b.expires_at > *now).cloned().collect(),
                ),
                Op::SetBindings { aor, bindings } => {
                    self.bindings.insert(aor.clone(), bindings.clone());
                    Done::Stored
                }
                Op::Resolve { uri } => Done::Resolved(literal_peer(uri).into_iter().collect()),
                Op::Offer { call_id, sdp, .. } | Op::Answer { call_id, sdp, .. } => {
                    *self.media.entry(call_id.clone()).or_default() += 1;
                    Done::Sdp(sdp.replace("10.0.0.1", "192.0.2.99"))
                }
                Op::Delete { call_id } => {
                    self.media.remove(call_id);
                    Done::Deleted
                }
                Op::Join { room, call_id, offer, in_dialog } => {
                    if *in_dialog && !self.focus.is_member(call_id) {
                        Done::Joined(Err(JoinError::NoDialog))
                    } else {
                        Done::Joined(self.focus.join(room, call_id, offer))
                    }
                }
                Op::Leave { call_id } => Done::Left(self.focus.leave(call_id)),
            })
        }

        /// Performs what the core asked until it asks nothing more.
        fn run(&mut self, p: &mut Proxy, now: Instant) {
            loop {
                let actions = p.drain();
                if actions.is_empty() {
                    return;
                }
                for a in actions {
                    match a {
                        Action::Send(to, b) => self.sent.push((to, String::from_utf8_lossy(&b).into_owned())),
                        Action::Ban { ip, .. } => self.banned.push(ip),
                        Action::Start { id, op, .. } => {
                            self.started.push(op.clone());
                            if (self.hold)(&op) {
                                self.held.push((id, op));
                            } else {
                                let r = self.perform(&op);
                                p.on_completion(now, id, r);
                            }
                        }
                    }
                }
            }
        }

        /// Delivers a message and performs what follows.
        fn deliver(&mut self, p: &mut Proxy, now: Instant, src: Peer, msg: &[u8]) {
            p.on_message(now, src, msg);
            self.run(p, now);
        }

        /// Completes the held operation at `i` (performing it for real, or with `r`).
        fn complete(&mut self, p: &mut Proxy, now: Instant, i: usize, r: Option<Result<Done, Error>>) {
            let (id, op) = self.held.remove(i);
            let r = r.unwrap_or_else(|| self.perform(&op));
            p.on_completion(now, id, r);
            self.run(p, now);
        }

        fn take_sent(&mut self) -> Vec<(Peer, String)> {
            std::mem::take(&mut self.sent)
        }

        fn deletes(&self, call_id: &str) -> usize {
            self.started.iter().filter(|o| matches!(o, Op::Delete { call_id: c } if c == call_id)).count()
        }
    }

    fn proxy(anchor: bool) -> (Proxy, Instant) {
        let cfg = ProxyConfig {
            domain: "unit.test".into(),
            local: "127.0.0.1:5060".parse().unwrap(),
            nonce_secret: "s".into(),
            record_route: None,
            rate_limit: 0,
            ban: Duration::ZERO,
            // The unit tests' caller is a trusted peer, except where a test is about the
            // relay policy (`untrusted`).
            trusted: vec![IpNet::from(CALLER.parse::<SocketAddr>().unwrap().ip())],
        };
        let mut p = Proxy::new(cfg, anchor);
        p.seed(7);
        let t0 = Instant::now();
        p.set_epoch(t0, T0);
        (p, t0)
    }

    const SDP: &str =
        "v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";

    fn invite(uri: &str, branch: &str, sdp: &str) -> Vec<u8> {
        format!(
            "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK{branch}\r\nFrom: <sip:a@unit.test>;tag=fa\r\nTo: <{uri}>\r\nCall-ID: call-{branch}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        )
        .into_bytes()
    }

    fn options(n: u32) -> Vec<u8> {
        format!(
            "OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bKo{n}\r\nFrom: <sip:a@unit.test>;tag=1\r\nTo: <sip:127.0.0.1:5060>\r\nCall-ID: o{n}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    fn register(call_id: &str, cseq: u32, auth: Option<&str>) -> Vec<u8> {
        let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        format!(
            "REGISTER sip:unit.test SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5080;branch=z9hG4bKr{call_id}{cseq}\r\nFrom: <sip:bob@unit.test>;tag=r\r\nTo: <sip:bob@unit.test>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:bob@10.0.0.2:5080>\r\nExpires: 600\r\n{auth}Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    /// A REGISTER with valid digest credentials for bob (password "pw"), answering the
    /// proxy's own challenge.
    fn authorized_register(w: &mut World, p: &mut Proxy, now: Instant, call_id: &str) -> Vec<u8> {
        w.deliver(p, now, Peer::udp("10.0.0.2:5080".parse().unwrap()), &register(call_id, 1, None));
        let sent = w.take_sent();
        let challenge = sent.iter().find(|(_, m)| m.starts_with("SIP/2.0 401")).expect("a challenge").1.clone();
        let nonce = challenge.split("nonce=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
        let creds = sip::digest::Credentials {
            username: "bob".into(),
            realm: "unit.test".into(),
            nonce: nonce.clone(),
            uri: "sip:unit.test".into(),
            response: String::new(),
            algorithm: Some("MD5".into()),
            ..Default::default()
        };
        let resp = sip::digest::expected_response(&creds, "REGISTER", "pw").unwrap();
        let auth = format!(
            "Digest username=\"bob\", realm=\"unit.test\", nonce=\"{nonce}\", uri=\"sip:unit.test\", response=\"{resp}\", algorithm=MD5"
        );
        register(call_id, 2, Some(&auth))
    }

    fn first_line(m: &str) -> &str {
        m.lines().next().unwrap_or("")
    }

    fn lines_to(sent: &[(Peer, String)], to: Peer) -> Vec<&str> {
        sent.iter().filter(|(d, _)| *d == to).map(|(_, m)| first_line(m)).collect()
    }

    const CALLER: &str = "10.0.0.1:5070";

    fn caller() -> Peer {
        Peer::udp(CALLER.parse().unwrap())
    }

    #[test]
    fn a_refused_tcp_contact_fails_over_to_the_next_at_once() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        // The TCP contact is newer, so it is tried first.
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.2:5080;transport=tcp", 610), ("sip:bob@10.0.0.3:5080", 600)]);
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "1", ""));
        let out = w.take_sent();
        let tcp = Peer::tcp("10.0.0.2:5080".parse().unwrap());
        let sent = out.iter().find(|(d, _)| *d == tcp).map(|(_, b)| b.clone()).expect("sent over TCP");
        assert!(sent.starts_with("INVITE"), "{sent}");
        assert!(sent.contains("Via: SIP/2.0/TCP 127.0.0.1:5060"), "{sent}");
        assert!(sent.contains("Record-Route: <sip:127.0.0.1:5060;transport=tcp;lr>"), "{sent}");
        assert!(sent.contains("Record-Route: <sip:127.0.0.1:5060;lr>"), "double Record-Route: {sent}");
        // The connection is refused 10 ms later: the UDP contact gets the INVITE now,
        // not after Timer B.
        p.on_transport_error(t0 + Duration::from_millis(10), tcp);
        w.run(&mut p, t0);
        let udp = Peer::udp("10.0.0.3:5080".parse().unwrap());
        assert_eq!(lines_to(&w.take_sent(), udp), ["INVITE sip:bob@10.0.0.3:5080 SIP/2.0"]);
    }

    #[test]
    fn an_unanswered_invite_is_retransmitted_then_408_and_forgotten() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5080", 600)]);
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "2", ""));
        let _ = w.take_sent();
        // Timer A doubles: retransmissions at 0.5, 1.5, 3.5, 7.5 s …
        let mut sent = 0;
        let mut t = t0;
        let mut final_resp = None;
        while t < t0 + Duration::from_secs(40) && final_resp.is_none() {
            t += Duration::from_millis(100);
            p.on_tick(t);
            w.run(&mut p, t);
            for (d, b) in w.take_sent() {
                if d == caller() {
                    final_resp = Some((t - t0, first_line(&b).to_string()));
                } else {
                    sent += 1;
                }
            }
        }
        let (after, line) = final_resp.expect("a final response");
        assert_eq!(line, "SIP/2.0 408 Request Timeout");
        assert!(after >= Duration::from_secs(32) && after < Duration::from_secs(33), "{after:?}");
        assert_eq!(sent, 6, "retransmissions at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s");
        // Nothing is kept once the server transaction ends too (Timer I/J).
        p.on_tick(t + Duration::from_secs(40));
        assert_eq!((p.transactions(), p.pending_ops()), (0, 0));
    }

    /// The forwarded INVITE to `to` among `sent`, and a response to it with `code`.
    fn response_to(sent: &[(Peer, String)], to: Peer, code: u16, reason: &str) -> Vec<u8> {
        let inv = sent.iter().find(|(d, m)| *d == to && m.starts_with("INVITE ")).expect("forwarded").1.clone();
        let (m, _) = Message::parse(inv.as_bytes(), false).unwrap();
        let mut r = m.response(code, reason, Some("callee"));
        r.headers.push(("Contact".into(), "<sip:bob@10.0.0.3:5080>".into()));
        r.to_bytes()
    }

    #[test]
    fn timer_c_cancels_a_branch_that_rang_then_fell_silent_and_answers_408() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        let bob = Peer::udp("10.0.0.3:5080".parse().unwrap());
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5080", 600)]);
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "c1", ""));
        let ringing = response_to(&w.take_sent(), bob, 180, "Ringing");
        w.deliver(&mut p, t0 + Duration::from_secs(1), bob, &ringing);
        assert!(w.take_sent().iter().any(|(d, m)| *d == caller() && m.starts_with("SIP/2.0 180")));
        // Ringing for ever: nothing until Timer C, then CANCEL to bob and 408 to the caller.
        let mut t = t0 + Duration::from_secs(1);
        let mut seen = Vec::new();
        while t < t0 + Duration::from_secs(200) {
            t += Duration::from_secs(1);
            p.on_tick(t);
            w.run(&mut p, t);
            for (d, m) in w.take_sent() {
                seen.push((t - t0, d, first_line(&m).to_string()));
            }
        }
        let cancel = seen.iter().find(|(_, d, l)| *d == bob && l.starts_with("CANCEL ")).expect("a CANCEL");
        assert!(cancel.0 >= TIMER_C, "{:?}", cancel.0);
        assert!(seen.iter().any(|(_, d, l)| *d == caller() && l == "SIP/2.0 408 Request Timeout"), "{seen:?}");
        assert_eq!(p.metrics().timer_c.load(Ordering::Relaxed), 1);
        p.on_tick(t + Duration::from_secs(64));
        assert_eq!(p.transactions(), 0, "nothing left behind");
    }

    #[test]
    fn a_response_from_anywhere_but_the_callee_is_dropped() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        let (bob, forger) = (Peer::udp("10.0.0.3:5080".parse().unwrap()), Peer::udp("10.0.0.9:5080".parse().unwrap()));
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5080", 600)]);
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "f1", ""));
        let sent = w.take_sent();
        let forged = response_to(&sent, bob, 603, "Decline");
        w.deliver(&mut p, t0, forger, &forged);
        assert!(!w.take_sent().iter().any(|(d, _)| *d == caller()), "nothing relayed to the caller");
        assert_eq!(p.metrics().stray_responses.load(Ordering::Relaxed), 1);
        w.deliver(&mut p, t0, bob, &response_to(&sent, bob, 486, "Busy Here"));
        assert!(w.take_sent().iter().any(|(d, m)| *d == caller() && m.starts_with("SIP/2.0 486")));
    }

    #[test]
    fn requests_over_the_per_source_rate_are_dropped_and_counted() {
        let cfg = ProxyConfig {
            domain: "unit.test".into(),
            local: "127.0.0.1:5060".parse().unwrap(),
            nonce_secret: "s".into(),
            record_route: None,
            rate_limit: 10,
            ban: Duration::ZERO,
            trusted: Vec::new(),
        };
        let mut p = Proxy::new(cfg, false);
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.1:5070".parse().unwrap(), "10.0.0.2:5070".parse().unwrap());
        let t0 = Instant::now();
        for n in 0..30 {
            p.on_datagram(t0, a, &options(n));
        }
        assert_eq!(p.drain().len(), 20, "a burst of twice the rate passes");
        assert_eq!(p.stats().rate_limited, 10);
        p.on_datagram(t0, b, &options(100));
        assert_eq!(p.drain().len(), 1, "another source is not affected");
        // One second refills ten tokens.
        for n in 200..215 {
            p.on_datagram(t0 + Duration::from_secs(1), a, &options(n));
        }
        assert_eq!(p.drain().len(), 10);
        assert_eq!(p.metrics().rate_limited.load(Ordering::Relaxed), 15);
    }

    #[test]
    fn a_source_over_its_rate_is_banned_for_a_while_and_others_are_not() {
        let (mut p, t0) = untrusted();
        p.limit = Some(RateLimit::new(10.0, Duration::from_secs(30)));
        let mut w = World::new();
        let (a, b) = (caller(), Peer::udp("10.0.0.2:5070".parse().unwrap()));
        for n in 0..100 {
            w.deliver(&mut p, t0, a, &options(n));
        }
        assert_eq!(w.take_sent().len(), 20, "the burst is answered, nothing after it");
        assert_eq!(w.banned, vec![a.addr.ip()], "banned once");
        assert_eq!(p.metrics().bans.load(Ordering::Relaxed), 1);
        // Ten seconds later its bucket would have refilled: still banned.
        w.deliver(&mut p, t0 + Duration::from_secs(10), a, &options(500));
        assert!(w.take_sent().is_empty());
        w.deliver(&mut p, t0 + Duration::from_secs(10), b, &options(501));
        assert_eq!(w.take_sent().len(), 1, "another source is served");
        // After the ban: served again, with a full burst.
        w.deliver(&mut p, t0 + Duration::from_secs(31), a, &options(600));
        assert_eq!(w.take_sent().len(), 1);
        assert_eq!(w.banned.len(), 1);
    }

    #[test]
    fn error_answers_to_one_source_are_bounded() {
        let (mut p, t0) = untrusted();
        let mut w = World::new();
        // A forged source: INVITEs for elsewhere, each answered 403 (and retransmitted
        // until ACKed) — to the forged address.
        for n in 0..200 {
            let b = format!("f{n}");
            w.deliver(&mut p, t0, caller(), &request("INVITE", "sip:x@198.51.100.7", "sip:e@x.test", &b, ""));
        }
        let sent = w.take_sent();
        assert_eq!(sent.len(), 40, "a burst of twice the per-second share");
        assert_eq!(p.metrics().replies_suppressed.load(Ordering::Relaxed), 160);
        assert!(p.transactions() <= 40, "suppressed answers leave no transaction behind");
    }

    #[test]
    fn the_focus_answers_conference_invites_and_byes() {
        let (mut p, t0) = proxy(false);
        p.set_focus(true);
        let mut w = World::new();
        let inv = invite("sip:conf-room@unit.test", "3", SDP);
        w.deliver(&mut p, t0, caller(), &inv);
        let out = w.take_sent();
        let lines: Vec<&str> = out.iter().map(|(_, b)| first_line(b)).collect();
        assert_eq!(lines, ["SIP/2.0 100 Trying", "SIP/2.0 200 OK"]);
        let ok = out[1].1.clone();
        assert!(
            ok.contains("m=audio 40000 RTP/AVP 0") && ok.contains("Contact: <sip:conf-room@127.0.0.1:5060>"),
            "{ok}"
        );
        let tag = |m: &str| m.lines().find(|l| l.starts_with("To:")).unwrap().to_string();
        // A retransmitted INVITE (the 200 was lost) gets the same answer and To tag.
        w.deliver(&mut p, t0 + Duration::from_millis(500), caller(), &inv);
        let again = w.take_sent();
        assert_eq!(tag(&again.last().unwrap().1), tag(&ok));
        assert_eq!(w.focus.counts(), (1, 1));
        // ACK and BYE are ours: nothing is forwarded, BYE gets 200 and leaves the room.
        let to = tag(&ok);
        let in_dialog = |m: &str, cseq: u32, branch: &str| {
            format!(
                "{m} sip:conf-room@127.0.0.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK{branch}\r\nFrom: <sip:a@unit.test>;tag=fa\r\n{to}\r\nCall-ID: call-3\r\nCSeq: {cseq} {m}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
        };
        w.deliver(&mut p, t0 + Duration::from_secs(1), caller(), in_dialog("ACK", 1, "ack").as_bytes());
        assert!(w.take_sent().is_empty(), "the ACK is absorbed");
        w.deliver(&mut p, t0 + Duration::from_secs(2), caller(), in_dialog("BYE", 2, "bye").as_bytes());
        let out = w.take_sent();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, first_line(&out[0].1)), (caller(), "SIP/2.0 200 OK"));
        assert_eq!(w.focus.counts(), (0, 0));
        // A BYE or re-INVITE for a dialog the focus does not know: 481.
        w.deliver(&mut p, t0 + Duration::from_secs(3), caller(), in_dialog("BYE", 3, "bye2").as_bytes());
        assert_eq!(first_line(&w.take_sent()[0].1), "SIP/2.0 481 Call/Transaction Does Not Exist");
        let reinvite = in_dialog("INVITE", 4, "re")
            .replace("Content-Length: 0\r\n\r\n", &format!("Content-Length: {}\r\n\r\n{SDP}", SDP.len()));
        w.deliver(&mut p, t0 + Duration::from_secs(4), caller(), reinvite.as_bytes());
        assert_eq!(first_line(&w.take_sent().last().unwrap().1), "SIP/2.0 481 Call/Transaction Does Not Exist");
        assert_eq!(w.focus.counts(), (0, 0));
    }

    /// The bar of the redesign, in the core: while an INVITE waits for a relay that
    /// never answers, OPTIONS and REGISTER are answered at once; the INVITE gets 503
    /// at the anchor deadline, and the relay's late answer changes nothing.
    #[test]
    fn options_and_register_are_answered_while_an_invite_waits_on_a_hung_relay() {
        let (mut p, t0) = proxy(true);
        let mut w = World::new();
        w.hold = |op| matches!(op, Op::Offer { .. });
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5080", 600)]);
        w.passwords.insert("bob@unit.test".into(), "pw".into());
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "4", SDP));
        assert_eq!(lines_to(&w.take_sent(), caller()), ["SIP/2.0 100 Trying"]);
        assert_eq!(w.held.len(), 1, "the offer waits on the relay");
        let t = t0 + Duration::from_millis(10);
        w.deliver(&mut p, t, caller(), &options(1));
        assert_eq!(lines_to(&w.take_sent(), caller()), ["SIP/2.0 200 OK"]);
        let reg = authorized_register(&mut w, &mut p, t, "reg-1");
        w.deliver(&mut p, t, Peer::udp("10.0.0.2:5080".parse().unwrap()), &reg);
        let sent = w.take_sent();
        assert_eq!(sent.iter().map(|(_, m)| first_line(m)).collect::<Vec<_>>(), ["SIP/2.0 200 OK"]);
        assert!(sent[0].1.contains("Contact: <sip:bob@10.0.0.2:5080>;expires=600"), "{}", sent[0].1);
        // The anchor deadline passes: 503, the half-made media is deleted, nothing is
        // forwarded to the callee.
        let deadline = t0 + Deadlines::default().anchor;
        p.on_tick(deadline);
        w.run(&mut p, deadline);
        let sent = w.take_sent();
        assert_eq!(lines_to(&sent, caller()), ["SIP/2.0 503 Service Unavailable"]);
        assert_eq!(lines_to(&sent, Peer::udp("10.0.0.3:5080".parse().unwrap())), Vec::<&str>::new());
        assert_eq!(p.metrics().ops_timed_out.load(Ordering::Relaxed), 1);
        // The relay answers late: ignored.
        w.complete(&mut p, deadline + Duration::from_millis(1), 0, None);
        assert!(w.take_sent().is_empty());
    }

    #[test]
    fn a_failed_anchor_answers_503_and_deletes_the_call_media() {
        let (mut p, t0) = proxy(true);
        let mut w = World::new();
        w.hold = |op| matches!(op, Op::Offer { .. });
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5080", 600)]);
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "5", SDP));
        w.complete(&mut p, t0, 0, Some(Err(Error::Busy("no relay answered".into()))));
        assert_eq!(lines_to(&w.take_sent(), caller()), ["SIP/2.0 100 Trying", "SIP/2.0 503 Service Unavailable"]);
        assert_eq!(w.deletes("call-5"), 1);
        assert_eq!(p.metrics().ops_failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn offers_completing_out_of_order_each_forward_their_own_sdp() {
        let (mut p, t0) = proxy(true);
        let mut w = World::new();
        w.hold = |op| matches!(op, Op::Offer { .. });
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5080", 600)]);
        let sdp_b = SDP.replace("7000", "7100");
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "a", SDP));
        w.deliver(&mut p, t0, caller(), &invite("sip:bob@unit.test", "b", &sdp_b));
        assert_eq!(w.held.len(), 2);
        // The second completes first.
        w.complete(&mut p, t0 + Duration::from_millis(5), 1, None);
        w.complete(&mut p, t0 + Duration::from_millis(9), 0, None);
        let bob = Peer::udp("10.0.0.3:5080".parse().unwrap());
        let forwarded: Vec<String> = w.take_sent().into_iter().filter(|(d, _)| *d == bob).map(|(_, m)| m).collect();
        assert_eq!(forwarded.len(), 2);
        assert!(forwarded[0].contains("Call-ID: call-b") && forwarded[0].contains("m=audio 7100"), "{}", forwarded[0]);
        assert!(forwarded[1].contains("Call-ID: call-a") && forwarded[1].contains("m=audio 7000"), "{}", forwarded[1]);
        assert!(forwarded.iter().all(|m| m.contains("c=IN IP4 192.0.2.99")), "anchored SDP forwarded");
    }

    #[test]
    fn a_cancel_while_the_offer_is_pending_ends_the_invite_and_frees_the_late_media() {
        let (mut p, t0) = proxy(true);
        let mut w = World::new();
        w.hold = |op| matches!(op, Op::Offer { .. });
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5080", 600)]);
        let inv = String::from_utf8(invite("sip:bob@unit.test", "6", SDP)).unwrap();
        w.deliver(&mut p, t0, caller(), inv.as_bytes());
        let cancel = inv
            .replace("INVITE sip:bob@unit.test SIP/2.0", "CANCEL sip:bob@unit.test SIP/2.0")
            .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL")
            .split("Content-Type")
            .next()
            .unwrap()
            .to_string()
            + "Content-Length: 0\r\n\r\n";
        w.deliver(&mut p, t0 + Duration::from_millis(20), caller(), cancel.as_bytes());
        assert_eq!(
            lines_to(&w.take_sent(), caller()),
            ["SIP/2.0 100 Trying", "SIP/2.0 200 OK", "SIP/2.0 487 Request Terminated"]
        );
        assert_eq!(w.deletes("call-6"), 1);
        // The relay answers the offer after all: its media is freed, nothing forwarded.
        w.complete(&mut p, t0 + Duration::from_millis(40), 0, None);
        assert!(w.take_sent().is_empty());
        assert_eq!(w.deletes("call-6"), 2);
        assert!(!w.media.contains_key("call-6"), "no media left behind");
    }

    #[test]
    fn a_bye_while_a_reoffer_is_pending_frees_the_media_again_once_it_completes() {
        let (mut p, t0) = proxy(true);
        let mut w = World::new();
        w.hold = |op| matches!(op, Op::Offer { to_tag: Some(_), .. });
        let callee = "sip:bob@10.0.0.3:5080";
        let in_dialog = |m: &str, cseq: u32, body: &str| {
            format!(
                "{m} {callee} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK{m}{cseq}\r\nFrom: <sip:a@unit.test>;tag=fa\r\nTo: <sip:bob@unit.test>;tag=tb\r\nCall-ID: call-7\r\nCSeq: {cseq} {m}\r\nMax-Forwards: 70\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        w.deliver(&mut p, t0, caller(), in_dialog("INVITE", 2, SDP).as_bytes());
        assert_eq!(w.held.len(), 1, "the re-offer waits on the relay");
        w.deliver(&mut p, t0 + Duration::from_millis(5), caller(), in_dialog("BYE", 3, "").as_bytes());
        let bob = Peer::udp("10.0.0.3:5080".parse().unwrap());
        assert_eq!(lines_to(&w.take_sent(), bob), ["BYE sip:bob@10.0.0.3:5080 SIP/2.0"], "the BYE does not wait");
        assert_eq!(w.deletes("call-7"), 1);
        w.complete(&mut p, t0 + Duration::from_millis(50), 0, None);
        assert_eq!(w.deletes("call-7"), 2, "the media the late re-offer made is freed too");
        assert!(!w.media.contains_key("call-7"));
    }

    #[test]
    fn registers_wait_for_a_slow_store_without_holding_up_other_requests() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        w.passwords.insert("bob@unit.test".into(), "pw".into());
        w.hold = |op| matches!(op, Op::Bindings { .. } | Op::SetBindings { .. });
        let bob = Peer::udp("10.0.0.2:5080".parse().unwrap());
        let r1 = authorized_register(&mut w, &mut p, t0, "reg-a");
        let r2 = authorized_register(&mut w, &mut p, t0, "reg-b");
        w.deliver(&mut p, t0, bob, &r1);
        w.deliver(&mut p, t0, bob, &r2);
        // One AOR is written by one REGISTER at a time: the second waits for the first.
        assert_eq!(w.held.iter().filter(|(_, o)| matches!(o, Op::Bindings { .. })).count(), 1);
        w.deliver(&mut p, t0, caller(), &options(9));
        assert_eq!(lines_to(&w.take_sent(), caller()), ["SIP/2.0 200 OK"], "OPTIONS does not wait");
        // The first's read and write complete, then the second's.
        w.complete(&mut p, t0, 0, None);
        w.complete(&mut p, t0, 0, None);
        assert_eq!(lines_to(&w.take_sent(), bob), ["SIP/2.0 200 OK"]);
        w.complete(&mut p, t0, 0, None);
        // The store fails the second's write: 503, never a hang.
        w.complete(&mut p, t0, 0, Some(Err(Error::Store("etcd: deadline exceeded".into()))));
        assert_eq!(lines_to(&w.take_sent(), bob), ["SIP/2.0 503 Service Unavailable"]);
        assert_eq!((w.held.len(), p.pending_ops()), (0, 0));
    }

    /// A proxy that trusts nobody (the relay policy applies to every source).
    fn untrusted() -> (Proxy, Instant) {
        let (mut p, t0) = proxy(false);
        p.cfg.trusted.clear();
        (p, t0)
    }

    fn request(method: &str, uri: &str, from: &str, branch: &str, extra: &str) -> Vec<u8> {
        format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK{branch}\r\nFrom: <{from}>;tag=f{branch}\r\nTo: <{uri}>\r\nCall-ID: c-{branch}\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\n{extra}Content-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    /// `Proxy-Authorization` answering the first challenge of a 407 for `user`/`pw`.
    fn proxy_auth(challenge: &str, method: &str, uri: &str, user: &str, pw: &str, nc: u32) -> String {
        let nonce = challenge.split("nonce=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
        let creds = sip::digest::Credentials {
            username: user.into(),
            realm: "unit.test".into(),
            nonce: nonce.clone(),
            uri: uri.into(),
            algorithm: Some("MD5".into()),
            qop: Some("auth".into()),
            nc: Some(format!("{nc:08x}")),
            cnonce: Some("cn".into()),
            ..Default::default()
        };
        let resp = sip::digest::expected_response(&creds, method, pw).unwrap();
        format!(
            "Proxy-Authorization: Digest username=\"{user}\", realm=\"unit.test\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{resp}\", algorithm=MD5, qop=auth, nc={nc:08x}, cnonce=\"cn\"\r\n"
        )
    }

    #[test]
    fn a_strangers_request_for_another_domain_is_403_and_nothing_is_sent_or_looked_up() {
        let (mut p, t0) = untrusted();
        let mut w = World::new();
        for (n, m) in ["INVITE", "MESSAGE", "OPTIONS", "REGISTER"].iter().enumerate() {
            let b = format!("s{n}");
            w.deliver(&mut p, t0, caller(), &request(m, "sip:victim@198.51.100.7", "sip:eve@198.51.100.9", &b, ""));
        }
        // A Route naming a foreign hop does not help either.
        let routed = request("INVITE", "sip:bob@unit.test", "sip:eve@x.test", "s9", "Route: <sip:198.51.100.7;lr>\r\n");
        w.deliver(&mut p, t0, caller(), &routed);
        let sent = w.take_sent();
        assert_eq!(sent.len(), 5, "{sent:?}");
        assert!(sent.iter().all(|(to, m)| *to == caller() && first_line(m) == "SIP/2.0 403 Not relaying"), "{sent:?}");
        assert!(w.started.is_empty(), "no lookup, no resolution: {:?}", w.started);
        assert_eq!(p.metrics().not_relayed.load(Ordering::Relaxed), 5);
        // A stranger's ACK for elsewhere is dropped, not forwarded.
        let ack = request("ACK", "sip:victim@198.51.100.7", "sip:eve@x.test", "s10", "");
        w.deliver(&mut p, t0, caller(), &ack);
        assert!(w.take_sent().is_empty());
        // A stranger may still call one of our users (an incoming call).
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5090", 600)]);
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", "sip:bob@unit.test", "sip:eve@x.test", "s11", ""));
        let sent = w.take_sent();
        assert!(sent.iter().any(|(to, m)| to.addr.port() == 5090 && m.starts_with("MESSAGE ")), "{sent:?}");
    }

    #[test]
    fn a_local_callers_request_is_challenged_and_proceeds_once_and_only_once_per_nonce_count() {
        let (mut p, t0) = untrusted();
        let mut w = World::new();
        w.passwords.insert("alice@unit.test".into(), sip::digest::Secret::new("alice", "unit.test", "pw").encode());
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5090", 600)]);
        let (uri, from) = ("sip:bob@unit.test", "sip:alice@unit.test");
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", uri, from, "a1", ""));
        let sent = w.take_sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let challenge = sent[0].1.clone();
        assert!(challenge.starts_with("SIP/2.0 407 Proxy Authentication Required"), "{challenge}");
        assert!(challenge.contains("Proxy-Authenticate: Digest realm=\"unit.test\""), "{challenge}");
        assert!(w.started.is_empty(), "nothing looked up before the caller proves who it is");
        // Wrong password: 403; nothing forwarded.
        let bad = proxy_auth(&challenge, "MESSAGE", uri, "alice", "nope", 1);
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", uri, from, "a2", &bad));
        let sent = w.take_sent();
        assert!(sent.len() == 1 && first_line(&sent[0].1) == "SIP/2.0 403 Forbidden", "{sent:?}");
        // Credentials of another user for alice's From: 403 without a store lookup.
        let other = proxy_auth(&challenge, "MESSAGE", uri, "mallory", "pw", 1);
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", uri, from, "a3", &other));
        let sent = w.take_sent();
        assert!(sent.len() == 1 && sent[0].1.starts_with("SIP/2.0 403 From does not match"), "{sent:?}");
        // Good credentials: forwarded to bob, without our credentials.
        let good = proxy_auth(&challenge, "MESSAGE", uri, "alice", "pw", 1);
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", uri, from, "a4", &good));
        let sent = w.take_sent();
        let fwd = sent.iter().find(|(to, _)| to.addr.port() == 5090).expect("forwarded to bob");
        assert!(!fwd.1.contains("Proxy-Authorization"), "{}", fwd.1);
        // The same credentials replayed in a new request: challenged again, stale.
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", uri, from, "a5", &good));
        let sent = w.take_sent();
        assert!(sent.len() == 1 && sent[0].1.starts_with("SIP/2.0 407"), "{sent:?}");
        assert!(sent[0].1.contains("stale=true"), "{}", sent[0].1);
        assert_eq!(p.metrics().replays.load(Ordering::Relaxed), 1);
        // The next nonce-count is fine.
        let next = proxy_auth(&challenge, "MESSAGE", uri, "alice", "pw", 2);
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", uri, from, "a6", &next));
        assert!(w.take_sent().iter().any(|(to, _)| to.addr.port() == 5090));
    }

    #[test]
    fn conference_rooms_admit_only_authenticated_users() {
        let (mut p, t0) = untrusted();
        p.set_focus(true);
        let mut w = World::new();
        w.passwords.insert("carol@unit.test".into(), sip::digest::Secret::new("carol", "unit.test", "pw").encode());
        let uri = "sip:conf-room@unit.test";
        let inv = |branch: &str, extra: &str| {
            format!(
                "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK{branch}\r\nFrom: <sip:eve@x.test>;tag=f\r\nTo: <{uri}>\r\nCall-ID: conf-{branch}\r\nCSeq: 1 INVITE\r\nContact: <sip:eve@10.0.0.1:5070>\r\nMax-Forwards: 70\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{SDP}",
                SDP.len()
            )
            .into_bytes()
        };
        w.deliver(&mut p, t0, caller(), &inv("j1", ""));
        let sent = w.take_sent();
        let challenge = sent.iter().find(|(_, m)| m.starts_with("SIP/2.0 407")).expect("challenged").1.clone();
        assert!(!w.started.iter().any(|o| matches!(o, Op::Join { .. })), "nobody joined");
        let auth = proxy_auth(&challenge, "INVITE", uri, "carol", "pw", 1);
        w.deliver(&mut p, t0, caller(), &inv("j2", &auth));
        assert!(w.started.iter().any(|o| matches!(o, Op::Join { .. })), "{:?}", w.started);
        assert!(w.take_sent().iter().any(|(_, m)| m.starts_with("SIP/2.0 200")));
    }

    #[test]
    fn keepalives_to_the_proxy_itself_and_requests_of_trusted_peers_pass() {
        let (mut p, t0) = untrusted();
        let mut w = World::new();
        w.deliver(&mut p, t0, caller(), &options(1));
        assert!(first_line(&w.take_sent()[0].1).starts_with("SIP/2.0 200"));
        p.cfg.trusted = vec!["10.0.0.0/24".parse().unwrap()];
        w.deliver(&mut p, t0, caller(), &request("MESSAGE", "sip:x@198.51.100.7", "sip:a@unit.test", "t1", ""));
        let sent = w.take_sent();
        assert!(sent.iter().any(|(to, m)| to.addr.port() == 5060 && m.starts_with("MESSAGE ")), "{sent:?}");
    }

    // RFC 5626 flows through load balancers (issue 12, connection reuse).

    const LB1: &str = "192.0.2.10:5060";
    const LB2: &str = "192.0.2.11:5060";
    const CAROL_INSTANCE: &str = "<urn:uuid:00000000-0000-1000-8000-000a95a0e128>";

    fn lb(addr: &str) -> Peer {
        Peer::udp(addr.parse().unwrap())
    }

    fn lbs(addrs: &[&str]) -> LiveLbs {
        LiveLbs::new(addrs.iter().map(|a| a.parse::<SocketAddr>().unwrap()))
    }

    /// Carol's phone keeps two flows: reg-id 1 through LB1 (registered last, so tried
    /// first) and reg-id 2 through LB2.
    fn two_flows(w: &mut World) {
        let flow = |reg_id: u32, lb: &str, expires: u64| Binding {
            contact: "sip:carol@10.0.0.7:5060;ob".into(),
            expires_at: T0 + expires,
            path: vec![format!("<sip:tok{reg_id}@{lb};lr;ob>")],
            call_id: format!("reg-{reg_id}"),
            cseq: 1,
            received: Some("198.51.100.4:40000".into()),
            instance: Some(CAROL_INSTANCE.into()),
            reg_id: Some(reg_id),
        };
        w.bindings.insert("carol@unit.test".into(), vec![flow(2, LB2, 590), flow(1, LB1, 600)]);
    }

    /// What was sent to `to`, whole.
    fn sent_to(sent: &[(Peer, String)], to: Peer) -> Vec<String> {
        sent.iter().filter(|(d, _)| *d == to).map(|(_, m)| m.clone()).collect()
    }

    #[test]
    fn with_both_load_balancers_live_the_newest_flow_is_tried_through_its_own_lb() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        two_flows(&mut w);
        p.on_peers(t0, lbs(&[LB1, LB2]));
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl1", ""));
        let sent = w.take_sent();
        let to_lb1 = sent_to(&sent, lb(LB1));
        assert_eq!(to_lb1.len(), 1, "{sent:?}");
        assert!(to_lb1[0].starts_with("INVITE sip:carol@10.0.0.7:5060;ob SIP/2.0"), "{}", to_lb1[0]);
        assert!(to_lb1[0].contains(&format!("Route: <sip:tok1@{LB1};lr;ob>")), "{}", to_lb1[0]);
        assert!(sent_to(&sent, lb(LB2)).is_empty());
        assert_eq!(p.metrics().flows_skipped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn when_one_lb_dies_the_client_is_reached_through_its_other_flow() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        two_flows(&mut w);
        p.on_peers(t0, lbs(&[LB1, LB2]));
        p.on_peers(t0, lbs(&[LB2])); // LB1's lease ended
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl2", ""));
        let sent = w.take_sent();
        assert!(sent_to(&sent, lb(LB1)).is_empty(), "nothing to the dead LB: {sent:?}");
        let to_lb2 = sent_to(&sent, lb(LB2));
        assert_eq!(to_lb2.len(), 1, "{sent:?}");
        assert!(to_lb2[0].contains(&format!("Route: <sip:tok2@{LB2};lr;ob>")), "{}", to_lb2[0]);
        assert_eq!(p.metrics().flows_skipped.load(Ordering::Relaxed), 1);
        assert_eq!(p.metrics().flow_failed.load(Ordering::Relaxed), 0);
        assert_eq!(p.metrics().live_lbs.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn when_every_flow_s_lb_is_gone_the_caller_gets_430_at_once() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        two_flows(&mut w);
        p.on_peers(t0, lbs(&[LB1, LB2]));
        p.on_peers(t0, lbs(&[]));
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl3", ""));
        let sent = w.take_sent();
        // At the same instant: no Timer B, no 408 after 32 s.
        assert_eq!(lines_to(&sent, caller()), ["SIP/2.0 100 Trying", "SIP/2.0 430 Flow Failed"]);
        assert_eq!(sent.len(), 2, "nothing forwarded: {sent:?}");
        assert_eq!(p.metrics().flow_failed.load(Ordering::Relaxed), 1);
        assert_eq!(p.metrics().flows_skipped.load(Ordering::Relaxed), 2);
        // Another device of the same AOR without a flow is still tried.
        w.bindings.get_mut("carol@unit.test").unwrap().push(Binding {
            contact: "sip:carol@10.0.0.9:5060".into(),
            expires_at: T0 + 300,
            ..Binding::default()
        });
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl4", ""));
        let desk = Peer::udp("10.0.0.9:5060".parse().unwrap());
        assert_eq!(lines_to(&w.take_sent(), desk), ["INVITE sip:carol@10.0.0.9:5060 SIP/2.0"]);
    }

    #[test]
    fn without_membership_flows_are_tried_as_before() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        two_flows(&mut w);
        // No membership view ever came: LB1 is not judged, the INVITE goes there.
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl5", ""));
        let sent = w.take_sent();
        assert_eq!(lines_to(&sent, lb(LB1)), ["INVITE sip:carol@10.0.0.7:5060;ob SIP/2.0"]);
        assert_eq!(p.metrics().flows_skipped.load(Ordering::Relaxed), 0);
        // A Path without `ob` (an edge outside the cluster) is never judged either.
        w.bindings
            .get_mut("carol@unit.test")
            .unwrap()
            .iter_mut()
            .for_each(|b| b.path = vec![format!("<sip:{LB1};lr>")]);
        p.on_peers(t0, lbs(&[]));
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl6", ""));
        assert_eq!(lines_to(&w.take_sent(), lb(LB1)), ["INVITE sip:carol@10.0.0.7:5060;ob SIP/2.0"]);
    }

    #[test]
    fn an_invite_waiting_on_an_lb_that_then_leaves_membership_goes_to_the_other_flow_at_once() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        two_flows(&mut w);
        p.on_peers(t0, lbs(&[LB1, LB2]));
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl8", ""));
        assert_eq!(lines_to(&w.take_sent(), lb(LB1)), ["INVITE sip:carol@10.0.0.7:5060;ob SIP/2.0"]);
        // LB1 was killed: no answer; its lease ends 3 s later.
        let t = t0 + Duration::from_secs(3);
        p.on_tick(t);
        let _ = w.take_sent(); // LB1's retransmissions
        p.on_peers(t, lbs(&[LB2]));
        w.run(&mut p, t);
        let sent = w.take_sent();
        assert_eq!(lines_to(&sent, lb(LB2)), ["INVITE sip:carol@10.0.0.7:5060;ob SIP/2.0"], "{sent:?}");
        // Nothing more goes to LB1, and no 408 comes at its Timer B (32 s; the INVITE
        // to LB2 would have its own at 35 s).
        let mut t = t;
        while t < t0 + Duration::from_secs(34) {
            t += Duration::from_millis(500);
            p.on_tick(t);
            w.run(&mut p, t);
        }
        let sent = w.take_sent();
        assert!(lines_to(&sent, lb(LB1)).is_empty(), "{sent:?}");
        assert!(!lines_to(&sent, caller()).contains(&"SIP/2.0 408 Request Timeout"), "{sent:?}");
    }

    #[test]
    fn a_430_from_a_live_lb_whose_client_connection_is_gone_tries_the_other_flow_now() {
        let (mut p, t0) = proxy(false);
        let mut w = World::new();
        two_flows(&mut w);
        p.on_peers(t0, lbs(&[LB1, LB2]));
        w.deliver(&mut p, t0, caller(), &invite("sip:carol@unit.test", "fl7", ""));
        let sent = w.take_sent();
        let failed = response_to(&sent, lb(LB1), 430, "Flow Failed");
        let t = t0 + Duration::from_millis(3);
        w.deliver(&mut p, t, lb(LB1), &failed);
        let sent = w.take_sent();
        assert_eq!(lines_to(&sent, lb(LB2)), ["INVITE sip:carol@10.0.0.7:5060;ob SIP/2.0"], "{sent:?}");
        assert!(!lines_to(&sent, caller()).iter().any(|l| l.contains("430")), "not relayed while a flow is left");
        // The other flow's LB says the same: now the caller gets the 430.
        let failed = response_to(&sent, lb(LB2), 430, "Flow Failed");
        w.deliver(&mut p, t, lb(LB2), &failed);
        assert!(lines_to(&w.take_sent(), caller()).contains(&"SIP/2.0 430 Flow Failed"));
    }

    /// A REGISTER of bob forwarded by the LB at `LB1` (its Via on top, the phone's
    /// below with the address the LB saw), with a flow.
    fn register_via_lb(cseq: u32, auth: &str) -> Vec<u8> {
        format!(
            "REGISTER sip:unit.test SIP/2.0\r\nVia: SIP/2.0/UDP {LB1};branch=z9hG4bKlb{cseq}\r\nVia: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKph{cseq};received=198.51.100.4;rport=40000\r\nFrom: <sip:bob@unit.test>;tag=r\r\nTo: <sip:bob@unit.test>\r\nCall-ID: lb-reg\r\nCSeq: {cseq} REGISTER\r\nPath: <sip:tok1@{LB1};lr;ob>\r\nSupported: outbound, path\r\nContact: <sip:bob@10.0.0.7:5060;ob>;+sip.instance=\"{CAROL_INSTANCE}\";reg-id=1\r\nExpires: 600\r\n{auth}Max-Forwards: 69\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn a_register_through_a_live_lb_keeps_the_flow_and_the_phone_s_real_address() {
        let (mut p, t0) = untrusted();
        let mut w = World::new();
        w.passwords.insert("bob@unit.test".into(), "pw".into());
        p.on_peers(t0, lbs(&[LB1]));
        w.deliver(&mut p, t0, lb(LB1), &register_via_lb(1, ""));
        let sent = w.take_sent();
        let challenge = sent.iter().find(|(_, m)| m.starts_with("SIP/2.0 401")).expect("challenged").1.clone();
        let nonce = challenge.split("nonce=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
        let creds = sip::digest::Credentials {
            username: "bob".into(),
            realm: "unit.test".into(),
            nonce: nonce.clone(),
            uri: "sip:unit.test".into(),
            algorithm: Some("MD5".into()),
            ..Default::default()
        };
        let resp = sip::digest::expected_response(&creds, "REGISTER", "pw").unwrap();
        let auth = format!(
            "Authorization: Digest username=\"bob\", realm=\"unit.test\", nonce=\"{nonce}\", uri=\"sip:unit.test\", response=\"{resp}\", algorithm=MD5\r\n"
        );
        w.deliver(&mut p, t0, lb(LB1), &register_via_lb(2, &auth));
        let sent = w.take_sent();
        let ok = &sent_to(&sent, lb(LB1))[0];
        assert!(ok.starts_with("SIP/2.0 200 OK"), "{ok}");
        assert!(ok.contains("Require: outbound"), "{ok}");
        let b = &w.bindings["bob@unit.test"][0];
        assert_eq!(b.received.as_deref(), Some("198.51.100.4:40000"), "the phone's address, not the LB's");
        assert_eq!((b.reg_id, b.instance.as_deref()), (Some(1), Some(CAROL_INSTANCE)));
        assert_eq!(b.path, [format!("<sip:tok1@{LB1};lr;ob>")]);
    }

    #[test]
    fn a_live_lb_is_not_rate_limited_but_its_callers_are_still_challenged() {
        let (mut p, t0) = untrusted();
        p.limit = Some(RateLimit::new(10.0, Duration::from_secs(30)));
        let mut w = World::new();
        w.bind("bob@unit.test", &[("sip:bob@10.0.0.3:5090", 600)]);
        p.on_peers(t0, lbs(&[LB1]));
        for n in 0..100 {
            let b = format!("lbm{n}");
            let mut m =
                String::from_utf8(request("MESSAGE", "sip:bob@unit.test", "sip:alice@unit.test", &b, "")).unwrap();
            m = m.replacen("Via: ", &format!("Via: SIP/2.0/UDP {LB1};branch=z9hG4bKx{n}\r\nVia: "), 1);
            w.deliver(&mut p, t0, lb(LB1), m.as_bytes());
        }
        let sent = w.take_sent();
        assert_eq!(sent.len(), 100, "every request answered, none dropped");
        assert!(sent.iter().all(|(to, m)| *to == lb(LB1) && m.starts_with("SIP/2.0 407")), "challenged, not relayed");
        assert_eq!((p.metrics().rate_limited.load(Ordering::Relaxed), w.banned.len()), (0, 0));
        assert!(w.started.is_empty(), "nothing looked up for an unauthenticated caller");
        // A stranger at another address sending as much is limited and banned.
        for n in 0..100 {
            w.deliver(&mut p, t0, caller(), &options(1000 + n));
        }
        assert_eq!(w.take_sent().len(), 20);
        assert_eq!(w.banned, vec![caller().addr.ip()]);
        // Once the LB has left membership, it is a source like any other.
        p.on_peers(t0, lbs(&[]));
        for n in 0..30 {
            w.deliver(&mut p, t0, lb(LB1), &options(2000 + n));
        }
        assert_eq!(w.take_sent().len(), 20);
    }

    #[test]
    fn live_lbs_come_from_the_membership_view() {
        use crate::cluster::{Member, Role, View};
        let mut a = Member::new(Role::Lb, "a");
        a.sip = Some(LB1.into());
        let mut p = Member::new(Role::Proxy, "p");
        p.sip = Some(LB2.into());
        let mut broken = Member::new(Role::Lb, "b");
        broken.sip = Some("nonsense".into());
        let view = View { revision: 3, members: vec![a, broken, p].into() };
        let l = LiveLbs::from_view(&view);
        assert_eq!(l.len(), 1);
        assert!(l.contains(LB1.parse().unwrap()) && !l.contains(LB2.parse().unwrap()));
    }
}
