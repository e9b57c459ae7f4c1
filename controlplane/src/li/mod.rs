//! Lawful interception: tasks provisioned over a separate, separately authenticated
//! API (X1-like), media copied by the data plane and delivered as X3 PDUs, signalling
//! delivered as X2 PDUs through a hook the SIP proxy calls.
//!
//! Nothing here is visible through the session API or the relay's metrics: whether a
//! session is tapped lives only in this module and the worker's session table.
//!
//! Every change of tasks is written ahead: its audit record, then the task state file,
//! both fsync'd, and only then does it take effect; if either cannot be written the
//! change is refused and nothing is tapped. Tasks are read back from the state file when
//! LI starts, before the node serves calls.

pub mod api;
pub mod audit;
pub mod delivery;
pub mod error;
pub mod pdu;
pub mod store;
pub mod tasks;

pub use error::Error;

use crate::relay::calls::Calls;
use crate::relay::{format_id, parse_id, Relay};
use audit::AuditLog;
use dataplane::{SessionId, TapCounters, TapRecord, TapSpec};
use delivery::{Delivery, PcapWriter};
use pdu::{direction, format, Meta, PduType};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::TaskStore;
use tasks::{Target, Task, TaskPatch};

/// Tasks one node holds.
pub const MAX_TASKS: usize = 1000;
/// Targets of one task (a load test puts thousands of sessions under one task).
pub const MAX_TARGETS_PER_TASK: usize = 10_000;
/// Destinations of one task.
pub const MAX_DESTINATIONS_PER_TASK: usize = 8;
/// Distinct destinations over all tasks: each has a writer thread and a buffer of up to
/// `buffer_bytes`, so this bounds LI's memory.
pub const MAX_DESTINATIONS: usize = 64;
/// Calls of AOR targets tracked from signalling. Past it, the oldest call with no media
/// is forgotten (a flood of forged messages naming a target cannot push its real,
/// anchored calls out).
pub const MAX_AOR_CALLS: usize = 10_000;
/// Seconds a call of an AOR target with no media stream is remembered after its last
/// SIP message.
pub const AOR_CALL_IDLE_SECS: u64 = 600;
/// Seconds an ended task stays listed (inactive) before it is removed, with an `expire`
/// audit record.
pub const ENDED_RETENTION_SECS: u64 = 3600;

/// Where LI keeps its files and how much it buffers.
#[derive(Debug, Clone)]
pub struct LiConfig {
    /// The append-only audit log.
    pub audit_log: PathBuf,
    /// The task state file (see [`store::default_path`]).
    pub state: PathBuf,
    /// Bytes buffered per mediation function while it is slow or away.
    pub buffer_bytes: usize,
}

impl LiConfig {
    /// The audit log at `audit_log`, the task state next to it, the default buffer.
    pub fn new(audit_log: impl Into<PathBuf>) -> Self {
        let audit_log = audit_log.into();
        Self { state: store::default_path(&audit_log), audit_log, buffer_bytes: 8 << 20 }
    }
}

