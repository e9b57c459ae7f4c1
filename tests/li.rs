//! Lawful intercept end to end: X1 over the LI listener, X3 media PDUs and X2
//! signalling PDUs decoded by a mediation function (a TCP server in the test).

mod common;

use common::*;
use controlplane::li::pdu::{self, Pdu};
use serde_json::Value;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LI_TOKEN: &str = "li-secret-token-42";

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hasp-li-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A mediation function: accepts connections on `l` and decodes every PDU.
fn mediation_function(l: TcpListener) -> mpsc::Receiver<Pdu> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    while let Ok(Some((p, n))) = pdu::decode(&buf) {
                        buf.drain(..n);
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    rx
}

/// Two UDP sockets on consecutive ports (RTP, RTCP), as a phone would have.
fn udp_pair(base: u16) -> (UdpSocket, UdpSocket) {
    for p in (base..base + 200).step_by(2) {
        if let (Ok(a), Ok(b)) = (UdpSocket::bind(("127.0.0.1", p)), UdpSocket::bind(("127.0.0.1", p + 1))) {
            for s in [&a, &b] {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            }
            return (a, b);
        }
    }
    panic!("no free port pair near {base}");
}

fn li_relay(ports: &str, extra: &[&str]) -> (RelayProc, String, std::path::PathBuf) {
    let dir = tmp(ports);
    let audit = dir.join("audit.log");
    let mut args = vec!["--rtp-ports", ports, "--listen-li", "127.0.0.1:0", "--li-token", LI_TOKEN, "--li-audit-log"];
    let audit_s = audit.to_str().unwrap().to_string();
    args.push(&audit_s);
    args.extend_from_slice(extra);
    let relay = RelayProc::start(&args);
    let li = relay.ready_line.split_whitespace().find_map(|w| w.strip_prefix("li=")).unwrap().to_string();
    (relay, li, audit)
}

fn li_call(
    relay: &RelayProc,
    li: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    // Same HTTP helper, pointed at the LI listener.
    let mut r = relay.call_with_base(li, method, path, body, token);
    if r.1.is_null() {
        r.1 = Value::Null;
    }
    r
}

