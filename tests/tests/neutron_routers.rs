//! Routers moved off a dead L3 agent through a real Neutron (the project's novabed:
//! `cargo xtask novabed start`, Neutron 29 with its RPC server and one lab L3 agent per
//! fake host, speaking Neutron's own agent RPC: state reports, router sync, the
//! l3_agent notifications).
//!
//! Each test runs an in-process controller — the real engine task, SQLite store, Nova
//! restorer and Neutron router restorer joined (tests/src/novalab.rs) — against that
//! Neutron. A host failure is a SIGKILLed nova-compute and L3 agent plus silenced
//! heartbeats; the fence the engine asks for is answered "verified" by the test (the
//! lab hosts have no BMC). Everything after is the controller's own path. Liveness and
//! router-to-agent bindings are Neutron's; the agents' own logs say which routers each
//! gained, which is what "moved once" is counted by. The tests share the novabed, so
//! they run one at a time.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use controller::edges::neutron::{NeutronSettings, RouterEvent};
use controller::edges::nova::NovaSettings;
use controller::engine::{AlarmKind, HostState};
use defib_tests::novalab::{unix_ms, Controller, Forwarder, Neutron, Nova, NEUTRON_URL};
use defib_tests::{require, tag};

static NOVABED: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    NOVABED.lock().unwrap_or_else(|e| e.into_inner())
}

fn nova_settings() -> NovaSettings {
    NovaSettings {
        poll_interval: Duration::from_millis(250),
        ..NovaSettings::default()
    }
}

fn neutron_settings() -> NeutronSettings {
    NeutronSettings {
        poll_interval: Duration::from_millis(100),
        ..NeutronSettings::default()
    }
}

/// Both test beds, every lab host's compute and L3 agent running and trusted.
fn beds() -> Option<(Nova, Neutron)> {
    let nova = Nova::connect()?;
    let neutron = Neutron::connect()?;
    for n in 1..=3 {
        nova.ensure_host_ready(n);
        neutron.ensure_agent_ready(n);
    }
    Some((nova, neutron))
}

/// `n` routers named `{prefix}-i`, router i bound to the agent of fake-(i % 3 + 1).
fn routers_three_ways(neutron: &Neutron, prefix: &str, n: usize) -> Vec<(String, String)> {
    let ids = neutron.create_routers(prefix, n, false);
    ids.into_iter()
        .enumerate()
        .map(|(i, id)| {
            let host = format!("fake-{}", i % 3 + 1);
            neutron.bind(&id, &host);
            (id, host)
        })
        .collect()
}

