//! The committed seed corpus of protocol/fuzz is what the encoders write: each seed is
//! checked here, and `DEFIB_WRITE_FUZZ_SEEDS=1 cargo test -p defib-protocol --test
//! fuzz_seeds` rewrites them after a wire format change.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use protocol::frame::HostCommand;
use protocol::{
    encode_ack, encode_frame, encode_heartbeat, Ack, Envelope, Event, EventPayload, Key, Message,
};

/// The key the fuzz targets sign with (protocol/fuzz/fuzz_targets/common.rs).
fn fuzz_key() -> Key {
    Key::new(b"defib fuzzing key, 32 bytes long").unwrap()
}

/// A seed in the targets' input format: mode byte 0 ("take the rest as it is"), then
/// the datagram or frame.
fn raw(bytes: Vec<u8>) -> Vec<u8> {
    let mut seed = vec![0];
    seed.extend(bytes);
    seed
}

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

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let key = fuzz_key();
    let hb = heartbeat(3, 41);
    let mut seeds = vec![
        (
            "heartbeat",
            "first",
            raw(encode_heartbeat(&heartbeat(1, 1), &key).unwrap()),
        ),
        (
            "heartbeat",
            "later",
            raw(encode_heartbeat(&hb, &key).unwrap()),
        ),
        (
            "ack",
            "answering",
            raw(encode_ack(
                &Ack::answering(&hb, CONTROLLER, 1_790_000_000_001_000_000),
                &key,
            )
            .unwrap()),
        ),
    ];
    // The frame target reads a split byte after the mode byte.
    let frames = [
        (
            "hello",
            Message::Hello {
                last_event_id: 12,
                nonce: 0,
            },
        ),
        (
            "event",
            Message::Event(Event {
                id: 13,
                unix_ns: 1_790_000_000_000_000_013,
                mono_ns: 9_000_000_013,
                payload: EventPayload::QemuStarted {
                    vm_uuid: Some("5b3a2f7e-1c2d-4e6f-8a9b-0c1d2e3f4a5b".into()),
                    vm_name: Some("instance-0000002a".into()),
                    pid: 4242,
                },
            }),
        ),
        (
            "event_ack",
            Message::EventAck {
                controller_id: CONTROLLER.into(),
                up_to_event_id: 13,
            },
        ),
        (
            "query_domain",
            Message::Command {
                controller_id: CONTROLLER.into(),
                command_id: 14,
                command: HostCommand::QueryDomain {
                    vm_uuid: "5b3a2f7e-1c2d-4e6f-8a9b-0c1d2e3f4a5b".into(),
                },
            },
        ),
    ];
    for (name, message) in frames {
        let mut seed = vec![0, 20];
        seed.extend(encode_frame(&envelope(message), &key).unwrap());
        seeds.push(("frame", name, seed));
    }
    seeds
}

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn the_committed_fuzz_seeds_are_what_the_encoders_write() {
    let write = std::env::var_os("DEFIB_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        let path = corpus(target).join(format!("{name}.bin"));
        if write {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (DEFIB_WRITE_FUZZ_SEEDS=1 writes it)",
                path.display()
            )
        });
        assert_eq!(committed, bytes, "{} is stale", path.display());
    }
}
