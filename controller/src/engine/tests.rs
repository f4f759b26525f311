//! One test per rule and transition, each named as the sentence it checks.

use super::*;
use std::time::Duration;

/// A small cloud driven by hand: hosts `h0..hN`, a tick every 50 ms, heartbeats every
/// 100 ms from the hosts in `alive`, and the store applied like a runtime would.
struct Harness {
    engine: Engine,
    log: MemoryIntentLog,
    now: u64,
    #[allow(dead_code)]
    hosts: Vec<HostId>,
    alive: BTreeSet<HostId>,
    actions: Vec<Action>,
    /// How far the hosts' clocks are off the controller's (ms).
    host_offset_ms: i64,
    /// What each host's heartbeats say of its self-fence: armed with this timeout, or
    /// (None) not armed. Hosts not listed say armed with 3 s.
    self_fence: BTreeMap<HostId, Option<Duration>>,
    /// Each host's watchdog in its heartbeats, (boot id, incarnation): (1, 1) unless it
    /// was powered on again or its daemon restarted.
    watchdogs: BTreeMap<HostId, (u64, u64)>,
}

fn host(i: usize) -> HostId {
    HostId::new(format!("h{i}"))
}

impl Harness {
    fn new(n: usize) -> Self {
        Self::with(n, Config::default())
    }

    fn with(n: usize, cfg: Config) -> Self {
        Self::clocked(n, cfg, 0, 0)
    }

    /// The controller's clock starts at `start_ms`; the hosts' clocks read
    /// `host_offset_ms` more (or less).
    fn clocked(n: usize, cfg: Config, start_ms: u64, host_offset_ms: i64) -> Self {
        let mut engine = Engine::new(cfg);
        let start = engine.start(Timestamp(start_ms));
        let hosts: Vec<HostId> = (0..n).map(host).collect();
        let mut h = Harness {
            engine,
            log: MemoryIntentLog::new(),
            now: start_ms,
            alive: hosts.iter().cloned().collect(),
            hosts,
            actions: Vec::new(),
            host_offset_ms,
            self_fence: BTreeMap::new(),
            watchdogs: BTreeMap::new(),
        };
        h.absorb(start);
        for i in 0..n {
            h.input(Input::HostEvent {
                host: host(i),
                event: HostEvent::Inventory {
                    resources: vec![Resource::vm(format!("vm{i}"))],
                    stopped: vec![],
                    rbd_only: vec![],
                    source: Source::Nova,
                    at: ListedAt::Controller(Timestamp(start_ms)),
                },
            });
        }
        h.run_for(500);
        h
    }

    /// The hosts' clock at controller time `t`.
    fn host_clock(&self, t: u64) -> HostTime {
        HostTime(
            t.checked_add_signed(self.host_offset_ms)
                .expect("a host time"),
        )
    }

    fn absorb(&mut self, actions: Vec<Action>) {
        for a in &actions {
            self.log.apply(a);
        }
        self.actions.extend(actions);
    }

    /// An operator's command: its actions are absorbed like any step's.
    fn command(&mut self, cmd: OperatorCommand) -> Result<(), Refusal> {
        let out = self.engine.command(Timestamp(self.now), cmd)?;
        self.absorb(out);
        Ok(())
    }

    fn input(&mut self, input: Input) -> Vec<Action> {
        let out = self.engine.step(Timestamp(self.now), input);
        self.absorb(out.clone());
        out
    }

    /// Advance time in 50 ms steps, ticking and heartbeating.
    fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.now += 50;
            if self.now.is_multiple_of(100) {
                for h in self.alive.clone() {
                    self.heartbeat(h);
                }
            }
            self.input(Input::Timer(TimerId::Tick));
        }
    }

    /// One heartbeat from `h`, now.
    fn heartbeat(&mut self, h: HostId) {
        let (boot_id, incarnation) = self.watchdogs.get(&h).copied().unwrap_or((1, 1));
        let self_fence = self
            .self_fence
            .get(&h)
            .copied()
            .unwrap_or(Some(Duration::from_secs(3)));
        self.input(Input::Heartbeat(Heartbeat {
            host: h,
            path: PathId(0),
            boot_id,
            incarnation,
            at: self.host_clock(self.now),
            received: None,
            self_fence,
        }));
    }

    fn kill(&mut self, i: usize) {
        self.alive.remove(&host(i));
    }

    /// Heard again with the boot it had (a partition that heals, a hang that ends).
    fn revive(&mut self, i: usize) {
        self.alive.insert(host(i));
    }

    /// Powered on again after a power-off: heard with a new boot id, from a new
    /// watchdog process.
    fn power_on(&mut self, i: usize) {
        let w = self.watchdogs.entry(host(i)).or_insert((1, 1));
        *w = (w.0 + 1, w.1 + 1);
        self.alive.insert(host(i));
    }

    /// Heard again from a new watchdog process on the same boot (the daemon restarted,
    /// or a lab host, which shares the test machine's kernel, was powered on again).
    fn restart_watchdog(&mut self, i: usize) {
        self.watchdogs.entry(host(i)).or_insert((1, 1)).1 += 1;
        self.alive.insert(host(i));
    }

    fn state(&self, i: usize) -> HostState {
        self.engine.host_state(&host(i)).unwrap()
    }

    fn vm(&self, i: usize) -> ResourceState {
        self.engine
            .resource_state(&Resource::vm(format!("vm{i}")))
            .unwrap()
    }

    fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    fn fences(&self) -> Vec<IntentKey> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Fence { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect()
    }

    fn find(&self, f: impl Fn(&Action) -> bool) -> Option<Action> {
        self.actions.iter().find(|a| f(a)).cloned()
    }

    fn confirm(&mut self, i: usize, verdict: Verdict) {
        self.input(Input::ConfirmationResult {
            host: host(i),
            source: Source::Pacemaker,
            verdict,
        });
    }

    /// Kill host i, confirm it dead, and return the fence key.
    fn kill_until_fence(&mut self, i: usize) -> IntentKey {
        self.kill(i);
        self.run_for(600);
        assert_eq!(self.state(i), HostState::Confirming);
        self.confirm(i, Verdict::Dead);
        self.run_for(100);
        assert_eq!(self.state(i), HostState::Fencing);
        self.fences().last().cloned().expect("a fence")
    }

    fn fence_result(&mut self, i: usize, key: IntentKey, outcome: FenceOutcome) {
        self.input(Input::FenceResult {
            host: host(i),
            key,
            outcome,
        });
    }

    fn exit(&mut self, i: usize, vm: &str, source: Source, at: u64) {
        self.input(Input::HostEvent {
            host: host(i),
            event: HostEvent::ResourceExited {
                resource: Resource::vm(vm),
                source,
                at: self.host_clock(at),
                reason: "SIGKILL".into(),
            },
        });
    }

    fn force_down_ok(&mut self, i: usize) {
        let key = match self.find(|a| matches!(a, Action::ForceDown { .. })) {
            Some(Action::ForceDown { key, .. }) => key,
            _ => panic!("no force-down"),
        };
        self.input(Input::HostActionResult {
            host: host(i),
            key,
            outcome: RestoreOutcome::Ok { host: host(i) },
        });
    }
}

impl Harness {
    /// Kill host i, fence it, force it down and restore its VM on host 0: `Recovered`.
    fn fence_and_recover(&mut self, i: usize) {
        let key = self.kill_until_fence(i);
        self.fence_result(i, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
        self.force_down_ok(i);
        let (r, key) = evacuations(&self.actions)
            .into_iter()
            .find(|(r, _)| *r == Resource::vm(format!("vm{i}")))
            .expect("an evacuation");
        self.input(Input::RestoreResult {
            resource: r,
            key,
            outcome: RestoreOutcome::Ok { host: host(0) },
        });
        assert_eq!(self.state(i), HostState::Recovered);
    }

    fn compute_reports(&mut self, i: usize) {
        self.input(Input::HostEvent {
            host: host(i),
            event: HostEvent::ComputeServiceReporting,
        });
    }

    fn back(&self, i: usize) -> bool {
        self.engine
            .hosts()
            .into_iter()
            .find(|v| v.host == host(i))
            .is_some_and(|v| v.back)
    }
}

fn evacuations(actions: &[Action]) -> Vec<(Resource, IntentKey)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Evacuate { resource, key, .. } => Some((resource.clone(), key.clone())),
            _ => None,
        })
        .collect()
}

fn alarms(actions: &[Action]) -> Vec<AlarmKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Alarm { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

#[test]
fn a_silent_host_becomes_suspect_after_300_ms_then_confirming() {
    let mut h = Harness::new(4);
    h.kill(1);
    h.run_for(300);
    assert_eq!(h.state(1), HostState::Suspect);
    h.take();
    h.run_for(300);
    assert_eq!(h.state(1), HostState::Confirming);
    assert!(h
        .find(|a| matches!(a, Action::Confirm { host } if *host == super::tests::host(1)))
        .is_some());
    assert_eq!(h.state(0), HostState::Up);
}

#[test]
fn a_host_whose_heartbeats_resume_goes_back_up_from_suspect_or_confirming() {
    let mut h = Harness::new(4);
    h.kill(1);
    h.run_for(300);
    assert_eq!(h.state(1), HostState::Suspect);
    h.revive(1);
    h.run_for(200);
    assert_eq!(h.state(1), HostState::Up);
    h.kill(1);
    h.run_for(700);
    assert_eq!(h.state(1), HostState::Confirming);
    h.revive(1);
    h.run_for(200);
    assert_eq!(h.state(1), HostState::Up);
    assert!(h.fences().is_empty());
    let inc = h.engine.incidents().next().unwrap();
    assert!(inc.closed_at.is_some());
    assert!(inc
        .timeline
        .iter()
        .any(|e| e.to == "Up" && e.source == Source::Heartbeat));
}

#[test]
fn a_confirmed_dead_host_is_fenced_and_only_then_evacuated() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    assert!(key.as_str().ends_with("/fence-1/host:h2"), "{key}");
    assert!(evacuations(&h.actions).is_empty());
    h.run_for(1000);
    assert!(
        evacuations(&h.actions).is_empty(),
        "no restore before the fence"
    );
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    assert_eq!(h.state(2), HostState::Fenced);
    assert!(
        evacuations(&h.actions).is_empty(),
        "no restore before force-down"
    );
    h.force_down_ok(2);
    assert_eq!(h.state(2), HostState::Evacuating);
    let ev = evacuations(&h.actions);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, Resource::vm("vm2"));
    // Every world action was persisted first.
    for a in &h.actions {
        if let Some(k) = a.intent_key() {
            assert!(h.log.contains(k), "{k} not persisted");
        }
    }
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm2"),
        key: ev[0].1.clone(),
        outcome: RestoreOutcome::Ok { host: host(0) },
    });
    assert_eq!(h.state(2), HostState::Recovered);
    assert_eq!(h.vm(2), ResourceState::Running);
    assert_eq!(
        h.engine.resource(&Resource::vm("vm2")).unwrap().host,
        host(0)
    );
}

#[test]
fn an_unverified_fence_is_an_alarm_not_a_restore() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(1);
    h.take();
    h.fence_result(
        1,
        key,
        FenceOutcome::Unverified {
            reason: "power state unknown".into(),
        },
    );
    assert_eq!(h.state(1), HostState::Fencing);
    assert!(alarms(&h.actions).contains(&AlarmKind::FenceUnverified));
    h.run_for(1000);
    assert!(evacuations(&h.actions).is_empty());
    assert!(h.find(|a| matches!(a, Action::ForceDown { .. })).is_none());
}

#[test]
fn a_failed_fence_is_retried_with_backoff_then_left_to_an_operator() {
    let mut h = Harness::new(4);
    for attempt in 1..=3 {
        let key = h.fences().last().cloned();
        let key = match key {
            Some(k) if attempt > 1 => k,
            _ => h.kill_until_fence(1),
        };
        assert!(key.as_str().contains(&format!("fence-{attempt}")), "{key}");
        h.fence_result(
            1,
            key,
            FenceOutcome::Failed {
                reason: "BMC timeout".into(),
            },
        );
        h.run_for(2100);
    }
    assert_eq!(h.fences().len(), 3);
    assert!(alarms(&h.actions).contains(&AlarmKind::FenceExhausted));
    assert!(evacuations(&h.actions).is_empty());
    // The operator gives up on the fence: the host is Up again, nothing was restored.
    h.command(OperatorCommand::Unfence { host: host(1) })
        .unwrap();
    assert_eq!(h.state(1), HostState::Up);
}

#[test]
fn a_vm_crash_on_a_host_being_fenced_is_folded_into_the_host_incident() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(3);
    h.take();
    h.exit(3, "vm3", Source::Ebpf, h.now);
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. }))
        .is_none());
    let inc = h.engine.host_incident(&host(3)).unwrap();
    assert_eq!(
        h.engine.resource(&Resource::vm("vm3")).unwrap().owner,
        Some(inc)
    );
    assert!(h
        .engine
        .incident(inc)
        .unwrap()
        .timeline
        .iter()
        .any(|e| e.cause.contains("exited")));
    h.fence_result(
        3,
        key,
        FenceOutcome::Verified(FenceVerifier::PacemakerHistory),
    );
    h.force_down_ok(3);
    assert_eq!(evacuations(&h.actions).len(), 1);
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. }))
        .is_none());
}

#[test]
fn a_crash_seen_while_a_host_is_suspect_is_handled_when_the_host_comes_back() {
    let mut h = Harness::new(4);
    h.kill(0);
    h.run_for(300);
    assert_eq!(h.state(0), HostState::Suspect);
    h.exit(0, "vm0", Source::Libvirt, h.now);
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. }))
        .is_none());
    h.revive(0);
    h.run_for(200);
    assert_eq!(h.state(0), HostState::Up);
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. }))
        .is_some());
}

#[test]
fn a_crashed_vm_on_a_healthy_host_is_restarted_in_place() {
    let mut h = Harness::new(3);
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::RestartInPlace {
        attempt,
        key,
        host: on,
        ..
    }) = h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart");
    };
    assert_eq!((attempt, on), (1, host(1)));
    assert_eq!(h.vm(1), ResourceState::RestartingInPlace { attempt: 1 });
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    assert_eq!(h.vm(1), ResourceState::Running);
    assert!(h.fences().is_empty());
}

#[test]
fn restarts_in_place_are_limited_per_window_then_the_vm_is_evacuated() {
    let mut h = Harness::new(3);
    for n in 1..=4u32 {
        h.run_for(1000);
        h.take();
        h.exit(1, "vm1", Source::Ebpf, h.now);
        if n <= 3 {
            let Some(Action::RestartInPlace { attempt, key, .. }) =
                h.find(|a| matches!(a, Action::RestartInPlace { .. }))
            else {
                panic!("no restart #{n}");
            };
            assert_eq!(attempt, n);
            h.run_for(100);
            h.input(Input::RestoreResult {
                resource: Resource::vm("vm1"),
                key,
                outcome: RestoreOutcome::Ok { host: host(1) },
            });
        } else {
            assert!(h
                .find(|a| matches!(a, Action::RestartInPlace { .. }))
                .is_none());
            assert_eq!(evacuations(&h.actions).len(), 1, "escalates to evacuate");
            assert_eq!(h.vm(1), ResourceState::Evacuating { attempt: 1 });
        }
    }
}

#[test]
fn an_ebpf_exit_and_a_libvirt_stop_for_the_same_vm_are_one_incident() {
    let mut h = Harness::new(3);
    let t = h.now;
    h.exit(1, "vm1", Source::Ebpf, t);
    h.run_for(50);
    h.exit(1, "vm1", Source::Libvirt, t + 20);
    let restarts = h
        .actions
        .iter()
        .filter(|a| matches!(a, Action::RestartInPlace { .. }))
        .count();
    assert_eq!(restarts, 1);
    let owner = h
        .engine
        .resource(&Resource::vm("vm1"))
        .unwrap()
        .owner
        .unwrap();
    let tl = &h.engine.incident(owner).unwrap().timeline;
    assert!(tl
        .iter()
        .any(|e| e.source == Source::Libvirt && e.cause.starts_with("also")));
}

#[test]
fn a_late_exit_event_from_before_the_restore_is_ignored() {
    let mut h = Harness::new(3);
    let t = h.now;
    h.exit(1, "vm1", Source::Ebpf, t);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!()
    };
    h.run_for(200);
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    h.take();
    h.run_for(100);
    h.exit(1, "vm1", Source::Libvirt, t + 10);
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. }))
        .is_none());
    assert_eq!(h.vm(1), ResourceState::Running);
}

#[test]
fn duplicated_results_are_ignored() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    let r = FenceOutcome::Verified(FenceVerifier::IpmiPowerOff);
    h.fence_result(2, key.clone(), r.clone());
    h.take();
    h.fence_result(2, key, r);
    assert!(h
        .actions
        .iter()
        .all(|a| !matches!(a, Action::CompleteIntent { .. })));
}

#[test]
fn when_more_than_half_the_hosts_look_dead_nothing_is_fenced() {
    let mut h = Harness::new(4);
    h.kill(0);
    h.kill(1);
    h.kill(2);
    h.run_for(600);
    h.confirm(0, Verdict::Dead);
    h.confirm(1, Verdict::Dead);
    h.confirm(2, Verdict::Dead);
    h.run_for(4000);
    assert!(h.fences().is_empty());
    assert!(alarms(&h.actions).contains(&AlarmKind::MassFailure));
    // The gate clears when hosts come back; the one still dead is then fenced.
    h.revive(0);
    h.revive(1);
    h.run_for(300);
    assert_eq!(h.fences().len(), 1);
}

