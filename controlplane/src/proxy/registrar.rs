//! The registrar (RFC 3261 §10), sans IO, in steps: the proxy core runs a REGISTER
//! through [`start`] (parse, nonce), asks the store for the user's secret and checks
//! the digest ([`Check::verify`]), asks for the AOR's bindings and applies the request
//! to them ([`apply`]), writes them and answers [`accepted`]. Between the steps the
//! store works off the core's thread; a failed or late store answers 503
//! ([`unavailable`]). The same digest steps authenticate a proxy's callers (407).

use crate::store::Binding;
use sip::digest::{challenge, parse_credentials, Algorithm, Credentials, NonceError, Nonces, Replays, Secret};
use sip::message::{aor_of, uri_of, Message};

/// Contacts one REGISTER may carry.
pub const MAX_CONTACTS_PER_REGISTER: usize = 16;
/// Bindings one AOR may hold (phones, softclients, a few devices): more is refused
/// with 403, so one account cannot grow the store without bound.
pub const MAX_BINDINGS_PER_AOR: usize = 16;

/// Who challenges: a registrar (401, `WWW-Authenticate`, credentials in
/// `Authorization`) or a proxy (407, `Proxy-Authenticate`, `Proxy-Authorization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenger {
    /// RFC 3261 §22.2.
    Registrar,
    /// RFC 3261 §22.3.
    Proxy,
}

impl Challenger {
    /// The header the client puts its credentials in.
    pub fn credentials_header(self) -> &'static str {
        match self {
            Challenger::Registrar => "Authorization",
            Challenger::Proxy => "Proxy-Authorization",
        }
    }
}

/// A challenge for `req`: both algorithms (RFC 8760), each with a fresh nonce (`salts`
/// come from the caller's CSPRNG). MD5 comes first: many clients (sipp among them)
/// answer only the first challenge and fail on SHA-256; clients that support SHA-256
/// pick it from the list.
#[allow(clippy::too_many_arguments)]
pub fn challenge_response(
    nonces: &Nonces,
    realm: &str,
    req: &Message,
    now: u64,
    salts: [u64; 2],
    stale: bool,
    who: Challenger,
    tag: &str,
) -> Message {
    let (code, reason, header) = match who {
        Challenger::Registrar => (401, "Unauthorized", "WWW-Authenticate"),
        Challenger::Proxy => (407, "Proxy Authentication Required", "Proxy-Authenticate"),
    };
    let mut r = req.response(code, reason, Some(tag));
    r.headers.push((header.into(), challenge(realm, &nonces.issue(now, salts[0]), Algorithm::Md5, stale)));
    r.headers.push((header.into(), challenge(realm, &nonces.issue(now, salts[1]), Algorithm::Sha256, stale)));
    r
}

/// The first step of authenticating `req`: challenge (no or unusable credentials),
/// or the credentials to check against the user's secret.
pub fn credentials(
    nonces: &Nonces,
    realm: &str,
    req: &Message,
    now: u64,
    salts: [u64; 2],
    who: Challenger,
    tag: &str,
) -> Result<Credentials, Message> {
    let challenge = |stale| challenge_response(nonces, realm, req, now, salts, stale, who, tag);
    let Some(creds) = req.header(who.credentials_header()).and_then(parse_credentials) else {
        return Err(challenge(false));
    };
    match nonces.check(&creds.nonce, now) {
        Ok(()) => {}
        Err(NonceError::Stale) => return Err(challenge(true)),
        Err(NonceError::Invalid) => return Err(challenge(false)),
    }
    if !creds.realm.eq_ignore_ascii_case(realm) || creds.username.is_empty() || creds.username.len() > 128 {
        return Err(req.response(403, "Forbidden", Some(tag)));
    }
    Ok(creds)
}

/// What checking a digest answer needs besides the request: the nonce key, the
/// nonce-counts seen, the realm, the time (Unix seconds), and fresh salts and a To tag
/// for the answer if it fails.
#[derive(Debug)]
pub struct Check<'a> {
    /// The nonce key.
    pub nonces: &'a Nonces,
    /// Nonce-counts seen.
    pub replays: &'a Replays,
    /// The realm.
    pub realm: &'a str,
    /// Now, Unix seconds.
    pub now: u64,
    /// Salts for a new challenge.
    pub salts: [u64; 2],
    /// To tag of a refusal.
    pub tag: &'a str,
}

