//! Configuration: one TOML file, every field defaulted and documented; command-line
//! flags and environment variables override it (see the `hasp` binary).

use crate::error::Error;
use dataplane::{IoMode, LatchPolicy};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// The whole configuration file: one table per role (`[relay]`, `[proxy]`; `[lb]`,
/// `[dns]` and `[cluster]` to come). `hasp up` reads both tables.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The relay role.
    pub relay: RelayConfig,
    /// The SIP proxy and registrar role (`hasp proxy`, and the SIP side of `hasp up`).
    pub proxy: ProxyRoleConfig,
}

/// The SIP proxy and registrar's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyRoleConfig {
    /// SIP address (UDP, and TCP unless `sip_tcp` is off); port 0 picks one.
    pub listen_sip: SocketAddr,
    /// Serve SIP over TCP on the same address too.
    pub sip_tcp: bool,
    /// The SIP domain served (users are user@domain).
    pub domain: String,
    /// Credentials and registrations: `embedded:PATH`, `etcd:URL,URL,…` or `memory:`.
    pub store: String,
    /// Secret of the digest nonces (proxies sharing a store share it); random if unset.
    pub nonce_secret: Option<String>,
    /// `HOST[:PORT]` for Record-Route instead of `listen_sip`: a name reaching every
    /// proxy of the cluster.
    pub record_route: Option<String>,
    /// SIP requests per second accepted from one source IP (bursts of twice that); 0:
    /// no limit.
    pub sip_rate_limit: u32,
    /// Seconds a source over `sip_rate_limit` is banned (everything it sends dropped,
    /// in the kernel where possible); 0: only the excess is dropped.
    pub sip_ban_secs: u64,
    /// Peers trusted by source address (CIDRs: other proxies, a load balancer, a trunk):
    /// not challenged, not refused as relaying, not rate limited.
    pub trusted: Vec<ipnet::IpNet>,
    /// TCP connections open at once.
    pub sip_max_connections: usize,
    /// SIP core instances (threads); default: the number of cores.
    pub sip_threads: Option<usize>,
    /// DNS servers for SIP name resolution; empty: /etc/resolv.conf.
    pub dns_servers: Vec<SocketAddr>,
    /// Longest time one name resolution may take.
    pub dns_timeout_ms: u64,
    /// `hasp proxy`'s REST API address (`hasp up` serves its API on `relay.listen_api`).
    pub listen_api: SocketAddr,
    /// Bearer token of `hasp proxy`'s API.
    pub api_token: Option<String>,
    /// Serve `hasp proxy`'s API without a token (loopback labs only).
    pub no_auth: bool,
    /// Relays to anchor media in (`http://HOST:PORT` or `ng://HOST:PORT`), tried in turn
    /// (`hasp proxy`; `hasp up` uses its own relay).
    pub relays: Vec<String>,
    /// Bearer token of the `http://` relays' APIs.
    pub relay_token: Option<String>,
    /// How long to wait for one relay's answer before trying the next.
    pub relay_timeout_ms: u64,
    /// Limits of `hasp proxy`'s API listener (`[proxy.http]`).
    pub http: crate::net::http::HttpLimits,
}

impl Default for ProxyRoleConfig {
    fn default() -> Self {
        Self {
            listen_sip: SocketAddr::from((Ipv4Addr::LOCALHOST, 5060)),
            sip_tcp: true,
            domain: "hasp.local".into(),
            store: "embedded:hasp-data/hasp.redb".into(),
            nonce_secret: None,
            record_route: None,
            sip_rate_limit: 10_000,
            sip_ban_secs: 30,
            trusted: Vec::new(),
            sip_max_connections: 4096,
            sip_threads: None,
            dns_servers: Vec::new(),
            dns_timeout_ms: 2000,
            listen_api: SocketAddr::from((Ipv4Addr::LOCALHOST, 8081)),
            api_token: None,
            no_auth: false,
            relays: Vec::new(),
            relay_token: None,
            relay_timeout_ms: 500,
            http: Default::default(),
        }
    }
}

