//! The uplink against an in-process fake controller speaking the wire protocol over
//! 127.0.0.1 (UDP heartbeats and acks, TCP event stream). No root, no BPF: the uplink
//! does not depend on the probes.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::{
    encode_ack, encode_frame, Ack, BootId, Direction, Envelope, Event, EventDedup, EventPayload,
    EventVerdict, FrameDecoder, HeartbeatReceiver, HostStatus, Key, Message,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UdpSocket};
use tokio::time::Instant;
use watchdog::uplink::{
    HostSummary, PendingEvent, Reachability, Spool, StreamStatus, TokioClock, Uplink, UplinkConfig,
};

const CLUSTER: &str = "test-cluster";
const HOST: &str = "compute-test";
const BOOT: &str = "0f5a3c7e-1b2d-4e6f-8a9b-0c1d2e3f4a5b";

fn key() -> Key {
    Key::new(b"the test cluster key, 32 bytes!!").unwrap()
}

fn boot_id() -> BootId {
    BOOT.parse().unwrap()
}

/// What the fake controller saw of one heartbeat.
#[derive(Debug, Clone)]
struct SeenHeartbeat {
    socket_index: usize,
    path_index: u8,
    sequence: u64,
    incarnation: u64,
    boot_id: BootId,
    status: HostStatus,
}

#[derive(Default)]
struct Seen {
    heartbeats: Vec<SeenHeartbeat>,
    heartbeat_rejects: u64,
    /// `(incarnation, last_event_id)` of every Hello.
    hellos: Vec<(u64, u64)>,
    /// Every event frame received, duplicates included: `(incarnation, id)`.
    received: Vec<(u64, u64)>,
    /// Events stored (deduplicated), in arrival order.
    stored: Vec<Event>,
    dedup: EventDedup,
}

/// A controller good enough to talk to: answers heartbeats with acks (signed with
/// `ack_key`) while `ack_heartbeats` is set, and on the stream answers Hello with the
/// highest stored id, stores new events and acks them while `store_events` is set
/// (otherwise it reads them and says nothing, like a controller that dies before
/// storing).
struct FakeController {
    heartbeat_addrs: Vec<SocketAddr>,
    seen: Arc<Mutex<Seen>>,
    ack_heartbeats: Arc<AtomicBool>,
    store_events: Arc<AtomicBool>,
}

impl FakeController {
    async fn start(paths: usize, ack_key: Key) -> FakeController {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let ack_heartbeats = Arc::new(AtomicBool::new(true));
        let store_events = Arc::new(AtomicBool::new(true));
        let receiver = Arc::new(Mutex::new(HeartbeatReceiver::new(key(), CLUSTER)));
        let mut heartbeat_addrs = Vec::new();
        for socket_index in 0..paths {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            heartbeat_addrs.push(socket.local_addr().unwrap());
            let (seen, receiver, acking, ack_key) = (
                seen.clone(),
                receiver.clone(),
                ack_heartbeats.clone(),
                ack_key.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];
                loop {
                    let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                    let ack = {
                        let mut receiver = receiver.lock().unwrap();
                        let mut seen = seen.lock().unwrap();
                        match receiver.receive(&buf[..n]) {
                            Ok(accepted) => {
                                let hb = accepted.heartbeat;
                                seen.heartbeats.push(SeenHeartbeat {
                                    socket_index,
                                    path_index: hb.path_index,
                                    sequence: hb.sequence,
                                    incarnation: hb.incarnation,
                                    boot_id: hb.boot_id,
                                    status: hb.status,
                                });
                                acking.load(Ordering::SeqCst).then(|| {
                                    encode_ack(&Ack::answering(&hb, "fake-ctl", 1), &ack_key)
                                        .unwrap()
                                })
                            }
                            Err(_) => {
                                seen.heartbeat_rejects += 1;
                                None
                            }
                        }
                    };
                    if let Some(ack) = ack {
                        let _ = socket.send_to(&ack, from).await;
                    }
                }
            });
        }
        FakeController {
            heartbeat_addrs,
            seen,
            ack_heartbeats,
            store_events,
        }
    }

    /// Starts serving the event stream on `addr`.
    async fn serve_events(&self, addr: SocketAddr) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let (seen, storing) = (self.seen.clone(), self.store_events.clone());
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                tokio::spawn(serve_connection(conn, seen.clone(), storing.clone()));
            }
        });
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    fn stored_ids(&self) -> Vec<u64> {
        self.seen().stored.iter().map(|e| e.id).collect()
    }
}

