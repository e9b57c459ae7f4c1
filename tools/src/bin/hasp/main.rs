//! `hasp`: every role of the platform in one binary.
//!
//! `hasp relay` runs the RTP relay (data plane workers + REST API); `hasp up` runs every
//! role available on one machine with the embedded defaults (today: the relay).

mod membership;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use controlplane::config::ProxyRoleConfig;
use controlplane::control::rest::{self, ApiState};
use controlplane::relay::calls::Calls;
use controlplane::{Config, PortRange, Relay, RelayConfig};
use dataplane::{IoMode, LatchMode};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "hasp", version, about = "hasp: a highly available SIP/RTP platform")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the RTP relay: io_uring data plane workers and the REST session API.
    Relay(RelayArgs),
    /// Run every role on this machine with embedded defaults: the relay, and the SIP
    /// proxy/registrar on the embedded store with media anchored in the relay.
    /// Without --api-token or --no-auth, a token is generated and printed.
    Up {
        #[command(flatten)]
        relay: RelayArgs,
        #[command(flatten)]
        sip: SipArgs,
    },
    /// Run the SIP proxy and registrar alone, anchoring media through remote relays.
    Proxy(ProxyArgs),
    /// Manage SIP users in a store (while `hasp up` runs, use POST /v1/users instead:
    /// the embedded store is locked by the running process).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
}

/// Options of `hasp proxy`. Each overrides the same key of the config file's `[proxy]`
/// table; each can also be set by the environment variable shown.
#[derive(Args, Debug)]
struct ProxyArgs {
    /// TOML configuration file (see docs/hasp.sample.toml): its `[proxy]` table.
    #[arg(long, env = "HASP_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    sip: SipArgs,
    #[command(flatten)]
    membership: membership::MembershipArgs,
    /// Address of the REST API (users, health, metrics) [default: 127.0.0.1:8081].
    #[arg(long, env = "HASP_LISTEN_API", value_name = "ADDR:PORT")]
    listen_api: Option<SocketAddr>,
    /// A relay to anchor media in: `http://HOST:PORT` (its REST API: NG over `POST /ng`,
    /// and its conference mixer for the focus) or `ng://HOST:PORT` (its --listen-ng).
    /// Repeat for several, tried in order; one that does not answer within
    /// --relay-timeout-ms is skipped for 10 s. While a call waits for a relay, every
    /// other request is served. Replaces the file's `relays`.
    #[arg(long = "relay", value_name = "URL")]
    relays: Vec<String>,
    /// Bearer token of the `http://` relays' APIs.
    #[arg(long, env = "HASP_RELAY_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    relay_token: Option<String>,
    /// How long to wait for one relay's answer before trying the next [default: 500].
    #[arg(long, env = "HASP_RELAY_TIMEOUT_MS", value_name = "MS")]
    relay_timeout_ms: Option<u64>,
    /// Bearer token the API requires.
    #[arg(long, env = "HASP_API_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Serve the API without a token (loopback labs only).
    #[arg(long, env = "HASP_NO_AUTH")]
    no_auth: bool,
    #[command(flatten)]
    http: HttpArgs,
    /// Once every listener is bound, write FILE (atomically: a temporary file renamed):
    /// JSON with the role, the pid and each listener's bound address.
    #[arg(long, env = "HASP_READY_FILE", value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Check the configuration, print it as TOML and exit.
    #[arg(long)]
    check_config: bool,
}

impl ProxyArgs {
    /// The file's `[proxy]` table, then environment/flags on top.
    fn resolve(&self, mut c: ProxyRoleConfig) -> ProxyRoleConfig {
        self.sip.apply(&mut c);
        if let Some(v) = self.listen_api {
            c.listen_api = v;
        }
        if !self.relays.is_empty() {
            c.relays = self.relays.clone();
        }
        if let Some(v) = &self.relay_token {
            c.relay_token = Some(v.clone());
        }
        if let Some(v) = self.relay_timeout_ms {
            c.relay_timeout_ms = v;
        }
        if let Some(v) = &self.api_token {
            c.api_token = Some(v.clone());
        }
        if self.no_auth {
            c.no_auth = true;
        }
        self.http.apply(&mut c.http);
        c
    }
}

/// Limits of the HTTP listeners (the API; the relay's LI API too). Each overrides the
/// same key of the role's `http` table in the config file.
#[derive(Args, Debug, Default)]
struct HttpArgs {
    /// HTTP connections a listener keeps open at once; more are closed as soon as
    /// accepted [default: 1024].
    #[arg(long, env = "HASP_HTTP_MAX_CONNECTIONS", value_name = "N")]
    http_max_connections: Option<usize>,
    /// HTTP connections a listener keeps open from one source IP; more from it are
    /// closed as soon as accepted, other sources are still served [default: 256].
    #[arg(long, env = "HASP_HTTP_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    http_max_connections_per_ip: Option<usize>,
    /// Milliseconds a client has to send a whole request head (slowloris); also the
    /// longest a keep-alive connection may wait idle for its next request [default: 60000].
    #[arg(long, env = "HASP_HTTP_HEADER_TIMEOUT_MS", value_name = "MS")]
    http_header_timeout_ms: Option<u64>,
    /// Milliseconds without a byte received or sent before an HTTP connection is closed
    /// [default: 60000].
    #[arg(long, env = "HASP_HTTP_IDLE_TIMEOUT_MS", value_name = "MS")]
    http_idle_timeout_ms: Option<u64>,
}

