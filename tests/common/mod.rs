//! Shared helpers for the integration tests: the real `hasp` binary, real sockets.
//!
//! Tests never pick a "free" port for another process. hasp and sipp bind port 0 (sipp:
//! 5060 upward) and report or reveal what they bound. Programs that cannot (Kamailio,
//! rtpengine's NG port, etcd) and the relays' RTP ranges get fixed ports, each owned by
//! one test, all below the ephemeral range test.sh sets (48000-60999): RTP ranges in
//! 40000-47099 and 47200-47999, Kamailio/rtpengine in 47100-47199, etcd clusters in 23700-24099, the
//! sip_edge barrier UAs in 25000-25099. tests/port_plan.rs checks that no two test files
//! share a fixed range or etcd base (an etcd base B uses B+1..B+23).

#![allow(dead_code)]

pub mod etcd;
pub mod ua;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of the `hasp` binary, built on first use if the test run did not build it.
pub fn hasp_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // scripts/test.sh builds everything first and says where: no cargo run from
        // inside the tests (nextest's own build unifies dev-dependency features
        // differently, so a `cargo build` here would rebuild under running tests).
        if let Some(p) = std::env::var_os("HASP_BIN") {
            return PathBuf::from(p);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        // The same build as scripts/test.sh: a narrower one (`-p hasp-tools`) would
        // unify features differently and rebuild half the dependency tree under every
        // test's feet.
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "--workspace", "--all-targets"])
            .current_dir(&root)
            .status()
            .expect("cargo build");
        assert!(status.success(), "building hasp failed");
        target.join("debug").join("hasp")
    })
    .clone()
}

/// A `hasp relay` process; killed on drop.
pub struct RelayProc {
    pub child: Child,
    pub ready_line: String,
    pub api: String,
    pub token: Option<String>,
    agent: ureq::Agent,
}

pub const TOKEN: &str = "test-token-0123456789";

impl RelayProc {
    /// Starts `hasp relay` with a token and the given extra arguments.
    pub fn start(extra: &[&str]) -> Self {
        let mut args = vec!["relay", "--listen-api", "127.0.0.1:0", "--api-token", TOKEN];
        args.extend_from_slice(extra);
        Self::spawn(&args, Some(TOKEN.to_string()))
    }

    /// Starts `hasp` with exactly these arguments.
    pub fn spawn(args: &[&str], token: Option<String>) -> Self {
        let mut child = Command::new(hasp_bin())
            .args(args)
            .env("HASP_LOG", std::env::var("HASP_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hasp");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(" ready ") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("hasp printed no ready line");
        let api = line.split_whitespace().find_map(|w| w.strip_prefix("api=")).expect("api= in ready line").to_string();
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
        Self { child, api, token, agent, ready_line: line }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a request with the relay's token; returns status and JSON body (Null if none).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call_with(method, path, body, self.token.as_deref())
    }

    pub fn call_with(&self, method: &str, path: &str, body: Option<&str>, token: Option<&str>) -> (u16, Value) {
        self.call_with_base(&self.api, method, path, body, token)
    }

    /// Like `call_with`, against another listener of the same process (e.g. LI).
    pub fn call_with_base(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.agent.request(method, &format!("{base}{path}"));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap_or_default();
        let v = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, v)
    }

    pub fn metrics(&self) -> String {
        let (s, v) = self.call("GET", "/metrics", None);
        assert_eq!(s, 200);
        v.as_str().unwrap_or_default().to_string()
    }

    /// Value of one metric series (exact name with labels).
    pub fn metric(&self, series: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {series}"))
    }

