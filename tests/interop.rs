//! Interop with real software: Kamailio (rtpengine and rtpproxy modules) placing sipp
//! calls through `hasp relay`, RTP verified end to end. Needs `kamailio`,
//! `kamailio-extra-modules` and `sip-tester` (scripts/install-deps.sh installs them).

mod common;

use common::*;
use serde_json::Value;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hasp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Kamailio in the foreground (`-DD`); the creator and its children die on drop.
struct Kamailio {
    child: Child,
    port: u16,
}

impl Kamailio {
    /// Kamailio on SIP `port`: a fixed port owned by one test (Kamailio cannot bind port 0
    /// and report it; ports in 47100-47199 are below the ephemeral range test.sh sets).
    fn start(template: &str, port: u16, dir: &Path, subst: &[(&str, String)]) -> Self {
        let mut cfg = std::fs::read_to_string(interop_dir().join(template)).unwrap();
        cfg = cfg.replace("{SIP_PORT}", &port.to_string());
        for (k, v) in subst {
            cfg = cfg.replace(k, v);
        }
        let path = dir.join("kamailio.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("kamailio")
            .args(["-DD", "-E", "-m", "64", "-M", "8", "-f"])
            .arg(&path)
            .arg("-Y")
            .arg(dir)
            .arg("-w")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("kamailio.log")).unwrap())
            .spawn()
            .expect("kamailio (apt-get install kamailio kamailio-extra-modules)");
        let k = Self { child, port };
        // Ready when it answers OPTIONS.
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let me = probe.local_addr().unwrap();
        wait_for("kamailio to answer OPTIONS", Duration::from_secs(20), || {
            let msg = format!(
                "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-probe{}\r\nFrom: <sip:probe@{me}>;tag=p\r\nTo: <sip:127.0.0.1:{port}>\r\nCall-ID: probe-{}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 5\r\nContent-Length: 0\r\n\r\n",
                rand_tag(),
                rand_tag()
            );
            probe.send_to(msg.as_bytes(), ("127.0.0.1", port)).ok()?;
            let mut buf = [0u8; 2048];
            let (n, _) = probe.recv_from(&mut buf).ok()?;
            String::from_utf8_lossy(&buf[..n]).starts_with("SIP/2.0 200").then_some(())
        });
        k
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        // The creator's children (-DD keeps them as its own) first, then the creator.
        let _ = Command::new("pkill").args(["-KILL", "-P", &pid]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_tag() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

fn wait_exit(mut c: Child, what: &str) {
    let st = wait_for(what, Duration::from_secs(40), || c.try_wait().ok().flatten());
    assert!(st.success(), "{what} failed: {st}");
}

/// One call UAC → Kamailio → UAS with media anchored in hasp, RTP checked both ways.
fn call_through_kamailio(relay: &RelayProc, template: &str, sip_port: u16, subst: &[(&str, String)], name: &str) {
    let dir = tempdir(name);
    let kam = Kamailio::start(template, sip_port, &dir, subst);
    let (alice, bob) = (udp(), udp());
    let uas = sipp(
        &dir,
        "uas_media.xml",
        0,
        &[("media_b", bob.local_addr().unwrap().port().to_string())],
        &["-trace_msg", "-message_file", "uas_messages.log"],
    );
    let uas_port = sipp_port(&uas);
    let uac = sipp(
        &dir,
        "uac_media.xml",
        0,
        &[("media_a", alice.local_addr().unwrap().port().to_string()), ("uas_port", uas_port.to_string())],
        &[&format!("127.0.0.1:{}", kam.port)],
    );
    // The call is up once the relay knows both sides' addresses.
    let (alice_a, bob_a) = (alice.local_addr().unwrap().to_string(), bob.local_addr().unwrap().to_string());
    let session = relay.wait_media_session(&alice_a, &bob_a);
    let port = |leg: usize| session["legs"][leg]["rtp_port"].as_u64().unwrap() as u16;
    let relay_ip = session["address"].as_str().unwrap().to_string();
    // Alice was told (in the 200 OK) to send to leg A's port, Bob (in the INVITE) to leg B's.
    for seq in 0..20u16 {
        alice.send_to(&rtp(seq, 0xa11ce, 1), (relay_ip.as_str(), port(0))).unwrap();
        bob.send_to(&rtp(seq, 0xb0b, 2), (relay_ip.as_str(), port(1))).unwrap();
    }
    for seq in 0..20u16 {
        assert_eq!(recv(&bob), (rtp(seq, 0xa11ce, 1), format!("{relay_ip}:{}", port(1)).parse().unwrap()));
        assert_eq!(recv(&alice), (rtp(seq, 0xb0b, 2), format!("{relay_ip}:{}", port(0)).parse().unwrap()));
    }
    wait_exit(uac, "sipp UAC");
    wait_exit(uas, "sipp UAS");
    // The SDP the UAS received points at hasp: relay address and leg B's port.
    let log = std::fs::read_to_string(dir.join("uas_messages.log")).unwrap();
    let invite = &log[log.find("INVITE sip:").expect("INVITE in UAS log")..];
    assert!(invite.contains(&format!("c=IN IP4 {relay_ip}")), "{invite}");
    assert!(
        invite.contains(&format!("m=audio {} RTP/AVP 0 101", port(1))),
        "UAS must be offered hasp's port: {invite}"
    );
    // BYE made Kamailio delete the call: the session is gone.
    let id = session["id"].as_str().unwrap().to_string();
    wait_for("the session to be deleted after BYE", Duration::from_secs(10), || {
        (relay.call("GET", &format!("/v1/sessions/{id}"), None).0 == 404).then_some(())
    });
    drop(kam);
    let _ = std::fs::remove_dir_all(&dir);
}

fn relay_with(extra: &[&str]) -> (RelayProc, String) {
    let relay = RelayProc::start(extra);
    let out = relay.ready_line.clone();
    (relay, out)
}

fn ready_field(line: &str, key: &str) -> String {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("{key} in {line}")).to_string()
}

#[test]
fn kamailio_rtpengine_module_call_with_rtp_through_hasp() {
    let (relay, line) = relay_with(&["--rtp-ports", "42000-42199", "--listen-ng", "127.0.0.1:0"]);
    let ng = ready_field(&line, "ng=");
    let ng_port = ng.rsplit(':').next().unwrap().to_string();
    call_through_kamailio(&relay, "kamailio-rtpengine.cfg", 47110, &[("{NG_PORT}", ng_port.clone())], "kam-ng");
    // And the NG view agrees: no call left.
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(b"c1 d7:command4:liste", ng.as_str()).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"c1 d6:result2:ok5:callslee");
}

