mod common;

use common::*;
use protocol::{
    decode_heartbeat, encode_heartbeat, DecodeError, EncodeError, Heartbeat, IdError, NotArmed,
    RejectReason, SelfFence, DATAGRAM_MAC_LEN, MAX_HEARTBEAT_LEN, MIN_HEARTBEAT_LEN,
};

fn encoded() -> Vec<u8> {
    encode_heartbeat(&heartbeat(7, 100), &key()).unwrap()
}

#[test]
fn a_heartbeat_survives_encoding_and_decoding_unchanged() {
    let hb = heartbeat(7, 100);
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    assert_eq!(decode_heartbeat(&bytes, &key()), Ok(hb));
}

#[test]
fn a_heartbeat_with_isolation_and_no_libvirt_keeps_both_flags() {
    let mut hb = heartbeat(7, 100);
    hb.status.isolated = true;
    hb.status.libvirt_reachable = false;
    hb.path_index = 3;
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    let back = decode_heartbeat(&bytes, &key()).unwrap();
    assert!(back.status.isolated);
    assert!(!back.status.libvirt_reachable);
    assert_eq!(back.path_index, 3);
}

#[test]
fn the_self_fence_armed_flag_is_bit_two_and_the_timeout_travels_with_it() {
    let mut hb = heartbeat(7, 100);
    hb.status.self_fence = SelfFence::Armed { timeout_ms: 3500 };
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    assert_eq!(
        bytes[7], 0b110,
        "flags: libvirt reachable, self-fence armed"
    );
    assert_eq!(bytes[72..76], 3500u32.to_be_bytes(), "self-fence timeout");
    assert_eq!(bytes[76], 1, "self-fence state: armed");
    let back = decode_heartbeat(&bytes, &key()).unwrap();
    assert_eq!(back.status.self_fence.armed_timeout_ms(), Some(3500));
    assert!(!back.status.isolated);
}

#[test]
fn a_not_armed_self_fence_carries_its_reason_and_clears_the_armed_flag() {
    let mut hb = heartbeat(7, 100);
    let reason = NotArmed::CannotKill {
        pid: 4242,
        uid: 64055,
    };
    hb.status.self_fence = SelfFence::NotArmed {
        timeout_ms: 3000,
        reason,
    };
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    assert_eq!(bytes[7] & 0b100, 0, "armed flag");
    assert_eq!(bytes[76], 3, "reason code: cannot kill");
    assert_eq!(bytes[77..81], 4242u32.to_be_bytes());
    assert_eq!(bytes[81..85], 64055u32.to_be_bytes());
    let back = decode_heartbeat(&bytes, &key()).unwrap();
    assert_eq!(back.status.self_fence, hb.status.self_fence);
    assert_eq!(back.status.self_fence.armed_timeout_ms(), None);
    assert_eq!(
        back.status.self_fence.to_string(),
        "not armed: no permission to kill qemu pid 4242 owned by uid 64055"
    );
}

/// Re-signs `bytes` after an edit (the MAC covers every byte before it), with the key
/// of [`key`].
fn resign(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - DATAGRAM_MAC_LEN;
    bytes.truncate(n);
    let tag = key().datagram_tag(&bytes);
    bytes.extend_from_slice(&tag);
    bytes
}

#[test]
fn a_signed_heartbeat_whose_armed_flag_disagrees_with_its_self_fence_block_is_malformed() {
    let mut hb = heartbeat(7, 100);
    hb.status.self_fence = SelfFence::NotArmed {
        timeout_ms: 3000,
        reason: NotArmed::AwaitingFirstAck,
    };
    let mut bytes = encode_heartbeat(&hb, &key()).unwrap();
    bytes[7] |= 0b100;
    let bytes = resign(bytes);
    assert!(matches!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::Malformed(_))
    ));
    // Armed with no timeout promises nothing: refused too.
    hb.status.self_fence = SelfFence::Armed { timeout_ms: 1 };
    let mut bytes = encode_heartbeat(&hb, &key()).unwrap();
    bytes[72..76].fill(0);
    let bytes = resign(bytes);
    assert!(matches!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::Malformed(_))
    ));
}

/// A version 3 datagram, as watchdogs before the ack period and keyed BLAKE3 sent it
/// (their HMAC is all zeros here: the version is refused before any MAC is looked at).
fn version_three() -> Vec<u8> {
    let bytes = encoded();
    let mut v3 = bytes[..93].to_vec();
    v3[4] = 3;
    v3.extend_from_slice(&bytes[97..bytes.len() - DATAGRAM_MAC_LEN]);
    v3.extend_from_slice(&[0; 32]);
    v3
}

#[test]
fn a_heartbeat_of_an_older_layout_is_refused_as_old_whatever_its_mac() {
    let v3 = version_three();
    assert_eq!(
        decode_heartbeat(&v3, &key()),
        Err(DecodeError::OldVersion(3))
    );
    assert_eq!(
        DecodeError::OldVersion(3).reason().as_str(),
        "old_version",
        "the label the controller counts it under"
    );
    for version in [1, 2] {
        let mut old = v3.clone();
        old[4] = version;
        assert_eq!(
            decode_heartbeat(&old, &key()),
            Err(DecodeError::OldVersion(version))
        );
    }
}

