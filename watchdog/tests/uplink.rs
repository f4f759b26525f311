//! The uplink against an in-process fake controller speaking the wire protocol over
//! 127.0.0.1 (UDP heartbeats and acks, TCP event stream). No root, no BPF: the uplink
//! does not depend on the probes.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::{
    encode_ack, encode_frame, Ack, BootId, Direction, Envelope, Event, EventDedup, EventPayload,
    EventVerdict, FrameDecoder, HeartbeatReceiver, HostStatus, Key, Message, Refusal,
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
    /// When each Hello arrived (refused ones included).
    hello_times: Vec<Instant>,
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
/// storing). While `leading` is cleared it is a follower of several controllers: it
/// reads the Hello and closes the stream without a Welcome (redirect by refusal).
/// `drop_streams` closes every stream it holds, as a controller that restarts or loses
/// its leadership does.
struct FakeController {
    heartbeat_addrs: Vec<SocketAddr>,
    seen: Arc<Mutex<Seen>>,
    ack_heartbeats: Arc<AtomicBool>,
    /// Answer every heartbeat with a refusal (as a controller of another release does)
    /// instead of judging it.
    refuse_heartbeats: Arc<AtomicBool>,
    /// Acks sent: at most one per path and ack period, as a real controller paces them.
    acks_sent: Arc<AtomicU64>,
    store_events: Arc<AtomicBool>,
    leading: Arc<AtomicBool>,
    drop_streams: tokio::sync::watch::Sender<u64>,
}

impl FakeController {
    async fn start(paths: usize, ack_key: Key) -> FakeController {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let ack_heartbeats = Arc::new(AtomicBool::new(true));
        let refuse_heartbeats = Arc::new(AtomicBool::new(false));
        let acks_sent = Arc::new(AtomicU64::new(0));
        let store_events = Arc::new(AtomicBool::new(true));
        let receiver = Arc::new(Mutex::new(HeartbeatReceiver::new(key(), CLUSTER)));
        let started = Instant::now();
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
            let (refusing, acks_sent) = (refuse_heartbeats.clone(), acks_sent.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];
                loop {
                    let (n, from) = socket.recv_from(&mut buf).await.unwrap();
                    if refusing.load(Ordering::SeqCst) {
                        let mut refusal = Vec::new();
                        Refusal {
                            refused_kind: protocol::KIND_HEARTBEAT,
                            refused_version: buf[4],
                            accepted_versions: &[protocol::HEARTBEAT_VERSION + 1],
                        }
                        .encode_into(&mut refusal);
                        let _ = socket.send_to(&refusal, from).await;
                        continue;
                    }
                    let ack = {
                        let mut receiver = receiver.lock().unwrap();
                        let mut seen = seen.lock().unwrap();
                        let now_ms = started.elapsed().as_millis() as u64;
                        match receiver.receive_paced(&buf[..n], now_ms, true) {
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
                                (accepted.ack_due && acking.load(Ordering::SeqCst)).then(|| {
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
                        acks_sent.fetch_add(1, Ordering::SeqCst);
                        let _ = socket.send_to(&ack, from).await;
                    }
                }
            });
        }
        FakeController {
            heartbeat_addrs,
            seen,
            ack_heartbeats,
            refuse_heartbeats,
            acks_sent,
            store_events,
            leading: Arc::new(AtomicBool::new(true)),
            drop_streams: tokio::sync::watch::channel(0).0,
        }
    }

    /// A fake controller that does not lead (yet): it refuses the event stream and
    /// does not ack heartbeats.
    async fn follower() -> FakeController {
        let controller = FakeController::start(1, key()).await;
        controller.set_leading(false);
        controller
    }

