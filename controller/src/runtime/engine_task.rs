//! The engine task: the only owner of the engine and the store. It feeds the engine
//! (heartbeats, events, timer ticks, edge results, operator commands), carries the
//! returned actions out in order — an intent is on disk before its action starts, and a
//! failed store write stops all acting before the action — and publishes snapshots.
//!
//! # When a store write fails
//!
//! A write that fails (disk full, I/O error) or is refused (an intent whose key is
//! already stored: [`StoreError::IntentExists`]) means the engine now believes in an
//! action the store does not hold. The task then **stops acting**: nothing behind the
//! failed write runs, the engine takes no more inputs (its state would only drift
//! further from the store's), events are not stored (so not acked: the watchdogs keep
//! them and send them again), operator commands are refused. It raises the alarm (log,
//! `defib_alarms_total`, `defib_store_write_failures_total`, `defib_stopped_acting`)
//! and stays up so the operator can see it and what it knew, while it tries a small
//! store write every [`STORE_PROBE_EVERY`]. Once one succeeds, [`EngineTask::run`]
//! returns [`EngineTaskError::StoppedActing`]: the controller exits non-zero, systemd
//! starts it again, and it resumes from the intents in the store (what is persisted is
//! the truth; nothing unpersisted was done), with fresh edges and a fresh detector grace
//! period for every host. Rebuilding the engine in place instead would pair a resumed
//! engine with edges that remember the old one, a combination nothing else exercises;
//! a restart is the path every controller restart already takes.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::{EventDedup, EventVerdict};
use tokio::sync::{mpsc, watch};

use super::enrollment::Enrollment;
use super::host_view::HostFactsPublisher;
use super::intake::{EventStored, HeartbeatSeen, Intake};
use super::translate::{heartbeat, host_event};
use crate::api::view::*;
use crate::clock::EngineClock;
use crate::edges::{dispatch, Confirmer, CopyStopper, Fencer, Restorer};
use crate::edges::{EdgeLinks, HostFacts, ResultSender};
use crate::engine::{
    utc_ms, Action, AlarmKind, Engine, HostId, Input, MemoryIntentLog, OperatorCommand, Resource,
    Timestamp,
};
use crate::metrics::Metrics;
use crate::store::{intent_log_snapshot, Store, StoreError};

/// Alarms kept for the API (newest last).
const ALARMS_KEPT: usize = 200;
/// How often the API's snapshot is rebuilt.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the engine is told the controller's own load (at most: the report rides
/// on the engine's timer).
const LOAD_EVERY: Duration = Duration::from_millis(50);
/// Intake messages taken per turn of the task's loop (each up to 64 heartbeats).
const INTAKE_BURST: usize = 16;
/// How often a task that stopped acting tries a store write, to learn that the store
/// works again (then the controller restarts and resumes from it).
pub const STORE_PROBE_EVERY: Duration = Duration::from_secs(1);
/// The meta key the probe writes (the time of the last successful probe).
const STORE_PROBE_KEY: &str = "store_probe_at_ms";

pub struct Edges {
    pub fencer: Box<dyn Fencer + Send>,
    pub restorer: Box<dyn Restorer + Send>,
    pub confirmer: Box<dyn Confirmer + Send>,
    /// Stale copies of moved VMs, destroyed over the hosts' event streams.
    pub copies: Box<dyn CopyStopper + Send>,
}

/// What the engine task knows about a host beyond the engine's own view.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostInfo {
    /// By path index, in order (a host has one to a few paths).
    paths: Vec<(u8, (Option<SocketAddr>, Timestamp))>,
    status: protocol::HostStatus,
    boot_id: Option<protocol::BootId>,
    incarnation: Option<u64>,
}

impl HostInfo {
    /// A heartbeat heard at `now`.
    pub(crate) fn heard(&mut self, hb: &HeartbeatSeen, now: Timestamp) {
        match self.paths.iter_mut().find(|(p, _)| *p == hb.path) {
            Some((_, heard)) => *heard = (Some(hb.peer), now),
            None => {
                self.paths.push((hb.path, (Some(hb.peer), now)));
                self.paths.sort_by_key(|(p, _)| *p);
            }
        }
        self.status = hb.status;
        self.boot_id = Some(hb.boot_id);
        self.incarnation = Some(hb.incarnation);
    }

    /// When each path was last heard.
    pub(crate) fn paths_heard(&self) -> impl Iterator<Item = (u8, Timestamp)> + '_ {
        self.paths.iter().map(|(p, (_, at))| (*p, *at))
    }
}

