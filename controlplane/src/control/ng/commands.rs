//! NG command semantics: ping, offer, answer, delete, query, list, statistics.

use super::bencode::Value;
use super::error_reply;
use crate::error::Error;
use crate::relay::calls::{AnchorOptions, CallStats, Calls};
use crate::relay::sdp::RtcpAttr;
use dataplane::{LatchMode, LatchPolicy};
use std::net::IpAddr;

/// Normalises a key or flag the way rtpengine does: case, dashes, underscores and
/// spaces are interchangeable.
fn norm(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace(['-', '_'], " ")
}

/// The request's keys, normalised, with flags (list and `rtpp_flags`) merged.
struct Request<'a> {
    dict: &'a [(Vec<u8>, Value)],
    flags: Vec<String>,
}

impl<'a> Request<'a> {
    fn new(dict: &'a [(Vec<u8>, Value)]) -> Self {
        let mut r = Self { dict, flags: Vec::new() };
        if let Some(Value::List(l)) = r.get("flags") {
            r.flags.extend(l.iter().filter_map(Value::as_str).map(norm));
        }
        if let Some(s) = r.get("rtpp flags").and_then(Value::as_str) {
            r.flags.extend(s.split_whitespace().map(norm));
        }
        r
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        let want = norm(key);
        self.dict.iter().find(|(k, _)| std::str::from_utf8(k).is_ok_and(|k| norm(k) == want)).map(|(_, v)| v)
    }

    fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(Value::as_str)
    }

    fn list(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::List(l)) => l.iter().filter_map(Value::as_str).map(norm).collect(),
            Some(v) => v.as_str().map(|s| vec![norm(s)]).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    fn flag(&self, f: &str) -> bool {
        let f = norm(f);
        self.flags.contains(&f)
    }

    /// A flag given as `key=value` in the flags list, or as a key.
    fn keyed(&self, key: &str) -> Option<String> {
        let k = norm(key);
        self.flags
            .iter()
            .find_map(|f| f.split_once('=').filter(|(a, _)| norm(a) == k).map(|(_, v)| v.to_string()))
            .or_else(|| self.str(key).map(str::to_string))
    }
}

fn ok() -> Vec<(&'static str, Value)> {
    vec![("result", Value::str("ok"))]
}

fn options(r: &Request<'_>, relay_family_v4: bool) -> Result<AnchorOptions, String> {
    let mut o = AnchorOptions::default();
    let mut policy = None::<LatchPolicy>;
    let mut set_mode = |m: LatchMode| {
        let p = policy.get_or_insert_with(LatchPolicy::default);
        p.mode = m;
    };
    if r.flag("strict source") {
        set_mode(LatchMode::Strict);
    } else if r.flag("asymmetric") {
        set_mode(LatchMode::Asymmetric);
    } else if r.flag("symmetric") || r.flag("port latching") {
        set_mode(LatchMode::Learn);
    }
    o.latch = policy;
    let replace = r.list("replace");
    o.replace_origin = replace.iter().any(|x| x == "origin") || r.flag("replace origin");
    o.rtcp = if r.flag("no rtcp attribute") {
        RtcpAttr::None
    } else if r.flag("full rtcp attribute") {
        RtcpAttr::Full
    } else {
        RtcpAttr::Short
    };
    match r.keyed("ICE").map(|s| norm(&s)).as_deref() {
        None | Some("remove") | Some("default") => {}
        Some("force") | Some("force relay") => return Err("ICE is not supported by this relay".into()),
        Some(_) => {}
    }
    if let Some(t) = r.keyed("transport protocol") {
        let t = t.to_ascii_uppercase().replace(' ', "/");
        if !matches!(t.as_str(), "RTP/AVP" | "RTP/AVPF") {
            return Err(format!("transport protocol {t} not supported (RTP/AVP, RTP/AVPF)"));
        }
        o.transport = Some(t);
    }
    if let Some(af) = r.keyed("address family") {
        let af = af.to_ascii_uppercase();
        if (af == "IP6" && relay_family_v4) || (af == "IP4" && !relay_family_v4) {
            return Err(format!("no media interface for address family {af}"));
        }
    }
    if let Some(a) = r.keyed("media address") {
        o.media_address = Some(a.parse::<IpAddr>().map_err(|_| format!("invalid media address {a:?}"))?);
    }
    if r.flag("SIP source address") && !r.flag("trust address") {
        if let Some(Value::List(l)) = r.get("received from") {
            o.source_override = l.get(1).and_then(Value::as_str).and_then(|s| s.parse().ok());
        }
    }
    o.record = r.keyed("record call").is_some_and(|v| matches!(norm(&v).as_str(), "yes" | "on" | "true" | "1"))
        || r.flag("record call");
    o.label = r.str("label").map(str::to_string);
    Ok(o)
}