    /// Leads (Welcome, acks) or follows (refuses the stream, no heartbeat acks).
    fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
        self.ack_heartbeats.store(leading, Ordering::SeqCst);
    }

    /// Closes every event stream this controller holds.
    fn drop_streams(&self) {
        self.drop_streams.send_modify(|n| *n += 1);
    }

    /// Starts serving the event stream on `addr`.
    async fn serve_events(&self, addr: SocketAddr) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let (seen, storing, leading) = (
            self.seen.clone(),
            self.store_events.clone(),
            self.leading.clone(),
        );
        let dropping = self.drop_streams.subscribe();
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let mut dropping = dropping.clone();
                dropping.mark_unchanged();
                let serve = serve_connection(conn, seen.clone(), storing.clone(), leading.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve => {}
                        _ = dropping.changed() => {}
                    }
                });
            }
        });
    }

    /// Serves the event stream on a port of its own, and returns it.
    async fn serve_events_anywhere(&self) -> SocketAddr {
        let addr = free_port_addr();
        self.serve_events(addr).await;
        addr
    }

    fn hello_times(&self) -> Vec<Instant> {
        self.seen().hello_times.clone()
    }

    fn received_ids(&self) -> Vec<u64> {
        self.seen().received.iter().map(|&(_, id)| id).collect()
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
    leading: Arc<AtomicBool>,
) {
    let mut decoder = FrameDecoder::new(key(), Direction::ToController);
    let mut buf = vec![0u8; 64 * 1024];
    // The handshake, as the real controller does it: the first Hello brings the
    // watchdog's nonce and gets a challenge; the second carries the challenge.
    const CHALLENGE: u64 = 0xc4a1;
    let mut wd_nonce = 0u64;
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
                    Message::Hello { nonce, .. } if envelope.conn == 0 => {
                        wd_nonce = *nonce;
                        Some(Message::Challenge { nonce: CHALLENGE })
                    }
                    _ if envelope.conn != CHALLENGE => {
                        panic!("a frame not bound to the connection: {envelope:?}")
                    }
                    Message::Hello { last_event_id, .. } => {
                        seen.hellos.push((envelope.incarnation, *last_event_id));
                        seen.hello_times.push(Instant::now());
                        if !leading.load(Ordering::SeqCst) {
                            // A follower: no Welcome, the connection closes.
                            return;
                        }
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
                        conn: wd_nonce,
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
    uplink_config_for_all(state_dir, heartbeat_addrs, vec![event_addr])
}

/// With several controllers' event addresses.
fn uplink_config_for_all(
    state_dir: &Path,
    heartbeat_addrs: Vec<SocketAddr>,
    event_addrs: Vec<SocketAddr>,
) -> UplinkConfig {
    UplinkConfig {
        cluster_id: CLUSTER.into(),
        host_id: HOST.into(),
        state_dir: state_dir.to_path_buf(),
        heartbeat_addrs,
        event_addrs,
        heartbeat_interval: Duration::from_millis(20),
        tls: None,
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
async fn with_acks_paced_by_the_controller_the_watchdog_stays_reachable_through_many_timeouts() {
    let controller = FakeController::start(2, key()).await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        controller.heartbeat_addrs.clone(),
        free_port_addr(),
    ));
    wait_for_state(&uplink, Reachability::Reachable).await;
    let (heartbeats0, acks0) = (
        controller.seen().heartbeats.len(),
        controller.acks_sent.load(Ordering::SeqCst),
    );
    // Five isolation timeouts (300 ms) of heartbeats every 20 ms, asking for an ack every
    // 37 ms (an eighth of the timeout): acked about every other heartbeat on each path.
    let mut states = uplink.reachability();
    let stayed = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            states.changed().await.unwrap();
            if states.borrow().state != Reachability::Reachable {
                return states.borrow().state;
            }
        }
    })
    .await;
    assert!(stayed.is_err(), "left reachable: {stayed:?}");
    let heartbeats = (controller.seen().heartbeats.len() - heartbeats0) as u64;
    let acks = controller.acks_sent.load(Ordering::SeqCst) - acks0;
    assert!(
        acks > 0 && acks * 10 < heartbeats * 8,
        "{acks} acks for {heartbeats} heartbeats: not paced"
    );
    uplink.shutdown().await;
}

#[tokio::test]
async fn a_controller_that_refuses_this_heartbeat_version_leaves_the_watchdog_unreached() {
    let controller = FakeController::start(1, key()).await;
    controller.refuse_heartbeats.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        controller.heartbeat_addrs.clone(),
        free_port_addr(),
    ));
    // A refusal is no ack: unconfirmed, then isolated once the timeout has run out,
    // heartbeating all along (the refusal itself is logged).
    wait_for_state(&uplink, Reachability::Isolated).await;
    let r = uplink.reachability();
    assert_eq!(r.borrow().last_acked_send_mono_ns, None);
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

