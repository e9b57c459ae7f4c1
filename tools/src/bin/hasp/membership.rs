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
}