    /// Creates a session; returns (id, [(rtp, rtcp) ports of A, of B]).
    /// Creates a session whose legs send to `a` and `b`; as [`RelayProc::create`].
    pub fn create_between(
        &self,
        a: &UdpSocket,
        b: &UdpSocket,
    ) -> (String, SocketAddr, [SocketAddr; 2], [SocketAddr; 2]) {
        let (a, b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        self.create(&format!(r#"{{"legs":[{{"remote":"{a}"}},{{"remote":"{b}"}}]}}"#))
    }

    pub fn create(&self, body: &str) -> (String, SocketAddr, [SocketAddr; 2], [SocketAddr; 2]) {
        let (s, v) = self.call("POST", "/v1/sessions", Some(body));
        assert_eq!(s, 201, "create: {v}");
        let ip: std::net::IpAddr = v["address"].as_str().unwrap().parse().unwrap();
        let port = |l: usize, k: &str| SocketAddr::new(ip, v["legs"][l][k].as_u64().unwrap() as u16);
        let id = v["id"].as_str().unwrap().to_string();
        (
            id,
            SocketAddr::new(ip, 0),
            [port(0, "rtp_port"), port(1, "rtp_port")],
            [port(0, "rtcp_port"), port(1, "rtcp_port")],
        )
    }

    /// Waits for the relay session whose legs' signalled remotes are `a` and `b` (a
    /// call's media anchored by a proxy or Kamailio) and returns it.
    pub fn wait_media_session(&self, a: &str, b: &str) -> Value {
        wait_for("the call's media session", Duration::from_secs(15), || {
            let (_, v) = self.call("GET", "/v1/sessions", None);
            v["sessions"]
                .as_array()?
                .iter()
                .find(|s| s["legs"][0]["remote"] == a && s["legs"][1]["remote"] == b)
                .cloned()
        })
    }

    /// Number of open file descriptors of the relay process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A UDP endpoint on loopback with a receive timeout.
pub fn udp() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// A 172-byte G.711 RTP packet (20 ms) with `tag` in the payload.
pub fn rtp(seq: u16, ssrc: u32, tag: u8) -> Vec<u8> {
    let mut p = vec![tag; 172];
    p[0] = 0x80;
    p[1] = 0; // PCMU
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&(seq as u32 * 160).to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

/// A minimal RTCP receiver report from `ssrc`.
pub fn rtcp(ssrc: u32, tag: u8) -> Vec<u8> {
    let mut p = vec![0x80, 201, 0, 1, 0, 0, 0, 0, tag, tag, tag, tag];
    p[4..8].copy_from_slice(&ssrc.to_be_bytes());
    let words = (p.len() / 4 - 1) as u16;
    p[2..4].copy_from_slice(&words.to_be_bytes());
    p
}

/// Receives one datagram; panics on timeout.
pub fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).expect("datagram expected");
    (buf[..n].to_vec(), from)
}

/// REGISTERs `user` with `contact`, answering the digest challenge with `password`;
/// returns the final status code.
pub fn sip_register(proxy: &str, domain: &str, user: &str, password: &str, contact: &str, expires: u32) -> u16 {
    sip_register_within(proxy, domain, user, password, contact, expires, Duration::from_secs(3))
        .expect("an answer to REGISTER")
}

/// [`sip_register`], waiting up to `within` for each answer; `None` if one did not come.
pub fn sip_register_within(
    proxy: &str,
    domain: &str,
    user: &str,
    password: &str,
    contact: &str,
    expires: u32,
    within: Duration,
) -> Option<u16> {
    use sip::digest::{expected_response, Credentials};
    use sip::Message;
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let me = s.local_addr().unwrap();
    let mk = |cseq: u32, auth: Option<String>| {
        let mut m = format!(
            "REGISTER sip:{domain} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-t{cseq}-{user}\r\nFrom: <sip:{user}@{domain}>;tag=r{user}\r\nTo: <sip:{user}@{domain}>\r\nCall-ID: reg-{user}-{me}\r\nCSeq: {cseq} REGISTER\r\nContact: <{contact}>\r\nExpires: {expires}\r\nMax-Forwards: 70\r\n"
        );
        if let Some(a) = auth {
            m.push_str(&format!("Authorization: {a}\r\n"));
        }
        m.push_str("Content-Length: 0\r\n\r\n");
        m
    };
    let mut buf = [0u8; 4096];
    s.send_to(mk(1, None).as_bytes(), proxy).unwrap();
    let n = s.recv(&mut buf).ok()?;
    let (r, _) = Message::parse(&buf[..n], false).unwrap();
    assert_eq!(r.code(), Some(401), "challenged first");
    let chal = r
        .headers
        .iter()
        .find(|(n, v)| n.eq_ignore_ascii_case("WWW-Authenticate") && v.contains("SHA-256"))
        .map(|(_, v)| v.clone())
        .expect("a SHA-256 challenge");
    let nonce = chal.split("nonce=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let mut c = Credentials {
        username: user.into(),
        realm: domain.into(),
        nonce: nonce.clone(),
        uri: format!("sip:{domain}"),
        response: String::new(),
        algorithm: Some("SHA-256".into()),
        qop: Some("auth".into()),
        nc: Some("00000001".into()),
        cnonce: Some("c0ffee".into()),
    };
    c.response = expected_response(&c, "REGISTER", password).unwrap();
    let auth = format!(
        "Digest username=\"{user}\", realm=\"{domain}\", nonce=\"{nonce}\", uri=\"sip:{domain}\", response=\"{}\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"c0ffee\"",
        c.response
    );
    s.send_to(mk(2, Some(auth)).as_bytes(), proxy).unwrap();
    let n = s.recv(&mut buf).ok()?;
    Message::parse(&buf[..n], false).ok()?.0.code()
}

/// Provisions a SIP user through `POST /v1/users`.
pub fn add_sip_user(relay: &RelayProc, user: &str, domain: &str, password: &str) {
    let body = format!(r#"{{"user":"{user}","domain":"{domain}","password":"{password}"}}"#);
    let (s, v) = relay.call("POST", "/v1/users", Some(&body));
    assert_eq!(s, 201, "{v}");
}

/// The sipp scenarios and Kamailio configurations of the interop tests.
pub fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Starts one sipp call (`-m 1`) of `scenario` on `port`, run in `dir` (its stderr goes
/// to `<scenario>.stderr` there), with `-key` values and extra arguments.
///
/// `port` 0 lets sipp pick its SIP port itself (it tries 5060 upward until a bind
/// succeeds, so concurrent tests never race for one); [`sipp_port`] reads it back.
pub fn sipp(dir: &std::path::Path, scenario: &str, port: u16, keys: &[(&str, String)], extra: &[&str]) -> Child {
    let mut c = Command::new("sipp");
    c.current_dir(dir).arg("-sf").arg(interop_dir().join(scenario)).args([
        "-i",
        "127.0.0.1",
        "-m",
        "1",
        "-nostdin",
        "-timeout",
        "30s",
    ]);
    if port != 0 {
        c.args(["-p", &port.to_string()]);
    }
    c.args(extra).stdout(Stdio::null()).stderr(std::fs::File::create(dir.join(format!("{scenario}.stderr"))).unwrap());
    for (k, v) in keys {
        c.args(["-key", k, v]);
    }
    c.spawn().expect("sipp (apt-get install sip-tester)")
}

/// One value of the `key=value` words of hasp's ready line.
pub fn field(line: &str, key: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("{key} in {line}")).to_string()
}

/// The SIP port a sipp started with port 0 bound: its UDP socket or listening TCP socket
/// on loopback below 6000 (its media sockets start at 6000), read from /proc once it
/// exists, so nothing is sent to sipp before it listens.
pub fn sipp_port(sipp: &Child) -> u16 {
    let pid = sipp.id();
    wait_for("sipp to bind its SIP port", Duration::from_secs(10), || {
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
            .collect();
        ["/proc/net/udp", "/proc/net/tcp"].iter().find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (ip, port) = f.get(1)?.split_once(':')?;
                let port = u16::from_str_radix(port, 16).ok()?;
                let usable = table.ends_with("udp") || f.get(3) == Some(&"0A");
                (usable && ip == "0100007F" && port < 6000 && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)))
                    .then_some(port)
            })
        })
    })
}

