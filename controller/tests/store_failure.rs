//! The engine task when its store fails, each test named as the sentence it checks.
//!
//! A [`FaultyStore`] (a [`MemoryStore`] behind a switch the test holds) fails writes
//! from the Nth one, or from the first of a kind, as a full disk does (and keeps failing
//! until healed), or finds an intent already written by "another controller". Recording
//! edges note every action carried out and whether its intent was in the store at that
//! moment. Time is tokio's, paused: each test runs in milliseconds.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller::api::view::{Command, Snapshot};
use controller::edges::{Confirmer, Fencer, Restorer, ResultSender};
use controller::engine::{
    AlarmKind, Completion, Config, FenceMethod, HostId, HostState, IncidentId, Input, Intent,
    IntentEntry, IntentKey, IntentRecord, Resource, Source, TimelineEntry, Timestamp, Verdict,
};
use controller::metrics::Metrics;
use controller::runtime::engine_task::{
    Edges, EngineChannels, EngineTask, EngineTaskError, EngineTaskParts, STORE_PROBE_EVERY,
};
use controller::runtime::intake::{EventStored, HeartbeatSeen, Intake};
use controller::store::{MemoryStore, Store, StoreError, StoreResult};
use protocol::{BootId, Event, EventPayload, HostStatus};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// ------------------------------------------------------------------ the faulty store

/// A write, as a fault sees it.
#[derive(Debug)]
enum Write<'a> {
    Intent(&'a IntentRecord),
    Completion,
    Timeline,
    Event,
    Other,
}

/// Where the failing starts.
enum FailFrom {
    /// The Nth write (1-based, counting every kind).
    Nth(u64),
    /// The first write this picks.
    First(fn(&Write) -> bool),
}

/// The test's switch. Once a write fails, every later one fails too (a full disk stays
/// full) until [`Faults::heal`].
#[derive(Default)]
struct Faults {
    writes: u64,
    fail_from: Option<FailFrom>,
    failing: bool,
    /// Intents this picks are written by another controller just before ours.
    written_first_by_another: Option<fn(&IntentRecord) -> bool>,
}

impl Faults {
    fn fail_from(from: FailFrom) -> Self {
        Faults {
            fail_from: Some(from),
            ..Faults::default()
        }
    }

    fn heal(&mut self) {
        self.fail_from = None;
        self.failing = false;
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn disk_full() -> StoreError {
    StoreError::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        Some("database or disk is full".into()),
    ))
}

/// A [`MemoryStore`] (shared with the test, to look into) behind [`Faults`].
struct FaultyStore {
    data: Shared<MemoryStore>,
    faults: Shared<Faults>,
}

impl FaultyStore {
    fn check(&self, write: Write) -> StoreResult<()> {
        let mut f = self.faults.lock().unwrap();
        f.writes += 1;
        if !f.failing {
            f.failing = match &f.fail_from {
                Some(FailFrom::Nth(n)) => f.writes >= *n,
                Some(FailFrom::First(picks)) => picks(&write),
                None => false,
            };
        }
        if f.failing {
            Err(disk_full())
        } else {
            Ok(())
        }
    }
}

