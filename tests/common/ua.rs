//! A minimal SIP user agent for the integration tests: UDP sockets on loopback (ports
//! picked by the kernel), requests written by hand, responses parsed with `hasp-sip`.

use sip::Message;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// The domain the UA helpers write into URIs.
pub const DOMAIN: &str = "hasp.test";

/// A SIP user agent: one UDP socket on loopback (port picked by the kernel).
pub struct Ua {
    /// The socket.
    pub sock: UdpSocket,
}

impl Ua {
    pub fn new() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        Self { sock }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    pub fn send(&self, to: &str, m: &str) {
        self.sock.send_to(m.as_bytes(), to).unwrap();
    }

    /// The next message, if one comes within `within`.
    pub fn recv_within(&self, within: Duration) -> Option<Message> {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 65_536];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            self.sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                if let Ok((m, _)) = Message::parse(&buf[..n], false) {
                    return Some(m);
                }
            }
        }
        None
    }

    /// The next message that is not a provisional response.
    pub fn recv_final(&self, within: Duration) -> Message {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now()).expect("a final message in time");
            let m = self.recv_within(left).expect("a message");
            if m.code().is_none_or(|c| c >= 200) {
                return m;
            }
        }
    }

    /// Whether nothing at all has arrived.
    pub fn nothing_yet(&self) -> bool {
        self.sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        let none = matches!(self.sock.recv_from(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        self.sock.set_nonblocking(false).unwrap();
        none
    }
}

pub fn sdp(port: u16) -> String {
    format!("v=0\r\no=t 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
}

/// The audio port of an SDP body.
pub fn sdp_port(m: &Message) -> u16 {
    let body = String::from_utf8_lossy(&m.body);
    body.lines().find_map(|l| l.strip_prefix("m=audio ")?.split(' ').next()?.parse().ok()).expect("m=audio")
}

/// An INVITE from a caller of another domain (`alice@caller.example`) to `to_user` of
/// ours: an incoming call, which the proxy's policy lets through unauthenticated.
pub fn invite(from: &Ua, to_user: &str, call_id: &str, media: u16) -> String {
    invite_as(from, "alice@caller.example", &format!("{to_user}@{DOMAIN}"), call_id, media)
}

/// An INVITE from `from_aor` (`user@domain`) to `to_aor`.
pub fn invite_as(from: &Ua, from_aor: &str, to_aor: &str, call_id: &str, media: u16) -> String {
    let me = from.addr();
    let body = sdp(media);
    let user = from_aor.split('@').next().unwrap_or("x");
    format!(
        "INVITE sip:{to_aor} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{call_id};rport\r\nFrom: <sip:{from_aor}>;tag=a-{call_id}\r\nTo: <sip:{to_aor}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:{user}@{me}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `req` (as sent) again, answering `challenge` (a 401 or 407: its first, MD5,
/// challenge) as `user` with `password`: a new branch, the next CSeq, and the
/// credentials header (`nc` = `nc`).
pub fn with_credentials(req: &str, challenge: &Message, user: &str, password: &str, nc: u32) -> String {
    use sip::digest::{expected_response, Credentials};
    let (ask, answer) = if challenge.code() == Some(407) {
        ("Proxy-Authenticate", "Proxy-Authorization")
    } else {
        ("WWW-Authenticate", "Authorization")
    };
    let ch = challenge.header(ask).expect("a challenge header");
    let param =
        |name: &str| ch.split(&format!("{name}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    let (m, _) = Message::parse(req.as_bytes(), false).unwrap();
    let sip::message::StartLine::Request { uri, method } = &m.start else { panic!("a request") };
    let c = Credentials {
        username: user.into(),
        realm: param("realm"),
        nonce: param("nonce"),
        uri: uri.clone(),
        algorithm: Some("MD5".into()),
        qop: Some("auth".into()),
        nc: Some(format!("{nc:08x}")),
        cnonce: Some("5eed".into()),
        ..Default::default()
    };
    let resp = expected_response(&c, method, password).unwrap();
    let header = format!(
        "{answer}: Digest username=\"{user}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", response=\"{resp}\", algorithm=MD5, qop=auth, nc={nc:08x}, cnonce=\"5eed\"\r\n",
        c.realm, c.nonce
    );
    let (cseq, _) = m.cseq().unwrap();
    let out = req.replacen(";branch=z9hG4bK-", &format!(";branch=z9hG4bK-{nc}a-"), 1).replacen(
        &format!("CSeq: {cseq} {method}"),
        &format!("CSeq: {} {method}", cseq + 1),
        1,
    );
    let at = out.find("Content-Length:").expect("Content-Length");
    format!("{}{header}{}", &out[..at], &out[at..])
}

/// The ACK of a final non-2xx response to the INVITE `req` (RFC 3261 §17.1.1.3).
pub fn ack_for(req: &str, resp: &Message) -> String {
    let (m, _) = Message::parse(req.as_bytes(), false).unwrap();
    let sip::message::StartLine::Request { uri, .. } = &m.start else { panic!("a request") };
    format!(
        "ACK {uri} SIP/2.0\r\nVia: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        m.header("Via").unwrap(),
        m.header("From").unwrap(),
        resp.header("To").unwrap(),
        m.call_id(),
        m.cseq().unwrap().0
    )
}

pub fn options(from: &Ua, n: u32) -> String {
    options_to(from, n, DOMAIN)
}

/// An OPTIONS for `sip:HOST` (a domain, or the proxy's own address).
pub fn options_to(from: &Ua, n: u32, host: &str) -> String {
    let me = from.addr();
    format!(
        "OPTIONS sip:{host} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-opt{n}\r\nFrom: <sip:ping@{DOMAIN}>;tag=p{n}\r\nTo: <sip:{host}>\r\nCall-ID: opt-{n}-{me}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// The callee answers an INVITE with 200 and its SDP.
pub fn answer_200(callee: &Ua, inv: &Message, media: u16, to: SocketAddr) {
    let mut ok = inv.response(200, "OK", Some("b-tag"));
    ok.headers.push(("Contact".into(), format!("<sip:bob@{}>", callee.addr())));
    ok.headers.push(("Content-Type".into(), "application/sdp".into()));
    ok.body = sdp(media).into_bytes();
    callee.sock.send_to(&ok.to_bytes(), to).unwrap();
}

/// An in-dialog request from the caller (ACK, BYE) along the route set of the 2xx,
/// built by `hasp-sip`'s dialog helper.
pub fn in_dialog(caller: &Ua, ok: &Message, method: &str, cseq: u32) -> String {
    let mut d = sip::dialog::Dialog::from_2xx(ok).expect("a dialog from the 2xx");
    // ACK keeps the INVITE's number; other requests take the next: `cseq` says which.
    d.local_seq = if method == "ACK" { cseq } else { cseq - 1 };
    let via = format!("SIP/2.0/UDP {}", caller.addr());
    let m = d.request(method, &via, &format!("z9hG4bK-{method}{cseq}-{}", ok.call_id()));
    String::from_utf8(m.to_bytes()).unwrap()
}
