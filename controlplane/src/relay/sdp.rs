//! SDP (RFC 4566) parsing and the media-anchoring rewrite (RFC 3264 offer/answer).
//!
//! Line-based on purpose: every line we do not rewrite is kept byte for byte and in
//! place, so codecs, fmtp, crypto-free extensions and unknown attributes survive. The
//! maintained SDP crates either drop or reorder lines they do not model, which breaks
//! line-by-line comparison with rtpengine and loses information for the far end.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

/// Most media sections (`m=` lines) one description may carry. Each anchored section
/// takes two port pairs, so the count is bounded before anything is sized by it: a
/// 3,000-`m=` offer is refused whole instead of draining the port range.
pub const MAX_MEDIA_SECTIONS: usize = 16;

/// A parse error, with the offending line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SDP: {0}")]
pub struct SdpError(pub String);

/// One media section (`m=` and the lines after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// `audio`, `video`, …
    pub kind: String,
    /// RTP port (0: stream rejected or disabled).
    pub port: u16,
    /// `/<count>` after the port, if present.
    pub port_count: Option<String>,
    /// Transport protocol, e.g. `RTP/AVP`.
    pub proto: String,
    /// Formats (payload types for RTP).
    pub formats: Vec<String>,
    /// The lines after `m=`, without line endings.
    pub lines: Vec<String>,
}

/// A parsed session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sdp {
    /// Session-level lines (before the first `m=`).
    pub session: Vec<String>,
    /// Media sections in order.
    pub media: Vec<Media>,
}

/// How to write the `a=rtcp` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RtcpAttr {
    /// `a=rtcp:PORT`, as rtpengine writes it by default.
    #[default]
    Short,
    /// `a=rtcp:PORT IN IP4 ADDR`.
    Full,
    /// No attribute.
    None,
}

/// What the rewrite puts in.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// The relay's media address.
    pub address: IpAddr,
    /// Per media section: the relay RTP port the receiver of this SDP must send to, or
    /// `None` to leave the section's port alone (rejected streams).
    pub ports: Vec<Option<u16>>,
    /// Replace the `o=` address too.
    pub replace_origin: bool,
    /// The `o=` session version to write, if it must change.
    pub origin_version: Option<u64>,
    /// How to write `a=rtcp`.
    pub rtcp: RtcpAttr,
    /// Strip ICE attributes (the relay does not do ICE; candidates would bypass it).
    pub remove_ice: bool,
    /// Replace the transport protocol of RTP sections.
    pub transport: Option<String>,
}

const ICE_ATTRS: [&str; 7] =
    ["ice-ufrag", "ice-pwd", "ice-options", "candidate", "end-of-candidates", "remote-candidates", "ice-lite"];
const DIRECTIONS: [&str; 4] = ["sendrecv", "sendonly", "recvonly", "inactive"];

/// The attribute name of an `a=` line (`a=rtpmap:0 PCMU/8000` → `rtpmap`).
fn attr_name(line: &str) -> Option<&str> {
    let a = line.strip_prefix("a=")?;
    Some(a.split([':', ' ']).next().unwrap_or(a))
}

fn parse_connection(line: &str) -> Option<IpAddr> {
    let mut t = line.strip_prefix("c=")?.split_whitespace();
    let (_net, _fam, addr) = (t.next()?, t.next()?, t.next()?);
    // Multicast "addr/ttl" forms keep only the address.
    addr.split('/').next()?.parse().ok()
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IP4"
    } else {
        "IP6"
    }
}

/// Static RTP payload types' rtpmap values (RFC 3551).
fn static_rtpmap(pt: &str) -> Option<&'static str> {
    Some(match pt {
        "0" => "PCMU/8000",
        "3" => "GSM/8000",
        "4" => "G723/8000",
        "8" => "PCMA/8000",
        "9" => "G722/8000",
        "13" => "CN/8000",
        "18" => "G729/8000",
        _ => return None,
    })
}

