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
    /// The send time of the last heartbeat the controller acked (the watchdog's
    /// self-fence counts from it); `None` until one is acked after a boot, and until
    /// then the watchdog is not armed.
    pub(super) last_acked: Option<u64>,
    /// One-way: nothing the controller sends reaches the host.
    pub(super) deaf: bool,
    /// One-way: the host's heartbeats are lost (its stream works).
    pub(super) heartbeats_lost: bool,
    /// Heartbeats delayed by up to this much each (0: on time).
    pub(super) heartbeat_delay_ms: u64,
    /// When it last booted (ms): Nova's compute service there takes a while to start.
    pub(super) booted_at: u64,
    /// On the Ceph blocklist (its storage fence, until its unfence): its copies of VMs
    /// on RBD cannot write.
    pub(super) blocklisted: bool,
    /// Its disk-lease daemon is dead (`Fault::LeaseDaemonDies`); `None`: its watchdog
    /// said nothing of leases yet.
    pub(super) leases_lost: Option<bool>,
}

impl WHost {
    pub(super) fn alive(&self) -> bool {
        self.powered && !self.crashed && !self.hung
    }

    /// Both paths to the controller cut.
    pub(super) fn cut_off(&self) -> bool {
        self.cut[0] && self.cut[1]
    }
}

#[derive(Clone, Debug)]
pub(super) struct WRes {
    pub(super) r: Resource,
    pub(super) placement: usize,
    pub(super) instances: BTreeSet<usize>,
    /// Hosts whose libvirt starts the VM when the host boots (autostart on its
    /// definition there): where it first ran, until a destroy command turns it off.
    pub(super) autostart: BTreeSet<usize>,
    /// Hosts that run a stale copy: started by autostart when the host came back while
    /// the VM ran elsewhere. Not in `instances` (the engine cannot stop a boot from
    /// starting it, only destroy it once it is there), and checked on their own: a copy
    /// the engine knows about must not outlive the run.
    pub(super) copies: BTreeSet<usize>,
}

/// A slow controller (Fault::ControllerSlow).
#[derive(Clone, Copy, Debug)]
pub(super) struct Slow {
    pub(super) until: u64,
    pub(super) lag_ms: u64,
    pub(super) loss: f64,
}

/// The controller's own load as its runtime measures it between two reports.
#[derive(Clone, Debug, Default)]
pub(super) struct OwnLoad {
    /// Longest heartbeat wait since the last report (ms).
    pub(super) wait: u64,
    /// How late the last timer was taken (ms).
    pub(super) lateness: u64,
    /// Heartbeats the controller lost itself (cumulative) and as of the last report.
    pub(super) lost: u64,
    pub(super) lost_reported: u64,
    pub(super) reported_at: u64,
}

impl OwnLoad {
    pub(super) fn report(&mut self, now: u64) -> crate::engine::load::ControllerLoad {
        let r = crate::engine::load::ControllerLoad {
            window: Duration::from_millis(now - self.reported_at),
            heartbeat_wait: Duration::from_millis(self.wait),
            timer_lateness: Duration::from_millis(self.lateness),
            lost: self.lost - self.lost_reported,
            queue_depth: 0,
        };
        self.wait = 0;
        self.lateness = 0;
        self.lost_reported = self.lost;
        self.reported_at = now;
        r
    }
}

