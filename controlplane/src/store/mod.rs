//! Credentials, registrations and dialogs behind one trait, so one proxy on one machine
//! uses an embedded file, several share etcd, and tests and simulations use memory. One
//! test battery (`battery`) runs against every backend.
//!
//! [`open`] takes a spec string:
//!
//! | spec | backend |
//! |---|---|
//! | `embedded:PATH` | [`embedded::Embedded`]: one redb file at `PATH`, created if missing |
//! | `etcd:URL,URL,…` | [`etcd::Etcd`]: an etcd cluster, every member listed (`http://host:port`) |
//! | `memory:` | [`memory::Memory`] with [`memory::Limits::default`]: nothing survives the process |

mod battery;
pub mod embedded;
pub mod etcd;
pub mod memory;

#[doc(hidden)]
pub use battery::battery;

use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A registered contact of an address of record.
///
/// A binding registered through an RFC 5626 flow carries the device's `+sip.instance`
/// and the flow's `reg-id`: one device keeping two flows (two REGISTERs through two
/// load balancers) has two bindings, each with the Path of its own flow. Both fields
/// are absent from records written before them (serde defaults) and from plain
/// RFC 3261 registrations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The Contact URI.
    pub contact: String,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Path headers (RFC 3327), outermost first: the route to the contact.
    #[serde(default)]
    pub path: Vec<String>,
    /// Call-ID of the REGISTER that made it.
    pub call_id: String,
    /// CSeq of that REGISTER.
    pub cseq: u32,
    /// Where the REGISTER came from (`IP:PORT`), to reach a contact behind NAT.
    #[serde(default)]
    pub received: Option<String>,
    /// The Contact's `+sip.instance` (RFC 5626 §4.1, the device's stable id, as sent,
    /// quotes removed), if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The Contact's `reg-id` (RFC 5626 §4.2: which flow of the device), if the
    /// registration was an outbound one; with `instance`, the binding's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reg_id: Option<u32>,
}

/// The store.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The stored secret of `user@domain` (a [`sip::digest::Secret`]: HA1 hashes, never
    /// the password), if provisioned.
    fn secret(&self, user: &str, domain: &str) -> Result<Option<String>, Error>;
    /// Stores a user's secret as [`Store::secret`] returns it.
    fn put_secret(&self, user: &str, domain: &str, secret: &str) -> Result<(), Error>;
    /// Provisions or changes a user: keeps the HA1s of `password` in the realm `domain`
    /// (lower case, as the proxy challenges), not the password.
    fn put_user(&self, user: &str, domain: &str, password: &str) -> Result<(), Error> {
        let realm = domain.to_ascii_lowercase();
        self.put_secret(user, domain, &sip::digest::Secret::new(user, &realm, password).encode())
    }
    /// Unexpired bindings of an address of record.
    fn bindings(&self, aor: &str, now: u64) -> Result<Vec<Binding>, Error>;
    /// Replaces the bindings of an address of record (empty: removes it).
    fn set_bindings(&self, aor: &str, bindings: &[Binding]) -> Result<(), Error>;
    /// Remembers which media node anchors a call (`node`, its URL) for `ttl_secs` (0
    /// counts as 1), so that any proxy sharing the store sends the call's later requests
    /// (re-INVITE, BYE) to the same node. Every backend keeps it; the defaults exist for
    /// stores outside this module.
    fn put_dialog(&self, _call_id: &str, _node: &str, _ttl_secs: u64) -> Result<(), Error> {
        Ok(())
    }
    /// The media node of a call, if recorded and its TTL has not run out.
    fn dialog(&self, _call_id: &str) -> Result<Option<String>, Error> {
        Ok(None)
    }
    /// Forgets a call (a call never recorded is not an error).
    fn delete_dialog(&self, _call_id: &str) -> Result<(), Error> {
        Ok(())
    }
    /// Makes every write so far durable (called at a clean stop; backends that commit
    /// durably at once need nothing).
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Whether every call answers from this process's memory or a local file and never
    /// waits for another machine: the SIP driver then calls it on its core threads
    /// rather than handing it to the blocking pool (a hand-off costs two thread wake-ups
    /// per operation). Network backends (etcd) say no.
    fn is_local(&self) -> bool {
        false
    }
}

/// Opens a store from its spec (see the table in the module documentation).
pub fn open(spec: &str) -> Result<Arc<dyn Store>, Error> {
    match spec.split_once(':') {
        Some(("embedded", path)) => Ok(Arc::new(embedded::Embedded::open(std::path::Path::new(path))?)),
        Some(("etcd", urls)) => {
            let eps: Vec<String> =
                urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect();
            if eps.is_empty() {
                return Err(Error::Config("etcd: no endpoints".into()));
            }
            Ok(Arc::new(etcd::Etcd::connect(&eps)?))
        }
        // Nothing after the colon yet: a typo such as `memory:/var/lib/x` must not
        // silently give a store that forgets everything at a restart.
        Some(("memory", "")) => Ok(Arc::new(memory::Memory::new(memory::Limits::default()))),
        _ => Err(Error::Config(format!("store {spec:?}: expected embedded:PATH, etcd:URL,URL or memory:"))),
    }
}

/// Where a backend reads the time that TTLs run against (Unix seconds). Bindings carry
/// their own expiry and are judged by the `now` their reader passes; dialogs get a TTL,
/// so a backend that expires them itself needs a clock, and a manual one lets tests and
/// simulations expire them without sleeping.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system's wall clock.
    #[default]
    System,
    /// A clock that moves only when told.
    Manual(ManualClock),
}

impl Clock {
    /// Now, Unix seconds.
    pub fn now(&self) -> u64 {
        match self {
            Clock::System => unix_now(),
            Clock::Manual(m) => m.now(),
        }
    }
}

/// A clock moved by hand; its clones share one time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `now` (Unix seconds).
    pub fn new(now: u64) -> Self {
        Self(Arc::new(AtomicU64::new(now)))
    }

    /// The time it reads.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves it forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::Relaxed);
    }
}

/// The wall clock in Unix seconds (0 if the system clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::Binding;

    #[test]
    fn a_binding_stored_before_flows_existed_still_loads() {
        let old = r#"{"contact":"sip:a@192.0.2.1","expires_at":9,"path":[],"call_id":"c","cseq":1,"received":null}"#;
        let b: Binding = serde_json::from_str(old).unwrap();
        assert_eq!((b.instance, b.reg_id), (None, None));
        // A plain binding is written as before (no new keys), so an older proxy sharing
        // the store reads it too.
        let plain = Binding { contact: "sip:a@192.0.2.1".into(), ..Binding::default() };
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("instance") && !json.contains("reg_id"), "{json}");
    }
}
