//! rtpengine's NG control protocol: `<cookie> <bencoded dictionary>` over UDP and TCP,
//! answered `<cookie> <bencoded dictionary>`, with rtpengine's command semantics, so
//! Kamailio's and OpenSIPS's `rtpengine` modules drive `hasp relay` unchanged.

pub mod bencode;
mod commands;
mod server;

pub use commands::handle_command;
pub use server::{serve, ReplyCache};

use bencode::Value;

/// Splits a message into cookie and body. `None`: no cookie (nothing can be answered).
pub fn split_cookie(msg: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = msg.iter().position(|&b| b == b' ')?;
    let (cookie, rest) = (&msg[..sp], &msg[sp + 1..]);
    if cookie.is_empty() || cookie.len() > 256 || cookie.iter().any(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some((cookie, rest))
}

/// An error answer as rtpengine writes it.
pub fn error_reply(reason: &str) -> Value {
    Value::dict([("result", Value::str("error")), ("error-reason", Value::str(reason))])
}

/// Prefixes a reply with its cookie.
pub fn frame(cookie: &[u8], reply: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(cookie.len() + 64);
    out.extend_from_slice(cookie);
    out.push(b' ');
    reply.encode_to(&mut out);
    out
}
