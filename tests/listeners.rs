//! Listeners under abuse, and the ready file: black-box tests of the real `hasp`.
//!
//! HTTP listeners (the relay's API, the LI API, `hasp proxy`'s API) cap connections per
//! source IP and in total, close a request head that does not complete (slowloris) and a
//! connection on which nothing moves, and back off rather than spin when the process is
//! out of descriptors. `--ready-file` reports every listener's bound address, so every
//! listener here binds port 0.
//!
//! RTP ranges used here: 47700-47899.

mod common;

use common::{scratch_dir, wait_for};
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LI_TOKEN: &str = "li-token-listeners-0123";
const API_TOKEN: &str = "api-token-listeners-0123";

/// A `hasp` process started with `--ready-file`; killed on drop.
struct Hasp {
    child: Child,
    ready: Value,
    dir: PathBuf,
}

impl Hasp {
    /// Starts `hasp ARGS --ready-file DIR/ready.json` (with the open-file limit set to
    /// `nofile`, soft and hard, if given) and waits for the file.
    fn start(name: &str, args: &[&str], nofile: Option<u64>) -> Self {
        let dir = scratch_dir(name);
        let path = dir.join("ready.json");
        let mut cmd = Command::new(common::hasp_bin());
        cmd.args(args)
            .arg("--ready-file")
            .arg(&path)
            .env("HASP_LOG", std::env::var("HASP_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn hasp");
        let ready = wait_for("the ready file", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("hasp exited before it was ready: {status}");
            }
            // Written whole and renamed into place: a file that exists parses.
            let text = std::fs::read_to_string(&path).ok()?;
            Some(serde_json::from_str::<Value>(&text).expect("the ready file is JSON"))
        });
        Self { child, ready, dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A listener's address from the ready file.
    fn addr(&self, key: &str) -> SocketAddr {
        self.ready[key].as_str().unwrap_or_else(|| panic!("{key} in {}", self.ready)).parse().unwrap()
    }

    /// Descriptors open in the process numbered below `n` (what accept(2) can still hand
    /// out under a limit of `n`; descriptors inherited above it do not count).
    fn fds_below(&self, n: u64) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok()).filter(|fd| *fd < n).count() as u64
            })
            .unwrap_or(0)
    }

    /// User plus system CPU time of the process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which is in parentheses and may hold spaces):
        // utime and stime are the 14th and 15th of the whole line.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for Hasp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP connection to `to` from the loopback address `from` (bound before connect, so
/// one test can be several sources).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = to else { panic!("IPv4 listeners only here") };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket owned by the TcpStream at once; the sockaddrs are valid
    // sockaddr_in values for the duration of each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let s = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        let r = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(r, 0, "bind {from}: {}", std::io::Error::last_os_error());
        let remote = sockaddr(*to.ip(), to.port());
        let r = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert_eq!(r, 0, "connect {to}: {}", std::io::Error::last_os_error());
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }
}

/// One keep-alive `GET path` on `s`; the status, or `None` if the server closed the
/// connection instead of answering.
fn get(s: &mut TcpStream, path: &str, token: Option<&str>) -> Option<u16> {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    if s.write_all(format!("GET {path} HTTP/1.1\r\nHost: hasp\r\n{auth}\r\n").as_bytes()).is_err() {
        return None;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("GET {path}: {e}"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(status)
}

/// Whether the server closes `s` (end of stream or reset) rather than answering; a
/// read that times out is a connection left open.
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(e) => panic!("read: {e}"),
            // An answer (e.g. 408) is fine as long as the connection then closes.
            Ok(_) => continue,
        }
    }
}

/// Value of one metric series (exact name with labels) from `GET /metrics` at `api`,
/// asked from 127.0.0.3 (a source no test holds connections from).
fn metric(api: SocketAddr, series: &str, token: Option<&str>) -> u64 {
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 3), api);
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: hasp\r\nConnection: close\r\n{auth}\r\n").as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
}

/// A relay with its API and LI API on port 0 and `extra` arguments.
fn relay_with_li(name: &str, rtp: &str, extra: &[&str]) -> Hasp {
    let dir = scratch_dir(&format!("{name}-li"));
    let audit = dir.join("audit.log");
    let mut args = vec![
        "relay",
        "--no-auth",
        "--listen-api",
        "127.0.0.1:0",
        "--listen-li",
        "127.0.0.1:0",
        "--li-token",
        LI_TOKEN,
        "--li-audit-log",
        audit.to_str().unwrap(),
        "--rtp-ports",
        rtp,
    ];
    args.extend_from_slice(extra);
    Hasp::start(name, &args, None)
}