impl Store for FaultyStore {
    fn record_intent(&mut self, record: &IntentRecord) -> StoreResult<bool> {
        self.check(Write::Intent(record))?;
        let mut data = self.data.lock().unwrap();
        let by_another = self.faults.lock().unwrap().written_first_by_another;
        if by_another.is_some_and(|picks| picks(record)) {
            let mut theirs = record.clone();
            theirs.at = Timestamp(record.at.0.saturating_sub(1));
            data.record_intent(&theirs)?;
        }
        data.record_intent(record)
    }
    fn complete_intent(&mut self, key: &IntentKey, completion: &Completion) -> StoreResult<()> {
        self.check(Write::Completion)?;
        self.data.lock().unwrap().complete_intent(key, completion)
    }
    fn intents(&self) -> StoreResult<Vec<IntentEntry>> {
        self.data.lock().unwrap().intents()
    }
    fn append_timeline(&mut self, incident: IncidentId, entry: &TimelineEntry) -> StoreResult<()> {
        self.check(Write::Timeline)?;
        self.data.lock().unwrap().append_timeline(incident, entry)
    }
    fn timeline(&self, incident: IncidentId) -> StoreResult<Vec<TimelineEntry>> {
        self.data.lock().unwrap().timeline(incident)
    }
    fn incidents_with_timelines(&self) -> StoreResult<Vec<(IncidentId, Vec<TimelineEntry>)>> {
        self.data.lock().unwrap().incidents_with_timelines()
    }
    fn record_event(&mut self, host: &str, id: u64, at: u64, json: &str) -> StoreResult<bool> {
        self.check(Write::Event)?;
        self.data.lock().unwrap().record_event(host, id, at, json)
    }
    fn event_high_water(&self, host: &str) -> StoreResult<u64> {
        self.data.lock().unwrap().event_high_water(host)
    }
    fn event_high_waters(&self) -> StoreResult<Vec<(String, u64)>> {
        self.data.lock().unwrap().event_high_waters()
    }
    fn prune_events(&mut self, before_unix_ms: u64) -> StoreResult<u64> {
        self.check(Write::Other)?;
        self.data.lock().unwrap().prune_events(before_unix_ms)
    }
    fn events_of_kind(&self, kind: &str) -> StoreResult<Vec<(String, String)>> {
        self.data.lock().unwrap().events_of_kind(kind)
    }
    fn set_meta(&mut self, key: &str, value: &str) -> StoreResult<()> {
        self.check(Write::Other)?;
        self.data.lock().unwrap().set_meta(key, value)
    }
    fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        self.data.lock().unwrap().get_meta(key)
    }
    fn flush(&mut self) -> StoreResult<()> {
        Ok(())
    }
}

fn is_fence_intent(w: &Write) -> bool {
    matches!(w, Write::Intent(r) if matches!(r.intent, Intent::Fence { .. }))
}

fn is_fence_record(r: &IntentRecord) -> bool {
    matches!(r.intent, Intent::Fence { .. })
}

// ----------------------------------------------------------------- recording edges

/// An action an edge was handed.
#[derive(Debug, Clone)]
struct Carried {
    what: &'static str,
    host: HostId,
    key: Option<IntentKey>,
    /// Whether its intent was in the store when the edge got it.
    intent_stored: bool,
}

#[derive(Clone)]
struct Recorder {
    data: Shared<MemoryStore>,
    carried: Shared<Vec<Carried>>,
}

impl Recorder {
    fn note(&self, what: &'static str, host: &HostId, key: Option<&IntentKey>) {
        let intent_stored = key.is_some_and(|k| {
            let data = self.data.lock().unwrap();
            data.intents().unwrap().iter().any(|e| &e.record.key == k)
        });
        self.carried.lock().unwrap().push(Carried {
            what,
            host: host.clone(),
            key: key.cloned(),
            intent_stored,
        });
    }

    fn carried(&self, what: &str) -> Vec<Carried> {
        let all = self.carried.lock().unwrap();
        all.iter().filter(|c| c.what == what).cloned().collect()
    }
}

/// Records fences; never answers (the tests look at what was asked).
struct RecordingFencer(Recorder);

impl Fencer for RecordingFencer {
    fn fence(&mut self, host: &HostId, _method: FenceMethod, key: &IntentKey) {
        self.0.note("fence", host, Some(key));
    }
}

struct RecordingRestorer(Recorder);

impl Restorer for RecordingRestorer {
    fn force_down(&mut self, host: &HostId, key: &IntentKey) {
        self.0.note("force_down", host, Some(key));
    }
    fn restart_in_place(&mut self, _: &Resource, host: &HostId, _: u32, key: &IntentKey) {
        self.0.note("restart_in_place", host, Some(key));
    }
    fn evacuate(&mut self, _: &Resource, from: &HostId, key: &IntentKey) {
        self.0.note("evacuate", from, Some(key));
    }
    fn unfence(&mut self, host: &HostId, key: &IntentKey) {
        self.0.note("unfence", host, Some(key));
    }
}

/// Records confirmations and answers each: the host is dead (Pacemaker says so).
struct DeadConfirmer(Recorder, ResultSender);

