//! One of several controllers: hears every host all the time, and runs the engine only
//! while it leads (`crate::ha` holds the election and the store on etcd).
//!
//! # Roles
//!
//! * **Follower.** Takes heartbeats in (the watchdogs send them to every controller) and
//!   keeps when it last heard each host on each path, so a takeover does not start
//!   blind; does **not** ack them (a watchdog's acks mean "a controller that acts hears
//!   you": its self-fence counts from their loss). Refuses event streams at `Hello` (the
//!   watchdog moves to its next controller address: redirect by refusal) and operator
//!   writes (409, naming the leader and its API). Answers reads from the store: every
//!   couple of seconds it rebuilds the leader's picture from the intents on etcd.
//! * **Leader.** Runs a *term*: a fresh engine task, resumed from the intents on etcd
//!   ([`Engine::resume_warm`](crate::engine::Engine::resume_warm), with what the
//!   follower heard), with fresh edges, on a runtime of its own, its store guarded by the
//!   term's lease. Intake and commands are forwarded to it; heartbeats are acked.
//!
//! # A term ends
//!
//! when the local deadline passes (the supervisor stops the term itself, whatever the
//! election task is doing), when the election task says the lease is gone, when a store
//! write fails or is refused (the term ends at once and the lease is given up so that
//! another controller resumes), or at shutdown (the lease is revoked: a follower takes
//! over without waiting for the TTL). Ending a term shuts its runtime down: every edge
//! task of the term is dropped, so nothing it started goes on acting. What it sent
//! before is in the intents, and the next leader resumes those like a restarted
//! controller does.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::engine_task::{snapshot_of, EngineTask, EngineTaskParts, HostInfo};
use super::enrollment::{self, Enrollment};
use super::intake::Intake;
use super::{bind, note_stored_definitions, serve_api, serve_intake, EdgeFactory, Sockets};
use crate::api::view::{
    AlarmSnapshot, ApiHandle, Command, ControllerSnapshot, RoleSnapshot, Snapshot,
};
use crate::config::Resolved;
use crate::edges::libvirt::HostStreams;
use crate::engine::{AlarmKind, Engine, HostId, PathId, Timestamp};
use crate::ha::leadership::{self, LeadershipState, SharedDeadline, StepDown};
use crate::ha::{EtcdSettings, EtcdStore, Guard, Role};
use crate::metrics::Metrics;
use crate::store::{intent_log_snapshot, Store};

/// How often a follower rebuilds its picture from the store.
const FOLLOWER_READ_EVERY: Duration = Duration::from_secs(2);
/// How often the API's snapshot is refreshed.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Alarms the supervisor keeps (its own: leadership).
const ALARMS_KEPT: usize = 50;

/// A running term: the engine task on its own runtime thread.
struct Term {
    guard: Guard,
    intake: mpsc::Sender<Intake>,
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    stop: Option<oneshot::Sender<()>>,
    done: oneshot::Receiver<Result<(), String>>,
}

