//! The registrar (RFC 3261 §10), sans IO, in steps: the proxy core runs a REGISTER
//! through [`start`] (parse, nonce), asks the store for the user's password and checks
//! the digest ([`check_password`]), asks for the AOR's bindings and applies the request
//! to them ([`apply`]), writes them and answers [`accepted`]. Between the steps the
//! store works off the core's thread; a failed or late store answers 503
//! ([`unavailable`]).

use crate::store::Binding;
use sip::digest::{challenge, expected_response, parse_credentials, Algorithm, Credentials, NonceError, Nonces};
use sip::message::{aor_of, param, uri_of, Message};

/// Shortest registration accepted (seconds).
pub const MIN_EXPIRES: u64 = 60;
/// Longest registration granted.
pub const MAX_EXPIRES: u64 = 7200;
/// Registration interval when the client names none.
pub const DEFAULT_EXPIRES: u64 = 3600;

/// What the first step decided.
#[derive(Debug)]
pub enum Start {
    /// Answer at once (a challenge, or a request that cannot succeed).
    Reply(Message),
    /// The request carries a fresh nonce of ours: the user's password is needed.
    Authenticate {
        /// `user@domain`.
        aor: String,
        /// User part.
        user: String,
        /// Domain (our realm).
        domain: String,
        /// The credentials sent.
        creds: Box<Credentials>,
    },
}

/// The first step of a REGISTER: the AOR, the realm, and the nonce; `now` in Unix
/// seconds.
pub fn start(nonces: &Nonces, realm: &str, req: &Message, now: u64) -> Start {
    let Some(aor) = req.header("To").map(uri_of).and_then(aor_of) else {
        return Start::Reply(req.response(400, "Bad To", None));
    };
    let (user, domain) = aor.split_once('@').unwrap_or((&aor, ""));
    if !domain.eq_ignore_ascii_case(realm) {
        return Start::Reply(req.response(403, "Not Our Domain", None));
    }
    let challenge_resp = |stale: bool| {
        let mut r = req.response(401, "Unauthorized", Some("reg"));
        // Both algorithms (RFC 8760). MD5 comes first: many clients (sipp among them)
        // answer only the first challenge and fail on SHA-256; clients that support
        // SHA-256 pick it from the list.
        r.headers.push(("WWW-Authenticate".into(), challenge(realm, &nonces.issue(now), Algorithm::Md5, stale)));
        r.headers.push(("WWW-Authenticate".into(), challenge(realm, &nonces.issue(now), Algorithm::Sha256, stale)));
        Start::Reply(r)
    };
    let Some(creds) = req.header("Authorization").and_then(parse_credentials) else { return challenge_resp(false) };
    match nonces.check(&creds.nonce, now) {
        Ok(()) => {}
        Err(NonceError::Stale) => return challenge_resp(true),
        Err(NonceError::Invalid) => return challenge_resp(false),
    }
    if creds.username != user || !creds.realm.eq_ignore_ascii_case(realm) {
        return Start::Reply(req.response(403, "Forbidden", Some("reg")));
    }
    Start::Authenticate { user: user.to_string(), domain: domain.to_string(), aor: aor.clone(), creds: Box::new(creds) }
}

/// Checks the digest against the stored password (`None`: no such user).
pub fn check_password(req: &Message, creds: &Credentials, password: Option<&str>) -> Result<(), Message> {
    let Some(password) = password else { return Err(req.response(403, "Forbidden", Some("reg"))) };
    if expected_response(creds, "REGISTER", password).as_deref() != Some(creds.response.as_str()) {
        return Err(req.response(403, "Forbidden", Some("reg")));
    }
    Ok(())
}

/// Applies the REGISTER from `src` to the AOR's current (unexpired) bindings; returns
/// the bindings to store, or the error response.
pub fn apply(req: &Message, mut bindings: Vec<Binding>, src: &str, now: u64) -> Result<Vec<Binding>, Message> {
    let call_id = req.call_id().to_string();
    let cseq = req.cseq().map(|c| c.0).unwrap_or(0);
    let header_expires = req.header("Expires").and_then(|e| e.trim().parse::<u64>().ok());
    let contacts: Vec<String> = req.header_values("Contact").map(str::to_string).collect();
    if contacts.iter().any(|c| c.trim() == "*") {
        if contacts.len() != 1 || header_expires != Some(0) {
            return Err(req.response(400, "Bad Wildcard", None));
        }
        bindings.clear();
        return Ok(bindings);
    }
    let path: Vec<String> = req.header_values("Path").map(str::to_string).collect();
    for c in &contacts {
        let uri = uri_of(c).to_string();
        let expires = param(c, "expires").and_then(|e| e.parse().ok()).or(header_expires).unwrap_or(DEFAULT_EXPIRES);
        if expires > 0 && expires < MIN_EXPIRES {
            let mut r = req.response(423, "Interval Too Brief", Some("reg"));
            r.headers.push(("Min-Expires".into(), MIN_EXPIRES.to_string()));
            return Err(r);
        }
        if let Some(old) = bindings.iter().find(|b| b.contact == uri) {
            // An older REGISTER arriving late must not undo a newer one.
            if old.call_id == call_id && old.cseq >= cseq {
                continue;
            }
        }
        bindings.retain(|b| b.contact != uri);
        if expires > 0 {
            bindings.push(Binding {
                contact: uri,
                expires_at: now + expires.min(MAX_EXPIRES),
                path: path.clone(),
                call_id: call_id.clone(),
                cseq,
                received: Some(src.to_string()),
            });
        }
    }
    Ok(bindings)
}

/// The 200 listing the bindings now stored.
pub fn accepted(req: &Message, bindings: &[Binding], now: u64) -> Message {
    let mut r = req.response(200, "OK", Some("reg"));
    for b in bindings {
        r.headers.push(("Contact".into(), format!("<{}>;expires={}", b.contact, b.expires_at.saturating_sub(now))));
    }
    r
}

/// 503 with Retry-After: the store is down or late; never hang the client.
pub fn unavailable(req: &Message) -> Message {
    let mut r = req.response(503, "Service Unavailable", Some("err"));
    r.headers.push(("Retry-After".into(), "5".into()));
    r
}