/// Lowers the calling thread's scheduling priority: interception work must yield to
/// forwarding when a core is contended (it buffers, then drops and counts).
pub(crate) fn lower_priority() {
    // SAFETY: setpriority on our own thread id.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// Correlation id of a call: a stable hash of its Call-ID, so its media and signalling
/// PDUs carry the same one wherever they are produced.
pub fn correlation_of(call_id: &str) -> u64 {
    // FNV-1a 64.
    call_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// A SIP message of a call, for X2.
#[derive(Debug, Clone)]
pub struct SipEvent<'a> {
    /// Call-ID.
    pub call_id: &'a str,
    /// The From AOR (`user@domain`).
    pub from_aor: &'a str,
    /// The To AOR.
    pub to_aor: &'a str,
    /// True when the caller's side (From) sent this message.
    pub from_caller: bool,
    /// Where it came from.
    pub src: SocketAddr,
    /// Where it went.
    pub dst: SocketAddr,
    /// The message as on the wire.
    pub message: &'a [u8],
}

#[derive(Debug)]
struct Entry {
    task: Task,
    xid: [u8; 16],
    seq: u32,
    pcap: Option<PcapWriter>,
    delivered_x2: u64,
    delivered_x3: u64,
}

/// A call of an AOR target, learnt from its signalling.
#[derive(Debug)]
struct AorCall {
    /// The task.
    task: String,
    /// The target's leg (0 caller, 1 callee).
    leg: u8,
    /// Unix seconds of its last SIP message.
    seen: u64,
}

#[derive(Debug, Default)]
struct State {
    tasks: BTreeMap<String, Entry>,
    /// Taps in force, per relay session.
    applied: HashMap<SessionId, TapSpec>,
    /// Calls of AOR targets seen in signalling, by Call-ID (at most [`MAX_AOR_CALLS`]).
    aor_calls: HashMap<String, AorCall>,
    /// `aor_calls`' keys in the order they came: who is forgotten first when it is full.
    aor_order: VecDeque<String>,
}

/// The LI function of one relay.
pub struct Li {
    relay: Arc<Relay>,
    calls: Arc<Calls>,
    state: Mutex<State>,
    /// Serialises changes of tasks: each runs audit, save and apply as one step, and
    /// the save writes the task list as it is under this lock.
    admin: Mutex<()>,
    delivery: Delivery,
    audit: AuditLog,
    store: TaskStore,
    taps: Arc<TapCounters>,
    x2_events: AtomicU64,
    aor_calls_forgotten: AtomicU64,
    aor_calls_refused: AtomicU64,
    wake: crossbeam_channel::Sender<()>,
}

impl std::fmt::Debug for Li {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Li").field("audit", &self.audit.path()).field("state", &self.store.path()).finish()
    }
}

/// Who acts when hasp itself changes tasks (expiry, reinstatement).
const SYSTEM: &str = "hasp";

