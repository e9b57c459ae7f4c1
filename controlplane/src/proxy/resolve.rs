//! Locating SIP servers (RFC 3263): from a URI to the ordered list of transports and
//! addresses to try.
//!
//! Two halves, so the proxy core never waits on DNS:
//!
//! - [`Lookup`] is sans IO. It reads the URI and says which DNS questions to ask
//!   ([`Step::Ask`]); the caller answers them ([`Lookup::on_answers`]) until it says
//!   [`Step::Done`]. It decides everything RFC 3263 §4 leaves to the client: an IP
//!   address needs no DNS; an explicit port means A/AAAA only; `;transport=` means SRV
//!   for that transport; otherwise NAPTR, then SRV (`_sip._udp`, `_sip._tcp`), then
//!   A/AAAA at port 5060. SRV targets are ordered by priority and, within a priority,
//!   by RFC 2782's weighted random selection with randomness the caller passes in, so
//!   tests are deterministic.
//! - [`Resolver`] answers those questions with hickory's asynchronous resolver on tokio,
//!   bounded by one deadline per [`Resolver::resolve`].
//!
//! The result lists *every* target in try order: on a 503, a transport error or a
//! timeout the caller sends a new transaction to the next one (RFC 3263 §4.3), so a
//! dead server costs one transaction timeout, not the whole call. Only UDP and TCP are
//! spoken here: `sips:` URIs, `;transport=tls` and NAPTR services for TLS, SCTP or
//! WebSocket are skipped or refused.
//!
//! Errors carry no part of the URI: URIs name subscribers, and errors end up in logs.

use futures_util::future::join_all;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig as HickoryConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use serde::{Deserialize, Serialize};
use sip::{Peer, Transport};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The port of `sip:` URIs over UDP and TCP when neither the URI nor SRV names one
/// (RFC 3261 §19.1.2).
pub const DEFAULT_PORT: u16 = 5060;

/// NAPTR services followed from one answer. A zone needs at most one per transport;
/// the bound keeps a hostile answer from fanning out into many SRV queries.
const MAX_SERVICES: usize = 4;
/// SRV records taken from one answer, before ordering (which is quadratic).
const MAX_SRV_RECORDS: usize = 32;
/// SRV targets (host names) looked up per URI: each costs an A and an AAAA query.
const MAX_TARGETS: usize = 16;
/// The longest host name DNS can carry (RFC 1035 §2.3.4, without the final dot).
const MAX_NAME: usize = 253;

/// Why a URI could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The URI is not a `sip:` URI with a usable host.
    #[error("invalid SIP URI: {0}")]
    Invalid(&'static str),
    /// The URI needs a transport this proxy does not speak (TLS, SCTP, WebSocket).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// DNS has no usable record for the target (NXDOMAIN, no data, or SRV says the
    /// service is not offered).
    #[error("no DNS records for the target")]
    NotFound,
    /// The nameservers did not answer within the configured time.
    #[error("DNS lookup timed out")]
    Timeout,
    /// The nameservers answered with an error (SERVFAIL, REFUSED) or could not be
    /// reached.
    #[error("DNS lookup failed: {0}")]
    Dns(String),
    /// The resolver could not be built (e.g. `/etc/resolv.conf` unreadable).
    #[error("resolver configuration: {0}")]
    Config(String),
}

/// A NAPTR record (RFC 3403), the fields RFC 3263 §4.1 reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naptr {
    /// Records with the lowest order are used; others only if none of those is usable.
    pub order: u16,
    /// Lower is preferred among records of the same order.
    pub preference: u16,
    /// `S` for SIP: the replacement is an SRV name.
    pub flags: String,
    /// `SIP+D2U` (UDP), `SIP+D2T` (TCP); others are not spoken here.
    pub services: String,
    /// The SRV name to query next.
    pub replacement: String,
}

/// An SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    /// Lower is tried first.
    pub priority: u16,
    /// Relative share among records of the same priority.
    pub weight: u16,
    /// Port to send to.
    pub port: u16,
    /// Host name to look up; `.` alone means the service is not offered.
    pub target: String,
}

/// A DNS question a [`Lookup`] needs answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// NAPTR records of a domain.
    Naptr(String),
    /// SRV records of a name such as `_sip._udp.example.com`.
    Srv(String),
    /// A and AAAA records of a host (IPv4 first).
    Ip(String),
}

/// The answer to one [`Query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Records of a [`Query::Naptr`].
    Naptr(Vec<Naptr>),
    /// Records of a [`Query::Srv`].
    Srv(Vec<Srv>),
    /// Addresses of a [`Query::Ip`].
    Ip(Vec<IpAddr>),
    /// NXDOMAIN or no records of the type: the next fallback applies.
    NotFound,
    /// No answer (timeout) or an error answer: unlike [`Answer::NotFound`] nothing may
    /// be concluded, so no fallback applies.
    Failed(ResolveError),
}

