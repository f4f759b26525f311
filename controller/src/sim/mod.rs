//! Deterministic simulation of the engine against a fake world.
//!
//! A seed picks a cloud (3–6 hosts, VMs and routers), engine settings (fixed or
//! phi-accrual detector, self-fence on or off) and a fault schedule ([`Fault`], plain
//! data): host crashes and hangs, partitions between the controller and hosts (one
//! path or all), the controller cut off from everyone, flapping heartbeats, VM crashes
//! (seen by eBPF and libvirt, sometimes duplicated, sometimes late), maintenance,
//! controller restarts (the engine rebuilt with [`Engine::resume`] from the intent
//! log), broken BMCs, and random fence, confirmation and restore failures. Effectors
//! are fakes that act on the world after a delay and report back. At `heal_at` every
//! fault is lifted and the world runs until `end_at`.
//!
//! Invariants, checked after every step (see [`Invariant`]):
//!
//! * no restore before a verified fence (and, in the world, no VM ever runs twice);
//! * never two owners for one resource;
//! * no VM left behind (after every step: every resource not settled has an owner;
//!   at the end: every dead VM is restored, given up with an alarm, or behind a host
//!   the engine holds with an alarm);
//! * no action issued twice, across restarts (every world action was persisted first,
//!   no key is persisted twice, a done key is never issued again).
//!
//! [`run_seeds`] is the entry point for `cargo xtask sim --seeds N`.

mod rng;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::detector::DetectorConfig;
use crate::engine::{
    Action, Config, Engine, FenceOutcome, FenceVerifier, Heartbeat, HostEvent, HostId, HostState,
    HostTime, Input, Intent, IntentKey, IntentLog, IntentOutcome, ListedAt, MemoryIntentLog,
    OperatorCommand, PathId, Resource, ResourceState, RestoreOutcome, Source, Timestamp, Verdict,
};

pub use rng::Rng;

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
        Scenario {
            seed,
            hosts,
            resources,
            faults,
            clock_offsets_ms,
            auto_unfence,
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
            cfg.self_fence_deadline = Some(Duration::from_secs(5));
        }
        cfg.auto_unfence = self.auto_unfence;
        cfg
    }
}

/// Which invariant broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Invariant {
    /// A restore before a verified fence, or a resource running twice in the world.
    NoRestoreBeforeVerifiedFence,
    /// Two owners for one resource.
    OneOwner,
    /// A dead resource nobody handles.
    NoVmLeftBehind,
    /// An action issued twice (or without its intent).
    NoActionTwice,
    /// A fence issued while the controller hears nobody (safety gate).
    SafetyGate,
    /// The engine panicked.
    NoPanic,
}

/// A broken invariant, with the recent history that led to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Violation {
    /// The seed.
    pub seed: u64,
    /// Simulated time (ms).
    pub at: u64,
    /// Which invariant.
    pub invariant: Invariant,
    /// Details.
    pub detail: String,
    /// The last steps (inputs and actions).
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} at {} ms: {:?}: {}",
            self.seed, self.at, self.invariant, self.detail
        )?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// What one scenario did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Engine steps taken.
    pub steps: u64,
    /// Faults injected.
    pub faults: usize,
    /// Fences issued (world actions, not counting resumed re-hands).
    pub fences: u64,
    /// Restarts in place issued.
    pub restarts: u64,
    /// Evacuations issued.
    pub evacuations: u64,
    /// Alarms raised.
    pub alarms: u64,
    /// Controller restarts.
    pub controller_restarts: u64,
    /// Resources given up on at the end.
    pub gave_up: u64,
    /// Resources dead at the end, behind a held (alarmed) host.
    pub held: u64,
}

/// The summary of many seeds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Totals over all seeds.
    pub totals: Report,
    /// Every violation found.
    pub violations: Vec<Violation>,
}

/// Runs one seed.
pub fn run_seed(seed: u64) -> Result<Report, Box<Violation>> {
    let sc = Scenario::generate(seed);
    run_scenario(&sc)
}

