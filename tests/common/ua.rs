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

pub fn invite(from: &Ua, to_user: &str, call_id: &str, media: u16) -> String {
    let me = from.addr();
    let body = sdp(media);
    format!(
        "INVITE sip:{to_user}@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK-{call_id};rport\r\nFrom: <sip:alice@{DOMAIN}>;tag=a-{call_id}\r\nTo: <sip:{to_user}@{DOMAIN}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{me}>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
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
