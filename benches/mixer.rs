//! The conference mixer per 20 ms tick: a 10-participant room with 1–3 talkers, PCMU
//! and Opus, against a naive mixer measured in the same run (every participant gets its
//! own N−1 mix of everyone, encoded for it alone).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use dataplane::mixer::codec::{resample, Decoder, Encoder};
use dataplane::mixer::{Codec, Room, RoomConfig};
use dataplane::rtp::RtpHeader;

const PARTICIPANTS: u32 = 10;

/// One tick's packets: talkers send a tone, the others near-silence (with an RFC 6464
/// level for Opus, as WebRTC and most phones send it).
fn packets(codec: Codec, talkers: u32, frame: u64, encs: &mut [Encoder]) -> Vec<Vec<u8>> {
    let n = codec.frame();
    (0..PARTICIPANTS)
        .map(|i| {
            let amp = if i < talkers { 8000.0 } else { 20.0 };
            let pcm: Vec<i16> = (0..n)
                .map(|k| {
                    let t = (frame as usize * n + k) as f64 / codec.rate() as f64;
                    (amp * (2.0 * std::f64::consts::PI * (300.0 + 100.0 * i as f64) * t).sin()) as i16
                })
                .collect();
            let mut p = vec![0u8; 1500];
            let h = RtpHeader {
                payload_type: codec.default_payload_type(),
                marker: false,
                sequence: frame as u16,
                timestamp: 0,
                ssrc: i,
            };
            h.write_to(&mut p);
            // One-byte header extension, id 1 = audio level (RFC 6464).
            p[0] |= 0x10;
            p[12..16].copy_from_slice(&[0xbe, 0xde, 0, 1]);
            p[16] = 0x10;
            p[17] = if i < talkers { 20 } else { 90 };
            let len = encs[i as usize].encode(&pcm, &mut p[20..]);
            p.truncate(20 + len);
            p
        })
        .collect()
}

/// The naive mixer: decode everyone, then for each participant sum the others and
/// encode — N mixes and N encodes per tick.
struct Naive {
    decs: Vec<Decoder>,
    encs: Vec<Encoder>,
    frames: Vec<Vec<i16>>,
}

impl Naive {
    fn tick(&mut self, codec: Codec, pkts: &[Vec<u8>], out: &mut [u8]) -> usize {
        let n = codec.frame();
        for (i, p) in pkts.iter().enumerate() {
            self.decs[i].decode(&p[20..], &mut self.frames[i][..n]);
        }
        let mut total = 0;
        let mut mix = vec![0i16; n];
        for i in 0..pkts.len() {
            for (k, m) in mix.iter_mut().enumerate() {
                let s: i32 = (0..pkts.len()).filter(|&j| j != i).map(|j| self.frames[j][k] as i32).sum();
                *m = s.clamp(-32768, 32767) as i16;
            }
            total += self.encs[i].encode(&mix, out);
        }
        total
    }
}

fn mixer(c: &mut Criterion) {
    let mut g = c.benchmark_group("mixer_tick_10_participants");
    for codec in [Codec::Pcmu, Codec::Opus] {
        for talkers in [1u32, 3] {
            let mut encs: Vec<Encoder> = (0..PARTICIPANTS).map(|_| Encoder::new(codec, 5).unwrap()).collect();
            let ticks: Vec<Vec<Vec<u8>>> = (0..50).map(|f| packets(codec, talkers, f, &mut encs)).collect();
            let mut room = Room::new(RoomConfig { jitter_depth: 1, ..RoomConfig::default() });
            for i in 0..PARTICIPANTS {
                room.add(i, codec, codec.default_payload_type(), i).unwrap();
            }
            let mut f = 0usize;
            let mut seq = 0u16;
            let name = format!("{}_{}talkers", codec.name(), talkers);
            g.bench_function(BenchmarkId::new("hasp", &name), |b| {
                b.iter(|| {
                    for (i, p) in ticks[f % ticks.len()].iter().enumerate() {
                        let mut p = p.clone();
                        p[2..4].copy_from_slice(&seq.to_be_bytes());
                        let _ = room.on_rtp(i as u32, &p);
                    }
                    seq = seq.wrapping_add(1);
                    f += 1;
                    let mut bytes = 0;
                    room.tick(&mut |_, pkt| bytes += pkt.len());
                    black_box(bytes)
                })
            });
            let mut naive = Naive {
                decs: (0..PARTICIPANTS).map(|_| Decoder::new(codec).unwrap()).collect(),
                encs: (0..PARTICIPANTS)
                    .map(|_| Encoder::new(codec, RoomConfig::default().opus_complexity).unwrap())
                    .collect(),
                frames: vec![vec![0; 960]; PARTICIPANTS as usize],
            };
            let mut out = vec![0u8; 1500];
            let mut f = 0usize;
            g.bench_function(BenchmarkId::new("naive", &name), |b| {
                b.iter(|| {
                    f += 1;
                    black_box(naive.tick(codec, &ticks[f % ticks.len()], &mut out))
                })
            });
        }
    }
    g.finish();
    let _ = resample;
}

criterion_group!(benches, mixer);
criterion_main!(benches);