#[test]
fn a_controller_that_hears_nobody_suspects_itself_and_fences_nobody() {
    let mut h = Harness::new(3);
    for i in 0..3 {
        h.kill(i);
    }
    h.run_for(600);
    for i in 0..3 {
        h.confirm(i, Verdict::Dead);
    }
    h.run_for(5000);
    assert!(h.fences().is_empty());
    assert!(alarms(&h.actions).contains(&AlarmKind::ControllerIsolated));
}

#[test]
fn a_host_in_maintenance_is_never_fenced() {
    let mut h = Harness::new(4);
    h.command(OperatorCommand::MaintenanceOn { host: host(1) })
        .unwrap();
    assert_eq!(h.state(1), HostState::Maintenance);
    h.kill(1);
    h.run_for(10_000);
    assert_eq!(h.state(1), HostState::Maintenance);
    assert!(h.fences().is_empty());
    h.revive(1);
    h.run_for(200);
    h.command(OperatorCommand::MaintenanceOff { host: host(1) })
        .unwrap();
    h.run_for(500);
    assert_eq!(h.state(1), HostState::Up);
}

#[test]
fn an_alive_verdict_holds_the_fence_and_raises_an_alarm() {
    let mut h = Harness::new(4);
    h.kill(1);
    h.run_for(600);
    h.confirm(1, Verdict::Alive);
    h.run_for(5000);
    assert!(h.fences().is_empty());
    assert!(alarms(&h.actions).contains(&AlarmKind::HostAliveButSilent));
}

#[test]
fn an_unknown_verdict_fences_only_after_long_silence() {
    let mut h = Harness::new(4);
    h.kill(1);
    h.run_for(600);
    h.confirm(1, Verdict::Unknown);
    h.run_for(1000);
    assert!(h.fences().is_empty());
    h.run_for(2000);
    assert_eq!(h.fences().len(), 1);
}

#[test]
fn a_router_on_a_dead_host_is_moved_without_a_restart_in_place() {
    let mut h = Harness::new(3);
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: vec![Resource::vm("vm1"), Resource::router("r1")],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Nova,
            at: ListedAt::Controller(Timestamp(h.now)),
        },
    });
    // A router crash on a healthy host goes straight to a move.
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::ResourceExited {
            resource: Resource::router("r1"),
            source: Source::Neutron,
            at: HostTime(h.now),
            reason: "l3 agent lost it".into(),
        },
    });
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. }))
        .is_none());
    let ev = evacuations(&h.actions);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0.kind(), ResourceKind::Router);
}

#[test]
fn routers_listed_by_neutron_at_force_down_are_moved_by_the_host_incident_and_reported_stale_on_return(
) {
    let mut h = Harness::new(3);
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.run_for(100);
    // The force-down's restorer hands over what Neutron scheduled on the host.
    let routers = vec![Resource::router("r1"), Resource::router("r2")];
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: routers.clone(),
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Neutron,
            at: ListedAt::Controller(Timestamp(h.now)),
        },
    });
    h.force_down_ok(1);
    h.run_for(100);
    let ev = evacuations(&h.actions);
    let moved: Vec<&Resource> = ev.iter().map(|(r, _)| r).collect();
    assert!(
        moved.contains(&&routers[0])
            && moved.contains(&&routers[1])
            && moved.contains(&&Resource::vm("vm1"))
    );
    for (r, key) in ev {
        let to = if r.kind() == ResourceKind::Router {
            host(2)
        } else {
            host(0)
        };
        h.input(Input::RestoreResult {
            resource: r,
            key,
            outcome: RestoreOutcome::Ok { host: to },
        });
    }
    h.run_for(100);
    assert_eq!(h.state(1), HostState::Recovered);
    // A watchdog inventory of a host that runs the routers (host 2) lists only VMs:
    // its routers are not "missing", nothing is opened for them.
    h.input(Input::HostEvent {
        host: host(2),
        event: HostEvent::Inventory {
            resources: vec![Resource::vm("vm2")],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(h.now)),
        },
    });
    assert_eq!(
        h.engine.resource_state(&routers[0]),
        Some(ResourceState::Running)
    );
    assert!(h.engine.claims().is_empty());
    // Host 1 returns: the routers moved off it are reported (stale), and the unfence
    // waits until they are cleared; its watchdog's inventory (VMs) does not clear them.
    h.revive(1);
    h.run_for(300);
    h.take();
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: routers.clone(),
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Neutron,
            at: ListedAt::Controller(Timestamp(h.now)),
        },
    });
    assert!(alarms(&h.actions).contains(&AlarmKind::StaleResource));
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: vec![],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(h.now)),
        },
    });
    h.take();
    let refused = h.command(OperatorCommand::Unfence { host: host(1) });
    assert!(h.find(|a| matches!(a, Action::Unfence { .. })).is_none());
    assert!(refused.is_err(), "{refused:?}");
    // Neutron shows the routers gone from the host's agent: cleared, unfence goes.
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: vec![],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Neutron,
            at: ListedAt::Controller(Timestamp(h.now)),
        },
    });
    h.command(OperatorCommand::Unfence { host: host(1) })
        .unwrap();
    assert!(h.find(|a| matches!(a, Action::Unfence { .. })).is_some());
}

#[test]
fn evacuation_failures_are_retried_then_given_up_with_an_alarm() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.force_down_ok(2);
    for n in 1..=3 {
        let ev = evacuations(&h.actions);
        assert_eq!(ev.len(), n);
        let (r, key) = ev.last().unwrap().clone();
        assert!(key.as_str().contains(&format!("evacuate-{n}")));
        h.input(Input::RestoreResult {
            resource: r,
            key,
            outcome: RestoreOutcome::Failed {
                reason: "no valid host".into(),
            },
        });
        h.run_for(1_000);
    }
    assert_eq!(h.vm(2), ResourceState::GaveUp);
    assert!(alarms(&h.actions).contains(&AlarmKind::RestoreGaveUp));
    assert_eq!(h.state(2), HostState::Recovered);
}

#[test]
fn a_superseded_restart_delays_the_fence_until_its_result_is_in() {
    let mut h = Harness::new(4);
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::RestartInPlace { key: restart, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!()
    };
    h.kill(1);
    h.run_for(600);
    h.confirm(1, Verdict::Dead);
    h.run_for(200);
    assert_eq!(h.state(1), HostState::Fencing);
    assert!(h.fences().is_empty(), "waits for the in-flight restart");
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key: restart,
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    assert_eq!(h.fences().len(), 1);
    let inc = h.engine.host_incident(&host(1)).unwrap();
    assert_eq!(
        h.engine.resource(&Resource::vm("vm1")).unwrap().owner,
        Some(inc)
    );
    // Exactly one open claim on vm1.
    let claims: Vec<_> = h
        .engine
        .claims()
        .into_iter()
        .filter(|(_, r)| *r == Resource::vm("vm1"))
        .collect();
    assert_eq!(claims.len(), 1);
}

#[test]
fn a_fenced_host_is_not_trusted_until_an_operator_unfences_it() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.force_down_ok(2);
    let (r, key) = evacuations(&h.actions)[0].clone();
    h.input(Input::RestoreResult {
        resource: r,
        key,
        outcome: RestoreOutcome::Ok { host: host(0) },
    });
    assert_eq!(h.state(2), HostState::Recovered);
    // Back with a stale qemu for vm2: alarm, and unfence is refused.
    h.revive(2);
    h.run_for(200);
    assert!(alarms(&h.actions).contains(&AlarmKind::HostBackAwaitingUnfence));
    h.input(Input::HostEvent {
        host: host(2),
        event: HostEvent::Inventory {
            resources: vec![Resource::vm("vm2")],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(h.now)),
        },
    });
    assert!(alarms(&h.actions).contains(&AlarmKind::StaleResource));
    h.take();
    let refused = h.command(OperatorCommand::Unfence { host: host(2) });
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(h.state(2), HostState::Recovered);
    // Clean now: the unfence goes through.
    h.input(Input::HostEvent {
        host: host(2),
        event: HostEvent::Inventory {
            resources: vec![],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(h.now)),
        },
    });
    h.command(OperatorCommand::Unfence { host: host(2) })
        .unwrap();
    assert_eq!(h.state(2), HostState::Up);
    assert!(h.find(|a| matches!(a, Action::Unfence { .. })).is_some());
}

#[test]
fn the_self_fence_deadline_counts_as_a_verified_fence_only_when_opted_in() {
    // Heartbeats say armed with 3 s; 3 s plus the 2 s margin.
    let cfg = Config {
        self_fence_margin: Some(Duration::from_secs(2)),
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg);
    let key = h.kill_until_fence(1);
    h.fence_result(
        1,
        key,
        FenceOutcome::Failed {
            reason: "no BMC".into(),
        },
    );
    assert_eq!(h.state(1), HostState::Fencing);
    h.run_for(5000);
    assert_eq!(h.state(1), HostState::Fenced);
    let self_fence = h.log.iter().any(|e| {
        matches!(e.record.intent, Intent::Fence { method: None, .. })
            && matches!(
                e.done.as_ref().map(|c| &c.outcome),
                Some(IntentOutcome::Fence(FenceOutcome::Verified(
                    FenceVerifier::SelfFenceDeadline
                )))
            )
    });
    assert!(self_fence);
    // Without the opt-in, the same story stays held.
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(1);
    h.fence_result(
        1,
        key,
        FenceOutcome::Failed {
            reason: "no BMC".into(),
        },
    );
    h.run_for(1000);
    assert_eq!(h.state(1), HostState::Fencing);
}

#[test]
fn a_restarted_controller_resumes_an_open_incident_without_repeating_done_actions() {
    let mut h = Harness::new(4);
    let fence = h.kill_until_fence(2);
    h.fence_result(
        2,
        fence.clone(),
        FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
    );
    let force_down = match h.find(|a| matches!(a, Action::ForceDown { .. })) {
        Some(Action::ForceDown { key, .. }) => key,
        _ => panic!(),
    };
    // Crash: the force-down is recorded but its result is lost with the process.
    let (mut engine, actions) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    assert_eq!(engine.host_state(&host(2)), Some(HostState::Fenced));
    let keys: Vec<&IntentKey> = actions.iter().filter_map(|a| a.intent_key()).collect();
    assert_eq!(
        keys,
        vec![&force_down],
        "only the open intent is handed out again"
    );
    assert!(actions
        .iter()
        .all(|a| !matches!(a, Action::PersistIntent(_))));
    let out = engine.step(
        Timestamp(h.now + 20),
        Input::HostActionResult {
            host: host(2),
            key: force_down,
            outcome: RestoreOutcome::Ok { host: host(2) },
        },
    );
    assert_eq!(engine.host_state(&host(2)), Some(HostState::Evacuating));
    let ev = evacuations(&out);
    assert_eq!(ev.len(), 1);
    assert!(!h.log.contains(&ev[0].1));
    // A late result of the done fence changes nothing.
    let out = engine.step(
        Timestamp(h.now + 30),
        Input::FenceResult {
            host: host(2),
            key: fence,
            outcome: FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
        },
    );
    assert!(out.iter().all(|a| a.intent_key().is_none()));
}

#[test]
fn a_resumed_incident_shows_its_stored_timeline_in_place_of_what_the_replay_rebuilt() {
    let mut h = Harness::new(4);
    let fence = h.kill_until_fence(2);
    h.fence_result(
        2,
        fence,
        FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
    );
    // What the first process recorded of h2's incident (what the store holds).
    let recorded: Vec<(IncidentId, TimelineEntry)> = h
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::RecordTimeline { incident, entry } => Some((*incident, entry.clone())),
            _ => None,
        })
        .collect();
    let id = recorded
        .iter()
        .find(|(_, e)| e.subject == Subject::Host(host(2)))
        .map(|(i, _)| *i)
        .expect("h2's incident");
    let stored: Vec<TimelineEntry> = recorded
        .into_iter()
        .filter(|(i, _)| *i == id)
        .map(|(_, e)| e)
        .collect();
    assert!(stored.iter().any(|e| e.to == "Suspect"));
    let resumed_at = h.now + 10;
    let (mut engine, _) = Engine::resume(Config::default(), &h.log, Timestamp(resumed_at));
    engine.restore_timeline(id, stored.clone());
    let timeline = &engine.incident(id).expect("resumed").timeline;
    // The stored lines first, as they were; then only what the resumed engine wrote
    // (its re-hand of the open force-down), none of the replay's rebuilt lines again.
    assert_eq!(&timeline[..stored.len()], &stored[..]);
    let after: Vec<&TimelineEntry> = timeline[stored.len()..].iter().collect();
    assert!(!after.is_empty());
    assert!(
        after
            .iter()
            .all(|e| e.at.0 >= resumed_at && e.cause.contains("resumed")),
        "{after:?}"
    );
    assert_eq!(timeline.iter().filter(|e| e.to == "Fenced").count(), 1);
}

#[test]
fn the_state_machines_reject_illegal_moves() {
    assert!(HostState::Up.transition(HostState::Fencing).is_err());
    assert!(HostState::Confirming.transition(HostState::Fenced).is_err());
    assert!(HostState::Fencing
        .transition(HostState::Maintenance)
        .is_err());
    assert!(HostState::Fencing
        .transition(HostState::Evacuating)
        .is_err());
    assert!(HostState::Suspect.transition(HostState::Up).is_ok());
    assert!(HostState::Evacuating
        .transition(HostState::Recovered)
        .is_ok());
    assert!(ResourceState::Running
        .transition(ResourceState::RestartingInPlace { attempt: 1 })
        .is_err());
    assert!(ResourceState::GaveUp
        .transition(ResourceState::Failed)
        .is_err());
    assert!(ResourceState::Evacuating { attempt: 1 }
        .transition(ResourceState::Evacuating { attempt: 3 })
        .is_err());
    assert!(ResourceState::Failed
        .transition(ResourceState::RestartingInPlace { attempt: 1 })
        .is_ok());
}

#[test]
fn the_intent_log_entries_are_serialisable() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    let entries = h.log.entries();
    let json = serde_json::to_string(&entries).unwrap();
    let back: Vec<IntentEntry> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, entries);
    let actions = h.take();
    let json = serde_json::to_string(&actions).unwrap();
    let back: Vec<Action> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, actions);
}

#[test]
fn a_second_account_of_a_failure_whose_incident_already_gave_up_joins_that_incident() {
    let cfg = Config {
        max_restarts_in_place: 1,
        max_evacuate_attempts: 1,
        // Every try fails at once, and the next follows at once.
        restore_retry_backoff: Duration::ZERO,
        ..Config::default()
    };
    let mut h = Harness::with(3, cfg);
    h.take();
    let failed_at = h.now;
    h.exit(1, "vm1", Source::Ebpf, failed_at);
    // Every restore fails at once: the incident gives up before libvirt reports.
    for _ in 0..2 {
        let Some(a) =
            h.find(|a| matches!(a, Action::RestartInPlace { .. } | Action::Evacuate { .. }))
        else {
            panic!("no restore action");
        };
        h.take();
        let key = a.intent_key().cloned().expect("keyed");
        h.input(Input::RestoreResult {
            resource: Resource::vm("vm1"),
            key,
            outcome: RestoreOutcome::Failed {
                reason: "no backend".into(),
            },
        });
    }
    assert_eq!(h.vm(1), ResourceState::GaveUp);
    let incidents_before = h.engine.incidents().count();
    h.run_for(200);
    h.take();
    h.exit(1, "vm1", Source::Libvirt, failed_at + 200);
    assert_eq!(
        h.engine.incidents().count(),
        incidents_before,
        "a second incident was opened"
    );
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. } | Action::Evacuate { .. }))
        .is_none());
    let inc = h
        .engine
        .incidents()
        .find(|i| i.subject == Subject::Resource(Resource::vm("vm1")))
        .expect("the incident");
    assert!(
        inc.timeline
            .iter()
            .any(|e| e.source == Source::Libvirt && e.cause.starts_with("also:")),
        "libvirt's account is missing: {:#?}",
        inc.timeline
    );
}

#[test]
fn a_failure_long_after_the_last_incident_gave_up_is_not_folded_into_it() {
    let cfg = Config {
        max_restarts_in_place: 1,
        max_evacuate_attempts: 1,
        // Every try fails at once, and the next follows at once.
        restore_retry_backoff: Duration::ZERO,
        ..Config::default()
    };
    let mut h = Harness::with(3, cfg);
    h.take();
    h.exit(1, "vm1", Source::Ebpf, h.now);
    for _ in 0..2 {
        let a = h
            .find(|a| matches!(a, Action::RestartInPlace { .. } | Action::Evacuate { .. }))
            .expect("restore action");
        h.take();
        h.input(Input::RestoreResult {
            resource: Resource::vm("vm1"),
            key: a.intent_key().cloned().expect("keyed"),
            outcome: RestoreOutcome::Failed {
                reason: "no backend".into(),
            },
        });
    }
    let inc = h.engine.incidents().last().expect("incident").id;
    let len = h.engine.incident(inc).unwrap().timeline.len();
    h.run_for(10_000);
    h.exit(1, "vm1", Source::Libvirt, h.now);
    assert_eq!(h.engine.incident(inc).unwrap().timeline.len(), len);
}

#[test]
fn a_successful_restart_in_place_is_in_the_incidents_timeline() {
    let mut h = Harness::new(3);
    h.take();
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart");
    };
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    let inc = h
        .engine
        .incidents()
        .find(|i| i.subject == Subject::Resource(Resource::vm("vm1")))
        .expect("incident");
    assert!(inc.closed_at.is_some());
    let last = inc.timeline.last().expect("timeline");
    assert_eq!(last.to, "Running", "{:#?}", inc.timeline);
    assert_eq!(last.cause, "restarted in place");
}

