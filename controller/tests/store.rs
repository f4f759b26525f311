//! The durable store: each test named as the sentence it checks. The behaviour tests
//! run against both stores ([`SqliteStore`] and [`MemoryStore`]); the durability tests
//! use a real file in a temporary directory.

use std::collections::BTreeSet;

use controller::engine::{
    Action, Completion, Config, Engine, FenceOutcome, FenceVerifier, Heartbeat, HostEvent, HostId,
    HostState, HostTime, IncidentId, Input, Intent, IntentKey, IntentLog, IntentOutcome,
    IntentRecord, ListedAt, MemoryIntentLog, PathId, Resource, RestoreOutcome, Source, Subject,
    TimelineEntry, TimerId, Timestamp, Verdict,
};
use controller::store::{
    intent_log_snapshot, MemoryStore, SqliteStore, Store, StoreError, SCHEMA_VERSION,
};

// ------------------------------------------------------------------------ helpers

/// Runs `check` on a fresh store of every kind: SQLite in memory and in a file, the
/// in-memory store, and the etcd store of a leader on a real (one-member) etcd.
fn on_every_store(check: impl Fn(&mut dyn Store)) {
    let mut sqlite = SqliteStore::open_in_memory().expect("in-memory sqlite");
    check(&mut sqlite);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut file = SqliteStore::open(dir.path().join("defib.db")).expect("sqlite file");
    check(&mut file);
    let mut memory = MemoryStore::new();
    check(&mut memory);
    if let Some(etcd) = etcd::OneEtcd::start() {
        let (mut store, _lease) = etcd.leader_store("/defib/contract/");
        check(&mut store);
    }
}

#[path = "support/etcd.rs"]
mod etcd;

fn key(s: &str) -> IntentKey {
    IntentKey(s.to_owned())
}

fn fence_record(k: &str, incident: u64, at: u64) -> IntentRecord {
    IntentRecord {
        key: key(k),
        at: Timestamp(at),
        intent: Intent::Fence {
            host: HostId::new("cmp-07"),
            incident: IncidentId(incident),
            attempt: 1,
            method: Some(controller::engine::FenceMethod::Ipmi),
            resources: vec![Resource::vm("5f0c"), Resource::router("r1")],
            rbd_only: vec![],
        },
    }
}

fn maintenance_record(k: &str, at: u64) -> IntentRecord {
    IntentRecord {
        key: key(k),
        at: Timestamp(at),
        intent: Intent::Maintenance {
            host: HostId::new("cmp-01"),
            on: true,
        },
    }
}

fn verified(at: u64) -> Completion {
    Completion {
        at: Timestamp(at),
        outcome: IntentOutcome::Fence(FenceOutcome::Verified(FenceVerifier::IpmiPowerOff)),
        host_clock: None,
        fenced_watchdog: Some((7, 1)),
    }
}

fn line(at: u64, cause: &str) -> TimelineEntry {
    TimelineEntry {
        at: Timestamp(at),
        subject: Subject::Host(HostId::new("cmp-07")),
        from: "Up".into(),
        to: "Suspect".into(),
        cause: cause.into(),
        source: Source::Heartbeat,
    }
}

// ----------------------------------------------------------- behaviour (both stores)

#[test]
fn intents_round_trip_with_their_completions_in_recording_order() {
    on_every_store(|s| {
        // Recorded out of key and time order on purpose: recording order wins.
        let records = [
            fence_record("i9/fence-1/host:cmp-07", 9, 300),
            maintenance_record("op/maintenance-on/host:cmp-01", 100),
            fence_record("i2/fence-1/host:cmp-07", 2, 200),
        ];
        for r in &records {
            assert!(s.record_intent(r).unwrap());
        }
        s.complete_intent(&records[2].key, &verified(250)).unwrap();
        let back = s.intents().unwrap();
        assert_eq!(back.len(), 3);
        for (e, r) in back.iter().zip(&records) {
            assert_eq!(&e.record, r);
        }
        assert_eq!(back[0].done, None);
        assert_eq!(back[1].done, None);
        assert_eq!(back[2].done, Some(verified(250)));
    });
}

