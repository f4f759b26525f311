//! The controller daemon over loopback: config errors, heartbeat intake (acks, forged and
//! replayed datagrams counted and dropped), the event stream (dedup, cumulative acks).
use std::time::Duration;

use controller::config::ControllerConfig;
use protocol::{
    decode_ack, encode_frame, encode_heartbeat, BootId, Direction, Envelope, Event, EventPayload,
    FrameDecoder, Heartbeat, HostStatus, Key, Message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const KEY: &[u8] = b"daemon-test-key-0123456789abcdef";

/// Writes a secret file with mode 0600, as the controller requires of it.
fn write_secret(path: &std::path::Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_bad_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[detector]\nsuspect_after_missed = 0\n[controller]\nkey_file = \"/nonexistent\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_defib-controller"))
        .args(["--config"])
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("controller.key_file"), "{err}");

    std::fs::write(&cfg, "[controller]\nno_such_field = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_defib-controller"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_field"));
}

struct Running {
    bound: controller::runtime::Bound,
    _dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_controller() -> Running {
    let dir = tempfile::tempdir().unwrap();
    write_secret(&dir.path().join("key"), KEY);
    let text = format!(
        "[controller]\nid = \"ctl-t\"\ncluster_id = \"t\"\nkey_file = {:?}\nheartbeat_listen = [\"127.0.0.1:0\"]\nevent_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\nstore_path = {:?}\n[api]\ninsecure_no_token = true\n[intake]\nenrolled_hosts = [\"h1\", \"h2\"]\n",
        dir.path().join("key").display().to_string(),
        dir.path().join("s.sqlite").display().to_string()
    );
    let resolved = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        controller::runtime::run(
            resolved,
            async {
                let _ = stop_rx.await;
            },
            move |b| {
                let _ = ready_tx.send(b.clone());
            },
        )
        .await
    });
    let bound = ready_rx.await.expect("controller ready");
    Running {
        bound,
        _dir: dir,
        stop,
        task,
    }
}

/// The key the controller expects `host` to sign with (derived from its master key).
fn host_key(host: &str) -> Key {
    protocol::MasterKey::new(KEY).unwrap().host_key(host)
}

fn heartbeat(seq: u64, key: &Key) -> Vec<u8> {
    heartbeat_of("h1", seq, 0, key)
}

fn heartbeat_of(host: &str, seq: u64, session: u64, key: &Key) -> Vec<u8> {
    encode_heartbeat(
        &Heartbeat {
            cluster_id: "t",
            host_id: host,
            boot_id: BootId([7; 16]),
            incarnation: 5,
            sequence: seq,
            sent_unix_ns: 1,
            sent_mono_ns: seq * 100_000_000,
            path_index: 0,
            session,
            ack_period_ms: 0,
            status: HostStatus::default(),
        },
        key,
    )
    .unwrap()
}

