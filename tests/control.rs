//! The three ways to drive a relay — REST (`/v1/sessions`), rtpengine's NG protocol and
//! RTPproxy's text protocol — behind one trait, [`Control`], and one battery of session
//! scenarios that each of them must pass against a real `hasp relay`, with real RTP on
//! loopback: media both ways, re-signalling a side to a new address, statistics,
//! deletion, and unknown calls. A protocol cannot pass a weaker test of its own.
//!
//! REST's `GET /v1/sessions` is the common observer: a call set up over NG or RTPproxy
//! is one relay session like any other, and the battery checks that it is the session
//! the protocol described (leg 0 the caller, leg 1 the callee, the advertised ports).

mod common;

use common::*;
use controlplane::control::ng::bencode::{decode, Value};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Tags of the caller (A, leg 0) and the callee (B, leg 1) for the call-based protocols.
const TAGS: [&str; 2] = ["caller-tag", "callee-tag"];

/// A cookie no other request to the same relay carried: the NG reply cache answers by
/// cookie alone (as rtpengine's does), whichever client asks.
fn cookie() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!("ctl{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One side of a call: A set it up (the caller, leg 0), B answered (the callee, leg 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A = 0,
    B = 1,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Where each side must send its RTP: the relay addresses the protocol advertised to it
/// (`[A's, B's]`). Media sent to A's comes out of B's, and back.
type Legs = [SocketAddr; 2];

/// What a protocol reports about a call's RTP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// Packets the relay received from A (leg 0) and from B (leg 1), dropped ones included.
    from: [u64; 2],
    /// Packets forwarded to the far side, where the protocol reports it.
    relayed: Option<u64>,
    /// Packets received but not forwarded.
    dropped: u64,
}

/// The relay answered that it does not know the call, in the protocol's words.
#[derive(Debug)]
struct Unknown(#[allow(dead_code)] String);

/// A way to drive a relay, in the terms SIP signalling uses: a call between two sides.
trait Control {
    /// The protocol's name, for messages.
    fn name(&self) -> &'static str;
    /// Sets up `call` between A at `a` and B at `b` (what a proxy does on the INVITE and
    /// its 200 OK); answers where each side must send.
    fn create(&mut self, call: &str, a: SocketAddr, b: SocketAddr) -> Legs;
    /// `side` now receives its media at `to` (a re-INVITE from that side and the other
    /// side's answer); answers where each side must send.
    fn update_remote(&mut self, call: &str, side: Side, to: SocketAddr) -> Legs;
    /// The call's statistics.
    fn query(&mut self, call: &str) -> Result<Counts, Unknown>;
    /// Ends the call; answers its final statistics where the protocol has them.
    fn delete(&mut self, call: &str) -> Result<Option<Counts>, Unknown>;
}

// --- REST -----------------------------------------------------------------------------

/// `/v1/sessions`: a session per call, its remotes set directly.
struct Rest<'r> {
    relay: &'r RelayProc,
    ids: HashMap<String, String>,
}

impl<'r> Rest<'r> {
    /// A well-formed session id the relay never issued (ids are random 64-bit numbers).
    const NEVER_ISSUED: &'static str = "ffffffffffffffff";

    fn new(relay: &'r RelayProc) -> Self {
        Self { relay, ids: HashMap::new() }
    }

    /// The session id of `call`; a call never created maps to an id never issued, so a
    /// deleted call and an unknown one both reach the relay's lookup.
    fn id(&self, call: &str) -> String {
        self.ids.get(call).cloned().unwrap_or_else(|| Self::NEVER_ISSUED.to_string())
    }

    /// A 200 answer's body, or [`Unknown`] for a 404 `not_found`; anything else fails.
    fn answer(what: &str, (status, v): (u16, Json)) -> Result<Json, Unknown> {
        match status {
            200 => Ok(v),
            404 => {
                assert_eq!(v["code"], "not_found", "{what}: {v}");
                Err(Unknown(format!("404 {v}")))
            }
            _ => panic!("{what}: {status} {v}"),
        }
    }

