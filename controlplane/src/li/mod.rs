//! Lawful interception: tasks provisioned over a separate, separately authenticated
//! API (X1-like), media copied by the data plane and delivered as X3 PDUs, signalling
//! delivered as X2 PDUs through a hook the SIP proxy calls.
//!
//! Nothing here is visible through the session API or the relay's metrics: whether a
//! session is tapped lives only in this module and the worker's session table.

pub mod api;
pub mod audit;
pub mod delivery;
pub mod pdu;
pub mod tasks;

use crate::error::Error;
use crate::relay::calls::Calls;
use crate::relay::{format_id, parse_id, Relay};
use audit::AuditLog;
use dataplane::{SessionId, TapCounters, TapRecord, TapSpec};
use delivery::{Delivery, PcapWriter};
use pdu::{direction, format, Meta, PduType};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tasks::{Target, Task, TaskPatch};

/// Correlation id of a call: a stable hash of its Call-ID, so its media and signalling
/// PDUs carry the same one wherever they are produced.
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

#[derive(Debug, Default)]
struct State {
    tasks: BTreeMap<String, Entry>,
    /// Taps in force, per relay session.
    applied: HashMap<SessionId, TapSpec>,
    /// Calls of AOR targets seen in signalling: Call-ID → (task, target's leg).
    aor_calls: HashMap<String, (String, u8)>,
}

/// The LI function of one relay.
pub struct Li {
    relay: Arc<Relay>,
    calls: Arc<Calls>,
    state: Mutex<State>,
    delivery: Delivery,
    audit: AuditLog,
    taps: Arc<TapCounters>,
    x2_events: AtomicU64,
    wake: crossbeam_channel::Sender<()>,
}

impl std::fmt::Debug for Li {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Li").field("audit", &self.audit.path()).finish()
    }
}

impl Li {
    /// Starts LI over a relay: the dispatcher that turns tapped packets into X3 PDUs,
    /// and the reconciler that keeps taps in line with tasks (every second, and at
    /// once on any change or new media stream).
    pub fn start(relay: Arc<Relay>, calls: Arc<Calls>, audit: &Path, buffer_bytes: usize) -> Result<Arc<Self>, Error> {
        let audit = AuditLog::open(audit)?;
        let (wake, woken) = crossbeam_channel::bounded(1);
        let li = Arc::new(Self {
            taps: relay.tap_counters(),
            relay,
            calls,
            state: Mutex::new(State::default()),
            delivery: Delivery::new(buffer_bytes),
            audit,
            x2_events: AtomicU64::new(0),
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
        })?;
        let w = li.wake.clone();
        li.calls.set_stream_hook(Box::new(move || {
            let _ = w.try_send(());
        }));
        Ok(li)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Activates a task; it taps at once (before the next packet of each target).
    pub fn create(&self, task: Task) -> Result<Task, Error> {
        let xid = task.validate().map_err(Error::Invalid)?;
        let pcap = match &task.pcap {
            Some(p) => Some(PcapWriter::create(p).map_err(|e| Error::Invalid(format!("pcap {p}: {e}")))?),
            None => None,
        };
        {
            let mut st = self.lock();
            if st.tasks.contains_key(&task.xid) {
                return Err(Error::Conflict(format!("task {} exists", task.xid)));
            }
            st.tasks.insert(
                task.xid.clone(),
                Entry { task: task.clone(), xid, seq: 0, pcap, delivered_x2: 0, delivered_x3: 0 },
            );
        }
        self.reconcile();
        Ok(task)
    }

    /// Changes a task.
    pub fn modify(&self, xid: &str, patch: TaskPatch) -> Result<Task, Error> {
        let task = {
            let mut st = self.lock();
            let e = st.tasks.get_mut(xid).ok_or_else(|| Error::NotFound(format!("task {xid}")))?;
            let mut t = e.task.clone();
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
            e.task = t.clone();
            t
        };
        self.reconcile();
        Ok(task)
    }

    /// Deactivates and removes a task; tapping stops before the next packet.
    pub fn delete(&self, xid: &str) -> Result<(), Error> {
        let removed = self.lock().tasks.remove(xid);
        removed.ok_or_else(|| Error::NotFound(format!("task {xid}")))?;
        self.reconcile();
        Ok(())
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
        serde_json::json!({
            "tapped_sessions": self.lock().applied.len(),
            "packets_copied": self.taps.copied.load(Relaxed),
            "packets_dropped_queue_full": self.taps.queue_full.load(Relaxed),
            "x2_events": self.x2_events.load(Relaxed),
            "destinations": dests,
        })
    }

    /// Brings the data plane's taps in line with the active tasks.
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
                        for (c, (x, leg)) in &st.aor_calls {
                            if *x == e.task.xid {
                                for id in self.calls.sessions_of(c) {
                                    want.insert(
                                        id,
                                        TapSpec { xid: e.xid, correlation: correlation_of(c), target_leg: *leg },
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
                Err(Error::NotFound(_)) => {
                    st.applied.remove(&id);
                }
                Err(e) => tracing::warn!(session = %format_id(id), error = %e, "cannot change tap"),
            }
        }
        let live: Vec<String> = st.tasks.keys().cloned().collect();
        st.aor_calls.retain(|_, (x, _)| live.contains(x));
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

    /// The X2 hook: the SIP proxy calls it for every message of every call; messages
    /// of a target (by AOR or Call-ID) are delivered, and an AOR target's call has its
    /// media tapped from then on.
    pub fn sip_event(&self, ev: &SipEvent<'_>) {
        let now = unix_now();
        let mut st = self.lock();
        let mut new_call = false;
        let State { tasks, aor_calls, .. } = &mut *st;
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
            if e.task.targets.iter().any(|t| matches!(t, Target::Aor(_))) && !aor_calls.contains_key(ev.call_id) {
                aor_calls.insert(ev.call_id.to_string(), (e.task.xid.clone(), if target_is_caller { 0 } else { 1 }));
                new_call = true;
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
    }
    v
}
