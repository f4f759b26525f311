//! Heartbeats to the controller over UDP, one socket per network path, and the acks
//! that tell the watchdog whether it is reachable.
//!
//! Every `heartbeat_interval` one datagram goes out on every path, each with the next
//! number of one sequence shared by all paths (the controller's replay window spans
//! paths). Each asks for an ack at most every [`ack_period_asked`] (an eighth of the
//! isolation timeout, never less than the interval), and the controller answers at
//! most that often on each path, always echoing the newest heartbeat it acks
//! (protocol::ack, "Pacing"). The watchdog is reachable as of the *send time of the
//! newest acked heartbeat* (`AckReceiver::newest_acked_send_mono_ns`), which a replayed
//! ack cannot move forward, and isolated once that is `isolation_timeout` old on every
//! path: acks arriving once a period instead of once a heartbeat change nothing to
//! that rule, only how many acks may be lost in a row before it bites (about seven).
//!
//! A controller that does not take this build's heartbeat version answers with a
//! refusal (protocol::refusal), logged as an error at most once a minute per path; so is
//! an ack of a version this build does not take.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::{
    decode_refusal, AckReceiver, Heartbeat, HostStatus, Key, RejectReason,
    DATAGRAM_RECV_BUFFER_LEN, HEARTBEAT_VERSION, KIND_REFUSAL,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::clock::Clock;
use super::status::HostSummary;
use super::{stopped, RunIdentity};

/// Whether the controller hears this watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// Just started: no ack yet, and the isolation timeout has not run out since the
    /// start.
    Unconfirmed,
    /// A heartbeat sent less than the isolation timeout ago was acked.
    Reachable,
    /// No heartbeat sent within the isolation timeout was acked, on any path.
    Isolated,
}

/// What the uplink publishes about reachability (a `tokio::sync::watch`).
///
/// Receivers are woken when `state` changes; the ack times are kept current in the
/// channel without waking anyone, so `borrow()` always shows the latest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReachabilityReport {
    /// Reachable, isolated, or not known yet.
    pub state: Reachability,
    /// Host monotonic time (ns) when the current state began.
    pub since_mono_ns: u64,
    /// Send time (host monotonic ns) of the newest heartbeat acked on any path.
    pub last_acked_send_mono_ns: Option<u64>,
    /// The same per path, indexed like `controller.heartbeat_addrs`.
    pub last_acked_send_mono_ns_by_path: Vec<Option<u64>>,
}

/// The reachability state machine, free of I/O: feed it acks and the time.
#[derive(Debug, Clone)]
pub struct ReachabilityTracker {
    timeout_ns: u64,
    started_mono_ns: u64,
    report: ReachabilityReport,
}

impl ReachabilityTracker {
    /// A tracker for `paths` paths, started at `now_mono_ns`.
    pub fn new(paths: usize, isolation_timeout: Duration, now_mono_ns: u64) -> Self {
        ReachabilityTracker {
            timeout_ns: u64::try_from(isolation_timeout.as_nanos()).unwrap_or(u64::MAX),
            started_mono_ns: now_mono_ns,
            report: ReachabilityReport {
                state: Reachability::Unconfirmed,
                since_mono_ns: now_mono_ns,
                last_acked_send_mono_ns: None,
                last_acked_send_mono_ns_by_path: vec![None; paths],
            },
        }
    }

    /// A valid ack answered the heartbeat sent at `sent_mono_ns` on `path_index`.
    pub fn on_ack(&mut self, path_index: u8, sent_mono_ns: u64) {
        let newer = |slot: &mut Option<u64>| *slot = Some(slot.unwrap_or(0).max(sent_mono_ns));
        newer(&mut self.report.last_acked_send_mono_ns);
        if let Some(slot) = self
            .report
            .last_acked_send_mono_ns_by_path
            .get_mut(usize::from(path_index))
        {
            newer(slot);
        }
    }