#[test]
fn one_source_at_its_http_connection_cap_leaves_room_for_other_sources() {
    let hasp = relay_with_li("http-per-ip-cap", "47700-47719", &["--http-max-connections-per-ip", "4"]);
    // The relay's API and the LI API, each with its own cap (the LI API answers 401
    // without its token: an answer all the same).
    for (listener, path) in [("api", "/health"), ("li_api", "/v1/li/stats")] {
        let addr = hasp.addr(listener);
        let mut held: Vec<TcpStream> = (0..4).map(|_| connect_from(Ipv4Addr::LOCALHOST, addr)).collect();
        for s in &mut held {
            assert!(get(s, path, None).is_some(), "{listener}: a connection under the cap is served");
        }
        // A fifth from the same source is closed without an answer …
        let mut fifth = connect_from(Ipv4Addr::LOCALHOST, addr);
        assert_eq!(get(&mut fifth, path, None), None, "{listener}: a fifth connection from 127.0.0.1 is refused");
        // … while another source is served, and so are the four held open.
        let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr);
        assert!(get(&mut other, path, None).is_some(), "{listener}: 127.0.0.2 is served");
        assert!(get(&mut held[0], path, None).is_some(), "{listener}: the held connections still work");
        // Once one closes, the source gets its place back.
        drop(held.pop());
        wait_for("127.0.0.1 to be served again", Duration::from_secs(10), || {
            get(&mut connect_from(Ipv4Addr::LOCALHOST, addr), path, None)
        });
    }
    // Counted (the LI API's listener is kept off /metrics: interception stays invisible).
    assert!(metric(hasp.addr("api"), "hasp_http_connections_refused_total{listener=\"api\"}", None) >= 1);
}

#[test]
fn slowloris_half_a_header_is_closed_after_the_header_timeout() {
    let relay = relay_with_li("http-slowloris", "47720-47739", &["--http-header-timeout-ms", "300"]);
    let proxy = Hasp::start(
        "http-slowloris-proxy",
        &[
            "proxy",
            "--listen-api",
            "127.0.0.1:0",
            "--api-token",
            API_TOKEN,
            "--listen-sip",
            "127.0.0.1:0",
            "--domain",
            common::ua::DOMAIN,
            "--store",
            "memory:",
            // Never asked: no call is placed.
            "--relay",
            "http://127.0.0.1:9",
            "--http-header-timeout-ms",
            "300",
        ],
        None,
    );
    for (name, addr) in
        [("relay api", relay.addr("api")), ("LI api", relay.addr("li_api")), ("proxy api", proxy.addr("api"))]
    {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, addr);
        s.write_all(b"GET /health HTTP/1.1\r\nHost: hasp\r\nX-Slow: ").unwrap();
        assert!(closed_by_server(&mut s), "{name}: a half-sent header is closed");
        // Nothing sent at all: closed as well.
        let mut silent = connect_from(Ipv4Addr::LOCALHOST, addr);
        assert!(closed_by_server(&mut silent), "{name}: a silent connection is closed");
        // The listener serves whoever sends a whole request.
        let mut ok = connect_from(Ipv4Addr::LOCALHOST, addr);
        assert!(get(&mut ok, "/health", None).is_some(), "{name}: still serving");
    }
    assert!(metric(relay.addr("api"), "hasp_http_timeouts_total{listener=\"api\"}", None) >= 2);
    assert!(metric(proxy.addr("api"), "hasp_http_timeouts_total{listener=\"api\"}", Some(API_TOKEN)) >= 2);
}

