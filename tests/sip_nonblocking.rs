//! The SIP core never waits: a relay that never answers, a store whose leader hangs, a
//! DNS server that never answers delay only the requests that need them. Every other
//! call, REGISTER and OPTIONS is served meanwhile — through the real `hasp` binary,
//! with SIP user agents on real sockets.

mod common;

use common::ua::*;
use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// The bar of the redesign: `--relay` lists a black-holed NG relay first and a live one
/// second. While an INVITE waits on the black hole, OPTIONS and REGISTER are answered
/// (before the relay timeout lets the INVITE move on: nothing waited for it), and the
/// call then completes through the second relay with media both ways and a BYE that
/// frees it.
#[test]
fn an_invite_waiting_on_a_black_holed_relay_holds_up_nothing_else() {
    let relay = RelayProc::start(&["--listen-ng", "127.0.0.1:0", "--rtp-ports", "47000-47049"]);
    let ng = field(&relay.ready_line, "ng=");
    // The black hole: a socket that takes NG requests and never answers.
    let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    hole.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let dir = scratch_dir("nonblocking-relay");
    let store = format!("embedded:{}", dir.join("hasp.redb").display());
    // A long relay timeout, so "answered before the INVITE moved on" is a wide window.
    let timeout_ms = 3000;
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
            &format!("ng://{}", hole.local_addr().unwrap()),
            "--relay",
            &format!("ng://{ng}"),
            "--relay-timeout-ms",
            &timeout_ms.to_string(),
            "--sip-threads",
            "2",
        ],
        Some(TOKEN.to_string()),
    );
    let sip = field(&proxy.ready_line, "sip=");
    add_sip_user(&proxy, "bob", DOMAIN, "builder");
    add_sip_user(&proxy, "carol", DOMAIN, "singer");
    let (alice, bob, pinger) = (Ua::new(), Ua::new(), Ua::new());
    let (alice_rtp, bob_rtp) = (udp(), udp());
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &format!("sip:bob@{}", bob.addr()), 600), 200);

    alice.send(&sip, &invite(&alice, "bob", "call-hole-1", alice_rtp.local_addr().unwrap().port()));
    let trying = alice.recv_within(Duration::from_secs(5)).expect("100 Trying");
    assert_eq!(trying.code(), Some(100));
    // The offer reaches the black hole: from now on the INVITE waits on it.
    let mut buf = [0u8; 8192];
    let (n, _) = hole.recv_from(&mut buf).expect("the offer reaches the first relay");
    let offer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(offer.contains("5:offer") && offer.contains("call-hole-1"), "{offer}");
    let waiting_since = Instant::now();

    // Meanwhile: OPTIONS and a digest REGISTER are answered.
    let mut latencies = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        pinger.send(&sip, &options(&pinger, i));
        let r = pinger.recv_within(Duration::from_secs(2)).expect("OPTIONS answered");
        latencies.push(t.elapsed());
        assert_eq!(r.code(), Some(200));
    }
    let t = Instant::now();
    assert_eq!(sip_register(&sip, DOMAIN, "carol", "singer", "sip:carol@127.0.0.1:7000", 600), 200);
    let register_took = t.elapsed();
    let answered_within = waiting_since.elapsed();
    eprintln!(
        "while the INVITE waited: OPTIONS answered in {latencies:?}, REGISTER (challenge + 200) in {register_took:?}"
    );
    // The INVITE is still held by the black hole: everything above was served while it
    // waited (a core that waited would answer only after the relay timeout).
    assert!(bob.nothing_yet(), "the callee got nothing yet: the INVITE still waits on the first relay");
    assert!(answered_within < Duration::from_millis(timeout_ms), "answered while the INVITE waited");

    // The relay timeout passes: the second relay anchors the call.
    let inv = bob.recv_final(Duration::from_secs(10));
    assert_eq!(inv.method(), "INVITE");
    let relay_port_to_bob = sdp_port(&inv);
    assert!((47000..47050).contains(&relay_port_to_bob), "media anchored on the live relay: {relay_port_to_bob}");
    let proxy_addr: SocketAddr = sip.parse().unwrap();
    answer_200(&bob, &inv, bob_rtp.local_addr().unwrap().port(), proxy_addr);
    let ok = alice.recv_final(Duration::from_secs(5));
    assert_eq!(ok.code(), Some(200), "{ok:?}");
    let relay_port_to_alice = sdp_port(&ok);
    assert!((47000..47050).contains(&relay_port_to_alice), "{ok:?}");
    alice.send(&sip, &in_dialog(&alice, &ok, "ACK", 1));
    assert_eq!(bob.recv_final(Duration::from_secs(5)).method(), "ACK");
    // Media both ways through the live relay.
    alice_rtp.send_to(&rtp(1, 1, 1), ("127.0.0.1", relay_port_to_alice)).unwrap();
    assert_eq!(recv(&bob_rtp).0, rtp(1, 1, 1));
    bob_rtp.send_to(&rtp(1, 2, 2), ("127.0.0.1", relay_port_to_bob)).unwrap();
    assert_eq!(recv(&alice_rtp).0, rtp(1, 2, 2));
    // BYE through the proxy frees the media.
    alice.send(&sip, &in_dialog(&alice, &ok, "BYE", 2));
    let bye = bob.recv_final(Duration::from_secs(5));
    assert_eq!(bye.method(), "BYE");
    bob.sock.send_to(&bye.response(200, "OK", None).to_bytes(), proxy_addr).unwrap();
    assert_eq!(alice.recv_final(Duration::from_secs(5)).code(), Some(200));
    wait_for("the live relay to free the call's media", Duration::from_secs(10), || {
        let (_, v) = relay.call("GET", "/v1/sessions", None);
        v["sessions"].as_array().is_some_and(|s| s.is_empty()).then_some(())
    });
}