    /// Re-judges the state at `now_mono_ns`; returns `(from, to)` if it changed.
    pub fn evaluate(&mut self, now_mono_ns: u64) -> Option<(Reachability, Reachability)> {
        let next = if now_mono_ns >= self.isolation_deadline_mono_ns() {
            Reachability::Isolated
        } else if self.report.last_acked_send_mono_ns.is_some() {
            Reachability::Reachable
        } else {
            Reachability::Unconfirmed
        };
        let previous = self.report.state;
        (next != previous).then(|| {
            self.report.state = next;
            self.report.since_mono_ns = now_mono_ns;
            (previous, next)
        })
    }

    /// When the watchdog counts as isolated if no newer heartbeat is acked.
    pub fn isolation_deadline_mono_ns(&self) -> u64 {
        self.report
            .last_acked_send_mono_ns
            .unwrap_or(self.started_mono_ns)
            .saturating_add(self.timeout_ns)
    }

    /// The current report.
    pub fn report(&self) -> &ReachabilityReport {
        &self.report
    }
}

/// Which controller session to echo on each path: the one in the ack, heard on that path,
/// that answers the highest sequence (protocol::heartbeat, "Freshness"). Ordering by the
/// answered sequence, not by arrival, means a replayed old ack cannot set an old
/// session back (which would make this host's heartbeats prove nothing).
#[derive(Debug, Clone, Default)]
pub struct SessionEcho {
    /// Per path index: (answered sequence, session).
    by_path: Vec<(u64, u64)>,
}

impl SessionEcho {
    /// Nothing heard yet on any of `paths` paths.
    pub fn new(paths: usize) -> Self {
        SessionEcho {
            by_path: vec![(0, 0); paths],
        }
    }

    /// An authentic ack for this run arrived on `path`.
    pub fn on_ack(&mut self, path: u8, answered_sequence: u64, session: u64) {
        if let Some(slot) = self.by_path.get_mut(usize::from(path)) {
            if answered_sequence > slot.0 {
                *slot = (answered_sequence, session);
            }
        }
    }

    /// The session to echo on `path` (0: none heard yet).
    pub fn session(&self, path: usize) -> u64 {
        self.by_path.get(path).map_or(0, |(_, s)| *s)
    }
}

/// The ack period a watchdog asks for in its heartbeats, ms: an eighth of its
/// isolation timeout, so that about seven acks in a row may be lost before it counts
/// itself isolated, but never less than its heartbeat interval (it cannot be acked more
/// often than it sends). With an isolation timeout of at most eight intervals, that
/// is every heartbeat, as before acks were paced.
pub fn ack_period_asked(interval: Duration, isolation_timeout: Duration) -> u32 {
    let eighth = isolation_timeout / 8;
    u32::try_from(eighth.max(interval).as_millis()).unwrap_or(u32::MAX)
}