    fn legs(v: &Json) -> Legs {
        let ip: IpAddr = v["address"].as_str().expect("address").parse().expect("an IP address");
        let port = |l: usize| v["legs"][l]["rtp_port"].as_u64().expect("rtp_port") as u16;
        [SocketAddr::new(ip, port(0)), SocketAddr::new(ip, port(1))]
    }

    fn counts(v: &Json) -> Counts {
        let rtp = |l: usize| &v["legs"][l]["stats"]["rtp"];
        let num = |x: &Json| x.as_u64().unwrap_or(0);
        let drops = |l: usize| rtp(l)["drops"].as_object().map(|d| d.values().map(num).sum()).unwrap_or(0);
        Counts {
            from: [num(&rtp(0)["packets"]), num(&rtp(1)["packets"])],
            relayed: Some(num(&rtp(0)["forwarded"]) + num(&rtp(1)["forwarded"])),
            dropped: drops(0) + drops(1),
        }
    }
}

impl Control for Rest<'_> {
    fn name(&self) -> &'static str {
        "REST"
    }

    fn create(&mut self, call: &str, a: SocketAddr, b: SocketAddr) -> Legs {
        let body = format!(r#"{{"legs":[{{"remote":"{a}"}},{{"remote":"{b}"}}]}}"#);
        let (status, v) = self.relay.call("POST", "/v1/sessions", Some(&body));
        assert_eq!(status, 201, "create: {v}");
        self.ids.insert(call.to_string(), v["id"].as_str().expect("id").to_string());
        Self::legs(&v)
    }

    fn update_remote(&mut self, call: &str, side: Side, to: SocketAddr) -> Legs {
        let body = match side {
            Side::A => format!(r#"{{"legs":[{{"remote":"{to}"}}]}}"#),
            Side::B => format!(r#"{{"legs":[{{}},{{"remote":"{to}"}}]}}"#),
        };
        let path = format!("/v1/sessions/{}", self.id(call));
        let v = Self::answer("PATCH", self.relay.call("PATCH", &path, Some(&body))).expect("the session exists");
        Self::legs(&v)
    }

    fn query(&mut self, call: &str) -> Result<Counts, Unknown> {
        let path = format!("/v1/sessions/{}", self.id(call));
        Self::answer("GET", self.relay.call("GET", &path, None)).map(|v| Self::counts(&v))
    }

    fn delete(&mut self, call: &str) -> Result<Option<Counts>, Unknown> {
        let path = format!("/v1/sessions/{}", self.id(call));
        Self::answer("DELETE", self.relay.call("DELETE", &path, None)).map(|v| Some(Self::counts(&v)))
    }
}

// --- NG -------------------------------------------------------------------------------

/// rtpengine's NG protocol over UDP: offer/answer with SDP, query, delete.
struct Ng {
    sock: UdpSocket,
    to: String,
    /// Each side's current media address per call, for the answers of re-offers.
    calls: HashMap<String, [SocketAddr; 2]>,
    /// `o=` version: every SDP sent is a new one.
    version: u64,
}

impl Ng {
    fn new(to: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Self { sock, to: to.to_string(), calls: HashMap::new(), version: 0 }
    }

    /// Sends one request and returns the answer; retransmits under the same cookie, which
    /// the relay answers from its reply cache, as an NG client does.
    fn request(&mut self, items: Vec<(&str, Value)>) -> Value {
        let cookie = cookie();
        let mut msg = format!("{cookie} ").into_bytes();
        Value::dict(items).encode_to(&mut msg);
        let mut buf = vec![0u8; 65536];
        for _ in 0..3 {
            self.sock.send_to(&msg, self.to.as_str()).unwrap();
            let Ok(n) = self.sock.recv(&mut buf) else { continue };
            let body = buf[..n].strip_prefix(format!("{cookie} ").as_bytes()).expect("the answer carries our cookie");
            return decode(body).expect("a bencoded answer").0;
        }
        panic!("no NG answer from {}", self.to)
    }

    fn sdp(&mut self, media: SocketAddr) -> String {
        self.version += 1;
        let (ip, port, v) = (media.ip(), media.port(), self.version);
        format!("v=0\r\no=- 1 {v} IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
    }

    /// The SDP of an `ok` answer.
    fn ok_sdp(what: &str, r: &Value) -> String {
        assert_eq!(r.get("result").and_then(Value::as_str), Some("ok"), "{what}: {r:?}");
        r.get("sdp").and_then(Value::as_str).expect("an SDP in the answer").to_string()
    }

    /// The address an SDP tells its receiver to send to: `c=` and the audio `m=` port.
    fn advertised(sdp: &str) -> SocketAddr {
        let ip = sdp.lines().find_map(|l| l.strip_prefix("c=IN IP4 ")).expect("c= line").trim();
        let port = sdp
            .lines()
            .find_map(|l| l.strip_prefix("m=audio "))
            .and_then(|m| m.split(' ').next())
            .expect("m=audio line");
        format!("{ip}:{port}").parse().expect("an address in the SDP")
    }

    /// An offer from `side` (with the other's tag once the dialog exists) and the other
    /// side's answer, each side's SDP carrying its address in `at`.
    fn offer_answer(&mut self, call: &str, side: Side, in_dialog: bool, at: [SocketAddr; 2]) -> Legs {
        let (s, o) = (side as usize, side.other() as usize);
        let mut offer =
            vec![("command", Value::str("offer")), ("call-id", Value::str(call)), ("from-tag", Value::str(TAGS[s]))];
        if in_dialog {
            offer.push(("to-tag", Value::str(TAGS[o])));
        }
        offer.push(("sdp", Value::str(self.sdp(at[s]))));
        // The offer's rewritten SDP goes to the other side: where it must send.
        let mut legs = at;
        legs[o] = Self::advertised(&Self::ok_sdp("offer", &self.request(offer)));
        let answer = vec![
            ("command", Value::str("answer")),
            ("call-id", Value::str(call)),
            ("from-tag", Value::str(TAGS[s])),
            ("to-tag", Value::str(TAGS[o])),
            ("sdp", Value::str(self.sdp(at[o]))),
        ];
        legs[s] = Self::advertised(&Self::ok_sdp("answer", &self.request(answer)));
        self.calls.insert(call.to_string(), at);
        legs
    }

    /// rtpengine's statistics of a query or delete answer: per tag, the packets its
    /// first media stream received; errors over both.
    fn counts(r: &Value) -> Counts {
        let received = |tag: &str| {
            r.get("tags")
                .and_then(|t| t.get(tag))
                .and_then(|t| t.get("medias"))
                .and_then(Value::as_list)
                .and_then(|m| m.first())
                .and_then(|m| m.get("streams"))
                .and_then(Value::as_list)
                .and_then(|s| s.first())
                .and_then(|s| s.get("stats"))
                .and_then(|s| s.get("packets"))
                .and_then(Value::as_int)
                .unwrap_or(0) as u64
        };
        let errors = r
            .get("totals")
            .and_then(|t| t.get("RTP"))
            .and_then(|t| t.get("errors"))
            .and_then(Value::as_int)
            .expect("totals.RTP.errors") as u64;
        Counts { from: [received(TAGS[0]), received(TAGS[1])], relayed: None, dropped: errors }
    }

    /// [`Ng::counts`] of an `ok` answer, or [`Unknown`] for `result: error` naming the call.
    fn answer(what: &str, r: &Value) -> Result<Counts, Unknown> {
        match r.get("result").and_then(Value::as_str) {
            Some("ok") => Ok(Self::counts(r)),
            Some("error") => {
                let reason = r.get("error-reason").and_then(Value::as_str).unwrap_or_default();
                assert!(reason.contains("Unknown call-id"), "{what}: {r:?}");
                Err(Unknown(reason.to_string()))
            }
            _ => panic!("{what}: {r:?}"),
        }
    }
}

impl Control for Ng {
    fn name(&self) -> &'static str {
        "NG"
    }

    fn create(&mut self, call: &str, a: SocketAddr, b: SocketAddr) -> Legs {
        self.offer_answer(call, Side::A, false, [a, b])
    }

    fn update_remote(&mut self, call: &str, side: Side, to: SocketAddr) -> Legs {
        let mut at = self.calls[call];
        at[side as usize] = to;
        self.offer_answer(call, side, true, at)
    }

    fn query(&mut self, call: &str) -> Result<Counts, Unknown> {
        let r = self.request(vec![
            ("command", Value::str("query")),
            ("call-id", Value::str(call)),
            ("from-tag", Value::str(TAGS[0])),
        ]);
        Self::answer("query", &r)
    }

    /// With the `fatal` flag: without it rtpengine (and hasp) answer a delete of an
    /// unknown call `ok` with a warning, which the NG test checks on its own.
    fn delete(&mut self, call: &str) -> Result<Option<Counts>, Unknown> {
        let r = self.request(vec![
            ("command", Value::str("delete")),
            ("call-id", Value::str(call)),
            ("from-tag", Value::str(TAGS[0])),
            ("flags", Value::List(vec![Value::str("fatal")])),
        ]);
        Self::answer("delete", &r).map(Some)
    }
}

// --- RTPproxy -------------------------------------------------------------------------

/// RTPproxy's text protocol over UDP: `U` on the offer, `L` on the answer, `Q`, `D`.
struct Rtpp {
    sock: UdpSocket,
    to: String,
    /// Each side's current media address per call, for the answers of re-offers.
    calls: HashMap<String, [SocketAddr; 2]>,
}

impl Rtpp {
    fn new(to: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Self { sock, to: to.to_string(), calls: HashMap::new() }
    }

    /// One command, cookie-prefixed; the answer without cookie and newline.
    fn ask(&mut self, command: &str) -> String {
        let cookie = cookie();
        self.sock.send_to(format!("{cookie} {command}").as_bytes(), self.to.as_str()).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).unwrap_or_else(|e| panic!("no RTPproxy answer to {command:?}: {e}"));
        let text = std::str::from_utf8(&buf[..n]).expect("a text answer");
        text.strip_prefix(&format!("{cookie} ")).expect("the answer carries our cookie").trim_end().to_string()
    }

    /// A `U`/`L` answer, `port address`: where the other side of the sender must send.
    fn port_answer(command: &str, answer: &str) -> SocketAddr {
        let (port, ip) = answer.split_once(' ').unwrap_or_else(|| panic!("{command}: {answer}"));
        SocketAddr::new(ip.parse().expect("an IP address"), port.parse().expect("a port"))
    }

    /// `U` from `side` (with the other's tag once the dialog exists), then `L` with the
    /// other side's address, as the rtpproxy module sends on a request and its reply.
    fn offer_answer(&mut self, call: &str, side: Side, in_dialog: bool, at: [SocketAddr; 2]) -> Legs {
        let (s, o) = (side as usize, side.other() as usize);
        let tags = if in_dialog { format!("{} {}", TAGS[s], TAGS[o]) } else { TAGS[s].to_string() };
        let u = format!("U {call} {} {} {tags}", at[s].ip(), at[s].port());
        let mut legs = at;
        legs[o] = Self::port_answer(&u, &self.ask(&u));
        let l = format!("L {call} {} {} {} {}", at[o].ip(), at[o].port(), TAGS[s], TAGS[o]);
        legs[s] = Self::port_answer(&l, &self.ask(&l));
        self.calls.insert(call.to_string(), at);
        legs
    }

    /// `E8` (no such session) as [`Unknown`]; any other error fails.
    fn known(command: &str, answer: String) -> Result<String, Unknown> {
        match answer.as_str() {
            "E8" => Err(Unknown(answer)),
            a if a.starts_with('E') => panic!("{command}: {a}"),
            _ => Ok(answer),
        }
    }
}

impl Control for Rtpp {
    fn name(&self) -> &'static str {
        "RTPproxy"
    }

    fn create(&mut self, call: &str, a: SocketAddr, b: SocketAddr) -> Legs {
        self.offer_answer(call, Side::A, false, [a, b])
    }

    fn update_remote(&mut self, call: &str, side: Side, to: SocketAddr) -> Legs {
        let mut at = self.calls[call];
        at[side as usize] = to;
        self.offer_answer(call, side, true, at)
    }

    /// `Q` answers `ttl from-caller from-callee relayed dropped`.
    fn query(&mut self, call: &str) -> Result<Counts, Unknown> {
        let q = format!("Q {call} {} {}", TAGS[0], TAGS[1]);
        let answer = Self::known(&q, self.ask(&q))?;
        let n: Vec<u64> = answer.split_whitespace().map(|x| x.parse().expect("a number")).collect();
        assert_eq!(n.len(), 5, "{q}: {answer}");
        Ok(Counts { from: [n[1], n[2]], relayed: Some(n[3]), dropped: n[4] })
    }

    /// `D` answers `0`: no statistics.
    fn delete(&mut self, call: &str) -> Result<Option<Counts>, Unknown> {
        let d = format!("D {call} {} {}", TAGS[0], TAGS[1]);
        let answer = Self::known(&d, self.ask(&d))?;
        assert_eq!(answer, "0", "{d}");
        Ok(None)
    }
}

