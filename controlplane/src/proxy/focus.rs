//! The conference focus: an INVITE to `conf-<room>@<domain>` joins a mixer room on a
//! media node and is answered with the mixer's SDP; BYE leaves. Rooms are named by the
//! SIP URI and created on first join, on the first media node that answers (a node
//! that fails is skipped for a while and the next is tried); the last one out deletes
//! the room. The SIP side (transactions, dialogs) is the proxy's; this module keeps
//! only room names, Call-ID → participant, and the SDP.

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

#[derive(Debug)]
struct Room {
    node: usize,
    id: String,
    members: usize,
}

#[derive(Debug)]
struct Member {
    room: String,
    participant: String,
    answer: String,
    /// The dialog's last request (join or refresh).
    last: Instant,
}

#[derive(Debug, Default)]
struct State {
    rooms: HashMap<String, Room>,
    members: HashMap<String, Member>,
    down_until: HashMap<usize, Instant>,
    version: u64,
    swept: Option<Instant>,
}

/// The focus over a list of media nodes (preference order).
#[derive(Debug)]
pub struct Focus {
    nodes: Vec<Arc<dyn Mixer>>,
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
    /// A focus over media nodes, tried in order.
    pub fn new(nodes: Vec<Arc<dyn Mixer>>) -> Self {
        Self { nodes, state: Mutex::new(State::default()), changing: Mutex::new(()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        // The room's node first if it exists, then the others in order, skipping those
        // down (unless all are, then everything is tried).
        let (existing, order) = {
            let st = self.lock();
            let existing = st.rooms.get(room).map(|r| (r.node, r.id.clone()));
            // Live nodes first, then those marked down as a last resort.
            let (mut order, down): (Vec<usize>, Vec<usize>) =
                (0..self.nodes.len()).partition(|n| st.down_until.get(n).is_none_or(|t| *t <= now));
            order.extend(down);
            if let Some((n, _)) = existing {
                order.retain(|x| *x != n);
                order.insert(0, n);
            }
            (existing, order)
        };
        for n in order {
            let node = &self.nodes[n];
            let room_id = match &existing {
                Some((en, id)) if *en == n => id.clone(),
                _ => match node.create_room() {
                    Ok(id) => id,
                    Err(e) => {
                        last_err = e.to_string();
                        self.lock().down_until.insert(n, now + DOWN_FOR);
                        continue;
                    }
                },
            };
            match node.join(&room_id, codec, pt, remote) {
                Ok(p) => {
                    let mut st = self.lock();
                    st.version += 1;
                    let answer = answer_sdp(&p, codec, pt, st.version);
                    let r =
                        st.rooms.entry(room.to_string()).or_insert(Room { node: n, id: room_id.clone(), members: 0 });
                    if r.node != n || r.id != room_id {
                        // The room's node failed: it lives on here from now on.
                        *r = Room { node: n, id: room_id.clone(), members: 0 };
                    }
                    r.members += 1;
                    st.members.insert(
                        call_id.to_string(),
                        Member { room: room.to_string(), participant: p.id, answer: answer.clone(), last: now },
                    );
                    return Ok(answer);
                }
                Err(Error::RoomFull(why)) => {
                    // Full is full: the room must not be split over another node.
                    return Err(JoinError::Unavailable(why));
                }
                Err(e) => {
                    last_err = e.to_string();
                    if matches!(e, Error::PortsExhausted(_) | Error::Busy(_) | Error::Io(_) | Error::Store(_)) {
                        self.lock().down_until.insert(n, now + DOWN_FOR);
                    }
                    if existing.as_ref().is_none_or(|(en, _)| *en != n) {
                        let _ = node.delete_room(&room_id);
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

    fn leave_locked(&self, call_id: &str) -> bool {
        let (node, room_id, participant, empty) = {
            let mut st = self.lock();
            let Some(m) = st.members.remove(call_id) else { return false };
            let Some(r) = st.rooms.get_mut(&m.room) else { return true };
            r.members = r.members.saturating_sub(1);
            let out = (r.node, r.id.clone(), m.participant, r.members == 0);
            if out.3 {
                st.rooms.remove(&m.room);
            }
            out
        };
        let n = &self.nodes[node];
        let _ = n.leave(&room_id, &participant);
        if empty {
            let _ = n.delete_room(&room_id);
        }
        true
    }

    /// Whether `call_id` is a dialog of the focus.
    pub fn is_member(&self, call_id: &str) -> bool {
        self.lock().members.contains_key(call_id)
    }

    /// Rooms open and participants in them.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.rooms.len(), st.members.len())
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
}
