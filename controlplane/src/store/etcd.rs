//! The etcd store: several proxies share credentials and registrations. Every endpoint
//! is configured, so one node down changes nothing; each operation has a deadline, so an
//! outage answers 503 quickly instead of hanging; bindings and dialogs (call → media
//! node) carry a lease, so etcd itself expires them.
//!
//! Leases are shared, not granted per write: a key that should expire at time T is
//! attached to the lease of T's window, which ends at the first multiple of the
//! window's length at or after T (`lease_window_end`). Windows are at most 1/16 of the
//! TTL long, so a key outlives its expiry by less than that (readers of bindings filter
//! by their own expiry; a dialog's 12 h TTL is a safety net for a call that never sent
//! BYE), and a proxy grants about one lease per window instead of one per REGISTER or
//! call, which nearly halves the writes etcd replicates. Nothing keeps leases alive:
//! each simply ends with its window, so etcd expires keys even if every proxy is gone.
//! A lease etcd no longer knows (revoked, or lost with a rebuilt cluster) is replaced
//! at its next use.

use super::{unix_now, Binding, Store};
use crate::error::Error;
use etcd_client::{Client, ConnectOptions, PutOptions};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Deadline of one store operation (all attempts): long enough to ride out a leader
/// election (etcd's default election timeout is 1 s), short enough to answer 503 well
/// before a SIP client gives up (Timer F, 32 s).
const DEADLINE: Duration = Duration::from_secs(5);
/// Deadline of one attempt on one member.
const ATTEMPT: Duration = Duration::from_millis(600);

/// A client of an etcd cluster.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    endpoints: Vec<String>,
    /// One client per endpoint (connected lazily), so a dead node costs one short
    /// attempt instead of stalling a balanced channel.
    clients: std::sync::Mutex<Vec<Option<Client>>>,
    /// The endpoint that answered last: tried first.
    preferred: std::sync::atomic::AtomicUsize,
    prefix: String,
    /// End of a lease window (Unix seconds) → the lease granted for it.
    leases: std::sync::Mutex<BTreeMap<u64, i64>>,
    /// Leases granted so far.
    granted: AtomicU64,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl Etcd {
    /// Connects to every endpoint (`http://host:port`).
    pub fn connect(endpoints: &[String]) -> Result<Self, Error> {
        // The store is called from plain threads (the SIP driver, blocking API tasks):
        // it keeps a small runtime of its own for the gRPC client.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let e = Self {
            rt,
            endpoints: endpoints.to_vec(),
            clients: std::sync::Mutex::new(vec![None; endpoints.len()]),
            preferred: std::sync::atomic::AtomicUsize::new(0),
            prefix: "/hasp/".into(),
            leases: std::sync::Mutex::default(),
            granted: AtomicU64::new(0),
        };
        // At least one member must answer now: a wrong configuration fails at start.
        e.run(|mut c| async move { c.status().await })?;
        Ok(e)
    }

    fn client(&self, i: usize) -> Option<Client> {
        let mut cs = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if cs[i].is_none() {
            let opts = ConnectOptions::new()
                .with_timeout(ATTEMPT)
                .with_connect_timeout(ATTEMPT)
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(2));
            let ep = self.endpoints[i].clone();
            cs[i] = run_on(&self.rt, async move { Client::connect([ep], Some(opts)).await }, ATTEMPT).ok();
        }
        cs[i].clone()
    }

    /// How many leases this client has granted (the rest of its leased writes reused
    /// one).
    pub fn leases_granted(&self) -> u64 {
        self.granted.load(Relaxed)
    }

    /// Puts `key` so that etcd removes it at `expires_at` (Unix seconds) or a little
    /// later, on the lease of that time's window (granted here if this client has none).
    fn put_leased(&self, key: String, value: Vec<u8>, expires_at: u64) -> Result<(), Error> {
        let now = unix_now();
        let end = lease_window_end(expires_at.max(now + 1), now);
        let cached = self.leases.lock().unwrap_or_else(|e| e.into_inner()).get(&end).copied();
        let granted = self.run(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                if let Some(id) = cached {
                    match c.put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(id))).await {
                        Ok(_) => return Ok(None),
                        Err(e) if lease_not_found(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                // Counted from the grant, on etcd's clock: the lease ends at `end` or,
                // by the rounding down of `unix_now`, up to a second after.
                let ttl = end.saturating_sub(unix_now()).max(1);
                let lease = c.lease_grant(i64::try_from(ttl).unwrap_or(i64::MAX), None).await?;
                c.put(key, value, Some(PutOptions::new().with_lease(lease.id()))).await?;
                Ok(Some(lease.id()))
            }
        })?;
        if let Some(id) = granted {
            self.granted.fetch_add(1, Relaxed);
            let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            // Windows that have ended hold no keys any more.
            *leases = leases.split_off(&(now + 1));
            leases.insert(end, id);
        }
        Ok(())
    }

    fn forget(&self, i: usize) {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
    }

    fn run<T: Send + 'static, F>(&self, f: impl Fn(Client) -> F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let n = self.endpoints.len();
        let first = self.preferred.load(Relaxed) % n;
        let mut last = Error::Store("etcd: no endpoint answered".into());
        let started = std::time::Instant::now();
        // Members in turn, starting with the one that answered last, until the deadline:
        // a write during a leader election fails on every member for a moment.
        for k in 0.. {
            if started.elapsed() > DEADLINE {
                break;
            }
            if k > 0 && k % n == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            let i = (first + k) % n;
            let Some(c) = self.client(i) else { continue };
            match run_on(&self.rt, f(c), ATTEMPT) {
                Ok(v) => {
                    self.preferred.store(i, Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    self.forget(i);
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// The end (Unix seconds) of the lease window that a key expiring at `expires_at`, put
/// at `now`, goes into: the first multiple of the window's length at or after
/// `expires_at`. The length is the largest power of two not above 1/16 of the TTL, so
/// keys of similar TTLs written over a stretch of time share windows, and the
/// overshoot stays under 1/16 of the TTL (and 1 s for the shortest).
fn lease_window_end(expires_at: u64, now: u64) -> u64 {
    let len = (expires_at.saturating_sub(now) / 16).max(1);
    let len = 1u64 << len.ilog2();
    expires_at.div_ceil(len).saturating_mul(len)
}

/// Whether etcd refused a lease it does not know. Matched by message: the status code
/// (NotFound) lives in `tonic`, which this crate does not depend on, and the message is
/// etcd's fixed `ErrGRPCLeaseNotFound`.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("requested lease not found"))
}

/// Runs `fut` on the store's runtime and waits for it from any thread — also from one
/// inside another runtime (an API handler's blocking task), where `block_on` would panic.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    deadline: Duration,
) -> Result<T, Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let r = tokio::time::timeout(deadline, fut).await;
        let _ = tx.send(r);
    });
    match rx.recv_timeout(deadline + Duration::from_millis(500)) {
        Ok(Ok(r)) => r.map_err(err),
        _ => Err(Error::Store("etcd: deadline exceeded".into())),
    }
}

