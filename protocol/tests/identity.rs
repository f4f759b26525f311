//! A key per host and the echoed controller session: who may speak for which host, and
//! what counts as a fresh sign of life.
mod common;

use std::sync::Arc;

use common::*;
use protocol::{
    decode_ack, encode_ack, encode_frame, encode_heartbeat, AckReceiver, BootId, DecodeError,
    Direction, Envelope, FrameDecoder, FrameKeys, Heartbeat, HeartbeatReceiver, HostKeys,
    MasterKey, Message, RejectReason,
};

const SESSION: u64 = 0x1234_5678_9abc_def0;

fn master() -> MasterKey {
    MasterKey::new(b"the controller's master key, 32b").unwrap()
}

fn receiver(enrolled: &[&str]) -> HeartbeatReceiver {
    let mut keys = HostKeys::new(master());
    keys.set_enrolled(enrolled.iter().copied());
    HeartbeatReceiver::per_host(keys, CLUSTER, SESSION)
}

fn signed_by(hb: &Heartbeat<'_>, host: &str) -> Vec<u8> {
    encode_heartbeat(hb, &master().host_key(host)).unwrap()
}

#[test]
fn a_heartbeat_of_an_enrolled_host_signed_with_its_own_key_is_accepted() {
    let mut rx = receiver(&[HOST]);
    let hb = Heartbeat {
        session: SESSION,
        ..heartbeat(7, 100)
    };
    let bytes = signed_by(&hb, HOST);
    assert!(rx.receive(&bytes).unwrap().proven);
}

#[test]
fn a_host_that_was_never_enrolled_is_refused_as_unknown() {
    let mut rx = receiver(&["someone-else"]);
    let hb = heartbeat(7, 100);
    assert_eq!(
        rx.receive(&signed_by(&hb, HOST)).unwrap_err(),
        RejectReason::UnknownHost
    );
    assert_eq!(rx.counters().get(RejectReason::UnknownHost), 1);
}

#[test]
fn a_host_speaking_for_another_host_with_its_own_key_is_refused_as_forged() {
    let mut rx = receiver(&[HOST, "compute-18"]);
    // compute-18 holds only its own key and signs a heartbeat naming compute-17.
    let hb = heartbeat(7, 100);
    assert_eq!(
        rx.receive(&signed_by(&hb, "compute-18")).unwrap_err(),
        RejectReason::BadMac
    );
    // The old shared key (the master itself) is no host's key either.
    let with_master = encode_heartbeat(
        &hb,
        &protocol::Key::new(b"the controller's master key, 32b").unwrap(),
    )
    .unwrap();
    assert_eq!(rx.receive(&with_master).unwrap_err(), RejectReason::BadMac);
}

#[test]
fn a_revoked_host_is_refused_from_then_on() {
    let mut rx = receiver(&[HOST]);
    assert!(rx.receive(&signed_by(&heartbeat(7, 100), HOST)).is_ok());
    assert!(rx.host_keys_mut().unwrap().revoke(HOST));
    rx.forget_host(HOST);
    assert_eq!(
        rx.receive(&signed_by(&heartbeat(7, 101), HOST))
            .unwrap_err(),
        RejectReason::UnknownHost
    );
}

#[test]
fn a_heartbeat_echoing_an_older_session_is_accepted_but_proves_nothing() {
    // A recording made before the controller restarted: authentic, never seen by this
    // process's window, but it echoes the old process's session (or none).
    let mut rx = receiver(&[HOST]);
    for (sequence, session) in [(100, 0), (101, 0x0bad_5e55)] {
        let hb = Heartbeat {
            session,
            ..heartbeat(7, sequence)
        };
        let bytes = signed_by(&hb, HOST);
        assert!(!rx.receive(&bytes).unwrap().proven, "session {session:#x}");
    }
    let hb = Heartbeat {
        session: SESSION,
        ..heartbeat(7, 102)
    };
    assert!(rx.receive(&signed_by(&hb, HOST)).unwrap().proven);
}

