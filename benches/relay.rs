//! The relay's per-packet path without the kernel: parse the RTP header, find the
//! session by socket index, latch check, statistics, pick the destination, and build
//! the sendmsg submission entry (the "queue" step) from the packet's own buffer.
//!
//! Baseline in the same run: copying the 172-byte packet once, the least any
//! userspace forwarder that does not hand buffers through must do.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dataplane::io::bufs::{Buffers, Slots};
use dataplane::relay::{SessionSpec, Table, Verdict};
use dataplane::LatchPolicy;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn rtp(seq: u16, ssrc: u32) -> [u8; 172] {
    let mut p = [0u8; 172];
    p[0] = 0x80;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(seq as u32 * 160).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

fn per_packet(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay_per_packet");
    g.throughput(Throughput::Elements(1));
    for sessions in [1usize, 1_000, 10_000] {
        let t0 = Instant::now();
        let mut table = Table::new(t0);
        let mut socks = Vec::with_capacity(sessions);
        for id in 0..sessions as u64 {
            let spec = SessionSpec {
                id,
                remotes: [None, None],
                clock_rates: [None, None],
                policy: LatchPolicy::default(),
                inactivity: Duration::from_secs(60),
            };
            let s = table.insert(&spec, t0).unwrap();
            // Latch both legs so every benchmarked packet is forwarded.
            let a = SocketAddr::from(([10, 0, (id >> 8) as u8, id as u8], 5000));
            let b = SocketAddr::from(([10, 1, (id >> 8) as u8, id as u8], 6000));
            table.on_packet(t0, s[0][0], a, &rtp(0, 1));
            table.on_packet(t0, s[1][0], b, &rtp(0, 2));
            socks.push((s[0][0], a));
        }
        let bufs = Buffers::new(64, 2048);
        let mut slots = Slots::new(64);
        let mut seq = 1u16;
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("decide_and_queue", sessions), &sessions, |bch, _| {
            bch.iter(|| {
                let (sock, src) = socks[i % socks.len()];
                i = i.wrapping_add(1);
                seq = seq.wrapping_add(1);
                let pkt = rtp(seq, 1);
                let bid = (i % 64) as u16;
                // SAFETY: the buffer and slot are owned here; the entry is never submitted.
                let entry = match table.on_packet(t0, sock, src, black_box(&pkt)) {
                    Verdict::Forward { out, dst } => Some(unsafe {
                        slots.get(bid).send_entry(out as i32, bufs.ptr(bid), pkt.len(), &dst, bid as u64)
                    }),
                    Verdict::Drop(_) => None,
                };
                black_box(entry)
            })
        });
    }
    let src = rtp(1, 1);
    let mut dst = [0u8; 2048];
    g.bench_function("baseline_copy_172_bytes", |b| {
        b.iter(|| {
            dst[..172].copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    g.finish();
}

fn header_parse(c: &mut Criterion) {
    let p = rtp(7, 9);
    c.bench_function("rtp_header_parse", |b| b.iter(|| dataplane::rtp::RtpHeader::parse(black_box(&p))));
}

criterion_group!(benches, per_packet, header_parse);
criterion_main!(benches);