/// What a [`Lookup`] needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Answer these questions, in this order, and pass the answers to
    /// [`Lookup::on_answers`]. They are independent: ask them concurrently.
    Ask(Vec<Query>),
    /// Finished: the targets in try order, or why there are none.
    Done(Result<Vec<Peer>, ResolveError>),
}

/// The target of a URI (RFC 3263 §4): a host, and the port and transport it fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: Option<u16>,
    transport: Option<Transport>,
}

/// Where a lookup stands: which questions its last [`Step::Ask`] asked.
#[derive(Debug)]
enum Stage {
    /// Asked NAPTR of the host.
    Naptr,
    /// Asked one SRV name per entry, for that transport.
    Srv { transports: Vec<Transport>, fallback: Transport },
    /// Asked A/AAAA of each of `names`; `targets` are (transport, index into names,
    /// port) in try order.
    Ip { names: Vec<String>, targets: Vec<(Transport, usize, u16)> },
    /// Done; further answers are a caller bug.
    Done,
}

/// One RFC 3263 resolution, sans IO: [`Lookup::new`] gives the first [`Step`], each
/// [`Lookup::on_answers`] the next, until [`Step::Done`]. It opens no socket and reads
/// no clock; the caller owns the DNS client and the deadline.
#[derive(Debug)]
pub struct Lookup {
    host: String,
    stage: Stage,
}

impl Lookup {
    /// Starts resolving `uri` (a request URI or a Route/Contact URI, with or without
    /// `<>`). An IP address, an invalid URI or an unsupported transport finishes at
    /// once ([`Step::Done`]).
    pub fn new(uri: &str) -> (Self, Step) {
        let target = match parse_target(uri) {
            Ok(t) => t,
            Err(e) => return (Self { host: String::new(), stage: Stage::Done }, Step::Done(Err(e))),
        };
        let mut lookup = Self { host: target.host, stage: Stage::Done };
        // RFC 3263 §4.1/§4.2: a numeric host is the address; UDP unless told otherwise.
        if let Ok(ip) = lookup.host.parse::<IpAddr>() {
            let transport = target.transport.unwrap_or(Transport::Udp);
            let peer = Peer { transport, addr: SocketAddr::new(ip, target.port.unwrap_or(DEFAULT_PORT)) };
            return (lookup, Step::Done(Ok(vec![peer])));
        }
        // An explicit port means no SRV (§4.2): the zone's SRV ports would override it.
        if let Some(port) = target.port {
            let transport = target.transport.unwrap_or(Transport::Udp);
            let step = lookup.ask_ip(vec![lookup.host.clone()], vec![(transport, 0, port)]);
            return (lookup, step);
        }
        if let Some(transport) = target.transport {
            let query = Query::Srv(srv_name(transport, &lookup.host));
            lookup.stage = Stage::Srv { transports: vec![transport], fallback: transport };
            return (lookup, Step::Ask(vec![query]));
        }
        let query = Query::Naptr(lookup.host.clone());
        lookup.stage = Stage::Naptr;
        (lookup, Step::Ask(vec![query]))
    }

