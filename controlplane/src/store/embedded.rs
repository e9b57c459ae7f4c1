//! The embedded store: one `redb` file. Survives restarts; serves one machine.
//!
//! Credentials are committed durably (fsync) one by one. Bindings and dialogs are soft
//! state written at every REGISTER and every call: they go to an in-memory write-behind
//! map (read first by lookups) and a flusher thread writes the map in one durable
//! transaction every [`FLUSH_INTERVAL`] (group commit), so neither costs a disk write
//! of its own and a crash loses at most that interval of changes (Kamailio's usrloc
//! write-back mode flushes every 60 s). A clean stop flushes.
//!
//! Dialogs (call → relay) go to the file too, although on one machine no other proxy
//! reads them: a proxy restarted mid-call still finds each call's relay, so a BYE after
//! the restart frees the session on the relay that holds it instead of leaving it to
//! the relay's inactivity timeout; with the write-behind that costs nothing per call.
//! Expired dialogs are ignored by lookups at once and removed from the file every
//! [`SWEEP_INTERVAL`] by the flusher thread, off every request's path.

use super::{Binding, Clock, Store};
use crate::error::Error;
use redb::{Database, Durability, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Longest time a binding or dialog change stays in memory before it is fsync'd.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// How often expired dialogs are removed from the file: the file grows by at most the
/// calls of that interval that never sent BYE.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

const USERS: TableDefinition<&str, &str> = TableDefinition::new("users");
const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");
/// Call-ID → JSON [`Dialog`].
const DIALOGS: TableDefinition<&str, &[u8]> = TableDefinition::new("dialogs");

/// A redb file.
#[derive(Debug)]
pub struct Embedded {
    db: Arc<Database>,
    /// Changes not yet written.
    pending: Arc<Pending>,
    /// What dialogs expire by.
    clock: Clock,
}

type Pending = Mutex<Changes>;

#[derive(Debug, Default, Clone)]
struct Changes {
    /// AOR → bindings (empty: removed).
    bindings: HashMap<String, Vec<Binding>>,
    /// Call-ID → dialog (`None`: deleted).
    dialogs: HashMap<String, Option<Dialog>>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.bindings.is_empty() && self.dialogs.is_empty()
    }
}

/// A call's relay as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Dialog {
    node: String,
    /// Unix seconds, by the store's clock.
    expires_at: u64,
}

fn write_bindings(t: &mut redb::Table<&str, &[u8]>, aor: &str, bindings: &[Binding]) -> Result<(), Error> {
    if bindings.is_empty() {
        t.remove(aor).map_err(err)?;
    } else {
        let v = serde_json::to_vec(bindings).map_err(err)?;
        t.insert(aor, v.as_slice()).map_err(err)?;
    }
    Ok(())
}

fn write_dialog(t: &mut redb::Table<&str, &[u8]>, call_id: &str, d: Option<&Dialog>) -> Result<(), Error> {
    match d {
        None => {
            t.remove(call_id).map_err(err)?;
        }
        Some(d) => {
            let v = serde_json::to_vec(d).map_err(err)?;
            t.insert(call_id, v.as_slice()).map_err(err)?;
        }
    }
    Ok(())
}

/// Writes the pending changes in one durable transaction, then forgets those that did
/// not change meanwhile (lookups read the map until the file has them).
fn flush_pending(db: &Database, pending: &Pending) -> Result<(), Error> {
    let snapshot = pending.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if snapshot.is_empty() {
        return Ok(());
    }
    let mut w = db.begin_write().map_err(err)?;
    w.set_durability(Durability::Immediate);
    {
        let mut t = w.open_table(BINDINGS).map_err(err)?;
        for (aor, b) in &snapshot.bindings {
            write_bindings(&mut t, aor, b)?;
        }
        let mut t = w.open_table(DIALOGS).map_err(err)?;
        for (call_id, d) in &snapshot.dialogs {
            write_dialog(&mut t, call_id, d.as_ref())?;
        }
    }
    w.commit().map_err(err)?;
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    for (aor, b) in snapshot.bindings {
        if p.bindings.get(&aor) == Some(&b) {
            p.bindings.remove(&aor);
        }
    }
    for (call_id, d) in snapshot.dialogs {
        if p.dialogs.get(&call_id) == Some(&d) {
            p.dialogs.remove(&call_id);
        }
    }
    Ok(())
}

