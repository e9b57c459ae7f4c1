//! A flood from one source does not hurt everyone else: sipp places legitimate calls
//! through `hasp up` while `hasp-sipflood` sends well-formed INVITEs for an unregistered
//! user as fast as it can from another address. The flooder is banned once over its
//! rate, its datagrams are then dropped in the kernel (they show as socket drops, not
//! as messages the proxy read), and the legitimate calls succeed.

mod common;

use common::ua::DOMAIN;
use common::*;
use std::process::{Command, Stdio};

/// Calls per second sipp places, and for how long.
const RATE: u32 = 100;
const SECS: u32 = 10;

/// The counter `name` from sipp's final screen (`Successful call`, `Failed call`).
fn sipp_count(screen: &str, name: &str) -> u64 {
    screen
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with(name))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name:?} in sipp's output:\n{screen}"))
}

/// Drops counted on the proxy's SIP UDP sockets (bound to `port`), from /proc.
fn socket_drops(port: u16) -> u64 {
    let t = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let p = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (p == port).then(|| f.last()?.parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// A measurement more than a check (it needs both cores to itself: the flooder takes
/// one), so not part of the default suite: run it with
/// `cargo nextest run --run-ignored only -E 'binary(flood)' --no-capture`.
/// docs/performance.md records its results.
#[test]
#[ignore = "a measurement that needs the machine to itself; see docs/performance.md"]
fn a_flood_from_one_source_leaves_legitimate_calls_alone() {
    // The per-source limit: 1,000/s unless FLOOD_SIP_RATE_LIMIT says otherwise (to measure
    // other settings, e.g. the default 10,000).
    let limit = std::env::var("FLOOD_SIP_RATE_LIMIT").unwrap_or_else(|_| "1000".into());
    let (up, sip, dir) = up_with_sip_args(DOMAIN, "41200-41999", "flood", &["--sip-rate-limit", &limit]);
    add_sip_user(&up, "bob", DOMAIN, "builder");
    let uas_sf = interop_dir().join("rr/uas_rr.xml");
    let mut uas = Command::new("sipp")
        .current_dir(&dir)
        .arg("-sf")
        .arg(&uas_sf)
        .args(["-i", "127.0.0.1", "-nostdin", "-timeout", "120s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp");
    let uas_port = sipp_port(&uas);
    assert_eq!(sip_register(&sip, DOMAIN, "bob", "builder", &format!("sip:bob@127.0.0.1:{uas_port}"), 600), 200);

    let flooder = hasp_bin().with_file_name("hasp-sipflood");
    let flood = Command::new(&flooder)
        .args(["--target", &sip, "--from", "127.0.0.2:0", "--secs", &(SECS + 2).to_string(), "--domain", DOMAIN])
        .args(["--rate", &std::env::var("FLOOD_RATE").unwrap_or_else(|_| "0".into())])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", flooder.display()));
    let calls = (RATE * SECS).to_string();
    let uac = Command::new("sipp")
        .current_dir(&dir)
        .arg("-sf")
        .arg(interop_dir().join("rr/uac_rr.xml"))
        .args(["-i", "127.0.0.1", "-nostdin", "-r", &RATE.to_string(), "-m", &calls, "-s", "bob"])
        .args(["-timeout", "120s", "-trace_err", &sip])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp");
    let out = uac.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    let flood = flood.wait_with_output().unwrap();
    let _ = uas.kill();
    let _ = uas.wait();
    let report: serde_json::Value = serde_json::from_slice(&flood.stdout).expect("the flooder's report");
    let (ok, failed) = (sipp_count(&screen, "Successful call"), sipp_count(&screen, "Failed call"));
    let sent = report["sent"].as_u64().unwrap();
    let read = up.metric("hasp_sip_rate_limited_total") + up.metric("hasp_sip_rejected_total");
    let drops = socket_drops(sip.rsplit(':').next().unwrap().parse().unwrap());
    eprintln!(
        "legitimate calls: {ok} ok, {failed} failed ({:.2} %); flood: {sent} INVITEs at {} /s; \
         the proxy read {read} of them, the kernel dropped {drops}",
        100.0 * ok as f64 / (ok + failed).max(1) as f64,
        report["rate"]
    );
    assert_eq!(ok + failed, u64::from(RATE * SECS), "{screen}");
    assert!(ok * 1000 >= (ok + failed) * 995, "fewer than 99.5 % of the legitimate calls succeeded:\n{screen}");
    assert!(up.metric("hasp_sip_bans_total") >= 1, "the flooder was banned");
    assert!(read < sent / 4, "most of the flood never reached the proxy: it read {read} of {sent}");
}
