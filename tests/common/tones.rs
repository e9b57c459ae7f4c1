//! Tone exchange for conference tests: each participant sends its own tone in real time
//! and what it hears is decoded, so tone detection can tell who hears whom.

use dataplane::mixer::codec::{Decoder, Encoder};
use dataplane::mixer::Codec;
use dataplane::rtp::RtpHeader;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// One tone per participant (Hz).
pub const TONES: [f64; 3] = [400.0, 700.0, 1100.0];

/// Power of `freq` in `x` (Goertzel).
pub fn goertzel(x: &[f64], freq: f64, rate: f64) -> f64 {
    let k = 2.0 * (2.0 * std::f64::consts::PI * freq / rate).cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for &v in x {
        let s0 = v + k * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    (s1 * s1 + s2 * s2 - k * s1 * s2) / (x.len() as f64 * x.len() as f64)
}

/// Participant `i` sends `TONES[i]` from `socks[i]` to `dests[i]` for `frames` × 20 ms,
/// paced in real time, with payload type `pts[i]`; returns what each heard (decoded),
/// from the last two thirds of the run.
pub fn exchange_tones(
    socks: &[UdpSocket],
    dests: &[SocketAddr],
    pts: &[u8],
    codec: Codec,
    frames: u64,
) -> Vec<Vec<f64>> {
    for u in socks {
        u.set_nonblocking(true).unwrap();
    }
    let mut encs: Vec<Encoder> = socks.iter().map(|_| Encoder::new(codec, 5).unwrap()).collect();
    let mut decs: Vec<Decoder> = socks.iter().map(|_| Decoder::new(codec).unwrap()).collect();
    let mut heard: Vec<Vec<f64>> = vec![Vec::new(); socks.len()];
    let mut pcm_out = vec![0i16; 960];
    let n = codec.frame();
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    for f in 0..frames {
        for (i, u) in socks.iter().enumerate() {
            let pcm: Vec<i16> = (0..n)
                .map(|k| {
                    let t = (f as usize * n + k) as f64 / codec.rate() as f64;
                    (6000.0 * (2.0 * std::f64::consts::PI * TONES[i] * t).sin()) as i16
                })
                .collect();
            let mut p = vec![0u8; 1500];
            RtpHeader {
                payload_type: pts[i],
                marker: f == 0,
                sequence: f as u16,
                timestamp: (f as usize * n) as u32,
                ssrc: 7 + i as u32,
            }
            .write_to(&mut p);
            let len = encs[i].encode(&pcm, &mut p[12..]);
            u.send_to(&p[..12 + len], dests[i]).unwrap();
        }
        // Real-time pacing: the mixer runs on a 20 ms clock.
        let next = start + Duration::from_millis(20 * (f + 1));
        while Instant::now() < next {
            for (i, u) in socks.iter().enumerate() {
                while let Ok((len, _)) = u.recv_from(&mut buf) {
                    // The mixer's RTCP for the participant whose RTP port is one below
                    // this socket's (ports are the kernel's picks, and may be adjacent)
                    // lands here too: RTCP packet types are 200-204.
                    if len >= 2 && (200..=204).contains(&buf[1]) {
                        continue;
                    }
                    let h = RtpHeader::parse(&buf[..len]).expect("RTP from the mixer");
                    assert_eq!(h.payload_type, pts[i]);
                    let k = decs[i].decode(&buf[12..len], &mut pcm_out).expect("decodable");
                    if f > frames / 3 {
                        heard[i].extend(pcm_out[..k].iter().map(|&s| s as f64));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    heard
}

/// Each participant hears the others' tones far above its own.
pub fn assert_each_hears_the_others(heard: &[Vec<f64>], codec: Codec) {
    for (i, x) in heard.iter().enumerate() {
        assert!(x.len() > codec.rate() as usize / 2, "participant {i} heard only {} samples", x.len());
        let p: Vec<f64> = TONES.iter().map(|&f| goertzel(x, f, codec.rate() as f64)).collect();
        for (j, &q) in p.iter().enumerate() {
            if j != i {
                assert!(
                    q > 30.0 * p[i].max(1e-3),
                    "{codec:?}: participant {i} hears tone {j} ({q:.1}) over its own ({:.3})",
                    p[i]
                );
            }
        }
    }
}
