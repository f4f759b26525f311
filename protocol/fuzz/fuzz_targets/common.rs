//! Shared by the fuzz targets: the key, and signing of fuzzer-made bytes.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const KEY: &[u8] = b"defib fuzzing key, 32 bytes long";

pub fn key() -> protocol::Key {
    protocol::Key::new(KEY).expect("the fuzz key is long enough")
}

/// Appends a valid datagram tag (keyed BLAKE3) to `bytes`, so the heartbeat and ack
/// decoders get past their MAC check and the fuzzer explores the parsing behind it.
// Each target uses one of the two signers.
#[allow(dead_code)]
pub fn signed_datagram(mut bytes: Vec<u8>) -> Vec<u8> {
    let tag = key().datagram_tag(&bytes);
    bytes.extend_from_slice(&tag);
    bytes
}

/// Appends a valid frame HMAC to `bytes`, for the same reason, for stream frames.
#[allow(dead_code)]
pub fn signed_frame(mut bytes: Vec<u8>) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).expect("HMAC takes any key length");
    mac.update(&bytes);
    bytes.extend_from_slice(&mac.finalize().into_bytes());
    bytes
}

/// The first byte picks the mode: odd means "sign the rest", even means "take the
/// rest as it is".
pub fn split_mode(data: &[u8]) -> Option<(bool, &[u8])> {
    let (mode, rest) = data.split_first()?;
    Some((mode & 1 == 1, rest))
}