/// The store write that stopped the task from acting.
#[derive(Debug, Clone)]
struct StoreFailure {
    /// When (engine clock).
    at: Timestamp,
    /// What was being written (`intent i3/fence-1/host:h1`, `event 12 of h1`...).
    write: String,
    /// The store's error.
    error: String,
    /// When the store is next tried.
    next_probe: tokio::time::Instant,
}

impl StoreFailure {
    /// What an operator (or a watchdog) is told when the task refuses something.
    fn refusal(&self) -> String {
        format!(
            "the controller stopped acting at {} after a failed store write ({}: {}); \
             it restarts and resumes from its store once the store takes writes again",
            utc_ms(self.at.0),
            self.write,
            self.error
        )
    }
}

pub struct EngineTask {
    engine: Engine,
    clock: EngineClock,
    /// The store's intent log as read at construction (its latest time starts the
    /// clock), replayed once by `run`.
    resume_from: MemoryIntentLog,
    /// The hosts the store has event streams of, handed to the engine at resume.
    hosts_in_store: Vec<HostId>,
    store: Box<dyn Store + Send>,
    dedup: EventDedup,
    edges: Edges,
    intake: mpsc::Receiver<Intake>,
    results: mpsc::UnboundedReceiver<Input>,
    commands: mpsc::Receiver<Command>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    host_facts: HostFactsPublisher,
    metrics: Arc<Metrics>,
    controller_id: String,
    cluster_id: String,
    /// Per host, what its heartbeats said: looked up once per heartbeat, so hashed.
    hosts: HashMap<String, HostInfo>,
    alarms: VecDeque<AlarmSnapshot>,
    next_tick: Option<Timestamp>,
    /// Set once a store write failed: the task acts on nothing from then on.
    stopped: Option<StoreFailure>,
    heard: Vec<(HostId, crate::engine::PathId, Duration)>,
    /// The controller's own load since the last report to the engine.
    load: LoadMeter,
    /// The heartbeat sockets, asked without being read.
    backlog: Arc<super::intake::SocketBacklog>,
    end_on_store_failure: bool,
    role: RoleSnapshot,
    /// Enrolls and revokes hosts in this task's store (`None` in tests without it).
    enrollment: Option<Arc<Enrollment>>,
}

/// Channels the rest of the runtime uses to talk to the engine task.
pub struct EngineChannels {
    pub intake: mpsc::Sender<Intake>,
    pub results: ResultSender,
    pub commands: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The hosts as typed facts (what the edges are handed).
    pub hosts: HostFacts,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineTaskError {
    /// The store could not be read at start, or flushed at shutdown.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A store write failed or was refused; the task stopped acting and has returned
    /// (the store takes writes again, or shutdown was asked) so that the controller
    /// restarts and resumes from the intents in its store.
    #[error(
        "stopped acting after a failed store write ({write}: {error}); restart the \
         controller to resume from the intents in its store"
    )]
    StoppedActing {
        /// What was being written.
        write: String,
        /// The store's error.
        error: String,
    },
}

pub struct EngineTaskParts {
    pub engine_config: crate::engine::Config,
    pub store: Box<dyn Store + Send>,
    pub metrics: Arc<Metrics>,
    pub controller_id: String,
    pub cluster_id: String,
    /// What this controller heard while it followed: per host and path, how long ago
    /// (at the moment it took the lead) the last heartbeat came. Empty for a single
    /// controller. See [`Engine::resume_warm`].
    pub heard: Vec<(HostId, crate::engine::PathId, Duration)>,
    /// Several controllers: a failed or refused store write ends [`EngineTask::run`] at
    /// once (the leadership is given up and the next leader resumes from the store),
    /// instead of waiting for the store to take writes again.
    pub end_on_store_failure: bool,
    /// The role shown in snapshots.
    pub role: RoleSnapshot,
    /// Enrolls and revokes hosts (operator commands), `None`: refused.
    pub enrollment: Option<Arc<Enrollment>>,
    /// The heartbeat sockets' drops and unread backlog (empty without sockets).
    pub backlog: Arc<super::intake::SocketBacklog>,
}