impl Sdp {
    /// Parses a session description (CRLF or LF line endings).
    pub fn parse(text: &str) -> Result<Self, SdpError> {
        let mut session = Vec::new();
        let mut media: Vec<Media> = Vec::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.is_empty() {
                continue;
            }
            let b = line.as_bytes();
            if b.len() < 2 || b[1] != b'=' || !b[0].is_ascii_lowercase() {
                return Err(SdpError(format!("line {} is not <type>=<value>: {line:?}", i + 1)));
            }
            if session.is_empty() && media.is_empty() && !line.starts_with("v=") {
                return Err(SdpError("does not start with v=".into()));
            }
            if let Some(m) = line.strip_prefix("m=") {
                if media.len() == MAX_MEDIA_SECTIONS {
                    return Err(SdpError(format!(
                        "more than {MAX_MEDIA_SECTIONS} media sections (m= line {}); at most {MAX_MEDIA_SECTIONS} are accepted",
                        i + 1
                    )));
                }
                let mut t = m.split_whitespace();
                let kind = t.next().ok_or_else(|| SdpError(format!("empty m= line {}", i + 1)))?.to_string();
                let port_s = t.next().ok_or_else(|| SdpError(format!("m= line {} has no port", i + 1)))?;
                let (p, count) = match port_s.split_once('/') {
                    Some((p, c)) => (p, Some(c.to_string())),
                    None => (port_s, None),
                };
                let port = p.parse().map_err(|_| SdpError(format!("m= line {} has a bad port {p:?}", i + 1)))?;
                let proto = t.next().ok_or_else(|| SdpError(format!("m= line {} has no protocol", i + 1)))?.to_string();
                let formats = t.map(str::to_string).collect();
                media.push(Media { kind, port, port_count: count, proto, formats, lines: Vec::new() });
            } else if let Some(m) = media.last_mut() {
                m.lines.push(line.to_string());
            } else {
                session.push(line.to_string());
            }
        }
        if session.is_empty() {
            return Err(SdpError("empty".into()));
        }
        Ok(Self { session, media })
    }

    /// The session-level connection address.
    pub fn session_address(&self) -> Option<IpAddr> {
        self.session.iter().find_map(|l| parse_connection(l))
    }

    /// The `o=` session version.
    pub fn origin_version(&self) -> Option<u64> {
        let o = self.session.iter().find(|l| l.starts_with("o="))?;
        o.split_whitespace().nth(2)?.parse().ok()
    }

    /// Where the sender of this SDP wants media `i`: its connection address and port.
    /// `None` for a rejected stream (port 0) or a hold address (0.0.0.0).
    pub fn endpoint(&self, i: usize) -> Option<SocketAddr> {
        let m = self.media.get(i)?;
        let ip = m.lines.iter().find_map(|l| parse_connection(l)).or_else(|| self.session_address())?;
        (m.port != 0 && !ip.is_unspecified()).then(|| SocketAddr::new(ip, m.port))
    }

    /// The direction attribute of media `i` (media level, else session level, else
    /// `sendrecv`).
    pub fn direction(&self, i: usize) -> &str {
        let find = |lines: &[String]| {
            lines
                .iter()
                .filter_map(|l| attr_name(l))
                .find(|a| DIRECTIONS.contains(a))
                .map(|a| DIRECTIONS.iter().find(|d| **d == a).copied().unwrap_or("sendrecv"))
        };
        self.media.get(i).and_then(|m| find(&m.lines)).or_else(|| find(&self.session)).unwrap_or("sendrecv")
    }

    /// Writes the description with media anchored at the relay.
    pub fn rewrite(&self, rw: &Rewrite) -> String {
        let fam = family(rw.address);
        let mut out = String::with_capacity(512);
        for l in &self.session {
            if let Some(o) = l.strip_prefix("o=") {
                let mut t: Vec<&str> = o.split_whitespace().collect();
                let v = rw.origin_version.map(|v| v.to_string());
                if let (Some(v), true) = (&v, t.len() >= 3) {
                    t[2] = v;
                }
                let addr = rw.address.to_string();
                if rw.replace_origin && t.len() >= 6 {
                    t[4] = fam;
                    t[5] = &addr;
                }
                let _ = write!(out, "o={}\r\n", t.join(" "));
            } else if l.starts_with("c=") {
                let _ = write!(out, "c=IN {fam} {}\r\n", rw.address);
            } else if rw.remove_ice && attr_name(l).is_some_and(|a| ICE_ATTRS.contains(&a)) {
                continue;
            } else {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        for (i, m) in self.media.iter().enumerate() {
            self.write_media(&mut out, m, rw.ports.get(i).copied().flatten(), rw);
        }
        out
    }

    fn write_media(&self, out: &mut String, m: &Media, port: Option<u16>, rw: &Rewrite) {
        let Some(port) = port else {
            // Left alone: rejected or not anchored.
            let _ = write!(out, "m={} {}", m.kind, m.port);
            if let Some(c) = &m.port_count {
                let _ = write!(out, "/{c}");
            }
            let _ = write!(out, " {} {}\r\n", m.proto, m.formats.join(" "));
            for l in &m.lines {
                out.push_str(l);
                out.push_str("\r\n");
            }
            return;
        };
        let fam = family(rw.address);
        let rtp = m.proto.starts_with("RTP/");
        let proto = match &rw.transport {
            Some(t) if rtp => t.as_str(),
            _ => m.proto.as_str(),
        };
        let _ = write!(out, "m={} {port} {proto}", m.kind);
        for f in &m.formats {
            let _ = write!(out, " {f}");
        }
        out.push_str("\r\n");
        // Non-attribute lines (i=, c=, b=, k=) first, as RFC 4566 orders them.
        for l in m.lines.iter().filter(|l| !l.starts_with("a=")) {
            if l.starts_with("c=") {
                let _ = write!(out, "c=IN {fam} {}\r\n", rw.address);
            } else {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        let attrs: Vec<&String> = m.lines.iter().filter(|l| l.starts_with("a=")).collect();
        let mux = attrs.iter().any(|l| attr_name(l) == Some("rtcp-mux"));
        // rtpengine's order, kept so its output and ours compare line by line: other
        // attributes as they came, codec attributes in payload-type order (with an
        // rtpmap for static types that lack one), direction, rtcp, and ptime last.
        let codec_attr = |name: &str| rtp && matches!(name, "rtpmap" | "fmtp" | "rtcp-fb");
        let mut direction = None;
        let mut ptime = None;
        for l in &attrs {
            let name = attr_name(l).unwrap_or("");
            if codec_attr(name) || name == "rtcp" || (rw.remove_ice && ICE_ATTRS.contains(&name)) {
                continue;
            }
            if DIRECTIONS.contains(&name) {
                direction = Some(name);
            } else if name == "ptime" {
                ptime = Some(*l);
            } else {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        if rtp {
            for f in &m.formats {
                let has_map =
                    attrs.iter().any(|l| l.strip_prefix("a=rtpmap:").is_some_and(|r| r.split(' ').next() == Some(f)));
                if !has_map {
                    if let Some(map) = static_rtpmap(f) {
                        let _ = write!(out, "a=rtpmap:{f} {map}\r\n");
                    }
                }
                for l in &attrs {
                    if attr_name(l).is_some_and(codec_attr) {
                        let pt = l.split_once(':').map(|(_, r)| r.split(' ').next().unwrap_or(""));
                        if pt == Some(f.as_str()) {
                            out.push_str(l);
                            out.push_str("\r\n");
                        }
                    }
                }
            }
        }
        let direction = direction.unwrap_or_else(|| {
            // Session-level direction applies when the media has none; written
            // explicitly so the far end needs no session-level lookup.
            self.session
                .iter()
                .filter_map(|l| attr_name(l))
                .find(|a| DIRECTIONS.contains(a))
                .and_then(|a| DIRECTIONS.iter().find(|d| **d == a).copied())
                .unwrap_or("sendrecv")
        });
        let _ = write!(out, "a={direction}\r\n");
        if rtp {
            let rtcp_port = if mux { port } else { port.wrapping_add(1) };
            match rw.rtcp {
                RtcpAttr::Short => {
                    let _ = write!(out, "a=rtcp:{rtcp_port}\r\n");
                }
                RtcpAttr::Full => {
                    let _ = write!(out, "a=rtcp:{rtcp_port} IN {fam} {}\r\n", rw.address);
                }
                RtcpAttr::None => {}
            }
        }
        if let Some(p) = ptime {
            out.push_str(p);
            out.push_str("\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1545997027 1 IN IP4 198.51.100.1\r\ns=tester\r\nt=0 0\r\nm=audio 2000 RTP/AVP 0 8 101\r\nc=IN IP4 198.51.100.1\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=candidate:1 1 UDP 2130706431 10.0.0.1 2000 typ host\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n";

    fn rw(ports: Vec<Option<u16>>) -> Rewrite {
        Rewrite {
            address: "203.0.113.1".parse().unwrap(),
            ports,
            replace_origin: false,
            origin_version: None,
            rtcp: RtcpAttr::Short,
            remove_ice: true,
            transport: None,
        }
    }

    #[test]
    fn parses_endpoints_and_direction() {
        let s = Sdp::parse(OFFER).unwrap();
        assert_eq!(s.media.len(), 2);
        assert_eq!(s.endpoint(0), Some("198.51.100.1:2000".parse().unwrap()));
        assert_eq!(s.endpoint(1), None, "port 0 is rejected");
        assert_eq!(s.direction(0), "sendrecv");
        assert_eq!(s.origin_version(), Some(1));
    }

    #[test]
    fn rewrites_ports_connection_rtcp_and_keeps_other_lines() {
        let s = Sdp::parse(OFFER).unwrap();
        let out = s.rewrite(&rw(vec![Some(30000), None]));
        let want = "v=0\r\no=- 1545997027 1 IN IP4 198.51.100.1\r\ns=tester\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0 8 101\r\nc=IN IP4 203.0.113.1\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=sendrecv\r\na=rtcp:30001\r\na=ptime:20\r\nm=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n";
        assert_eq!(out, want);
        // The rewrite is stable: rewriting our own output changes nothing but ports.
        let again = Sdp::parse(&out).unwrap().rewrite(&rw(vec![Some(30000), None]));
        assert_eq!(again, want);
    }

    #[test]
    fn replaces_origin_and_version_and_handles_ipv6() {
        let s = Sdp::parse(OFFER).unwrap();
        let mut r = rw(vec![Some(30000), None]);
        r.address = "2001:db8::1".parse().unwrap();
        r.replace_origin = true;
        r.origin_version = Some(2);
        r.rtcp = RtcpAttr::Full;
        let out = s.rewrite(&r);
        assert!(out.contains("o=- 1545997027 2 IN IP6 2001:db8::1\r\n"), "{out}");
        assert!(out.contains("c=IN IP6 2001:db8::1\r\n"));
        assert!(out.contains("a=rtcp:30001 IN IP6 2001:db8::1\r\n"));
    }

    #[test]
    fn keeps_inactive_and_session_level_connection() {
        let sdp = "v=0\no=a 1 1 IN IP4 192.0.2.1\ns=-\nc=IN IP4 192.0.2.1\nt=0 0\nm=audio 4000 RTP/AVP 8\na=inactive\n";
        let s = Sdp::parse(sdp).unwrap();
        assert_eq!(s.endpoint(0), Some("192.0.2.1:4000".parse().unwrap()));
        assert_eq!(s.direction(0), "inactive");
        let out = s.rewrite(&rw(vec![Some(30010)]));
        assert!(out.contains("c=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio 30010 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=inactive\r\na=rtcp:30011\r\n"), "{out}");
    }

    #[test]
    fn media_sections_are_bounded() {
        let mut sdp = String::from("v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n");
        for _ in 0..MAX_MEDIA_SECTIONS {
            sdp.push_str("m=audio 4000 RTP/AVP 0\r\n");
        }
        assert_eq!(Sdp::parse(&sdp).unwrap().media.len(), MAX_MEDIA_SECTIONS);
        sdp.push_str("m=audio 4000 RTP/AVP 0\r\n");
        let e = Sdp::parse(&sdp).unwrap_err();
        assert!(e.0.contains("more than 16 media sections"), "{e}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Sdp::parse("").is_err());
        assert!(Sdp::parse("hello").is_err());
        assert!(Sdp::parse("o=x\r\nv=0").is_err());
        assert!(Sdp::parse("v=0\r\nm=audio x RTP/AVP 0").is_err());
        assert!(Sdp::parse("v=0\r\nm=audio").is_err());
        assert!(Sdp::parse("v=0\r\n\u{0}=1").is_err());
    }
}
