//! The relay's per-packet decision on arbitrary datagrams: never panics, counts drops.
#![no_main]
use dataplane::relay::{SessionSpec, Table, Verdict};
use dataplane::LatchPolicy;
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let t = Instant::now();
    let mut table = Table::new(t);
    let spec = SessionSpec {
        id: 1,
        remotes: [None, Some(SocketAddr::from(([127, 0, 0, 1], 7000)))],
        clock_rates: [None, None],
        policy: LatchPolicy::default(),
        inactivity: Duration::from_secs(60),
    };
    let s = table.insert(&spec, t).unwrap();
    let src = SocketAddr::from(([127, 0, 0, 1], 5000));
    // Split the input into packets at 0xff bytes and feed them to both RTP and RTCP.
    for (n, pkt) in data.split(|b| *b == 0xff).enumerate() {
        let sock = s[n % 2][n / 2 % 2];
        match table.on_packet(t + Duration::from_millis(n as u64), sock, src, pkt) {
            Verdict::Forward { .. } | Verdict::Drop(_) => {}
        }
    }
    let snap = table.snapshot(1, t).unwrap();
    let total: u64 = snap.legs.iter().map(|l| l.rtp.packets + l.rtcp.packets).sum();
    assert_eq!(total as usize, data.split(|b| *b == 0xff).count());
});