/// Logs each kind of complaint from the controller's side at most once a minute per
/// path: a controller that refuses this build's heartbeats refuses every one of them.
#[derive(Debug, Default)]
struct Complaints {
    last: std::collections::HashMap<(usize, &'static str), Instant>,
}

impl Complaints {
    /// Whether a complaint of `what` on `path` is due for logging now.
    fn due(&mut self, path: usize, what: &'static str) -> bool {
        let now = Instant::now();
        match self.last.get_mut(&(path, what)) {
            Some(last) if now - *last < COMPLAINT_LOG_INTERVAL => false,
            Some(last) => {
                *last = now;
                true
            }
            None => {
                self.last.insert((path, what), now);
                true
            }
        }
    }
}

/// What to log for a refusal datagram: `Ok` (an error) when it refuses this build's
/// heartbeat version, `Err` (for debug) when it is about something else or malformed.
fn refusal_complaint(datagram: &[u8]) -> Result<String, String> {
    let r = decode_refusal(datagram).map_err(|e| format!("malformed refusal: {e}"))?;
    if r.refused_kind != protocol::KIND_HEARTBEAT || r.refused_version != HEARTBEAT_VERSION {
        return Err(format!(
            "a refusal of something this watchdog did not send: {r}"
        ));
    }
    let speaks: Vec<String> = r.accepted_versions.iter().map(|v| v.to_string()).collect();
    Ok(format!(
        "controller refuses heartbeat version {HEARTBEAT_VERSION}; it speaks {}: this host is \
         not heard there (run one release of the controller and the watchdogs)",
        speaks.join(", ")
    ))
}

/// A refusal or an ack of another version is logged at most this often per path.
const COMPLAINT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Everything the heartbeat task needs.
pub(crate) struct HeartbeatTask {
    pub identity: RunIdentity,
    pub key: Key,
    /// The controller's address and a socket, per path; the index is the path index.
    pub paths: Vec<(SocketAddr, Arc<UdpSocket>)>,
    pub interval: Duration,
    /// What each heartbeat asks for ([`ack_period_asked`]).
    pub ack_period_ms: u32,
    pub tracker: ReachabilityTracker,
    pub status: watch::Receiver<HostSummary>,
    pub reachability: watch::Sender<ReachabilityReport>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<crate::metrics::WatchdogMetrics>,
}

/// Send errors on a path are logged at most this often (an unplugged network fails
/// every send).
const SEND_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl HeartbeatTask {
    /// Sends heartbeats and takes acks until `shutdown` turns true.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let (ack_tx, mut ack_rx) = mpsc::channel::<(usize, Vec<u8>)>(256);
        // Dropped when this task ends, which aborts the receivers.
        let mut receivers = JoinSet::new();
        for (index, (_, socket)) in self.paths.iter().enumerate() {
            receivers.spawn(receive_acks(index, socket.clone(), ack_tx.clone()));
        }
        drop(ack_tx);
        let mut acks = AckReceiver::new(
            self.key.clone(),
            self.identity.cluster_id.clone(),
            self.identity.host_id.clone(),
            self.identity.boot_id,
            self.identity.incarnation,
        );
        let mut sessions = SessionEcho::new(self.paths.len());
        let mut complaints = Complaints::default();
        let mut sequence = 0u64;
        let mut datagram = Vec::with_capacity(protocol::MAX_HEARTBEAT_LEN);
        let mut last_error_log: Vec<Option<Instant>> = vec![None; self.paths.len()];
        let mut tick = tokio::time::interval(self.interval);
        // A late tick is not made up with a burst: the controller wants steady spacing.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let isolation_at = self
                .clock
                .instant_at(self.tracker.isolation_deadline_mono_ns());
            let isolated = self.tracker.report().state == Reachability::Isolated;
            tokio::select! {
                _ = stopped(&mut shutdown) => break,
                _ = tick.tick() => {
                    self.judge();
                    self.send_all(&mut sequence, &mut datagram, &mut last_error_log, &sessions);
                }
                Some((path, datagram)) = ack_rx.recv() => {
                    if datagram.get(5) == Some(&KIND_REFUSAL) {
                        self.on_refusal(path, &datagram, &mut complaints);
                        continue;
                    }
                    match acks.receive(&datagram, sequence) {
                        Ok(ack) => {
                            let rtt = self.clock.mono_ns().saturating_sub(ack.echoed_sent_mono_ns);
                            self.metrics.heartbeat_acked(
                                ack.path_index,
                                ack.counts,
                                Duration::from_nanos(rtt),
                            );
                            sessions.on_ack(ack.path_index, ack.sequence, ack.session);
                            // Only an acting controller that took the heartbeat as a
                            // sign of life keeps this host reachable.
                            if ack.counts {
                                self.tracker.on_ack(ack.path_index, ack.echoed_sent_mono_ns);
                                self.judge();
                            }
                        }
                        Err(reason @ (RejectReason::OldVersion | RejectReason::BadVersion)) => {
                            let version = datagram.get(4).copied().unwrap_or(0);
                            if complaints.due(path, "ack version") {
                                tracing::error!(
                                    path,
                                    addr = ?self.paths.get(path).map(|(a, _)| *a),
                                    version,
                                    takes = protocol::ACK_VERSION,
                                    reason = reason.as_str(),
                                    "the controller answers with ack version {version}; this \
                                     watchdog takes version {}: its acks cannot count (run one \
                                     release of the controller and the watchdogs)",
                                    protocol::ACK_VERSION
                                );
                            }
                        }
                        Err(reason) => tracing::debug!(reason = reason.as_str(), "heartbeat ack refused"),
                    }
                }
                _ = tokio::time::sleep_until(isolation_at), if !isolated => self.judge(),
            }
        }
        receivers.abort_all();
    }

    /// A refusal arrived on `path`: unauthenticated (anyone can send one), so it is only
    /// logged, as an error when it refuses this build's heartbeat version.
    fn on_refusal(&self, path: usize, datagram: &[u8], complaints: &mut Complaints) {
        let addr = self.paths.get(path).map(|(a, _)| *a);
        match refusal_complaint(datagram) {
            Ok(complaint) => {
                if complaints.due(path, "refusal") {
                    tracing::error!(path, ?addr, "{complaint}");
                }
            }
            // Not about what this watchdog sends (a stale or forged refusal).
            Err(other) => tracing::debug!(path, ?addr, "{other}"),
        }
    }

    /// Re-judges reachability, logs a change and publishes the report.
    fn judge(&mut self) {
        let now = self.clock.mono_ns();
        let change = self.tracker.evaluate(now);
        if let Some((from, to)) = change {
            let last_ack_age_ms = self
                .tracker
                .report()
                .last_acked_send_mono_ns
                .map(|t| now.saturating_sub(t) / 1_000_000);
            match to {
                Reachability::Isolated => tracing::warn!(
                    ?from,
                    ?last_ack_age_ms,
                    "isolated: no controller acked a heartbeat within the isolation timeout"
                ),
                _ => tracing::info!(?from, ?to, "controller reachability changed"),
            }
        }
        let report = self.tracker.report().clone();
        // Ack times refresh silently; only a state change wakes receivers.
        self.reachability.send_if_modified(|published| {
            *published = report;
            change.is_some()
        });
    }

    fn send_all(
        &self,
        sequence: &mut u64,
        datagram: &mut Vec<u8>,
        last_error_log: &mut [Option<Instant>],
        sessions: &SessionEcho,
    ) {
        let summary = *self.status.borrow();
        let status = HostStatus {
            vm_count: summary.vm_count,
            stalled_vm_count: summary.stalled_vm_count,
            isolated: self.tracker.report().state == Reachability::Isolated,
            libvirt_reachable: summary.libvirt_reachable,
            self_fence: summary.self_fence,
            probe_drops: summary.probe_drops,
        };
        for (index, (addr, socket)) in self.paths.iter().enumerate() {
            *sequence += 1;
            let heartbeat = Heartbeat {
                cluster_id: &self.identity.cluster_id,
                host_id: &self.identity.host_id,
                boot_id: self.identity.boot_id,
                incarnation: self.identity.incarnation,
                sequence: *sequence,
                sent_unix_ns: self.clock.unix_ns(),
                sent_mono_ns: self.clock.mono_ns(),
                // At most 256 paths (checked by the config).
                path_index: u8::try_from(index).unwrap_or(u8::MAX),
                session: sessions.session(index),
                ack_period_ms: self.ack_period_ms,
                status,
            };
            if let Err(e) = heartbeat.encode_into(&self.key, datagram) {
                // The ids were checked at start, so this cannot happen; never crash on it.
                tracing::error!(error = %e, "cannot encode a heartbeat");
                return;
            }
            // try_send_to: a full socket buffer means the path is in trouble; skipping
            // one beat is the right answer, waiting would delay the other paths.
            let sent = socket.try_send_to(datagram, *addr);
            self.metrics.heartbeat_sent(index, sent.is_ok());
            if let Err(e) = sent {
                let now = Instant::now();
                let log = last_error_log
                    .get_mut(index)
                    .map(|last| {
                        let due = last.is_none_or(|t| now - t >= SEND_ERROR_LOG_INTERVAL);
                        if due {
                            *last = Some(now);
                        }
                        due
                    })
                    .unwrap_or(false);
                if log {
                    tracing::warn!(path = index, %addr, error = %e, "cannot send heartbeat");
                } else {
                    tracing::debug!(path = index, %addr, error = %e, "cannot send heartbeat");
                }
            }
        }
    }
}

