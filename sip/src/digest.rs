//! HTTP digest authentication for SIP (RFC 3261 §22, RFC 7616 / RFC 8760 algorithms
//! MD5 and SHA-256), sans IO. Nonces are a timestamp, a random salt and an HMAC of both,
//! so any proxy sharing the secret can check any other's nonce, and they expire. A nonce
//! is accepted once per nonce-count ([`Replays`]): a captured request replayed is
//! challenged again (`stale=true`). Users' secrets are kept as HA1 hashes ([`Secret`]),
//! never as passwords, and responses are compared in constant time.

use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use subtle::ConstantTimeEq;

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

    /// The algorithm a credentials' `algorithm=` names (absent: MD5).
    pub fn of(c: &Credentials) -> Option<Self> {
        match c.algorithm.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("MD5") => Some(Algorithm::Md5),
            Some("SHA-256") => Some(Algorithm::Sha256),
            _ => None,
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How long a nonce stays valid.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(300);

/// Hex digits of the nonce MAC kept (96 bits).
const MAC_HEX: usize = 24;

/// Issues and checks nonces with a secret.
#[derive(Clone)]
pub struct Nonces {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces").finish_non_exhaustive()
    }
}

impl Nonces {
    /// With the shared secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self { secret: secret.into().into_bytes() }
    }

    fn mac(&self, body: &str) -> String {
        // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        m.update(body.as_bytes());
        hex(&m.finalize().into_bytes())[..MAC_HEX].to_string()
    }

    /// A nonce for `now` (Unix seconds); `salt` (random, from the caller's CSPRNG) makes
    /// every challenge's nonce unique, so counting its uses ([`Replays`]) is exact.
    pub fn issue(&self, now: u64, salt: u64) -> String {
        let body = format!("{now:x}.{salt:016x}");
        let mac = self.mac(&body);
        format!("{body}.{mac}")
    }

    /// Checks a nonce: ours (MAC compared in constant time) and not expired.
    pub fn check(&self, nonce: &str, now: u64) -> Result<(), NonceError> {
        let (body, mac) = nonce.rsplit_once('.').ok_or(NonceError::Invalid)?;
        let (ts, salt) = body.split_once('.').ok_or(NonceError::Invalid)?;
        if ts.len() > 16 || salt.len() != 16 || !salt.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NonceError::Invalid);
        }
        let t = u64::from_str_radix(ts, 16).map_err(|_| NonceError::Invalid)?;
        if !bool::from(self.mac(body).as_bytes().ct_eq(mac.as_bytes())) {
            return Err(NonceError::Invalid);
        }
        if now.saturating_sub(t) > NONCE_LIFETIME.as_secs() || t > now + 5 {
            return Err(NonceError::Stale);
        }
        Ok(())
    }
}

/// The nonce-counts seen per nonce, shared by every core of a proxy: a nonce is good
/// for one request per nonce-count (`nc` must grow; without `qop`, one request). Entries
/// expire with their nonce; the table is bounded (when full, the oldest nonces are
/// dropped, and a client using one of those is challenged again: safe, never a replay).
#[derive(Debug)]
pub struct Replays {
    seen: Mutex<HashMap<String, (u32, u64)>>,
    cap: usize,
}

impl Default for Replays {
    fn default() -> Self {
        Self::new(1 << 20)
    }
}

impl Replays {
    /// A table of at most `cap` nonces.
    pub fn new(cap: usize) -> Self {
        Self { seen: Mutex::new(HashMap::new()), cap: cap.max(1) }
    }

    /// Records a use of `nonce` with nonce-count `nc` (None: no qop) at `now`; false if
    /// that count (or a later one) was used already: a replay.
    pub fn fresh(&self, nonce: &str, nc: Option<&str>, now: u64) -> bool {
        let nc = match nc {
            Some(n) => match u32::from_str_radix(n, 16) {
                Ok(n) if n > 0 => n,
                _ => return false,
            },
            None => 1,
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last, _)) = seen.get(nonce) {
            if nc <= *last {
                return false;
            }
        }
        if seen.len() >= self.cap && !seen.contains_key(nonce) {
            let horizon = now.saturating_sub(NONCE_LIFETIME.as_secs());
            seen.retain(|_, (_, t)| *t > horizon);
            if seen.len() >= self.cap {
                // Still full of live nonces: forget the oldest half.
                let mut ts: Vec<u64> = seen.values().map(|(_, t)| *t).collect();
                ts.sort_unstable();
                let cut = ts[ts.len() / 2];
                seen.retain(|_, (_, t)| *t > cut);
            }
        }
        seen.insert(nonce.to_string(), (nc, now));
        true
    }

    /// Nonces tracked.
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a registrar keeps of a user's password: HA1 = H(user:realm:password) for each
/// algorithm, never the password itself. Encoded as `ha1;md5=<hex>;sha-256=<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    md5: String,
    sha256: String,
}

impl Secret {
    /// Prefix of the stored form.
    pub const PREFIX: &'static str = "ha1;";

    /// The HA1s of `user` in `realm` with `password`.
    pub fn new(user: &str, realm: &str, password: &str) -> Self {
        let a1 = format!("{user}:{realm}:{password}");
        Self { md5: Algorithm::Md5.hash(&a1), sha256: Algorithm::Sha256.hash(&a1) }
    }