#[test]
fn kamailio_rtpproxy_module_call_with_rtp_through_hasp() {
    let (relay, line) = relay_with(&["--rtp-ports", "42200-42399", "--listen-rtpp", "127.0.0.1:0"]);
    let rtpp = ready_field(&line, "rtpp=");
    let rtpp_port = rtpp.rsplit(':').next().unwrap().to_string();
    call_through_kamailio(&relay, "kamailio-rtpproxy.cfg", 47111, &[("{RTPP_PORT}", rtpp_port)], "kam-rtpp");
    let (_, v): (u16, Value) = relay.call("GET", "/v1/sessions", None);
    assert_eq!(v["count"], 0);
}

/// A tiny NG client over UDP.
struct Ng {
    sock: UdpSocket,
    to: String,
    n: u32,
}

impl Ng {
    fn new(to: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        Self { sock, to: to.to_string(), n: 0 }
    }

    fn req(
        &mut self,
        dict: controlplane::control::ng::bencode::Value,
    ) -> Option<controlplane::control::ng::bencode::Value> {
        self.n += 1;
        let cookie = format!("{}_{}", std::process::id(), self.n);
        let mut msg = format!("{cookie} ").into_bytes();
        dict.encode_to(&mut msg);
        self.sock.send_to(&msg, self.to.as_str()).ok()?;
        let mut buf = vec![0u8; 65536];
        let n = self.sock.recv(&mut buf).ok()?;
        let body = buf[..n].strip_prefix(format!("{cookie} ").as_bytes())?;
        controlplane::control::ng::bencode::decode(body).ok().map(|(v, _)| v)
    }
}

/// rtpengine itself (Debian's rtpengine-daemon, userspace only).
struct Rtpengine(Child);

impl Drop for Rtpengine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Masks the parts that legitimately differ between two relays: media ports.
fn mask_ports(sdp: &str) -> Vec<String> {
    sdp.lines()
        .map(|l| {
            if let Some(m) = l.strip_prefix("m=") {
                let mut t: Vec<&str> = m.split(' ').collect();
                if t.len() > 1 && t[1] != "0" {
                    t[1] = "PORT";
                }
                format!("m={}", t.join(" "))
            } else if let Some(r) = l.strip_prefix("a=rtcp:") {
                format!("a=rtcp:PORT{}", r.find(' ').map(|i| &r[i..]).unwrap_or(""))
            } else {
                l.to_string()
            }
        })
        .collect()
}

