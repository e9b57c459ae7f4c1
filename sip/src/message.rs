//! SIP messages (RFC 3261 §7): parsing and serialising without losing anything.
//!
//! Headers are kept as `(name, value)` pairs in wire order, so a proxy forwards what it
//! does not understand untouched; typed accessors read the few headers routing needs.
//! Hand-written because `rsip` (0.4, 2022) is unmaintained and re-serialises headers in
//! its own form; this parser is bounded and fuzzed (`fuzz/fuzz_targets/sip_message.rs`).

use std::fmt::Write;

/// Largest message accepted (UDP datagrams are smaller still).
pub const MAX_MESSAGE: usize = 65_535;
/// Most headers in one message.
pub const MAX_HEADERS: usize = 256;

/// Why a message did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// More bytes are needed (stream transports).
    #[error("incomplete message")]
    Incomplete,
    /// Not SIP; the text says what.
    #[error("{0}")]
    Invalid(String),
}

fn bad(m: impl Into<String>) -> ParseError {
    ParseError::Invalid(m.into())
}

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// `METHOD uri SIP/2.0`
    Request {
        /// Method, e.g. `INVITE`.
        method: String,
        /// Request-URI.
        uri: String,
    },
    /// `SIP/2.0 code reason`
    Response {
        /// Status code.
        code: u16,
        /// Reason phrase.
        reason: String,
    },
}

/// A SIP request or response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Start line.
    pub start: StartLine,
    /// Headers in wire order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// Compact header forms (RFC 3261 §7.3.3) and their full names.
fn full_name(name: &str) -> &str {
    match name {
        "v" | "V" => "Via",
        "f" | "F" => "From",
        "t" | "T" => "To",
        "i" | "I" => "Call-ID",
        "m" | "M" => "Contact",
        "l" | "L" => "Content-Length",
        "c" | "C" => "Content-Type",
        "k" | "K" => "Supported",
        "s" | "S" => "Subject",
        "e" | "E" => "Content-Encoding",
        _ => name,
    }
}

/// The top Via, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// `UDP`, `TCP`, …
    pub transport: String,
    /// Sent-by host.
    pub host: String,
    /// Sent-by port, if given.
    pub port: Option<u16>,
    /// The `branch` parameter.
    pub branch: Option<String>,
    /// `received` parameter.
    pub received: Option<String>,
    /// `rport` parameter (`Some(None)`: present without value).
    pub rport: Option<Option<u16>>,
}

/// A header parameter (`;name=value`) of a header value.
pub fn param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    // Parameters follow the URI's closing '>' if there is one.
    let tail = value.rfind('>').map_or(value, |i| &value[i..]);
    tail.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The URI inside a name-addr (`"Bob" <sip:bob@x>;tag=1` → `sip:bob@x`) or an addr-spec.
pub fn uri_of(value: &str) -> &str {
    match (value.find('<'), value.find('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value.split(';').next().unwrap_or(value).trim(),
    }
}

/// `user@host` of a SIP URI (the address of record), lowercased host.
pub fn aor_of(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("sip:").or_else(|| uri.strip_prefix("sips:"))?;
    let rest = rest.split(['?', '>']).next()?;
    // The user part may carry parameters of its own (`+4930123;npdi@host`) and never an
    // unescaped '@', so the first '@' ends it.
    let (user, host) = rest.split_once('@')?;
    let user = user.split(';').next()?;
    let host = host.split([';', ':']).next()?;
    (!user.is_empty() && !host.is_empty()).then(|| format!("{user}@{}", host.to_ascii_lowercase()))
}

/// Host and port of a SIP URI.
pub fn host_port(uri: &str) -> Option<(String, Option<u16>)> {
    let rest = uri.strip_prefix("sip:").or_else(|| uri.strip_prefix("sips:"))?;
    let rest = rest.split(['?', '>']).next()?;
    let hp = rest.split_once('@').map_or(rest, |(_, h)| h);
    let hp = hp.split(';').next()?;
    if let Some(v6) = hp.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        return Some((h.to_string(), p.strip_prefix(':').and_then(|p| p.parse().ok())));
    }
    match hp.split_once(':') {
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((hp.to_string(), None)),
    }
}