impl EngineTask {
    /// Builds the task and its channels. `make_edges` gets the links every edge needs:
    /// the results sender to report back on, and the hosts as typed facts.
    pub fn new(
        parts: EngineTaskParts,
        make_edges: impl FnOnce(EdgeLinks) -> Edges,
    ) -> Result<(EngineTask, EngineChannels), EngineTaskError> {
        // Bounded in messages: a batch of heartbeats is one, so at most ~64 Ki heartbeats wait.
        let (intake_tx, intake_rx) = mpsc::channel(1_024);
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (host_facts, hosts) = HostFactsPublisher::new();
        let mut dedup = EventDedup::new();
        let mut hosts_in_store = Vec::new();
        for (host, high) in parts.store.event_high_waters()? {
            dedup.restore(&host, high);
            hosts_in_store.push(HostId::new(&host));
        }
        let resume_from = intent_log_snapshot(parts.store.as_ref())?;
        // After the store's latest time, whatever the wall clock says now.
        let clock = EngineClock::start_not_before(crate::clock::latest_in_log(&resume_from));
        let task = EngineTask {
            engine: Engine::new(parts.engine_config),
            clock,
            resume_from,
            hosts_in_store,
            store: parts.store,
            dedup,
            edges: make_edges(EdgeLinks {
                results: results_tx.clone(),
                hosts: hosts.clone(),
                clock,
            }),
            intake: intake_rx,
            results: results_rx,
            commands: commands_rx,
            snapshot: snapshot_tx,
            host_facts,
            metrics: parts.metrics,
            controller_id: parts.controller_id,
            cluster_id: parts.cluster_id,
            hosts: HashMap::new(),
            alarms: VecDeque::new(),
            next_tick: None,
            stopped: None,
            heard: parts.heard,
            load: LoadMeter::new(),
            backlog: parts.backlog,
            end_on_store_failure: parts.end_on_store_failure,
            enrollment: parts.enrollment,
            role: parts.role,
        };
        Ok((
            task,
            EngineChannels {
                intake: intake_tx,
                results: results_tx,
                commands: commands_tx,
                snapshot: snapshot_rx,
                hosts,
            },
        ))
    }

    /// Runs until `shutdown` resolves. After a failed store write it stops acting (see
    /// the module docs) and returns [`EngineTaskError::StoppedActing`] once the store
    /// takes a write again, or at shutdown.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), EngineTaskError> {
        let now = self.clock.now();
        let log = std::mem::take(&mut self.resume_from);
        let hosts_in_store = std::mem::take(&mut self.hosts_in_store);
        let heard: Vec<_> = std::mem::take(&mut self.heard)
            .into_iter()
            .map(|(host, path, ago)| {
                (
                    host,
                    path,
                    Timestamp(now.0.saturating_sub(ago.as_millis() as u64)),
                )
            })
            .collect();
        let (engine, actions) = Engine::resume_warm(
            self.engine.config().clone(),
            &log,
            &hosts_in_store,
            &heard,
            now,
        );
        if !log.is_empty() {
            tracing::info!(intents = log.len(), "resumed from the store");
        }
        self.engine = engine;
        self.restore_timelines();
        let mut actions = actions;
        actions.extend(self.engine.start(now));
        self.apply(actions);
        self.replay_inventories();
        self.publish();
        // Snapshots are rebuilt on a timer, not per input: a rebuild costs O(hosts +
        // incidents), and with thousands of hosts heartbeating a rebuild per input would
        // starve the engine (and make healthy hosts look silent).
        let mut next_publish = tokio::time::Instant::now() + PUBLISH_EVERY;
        let mut sd_watchdog = super::systemd::WatchdogPinger::from_env();
        tokio::pin!(shutdown);
        loop {
            if self.stopped.is_some() && self.end_on_store_failure {
                break;
            }
            let acting = self.stopped.is_none();
            let tick_at = self.next_tick.map(|t| self.clock.instant_at(t));
            let probe_at = self.stopped.as_ref().map(|f| f.next_probe);
            tokio::select! {
                Some(msg) = self.intake.recv() => self.on_intake(msg),
                // Once stopped, results wait unread: the restarted controller hands their
                // intents out again instead.
                Some(input) = self.results.recv(), if acting => self.step(input),
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                _ = sleep_until_opt(tick_at), if acting => {
                    self.next_tick = None;
                    if let Some(due) = tick_at {
                        self.on_timer(due);
                    }
                }
                _ = sleep_until_opt(probe_at) => {
                    if self.store_takes_writes() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(next_publish) => {
                    let started = thread_cpu();
                    self.publish();
                    let took = thread_cpu().saturating_sub(started);
                    self.metrics.engine_busy_seconds.inc_by(took.as_secs_f64());
                    // At most a twentieth of the task's time goes to snapshots: with tens
                    // of thousands of hosts a rebuild takes milliseconds, and the API may
                    // then lag a little behind rather than the engine behind the hosts.
                    next_publish = tokio::time::Instant::now() + PUBLISH_EVERY.max(took * 20);
                }
                _ = sd_watchdog.due() => sd_watchdog.ping(),
                _ = &mut shutdown => break,
            }
        }
        if let Some(failure) = self.stopped.take() {
            return Err(EngineTaskError::StoppedActing {
                write: failure.write,
                error: failure.error,
            });
        }
        self.store.flush()?;
        Ok(())
    }

