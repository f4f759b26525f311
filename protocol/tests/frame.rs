mod common;

use common::*;
use protocol::frame::HostCommand;
use protocol::{
    decode_frame, encode_frame, DecodeError, Direction, EncodeError, Envelope, Event, EventPayload,
    FrameDecoder, Message, VmInfo, FRAME_HEADER_LEN, MAC_LEN, MAX_FRAME_BODY_LEN,
};

fn envelope(message: Message) -> Envelope {
    Envelope {
        cluster_id: CLUSTER.into(),
        host_id: HOST.into(),
        boot_id: boot(1),
        incarnation: 7,
        conn: 0,
        message,
    }
}

fn event(id: u64, payload: EventPayload) -> Envelope {
    envelope(Message::Event(Event {
        id,
        unix_ns: 1_790_000_000_000_000_000 + id,
        mono_ns: 9_000_000_000 + id,
        payload,
    }))
}

fn every_payload() -> Vec<EventPayload> {
    vec![
        EventPayload::QemuExited {
            vm_uuid: Some("6d1c5b1e-8a63-4c55-9e1f-3f0f3a1b2c3d".into()),
            vm_name: Some("instance-0000002a".into()),
            pid: 4242,
            exit_code: None,
            signal: Some(9),
            killer_pid: Some(1),
            killer_comm: Some("systemd".into()),
            by_hypervisor: false,
            oom_killed: true,
            kernel_ts_ns: u64::MAX,
        },
        EventPayload::QemuStarted {
            vm_uuid: None,
            vm_name: None,
            pid: 1,
        },
        EventPayload::DiskStallStarted {
            vm_uuid: Some("u".into()),
            vm_name: Some("n".into()),
            pid: 7,
            since_ns: 123,
            stuck_ops: 3,
            paths: vec!["/dev/rbd0".into(), "/var/lib/nova/instances/x/disk".into()],
        },
        EventPayload::DiskStallEnded {
            vm_uuid: Some("u".into()),
            vm_name: None,
            pid: 7,
            duration_ms: 31_000,
        },
        EventPayload::LibvirtLifecycle {
            vm_uuid: Some("u".into()),
            vm_name: Some("n".into()),
            event: "Stopped".into(),
            detail: "Failed".into(),
        },
        EventPayload::DomainDefinition {
            vm_uuid: "u".into(),
            vm_name: "n".into(),
            xml: "<domain type='kvm'><name>n</name></domain>".into(),
        },
        EventPayload::Inventory {
            vms: vec![VmInfo {
                uuid: "u".into(),
                name: "n".into(),
                state: "running".into(),
                reason: "booted".into(),
                pid: Some(99),
                disks: vec!["/dev/sdb".into()],
            }],
        },
    ]
}

fn every_message() -> Vec<Envelope> {
    let mut all = vec![
        envelope(Message::Hello {
            last_event_id: 0,
            nonce: 0,
        }),
        envelope(Message::Welcome {
            controller_id: CONTROLLER.into(),
            highest_event_id: 41,
        }),
        envelope(Message::EventAck {
            controller_id: CONTROLLER.into(),
            up_to_event_id: 42,
        }),
        envelope(Message::Command {
            controller_id: CONTROLLER.into(),
            command_id: u64::MAX,
            command: HostCommand::StartDomain {
                vm_uuid: "6d1c5b1e-8a63-4c55-9e1f-3f0f3a1b2c3d".into(),
            },
        }),
        envelope(Message::Command {
            controller_id: CONTROLLER.into(),
            command_id: 1,
            command: HostCommand::StartFromDefinition {
                vm_uuid: "6d1c5b1e-8a63-4c55-9e1f-3f0f3a1b2c3d".into(),
                xml: "<domain type='kvm'>\n  <name>n</name>\n</domain>".into(),
            },
        }),
        envelope(Message::Command {
            controller_id: CONTROLLER.into(),
            command_id: 2,
            command: HostCommand::QueryDomain {
                vm_uuid: "6d1c5b1e-8a63-4c55-9e1f-3f0f3a1b2c3d".into(),
            },
        }),
        envelope(Message::CommandResult {
            command_id: 7,
            ok: false,
            detail: "starting instance-0000002a: \"quoted\" failure\n".into(),
        }),
    ];
    for (i, payload) in every_payload().into_iter().enumerate() {
        all.push(event(i as u64 + 1, payload));
    }
    all
}

