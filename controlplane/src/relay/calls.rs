//! Calls as SIP signalling sees them: a Call-ID, the tags of its two sides, and one
//! relay session per media stream. The rtpengine (NG) and RTPproxy control protocols
//! both drive this registry; the relay sessions underneath are the same ones the REST
//! API shows.
//!
//! Leg 0 of every stream is the side whose tag first offered, leg 1 the other. SDP
//! produced by side X tells its peer where to send: so X's remote is taken from it,
//! and it is rewritten to advertise the *other* leg's port.

use crate::error::Error;
use crate::relay::sdp::{Rewrite, RtcpAttr, Sdp};
use crate::relay::{parse_id, CreateRequest, Relay, SessionView};
use dataplane::{LatchPolicy, SessionId};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

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

/// The registry of calls.
pub struct Calls {
    relay: Arc<Relay>,
    calls: Mutex<HashMap<String, Call>>,
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
    /// An empty registry over `relay`.
    pub fn new(relay: Arc<Relay>) -> Self {
        Self { relay, calls: Mutex::new(HashMap::new()), stream_hook: Mutex::new(None) }
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
        let mut calls = self.lock();
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
        self.anchor(call, sender, &sdp, opts)
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
        let far = 1 - sender;
        let mut ports = Vec::with_capacity(sdp.media.len());
        for (i, m) in sdp.media.iter().enumerate() {
            if m.port == 0 || !m.proto.starts_with("RTP/") {
                // Rejected streams stay rejected; non-RTP media (T.38 UDPTL, …) is not
                // anchored: the relay forwards RTP/RTCP only.
                ports.push(None);
                continue;
            }
            let stream = self.ensure_stream(call, i, opts.latch)?;
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

    /// The relay session of media stream `i`, created if missing or gone (timed out).
    fn ensure_stream<'c>(
        &self,
        call: &'c mut Call,
        i: usize,
        latch: Option<LatchPolicy>,
    ) -> Result<&'c mut Stream, Error> {
        if call.streams.len() <= i {
            call.streams.resize(i + 1, None);
        }
        if call.streams[i].as_ref().is_some_and(|s| !self.relay.exists(s.session)) {
            call.streams[i] = None;
        }
        match &mut call.streams[i] {
            Some(s) => Ok(s),
            slot @ None => {
                let c = self.relay.create(CreateRequest { latch, ..CreateRequest::default() })?;
                let session = parse_id(&c.id).ok_or_else(|| Error::Invalid("bad session id".into()))?;
                if let Some(h) = self.stream_hook.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    h();
                }
                Ok(slot.insert(Stream {
                    session,
                    ports: [c.legs[0].rtp_port, c.legs[1].rtp_port],
                    remotes: [None, None],
                }))
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
        let mut calls = self.lock();
        if !create && !calls.contains_key(call_id) {
            return Err(Error::NotFound("Unknown call-id".into()));
        }
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
        let stream = self.ensure_stream(call, index, latch)?;
        if stream.remotes[sender] != remote {
            self.relay.set_remotes(stream.session, &[(sender, remote)])?;
            stream.remotes[sender] = remote;
        }
        Ok(stream.ports[1 - sender])
    }

    /// Deletes a call (all its streams); returns its final statistics.
    pub fn delete(&self, call_id: &str) -> Result<CallStats, Error> {
        let stats = self.stats(call_id)?;
        let call = self.lock().remove(call_id);
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
        calls.retain(|_, c| c.streams.is_empty() || c.streams.iter().flatten().any(|s| self.relay.exists(s.session)));
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
