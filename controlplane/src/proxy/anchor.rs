//! Media anchoring as the SIP proxy needs it: offer, answer, delete — served by the
//! relay in the same process ([`Calls`]) or by remote relays over the NG protocol
//! ([`NgRelays`]: NG over UDP, or over HTTP on a relay's REST API), tried in turn, a
//! relay that does not answer marked down for a while. [`RestMixer`] drives a remote
//! relay's conference mixer over its REST API for the conference focus.
//!
//! The operations are asynchronous: the proxy's driver runs them as tasks, each with a
//! deadline, and hands the results to the proxy core, which never waits for them. No
//! lock is held across a network round trip: NG over UDP shares one socket among all
//! requests in flight, a receiver task matching answers to requests by cookie; NG over
//! HTTP goes through one pooled HTTP client.

use crate::control::ng::bencode::{decode, Value};
use crate::error::Error;
use crate::relay::calls::{AnchorOptions, Calls};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A boxed future of an anchor operation.
pub type AnchorFuture<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'static>>;

/// What the proxy asks of a media relay.
pub trait MediaAnchor: Send + Sync + std::fmt::Debug {
    /// Anchors an offer; resolves to the SDP to forward.
    fn offer(
        self: Arc<Self>,
        call_id: String,
        from_tag: String,
        to_tag: Option<String>,
        sdp: String,
    ) -> AnchorFuture<String>;
    /// Anchors an answer; resolves to the SDP to forward.
    fn answer(self: Arc<Self>, call_id: String, from_tag: String, to_tag: String, sdp: String) -> AnchorFuture<String>;
    /// Frees a call's media.
    fn delete(self: Arc<Self>, call_id: String) -> AnchorFuture<()>;
}

/// The relay in this process: its operations are quick and local (ports, sockets, a
/// bounded channel to the workers), so they run right where the driver's task polls
/// them, never on the proxy core's thread.
impl MediaAnchor for Calls {
    fn offer(
        self: Arc<Self>,
        call_id: String,
        from_tag: String,
        to_tag: Option<String>,
        sdp: String,
    ) -> AnchorFuture<String> {
        Box::pin(
            async move { Calls::offer(&self, &call_id, &from_tag, to_tag.as_deref(), &sdp, &AnchorOptions::default()) },
        )
    }

    fn answer(self: Arc<Self>, call_id: String, from_tag: String, to_tag: String, sdp: String) -> AnchorFuture<String> {
        Box::pin(async move { Calls::answer(&self, &call_id, &from_tag, &to_tag, &sdp, &AnchorOptions::default()) })
    }

    fn delete(self: Arc<Self>, call_id: String) -> AnchorFuture<()> {
        Box::pin(async move { Calls::delete(&self, &call_id).map(|_| ()) })
    }
}

/// How long a call's relay is remembered in the shared store (a call that never sends
/// BYE is forgotten after this).
const DIALOG_TTL: u64 = 12 * 3600;

/// How long a relay that did not answer is skipped.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Largest NG answer read (an answer carries one SDP).
const MAX_NG_ANSWER: usize = 65_535;

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

/// Answers awaited on the shared NG socket, by cookie.
type Waiting = Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>;

/// Remote relays spoken to over NG (UDP or HTTP).
#[derive(Debug)]
pub struct NgRelays {
    relays: Vec<RelayUrl>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    token: Option<String>,
    /// Shared dialog state (call → relay), so another proxy finds a call's relay.
    dialogs: Option<Arc<dyn crate::store::Store>>,
    sock: Arc<tokio::net::UdpSocket>,
    waiting: Arc<Waiting>,
    timeout: Duration,
    cookie: AtomicU64,
    state: Mutex<NgState>,
}

#[derive(Debug, Default)]
struct NgState {
    down_until: HashMap<usize, Instant>,
    sticky: HashMap<String, usize>,
    next: usize,
}

