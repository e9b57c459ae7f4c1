//! The in-process backend: members of one process (`hasp up`) or of one simulation.
//! The same lease rules as etcd — a member not renewed within its TTL is gone — kept in
//! a sans-IO [`Table`] driven by an injected clock, so simulations expire members
//! without sleeping.

use super::{Campaign, Load, Member, Membership, Registration, Role, View, RENEW_EVERY};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Where the backend reads the time leases run against.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    /// The monotonic system clock.
    pub fn system() -> Self {
        Self(Arc::new(Instant::now))
    }

    /// A clock reading whatever `f` says (a simulation's).
    pub fn from_fn(f: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Now.
    pub fn now(&self) -> Instant {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// Which join of a member a registration made: a restarted member (same role and id)
/// replaces the entry, and the old registration's renewals and leave must not touch
/// the new one.
pub type Generation = u64;

/// Live members with lease deadlines. Sans-IO: every call takes `now`.
#[derive(Debug, Default)]
pub struct Table {
    members: BTreeMap<(Role, String), (Member, Instant, Generation)>,
    revision: u64,
}

impl Table {
    /// Adds or replaces a member whose lease runs until `now + ttl`; returns the
    /// generation of this join.
    pub fn join(&mut self, member: Member, now: Instant, ttl: Duration) -> Generation {
        self.revision += 1;
        self.members.insert((member.role, member.id.clone()), (member, now + ttl, self.revision));
        self.revision
    }

    /// Renews the lease of join `generation` and sets its load; false if that join is
    /// no longer there (its lease ran out, or a newer join replaced it).
    pub fn renew(
        &mut self,
        role: Role,
        id: &str,
        generation: Generation,
        load: Load,
        now: Instant,
        ttl: Duration,
    ) -> bool {
        match self.members.get_mut(&(role, id.to_string())) {
            Some((m, deadline, g)) if *g == generation && *deadline > now => {
                *deadline = now + ttl;
                if m.load != load {
                    m.load = load;
                    self.revision += 1;
                }
                true
            }
            _ => false,
        }
    }

    /// Whether join `generation` was replaced by a newer one.
    pub fn replaced(&self, role: Role, id: &str, generation: Generation) -> bool {
        self.members.get(&(role, id.to_string())).is_some_and(|(_, _, g)| *g != generation)
    }

    /// Removes join `generation` of a member; true if it was there.
    pub fn leave(&mut self, role: Role, id: &str, generation: Generation) -> bool {
        let key = (role, id.to_string());
        if self.members.get(&key).is_some_and(|(_, _, g)| *g == generation) {
            self.members.remove(&key);
            self.revision += 1;
            return true;
        }
        false
    }

    /// Removes every member whose lease ended at or before `now`; true if any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.members.len();
        self.members.retain(|_, (_, deadline, _)| *deadline > now);
        let changed = self.members.len() != before;
        if changed {
            self.revision += 1;
        }
        changed
    }

    /// The earliest lease deadline, when the next expiry check is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.members.values().map(|(_, d, _)| *d).min()
    }

    /// The live members.
    pub fn view(&self) -> View {
        View { revision: self.revision, members: self.members.values().map(|(m, _, _)| m.clone()).collect() }
    }
}

/// Campaigners per name, in arrival order: the first holds it.
type Queues = BTreeMap<String, Vec<(u64, watch::Sender<bool>)>>;

/// The in-process membership backend.
#[derive(Debug)]
pub struct Local {
    table: Arc<Mutex<Table>>,
    elections: Arc<Mutex<(u64, Queues)>>,
    tx: Arc<watch::Sender<View>>,
    clock: Clock,
    ttl: Duration,
}

impl Local {
    /// An empty membership whose leases last `ttl` by `clock`.
    pub fn new(clock: Clock, ttl: Duration) -> Self {
        Self {
            table: Arc::default(),
            elections: Arc::default(),
            tx: Arc::new(watch::channel(View::default()).0),
            clock,
            ttl,
        }
    }

    /// Expires members whose lease ended by the clock now and publishes the change.
    /// The renewal tasks call it every second; a simulation calls it after moving its
    /// clock.
    pub fn tick(&self) {
        let now = self.clock.now();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.expire(now) {
            publish(&self.tx, &t);
        }
    }
}

fn publish(tx: &watch::Sender<View>, t: &Table) {
    let v = t.view();
    tx.send_if_modified(|cur| {
        if cur.revision == v.revision {
            return false;
        }
        *cur = v;
        true
    });
}

