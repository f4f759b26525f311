mod common;

use common::*;
use protocol::{
    decode_ack, encode_ack, encode_heartbeat, Ack, DecodeError, DATAGRAM_MAC_LEN, MAX_ACK_LEN,
};

#[test]
fn an_ack_survives_encoding_and_decoding_unchanged() {
    let ack = ack_for(&heartbeat(7, 100));
    let bytes = encode_ack(&ack, &key()).unwrap();
    assert_eq!(decode_ack(&bytes, &key()), Ok(ack));
}

#[test]
fn an_ack_echoes_the_heartbeat_it_answers() {
    let mut hb = heartbeat(9, 1234);
    hb.path_index = 2;
    let ack = Ack::answering(&hb, CONTROLLER, 77);
    assert_eq!(ack.host_id, hb.host_id);
    assert_eq!(ack.boot_id, hb.boot_id);
    assert_eq!(ack.incarnation, 9);
    assert_eq!(ack.sequence, 1234);
    assert_eq!(ack.path_index, 2);
    assert_eq!(ack.echoed_sent_mono_ns, hb.sent_mono_ns);
    assert_eq!(ack.controller_unix_ns, 77);
}

#[test]
fn an_ack_carries_the_controller_session_and_whether_it_counts() {
    for counts in [true, false] {
        let ack = ack_for(&heartbeat(7, 100))
            .with_session(0x5e55_1011)
            .counting(counts);
        let bytes = encode_ack(&ack, &key()).unwrap();
        let back = decode_ack(&bytes, &key()).unwrap();
        assert_eq!((back.session, back.counts), (0x5e55_1011, counts));
    }
}

#[test]
fn the_longest_possible_ack_fits_the_declared_maximum() {
    let host = "h".repeat(protocol::MAX_HOST_ID_LEN);
    let cluster = "c".repeat(protocol::MAX_CLUSTER_ID_LEN);
    let controller = "k".repeat(protocol::MAX_CONTROLLER_ID_LEN);
    let ack = Ack {
        cluster_id: &cluster,
        host_id: &host,
        controller_id: &controller,
        ..ack_for(&heartbeat(1, 1))
    };
    let bytes = encode_ack(&ack, &key()).unwrap();
    assert_eq!(bytes.len(), MAX_ACK_LEN);
    assert_eq!(decode_ack(&bytes, &key()), Ok(ack));
}

#[test]
fn an_ack_with_a_flipped_bit_is_never_accepted() {
    let bytes = encode_ack(&ack_for(&heartbeat(7, 100)), &key()).unwrap();
    for i in 0..bytes.len() * 8 {
        let mut mutated = bytes.clone();
        mutated[i / 8] ^= 1 << (i % 8);
        assert!(decode_ack(&mutated, &key()).is_err(), "bit {i}");
    }
}

#[test]
fn an_ack_with_a_forged_mac_is_rejected_as_forged() {
    let mut bytes = encode_ack(&ack_for(&heartbeat(7, 100)), &key()).unwrap();
    let n = bytes.len();
    bytes[n - DATAGRAM_MAC_LEN] ^= 1;
    assert_eq!(decode_ack(&bytes, &key()), Err(DecodeError::BadMac));
    let other = encode_ack(&ack_for(&heartbeat(7, 100)), &other_key()).unwrap();
    assert_eq!(decode_ack(&other, &key()), Err(DecodeError::BadMac));
}

#[test]
fn every_truncation_of_an_ack_is_rejected_as_truncated() {
    let bytes = encode_ack(&ack_for(&heartbeat(7, 100)), &key()).unwrap();
    for len in 4..bytes.len() {
        assert!(
            matches!(
                decode_ack(&bytes[..len], &key()),
                Err(DecodeError::Truncated { .. })
            ),
            "cut at {len}"
        );
    }
}

#[test]
fn a_heartbeat_reflected_back_as_an_ack_is_rejected_for_its_kind() {
    let hb = encode_heartbeat(&heartbeat(7, 100), &key()).unwrap();
    assert_eq!(
        decode_ack(&hb, &key()),
        Err(DecodeError::WrongKind {
            found: 1,
            expected: 2
        })
    );
}

#[test]
fn an_ack_with_a_reserved_flag_bit_set_is_rejected_as_malformed() {
    let mut bytes = encode_ack(&ack_for(&heartbeat(7, 100)), &key()).unwrap();
    bytes[7] |= 2;
    assert!(matches!(
        decode_ack(&bytes, &key()),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn a_datagram_longer_than_any_ack_is_rejected_as_oversize() {
    let bytes = vec![0u8; MAX_ACK_LEN + 1];
    assert!(matches!(
        decode_ack(&bytes, &key()),
        Err(DecodeError::Oversize { .. })
    ));
}

#[test]
fn an_ack_with_an_empty_controller_id_cannot_be_encoded() {
    let ack = Ack {
        controller_id: "",
        ..ack_for(&heartbeat(1, 1))
    };
    assert!(encode_ack(&ack, &key()).is_err());
}

#[test]
fn the_encoded_ack_follows_the_documented_layout_and_ends_with_its_blake3_tag() {
    let mut hb = heartbeat(7, 100);
    hb.path_index = 3;
    let ack = ack_for(&hb).with_session(0x5e55).counting(true);
    let bytes = encode_ack(&ack, &key()).unwrap();
    assert_eq!(&bytes[0..4], b"DFIB");
    assert_eq!(bytes[4], 3, "ack layout version");
    assert_eq!(bytes[5], 2, "kind");
    assert_eq!(bytes[6], 3, "path index");
    assert_eq!(bytes[7], 1, "flags: counts");
    assert_eq!(bytes[32..40], 100u64.to_be_bytes(), "sequence");
    assert_eq!(bytes[40..48], hb.sent_mono_ns.to_be_bytes(), "send time");
    assert_eq!(bytes[56..64], 0x5e55u64.to_be_bytes(), "session");
    assert_eq!(bytes[64] as usize, CLUSTER.len());
    let mac_at = 64 + 1 + CLUSTER.len() + 1 + HOST.len() + 1 + CONTROLLER.len();
    assert_eq!(bytes.len(), mac_at + DATAGRAM_MAC_LEN);
    assert_eq!(bytes[mac_at..], key().datagram_tag(&bytes[..mac_at]));
}

#[test]
fn an_ack_of_the_previous_layout_is_refused_as_old() {
    let mut bytes = encode_ack(&ack_for(&heartbeat(7, 100)), &key()).unwrap();
    bytes[4] = 2;
    assert_eq!(decode_ack(&bytes, &key()), Err(DecodeError::OldVersion(2)));
}

#[test]
fn an_ack_signed_with_the_key_a_receiver_handed_on_is_the_one_signed_with_the_key() {
    let ack = ack_for(&heartbeat(7, 100));
    assert_eq!(
        encode_ack(&ack, key().datagram_key()).unwrap(),
        encode_ack(&ack, &key()).unwrap()
    );
}