#[test]
fn recording_an_existing_key_is_a_no_op() {
    on_every_store(|s| {
        let first = fence_record("i1/fence-1/host:cmp-07", 1, 10);
        assert!(s.record_intent(&first).unwrap());
        let mut other = fence_record("i1/fence-1/host:cmp-07", 1, 99);
        other.intent = Intent::Unfence {
            host: HostId::new("elsewhere"),
            before_return: false,
        };
        assert!(!s.record_intent(&other).unwrap());
        assert!(!s.record_intent(&first).unwrap());
        let back = s.intents().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].record, first);
    });
}

#[test]
fn completing_twice_keeps_the_first_completion() {
    on_every_store(|s| {
        let r = fence_record("i1/fence-1/host:cmp-07", 1, 10);
        s.record_intent(&r).unwrap();
        s.complete_intent(&r.key, &verified(20)).unwrap();
        let failed = Completion {
            at: Timestamp(30),
            outcome: IntentOutcome::Fence(FenceOutcome::Failed {
                reason: "late".into(),
            }),
            host_clock: None,
            fenced_watchdog: None,
        };
        s.complete_intent(&r.key, &failed).unwrap();
        // An unknown key is a no-op too, and creates nothing.
        s.complete_intent(&key("i5/nothing/host:x"), &failed)
            .unwrap();
        let back = s.intents().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].done, Some(verified(20)));
    });
}

#[test]
fn timelines_come_back_per_incident_in_order() {
    on_every_store(|s| {
        s.append_timeline(IncidentId(7), &line(5, "a")).unwrap();
        s.append_timeline(IncidentId(3), &line(9, "b")).unwrap();
        // Same instant as the line before: insertion order, not time, decides.
        s.append_timeline(IncidentId(7), &line(5, "c")).unwrap();
        s.append_timeline(IncidentId(7), &line(4, "d")).unwrap();
        let causes = |t: &[TimelineEntry]| t.iter().map(|l| l.cause.clone()).collect::<Vec<_>>();
        assert_eq!(causes(&s.timeline(IncidentId(7)).unwrap()), ["a", "c", "d"]);
        assert_eq!(causes(&s.timeline(IncidentId(3)).unwrap()), ["b"]);
        assert!(s.timeline(IncidentId(4)).unwrap().is_empty());
        let all = s.incidents_with_timelines().unwrap();
        assert_eq!(
            all.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [IncidentId(3), IncidentId(7)]
        );
        assert_eq!(all[1].1, s.timeline(IncidentId(7)).unwrap());
        assert_eq!(all[1].1[0], line(5, "a"));
    });
}

