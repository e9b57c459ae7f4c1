//! Hardening of the relay (issue 11): input from outside cannot crash it, exhaust it,
//! turn it against its own listeners or steal a call's media. Each test is an attack,
//! made with real sockets against the real `hasp relay` binary on loopback, where
//! 127.0.0.2, 127.0.0.3, … stand for distinct hosts. RTP ranges: 47200-47499.

mod common;

use common::*;
use controlplane::control::ng::bencode::{decode, Value};
use serde_json::Value as Json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

// --- helpers ---------------------------------------------------------------------

/// One NG request over UDP from `from`; the decoded answer.
fn ng_from(from: &UdpSocket, ng: &str, cookie: &str, dict: &Value) -> Value {
    let mut msg = format!("{cookie} ").into_bytes();
    msg.extend(dict.encode());
    from.send_to(&msg, ng).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = from.recv(&mut buf).expect("an NG answer");
    let body = buf[..n].strip_prefix(format!("{cookie} ").as_bytes()).expect("the answer carries the cookie");
    decode(body).unwrap().0
}

fn ng(ng_addr: &str, cookie: &str, dict: &Value) -> Value {
    ng_from(&udp(), ng_addr, cookie, dict)
}

fn offer(call: &str, from_tag: &str, sdp: &str) -> Value {
    Value::dict([
        ("command", Value::str("offer")),
        ("call-id", Value::str(call)),
        ("from-tag", Value::str(from_tag)),
        ("sdp", Value::str(sdp)),
    ])
}

fn answer(call: &str, from_tag: &str, to_tag: &str, sdp: &str) -> Value {
    Value::dict([
        ("command", Value::str("answer")),
        ("call-id", Value::str(call)),
        ("from-tag", Value::str(from_tag)),
        ("to-tag", Value::str(to_tag)),
        ("sdp", Value::str(sdp)),
    ])
}

fn error_reason(v: &Value) -> String {
    assert_eq!(v.get("result").and_then(Value::as_str), Some("error"), "{v:?}");
    v.get("error-reason").and_then(Value::as_str).unwrap().to_string()
}

/// The relay port an answered SDP tells its receiver to send to.
fn sdp_port(v: &Value) -> u16 {
    assert_eq!(v.get("result").and_then(Value::as_str), Some("ok"), "{v:?}");
    let sdp = v.get("sdp").and_then(Value::as_str).unwrap();
    sdp.lines().find_map(|l| l.strip_prefix("m=audio ")).unwrap().split(' ').next().unwrap().parse().unwrap()
}

