//! The SIP proxy is not an open relay, and its digest authentication cannot be replayed:
//! attacks tried from outside against the real `hasp up`, with SIP user agents on real
//! sockets.

mod common;

use common::ua::*;
use common::*;
use sip::Message;
use std::time::Duration;

/// A request the test writes by hand: `method` for `uri` from `from` (an AOR).
fn request(ua: &Ua, method: &str, uri: &str, from: &str, id: &str) -> String {
    let me = ua.addr();
    format!(
        "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{id}\r\nFrom: <sip:{from}>;tag=t-{id}\r\nTo: <{uri}>\r\nCall-ID: {id}\r\nCSeq: 1 {method}\r\nContact: <sip:x@{me}>\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The first request `ua` receives.
fn next_request(ua: &Ua) -> Message {
    let m = ua.recv_within(Duration::from_secs(5)).expect("a request");
    assert!(m.code().is_none(), "a request, not {m:?}");
    m
}

/// A stranger asks the proxy to carry an INVITE (and a MESSAGE, and an INVITE routed
/// through a foreign Route) to a host elsewhere: 403 Not relaying, and the target gets
/// nothing. A request of the same stranger for one of our users (an incoming call) is
/// still delivered — it is the first thing the target sees, so nothing came before it.
#[test]
fn foreign_domain_from_stranger_is_403_and_nothing_is_sent() {
    let (up, sip, _) = up_with_sip(DOMAIN, "47900-47929", "sec-relay");
    let (eve, victim) = (Ua::new(), Ua::new());
    let elsewhere = format!("sip:victim@{}", victim.addr());
    for (n, method) in ["INVITE", "MESSAGE", "OPTIONS"].iter().enumerate() {
        eve.send(&sip, &request(&eve, method, &elsewhere, "eve@evil.example", &format!("relay-{n}")));
        let r = eve.recv_final(Duration::from_secs(5));
        let reason = match &r.start {
            sip::message::StartLine::Response { reason, .. } => reason.clone(),
            _ => String::new(),
        };
        assert_eq!((r.code(), reason.as_str()), (Some(403), "Not relaying"), "{method}: {r:?}");
    }
    let routed = request(&eve, "INVITE", &format!("sip:bob@{DOMAIN}"), "eve@evil.example", "relay-route")
        .replace("Max-Forwards: 70\r\n", &format!("Route: <sip:{};lr>\r\nMax-Forwards: 70\r\n", victim.addr()));
    eve.send(&sip, &routed);
    assert_eq!(eve.recv_final(Duration::from_secs(5)).code(), Some(403));
    // The barrier: the victim is also one of our users; a request for it through us
    // is delivered, and is the first thing it receives.
    add_sip_user(&up, "victim", DOMAIN, "pw");
    assert_eq!(sip_register(&sip, DOMAIN, "victim", "pw", &elsewhere, 600), 200);
    eve.send(&sip, &request(&eve, "MESSAGE", &format!("sip:victim@{DOMAIN}"), "eve@evil.example", "barrier"));
    assert_eq!(next_request(&victim).call_id(), "barrier", "nothing reached the victim before");
    assert_eq!(up.metric("hasp_sip_not_relayed_total"), 4);
}

/// A caller claiming to be one of our users is challenged (407) before anything is
/// looked up or forwarded; with alice's credentials the call reaches bob, without them;
/// with someone else's credentials it is refused.
#[test]
fn unauthenticated_local_invite_is_challenged() {
    let (up, sip, _) = up_with_sip(DOMAIN, "47930-47959", "sec-local");
    add_sip_user(&up, "alice", DOMAIN, "wonderland");
    add_sip_user(&up, "bob", DOMAIN, "builder");
    add_sip_user(&up, "mallory", DOMAIN, "evil");
    let (alice, bob) = (Ua::new(), Ua::new());
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &format!("sip:bob@{}", bob.addr()), 600), 200);
    let inv = invite_as(&alice, &format!("alice@{DOMAIN}"), &format!("bob@{DOMAIN}"), "local-1", 9);
    alice.send(&sip, &inv);
    let challenge = alice.recv_final(Duration::from_secs(5));
    assert_eq!(challenge.code(), Some(407), "{challenge:?}");
    assert!(challenge.header("Proxy-Authenticate").is_some_and(|h| h.contains(&format!("realm=\"{DOMAIN}\""))));
    alice.send(&sip, &ack_for(&inv, &challenge));
    // Someone else's credentials for alice's From: refused.
    let wrong = with_credentials(&inv, &challenge, "mallory", "evil", 1);
    alice.send(&sip, &wrong);
    let r = alice.recv_final(Duration::from_secs(5));
    assert_eq!(r.code(), Some(403), "{r:?}");
    alice.send(&sip, &ack_for(&wrong, &r));
    // Her own: the INVITE reaches bob (the first thing he receives), credentials removed.
    let good = with_credentials(&inv, &challenge, "alice", "wonderland", 2);
    alice.send(&sip, &good);
    let got = next_request(&bob);
    assert_eq!((got.method(), got.call_id()), ("INVITE", "local-1"));
    assert!(got.header("Proxy-Authorization").is_none(), "{got:?}");
    assert!(up.metric("hasp_sip_challenged_total") >= 1);
    // Bob declines; the proxy relays it and the call ends.
    let busy = got.response(486, "Busy Here", Some("b"));
    bob.sock.send_to(&busy.to_bytes(), &sip).unwrap();
    assert_eq!(alice.recv_final(Duration::from_secs(5)).code(), Some(486));
}