#[test]
fn a_duplicate_or_older_event_is_not_stored_and_the_high_water_mark_only_rises() {
    on_every_store(|s| {
        assert_eq!(s.event_high_water("cmp-07").unwrap(), 0);
        assert!(s.record_event("cmp-07", 1, 1_000, r#"{"n":1}"#).unwrap());
        assert!(s.record_event("cmp-07", 2, 1_001, r#"{"n":2}"#).unwrap());
        assert!(!s
            .record_event("cmp-07", 2, 1_002, r#"{"n":"dup"}"#)
            .unwrap());
        assert!(!s
            .record_event("cmp-07", 1, 1_002, r#"{"n":"old"}"#)
            .unwrap());
        // A gap (lost events) is still new; the mark jumps.
        assert!(s.record_event("cmp-07", 5, 1_003, r#"{"n":5}"#).unwrap());
        assert!(!s.record_event("cmp-07", 4, 1_004, r#"{"n":4}"#).unwrap());
        // Id 0 means "none" in the protocol: never an event.
        assert!(!s.record_event("cmp-01", 0, 1_000, "{}").unwrap());
        assert!(s.record_event("cmp-01", 1, 1_000, "{}").unwrap());
        assert_eq!(s.event_high_water("cmp-07").unwrap(), 5);
        assert_eq!(s.event_high_water("cmp-01").unwrap(), 1);
        assert_eq!(
            s.event_high_waters().unwrap(),
            [("cmp-01".to_owned(), 1), ("cmp-07".to_owned(), 5)]
        );
    });
}

#[test]
fn pruning_events_keeps_the_high_water_marks() {
    on_every_store(|s| {
        for id in 1..=4 {
            assert!(s.record_event("h", id, 1_000 * id, "{}").unwrap());
        }
        assert_eq!(s.prune_events(3_000).unwrap(), 2);
        assert_eq!(s.prune_events(3_000).unwrap(), 0);
        assert_eq!(s.event_high_water("h").unwrap(), 4);
        // A resend of a pruned event is still a duplicate.
        assert!(!s.record_event("h", 1, 9_000, "{}").unwrap());
        assert_eq!(s.prune_events(u64::MAX).unwrap(), 2);
        assert_eq!(s.event_high_waters().unwrap(), [("h".to_owned(), 4)]);
    });
}

#[test]
fn meta_values_are_set_read_and_overwritten() {
    on_every_store(|s| {
        assert_eq!(s.get_meta("incarnation").unwrap(), None);
        s.set_meta("incarnation", "1").unwrap();
        s.set_meta("incarnation", "2").unwrap();
        assert_eq!(s.get_meta("incarnation").unwrap().as_deref(), Some("2"));
        s.flush().unwrap();
    });
}

#[test]
fn the_store_actions_of_an_engine_batch_are_applied_and_the_rest_left_alone() {
    on_every_store(|s| {
        let r = fence_record("i1/fence-1/host:cmp-07", 1, 10);
        let batch = [
            Action::PersistIntent(r.clone()),
            Action::Fence {
                host: HostId::new("cmp-07"),
                method_hint: controller::engine::FenceMethod::Ipmi,
                key: r.key.clone(),
            },
            Action::RecordTimeline {
                incident: IncidentId(1),
                entry: line(10, "fencing"),
            },
            Action::CompleteIntent {
                key: r.key.clone(),
                completion: verified(20),
            },
        ];
        let handled: Vec<bool> = batch.iter().map(|a| s.apply_action(a).unwrap()).collect();
        assert_eq!(handled, [true, false, true, true]);
        let log = intent_log_snapshot(s).unwrap();
        assert_eq!(log.entries(), s.intents().unwrap());
        assert_eq!(log.get(&r.key).unwrap().done, Some(verified(20)));
        assert_eq!(s.timeline(IncidentId(1)).unwrap(), [line(10, "fencing")]);
    });
}

#[test]
fn an_intent_whose_key_is_already_stored_is_refused_not_taken_as_recorded() {
    on_every_store(|s| {
        // Whoever wrote it first (another controller on the same store, a wrong
        // replay), it is not this engine: the engine never issues a key twice.
        let theirs = fence_record("i1/fence-1/host:cmp-07", 1, 10);
        assert!(s.record_intent(&theirs).unwrap());
        let mut ours = theirs.clone();
        ours.at = Timestamp(99);
        let err = s
            .apply_action(&Action::PersistIntent(ours.clone()))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::IntentExists { key } if *key == ours.key),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(ours.key.as_str()) && msg.contains("refused"),
            "{msg}"
        );
        // The store keeps what it had.
        let back = s.intents().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].record, theirs);
    });
}

#[test]
fn a_store_is_an_object_that_can_move_to_the_engine_task() {
    fn needs_send<T: Send>(_: &T) {}
    let boxed: Vec<Box<dyn Store>> = vec![
        Box::new(SqliteStore::open_in_memory().unwrap()),
        Box::new(MemoryStore::new()),
    ];
    fn etcd_store_is_send(s: controller::ha::EtcdStore) -> Box<dyn Store + Send> {
        Box::new(s)
    }
    let _ = etcd_store_is_send;
    needs_send(&boxed);
}

// ------------------------------------------------------- the etcd store's guard

#[test]
fn a_deposed_leaders_writes_are_refused_by_etcd_and_change_nothing() {
    let Some(etcd) = etcd::OneEtcd::start() else {
        return;
    };
    let prefix = "/defib/deposed/";
    let (mut old, old_lease) = etcd.leader_store(prefix);
    assert!(old
        .record_intent(&fence_record("i1/fence-1/host:cmp-07", 1, 10))
        .unwrap());
    // Its lease ends (expired or revoked) and another controller takes the lead.
    etcd.revoke(old_lease);
    let (mut new, _) = etcd.leader_store(prefix);
    let refused = [
        old.record_intent(&fence_record("i2/fence-1/host:cmp-07", 2, 20))
            .map(|_| ()),
        old.complete_intent(&key("i1/fence-1/host:cmp-07"), &verified(30)),
        old.append_timeline(IncidentId(1), &line(30, "late")),
        old.record_event("cmp-07", 1, 30, "{}").map(|_| ()),
        old.set_meta("x", "y"),
    ];
    for r in refused {
        let err = r.unwrap_err();
        assert!(matches!(&err, StoreError::NotLeader(_)), "{err:?}");
        assert!(
            err.to_string().contains("another controller leads"),
            "{err}"
        );
    }
    // Nothing of the deposed leader's late writes is there; the new leader writes.
    let back = new.intents().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].done, None);
    assert!(new.timeline(IncidentId(1)).unwrap().is_empty());
    assert_eq!(new.event_high_water("cmp-07").unwrap(), 0);
    assert!(new
        .record_intent(&fence_record("i2/fence-1/host:cmp-07", 2, 20))
        .unwrap());
}

#[test]
fn a_followers_etcd_store_reads_but_refuses_every_write() {
    let Some(etcd) = etcd::OneEtcd::start() else {
        return;
    };
    let prefix = "/defib/follower/";
    let (mut leader, _) = etcd.leader_store(prefix);
    leader
        .record_intent(&fence_record("i1/fence-1/host:cmp-07", 1, 10))
        .unwrap();
    let mut follower = controller::ha::EtcdStore::open(
        vec![etcd.endpoint.clone()],
        std::time::Duration::from_secs(2),
        prefix.to_owned(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(follower.intents().unwrap().len(), 1);
    let err = follower.set_meta("x", "y").unwrap_err();
    assert!(
        matches!(&err, StoreError::NotLeader(m) if m.contains("read-only")),
        "{err:?}"
    );
}

#[test]
#[allow(clippy::disallowed_methods)] // synchronous test code
fn a_write_of_a_leader_past_its_local_deadline_is_not_reported_as_done() {
    let Some(etcd) = etcd::OneEtcd::start() else {
        return;
    };
    let prefix = "/defib/deadline/";
    let guard = etcd.take_lead(prefix);
    let deadline =
        controller::ha::leadership::SharedDeadline::new(std::time::Duration::from_millis(100));
    deadline.renewed(
        tokio::time::Instant::now(),
        std::time::Duration::from_millis(300),
    );
    let mut store = controller::ha::EtcdStore::open(
        vec![etcd.endpoint.clone()],
        std::time::Duration::from_secs(2),
        prefix.to_owned(),
        Some(guard),
        Some(deadline),
    )
    .unwrap();
    assert!(store
        .record_intent(&fence_record("i1/fence-1/host:cmp-07", 1, 10))
        .unwrap());
    // The lease is still alive on etcd's side, but this controller's deadline passed:
    // it must not act, so no write may say it succeeded.
    std::thread::sleep(std::time::Duration::from_millis(250));
    let err = store
        .record_intent(&fence_record("i2/fence-1/host:cmp-07", 2, 20))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotLeader(m) if m.contains("deadline")),
        "{err:?}"
    );
    assert_eq!(store.intents().unwrap().len(), 1);
}

// ------------------------------------------------------------- durability (files)

#[test]
fn data_survives_close_and_reopen_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    let open = fence_record("i1/fence-2/host:cmp-07", 1, 30);
    let done = fence_record("i1/fence-1/host:cmp-07", 1, 10);
    {
        let mut s = SqliteStore::open(&path).unwrap();
        s.record_intent(&done).unwrap();
        s.complete_intent(&done.key, &verified(20)).unwrap();
        s.record_intent(&open).unwrap();
        s.append_timeline(IncidentId(1), &line(10, "fence decided"))
            .unwrap();
        s.set_meta("incarnation", "41").unwrap();
        // No flush: every write is durable when its method returns.
    }
    let mut s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    let back = s.intents().unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].record, done);
    assert_eq!(back[0].done, Some(verified(20)));
    assert_eq!(back[1].record, open);
    assert_eq!(back[1].done, None);
    assert_eq!(
        s.incidents_with_timelines().unwrap(),
        [(IncidentId(1), vec![line(10, "fence decided")])]
    );
    assert_eq!(s.get_meta("incarnation").unwrap().as_deref(), Some("41"));
    // And it keeps working after the reopen.
    assert!(!s.record_intent(&done).unwrap());
    s.complete_intent(&open.key, &verified(40)).unwrap();
    s.flush().unwrap();
    drop(s);
    let s = SqliteStore::open(&path).unwrap();
    assert!(s.intents().unwrap().iter().all(|e| e.done.is_some()));
}

#[test]
fn every_write_is_on_disk_when_its_method_returns_without_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    let crashed = dir.path().join("crashed.db");
    let r = fence_record("i1/fence-1/host:cmp-07", 1, 10);
    let mut s = SqliteStore::open(&path).unwrap();
    s.record_intent(&r).unwrap();
    s.complete_intent(&r.key, &verified(20)).unwrap();
    assert!(s.record_event("cmp-07", 3, 1_000, "{}").unwrap());
    // What a power cut leaves behind: the files as they are while the store is open
    // (no checkpoint, no clean close).
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", path.display());
        if std::path::Path::new(&from).exists() {
            std::fs::copy(&from, format!("{}{suffix}", crashed.display())).unwrap();
        }
    }
    let c = SqliteStore::open(&crashed).unwrap();
    let back = c.intents().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].record, r);
    assert_eq!(back[0].done, Some(verified(20)));
    assert_eq!(c.event_high_water("cmp-07").unwrap(), 3);
    drop(s);
}

