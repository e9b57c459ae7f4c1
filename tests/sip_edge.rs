//! Edge cases of the SIP proxy of `hasp up`, against real sockets and real sipp: a call
//! cancelled while ringing, a call the callee hangs up (its BYE routed back through the
//! proxy by the Record-Route set), and a corpus of malformed datagrams after which the
//! proxy must still answer.
//!
//! No sleeps: sipp tells the test when the call reached the state to check (a NOTIFY to
//! the test's socket) and waits for the test's INFO before going on; malformed datagrams
//! are each followed by a well-formed OPTIONS from the same socket, whose 200 proves the
//! proxy processed the datagram (it handles datagrams in order, on one thread), so any
//! answer to it is already in the socket.

mod common;

use common::*;
use serde_json::Value;
use sip::Message;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

const DOMAIN: &str = "hasp.test";

/// `hasp up` for [`DOMAIN`] with its own store.
/// `hasp up` with one SIP thread: these tests send a broken message and then an OPTIONS
/// as a barrier, and read every answer to the first before the barrier's. With several
/// SIP threads, messages of different Call-IDs are served side by side and their answers
/// may cross (the first's Call-ID may not even be readable).
fn up(rtp_ports: &str, name: &str) -> (RelayProc, String, PathBuf) {
    up_with_sip_args(DOMAIN, rtp_ports, &format!("sip-edge-{name}"), &["--sip-threads", "1"])
}

/// A sipp process killed on drop, so a failing test leaves no sipp behind for 30 s.
struct Sipp {
    child: Child,
    scenario: &'static str,
}

impl Sipp {
    /// Starts `scenario` on `port` (see [`common::sipp`]), tracing its messages into
    /// `<log>` in `dir` for the test to read.
    fn start(
        dir: &Path,
        scenario: &'static str,
        port: u16,
        keys: &[(&str, String)],
        extra: &[&str],
        log: &str,
    ) -> Self {
        let mut args = vec!["-trace_msg", "-message_file", log];
        args.extend_from_slice(extra);
        Self { child: sipp(dir, scenario, port, keys, &args), scenario }
    }