/// Runs every seed in the range; `cargo xtask sim --seeds N` calls this with `0..N`.
pub fn run_seeds(seeds: Range<u64>) -> Summary {
    let mut s = Summary::default();
    for seed in seeds {
        s.seeds += 1;
        match run_seed(seed) {
            Ok(r) => {
                let t = &mut s.totals;
                t.steps += r.steps;
                t.faults += r.faults;
                t.fences += r.fences;
                t.restarts += r.restarts;
                t.evacuations += r.evacuations;
                t.alarms += r.alarms;
                t.controller_restarts += r.controller_restarts;
                t.gave_up += r.gave_up;
                t.held += r.held;
            }
            Err(v) => s.violations.push(*v),
        }
    }
    s
}

/// Runs a scenario (possibly hand-written).
pub fn run_scenario(sc: &Scenario) -> Result<Report, Box<Violation>> {
    let mut sim = Sim::new(sc);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    match r {
        Ok(Ok(())) => Ok(sim.report),
        Ok(Err(v)) => Err(v),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Box::new(
                sim.violation(Invariant::NoPanic, format!("panic: {msg}")),
            ))
        }
    }
}

// ------------------------------------------------------------------------ the world

#[derive(Clone, Debug)]
struct WHost {
    id: HostId,
    powered: bool,
    crashed: bool,
    hung: bool,
    cut: [bool; 2],
    flapping: bool,
    boot_id: u64,
    forced_down: bool,
    maintenance: bool,
    bmc_broken: bool,
    outbox: Vec<HostEvent>,
    silent_since: Option<u64>,
}

impl WHost {
    fn alive(&self) -> bool {
        self.powered && !self.crashed && !self.hung
    }
}

#[derive(Clone, Debug)]
struct WRes {
    r: Resource,
    placement: usize,
    instances: BTreeSet<usize>,
}

#[derive(Clone, Debug)]
enum Ev {
    Deliver(Input),
    HeartbeatRound,
    InventoryRound,
    Fault(Fault),
    Unhang(usize),
    Unpartition(usize, Option<u16>),
    Unisolate,
    Unflap(usize),
    MaintenanceEnd(usize),
    MaintenanceOff(usize),
    PowerOn(usize),
    Exec(Action),
    Heal,
}

/// A queued event, ordered by (time, sequence).
#[derive(Debug)]
struct Queued(u64, u64, Ev);

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