    /// The stored form.
    pub fn encode(&self) -> String {
        format!("{}md5={};sha-256={}", Self::PREFIX, self.md5, self.sha256)
    }

    /// Reads a stored secret. A value without the prefix is a password kept by an older
    /// version: its HA1s are derived here (rewrite it with `hasp user add` to stop keeping it).
    pub fn decode(stored: &str, user: &str, realm: &str) -> Option<Self> {
        let Some(rest) = stored.strip_prefix(Self::PREFIX) else { return Some(Self::new(user, realm, stored)) };
        let (mut md5, mut sha256) = (None, None);
        for part in rest.split(';') {
            match part.split_once('=') {
                Some(("md5", v)) if v.len() == 32 => md5 = Some(v.to_string()),
                Some(("sha-256", v)) if v.len() == 64 => sha256 = Some(v.to_string()),
                _ => return None,
            }
        }
        Some(Self { md5: md5?, sha256: sha256? })
    }

    fn ha1(&self, alg: Algorithm) -> &str {
        match alg {
            Algorithm::Md5 => &self.md5,
            Algorithm::Sha256 => &self.sha256,
        }
    }

    /// Whether `c` is a correct answer for `method` (constant-time comparison).
    pub fn verify(&self, c: &Credentials, method: &str) -> bool {
        let Some(alg) = Algorithm::of(c) else { return false };
        let expected = response_from_ha1(alg, self.ha1(alg), c, method);
        bool::from(expected.as_bytes().ct_eq(c.response.to_ascii_lowercase().as_bytes()))
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
    let alg = Algorithm::of(c)?;
    let ha1 = alg.hash(&format!("{}:{}:{password}", c.username, c.realm));
    Some(response_from_ha1(alg, &ha1, c, method))
}

fn response_from_ha1(alg: Algorithm, ha1: &str, c: &Credentials, method: &str) -> String {
    let ha2 = alg.hash(&format!("{method}:{}", c.uri));
    match (&c.qop, &c.nc, &c.cnonce) {
        (Some(q), Some(nc), Some(cn)) if q == "auth" => alg.hash(&format!("{ha1}:{}:{nc}:{cn}:{q}:{ha2}", c.nonce)),
        _ => alg.hash(&format!("{ha1}:{}:{ha2}", c.nonce)),
    }
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
        let nonce = n.issue(1000, 42);
        assert_ne!(nonce, n.issue(1000, 43), "the salt makes every nonce unique");
        assert_eq!(n.check(&nonce, 1100), Ok(()));
        assert_eq!(n.check(&nonce, 1000 + 301), Err(NonceError::Stale));
        assert_eq!(Nonces::new("other").check(&nonce, 1100), Err(NonceError::Invalid));
        assert_eq!(n.check("garbage", 1100), Err(NonceError::Invalid));
        let forged = format!("{}0", &nonce[..nonce.len() - 1]);
        assert_eq!(n.check(&forged, 1100), Err(NonceError::Invalid));
        assert!(challenge("example.com", &nonce, Algorithm::Sha256, true).contains("algorithm=SHA-256"));
    }

    #[test]
    fn a_nonce_count_is_good_once() {
        let r = Replays::new(8);
        assert!(r.fresh("n1", Some("00000001"), 10));
        assert!(!r.fresh("n1", Some("00000001"), 11), "the same count again is a replay");
        assert!(r.fresh("n1", Some("00000002"), 12));
        assert!(!r.fresh("n1", Some("00000002"), 12));
        assert!(r.fresh("n2", None, 12));
        assert!(!r.fresh("n2", None, 13), "without qop a nonce is good for one request");
        assert!(!r.fresh("n3", Some("0"), 13) && !r.fresh("n3", Some("zz"), 13));
        for i in 0..100 {
            assert!(r.fresh(&format!("x{i}"), None, 1000 + i));
        }
        assert!(r.len() <= 8, "bounded: {}", r.len());
    }

    #[test]
    fn secrets_keep_ha1s_and_verify_like_passwords() {
        let s = Secret::new("Mufasa", "testrealm@host.com", "Circle Of Life");
        let enc = s.encode();
        assert!(!enc.contains("Circle"), "{enc}");
        assert_eq!(Secret::decode(&enc, "Mufasa", "testrealm@host.com"), Some(s.clone()));
        assert_eq!(Secret::decode("Circle Of Life", "Mufasa", "testrealm@host.com"), Some(s.clone()));
        assert_eq!(Secret::decode("ha1;md5=zz", "Mufasa", "testrealm@host.com"), None);
        let mut c = Credentials {
            username: "Mufasa".into(),
            realm: "testrealm@host.com".into(),
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093".into(),
            uri: "/dir/index.html".into(),
            response: "6629fae49393a05397450978507c4ef1".into(),
            algorithm: None,
            qop: Some("auth".into()),
            nc: Some("00000001".into()),
            cnonce: Some("0a4f113b".into()),
        };
        assert!(s.verify(&c, "GET"));
        assert!(!s.verify(&c, "INVITE"));
        c.response = "6629fae49393a05397450978507c4ef0".into();
        assert!(!s.verify(&c, "GET"));
        c.algorithm = Some("SHA-512".into());
        assert!(!s.verify(&c, "GET"));
    }
}