    /// Takes the answers to the last [`Step::Ask`], one per query in the same order,
    /// and says what comes next. `rng` supplies the randomness of RFC 2782's weighted
    /// selection (uniform `u32`s).
    pub fn on_answers(&mut self, answers: Vec<Answer>, rng: &mut impl FnMut() -> u32) -> Step {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Naptr if answers.len() == 1 => self.after_naptr(answers),
            Stage::Srv { transports, fallback } if answers.len() == transports.len() => {
                self.after_srv(&transports, fallback, answers, rng)
            }
            Stage::Ip { names, targets } if answers.len() == names.len() => Step::Done(peers(&targets, answers)),
            // A driver bug, not a DNS condition: finish rather than guess.
            _ => Step::Done(Err(ResolveError::Dns("answers do not match the questions".into()))),
        }
    }

    /// RFC 3263 §4.1: follow the usable NAPTR services; without any, query SRV for
    /// every transport spoken here, UDP first.
    fn after_naptr(&mut self, mut answers: Vec<Answer>) -> Step {
        let services = match answers.pop() {
            Some(Answer::Naptr(records)) => naptr_services(&records),
            Some(Answer::NotFound) => Vec::new(),
            Some(Answer::Failed(e)) => return Step::Done(Err(e)),
            _ => return Step::Done(Err(ResolveError::Dns("unexpected answer to NAPTR".into()))),
        };
        let services = if services.is_empty() {
            [Transport::Udp, Transport::Tcp].into_iter().map(|t| (t, srv_name(t, &self.host))).collect()
        } else {
            services
        };
        let fallback = services.first().map_or(Transport::Udp, |(t, _)| *t);
        let (transports, queries) = services.into_iter().map(|(t, name)| (t, Query::Srv(name))).unzip();
        self.stage = Stage::Srv { transports, fallback };
        Step::Ask(queries)
    }

    /// RFC 3263 §4.2: the SRV targets in order; with no SRV record at all, A/AAAA of
    /// the host at the default port over the transport chosen so far.
    fn after_srv(
        &mut self,
        transports: &[Transport],
        fallback: Transport,
        answers: Vec<Answer>,
        rng: &mut impl FnMut() -> u32,
    ) -> Step {
        let mut names: Vec<String> = Vec::new();
        let mut targets = Vec::new();
        let mut failed = None;
        let mut refused = false;
        for (&transport, answer) in transports.iter().zip(answers) {
            let records = match answer {
                Answer::Srv(records) => records,
                Answer::NotFound => continue,
                Answer::Failed(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
                _ => {
                    failed.get_or_insert(ResolveError::Dns("unexpected answer to SRV".into()));
                    continue;
                }
            };
            // RFC 2782: a lone record with target "." says the service is not offered.
            if let [only] = records.as_slice() {
                if is_root(&only.target) {
                    refused = true;
                    continue;
                }
            }
            for srv in order_srv(records, rng) {
                if is_root(&srv.target) || srv.port == 0 || targets.len() == MAX_TARGETS {
                    continue;
                }
                let index = match names.iter().position(|n| same_name(n, &srv.target)) {
                    Some(i) => i,
                    None => {
                        names.push(srv.target);
                        names.len() - 1
                    }
                };
                targets.push((transport, index, srv.port));
            }
        }
        if !targets.is_empty() {
            return self.ask_ip(names, targets);
        }
        // With an SRV query unanswered, "no SRV records" is not known, so falling back
        // to A/AAAA could pick a transport or port the zone does not offer.
        if let Some(e) = failed {
            return Step::Done(Err(e));
        }
        if refused {
            return Step::Done(Err(ResolveError::NotFound));
        }
        let host = self.host.clone();
        self.ask_ip(vec![host], vec![(fallback, 0, DEFAULT_PORT)])
    }

    fn ask_ip(&mut self, names: Vec<String>, targets: Vec<(Transport, usize, u16)>) -> Step {
        let queries = names.iter().map(|n| Query::Ip(n.clone())).collect();
        self.stage = Stage::Ip { names, targets };
        Step::Ask(queries)
    }
}

/// The peers of the A/AAAA answers, in target order; duplicates dropped. Targets whose
/// lookup failed are skipped while another target has addresses: a partial list still
/// lets the caller fail over.
fn peers(targets: &[(Transport, usize, u16)], answers: Vec<Answer>) -> Result<Vec<Peer>, ResolveError> {
    let mut failed = None;
    let mut addresses: Vec<&[IpAddr]> = Vec::with_capacity(answers.len());
    for answer in &answers {
        match answer {
            Answer::Ip(ips) => addresses.push(ips),
            Answer::NotFound => addresses.push(&[]),
            Answer::Failed(e) => {
                failed.get_or_insert_with(|| e.clone());
                addresses.push(&[]);
            }
            _ => {
                failed.get_or_insert(ResolveError::Dns("unexpected answer to A/AAAA".into()));
                addresses.push(&[]);
            }
        }
    }
    let mut out: Vec<Peer> = Vec::new();
    for &(transport, index, port) in targets {
        for &ip in addresses.get(index).copied().unwrap_or_default() {
            let peer = Peer { transport, addr: SocketAddr::new(ip, port) };
            if !out.contains(&peer) {
                out.push(peer);
            }
        }
    }
    if out.is_empty() {
        return Err(failed.unwrap_or(ResolveError::NotFound));
    }
    Ok(out)
}

/// The SRV names to query, in order, from a NAPTR answer (RFC 3263 §4.1): records
/// with flag `S` and a service spoken here (`SIP+D2U`, `SIP+D2T`), of the lowest order
/// among those (RFC 3403: once a rule matches, other orders are not considered), by
/// preference; records of equal preference keep their order in the answer.
pub fn naptr_services(records: &[Naptr]) -> Vec<(Transport, String)> {
    let mut usable: Vec<(&Naptr, Transport)> = records
        .iter()
        .filter(|r| r.flags.eq_ignore_ascii_case("s") && !is_root(&r.replacement))
        .filter_map(|r| match r.services.to_ascii_uppercase().as_str() {
            "SIP+D2U" => Some((r, Transport::Udp)),
            "SIP+D2T" => Some((r, Transport::Tcp)),
            // SIPS+D2T (TLS), SIP+D2S (SCTP), SIP+D2W / SIPS+D2W (WebSocket): not spoken.
            _ => None,
        })
        .collect();
    let Some(order) = usable.iter().map(|(r, _)| r.order).min() else {
        return Vec::new();
    };
    usable.retain(|(r, _)| r.order == order);
    usable.sort_by_key(|(r, _)| r.preference);
    usable.into_iter().take(MAX_SERVICES).map(|(r, t)| (t, r.replacement.clone())).collect()
}