#[test]
fn a_successful_evacuation_is_in_the_incidents_timeline() {
    let cfg = Config {
        max_restarts_in_place: 0,
        ..Config::default()
    };
    let mut h = Harness::with(3, cfg);
    h.take();
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::Evacuate { key, .. }) = h.find(|a| matches!(a, Action::Evacuate { .. }))
    else {
        panic!("no evacuation: {:#?}", h.actions);
    };
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Ok { host: host(2) },
    });
    let inc = h
        .engine
        .incidents()
        .find(|i| i.subject == Subject::Resource(Resource::vm("vm1")))
        .expect("incident");
    assert!(
        inc.timeline.iter().any(|e| e.to == "Running"),
        "{:#?}",
        inc.timeline
    );
}

#[test]
fn a_vm_shut_off_on_purpose_is_forgotten_not_restarted_when_it_leaves_the_inventory() {
    let mut h = Harness::new(1);
    let inventory = |resources: Vec<Resource>, stopped: Vec<Resource>, at| Input::HostEvent {
        host: host(0),
        event: HostEvent::Inventory {
            resources,
            stopped,
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(at)),
        },
    };
    h.input(inventory(
        vec![Resource::vm("vm0"), Resource::vm("web")],
        vec![],
        600,
    ));
    h.take();
    // web destroyed by an operator, vm0 gone without a word: only vm0 is a failure.
    h.input(inventory(vec![], vec![Resource::vm("web")], 700));
    let restarted: Vec<Resource> = h
        .take()
        .into_iter()
        .filter_map(|a| match a {
            Action::RestartInPlace { resource, .. } => Some(resource),
            _ => None,
        })
        .collect();
    assert_eq!(restarted, vec![Resource::vm("vm0")]);
    assert!(h.engine.resource(&Resource::vm("web")).is_none());
    // Started again, it is tracked again.
    h.input(inventory(vec![Resource::vm("web")], vec![], 800));
    assert_eq!(
        h.engine.resource_state(&Resource::vm("web")),
        Some(ResourceState::Running)
    );
}

#[test]
fn a_domain_list_taken_before_a_restart_does_not_make_the_engine_forget_the_restarted_vm() {
    let mut h = Harness::new(1);
    let vm = Resource::vm("vm0");
    let exited_at = HostTime(h.now);
    h.input(Input::HostEvent {
        host: host(0),
        event: HostEvent::ResourceExited {
            resource: vm.clone(),
            source: Source::Libvirt,
            at: exited_at,
            reason: "libvirt: guest watchdog fired (action pause)".into(),
        },
    });
    let key = h
        .take()
        .into_iter()
        .find_map(|a| match a {
            Action::RestartInPlace { key, .. } => Some(key),
            _ => None,
        })
        .expect("a restart in place");
    h.now += 100;
    h.input(Input::RestoreResult {
        resource: vm.clone(),
        key,
        outcome: RestoreOutcome::Ok { host: host(0) },
    });
    assert_eq!(h.engine.resource_state(&vm), Some(ResourceState::Running));
    // The list the watchdog took while it had the hung domain destroyed arrives late.
    h.input(Input::HostEvent {
        host: host(0),
        event: HostEvent::Inventory {
            resources: vec![],
            stopped: vec![vm.clone()],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(exited_at.0 + 50)),
        },
    });
    assert_eq!(h.engine.resource_state(&vm), Some(ResourceState::Running));
}

fn stall(h: &mut Harness, i: usize, vm: &str, started: bool) {
    let (resource, at) = (Some(Resource::vm(vm)), HostTime(h.now));
    h.input(Input::HostEvent {
        host: host(i),
        event: if started {
            HostEvent::DiskStallStarted { resource, at }
        } else {
            HostEvent::DiskStallEnded { resource, at }
        },
    });
}

fn incidents_about(h: &Harness, vm: &str) -> Vec<Incident> {
    h.engine
        .incidents()
        .filter(|i| i.subject == Subject::Resource(Resource::vm(vm)))
        .cloned()
        .collect()
}

#[test]
fn a_disk_stall_of_a_healthy_vm_is_an_incident_that_records_start_and_end_and_acts_on_nothing() {
    let mut h = Harness::new(3);
    h.take();
    stall(&mut h, 1, "vm1", true);
    h.run_for(1000);
    let open = incidents_about(&h, "vm1");
    assert_eq!(open.len(), 1, "{open:?}");
    assert!(open[0].closed_at.is_none());
    assert!(open[0].timeline[0].cause.starts_with("disk stall started"));
    assert_eq!(open[0].timeline[0].source, Source::Ebpf);
    // A repeated start (a restarted watchdog) is the same incident.
    stall(&mut h, 1, "vm1", true);
    assert_eq!(incidents_about(&h, "vm1").len(), 1);
    stall(&mut h, 1, "vm1", false);
    let done = incidents_about(&h, "vm1");
    assert_eq!(done.len(), 1);
    assert!(done[0].closed_at.is_some(), "{done:?}");
    assert!(done[0]
        .timeline
        .last()
        .is_some_and(|e| e.cause.starts_with("disk stall ended")));
    // Observed, not acted on: the VM kept running, nothing was restarted or fenced.
    assert_eq!(h.vm(1), ResourceState::Running);
    assert!(h
        .find(|a| matches!(
            a,
            Action::RestartInPlace { .. } | Action::Evacuate { .. } | Action::Fence { .. }
        ))
        .is_none());
    // The next stall is a new incident.
    stall(&mut h, 1, "vm1", true);
    assert_eq!(incidents_about(&h, "vm1").len(), 2);
}

#[test]
fn a_crash_during_a_disk_stall_is_still_restarted_and_the_stall_end_closes_the_stall_incident() {
    let mut h = Harness::new(3);
    stall(&mut h, 1, "vm1", true);
    h.exit(1, "vm1", Source::Ebpf, h.now);
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { .. }))
        .is_some());
    stall(&mut h, 1, "vm1", false);
    let all = incidents_about(&h, "vm1");
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all[0].closed_at.is_some(), "the stall incident: {all:?}");
    assert!(all[1]
        .timeline
        .iter()
        .any(|e| e.cause.starts_with("disk stall ended")));
}

#[test]
fn a_stall_incident_is_closed_when_the_vms_host_incident_takes_the_vm_over() {
    let mut h = Harness::new(3);
    stall(&mut h, 1, "vm1", true);
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.run_for(100);
    let stall_inc = &incidents_about(&h, "vm1")[0];
    assert!(stall_inc.closed_at.is_some(), "{stall_inc:?}");
    assert!(stall_inc
        .timeline
        .iter()
        .any(|e| e.cause.starts_with("superseded by host incident")));
}

impl Harness {
    fn neutron_lists(&mut self, i: usize, routers: &[&str]) -> Vec<Action> {
        self.input(Input::HostEvent {
            host: host(i),
            event: HostEvent::Inventory {
                resources: routers.iter().map(|r| Resource::router(*r)).collect(),
                stopped: vec![],
                rbd_only: vec![],
                source: Source::Neutron,
                at: ListedAt::Controller(Timestamp(self.now)),
            },
        })
    }

    fn neutron_fails(&mut self, i: usize, reason: &str) -> Vec<Action> {
        self.input(Input::HostEvent {
            host: host(i),
            event: HostEvent::InventoryFailed {
                source: Source::Neutron,
                reason: reason.into(),
            },
        })
    }

    /// Host i fenced (verified) and its VM half forced down: `Evacuating`.
    fn fence_and_force_down(&mut self, i: usize) {
        let key = self.kill_until_fence(i);
        self.fence_result(i, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
        self.run_for(100);
        self.force_down_ok(i);
        self.run_for(100);
        assert_eq!(self.state(i), HostState::Evacuating);
    }

    /// Answers every evacuation not answered yet with Ok on `to`.
    fn restore_all(&mut self, to: usize) {
        let open: Vec<(Resource, IntentKey)> = self
            .log
            .iter()
            .filter(|e| e.done.is_none())
            .filter_map(|e| match &e.record.intent {
                Intent::Evacuate { resource, .. } => Some((resource.clone(), e.record.key.clone())),
                _ => None,
            })
            .collect();
        for (r, key) in open {
            self.input(Input::RestoreResult {
                resource: r,
                key,
                outcome: RestoreOutcome::Ok { host: host(to) },
            });
        }
        self.run_for(100);
    }

    fn incident_of(&self, i: usize) -> &Incident {
        self.engine
            .incidents()
            .filter(|inc| inc.subject == Subject::Host(host(i)))
            .last()
            .expect("a host incident")
    }
}

#[test]
fn a_neutron_outage_at_force_down_holds_up_no_vm_and_raises_one_named_alarm() {
    let mut h = Harness::new(3);
    h.fence_and_force_down(1);
    // The VMs are evacuated although Neutron has not answered.
    assert!(evacuations(&h.actions)
        .iter()
        .any(|(r, _)| *r == Resource::vm("vm1")));
    h.take();
    h.neutron_fails(1, "connection refused");
    h.run_for(500);
    h.neutron_fails(1, "connection refused");
    let raised: Vec<Action> = h
        .actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Alarm {
                    kind: AlarmKind::InventoryFailed,
                    ..
                }
            )
        })
        .cloned()
        .collect();
    assert_eq!(raised.len(), 1, "one alarm per episode, not one per try");
    let Action::Alarm {
        host: on, reason, ..
    } = &raised[0]
    else {
        unreachable!()
    };
    assert_eq!(on.as_ref(), Some(&host(1)));
    assert!(reason.contains("connection refused"), "{reason}");
    // Still no router, and the host incident carries the failure from Neutron.
    assert!(h
        .incident_of(1)
        .timeline
        .iter()
        .any(|e| e.source == Source::Neutron && e.cause.contains("connection refused")));
    // Neutron answers while the VMs are still being evacuated: its routers join.
    h.take();
    h.neutron_lists(1, &["r1", "r2"]);
    h.run_for(100);
    let ev: Vec<Resource> = evacuations(&h.actions).into_iter().map(|e| e.0).collect();
    assert_eq!(ev, vec![Resource::router("r1"), Resource::router("r2")]);
    h.restore_all(2);
    assert_eq!(h.state(1), HostState::Recovered);
    assert!(h.incident_of(1).closed_at.is_some());
    // A later outage is a new episode: alarmed again.
    h.take();
    h.neutron_fails(1, "503");
    assert!(alarms(&h.actions).contains(&AlarmKind::InventoryFailed));
}

#[test]
fn routers_listed_before_the_vm_halfs_force_down_result_wait_for_it() {
    let mut h = Harness::new(3);
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.run_for(100);
    assert_eq!(h.state(1), HostState::Fenced);
    h.neutron_lists(1, &["r1"]);
    h.run_for(100);
    assert!(
        evacuations(&h.actions).is_empty(),
        "nothing before force-down"
    );
    h.force_down_ok(1);
    h.run_for(100);
    let ev: Vec<Resource> = evacuations(&h.actions).into_iter().map(|e| e.0).collect();
    assert!(ev.contains(&Resource::router("r1")) && ev.contains(&Resource::vm("vm1")));
}

#[test]
fn routers_listed_after_the_host_incident_closed_reopen_it_and_are_moved() {
    let mut h = Harness::new(3);
    h.fence_and_force_down(1);
    h.restore_all(0);
    assert_eq!(h.state(1), HostState::Recovered);
    let inc = h.incident_of(1).id;
    assert!(h.incident_of(1).closed_at.is_some());
    h.take();
    h.neutron_lists(1, &["r1", "r2"]);
    assert_eq!(h.state(1), HostState::Evacuating);
    assert_eq!(
        h.engine.host_incident(&host(1)),
        Some(inc),
        "the same incident"
    );
    assert!(h.incident_of(1).closed_at.is_none());
    h.run_for(100);
    let ev: Vec<Resource> = evacuations(&h.actions).into_iter().map(|e| e.0).collect();
    assert_eq!(ev, vec![Resource::router("r1"), Resource::router("r2")]);
    // A restart mid-move resumes the reopened incident from the log.
    let (engine, again) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    assert_eq!(engine.host_state(&host(1)), Some(HostState::Evacuating));
    assert_eq!(
        again
            .iter()
            .filter(|a| matches!(a, Action::Evacuate { .. }))
            .count(),
        2
    );
    h.restore_all(2);
    assert_eq!(h.state(1), HostState::Recovered);
    assert!(h.incident_of(1).closed_at.is_some());
    // Listed again (a restarted restorer lists every fenced host once): moved ones are
    // elsewhere now, so nothing reopens; they are stale for this host.
    h.take();
    h.neutron_lists(1, &["r1"]);
    assert_eq!(h.state(1), HostState::Recovered);
    assert!(evacuations(&h.actions).is_empty());
}

#[test]
fn a_late_router_inventory_is_safe_in_every_host_state() {
    // Up, Suspect, Confirming, Fencing, Fenced, Evacuating, Recovered, Maintenance,
    // and unfenced again: no panic, and routers are taken only by a fenced host's
    // incident.
    let mut h = Harness::new(4);
    h.neutron_lists(1, &["up"]);
    assert_eq!(
        h.engine.resource_state(&Resource::router("up")),
        Some(ResourceState::Running)
    );
    h.kill(1);
    h.run_for(300);
    assert_eq!(h.state(1), HostState::Suspect);
    h.neutron_lists(1, &["suspect"]);
    h.run_for(300);
    assert_eq!(h.state(1), HostState::Confirming);
    h.neutron_lists(1, &["confirming"]);
    h.neutron_fails(1, "x");
    assert!(!alarms(&h.actions).contains(&AlarmKind::InventoryFailed));
    h.confirm(1, Verdict::Dead);
    h.run_for(100);
    assert_eq!(h.state(1), HostState::Fencing);
    h.neutron_lists(1, &["fencing"]);
    let fence = h.fences().last().cloned().unwrap();
    h.fence_result(
        1,
        fence,
        FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
    );
    assert_eq!(h.state(1), HostState::Fenced);
    h.neutron_lists(1, &["fenced"]);
    h.force_down_ok(1);
    h.run_for(100);
    h.neutron_lists(1, &["evacuating"]);
    h.run_for(100);
    let inc = h.engine.host_incident(&host(1)).unwrap();
    for r in ["fencing", "fenced", "evacuating"] {
        let v = h.engine.resource(&Resource::router(r)).unwrap();
        assert_eq!(v.owner, Some(inc), "{r}");
    }
    h.restore_all(2);
    assert_eq!(h.state(1), HostState::Recovered);
    h.neutron_lists(1, &[]);
    assert_eq!(
        h.state(1),
        HostState::Recovered,
        "nothing listed, nothing reopened"
    );
    h.revive(1);
    h.run_for(300);
    h.command(OperatorCommand::Unfence { host: host(1) })
        .unwrap();
    assert_eq!(h.state(1), HostState::Up);
    h.take();
    h.neutron_lists(1, &["after-unfence"]);
    h.neutron_fails(1, "late");
    assert_eq!(h.state(1), HostState::Up);
    assert!(evacuations(&h.actions).is_empty());
    assert!(!alarms(&h.actions).contains(&AlarmKind::InventoryFailed));
    // Maintenance.
    h.command(OperatorCommand::MaintenanceOn { host: host(3) })
        .unwrap();
    assert_eq!(h.state(3), HostState::Maintenance);
    h.neutron_lists(3, &["maintenance"]);
    assert_eq!(h.state(3), HostState::Maintenance);
}

#[test]
fn the_routers_moved_off_a_host_are_rebuilt_from_the_intent_log_after_a_restart() {
    let mut h = Harness::new(3);
    h.fence_and_force_down(1);
    h.neutron_lists(1, &["r1", "r2"]);
    h.run_for(100);
    h.restore_all(2);
    assert_eq!(h.state(1), HostState::Recovered);
    let view = |e: &Engine| {
        e.hosts()
            .into_iter()
            .find(|v| v.host == host(1))
            .unwrap()
            .evacuated
    };
    let moved = vec![
        Resource::vm("vm1"),
        Resource::router("r1"),
        Resource::router("r2"),
    ];
    assert_eq!(view(&h.engine), moved);
    let (engine, _) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    assert_eq!(engine.host_state(&host(1)), Some(HostState::Recovered));
    assert_eq!(view(&engine), moved);
    // Healthy hosts have moved nothing off.
    assert!(engine
        .hosts()
        .iter()
        .all(|v| v.host == host(1) || v.evacuated.is_empty()));
    // Unfenced: nothing of it is stale any more, also after a restart.
    h.revive(1);
    h.run_for(300);
    h.command(OperatorCommand::Unfence { host: host(1) })
        .unwrap();
    assert!(view(&h.engine).is_empty());
    let (engine, _) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    assert!(view(&engine).is_empty());
}

