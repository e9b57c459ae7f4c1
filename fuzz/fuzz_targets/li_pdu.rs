//! X2/X3 PDU decoding (what a mediation function, or our tests, read): never panics,
//! never claims more bytes than it was given.
#![no_main]
use controlplane::li::pdu;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((p, n))) = pdu::decode(data) {
        assert!(n <= data.len());
        let _ = p.sequence();
    }
});
