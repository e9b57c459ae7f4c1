//! Cluster membership: every process (dns, lb, proxy, relay) registers itself with a
//! lease under one prefix — role, id, addresses and load — and watches the members it
//! depends on. A process that dies disappears when its lease ends (TTL 3 s, renewed
//! every second); one that is alive but unhealthy is skipped by its users' own active
//! health checks (the LB's OPTIONS probes), not removed here.
//!
//! Backends behind one trait ([`Membership`]), one test battery: [`local::Local`]
//! (in-process, for `hasp up` and simulations) and [`etcd::EtcdMembership`] (leases +
//! watch, for several processes or machines). [`open`] takes the `--membership` spec.
//!
//! Users never poll: [`Membership::view`] is a `tokio::sync::watch` receiver holding the
//! current [`View`], replaced whole on every change (joins, leaves, load updates).

pub mod api;
mod battery;
pub mod etcd;
pub mod local;
pub mod vip;

#[doc(hidden)]
pub use battery::battery;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Default lease TTL: a dead member disappears at most this long after its last renewal.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);
/// How often a member renews its lease and publishes its load.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// Errors of the membership backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The `--membership` spec is not understood.
    #[error("membership {0:?}: expected local or etcd:URL,URL,…")]
    Spec(String),
    /// The backend failed or is unreachable.
    #[error("membership backend: {0}")]
    Backend(String),
}

/// What a member does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Authoritative DNS for the service domain (`hasp dns`).
    Dns,
    /// SIP load balancer (`hasp lb`).
    Lb,
    /// SIP proxy and registrar (`hasp proxy`).
    Proxy,
    /// RTP relay with its conference mixer (`hasp relay`).
    Relay,
}

impl Role {
    /// Every role, in key order.
    pub const ALL: [Role; 4] = [Role::Dns, Role::Lb, Role::Proxy, Role::Relay];

    /// The lowercase name used in keys and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Dns => "dns",
            Role::Lb => "lb",
            Role::Proxy => "proxy",
            Role::Relay => "relay",
        }
    }

    /// Parses [`Role::as_str`].
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A member's load, published with every renewal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Sessions (relay) or dialogs (proxy) it holds now.
    #[serde(default)]
    pub sessions: u64,
    /// New calls per second over the last interval.
    #[serde(default)]
    pub calls_per_sec: f64,
    /// CPU use of the process over the last interval, in cores (1.0 = one core busy).
    #[serde(default)]
    pub cpu: f64,
}

/// One live member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// What it does.
    pub role: Role,
    /// Unique within its role (by default `HOST-PID`, or `--node-id`).
    pub id: String,
    /// Its SIP listener, `IP:PORT` (UDP and TCP), if it has one.
    #[serde(default)]
    pub sip: Option<String>,
    /// Its HTTP API, `IP:PORT`, if it has one.
    #[serde(default)]
    pub api: Option<String>,
    /// Its NG control listener (UDP), `IP:PORT`, if it has one.
    #[serde(default)]
    pub ng: Option<String>,
    /// The address its media (or, for dns, its DNS) is served on: `IP` for a relay,
    /// `IP:PORT` for a DNS server.
    #[serde(default)]
    pub media: Option<String>,
    /// Its load at its last renewal.
    #[serde(default)]
    pub load: Load,
    /// When it joined, Unix seconds.
    pub since: u64,
}

impl Member {
    /// A member of `role` named `id` with no addresses yet, joining now.
    pub fn new(role: Role, id: impl Into<String>) -> Self {
        Self {
            role,
            id: id.into(),
            sip: None,
            api: None,
            ng: None,
            media: None,
            load: Load::default(),
            since: unix_now(),
        }
    }

    /// The key of this member within its backend: `ROLE/ID`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.role.as_str(), self.id)
    }

    /// Its SIP address parsed, if it has a valid one.
    pub fn sip_addr(&self) -> Option<std::net::SocketAddr> {
        self.sip.as_deref()?.parse().ok()
    }
}

/// The live members at one moment. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// Grows with every change the backend saw (etcd: its revision).
    pub revision: u64,
    /// Every live member, sorted by role then id.
    pub members: Arc<[Member]>,
}

impl View {
    /// The members of one role, in id order.
    pub fn of(&self, role: Role) -> impl Iterator<Item = &Member> + '_ {
        self.members.iter().filter(move |m| m.role == role)
    }

    /// The member of `role` named `id`, if live.
    pub fn get(&self, role: Role, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.role == role && m.id == id)
    }
}

/// A membership backend. Shared by every role of a process (`Arc<dyn Membership>`).
pub trait Membership: Send + Sync + std::fmt::Debug {
    /// Joins with `member` (replacing any earlier entry with the same role and id) and
    /// keeps its lease alive until the returned [`Registration`] is dropped, which
    /// leaves at once (a crash leaves when the lease ends). Must be called within a
    /// tokio runtime: renewals run as a task.
    fn register(&self, member: Member) -> Registration;