    /// Waits for sipp to end and asserts it succeeded (every message of the scenario
    /// seen, every check passed), showing its stderr otherwise.
    fn assert_success(&mut self, dir: &Path) {
        let st = wait_for(self.scenario, Duration::from_secs(40), || self.child.try_wait().ok().flatten());
        let err = std::fs::read_to_string(dir.join(format!("{}.stderr", self.scenario))).unwrap_or_default();
        assert!(st.success(), "sipp {} failed ({st}): {err}", self.scenario);
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a UDP socket is bound on 127.0.0.1:`port` (read from /proc, so the probe
/// cannot steal the port from the sipp that is about to bind it).
fn udp_bound(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
}

/// Waits until the sipp on `port` has bound its socket, so the proxy's first INVITE
/// finds it.
fn wait_bound(port: u16) {
    wait_for(&format!("sipp to bind 127.0.0.1:{port}"), Duration::from_secs(10), || udp_bound(port).then_some(()));
}

/// A socket for sipp's "I got there" NOTIFY, with a timeout long enough for a call setup.
fn notify_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Receives sipp's NOTIFY on `s` and returns the call's Call-ID it carries.
fn notice(s: &UdpSocket, event: &str) -> String {
    let mut buf = [0u8; 8192];
    let (n, _) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("sipp's NOTIFY ({event}): {e}"));
    let (m, _) = Message::parse(&buf[..n], false).expect("sipp's NOTIFY parses");
    assert_eq!((m.method(), m.header("Event")), ("NOTIFY", Some(event)));
    m.call_id().to_string()
}

/// Sends the INFO that lets the sipp on `port`, waiting in call `call_id`, go on.
fn go(s: &UdpSocket, port: u16, call_id: &str) {
    let me = s.local_addr().unwrap();
    let info = format!(
        "INFO sip:sipp@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-go-{port}\r\nFrom: <sip:test@{me}>;tag=go\r\nTo: <sip:sipp@127.0.0.1:{port}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INFO\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    s.send_to(info.as_bytes(), ("127.0.0.1", port)).unwrap();
}

/// The messages of a sipp `-message_file` trace, each with its direction ("sent" or
/// "received"). sipp writes each as a dashed line with a time, a line saying what
/// happened (`UDP message sent (N bytes):`, `UDP message received [N] bytes :`), a blank
/// line, the message, and a blank line.
fn trace(dir: &Path, log: &str) -> Vec<(&'static str, Message)> {
    let text = std::fs::read_to_string(dir.join(log)).unwrap_or_else(|e| panic!("{log}: {e}"));
    text.split("----------------------------------------------- ")
        .filter_map(|entry| {
            let mut parts = entry.splitn(4, '\n');
            let (_time, what, _blank, msg) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            let dir = match what {
                w if w.contains("message sent") => "sent",
                w if w.contains("message received") => "received",
                _ => return None,
            };
            Some((dir, Message::parse(msg.as_bytes(), false).ok()?.0))
        })
        .collect()
}

/// The first traced message going `dir` whose start line begins with `start`.
fn find<'a>(msgs: &'a [(&'static str, Message)], dir: &str, start: &str) -> &'a Message {
    msgs.iter()
        .find(|(d, m)| *d == dir && String::from_utf8_lossy(&m.to_bytes()).starts_with(start))
        .map(|(_, m)| m)
        .unwrap_or_else(|| panic!("no {dir} message starting {start:?} in {msgs:#?}"))
}

/// The relay session anchoring a call whose caller's SDP named `caller_media` (leg 0's
/// signalled remote), once it exists.
fn wait_session_of(relay: &RelayProc, caller_media: &str) -> Value {
    wait_for("the call's media session", Duration::from_secs(15), || {
        let (_, v) = relay.call("GET", "/v1/sessions", None);
        v["sessions"].as_array()?.iter().find(|s| s["legs"][0]["remote"] == caller_media).cloned()
    })
}

/// Asserts the relay session `id` is gone and the relay holds no session at all (the
/// test's call was the only one).
fn assert_media_freed(relay: &RelayProc, id: &str) {
    wait_for("the call's media session to be deleted", Duration::from_secs(10), || {
        (relay.call("GET", &format!("/v1/sessions/{id}"), None).0 == 404).then_some(())
    });
    let (s, v) = relay.call("GET", "/v1/sessions", None);
    assert_eq!((s, &v["count"]), (200, &Value::from(0)), "no session left: {v}");
    assert_eq!(relay.metric("hasp_relay_sessions"), 0);
    assert_eq!(relay.metric("hasp_relay_sessions_created_total"), 1, "one session for the one call");
}

/// RFC 3261 §9 and §16.10: a CANCEL while the callee rings is answered 200 at once,
/// forwarded in the INVITE's transaction, and the INVITE ends in a 487 ACKed hop by hop.
#[test]
fn cancel_while_ringing_gets_200_and_487_and_frees_the_media() {
    let (relay, sip, dir) = up("46000-46099", "cancel");
    add_sip_user(&relay, "bob", DOMAIN, "builder");
    let (uac_port, uas_port) = (25010, 25011);
    let (alice, notify) = (udp(), notify_socket());
    let alice_a = alice.local_addr().unwrap().to_string();
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);
    let mut uas = Sipp::start(&dir, "uas_cancel.xml", uas_port, &[], &[], "uas.log");
    wait_bound(uas_port);
    let mut uac = Sipp::start(
        &dir,
        "uac_cancel.xml",
        uac_port,
        &[
            ("media_a", alice.local_addr().unwrap().port().to_string()),
            ("domain", DOMAIN.to_string()),
            ("notify_port", notify.local_addr().unwrap().port().to_string()),
        ],
        &["-s", "bob", &sip],
        "uac.log",
    );
    // The caller has its 180: the offer is anchored, nothing answered yet.
    let call_id = notice(&notify, "ringing");
    let session = wait_session_of(&relay, &alice_a);
    assert!(session["legs"][1]["remote"].is_null(), "no answer yet: {session}");
    let id = session["id"].as_str().unwrap().to_string();
    go(&notify, uac_port, &call_id);
    uac.assert_success(&dir);
    uas.assert_success(&dir);
    assert_media_freed(&relay, &id);

    // What the caller saw: 200 for the CANCEL, then 487 for the INVITE, which it ACKed.
    let caller = trace(&dir, "uac.log");
    let ok = find(&caller, "received", "SIP/2.0 200");
    assert_eq!((ok.cseq(), ok.call_id()), (Some((1, "CANCEL".into())), call_id.as_str()));
    let terminated = find(&caller, "received", "SIP/2.0 487");
    assert_eq!(terminated.cseq(), Some((1, "INVITE".into())));
    assert!(terminated.to_tag().is_some(), "a final response has a To tag: {terminated:?}");
    assert_eq!(terminated.header_values("Via").count(), 1, "the proxy's Via is removed: {terminated:?}");
    find(&caller, "sent", "ACK sip:bob@");
    // What the callee saw: the proxy's CANCEL in the INVITE's transaction (same branch,
    // RFC 3261 §9.1), then the proxy's ACK of the 487.
    let callee = trace(&dir, "uas.log");
    let invite = find(&callee, "received", "INVITE ");
    let cancel = find(&callee, "received", "CANCEL ");
    assert_eq!(cancel.call_id(), call_id);
    assert_eq!(cancel.cseq(), Some((1, "CANCEL".into())));
    assert_eq!(cancel.via().unwrap().branch, invite.via().unwrap().branch, "{cancel:?} vs {invite:?}");
    assert_eq!(cancel.header_values("Via").count(), 1, "hop by hop: only the proxy's Via: {cancel:?}");
    let cancel_ok = find(&callee, "sent", "SIP/2.0 200");
    assert_eq!(cancel_ok.cseq(), Some((1, "CANCEL".into())), "{cancel_ok:?}");
    find(&callee, "sent", "SIP/2.0 487");
    let ack = find(&callee, "received", "ACK ");
    assert_eq!((ack.cseq(), ack.via().unwrap().branch), (Some((1, "ACK".into())), invite.via().unwrap().branch));
}

/// RFC 3261 §12.2.1.1 and §16.12: the callee's BYE goes to the caller's Contact through
/// the proxy named in its route set, which consumes its own Route entry, forwards it and
/// frees the call's media.
#[test]
fn bye_from_the_callee_follows_the_record_route_and_frees_the_media() {
    let (relay, sip, dir) = up("46100-46199", "callee-bye");
    add_sip_user(&relay, "bob", DOMAIN, "builder");
    let (uac_port, uas_port) = (25020, 25021);
    let (alice, bob, notify) = (udp(), udp(), notify_socket());
    let (alice_a, bob_a) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let proxy: SocketAddr = sip.parse().unwrap();
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);
    let mut uas = Sipp::start(
        &dir,
        "uas_bye_rr.xml",
        uas_port,
        &[
            ("media_b", bob.local_addr().unwrap().port().to_string()),
            ("notify_port", notify.local_addr().unwrap().port().to_string()),
            ("proxy_port", proxy.port().to_string()),
        ],
        &[],
        "uas.log",
    );
    wait_bound(uas_port);
    let mut uac = Sipp::start(
        &dir,
        "uac_callee_bye.xml",
        uac_port,
        &[("media_a", alice.local_addr().unwrap().port().to_string()), ("domain", DOMAIN.to_string())],
        &["-s", "bob", &sip],
        "uac.log",
    );
    // The callee has the ACK: the call is up, its media anchored both ways.
    let call_id = notice(&notify, "answered");
    let session = relay.wait_media_session(&alice_a, &bob_a);
    let port = |leg: usize| session["legs"][leg]["rtp_port"].as_u64().unwrap() as u16;
    alice.send_to(&rtp(1, 0xa, 1), ("127.0.0.1", port(0))).unwrap();
    assert_eq!(recv(&bob).0, rtp(1, 0xa, 1));
    bob.send_to(&rtp(1, 0xb, 2), ("127.0.0.1", port(1))).unwrap();
    assert_eq!(recv(&alice).0, rtp(1, 0xb, 2));
    go(&notify, uas_port, &call_id);
    uac.assert_success(&dir);
    uas.assert_success(&dir);
    assert_media_freed(&relay, session["id"].as_str().unwrap());

    // The callee's BYE: to the caller's Contact, with the proxy's Record-Route as its
    // route set.
    let callee = trace(&dir, "uas.log");
    let bye = find(&callee, "sent", "BYE ");
    let contact = format!("sip:sipp@127.0.0.1:{uac_port}");
    assert!(matches!(&bye.start, sip::StartLine::Request { uri, .. } if *uri == contact), "{bye:?}");
    assert_eq!(bye.header("Route"), Some(format!("<sip:{proxy};lr>").as_str()), "{bye:?}");
    find(&callee, "received", "ACK ");
    let bye_ok = find(&callee, "received", "SIP/2.0 200");
    assert_eq!(bye_ok.cseq(), Some((1, "BYE".into())), "{bye_ok:?}");
    // The caller got it from the proxy, which consumed its own Route entry and added
    // its Via above the callee's.
    let caller = trace(&dir, "uac.log");
    let rr = find(&caller, "received", "SIP/2.0 200");
    assert_eq!(rr.header("Record-Route"), Some(format!("<sip:{proxy};lr>").as_str()), "{rr:?}");
    let got = find(&caller, "received", "BYE ");
    assert_eq!(got.call_id(), call_id);
    assert_eq!(got.header("Route"), None, "the proxy's own Route entry is consumed: {got:?}");
    let vias: Vec<&str> = got.header_values("Via").collect();
    assert_eq!(vias.len(), 2, "{vias:?}");
    // The proxy's Via names its address and the port of the SIP core that sent it (its
    // answers come back there, not to the public port).
    let ip = proxy.to_string().rsplit_once(':').unwrap().0.to_string();
    assert!(vias[0].contains(&format!("UDP {ip}:")) && vias[0].contains("branch=z9hG4bK-hasp"), "{vias:?}");
    assert!(vias[1].contains(&format!("127.0.0.1:{uas_port}")), "{vias:?}");
    assert_eq!(got.max_forwards(), Some(69), "{got:?}");
}

/// The headers every corpus case starts from: Via (to the sending socket), From, To,
/// Call-ID `id` (also the branch and tag, so an answer names its case), CSeq and
/// Max-Forwards.
fn headers(me: SocketAddr, id: &str, method: &str) -> Vec<String> {
    vec![
        format!("Via: SIP/2.0/UDP {me};branch=z9hG4bK-{id}"),
        format!("From: <sip:fuzz@{DOMAIN}>;tag=f-{id}"),
        format!("To: <sip:fuzz@{DOMAIN}>"),
        format!("Call-ID: {id}"),
        format!("CSeq: 1 {method}"),
        "Max-Forwards: 70".to_string(),
    ]
}

/// `first` line, `headers` each ended by CRLF, then `tail` as it is (the end of the
/// header section and a body, or nothing for a truncated message).
fn request(first: &str, headers: &[String], tail: &[u8]) -> Vec<u8> {
    let mut m = format!("{first}\r\n");
    for h in headers {
        m.push_str(h);
        m.push_str("\r\n");
    }
    let mut m = m.into_bytes();
    m.extend_from_slice(tail);
    m
}

/// A complete OPTIONS to the proxy itself (R-URI `sip:<proxy>`) from `me`.
fn options(proxy: &str, me: SocketAddr, id: &str) -> Vec<u8> {
    request(&format!("OPTIONS sip:{proxy} SIP/2.0"), &headers(me, id, "OPTIONS"), b"Content-Length: 0\r\n\r\n")
}

/// Sends the datagram `build` makes (given the sending socket's address) to the proxy
/// from a fresh socket, then a well-formed OPTIONS from the same socket, and returns
/// what came back before that OPTIONS' 200. The proxy handles datagrams one at a time
/// in arrival order and sends what one produced before taking the next, so once the
/// 200 is here every answer to the case is too: no waiting window to guess, and each
/// case proves the proxy still answers.
fn answers(proxy: &str, case: &str, build: impl FnOnce(SocketAddr) -> Vec<u8>) -> Vec<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = s.local_addr().unwrap();
    let datagram = build(me);
    s.send_to(&datagram, proxy).unwrap_or_else(|e| panic!("{case}: sending {} bytes: {e}", datagram.len()));
    let barrier = format!("barrier-{case}");
    s.send_to(&options(proxy, me, &barrier), proxy).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70_000];
    loop {
        let n = s.recv(&mut buf).unwrap_or_else(|e| panic!("the proxy stopped answering after case {case}: {e}"));
        match Message::parse(&buf[..n], false) {
            Ok((m, _)) if m.call_id() == barrier => {
                assert_eq!(m.code(), Some(200), "{case}: the OPTIONS after it: {m:?}");
                return got;
            }
            _ => got.push(buf[..n].to_vec()),
        }
    }
}

/// Status code and Call-ID of an answer, read from its text: a 400 copies the broken
/// request's headers as they were, so it need not parse as a whole.
fn status_and_call_id(answer: &[u8]) -> (Option<u16>, Option<String>) {
    let text = String::from_utf8_lossy(answer);
    let mut lines = text.split("\r\n");
    let code = lines.next().and_then(|l| l.strip_prefix("SIP/2.0 ")).and_then(|r| r.get(..3)?.parse().ok());
    let call_id = lines.take_while(|l| !l.is_empty()).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        (n.trim().eq_ignore_ascii_case("Call-ID") || n.trim() == "i").then(|| v.trim().to_string())
    });
    (code, call_id)
}

