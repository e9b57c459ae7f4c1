//! The relay role's control logic: sessions, ports, and the state pushed to workers.
//!
//! A create binds the four sockets here (so exhaustion and bind errors are answered to
//! the caller at once) and hands them to the owning worker. Ports come back only when
//! the worker reports [`Event::Released`], i.e. once its ring has let go of the sockets,
//! so a port is never handed out while the old socket still holds it.

pub mod calls;
pub mod ports;
pub mod remote;
pub mod sdp;

use crate::config::RelayConfig;
use crate::error::Error;
use crate::relay::ports::PortAllocator;
use crate::relay::remote::RemotePolicy;
use dataplane::relay::SessionSpec;
use dataplane::{
    Command, Dataplane, DataplaneConfig, Event, LatchPolicy, NewSession, SessionId, SessionSnapshot,
    WorkerCountersSnapshot,
};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bind attempts per pair before giving up on a create (a port held by another
/// process is skipped and retried later).
const BIND_ATTEMPTS: usize = 16;

/// What a create may specify.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Signalled remote RTP address of each leg.
    pub remotes: [Option<SocketAddr>; 2],
    /// RTP clock rate of each leg, if known.
    pub clock_rates: [Option<u32>; 2],
    /// Latching policy override.
    pub latch: Option<LatchPolicy>,
    /// Inactivity timeout override.
    pub inactivity: Option<Duration>,
}

/// A created session's public description.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// Session id.
    pub id: String,
    /// The relay's media address.
    pub address: IpAddr,
    /// Ports of legs A and B.
    pub legs: [LegPorts; 2],
}

/// Ports of one leg.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LegPorts {
    /// RTP port.
    pub rtp_port: u16,
    /// RTCP port (RTP + 1).
    pub rtcp_port: u16,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// Session id.
    pub id: String,
    /// The relay's media address.
    pub address: IpAddr,
    /// `waiting` until a packet has been accepted, then `active`.
    pub state: &'static str,
    /// Worker that owns it.
    pub worker: usize,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Inactivity timeout in seconds.
    pub inactivity_timeout_secs: u64,
    /// Milliseconds since the last accepted packet, if known.
    pub idle_ms: Option<u64>,
    /// Legs A and B.
    pub legs: [LegView; 2],
}

/// One leg as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LegView {
    /// RTP port.
    pub rtp_port: u16,
    /// RTCP port.
    pub rtcp_port: u16,
    /// Signalled remote RTP address.
    pub remote: Option<SocketAddr>,
    /// Latched source addresses.
    pub latched: Latched,
    /// Statistics of what the relay received on this leg, when known.
    pub stats: Option<LegStats>,
}

/// Latched source addresses of a leg.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latched {
    /// RTP source.
    pub rtp: Option<SocketAddr>,
    /// RTCP source.
    pub rtcp: Option<SocketAddr>,
}

/// Statistics of a leg.
#[derive(Debug, Clone, Serialize)]
pub struct LegStats {
    /// RTP stream.
    pub rtp: dataplane::StreamSnapshot,
    /// RTCP stream.
    pub rtcp: dataplane::StreamSnapshot,
}

#[derive(Debug)]
struct Record {
    worker: usize,
    ports: [u16; 2],
    created: u64,
    remotes: [Option<SocketAddr>; 2],
    latched: [Latched; 2],
    inactivity: Duration,
    last: Option<SessionSnapshot>,
}

/// Lifetime totals for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Sessions created.
    pub created: u64,
    /// Sessions deleted through the API.
    pub deleted: u64,
    /// Sessions deleted by inactivity.
    pub timed_out: u64,
    /// Creates refused for lack of ports.
    pub exhausted: u64,
}

#[derive(Debug)]
struct ConfRecord {
    worker: usize,
    created: u64,
    participants: HashMap<u32, PartRecord>,
}

#[derive(Debug, Clone)]
struct PartRecord {
    port: u16,
    codec: dataplane::mixer::Codec,
    payload_type: u8,
    remote: Option<SocketAddr>,
}

/// A participant just added.
#[derive(Debug, Clone, Serialize)]
pub struct ParticipantCreated {
    /// Participant id.
    pub id: String,
    /// The relay's media address.
    pub address: IpAddr,
    /// Where the participant sends RTP (RTCP: the next port).
    pub rtp_port: u16,
    /// The payload type both directions use.
    pub payload_type: u8,
}

