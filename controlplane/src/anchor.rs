//! Media anchoring as the SIP proxy needs it: offer, answer, delete — served by the
//! relay in the same process ([`Calls`]) or by remote relays over the NG protocol
//! ([`NgRelays`]), tried in turn, a relay that does not answer marked down for a while.

use crate::calls::{AnchorOptions, Calls};
use crate::error::Error;
use crate::ng::bencode::{decode, Value};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the proxy asks of a media relay.
pub trait MediaAnchor: Send + Sync + std::fmt::Debug {
    /// Anchors an offer; returns the SDP to forward.
    fn offer(&self, call_id: &str, from_tag: &str, to_tag: Option<&str>, sdp: &str) -> Result<String, Error>;
    /// Anchors an answer; returns the SDP to forward.
    fn answer(&self, call_id: &str, from_tag: &str, to_tag: &str, sdp: &str) -> Result<String, Error>;
    /// Frees a call's media.
    fn delete(&self, call_id: &str) -> Result<(), Error>;
}

impl MediaAnchor for Calls {
    fn offer(&self, call_id: &str, from_tag: &str, to_tag: Option<&str>, sdp: &str) -> Result<String, Error> {
        Calls::offer(self, call_id, from_tag, to_tag, sdp, &AnchorOptions::default())
    }

    fn answer(&self, call_id: &str, from_tag: &str, to_tag: &str, sdp: &str) -> Result<String, Error> {
        Calls::answer(self, call_id, from_tag, to_tag, sdp, &AnchorOptions::default())
    }

    fn delete(&self, call_id: &str) -> Result<(), Error> {
        Calls::delete(self, call_id).map(|_| ())
    }
}

/// How long a relay that did not answer is skipped.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Remote relays spoken to over NG (UDP).
#[derive(Debug)]
pub struct NgRelays {
    relays: Vec<SocketAddr>,
    sock: UdpSocket,
    timeout: Duration,
    state: Mutex<NgState>,
}

#[derive(Debug, Default)]
struct NgState {
    down_until: HashMap<usize, Instant>,
    sticky: HashMap<String, usize>,
    next: usize,
    cookie: u64,
}

impl NgRelays {
    /// Relays in preference order (the bootstrap list; membership replaces it later).
    pub fn new(relays: Vec<SocketAddr>, timeout: Duration) -> Result<Self, Error> {
        if relays.is_empty() {
            return Err(Error::Config("no relay given".into()));
        }
        let sock = UdpSocket::bind(if relays[0].is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        Ok(Self { relays, sock, timeout, state: Mutex::new(NgState::default()) })
    }

    /// Sends a request to the call's relay (or the next live one), failing over to the
    /// others on timeout.
    fn request(&self, call_id: &str, dict: Value) -> Result<Value, Error> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.relays.len();
        let start = st.sticky.get(call_id).copied().unwrap_or(st.next % n);
        st.next = st.next.wrapping_add(1);
        for k in 0..n {
            let i = (start + k) % n;
            if st.down_until.get(&i).is_some_and(|t| Instant::now() < *t) && k + 1 < n {
                continue;
            }
            st.cookie += 1;
            let cookie = format!("hasp{}_{}", std::process::id(), st.cookie);
            let mut msg = format!("{cookie} ").into_bytes();
            dict.encode_to(&mut msg);
            if self.sock.send_to(&msg, self.relays[i]).is_err() {
                st.down_until.insert(i, Instant::now() + DOWN_FOR);
                continue;
            }
            let deadline = Instant::now() + self.timeout;
            let mut buf = vec![0u8; 65536];
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let _ = self.sock.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                let Ok((len, _)) = self.sock.recv_from(&mut buf) else { break };
                // Late answers to an earlier request carry another cookie: skip them.
                let Some(body) = buf[..len].strip_prefix(format!("{cookie} ").as_bytes()) else { continue };
                let v = decode(body).map_err(|e| Error::Invalid(format!("relay answer: {e}")))?.0;
                st.down_until.remove(&i);
                st.sticky.insert(call_id.to_string(), i);
                return match v.get("result").and_then(Value::as_str) {
                    Some("ok") | Some("pong") => Ok(v),
                    _ => Err(Error::Invalid(
                        v.get("error-reason").and_then(Value::as_str).unwrap_or("relay error").to_string(),
                    )),
                };
            }
            tracing::warn!(relay = %self.relays[i], "relay did not answer; marked down");
            st.down_until.insert(i, Instant::now() + DOWN_FOR);
        }
        Err(Error::Busy("no relay answered".into()))
    }

    fn sdp_of(v: Value) -> Result<String, Error> {
        v.get("sdp")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Error::Invalid("relay answer without sdp".into()))
    }
}

impl MediaAnchor for NgRelays {
    fn offer(&self, call_id: &str, from_tag: &str, to_tag: Option<&str>, sdp: &str) -> Result<String, Error> {
        let mut d = vec![
            ("command", Value::str("offer")),
            ("call-id", Value::str(call_id)),
            ("from-tag", Value::str(from_tag)),
            ("sdp", Value::str(sdp)),
        ];
        if let Some(t) = to_tag {
            d.push(("to-tag", Value::str(t)));
        }
        Self::sdp_of(self.request(call_id, Value::dict(d))?)
    }

    fn answer(&self, call_id: &str, from_tag: &str, to_tag: &str, sdp: &str) -> Result<String, Error> {
        let d = Value::dict([
            ("command", Value::str("answer")),
            ("call-id", Value::str(call_id)),
            ("from-tag", Value::str(from_tag)),
            ("to-tag", Value::str(to_tag)),
            ("sdp", Value::str(sdp)),
        ]);
        Self::sdp_of(self.request(call_id, d)?)
    }

    fn delete(&self, call_id: &str) -> Result<(), Error> {
        let d = Value::dict([("command", Value::str("delete")), ("call-id", Value::str(call_id))]);
        let r = self.request(call_id, d).map(|_| ());
        self.state.lock().unwrap_or_else(|e| e.into_inner()).sticky.remove(call_id);
        r
    }
}