struct Sim<'a> {
    sc: &'a Scenario,
    cfg: Config,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    hosts: Vec<WHost>,
    res: Vec<WRes>,
    isolated: bool,
    isolated_since: u64,
    engine: Engine,
    log: MemoryIntentLog,
    /// Effects done or pending per key: the fakes are idempotent per key.
    effects: BTreeMap<IntentKey, Option<Input>>,
    lifetime: u64,
    issued_this_life: BTreeSet<IntentKey>,
    resumed_open: BTreeSet<IntentKey>,
    open_per_resource: BTreeMap<Resource, IntentKey>,
    unfence_asked: BTreeSet<usize>,
    healed: bool,
    report: Report,
    trace: Vec<String>,
    last_revision: u64,
}

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario) -> Self {
        let cfg = sc.config();
        let hosts = (0..sc.hosts)
            .map(|i| WHost {
                id: HostId::new(format!("cmp-{i}")),
                powered: true,
                crashed: false,
                hung: false,
                cut: [false; 2],
                flapping: false,
                boot_id: 1,
                forced_down: false,
                maintenance: false,
                bmc_broken: false,
                outbox: Vec::new(),
                silent_since: None,
            })
            .collect();
        let res = sc
            .resources
            .iter()
            .map(|(r, h)| WRes {
                r: r.clone(),
                placement: *h,
                instances: [*h].into_iter().collect(),
            })
            .collect();
        Sim {
            sc,
            engine: Engine::new(cfg.clone()),
            cfg,
            rng: Rng::new(sc.seed.wrapping_mul(31).wrapping_add(7)),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            hosts,
            res,
            isolated: false,
            isolated_since: 0,
            log: MemoryIntentLog::new(),
            effects: BTreeMap::new(),
            lifetime: 0,
            issued_this_life: BTreeSet::new(),
            resumed_open: BTreeSet::new(),
            open_per_resource: BTreeMap::new(),
            unfence_asked: BTreeSet::new(),
            healed: false,
            report: Report {
                faults: sc.faults.len(),
                ..Report::default()
            },
            trace: Vec::new(),
            last_revision: u64::MAX,
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued(t, self.seq, ev)));
    }

    fn later(&mut self, lo: u64, hi: u64, ev: Ev) {
        let t = self.now + self.rng.range(lo, hi);
        self.at(t, ev);
    }

    fn violation(&self, invariant: Invariant, detail: String) -> Violation {
        Violation {
            seed: self.sc.seed,
            at: self.now,
            invariant,
            detail,
            trace: self.trace.iter().rev().take(40).rev().cloned().collect(),
        }
    }

    fn fail(&self, invariant: Invariant, detail: String) -> Result<(), Box<Violation>> {
        Err(Box::new(self.violation(invariant, detail)))
    }

    fn trace(&mut self, line: String) {
        if self.trace.len() >= 400 {
            self.trace.drain(..200);
        }
        self.trace.push(line);
    }

    fn run(&mut self) -> Result<(), Box<Violation>> {
        let start = self.engine.start(Timestamp(0));
        self.apply_actions(start)?;
        // Nova's inventory, then the world starts.
        for h in 0..self.hosts.len() {
            let resources = self.listing(h, true);
            self.deliver(Input::HostEvent {
                host: self.hosts[h].id.clone(),
                event: HostEvent::Inventory {
                    resources,
                    stopped: vec![],
                    source: Source::Nova,
                    at: ListedAt::Controller(Timestamp(0)),
                },
            })?;
        }
        self.at(0, Ev::HeartbeatRound);
        self.at(500, Ev::InventoryRound);
        for (t, f) in self.sc.faults.clone() {
            self.at(t, Ev::Fault(f));
        }
        self.at(self.sc.heal_at, Ev::Heal);
        while let Some(Reverse(Queued(t, _, ev))) = self.queue.pop() {
            if t > self.sc.end_at {
                break;
            }
            self.now = t;
            self.handle(ev)?;
        }
        self.final_check()
    }

    fn listing(&self, h: usize, nova: bool) -> Vec<Resource> {
        self.res
            .iter()
            .filter(|r| {
                if nova {
                    r.placement == h
                } else {
                    r.instances.contains(&h)
                }
            })
            .map(|r| r.r.clone())
            .collect()
    }

    fn connected(&self, h: usize) -> bool {
        let w = &self.hosts[h];
        w.alive() && !self.isolated && !(w.cut[0] && w.cut[1])
    }

    fn handle(&mut self, ev: Ev) -> Result<(), Box<Violation>> {
        match ev {
            Ev::Deliver(input) => self.deliver(input)?,
            Ev::HeartbeatRound => {
                self.at(self.now + 100, Ev::HeartbeatRound);
                for h in 0..self.hosts.len() {
                    self.world_watchdog(h);
                    if !self.connected(h) {
                        continue;
                    }
                    let w = &self.hosts[h];
                    if w.flapping && self.rng.chance(0.6) || self.rng.chance(0.02) {
                        continue;
                    }
                    let path = if w.cut[0] {
                        1
                    } else if w.cut[1] {
                        0
                    } else {
                        (self.now / 100 + h as u64) % 2
                    };
                    let hb = Heartbeat {
                        host: w.id.clone(),
                        path: PathId(path as u16),
                        boot_id: w.boot_id,
                        incarnation: 1,
                        at: self.host_time(h),
                        self_fence_armed: self.sc.self_fence,
                    };
                    let outbox = std::mem::take(&mut self.hosts[h].outbox);
                    let host = self.hosts[h].id.clone();
                    for event in outbox {
                        let dup = self.rng.chance(0.05);
                        let input = Input::HostEvent {
                            host: host.clone(),
                            event,
                        };
                        if dup {
                            self.later(100, 3_000, Ev::Deliver(input.clone()));
                        }
                        self.later(1, 40, Ev::Deliver(input));
                    }
                    self.deliver(Input::Heartbeat(hb))?;
                }
                self.sim_operator()?;
            }
            Ev::InventoryRound => {
                self.at(self.now + 2_000, Ev::InventoryRound);
                for h in 0..self.hosts.len() {
                    if self.hosts[h].alive() {
                        // A watchdog's list speaks for VMs only, Neutron's for routers
                        // only (the engine reads each for its own kind).
                        let (routers, vms): (Vec<Resource>, Vec<Resource>) = self
                            .listing(h, false)
                            .into_iter()
                            .partition(|r| r.kind() == crate::engine::ResourceKind::Router);
                        for (resources, source) in
                            [(vms, Source::Libvirt), (routers, Source::Neutron)]
                        {
                            // The watchdog lists on its host's clock; Neutron's lister
                            // is the controller's.
                            let at = match source {
                                Source::Neutron => ListedAt::Controller(Timestamp(self.now)),
                                _ => ListedAt::Host(self.host_time(h)),
                            };
                            self.hosts[h].outbox.push(HostEvent::Inventory {
                                resources,
                                stopped: vec![],
                                source,
                                at,
                            });
                        }
                    }
                }
            }
            Ev::Fault(f) => self.fault(f)?,
            Ev::Unhang(h) => {
                self.hosts[h].hung = false;
            }
            Ev::Unpartition(h, p) => match p {
                Some(p) => self.hosts[h].cut[p as usize] = false,
                None => self.hosts[h].cut = [false; 2],
            },
            Ev::Unisolate => self.isolated = false,
            Ev::Unflap(h) => self.hosts[h].flapping = false,
            Ev::MaintenanceEnd(h) => {
                self.hosts[h].cut = [false; 2];
                self.later(1_000, 1_000, Ev::MaintenanceOff(h));
            }
            Ev::MaintenanceOff(h) => {
                self.hosts[h].maintenance = false;
                let host = self.hosts[h].id.clone();
                self.command(OperatorCommand::MaintenanceOff { host })?;
            }
            Ev::PowerOn(h) => {
                let w = &mut self.hosts[h];
                w.powered = true;
                w.crashed = false;
                w.hung = false;
                w.boot_id += 1;
                w.outbox.clear();
            }
            Ev::Exec(a) => self.exec(a)?,
            Ev::Heal => {
                self.healed = true;
                self.isolated = false;
                for w in &mut self.hosts {
                    if !w.maintenance {
                        w.cut = [false; 2];
                    }
                    w.hung = false;
                    w.flapping = false;
                }
            }
        }
        Ok(())
    }

    /// The host's self-fence: an armed watchdog powers the host off after 2 s without
    /// the controller (isolated, or hung).
    fn world_watchdog(&mut self, h: usize) {
        if !self.sc.self_fence {
            return;
        }
        let w = &self.hosts[h];
        let cut_off =
            w.powered && !w.crashed && (w.hung || self.isolated || (w.cut[0] && w.cut[1]));
        if !cut_off || w.maintenance {
            self.hosts[h].silent_since = None;
            return;
        }
        let since = *self.hosts[h].silent_since.get_or_insert(self.now);
        if self.now >= since + 2_000 {
            self.power_off(h);
        }
    }

    fn power_off(&mut self, h: usize) {
        let w = &mut self.hosts[h];
        if !w.powered {
            return;
        }
        w.powered = false;
        w.hung = false;
        w.crashed = false;
        w.outbox.clear();
        w.silent_since = None;
        for r in &mut self.res {
            r.instances.remove(&h);
        }
        self.later(3_000, 8_000, Ev::PowerOn(h));
    }

    fn fault(&mut self, f: Fault) -> Result<(), Box<Violation>> {
        self.trace(format!("{:>6} FAULT {f:?}", self.now));
        match f {
            Fault::HostCrash { host } => {
                if self.hosts[host].powered && !self.hosts[host].maintenance {
                    self.hosts[host].crashed = true;
                    self.hosts[host].outbox.clear();
                    for r in &mut self.res {
                        r.instances.remove(&host);
                    }
                }
            }
            Fault::HostHang { host, for_ms } => {
                if !self.hosts[host].maintenance {
                    self.hosts[host].hung = true;
                    self.at(self.now + for_ms, Ev::Unhang(host));
                }
            }
            Fault::Partition { host, path, for_ms } => {
                match path {
                    Some(p) => self.hosts[host].cut[p as usize] = true,
                    None => self.hosts[host].cut = [true; 2],
                }
                self.at(self.now + for_ms, Ev::Unpartition(host, path));
            }
            Fault::ControllerIsolated { for_ms } => {
                if !self.isolated {
                    self.isolated_since = self.now;
                }
                self.isolated = true;
                self.at(self.now + for_ms, Ev::Unisolate);
            }
            Fault::Flap { host, for_ms } => {
                self.hosts[host].flapping = true;
                self.at(self.now + for_ms, Ev::Unflap(host));
            }
            Fault::VmCrash { resource } => {
                let r = &mut self.res[resource];
                let Some(&h) = r.instances.iter().next() else {
                    return Ok(());
                };
                if !self.hosts[h].alive() {
                    return Ok(());
                }
                r.instances.remove(&h);
                let res = r.r.clone();
                let t = self.host_time(h);
                self.hosts[h].outbox.push(HostEvent::ResourceExited {
                    resource: res.clone(),
                    source: Source::Ebpf,
                    at: t,
                    reason: "SIGSEGV".into(),
                });
                self.hosts[h].outbox.push(HostEvent::ResourceExited {
                    resource: res,
                    source: Source::Libvirt,
                    at: t,
                    reason: "libvirt: Stopped(Failed)".into(),
                });
            }
            Fault::Maintenance { host, for_ms } => {
                let w = &self.hosts[host];
                if !w.alive() || w.maintenance {
                    return Ok(());
                }
                let id = w.id.clone();
                self.command(OperatorCommand::MaintenanceOn { host: id.clone() })?;
                if self.engine.host_state(&id) == Some(HostState::Maintenance) {
                    self.hosts[host].maintenance = true;
                    self.hosts[host].cut = [true; 2];
                    self.at(self.now + for_ms, Ev::MaintenanceEnd(host));
                }
            }
            Fault::ControllerRestart => {
                self.report.controller_restarts += 1;
                let (engine, actions) =
                    Engine::resume(self.cfg.clone(), &self.log, Timestamp(self.now));
                self.engine = engine;
                self.lifetime += 1;
                self.issued_this_life.clear();
                self.resumed_open = self.log.open().into_iter().map(|r| r.key).collect();
                self.last_revision = u64::MAX;
                self.trace(format!(
                    "{:>6} RESUME open={:?}",
                    self.now, self.resumed_open
                ));
                self.apply_actions(actions)?;
                self.check_engine()?;
                // The runtime reloads Nova's inventory at start.
                for h in 0..self.hosts.len() {
                    let resources = self.listing(h, true);
                    self.deliver(Input::HostEvent {
                        host: self.hosts[h].id.clone(),
                        event: HostEvent::Inventory {
                            resources,
                            stopped: vec![],
                            source: Source::Nova,
                            at: ListedAt::Controller(Timestamp(self.now)),
                        },
                    })?;
                }
            }
            Fault::BmcBroken { host } => self.hosts[host].bmc_broken = true,
        }
        self.check_world()
    }

    /// A patient operator: unfences a recovered host once it is back and clean. Under
    /// the automatic policy, a fake Nova instead reports a recovered host's compute
    /// service while the host runs, on every round, and the engine decides.
    fn sim_operator(&mut self) -> Result<(), Box<Violation>> {
        for h in 0..self.hosts.len() {
            let id = self.hosts[h].id.clone();
            if self.engine.host_state(&id) != Some(HostState::Recovered) {
                self.unfence_asked.remove(&h);
            } else if self.sc.auto_unfence {
                if self.hosts[h].alive() {
                    self.deliver(Input::HostEvent {
                        host: id,
                        event: HostEvent::ComputeServiceReporting,
                    })?;
                }
            } else if self.connected(h) && self.unfence_asked.insert(h) {
                self.command(OperatorCommand::Unfence { host: id })?;
            }
        }
        Ok(())
    }

    /// Host `h`'s own clock now (a plausible unix time, off by its scenario offset).
    fn host_time(&self, h: usize) -> HostTime {
        const HOST_EPOCH_MS: i64 = 1_800_000_000_000;
        let offset = self.sc.clock_offsets_ms.get(h).copied().unwrap_or(0);
        HostTime((HOST_EPOCH_MS + self.now as i64 + offset) as u64)
    }

    /// An operator's command; a refusal changes nothing (it is traced).
    fn command(&mut self, cmd: OperatorCommand) -> Result<(), Box<Violation>> {
        self.trace(format!("{:>6} CMD {cmd:?}", self.now));
        match self.engine.command(Timestamp(self.now), cmd) {
            Ok(actions) => {
                self.report.steps += 1;
                self.apply_actions(actions)?;
                self.check_engine()
            }
            Err(refusal) => {
                self.trace(format!("{:>6} REFUSED {refusal}", self.now));
                Ok(())
            }
        }
    }

    fn deliver(&mut self, input: Input) -> Result<(), Box<Violation>> {
        if !matches!(input, Input::Heartbeat(_) | Input::Timer(_)) {
            self.trace(format!("{:>6} IN  {input:?}", self.now));
        }
        let actions = self.engine.step(Timestamp(self.now), input);
        self.report.steps += 1;
        self.apply_actions(actions)?;
        self.check_engine()
    }

    fn apply_actions(&mut self, actions: Vec<Action>) -> Result<(), Box<Violation>> {
        for a in actions {
            if !matches!(a, Action::ArmTimer { .. } | Action::RecordTimeline { .. }) {
                self.trace(format!("{:>6} OUT {a:?}", self.now));
            }
            self.check_action(&a)?;
            match &a {
                Action::ArmTimer { id, at } => {
                    let id = id.clone();
                    self.at(at.0.max(self.now), Ev::Deliver(Input::Timer(id)));
                }
                Action::PersistIntent(_) | Action::CompleteIntent { .. } => self.log.apply(&a),
                Action::RecordTimeline { .. } => {}
                Action::Alarm { .. } => self.report.alarms += 1,
                Action::Confirm { host } => {
                    let h = self.index(host);
                    let w = &self.hosts[h];
                    let verdict = if !w.powered || w.crashed {
                        Verdict::Dead
                    } else if w.hung {
                        Verdict::Unknown
                    } else if self.rng.chance(0.7) {
                        Verdict::Alive
                    } else {
                        Verdict::Unknown
                    };
                    if !self.rng.chance(0.1) {
                        let input = Input::ConfirmationResult {
                            host: host.clone(),
                            source: Source::Pacemaker,
                            verdict,
                        };
                        self.later(50, 500, Ev::Deliver(input));
                    }
                }
                Action::Fence { key, .. }
                | Action::ForceDown { key, .. }
                | Action::RestartInPlace { key, .. }
                | Action::Evacuate { key, .. }
                | Action::Unfence { key, .. } => {
                    match a {
                        Action::Fence { .. } => self.report.fences += 1,
                        Action::RestartInPlace { .. } => self.report.restarts += 1,
                        Action::Evacuate { .. } => self.report.evacuations += 1,
                        _ => {}
                    }
                    match self.effects.get(key) {
                        // Already done: the fake reports the first outcome again.
                        Some(Some(result)) => {
                            let result = result.clone();
                            self.later(10, 100, Ev::Deliver(result));
                        }
                        Some(None) => {}
                        None => {
                            self.effects.insert(key.clone(), None);
                            let (lo, hi) = match a {
                                Action::Fence { .. } => (200, 1_500),
                                Action::Evacuate { .. } => (300, 2_500),
                                Action::RestartInPlace { .. } => (100, 800),
                                _ => (20, 300),
                            };
                            self.later(lo, hi, Ev::Exec(a.clone()));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn index(&self, host: &HostId) -> usize {
        self.hosts
            .iter()
            .position(|w| &w.id == host)
            .expect("known host")
    }

    fn res_index(&self, r: &Resource) -> usize {
        self.res.iter().position(|w| &w.r == r).expect("known res")
    }

    /// Carries out an action in the world and reports back.
    fn exec(&mut self, a: Action) -> Result<(), Box<Violation>> {
        let (key, result) = match a {
            Action::Fence { host, key, .. } => {
                let h = self.index(&host);
                let outcome = if self.hosts[h].bmc_broken || self.rng.chance(self.sc.p_fence_fail) {
                    FenceOutcome::Failed {
                        reason: "BMC did not answer".into(),
                    }
                } else if self.rng.chance(self.sc.p_fence_unverified) {
                    FenceOutcome::Unverified {
                        reason: "power state unreadable".into(),
                    }
                } else {
                    self.power_off(h);
                    if self.rng.chance(0.5) {
                        FenceOutcome::Verified(FenceVerifier::IpmiPowerOff)
                    } else {
                        FenceOutcome::Verified(FenceVerifier::PacemakerHistory)
                    }
                };
                let r = Input::FenceResult {
                    host,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            Action::ForceDown { host, key } => {
                let h = self.index(&host);
                let outcome = if self.rng.chance(0.05) {
                    RestoreOutcome::Failed {
                        reason: "nova API 503".into(),
                    }
                } else {
                    self.hosts[h].forced_down = true;
                    RestoreOutcome::Ok { host: host.clone() }
                };
                let r = Input::HostActionResult {
                    host,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            Action::Unfence { host, key } => {
                let h = self.index(&host);
                self.hosts[h].forced_down = false;
                let r = Input::HostActionResult {
                    host: host.clone(),
                    key: key.clone(),
                    outcome: RestoreOutcome::Ok { host },
                };
                (key, r)
            }
            Action::RestartInPlace {
                resource,
                host,
                key,
                ..
            } => {
                let h = self.index(&host);
                let i = self.res_index(&resource);
                let w = &self.hosts[h];
                let ok = w.alive()
                    && !w.forced_down
                    && self.res[i].placement == h
                    && !self.rng.chance(self.sc.p_restore_fail);
                let outcome = if ok {
                    if self.res[i].instances.iter().any(|&o| o != h) {
                        return self.fail(
                            Invariant::NoRestoreBeforeVerifiedFence,
                            format!("{resource} restarted on {host} while running elsewhere"),
                        );
                    }
                    self.res[i].instances.insert(h);
                    RestoreOutcome::Ok { host: host.clone() }
                } else {
                    RestoreOutcome::Failed {
                        reason: "domain start failed".into(),
                    }
                };
                let r = Input::RestoreResult {
                    resource,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            Action::Evacuate {
                resource,
                from,
                key,
            } => {
                let i = self.res_index(&resource);
                let f = self.index(&from);
                let targets: Vec<usize> = (0..self.hosts.len())
                    .filter(|&t| {
                        let w = &self.hosts[t];
                        t != f && w.alive() && !w.forced_down && !w.maintenance
                    })
                    .collect();
                let outcome = if targets.is_empty() || self.rng.chance(self.sc.p_restore_fail) {
                    RestoreOutcome::Failed {
                        reason: "no valid host".into(),
                    }
                } else {
                    if !self.res[i].instances.is_empty() {
                        return self.fail(
                            Invariant::NoRestoreBeforeVerifiedFence,
                            format!(
                                "{resource} evacuated while still running on {:?}",
                                self.res[i].instances
                            ),
                        );
                    }
                    let t = targets[self.rng.index(targets.len())];
                    self.res[i].placement = t;
                    self.res[i].instances.insert(t);
                    RestoreOutcome::Ok {
                        host: self.hosts[t].id.clone(),
                    }
                };
                let r = Input::RestoreResult {
                    resource,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            _ => return Ok(()),
        };
        self.effects.insert(key, Some(result.clone()));
        if self.rng.chance(0.05) {
            self.later(200, 3_000, Ev::Deliver(result.clone()));
        }
        self.deliver(result)?;
        self.check_world()
    }

    // -------------------------------------------------------------------- invariants

    fn check_action(&mut self, a: &Action) -> Result<(), Box<Violation>> {
        match a {
            Action::PersistIntent(rec) => {
                if self.log.contains(&rec.key) {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("intent {} persisted twice", rec.key),
                    );
                }
                if let Some(r) = rec.intent.resource() {
                    if let Some(other) = self.open_per_resource.get(r) {
                        if self.log.get(other).is_some_and(|e| e.done.is_none()) {
                            return self.fail(
                                Invariant::OneOwner,
                                format!("{r}: {} issued while {other} is open", rec.key),
                            );
                        }
                    }
                    self.open_per_resource.insert(r.clone(), rec.key.clone());
                }
                if let Intent::Evacuate {
                    resource, incident, ..
                } = &rec.intent
                {
                    // Rule 2, on the log: a host incident's restore needs a verified fence.
                    let fences: Vec<_> = self
                        .log
                        .iter()
                        .filter(|e| {
                            matches!(&e.record.intent, Intent::Fence { incident: i, .. } if *i == *incident)
                        })
                        .collect();
                    let verified = fences.iter().any(|e| {
                        matches!(
                            e.done.as_ref().map(|c| &c.outcome),
                            Some(IntentOutcome::Fence(FenceOutcome::Verified(_)))
                        )
                    });
                    if !fences.is_empty() && !verified {
                        return self.fail(
                            Invariant::NoRestoreBeforeVerifiedFence,
                            format!("{resource} evacuated by {incident} without a verified fence"),
                        );
                    }
                    // And in the world: nothing restored that may still run.
                    let i = self.res_index(resource);
                    if !self.res[i].instances.is_empty() {
                        return self.fail(
                            Invariant::NoRestoreBeforeVerifiedFence,
                            format!(
                                "{resource} evacuation decided while it runs on {:?}",
                                self.res[i].instances
                            ),
                        );
                    }
                }
            }
            Action::Fence { key, .. }
            | Action::ForceDown { key, .. }
            | Action::RestartInPlace { key, .. }
            | Action::Evacuate { key, .. }
            | Action::Unfence { key, .. } => {
                let Some(entry) = self.log.get(key) else {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} carried out without a persisted intent"),
                    );
                };
                if entry.done.is_some() {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} issued again after it was done"),
                    );
                }
                if matches!(a, Action::Fence { .. })
                    && self.isolated
                    && self.now > self.isolated_since + 1_000
                    && entry.record.at.0 == self.now
                {
                    return self.fail(
                        Invariant::SafetyGate,
                        format!("{key} issued while the controller hears nobody"),
                    );
                }
                if !self.issued_this_life.insert(key.clone()) {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} issued twice by one engine"),
                    );
                }
                if entry.record.at.0 != self.now && !self.resumed_open.contains(key) {
                    // Only a resumed engine may hand an older intent out again.
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} re-issued without a restart"),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn check_world(&self) -> Result<(), Box<Violation>> {
        for r in &self.res {
            if r.instances.len() > 1 {
                return self.fail(
                    Invariant::NoRestoreBeforeVerifiedFence,
                    format!(
                        "{} runs on {} hosts: {:?}",
                        r.r,
                        r.instances.len(),
                        r.instances
                    ),
                );
            }
        }
        Ok(())
    }

    fn check_engine(&mut self) -> Result<(), Box<Violation>> {
        let rev = self.engine.revision();
        if rev == self.last_revision {
            return Ok(());
        }
        self.last_revision = rev;
        let mut claimed: BTreeMap<Resource, crate::engine::IncidentId> = BTreeMap::new();
        for (inc, r) in self.engine.claims() {
            if let Some(other) = claimed.insert(r.clone(), inc) {
                return self.fail(
                    Invariant::OneOwner,
                    format!("{r} claimed by {other} and {inc}"),
                );
            }
        }
        for v in self.engine.resources() {
            if !v.state.is_settled() {
                let open = v
                    .owner
                    .and_then(|o| self.engine.incident(o))
                    .is_some_and(|i| i.closed_at.is_none());
                if !open {
                    return self.fail(
                        Invariant::NoVmLeftBehind,
                        format!("{} is {} with no open owner", v.resource, v.state),
                    );
                }
            }
            if let Some(o) = v.owner {
                if claimed.get(&v.resource) != Some(&o) {
                    return self.fail(
                        Invariant::OneOwner,
                        format!("{} owned by {o} which does not claim it", v.resource),
                    );
                }
            }
        }
        Ok(())
    }

    fn final_check(&mut self) -> Result<(), Box<Violation>> {
        self.check_world()?;
        let gave_up: BTreeSet<Resource> = self
            .engine
            .resources()
            .into_iter()
            .filter(|v| v.state == ResourceState::GaveUp)
            .map(|v| v.resource)
            .collect();
        for i in 0..self.res.len() {
            if !self.res[i].instances.is_empty() {
                continue;
            }
            let r = self.res[i].r.clone();
            if gave_up.contains(&r) {
                self.report.gave_up += 1;
                continue;
            }
            let h = self.res[i].placement;
            let host = self.hosts[h].id.clone();
            let held = self.engine.host_alarmed(&host)
                || self.hosts[h].maintenance
                || self.engine.host_state(&host) == Some(HostState::Maintenance);
            if held {
                self.report.held += 1;
                continue;
            }
            // Still being worked on at the end (a late retry) is fine if owned.
            let owned = self.engine.resource(&r).is_some_and(|v| v.owner.is_some());
            if owned {
                continue;
            }
            return self.fail(
                Invariant::NoVmLeftBehind,
                format!(
                    "{r} is dead in the world (placed on {host}, host {:?}) and nobody handles it: engine says {:?}",
                    self.engine.host_state(&host),
                    self.engine.resource(&r)
                ),
            );
        }
        Ok(())
    }
}
