//! Trust nothing on the wire: the real `defib-controller` attacked on every port by
//! someone on its management network, while two real watchdogs (h0, h1, each in its
//! own network namespace with two paths) keep heartbeating.
//!
//! The attacker is a namespace of its own plugged into the lab's bridges
//! ([`Attacker`]): it forges, records (from the controller's side of the wire,
//! [`Recorder`]), replays, truncates, oversizes and floods heartbeats (UDP 7410), event
//! stream frames (TLS on TCP 7411, spoken with `openssl s_client`: anyone may open a
//! TLS connection, only frames authenticate a host) and API requests (HTTPS 7412, with
//! curl and defibctl). Every test checks that 100 % of the bad input is refused and
//! counted (`defib_heartbeats_rejected_total` and `defib_frames_rejected_total` deltas,
//! exact wherever the path is deterministic, and no other rejection counter moving; the
//! API counts nothing, so its answers are counted here), that the controller's memory
//! (VmRSS) and descriptors stay bounded, and that the real hosts stay `Up` all along
//! (polled through the API every 150-250 ms) with no incident about them. The numbers
//! measured are printed (`cargo test -p defib-tests --test adversarial_lab --
//! --nocapture`).
//!
//! Needs root (namespaces, BPF for the watchdogs, a packet socket), curl and openssl:
//! under `CI=true` a missing one fails the test.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use defib_tests::attacks::{
    open_fds, rss_kib, watching_hosts, Attacker, Datagram, HostWatch, Recorder, Relay, Scrape,
    TlsClient,
};
use defib_tests::lab::{Lab, LabSpec, KEY, TOKEN};
use defib_tests::{built_binary, have_command, is_root, require, FakeQemu};
use protocol::{
    decode_ack, decode_heartbeat_keyed, encode_frame, encode_heartbeat, BootId, Envelope, Event,
    EventPayload, Heartbeat, HostKeys, HostStatus, Key, MasterKey, Message, FRAME_HEADER_LEN,
    MAC_LEN, MAX_FRAME_BODY_LEN, MAX_HEARTBEAT_LEN,
};
use serde_json::{json, Value};

/// The labs of this file load BPF, measure the controller's memory and time its
/// timeouts: one at a time.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const CLUSTER: &str = "lab";
const HOSTS: [&str; 2] = ["h0", "h1"];
const HEARTBEAT_PORT: u16 = 7410;
const EVENT_PORT: u16 = 7411;
const API_PORT: u16 = 7412;
/// `[intake] stream_handshake_timeout_ms` of these labs.
const HANDSHAKE_MS: u64 = 1000;
/// The lab's per-source heartbeat limits (`Lab::intake_section`).
const RATE_PER_SOURCE: u64 = 5000;
const BURST_PER_SOURCE: u64 = 10_000;
/// How much the controller's resident memory may grow under an attack.
const RSS_BOUND_KIB: u64 = 50 * 1024;

fn requirements() -> bool {
    is_root() && have_command("curl") && have_command("openssl")
}

const REQUIREMENTS: &str =
    "root (network namespaces, BPF, a packet socket), curl and openssl (s_client)";

/// The controller's address on path `p`.
fn controller(p: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, p as u8, 1)
}

/// Lab host `h`'s address on path `p`.
fn host_addr(h: usize, p: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, p as u8, 10 + h as u8)
}

fn fake_qemu_name(h: usize) -> String {
    format!("qemu-adv-h{h}")
}

fn spec() -> LabSpec {
    LabSpec {
        hosts: HOSTS.len(),
        backend: "none",
        controller_extra: String::new(),
        watchdog_extra: Box::new(|h| {
            format!("[probes]\nwatch_names = [{:?}]\n", fake_qemu_name(h))
        }),
        bmc_network: false,
    }
}

/// A lab under attack: its controller (handshake timeout [`HANDSHAKE_MS`]), its two
/// watchdogs, the attacker's namespace with `sources` extra addresses and, with
/// `record`, a recorder in the controller's namespace started before the watchdogs
/// (so that their first frames are on it).
struct Siege {
    lab: Lab,
    attacker: Attacker,
    recorder: Option<Recorder>,
    master: MasterKey,
}

impl Siege {
    fn start(sources: usize, record: bool) -> Siege {
        Siege::start_with(sources, record, HANDSHAKE_MS)
    }

