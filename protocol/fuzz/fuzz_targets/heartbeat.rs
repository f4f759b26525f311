//! Any bytes into the heartbeat decoder: it must never panic, and whatever it
//! accepts must encode back to the very same bytes.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use protocol::{decode_heartbeat, encode_heartbeat};

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
    if let Ok(hb) = decode_heartbeat(&bytes, &key) {
        let again = encode_heartbeat(&hb, &key).expect("a decoded heartbeat re-encodes");
        assert_eq!(again, bytes, "decode→encode is not the identity");
    }
});