/// Whether the case got exactly one answer, a 400 for its own Call-ID; what it got if not.
fn check_400(proxy: &str, case: &str, build: impl FnOnce(SocketAddr) -> Vec<u8>) -> Result<(), String> {
    let got = answers(proxy, case, build);
    let texts: Vec<String> = got.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    match &got[..] {
        [one] if status_and_call_id(one) == (Some(400), Some(case.to_string())) => Ok(()),
        _ => Err(format!("{case}: one 400 expected, got {texts:?}")),
    }
}

/// Asserts the case got exactly one answer, a 400 for its own Call-ID.
fn assert_400(proxy: &str, case: &str, build: impl FnOnce(SocketAddr) -> Vec<u8>) {
    if let Err(e) = check_400(proxy, case, build) {
        panic!("{e}");
    }
}

/// Asserts the case got no answer, or only a 400 (for input too broken to be sure it
/// is a request that can be answered).
fn assert_dropped_or_400(proxy: &str, case: &str, build: impl FnOnce(SocketAddr) -> Vec<u8>) {
    for b in answers(proxy, case, build) {
        let text = String::from_utf8_lossy(&b).into_owned();
        assert_eq!(status_and_call_id(&b).0, Some(400), "{case}: only a 400 may answer it: {text}");
    }
}

