//! The etcd store: the store battery against a real 3-node etcd cluster on loopback,
//! and two `hasp up` proxies sharing it (register through one, call through the other),
//! with an etcd node killed in between. Needs `etcd-server` (scripts/install-deps.sh).

mod common;

use common::etcd::Cluster;
use common::*;
use controlplane::store::Store;
use std::time::Duration;

#[test]
fn etcd_store_passes_the_battery_and_shares_leases() {
    let cluster = Cluster::start(23700);
    let s = controlplane::store::open(&cluster.spec()).unwrap();
    // On the system clock: the battery polls until etcd has expired a 2 s lease.
    controlplane::store::battery(&*s, &controlplane::store::Clock::System);

    // Writes that expire close together share a lease instead of granting one each.
    let e = controlplane::store::etcd::Etcd::connect(&cluster.clients).unwrap();
    for i in 0..50 {
        e.put_dialog(&format!("call-{i}"), "ng://10.0.0.5:2223", 12 * 3600).unwrap();
    }
    // 2048 s windows: 50 puts straddle at most one boundary.
    assert!(e.leases_granted() <= 2, "{} leases for 50 dialogs", e.leases_granted());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let before = e.leases_granted();
    for i in 0..50 {
        let b = controlplane::store::Binding {
            contact: format!("sip:u{i}@192.0.2.1"),
            expires_at: now + 3600,
            path: vec![],
            call_id: format!("r{i}"),
            cseq: 1,
            ..Default::default()
        };
        e.set_bindings(&format!("u{i}@hasp.test"), &[b]).unwrap();
    }
    assert!(e.leases_granted() - before <= 2, "{} leases for 50 AORs", e.leases_granted() - before);
    assert_eq!(e.bindings("u7@hasp.test", now).unwrap().len(), 1);

    // A lease etcd no longer knows (revoked here through etcd's JSON gateway) is
    // replaced at the next write, which succeeds.
    let gateway = |path: &str, body: serde_json::Value| -> serde_json::Value {
        ureq::post(&format!("{}{path}", cluster.clients[1])).send_json(body).unwrap().into_json().unwrap()
    };
    let leases = gateway("/v3/lease/leases", serde_json::json!({}));
    let ids: Vec<serde_json::Value> = leases["leases"].as_array().unwrap().iter().map(|l| l["ID"].clone()).collect();
    assert!(!ids.is_empty(), "{leases}");
    for id in ids {
        gateway("/v3/lease/revoke", serde_json::json!({ "ID": id }));
    }
    assert_eq!(e.dialog("call-0").unwrap(), None, "revoking the lease removed its keys");
    let before = e.leases_granted();
    e.put_dialog("call-after", "ng://10.0.0.6:2223", 12 * 3600).unwrap();
    assert_eq!(e.leases_granted(), before + 1, "a new lease replaced the revoked one");
    assert_eq!(e.dialog("call-after").unwrap().as_deref(), Some("ng://10.0.0.6:2223"));
    for i in 0..10 {
        e.put_dialog(&format!("call-after-{i}"), "ng://10.0.0.6:2223", 12 * 3600).unwrap();
    }
    assert!(e.leases_granted() <= before + 2, "and is reused");
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

/// `user` registers through `registrar` (its contact: a sipp UAS) and is called through
/// `via`, with media anchored in `relay`.
fn call(dir: &std::path::Path, registrar: &str, via: &str, user: &str, pw: &str, relay: &RelayProc) {
    let (alice, bob) = (udp(), udp());
    let mut uas = sipp(dir, "uas_media.xml", 0, &[("media_b", bob.local_addr().unwrap().port().to_string())], &[]);
    let uas_port = sipp_port(&uas);
    let contact = format!("sip:{user}@127.0.0.1:{uas_port}");
    assert_eq!(sip_register(registrar, "hasp.test", user, pw, &contact, 600), 200);
    let mut uac = sipp(
        dir,
        "uac_proxy.xml",
        0,
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
    call(&dir, &sip_a, &sip_b, "bob", "pw", &b);
    // One etcd node dies: registering through B and calling through A still work.
    cluster.kill(0);
    add_sip_user(&b, "carol", "hasp.test", "pw2");
    call(&dir, &sip_b, &sip_a, "carol", "pw2", &a);
}

/// `hasp proxy` on a shared store with `--record-route` naming the cluster, and two
/// relays listed in opposite orders.
fn proxy(store: &str, relays: [&str; 2]) -> (RelayProc, String) {
    let args = [
        "proxy",
        "--listen-api",
        "127.0.0.1:0",
        "--no-auth",
        "--listen-sip",
        "127.0.0.1:0",
        "--domain",
        "hasp.test",
        "--store",
        store,
        "--relay",
        relays[0],
        "--relay",
        relays[1],
        "--record-route",
        "proxies.hasp.test",
        "--nonce-secret",
        "shared-between-proxies",
    ];
    let p = RelayProc::spawn(&args, None);
    let sip = p.ready_line.split_whitespace().find_map(|w| w.strip_prefix("sip=")).unwrap().to_string();
    (p, sip)
}

/// Reads SIP messages on `s` until one starts with `first`.
fn recv_sip(s: &std::net::UdpSocket, first: &str) -> String {
    let mut buf = vec![0u8; 65536];
    wait_for(first, Duration::from_secs(10), || {
        let (n, _) = s.recv_from(&mut buf).ok()?;
        let m = String::from_utf8_lossy(&buf[..n]).to_string();
        m.starts_with(first).then_some(m)
    })
}

fn header<'a>(m: &'a str, name: &str) -> Vec<&'a str> {
    m.lines().filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(str::trim).collect()
}