impl HttpArgs {
    fn apply(&self, l: &mut controlplane::net::http::HttpLimits) {
        if let Some(v) = self.http_max_connections {
            l.max_connections = v;
        }
        if let Some(v) = self.http_max_connections_per_ip {
            l.max_connections_per_ip = v;
        }
        if let Some(v) = self.http_header_timeout_ms {
            l.header_timeout_ms = v;
        }
        if let Some(v) = self.http_idle_timeout_ms {
            l.idle_timeout_ms = v;
        }
    }
}

/// Writes the ready file: `v` to a temporary file in the same directory, renamed over
/// `path`, so a reader sees either no file or the whole of it.
fn write_ready_file(path: &std::path::Path, v: &serde_json::Value) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("ready");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let mut text = serde_json::to_string_pretty(v)?;
    text.push('\n');
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Removes a ready file left by an earlier run, so whoever waits for it never reads
/// the old addresses.
fn clear_ready_file(path: Option<&std::path::Path>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the ready file {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add or change a user.
    Add {
        /// User part.
        user: String,
        /// Domain.
        domain: String,
        /// Password.
        password: String,
        /// The store: embedded:PATH.
        #[arg(long, env = "HASP_STORE", default_value = "embedded:hasp-data/hasp.redb")]
        store: String,
    },
}

/// SIP proxy and registrar options (`hasp up`, `hasp proxy`). Each overrides the same
/// key of the config file's `[proxy]` table.
#[derive(Args, Debug)]
struct SipArgs {
    /// SIP (UDP and TCP) address of the proxy/registrar; port 0 picks one (see the ready
    /// line) [default: 127.0.0.1:5060].
    #[arg(long, env = "HASP_LISTEN_SIP", value_name = "ADDR:PORT")]
    listen_sip: Option<SocketAddr>,
    /// The SIP domain served (users are user@DOMAIN) [default: hasp.local].
    #[arg(long, env = "HASP_DOMAIN", value_name = "DOMAIN")]
    domain: Option<String>,
    /// Where credentials and registrations live: embedded:PATH (a redb file),
    /// etcd:URL,URL,… or memory: [default: embedded:hasp-data/hasp.redb].
    #[arg(long, env = "HASP_STORE", value_name = "STORE")]
    store: Option<String>,
    /// Secret for digest nonces (proxies sharing a store share it) [default: random].
    #[arg(long, env = "HASP_NONCE_SECRET", value_name = "SECRET", hide_env_values = true)]
    nonce_secret: Option<String>,
    /// Run the relay only (`hasp up`).
    #[arg(long)]
    no_sip: bool,
    /// Serve SIP over UDP only (by default TCP is served on the same address too).
    #[arg(long, env = "HASP_NO_SIP_TCP")]
    no_sip_tcp: bool,
    /// HOST[:PORT] to Record-Route with instead of --listen-sip: a name or address that
    /// reaches every proxy of the cluster (a load balancer, a DNS name), so in-dialog
    /// requests may be served by any proxy sharing the store.
    #[arg(long, env = "HASP_RECORD_ROUTE", value_name = "HOST[:PORT]")]
    record_route: Option<String>,
    /// SIP requests per second accepted from one source IP (bursts of twice that); more
    /// are dropped and counted (hasp_sip_rate_limited_total). 0: no limit [default: 10000].
    #[arg(long, env = "HASP_SIP_RATE_LIMIT", value_name = "N")]
    sip_rate_limit: Option<u32>,
    /// Seconds a source over --sip-rate-limit is banned: everything it sends is dropped
    /// (IPv4: by a socket filter in the kernel, before it is read), as Kamailio's pike
    /// does; counted in hasp_sip_bans_total. 0: only the excess is dropped [default: 30].
    #[arg(long, env = "HASP_SIP_BAN_SECS", value_name = "SECS")]
    sip_ban_secs: Option<u64>,
    /// Peers trusted by source address, CIDR (other proxies, a load balancer, a trunk);
    /// repeat or comma-separate. Their requests are not challenged, not refused as
    /// relaying and not rate limited. Everyone else: callers claiming a local user must
    /// authenticate, and requests for other domains get 403 Not relaying.
    #[arg(long, env = "HASP_TRUSTED", value_name = "CIDR", value_delimiter = ',')]
    trusted: Vec<ipnet::IpNet>,
    /// TCP connections the SIP proxy keeps open at once [default: 4096].
    #[arg(long, env = "HASP_SIP_MAX_CONNECTIONS", value_name = "N")]
    sip_max_connections: Option<usize>,
    /// SIP core instances (threads), each owning the transactions of the Call-IDs
    /// steered to it [default: the number of cores].
    #[arg(long, env = "HASP_SIP_THREADS", value_name = "N")]
    sip_threads: Option<usize>,
    /// DNS server for SIP name resolution (RFC 3263: NAPTR, SRV, A/AAAA), IP:PORT;
    /// repeat for several [default: those of /etc/resolv.conf].
    #[arg(long = "dns-server", env = "HASP_DNS_SERVERS", value_name = "IP:PORT", value_delimiter = ',')]
    dns_servers: Vec<SocketAddr>,
    /// How long one name resolution may take before the request gets 503 (only the
    /// requests for that name wait; every other request is served meanwhile)
    /// [default: 2000].
    #[arg(long, env = "HASP_DNS_TIMEOUT_MS", value_name = "MS")]
    dns_timeout_ms: Option<u64>,
}

impl SipArgs {
    /// Puts the flags given over the file's values.
    fn apply(&self, c: &mut ProxyRoleConfig) {
        if let Some(v) = self.listen_sip {
            c.listen_sip = v;
        }
        if let Some(v) = &self.domain {
            c.domain = v.clone();
        }
        if let Some(v) = &self.store {
            c.store = v.clone();
        }
        if let Some(v) = &self.nonce_secret {
            c.nonce_secret = Some(v.clone());
        }
        if self.no_sip_tcp {
            c.sip_tcp = false;
        }
        if let Some(v) = &self.record_route {
            c.record_route = Some(v.clone());
        }
        if let Some(v) = self.sip_rate_limit {
            c.sip_rate_limit = v;
        }
        if let Some(v) = self.sip_ban_secs {
            c.sip_ban_secs = v;
        }
        if !self.trusted.is_empty() {
            c.trusted = self.trusted.clone();
        }
        if let Some(v) = self.sip_max_connections {
            c.sip_max_connections = v;
        }
        if let Some(v) = self.sip_threads {
            c.sip_threads = Some(v);
        }
        if !self.dns_servers.is_empty() {
            c.dns_servers = self.dns_servers.clone();
        }
        if let Some(v) = self.dns_timeout_ms {
            c.dns_timeout_ms = v;
        }
    }
}

/// The SIP transports served, for the ready file.
fn sip_transport_list(sip: &ProxyRoleConfig) -> Vec<&'static str> {
    if sip.sip_tcp {
        vec!["udp", "tcp"]
    } else {
        vec!["udp"]
    }
}