#[test]
fn router_steps_are_labelled_neutron_on_the_timeline_whatever_restores_the_vms() {
    let cfg = Config {
        vm_restorer: Source::Libvirt,
        max_evacuate_attempts: 2,
        ..Config::default()
    };
    let mut h = Harness::with(3, cfg);
    h.fence_and_force_down(1);
    h.neutron_fails(1, "unreachable");
    h.neutron_lists(1, &["r1", "r2"]);
    h.run_for(100);
    // r1 fails once then moves; r2 moves.
    let ev = evacuations(&h.actions);
    let r1 = ev
        .iter()
        .find(|e| e.0 == Resource::router("r1"))
        .unwrap()
        .1
        .clone();
    h.input(Input::RestoreResult {
        resource: Resource::router("r1"),
        key: r1.clone(),
        outcome: RestoreOutcome::Failed {
            reason: "no agent".into(),
        },
    });
    // The next try after the pause.
    h.run_for(1_100);
    h.restore_all(2);
    assert_eq!(h.state(1), HostState::Recovered);
    let inc = h.incident_of(1);
    let about_routers: Vec<&TimelineEntry> = inc
        .timeline
        .iter()
        .filter(|e| matches!(&e.subject, Subject::Resource(r) if r.kind() == ResourceKind::Router))
        .filter(|e| e.source != Source::Controller)
        .collect();
    assert!(about_routers.len() >= 3, "{about_routers:?}");
    for e in &about_routers {
        assert_eq!(e.source, Source::Neutron, "{e:?}");
    }
    assert!(about_routers
        .iter()
        .any(|e| e.cause.contains("failed: no agent")));
    // The listing's failure too; the VM's steps keep the VM backend's name.
    assert!(inc
        .timeline
        .iter()
        .any(|e| e.source == Source::Neutron && e.cause.contains("unreachable")));
    assert!(inc.timeline.iter().any(
        |e| e.subject == Subject::Resource(Resource::vm("vm1")) && e.source == Source::Libvirt
    ));
}

/// The evacuation of vm1 (h1 → h2) still in flight, the open Evacuate intent's key.
fn evacuation_in_flight(h: &Harness) -> IntentKey {
    h.log
        .iter()
        .filter(|e| e.done.is_none())
        .find_map(|e| match &e.record.intent {
            Intent::Evacuate { resource, .. } if *resource == Resource::vm("vm1") => {
                Some(e.record.key.clone())
            }
            _ => None,
        })
        .expect("vm1's evacuation in flight")
}

#[test]
fn a_resumed_controller_keeps_an_evacuation_that_succeeded_in_the_same_millisecond_as_the_unfence()
{
    let mut h = Harness::new(3);
    h.fence_and_force_down(1);
    let key = evacuation_in_flight(&h);
    h.power_on(1);
    h.run_for(300);
    // Live: the success first, then the operator's unfence, both at the same instant.
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Ok { host: host(2) },
    });
    h.command(OperatorCommand::Unfence { host: host(1) })
        .unwrap();
    let (mut engine, _) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    assert_eq!(engine.resource(&Resource::vm("vm1")).unwrap().host, host(2));
    let out = engine.step(
        Timestamp(h.now + 20),
        Input::HostEvent {
            host: host(1),
            event: HostEvent::Inventory {
                resources: vec![],
                stopped: vec![],
                rbd_only: vec![],
                source: Source::Libvirt,
                at: ListedAt::Host(HostTime(h.now + 20)),
            },
        },
    );
    assert!(
        out.iter()
            .all(|a| !matches!(a, Action::RestartInPlace { .. } | Action::Evacuate { .. })),
        "{out:?}"
    );
}

#[test]
fn leaving_maintenance_while_the_controller_hears_nobody_does_not_open_the_safety_gate() {
    let mut h = Harness::new(2);
    h.command(OperatorCommand::MaintenanceOn { host: host(0) })
        .unwrap();
    // The controller is cut off: no heartbeat from anyone.
    for i in 0..2 {
        h.kill(i);
    }
    h.run_for(1000);
    assert!(h
        .find(|a| matches!(
            a,
            Action::Alarm {
                kind: AlarmKind::ControllerIsolated,
                ..
            }
        ))
        .is_some());
    // A host back from maintenance has not been heard since: it is no proof that the
    // controller hears anyone.
    h.command(OperatorCommand::MaintenanceOff { host: host(0) })
        .unwrap();
    for i in 1..2 {
        h.confirm(i, Verdict::Dead);
    }
    h.run_for(250);
    assert!(h.fences().is_empty(), "{:?}", h.fences());
}

#[test]
fn a_vm_restored_onto_a_host_whose_fence_is_decided_is_taken_by_that_hosts_incident() {
    let mut h = Harness::new(4);
    // h1 goes silent and is being fenced; its BMC does not answer yet.
    let h1_fence = h.kill_until_fence(1);
    h.fence_result(
        1,
        h1_fence,
        FenceOutcome::Failed {
            reason: "BMC did not answer".into(),
        },
    );
    assert_eq!(h.state(1), HostState::Fencing);
    // h2 dies and is fenced; the backend puts vm2 on h1 (the engine does not pick
    // targets).
    h.fence_and_force_down(2);
    let key = h
        .log
        .iter()
        .filter(|e| e.done.is_none())
        .find_map(|e| match &e.record.intent {
            Intent::Evacuate { resource, .. } if *resource == Resource::vm("vm2") => {
                Some(e.record.key.clone())
            }
            _ => None,
        })
        .expect("vm2's evacuation");
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm2"),
        key,
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    let vm2 = h.engine.resource(&Resource::vm("vm2")).unwrap();
    assert_eq!(vm2.host, host(1));
    assert_eq!(
        vm2.owner,
        Some(h.incident_of(1).id),
        "h1's fence will kill vm2: h1's incident must restore it again"
    );
}

#[test]
fn a_recovered_host_is_back_while_it_is_heard_after_its_fence() {
    let mut h = Harness::new(4);
    h.fence_and_recover(2);
    assert!(!h.back(2), "silent since the fence");
    h.revive(2);
    h.run_for(200);
    assert!(h.back(2));
    h.kill(2);
    h.run_for(400);
    assert!(!h.back(2), "silent again");
}

#[test]
fn the_automatic_unfence_policy_trusts_a_host_back_whose_compute_reports_only_when_opted_in() {
    for auto in [false, true] {
        let cfg = Config {
            auto_unfence: auto,
            ..Config::default()
        };
        let mut h = Harness::with(4, cfg);
        h.fence_and_recover(2);
        // Its compute service reports, but the host itself is not heard: not trusted.
        h.compute_reports(2);
        assert_eq!(h.state(2), HostState::Recovered);
        h.revive(2);
        h.run_for(200);
        h.take();
        h.compute_reports(2);
        let unfenced =
            h.find(|a| matches!(a, Action::Unfence { host, .. } if *host == super::tests::host(2)));
        if auto {
            assert!(unfenced.is_some(), "auto: unfenced");
            assert_eq!(h.state(2), HostState::Up);
        } else {
            assert!(
                unfenced.is_none(),
                "operator policy: the fact alone changes nothing"
            );
            assert_eq!(h.state(2), HostState::Recovered);
        }
    }
}

#[test]
fn the_automatic_unfence_policy_waits_while_the_host_still_runs_resources_restored_elsewhere() {
    let cfg = Config {
        auto_unfence: true,
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg);
    h.fence_and_recover(2);
    h.revive(2);
    h.run_for(200);
    // Back with a stale qemu of vm2 (it runs on host 0 now).
    h.input(Input::HostEvent {
        host: host(2),
        event: HostEvent::Inventory {
            resources: vec![Resource::vm("vm2")],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(h.now)),
        },
    });
    h.take();
    h.compute_reports(2);
    assert!(h.find(|a| matches!(a, Action::Unfence { .. })).is_none());
    assert!(
        !alarms(&h.actions).contains(&AlarmKind::CommandRefused),
        "a policy that waits is not a refused command"
    );
    assert_eq!(h.state(2), HostState::Recovered);
    // Clean now: the next report unfences it.
    h.input(Input::HostEvent {
        host: host(2),
        event: HostEvent::Inventory {
            resources: vec![],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(HostTime(h.now)),
        },
    });
    h.compute_reports(2);
    assert_eq!(h.state(2), HostState::Up);
}

/// A day in the life of a small cloud, on hosts whose clocks read `offset_ms` more than
/// the controller's: a VM crash restarted in place, libvirt's late account of it, a
/// second crash, a host lost, fenced and evacuated, back with a stale copy. Its
/// decisions, without what shows the hosts' own times (timeline lines, the restores'
/// dates on their hosts' clocks).
fn decisions_with_host_clocks_off_by(offset_ms: i64) -> Vec<Action> {
    let start = 1_000_000;
    let mut h = Harness::clocked(3, Config::default(), start, offset_ms);
    // vm1 crashes; restarted in place; libvirt's account of the same crash comes after.
    let crashed = h.now;
    h.exit(1, "vm1", Source::Ebpf, crashed);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart in place")
    };
    h.run_for(200);
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    h.run_for(100);
    h.exit(1, "vm1", Source::Libvirt, crashed + 10);
    h.run_for(5_000);
    // A new crash, after the restore.
    let again = h.now;
    h.exit(1, "vm1", Source::Ebpf, again);
    h.run_for(100);
    // Host 2 is lost, fenced, its VM restored on host 0; it comes back with a stale copy.
    h.fence_and_recover(2);
    h.revive(2);
    h.run_for(300);
    let listed = h.host_clock(h.now);
    h.input(Input::HostEvent {
        host: host(2),
        event: HostEvent::Inventory {
            resources: vec![Resource::vm("vm2")],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(listed),
        },
    });
    h.run_for(100);
    h.actions
        .into_iter()
        .filter(|a| !matches!(a, Action::RecordTimeline { .. }))
        .map(|a| match a {
            // The restore's date on its host's clock is the hosts' own time.
            Action::CompleteIntent {
                key,
                mut completion,
            } => {
                completion.host_clock = None;
                Action::CompleteIntent { key, completion }
            }
            other => other,
        })
        .collect()
}

#[test]
fn a_host_whose_clock_is_ten_minutes_ahead_or_behind_is_handled_exactly_like_one_with_a_true_clock()
{
    let true_clock = decisions_with_host_clocks_off_by(0);
    // The run means something: one restart per crash (libvirt's late account of the
    // first is not a third), the host fenced, its VM evacuated, back and stale.
    let restarts = true_clock
        .iter()
        .filter(|a| matches!(a, Action::RestartInPlace { .. }))
        .count();
    assert_eq!(restarts, 2, "{true_clock:#?}");
    assert_eq!(evacuations(&true_clock).len(), 1);
    let kinds = alarms(&true_clock);
    assert!(
        kinds.contains(&AlarmKind::HostBackAwaitingUnfence),
        "{kinds:?}"
    );
    assert!(kinds.contains(&AlarmKind::StaleResource), "{kinds:?}");
    for offset in [-600_000, 600_000] {
        assert_eq!(
            decisions_with_host_clocks_off_by(offset),
            true_clock,
            "hosts' clocks off by {offset} ms"
        );
    }
}

#[test]
fn a_failed_restore_is_tried_again_after_a_pause_not_at_once() {
    // A target whose watchdog stream just closed (a host back from a partition) fails
    // an evacuation at once; retrying at once would spend every try within
    // milliseconds and give the VM up while the cloud recovers.
    let mut h = Harness::new(3);
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let restart = |h: &Harness| {
        h.actions
            .iter()
            .filter(|a| matches!(a, Action::RestartInPlace { .. }))
            .count()
    };
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart")
    };
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Failed {
            reason: "the event stream of h1 closed before the watchdog answered".into(),
        },
    });
    h.run_for(500);
    assert_eq!(restart(&h), 1, "not again within half a second");
    h.run_for(600);
    assert_eq!(restart(&h), 2, "again after the pause");
    assert_eq!(
        h.engine.resource_state(&Resource::vm("vm1")),
        Some(ResourceState::RestartingInPlace { attempt: 2 })
    );
}

/// Self-fencing on (hosts say armed with 3 s; 2 s margin), no restarts in place.
fn self_fencing_harness() -> Harness {
    let cfg = Config {
        self_fence_margin: Some(Duration::from_secs(2)),
        max_restarts_in_place: 0,
        ..Config::default()
    };
    Harness::with(4, cfg)
}

/// vm1 crashes on host 1 and the backend restores it on host `to`.
fn crash_vm1_and_restore_it_on(h: &mut Harness, to: usize) {
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let (r, key) = evacuations(&h.actions)
        .into_iter()
        .find(|(r, _)| *r == Resource::vm("vm1"))
        .expect("vm1 evacuated");
    h.input(Input::RestoreResult {
        resource: r,
        key,
        outcome: RestoreOutcome::Ok { host: host(to) },
    });
}

/// What was evacuated off host `i` so far.
fn evacuated_off(h: &Harness, i: usize) -> Vec<Resource> {
    h.actions
        .iter()
        .filter_map(|a| match a {
            Action::Evacuate { resource, from, .. } if *from == host(i) => Some(resource.clone()),
            _ => None,
        })
        .collect()
}

/// Host `i`'s watchdog lists the VMs it runs, now on its clock.
fn libvirt_lists(h: &mut Harness, i: usize, resources: Vec<Resource>) {
    let at = h.host_clock(h.now);
    h.input(Input::HostEvent {
        host: host(i),
        event: HostEvent::Inventory {
            resources,
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(at),
        },
    });
}

#[test]
fn a_vm_restored_onto_a_silent_host_is_not_evacuated_on_the_strength_of_its_self_fence_deadline() {
    // The deadline says the host killed what it ran when it fell silent (then rebooted);
    // a VM the backend started there afterwards is not covered by it.
    let mut h = self_fencing_harness();
    h.kill_until_fence(2);
    // vm1 crashes on host 1; the backend restores it on host 2, which is being fenced.
    crash_vm1_and_restore_it_on(&mut h, 2);
    h.run_for(6_000);
    assert_eq!(h.state(2), HostState::Fenced, "fenced by its deadline");
    h.force_down_ok(2);
    let moved = evacuated_off(&h, 2);
    assert!(
        !moved.contains(&Resource::vm("vm1")),
        "vm1 evacuated off host 2 on the deadline's account: {moved:?}"
    );
    assert!(moved.contains(&Resource::vm("vm2")), "{moved:?}");
    assert!(alarms(&h.actions).contains(&AlarmKind::AwaitingHostWord));
    // The host comes back (it had rebooted) and lists vm1: it runs there.
    h.revive(2);
    h.run_for(300);
    libvirt_lists(&mut h, 2, vec![Resource::vm("vm1")]);
    h.run_for(300);
    let vm1 = h.engine.resource(&Resource::vm("vm1")).unwrap();
    assert_eq!(
        (vm1.host, vm1.state, vm1.owner),
        (host(2), ResourceState::Running, None)
    );
    let moves = evacuations(&h.actions)
        .into_iter()
        .filter(|(r, _)| *r == Resource::vm("vm1"))
        .count();
    assert_eq!(moves, 1, "vm1 moved only once (off host 1)");
}

#[test]
fn an_arrival_its_silent_host_does_not_list_once_back_is_restored_elsewhere() {
    let mut h = self_fencing_harness();
    h.kill_until_fence(2);
    crash_vm1_and_restore_it_on(&mut h, 2);
    h.run_for(6_000);
    h.force_down_ok(2);
    h.run_for(500);
    let off_2 = |h: &Harness| {
        evacuated_off(h, 2)
            .iter()
            .filter(|r| **r == Resource::vm("vm1"))
            .count()
    };
    assert_eq!(off_2(&h), 0, "not moved while the host says nothing");
    // The host comes back, cut off long enough that its watchdog killed vm1: it lists
    // nothing. A listing older than the restore would say nothing about vm1.
    h.revive(2);
    h.run_for(300);
    libvirt_lists(&mut h, 2, vec![]);
    h.run_for(300);
    assert_eq!(
        off_2(&h),
        1,
        "restored elsewhere once the host said it lacks it"
    );
}

#[test]
fn a_vm_restored_onto_a_host_that_is_only_suspect_is_not_moved_again_on_its_self_fence_deadline() {
    // Found by the simulation (seed 65488): the backend moved a router (here a VM) onto a host that
    // had fallen silent but was not yet being fenced; the host's incident then took it
    // with the rest, and its self-fence deadline (which covers only what ran when the
    // host fell silent) moved it a second time while it ran.
    let mut h = self_fencing_harness();
    h.kill(2);
    h.run_for(600);
    assert_eq!(h.state(2), HostState::Confirming);
    // vm1 crashes on host 1; the backend restores it on host 2, silent but not fenced.
    crash_vm1_and_restore_it_on(&mut h, 2);
    h.confirm(2, Verdict::Dead);
    h.run_for(6_000);
    assert_eq!(h.state(2), HostState::Fenced, "fenced by its deadline");
    h.force_down_ok(2);
    let moved = evacuated_off(&h, 2);
    assert!(
        !moved.contains(&Resource::vm("vm1")),
        "vm1 evacuated off host 2 on the deadline's account: {moved:?}"
    );
    assert!(moved.contains(&Resource::vm("vm2")), "{moved:?}");
}

#[test]
fn a_host_heard_again_forgets_what_arrived_while_it_was_silent() {
    // An arrival is judged against the silence it arrived in: after the host is heard
    // again, a later loss and self-fence of it covers everything it runs.
    let mut h = self_fencing_harness();
    h.kill(2);
    h.run_for(600);
    crash_vm1_and_restore_it_on(&mut h, 2);
    h.revive(2);
    h.run_for(1_000);
    assert_eq!(h.state(2), HostState::Up);
    h.kill(2);
    h.run_for(600);
    h.confirm(2, Verdict::Dead);
    h.run_for(6_000);
    assert_eq!(h.state(2), HostState::Fenced, "fenced by its deadline");
    h.force_down_ok(2);
    let moved = evacuated_off(&h, 2);
    assert!(moved.contains(&Resource::vm("vm1")), "{moved:?}");
}