async fn serve_connection(
    mut conn: tokio::net::TcpStream,
    seen: Arc<Mutex<Seen>>,
    storing: Arc<AtomicBool>,
) {
    let mut decoder = FrameDecoder::new(key(), Direction::ToController);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buf[..n]);
        while let Some(envelope) = decoder.next_frame().unwrap() {
            let reply = {
                let mut seen = seen.lock().unwrap();
                match &envelope.message {
                    Message::Hello { last_event_id } => {
                        seen.hellos.push((envelope.incarnation, *last_event_id));
                        Some(Message::Welcome {
                            controller_id: "fake-ctl".into(),
                            highest_event_id: seen.dedup.highest(&envelope.host_id),
                        })
                    }
                    Message::Event(event) => {
                        seen.received.push((envelope.incarnation, event.id));
                        if storing.load(Ordering::SeqCst) {
                            if let EventVerdict::New { .. } =
                                seen.dedup.check(&envelope.host_id, event.id)
                            {
                                seen.dedup.commit(&envelope.host_id, event.id);
                                seen.stored.push(event.clone());
                            }
                            Some(Message::EventAck {
                                controller_id: "fake-ctl".into(),
                                up_to_event_id: seen.dedup.highest(&envelope.host_id),
                            })
                        } else {
                            None
                        }
                    }
                    other => panic!("unexpected frame to the controller: {other:?}"),
                }
            };
            if let Some(message) = reply {
                let frame = encode_frame(
                    &Envelope {
                        message,
                        ..envelope.clone()
                    },
                    &key(),
                )
                .unwrap();
                if conn.write_all(&frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn uplink_config(
    state_dir: &Path,
    heartbeat_addrs: Vec<SocketAddr>,
    event_addr: SocketAddr,
) -> UplinkConfig {
    UplinkConfig {
        cluster_id: CLUSTER.into(),
        host_id: HOST.into(),
        state_dir: state_dir.to_path_buf(),
        heartbeat_addrs,
        event_addr,
        heartbeat_interval: Duration::from_millis(20),
        isolation_timeout: Duration::from_millis(300),
        spool_max_events: 1000,
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
    }
}

fn start_uplink(cfg: UplinkConfig) -> Uplink {
    Uplink::start_with(cfg, key(), boot_id(), Arc::new(TokioClock::new())).unwrap()
}

/// A local port with nothing listening on it (bound, then released).
fn free_port_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn started(pid: u32) -> PendingEvent {
    PendingEvent {
        unix_ns: 1_790_000_000_000_000_000 + u64::from(pid),
        mono_ns: 9_000_000_000 + u64::from(pid),
        payload: EventPayload::QemuStarted {
            vm_uuid: Some(format!("vm-{pid}")),
            vm_name: None,
            pid,
        },
    }
}

/// Polls `condition` until it holds, failing after 10 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_stream(
    uplink: &Uplink,
    what: &str,
    condition: impl FnMut(&StreamStatus) -> bool,
) {
    let mut status = uplink.stream_status();
    tokio::time::timeout(Duration::from_secs(10), status.wait_for(condition))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

async fn wait_for_state(uplink: &Uplink, state: Reachability) {
    let mut reachability = uplink.reachability();
    tokio::time::timeout(
        Duration::from_secs(10),
        reachability.wait_for(|r| r.state == state),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {state:?}"))
    .unwrap();
}

#[tokio::test]
async fn heartbeats_arrive_on_every_path_with_one_rising_sequence_a_valid_mac_and_the_status() {
    let controller = FakeController::start(2, key()).await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        controller.heartbeat_addrs.clone(),
        free_port_addr(),
    ));
    uplink.status().send_modify(|s| {
        *s = HostSummary {
            vm_count: 3,
            stalled_vm_count: 1,
            libvirt_reachable: false,
            self_fence: protocol::SelfFence::Armed { timeout_ms: 2500 },
            probe_drops: 7,
        }
    });
    eventually("ten heartbeats on each path", || {
        let seen = controller.seen();
        (0..2).all(|p| {
            seen.heartbeats
                .iter()
                .filter(|h| h.socket_index == p)
                .count()
                >= 10
        })
    })
    .await;
    let incarnation = uplink.identity().incarnation;
    uplink.shutdown().await;

    let seen = controller.seen();
    assert_eq!(
        seen.heartbeat_rejects, 0,
        "every heartbeat passes the MAC and replay checks"
    );
    let mut sequences: Vec<u64> = seen.heartbeats.iter().map(|h| h.sequence).collect();
    for path in 0..2 {
        let on_path: Vec<_> = seen
            .heartbeats
            .iter()
            .filter(|h| h.socket_index == path)
            .collect();
        assert!(on_path.iter().all(|h| usize::from(h.path_index) == path));
        assert!(
            on_path.windows(2).all(|w| w[0].sequence < w[1].sequence),
            "sequence rises on path {path}"
        );
    }
    let count = sequences.len();
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(
        sequences.len(),
        count,
        "no sequence number is used twice across paths"
    );
    assert!(seen
        .heartbeats
        .iter()
        .all(|h| h.incarnation == incarnation && h.boot_id == boot_id()));
    let last = seen.heartbeats.last().unwrap().status;
    assert_eq!(
        (
            last.vm_count,
            last.stalled_vm_count,
            last.probe_drops,
            last.libvirt_reachable,
            last.self_fence
        ),
        (
            3,
            1,
            7,
            false,
            protocol::SelfFence::Armed { timeout_ms: 2500 }
        )
    );
}

#[tokio::test]
async fn acks_make_the_watchdog_reachable_and_their_absence_isolates_it_after_the_timeout() {
    let controller = FakeController::start(2, key()).await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        controller.heartbeat_addrs.clone(),
        free_port_addr(),
    ));
    wait_for_state(&uplink, Reachability::Reachable).await;
    eventually("acks on both paths", || {
        let r = uplink.reachability();
        let r = r.borrow();
        r.last_acked_send_mono_ns_by_path
            .iter()
            .all(Option::is_some)
    })
    .await;

    controller.ack_heartbeats.store(false, Ordering::SeqCst);
    let acks_stopped = Instant::now();
    wait_for_state(&uplink, Reachability::Isolated).await;
    let took = acks_stopped.elapsed();
    // The timeout runs from the last acked heartbeat's send time, a beat or so before
    // the acks stopped.
    assert!(
        took >= Duration::from_millis(200),
        "isolated after only {took:?}"
    );
    let isolated_at = controller.seen().heartbeats.len();
    eventually("a heartbeat that says isolated", || {
        controller.seen().heartbeats[isolated_at..]
            .iter()
            .any(|h| h.status.isolated)
    })
    .await;

    controller.ack_heartbeats.store(true, Ordering::SeqCst);
    wait_for_state(&uplink, Reachability::Reachable).await;
    uplink.shutdown().await;
}

