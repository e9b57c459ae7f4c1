//! HTTP digest authentication for SIP (RFC 3261 §22, RFC 7616 / RFC 8760 algorithms
//! MD5 and SHA-256), sans IO. Nonces are stateless: a timestamp and a keyed hash of it,
//! so any proxy sharing the secret can check any other's nonce, and they expire.

use md5::Md5;
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5 (RFC 2617), what most phones still send.
    Md5,
    /// SHA-256 (RFC 7616, RFC 8760).
    Sha256,
}

impl Algorithm {
    /// Name as in the header.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    fn hash(self, s: &str) -> String {
        match self {
            Algorithm::Md5 => hex(&Md5::digest(s.as_bytes())),
            Algorithm::Sha256 => hex(&Sha256::digest(s.as_bytes())),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How long a nonce stays valid.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(300);

/// Issues and checks nonces with a secret.
#[derive(Debug, Clone)]
pub struct Nonces {
    secret: String,
}

impl Nonces {
    /// With the shared secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self { secret: secret.into() }
    }

    /// A nonce for `now` (Unix seconds).
    pub fn issue(&self, now: u64) -> String {
        format!("{now:x}.{}", &Algorithm::Sha256.hash(&format!("{}:{now}", self.secret))[..24])
    }

    /// Checks a nonce: ours and not expired.
    pub fn check(&self, nonce: &str, now: u64) -> Result<(), NonceError> {
        let (ts, mac) = nonce.split_once('.').ok_or(NonceError::Invalid)?;
        let t = u64::from_str_radix(ts, 16).map_err(|_| NonceError::Invalid)?;
        if Algorithm::Sha256.hash(&format!("{}:{t}", self.secret))[..24] != *mac {
            return Err(NonceError::Invalid);
        }
        if now.saturating_sub(t) > NONCE_LIFETIME.as_secs() || t > now + 5 {
            return Err(NonceError::Stale);
        }
        Ok(())
    }
}

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceError {
    /// Not one of ours.
    Invalid,
    /// Ours, but too old: challenge again with `stale=true`.
    Stale,
}

/// The `WWW-Authenticate` value of a challenge.
pub fn challenge(realm: &str, nonce: &str, alg: Algorithm, stale: bool) -> String {
    format!(
        "Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{}",
        alg.name(),
        if stale { ", stale=true" } else { "" }
    )
}

/// Parsed `Authorization` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// username
    pub username: String,
    /// realm
    pub realm: String,
    /// nonce
    pub nonce: String,
    /// uri
    pub uri: String,
    /// response
    pub response: String,
    /// algorithm
    pub algorithm: Option<String>,
    /// qop
    pub qop: Option<String>,
    /// nc
    pub nc: Option<String>,
    /// cnonce
    pub cnonce: Option<String>,
}

/// Parses `Digest k="v", k=v, …`.
pub fn parse_credentials(value: &str) -> Option<Credentials> {
    let rest = value.trim().strip_prefix("Digest")?.trim();
    let mut c = Credentials::default();
    let mut s = rest;
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        let v = v.to_string();
        match k.as_str() {
            "username" => c.username = v,
            "realm" => c.realm = v,
            "nonce" => c.nonce = v,
            "uri" => c.uri = v,
            "response" => c.response = v,
            "algorithm" => c.algorithm = Some(v),
            "qop" => c.qop = Some(v),
            "nc" => c.nc = Some(v),
            "cnonce" => c.cnonce = Some(v),
            _ => {}
        }
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    (!c.username.is_empty() && !c.response.is_empty()).then_some(c)
}

/// The expected `response` for credentials, a method and the user's password.
pub fn expected_response(c: &Credentials, method: &str, password: &str) -> Option<String> {
    let alg = match c.algorithm.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("MD5") => Algorithm::Md5,
        Some("SHA-256") => Algorithm::Sha256,
        _ => return None,
    };
    let ha1 = alg.hash(&format!("{}:{}:{password}", c.username, c.realm));
    let ha2 = alg.hash(&format!("{method}:{}", c.uri));
    Some(match (&c.qop, &c.nc, &c.cnonce) {
        (Some(q), Some(nc), Some(cn)) if q == "auth" => alg.hash(&format!("{ha1}:{}:{nc}:{cn}:{q}:{ha2}", c.nonce)),
        _ => alg.hash(&format!("{ha1}:{}:{ha2}", c.nonce)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc2617_example_md5() {
        // RFC 2617 §3.5's example, with SIP's method.
        let c = Credentials {
            username: "Mufasa".into(),
            realm: "testrealm@host.com".into(),
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093".into(),
            uri: "/dir/index.html".into(),
            response: String::new(),
            algorithm: None,
            qop: Some("auth".into()),
            nc: Some("00000001".into()),
            cnonce: Some("0a4f113b".into()),
        };
        assert_eq!(expected_response(&c, "GET", "Circle Of Life").unwrap(), "6629fae49393a05397450978507c4ef1");
    }

    #[test]
    fn rfc7616_example_sha256() {
        let c = Credentials {
            username: "Mufasa".into(),
            realm: "http-auth@example.org".into(),
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v".into(),
            uri: "/dir/index.html".into(),
            response: String::new(),
            algorithm: Some("SHA-256".into()),
            qop: Some("auth".into()),
            nc: Some("00000001".into()),
            cnonce: Some("f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ".into()),
        };
        assert_eq!(
            expected_response(&c, "GET", "Circle of Life").unwrap(),
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn parses_headers_and_checks_nonces() {
        let v = r#"Digest username="alice", realm="example.com", nonce="abc", uri="sip:example.com", response="f00", algorithm=MD5, qop=auth, nc=00000001, cnonce="xyz""#;
        let c = parse_credentials(v).unwrap();
        assert_eq!(
            (c.username.as_str(), c.nc.as_deref(), c.cnonce.as_deref()),
            ("alice", Some("00000001"), Some("xyz"))
        );
        let n = Nonces::new("s3cret");
        let nonce = n.issue(1000);
        assert_eq!(n.check(&nonce, 1100), Ok(()));
        assert_eq!(n.check(&nonce, 1000 + 301), Err(NonceError::Stale));
        assert_eq!(Nonces::new("other").check(&nonce, 1100), Err(NonceError::Invalid));
        assert_eq!(n.check("garbage", 1100), Err(NonceError::Invalid));
        assert!(challenge("example.com", &nonce, Algorithm::Sha256, true).contains("algorithm=SHA-256"));
    }
}
