//! The conference focus: an INVITE to `conf-<room>@<domain>` joins a mixer room on a
//! media node and is answered with the mixer's SDP; BYE leaves. Rooms are named by the
//! SIP URI and created on first join, on the least loaded relay cluster membership
//! lists (then the static nodes, in order) that answers; a node that fails is skipped
//! for a while and the next is tried. A room stays on its node while that node is
//! listed; once it is not (or fails), the next join re-creates the room elsewhere,
//! and those still in the old one leave it there. The last one out deletes a room.
//! The SIP side (transactions, dialogs) is the proxy's; this module keeps only room
//! names, Call-ID → participant, and the SDP.

use crate::error::Error;
use crate::relay::sdp::Sdp;
use crate::relay::{parse_id, ParticipantCreated, Relay};
use dataplane::mixer::Codec;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The user part prefix of conference URIs.
pub const ROOM_PREFIX: &str = "conf-";

/// How long a media node that failed a request is skipped.
const DOWN_FOR: Duration = Duration::from_secs(10);

/// Focus dialogs kept at most: a join past this is refused (503), so joins that never
/// leave cannot grow the table without bound.
pub const MAX_DIALOGS: usize = 10_000;

/// A focus dialog with no request for this long (no BYE, no re-INVITE or UPDATE: a
/// participant that vanished) is ended: it leaves its room. Participants that stay
/// longer refresh their session (RFC 4028 session timers) and are kept.
pub const DIALOG_IDLE: Duration = Duration::from_secs(12 * 3600);

/// How often joins look for idle dialogs.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A media node's mixer, as the focus uses it.
pub trait Mixer: Send + Sync + std::fmt::Debug {
    /// Creates a room; returns its id on that node.
    fn create_room(&self) -> Result<String, Error>;
    /// Deletes a room.
    fn delete_room(&self, room: &str) -> Result<(), Error>;
    /// Adds a participant that sends and receives `codec` with payload type `pt` at
    /// `remote`.
    fn join(&self, room: &str, codec: Codec, pt: u8, remote: Option<SocketAddr>) -> Result<ParticipantCreated, Error>;
    /// Removes a participant.
    fn leave(&self, room: &str, participant: &str) -> Result<(), Error>;
}

impl Mixer for Relay {
    fn create_room(&self) -> Result<String, Error> {
        self.conf_create(dataplane::mixer::RoomConfig::default())
    }

    fn delete_room(&self, room: &str) -> Result<(), Error> {
        self.conf_delete(parse_id(room).ok_or_else(|| Error::NotFound(room.into()))?)
    }

    fn join(&self, room: &str, codec: Codec, pt: u8, remote: Option<SocketAddr>) -> Result<ParticipantCreated, Error> {
        self.participant_add(parse_id(room).ok_or_else(|| Error::NotFound(room.into()))?, codec, Some(pt), remote)
    }

    fn leave(&self, room: &str, participant: &str) -> Result<(), Error> {
        let id = u32::from_str_radix(participant, 16).map_err(|_| Error::NotFound(participant.into()))?;
        self.participant_delete(parse_id(room).ok_or_else(|| Error::NotFound(room.into()))?, id)
    }
}

/// Why a join failed, as the proxy answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// The offer has no audio stream in a codec the mixer speaks (488).
    NotAcceptable(String),
    /// No media node could take the participant (503).
    Unavailable(String),
    /// A re-INVITE for a dialog the focus does not know (481).
    NoDialog,
}

/// A media node: its name (a relay member's REST base `http://API`, or `static-N` for
/// the N-th node given to [`Focus::new`]) and its mixer. Rooms and down marks refer to
/// nodes by name, so a node leaving membership shifts no other node.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    mixer: Arc<dyn Mixer>,
}

/// Where a room's new participants join: one mixer room on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    node: String,
    id: String,
}

/// A mixer room with participants. A room whose node failed or left membership lives
/// on elsewhere for new joiners, while those already in it stay where they are until
/// they leave; so each mixer room keeps its own mixer handle (a node gone from
/// membership is still told) and its own count (the last one out deletes it).
#[derive(Debug)]
struct Instance {
    mixer: Arc<dyn Mixer>,
    members: usize,
}

#[derive(Debug)]
struct Participant {
    room: String,
    /// The mixer room it is in: node name and room id there.
    node: String,
    room_id: String,
    participant: String,
    answer: String,
    /// The dialog's last request (join or refresh).
    last: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Room name → the mixer room new participants join.
    rooms: HashMap<String, Placement>,
    /// (node, room id) → participants there. Every entry has at least one participant
    /// (bounded by [`MAX_DIALOGS`]); every `rooms` value is a key here.
    instances: HashMap<(String, String), Instance>,
    /// Call-ID → its participant.
    members: HashMap<String, Participant>,
    /// Node name → skipped until then. Expired marks are dropped at each join.
    down_until: HashMap<String, Instant>,
    version: u64,
    swept: Option<Instant>,
}

/// Relay members considered as media nodes at most (the least loaded ones).
const MAX_MEMBER_NODES: usize = 256;