#[derive(Clone, Debug)]
pub(super) enum Ev {
    Deliver(Input),
    /// An input for the controller term `.0` only (a timer it armed, an answer to
    /// what it asked, an edge's duplicate, in-process): it dies with the term.
    Redeliver(u64, Input),
    /// A heartbeat that host `.0` sent at `.1` arrives.
    Heartbeat(usize, u64, Heartbeat),
    /// An input that waited in a slow controller's queue since `.1`, for its term
    /// `.0`: the engine takes it now.
    Queued(u64, u64, Input),
    /// Host `.0`'s watchdog answers whether resource `.1` runs there, to the
    /// controller's `.2`-th process (an `AskHost` it was sent).
    Answer(usize, usize, u64),
    HeartbeatRound,
    InventoryRound,
    /// Host `.0`'s lease daemon runs again and its VMs hold their leases.
    LeasesBack(usize),
    Fault(Fault),
    Unhang(usize),
    Unpartition(usize, Option<u16>),
    Unisolate,
    Unflap(usize),
    Hear(usize),
    HeartbeatsBack(usize),
    HeartbeatsPrompt(usize),
    MaintenanceEnd(usize),
    MaintenanceOff(usize),
    PowerOn(usize),
    /// A host's watchdog destroys its copy of a resource (a `StopStaleCopy` command
    /// that reached it) and turns its autostart off.
    StopCopy(usize, usize),
    /// An effector carries out an action, sent by the controller's `life`-th process:
    /// if that process has died since, the effect still happens but nobody hears of it.
    /// The libvirt backend's evacuations name the target it picked when it sent the
    /// start (`None`: no host to send it to).
    Exec(Action, u64, Option<usize>),
    Heal,
    /// etcd's lessor looks for expired leases (every 500 ms).
    Lessor,
    /// The controllers that can reach etcd campaign for the leader key.
    Elect,
    /// Term `.0`'s leader sends a keep-alive (every second).
    KeepAlive(u64),
    /// Term `.0`'s keep-alive for lease `.1`, sent at `.2` on its clock, reaches etcd.
    KeepAliveArrives(u64, u64, u64),
    /// etcd's answer to it (`.3`: the lease was there) reaches the controller.
    KeepAliveAnswered(u64, u64, u64, bool),
    /// Term `.0`'s local deadline may have passed.
    Deadline(u64),
    /// A stalled process of term `.0` runs again.
    Wake(u64),
    /// Controller process `.0` is started again (a follower).
    ControllerUp(usize),
    /// etcd has a quorum again.
    EtcdUp,
}

/// A queued event, ordered by (time, sequence).
#[derive(Debug)]
pub(super) struct Queued(pub(super) u64, pub(super) u64, pub(super) Ev);

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

