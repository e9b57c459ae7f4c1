//! SDP: parse, then rewrite with relay ports; the rewrite must parse again with the
//! same number of media sections.
#![no_main]
use controlplane::relay::sdp::{Rewrite, RtcpAttr, Sdp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(sdp) = Sdp::parse(text) else { return };
    for i in 0..sdp.media.len() {
        let _ = sdp.endpoint(i);
        let _ = sdp.direction(i);
    }
    let rw = Rewrite {
        address: "203.0.113.1".parse().unwrap(),
        ports: (0..sdp.media.len()).map(|i| Some(30000 + 2 * i as u16)).collect(),
        replace_origin: true,
        origin_version: Some(2),
        rtcp: RtcpAttr::Full,
        remove_ice: true,
        transport: None,
    };
    let out = sdp.rewrite(&rw);
    let back = Sdp::parse(&out).expect("our rewrite parses");
    assert_eq!(back.media.len(), sdp.media.len());
});