/// How long the mixer of a member gone from membership stays cached: one back within
/// it (a lease that lapsed for a moment) keeps its mixer and its pooled connections.
/// Rooms hold their own handle, so dropping it never loses a room's node.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Mixers cached at most (listed members plus those gone less than [`FORGET_AFTER`]);
/// beyond it the longest gone are dropped first.
const MAX_CACHED: usize = 4 * MAX_MEMBER_NODES;

/// Builds the mixer of a relay member (see [`Focus::with_members`]).
type MakeMixer = dyn Fn(&crate::cluster::Member) -> Option<Arc<dyn Mixer>> + Send + Sync;

/// The relays cluster membership lists, as media nodes.
struct Members {
    view: tokio::sync::watch::Receiver<crate::cluster::View>,
    make: Box<MakeMixer>,
    cache: Mutex<MemberCache>,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Members").field("view", &self.view).field("cache", &self.cache).finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Cached {
    /// What `make` gave for this name (`None`: not a node; not asked again).
    mixer: Option<Arc<dyn Mixer>>,
    /// When membership last listed it.
    seen: Instant,
}

#[derive(Debug, Default)]
struct MemberCache {
    /// Node name → its mixer, built once.
    mixers: HashMap<String, Cached>,
    /// Participants placed on each node since the membership revision `placed_rev`:
    /// added to its published load, so the rooms opened within one load update do
    /// not all land on the node that was least loaded at its last renewal.
    placed: HashMap<String, u64>,
    placed_rev: u64,
}

impl Members {
    fn cache(&self) -> std::sync::MutexGuard<'_, MemberCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The relay members with an API, least loaded first (sessions plus participants
    /// placed since, then CPU; ties in id order), as nodes: the [`MAX_MEMBER_NODES`]
    /// least loaded, plus `keep` (a room's node) if listed. Refreshes the cache at `now`.
    fn nodes(&self, now: Instant, keep: Option<&str>) -> Vec<Node> {
        let mut c = self.cache();
        let listed: Vec<(String, crate::cluster::Member)> = {
            let v = self.view.borrow();
            if v.revision != c.placed_rev {
                c.placed.clear();
                c.placed_rev = v.revision;
            }
            let mut names = std::collections::HashSet::new();
            let mut l: Vec<(u64, u64, String, &crate::cluster::Member)> = v
                .of(crate::cluster::Role::Relay)
                .filter_map(|m| {
                    let name = format!("http://{}", m.api.as_deref()?);
                    let placed = c.placed.get(&name).copied().unwrap_or(0);
                    // NaN and negative CPU count as idle (`as` saturates).
                    Some((m.load.sessions.saturating_add(placed), (m.load.cpu * 1000.0) as u64, name, m))
                })
                .collect();
            // Stable: equal loads keep the view's id order.
            l.sort_by_key(|(sessions, cpu, _, _)| (*sessions, *cpu));
            l.retain(|(_, _, name, _)| names.insert(name.clone()));
            l.into_iter()
                .enumerate()
                .filter(|(i, (_, _, name, _))| *i < MAX_MEMBER_NODES || keep == Some(name.as_str()))
                .map(|(_, (_, _, name, m))| (name, m.clone()))
                .collect()
        };
        let mut out = Vec::with_capacity(listed.len());
        for (name, m) in listed {
            let e = c.mixers.entry(name.clone()).or_insert_with(|| Cached { mixer: (self.make)(&m), seen: now });
            e.seen = now;
            if let Some(mixer) = &e.mixer {
                out.push(Node { name, mixer: mixer.clone() });
            }
        }
        c.mixers.retain(|_, e| now.saturating_duration_since(e.seen) < FORGET_AFTER);
        if c.mixers.len() > MAX_CACHED {
            // Listed ones were seen now: at most MAX_MEMBER_NODES + 1 of them, all kept.
            let mut by_age: Vec<(Instant, String)> = c.mixers.iter().map(|(n, e)| (e.seen, n.clone())).collect();
            by_age.sort();
            let excess = c.mixers.len() - MAX_CACHED;
            for (_, n) in by_age.into_iter().take(excess) {
                c.mixers.remove(&n);
            }
        }
        out
    }

    /// Counts a participant placed on node `name` until the next membership update.
    fn placed(&self, name: &str) {
        let mut c = self.cache();
        if c.mixers.contains_key(name) {
            *c.placed.entry(name.to_string()).or_default() += 1;
        }
    }
}

/// The focus over media nodes: static ones (preference order) and, with
/// [`Focus::with_members`], the relays cluster membership lists (least loaded first).
#[derive(Debug)]
pub struct Focus {
    statics: Vec<Node>,
    members: Option<Members>,
    state: Mutex<State>,
    /// Joins and leaves run one at a time: with several SIP threads, two first joins of
    /// one room would otherwise each create it (two rooms, the participants split), and
    /// a leave could delete a room a join just picked. Held across the media node's
    /// round trips, so it serialises conference signalling on one proxy (it runs on the
    /// blocking pool, never on a SIP thread); per-room locks would lift that if a proxy
    /// ever hosts many conference joins per second.
    changing: Mutex<()>,
}

/// The room name of a request URI's user part, if it is a conference URI.
pub fn room_of_user(user: &str) -> Option<&str> {
    user.strip_prefix(ROOM_PREFIX).filter(|r| !r.is_empty() && r.len() <= 64)
}