/// Host `i`'s fence fails (no BMC), leaving the self-fence deadline as the only way the
/// engine could count it fenced.
fn fence_fails_on(h: &mut Harness, i: usize) {
    let key = h.kill_until_fence(i);
    h.fence_result(
        i,
        key,
        FenceOutcome::Failed {
            reason: "no BMC".into(),
        },
    );
    assert_eq!(h.state(i), HostState::Fencing);
}

fn self_fenced(h: &Harness, i: usize) -> bool {
    h.log.iter().any(|e| {
        matches!(&e.record.intent, Intent::Fence { host, method: None, .. } if *host == self::host(i))
            && matches!(
                e.done.as_ref().map(|c| &c.outcome),
                Some(IntentOutcome::Fence(FenceOutcome::Verified(
                    FenceVerifier::SelfFenceDeadline
                )))
            )
    })
}

#[test]
fn a_host_whose_heartbeats_say_its_self_fence_is_not_armed_is_never_counted_fenced_by_its_silence()
{
    let cfg = Config {
        self_fence_margin: Some(Duration::from_secs(1)),
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg);
    h.self_fence.insert(host(1), None);
    h.run_for(1_000);
    fence_fails_on(&mut h, 1);
    // Far past any deadline: the fence keeps being retried by its levels (and alarms
    // once they are exhausted), but silence alone fences nothing.
    for _ in 0..6 {
        h.run_for(5_000);
        for key in h.fences() {
            if !h
                .log
                .iter()
                .any(|e| e.record.key == key && e.done.is_some())
            {
                h.fence_result(
                    1,
                    key,
                    FenceOutcome::Failed {
                        reason: "no BMC".into(),
                    },
                );
            }
        }
    }
    assert_eq!(h.state(1), HostState::Fencing);
    assert!(!self_fenced(&h, 1));
    assert!(
        evacuations(&h.actions)
            .iter()
            .all(|(r, _)| *r != Resource::vm("vm1")),
        "vm1 evacuated off a host nobody fenced"
    );
    assert!(alarms(&h.actions).contains(&AlarmKind::FenceExhausted));
    // The incident says once why the self-fence did not count.
    let id = h.engine.host_incident(&host(1)).unwrap();
    let inc = h.engine.incident(id).unwrap();
    let notes = inc
        .timeline
        .iter()
        .filter(|e| e.cause.starts_with("self-fence not counted"))
        .count();
    assert_eq!(notes, 1, "{:#?}", inc.timeline);
}

#[test]
fn the_self_fence_deadline_comes_from_the_timeout_each_host_reports_plus_the_margin() {
    let cfg = Config {
        self_fence_margin: Some(Duration::from_secs(1)),
        max_fence_attempts: 1,
        ..Config::default()
    };
    let mut h = Harness::with(5, cfg);
    h.self_fence.insert(host(1), Some(Duration::from_secs(2)));
    h.self_fence.insert(host(2), Some(Duration::from_secs(8)));
    h.run_for(1_000);
    // Both fall silent together; their fences fail.
    h.kill(1);
    h.kill(2);
    let silent_at = h.now;
    h.run_for(600);
    h.confirm(1, Verdict::Dead);
    h.confirm(2, Verdict::Dead);
    h.run_for(100);
    for key in h.fences() {
        let i = if h.log.iter().any(|e| {
            e.record.key == key
                && matches!(&e.record.intent, Intent::Fence { host, .. } if *host == self::host(1))
        }) {
            1
        } else {
            2
        };
        h.fence_result(
            i,
            key,
            FenceOutcome::Failed {
                reason: "no BMC".into(),
            },
        );
    }
    let mut fenced_after = [None, None];
    while h.now < silent_at + 12_000 {
        h.run_for(50);
        for (n, i) in [1, 2].into_iter().enumerate() {
            if fenced_after[n].is_none() && self_fenced(&h, i) {
                fenced_after[n] = Some(h.now - silent_at);
            }
        }
    }
    let [one, two] = fenced_after.map(|t| t.expect("counted fenced by its deadline"));
    // The last heartbeat came at most 100 ms before the silence began; the deadline is
    // that host's own timeout plus the 1 s margin, reckoned on the controller's clock.
    assert!(
        (2_900..=3_200).contains(&one),
        "host 1 fenced after {one} ms"
    );
    assert!(
        (8_900..=9_200).contains(&two),
        "host 2 fenced after {two} ms"
    );
}

#[test]
fn the_self_fence_deadline_ignores_the_hosts_clock() {
    // The hosts' clocks run an hour ahead of the controller's: the deadline is reckoned
    // from when the controller last heard the host, so it is the same as with true clocks.
    let cfg = Config {
        self_fence_margin: Some(Duration::from_secs(1)),
        ..Config::default()
    };
    let mut h = Harness::clocked(4, cfg, 10_000, 3_600_000);
    h.self_fence.insert(host(1), Some(Duration::from_secs(2)));
    h.run_for(1_000);
    let silent_at = h.now;
    fence_fails_on(&mut h, 1);
    while !self_fenced(&h, 1) {
        assert!(h.now < silent_at + 10_000, "never counted fenced");
        h.run_for(50);
    }
    let after = h.now - silent_at;
    assert!((2_900..=3_200).contains(&after), "fenced after {after} ms");
}

fn force_downs(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::ForceDown { .. }))
        .count()
}

#[test]
fn a_host_still_heard_after_a_successful_power_fence_is_not_restored_and_raises_an_alarm() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    // The partition heals while the BMC is asked: the host is heard again, and the BMC
    // answers "off" for it all the same.
    h.revive(2);
    h.run_for(200);
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    assert_eq!(h.state(2), HostState::Fenced);
    h.run_for(1000);
    assert_eq!(
        force_downs(&h.actions),
        0,
        "restore began while the host is heard"
    );
    assert!(evacuations(&h.actions).is_empty());
    assert!(alarms(&h.actions).contains(&AlarmKind::FenceContradicted));
    assert_eq!(h.vm(2), ResourceState::Running, "vm2 untouched");
    // Silent again later: the fence was shown false, so silence proves nothing now.
    h.kill(2);
    h.run_for(3000);
    assert_eq!(force_downs(&h.actions), 0);
    assert!(evacuations(&h.actions).is_empty());
    let inc = h
        .engine
        .incidents()
        .find(|i| i.subject == Subject::Host(host(2)));
    assert!(
        inc.expect("h2's incident")
            .timeline
            .iter()
            .any(|e| e.cause.contains("never powered off")),
        "the timeline says why"
    );
}

#[test]
fn a_resumed_controller_still_restores_nothing_of_a_host_heard_from_the_watchdog_that_ran_through_its_fence(
) {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    h.revive(2);
    h.run_for(200);
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    assert_eq!(force_downs(&h.actions), 0);
    // The controller restarts before h2's next heartbeat; the fence's completion in the
    // log says which watchdog process was heard at the fence.
    let (mut engine, _) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    let mut out = Vec::new();
    for step in 1..=40u64 {
        let now = h.now + 10 + step * 50;
        if step % 2 == 0 {
            for i in 0..4 {
                out.extend(engine.step(
                    Timestamp(now),
                    Input::Heartbeat(Heartbeat {
                        host: host(i),
                        path: PathId(0),
                        boot_id: 1,
                        incarnation: 1,
                        at: HostTime(now),
                        received: None,
                        self_fence: Some(Duration::from_secs(3)),
                    }),
                ));
            }
        }
        out.extend(engine.step(Timestamp(now), Input::Timer(TimerId::Tick)));
    }
    assert_eq!(force_downs(&out), 0, "{out:?}");
    assert!(evacuations(&out).is_empty(), "{out:?}");
    assert!(
        alarms(&out).contains(&AlarmKind::FenceContradicted),
        "{out:?}"
    );
}

#[test]
fn a_power_fenced_host_heard_just_before_its_power_off_is_restored_once_it_is_silent() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    // A last heartbeat that left before the power-off arrives with the verification.
    h.heartbeat(host(2));
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    assert_eq!(h.state(2), HostState::Fenced);
    assert_eq!(force_downs(&h.actions), 0, "held while the host is heard");
    h.run_for(500);
    assert_eq!(force_downs(&h.actions), 1, "silent since: restored");
    assert!(!alarms(&h.actions).contains(&AlarmKind::FenceContradicted));
}

#[test]
fn a_power_fenced_host_that_comes_back_with_a_new_boot_is_not_held() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    h.fence_result(
        2,
        key,
        FenceOutcome::Verified(FenceVerifier::PacemakerHistory),
    );
    h.power_on(2);
    h.run_for(300);
    h.force_down_ok(2);
    assert_eq!(h.state(2), HostState::Evacuating);
    assert_eq!(evacuations(&h.actions).len(), 1);
    let kinds = alarms(&h.actions);
    assert!(
        kinds.contains(&AlarmKind::HostBackAwaitingUnfence),
        "{kinds:?}"
    );
    assert!(!kinds.contains(&AlarmKind::FenceContradicted), "{kinds:?}");
}

#[test]
fn a_power_fenced_host_heard_from_a_new_watchdog_process_on_the_same_boot_is_not_held() {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.restart_watchdog(2);
    h.run_for(300);
    h.force_down_ok(2);
    assert_eq!(h.state(2), HostState::Evacuating);
    assert_eq!(evacuations(&h.actions).len(), 1);
    assert!(!alarms(&h.actions).contains(&AlarmKind::FenceContradicted));
}

#[test]
fn a_self_fenced_host_heard_again_with_the_same_boot_is_restored_as_before() {
    // A self-fence kills the VMs, not the host: the same boot comes back by design.
    let cfg = Config {
        self_fence_margin: Some(Duration::from_secs(2)),
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg);
    let key = h.kill_until_fence(1);
    h.fence_result(
        1,
        key,
        FenceOutcome::Failed {
            reason: "no BMC".into(),
        },
    );
    h.run_for(5000);
    assert_eq!(h.state(1), HostState::Fenced);
    h.revive(1);
    h.run_for(300);
    h.force_down_ok(1);
    assert_eq!(h.state(1), HostState::Evacuating);
    assert_eq!(evacuations(&h.actions).len(), 1);
    assert!(!alarms(&h.actions).contains(&AlarmKind::FenceContradicted));
}

#[test]
fn a_recovered_host_heard_with_the_boot_it_had_at_its_fence_raises_an_alarm_that_its_vms_may_run_twice(
) {
    let mut h = Harness::new(4);
    h.fence_and_recover(2);
    h.take();
    h.revive(2);
    h.run_for(200);
    let kinds = alarms(&h.actions);
    assert!(kinds.contains(&AlarmKind::FenceContradicted), "{kinds:?}");
    let raised = h.actions.iter().find_map(|a| match a {
        Action::Alarm {
            kind: AlarmKind::FenceContradicted,
            reason,
            ..
        } => Some(reason.clone()),
        _ => None,
    });
    assert!(raised.unwrap().contains("may run twice"));
}

// ------------------------------------------------ evacuations whose outcome is unknown

/// A libvirt-backed cloud of 4 hosts whose host 1 is fenced and forced down: vm1's
/// first evacuation is in flight.
fn libvirt_evacuating_vm1() -> (Harness, IntentKey) {
    let cfg = Config {
        vm_restorer: Source::Libvirt,
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg);
    h.fence_and_force_down(1);
    let (_, key) = evacuations(&h.actions)
        .into_iter()
        .find(|(r, _)| *r == Resource::vm("vm1"))
        .expect("vm1 evacuated");
    (h, key)
}

/// The hosts asked about vm1 since the last `take`.
fn asked_about_vm1(actions: &[Action]) -> BTreeSet<HostId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::AskHost { host, resource } if *resource == Resource::vm("vm1") => {
                Some(host.clone())
            }
            _ => None,
        })
        .collect()
}

fn answer(h: &mut Harness, i: usize, runs: Option<bool>) {
    h.input(Input::HostAnswer {
        host: host(i),
        resource: Resource::vm("vm1"),
        runs,
    });
}

fn unknown_on(h: &mut Harness, key: IntentKey, target: Option<usize>) {
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Unknown {
            target: target.map(host),
            reason: "no answer within 30 s".into(),
        },
    });
}

#[test]
fn an_evacuation_whose_outcome_is_unknown_is_not_tried_elsewhere_until_its_target_says_it_does_not_run_it(
) {
    let (mut h, key) = libvirt_evacuating_vm1();
    h.take();
    unknown_on(&mut h, key, Some(2));
    assert!(alarms(&h.actions).contains(&AlarmKind::RestoreOutcomeUnknown));
    h.run_for(5_000);
    // Asked, and asked again while it cannot answer; nothing tried anywhere else.
    let asked = h
        .actions
        .iter()
        .filter(|a| matches!(a, Action::AskHost { host: x, .. } if *x == host(2)))
        .count();
    assert!(asked >= 3, "asked {asked} times");
    assert!(evacuations(&h.actions).is_empty());
    answer(&mut h, 2, None);
    h.run_for(500);
    assert!(evacuations(&h.actions).is_empty());
    assert_eq!(h.state(1), HostState::Evacuating);
    // It does not run there: the next try.
    answer(&mut h, 2, Some(false));
    h.run_for(100);
    let next = evacuations(&h.actions);
    assert_eq!(next.len(), 1, "{next:?}");
    assert_ne!(
        next[0].1,
        IntentKey::derive(h.incident_of(1).id, "evacuate-1", &Resource::vm("vm1"))
    );
}

#[test]
fn a_target_that_says_it_runs_the_vm_after_an_unknown_outcome_is_where_it_runs() {
    let (mut h, key) = libvirt_evacuating_vm1();
    unknown_on(&mut h, key, Some(2));
    h.run_for(200);
    h.take();
    answer(&mut h, 2, Some(true));
    h.run_for(2_000);
    assert!(evacuations(&h.actions).is_empty());
    assert_eq!(h.vm(1), ResourceState::Running);
    assert_eq!(h.state(1), HostState::Recovered);
    assert!(h
        .engine
        .resources()
        .iter()
        .any(|v| v.resource == Resource::vm("vm1") && v.host == host(2)));
    // Asked no more.
    h.take();
    h.run_for(2_000);
    assert!(asked_about_vm1(&h.actions).is_empty());
}

#[test]
fn a_target_powered_off_after_an_unknown_outcome_no_longer_holds_the_vm() {
    let (mut h, key) = libvirt_evacuating_vm1();
    unknown_on(&mut h, key, Some(2));
    h.take();
    // Host 2 falls silent and is fenced by its BMC: whatever it was sent is dead.
    let fence = h.kill_until_fence(2);
    assert!(evacuations(&h.actions).is_empty());
    h.fence_result(
        2,
        fence,
        FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
    );
    h.run_for(200);
    assert!(evacuations(&h.actions)
        .iter()
        .any(|(r, _)| *r == Resource::vm("vm1")));
}

#[test]
fn a_self_fence_deadline_does_not_rule_out_a_target_of_an_unknown_outcome() {
    let cfg = Config {
        vm_restorer: Source::Libvirt,
        self_fence_margin: Some(Duration::from_secs(2)),
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg);
    h.fence_and_force_down(1);
    let (_, key) = evacuations(&h.actions).into_iter().next().expect("vm1");
    unknown_on(&mut h, key, Some(2));
    h.take();
    // Host 2 falls silent: fenced by its deadline only (no answer to Confirm).
    h.kill(2);
    h.run_for(8_000);
    assert!(h.state(2).fenced(), "{:?}", h.state(2));
    // It may have rebooted and started vm1: vm1 (h1's) is not moved again.
    assert!(!evacuations(&h.actions)
        .iter()
        .any(|(r, _)| *r == Resource::vm("vm1")));
    // Heard again, it says it does not run it: the next try.
    h.revive(2);
    h.run_for(300);
    answer(&mut h, 2, Some(false));
    h.run_for(100);
    assert!(evacuations(&h.actions)
        .iter()
        .any(|(r, _)| *r == Resource::vm("vm1")));
}

#[test]
fn a_controller_restarted_with_a_libvirt_evacuation_unanswered_asks_every_host_before_trying_again()
{
    let (h, _key) = libvirt_evacuating_vm1();
    let cfg = h.engine.config().clone();
    // Host 9 was heard by the dead process only (the store's event streams).
    let (mut engine, out) =
        Engine::resume_knowing(cfg, &h.log, &[host(9)], Timestamp(h.now + 1_000));
    assert!(evacuations(&out).is_empty(), "not handed again: {out:?}");
    assert!(out
        .iter()
        .any(|a| matches!(a, Action::CompleteIntent { .. })));
    // The resumed engine knows host 1 (its log) and host 9 (the store) so far.
    assert_eq!(asked_about_vm1(&out), [host(9)].into());
    let mut now = h.now + 1_100;
    // The other hosts are heard again one by one, and asked too.
    let mut asked = BTreeSet::new();
    for i in [0, 2, 3] {
        let hb = Input::Heartbeat(Heartbeat {
            host: host(i),
            path: PathId(0),
            boot_id: 1,
            incarnation: 1,
            at: HostTime(now),
            received: None,
            self_fence: None,
        });
        engine.step(Timestamp(now), hb);
    }
    now += 1_100;
    asked.extend(asked_about_vm1(
        &engine.step(Timestamp(now), Input::Timer(TimerId::Tick)),
    ));
    let expected: BTreeSet<HostId> = [host(0), host(2), host(3), host(9)].into();
    assert_eq!(asked, expected);
    // All but host 9 say no: still waiting for host 9.
    for i in [0, 2, 3] {
        let out = engine.step(
            Timestamp(now),
            Input::HostAnswer {
                host: host(i),
                resource: Resource::vm("vm1"),
                runs: Some(false),
            },
        );
        assert!(evacuations(&out).is_empty());
        now += 10;
    }
    let out = engine.step(Timestamp(now), Input::Timer(TimerId::Tick));
    assert!(evacuations(&out).is_empty());
    // Host 9 is silent, so it is suspected like any other host (not forgotten).
    let mut later = Vec::new();
    for _ in 0..40 {
        now += 50;
        for i in [0, 2, 3] {
            later.extend(engine.step(
                Timestamp(now),
                Input::Heartbeat(Heartbeat {
                    host: host(i),
                    path: PathId(0),
                    boot_id: 1,
                    incarnation: 1,
                    at: HostTime(now),
                    received: None,
                    self_fence: None,
                }),
            ));
        }
        later.extend(engine.step(Timestamp(now), Input::Timer(TimerId::Tick)));
    }
    assert!(
        later
            .iter()
            .any(|a| matches!(a, Action::Confirm { host: x } if *x == host(9))),
        "host 9 suspected: {later:?}"
    );
    assert!(evacuations(&later).is_empty());
    let out = engine.step(
        Timestamp(now),
        Input::HostAnswer {
            host: host(9),
            resource: Resource::vm("vm1"),
            runs: Some(false),
        },
    );
    assert_eq!(evacuations(&out).len(), 1, "{out:?}");
}

