//! The LI audit log: one JSON line per administrative action, appended and fsync'd.
//!
//! Changes are written ahead: an `intent` record (outcome `pending`, with a request id
//! `req`) is on disk before the change takes effect, and an outcome record with the same
//! `req` follows. A `pending` record with no outcome after it means the outcome could not
//! be written: the change is then taken to have happened (the task list, and the
//! `reinstate` record of the next start, say what is in force).
//!
//! The file is opened for every record, so it can be rotated by renaming it (the next
//! record creates a new file, mode 0600), and a log that cannot be written is noticed
//! by the very request that needs it.
//!
//! Unauthenticated requests reach this log through [`AuditLog::admit_denied`], a token
//! bucket: past it they are only counted, and one `denied_suppressed` summary line per
//! [`SUMMARY_INTERVAL`] stands for all of them, so a flood of bad tokens cannot make
//! the log (or the disk's fsync queue) grow with the flood.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Unauthenticated requests recorded one by one, in a burst.
pub const DENIED_BURST: u32 = 20;
/// Unauthenticated requests recorded one by one per second, after the burst.
pub const DENIED_PER_SEC: u32 = 1;
/// At most one summary of suppressed unauthenticated requests per interval.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// Sources named in one summary; the rest are counted together.
const SUMMARY_SOURCES: usize = 64;
/// Longest `detail` string of a denied request (the method and path).
const DENIED_DETAIL_MAX: usize = 256;

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
    /// Outcome: `pending` (an intent), `ok` or the error code.
    pub outcome: &'a str,
    /// Request id pairing an intent with its outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub req: Option<&'a str>,
    /// Details (the request body for changes).
    pub detail: Option<&'a serde_json::Value>,
}

#[derive(Debug)]
struct Denied {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    by_source: BTreeMap<IpAddr, u64>,
    other_sources: u64,
    first_suppressed_ms: u128,
    last_summary: Instant,
}

