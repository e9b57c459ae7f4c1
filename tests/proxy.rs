//! The SIP proxy and registrar of `hasp up`: digest-authenticated REGISTER, and a sipp
//! call to a registered user with its media anchored in the relay, RTP checked both ways.

mod common;

use common::*;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const DOMAIN: &str = "hasp.test";

fn up(ports: &str, name: &str) -> (RelayProc, String, PathBuf) {
    up_with_sip(DOMAIN, ports, &format!("proxy-{name}"))
}

fn add_user(relay: &RelayProc, user: &str, password: &str) {
    add_sip_user(relay, user, DOMAIN, password);
}

fn register(proxy: &str, user: &str, password: &str, contact: &str, expires: u32) -> u16 {
    sip_register(proxy, DOMAIN, user, password, contact, expires)
}

#[test]
fn register_with_digest_auth_and_wrong_password() {
    let (relay, sip, _) = up("44600-44699", "reg");
    add_user(&relay, "alice", "wonderland");
    assert_eq!(register(&sip, "alice", "wrong", "sip:alice@127.0.0.1:7000", 600), 403);
    assert_eq!(register(&sip, "alice", "wonderland", "sip:alice@127.0.0.1:7000", 600), 200);
    assert_eq!(register(&sip, "mallory", "x", "sip:m@127.0.0.1:7001", 600), 403, "unknown user");
    // Garbage gets a 400 or nothing, and the registrar keeps working.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for junk in [
        &b"\x00\x01\x02garbage"[..],
        b"INVITE sip:x SIP/2.0\r\nContent-Length: 99999\r\n\r\n",
        b"SIP/2.0 200 OK\r\n\r\n",
    ] {
        s.send_to(junk, &sip).unwrap();
    }
    assert_eq!(register(&sip, "alice", "wonderland", "sip:alice@127.0.0.1:7000", 0), 200, "unregister");
    let (s, v) = relay.call("POST", "/v1/users", Some(r#"{"user":"a@b","domain":"x","password":"p"}"#));
    assert_eq!((s, v["code"].as_str()), (422, Some("invalid_request")));
}

#[test]
fn sipp_call_to_a_registered_user_with_rtp_through_the_relay() {
    let (relay, sip, dir) = up("44700-44799", "call");
    add_user(&relay, "bob", "builder");
    let (alice, bob) = (udp(), udp());
    let mut uas = sipp(
        &dir,
        "uas_media.xml",
        0,
        &[("media_b", bob.local_addr().unwrap().port().to_string())],
        &["-trace_msg", "-message_file", "uas.log"],
    );
    let uas_port = sipp_port(&uas);
    assert_eq!(register(&sip, "bob", "builder", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);
    let mut uac = sipp(
        &dir,
        "uac_proxy.xml",
        0,
        &[("media_a", alice.local_addr().unwrap().port().to_string()), ("domain", DOMAIN.to_string())],
        &["-s", "bob", &sip],
    );
    let (alice_a, bob_a) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let session = relay.wait_media_session(&alice_a, &bob_a);
    let port = |leg: usize| session["legs"][leg]["rtp_port"].as_u64().unwrap() as u16;
    for seq in 0..20u16 {
        alice.send_to(&rtp(seq, 0xa11ce, 1), ("127.0.0.1", port(0))).unwrap();
        bob.send_to(&rtp(seq, 0xb0b, 2), ("127.0.0.1", port(1))).unwrap();
    }
    for seq in 0..20u16 {
        assert_eq!(recv(&bob).0, rtp(seq, 0xa11ce, 1));
        assert_eq!(recv(&alice).0, rtp(seq, 0xb0b, 2));
    }
    let st = wait_for("sipp UAC", Duration::from_secs(30), || uac.try_wait().ok().flatten());
    assert!(
        st.success(),
        "UAC failed: {}",
        std::fs::read_to_string(dir.join("uac_proxy.xml.stderr")).unwrap_or_default()
    );
    let st = wait_for("sipp UAS", Duration::from_secs(30), || uas.try_wait().ok().flatten());
    assert!(st.success(), "UAS failed");
    let log = std::fs::read_to_string(dir.join("uas.log")).unwrap();
    let invite = &log[log.find("INVITE sip:").unwrap()..];
    assert!(invite.contains(&format!("m=audio {} RTP/AVP", port(1))), "the UAS is offered the relay's port: {invite}");
    assert!(invite.contains("Record-Route: <sip:127.0.0.1:"), "{invite}");
    let id = session["id"].as_str().unwrap().to_string();
    wait_for("the session to be deleted after BYE", Duration::from_secs(10), || {
        (relay.call("GET", &format!("/v1/sessions/{id}"), None).0 == 404).then_some(())
    });
    // The SIP counters are in /metrics: the INVITE, ACK and BYE were forwarded, the
    // REGISTERs counted, nothing is pending once the transactions ended.
    assert!(relay.metric("hasp_sip_forwarded_total") >= 2);
    assert!(relay.metric("hasp_sip_registers_total") >= 2);
    assert_eq!(relay.metric("hasp_sip_rate_limited_total"), 0);
}

#[test]
fn hasp_user_add_provisions_the_embedded_store() {
    let dir = scratch_dir("useradd");
    let store = format!("embedded:{}", dir.join("hasp.redb").display());
    let st =
        Command::new(hasp_bin()).args(["user", "add", "carol", DOMAIN, "s3cret", "--store", &store]).status().unwrap();
    assert!(st.success());
    let args = [
        "up",
        "--listen-api",
        "127.0.0.1:0",
        "--api-token",
        TOKEN,
        "--listen-sip",
        "127.0.0.1:0",
        "--domain",
        DOMAIN,
        "--store",
        &store,
        "--rtp-ports",
        "44800-44899",
    ];
    let relay = RelayProc::spawn(&args, Some(TOKEN.to_string()));
    let sip = field(&relay.ready_line, "sip=");
    assert_eq!(register(&sip, "carol", "s3cret", "sip:carol@127.0.0.1:7002", 600), 200);
}

/// `hasp proxy` with a dead relay first and a live `hasp relay` second, reached over NG
/// (`ng://`) or its REST API (`http://`): a sipp call gets its media anchored in the live
/// one. Over `http://` the proxy is also a conference focus on that relay's mixer.
fn hasp_proxy_with_remote_relays(http: bool, ports: &str, name: &str) {
    let relay = RelayProc::spawn(
        &[
            "relay",
            "--api-token",
            TOKEN,
            "--listen-api",
            "127.0.0.1:0",
            "--listen-ng",
            "127.0.0.1:0",
            "--rtp-ports",
            ports,
        ],
        Some(TOKEN.to_string()),
    );
    let ng = field(&relay.ready_line, "ng=");
    let api = field(&relay.ready_line, "api=");
    // Nothing listens on the discard port (the suite binds nothing below 1024): a dead relay.
    let dead = 9;
    let dir = scratch_dir(&format!("proxy-role-{name}"));
    let store = format!("embedded:{}", dir.join("hasp.redb").display());
    let (r1, r2) = if http {
        (format!("http://127.0.0.1:{dead}"), api.clone())
    } else {
        (format!("ng://127.0.0.1:{dead}"), format!("ng://{ng}"))
    };
    let proxy = RelayProc::spawn(
        &[
            "proxy",
            "--listen-api",
            "127.0.0.1:0",
            "--api-token",
            TOKEN,
            "--listen-sip",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
            "--store",
            &store,
            "--relay",
            &r1,
            "--relay",
            &r2,
            "--relay-token",
            TOKEN,
        ],
        Some(TOKEN.to_string()),
    );
    let sip = field(&proxy.ready_line, "sip=");
    add_user(&proxy, "bob", "builder");
    let (alice, bob) = (udp(), udp());
    let mut uas = sipp(&dir, "uas_media.xml", 0, &[("media_b", bob.local_addr().unwrap().port().to_string())], &[]);
    let uas_port = sipp_port(&uas);
    assert_eq!(register(&sip, "bob", "builder", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);
    let mut uac = sipp(
        &dir,
        "uac_proxy.xml",
        0,
        &[("media_a", alice.local_addr().unwrap().port().to_string()), ("domain", DOMAIN.to_string())],
        &["-s", "bob", &sip],
    );
    let (alice_a, bob_a) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let session = relay.wait_media_session(&alice_a, &bob_a);
    let port = |leg: usize| session["legs"][leg]["rtp_port"].as_u64().unwrap() as u16;
    alice.send_to(&rtp(1, 1, 1), ("127.0.0.1", port(0))).unwrap();
    assert_eq!(recv(&bob).0, rtp(1, 1, 1));
    bob.send_to(&rtp(1, 2, 2), ("127.0.0.1", port(1))).unwrap();
    assert_eq!(recv(&alice).0, rtp(1, 2, 2));
    assert!(wait_for("UAC", Duration::from_secs(30), || uac.try_wait().ok().flatten()).success());
    assert!(wait_for("UAS", Duration::from_secs(30), || uas.try_wait().ok().flatten()).success());
    let id = session["id"].as_str().unwrap().to_string();
    wait_for("the relay session to be deleted after BYE", Duration::from_secs(10), || {
        (relay.call("GET", &format!("/v1/sessions/{id}"), None).0 == 404).then_some(())
    });
    assert!(proxy.metric("hasp_sip_forwarded_total") >= 2, "hasp proxy serves /metrics");
    if !http {
        return;
    }
    // The focus: a participant of conf-standup lands in a room of the relay's mixer.
    let carol = udp();
    let mut part = sipp(
        &dir,
        "uac_conf.xml",
        0,
        &[("media_a", carol.local_addr().unwrap().port().to_string()), ("domain", DOMAIN.to_string())],
        &["-s", "conf-standup", "-d", "1000", "-au", "bob", "-ap", "builder", &sip],
    );
    let conf = wait_for("a room with one participant on the relay", Duration::from_secs(15), || {
        let (_, v) = relay.call("GET", "/v1/conferences", None);
        let id = v["conferences"].as_array()?.first()?.as_str()?.to_string();
        let (_, c) = relay.call("GET", &format!("/v1/conferences/{id}"), None);
        (c["participants"][0]["remote"] == carol.local_addr().unwrap().to_string().as_str()).then_some(id)
    });
    assert!(wait_for("participant", Duration::from_secs(30), || part.try_wait().ok().flatten()).success());
    wait_for("the room to be deleted after the BYE", Duration::from_secs(10), || {
        (relay.call("GET", &format!("/v1/conferences/{conf}"), None).0 == 404).then_some(())
    });
    assert_eq!((proxy.metric("hasp_focus_rooms"), proxy.metric("hasp_focus_participants")), (0, 0));
}

#[test]
fn hasp_proxy_anchors_media_in_a_remote_relay_skipping_a_dead_one() {
    hasp_proxy_with_remote_relays(false, "45400-45449", "ng");
}

#[test]
fn hasp_proxy_over_relays_rest_api_anchors_media_and_hosts_conferences() {
    hasp_proxy_with_remote_relays(true, "45450-45499", "http");
}

/// A call to a callee registered with a `;transport=tcp` contact: the proxy opens a TCP
/// connection to it. The caller uses `caller_transport` ("t1" TCP, "u1" UDP); when it
/// differs from the callee's the proxy record-routes twice (RFC 5658).
fn call_to_tcp_callee(caller_transport: &str, ports: &str, name: &str) {
    let (relay, sip, dir) = up(ports, name);
    add_user(&relay, "tina", "tcp-pass");
    let (alice, bob) = (udp(), udp());
    let mut uas = sipp(
        &dir,
        "uas_media.xml",
        0,
        &[("media_b", bob.local_addr().unwrap().port().to_string())],
        &["-t", "t1", "-trace_msg", "-message_file", "uas.log"],
    );
    let uas_port = sipp_port(&uas);
    let contact = format!("sip:tina@127.0.0.1:{uas_port};transport=tcp");
    assert_eq!(register(&sip, "tina", "tcp-pass", &contact, 600), 200);
    let mut uac = sipp(
        &dir,
        "uac_proxy.xml",
        0,
        &[("media_a", alice.local_addr().unwrap().port().to_string()), ("domain", DOMAIN.to_string())],
        &["-t", caller_transport, "-s", "tina", &sip],
    );
    let (alice_a, bob_a) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let session = relay.wait_media_session(&alice_a, &bob_a);
    let port = |leg: usize| session["legs"][leg]["rtp_port"].as_u64().unwrap() as u16;
    alice.send_to(&rtp(1, 1, 1), ("127.0.0.1", port(0))).unwrap();
    assert_eq!(recv(&bob).0, rtp(1, 1, 1));
    bob.send_to(&rtp(1, 2, 2), ("127.0.0.1", port(1))).unwrap();
    assert_eq!(recv(&alice).0, rtp(1, 2, 2));
    let st = wait_for("UAC", Duration::from_secs(30), || uac.try_wait().ok().flatten());
    assert!(st.success(), "UAC: {}", std::fs::read_to_string(dir.join("uac_proxy.xml.stderr")).unwrap_or_default());
    let st = wait_for("UAS", Duration::from_secs(30), || uas.try_wait().ok().flatten());
    assert!(st.success(), "UAS: {}", std::fs::read_to_string(dir.join("uas_media.xml.stderr")).unwrap_or_default());
    let log = std::fs::read_to_string(dir.join("uas.log")).unwrap();
    let invite = &log[log.find("INVITE sip:").unwrap()..];
    let invite = &invite[..invite.find("\n\n").unwrap_or(invite.len())];
    assert!(invite.contains("Via: SIP/2.0/TCP 127.0.0.1:"), "{invite}");
    let rr: Vec<&str> = invite.lines().filter(|l| l.starts_with("Record-Route:")).collect();
    if caller_transport == "t1" {
        assert_eq!(rr.len(), 1, "{invite}");
        assert!(rr[0].contains(";transport=tcp;lr"), "{invite}");
    } else {
        assert_eq!(rr.len(), 2, "double Record-Route when the transport changes: {invite}");
        assert!(rr[0].contains(";transport=tcp;lr") && !rr[1].contains("transport"), "{invite}");
    }
    let id = session["id"].as_str().unwrap().to_string();
    wait_for("the relay session to be deleted after BYE", Duration::from_secs(10), || {
        (relay.call("GET", &format!("/v1/sessions/{id}"), None).0 == 404).then_some(())
    });
}

#[test]
fn sip_over_tcp_both_legs() {
    call_to_tcp_callee("t1", "45500-45549", "tcp");
}

#[test]
fn udp_caller_to_tcp_callee_is_record_routed_twice() {
    call_to_tcp_callee("u1", "45550-45599", "udp-tcp");
}

/// One configuration file for every role: `hasp proxy --config FILE` reads its
/// `[proxy]` table (the `[relay]` table is another role's and is ignored here), flags
/// override it, and the proxy serves SIP as configured.
#[test]
fn hasp_proxy_reads_its_table_of_the_config_file_and_flags_override_it() {
    let dir = scratch_dir("proxy-config");
    let relay = RelayProc::start(&["--listen-ng", "127.0.0.1:0", "--rtp-ports", "45850-45899"]);
    let file = dir.join("hasp.toml");
    std::fs::write(
        &file,
        format!(
            "[relay]\nrtp_ports = \"46000-46099\"\n\n[proxy]\nlisten_sip = \"127.0.0.1:0\"\nlisten_api = \"127.0.0.1:0\"\n\
             domain = \"from-file.test\"\nstore = \"memory:\"\nno_auth = true\nsip_threads = 2\n\
             relays = [\"ng://{}\"]\n",
            field(&relay.ready_line, "ng=")
        ),
    )
    .unwrap();
    let path = file.display().to_string();
    let p = RelayProc::spawn(&["proxy", "--config", &path], None);
    assert_eq!(field(&p.ready_line, "domain="), "from-file.test");
    assert_eq!(field(&p.ready_line, "sip_threads="), "2");
    let sip = field(&p.ready_line, "sip=");
    let ua = common::ua::Ua::new();
    ua.send(&sip, &common::ua::options_to(&ua, 1, &sip));
    assert_eq!(ua.recv_within(Duration::from_secs(5)).and_then(|m| m.code()), Some(200));
    drop(p);
    let p = RelayProc::spawn(&["proxy", "--config", &path, "--domain", "from-flag.test", "--sip-threads", "1"], None);
    assert_eq!(field(&p.ready_line, "domain="), "from-flag.test", "a flag overrides the file");
    assert_eq!(field(&p.ready_line, "sip_threads="), "1");
    // A key the [proxy] table does not know is refused, with the file named.
    std::fs::write(&file, "[proxy]\nrelay = \"ng://192.0.2.1:2223\"\n").unwrap();
    let out = Command::new(hasp_bin()).args(["proxy", "--config", &path]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hasp.toml") && err.contains("relay"), "{err}");
}
