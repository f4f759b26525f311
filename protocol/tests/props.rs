//! Property tests: decoders never panic on any bytes, every mutation of a signed
//! message is refused, and encoding then decoding gives back what went in.

mod common;

use common::*;
use proptest::prelude::*;
use protocol::{
    decode_ack, decode_frame, decode_heartbeat, decode_refusal, encode_ack, encode_frame,
    encode_heartbeat, refusal_for, Ack, BootId, Direction, Envelope, Event, EventPayload,
    FrameDecoder, Heartbeat, HeartbeatReceiver, HostStatus, Message, VmInfo,
};

fn id_string(max: usize) -> impl Strategy<Value = String> {
    // Any printable text (multi-byte UTF-8 included), cut to the byte limit.
    proptest::string::string_regex(&format!("[^\\x00-\\x1f\\x7f]{{1,{max}}}"))
        .unwrap()
        .prop_map(move |s| {
            let mut end = s.len().min(max);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        })
        .prop_filter("non-empty", |s| !s.is_empty())
}

fn boot_id() -> impl Strategy<Value = BootId> {
    any::<[u8; 16]>().prop_map(BootId)
}

prop_compose! {
    fn heartbeat_parts()(
        cluster in id_string(64),
        host in id_string(253),
        boot in boot_id(),
        numbers in any::<(u64, u64, u64, u64, u64)>(),
        counts in any::<(u32, u32)>(),
        flags in any::<(bool, bool, bool)>(),
        path_index in any::<u8>(),
    ) -> (String, String, BootId, (u64, u64, u64, u64, u64), (u32, u32), (bool, bool, bool), u8) {
        (cluster, host, boot, numbers, counts, flags, path_index)
    }
}

type Parts = (
    String,
    String,
    BootId,
    (u64, u64, u64, u64, u64),
    (u32, u32),
    (bool, bool, bool),
    u8,
);

fn heartbeat_from(p: &Parts) -> Heartbeat<'_> {
    let (cluster, host, boot, n, c, f, path) = p;
    Heartbeat {
        cluster_id: cluster,
        host_id: host,
        boot_id: *boot,
        incarnation: n.0,
        sequence: n.1,
        sent_unix_ns: n.2,
        sent_mono_ns: n.3,
        path_index: *path,
        session: n.0 ^ n.1,
        ack_period_ms: c.0 ^ c.1,
        status: HostStatus {
            vm_count: c.0,
            stalled_vm_count: c.1,
            isolated: f.0,
            libvirt_reachable: f.1,
            self_fence: if f.2 {
                protocol::SelfFence::Armed {
                    timeout_ms: c.0 | 1,
                }
            } else {
                protocol::SelfFence::NotArmed {
                    timeout_ms: c.1,
                    reason: protocol::NotArmed::CannotKill { pid: c.0, uid: c.1 },
                }
            },
            probe_drops: n.4,
        },
    }
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(".{0,40}")
}