#[test]
fn rtpengine_and_hasp_answer_the_same_ng_requests_alike() {
    use controlplane::control::ng::bencode::Value;
    // rtpengine on a fixed NG port owned by this test (it cannot report a port-0 bind).
    let ng_port = 47112;
    let rtpe = Rtpengine(
        Command::new("rtpengine")
            .args(["--config-file=none", "--table=-1", "--interface=127.0.0.1", "--foreground", "--log-stderr"])
            .arg(format!("--listen-ng=127.0.0.1:{ng_port}"))
            .args(["--port-min=42400", "--port-max=42499"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rtpengine (apt-get install rtpengine-daemon)"),
    );
    let mut theirs = Ng::new(&format!("127.0.0.1:{ng_port}"));
    wait_for("rtpengine to answer ping", Duration::from_secs(15), || {
        let r = theirs.req(Value::dict([("command", Value::str("ping"))]))?;
        (r.get("result")?.as_str()? == "pong").then_some(())
    });
    let (relay, line) = relay_with(&["--rtp-ports", "42500-42599", "--listen-ng", "127.0.0.1:0"]);
    let mut ours = Ng::new(&ready_field(&line, "ng="));

    let offers = [
        // Plain G.711 with DTMF, session-level c=, ptime.
        "v=0\r\no=- 1545997027 1 IN IP4 198.51.100.1\r\ns=tester\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 2000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\n",
        // Audio + video + a rejected stream, unknown attributes, ICE, sendonly.
        "v=0\r\no=- 1545997028 1 IN IP4 198.51.100.1\r\ns=tester\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\nm=audio 2000 RTP/AVP 0 101\r\nb=AS:64\r\na=rtpmap:101 telephone-event/8000\r\na=foo:bar\r\na=sendonly\r\na=maxptime:40\r\na=ptime:20\r\na=candidate:1 1 UDP 2130706431 10.0.0.1 2000 typ host\r\na=label:1\r\nm=video 2002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 profile-level-id=42e01f\r\na=inactive\r\nm=audio 0 RTP/AVP 0\r\n",
        // Media-level c=, an a=rtcp to be replaced.
        "v=0\r\no=- 1545997029 7 IN IP4 198.51.100.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 8\r\nc=IN IP4 198.51.100.9\r\na=rtcp:4001\r\na=sendrecv\r\n",
    ];
    let flag_sets: [&[&str]; 3] =
        [&["trust-address"], &["trust-address", "no-rtcp-attribute"], &["trust-address", "full-rtcp-attribute"]];
    for (i, offer) in offers.iter().enumerate() {
        for (j, flags) in flag_sets.iter().enumerate() {
            let call = format!("cmp-{i}-{j}-{}", std::process::id());
            let flags = Value::List(flags.iter().map(Value::str).collect());
            let o = |_: ()| {
                Value::dict([
                    ("command", Value::str("offer")),
                    ("call-id", Value::str(&call)),
                    ("from-tag", Value::str("ft")),
                    ("sdp", Value::str(offer)),
                    ("flags", flags.clone()),
                    ("replace", Value::List(vec![Value::str("origin"), Value::str("session-connection")])),
                ])
            };
            let answer_sdp = offer.replace(" 2000 ", " 3000 ").replace(" 4000 ", " 5000 ");
            let a = |_: ()| {
                Value::dict([
                    ("command", Value::str("answer")),
                    ("call-id", Value::str(&call)),
                    ("from-tag", Value::str("ft")),
                    ("to-tag", Value::str("tt")),
                    ("sdp", Value::str(&answer_sdp)),
                    ("flags", flags.clone()),
                ])
            };
            for (step, req) in [("offer", o(())), ("answer", a(()))] {
                let t = theirs.req(req.clone()).expect("rtpengine answered");
                let u = ours.req(req).expect("hasp answered");
                let result = |v: &Value| v.get("result").and_then(Value::as_str).unwrap_or("").to_string();
                assert_eq!(result(&t), "ok", "{step} {i}/{j}: rtpengine refused: {t:?}");
                assert_eq!(result(&u), result(&t), "{step} {i}/{j}: result differs: ours {u:?} theirs {t:?}");
                let sdp = |v: &Value| mask_ports(v.get("sdp").and_then(Value::as_str).unwrap_or(""));
                assert_eq!(sdp(&u), sdp(&t), "{step} of offer {i} with flags {j}: SDP differs");
            }
            let d = Value::dict([
                ("command", Value::str("delete")),
                ("call-id", Value::str(&call)),
                ("from-tag", Value::str("ft")),
            ]);
            let (t, u) = (theirs.req(d.clone()).unwrap(), ours.req(d).unwrap());
            assert_eq!(u.get("result"), t.get("result"));
        }
    }
    // Both answer an unknown call's query with an error.
    let q = Value::dict([("command", Value::str("query")), ("call-id", Value::str("nope"))]);
    let (t, u) = (theirs.req(q.clone()).unwrap(), ours.req(q).unwrap());
    assert_eq!(u.get("result"), t.get("result"));
    drop(rtpe);
    drop(relay);
}
