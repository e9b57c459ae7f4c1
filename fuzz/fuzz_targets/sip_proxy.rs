//! The whole proxy core: arbitrary datagrams (and stream-framed messages) from a few
//! peers into one long-lived proxy with a registrar, a focus and no media anchor, timers
//! run between them. Nothing may panic.
#![no_main]
use controlplane::proxy::focus::{Focus, Mixer};
use controlplane::relay::ParticipantCreated;
use controlplane::proxy::core::{Proxy, ProxyConfig};
use sip::Peer;
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct NullMixer;

impl Mixer for NullMixer {
    fn create_room(&self) -> Result<String, controlplane::Error> {
        Ok("0000000000000001".into())
    }
    fn delete_room(&self, _: &str) -> Result<(), controlplane::Error> {
        Ok(())
    }
    fn join(
        &self,
        _: &str,
        _: dataplane::mixer::Codec,
        pt: u8,
        _: Option<SocketAddr>,
    ) -> Result<ParticipantCreated, controlplane::Error> {
        Ok(ParticipantCreated { id: "00000001".into(), address: [127, 0, 0, 1].into(), rtp_port: 40000, payload_type: pt })
    }
    fn leave(&self, _: &str, _: &str) -> Result<(), controlplane::Error> {
        Ok(())
    }
}

thread_local! {
    static PROXY: RefCell<(Proxy, Instant)> = RefCell::new({
        let dir = std::env::temp_dir().join(format!("hasp-fuzz-proxy-{}", std::process::id()));
        let store = controlplane::store::open(&format!("embedded:{}", dir.join("s.redb").display())).unwrap();
        store.put_user("bob", "fuzz.test", "pw").unwrap();
        let cfg = ProxyConfig { domain: "fuzz.test".into(), local: "127.0.0.1:5060".parse().unwrap(), nonce_secret: "k".into(), record_route: None, rate_limit: 50 };
        let mut p = Proxy::new(cfg, store, None);
        p.set_focus(Arc::new(Focus::new(vec![Arc::new(NullMixer)])));
        (p, Instant::now())
    });
}

fuzz_target!(|data: &[u8]| {
    PROXY.with(|cell| {
        let (p, t) = &mut *cell.borrow_mut();
        // First byte: which peer and transport, and how far the clock moves.
        let (ctl, msg) = data.split_first().map_or((0, data), |(c, m)| (*c, m));
        *t += Duration::from_millis(u64::from(ctl & 0x0f) * 300);
        let addr: SocketAddr = format!("10.0.0.{}:5070", 1 + (ctl >> 5)).parse().unwrap();
        let peer = if ctl & 0x10 != 0 { Peer::tcp(addr) } else { Peer::udp(addr) };
        p.on_message(*t, peer, msg);
        p.on_tick(*t);
        if ctl == 0xff {
            p.on_transport_error(*t, peer);
        }
        for (_, bytes) in p.drain() {
            assert!(!bytes.is_empty());
        }
    });
});
