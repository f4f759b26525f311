//! What a seed gives: the cloud, the engine settings and the fault schedule.

use super::*;

/// A fault, scheduled at a time. Scenarios are lists of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Fault {
    /// Kernel panic: heartbeats stop, every VM on it dies.
    HostCrash {
        /// Host index.
        host: usize,
    },
    /// The host freezes (VMs frozen, not dead) for a while.
    HostHang {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// The network between the controller and a host is cut (one path or both).
    Partition {
        /// Host index.
        host: usize,
        /// Cut path 0, path 1, or both (`None`).
        path: Option<u16>,
        /// How long.
        for_ms: u64,
    },
    /// The controller hears nobody.
    ControllerIsolated {
        /// How long.
        for_ms: u64,
    },
    /// Heartbeats from a host are dropped often for a while.
    Flap {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// A VM's qemu dies.
    VmCrash {
        /// Resource index.
        resource: usize,
    },
    /// Planned work: maintenance on, the host goes quiet, comes back, maintenance off.
    Maintenance {
        /// Host index.
        host: usize,
        /// How long the host is quiet.
        for_ms: u64,
    },
    /// The controller process restarts (state rebuilt from the intent log).
    ControllerRestart,
    /// The host's disk-lease daemon (virtlockd) dies: its VMs run on without their
    /// leases until it is back (issue 24). Nothing may be restored onto the host
    /// meanwhile, as its watchdog reports it.
    LeaseDaemonDies {
        /// Host index.
        host: usize,
        /// How long until its leases are back.
        for_ms: u64,
    },
    /// The host's BMC stops working: fences of it fail.
    BmcBroken {
        /// Host index.
        host: usize,
    },
    /// One way only: the controller hears the host's heartbeats, but nothing it sends
    /// reaches the host. The host gets no acks (an armed watchdog self-fences 2 s after
    /// the send time of its last acked heartbeat), and its event stream, which needs
    /// both ways, is down: no events in, no commands or questions out.
    HostDeaf {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// One way only: the host's heartbeats never arrive (UDP lost or filtered), while
    /// its event stream works both ways. With no heartbeat to ack, the host gets no acks
    /// either (an armed watchdog self-fences).
    HeartbeatsLost {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
    },
    /// Each heartbeat the host sends is delayed by up to `max_ms`, so they arrive late
    /// and out of order for a while.
    HeartbeatDelay {
        /// Host index.
        host: usize,
        /// How long.
        for_ms: u64,
        /// The largest extra delay of one heartbeat.
        max_ms: u64,
    },
    /// The leader's process is killed (SIGKILL): it stops at once, its lease stays on
    /// etcd until it expires, and it starts again as a follower a while later.
    LeaderKilled,
    /// The leader is cut off from etcd while it still hears the hosts: no keep-alive
    /// gets through and none of its writes, until it heals.
    LeaderCutFromEtcd {
        /// How long.
        for_ms: u64,
    },
    /// etcd has no quorum for a while: no write succeeds, no lease is renewed, nobody is
    /// elected (and, as etcd's lessor does, no lease expires meanwhile: a new etcd leader
    /// extends every lease by its TTL and an election timeout).
    EtcdDown {
        /// How long.
        for_ms: u64,
    },
    /// etcd's answers to the leader's keep-alives come late, by up to `max_ms` each.
    KeepAliveDelay {
        /// How long.
        for_ms: u64,
        /// The largest delay of one answer.
        max_ms: u64,
    },
    /// The leader's process stalls (descheduled, its VM paused) right after it checked
    /// its local deadline and before its next store write reaches etcd: the write
    /// arrives `for_ms` later, and nothing else runs in the process meanwhile (no
    /// keep-alive either).
    LeaderStall {
        /// How long.
        for_ms: u64,
    },
    /// The controller is the slow one (issue 17): starved of CPU or flooded, it takes
    /// every heartbeat and timer `lag_ms` late, in order, and loses `loss_pct` % of the
    /// heartbeats itself (a full socket or engine queue; those are not acked). The
    /// runtime measures it (heartbeat wait, timer lateness, its own losses) and reports
    /// it to the engine before each tick, at most every 50 ms.
    ControllerSlow {
        /// How long.
        for_ms: u64,
        /// How late every heartbeat and timer is taken.
        lag_ms: u64,
        /// Heartbeats lost by the controller itself, in percent.
        loss_pct: u64,
    },
}

/// One generated scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scenario {
    /// The seed.
    pub seed: u64,
    /// Host count.
    pub hosts: usize,
    /// Resources and the host index each starts on.
    pub resources: Vec<(Resource, usize)>,
    /// The faults, by time (ms).
    pub faults: Vec<(u64, Fault)>,
    /// Probability a fence fails.
    pub p_fence_fail: f64,
    /// Probability a fence is unverified.
    pub p_fence_unverified: f64,
    /// Probability a restore (restart/evacuate) fails.
    pub p_restore_fail: f64,
    /// Phi-accrual detector instead of fixed.
    pub phi: bool,
    /// Self-fence opt-in (hosts' watchdogs armed).
    pub self_fence: bool,
    /// Faults are lifted at (ms).
    pub heal_at: u64,
    /// The run ends at (ms).
    pub end_at: u64,
    /// Each host's clock offset from the controller's (ms, up to ten minutes either way):
    /// a host's clock must not change any decision.
    #[serde(default)]
    pub clock_offsets_ms: Vec<i64>,
    /// The automatic unfence policy (a fake Nova reports a recovered host's compute
    /// service) instead of a patient operator.
    #[serde(default)]
    pub auto_unfence: bool,
    /// By how much the controller's wall clock was stepped before each of its restarts
    /// (ms; an hour back or forth, or anything between).
    #[serde(default)]
    pub controller_clock_steps_ms: Vec<i64>,
    /// The hosts' libvirt autostarts each VM where it first ran: a host powered on again
    /// starts a stale copy of every VM moved off it meanwhile.
    #[serde(default)]
    pub autostart: bool,
    /// VMs are restored by the libvirt backend (it picks a target itself and forgets it
    /// with its process: `vm_restorer = Libvirt`, so an evacuation open at a restart is
    /// not known and every host is asked) instead of Nova (which keeps one host per
    /// server: an evacuation handed again is answered with where the server is).
    #[serde(default)]
    pub libvirt_restorer: bool,
    /// Probability that an evacuation's answer is lost or times out after it was sent:
    /// the edge reports `Unknown` with its target, whether it started the VM there or
    /// not (half each).
    #[serde(default)]
    pub p_restore_unknown: f64,
    /// Probability that an evacuation is carried out and no answer at all ever reaches
    /// the engine (an edge that neither answers nor times out).
    #[serde(default)]
    pub p_answer_lost: f64,
    /// Each host's clock drift (ppm: its clock gains this many µs a second); a host's
    /// clock must not change any decision.
    #[serde(default)]
    pub clock_drift_ppm: Vec<i64>,
    /// Probability that a write to the store fails (an I/O error, a full disk), or
    /// that the controller dies between an intent's write and its action: the runtime
    /// acts on nothing more and restarts from what was written.
    #[serde(default)]
    pub p_store_fail: f64,
    /// Hosts whose self-fence cannot kill (no permission, no watchdog device): their
    /// watchdog says "not armed" in its heartbeats, and nothing happens when cut off.
    #[serde(default)]
    pub self_fence_broken: Vec<bool>,
    /// Controller processes sharing the store and electing a leader on etcd (issue 15).
    #[serde(default = "two")]
    pub controllers: usize,
    /// Each controller's monotonic clock drift (ppm), which its local lease deadline is
    /// measured on.
    #[serde(default)]
    pub controller_drift_ppm: Vec<i64>,
    /// The etcd lease's TTL (ms).
    #[serde(default = "lease_ttl")]
    pub lease_ttl_ms: u64,
    /// The leader stops acting this long before its TTL runs out, counted from the
    /// send time of its last keep-alive etcd answered, on its own clock (ms).
    #[serde(default = "lease_margin")]
    pub lease_margin_ms: u64,
    /// A wrong runtime, for the test that shows the invariant catches it: the leader
    /// counts its deadline from when an answer to its keep-alive arrived, not from when
    /// it sent the keep-alive. Never set by [`Scenario::generate`].
    #[serde(default)]
    pub lease_deadline_from_reply: bool,
    /// No heartbeat is lost on the network (the slow-controller suite: every silence
    /// is then the controller's own doing). Never set by [`Scenario::generate`].
    #[serde(default)]
    pub lossless_network: bool,
    /// A wrong engine setting, for the test that shows the slow-controller suite can
    /// fail: no silence is excused by the controller's own lag
    /// (`max_overload_allowance` 0). Never set by [`Scenario::generate`].
    #[serde(default)]
    pub own_lag_ignored: bool,
    /// Hosts have a storage fence (a Ceph blocklist) that counts alone after their
    /// power fence: a fence whose BMC fails blocklists the host instead, which keeps
    /// running and keeps its VMs' copies, only those on RBD unable to write (issue 24).
    #[serde(default)]
    pub storage_fence: bool,
    /// The VMs whose every disk is on RBD (a blocklist stops their writes).
    #[serde(default)]
    pub rbd_vms: Vec<Resource>,
    /// A lying watchdog, for the test that shows the invariant catches it: every VM
    /// listed as on RBD, whatever its disks. Never set by [`Scenario::generate`].
    #[serde(default)]
    pub every_vm_claimed_on_rbd: bool,
}

fn two() -> usize {
    2
}

fn lease_ttl() -> u64 {
    LEASE_TTL_MS
}

fn lease_margin() -> u64 {
    LEASE_MARGIN_MS
}

/// The lease TTL, scaled like the rest of the simulation to a 30 s run (3 s; etcd's
/// lessor checks for expired leases every 500 ms, so a lease lives 3–3.5 s after the
/// last keep-alive it received).
pub const LEASE_TTL_MS: u64 = 3_000;
/// The leader's safety margin (500 ms: a clock 2 % slow loses 60 ms over a TTL).
pub const LEASE_MARGIN_MS: u64 = 500;

impl Scenario {
    /// The scenario a seed gives.
    pub fn generate(seed: u64) -> Scenario {
        let mut rng = Rng::new(seed);
        let hosts = rng.range(3, 6) as usize;
        let mut resources = Vec::new();
        for h in 0..hosts {
            for j in 0..rng.range(0, 4) {
                resources.push((Resource::vm(format!("vm-{h}-{j}")), h));
            }
            if rng.chance(0.3) {
                resources.push((Resource::router(format!("r-{h}")), h));
            }
        }
        let heal_at = 10_000;
        let mut faults = Vec::new();
        for _ in 0..rng.range(1, 5) {
            let at = rng.range(1_000, 9_000);
            let host = rng.index(hosts);
            let f = match rng.range(0, 99) {
                0..=17 => Fault::HostCrash { host },
                18..=25 => Fault::HostHang {
                    host,
                    for_ms: rng.range(200, 8_000),
                },
                26..=39 => Fault::Partition {
                    host,
                    path: match rng.range(0, 2) {
                        0 => Some(0),
                        1 => Some(1),
                        _ => None,
                    },
                    for_ms: rng.range(200, 8_000),
                },
                40..=44 => Fault::ControllerIsolated {
                    for_ms: rng.range(500, 6_000),
                },
                45..=54 => Fault::Flap {
                    host,
                    for_ms: rng.range(500, 5_000),
                },
                55..=74 if !resources.is_empty() => Fault::VmCrash {
                    resource: rng.index(resources.len()),
                },
                75..=81 => Fault::Maintenance {
                    host,
                    for_ms: rng.range(500, 4_000),
                },
                82..=93 => Fault::ControllerRestart,
                _ => Fault::BmcBroken { host },
            };
            faults.push((at, f));
        }
        // Crashes often come in bursts (a VM crashing again after its restart).
        if rng.chance(0.2) && !resources.is_empty() {
            let r = rng.index(resources.len());
            let t = rng.range(1_000, 4_000);
            for k in 0..4 {
                faults.push((t + k * 1_500, Fault::VmCrash { resource: r }));
            }
        }
        faults.sort_by_key(|(t, _)| *t);
        let pick = |rng: &mut Rng| match rng.range(0, 2) {
            0 => 0.0,
            1 => 0.1,
            _ => 0.3,
        };
        // Drawn from a stream of their own, so that adding them left every seed's
        // cloud and faults as they were.
        let mut more = Rng::new(seed.rotate_left(29) ^ 0xC10C_C10C);
        let clock_offsets_ms = (0..hosts)
            .map(|_| match more.range(0, 3) {
                0 => 0,
                1 => -600_000,
                2 => 600_000,
                _ => more.range(0, 1_200_000) as i64 - 600_000,
            })
            .collect();
        let auto_unfence = more.chance(0.5);
        let controller_clock_steps_ms = (0..8)
            .map(|_| match more.range(0, 3) {
                0 => 0,
                1 => -3_600_000,
                2 => 3_600_000,
                _ => more.range(0, 7_200_000) as i64 - 3_600_000,
            })
            .collect();
        // Drawn after the others, so that it left each of them as it was.
        let autostart = more.chance(0.5);
        // The faults of issue 14 (one-way networks, late heartbeats, drifting clocks,
        // unknown outcomes) from a third stream, leaving the others as they were.
        let mut third = Rng::new(seed.rotate_left(43) ^ 0x0014_5EED);
        for _ in 0..third.range(0, 2) {
            let at = third.range(1_000, 9_000);
            let host = third.index(hosts);
            let for_ms = third.range(300, 8_000);
            let f = match third.range(0, 2) {
                0 => Fault::HostDeaf { host, for_ms },
                1 => Fault::HeartbeatsLost { host, for_ms },
                _ => Fault::HeartbeatDelay {
                    host,
                    for_ms,
                    // Within the engine's RECKONING_SLACK (1 s) with the drift:
                    // beyond it a listing taken before a restore may be read as after.
                    max_ms: [100, 300, 800][third.index(3)],
                },
            };
            faults.push((at, f));
        }
        faults.sort_by_key(|(t, _)| *t);
        let libvirt_restorer = third.chance(0.5);
        let p_restore_unknown = [0.0, 0.1, 0.3][third.index(3)];
        let p_answer_lost = if third.chance(0.1) { 0.05 } else { 0.0 };
        let clock_drift_ppm = (0..hosts)
            .map(|_| {
                let sign = if third.chance(0.5) { 1 } else { -1 };
                sign * match third.range(0, 3) {
                    0 => 0,
                    // A clock gone wrong (a bad clocksource): 2 % fast or slow.
                    1 => 20_000,
                    _ => third.range(0, 500) as i64,
                }
            })
            .collect();
        let p_store_fail = if third.chance(0.2) { 0.01 } else { 0.0 };
        let self_fence_broken = (0..hosts).map(|_| third.chance(0.2)).collect();
        // Several controllers on etcd (issue 15), from a fourth stream, leaving the
        // others as they were.
        let mut fourth = Rng::new(seed.rotate_left(17) ^ 0x0015_1EAD);
        let controllers = if fourth.chance(0.25) { 3 } else { 2 };
        let controller_drift_ppm = (0..controllers)
            .map(|_| {
                let sign = if fourth.chance(0.5) { 1 } else { -1 };
                sign * match fourth.range(0, 3) {
                    0 => 0,
                    // A clock gone wrong: 2 % fast or slow.
                    1 => 20_000,
                    _ => fourth.range(0, 500) as i64,
                }
            })
            .collect();
        for _ in 0..fourth.range(0, 3) {
            let at = fourth.range(1_000, 9_000);
            let f = match fourth.range(0, 99) {
                0..=24 => Fault::LeaderKilled,
                25..=49 => Fault::LeaderCutFromEtcd {
                    for_ms: fourth.range(500, 8_000),
                },
                50..=64 => Fault::EtcdDown {
                    for_ms: fourth.range(500, 6_000),
                },
                65..=79 => Fault::KeepAliveDelay {
                    for_ms: fourth.range(1_000, 8_000),
                    max_ms: [300, 1_000, 2_500][fourth.index(3)],
                },
                _ => Fault::LeaderStall {
                    // Short (the lease survives it) or longer than the TTL.
                    for_ms: if fourth.chance(0.5) {
                        fourth.range(50, 400)
                    } else {
                        fourth.range(3_000, 6_000)
                    },
                },
            };
            faults.push((at, f));
        }
        // A slow controller (issue 17), from a fifth stream, on a third of the seeds.
        let mut fifth = Rng::new(seed.rotate_left(29) ^ 0x0017_510E);
        if fifth.chance(0.33) {
            faults.push((fifth.range(1_000, 9_000), slow_controller(&mut fifth)));
        }
        faults.sort_by_key(|(t, _)| *t);
        // The storage fence (issue 24), from a sixth stream: on a third of the seeds,
        // with half the VMs on RBD.
        let mut sixth = Rng::new(seed.rotate_left(11) ^ 0x0024_CE9F);
        let storage_fence = sixth.chance(0.33);
        let rbd_vms = if storage_fence {
            resources
                .iter()
                .filter(|(r, _)| r.kind() == crate::engine::ResourceKind::Vm)
                .filter(|_| sixth.chance(0.5))
                .map(|(r, _)| r.clone())
                .collect()
        } else {
            Vec::new()
        };
        // Dead lease daemons (issue 24, virtlockd), from a seventh stream: on a third of
        // the seeds, one or two.
        let mut seventh = Rng::new(seed.rotate_left(5) ^ 0x0024_1EA5);
        if seventh.chance(0.33) {
            for _ in 0..seventh.range(1, 2) {
                faults.push((
                    seventh.range(500, 9_000),
                    Fault::LeaseDaemonDies {
                        host: seventh.index(hosts),
                        for_ms: seventh.range(300, 6_000),
                    },
                ));
            }
            faults.sort_by_key(|(t, _)| *t);
        }
        Scenario {
            storage_fence,
            rbd_vms,
            every_vm_claimed_on_rbd: false,
            controllers,
            controller_drift_ppm,
            lease_ttl_ms: LEASE_TTL_MS,
            lease_margin_ms: LEASE_MARGIN_MS,
            lease_deadline_from_reply: false,
            lossless_network: false,
            own_lag_ignored: false,
            p_store_fail,
            self_fence_broken,
            libvirt_restorer,
            p_restore_unknown,
            p_answer_lost,
            clock_drift_ppm,
            seed,
            hosts,
            autostart,
            resources,
            faults,
            clock_offsets_ms,
            auto_unfence,
            controller_clock_steps_ms,
            p_fence_fail: pick(&mut rng),
            p_fence_unverified: pick(&mut rng) / 2.0,
            p_restore_fail: pick(&mut rng),
            phi: rng.chance(0.3),
            self_fence: rng.chance(0.2),
            heal_at,
            end_at: 30_000,
        }
    }

    /// The engine configuration for this scenario.
    pub fn config(&self) -> Config {
        let mut cfg = Config {
            // Ticks at the heartbeat period keep 1,000 seeds within seconds.
            tick: Duration::from_millis(100),
            // The backstop for lost answers, scaled to a 30 s run: it fires on answers
            // merely slow too, which must be as safe.
            unanswered_after: Duration::from_secs(5),
            // A 30 s run closes a few incidents, not thousands: keeping one makes the
            // engine forget closed incidents within it, under every fault.
            closed_incidents_kept: 1,
            ..Config::default()
        };
        if self.phi {
            cfg.detector = DetectorConfig::phi_accrual();
        }
        if self.self_fence {
            // The world's watchdogs report 2 s: a deadline of 5 s.
            cfg.self_fence_margin = Some(Duration::from_secs(3));
        }
        cfg.auto_unfence = self.auto_unfence;
        if self.own_lag_ignored {
            cfg.max_overload_allowance = Duration::ZERO;
        }
        if self.libvirt_restorer {
            cfg.vm_restorer = Source::Libvirt;
        }
        cfg
    }
}

/// A slow-controller fault: late by up to 1.5 s, losing up to 90 % of the heartbeats
/// itself, for up to 8 s.
fn slow_controller(rng: &mut Rng) -> Fault {
    Fault::ControllerSlow {
        for_ms: rng.range(500, 8_000),
        lag_ms: [5, 60, 250, 700, 1_500][rng.index(5)],
        loss_pct: [0, 0, 10, 50, 90][rng.index(5)],
    }
}

impl Scenario {
    /// Healthy hosts on a lossless network and a controller that is the slow one, on and
    /// off (fixed detector): any host turned Suspect is one the controller blamed for
    /// silence it caused itself. The simulation suite asserts there is none.
    pub fn slow_controller_only(seed: u64) -> Scenario {
        let mut sc = Scenario::generate(seed);
        let mut rng = Rng::new(seed ^ 0x5105_0017);
        sc.faults = (0..rng.range(1, 4))
            .map(|i| {
                (
                    1_000 + i * 6_000 + rng.range(0, 2_000),
                    slow_controller(&mut rng),
                )
            })
            .collect();
        sc.controllers = 1;
        sc.phi = false;
        // Watchdogs unarmed: a controller losing most heartbeats for longer than the
        // isolation timeout acks too few, and an armed watchdog would rightly
        // self-fence its host (then it is not a healthy host any more).
        sc.self_fence = false;
        sc.lossless_network = true;
        sc.p_store_fail = 0.0;
        sc.heal_at = 25_000;
        sc
    }
}
