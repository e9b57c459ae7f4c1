//! Media anchoring as the SIP proxy needs it: offer, answer, delete — served by the
//! relay in the same process ([`Calls`]) or by remote relays over the NG protocol
//! ([`NgRelays`]: NG over UDP, or over HTTP on a relay's REST API), tried in turn, a
//! relay that does not answer marked down for a while. [`RestMixer`] drives a remote
//! relay's conference mixer over its REST API for the conference focus.

use crate::control::ng::bencode::{decode, Value};
use crate::error::Error;
use crate::relay::calls::{AnchorOptions, Calls};
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

/// How long a call's relay is remembered in the shared store (a call that never sends
/// BYE is forgotten after this).
const DIALOG_TTL: u64 = 12 * 3600;

/// How long a relay that did not answer is skipped.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Where a remote relay takes NG requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayUrl {
    /// `ng://HOST:PORT`: its NG port (UDP).
    Ng(SocketAddr),
    /// `http://HOST:PORT`: its REST API (`POST /ng`, bearer token).
    Http(String),
}

impl RelayUrl {
    /// Parses `ng://HOST:PORT` or `http://HOST:PORT`.
    pub fn parse(url: &str) -> Result<Self, Error> {
        if let Some(hp) = url.strip_prefix("ng://") {
            let a = std::net::ToSocketAddrs::to_socket_addrs(hp)
                .map_err(|e| Error::Config(format!("relay {url}: {e}")))?
                .next()
                .ok_or_else(|| Error::Config(format!("relay {url} does not resolve")))?;
            return Ok(RelayUrl::Ng(a));
        }
        if let Some(hp) = url.strip_prefix("http://") {
            let hp = hp.trim_end_matches('/');
            if hp.is_empty() || hp.contains('/') {
                return Err(Error::Config(format!("relay {url}: expected http://HOST:PORT")));
            }
            return Ok(RelayUrl::Http(format!("http://{hp}")));
        }
        Err(Error::Config(format!("relay {url:?}: expected ng://HOST:PORT or http://HOST:PORT")))
    }
}

impl std::fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayUrl::Ng(a) => write!(f, "ng://{a}"),
            RelayUrl::Http(u) => f.write_str(u),
        }
    }
}

/// Remote relays spoken to over NG (UDP or HTTP).
#[derive(Debug)]
pub struct NgRelays {
    relays: Vec<RelayUrl>,
    http: ureq::Agent,
    token: Option<String>,
    /// Shared dialog state (call → relay), so another proxy finds a call's relay.
    dialogs: Option<std::sync::Arc<dyn crate::store::Store>>,
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
    /// Relays in preference order (the bootstrap list; membership replaces it later);
    /// `token` is the bearer token of `http://` relays' APIs.
    pub fn new(relays: Vec<RelayUrl>, timeout: Duration, token: Option<String>) -> Result<Self, Error> {
        if relays.is_empty() {
            return Err(Error::Config("no relay given".into()));
        }
        let v6 = relays.iter().any(|r| matches!(r, RelayUrl::Ng(a) if a.is_ipv6()));
        let sock = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
        let http = ureq::AgentBuilder::new().timeout(timeout).build();
        Ok(Self { relays, http, token, dialogs: None, sock, timeout, state: Mutex::new(NgState::default()) })
    }

    /// Records each call's relay in `store` and looks calls up there, so any proxy
    /// sharing the store (etcd) sends a call's re-INVITE or BYE to its relay.
    pub fn with_dialogs(mut self, store: std::sync::Arc<dyn crate::store::Store>) -> Self {
        self.dialogs = Some(store);
        self
    }

    /// The relay a call was anchored on, from this proxy's memory or, for a call that
    /// may have begun at another proxy (`shared`), the shared store.
    fn relay_of(&self, st: &NgState, call_id: &str, shared: bool) -> Option<usize> {
        if let Some(i) = st.sticky.get(call_id) {
            return Some(*i);
        }
        if !shared {
            return None;
        }
        let node = self.dialogs.as_ref()?.dialog(call_id).ok()??;
        self.relays.iter().position(|r| r.to_string() == node)
    }

    /// Remembers that `call_id` lives on relay `i` (in the shared store when it is new).
    fn stick(&self, st: &mut NgState, call_id: &str, i: usize) {
        if st.sticky.insert(call_id.to_string(), i) != Some(i) {
            if let Some(d) = &self.dialogs {
                if let Err(e) = d.put_dialog(call_id, &self.relays[i].to_string(), DIALOG_TTL) {
                    tracing::warn!(error = %e, "could not share the call's relay");
                }
            }
        }
    }

