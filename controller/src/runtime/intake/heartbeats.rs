//! Judging heartbeat datagrams: authentic and fresh ones are acked, and at most one per
//! host and path per `forward_every_ms` goes on to the engine task, each batch's in one
//! message stamped with when each datagram reached the kernel.
//!
//! Each enrolled host signs with its own key (`protocol::HostKeys`); a source address
//! over its rate is dropped before any MAC is computed ([`super::limiter`]). Only a
//! heartbeat that echoes this process's session is a sign of life (protocol::heartbeat,
//! "Freshness"): one that does not is acked without the "counts" flag, so the watchdog
//! learns the session, and is not forwarded to the engine.
//!
//! Acks are paced (protocol::ack, "Pacing"): a host and path gets at most one per the
//! ack period its heartbeats ask for, the newest heartbeat arriving once it has passed
//! being the one acked, and at once when the ack's "counts" flag would change (a session
//! to teach, a follower turned leader) or a watchdog run starts. The host's key is looked
//! up once per datagram, to verify it and to sign its ack. A heartbeat of a layout
//! version this controller does not take is counted (`old_version`, or `bad_version` for
//! a newer one), answered with a refusal naming the version it takes and logged, each at
//! most so often per source address ([`super::refusals`]).
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use protocol::{Ack, Freshness, HeartbeatReceiver, Key, RejectReason};

use super::limiter::{Limited, SourceLimiter};
use super::refusals::Refusals;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{HeartbeatSeen, Intake};
use crate::metrics::{Labels, Metrics};

/// Shared by the UDP sockets: one replay guard per host across every path (a watchdog
/// numbers its heartbeats with one counter over all paths).
pub struct HeartbeatIntake {
    state: Mutex<IntakeState>,
    /// This process's session, put in every ack (0 when the receiver checks none).
    session: u64,
    controller_id: String,
    /// Forward at most one heartbeat per host and path per this many ms to the engine:
    /// the detector's resolution needs no more, and the engine's load stays bounded
    /// whatever the datagram rate. Acks are paced on their own (see the module docs).
    forward_every_ms: u64,
    tx: mpsc::Sender<Intake>,
    /// Each socket thread resolves its own [`IntakeCounters`] from these.
    pub(super) metrics: Arc<Metrics>,
    /// The throttle's clock: monotonic, so a wall clock stepped back does not stop
    /// forwarding (the engine would then suspect every host).
    started: Instant,
    /// Whether acks carry the "counts" flag. Only a controller that acts says so: a
    /// watchdog's counting acks say "a controller that can restore your VMs hears you",
    /// and its self-fence counts from their loss. A follower still takes heartbeats in
    /// (its detector stays warm for a takeover) and acks them without the flag, so that
    /// the watchdog learns its session and its heartbeats prove life to it too.
    acking: Arc<AtomicBool>,
}

/// One received datagram: its bytes, who sent it, and when it reached this host (the
/// kernel's receive stamp when the socket gives one, else when it was read).
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    pub bytes: &'a [u8],
    pub peer: SocketAddr,
    pub received: Instant,
}

/// The two clocks one batch is judged by.
#[derive(Debug, Clone, Copy)]
struct BatchTime {
    /// Unix ns, for the acks (what the watchdog logs as the controller's time).
    wall_ns: u64,
    /// Monotonic ms since the intake started, for the forwarding throttle, the ack
    /// pacing and the refusals' rate.
    mono_ms: u64,
}

struct IntakeState {
    receiver: HeartbeatReceiver,
    limiter: SourceLimiter,
    refusals: Refusals,
    /// Per host, per path index: when a heartbeat was last forwarded (monotonic ms since
    /// the intake started). Looked up by `&str`, so a known host costs no allocation.
    last_forwarded_ms: HashMap<String, Vec<(u8, u64)>>,
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The heartbeat intake's labelled counters, resolved once per socket thread: the hot path
/// increments plain counters and never builds a label set or looks one up. A labelled
/// counter is created on its first use, so /metrics shows only what happened.
pub struct IntakeCounters {
    metrics: Arc<Metrics>,
    rejected: Vec<(&'static str, Counter)>,
    /// By path index.
    received: Vec<Option<Counter>>,
    /// Acks sent, not counting and counting.
    acks: [Option<Counter>; 2],
}

impl IntakeCounters {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            rejected: Vec::new(),
            received: vec![None; 256],
            acks: [None, None],
        }
    }