#[test]
fn a_heartbeat_of_a_newer_layout_is_refused_as_unsupported() {
    let mut bytes = encoded();
    bytes[4] = 5;
    let bytes = resign(bytes);
    assert_eq!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::UnsupportedVersion(5))
    );
    assert_eq!(
        DecodeError::UnsupportedVersion(5).reason(),
        RejectReason::BadVersion
    );
}

#[test]
fn a_heartbeat_carries_the_ack_period_it_asks_for() {
    let mut hb = heartbeat(7, 100);
    hb.ack_period_ms = 0x0102_0304;
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    assert_eq!(bytes[93..97], [1, 2, 3, 4]);
    assert_eq!(decode_heartbeat(&bytes, &key()).unwrap(), hb);
}

#[test]
fn a_heartbeat_carries_the_session_it_echoes() {
    let mut hb = heartbeat(7, 100);
    hb.session = 0xfeed_beef_0000_0001;
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    assert_eq!(bytes[85..93], hb.session.to_be_bytes());
    assert_eq!(decode_heartbeat(&bytes, &key()).unwrap(), hb);
}

#[test]
fn an_unknown_not_armed_code_from_a_newer_watchdog_decodes_as_not_armed() {
    let mut hb = heartbeat(7, 100);
    hb.status.self_fence = SelfFence::NotArmed {
        timeout_ms: 3000,
        reason: NotArmed::Other {
            code: 99,
            a: 1,
            b: 2,
        },
    };
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    let back = decode_heartbeat(&bytes, &key()).unwrap();
    assert_eq!(back, hb);
    assert_eq!(back.status.self_fence.armed_timeout_ms(), None);
}

#[test]
fn the_encoded_heartbeat_starts_with_the_documented_fixed_layout() {
    let bytes = encoded();
    assert_eq!(&bytes[0..4], b"DFIB");
    assert_eq!(bytes[4], 4, "heartbeat layout version");
    assert_eq!(bytes[5], 1, "kind");
    assert_eq!(bytes[6], 0, "path index");
    assert_eq!(bytes[7], 0b10, "flags: libvirt reachable only");
    assert_eq!(&bytes[8..24], &[1; 16], "boot id");
    assert_eq!(bytes[24..32], 7u64.to_be_bytes(), "incarnation");
    assert_eq!(bytes[32..40], 100u64.to_be_bytes(), "sequence");
    assert_eq!(bytes[56..60], 42u32.to_be_bytes(), "vm count");
    assert_eq!(bytes[72..76], [0; 4], "self-fence timeout: off");
    assert_eq!(bytes[76], 0, "self-fence state: off");
    assert_eq!(bytes[85..93], [0; 8], "echoed session: none yet");
    assert_eq!(bytes[93..97], 375u32.to_be_bytes(), "ack period asked");
    assert_eq!(bytes[97] as usize, CLUSTER.len());
    assert_eq!(&bytes[98..98 + CLUSTER.len()], CLUSTER.as_bytes());
    let host_at = 98 + CLUSTER.len();
    assert_eq!(bytes[host_at] as usize, HOST.len());
    assert_eq!(
        &bytes[host_at + 1..host_at + 1 + HOST.len()],
        HOST.as_bytes()
    );
    let mac_at = host_at + 1 + HOST.len();
    assert_eq!(bytes.len(), mac_at + DATAGRAM_MAC_LEN);
    assert_eq!(
        bytes[mac_at..],
        key().datagram_tag(&bytes[..mac_at]),
        "keyed BLAKE3 over every byte before it"
    );
}

#[test]
fn the_longest_possible_heartbeat_fits_the_declared_maximum() {
    let host = "h".repeat(protocol::MAX_HOST_ID_LEN);
    let cluster = "c".repeat(protocol::MAX_CLUSTER_ID_LEN);
    let hb = Heartbeat {
        cluster_id: &cluster,
        host_id: &host,
        ..heartbeat(1, 1)
    };
    let bytes = encode_heartbeat(&hb, &key()).unwrap();
    assert_eq!(bytes.len(), MAX_HEARTBEAT_LEN);
    const { assert!(MAX_HEARTBEAT_LEN < protocol::DATAGRAM_RECV_BUFFER_LEN) };
    assert_eq!(decode_heartbeat(&bytes, &key()), Ok(hb));
}

#[test]
fn a_datagram_with_a_flipped_bit_is_rejected_as_forged_or_malformed_never_accepted() {
    let bytes = encoded();
    for i in 0..bytes.len() * 8 {
        let mut mutated = bytes.clone();
        mutated[i / 8] ^= 1 << (i % 8);
        assert!(
            decode_heartbeat(&mutated, &key()).is_err(),
            "bit {i} flipped and still accepted"
        );
    }
}

