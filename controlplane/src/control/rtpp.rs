//! RTPproxy's control protocol, so Kamailio's and OpenSIPS's `rtpproxy` modules drive
//! `hasp relay` as they drove the seed system's RTPproxy.
//!
//! Text commands, cookie-prefixed over UDP, bare over a Unix stream socket:
//! `V`, `VF <version>`, `U[opts] callid addr port from_tag[;n] [to_tag[;n]]` (create or
//! update; the address is the From side's), `L[opts] callid addr port from_tag to_tag`
//! (lookup on the answer; the address is the To side's), `D callid from_tag [to_tag]`, `I` (info), `Q callid from_tag [to_tag]`
//! (statistics). Errors answer `E<code>`.

use crate::error::Error;
use crate::relay::calls::{Calls, MAX_STREAMS};
use dataplane::{LatchMode, LatchPolicy};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The base protocol version rtpproxy reports.
pub const PROTOCOL_VERSION: &str = "20040107";
/// Capability versions answered `1` to `VF`: base protocol, multiple streams per call
/// (`;n` tags), the `V` extra parameter, forking and statistics queries.
pub const SUPPORTED: [&str; 5] = ["20040107", "20050322", "20060704", "20071218", "20080403"];

/// Error codes (rtpproxy's `rtpp_command_reply.c` numbering where it has one).
pub mod code {
    /// No command, or not one of ours.
    pub const SYNTAX: u32 = 1;
    /// Too few arguments, or an argument out of range (a stream number past the limit).
    pub const ARGS: u32 = 2;
    /// An unknown command.
    pub const UNKNOWN_COMMAND: u32 = 3;
    /// An address that does not parse, or one the relay must not send to (its own
    /// listeners or media ports, a denied network).
    pub const INVALID_ADDRESS: u32 = 7;
    /// No such call.
    pub const NO_SESSION: u32 = 8;
    /// No free port pair.
    pub const NO_PORTS: u32 = 65;
    /// Anything else.
    pub const INTERNAL: u32 = 99;
}

/// Commands over UDP handled at once.
const MAX_IN_FLIGHT: usize = 256;

fn err(c: u32) -> String {
    format!("E{c}")
}