#[test]
fn an_ack_that_does_not_count_leaves_the_watchdog_unreached() {
    let key = master().host_key(HOST);
    let hb = heartbeat(7, 100);
    let mut acks = AckReceiver::new(key.clone(), CLUSTER, HOST, hb.boot_id, hb.incarnation);
    let standby = encode_ack(&ack_for(&hb).with_session(SESSION).counting(false), &key).unwrap();
    let got = acks.receive(&standby, 100).unwrap();
    assert_eq!((got.session, got.counts), (SESSION, false));
    assert_eq!(acks.newest_acked_send_mono_ns(), None);
    let counting = encode_ack(&ack_for(&hb).with_session(SESSION), &key).unwrap();
    acks.receive(&counting, 100).unwrap();
    assert_eq!(acks.newest_acked_send_mono_ns(), Some(hb.sent_mono_ns));
}

fn envelope(host: &str) -> Envelope {
    Envelope {
        cluster_id: CLUSTER.into(),
        host_id: host.into(),
        boot_id: BootId([1; 16]),
        incarnation: 7,
        conn: 0,
        message: Message::Hello {
            last_event_id: 0,
            nonce: 0,
        },
    }
}

fn per_host_decoder(enrolled: &[&str]) -> FrameDecoder {
    let mut keys = HostKeys::new(master());
    keys.set_enrolled(enrolled.iter().copied());
    let keys = Arc::new(keys);
    FrameDecoder::new(
        FrameKeys::PerHost(Arc::new(move |h: &str| keys.get(h).cloned())),
        Direction::ToController,
    )
}

#[test]
fn a_stream_frame_is_checked_with_the_key_of_the_host_it_names() {
    let mut dec = per_host_decoder(&[HOST, "compute-18"]);
    dec.push(&encode_frame(&envelope(HOST), &master().host_key(HOST)).unwrap());
    assert_eq!(dec.next_frame().unwrap().unwrap().host_id, HOST);

    let mut dec = per_host_decoder(&[HOST, "compute-18"]);
    dec.push(&encode_frame(&envelope(HOST), &master().host_key("compute-18")).unwrap());
    assert_eq!(dec.next_frame().unwrap_err(), DecodeError::BadMac);

    let mut dec = per_host_decoder(&["compute-18"]);
    dec.push(&encode_frame(&envelope(HOST), &master().host_key(HOST)).unwrap());
    assert_eq!(dec.next_frame().unwrap_err(), DecodeError::UnknownHost);
}

#[test]
fn a_frame_keeps_the_connection_it_is_bound_to_and_a_challenge_travels_only_to_the_watchdog() {
    let key = master().host_key(HOST);
    let bound = Envelope {
        conn: 0xc0ffee,
        ..envelope(HOST)
    };
    let mut dec = FrameDecoder::new(key.clone(), Direction::ToController);
    dec.push(&encode_frame(&bound, &key).unwrap());
    assert_eq!(dec.next_frame().unwrap().unwrap().conn, 0xc0ffee);

    let challenge = Envelope {
        message: Message::Challenge { nonce: 9 },
        ..envelope(HOST)
    };
    let mut to_watchdog = FrameDecoder::new(key.clone(), Direction::ToWatchdog);
    to_watchdog.push(&encode_frame(&challenge, &key).unwrap());
    assert!(to_watchdog.next_frame().unwrap().is_some());
    let mut to_controller = FrameDecoder::new(key.clone(), Direction::ToController);
    to_controller.push(&encode_frame(&challenge, &key).unwrap());
    assert!(
        to_controller.next_frame().is_err(),
        "a challenge sent the wrong way"
    );
}