/// Reads the configuration file, if one is given.
fn load_config(path: Option<&std::path::Path>) -> Result<Config> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Config::from_toml(&text).with_context(|| format!("in {}", p.display()))
        }
        None => Ok(Config::default()),
    }
}

/// Binds SIP (UDP, and TCP on the same address unless turned off) and starts the proxy
/// and registrar on `store`, anchoring media through `anchor`, with its operations on
/// `rt`. Returns the bound address.
fn start_sip(
    sip: &ProxyRoleConfig,
    store: Arc<dyn controlplane::store::Store>,
    anchor: Arc<dyn controlplane::proxy::anchor::MediaAnchor>,
    focus: Option<Arc<controlplane::proxy::focus::Focus>>,
    li: Option<Arc<controlplane::li::Li>>,
    deadlines: controlplane::proxy::core::Deadlines,
    rt: tokio::runtime::Handle,
) -> Result<(SocketAddr, String, controlplane::obs::sip::SipMetrics)> {
    use controlplane::proxy::{core, driver};
    let threads = sip.sip_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let listen = driver::Listen { addr: sip.listen_sip, tcp: sip.sip_tcp, threads };
    let transports = if listen.tcp { "udp,tcp" } else { "udp" };
    let nonce_secret = match &sip.nonce_secret {
        Some(s) => s.clone(),
        None => random_token()?,
    };
    let limits = driver::Limits { max_connections: sip.sip_max_connections, ..Default::default() };
    let dns = controlplane::proxy::resolve::ResolverConfig {
        nameservers: sip.dns_servers.clone(),
        timeout_ms: sip.dns_timeout_ms,
        ..Default::default()
    };
    let resolver =
        Arc::new(controlplane::proxy::resolve::Resolver::new(&dns).map_err(|e| anyhow::anyhow!("DNS resolver: {e}"))?);
    let deadlines = controlplane::proxy::core::Deadlines {
        resolve: Duration::from_millis(sip.dns_timeout_ms) + Duration::from_millis(500),
        ..deadlines
    };
    let services = Arc::new(driver::Services::new(store, Some(anchor), focus.clone(), resolver, limits.blocking_ops));
    let metrics = Arc::new(core::ProxyMetrics::default());
    let m = metrics.clone();
    let replays = Arc::new(sip::digest::Replays::default());
    let make_core = move |shard: usize, local: SocketAddr| {
        let cfg = core::ProxyConfig {
            domain: sip.domain.clone(),
            local,
            nonce_secret: nonce_secret.clone(),
            record_route: sip.record_route.clone(),
            rate_limit: sip.sip_rate_limit,
            ban: Duration::from_secs(sip.sip_ban_secs),
            trusted: sip.trusted.clone(),
        };
        let mut proxy = core::Proxy::new(cfg, true);
        proxy.set_replays(replays.clone());
        proxy.set_shard(shard, m.clone());
        proxy.set_deadlines(deadlines);
        if let Some(li) = &li {
            proxy.set_li(li.clone());
        }
        proxy.set_focus(focus.is_some());
        proxy
    };
    let handle = driver::spawn(listen, make_core, services.clone(), limits, rt)
        .with_context(|| format!("binding SIP on {}", sip.listen_sip))?;
    let metrics =
        controlplane::obs::sip::SipMetrics { proxy: metrics, driver: handle.stats, focus: services.focus.clone() };
    Ok((handle.local, format!("{transports} sip_threads={threads}"), metrics))
}