    fn acked(&mut self, counts: bool) {
        let family = &self.metrics.heartbeat_acks;
        let slot = &mut self.acks[usize::from(counts)];
        labelled(slot, family, "counts", counts).inc();
    }

    fn reject(&mut self, reason: &'static str) {
        self.reject_n(reason, 1);
    }

    fn reject_n(&mut self, reason: &'static str, n: u64) {
        if let Some((_, c)) = self.rejected.iter().find(|(r, _)| *r == reason) {
            c.inc_by(n);
            return;
        }
        let c = self
            .metrics
            .heartbeats_rejected
            .get_or_create(&Metrics::label("reason", reason))
            .clone();
        c.inc_by(n);
        self.rejected.push((reason, c));
    }

    fn received(&mut self, path: u8) {
        let family = &self.metrics.heartbeats_received;
        let slot = &mut self.received[usize::from(path)];
        labelled(slot, family, "path", path).inc();
    }
}

/// `family`'s counter for `key = value`, kept in `slot` from its first use on.
fn labelled<'a>(
    slot: &'a mut Option<Counter>,
    family: &Family<Labels, Counter>,
    key: &str,
    value: impl ToString,
) -> &'a Counter {
    slot.get_or_insert_with(|| {
        family
            .get_or_create(&Metrics::label(key, value.to_string()))
            .clone()
    })
}

/// Limits on what one source address may send to the heartbeat port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRate {
    /// Datagrams per second per source address, on average (0: no limit).
    pub per_s: u64,
    /// How many may come at once.
    pub burst: u64,
}

impl SourceRate {
    /// No limit (tests, benches that send every host from one address).
    pub const UNLIMITED: SourceRate = SourceRate { per_s: 0, burst: 1 };
}

impl HeartbeatIntake {
    /// An intake judging with `receiver` (per-host keys and a session in the daemon; one
    /// shared key in tests).
    pub fn new(
        receiver: HeartbeatReceiver,
        rate: SourceRate,
        controller_id: &str,
        forward_every_ms: u64,
        tx: mpsc::Sender<Intake>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            session: receiver.session().unwrap_or(0),
            state: Mutex::new(IntakeState {
                receiver,
                limiter: SourceLimiter::new(rate.per_s, rate.burst),
                refusals: Refusals::default(),
                last_forwarded_ms: HashMap::new(),
            }),
            controller_id: controller_id.to_string(),
            forward_every_ms,
            tx,
            metrics,
            started: Instant::now(),
            acking: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Makes the enrolled hosts exactly `hosts`: a revoked host's replay state goes, and
    /// its heartbeats are refused as `unknown_host` from the next datagram on.
    pub fn set_enrolled(&self, hosts: &[String]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = st
            .receiver
            .host_keys_mut()
            .map(|k| k.enrolled())
            .unwrap_or_default();
        if let Some(keys) = st.receiver.host_keys_mut() {
            keys.set_enrolled(hosts.iter().map(String::as_str));
        }
        let now: std::collections::HashSet<&str> = hosts.iter().map(String::as_str).collect();
        for gone in before.iter().filter(|h| !now.contains(h.as_str())) {
            st.receiver.forget_host(gone);
            st.last_forwarded_ms.remove(gone);
        }
    }

    /// The key an enrolled host signs with (for its event stream).
    pub fn key_for(&self, host: &str) -> Option<Key> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.receiver.key_for(host).cloned()
    }

    /// The switch that turns acking on (leader, or a single controller: the default)
    /// and off (follower).
    pub fn acking(&self) -> Arc<AtomicBool> {
        self.acking.clone()
    }

    /// Handles one datagram: true, with the reply to send (an ack, or a refusal) in
    /// `ack`, if one is due.
    pub fn handle(&self, datagram: &[u8], peer: SocketAddr, ack: &mut Vec<u8>) -> bool {
        let mut counters = IntakeCounters::new(self.metrics.clone());
        let mut accepted = [false];
        self.handle_batch(
            &[Datagram {
                bytes: datagram,
                peer,
                received: Instant::now(),
            }],
            std::slice::from_mut(ack),
            &mut accepted,
            &mut counters,
        );
        accepted[0]
    }

