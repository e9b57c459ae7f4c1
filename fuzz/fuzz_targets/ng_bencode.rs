//! NG messages: cookie split, bencode decode, and re-encode of whatever decoded.
#![no_main]
use controlplane::control::ng::{bencode, split_cookie};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = split_cookie(data).map(|(_, b)| b).unwrap_or(data);
    if let Ok((v, used)) = bencode::decode(body) {
        assert!(used <= body.len());
        // What decoded re-encodes to bytes that decode to the same value.
        let again = bencode::decode(&v.encode()).expect("re-encoded value decodes");
        assert_eq!(again.0, v);
    }
});