#[test]
fn a_datagram_with_a_flipped_bit_in_a_counter_is_rejected_as_forged() {
    let mut bytes = encoded();
    bytes[33] ^= 0x01; // inside the sequence number
    assert_eq!(decode_heartbeat(&bytes, &key()), Err(DecodeError::BadMac));
}

#[test]
fn a_heartbeat_signed_with_another_key_is_rejected_as_forged() {
    let bytes = encode_heartbeat(&heartbeat(7, 100), &other_key()).unwrap();
    assert_eq!(decode_heartbeat(&bytes, &key()), Err(DecodeError::BadMac));
}

#[test]
fn a_heartbeat_with_its_mac_replaced_by_zeros_is_rejected_as_forged() {
    let mut bytes = encoded();
    let n = bytes.len();
    bytes[n - DATAGRAM_MAC_LEN..].fill(0);
    assert_eq!(decode_heartbeat(&bytes, &key()), Err(DecodeError::BadMac));
}

#[test]
fn every_truncation_of_a_heartbeat_is_rejected_as_truncated() {
    let bytes = encoded();
    for len in 4..bytes.len() {
        let err = decode_heartbeat(&bytes[..len], &key()).unwrap_err();
        assert_eq!(err.reason(), RejectReason::Truncated, "cut at {len}: {err}");
    }
}

#[test]
fn an_empty_or_tiny_datagram_is_rejected_without_panicking() {
    for len in 0..4 {
        assert!(decode_heartbeat(&b"DFIB"[..len], &key()).is_err());
    }
    assert_eq!(decode_heartbeat(b"xy", &key()), Err(DecodeError::BadMagic));
}

#[test]
fn a_heartbeat_with_extra_bytes_after_the_mac_is_rejected_as_malformed() {
    let mut bytes = encoded();
    bytes.push(0);
    assert!(matches!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn a_datagram_longer_than_any_heartbeat_is_rejected_as_oversize() {
    let bytes = vec![0u8; MAX_HEARTBEAT_LEN + 1];
    assert_eq!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::Oversize {
            len: MAX_HEARTBEAT_LEN + 1,
            max: MAX_HEARTBEAT_LEN
        })
    );
}

#[test]
fn a_datagram_of_another_protocol_is_rejected_for_its_magic() {
    let mut bytes = encoded();
    bytes[0] = b'X';
    assert_eq!(decode_heartbeat(&bytes, &key()), Err(DecodeError::BadMagic));
}

#[test]
fn a_heartbeat_of_another_protocol_version_is_rejected_for_its_version() {
    let mut bytes = encoded();
    bytes[4] = 200;
    assert_eq!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::UnsupportedVersion(200))
    );
}

#[test]
fn an_ack_offered_as_a_heartbeat_is_rejected_for_its_kind() {
    let ack = protocol::encode_ack(&ack_for(&heartbeat(7, 100)), &key()).unwrap();
    assert_eq!(
        decode_heartbeat(&ack, &key()),
        Err(DecodeError::WrongKind {
            found: 2,
            expected: 1
        })
    );
}

#[test]
fn a_heartbeat_with_reserved_flag_bits_set_is_rejected_as_malformed() {
    let mut bytes = encoded();
    bytes[7] |= 0x80;
    assert!(matches!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn a_heartbeat_whose_host_id_is_not_utf8_is_rejected_as_malformed() {
    let mut bytes = encoded();
    let host_at = 97 + 1 + CLUSTER.len() + 1;
    bytes[host_at] = 0xff;
    let bytes = resign(bytes);
    assert!(matches!(
        decode_heartbeat(&bytes, &key()),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn a_heartbeat_with_an_empty_or_too_long_host_id_cannot_be_encoded() {
    let hb = Heartbeat {
        host_id: "",
        ..heartbeat(1, 1)
    };
    assert_eq!(
        encode_heartbeat(&hb, &key()),
        Err(EncodeError::BadId {
            field: "host_id",
            error: IdError::Empty
        })
    );
    let long = "h".repeat(254);
    let hb = Heartbeat {
        host_id: &long,
        ..heartbeat(1, 1)
    };
    assert!(encode_heartbeat(&hb, &key()).is_err());
}

#[test]
fn encoding_into_a_reused_buffer_gives_the_same_bytes_as_a_fresh_one() {
    let mut buf = vec![0xAA; 3];
    let hb = heartbeat(7, 100);
    hb.encode_into(&key(), &mut buf).unwrap();
    assert_eq!(buf, encoded());
    assert!(buf.len() >= MIN_HEARTBEAT_LEN);
}

#[test]
fn decoding_many_heartbeats_in_a_row_gives_each_back() {
    // Not a benchmark: a smoke run of the hot path over many distinct datagrams.
    let key = key();
    let mut buf = Vec::new();
    for seq in 0..20_000u64 {
        heartbeat(7, seq).encode_into(&key, &mut buf).unwrap();
        let hb = decode_heartbeat(&buf, &key).unwrap();
        assert_eq!(hb.sequence, seq);
    }
}
