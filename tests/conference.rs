//! The conference engine end to end: participants added over REST, RTP over real
//! sockets to and from `hasp relay`, the mixed audio checked by tone detection.

mod common;
#[path = "common/tones.rs"]
mod tones;

use common::*;
use dataplane::mixer::codec::{Decoder, Encoder};
use dataplane::mixer::Codec;
use dataplane::rtp::RtpHeader;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use tones::*;

/// Three participants each send a tone in real time for `frames` × 20 ms; returns what
/// each heard (decoded) and the conference's JSON afterwards.
fn run_room(relay: &RelayProc, codec: Codec, frames: u64) -> (Vec<Vec<f64>>, Value) {
    let (s, v) = relay.call("POST", "/v1/conferences", Some("{}"));
    assert_eq!(s, 201, "{v}");
    let conf = v["id"].as_str().unwrap().to_string();
    let mut socks = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..3 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_nonblocking(true).unwrap();
        let body = format!(r#"{{"codec":"{}","remote":"{}"}}"#, codec.name(), u.local_addr().unwrap());
        let (s, p) = relay.call("POST", &format!("/v1/conferences/{conf}/participants"), Some(&body));
        assert_eq!(s, 201, "{p}");
        assert_eq!(p["payload_type"], codec.default_payload_type());
        let addr: SocketAddr = format!("{}:{}", p["address"].as_str().unwrap(), p["rtp_port"]).parse().unwrap();
        ports.push(addr);
        socks.push(u);
    }
    let pts = [codec.default_payload_type(); 3];
    let heard = exchange_tones(&socks, &ports, &pts, codec, frames);
    let (_, view) = relay.call("GET", &format!("/v1/conferences/{conf}"), None);
    (heard, view)
}

fn tones_test(codec: Codec, ports: &str) {
    let relay = RelayProc::start(&["--rtp-ports", ports]);
    let (heard, view) = run_room(&relay, codec, 75);
    assert_each_hears_the_others(&heard, codec);
    assert_eq!(view["participants"].as_array().unwrap().len(), 3, "{view}");
    for p in view["participants"].as_array().unwrap() {
        assert!(p["stats"]["packets_in"].as_u64().unwrap() >= 70, "{p}");
        assert!(p["stats"]["packets_out"].as_u64().unwrap() >= 60, "{p}");
    }
    assert!(view["ticks"].as_u64().unwrap() >= 70);
}

#[test]
fn three_tones_pcmu_each_hears_the_others_not_itself() {
    tones_test(Codec::Pcmu, "43600-43699");
}

#[test]
fn three_tones_opus_each_hears_the_others_not_itself() {
    tones_test(Codec::Opus, "43700-43799");
}

