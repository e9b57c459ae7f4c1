//! The in-memory store: for tests and the sans-IO simulations, and for a proxy that
//! needs nothing to survive it. Nothing touches a disk or a socket, and time comes from
//! a [`Clock`] the caller may move.
//!
//! Memory is bounded by [`Limits`], since a store fed by REGISTERs and INVITEs from the
//! network must not grow with them. Entries that have expired make room first; when
//! the store is still full, the write that needs the room is refused with
//! [`Error::Store`] and nothing stored is evicted. Refusing keeps what callers were
//! told they have (a 200 OK listed those bindings; another proxy may be about to route
//! a BYE by that dialog), and the caller answers the new request with an error instead.

use super::{Binding, Clock, Store};
use crate::error::Error;
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// The bounds of a [`Memory`] store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Provisioned users.
    pub users: usize,
    /// Addresses of record with bindings.
    pub aors: usize,
    /// Bindings of one address of record (Kamailio's registrar calls it `max_contacts`).
    pub bindings_per_aor: usize,
    /// Recorded dialogs.
    pub dialogs: usize,
}

impl Default for Limits {
    /// Room for a large test or simulation, small enough that a full store takes tens
    /// of megabytes, not the machine.
    fn default() -> Self {
        Self { users: 100_000, aors: 100_000, bindings_per_aor: 10, dialogs: 100_000 }
    }
}

/// A bounded in-memory store.
#[derive(Debug)]
pub struct Memory {
    clock: Clock,
    limits: Limits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    users: HashMap<String, String>,
    /// AOR → bindings; an AOR expires with its last binding.
    aors: Expiring<Vec<Binding>>,
    /// Call-ID → media node.
    dialogs: Expiring<String>,
}

impl Memory {
    /// An empty store on the system clock.
    pub fn new(limits: Limits) -> Self {
        Self::with_clock(limits, Clock::System)
    }