fn error_text(e: &Error) -> String {
    match e {
        Error::NotFound(m) => m.clone(),
        Error::PortsExhausted(_) => "Ran out of ports".into(),
        Error::Invalid(m) if m.starts_with("invalid SDP") => format!("Failed to parse SDP: {m}"),
        other => other.to_string(),
    }
}

fn endpoint(a: Option<std::net::SocketAddr>) -> Value {
    match a {
        Some(a) => Value::dict([
            ("family", Value::str(if a.is_ipv4() { "IPv4" } else { "IPv6" })),
            ("address", Value::str(a.ip().to_string())),
            ("port", Value::Int(a.port() as i64)),
        ]),
        None => Value::dict::<&str>([]),
    }
}

/// Renders call statistics the way rtpengine's `query` and `delete` answers do.
fn stats_reply(s: &CallStats) -> Vec<(&'static str, Value)> {
    let mut out = ok();
    out.push(("created", Value::Int(s.created as i64)));
    out.push(("last signal", Value::Int(s.last_signal as i64)));
    let (mut rtp, mut rtcp) = ([0u64; 3], [0u64; 3]);
    let mut tags = Vec::new();
    for leg in 0..2 {
        let Some(tag) = &s.tags[leg] else { continue };
        let mut medias = Vec::new();
        for (index, v) in &s.streams {
            let l = &v.legs[leg];
            let st = |k: &dataplane::StreamSnapshot| {
                Value::dict([
                    ("packets", Value::Int(k.packets as i64)),
                    ("bytes", Value::Int(k.bytes as i64)),
                    ("errors", Value::Int(k.drops.0.iter().sum::<u64>() as i64)),
                ])
            };
            let mut streams = Vec::new();
            if let Some(x) = &l.stats {
                for (acc, k) in [(&mut rtp, &x.rtp), (&mut rtcp, &x.rtcp)] {
                    acc[0] += k.packets;
                    acc[1] += k.bytes;
                    acc[2] += k.drops.0.iter().sum::<u64>();
                }
                streams.push(Value::dict([
                    ("local port", Value::Int(l.rtp_port as i64)),
                    ("endpoint", endpoint(l.latched.rtp.or(l.remote))),
                    ("advertised endpoint", endpoint(l.remote)),
                    ("stats", st(&x.rtp)),
                ]));
                streams.push(Value::dict([
                    ("local port", Value::Int(l.rtcp_port as i64)),
                    ("endpoint", endpoint(l.latched.rtcp)),
                    ("stats", st(&x.rtcp)),
                ]));
            }
            medias.push(Value::dict([
                ("index", Value::Int(*index as i64 + 1)),
                ("type", Value::str("audio")),
                ("protocol", Value::str("RTP/AVP")),
                ("streams", Value::List(streams)),
            ]));
        }
        let mut t = vec![("tag", Value::str(tag)), ("created", Value::Int(s.created as i64))];
        if let Some(l) = &s.labels[leg] {
            t.push(("label", Value::str(l)));
        }
        if let Some(o) = &s.tags[1 - leg] {
            t.push(("in dialogue with", Value::str(o)));
        }
        t.push(("medias", Value::List(medias)));
        tags.push((tag.as_bytes().to_vec(), Value::dict(t)));
    }
    out.push(("tags", Value::Dict(tags)));
    let tot = |a: [u64; 3]| {
        Value::dict([
            ("packets", Value::Int(a[0] as i64)),
            ("bytes", Value::Int(a[1] as i64)),
            ("errors", Value::Int(a[2] as i64)),
        ])
    };
    out.push(("totals", Value::dict([("RTP", tot(rtp)), ("RTCP", tot(rtcp))])));
    out
}