impl ProxyRoleConfig {
    /// Checks the SIP settings hang together; `standalone`: for `hasp proxy` (which
    /// needs its own API token, and relays unless membership brings them: the caller
    /// checks that, knowing the membership backend).
    pub fn validate(&self, standalone: bool) -> Result<(), Error> {
        if self.domain.is_empty() {
            return Err(Error::Config("domain must not be empty".into()));
        }
        if self.sip_threads == Some(0) || self.sip_threads.is_some_and(|n| n > 256) {
            return Err(Error::Config("sip_threads must be 1 to 256".into()));
        }
        if !(50..=30_000).contains(&self.dns_timeout_ms) {
            return Err(Error::Config("dns_timeout_ms must be 50 to 30000".into()));
        }
        self.http.validate()?;
        if standalone {
            if !(10..=60_000).contains(&self.relay_timeout_ms) {
                return Err(Error::Config("relay_timeout_ms must be 10 to 60000".into()));
            }
            if !self.no_auth && self.api_token.as_deref().is_none_or(str::is_empty) {
                return Err(Error::Config("an API token is required (api_token / --api-token), or --no-auth".into()));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }
}

/// The relay role's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Address of the REST API.
    pub listen_api: SocketAddr,
    /// Address (UDP and TCP) of the rtpengine NG control protocol; off when unset.
    pub listen_ng: Option<SocketAddr>,
    /// RTPproxy control protocol: `ADDR:PORT` (UDP) or a Unix socket path; off when unset.
    pub listen_rtpp: Option<String>,
    /// Lawful-intercept administration API address; off when unset.
    pub listen_li: Option<SocketAddr>,
    /// Bearer token of the LI API; required with `listen_li`, and never the API token.
    pub li_token: Option<String>,
    /// Append-only audit log of LI actions.
    pub li_audit_log: std::path::PathBuf,
    /// LI task state file, read back at start-up; default: `li_audit_log` with the
    /// extension `.tasks.json`.
    pub li_state: Option<std::path::PathBuf>,
    /// Bytes buffered per mediation function while it is slow or away; then PDUs are
    /// dropped and counted.
    pub li_buffer_bytes: usize,
    /// Address media sockets bind to.
    pub media_ip: IpAddr,
    /// Address given to clients as the relay's media address (default: `media_ip`).
    pub advertise_ip: Option<IpAddr>,
    /// RTP port range, `MIN-MAX`; each leg takes an even RTP port and the odd RTCP port
    /// after it.
    pub rtp_ports: PortRange,
    /// Worker threads (default: one per entry of `cores`, else 1).
    pub workers: Option<usize>,
    /// Cores to pin workers to; empty: no pinning.
    pub cores: Vec<usize>,
    /// Bearer token the API requires.
    pub api_token: Option<String>,
    /// Serve the API without authentication (only for a loopback test setup).
    pub no_auth: bool,
    /// Seconds without an accepted packet after which a session is deleted.
    pub inactivity_timeout_secs: u64,
    /// How workers receive: `auto`, `multishot` or `oneshot`.
    pub io_mode: IoMode,
    /// Default NAT latching policy for new sessions.
    pub latch: LatchPolicy,
    /// Milliseconds between statistics pushes from the workers.
    pub stats_interval_ms: u64,
    /// Packet buffers per worker (a power of two).
    pub buffers: u16,
    /// Requests the API handles at once; more wait.
    pub api_max_concurrency: usize,
    /// Microseconds a worker with a completion pending may wait for more before it runs
    /// (Linux 6.12+); 0 runs at every completion.
    pub batch_wait_us: u64,
    /// Networks no session may send media to (`ADDR/LEN`), on top of the relay's own
    /// listeners and media ports, which are always refused. When the media address is
    /// not loopback, loopback, unspecified, multicast and link-local are denied too.
    pub remote_deny: Vec<crate::relay::remote::Cidr>,
    /// Participants one conference room holds; a join beyond is refused (`room_full`).
    pub max_participants: usize,
    /// Limits of the HTTP listeners: the API and the LI API (`[relay.http]`).
    pub http: crate::net::http::HttpLimits,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen_api: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            listen_ng: None,
            listen_rtpp: None,
            listen_li: None,
            li_token: None,
            li_audit_log: "hasp-data/li-audit.log".into(),
            li_state: None,
            li_buffer_bytes: 8 << 20,
            media_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_ip: None,
            rtp_ports: PortRange { min: 30000, max: 39999 },
            workers: None,
            cores: Vec::new(),
            api_token: None,
            no_auth: false,
            inactivity_timeout_secs: 60,
            io_mode: IoMode::Auto,
            latch: LatchPolicy::default(),
            stats_interval_ms: 1000,
            buffers: 4096,
            api_max_concurrency: 256,
            batch_wait_us: 0,
            remote_deny: Vec::new(),
            max_participants: 100,
            http: Default::default(),
        }
    }
}

impl RelayConfig {
    /// Worker count after defaults.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or(self.cores.len().max(1))
    }

    /// The address clients are told to send media to.
    pub fn advertised(&self) -> IpAddr {
        self.advertise_ip.unwrap_or(self.media_ip)
    }

    /// Checks the settings hang together.
    pub fn validate(&self) -> Result<(), Error> {
        if self.worker_count() == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        if self.rtp_ports.pairs() < 2 {
            return Err(Error::Config(format!(
                "rtp_ports {} holds fewer than two RTP/RTCP port pairs (one session needs two)",
                self.rtp_ports
            )));
        }
        if !self.no_auth && self.api_token.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Config("an API token is required (api_token / --api-token), or --no-auth".into()));
        }
        if self.advertised().is_unspecified() {
            return Err(Error::Config("media_ip is a wildcard: set advertise_ip to the address clients reach".into()));
        }
        if self.listen_li.is_some() {
            match self.li_token.as_deref() {
                None | Some("") => return Err(Error::Config("listen_li needs li_token (--li-token)".into())),
                Some(t) if Some(t) == self.api_token.as_deref() => {
                    return Err(Error::Config("li_token must differ from api_token".into()))
                }
                _ => {}
            }
        }
        if self.inactivity_timeout_secs == 0 {
            return Err(Error::Config("inactivity_timeout_secs must be at least 1".into()));
        }
        if !(1..=10_000).contains(&self.max_participants) {
            return Err(Error::Config("max_participants must be 1 to 10000".into()));
        }
        self.http.validate()?;
        Ok(())
    }
}

