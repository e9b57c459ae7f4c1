//! Steering: which SIP core owns a message, read from raw bytes without a full parse.
//! Any input gives an instance in range; for a request that parses, the instance is the
//! one of the Call-ID the full parser reads (so a dialog's requests meet on one core).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sip::steer::{fnv1a, shard_of};
use sip::Message;

fuzz_target!(|data: &[u8]| {
    for n in 1..=8 {
        assert!(shard_of(data, n) < n);
    }
    if let Ok((m, used)) = Message::parse(data, false) {
        if m.code().is_none() && used == data.len() {
            let want = (fnv1a(m.call_id().as_bytes()) % 4) as usize;
            assert_eq!(shard_of(data, 4), want, "Call-ID {:?}", m.call_id());
        }
    }
});