/// Relay options. Each overrides the same key of the config file's `[relay]` table;
/// each can also be set by the environment variable shown.
#[derive(Args, Debug, Default)]
struct RelayArgs {
    /// TOML configuration file (see docs/hasp.sample.toml).
    #[arg(long, env = "HASP_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    membership: membership::MembershipArgs,
    /// Address of the REST API [default: 127.0.0.1:8080]; port 0 picks a free port
    /// (the ready line tells which).
    #[arg(long, env = "HASP_LISTEN_API", value_name = "ADDR:PORT")]
    listen_api: Option<SocketAddr>,
    /// rtpengine NG control protocol address (UDP and TCP), e.g. 127.0.0.1:2223, for
    /// Kamailio's or OpenSIPS's rtpengine module. Off unless given.
    #[arg(long, env = "HASP_LISTEN_NG", value_name = "ADDR:PORT")]
    listen_ng: Option<SocketAddr>,
    /// RTPproxy control protocol: ADDR:PORT (UDP, cookie-prefixed) or a Unix socket path,
    /// for Kamailio's or OpenSIPS's rtpproxy module. Off unless given.
    #[arg(long, env = "HASP_LISTEN_RTPP", value_name = "ADDR:PORT|PATH")]
    listen_rtpp: Option<String>,
    /// Lawful-intercept administration API (X1-like), e.g. 127.0.0.1:8443. Off unless
    /// given; requires --li-token.
    #[arg(long, env = "HASP_LISTEN_LI", value_name = "ADDR:PORT")]
    listen_li: Option<SocketAddr>,
    /// Bearer token of the LI API (never the same as --api-token).
    #[arg(long, env = "HASP_LI_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    li_token: Option<String>,
    /// Append-only LI audit log [default: hasp-data/li-audit.log].
    #[arg(long, env = "HASP_LI_AUDIT_LOG", value_name = "FILE")]
    li_audit_log: Option<PathBuf>,
    /// LI task state, saved on every change and read back at start-up [default:
    /// the audit log with extension .tasks.json].
    #[arg(long, env = "HASP_LI_STATE", value_name = "FILE")]
    li_state: Option<PathBuf>,
    /// Bytes buffered per mediation function while it is slow or away, before PDUs are
    /// dropped and counted [default: 8388608].
    #[arg(long, env = "HASP_LI_BUFFER_BYTES", value_name = "BYTES")]
    li_buffer_bytes: Option<usize>,
    /// RTP port range; each leg takes an even RTP port and the RTCP port after it
    /// [default: 30000-39999].
    #[arg(long, env = "HASP_RTP_PORTS", value_name = "MIN-MAX")]
    rtp_ports: Option<PortRange>,
    /// Worker threads, each with its own io_uring [default: one per --cores entry, else 1].
    #[arg(long, env = "HASP_WORKERS", value_name = "N")]
    workers: Option<usize>,
    /// Cores to pin workers to, e.g. "0,1" or "2-5"; worker i goes to the i-th (cycling).
    #[arg(long, env = "HASP_CORES", value_name = "LIST", value_parser = parse_cores)]
    cores: Option<Cores>,
    /// Bearer token required by the API (send "Authorization: Bearer TOKEN").
    #[arg(long, env = "HASP_API_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Serve the API without a token. Only for a loopback lab setup.
    #[arg(long, env = "HASP_NO_AUTH")]
    no_auth: bool,
    /// Address media sockets bind to [default: 127.0.0.1].
    #[arg(long, env = "HASP_MEDIA_IP", value_name = "IP")]
    media_ip: Option<IpAddr>,
    /// Address announced to clients for media [default: --media-ip].
    #[arg(long, env = "HASP_ADVERTISE_IP", value_name = "IP")]
    advertise_ip: Option<IpAddr>,
    /// Seconds without an accepted packet before a session is deleted [default: 60].
    #[arg(long, env = "HASP_INACTIVITY_TIMEOUT", value_name = "SECS")]
    inactivity_timeout: Option<u64>,
    /// Receive path: auto (probe the kernel), multishot or oneshot [default: auto].
    #[arg(long, env = "HASP_IO_MODE", value_name = "MODE")]
    io_mode: Option<IoMode>,
    /// NAT latching: "learn" (first source, re-latch per policy) or "strict" (strict-source:
    /// only the signalled or first source, ever) [default: learn].
    #[arg(long, env = "HASP_LATCH", value_name = "MODE", value_parser = parse_latch)]
    latch: Option<LatchMode>,
    /// In learn mode, another source may take over after the latched one was silent this
    /// many ms; 0 never [default: 2000].
    #[arg(long, env = "HASP_RELATCH_IDLE_MS", value_name = "MS")]
    relatch_idle_ms: Option<u64>,
    /// In learn mode, a source sending a new SSRC may take over at once.
    #[arg(long, env = "HASP_RELATCH_ON_SSRC_CHANGE")]
    relatch_on_ssrc_change: bool,
    /// Milliseconds between per-session statistics pushes from the workers [default: 1000].
    #[arg(long, env = "HASP_STATS_INTERVAL_MS", value_name = "MS")]
    stats_interval_ms: Option<u64>,
    /// Microseconds a worker with a completion pending may wait for more before it runs
    /// (Linux 6.12+; fewer wake-ups, added latency) [default: 0].
    #[arg(long, env = "HASP_BATCH_WAIT_US", value_name = "US")]
    batch_wait_us: Option<u64>,
    /// A network no session may send media to (ADDR/LEN); repeat or comma-separate.
    /// The relay's own listeners and media ports are always refused; when the media
    /// address is not loopback, so are loopback, unspecified, multicast and link-local.
    /// Replaces the file's `remote_deny`.
    #[arg(long = "remote-deny", env = "HASP_REMOTE_DENY", value_name = "CIDR", value_delimiter = ',')]
    remote_deny: Vec<controlplane::relay::remote::Cidr>,
    #[command(flatten)]
    http: HttpArgs,
    /// Once every listener is bound, write FILE (atomically: a temporary file renamed):
    /// JSON with the role, the pid and each listener's bound address.
    #[arg(long, env = "HASP_READY_FILE", value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Check the configuration, print it as TOML and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Clone)]
struct Cores(Vec<usize>);

fn parse_cores(s: &str) -> Result<Cores, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().map_err(|_| format!("bad core {a:?}"))?;
                let b: usize = b.parse().map_err(|_| format!("bad core {b:?}"))?;
                if a > b {
                    return Err(format!("bad core range {part:?}"));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| format!("bad core {part:?}"))?),
        }
    }
    if out.is_empty() {
        return Err("empty core list".into());
    }
    Ok(Cores(out))
}