#[test]
fn a_controller_restarted_with_a_nova_evacuation_unanswered_hands_it_to_nova_again() {
    let mut h = Harness::new(4);
    h.fence_and_force_down(1);
    let (_, key) = evacuations(&h.actions).into_iter().next().expect("vm1");
    let (_, out) = Engine::resume_knowing(
        Config::default(),
        &h.log,
        &[host(9)],
        Timestamp(h.now + 1_000),
    );
    assert_eq!(evacuations(&out), vec![(Resource::vm("vm1"), key)]);
    assert!(asked_about_vm1(&out).is_empty());
}

#[test]
fn a_replayed_unknown_outcome_is_asked_about_again_after_a_restart() {
    let (mut h, key) = libvirt_evacuating_vm1();
    unknown_on(&mut h, key, Some(2));
    h.run_for(200);
    let cfg = h.engine.config().clone();
    let (_, out) = Engine::resume(cfg, &h.log, Timestamp(h.now + 1_000));
    assert_eq!(asked_about_vm1(&out), [host(2)].into());
    assert!(evacuations(&out).is_empty());
}

#[test]
fn a_fenced_host_that_came_back_is_asked_after_a_restart_about_an_evacuation_the_dead_controller_may_have_sent_it(
) {
    let cfg = Config {
        vm_restorer: Source::Libvirt,
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg.clone());
    // Host 2 was lost, fenced by its BMC and its VM restored elsewhere; it is powered
    // on again and heard (its stream open: the libvirt backend may send it a start).
    h.fence_and_recover(2);
    h.power_on(2);
    h.run_for(300);
    // Host 1 is lost and fenced; vm1's start is sent, and the controller restarts
    // before the answer.
    h.take();
    h.fence_and_force_down(1);
    assert!(evacuations(&h.actions)
        .iter()
        .any(|(r, _)| *r == Resource::vm("vm1")));
    let hosts: Vec<HostId> = (0..4).map(host).collect();
    let now = h.now + 1_000;
    let (mut engine, out) = Engine::resume_knowing(cfg, &h.log, &hosts, Timestamp(now));
    let mut asked = asked_about_vm1(&out);
    // The new process has not heard host 2 since its fence yet: that is no proof that
    // it is still off. Heard again, it is asked like the others.
    for t in (now + 100..now + 1_500).step_by(100) {
        for i in [0, 2, 3] {
            engine.step(
                Timestamp(t),
                Input::Heartbeat(Heartbeat {
                    host: host(i),
                    path: PathId(0),
                    boot_id: if i == 2 { 2 } else { 1 },
                    incarnation: if i == 2 { 2 } else { 1 },
                    at: HostTime(t),
                    received: None,
                    self_fence: None,
                }),
            );
        }
        asked.extend(asked_about_vm1(
            &engine.step(Timestamp(t), Input::Timer(TimerId::Tick)),
        ));
    }
    assert!(asked.contains(&host(2)), "asked {asked:?}");
    let out = engine.step(
        Timestamp(now + 1_500),
        Input::HostAnswer {
            host: host(2),
            resource: Resource::vm("vm1"),
            runs: Some(true),
        },
    );
    assert!(evacuations(&out).is_empty());
    assert!(engine
        .resources()
        .iter()
        .any(|v| v.resource == Resource::vm("vm1") && v.host == host(2)));
}

#[test]
fn a_vm_a_host_said_it_runs_after_an_unknown_evacuation_has_one_owner_after_a_restart_once_a_later_incident_took_it(
) {
    let cfg = Config {
        vm_restorer: Source::Libvirt,
        max_restarts_in_place: 0,
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg.clone());
    let vm1 = Resource::vm("vm1");
    // vm1 crashes on host 1; its evacuation is not answered; host 2 says it runs it.
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let (_, key) = evacuations(&h.actions)
        .into_iter()
        .find(|(r, _)| *r == vm1)
        .expect("vm1 evacuated");
    unknown_on(&mut h, key, Some(2));
    h.run_for(200);
    answer(&mut h, 2, Some(true));
    assert_eq!(h.vm(1), ResourceState::Running);
    // Later it crashes on host 2: a new incident moves it off host 2.
    h.run_for(6_000);
    h.take();
    h.exit(2, "vm1", Source::Ebpf, h.now);
    assert!(evacuated_off(&h, 2).contains(&vm1));
    let live: Vec<_> = h
        .engine
        .claims()
        .into_iter()
        .filter(|(_, r)| *r == vm1)
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    // A restarted controller replays the log, where the host's word is not: the later
    // incident's evacuation says the wait was settled, and by a host that ran it.
    let (engine, _) = Engine::resume_knowing(cfg, &h.log, &[], Timestamp(h.now + 1_000));
    let claims: Vec<_> = engine
        .claims()
        .into_iter()
        .filter(|(_, r)| *r == vm1)
        .collect();
    assert_eq!(claims, live);
}

#[test]
fn a_listing_taken_just_before_a_restart_in_place_does_not_make_the_vm_missing_when_the_hosts_heartbeats_arrive_late(
) {
    let cfg = Config {
        max_restarts_in_place: 1,
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg.clone());
    let vm1 = Resource::vm("vm1");
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("vm1 restarted in place");
    };
    // The controller restarts; from then on host 1's heartbeats take 300 ms to arrive,
    // so the new process reckons host 1's clock 300 ms behind.
    let (engine, _) = Engine::resume(cfg, &h.log, Timestamp(h.now + 10));
    h.engine = engine;
    h.kill(1);
    for _ in 0..10 {
        h.run_for(100);
        let sent = h.host_clock(h.now - 300);
        h.input(Input::Heartbeat(Heartbeat {
            host: host(1),
            path: PathId(0),
            boot_id: 1,
            incarnation: 1,
            at: sent,
            received: None,
            self_fence: None,
        }));
    }
    // Host 1 lists what it runs (not vm1 yet), then starts vm1; the start is answered
    // before the listing arrives (Nova answers it; the listing comes over the stream).
    let listed_at = h.host_clock(h.now - 10);
    h.take();
    h.input(Input::RestoreResult {
        resource: vm1.clone(),
        key,
        outcome: RestoreOutcome::Ok { host: host(1) },
    });
    assert_eq!(h.vm(1), ResourceState::Running);
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: vec![],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(listed_at),
        },
    });
    // Older than the start on the host's own clock: not news that vm1 is gone.
    assert_eq!(h.vm(1), ResourceState::Running);
    assert!(evacuations(&h.actions).is_empty(), "{:?}", h.actions);
    // A listing taken well after the start that does not show it is.
    h.revive(1);
    h.run_for(1_000);
    let at = h.host_clock(h.now);
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: vec![],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(at),
        },
    });
    assert_ne!(h.vm(1), ResourceState::Running);
}

/// The stale copies the engine asked to destroy since the last `take`: (host, VM).
fn copies_stopped(actions: &[Action]) -> Vec<(HostId, Resource)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::StopStaleCopy { host, resource } => Some((host.clone(), resource.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_vm_moved_off_a_fenced_host_is_destroyed_there_when_the_move_completes_whenever_the_host_lists_it_and_at_its_unfence(
) {
    let mut h = Harness::new(4);
    let key = h.kill_until_fence(2);
    h.fence_result(2, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.force_down_ok(2);
    let (r, key) = evacuations(&h.actions)[0].clone();
    h.take();
    h.input(Input::RestoreResult {
        resource: r,
        key,
        outcome: RestoreOutcome::Ok { host: host(0) },
    });
    let vm2 = Resource::vm("vm2");
    // The move completed: host 2 may run a copy already, or start one at its next boot.
    assert_eq!(copies_stopped(&h.actions), [(host(2), vm2.clone())]);
    assert_eq!(h.state(2), HostState::Recovered);
    // Powered on again, libvirt autostarts vm2: each listing that shows it asks again.
    h.power_on(2);
    h.run_for(300);
    h.take();
    libvirt_lists(&mut h, 2, vec![vm2.clone()]);
    assert_eq!(copies_stopped(&h.actions), [(host(2), vm2.clone())]);
    assert!(alarms(&h.actions).contains(&AlarmKind::StaleResource));
    let noted = h.incident_of(2).timeline.iter().any(|t| {
        t.subject == Subject::Resource(vm2.clone()) && t.cause.contains("destroying that copy")
    });
    assert!(noted, "{:#?}", h.incident_of(2).timeline);
    h.take();
    libvirt_lists(&mut h, 2, vec![vm2.clone()]);
    assert_eq!(copies_stopped(&h.actions), [(host(2), vm2.clone())]);
    // Gone from its listing: nothing more to destroy, and it may be trusted again.
    h.take();
    libvirt_lists(&mut h, 2, vec![]);
    h.run_for(100);
    assert!(copies_stopped(&h.actions).is_empty());
    // Trusted again: what was moved off it is destroyed (autostart off) once more first.
    h.command(OperatorCommand::Unfence { host: host(2) })
        .unwrap();
    let stop = h
        .actions
        .iter()
        .position(|a| matches!(a, Action::StopStaleCopy { .. }))
        .expect("a destroy at the unfence");
    let unfence = h
        .actions
        .iter()
        .position(|a| matches!(a, Action::Unfence { .. }))
        .expect("the unfence");
    assert!(stop < unfence, "{:#?}", h.actions);
    assert_eq!(copies_stopped(&h.actions), [(host(2), vm2.clone())]);
    // Up again: it lists vm2 (someone migrated it there): reported, never destroyed.
    h.take();
    libvirt_lists(&mut h, 2, vec![vm2]);
    assert!(copies_stopped(&h.actions).is_empty());
}

#[test]
fn a_host_unfenced_while_dark_has_the_copy_its_autostart_starts_destroyed_when_it_returns() {
    let mut h = Harness::new(4);
    h.fence_and_recover(2);
    let vm2 = Resource::vm("vm2");
    // Trusted again before it is back: the destroy asked for now cannot reach it.
    h.command(OperatorCommand::Unfence { host: host(2) })
        .unwrap();
    assert_eq!(h.state(2), HostState::Up);
    // It boots, and libvirt autostarts the copy of vm2 it ran before its fence.
    h.power_on(2);
    h.run_for(300);
    h.take();
    libvirt_lists(&mut h, 2, vec![vm2.clone()]);
    assert_eq!(copies_stopped(&h.actions), [(host(2), vm2.clone())]);
    // A restarted controller knows it too (from the unfence's intent).
    let (mut resumed, _) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    let listing = Input::HostEvent {
        host: host(2),
        event: HostEvent::Inventory {
            resources: vec![vm2.clone()],
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Libvirt,
            at: ListedAt::Host(h.host_clock(h.now + 20)),
        },
    };
    let out = resumed.step(Timestamp(h.now + 20), listing);
    assert_eq!(copies_stopped(&out), [(host(2), vm2.clone())]);
    // Listed again before it is gone: asked again.
    h.take();
    libvirt_lists(&mut h, 2, vec![vm2.clone()]);
    assert_eq!(copies_stopped(&h.actions), [(host(2), vm2.clone())]);
    // Gone; later listed again (someone migrated it there): reported, not destroyed.
    h.run_for(100);
    libvirt_lists(&mut h, 2, vec![]);
    h.run_for(100);
    h.take();
    libvirt_lists(&mut h, 2, vec![vm2]);
    assert!(copies_stopped(&h.actions).is_empty(), "{:#?}", h.actions);
}

#[test]
fn a_listing_dated_before_the_restore_on_the_controllers_clock_is_old_news_and_a_hosts_own_clock_is_never_compared_with_another_hosts(
) {
    let mut h = Harness::new(4);
    let restored_at = h.now;
    h.fence_and_recover(2);
    h.power_on(2);
    h.run_for(300);
    h.take();
    let vm2 = Resource::vm("vm2");
    let lists = |h: &mut Harness, at: ListedAt| {
        h.input(Input::HostEvent {
            host: host(2),
            event: HostEvent::Inventory {
                resources: vec![Resource::vm("vm2")],
                stopped: vec![],
                rbd_only: vec![],
                source: Source::Libvirt,
                at,
            },
        })
    };
    // Taken before the restore, by the controller's clock (the one the restore is on).
    lists(&mut h, ListedAt::Controller(Timestamp(restored_at)));
    assert!(copies_stopped(&h.actions).is_empty());
    assert!(!alarms(&h.actions).contains(&AlarmKind::StaleResource));
    // On host 2's own clock, long before anything else: vm2's restore is dated on host
    // 0's clock, which says nothing about host 2's. It may show a copy that runs.
    lists(&mut h, ListedAt::Host(HostTime(1)));
    assert_eq!(copies_stopped(&h.actions), [(host(2), vm2)]);
    assert!(alarms(&h.actions).contains(&AlarmKind::StaleResource));
}

#[test]
fn an_arrival_awaiting_its_hosts_word_is_left_running_while_what_was_moved_off_that_host_is_destroyed(
) {
    let mut h = self_fencing_harness();
    h.kill_until_fence(2);
    // vm1 crashes on host 1 and is restored on host 2, silent: an arrival.
    crash_vm1_and_restore_it_on(&mut h, 2);
    h.run_for(6_000);
    assert_eq!(h.state(2), HostState::Fenced, "fenced by its deadline");
    h.force_down_ok(2);
    let (r, key) = evacuations(&h.actions)
        .into_iter()
        .find(|(r, _)| *r == Resource::vm("vm2"))
        .expect("vm2 moved off host 2");
    h.input(Input::RestoreResult {
        resource: r,
        key,
        outcome: RestoreOutcome::Ok { host: host(3) },
    });
    h.revive(2);
    h.run_for(300);
    h.take();
    libvirt_lists(&mut h, 2, vec![Resource::vm("vm1"), Resource::vm("vm2")]);
    assert_eq!(copies_stopped(&h.actions), [(host(2), Resource::vm("vm2"))]);
    let vm1 = h.engine.resource(&Resource::vm("vm1")).unwrap();
    assert_eq!((vm1.host, vm1.state), (host(2), ResourceState::Running));
}

#[test]
fn a_vm_whose_move_is_under_way_or_of_unknown_outcome_is_destroyed_nowhere() {
    let (mut h, key) = libvirt_evacuating_vm1();
    let vm1 = Resource::vm("vm1");
    // Host 1 is back (a new boot) and lists vm1 while its move is under way.
    h.power_on(1);
    h.run_for(300);
    h.take();
    libvirt_lists(&mut h, 1, vec![vm1.clone()]);
    assert!(copies_stopped(&h.actions).is_empty());
    // The move's outcome is not known: host 2 may run it, host 1 lists it still.
    unknown_on(&mut h, key, Some(2));
    h.run_for(200);
    libvirt_lists(&mut h, 2, vec![vm1.clone()]);
    libvirt_lists(&mut h, 1, vec![vm1.clone()]);
    assert!(copies_stopped(&h.actions).is_empty(), "{:#?}", h.actions);
    // Host 2 says it runs it: settled there, and host 1's copy is stale from now on.
    answer(&mut h, 2, Some(true));
    assert_eq!(copies_stopped(&h.actions), [(host(1), vm1.clone())]);
    h.take();
    libvirt_lists(&mut h, 1, vec![vm1.clone()]);
    assert_eq!(copies_stopped(&h.actions), [(host(1), vm1)]);
}

#[test]
fn a_vm_listed_by_a_host_it_was_never_moved_off_is_reported_not_destroyed() {
    // Someone migrated it there (the engine hears its old host's "shut off, migrated"
    // later): a copy the engine did not move is not the engine's to destroy.
    let mut h = Harness::new(3);
    h.take();
    libvirt_lists(&mut h, 2, vec![Resource::vm("vm1"), Resource::vm("vm2")]);
    assert!(copies_stopped(&h.actions).is_empty());
    assert!(alarms(&h.actions).contains(&AlarmKind::StaleResource));
}

#[test]
fn a_resumed_controller_destroys_a_copy_its_predecessor_moved_off_a_host_when_the_host_lists_it() {
    let mut h = Harness::new(4);
    h.fence_and_recover(2);
    let (mut engine, out) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    assert!(
        copies_stopped(&out).is_empty(),
        "replaying asks for nothing"
    );
    let out = engine.step(
        Timestamp(h.now + 20),
        Input::HostEvent {
            host: host(2),
            event: HostEvent::Inventory {
                resources: vec![Resource::vm("vm2")],
                stopped: vec![],
                rbd_only: vec![],
                source: Source::Libvirt,
                at: ListedAt::Host(HostTime(h.now + 20)),
            },
        },
    );
    assert_eq!(copies_stopped(&out), [(host(2), Resource::vm("vm2"))]);
}

#[test]
fn a_vm_moved_off_a_healthy_host_by_its_own_incident_is_destroyed_there_and_again_if_that_host_lists_it_once_fenced(
) {
    let cfg = Config {
        max_restarts_in_place: 0,
        ..Config::default()
    };
    let mut h = Harness::with(4, cfg);
    h.take();
    // vm1 crashes on host 1 and is restored on host 0: host 1 keeps its definition, and
    // its autostart would start it at the next boot.
    crash_vm1_and_restore_it_on(&mut h, 0);
    let vm1 = Resource::vm("vm1");
    assert_eq!(copies_stopped(&h.actions), [(host(1), vm1.clone())]);
    // Up, host 1 lists vm1 (a migration back, say): reported, not destroyed.
    h.take();
    libvirt_lists(&mut h, 1, vec![vm1.clone()]);
    assert!(copies_stopped(&h.actions).is_empty());
    // Host 1 is lost and fenced; powered on, its libvirt autostarts vm1.
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.power_on(1);
    h.run_for(300);
    h.take();
    libvirt_lists(&mut h, 1, vec![vm1.clone()]);
    assert_eq!(copies_stopped(&h.actions), [(host(1), vm1)]);
}

// ---------------------------------------------- restarts in place whose outcome is unknown

/// vm1 crashed on healthy host 1 with one restart in place allowed: its restart was
/// sent and not answered.
fn restart_of_vm1_unanswered() -> Harness {
    let cfg = Config {
        vm_restorer: Source::Libvirt,
        max_restarts_in_place: 1,
        ..Config::default()
    };
    let mut h = Harness::with(3, cfg);
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart");
    };
    h.take();
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Unknown {
            target: Some(host(1)),
            reason: "no answer within 30 s".into(),
        },
    });
    h
}