#[test]
fn stalled_request_body_is_closed_after_the_idle_timeout() {
    let hasp = relay_with_li("http-idle", "47740-47759", &["--http-idle-timeout-ms", "300"]);
    let api = hasp.addr("api");
    let mut s = connect_from(Ipv4Addr::LOCALHOST, api);
    // A whole head (the header timeout no longer applies), then 10 of 100 body bytes.
    s.write_all(
        b"POST /v1/sessions HTTP/1.1\r\nHost: hasp\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"legs\":[",
    )
    .unwrap();
    assert!(closed_by_server(&mut s), "a body that stops coming is closed");
    let mut ok = connect_from(Ipv4Addr::LOCALHOST, api);
    assert_eq!(get(&mut ok, "/health", None), Some(200));
    assert!(metric(api, "hasp_http_timeouts_total{listener=\"api\"}", None) >= 1);
}

#[test]
fn descriptor_exhaustion_backs_off_without_spinning_and_serves_again() {
    const NOFILE: u64 = 64;
    let hasp = Hasp::start(
        "http-emfile",
        &[
            "relay",
            "--no-auth",
            "--listen-api",
            "127.0.0.1:0",
            "--rtp-ports",
            "47760-47779",
            // Caps and timeouts out of the way: descriptors run out first.
            "--http-max-connections",
            "100000",
            "--http-max-connections-per-ip",
            "100000",
            "--http-header-timeout-ms",
            "600000",
            "--http-idle-timeout-ms",
            "600000",
        ],
        Some(NOFILE),
    );
    let api = hasp.addr("api");
    // More idle connections than the process can hold: the kernel queues the rest.
    let idle: Vec<TcpStream> = (0..NOFILE + 16).map(|_| connect_from(Ipv4Addr::LOCALHOST, api)).collect();
    wait_for("hasp to run out of descriptors", Duration::from_secs(20), || {
        (hasp.fds_below(NOFILE) >= NOFILE).then_some(())
    });
    // Saturated: accept fails with EMFILE. A loop retrying at once would burn a core;
    // backing off costs next to nothing. Generous bound: a quarter of the wall time.
    let (cpu0, t0) = (hasp.cpu_ticks(), Instant::now());
    std::thread::sleep(Duration::from_secs(2)); // the measuring window, not a wait for an event
    let (cpu, wall) = (hasp.cpu_ticks() - cpu0, t0.elapsed());
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_secs = cpu as f64 / hz;
    assert!(cpu_secs < wall.as_secs_f64() / 4.0, "{cpu_secs:.2} s of CPU in {wall:?} while out of descriptors");
    drop(idle);
    let status = wait_for("the API to serve again", Duration::from_secs(20), || {
        get(&mut connect_from(Ipv4Addr::LOCALHOST, api), "/health", None)
    });
    assert_eq!(status, 200);
    assert!(metric(api, "hasp_http_accept_backoffs_total{listener=\"api\"}", None) >= 1, "the back-off is counted");
}