fn parse_latch(s: &str) -> Result<LatchMode, String> {
    match s {
        "learn" => Ok(LatchMode::Learn),
        "strict" | "strict-source" => Ok(LatchMode::Strict),
        "asymmetric" => Ok(LatchMode::Asymmetric),
        _ => Err(format!("unknown latch mode {s:?} (learn, strict, asymmetric)")),
    }
}

impl RelayArgs {
    /// The file's `[relay]` table, then environment/flags on top.
    fn resolve(&self, mut c: RelayConfig) -> Result<RelayConfig> {
        if let Some(v) = self.listen_api {
            c.listen_api = v;
        }
        if let Some(v) = self.listen_ng {
            c.listen_ng = Some(v);
        }
        if let Some(v) = &self.listen_rtpp {
            c.listen_rtpp = Some(v.clone());
        }
        if let Some(v) = self.listen_li {
            c.listen_li = Some(v);
        }
        if let Some(v) = &self.li_token {
            c.li_token = Some(v.clone());
        }
        if let Some(v) = self.li_buffer_bytes {
            c.li_buffer_bytes = v;
        }
        if let Some(v) = &self.li_audit_log {
            c.li_audit_log = v.clone();
        }
        if let Some(v) = &self.li_state {
            c.li_state = Some(v.clone());
        }
        if let Some(v) = self.rtp_ports {
            c.rtp_ports = v;
        }
        if let Some(v) = self.workers {
            c.workers = Some(v);
        }
        if let Some(v) = &self.cores {
            c.cores = v.0.clone();
        }
        if let Some(v) = &self.api_token {
            c.api_token = Some(v.clone());
        }
        if self.no_auth {
            c.no_auth = true;
        }
        if let Some(v) = self.media_ip {
            c.media_ip = v;
        }
        if let Some(v) = self.advertise_ip {
            c.advertise_ip = Some(v);
        }
        if let Some(v) = self.inactivity_timeout {
            c.inactivity_timeout_secs = v;
        }
        if let Some(v) = self.io_mode {
            c.io_mode = v;
        }
        if let Some(v) = self.latch {
            c.latch.mode = v;
        }
        if let Some(v) = self.relatch_idle_ms {
            c.latch.relatch_idle = (v > 0).then(|| Duration::from_millis(v));
        }
        if self.relatch_on_ssrc_change {
            c.latch.relatch_on_ssrc_change = true;
        }
        if let Some(v) = self.batch_wait_us {
            c.batch_wait_us = v;
        }
        if let Some(v) = self.stats_interval_ms {
            c.stats_interval_ms = v;
        }
        if !self.remote_deny.is_empty() {
            c.remote_deny = self.remote_deny.clone();
        }
        self.http.apply(&mut c.http);
        Ok(c)
    }
}

fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HASP_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Relay(args) => run_relay(args, "relay", false, None),
        Cmd::Up { relay, sip } => run_relay(relay, "up", true, (!sip.no_sip).then_some(sip)),
        Cmd::Proxy(args) => run_proxy(args),
        Cmd::User { cmd: UserCmd::Add { user, domain, password, store } } => {
            let st = controlplane::store::open(&store)?;
            st.put_user(&user, &domain, &password)?;
            println!("user {user}@{domain} saved in {store}");
            Ok(())
        }
    }
}

fn run_relay(args: RelayArgs, role: &str, generate_token: bool, sip: Option<SipArgs>) -> Result<()> {
    let file = load_config(args.config.as_deref())?;
    let mut cfg = args.resolve(file.relay)?;
    let sip = sip.map(|a| {
        let mut c = file.proxy.clone();
        a.apply(&mut c);
        c
    });
    if let Some(s) = &sip {
        s.validate(false)?;
    }
    if generate_token && !cfg.no_auth && cfg.api_token.is_none() {
        let t = random_token()?;
        println!("hasp {role}: generated API token {t} (pass --api-token or HASP_API_TOKEN to choose one)");
        cfg.api_token = Some(t);
    }
    if let Err(e) = cfg.validate() {
        bail!("{e}");
    }
    if args.check_config {
        print!("{}", toml::to_string(&Config { relay: cfg, proxy: sip.unwrap_or(file.proxy) })?);
        return Ok(());
    }
    let ready_file = args.ready_file.clone();
    clear_ready_file(ready_file.as_deref())?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("hasp-api").enable_all().build()?;
    rt.block_on(async move {
        // Before anything announces readiness (see shutdown_signal).
        let shutdown = shutdown_signal();
        let listener = tokio::net::TcpListener::bind(cfg.listen_api)
            .await
            .with_context(|| format!("binding the API on {}", cfg.listen_api))?;
        let api_addr = listener.local_addr()?;
        // What the ready file says: every listener with the address it actually bound.
        let mut ready = serde_json::json!({"role": role, "pid": std::process::id(), "api": api_addr.to_string()});
        let relay = Relay::start(cfg.clone())?;
        // Every UDP listener is one of the relay's own addresses: no media may go there.
        // (Media is UDP: the TCP-only APIs cannot receive it, and a client's UDP port that
        // happens to share their number is a legitimate remote.)
        let token = (!cfg.no_auth).then(|| Arc::from(cfg.api_token.clone().unwrap_or_default()));
        let calls = Arc::new(Calls::new(relay.clone()));
        // LI first: its saved tasks are in force before any listener can create a call.
        let li_handle = match cfg.listen_li {
            Some(_) => {
                let li_cfg = controlplane::li::LiConfig {
                    audit_log: cfg.li_audit_log.clone(),
                    state: cfg
                        .li_state
                        .clone()
                        .unwrap_or_else(|| controlplane::li::store::default_path(&cfg.li_audit_log)),
                    buffer_bytes: cfg.li_buffer_bytes,
                };
                Some(controlplane::li::Li::start(relay.clone(), calls.clone(), &li_cfg)?)
            }
            None => None,
        };
        let mut extra = String::new();
        if let Some(ng) = cfg.listen_ng {
            let (bound, _) = controlplane::control::ng::serve(ng, calls.clone())
                .await
                .with_context(|| format!("binding the NG listener on {ng}"))?;
            relay.add_own_address(bound);
            extra.push_str(&format!(" ng={bound}"));
            ready["ng"] = bound.to_string().into();
        }
        if let Some(rtpp) = &cfg.listen_rtpp {
            let bound = controlplane::control::rtpp::serve(rtpp, calls.clone())
                .await
                .with_context(|| format!("binding the RTPproxy listener on {rtpp}"))?;
            if let Ok(a) = bound.parse() {
                relay.add_own_address(a);
            }
            extra.push_str(&format!(" rtpp={bound}"));
            ready["rtpp"] = bound.into();
        }
        if let (Some(addr), Some(li)) = (cfg.listen_li, li_handle.clone()) {
            let l =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the LI API on {addr}"))?;
            extra.push_str(&format!(" li=http://{}", l.local_addr()?));
            ready["li_api"] = l.local_addr()?.to_string().into();
            let st =
                controlplane::li::api::LiApiState { li, token: Arc::from(cfg.li_token.clone().unwrap_or_default()) };
            let limits = cfg.http;
            tokio::spawn(async move {
                if let Err(e) = controlplane::li::api::serve(l, st, limits).await {
                    tracing::error!(error = %e, "LI API stopped");
                }
            });
        }
        let mut store = None;
        let mut sip_metrics = None;
        if let Some(sip) = &sip {
            let st = controlplane::store::open(&sip.store)?;
            let anchor: Arc<dyn controlplane::proxy::anchor::MediaAnchor> = calls.clone();
            // The conference focus mixes in this process's relay.
            let mixer: Arc<dyn controlplane::proxy::focus::Mixer> = relay.clone();
            let focus = Arc::new(controlplane::proxy::focus::Focus::new(vec![mixer]));
            let (local, transports, m) = start_sip(
                sip,
                st.clone(),
                anchor,
                Some(focus),
                li_handle.clone(),
                Default::default(),
                tokio::runtime::Handle::current(),
            )?;
            relay.add_own_address(local);
            sip_metrics = Some(m);
            extra.push_str(&format!(" sip={local} sip_transports={transports} domain={}", sip.domain));
            ready["sip"] = local.to_string().into();
            ready["sip_transports"] = sip_transport_list(sip).into();
            store = Some(st);
        }
        // Join the cluster before announcing readiness: whoever waits for the ready line
        // may look us up at once.
        let cluster = args.membership.open()?;
        let id = args.membership.id();
        let here = cfg.advertised();
        let mut me = controlplane::cluster::Member::new(controlplane::cluster::Role::Relay, id.clone());
        me.api = Some(membership::reachable(api_addr, here));
        me.ng = ready
            .get("ng")
            .and_then(|v| v.as_str())
            .and_then(|a| a.parse().ok())
            .map(|a| membership::reachable(a, here));
        me.media = Some(here.to_string());
        let mut regs = vec![cluster.register(me)];
        if let Some(sip_addr) = ready.get("sip").and_then(|v| v.as_str()).and_then(|a| a.parse().ok()) {
            let mut p = controlplane::cluster::Member::new(controlplane::cluster::Role::Proxy, id.clone());
            p.sip = Some(membership::reachable(sip_addr, here));
            p.api = Some(membership::reachable(api_addr, here));
            regs.push(cluster.register(p));
        }
        let sampled = relay.clone();
        let load = membership::publish_load(regs.iter().map(|r| r.load_handle()).collect(), move || {
            let (sessions, _, _, totals) = sampled.usage();
            (sessions as u64, totals.created)
        });
        extra.push_str(&format!(" id={id} membership={}", cluster.kind()));
        ready["id"] = id.clone().into();
        let modes: Vec<_> = relay.workers().iter().map(|(m, _, _)| *m).collect();
        println!(
            "hasp {role} ready api=http://{api_addr}{extra} media={} ports={} workers={} io_mode={} auth={}",
            cfg.advertised(),
            cfg.rtp_ports,
            modes.len(),
            modes.join(","),
            if cfg.no_auth { "off" } else { "token" },
        );
        std::io::stdout().flush()?;
        if let Some(path) = &ready_file {
            write_ready_file(path, &ready)?;
        }
        let state = ApiState {
            relay: relay.clone(),
            token,
            store: store.clone(),
            calls: Some(calls.clone()),
            sip: sip_metrics,
            cluster: Some(cluster.view()),
        };
        rest::serve(listener, state, cfg.http, shutdown).await?;
        tracing::info!("shutting down");
        load.abort();
        membership::leave_all(regs).await;
        clear_ready_file(ready_file.as_deref())?;
        if let Some(s) = store {
            s.flush().context("writing registrations to the store")?;
        }
        relay.shutdown();
        Ok(())
    })
}

