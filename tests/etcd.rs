//! The etcd store: the store battery against a real 3-node etcd cluster on loopback,
//! and two `hasp up` proxies sharing it (register through one, call through the other),
//! with an etcd node killed in between. Needs `etcd-server` (scripts/install-deps.sh).

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Cluster {
    nodes: Vec<Option<Child>>,
    clients: Vec<String>,
    dir: std::path::PathBuf,
}

impl Cluster {
    /// Three nodes on ports base+1.. (clients) and base+11.. (peers).
    fn start(base: u16) -> Self {
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

    fn spec(&self) -> String {
        format!("etcd:{}", self.clients.join(","))
    }

    fn kill(&mut self, i: usize) {
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

#[test]
fn etcd_store_passes_the_battery() {
    let cluster = Cluster::start(23700);
    let s = controlplane::store::open(&cluster.spec()).unwrap();
    controlplane::store::battery(&*s);
}

fn up(store: &str, ports: &str) -> (RelayProc, String) {
    let args = [
        "up",
        "--listen-api",
        "127.0.0.1:0",
        "--api-token",
        TOKEN,
        "--listen-sip",
        "127.0.0.1:0",
        "--domain",
        "hasp.test",
        "--store",
        store,
        "--rtp-ports",
        ports,
        "--nonce-secret",
        "shared-between-proxies",
    ];
    let p = RelayProc::spawn(&args, Some(TOKEN.to_string()));
    let sip = p.ready_line.split_whitespace().find_map(|w| w.strip_prefix("sip=")).unwrap().to_string();
    (p, sip)
}

fn call(dir: &std::path::Path, via: &str, user: &str, relay: &RelayProc, uas_port: u16) {
    let (alice, bob) = (udp(), udp());
    let uac_port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut uas =
        sipp(dir, "uas_media.xml", uas_port, &[("media_b", bob.local_addr().unwrap().port().to_string())], &[]);
    std::thread::sleep(Duration::from_millis(300)); // sipp binds its port
    let mut uac = sipp(
        dir,
        "uac_proxy.xml",
        uac_port,
        &[("media_a", alice.local_addr().unwrap().port().to_string()), ("domain", "hasp.test".into())],
        &["-s", user, via],
    );
    let (a, b) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let session = relay.wait_media_session(&a, &b);
    let port = |leg: usize| session["legs"][leg]["rtp_port"].as_u64().unwrap() as u16;
    alice.send_to(&rtp(1, 1, 1), ("127.0.0.1", port(0))).unwrap();
    assert_eq!(recv(&bob).0, rtp(1, 1, 1));
    bob.send_to(&rtp(1, 2, 2), ("127.0.0.1", port(1))).unwrap();
    assert_eq!(recv(&alice).0, rtp(1, 2, 2));
    assert!(wait_for("UAC", Duration::from_secs(30), || uac.try_wait().ok().flatten()).success());
    assert!(wait_for("UAS", Duration::from_secs(30), || uas.try_wait().ok().flatten()).success());
}

#[test]
fn two_proxies_share_registrations_through_etcd_and_survive_a_node_loss() {
    let mut cluster = Cluster::start(23800);
    let spec = cluster.spec();
    let (a, sip_a) = up(&spec, "45200-45299");
    let (b, sip_b) = up(&spec, "45300-45399");
    let dir = std::env::temp_dir().join(format!("hasp-etcd-calls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Provisioned through proxy A, registered through A, called through B.
    add_sip_user(&a, "bob", "hasp.test", "pw");
    let free = || std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let uas_port = free();
    assert_eq!(sip_register(&sip_a, "hasp.test", "bob", "pw", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);
    call(&dir, &sip_b, "bob", &b, uas_port);
    // One etcd node dies: registering through B and calling through A still work.
    cluster.kill(0);
    add_sip_user(&b, "carol", "hasp.test", "pw2");
    let uas2 = free();
    assert_eq!(sip_register(&sip_b, "hasp.test", "carol", "pw2", &format!("sip:carol@127.0.0.1:{uas2}"), 600), 200);
    call(&dir, &sip_a, "carol", &a, uas2);
}
