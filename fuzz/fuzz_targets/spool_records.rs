//! Any bytes as the watchdog's event spool log, through the decoder `Spool::open`
//! reads it with (`parse_records`). It must not panic, must only keep a prefix of the
//! input, must keep ids non-zero and rising, and what it kept must survive the spool's
//! own encoder: re-encoded, it decodes to the same events, every byte used.
//!
//! The input's first byte picks raw bytes or sealed bodies (see `common::log_from`).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use watchdog::uplink::spool::{encode_record, parse_records};

fuzz_target!(|input: &[u8]| {
    let Some(log) = common::log_from(input) else {
        return;
    };
    let data = &log[..];
    let (events, used) = parse_records(data);
    assert!(used <= data.len(), "used {used} of {} bytes", data.len());
    assert!(
        events.first().is_none_or(|e| e.id > 0),
        "event id 0 was accepted"
    );
    assert!(
        events.windows(2).all(|w| w[0].id < w[1].id),
        "ids do not rise"
    );
    // Decoding the used prefix alone gives the same events: the tail does not matter.
    let (prefix_events, prefix_used) = parse_records(&data[..used]);
    assert_eq!(prefix_used, used);
    assert_eq!(prefix_events, events);
    // The JSON may be spelt differently from the encoder's, so the bytes need not match;
    // the events must.
    let reencoded: Vec<u8> = events.iter().flat_map(encode_record).collect();
    let (again, again_used) = parse_records(&reencoded);
    assert_eq!(
        again_used,
        reencoded.len(),
        "a re-encoded record was refused"
    );
    assert_eq!(again, events, "encode→decode changed an event");
    // Re-encoding the re-decoded events is now byte-exact.
    let twice: Vec<u8> = again.iter().flat_map(encode_record).collect();
    assert_eq!(twice, reencoded, "the encoder is not deterministic");
});
