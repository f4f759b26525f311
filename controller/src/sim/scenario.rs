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
    /// The host's BMC stops working: fences of it fail.
    BmcBroken {
        /// Host index.
        host: usize,
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
}

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
        Scenario {
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
        cfg
    }
}