/// What the offer's first audio stream asks for: where to send, and the codec picked
/// (the first offered that the mixer speaks, as RFC 3264 lets the answerer choose).
fn pick(offer: &str) -> Result<(Option<SocketAddr>, Codec, u8), JoinError> {
    let sdp = Sdp::parse(offer).map_err(|e| JoinError::NotAcceptable(format!("bad SDP: {}", e.0)))?;
    let (i, m) = sdp
        .media
        .iter()
        .enumerate()
        .find(|(_, m)| m.kind == "audio" && m.port != 0)
        .ok_or_else(|| JoinError::NotAcceptable("no audio stream".into()))?;
    let rtpmap = |pt: &str| {
        m.lines.iter().find_map(|l| {
            let rest = l.strip_prefix("a=rtpmap:")?;
            let (p, enc) = rest.split_once(' ')?;
            (p == pt).then(|| enc.to_ascii_lowercase())
        })
    };
    for f in &m.formats {
        let Ok(pt) = f.parse::<u8>() else { continue };
        let codec = match (pt, rtpmap(f).as_deref()) {
            (_, Some(e)) if e.starts_with("pcmu/8000") => Codec::Pcmu,
            (_, Some(e)) if e.starts_with("pcma/8000") => Codec::Pcma,
            (_, Some(e)) if e.starts_with("opus/48000") => Codec::Opus,
            (0, None) => Codec::Pcmu,
            (8, None) => Codec::Pcma,
            _ => continue,
        };
        return Ok((sdp.endpoint(i), codec, pt));
    }
    Err(JoinError::NotAcceptable("no common codec (the mixer speaks PCMU, PCMA, opus)".into()))
}

fn answer_sdp(p: &ParticipantCreated, codec: Codec, pt: u8, version: u64) -> String {
    let ip = p.address;
    let fam = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let (name, fmtp) = match codec {
        Codec::Pcmu => ("PCMU/8000", String::new()),
        Codec::Pcma => ("PCMA/8000", String::new()),
        Codec::Opus => ("opus/48000/2", format!("a=fmtp:{pt} useinbandfec=1\r\n")),
    };
    format!(
        "v=0\r\no=hasp {version} {version} IN {fam} {ip}\r\ns=hasp conference\r\nc=IN {fam} {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP {pt}\r\na=rtpmap:{pt} {name}\r\n{fmtp}a=rtcp:{rtcp}\r\na=sendrecv\r\n",
        port = p.rtp_port,
        rtcp = p.rtp_port + 1,
    )
}

impl Focus {
    /// A focus over static media nodes, tried in order (named `static-0`, `static-1`, …).
    pub fn new(nodes: Vec<Arc<dyn Mixer>>) -> Self {
        let statics =
            nodes.into_iter().enumerate().map(|(i, mixer)| Node { name: format!("static-{i}"), mixer }).collect();
        Self { statics, members: None, state: Mutex::new(State::default()), changing: Mutex::new(()) }
    }