impl Confirmer for DeadConfirmer {
    fn confirm(&mut self, host: &HostId) {
        self.0.note("confirm", host, None);
        let _ = self.1.send(Input::ConfirmationResult {
            host: host.clone(),
            source: Source::Pacemaker,
            verdict: Verdict::Dead,
        });
    }
}

// ------------------------------------------------------------------------ harness

/// One controller life: the engine task on a [`FaultyStore`], fed heartbeats every
/// 100 ms from the hosts in `alive`.
struct Life {
    channels: EngineChannels,
    task: JoinHandle<Result<(), EngineTaskError>>,
    edges: Recorder,
    metrics: Arc<Metrics>,
    heartbeats: JoinHandle<()>,
}

fn hosts(names: &[&str]) -> Shared<BTreeSet<String>> {
    Arc::new(Mutex::new(names.iter().map(|h| h.to_string()).collect()))
}

fn switch(faults: Faults) -> Shared<Faults> {
    Arc::new(Mutex::new(faults))
}

fn start(
    data: &Shared<MemoryStore>,
    faults: &Shared<Faults>,
    alive: &Shared<BTreeSet<String>>,
) -> Life {
    let metrics = Arc::new(Metrics::new());
    let edges = Recorder {
        data: data.clone(),
        carried: Arc::default(),
    };
    let store = FaultyStore {
        data: data.clone(),
        faults: faults.clone(),
    };
    let parts = EngineTaskParts {
        engine_config: Config::default(),
        store: Box::new(store),
        metrics: metrics.clone(),
        controller_id: "ctl-t".into(),
        cluster_id: "t".into(),
        heard: Vec::new(),
        end_on_store_failure: false,
        role: Default::default(),
        enrollment: None,
        backlog: Default::default(),
    };
    let recorder = edges.clone();
    let (task, channels) = EngineTask::new(parts, |links| Edges {
        fencer: Box::new(RecordingFencer(recorder.clone())),
        restorer: Box::new(RecordingRestorer(recorder.clone())),
        confirmer: Box::new(DeadConfirmer(recorder, links.results.clone())),
        copies: Box::new(controller::edges::stale_copies::NoStreams),
    })
    .expect("engine task");
    let task = tokio::spawn(task.run(std::future::pending::<()>()));
    let intake = channels.intake.clone();
    let alive = alive.clone();
    let heartbeats = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for seq in 1u64.. {
            every.tick().await;
            let now: Vec<String> = alive.lock().unwrap().iter().cloned().collect();
            for host in now {
                let _ = intake
                    .send(Intake::Heartbeats(vec![HeartbeatSeen {
                        host,
                        path: 0,
                        peer: "127.0.0.1:9".parse().unwrap(),
                        boot_id: BootId([1; 16]),
                        incarnation: 1,
                        sent_unix_ns: seq * 100_000_000,
                        status: HostStatus::default(),
                        received: tokio::time::Instant::now(),
                    }]))
                    .await;
            }
        }
    });
    Life {
        channels,
        task,
        edges,
        metrics,
        heartbeats,
    }
}

impl Life {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.channels.snapshot.borrow().clone()
    }

    fn state(&self, host: &str) -> Option<HostState> {
        self.snapshot()
            .hosts
            .iter()
            .find(|h| h.host == host)
            .map(|h| h.state)
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn stopped_acting(&self) -> bool {
        self.metrics()
            .lines()
            .any(|l| l == "defib_stopped_acting 1")
    }

    /// Waits (on the paused clock) until `cond` holds, at most 30 s.
    async fn until(&self, what: &str, cond: impl Fn(&Life) -> bool) {
        for _ in 0..3_000 {
            if cond(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}\n{}", self.metrics());
    }

    async fn maintenance(&self, host: &str, on: bool) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.channels
            .commands
            .send(Command::Maintenance {
                host: host.into(),
                on,
                reply,
            })
            .await
            .unwrap();
        answer.await.unwrap()
    }

    async fn event(&self, host: &str, id: u64) -> Result<EventStored, String> {
        let (reply, answer) = oneshot::channel();
        let event = Event {
            id,
            unix_ns: 1_000_000_000,
            mono_ns: 1,
            payload: EventPayload::QemuStarted {
                vm_uuid: Some("vm-1".into()),
                vm_name: None,
                pid: 100,
            },
        };
        self.channels
            .intake
            .send(Intake::Event {
                host: host.into(),
                event: Box::new(event),
                reply,
            })
            .await
            .unwrap();
        answer.await.unwrap()
    }

    /// The task's end, which must come within `within`.
    async fn ends_within(self, within: Duration) -> Result<(), EngineTaskError> {
        let Life {
            task, heartbeats, ..
        } = self;
        let ended = tokio::time::timeout(within, task)
            .await
            .expect("the engine task ended")
            .expect("the engine task did not panic");
        heartbeats.abort();
        ended
    }
}

