//! Messages between the control plane and the workers.

use crate::relay::{SessionId, SessionSnapshot, SessionSpec};
use socket2::Socket;
use std::net::SocketAddr;

/// A session to place on a worker, with its four bound sockets (`[leg][RTP|RTCP]`).
///
/// The control plane binds the sockets so that port exhaustion and bind errors are
/// answered synchronously to the API caller; the worker only registers them with its ring.
#[derive(Debug)]
pub struct NewSession {
    /// What the session is.
    pub spec: SessionSpec,
    /// Its sockets, non-blocking, bound to the leg's RTP and RTCP ports.
    pub sockets: [[Socket; 2]; 2],
}

/// A command from the control plane to one worker.
#[derive(Debug)]
#[non_exhaustive]
pub enum Command {
    /// Create a session.
    Add(Box<NewSession>),
    /// Set or clear the signalled remote of a leg (0 = A, 1 = B).
    SetRemote {
        /// Session.
        id: SessionId,
        /// Leg index.
        leg: u8,
        /// New remote RTP address; RTCP is its port + 1.
        remote: Option<SocketAddr>,
    },
    /// Delete a session; the worker answers [`Event::Released`] once its ports are free.
    Remove {
        /// Session.
        id: SessionId,
    },
    /// Ask for a fresh snapshot; answered on `reply` (`None`: no such session).
    Query {
        /// Session.
        id: SessionId,
        /// Where to answer.
        reply: crossbeam_channel::Sender<Option<SessionSnapshot>>,
    },
    /// Start (`Some`) or stop (`None`) intercepting a session; takes effect before the
    /// next packet the worker handles.
    SetTap {
        /// Session.
        id: SessionId,
        /// Task and labels, or `None` to stop.
        tap: Option<crate::tap::TapSpec>,
    },
    /// Create a conference room.
    ConfAdd {
        /// Room id.
        conf: u64,
        /// Mixer settings.
        cfg: crate::mixer::RoomConfig,
    },
    /// Delete a room and all its participants.
    ConfRemove {
        /// Room id.
        conf: u64,
    },
    /// Add a participant with its bound RTP and RTCP sockets.
    ParticipantAdd(Box<NewParticipant>),
    /// Change a participant.
    ParticipantUpdate {
        /// Room.
        conf: u64,
        /// Participant.
        id: u32,
        /// New signalled remote (`Some(None)` clears it).
        remote: Option<Option<SocketAddr>>,
        /// Mute.
        mute: Option<bool>,
        /// Deaf.
        deaf: Option<bool>,
    },
    /// Remove a participant; answered by [`Event::ParticipantReleased`].
    ParticipantRemove {
        /// Room.
        conf: u64,
        /// Participant.
        id: u32,
    },
    /// Move a participant to another room on the same worker.
    ParticipantMove {
        /// Room it is in.
        conf: u64,
        /// Participant.
        id: u32,
        /// Room it goes to.
        to: u64,
    },
    /// Take a participant (sockets and state) off this worker, to attach it to a room on
    /// another; answered on `reply` once its receives have stopped.
    ParticipantDetach {
        /// Room it is in.
        conf: u64,
        /// Participant.
        id: u32,
        /// Where to hand it.
        reply: crossbeam_channel::Sender<Box<DetachedParticipant>>,
    },
    /// Attach a detached participant to a room on this worker.
    ParticipantAttach {
        /// Room it joins.
        conf: u64,
        /// The participant.
        p: Box<DetachedParticipant>,
    },
    /// Room statistics, answered on `reply` (`None`: no such room).
    ConfQuery {
        /// Room.
        conf: u64,
        /// Where to answer.
        reply: crossbeam_channel::Sender<Option<ConfSnapshot>>,
    },
    /// Stop the worker after closing every socket.
    Shutdown,
}

/// A participant to add.
#[derive(Debug)]
pub struct NewParticipant {
    /// Room.
    pub conf: u64,
    /// Participant id.
    pub id: u32,
    /// Codec.
    pub codec: crate::mixer::Codec,
    /// Payload type it sends and receives.
    pub payload_type: u8,
    /// SSRC of what the room sends it.
    pub ssrc: u32,
    /// Signalled remote RTP address (learned by latching when absent).
    pub remote: Option<SocketAddr>,
    /// RTP and RTCP sockets.
    pub sockets: [Socket; 2],
}

/// A participant between workers: its open sockets (packets queue in them meanwhile)
/// and its mixer state.
#[derive(Debug)]
pub struct DetachedParticipant {
    /// Participant id.
    pub id: u32,
    /// RTP and RTCP sockets.
    pub sockets: [Socket; 2],
    /// Mixer state.
    pub state: crate::mixer::MovedParticipant,
    /// Signalled remote.
    pub signalled: Option<SocketAddr>,
    /// Latched RTP and RTCP sources.
    pub latched: [Option<SocketAddr>; 2],
}

/// A room's state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConfSnapshot {
    /// Room.
    pub conf: u64,
    /// Mixing rate.
    pub rate: u32,
    /// Talkers in the last tick.
    pub talkers: usize,
    /// Ticks run.
    pub ticks: u64,
    /// Ticks that finished more than 20 ms after they were due (missed their budget).
    pub late_ticks: u64,
    /// Participants.
    pub participants: Vec<crate::mixer::ParticipantStats>,
    /// Latched remote per participant id.
    pub remotes: Vec<(u32, Option<SocketAddr>)>,
}

/// Something a worker reports to the control plane.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A stream learned (or moved to) a remote address.
    Latched {
        /// Session.
        id: SessionId,
        /// Leg index.
        leg: u8,
        /// RTCP rather than RTP.
        rtcp: bool,
        /// The source address now latched.
        addr: SocketAddr,
        /// True when it moved from another address.
        relatch: bool,
    },
    /// A session was silent past its inactivity timeout and is being deleted.
    TimedOut {
        /// Session.
        id: SessionId,
    },
    /// A session's sockets are closed and its ports may be reused.
    Released {
        /// Session.
        id: SessionId,
    },
    /// Periodic statistics of a session that saw traffic.
    Stats(Box<SessionSnapshot>),
    /// A conference participant's sockets are closed and its ports may be reused.
    ParticipantReleased {
        /// Room.
        conf: u64,
        /// Participant.
        id: u32,
    },
}