/// How a digest answer was refused: the response to send, and whether it was a replay.
#[derive(Debug)]
pub struct Refused {
    /// 403 (wrong answer or no such user), 401/407 `stale=true` (a replay: RFC 7616
    /// §3.4.5), or 503 (the store did not answer).
    pub response: Message,
    /// The same nonce and nonce-count were used before.
    pub replay: bool,
}

impl Check<'_> {
    /// Checks `creds` for `req` against the user's stored secret: `stored` is `None` when
    /// the store failed, `Some(None)` when there is no such user. The digest must match,
    /// then its nonce-count be new.
    pub fn verify(
        &self,
        req: &Message,
        creds: &Credentials,
        stored: Option<Option<&str>>,
        who: Challenger,
    ) -> Result<(), Refused> {
        let refuse = |response, replay| Err(Refused { response, replay });
        let Some(stored) = stored else { return refuse(unavailable(req, self.tag), false) };
        let secret = stored.and_then(|s| Secret::decode(s, &creds.username, self.realm));
        if !secret.is_some_and(|s| s.verify(creds, req.method())) {
            return refuse(req.response(403, "Forbidden", Some(self.tag)), false);
        }
        if !self.replays.fresh(&creds.nonce, creds.nc.as_deref(), self.now) {
            let r = challenge_response(self.nonces, self.realm, req, self.now, self.salts, true, who, self.tag);
            return refuse(r, true);
        }
        Ok(())
    }
}

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
/// seconds; `salts` for new nonces and `tag` for a response, from the caller's CSPRNG.
pub fn start(nonces: &Nonces, realm: &str, req: &Message, now: u64, salts: [u64; 2], tag: &str) -> Start {
    let Some(aor) = req.header("To").map(uri_of).and_then(aor_of) else {
        return Start::Reply(req.response(400, "Bad To", None));
    };
    let (user, domain) = aor.split_once('@').unwrap_or((&aor, ""));
    if !domain.eq_ignore_ascii_case(realm) {
        return Start::Reply(req.response(403, "Not Our Domain", None));
    }
    let creds = match credentials(nonces, realm, req, now, salts, Challenger::Registrar, tag) {
        Ok(c) => c,
        Err(r) => return Start::Reply(r),
    };
    if creds.username != user {
        return Start::Reply(req.response(403, "Forbidden", Some(tag)));
    }
    Start::Authenticate { user: user.to_string(), domain: domain.to_string(), aor: aor.clone(), creds: Box::new(creds) }
}

/// One Contact value: its URI and its header parameters, values unquoted. A quoted
/// value may hold `;`, `,` and `>` (`+sip.instance="<urn:uuid:…>"`), which
/// [`sip::message::param`] does not expect.
#[derive(Debug)]
struct ContactValue<'a> {
    uri: &'a str,
    params: Vec<(&'a str, &'a str)>,
}

impl<'a> ContactValue<'a> {
    fn parse(v: &'a str) -> Self {
        let v = v.trim();
        // A name-addr's parameters follow its `>`; an addr-spec's follow its first `;`.
        let (uri, tail) = match v.find('<').and_then(|a| v[a..].find('>').map(|b| (a, a + b))) {
            Some((a, b)) => (&v[a + 1..b], &v[b + 1..]),
            None => match v.find(';') {
                Some(i) => (&v[..i], &v[i..]),
                None => (v, ""),
            },
        };
        let mut params = Vec::new();
        let (mut quoted, mut start) = (false, 0);
        for (i, c) in tail.char_indices().chain([(tail.len(), ';')]) {
            match c {
                '"' => quoted = !quoted,
                ';' if !quoted => {
                    let p = tail[start..i].trim();
                    start = i + 1;
                    if p.is_empty() {
                        continue;
                    }
                    let (k, val) = p.split_once('=').unwrap_or((p, ""));
                    let val = val.trim();
                    let val = val.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(val);
                    params.push((k.trim(), val));
                }
                _ => {}
            }
        }
        Self { uri: uri.trim(), params }
    }