    /// Also mixes on the relays membership lists (`view`): each relay member with an
    /// API is a node named `http://API`, its mixer built by `make` once per name (and
    /// cached; `None` leaves that member out). New rooms go to the least loaded live
    /// member (published sessions, then CPU), before the static nodes; a room stays on
    /// its node while membership lists it. `make` runs within a join and must be quick
    /// (build a client, no round trip).
    pub fn with_members(
        mut self,
        view: tokio::sync::watch::Receiver<crate::cluster::View>,
        make: impl Fn(&crate::cluster::Member) -> Option<Arc<dyn Mixer>> + Send + Sync + 'static,
    ) -> Self {
        self.members = Some(Members { view, make: Box::new(make), cache: Mutex::default() });
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every node a room may be on now (`keep`, the room's node, included if listed),
    /// in preference order for a new room: membership's relays by load, then the
    /// static nodes.
    fn nodes(&self, now: Instant, keep: Option<&str>) -> Vec<Node> {
        let mut out = self.members.as_ref().map(|m| m.nodes(now, keep)).unwrap_or_default();
        out.extend(self.statics.iter().cloned());
        out
    }

    /// Joins the dialog `call_id` to `room` with the SDP `offer`; returns the answer.
    /// A Call-ID already joined gets its answer again (a re-INVITE or retransmission).
    pub fn join(&self, room: &str, call_id: &str, offer: &str) -> Result<String, JoinError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(m) = self.lock().members.get_mut(call_id) {
            // A re-INVITE (a session refresh) or a retransmission: still there.
            m.last = now;
            return Ok(m.answer.clone());
        }
        let sweep = self.lock().swept.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY);
        if sweep {
            self.lock().swept = Some(now);
            self.expire_locked(now);
        }
        if self.lock().members.len() >= MAX_DIALOGS {
            return Err(JoinError::Unavailable(format!("the focus holds {MAX_DIALOGS} dialogs already")));
        }
        let (remote, codec, pt) = pick(offer)?;
        let mut last_err = String::from("no media node configured");
        let placed = self.lock().rooms.get(room).map(|p| p.node.clone());
        let nodes = self.nodes(now, placed.as_deref());
        // The room's node first if it is still listed (a room whose node left is
        // re-created), then the others in order, skipping those down (unless all are,
        // then everything is tried).
        let (existing, order) = {
            let mut st = self.lock();
            st.down_until.retain(|_, t| *t > now);
            let existing = st.rooms.get(room).filter(|p| nodes.iter().any(|n| n.name == p.node)).cloned();
            // Live nodes first, then those marked down as a last resort.
            let (mut order, down): (Vec<Node>, Vec<Node>) =
                nodes.into_iter().partition(|n| !st.down_until.contains_key(&n.name));
            order.extend(down);
            if let Some(p) = &existing {
                if let Some(i) = order.iter().position(|n| n.name == p.node) {
                    let n = order.remove(i);
                    order.insert(0, n);
                }
            }
            (existing, order)
        };
        for node in order {
            let in_existing = existing.as_ref().is_some_and(|p| p.node == node.name);
            let room_id = match &existing {
                Some(p) if in_existing => p.id.clone(),
                _ => match node.mixer.create_room() {
                    Ok(id) => id,
                    Err(e) => {
                        last_err = e.to_string();
                        self.lock().down_until.insert(node.name.clone(), now + DOWN_FOR);
                        continue;
                    }
                },
            };
            match node.mixer.join(&room_id, codec, pt, remote) {
                Ok(p) => {
                    let mut st = self.lock();
                    st.version += 1;
                    let answer = answer_sdp(&p, codec, pt, st.version);
                    let key = (node.name.clone(), room_id.clone());
                    st.instances
                        .entry(key)
                        .or_insert_with(|| Instance { mixer: node.mixer.clone(), members: 0 })
                        .members += 1;
                    // A room whose node failed or left lives on here from now on.
                    st.rooms.insert(room.to_string(), Placement { node: node.name.clone(), id: room_id.clone() });
                    st.members.insert(
                        call_id.to_string(),
                        Participant {
                            room: room.to_string(),
                            node: node.name.clone(),
                            room_id,
                            participant: p.id,
                            answer: answer.clone(),
                            last: now,
                        },
                    );
                    drop(st);
                    if let Some(m) = &self.members {
                        m.placed(&node.name);
                    }
                    return Ok(answer);
                }
                Err(Error::RoomFull(why)) => {
                    // Full is full: the room must not be split over another node.
                    if !in_existing {
                        let _ = node.mixer.delete_room(&room_id);
                    }
                    return Err(JoinError::Unavailable(why));
                }
                Err(e) => {
                    last_err = e.to_string();
                    if matches!(e, Error::PortsExhausted(_) | Error::Busy(_) | Error::Io(_) | Error::Store(_)) {
                        self.lock().down_until.insert(node.name.clone(), now + DOWN_FOR);
                    }
                    if !in_existing {
                        let _ = node.mixer.delete_room(&room_id);
                    }
                }
            }
        }
        Err(JoinError::Unavailable(last_err))
    }

    /// The dialog `call_id` leaves its room (BYE); the last one out deletes the room.
    /// Returns whether it was a member.
    pub fn leave(&self, call_id: &str) -> bool {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.leave_locked(call_id)
    }

    /// Ends the dialogs idle for [`DIALOG_IDLE`] at `now` (they leave their rooms);
    /// returns how many. Joins call it every minute; exposed for tests and tools.
    pub fn expire_idle(&self, now: Instant) -> usize {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        self.expire_locked(now)
    }