/// An inclusive port range, written `MIN-MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest port.
    pub min: u16,
    /// Highest port.
    pub max: u16,
}

impl PortRange {
    /// First even port in the range.
    pub fn first_even(&self) -> u16 {
        self.min + (self.min & 1)
    }

    /// Number of (even RTP, odd RTCP) pairs in the range.
    pub fn pairs(&self) -> usize {
        let first = self.first_even() as usize;
        let max = self.max as usize;
        if first + 1 > max {
            0
        } else {
            (max - first).div_ceil(2)
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| format!("port range {s:?} is not MIN-MAX"))?;
        let min: u16 = a.trim().parse().map_err(|_| format!("bad port {a:?}"))?;
        let max: u16 = b.trim().parse().map_err(|_| format!("bad port {b:?}"))?;
        if min == 0 || min > max {
            return Err(format!("port range {s:?} must have 0 < MIN <= MAX"));
        }
        Ok(Self { min, max })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_ranges() {
        let r: PortRange = "30001-30010".parse().unwrap();
        assert_eq!(r.first_even(), 30002);
        assert_eq!(r.pairs(), 4); // 30002/3 … 30008/9
        assert!("10-5".parse::<PortRange>().is_err());
        assert!("x-5".parse::<PortRange>().is_err());
        assert_eq!("4-4".parse::<PortRange>().unwrap().pairs(), 0);
    }

    #[test]
    fn parses_a_config_file_and_rejects_unknown_keys() {
        let c = Config::from_toml(
            "[relay]\nrtp_ports = \"40000-40099\"\ncores = [0, 1]\napi_token = \"t\"\n[relay.latch]\nmode = \"strict\"\n",
        )
        .unwrap();
        assert_eq!(c.relay.worker_count(), 2);
        assert_eq!(c.relay.rtp_ports.pairs(), 50);
        assert_eq!(c.relay.latch.mode, dataplane::LatchMode::Strict);
        c.relay.validate().unwrap();
        assert!(Config::from_toml("[relay]\nbogus = 1\n").is_err());
    }

    #[test]
    fn parses_remote_deny_and_room_size() {
        let c =
            Config::from_toml("[relay]\nremote_deny = [\"10.0.0.0/8\", \"fd00::/8\"]\nmax_participants = 3\n").unwrap();
        assert_eq!(c.relay.remote_deny.len(), 2);
        assert!(c.relay.remote_deny[0].contains("10.2.3.4".parse().unwrap()));
        assert_eq!(c.relay.max_participants, 3);
        assert!(Config::from_toml("[relay]\nremote_deny = [\"10.0.0.0/40\"]\n").is_err());
    }

    #[test]
    fn requires_a_token_unless_disabled() {
        let mut c = RelayConfig::default();
        assert!(c.validate().is_err());
        c.no_auth = true;
        c.validate().unwrap();
    }
}

#[cfg(test)]
mod sample {
    /// The documented sample must stay a valid configuration.
    #[test]
    fn sample_config_parses() {
        let c = super::Config::from_toml(include_str!("../../docs/hasp.sample.toml")).unwrap();
        assert_eq!(c.relay.rtp_ports.to_string(), "30000-39999");
        // The sample shows the defaults: every key of [proxy] as the code has it.
        assert_eq!(c.proxy, super::ProxyRoleConfig::default());
    }

    #[test]
    fn the_proxy_table_parses_and_is_checked() {
        let c = super::Config::from_toml(
            "[proxy]\ndomain = \"example.com\"\nrelays = [\"ng://192.0.2.1:2223\"]\nsip_threads = 4\nno_auth = true\n",
        )
        .unwrap();
        assert_eq!((c.proxy.domain.as_str(), c.proxy.sip_threads), ("example.com", Some(4)));
        c.proxy.validate(true).unwrap();
        assert!(super::Config::from_toml("[proxy]\nrelay = []\n").is_err(), "unknown keys are refused");
        let mut p = c.proxy.clone();
        p.relays.clear();
        // Membership may bring relays: `hasp proxy` checks for them knowing its backend.
        p.validate(true).expect("relays may come from membership");
        p.validate(false).expect("hasp up brings its own relay");
        p.sip_threads = Some(0);
        assert!(p.validate(false).is_err());
    }
}
