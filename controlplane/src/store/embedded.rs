//! The embedded store: one `redb` file. Survives restarts; serves one machine.

use super::{Binding, Store};
use crate::error::Error;
use redb::{Database, TableDefinition};
use std::path::Path;

const USERS: TableDefinition<&str, &str> = TableDefinition::new("users");
const BINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("bindings");

/// A redb file.
#[derive(Debug)]
pub struct Embedded {
    db: Database,
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
        Ok(Self { db })
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
        let r = self.db.begin_read().map_err(err)?;
        let t = r.open_table(BINDINGS).map_err(err)?;
        let Some(v) = t.get(aor).map_err(err)? else { return Ok(Vec::new()) };
        let all: Vec<Binding> = serde_json::from_slice(v.value()).map_err(err)?;
        Ok(all.into_iter().filter(|b| b.expires_at > now).collect())
    }

    fn set_bindings(&self, aor: &str, bindings: &[Binding]) -> Result<(), Error> {
        let w = self.db.begin_write().map_err(err)?;
        {
            let mut t = w.open_table(BINDINGS).map_err(err)?;
            if bindings.is_empty() {
                t.remove(aor).map_err(err)?;
            } else {
                let v = serde_json::to_vec(bindings).map_err(err)?;
                t.insert(aor, v.as_slice()).map_err(err)?;
            }
        }
        w.commit().map_err(err)
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
}