/// Waits until every router of `ids` is bound to exactly one agent, none on `not_on`;
/// returns router → host.
fn wait_bound_elsewhere(
    neutron: &Neutron,
    ids: &[String],
    not_on: &str,
    timeout: Duration,
) -> BTreeMap<String, String> {
    let t0 = Instant::now();
    loop {
        let mut done = BTreeMap::new();
        for id in ids {
            let b = neutron.bindings(id);
            if b.len() == 1 && b[0].host != not_on {
                done.insert(id.clone(), b[0].host.clone());
            }
        }
        if done.len() == ids.len() {
            return done;
        }
        assert!(
            t0.elapsed() < timeout,
            "only {} of {} routers bound to one live agent after {timeout:?}",
            done.len(),
            ids.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Fails host fake-1: its compute and L3 agent are killed, it falls silent, and its
/// fence is answered. Returns the time of the fence (unix ms).
fn fail_host_1(nova: &Nova, neutron: &Neutron, ctl: &Controller) -> u64 {
    nova.kill_compute(1);
    neutron.kill_agent(1);
    ctl.silence("fake-1");
    let at = unix_ms();
    ctl.answer_fence("fake-1", Duration::from_secs(30));
    at
}

/// Per router, how many agents gained it since `since` (the agents' own logs).
fn gains(since: u64) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in 1..=3 {
        for r in Neutron::gained_since(n, since) {
            *m.entry(r).or_default() += 1;
        }
    }
    m
}

/// The router restorer's events until every router of `routers` is verified (or
/// failed), up to `timeout`.
fn router_events_until_verified(
    ctl: &mut Controller,
    routers: &BTreeSet<String>,
    timeout: Duration,
) -> Vec<RouterEvent> {
    let t0 = Instant::now();
    let mut events = Vec::new();
    loop {
        events.extend(ctl.router_events());
        let done = routers.iter().all(|r| {
            events.iter().any(|e| {
                matches!(e, RouterEvent::Verified { router, .. } | RouterEvent::Failed { router, .. }
                    if router == r)
            })
        });
        if done {
            return events;
        }
        assert!(
            t0.elapsed() < timeout,
            "not every router verified after {timeout:?}: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The target loads the first plan for `routers` read, and every router's planned host.
fn planned(
    events: &[RouterEvent],
    routers: &BTreeSet<String>,
) -> (BTreeMap<String, usize>, BTreeMap<String, String>) {
    let mut first_loads = None;
    let mut all = BTreeMap::new();
    for e in events {
        if let RouterEvent::Planned { loads, plan } = e {
            if plan.keys().any(|r| routers.contains(r)) {
                first_loads.get_or_insert_with(|| loads.clone());
                all.extend(plan.clone());
            }
        }
    }
    let loads = first_loads.unwrap_or_else(|| panic!("no plan for {routers:?}: {events:?}"));
    all.retain(|r, _| routers.contains(r));
    assert_eq!(all.len(), routers.len(), "every router planned: {events:?}");
    (loads, all)
}

/// Each host that got routers in `plan` was, when it got its last one, no more loaded
/// than any other target: the least-loaded fill (ties aside, within one router).
fn assert_least_loaded_fill(loads: &BTreeMap<String, usize>, plan: &BTreeMap<String, String>) {
    let mut after = loads.clone();
    for host in plan.values() {
        *after.get_mut(host).expect("planned onto a target") += 1;
    }
    for (host, n) in &after {
        if plan.values().any(|h| h == host) {
            let min_other = after
                .iter()
                .filter(|(h, _)| *h != host)
                .map(|(_, m)| *m)
                .min()
                .unwrap_or(usize::MAX);
            assert!(
                n - 1 <= min_other,
                "{host} took a router while more loaded than another: loads {loads:?}, after {after:?}"
            );
        }
    }
}

fn cleanup(neutron: &Neutron, prefix: &str) {
    neutron.delete_named(prefix);
}

#[test]
fn twenty_routers_spread_over_three_hosts_lose_host_1_and_its_routers_are_bound_once_each_to_agents_on_hosts_2_and_3_leaving_ha_routers_to_neutron(
) {
    let _g = lock();
    let beds = beds();
    require!(
        beds.is_some(),
        "the novabed with Neutron's L3 agents (cargo xtask novabed start)"
    );
    let (nova, neutron) = beds.unwrap();
    let prefix = format!("r20-{}", tag());
    let routers = routers_three_ways(&neutron, &prefix, 20);
    let ha = neutron
        .create_routers(&format!("{prefix}-ha"), 1, true)
        .remove(0);
    let on_1: BTreeSet<String> = routers
        .iter()
        .filter(|(_, h)| h == "fake-1")
        .map(|(id, _)| id.clone())
        .collect();
    let ids: Vec<String> = routers.iter().map(|(id, _)| id.clone()).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start_with_routers(
        &dir.path().join("store.sqlite"),
        nova_settings(),
        neutron_settings(),
    );
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
    // The spread needs both remaining agents alive in Neutron's eyes when the move is
    // planned (a late report after creating and binding twenty routers on a loaded
    // machine could make one look down): the plan's loads below show it if not.
    neutron.ensure_agent_ready(2);
    neutron.ensure_agent_ready(3);

    let fenced_at = fail_host_1(&nova, &neutron, &ctl);
    let bound = wait_bound_elsewhere(&neutron, &ids, "fake-1", Duration::from_secs(60));
    // The others did not move.
    for (id, host) in &routers {
        if host != "fake-1" {
            assert_eq!(&bound[id], host, "router {id} not on fake-1 stayed put");
        }
    }
    let events = router_events_until_verified(&mut ctl, &on_1, Duration::from_secs(10));
    // Host 1's were planned onto hosts 2 and 3 by load: each went where the target
    // was least loaded when it was chosen (counting the ones chosen before it).
    let (loads, plan) = planned(&events, &on_1);
    assert!(
        loads.contains_key("fake-2") && loads.contains_key("fake-3"),
        "both remaining agents were targets: {loads:?}"
    );
    assert_least_loaded_fill(&loads, &plan);
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for host in plan.values() {
        *per_host.entry(host.as_str()).or_default() += 1;
    }
    assert!(
        per_host.contains_key("fake-2") && per_host.contains_key("fake-3"),
        "host 1's routers planned over both: {per_host:?} (loads {loads:?})"
    );
    // Each is bound where it was planned, or (Neutron's own auto-scheduling between
    // its unbinding and its binding) where Neutron put it and the restorer kept it.
    for id in &on_1 {
        let kept_by_neutron = events.iter().any(|e| {
            matches!(e, RouterEvent::Verified { router, host, by_neutron: true }
                if router == id && host == &bound[id])
        });
        assert!(
            bound[id] == plan[id] || kept_by_neutron,
            "router {id} bound to {} though planned for {} and not kept from Neutron",
            bound[id],
            plan[id]
        );
    }
    // Each moved router was gained by exactly one agent (Neutron's bindings, as the
    // agents synced them), and bound once by the restorer.
    let t0 = Instant::now();
    while on_1.iter().any(|r| !gains(fenced_at).contains_key(r)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "agents did not sync"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let g = gains(fenced_at);
    for r in &on_1 {
        assert_eq!(g[r], 1, "router {r} gained by exactly one agent: {g:?}");
    }
    // Of this test's plain routers (an agent may also gain the HA router, which Neutron
    // itself reschedules, or another test's leftovers that Neutron auto-schedules).
    assert!(
        g.keys()
            .filter(|r| ids.contains(r))
            .all(|r| on_1.contains(r)),
        "only host 1's routers moved: {g:?} (ha router {ha})"
    );
    let load = |h: &str| bound.values().filter(|b| *b == h).count();
    // Even, within one router, plus the slack Neutron's own auto-scheduling leaves: a
    // live agent syncing between a router's unbinding and its binding gets it from
    // Neutron (router_auto_schedule; the lab agents sync at every notification, so the
    // POST of one router makes its agent take any other in that window), and the
    // restorer keeps it there. Each such router moves the difference by at most 2.
    let by_neutron = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                RouterEvent::Verified {
                    by_neutron: true,
                    ..
                }
            )
        })
        .count();
    eprintln!(
        "planned {per_host:?} on loads {loads:?}; bound fake-2 {} fake-3 {}; {by_neutron} kept from Neutron",
        load("fake-2"),
        load("fake-3")
    );
    assert!(
        load("fake-2").abs_diff(load("fake-3")) <= 1 + 2 * by_neutron,
        "loads even: fake-2 {} fake-3 {} ({by_neutron} scheduled by Neutron meanwhile)",
        load("fake-2"),
        load("fake-3")
    );
    let moved: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            RouterEvent::Moved { router, .. } => Some(router),
            _ => None,
        })
        .collect();
    // (A router Neutron itself scheduled on a live agent between the unbinding and the
    // binding is verified and kept there, not bound again.)
    let verified = events
        .iter()
        .filter(|e| matches!(e, RouterEvent::Verified { .. }))
        .count();
    assert!(moved.len() <= on_1.len(), "{events:?}");
    assert_eq!(verified, on_1.len(), "{events:?}");
    // The HA router is Neutron's business: still on all three agents, not handed over.
    assert!(events.iter().any(
        |e| matches!(e, RouterEvent::Listed { host, skipped_ha, .. } if host == "fake-1" && skipped_ha.contains(&ha))
    ));
    assert_eq!(neutron.bindings(&ha).len(), 3, "HA router untouched");
    // The dead agent is disabled: Neutron schedules nothing there.
    assert!(!neutron.agent("fake-1").admin_state_up);
    ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(60));
    let snap = ctl.snapshot();
    for id in &on_1 {
        let r = snap
            .resources
            .iter()
            .find(|v| v.id == *id)
            .expect("the engine knows every router of host 1");
        assert_ne!(r.host, "fake-1");
    }

    // Host 1 returns: heartbeats first, its agent still down. The routers moved off it
    // are reported (alarm), and the unfence is refused while they are.
    ctl.resume_heartbeats("fake-1");
    nova.start_compute(1);
    let t0 = Instant::now();
    let reported = loop {
        match ctl.next_router_event(Duration::from_secs(10)) {
            Some(RouterEvent::StaleReported { host, routers }) if host == "fake-1" => {
                break routers
            }
            Some(_) => {}
            None => assert!(t0.elapsed() < Duration::from_secs(30), "no stale report"),
        }
    };
    assert_eq!(
        reported.into_iter().collect::<BTreeSet<_>>(),
        on_1,
        "every router moved off host 1 reported"
    );
    let t0 = Instant::now();
    while !ctl
        .snapshot()
        .alarms
        .iter()
        .any(|a| a.kind == AlarmKind::StaleResource && a.host.as_deref() == Some("fake-1"))
    {
        assert!(t0.elapsed() < Duration::from_secs(5), "no stale alarm");
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = ctl.unfence("fake-1");
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("stale")),
        "not trusted while its stale routers are reported: {refused:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!neutron.agent("fake-1").admin_state_up);
    // Its agent comes back holding its old routers (its data plane kept them), syncs,
    // gets none (it is disabled), drops them: clean, and only then trusted again.
    neutron.start_agent(1);
    let t0 = Instant::now();
    loop {
        match ctl.next_router_event(Duration::from_secs(10)) {
            Some(RouterEvent::CleanedUp { host }) if host == "fake-1" => break,
            Some(_) => {}
            None => assert!(t0.elapsed() < Duration::from_secs(60), "not cleaned up"),
        }
    }
    let t0 = Instant::now();
    loop {
        let _ = ctl.unfence("fake-1");
        if neutron.agent("fake-1").admin_state_up {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "agent of fake-1 not enabled after the unfence"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(120));
    // Nothing moved back: Neutron's bindings are as the move left them.
    for id in &on_1 {
        assert_eq!(neutron.bindings(id).len(), 1);
        assert_ne!(neutron.bindings(id)[0].host, "fake-1");
    }
    ctl.kill();
    cleanup(&neutron, &prefix);
}

#[test]
fn a_controller_killed_in_the_middle_of_moving_routers_finishes_after_a_restart_without_moving_any_router_twice_and_a_third_still_reports_them_when_host_1_returns(
) {
    let _g = lock();
    let beds = beds();
    require!(
        beds.is_some(),
        "the novabed with Neutron's L3 agents (cargo xtask novabed start)"
    );
    let (nova, neutron) = beds.unwrap();
    let prefix = format!("rrs-{}", tag());
    // 20 routers, all on host 1, so the kill lands with many still to move.
    let ids = neutron.create_routers(&prefix, 20, false);
    for id in &ids {
        neutron.bind(id, "fake-1");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.sqlite");
    // One move at once: the kill lands mid-way.
    let slow = NeutronSettings {
        max_concurrent: 1,
        ..neutron_settings()
    };
    let mut ctl = Controller::start_with_routers(&store, nova_settings(), slow);
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
    let fenced_at = fail_host_1(&nova, &neutron, &ctl);
    let mut first = BTreeSet::new();
    while first.len() < 3 {
        match ctl.next_router_event(Duration::from_secs(60)) {
            Some(RouterEvent::Moved { router, .. }) => {
                first.insert(router);
            }
            Some(_) => {}
            None => panic!("no router moved"),
        }
    }
    ctl.kill();
    let moved_before = ids
        .iter()
        .filter(|id| neutron.bindings(id).iter().any(|a| a.host != "fake-1"))
        .count();
    assert!(
        (1..20).contains(&moved_before),
        "killed mid-move: {moved_before} of 20 moved"
    );

    // The same store, a new controller: it resumes the open intents. fake-1 stays silent.
    let mut ctl = Controller::start_with_routers(&store, nova_settings(), neutron_settings());
    ctl.silence("fake-1");
    let bound = wait_bound_elsewhere(&neutron, &ids, "fake-1", Duration::from_secs(60));
    assert_eq!(bound.len(), 20);
    let t0 = Instant::now();
    while ids.iter().any(|r| !gains(fenced_at).contains_key(r)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "agents did not sync"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let g = gains(fenced_at);
    for r in &ids {
        assert_eq!(g[r], 1, "router {r} bound once across the restart: {g:?}");
    }
    let events = ctl.router_events();
    let moved_again: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            RouterEvent::Moved { router, .. } if first.contains(router) => Some(router),
            _ => None,
        })
        .collect();
    assert!(
        moved_again.is_empty(),
        "moved by both controllers: {moved_again:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, RouterEvent::AlreadyMoved { .. })),
        "the resumed controller found the first one's moves: {events:?}"
    );
    ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(60));
    ctl.kill();

    // A third controller on the same store, and only now host 1 heartbeats again: the
    // routers moved off it (by both controllers before) are still reported for
    // cleanup: the list comes from the store, not from a restorer's memory.
    let mut ctl = Controller::start_with_routers(&store, nova_settings(), neutron_settings());
    let t0 = Instant::now();
    let reported = loop {
        match ctl.next_router_event(Duration::from_secs(10)) {
            Some(RouterEvent::StaleReported { host, routers }) if host == "fake-1" => {
                break routers
            }
            Some(_) => {}
            None => assert!(t0.elapsed() < Duration::from_secs(30), "no stale report"),
        }
    };
    assert_eq!(
        reported.into_iter().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        "every router moved off host 1 reported after the restart"
    );
    let t0 = Instant::now();
    while !ctl
        .snapshot()
        .alarms
        .iter()
        .any(|a| a.kind == AlarmKind::StaleResource && a.host.as_deref() == Some("fake-1"))
    {
        assert!(t0.elapsed() < Duration::from_secs(5), "no stale alarm");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ctl.unfence("fake-1").is_err_and(|e| e.contains("stale")));
    ctl.kill();
    // Leave the bed as it was: host 1's compute and agent back, trusted.
    nova.ensure_host_ready(1);
    neutron.ensure_agent_ready(1);
    cleanup(&neutron, &prefix);
}

