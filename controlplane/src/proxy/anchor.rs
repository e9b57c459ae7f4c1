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

/// Remote relays spoken to over NG (UDP or HTTP): those cluster membership lists (hasp
/// relays, picked least loaded first) and those configured (`--relay`: relays that are
/// not hasp, such as rtpengine, which never join membership).
#[derive(Debug)]
pub struct NgRelays {
    relays: Vec<RelayUrl>,
    /// Live relays from membership, if the proxy is in a cluster.
    members: Option<tokio::sync::watch::Receiver<crate::cluster::View>>,
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
    /// Relays (by URL) that did not answer, skipped until then.
    down_until: HashMap<String, Instant>,
    /// Call-ID → its relay, for the calls this proxy anchored or looked up.
    sticky: HashMap<String, RelayUrl>,
    next: usize,
    /// New calls placed on each member relay since the membership revision in
    /// `placed_rev`: added to its published load, so the calls of one second do not
    /// all land on the relay that was least loaded at its last renewal.
    placed: HashMap<String, u64>,
    placed_rev: u64,
}

/// How many relays one request tries before giving up (each waits the timeout).
pub const MAX_TRIES: usize = 3;
/// Calls remembered per proxy; beyond it the map starts over (the shared store, when
/// there is one, still knows every call's relay).
const MAX_STICKY: usize = 100_000;

/// The URL a relay member is reached at: its NG listener (UDP) if it has one, else NG
/// over its REST API.
fn member_url(m: &crate::cluster::Member) -> Option<RelayUrl> {
    if let Some(a) = m.ng.as_deref().and_then(|a| a.parse().ok()) {
        return Some(RelayUrl::Ng(a));
    }
    m.api.as_deref().map(|a| RelayUrl::Http(format!("http://{a}")))
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
        // Dual-stack, so relays of either family (membership may bring both) share it.
        let std_sock = match std::net::UdpSocket::bind("[::]:0") {
            Ok(s) => s,
            Err(_) => std::net::UdpSocket::bind("0.0.0.0:0")?,
        };
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
            members: None,
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

    /// Also anchors calls on the relays membership lists (`view`), before the
    /// configured ones, least loaded first.
    pub fn with_members(mut self, view: tokio::sync::watch::Receiver<crate::cluster::View>) -> Self {
        self.members = Some(view);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NgState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every relay a new call may go to, in preference order: membership's relays
    /// by load (sessions, then CPU, counting the calls placed here since the last
    /// update), then the configured ones in turn.
    fn candidates(&self, st: &mut NgState) -> Vec<RelayUrl> {
        let mut out = Vec::new();
        if let Some(view) = &self.members {
            let v = view.borrow();
            if v.revision != st.placed_rev {
                st.placed.clear();
                st.placed_rev = v.revision;
            }
            let mut members: Vec<(u64, u64, RelayUrl)> = v
                .of(crate::cluster::Role::Relay)
                .filter_map(|m| {
                    let url = member_url(m)?;
                    let placed = st.placed.get(&url.to_string()).copied().unwrap_or(0);
                    Some((m.load.sessions + 2 * placed, (m.load.cpu * 1000.0) as u64, url))
                })
                .collect();
            members.sort_by_key(|m| (m.0, m.1));
            out.extend(members.into_iter().map(|(_, _, u)| u));
        }
        let n = self.relays.len();
        if n > 0 {
            let start = st.next % n;
            st.next = st.next.wrapping_add(1);
            out.extend((0..n).map(|k| self.relays[(start + k) % n].clone()));
        }
        out
    }

    /// The relay a call was anchored on, from this proxy's memory or, for a call that
    /// may have begun at another proxy (`shared`), the shared store (a blocking store
    /// call, so on the blocking pool).
    async fn relay_of(&self, call_id: &str, shared: bool) -> Option<RelayUrl> {
        if let Some(r) = self.lock().sticky.get(call_id) {
            return Some(r.clone());
        }
        let store = self.dialogs.clone().filter(|_| shared)?;
        let cid = call_id.to_string();
        let node = tokio::task::spawn_blocking(move || store.dialog(&cid)).await.ok()?.ok()??;
        RelayUrl::parse(&node).ok()
    }

    /// Remembers that `call_id` lives on relay `i` (in the shared store when it is new,
    /// before the call goes on: another proxy may get its next request at once).
    async fn stick(&self, call_id: &str, relay: &RelayUrl) {
        let changed = {
            let mut st = self.lock();
            if st.sticky.len() >= MAX_STICKY && !st.sticky.contains_key(call_id) {
                st.sticky.clear();
            }
            st.sticky.insert(call_id.to_string(), relay.clone()).as_ref() != Some(relay)
        };
        if changed {
            if let Some(d) = self.dialogs.clone() {
                let (cid, node) = (call_id.to_string(), relay.to_string());
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
        let known = self.relay_of(call_id, !new_call).await;
        let order = {
            let mut st = self.lock();
            let mut all = self.candidates(&mut st);
            // The call's own relay first (even if membership no longer lists it: a
            // hung relay still answers for its calls once it is back).
            if let Some(k) = &known {
                all.retain(|r| r != k);
                all.insert(0, k.clone());
            }
            // Live relays first; those marked down last, as a last resort.
            let now = Instant::now();
            let (mut order, down): (Vec<RelayUrl>, Vec<RelayUrl>) =
                all.into_iter().partition(|r| st.down_until.get(&r.to_string()).is_none_or(|t| now >= *t));
            order.extend(down);
            order.truncate(MAX_TRIES);
            order
        };
        if order.is_empty() {
            return Err(Error::Busy("no relay: membership lists none and none is configured".into()));
        }
        for relay in order {
            let cookie = format!("hasp{}_{}", std::process::id(), self.cookie.fetch_add(1, Ordering::Relaxed) + 1);
            let mut msg = format!("{cookie} ").into_bytes();
            dict.encode_to(&mut msg);
            let got = match &relay {
                RelayUrl::Ng(a) => self.udp_exchange(*a, &cookie, &msg).await,
                RelayUrl::Http(base) => self.http_exchange(base, &cookie, msg).await,
            };
            match got {
                Some(v) => {
                    let v = v?;
                    {
                        let mut st = self.lock();
                        st.down_until.remove(&relay.to_string());
                        if new_call {
                            *st.placed.entry(relay.to_string()).or_default() += 1;
                        }
                    }
                    self.stick(call_id, &relay).await;
                    return Self::result(v);
                }
                None => {
                    tracing::warn!(relay = %relay, "relay did not answer; marked down");
                    let mut st = self.lock();
                    // Bounded by the relays that exist: membership's and the configured.
                    if st.down_until.len() > 4096 {
                        let now = Instant::now();
                        st.down_until.retain(|_, t| *t > now);
                    }
                    st.down_until.insert(relay.to_string(), Instant::now() + DOWN_FOR);
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