#[tokio::test]
async fn an_ack_signed_with_another_key_is_ignored() {
    let forger = Key::new(b"not the cluster key, but 32 byte").unwrap();
    let controller = FakeController::start(1, forger).await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        controller.heartbeat_addrs.clone(),
        free_port_addr(),
    ));
    eventually("heartbeats answered by forged acks", || {
        controller.seen().heartbeats.len() >= 5
    })
    .await;
    assert_ne!(
        uplink.reachability().borrow().state,
        Reachability::Reachable
    );
    wait_for_state(&uplink, Reachability::Isolated).await;
    assert_eq!(uplink.reachability().borrow().last_acked_send_mono_ns, None);
    uplink.shutdown().await;
}

#[tokio::test]
async fn events_sent_while_the_controller_is_down_are_spooled_on_disk_and_delivered_once_it_is_up()
{
    let controller = FakeController::start(1, key()).await;
    let event_addr = free_port_addr();
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        controller.heartbeat_addrs.clone(),
        event_addr,
    ));
    let events = uplink.event_sender();
    for pid in 1..=3 {
        assert!(events.send(started(pid)));
    }
    wait_for_stream(&uplink, "three spooled events", |s| s.spooled == 3).await;
    assert!(!uplink.stream_status().borrow().connected);
    // They are on disk: a copy of the state directory holds them.
    let copy = tempfile::tempdir().unwrap();
    let name = watchdog::uplink::spool::SPOOL_FILE;
    std::fs::copy(dir.path().join(name), copy.path().join(name)).unwrap();
    let on_disk: Vec<u64> = Spool::open(copy.path(), 10)
        .unwrap()
        .pending()
        .map(|e| e.id)
        .collect();
    assert_eq!(on_disk, [1, 2, 3]);

    controller.serve_events(event_addr).await;
    wait_for_stream(&uplink, "everything acked", |s| {
        s.connected && s.spooled == 0
    })
    .await;
    assert!(events.send(started(4)));
    wait_for_stream(&uplink, "the live event acked", |s| s.released_up_to == 4).await;
    uplink.shutdown().await;

    assert_eq!(controller.stored_ids(), [1, 2, 3, 4]);
    let seen = controller.seen();
    let pids: Vec<_> = seen
        .stored
        .iter()
        .map(|e| match &e.payload {
            EventPayload::QemuStarted { pid, .. } => *pid,
            other => panic!("unexpected payload {other:?}"),
        })
        .collect();
    assert_eq!(pids, [1, 2, 3, 4]);
    assert_eq!(seen.stored[0].unix_ns, started(1).unix_ns);
    assert_eq!(seen.stored[0].mono_ns, started(1).mono_ns);
    let received: Vec<u64> = seen.received.iter().map(|&(_, id)| id).collect();
    assert_eq!(
        received,
        [1, 2, 3, 4],
        "each event crossed the wire exactly once"
    );
}