/// Asserts the case got no answer at all (responses are never answered, RFC 3261 §17).
fn assert_dropped(proxy: &str, case: &str, build: impl FnOnce(SocketAddr) -> Vec<u8>) {
    let got = answers(proxy, case, build);
    let texts: Vec<String> = got.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    assert!(got.is_empty(), "{case}: no answer expected, got {texts:?}");
}

/// Deterministic pseudo-random bytes (xorshift), so a failure replays.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Size of the near-limit cases: just under the largest UDP payload over IPv4 (65,507).
const NEAR_64K: usize = 65_000;

/// An OPTIONS of about [`NEAR_64K`] bytes, most of it one `X-Pad` header line, ended
/// (or not) by `end`.
fn padded(proxy: &str, me: SocketAddr, id: &str, end: &str) -> Vec<u8> {
    let mut h = headers(me, id, "OPTIONS");
    h.push("Content-Length: 0".into());
    let mut m = request(&format!("OPTIONS sip:{proxy} SIP/2.0"), &h, b"X-Pad: ");
    m.resize(NEAR_64K - end.len(), b'a');
    m.extend_from_slice(end.as_bytes());
    m
}

/// Requests broken in ways the proxy detects, but still carrying what a response needs,
/// get a 400 (RFC 3261 §8.2, §18.3).
#[test]
fn malformed_requests_that_can_be_answered_get_400() {
    let (_relay, sip, _) = up("46200-46299", "malformed-400");
    let p = sip.as_str();
    let ruri = format!("OPTIONS sip:{sip} SIP/2.0");
    let with = |me: SocketAddr, id: &str, replace: &[(&str, &str)], tail: &[u8]| {
        let hs: Vec<String> = headers(me, id, "OPTIONS")
            .into_iter()
            .map(|h| replace.iter().find(|(n, _)| h.starts_with(n)).map_or(h.clone(), |(_, v)| v.to_string()))
            .collect();
        request(&ruri, &hs, tail)
    };
    // RFC 3261 §18.3: a request whose datagram ends before its headers or body does
    // SHOULD get a 400.
    assert_400(p, "truncated-mid-line", |me| with(me, "truncated-mid-line", &[], b"Contact: <sip:fuzz@127.0.0.1:5"));
    assert_400(p, "near-64k-header-cut", |me| padded(p, me, "near-64k-header-cut", ""));
    assert_400(p, "content-length-beyond-body", |me| {
        with(me, "content-length-beyond-body", &[], b"Content-Type: text/plain\r\nContent-Length: 500\r\n\r\nhello")
    });
    assert_400(p, "content-length-negative", |me| {
        with(me, "content-length-negative", &[], b"Content-Length: -1\r\n\r\n")
    });
    assert_400(p, "content-length-not-a-number", |me| {
        with(me, "content-length-not-a-number", &[], b"Content-Length: ten\r\n\r\n")
    });
    assert_400(p, "content-length-overflow", |me| {
        with(me, "content-length-overflow", &[], b"Content-Length: 99999999999999999999999\r\n\r\n")
    });
    // Mandatory headers present but broken.
    let end = b"Content-Length: 0\r\n\r\n";
    assert_400(p, "cseq-not-a-number", |me| with(me, "cseq-not-a-number", &[("CSeq", "CSeq: one OPTIONS")], end));
    assert_400(p, "cseq-other-method", |me| with(me, "cseq-other-method", &[("CSeq", "CSeq: 1 INVITE")], end));
    assert_400(p, "via-without-host", |me| with(me, "via-without-host", &[("Via", "Via: SIP/2.0/UDP")], end));
    assert_400(p, "max-forwards-not-a-number", |me| {
        with(me, "max-forwards-not-a-number", &[("Max-Forwards", "Max-Forwards: many")], end)
    });
    assert_400(p, "header-without-colon", |me| {
        with(me, "header-without-colon", &[], b"NoColonHere\r\nContent-Length: 0\r\n\r\n")
    });
}