    /// One NG exchange over HTTP; `None` when the relay did not answer (down).
    fn http_exchange(&self, base: &str, cookie: &str, msg: &[u8]) -> Option<Result<Value, Error>> {
        let mut req = self.http.post(&format!("{base}/ng")).set("Content-Type", "application/x-rtpengine-ng");
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.send_bytes(msg) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                return Some(Err(Error::Invalid(format!("relay {base} answered HTTP {code}: {body}"))));
            }
            Err(_) => return None,
        };
        let mut body = Vec::new();
        if std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).is_err() {
            return None;
        }
        let Some(b) = body.strip_prefix(format!("{cookie} ").as_bytes()) else {
            return Some(Err(Error::Invalid(format!("relay {base}: answer without our cookie"))));
        };
        Some(decode(b).map(|(v, _)| v).map_err(|e| Error::Invalid(format!("relay answer: {e}"))))
    }

    /// Sends a request to the call's relay (or the next live one), failing over to the
    /// others on timeout. `new_call`: the offer that starts a call, which no store
    /// lookup can place (it saves a round trip to the store per call).
    fn request(&self, call_id: &str, dict: Value, new_call: bool) -> Result<Value, Error> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.relays.len();
        let start = self.relay_of(&st, call_id, !new_call).unwrap_or(st.next % n);
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
            let addr = match &self.relays[i] {
                RelayUrl::Ng(a) => *a,
                RelayUrl::Http(base) => match self.http_exchange(base, &cookie, &msg) {
                    Some(r) => {
                        let v = r?;
                        st.down_until.remove(&i);
                        self.stick(&mut st, call_id, i);
                        return Self::result(v);
                    }
                    None => {
                        tracing::warn!(relay = %base, "relay did not answer; marked down");
                        st.down_until.insert(i, Instant::now() + DOWN_FOR);
                        continue;
                    }
                },
            };
            if self.sock.send_to(&msg, addr).is_err() {
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
                self.stick(&mut st, call_id, i);
                return Self::result(v);
            }
            tracing::warn!(relay = %self.relays[i], "relay did not answer; marked down");
            st.down_until.insert(i, Instant::now() + DOWN_FOR);
        }
        Err(Error::Busy("no relay answered".into()))
    }

    fn result(v: Value) -> Result<Value, Error> {
        match v.get("result").and_then(Value::as_str) {
            Some("ok") | Some("pong") => Ok(v),
            _ => {
                Err(Error::Invalid(v.get("error-reason").and_then(Value::as_str).unwrap_or("relay error").to_string()))
            }
        }
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
        Self::sdp_of(self.request(call_id, Value::dict(d), to_tag.is_none())?)
    }

    fn answer(&self, call_id: &str, from_tag: &str, to_tag: &str, sdp: &str) -> Result<String, Error> {
        let d = Value::dict([
            ("command", Value::str("answer")),
            ("call-id", Value::str(call_id)),
            ("from-tag", Value::str(from_tag)),
            ("to-tag", Value::str(to_tag)),
            ("sdp", Value::str(sdp)),
        ]);
        Self::sdp_of(self.request(call_id, d, false)?)
    }

    fn delete(&self, call_id: &str) -> Result<(), Error> {
        let d = Value::dict([("command", Value::str("delete")), ("call-id", Value::str(call_id))]);
        let r = self.request(call_id, d, false).map(|_| ());
        self.state.lock().unwrap_or_else(|e| e.into_inner()).sticky.remove(call_id);
        if let Some(s) = &self.dialogs {
            let _ = s.delete_dialog(call_id);
        }
        r
    }
}

/// A remote relay's conference mixer, driven over its REST API (`/v1/conferences`).
#[derive(Debug)]
pub struct RestMixer {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl RestMixer {
    /// The mixer of the relay whose API is at `base` (`http://HOST:PORT`).
    pub fn new(base: &str, token: Option<String>, timeout: Duration) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: ureq::AgentBuilder::new().timeout(timeout).build(),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value, Error> {
        let mut req = self.http.request(method, &format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(r) if r.status() == 204 => Ok(serde_json::Value::Null),
            Ok(r) => r.into_json().map_err(|e| Error::Invalid(format!("mixer {}: {e}", self.base))),
            Err(ureq::Error::Status(404, _)) => Err(Error::NotFound(path.to_string())),
            Err(ureq::Error::Status(code, r)) => Err(Error::Invalid(format!(
                "mixer {} answered {code}: {}",
                self.base,
                r.into_string().unwrap_or_default()
            ))),
            Err(e) => Err(Error::Io(std::io::Error::other(format!("mixer {}: {e}", self.base)))),
        }
    }
}

impl crate::proxy::focus::Mixer for RestMixer {
    fn create_room(&self) -> Result<String, Error> {
        let v = self.call("POST", "/v1/conferences", Some(serde_json::json!({})))?;
        v["id"].as_str().map(str::to_string).ok_or_else(|| Error::Invalid("mixer answer without id".into()))
    }

    fn delete_room(&self, room: &str) -> Result<(), Error> {
        self.call("DELETE", &format!("/v1/conferences/{room}"), None).map(|_| ())
    }

    fn join(
        &self,
        room: &str,
        codec: dataplane::mixer::Codec,
        pt: u8,
        remote: Option<SocketAddr>,
    ) -> Result<crate::relay::ParticipantCreated, Error> {
        let mut body = serde_json::json!({"codec": codec.name(), "payload_type": pt});
        if let Some(r) = remote {
            body["remote"] = serde_json::Value::String(r.to_string());
        }
        let v = self.call("POST", &format!("/v1/conferences/{room}/participants"), Some(body))?;
        let bad = || Error::Invalid(format!("mixer {}: unexpected participant {v}", self.base));
        Ok(crate::relay::ParticipantCreated {
            id: v["id"].as_str().ok_or_else(bad)?.to_string(),
            address: v["address"].as_str().and_then(|a| a.parse().ok()).ok_or_else(bad)?,
            rtp_port: v["rtp_port"].as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(bad)?,
            payload_type: v["payload_type"].as_u64().and_then(|p| u8::try_from(p).ok()).ok_or_else(bad)?,
        })
    }

    fn leave(&self, room: &str, participant: &str) -> Result<(), Error> {
        self.call("DELETE", &format!("/v1/conferences/{room}/participants/{participant}"), None).map(|_| ())
    }
}