impl Term {
    /// Starts a term: opens the guarded store, resumes the engine from it and runs it.
    async fn start(
        guard: Guard,
        deadline: SharedDeadline,
        heard: Vec<(HostId, PathId, Duration)>,
        ctx: &TermContext,
    ) -> anyhow::Result<Term> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        let ctx = ctx.clone();
        let term_guard = guard.clone();
        let (term_guard_lease, term_guard_revision) = (guard.lease, guard.create_revision);
        std::thread::Builder::new()
            .name("leader-term".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("term")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("term runtime: {e}")));
                        return;
                    }
                };
                let result = rt.block_on(async move {
                    let built = (|| -> anyhow::Result<_> {
                        let e = &ctx.etcd;
                        let store = EtcdStore::open(
                            e.endpoints.clone(),
                            e.call_timeout,
                            e.prefix.clone(),
                            Some(term_guard),
                            Some(deadline),
                        )?;
                        let mut store = store;
                        // The term's first guarded write, before anything acts: the
                        // store takes this leader's writes, and etcd records who leads.
                        store.set_meta(
                            "leader",
                            &serde_json::json!({
                                "id": ctx.resolved.cfg.controller.id,
                                "lease": format!("{:x}", term_guard_lease),
                                "revision": term_guard_revision,
                                "since_unix_ms": super::unix_ms(),
                            })
                            .to_string(),
                        )?;
                        note_stored_definitions(&store, &ctx.streams)?;
                        let parts = EngineTaskParts {
                            engine_config: ctx.resolved.cfg.engine_config(),
                            store: Box::new(store),
                            metrics: ctx.metrics.clone(),
                            controller_id: ctx.resolved.cfg.controller.id.clone(),
                            cluster_id: ctx.resolved.cfg.controller.cluster_id.clone(),
                            heard,
                            end_on_store_failure: true,
                            role: RoleSnapshot::default(),
                            enrollment: Some(ctx.enrollment.clone()),
                            backlog: ctx.backlog.clone(),
                        };
                        let factory = ctx.factory.clone();
                        Ok(EngineTask::new(parts, |links| factory.build(links))?)
                    })();
                    let (task, channels) = match built {
                        Ok(x) => x,
                        Err(e) => {
                            let msg = format!("{e:#}");
                            let _ = ready_tx.send(Err(e));
                            return Err(msg);
                        }
                    };
                    let _ =
                        ready_tx.send(Ok((channels.intake, channels.commands, channels.snapshot)));
                    task.run(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
                });
                // Every edge task of this term goes with its runtime.
                rt.shutdown_background();
                let _ = done_tx.send(result);
            })
            .context("starting the leader's term thread")?;
        let (intake, commands, snapshot) = ready_rx
            .await
            .map_err(|_| anyhow::anyhow!("the term thread ended before it was ready"))??;
        Ok(Term {
            guard,
            intake,
            commands,
            snapshot,
            stop: Some(stop_tx),
            done: done_rx,
        })
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What every term is built from.
#[derive(Clone)]
struct TermContext {
    resolved: Arc<Resolved>,
    etcd: EtcdSettings,
    factory: EdgeFactory,
    metrics: Arc<Metrics>,
    streams: Arc<HostStreams>,
    enrollment: Arc<Enrollment>,
    /// The heartbeat sockets' drops and unread backlog, for each term's engine task.
    backlog: Arc<super::intake::SocketBacklog>,
}

/// What the controller knows while it follows.
struct Follower {
    /// Per host: its heartbeats' paths and status, as heard (engine-clock times).
    hosts: HashMap<String, HostInfo>,
    /// Read-only store, for the picture of the leader's decisions (away while a read
    /// runs: the read owns it).
    store: Option<EtcdStore>,
    /// A read of the store in flight, off the supervisor's loop: a slow etcd must not
    /// hold up the intake (a heartbeat is noted when the loop takes it).
    reading: Option<oneshot::Receiver<FollowerRead>>,
    /// To open the read-only store (again, after a read died with it).
    settings: EtcdSettings,
    /// The picture built from it, and when.
    engine: Option<Engine>,
    read_at: Option<Instant>,
    /// Why the last read failed.
    read_error: Option<String>,
    /// Where the enrolled hosts read with the picture go (to the intake).
    enrollment: Arc<Enrollment>,
}

