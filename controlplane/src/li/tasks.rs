//! LI tasks (X1-like): what to intercept and where to deliver it.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// What a task intercepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    /// A relay session id.
    Session(String),
    /// A SIP Call-ID.
    CallId(String),
    /// A SIP address of record (`user@domain`): its calls' signalling and media.
    Aor(String),
}

/// Where PDUs go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// A mediation function's TCP address.
    pub tcp: SocketAddr,
    /// TLS on that connection (plain TCP when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// TLS to a mediation function, mutual when a client certificate is given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Name the mediation function's certificate must carry.
    pub server_name: String,
    /// PEM file of the CA(s) that sign the mediation function's certificate.
    pub ca: String,
    /// PEM certificate chain presented to the mediation function (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// PEM private key of `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Tls {
    /// Loads the CA and client certificate into a rustls client configuration.
    pub fn client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&self.ca).map_err(|e| format!("tls.ca {}: {e}", self.ca))?;
        for c in cas {
            roots
                .add(c.map_err(|e| format!("tls.ca {}: {e}", self.ca))?)
                .map_err(|e| format!("tls.ca {}: {e}", self.ca))?;
        }
        if roots.is_empty() {
            return Err(format!("tls.ca {} holds no certificate", self.ca));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let cfg = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let chain = CertificateDer::pem_file_iter(c)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("tls.cert {c}: {e}"))?;
                let key = PrivateKeyDer::from_pem_file(k).map_err(|e| format!("tls.key {k}: {e}"))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("tls client certificate: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("tls.cert and tls.key go together".into()),
        };
        Ok(std::sync::Arc::new(cfg))
    }
}

/// A task as provisioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// Task id (XID): a UUID.
    pub xid: String,
    /// Targets (at least one).
    pub targets: Vec<Target>,
    /// Destinations (at least one).
    pub destinations: Vec<Destination>,
    /// Start, Unix seconds; active at once when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    /// End, Unix seconds; open-ended when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<u64>,
    /// Also write intercepted media to this pcap file (for operators' tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcap: Option<String>,
}

/// A partial update (`PATCH`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskPatch {
    /// New targets.
    pub targets: Option<Vec<Target>>,
    /// New destinations.
    pub destinations: Option<Vec<Destination>>,
    /// New start.
    pub start: Option<u64>,
    /// New end.
    pub end: Option<u64>,
}

/// Parses a UUID (8-4-4-4-12 hex digits) into its 16 bytes.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = s.split('-').collect();
    if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Task {
    /// Checks the task; the error says what is wrong.
    pub fn validate(&self) -> Result<[u8; 16], String> {
        let xid = parse_uuid(&self.xid).ok_or_else(|| format!("xid {:?} is not a UUID", self.xid))?;
        if self.targets.is_empty() {
            return Err("a task needs at least one target".into());
        }
        if self.destinations.is_empty() {
            return Err("a task needs at least one destination".into());
        }
        for t in &self.targets {
            let v = match t {
                Target::Session(v) | Target::CallId(v) | Target::Aor(v) => v,
            };
            if v.is_empty() || v.len() > 1024 {
                return Err("a target must be 1-1024 characters".into());
            }
            if let Target::Aor(a) = t {
                if !a.contains('@') {
                    return Err(format!("aor {a:?} is not user@domain"));
                }
            }
        }
        for d in &self.destinations {
            if let Some(t) = &d.tls {
                rustls_pki_types::ServerName::try_from(t.server_name.as_str())
                    .map_err(|_| format!("tls.server_name {:?} is not a host name", t.server_name))?;
                t.client_config()?;
            }
        }
        if let (Some(s), Some(e)) = (self.start, self.end) {
            if e <= s {
                return Err("end must be after start".into());
            }
        }
        Ok(xid)
    }

    /// Active at `now` (Unix seconds)?
    pub fn active_at(&self, now: u64) -> bool {
        self.start.is_none_or(|s| now >= s) && self.end.is_none_or(|e| now < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tasks_and_rejects_bad_ones() {
        let t: Task = serde_json::from_str(
            r#"{"xid":"6ba7b810-9dad-11d1-80b4-00c04fd430c8","targets":[{"session":"ab"},{"call_id":"c@h"},{"aor":"alice@example.com"}],"destinations":[{"tcp":"127.0.0.1:9000"}]}"#,
        )
        .unwrap();
        assert_eq!(t.validate().unwrap()[0], 0x6b);
        assert!(t.active_at(0));
        let mut bad = t.clone();
        bad.xid = "nope".into();
        assert!(bad.validate().is_err());
        let mut bad = t.clone();
        bad.targets.clear();
        assert!(bad.validate().is_err());
        let mut bad = t.clone();
        bad.targets = vec![Target::Aor("alice".into())];
        assert!(bad.validate().is_err());
        let mut timed = t;
        timed.start = Some(100);
        timed.end = Some(200);
        assert!(!timed.active_at(99) && timed.active_at(100) && !timed.active_at(200));
        assert!(serde_json::from_str::<Task>(r#"{"xid":"x","targets":[{"phone":"1"}],"destinations":[]}"#).is_err());
    }
}
