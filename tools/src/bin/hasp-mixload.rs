//! `hasp-mixload`: how many conference participants one core mixes in real time.
//!
//! `--mode cpu`: rooms of 10 in this process on one pinned core, RTP fed straight into
//! the mixer; reports the tick time distribution and the participants that fit in the
//! 20 ms budget, for hasp's mixer and a naive mixer (every participant gets its own
//! N−1 mix, encoded for it alone) in the same run.
//!
//! `--mode packets`: a spawned `hasp relay` (one worker, pinned) holds R rooms created
//! over REST; this tool sends every participant's RTP over real UDP in real time and
//! reads the mixed audio back. A load is held when under 1 % of ticks start late and
//! every participant gets its 50 packets/s.

use anyhow::{Context, Result};
use clap::Parser;
use dataplane::mixer::codec::{Decoder, Encoder};
use dataplane::mixer::{Codec, Room, RoomConfig};
use dataplane::rtp::RtpHeader;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "hasp-mixload", about = "Conference participants per core")]
struct Args {
    /// cpu (mixer in process) or packets (spawned relay, real UDP).
    #[arg(long, default_value = "cpu")]
    mode: String,
    /// PCMU, PCMA or opus.
    #[arg(long, default_value = "PCMU")]
    codec: String,
    /// Participants per room.
    #[arg(long, default_value_t = 10)]
    size: u32,
    /// Talkers per room.
    #[arg(long, default_value_t = 3)]
    talkers: u32,
    /// Room counts to try (packets mode), e.g. 50,100,150.
    #[arg(long, value_delimiter = ',', default_value = "20")]
    rooms: Vec<u32>,
    /// Seconds per load step (packets mode).
    #[arg(long, default_value_t = 8)]
    duration: u64,
    /// Core of the mixer under test.
    #[arg(long, default_value_t = 0)]
    core: usize,
    /// Core of the packet generator (packets mode).
    #[arg(long, default_value_t = 1)]
    gen_core: usize,
}

fn codec_of(s: &str) -> Result<Codec> {
    serde_json::from_value(serde_json::Value::String(s.into())).context("codec: PCMU, PCMA or opus")
}

/// 50 frames (1 s) of a participant's audio, encoded: a tone for talkers, near-silence
/// for the others (with an RFC 6464 level, as phones and browsers send it).
fn frames(codec: Codec, talker: bool, freq: f64) -> Vec<(Vec<u8>, u8)> {
    let mut enc = Encoder::new(codec, RoomConfig::default().opus_complexity).expect("encoder");
    let n = codec.frame();
    (0..50)
        .map(|f| {
            let amp = if talker { 8000.0 } else { 20.0 };
            let pcm: Vec<i16> = (0..n)
                .map(|k| {
                    (amp * (2.0 * std::f64::consts::PI * freq * ((f * n + k) as f64 / codec.rate() as f64)).sin())
                        as i16
                })
                .collect();
            let mut out = vec![0u8; 1500];
            let len = enc.encode(&pcm, &mut out);
            out.truncate(len);
            (out, if talker { 20 } else { 90 })
        })
        .collect()
}

fn rtp(codec: Codec, seq: u16, ssrc: u32, payload: &[u8], level: u8) -> Vec<u8> {
    let mut p = vec![0u8; 20 + payload.len()];
    RtpHeader {
        payload_type: codec.default_payload_type(),
        marker: false,
        sequence: seq,
        timestamp: seq as u32 * codec.frame() as u32,
        ssrc,
    }
    .write_to(&mut p);
    p[0] |= 0x10;
    p[12..16].copy_from_slice(&[0xbe, 0xde, 0, 1]);
    p[16] = 0x10;
    p[17] = level;
    p[20..].copy_from_slice(payload);
    p
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * q) as usize]
}