impl Li {
    /// Starts LI over a relay: reads back the saved tasks (before anything can tap or
    /// the node serve a call), then starts the dispatcher that turns tapped packets into
    /// X3 PDUs and the reconciler that keeps taps in line with tasks (every second, and
    /// at once on any change or new media stream).
    ///
    /// Fails if the audit log cannot be opened or the state file exists but cannot be
    /// read: starting without its tasks would end their interceptions silently.
    pub fn start(relay: Arc<Relay>, calls: Arc<Calls>, cfg: &LiConfig) -> Result<Arc<Self>, Error> {
        let audit = AuditLog::open(&cfg.audit_log).map_err(|e| {
            Error::Io(std::io::Error::new(e.kind(), format!("LI audit log {}: {e}", cfg.audit_log.display())))
        })?;
        let store = TaskStore::new(&cfg.state);
        let mut state = State::default();
        for task in store.load()? {
            let xid = tasks::parse_uuid(&task.xid).ok_or_else(|| Error::StateUnreadable {
                path: cfg.state.display().to_string(),
                reason: format!("xid {:?} is not a UUID", task.xid),
            })?;
            // The pcap is a convenience copy: a task whose file cannot be reopened still
            // delivers to its mediation functions.
            let pcap = task.pcap.as_deref().and_then(|p| match PcapWriter::reopen(p) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(error = %e, "LI: cannot reopen a reinstated task's pcap file");
                    None
                }
            });
            state.tasks.insert(task.xid.clone(), Entry { task, xid, seq: 0, pcap, delivered_x2: 0, delivered_x3: 0 });
        }
        if !state.tasks.is_empty() {
            let xids: Vec<&String> = state.tasks.keys().collect();
            let detail = serde_json::json!({ "tasks": xids, "state": cfg.state.display().to_string() });
            // These tasks were audited when they were activated; this record says they
            // are in force again (and settles any change whose outcome was never written).
            if let Err(e) = audit.record(SYSTEM, "reinstate", None, "ok", Some(&detail)) {
                tracing::error!(error = %e, "LI audit log: cannot record the reinstated tasks");
            }
        }
        let (wake, woken) = crossbeam_channel::bounded(1);
        let li = Arc::new(Self {
            taps: relay.tap_counters(),
            relay,
            calls,
            state: Mutex::new(state),
            admin: Mutex::new(()),
            delivery: Delivery::new(cfg.buffer_bytes),
            audit,
            store,
            x2_events: AtomicU64::new(0),
            aor_calls_forgotten: AtomicU64::new(0),
            aor_calls_refused: AtomicU64::new(0),
            wake,
        });
        let rx = li.relay.tap_receiver();
        let d = Arc::downgrade(&li);
        std::thread::Builder::new().name("hasp-li-x3".into()).spawn(move || {
            // Polled, never blocked on: a worker's try_send then never has a sleeping
            // receiver to wake, so tapping costs the packet path no syscall.
            lower_priority();
            let mut pending: HashMap<tasks::Destination, Vec<Vec<u8>>> = HashMap::new();
            loop {
                let Some(li) = d.upgrade() else { return };
                let mut n = 0;
                {
                    let mut st = li.lock();
                    while n < 4096 {
                        match rx.try_recv() {
                            Ok(rec) => li.deliver_x3(&mut st, &rec, &mut pending),
                            Err(crossbeam_channel::TryRecvError::Empty) => break,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                        }
                        n += 1;
                    }
                }
                for (addr, pdus) in pending.drain() {
                    li.delivery.send_many(&addr, pdus);
                }
                drop(li);
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })?;
        let r = Arc::downgrade(&li);
        std::thread::Builder::new().name("hasp-li-sync".into()).spawn(move || loop {
            let _ = woken.recv_timeout(Duration::from_secs(1));
            let Some(li) = r.upgrade() else { return };
            li.reconcile();
            li.expire(unix_now());
            li.audit.flush_denied();
        })?;
        let w = li.wake.clone();
        li.calls.set_stream_hook(Box::new(move || {
            let _ = w.try_send(());
        }));
        li.reconcile();
        Ok(li)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admin(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// A change refused before it took any effect: one complete audit record. If even
    /// that cannot be written the answer says so (the request is refused either way).
    fn refused(
        &self,
        who: &str,
        action: &str,
        xid: Option<&str>,
        detail: Option<&serde_json::Value>,
        e: Error,
    ) -> Error {
        match self.audit.record(who, action, xid, e.code(), detail) {
            Ok(()) => e,
            Err(io) => Error::Audit(io),
        }
    }

    /// A change that failed after its intent was written, before it took effect.
    fn failed(&self, req: &str, who: &str, action: &str, xid: &str, e: Error) -> Error {
        if let Err(io) = self.audit.outcome(req, who, action, Some(xid), e.code()) {
            // The log keeps a `pending` intent with no outcome: read as "may have taken
            // effect", which over-states, never hides, an interception.
            tracing::error!(error = %io, "LI audit log: cannot record a failed change");
        }
        e
    }

    /// The task list with `xid` replaced by `task` (or removed when `None`), saved.
    fn save_with(&self, xid: &str, task: Option<&Task>) -> std::io::Result<()> {
        // Snapshot under the state lock, fsync without it: the X2 hook and the X3
        // dispatcher take that lock and must not wait for a disk.
        let mut all: Vec<Task> = self.lock().tasks.values().map(|e| e.task.clone()).filter(|t| t.xid != xid).collect();
        all.extend(task.cloned());
        self.store.save(&all.iter().collect::<Vec<_>>())
    }

    /// Checks the bounds on targets and destinations for `task` replacing (or joining)
    /// the tasks in `st`.
    fn check_bounds(st: &State, task: &Task) -> Result<(), Error> {
        if task.targets.len() > MAX_TARGETS_PER_TASK {
            return Err(Error::Limit(format!("a task has at most {MAX_TARGETS_PER_TASK} targets")));
        }
        if task.destinations.len() > MAX_DESTINATIONS_PER_TASK {
            return Err(Error::Limit(format!("a task has at most {MAX_DESTINATIONS_PER_TASK} destinations")));
        }
        let mut dests: HashSet<&tasks::Destination> =
            st.tasks.values().filter(|e| e.task.xid != task.xid).flat_map(|e| e.task.destinations.iter()).collect();
        dests.extend(task.destinations.iter());
        if dests.len() > MAX_DESTINATIONS {
            return Err(Error::Limit(format!("at most {MAX_DESTINATIONS} distinct destinations over all tasks")));
        }
        Ok(())
    }

    /// Activates a task; it taps at once (before the next packet of each target).
    ///
    /// Write-ahead: the intent is audited and the task saved (both fsync'd) before it
    /// takes effect; if either fails it is refused and nothing is tapped. `who` and
    /// `detail` (the request) go into the audit log.
    pub fn create(&self, who: &str, task: Task, detail: Option<&serde_json::Value>) -> Result<Task, Error> {
        const ACTION: &str = "activate";
        let _admin = self.admin();
        let checked = task.validate().map_err(Error::Invalid).and_then(|xid| {
            let st = self.lock();
            if st.tasks.contains_key(&task.xid) {
                return Err(Error::Conflict(format!("task {} exists", task.xid)));
            }
            if st.tasks.len() >= MAX_TASKS {
                return Err(Error::Limit(format!("at most {MAX_TASKS} tasks")));
            }
            Self::check_bounds(&st, &task).map(|()| xid)
        });
        let xid = match checked {
            Ok(x) => x,
            Err(e) => return Err(self.refused(who, ACTION, Some(&task.xid), detail, e)),
        };
        let req = self.audit.intent(who, ACTION, Some(&task.xid), detail).map_err(Error::Audit)?;
        let pcap = match &task.pcap {
            Some(p) => match PcapWriter::create(p) {
                Ok(w) => Some(w),
                Err(e) => {
                    return Err(self.failed(&req, who, ACTION, &task.xid, Error::Invalid(format!("pcap {p}: {e}"))))
                }
            },
            None => None,
        };
        if let Err(e) = self.save_with(&task.xid, Some(&task)) {
            return Err(self.failed(&req, who, ACTION, &task.xid, Error::State(e)));
        }
        self.lock().tasks.insert(
            task.xid.clone(),
            Entry { task: task.clone(), xid, seq: 0, pcap, delivered_x2: 0, delivered_x3: 0 },
        );
        self.reconcile();
        self.audit.outcome(&req, who, ACTION, Some(&task.xid), "ok").map_err(Error::AuditIncomplete)?;
        Ok(task)
    }

    /// Changes a task, write-ahead as [`Li::create`].
    pub fn modify(
        &self,
        who: &str,
        xid: &str,
        patch: TaskPatch,
        detail: Option<&serde_json::Value>,
    ) -> Result<Task, Error> {
        const ACTION: &str = "modify";
        let _admin = self.admin();
        // The task cannot change under us (changes hold `admin`); validation reads TLS
        // files, so it runs without the state lock.
        let current = self.lock().tasks.get(xid).map(|e| e.task.clone());
        let checked = current.ok_or_else(|| Error::NotFound(format!("no task {xid}"))).and_then(|mut t| {
            if let Some(v) = patch.targets {
                t.targets = v;
            }
            if let Some(v) = patch.destinations {
                t.destinations = v;
            }
            if patch.start.is_some() {
                t.start = patch.start;
            }
            if patch.end.is_some() {
                t.end = patch.end;
            }
            t.validate().map_err(Error::Invalid)?;
            Self::check_bounds(&self.lock(), &t)?;
            Ok(t)
        });
        let task = match checked {
            Ok(t) => t,
            Err(e) => return Err(self.refused(who, ACTION, Some(xid), detail, e)),
        };
        let req = self.audit.intent(who, ACTION, Some(xid), detail).map_err(Error::Audit)?;
        if let Err(e) = self.save_with(xid, Some(&task)) {
            return Err(self.failed(&req, who, ACTION, xid, Error::State(e)));
        }
        if let Some(e) = self.lock().tasks.get_mut(xid) {
            e.task = task.clone();
        }
        self.reconcile();
        self.audit.outcome(&req, who, ACTION, Some(xid), "ok").map_err(Error::AuditIncomplete)?;
        Ok(task)
    }

    /// Deactivates and removes a task, write-ahead as [`Li::create`] (a task whose
    /// removal cannot be audited or saved stays in force); tapping stops before the
    /// next packet.
    pub fn delete(&self, who: &str, xid: &str) -> Result<(), Error> {
        const ACTION: &str = "deactivate";
        let _admin = self.admin();
        if !self.lock().tasks.contains_key(xid) {
            return Err(self.refused(who, ACTION, Some(xid), None, Error::NotFound(format!("no task {xid}"))));
        }
        let req = self.audit.intent(who, ACTION, Some(xid), None).map_err(Error::Audit)?;
        if let Err(e) = self.save_with(xid, None) {
            return Err(self.failed(&req, who, ACTION, xid, Error::State(e)));
        }
        self.lock().tasks.remove(xid);
        self.reconcile();
        self.audit.outcome(&req, who, ACTION, Some(xid), "ok").map_err(Error::AuditIncomplete)?;
        Ok(())
    }

    /// Removes tasks that ended more than [`ENDED_RETENTION_SECS`] before `now`, each
    /// audited (`expire`, by `hasp`) and saved first; one that cannot be is kept (it is
    /// inactive anyway) and tried again on the next pass.
    pub fn expire(&self, now: u64) {
        const ACTION: &str = "expire";
        let _admin = self.admin();
        let ended: Vec<(String, u64)> = self
            .lock()
            .tasks
            .values()
            .filter_map(|e| {
                let end = e.task.end.filter(|end| end.saturating_add(ENDED_RETENTION_SECS) <= now)?;
                Some((e.task.xid.clone(), end))
            })
            .collect();
        for (xid, end) in ended {
            let detail = serde_json::json!({ "end": end });
            let Ok(req) = self.audit.intent(SYSTEM, ACTION, Some(&xid), Some(&detail)) else {
                tracing::error!("LI audit log: cannot record the expiry of a task; kept for now");
                return;
            };
            if let Err(e) = self.save_with(&xid, None) {
                let _ = self.failed(&req, SYSTEM, ACTION, &xid, Error::State(e));
                return;
            }
            self.lock().tasks.remove(&xid);
            if let Err(e) = self.audit.outcome(&req, SYSTEM, ACTION, Some(&xid), "ok") {
                tracing::error!(error = %e, "LI audit log: cannot record the outcome of an expiry");
            }
        }
    }

    /// Every task, with whether it is active now and what it delivered.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let now = unix_now();
        let st = self.lock();
        st.tasks.values().map(|e| task_json(e, now)).collect()
    }

    /// One task.
    pub fn get(&self, xid: &str) -> Option<serde_json::Value> {
        let st = self.lock();
        st.tasks.get(xid).map(|e| task_json(e, unix_now()))
    }

    /// Delivery and tap counters (for LI administrators only).
    pub fn stats(&self) -> serde_json::Value {
        let dests: Vec<_> = self
            .delivery
            .stats()
            .into_iter()
            .map(|(a, v)| serde_json::json!({"tcp": a.to_string(), "stats": v}))
            .collect();
        let (tapped, tasks, aor_calls) = {
            let st = self.lock();
            (st.applied.len(), st.tasks.len(), st.aor_calls.len())
        };
        serde_json::json!({
            "tasks": tasks,
            "tapped_sessions": tapped,
            "packets_copied": self.taps.copied.load(Relaxed),
            "packets_dropped_queue_full": self.taps.queue_full.load(Relaxed),
            "x2_events": self.x2_events.load(Relaxed),
            "aor_calls": aor_calls,
            "aor_calls_forgotten": self.aor_calls_forgotten.load(Relaxed),
            "aor_calls_refused": self.aor_calls_refused.load(Relaxed),
            "denied_suppressed": self.audit.suppressed_total(),
            "destinations": dests,
        })
    }

    /// Brings the data plane's taps in line with the active tasks, and forgets calls of
    /// AOR targets that have neither media nor recent signalling.
    pub fn reconcile(&self) {
        let now = unix_now();
        let mut st = self.lock();
        let mut want: HashMap<SessionId, TapSpec> = HashMap::new();
        let mut dests = Vec::new();
        for e in st.tasks.values() {
            dests.extend(e.task.destinations.iter().cloned());
            if !e.task.active_at(now) {
                continue;
            }
            for t in &e.task.targets {
                match t {
                    Target::Session(s) => {
                        if let Some(id) = parse_id(s).filter(|id| self.relay.exists(*id)) {
                            let correlation = self.calls.call_of(id).map_or(id, |c| correlation_of(&c));
                            want.insert(id, TapSpec { xid: e.xid, correlation, target_leg: 0 });
                        }
                    }
                    Target::CallId(c) => {
                        for id in self.calls.sessions_of(c) {
                            want.insert(id, TapSpec { xid: e.xid, correlation: correlation_of(c), target_leg: 0 });
                        }
                    }
                    Target::Aor(_) => {
                        for (c, a) in &st.aor_calls {
                            if a.task == e.task.xid {
                                for id in self.calls.sessions_of(c) {
                                    want.insert(
                                        id,
                                        TapSpec { xid: e.xid, correlation: correlation_of(c), target_leg: a.leg },
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut changes: Vec<(SessionId, Option<TapSpec>)> = Vec::new();
        for (id, spec) in &want {
            if st.applied.get(id) != Some(spec) {
                changes.push((*id, Some(*spec)));
            }
        }
        for id in st.applied.keys() {
            if !want.contains_key(id) {
                changes.push((*id, None));
            }
        }
        for (id, spec) in changes {
            match self.relay.set_tap(id, spec) {
                Ok(()) => {
                    match spec {
                        Some(s) => st.applied.insert(id, s),
                        None => st.applied.remove(&id),
                    };
                }
                // Gone meanwhile: forget it; otherwise retried on the next pass.
                Err(crate::error::Error::NotFound(_)) => {
                    st.applied.remove(&id);
                }
                Err(e) => tracing::warn!(session = %format_id(id), error = %e, "cannot change tap"),
            }
        }
        let State { tasks, aor_calls, aor_order, .. } = &mut *st;
        aor_calls.retain(|c, a| {
            tasks.contains_key(&a.task)
                && (a.seen.saturating_add(AOR_CALL_IDLE_SECS) > now || !self.calls.sessions_of(c).is_empty())
        });
        aor_order.retain(|c| aor_calls.contains_key(c));
        drop(st);
        self.delivery.retain(&dests);
    }

    fn deliver_x3(&self, st: &mut State, rec: &TapRecord, out: &mut HashMap<tasks::Destination, Vec<Vec<u8>>>) {
        let Some(e) = st.tasks.values_mut().find(|e| e.xid == rec.xid) else { return };
        e.seq = e.seq.wrapping_add(1);
        let meta = Meta {
            pdu_type: PduType::X3,
            payload_format: format::RTP,
            direction: if rec.from_target { direction::FROM_TARGET } else { direction::TO_TARGET },
            xid: rec.xid,
            correlation: rec.correlation,
            sequence: e.seq,
            at: rec.at,
            src: rec.src,
            dst: rec.dst,
            ip_protocol: 17,
        };
        let mut pdu = Vec::with_capacity(96 + rec.len as usize);
        pdu::encode(&mut pdu, &meta, rec.bytes());
        if let Some(p) = &mut e.pcap {
            p.write(rec.at, rec.src, rec.dst, rec.bytes());
        }
        e.delivered_x3 += 1;
        let n = e.task.destinations.len();
        for (i, d) in e.task.destinations.iter().enumerate() {
            let p = if i + 1 == n { std::mem::take(&mut pdu) } else { pdu.clone() };
            out.entry(d.clone()).or_default().push(p);
        }
    }

    /// Makes room in a full `aor_calls` by forgetting the oldest call with no media
    /// stream; a call with media is moved to the back instead (it is real and live).
    /// False when every call looked at has media: the new call is then not tracked.
    fn make_room(&self, aor_calls: &mut HashMap<String, AorCall>, order: &mut VecDeque<String>) -> bool {
        for _ in 0..8 {
            let Some(c) = order.pop_front() else { return false };
            if !aor_calls.contains_key(&c) {
                continue;
            }
            if self.calls.sessions_of(&c).is_empty() {
                aor_calls.remove(&c);
                self.aor_calls_forgotten.fetch_add(1, Relaxed);
                return true;
            }
            order.push_back(c);
        }
        false
    }

    /// The X2 hook: the SIP proxy calls it for every message of every call; messages
    /// of a target (by AOR or Call-ID) are delivered, and an AOR target's call has its
    /// media tapped from then on.
    pub fn sip_event(&self, ev: &SipEvent<'_>) {
        let now = unix_now();
        let mut st = self.lock();
        let mut new_call = false;
        let State { tasks, aor_calls, aor_order, .. } = &mut *st;
        for e in tasks.values_mut() {
            if !e.task.active_at(now) {
                continue;
            }
            // Which side is the target: the caller (From) or the callee (To)?
            let target_is_caller = e.task.targets.iter().find_map(|t| match t {
                Target::CallId(c) if c == ev.call_id => Some(true),
                Target::Aor(a) if a.eq_ignore_ascii_case(ev.from_aor) => Some(true),
                Target::Aor(a) if a.eq_ignore_ascii_case(ev.to_aor) => Some(false),
                _ => None,
            });
            let Some(target_is_caller) = target_is_caller else { continue };
            if e.task.targets.iter().any(|t| matches!(t, Target::Aor(_))) {
                if let Some(a) = aor_calls.get_mut(ev.call_id) {
                    a.seen = now;
                } else if aor_calls.len() < MAX_AOR_CALLS || self.make_room(aor_calls, aor_order) {
                    aor_calls.insert(
                        ev.call_id.to_string(),
                        AorCall { task: e.task.xid.clone(), leg: if target_is_caller { 0 } else { 1 }, seen: now },
                    );
                    aor_order.push_back(ev.call_id.to_string());
                    new_call = true;
                } else {
                    self.aor_calls_refused.fetch_add(1, Relaxed);
                }
            }
            e.seq = e.seq.wrapping_add(1);
            let meta = Meta {
                pdu_type: PduType::X2,
                payload_format: format::SIP,
                direction: if ev.from_caller == target_is_caller {
                    direction::FROM_TARGET
                } else {
                    direction::TO_TARGET
                },
                xid: e.xid,
                correlation: correlation_of(ev.call_id),
                sequence: e.seq,
                at: SystemTime::now(),
                src: ev.src,
                dst: ev.dst,
                ip_protocol: 17,
            };
            let mut pdu = Vec::with_capacity(96 + ev.message.len());
            pdu::encode(&mut pdu, &meta, ev.message);
            e.delivered_x2 += 1;
            self.x2_events.fetch_add(1, Relaxed);
            for d in &e.task.destinations {
                self.delivery.send(d, pdu.clone());
            }
        }
        drop(st);
        if new_call {
            let _ = self.wake.try_send(());
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn task_json(e: &Entry, now: u64) -> serde_json::Value {
    let mut v = serde_json::to_value(&e.task).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("active".into(), e.task.active_at(now).into());
        o.insert("x2_pdus".into(), e.delivered_x2.into());
        o.insert("x3_pdus".into(), e.delivered_x3.into());
        if let Some(p) = &e.pcap {
            o.insert("pcap_dropped".into(), p.dropped().into());
        }
    }
    v
}