    /// [`Siege::start`] with `[intake] stream_handshake_timeout_ms = handshake_ms`.
    fn start_with(sources: usize, record: bool, handshake_ms: u64) -> Siege {
        let spec = spec();
        let mut lab = Lab::new(&spec);
        lab.intake_extra = format!("stream_handshake_timeout_ms = {handshake_ms}\n");
        let attacker = Attacker::plug(&lab.net, sources);
        lab.start_controller(&spec);
        let recorder = record.then(|| {
            Recorder::start(
                &lab.net.controller_ns(),
                HEARTBEAT_PORT,
                |ip| {
                    let o = ip.octets();
                    o[0] == 10 && o[1] == 77 && (10..10 + HOSTS.len() as u8).contains(&o[3])
                },
                &[EVENT_PORT, API_PORT],
            )
        });
        lab.start_watchdogs(&spec);
        lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
            s.len() == HOSTS.len() && s.iter().all(|(_, st)| st == "Up")
        });
        Siege {
            lab,
            attacker,
            recorder,
            master: MasterKey::new(KEY.as_bytes()).expect("the lab's master key"),
        }
    }

    fn pid(&self) -> u32 {
        self.lab.controller.as_ref().expect("a controller").pid()
    }

    fn key(&self, host: &str) -> Key {
        self.master.host_key(host)
    }

    fn scrape(&self) -> Scrape {
        Scrape::take(&self.lab)
    }

    /// The real hosts have no host incident, open or closed.
    fn assert_no_incident_about_the_real_hosts(&self) {
        for h in HOSTS {
            assert!(
                self.lab.host_incident(h).is_none(),
                "an incident about {h}: {:?}\n{}",
                self.lab.host_incident(h),
                self.lab.logs()
            );
        }
    }

    /// `defibctl ARGS` run from the attacker's namespace (as an operator elsewhere on the
    /// network would), with the lab's token and CA.
    fn defibctl(&self, args: &[&str]) -> std::process::Output {
        let bin = built_binary("defibctl", "defibctl");
        let mut cmd = self.attacker.command(&bin.display().to_string());
        cmd.args(["--url", &self.lab.api_url(API_PORT), "--token-file"])
            .arg(self.lab.path("api.token"))
            .arg("--ca-file")
            .arg(self.lab.ca_file())
            .args(args);
        cmd.output().expect("run defibctl")
    }

    /// A TLS connection to the event port from the attacker's address on path 0 (see
    /// [`Attacker::tls`]).
    fn event_stream(&self, close_on_eof: bool) -> TlsClient {
        self.attacker.tls(
            self.attacker.addr(0),
            SocketAddrV4::new(controller(0), EVENT_PORT),
            &self.lab.ca_file(),
            close_on_eof,
        )
    }

    /// Sends `bytes` inside a new TLS connection to the event port and waits until the
    /// controller closes it or `within` passes: (what it answered, whether it closed).
    fn send_in_stream(&self, bytes: &[u8], within: Duration) -> (Vec<u8>, bool) {
        let mut c = self.event_stream(false);
        let _ = c.write(bytes);
        let closed = c.wait_closed(within);
        (c.received(), closed)
    }

    /// `curl` from the attacker's namespace against `path` of the API: the HTTP status.
    fn curl(&self, method: &str, path: &str, token: Option<&str>, extra: &[&str]) -> u16 {
        let mut cmd = self.attacker.command("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .arg("--cacert")
        .arg(self.lab.ca_file())
        .args(["-X", method]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd
            .args(extra)
            .arg(format!("{}{path}", self.lab.api_url(API_PORT)))
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

/// Asserts the rejection counters moved by exactly `expected` since `before` (and no
/// other rejection counter moved); returns the changes for printing.
fn assert_rejections(
    what: &str,
    siege: &Siege,
    before: &Scrape,
    after: &Scrape,
    expected: &[(&str, i64)],
) -> BTreeMap<String, i64> {
    let got = after.rejections_since(before);
    let want: BTreeMap<String, i64> = expected
        .iter()
        .filter(|(_, n)| *n != 0)
        .map(|(series, n)| (series.to_string(), *n))
        .collect();
    assert_eq!(
        got,
        want,
        "{what}: the rejection counters moved by {got:#?}, expected {want:#?}\n{}",
        siege.lab.controller_log()
    );
    got
}

fn hb_series(reason: &str) -> String {
    format!("defib_heartbeats_rejected_total{{reason=\"{reason}\"}}")
}

fn frame_series(reason: &str) -> String {
    format!("defib_frames_rejected_total{{reason=\"{reason}\"}}")
}

/// A heartbeat of `host` in the current layout, signed with `key`.
fn heartbeat(cluster: &str, host: &str, seq: u64, session: u64, key: &Key) -> Vec<u8> {
    encode_heartbeat(
        &Heartbeat {
            cluster_id: cluster,
            host_id: host,
            boot_id: BootId([0xad; 16]),
            // Far above any real incarnation: if it were taken, it would win.
            incarnation: u64::MAX / 2,
            sequence: seq,
            sent_unix_ns: 1,
            sent_mono_ns: seq * 100_000_000,
            path_index: 0,
            session,
            ack_period_ms: 375,
            status: HostStatus {
                libvirt_reachable: true,
                ..HostStatus::default()
            },
        },
        key,
    )
    .expect("encode a heartbeat")
}

/// The session a heartbeat echoes (bytes 85..93 of the layout, protocol::heartbeat).
fn echoed_session(datagram: &[u8]) -> u64 {
    u64::from_be_bytes(datagram[85..93].try_into().expect("a whole heartbeat"))
}

/// A frame whose envelope names `host` and carries `message` (its JSON, so that it is
/// built the same whatever fields the message types grow), signed with `key`, bound to
/// no connection.
fn frame(host: &str, message: Value, key: &Key) -> Vec<u8> {
    frame_on(host, 0, message, key)
}

/// [`frame`] bound to the connection whose challenge was `conn` (`Envelope::conn`).
fn frame_on(host: &str, conn: u64, message: Value, key: &Key) -> Vec<u8> {
    let envelope: Envelope = serde_json::from_value(json!({
        "cluster_id": CLUSTER,
        "host_id": host,
        "boot_id": BootId([0xad; 16]),
        "incarnation": u64::MAX / 2,
        "conn": conn,
        "message": message,
    }))
    .expect("an envelope");
    encode_frame(&envelope, key).expect("encode a frame")
}

/// The frames in `bytes` (from the controller, read without checking their MAC) as
/// JSON envelopes.
fn envelopes(bytes: &[u8]) -> Vec<Value> {
    split_frames(bytes)
        .iter()
        .filter_map(|f| serde_json::from_slice(&f[FRAME_HEADER_LEN..f.len() - MAC_LEN]).ok())
        .collect()
}

/// Waits until the controller has sent `client` a frame of type `ty`; returns its
/// envelope.
fn wait_frame(client: &TlsClient, ty: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(e) = envelopes(&client.received())
            .into_iter()
            .find(|e| e["message"]["type"] == ty)
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {ty} from the controller within {within:?} (got {:?}; s_client: {})",
            frame_types(&client.received()),
            client.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn hello() -> Value {
    json!({"type": "hello", "last_event_id": 0, "nonce": 0x0bad_5eed_u64})
}

/// A qemu of `host` that exited on SIGKILL: what would start a VM incident if taken.
fn qemu_killed_event(id: u64) -> Value {
    serde_json::to_value(Message::Event(Event {
        id,
        unix_ns: 1,
        mono_ns: 1,
        payload: EventPayload::QemuExited {
            vm_uuid: Some("adadadad-0000-4000-8000-00000000dead".into()),
            vm_name: Some("forged".into()),
            pid: 4242,
            exit_code: None,
            signal: Some(9),
            killer_pid: Some(1),
            killer_comm: Some("forger".into()),
            by_hypervisor: false,
            oom_killed: false,
            kernel_ts_ns: 1,
        },
    }))
    .expect("an event as JSON")
}

/// Reads what the controller sends on `s` until it closes it or `within` has passed:
/// (the bytes, whether it closed).
fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .expect("set a read timeout");
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (got, true),
        }
    }
}

/// The types of the frames in `bytes` (from the controller, unauthenticated: read
/// only to see what it answered).
fn frame_types(bytes: &[u8]) -> Vec<String> {
    split_frames(bytes)
        .iter()
        .map(|f| {
            serde_json::from_slice::<Value>(&f[FRAME_HEADER_LEN..f.len() - MAC_LEN])
                .ok()
                .and_then(|v| v["message"]["type"].as_str().map(String::from))
                .unwrap_or_else(|| "?".into())
        })
        .collect()
}

/// Splits a recorded byte stream into whole frames by their headers (no key needed);
/// stops at anything that is not a frame.
fn split_frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + FRAME_HEADER_LEN) {
        if &header[..4] != b"DFIB" {
            break;
        }
        let len = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        let Some(f) = bytes.get(at..at + FRAME_HEADER_LEN + len + MAC_LEN) else {
            break;
        };
        out.push(f.to_vec());
        at += f.len();
    }
    out
}