#[test]
fn every_message_and_event_kind_survives_encoding_and_decoding_unchanged() {
    for env in every_message() {
        let bytes = encode_frame(&env, &key()).unwrap();
        let (back, used) = decode_frame(&bytes, &key()).unwrap();
        assert_eq!(back, env);
        assert_eq!(used, bytes.len());
    }
}

#[test]
fn the_frame_header_carries_the_body_length_and_the_mac_closes_the_frame() {
    let bytes = encode_frame(
        &envelope(Message::Hello {
            last_event_id: 5,
            nonce: 0,
        }),
        &key(),
    )
    .unwrap();
    assert_eq!(&bytes[0..4], b"DFIB");
    assert_eq!(bytes[4], 1);
    assert_eq!(bytes[5], 3);
    assert_eq!(&bytes[6..8], &[0, 0]);
    let body_len = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), FRAME_HEADER_LEN + body_len + MAC_LEN);
    let body: serde_json::Value =
        serde_json::from_slice(&bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + body_len]).unwrap();
    assert_eq!(body["message"]["type"], "hello");
    assert_eq!(body["boot_id"], "01010101-0101-0101-0101-010101010101");
}

#[test]
fn a_frame_fed_one_byte_at_a_time_comes_out_whole_once() {
    let env = event(1, every_payload().remove(0));
    let bytes = encode_frame(&env, &key()).unwrap();
    let mut dec = FrameDecoder::new(key(), Direction::ToController);
    for (i, b) in bytes.iter().enumerate() {
        dec.push(&[*b]);
        let got = dec.next_frame().unwrap();
        if i + 1 < bytes.len() {
            assert_eq!(got, None, "frame popped early at byte {i}");
        } else {
            assert_eq!(got, Some(env.clone()));
        }
    }
    assert_eq!(dec.next_frame(), Ok(None));
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn several_frames_pushed_at_once_come_out_in_order() {
    let envs: Vec<Envelope> = (1..=50)
        .map(|id| {
            event(
                id,
                EventPayload::QemuStarted {
                    vm_uuid: None,
                    vm_name: None,
                    pid: id as u32,
                },
            )
        })
        .collect();
    let mut stream = Vec::new();
    for env in &envs {
        stream.extend(encode_frame(env, &key()).unwrap());
    }
    let mut dec = FrameDecoder::new(key(), Direction::ToController);
    let mut out = Vec::new();
    // Odd-sized chunks so frames straddle pushes.
    for chunk in stream.chunks(97) {
        dec.push(chunk);
        while let Some(env) = dec.next_frame().unwrap() {
            out.push(env);
        }
    }
    assert_eq!(out, envs);
}

#[test]
fn a_frame_with_a_flipped_bit_in_its_body_is_rejected_as_forged() {
    let mut bytes = encode_frame(
        &envelope(Message::Hello {
            last_event_id: 5,
            nonce: 0,
        }),
        &key(),
    )
    .unwrap();
    bytes[FRAME_HEADER_LEN + 3] ^= 0x04;
    assert_eq!(
        decode_frame(&bytes, &key()).unwrap_err(),
        DecodeError::BadMac
    );
}

#[test]
fn a_frame_signed_with_another_key_is_rejected_and_the_stream_stays_failed() {
    let bad = encode_frame(
        &envelope(Message::Hello {
            last_event_id: 5,
            nonce: 0,
        }),
        &other_key(),
    )
    .unwrap();
    let good = encode_frame(
        &envelope(Message::Hello {
            last_event_id: 6,
            nonce: 0,
        }),
        &key(),
    )
    .unwrap();
    let mut dec = FrameDecoder::new(key(), Direction::ToController);
    dec.push(&bad);
    dec.push(&good);
    assert_eq!(dec.next_frame(), Err(DecodeError::BadMac));
    assert_eq!(
        dec.next_frame(),
        Err(DecodeError::BadMac),
        "error is sticky"
    );
    dec.push(&good);
    assert_eq!(dec.next_frame(), Err(DecodeError::BadMac));
    assert_eq!(dec.error(), Some(&DecodeError::BadMac));
}

#[test]
fn a_frame_declaring_a_body_over_one_mebibyte_is_refused_from_its_header_alone() {
    let mut header = Vec::from(*b"DFIB");
    header.extend_from_slice(&[1, 3, 0, 0]);
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut dec = FrameDecoder::new(key(), Direction::ToController);
    dec.push(&header);
    assert_eq!(
        dec.next_frame(),
        Err(DecodeError::Oversize {
            len: u32::MAX as usize,
            max: MAX_FRAME_BODY_LEN
        })
    );
    assert_eq!(dec.buffered(), 0, "nothing kept after the refusal");
}

#[test]
fn a_stream_of_another_protocol_is_refused_by_its_first_bytes() {
    let mut dec = FrameDecoder::new(key(), Direction::ToController);
    dec.push(b"GE");
    assert_eq!(dec.next_frame(), Err(DecodeError::BadMagic));
}

#[test]
fn a_truncated_frame_is_rejected_as_truncated_when_decoded_on_its_own() {
    let bytes = encode_frame(
        &envelope(Message::Hello {
            last_event_id: 5,
            nonce: 0,
        }),
        &key(),
    )
    .unwrap();
    for len in 4..bytes.len() {
        assert!(
            matches!(
                decode_frame(&bytes[..len], &key()),
                Err(DecodeError::Truncated { .. })
            ),
            "cut at {len}"
        );
    }
}

#[test]
fn a_frame_sent_the_wrong_way_is_refused() {
    let welcome = envelope(Message::Welcome {
        controller_id: CONTROLLER.into(),
        highest_event_id: 0,
    });
    let mut dec = FrameDecoder::new(key(), Direction::ToController);
    dec.push(&encode_frame(&welcome, &key()).unwrap());
    assert!(matches!(dec.next_frame(), Err(DecodeError::Malformed(_))));

    let hello = envelope(Message::Hello {
        last_event_id: 0,
        nonce: 0,
    });
    let mut dec = FrameDecoder::new(key(), Direction::ToWatchdog);
    dec.push(&encode_frame(&hello, &key()).unwrap());
    assert!(matches!(dec.next_frame(), Err(DecodeError::Malformed(_))));
}

#[test]
fn a_frame_with_a_bad_version_or_reserved_bytes_is_refused() {
    let good = encode_frame(
        &envelope(Message::Hello {
            last_event_id: 5,
            nonce: 0,
        }),
        &key(),
    )
    .unwrap();
    let mut v2 = good.clone();
    v2[4] = 2;
    assert_eq!(
        decode_frame(&v2, &key()).unwrap_err(),
        DecodeError::UnsupportedVersion(2)
    );
    let mut reserved = good.clone();
    reserved[7] = 1;
    assert!(matches!(
        decode_frame(&reserved, &key()),
        Err(DecodeError::Malformed(_))
    ));
    let mut kind = good;
    kind[5] = 1;
    assert!(matches!(
        decode_frame(&kind, &key()),
        Err(DecodeError::WrongKind { .. })
    ));
}

#[test]
fn an_envelope_with_an_invalid_host_id_cannot_be_encoded() {
    let mut env = envelope(Message::Hello {
        last_event_id: 0,
        nonce: 0,
    });
    env.host_id = "bad\nhost".into();
    assert!(matches!(
        encode_frame(&env, &key()),
        Err(EncodeError::BadId {
            field: "host_id",
            ..
        })
    ));
}

#[test]
fn an_inventory_too_large_for_one_frame_cannot_be_encoded() {
    let vms = (0..20_000)
        .map(|i| VmInfo {
            uuid: format!("{i:036}"),
            name: format!("instance-{i:08x}"),
            state: "running".into(),
            reason: "booted".into(),
            pid: Some(i),
            disks: vec![format!("/var/lib/nova/instances/{i:036}/disk")],
        })
        .collect();
    let env = event(1, EventPayload::Inventory { vms });
    assert!(matches!(
        encode_frame(&env, &key()),
        Err(EncodeError::FrameTooLarge { .. })
    ));
}

fn start_domain(command_id: u64) -> Envelope {
    envelope(Message::Command {
        controller_id: CONTROLLER.into(),
        command_id,
        command: HostCommand::StartDomain {
            vm_uuid: "u-1".into(),
        },
    })
}

#[test]
fn a_command_travels_to_the_watchdog_and_its_result_back_to_the_controller() {
    let result = envelope(Message::CommandResult {
        command_id: 3,
        ok: true,
        detail: "already running".into(),
    });
    let mut to_watchdog = FrameDecoder::new(key(), Direction::ToWatchdog);
    to_watchdog.push(&encode_frame(&start_domain(3), &key()).unwrap());
    assert_eq!(to_watchdog.next_frame(), Ok(Some(start_domain(3))));
    let mut to_controller = FrameDecoder::new(key(), Direction::ToController);
    to_controller.push(&encode_frame(&result, &key()).unwrap());
    assert_eq!(to_controller.next_frame(), Ok(Some(result.clone())));

    // Reflected back at their senders, both are refused.
    let mut dec = FrameDecoder::new(key(), Direction::ToController);
    dec.push(&encode_frame(&start_domain(3), &key()).unwrap());
    assert!(matches!(dec.next_frame(), Err(DecodeError::Malformed(_))));
    let mut dec = FrameDecoder::new(key(), Direction::ToWatchdog);
    dec.push(&encode_frame(&result, &key()).unwrap());
    assert!(matches!(dec.next_frame(), Err(DecodeError::Malformed(_))));
}

#[test]
fn a_command_is_json_with_its_op_named_in_snake_case() {
    let bytes = encode_frame(&start_domain(9), &key()).unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&bytes[FRAME_HEADER_LEN..bytes.len() - MAC_LEN]).unwrap();
    assert_eq!(body["message"]["type"], "command");
    assert_eq!(body["message"]["command_id"], 9);
    assert_eq!(body["message"]["command"]["op"], "start_domain");
    assert_eq!(body["message"]["command"]["vm_uuid"], "u-1");
}