/// Orders SRV records for trying (RFC 2782): by priority, lowest first; within a
/// priority, repeatedly picks one at random with probability proportional to its weight
/// (records of weight 0 go first in the running sum, so they are picked only when the
/// random number is 0 or all weights are 0). `rng` returns uniform `u32`s.
pub fn order_srv(mut records: Vec<Srv>, rng: &mut impl FnMut() -> u32) -> Vec<Srv> {
    records.truncate(MAX_SRV_RECORDS);
    // Stable sorts: equal keys keep the answer's order, which the weight-0 rule needs.
    records.sort_by_key(|r| (r.priority, r.weight != 0));
    let mut out = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let end = rest.iter().position(|r| r.priority != first.priority).unwrap_or(rest.len());
        let mut group = rest[..end].to_vec();
        rest = &rest[end..];
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            // RFC 2782: a uniform number in [0, total], inclusive.
            let pick = u64::from(rng()) % (total + 1);
            let mut running = 0;
            let chosen = group
                .iter()
                .position(|r| {
                    running += u64::from(r.weight);
                    running >= pick
                })
                .unwrap_or(group.len() - 1);
            out.push(group.remove(chosen));
        }
    }
    out
}

/// RFC 3263 §4.1: the SRV name of a transport for a domain.
fn srv_name(transport: Transport, host: &str) -> String {
    match transport {
        Transport::Udp => format!("_sip._udp.{host}"),
        Transport::Tcp => format!("_sip._tcp.{host}"),
    }
}

/// Whether a DNS name is the root (`.`), which SRV and NAPTR use for "nothing".
fn is_root(name: &str) -> bool {
    name.is_empty() || name == "."
}

/// DNS names compare without case and without the final dot.
fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.').eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// Reads the target of a URI (RFC 3263 §4): `maddr` if present, else the host; the
/// port; the `transport` parameter.
fn parse_target(uri: &str) -> Result<Target, ResolveError> {
    let uri = uri.trim();
    let uri = uri.strip_prefix('<').unwrap_or(uri);
    let uri = uri.split('>').next().unwrap_or(uri);
    let scheme_end = uri.find(':').ok_or(ResolveError::Invalid("no scheme"))?;
    let (scheme, rest) = (&uri[..scheme_end], &uri[scheme_end + 1..]);
    if scheme.eq_ignore_ascii_case("sips") {
        return Err(ResolveError::Unsupported("sips: URIs need TLS"));
    }
    if !scheme.eq_ignore_ascii_case("sip") {
        return Err(ResolveError::Invalid("not a sip: URI"));
    }
    // Headers (`?...`) are not part of the target. The user part may contain ';' (a
    // telephone-subscriber's parameters) but never '@', so the host starts after the
    // last '@'.
    let rest = rest.split('?').next().unwrap_or(rest);
    let host_and_params = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let bare = format!("sip:{host_and_params}");
    let (host, port) = sip::message::host_port(&bare).ok_or(ResolveError::Invalid("bad host or port"))?;
    if port == Some(0) {
        return Err(ResolveError::Invalid("port 0"));
    }
    let mut target = Target { host, port, transport: None };
    for param in host_and_params.split(';').skip(1) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transport") {
            if !value.eq_ignore_ascii_case("udp") && !value.eq_ignore_ascii_case("tcp") {
                return Err(ResolveError::Unsupported("transports other than UDP and TCP"));
            }
            target.transport = Some(Transport::of_uri(&bare));
        } else if name.eq_ignore_ascii_case("maddr") && !value.is_empty() {
            // RFC 3263 §4: maddr overrides the host as the target.
            let v6 = value.strip_prefix('[').and_then(|v| v.strip_suffix(']'));
            target.host = v6.unwrap_or(value).to_string();
        }
    }
    if !valid_host(&target.host) {
        return Err(ResolveError::Invalid("bad host"));
    }
    Ok(target)
}

/// A host is an IP address or a DNS name of letters, digits, '-', '_' and dots; this
/// keeps odd bytes from network input out of DNS queries.
fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= MAX_NAME + 1
        && !host.starts_with('.')
        && !host.contains("..")
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Settings of the [`Resolver`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverConfig {
    /// Nameservers to ask (UDP; TCP when an answer is truncated). Empty: those of
    /// `/etc/resolv.conf`, with its search domains and `ndots`.
    pub nameservers: Vec<SocketAddr>,
    /// The most one [`Resolver::resolve`] may take, all its DNS queries together; then
    /// it fails with [`ResolveError::Timeout`]. Overrides resolv.conf's `timeout`.
    pub timeout_ms: u64,
    /// Tries per DNS query (at least 1); each try may take `timeout_ms / attempts`.
    /// Overrides resolv.conf's `attempts`.
    pub attempts: u32,
    /// DNS answers (positive and negative) kept in the cache, each for its TTL.
    pub cache_entries: u64,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        // 2 s: a SIP client's first retransmission (T1) is 0.5 s and an INVITE's
        // transaction gives up after 32 s; DNS that has not answered in 2 s will not.
        Self { nameservers: Vec::new(), timeout_ms: 2000, attempts: 2, cache_entries: 4096 }
    }
}