#[test]
fn conference_api_controls_and_errors() {
    let relay = RelayProc::start(&["--rtp-ports", "43800-43807"]);
    let (_, v) = relay.call("POST", "/v1/conferences", None);
    let conf = v["id"].as_str().unwrap().to_string();
    let path = format!("/v1/conferences/{conf}/participants");
    for (body, code) in [
        (r#"{"codec":"G729"}"#, "invalid_codec"),
        (r#"{}"#, "invalid_codec"),
        (r#"{"codec":"PCMU","remote":"nope"}"#, "invalid_remote"),
        (r#"{"codec":"PCMU","payload_type":300}"#, "invalid_request"),
    ] {
        let (s, v) = relay.call("POST", &path, Some(body));
        assert_eq!((s, v["code"].as_str()), (422, Some(code)), "{body}: {v}");
    }
    assert_eq!(relay.call("POST", &path, Some("{oops")).0, 400);
    // Four pairs in the range: the room takes none, four participants take them all.
    let ids: Vec<String> = (0..4)
        .map(|_| {
            let (s, v) = relay.call("POST", &path, Some(r#"{"codec":"PCMA"}"#));
            assert_eq!(s, 201, "{v}");
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    let (s, v) = relay.call("POST", &path, Some(r#"{"codec":"PCMA"}"#));
    assert_eq!((s, v["code"].as_str()), (503, Some("ports_exhausted")));
    let p0 = format!("{path}/{}", ids[0]);
    let (s, v) = relay.call("PATCH", &p0, Some(r#"{"mute":true,"deaf":true,"remote":"127.0.0.1:40000"}"#));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stats"]["mute"], true);
    assert_eq!(v["stats"]["deaf"], true);
    assert_eq!(v["remote"], "127.0.0.1:40000");
    assert_eq!(relay.call("PATCH", &p0, Some(r#"{"mute":"yes"}"#)).0, 422);
    // Kick: the port comes back.
    assert_eq!(relay.call("DELETE", &p0, None).0, 204);
    assert_eq!(relay.call("GET", &p0, None).0, 404);
    wait_for("the kicked participant's port", Duration::from_secs(5), || {
        (relay.call("POST", &path, Some(r#"{"codec":"PCMA"}"#)).0 == 201).then_some(())
    });
    assert_eq!(relay.call("GET", "/v1/conferences/zzz", None).0, 404);
    assert_eq!(relay.call("DELETE", &format!("/v1/conferences/{conf}"), None).0, 204);
    assert_eq!(relay.call("GET", &format!("/v1/conferences/{conf}"), None).0, 404);
    wait_for("every port back", Duration::from_secs(5), || {
        (relay.metric("hasp_relay_port_pairs_free") == 4).then_some(())
    });
}

#[test]
fn participant_moves_to_a_room_on_another_worker_with_a_continuous_stream() {
    let relay = RelayProc::start(&["--rtp-ports", "43900-43999", "--workers", "2"]);
    let room = || relay.call("POST", "/v1/conferences", None).1["id"].as_str().unwrap().to_string();
    let (r1, r2) = (room(), room());
    let w = |r: &str| relay.call("GET", &format!("/v1/conferences/{r}"), None).1["worker"].clone();
    assert_ne!(w(&r1), w(&r2), "the rooms are on different workers");
    let codec = Codec::Pcmu;
    // A and B in room 1, C in room 2; B will move.
    let mut parts = Vec::new();
    for (r, tone) in [(&r1, 400.0), (&r1, 700.0), (&r2, 1100.0)] {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_nonblocking(true).unwrap();
        let body = format!(r#"{{"codec":"PCMU","remote":"{}"}}"#, u.local_addr().unwrap());
        let (s, p) = relay.call("POST", &format!("/v1/conferences/{r}/participants"), Some(&body));
        assert_eq!(s, 201);
        let addr: SocketAddr = format!("{}:{}", p["address"].as_str().unwrap(), p["rtp_port"]).parse().unwrap();
        parts.push((u, addr, tone, p["id"].as_str().unwrap().to_string()));
    }
    let mut enc = Encoder::new(codec, 1).unwrap();
    let mut dec = Decoder::new(codec).unwrap();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut b_seqs: Vec<(u16, u32, u32)> = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 2048];
    let mut pcm = vec![0i16; 960];
    let frames = 150u64;
    for f in 0..frames {
        if f == 60 {
            let (s, v) = relay.call(
                "PATCH",
                &format!("/v1/conferences/{r1}/participants/{}", parts[1].3),
                Some(&format!(r#"{{"conference":"{r2}"}}"#)),
            );
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["rtp_port"], parts[1].1.port(), "B keeps its port");
        }
        for (i, (u, dst, tone, _)) in parts.iter().enumerate() {
            let samples: Vec<i16> = (0..160)
                .map(|k| (6000.0 * (2.0 * std::f64::consts::PI * tone * ((f * 160 + k) as f64 / 8000.0)).sin()) as i16)
                .collect();
            let mut p = vec![0u8; 1500];
            RtpHeader {
                payload_type: 0,
                marker: false,
                sequence: f as u16,
                timestamp: (f * 160) as u32,
                ssrc: 50 + i as u32,
            }
            .write_to(&mut p);
            let n = enc.encode(&samples, &mut p[12..]);
            u.send_to(&p[..12 + n], dst).unwrap();
        }
        let next = start + Duration::from_millis(20 * (f + 1));
        while Instant::now() < next {
            while let Ok((len, _)) = parts[1].0.recv_from(&mut buf) {
                let h = RtpHeader::parse(&buf[..len]).unwrap();
                b_seqs.push((h.sequence, h.timestamp, h.ssrc));
                let k = dec.decode(&buf[12..len], &mut pcm).unwrap();
                let x = pcm[..k].iter().map(|&s| s as f64);
                if (20..55).contains(&f) {
                    before.extend(x);
                } else if f > 80 {
                    after.extend(x);
                }
            }
            for (u, ..) in [&parts[0], &parts[2]] {
                while u.recv_from(&mut buf).is_ok() {}
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let g = |x: &[f64], f: f64| goertzel(x, f, 8000.0);
    assert!(g(&before, 400.0) > 30.0 * g(&before, 1100.0).max(1e-3), "before the move B hears A");
    assert!(g(&after, 1100.0) > 30.0 * g(&after, 400.0).max(1e-3), "after the move B hears C, not A");
    // One continuous stream: same SSRC, sequence numbers and timestamps step by one
    // frame, whatever gap the move caused.
    assert!(b_seqs.windows(2).all(|w| w[0].2 == w[1].2), "SSRC unchanged");
    for w in b_seqs.windows(2) {
        assert_eq!(w[1].0, w[0].0.wrapping_add(1), "sequence continues across the move");
        assert_eq!(w[1].1, w[0].1.wrapping_add(160));
    }
    assert!(b_seqs.len() as u64 >= frames - 10, "B got {} packets in {frames} ticks", b_seqs.len());
    let (_, v1) = relay.call("GET", &format!("/v1/conferences/{r1}"), None);
    let (_, v2) = relay.call("GET", &format!("/v1/conferences/{r2}"), None);
    assert_eq!((v1["participants"].as_array().unwrap().len(), v2["participants"].as_array().unwrap().len()), (1, 2));
}