/// Joining a conference room takes an authenticated local user: a stranger's INVITE
/// to `conf-<room>` is challenged and no room is made; with credentials it joins.
#[test]
fn unauthenticated_conference_join_is_challenged() {
    let (up, sip, _) = up_with_sip(DOMAIN, "47960-47979", "sec-conf");
    add_sip_user(&up, "carol", DOMAIN, "sings");
    let eve = Ua::new();
    let inv = invite_as(&eve, "eve@evil.example", &format!("conf-board@{DOMAIN}"), "conf-1", 9);
    eve.send(&sip, &inv);
    let challenge = eve.recv_final(Duration::from_secs(5));
    assert_eq!(challenge.code(), Some(407), "{challenge:?}");
    eve.send(&sip, &ack_for(&inv, &challenge));
    let (_, v) = up.call("GET", "/v1/conferences", None);
    assert_eq!(v["conferences"].as_array().map(Vec::len), Some(0), "no room for a stranger: {v}");
    eve.send(&sip, &with_credentials(&inv, &challenge, "carol", "sings", 1));
    let ok = eve.recv_final(Duration::from_secs(5));
    assert_eq!(ok.code(), Some(200), "{ok:?}");
    let (_, v) = up.call("GET", "/v1/conferences", None);
    assert_eq!(v["conferences"].as_array().map(Vec::len), Some(1), "{v}");
}

/// A REGISTER captured on the wire and sent again — with the attacker's contact in it —
/// is challenged again (`401 … stale=true`) and changes nothing: calls still reach the
/// registered phone.
#[test]
fn replayed_register_is_stale() {
    let (up, sip, _) = up_with_sip(DOMAIN, "47980-47999", "sec-replay");
    add_sip_user(&up, "bob", DOMAIN, "builder");
    let (phone, attacker, caller) = (Ua::new(), Ua::new(), Ua::new());
    let me = phone.addr();
    let reg = format!(
        "REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-reg1\r\nFrom: <sip:bob@{DOMAIN}>;tag=r1\r\nTo: <sip:bob@{DOMAIN}>\r\nCall-ID: reg-replay\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@{me}>\r\nExpires: 600\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    phone.send(&sip, &reg);
    let challenge = phone.recv_final(Duration::from_secs(5));
    assert_eq!(challenge.code(), Some(401));
    let authorized = with_credentials(&reg, &challenge, "bob", "builder", 1);
    phone.send(&sip, &authorized);
    assert_eq!(phone.recv_final(Duration::from_secs(5)).code(), Some(200));
    // The replay: the same credentials, a new transaction, the attacker's contact.
    let replay = authorized
        .replace("branch=z9hG4bK-1a-reg1", "branch=z9hG4bK-replayed")
        .replace(&format!("Contact: <sip:bob@{me}>"), &format!("Contact: <sip:bob@{}>", attacker.addr()))
        .replace(&me.to_string(), &attacker.addr().to_string());
    attacker.send(&sip, &replay);
    let r = attacker.recv_final(Duration::from_secs(5));
    assert_eq!(r.code(), Some(401), "{r:?}");
    assert!(r.header("WWW-Authenticate").is_some_and(|h| h.contains("stale=true")), "{r:?}");
    assert_eq!(up.metric("hasp_sip_digest_replays_total"), 1);
    // Calls still go to the phone, never to the attacker.
    caller.send(&sip, &request(&caller, "MESSAGE", &format!("sip:bob@{DOMAIN}"), "c@caller.example", "after"));
    assert_eq!(next_request(&phone).call_id(), "after");
    assert!(attacker.nothing_yet(), "the attacker got bob's request");
}