/// A Request-URI whose DNS server never answers: that INVITE waits for name
/// resolution (and then gets 503), while calls to a registered user complete.
#[test]
fn a_request_uri_whose_dns_never_answers_does_not_hold_up_other_calls() {
    // The DNS server: a socket that takes queries and never answers.
    let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
    dns.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let dns_addr = dns.local_addr().unwrap().to_string();
    let (up, _, _) = up_with_sip_args(
        DOMAIN,
        "47050-47099",
        "nonblocking-dns",
        &["--dns-server", &dns_addr, "--dns-timeout-ms", "4000"],
    );
    let sip = field(&up.ready_line, "sip=");
    add_sip_user(&up, "bob", DOMAIN, "builder");
    let bob = Ua::new();
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &format!("sip:bob@{}", bob.addr()), 600), 200);

    // A call to a name nobody answers for.
    let lost = Ua::new();
    let body = sdp(9);
    let inv = format!(
        "INVITE sip:someone@voip.unanswered.example SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-dns1\r\nFrom: <sip:alice@{DOMAIN}>;tag=d1\r\nTo: <sip:someone@voip.unanswered.example>\r\nCall-ID: dns-1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        me = lost.addr()
    );
    // alice is one of ours: she authenticates (407) before her call leaves the domain.
    add_sip_user(&up, "alice", DOMAIN, "wonderland");
    lost.send(&sip, &inv);
    let challenge = lost.recv_final(Duration::from_secs(5));
    assert_eq!(challenge.code(), Some(407), "{challenge:?}");
    lost.send(&sip, &ack_for(&inv, &challenge));
    lost.send(&sip, &with_credentials(&inv, &challenge, "alice", "wonderland", 1));
    assert_eq!(lost.recv_within(Duration::from_secs(5)).and_then(|m| m.code()), Some(100));
    let mut buf = [0u8; 512];
    let (n, _) = dns.recv_from(&mut buf).expect("the proxy asks the DNS server");
    assert!(buf[..n].windows(10).any(|w| w == b"unanswered"), "a query for the Request-URI's domain");
    // While that INVITE waits on DNS, a whole call to a registered user goes through.
    call_through(&sip, &bob, "dns-other-1");
    assert!(lost.nothing_yet(), "the first INVITE still waits for its name");
    // Resolution gives up: 503, not a hang.
    let r = lost.recv_final(Duration::from_secs(10));
    assert_eq!(r.code(), Some(503), "{r:?}");
    assert!(up.metric("hasp_sip_ops_failed_total") + up.metric("hasp_sip_ops_timed_out_total") >= 1);
}
