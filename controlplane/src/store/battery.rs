//! The behaviour every backend must show, as one function the unit tests (embedded,
//! memory) and the etcd integration test (tests/etcd.rs) all call, so a backend cannot
//! pass a weaker test of its own. Backend-specific matters (durability across reopening,
//! the memory backend's bounds, lease reuse) are tested next to each backend.

use super::{Binding, Clock, Store};
use std::time::{Duration, Instant};

/// How long a backend on the system clock may take to expire a dialog past its TTL
/// (etcd checks leases about every 500 ms and raises a TTL below its minimum, ~2 s).
const REAL_EXPIRY_BOUND: Duration = Duration::from_secs(30);

/// Runs the battery against `s`, a fresh store. `clock` is the clock `s` expires
/// dialogs by: a [`Clock::Manual`] is moved forward; on [`Clock::System`] the battery
/// polls, with a bound, until the backend has expired the dialog.
pub fn battery(s: &dyn Store, clock: &Clock) {
    users(s);
    bindings(s);
    flows(s);
    dialogs(s, clock);
}

fn users(s: &dyn Store) {
    use sip::digest::Secret;
    let ha1 = |pw: &str| Some(Secret::new("alice", "example.com", pw).encode());
    assert_eq!(s.secret("alice", "example.com").unwrap(), None);
    s.put_user("alice", "example.com", "pw1").unwrap();
    let stored = s.secret("alice", "example.com").unwrap();
    assert_eq!(stored, ha1("pw1"), "HA1s are kept");
    assert!(!stored.unwrap().contains("pw1"), "never the password");
    s.put_user("alice", "example.com", "pw2").unwrap();
    assert_eq!(s.secret("alice", "example.com").unwrap(), ha1("pw2"), "a change replaces");
    assert_eq!(s.secret("alice", "Example.COM").unwrap(), ha1("pw2"), "domains ignore case");
    assert_eq!(s.secret("alice", "example.org").unwrap(), None);
    assert_eq!(s.secret("bob", "example.com").unwrap(), None);
}

fn binding(contact: &str, expires_at: u64) -> Binding {
    Binding {
        contact: contact.into(),
        expires_at,
        path: vec!["<sip:edge1;lr>".into(), "<sip:edge2;lr>".into()],
        call_id: "r1@host".into(),
        cseq: 7,
        received: Some("192.0.2.1:5060".into()),
        instance: None,
        reg_id: None,
    }
}

fn bindings(s: &dyn Store) {
    let (a, b) = (binding("sip:a@1.2.3.4", 100), binding("sip:a@5.6.7.8;transport=tcp", 200));
    assert!(s.bindings("alice@example.com", 0).unwrap().is_empty());
    s.set_bindings("alice@example.com", &[a.clone(), b.clone()]).unwrap();
    assert_eq!(s.bindings("alice@example.com", 50).unwrap(), vec![a.clone(), b.clone()], "every field round-trips");
    assert_eq!(s.bindings("alice@example.com", 100).unwrap(), vec![b.clone()], "expired at its expiry");
    assert_eq!(s.bindings("alice@example.com", 150).unwrap(), vec![b.clone()]);
    assert!(s.bindings("alice@example.com", 200).unwrap().is_empty(), "all expired");
    assert!(s.bindings("bob@example.com", 0).unwrap().is_empty(), "AORs are apart");

    s.set_bindings("bob@example.com", std::slice::from_ref(&a)).unwrap();
    let c = Binding { cseq: 8, ..binding("sip:a@9.9.9.9", 300) };
    s.set_bindings("alice@example.com", std::slice::from_ref(&c)).unwrap();
    assert_eq!(s.bindings("alice@example.com", 50).unwrap(), vec![c], "a set replaces, not merges");
    assert_eq!(s.bindings("bob@example.com", 50).unwrap(), vec![a.clone()], "other AORs untouched");

    s.set_bindings("alice@example.com", &[]).unwrap();
    assert!(s.bindings("alice@example.com", 0).unwrap().is_empty(), "empty removes");
    s.set_bindings("nobody@example.com", &[]).unwrap();
    assert_eq!(s.bindings("bob@example.com", 50).unwrap(), vec![a]);
}