/// Reads NG answers off the shared socket and hands each to the request that waits for
/// its cookie; answers nobody waits for (late, or forged) are dropped.
async fn receive_answers(sock: Arc<tokio::net::UdpSocket>, waiting: std::sync::Weak<Waiting>) {
    let mut buf = vec![0u8; MAX_NG_ANSWER];
    loop {
        let Ok((n, _)) = sock.recv_from(&mut buf).await else {
            // ICMP errors from an earlier send surface here: not fatal.
            if waiting.strong_count() == 0 {
                return;
            }
            continue;
        };
        let Some(waiting) = waiting.upgrade() else { return };
        let data = &buf[..n];
        let Some(sp) = data.iter().position(|b| *b == b' ') else { continue };
        let Ok(cookie) = std::str::from_utf8(&data[..sp]) else { continue };
        let tx = waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(cookie);
        if let Some(tx) = tx {
            let _ = tx.send(data[sp + 1..].to_vec());
        }
    }
}

impl NgRelays {
    /// Relays in preference order (the bootstrap list; membership replaces it later);
    /// `token` is the bearer token of `http://` relays' APIs; `timeout` is the wait for
    /// one relay's answer before the next is tried. Must be called inside a tokio
    /// runtime (the receiver of NG answers is a task).
    pub fn new(relays: Vec<RelayUrl>, timeout: Duration, token: Option<String>) -> Result<Self, Error> {
        if relays.is_empty() {
            return Err(Error::Config("no relay given".into()));
        }
        let v6 = relays.iter().any(|r| matches!(r, RelayUrl::Ng(a) if a.is_ipv6()));
        let std_sock = std::net::UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
        std_sock.set_nonblocking(true)?;
        let sock = Arc::new(tokio::net::UdpSocket::from_std(std_sock)?);
        let waiting: Arc<Waiting> = Arc::default();
        tokio::spawn(receive_answers(sock.clone(), Arc::downgrade(&waiting)));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let http = HttpClient::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .build(connector);
        Ok(Self {
            relays,
            http,
            token,
            dialogs: None,
            sock,
            waiting,
            timeout,
            cookie: AtomicU64::new(0),
            state: Mutex::new(NgState::default()),
        })
    }

    /// Records each call's relay in `store` and looks calls up there, so any proxy
    /// sharing the store (etcd) sends a call's re-INVITE or BYE to its relay.
    pub fn with_dialogs(mut self, store: Arc<dyn crate::store::Store>) -> Self {
        self.dialogs = Some(store);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NgState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The relay a call was anchored on, from this proxy's memory or, for a call that
    /// may have begun at another proxy (`shared`), the shared store (a blocking store
    /// call, so on the blocking pool).
    async fn relay_of(&self, call_id: &str, shared: bool) -> Option<usize> {
        if let Some(i) = self.lock().sticky.get(call_id) {
            return Some(*i);
        }
        let store = self.dialogs.clone().filter(|_| shared)?;
        let cid = call_id.to_string();
        let node = tokio::task::spawn_blocking(move || store.dialog(&cid)).await.ok()?.ok()??;
        self.relays.iter().position(|r| r.to_string() == node)
    }

    /// Remembers that `call_id` lives on relay `i` (in the shared store when it is new,
    /// before the call goes on: another proxy may get its next request at once).
    async fn stick(&self, call_id: &str, i: usize) {
        if self.lock().sticky.insert(call_id.to_string(), i) != Some(i) {
            if let Some(d) = self.dialogs.clone() {
                let (cid, node) = (call_id.to_string(), self.relays[i].to_string());
                let put = tokio::task::spawn_blocking(move || d.put_dialog(&cid, &node, DIALOG_TTL)).await;
                if let Ok(Err(e)) = put {
                    tracing::warn!(error = %e, "could not share the call's relay");
                }
            }
        }
    }

    /// One NG exchange over UDP; `None` when the relay did not answer in time.
    async fn udp_exchange(&self, addr: SocketAddr, cookie: &str, msg: &[u8]) -> Option<Result<Value, Error>> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(cookie.to_string(), tx);
        let sent = self.sock.send_to(msg, addr).await.is_ok();
        let answer = if sent { tokio::time::timeout(self.timeout, rx).await.ok().and_then(Result::ok) } else { None };
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(cookie);
        let body = answer?;
        Some(decode(&body).map(|(v, _)| v).map_err(|e| Error::Invalid(format!("relay answer: {e}"))))
    }