async fn metrics(api: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(api).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_acked_and_forged_or_replayed_ones_are_counted_and_dropped() {
    let c = start_controller().await;
    let key = host_key("h1");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = c.bound.heartbeat[0];
    let mut buf = [0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];

    sock.send_to(&heartbeat(1, &key), to).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("ack")
        .unwrap();
    let ack = decode_ack(&buf[..n], &key).expect("a valid ack");
    assert_eq!(
        (ack.host_id, ack.sequence, ack.controller_id),
        ("h1", 1, "ctl-t")
    );

    // Replayed: the same sequence again. Forged: another key. Truncated: cut.
    sock.send_to(&heartbeat(1, &key), to).await.unwrap();
    let forged = heartbeat(2, &Key::new(b"another-key-0123456789abcdefghij").unwrap());
    sock.send_to(&forged, to).await.unwrap();
    sock.send_to(&heartbeat(3, &key)[..20], to).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf))
            .await
            .is_err(),
        "a refused heartbeat was acked"
    );
    let m = metrics(c.bound.api).await;
    assert!(
        m.contains("defib_heartbeats_rejected_total{reason=\"replayed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("defib_heartbeats_rejected_total{reason=\"bad_mac\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("defib_heartbeats_rejected_total{reason=\"truncated\"} 1"),
        "{m}"
    );
    let _ = c.stop.send(());
    c.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_of_the_previous_version_is_answered_with_a_refusal_and_counted_as_old_version()
{
    let c = start_controller().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = c.bound.heartbeat[0];
    let mut buf = [0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];
    // What a version 3 watchdog of h1 sends: its preamble says 3 (the rest does not
    // matter: nothing behind the version is read).
    let mut old = heartbeat(1, &host_key("h1"));
    old[4] = 3;
    for _ in 0..3 {
        sock.send_to(&old, to).await.unwrap();
    }
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("a refusal, not silence")
        .unwrap();
    assert!(n < old.len(), "smaller than what it answers");
    let refusal = protocol::decode_refusal(&buf[..n]).expect("a refusal");
    assert_eq!(refusal.refused_version, 3);
    assert_eq!(refusal.accepted_versions, [protocol::HEARTBEAT_VERSION]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf))
            .await
            .is_err(),
        "one refusal per second per source"
    );
    let m = metrics(c.bound.api).await;
    for line in [
        "defib_heartbeats_rejected_total{reason=\"old_version\"} 3",
        "defib_heartbeat_refusals_total 1",
    ] {
        assert!(m.contains(line), "{line}: {m}");
    }
    let _ = c.stop.send(());
    c.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_enrolled_hosts_speak_each_for_itself_and_only_a_heartbeat_echoing_the_session_counts()
{
    let c = start_controller().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = c.bound.heartbeat[0];
    let mut buf = [0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];
    // Not enrolled; and h2 speaking for h1 with its own key.
    sock.send_to(&heartbeat_of("h9", 1, 0, &host_key("h9")), to)
        .await
        .unwrap();
    sock.send_to(&heartbeat_of("h1", 1, 0, &host_key("h2")), to)
        .await
        .unwrap();
    // The master key is nobody's host key.
    sock.send_to(&heartbeat_of("h1", 2, 0, &Key::new(KEY).unwrap()), to)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf))
            .await
            .is_err(),
        "a refused heartbeat was acked"
    );

    // h1 before it knows the session: acked, not counting, carrying the session.
    let k1 = host_key("h1");
    sock.send_to(&heartbeat_of("h1", 3, 0, &k1), to)
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("ack")
        .unwrap();
    let ack = decode_ack(&buf[..n], &k1).unwrap();
    assert!(!ack.counts, "an unproven heartbeat's ack must not count");
    let session = ack.session;
    assert_ne!(session, 0);
    // Acks are paced (protocol::ack, "Pacing"): the counting ack comes at once, but never
    // within the floor of the last ack on the path, as no real watchdog sends faster.
    tokio::time::sleep(Duration::from_millis(
        u64::from(protocol::ACK_PERIOD_FLOOR_MS) * 2,
    ))
    .await;
    sock.send_to(&heartbeat_of("h1", 4, session, &k1), to)
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("ack")
        .unwrap();
    let ack = decode_ack(&buf[..n], &k1).unwrap();
    assert!(ack.counts && ack.session == session);

    let m = metrics(c.bound.api).await;
    for line in [
        "defib_heartbeats_rejected_total{reason=\"unknown_host\"} 1",
        "defib_heartbeats_rejected_total{reason=\"bad_mac\"} 2",
        "defib_heartbeats_rejected_total{reason=\"unproven_session\"} 1",
        "defib_heartbeats_accepted_total 1",
    ] {
        assert!(m.contains(line), "{line}\n{m}");
    }
    let _ = c.stop.send(());
    c.task.await.unwrap().unwrap();
}

fn envelope(conn: u64, message: Message) -> Envelope {
    Envelope {
        cluster_id: "t".into(),
        host_id: "h1".into(),
        boot_id: BootId([7; 16]),
        incarnation: 5,
        conn,
        message,
    }
}

async fn next(s: &mut TcpStream, dec: &mut FrameDecoder, buf: &mut [u8]) -> Envelope {
    loop {
        if let Some(e) = dec.next_frame().unwrap() {
            return e;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "controller closed the stream");
        dec.push(&buf[..n]);
    }
}