/// RFC 5626 bindings: one device (one `+sip.instance`) with two flows, each with its
/// own Path, next to a plain binding with the same Contact URI; every field
/// round-trips and the three stay apart.
fn flows(s: &dyn Store) {
    let instance = Some("<urn:uuid:00000000-0000-1000-8000-000a95a0e128>".to_string());
    let flow = |reg_id: u32, lb: &str| Binding {
        path: vec![format!("<sip:tok{reg_id}@{lb};lr;ob>")],
        instance: instance.clone(),
        reg_id: Some(reg_id),
        ..binding("sip:carol@198.51.100.4:5060;ob", 500)
    };
    let plain = binding("sip:carol@198.51.100.4:5060;ob", 400);
    let all = [flow(1, "192.0.2.10:5060"), flow(2, "192.0.2.11:5060"), plain.clone()];
    s.set_bindings("carol@example.com", &all).unwrap();
    assert_eq!(s.bindings("carol@example.com", 50).unwrap(), all.to_vec(), "instance and reg-id round-trip");
    assert_eq!(
        s.bindings("carol@example.com", 450).unwrap(),
        all[..2].to_vec(),
        "the plain binding expires alone; both flows stay"
    );
    s.set_bindings("carol@example.com", &all[1..2]).unwrap();
    let left = s.bindings("carol@example.com", 50).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!((left[0].reg_id, left[0].path[0].as_str()), (Some(2), "<sip:tok2@192.0.2.11:5060;lr;ob>"));
    s.set_bindings("carol@example.com", &[]).unwrap();
    assert!(s.bindings("carol@example.com", 0).unwrap().is_empty());
}

fn dialogs(s: &dyn Store, clock: &Clock) {
    assert_eq!(s.dialog("c1").unwrap(), None);
    s.put_dialog("c1", "ng://10.0.0.5:2223", 3600).unwrap();
    assert_eq!(s.dialog("c1").unwrap().as_deref(), Some("ng://10.0.0.5:2223"));
    s.put_dialog("c1", "http://10.0.0.6:8080", 3600).unwrap();
    assert_eq!(s.dialog("c1").unwrap().as_deref(), Some("http://10.0.0.6:8080"), "a put replaces");
    s.put_dialog("c2", "ng://10.0.0.7:2223", 3600).unwrap();
    s.delete_dialog("c1").unwrap();
    assert_eq!(s.dialog("c1").unwrap(), None, "deleted");
    assert_eq!(s.dialog("c2").unwrap().as_deref(), Some("ng://10.0.0.7:2223"), "other calls untouched");
    s.delete_dialog("never-recorded").unwrap();

    // A dialog refreshed with a longer TTL takes it, a short TTL runs out, a long one
    // does not. Two seconds: etcd's shortest lease.
    s.put_dialog("c2", "ng://10.0.0.7:2223", 2).unwrap();
    s.put_dialog("c2", "ng://10.0.0.7:2223", 3600).unwrap();
    s.put_dialog("short", "ng://10.0.0.8:2223", 2).unwrap();
    assert_eq!(s.dialog("short").unwrap().as_deref(), Some("ng://10.0.0.8:2223"));
    match clock {
        Clock::Manual(m) => {
            m.advance(1);
            assert_eq!(s.dialog("short").unwrap().as_deref(), Some("ng://10.0.0.8:2223"), "within its TTL");
            m.advance(1);
            assert_eq!(s.dialog("short").unwrap(), None, "expired at its TTL");
        }
        Clock::System => {
            let started = Instant::now();
            while s.dialog("short").unwrap().is_some() {
                assert!(started.elapsed() < REAL_EXPIRY_BOUND, "the dialog never expired");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert_eq!(s.dialog("c2").unwrap().as_deref(), Some("ng://10.0.0.7:2223"), "the refreshed TTL counts");
    s.put_dialog("short", "ng://10.0.0.9:2223", 3600).unwrap();
    assert_eq!(
        s.dialog("short").unwrap().as_deref(),
        Some("ng://10.0.0.9:2223"),
        "an expired call can be recorded again"
    );
}