impl Membership for Local {
    fn register(&self, member: Member) -> Registration {
        let (reg, ends) = Registration::channel(member.load);
        let super::RenewalEnds { load: mut load_rx, leave: mut leave_rx, left } = ends;
        let (role, id) = (member.role, member.id.clone());
        let mut generation = {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let g = t.join(member.clone(), self.clock.now(), self.ttl);
            publish(&self.tx, &t);
            g
        };
        let (table, tx, clock, ttl) = (self.table.clone(), self.tx.clone(), self.clock.clone(), self.ttl);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RENEW_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    // A load update is published at once, not at the next renewal: in one
                    // process it costs nothing.
                    r = load_rx.changed() => if r.is_err() { break },
                    _ = &mut leave_rx => break,
                }
                let now = clock.now();
                let load = *load_rx.borrow_and_update();
                let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
                t.expire(now);
                if t.replaced(role, &id, generation) {
                    // A newer registration of the same member took over: this one is
                    // done, without removing it.
                    drop(t);
                    let _ = left.send(());
                    return;
                }
                if !t.renew(role, &id, generation, load, now, ttl) {
                    // Our lease ran out (the process was stopped longer than the TTL):
                    // join again, as an etcd member would with a new lease.
                    let mut m = member.clone();
                    m.load = load;
                    generation = t.join(m, now, ttl);
                }
                publish(&tx, &t);
            }
            {
                let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
                t.leave(role, &id, generation);
                publish(&tx, &t);
            }
            let _ = left.send(());
        });
        reg
    }

    fn view(&self) -> watch::Receiver<View> {
        self.tx.subscribe()
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn campaign(&self, name: &str, _id: &str, _ttl: Duration) -> Campaign {
        // One process: no lease can lapse while the process lives, so the queue alone
        // decides; the next in line takes over when the holder resigns.
        let (c, held, resigned) = Campaign::channel();
        let token = {
            let mut e = self.elections.lock().unwrap_or_else(|e| e.into_inner());
            e.0 += 1;
            let token = e.0;
            let q = e.1.entry(name.to_string()).or_default();
            if q.is_empty() {
                let _ = held.send(true);
            }
            q.push((token, held));
            token
        };
        let (elections, name) = (self.elections.clone(), name.to_string());
        tokio::spawn(async move {
            let _ = resigned.await;
            let mut e = elections.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(q) = e.1.get_mut(&name) {
                q.retain(|(t, _)| *t != token);
                if let Some((_, next)) = q.first() {
                    let _ = next.send(true);
                }
                if q.is_empty() {
                    e.1.remove(&name);
                }
            }
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: Role, id: &str) -> Member {
        Member::new(role, id)
    }

    #[test]
    fn a_member_not_renewed_within_its_ttl_expires() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut t = Table::default();
        let ga = t.join(m(Role::Proxy, "a"), t0, ttl);
        let gb = t.join(m(Role::Proxy, "b"), t0, ttl);
        let r0 = t.view().revision;
        assert!(t.renew(Role::Proxy, "a", ga, Load::default(), t0 + Duration::from_secs(2), ttl));
        assert_eq!(t.view().revision, r0, "a renewal without a load change is no change");
        assert_eq!(t.next_deadline(), Some(t0 + ttl));
        assert!(!t.expire(t0 + Duration::from_millis(2999)));
        assert!(t.expire(t0 + ttl));
        let v = t.view();
        assert_eq!(v.members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert!(v.revision > r0);
        // b's lease is over: renewing fails, so b joins again.
        assert!(!t.renew(Role::Proxy, "b", gb, Load::default(), t0 + ttl, ttl));
    }

    #[test]
    fn load_changes_and_leaves_bump_the_revision() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut t = Table::default();
        let g = t.join(m(Role::Relay, "r"), t0, ttl);
        let r0 = t.view().revision;
        let load = Load { sessions: 7, calls_per_sec: 1.5, cpu: 0.25 };
        assert!(t.renew(Role::Relay, "r", g, load, t0, ttl));
        assert_eq!(t.view().members[0].load, load);
        assert!(t.view().revision > r0);
        assert!(t.leave(Role::Relay, "r", g));
        assert!(!t.leave(Role::Relay, "r", g));
        assert!(t.view().members.is_empty());
    }

    #[test]
    fn an_old_registration_never_removes_its_replacement() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut t = Table::default();
        let old = t.join(m(Role::Proxy, "p"), t0, ttl);
        let new = t.join(m(Role::Proxy, "p"), t0, ttl);
        assert!(t.replaced(Role::Proxy, "p", old));
        assert!(!t.renew(Role::Proxy, "p", old, Load::default(), t0, ttl));
        assert!(!t.leave(Role::Proxy, "p", old));
        assert_eq!(t.view().members.len(), 1);
        assert!(t.leave(Role::Proxy, "p", new));
    }

    #[tokio::test]
    async fn local_backend_passes_the_battery() {
        let m: std::sync::Arc<dyn Membership> =
            std::sync::Arc::new(Local::new(Clock::system(), super::super::DEFAULT_TTL));
        super::super::battery(m, "local").await;
    }

    #[tokio::test]
    async fn a_member_whose_renewals_stop_expires_by_the_injected_clock() {
        let now = std::sync::Arc::new(Mutex::new(Instant::now()));
        let n = now.clone();
        let local = Local::new(Clock::from_fn(move || *n.lock().unwrap()), Duration::from_secs(3));
        let mut view = local.view();
        let reg = local.register(m(Role::Lb, "x"));
        assert_eq!(view.borrow_and_update().members.len(), 1);
        // The process is frozen (its renewal task never runs) while time passes.
        std::mem::forget(reg);
        *now.lock().unwrap() += Duration::from_secs(3);
        local.tick();
        assert!(view.borrow_and_update().members.is_empty());
    }
}