#[test]
fn event_dedup_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    {
        let mut s = SqliteStore::open(&path).unwrap();
        for id in 1..=3 {
            assert!(s.record_event("cmp-07", id, 1_000 + id, "{}").unwrap());
        }
        assert!(s.record_event("cmp-08", 10, 1_000, "{}").unwrap());
    }
    let mut s = SqliteStore::open(&path).unwrap();
    assert_eq!(
        s.event_high_waters().unwrap(),
        [("cmp-07".to_owned(), 3), ("cmp-08".to_owned(), 10)]
    );
    // The watchdog resends everything after a reconnect: only the new one is stored.
    let stored: Vec<bool> = (1..=4)
        .map(|id| s.record_event("cmp-07", id, 2_000, "{}").unwrap())
        .collect();
    assert_eq!(stored, [false, false, false, true]);
    assert_eq!(s.event_high_water("cmp-07").unwrap(), 4);
}

#[test]
fn a_newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    drop(SqliteStore::open(&path).unwrap());
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerSchema { found, supported, .. }
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("refusing"), "{msg}");
    // Refusing did not touch the file.
    let c = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION + 1);
}

#[test]
fn a_store_that_cannot_be_opened_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("defib.db");
    let err = SqliteStore::open(&missing).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let not_a_db = dir.path().join("defib.toml");
    std::fs::write(
        &not_a_db,
        "this is a config file, not a database\n".repeat(200),
    )
    .unwrap();
    let err = SqliteStore::open(&not_a_db).unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&not_a_db.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_second_controller_on_the_same_file_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    let first = SqliteStore::open(&path).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
    drop(first);
    SqliteStore::open(&path).expect("free once the first has gone");
}