fn payload() -> impl Strategy<Value = EventPayload> {
    prop_oneof![
        (
            opt_text(),
            opt_text(),
            any::<u32>(),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
            any::<Option<u32>>(),
            opt_text(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(u, n, pid, code, sig, kp, kc, hv, oom, ts)| {
                EventPayload::QemuExited {
                    vm_uuid: u,
                    vm_name: n,
                    pid,
                    exit_code: code,
                    signal: sig,
                    killer_pid: kp,
                    killer_comm: kc,
                    by_hypervisor: hv,
                    oom_killed: oom,
                    kernel_ts_ns: ts,
                }
            }),
        (opt_text(), opt_text(), any::<u32>()).prop_map(|(u, n, pid)| EventPayload::QemuStarted {
            vm_uuid: u,
            vm_name: n,
            pid
        }),
        (
            opt_text(),
            opt_text(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(".{0,30}", 0..4)
        )
            .prop_map(
                |(u, n, pid, since, ops, paths)| EventPayload::DiskStallStarted {
                    vm_uuid: u,
                    vm_name: n,
                    pid,
                    since_ns: since,
                    stuck_ops: ops,
                    paths
                }
            ),
        (opt_text(), opt_text(), any::<u32>(), any::<u64>()).prop_map(|(u, n, pid, d)| {
            EventPayload::DiskStallEnded {
                vm_uuid: u,
                vm_name: n,
                pid,
                duration_ms: d,
            }
        }),
        (opt_text(), opt_text(), ".{0,20}", ".{0,20}").prop_map(|(u, n, e, d)| {
            EventPayload::LibvirtLifecycle {
                vm_uuid: u,
                vm_name: n,
                event: e,
                detail: d,
            }
        }),
        (".{0,36}", ".{0,20}", ".{0,200}").prop_map(|(u, n, x)| {
            EventPayload::DomainDefinition {
                vm_uuid: u,
                vm_name: n,
                xml: x,
            }
        }),
        proptest::collection::vec(
            (
                ".{0,36}",
                ".{0,20}",
                ".{0,10}",
                ".{0,10}",
                any::<Option<u32>>(),
                proptest::collection::vec(".{0,30}", 0..3)
            )
                .prop_map(|(uuid, name, state, reason, pid, disks)| VmInfo {
                    uuid,
                    name,
                    state,
                    reason,
                    pid,
                    disks
                }),
            0..5
        )
        .prop_map(|vms| EventPayload::Inventory { vms }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<u64>().prop_map(|n| Message::Hello {
            last_event_id: n,
            nonce: 0
        }),
        (id_string(64), any::<u64>()).prop_map(|(c, n)| Message::Welcome {
            controller_id: c,
            highest_event_id: n
        }),
        (id_string(64), any::<u64>()).prop_map(|(c, n)| Message::EventAck {
            controller_id: c,
            up_to_event_id: n
        }),
        (1..=u64::MAX, any::<u64>(), any::<u64>(), payload()).prop_map(|(id, u, m, p)| {
            Message::Event(Event {
                id,
                unix_ns: u,
                mono_ns: m,
                payload: p,
            })
        }),
        (id_string(64), any::<u64>(), ".{0,40}").prop_map(|(c, n, vm)| Message::Command {
            controller_id: c,
            command_id: n,
            command: protocol::frame::HostCommand::StartDomain { vm_uuid: vm },
        }),
        (id_string(64), any::<u64>(), ".{0,40}", ".{0,200}").prop_map(|(c, n, vm, xml)| {
            Message::Command {
                controller_id: c,
                command_id: n,
                command: protocol::frame::HostCommand::StartFromDefinition { vm_uuid: vm, xml },
            }
        }),
        (id_string(64), any::<u64>(), ".{0,40}").prop_map(|(c, n, vm)| Message::Command {
            controller_id: c,
            command_id: n,
            command: protocol::frame::HostCommand::QueryDomain { vm_uuid: vm },
        }),
        (any::<u64>(), any::<bool>(), ".{0,80}").prop_map(|(n, ok, detail)| {
            Message::CommandResult {
                command_id: n,
                ok,
                detail,
            }
        }),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        id_string(64),
        id_string(253),
        boot_id(),
        any::<u64>(),
        message(),
    )
        .prop_map(
            |(cluster_id, host_id, boot_id, incarnation, message)| Envelope {
                cluster_id,
                host_id,
                boot_id,
                incarnation,
                conn: 0,
                message,
            },
        )
}

/// A mutation of a byte string: flip, overwrite, insert, remove or truncate.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip(i, mask) if len > 0 => bytes[i % len] ^= mask,
            Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_make_any_decoder_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let key = key();
        let _ = decode_heartbeat(&bytes, &key);
        let _ = decode_ack(&bytes, &key);
        let _ = decode_frame(&bytes, &key);
        let _ = decode_refusal(&bytes);
        let _ = refusal_for(&bytes, &mut Vec::new());
        let mut dec = FrameDecoder::new(key.clone(), Direction::ToController);
        dec.push(&bytes);
        let _ = dec.next_frame();
        let mut rx = HeartbeatReceiver::new(key, CLUSTER);
        prop_assert!(rx.receive(&bytes).is_err());
    }

    #[test]
    fn a_refusal_is_always_shorter_than_the_heartbeat_it_answers_and_names_its_version(
        version in any::<u8>(),
        tail in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = b"DFIB".to_vec();
        bytes.push(version);
        bytes.push(protocol::KIND_HEARTBEAT);
        bytes.extend(tail);
        let mut out = vec![0xee];
        match refusal_for(&bytes, &mut out) {
            // This build's own version is judged, not refused.
            None => prop_assert_eq!(version, protocol::HEARTBEAT_VERSION),
            Some(seen) => {
                prop_assert_eq!(seen.version, version);
                if !out.is_empty() {
                    prop_assert!(out.len() < bytes.len());
                    let r = decode_refusal(&out).unwrap();
                    prop_assert_eq!(r.refused_version, version);
                }
            }
        }
    }

    #[test]
    fn random_bytes_behind_a_valid_preamble_never_make_any_decoder_panic(
        kind in 0u8..5,
        tail in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut bytes = b"DFIB\x01".to_vec();
        bytes.push(kind);
        bytes.extend(tail);
        let key = key();
        let _ = decode_heartbeat(&bytes, &key);
        let _ = decode_ack(&bytes, &key);
        let _ = decode_frame(&bytes, &key);
        let _ = decode_refusal(&bytes);
        let mut dec = FrameDecoder::new(key, Direction::ToWatchdog);
        dec.push(&bytes);
        let _ = dec.next_frame();
    }

    #[test]
    fn a_heartbeat_survives_encoding_and_decoding_for_any_field_values(p in heartbeat_parts()) {
        let hb = heartbeat_from(&p);
        let bytes = encode_heartbeat(&hb, &key()).unwrap();
        prop_assert_eq!(decode_heartbeat(&bytes, &key()), Ok(hb));
    }

    #[test]
    fn a_mutated_heartbeat_is_never_accepted_and_never_panics(
        p in heartbeat_parts(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let hb = heartbeat_from(&p);
        let original = encode_heartbeat(&hb, &key()).unwrap();
        let mut bytes = original.clone();
        apply(&mut bytes, &mutations);
        let result = decode_heartbeat(&bytes, &key());
        if bytes != original {
            prop_assert!(result.is_err(), "mutated heartbeat accepted: {:?}", mutations);
        }
    }

    #[test]
    fn an_ack_survives_encoding_and_decoding_for_any_field_values(
        p in heartbeat_parts(),
        controller in id_string(64),
        now in any::<u64>(),
    ) {
        let hb = heartbeat_from(&p);
        let ack = Ack::answering(&hb, &controller, now);
        let bytes = encode_ack(&ack, &key()).unwrap();
        prop_assert_eq!(decode_ack(&bytes, &key()), Ok(ack));
    }

    #[test]
    fn a_mutated_ack_is_never_accepted_and_never_panics(
        p in heartbeat_parts(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let hb = heartbeat_from(&p);
        let original = encode_ack(&Ack::answering(&hb, CONTROLLER, 1), &key()).unwrap();
        let mut bytes = original.clone();
        apply(&mut bytes, &mutations);
        if bytes != original {
            prop_assert!(decode_ack(&bytes, &key()).is_err());
        }
    }

    #[test]
    fn a_frame_survives_encoding_and_decoding_for_any_envelope(env in envelope()) {
        let bytes = encode_frame(&env, &key()).unwrap();
        let (back, used) = decode_frame(&bytes, &key()).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, env);
    }

    #[test]
    fn a_mutated_frame_is_never_accepted_and_never_panics(
        env in envelope(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let original = encode_frame(&env, &key()).unwrap();
        let mut bytes = original.clone();
        apply(&mut bytes, &mutations);
        let one_shot = decode_frame(&bytes, &key());
        let direction = env.message.direction();
        let mut dec = FrameDecoder::new(key(), direction);
        dec.push(&bytes);
        let streamed = dec.next_frame();
        // Bytes appended after an intact frame are the start of the next frame on a
        // stream, so the intact frame is rightly accepted. Anything else that changed
        // the frame's own bytes must never yield an envelope (a cut-short frame is
        // incomplete, not accepted).
        let frame_intact = bytes.len() >= original.len() && bytes[..original.len()] == original[..];
        if frame_intact {
            let (back, used) = one_shot.expect("an intact frame followed by extra bytes decodes");
            prop_assert_eq!(used, original.len());
            prop_assert_eq!(back, env);
        } else {
            prop_assert!(one_shot.is_err(), "mutated frame accepted: {:?}", mutations);
            prop_assert!(!matches!(streamed, Ok(Some(_))));
        }
    }

    #[test]
    fn a_stream_split_anywhere_gives_back_the_same_frames(
        envs in proptest::collection::vec(envelope(), 1..5),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let envs: Vec<Envelope> = envs
            .into_iter()
            .filter(|e| e.message.direction() == Direction::ToController)
            .collect();
        let mut stream = Vec::new();
        for e in &envs {
            stream.extend(encode_frame(e, &key()).unwrap());
        }
        let mut cut_points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cut_points.push(0);
        cut_points.push(stream.len());
        cut_points.sort_unstable();
        let mut dec = FrameDecoder::new(key(), Direction::ToController);
        let mut out = Vec::new();
        for w in cut_points.windows(2) {
            dec.push(&stream[w[0]..w[1]]);
            while let Some(e) = dec.next_frame().unwrap() {
                out.push(e);
            }
        }
        prop_assert_eq!(out, envs);
    }
}