/// An append-only audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    /// Serialises writers, so records never interleave.
    write: Mutex<()>,
    boot: String,
    next_req: AtomicU64,
    denied: Mutex<Denied>,
    suppressed_total: AtomicU64,
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Creates `dir` and missing parents, mode 0700 (LI files are for LI administrators).
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Options opening (creating if need be) a file only its owner may read.
pub(crate) fn private_file() -> OpenOptions {
    let mut opts = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// Makes an already existing file private too (the creation mode only applies to new
/// files).
pub(crate) fn make_private(f: &File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if f.metadata()?.permissions().mode() & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// Syncs a directory, so a file created or renamed in it survives a crash.
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

impl AuditLog {
    /// Opens (creating, with its directory) the log; fails if it cannot be written.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let f = private_file().create(true).append(true).open(path)?;
        make_private(&f)?;
        let now = Instant::now();
        Ok(Self {
            path: path.to_path_buf(),
            write: Mutex::new(()),
            boot: format!("{:x}", now_ms()),
            next_req: AtomicU64::new(1),
            denied: Mutex::new(Denied {
                tokens: DENIED_BURST as f64,
                refilled: now,
                suppressed: 0,
                by_source: BTreeMap::new(),
                other_sources: 0,
                first_suppressed_ms: 0,
                last_summary: now,
            }),
            suppressed_total: AtomicU64::new(0),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, e: &Entry<'_>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let existed = self.path.exists();
        let mut f = private_file().create(true).append(true).open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        if !existed {
            // A rotated log was just recreated: its directory entry must be durable too.
            sync_dir(&self.path)?;
        }
        Ok(())
    }

    /// Appends a complete entry (an action with no effect, or one that failed before
    /// taking any) and syncs it to disk.
    pub fn record(
        &self,
        who: &str,
        action: &str,
        xid: Option<&str>,
        outcome: &str,
        detail: Option<&serde_json::Value>,
    ) -> std::io::Result<()> {
        self.append(&Entry { ts_ms: now_ms(), who, action, xid, outcome, req: None, detail })
    }

    /// Writes the intent of a change (outcome `pending`) and syncs it; only then may the
    /// change take effect. Returns the request id its outcome must carry.
    pub fn intent(
        &self,
        who: &str,
        action: &str,
        xid: Option<&str>,
        detail: Option<&serde_json::Value>,
    ) -> std::io::Result<String> {
        let req = format!("{}-{}", self.boot, self.next_req.fetch_add(1, Relaxed));
        self.append(&Entry { ts_ms: now_ms(), who, action, xid, outcome: "pending", req: Some(&req), detail })?;
        Ok(req)
    }

    /// Writes the outcome of the change `req` and syncs it.
    pub fn outcome(&self, req: &str, who: &str, action: &str, xid: Option<&str>, outcome: &str) -> std::io::Result<()> {
        self.append(&Entry { ts_ms: now_ms(), who, action, xid, outcome, req: Some(req), detail: None })
    }

    /// Whether an unauthenticated request from `peer` may be written as its own
    /// `denied` record (then call [`AuditLog::record_denied`]); past the token bucket it
    /// is only counted for the next summary. Never touches the disk.
    pub fn admit_denied(&self, peer: IpAddr) -> bool {
        let now = Instant::now();
        let mut d = self.denied.lock().unwrap_or_else(|e| e.into_inner());
        let refill = now.duration_since(d.refilled).as_secs_f64() * DENIED_PER_SEC as f64;
        d.tokens = (d.tokens + refill).min(DENIED_BURST as f64);
        d.refilled = now;
        if d.tokens >= 1.0 {
            d.tokens -= 1.0;
            return true;
        }
        if d.suppressed == 0 {
            d.first_suppressed_ms = now_ms();
        }
        d.suppressed += 1;
        // The per-source table is bounded: sources past it are counted together.
        if let Some(n) = d.by_source.get_mut(&peer) {
            *n += 1;
        } else if d.by_source.len() < SUMMARY_SOURCES {
            d.by_source.insert(peer, 1);
        } else {
            d.other_sources += 1;
        }
        self.suppressed_total.fetch_add(1, Relaxed);
        false
    }

    /// Writes the `denied` record of an admitted unauthenticated request (`what`: its
    /// method and path, cut to a bounded length).
    pub fn record_denied(&self, who: &str, what: &str) -> std::io::Result<()> {
        let mut end = what.len().min(DENIED_DETAIL_MAX);
        while !what.is_char_boundary(end) {
            end -= 1;
        }
        self.record(who, "denied", None, "unauthorized", Some(&serde_json::Value::from(&what[..end])))
    }

    /// Unauthenticated requests suppressed since start.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Relaxed)
    }

    /// Writes the summary of suppressed unauthenticated requests, at most once per
    /// [`SUMMARY_INTERVAL`] (called every second by the LI reconciler). The counts are
    /// kept for the next try when the log cannot be written.
    pub fn flush_denied(&self) {
        let (count, sources, other, since) = {
            let mut d = self.denied.lock().unwrap_or_else(|e| e.into_inner());
            if d.suppressed == 0 || d.last_summary.elapsed() < SUMMARY_INTERVAL {
                return;
            }
            d.last_summary = Instant::now();
            let out = (d.suppressed, std::mem::take(&mut d.by_source), d.other_sources, d.first_suppressed_ms);
            d.suppressed = 0;
            d.other_sources = 0;
            out
        };
        let by: serde_json::Map<String, serde_json::Value> =
            sources.iter().map(|(ip, n)| (ip.to_string(), (*n).into())).collect();
        let detail = serde_json::json!({
            "count": count,
            "since_ms": since,
            "sources": by,
            "other_sources": other,
        });
        if let Err(e) = self.record("unauthenticated", "denied_suppressed", None, "unauthorized", Some(&detail)) {
            tracing::error!(error = %e, "LI audit log: cannot write the summary of denied requests");
            let mut d = self.denied.lock().unwrap_or_else(|e| e.into_inner());
            if d.suppressed == 0 {
                d.first_suppressed_ms = since;
            }
            d.suppressed += count;
            d.other_sources += other;
            for (ip, n) in sources {
                if let Some(m) = d.by_source.get_mut(&ip) {
                    *m += n;
                } else if d.by_source.len() < SUMMARY_SOURCES {
                    d.by_source.insert(ip, n);
                } else {
                    d.other_sources += n;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hasp-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("sub").join("audit.log")
    }

    #[test]
    fn intent_and_outcome_share_a_request_id_and_the_file_is_private() {
        let p = tmp("intent");
        let log = AuditLog::open(&p).unwrap();
        let req = log.intent("li-token@1.2.3.4:5", "activate", Some("x"), None).unwrap();
        log.outcome(&req, "li-token@1.2.3.4:5", "activate", Some("x"), "ok").unwrap();
        let l = lines(&p);
        assert_eq!((l[0]["outcome"].as_str(), l[1]["outcome"].as_str()), (Some("pending"), Some("ok")));
        assert_eq!(l[0]["req"], l[1]["req"]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(p.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_rotated_log_is_recreated_and_an_unwritable_one_fails_the_write() {
        let p = tmp("rotate");
        let log = AuditLog::open(&p).unwrap();
        log.record("w", "list", None, "ok", None).unwrap();
        std::fs::rename(&p, p.with_extension("1")).unwrap();
        log.record("w", "list", None, "ok", None).unwrap();
        assert_eq!(lines(&p).len(), 1);
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(log.intent("w", "activate", None, None).is_err());
    }

    #[test]
    fn denied_requests_past_the_burst_are_summarised() {
        let p = tmp("denied");
        let log = AuditLog::open(&p).unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let n = DENIED_BURST as usize * 10;
        let recorded = (0..n)
            .filter(|_| log.admit_denied(ip))
            .inspect(|_| log.record_denied("unauthenticated@x", &"/x".repeat(1000)).unwrap())
            .count();
        assert!(recorded >= DENIED_BURST as usize && recorded < n / 2, "{recorded}");
        log.denied.lock().unwrap().last_summary -= SUMMARY_INTERVAL;
        log.flush_denied();
        let l = lines(&p);
        let summary = l.iter().find(|e| e["action"] == "denied_suppressed").unwrap();
        assert_eq!(summary["detail"]["count"].as_u64().unwrap() as usize + recorded, n);
        assert_eq!(summary["detail"]["sources"]["192.0.2.7"].as_u64().unwrap() as usize, n - recorded);
        assert_eq!(l.len(), recorded + 1);
        assert!(l[0]["detail"].as_str().unwrap().len() <= DENIED_DETAIL_MAX);
        // Nothing more to say: no second summary.
        log.denied.lock().unwrap().last_summary -= SUMMARY_INTERVAL;
        log.flush_denied();
        assert_eq!(lines(&p).len(), recorded + 1);
    }
}
