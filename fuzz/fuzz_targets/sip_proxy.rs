//! The whole proxy core: arbitrary datagrams (and stream-framed messages) from a few
//! peers into one long-lived proxy with a registrar, a focus and a media anchor, timers
//! run between them. The operations the core starts complete at once, late (after the
//! next message), with an error, or never, as the input's control byte says. Nothing
//! may panic.
#![no_main]
use controlplane::proxy::core::{literal_peer, Action, Done, Op, OpId, Proxy, ProxyConfig};
use controlplane::proxy::focus::JoinError;
use controlplane::store::Binding;
use libfuzzer_sys::fuzz_target;
use sip::Peer;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What a world that answers every operation plausibly would say.
fn perform(op: &Op) -> Result<Done, controlplane::Error> {
    Ok(match op {
        Op::Password { user, .. } => Done::Password((user == "bob").then(|| "pw".to_string())),
        Op::Bindings { aor, now } => Done::Bindings(if aor.starts_with("bob@") {
            vec![Binding {
                contact: "sip:bob@10.0.0.9:5080".into(),
                expires_at: now + 60,
                path: vec![],
                call_id: "r".into(),
                cseq: 1,
                ..Binding::default()
            }]
        } else {
            vec![]
        }),
        Op::SetBindings { .. } => Done::Stored,
        Op::Resolve { uri } => Done::Resolved(literal_peer(uri).into_iter().collect()),
        Op::Offer { sdp, .. } | Op::Answer { sdp, .. } => Done::Sdp(sdp.clone()),
        Op::Delete { .. } => Done::Deleted,
        Op::Join { in_dialog: true, .. } => Done::Joined(Err(JoinError::NoDialog)),
        Op::Join { .. } => Done::Joined(Ok("v=0\r\n".into())),
        Op::Leave { .. } => Done::Left(true),
    })
}

thread_local! {
    static PROXY: RefCell<(Proxy, Instant, Vec<(OpId, Op)>)> = RefCell::new({
        let cfg = ProxyConfig { domain: "fuzz.test".into(), local: "127.0.0.1:5060".parse().unwrap(), nonce_secret: "k".into(), record_route: None, rate_limit: 50, ban: std::time::Duration::from_secs(1), trusted: vec!["10.0.0.0/8".parse().unwrap()] };
        let mut p = Proxy::new(cfg, true);
        p.set_focus(true);
        (p, Instant::now(), Vec::new())
    });
}

fuzz_target!(|data: &[u8]| {
    PROXY.with(|cell| {
        let (p, t, late) = &mut *cell.borrow_mut();
        // First byte: which peer and transport, how far the clock moves, and how the
        // operations complete.
        let (ctl, msg) = data.split_first().map_or((0, data), |(c, m)| (*c, m));
        *t += Duration::from_millis(u64::from(ctl & 0x0f) * 300);
        let addr: SocketAddr = format!("10.0.0.{}:5070", 1 + (ctl >> 5)).parse().unwrap();
        let peer = if ctl & 0x10 != 0 { Peer::tcp(addr) } else { Peer::udp(addr) };
        // Operations held back from the previous input complete now (late).
        for (id, op) in std::mem::take(late) {
            p.on_completion(*t, id, perform(&op));
        }
        p.on_message(*t, peer, msg);
        p.on_tick(*t);
        if ctl == 0xff {
            p.on_transport_error(*t, peer);
        }
        for _ in 0..8 {
            let actions = p.drain();
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Send(_, bytes) => assert!(!bytes.is_empty()),
                    Action::Ban { .. } => {}
                    Action::Start { id, op, .. } => match ctl % 4 {
                        0 | 1 => p.on_completion(*t, id, perform(&op)),
                        2 => late.push((id, op)),
                        // Failed; or, when the peer bit says so, never completed.
                        _ if ctl & 0x20 != 0 => {}
                        _ => p.on_completion(*t, id, Err(controlplane::Error::Busy("fuzz".into()))),
                    },
                }
            }
        }
    });
});