/// Garbage, unanswerable requests and malformed responses get nothing (or a 400), legal
/// oddities are served, and afterwards the proxy still answers OPTIONS and REGISTER.
#[test]
fn garbage_is_dropped_and_the_proxy_keeps_serving() {
    let (mut relay, sip, _) = up("46300-46399", "garbage");
    add_sip_user(&relay, "carol", DOMAIN, "c4rol");
    let p = sip.as_str();
    let ruri = format!("OPTIONS sip:{sip} SIP/2.0");
    let without = |me: SocketAddr, id: &str, name: &str| {
        let hs: Vec<String> = headers(me, id, "OPTIONS").into_iter().filter(|h| !h.starts_with(name)).collect();
        request(&ruri, &hs, b"Content-Length: 0\r\n\r\n")
    };
    // Requests missing what a response needs: dropping them is acceptable.
    assert_dropped_or_400(p, "cut-before-call-id", |me| {
        let hs = headers(me, "cut-before-call-id", "OPTIONS");
        request(&ruri, &hs[..1], b"From: <sip:fu")
    });
    assert_dropped_or_400(p, "no-call-id", |me| without(me, "no-call-id", "Call-ID"));
    assert_dropped_or_400(p, "no-cseq", |me| without(me, "no-cseq", "CSeq"));
    assert_dropped_or_400(p, "no-via", |me| without(me, "no-via", "Via"));
    assert_dropped_or_400(p, "not-a-request-line", |me| {
        request("GARBAGE", &headers(me, "not-a-request-line", "OPTIONS"), b"Content-Length: 0\r\n\r\n")
    });
    // Binary garbage.
    assert_dropped_or_400(p, "empty-datagram", |_| Vec::new());
    assert_dropped_or_400(p, "nuls", |_| vec![0; 1500]);
    assert_dropped_or_400(p, "noise", |_| noise(0x5eed, 512));
    assert_dropped_or_400(p, "noise-crlfcrlf", |_| [noise(0xfeed, 512), b"\r\n\r\n".to_vec()].concat());
    assert_dropped_or_400(p, "nul-before-request", |me| [vec![0], options(p, me, "nul-before-request")].concat());
    // A CRLF keep-alive is not answered over UDP.
    assert_dropped(p, "crlf-keepalive", |_| b"\r\n\r\n".to_vec());
    // Responses, whatever their status line, are never answered; a stray one matching
    // no transaction is dropped too.
    for (case, status) in [
        ("status-99", "SIP/2.0 99 Too Low"),
        ("status-2000", "SIP/2.0 2000 Too Long"),
        ("status-letters", "SIP/2.0 abc Letters"),
        ("status-700", "SIP/2.0 700 Too High"),
        ("status-missing", "SIP/2.0"),
        ("stray-200", "SIP/2.0 200 OK"),
    ] {
        assert_dropped(p, case, |me| request(status, &headers(me, case, "OPTIONS"), b"Content-Length: 0\r\n\r\n"));
    }
    // Legal edge cases are served: a second Via (echoed in order), a near-64 KB request.
    let two_vias = answers(p, "two-vias", |me| {
        let mut hs = headers(me, "two-vias", "OPTIONS");
        hs.insert(1, "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-below".into());
        request(&ruri, &hs, b"Content-Length: 0\r\n\r\n")
    });
    assert_eq!(two_vias.len(), 1);
    let ok = Message::parse(&two_vias[0], false).unwrap().0;
    assert_eq!(ok.code(), Some(200), "{ok:?}");
    let vias: Vec<&str> = ok.header_values("Via").collect();
    assert!(vias.len() == 2 && vias[0].contains("z9hG4bK-two-vias") && vias[1].contains("z9hG4bK-below"), "{vias:?}");
    let big = answers(p, "near-64k-request", |me| padded(p, me, "near-64k-request", "\r\n\r\n"));
    let codes: Vec<Option<u16>> = big.iter().map(|b| Message::parse(b, false).ok().and_then(|m| m.0.code())).collect();
    assert!(
        codes == [Some(200)] || codes == [Some(513)],
        "a 64 KB OPTIONS is served (or refused as too large): {codes:?}"
    );
    // A 100 KB header line cannot travel in one datagram; over TCP the proxy must stop
    // reading it (the message is over its 64 KB limit) and close the connection.
    over_tcp_100k_header_closes(p);

    // Still serving: OPTIONS to the proxy, a REGISTER challenged then accepted.
    let s = udp();
    s.send_to(&options(p, s.local_addr().unwrap(), "after-corpus"), p).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).expect("the proxy answers OPTIONS after the corpus");
    assert_eq!(Message::parse(&buf[..n], false).unwrap().0.code(), Some(200));
    // sip_register asserts the 401 challenge before answering it.
    assert_eq!(sip_register(p, DOMAIN, "carol", "c4rol", "sip:carol@127.0.0.1:7010", 600), 200);
    assert!(relay.child.try_wait().unwrap().is_none(), "hasp is still running");
}

