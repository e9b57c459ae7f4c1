//! The LI audit log: one JSON line per administrative action, appended and fsync'd
//! before the action is answered, so no acknowledged action is missing from it.

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// One entry.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Unix time in milliseconds.
    pub ts_ms: u128,
    /// Who: the credential used and the peer address.
    pub who: &'a str,
    /// What: e.g. `activate`, `modify`, `deactivate`, `list`, `denied`.
    pub action: &'a str,
    /// The task, if any.
    pub xid: Option<&'a str>,
    /// Outcome: `ok` or the error code.
    pub outcome: &'a str,
    /// Details (the request body for changes).
    pub detail: Option<&'a serde_json::Value>,
}

/// An append-only audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating, with its directory) the log for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(path)?;
        Ok(Self { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an entry and syncs it to disk.
    pub fn record(
        &self,
        who: &str,
        action: &str,
        xid: Option<&str>,
        outcome: &str,
        detail: Option<&serde_json::Value>,
    ) -> std::io::Result<()> {
        let ts_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let mut line = serde_json::to_vec(&Entry { ts_ms, who, action, xid, outcome, detail })?;
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(&line)?;
        f.sync_data()
    }
}