// --- media ----------------------------------------------------------------------------

fn addr(s: &UdpSocket) -> SocketAddr {
    s.local_addr().unwrap()
}

/// RTP senders: one SSRC per socket, sequence numbers counting up.
#[derive(Default)]
struct Rtp {
    seqs: HashMap<SocketAddr, u16>,
}

impl Rtp {
    fn packet(&mut self, from: &UdpSocket) -> Vec<u8> {
        let me = addr(from);
        let seq = self.seqs.entry(me).or_default();
        *seq += 1;
        rtp(*seq, u32::from(me.port()) << 8, me.port() as u8)
    }

    /// Sends `n` packets from `src` to the relay at `via`; `dst` must receive each of
    /// them unchanged, from the relay address `out` (symmetric RTP).
    fn flows(&mut self, what: &str, src: &UdpSocket, via: SocketAddr, dst: &UdpSocket, out: SocketAddr, n: usize) {
        let sent: Vec<Vec<u8>> = (0..n).map(|_| self.packet(src)).collect();
        for p in &sent {
            src.send_to(p, via).unwrap();
        }
        for p in &sent {
            let (got, from) = recv(dst);
            assert_eq!((&got, from), (p, out), "{what}: relayed unchanged from the advertised port");
        }
    }

    /// Sends one packet from `src` to `via` that must not be relayed to `dst`.
    fn dropped(&mut self, what: &str, src: &UdpSocket, via: SocketAddr, dst: &UdpSocket) {
        src.send_to(&self.packet(src), via).unwrap();
        nothing_arrives(what, dst);
    }
}