#[test]
fn a_restart_in_place_whose_outcome_is_unknown_is_not_followed_by_an_evacuation_until_its_host_says_the_vm_is_not_running(
) {
    let mut h = restart_of_vm1_unanswered();
    assert!(alarms(&h.actions).contains(&AlarmKind::RestoreOutcomeUnknown));
    h.run_for(5_000);
    // The host may run it: asked (again while it cannot answer), not evacuated.
    assert!(evacuations(&h.actions).is_empty(), "{:?}", h.actions);
    assert_eq!(asked_about_vm1(&h.actions), [host(1)].into());
    answer(&mut h, 1, None);
    h.run_for(500);
    assert!(evacuations(&h.actions).is_empty());
    // It does not run there: the restarts are spent, so it is evacuated.
    answer(&mut h, 1, Some(false));
    h.run_for(100);
    assert_eq!(evacuations(&h.actions).len(), 1, "{:?}", h.actions);
}

#[test]
fn a_host_that_says_it_runs_the_vm_after_an_unknown_restart_in_place_closes_the_incident() {
    let mut h = restart_of_vm1_unanswered();
    h.run_for(200);
    let inc = h.engine.resource(&Resource::vm("vm1")).unwrap().owner;
    assert!(inc.is_some());
    answer(&mut h, 1, Some(true));
    h.run_for(2_000);
    assert!(evacuations(&h.actions).is_empty());
    assert_eq!(h.vm(1), ResourceState::Running);
    assert_eq!(h.engine.resource(&Resource::vm("vm1")).unwrap().owner, None);
    h.take();
    h.run_for(2_000);
    assert!(asked_about_vm1(&h.actions).is_empty());
}

#[test]
fn a_host_powered_off_after_an_unknown_restart_in_place_has_its_vm_evacuated() {
    let mut h = restart_of_vm1_unanswered();
    h.run_for(200);
    let fence = h.kill_until_fence(1);
    assert!(evacuations(&h.actions).is_empty());
    h.fence_result(
        1,
        fence,
        FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
    );
    h.run_for(100);
    h.force_down_ok(1);
    h.run_for(500);
    let evacuated: Vec<Resource> = evacuations(&h.actions)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert!(evacuated.contains(&Resource::vm("vm1")), "{:?}", h.actions);
}

/// A restart in place handed again by a resumed controller (a new leader) whose edge
/// could not carry it out says nothing of the first hand, which may have started the VM
/// before its answer was lost with the former process (simulation seed 8069: Nova's
/// restart re-handed to a hung host came back failed, the VM was evacuated while the
/// first hand's copy ran there). Not known, then: the host is asked before anything else.
#[test]
fn a_restart_in_place_handed_again_after_a_restart_and_failed_is_not_known_until_its_host_says() {
    let cfg = Config {
        max_restarts_in_place: 1,
        ..Config::default()
    };
    let mut h = Harness::with(3, cfg.clone());
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart");
    };
    // The controller dies before the answer; its successor hands the restart again.
    let (engine, out) = Engine::resume(cfg, &h.log, Timestamp(h.now + 10));
    h.engine = engine;
    h.now += 10;
    assert!(out.iter().any(|a| a.intent_key() == Some(&key)), "{out:?}");
    h.take();
    h.absorb(out);
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key: key.clone(),
        outcome: RestoreOutcome::Failed {
            reason: "the watchdog of h1 is not connected".into(),
        },
    });
    assert!(alarms(&h.actions).contains(&AlarmKind::RestoreOutcomeUnknown));
    assert!(matches!(
        h.log
            .get(&key)
            .and_then(|e| e.done.as_ref())
            .map(|c| &c.outcome),
        Some(IntentOutcome::Restore(RestoreOutcome::Unknown { .. }))
    ));
    h.run_for(2_000);
    assert!(evacuations(&h.actions).is_empty(), "{:?}", h.actions);
    assert_eq!(asked_about_vm1(&h.actions), [host(1)].into());
    // It runs there (the first hand started it): settled, nothing evacuated.
    answer(&mut h, 1, Some(true));
    h.run_for(1_000);
    assert!(evacuations(&h.actions).is_empty());
    assert_eq!(h.vm(1), ResourceState::Running);
}

#[test]
fn a_restart_in_place_that_failed_at_its_first_hand_is_taken_as_failed() {
    let cfg = Config {
        max_restarts_in_place: 1,
        ..Config::default()
    };
    let mut h = Harness::with(3, cfg);
    h.exit(1, "vm1", Source::Ebpf, h.now);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart");
    };
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Failed {
            reason: "domain start failed".into(),
        },
    });
    h.run_for(2_000);
    assert!(!alarms(&h.actions).contains(&AlarmKind::RestoreOutcomeUnknown));
    assert_eq!(evacuations(&h.actions).len(), 1, "{:?}", h.actions);
}

// ---------------------------------------------------- actions whose answer never comes

fn backstop(cfg: Config) -> Config {
    Config {
        unanswered_after: Duration::from_secs(60),
        ..cfg
    }
}

#[test]
fn an_evacuation_never_answered_is_handed_to_nova_again_under_its_key_after_the_backstop() {
    let mut h = Harness::with(4, backstop(Config::default()));
    h.fence_and_force_down(1);
    let (_, key) = evacuations(&h.actions)
        .into_iter()
        .find(|(r, _)| *r == Resource::vm("vm1"))
        .expect("vm1 evacuated");
    h.take();
    h.run_for(59_000);
    assert!(
        evacuations(&h.actions).is_empty(),
        "not before the backstop"
    );
    h.run_for(1_100);
    assert_eq!(
        evacuations(&h.actions),
        [(Resource::vm("vm1"), key.clone())]
    );
    let noted = h
        .incident_of(1)
        .timeline
        .iter()
        .any(|t| t.cause.contains("handed to its edge again"));
    assert!(noted);
    // Answered now: nothing more is handed.
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Ok { host: host(2) },
    });
    h.take();
    h.run_for(120_000);
    assert!(evacuations(&h.actions).is_empty());
    assert_eq!(h.vm(1), ResourceState::Running);
}

#[test]
fn a_libvirt_evacuation_never_answered_is_taken_as_not_known_and_the_hosts_are_asked_not_handed_again(
) {
    let cfg = backstop(Config {
        vm_restorer: Source::Libvirt,
        ..Config::default()
    });
    let mut h = Harness::with(4, cfg);
    h.fence_and_force_down(1);
    h.take();
    h.run_for(60_100);
    // Not handed again (the backend would pick a target afresh): every other host is
    // asked, and the VM is tried again only once they all said no.
    assert!(evacuations(&h.actions).is_empty(), "{:?}", h.actions);
    assert!(alarms(&h.actions).contains(&AlarmKind::RestoreOutcomeUnknown));
    assert_eq!(
        asked_about_vm1(&h.actions),
        [host(0), host(2), host(3)].into()
    );
    for i in [0, 2, 3] {
        answer(&mut h, i, Some(false));
    }
    h.run_for(100);
    assert!(evacuations(&h.actions)
        .iter()
        .any(|(r, _)| *r == Resource::vm("vm1")));
}

#[test]
fn a_fence_never_answered_is_handed_to_the_fencer_again_after_the_backstop() {
    let mut h = Harness::with(4, backstop(Config::default()));
    let key = h.kill_until_fence(1);
    h.take();
    h.run_for(60_100);
    assert_eq!(h.fences(), std::slice::from_ref(&key));
    assert_eq!(h.state(1), HostState::Fencing);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    assert_eq!(h.state(1), HostState::Fenced);
}

#[test]
fn a_refused_operator_command_issues_nothing_it_does_not_hand_back() {
    let (mut h, key) = libvirt_evacuating_vm1();
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm1"),
        key,
        outcome: RestoreOutcome::Failed {
            reason: "no valid host".into(),
        },
    });
    // The retry is due; before the next tick an operator's command is refused (host 2
    // is up: nothing to unfence).
    h.now += 1_500;
    h.take();
    assert!(h
        .command(OperatorCommand::Unfence { host: host(2) })
        .is_err());
    // The retry is issued, and handed out, by the next tick.
    h.run_for(100);
    let retried = evacuations(&h.actions);
    assert_eq!(retried.len(), 1, "{:?}", h.actions);
    assert!(h
        .actions
        .iter()
        .any(|a| matches!(a, Action::PersistIntent(r) if r.key == retried[0].1)));
}

#[test]
fn a_host_saying_it_runs_a_vm_after_an_unknown_evacuation_is_remembered_across_a_restart() {
    let (mut h, key) = libvirt_evacuating_vm1();
    unknown_on(&mut h, key, Some(2));
    h.run_for(200);
    answer(&mut h, 2, Some(true));
    assert_eq!(h.vm(1), ResourceState::Running);
    let cfg = h.engine.config().clone();
    let (mut engine, out) = Engine::resume_knowing(cfg, &h.log, &[], Timestamp(h.now + 1_000));
    // Where it runs is in the log: not asked again, not moved again.
    assert!(asked_about_vm1(&out).is_empty(), "{out:?}");
    assert!(evacuations(&out).is_empty());
    let vm1 = engine.resource(&Resource::vm("vm1")).unwrap();
    assert_eq!((vm1.host, vm1.state), (host(2), ResourceState::Running));
    let later = engine.step(Timestamp(h.now + 3_000), Input::Timer(TimerId::Tick));
    assert!(asked_about_vm1(&later).is_empty(), "{later:?}");
}

#[test]
fn a_new_leader_suspects_a_host_silent_since_before_the_takeover_without_a_fresh_grace_period() {
    // The follower heard h1 until t=1000 and h2 until t=1950; it takes the lead at 2000
    // with an empty intent log.
    let log = MemoryIntentLog::new();
    let mut heard = vec![(host(1), PathId(0), Timestamp(1_000))];
    // Four more hosts heard just now (one silent host in five is no mass failure).
    heard.extend((2..6).map(|i| (host(i), PathId(0), Timestamp(1_950))));
    let (mut warm, _) = Engine::resume_warm(Config::default(), &log, &[], &heard, Timestamp(2_000));
    let (mut cold, _) = Engine::resume_knowing(
        Config::default(),
        &log,
        &[host(1), host(2)],
        Timestamp(2_000),
    );
    warm.step(Timestamp(2_010), Input::Timer(TimerId::Tick));
    cold.step(Timestamp(2_010), Input::Timer(TimerId::Tick));
    // Silent for 1 s (more than 3 × 100 ms): suspect at the first look; h2 is not.
    assert_eq!(warm.host_state(&host(1)), Some(HostState::Suspect));
    assert_eq!(warm.host_state(&host(2)), Some(HostState::Up));
    // A cold start would give h1 a fresh grace period (or not know it at all).
    assert_ne!(cold.host_state(&host(1)), Some(HostState::Suspect));
    // A time after `now` is taken as `now`.
    let (later, _) = Engine::resume_warm(
        Config::default(),
        &log,
        &[],
        &[(host(3), PathId(0), Timestamp(9_000))],
        Timestamp(2_000),
    );
    assert_eq!(later.host_state(&host(3)), Some(HostState::Up));
}

/// A heartbeat from host `i` at the harness's now, received by the controller at
/// `received` (it waited in the controller's queues since).
fn late_heartbeat(i: usize, received: u64, at: HostTime) -> Input {
    Input::Heartbeat(Heartbeat {
        host: host(i),
        path: PathId(0),
        boot_id: 1,
        incarnation: 1,
        at,
        received: Some(Timestamp(received)),
        self_fence: None,
    })
}

fn lagging(ms: u64) -> Input {
    Input::Load(load::ControllerLoad {
        window: Duration::from_millis(50),
        heartbeat_wait: Duration::from_millis(ms),
        ..load::ControllerLoad::default()
    })
}

#[test]
fn a_host_turns_suspect_when_its_deadline_falls_due_not_on_the_next_tick() {
    // A periodic tick of 1 s: only the host's own deadline can be this exact.
    let cfg = Config {
        tick: Duration::from_secs(1),
        ..Config::default()
    };
    let mut h = Harness::with(2, cfg);
    h.kill(0);
    // Silent since h0's last heartbeat: its deadline is 300 ms later.
    let last = h.engine.detector().last_seen(&host(0)).unwrap().0;
    let deadline = last + 300;
    let mut e = h.engine.clone();
    // h1 goes on heartbeating.
    e.step(
        Timestamp(deadline - 100),
        late_heartbeat(1, deadline - 100, HostTime(deadline - 100)),
    );
    let before = e.step(Timestamp(deadline - 1), Input::Timer(TimerId::Tick));
    assert_eq!(e.host_state(&host(0)), Some(HostState::Up));
    // The engine asked its runtime for a timer at exactly that deadline.
    let timers: Vec<u64> = h
        .actions
        .iter()
        .chain(&before)
        .filter_map(|a| match a {
            Action::ArmTimer { at, .. } => Some(at.0),
            _ => None,
        })
        .collect();
    assert!(
        timers.contains(&deadline),
        "a timer at {deadline}: {timers:?}"
    );
    e.step(Timestamp(deadline), Input::Timer(TimerId::Tick));
    assert_eq!(e.host_state(&host(0)), Some(HostState::Suspect));
    assert_eq!(e.host_state(&host(1)), Some(HostState::Up));
}

#[test]
fn a_heartbeat_that_waited_in_the_controllers_queue_counts_from_its_arrival() {
    let mut h = Harness::new(1);
    h.kill(0);
    let t = h.now;
    // Arrived at t + 250, taken by the engine at t + 400 (the controller lagged).
    h.now = t + 400;
    let at = h.host_clock(t + 250);
    h.input(lagging(150));
    h.input(late_heartbeat(0, t + 250, at));
    assert_eq!(
        h.engine.detector().last_seen(&host(0)),
        Some(Timestamp(t + 250))
    );
    // Its deadline is 300 ms after the arrival, plus the lag the controller owes.
    h.now = t + 250 + 300 + 149;
    h.input(Input::Timer(TimerId::Tick));
    assert_eq!(h.engine.host_state(&host(0)), Some(HostState::Up));
    h.now = t + 250 + 300 + 150;
    h.input(Input::Timer(TimerId::Tick));
    assert_eq!(h.engine.host_state(&host(0)), Some(HostState::Suspect));
}

#[test]
fn a_controller_that_lost_heartbeats_itself_suspects_nobody_for_that_silence_and_alarms_once() {
    let mut h = Harness::new(3);
    let t = h.now;
    // The controller drops every heartbeat for 2 s (a full socket queue) and says so.
    let mut raised = Vec::new();
    for step in 1..=40 {
        h.now = t + step * 50;
        raised.extend(alarms(&h.input(Input::Load(load::ControllerLoad {
            window: Duration::from_millis(50),
            lost: 3,
            ..load::ControllerLoad::default()
        }))));
        h.input(Input::Timer(TimerId::Tick));
    }
    assert_eq!(
        raised,
        [AlarmKind::ControllerOverloaded],
        "once per episode"
    );
    for i in 0..3 {
        assert_eq!(h.engine.host_state(&host(i)), Some(HostState::Up));
    }
    // It keeps up again: heartbeats flow, and a host that then dies is suspected.
    h.run_for(1_500);
    h.kill(2);
    h.run_for(1_000);
    assert_ne!(h.engine.host_state(&host(2)), Some(HostState::Up));
    assert_eq!(h.engine.host_state(&host(0)), Some(HostState::Up));
}

/// `n` ticks 50 ms apart, each after the controller reports a lag of `lag_ms`; no
/// heartbeats.
fn ticks_lagging(h: &mut Harness, n: usize, lag_ms: u64) {
    for _ in 0..n {
        h.now += 50;
        h.input(lagging(lag_ms));
        h.input(Input::Timer(TimerId::Tick));
    }
}

