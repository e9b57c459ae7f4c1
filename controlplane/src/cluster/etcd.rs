//! The etcd backend: each member is one key, `PREFIX/ROLE/ID` → its JSON, attached to
//! a lease of its own (TTL 3 s, kept alive every second), so etcd removes a member that
//! stops renewing. One watch per process follows the whole prefix from the revision
//! of an initial read, so the view is never a stale copy patched by guesses.
//!
//! Every endpoint is configured. A connection serves one endpoint at a time and
//! requires a leader (a node cut off from the quorum answers an error rather than a
//! frozen view); on any error the task moves to the next endpoint. A member whose
//! lease was lost while it was cut off joins again with a new lease.

use super::{Campaign, Error, Member, Membership, Registration, View, RENEW_EVERY};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Deadline of one request (grant, put, keep-alive answer, read).
const REQUEST: Duration = Duration::from_millis(800);
/// Pause before trying the next endpoint after an error.
const BACKOFF: Duration = Duration::from_millis(200);

/// Membership kept in an etcd cluster.
#[derive(Debug)]
pub struct EtcdMembership {
    shared: Arc<Shared>,
    tx: Arc<watch::Sender<View>>,
    watching: Mutex<bool>,
}

#[derive(Debug)]
struct Shared {
    endpoints: Vec<String>,
    next: AtomicUsize,
    /// Members' keys: `ROOT/cluster/`.
    prefix: String,
    /// Elections' keys: `ROOT/elect/`.
    elect: String,
    ttl: Duration,
}

impl Shared {
    /// A client of the next endpoint in turn.
    async fn connect(&self) -> Result<Client, Error> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST)
            .with_timeout(REQUEST)
            .with_keep_alive(Duration::from_millis(500), REQUEST)
            .with_require_leader(true);
        Client::connect([self.endpoints[i].as_str()], Some(opts)).await.map_err(backend)
    }
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(e.to_string())
}

impl EtcdMembership {
    /// Membership under the key prefix `root` (members in `ROOT/cluster/`, elections
    /// in `ROOT/elect/`) in the etcd cluster at `endpoints` (`http://host:port`),
    /// leases of `ttl`. Connects lazily.
    pub fn new(endpoints: Vec<String>, root: &str, ttl: Duration) -> Self {
        let root = root.trim_end_matches('/');
        let shared = Arc::new(Shared {
            endpoints,
            next: AtomicUsize::new(0),
            prefix: format!("{root}/cluster/"),
            elect: format!("{root}/elect/"),
            ttl,
        });
        Self { shared, tx: Arc::new(watch::channel(View::default()).0), watching: Mutex::new(false) }
    }

    /// Starts the one watch task of this process, the first time anyone asks.
    fn ensure_watching(&self) {
        let mut w = self.watching.lock().unwrap_or_else(|e| e.into_inner());
        if !*w {
            *w = true;
            tokio::spawn(follow(self.shared.clone(), self.tx.clone()));
        }
    }
}

impl Membership for EtcdMembership {
    fn register(&self, member: Member) -> Registration {
        self.ensure_watching();
        let (reg, ends) = Registration::channel(member.load);
        tokio::spawn(keep(self.shared.clone(), member, ends));
        reg
    }