    fn param(&self, name: &str) -> Option<&'a str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

/// Whether a URI carries the parameter `name` (`;ob`, `;lr`).
pub fn uri_has_param(uri: &str, name: &str) -> bool {
    let uri = uri.split('?').next().unwrap_or(uri);
    uri.split(';').skip(1).any(|p| p.split('=').next().is_some_and(|k| k.trim().eq_ignore_ascii_case(name)))
}

/// Whether `req` lists `tag` in its Supported header (`outbound`, `path`).
fn supports(req: &Message, tag: &str) -> bool {
    req.header_values("Supported").any(|t| t.trim().eq_ignore_ascii_case(tag))
}

/// RFC 5626 §6: outbound processing applies to a REGISTER when the registrar is its
/// first hop (one Via: the connection it came on is the flow), or when the first Path
/// URI carries `ob` (an edge proxy that keeps the flow, as `hasp lb` does, said so).
fn outbound_applies(req: &Message) -> bool {
    if req.header_values("Via").nth(1).is_none() {
        return true;
    }
    req.header_values("Path").next().is_some_and(|p| uri_has_param(uri_of(p), "ob"))
}

/// Applies the REGISTER from `src` (the client's own address: behind a load balancer,
/// the one the balancer saw) to the AOR's current (unexpired) bindings; returns the
/// bindings to store, or the error response.
///
/// A Contact with `+sip.instance` and `reg-id` registered through an outbound flow
/// (RFC 5626) is keyed by the pair: it replaces the binding of the same instance and
/// reg-id whatever its URI, and the same device's other flows stay, each with its own
/// Path. Any other Contact is keyed by its URI, as RFC 3261 §10.3 says, among the
/// bindings that are not flows.
pub fn apply(
    req: &Message,
    mut bindings: Vec<Binding>,
    src: &str,
    now: u64,
    tag: &str,
) -> Result<Vec<Binding>, Message> {
    let call_id = req.call_id().to_string();
    let cseq = req.cseq().map(|c| c.0).unwrap_or(0);
    let header_expires = req.header("Expires").and_then(|e| e.trim().parse::<u64>().ok());
    let contacts: Vec<&str> = req.header_values("Contact").collect();
    if contacts.len() > MAX_CONTACTS_PER_REGISTER {
        return Err(req.response(403, "Too Many Contacts", Some(tag)));
    }
    if contacts.iter().any(|c| c.trim() == "*") {
        if contacts.len() != 1 || header_expires != Some(0) {
            return Err(req.response(400, "Bad Wildcard", None));
        }
        bindings.clear();
        return Ok(bindings);
    }
    let contacts: Vec<ContactValue> = contacts.into_iter().map(ContactValue::parse).collect();
    let expires_of = |c: &ContactValue| {
        c.param("expires").and_then(|e| e.parse().ok()).or(header_expires).unwrap_or(DEFAULT_EXPIRES)
    };
    let outbound = outbound_applies(req);
    let flows = contacts.iter().filter(|c| c.param("reg-id").is_some() && expires_of(c) > 0).count();
    if flows > 0 && !outbound && supports(req, "outbound") {
        // The client asks for a flow that the hop before us does not keep.
        return Err(req.response(439, "First Hop Lacks Outbound Support", Some(tag)));
    }
    if outbound && flows > 1 {
        return Err(req.response(400, "Several reg-id Contacts", Some(tag)));
    }
    let path: Vec<String> = req.header_values("Path").map(str::to_string).collect();
    for c in &contacts {
        let uri = c.uri.to_string();
        let expires = expires_of(c);
        if expires > 0 && expires < MIN_EXPIRES {
            let mut r = req.response(423, "Interval Too Brief", Some(tag));
            r.headers.push(("Min-Expires".into(), MIN_EXPIRES.to_string()));
            return Err(r);
        }
        let instance = c.param("+sip.instance").filter(|i| !i.is_empty() && i.len() <= 256).map(str::to_string);
        // Without outbound (or without an instance) a reg-id is ignored (RFC 5626 §6).
        let reg_id = match c.param("reg-id").filter(|_| outbound && instance.is_some()) {
            None => None,
            Some(r) => match r.parse::<u32>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(req.response(400, "Bad reg-id", Some(tag))),
            },
        };
        let same = |b: &Binding| match reg_id {
            Some(_) => b.reg_id == reg_id && b.instance == instance,
            None => b.reg_id.is_none() && b.contact == uri,
        };
        if let Some(old) = bindings.iter().find(|b| same(b)) {
            // An older REGISTER arriving late must not undo a newer one.
            if old.call_id == call_id && old.cseq >= cseq {
                continue;
            }
        }
        bindings.retain(|b| !same(b));
        if expires > 0 {
            bindings.push(Binding {
                contact: uri,
                expires_at: now + expires.min(MAX_EXPIRES),
                path: path.clone(),
                call_id: call_id.clone(),
                cseq,
                received: Some(src.to_string()),
                instance,
                reg_id,
            });
        }
    }
    if bindings.len() > MAX_BINDINGS_PER_AOR {
        return Err(req.response(403, "Too Many Bindings", Some(tag)));
    }
    Ok(bindings)
}