/// Where the hosts' clocks and the engine's start (plausible unix ms).
const HOST_EPOCH_MS: i64 = 1_800_000_000_000;
const ENGINE_EPOCH_MS: i64 = HOST_EPOCH_MS;

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
    /// Effects done or pending per key, as the edges' in-memory dedup maps know them
    /// (`AnsweredOnce`, the fencer's outcomes, the libvirt edge's `tried`): forgotten
    /// when the controller restarts, like theirs.
    pub(super) effects: BTreeMap<IntentKey, Option<Input>>,
    /// Actions the world (Nova, a BMC) is still carrying out, by key, with the
    /// controller life that last asked: this survives a controller restart, and a
    /// repeated request joins the one under way (Nova answers 409 while a server's
    /// task runs, and the edge tracks that task) instead of starting another.
    pub(super) under_way: BTreeMap<IntentKey, u64>,
    /// The current controller term (a leader's engine, from its takeover): the
    /// edges, timers and answers of an earlier term are not this one's.
    pub(super) lifetime: u64,
    /// The current term acts: its leader holds the lease and has not stopped (its
    /// local deadline, a write refused or unanswered, its process killed). While it
    /// does not, nothing reaches an engine and nothing acts.
    pub(super) acting: bool,
    /// The controller processes and etcd (issue 15; see `leader.rs`).
    pub(super) ctls: Vec<Ctl>,
    pub(super) etcd: Etcd,
    /// The current term's controller, its lease and its local deadline (on its clock).
    pub(super) leader: usize,
    pub(super) lease_id: u64,
    pub(super) deadline_local: u64,
    /// The current term's process is stalled until then (its batch in `stalled`).
    pub(super) paused_until: Option<u64>,
    /// The current leader's next store write stalls for this long.
    pub(super) stall_armed: Option<u64>,
    pub(super) stalled: Option<Stalled>,
    /// A former term's batch, held by a stall when another took the lead.
    pub(super) stalled_old: Option<Stalled>,
    /// The next action is the stalled write: its deadline was checked before the stall.
    pub(super) deadline_checked: bool,
    /// While a stalled batch is carried out: the engine's time when it was made.
    pub(super) batch_engine_at: Option<Timestamp>,
    /// etcd's answers to keep-alives are late by up to this much (ms; 0: on time).
    pub(super) keep_alive_delay_ms: u64,
    pub(super) keep_alive_delay_until: u64,
    /// When the current term first and last acted, and the latest act of every earlier
    /// term with that term.
    pub(super) term_first_act: Option<u64>,
    pub(super) term_last_act: Option<u64>,
    pub(super) earlier_terms_last_act: Option<(u64, u64)>,
    pub(super) term_started_at: u64,
    pub(super) leaderless_since: Option<u64>,
    /// Every lease etcd granted: its holder, the revision it was granted at, and the one
    /// it went at (expired, revoked).
    pub(super) lease_history: BTreeMap<u64, (usize, u64, Option<u64>)>,
    /// Every intent written: by which controller, under which lease, at which revision.
    pub(super) intent_writes: BTreeMap<IntentKey, (usize, u64, u64)>,
    pub(super) issued_this_life: BTreeMap<IntentKey, u64>,
    pub(super) resumed_open: BTreeSet<IntentKey>,
    pub(super) open_per_resource: BTreeMap<Resource, IntentKey>,
    pub(super) unfence_asked: BTreeSet<usize>,
    pub(super) healed: bool,
    /// The controller is the slow one (Fault::ControllerSlow) until then.
    pub(super) slow: Option<Slow>,
    /// What the runtime measures of the controller's own load.
    pub(super) own_load: OwnLoad,
    pub(super) report: Report,
    pub(super) trace: Vec<String>,
    /// The engine's clock minus simulated time (ms). The engine's clock is the
    /// controller's wall clock read at start and advanced monotonically; a restarted
    /// controller reads a wall clock that may have been stepped meanwhile.
    pub(super) engine_offset_ms: i64,
    /// Keep every trace line (a replay), not only the last few hundred.
    pub(super) keep_whole_trace: bool,
    pub(super) last_revision: u64,
    /// Evacuations carried out whose answer never reaches the engine.
    pub(super) unanswered: BTreeSet<IntentKey>,
    /// Starts the libvirt backend sent and the target has not carried out yet, by
    /// (target, resource): that host's watchdog answers a question about the resource
    /// after them.
    pub(super) starts_on_way: BTreeMap<(usize, usize), u32>,
    /// The last disk-lease word the current engine took per host: lost or not. Checked
    /// against the engine's published facts after every step (the restore backends pick
    /// targets by those).
    pub(super) lease_words_taken: BTreeMap<usize, bool>,
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
                last_acked: None,
                deaf: false,
                heartbeats_lost: false,
                heartbeat_delay_ms: 0,
                booted_at: 0,
                blocklisted: false,
                leases_lost: None,
            })
            .collect();
        let res = sc
            .resources
            .iter()
            .map(|(r, h)| WRes {
                r: r.clone(),
                placement: *h,
                instances: [*h].into_iter().collect(),
                autostart: if sc.autostart && r.kind() == crate::engine::ResourceKind::Vm {
                    [*h].into_iter().collect()
                } else {
                    BTreeSet::new()
                },
                copies: BTreeSet::new(),
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
            under_way: BTreeMap::new(),
            lifetime: 0,
            acting: true,
            ctls: (0..sc.controllers.max(1))
                .map(|c| Ctl {
                    up: true,
                    etcd_cut_until: 0,
                    ppm: sc.controller_drift_ppm.get(c).copied().unwrap_or(0),
                    paused_until: 0,
                    to_revoke: None,
                })
                .collect(),
            etcd: Etcd {
                available: true,
                down_until: 0,
                // The first controller took the lead before the world starts.
                lease: Some(EtcdLease {
                    id: 1,
                    holder: 0,
                    expires_at: sc.lease_ttl_ms,
                }),
                next_id: 2,
                revision: 1,
            },
            leader: 0,
            lease_id: 1,
            deadline_local: sc.lease_ttl_ms.saturating_sub(sc.lease_margin_ms),
            paused_until: None,
            stall_armed: None,
            stalled: None,
            stalled_old: None,
            deadline_checked: false,
            batch_engine_at: None,
            keep_alive_delay_ms: 0,
            keep_alive_delay_until: 0,
            term_first_act: None,
            term_last_act: None,
            earlier_terms_last_act: None,
            term_started_at: 0,
            leaderless_since: None,
            lease_history: [(1, (0, 0, None))].into_iter().collect(),
            intent_writes: BTreeMap::new(),
            issued_this_life: BTreeMap::new(),
            resumed_open: BTreeSet::new(),
            open_per_resource: BTreeMap::new(),
            unfence_asked: BTreeSet::new(),
            healed: false,
            slow: None,
            own_load: OwnLoad::default(),
            report: Report {
                faults: sc.faults.len(),
                // FNV-1a's offset basis.
                trace_digest: 0xcbf2_9ce4_8422_2325,
                ..Report::default()
            },
            trace: Vec::new(),
            keep_whole_trace: false,
            engine_offset_ms: ENGINE_EPOCH_MS,
            last_revision: u64::MAX,
            unanswered: BTreeSet::new(),
            starts_on_way: BTreeMap::new(),
            lease_words_taken: BTreeMap::new(),
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
        // FNV-1a over the line and a separator.
        let mut d = self.report.trace_digest;
        for b in line.bytes().chain([b'\n']) {
            d = (d ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.report.trace_digest = d;
        if !self.keep_whole_trace && self.trace.len() >= 400 {
            self.trace.drain(..200);
        }
        self.trace.push(line);
    }

    pub(super) fn run(&mut self) -> Result<(), Box<Violation>> {
        let start = self.engine.start(self.engine_now());
        self.apply_actions(start)?;
        // Nova's inventory, then the world starts.
        for h in 0..self.hosts.len() {
            let resources = self.listing(h, true);
            self.deliver(Input::HostEvent {
                host: self.hosts[h].id.clone(),
                event: HostEvent::Inventory {
                    resources,
                    stopped: vec![],
                    rbd_only: vec![],
                    source: Source::Nova,
                    at: ListedAt::Controller(self.engine_now()),
                },
            })?;
        }
        self.at(0, Ev::HeartbeatRound);
        self.at(500, Ev::InventoryRound);
        // etcd's lessor, on a phase of its own; the first leader's keep-alives.
        self.at(self.sc.seed % 500, Ev::Lessor);
        self.at(self.sim_at_local(0, 1_000), Ev::KeepAlive(0));
        self.at(self.sim_at_local(0, self.deadline_local), Ev::Deadline(0));
        for (t, f) in self.sc.faults.clone() {
            self.at(t, Ev::Fault(f));
        }
        self.at(self.sc.heal_at, Ev::Heal);
        while let Some(Reverse(Queued(t, _, ev))) = self.queue.pop() {
            // The run ends at `end_at`, or later: once a leader has acted for 5 s (one
            // that took over just before the end has its time to catch up).
            let settled =
                self.acting && self.paused_until.is_none() && t >= self.term_started_at + 5_000;
            if t > self.sc.end_at && (settled || t > self.sc.end_at + 30_000) {
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
                    r.instances.contains(&h) || r.copies.contains(&h)
                }
            })
            .map(|r| r.r.clone())
            .collect()
    }

    /// Whether the host's event stream is open: events in, commands and questions out
    /// (TCP: both ways needed).
    pub(super) fn connected(&self, h: usize) -> bool {
        let w = &self.hosts[h];
        w.alive() && !self.isolated && !w.cut_off() && !w.deaf
    }

    /// Whether a heartbeat the host sends now reaches the controller.
    fn heartbeats_arrive(&self, h: usize) -> bool {
        let w = &self.hosts[h];
        w.alive() && !self.isolated && !w.cut_off() && !w.heartbeats_lost
    }

    pub(super) fn handle(&mut self, ev: Ev) -> Result<(), Box<Violation>> {
        match ev {
            Ev::Deliver(input) => {
                // A host's event stream is open to the leader only: what reaches a
                // process that does not act (or is stalled) was not acked, and the
                // watchdog sends it again to whoever leads next. A listing an
                // in-process lister dated dies with its process.
                if !self.acting || self.paused_until.is_some() {
                    if let Input::HostEvent { host, event } = input {
                        if !by_controller_lister(&event) {
                            let h = self.index(&host);
                            self.hosts[h].outbox.push(event);
                        }
                    }
                    return Ok(());
                }
                self.deliver(input)?
            }
            Ev::Redeliver(life, input) => {
                if life == self.lifetime {
                    self.deliver(input)?;
                }
            }
            Ev::Queued(life, since, input) => {
                if life == self.lifetime {
                    let waited = self.now - since;
                    match input {
                        Input::Heartbeat(_) => {
                            self.own_load.wait = self.own_load.wait.max(waited);
                        }
                        _ => self.own_load.lateness = waited,
                    }
                    self.deliver_taken(input)?;
                }
            }
            Ev::Heartbeat(h, sent, hb) => {
                if let Some(slow) = self.slow.filter(|s| self.now < s.until && self.acting) {
                    if self.rng.chance(slow.loss) {
                        // Lost by the controller itself before it was read: no ack.
                        self.own_load.lost += 1;
                        return Ok(());
                    }
                }
                // The controller acks what arrives; the ack reaches a host that hears it.
                let w = &self.hosts[h];
                if w.powered
                    && !w.crashed
                    && !w.deaf
                    && !self.isolated
                    && !w.cut_off()
                    && hb.boot_id == w.boot_id
                {
                    let last = self.hosts[h].last_acked.unwrap_or(0);
                    self.hosts[h].last_acked = Some(last.max(sent));
                }
                self.deliver(Input::Heartbeat(hb))?;
            }
            Ev::Answer(h, i, life) => {
                // The watchdog answers after every command it was sent before has
                // finished: a start of this VM still on its way is carried out first.
                let r = self.res[i].r.clone();
                if self.starts_on_way.contains_key(&(h, i)) {
                    self.at(self.now + 50, Ev::Answer(h, i, life));
                } else if life == self.lifetime && self.connected(h) {
                    // A copy that runs there runs there too (its watchdog cannot tell).
                    let runs =
                        self.res[i].instances.contains(&h) || self.res[i].copies.contains(&h);
                    // Nothing answers about a router (the libvirt edge says `None`).
                    let vm = r.kind() == crate::engine::ResourceKind::Vm;
                    let runs = if !vm || self.rng.chance(0.1) {
                        None
                    } else {
                        Some(runs)
                    };
                    self.deliver(Input::HostAnswer {
                        host: self.hosts[h].id.clone(),
                        resource: r,
                        runs,
                    })?;
                }
            }
            Ev::HeartbeatRound => {
                self.at(self.now + 100, Ev::HeartbeatRound);
                for h in 0..self.hosts.len() {
                    self.world_watchdog(h);
                    if self.connected(h) && self.acting && self.paused_until.is_none() {
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
                    }
                    if !self.heartbeats_arrive(h) {
                        continue;
                    }
                    let w = &self.hosts[h];
                    if w.flapping && self.rng.chance(0.6)
                        || self.rng.chance(0.02) && !self.sc.lossless_network
                    {
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
                        received: None,
                        // The world's watchdog powers its host off 2 s after the send
                        // time of its last acked heartbeat; armed once one was acked.
                        self_fence: (self.sc.self_fence
                            && w.last_acked.is_some()
                            && !self.sc.self_fence_broken.get(h).copied().unwrap_or(false))
                        .then_some(Duration::from_secs(2)),
                    };
                    let delay = match w.heartbeat_delay_ms {
                        0 => 0,
                        max => self.rng.range(0, max),
                    };
                    if delay == 0 {
                        self.handle(Ev::Heartbeat(h, self.now, hb))?;
                    } else {
                        self.at(self.now + delay, Ev::Heartbeat(h, self.now, hb));
                    }
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
                                Source::Neutron => ListedAt::Controller(self.engine_now()),
                                _ => ListedAt::Host(self.host_time(h)),
                            };
                            let rbd_only = resources
                                .iter()
                                .filter(|r| {
                                    self.sc.every_vm_claimed_on_rbd || self.sc.rbd_vms.contains(r)
                                })
                                .cloned()
                                .collect();
                            self.hosts[h].outbox.push(HostEvent::Inventory {
                                resources,
                                stopped: vec![],
                                rbd_only,
                                source,
                                at,
                            });
                        }
                        // The watchdog repeats its lease word with every listing.
                        if self.hosts[h].leases_lost.is_some() {
                            let word = self.lease_word(h);
                            self.hosts[h].outbox.push(word);
                        }
                    }
                }
            }
            Ev::Fault(f) => self.fault(f)?,
            Ev::LeasesBack(h) => {
                self.hosts[h].leases_lost = Some(false);
                let word = self.lease_word(h);
                self.hosts[h].outbox.push(word);
            }
            Ev::Unhang(h) => {
                self.hosts[h].hung = false;
            }
            Ev::Unpartition(h, p) => match p {
                Some(p) => self.hosts[h].cut[p as usize] = false,
                None => self.hosts[h].cut = [false; 2],
            },
            Ev::Unisolate => self.isolated = false,
            Ev::Unflap(h) => self.hosts[h].flapping = false,
            Ev::Hear(h) => self.hosts[h].deaf = false,
            Ev::HeartbeatsBack(h) => self.hosts[h].heartbeats_lost = false,
            Ev::HeartbeatsPrompt(h) => self.hosts[h].heartbeat_delay_ms = 0,
            Ev::MaintenanceEnd(h) => {
                self.hosts[h].cut = [false; 2];
                self.later(1_000, 1_000, Ev::MaintenanceOff(h));
            }
            Ev::MaintenanceOff(h) => {
                self.hosts[h].maintenance = false;
                let host = self.hosts[h].id.clone();
                if !self.command(OperatorCommand::MaintenanceOff { host })? {
                    // No leader took it: the operator tries again.
                    self.at(self.now + 500, Ev::MaintenanceOff(h));
                }
            }
            Ev::PowerOn(h) => {
                let w = &mut self.hosts[h];
                w.powered = true;
                w.crashed = false;
                w.hung = false;
                w.boot_id += 1;
                w.outbox.clear();
                w.last_acked = None;
                w.booted_at = self.now;
                self.autostart(h);
            }
            Ev::StopCopy(h, i) => {
                if self.hosts[h].alive() {
                    let r = &mut self.res[i];
                    r.autostart.remove(&h);
                    // A copy that ran on through a storage fence (the host is
                    // blocklisted, not powered off) is destroyed as well.
                    let ran_on = self.hosts[h].blocklisted
                        && r.instances.len() > 1
                        && r.instances.remove(&h);
                    if r.copies.remove(&h) || ran_on {
                        self.report.stale_copies_destroyed += 1;
                        let line = format!(
                            "{:>6} WORLD {} destroyed the copy of {}",
                            self.now, self.hosts[h].id, r.r
                        );
                        self.trace(line);
                    }
                }
            }
            Ev::Exec(a, life, target) => self.exec(a, life, target)?,
            Ev::Lessor
            | Ev::Elect
            | Ev::KeepAlive(_)
            | Ev::KeepAliveArrives(..)
            | Ev::KeepAliveAnswered(..)
            | Ev::Deadline(_)
            | Ev::Wake(_)
            | Ev::ControllerUp(_)
            | Ev::EtcdUp => self.handle_leader(ev)?,
            Ev::Heal => {
                self.healed = true;
                self.isolated = false;
                self.slow = None;
                self.heal_etcd()?;
                for w in &mut self.hosts {
                    if !w.maintenance {
                        w.cut = [false; 2];
                    }
                    w.hung = false;
                    w.flapping = false;
                    w.deaf = false;
                    w.heartbeats_lost = false;
                    w.heartbeat_delay_ms = 0;
                }
            }
        }
        Ok(())
    }

    /// Host `h` booted: its libvirt starts every VM whose definition there has autostart
    /// on and that runs elsewhere now (it was moved off while the host was down): a stale
    /// copy. A VM that runs nowhere is left off: a boot that starts the only copy of a VM
    /// the engine is moving is a hazard no listing can undo in time, and not modelled.
    fn autostart(&mut self, h: usize) {
        for i in 0..self.res.len() {
            let r = &mut self.res[i];
            if r.autostart.contains(&h) && !r.instances.is_empty() && !r.instances.contains(&h) {
                r.copies.insert(h);
                self.report.stale_copies_started += 1;
                let line = format!(
                    "{:>6} WORLD {} autostarted a copy of {} (runs on {:?})",
                    self.now, self.hosts[h].id, r.r, r.instances
                );
                self.trace(line);
            }
        }
    }

    /// The host's self-fence: an armed watchdog (one the controller has acked since
    /// the host booted) powers the host off 2 s after the send time of the last
    /// heartbeat the controller acked (cut off, deaf, its heartbeats lost, or hung).
    pub(super) fn world_watchdog(&mut self, h: usize) {
        if !self.sc.self_fence || self.sc.self_fence_broken.get(h).copied().unwrap_or(false) {
            // A self-fence that cannot kill does nothing (and says "not armed").
            return;
        }
        let w = &self.hosts[h];
        if !w.powered || w.crashed {
            return;
        }
        if w.maintenance {
            // Disarmed for planned work, armed again once acked.
            self.hosts[h].last_acked = None;
            return;
        }
        if w.last_acked.is_some_and(|t| self.now >= t + 2_000) {
            self.trace(format!(
                "{:>6} WORLD {} self-fenced (no ack for 2 s)",
                self.now, self.hosts[h].id
            ));
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
        w.last_acked = None;
        for r in &mut self.res {
            r.instances.remove(&h);
            r.copies.remove(&h);
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
                        r.copies.remove(&host);
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
                // Taken (and written) by a leader, or the operator does not start.
                let taken = self.command(OperatorCommand::MaintenanceOn { host: id.clone() })?;
                if taken && self.engine.host_state(&id) == Some(HostState::Maintenance) {
                    self.hosts[host].maintenance = true;
                    self.hosts[host].cut = [true; 2];
                    self.at(self.now + for_ms, Ev::MaintenanceEnd(host));
                }
            }
            Fault::ControllerRestart => {
                // The leader's process is restarted (systemd, an upgrade): it stops
                // acting, gives its lease back if it reaches etcd (a follower takes the
                // lead at once), and starts again as a follower.
                let c = self.leader;
                if self.ctls[c].up {
                    self.step_down(StepDown::Restart)?;
                    self.kill_process(c);
                }
            }
            Fault::LeaderKilled
            | Fault::LeaderCutFromEtcd { .. }
            | Fault::EtcdDown { .. }
            | Fault::KeepAliveDelay { .. }
            | Fault::LeaderStall { .. } => self.leader_fault(f)?,
            Fault::BmcBroken { host } => self.hosts[host].bmc_broken = true,
            Fault::LeaseDaemonDies { host, for_ms } => {
                if self.hosts[host].alive() && self.hosts[host].leases_lost != Some(true) {
                    self.report.lease_daemon_deaths += 1;
                    self.hosts[host].leases_lost = Some(true);
                    let word = self.lease_word(host);
                    self.hosts[host].outbox.push(word);
                    self.at(self.now + for_ms, Ev::LeasesBack(host));
                }
            }
            Fault::HostDeaf { host, for_ms } => {
                self.hosts[host].deaf = true;
                self.at(self.now + for_ms, Ev::Hear(host));
            }
            Fault::HeartbeatsLost { host, for_ms } => {
                self.hosts[host].heartbeats_lost = true;
                self.at(self.now + for_ms, Ev::HeartbeatsBack(host));
            }
            Fault::HeartbeatDelay {
                host,
                for_ms,
                max_ms,
            } => {
                self.hosts[host].heartbeat_delay_ms = max_ms;
                self.at(self.now + for_ms, Ev::HeartbeatsPrompt(host));
            }
            Fault::ControllerSlow {
                for_ms,
                lag_ms,
                loss_pct,
            } => {
                self.slow = Some(Slow {
                    until: self.now + for_ms,
                    lag_ms,
                    loss: loss_pct as f64 / 100.0,
                });
            }
        }
        self.check_world()
    }

    /// A patient operator: unfences a recovered host once it is back and clean. Under
    /// the automatic policy, a fake Nova instead reports a recovered host's compute
    /// service while the host runs, on every round, and the engine decides.
    pub(super) fn sim_operator(&mut self) -> Result<(), Box<Violation>> {
        if !self.acting || self.paused_until.is_some() {
            // Nobody leads: the operator waits.
            return Ok(());
        }
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
            } else if self.connected(h)
                && !self.unfence_asked.contains(&h)
                && self.command(OperatorCommand::Unfence { host: id })?
            {
                self.unfence_asked.insert(h);
            }
        }
        Ok(())
    }

    /// The engine's clock now (the controller's wall clock as its current process
    /// reckons it).
    pub(super) fn engine_now(&self) -> Timestamp {
        Timestamp((self.now as i64 + self.engine_offset_ms) as u64)
    }

    /// Simulated time at which the engine's clock reads `at` (never in the past).
    pub(super) fn sim_time_at(&self, at: Timestamp) -> u64 {
        ((at.0 as i64 - self.engine_offset_ms).max(self.now as i64)) as u64
    }

    /// A new leader's engine clock: its wall clock may be off the former leader's (or,
    /// the same process restarted, stepped while it was down); it starts no earlier than
    /// the latest time in the store, as `EngineClock::start_not_before` does.
    pub(super) fn step_controller_clock(&mut self) {
        let i = self.report.leader_changes as usize - 1;
        let step = self
            .sc
            .controller_clock_steps_ms
            .get(i)
            .copied()
            .unwrap_or(0);
        let wall = self.engine_now().0 as i64 + step;
        let latest = crate::clock::latest_in_log(&self.log).map_or(0, |t| t.0 as i64);
        let start = wall.max(latest + 1);
        self.engine_offset_ms = start - self.now as i64;
        if step != 0 {
            self.trace(format!(
                "{:>6} CLOCK stepped {step:+} ms; engine starts at {start}",
                self.now
            ));
        }
    }

    /// Host `h`'s own clock now (a plausible unix time, off by its scenario offset and
    /// drifting by its scenario drift).
    pub(super) fn host_time(&self, h: usize) -> HostTime {
        let offset = self.sc.clock_offsets_ms.get(h).copied().unwrap_or(0);
        let ppm = self.sc.clock_drift_ppm.get(h).copied().unwrap_or(0);
        let drift = self.now as i64 * ppm / 1_000_000;
        HostTime((HOST_EPOCH_MS + self.now as i64 + offset + drift) as u64)
    }

    /// An operator's command; a refusal changes nothing (it is traced). Returns whether
    /// a leader took it and still acts after it (its writes went through): the operator
    /// knows that much.
    pub(super) fn command(&mut self, cmd: OperatorCommand) -> Result<bool, Box<Violation>> {
        if !self.acting || self.paused_until.is_some() {
            return Ok(false);
        }
        self.trace(format!("{:>6} CMD {cmd:?}", self.now));
        match self.engine.command(self.engine_now(), cmd) {
            Ok(actions) => {
                self.report.steps += 1;
                self.apply_actions(actions)?;
                self.check_engine()?;
                Ok(self.acting && self.paused_until.is_none())
            }
            Err(refusal) => {
                self.trace(format!("{:>6} REFUSED {refusal}", self.now));
                Ok(true)
            }
        }
    }

    pub(super) fn deliver(&mut self, input: Input) -> Result<(), Box<Violation>> {
        if !self.acting {
            // Lost with the term that stopped (what it had persisted is in the log).
            return Ok(());
        }
        if let Some(until) = self.paused_until {
            // A stalled process reads nothing until it runs again: heartbeats overflow
            // its socket buffer (the kernel counts them); a watchdog's events go back to
            // the host, which sends them again; the rest waits (a timer fires late).
            match input {
                Input::Heartbeat(_) => self.own_load.lost += 1,
                input @ Input::Timer(_) => {
                    self.own_load.lateness = self.own_load.lateness.max(until - self.now);
                    self.at(until, Ev::Redeliver(self.lifetime, input));
                }
                Input::HostEvent { host, event } if !by_controller_lister(&event) => {
                    let h = self.index(&host);
                    self.hosts[h].outbox.push(event);
                }
                input => self.at(until, Ev::Redeliver(self.lifetime, input)),
            }
            return Ok(());
        }
        if let Some(slow) = self.slow.filter(|s| self.now < s.until) {
            // Heartbeats and timers wait their turn in order behind the backlog; some
            // heartbeats the controller loses itself (not acked: see Ev::Heartbeat).
            match input {
                Input::Heartbeat(mut hb) => {
                    hb.received = Some(self.engine_now());
                    let at = self.now + slow.lag_ms;
                    self.at(
                        at,
                        Ev::Queued(self.lifetime, self.now, Input::Heartbeat(hb)),
                    );
                    return Ok(());
                }
                input @ Input::Timer(_) => {
                    let at = self.now + slow.lag_ms;
                    self.at(at, Ev::Queued(self.lifetime, self.now, input));
                    return Ok(());
                }
                _ => {}
            }
        }
        self.deliver_taken(input)
    }

    /// The engine takes `input` now (after any queue it waited in); before a timer, the
    /// runtime reports the controller's own load, as `EngineTask::on_timer` does.
    pub(super) fn deliver_taken(&mut self, input: Input) -> Result<(), Box<Violation>> {
        if !self.acting {
            // Lost with the term that stopped.
            return Ok(());
        }
        if self.paused_until.is_some() {
            // Queued across a stall: the stalled process takes it as it takes anything
            // then (a heartbeat lost, a timer late, the rest when it runs again).
            return self.deliver(input);
        }
        if matches!(input, Input::Timer(_)) && self.now >= self.own_load.reported_at + 50 {
            let report = self.own_load.report(self.now);
            let actions = self.engine.step(self.engine_now(), Input::Load(report));
            self.report.steps += 1;
            self.apply_actions(actions)?;
            self.check_engine()?;
            if !self.acting {
                return Ok(());
            }
        }
        if !matches!(input, Input::Heartbeat(_) | Input::Timer(_)) {
            self.trace(format!("{:>6} IN  {input:?}", self.now));
        }
        if let Input::HostEvent {
            host,
            event:
                HostEvent::DiskLeases {
                    daemon_running,
                    unprotected,
                    ..
                },
        } = &input
        {
            let lost = !daemon_running || !unprotected.is_empty();
            let h = self.index(host);
            self.lease_words_taken.insert(h, lost);
        }
        let actions = self.engine.step(self.engine_now(), input);
        self.report.steps += 1;
        self.apply_actions(actions)?;
        self.check_engine()
    }

    /// What host `h`'s watchdog says of its leases now: with its daemon dead, every
    /// VM it runs is unprotected.
    pub(super) fn lease_word(&self, h: usize) -> HostEvent {
        let lost = self.hosts[h].leases_lost == Some(true);
        HostEvent::DiskLeases {
            daemon_running: !lost,
            unprotected: if lost {
                self.listing(h, false)
                    .into_iter()
                    .filter(|r| r.kind() == crate::engine::ResourceKind::Vm)
                    .collect()
            } else {
                Vec::new()
            },
            reason: if lost {
                "virtlockd killed".into()
            } else {
                "virtlockd runs".into()
            },
        }
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

/// A listing an in-process lister (Nova's, Neutron's) dated on its controller's clock:
/// it dies with the process or term that took it.
pub(super) fn by_controller_lister(e: &HostEvent) -> bool {
    matches!(
        e,
        HostEvent::Inventory {
            at: ListedAt::Controller(_),
            ..
        }
    )
}