    fn view(&self) -> watch::Receiver<View> {
        self.ensure_watching();
        self.tx.subscribe()
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn campaign(&self, name: &str, id: &str, ttl: Duration) -> Campaign {
        let (c, held, resigned) = Campaign::channel();
        // Outside the members' prefix: the view's watch never sees elections.
        let key = format!("{}{name}", self.shared.elect);
        tokio::spawn(campaign(self.shared.clone(), key, id.to_string(), ttl, held, resigned));
        c
    }
}

/// One campaign: take the key if nobody holds it (a transaction on its create
/// revision), attached to our lease; else wait for its deletion and try again. The
/// holder renews every quarter TTL; the moment a renewal fails it stops claiming to
/// hold (`held` false), which is before its lease can end and anyone else take over.
async fn campaign(
    shared: Arc<Shared>,
    key: String,
    id: String,
    ttl: Duration,
    held: watch::Sender<bool>,
    mut resigned: tokio::sync::oneshot::Receiver<()>,
) {
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let renew = (ttl / 4).max(Duration::from_millis(100));
    loop {
        let attempt = async {
            let mut c = shared.connect().await?;
            let lease = c.lease_grant(ttl_secs, None).await.map_err(backend)?.id();
            let (mut keeper, mut acks) = c.lease_keep_alive(lease).await.map_err(backend)?;
            let mut every = tokio::time::interval(renew);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let take = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), id.as_str(), Some(PutOptions::new().with_lease(lease)))]);
                let r = c.txn(take).await.map_err(backend)?;
                let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                let mut watch = None;
                if r.succeeded() {
                    let _ = held.send(true);
                    tracing::info!(%key, "campaign: holding");
                } else {
                    let opts = WatchOptions::new().with_start_revision(rev + 1);
                    watch = Some(c.watch(key.as_str(), Some(opts)).await.map_err(backend)?);
                }
                // Hold (renewing), or wait for the holder's key to go (renewing too, so
                // our lease is ready the moment we take the key).
                loop {
                    tokio::select! {
                        _ = every.tick() => {
                            keeper.keep_alive().await.map_err(backend)?;
                            match tokio::time::timeout(REQUEST, acks.message()).await {
                                Ok(Ok(Some(a))) if a.ttl() > 0 => {}
                                _ => return Err(Error::Backend("campaign lease lost".into())),
                            }
                        }
                        m = async {
                            match watch.as_mut() {
                                Some((_, stream)) => stream.message().await,
                                None => std::future::pending().await,
                            }
                        } => {
                            let m = m.map_err(backend)?.ok_or_else(|| Error::Backend("watch ended".into()))?;
                            if m.events().iter().any(|e| e.event_type() == EventType::Delete) {
                                break;
                            }
                        }
                        _ = &mut resigned => {
                            let _ = held.send(false);
                            let _ = tokio::time::timeout(REQUEST, c.lease_revoke(lease)).await;
                            return Ok(());
                        }
                    }
                }
            }
        };
        let r: Result<(), Error> = attempt.await;
        let _ = held.send(false);
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(%key, error = %e, "campaign: lost contact; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(BACKOFF) => {}
                    _ = &mut resigned => return,
                }
            }
        }
    }
}

/// Keeps one member's key alive until `leave` fires, then revokes its lease.
async fn keep(shared: Arc<Shared>, mut member: Member, ends: super::RenewalEnds) {
    let super::RenewalEnds { mut load, mut leave, left } = ends;
    let key = format!("{}{}", shared.prefix, member.key());
    let ttl = shared.ttl.as_secs().max(1) as i64;
    loop {
        let session = async {
            let mut c = shared.connect().await?;
            let lease = c.lease_grant(ttl, None).await.map_err(backend)?.id();
            member.load = *load.borrow_and_update();
            let json = serde_json::to_vec(&member).map_err(backend)?;
            c.put(key.as_str(), json, Some(PutOptions::new().with_lease(lease))).await.map_err(backend)?;
            let (mut keeper, mut acks) = c.lease_keep_alive(lease).await.map_err(backend)?;
            let mut every = tokio::time::interval(RENEW_EVERY);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        keeper.keep_alive().await.map_err(backend)?;
                        match tokio::time::timeout(REQUEST, acks.message()).await {
                            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                            // TTL 0: etcd no longer knows the lease (we were cut off
                            // longer than the TTL); join again with a new one.
                            Ok(Ok(Some(_))) => return Err(Error::Backend("lease expired".into())),
                            Ok(Ok(None)) => return Err(Error::Backend("keep-alive stream ended".into())),
                            Ok(Err(e)) => return Err(backend(e)),
                            Err(_) => return Err(Error::Backend("keep-alive timed out".into())),
                        }
                    }
                    r = load.changed() => {
                        if r.is_err() {
                            // The registration was dropped: same as leaving.
                            return Ok(Some((c, lease)));
                        }
                        member.load = *load.borrow_and_update();
                        let json = serde_json::to_vec(&member).map_err(backend)?;
                        c.put(key.as_str(), json, Some(PutOptions::new().with_lease(lease))).await.map_err(backend)?;
                    }
                    _ = &mut leave => return Ok(Some((c, lease))),
                }
            }
            #[allow(unreachable_code)]
            Ok::<Option<(Client, i64)>, Error>(None)
        };
        match session.await {
            Ok(Some((mut c, lease))) => {
                // Leave at once rather than when the lease runs out.
                let _ = tokio::time::timeout(REQUEST, c.lease_revoke(lease)).await;
                let _ = left.send(());
                return;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(member = %member.key(), error = %e, "membership: renewing failed; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(BACKOFF) => {}
                    _ = &mut leave => return,
                }
            }
        }
    }
}

