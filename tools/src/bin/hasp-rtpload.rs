//! `hasp-rtpload`: RTP load through a relay, side by side with a baseline forwarder.
//!
//! N sessions, each sending P packets/s of 172-byte RTP (G.711, 20 ms) in both
//! directions. Reports forwarded packets/s, loss (a packet more than `--late-ms` late
//! counts as lost: kernel socket buffers otherwise hide overload), added latency p50/p99
//! and the forwarder's CPU time per forwarded packet. The baseline is a minimal
//! epoll + recvmmsg/sendmmsg forwarder in this tool, run under the same load in the
//! same invocation, so the ratio is meaningful on a noisy machine.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
#[command(name = "hasp-rtpload", version, about = "RTP load through hasp relay vs a baseline forwarder")]
struct Args {
    /// Relay REST API to create sessions on (e.g. http://127.0.0.1:8080). Without it and
    /// without --spawn-relay, only the baseline runs.
    #[arg(long)]
    api: Option<String>,
    /// API token of that relay.
    #[arg(long, env = "HASP_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PID of the relay process, to measure its CPU time (found automatically with
    /// --spawn-relay).
    #[arg(long)]
    relay_pid: Option<u32>,
    /// Start `hasp relay` (next to this binary) with one worker pinned to --fwd-core.
    #[arg(long)]
    spawn_relay: bool,
    /// Receive mode for the spawned relay.
    #[arg(long, default_value = "auto")]
    io_mode: String,
    /// RTP port range for the spawned relay.
    #[arg(long, default_value = "20000-29999")]
    rtp_ports: String,
    /// Sessions.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Packets per second per session and direction (50 = G.711 with 20 ms frames).
    #[arg(long, default_value_t = 50)]
    pps: u32,
    /// Seconds of load per target.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Packet size in bytes (RTP header included).
    #[arg(long, default_value_t = 172)]
    size: usize,
    /// A packet later than this many ms counts as lost.
    #[arg(long, default_value_t = 20)]
    late_ms: u64,
    /// Core for the forwarder under test (the spawned relay and the baseline).
    #[arg(long, default_value_t = 0)]
    fwd_core: usize,
    /// Core for this tool's sender and receivers.
    #[arg(long, default_value_t = 1)]
    gen_core: usize,
    /// What to run, in order: relay, baseline, or both.
    #[arg(long, default_value = "relay,baseline", value_delimiter = ',')]
    targets: Vec<String>,
    /// Print one JSON object per target as well.
    #[arg(long)]
    json: bool,
    /// Run the relay target once per value, with that percentage of sessions under a
    /// lawful-intercept task delivering to a sink in this tool (needs --spawn-relay).
    #[arg(long, value_delimiter = ',')]
    tap_percent: Vec<u32>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Report {
    target: String,
    sessions: usize,
    offered_pps: f64,
    forwarded_pps: f64,
    sent: u64,
    on_time: u64,
    late: u64,
    loss_pct: f64,
    latency_p50_us: u64,
    latency_p99_us: u64,
    cpu_ns_per_packet: f64,
    cpu_util_pct: f64,
    worker_cpu_ns_per_packet: f64,
    tapped_sessions: usize,
}

fn pin(core: usize) {
    if let Err(e) = dataplane::affinity::pin_current_thread(core) {
        eprintln!("warning: cannot pin to core {core}: {e}");
    }
}

/// Nanoseconds the threads of `pid` whose name starts with `prefix` spent on a CPU.
fn cpu_ns_named(pid: u32, prefix: &str) -> u64 {
    let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    d.flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .filter_map(|e| {
            std::fs::read_to_string(e.path().join("schedstat")).ok()?.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// A mediation-function sink: accepts and reads everything, counting bytes.
fn li_sink() -> Result<(SocketAddr, Arc<std::sync::atomic::AtomicU64>)> {
    use std::io::Read;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let b = bytes.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let b = b.clone();
            std::thread::spawn(move || {
                // The sink is not what is measured: let it yield to the generator.
                // SAFETY: setpriority on our own thread.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
                let mut c = c;
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    b.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    Ok((addr, bytes))
}

/// Nanoseconds this task (thread) or all tasks of `pid` spent on a CPU.
fn cpu_ns(pid: u32, tid: Option<i32>) -> u64 {
    let read = |p: &str| -> u64 {
        std::fs::read_to_string(p).ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    match tid {
        Some(t) => read(&format!("/proc/{pid}/task/{t}/schedstat")),
        None => std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().map(|e| read(&format!("{}/schedstat", e.path().display()))).sum())
            .unwrap_or(0),
    }
}

fn gen_socket() -> Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // Large buffers so that drops are the forwarder's, not the generator's; lateness is
    // measured anyway.
    let _ = s.set_recv_buffer_size(16 << 20);
    let _ = s.set_send_buffer_size(16 << 20);
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
    let u: UdpSocket = s.into();
    u.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(u)
}

const BATCH: usize = 64;
const LI_TOKEN: &str = "hasp-rtpload-li";

/// Sends `msgs` datagrams with sendmmsg; `dst[i]` and `bufs[i]`.
fn sendmmsg(sock: &UdpSocket, bufs: &mut [[u8; 2048]], lens: &[usize], dst: &[SocketAddr]) {
    let n = lens.len();
    let mut names: Vec<socket2::SockAddr> = dst.iter().map(|d| (*d).into()).collect();
    let mut iovs: Vec<libc::iovec> = bufs[..n]
        .iter_mut()
        .zip(lens)
        .map(|(b, &l)| libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: l })
        .collect();
    // SAFETY: zeroed mmsghdr is valid; pointers below reference live locals.
    let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    for i in 0..n {
        msgs[i].msg_hdr.msg_name = names[i].as_ptr() as *mut libc::c_void;
        msgs[i].msg_hdr.msg_namelen = names[i].len();
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let mut off = 0;
    while off < n {
        // SAFETY: msgs[off..n] are valid mmsghdrs.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs[off..].as_mut_ptr(), (n - off) as u32, 0) };
        if r <= 0 {
            break;
        }
        off += r as usize;
    }
    let _ = &mut names;
}

struct Histogram {
    us: Vec<u64>,
}

impl Histogram {
    const MAX_US: usize = 1_000_000;
    fn new() -> Self {
        Self { us: vec![0; Self::MAX_US + 1] }
    }
    fn add(&mut self, us: u64) {
        self.us[(us as usize).min(Self::MAX_US)] += 1;
    }
    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.us.iter_mut().zip(&o.us) {
            *a += b;
        }
    }
    fn quantile(&self, q: f64) -> u64 {
        let total: u64 = self.us.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil() as u64;
        let mut acc = 0;
        for (i, c) in self.us.iter().enumerate() {
            acc += c;
            if acc >= want {
                return i as u64;
            }
        }
        Self::MAX_US as u64
    }
}

struct RecvResult {
    received: u64,
    late: u64,
    hist: Histogram,
}

fn receiver(sock: UdpSocket, epoch: Instant, late: Duration, stop: Arc<AtomicBool>, core: usize) -> RecvResult {
    pin(core);
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: b.len() })
        .collect();
    // SAFETY: zeroed mmsghdr is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut r = RecvResult { received: 0, late: 0, hist: Histogram::new() };
    loop {
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = std::ptr::null_mut();
            msgs[i].msg_hdr.msg_namelen = 0;
        }
        // SAFETY: msgs and their iovecs point at live buffers.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            if stop.load(Ordering::Relaxed) {
                return r;
            }
            continue;
        }
        let now = epoch.elapsed().as_nanos() as u64;
        for i in 0..n as usize {
            let len = msgs[i].msg_len as usize;
            if len < 20 {
                continue;
            }
            let sent = u64::from_le_bytes(bufs[i][12..20].try_into().unwrap_or([0; 8]));
            let lat = Duration::from_nanos(now.saturating_sub(sent));
            r.received += 1;
            if lat > late {
                r.late += 1;
            } else {
                r.hist.add(lat.as_micros() as u64);
            }
        }
    }
}