/// Sends an OPTIONS with a 100 KB header line over TCP; the proxy must close the
/// connection without serving it (its 64 KB message limit).
fn over_tcp_100k_header_closes(proxy: &str) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(proxy).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = c.local_addr().unwrap();
    let mut h = headers(me, "tcp-100k", "OPTIONS");
    h[0] = format!("Via: SIP/2.0/TCP {me};branch=z9hG4bK-tcp-100k");
    h.push(format!("X-Pad: {}", "b".repeat(100 * 1024)));
    // The proxy may close while the rest is still being written: that is the point.
    let _ =
        c.write_all(&request(&format!("OPTIONS sip:{proxy};transport=tcp SIP/2.0"), &h, b"Content-Length: 0\r\n\r\n"));
    let mut got = Vec::new();
    match c.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the proxy neither answered nor closed the connection: {e}"),
    }
    let text = String::from_utf8_lossy(&got);
    assert!(!text.starts_with("SIP/2.0 200"), "a 100 KB message was served: {text}");
}

/// RFC 4475 §3.1.2.19: a request with two values of a single-value header is a 400.
#[test]
fn duplicated_single_value_headers_get_400() {
    let (_relay, sip, _) = up("46400-46499", "duplicates");
    let p = sip.as_str();
    // RFC 4475 §3.1.2.19: "An element receiving this request MUST respond with a 400".
    let mut failures = Vec::new();
    for (case, extra) in [
        ("two-call-ids", "Call-ID: another-call"),
        ("two-cseqs", "CSeq: 2 OPTIONS"),
        ("two-froms", "From: <sip:other@hasp.test>;tag=other"),
        ("two-tos", "To: <sip:other@hasp.test>"),
        ("two-max-forwards", "Max-Forwards: 69"),
    ] {
        let r = check_400(p, case, |me| {
            let mut hs = headers(me, case, "OPTIONS");
            hs.push(extra.to_string());
            request(&format!("OPTIONS sip:{p} SIP/2.0"), &hs, b"Content-Length: 0\r\n\r\n")
        });
        failures.extend(r.err());
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Requests that carry every header a response needs but fail to parse for other reasons
/// (body bytes, request line, header encoding) still get their 400.
#[test]
fn requests_with_every_mandatory_header_get_400_however_they_are_broken() {
    let (_relay, sip, _) = up("46500-46599", "answerable");
    let p = sip.as_str();
    let ruri = format!("OPTIONS sip:{sip} SIP/2.0");
    let mut failures = Vec::new();
    // RFC 3261 §18.3: a body shorter than Content-Length SHOULD get a 400, whatever the
    // body's bytes (here not UTF-8, as an image or ISUP body would be).
    failures.extend(
        check_400(p, "binary-body-short", |me| {
            let hs = headers(me, "binary-body-short", "OPTIONS");
            request(
                &ruri,
                &hs,
                b"Content-Type: application/octet-stream\r\nContent-Length: 500\r\n\r\n\xff\xfe\x00\x01",
            )
        })
        .err(),
    );
    // A request line without the SIP version, every header there to answer it.
    failures.extend(
        check_400(p, "no-sip-version", |me| {
            request(
                &format!("OPTIONS sip:{sip}"),
                &headers(me, "no-sip-version", "OPTIONS"),
                b"Content-Length: 0\r\n\r\n",
            )
        })
        .err(),
    );
    // A header value that is not UTF-8 (RFC 3261 §25.1: TEXT-UTF8).
    failures.extend(
        check_400(p, "header-not-utf8", |me| {
            let hs = headers(me, "header-not-utf8", "OPTIONS");
            request(&ruri, &hs, b"Subject: caf\xe9\r\nContent-Length: 0\r\n\r\n")
        })
        .err(),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A request the proxy cannot forward over UDP (too large once its Via and Record-Route
/// are added) must fail at once, not leave the caller waiting for Timer B.
#[test]
fn an_invite_too_large_to_forward_over_udp_gets_a_prompt_final_answer() {
    let (relay, sip, _) = up("46600-46699", "too-large");
    add_sip_user(&relay, "bob", DOMAIN, "builder");
    let bob = udp();
    let contact = format!("sip:bob@{}", bob.local_addr().unwrap());
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &contact, 600), 200);
    let caller = udp();
    // Short reads: wait_for below bounds the whole wait.
    caller.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let me = caller.local_addr().unwrap();
    // 65,450 bytes: a legal datagram, but the proxy's Via and Record-Route push the
    // forwarded copy past 65,507, the most one IPv4 UDP datagram carries.
    let mut hs = headers(me, "too-large", "INVITE");
    // A caller of another domain: not challenged, so the INVITE is forwarded.
    hs[1] = "From: <sip:caller@caller.example>;tag=f-too-large".into();
    hs.push("Content-Length: 0".into());
    let mut invite = request(&format!("INVITE sip:bob@{DOMAIN} SIP/2.0"), &hs, b"X-Pad: ");
    invite.resize(65_450 - 4, b'a');
    invite.extend_from_slice(b"\r\n\r\n");
    caller.send_to(&invite, &sip).unwrap();
    // RFC 3261 §18.1.1 would send it over TCP; failing that, the caller must learn at
    // once (513 Message Too Large, or a 5xx), not after Timer B (32 s).
    let mut buf = vec![0u8; 70_000];
    let final_code = wait_for("a final answer to the oversized INVITE", Duration::from_secs(5), || {
        let n = caller.recv(&mut buf).ok()?;
        Message::parse(&buf[..n], false).ok()?.0.code().filter(|c| *c >= 200)
    });
    assert!(final_code >= 500, "{final_code}");
}
