//! The test battery every membership backend passes (run by the backends' tests:
//! `tests/cluster.rs` against `local` and a 3-node etcd).

use super::{Load, Member, Membership, Role, View};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Waits until the view satisfies `ok`, at most `within`; panics naming `what`.
async fn until(view: &mut watch::Receiver<View>, what: &str, within: Duration, ok: impl Fn(&View) -> bool) -> View {
    let r = tokio::time::timeout(within, async {
        loop {
            {
                let v = view.borrow_and_update();
                if ok(&v) {
                    return v.clone();
                }
            }
            if view.changed().await.is_err() {
                panic!("{what}: the view's sender is gone");
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("{what}: not within {within:?}; last view {:?}", view.borrow().members))
}

/// Runs the battery against `m`. `tag` makes member ids unique per run, so backends
/// shared between runs (one etcd) do not see each other's members.
pub async fn battery(m: Arc<dyn Membership>, tag: &str) {
    let within = Duration::from_secs(5);
    let mut view = m.view();
    let id = |n: &str| format!("{tag}-{n}");
    let ours = |v: &View, role: Role, n: &str| v.get(role, &id(n)).cloned();

    // Join: every field comes back as registered.
    let mut p = Member::new(Role::Proxy, id("p1"));
    p.sip = Some("192.0.2.10:5060".into());
    p.api = Some("192.0.2.10:8081".into());
    let mut r = Member::new(Role::Relay, id("r1"));
    r.api = Some("192.0.2.20:8080".into());
    r.ng = Some("192.0.2.20:2223".into());
    r.media = Some("192.0.2.20".into());
    r.load = Load { sessions: 3, calls_per_sec: 0.5, cpu: 0.1 };
    let rp = m.register(p.clone());
    let rr = m.register(r.clone());
    let v = until(&mut view, "both members join", within, |v| {
        ours(v, Role::Proxy, "p1").is_some() && ours(v, Role::Relay, "r1").is_some()
    })
    .await;
    assert_eq!(ours(&v, Role::Proxy, "p1").unwrap(), p);
    assert_eq!(ours(&v, Role::Relay, "r1").unwrap(), r);
    assert_eq!(v.of(Role::Relay).filter(|x| x.id.starts_with(tag)).count(), 1);
    let rev = v.revision;

    // Load updates are published.
    let load = Load { sessions: 42, calls_per_sec: 7.5, cpu: 0.75 };
    rr.set_load(load);
    let v = until(&mut view, "the relay's load update", within, |v| {
        ours(v, Role::Relay, "r1").is_some_and(|m| m.load == load)
    })
    .await;
    assert!(v.revision > rev, "a change bumps the revision");

    // Registering the same role and id again replaces the entry (a restart).
    let mut p2 = p.clone();
    p2.sip = Some("192.0.2.11:5060".into());
    let rp2 = m.register(p2.clone());
    drop(rp);
    until(&mut view, "the re-registered proxy", within, |v| ours(v, Role::Proxy, "p1").as_ref() == Some(&p2)).await;
    // The old registration's leave must not remove the new entry for good: the new
    // registration's renewals bring it back within a renewal interval.
    until(&mut view, "the re-registered proxy after the old one left", within, |v| {
        ours(v, Role::Proxy, "p1").as_ref() == Some(&p2)
    })
    .await;

    // Dropping a registration leaves (in the background) ...
    drop(rr);
    until(&mut view, "the dropped relay leaves", within, |v| ours(v, Role::Relay, "r1").is_none()).await;
    // ... and leave() returns once it is gone.
    rp2.leave(Duration::from_secs(2)).await;
    let v = until(&mut view, "the proxy leaves", within, |v| ours(v, Role::Proxy, "p1").is_none()).await;
    assert!(v.members.iter().all(|x| !x.id.starts_with(tag)), "{:?}", v.members);

    // A fresh subscriber sees the current view at once.
    let a = m.register(Member::new(Role::Lb, id("lb")));
    let mut late = m.view();
    until(&mut late, "a late subscriber sees the LB", within, |v| ours(v, Role::Lb, "lb").is_some()).await;
    a.leave(Duration::from_secs(2)).await;

    // Elections: one holder at a time; when it resigns the next campaigner holds.
    let name = id("vip");
    let ttl = Duration::from_secs(2);
    let first = m.campaign(&name, &id("a"), ttl);
    let mut held_a = first.held.clone();
    tokio::time::timeout(within, held_a.wait_for(|h| *h)).await.expect("the first campaigner holds").unwrap();
    let second = m.campaign(&name, &id("b"), ttl);
    let mut held_b = second.held.clone();
    // The second must not hold while the first does: give it the time a takeover would take.
    let took = tokio::time::timeout(ttl + Duration::from_millis(500), held_b.wait_for(|h| *h)).await.is_ok();
    assert!(!took, "two holders at once");
    assert!(*held_a.borrow(), "the first still holds");
    drop(first);
    tokio::time::timeout(within, held_b.wait_for(|h| *h)).await.expect("the second takes over").unwrap();
    drop(second);
}
