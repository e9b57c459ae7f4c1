//! Flags every role shares: how it finds the cluster, and its name in it.

use anyhow::{Context, Result};
use clap::Args;
use controlplane::cluster::{self, Membership};
use std::sync::Arc;

/// How this process joins the cluster.
#[derive(Args, Debug, Clone, Default)]
pub struct MembershipArgs {
    /// Membership backend: `local` (this process only) or `etcd:URL,URL,…` (every
    /// member of the etcd cluster, `http://host:port`). Peers are found here, never in
    /// a static list [default: local].
    #[arg(long, value_name = "SPEC", env = "HASP_MEMBERSHIP")]
    pub membership: Option<String>,
    /// This process's id in the cluster, unique within its role [default: HOST-PID].
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
}

impl MembershipArgs {
    /// Opens the backend.
    pub fn open(&self) -> Result<Arc<dyn Membership>> {
        let spec = self.membership.as_deref().unwrap_or("local");
        cluster::open(spec).with_context(|| format!("opening membership {spec:?}"))
    }

    /// This process's id.
    pub fn id(&self) -> String {
        self.node_id.clone().unwrap_or_else(cluster::default_id)
    }

    /// Whether membership is this process only (no peers can ever appear).
    pub fn is_local(&self) -> bool {
        self.membership.as_deref().is_none_or(|s| s == "local")
    }
}

/// An address peers can reach for a listener bound to `bound`: a wildcard bind is
/// announced as `fallback` (the advertised media address, or loopback).
pub fn reachable(bound: std::net::SocketAddr, fallback: std::net::IpAddr) -> String {
    if bound.ip().is_unspecified() {
        std::net::SocketAddr::new(fallback, bound.port()).to_string()
    } else {
        bound.to_string()
    }
}

/// Leaves the cluster with every registration, waiting at most a second in all, so
/// peers see a clean stop at once rather than when the leases end.
pub async fn leave_all(regs: Vec<cluster::Registration>) {
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    for r in regs {
        r.leave(until.saturating_duration_since(tokio::time::Instant::now())).await;
    }
}

/// CPU time this process used, in seconds (user + system), from /proc/self/stat.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, so split after its ')').
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Publishes this process's load with every registration in `regs`, once per renewal
/// interval, until they are dropped: `sample` returns the sessions held now and a
/// counter of calls so far; CPU is measured here.
pub fn publish_load(
    regs: Vec<cluster::LoadHandle>,
    sample: impl Fn() -> (u64, u64) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(cluster::RENEW_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = (std::time::Instant::now(), sample().1, cpu_seconds().unwrap_or(0.0));
        loop {
            every.tick().await;
            let now = std::time::Instant::now();
            let (sessions, calls) = sample();
            let cpu = cpu_seconds().unwrap_or(last.2);
            let dt = now.duration_since(last.0).as_secs_f64().max(1e-3);
            let load = cluster::Load {
                sessions,
                calls_per_sec: (calls.saturating_sub(last.1) as f64 / dt * 10.0).round() / 10.0,
                cpu: ((cpu - last.2).max(0.0) / dt * 100.0).round() / 100.0,
            };
            last = (now, calls, cpu);
            for r in &regs {
                r.set(load);
            }
        }
    })
}