/// Runs one of several controllers until `shutdown`.
pub async fn run(
    resolved: Resolved,
    etcd: EtcdSettings,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&super::Bound),
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let streams = HostStreams::new();
    let factory = EdgeFactory::new(&resolved, streams.clone(), metrics.clone())?;
    let Sockets {
        udp,
        events,
        api,
        bound,
    } = bind(&resolved).await?;
    let (intake_tx, mut intake_rx) = mpsc::channel(65_536);
    // The enrolled hosts as etcd holds them now; a follower re-reads them with its
    // picture, a leader's engine task changes them.
    let first_read = {
        let e = etcd.clone();
        tokio::task::spawn_blocking(move || {
            let store = EtcdStore::open(e.endpoints, e.call_timeout, e.prefix, None, None)?;
            enrollment::read(&store)
        })
        .await
    };
    let enrolled = match first_read {
        Ok(Ok(hosts)) => hosts,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the enrolled hosts from etcd yet: none until the next read");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the enrolled hosts failed");
            Vec::new()
        }
    };
    let (enrolled_tx, enrolled_rx) = watch::channel(enrolled);
    let enrollment = Arc::new(Enrollment {
        master: resolved.master.clone(),
        tx: enrolled_tx,
        configured: resolved.cfg.intake.enrolled_hosts.clone(),
    });
    let backlog = Arc::new(super::intake::SocketBacklog::default());
    let hb_intake = serve_intake(
        &resolved,
        udp,
        events,
        intake_tx,
        metrics.clone(),
        streams.clone(),
        enrolled_rx,
        backlog.clone(),
    );
    let acking = hb_intake.acking();
    acking.store(false, Ordering::SeqCst);
    let (commands_tx, mut commands_rx) = mpsc::channel(64);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    serve_api(
        api,
        ApiHandle {
            snapshot: snapshot_rx,
            commands: commands_tx,
            metrics: metrics.clone(),
        },
        &resolved,
    );
    let controller_id = resolved.cfg.controller.id.clone();
    let cluster_id = resolved.cfg.controller.cluster_id.clone();
    let engine_config = resolved.cfg.engine_config();
    let leadership = leadership::start(etcd.clone());
    let mut state_rx = leadership.state.clone();
    let ctx = TermContext {
        resolved: Arc::new(resolved),
        etcd: etcd.clone(),
        factory,
        metrics: metrics.clone(),
        streams,
        enrollment: enrollment.clone(),
        backlog,
    };
    let clock = crate::clock::EngineClock::start();
    let mut follower = Follower {
        enrollment,
        hosts: HashMap::new(),
        store: None,
        settings: etcd.clone(),
        reading: None,
        engine: None,
        read_at: None,
        read_error: None,
    };
    let mut alarms: VecDeque<AlarmSnapshot> = VecDeque::new();
    let raise = |alarms: &mut VecDeque<AlarmSnapshot>, kind: AlarmKind, reason: String| {
        tracing::warn!(kind = ?kind, %reason, "ALARM");
        metrics
            .alarms
            .get_or_create(&Metrics::label("kind", format!("{kind:?}")))
            .inc();
        alarms.push_back(AlarmSnapshot {
            at_ms: clock.now().0,
            kind,
            host: None,
            resource: None,
            reason,
        });
        while alarms.len() > ALARMS_KEPT {
            alarms.pop_front();
        }
    };
    tracing::info!(?bound, controller = %controller_id, cluster = %cluster_id, endpoints = ?etcd.endpoints, "defib-controller ready (one of several: leader elected on etcd)");
    on_ready(&bound);

    let mut term: Option<Term> = None;
    let mut publish_tick = tokio::time::interval(PUBLISH_EVERY);
    publish_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_problem: Option<String> = None;
    tokio::pin!(shutdown);
    loop {
        let deadline_at = term.as_ref().and(leadership.deadline.until());
        tokio::select! {
            Some(msg) = intake_rx.recv() => {
                if let Intake::Heartbeats(batch) = &msg {
                    let now = clock.now();
                    for hb in batch {
                        follower.hosts.entry(hb.host.clone()).or_default().heard(hb, now);
                    }
                }
                match &term {
                    Some(t) => {
                        // Full: heartbeats are dropped and counted like the intake drops
                        // them (the engine learns it lost them); a stream's reply is
                        // dropped and its stream closes (resent later).
                        if let Err(mpsc::error::TrySendError::Full(Intake::Heartbeats(lost))) =
                            t.intake.try_send(msg)
                        {
                            metrics
                                .heartbeats_rejected
                                .get_or_create(&Metrics::label("reason", "engine_busy"))
                                .inc_by(lost.len() as u64);
                        }
                    }
                    None => refuse_intake(msg, &state_rx.borrow(), &controller_id),
                }
            }
            Some(cmd) = commands_rx.recv() => match &term {
                Some(t) => {
                    if let Err(mpsc::error::TrySendError::Full(cmd) | mpsc::error::TrySendError::Closed(cmd)) = t.commands.try_send(cmd) {
                        refuse_command(cmd, "the leader's engine is busy or ending its term; try again".into());
                    }
                }
                None => {
                    let why = not_leader_reason(&state_rx.borrow(), &controller_id);
                    refuse_command(cmd, why);
                }
            },
            changed = state_rx.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the leadership task ended");
                }
                let st = state_rx.borrow_and_update().clone();
                match (&st.role, &mut term) {
                    (Role::Leader { guard, .. }, None) => {
                        let heard = heard_ago(&follower.hosts, clock.now());
                        let t0 = Instant::now();
                        match Term::start(guard.clone(), leadership.deadline.clone(), heard, &ctx).await {
                            Ok(t) => {
                                tracing::info!(
                                    controller = %controller_id,
                                    term = st.term,
                                    revision = guard.create_revision,
                                    started_in_ms = t0.elapsed().as_millis() as u64,
                                    "LEADING: first guarded write done; the engine resumed from the intents on etcd"
                                );
                                metrics.leader.set(1);
                                metrics.leader_terms.inc();
                                acking.store(true, Ordering::SeqCst);
                                term = Some(t);
                            }
                            Err(e) => {
                                let why = format!("could not start leading: {e:#}");
                                raise(&mut alarms, AlarmKind::LeadershipLost, why.clone());
                                let _ = leadership.step_down.send(StepDown::Restart(why));
                            }
                        }
                    }
                    (Role::Leader { guard, .. }, Some(t)) if t.guard != *guard => {
                        // Cannot happen (a new term follows a follower phase), but a term
                        // must never outlive its guard.
                        end_term(&mut term, &acking, &metrics);
                        let _ = guard;
                    }
                    (Role::Follower { problem, .. }, Some(_)) => {
                        let why = problem.clone().unwrap_or_else(|| "the lease is gone".into());
                        end_term(&mut term, &acking, &metrics);
                        raise(&mut alarms, AlarmKind::LeadershipLost, format!("this controller stopped acting: {why}"));
                    }
                    (Role::Follower { problem, leader }, None) => {
                        // Alarm once per distinct problem, and only when nobody leads.
                        if leader.is_none() && problem.is_some() && *problem != last_problem {
                            raise(&mut alarms, AlarmKind::NoLeader, format!(
                                "no controller can be seen leading and this one cannot take the lead: {}",
                                problem.as_deref().unwrap_or("")));
                        }
                        last_problem = problem.clone();
                    }
                    _ => {}
                }
            }
            _ = sleep_until_opt(deadline_at) => {
                if !leadership.deadline.valid_now() {
                    // The supervisor's own check: the term stops at the deadline even if
                    // the election task is stuck.
                    end_term(&mut term, &acking, &metrics);
                    raise(&mut alarms, AlarmKind::LeadershipLost,
                        "this controller stopped acting: its lease was not renewed before the local deadline (cut off from etcd?)".into());
                }
            }
            ended = term_done(&mut term) => {
                let why = match ended {
                    Ok(()) => "the engine task ended".to_owned(),
                    Err(e) => e,
                };
                end_term(&mut term, &acking, &metrics);
                raise(&mut alarms, AlarmKind::LeadershipLost, format!("this controller stopped acting: {why}"));
                let _ = leadership.step_down.send(StepDown::Restart(why));
            }
            _ = publish_tick.tick() => {
                let st = state_rx.borrow().clone();
                let role = role_snapshot(&st, &controller_id, term.is_some());
                let mut snap = match &mut term {
                    Some(t) => (*t.snapshot.borrow_and_update()).as_ref().clone(),
                    None => follower_snapshot(&mut follower, &engine_config, (&controller_id, &cluster_id), clock.now()),
                };
                snap.role = role;
                snap.alarms.extend(alarms.iter().cloned());
                snap.alarms.sort_by_key(|a| a.at_ms);
                snapshot_tx.send_replace(Arc::new(snap));
            }
            _ = &mut shutdown => break,
        }
    }
    // Shutdown: end the term cleanly, then give the lease up so a follower takes over
    // without waiting for the TTL.
    if let Some(t) = &mut term {
        t.stop();
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut t.done).await;
    }
    acking.store(false, Ordering::SeqCst);
    let _ = leadership.step_down.send(StepDown::Retire);
    let mut st = leadership.state.clone();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while st.changed().await.is_ok() {
            if matches!(st.borrow().role, Role::Follower { .. }) {
                break;
            }
        }
    })
    .await;
    tracing::info!("defib-controller stopped");
    Ok(())
}