#[test]
fn a_fence_waits_while_the_controller_hears_its_other_hosts_only_through_its_own_lag() {
    let mut h = Harness::new(4);
    h.kill(1);
    // Long silent: well past its deadline even with the lag below added.
    h.run_for(2_500);
    assert_eq!(h.state(1), HostState::Confirming);
    // The controller is cut off and slow at once: nobody is heard, and its lag excuses
    // the others' silence (they are not suspected), but that is no proof that it hears
    // them, so the gate stays shut.
    for i in [0, 2, 3] {
        h.kill(i);
    }
    ticks_lagging(&mut h, 8, 1_500);
    for i in [0, 2, 3] {
        assert_eq!(h.state(i), HostState::Up, "h{i} is excused, not suspected");
    }
    h.confirm(1, Verdict::Dead);
    ticks_lagging(&mut h, 4, 1_500);
    assert!(h.fences().is_empty(), "{:?}", h.fences());
    // The others heard again: h1 is fenced.
    for i in [0, 2, 3] {
        h.revive(i);
    }
    // (Once its own silence exceeds the lag the controller still owes it.)
    h.run_for(1_500);
    assert_eq!(h.fences().len(), 1, "{:?}", h.fences());
}

#[test]
fn an_exit_older_than_a_restore_the_hosts_clock_has_not_dated_yet_is_held_and_then_found_late() {
    // One restart in place, then evacuation: old news acted on would move a VM that runs.
    let cfg = Config {
        max_restarts_in_place: 1,
        ..Config::default()
    };
    let mut h = Harness::with(2, cfg.clone());
    let crashed_at = h.now;
    h.exit(0, "vm0", Source::Ebpf, crashed_at);
    let Some(Action::RestartInPlace { key, .. }) =
        h.find(|a| matches!(a, Action::RestartInPlace { .. }))
    else {
        panic!("no restart in place");
    };
    // The controller restarts before the answer: the new process has heard no host,
    // so the restore it is told of has no date on h0's clock.
    h.now += 100;
    let (engine, out) = Engine::resume(cfg, &h.log, Timestamp(h.now));
    h.engine = engine;
    h.absorb(out);
    h.input(Input::RestoreResult {
        resource: Resource::vm("vm0"),
        key,
        outcome: RestoreOutcome::Ok { host: host(0) },
    });
    assert_eq!(h.vm(0), ResourceState::Running);
    h.take();
    // h0's event stream replays the crash to the new process before any heartbeat.
    h.exit(0, "vm0", Source::Libvirt, crashed_at);
    let acted = |actions: &[Action]| {
        actions.iter().any(|a| {
            matches!(
                a,
                Action::Evacuate { .. } | Action::RestartInPlace { .. } | Action::PersistIntent(_)
            )
        })
    };
    assert!(!acted(&h.take()), "held for h0's clock");
    // Its heartbeat dates the restore: the crash was before it.
    h.run_for(500);
    assert!(!acted(&h.take()), "late news");
    assert_eq!(h.vm(0), ResourceState::Running);
    // A crash after the restore is acted on.
    let now = h.now;
    h.exit(0, "vm0", Source::Ebpf, now);
    assert!(acted(&h.take()));
}

/// Host `i`'s watchdog lists `vms` running, of which `rbd` have every disk on RBD.
fn watchdog_lists(h: &mut Harness, i: usize, vms: &[&str], rbd: &[&str]) {
    let at = h.host_clock(h.now);
    h.input(Input::HostEvent {
        host: host(i),
        event: HostEvent::Inventory {
            resources: vms.iter().map(|v| Resource::vm(*v)).collect(),
            stopped: vec![],
            rbd_only: rbd.iter().map(|v| Resource::vm(*v)).collect(),
            source: Source::Libvirt,
            at: ListedAt::Host(at),
        },
    });
}

#[test]
fn a_host_fenced_by_its_blocklist_alone_restores_only_its_vms_on_rbd_and_names_the_others_in_an_alarm(
) {
    let mut h = Harness::new(3);
    watchdog_lists(&mut h, 1, &["vm1", "rbd1", "mixed1"], &["rbd1"]);
    h.run_for(200);
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::CephBlocklist));
    assert_eq!(h.state(1), HostState::Fenced);
    // A storage fence does not power the host off: nothing holds its restore.
    h.run_for(100);
    h.force_down_ok(1);
    h.run_for(200);
    let moved: Vec<Resource> = evacuations(&h.actions)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_eq!(moved, vec![Resource::vm("rbd1")], "only the RBD-only VM");
    assert!(alarms(&h.actions).contains(&AlarmKind::StorageFenceUncovered));
    let inc = h.incident_of(1);
    assert!(
        inc.timeline
            .iter()
            .any(|e| e.cause.contains("fence verified (CephBlocklist)")),
        "{:?}",
        inc.timeline
    );
    assert!(inc
        .timeline
        .iter()
        .any(|e| e.cause.contains("mixed1") && e.cause.contains("vm1")));
    h.restore_all(2);
    // What the blocklist does not cover keeps the host in Evacuating: never restored.
    h.run_for(5_000);
    assert_eq!(h.state(1), HostState::Evacuating);
    assert_eq!(evacuations(&h.actions).len(), 1);
    // Its blocklist did not stop its qemus: not trusted again before its own listing,
    // received after the restore, says what it still runs.
    let refused = h.command(OperatorCommand::Unfence { host: host(1) });
    assert!(
        refused
            .as_ref()
            .is_err_and(|r| r.reason.contains("listed what it runs")),
        "{refused:?}"
    );
    h.now += 50;
    watchdog_lists(&mut h, 1, &["vm1", "mixed1"], &[]);
    // An operator who trusts the host again gives those VMs back to it.
    h.command(OperatorCommand::Unfence { host: host(1) })
        .expect("unfence of a storage-fenced host with only uncovered VMs left");
    assert_eq!(h.state(1), HostState::Up);
    assert!(h
        .actions
        .iter()
        .any(|a| matches!(a, Action::Unfence { host: u, .. } if *u == host(1))));
}

#[test]
fn a_power_fence_restores_every_vm_whatever_its_disks() {
    let mut h = Harness::new(3);
    watchdog_lists(&mut h, 1, &["vm1", "rbd1"], &["rbd1"]);
    h.run_for(200);
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
    h.run_for(100);
    h.force_down_ok(1);
    h.run_for(200);
    assert_eq!(evacuations(&h.actions).len(), 2);
    assert!(!alarms(&h.actions).contains(&AlarmKind::StorageFenceUncovered));
}

#[test]
fn what_a_blocklist_covers_is_what_the_fence_intent_recorded_so_a_resumed_engine_restores_the_same_vms(
) {
    let mut h = Harness::new(3);
    watchdog_lists(&mut h, 1, &["vm1", "rbd1"], &["rbd1"]);
    h.run_for(200);
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::CephBlocklist));
    // The resumed engine never hears the dead host list its disks again.
    let (mut engine, mut out) = Engine::resume(Config::default(), &h.log, Timestamp(h.now + 10));
    for t in 1..=20 {
        out.extend(engine.step(Timestamp(h.now + 10 + t * 50), Input::Timer(TimerId::Tick)));
    }
    let force_down = out.iter().find_map(|a| match a {
        Action::ForceDown { key, .. } => Some(key.clone()),
        _ => None,
    });
    let key = force_down.expect("a force-down");
    out.extend(engine.step(
        Timestamp(h.now + 1_100),
        Input::HostActionResult {
            host: host(1),
            key,
            outcome: RestoreOutcome::Ok { host: host(1) },
        },
    ));
    for t in 1..=5 {
        out.extend(engine.step(
            Timestamp(h.now + 1_100 + t * 50),
            Input::Timer(TimerId::Tick),
        ));
    }
    let moved: Vec<Resource> = evacuations(&out).into_iter().map(|(r, _)| r).collect();
    assert_eq!(moved, vec![Resource::vm("rbd1")]);
}

#[test]
fn lifting_a_storage_fence_is_recorded_on_the_unfenced_incident_and_a_failure_is_an_alarm() {
    let mut h = Harness::new(3);
    watchdog_lists(&mut h, 1, &["vm1"], &["vm1"]);
    h.run_for(200);
    let key = h.kill_until_fence(1);
    h.fence_result(1, key, FenceOutcome::Verified(FenceVerifier::CephBlocklist));
    h.run_for(100);
    h.force_down_ok(1);
    h.run_for(100);
    h.restore_all(2);
    assert_eq!(h.state(1), HostState::Recovered);
    h.now += 50;
    watchdog_lists(&mut h, 1, &[], &[]);
    h.command(OperatorCommand::Unfence { host: host(1) })
        .expect("a clean recovered host is unfenced");
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::StorageFenceLifted {
            removed: vec![],
            error: Some("ceph gave no answer within 15000 ms".into()),
        },
    });
    assert!(alarms(&h.actions).contains(&AlarmKind::StorageUnfenceFailed));
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::StorageFenceLifted {
            removed: vec!["ceph osd blocklist rm 10.0.0.5:0/0".into()],
            error: None,
        },
    });
    let inc = h.incident_of(1);
    assert!(
        inc.timeline
            .iter()
            .any(|e| e.cause == "storage fence lifted: ceph osd blocklist rm 10.0.0.5:0/0"),
        "{:?}",
        inc.timeline
    );
    assert!(inc
        .timeline
        .iter()
        .any(|e| e.cause.starts_with("lifting the storage fence failed")));
}

fn leases(h: &mut Harness, i: usize, daemon_running: bool, unprotected: &[&str]) -> Vec<Action> {
    h.input(Input::HostEvent {
        host: host(i),
        event: HostEvent::DiskLeases {
            daemon_running,
            unprotected: unprotected.iter().map(|v| Resource::vm(*v)).collect(),
            reason: if daemon_running {
                "virtlockd pid 9 runs".into()
            } else {
                "virtlockd pid 8 killed by SIGKILL from pid 1 (kill)".into()
            },
        },
    })
}

fn view(h: &Harness, i: usize) -> HostView {
    h.engine
        .hosts()
        .into_iter()
        .find(|v| v.host == host(i))
        .expect("a known host")
}

#[test]
fn a_host_whose_lease_daemon_died_is_alarmed_once_and_no_target_with_its_vms_unprotected_until_its_leases_are_back(
) {
    let mut h = Harness::new(3);
    watchdog_lists(&mut h, 1, &["vm1", "vm2"], &[]);
    assert_eq!(view(&h, 1).not_a_target, None, "no word: not judged");
    let out = leases(&mut h, 1, true, &[]);
    assert!(alarms(&out).is_empty());
    assert_eq!(view(&h, 1).not_a_target, None);

    let out = leases(&mut h, 1, false, &["vm1", "vm2"]);
    assert_eq!(alarms(&out), vec![AlarmKind::DiskLeasesLost]);
    let reason = out
        .iter()
        .find_map(|a| match a {
            Action::Alarm {
                reason, host: on, ..
            } if *on == Some(host(1)) => Some(reason.clone()),
            _ => None,
        })
        .expect("the alarm names the host");
    assert!(
        reason.contains("vm1") && reason.contains("SIGKILL"),
        "{reason}"
    );
    let v = view(&h, 1);
    assert!(
        v.not_a_target
            .as_deref()
            .is_some_and(|w| w.contains("daemon is down")),
        "{v:?}"
    );
    assert_eq!(
        v.unprotected,
        vec![Resource::vm("vm1"), Resource::vm("vm2")]
    );
    assert_eq!(
        v.state,
        HostState::Up,
        "a lost lease is no failure of the host"
    );

    // The daemon runs again but holds none of the running guests' leases: still lost,
    // and not alarmed twice.
    let out = leases(&mut h, 1, true, &["vm1", "vm2"]);
    assert!(alarms(&out).is_empty());
    assert!(view(&h, 1).not_a_target.is_some());
    // The same word repeated (with every inventory) changes nothing.
    assert!(leases(&mut h, 1, true, &["vm1", "vm2"]).is_empty());

    let out = leases(&mut h, 1, true, &[]);
    assert!(alarms(&out).is_empty());
    let v = view(&h, 1);
    assert_eq!((v.not_a_target, v.unprotected), (None, vec![]));
    // Lost again later: alarmed again.
    assert_eq!(
        alarms(&leases(&mut h, 1, false, &[])),
        vec![AlarmKind::DiskLeasesLost]
    );
}

#[test]
fn a_controller_that_handled_thousands_of_crashes_remembers_only_the_latest_closed_incidents_and_ignores_late_answers_to_the_rest(
) {
    let kept = 20;
    let mut h = Harness::with(
        3,
        Config {
            closed_incidents_kept: kept,
            ..Config::default()
        },
    );
    // First a host incident: h2 fenced, its VM evacuated, the incident closed.
    h.fence_and_recover(2);
    let host_incident = h
        .engine
        .incidents()
        .find(|i| i.subject == Subject::Host(host(2)) && i.closed_at.is_some())
        .map(|i| i.id)
        .expect("h2's closed incident");
    let n = 10 * kept;
    let names: Vec<String> = (0..n).map(|i| format!("many{i}")).collect();
    let vms: Vec<Resource> = names.iter().map(Resource::vm).collect();
    h.input(Input::HostEvent {
        host: host(1),
        event: HostEvent::Inventory {
            resources: vms.clone(),
            stopped: vec![],
            rbd_only: vec![],
            source: Source::Nova,
            at: ListedAt::Controller(Timestamp(h.now)),
        },
    });
    let (mut keys, mut crashes) = (Vec::new(), Vec::new());
    for (vm, name) in vms.iter().zip(&names) {
        h.take();
        h.exit(1, name, Source::Ebpf, h.now);
        let Some(Action::RestartInPlace { key, .. }) =
            h.find(|a| matches!(a, Action::RestartInPlace { .. }))
        else {
            panic!("no restart of {vm}");
        };
        crashes.push(h.engine.resource(vm).and_then(|v| v.owner).expect("owned"));
        h.input(Input::RestoreResult {
            resource: vm.clone(),
            key: key.clone(),
            outcome: RestoreOutcome::Ok { host: host(1) },
        });
        keys.push(key);
    }
    let remembered: Vec<IncidentId> = h.engine.incidents().map(|i| i.id).collect();
    assert!(
        remembered.len() <= kept + kept / 2 + 1,
        "{} incidents remembered",
        remembered.len()
    );
    assert!(remembered.len() >= kept);
    // The latest are the ones kept.
    let (first, newest) = (crashes[0], crashes[crashes.len() - 1]);
    assert!(h.engine.incident(newest).is_some());
    assert!(
        h.engine.incident(first).is_none(),
        "the oldest is forgotten"
    );
    // Older still, but h2's last incident: kept (a late listing may reopen it).
    assert!(h.engine.incident(host_incident).is_some());
    // A late, duplicated answer to a forgotten incident's restart changes nothing.
    h.take();
    let out = h.input(Input::RestoreResult {
        resource: vms[0].clone(),
        key: keys[0].clone(),
        outcome: RestoreOutcome::Ok { host: host(2) },
    });
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        h.engine.resource(&vms[0]).map(|v| (v.state, v.host)),
        Some((ResourceState::Running, host(1)))
    );
    // And the VM crashing again is a new incident, acted on as the first was.
    h.exit(1, &names[0], Source::Ebpf, h.now);
    assert!(h
        .find(|a| matches!(a, Action::RestartInPlace { resource, .. } if resource == &vms[0]))
        .is_some());
}

#[test]
fn a_fenced_hosts_hypervisor_removing_the_copy_its_incident_moved_away_is_noted_on_that_incident_and_any_other_removal_is_not(
) {
    let mut h = Harness::new(4);
    h.fence_and_recover(2);
    let vm2 = Resource::vm("vm2");
    let removed = |h: &mut Harness, on: usize, r: &Resource, what: &str| {
        let at = h.host_clock(h.now);
        h.input(Input::HostEvent {
            host: host(on),
            event: HostEvent::ResourceRemoved {
                resource: r.clone(),
                what: what.into(),
                at,
            },
        });
    };
    let notes = |h: &Harness| -> Vec<String> {
        h.engine
            .incidents()
            .flat_map(|i| i.timeline.iter())
            .filter(|e| e.source == Source::Libvirt && e.cause.contains("hypervisor"))
            .map(|e| e.cause.clone())
            .collect()
    };
    // Host 2 returns and its compute cleans up: its copy of vm2 (now on host 0) goes.
    h.power_on(2);
    h.run_for(300);
    removed(&mut h, 2, &vm2, "undefined");
    let n = notes(&h);
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(
        n[0].contains("h2's copy of vm:vm2 undefined") && n[0].contains("runs on h0"),
        "{n:?}"
    );
    let inc = h
        .engine
        .incidents()
        .find(|i| i.timeline.iter().any(|e| e.cause == n[0]))
        .unwrap();
    assert!(
        inc.timeline.iter().any(|e| e.to == "Fenced"),
        "noted on the incident that fenced h2"
    );
    // The VM's own host stopping it, or a VM never moved off the reporting host: an
    // ordinary stop, not noted.
    removed(&mut h, 0, &vm2, "destroyed");
    removed(&mut h, 3, &Resource::vm("vm3"), "destroyed");
    assert_eq!(notes(&h).len(), 1, "{:?}", notes(&h));
    // Nothing is decided on it.
    h.take();
    removed(&mut h, 2, &vm2, "destroyed");
    assert!(copies_stopped(&h.actions).is_empty());
    assert!(evacuations(&h.actions).is_empty());
}