    /// After a resume, before anything new is written: each resumed incident's timeline
    /// as stored (what the process or leader before wrote), so that an operator sees the
    /// whole incident, not only what came after the takeover.
    fn restore_timelines(&mut self) {
        // One read of every stored timeline (one range read on etcd), not one per incident.
        let stored = match self.store.incidents_with_timelines() {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored timelines; resumed incidents show from the resume on");
                return;
            }
        };
        for (id, earlier) in stored {
            if !earlier.is_empty() {
                self.engine.restore_timeline(id, earlier);
            }
        }
    }

    /// After a resume: hands the engine each host's latest stored inventory and disk-lease
    /// word. A watchdog sends its inventory when its stream connects and whenever it
    /// changes, so the latest one stored is what the host ran when it was last heard;
    /// without it, a host that died while no controller acted (a restart, a handover)
    /// would be recovered with its VMs unknown, i.e. not restored. Its lease word is sent
    /// only when it changes: without the latest one, a host whose lease daemon died
    /// before a handover would be taken for a protected target. Live hosts send a fresh
    /// inventory when their streams reconnect.
    fn replay_inventories(&mut self) {
        for kind in ["inventory", "disk_leases"] {
            let stored = match self.store.events_of_kind(kind) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(kind, error = %e, "cannot read the stored host reports; they are learnt as the hosts report");
                    continue;
                }
            };
            let mut latest: BTreeMap<String, String> = BTreeMap::new();
            for (host, payload) in stored {
                latest.insert(host, payload);
            }
            for (host, payload) in latest {
                let Some((event, unix_ns)) = stored_event(&payload) else {
                    continue;
                };
                if let Some(he) = host_event(&event, unix_ns) {
                    tracing::info!(host, kind, "resumed with the host's latest stored report");
                    self.step(Input::HostEvent {
                        host: HostId::new(&host),
                        event: he,
                    });
                }
            }
        }
    }

    /// Feeds the engine one input and carries its actions out, unless the task stopped
    /// acting (then the input is dropped: the restarted engine learns afresh).
    fn step(&mut self, input: Input) {
        if self.stopped.is_some() {
            return;
        }
        let now = self.clock.now();
        let actions = self.engine.step(now, input);
        self.apply(actions);
    }

    /// The engine's timer fired (it was due at `due`): what waits in the intake queue
    /// goes in first, so that no heartbeat that already arrived is judged missing; the
    /// engine hears of the controller's own load, then ticks.
    fn on_timer(&mut self, due: tokio::time::Instant) {
        let started = thread_cpu();
        self.load.timer_lateness = tokio::time::Instant::now().saturating_duration_since(due);
        // Only what is queued now: a queue refilled faster than it drains must not
        // starve the timer.
        let queued = self.intake.len();
        for _ in 0..queued {
            match self.intake.try_recv() {
                Ok(msg) => self.take_intake(msg),
                Err(_) => break,
            }
        }
        if self.load.due() {
            // Asked of the kernel now, not when a socket thread next reads: a starved
            // thread would tell of its drops and its backlog only once it runs again.
            let backlog = self.backlog.sample();
            let dropped_before = self.load.dropped.replace(backlog.dropped);
            if let Some(before) = dropped_before {
                self.metrics
                    .heartbeat_socket_drops
                    .inc_by(backlog.dropped.saturating_sub(before));
            }
            self.load.unread_for = backlog.unread_for;
            let lost = backlog.dropped + self.refused_so_far();
            let report = self.load.report(lost, self.intake.len() as u64);
            self.metrics
                .heartbeat_wait_seconds
                .set(report.heartbeat_wait.as_secs_f64());
            self.metrics
                .engine_timer_lateness_seconds
                .set(report.timer_lateness.as_secs_f64());
            self.metrics
                .engine_queue_depth
                .set(report.queue_depth as i64);
            self.step(Input::Load(report));
            let own = self.engine.self_load();
            self.metrics
                .controller_lag_seconds
                .set(own.lag().as_secs_f64());
            self.metrics
                .controller_overloaded
                .set(i64::from(own.overloaded_since().is_some()));
        }
        self.step(Input::Timer(crate::engine::TimerId::Tick));
        self.metrics
            .engine_busy_seconds
            .inc_by(thread_cpu().saturating_sub(started).as_secs_f64());
    }

    /// Heartbeats the intake refused so far on a full engine queue.
    fn refused_so_far(&self) -> u64 {
        self.metrics
            .heartbeats_rejected
            .get_or_create(&Metrics::label("reason", "engine_busy"))
            .get()
    }

    /// One message from the intake, and up to [`INTAKE_BURST`] more already queued: the
    /// task's loop (its timers, its other channels) runs once per burst, not per batch.
    fn on_intake(&mut self, msg: Intake) {
        let started = thread_cpu();
        self.take_intake(msg);
        for _ in 1..INTAKE_BURST {
            match self.intake.try_recv() {
                Ok(msg) => self.take_intake(msg),
                Err(_) => break,
            }
        }
        self.metrics
            .engine_busy_seconds
            .inc_by(thread_cpu().saturating_sub(started).as_secs_f64());
    }

    fn take_intake(&mut self, msg: Intake) {
        match msg {
            Intake::Heartbeats(batch) => {
                for hb in batch {
                    self.on_heartbeat(hb);
                }
            }
            Intake::Hello { host, reply } => {
                let _ = reply.send(Ok(self.dedup.highest(&host)));
            }
            Intake::Event { host, event, reply } => {
                let _ = reply.send(self.on_event(&host, &event));
            }
        }
    }

    fn on_heartbeat(&mut self, hb: HeartbeatSeen) {
        let now = self.clock.now();
        let received = self.clock.at_instant(hb.received).min(now);
        self.load.heard(now.since(received));
        match self.hosts.get_mut(&hb.host) {
            Some(info) => info.heard(&hb, received),
            None => self
                .hosts
                .entry(hb.host.clone())
                .or_default()
                .heard(&hb, received),
        }
        self.step(Input::Heartbeat(heartbeat(hb, received)))
    }

    /// Stores an event (then feeds it to the engine) and says how far the host's events
    /// are stored; an error (the event is not stored, so not acked) closes the stream
    /// and the watchdog sends it again later.
    fn on_event(&mut self, host: &str, event: &protocol::Event) -> Result<EventStored, String> {
        if let Some(failure) = &self.stopped {
            return Err(format!(
                "event {} not stored: {}",
                event.id,
                failure.refusal()
            ));
        }
        if let EventVerdict::Duplicate = self.dedup.check(host, event.id) {
            return Ok(EventStored {
                new: false,
                high_water: self.dedup.highest(host),
            });
        }
        let payload = stored_payload(event);
        let new = match self
            .store
            .record_event(host, event.id, self.clock.now().0, &payload)
        {
            Ok(new) => new,
            Err(e) => {
                let reason = format!("event {} not stored: {e}", event.id);
                self.stop_acting(format!("event {} of {host}", event.id), &e);
                return Err(reason);
            }
        };
        self.dedup.commit(host, event.id);
        if new {
            tracing::info!(host, id = event.id, payload = %payload, "event");
            if let Some(he) = host_event(&event.payload, event.unix_ns) {
                self.step(Input::HostEvent {
                    host: HostId::new(host),
                    event: he,
                });
            }
        }
        Ok(EventStored {
            new,
            high_water: self.dedup.highest(host),
        })
    }

    fn on_command(&mut self, cmd: Command) {
        let (op, reply) = match cmd {
            Command::Enrollment {
                host,
                enroll,
                reply,
            } => {
                let answer = match (&self.stopped, &self.enrollment) {
                    (Some(failure), _) => Err(failure.refusal()),
                    (None, None) => Err("enrollment is not managed by this controller".into()),
                    (None, Some(e)) => e.change(self.store.as_mut(), &host, enroll),
                };
                let _ = reply.send(answer);
                return;
            }
            Command::Maintenance { host, on, reply } => {
                let host = HostId::new(host);
                let op = if on {
                    OperatorCommand::MaintenanceOn { host }
                } else {
                    OperatorCommand::MaintenanceOff { host }
                };
                (op, reply)
            }
            Command::Unfence { host, reply } => (
                OperatorCommand::Unfence {
                    host: HostId::new(host),
                },
                reply,
            ),
        };
        let now = self.clock.now();
        let host = op.host().clone();
        let answer = match &self.stopped {
            // Nothing can be recorded, so nothing is done.
            Some(failure) => Err(failure.refusal()),
            None => match self.engine.command(now, op) {
                Ok(actions) => {
                    self.apply(actions);
                    // A write that failed names itself: the command's intent, or a line
                    // after it (then the restarted controller has the intent).
                    self.stopped
                        .as_ref()
                        .map_or(Ok(()), |failure| Err(failure.refusal()))
                }
                Err(refusal) => Err(refusal.reason),
            },
        };
        // The operator is told why, and the refusal is listed with the alarms.
        if let Err(reason) = &answer {
            self.raise_alarm(AlarmKind::CommandRefused, Some(&host), None, reason);
        }
        let _ = reply.send(answer);
        // An operator who just changed something sees it at once.
        self.publish();
    }

    /// Stops all acting after a failed or refused store write `write`, and raises the
    /// alarm (see the module docs).
    fn stop_acting(&mut self, write: String, error: &StoreError) {
        let (kind, reason) = match error {
            StoreError::IntentExists { .. } => ("IntentExists", "intent_exists"),
            StoreError::NotLeader(_) => ("LeadershipLost", "not_leader"),
            _ => ("StoreWriteFailed", "error"),
        };
        tracing::error!(
            kind,
            write = %write,
            error = %error,
            reason = "a store write failed or was refused: the controller stops acting, and \
                      restarts to resume from its store once the store takes writes again",
            "ALARM"
        );
        self.metrics
            .store_write_failures
            .get_or_create(&Metrics::label("reason", reason))
            .inc();
        self.metrics
            .alarms
            .get_or_create(&Metrics::label("kind", kind))
            .inc();
        self.metrics.stopped_acting.set(1);
        self.stopped = Some(StoreFailure {
            at: self.clock.now(),
            write,
            error: error.to_string(),
            next_probe: tokio::time::Instant::now() + STORE_PROBE_EVERY,
        });
    }

    /// Once stopped: tries a small store write. True when it succeeded (the store works
    /// again; the controller should restart and resume from it).
    fn store_takes_writes(&mut self) -> bool {
        let now = self.clock.now();
        match self.store.set_meta(STORE_PROBE_KEY, &now.0.to_string()) {
            Ok(()) => {
                tracing::warn!(
                    "the store takes writes again: stopping so that the controller restarts \
                     and resumes from the intents in its store"
                );
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "the store still fails");
                if let Some(failure) = &mut self.stopped {
                    failure.next_probe = tokio::time::Instant::now() + STORE_PROBE_EVERY;
                }
                false
            }
        }
    }

    /// Logs, counts and lists an alarm for the API.
    fn raise_alarm(
        &mut self,
        kind: AlarmKind,
        host: Option<&HostId>,
        resource: Option<&Resource>,
        reason: &str,
    ) {
        tracing::warn!(kind = ?kind, host = ?host.map(|h| h.as_str()), reason = %reason, "ALARM");
        self.metrics
            .alarms
            .get_or_create(&Metrics::label("kind", format!("{kind:?}")))
            .inc();
        self.alarms.push_back(AlarmSnapshot {
            at_ms: self.clock.now().0,
            kind,
            host: host.map(|h| h.to_string()),
            resource: resource.map(|r| r.to_string()),
            reason: reason.to_owned(),
        });
        while self.alarms.len() > ALARMS_KEPT {
            self.alarms.pop_front();
        }
    }

    /// Carries actions out in order. Each intent's write comes before its action (the
    /// engine puts each PersistIntent first); a failed or refused write stops the task
    /// from acting, and nothing behind it in the batch runs but its alarms (they report,
    /// they act on nothing).
    fn apply(&mut self, actions: Vec<Action>) {
        let mut actions = actions.into_iter();
        while let Some(action) = actions.next() {
            // Intents, completions and timeline lines go to the store (in order).
            let stored = match self.store.apply_action(&action) {
                Ok(stored) => stored,
                Err(e) => {
                    self.stop_acting(store_write(&action), &e);
                    for rest in actions {
                        if let Action::Alarm {
                            kind,
                            host,
                            resource,
                            reason,
                        } = &rest
                        {
                            self.raise_alarm(*kind, host.as_ref(), resource.as_ref(), reason);
                        }
                    }
                    return;
                }
            };
            if stored {
                if let Action::RecordTimeline { incident, entry } = &action {
                    tracing::info!(
                        incident = incident.0,
                        subject = %entry.subject,
                        from = %entry.from,
                        to = %entry.to,
                        cause = %entry.cause,
                        source = ?entry.source,
                        "timeline"
                    );
                }
                continue;
            }
            match &action {
                Action::ArmTimer { at, .. } => {
                    self.next_tick = Some(self.next_tick.map_or(*at, |t| t.min(*at)));
                }
                Action::Alarm {
                    kind,
                    host,
                    resource,
                    reason,
                } => self.raise_alarm(*kind, host.as_ref(), resource.as_ref(), reason),
                other => {
                    let kind = action_kind(other);
                    tracing::info!(action = kind, ?other, "action");
                    self.metrics
                        .actions
                        .get_or_create(&Metrics::label("kind", kind))
                        .inc();
                    let Edges {
                        fencer,
                        restorer,
                        confirmer,
                        copies,
                    } = &mut self.edges;
                    dispatch(
                        other,
                        fencer.as_mut(),
                        restorer.as_mut(),
                        confirmer.as_mut(),
                        copies.as_mut(),
                    );
                }
            }
        }
    }

    /// Publishes a fresh snapshot (for the API), the hosts as typed facts (for the
    /// edges) and the host and incident gauges.
    fn publish(&mut self) {
        let hosts = self.engine.hosts();
        let snap = self.build_snapshot(&hosts);
        self.host_facts.publish(hosts);
        let mut per_state: BTreeMap<String, i64> = [
            "Up",
            "Suspect",
            "Confirming",
            "Fencing",
            "Fenced",
            "Evacuating",
            "Recovered",
            "Maintenance",
        ]
        .into_iter()
        .map(|s| (s.to_string(), 0))
        .collect();
        for h in &snap.hosts {
            *per_state.entry(format!("{:?}", h.state)).or_default() += 1;
        }
        for (state, n) in per_state {
            self.metrics
                .hosts
                .get_or_create(&Metrics::label("state", state))
                .set(n);
        }
        self.metrics.incidents_open.set(
            snap.incidents
                .iter()
                .filter(|i| i.closed_at_ms.is_none())
                .count() as i64,
        );
        self.snapshot.send_replace(Arc::new(snap));
    }

    fn build_snapshot(&self, hosts: &[crate::engine::HostView]) -> Snapshot {
        snapshot_of(
            &self.engine,
            hosts,
            &self.hosts,
            self.alarms.iter().cloned().collect(),
            (&self.controller_id, &self.cluster_id),
            self.clock.now(),
            self.role.clone(),
        )
    }
}