/// RFC 3263 resolution over DNS, asynchronous (tokio). Cheap to share (`Arc`);
/// concurrent calls share the cache.
///
/// Caching is hickory's: every DNS answer (NAPTR, SRV, A, AAAA, and negative answers
/// by their SOA's minimum TTL, RFC 2308) is kept for its TTL in a cache bounded to
/// [`ResolverConfig::cache_entries`] answers, so a warm `resolve` sends no query. The
/// ordering of SRV targets is redone on every call, so weights spread load across calls.
pub struct Resolver {
    dns: TokioResolver,
    timeout: Duration,
    /// splitmix64 state: a counter, so `fetch_add` is the whole update.
    rng: AtomicU64,
}

impl Resolver {
    /// Builds a resolver; reads `/etc/resolv.conf` when `cfg` names no nameserver.
    /// Sends nothing yet.
    pub fn new(cfg: &ResolverConfig) -> Result<Self, ResolveError> {
        let attempts = cfg.attempts.max(1);
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let mut builder = if cfg.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| ResolveError::Config(e.to_string()))?
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(
                HickoryConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let options = builder.options_mut();
        // hickory's `timeout` bounds one try (across the nameservers asked in parallel)
        // and `attempts` counts *re*tries; split the budget so one query's tries fit.
        options.timeout = timeout / attempts;
        options.attempts = attempts as usize - 1;
        options.cache_size = cfg.cache_entries;
        // Both families at once; IPv4 first, as most SIP peers and our sockets are.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let dns = builder.build().map_err(|e| ResolveError::Config(e.to_string()))?;
        let seed = RandomState::new().build_hasher().finish();
        Ok(Self { dns, timeout, rng: AtomicU64::new(seed) })
    }

