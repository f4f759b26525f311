//! Any bytes into the frame decoders, one-shot and streaming (in two pushes split
//! at a fuzzer-chosen point). Neither may panic, both must agree, and an accepted
//! envelope must survive encode→decode.
//!
//! In signing mode the rest of the input becomes the JSON body of a correctly
//! signed frame, so the fuzzer exercises envelope parsing behind the MAC.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use protocol::{decode_frame, encode_frame, Direction, FrameDecoder, FRAME_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((sign, rest)) = common::split_mode(data) else {
        return;
    };
    let Some((split, rest)) = rest.split_first() else {
        return;
    };
    let bytes = if sign {
        let Ok(len) = u32::try_from(rest.len()) else {
            return;
        };
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + rest.len());
        frame.extend_from_slice(b"DFIB\x01\x03\x00\x00");
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(rest);
        common::signed_frame(frame)
    } else {
        rest.to_vec()
    };
    let key = common::key();

    let one_shot = decode_frame(&bytes, &key);

    let cut = usize::from(*split).min(bytes.len());
    for direction in [Direction::ToController, Direction::ToWatchdog] {
        let mut dec = FrameDecoder::new(key.clone(), direction);
        dec.push(&bytes[..cut]);
        let early = dec.next_frame();
        dec.push(&bytes[cut..]);
        let streamed = match early {
            Ok(None) => dec.next_frame(),
            other => other,
        };
        if let (Ok((env, _)), Ok(Some(got))) = (&one_shot, &streamed) {
            assert_eq!(env, got, "one-shot and streaming decoders disagree");
        }
        if let Ok(Some(env)) = streamed {
            assert_eq!(env.message.direction(), direction);
        }
    }

    if let Ok((env, used)) = one_shot {
        assert!(used <= bytes.len());
        let again = encode_frame(&env, &key).expect("a decoded envelope re-encodes");
        let (back, _) = decode_frame(&again, &key).expect("a re-encoded envelope decodes");
        assert_eq!(back, env);
    }
});