/// Runs the load against `endpoints` (per session: A-side and B-side address).
fn run_load(args: &Args, endpoints: &[(SocketAddr, SocketAddr)], ga: &UdpSocket, gb: &UdpSocket) -> Result<Report> {
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let late = Duration::from_millis(args.late_ms);
    let rx: Vec<_> = [ga.try_clone()?, gb.try_clone()?]
        .into_iter()
        .map(|s| {
            let stop = stop.clone();
            let core = args.gen_core;
            std::thread::spawn(move || receiver(s, epoch, late, stop, core))
        })
        .collect();
    pin(args.gen_core);
    let n = endpoints.len() as u64;
    let per_sec = n * args.pps as u64;
    let dur = Duration::from_secs(args.duration);
    let mut sent_each = 0u64; // per direction
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut lens = Vec::with_capacity(BATCH);
    let mut dsts = Vec::with_capacity(BATCH);
    let start = Instant::now();
    while start.elapsed() < dur {
        let due = (start.elapsed().as_secs_f64() * per_sec as f64) as u64;
        for (sock, side) in [(ga, 0), (gb, 1)] {
            let mut m = sent_each;
            while m < due {
                lens.clear();
                dsts.clear();
                let now = epoch.elapsed().as_nanos() as u64;
                while m < due && lens.len() < BATCH {
                    let s = (m % n) as usize;
                    let seq = (m / n) as u16;
                    let b = &mut bufs[lens.len()];
                    b[0] = 0x80;
                    b[1] = 0;
                    b[2..4].copy_from_slice(&seq.to_be_bytes());
                    b[4..8].copy_from_slice(&((m / n) as u32 * 160).to_be_bytes());
                    b[8..12].copy_from_slice(&((s as u32) << 1 | side).to_be_bytes());
                    b[12..20].copy_from_slice(&now.to_le_bytes());
                    lens.push(args.size.clamp(20, 2048));
                    dsts.push(if side == 0 { endpoints[s].0 } else { endpoints[s].1 });
                    m += 1;
                }
                sendmmsg(sock, &mut bufs, &lens, &dsts);
            }
        }
        sent_each = due.max(sent_each);
        std::thread::sleep(Duration::from_micros(500));
    }
    let elapsed = start.elapsed();
    // Let in-flight packets land; anything later than `late` is lost anyway.
    std::thread::sleep(late + Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::new();
    let (mut received, mut late_n) = (0, 0);
    for h in rx {
        let r = h.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        received += r.received;
        late_n += r.late;
        hist.merge(&r.hist);
    }
    let sent = sent_each * 2;
    let on_time = received - late_n;
    Ok(Report {
        sessions: endpoints.len(),
        offered_pps: sent as f64 / elapsed.as_secs_f64(),
        forwarded_pps: on_time as f64 / elapsed.as_secs_f64(),
        sent,
        on_time,
        late: late_n,
        loss_pct: if sent == 0 { 0.0 } else { 100.0 * (sent - on_time.min(sent)) as f64 / sent as f64 },
        latency_p50_us: hist.quantile(0.5),
        latency_p99_us: hist.quantile(0.99),
        ..Report::default()
    })
}

/// A minimal forwarder: epoll over 2N sockets, recvmmsg from the ready one, sendmmsg the
/// batch out of its partner to the far generator socket. No latching, no statistics:
/// the least a userspace relay can do.
fn baseline(
    n: usize,
    ga: SocketAddr,
    gb: SocketAddr,
    core: usize,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<(Vec<(SocketAddr, SocketAddr)>, i32)>,
) -> Result<()> {
    pin(core);
    // SAFETY: plain syscall.
    let tid = unsafe { libc::gettid() };
    let mut socks = Vec::with_capacity(2 * n);
    for _ in 0..2 * n {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.set_nonblocking(true)?;
        socks.push(s);
    }
    // SAFETY: plain syscalls on descriptors we own.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        bail!("epoll_create1 failed");
    }
    for (i, s) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        // SAFETY: valid epoll fd and event.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
    }
    let endpoints =
        (0..n).map(|i| (socks[2 * i].local_addr().unwrap(), socks[2 * i + 1].local_addr().unwrap())).collect();
    let _ = ready.send((endpoints, tid));
    const B: usize = 8;
    let mut bufs = vec![[0u8; 2048]; B];
    let mut iovs: Vec<libc::iovec> =
        bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: 2048 }).collect();
    // SAFETY: zeroed mmsghdr is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..B).map(|_| unsafe { std::mem::zeroed() }).collect();
    let dst = [socket2::SockAddr::from(gb), socket2::SockAddr::from(ga)];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: events has room for 256 entries.
        let k = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 256, 50) };
        for e in &events[..k.max(0) as usize] {
            let i = e.u64 as usize;
            let peer = i ^ 1;
            loop {
                for j in 0..B {
                    iovs[j].iov_len = 2048;
                    msgs[j].msg_hdr.msg_iov = &mut iovs[j];
                    msgs[j].msg_hdr.msg_iovlen = 1;
                    msgs[j].msg_hdr.msg_name = std::ptr::null_mut();
                    msgs[j].msg_hdr.msg_namelen = 0;
                }
                // SAFETY: msgs point at live buffers.
                let r = unsafe {
                    libc::recvmmsg(
                        socks[i].as_raw_fd(),
                        msgs.as_mut_ptr(),
                        B as u32,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if r <= 0 {
                    break;
                }
                let d = &dst[i & 1];
                for j in 0..r as usize {
                    iovs[j].iov_len = msgs[j].msg_len as usize;
                    msgs[j].msg_hdr.msg_name = d.as_ptr() as *mut libc::c_void;
                    msgs[j].msg_hdr.msg_namelen = d.len();
                }
                // SAFETY: as above.
                unsafe { libc::sendmmsg(socks[peer].as_raw_fd(), msgs.as_mut_ptr(), r as u32, 0) };
                if (r as usize) < B {
                    break;
                }
            }
        }
    }
    // SAFETY: closing our epoll fd.
    unsafe { libc::close(ep) };
    Ok(())
}

