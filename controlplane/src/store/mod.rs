//! Credentials and registrations behind one trait, so one proxy on one machine uses an
//! embedded file and several share etcd. One test battery runs against every backend.

pub mod embedded;
pub mod etcd;

use crate::error::Error;
use serde::{Deserialize, Serialize};

/// A registered contact of an address of record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// The store.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The password of `user@domain`, if provisioned.
    fn password(&self, user: &str, domain: &str) -> Result<Option<String>, Error>;
    /// Provisions or changes a user.
    fn put_user(&self, user: &str, domain: &str, password: &str) -> Result<(), Error>;
    /// Unexpired bindings of an address of record.
    fn bindings(&self, aor: &str, now: u64) -> Result<Vec<Binding>, Error>;
    /// Replaces the bindings of an address of record (empty: removes it).
    fn set_bindings(&self, aor: &str, bindings: &[Binding]) -> Result<(), Error>;
    /// Remembers which media node anchors a call (`node`, its URL) for `ttl_secs`, so
    /// that any proxy sharing the store sends the call's later requests (re-INVITE,
    /// BYE) to the same node. Backends serving one machine need not keep it: the
    /// proxy's memory does.
    fn put_dialog(&self, _call_id: &str, _node: &str, _ttl_secs: u64) -> Result<(), Error> {
        Ok(())
    }
    /// The media node of a call, if recorded.
    fn dialog(&self, _call_id: &str) -> Result<Option<String>, Error> {
        Ok(None)
    }
    /// Forgets a call.
    fn delete_dialog(&self, _call_id: &str) -> Result<(), Error> {
        Ok(())
    }
    /// Makes every write so far durable (called at a clean stop; backends that commit
    /// durably at once need nothing).
    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Opens a store from `embedded:PATH` or `etcd:URL,URL,…`.
pub fn open(spec: &str) -> Result<std::sync::Arc<dyn Store>, Error> {
    match spec.split_once(':') {
        Some(("embedded", path)) => Ok(std::sync::Arc::new(embedded::Embedded::open(std::path::Path::new(path))?)),
        Some(("etcd", urls)) => {
            let eps: Vec<String> =
                urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_string).collect();
            if eps.is_empty() {
                return Err(Error::Config("etcd: no endpoints".into()));
            }
            Ok(std::sync::Arc::new(etcd::Etcd::connect(&eps)?))
        }
        _ => Err(Error::Config(format!("store {spec:?}: expected embedded:PATH or etcd:URL,URL"))),
    }
}

/// The battery every backend passes (also run against etcd by the integration tests).
#[doc(hidden)]
pub fn battery(s: &dyn Store) {
    assert_eq!(s.password("alice", "example.com").unwrap(), None);
    s.put_user("alice", "example.com", "pw1").unwrap();
    assert_eq!(s.password("alice", "example.com").unwrap().as_deref(), Some("pw1"));
    s.put_user("alice", "example.com", "pw2").unwrap();
    assert_eq!(s.password("alice", "example.com").unwrap().as_deref(), Some("pw2"));
    assert_eq!(s.password("alice", "example.org").unwrap(), None);
    let b = |c: &str, exp: u64| Binding {
        contact: c.into(),
        expires_at: exp,
        path: vec!["<sip:edge;lr>".into()],
        call_id: "r1".into(),
        cseq: 1,
        received: None,
    };
    s.set_bindings("alice@example.com", &[b("sip:a@1.2.3.4", 100), b("sip:a@5.6.7.8", 200)]).unwrap();
    assert_eq!(s.bindings("alice@example.com", 50).unwrap().len(), 2);
    assert_eq!(s.bindings("alice@example.com", 150).unwrap(), vec![b("sip:a@5.6.7.8", 200)], "expired ones are gone");
    s.set_bindings("alice@example.com", &[]).unwrap();
    assert!(s.bindings("alice@example.com", 0).unwrap().is_empty());
}