/// Removes the dialogs expired by `now` from the file; returns how many. A dialog
/// re-recorded meanwhile is in the pending map, which lookups read first and the next
/// flush writes, so removing its old copy here loses nothing.
fn sweep_dialogs(db: &Database, now: u64) -> Result<usize, Error> {
    let w = db.begin_write().map_err(err)?;
    let mut removed = 0;
    {
        let mut t = w.open_table(DIALOGS).map_err(err)?;
        t.retain(|_, v| {
            // An undecodable entry can never be read back: it goes too.
            let keep = serde_json::from_slice::<Dialog>(v).is_ok_and(|d| d.expires_at > now);
            removed += usize::from(!keep);
            keep
        })
        .map_err(err)?;
    }
    w.commit().map_err(err)?;
    Ok(removed)
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl Embedded {
    /// Opens (creating) the file and its tables; dialogs expire by the system clock.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_with_clock(path, Clock::System)
    }

    /// Opens (creating) the file and its tables; dialogs expire by `clock` (a
    /// [`Clock::Manual`] in tests).
    pub fn open_with_clock(path: &Path, clock: Clock) -> Result<Self, Error> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        let db = Database::create(path).map_err(err)?;
        let w = db.begin_write().map_err(err)?;
        w.open_table(USERS).map_err(err)?;
        w.open_table(BINDINGS).map_err(err)?;
        w.open_table(DIALOGS).map_err(err)?;
        w.commit().map_err(err)?;
        let db = Arc::new(db);
        let pending: Arc<Pending> = Arc::default();
        let (weak, p, c): (Weak<Database>, _, _) = (Arc::downgrade(&db), pending.clone(), clock.clone());
        std::thread::Builder::new().name("hasp-store-flush".into()).spawn(move || {
            let mut swept = Instant::now();
            loop {
                std::thread::sleep(FLUSH_INTERVAL);
                let Some(db) = weak.upgrade() else { return };
                if let Err(e) = flush_pending(&db, &p) {
                    // Kept in memory and tried again next round.
                    tracing::warn!(error = %e, "writing registrations and dialogs to the store failed");
                }
                if swept.elapsed() >= SWEEP_INTERVAL {
                    swept = Instant::now();
                    if let Err(e) = sweep_dialogs(&db, c.now()) {
                        // Lookups ignore expired dialogs anyway; the next sweep retries.
                        tracing::warn!(error = %e, "removing expired dialogs from the store failed");
                    }
                }
            }
        })?;
        Ok(Self { db, pending, clock })
    }
}

impl Store for Embedded {
    /// Bindings and dialogs are read from memory (written behind), credentials from the
    /// memory-mapped file: nothing waits for another machine.
    fn is_local(&self) -> bool {
        true
    }

    fn secret(&self, user: &str, domain: &str) -> Result<Option<String>, Error> {
        let r = self.db.begin_read().map_err(err)?;
        let t = r.open_table(USERS).map_err(err)?;
        Ok(t.get(format!("{user}@{}", domain.to_ascii_lowercase()).as_str())
            .map_err(err)?
            .map(|v| v.value().to_string()))
    }

    fn put_secret(&self, user: &str, domain: &str, secret: &str) -> Result<(), Error> {
        let w = self.db.begin_write().map_err(err)?;
        {
            let mut t = w.open_table(USERS).map_err(err)?;
            t.insert(format!("{user}@{}", domain.to_ascii_lowercase()).as_str(), secret).map_err(err)?;
        }
        w.commit().map_err(err)
    }

