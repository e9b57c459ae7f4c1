//! The conference focus of `hasp up`: three sipp callers INVITE `conf-<room>@<domain>`,
//! the proxy answers each with a mixer port of its relay, the mixed audio is checked by
//! tone detection, and the BYEs empty and delete the room.

mod common;
#[path = "common/tones.rs"]
mod tones;

use common::*;
use dataplane::mixer::Codec;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
use tones::*;

const DOMAIN: &str = "conf.test";

#[test]
fn three_party_conference_through_the_focus() {
    let (relay, sip, dir) = up_with_sip(DOMAIN, "45600-45699", "focus");
    // Rooms admit only authenticated users: each participant answers the challenge.
    add_sip_user(&relay, "carol", DOMAIN, "sings");
    let socks: Vec<UdpSocket> = (0..3).map(|_| udp()).collect();
    let mut uacs: Vec<_> = socks
        .iter()
        .map(|s| {
            sipp(
                &dir,
                "uac_conf.xml",
                0,
                &[("media_a", s.local_addr().unwrap().port().to_string()), ("domain", DOMAIN.to_string())],
                &[
                    "-s",
                    "conf-weekly",
                    "-au",
                    "carol",
                    "-ap",
                    "sings",
                    "-d",
                    "5000",
                    "-trace_msg",
                    "-message_file",
                    &format!("uac-{}.log", s.local_addr().unwrap().port()),
                    &sip,
                ],
            )
        })
        .collect();
    // The focus put all three in one room of the relay's mixer.
    let (conf, parts) = wait_for("three participants in one room", Duration::from_secs(15), || {
        let (_, v) = relay.call("GET", "/v1/conferences", None);
        let id = v["conferences"].as_array()?.first()?.as_str()?.to_string();
        let (_, c) = relay.call("GET", &format!("/v1/conferences/{id}"), None);
        let parts = c["participants"].as_array()?.clone();
        (v["count"] == 1 && parts.len() == 3).then_some((id, parts))
    });
    let mut dests = Vec::new();
    for s in &socks {
        let me = s.local_addr().unwrap().to_string();
        let p = parts.iter().find(|p| p["remote"] == me.as_str()).unwrap_or_else(|| panic!("{me} in {parts:?}"));
        let addr: SocketAddr = format!("127.0.0.1:{}", p["rtp_port"]).parse().unwrap();
        dests.push(addr);
    }
    let heard = exchange_tones(&socks, &dests, &[0, 0, 0], Codec::Pcmu, 75);
    assert_each_hears_the_others(&heard, Codec::Pcmu);
    for (i, u) in uacs.iter_mut().enumerate() {
        let st = wait_for("a participant's BYE", Duration::from_secs(30), || u.try_wait().ok().flatten());
        assert!(
            st.success(),
            "participant {i}: {}",
            std::fs::read_to_string(dir.join("uac_conf.xml.stderr")).unwrap_or_default()
        );
    }
    // The answers named the mixer's ports, and the last BYE deleted the room.
    let log: String = socks
        .iter()
        .map(|s| std::fs::read_to_string(dir.join(format!("uac-{}.log", s.local_addr().unwrap().port()))).unwrap())
        .collect();
    for d in &dests {
        assert!(log.contains(&format!("m=audio {} RTP/AVP 0", d.port())), "{log}");
    }
    wait_for("the room to be deleted", Duration::from_secs(10), || {
        (relay.call("GET", &format!("/v1/conferences/{conf}"), None).0 == 404).then_some(())
    });
}
