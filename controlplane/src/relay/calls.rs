//! Calls as SIP signalling sees them: a Call-ID, the tags of its two sides, and one
//! relay session per media stream. The rtpengine (NG) and RTPproxy control protocols
//! both drive this registry; the relay sessions underneath are the same ones the REST
//! API shows.
//!
//! Leg 0 of every stream is the side whose tag first offered, leg 1 the other. SDP
//! produced by side X tells its peer where to send: so X's remote is taken from it,
//! and it is rewritten to advertise the *other* leg's port.
//!
//! The registry is bounded and expires: at most [`MAX_CALLS`] calls of at most
//! [`MAX_STREAMS`] streams; an offer, answer or update that fails undoes the streams it
//! created (and the call, if it created it); a sweep every [`SWEEP_INTERVAL`] drops
//! calls whose every stream timed out, and calls that never had a stream once they
//! have been silent for the inactivity timeout.

use crate::error::Error;
use crate::relay::sdp::{Rewrite, RtcpAttr, Sdp, MAX_MEDIA_SECTIONS};
use crate::relay::{parse_id, CreateRequest, Relay, SessionView};
use dataplane::{LatchPolicy, SessionId};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Media streams one call may have (stream indices from RTPproxy `tag;n` included).
pub const MAX_STREAMS: usize = MAX_MEDIA_SECTIONS;
/// Calls the registry holds; a new call beyond is refused as busy.
pub const MAX_CALLS: usize = 65_536;
/// How often calls whose streams are gone are dropped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Options of one offer or answer, from NG keys and flags.
#[derive(Debug, Clone, Default)]
pub struct AnchorOptions {
    /// Latching policy for streams created now.
    pub latch: Option<LatchPolicy>,
    /// Use this address for the sender's media instead of the SDP's (SIP source address).
    pub source_override: Option<IpAddr>,
    /// Address to write into the SDP instead of the relay's.
    pub media_address: Option<IpAddr>,
    /// Replace the `o=` address.
    pub replace_origin: bool,
    /// How to write `a=rtcp`.
    pub rtcp: RtcpAttr,
    /// Strip ICE attributes (default: yes; the relay does not do ICE).
    pub keep_ice: bool,
    /// Rewrite the transport protocol of RTP streams.
    pub transport: Option<String>,
    /// Record (lawful intercept / recording) this call.
    pub record: bool,
    /// Label of the sender's side.
    pub label: Option<String>,
}

#[derive(Debug, Clone)]
struct Stream {
    session: SessionId,
    ports: [u16; 2],
    remotes: [Option<SocketAddr>; 2],
}

#[derive(Debug, Default, Clone)]
struct Versions {
    last_in: Option<u64>,
    bump: u64,
    last_body: String,
}

#[derive(Debug)]
struct Call {
    created: u64,
    last_signal: u64,
    tags: [Option<String>; 2],
    labels: [Option<String>; 2],
    streams: Vec<Option<Stream>>,
    versions: [Versions; 2],
    record: bool,
}

/// Statistics of a call, summed over its streams.
#[derive(Debug, Clone, Default)]
pub struct CallStats {
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Last offer/answer, Unix seconds.
    pub last_signal: u64,
    /// Tags of leg 0 and 1.
    pub tags: [Option<String>; 2],
    /// Labels of leg 0 and 1.
    pub labels: [Option<String>; 2],
    /// Per stream: media index and the relay's view of its session.
    pub streams: Vec<(usize, SessionView)>,
    /// Whether recording was requested.
    pub record: bool,
}

type CallMap = Mutex<HashMap<String, Call>>;

/// The registry of calls.
pub struct Calls {
    relay: Arc<Relay>,
    calls: Arc<CallMap>,
    stream_hook: Mutex<Option<StreamHook>>,
}

