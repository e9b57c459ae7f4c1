//! A 3-node etcd cluster on loopback for the tests that share state or membership
//! through etcd. Its ports are fixed (etcd cannot report a port it picked): each test
//! owns one base in the etcd range of the port plan (mod.rs), using base+1..3
//! (clients), base+11..13 (peers) and base+21..23 (metrics).

use super::wait_for;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running 3-node etcd cluster; killed and its data removed on drop.
pub struct Cluster {
    pub nodes: Vec<Option<Child>>,
    pub clients: Vec<String>,
    dir: std::path::PathBuf,
}

impl Cluster {
    /// Three nodes on ports base+1.. (clients) and base+11.. (peers).
    pub fn start(base: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("hasp-etcd-{base}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let peer = |i: u16| format!("http://127.0.0.1:{}", base + 10 + i);
        let client = |i: u16| format!("http://127.0.0.1:{}", base + i);
        let initial: Vec<String> = (1..=3).map(|i| format!("e{i}={}", peer(i))).collect();
        let nodes = (1..=3u16)
            .map(|i| {
                Some(
                    Command::new("etcd")
                        .args(["--name", &format!("e{i}")])
                        .arg("--data-dir")
                        .arg(dir.join(format!("d{i}")))
                        .args(["--listen-client-urls", &client(i), "--advertise-client-urls", &client(i)])
                        .args(["--listen-peer-urls", &peer(i), "--initial-advertise-peer-urls", &peer(i)])
                        .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                        .args(["--initial-cluster-token", &format!("hasp-{base}")])
                        .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", base + 20 + i)])
                        .env("ETCD_UNSUPPORTED_ARCH", "")
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(dir.join(format!("e{i}.log"))).unwrap())
                        .spawn()
                        .expect("etcd (apt-get install etcd-server)"),
                )
            })
            .collect();
        let c = Self { nodes, clients: (1..=3).map(client).collect(), dir };
        let spec = c.spec();
        wait_for("the etcd cluster to accept writes", Duration::from_secs(30), || {
            let s = controlplane::store::open(&spec).ok()?;
            s.put_user("probe", "probe", "x").ok()
        });
        c
    }

    pub fn spec(&self) -> String {
        format!("etcd:{}", self.clients.join(","))
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
