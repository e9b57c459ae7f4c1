//! The rtpengine NG and RTPproxy control listeners against bad and repeated input, over
//! real UDP and TCP sockets.

mod common;

use common::*;
use controlplane::control::ng::bencode::{decode, Value};
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

fn field(line: &str, key: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap().to_string()
}

fn udp_req(to: &str, msg: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s.send_to(msg, to).unwrap();
    let mut buf = vec![0u8; 65536];
    s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

fn reply(raw: &[u8], cookie: &str) -> Value {
    let body = raw.strip_prefix(format!("{cookie} ").as_bytes()).expect("answer carries the cookie");
    decode(body).unwrap().0
}

fn reason(v: &Value) -> String {
    assert_eq!(v.get("result").and_then(Value::as_str), Some("error"), "{v:?}");
    v.get("error-reason").and_then(Value::as_str).unwrap().to_string()
}

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";

fn offer(call: &str) -> Vec<u8> {
    Value::dict([
        ("command", Value::str("offer")),
        ("call-id", Value::str(call)),
        ("from-tag", Value::str("a")),
        ("sdp", Value::str(SDP)),
    ])
    .encode()
}

#[test]
fn ng_retransmission_gets_the_cached_answer_not_a_second_session() {
    let relay = RelayProc::start(&["--rtp-ports", "42600-42699", "--listen-ng", "127.0.0.1:0"]);
    let ng = field(&relay.ready_line, "ng=");
    let mut msg = b"rt1 ".to_vec();
    msg.extend(offer("retrans"));
    let first = udp_req(&ng, &msg).unwrap();
    let second = udp_req(&ng, &msg).unwrap();
    assert_eq!(first, second);
    assert_eq!(relay.call("GET", "/v1/sessions", None).1["count"], 1);
    // A new cookie is a new request: a re-offer on the same call keeps its ports.
    let mut msg2 = b"rt2 ".to_vec();
    msg2.extend(offer("retrans"));
    let third = udp_req(&ng, &msg2).unwrap();
    let sdp = |raw: &[u8], c: &str| reply(raw, c).get("sdp").and_then(Value::as_str).unwrap().to_string();
    assert_eq!(sdp(&first, "rt1"), sdp(&third, "rt2"));
    assert_eq!(relay.call("GET", "/v1/sessions", None).1["count"], 1);
}

#[test]
fn ng_bad_input_gets_errors_or_counted_drops_never_a_crash() {
    let relay = RelayProc::start(&["--rtp-ports", "42700-42799", "--listen-ng", "127.0.0.1:0"]);
    let ng = field(&relay.ready_line, "ng=");
    // No cookie at all: nothing to answer to.
    assert_eq!(udp_req(&ng, b"d7:command4:pinge"), None);
    assert_eq!(udp_req(&ng, b""), None);
    let cases: &[(&[u8], &str)] = &[
        (b"c1 d7:command4:pi", "Incomplete message"),
        (b"c2 xyz", "Could not decode dictionary"),
        (b"c3 li1ee", "Could not decode dictionary"),
        (b"c4 de", "No command given"),
        (b"c5 d7:command5:fancye", "Unrecognized command"),
        (b"c6 d7:command5:offer7:call-id1:xe", "Incomplete message"),
        (b"c7 d7:command5:offer7:call-id1:x8:from-tag1:ae", "No SDP body"),
        (b"c8 d7:command5:offer7:call-id1:x8:from-tag1:a3:sdp5:hello", "Incomplete message"),
        (b"c9 d7:command5:offer7:call-id1:x8:from-tag1:a3:sdp5:helloe", "Failed to parse SDP"),
        (b"c10 d7:command6:answer7:call-id4:none8:from-tag1:a6:to-tag1:b3:sdp5:helloe", "Failed to parse SDP"),
        (b"c11 d7:command5:query7:call-id4:nonee", "Unknown call-id"),
        (b"c12 d7:command5:offer7:call-id1:x8:from-tag1:a3:sdp10:v=0\r\no=a\r\n3:ICE5:forcee", "ICE"),
    ];
    for (msg, want) in cases {
        let cookie = std::str::from_utf8(msg).unwrap().split(' ').next().unwrap();
        let r = udp_req(&ng, msg).unwrap_or_else(|| panic!("no answer to {:?}", String::from_utf8_lossy(msg)));
        let why = reason(&reply(&r, cookie));
        assert!(why.contains(want), "{:?}: {why}", String::from_utf8_lossy(msg));
    }
    // Deep nesting and a huge dictionary.
    let deep = format!("c20 {}{}", "l".repeat(5000), "e".repeat(5000));
    assert!(reason(&reply(&udp_req(&ng, deep.as_bytes()).unwrap(), "c20")).contains("nested"));
    let mut big = b"c21 d".to_vec();
    for i in 0..4000 {
        big.extend(format!("5:k{i:04}i{i}e").as_bytes());
    }
    big.push(b'e');
    let r = reply(&udp_req(&ng, &big).unwrap(), "c21");
    assert_eq!(reason(&r), "No command given");
    // TCP: two requests in one write, then garbage that closes the stream.
    let mut t = TcpStream::connect(&ng).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    t.write_all(b"t1 d7:command4:pinge t2 d7:command4:pinge").unwrap();
    let mut got = Vec::new();
    while got.len() < 2 * "t1 d6:result4:ponge".len() {
        let mut b = [0u8; 256];
        let n = t.read(&mut b).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(got, b"t1 d6:result4:ponget2 d6:result4:ponge");
    t.write_all(b"t3 zzz").unwrap();
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest);
    assert!(rest.starts_with(b"t3 d6:result5:error"), "{}", String::from_utf8_lossy(&rest));
    // Still serving.
    assert_eq!(udp_req(&ng, b"p1 d7:command4:pinge").unwrap(), b"p1 d6:result4:ponge");
    assert_eq!(relay.call("GET", "/health", None).0, 200);
}

#[test]
fn rtpproxy_protocol_answers_and_rejects() {
    let relay = RelayProc::start(&["--rtp-ports", "42800-42899", "--listen-rtpp", "127.0.0.1:0"]);
    let rtpp = field(&relay.ready_line, "rtpp=");
    let ask = |m: &str| String::from_utf8(udp_req(&rtpp, m.as_bytes()).unwrap()).unwrap().trim_end().to_string();
    assert_eq!(ask("k1 V"), "k1 20040107");
    assert_eq!(ask("k2 VF 20050322"), "k2 1");
    assert_eq!(ask("k3 VF 19990101"), "k3 0");
    assert_eq!(ask("k4 X"), "k4 E3");
    assert_eq!(ask("k5 U onlycall"), "k5 E2");
    assert_eq!(ask("k6 U c1 not-an-ip 4000 ft"), "k6 E7");
    assert_eq!(ask("k7 L unknown 192.0.2.1 4000 ft tt"), "k7 E8");
    let r = ask("k8 Us c1 192.0.2.1 4000 ft;1");
    let port: u16 = r.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((42800..=42899).contains(&port), "{r}");
    assert!(r.ends_with(" 127.0.0.1"));
    // Same offer again: same port.
    assert_eq!(ask("k9 Us c1 192.0.2.1 4000 ft;1"), r.replace("k8", "k9"));
    let l = ask("k10 L c1 192.0.2.2 5000 ft;1 tt;1");
    assert_ne!(l.split_whitespace().nth(1).unwrap(), port.to_string(), "the answer side gets the other leg");
    assert!(ask("k11 Q c1 ft tt").starts_with("k11 60 0 0 0 0"));
    assert_eq!(ask("k12 D c1 ft tt"), "k12 0");
    assert_eq!(ask("k13 D c1 ft tt"), "k13 E8");
    assert!(ask("k14 I").starts_with("k14 sessions created: 1"));
    // Without a cookie nothing can be answered; the listener keeps serving.
    assert_eq!(udp_req(&rtpp, b"V"), None);
    assert_eq!(ask("k15 V"), "k15 20040107");
}