// ------------------------------------------------------------------------ integrity

/// A store file with `intents` done intents (each about 300 bytes of JSON), closed.
/// The rows go in with one transaction (the store's own writes fsync each one, which
/// for 100,000 would take minutes); the store reads them all back.
fn store_with_intents(path: &std::path::Path, intents: usize) {
    drop(SqliteStore::open(path).unwrap());
    let mut c = rusqlite::Connection::open(path).unwrap();
    let tx = c.transaction().unwrap();
    for i in 0..intents {
        let at = 1_700_000_000_000 + i as u64;
        let r = fence_record(
            &format!("i{i}/fence-1/host:cmp-{:03}", i % 500),
            i as u64,
            at,
        );
        tx.execute(
            "INSERT INTO intents (key, incident, recorded_at_ms, record_json, done_at_ms,
                                  completion_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                r.key.as_str(),
                i as i64,
                at as i64,
                serde_json::to_string(&r).unwrap(),
                (at + 500) as i64,
                serde_json::to_string(&verified(at + 500)).unwrap()
            ],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    drop(c);
    let s = SqliteStore::open(path).unwrap();
    assert_eq!(s.intents().unwrap().len(), intents);
}

/// Writes garbage over the page that holds the root of the `intents` table (what a bad
/// sector or a stray write leaves). The file header (page 1) stays intact.
fn damage_the_intents_table(path: &std::path::Path) {
    let (page_size, root): (i64, i64) = {
        let c = rusqlite::Connection::open(path).unwrap();
        let size = c
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap();
        let root = c
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = 'intents'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (size, root)
    };
    assert!(root > 1, "the intents table starts after the header page");
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
        .unwrap();
    let garbage: Vec<u8> = (0..page_size).map(|i| (i * 7 + 13) as u8).collect();
    f.write_all(&garbage).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_store_with_a_damaged_page_is_refused_at_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    store_with_intents(&path, 2_000);
    damage_the_intents_table(&path);
    let before = std::fs::read(&path).unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("damaged") && msg.contains("refusing"), "{msg}");
    // What the check found is in the message (SQLite names the broken page).
    assert!(msg.contains("page"), "{msg}");
    // Refusing did not touch the file (nothing migrated, nothing written).
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn the_daemon_exits_1_at_start_on_a_damaged_store_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    store_with_intents(&path, 2_000);
    damage_the_intents_table(&path);
    std::fs::write(dir.path().join("key"), "damaged-store-test-key-0123456789").unwrap();
    std::fs::set_permissions(
        dir.path().join("key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[controller]\nkey_file = {:?}\nheartbeat_listen = [\"127.0.0.1:0\"]\n\
             event_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\nstore_path = {:?}\n\
             [api]\ninsecure_no_token = true\n",
            dir.path().join("key").display().to_string(),
            path.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_defib-controller"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("damaged"), "{err}");
}

/// Not a check but a measurement (`cargo test --release -p defib-controller --test
/// store -- --ignored --nocapture integrity`): what the integrity check at open costs
/// on a store of 100,000 intents, beside `quick_check` and reading the intents back.
#[test]
#[ignore = "a measurement, run by hand"]
#[allow(clippy::disallowed_types)] // std's Instant: a synchronous test timing by hand
fn the_integrity_check_of_a_store_of_100000_intents_is_timed() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");
    let t = Instant::now();
    store_with_intents(&path, 100_000);
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "built 100000 intents in {:?}; file {} KiB",
        t.elapsed(),
        size / 1024
    );
    for round in 0..3 {
        let c = rusqlite::Connection::open(&path).unwrap();
        for pragma in ["quick_check", "integrity_check"] {
            let t = Instant::now();
            let r: String = c
                .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
                .unwrap();
            println!("round {round}: {pragma} = {r} in {:?}", t.elapsed());
        }
        drop(c);
        let t = Instant::now();
        let s = SqliteStore::open(&path).unwrap();
        let opened = t.elapsed();
        let t = Instant::now();
        let n = s.intents().unwrap().len();
        println!(
            "round {round}: SqliteStore::open in {opened:?}; intents() ({n}) in {:?}",
            t.elapsed()
        );
    }
}