impl Message {
    /// Parses one message from the start of `buf`; returns it and the bytes used.
    /// `stream` is true for TCP, where the body ends by Content-Length (required); on
    /// UDP a missing Content-Length means "the rest of the datagram".
    pub fn parse(buf: &[u8], stream: bool) -> Result<(Message, usize), ParseError> {
        let head_end = match find(buf, b"\r\n\r\n") {
            Some(i) => i,
            None if buf.len() > MAX_MESSAGE => return Err(bad("headers too long")),
            None if stream => return Err(ParseError::Incomplete),
            None => return Err(bad("no end of headers")),
        };
        let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("headers are not UTF-8"))?;
        // A CR or LF inside a line is not a line end (RFC 3261 §7: CRLF only): refused,
        // or a value could smuggle a header into what is echoed, and a cheap reader
        // (steering) would see other headers than this parser.
        if head.split("\r\n").any(|l| l.contains(['\r', '\n'])) {
            return Err(bad("bare CR or LF in the header section"));
        }
        let mut lines = head.split("\r\n");
        let first = lines.next().ok_or_else(|| bad("empty"))?;
        let start = parse_start(first)?;
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                // Folded continuation (RFC 3261 §7.3.1).
                let last = headers.last_mut().ok_or_else(|| bad("continuation before any header"))?;
                last.1.push(' ');
                last.1.push_str(line.trim());
                continue;
            }
            let (name, value) = line.split_once(':').ok_or_else(|| bad(format!("header without ':': {line:?}")))?;
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(format!("bad header name {name:?}")));
            }
            if headers.len() >= MAX_HEADERS {
                return Err(bad("too many headers"));
            }
            headers.push((full_name(name).to_string(), value.trim().to_string()));
        }
        let body_start = head_end + 4;
        let declared = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
            .map(|(_, v)| v.parse::<usize>().map_err(|_| bad(format!("bad Content-Length {v:?}"))))
            .transpose()?;
        let len = match (declared, stream) {
            (Some(n), _) => n,
            (None, true) => return Err(bad("Content-Length is required on stream transports")),
            (None, false) => buf.len() - body_start,
        };
        if len > MAX_MESSAGE {
            return Err(bad("body too large"));
        }
        if buf.len() < body_start + len {
            return if stream { Err(ParseError::Incomplete) } else { Err(bad("body shorter than Content-Length")) };
        }
        let m = Message { start, headers, body: buf[body_start..body_start + len].to_vec() };
        m.check()?;
        Ok((m, body_start + len))
    }

    /// The mandatory headers of RFC 3261 §8.1.1 are present and sane.
    fn check(&self) -> Result<(), ParseError> {
        for h in ["Via", "From", "To", "Call-ID", "CSeq"] {
            if self.header(h).is_none() {
                return Err(bad(format!("missing {h}")));
            }
        }
        // Headers that hold one value must appear once (RFC 4475 §3.1.2.19): two
        // Call-IDs or CSeqs leave the transaction ambiguous.
        for h in ["From", "To", "Call-ID", "CSeq", "Max-Forwards", "Content-Length"] {
            if self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(h)).count() > 1 {
                return Err(bad(format!("more than one {h}")));
            }
        }
        let (_, method) = self.cseq().ok_or_else(|| bad("bad CSeq"))?;
        if let StartLine::Request { method: m, .. } = &self.start {
            if *m != method && m != "ACK" && m != "CANCEL" {
                return Err(bad("CSeq method does not match the request"));
            }
        }
        self.via().ok_or_else(|| bad("bad Via"))?;
        Ok(())
    }

    /// The first value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of a header, comma-separated lists split.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).flat_map(|(_, v)| split_list(v))
    }

    /// Removes every value of a header.
    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// Sets a header (replacing any).
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(h) => h.1 = value,
            None => self.headers.push((name.to_string(), value)),
        }
        let first = self.headers.iter().position(|(n, _)| n.eq_ignore_ascii_case(name)).unwrap_or(0);
        let mut i = 0;
        self.headers.retain(|(n, _)| {
            let keep = !n.eq_ignore_ascii_case(name) || i == first;
            i += 1;
            keep
        });
    }

    /// Inserts a header before every other of that name (Via, Record-Route).
    pub fn push_front(&mut self, name: &str, value: impl Into<String>) {
        let at = self.headers.iter().position(|(n, _)| n.eq_ignore_ascii_case(name)).unwrap_or(0);
        self.headers.insert(at, (name.to_string(), value.into()));
    }

    /// Removes the first value of a (possibly comma-joined) header and returns it.
    pub fn pop_front(&mut self, name: &str) -> Option<String> {
        let i = self.headers.iter().position(|(n, _)| n.eq_ignore_ascii_case(name))?;
        let vals: Vec<String> = split_list(&self.headers[i].1).map(str::to_string).collect();
        let first = vals.first()?.clone();
        if vals.len() <= 1 {
            self.headers.remove(i);
        } else {
            self.headers[i].1 = vals[1..].join(", ");
        }
        Some(first)
    }

    /// Method of a request, or of the request a response answers (from CSeq).
    pub fn method(&self) -> &str {
        match &self.start {
            StartLine::Request { method, .. } => method,
            StartLine::Response { .. } => self.header("CSeq").and_then(|c| c.split_whitespace().nth(1)).unwrap_or(""),
        }
    }

    /// Status code of a response.
    pub fn code(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Call-ID.
    pub fn call_id(&self) -> &str {
        self.header("Call-ID").unwrap_or("")
    }

    /// CSeq number and method.
    pub fn cseq(&self) -> Option<(u32, String)> {
        let mut t = self.header("CSeq")?.split_whitespace();
        let n = t.next()?.parse().ok()?;
        Some((n, t.next()?.to_string()))
    }

    /// The top Via.
    pub fn via(&self) -> Option<Via> {
        let v = self.header_values("Via").next()?;
        let (proto, rest) = v.split_once(char::is_whitespace)?;
        let transport = proto.rsplit('/').next()?.to_ascii_uppercase();
        let sent_by = rest.trim().split(';').next()?.trim();
        let (host, port) = match sent_by.strip_prefix('[') {
            Some(v6) => {
                let (h, p) = v6.split_once(']')?;
                (h.to_string(), p.strip_prefix(':').and_then(|p| p.parse().ok()))
            }
            None => match sent_by.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
                None => (sent_by.to_string(), None),
            },
        };
        let params = rest;
        let get = |k: &str| {
            params.split(';').skip(1).find_map(|p| {
                let (a, b) = p.split_once('=').unwrap_or((p, ""));
                a.trim().eq_ignore_ascii_case(k).then(|| b.trim().to_string())
            })
        };
        Some(Via {
            transport,
            host,
            port,
            branch: get("branch"),
            received: get("received"),
            rport: get("rport").map(|v| v.parse().ok()),
        })
    }

    /// Tag of the From header.
    pub fn from_tag(&self) -> Option<&str> {
        self.header("From").and_then(|v| param(v, "tag"))
    }

    /// Tag of the To header.
    pub fn to_tag(&self) -> Option<&str> {
        self.header("To").and_then(|v| param(v, "tag"))
    }

    /// Max-Forwards (70 when absent, as RFC 3261 recommends).
    pub fn max_forwards(&self) -> Option<u32> {
        match self.header("Max-Forwards") {
            None => Some(70),
            Some(v) => v.trim().parse().ok(),
        }
    }

    /// Serialises with a correct Content-Length.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = String::with_capacity(512 + self.body.len());
        match &self.start {
            StartLine::Request { method, uri } => {
                let _ = write!(s, "{method} {uri} SIP/2.0\r\n");
            }
            StartLine::Response { code, reason } => {
                let _ = write!(s, "SIP/2.0 {code} {reason}\r\n");
            }
        }
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case("Content-Length") {
                continue;
            }
            let _ = write!(s, "{n}: {v}\r\n");
        }
        let _ = write!(s, "Content-Length: {}\r\n\r\n", self.body.len());
        let mut out = s.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    /// A response to this request (RFC 3261 §8.2.6): Via, From, To, Call-ID and CSeq
    /// copied; a To tag added when given and absent.
    pub fn response(&self, code: u16, reason: &str, to_tag: Option<&str>) -> Message {
        let mut headers = Vec::new();
        for (n, v) in &self.headers {
            if ["Via", "From", "Call-ID", "CSeq", "Record-Route"].iter().any(|h| n.eq_ignore_ascii_case(h))
                && (code != 100 || !n.eq_ignore_ascii_case("Record-Route"))
            {
                headers.push((n.clone(), v.clone()));
            } else if n.eq_ignore_ascii_case("To") {
                let mut v = v.clone();
                if let (Some(t), None) = (to_tag, param(&v, "tag")) {
                    if code > 100 {
                        let _ = write!(v, ";tag={t}");
                    }
                }
                headers.push((n.clone(), v));
            }
        }
        Message { start: StartLine::Response { code, reason: reason.to_string() }, headers, body: Vec::new() }
    }
}

