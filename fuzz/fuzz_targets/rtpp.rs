//! RTPproxy commands as the UDP listener sees them (cookie, command): parsing never
//! panics, and whatever parses is within bounds (a stream index that would size the
//! call's stream table, a null remote).
#![no_main]
use controlplane::control::rtpp::{parse, Request};
use controlplane::relay::calls::MAX_STREAMS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let text = text.trim_end();
    let command = text.split_once(' ').map_or(text, |(_, c)| c);
    match parse(command) {
        Ok(Request::Update { index, remote, call_id, .. }) => {
            assert!(index < MAX_STREAMS, "stream index {index} out of bounds");
            assert!(remote.is_none_or(|r| r.port() != 0 && !r.ip().is_unspecified()));
            assert!(!call_id.is_empty() && command.contains(call_id));
        }
        Ok(Request::Capability(v)) => assert!(command.contains(v)),
        Ok(_) => {}
        Err(code) => assert!(code > 0 && code < 100),
    }
});