struct Spawned {
    child: Child,
    api: String,
    li: Option<String>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_relay(args: &Args) -> Result<Spawned> {
    let exe: PathBuf = std::env::current_exe()?.with_file_name("hasp");
    let mut child = Command::new(&exe)
        .args(["relay", "--no-auth", "--listen-api", "127.0.0.1:0", "--workers", "1"])
        .args(["--cores", &args.fwd_core.to_string(), "--rtp-ports", &args.rtp_ports, "--io-mode", &args.io_mode])
        .args(if args.tap_percent.is_empty() {
            vec![]
        } else {
            let audit = std::env::temp_dir().join(format!("hasp-rtpload-li-{}.log", std::process::id()));
            vec![
                "--listen-li".to_string(),
                "127.0.0.1:0".into(),
                "--li-token".into(),
                LI_TOKEN.into(),
                "--li-audit-log".into(),
                audit.display().to_string(),
            ]
        })
        .env("HASP_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let out = child.stdout.take().context("relay stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let api = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("api="))
        .with_context(|| format!("no ready line from relay: {line:?}"))?
        .to_string();
    eprintln!("spawned: {}", line.trim());
    let li = line.split_whitespace().find_map(|w| w.strip_prefix("li=")).map(str::to_string);
    Ok(Spawned { child, api, li })
}

fn relay_target(
    args: &Args,
    ga: &UdpSocket,
    gb: &UdpSocket,
    spawned: Option<&Spawned>,
    tap_pct: u32,
) -> Result<Report> {
    let api = spawned.as_ref().map(|s| s.api.clone()).or_else(|| args.api.clone()).context("--api or --spawn-relay")?;
    let pid = spawned.as_ref().map(|s| s.child.id()).or(args.relay_pid);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let auth = args.token.as_ref().map(|t| format!("Bearer {t}"));
    let body = serde_json::json!({"legs": [{"remote": ga.local_addr()?.to_string()}, {"remote": gb.local_addr()?.to_string()}]})
        .to_string();
    let mut endpoints = Vec::with_capacity(args.sessions);
    let mut ids = Vec::with_capacity(args.sessions);
    for _ in 0..args.sessions {
        let mut req = agent.post(&format!("{api}/v1/sessions")).set("Content-Type", "application/json");
        if let Some(a) = &auth {
            req = req.set("Authorization", a);
        }
        let v: serde_json::Value = req.send_string(&body).context("creating a session")?.into_json()?;
        let ip: std::net::IpAddr = v["address"].as_str().context("address")?.parse()?;
        let port = |l: usize| v["legs"][l]["rtp_port"].as_u64().unwrap_or(0) as u16;
        endpoints.push((SocketAddr::new(ip, port(0)), SocketAddr::new(ip, port(1))));
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    let tapped = (args.sessions * tap_pct as usize).div_ceil(100);
    let xid = format!("00000000-0000-4000-8000-{:012x}", std::process::id() as u64 * 1000 + tap_pct as u64);
    let li = spawned.and_then(|s| s.li.clone());
    if tapped > 0 {
        let li = li.as_ref().context("--tap-percent needs --spawn-relay")?;
        let (sink, _) = li_sink()?;
        let targets: Vec<_> = ids[..tapped].iter().map(|id| serde_json::json!({"session": id})).collect();
        let task = serde_json::json!({"xid": xid, "targets": targets, "destinations": [{"tcp": sink.to_string()}]});
        agent
            .post(&format!("{li}/v1/li/tasks"))
            .set("Authorization", &format!("Bearer {LI_TOKEN}"))
            .send_string(&task.to_string())
            .context("creating the LI task")?;
    }
    let cpu0 = pid.map(|p| (cpu_ns(p, None), cpu_ns_named(p, "hasp-worker")));
    let t0 = Instant::now();
    let mut r = run_load(args, &endpoints, ga, gb)?;
    let wall = t0.elapsed();
    if let (Some(p), Some((c0, w0))) = (pid, cpu0) {
        let cpu = cpu_ns(p, None) - c0;
        let pkts = (r.on_time + r.late).max(1) as f64;
        r.cpu_ns_per_packet = cpu as f64 / pkts;
        r.worker_cpu_ns_per_packet = (cpu_ns_named(p, "hasp-worker") - w0) as f64 / pkts;
        r.cpu_util_pct = 100.0 * cpu as f64 / wall.as_nanos() as f64;
    }
    if tapped > 0 {
        if let Some(li) = &li {
            let _ = agent
                .delete(&format!("{li}/v1/li/tasks/{xid}"))
                .set("Authorization", &format!("Bearer {LI_TOKEN}"))
                .call();
        }
    }
    r.tapped_sessions = tapped;
    for id in ids {
        let mut req = agent.delete(&format!("{api}/v1/sessions/{id}"));
        if let Some(a) = &auth {
            req = req.set("Authorization", a);
        }
        let _ = req.call();
    }
    r.target = if tap_pct > 0 || !args.tap_percent.is_empty() {
        format!("hasp relay, {tap_pct}% tapped")
    } else {
        "hasp relay".into()
    };
    Ok(r)
}

fn baseline_target(args: &Args, ga: &UdpSocket, gb: &UdpSocket) -> Result<Report> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (n, a, b, core, st) = (args.sessions, ga.local_addr()?, gb.local_addr()?, args.fwd_core, stop.clone());
    let h = std::thread::spawn(move || baseline(n, a, b, core, st, tx));
    let (endpoints, tid) = rx.recv().context("baseline forwarder failed to start")?;
    let pid = std::process::id();
    let c0 = cpu_ns(pid, Some(tid));
    let t0 = Instant::now();
    let mut r = run_load(args, &endpoints, ga, gb)?;
    let wall = t0.elapsed();
    let cpu = cpu_ns(pid, Some(tid)) - c0;
    stop.store(true, Ordering::Relaxed);
    h.join().map_err(|_| anyhow::anyhow!("baseline panicked"))??;
    r.cpu_ns_per_packet = cpu as f64 / (r.on_time + r.late).max(1) as f64;
    r.cpu_util_pct = 100.0 * cpu as f64 / wall.as_nanos() as f64;
    r.target = "baseline recvmmsg/sendmmsg".into();
    Ok(r)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.sessions == 0 || args.pps == 0 {
        bail!("--sessions and --pps must be positive");
    }
    let (ga, gb) = (gen_socket()?, gen_socket()?);
    let mut reports = Vec::new();
    let spawned =
        if args.spawn_relay && args.targets.iter().any(|t| t == "relay") { Some(spawn_relay(&args)?) } else { None };
    for t in &args.targets {
        let r = match t.as_str() {
            "relay" if args.api.is_some() || args.spawn_relay => {
                let pcts = if args.tap_percent.is_empty() { vec![0] } else { args.tap_percent.clone() };
                for p in &pcts[..pcts.len() - 1] {
                    reports.push(relay_target(&args, &ga, &gb, spawned.as_ref(), *p)?);
                }
                relay_target(&args, &ga, &gb, spawned.as_ref(), pcts[pcts.len() - 1])?
            }
            "relay" => {
                eprintln!("skipping relay: give --api or --spawn-relay");
                continue;
            }
            "baseline" => baseline_target(&args, &ga, &gb)?,
            other => bail!("unknown target {other:?}"),
        };
        reports.push(r);
    }
    println!(
        "{:<28} {:>8} {:>11} {:>13} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6}",
        "target", "sessions", "offered/s", "forwarded/s", "loss%", "p50µs", "p99µs", "cpu ns/pkt", "wrk ns/pkt", "cpu%"
    );
    for r in &reports {
        println!(
            "{:<28} {:>8} {:>11.0} {:>13.0} {:>8.3} {:>8} {:>8} {:>10.0} {:>10.0} {:>6.1}",
            r.target,
            r.sessions,
            r.offered_pps,
            r.forwarded_pps,
            r.loss_pct,
            r.latency_p50_us,
            r.latency_p99_us,
            r.cpu_ns_per_packet,
            r.worker_cpu_ns_per_packet,
            r.cpu_util_pct
        );
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    if !args.tap_percent.is_empty() {
        if let Some(base) = reports.iter().find(|r| r.target.starts_with("hasp relay") && r.tapped_sessions == 0) {
            for r in reports.iter().filter(|r| r.tapped_sessions > 0) {
                println!(
                    "ratio {} / untapped: forwarded/s {:.3}, worker cpu per packet {:.2}, process cpu per packet {:.2}",
                    r.target,
                    r.forwarded_pps / base.forwarded_pps.max(1.0),
                    r.worker_cpu_ns_per_packet / base.worker_cpu_ns_per_packet.max(1.0),
                    r.cpu_ns_per_packet / base.cpu_ns_per_packet.max(1.0)
                );
            }
        }
    }
    if let [a, b] = &reports[..] {
        if b.cpu_ns_per_packet > 0.0 && a.cpu_ns_per_packet > 0.0 {
            println!(
                "ratio {} / {}: cpu per packet {:.2}, forwarded/s {:.2}",
                a.target,
                b.target,
                a.cpu_ns_per_packet / b.cpu_ns_per_packet,
                a.forwarded_pps / b.forwarded_pps.max(1.0)
            );
        }
    }
    Ok(())
}