/// The API's picture of an engine: its hosts (with what their heartbeats said), its
/// resources and incidents, and the alarms given.
pub(crate) fn snapshot_of(
    engine: &Engine,
    hosts: &[crate::engine::HostView],
    infos: &HashMap<String, HostInfo>,
    alarms: Vec<AlarmSnapshot>,
    (controller_id, cluster_id): (&str, &str),
    now: Timestamp,
    role: RoleSnapshot,
) -> Snapshot {
    let hosts = hosts
        .iter()
        .map(|h| {
            let unknown = HostInfo::default();
            let info = infos.get(h.host.as_str()).unwrap_or(&unknown);
            HostSnapshot {
                host: h.host.to_string(),
                state: h.state,
                incident: h.incident.map(|i| i.0),
                last_heartbeat_ms: h.last_seen.map(|t| t.0),
                paths: info
                    .paths
                    .iter()
                    .map(|(p, (peer, at))| PathSnapshot {
                        path: u16::from(*p),
                        peer: peer.map(|a| a.to_string()),
                        last_heartbeat_ms: at.0,
                    })
                    .collect(),
                vm_count: info.status.vm_count,
                stalled_vm_count: info.status.stalled_vm_count,
                isolated: info.status.isolated,
                self_fence: info.status.self_fence.to_string(),
                boot_id: info.boot_id.map(|b| b.to_string()),
                incarnation: info.incarnation,
                evacuated: h.evacuated.iter().map(|r| r.to_string()).collect(),
                not_a_target: h.not_a_target.clone(),
                unprotected: h.unprotected.iter().map(|r| r.to_string()).collect(),
            }
        })
        .collect();
    let resources = engine
        .resources()
        .into_iter()
        .map(|r| {
            let (kind, id) = match &r.resource {
                Resource::Vm(v) => ("vm", v.to_string()),
                Resource::Router(x) => ("router", x.to_string()),
            };
            ResourceSnapshot {
                resource: r.resource.to_string(),
                kind: kind.into(),
                id,
                host: r.host.to_string(),
                state: r.state,
                owner: r.owner.map(|i| i.0),
            }
        })
        .collect();
    let incidents = engine
        .incidents()
        .map(|i| IncidentSnapshot {
            id: i.id.0,
            subject: i.subject.to_string(),
            opened_at_ms: i.opened_at.0,
            closed_at_ms: i.closed_at.map(|t| t.0),
            timeline: i.timeline.clone(),
        })
        .collect();
    Snapshot {
        controller_id: controller_id.to_owned(),
        cluster_id: cluster_id.to_owned(),
        at_ms: now.0,
        hosts,
        resources,
        incidents,
        alarms,
        role,
    }
}