    /// One NG exchange over HTTP; `None` when the relay did not answer (down).
    async fn http_exchange(&self, base: &str, cookie: &str, msg: Vec<u8>) -> Option<Result<Value, Error>> {
        let mut req = hyper::Request::post(format!("{base}/ng")).header("Content-Type", "application/x-rtpengine-ng");
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(msg))).ok()?;
        let exchange = async {
            let resp = self.http.request(req).await.ok()?;
            let status = resp.status();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange).await.ok()??;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Some(Err(Error::Invalid(format!("relay {base} answered HTTP {}: {text}", status.as_u16()))));
        }
        let Some(b) = body.strip_prefix(format!("{cookie} ").as_bytes()) else {
            return Some(Err(Error::Invalid(format!("relay {base}: answer without our cookie"))));
        };
        Some(decode(b).map(|(v, _)| v).map_err(|e| Error::Invalid(format!("relay answer: {e}"))))
    }

    /// Sends a request to the call's relay (or the next live one), failing over to the
    /// others on timeout. `new_call`: the offer that starts a call, which no store
    /// lookup can place (it saves a round trip to the store per call).
    async fn request(&self, call_id: &str, dict: Value, new_call: bool) -> Result<Value, Error> {
        let n = self.relays.len();
        let known = self.relay_of(call_id, !new_call).await;
        let order = {
            let mut st = self.lock();
            let start = known.unwrap_or(st.next % n);
            st.next = st.next.wrapping_add(1);
            // Live relays first, from `start`; those marked down last, as a last resort.
            let now = Instant::now();
            let (mut order, down): (Vec<usize>, Vec<usize>) =
                (0..n).map(|k| (start + k) % n).partition(|i| st.down_until.get(i).is_none_or(|t| now >= *t));
            order.extend(down);
            order
        };
        for i in order {
            let cookie = format!("hasp{}_{}", std::process::id(), self.cookie.fetch_add(1, Ordering::Relaxed) + 1);
            let mut msg = format!("{cookie} ").into_bytes();
            dict.encode_to(&mut msg);
            let got = match &self.relays[i] {
                RelayUrl::Ng(a) => self.udp_exchange(*a, &cookie, &msg).await,
                RelayUrl::Http(base) => self.http_exchange(base, &cookie, msg).await,
            };
            match got {
                Some(v) => {
                    let v = v?;
                    self.lock().down_until.remove(&i);
                    self.stick(call_id, i).await;
                    return Self::result(v);
                }
                None => {
                    tracing::warn!(relay = %self.relays[i], "relay did not answer; marked down");
                    self.lock().down_until.insert(i, Instant::now() + DOWN_FOR);
                }
            }
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
    fn offer(
        self: Arc<Self>,
        call_id: String,
        from_tag: String,
        to_tag: Option<String>,
        sdp: String,
    ) -> AnchorFuture<String> {
        Box::pin(async move {
            let mut d = vec![
                ("command", Value::str("offer")),
                ("call-id", Value::str(&call_id)),
                ("from-tag", Value::str(&from_tag)),
                ("sdp", Value::str(&sdp)),
            ];
            if let Some(t) = &to_tag {
                d.push(("to-tag", Value::str(t)));
            }
            Self::sdp_of(self.request(&call_id, Value::dict(d), to_tag.is_none()).await?)
        })
    }

    fn answer(self: Arc<Self>, call_id: String, from_tag: String, to_tag: String, sdp: String) -> AnchorFuture<String> {
        Box::pin(async move {
            let d = Value::dict([
                ("command", Value::str("answer")),
                ("call-id", Value::str(&call_id)),
                ("from-tag", Value::str(&from_tag)),
                ("to-tag", Value::str(&to_tag)),
                ("sdp", Value::str(&sdp)),
            ]);
            Self::sdp_of(self.request(&call_id, d, false).await?)
        })
    }

    fn delete(self: Arc<Self>, call_id: String) -> AnchorFuture<()> {
        Box::pin(async move {
            let d = Value::dict([("command", Value::str("delete")), ("call-id", Value::str(&call_id))]);
            let r = self.request(&call_id, d, false).await.map(|_| ());
            self.lock().sticky.remove(&call_id);
            if let Some(s) = self.dialogs.clone() {
                tokio::task::spawn_blocking(move || {
                    let _ = s.delete_dialog(&call_id);
                });
            }
            r
        })
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
