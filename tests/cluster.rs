//! Cluster membership: the battery against a real 3-node etcd, `GET /v1/cluster` on
//! every role, a SIGKILLed member gone when its lease ends, and a proxy with no relay
//! list anchoring calls on the relays membership lists (least loaded first, sticky per
//! call, the next one when a relay dies).

mod common;

use common::etcd::Cluster;
use common::ua::Ua;
use common::*;
use controlplane::cluster::{self, Membership, Role};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DOMAIN: &str = "hasp.test";

fn members(p: &RelayProc) -> Vec<Value> {
    let (s, v) = p.call("GET", "/v1/cluster", None);
    assert_eq!(s, 200, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

fn ids(list: &[Value], role: &str) -> Vec<String> {
    list.iter().filter(|m| m["role"] == role).map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn hasp_up_lists_its_proxy_and_relay_at_v1_cluster() {
    let (up, sip, _dir) = up_with_sip_args(DOMAIN, "44200-44219", "cluster-up", &["--node-id", "node-a"]);
    let list = members(&up);
    assert_eq!(ids(&list, "relay"), ["node-a"]);
    assert_eq!(ids(&list, "proxy"), ["node-a"]);
    let proxy = list.iter().find(|m| m["role"] == "proxy").unwrap();
    assert_eq!(proxy["sip"], sip.as_str());
    for key in ["role", "id", "sip", "api", "ng", "media", "load", "since"] {
        assert!(proxy.get(key).is_some(), "{key} missing: {proxy}");
    }
    for key in ["sessions", "calls_per_sec", "cpu"] {
        assert!(proxy["load"].get(key).is_some(), "load.{key} missing: {proxy}");
    }
    let relay = list.iter().find(|m| m["role"] == "relay").unwrap();
    assert_eq!(relay["media"], "127.0.0.1");
    assert!(up.ready_line.contains("membership=local"), "{}", up.ready_line);
    // Behind the API token like the rest of the API.
    let (s, _) = up.call_with("GET", "/v1/cluster", None, None);
    assert_eq!(s, 401);
}

#[test]
fn etcd_membership_passes_the_battery_and_a_killed_member_leaves_with_its_lease() {
    let etcd = Cluster::start(23740);
    let spec = etcd.spec();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let m: Arc<dyn Membership> = rt.block_on(async { cluster::open(&spec).unwrap() });
    rt.block_on(cluster::battery(m.clone(), "battery"));

    // A relay process joins; SIGKILLed, it cannot leave: its lease ends within the TTL.
    let mut relay = RelayProc::start(&["--membership", &spec, "--node-id", "doomed", "--rtp-ports", "44220-44239"]);
    assert!(relay.ready_line.contains("membership=etcd"), "{}", relay.ready_line);
    let mut view = m.view();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v.get(Role::Relay, "doomed").is_some()))
            .await
            .expect("the relay joins")
            .unwrap();
    });
    let listed = members(&relay);
    assert_eq!(ids(&listed, "relay"), ["doomed"], "the relay's own API lists it: {listed:?}");
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    let killed = Instant::now();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v.get(Role::Relay, "doomed").is_none()))
            .await
            .expect("the killed relay leaves")
            .unwrap();
    });
    let gone = killed.elapsed();
    eprintln!("SIGKILLed member gone from the view after {gone:?} (lease TTL 3 s, renewed every 1 s)");
    assert!(gone <= Duration::from_secs(5), "gone after {gone:?}");

    // A clean stop (SIGTERM) leaves at once rather than a lease later.
    let relay = RelayProc::start(&["--membership", &spec, "--node-id", "polite", "--rtp-ports", "44220-44239"]);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v.get(Role::Relay, "polite").is_some()))
            .await
            .expect("the relay joins")
            .unwrap();
    });
    unsafe { libc::kill(relay.pid() as i32, libc::SIGTERM) };
    let stopped = Instant::now();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v.get(Role::Relay, "polite").is_none()))
            .await
            .expect("the stopped relay leaves")
            .unwrap();
    });
    eprintln!("SIGTERMed member gone after {:?}", stopped.elapsed());
    drop(relay);
}