/// Mixer CPU per tick for one room, hasp vs naive.
fn cpu_mode(a: &Args, codec: Codec) -> Result<()> {
    dataplane::affinity::pin_current_thread(a.core)?;
    let audio: Vec<Vec<(Vec<u8>, u8)>> =
        (0..a.size).map(|i| frames(codec, i < a.talkers, 300.0 + 97.0 * i as f64)).collect();
    let rooms = 20u32;
    let mut rs: Vec<Room> = (0..rooms)
        .map(|_| {
            let mut r = Room::new(RoomConfig { jitter_depth: 1, ..RoomConfig::default() });
            for i in 0..a.size {
                r.add(i, codec, codec.default_payload_type(), i).unwrap();
            }
            r
        })
        .collect();
    let ticks = 1000u16;
    let mut times = Vec::new();
    for t in 0..ticks {
        let start = Instant::now();
        for r in &mut rs {
            for i in 0..a.size {
                let (p, l) = &audio[i as usize][t as usize % 50];
                let _ = r.on_rtp(i, &rtp(codec, t, i, p, *l));
            }
            r.tick(&mut |_, pkt| {
                std::hint::black_box(pkt);
            });
        }
        times.push(start.elapsed().as_secs_f64() * 1e6 / rooms as f64);
    }
    let hasp_p99 = quantile(&mut times[50..].to_vec(), 0.99);
    let hasp_p50 = quantile(&mut times[50..].to_vec(), 0.5);
    // Naive: decode all, N mixes, N encodes.
    let n = codec.frame();
    let mut decs: Vec<Decoder> = (0..a.size).map(|_| Decoder::new(codec).unwrap()).collect();
    let mut encs: Vec<Encoder> =
        (0..a.size).map(|_| Encoder::new(codec, RoomConfig::default().opus_complexity).unwrap()).collect();
    let mut pcm = vec![vec![0i16; 960]; a.size as usize];
    let mut out = vec![0u8; 1500];
    let mut mix = vec![0i16; n];
    let mut ntimes = Vec::new();
    for t in 0..1000usize {
        let start = Instant::now();
        for i in 0..a.size as usize {
            decs[i].decode(&audio[i][t % 50].0, &mut pcm[i][..n]);
        }
        for (i, enc) in encs.iter_mut().enumerate() {
            for (k, m) in mix.iter_mut().enumerate() {
                let s: i32 = (0..a.size as usize).filter(|&j| j != i).map(|j| pcm[j][k] as i32).sum();
                *m = s.clamp(-32768, 32767) as i16;
            }
            std::hint::black_box(enc.encode(&mix, &mut out));
        }
        ntimes.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let naive_p99 = quantile(&mut ntimes[20..].to_vec(), 0.99);
    let naive_p50 = quantile(&mut ntimes[20..].to_vec(), 0.5);
    let per_core = |us: f64| (20_000.0 / us).floor() * a.size as f64;
    println!("codec={} room={} talkers={} (mixer CPU only, one core, no packets)", codec.name(), a.size, a.talkers);
    println!(
        "hasp  : tick per room p50 {hasp_p50:.1} µs, p99 {hasp_p99:.1} µs → {:.0} participants per core",
        per_core(hasp_p99)
    );
    println!(
        "naive : tick per room p50 {naive_p50:.1} µs, p99 {naive_p99:.1} µs → {:.0} participants per core",
        per_core(naive_p99)
    );
    println!(
        "ratio hasp/naive participants per core: {:.2} (p99), {:.2} (p50)",
        per_core(hasp_p99) / per_core(naive_p99).max(1.0),
        naive_p50 / hasp_p50
    );
    Ok(())
}

fn cpu_ns_named(pid: u32, prefix: &str) -> u64 {
    let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    d.flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("schedstat")).ok()?.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Real packets through a spawned relay.
fn packets_mode(a: &Args, codec: Codec) -> Result<()> {
    let exe = std::env::current_exe()?.with_file_name("hasp");
    let mut child = Command::new(&exe)
        .args(["relay", "--no-auth", "--listen-api", "127.0.0.1:0", "--workers", "1", "--rtp-ports", "20000-29999"])
        .args(["--cores", &a.core.to_string()])
        .env("HASP_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let api = line.split_whitespace().find_map(|w| w.strip_prefix("api=")).context("ready line")?.to_string();
    let pid = child.id();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    dataplane::affinity::pin_current_thread(a.gen_core)?;
    let audio: Vec<Vec<(Vec<u8>, u8)>> =
        (0..a.size).map(|i| frames(codec, i < a.talkers, 300.0 + 97.0 * i as f64)).collect();
    println!(
        "codec={} room={} talkers={} real packets, mixer worker on core {}",
        codec.name(),
        a.size,
        a.talkers,
        a.core
    );
    println!(
        "{:>6} {:>12} {:>10} {:>10} {:>12} {:>10} {:>6}",
        "rooms", "participants", "ticks", "late%", "rx pkts/s/p", "worker%", "held"
    );
    for &rooms in &a.rooms {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        let s2 = socket2::SockRef::from(&sock);
        let _ = s2.set_recv_buffer_size(32 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(1)))?;
        let me = sock.local_addr()?;
        let mut confs = Vec::new();
        let mut targets: Vec<(SocketAddr, u32)> = Vec::new(); // (port, participant index in room)
        for _ in 0..rooms {
            let v: serde_json::Value = agent.post(&format!("{api}/v1/conferences")).send_string("{}")?.into_json()?;
            let conf = v["id"].as_str().context("id")?.to_string();
            for i in 0..a.size {
                let body = format!(r#"{{"codec":"{}","remote":"{me}"}}"#, codec.name());
                let p: serde_json::Value =
                    agent.post(&format!("{api}/v1/conferences/{conf}/participants")).send_string(&body)?.into_json()?;
                let port = p["rtp_port"].as_u64().context("port")? as u16;
                targets.push((SocketAddr::from(([127, 0, 0, 1], port)), i));
            }
            confs.push(conf);
        }
        let cpu0 = cpu_ns_named(pid, "hasp-worker");
        let start = Instant::now();
        let mut received = 0u64;
        let mut buf = [0u8; 2048];
        let total = a.duration * 50;
        for f in 0..total {
            for (k, (dst, i)) in targets.iter().enumerate() {
                let (p, l) = &audio[*i as usize][f as usize % 50];
                let _ = sock.send_to(&rtp(codec, f as u16, k as u32, p, *l), dst);
            }
            let next = start + Duration::from_millis(20 * (f + 1));
            while Instant::now() < next {
                if sock.recv_from(&mut buf).is_ok() {
                    received += 1;
                }
            }
        }
        let wall = start.elapsed();
        let cpu = cpu_ns_named(pid, "hasp-worker") - cpu0;
        let (mut ticks, mut late) = (0u64, 0u64);
        for c in &confs {
            let v: serde_json::Value = agent.get(&format!("{api}/v1/conferences/{c}")).call()?.into_json()?;
            ticks += v["ticks"].as_u64().unwrap_or(0);
            late += v["late_ticks"].as_u64().unwrap_or(0);
            let _ = agent.delete(&format!("{api}/v1/conferences/{c}")).call();
        }
        let n = targets.len() as f64;
        let rate = received as f64 / wall.as_secs_f64() / n;
        let late_pct = 100.0 * late as f64 / ticks.max(1) as f64;
        let held = late_pct < 1.0 && rate > 47.5;
        println!(
            "{rooms:>6} {:>12} {ticks:>10} {late_pct:>10.2} {rate:>12.1} {:>10.1} {:>6}",
            targets.len(),
            100.0 * cpu as f64 / wall.as_nanos() as f64,
            if held { "yes" } else { "no" }
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let codec = codec_of(&a.codec)?;
    match a.mode.as_str() {
        "cpu" => cpu_mode(&a, codec),
        "packets" => packets_mode(&a, codec),
        m => anyhow::bail!("unknown mode {m:?} (cpu, packets)"),
    }
}