/// One command, parsed; nothing in it is larger than the input or out of bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `V`: the base protocol version.
    Version,
    /// `VF <version>`: is this capability supported?
    Capability(&'a str),
    /// `U` (create or update) or `L` (lookup on the answer).
    Update {
        /// `U` rather than `L`.
        create: bool,
        /// Call-ID.
        call_id: &'a str,
        /// The tag of the side whose address this is.
        sender_tag: &'a str,
        /// The other side's tag, if given.
        other_tag: Option<&'a str>,
        /// Zero-based media stream, below [`MAX_STREAMS`].
        index: usize,
        /// Where that side receives; `None`: on hold.
        remote: Option<SocketAddr>,
        /// Latching option (`a`symmetric, `s`ymmetric).
        latch: Option<LatchPolicy>,
    },
    /// `D callid …`.
    Delete(&'a str),
    /// `Q callid …`.
    Query(&'a str),
    /// `I`.
    Info,
}

/// Splits `tag;n` into the tag and the zero-based stream index; `None` when `n` is a
/// number past [`MAX_STREAMS`] (it would size the call's stream table).
fn tag_index(t: &str) -> Option<(&str, usize)> {
    match t.split_once(';') {
        Some((tag, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            let i = n.parse::<usize>().ok().filter(|i| *i <= MAX_STREAMS)?;
            Some((tag, i.saturating_sub(1)))
        }
        // Not a number: rtpproxy reads it as stream 1.
        Some((tag, _)) => Some((tag, 0)),
        None => Some((t, 0)),
    }
}

fn latch_from_opts(opts: &str) -> Option<LatchPolicy> {
    let mut p = None;
    for c in opts.chars() {
        match c.to_ascii_lowercase() {
            'a' => p = Some(LatchPolicy { mode: LatchMode::Asymmetric, ..LatchPolicy::default() }),
            's' => p = Some(LatchPolicy::default()),
            _ => {}
        }
    }
    p
}

/// Parses one command (without cookie); `Err` is the error code to answer.
pub fn parse(line: &str) -> Result<Request<'_>, u32> {
    let mut args = line.split_whitespace();
    let cmd = args.next().ok_or(code::SYNTAX)?;
    let mut rest = [""; 5];
    let mut n = 0;
    for a in args.take(rest.len()) {
        rest[n] = a;
        n += 1;
    }
    let rest = &rest[..n];
    // The command letter, then its options (a multi-byte first character is no command).
    let mut chars = cmd.chars();
    let op = chars.next().ok_or(code::SYNTAX)?.to_ascii_uppercase();
    let opts = chars.as_str();
    match op {
        'V' if opts.eq_ignore_ascii_case("F") => rest.first().map(|v| Request::Capability(v)).ok_or(code::ARGS),
        'V' => Ok(Request::Version),
        'U' | 'L' => {
            if rest.len() < 4 {
                return Err(code::ARGS);
            }
            let (call_id, addr, port) = (rest[0], rest[1], rest[2]);
            let create = op == 'U';
            // U carries the From side's address (its tag first); L, the lookup on the
            // answer, carries the To side's (the second tag).
            let (sender_t, other_t) = match (create, rest.get(4)) {
                (false, Some(to)) => (*to, Some(rest[3])),
                _ => (rest[3], rest.get(4).copied()),
            };
            let (sender_tag, index) = tag_index(sender_t).ok_or(code::ARGS)?;
            let other_tag = match other_t {
                Some(t) => Some(tag_index(t).ok_or(code::ARGS)?.0),
                None => None,
            };
            let ip = addr.parse::<IpAddr>().map_err(|_| code::INVALID_ADDRESS)?;
            let port = port.parse::<u16>().map_err(|_| code::INVALID_ADDRESS)?;
            // Port 0 or a null address: the sender is on hold; keep the stream.
            let remote = (port != 0 && !ip.is_unspecified()).then(|| SocketAddr::new(ip, port));
            Ok(Request::Update { create, call_id, sender_tag, other_tag, index, remote, latch: latch_from_opts(opts) })
        }
        'D' => rest.first().map(|c| Request::Delete(c)).ok_or(code::ARGS),
        'Q' => rest.first().map(|c| Request::Query(c)).ok_or(code::ARGS),
        'I' => Ok(Request::Info),
        _ => Err(code::UNKNOWN_COMMAND),
    }
}

/// Executes one command (without cookie) and returns the reply (without cookie).
pub fn handle(calls: &Calls, line: &str) -> String {
    let reply = match parse(line) {
        Ok(r) => execute(calls, r),
        Err(c) => err(c),
    };
    tracing::debug!(command = line, reply = %reply, "rtpproxy command");
    reply
}

fn execute(calls: &Calls, req: Request<'_>) -> String {
    match req {
        Request::Capability(v) => if SUPPORTED.contains(&v) { "1" } else { "0" }.to_string(),
        Request::Version => PROTOCOL_VERSION.to_string(),
        Request::Update { create, call_id, sender_tag, other_tag, index, remote, latch } => {
            match calls.update_stream(call_id, sender_tag, other_tag, index, remote, create, latch) {
                Ok(p) => format!("{p} {}", calls.relay().config().advertised()),
                Err(Error::NotFound(_)) => err(code::NO_SESSION),
                Err(Error::PortsExhausted(_)) => err(code::NO_PORTS),
                Err(Error::RemoteDenied(_)) => err(code::INVALID_ADDRESS),
                Err(Error::Invalid(_)) => err(code::ARGS),
                Err(_) => err(code::INTERNAL),
            }
        }
        Request::Delete(call_id) => match calls.delete(call_id) {
            Ok(_) => "0".into(),
            Err(_) => err(code::NO_SESSION),
        },
        Request::Query(call_id) => match calls.stats(call_id) {
            // ttl, packets in from caller, from callee, relayed, dropped.
            Ok(s) => {
                let (mut a, mut b, mut relayed, mut dropped) = (0u64, 0u64, 0u64, 0u64);
                for (_, v) in &s.streams {
                    for (leg, acc) in [(0, &mut a), (1, &mut b)] {
                        if let Some(st) = &v.legs[leg].stats {
                            *acc += st.rtp.packets;
                            relayed += st.rtp.forwarded;
                            dropped += st.rtp.drops.0.iter().sum::<u64>();
                        }
                    }
                }
                let ttl = calls.relay().config().inactivity_timeout_secs;
                format!("{ttl} {a} {b} {relayed} {dropped}")
            }
            Err(_) => err(code::NO_SESSION),
        },
        Request::Info => {
            let (sessions, free, total, t) = calls.relay().usage();
            format!(
                "sessions created: {}\nactive sessions: {}\nactive streams: {sessions}\nport pairs free: {free}/{total}",
                t.created,
                calls.len()
            )
        }
    }
}

/// Serves the protocol on UDP (`ADDR:PORT`, cookie-prefixed) or a Unix stream socket
/// (a path, one command per connection, no cookie). Returns what it bound.
pub async fn serve(listen: &str, calls: Arc<Calls>) -> std::io::Result<String> {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        let sock = Arc::new(tokio::net::UdpSocket::bind(addr).await?);
        let bound = sock.local_addr()?.to_string();
        // Commands handled at once; a flood beyond is dropped (Kamailio retransmits),
        // not queued as one task per datagram.
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else { continue };
                let Ok(text) = std::str::from_utf8(&buf[..n]) else { continue };
                let text = text.trim_end();
                // No cookie: nothing to answer to; a counted drop in the logs.
                let Some((cookie, command)) = text.split_once(' ') else {
                    tracing::debug!("rtpproxy message without cookie dropped");
                    continue;
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::debug!("rtpproxy command dropped: too many in flight");
                    continue;
                };
                let (c, cookie, command) = (calls.clone(), cookie.to_string(), command.to_string());
                let s = sock.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let reply = tokio::task::spawn_blocking(move || handle(&c, &command))
                        .await
                        .unwrap_or_else(|_| err(code::INTERNAL));
                    let _ = s.send_to(format!("{cookie} {reply}\n").as_bytes(), peer).await;
                });
            }
        });
        Ok(bound)
    } else {
        let _ = std::fs::remove_file(listen);
        let l = tokio::net::UnixListener::bind(listen)?;
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut conn, _)) = l.accept().await else { continue };
                let c = calls.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.contains(&b'\n') && buf.len() < 8192 {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&buf).trim().to_string();
                    let reply = tokio::task::spawn_blocking(move || handle(&c, &line))
                        .await
                        .unwrap_or_else(|_| err(code::INTERNAL));
                    let _ = conn.write_all(format!("{reply}\n").as_bytes()).await;
                });
            }
        });
        Ok(listen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tags_and_stream_numbers() {
        assert_eq!(tag_index("abc;2"), Some(("abc", 1)));
        assert_eq!(tag_index("abc"), Some(("abc", 0)));
        assert_eq!(tag_index("abc;x"), Some(("abc", 0)));
        assert_eq!(tag_index("abc;16"), Some(("abc", 15)));
        assert_eq!(tag_index("abc;17"), None);
        assert_eq!(tag_index("abc;100000000000000"), None);
        assert_eq!(tag_index("abc;99999999999999999999999999"), None, "too big for usize is still too big");
    }

    #[test]
    fn huge_stream_numbers_and_odd_bytes_are_errors() {
        assert_eq!(parse("U cid1 192.0.2.1 4000 t;100000000000000"), Err(code::ARGS));
        assert_eq!(parse("U cid1 192.0.2.1 4000 t;1 u;3000"), Err(code::ARGS));
        assert_eq!(parse("\u{e9}x"), Err(code::UNKNOWN_COMMAND), "a multi-byte command letter");
        assert_eq!(parse(""), Err(code::SYNTAX));
        assert_eq!(parse("U c 192.0.2.1 x t"), Err(code::INVALID_ADDRESS));
        match parse("Ua cid 192.0.2.1 4000 t;2 u") {
            Ok(Request::Update {
                create: true,
                index: 1,
                other_tag: Some("u"),
                remote: Some(r),
                latch: Some(l),
                ..
            }) => {
                assert_eq!(r, "192.0.2.1:4000".parse().unwrap());
                assert_eq!(l.mode, LatchMode::Asymmetric);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse("L cid 0.0.0.0 4000 f t").map(|r| matches!(r, Request::Update { remote: None, .. })),
            Ok(true)
        );
    }

    #[test]
    fn maps_latching_options() {
        assert_eq!(latch_from_opts("as").map(|p| p.mode), Some(LatchMode::Learn));
        assert_eq!(latch_from_opts("sa").map(|p| p.mode), Some(LatchMode::Asymmetric));
        assert_eq!(latch_from_opts("c0,8"), None);
    }
}