/// Executes one NG request dictionary and returns the answer dictionary.
pub fn handle_command(calls: &Calls, req: &Value) -> Value {
    let Value::Dict(dict) = req else {
        return error_reply("Could not decode dictionary");
    };
    let r = Request::new(dict);
    let Some(command) = r.str("command") else {
        return error_reply("No command given");
    };
    let need = |k: &str| r.str(k).filter(|s| !s.is_empty()).ok_or_else(|| "Incomplete message".to_string());
    let v4 = calls.relay().config().advertised().is_ipv4();
    let result: Result<Vec<(&'static str, Value)>, String> = (|| match norm(command).as_str() {
        "ping" => Ok(vec![("result", Value::str("pong"))]),
        "offer" | "answer" => {
            let call_id = need("call-id")?;
            let from_tag = need("from-tag")?;
            let sdp = r.str("sdp").filter(|s| !s.is_empty()).ok_or("No SDP body")?;
            let o = options(&r, v4)?;
            let out = if norm(command) == "offer" {
                calls.offer(call_id, from_tag, r.str("to-tag"), sdp, &o)
            } else {
                calls.answer(call_id, from_tag, need("to-tag")?, sdp, &o)
            };
            let sdp = out.map_err(|e| error_text(&e))?;
            let mut v = ok();
            v.push(("sdp", Value::str(sdp)));
            Ok(v)
        }
        "delete" => {
            let call_id = need("call-id")?;
            match calls.delete(call_id) {
                Ok(s) => Ok(stats_reply(&s)),
                // rtpengine answers a delete of an unknown call with a warning, not an
                // error, unless told that this is fatal.
                Err(Error::NotFound(_)) if !r.flag("fatal") => {
                    let mut v = ok();
                    v.push(("warning", Value::str("Call-ID not found or tags didn't match")));
                    Ok(v)
                }
                Err(e) => Err(error_text(&e)),
            }
        }
        "query" => {
            let call_id = need("call-id")?;
            calls.stats(call_id).map(|s| stats_reply(&s)).map_err(|e| error_text(&e))
        }
        "list" => {
            let limit = r.get("limit").and_then(Value::as_int).unwrap_or(32).clamp(0, 100_000) as usize;
            let ids = calls.list();
            let mut v = ok();
            v.push(("calls", Value::List(ids.into_iter().take(limit).map(Value::str).collect())));
            Ok(v)
        }
        "statistics" => {
            let (sessions, free, total, t) = calls.relay().usage();
            let n = calls.len() as i64;
            let current = Value::dict([
                ("sessionsown", Value::Int(n)),
                ("sessionsforeign", Value::Int(0)),
                ("sessionstotal", Value::Int(n)),
                ("transcodedmedia", Value::Int(0)),
                ("relaysessions", Value::Int(sessions as i64)),
                ("portpairsfree", Value::Int(free as i64)),
                ("portpairstotal", Value::Int(total as i64)),
            ]);
            let totals = Value::dict([
                ("managedsessions", Value::Int(t.created as i64)),
                ("timeoutsessions", Value::Int(t.timed_out as i64)),
                ("regularterminatedsessions", Value::Int(t.deleted as i64)),
            ]);
            let mut v = ok();
            v.push(("statistics", Value::dict([("currentstatistics", current), ("totalstatistics", totals)])));
            Ok(v)
        }
        other => Err(format!("Unrecognized command '{other}'")),
    })();
    match result {
        Ok(v) => Value::dict(v),
        Err(reason) => error_reply(&reason),
    }
}
