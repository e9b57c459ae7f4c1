//! SIP messages: parse (datagram and stream framing), read every accessor, and check
//! that what parsed re-serialises to something that parses to the same message.
#![no_main]
use sip::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for stream in [false, true] {
        if let Ok((m, used)) = Message::parse(data, stream) {
            assert!(used <= data.len());
            let _ = (m.via(), m.cseq(), m.from_tag(), m.to_tag(), m.max_forwards(), m.call_id(), m.method());
            let again = Message::parse(&m.to_bytes(), true).expect("our own serialisation parses");
            assert_eq!(again.0.start, m.start);
            assert_eq!(again.0.body, m.body);
        }
    }
});