    /// Judges a batch of datagrams under one acquisition of the lock. For each datagram
    /// `i`, `accepted[i]` says whether a reply is due, and `acks[i]` then holds it: the
    /// signed ack of an accepted heartbeat whose ack is due by the pacing, or the
    /// refusal of a heartbeat of another version. Heartbeats due for the engine are
    /// forwarded after the lock is released. Returns how many were accepted as signs of
    /// life.
    pub fn handle_batch(
        &self,
        datagrams: &[Datagram<'_>],
        acks: &mut [Vec<u8>],
        accepted: &mut [bool],
        counters: &mut IntakeCounters,
    ) -> usize {
        let now = BatchTime {
            wall_ns: unix_ns(),
            mono_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        self.judge_batch(datagrams, acks, accepted, counters, now)
    }

    fn judge_batch(
        &self,
        datagrams: &[Datagram<'_>],
        acks: &mut [Vec<u8>],
        accepted: &mut [bool],
        counters: &mut IntakeCounters,
        now: BatchTime,
    ) -> usize {
        let now_ms = now.mono_ms;
        let acking = self.acking.load(Ordering::Relaxed);
        let mut n_accepted = 0;
        let mut forwards = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let IntakeState {
                receiver,
                limiter,
                refusals,
                last_forwarded_ms,
            } = &mut *st;
            for ((d, ack), ok) in datagrams.iter().zip(acks).zip(&mut *accepted) {
                let (datagram, peer) = (d.bytes, &d.peer);
                *ok = false;
                match limiter.allow(peer.ip(), now_ms) {
                    Ok(()) => {}
                    Err(Limited::OverRate) => {
                        counters.reject("source_over_rate");
                        continue;
                    }
                    Err(Limited::TooManySources) => {
                        counters.reject("too_many_sources");
                        continue;
                    }
                }
                let verdict = match receiver.receive_paced(datagram, now_ms, acking) {
                    Ok(a) => a,
                    Err(reason) => {
                        counters.reject(reason.as_str());
                        if matches!(reason, RejectReason::OldVersion | RejectReason::BadVersion) {
                            *ok = refuse(datagram, peer, now_ms, refusals, ack);
                            if *ok {
                                self.metrics.heartbeat_refusals.inc();
                            }
                        }
                        continue;
                    }
                };
                let hb = verdict.heartbeat;
                // Acked either way when due: an unproven heartbeat's ack only teaches the
                // session (its "counts" flag is clear), and a follower's never counts.
                if verdict.ack_due
                    && Ack::answering(&hb, &self.controller_id, now.wall_ns)
                        .with_session(self.session)
                        .counting(verdict.ack_counts)
                        .encode_into(&verdict.key, ack)
                        .is_ok()
                {
                    *ok = true;
                    counters.acked(verdict.ack_counts);
                }
                if !verdict.proven {
                    // Possibly recorded before this process started: no sign of life.
                    counters.reject("unproven_session");
                    continue;
                }
                n_accepted += 1;
                let new_epoch = !matches!(verdict.freshness, Freshness::Current);
                let paths = match last_forwarded_ms.get_mut(hb.host_id) {
                    Some(p) => p,
                    None => last_forwarded_ms
                        .entry(hb.host_id.to_owned())
                        .or_insert_with(|| Vec::with_capacity(1)),
                };
                let due = match paths.iter_mut().find(|(p, _)| *p == hb.path_index) {
                    Some((_, last)) => {
                        let due =
                            new_epoch || now_ms.saturating_sub(*last) >= self.forward_every_ms;
                        if due {
                            *last = now_ms;
                        }
                        due
                    }
                    None => {
                        paths.push((hb.path_index, now_ms));
                        true
                    }
                };
                if due {
                    forwards.push(HeartbeatSeen {
                        host: hb.host_id.to_string(),
                        path: hb.path_index,
                        peer: *peer,
                        boot_id: hb.boot_id,
                        incarnation: hb.incarnation,
                        sent_unix_ns: hb.sent_unix_ns,
                        status: hb.status,
                        received: d.received,
                    });
                }
            }
        }
        self.metrics.heartbeats_accepted.inc_by(n_accepted as u64);
        if forwards.is_empty() {
            return n_accepted;
        }
        for seen in &forwards {
            counters.received(seen.path);
        }
        // One message per batch: the engine's queue is bounded in messages, and a
        // message per heartbeat would cost the engine more in channel traffic than in
        // judging them.
        let n = forwards.len();
        if self.tx.try_send(Intake::Heartbeats(forwards)).is_err() {
            counters.reject_n("engine_busy", n as u64);
        }
        n_accepted
    }
}

/// A heartbeat of a layout version this controller does not take came from `peer`:
/// writes the refusal into `reply` and says whether to send it (at most one a second per
/// source address, and only if shorter than what it answers), and warns at most once a
/// minute per source address.
fn refuse(
    datagram: &[u8],
    peer: &SocketAddr,
    now_ms: u64,
    refusals: &mut Refusals,
    reply: &mut Vec<u8>,
) -> bool {
    let Some(seen) = protocol::refusal_for(datagram, reply) else {
        return false;
    };
    let answer = refusals.answer(peer.ip(), now_ms);
    if answer.warn {
        let takes = protocol::HEARTBEAT_VERSION;
        let which = if seen.version < takes {
            "an older watchdog: upgrade it"
        } else {
            "a newer watchdog: upgrade this controller"
        };
        tracing::warn!(
            %peer,
            claimed_host = seen.claimed_host_id.unwrap_or("?"),
            version = seen.version,
            takes,
            "heartbeat layout version {} refused from {peer} (claiming host {}): this \
             controller takes version {takes}, so that host is not heard here ({which}); \
             answered with a refusal at most once a second, logged at most once a minute",
            seen.version,
            seen.claimed_host_id.unwrap_or("?"),
        );
    }
    answer.reply && !reply.is_empty()
}

// The helpers that build heartbeats and an intake are crate-visible: the socket tests
// (`super::socket`) drive the same intake over a real socket.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use protocol::{decode_ack, encode_heartbeat, BootId, Heartbeat, HostStatus};

    const KEY: &[u8] = b"intake-test-key-0123456789abcdef";

    pub(crate) fn key() -> Key {
        Key::new(KEY).unwrap()
    }

    /// The ack period the test heartbeats ask for: a default watchdog's.
    pub(crate) const ACK_PERIOD_MS: u32 = 375;

    pub(crate) fn hb(host: &str, incarnation: u64, seq: u64, path: u8, key: &Key) -> Vec<u8> {
        encode_heartbeat(
            &Heartbeat {
                cluster_id: "t",
                host_id: host,
                boot_id: BootId([7; 16]),
                incarnation,
                sequence: seq,
                sent_unix_ns: 1,
                sent_mono_ns: seq,
                path_index: path,
                session: 0,
                ack_period_ms: ACK_PERIOD_MS,
                status: HostStatus::default(),
            },
            key,
        )
        .unwrap()
    }

    pub(crate) fn intake(
        forward_every_ms: u64,
        capacity: usize,
    ) -> (Arc<HeartbeatIntake>, mpsc::Receiver<Intake>, Arc<Metrics>) {
        let (tx, rx) = mpsc::channel(capacity);
        let metrics = Arc::new(Metrics::new());
        let i = HeartbeatIntake::new(
            HeartbeatReceiver::new(key(), "t"),
            SourceRate::UNLIMITED,
            "ctl",
            forward_every_ms,
            tx,
            metrics.clone(),
        );
        (i, rx, metrics)
    }

    fn forwarded(rx: &mut mpsc::Receiver<Intake>) -> Vec<(String, u8, u64)> {
        let mut out = Vec::new();
        while let Ok(Intake::Heartbeats(batch)) = rx.try_recv() {
            out.extend(batch.into_iter().map(|h| (h.host, h.path, h.incarnation)));
        }
        out
    }

    /// What one batch judged at monotonic `mono_ms` gave: for each datagram whether a
    /// reply is due and the reply, and how many were accepted as signs of life.
    struct Judged {
        replies: Vec<bool>,
        acks: Vec<Vec<u8>>,
        accepted: usize,
    }

    fn run_batch_at(i: &HeartbeatIntake, datagrams: &[Vec<u8>], mono_ms: u64) -> Judged {
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let batch: Vec<Datagram> = datagrams
            .iter()
            .map(|d| Datagram {
                bytes: d.as_slice(),
                peer,
                received: Instant::now(),
            })
            .collect();
        let mut acks = vec![Vec::new(); datagrams.len()];
        let mut replies = vec![true; datagrams.len()];
        let mut counters = IntakeCounters::new(i.metrics.clone());
        let now = BatchTime {
            wall_ns: 1,
            mono_ms,
        };
        let accepted = i.judge_batch(&batch, &mut acks, &mut replies, &mut counters, now);
        Judged {
            replies,
            acks,
            accepted,
        }
    }

    fn run_batch(i: &HeartbeatIntake, datagrams: &[Vec<u8>]) -> Judged {
        run_batch_at(i, datagrams, 0)
    }

    #[test]
    fn a_batch_acks_the_first_heartbeat_of_each_host_and_path_and_counts_refusals_by_reason() {
        let (i, mut rx, m) = intake(60_000, 16);
        let k = key();
        let forged = hb(
            "h1",
            5,
            2,
            0,
            &Key::new(b"another-key-0123456789abcdefghij").unwrap(),
        );
        let batch = vec![
            hb("h1", 5, 1, 0, &k),
            hb("h1", 5, 1, 0, &k), // replayed
            forged,
            hb("h1", 5, 3, 0, &k)[..20].to_vec(), // truncated
            hb("h2", 5, 1, 0, &k),
            hb("h1", 5, 2, 0, &k), // accepted, but h1's ack period has not passed
        ];
        let judged = run_batch(&i, &batch);
        assert_eq!(judged.replies, [true, false, false, false, true, false]);
        assert_eq!(judged.accepted, 3);
        for (n, seq, host) in [(0, 1, "h1"), (4, 1, "h2")] {
            let ack = decode_ack(&judged.acks[n], &k).expect("a valid ack");
            assert_eq!(
                (ack.host_id, ack.sequence, ack.controller_id),
                (host, seq, "ctl")
            );
        }
        assert!(
            m.encode()
                .contains("defib_heartbeat_acks_total{counts=\"true\"} 2"),
            "{}",
            m.encode()
        );
        assert_eq!(m.heartbeats_accepted.get(), 3);
        let text = m.encode();
        for reason in ["replayed", "bad_mac", "truncated"] {
            assert!(
                text.contains(&format!(
                    "defib_heartbeats_rejected_total{{reason=\"{reason}\"}} 1"
                )),
                "{text}"
            );
        }
        // h1's second accepted heartbeat came well within forward_every_ms.
        assert_eq!(
            forwarded(&mut rx),
            [("h1".to_string(), 0, 5), ("h2".to_string(), 0, 5)]
        );
        assert!(
            text.contains("defib_heartbeats_received_total{path=\"0\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn a_wall_clock_stepped_an_hour_back_does_not_stop_forwarding() {
        let (i, mut rx, _) = intake(100, 16);
        let k = key();
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let hour_ns = 3_600 * 1_000_000_000u64;
        let send = |seq: u64, wall_ns: u64, mono_ms: u64| {
            let d = hb("h1", 5, seq, 0, &k);
            let mut acks = vec![Vec::new()];
            let mut accepted = vec![false];
            let mut counters = IntakeCounters::new(i.metrics.clone());
            let now = BatchTime { wall_ns, mono_ms };
            let datagram = Datagram {
                bytes: &d,
                peer,
                received: Instant::now(),
            };
            let n = i.judge_batch(&[datagram], &mut acks, &mut accepted, &mut counters, now);
            assert_eq!(n, 1, "heartbeat {seq} is accepted");
        };
        send(1, 10 * hour_ns, 0);
        // The wall clock steps an hour back; monotonic time goes on.
        send(2, 9 * hour_ns, 150);
        send(3, 9 * hour_ns + 300_000_000, 450);
        assert_eq!(
            forwarded(&mut rx).len(),
            3,
            "every heartbeat a throttle period apart goes on to the engine"
        );
    }

    #[test]
    fn each_path_is_forwarded_on_its_own_and_a_new_incarnation_at_once() {
        let (i, mut rx, _) = intake(60_000, 16);
        let k = key();
        let batch = vec![
            hb("h1", 5, 1, 0, &k),
            hb("h1", 5, 2, 1, &k),
            hb("h1", 5, 3, 0, &k),
            hb("h1", 5, 4, 1, &k),
            hb("h1", 6, 1, 0, &k), // the watchdog restarted
        ];
        assert_eq!(run_batch(&i, &batch).accepted, 5);
        assert_eq!(
            forwarded(&mut rx),
            [
                ("h1".to_string(), 0, 5),
                ("h1".to_string(), 1, 5),
                ("h1".to_string(), 0, 6)
            ]
        );
        // With no rate limit every heartbeat goes through.
        let (i, mut rx, _) = intake(0, 16);
        run_batch(&i, &[hb("h1", 5, 1, 0, &k), hb("h1", 5, 2, 0, &k)]);
        assert_eq!(forwarded(&mut rx).len(), 2);
    }

    #[test]
    fn only_a_heartbeat_echoing_this_session_is_forwarded_and_acked_as_counting() {
        let master = protocol::MasterKey::new(b"intake master key 0123456789abcd").unwrap();
        let mut keys = protocol::HostKeys::new(master.clone());
        keys.enroll("h1");
        let (tx, mut rx) = mpsc::channel(16);
        let metrics = Arc::new(Metrics::new());
        let i = HeartbeatIntake::new(
            HeartbeatReceiver::per_host(keys, "t", 0x5e55),
            SourceRate::UNLIMITED,
            "ctl",
            0,
            tx,
            metrics.clone(),
        );
        let k = master.host_key("h1");
        let with_session = |seq: u64, session: u64| {
            let mut d = Vec::new();
            Heartbeat {
                cluster_id: "t",
                host_id: "h1",
                boot_id: BootId([7; 16]),
                incarnation: 5,
                sequence: seq,
                sent_unix_ns: 1,
                sent_mono_ns: seq,
                path_index: 0,
                session,
                ack_period_ms: ACK_PERIOD_MS,
                status: HostStatus::default(),
            }
            .encode_into(&k, &mut d)
            .unwrap();
            d
        };
        // Before the watchdog knows the session, then once it echoes it, 100 ms later:
        // both acked at once, the second counting.
        let first = run_batch_at(&i, &[with_session(1, 0)], 0);
        let second = run_batch_at(&i, &[with_session(2, 0x5e55)], 100);
        assert_eq!((first.replies[0], second.replies[0]), (true, true));
        let ack = decode_ack(&first.acks[0], &k).unwrap();
        assert_eq!((ack.session, ack.counts), (0x5e55, false));
        let ack = decode_ack(&second.acks[0], &k).unwrap();
        assert_eq!((ack.session, ack.counts), (0x5e55, true));
        assert_eq!(forwarded(&mut rx).len(), 1, "only the proven one");
        let text = metrics.encode();
        for line in [
            "defib_heartbeats_rejected_total{reason=\"unproven_session\"} 1",
            "defib_heartbeat_acks_total{counts=\"false\"} 1",
            "defib_heartbeat_acks_total{counts=\"true\"} 1",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        // A follower acks (at once, since its ack no longer counts), never counting.
        i.acking().store(false, Ordering::SeqCst);
        let judged = run_batch_at(&i, &[with_session(3, 0x5e55)], 200);
        assert!(judged.replies[0]);
        assert!(!decode_ack(&judged.acks[0], &k).unwrap().counts);
        // A revoked host is refused from the next datagram on.
        i.set_enrolled(&[]);
        let judged = run_batch_at(&i, &[with_session(4, 0x5e55)], 1_000);
        assert_eq!(judged.replies, [false]);
        assert!(metrics
            .encode()
            .contains("defib_heartbeats_rejected_total{reason=\"unknown_host\"} 1"));
    }

    #[test]
    fn each_host_and_path_is_acked_at_most_once_per_period_echoing_the_heartbeat_acked() {
        let (i, _rx, m) = intake(0, 1024);
        let k = key();
        let mut acked = Vec::new();
        // h1 sends every 100 ms on two paths (one sequence over both), asking 375 ms.
        for round in 0..10u64 {
            let batch = [
                hb("h1", 5, 2 * round + 1, 0, &k),
                hb("h1", 5, 2 * round + 2, 1, &k),
            ];
            let judged = run_batch_at(&i, &batch, round * 100);
            assert_eq!(judged.accepted, 2, "every heartbeat is a sign of life");
            for (n, reply) in judged.replies.iter().enumerate() {
                if *reply {
                    let ack = decode_ack(&judged.acks[n], &k).unwrap();
                    acked.push((round * 100, ack.path_index, ack.sequence));
                }
            }
        }
        // Once the ack period less a quarter (281 ms) has passed: at 0, 300, 600, 900.
        assert_eq!(
            acked,
            [
                (0, 0, 1),
                (0, 1, 2),
                (300, 0, 7),
                (300, 1, 8),
                (600, 0, 13),
                (600, 1, 14),
                (900, 0, 19),
                (900, 1, 20)
            ]
        );
        assert_eq!(m.heartbeats_accepted.get(), 20);
    }

    /// A heartbeat as a watchdog of layout `version` would send it: our preamble, the
    /// current layout's bytes behind it (what matters is that it is long and ours).
    fn of_version(version: u8, host: &str) -> Vec<u8> {
        let mut d = hb(host, 5, 1, 0, &key());
        d[4] = version;
        d
    }

    #[test]
    fn a_heartbeat_of_another_version_is_counted_and_answered_with_a_shorter_refusal_once_a_second()
    {
        let (i, mut rx, m) = intake(0, 16);
        let old: Vec<Vec<u8>> = (0..10).map(|_| of_version(3, "h1")).collect();
        let judged = run_batch_at(&i, &old, 0);
        assert_eq!(judged.accepted, 0);
        assert_eq!(
            judged.replies.iter().filter(|r| **r).count(),
            1,
            "one refusal per source per second"
        );
        let refusal = &judged.acks[0];
        assert!(refusal.len() < old[0].len(), "no amplification");
        let r = protocol::decode_refusal(refusal).expect("a refusal");
        assert_eq!(
            (r.refused_kind, r.refused_version, r.accepted_versions),
            (
                protocol::KIND_HEARTBEAT,
                3,
                &[protocol::HEARTBEAT_VERSION][..]
            )
        );
        let again = run_batch_at(&i, &old[..1], 999);
        assert_eq!(again.replies, [false]);
        let again = run_batch_at(&i, &old[..1], 1_000);
        assert_eq!(again.replies, [true]);
        // A newer watchdog's: refused too, counted as bad_version.
        let newer = run_batch_at(&i, &[of_version(9, "h1")], 2_000);
        assert_eq!(newer.replies, [true]);
        assert_eq!(
            protocol::decode_refusal(&newer.acks[0])
                .unwrap()
                .refused_version,
            9
        );
        let text = m.encode();
        for line in [
            "defib_heartbeats_rejected_total{reason=\"old_version\"} 12",
            "defib_heartbeats_rejected_total{reason=\"bad_version\"} 1",
            "defib_heartbeat_refusals_total 3",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        assert!(forwarded(&mut rx).is_empty());
    }

    #[test]
    fn a_flood_from_one_address_is_dropped_before_its_mac_is_checked() {
        let (tx, _rx) = mpsc::channel(16);
        let metrics = Arc::new(Metrics::new());
        let i = HeartbeatIntake::new(
            HeartbeatReceiver::new(key(), "t"),
            SourceRate {
                per_s: 10,
                burst: 5,
            },
            "ctl",
            0,
            tx,
            metrics.clone(),
        );
        let k = key();
        let batch: Vec<Vec<u8>> = (1..=20).map(|s| hb("h1", 5, s, 0, &k)).collect();
        assert_eq!(run_batch(&i, &batch).accepted, 5, "the burst");
        assert!(metrics
            .encode()
            .contains("defib_heartbeats_rejected_total{reason=\"source_over_rate\"} 15"));
    }

    #[test]
    fn a_full_engine_queue_is_counted_and_the_heartbeat_still_acked() {
        let (i, mut rx, m) = intake(60_000, 1);
        let k = key();
        let mut ack = Vec::new();
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        assert!(i.handle(&hb("h1", 5, 1, 0, &k), peer, &mut ack));
        assert!(i.handle(&hb("h2", 5, 1, 0, &k), peer, &mut ack));
        assert_eq!(decode_ack(&ack, &k).unwrap().host_id, "h2");
        assert_eq!(forwarded(&mut rx).len(), 1);
        assert_eq!(m.heartbeats_accepted.get(), 2);
        assert!(m
            .encode()
            .contains("defib_heartbeats_rejected_total{reason=\"engine_busy\"} 1"));
    }
}
