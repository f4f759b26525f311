//! The fake world: hosts with their own clocks, resources, the network between them
//! and the controller, the faults, and the event queue that drives the engine.

use super::*;

#[derive(Clone, Debug)]
pub(super) struct WHost {
    pub(super) id: HostId,
    pub(super) powered: bool,
    pub(super) crashed: bool,
    pub(super) hung: bool,
    pub(super) cut: [bool; 2],
    pub(super) flapping: bool,
    pub(super) boot_id: u64,
    pub(super) forced_down: bool,
    pub(super) maintenance: bool,
    pub(super) bmc_broken: bool,
    pub(super) outbox: Vec<HostEvent>,
    pub(super) silent_since: Option<u64>,
}

impl WHost {
    pub(super) fn alive(&self) -> bool {
        self.powered && !self.crashed && !self.hung
    }
}

#[derive(Clone, Debug)]
pub(super) struct WRes {
    pub(super) r: Resource,
    pub(super) placement: usize,
    pub(super) instances: BTreeSet<usize>,
}

#[derive(Clone, Debug)]
pub(super) enum Ev {
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
pub(super) struct Queued(u64, u64, Ev);

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

pub(super) struct Sim<'a> {
    pub(super) sc: &'a Scenario,
    pub(super) cfg: Config,
    pub(super) rng: Rng,
    pub(super) now: u64,
    pub(super) seq: u64,
    pub(super) queue: BinaryHeap<Reverse<Queued>>,
    pub(super) hosts: Vec<WHost>,
    pub(super) res: Vec<WRes>,
    pub(super) isolated: bool,
    pub(super) isolated_since: u64,
    pub(super) engine: Engine,
    pub(super) log: MemoryIntentLog,
    /// Effects done or pending per key: the fakes are idempotent per key.
    pub(super) effects: BTreeMap<IntentKey, Option<Input>>,
    pub(super) lifetime: u64,
    pub(super) issued_this_life: BTreeSet<IntentKey>,
    pub(super) resumed_open: BTreeSet<IntentKey>,
    pub(super) open_per_resource: BTreeMap<Resource, IntentKey>,
    pub(super) unfence_asked: BTreeSet<usize>,
    pub(super) healed: bool,
    pub(super) report: Report,
    pub(super) trace: Vec<String>,
    pub(super) last_revision: u64,
}

impl<'a> Sim<'a> {
    pub(super) fn new(sc: &'a Scenario) -> Self {
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

    pub(super) fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued(t, self.seq, ev)));
    }

    pub(super) fn later(&mut self, lo: u64, hi: u64, ev: Ev) {
        let t = self.now + self.rng.range(lo, hi);
        self.at(t, ev);
    }

    pub(super) fn trace(&mut self, line: String) {
        if self.trace.len() >= 400 {
            self.trace.drain(..200);
        }
        self.trace.push(line);
    }

    pub(super) fn run(&mut self) -> Result<(), Box<Violation>> {
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

    pub(super) fn listing(&self, h: usize, nova: bool) -> Vec<Resource> {
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

    pub(super) fn connected(&self, h: usize) -> bool {
        let w = &self.hosts[h];
        w.alive() && !self.isolated && !(w.cut[0] && w.cut[1])
    }

    pub(super) fn handle(&mut self, ev: Ev) -> Result<(), Box<Violation>> {
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
                        // The world's watchdog powers its host off 2 s into a cut.
                        self_fence: self.sc.self_fence.then_some(Duration::from_secs(2)),
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
    pub(super) fn world_watchdog(&mut self, h: usize) {
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

    pub(super) fn power_off(&mut self, h: usize) {
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

    pub(super) fn fault(&mut self, f: Fault) -> Result<(), Box<Violation>> {
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
    pub(super) fn sim_operator(&mut self) -> Result<(), Box<Violation>> {
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
    pub(super) fn host_time(&self, h: usize) -> HostTime {
        const HOST_EPOCH_MS: i64 = 1_800_000_000_000;
        let offset = self.sc.clock_offsets_ms.get(h).copied().unwrap_or(0);
        HostTime((HOST_EPOCH_MS + self.now as i64 + offset) as u64)
    }

    /// An operator's command; a refusal changes nothing (it is traced).
    pub(super) fn command(&mut self, cmd: OperatorCommand) -> Result<(), Box<Violation>> {
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

    pub(super) fn deliver(&mut self, input: Input) -> Result<(), Box<Violation>> {
        if !matches!(input, Input::Heartbeat(_) | Input::Timer(_)) {
            self.trace(format!("{:>6} IN  {input:?}", self.now));
        }
        let actions = self.engine.step(Timestamp(self.now), input);
        self.report.steps += 1;
        self.apply_actions(actions)?;
        self.check_engine()
    }

    pub(super) fn index(&self, host: &HostId) -> usize {
        self.hosts
            .iter()
            .position(|w| &w.id == host)
            .expect("known host")
    }

    pub(super) fn res_index(&self, r: &Resource) -> usize {
        self.res.iter().position(|w| &w.r == r).expect("known res")
    }
}