// --------------------------------------------------- restart: the engine and the store

/// A controller process: the engine, with every store action written to the store
/// before the actions after it are carried out (as the runtime does), and the
/// world-changing actions it issued.
struct Controller {
    engine: Engine,
    store: SqliteStore,
    /// The engine's own idea of the log, kept alongside to compare with the store.
    mirror: MemoryIntentLog,
    issued: Vec<Action>,
    now: u64,
    alive: BTreeSet<HostId>,
}

fn host(i: usize) -> HostId {
    HostId::new(format!("h{i}"))
}

impl Controller {
    fn absorb(&mut self, actions: Vec<Action>) {
        for a in actions {
            // Stop before anything whose intent is not on disk.
            self.store.apply_action(&a).expect("store write");
            self.mirror.apply(&a);
            if a.intent_key().is_some() {
                self.issued.push(a);
            }
        }
    }

    fn input(&mut self, input: Input) {
        let out = self.engine.step(Timestamp(self.now), input);
        self.absorb(out);
    }

    /// 50 ms steps: heartbeats every 100 ms from the live hosts, a tick every step.
    fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 50;
            if self.now.is_multiple_of(100) {
                for h in self.alive.clone() {
                    self.input(Input::Heartbeat(Heartbeat {
                        host: h,
                        path: PathId(0),
                        boot_id: 1,
                        incarnation: 1,
                        at: HostTime(self.now),
                        received: None,
                        self_fence: Some(std::time::Duration::from_secs(3)),
                    }));
                }
            }
            self.input(Input::Timer(TimerId::Tick));
        }
    }

    fn keys(&self) -> Vec<IntentKey> {
        self.issued
            .iter()
            .filter_map(|a| a.intent_key().cloned())
            .collect()
    }

    fn evacuations(&self) -> Vec<(Resource, IntentKey)> {
        self.issued
            .iter()
            .filter_map(|a| match a {
                Action::Evacuate { resource, key, .. } => Some((resource.clone(), key.clone())),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_restarted_controller_never_repeats_a_finished_action() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defib.db");

    // ---- first life: host h2 (two VMs) dies, is fenced, forced down; one of its two
    // evacuations finishes, then the controller crashes.
    let mut engine = Engine::new(Config::default());
    let start = engine.start(Timestamp(0));
    let mut c = Controller {
        engine,
        store: SqliteStore::open(&path).unwrap(),
        mirror: MemoryIntentLog::new(),
        issued: Vec::new(),
        now: 0,
        alive: (0..4).map(host).collect(),
    };
    c.absorb(start);
    for i in 0..4 {
        let resources = if i == 2 {
            vec![Resource::vm("vm2a"), Resource::vm("vm2b")]
        } else {
            vec![Resource::vm(format!("vm{i}"))]
        };
        c.input(Input::HostEvent {
            host: host(i),
            event: HostEvent::Inventory {
                resources,
                stopped: vec![],
                rbd_only: vec![],
                source: Source::Nova,
                at: ListedAt::Controller(Timestamp(0)),
            },
        });
    }
    c.run_for(500);
    c.alive.remove(&host(2));
    c.run_for(600);
    assert_eq!(c.engine.host_state(&host(2)), Some(HostState::Confirming));
    c.input(Input::ConfirmationResult {
        host: host(2),
        source: Source::Pacemaker,
        verdict: Verdict::Dead,
    });
    c.run_for(100);
    let fence = match c.issued.iter().find(|a| matches!(a, Action::Fence { .. })) {
        Some(Action::Fence { key, .. }) => key.clone(),
        _ => panic!("no fence issued: {:?}", c.issued),
    };
    c.input(Input::FenceResult {
        host: host(2),
        key: fence.clone(),
        outcome: FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
    });
    let force_down = match c
        .issued
        .iter()
        .find(|a| matches!(a, Action::ForceDown { .. }))
    {
        Some(Action::ForceDown { key, .. }) => key.clone(),
        _ => panic!("no force-down issued: {:?}", c.issued),
    };
    c.input(Input::HostActionResult {
        host: host(2),
        key: force_down.clone(),
        outcome: RestoreOutcome::Ok { host: host(2) },
    });
    let evacuations = c.evacuations();
    assert_eq!(evacuations.len(), 2, "{evacuations:?}");
    let (done_vm, done_evac) = evacuations[0].clone();
    let (open_vm, open_evac) = evacuations[1].clone();
    c.input(Input::RestoreResult {
        resource: done_vm.clone(),
        key: done_evac.clone(),
        outcome: RestoreOutcome::Ok { host: host(0) },
    });
    c.run_for(200);
    let first_life = c.keys();
    let mirror = c.mirror.clone();
    // The store holds exactly what the engine asked it to.
    assert_eq!(c.store.intents().unwrap(), mirror.entries());
    let timelines_before = c.store.incidents_with_timelines().unwrap();
    assert!(!timelines_before.is_empty());
    let crash_at = c.now;
    drop(c); // crash: the engine and the connection are gone, results in flight lost.

    // ---- second life: reopen the file and resume from it.
    let store = SqliteStore::open(&path).unwrap();
    let entries = store.intents().unwrap();
    let done: BTreeSet<IntentKey> = entries
        .iter()
        .filter(|e| e.done.is_some())
        .map(|e| e.record.key.clone())
        .collect();
    let open: BTreeSet<IntentKey> = entries
        .iter()
        .filter(|e| e.done.is_none())
        .map(|e| e.record.key.clone())
        .collect();
    assert!(done.contains(&fence) && done.contains(&force_down) && done.contains(&done_evac));
    assert_eq!(open, BTreeSet::from([open_evac.clone()]));
    assert!(first_life
        .iter()
        .all(|k| done.contains(k) || open.contains(k)));

    let log = intent_log_snapshot(&store).unwrap();
    assert_eq!(log.entries(), mirror.entries());
    let now = crash_at + 5_000;
    let (engine, resumed) = Engine::resume(Config::default(), &log, Timestamp(now));
    assert_eq!(engine.host_state(&host(2)), Some(HostState::Evacuating));
    assert_eq!(
        store.incidents_with_timelines().unwrap(),
        timelines_before,
        "past incidents are still there to show"
    );
    let mut c = Controller {
        engine,
        store,
        mirror: log,
        issued: Vec::new(),
        now,
        alive: [0, 1, 3].into_iter().map(host).collect(),
    };
    c.absorb(resumed);
    assert_eq!(
        c.keys(),
        vec![open_evac.clone()],
        "only the open intent is handed out again"
    );

    // Carry on: the open evacuation finishes; late results of done intents arrive.
    c.input(Input::RestoreResult {
        resource: open_vm.clone(),
        key: open_evac.clone(),
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    c.input(Input::FenceResult {
        host: host(2),
        key: fence.clone(),
        outcome: FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
    });
    c.input(Input::RestoreResult {
        resource: done_vm.clone(),
        key: done_evac.clone(),
        outcome: RestoreOutcome::Ok { host: host(0) },
    });
    c.run_for(3_000);
    assert_eq!(c.engine.host_state(&host(2)), Some(HostState::Recovered));

    for k in c.keys() {
        assert!(!done.contains(&k), "finished action {k} issued again");
    }
    let evacuated_again: Vec<_> = c
        .evacuations()
        .into_iter()
        .filter(|(r, _)| r == &done_vm)
        .collect();
    assert!(evacuated_again.is_empty(), "{evacuated_again:?}");
    let after = c.store.intents().unwrap();
    assert!(after.iter().all(|e| e.done.is_some()), "{after:?}");
    assert_eq!(after.len(), entries.len(), "no new intent was needed");
}

#[test]
fn stored_events_of_one_kind_come_back_oldest_first_with_their_host() {
    let mut s = SqliteStore::open_in_memory().expect("in-memory sqlite");
    let def = |xml: &str| {
        format!(r#"{{"kind":"domain_definition","vm_uuid":"u","vm_name":"n","xml":"{xml}"}}"#)
    };
    s.record_event("h0", 1, 1_000, &def("<a/>")).unwrap();
    s.record_event("h0", 2, 1_001, r#"{"kind":"inventory","vms":[]}"#)
        .unwrap();
    s.record_event("h1", 1, 1_002, &def("<b/>")).unwrap();
    let got = s.events_of_kind("domain_definition").unwrap();
    assert_eq!(
        got,
        vec![
            ("h0".to_string(), def("<a/>")),
            ("h1".to_string(), def("<b/>"))
        ]
    );
    assert!(s.events_of_kind("qemu_exited").unwrap().is_empty());
}

#[test]
fn enrolled_hosts_are_kept_in_the_store_sorted_once_each() {
    use controller::runtime::enrollment;
    on_every_store(|s| {
        assert_eq!(enrollment::read(s).unwrap(), Vec::<String>::new());
        for h in ["h2", "h1", "h2"] {
            enrollment::change(s, h, true).unwrap();
        }
        assert_eq!(enrollment::read(s).unwrap(), ["h1", "h2"]);
        let (hosts, changed) = enrollment::change(s, "h1", false).unwrap();
        assert!(changed);
        assert_eq!(hosts, ["h2"]);
        assert!(
            !enrollment::change(s, "h1", false).unwrap().1,
            "already revoked"
        );
        assert_eq!(enrollment::read(s).unwrap(), ["h2"]);
    });
}