fn fence_intents(data: &Shared<MemoryStore>) -> Vec<IntentEntry> {
    let data = data.lock().unwrap();
    let all = data.intents().unwrap();
    all.into_iter()
        .filter(|e| is_fence_record(&e.record))
        .collect()
}

// -------------------------------------------------------------------------- tests

#[tokio::test(start_paused = true)]
async fn the_action_behind_an_intent_that_could_not_be_written_is_never_carried_out() {
    let data: Shared<MemoryStore> = Arc::default();
    let alive = hosts(&["h0", "h1", "h2", "h3"]);
    let life = start(
        &data,
        &switch(Faults::fail_from(FailFrom::First(is_fence_intent))),
        &alive,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(life.state("h1"), Some(HostState::Up));

    // h1 dies: suspected, confirmed dead, and the engine decides to fence it. Its
    // intent cannot be written.
    alive.lock().unwrap().remove("h1");
    life.until("the controller stopped acting", |l| l.stopped_acting())
        .await;
    assert_eq!(life.edges.carried("confirm").len(), 1, "h1 was confirmed");
    assert!(
        life.edges.carried("fence").is_empty(),
        "a fence whose intent is not on disk was carried out: {:?}",
        life.edges.carried("fence")
    );
    assert!(fence_intents(&data).is_empty());
    let m = life.metrics();
    assert!(
        m.contains("defib_store_write_failures_total{reason=\"error\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("defib_alarms_total{kind=\"StoreWriteFailed\"} 1"),
        "{m}"
    );

    // Stopped means stopped: the engine takes nothing more in, so h2's death is not
    // acted on either, and the fence the engine believes in is never carried out.
    alive.lock().unwrap().remove("h2");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        life.edges.carried("confirm").len(),
        1,
        "h2 was not confirmed"
    );
    assert!(life.edges.carried("fence").is_empty());
    // Nor is anything else written or done: an operator's command is refused with the
    // reason (and listed with the alarms), an event is not stored (so not acked: the
    // watchdog sends it again to the restarted controller).
    let refused = life.maintenance("h3", true).await.unwrap_err();
    assert!(refused.contains("stopped acting"), "{refused}");
    assert!(refused.contains("disk is full"), "{refused}");
    let alarms = &life.snapshot().alarms;
    assert!(
        alarms
            .iter()
            .any(|a| a.kind == AlarmKind::CommandRefused && a.reason == refused),
        "{alarms:?}"
    );
    let event = life.event("h0", 1).await.unwrap_err();
    assert!(event.contains("not stored"), "{event}");
    assert_eq!(data.lock().unwrap().event_high_water("h0").unwrap(), 0);
    // The disk is still full: the task waits, it does not end.
    assert!(!life.task.is_finished());
    assert!(life.stopped_acting());
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_stops_every_action_behind_it_and_the_restart_resumes_from_what_was_persisted(
) {
    let data: Shared<MemoryStore> = Arc::default();
    let alive = hosts(&["h0", "h1", "h2", "h3"]);
    let faults = switch(Faults::default());
    let life = start(&data, &faults, &alive);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Written while the store works: kept.
    life.maintenance("h3", true).await.unwrap();
    let kept = data.lock().unwrap().intents().unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");

    // The disk fills after one more write: h1's first timeline line (Up → Suspect) is
    // written, the second (Suspect → Confirming) fails, and the confirmation behind it
    // in the same batch never goes out.
    {
        let mut f = faults.lock().unwrap();
        f.fail_from = Some(FailFrom::Nth(f.writes + 2));
    }
    alive.lock().unwrap().remove("h1");
    life.until("the controller stopped acting", |l| l.stopped_acting())
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(life.edges.carried("confirm").is_empty());
    assert!(life.edges.carried("fence").is_empty());
    let lines = data.lock().unwrap().incidents_with_timelines().unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        (lines[0].1.len(), lines[0].1[0].to.as_str()),
        (1, "Suspect"),
        "{lines:?}"
    );

    // Space is freed: the next probe write succeeds and the task ends, saying why, so
    // that the controller restarts.
    faults.lock().unwrap().heal();
    let ended = life.ends_within(STORE_PROBE_EVERY * 2).await.unwrap_err();
    match &ended {
        EngineTaskError::StoppedActing { write, error } => {
            assert!(write.contains("timeline line"), "{write}");
            assert!(error.contains("disk is full"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(ended.to_string().contains("restart"), "{ended}");
    assert_eq!(
        data.lock().unwrap().intents().unwrap(),
        kept,
        "the store holds what was persisted before the failure, nothing after it"
    );

    // The restart: a new task on the same store. Heartbeats from the healthy hosts went
    // unheard while the task was stopped; they are not held against them.
    alive.lock().unwrap().insert("h1".into());
    let life = start(&data, &switch(Faults::default()), &alive);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        life.state("h3"),
        Some(HostState::Maintenance),
        "the persisted intent is resumed"
    );
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for h in ["h0", "h1", "h2"] {
            assert_eq!(life.state(h), Some(HostState::Up), "{h}");
        }
    }
    assert!(life.edges.carried("confirm").is_empty());
    assert!(!life.stopped_acting());
}

#[tokio::test(start_paused = true)]
async fn an_intent_already_in_the_store_is_a_refusal_and_its_action_is_never_carried_out() {
    let data: Shared<MemoryStore> = Arc::default();
    let alive = hosts(&["h0", "h1", "h2", "h3"]);
    let faults = Faults {
        written_first_by_another: Some(is_fence_record),
        ..Faults::default()
    };
    let life = start(&data, &switch(faults), &alive);
    tokio::time::sleep(Duration::from_secs(1)).await;
    alive.lock().unwrap().remove("h1");
    life.until("the controller stopped acting", |l| l.stopped_acting())
        .await;
    assert!(
        life.edges.carried("fence").is_empty(),
        "a fence whose key another writer holds was carried out"
    );
    let m = life.metrics();
    assert!(
        m.contains("defib_store_write_failures_total{reason=\"intent_exists\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("defib_alarms_total{kind=\"IntentExists\"} 1"),
        "{m}"
    );

    // The store takes writes, so the task ends at the first probe: the restart resumes
    // from the store, whose intents are the truth.
    let ended = life.ends_within(STORE_PROBE_EVERY * 2).await.unwrap_err();
    assert!(
        ended.to_string().contains("already in the store"),
        "{ended}"
    );
    let theirs = fence_intents(&data);
    assert_eq!(theirs.len(), 1);

    let life = start(&data, &switch(Faults::default()), &alive);
    life.until("the stored fence is handed out again", |l| {
        !l.edges.carried("fence").is_empty()
    })
    .await;
    let fences = life.edges.carried("fence");
    assert_eq!(fences.len(), 1, "{fences:?}");
    assert_eq!(fences[0].host, HostId::new("h1"));
    assert_eq!(fences[0].key.as_ref(), Some(&theirs[0].record.key));
    assert!(fences[0].intent_stored);
}

#[tokio::test(start_paused = true)]
async fn an_event_that_cannot_be_stored_is_not_acked_and_stops_all_acting() {
    let data: Shared<MemoryStore> = Arc::default();
    let alive = hosts(&["h0", "h1", "h2", "h3"]);
    let life = start(
        &data,
        &switch(Faults::fail_from(FailFrom::First(|w| {
            matches!(w, Write::Event)
        }))),
        &alive,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refused = life.event("h0", 1).await.unwrap_err();
    assert!(refused.contains("not stored"), "{refused}");
    assert!(life.stopped_acting());
    alive.lock().unwrap().remove("h1");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(life.edges.carried("confirm").is_empty());
    assert!(life.edges.carried("fence").is_empty());
}
