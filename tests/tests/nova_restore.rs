//! Restore through a real Nova (the project's novabed: `cargo xtask novabed start`).
//!
//! Each test runs an in-process controller — the real engine task, SQLite store and
//! Nova restorer (tests/src/novalab.rs) — against Nova 34 with three fake-driver
//! computes. A host failure is a SIGKILLed nova-compute plus silenced heartbeats; the
//! fence the engine asks for is answered "verified" by the test. The tests share the
//! novabed, so they run one at a time.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use controller::edges::nova::{NovaSettings, RestoreEvent};
use controller::engine::{
    Config as EngineConfig, HostEvent, HostId, HostState, HostTime, Input, Intent, IntentEntry,
    Resource, Source,
};
use controller::store::{SqliteStore, Store as _};
use defib_tests::novalab::{Controller, Nova};
use defib_tests::{require, tag};
use serde_json::json;

static NOVABED: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    NOVABED.lock().unwrap_or_else(|e| e.into_inner())
}

fn settings() -> NovaSettings {
    NovaSettings {
        poll_interval: Duration::from_millis(250),
        ..NovaSettings::default()
    }
}

/// fake-1 is back: its compute restarted, the operator unfences, and the restorer
/// retries Nova's 400 until the host's evacuations are cleaned up.
fn host_returns_and_is_unforced(nova: &Nova, ctl: &Controller) {
    nova.start_compute(1);
    ctl.resume_heartbeats("fake-1");
    ctl.unfence("fake-1")
        .expect("unfence accepted by the engine");
    let t0 = std::time::Instant::now();
    loop {
        let s = nova.service("fake-1");
        if !s.forced_down && s.state == "up" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "fake-1 still forced down or down: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(60));
}

fn spread(servers: &[controller::openstack::compute::Server]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in servers {
        *m.entry(s.host.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

#[test]
fn thirty_servers_of_a_fenced_host_come_back_active_on_the_two_others_each_evacuated_once_and_the_host_is_unforced_when_back(
) {
    let _g = lock();
    let nova = Nova::connect();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();
    for n in 1..=3 {
        nova.ensure_host_ready(n);
    }
    let prefix = format!("t30-{}", tag());
    let ids = nova.boot_on("fake-1", 30, &prefix, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&dir.path().join("store.sqlite"), settings());
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));

    nova.kill_compute(1);
    ctl.silence("fake-1");
    ctl.answer_fence("fake-1", Duration::from_secs(30));

    let done = nova.wait_all_active_elsewhere(&prefix, &ids, "fake-1", Duration::from_secs(300));
    let hosts = spread(&done);
    assert!(
        hosts.get("fake-2").copied().unwrap_or(0) > 0
            && hosts.get("fake-3").copied().unwrap_or(0) > 0,
        "spread over both targets: {hosts:?}"
    );
    for id in &ids {
        assert_eq!(
            nova.evacuations(id),
            1,
            "server {id} evacuated exactly once"
        );
    }
    // Nova was forced down first, and every evacuation named its target.
    let events = ctl.events();
    assert!(matches!(events.first(), Some(RestoreEvent::ForcedDown { host }) if host == "fake-1"));
    let calls = events
        .iter()
        .filter(|e| matches!(e, RestoreEvent::EvacuateCalled { .. }))
        .count();
    assert_eq!(calls, 30, "{events:?}");
    // The engine closes the incident once every VM is accounted for.
    ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(30));
    let snap = ctl.snapshot();
    for id in &ids {
        let vm = snap
            .resources
            .iter()
            .find(|v| v.id == *id)
            .expect("the engine knows every server");
        assert_ne!(vm.host, "fake-1");
    }

    host_returns_and_is_unforced(&nova, &ctl);
    ctl.kill();
    nova.delete_named(&prefix);
}

#[test]
fn a_controller_killed_in_the_middle_of_a_restore_finishes_it_after_a_restart_without_evacuating_any_server_twice(
) {
    let _g = lock();
    let nova = Nova::connect();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();
    for n in 1..=3 {
        nova.ensure_host_ready(n);
    }
    let prefix = format!("trs-{}", tag());
    let ids = nova.boot_on("fake-1", 30, &prefix, json!({}));
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.sqlite");
    // Few rebuilds at once, so the kill lands while most servers wait their turn.
    let slow = NovaSettings {
        max_concurrent_per_target: 2,
        ..settings()
    };
    let mut ctl = Controller::start(&store, slow);
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
    nova.kill_compute(1);
    ctl.silence("fake-1");
    ctl.answer_fence("fake-1", Duration::from_secs(30));
    let mut called = 0;
    while called < 4 {
        match ctl.next_event(Duration::from_secs(60)) {
            Some(RestoreEvent::EvacuateCalled { .. }) => called += 1,
            Some(_) => {}
            None => panic!("no evacuation started"),
        }
    }
    // The event is sent just before the POST: wait until Nova has recorded one, so the
    // kill lands in the middle of the restore, not before it reached Nova.
    let recorded_by = std::time::Instant::now() + Duration::from_secs(60);
    while !ids.iter().any(|id| nova.evacuations(id) > 0) {
        assert!(
            std::time::Instant::now() < recorded_by,
            "Nova recorded no evacuation within 60 s of four evacuate calls"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ctl.kill();
    let moving = ids.iter().filter(|id| nova.evacuations(id) > 0).count();
    assert!(
        (1..30).contains(&moving),
        "killed mid-restore: {moving} of 30 started"
    );

    // The same store, a new controller: it resumes the open intents. fake-1 stays silent.
    // This one unforces by policy, without an operator, once fake-1 is back.
    let mut ctl = Controller::start_with_engine(
        &store,
        EngineConfig {
            auto_unfence: true,
            ..EngineConfig::default()
        },
        settings(),
    );
    ctl.silence("fake-1");
    let done = nova.wait_all_active_elsewhere(&prefix, &ids, "fake-1", Duration::from_secs(300));
    assert_eq!(done.len(), 30);
    for id in &ids {
        assert_eq!(
            nova.evacuations(id),
            1,
            "server {id} evacuated exactly once across the restart"
        );
    }
    let events = ctl.events();
    let servers = |f: fn(&RestoreEvent) -> Option<&String>| -> BTreeSet<String> {
        events.iter().filter_map(f).cloned().collect()
    };
    let tracked = servers(|e| match e {
        RestoreEvent::Tracked { server, .. } => Some(server),
        _ => None,
    });
    let called = servers(|e| match e {
        RestoreEvent::EvacuateCalled { server, .. } => Some(server),
        _ => None,
    });
    let refused = servers(|e| match e {
        RestoreEvent::Failed { server, .. } => Some(server),
        _ => None,
    });
    assert!(
        !tracked.is_empty(),
        "the resumed controller followed the evacuations already running: {events:?}"
    );
    // Every server is either evacuated by the resumed controller or followed where the
    // first one's evacuation took it. Both only for a server whose first evacuation was
    // still on its way to Nova at the kill: Nova then refused the second call, and the
    // retry found the server gone from the failed host (Nova's records above say it
    // was evacuated once).
    assert_eq!(called.union(&tracked).count(), 30, "{events:?}");
    for server in called.intersection(&tracked) {
        assert!(
            refused.contains(server),
            "{server} called and followed, yet Nova did not refuse the call: {events:?}"
        );
    }
    ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(60));
    assert!(
        nova.service("fake-1").forced_down,
        "stays forced down while the host is away"
    );

    // fake-1 returns (compute and heartbeats): unforced by the policy alone.
    nova.start_compute(1);
    ctl.resume_heartbeats("fake-1");
    let t0 = std::time::Instant::now();
    loop {
        let s = nova.service("fake-1");
        if !s.forced_down && s.state == "up" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "fake-1 not unforced by the policy: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(60));
    ctl.kill();
    nova.delete_named(&prefix);
}

/// Where in a host's recovery the controller is killed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KillPoint {
    /// The fence intent is stored and handed to the fencer, not answered.
    FenceAsked,
    /// The fence was verified (the host is Fenced), force-down not yet seen in Nova.
    FenceVerified,
    /// Nova has the compute service forced down.
    ForcedDown,
}

/// The intents the store holds about `host`'s recovery (fences, force-downs) and the
/// evacuations of `servers`.
fn recovery_intents(store: &std::path::Path, host: &str, servers: &[String]) -> Vec<IntentEntry> {
    // The store is opened by one controller at a time: wait until the killed one let go.
    let t0 = std::time::Instant::now();
    let store = loop {
        match SqliteStore::open(store) {
            Ok(s) => break s,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(30), "store: {e:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    store
        .intents()
        .expect("intents")
        .into_iter()
        .filter(|e| match &e.record.intent {
            Intent::Fence { host: h, .. } | Intent::ForceDown { host: h, .. } => h.as_str() == host,
            Intent::Evacuate { resource, .. } => {
                servers.iter().any(|s| *resource == Resource::vm(s))
            }
            _ => false,
        })
        .collect()
}

#[test]
fn a_controller_killed_after_the_fence_intent_after_the_fence_or_after_force_down_resumes_with_no_action_twice(
) {
    // The mid-evacuation kill is the test above. Here the kill is the in-process
    // controller's runtime shut down where it stands (every task dropped mid-await,
    // the SQLite store as the crash left it), then a new controller on the same store.
    let _g = lock();
    let nova = Nova::connect();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();
    for point in [
        KillPoint::FenceAsked,
        KillPoint::FenceVerified,
        KillPoint::ForcedDown,
    ] {
        eprintln!("kill point {point:?}");
        for n in 1..=3 {
            nova.ensure_host_ready(n);
        }
        let prefix = format!("tkp-{}", tag());
        let ids = nova.boot_on("fake-1", 4, &prefix, json!({}));
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store.sqlite");
        let ctl = Controller::start(&store, settings());
        ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
        nova.kill_compute(1);
        ctl.silence("fake-1");
        let first_fence = ctl
            .next_fence("fake-1", Duration::from_secs(30))
            .expect("a fence asked");
        if point != KillPoint::FenceAsked {
            ctl.verify_fence("fake-1", first_fence.clone());
            ctl.wait_host_state_past("fake-1", HostState::Fenced, Duration::from_secs(10));
        }
        if point == KillPoint::ForcedDown {
            let t0 = std::time::Instant::now();
            while !nova.service("fake-1").forced_down {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{point:?}: not forced down"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        ctl.kill();

        let ctl = Controller::start(&store, settings());
        ctl.silence("fake-1");
        // Only an unanswered fence is handed out again, under its first key.
        match ctl.next_fence("fake-1", Duration::from_secs(3)) {
            Some(key) => {
                assert_eq!(point, KillPoint::FenceAsked, "fenced again after {point:?}");
                assert_eq!(key, first_fence, "the resumed fence keeps its key");
                ctl.verify_fence("fake-1", key);
            }
            None => assert_ne!(
                point,
                KillPoint::FenceAsked,
                "the open fence was not resumed"
            ),
        }
        let done =
            nova.wait_all_active_elsewhere(&prefix, &ids, "fake-1", Duration::from_secs(300));
        assert_eq!(done.len(), 4, "{point:?}");
        for id in &ids {
            assert_eq!(nova.evacuations(id), 1, "{point:?}: {id} evacuated once");
        }
        ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(60));
        host_returns_and_is_unforced(&nova, &ctl);
        ctl.kill();
        let intents = recovery_intents(&store, "fake-1", &ids);
        let count = |f: fn(&Intent) -> bool| intents.iter().filter(|e| f(&e.record.intent)).count();
        assert_eq!(
            count(|i| matches!(i, Intent::Fence { .. })),
            1,
            "{point:?}: {intents:?}"
        );
        assert_eq!(
            count(|i| matches!(i, Intent::ForceDown { .. })),
            1,
            "{point:?}: {intents:?}"
        );
        assert_eq!(
            count(|i| matches!(i, Intent::Evacuate { .. })),
            4,
            "{point:?}: {intents:?}"
        );
        assert!(
            intents.iter().all(|e| e.done.is_some()),
            "{point:?}: {intents:?}"
        );
        nova.delete_named(&prefix);
    }
}

/// Waits until `cond` holds on the in-process controller's metrics text.
fn until_metrics(ctl: &Controller, within: Duration, cond: impl Fn(&str) -> bool) -> String {
    let t0 = std::time::Instant::now();
    loop {
        let m = ctl.metrics.encode();
        if cond(&m) {
            return m;
        }
        assert!(t0.elapsed() < within, "{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_store_that_fills_up_during_a_host_recovery_stops_every_unpersisted_action_and_once_freed_each_server_is_evacuated_exactly_once(
) {
    // The store is the real SQLite on a 2 MiB tmpfs; the disk fills right after the
    // fence intent is on it (the fencer is handed the fence only once it is), before
    // the fence is answered: force-down and the evacuations are still to be decided.
    require!(defib_tests::is_root(), "root, to mount a tmpfs");
    let _g = lock();
    // Only this test's servers are touched (the novabed may be shared).
    let nova = Nova::attach();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();
    for n in 1..=3 {
        nova.ensure_host_ready(n);
    }
    let prefix = format!("tfull-{}", tag());
    let ids = nova.boot_on("fake-1", 4, &prefix, json!({}));
    let disk = defib_tests::tmpfs::Tmpfs::mount("2m");
    let store = disk.mnt.join("store.sqlite");
    let mut ctl = Controller::start(&store, settings());
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
    nova.kill_compute(1);
    ctl.silence("fake-1");
    let fence = ctl
        .next_fence("fake-1", Duration::from_secs(30))
        .expect("a fence asked");

    // ---- the disk fills; the fence is answered: verified.
    let filler = disk.fill();
    ctl.verify_fence("fake-1", fence.clone());
    let m = until_metrics(&ctl, Duration::from_secs(30), |m| {
        m.lines().any(|l| l == "defib_stopped_acting 1")
    });
    assert!(
        m.lines()
            .any(|l| l == r#"defib_alarms_total{kind="StoreWriteFailed"} 1"#),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l == r#"defib_store_write_failures_total{reason="error"} 1"#),
        "{m}"
    );
    // Stopped: for as long as the disk stays full nothing more is done (not the
    // force-down the verified fence calls for, no evacuation, no second fence), and
    // the controller is up, not crashed.
    std::thread::sleep(Duration::from_secs(5));
    let seen = ctl.events();
    assert!(seen.is_empty(), "acted on a full disk: {seen:?}");
    assert!(ctl
        .next_fence("fake-1", Duration::from_millis(500))
        .is_none());
    assert!(
        !nova.service("fake-1").forced_down,
        "forced down unpersisted"
    );
    for id in &ids {
        assert_eq!(nova.evacuations(id), 0, "{id} evacuated unpersisted");
    }
    assert!(
        ctl.wait_ended(Duration::ZERO).is_none(),
        "it ended while full"
    );

    // ---- space is freed: the engine task ends (the real controller then exits and
    // systemd starts it again), naming the write that failed.
    std::fs::remove_file(&filler).unwrap();
    let ended = ctl
        .wait_ended(Duration::from_secs(10))
        .expect("the engine task ends once the store takes writes")
        .expect_err("it ends with the store failure");
    assert!(ended.contains("stopped acting"), "{ended}");
    assert!(ended.contains("full"), "{ended}");
    ctl.kill();
    // The store kept the intent it had, unfinished, and nothing decided after the fill.
    let kept = recovery_intents(&store, "fake-1", &ids);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        matches!(kept[0].record.intent, Intent::Fence { .. }),
        "{kept:?}"
    );
    assert_eq!(kept[0].record.key, fence, "{kept:?}");
    assert!(kept[0].done.is_none(), "{kept:?}");

    // ---- the restart resumes from the store: the fence under its first key, then
    // force-down and every evacuation, each once.
    let mut ctl = Controller::start(&store, settings());
    ctl.silence("fake-1");
    let again = ctl
        .next_fence("fake-1", Duration::from_secs(30))
        .expect("the unanswered fence is handed out again");
    assert_eq!(again, fence, "the resumed fence keeps its key");
    ctl.verify_fence("fake-1", again);
    let done = nova.wait_all_active_elsewhere(&prefix, &ids, "fake-1", Duration::from_secs(300));
    assert_eq!(done.len(), ids.len());
    for id in &ids {
        assert_eq!(nova.evacuations(id), 1, "{id} evacuated once");
    }
    ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(60));
    let seen = ctl.events();
    host_returns_and_is_unforced(&nova, &ctl);
    ctl.kill();

    // Every action the edges saw has its intent in the store, and each intent was
    // carried out once: one fence (asked twice under one key: before the fill and
    // again on resume, as an unanswered fence is), one force-down, one evacuation per
    // server.
    let intents = recovery_intents(&store, "fake-1", &ids);
    let forced = seen
        .iter()
        .filter(|e| matches!(e, RestoreEvent::ForcedDown { host } if host == "fake-1"))
        .count();
    let mut evacuated: Vec<String> = seen
        .iter()
        .filter_map(|e| match e {
            RestoreEvent::EvacuateCalled { server, .. } => Some(server.clone()),
            _ => None,
        })
        .collect();
    evacuated.sort();
    let mut evacuate_intents: Vec<String> = intents
        .iter()
        .filter_map(|e| match &e.record.intent {
            Intent::Evacuate { resource, .. } => Some(resource.to_string()),
            _ => None,
        })
        .collect();
    evacuate_intents.sort();
    let mut expected: Vec<String> = ids.iter().map(|i| Resource::vm(i).to_string()).collect();
    expected.sort();
    let fences: Vec<_> = intents
        .iter()
        .filter(|e| matches!(e.record.intent, Intent::Fence { .. }))
        .map(|e| e.record.key.clone())
        .collect();
    assert_eq!(fences, vec![fence], "{intents:?}");
    assert_eq!(forced, 1, "{seen:?}");
    let force_downs = intents
        .iter()
        .filter(|e| matches!(e.record.intent, Intent::ForceDown { .. }))
        .count();
    assert_eq!(force_downs, 1, "{intents:?}");
    let mut called: Vec<String> = evacuated
        .iter()
        .map(|s| Resource::vm(s).to_string())
        .collect();
    called.sort();
    assert_eq!(called, expected, "{seen:?}");
    assert_eq!(evacuate_intents, expected, "{intents:?}");
    assert!(intents.iter().all(|e| e.done.is_some()), "{intents:?}");
    nova.delete_named(&prefix);
}

#[test]
fn a_crashed_vm_on_a_healthy_host_is_restarted_in_place_through_nova() {
    let _g = lock();
    let nova = Nova::connect();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();
    nova.ensure_host_ready(2);
    let prefix = format!("tcr-{}", tag());
    let ids = nova.boot_on("fake-2", 2, &prefix, json!({}));
    // One crash Nova has already noticed (SHUTOFF: the restorer starts it), one it has
    // not (still ACTIVE in Nova: the restorer hard-reboots it).
    let (stopped, running) = (&ids[0], &ids[1]);
    nova.block(nova.compute.stop(stopped)).expect("os-stop");
    let t0 = std::time::Instant::now();
    while nova
        .block(nova.compute.server(stopped))
        .unwrap()
        .is_none_or(|s| s.status != "SHUTOFF")
    {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start(&dir.path().join("store.sqlite"), settings());
    ctl.wait_host_state("fake-2", HostState::Up, Duration::from_secs(10));
    for id in [stopped, running] {
        ctl.send(Input::HostEvent {
            host: HostId::new("fake-2"),
            event: HostEvent::ResourceExited {
                resource: Resource::vm(id),
                source: Source::Libvirt,
                at: HostTime(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64,
                ),
                reason: "crashed".into(),
            },
        });
    }
    let mut restored = BTreeMap::new();
    while restored.len() < 2 {
        match ctl.next_event(Duration::from_secs(120)) {
            Some(RestoreEvent::Restored { server, host }) => {
                restored.insert(server, host);
            }
            Some(RestoreEvent::Failed { server, reason }) => panic!("{server}: {reason}"),
            Some(RestoreEvent::EvacuateCalled { .. }) => panic!("evacuated instead of restarted"),
            Some(_) => {}
            None => panic!("not restored in time: {restored:?}"),
        }
    }
    for id in [stopped, running] {
        assert_eq!(restored[id], "fake-2");
        let s = nova.block(nova.compute.server(id)).unwrap().unwrap();
        assert_eq!(s.status, "ACTIVE");
        assert_eq!(s.host.as_deref(), Some("fake-2"));
        assert_eq!(nova.evacuations(id), 0);
    }
    // The hard reboot shows in the server's actions; the start in the other's.
    let actions = |id: &str| -> Vec<String> {
        let v: serde_json::Value = nova
            .block(nova.compute.session.request(
                controller::openstack::Service::Compute("2.94"),
                controller::openstack::Method::Get,
                &format!("/servers/{id}/os-instance-actions"),
                None,
            ))
            .unwrap();
        v["instanceActions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["action"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert!(actions(stopped).contains(&"start".to_string()));
    assert!(actions(running).contains(&"reboot".to_string()));
    ctl.kill();
    nova.delete_named(&prefix);
}