/// Opens an event stream as h1's watchdog does: Hello with a nonce, the controller's
/// challenge, Hello again carrying it; returns the stream, its decoder, the challenge
/// and the Welcome's high-water mark, and the frames sent (for replays).
async fn open_stream(
    addr: std::net::SocketAddr,
    key: &Key,
    last_event_id: u64,
) -> (TcpStream, FrameDecoder, u64, u64, Vec<Vec<u8>>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut dec = FrameDecoder::new(key.clone(), Direction::ToWatchdog);
    let mut buf = vec![0u8; 4096];
    let nonce = protocol::fresh_nonce();
    let hello = Message::Hello {
        last_event_id,
        nonce,
    };
    let first = encode_frame(&envelope(0, hello.clone()), key).unwrap();
    s.write_all(&first).await.unwrap();
    let challenge = match next(&mut s, &mut dec, &mut buf).await {
        Envelope {
            conn,
            message: Message::Challenge { nonce: c },
            ..
        } if conn == nonce => c,
        other => panic!("expected a challenge bound to our nonce, got {other:?}"),
    };
    let second = encode_frame(&envelope(challenge, hello), key).unwrap();
    s.write_all(&second).await.unwrap();
    let highest = match next(&mut s, &mut dec, &mut buf).await {
        Envelope {
            conn,
            message: Message::Welcome {
                highest_event_id, ..
            },
            ..
        } if conn == nonce => highest_event_id,
        other => panic!("expected Welcome, got {other:?}"),
    };
    (s, dec, challenge, highest, vec![first, second])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_recorded_on_one_connection_and_replayed_on_another_is_refused() {
    let c = start_controller().await;
    let key = host_key("h1");
    let (_s, _dec, _challenge, _, recorded) = open_stream(c.bound.events, &key, 0).await;
    // The attacker replays both frames on a new connection: the first gets a fresh
    // challenge, the second answers the old one.
    let mut r = TcpStream::connect(c.bound.events).await.unwrap();
    for frame in &recorded {
        r.write_all(frame).await.unwrap();
    }
    let mut dec = FrameDecoder::new(key.clone(), Direction::ToWatchdog);
    let mut buf = vec![0u8; 4096];
    let first = next(&mut r, &mut dec, &mut buf).await;
    assert!(matches!(first.message, Message::Challenge { .. }));
    // Then the controller closes the stream without a Welcome.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut rest))
        .await
        .expect("closed")
        .unwrap_or(0);
    dec.push(&rest[..n]);
    assert!(
        dec.next_frame().unwrap().is_none(),
        "no Welcome after a replayed Hello"
    );
    let m = metrics(c.bound.api).await;
    assert!(
        m.contains("defib_frames_rejected_total{reason=\"wrong_connection\"} 1"),
        "{m}"
    );
    let _ = c.stop.send(());
    c.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_once_and_acked_cumulatively_even_when_sent_twice() {
    let c = start_controller().await;
    let key = host_key("h1");
    let (mut s, mut dec, challenge, highest, _) = open_stream(c.bound.events, &key, 2).await;
    assert_eq!(highest, 0);
    let mut buf = vec![0u8; 4096];
    let env = |message| envelope(challenge, message);
    let event = |id| {
        env(Message::Event(Event {
            id,
            unix_ns: 1_000_000_000,
            mono_ns: 1,
            payload: EventPayload::QemuStarted {
                vm_uuid: Some(format!("vm-{id}")),
                vm_name: None,
                pid: 100 + id as u32,
            },
        }))
    };
    for id in [1, 2, 2, 1] {
        s.write_all(&encode_frame(&event(id), &key).unwrap())
            .await
            .unwrap();
    }
    let mut acks = Vec::new();
    for _ in 0..4 {
        match next(&mut s, &mut dec, &mut buf).await.message {
            Message::EventAck { up_to_event_id, .. } => acks.push(up_to_event_id),
            other => panic!("expected EventAck, got {other:?}"),
        }
    }
    assert_eq!(acks, vec![1, 2, 2, 2]);
    let m = metrics(c.bound.api).await;
    assert!(m.contains("defib_events_received_total 2"), "{m}");
    assert!(m.contains("defib_events_duplicate_total 2"), "{m}");

    // A new stream (e.g. a restarted watchdog) is told the high-water mark.
    let (_s2, _dec2, _, highest, _) = open_stream(c.bound.events, &key, 0).await;
    assert_eq!(highest, 2);
    let _ = c.stop.send(());
    c.task.await.unwrap().unwrap();
}

/// One request to the API (plain HTTP, no token: the test controller runs without).
async fn http(api: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(api).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_enrolled_through_the_api_is_heard_with_the_key_it_was_given_until_it_is_revoked() {
    let c = start_controller().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = c.bound.heartbeat[0];
    let mut buf = [0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];
    let acked = async |sock: &UdpSocket, buf: &mut [u8]| {
        tokio::time::timeout(Duration::from_millis(500), sock.recv(buf))
            .await
            .is_ok()
    };
    let derived = host_key("h5");
    sock.send_to(&heartbeat_of("h5", 1, 0, &derived), to)
        .await
        .unwrap();
    assert!(!acked(&sock, &mut buf).await, "h5 is not enrolled yet");

    let (status, body) = http(c.bound.api, "POST", "/v1/hosts/h5/enrollment").await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let key_text = answer["key"].as_str().expect("the host's key");
    let given = Key::new(key_text.as_bytes()).unwrap();
    sock.send_to(&heartbeat_of("h5", 2, 0, &given), to)
        .await
        .unwrap();
    assert!(
        acked(&sock, &mut buf).await,
        "enrolled: heard with the key it was given"
    );
    // The key given is the one derived from the master key. (Past the ack floor: this
    // heartbeat asks for an ack every time, and the floor is all that paces it.)
    tokio::time::sleep(Duration::from_millis(
        u64::from(protocol::ACK_PERIOD_FLOOR_MS) * 2,
    ))
    .await;
    sock.send_to(&heartbeat_of("h5", 3, 0, &derived), to)
        .await
        .unwrap();
    assert!(acked(&sock, &mut buf).await);

    // A host enrolled by the configuration cannot be revoked through the API.
    let (status, body) = http(c.bound.api, "DELETE", "/v1/hosts/h1/enrollment").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("intake.enrolled_hosts"), "{body}");

    let (status, body) = http(c.bound.api, "DELETE", "/v1/hosts/h5/enrollment").await;
    assert_eq!(status, 200, "{body}");
    sock.send_to(&heartbeat_of("h5", 4, 0, &given), to)
        .await
        .unwrap();
    assert!(!acked(&sock, &mut buf).await, "revoked: refused");
    let m = metrics(c.bound.api).await;
    assert!(
        m.contains("defib_heartbeats_rejected_total{reason=\"unknown_host\"} 2"),
        "{m}"
    );
    let _ = c.stop.send(());
    c.task.await.unwrap().unwrap();
}