#[test]
fn a_stale_copys_destroy_is_named_destroy_domain_on_the_wire() {
    let env = envelope(Message::Command {
        controller_id: CONTROLLER.into(),
        command_id: 5,
        command: HostCommand::DestroyDomain {
            vm_uuid: "u-1".into(),
        },
    });
    let bytes = encode_frame(&env, &key()).unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&bytes[FRAME_HEADER_LEN..bytes.len() - MAC_LEN]).unwrap();
    assert_eq!(body["message"]["command"]["op"], "destroy_domain");
    assert_eq!(body["message"]["command"]["vm_uuid"], "u-1");
}

#[test]
fn a_command_from_a_newer_controller_decodes_as_unknown_so_it_can_be_answered() {
    let json = r#"{"type":"command","controller_id":"ctl","command_id":4,
                   "command":{"op":"migrate_domain","vm_uuid":"u","to":"h9"}}"#;
    let message: Message = serde_json::from_str(json).unwrap();
    assert_eq!(
        message,
        Message::Command {
            controller_id: "ctl".into(),
            command_id: 4,
            command: HostCommand::Unknown,
        }
    );
}

#[test]
fn a_command_with_an_invalid_controller_id_cannot_be_encoded() {
    let env = envelope(Message::Command {
        controller_id: "bad\nctl".into(),
        command_id: 1,
        command: HostCommand::StartDomain {
            vm_uuid: "u".into(),
        },
    });
    assert!(matches!(
        encode_frame(&env, &key()),
        Err(EncodeError::BadId {
            field: "controller_id",
            ..
        })
    ));
}