/// Forwards every datagram that arrives on one path's socket to the heartbeat task,
/// with the path it came in on.
async fn receive_acks(path: usize, socket: Arc<UdpSocket>, acks: mpsc::Sender<(usize, Vec<u8>)>) {
    let mut buf = vec![0u8; DATAGRAM_RECV_BUFFER_LEN];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, _from)) => {
                let Some(datagram) = buf.get(..n) else {
                    continue;
                };
                if n >= DATAGRAM_RECV_BUFFER_LEN {
                    tracing::debug!(path, "oversize datagram on a heartbeat socket");
                }
                if acks.send((path, datagram.to_vec())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(path, error = %e, "heartbeat socket receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_watchdog_asks_for_an_ack_every_eighth_of_its_isolation_timeout_but_not_more_often_than_it_sends(
    ) {
        let ms = Duration::from_millis;
        assert_eq!(ack_period_asked(ms(100), ms(3000)), 375);
        assert_eq!(ack_period_asked(ms(100), ms(800)), 100);
        assert_eq!(ack_period_asked(ms(100), ms(200)), 100, "every heartbeat");
        assert_eq!(ack_period_asked(ms(10), ms(3_600_000)), 450_000);
    }

    /// Heartbeats every 100 ms from t = 0 through `until_ms`, each arriving `late_ms` ms
    /// after it was sent; acked by the controller's pacing rule unless the arrival falls
    /// in `lost` (the ack is lost); each ack arrives 1 ms after the heartbeat did.
    /// Returns the tracker's state changes, evaluated every millisecond.
    fn run_paced(
        isolation_ms: u64,
        until_ms: u64,
        lost: std::ops::Range<u64>,
    ) -> Vec<(u64, Reachability)> {
        let interval = Duration::from_millis(100);
        let asked = ack_period_asked(interval, Duration::from_millis(isolation_ms));
        let mut pacer = protocol::AckPacer::new();
        let mut t = ReachabilityTracker::new(1, Duration::from_millis(isolation_ms), 0);
        let mut pending: Vec<(u64, u64)> = Vec::new(); // (ack arrives at, echoed send time)
        let mut changes = Vec::new();
        for now in 0..=until_ms {
            if now % 100 == 0 {
                let sent = now;
                let arrives = sent + 3;
                if pacer.due(0, arrives, asked, true, sent == 0) && !lost.contains(&arrives) {
                    pending.push((arrives + 1, sent));
                }
            }
            pending.retain(|&(at, sent)| {
                if at == now {
                    t.on_ack(0, sent * MS);
                }
                at != now
            });
            if let Some((_, to)) = t.evaluate(now * MS) {
                changes.push((now, to));
            }
        }
        changes
    }

    #[test]
    fn with_paced_acks_a_heard_watchdog_stays_reachable() {
        for isolation_ms in [200, 800, 3000, 10_000] {
            let changes = run_paced(isolation_ms, 60_000, 0..0);
            assert_eq!(
                changes,
                [(4, Reachability::Reachable)],
                "isolation timeout {isolation_ms} ms"
            );
        }
    }

    #[test]
    fn with_paced_acks_isolation_comes_only_after_the_isolation_timeout_without_a_counting_ack() {
        // Every ack lost from 10 s on: the last one answered a heartbeat sent within a
        // period before that, and isolation follows the timeout after its send time.
        let changes = run_paced(3000, 20_000, 10_000..30_000);
        let (at, to) = *changes.last().unwrap();
        assert_eq!(to, Reachability::Isolated);
        assert!(
            (10_000 + 3000 - 400..=10_000 + 3000).contains(&at),
            "isolated at {at} ms"
        );
        // Acks lost for less than the timeout minus a period: never isolated.
        let changes = run_paced(3000, 20_000, 10_000..12_500);
        assert_eq!(changes, [(4, Reachability::Reachable)]);
    }

    #[test]
    fn a_refusal_of_this_builds_heartbeats_is_an_error_naming_both_versions() {
        let mut refusal = Vec::new();
        protocol::Refusal {
            refused_kind: protocol::KIND_HEARTBEAT,
            refused_version: HEARTBEAT_VERSION,
            accepted_versions: &[5, 6],
        }
        .encode_into(&mut refusal);
        let text = refusal_complaint(&refusal).unwrap();
        assert!(
            text.starts_with(&format!(
                "controller refuses heartbeat version {HEARTBEAT_VERSION}; it speaks 5, 6"
            )),
            "{text}"
        );
        // About a version this watchdog does not send: not its problem.
        protocol::Refusal {
            refused_kind: protocol::KIND_HEARTBEAT,
            refused_version: HEARTBEAT_VERSION - 1,
            accepted_versions: &[HEARTBEAT_VERSION],
        }
        .encode_into(&mut refusal);
        assert!(refusal_complaint(&refusal).is_err());
        assert!(refusal_complaint(b"DFIB\x01\x04").is_err(), "cut short");
    }

    #[tokio::test(start_paused = true)]
    async fn a_complaint_is_logged_at_most_once_a_minute_per_path_and_kind() {
        let mut c = Complaints::default();
        assert!(c.due(0, "refusal"));
        assert!(!c.due(0, "refusal"));
        assert!(c.due(1, "refusal"), "another path");
        assert!(c.due(0, "ack version"), "another kind");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!c.due(0, "refusal"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(c.due(0, "refusal"));
    }

    #[test]
    fn a_fresh_tracker_is_unconfirmed_until_the_timeout_then_isolated() {
        let mut t = ReachabilityTracker::new(2, Duration::from_millis(3000), 1_000 * MS);
        assert_eq!(t.evaluate(2_000 * MS), None);
        assert_eq!(t.report().state, Reachability::Unconfirmed);
        assert_eq!(
            t.evaluate(4_000 * MS),
            Some((Reachability::Unconfirmed, Reachability::Isolated))
        );
    }

    #[test]
    fn an_ack_makes_it_reachable_until_the_timeout_runs_from_the_acked_send_time() {
        let mut t = ReachabilityTracker::new(2, Duration::from_millis(3000), 0);
        t.on_ack(1, 500 * MS);
        assert_eq!(
            t.evaluate(600 * MS),
            Some((Reachability::Unconfirmed, Reachability::Reachable))
        );
        assert_eq!(
            t.report().last_acked_send_mono_ns_by_path,
            [None, Some(500 * MS)]
        );
        assert_eq!(t.isolation_deadline_mono_ns(), 3_500 * MS);
        assert_eq!(t.evaluate(3_499 * MS), None);
        assert_eq!(
            t.evaluate(3_500 * MS),
            Some((Reachability::Reachable, Reachability::Isolated))
        );
        t.on_ack(0, 3_600 * MS);
        assert_eq!(
            t.evaluate(3_700 * MS),
            Some((Reachability::Isolated, Reachability::Reachable))
        );
    }

    #[test]
    fn a_late_ack_for_an_old_heartbeat_does_not_end_isolation() {
        let mut t = ReachabilityTracker::new(1, Duration::from_millis(3000), 0);
        t.evaluate(5_000 * MS);
        t.on_ack(0, 1_000 * MS);
        assert_eq!(t.evaluate(5_001 * MS), None);
        assert_eq!(t.report().state, Reachability::Isolated);
    }

    #[test]
    fn the_session_echoed_on_a_path_is_the_one_of_the_ack_answering_the_highest_sequence() {
        let mut echo = SessionEcho::new(2);
        assert_eq!(echo.session(0), 0, "nothing heard yet");
        echo.on_ack(0, 10, 0xaaaa);
        echo.on_ack(1, 11, 0xbbbb);
        assert_eq!((echo.session(0), echo.session(1)), (0xaaaa, 0xbbbb));
        // The controller restarted: a new session on a later answer.
        echo.on_ack(0, 20, 0xcccc);
        // A replayed ack from before cannot set the old session back.
        echo.on_ack(0, 10, 0xaaaa);
        assert_eq!(echo.session(0), 0xcccc);
        // An ack for a path this watchdog does not have changes nothing.
        echo.on_ack(7, 99, 0xdddd);
        assert_eq!(echo.session(7), 0);
    }

    #[test]
    fn an_ack_for_an_unknown_path_still_counts_overall() {
        let mut t = ReachabilityTracker::new(1, Duration::from_millis(3000), 0);
        t.on_ack(7, 10 * MS);
        assert_eq!(t.report().last_acked_send_mono_ns, Some(10 * MS));
        assert_eq!(t.report().last_acked_send_mono_ns_by_path, [None]);
    }
}