/// Called (with no lock held by the caller's thread beyond the registry's own) whenever
/// a media stream's relay session is created; must not call back into `Calls`.
pub type StreamHook = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls").finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Calls {
    /// An empty registry over `relay`, with a thread sweeping it every
    /// [`SWEEP_INTERVAL`] for as long as the registry lives.
    pub fn new(relay: Arc<Relay>) -> Self {
        let calls: Arc<CallMap> = Arc::default();
        let (weak, r) = (Arc::downgrade(&calls), relay.clone());
        let sweeper = std::thread::Builder::new().name("hasp-calls".into()).spawn(move || loop {
            std::thread::sleep(SWEEP_INTERVAL);
            let Some(map) = weak.upgrade() else { break };
            sweep(&mut map.lock().unwrap_or_else(|e| e.into_inner()), &r, now());
        });
        if let Err(e) = sweeper {
            // `list` still reaps; only the unattended expiry is lost.
            tracing::error!(error = %e, "cannot start the call sweeper");
        }
        relay.set_calls(0);
        Self { relay, calls, stream_hook: Mutex::new(None) }
    }

    /// Installs the hook told about new streams (lawful intercept uses it to tap a
    /// target's new media at once).
    pub fn set_stream_hook(&self, hook: StreamHook) {
        *self.stream_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Relay sessions of a call's media streams.
    pub fn sessions_of(&self, call_id: &str) -> Vec<SessionId> {
        self.lock().get(call_id).map(|c| c.streams.iter().flatten().map(|s| s.session).collect()).unwrap_or_default()
    }

    /// The Call-ID a relay session belongs to, if a call created it.
    pub fn call_of(&self, session: SessionId) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, c)| c.streams.iter().flatten().any(|s| s.session == session))
            .map(|(id, _)| id.clone())
    }

    /// The relay underneath.
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Call>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses SDP that would point a stream at a denied remote, before anything is
    /// created for it.
    fn check_remotes(&self, sdp: &Sdp, opts: &AnchorOptions) -> Result<(), Error> {
        for (i, m) in sdp.media.iter().enumerate() {
            if m.port == 0 || !m.proto.starts_with("RTP/") {
                continue;
            }
            if let Some(mut r) = sdp.endpoint(i) {
                if let Some(ip) = opts.source_override {
                    r.set_ip(ip);
                }
                self.relay.check_remote(r)?;
            }
        }
        Ok(())
    }

    fn room_for(&self, calls: &HashMap<String, Call>, call_id: &str) -> Result<(), Error> {
        if calls.len() >= MAX_CALLS && !calls.contains_key(call_id) {
            return Err(Error::Busy(format!("{MAX_CALLS} calls in progress")));
        }
        Ok(())
    }

    /// Handles an offer from `from_tag` (`to_tag` set on re-offers inside a dialog).
    pub fn offer(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: Option<&str>,
        sdp: &str,
        opts: &AnchorOptions,
    ) -> Result<String, Error> {
        let sdp = Sdp::parse(sdp).map_err(|e| Error::Invalid(e.to_string()))?;
        self.check_remotes(&sdp, opts)?;
        let mut calls = self.lock();
        self.room_for(&calls, call_id)?;
        let existed = calls.contains_key(call_id);
        let call = calls.entry(call_id.to_string()).or_insert_with(|| Call {
            created: now(),
            last_signal: now(),
            tags: [Some(from_tag.to_string()), None],
            labels: [None, None],
            streams: Vec::new(),
            versions: Default::default(),
            record: false,
        });
        let sender = match (&call.tags, to_tag) {
            ([Some(a), _], _) if a == from_tag => 0,
            ([_, Some(b)], _) if b == from_tag => 1,
            // A re-INVITE from the callee: its From tag is our leg 1's tag.
            ([Some(a), None], Some(t)) if a == t => {
                call.tags[1] = Some(from_tag.to_string());
                1
            }
            // Another branch or a new offerer before any answer: it takes leg 0.
            _ => {
                call.tags[0] = Some(from_tag.to_string());
                0
            }
        };
        let out = self.anchor(call, sender, &sdp, opts);
        if out.is_err() && !existed {
            // Its streams were undone by `anchor`: nothing of the call is left.
            calls.remove(call_id);
        }
        self.relay.set_calls(calls.len());
        out
    }

    /// Handles an answer: `to_tag` is the answering side.
    pub fn answer(
        &self,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        sdp: &str,
        opts: &AnchorOptions,
    ) -> Result<String, Error> {
        let sdp = Sdp::parse(sdp).map_err(|e| Error::Invalid(e.to_string()))?;
        self.check_remotes(&sdp, opts)?;
        let mut calls = self.lock();
        let call = calls.get_mut(call_id).ok_or_else(|| Error::NotFound("Unknown call-id".into()))?;
        let sender = if call.tags[0].as_deref() == Some(to_tag) {
            0
        } else if call.tags[1].as_deref() == Some(to_tag) || call.tags[1].is_none() {
            call.tags[1] = Some(to_tag.to_string());
            1
        } else if call.tags[0].as_deref() == Some(from_tag) {
            // A different branch answered: it replaces the answering side.
            call.tags[1] = Some(to_tag.to_string());
            1
        } else {
            return Err(Error::NotFound("Unknown tag".into()));
        };
        self.anchor(call, sender, &sdp, opts)
    }

    fn anchor(&self, call: &mut Call, sender: usize, sdp: &Sdp, opts: &AnchorOptions) -> Result<String, Error> {
        call.last_signal = now();
        call.record |= opts.record;
        if opts.label.is_some() {
            call.labels[sender] = opts.label.clone();
        }
        let mut created = Vec::new();
        let ports = match self.anchor_streams(call, sender, sdp, opts, &mut created) {
            Ok(p) => p,
            Err(e) => {
                self.undo(call, &created);
                return Err(e);
            }
        };
        let mut rw = Rewrite {
            address: opts.media_address.unwrap_or(self.relay.config().advertised()),
            ports,
            replace_origin: opts.replace_origin,
            origin_version: None,
            rtcp: opts.rtcp,
            remove_ice: !opts.keep_ice,
            transport: opts.transport.clone(),
        };
        // o= version: the sender's, bumped whenever our rewrite of the same input
        // version comes out different (new ports after a re-created stream, say).
        let v = &mut call.versions[sender];
        let body = sdp.rewrite(&rw);
        let in_version = sdp.origin_version();
        if v.last_in == in_version && in_version.is_some() && v.last_body != body && !v.last_body.is_empty() {
            v.bump += 1;
        } else if v.last_in != in_version {
            v.bump = 0;
        }
        v.last_in = in_version;
        v.last_body = body.clone();
        if v.bump == 0 {
            return Ok(body);
        }
        rw.origin_version = in_version.map(|x| x + v.bump);
        Ok(sdp.rewrite(&rw))
    }

    /// Creates or updates the relay session of every RTP stream of `sdp`; returns the
    /// relay port per media section, and in `created` the streams it created.
    fn anchor_streams(
        &self,
        call: &mut Call,
        sender: usize,
        sdp: &Sdp,
        opts: &AnchorOptions,
        created: &mut Vec<usize>,
    ) -> Result<Vec<Option<u16>>, Error> {
        let far = 1 - sender;
        let mut ports = Vec::with_capacity(sdp.media.len());
        for (i, m) in sdp.media.iter().enumerate() {
            if m.port == 0 || !m.proto.starts_with("RTP/") {
                // Rejected streams stay rejected; non-RTP media (T.38 UDPTL, …) is not
                // anchored: the relay forwards RTP/RTCP only.
                ports.push(None);
                continue;
            }
            let (stream, new) = self.ensure_stream(call, i, opts.latch)?;
            if new {
                created.push(i);
            }
            let mut remote = sdp.endpoint(i);
            if let (Some(r), Some(ip)) = (&mut remote, opts.source_override) {
                r.set_ip(ip);
            }
            if stream.remotes[sender] != remote {
                self.relay.set_remotes(stream.session, &[(sender, remote)])?;
                stream.remotes[sender] = remote;
            }
            ports.push(Some(stream.ports[far]));
        }
        Ok(ports)
    }

    /// Deletes the streams a failed request created.
    fn undo(&self, call: &mut Call, created: &[usize]) {
        for &i in created {
            if let Some(s) = call.streams.get_mut(i).and_then(Option::take) {
                let _ = self.relay.remove(s.session);
            }
        }
    }

    /// The relay session of media stream `i`, created if missing or gone (timed out);
    /// true when created now.
    fn ensure_stream<'c>(
        &self,
        call: &'c mut Call,
        i: usize,
        latch: Option<LatchPolicy>,
    ) -> Result<(&'c mut Stream, bool), Error> {
        if i >= MAX_STREAMS {
            return Err(Error::Invalid(format!("media stream {} out of range (at most {MAX_STREAMS})", i + 1)));
        }
        if call.streams.len() <= i {
            call.streams.resize(i + 1, None);
        }
        if call.streams[i].as_ref().is_some_and(|s| !self.relay.exists(s.session)) {
            call.streams[i] = None;
        }
        match &mut call.streams[i] {
            Some(s) => Ok((s, false)),
            slot @ None => {
                let c = self.relay.create(CreateRequest { latch, ..CreateRequest::default() })?;
                let session = parse_id(&c.id).ok_or_else(|| Error::Invalid("bad session id".into()))?;
                if let Some(h) = self.stream_hook.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    h();
                }
                let s = slot.insert(Stream {
                    session,
                    ports: [c.legs[0].rtp_port, c.legs[1].rtp_port],
                    remotes: [None, None],
                });
                Ok((s, true))
            }
        }
    }

    /// RTPproxy's `U` (`create`) and `L` commands: the side `sender_tag` says where it
    /// receives media stream `index`; answers the relay port its peer must send to.
    #[allow(clippy::too_many_arguments)]
    pub fn update_stream(
        &self,
        call_id: &str,
        sender_tag: &str,
        other_tag: Option<&str>,
        index: usize,
        remote: Option<SocketAddr>,
        create: bool,
        latch: Option<LatchPolicy>,
    ) -> Result<u16, Error> {
        if index >= MAX_STREAMS {
            return Err(Error::Invalid(format!("media stream {} out of range (at most {MAX_STREAMS})", index + 1)));
        }
        if let Some(r) = remote {
            self.relay.check_remote(r)?;
        }
        let mut calls = self.lock();
        let existed = calls.contains_key(call_id);
        if !create && !existed {
            return Err(Error::NotFound("Unknown call-id".into()));
        }
        self.room_for(&calls, call_id)?;
        let call = calls.entry(call_id.to_string()).or_insert_with(|| Call {
            created: now(),
            last_signal: now(),
            tags: [Some(sender_tag.to_string()), None],
            labels: [None, None],
            streams: Vec::new(),
            versions: Default::default(),
            record: false,
        });
        call.last_signal = now();
        let sender = if call.tags[0].as_deref() == Some(sender_tag) {
            0
        } else if call.tags[1].as_deref() == Some(sender_tag) {
            1
        } else if call.tags[1].is_none() && (!create || other_tag.is_some_and(|t| call.tags[0].as_deref() == Some(t))) {
            call.tags[1] = Some(sender_tag.to_string());
            1
        } else {
            call.tags[0] = Some(sender_tag.to_string());
            0
        };
        let out = match self.ensure_stream(call, index, latch) {
            Ok((stream, new)) => {
                let set = if stream.remotes[sender] != remote {
                    self.relay.set_remotes(stream.session, &[(sender, remote)])
                } else {
                    Ok(())
                };
                match set {
                    Ok(()) => {
                        stream.remotes[sender] = remote;
                        Ok(stream.ports[1 - sender])
                    }
                    Err(e) => {
                        if new {
                            self.undo(call, &[index]);
                        }
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        if out.is_err() && !existed {
            calls.remove(call_id);
        }
        self.relay.set_calls(calls.len());
        out
    }

    /// Deletes a call (all its streams); returns its final statistics.
    pub fn delete(&self, call_id: &str) -> Result<CallStats, Error> {
        let stats = self.stats(call_id)?;
        let call = {
            let mut calls = self.lock();
            let c = calls.remove(call_id);
            self.relay.set_calls(calls.len());
            c
        };
        if let Some(call) = call {
            for s in call.streams.into_iter().flatten() {
                // Already gone (timed out) is fine.
                let _ = self.relay.delete(s.session);
            }
        }
        Ok(stats)
    }

    /// A call's statistics.
    pub fn stats(&self, call_id: &str) -> Result<CallStats, Error> {
        let (mut stats, sessions) = {
            let calls = self.lock();
            let c = calls.get(call_id).ok_or_else(|| Error::NotFound("Unknown call-id".into()))?;
            let sessions: Vec<(usize, SessionId)> =
                c.streams.iter().enumerate().filter_map(|(i, s)| s.as_ref().map(|s| (i, s.session))).collect();
            let stats = CallStats {
                created: c.created,
                last_signal: c.last_signal,
                tags: c.tags.clone(),
                labels: c.labels.clone(),
                streams: Vec::new(),
                record: c.record,
            };
            (stats, sessions)
        };
        for (i, id) in sessions {
            if let Ok(v) = self.relay.get(id) {
                stats.streams.push((i, v));
            }
        }
        Ok(stats)
    }

    /// Call-IDs of live calls (calls whose every stream timed out are dropped here).
    pub fn list(&self) -> Vec<String> {
        let mut calls = self.lock();
        sweep(&mut calls, &self.relay, now());
        let mut ids: Vec<String> = calls.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Number of live calls.
    pub fn len(&self) -> usize {
        self.list().len()
    }

    /// True when there is no call.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops calls whose every stream's session is gone (timed out), and calls that never
/// had a stream (all media rejected) once silent for the inactivity timeout.
fn sweep(calls: &mut HashMap<String, Call>, relay: &Relay, now: u64) {
    let idle = relay.config().inactivity_timeout_secs;
    calls.retain(|_, c| {
        let mut had = false;
        for s in c.streams.iter().flatten() {
            had = true;
            if relay.exists(s.session) {
                return true;
            }
        }
        !had && now.saturating_sub(c.last_signal) < idle
    });
    relay.set_calls(calls.len());
}