/// Several controllers: the heartbeat paths and event addresses of all of them, in
/// their order.
fn heartbeat_addrs_of(controllers: &[&FakeController]) -> Vec<SocketAddr> {
    controllers
        .iter()
        .flat_map(|c| c.heartbeat_addrs.clone())
        .collect()
}

#[tokio::test]
async fn a_follower_that_closes_after_hello_and_a_dead_controller_are_passed_over_at_once_and_the_leader_is_connected_within_one_round(
) {
    let follower = FakeController::follower().await;
    let leader = FakeController::start(1, key()).await;
    let follower_addr = follower.serve_events_anywhere().await;
    let leader_addr = leader.serve_events_anywhere().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = uplink_config_for_all(
        dir.path(),
        heartbeat_addrs_of(&[&follower, &leader]),
        vec![follower_addr, free_port_addr(), leader_addr],
    );
    // Any wait between the addresses of a round would take a minute.
    cfg.reconnect_min = Duration::from_secs(60);
    cfg.reconnect_max = Duration::from_secs(60);
    let begun = Instant::now();
    let uplink = start_uplink(cfg);
    wait_for_stream(&uplink, "the leader's welcome", |s| s.connected).await;
    assert!(
        begun.elapsed() < Duration::from_secs(5),
        "{:?}",
        begun.elapsed()
    );
    let status = uplink.stream_status().borrow().clone();
    assert_eq!(status.addr, Some(leader_addr));
    assert_eq!(status.controller_id.as_deref(), Some("fake-ctl"));
    assert_eq!(
        follower.hello_times().len(),
        1,
        "the follower was asked once"
    );
    assert_eq!(leader.hello_times().len(), 1);

    uplink.event_sender().send(started(1));
    wait_for_stream(&uplink, "the event acked", |s| s.released_up_to == 1).await;
    uplink.shutdown().await;
    assert_eq!(leader.stored_ids(), [1]);
    assert!(follower.received_ids().is_empty());
}

#[tokio::test]
async fn when_every_controller_refuses_the_next_round_waits_for_the_backoff_delay() {
    let first = FakeController::follower().await;
    let second = FakeController::follower().await;
    let first_addr = first.serve_events_anywhere().await;
    let second_addr = second.serve_events_anywhere().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = uplink_config_for_all(
        dir.path(),
        heartbeat_addrs_of(&[&first, &second]),
        vec![first_addr, free_port_addr(), second_addr],
    );
    // Each delay is drawn from 500 ms..=1 s.
    cfg.reconnect_min = Duration::from_secs(1);
    cfg.reconnect_max = Duration::from_secs(1);
    let uplink = start_uplink(cfg);
    eventually("two rounds", || {
        first.hello_times().len() >= 2 && second.hello_times().len() >= 2
    })
    .await;
    let (a, b) = (first.hello_times(), second.hello_times());
    assert!(a[0] < b[0] && b[0] < a[1] && a[1] < b[1], "rounds in order");
    let within_round = b[0] - a[0];
    assert!(
        within_round < Duration::from_millis(500),
        "the second address waited {within_round:?} after the first"
    );
    let between_rounds = a[1] - b[0];
    assert!(
        between_rounds >= Duration::from_millis(500),
        "the next round began after only {between_rounds:?}"
    );
    assert!(!uplink.stream_status().borrow().connected);

    // Once one leads, a later round finds it.
    second.set_leading(true);
    wait_for_stream(&uplink, "the new leader's welcome", |s| {
        s.connected && s.addr == Some(second_addr)
    })
    .await;
    uplink.shutdown().await;
}