/// Nothing reaches `s` for a while (ICMP errors of earlier sends aside).
fn nothing_arrives(what: &str, s: &UdpSocket) {
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut buf = [0u8; 2048];
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        s.set_read_timeout(Some(left)).unwrap();
        match s.recv_from(&mut buf) {
            Ok((n, from)) => panic!("{what}: {n} bytes arrived from {from}"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(_) => {}
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
}

// --- the battery ----------------------------------------------------------------------

/// The relay session (as `GET /v1/sessions` lists it) whose legs have these RTP ports.
fn session_of(relay: &RelayProc, legs: Legs) -> Option<Json> {
    let (status, v) = relay.call("GET", "/v1/sessions", None);
    assert_eq!(status, 200, "{v}");
    v["sessions"].as_array().expect("sessions").iter().find(|s| ports_of(s) == legs.map(|l| l.port())).cloned()
}

fn ports_of(s: &Json) -> [u16; 2] {
    [0, 1].map(|l| s["legs"][l]["rtp_port"].as_u64().unwrap_or(0) as u16)
}

fn remotes_of(s: &Json) -> [String; 2] {
    [0, 1].map(|l| s["legs"][l]["remote"].as_str().unwrap_or("none").to_string())
}

fn port_pairs_free(relay: &RelayProc) -> (u64, u64) {
    (relay.metric("hasp_relay_port_pairs_free"), relay.metric("hasp_relay_port_pairs_total"))
}

/// The scenarios every way of driving a relay must pass. `relay` must be this test's
/// own, with no other sessions: the battery checks that every port pair comes back.
fn battery(ctl: &mut dyn Control, relay: &RelayProc) {
    let name = ctl.name();
    let mut rtp = Rtp::default();
    let call = "battery-call";

    // 1. A call between A and B: RTP both ways through the advertised ports, and REST
    //    shows the session the protocol described.
    let mut at = [udp(), udp()];
    let legs = ctl.create(call, addr(&at[0]), addr(&at[1]));
    assert_ne!(legs[0], legs[1], "{name}: two legs");
    let session = session_of(relay, legs).unwrap_or_else(|| panic!("{name}: no session with ports {legs:?}"));
    let id = session["id"].as_str().expect("id").to_string();
    assert_eq!(remotes_of(&session), at.each_ref().map(|s| addr(s).to_string()), "{name}: leg 0 is A, leg 1 is B");
    rtp.flows(&format!("{name}: A→B"), &at[0], legs[0], &at[1], legs[1], 5);
    rtp.flows(&format!("{name}: B→A"), &at[1], legs[1], &at[0], legs[0], 5);
    let mut want = Counts { from: [5, 5], relayed: Some(10), dropped: 0 };
    // A protocol without a count of relayed packets (NG) is not held to one.
    let expect = |want: Counts, got: Counts| Counts { relayed: got.relayed.and(want.relayed), ..want };

    // 3. Statistics count what was relayed.
    let got = ctl.query(call).unwrap_or_else(|e| panic!("{name}: query: {e:?}"));
    assert_eq!(got, expect(want, got), "{name}: query after the first exchange");

    // 2. Re-signalling a side to a new socket (the callee first, then the caller): the
    //    ports stay, media goes to the new socket, the old one is neither sent to nor
    //    listened to any more.
    for side in [Side::B, Side::A] {
        let (s, o) = (side as usize, side.other() as usize);
        let moved = udp();
        let again = ctl.update_remote(call, side, addr(&moved));
        assert_eq!(again, legs, "{name}: re-signalling {side:?} keeps the ports");
        let old = std::mem::replace(&mut at[s], moved);
        let session = session_of(relay, legs).expect("the session");
        assert_eq!(remotes_of(&session), at.each_ref().map(|x| addr(x).to_string()), "{name}: {side:?} moved");
        rtp.flows(&format!("{name}: to {side:?}'s new socket"), &at[o], legs[o], &at[s], legs[s], 3);
        nothing_arrives(&format!("{name}: {side:?}'s old socket after re-signalling"), &old);
        rtp.flows(&format!("{name}: from {side:?}'s new socket"), &at[s], legs[s], &at[o], legs[o], 3);
        rtp.dropped(&format!("{name}: {side:?}'s old socket latched out"), &old, legs[s], &at[o]);
        want.from[o] += 3;
        want.from[s] += 4;
        want.relayed = want.relayed.map(|r| r + 6);
        want.dropped += 1;
        let got = ctl.query(call).unwrap_or_else(|e| panic!("{name}: query: {e:?}"));
        assert_eq!(got, expect(want, got), "{name}: query after re-signalling {side:?}");
    }

    // 4. Delete: final statistics where the protocol has them; the session is gone, its
    //    ports are no longer relayed and return to the pool.
    let final_counts = ctl.delete(call).unwrap_or_else(|e| panic!("{name}: delete: {e:?}"));
    if let Some(got) = final_counts {
        assert_eq!(got, expect(want, got), "{name}: final statistics");
    }
    assert_eq!(relay.call("GET", &format!("/v1/sessions/{id}"), None).0, 404, "{name}: deleted");
    assert!(session_of(relay, legs).is_none(), "{name}: not listed after delete");
    rtp.dropped(&format!("{name}: A to a deleted session"), &at[0], legs[0], &at[1]);
    rtp.dropped(&format!("{name}: B to a deleted session"), &at[1], legs[1], &at[0]);
    wait_for(&format!("{name}: the ports to return"), Duration::from_secs(5), || {
        let (free, total) = port_pairs_free(relay);
        (free == total).then_some(())
    });

    // 5. Unknown calls, deleted or never created, get the protocol's error; the relay
    //    keeps serving.
    for unknown in [call, "never-created"] {
        assert!(ctl.query(unknown).is_err(), "{name}: query of {unknown}");
        assert!(ctl.delete(unknown).is_err(), "{name}: delete of {unknown}");
    }
    let next = [udp(), udp()];
    let legs = ctl.create("next-call", addr(&next[0]), addr(&next[1]));
    rtp.flows(&format!("{name}: A→B after errors"), &next[0], legs[0], &next[1], legs[1], 1);
    rtp.flows(&format!("{name}: B→A after errors"), &next[1], legs[1], &next[0], legs[0], 1);
    ctl.delete("next-call").unwrap_or_else(|e| panic!("{name}: delete: {e:?}"));
    assert_eq!(relay.call("GET", "/v1/sessions", None).1["count"], 0, "{name}: no session left");
}

/// A relay with all three control listeners on its own slice of the port range. A latch
/// never moves on silence alone, so that an old socket's packet is dropped however slow
/// the machine is between it and the new socket's last one.
fn relay(ports: &str) -> RelayProc {
    RelayProc::start(&[
        "--rtp-ports",
        ports,
        "--listen-ng",
        "127.0.0.1:0",
        "--listen-rtpp",
        "127.0.0.1:0",
        "--relatch-idle-ms",
        "0",
    ])
}

#[test]
fn rest_passes_the_control_battery() {
    let relay = relay("46700-46749");
    battery(&mut Rest::new(&relay), &relay);
}

#[test]
fn ng_passes_the_control_battery() {
    let relay = relay("46750-46799");
    let ng = field(&relay.ready_line, "ng=");
    battery(&mut Ng::new(&ng), &relay);
    // What a proxy's plain delete of an unknown call gets: rtpengine's `ok` with a
    // warning (the battery asks with `fatal` for the error).
    let r = Ng::new(&ng).request(vec![("command", Value::str("delete")), ("call-id", Value::str("never-created"))]);
    assert_eq!(r.get("result").and_then(Value::as_str), Some("ok"), "{r:?}");
    assert!(r.get("warning").and_then(Value::as_str).is_some_and(|w| w.contains("not found")), "{r:?}");
}

#[test]
fn rtpproxy_passes_the_control_battery() {
    let relay = relay("46800-46849");
    let rtpp = field(&relay.ready_line, "rtpp=");
    battery(&mut Rtpp::new(&rtpp), &relay);
}

/// The three front ends on one relay at once: each call is its own session, and ending
/// one leaves the others relaying.
#[test]
fn one_relay_serves_the_three_at_once() {
    let relay = relay("46850-46899");
    let mut ctls: Vec<Box<dyn Control + '_>> = vec![
        Box::new(Rest::new(&relay)),
        Box::new(Ng::new(&field(&relay.ready_line, "ng="))),
        Box::new(Rtpp::new(&field(&relay.ready_line, "rtpp="))),
    ];
    let mut rtp = Rtp::default();
    // NG and RTPproxy share one registry of calls, so each protocol gets its own Call-ID.
    let call = |ctl: &dyn Control| format!("side-by-side-{}", ctl.name());
    let calls: Vec<([UdpSocket; 2], Legs)> = ctls
        .iter_mut()
        .map(|ctl| {
            let at = [udp(), udp()];
            let legs = ctl.create(&call(ctl.as_ref()), addr(&at[0]), addr(&at[1]));
            (at, legs)
        })
        .collect();
    let ports: Vec<u16> = calls.iter().flat_map(|(_, legs)| legs.map(|l| l.port())).collect();
    assert!(ports.iter().enumerate().all(|(i, p)| !ports[..i].contains(p)), "no port shared: {ports:?}");
    for ended in 0..calls.len() {
        assert_eq!(relay.call("GET", "/v1/sessions", None).1["count"], calls.len() - ended);
        for ((at, legs), ctl) in calls[ended..].iter().zip(&ctls[ended..]) {
            let what = format!("{} with {ended} call(s) ended", ctl.name());
            rtp.flows(&format!("{what}: A→B"), &at[0], legs[0], &at[1], legs[1], 2);
            rtp.flows(&format!("{what}: B→A"), &at[1], legs[1], &at[0], legs[0], 2);
        }
        let ctl = &mut ctls[ended];
        let c = call(ctl.as_ref());
        ctl.delete(&c).unwrap_or_else(|e| panic!("{}: delete: {e:?}", ctl.name()));
    }
    assert_eq!(relay.call("GET", "/v1/sessions", None).1["count"], 0);
}
