//! `hasp-sipflood`: a SIP flooder for measuring how a proxy holds up under attack from
//! one source. It sends well-formed INVITEs (each with its own Call-ID and branch) for
//! one user, from one address, as fast as it can or at `--rate`, for `--secs`, with
//! `sendmmsg` batches; it reads and counts whatever comes back. Prints one JSON line:
//! `{"sent":N,"secs":S,"rate":R,"answers":A}`.

use anyhow::Context;
use clap::Parser;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Flood a SIP server with INVITEs from one address (for load and abuse tests)")]
struct Args {
    /// Where to send (the proxy's SIP address).
    #[arg(long)]
    target: SocketAddr,
    /// Source address to bind (IP:0 picks a port).
    #[arg(long, default_value = "127.0.0.1:0")]
    from: SocketAddr,
    /// INVITEs per second; 0: as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long to send.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// The Request-URI's user (unregistered, typically).
    #[arg(long, default_value = "nobody")]
    user: String,
    /// The Request-URI's domain.
    #[arg(long, default_value = "hasp.test")]
    domain: String,
}

/// Datagrams per `sendmmsg`.
const BATCH: usize = 32;
/// Width of the counter written into each message's Call-ID and branch.
const DIGITS: usize = 12;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let sock = UdpSocket::bind(a.from).with_context(|| format!("binding {}", a.from))?;
    sock.connect(a.target)?;
    sock.set_nonblocking(true)?;
    let me = sock.local_addr()?;
    let marker = "0".repeat(DIGITS);
    let body = "v=0\r\no=f 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    let template = format!(
        "INVITE sip:{u}@{d} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-fl{marker}\r\nFrom: <sip:flood@flood.example>;tag=fl\r\nTo: <sip:{u}@{d}>\r\nCall-ID: flood-{marker}\r\nCSeq: 1 INVITE\r\nContact: <sip:flood@{me}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len(),
        u = a.user,
        d = a.domain
    );
    let slots: Vec<usize> = template.match_indices(&marker).map(|(i, _)| i).collect();
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| template.clone().into_bytes()).collect();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(a.secs);
    let (mut sent, mut answers, mut n) = (0u64, 0u64, 0u64);
    let mut rbuf = [0u8; 4096];
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if a.rate > 0 {
            let due = (now.duration_since(started).as_secs_f64() * a.rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        for b in bufs.iter_mut() {
            n += 1;
            let digits = format!("{:0width$}", n % 10u64.pow(DIGITS as u32), width = DIGITS);
            for s in &slots {
                b[*s..*s + DIGITS].copy_from_slice(digits.as_bytes());
            }
        }
        let mut iovs: Vec<libc::iovec> =
            bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        // SAFETY: zeroed mmsghdr is valid; each points at one iovec alive for the call.
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: msgs is a valid array of BATCH headers on a connected socket.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if r > 0 {
            sent += r as u64;
        }
        while sock.recv(&mut rbuf).is_ok() {
            answers += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"sent": sent, "secs": secs, "rate": (sent as f64 / secs).round(), "answers": answers})
    );
    Ok(())
}