#[tokio::test]
async fn after_a_blip_on_the_leaders_stream_the_next_round_starts_at_the_controller_that_led_last()
{
    let before = FakeController::follower().await;
    let leader = FakeController::start(1, key()).await;
    let after = FakeController::follower().await;
    let before_addr = before.serve_events_anywhere().await;
    let leader_addr = leader.serve_events_anywhere().await;
    let after_addr = after.serve_events_anywhere().await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config_for_all(
        dir.path(),
        heartbeat_addrs_of(&[&before, &leader, &after]),
        vec![before_addr, leader_addr, after_addr],
    ));
    wait_for_stream(&uplink, "the leader's welcome", |s| {
        s.addr == Some(leader_addr)
    })
    .await;
    assert_eq!(
        (before.hello_times().len(), after.hello_times().len()),
        (1, 0)
    );

    leader.drop_streams();
    eventually("a second hello to the leader", || {
        leader.hello_times().len() == 2
    })
    .await;
    wait_for_stream(&uplink, "the leader's welcome again", |s| {
        s.connected && s.addr == Some(leader_addr)
    })
    .await;
    uplink.event_sender().send(started(1));
    wait_for_stream(&uplink, "the event acked", |s| s.released_up_to == 1).await;
    uplink.shutdown().await;
    assert_eq!(
        (before.hello_times().len(), after.hello_times().len()),
        (1, 0),
        "the round after the blip began at the last leader"
    );
    assert_eq!(leader.stored_ids(), [1]);
}

#[tokio::test]
async fn when_the_leader_is_lost_the_next_leader_gets_every_unacked_event_above_its_welcome_high_water(
) {
    let old = FakeController::start(1, key()).await;
    let new = FakeController::follower().await;
    let old_addr = old.serve_events_anywhere().await;
    let new_addr = new.serve_events_anywhere().await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config_for_all(
        dir.path(),
        heartbeat_addrs_of(&[&old, &new]),
        vec![old_addr, new_addr],
    ));
    wait_for_stream(&uplink, "the first leader's welcome", |s| {
        s.addr == Some(old_addr)
    })
    .await;
    let events = uplink.event_sender();
    for pid in 1..=2 {
        events.send(started(pid));
    }
    wait_for_stream(&uplink, "two events acked", |s| s.released_up_to == 2).await;
    // The old leader takes 3 and 4 but acks neither; the new one holds up to 3 (its
    // store has it), not 4.
    old.store_events.store(false, Ordering::SeqCst);
    for pid in 3..=4 {
        events.send(started(pid));
    }
    eventually("3 and 4 on the old leader's wire", || {
        old.received_ids().ends_with(&[3, 4])
    })
    .await;
    new.seen().dedup.restore(HOST, 3);

    old.set_leading(false);
    new.set_leading(true);
    old.drop_streams();
    // Sent while no controller leads for the watchdog: spooled, then delivered.
    events.send(started(5));
    wait_for_stream(&uplink, "everything acked by the new leader", |s| {
        s.connected && s.addr == Some(new_addr) && s.released_up_to == 5 && s.spooled == 0
    })
    .await;
    uplink.shutdown().await;

    assert_eq!(
        new.received_ids(),
        [4, 5],
        "only what the new leader did not hold was sent to it"
    );
    assert_eq!(new.stored_ids(), [4, 5]);
    assert_eq!(old.received_ids(), [1, 2, 3, 4]);
    let (old_hellos, new_hellos) = (old.hello_times(), new.hello_times());
    assert_eq!(
        old_hellos.len(),
        2,
        "the next round began at the old leader"
    );
    assert_eq!(new_hellos.len(), 1);
    assert!(old_hellos[1] < new_hellos[0]);
}

#[tokio::test]
async fn heartbeats_go_to_every_controller_and_the_leaders_acks_alone_keep_the_watchdog_reachable()
{
    let follower = FakeController::follower().await;
    let leader = FakeController::start(1, key()).await;
    let dir = tempfile::tempdir().unwrap();
    let uplink = start_uplink(uplink_config(
        dir.path(),
        heartbeat_addrs_of(&[&follower, &leader]),
        free_port_addr(),
    ));
    wait_for_state(&uplink, Reachability::Reachable).await;
    eventually("heartbeats at both controllers", || {
        follower.seen().heartbeats.len() >= 5 && leader.seen().heartbeats.len() >= 5
    })
    .await;
    // Well past the isolation timeout (300 ms): still reachable on the leader's acks.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let report = uplink.reachability().borrow().clone();
    assert_eq!(report.state, Reachability::Reachable);
    assert_eq!(report.last_acked_send_mono_ns_by_path[0], None);
    assert!(report.last_acked_send_mono_ns_by_path[1].is_some());
    uplink.shutdown().await;
    assert!(follower.seen().heartbeats.iter().all(|h| h.path_index == 0));
    assert!(leader.seen().heartbeats.iter().all(|h| h.path_index == 1));
}