fn run_proxy(args: ProxyArgs) -> Result<()> {
    let a = args.resolve(load_config(args.config.as_deref())?.proxy);
    a.validate(true)?;
    if a.relays.is_empty() && args.membership.is_local() {
        bail!("no relay: give relays (--relay URL), or --membership etcd:… to use the cluster's relays");
    }
    if args.check_config {
        print!("{}", toml::to_string(&Config { relay: RelayConfig::default(), proxy: a })?);
        return Ok(());
    }
    let ready_file = args.ready_file.clone();
    clear_ready_file(ready_file.as_deref())?;
    let timeout = Duration::from_millis(a.relay_timeout_ms);
    let relays = a
        .relays
        .iter()
        .map(|r| controlplane::proxy::anchor::RelayUrl::parse(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The conference focus mixes on the configured relays whose REST API we know, and
    // on the relays membership lists (over their REST API), least loaded first.
    let mixers: Vec<Arc<dyn controlplane::proxy::focus::Mixer>> = relays
        .iter()
        .filter_map(|r| match r {
            controlplane::proxy::anchor::RelayUrl::Http(base) => {
                let m: Arc<dyn controlplane::proxy::focus::Mixer> =
                    Arc::new(controlplane::proxy::anchor::RestMixer::new(base, a.relay_token.clone(), timeout));
                Some(m)
            }
            controlplane::proxy::anchor::RelayUrl::Ng(_) => None,
        })
        .collect();
    let in_cluster = !args.membership.is_local();
    let focus_static = (!mixers.is_empty() || in_cluster).then_some(mixers);
    let store = controlplane::store::open(&a.store)?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("hasp-api").enable_all().build()?;
    rt.block_on(async move {
        // Before anything announces readiness (see shutdown_signal).
        let shutdown = shutdown_signal();
        let cluster = args.membership.open()?;
        let focus = focus_static.map(|mixers| {
            let (token, t) = (a.relay_token.clone(), timeout);
            Arc::new(controlplane::proxy::focus::Focus::new(mixers).with_members(cluster.view(), move |m| {
                let api = m.api.as_ref()?;
                let mixer: Arc<dyn controlplane::proxy::focus::Mixer> =
                    Arc::new(controlplane::proxy::anchor::RestMixer::new(&format!("http://{api}"), token.clone(), t));
                Some(mixer)
            }))
        });
        // Calls' relays are shared through the store, so another proxy serves their BYEs;
        // hasp relays come from membership, least loaded first.
        let anchor: Arc<dyn controlplane::proxy::anchor::MediaAnchor> = Arc::new(
            controlplane::proxy::anchor::NgRelays::new(relays, timeout, a.relay_token.clone())?
                .with_dialogs(store.clone())
                .with_members(cluster.view()),
        );
        // A call may try a few relays in turn before the core gives up on it.
        let tries = controlplane::proxy::anchor::MAX_TRIES as u32;
        let deadlines = controlplane::proxy::core::Deadlines {
            anchor: timeout * tries + Duration::from_secs(1),
            focus: timeout * a.relays.len().max(1) as u32 + Duration::from_secs(1),
            ..Default::default()
        };
        let (local, transports, sip_metrics) =
            start_sip(&a, store.clone(), anchor, focus, None, deadlines, tokio::runtime::Handle::current())?;
        let listener = tokio::net::TcpListener::bind(a.listen_api)
            .await
            .with_context(|| format!("binding the API on {}", a.listen_api))?;
        let api_addr = listener.local_addr()?;
        let id = args.membership.id();
        let here = std::net::IpAddr::from([127, 0, 0, 1]);
        let mut me = controlplane::cluster::Member::new(controlplane::cluster::Role::Proxy, id.clone());
        me.sip = Some(membership::reachable(local, here));
        me.api = Some(membership::reachable(api_addr, here));
        let regs = vec![cluster.register(me)];
        let m = sip_metrics.proxy.clone();
        let load = membership::publish_load(regs.iter().map(|r| r.load_handle()).collect(), move || {
            use std::sync::atomic::Ordering::Relaxed;
            (m.ops_pending.load(Relaxed), m.forwarded.load(Relaxed))
        });
        println!(
            "hasp proxy ready api=http://{api_addr} sip={local} sip_transports={transports} domain={} relays={} id={id} membership={}",
            a.domain,
            a.relays.join(","),
            cluster.kind(),
        );
        std::io::stdout().flush()?;
        if let Some(path) = &ready_file {
            let ready = serde_json::json!({
                "role": "proxy",
                "pid": std::process::id(),
                "api": api_addr.to_string(),
                "sip": local.to_string(),
                "sip_transports": sip_transport_list(&a),
                "id": id,
            });
            write_ready_file(path, &ready)?;
        }
        let token = (!a.no_auth).then(|| Arc::from(a.api_token.clone().unwrap_or_default()));
        let state = controlplane::proxy::api::ProxyApiState {
            store: store.clone(),
            token,
            sip: Some(sip_metrics),
            cluster: Some(cluster.view()),
        };
        controlplane::proxy::api::serve(listener, state, a.http, shutdown).await?;
        load.abort();
        membership::leave_all(regs).await;
        clear_ready_file(ready_file.as_deref())?;
        store.flush().context("writing registrations to the store")?;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: call it before announcing readiness, or a SIGTERM
/// right after the ready line would kill the process without its clean shutdown.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        let recv = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = recv(term) => {}
            _ = recv(int) => {}
        }
    }
}