    /// The targets of `uri` in try order (RFC 3263): fail over to the next on a 503, a
    /// transport error or a timeout. Never takes longer than the configured timeout.
    pub async fn resolve(&self, uri: &str) -> Result<Vec<Peer>, ResolveError> {
        match tokio::time::timeout(self.timeout, self.run(uri)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ResolveError::Timeout),
        }
    }

    async fn run(&self, uri: &str) -> Result<Vec<Peer>, ResolveError> {
        let (mut lookup, mut step) = Lookup::new(uri);
        let mut rng = || self.random();
        loop {
            match step {
                Step::Done(result) => return result,
                Step::Ask(queries) => {
                    let answers = join_all(queries.iter().map(|q| self.ask(q))).await;
                    step = lookup.on_answers(answers, &mut rng);
                }
            }
        }
    }

    async fn ask(&self, query: &Query) -> Answer {
        match query {
            Query::Naptr(name) => match self.dns.lookup(name.as_str(), RecordType::NAPTR).await {
                Ok(found) => Answer::Naptr(
                    found
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::NAPTR(n) => Some(Naptr {
                                order: n.order,
                                preference: n.preference,
                                flags: String::from_utf8_lossy(&n.flags).into_owned(),
                                services: String::from_utf8_lossy(&n.services).into_owned(),
                                replacement: n.replacement.to_string(),
                            }),
                            _ => None,
                        })
                        .collect(),
                ),
                Err(e) => failed(&e),
            },
            Query::Srv(name) => match self.dns.lookup(name.as_str(), RecordType::SRV).await {
                Ok(found) => Answer::Srv(
                    found
                        .answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::SRV(s) => Some(Srv {
                                priority: s.priority,
                                weight: s.weight,
                                port: s.port,
                                target: s.target.to_string(),
                            }),
                            _ => None,
                        })
                        .collect(),
                ),
                Err(e) => failed(&e),
            },
            Query::Ip(name) => match self.dns.lookup_ip(name.as_str()).await {
                Ok(found) => Answer::Ip(found.iter().collect()),
                Err(e) => failed(&e),
            },
        }
    }

    /// splitmix64: good enough to spread load by SRV weight, and lock-free. Not for
    /// anything an attacker must not predict.
    fn random(&self) -> u32 {
        const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut z = self.rng.fetch_add(GOLDEN, Ordering::Relaxed).wrapping_add(GOLDEN);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 32) as u32
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// Maps hickory's error to an [`Answer`]: "no records" lets the lookup fall back, the
/// rest does not. The error's text is kept only for failures, which name no URI.
fn failed(e: &NetError) -> Answer {
    if e.is_no_records_found() {
        return Answer::NotFound;
    }
    match e {
        NetError::Timeout => Answer::Failed(ResolveError::Timeout),
        other => Answer::Failed(ResolveError::Dns(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random numbers from a list, repeated; the tests know which record each picks.
    fn seq(values: &[u32]) -> impl FnMut() -> u32 + '_ {
        let mut i = 0;
        move || {
            let v = values[i % values.len()];
            i += 1;
            v
        }
    }

    fn no_rng() -> u32 {
        panic!("this lookup has no SRV choice to make")
    }

    fn udp(addr: &str) -> Peer {
        Peer::udp(addr.parse().unwrap())
    }

    fn tcp(addr: &str) -> Peer {
        Peer::tcp(addr.parse().unwrap())
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Srv {
        Srv { priority, weight, port, target: target.into() }
    }

    fn naptr(order: u16, preference: u16, services: &str, replacement: &str) -> Naptr {
        Naptr { order, preference, flags: "s".into(), services: services.into(), replacement: replacement.into() }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn done(uri: &str) -> Result<Vec<Peer>, ResolveError> {
        match Lookup::new(uri).1 {
            Step::Done(r) => r,
            step => panic!("{uri}: expected no DNS, got {step:?}"),
        }
    }

    #[test]
    fn ip_literal_needs_no_dns() {
        assert_eq!(done("sip:192.0.2.1"), Ok(vec![udp("192.0.2.1:5060")]));
        assert_eq!(done("sip:bob@192.0.2.1:5080;transport=TCP"), Ok(vec![tcp("192.0.2.1:5080")]));
        assert_eq!(done("<sip:192.0.2.1;lr>"), Ok(vec![udp("192.0.2.1:5060")]));
    }

    #[test]
    fn ipv6_literal_needs_no_dns() {
        assert_eq!(done("sip:[2001:db8::1]:5070"), Ok(vec![udp("[2001:db8::1]:5070")]));
        assert_eq!(done("<sip:alice@[2001:db8::1];transport=tcp>"), Ok(vec![tcp("[2001:db8::1]:5060")]));
    }

    #[test]
    fn maddr_overrides_the_host() {
        assert_eq!(done("sip:alice@example.com;maddr=192.0.2.7"), Ok(vec![udp("192.0.2.7:5060")]));
        assert_eq!(done("sip:example.com:5062;maddr=[2001:db8::7]"), Ok(vec![udp("[2001:db8::7]:5062")]));
    }

    #[test]
    fn explicit_port_asks_only_for_addresses() {
        let (mut l, step) = Lookup::new("sip:alice@pbx.example.com:5080");
        assert_eq!(step, Step::Ask(vec![Query::Ip("pbx.example.com".into())]));
        let step = l.on_answers(vec![Answer::Ip(vec![ip("192.0.2.1"), ip("2001:db8::1")])], &mut no_rng);
        assert_eq!(step, Step::Done(Ok(vec![udp("192.0.2.1:5080"), udp("[2001:db8::1]:5080")])));

        let (mut l, _) = Lookup::new("sip:pbx.example.com:5080;transport=tcp");
        let step = l.on_answers(vec![Answer::Ip(vec![ip("192.0.2.1")])], &mut no_rng);
        assert_eq!(step, Step::Done(Ok(vec![tcp("192.0.2.1:5080")])));

        let (mut l, _) = Lookup::new("sip:pbx.example.com:5080");
        assert_eq!(l.on_answers(vec![Answer::NotFound], &mut no_rng), Step::Done(Err(ResolveError::NotFound)));
    }

    #[test]
    fn transport_parameter_asks_srv_of_that_transport() {
        // The user part may hold ';' (telephone-subscriber parameters): not the host's.
        let (mut l, step) = Lookup::new("sip:+4930123;npdi@example.com;transport=tcp");
        assert_eq!(step, Step::Ask(vec![Query::Srv("_sip._tcp.example.com".into())]));
        let step = l.on_answers(vec![Answer::Srv(vec![srv(10, 0, 5070, "b.example.com.")])], &mut seq(&[0]));
        assert_eq!(step, Step::Ask(vec![Query::Ip("b.example.com.".into())]));
        let step = l.on_answers(vec![Answer::Ip(vec![ip("192.0.2.2")])], &mut no_rng);
        assert_eq!(step, Step::Done(Ok(vec![tcp("192.0.2.2:5070")])));
    }

    #[test]
    fn no_srv_falls_back_to_addresses_at_the_default_port() {
        let (mut l, _) = Lookup::new("sip:example.com;transport=tcp");
        let step = l.on_answers(vec![Answer::NotFound], &mut no_rng);
        assert_eq!(step, Step::Ask(vec![Query::Ip("example.com".into())]));
        let step = l.on_answers(vec![Answer::Ip(vec![ip("192.0.2.3")])], &mut no_rng);
        assert_eq!(step, Step::Done(Ok(vec![tcp("192.0.2.3:5060")])));
    }

    #[test]
    fn naptr_then_srv_then_addresses() {
        let (mut l, step) = Lookup::new("sip:alice@example.com");
        assert_eq!(step, Step::Ask(vec![Query::Naptr("example.com".into())]));
        let records = vec![
            naptr(50, 20, "SIP+D2U", "_sip._udp.example.com."),
            naptr(50, 5, "SIPS+D2T", "_sips._tcp.example.com."),
            naptr(50, 10, "SIP+D2T", "_sip._tcp.example.com."),
            naptr(50, 1, "SIP+D2W", "_sip._ws.example.com."),
        ];
        let step = l.on_answers(vec![Answer::Naptr(records)], &mut no_rng);
        // TCP (preference 10) before UDP (20); TLS and WebSocket skipped.
        assert_eq!(
            step,
            Step::Ask(vec![Query::Srv("_sip._tcp.example.com.".into()), Query::Srv("_sip._udp.example.com.".into())])
        );
        let step = l.on_answers(
            vec![
                Answer::Srv(vec![srv(20, 0, 5060, "b.example.com."), srv(10, 0, 5061, "a.example.com.")]),
                Answer::Srv(vec![srv(10, 0, 5060, "a.example.com.")]),
            ],
            &mut seq(&[0]),
        );
        // a.example.com is asked once although two SRV records name it.
        assert_eq!(step, Step::Ask(vec![Query::Ip("a.example.com.".into()), Query::Ip("b.example.com.".into())]));
        let step = l.on_answers(
            vec![Answer::Ip(vec![ip("192.0.2.1"), ip("2001:db8::1")]), Answer::Ip(vec![ip("192.0.2.2")])],
            &mut no_rng,
        );
        assert_eq!(
            step,
            Step::Done(Ok(vec![
                tcp("192.0.2.1:5061"),
                tcp("[2001:db8::1]:5061"),
                tcp("192.0.2.2:5060"),
                udp("192.0.2.1:5060"),
                udp("[2001:db8::1]:5060"),
            ]))
        );
    }

    #[test]
    fn naptr_preference_and_order() {
        // The lowest order with a usable service wins; other orders are not considered
        // (RFC 3403), even if they name another transport.
        let records = vec![
            naptr(10, 1, "SIPS+D2T", "_sips._tcp.example.com."),
            naptr(20, 30, "SIP+D2U", "_sip._udp.example.com."),
            naptr(30, 1, "SIP+D2T", "_sip._tcp.example.com."),
            naptr(20, 10, "sip+d2t", "_sip._tcp.example.com."),
            naptr(20, 20, "SIP+D2S", "_sip._sctp.example.com."),
        ];
        assert_eq!(
            naptr_services(&records),
            vec![
                (Transport::Tcp, "_sip._tcp.example.com.".to_string()),
                (Transport::Udp, "_sip._udp.example.com.".to_string()),
            ]
        );
        // Flags other than "s" (e.g. "u": a URI to rewrite) are not SIP server records.
        let mut u = naptr(10, 1, "SIP+D2U", "_sip._udp.example.com.");
        u.flags = "u".into();
        assert_eq!(naptr_services(&[u]), vec![]);
    }

    #[test]
    fn no_usable_naptr_queries_srv_for_udp_then_tcp() {
        for answer in [Answer::NotFound, Answer::Naptr(vec![naptr(10, 10, "SIPS+D2T", "_sips._tcp.example.com.")])] {
            let (mut l, _) = Lookup::new("sip:example.com");
            let step = l.on_answers(vec![answer], &mut no_rng);
            assert_eq!(
                step,
                Step::Ask(vec![Query::Srv("_sip._udp.example.com".into()), Query::Srv("_sip._tcp.example.com".into())])
            );
            // Only TCP has SRV records: the server supports only TCP.
            let step = l.on_answers(
                vec![Answer::NotFound, Answer::Srv(vec![srv(0, 0, 5060, "sip.example.com.")])],
                &mut seq(&[0]),
            );
            assert_eq!(step, Step::Ask(vec![Query::Ip("sip.example.com.".into())]));
            let step = l.on_answers(vec![Answer::Ip(vec![ip("192.0.2.9")])], &mut no_rng);
            assert_eq!(step, Step::Done(Ok(vec![tcp("192.0.2.9:5060")])));
        }
    }

    #[test]
    fn nothing_but_addresses_means_udp_at_5060() {
        let (mut l, _) = Lookup::new("sip:example.com");
        l.on_answers(vec![Answer::NotFound], &mut no_rng);
        let step = l.on_answers(vec![Answer::NotFound, Answer::NotFound], &mut no_rng);
        assert_eq!(step, Step::Ask(vec![Query::Ip("example.com".into())]));
        let step = l.on_answers(vec![Answer::Ip(vec![ip("192.0.2.4")])], &mut no_rng);
        assert_eq!(step, Step::Done(Ok(vec![udp("192.0.2.4:5060")])));
    }

    #[test]
    fn srv_root_target_means_not_offered() {
        let (mut l, _) = Lookup::new("sip:example.com;transport=udp");
        let step = l.on_answers(vec![Answer::Srv(vec![srv(0, 0, 0, ".")])], &mut seq(&[0]));
        assert_eq!(step, Step::Done(Err(ResolveError::NotFound)));
    }

    #[test]
    fn failures_end_the_lookup_rather_than_fall_back() {
        let (mut l, _) = Lookup::new("sip:example.com");
        let step = l.on_answers(vec![Answer::Failed(ResolveError::Timeout)], &mut no_rng);
        assert_eq!(step, Step::Done(Err(ResolveError::Timeout)));

        // One SRV query unanswered: "no SRV" is unknown, so no A/AAAA fallback.
        let (mut l, _) = Lookup::new("sip:example.com");
        l.on_answers(vec![Answer::NotFound], &mut no_rng);
        let step = l.on_answers(vec![Answer::NotFound, Answer::Failed(ResolveError::Timeout)], &mut no_rng);
        assert_eq!(step, Step::Done(Err(ResolveError::Timeout)));
    }

    #[test]
    fn a_failed_target_is_skipped_while_others_resolve() {
        let (mut l, _) = Lookup::new("sip:example.com;transport=udp");
        let records = vec![srv(1, 0, 5060, "a.example.com."), srv(2, 0, 5060, "b.example.com.")];
        l.on_answers(vec![Answer::Srv(records)], &mut seq(&[0]));
        let step =
            l.on_answers(vec![Answer::Failed(ResolveError::Timeout), Answer::Ip(vec![ip("192.0.2.5")])], &mut no_rng);
        assert_eq!(step, Step::Done(Ok(vec![udp("192.0.2.5:5060")])));

        let (mut l, _) = Lookup::new("sip:example.com;transport=udp");
        let records = vec![srv(1, 0, 5060, "a.example.com."), srv(2, 0, 5060, "b.example.com.")];
        l.on_answers(vec![Answer::Srv(records)], &mut seq(&[0]));
        let step = l.on_answers(vec![Answer::NotFound, Answer::Failed(ResolveError::Timeout)], &mut no_rng);
        assert_eq!(step, Step::Done(Err(ResolveError::Timeout)));
    }

    #[test]
    fn srv_priority_then_weighted_choice() {
        let records = vec![
            srv(10, 10, 1, "a."),
            srv(10, 20, 2, "b."),
            srv(10, 0, 3, "c."),
            srv(5, 0, 4, "d."),
            srv(20, 7, 5, "e."),
        ];
        let ports = |v: Vec<Srv>| v.iter().map(|r| r.port).collect::<Vec<_>>();
        // Priority 5 first. In priority 10 the running sums are c 0, a 10, b 30 (weight 0
        // first). 15 % 31 = 15 picks b; then c 0, a 10: 0 picks c; then a.
        assert_eq!(ports(order_srv(records.clone(), &mut seq(&[0, 15, 0, 0, 0]))), [4, 2, 3, 1, 5]);
        // 5 picks a (running sum 10 >= 5); then c 0, b 20: 20 picks b; then c.
        assert_eq!(ports(order_srv(records.clone(), &mut seq(&[0, 5, 20, 0, 0]))), [4, 1, 2, 3, 5]);
        // The number is taken modulo total + 1: 31 % 31 = 0 picks the weight-0 record.
        assert_eq!(ports(order_srv(records, &mut seq(&[0, 31, 0, 0, 0]))), [4, 3, 1, 2, 5]);
    }

    #[test]
    fn srv_weights_share_first_place_in_proportion() {
        // A deterministic generator over many orderings: weight 30 comes first about
        // three times as often as weight 10, and weight 0 only when the number is 0
        // (1 in 41).
        let mut state = 0x1234_5678_u32;
        let mut xorshift = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let records = vec![srv(1, 0, 0, "zero."), srv(1, 10, 1, "ten."), srv(1, 30, 2, "thirty.")];
        let mut first = [0u32; 3];
        for _ in 0..4100 {
            first[usize::from(order_srv(records.clone(), &mut xorshift)[0].port)] += 1;
        }
        // Expected 100, 1000 and 3000.
        assert!(first[0] < 200, "{first:?}");
        assert!((850..1150).contains(&first[1]), "{first:?}");
        assert!((2800..3200).contains(&first[2]), "{first:?}");
    }

    #[test]
    fn invalid_and_unsupported_uris() {
        assert_eq!(done("tel:+4930123"), Err(ResolveError::Invalid("not a sip: URI")));
        assert_eq!(done("sips:alice@example.com"), Err(ResolveError::Unsupported("sips: URIs need TLS")));
        assert_eq!(
            done("sip:example.com;transport=tls"),
            Err(ResolveError::Unsupported("transports other than UDP and TCP"))
        );
        assert_eq!(done("sip:example.com:0"), Err(ResolveError::Invalid("port 0")));
        assert_eq!(done("sip:example.com:99999"), Err(ResolveError::Invalid("bad host or port")));
        assert_eq!(done("sip:"), Err(ResolveError::Invalid("bad host")));
        assert_eq!(done("sip:exa%20mple.com"), Err(ResolveError::Invalid("bad host")));
        assert_eq!(done("sip:a..b"), Err(ResolveError::Invalid("bad host")));
    }

    #[test]
    fn answers_that_do_not_match_the_questions_end_the_lookup() {
        let (mut l, _) = Lookup::new("sip:example.com");
        let step = l.on_answers(vec![Answer::NotFound, Answer::NotFound], &mut no_rng);
        assert!(matches!(step, Step::Done(Err(ResolveError::Dns(_)))));
        assert!(matches!(l.on_answers(vec![Answer::NotFound], &mut no_rng), Step::Done(Err(ResolveError::Dns(_)))));
    }
}
