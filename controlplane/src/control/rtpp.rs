//! RTPproxy's control protocol, so Kamailio's and OpenSIPS's `rtpproxy` modules drive
//! `hasp relay` as they drove the seed system's RTPproxy.
//!
//! Text commands, cookie-prefixed over UDP, bare over a Unix stream socket:
//! `V`, `VF <version>`, `U[opts] callid addr port from_tag[;n] [to_tag[;n]]` (create or
//! update; the address is the From side's), `L[opts] callid addr port from_tag to_tag`
//! (lookup on the answer; the address is the To side's), `D callid from_tag [to_tag]`, `I` (info), `Q callid from_tag [to_tag]`
//! (statistics). Errors answer `E<code>`.

use crate::error::Error;
use crate::relay::calls::Calls;
use dataplane::{LatchMode, LatchPolicy};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The base protocol version rtpproxy reports.
pub const PROTOCOL_VERSION: &str = "20040107";
/// Capability versions answered `1` to `VF`: base protocol, multiple streams per call
/// (`;n` tags), the `V` extra parameter, forking and statistics queries.
pub const SUPPORTED: [&str; 5] = ["20040107", "20050322", "20060704", "20071218", "20080403"];

/// Error codes (rtpproxy's `rtpp_command_reply.c` numbering where it has one).
mod code {
    pub const SYNTAX: u32 = 1;
    pub const ARGS: u32 = 2;
    pub const UNKNOWN_COMMAND: u32 = 3;
    pub const INVALID_ADDRESS: u32 = 7;
    pub const NO_SESSION: u32 = 8;
    pub const NO_PORTS: u32 = 65;
    pub const INTERNAL: u32 = 99;
}

fn err(c: u32) -> String {
    format!("E{c}")
}

/// Splits `tag;n` into the tag and the zero-based stream index.
fn tag_index(t: &str) -> (&str, usize) {
    match t.split_once(';') {
        Some((tag, n)) => (tag, n.parse::<usize>().unwrap_or(1).saturating_sub(1)),
        None => (t, 0),
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

/// Executes one command (without cookie) and returns the reply (without cookie).
pub fn handle(calls: &Calls, line: &str) -> String {
    let reply = execute(calls, line);
    tracing::debug!(command = line, reply = %reply, "rtpproxy command");
    reply
}

fn execute(calls: &Calls, line: &str) -> String {
    let mut args = line.split_whitespace();
    let Some(cmd) = args.next() else { return err(code::SYNTAX) };
    let rest: Vec<&str> = args.collect();
    let (op, opts) = cmd.split_at(1);
    match op.to_ascii_uppercase().as_str() {
        "V" if opts.eq_ignore_ascii_case("F") => match rest.first() {
            Some(v) => if SUPPORTED.contains(v) { "1" } else { "0" }.to_string(),
            None => err(code::ARGS),
        },
        "V" => PROTOCOL_VERSION.to_string(),
        "U" | "L" => {
            if rest.len() < 4 {
                return err(code::ARGS);
            }
            let (call_id, addr, port) = (rest[0], rest[1], rest[2]);
            let create = op.eq_ignore_ascii_case("U");
            // U carries the From side's address (its tag first); L, the lookup on the
            // answer, carries the To side's (the second tag).
            let (sender_t, other_t) = match (create, rest.get(4)) {
                (false, Some(to)) => (*to, Some(rest[3])),
                _ => (rest[3], rest.get(4).copied()),
            };
            let (sender, index) = tag_index(sender_t);
            let other = other_t.map(|t| tag_index(t).0);
            let Ok(ip) = addr.parse::<IpAddr>() else { return err(code::INVALID_ADDRESS) };
            let Ok(port) = port.parse::<u16>() else { return err(code::INVALID_ADDRESS) };
            // Port 0 or a null address: the sender is on hold; keep the stream.
            let remote = (port != 0 && !ip.is_unspecified()).then(|| SocketAddr::new(ip, port));
            match calls.update_stream(call_id, sender, other, index, remote, create, latch_from_opts(opts)) {
                Ok(p) => format!("{p} {}", calls.relay().config().advertised()),
                Err(Error::NotFound(_)) => err(code::NO_SESSION),
                Err(Error::PortsExhausted(_)) => err(code::NO_PORTS),
                Err(_) => err(code::INTERNAL),
            }
        }
        "D" => {
            let Some(call_id) = rest.first() else { return err(code::ARGS) };
            match calls.delete(call_id) {
                Ok(_) => "0".into(),
                Err(_) => err(code::NO_SESSION),
            }
        }
        "Q" => {
            let Some(call_id) = rest.first() else { return err(code::ARGS) };
            match calls.stats(call_id) {
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
            }
        }
        "I" => {
            let (sessions, free, total, t) = calls.relay().usage();
            format!(
                "sessions created: {}\nactive sessions: {}\nactive streams: {sessions}\nport pairs free: {free}/{total}",
                t.created,
                calls.len()
            )
        }
        _ => err(code::UNKNOWN_COMMAND),
    }
}

/// Serves the protocol on UDP (`ADDR:PORT`, cookie-prefixed) or a Unix stream socket
/// (a path, one command per connection, no cookie). Returns what it bound.
pub async fn serve(listen: &str, calls: Arc<Calls>) -> std::io::Result<String> {
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        let sock = Arc::new(tokio::net::UdpSocket::bind(addr).await?);
        let bound = sock.local_addr()?.to_string();
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
                let (c, cookie, command) = (calls.clone(), cookie.to_string(), command.to_string());
                let s = sock.clone();
                tokio::spawn(async move {
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
        assert_eq!(tag_index("abc;2"), ("abc", 1));
        assert_eq!(tag_index("abc"), ("abc", 0));
        assert_eq!(tag_index("abc;x"), ("abc", 0));
    }

    #[test]
    fn maps_latching_options() {
        assert_eq!(latch_from_opts("as").map(|p| p.mode), Some(LatchMode::Learn));
        assert_eq!(latch_from_opts("sa").map(|p| p.mode), Some(LatchMode::Asymmetric));
        assert_eq!(latch_from_opts("c0,8"), None);
    }
}