/// What the engine task measures of its own load between two reports to the engine.
#[derive(Debug)]
struct LoadMeter {
    /// When the last report was made.
    since: tokio::time::Instant,
    /// The longest a heartbeat waited from the kernel to the engine since then.
    heartbeat_wait: Duration,
    /// How late the last timer fired.
    timer_lateness: Duration,
    /// How long datagrams have waited unread in the heartbeat sockets.
    unread_for: Duration,
    /// The kernel's drop count at the last report.
    dropped: Option<u64>,
    /// Heartbeats lost by the controller itself, as counted at the last report.
    lost_before: Option<u64>,
}

impl LoadMeter {
    fn new() -> Self {
        LoadMeter {
            since: tokio::time::Instant::now(),
            heartbeat_wait: Duration::ZERO,
            timer_lateness: Duration::ZERO,
            unread_for: Duration::ZERO,
            dropped: None,
            lost_before: None,
        }
    }

    fn heard(&mut self, waited: Duration) {
        self.heartbeat_wait = self.heartbeat_wait.max(waited);
    }

    fn due(&self) -> bool {
        self.since.elapsed() >= LOAD_EVERY
    }

    /// The report for the window since the last one; `lost_total`: the controller's
    /// own losses so far (cumulative).
    fn report(&mut self, lost_total: u64, queue_depth: u64) -> crate::engine::load::ControllerLoad {
        let now = tokio::time::Instant::now();
        let report = crate::engine::load::ControllerLoad {
            window: now.saturating_duration_since(self.since),
            // A datagram still unread has waited at least this long already.
            heartbeat_wait: self.heartbeat_wait.max(self.unread_for),
            timer_lateness: self.timer_lateness,
            lost: self
                .lost_before
                .map_or(0, |before| lost_total.saturating_sub(before)),
            queue_depth,
        };
        self.since = now;
        self.heartbeat_wait = Duration::ZERO;
        self.lost_before = Some(lost_total);
        report
    }
}