#[tokio::test]
async fn a_restarted_uplink_resumes_the_ids_and_resends_what_was_never_acked() {
    let controller = FakeController::start(1, key()).await;
    let event_addr = free_port_addr();
    controller.serve_events(event_addr).await;
    // The controller reads the events but dies before storing them: no acks.
    controller.store_events.store(false, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let cfg = uplink_config(dir.path(), controller.heartbeat_addrs.clone(), event_addr);

    let first = start_uplink(cfg.clone());
    let first_incarnation = first.identity().incarnation;
    wait_for_stream(&first, "a connection", |s| s.connected).await;
    for pid in 1..=3 {
        first.event_sender().send(started(pid));
    }
    eventually("three events on the wire", || {
        controller.seen().received.len() == 3
    })
    .await;
    let status = first.shutdown().await;
    assert_eq!((status.spooled, status.last_event_id), (3, 3));

    controller.store_events.store(true, Ordering::SeqCst);
    let second = start_uplink(cfg);
    let second_incarnation = second.identity().incarnation;
    assert!(second_incarnation > first_incarnation);
    wait_for_stream(&second, "a connection", |s| s.connected).await;
    second.event_sender().send(started(4));
    wait_for_stream(&second, "all four acked", |s| {
        s.released_up_to == 4 && s.spooled == 0
    })
    .await;
    second.shutdown().await;

    assert_eq!(controller.stored_ids(), [1, 2, 3, 4]);
    let seen = controller.seen();
    assert_eq!(
        seen.hellos,
        [(first_incarnation, 0), (second_incarnation, 3)]
    );
    let resent: Vec<u64> = seen
        .received
        .iter()
        .filter(|&&(inc, _)| inc == second_incarnation)
        .map(|&(_, id)| id)
        .collect();
    assert_eq!(resent, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_full_spool_drops_the_oldest_events_counts_them_and_delivers_the_rest() {
    let controller = FakeController::start(1, key()).await;
    let event_addr = free_port_addr();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = uplink_config(dir.path(), controller.heartbeat_addrs.clone(), event_addr);
    cfg.spool_max_events = 3;
    let uplink = start_uplink(cfg);
    for pid in 1..=5 {
        uplink.event_sender().send(started(pid));
    }
    wait_for_stream(&uplink, "five events taken", |s| s.last_event_id == 5).await;
    let status = uplink.stream_status().borrow().clone();
    assert_eq!((status.spooled, status.dropped), (3, 2));

    controller.serve_events(event_addr).await;
    wait_for_stream(&uplink, "the rest acked", |s| {
        s.spooled == 0 && s.released_up_to == 5
    })
    .await;
    uplink.shutdown().await;
    assert_eq!(controller.stored_ids(), [3, 4, 5]);
}

#[tokio::test]
async fn events_queued_just_before_shutdown_are_in_the_spool_afterwards() {
    let controller = FakeController::start(1, key()).await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        controller.heartbeat_addrs.clone(),
        free_port_addr(),
    ));
    let events = uplink.event_sender();
    for pid in 1..=2 {
        events.send(started(pid));
    }
    let status = uplink.shutdown().await;
    assert_eq!(status.spooled, 2);
    let ids: Vec<u64> = Spool::open(dir.path(), 10)
        .unwrap()
        .pending()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn without_any_ack_the_watchdog_is_isolated_exactly_when_the_isolation_timeout_runs_out() {
    // Nobody answers: the heartbeats go to a socket that is never read.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = uplink_config(
        dir.path(),
        vec![silent.local_addr().unwrap()],
        free_port_addr(),
    );
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.isolation_timeout = Duration::from_millis(3000);
    let started_at = Instant::now();
    let uplink = start_uplink(cfg);
    assert_eq!(
        uplink.reachability().borrow().state,
        Reachability::Unconfirmed
    );
    tokio::time::sleep(Duration::from_millis(2990)).await;
    assert_eq!(
        uplink.reachability().borrow().state,
        Reachability::Unconfirmed
    );
    wait_for_state(&uplink, Reachability::Isolated).await;
    let took = started_at.elapsed();
    assert!(
        took >= Duration::from_millis(3000) && took <= Duration::from_millis(3002),
        "isolated after {took:?}"
    );
    uplink.shutdown().await;
}
