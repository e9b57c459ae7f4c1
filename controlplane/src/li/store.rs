//! Persistent LI tasks: one JSON file, replaced atomically (written to a temporary file,
//! fsync'd, renamed over the old one, directory fsync'd) on every change, before the
//! change takes effect. Read back at start-up, before the node serves calls, so a restart
//! never silently ends an interception.
//!
//! A file rather than the SIP store: the relay role has no store, and LI state must not
//! share credentials or a replication domain with subscriber data. Tasks are few and
//! change rarely, so rewriting the whole file is cheap.

use super::audit::{make_private, private_file, sync_dir};
use super::error::Error;
use super::tasks::Task;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    tasks: Vec<Task>,
}

/// The task state file.
#[derive(Debug)]
pub struct TaskStore {
    path: PathBuf,
}

/// Where the task state lives when not configured: next to the audit log, named after
/// it (`li-audit.log` → `li-audit.tasks.json`), so two audit logs in one directory never
/// share a state file.
pub fn default_path(audit_log: &Path) -> PathBuf {
    audit_log.with_extension("tasks.json")
}

impl TaskStore {
    /// The store at `path` (nothing is read or written yet).
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf() }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved tasks; none when the file does not exist (a first start). A file that
    /// exists but cannot be read is an error: starting without its tasks would end
    /// their interceptions silently.
    pub fn load(&self) -> Result<Vec<Task>, Error> {
        let unreadable = |reason: String| Error::StateUnreadable { path: self.path.display().to_string(), reason };
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(unreadable(e.to_string())),
        };
        let f: File = serde_json::from_slice(&text).map_err(|e| unreadable(e.to_string()))?;
        if f.version != VERSION {
            return Err(unreadable(format!("version {} (this hasp reads {VERSION})", f.version)));
        }
        Ok(f.tasks)
    }

    /// Replaces the saved tasks with `tasks`, durably, or fails leaving the old file.
    pub fn save(&self, tasks: &[&Task]) -> std::io::Result<()> {
        #[derive(Serialize)]
        struct Out<'a> {
            version: u32,
            tasks: &'a [&'a Task],
        }
        let mut text = serde_json::to_vec_pretty(&Out { version: VERSION, tasks })?;
        text.push(b'\n');
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = private_file().create(true).write(true).truncate(true).open(&tmp)?;
        make_private(&f)?;
        f.write_all(&text)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        sync_dir(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_tasks_and_refuses_a_corrupt_file() {
        let dir = std::env::temp_dir().join(format!("hasp-li-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(default_path(&dir.join("li-audit.log")), dir.join("li-audit.tasks.json"));
        let s = TaskStore::new(&default_path(&dir.join("li-audit.log")));
        assert!(s.load().unwrap().is_empty(), "no file: a first start");
        let t: Task = serde_json::from_str(
            r#"{"xid":"6ba7b810-9dad-11d1-80b4-00c04fd430c8","targets":[{"call_id":"c@h"}],"destinations":[{"tcp":"127.0.0.1:9000"}],"end":4102444800}"#,
        )
        .unwrap();
        s.save(&[&t]).unwrap();
        assert_eq!(s.load().unwrap(), vec![t]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(s.path(), b"{\"version\":1,\"tasks\":[").unwrap();
        assert!(matches!(s.load(), Err(Error::StateUnreadable { .. })));
    }
}