    /// An empty store whose dialogs expire, and whose expired entries make room, by
    /// `clock` (a [`Clock::Manual`] in tests and simulations).
    pub fn with_clock(limits: Limits, clock: Clock) -> Self {
        Self { clock, limits, state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are each consistent: every
        // mutation below is one insert or remove per map, index updated with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn user_key(user: &str, domain: &str) -> String {
    format!("{user}@{}", domain.to_ascii_lowercase())
}

fn full(what: &str, limit: usize) -> Error {
    // No AOR or Call-ID in the message: errors reach logs, subscriber identities must not.
    Error::Store(format!("memory store full: {what} limit of {limit} reached"))
}

impl Store for Memory {
    /// Bindings and dialogs are read from memory (written behind), credentials from the
    /// memory-mapped file: nothing waits for another machine.
    fn is_local(&self) -> bool {
        true
    }

    fn secret(&self, user: &str, domain: &str) -> Result<Option<String>, Error> {
        Ok(self.state().users.get(&user_key(user, domain)).cloned())
    }

    fn put_secret(&self, user: &str, domain: &str, secret: &str) -> Result<(), Error> {
        let mut st = self.state();
        let key = user_key(user, domain);
        if !st.users.contains_key(&key) && st.users.len() >= self.limits.users {
            return Err(full("users", self.limits.users));
        }
        st.users.insert(key, secret.to_string());
        Ok(())
    }

    fn bindings(&self, aor: &str, now: u64) -> Result<Vec<Binding>, Error> {
        // Judged by the caller's `now`, not the clock: that is the trait's contract, and
        // the entry's own expiry only decides when it may make room.
        let st = self.state();
        let Some(all) = st.aors.get(aor) else { return Ok(Vec::new()) };
        Ok(all.iter().filter(|b| b.expires_at > now).cloned().collect())
    }

    fn set_bindings(&self, aor: &str, bindings: &[Binding]) -> Result<(), Error> {
        let mut st = self.state();
        if bindings.is_empty() {
            st.aors.remove(aor);
            return Ok(());
        }
        if bindings.len() > self.limits.bindings_per_aor {
            return Err(full("bindings per AOR", self.limits.bindings_per_aor));
        }
        let expires_at = bindings.iter().map(|b| b.expires_at).max().unwrap_or(0);
        st.aors
            .insert(aor, bindings.to_vec(), expires_at, self.clock.now(), self.limits.aors)
            .map_err(|()| full("AORs", self.limits.aors))
    }

    fn put_dialog(&self, call_id: &str, node: &str, ttl_secs: u64) -> Result<(), Error> {
        let now = self.clock.now();
        let expires_at = now.saturating_add(ttl_secs.max(1));
        self.state()
            .dialogs
            .insert(call_id, node.to_string(), expires_at, now, self.limits.dialogs)
            .map_err(|()| full("dialogs", self.limits.dialogs))
    }

    fn dialog(&self, call_id: &str) -> Result<Option<String>, Error> {
        let now = self.clock.now();
        Ok(self.state().dialogs.get_unexpired(call_id, now).cloned())
    }

    fn delete_dialog(&self, call_id: &str) -> Result<(), Error> {
        self.state().dialogs.remove(call_id);
        Ok(())
    }
}

/// A map whose entries carry an expiry (Unix seconds), indexed by it, so that making
/// room costs a look at the earliest expiry and the entries removed, never a scan.
#[derive(Debug)]
struct Expiring<V> {
    map: HashMap<String, (u64, V)>,
    by_expiry: BTreeSet<(u64, String)>,
}

impl<V> Default for Expiring<V> {
    fn default() -> Self {
        Self { map: HashMap::new(), by_expiry: BTreeSet::new() }
    }
}

impl<V> Expiring<V> {
    /// The value, expired or not.
    fn get(&self, key: &str) -> Option<&V> {
        self.map.get(key).map(|(_, v)| v)
    }

    /// The value if it expires after `now`.
    fn get_unexpired(&self, key: &str, now: u64) -> Option<&V> {
        self.map.get(key).filter(|(exp, _)| *exp > now).map(|(_, v)| v)
    }

    /// Inserts or replaces; a new key when `cap` entries are held first removes those
    /// expired by `now`, and is refused if none was.
    fn insert(&mut self, key: &str, value: V, expires_at: u64, now: u64, cap: usize) -> Result<(), ()> {
        if !self.map.contains_key(key) && self.map.len() >= cap {
            self.purge(now);
            if self.map.len() >= cap {
                return Err(());
            }
        }
        if let Some((old, _)) = self.map.insert(key.to_string(), (expires_at, value)) {
            self.by_expiry.remove(&(old, key.to_string()));
        }
        self.by_expiry.insert((expires_at, key.to_string()));
        Ok(())
    }

    fn remove(&mut self, key: &str) -> Option<V> {
        let (exp, v) = self.map.remove(key)?;
        self.by_expiry.remove(&(exp, key.to_string()));
        Some(v)
    }

    /// Removes every entry expired by `now` (expiry at or before it).
    fn purge(&mut self, now: u64) {
        while let Some((exp, key)) = self.by_expiry.first() {
            if *exp > now {
                break;
            }
            let key = key.clone();
            self.remove(&key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        debug_assert_eq!(self.map.len(), self.by_expiry.len());
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;

    fn store(limits: Limits) -> (Memory, ManualClock) {
        let clock = ManualClock::new(1_000);
        (Memory::with_clock(limits, Clock::Manual(clock.clone())), clock)
    }

    fn b(contact: &str, expires_at: u64) -> Binding {
        Binding { contact: contact.into(), expires_at, call_id: "r".into(), cseq: 1, ..Binding::default() }
    }

    fn is_full(r: Result<(), Error>) -> bool {
        matches!(r, Err(Error::Store(m)) if m.contains("limit"))
    }

    #[test]
    fn passes_the_battery() {
        let clock = ManualClock::new(0);
        let s = Memory::with_clock(Limits::default(), Clock::Manual(clock.clone()));
        crate::store::battery(&s, &Clock::Manual(clock));
    }

    #[test]
    fn open_gives_the_memory_backend_and_refuses_a_path() {
        let s = crate::store::open("memory:").unwrap();
        s.put_dialog("c", "n", 60).unwrap();
        assert_eq!(s.dialog("c").unwrap().as_deref(), Some("n"));
        assert!(format!("{s:?}").starts_with("Memory"), "{s:?}");
        assert!(matches!(crate::store::open("memory:/tmp/x"), Err(Error::Config(_))));
    }

    #[test]
    fn an_aor_with_more_bindings_than_allowed_is_refused_and_keeps_its_old_ones() {
        let (s, _) = store(Limits { bindings_per_aor: 2, ..Limits::default() });
        let two = [b("sip:1@h", 2_000), b("sip:2@h", 2_000)];
        s.set_bindings("a@x", &two).unwrap();
        assert!(is_full(s.set_bindings("a@x", &[b("sip:1@h", 2_000), b("sip:2@h", 2_000), b("sip:3@h", 2_000)])));
        assert_eq!(s.bindings("a@x", 1_000).unwrap(), two.to_vec());
    }

    #[test]
    fn a_new_aor_takes_the_room_of_an_expired_one_else_is_refused() {
        let (s, clock) = store(Limits { aors: 2, ..Limits::default() });
        s.set_bindings("a@x", &[b("sip:a@h", 1_100), b("sip:a2@h", 1_010)]).unwrap();
        s.set_bindings("b@x", &[b("sip:b@h", 1_500)]).unwrap();
        assert!(is_full(s.set_bindings("c@x", &[b("sip:c@h", 2_000)])), "both live");
        s.set_bindings("a@x", &[b("sip:a@h", 1_200)]).unwrap(); // an existing AOR needs no room
        assert_eq!(s.state().aors.len(), 2);

        clock.advance(150); // 1150: a@x's last binding (1200) still live
        assert!(is_full(s.set_bindings("c@x", &[b("sip:c@h", 2_000)])));
        clock.advance(50); // 1200: a@x expired with its last binding
        s.set_bindings("c@x", &[b("sip:c@h", 2_000)]).unwrap();
        assert!(s.bindings("a@x", 0).unwrap().is_empty(), "the expired AOR made room");
        assert_eq!(s.bindings("b@x", 1_200).unwrap(), vec![b("sip:b@h", 1_500)], "a live one did not");
        assert_eq!(s.state().aors.len(), 2);

        s.set_bindings("b@x", &[]).unwrap(); // removing frees room at once
        s.set_bindings("d@x", &[b("sip:d@h", 2_000)]).unwrap();
    }

    #[test]
    fn dialogs_are_bounded_and_expired_ones_make_room() {
        let (s, clock) = store(Limits { dialogs: 3, ..Limits::default() });
        s.put_dialog("c1", "n1", 10).unwrap();
        s.put_dialog("c2", "n2", 20).unwrap();
        s.put_dialog("c3", "n3", 3600).unwrap();
        assert!(is_full(s.put_dialog("c4", "n4", 60)));
        assert_eq!(s.dialog("c4").unwrap(), None);
        s.put_dialog("c1", "n1b", 10).unwrap(); // a refresh needs no room

        clock.advance(20); // c1 and c2 expired
        assert_eq!(s.dialog("c1").unwrap(), None);
        s.put_dialog("c4", "n4", 60).unwrap();
        assert_eq!(s.state().dialogs.len(), 2, "both expired ones were removed");
        s.put_dialog("c5", "n5", 60).unwrap();
        assert!(is_full(s.put_dialog("c6", "n6", 60)));
        s.delete_dialog("c3").unwrap();
        s.put_dialog("c6", "n6", 60).unwrap();
        assert_eq!(s.dialog("c4").unwrap().as_deref(), Some("n4"));
    }

    #[test]
    fn users_are_bounded_but_may_change_their_password_when_full() {
        let (s, _) = store(Limits { users: 1, ..Limits::default() });
        s.put_user("a", "x", "1").unwrap();
        assert!(is_full(s.put_user("b", "x", "1")));
        s.put_user("a", "X", "2").unwrap();
        assert_eq!(s.secret("a", "x").unwrap(), Some(sip::digest::Secret::new("a", "x", "2").encode()));
    }

    #[test]
    fn a_zero_ttl_counts_as_one_second() {
        let (s, clock) = store(Limits::default());
        s.put_dialog("c", "n", 0).unwrap();
        assert_eq!(s.dialog("c").unwrap().as_deref(), Some("n"));
        clock.advance(1);
        assert_eq!(s.dialog("c").unwrap(), None);
    }
}