fn audio_sdp(ip: &str, port: u16) -> String {
    format!("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
}

/// A UDP socket on loopback address `ip` (a "host") with a read timeout.
fn host(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// An RTP socket and the RTCP socket on the port after it, on host `ip`.
fn host_pair(ip: &str) -> (UdpSocket, UdpSocket) {
    for _ in 0..100 {
        let rtp = host(ip);
        let port = rtp.local_addr().unwrap().port();
        if port == u16::MAX {
            continue;
        }
        if let Ok(rtcp) = UdpSocket::bind((ip, port + 1)) {
            rtcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            return (rtp, rtcp);
        }
    }
    panic!("no RTP/RTCP port pair on {ip}");
}

/// True when nothing is waiting on `s` (everything sent to it before was received first).
fn nothing_waiting(s: &UdpSocket) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    let none = s.recv_from(&mut buf).is_err();
    s.set_nonblocking(false).unwrap();
    none
}

fn gauge(relay: &RelayProc, name: &str) -> u64 {
    relay.metric(&format!("{name} "))
}

/// Drops counted on one stream of a session, by reason, read fresh from its worker.
fn drops(relay: &RelayProc, id: &str, leg: usize, kind: &str, reason: &str) -> u64 {
    let (s, v) = relay.call("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(s, 200, "{v}");
    v["legs"][leg]["stats"][kind]["drops"][reason].as_u64().unwrap_or(0)
}

// --- crash and exhaustion ------------------------------------------------------------

#[test]
fn rtpp_huge_index_is_refused_and_relay_lives() {
    let relay = RelayProc::start(&["--rtp-ports", "47200-47219", "--listen-rtpp", "127.0.0.1:0"]);
    let rtpp = field(&relay.ready_line, "rtpp=");
    let free = gauge(&relay, "hasp_relay_port_pairs_free");
    let s = udp();
    let ask = |m: &str| {
        s.send_to(m.as_bytes(), &rtpp).unwrap();
        String::from_utf8(recv(&s).0).unwrap().trim_end().to_string()
    };
    // The datagram that used to abort the process: an error, over the same socket.
    assert_eq!(ask("c2 U cid1 192.0.2.1 4000 t;100000000000000"), "c2 E2");
    assert_eq!(ask("c3 U cid1 192.0.2.1 4000 t;1 u;3000"), "c3 E2", "the other tag's index is bounded too");
    assert_eq!(ask("c4 U cid1 192.0.2.1 4000 t;99999999999999999999999999"), "c4 E2");
    assert_eq!(gauge(&relay, "hasp_relay_port_pairs_free"), free, "no port taken");
    assert_eq!(gauge(&relay, "hasp_relay_calls"), 0, "no call entry left");
    // The relay lives and serves.
    assert_eq!(ask("c5 V"), "c5 20040107");
    let ok = ask("c6 U cid1 192.0.2.1 4000 t;16");
    let port: u16 = ok.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((47200..=47219).contains(&port), "{ok}");
    assert_eq!(gauge(&relay, "hasp_relay_calls"), 1);
}

#[test]
fn offer_with_3000_media_sections_is_refused_and_no_ports_are_taken() {
    let relay =
        RelayProc::start(&["--rtp-ports", "47220-47259", "--listen-ng", "127.0.0.1:0", "--listen-rtpp", "127.0.0.1:0"]);
    let (ng_addr, rtpp) = (field(&relay.ready_line, "ng="), field(&relay.ready_line, "rtpp="));
    let free = gauge(&relay, "hasp_relay_port_pairs_free");
    assert_eq!(free, 20);
    let mut big = String::from("v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n");
    for _ in 0..3000 {
        // Short lines so the whole offer fits one UDP datagram.
        big.push_str("m=a 4 RTP/AVP 0\n");
    }
    // NG over UDP.
    let r = error_reason(&ng(&ng_addr, "m1", &offer("many", "a", &big)));
    assert!(r.contains("more than 16 media sections"), "{r}");
    // NG over TCP.
    let mut tcp = TcpStream::connect(&ng_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut msg = b"m2 ".to_vec();
    msg.extend(offer("many-tcp", "a", &big).encode());
    tcp.write_all(&msg).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tcp.read(&mut buf).unwrap();
    let v = decode(buf[..n].strip_prefix(b"m2 ").unwrap()).unwrap().0;
    assert!(error_reason(&v).contains("media sections"), "{v:?}");
    // NG over the REST API (POST /ng).
    let mut body = b"m3 ".to_vec();
    body.extend(offer("many-http", "a", &big).encode());
    let (s, v) = relay.call("POST", "/ng", Some(std::str::from_utf8(&body).unwrap()));
    assert_eq!(s, 200);
    let text = v.as_str().unwrap().as_bytes().to_vec();
    let v = decode(text.strip_prefix(b"m3 ").unwrap()).unwrap().0;
    assert!(error_reason(&v).contains("media sections"), "{v:?}");
    // RTPproxy carries no SDP: its stream number is the same bound.
    let s = udp();
    s.send_to(b"m4 U many 192.0.2.1 4000 t;3000", &rtpp).unwrap();
    assert_eq!(String::from_utf8(recv(&s).0).unwrap().trim_end(), "m4 E2");

    assert_eq!(gauge(&relay, "hasp_relay_port_pairs_free"), free, "the free port count is unchanged");
    assert_eq!(gauge(&relay, "hasp_relay_sessions"), 0);
    assert_eq!(gauge(&relay, "hasp_relay_calls"), 0, "a refused offer leaves no call");
}

#[test]
fn failed_offer_leaves_no_call_and_timed_out_calls_are_swept() {
    // Two port pairs: one session. An offer with two audio streams gets the first and
    // runs out of ports on the second.
    let relay =
        RelayProc::start(&["--rtp-ports", "47360-47363", "--listen-ng", "127.0.0.1:0", "--inactivity-timeout", "1"]);
    let ng_addr = field(&relay.ready_line, "ng=");
    let two = format!("{}m=audio 4002 RTP/AVP 0\r\n", audio_sdp("192.0.2.1", 4000));
    let r = error_reason(&ng(&ng_addr, "f1", &offer("two", "a", &two)));
    assert_eq!(r, "Ran out of ports");
    assert_eq!(gauge(&relay, "hasp_relay_calls"), 0, "the failed offer left no call");
    assert_eq!(gauge(&relay, "hasp_relay_sessions"), 0, "and undid the stream it had created");
    // The undone stream's ports come back once the worker closed its sockets.
    wait_for("the undone stream's ports", Duration::from_secs(10), || {
        (gauge(&relay, "hasp_relay_port_pairs_free") == 2).then_some(())
    });
    // A call whose media never flows: its session times out, and the call goes with it
    // (no NG `list` needed to notice).
    sdp_port(&ng(&ng_addr, "f2", &offer("quiet", "a", &audio_sdp("192.0.2.1", 4000))));
    assert_eq!(gauge(&relay, "hasp_relay_calls"), 1);
    wait_for("the timed-out call to be swept", Duration::from_secs(15), || {
        (gauge(&relay, "hasp_relay_calls") == 0).then_some(())
    });
    assert_eq!(relay.metric("hasp_relay_sessions_timed_out_total"), 1);
}

#[test]
fn ng_cookie_reused_by_another_peer_gets_its_own_answer() {
    let relay = RelayProc::start(&["--rtp-ports", "47380-47399", "--listen-ng", "127.0.0.1:0"]);
    let ng_addr = field(&relay.ready_line, "ng=");
    let (p1, p2) = (host("127.0.0.1"), host("127.0.0.2"));
    let a1 = ng_from(&p1, &ng_addr, "same", &offer("call-one", "a", &audio_sdp("192.0.2.1", 4000)));
    let a2 = ng_from(&p2, &ng_addr, "same", &offer("call-two", "a", &audio_sdp("192.0.2.2", 4000)));
    assert_ne!(sdp_port(&a1), sdp_port(&a2), "the second peer's offer was served, not answered from the cache");
    assert_eq!(gauge(&relay, "hasp_relay_calls"), 2);
    // A retransmission from the first peer still gets its own cached answer.
    let again = ng_from(&p1, &ng_addr, "same", &offer("call-one", "a", &audio_sdp("192.0.2.1", 4000)));
    assert_eq!(again, a1);
    assert_eq!(gauge(&relay, "hasp_relay_sessions"), 2);
}

#[test]
fn ng_tcp_connections_are_capped_per_source_and_others_still_get_in() {
    let relay = RelayProc::start(&["--rtp-ports", "47420-47439", "--listen-ng", "127.0.0.1:0"]);
    let ng_addr: SocketAddr = field(&relay.ready_line, "ng=").parse().unwrap();
    let ping = |c: &mut TcpStream, cookie: &str| -> Option<Vec<u8>> {
        c.write_all(format!("{cookie} d7:command4:pinge").as_bytes()).ok()?;
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).ok()?;
        (n > 0).then(|| buf[..n].to_vec())
    };
    // 32 connections from one source, each served.
    let mut open = Vec::new();
    for i in 0..32 {
        let mut c = TcpStream::connect(ng_addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ping(&mut c, &format!("p{i}")), Some(format!("p{i} d6:result4:ponge").into_bytes()));
        open.push(c);
    }
    // The 33rd from the same source is closed without an answer.
    let mut extra = TcpStream::connect(ng_addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ping(&mut extra, "over"), None);
    // Another source still gets in.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut other = rt
        .block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind("127.0.0.2:0".parse().unwrap())?;
            s.connect(ng_addr).await
        })
        .unwrap()
        .into_std()
        .unwrap();
    other.set_nonblocking(false).unwrap();
    other.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ping(&mut other, "o1"), Some(b"o1 d6:result4:ponge".to_vec()));
    // A closed connection gives its place back.
    drop(open.pop());
    let mut again = wait_for("a freed connection slot", Duration::from_secs(10), || {
        let mut c = TcpStream::connect(ng_addr).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        ping(&mut c, "back").map(|_| c)
    });
    assert_eq!(ping(&mut again, "b2"), Some(b"b2 d6:result4:ponge".to_vec()));
}

