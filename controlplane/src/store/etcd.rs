//! The etcd store: several proxies share credentials and registrations. Every endpoint
//! is configured, so one node down changes nothing; each operation has a deadline, so an
//! outage answers 503 quickly instead of hanging; bindings and dialogs (call → media
//! node) carry a lease, so etcd itself expires them.

use super::{Binding, Store};
use crate::error::Error;
use etcd_client::{Client, ConnectOptions, PutOptions};
use std::future::Future;
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

    fn forget(&self, i: usize) {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
    }

    fn run<T: Send + 'static, F>(&self, f: impl Fn(Client) -> F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        use std::sync::atomic::Ordering::Relaxed;
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
    fn password(&self, user: &str, domain: &str) -> Result<Option<String>, Error> {
        let key = format!("{}users/{user}@{}", self.prefix, domain.to_ascii_lowercase());
        let r = self.run(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(r.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_string))
    }

    fn put_user(&self, user: &str, domain: &str, password: &str) -> Result<(), Error> {
        let key = format!("{}users/{user}@{}", self.prefix, domain.to_ascii_lowercase());
        let v = password.to_string();
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
        let (v, ttl) = (node.to_string(), ttl_secs.max(1) as i64);
        self.run(|mut c| {
            let (key, v) = (key.clone(), v.clone());
            async move {
                let lease = c.lease_grant(ttl, None).await?;
                c.put(key, v, Some(PutOptions::new().with_lease(lease.id()))).await
            }
        })
        .map(|_| ())
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
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let ttl = bindings.iter().map(|b| b.expires_at).max().unwrap_or(now).saturating_sub(now) as i64 + 5;
        let v = serde_json::to_vec(bindings).map_err(err)?;
        self.run(|mut c| {
            let (key, v) = (key.clone(), v.clone());
            async move {
                let lease = c.lease_grant(ttl, None).await?;
                c.put(key, v, Some(PutOptions::new().with_lease(lease.id()))).await
            }
        })
        .map(|_| ())
    }
}