fn split_list(v: &str) -> impl Iterator<Item = &str> {
    // Commas inside <...> or quotes do not split.
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0);
    for (i, c) in v.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => depth += 1,
            '>' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(v[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(v[start..].trim());
    out.into_iter().filter(|s| !s.is_empty())
}

fn parse_start(line: &str) -> Result<StartLine, ParseError> {
    if let Some(rest) = line.strip_prefix("SIP/2.0 ") {
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        let code: u16 = code.parse().map_err(|_| bad(format!("bad status code {code:?}")))?;
        if !(100..700).contains(&code) {
            return Err(bad(format!("status code {code} out of range")));
        }
        return Ok(StartLine::Response { code, reason: reason.to_string() });
    }
    let mut t = line.split(' ');
    let (method, uri, version) = (t.next(), t.next(), t.next());
    match (method, uri, version, t.next()) {
        (Some(m), Some(u), Some("SIP/2.0"), None)
            if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) && u.contains(':') =>
        {
            Ok(StartLine::Request { method: m.to_string(), uri: u.to_string() })
        }
        _ => Err(bad(format!("bad start line {line:?}"))),
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_cr_or_lf_inside_a_header_is_refused() {
        for smuggled in ["Call-ID: c1\nX-Injected: yes", "Call-ID: c1\rCSeq: 9 BYE", "Subject: a\n"] {
            let m = INVITE.replace("Call-ID: a84b4c76e66710@pc33", smuggled);
            let m = if smuggled.starts_with("Subject") {
                INVITE.replace("X-Custom", &format!("{smuggled}X-Custom"))
            } else {
                m
            };
            assert!(Message::parse(m.as_bytes(), false).is_err(), "{m:?}");
        }
        assert!(Message::parse(INVITE.as_bytes(), false).is_ok());
    }

    #[test]
    fn user_parameters_do_not_hide_the_host() {
        let uri = "sip:+4930123;npdi@example.com:5070;transport=tcp";
        assert_eq!(host_port(uri), Some(("example.com".into(), Some(5070))));
        assert_eq!(aor_of(uri).as_deref(), Some("+4930123@example.com"));
        assert_eq!(host_port("sip:bob@[2001:db8::1]:5080;lr"), Some(("2001:db8::1".into(), Some(5080))));
        assert_eq!(host_port("sip:proxy.example;lr"), Some(("proxy.example".into(), None)));
        assert_eq!(aor_of("sip:alice@Example.COM;user=phone?subject=x@y").as_deref(), Some("alice@example.com"));
    }

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds;rport\r\nv: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bK1\r\nMax-Forwards: 70\r\nTo: Bob <sip:bob@example.com>\r\nFrom: Alice <sip:alice@example.com>;tag=1928301774\r\nCall-ID: a84b4c76e66710@pc33\r\nCSeq: 314159 INVITE\r\nContact: <sip:alice@10.0.0.1>\r\nX-Custom: keep, me\r\nContent-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\r\n";

    #[test]
    fn parses_and_round_trips() {
        let (m, n) = Message::parse(INVITE.as_bytes(), true).unwrap();
        assert_eq!(n, INVITE.len() - 1, "the body ends at Content-Length");
        assert_eq!(m.method(), "INVITE");
        assert_eq!(m.call_id(), "a84b4c76e66710@pc33");
        assert_eq!(m.cseq(), Some((314159, "INVITE".into())));
        let via = m.via().unwrap();
        assert_eq!(
            (via.host.as_str(), via.port, via.branch.as_deref()),
            ("10.0.0.1", Some(5060), Some("z9hG4bK776asdhds"))
        );
        assert_eq!(via.rport, Some(None));
        assert_eq!(m.header_values("Via").count(), 2, "compact form v: is a Via");
        assert_eq!(m.from_tag(), Some("1928301774"));
        assert_eq!(m.to_tag(), None);
        assert_eq!(m.body, b"v=0\r");
        let again = Message::parse(&m.to_bytes(), true).unwrap().0;
        assert_eq!(again, m);
        assert!(String::from_utf8(m.to_bytes()).unwrap().contains("X-Custom: keep, me\r\n"));
    }

    #[test]
    fn builds_responses_and_edits_headers() {
        let (mut m, _) = Message::parse(INVITE.as_bytes(), true).unwrap();
        let r = m.response(180, "Ringing", Some("xyz"));
        assert_eq!(r.to_tag(), Some("xyz"));
        assert_eq!(r.header_values("Via").count(), 2);
        assert_eq!(r.method(), "INVITE");
        m.push_front("Via", "SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKproxy");
        assert_eq!(m.via().unwrap().host, "192.0.2.9");
        assert_eq!(m.pop_front("Via").unwrap(), "SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKproxy");
        assert_eq!(m.via().unwrap().host, "10.0.0.1");
        m.set("Max-Forwards", "69");
        assert_eq!(m.max_forwards(), Some(69));
    }

    #[test]
    fn uri_helpers() {
        assert_eq!(
            uri_of("\"Bob\" <sip:bob@Example.com:5070;transport=tcp>;tag=1"),
            "sip:bob@Example.com:5070;transport=tcp"
        );
        assert_eq!(aor_of("sip:bob@Example.com:5070;transport=tcp"), Some("bob@example.com".into()));
        assert_eq!(host_port("sip:bob@10.0.0.1:5070;lr"), Some(("10.0.0.1".into(), Some(5070))));
        assert_eq!(host_port("sip:[2001:db8::1]:5060"), Some(("2001:db8::1".into(), Some(5060))));
        assert_eq!(param("<sip:p.example.com;lr>;x=1", "x"), Some("1"));
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in [
            "",
            "garbage\r\n\r\n",
            "INVITE sip:bob@x SIP/3.0\r\n\r\n",
            "SIP/2.0 99 Low\r\n\r\n",
            "INVITE sip:bob@x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n",
            "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nFrom: <sip:a@b>\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: x OPTIONS\r\n\r\n",
            "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nFrom: <sip:a@b>\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 50\r\n\r\nshort",
            "OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nFrom: <sip:a@b>\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: 1 OPTIONS\r\nContent-Length: -1\r\n\r\n",
        ] {
            assert!(Message::parse(bad.as_bytes(), false).is_err(), "{bad:?}");
        }
        assert_eq!(Message::parse(&INVITE.as_bytes()[..40], true), Err(ParseError::Incomplete));
        let huge = format!("OPTIONS sip:x SIP/2.0\r\nX: {}\r\n", "a".repeat(70_000));
        assert!(Message::parse(huge.as_bytes(), true).is_err());
        assert!(Message::parse(&[0xff, 0xfe, 0, 1, b'\r', b'\n', b'\r', b'\n'], false).is_err());
    }
}
