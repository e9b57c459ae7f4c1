//! The embedded store: one `redb` file. Survives restarts; serves one machine.
//!
//! Credentials are committed durably (fsync) one by one. Bindings are soft state that
//! clients refresh, written at every REGISTER: they go to an in-memory write-behind map
//! (read first by lookups) and a flusher thread writes the map in one durable transaction
//! every [`FLUSH_INTERVAL`] (group commit), so a REGISTER costs no disk write and a crash
//! loses at most that interval of refreshes (Kamailio's usrloc write-back mode flushes
//! every 60 s). A clean stop flushes.

use super::{Binding, Store};
use crate::error::Error;
use redb::{Database, Durability, TableDefinition};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Longest time a binding change stays in the page cache before it is fsync'd.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

const USERS: TableDefinition<&str, &str> = TableDefinition::new("users");
const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");

/// A redb file.
#[derive(Debug)]
pub struct Embedded {
    db: Arc<Database>,
    /// Binding changes not yet written: AOR → bindings (empty: removed).
    pending: Arc<Pending>,
}

type Pending = Mutex<HashMap<String, Vec<Binding>>>;

fn write_bindings(t: &mut redb::Table<&str, &[u8]>, aor: &str, bindings: &[Binding]) -> Result<(), Error> {
    if bindings.is_empty() {
        t.remove(aor).map_err(err)?;
    } else {
        let v = serde_json::to_vec(bindings).map_err(err)?;
        t.insert(aor, v.as_slice()).map_err(err)?;
    }
    Ok(())
}

/// Writes the pending binding changes in one durable transaction, then forgets those
/// that did not change meanwhile (lookups read the map until the file has them).
fn flush_pending(db: &Database, pending: &Pending) -> Result<(), Error> {
    let snapshot = pending.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if snapshot.is_empty() {
        return Ok(());
    }
    let mut w = db.begin_write().map_err(err)?;
    w.set_durability(Durability::Immediate);
    {
        let mut t = w.open_table(BINDINGS).map_err(err)?;
        for (aor, b) in &snapshot {
            write_bindings(&mut t, aor, b)?;
        }
    }
    w.commit().map_err(err)?;
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    for (aor, b) in snapshot {
        if p.get(&aor) == Some(&b) {
            p.remove(&aor);
        }
    }
    Ok(())
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl Embedded {
    /// Opens (creating) the file and its tables.
    pub fn open(path: &Path) -> Result<Self, Error> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
        let db = Database::create(path).map_err(err)?;
        let w = db.begin_write().map_err(err)?;
        w.open_table(USERS).map_err(err)?;
        w.open_table(BINDINGS).map_err(err)?;
        w.commit().map_err(err)?;
        let db = Arc::new(db);
        let pending: Arc<Pending> = Arc::default();
        let (weak, p): (Weak<Database>, _) = (Arc::downgrade(&db), pending.clone());
        std::thread::Builder::new().name("hasp-store-flush".into()).spawn(move || loop {
            std::thread::sleep(FLUSH_INTERVAL);
            let Some(db) = weak.upgrade() else { return };
            if let Err(e) = flush_pending(&db, &p) {
                // Kept in memory and tried again next round.
                tracing::warn!(error = %e, "writing registrations to the store failed");
            }
        })?;
        Ok(Self { db, pending })
    }
}

impl Store for Embedded {
    fn password(&self, user: &str, domain: &str) -> Result<Option<String>, Error> {
        let r = self.db.begin_read().map_err(err)?;
        let t = r.open_table(USERS).map_err(err)?;
        Ok(t.get(format!("{user}@{}", domain.to_ascii_lowercase()).as_str())
            .map_err(err)?
            .map(|v| v.value().to_string()))
    }

    fn put_user(&self, user: &str, domain: &str, password: &str) -> Result<(), Error> {
        let w = self.db.begin_write().map_err(err)?;
        {
            let mut t = w.open_table(USERS).map_err(err)?;
            t.insert(format!("{user}@{}", domain.to_ascii_lowercase()).as_str(), password).map_err(err)?;
        }
        w.commit().map_err(err)
    }

    fn bindings(&self, aor: &str, now: u64) -> Result<Vec<Binding>, Error> {
        let all: Vec<Binding> = match self.pending.lock().unwrap_or_else(|e| e.into_inner()).get(aor) {
            Some(b) => b.clone(),
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
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(aor.to_string(), bindings.to_vec());
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
    #[test]
    fn passes_the_battery_and_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("hasp-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("hasp.redb");
        {
            let s = super::Embedded::open(&path).unwrap();
            super::super::battery(&s);
            use super::Store;
            s.put_user("bob", "Example.COM", "x").unwrap();
        }
        use super::Store;
        let s = super::Embedded::open(&path).unwrap();
        assert_eq!(s.password("bob", "example.com").unwrap().as_deref(), Some("x"));
    }

    #[test]
    fn bindings_are_read_back_at_once_and_durable_after_the_flusher_ran() {
        use super::Store;
        let dir = std::env::temp_dir().join(format!("hasp-store-flush-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("hasp.redb");
        let b = crate::store::Binding {
            contact: "sip:a@127.0.0.1:5070".into(),
            expires_at: 2_000_000_000,
            path: vec![],
            call_id: "c".into(),
            cseq: 1,
            received: None,
        };
        {
            let s = super::Embedded::open(&path).unwrap();
            s.set_bindings("a@x", std::slice::from_ref(&b)).unwrap();
            assert_eq!(s.bindings("a@x", 0).unwrap(), vec![b.clone()], "read back before the flush");
            // The flusher, not a drop, makes it durable.
            let t0 = std::time::Instant::now();
            while !s.pending.lock().unwrap().is_empty() {
                assert!(t0.elapsed() < std::time::Duration::from_secs(5), "flusher never ran");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let s = super::Embedded::open(&path).unwrap();
        assert_eq!(s.bindings("a@x", 0).unwrap(), vec![b]);
    }
}