/// An empty scratch directory for one test (`name` keeps tests apart).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hasp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `hasp up` (relay, SIP proxy and registrar for `domain`) on ephemeral API and SIP
/// ports with its own embedded store; returns it, its SIP address and its scratch
/// directory (where sipp runs).
pub fn up_with_sip(domain: &str, rtp_ports: &str, name: &str) -> (RelayProc, String, PathBuf) {
    up_with_sip_args(domain, rtp_ports, name, &[])
}

/// [`up_with_sip`] with more arguments for `hasp up`.
pub fn up_with_sip_args(domain: &str, rtp_ports: &str, name: &str, extra: &[&str]) -> (RelayProc, String, PathBuf) {
    let dir = scratch_dir(name);
    let store = format!("embedded:{}", dir.join("hasp.redb").display());
    let args = [
        "up",
        "--listen-api",
        "127.0.0.1:0",
        "--api-token",
        TOKEN,
        "--listen-sip",
        "127.0.0.1:0",
        "--domain",
        domain,
        "--store",
        &store,
        "--rtp-ports",
        rtp_ports,
    ];
    let mut args = args.to_vec();
    args.extend_from_slice(extra);
    let relay = RelayProc::spawn(&args, Some(TOKEN.to_string()));
    let sip = field(&relay.ready_line, "sip=");
    (relay, sip, dir)
}

/// The caller's side of a call to `callee` (registered) through `sip`: INVITE, the
/// callee answers, ACK, media both ways through the relay, BYE. Returns the relay
/// ports the two sides were given.
pub fn call_through(sip: &str, callee: &ua::Ua, call_id: &str) -> (u16, u16) {
    use ua::*;
    let (alice, alice_rtp, bob_rtp) = (Ua::new(), udp(), udp());
    let proxy_addr: SocketAddr = sip.parse().unwrap();
    alice.send(sip, &invite(&alice, "bob", call_id, alice_rtp.local_addr().unwrap().port()));
    let inv = callee.recv_final(Duration::from_secs(10));
    assert_eq!((inv.method(), inv.call_id()), ("INVITE", call_id));
    let to_bob = sdp_port(&inv);
    answer_200(callee, &inv, bob_rtp.local_addr().unwrap().port(), proxy_addr);
    let ok = alice.recv_final(Duration::from_secs(10));
    assert_eq!(ok.code(), Some(200), "{ok:?}");
    let to_alice = sdp_port(&ok);
    alice.send(sip, &in_dialog(&alice, &ok, "ACK", 1));
    assert_eq!(callee.recv_final(Duration::from_secs(5)).method(), "ACK");
    alice_rtp.send_to(&rtp(1, 1, 1), ("127.0.0.1", to_alice)).unwrap();
    assert_eq!(recv(&bob_rtp).0, rtp(1, 1, 1));
    bob_rtp.send_to(&rtp(1, 2, 2), ("127.0.0.1", to_bob)).unwrap();
    assert_eq!(recv(&alice_rtp).0, rtp(1, 2, 2));
    alice.send(sip, &in_dialog(&alice, &ok, "BYE", 2));
    let bye = callee.recv_final(Duration::from_secs(5));
    assert_eq!(bye.method(), "BYE");
    callee.sock.send_to(&bye.response(200, "OK", None).to_bytes(), proxy_addr).unwrap();
    assert_eq!(alice.recv_final(Duration::from_secs(5)).code(), Some(200));
    (to_alice, to_bob)
}