/// Sends `datagrams` from `socket` to the controller on path `p`, 20 every 2 ms: a few
/// hundred stay well within the lab's per-source burst, so none is refused for its rate.
fn send_all(socket: &UdpSocket, p: usize, datagrams: &[Vec<u8>]) {
    let to = SocketAddrV4::new(controller(p), HEARTBEAT_PORT);
    for chunk in datagrams.chunks(20) {
        for d in chunk {
            socket.send_to(d, to).expect("send a datagram");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Asserts nothing came back to `socket` (no ack) within `wait`.
fn assert_no_ack(socket: &UdpSocket, wait: Duration) {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    if let Ok((n, from)) = socket.recv_from(&mut buf) {
        panic!("the controller ({from}) answered a refused datagram with {n} bytes");
    }
}

fn print_watch(what: &str, watch: &HostWatch) {
    println!(
        "{what}: {} host-state polls answered ({} unanswered); states seen {:?}",
        watch.polls, watch.unanswered, watch.states
    );
}

fn assert_always_up(what: &str, siege: &Siege, watch: &HostWatch) {
    print_watch(what, watch);
    assert!(
        watch.polls >= 3,
        "{what}: too few polls to judge: {watch:?}"
    );
    assert!(
        watch.always_up(),
        "{what}: a real host was not Up: {:?}\n{}",
        watch.not_up,
        siege.lab.logs()
    );
}

#[test]
fn forged_heartbeats_frames_and_api_requests_are_all_refused_and_counted_while_the_real_hosts_stay_up(
) {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let siege = Siege::start(0, true);
    let recorder = siege.recorder.as_ref().expect("recording");
    // The session the real h0 echoes right now (read off the wire): forgeries carry
    // it, as a forger who listens would.
    let session = echoed_session(
        &recorder
            .datagrams_from(host_addr(0, 0))
            .last()
            .expect("h0's heartbeats on the wire")
            .payload,
    );
    let wrong = Key::new(b"not-any-key-of-this-cluster-0123").unwrap();
    let master_as_key = Key::new(KEY.as_bytes()).unwrap();
    let (k1, k9) = (siege.key("h1"), siege.key("h9"));
    const N: u64 = 50;
    let before = siege.scrape();
    let (rss0, fds0) = (rss_kib(siege.pid()), open_fds(siege.pid()));

    let ((), watch) = watching_hosts(&siege.lab, &HOSTS, Duration::from_millis(200), || {
        // Heartbeats: h0 signed with a wrong key, with h1's own key (a compromised h1
        // speaking for h0) and with the master key; a host nobody enrolled (h9, with
        // the key the master key would give it); h1 for another cluster.
        let forged: Vec<Vec<u8>> = (1..=N)
            .flat_map(|seq| {
                [
                    heartbeat(CLUSTER, "h0", seq, session, &wrong),
                    heartbeat(CLUSTER, "h0", seq, session, &k1),
                    heartbeat(CLUSTER, "h0", seq, session, &master_as_key),
                    heartbeat(CLUSTER, "h9", seq, session, &k9),
                    heartbeat("other-cluster", "h1", seq, session, &k1),
                ]
            })
            .collect();
        for p in 0..2 {
            let socket = siege.attacker.udp(p);
            let half: Vec<Vec<u8>> = forged.iter().skip(p).step_by(2).cloned().collect();
            send_all(&socket, p, &half);
            assert_no_ack(&socket, Duration::from_millis(300));
        }

        // Event frames, each on a TLS connection of its own (a bad frame ends it):
        // Hellos for h0 signed with a wrong key and with h1's key, a Hello of h9, and
        // an event of h0 (a killed VM) signed with h1's key. And the first of them
        // without TLS, which the event port speaks only.
        let frames = [
            frame("h0", hello(), &wrong),
            frame("h0", hello(), &k1),
            frame("h9", hello(), &k9),
            frame("h0", qemu_killed_event(1_000_000), &k1),
        ];
        for _ in 0..5 {
            for f in &frames {
                let (answer, closed) = siege.send_in_stream(f, Duration::from_secs(5));
                assert!(closed, "a forged frame did not end its stream");
                let types = frame_types(&answer);
                assert!(types.is_empty(), "a forged frame was answered {types:?}");
            }
            let to = SocketAddrV4::new(controller(0), EVENT_PORT);
            let mut s = siege
                .attacker
                .connect(to)
                .expect("connect to the event port");
            s.write_all(&frames[0]).expect("send a frame");
            let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(3));
            assert!(
                closed && frame_types(&answer).is_empty(),
                "a frame outside TLS was taken"
            );
        }

        // The API: no token, a wrong one, the master key or a host key as the token,
        // on reads and on commands (h0 into maintenance, h9 enrolled).
        let mut statuses = BTreeMap::<u16, usize>::new();
        let k0_text = siege.master.host_key_text("h0");
        for token in [None, Some("wrong-token"), Some(KEY), Some(k0_text.as_str())] {
            for (method, path, body) in [
                ("GET", "/v1/hosts", None),
                ("GET", "/v1/snapshot", None),
                ("PUT", "/v1/hosts/h0/maintenance", Some(r#"{"on":true}"#)),
                ("POST", "/v1/hosts/h9/enrollment", None),
            ] {
                let mut extra = vec![];
                if let Some(b) = body {
                    extra = vec!["-H", "Content-Type: application/json", "--data", b];
                }
                let status = siege.curl(method, path, token, &extra);
                *statuses.entry(status).or_default() += 1;
            }
        }
        println!("forged API requests: answers by status {statuses:?}");
        assert_eq!(
            statuses,
            BTreeMap::from([(401, 16)]),
            "every forged API request must get 401"
        );
    });

    let after = siege.scrape();
    let changes = assert_rejections(
        "forgeries",
        &siege,
        &before,
        &after,
        &[
            (&hb_series("bad_mac"), 3 * N as i64),
            (&hb_series("unknown_host"), N as i64),
            (&hb_series("unknown_cluster"), N as i64),
            (&frame_series("bad_mac"), 15),
            (&frame_series("unknown_host"), 5),
            (&frame_series("tls_handshake"), 5),
        ],
    );
    println!("forgeries refused, counted: {changes:?}");
    assert_eq!(
        after.get("defib_events_received_total"),
        before.get("defib_events_received_total"),
        "a forged event was stored"
    );
    // h9 still unknown (its enrollment was refused): one more heartbeat says so.
    let socket = siege.attacker.udp(0);
    send_all(&socket, 0, &[heartbeat(CLUSTER, "h9", 1_000, 0, &k9)]);
    assert_no_ack(&socket, Duration::from_millis(300));
    let last = siege.scrape();
    assert_eq!(
        last.heartbeats_rejected("unknown_host"),
        after.heartbeats_rejected("unknown_host") + 1
    );
    assert_always_up("forgeries", &siege, &watch);
    assert_eq!(siege.lab.state_of("h0"), "Up", "h0 went into maintenance");
    siege.assert_no_incident_about_the_real_hosts();
    let (rss1, fds1) = (rss_kib(siege.pid()), open_fds(siege.pid()));
    println!("forgeries: controller RSS {rss0} KiB -> {rss1} KiB, descriptors {fds0} -> {fds1}");
    assert!(
        rss1 < rss0 + RSS_BOUND_KIB,
        "RSS grew from {rss0} to {rss1} KiB"
    );
    assert!(fds1 <= fds0 + 2, "descriptors grew from {fds0} to {fds1}");
}

/// A TLS handshake record that declares 16 KiB, of which 100 bytes come.
fn cut_tls_record() -> Vec<u8> {
    let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    record.extend_from_slice(&[0x01; 100]);
    record
}

/// Polls `probe` every 100 ms until it is true, failing with `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !probe() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The path a datagram was sent on: the third octet of the controller address it went to.
fn path_of(d: &Datagram) -> usize {
    usize::from(d.dst.ip().octets()[2])
}

/// Every datagram `socket` has received (acks), within `wait` of the last.
fn drain(socket: &UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = socket.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

#[test]
fn recorded_heartbeats_hellos_events_and_api_requests_replayed_in_the_same_run_change_nothing_and_are_counted(
) {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let siege = Siege::start(0, true);
    let recorder = siege.recorder.as_ref().expect("recording");
    let start = siege.scrape();
    // Something for h0's stream to carry: a qemu appears on h0.
    let _vm = FakeQemu::start_in(
        Some(&siege.lab.net.host_ns(0)),
        &fake_qemu_name(0),
        "adv-resident",
        "adadadad-0000-4000-8000-000000000001",
        &[],
    );
    wait_for("h0's event stored", Duration::from_secs(20), || {
        siege.scrape().get("defib_events_received_total") > start.get("defib_events_received_total")
    });
    // An operator on the network enrolls h7 (the attacker records it), then revokes it.
    let k7 = siege.key("h7");
    let out = siege.defibctl(&["hosts", "enroll", "h7", "--key-out", "/dev/null"]);
    assert!(
        out.status.success(),
        "enroll h7: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probe = siege.attacker.udp(0);
    send_all(&probe, 0, &[heartbeat(CLUSTER, "h7", 1, 0, &k7)]);
    let acks = drain(&probe, Duration::from_millis(1000));
    assert!(
        acks.iter().any(|a| decode_ack(a, &k7).is_ok()),
        "enrolled h7 is not heard"
    );
    let out = siege.defibctl(&["hosts", "revoke", "h7"]);
    assert!(
        out.status.success(),
        "revoke h7: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));

    // What was recorded: h0's heartbeats on both paths, h0's event stream (TLS: its
    // bytes, not its frames), the operator's API connections (the enrollment first).
    let heartbeats: Vec<Datagram> = (0..2)
        .flat_map(|p| recorder.datagrams_from(host_addr(0, p)))
        .collect();
    let (stream_flow, stream) = recorder
        .client_bytes(host_addr(0, 0), EVENT_PORT)
        .into_iter()
        .next()
        .expect("h0's event stream on the wire");
    let api = recorder.client_bytes(siege.attacker.addr(0), API_PORT);
    let (_, enrollment) = api.first().expect("the enrollment on the wire").clone();
    println!(
        "recorded: {} heartbeats of h0, its event stream {stream_flow:?} ({} bytes, {}), {} API \
         connections (the enrollment: {} bytes)",
        heartbeats.len(),
        stream.len(),
        if stream.first() == Some(&0x16) {
            "TLS"
        } else {
            "not TLS"
        },
        api.len(),
        enrollment.len()
    );
    assert!(heartbeats.len() >= 20, "too few heartbeats recorded");
    assert!(stream.len() > 100, "h0's stream was not recorded");

    // The frames of a real conversation of h0's, held with its key (what a compromised
    // h0 or a leak of its frames would give: TLS keeps them off the wire): Hello, the
    // controller's challenge, the Hello answering it, Welcome, an event the controller
    // holds already (a duplicate: nothing changes), its ack.
    let k0 = siege.key("h0");
    let hello1 = frame_on("h0", 0, hello(), &k0);
    let mut talk = siege.event_stream(false);
    talk.write(&hello1).expect("send a Hello");
    let challenge = wait_frame(&talk, "challenge", Duration::from_secs(5))["message"]["nonce"]
        .as_u64()
        .expect("a challenge");
    let hello2 = frame_on("h0", challenge, hello(), &k0);
    talk.write(&hello2).expect("answer the challenge");
    let highest = wait_frame(&talk, "welcome", Duration::from_secs(5))["message"]
        ["highest_event_id"]
        .as_u64()
        .expect("a Welcome");
    assert!(highest >= 1, "the controller holds no event of h0");
    let event = frame_on("h0", challenge, qemu_killed_event(highest), &k0);
    talk.write(&event).expect("send an event");
    let acked = wait_frame(&talk, "event_ack", Duration::from_secs(5))["message"]["up_to_event_id"]
        .as_u64();
    drop(talk);
    println!(
        "a real conversation of h0's: challenge {challenge:#x}, Welcome holding event \
         {highest}, the event sent again acked up to {acked:?}"
    );

    let before = siege.scrape();
    let (rss0, fds0) = (rss_kib(siege.pid()), open_fds(siege.pid()));
    let (replayed_answer, watch) =
        watching_hosts(&siege.lab, &HOSTS, Duration::from_millis(200), || {
            // Every recorded heartbeat of h0, again, to where it went.
            for p in 0..2 {
                let socket = siege.attacker.udp(p);
                let again: Vec<Vec<u8>> = heartbeats
                    .iter()
                    .filter(|d| path_of(d) == p)
                    .map(|d| d.payload.clone())
                    .collect();
                send_all(&socket, p, &again);
                assert_no_ack(&socket, Duration::from_millis(300));
            }
            // h0's recorded stream, its bytes on a new connection, three times: a TLS
            // session cannot be replayed.
            let to = SocketAddrV4::new(controller(0), EVENT_PORT);
            for _ in 0..3 {
                let mut s = siege
                    .attacker
                    .connect(to)
                    .expect("connect to the event port");
                let _ = s.write_all(&stream);
                let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(3));
                assert!(closed, "a replayed TLS stream was not closed");
                assert!(
                    frame_types(&answer).is_empty(),
                    "a replayed TLS stream was answered"
                );
            }
            // The conversation's frames on a new connection: a fresh challenge, which
            // the recorded Hello does not answer.
            let (answer, closed) = siege.send_in_stream(
                &[hello1.clone(), hello2.clone(), event.clone()].concat(),
                Duration::from_secs(5),
            );
            assert!(closed, "the replayed conversation was not closed");
            // Its event alone; its second Hello alone (a fresh challenge it cannot
            // answer, then the handshake timeout).
            let (alone, closed) = siege.send_in_stream(&event, Duration::from_secs(5));
            assert!(
                closed && frame_types(&alone).is_empty(),
                "a replayed event was taken"
            );
            let t = Instant::now();
            let (hello_alone, closed) =
                siege.send_in_stream(&hello2, Duration::from_millis(HANDSHAKE_MS + 3000));
            assert!(closed, "a replayed Hello held its stream");
            println!(
                "the replayed answering Hello alone: answered {:?}, closed after {:?}",
                frame_types(&hello_alone),
                t.elapsed()
            );
            // The recorded enrollment, again, three times.
            let api = SocketAddrV4::new(controller(0), API_PORT);
            for _ in 0..3 {
                let mut s = siege.attacker.connect(api).expect("connect to the API");
                s.write_all(&enrollment).expect("replay the enrollment");
                let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(5));
                assert!(closed, "the replayed TLS session was not closed");
                assert!(
                    !answer.windows(5).any(|w| w == b"HTTP/"),
                    "the API answered a replayed TLS session in clear"
                );
            }
            envelopes(&answer)
        });
    std::thread::sleep(Duration::from_millis(300));
    let after = siege.scrape();
    let types: Vec<&str> = replayed_answer
        .iter()
        .filter_map(|e| e["message"]["type"].as_str())
        .collect();
    println!("the replayed conversation was answered {types:?}");
    assert_eq!(
        types,
        ["challenge"],
        "the replayed conversation got further"
    );
    assert_ne!(
        replayed_answer[0]["message"]["nonce"].as_u64(),
        Some(challenge),
        "the controller challenged twice with the same nonce"
    );
    let changes = assert_rejections(
        "replays",
        &siege,
        &before,
        &after,
        &[
            (&hb_series("replayed"), heartbeats.len() as i64),
            (&frame_series("tls_handshake"), 3),
            (&frame_series("wrong_connection"), 1),
            (&frame_series("event_before_hello"), 1),
            (&frame_series("handshake_timeout"), 1),
        ],
    );
    println!("replays refused, counted: {changes:?}; 3 replayed API sessions closed unanswered");
    for series in [
        "defib_events_received_total",
        "defib_events_duplicate_total",
    ] {
        assert_eq!(after.get(series), before.get(series), "{series} moved");
    }
    // h7 is still revoked: the replayed enrollment did nothing.
    send_all(&probe, 0, &[heartbeat(CLUSTER, "h7", 2, 0, &k7)]);
    assert_no_ack(&probe, Duration::from_millis(500));
    assert_eq!(
        siege.scrape().heartbeats_rejected("unknown_host"),
        after.heartbeats_rejected("unknown_host") + 1,
        "h7 must be unknown again"
    );
    assert_always_up("replays in one run", &siege, &watch);
    siege.assert_no_incident_about_the_real_hosts();
    let (rss1, fds1) = (rss_kib(siege.pid()), open_fds(siege.pid()));
    println!("replays: controller RSS {rss0} KiB -> {rss1} KiB, descriptors {fds0} -> {fds1}");
    assert!(
        rss1 < rss0 + RSS_BOUND_KIB,
        "RSS grew from {rss0} to {rss1} KiB"
    );
    assert!(fds1 <= fds0 + 2, "descriptors grew from {fds0} to {fds1}");
}

#[test]
fn a_dead_hosts_heartbeats_replayed_after_a_controller_restart_are_counted_unproven_and_never_show_it_up(
) {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut siege = Siege::start(0, true);
    // A VM on each host, so that the store knows both hosts across the restart.
    let start = siege.scrape();
    let _vms: Vec<FakeQemu> = (0..2)
        .map(|h| {
            FakeQemu::start_in(
                Some(&siege.lab.net.host_ns(h)),
                &fake_qemu_name(h),
                &format!("adv-vm-h{h}"),
                &format!("adadadad-0000-4000-8000-00000000010{h}"),
                &[],
            )
        })
        .collect();
    wait_for("both hosts' VMs stored", Duration::from_secs(20), || {
        siege.scrape().get("defib_events_received_total")
            >= start.get("defib_events_received_total") + 2
    });
    // Three seconds of h1's heartbeats, as they cross the wire.
    let from = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let mut recording: Vec<Datagram> = (0..2)
        .flat_map(|p| {
            siege
                .recorder
                .as_ref()
                .unwrap()
                .datagrams_from(host_addr(1, p))
        })
        .filter(|d| d.at >= from)
        .collect();
    recording.sort_by_key(|d| d.at);
    let old_session = echoed_session(&recording.last().expect("h1's heartbeats").payload);
    assert!(
        recording
            .iter()
            .all(|d| echoed_session(&d.payload) == old_session),
        "h1 echoed several sessions while it was Up"
    );
    let h0_old_session = echoed_session(
        &siege
            .recorder
            .as_ref()
            .unwrap()
            .datagrams_from(host_addr(0, 0))
            .last()
            .expect("h0's heartbeats")
            .payload,
    );
    let n = recording.len() as u64;
    println!("recorded {n} heartbeats of h1 over 3 s (session {old_session:#x})");

    // h1 dies (its watchdog is killed, it says nothing more); the controller restarts.
    let _ = siege.lab.watchdogs[1].child.kill();
    let _ = siege.lab.watchdogs[1].child.wait();
    let restart_at = Instant::now();
    siege.lab.kill_controller();
    siege.lab.start_controller(&spec());
    let ready_after = restart_at.elapsed();
    let rss0 = rss_kib(siege.pid());
    let sockets = [siege.attacker.udp(0), siege.attacker.udp(1)];

    // The recording replayed at once, at its own pace, while the host states are watched.
    let ((), watch) = watching_hosts(&siege.lab, &HOSTS, Duration::from_millis(150), || {
        let first = recording[0].at;
        let began = Instant::now();
        for d in &recording {
            let due = began + (d.at - first);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            sockets[path_of(d)]
                .send_to(&d.payload, d.dst)
                .expect("replay a heartbeat");
        }
        std::thread::sleep(Duration::from_secs(1));
    });
    print_watch("replay after a restart", &watch);
    let after = siege.scrape();
    // Acked (so that a live watchdog would learn the session), never as counting.
    let k1 = siege.key("h1");
    let acks: Vec<Vec<u8>> = sockets
        .iter()
        .flat_map(|s| drain(s, Duration::from_millis(200)))
        .collect();
    for a in &acks {
        let ack = decode_ack(a, &k1).expect("an ack signed with h1's key");
        assert!(
            !ack.counts,
            "a replayed heartbeat was acked as counting: {ack:?}"
        );
        assert_ne!(
            ack.session, old_session,
            "the new controller kept the old session"
        );
    }
    // h0's heartbeats that still echoed the old session after the restart (one or two
    // per path, until an ack taught it the new one) are unproven too.
    let h0_stale = (0..2)
        .flat_map(|p| {
            siege
                .recorder
                .as_ref()
                .unwrap()
                .datagrams_from(host_addr(0, p))
        })
        .filter(|d| d.at >= restart_at && echoed_session(&d.payload) == h0_old_session)
        .count() as u64;
    let unproven = after.heartbeats_rejected("unproven_session");
    println!(
        "controller ready {ready_after:?} after it was killed; {n} replayed heartbeats of dead h1: \
         unproven_session = {unproven} (h0 sent {h0_stale} with the old session after the \
         restart), {} acks to the replays, none counting; rejections of the new process: {:?}",
        acks.len(),
        after.rejections_since(&Scrape::default())
    );
    assert!(
        (n..=n + h0_stale).contains(&unproven),
        "every replayed heartbeat must be counted unproven_session: {unproven}, expected {n} \
         (+ at most {h0_stale} of h0's)"
    );
    for reason in ["replayed", "bad_mac", "stale_incarnation", "unknown_host"] {
        assert_eq!(after.heartbeats_rejected(reason), 0, "{reason}");
    }
    // Dead h1 was never Up at the new controller: a replay taken for a sign of life
    // would have listed it Up; the restarted controller lists it only once heard, so
    // it stays away, as any host dead across the restart does.
    let h1_states = watch.states.get("h1").cloned().unwrap_or_default();
    let h1_vm = siege.lab.vm_view("vm:adadadad-0000-4000-8000-000000000101");
    println!(
        "dead h1 at the restarted controller, poll by poll: {h1_states:?}; its VM: {h1_vm:?}; \
         its incident: {:?}",
        siege.lab.host_incident("h1").map(|i| i["state"].clone())
    );
    assert!(
        !h1_states.is_empty() && h1_states.iter().all(|s| s != "Up"),
        "the replays kept dead h1 alive: {h1_states:?}\n{}",
        siege.lab.logs()
    );
    // h0 is heard again at its first heartbeat with the new session, and stays Up.
    let h0_states = watch.states.get("h0").cloned().unwrap_or_default();
    let h0_absent_until = watch
        .not_up
        .iter()
        .filter(|(_, h, _)| h == "h0")
        .map(|(t, _, _)| *t)
        .max();
    println!("h0 at the restarted controller: {h0_states:?} (absent until the poll at {h0_absent_until:?})");
    assert!(
        h0_states == ["Up"] || h0_states == ["absent", "Up"],
        "h0 was not Up from its first heartbeat on: {h0_states:?}\n{}",
        siege.lab.logs()
    );
    assert!(
        siege.lab.host_incident("h0").is_none(),
        "an incident about h0"
    );

    // The same recording once more: now refused as replayed, one by one.
    let before = siege.scrape();
    for (p, socket) in sockets.iter().enumerate() {
        let again: Vec<Vec<u8>> = recording
            .iter()
            .filter(|d| path_of(d) == p)
            .map(|d| d.payload.clone())
            .collect();
        send_all(socket, p, &again);
        assert_no_ack(socket, Duration::from_millis(300));
    }
    let again = siege.scrape();
    let changes = assert_rejections(
        "the recording replayed twice",
        &siege,
        &before,
        &again,
        &[(&hb_series("replayed"), n as i64)],
    );
    let rss1 = rss_kib(siege.pid());
    println!("second replay: {changes:?}; controller RSS {rss0} KiB -> {rss1} KiB");
}

#[test]
fn truncated_and_oversized_input_is_refused_on_every_port_and_counted_without_growing_the_controller(
) {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let siege = Siege::start(0, false);
    let k0 = siege.key("h0");
    let mut enrolled = HostKeys::new(siege.master.clone());
    for h in HOSTS {
        enrolled.enroll(h);
    }
    // A whole heartbeat of h0, signed with its key (as one recorded off the wire): cut
    // at every length, and padded beyond the longest valid one up to the largest UDP
    // datagram. Each one's reason is what the protocol's decoder says of it.
    let whole = heartbeat(CLUSTER, "h0", 1, 0, &k0);
    let mut datagrams: Vec<Vec<u8>> = (0..whole.len()).map(|n| whole[..n].to_vec()).collect();
    for len in [MAX_HEARTBEAT_LEN + 1, 1024, 1025, 1472, 9000, 65_507] {
        for _ in 0..5 {
            let mut d = whole.clone();
            d.resize(len, 0xab);
            datagrams.push(d);
        }
    }
    let mut expected_hb = BTreeMap::<String, i64>::new();
    for d in &datagrams {
        let reason = decode_heartbeat_keyed(d, |h| enrolled.get(h))
            .map(|_| "accepted")
            .unwrap_or_else(|e| e.reason().as_str());
        *expected_hb.entry(hb_series(reason)).or_default() += 1;
    }
    assert!(!expected_hb.contains_key(&hb_series("accepted")));

    // Frames: headers declaring more than 1 MiB (then data behind them), a whole Hello
    // of h0 cut short and the connection closed, or left open, another magic, and a
    // body of exactly 1 MiB that is not an envelope.
    let hello0 = frame("h0", hello(), &k0);
    let oversize_lengths = [MAX_FRAME_BODY_LEN as u32 + 1, 2 << 20, u32::MAX];
    let cuts = [
        1,
        4,
        FRAME_HEADER_LEN - 1,
        FRAME_HEADER_LEN,
        FRAME_HEADER_LEN + 1,
        hello0.len() / 2,
        hello0.len() - MAC_LEN,
        hello0.len() - 1,
    ];
    let open_cuts = [FRAME_HEADER_LEN, hello0.len() - 1];
    let mut bad_magic = b"XXXX\x01\x03\x00\x00".to_vec();
    bad_magic.extend_from_slice(&10u32.to_be_bytes());
    bad_magic.extend_from_slice(&[0x41; 10 + MAC_LEN]);
    // Before its Hello a stream may send only a small frame (HANDSHAKE_FRAME_MAX): a body
    // of 1 KiB that is no envelope is read and refused as malformed; one of 1 MiB is
    // refused from its header.
    let mut junk_kib = b"DFIB\x01\x03\x00\x00".to_vec();
    junk_kib.extend_from_slice(&1024u32.to_be_bytes());
    junk_kib.resize(FRAME_HEADER_LEN + 1024 + MAC_LEN, b'{');
    let mut junk_mib = b"DFIB\x01\x03\x00\x00".to_vec();
    junk_mib.extend_from_slice(&(MAX_FRAME_BODY_LEN as u32).to_be_bytes());
    junk_mib.resize(FRAME_HEADER_LEN + MAX_FRAME_BODY_LEN + MAC_LEN, b'{');

    let before = siege.scrape();
    let (rss0, fds0) = (rss_kib(siege.pid()), open_fds(siege.pid()));
    let mut rss_peak = rss0;
    let (statuses, watch) = watching_hosts(&siege.lab, &HOSTS, Duration::from_millis(200), || {
        for p in 0..2 {
            let socket = siege.attacker.udp(p);
            let half: Vec<Vec<u8>> = datagrams.iter().skip(p).step_by(2).cloned().collect();
            send_all(&socket, p, &half);
            assert_no_ack(&socket, Duration::from_millis(300));
        }
        // Inside TLS (the event port speaks nothing else): headers declaring more
        // than 1 MiB, then 2 MiB behind them.
        for len in oversize_lengths {
            for _ in 0..4 {
                let mut c = siege.event_stream(false);
                let mut header = b"DFIB\x01\x03\x00\x00".to_vec();
                header.extend_from_slice(&len.to_be_bytes());
                c.write(&header).expect("send a header");
                let chunk = vec![0x42u8; 64 << 10];
                for _ in 0..32 {
                    if c.write(&chunk).is_err() {
                        break;
                    }
                }
                assert!(
                    c.wait_closed(Duration::from_secs(5)),
                    "a header declaring {len} bytes did not end its stream"
                );
            }
        }
        // A Hello cut short, then the TLS session ended (close_notify).
        for cut in cuts {
            let mut c = siege.event_stream(true);
            c.write(&hello0[..cut]).expect("send a cut frame");
            c.finish();
            assert!(
                c.wait_closed(Duration::from_secs(5)),
                "s_client did not end"
            );
        }
        // A Hello cut short, and the connection left open.
        for cut in open_cuts {
            let mut c = siege.event_stream(false);
            c.write(&hello0[..cut]).expect("send a cut frame");
            let t = Instant::now();
            let closed = c.wait_closed(Duration::from_millis(HANDSHAKE_MS + 3000));
            let took = t.elapsed();
            assert!(closed, "a frame cut at {cut} held its stream open");
            assert!(
                took >= Duration::from_millis(HANDSHAKE_MS - 200),
                "closed before the handshake timeout: {took:?}"
            );
            println!("a frame cut at {cut} and left open: closed after {took:?}");
        }
        // Another magic; bodies of 1 KiB and of exactly 1 MiB that are no envelope.
        for garbage in [&bad_magic, &junk_kib, &junk_mib] {
            let (_, closed) = siege.send_in_stream(garbage, Duration::from_secs(5));
            assert!(closed, "garbage did not end its stream");
        }
        // Outside TLS: a frame header declaring 2 MiB, twice; a TLS record cut short.
        let to = SocketAddrV4::new(controller(0), EVENT_PORT);
        for _ in 0..2 {
            let mut s = siege.attacker.connect(to).expect("connect");
            let mut header = b"DFIB\x01\x03\x00\x00".to_vec();
            header.extend_from_slice(&(2u32 << 20).to_be_bytes());
            let _ = s.write_all(&header);
            let (_, closed) = read_until_closed(&mut s, Duration::from_secs(3));
            assert!(closed, "a plain frame header did not end its stream");
        }
        let mut s = siege.attacker.connect(to).expect("connect");
        s.write_all(&cut_tls_record())
            .expect("send a cut TLS record");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let (_, closed) = read_until_closed(&mut s, Duration::from_secs(3));
        assert!(closed, "a cut TLS record held its stream");
        rss_peak = rss_peak.max(rss_kib(siege.pid()));
        // The API: bodies over 64 KiB (declared, and chunked) behind a valid request
        // that would put h0 into maintenance; TLS records cut short.
        let big = siege.lab.path("big-body.json");
        let mut body = br#"{"on":true}"#.to_vec();
        body.resize(70 << 10, b' ');
        std::fs::write(&big, &body).unwrap();
        let data = format!("@{}", big.display());
        let mut statuses = BTreeMap::<u16, usize>::new();
        for chunked in [false, true] {
            for _ in 0..3 {
                let mut extra = vec![
                    "-H",
                    "Content-Type: application/json",
                    "--data-binary",
                    &data,
                ];
                if chunked {
                    extra.extend(["-H", "Transfer-Encoding: chunked"]);
                }
                let status = siege.curl("PUT", "/v1/hosts/h0/maintenance", Some(TOKEN), &extra);
                *statuses.entry(status).or_default() += 1;
            }
        }
        let api = SocketAddrV4::new(controller(0), API_PORT);
        for _ in 0..3 {
            let mut s = siege.attacker.connect(api).expect("connect to the API");
            s.write_all(&cut_tls_record())
                .expect("send a cut TLS record");
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5));
            assert!(closed, "a cut TLS record held its connection");
        }
        statuses
    });
    std::thread::sleep(Duration::from_millis(300));
    let after = siege.scrape();
    let mut expected = expected_hb.clone();
    expected.insert(
        frame_series("oversize"),
        4 * oversize_lengths.len() as i64 + 1,
    );
    expected.insert(frame_series("read_failed"), cuts.len() as i64);
    expected.insert(frame_series("handshake_timeout"), open_cuts.len() as i64);
    expected.insert(frame_series("bad_magic"), 1);
    expected.insert(frame_series("malformed"), 1);
    expected.insert(frame_series("tls_handshake"), 3);
    let expected: Vec<(&str, i64)> = expected.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let changes = assert_rejections(
        "truncated and oversized",
        &siege,
        &before,
        &after,
        &expected,
    );
    println!(
        "{} truncated or oversized datagrams and {} frames refused, counted: {changes:?}",
        datagrams.len(),
        4 * oversize_lengths.len() + cuts.len() + open_cuts.len() + 3 + 3
    );
    println!("API bodies over 64 KiB: answers by status {statuses:?}; 3 cut TLS records closed");
    assert_eq!(
        statuses,
        BTreeMap::from([(413, 6)]),
        "bodies over 64 KiB must get 413"
    );
    assert_eq!(
        siege.curl("GET", "/healthz", None, &[]),
        200,
        "the API stopped answering"
    );
    assert_eq!(
        siege.lab.state_of("h0"),
        "Up",
        "a body over the limit was taken"
    );
    assert_always_up("truncated and oversized", &siege, &watch);
    siege.assert_no_incident_about_the_real_hosts();
    let (rss1, fds1) = (rss_kib(siege.pid()), open_fds(siege.pid()));
    println!(
        "truncated and oversized: controller RSS {rss0} KiB -> peak {rss_peak} -> {rss1} KiB, \
         descriptors {fds0} -> {fds1}"
    );
    assert!(
        rss_peak.max(rss1) < rss0 + RSS_BOUND_KIB,
        "RSS grew from {rss0} to {rss_peak} KiB"
    );
    assert!(fds1 <= fds0 + 2, "descriptors grew from {fds0} to {fds1}");
}

/// One attacking connection of the slowloris test.
struct Loris {
    source: Ipv4Addr,
    stream: TcpStream,
    /// Sends a byte every [`DRIP_EVERY`] instead of nothing.
    drips: bool,
    sent: usize,
    closed_after: Option<Duration>,
}

const DRIP_EVERY: Duration = Duration::from_millis(100);

#[test]
fn slowloris_streams_past_eight_per_source_are_refused_at_accept_and_the_rest_closed_at_the_handshake_timeout(
) {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const SOURCES: usize = 16;
    // `[intake] stream_connections_per_source`, the default.
    const PER_SOURCE: usize = 8;
    const EXTRA: usize = 4;
    let siege = Siege::start(SOURCES, false);
    let sources: Vec<Ipv4Addr> = (0..SOURCES).map(|i| siege.attacker.source(i)).collect();
    // What the dripping ones send, a byte at a time: the start of a TLS handshake
    // record, which never ends.
    let drip = cut_tls_record();
    let to = SocketAddrV4::new(controller(0), EVENT_PORT);
    let pid = siege.pid();
    let before = siege.scrape();
    let (rss0, fds0) = (rss_kib(pid), open_fds(pid));

    let ((conns, connect_took, fds_peak, rss_peak), watch) =
        watching_hosts(&siege.lab, &HOSTS, Duration::from_millis(200), || {
            let began = Instant::now();
            let opened = siege
                .attacker
                .connect_many(&sources, PER_SOURCE + EXTRA, to);
            let connect_took = began.elapsed();
            let mut conns: Vec<Loris> = opened
                .into_iter()
                .enumerate()
                .map(|(i, (source, s))| {
                    let stream = s.expect("the TCP handshake completes, even when refused");
                    stream.set_nonblocking(true).unwrap();
                    Loris {
                        source,
                        stream,
                        drips: i % 2 == 1,
                        sent: 0,
                        closed_after: None,
                    }
                })
                .collect();
            let (mut fds_peak, mut rss_peak) = (0, 0);
            let mut next_drip = Instant::now();
            let mut buf = [0u8; 4096];
            while conns.iter().any(|c| c.closed_after.is_none())
                && began.elapsed() < Duration::from_millis(HANDSHAKE_MS + 4000)
            {
                let drip_now = Instant::now() >= next_drip;
                if drip_now {
                    next_drip += DRIP_EVERY;
                }
                for c in conns.iter_mut().filter(|c| c.closed_after.is_none()) {
                    let mut closed = match c.stream.read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    };
                    if !closed && c.drips && drip_now {
                        let byte = [drip[c.sent % drip.len()]];
                        closed = c.stream.write(&byte).is_err();
                        c.sent += 1;
                    }
                    if closed {
                        c.closed_after = Some(began.elapsed());
                    }
                }
                fds_peak = fds_peak.max(open_fds(pid));
                rss_peak = rss_peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            (conns, connect_took, fds_peak, rss_peak)
        });
    std::thread::sleep(Duration::from_millis(300));
    let after = siege.scrape();
    let (rss1, fds1) = (rss_kib(pid), open_fds(pid));

    // Per source: 8 held until the handshake timeout, the rest closed at once.
    let handshake = Duration::from_millis(HANDSHAKE_MS);
    let mut held_for = Vec::new();
    for source in &sources {
        let mine: Vec<&Loris> = conns.iter().filter(|c| c.source == *source).collect();
        let times: Vec<Duration> = mine
            .iter()
            .map(|c| {
                c.closed_after
                    .expect("a slowloris connection was never closed")
            })
            .collect();
        let held: Vec<&Duration> = times.iter().filter(|t| **t >= handshake / 2).collect();
        assert_eq!(
            (held.len(), times.len() - held.len()),
            (PER_SOURCE, EXTRA),
            "{source}: connections held and refused at accept (closed after {times:?})"
        );
        for t in held {
            assert!(
                *t >= handshake - Duration::from_millis(100)
                    && *t < handshake + Duration::from_millis(2000),
                "{source}: a held connection closed after {t:?}, not at the handshake timeout"
            );
            held_for.push(*t);
        }
    }
    let dripped: usize = conns.iter().map(|c| c.sent).sum();
    held_for.sort();
    let n_held = (SOURCES * PER_SOURCE) as i64;
    let n_refused = (SOURCES * EXTRA) as i64;
    let changes = assert_rejections(
        "slowloris",
        &siege,
        &before,
        &after,
        &[
            (&frame_series("handshake_timeout"), n_held),
            (&frame_series("connections_per_source"), n_refused),
        ],
    );
    println!(
        "slowloris: {} connections from {SOURCES} addresses opened in {connect_took:?} (half \
         silent, half sending {dripped} bytes one at a time): {n_held} held and closed after \
         {:?}..{:?}, {n_refused} refused at accept; counted {changes:?}",
        conns.len(),
        held_for.first().unwrap(),
        held_for.last().unwrap()
    );
    println!(
        "slowloris: controller descriptors {fds0} -> peak {fds_peak} -> {fds1}, RSS {rss0} KiB \
         -> peak {rss_peak} -> {rss1} KiB"
    );
    assert!(
        fds_peak >= fds0 + n_held as usize * 9 / 10,
        "the held connections were not held ({fds0} -> {fds_peak})"
    );
    assert!(
        fds1 <= fds0 + 2,
        "descriptors did not come back: {fds0} -> {fds1}"
    );
    assert!(
        rss_peak.max(rss1) < rss0 + RSS_BOUND_KIB,
        "RSS grew from {rss0} to {rss_peak} KiB"
    );
    assert_always_up("slowloris", &siege, &watch);
    siege.assert_no_incident_about_the_real_hosts();

    // The real hosts' streams still carry events: a qemu appears on h0.
    let received = after.get("defib_events_received_total");
    let _vm = FakeQemu::start_in(
        Some(&siege.lab.net.host_ns(0)),
        &fake_qemu_name(0),
        "adv-after-loris",
        "adadadad-0000-4000-8000-000000000002",
        &[],
    );
    wait_for(
        "h0's event stored after the slowloris",
        Duration::from_secs(20),
        || siege.scrape().get("defib_events_received_total") > received,
    );
}

/// (InErrors, RcvbufErrors) of UDP in namespace `ns` (/proc/net/snmp).
fn udp_errors(lab: &Lab, ns: &str) -> (u64, u64) {
    let out = lab
        .net
        .command_in(ns, std::path::Path::new("cat"))
        .arg("/proc/net/snmp")
        .output()
        .expect("read /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let names: Vec<&str> = udp[0].split_whitespace().collect();
    let values: Vec<u64> = udp[1]
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |name: &str| {
        names
            .iter()
            .skip(1)
            .position(|n| *n == name)
            .map_or(0, |i| values[i])
    };
    (get("InErrors"), get("RcvbufErrors"))
}

/// Packets the kernel's input queues dropped, all CPUs (/proc/net/softnet_stat).
fn softnet_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum()
}

#[test]
fn a_flood_of_fifty_thousand_heartbeats_a_second_from_one_address_is_cut_to_its_rate_and_no_real_host_is_suspected(
) {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const RATE: u64 = 50_000;
    const FLOOD: Duration = Duration::from_secs(3);
    let siege = Siege::start(0, false);
    let pid = siege.pid();
    // Forged heartbeats: h0 signed with a wrong key, and a host nobody enrolled.
    let wrong = Key::new(b"not-any-key-of-this-cluster-0123").unwrap();
    let k9 = siege.key("h9");
    let pool: Vec<Vec<u8>> = (1..=2000)
        .map(|seq| match seq % 2 {
            0 => heartbeat(CLUSTER, "h0", seq, 0, &wrong),
            _ => heartbeat(CLUSTER, "h9", seq, 0, &k9),
        })
        .collect();
    let socket = siege.attacker.udp(0);
    socket
        .connect(SocketAddrV4::new(controller(0), HEARTBEAT_PORT))
        .unwrap();
    let ctl_ns = siege.lab.net.controller_ns();
    let before = siege.scrape();
    let (udp0, drops0) = (udp_errors(&siege.lab, &ctl_ns), softnet_drops());
    let (rss0, fds0) = (rss_kib(pid), open_fds(pid));

    let ((sent, refused_by_kernel, took, rss_peak), watch) =
        watching_hosts(&siege.lab, &HOSTS, Duration::from_millis(250), || {
            let began = Instant::now();
            let (mut sent, mut refused, mut rss_peak) = (0u64, 0u64, rss0);
            let mut next_sample = began;
            while began.elapsed() < FLOOD {
                let due = (began.elapsed().as_secs_f64() * RATE as f64) as u64;
                while sent + refused < due {
                    match socket.send(&pool[((sent + refused) % pool.len() as u64) as usize]) {
                        Ok(_) => sent += 1,
                        Err(_) => refused += 1,
                    }
                }
                if Instant::now() >= next_sample {
                    rss_peak = rss_peak.max(rss_kib(pid));
                    next_sample += Duration::from_millis(100);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (sent, refused, began.elapsed(), rss_peak)
        });
    std::thread::sleep(Duration::from_millis(500));
    let after = siege.scrape();
    let udp1 = udp_errors(&siege.lab, &ctl_ns);
    let lost = (udp1.1 - udp0.1) + (softnet_drops() - drops0);
    let (rss1, fds1) = (rss_kib(pid), open_fds(pid));
    assert_no_ack(&socket, Duration::from_millis(200));

    let over_rate = after.heartbeats_rejected("source_over_rate")
        - before.heartbeats_rejected("source_over_rate");
    let bad_mac = after.heartbeats_rejected("bad_mac") - before.heartbeats_rejected("bad_mac");
    let unknown =
        after.heartbeats_rejected("unknown_host") - before.heartbeats_rejected("unknown_host");
    let counted = over_rate + bad_mac + unknown;
    let changes = after.rejections_since(&before);
    println!(
        "flood: {sent} forged datagrams in {took:?} ({:.0}/s; {refused_by_kernel} refused by the \
         sender's kernel), {lost} dropped by the controller's kernel queues, {counted} judged and \
         refused by the controller: {changes:?}",
        sent as f64 / took.as_secs_f64()
    );
    println!(
        "flood: controller RSS {rss0} KiB -> peak {rss_peak} -> {rss1} KiB, descriptors {fds0} -> {fds1}"
    );
    assert!(
        sent as f64 >= RATE as f64 * FLOOD.as_secs_f64() * 0.5,
        "the flood was too slow to mean anything: {sent} in {took:?}"
    );
    assert!(
        changes.keys().all(|k| [
            hb_series("source_over_rate"),
            hb_series("bad_mac"),
            hb_series("unknown_host")
        ]
        .contains(k)),
        "other refusals moved: {changes:?}"
    );
    assert!(
        counted <= sent && counted + lost >= sent,
        "every datagram that reached the socket must be refused and counted: sent {sent}, lost \
         {lost}, counted {counted}"
    );
    // What the per-source bucket let through to the MAC check: its burst, then its rate.
    let allowed = BURST_PER_SOURCE + (RATE_PER_SOURCE as f64 * (took.as_secs_f64() + 0.6)) as u64;
    assert!(
        bad_mac + unknown <= allowed,
        "{} datagrams passed the per-source limit, at most {allowed} may",
        bad_mac + unknown
    );
    assert!(
        over_rate + allowed >= sent - lost,
        "too few refused over the rate: {over_rate}"
    );
    assert!(
        rss_peak.max(rss1) < rss0 + RSS_BOUND_KIB,
        "RSS grew from {rss0} to {rss_peak} KiB"
    );
    assert!(fds1 <= fds0 + 2, "descriptors grew from {fds0} to {fds1}");
    assert_always_up("flood", &siege, &watch);
    siege.assert_no_incident_about_the_real_hosts();
}

#[test]
fn streams_that_never_say_hello_cannot_make_the_controller_hold_a_mebibyte_each() {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const SOURCES: usize = 12;
    // `[intake] stream_connections_per_source`, the default.
    const PER_SOURCE: usize = 8;
    // The default handshake timeout: what an attacker has to fill buffers in.
    let siege = Siege::start_with(SOURCES, false, 10_000);
    let to = SocketAddrV4::new(controller(0), EVENT_PORT);
    let ca = siege.lab.ca_file();
    let pid = siege.pid();
    let before = siege.scrape();
    let rss0 = rss_kib(pid);
    // Every connection: TLS (anyone may), a frame header declaring the largest body
    // allowed, then all of that body but its last byte, and nothing more. No Hello.
    let mut almost = b"DFIB\x01\x03\x00\x00".to_vec();
    almost.extend_from_slice(&(MAX_FRAME_BODY_LEN as u32).to_be_bytes());
    almost.resize(FRAME_HEADER_LEN + MAX_FRAME_BODY_LEN + MAC_LEN - 1, b' ');
    let began = Instant::now();
    let mut clients: Vec<TlsClient> = (0..SOURCES)
        .flat_map(|i| std::iter::repeat_n(siege.attacker.source(i), PER_SOURCE))
        .map(|from| siege.attacker.tls(from, to, &ca, false))
        .collect();
    // The controller may close a stream as soon as its header declares more than a
    // Hello may be: a write that then fails is that refusal.
    let mut refused_while_sending = 0;
    for c in &mut clients {
        if c.write(&almost).is_err() {
            refused_while_sending += 1;
        }
    }
    println!("{refused_while_sending} streams were closed while their frame was being sent");
    let sent_in = began.elapsed();
    let mut rss_held = 0;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        rss_held = rss_held.max(rss_kib(pid));
    }
    let n = clients.len();
    println!(
        "{n} TLS streams from {SOURCES} addresses sent {} MiB of unfinished frames and no Hello \
         in {sent_in:?}: controller RSS {rss0} KiB -> {rss_held} KiB",
        (n * almost.len()) >> 20
    );
    drop(clients);
    std::thread::sleep(Duration::from_millis(500));
    let after = siege.scrape();
    let changes = after.rejections_since(&before);
    println!(
        "then closed: {changes:?}, controller RSS {} KiB",
        rss_kib(pid)
    );
    assert_eq!(
        changes.values().sum::<i64>(),
        n as i64,
        "every stream must be refused and counted once: {changes:?}"
    );
    assert!(
        rss_held < rss0 + RSS_BOUND_KIB,
        "{n} streams that never said Hello made the controller hold {} MiB more \
         (controller/src/runtime/intake/streams.rs: before the Welcome only \
         HANDSHAKE_FRAME_MAX may be announced)",
        (rss_held - rss0) >> 10
    );
}

#[test]
fn the_handshake_timeout_counts_from_accept_so_a_slow_tls_handshake_does_not_extend_it() {
    require!(requirements(), "{REQUIREMENTS}");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let siege = Siege::start(0, false);
    let before = siege.scrape();
    // A relay on the attacker's machine holds the client's TLS handshake for 80 % of the
    // handshake timeout; the TLS client then says nothing.
    let delay = Duration::from_millis(HANDSHAKE_MS * 8 / 10);
    let relay = Relay::start(
        &siege.attacker,
        17_411,
        SocketAddrV4::new(controller(0), EVENT_PORT),
        delay,
    );
    let mut c = siege.attacker.tls(
        siege.attacker.addr(0),
        relay.listen,
        &siege.lab.ca_file(),
        false,
    );
    assert!(
        c.wait_closed(Duration::from_millis(3 * HANDSHAKE_MS + 2000)),
        "the silent stream was never closed"
    );
    std::thread::sleep(Duration::from_millis(200));
    let held = relay
        .upstream_closed_after()
        .expect("the relay saw the controller close");
    let after = siege.scrape();
    let changes = after.rejections_since(&before);
    println!(
        "a TLS handshake held back {delay:?}, then no Hello: the controller closed the stream \
         {held:?} after accepting it (handshake timeout {HANDSHAKE_MS} ms); counted {changes:?}"
    );
    assert_eq!(
        changes,
        BTreeMap::from([(frame_series("handshake_timeout"), 1)]),
        "the silent stream must be counted once"
    );
    assert!(
        held < Duration::from_millis(HANDSHAKE_MS + 400),
        "the controller held a stream without a Hello {held:?} from its accept, past its \
         handshake timeout of {HANDSHAKE_MS} ms: the deadline starts again after the TLS \
         handshake (controller/src/runtime/intake/streams.rs, EventConnection::run)"
    );
}