    fn bindings(&self, aor: &str, now: u64) -> Result<Vec<Binding>, Error> {
        // Taken out first: a guard in the match would hold the lock across the file read.
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner()).bindings.get(aor).cloned();
        let all: Vec<Binding> = match pending {
            Some(b) => b,
            None => {
                let r = self.db.begin_read().map_err(err)?;
                let t = r.open_table(BINDINGS).map_err(err)?;
                let Some(v) = t.get(aor).map_err(err)? else { return Ok(Vec::new()) };
                serde_json::from_slice(v.value()).map_err(err)?
            }
        };
        Ok(all.into_iter().filter(|b| b.expires_at > now).collect())
    }

    fn set_bindings(&self, aor: &str, bindings: &[Binding]) -> Result<(), Error> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).bindings.insert(aor.to_string(), bindings.to_vec());
        Ok(())
    }

    fn put_dialog(&self, call_id: &str, node: &str, ttl_secs: u64) -> Result<(), Error> {
        let d = Dialog { node: node.to_string(), expires_at: self.clock.now().saturating_add(ttl_secs.max(1)) };
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).dialogs.insert(call_id.to_string(), Some(d));
        Ok(())
    }

    fn dialog(&self, call_id: &str) -> Result<Option<String>, Error> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner()).dialogs.get(call_id).cloned();
        let d = match pending {
            Some(d) => d,
            None => {
                let r = self.db.begin_read().map_err(err)?;
                let t = r.open_table(DIALOGS).map_err(err)?;
                let Some(v) = t.get(call_id).map_err(err)? else { return Ok(None) };
                Some(serde_json::from_slice::<Dialog>(v.value()).map_err(err)?)
            }
        };
        let now = self.clock.now();
        Ok(d.filter(|d| d.expires_at > now).map(|d| d.node))
    }

    fn delete_dialog(&self, call_id: &str) -> Result<(), Error> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).dialogs.insert(call_id.to_string(), None);
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        flush_pending(&self.db, &self.pending)
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;
    use redb::ReadableTable;

    /// A fresh directory for one test (nextest runs each test in a process of its own).
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hasp-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("hasp.redb")
    }

    #[test]
    fn passes_the_battery_and_survives_reopening() {
        let path = scratch("battery");
        let clock = ManualClock::new(0);
        {
            let s = Embedded::open_with_clock(&path, Clock::Manual(clock.clone())).unwrap();
            crate::store::battery(&s, &Clock::Manual(clock.clone()));
            s.put_user("bob", "Example.COM", "x").unwrap();
        }
        let s = Embedded::open_with_clock(&path, Clock::Manual(clock)).unwrap();
        assert_eq!(
            s.secret("bob", "example.com").unwrap(),
            Some(sip::digest::Secret::new("bob", "example.com", "x").encode())
        );
        assert_eq!(s.bindings("bob@example.com", 50).unwrap().len(), 1, "the battery's last bindings");
        assert_eq!(s.dialog("c2").unwrap().as_deref(), Some("ng://10.0.0.7:2223"), "and its last dialogs");
        assert_eq!(s.dialog("c1").unwrap(), None, "a deleted dialog stays deleted");
    }

    #[test]
    fn bindings_are_read_back_at_once_and_durable_after_the_flusher_ran() {
        let path = scratch("flush");
        let b = Binding {
            contact: "sip:a@127.0.0.1:5070".into(),
            expires_at: 2_000_000_000,
            path: vec![],
            call_id: "c".into(),
            cseq: 1,
            ..Binding::default()
        };
        {
            let s = Embedded::open(&path).unwrap();
            s.set_bindings("a@x", std::slice::from_ref(&b)).unwrap();
            s.put_dialog("call", "ng://10.0.0.5:2223", 3600).unwrap();
            assert_eq!(s.bindings("a@x", 0).unwrap(), vec![b.clone()], "read back before the flush");
            assert_eq!(s.dialog("call").unwrap().as_deref(), Some("ng://10.0.0.5:2223"));
            // The flusher, not a drop, makes them durable.
            let t0 = Instant::now();
            while !s.pending.lock().unwrap().is_empty() {
                assert!(t0.elapsed() < Duration::from_secs(5), "flusher never ran");
                std::thread::sleep(Duration::from_millis(10));
            }
            // Read from the file now; a delete shadows it until it is written.
            assert_eq!(s.dialog("call").unwrap().as_deref(), Some("ng://10.0.0.5:2223"));
            s.put_dialog("other", "ng://10.0.0.6:2223", 3600).unwrap();
            s.delete_dialog("other").unwrap();
            assert_eq!(s.dialog("other").unwrap(), None);
        }
        let s = Embedded::open(&path).unwrap();
        assert_eq!(s.bindings("a@x", 0).unwrap(), vec![b]);
        assert_eq!(s.dialog("call").unwrap().as_deref(), Some("ng://10.0.0.5:2223"));
        assert_eq!(s.dialog("other").unwrap(), None);
    }

    #[test]
    fn expired_dialogs_are_swept_from_the_file_and_a_fresh_one_is_not() {
        let path = scratch("sweep");
        let clock = ManualClock::new(1_000);
        let s = Embedded::open_with_clock(&path, Clock::Manual(clock.clone())).unwrap();
        s.put_dialog("old", "n1", 10).unwrap();
        s.put_dialog("live", "n2", 3600).unwrap();
        s.put_dialog("renewed", "n3", 10).unwrap();
        s.flush().unwrap();
        clock.advance(10);
        assert_eq!(s.dialog("old").unwrap(), None, "expired before any sweep");
        s.put_dialog("renewed", "n3", 3600).unwrap(); // pending, not yet in the file
        assert_eq!(sweep_dialogs(&s.db, clock.now()).unwrap(), 2, "old and renewed's old copy");
        assert_eq!(sweep_dialogs(&s.db, clock.now()).unwrap(), 0);
        assert_eq!(s.dialog("live").unwrap().as_deref(), Some("n2"));
        assert_eq!(s.dialog("renewed").unwrap().as_deref(), Some("n3"), "the pending copy survives the sweep");
        s.flush().unwrap();
        let r = s.db.begin_read().unwrap();
        let t = r.open_table(DIALOGS).unwrap();
        let mut keys: Vec<String> = t.iter().unwrap().map(|e| e.unwrap().0.value().to_string()).collect();
        keys.sort();
        assert_eq!(keys, ["live", "renewed"]);
    }
}