impl Store for Etcd {
    fn secret(&self, user: &str, domain: &str) -> Result<Option<String>, Error> {
        let key = format!("{}users/{user}@{}", self.prefix, domain.to_ascii_lowercase());
        let r = self.run(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(r.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_string))
    }

    fn put_secret(&self, user: &str, domain: &str, secret: &str) -> Result<(), Error> {
        let key = format!("{}users/{user}@{}", self.prefix, domain.to_ascii_lowercase());
        let v = secret.to_string();
        self.run(|mut c| {
            let (key, v) = (key.clone(), v.clone());
            async move { c.put(key, v, None).await }
        })
        .map(|_| ())
    }

    fn bindings(&self, aor: &str, now: u64) -> Result<Vec<Binding>, Error> {
        let key = format!("{}bindings/{aor}", self.prefix);
        let r = self.run(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        let Some(kv) = r.kvs().first() else { return Ok(Vec::new()) };
        let all: Vec<Binding> = serde_json::from_slice(kv.value()).map_err(err)?;
        Ok(all.into_iter().filter(|b| b.expires_at > now).collect())
    }

    fn put_dialog(&self, call_id: &str, node: &str, ttl_secs: u64) -> Result<(), Error> {
        let key = format!("{}dialogs/{call_id}", self.prefix);
        self.put_leased(key, node.as_bytes().to_vec(), unix_now().saturating_add(ttl_secs.max(1)))
    }

    fn dialog(&self, call_id: &str) -> Result<Option<String>, Error> {
        let key = format!("{}dialogs/{call_id}", self.prefix);
        let r = self.run(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(r.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_string))
    }

    fn delete_dialog(&self, call_id: &str) -> Result<(), Error> {
        let key = format!("{}dialogs/{call_id}", self.prefix);
        self.run(|mut c| {
            let key = key.clone();
            async move { c.delete(key, None).await }
        })
        .map(|_| ())
    }

    fn set_bindings(&self, aor: &str, bindings: &[Binding]) -> Result<(), Error> {
        let key = format!("{}bindings/{aor}", self.prefix);
        if bindings.is_empty() {
            return self
                .run(|mut c| {
                    let key = key.clone();
                    async move { c.delete(key, None).await }
                })
                .map(|_| ());
        }
        // Five seconds of grace, as when leases were granted per write: a binding read
        // just before its expiry is still there.
        let last = bindings.iter().map(|b| b.expires_at).max().unwrap_or(0);
        let v = serde_json::to_vec(bindings).map_err(err)?;
        self.put_leased(key, v, last.max(unix_now()).saturating_add(5))
    }
}

#[cfg(test)]
mod tests {
    use super::lease_window_end;

    #[test]
    fn a_lease_window_ends_at_or_after_the_expiry_by_less_than_a_sixteenth_of_the_ttl() {
        let now = 1_700_000_000;
        for ttl in [1, 2, 5, 15, 16, 17, 60, 605, 3605, 7205, 12 * 3600, 30 * 86400] {
            for dt in 0..300 {
                let exp = now + dt + ttl;
                let end = lease_window_end(exp, now + dt);
                assert!(end >= exp, "ttl {ttl}: window ends before the key expires");
                assert!(end - exp < (ttl / 16).max(1), "ttl {ttl}: {end} - {exp} too late");
            }
        }
    }

    #[test]
    fn keys_of_one_ttl_written_over_a_while_share_few_windows() {
        let now = 1_700_000_000;
        let windows = |ttl: u64, over: u64| {
            let mut ends: Vec<u64> = (0..over).map(|dt| lease_window_end(now + dt + ttl, now + dt)).collect();
            ends.dedup();
            ends.len() as u64
        };
        // A REGISTER every second for an hour (Expires 3600, +5 s grace): one lease per
        // 128 s window, not 3600.
        assert!(windows(3605, 3600) <= 3600 / 128 + 1, "{}", windows(3605, 3600));
        // A call every second for an hour with the dialog TTL of 12 h: windows of 2048 s.
        assert!(windows(12 * 3600, 3600) <= 3);
        // Two-second TTLs get one-second windows: an exact expiry.
        assert_eq!(lease_window_end(now + 2, now), now + 2);
    }
}