#[test]
fn conference_rooms_are_bounded() {
    let dir = scratch_dir("room-bound");
    let cfg = dir.join("hasp.toml");
    std::fs::write(&cfg, "[relay]\nmax_participants = 2\n").unwrap();
    let relay = RelayProc::start(&["--rtp-ports", "47400-47419", "--config", cfg.to_str().unwrap()]);
    let (s, v) = relay.call("POST", "/v1/conferences", Some("{}"));
    assert_eq!(s, 201, "{v}");
    let room = v["id"].as_str().unwrap().to_string();
    let join = || relay.call("POST", &format!("/v1/conferences/{room}/participants"), Some(r#"{"codec":"PCMU"}"#));
    assert_eq!(join().0, 201);
    assert_eq!(join().0, 201);
    let free = gauge(&relay, "hasp_relay_port_pairs_free");
    let (s, v) = join();
    assert_eq!((s, v["code"].as_str()), (409, Some("room_full")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("full"), "{v}");
    assert_eq!(gauge(&relay, "hasp_relay_port_pairs_free"), free, "a refused join takes no port");
}

// --- media cannot be redirected -------------------------------------------------------

#[test]
fn remote_pointing_at_own_ng_port_is_refused() {
    let relay =
        RelayProc::start(&["--rtp-ports", "47260-47279", "--listen-ng", "127.0.0.1:0", "--listen-rtpp", "127.0.0.1:0"]);
    let ng_addr = field(&relay.ready_line, "ng=");
    let ng_port = ng_addr.parse::<SocketAddr>().unwrap().port();
    let rtpp = field(&relay.ready_line, "rtpp=");
    let free = gauge(&relay, "hasp_relay_port_pairs_free");

    // The attack as written in the issue: the caller's SDP points at the NG listener.
    let r = error_reason(&ng(&ng_addr, "e1", &offer("evil", "a", &audio_sdp("127.0.0.1", ng_port))));
    assert!(r.contains("denied") && r.contains("own address"), "{r}");
    // Its RTCP (port + 1) would reach the NG listener as well.
    error_reason(&ng(&ng_addr, "e2", &offer("evil", "a", &audio_sdp("127.0.0.1", ng_port - 1))));
    // The relay's own media range.
    error_reason(&ng(&ng_addr, "e3", &offer("evil", "a", &audio_sdp("127.0.0.1", 47270))));
    // RTPproxy: the same remote is an address error.
    let s = udp();
    s.send_to(format!("e4 U evil 127.0.0.1 {ng_port} a;1").as_bytes(), &rtpp).unwrap();
    assert_eq!(String::from_utf8(recv(&s).0).unwrap().trim_end(), "e4 E7");
    assert_eq!(gauge(&relay, "hasp_relay_port_pairs_free"), free, "nothing was allocated");
    assert_eq!(gauge(&relay, "hasp_relay_calls"), 0);

    // An established call whose caller re-offers the NG port: refused, the call keeps
    // its media where it was.
    let (caller, callee) = (udp(), udp());
    let (ca, cb) = (caller.local_addr().unwrap().port(), callee.local_addr().unwrap().port());
    let to_callee = sdp_port(&ng(&ng_addr, "c1", &offer("c", "a", &audio_sdp("127.0.0.1", ca))));
    sdp_port(&ng(&ng_addr, "c2", &answer("c", "a", "b", &audio_sdp("127.0.0.1", cb))));
    error_reason(&ng(&ng_addr, "c3", &offer("c", "a", &audio_sdp("127.0.0.1", ng_port))));
    // An RTP-shaped NG request sent to the leg forwarded to the caller: it reaches the
    // caller, and no NG answer comes back.
    let mut pkt = vec![0x80, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9];
    pkt.extend_from_slice(b"cookie1 d7:command4:pinge");
    callee.send_to(&pkt, ("127.0.0.1", to_callee)).unwrap();
    assert_eq!(recv(&caller).0, pkt, "forwarded to the caller's signalled address");
    callee.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 2048];
    assert!(callee.recv_from(&mut buf).is_err(), "nothing arrives: the NG listener never saw the packet");
}

#[test]
fn rest_remote_pointing_at_own_listeners_is_refused() {
    let relay = RelayProc::start(&["--rtp-ports", "47280-47299", "--listen-ng", "127.0.0.1:0"]);
    let ng_addr = field(&relay.ready_line, "ng=");
    let api = relay.api.strip_prefix("http://").unwrap().to_string();
    let free = gauge(&relay, "hasp_relay_port_pairs_free");
    for evil in [ng_addr.as_str(), "127.0.0.1:47290"] {
        let body = format!(r#"{{"legs":[{{"remote":"{evil}"}}]}}"#);
        let (s, v) = relay.call("POST", "/v1/sessions", Some(&body));
        assert_eq!((s, v["code"].as_str()), (403, Some("remote_denied")), "{evil}: {v}");
        assert!(v["message"].as_str().unwrap().contains(evil), "{v}");
    }
    assert_eq!(gauge(&relay, "hasp_relay_port_pairs_free"), free);
    assert_eq!(gauge(&relay, "hasp_relay_sessions"), 0);
    // The REST API is TCP only: a UDP remote with its port number is no deputy (and a
    // client's ephemeral port may well share it).
    let (s, v) = relay.call("POST", "/v1/sessions", Some(&format!(r#"{{"legs":[{{"remote":"{api}"}}]}}"#)));
    assert_eq!(s, 201, "{v}");
    relay.call("DELETE", &format!("/v1/sessions/{}", v["id"].as_str().unwrap()), None);
    // PATCH of an existing session.
    let peer = udp();
    let (id, ..) = relay.create(&format!(r#"{{"legs":[{{"remote":"{}"}}]}}"#, peer.local_addr().unwrap()));
    let (s, v) =
        relay.call("PATCH", &format!("/v1/sessions/{id}"), Some(&format!(r#"{{"legs":[{{"remote":"{ng_addr}"}}]}}"#)));
    assert_eq!((s, v["code"].as_str()), (403, Some("remote_denied")), "{v}");
    let (_, v) = relay.call("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(v["legs"][0]["remote"], peer.local_addr().unwrap().to_string(), "the remote is unchanged");
    // A conference participant.
    let (_, v) = relay.call("POST", "/v1/conferences", Some("{}"));
    let room = v["id"].as_str().unwrap();
    let body = format!(r#"{{"codec":"PCMU","remote":"{ng_addr}"}}"#);
    let (s, v) = relay.call("POST", &format!("/v1/conferences/{room}/participants"), Some(&body));
    assert_eq!((s, v["code"].as_str()), (403, Some("remote_denied")), "{v}");
}

#[test]
fn third_host_cannot_steal_rtcp() {
    let relay = RelayProc::start(&["--rtp-ports", "47300-47319"]);
    let (a_rtp, a_rtcp) = host_pair("127.0.0.2");
    let (b_rtp, b_rtcp) = host_pair("127.0.0.4");
    let thief = host("127.0.0.3");
    // Leg A signals nothing (it learns the first source: the worst case), leg B its host.
    let body = format!(r#"{{"legs":[{{}},{{"remote":"{}"}}]}}"#, b_rtp.local_addr().unwrap());
    let (id, _, rtp_port, rtcp_port) = relay.create(&body);
    a_rtp.send_to(&rtp(1, 0xa, 1), rtp_port[0]).unwrap();
    assert_eq!(recv(&b_rtp).0, rtp(1, 0xa, 1), "A's RTP latched and flows");
    // The thief sends RTCP to A's RTCP port before A does.
    thief.send_to(&rtcp(0xc, 6), rtcp_port[0]).unwrap();
    wait_for("the thief's RTCP to be refused", Duration::from_secs(10), || {
        (drops(&relay, &id, 0, "rtcp", "source_mismatch") == 1).then_some(())
    });
    // B's RTCP goes to A's host (its RTP source's port + 1), not to the thief.
    b_rtcp.send_to(&rtcp(0xb, 8), rtcp_port[1]).unwrap();
    assert_eq!(recv(&a_rtcp).0, rtcp(0xb, 8));
    assert!(nothing_waiting(&thief), "the thief received nothing");
    // A's own RTCP, from the host its RTP latched to, is accepted.
    a_rtcp.send_to(&rtcp(0xa, 7), rtcp_port[0]).unwrap();
    assert_eq!(recv(&b_rtcp).0, rtcp(0xa, 7));
    let (_, v) = relay.call("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(v["legs"][0]["latched"]["rtcp"], a_rtcp.local_addr().unwrap().to_string(), "{v}");
}

#[test]
fn third_host_cannot_take_a_call_on_hold() {
    let relay = RelayProc::start(&["--rtp-ports", "47320-47339", "--relatch-idle-ms", "200"]);
    let (a, b, thief) = (host("127.0.0.2"), host("127.0.0.4"), host("127.0.0.3"));
    let (id, _, rtp_port, _) = relay.create_between(&a, &b);
    a.send_to(&rtp(1, 0xa, 1), rtp_port[0]).unwrap();
    assert_eq!(recv(&b).0, rtp(1, 0xa, 1));
    b.send_to(&rtp(1, 0xb, 2), rtp_port[1]).unwrap();
    assert_eq!(recv(&a).0, rtp(1, 0xb, 2));
    // A puts the call on hold: it stops sending for longer than the re-latch idle time.
    // (The wait is the attack's precondition, not a synchronisation.)
    std::thread::sleep(Duration::from_millis(400));
    // A third host sends to A's relay port, hoping to re-latch the silent leg.
    thief.send_to(&rtp(100, 0xc, 3), rtp_port[0]).unwrap();
    wait_for("the thief's packet to be refused", Duration::from_secs(10), || {
        (drops(&relay, &id, 0, "rtp", "source_mismatch") == 1).then_some(())
    });
    // B's media (music on hold) still goes to A, never to the thief.
    b.send_to(&rtp(2, 0xb, 2), rtp_port[1]).unwrap();
    assert_eq!(recv(&a).0, rtp(2, 0xb, 2));
    assert!(nothing_waiting(&thief), "the thief received nothing");
    // A resuming from a new port on the same host (a NAT rebinding) takes the leg back.
    let a2 = host("127.0.0.2");
    a2.send_to(&rtp(3, 0xa, 1), rtp_port[0]).unwrap();
    assert_eq!(recv(&b).0, rtp(3, 0xa, 1));
    b.send_to(&rtp(3, 0xb, 2), rtp_port[1]).unwrap();
    assert_eq!(recv(&a2).0, rtp(3, 0xb, 2));
}

#[test]
fn freed_ports_are_not_handed_to_the_next_session() {
    let relay = RelayProc::start(&["--rtp-ports", "47340-47359"]);
    let ports = |v: &Json| -> Vec<u64> { (0..2).map(|l| v["legs"][l]["rtp_port"].as_u64().unwrap()).collect() };
    let (s, first) = relay.call("POST", "/v1/sessions", Some("{}"));
    assert_eq!(s, 201, "{first}");
    let id = first["id"].as_str().unwrap();
    assert_eq!(relay.call("DELETE", &format!("/v1/sessions/{id}"), None).0, 200);
    wait_for("the deleted session's ports to be free", Duration::from_secs(10), || {
        (gauge(&relay, "hasp_relay_port_pairs_free") == 10).then_some(())
    });
    let (s, second) = relay.call("POST", "/v1/sessions", Some("{}"));
    assert_eq!(s, 201, "{second}");
    let (old, new) = (ports(&first), ports(&second));
    assert!(new.iter().all(|p| !old.contains(p)), "freed {old:?}, handed out {new:?}");
}

#[test]
fn ng_tcp_message_over_1_mib_closes_the_connection_and_the_listener_lives() {
    let relay = RelayProc::start(&["--rtp-ports", "47440-47459", "--listen-ng", "127.0.0.1:0"]);
    let ng_addr = field(&relay.ready_line, "ng=");
    let mut c = TcpStream::connect(&ng_addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A string that announces 2 MB and never ends: the message can only grow.
    let _ = c.write_all(b"big d3:sdp2000000:");
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..18 {
        if c.write_all(&chunk).is_err() {
            break; // Closed under our feet: what we wanted.
        }
    }
    let mut buf = [0u8; 64];
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)), "the connection is closed, nothing answered");
    let mut d = TcpStream::connect(&ng_addr).unwrap();
    d.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    d.write_all(b"p d7:command4:pinge").unwrap();
    let n = d.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"p d6:result4:ponge");
}

#[test]
fn remote_pointing_at_own_sip_port_is_refused_in_hasp_up() {
    let (relay, sip, _dir) = up_with_sip("media.test", "47460-47479", "deputy-sip");
    let body = format!(r#"{{"legs":[{{"remote":"{sip}"}}]}}"#);
    let (s, v) = relay.call("POST", "/v1/sessions", Some(&body));
    assert_eq!((s, v["code"].as_str()), (403, Some("remote_denied")), "{v}");
    // Anywhere else on this host is fine (tests run on loopback).
    let peer = udp();
    relay.create(&format!(r#"{{"legs":[{{"remote":"{}"}}]}}"#, peer.local_addr().unwrap()));
}