#[test]
fn a_proxy_without_a_relay_list_anchors_calls_on_relays_from_membership() {
    let etcd = Cluster::start(23840);
    let spec = etcd.spec();
    let relay = |id: &str, ports: &str| {
        RelayProc::start(&["--membership", &spec, "--node-id", id, "--listen-ng", "127.0.0.1:0", "--rtp-ports", ports])
    };
    let r1 = relay("r1", "44240-44269");
    let r2 = relay("r2", "44270-44299");
    let dir = scratch_dir("cluster-proxy");
    let store = format!("embedded:{}", dir.join("hasp.redb").display());
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
            "--membership",
            &spec,
            "--node-id",
            "p1",
            "--relay-timeout-ms",
            "300",
            "--relay-token",
            TOKEN,
        ],
        Some(TOKEN.to_string()),
    );
    let sip = field(&proxy.ready_line, "sip=");
    let list = wait_for("the proxy to see both relays and itself", Duration::from_secs(10), || {
        let l = members(&proxy);
        (ids(&l, "relay") == ["r1", "r2"] && ids(&l, "proxy") == ["p1"]).then_some(l)
    });
    let ng_of = |id: &str| list.iter().find(|m| m["id"] == id).unwrap()["ng"].as_str().unwrap().to_string();
    assert_eq!(ng_of("r1"), field(&r1.ready_line, "ng="));
    add_sip_user(&proxy, "bob", DOMAIN, "builder");
    let bob = Ua::new();
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &format!("sip:bob@{}", bob.addr()), 600), 200);

    // Calls spread over both relays (least loaded first, counting the calls placed
    // since the last load report), each call's media on one relay.
    let on = |port: u16| {
        if (44240..44270).contains(&port) {
            "r1"
        } else if (44270..44300).contains(&port) {
            "r2"
        } else {
            "?"
        }
    };
    let mut used = std::collections::BTreeSet::new();
    for i in 0..4 {
        let (a, b) = call_through(&sip, &bob, &format!("cluster-call-{i}"));
        assert_eq!(on(a), on(b), "one call, one relay");
        assert_ne!(on(a), "?", "media anchored on a member relay: {a}");
        used.insert(on(a));
    }
    assert_eq!(used.len(), 2, "calls went to both relays: {used:?}");

    // A conference room is hosted on a member relay too (its mixer, over its REST API).
    // (A room is for local users: alice authenticates.)
    add_sip_user(&proxy, "alice", DOMAIN, "wonder");
    let alice = Ua::new();
    let alice_rtp = udp();
    let port = alice_rtp.local_addr().unwrap().port();
    let req = common::ua::invite_as(
        &alice,
        &format!("alice@{DOMAIN}"),
        &format!("conf-team@{DOMAIN}"),
        "cluster-conf-1",
        port,
    );
    alice.send(&sip, &req);
    let challenge = alice.recv_final(Duration::from_secs(10));
    assert_eq!(challenge.code(), Some(407), "{challenge:?}");
    alice.send(&sip, &common::ua::ack_for(&req, &challenge));
    alice.send(&sip, &common::ua::with_credentials(&req, &challenge, "alice", "wonder", 1));
    let ok = alice.recv_final(Duration::from_secs(10));
    assert_eq!(ok.code(), Some(200), "{ok:?}");
    assert_ne!(on(common::ua::sdp_port(&ok)), "?", "the room's media on a member relay: {ok:?}");
    alice.send(&sip, &common::ua::in_dialog(&alice, &ok, "ACK", 2));
    alice.send(&sip, &common::ua::in_dialog(&alice, &ok, "BYE", 3));
    assert_eq!(alice.recv_final(Duration::from_secs(5)).code(), Some(200));

    // r1 dies: once its lease ends, every call goes to r2, none waits for r1.
    drop(r1);
    wait_for("the proxy to drop the dead relay", Duration::from_secs(10), || {
        (ids(&members(&proxy), "relay") == ["r2"]).then_some(())
    });
    for i in 0..3 {
        let (a, _) = call_through(&sip, &bob, &format!("cluster-after-{i}"));
        assert_eq!(on(a), "r2");
    }
    drop(r2);
}