    /// The live members, updated on every change.
    fn view(&self) -> watch::Receiver<View>;

    /// The backend's name for logs and `/v1/cluster` (`local`, `etcd`).
    fn kind(&self) -> &'static str;

    /// Campaigns, as `id`, to hold `name` — one holder in the whole cluster at a time
    /// (the shared contact address of the LBs). The holder keeps it while it renews a
    /// lease of `ttl`; when it dies, another campaigner takes over once the lease ends;
    /// dropping the [`Campaign`] resigns at once. Must be called within a tokio runtime.
    fn campaign(&self, name: &str, id: &str, ttl: Duration) -> Campaign;
}

/// A campaign for a name (see [`Membership::campaign`]). Dropping it resigns.
#[derive(Debug)]
pub struct Campaign {
    /// Whether this process holds the name now. Turns false as soon as the holder can
    /// no longer be sure it holds it (its lease renewal failed), before anyone else can
    /// take over (when the lease ends), so two never act as the holder at once.
    pub held: watch::Receiver<bool>,
    _resign: tokio::sync::oneshot::Sender<()>,
}

impl Campaign {
    /// For backends: a campaign reporting through `held`, resigning when the returned
    /// receiver resolves (the campaign is dropped).
    pub fn channel() -> (Self, watch::Sender<bool>, tokio::sync::oneshot::Receiver<()>) {
        let (held_tx, held) = watch::channel(false);
        let (resign, resigned) = tokio::sync::oneshot::channel();
        (Self { held, _resign: resign }, held_tx, resigned)
    }
}

/// A live registration: renews its lease in the background; [`Registration::set_load`]
/// publishes load with the next renewal. Dropping it leaves the cluster (in the
/// background); [`Registration::leave`] leaves and waits until the backend confirms.
#[derive(Debug)]
pub struct Registration {
    load: watch::Sender<Load>,
    /// Dropped to leave: the renewal task sees the channel close.
    leave: Option<tokio::sync::oneshot::Sender<()>>,
    /// Fires (or closes) once the backend has removed the member.
    left: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// What a backend's renewal task holds of a [`Registration`].
#[derive(Debug)]
pub struct RenewalEnds {
    /// Load updates.
    pub load: watch::Receiver<Load>,
    /// Resolves (with an error: the sender is dropped, never used) when the member
    /// leaves.
    pub leave: tokio::sync::oneshot::Receiver<()>,
    /// To send when the member is gone from the backend.
    pub left: tokio::sync::oneshot::Sender<()>,
}

impl Registration {
    /// For backends: a registration with `load` as its first load, and the ends its
    /// renewal task holds.
    pub fn channel(load: Load) -> (Self, RenewalEnds) {
        let (load_tx, load_rx) = watch::channel(load);
        let (leave_tx, leave_rx) = tokio::sync::oneshot::channel();
        let (left_tx, left_rx) = tokio::sync::oneshot::channel();
        (
            Self { load: load_tx, leave: Some(leave_tx), left: Some(left_rx) },
            RenewalEnds { load: load_rx, leave: leave_rx, left: left_tx },
        )
    }

    /// Publishes the member's load with its next renewal.
    pub fn set_load(&self, load: Load) {
        let _ = self.load.send(load);
    }

    /// A handle that publishes load without keeping the registration alive.
    pub fn load_handle(&self) -> LoadHandle {
        LoadHandle(self.load.clone())
    }

    /// Leaves the cluster now and waits (at most `wait`) until the backend has
    /// removed the member, so a clean stop is seen at once rather than a lease later.
    pub async fn leave(mut self, wait: Duration) {
        drop(self.leave.take());
        if let Some(left) = self.left.take() {
            let _ = tokio::time::timeout(wait, left).await;
        }
    }
}

/// Publishes a member's load; see [`Registration::load_handle`].
#[derive(Debug, Clone)]
pub struct LoadHandle(watch::Sender<Load>);

impl LoadHandle {
    /// Publishes the member's load with its next renewal.
    pub fn set(&self, load: Load) {
        let _ = self.0.send(load);
    }
}

/// Opens a backend from its `--membership` spec: `local` (this process only) or
/// `etcd:URL,URL,…` (every member of the etcd cluster listed, `http://host:port`).
pub fn open(spec: &str) -> Result<Arc<dyn Membership>, Error> {
    match spec.split_once(':').unwrap_or((spec, "")) {
        ("local", "") => Ok(Arc::new(local::Local::new(local::Clock::system(), DEFAULT_TTL))),
        ("etcd", urls) => {
            let eps: Vec<String> =
                urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect();
            if eps.is_empty() {
                return Err(Error::Spec(spec.into()));
            }
            Ok(Arc::new(etcd::EtcdMembership::new(eps, "/hasp/", DEFAULT_TTL)))
        }
        _ => Err(Error::Spec(spec.into())),
    }
}

/// A member id for this process: `HOST-PID`.
pub fn default_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{}", if host.is_empty() { "host" } else { host }, std::process::id())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