/// Follows the prefix: one read, then a watch from the read's revision; publishes every
/// change. Reconnects (next endpoint, fresh read) on any error.
async fn follow(shared: Arc<Shared>, tx: Arc<watch::Sender<View>>) {
    loop {
        if let Err(e) = follow_once(&shared, &tx).await {
            tracing::warn!(error = %e, "membership: watch failed; reconnecting");
        }
        if tx.is_closed() && tx.receiver_count() == 0 && Arc::strong_count(&tx) == 1 {
            return;
        }
        tokio::time::sleep(BACKOFF).await;
    }
}

async fn follow_once(shared: &Shared, tx: &watch::Sender<View>) -> Result<(), Error> {
    let mut c = shared.connect().await?;
    let read = c.get(shared.prefix.as_str(), Some(GetOptions::new().with_prefix())).await.map_err(backend)?;
    let mut rev = read.header().map(|h| h.revision()).unwrap_or(0);
    let mut members: BTreeMap<Vec<u8>, Member> = BTreeMap::new();
    for kv in read.kvs() {
        if let Ok(m) = serde_json::from_slice::<Member>(kv.value()) {
            members.insert(kv.key().to_vec(), m);
        }
    }
    publish(tx, rev, &members);
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
    let (_watcher, mut stream) = c.watch(shared.prefix.as_str(), Some(opts)).await.map_err(backend)?;
    while let Some(r) = stream.message().await.map_err(backend)? {
        if r.canceled() {
            return Err(Error::Backend(format!("watch canceled: {}", r.cancel_reason())));
        }
        for ev in r.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => match serde_json::from_slice::<Member>(kv.value()) {
                    Ok(m) => {
                        members.insert(kv.key().to_vec(), m);
                    }
                    // Someone else's key under our prefix: ignored, never fatal.
                    Err(_) => {
                        members.remove(kv.key());
                    }
                },
                EventType::Delete => {
                    members.remove(kv.key());
                }
            }
            rev = rev.max(kv.mod_revision());
        }
        if let Some(h) = r.header() {
            rev = rev.max(h.revision());
        }
        publish(tx, rev, &members);
    }
    Err(Error::Backend("watch stream ended".into()))
}

fn publish(tx: &watch::Sender<View>, revision: i64, members: &BTreeMap<Vec<u8>, Member>) {
    let mut list: Vec<Member> = members.values().cloned().collect();
    list.sort_by(|a, b| (a.role, &a.id).cmp(&(b.role, &b.id)));
    let v = View { revision: revision.max(0) as u64, members: list.into() };
    tx.send_if_modified(|cur| {
        if cur.members == v.members {
            return false;
        }
        *cur = v;
        true
    });
}