/// Stops the term (if any): no more acks, no more acting.
fn end_term(term: &mut Option<Term>, acking: &std::sync::atomic::AtomicBool, metrics: &Metrics) {
    acking.store(false, Ordering::SeqCst);
    if let Some(mut t) = term.take() {
        t.stop();
        tracing::warn!(
            revision = t.guard.create_revision,
            "term ended: this controller no longer acts"
        );
    }
    metrics.leader.set(0);
}

async fn term_done(term: &mut Option<Term>) -> Result<(), String> {
    match term {
        Some(t) => (&mut t.done)
            .await
            .unwrap_or_else(|_| Err("the term thread died".into())),
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// For each host and path: how long ago it was last heard.
fn heard_ago(hosts: &HashMap<String, HostInfo>, now: Timestamp) -> Vec<(HostId, PathId, Duration)> {
    hosts
        .iter()
        .flat_map(|(h, info)| {
            info.paths_heard().map(move |(path, at)| {
                (
                    HostId::new(h),
                    PathId(u16::from(path)),
                    Duration::from_millis(now.0.saturating_sub(at.0)),
                )
            })
        })
        .collect()
}

/// Why this controller does not act, for a refusal.
fn not_leader_reason(st: &LeadershipState, me: &str) -> String {
    match &st.role {
        Role::Follower {
            leader: Some(l), ..
        } => format!(
            "this controller ({me}) does not lead: the leader is {} ({}); send writes there",
            l.id, l.api
        ),
        Role::Follower {
            leader: None,
            problem,
        } => format!(
            "this controller ({me}) does not lead and no leader is known{}",
            problem
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        ),
        Role::Leader { .. } => format!("this controller ({me}) is taking the lead; try again"),
    }
}

fn refuse_intake(msg: Intake, st: &LeadershipState, me: &str) {
    match msg {
        Intake::Heartbeats(_) => {}
        Intake::Hello { reply, .. } => {
            let _ = reply.send(Err(not_leader_reason(st, me)));
        }
        Intake::Event { reply, .. } => {
            let _ = reply.send(Err(not_leader_reason(st, me)));
        }
    }
}

fn refuse_command(cmd: Command, why: String) {
    match cmd {
        Command::Maintenance { reply, .. } | Command::Unfence { reply, .. } => {
            let _ = reply.send(Err(why));
        }
        Command::Enrollment { reply, .. } => {
            let _ = reply.send(Err(why));
        }
    }
}

fn role_snapshot(st: &LeadershipState, me: &str, acting: bool) -> RoleSnapshot {
    let (leader, problem) = match &st.role {
        Role::Leader { since_unix_ms, .. } => (
            Some((
                me.to_owned(),
                st.members
                    .iter()
                    .find(|m| m.id == me)
                    .map(|m| m.api.clone()),
                *since_unix_ms,
            )),
            None,
        ),
        Role::Follower { leader, problem } => (
            leader
                .as_ref()
                .map(|l| (l.id.clone(), Some(l.api.clone()), l.since_unix_ms)),
            problem.clone(),
        ),
    };
    let leader_id = leader.as_ref().map(|l| l.0.clone());
    RoleSnapshot {
        role: if acting { "leader" } else { "follower" }.into(),
        store: "etcd".into(),
        leader: leader_id.clone(),
        leader_api: leader.as_ref().and_then(|l| l.1.clone()),
        leader_since_ms: leader.as_ref().map(|l| l.2),
        terms: st.term,
        problem,
        last_step_down: st.last_step_down.clone(),
        controllers: st
            .members
            .iter()
            .map(|m| ControllerSnapshot {
                id: m.id.clone(),
                api: m.api.clone(),
                started_ms: m.started_unix_ms,
                leader: leader_id.as_deref() == Some(m.id.as_str()),
            })
            .collect(),
    }
}

/// What a follower's read of the store gives back: the store, and the picture.
type FollowerRead = (EtcdStore, crate::store::StoreResult<Engine>);

/// A follower's picture: the leader's decisions as the intents on etcd imply them
/// (re-read every [`FOLLOWER_READ_EVERY`] on a blocking thread; the latest finished
/// read is shown), the hosts as this controller hears them.
fn follower_snapshot(
    f: &mut Follower,
    cfg: &crate::engine::Config,
    ids: (&str, &str),
    now: Timestamp,
) -> Snapshot {
    if let Some(rx) = &mut f.reading {
        match rx.try_recv() {
            Ok((store, result)) => {
                f.store = Some(store);
                f.reading = None;
                match result {
                    Ok(engine) => {
                        f.engine = Some(engine);
                        f.read_error = None;
                    }
                    Err(e) => f.read_error = Some(e.to_string()),
                }
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
            Err(oneshot::error::TryRecvError::Closed) => {
                // The read died (it panicked): the store went with it; open another.
                f.reading = None;
                f.read_error = Some("the store read failed".into());
            }
        }
    }
    let due = f.read_at.is_none_or(|t| t.elapsed() >= FOLLOWER_READ_EVERY);
    if due && f.reading.is_none() && f.store.is_none() {
        let e = &f.settings;
        match EtcdStore::open(
            e.endpoints.clone(),
            e.call_timeout,
            e.prefix.clone(),
            None,
            None,
        ) {
            Ok(store) => f.store = Some(store),
            Err(err) => f.read_error = Some(err.to_string()),
        }
    }
    if due && f.reading.is_none() {
        if let Some(store) = f.store.take() {
            f.read_at = Some(Instant::now());
            let cfg = cfg.clone();
            let (tx, rx) = oneshot::channel();
            f.reading = Some(rx);
            let enrollment = f.enrollment.clone();
            tokio::task::spawn_blocking(move || {
                match super::enrollment::read(&store) {
                    Ok(hosts) => {
                        enrollment.tx.send_if_modified(|current| {
                            let changed = *current != hosts;
                            if changed {
                                *current = hosts;
                            }
                            changed
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the enrolled hosts failed"),
                }
                let r = intent_log_snapshot(&store).and_then(|log| {
                    let hosts: Vec<HostId> = store
                        .event_high_waters()?
                        .into_iter()
                        .map(|(h, _)| HostId::new(&h))
                        .collect();
                    Ok(Engine::resume_knowing(cfg, &log, &hosts, now).0)
                });
                let _ = tx.send((store, r));
            });
        }
    }
    let mut engine = f.engine.clone().unwrap_or_else(|| Engine::new(cfg.clone()));
    // Hosts only this controller has heard of show too.
    let heard: Vec<(HostId, PathId, Timestamp)> = heard_ago(&f.hosts, now)
        .into_iter()
        .map(|(h, p, ago)| {
            (
                h,
                p,
                Timestamp(now.0.saturating_sub(ago.as_millis() as u64)),
            )
        })
        .collect();
    engine.note_heard(&heard);
    let hosts = engine.hosts();
    let mut alarms = Vec::new();
    if let Some(e) = &f.read_error {
        alarms.push(AlarmSnapshot {
            at_ms: now.0,
            kind: AlarmKind::NoLeader,
            host: None,
            resource: None,
            reason: format!("this follower cannot read the store on etcd: {e}"),
        });
    }
    snapshot_of(
        &engine,
        &hosts,
        &f.hosts,
        alarms,
        ids,
        now,
        RoleSnapshot::default(),
    )
}