#[test]
fn a_call_set_up_through_one_proxy_is_ended_through_the_other_and_its_relay_freed() {
    let cluster = Cluster::start(23900);
    let spec = cluster.spec();
    let relay = |ports: &str| {
        let r = RelayProc::spawn(
            &["relay", "--no-auth", "--listen-api", "127.0.0.1:0", "--listen-ng", "127.0.0.1:0", "--rtp-ports", ports],
            None,
        );
        let ng = format!("ng://{}", r.ready_line.split_whitespace().find_map(|w| w.strip_prefix("ng=")).unwrap());
        (r, ng)
    };
    let ((r1, ng1), (r2, ng2)) = (relay("45100-45149"), relay("45150-45199"));
    let (a, sip_a) = proxy(&spec, [&ng1, &ng2]);
    let (_b, sip_b) = proxy(&spec, [&ng2, &ng1]);
    add_sip_user(&a, "bob", "hasp.test", "pw");
    let dir = std::env::temp_dir().join(format!("hasp-etcd-dialog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (alice, bob, sig) = (udp(), udp(), udp());
    let mut uas = sipp(&dir, "uas_media.xml", 0, &[("media_b", bob.local_addr().unwrap().port().to_string())], &[]);
    let uas_port = sipp_port(&uas);
    assert_eq!(sip_register(&sip_a, "hasp.test", "bob", "pw", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);
    // The caller (this test) sends INVITE and ACK through proxy A.
    let me = sig.local_addr().unwrap();
    let call_id = format!("dialog-{}", std::process::id());
    let sdp = format!(
        "v=0\r\no=a 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\n",
        alice.local_addr().unwrap().port()
    );
    let common = |branch: &str, cseq: &str| {
        format!(
            "Via: SIP/2.0/UDP {me};branch=z9hG4bK-{branch};rport\r\nFrom: <sip:alice@caller.example>;tag=al1\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\nMax-Forwards: 70\r\n"
        )
    };
    let invite = format!(
        "INVITE sip:bob@hasp.test SIP/2.0\r\n{}To: <sip:bob@hasp.test>\r\nContact: <sip:alice@{me}>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        common("inv", "1 INVITE"),
        sdp.len()
    );
    sig.send_to(invite.as_bytes(), &sip_a).unwrap();
    let ok = recv_sip(&sig, "SIP/2.0 200");
    assert_eq!(header(&ok, "Record-Route"), ["<sip:proxies.hasp.test;lr>"], "{ok}");
    let to = header(&ok, "To")[0].to_string();
    let target = header(&ok, "Contact")[0].trim_matches(['<', '>']).to_string();
    let in_dialog = |method: &str, branch: &str, cseq: &str| {
        format!(
            "{method} {target} SIP/2.0\r\n{}To: {to}\r\nRoute: <sip:proxies.hasp.test;lr>\r\nContent-Length: 0\r\n\r\n",
            common(branch, cseq)
        )
    };
    sig.send_to(in_dialog("ACK", "ack", "1 ACK").as_bytes(), &sip_a).unwrap();
    // Proxy A anchored the call on relay 1 (its first).
    let (a_addr, b_addr) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let session = r1.wait_media_session(&a_addr, &b_addr);
    let id = session["id"].as_str().unwrap().to_string();
    assert_eq!(r2.call("GET", "/v1/sessions", None).1["count"], 0);
    // The BYE goes through proxy B, whose first relay is relay 2: the shared dialog
    // state sends the delete to relay 1.
    sig.send_to(in_dialog("BYE", "bye", "2 BYE").as_bytes(), &sip_b).unwrap();
    let ok = recv_sip(&sig, "SIP/2.0 200");
    assert!(ok.contains("CSeq: 2 BYE"), "{ok}");
    assert!(wait_for("UAS", Duration::from_secs(30), || uas.try_wait().ok().flatten()).success());
    wait_for("relay 1's session to be deleted", Duration::from_secs(10), || {
        (r1.call("GET", &format!("/v1/sessions/{id}"), None).0 == 404).then_some(())
    });
}

impl Cluster {
    /// The index of the node that leads now, asked through etcd's JSON gateway.
    fn leader(&self) -> Option<usize> {
        // A hung node accepts the connection and never answers: bound every ask.
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(1)).build();
        let status = |c: &str| -> Option<serde_json::Value> {
            agent.post(&format!("{c}/v3/maintenance/status")).send_string("{}").ok()?.into_json().ok()
        };
        let all: Vec<Option<serde_json::Value>> = self.clients.iter().map(|c| status(c)).collect();
        let leader = all.iter().flatten().find_map(|s| s["leader"].as_str().map(str::to_string))?;
        all.iter().position(|s| s.as_ref().is_some_and(|s| s["header"]["member_id"].as_str() == Some(&leader)))
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) node `i`: hung, not dead.
    fn signal(&self, i: usize, sig: i32) {
        let pid = self.nodes[i].as_ref().expect("node running").id();
        // SAFETY: kill(2) on a child process we started.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }
}

/// The etcd leader hangs (SIGSTOP) under REGISTER load: OPTIONS are answered all along
/// (they never wait for the store), REGISTERs wait for the store (or get 503) and
/// complete again once the cluster has elected a new leader.
#[test]
fn a_hung_etcd_leader_delays_registrations_only() {
    let cluster = Cluster::start(24000);
    let (up, sip) = up(&cluster.spec(), "45700-45749");
    for i in 0..4 {
        add_sip_user(&up, &format!("u{i}"), "hasp.test", "pw");
    }
    // REGISTER load: four users re-registering in a loop, each answer recorded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(std::time::Instant, Option<u16>, Duration)>::new()));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let (stop, answers, sip) = (stop.clone(), answers.clone(), sip.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let user = format!("u{i}");
                    let contact = format!("sip:{user}@127.0.0.1:{}", 7100 + i);
                    let t = std::time::Instant::now();
                    let r = sip_register_within(&sip, "hasp.test", &user, "pw", &contact, 600, Duration::from_secs(10));
                    answers.lock().unwrap().push((std::time::Instant::now(), r, t.elapsed()));
                }
            })
        })
        .collect();
    wait_for("registrations to flow", Duration::from_secs(10), || {
        (answers.lock().unwrap().iter().filter(|(_, r, _)| *r == Some(200)).count() >= 8).then_some(())
    });
    let leader = wait_for("a leader", Duration::from_secs(10), || cluster.leader());
    cluster.signal(leader, libc::SIGSTOP);
    let frozen_at = std::time::Instant::now();
    // OPTIONS all along: every one answered, none waiting for the store.
    let pinger = common::ua::Ua::new();
    let mut slowest = Duration::ZERO;
    for n in 0..40 {
        let t = std::time::Instant::now();
        pinger.send(&sip, &common::ua::options(&pinger, n));
        let r = pinger.recv_within(Duration::from_secs(2)).expect("OPTIONS answered while the leader hangs");
        assert_eq!(r.code(), Some(200));
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50)); // pacing: one ping per 50 ms
    }
    eprintln!("OPTIONS while the etcd leader hung: slowest answer {slowest:?}");
    // A new leader takes over; registrations complete again.
    wait_for("a new leader", Duration::from_secs(20), || cluster.leader().filter(|l| *l != leader));
    let elected = std::time::Instant::now();
    wait_for("REGISTERs to succeed after the election", Duration::from_secs(20), || {
        answers.lock().unwrap().iter().any(|(at, r, _)| *at > elected && *r == Some(200)).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    cluster.signal(leader, libc::SIGCONT);
    let answers = answers.lock().unwrap();
    let during: Vec<Option<u16>> = answers.iter().filter(|(at, _, _)| *at > frozen_at).map(|(_, r, _)| *r).collect();
    let longest = answers.iter().filter(|(at, _, _)| *at > frozen_at).map(|(_, _, d)| *d).max();
    eprintln!(
        "REGISTERs answered after the freeze: {} ({} x 200, {} x 503), longest {longest:?}",
        during.len(),
        during.iter().filter(|r| **r == Some(200)).count(),
        during.iter().filter(|r| **r == Some(503)).count()
    );
    // Every REGISTER got an answer (200 or 503 with Retry-After), none was lost.
    assert!(during.iter().all(|r| matches!(r, Some(200) | Some(503))), "{during:?}");
}