/// The CPU time the calling thread has used: what the engine task's work costs, on
/// whichever runtime thread polls it (one poll runs on one thread).
fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime writes a timespec into a live local.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The key under which a stored event's payload keeps the host's time of the event.
const HOST_UNIX_NS: &str = "host_unix_ns";

/// An event's payload as stored: its JSON with the host's time of the event added (an
/// older controller reading it ignores the extra field).
fn stored_payload(event: &protocol::Event) -> String {
    let mut v = serde_json::to_value(&event.payload).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(HOST_UNIX_NS.into(), event.unix_ns.into());
    }
    v.to_string()
}

/// A stored payload back, with the host's time; `None` when it has no time (stored by
/// an older controller) or does not parse.
fn stored_event(payload: &str) -> Option<(protocol::EventPayload, u64)> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let unix_ns = v.get(HOST_UNIX_NS)?.as_u64()?;
    Some((serde_json::from_value(v).ok()?, unix_ns))
}

/// What a store action writes, for the log and the operator.
fn store_write(a: &Action) -> String {
    match a {
        Action::PersistIntent(record) => format!("intent {}", record.key),
        Action::CompleteIntent { key, .. } => format!("completion of intent {key}"),
        Action::RecordTimeline { incident, .. } => {
            format!("timeline line of incident {}", incident.0)
        }
        other => format!("{other:?}"),
    }
}

fn action_kind(a: &Action) -> &'static str {
    match a {
        Action::Fence { .. } => "fence",
        Action::ForceDown { .. } => "force_down",
        Action::RestartInPlace { .. } => "restart_in_place",
        Action::Evacuate { .. } => "evacuate",
        Action::Unfence { .. } => "unfence",
        Action::Confirm { .. } => "confirm",
        Action::AskHost { .. } => "ask_host",
        Action::StopStaleCopy { .. } => "stop_stale_copy",
        _ => "other",
    }
}