/// Checks every listener the ready file names answers its protocol.
fn every_listener_answers(hasp: &Hasp) {
    let r = &hasp.ready;
    assert_eq!(r["pid"].as_u64(), Some(hasp.pid() as u64), "{r}");
    for (key, v) in r.as_object().unwrap() {
        let Some(addr) = v.as_str() else { continue };
        if key == "role" || key == "id" {
            continue;
        }
        let addr: SocketAddr = addr.parse().unwrap_or_else(|_| panic!("{key}: {addr} is an address"));
        assert_ne!(addr.port(), 0, "{key}: the bound port, not the one asked for");
        match key.as_str() {
            "api" => assert_eq!(get(&mut connect_from(Ipv4Addr::LOCALHOST, addr), "/health", None), Some(200)),
            "li_api" => {
                assert_eq!(get(&mut connect_from(Ipv4Addr::LOCALHOST, addr), "/v1/li/stats", Some(LI_TOKEN)), Some(200))
            }
            "ng" => {
                let u = common::udp();
                u.send_to(b"c1 d7:command4:pinge", addr).unwrap();
                assert_eq!(common::recv(&u).0, b"c1 d6:result4:ponge");
            }
            "rtpp" => {
                let u = common::udp();
                u.send_to(b"c2 V\n", addr).unwrap();
                assert!(common::recv(&u).0.starts_with(b"c2 "), "RTPproxy answers");
            }
            "sip" => {
                let transports: Vec<&str> =
                    r["sip_transports"].as_array().unwrap().iter().filter_map(|t| t.as_str()).collect();
                assert!(transports.contains(&"udp"), "{r}");
                let ua = common::ua::Ua::new();
                ua.send(&addr.to_string(), &common::ua::options(&ua, 1));
                assert_eq!(
                    ua.recv_within(Duration::from_secs(5)).and_then(|m| m.code()),
                    Some(200),
                    "OPTIONS over UDP"
                );
                if transports.contains(&"tcp") {
                    use common::ua::DOMAIN;
                    let mut s = connect_from(Ipv4Addr::LOCALHOST, addr);
                    let me = s.local_addr().unwrap();
                    let opt = format!(
                        "OPTIONS sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK-ready\r\nFrom: <sip:ping@{DOMAIN}>;tag=p\r\nTo: <sip:{DOMAIN}>\r\nCall-ID: ready-{me}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                    );
                    s.write_all(opt.as_bytes()).unwrap();
                    let mut b = [0u8; 4096];
                    let n = s.read(&mut b).unwrap();
                    assert!(
                        b[..n].starts_with(b"SIP/2.0 200"),
                        "OPTIONS over TCP: {}",
                        String::from_utf8_lossy(&b[..n])
                    );
                }
            }
            other => panic!("unexpected listener {other} in {r}"),
        }
    }
}

fn keys(r: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

/// `hasp ROLE` with every relay listener (API, NG, RTPproxy, LI API) on port 0, plus `extra`.
fn start_relay_role(role: &str, ports: &str, extra: &[&str]) -> Hasp {
    let dir = scratch_dir(&format!("ready-{role}-li"));
    let audit = dir.join("audit.log");
    let mut args = vec![
        role,
        "--no-auth",
        "--listen-api",
        "127.0.0.1:0",
        "--listen-ng",
        "127.0.0.1:0",
        "--listen-rtpp",
        "127.0.0.1:0",
        "--listen-li",
        "127.0.0.1:0",
        "--li-token",
        LI_TOKEN,
        "--li-audit-log",
        audit.to_str().unwrap(),
        "--rtp-ports",
        ports,
    ];
    args.extend_from_slice(extra);
    Hasp::start(&format!("ready-{role}"), &args, None)
}

#[test]
fn relay_on_port_zero_writes_a_ready_file_whose_listeners_answer() {
    let hasp = start_relay_role("relay", "47780-47799", &[]);
    assert_eq!(hasp.ready["role"], "relay");
    assert_eq!(keys(&hasp.ready), ["api", "id", "li_api", "ng", "pid", "role", "rtpp"]);
    every_listener_answers(&hasp);
}

#[test]
fn up_on_port_zero_writes_a_ready_file_whose_listeners_answer() {
    let sip = ["--listen-sip", "127.0.0.1:0", "--domain", common::ua::DOMAIN, "--store", "memory:"];
    let hasp = start_relay_role("up", "47800-47819", &sip);
    assert_eq!(hasp.ready["role"], "up");
    assert_eq!(keys(&hasp.ready), ["api", "id", "li_api", "ng", "pid", "role", "rtpp", "sip", "sip_transports"]);
    assert_eq!(hasp.ready["sip_transports"], serde_json::json!(["udp", "tcp"]));
    every_listener_answers(&hasp);
}

#[test]
fn proxy_on_port_zero_writes_a_ready_file_whose_listeners_answer() {
    let hasp = Hasp::start(
        "ready-proxy",
        &[
            "proxy",
            "--no-auth",
            "--listen-api",
            "127.0.0.1:0",
            "--listen-sip",
            "127.0.0.1:0",
            "--domain",
            common::ua::DOMAIN,
            "--store",
            "memory:",
            "--relay",
            "http://127.0.0.1:9",
        ],
        None,
    );
    assert_eq!(hasp.ready["role"], "proxy");
    assert_eq!(keys(&hasp.ready), ["api", "id", "pid", "role", "sip", "sip_transports"]);
    every_listener_answers(&hasp);
}

#[test]
fn the_ready_file_is_gone_after_a_clean_shutdown() {
    let hasp = Hasp::start(
        "ready-gone",
        &["relay", "--no-auth", "--listen-api", "127.0.0.1:0", "--rtp-ports", "47820-47839"],
        None,
    );
    let path = hasp.dir.join("ready.json");
    assert!(path.exists());
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(hasp.pid() as i32, libc::SIGTERM) }, 0);
    wait_for("hasp to remove its ready file", Duration::from_secs(10), || (!path.exists()).then_some(()));
}