#[cfg(feature = "codec")]
#[test]
fn the_length_delimited_codec_hands_over_whole_frames_and_refuses_a_huge_one_from_its_header() {
    use tokio_util::codec::Decoder as _;
    let key = master().host_key(HOST);
    let a = encode_frame(&envelope(HOST), &key).unwrap();
    let b = encode_frame(
        &Envelope {
            conn: 3,
            ..envelope(HOST)
        },
        &key,
    )
    .unwrap();
    let mut codec = protocol::frame_codec();
    let mut buf = bytes::BytesMut::new();
    // Byte by byte: nothing until a whole frame is there.
    let mut frames = Vec::new();
    for byte in a.iter().chain(&b) {
        buf.extend_from_slice(&[*byte]);
        if let Some(frame) = codec.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
    }
    assert_eq!(frames.len(), 2);
    assert_eq!(&frames[0][..], &a[..]);
    let keys = FrameKeys::One(key);
    let second = protocol::decode_frame_keyed(&frames[1], &keys, Direction::ToController).unwrap();
    assert_eq!(second.conn, 3);

    let mut huge = b"DFIB\x01\x03\x00\x00".to_vec();
    huge.extend_from_slice(&(protocol::MAX_FRAME_BODY_LEN as u32 + 1).to_be_bytes());
    let mut buf = bytes::BytesMut::from(&huge[..]);
    assert!(
        codec.decode(&mut buf).is_err(),
        "refused from the header alone"
    );
}

/// What the receiver said of `hb`, signed by its host, at `now_ms`: (proven, ack due,
/// ack counts), and the ack (signed with the key it handed on) if due.
fn paced(
    rx: &mut HeartbeatReceiver,
    hb: &Heartbeat<'_>,
    now_ms: u64,
    acting: bool,
) -> (bool, bool, bool, Option<Vec<u8>>) {
    let bytes = signed_by(hb, HOST);
    let got = rx.receive_paced(&bytes, now_ms, acting).unwrap();
    let ack = got.ack_due.then(|| {
        encode_ack(
            &ack_for(&heartbeat(hb.incarnation, hb.sequence)).counting(got.ack_counts),
            &got.key,
        )
        .unwrap()
    });
    (got.proven, got.ack_due, got.ack_counts, ack)
}

fn with_session(sequence: u64, session: u64) -> Heartbeat<'static> {
    Heartbeat {
        session,
        ..heartbeat(7, sequence)
    }
}

#[test]
fn the_controller_acks_each_path_once_per_period_with_the_key_the_heartbeat_was_verified_with() {
    let mut rx = receiver(&[HOST]);
    let key = master().host_key(HOST);
    let mut acked = Vec::new();
    // Every 100 ms on path 0, asking for an ack every 375 ms (a 3 s isolation timeout).
    for k in 0..10u64 {
        let (proven, _, counts, ack) =
            paced(&mut rx, &with_session(100 + k, SESSION), k * 100, true);
        assert!(proven && counts);
        if let Some(ack) = ack {
            decode_ack(&ack, &key).expect("signed with the host's own key");
            acked.push(k * 100);
        }
    }
    assert_eq!(acked, [0, 300, 600, 900]);
}

#[test]
fn a_heartbeat_that_does_not_echo_the_session_is_acked_at_once_without_counting() {
    let mut rx = receiver(&[HOST]);
    let (proven, due, counts, _) = paced(&mut rx, &with_session(100, 0x0bad_5e55), 0, true);
    assert!(!proven && due && !counts, "the session is taught at once");
    // The watchdog learnt it: its next heartbeat counts and is acked at once too.
    let (_, due, counts, _) = paced(&mut rx, &with_session(101, SESSION), 100, true);
    assert!(due && counts);
    let (_, due, _, _) = paced(&mut rx, &with_session(102, SESSION), 200, true);
    assert!(!due, "then paced");
}

#[test]
fn a_follower_paces_its_acks_too_and_none_of_them_counts() {
    let mut rx = receiver(&[HOST]);
    let mut due = 0;
    for k in 0..10u64 {
        let (proven, d, counts, _) =
            paced(&mut rx, &with_session(100 + k, SESSION), k * 100, false);
        assert!(proven && !counts);
        due += usize::from(d);
    }
    assert_eq!(due, 4);
}