/// A conference as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConfView {
    /// Room id.
    pub id: String,
    /// Worker that mixes it.
    pub worker: usize,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Mixing rate in Hz.
    pub rate: Option<u32>,
    /// Talkers mixed in the last tick.
    pub talkers: Option<usize>,
    /// Ticks run and ticks started late.
    pub ticks: Option<u64>,
    /// Ticks that finished more than 20 ms after they were due.
    pub late_ticks: Option<u64>,
    /// Participants.
    pub participants: Vec<serde_json::Value>,
}

#[derive(Debug)]
struct State {
    alloc: PortAllocator,
    confs: HashMap<u64, ConfRecord>,
    releasing_parts: HashMap<(u64, u32), u16>,
    next_participant: u32,
    sessions: HashMap<SessionId, Record>,
    /// Deleted or timed out, waiting for the worker to release the ports.
    releasing: HashMap<SessionId, [u16; 2]>,
    totals: Totals,
}

/// The relay role: data plane workers plus the session bookkeeping.
#[derive(Debug)]
pub struct Relay {
    cfg: RelayConfig,
    dp: Mutex<Dataplane>,
    modes: Vec<(&'static str, Option<usize>)>,
    counters: Vec<Arc<dataplane::WorkerCounters>>,
    state: Arc<Mutex<State>>,
    next: AtomicU64,
    seed: u64,
    remote: RwLock<RemotePolicy>,
    calls: AtomicUsize,
}

/// A random number from the standard library's per-process hash keys (no dependency
/// needed for a start offset).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// Public ids are a bijective scramble of a counter: unique, and not trivially
/// sequential.
fn scramble(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Formats a session id for the API.
pub fn format_id(id: SessionId) -> String {
    format!("{id:016x}")
}

/// Parses an API session id.
pub fn parse_id(s: &str) -> Option<SessionId> {
    (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock would be a bug; keep serving with the state as is
    // rather than poisoning every later request.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relay {
    /// Starts the data plane and the event pump.
    pub fn start(cfg: RelayConfig) -> Result<Arc<Self>, Error> {
        cfg.validate()?;
        let workers = cfg.worker_count();
        let dcfg = DataplaneConfig {
            workers,
            cores: cfg.cores.clone(),
            io_mode: cfg.io_mode,
            buffers: cfg.buffers,
            stats_interval: Duration::from_millis(cfg.stats_interval_ms.max(10)),
            batch_wait: Duration::from_micros(cfg.batch_wait_us),
            // Each pair is two sockets; a worker holds its share of the pairs.
            max_sockets: (2 * cfg.rtp_ports.pairs().div_ceil(workers) + 64).min(65536) as u32,
            ..DataplaneConfig::default()
        };
        let (dp, events) = Dataplane::start(dcfg)?;
        let modes = dp.workers().iter().map(|w| (w.mode().as_str(), w.core())).collect();
        let counters = dp.workers().iter().map(|w| w.counters_arc()).collect();
        let state = Arc::new(Mutex::new(State {
            alloc: PortAllocator::new(cfg.rtp_ports, workers, random_u64()),
            confs: HashMap::new(),
            releasing_parts: HashMap::new(),
            next_participant: 1,
            sessions: HashMap::new(),
            releasing: HashMap::new(),
            totals: Totals::default(),
        }));
        let pump_state = state.clone();
        std::thread::Builder::new()
            .name("hasp-events".into())
            .spawn(move || {
                // Ends when every worker has stopped and dropped its sender.
                for ev in events {
                    apply_event(&pump_state, ev);
                }
            })
            .map_err(Error::Io)?;
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        let remote = RwLock::new(RemotePolicy::new(cfg.media_ip, cfg.advertised(), cfg.rtp_ports, &cfg.remote_deny));
        Ok(Arc::new(Self {
            cfg,
            dp: Mutex::new(dp),
            modes,
            counters,
            state,
            next: AtomicU64::new(0),
            seed,
            remote,
            calls: AtomicUsize::new(0),
        }))
    }

    /// Tells the relay one of its own UDP listeners (NG, RTPproxy, SIP): no session may
    /// send media there (nor its RTCP, to the port above).
    pub fn add_own_address(&self, addr: SocketAddr) {
        self.remote.write().unwrap_or_else(|e| e.into_inner()).add_own(addr);
    }

    /// Refuses a remote that is one of the relay's own addresses or in a denied network.
    pub fn check_remote(&self, remote: SocketAddr) -> Result<(), Error> {
        self.remote.read().unwrap_or_else(|e| e.into_inner()).check(remote).map_err(|e| {
            // Debug, not info: whoever sends the remotes could flood the log.
            tracing::debug!(error = %e, "remote refused");
            Error::RemoteDenied(e.to_string())
        })
    }

    /// Publishes the number of calls (`Calls` keeps it current; read by `/metrics`).
    pub fn set_calls(&self, n: usize) {
        self.calls.store(n, Ordering::Relaxed);
    }

    /// Calls in the NG/RTPproxy/SIP registry, as last published.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    /// The configuration in force.
    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    fn send(&self, worker: usize, cmd: Command) -> Result<(), Error> {
        let dp = self.dp.lock().unwrap_or_else(|e| e.into_inner());
        dp.workers()[worker].send(cmd).map_err(|e| match e {
            dataplane::Error::QueueFull(w) => Error::Busy(format!("worker {w} queue full, retry")),
            other => Error::Dataplane(other),
        })
    }

    /// Creates a session: two legs, each an RTP/RTCP port pair on one worker.
    pub fn create(&self, req: CreateRequest) -> Result<Created, Error> {
        for r in req.remotes.iter().flatten() {
            self.check_remote(*r)?;
        }
        let id = scramble(self.seed ^ self.next.fetch_add(1, Ordering::Relaxed));
        let mut st = lock(&self.state);
        let Some(worker) = st.alloc.pick_worker(2, Instant::now()) else {
            st.totals.exhausted += 1;
            return Err(Error::PortsExhausted(st.alloc.total_pairs()));
        };
        let mut taken: Vec<(u16, [Socket; 2])> = Vec::with_capacity(2);
        let mut failed = Vec::new();
        let mut attempts = 0;
        while taken.len() < 2 && attempts < BIND_ATTEMPTS {
            attempts += 1;
            let Some(port) = st.alloc.take(worker) else {
                break;
            };
            match self.bind_pair(port) {
                Ok(socks) => taken.push((port, socks)),
                Err(e) => {
                    tracing::warn!(port, error = %e, "port pair unavailable, skipping");
                    failed.push(port);
                }
            }
        }
        // A pair another process holds goes to the back: retried last.
        let now = Instant::now();
        for p in failed {
            st.alloc.put(p, now);
        }
        if taken.len() < 2 {
            for (p, _) in taken {
                st.alloc.untake(p);
            }
            st.totals.exhausted += 1;
            return Err(Error::PortsExhausted(st.alloc.total_pairs()));
        }
        let mut it = taken.into_iter();
        let (pa, sa) = it.next().expect("two pairs taken");
        let (pb, sb) = it.next().expect("two pairs taken");
        let inactivity = req.inactivity.unwrap_or(Duration::from_secs(self.cfg.inactivity_timeout_secs));
        let spec = SessionSpec {
            id,
            remotes: req.remotes,
            clock_rates: req.clock_rates,
            policy: req.latch.unwrap_or(self.cfg.latch),
            inactivity,
        };
        let new = NewSession { spec, sockets: [sa, sb] };
        if let Err(e) = self.send(worker, Command::Add(Box::new(new))) {
            // The sockets were dropped with the command: the ports are free again.
            st.alloc.untake(pb);
            st.alloc.untake(pa);
            return Err(e);
        }
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        st.sessions.insert(
            id,
            Record {
                worker,
                ports: [pa, pb],
                created,
                remotes: req.remotes,
                latched: Default::default(),
                inactivity,
                last: None,
            },
        );
        st.totals.created += 1;
        Ok(Created {
            id: format_id(id),
            address: self.cfg.advertised(),
            legs: [LegPorts { rtp_port: pa, rtcp_port: pa + 1 }, LegPorts { rtp_port: pb, rtcp_port: pb + 1 }],
        })
    }

    fn bind_pair(&self, port: u16) -> std::io::Result<[Socket; 2]> {
        Ok([self.bind(port)?, self.bind(port + 1)?])
    }

    fn bind(&self, port: u16) -> std::io::Result<Socket> {
        let addr = SocketAddr::new(self.cfg.media_ip, port);
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    }

    /// Every session, with the statistics last pushed by the workers.
    pub fn list(&self) -> Vec<SessionView> {
        let st = lock(&self.state);
        let mut v: Vec<_> = st.sessions.iter().map(|(id, r)| self.view(*id, r, r.last.as_ref())).collect();
        v.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        v
    }

    /// One session with fresh statistics from its worker. Blocks for at most ~0.5 s.
    pub fn get(&self, id: SessionId) -> Result<SessionView, Error> {
        let worker = {
            let st = lock(&self.state);
            st.sessions.get(&id).map(|r| r.worker).ok_or_else(|| Error::NotFound(format_id(id)))?
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let fresh = match self.send(worker, Command::Query { id, reply: tx }) {
            Ok(()) => rx.recv_timeout(Duration::from_millis(500)).ok().flatten(),
            Err(_) => None,
        };
        let st = lock(&self.state);
        let r = st.sessions.get(&id).ok_or_else(|| Error::NotFound(format_id(id)))?;
        Ok(self.view(id, r, fresh.as_ref().or(r.last.as_ref())))
    }

    /// Sets (`Some`) or clears (`None`) the signalled remote of the given legs; legs not
    /// in `changes` keep theirs.
    pub fn update(&self, id: SessionId, changes: &[(usize, Option<SocketAddr>)]) -> Result<SessionView, Error> {
        self.set_remotes(id, changes)?;
        self.get(id)
    }

    /// Sets or clears signalled remotes without reading the session back (the NG and
    /// RTPproxy paths, which answer with SDP, not with a session view).
    pub fn set_remotes(&self, id: SessionId, changes: &[(usize, Option<SocketAddr>)]) -> Result<(), Error> {
        for r in changes.iter().filter_map(|c| c.1) {
            self.check_remote(r)?;
        }
        let worker = {
            let mut st = lock(&self.state);
            let r = st.sessions.get_mut(&id).ok_or_else(|| Error::NotFound(format_id(id)))?;
            for &(leg, remote) in changes {
                if leg > 1 {
                    return Err(Error::Invalid(format!("leg {leg} does not exist (0 or 1)")));
                }
                r.remotes[leg] = remote;
                r.latched[leg] = Latched::default();
            }
            r.worker
        };
        for &(leg, remote) in changes {
            self.send(worker, Command::SetRemote { id, leg: leg as u8, remote })?;
        }
        Ok(())
    }

    /// Starts or stops intercepting a session (LI only; invisible to the session API).
    pub fn set_tap(&self, id: SessionId, tap: Option<dataplane::TapSpec>) -> Result<(), Error> {
        let worker =
            lock(&self.state).sessions.get(&id).map(|r| r.worker).ok_or_else(|| Error::NotFound(format_id(id)))?;
        self.send(worker, Command::SetTap { id, tap })
    }

    /// The data plane's intercept queue.
    pub fn tap_receiver(&self) -> crossbeam_channel::Receiver<dataplane::TapRecord> {
        self.dp.lock().unwrap_or_else(|e| e.into_inner()).tap_receiver()
    }

    /// The data plane's intercept counters.
    pub fn tap_counters(&self) -> Arc<dataplane::TapCounters> {
        self.dp.lock().unwrap_or_else(|e| e.into_inner()).tap_counters()
    }

    /// True while the session exists (not deleted, not timed out).
    pub fn exists(&self, id: SessionId) -> bool {
        lock(&self.state).sessions.contains_key(&id)
    }

    /// Deletes a session and returns its final state; its ports are freed once the
    /// worker has closed the sockets.
    pub fn delete(&self, id: SessionId) -> Result<SessionView, Error> {
        let view = self.get(id)?;
        self.remove(id)?;
        Ok(view)
    }

    /// Deletes a session without reading its final state (undoing a create).
    pub fn remove(&self, id: SessionId) -> Result<(), Error> {
        let mut st = lock(&self.state);
        let r = st.sessions.get(&id).ok_or_else(|| Error::NotFound(format_id(id)))?;
        let (worker, ports) = (r.worker, r.ports);
        self.send(worker, Command::Remove { id })?;
        st.sessions.remove(&id);
        st.releasing.insert(id, ports);
        st.totals.deleted += 1;
        Ok(())
    }

    fn view(&self, id: SessionId, r: &Record, snap: Option<&SessionSnapshot>) -> SessionView {
        let leg = |i: usize| {
            let (latched, stats) = match snap {
                Some(s) => (
                    Latched { rtp: s.legs[i].rtp.latched, rtcp: s.legs[i].rtcp.latched },
                    Some(LegStats { rtp: s.legs[i].rtp.clone(), rtcp: s.legs[i].rtcp.clone() }),
                ),
                None => (r.latched[i], None),
            };
            LegView { rtp_port: r.ports[i], rtcp_port: r.ports[i] + 1, remote: r.remotes[i], latched, stats }
        };
        let legs = [leg(0), leg(1)];
        let active = legs.iter().any(|l| l.latched.rtp.is_some() || l.latched.rtcp.is_some());
        SessionView {
            id: format_id(id),
            address: self.cfg.advertised(),
            state: if active { "active" } else { "waiting" },
            worker: r.worker,
            created: r.created,
            inactivity_timeout_secs: r.inactivity.as_secs(),
            idle_ms: snap.map(|s| s.idle_ms),
            legs,
        }
    }

    /// Sessions, free and total port pairs, and lifetime totals.
    pub fn usage(&self) -> (usize, usize, usize, Totals) {
        let st = lock(&self.state);
        (st.sessions.len(), st.alloc.free_pairs(), st.alloc.total_pairs(), st.totals)
    }

    /// Per worker: receive mode, pinned core and counters.
    pub fn workers(&self) -> Vec<(&'static str, Option<usize>, WorkerCountersSnapshot)> {
        self.modes.iter().zip(&self.counters).map(|(&(m, c), k)| (m, c, k.snapshot())).collect()
    }

    /// Creates a conference room on the next worker with a free port pair.
    pub fn conf_create(&self, cfg: dataplane::mixer::RoomConfig) -> Result<String, Error> {
        let id = scramble(self.seed ^ 0x5a5a_5a5a ^ self.next.fetch_add(1, Ordering::Relaxed));
        let mut st = lock(&self.state);
        let Some(worker) = st.alloc.pick_worker(1, Instant::now()) else {
            st.totals.exhausted += 1;
            return Err(Error::PortsExhausted(st.alloc.total_pairs()));
        };
        self.send(worker, Command::ConfAdd { conf: id, cfg })?;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        st.confs.insert(id, ConfRecord { worker, created, participants: HashMap::new() });
        Ok(format_id(id))
    }

    /// Deletes a room and its participants.
    pub fn conf_delete(&self, conf: u64) -> Result<(), Error> {
        let mut st = lock(&self.state);
        let c = st.confs.remove(&conf).ok_or_else(|| Error::NotFound(format_id(conf)))?;
        self.send(c.worker, Command::ConfRemove { conf })?;
        for (id, p) in c.participants {
            st.releasing_parts.insert((conf, id), p.port);
        }
        Ok(())
    }

    /// Adds a participant: one RTP/RTCP port pair on the room's worker.
    pub fn participant_add(
        &self,
        conf: u64,
        codec: dataplane::mixer::Codec,
        payload_type: Option<u8>,
        remote: Option<SocketAddr>,
    ) -> Result<ParticipantCreated, Error> {
        if let Some(r) = remote {
            self.check_remote(r)?;
        }
        let mut st = lock(&self.state);
        let c = st.confs.get(&conf).ok_or_else(|| Error::NotFound(format_id(conf)))?;
        if c.participants.len() >= self.cfg.max_participants {
            return Err(Error::RoomFull(format!(
                "conference {} is full: {} participants (max_participants)",
                format_id(conf),
                self.cfg.max_participants
            )));
        }
        let worker = c.worker;
        let mut failed = Vec::new();
        let mut bound = None;
        for _ in 0..BIND_ATTEMPTS {
            let Some(port) = st.alloc.take(worker) else { break };
            match self.bind_pair(port) {
                Ok(s) => {
                    bound = Some((port, s));
                    break;
                }
                Err(_) => failed.push(port),
            }
        }
        let now = Instant::now();
        for p in failed {
            st.alloc.put(p, now);
        }
        let Some((port, sockets)) = bound else {
            st.totals.exhausted += 1;
            return Err(Error::PortsExhausted(st.alloc.total_pairs()));
        };
        let id = st.next_participant;
        st.next_participant = st.next_participant.wrapping_add(1).max(1);
        let payload_type = payload_type.unwrap_or(codec.default_payload_type());
        let ssrc = scramble(self.seed ^ ((conf as u32 as u64) << 32) ^ id as u64) as u32;
        let new = dataplane::NewParticipant { conf, id, codec, payload_type, ssrc, remote, sockets };
        if let Err(e) = self.send(worker, Command::ParticipantAdd(Box::new(new))) {
            st.alloc.untake(port);
            return Err(e);
        }
        if let Some(c) = st.confs.get_mut(&conf) {
            c.participants.insert(id, PartRecord { port, codec, payload_type, remote });
        }
        Ok(ParticipantCreated { id: format!("{id:08x}"), address: self.cfg.advertised(), rtp_port: port, payload_type })
    }

    /// Changes a participant's remote, mute or deaf.
    pub fn participant_update(
        &self,
        conf: u64,
        id: u32,
        remote: Option<Option<SocketAddr>>,
        mute: Option<bool>,
        deaf: Option<bool>,
    ) -> Result<(), Error> {
        if let Some(Some(r)) = remote {
            self.check_remote(r)?;
        }
        let mut st = lock(&self.state);
        let c = st.confs.get_mut(&conf).ok_or_else(|| Error::NotFound(format_id(conf)))?;
        let p = c.participants.get_mut(&id).ok_or_else(|| Error::NotFound(format!("{id:08x}")))?;
        if let Some(r) = remote {
            p.remote = r;
        }
        let worker = c.worker;
        self.send(worker, Command::ParticipantUpdate { conf, id, remote, mute, deaf })
    }

    /// Moves a participant to another room, keeping its ports, SSRC, sequence numbers
    /// and timestamps: it hears a gap of a tick or two, the far end a continuous stream.
    /// Rooms on different workers hand the participant's open sockets over (packets wait
    /// in them meanwhile).
    pub fn participant_move(&self, conf: u64, id: u32, to: u64) -> Result<(), Error> {
        let (from_w, to_w) = {
            let mut st = lock(&self.state);
            let target = st.confs.get(&to).ok_or_else(|| Error::NotFound(format_id(to)))?;
            if conf != to && target.participants.len() >= self.cfg.max_participants {
                return Err(Error::RoomFull(format!(
                    "conference {} is full: {} participants (max_participants)",
                    format_id(to),
                    self.cfg.max_participants
                )));
            }
            let to_w = target.worker;
            let c = st.confs.get_mut(&conf).ok_or_else(|| Error::NotFound(format_id(conf)))?;
            let from_w = c.worker;
            let p = c.participants.remove(&id).ok_or_else(|| Error::NotFound(format!("{id:08x}")))?;
            if conf == to {
                c.participants.insert(id, p);
                return Ok(());
            }
            if from_w == to_w {
                self.send(from_w, Command::ParticipantMove { conf, id, to })?;
            }
            if let Some(t) = st.confs.get_mut(&to) {
                t.participants.insert(id, p);
            }
            (from_w, to_w)
        };
        if from_w == to_w {
            return Ok(());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(from_w, Command::ParticipantDetach { conf, id, reply: tx })?;
        let p = rx
            .recv_timeout(Duration::from_secs(2))
            .map_err(|_| Error::Busy(format!("participant {id:08x} did not detach from worker {from_w}")))?;
        self.send(to_w, Command::ParticipantAttach { conf: to, p })
    }

    /// Removes (kicks) a participant.
    pub fn participant_delete(&self, conf: u64, id: u32) -> Result<(), Error> {
        let mut st = lock(&self.state);
        let c = st.confs.get_mut(&conf).ok_or_else(|| Error::NotFound(format_id(conf)))?;
        let p = c.participants.remove(&id).ok_or_else(|| Error::NotFound(format!("{id:08x}")))?;
        let worker = c.worker;
        st.releasing_parts.insert((conf, id), p.port);
        self.send(worker, Command::ParticipantRemove { conf, id })
    }

    /// A room with fresh statistics from its worker.
    pub fn conf_get(&self, conf: u64) -> Result<ConfView, Error> {
        let (worker, created, parts) = {
            let st = lock(&self.state);
            let c = st.confs.get(&conf).ok_or_else(|| Error::NotFound(format_id(conf)))?;
            (c.worker, c.created, c.participants.clone())
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let snap = match self.send(worker, Command::ConfQuery { conf, reply: tx }) {
            Ok(()) => rx.recv_timeout(Duration::from_millis(500)).ok().flatten(),
            Err(_) => None,
        };
        let mut ids: Vec<&u32> = parts.keys().collect();
        ids.sort();
        let participants = ids
            .into_iter()
            .map(|id| {
                let p = &parts[id];
                let stats = snap.as_ref().and_then(|s| s.participants.iter().find(|x| x.id == *id));
                let latched = snap.as_ref().and_then(|s| s.remotes.iter().find(|r| r.0 == *id)).and_then(|r| r.1);
                serde_json::json!({
                    "id": format!("{id:08x}"),
                    "codec": p.codec.name(),
                    "payload_type": p.payload_type,
                    "rtp_port": p.port,
                    "rtcp_port": p.port + 1,
                    "remote": p.remote,
                    "media_to": latched,
                    "stats": stats,
                })
            })
            .collect();
        Ok(ConfView {
            id: format_id(conf),
            worker,
            created,
            rate: snap.as_ref().map(|s| s.rate),
            talkers: snap.as_ref().map(|s| s.talkers),
            ticks: snap.as_ref().map(|s| s.ticks),
            late_ticks: snap.as_ref().map(|s| s.late_ticks),
            participants,
        })
    }

    /// Ids of every room.
    pub fn conf_list(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.state).confs.keys().map(|k| format_id(*k)).collect();
        v.sort();
        v
    }

    /// Stops the workers (closing every socket).
    pub fn shutdown(&self) {
        self.dp.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    }
}

fn apply_event(state: &Mutex<State>, ev: Event) {
    let mut st = lock(state);
    match ev {
        Event::Latched { id, leg, rtcp, addr, .. } => {
            if let Some(r) = st.sessions.get_mut(&id) {
                let l = &mut r.latched[leg as usize & 1];
                if rtcp {
                    l.rtcp = Some(addr);
                } else {
                    l.rtp = Some(addr);
                }
            }
        }
        Event::TimedOut { id } => {
            if let Some(r) = st.sessions.remove(&id) {
                tracing::info!(session = %format_id(id), "session timed out");
                st.releasing.insert(id, r.ports);
                st.totals.timed_out += 1;
            }
        }
        Event::Released { id } => {
            let ports = st.releasing.remove(&id).or_else(|| st.sessions.remove(&id).map(|r| r.ports));
            if let Some(ports) = ports {
                let now = Instant::now();
                for p in ports {
                    st.alloc.put(p, now);
                }
            }
        }
        Event::ParticipantReleased { conf, id } => {
            let port = st
                .releasing_parts
                .remove(&(conf, id))
                .or_else(|| st.confs.get_mut(&conf).and_then(|c| c.participants.remove(&id)).map(|p| p.port));
            if let Some(p) = port {
                st.alloc.put(p, Instant::now());
            }
        }
        Event::Stats(s) => {
            if let Some(r) = st.sessions.get_mut(&s.id) {
                for i in 0..2 {
                    r.latched[i] = Latched { rtp: s.legs[i].rtp.latched, rtcp: s.legs[i].rtcp.latched };
                }
                r.last = Some(*s);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        let ids: std::collections::HashSet<_> = (0..10_000u64).map(scramble).collect();
        assert_eq!(ids.len(), 10_000);
        let id = scramble(42);
        assert_eq!(parse_id(&format_id(id)), Some(id));
        assert_eq!(parse_id("xyz"), None);
        assert_eq!(parse_id("000000000000000g"), None);
    }
}
