//! Any bytes into the ack decoder: it must never panic, and whatever it accepts
//! must encode back to the very same bytes.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use protocol::{decode_ack, encode_ack};

fuzz_target!(|data: &[u8]| {
    let Some((sign, rest)) = common::split_mode(data) else {
        return;
    };
    let bytes = if sign {
        common::signed_datagram(rest.to_vec())
    } else {
        rest.to_vec()
    };
    let key = common::key();
    if let Ok(ack) = decode_ack(&bytes, &key) {
        let again = encode_ack(&ack, &key).expect("a decoded ack re-encodes");
        assert_eq!(again, bytes, "decode→encode is not the identity");
    }
});