/// The 200 listing the bindings now stored (`tag`: a random To tag). A flow registered
/// by this request makes it `Require: outbound` (RFC 5626 §6), so the client knows its
/// flow is kept; flows are listed with their instance and reg-id, so each client finds
/// its own.
pub fn accepted(req: &Message, bindings: &[Binding], now: u64, tag: &str) -> Message {
    let mut r = req.response(200, "OK", Some(tag));
    let cseq = req.cseq().map(|c| c.0).unwrap_or(0);
    for b in bindings {
        let mut c = format!("<{}>;expires={}", b.contact, b.expires_at.saturating_sub(now));
        if let Some(i) = &b.instance {
            c.push_str(&format!(";+sip.instance=\"{i}\""));
        }
        if let Some(id) = b.reg_id {
            c.push_str(&format!(";reg-id={id}"));
        }
        r.headers.push(("Contact".into(), c));
    }
    if bindings.iter().any(|b| b.reg_id.is_some() && b.call_id == req.call_id() && b.cseq == cseq) {
        r.headers.push(("Require".into(), "outbound".into()));
    }
    r
}

/// 503 with Retry-After: the store is down or late; never hang the client.
pub fn unavailable(req: &Message, tag: &str) -> Message {
    let mut r = req.response(503, "Service Unavailable", Some(tag));
    r.headers.push(("Retry-After".into(), "5".into()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTANCE: &str = "<urn:uuid:00000000-0000-1000-8000-000a95a0e128>";

    /// A REGISTER for carol through the LB at `lb` (second Via: the client's), with
    /// Contact parameters `params` and the extra headers `extra`.
    fn register(cseq: u32, lb: &str, params: &str, extra: &str) -> Message {
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {lb};branch=z9hG4bKlb{cseq}\r\nVia: SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKc{cseq};received=198.51.100.4;rport=40000\r\nFrom: <sip:carol@example.com>;tag=1\r\nTo: <sip:carol@example.com>\r\nCall-ID: reg-{lb}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:carol@10.0.0.7:5060;ob>{params}\r\n{extra}Max-Forwards: 69\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(text.as_bytes(), false).unwrap().0
    }

    fn flow(reg_id: u32, lb: &str) -> Message {
        let path = format!("Path: <sip:tok{reg_id}@{lb};lr;ob>\r\nSupported: outbound, path\r\n");
        register(1, lb, &format!(";+sip.instance=\"{INSTANCE}\";reg-id={reg_id};expires=600"), &path)
    }

    #[test]
    fn contact_parameters_may_be_quoted_and_hold_angle_brackets() {
        let v = format!("\"Carol\" <sip:carol@10.0.0.7;ob>;+sip.instance=\"{INSTANCE}\";reg-id=2");
        let c = ContactValue::parse(&v);
        assert_eq!(c.uri, "sip:carol@10.0.0.7;ob");
        assert_eq!(c.param("+sip.instance"), Some(INSTANCE));
        assert_eq!(c.param("REG-ID"), Some("2"));
        let bare = ContactValue::parse("sip:carol@10.0.0.7;expires=60");
        assert_eq!((bare.uri, bare.param("expires")), ("sip:carol@10.0.0.7", Some("60")));
        assert!(uri_has_param("sip:tok@192.0.2.10:5060;lr;ob", "ob"));
        assert!(!uri_has_param("sip:tok@192.0.2.10:5060;lr;obx", "ob"));
        assert!(!uri_has_param("sip:ob@192.0.2.10:5060;lr", "ob"));
    }

    #[test]
    fn two_flows_of_one_instance_keep_two_bindings_each_with_its_path() {
        let one = apply(&flow(1, "192.0.2.10:5060"), vec![], "198.51.100.4:40000", 1000, "t").unwrap();
        let two = apply(&flow(2, "192.0.2.11:5060"), one, "198.51.100.4:40001", 1000, "t").unwrap();
        assert_eq!(two.len(), 2, "{two:?}");
        assert_eq!(two[0].reg_id, Some(1));
        assert_eq!(two[0].path, ["<sip:tok1@192.0.2.10:5060;lr;ob>"]);
        assert_eq!(two[1].reg_id, Some(2));
        assert_eq!(two[1].path, ["<sip:tok2@192.0.2.11:5060;lr;ob>"]);
        assert_eq!(two[1].instance.as_deref(), Some(INSTANCE));
        // Refreshing flow 1 through another LB replaces flow 1 only (a new Path).
        let mut again = flow(1, "192.0.2.12:5060");
        again.set("Call-ID", "reg-192.0.2.10:5060");
        again.set("CSeq", "2 REGISTER");
        let three = apply(&again, two, "198.51.100.4:40002", 1010, "t").unwrap();
        assert_eq!(three.len(), 2);
        let f1 = three.iter().find(|b| b.reg_id == Some(1)).unwrap();
        assert_eq!(f1.path, ["<sip:tok1@192.0.2.12:5060;lr;ob>"]);
        // The 200 requires outbound and names each flow.
        let ok = accepted(&again, &three, 1010, "t");
        assert_eq!(ok.header("Require"), Some("outbound"));
        let contacts: Vec<&str> = ok.header_values("Contact").collect();
        assert!(contacts.iter().any(|c| c.contains("reg-id=2") && c.contains(INSTANCE)), "{contacts:?}");
        // Flow 2 deregisters: flow 1 stays.
        let mut bye = flow(2, "192.0.2.11:5060");
        bye.set("CSeq", "3 REGISTER");
        bye.headers
            .iter_mut()
            .filter(|(n, _)| n == "Contact")
            .for_each(|(_, v)| *v = v.replace("expires=600", "expires=0"));
        let left = apply(&bye, three, "198.51.100.4:40001", 1020, "t").unwrap();
        assert_eq!(left.iter().map(|b| b.reg_id).collect::<Vec<_>>(), [Some(1)]);
    }

    #[test]
    fn without_outbound_a_reg_id_is_ignored_or_refused_and_contacts_key_by_uri() {
        // A Path without `ob`, two Vias: the hop before us keeps no flow.
        let plain = register(1, "192.0.2.10:5060", ";+sip.instance=\"x\";reg-id=1", "Path: <sip:192.0.2.10;lr>\r\n");
        let b = apply(&plain, vec![], "198.51.100.4:40000", 1000, "t").unwrap();
        assert_eq!((b.len(), b[0].reg_id, b[0].instance.as_deref()), (1, None, Some("x")));
        assert_eq!(accepted(&plain, &b, 1000, "t").header("Require"), None);
        let mut asks = plain.clone();
        asks.headers.push(("Supported".into(), "outbound".into()));
        assert_eq!(apply(&asks, vec![], "s", 1000, "t").unwrap_err().code(), Some(439));
        // Two flows in one REGISTER, or a reg-id that is not a number: 400.
        let mut two = flow(1, "192.0.2.10:5060");
        two.headers.push(("Contact".into(), format!("<sip:carol@10.0.0.8>;+sip.instance=\"{INSTANCE}\";reg-id=2")));
        assert_eq!(apply(&two, vec![], "s", 1000, "t").unwrap_err().code(), Some(400));
        let bad = register(1, "192.0.2.10:5060", ";+sip.instance=\"x\";reg-id=x", "Path: <sip:t@192.0.2.10;lr;ob>\r\n");
        assert_eq!(apply(&bad, vec![], "s", 1000, "t").unwrap_err().code(), Some(400));
        // A plain Contact with a flow's URI leaves the flow alone.
        let f = apply(&flow(1, "192.0.2.10:5060"), vec![], "s", 1000, "t").unwrap();
        let both = apply(&register(5, "192.0.2.10:5060", "", ""), f, "s", 1000, "t").unwrap();
        assert_eq!(both.iter().map(|b| b.reg_id).collect::<Vec<_>>(), [Some(1), None]);
    }

    #[test]
    fn flows_count_against_the_bindings_bound() {
        let mut b = Vec::new();
        for i in 1..=MAX_BINDINGS_PER_AOR as u32 {
            let mut r = flow(i, "192.0.2.10:5060");
            r.set("Call-ID", format!("c{i}"));
            b = apply(&r, b, "s", 1000, "t").unwrap();
        }
        let mut one_more = flow(99, "192.0.2.10:5060");
        one_more.set("Call-ID", "c99");
        assert_eq!(apply(&one_more, b, "s", 1000, "t").unwrap_err().code(), Some(403));
    }
}