#[test]
fn a_neutron_outage_when_host_1_fails_holds_up_none_of_its_vms_and_its_routers_move_once_neutron_answers(
) {
    let _g = lock();
    let beds = beds();
    require!(
        beds.is_some(),
        "the novabed with Neutron's L3 agents (cargo xtask novabed start)"
    );
    let (nova, neutron) = beds.unwrap();
    let prefix = format!("rout-{}", tag());
    let servers = nova.boot_on("fake-1", 3, &prefix, serde_json::json!({}));
    let ids = neutron.create_routers(&prefix, 6, false);
    for id in &ids {
        neutron.bind(id, "fake-1");
    }
    // The controller's Neutron is a port where nothing listens yet (neutron-server
    // down: likely when the failed host was also a network node).
    let api = Forwarder::closed(NEUTRON_URL.trim_start_matches("http://"));
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start_with_routers_at(
        &dir.path().join("store.sqlite"),
        nova_settings(),
        neutron_settings(),
        &api.url(),
    );
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
    let fenced_at = fail_host_1(&nova, &neutron, &ctl);

    // Every VM is restored without Neutron, and the host incident closes.
    nova.wait_all_active_elsewhere(&prefix, &servers, "fake-1", Duration::from_secs(300));
    ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(60));
    // The failing router half is an alarm, named, with Neutron's error.
    let t0 = Instant::now();
    let alarm =
        loop {
            if let Some(a) = ctl.snapshot().alarms.iter().find(|a| {
                a.kind == AlarmKind::InventoryFailed && a.host.as_deref() == Some("fake-1")
            }) {
                break a.clone();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no InventoryFailed alarm"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
    assert!(alarm.reason.contains("neutron"), "{alarm:?}");
    let failures = ctl
        .router_events()
        .into_iter()
        .filter(|e| matches!(e, RouterEvent::ListFailed { host, .. } if host == "fake-1"))
        .count();
    assert!(failures >= 1);
    for id in &ids {
        assert_eq!(neutron.bindings(id)[0].host, "fake-1", "nothing moved yet");
    }

    // Neutron answers: the restorer's next try lists the routers, the host incident
    // reopens for them, and each is moved once.
    api.open();
    let bound = wait_bound_elsewhere(&neutron, &ids, "fake-1", Duration::from_secs(90));
    assert_eq!(bound.len(), ids.len());
    ctl.wait_host_state("fake-1", HostState::Recovered, Duration::from_secs(60));
    let t0 = Instant::now();
    while ids.iter().any(|r| !gains(fenced_at).contains_key(r)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "agents did not sync"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let g = gains(fenced_at);
    for r in &ids {
        assert_eq!(g[r], 1, "router {r} bound once: {g:?}");
    }
    let snap = ctl.snapshot();
    let incident = snap
        .incidents
        .iter()
        .rfind(|i| i.subject == "host:fake-1")
        .expect("the host incident");
    assert!(incident.closed_at_ms.is_some());
    assert!(
        incident.timeline.iter().any(|e| e.to == "Evacuating"
            && e.source == controller::engine::Source::Neutron
            && e.cause.contains("late")),
        "the same incident reopened for the late routers"
    );
    assert!(
        snap.incidents
            .iter()
            .filter(|i| i.subject == "host:fake-1")
            .count()
            == 1
    );
    ctl.kill();
    nova.ensure_host_ready(1);
    neutron.ensure_agent_ready(1);
    nova.delete_named(&prefix);
    cleanup(&neutron, &prefix);
}