fn task(xid: &str, target: &str, mf: SocketAddr) -> String {
    format!(r#"{{"xid":"{xid}","targets":[{target}],"destinations":[{{"tcp":"{mf}"}}]}}"#)
}

fn xid_bytes(x: &str) -> [u8; 16] {
    controlplane::li::tasks::parse_uuid(x).unwrap()
}

#[test]
fn mediation_function_gets_every_packet_both_ways_in_order() {
    let (relay, li, audit) = li_relay("43100-43199", &[]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let (alice, alice_c) = udp_pair(47000);
    let (bob, bob_c) = udp_pair(47300);
    let (id, _, rtp_p, rtcp_p) = relay.create_between(&alice, &bob);
    let xid = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";
    let pcap = audit.with_file_name("task.pcap");
    let body = format!(
        r#"{{"xid":"{xid}","targets":[{{"session":"{id}"}}],"destinations":[{{"tcp":"{mf}"}}],"pcap":"{}"}}"#,
        pcap.display()
    );
    let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&body), Some(LI_TOKEN));
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["active"], true);
    let mut sent = Vec::new(); // (from_alice, bytes)
    for seq in 0..30u16 {
        let (a, b) = (rtp(seq, 0xa, 1), rtp(seq, 0xb, 2));
        alice.send_to(&a, rtp_p[0]).unwrap();
        assert_eq!(recv(&bob).0, a, "forwarded byte for byte");
        sent.push((true, a));
        bob.send_to(&b, rtp_p[1]).unwrap();
        assert_eq!(recv(&alice).0, b);
        sent.push((false, b));
        if seq % 10 == 0 {
            let (ca, cb) = (rtcp(0xa, seq as u8), rtcp(0xb, seq as u8));
            alice_c.send_to(&ca, rtcp_p[0]).unwrap();
            assert_eq!(recv(&bob_c).0, ca);
            sent.push((true, ca));
            bob_c.send_to(&cb, rtcp_p[1]).unwrap();
            assert_eq!(recv(&alice_c).0, cb);
            sent.push((false, cb));
        }
    }
    let got: Vec<Pdu> = (0..sent.len())
        .map(|i| pdus.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("PDU {i} of {}", sent.len())))
        .collect();
    let corr = got[0].correlation;
    for (i, (p, (from_alice, bytes))) in got.iter().zip(&sent).enumerate() {
        assert_eq!(p.pdu_type, 2, "X3");
        assert_eq!(p.payload_format, pdu::format::RTP);
        assert_eq!(p.xid, xid_bytes(xid));
        assert_eq!(p.correlation, corr, "one correlation id for the call");
        assert_eq!(p.direction, if *from_alice { 3 } else { 2 }, "leg A is the target");
        assert_eq!(&p.payload, bytes, "PDU {i} carries the packet unchanged");
        assert_eq!(p.sequence(), Some(i as u32 + 1));
        assert!(p.attr(pdu::attr::TIMESTAMP).is_some());
    }
    // The pcap file holds the same packets, as raw IPv4/UDP.
    let cap = std::fs::read(&pcap).unwrap();
    assert_eq!(&cap[..4], &0xa1b2_c3d4u32.to_le_bytes());
    assert_eq!(u32::from_le_bytes(cap[20..24].try_into().unwrap()), 101, "LINKTYPE_RAW");
    let (mut off, mut n) = (24, 0);
    while off + 16 <= cap.len() {
        let len = u32::from_le_bytes(cap[off + 8..off + 12].try_into().unwrap()) as usize;
        let pkt = &cap[off + 16..off + 16 + len];
        assert_eq!(&pkt[28..], &sent[n].1[..], "pcap record {n}");
        off += 16 + len;
        n += 1;
    }
    assert_eq!(n, sent.len());
    // Deactivation stops tapping before the next packet.
    let (s, _) = li_call(&relay, &li, "DELETE", &format!("/v1/li/tasks/{xid}"), None, Some(LI_TOKEN));
    assert_eq!(s, 204);
    let copied = |r: &RelayProc| {
        li_call(r, &li, "GET", "/v1/li/stats", None, Some(LI_TOKEN)).1["packets_copied"].as_u64().unwrap()
    };
    let before = copied(&relay);
    for seq in 100..110u16 {
        alice.send_to(&rtp(seq, 0xa, 1), rtp_p[0]).unwrap();
        assert_eq!(recv(&bob).0, rtp(seq, 0xa, 1));
    }
    assert_eq!(copied(&relay), before);
    assert!(pdus.recv_timeout(Duration::from_millis(200)).is_err(), "no PDU after deactivation");
    // Activating mid-call taps from the very next packet.
    let (s, _) = li_call(
        &relay,
        &li,
        "POST",
        "/v1/li/tasks",
        Some(&task(xid, &format!(r#"{{"session":"{id}"}}"#), mf)),
        Some(LI_TOKEN),
    );
    assert_eq!(s, 201);
    alice.send_to(&rtp(200, 0xa, 1), rtp_p[0]).unwrap();
    assert_eq!(recv(&bob).0, rtp(200, 0xa, 1));
    assert_eq!(pdus.recv_timeout(Duration::from_secs(5)).unwrap().payload, rtp(200, 0xa, 1));
    let audit = std::fs::read_to_string(audit).unwrap();
    let actions: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["action"].as_str().unwrap().to_string())
        .collect();
    assert!(actions.contains(&"deactivate".into()), "{actions:?}");
    // Each activation: its intent (pending) before it took effect, then its outcome.
    assert_eq!(actions.iter().filter(|a| *a == "activate").count(), 4, "{actions:?}");
}

#[test]
fn mediation_function_outage_buffers_then_drops_and_forwarding_never_pauses() {
    let (relay, li, _) = li_relay("43200-43299", &["--li-buffer-bytes", "20000"]);
    // The mediation function's address, down for now: a TCP socket bound but not
    // listening holds the port (no other process can take it) and refuses connections.
    let reserved = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let mf = reserved.local_addr().unwrap().as_socket().unwrap();
    let (alice, bob) = (udp(), udp());
    let (id, _, rtp_p, _) = relay.create_between(&alice, &bob);
    let xid = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
    let (s, _) = li_call(
        &relay,
        &li,
        "POST",
        "/v1/li/tasks",
        Some(&task(xid, &format!(r#"{{"session":"{id}"}}"#), mf)),
        Some(LI_TOKEN),
    );
    assert_eq!(s, 201);
    // 2 s of G.711 (one packet per 10 ms here) while the mediation function is away.
    let n = 200u16;
    let mut worst = Duration::ZERO;
    let start = Instant::now();
    for seq in 0..n {
        let t = Instant::now();
        alice.send_to(&rtp(seq, 0xa, 1), rtp_p[0]).unwrap();
        assert_eq!(recv(&bob).0, rtp(seq, 0xa, 1));
        worst = worst.max(t.elapsed());
        let next = start + Duration::from_millis(10 * (seq as u64 + 1));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    assert!(worst < Duration::from_millis(50), "forwarding paused for {worst:?} while the MF was down");
    // The mediation function comes back: what was buffered arrives, the rest was dropped.
    reserved.listen(16).unwrap();
    let pdus = mediation_function(TcpListener::from(reserved));
    let stats = wait_for("buffered PDUs delivered", Duration::from_secs(15), || {
        let v = li_call(&relay, &li, "GET", "/v1/li/stats", None, Some(LI_TOKEN)).1;
        let d = &v["destinations"][0]["stats"];
        (d["connected"] == true && d["queued_bytes"] == 0).then(|| v.clone())
    });
    let d = &stats["destinations"][0]["stats"];
    let (delivered, dropped) = (d["delivered"].as_u64().unwrap(), d["dropped"].as_u64().unwrap());
    assert_eq!(delivered + dropped, n as u64, "{stats}");
    assert!(delivered > 0 && dropped > 0, "bounded buffer: {stats}");
    assert!(delivered * 150 <= 20_000 + 150, "no more than the bound was kept: {stats}");
    let got: Vec<Pdu> = (0..delivered).map(|_| pdus.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
    // The oldest were kept, in order.
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.sequence(), Some(i as u32 + 1));
    }
}

#[test]
fn interception_is_invisible_without_li_credentials() {
    let (relay, li, audit) = li_relay("43300-43399", &[]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let _pdus = mediation_function(l);
    let (tapped, ..) = relay.create("");
    let (plain, ..) = relay.create("");
    let xid = "9b2c1d3e-0000-4000-8000-00000000abcd";
    let t = task(xid, &format!(r#"{{"session":"{tapped}"}}"#), mf);
    // The session API's token is not an LI credential; nor is none.
    for tok in [Some(TOKEN), None, Some("wrong")] {
        let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&t), tok);
        assert_eq!((s, v["code"].as_str()), (401, Some("unauthorized")));
        let (s, v) = li_call(&relay, &li, "GET", "/v1/li/tasks", None, tok);
        assert_eq!(s, 401);
        assert!(!v.to_string().contains(xid));
    }
    assert_eq!(li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&t), Some(LI_TOKEN)).0, 201);
    // The session API shows tapped and untapped sessions alike and never names the task.
    let shape = |v: &Value| -> Vec<String> {
        let mut keys = Vec::new();
        fn walk(v: &Value, p: &str, out: &mut Vec<String>) {
            if let Value::Object(m) = v {
                for (k, x) in m {
                    out.push(format!("{p}.{k}"));
                    walk(x, &format!("{p}.{k}"), out);
                }
            } else if let Value::Array(a) = v {
                for x in a {
                    walk(x, &format!("{p}[]"), out);
                }
            }
        }
        walk(v, "", &mut keys);
        keys.sort();
        keys.dedup();
        keys
    };
    let (_, a) = relay.call("GET", &format!("/v1/sessions/{tapped}"), None);
    let (_, b) = relay.call("GET", &format!("/v1/sessions/{plain}"), None);
    assert_eq!(shape(&a), shape(&b));
    let everything = format!("{a}{b}{}{}", relay.call("GET", "/v1/sessions", None).1, relay.metrics());
    for word in [xid, "tap", "intercept", "li_", "lawful"] {
        assert!(!everything.to_lowercase().contains(word), "session API or metrics mention {word:?}");
    }
    let audit = std::fs::read_to_string(audit).unwrap();
    assert_eq!(audit.lines().filter(|l| l.contains("\"denied\"")).count(), 6, "{audit}");
    assert!(audit.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
}

#[test]
fn malformed_x1_requests_get_clear_errors() {
    let (relay, li, audit) = li_relay("43400-43499", &[]);
    let mf = "127.0.0.1:9";
    let ok = r#"{"xid":"11111111-2222-3333-4444-555555555555","targets":[{"call_id":"c1"}],"destinations":[{"tcp":"127.0.0.1:9"}]}"#;
    let cases: &[(&str, &str, Option<String>, u16, &str)] = &[
        ("POST", "/v1/li/tasks", Some("{oops".into()), 400, "bad_json"),
        ("POST", "/v1/li/tasks", Some(r#"{"xid":"x"}"#.into()), 422, "invalid_request"),
        (
            "POST",
            "/v1/li/tasks",
            Some(task("not-a-uuid", r#"{"call_id":"c"}"#, mf.parse().unwrap())),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/li/tasks",
            Some(task("11111111-2222-3333-4444-555555555555", r#"{"phone":"1"}"#, mf.parse().unwrap())),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/li/tasks",
            Some(task("11111111-2222-3333-4444-555555555555", r#"{"aor":"nodomain"}"#, mf.parse().unwrap())),
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/li/tasks",
            Some(
                r#"{"xid":"11111111-2222-3333-4444-555555555555","targets":[],"destinations":[{"tcp":"127.0.0.1:9"}]}"#
                    .into(),
            ),
            422,
            "invalid_request",
        ),
        ("POST", "/v1/li/tasks", Some(ok.into()), 201, ""),
        ("POST", "/v1/li/tasks", Some(ok.into()), 409, "conflict"),
        (
            "PATCH",
            "/v1/li/tasks/11111111-2222-3333-4444-555555555555",
            Some(r#"{"targets":[]}"#.into()),
            422,
            "invalid_request",
        ),
        (
            "PATCH",
            "/v1/li/tasks/11111111-2222-3333-4444-555555555555",
            Some(r#"{"start":10,"end":5}"#.into()),
            422,
            "invalid_request",
        ),
        ("PATCH", "/v1/li/tasks/11111111-2222-3333-4444-555555555555", Some(r#"{"end":4102444800}"#.into()), 200, ""),
        ("GET", "/v1/li/tasks/00000000-0000-0000-0000-000000000000", None, 404, "not_found"),
        ("DELETE", "/v1/li/tasks/00000000-0000-0000-0000-000000000000", None, 404, "not_found"),
        ("DELETE", "/v1/li/tasks/11111111-2222-3333-4444-555555555555", None, 204, ""),
    ];
    for (m, p, b, status, code) in cases {
        let (s, v) = li_call(&relay, &li, m, p, b.as_deref(), Some(LI_TOKEN));
        assert_eq!(s, *status, "{m} {p} {b:?} → {v}");
        if !code.is_empty() {
            assert_eq!(v["code"], *code, "{m} {p} → {v}");
            assert!(!v["message"].as_str().unwrap_or("").is_empty());
        }
    }
    let records: Vec<Value> =
        std::fs::read_to_string(audit).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let outcomes: Vec<&Value> = records.iter().filter(|r| r["outcome"] != "pending").collect();
    assert_eq!(outcomes.len(), cases.len(), "every X1 request is audited once with its outcome");
    // The three changes that took effect were written ahead: intent, then outcome.
    let intents: Vec<&Value> = records.iter().filter(|r| r["outcome"] == "pending").collect();
    assert_eq!(intents.len(), 3);
    for i in intents {
        assert!(outcomes.iter().any(|o| o["req"] == i["req"] && o["outcome"] == "ok"), "{i}");
    }
}

#[test]
fn x2_signalling_and_x3_media_of_an_aor_target_share_a_correlation_id() {
    use controlplane::li::{correlation_of, Li, SipEvent};
    use controlplane::relay::calls::{AnchorOptions, Calls};
    use std::sync::Arc;
    let dir = tmp("x2");
    let cfg =
        controlplane::RelayConfig { rtp_ports: "43500-43599".parse().unwrap(), no_auth: true, ..Default::default() };
    let relay = controlplane::Relay::start(cfg).unwrap();
    let calls = Arc::new(Calls::new(relay.clone()));
    let li_cfg =
        controlplane::li::LiConfig { buffer_bytes: 1 << 20, ..controlplane::li::LiConfig::new(dir.join("audit.log")) };
    let li = Li::start(relay.clone(), calls.clone(), &li_cfg).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let xid = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    let t: controlplane::li::tasks::Task =
        serde_json::from_str(&task(xid, r#"{"aor":"bob@example.com"}"#, mf)).unwrap();
    li.create("test", t, None).unwrap();
    let call_id = "x2-call@example.com";
    let (caller, callee): (SocketAddr, SocketAddr) =
        ("127.0.0.1:5061".parse().unwrap(), "127.0.0.1:5062".parse().unwrap());
    let invite = b"INVITE sip:bob@example.com SIP/2.0\r\nCall-ID: x2-call@example.com\r\n\r\n";
    let ev = |msg: &'static [u8], from_caller: bool| SipEvent {
        call_id,
        from_aor: "alice@example.com",
        to_aor: "bob@example.com",
        from_caller,
        src: if from_caller { caller } else { callee },
        dst: if from_caller { callee } else { caller },
        message: msg,
    };
    li.sip_event(&ev(invite, true));
    li.sip_event(&ev(b"SIP/2.0 200 OK\r\nCall-ID: x2-call@example.com\r\n\r\n", false));
    let (alice, bob) = (udp(), udp());
    let sdp = |a: &UdpSocket| {
        format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\n",
            a.local_addr().unwrap().port()
        )
    };
    let offer = calls.offer(call_id, "ftag", None, &sdp(&alice), &AnchorOptions::default()).unwrap();
    let answer = calls.answer(call_id, "ftag", "ttag", &sdp(&bob), &AnchorOptions::default()).unwrap();
    let port = |s: &str| {
        s.lines().find_map(|l| l.strip_prefix("m=audio ")).unwrap().split(' ').next().unwrap().parse::<u16>().unwrap()
    };
    // Media is tapped as soon as the stream exists: poll the first packets through.
    let stats_tapped = || li.stats()["tapped_sessions"].as_u64().unwrap();
    wait_for("the AOR's call to be tapped", Duration::from_secs(5), || (stats_tapped() == 1).then_some(()));
    alice.send_to(&rtp(1, 0xa, 1), ("127.0.0.1", port(&answer))).unwrap();
    assert_eq!(recv(&bob).0, rtp(1, 0xa, 1));
    bob.send_to(&rtp(1, 0xb, 2), ("127.0.0.1", port(&offer))).unwrap();
    assert_eq!(recv(&alice).0, rtp(1, 0xb, 2));
    let got: Vec<Pdu> = (0..4).map(|_| pdus.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
    let corr = correlation_of(call_id);
    assert!(got.iter().all(|p| p.correlation == corr && p.xid == xid_bytes(xid)));
    assert_eq!(
        (got[0].pdu_type, got[0].payload_format, got[0].direction),
        (1, 9, 2),
        "INVITE goes to the target (bob)"
    );
    assert_eq!(got[0].payload, invite);
    assert_eq!((got[1].pdu_type, got[1].direction), (1, 3), "200 OK comes from the target");
    // Bob is the callee (leg B): alice's RTP is "to target", bob's "from target".
    assert_eq!((got[2].pdu_type, got[2].direction, &got[2].payload), (2, 2, &rtp(1, 0xa, 1)));
    assert_eq!((got[3].pdu_type, got[3].direction, &got[3].payload), (2, 3, &rtp(1, 0xb, 2)));
    relay.shutdown();
}

#[test]
fn mediation_function_over_mutual_tls() {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    let dir = tmp("tls");
    // A CA; the mediation function's certificate for "mf.test"; the relay's client
    // certificate. All made here, for this test.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv =
        rcgen::CertificateParams::new(vec!["mf.test".to_string()]).unwrap().signed_by(&srv_key, &ca, &ca_key).unwrap();
    let cli_key = rcgen::KeyPair::generate().unwrap();
    let cli = rcgen::CertificateParams::new(vec!["hasp-relay".to_string()])
        .unwrap()
        .signed_by(&cli_key, &ca, &ca_key)
        .unwrap();
    let (ca_pem, cli_pem, cli_key_pem) = (dir.join("ca.pem"), dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cli_pem, cli.pem()).unwrap();
    std::fs::write(&cli_key_pem, cli_key.serialize_pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(srv.der().to_vec())],
                PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
            )
            .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let (tx, pdus) = mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let (cfg, tx) = (server_cfg.clone(), tx.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut s = rustls::StreamOwned::new(conn, c);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16384];
                loop {
                    while let Ok(Some((p, n))) = pdu::decode(&buf) {
                        buf.drain(..n);
                        let _ = tx.send(p);
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });

    let (relay, li, _) = li_relay("44000-44099", &[]);
    let (alice, bob) = (udp(), udp());
    let (id, _, port, _) = relay.create_between(&alice, &bob);
    let tls = format!(
        r#"{{"server_name":"mf.test","ca":"{}","cert":"{}","key":"{}"}}"#,
        ca_pem.display(),
        cli_pem.display(),
        cli_key_pem.display()
    );
    // A CA file that does not exist is refused at once.
    let bad = format!(
        r#"{{"xid":"11111111-2222-4333-8444-555555555555","targets":[{{"session":"{id}"}}],"destinations":[{{"tcp":"{mf}","tls":{{"server_name":"mf.test","ca":"/nonexistent.pem"}}}}]}}"#
    );
    let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&bad), Some(LI_TOKEN));
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid_request")), "{v}");
    let task = format!(
        r#"{{"xid":"22222222-2222-4333-8444-555555555555","targets":[{{"session":"{id}"}}],"destinations":[{{"tcp":"{mf}","tls":{tls}}}]}}"#
    );
    let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&task), Some(LI_TOKEN));
    assert_eq!(s, 201, "{v}");
    for seq in 0..5u16 {
        alice.send_to(&rtp(seq, 0xa, 1), port[0]).unwrap();
        assert_eq!(recv(&bob).0, rtp(seq, 0xa, 1));
    }
    for seq in 0..5u16 {
        let p = pdus.recv_timeout(Duration::from_secs(10)).expect("PDU over mutual TLS");
        assert_eq!(p.payload, rtp(seq, 0xa, 1));
    }
}

#[test]
fn proxy_call_of_an_aor_target_yields_x2_and_x3_with_one_correlation_id() {
    let dir = tmp("x2proxy");
    let store = format!("embedded:{}", dir.join("hasp.redb").display());
    let audit = dir.join("audit.log").display().to_string();
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
        &store,
        "--rtp-ports",
        "44100-44199",
        "--listen-li",
        "127.0.0.1:0",
        "--li-token",
        LI_TOKEN,
        "--li-audit-log",
        &audit,
    ];
    let relay = RelayProc::spawn(&args, Some(TOKEN.to_string()));
    let f = |k: &str| relay.ready_line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap().to_string();
    let (sip, li) = (f("sip="), f("li="));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let xid = "bbbbbbbb-cccc-4ddd-8eee-ffffffffffff";
    let (s, v) = li_call(
        &relay,
        &li,
        "POST",
        "/v1/li/tasks",
        Some(&task(xid, r#"{"aor":"bob@hasp.test"}"#, mf)),
        Some(LI_TOKEN),
    );
    assert_eq!(s, 201, "{v}");
    add_sip_user(&relay, "bob", "hasp.test", "pw");
    let (alice, bob) = (udp(), udp());
    let mut uas = sipp(&dir, "uas_media.xml", 0, &[("media_b", bob.local_addr().unwrap().port().to_string())], &[]);
    let uas_port = sipp_port(&uas);
    assert_eq!(sip_register(&sip, "hasp.test", "bob", "pw", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);
    let mut uac = sipp(
        &dir,
        "uac_proxy.xml",
        0,
        &[("media_a", alice.local_addr().unwrap().port().to_string()), ("domain", "hasp.test".into())],
        &["-s", "bob", &sip],
    );
    let (alice_a, bob_a) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let session = relay.wait_media_session(&alice_a, &bob_a);
    let port = |leg: usize| session["legs"][leg]["rtp_port"].as_u64().unwrap() as u16;
    for seq in 0..5u16 {
        alice.send_to(&rtp(seq, 0xa, 1), ("127.0.0.1", port(0))).unwrap();
        assert_eq!(recv(&bob).0, rtp(seq, 0xa, 1));
        bob.send_to(&rtp(seq, 0xb, 2), ("127.0.0.1", port(1))).unwrap();
        assert_eq!(recv(&alice).0, rtp(seq, 0xb, 2));
    }
    assert!(wait_for("UAC", Duration::from_secs(30), || uac.try_wait().ok().flatten()).success());
    assert!(wait_for("UAS", Duration::from_secs(30), || uas.try_wait().ok().flatten()).success());
    // Collect what the mediation function got for this call.
    let mut got = Vec::new();
    while let Ok(p) = pdus.recv_timeout(Duration::from_secs(2)) {
        got.push(p);
    }
    let invite =
        got.iter().find(|p| p.pdu_type == 1 && p.payload.starts_with(b"INVITE sip:bob@hasp.test")).expect("X2 INVITE");
    assert_eq!(invite.direction, 2, "the INVITE goes to the target");
    assert!(
        got.iter().any(|p| p.pdu_type == 1 && p.payload.starts_with(b"SIP/2.0 200") && p.direction == 3),
        "X2 200 OK from the target"
    );
    assert!(got.iter().any(|p| p.pdu_type == 1 && p.payload.starts_with(b"BYE ")), "X2 BYE");
    let x3: Vec<&Pdu> = got.iter().filter(|p| p.pdu_type == 2).collect();
    assert_eq!(x3.len(), 10, "every RTP packet of the call, both ways");
    assert!(x3.iter().any(|p| p.direction == 3 && p.payload == rtp(0, 0xb, 2)), "bob's media is from the target");
    // The target's REGISTER is intercepted too, as its own "call"; everything of the
    // call itself shares the INVITE's correlation id.
    let is_register = |p: &&Pdu| p.pdu_type == 1 && String::from_utf8_lossy(&p.payload).contains(" REGISTER\r\n");
    assert!(got.iter().any(|p| is_register(&p)), "X2 REGISTER");
    let corr = invite.correlation;
    let call: Vec<&Pdu> = got.iter().filter(|p| p.pdu_type != 3 && !is_register(p)).collect();
    assert!(call.iter().all(|p| p.correlation == corr && p.xid == xid_bytes(xid)));
}

fn audit_records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn li_task_refused_when_audit_log_unwritable() {
    let (relay, li, audit) = li_relay("47500-47549", &[]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let (alice, bob) = (udp(), udp());
    let (id, _, rtp_p, _) = relay.create_between(&alice, &bob);
    let xid = "5c1d0e2f-1111-4222-8333-444455556666";
    let t = task(xid, &format!(r#"{{"session":"{id}"}}"#), mf);
    // The audit log becomes unwritable while hasp runs: its path is now a directory.
    let rotated = audit.with_extension("log.1");
    std::fs::rename(&audit, &rotated).unwrap();
    std::fs::create_dir(&audit).unwrap();
    let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&t), Some(LI_TOKEN));
    assert_eq!((s, v["code"].as_str()), (503, Some("audit_unavailable")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("nothing was changed"), "{v}");
    // Reads are refused too: what cannot be recorded is not answered.
    assert_eq!(li_call(&relay, &li, "GET", "/v1/li/tasks", None, Some(LI_TOKEN)).0, 503);
    // The target's media flows, untapped.
    for seq in 0..10u16 {
        alice.send_to(&rtp(seq, 0xa, 1), rtp_p[0]).unwrap();
        assert_eq!(recv(&bob).0, rtp(seq, 0xa, 1));
    }
    let state = std::fs::read_to_string(audit.with_file_name("audit.tasks.json")).unwrap_or_default();
    assert!(!state.contains(xid), "a refused task is not saved: {state}");
    // The log is writable again (the next record recreates it): nothing was copied, the
    // task does not exist.
    std::fs::remove_dir(&audit).unwrap();
    let (s, v) = li_call(&relay, &li, "GET", "/v1/li/stats", None, Some(LI_TOKEN));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["packets_copied"].as_u64(), v["tapped_sessions"].as_u64(), v["tasks"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
    assert!(pdus.try_recv().is_err(), "no X3 for a refused task");
    assert!(!std::fs::read_to_string(&rotated).unwrap().contains(xid));
    // The same request now succeeds and taps: the refusal above was the audit log's.
    let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&t), Some(LI_TOKEN));
    assert_eq!(s, 201, "{v}");
    alice.send_to(&rtp(100, 0xa, 1), rtp_p[0]).unwrap();
    assert_eq!(recv(&bob).0, rtp(100, 0xa, 1));
    let p = pdus.recv_timeout(Duration::from_secs(10)).expect("X3 once the task is active");
    assert_eq!((p.xid, &p.payload), (xid_bytes(xid), &rtp(100, 0xa, 1)));
    // Written ahead: the intent (pending) precedes the outcome, with one request id.
    let recs = audit_records(&audit);
    let mine: Vec<&Value> = recs.iter().filter(|r| r["action"] == "activate" && r["xid"] == xid).collect();
    assert_eq!(mine.len(), 2, "{recs:?}");
    assert_eq!((mine[0]["outcome"].as_str(), mine[1]["outcome"].as_str()), (Some("pending"), Some("ok")));
    assert_eq!(mine[0]["req"], mine[1]["req"]);
}

fn ng_req(
    ng: &str,
    cookie: &str,
    msg: controlplane::control::ng::bencode::Value,
) -> controlplane::control::ng::bencode::Value {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = format!("{cookie} ").into_bytes();
    out.extend(msg.encode());
    s.send_to(&out, ng).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf).expect("NG answer");
    let body = buf[..n].strip_prefix(format!("{cookie} ").as_bytes()).expect("cookie");
    controlplane::control::ng::bencode::decode(body).unwrap().0
}

/// Sets up a call's media over NG; returns the relay ports alice and bob send to.
fn ng_call(ng: &str, call_id: &str, alice: &UdpSocket, bob: &UdpSocket) -> (u16, u16) {
    use controlplane::control::ng::bencode::Value as B;
    let sdp = |s: &UdpSocket| {
        format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\n",
            s.local_addr().unwrap().port()
        )
    };
    let port = |v: &B| {
        let sdp = v.get("sdp").and_then(B::as_str).unwrap_or_else(|| panic!("{v:?}"));
        sdp.lines().find_map(|l| l.strip_prefix("m=audio ")).unwrap().split(' ').next().unwrap().parse::<u16>().unwrap()
    };
    let offer = ng_req(
        ng,
        "o1",
        B::dict([
            ("command", B::str("offer")),
            ("call-id", B::str(call_id)),
            ("from-tag", B::str("fa")),
            ("sdp", B::str(sdp(alice))),
        ]),
    );
    let answer = ng_req(
        ng,
        "a1",
        B::dict([
            ("command", B::str("answer")),
            ("call-id", B::str(call_id)),
            ("from-tag", B::str("fa")),
            ("to-tag", B::str("tb")),
            ("sdp", B::str(sdp(bob))),
        ]),
    );
    (port(&answer), port(&offer))
}

#[test]
fn li_tasks_survive_restart() {
    let dir = tmp("restart");
    let audit = dir.join("audit.log").display().to_string();
    let args = [
        "--rtp-ports",
        "47550-47599",
        "--listen-ng",
        "127.0.0.1:0",
        "--listen-li",
        "127.0.0.1:0",
        "--li-token",
        LI_TOKEN,
        "--li-audit-log",
        &audit,
    ];
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let xid = "7e57a11e-2222-4333-8444-555566667777";
    let call_id = "li-restart-call@hasp.test";
    let pcap = dir.join("task.pcap");
    // A call of the target through `relay`: its media is tapped (X3 and pcap).
    let tap_one = |relay: &RelayProc, li: &str, seq: u16| {
        let ng = field(&relay.ready_line, "ng=");
        let (alice, bob) = (udp(), udp());
        let (to_bob, _) = ng_call(&ng, call_id, &alice, &bob);
        wait_for("the target's call to be tapped", Duration::from_secs(10), || {
            let v = li_call(relay, li, "GET", "/v1/li/stats", None, Some(LI_TOKEN)).1;
            (v["tapped_sessions"] == 1).then_some(())
        });
        alice.send_to(&rtp(seq, 0xa, 1), ("127.0.0.1", to_bob)).unwrap();
        assert_eq!(recv(&bob).0, rtp(seq, 0xa, 1));
        let p = pdus.recv_timeout(Duration::from_secs(10)).expect("X3");
        assert_eq!((p.pdu_type, p.xid, &p.payload), (2, xid_bytes(xid), &rtp(seq, 0xa, 1)));
        assert_eq!(p.correlation, controlplane::li::correlation_of(call_id));
    };
    let mut relay = RelayProc::start(&args);
    let li = field(&relay.ready_line, "li=");
    let t = format!(
        r#"{{"xid":"{xid}","targets":[{{"call_id":"{call_id}"}}],"destinations":[{{"tcp":"{mf}"}}],"end":4102444800,"pcap":"{}"}}"#,
        pcap.display()
    );
    let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&t), Some(LI_TOKEN));
    assert_eq!(s, 201, "{v}");
    tap_one(&relay, &li, 1);
    // No goodbye: SIGKILL.
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    drop(relay);
    let relay = RelayProc::start(&args);
    let li = field(&relay.ready_line, "li=");
    let (s, v) = li_call(&relay, &li, "GET", "/v1/li/tasks", None, Some(LI_TOKEN));
    assert_eq!(s, 200);
    let listed = &v["tasks"][0];
    assert_eq!((listed["xid"].as_str(), listed["active"].as_bool()), (Some(xid), Some(true)), "{v}");
    assert_eq!(listed["end"], 4102444800u64, "end time kept");
    // A new call of the target, after the restart, is tapped.
    tap_one(&relay, &li, 2);
    // The pcap file was appended to, not started again: one header, both packets.
    let cap = std::fs::read(&pcap).unwrap();
    let rec = 16 + 28 + rtp(1, 0xa, 1).len();
    assert_eq!(cap.len(), 24 + 2 * rec);
    assert_eq!((&cap[24 + 16 + 28..24 + rec], &cap[24 + rec + 16 + 28..]), (&rtp(1, 0xa, 1)[..], &rtp(2, 0xa, 1)[..]));
    // The log says the task was put back in force, by hasp itself.
    let recs = audit_records(std::path::Path::new(&audit));
    let r = recs.iter().find(|r| r["action"] == "reinstate").expect("a reinstate record");
    assert_eq!((r["who"].as_str(), r["detail"]["tasks"][0].as_str()), (Some("hasp"), Some(xid)));
}

#[test]
fn li_bad_token_flood_does_not_grow_the_audit_log_unbounded() {
    use controlplane::li::audit::{DENIED_BURST, DENIED_PER_SEC};
    let (relay, li, audit) = li_relay("47600-47619", &[]);
    let n = 600;
    let start = Instant::now();
    let (mut unauthorized, mut limited) = (0, 0);
    for i in 0..n {
        let tok = format!("wrong-{i}");
        match li_call(&relay, &li, "GET", "/v1/li/tasks", None, Some(&tok)) {
            (401, v) => {
                assert_eq!(v["code"], "unauthorized");
                unauthorized += 1;
            }
            (429, v) => {
                assert_eq!(v["code"], "rate_limited");
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let secs = start.elapsed().as_secs() + 1;
    assert!(limited > 0, "the flood was limited");
    // One record per admitted request: the burst, then the refill rate.
    let denied = |recs: &[Value]| recs.iter().filter(|r| r["action"] == "denied").count();
    let recs = audit_records(&audit);
    assert_eq!(denied(&recs), unauthorized);
    assert!(unauthorized as u64 <= DENIED_BURST as u64 + secs * DENIED_PER_SEC as u64, "{unauthorized} in {secs} s");
    // The rest is accounted for by summary lines, one per interval, that name the source.
    let recs = wait_for("the summary of suppressed requests", Duration::from_secs(30), || {
        let recs = audit_records(&audit);
        let summarised: u64 = recs
            .iter()
            .filter(|r| r["action"] == "denied_suppressed")
            .map(|r| r["detail"]["count"].as_u64().unwrap())
            .sum();
        (summarised == limited).then_some(recs)
    });
    let summaries: Vec<&Value> = recs.iter().filter(|r| r["action"] == "denied_suppressed").collect();
    assert!(summaries.len() <= 2 + secs as usize / 5, "{} summaries", summaries.len());
    assert!(summaries.iter().all(|s| s["detail"]["sources"]["127.0.0.1"].as_u64().is_some()));
    assert!(recs.len() < n / 4, "{} audit lines for {n} bad requests", recs.len());
    // The LI administrators are not locked out by the flood.
    assert_eq!(li_call(&relay, &li, "GET", "/v1/li/tasks", None, Some(LI_TOKEN)).0, 200);
}

#[test]
fn li_pcap_files_are_private() {
    let dir = tmp("pcap-private");
    // LI creates the audit log's directory itself.
    let audit = dir.join("li").join("audit.log").display().to_string();
    let relay = RelayProc::start(&[
        "--rtp-ports",
        "47620-47649",
        "--listen-li",
        "127.0.0.1:0",
        "--li-token",
        LI_TOKEN,
        "--li-audit-log",
        &audit,
    ]);
    let li = field(&relay.ready_line, "li=");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let (alice, bob) = (udp(), udp());
    let (id, _, rtp_p, _) = relay.create_between(&alice, &bob);
    // One pcap file LI creates, one that exists already and is world-readable.
    let new_pcap = dir.join("new.pcap");
    let old_pcap = dir.join("old.pcap");
    std::fs::write(&old_pcap, b"old").unwrap();
    std::fs::set_permissions(&old_pcap, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (xid, pcap) in
        [("0a0a0a0a-1111-4222-8333-000000000001", &new_pcap), ("0a0a0a0a-1111-4222-8333-000000000002", &old_pcap)]
    {
        let t = format!(
            r#"{{"xid":"{xid}","targets":[{{"session":"{id}"}}],"destinations":[{{"tcp":"{mf}"}}],"pcap":"{}"}}"#,
            pcap.display()
        );
        let (s, v) = li_call(&relay, &li, "POST", "/v1/li/tasks", Some(&t), Some(LI_TOKEN));
        assert_eq!(s, 201, "{v}");
        if pcap == &new_pcap {
            // Tapped (one task taps a session at a time): the pcap gets a packet.
            alice.send_to(&rtp(1, 0xa, 1), rtp_p[0]).unwrap();
            assert_eq!(recv(&bob).0, rtp(1, 0xa, 1));
            pdus.recv_timeout(Duration::from_secs(10)).expect("X3");
        }
    }
    assert!(std::fs::metadata(&new_pcap).unwrap().len() > 24, "the pcap holds the packet");
    // Every file LI made is its owner's alone; so is the directory it made.
    let mut seen = Vec::new();
    for f in [&new_pcap, &old_pcap, &dir.join("li").join("audit.log"), &dir.join("li").join("audit.tasks.json")] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
        seen.push(f.file_name().unwrap().to_owned());
    }
    for e in std::fs::read_dir(dir.join("li")).unwrap() {
        let e = e.unwrap();
        assert!(seen.contains(&e.file_name()), "unexpected file {:?}", e.file_name());
    }
    assert_eq!(std::fs::metadata(dir.join("li")).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn li_tables_grown_by_input_are_bounded_and_expire() {
    use controlplane::li::{correlation_of, Li, LiConfig, SipEvent, MAX_AOR_CALLS, MAX_DESTINATIONS_PER_TASK};
    use controlplane::relay::calls::{AnchorOptions, Calls};
    use std::sync::Arc;
    let dir = tmp("bounds");
    let cfg =
        controlplane::RelayConfig { rtp_ports: "47650-47679".parse().unwrap(), no_auth: true, ..Default::default() };
    let relay = controlplane::Relay::start(cfg).unwrap();
    let calls = Arc::new(Calls::new(relay.clone()));
    let li_cfg = LiConfig { buffer_bytes: 1 << 16, ..LiConfig::new(dir.join("audit.log")) };
    let li = Li::start(relay.clone(), calls.clone(), &li_cfg).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let xid = "b0b0b0b0-1111-4222-8333-000000000001";
    let t: controlplane::li::tasks::Task =
        serde_json::from_str(&task(xid, r#"{"aor":"carol@example.com"}"#, mf)).unwrap();
    li.create("test", t, None).unwrap();
    let ev = |call_id: &str| {
        li.sip_event(&SipEvent {
            call_id,
            from_aor: "carol@example.com",
            to_aor: "dave@example.com",
            from_caller: true,
            src: "127.0.0.1:5061".parse().unwrap(),
            dst: "127.0.0.1:5062".parse().unwrap(),
            message: b"INVITE sip:dave@example.com SIP/2.0\r\n\r\n",
        })
    };
    // The target's real call, with media.
    ev("real-call");
    let (alice, bob) = (udp(), udp());
    let sdp = |a: &UdpSocket| {
        format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\n",
            a.local_addr().unwrap().port()
        )
    };
    calls.offer("real-call", "f", None, &sdp(&alice), &AnchorOptions::default()).unwrap();
    let answer = calls.answer("real-call", "f", "t", &sdp(&bob), &AnchorOptions::default()).unwrap();
    let stat = |k: &str| li.stats()[k].as_u64().unwrap();
    wait_for("the real call to be tapped", Duration::from_secs(5), || (stat("tapped_sessions") == 1).then_some(()));
    // Forged messages naming the target, each with a new Call-ID, twice the bound.
    for i in 0..2 * MAX_AOR_CALLS {
        ev(&format!("forged-{i}"));
    }
    assert_eq!(stat("aor_calls") as usize, MAX_AOR_CALLS, "bounded");
    assert!(stat("aor_calls_forgotten") as usize >= MAX_AOR_CALLS, "the oldest media-less calls were forgotten");
    // The real call was not pushed out: its media is still tapped.
    li.reconcile();
    assert_eq!(stat("tapped_sessions"), 1);
    // The forged messages' X2 (what the bounded delivery buffer kept) reach the
    // mediation function first; take them off.
    let delivered = wait_for("the X2 backlog delivered", Duration::from_secs(30), || {
        let d = &li.stats()["destinations"][0]["stats"];
        (d["queued_bytes"] == 0).then(|| d["delivered"].as_u64().unwrap())
    });
    let mut x2 = 0;
    while x2 < delivered {
        match pdus.recv_timeout(Duration::from_secs(10)).unwrap().pdu_type {
            1 => x2 += 1,
            t => assert_eq!(t, 3, "only X2 and keep-alives so far"),
        }
    }
    let port = answer.lines().find_map(|l| l.strip_prefix("m=audio ")).unwrap().split(' ').next().unwrap();
    alice.send_to(&rtp(7, 0xa, 1), ("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    assert_eq!(recv(&bob).0, rtp(7, 0xa, 1));
    let x3 = std::iter::from_fn(|| pdus.recv_timeout(Duration::from_secs(10)).ok())
        .find(|p| p.pdu_type != 3)
        .expect("the real call's X3 (keep-alives aside)");
    assert_eq!(x3.pdu_type, 2);
    assert_eq!((x3.correlation, &x3.payload), (correlation_of("real-call"), &rtp(7, 0xa, 1)));
    // Too many destinations for one task: refused with a stable code, nothing saved.
    let dests: Vec<String> =
        (0..=MAX_DESTINATIONS_PER_TASK).map(|i| format!(r#"{{"tcp":"127.0.0.1:{}"}}"#, 9000 + i)).collect();
    let big: controlplane::li::tasks::Task = serde_json::from_str(&format!(
        r#"{{"xid":"b0b0b0b0-1111-4222-8333-000000000002","targets":[{{"call_id":"x"}}],"destinations":[{}]}}"#,
        dests.join(",")
    ))
    .unwrap();
    assert_eq!(li.create("test", big, None).unwrap_err().code(), "limit_exceeded");
    // A task that ended long ago is removed, audited and saved first.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let old = "b0b0b0b0-1111-4222-8333-000000000003";
    let ended: controlplane::li::tasks::Task = serde_json::from_str(&format!(
        r#"{{"xid":"{old}","targets":[{{"call_id":"y"}}],"destinations":[{{"tcp":"{mf}"}}],"start":{},"end":{}}}"#,
        now - 3 * 3600,
        now - 2 * 3600
    ))
    .unwrap();
    li.create("test", ended, None).unwrap();
    assert_eq!(li.list().len(), 2);
    li.expire(now);
    assert_eq!(li.list().len(), 1);
    assert!(li.get(old).is_none() && li.get(xid).is_some(), "only the ended task went");
    let recs = audit_records(&dir.join("audit.log"));
    let exp: Vec<&Value> = recs.iter().filter(|r| r["action"] == "expire").collect();
    assert_eq!(exp.len(), 2, "intent and outcome: {recs:?}");
    assert_eq!((exp[0]["who"].as_str(), exp[1]["outcome"].as_str()), (Some("hasp"), Some("ok")));
    let state = std::fs::read_to_string(dir.join("audit.tasks.json")).unwrap();
    assert!(state.contains(xid) && !state.contains(old));
    relay.shutdown();
}

#[test]
fn li_task_refused_when_its_state_cannot_be_saved() {
    let dir = tmp("state-unsaveable");
    // The state file's directory does not exist: every save fails.
    let state = dir.join("missing").join("tasks.json").display().to_string();
    let (relay, li, audit) = li_relay("47680-47699", &["--li-state", &state]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mf = l.local_addr().unwrap();
    let pdus = mediation_function(l);
    let (alice, bob) = (udp(), udp());
    let (id, _, rtp_p, _) = relay.create_between(&alice, &bob);
    let xid = "5ca1ab1e-1111-4222-8333-444455556666";
    let (s, v) = li_call(
        &relay,
        &li,
        "POST",
        "/v1/li/tasks",
        Some(&task(xid, &format!(r#"{{"session":"{id}"}}"#), mf)),
        Some(LI_TOKEN),
    );
    assert_eq!((s, v["code"].as_str()), (503, Some("state_unavailable")), "{v}");
    for seq in 0..5u16 {
        alice.send_to(&rtp(seq, 0xa, 1), rtp_p[0]).unwrap();
        assert_eq!(recv(&bob).0, rtp(seq, 0xa, 1));
    }
    let v = li_call(&relay, &li, "GET", "/v1/li/stats", None, Some(LI_TOKEN)).1;
    assert_eq!((v["packets_copied"].as_u64(), v["tasks"].as_u64()), (Some(0), Some(0)), "{v}");
    assert!(pdus.try_recv().is_err());
    // The log has the intent and, with the same request id, why it did not happen.
    let recs = audit_records(&audit);
    let mine: Vec<&Value> = recs.iter().filter(|r| r["xid"] == xid).collect();
    assert_eq!(mine.len(), 2, "{recs:?}");
    assert_eq!(
        (mine[0]["outcome"].as_str(), mine[1]["outcome"].as_str()),
        (Some("pending"), Some("state_unavailable"))
    );
    assert_eq!(mine[0]["req"], mine[1]["req"]);
}