    fn expire_locked(&self, now: Instant) -> usize {
        let idle: Vec<String> = self
            .lock()
            .members
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last) >= DIALOG_IDLE)
            .map(|(c, _)| c.clone())
            .collect();
        for c in &idle {
            tracing::info!(call_id = %c, "conference dialog idle for 12 h without BYE: it leaves its room");
            self.leave_locked(c);
        }
        idle.len()
    }

    /// Tells the participant's own node, listed or not (a node gone from membership
    /// may still be up; if not, the error is ignored: its rooms went with it).
    fn leave_locked(&self, call_id: &str) -> bool {
        let (mixer, m, empty) = {
            let mut st = self.lock();
            let Some(m) = st.members.remove(call_id) else { return false };
            let key = (m.node.clone(), m.room_id.clone());
            let Some(inst) = st.instances.get_mut(&key) else { return true };
            inst.members = inst.members.saturating_sub(1);
            let (mixer, empty) = (inst.mixer.clone(), inst.members == 0);
            if empty {
                st.instances.remove(&key);
                if st.rooms.get(&m.room).is_some_and(|p| p.node == m.node && p.id == m.room_id) {
                    st.rooms.remove(&m.room);
                }
            }
            (mixer, m, empty)
        };
        let _ = mixer.leave(&m.room_id, &m.participant);
        if empty {
            let _ = mixer.delete_room(&m.room_id);
        }
        true
    }

    /// Whether `call_id` is a dialog of the focus.
    pub fn is_member(&self, call_id: &str) -> bool {
        self.lock().members.contains_key(call_id)
    }

    /// Mixer rooms open and participants in them. A room re-created elsewhere while
    /// some of its participants stay on the old node counts twice until they leave.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.instances.len(), st.members.len())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A mixer that counts and can be made to fail (also used by the proxy's tests).
    #[derive(Debug, Default)]
    pub(crate) struct FakeMixer {
        fail: std::sync::atomic::AtomicBool,
        /// Creating a room takes a while, as over the network (widens race windows).
        slow: std::sync::atomic::AtomicBool,
        /// Every room is full.
        full: std::sync::atomic::AtomicBool,
        /// Joins find no room (the node lost its rooms).
        lost: std::sync::atomic::AtomicBool,
        rooms: AtomicU32,
        joined: AtomicU32,
        left: AtomicU32,
        deleted: AtomicU32,
    }

    impl Mixer for FakeMixer {
        fn create_room(&self) -> Result<String, Error> {
            if self.slow.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if self.fail.load(Ordering::Relaxed) {
                return Err(Error::Io(std::io::Error::other("node down")));
            }
            Ok(format!("{:016x}", self.rooms.fetch_add(1, Ordering::Relaxed) + 1))
        }
        fn delete_room(&self, _: &str) -> Result<(), Error> {
            self.deleted.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn join(&self, _: &str, _: Codec, pt: u8, _: Option<SocketAddr>) -> Result<ParticipantCreated, Error> {
            if self.full.load(Ordering::Relaxed) {
                return Err(Error::RoomFull("conference is full".into()));
            }
            if self.lost.load(Ordering::Relaxed) {
                return Err(Error::NotFound("no such conference".into()));
            }
            let n = self.joined.fetch_add(1, Ordering::Relaxed);
            Ok(ParticipantCreated {
                id: format!("{n:08x}"),
                address: IpAddr::from([127, 0, 0, 9]),
                rtp_port: 40_000 + 2 * n as u16,
                payload_type: pt,
            })
        }
        fn leave(&self, _: &str, _: &str) -> Result<(), Error> {
            self.left.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    const OFFER: &str = "v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
        m=audio 5000 RTP/AVP 96 0 101\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n";

    #[test]
    fn picks_the_first_offered_codec_it_speaks_and_answers_with_the_mixer_port() {
        let a = Arc::new(FakeMixer::default());
        let f = Focus::new(vec![a.clone()]);
        let sdp = f.join("r1", "c1", OFFER).unwrap();
        assert!(sdp.contains("m=audio 40000 RTP/AVP 96\r\n"), "{sdp}");
        assert!(sdp.contains("a=rtpmap:96 opus/48000/2"), "{sdp}");
        assert!(sdp.contains("c=IN IP4 127.0.0.9"), "{sdp}");
        let pcmu = OFFER.replace("RTP/AVP 96 0 101", "RTP/AVP 0 101");
        assert!(f.join("r1", "c2", &pcmu).unwrap().contains("m=audio 40002 RTP/AVP 0\r\n"));
        assert_eq!(f.counts(), (1, 2), "one room, two members");
        assert_eq!(f.join("r1", "c2", &pcmu).unwrap(), f.join("r1", "c2", OFFER).unwrap(), "same answer again");
        assert_eq!(a.joined.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_full_room_is_refused_not_split_over_another_node() {
        let (a, b) = (Arc::new(FakeMixer::default()), Arc::new(FakeMixer::default()));
        let f = Focus::new(vec![a.clone(), b.clone()]);
        f.join("r", "c1", OFFER).unwrap();
        a.full.store(true, Ordering::Relaxed);
        match f.join("r", "c2", OFFER) {
            Err(JoinError::Unavailable(why)) => assert!(why.contains("full"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.rooms.load(Ordering::Relaxed), 0, "no second room elsewhere");
        assert_eq!(f.counts(), (1, 1));
    }

    #[test]
    fn rejects_offers_without_a_common_codec() {
        let f = Focus::new(vec![Arc::new(FakeMixer::default())]);
        let g722 = OFFER.replace("RTP/AVP 96 0 101", "RTP/AVP 9").replace("a=rtpmap:96 opus/48000/2\r\n", "");
        assert!(matches!(f.join("r", "c", &g722), Err(JoinError::NotAcceptable(_))));
        assert!(matches!(f.join("r", "c", "garbage"), Err(JoinError::NotAcceptable(_))));
        assert_eq!(f.counts(), (0, 0));
    }

    #[test]
    fn fails_over_to_the_next_node_and_the_last_one_out_deletes_the_room() {
        let (a, b) = (Arc::new(FakeMixer::default()), Arc::new(FakeMixer::default()));
        a.fail.store(true, Ordering::Relaxed);
        let f = Focus::new(vec![a.clone(), b.clone()]);
        f.join("r", "c1", OFFER).unwrap();
        f.join("r", "c2", OFFER).unwrap();
        assert_eq!((a.joined.load(Ordering::Relaxed), b.joined.load(Ordering::Relaxed)), (0, 2));
        assert_eq!(b.rooms.load(Ordering::Relaxed), 1, "the second joins the same room");
        assert!(f.leave("c1"));
        assert_eq!(b.deleted.load(Ordering::Relaxed), 0);
        assert!(f.leave("c2"));
        assert!(!f.leave("c2"), "already gone");
        assert_eq!((b.left.load(Ordering::Relaxed), b.deleted.load(Ordering::Relaxed)), (2, 1));
        assert_eq!(f.counts(), (0, 0));
        a.fail.store(false, Ordering::Relaxed);
        b.fail.store(true, Ordering::Relaxed);
        // a is still marked down, but with b failing it is tried as a last resort.
        f.join("r", "c3", OFFER).unwrap();
        assert_eq!(a.joined.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn concurrent_first_joins_of_a_room_end_in_one_room() {
        let m = Arc::new(FakeMixer::default());
        m.slow.store(true, Ordering::Relaxed);
        let f = Arc::new(Focus::new(vec![m.clone()]));
        let joins: Vec<_> = (0..6)
            .map(|i| {
                let f = f.clone();
                std::thread::spawn(move || f.join("standup", &format!("c{i}"), OFFER).unwrap())
            })
            .collect();
        for j in joins {
            j.join().unwrap();
        }
        assert_eq!(f.counts(), (1, 6));
        assert_eq!(m.rooms.load(Ordering::Relaxed), 1, "one room created on the node, not one per caller");
    }

    #[test]
    fn conference_uris() {
        assert_eq!(room_of_user("conf-weekly"), Some("weekly"));
        assert_eq!(room_of_user("conf-"), None);
        assert_eq!(room_of_user("alice"), None);
    }

    #[test]
    fn a_dialog_without_bye_expires_and_leaves_its_room() {
        let m = Arc::new(FakeMixer::default());
        let f = Focus::new(vec![m.clone()]);
        let offer = "v=0\r\no=a 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n\
            m=audio 5000 RTP/AVP 0\r\n";
        f.join("standup", "gone", offer).unwrap();
        f.join("standup", "stays", offer).unwrap();
        let t0 = Instant::now();
        assert_eq!(f.expire_idle(t0 + Duration::from_secs(3600)), 0, "an hour is not idle");
        // "stays" refreshes its session (a re-INVITE joins again: same answer).
        {
            let mut st = f.lock();
            st.members.get_mut("gone").unwrap().last = t0 - DIALOG_IDLE;
        }
        assert_eq!(f.expire_idle(t0), 1);
        assert!(!f.is_member("gone") && f.is_member("stays"));
        assert_eq!(f.counts(), (1, 1));
        assert_eq!(m.left.load(Ordering::Relaxed), 1, "the mixer was told");
    }

    /// Relay members of a test cluster, each with a FakeMixer at `http://API`.
    struct Cluster {
        tx: tokio::sync::watch::Sender<crate::cluster::View>,
        mixers: Arc<Mutex<HashMap<String, Arc<FakeMixer>>>>,
        /// Mixers built, by name.
        made: Arc<Mutex<Vec<String>>>,
    }

    fn relay(id: &str, api: Option<&str>, sessions: u64, cpu: f64) -> crate::cluster::Member {
        let mut m = crate::cluster::Member::new(crate::cluster::Role::Relay, id);
        m.api = api.map(str::to_string);
        m.load.sessions = sessions;
        m.load.cpu = cpu;
        m
    }

    impl Cluster {
        /// A focus over `statics` and the relays of this cluster (none yet).
        fn focus(statics: Vec<Arc<dyn Mixer>>) -> (Self, Focus) {
            let (tx, rx) = tokio::sync::watch::channel(crate::cluster::View::default());
            let mixers: Arc<Mutex<HashMap<String, Arc<FakeMixer>>>> = Arc::default();
            let made: Arc<Mutex<Vec<String>>> = Arc::default();
            let (m, d) = (mixers.clone(), made.clone());
            let f = Focus::new(statics).with_members(rx, move |member| {
                let name = format!("http://{}", member.api.as_deref()?);
                d.lock().unwrap().push(name.clone());
                let mixer: Arc<dyn Mixer> = m.lock().unwrap().entry(name).or_default().clone();
                Some(mixer)
            });
            (Self { tx, mixers, made }, f)
        }

        /// Membership now lists `members` (a new revision).
        fn set(&self, members: Vec<crate::cluster::Member>) {
            let revision = self.tx.borrow().revision + 1;
            self.tx.send_replace(crate::cluster::View { revision, members: members.into() });
        }

        /// The mixer of the relay whose API is `api` (created on first use).
        fn mixer(&self, api: &str) -> Arc<FakeMixer> {
            self.mixers.lock().unwrap().entry(format!("http://{api}")).or_default().clone()
        }
    }

    fn joined(m: &FakeMixer) -> u32 {
        m.joined.load(Ordering::Relaxed)
    }

    #[test]
    fn the_focus_is_send_sync_and_debug() {
        fn check<T: Send + Sync + std::fmt::Debug>() {}
        check::<Focus>();
        let (c, f) = Cluster::focus(vec![]);
        c.set(vec![relay("r1", Some("127.0.0.1:1"), 0, 0.0)]);
        f.join("r", "c", OFFER).unwrap();
        assert!(format!("{f:?}").contains("http://127.0.0.1:1"));
    }

    #[test]
    fn a_new_room_goes_to_the_least_loaded_relay_member() {
        let (c, f) = Cluster::focus(vec![]);
        let (a, b, d) = (c.mixer("10.0.0.1:8080"), c.mixer("10.0.0.2:8080"), c.mixer("10.0.0.3:8080"));
        c.set(vec![
            relay("a", Some("10.0.0.1:8080"), 5, 0.1),
            relay("b", Some("10.0.0.2:8080"), 1, 0.9),
            // As few sessions, less CPU: first.
            relay("d", Some("10.0.0.3:8080"), 1, 0.2),
            relay("no-api", None, 0, 0.0),
        ]);
        f.join("r1", "c1", OFFER).unwrap();
        assert_eq!((joined(&a), joined(&b), joined(&d)), (0, 0, 1));
        assert_eq!(d.rooms.load(Ordering::Relaxed), 1);
        // Membership has not updated since: the participant placed on d counts, so the
        // next new room goes to b (1 session), not d again (1 + 1).
        f.join("r2", "c2", OFFER).unwrap();
        assert_eq!((joined(&a), joined(&b), joined(&d)), (0, 1, 1));
        let mut made = c.made.lock().unwrap().clone();
        made.sort();
        assert_eq!(made, ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"], "once per name");
    }

    #[test]
    fn a_room_stays_on_its_node_while_membership_lists_it() {
        let (c, f) = Cluster::focus(vec![]);
        let (a, b) = (c.mixer("10.0.0.1:80"), c.mixer("10.0.0.2:80"));
        c.set(vec![relay("a", Some("10.0.0.1:80"), 0, 0.0), relay("b", Some("10.0.0.2:80"), 3, 0.0)]);
        f.join("r", "c1", OFFER).unwrap();
        // a is now the busiest; the room stays there, new rooms go to b.
        c.set(vec![relay("a", Some("10.0.0.1:80"), 50, 2.0), relay("b", Some("10.0.0.2:80"), 3, 0.0)]);
        f.join("r", "c2", OFFER).unwrap();
        f.join("other", "c3", OFFER).unwrap();
        assert_eq!((joined(&a), joined(&b)), (2, 1));
        assert_eq!((a.rooms.load(Ordering::Relaxed), b.rooms.load(Ordering::Relaxed)), (1, 1));
        assert_eq!(f.counts(), (2, 3));
        assert_eq!(c.made.lock().unwrap().len(), 2, "load updates build no new mixer");
    }

    #[test]
    fn a_room_whose_node_left_membership_is_recreated_elsewhere_and_the_old_one_cleaned_up() {
        let (c, f) = Cluster::focus(vec![]);
        let (a, b) = (c.mixer("10.0.0.1:80"), c.mixer("10.0.0.2:80"));
        c.set(vec![relay("a", Some("10.0.0.1:80"), 0, 0.0), relay("b", Some("10.0.0.2:80"), 9, 0.0)]);
        f.join("r", "old1", OFFER).unwrap();
        f.join("r", "old2", OFFER).unwrap();
        assert_eq!(joined(&a), 2);
        // a leaves (its lease ran out); b is listed alone and does not shift.
        c.set(vec![relay("b", Some("10.0.0.2:80"), 9, 0.0)]);
        f.join("r", "new1", OFFER).unwrap();
        f.join("r", "new2", OFFER).unwrap();
        assert_eq!((joined(&a), joined(&b)), (2, 2), "new joiners on b");
        assert_eq!(b.rooms.load(Ordering::Relaxed), 1, "one room re-created on b, shared by both");
        assert_eq!(f.counts(), (2, 4), "the old room still holds two");
        // Those in a's room leave a's room (a is told though unlisted); the last one
        // out deletes it, and b's room is untouched.
        assert!(f.leave("old1"));
        assert_eq!((a.left.load(Ordering::Relaxed), a.deleted.load(Ordering::Relaxed)), (1, 0));
        f.lock().members.get_mut("old2").unwrap().last = Instant::now() - DIALOG_IDLE;
        assert_eq!(f.expire_idle(Instant::now()), 1);
        assert_eq!((a.left.load(Ordering::Relaxed), a.deleted.load(Ordering::Relaxed)), (2, 1));
        assert_eq!((b.left.load(Ordering::Relaxed), b.deleted.load(Ordering::Relaxed)), (0, 0));
        assert_eq!(f.counts(), (1, 2));
        f.join("r", "new3", OFFER).unwrap();
        assert_eq!((joined(&b), b.rooms.load(Ordering::Relaxed)), (3, 1), "the room lives on b");
        for cid in ["new1", "new2", "new3"] {
            assert!(f.leave(cid));
        }
        assert_eq!((b.left.load(Ordering::Relaxed), b.deleted.load(Ordering::Relaxed)), (3, 1));
        assert_eq!(f.counts(), (0, 0));
        assert!(f.lock().rooms.is_empty() && f.lock().instances.is_empty());
    }

    #[test]
    fn a_room_failed_over_to_another_node_is_counted_per_node() {
        // Were rooms counted by name, the old participants' leaves would go to the new
        // node and the first of them would delete the room under the newcomers.
        let (a, b) = (Arc::new(FakeMixer::default()), Arc::new(FakeMixer::default()));
        let f = Focus::new(vec![a.clone(), b.clone()]);
        f.join("r", "c1", OFFER).unwrap();
        // a lost the room (say it restarted): the next join re-creates it on b.
        a.lost.store(true, Ordering::Relaxed);
        f.join("r", "c2", OFFER).unwrap();
        assert_eq!((joined(&a), joined(&b), b.rooms.load(Ordering::Relaxed)), (1, 1, 1));
        assert_eq!(a.deleted.load(Ordering::Relaxed), 0, "a join failing in an existing room keeps it");
        assert!(f.leave("c1"));
        assert_eq!((a.left.load(Ordering::Relaxed), a.deleted.load(Ordering::Relaxed)), (1, 1));
        assert_eq!((b.left.load(Ordering::Relaxed), b.deleted.load(Ordering::Relaxed)), (0, 0), "b's room lives on");
        assert_eq!(f.counts(), (1, 1));
        assert!(f.leave("c2"));
        assert_eq!((b.left.load(Ordering::Relaxed), b.deleted.load(Ordering::Relaxed)), (1, 1));
        assert_eq!(f.counts(), (0, 0));
    }

    #[test]
    fn static_nodes_come_after_members_and_serve_when_there_are_none() {
        let s = Arc::new(FakeMixer::default());
        let (c, f) = Cluster::focus(vec![s.clone()]);
        f.join("r1", "c1", OFFER).unwrap();
        assert_eq!(joined(&s), 1, "no members yet: the static node");
        let a = c.mixer("10.0.0.1:80");
        c.set(vec![relay("a", Some("10.0.0.1:80"), 1000, 8.0)]);
        f.join("r2", "c2", OFFER).unwrap();
        assert_eq!((joined(&a), joined(&s)), (1, 1), "a member, however loaded, before the static nodes");
        f.join("r1", "c3", OFFER).unwrap();
        assert_eq!(joined(&s), 2, "r1 stays on the static node");
        a.fail.store(true, Ordering::Relaxed);
        f.join("r3", "c4", OFFER).unwrap();
        assert_eq!(joined(&s), 3, "a fails: the static node takes the new room");
        assert!(f.lock().down_until.contains_key("http://10.0.0.1:80"));
    }

    #[test]
    fn members_without_a_mixer_are_left_out_and_not_asked_again() {
        let (tx, rx) = tokio::sync::watch::channel(crate::cluster::View::default());
        let asked = Arc::new(AtomicU32::new(0));
        let s = Arc::new(FakeMixer::default());
        let n = asked.clone();
        let f = Focus::new(vec![s.clone()]).with_members(rx, move |_| {
            n.fetch_add(1, Ordering::Relaxed);
            None
        });
        tx.send_replace(crate::cluster::View {
            revision: 1,
            members: vec![relay("a", Some("10.0.0.1:80"), 0, 0.0)].into(),
        });
        f.join("r", "c1", OFFER).unwrap();
        f.join("r", "c2", OFFER).unwrap();
        assert_eq!((joined(&s), asked.load(Ordering::Relaxed)), (2, 1));
    }

    #[test]
    fn no_node_at_all_is_unavailable() {
        let (c, f) = Cluster::focus(vec![]);
        assert!(matches!(f.join("r", "c", OFFER), Err(JoinError::Unavailable(_))));
        c.set(vec![relay("no-api", None, 0, 0.0)]);
        assert!(matches!(f.join("r", "c", OFFER), Err(JoinError::Unavailable(_))));
        assert_eq!(f.counts(), (0, 0));
    }

    #[test]
    fn mixers_of_members_gone_for_a_while_are_dropped_and_the_cache_is_bounded() {
        let (c, f) = Cluster::focus(vec![]);
        c.set(vec![relay("a", Some("10.0.0.1:80"), 0, 0.0)]);
        f.join("r", "c1", OFFER).unwrap();
        let members = f.members.as_ref().unwrap();
        let t0 = Instant::now();
        c.set(vec![]);
        members.nodes(t0 + FORGET_AFTER / 2, None);
        assert_eq!(members.cache().mixers.len(), 1, "gone briefly: kept");
        members.nodes(t0 + FORGET_AFTER * 2, None);
        assert!(members.cache().mixers.is_empty(), "gone a while: dropped");
        // The room keeps its own handle: the participant still leaves a's room.
        assert!(f.leave("c1"));
        assert_eq!(c.mixer("10.0.0.1:80").deleted.load(Ordering::Relaxed), 1);
        // Many members coming and going within FORGET_AFTER: still bounded.
        for k in 0..(MAX_CACHED + 300) {
            c.set(vec![relay(&format!("r{k}"), Some(&format!("10.1.{}.{}:80", k / 250, k % 250)), 0, 0.0)]);
            members.nodes(t0 + Duration::from_millis(k as u64), None);
        }
        assert_eq!(members.cache().mixers.len(), MAX_CACHED);
        // At most MAX_MEMBER_NODES members are nodes at once.
        let many: Vec<_> = (0..MAX_MEMBER_NODES + 10)
            .map(|k| relay(&format!("m{k:04}"), Some(&format!("10.2.{}.{}:80", k / 250, k % 250)), k as u64, 0.0))
            .collect();
        c.set(many);
        let nodes = members.nodes(t0 + FORGET_AFTER * 3, None);
        assert_eq!(nodes.len(), MAX_MEMBER_NODES);
        assert_eq!(nodes[0].name, "http://10.2.0.0:80", "least loaded first");
        // A room's node stays a node however loaded it gets (sticky).
        let nodes = members.nodes(t0 + FORGET_AFTER * 3, Some("http://10.2.1.9:80"));
        assert_eq!(nodes.len(), MAX_MEMBER_NODES + 1);
        assert_eq!(nodes[MAX_MEMBER_NODES].name, "http://10.2.1.9:80");
    }
}
