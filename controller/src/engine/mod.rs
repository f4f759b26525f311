//! The incident engine: pure, sans-IO. Inputs in, actions out, the clock passed in.
//!
//! ```text
//! Engine::start(now)                  -> Vec<Action>   (arms the first tick)
//! Engine::step(&mut self, now, input) -> Vec<Action>
//! Engine::command(&mut self, now, op) -> Result<Vec<Action>, Refusal>
//! Engine::resume(cfg, &log, now)      -> (Engine, Vec<Action>)
//! ```
//!
//! One file per job: `ids` (identifiers, the controller's [`Timestamp`] and a host's
//! [`HostTime`]), `types` (inputs, actions, views), `intent` (intents and their keys),
//! `state` (the two state machines), [`detector`], `config`; the engine's
//! own rooms are `entries` (what it keeps per host and resource), `book` (incidents,
//! ownership, timelines, alarms), `hosts` (heartbeats, the tick, the gate,
//! confirmation), `host_events` (exits, stalls, inventories), `copies` (stale copies of
//! moved VMs destroyed on the host they left), `operator` (commands and
//! the automatic unfence), `reconcile` (the decisions that move incidents on) and
//! `replay` (issuing and completing intents, and resuming from the log).
//!
//! The runtime feeds heartbeats, host events, timers and effector results in, and
//! carries the returned [`Action`]s out **in order**: store writes
//! ([`Action::PersistIntent`] before the action it records), edge calls
//! ([`crate::edges::dispatch`]), timers, timeline lines and alarms. Nothing in here reads a
//! clock, sleeps, does I/O or draws random numbers.
//!
//! # States
//!
//! Host ([`HostState`]):
//!
//! ```text
//!  Up ──silent (detector)──► Suspect ──silent ≥ confirm_after──► Confirming ──Dead / Unknown & long silence──► Fencing
//!   ▲                          │                                   │  (gates open)                           │ verified
//!   └──── heartbeat again ─────┴───────────────────────────────────┘                                        ▼
//!   ▲                                                                          Recovered ◄── Evacuating ◄── Fenced
//!   └──────────────────────── operator Unfence (host clean) ──────────────────────┘   (all restored)  (forced down)
//!  Up/Suspect/Confirming ◄──► Maintenance (operator; planned work is not a failure)
//!  Recovered ──► Evacuating: Neutron lists the fenced host's routers late (it was
//!                unreachable at force-down); the same incident reopens to move them
//! ```
//!
//! Resource ([`ResourceState`], the same machine for VMs and routers):
//! `Running → Failed → RestartingInPlace (≤ N tries in a window) → Evacuating → Running | GaveUp`.
//! Routers skip restart-in-place ([`ResourceKind::restarts_in_place`]). A host incident
//! takes the resources on its host straight to `Evacuating` once the fence is verified.
//!
//! # Rules
//!
//! 1. **One owner per resource.** An incident owns resources: a resource incident owns
//!    its resource; a host incident owns what ran on the host when the fence was decided.
//!    A host incident supersedes resource incidents on its host (their in-flight
//!    results are recorded and ignored). A crash seen on a host with an open host
//!    incident is folded into it (timeline only); if the host comes back `Up` the folded
//!    crashes are handed to fresh resource incidents. A resource already being
//!    evacuated away by its own incident stays with that incident.
//! 2. **No restore before a verified fence.** Resources of a host incident are
//!    evacuated only after a [`FenceOutcome::Verified`] (IPMI power off, Pacemaker
//!    fencing history, or, opt-in, the self-fence deadline passed: the host's last
//!    heartbeat said its watchdog is armed, and the controller has not heard it for the
//!    timeout that heartbeat carried plus `self_fence_margin`) and a successful
//!    force-down. An unverified or failed fence raises an alarm and is retried (at most
//!    `max_fence_attempts`), never followed by a restore. The edges verify a fence only
//!    with evidence tied to that attempt (`edges::fence`).
//!    Evidence can still lie (a BMC answering off for a host that stays on), so a
//!    power fence (IPMI, Pacemaker) also has to agree with the heartbeats: a host heard
//!    from the watchdog process (boot id and incarnation) heard when the verification
//!    came in is held (nothing restored) until it falls silent, and one heard from it
//!    *after* the verification was never powered off: [`AlarmKind::FenceContradicted`],
//!    nothing more of it is restored (an operator decides). A new boot id means it was
//!    powered off and came back. A self-fence kills the VMs, not the host: its watchdog
//!    going on is expected and not held.
//! 3. **Intents.** Every world-changing action is preceded by [`Action::PersistIntent`]
//!    with a key derived from meaning (`i4/fence-1/host:cmp-07`), and results complete
//!    it ([`Action::CompleteIntent`]). [`Engine::resume`] replays the log: it rebuilds
//!    open incidents, re-hands open intents to the edges (which deduplicate by key) and
//!    never issues a key that exists in the log.
//! 4. **Safety gates.** If more than `max_dead_share` of the hosts (not in maintenance,
//!    not recovered) look dead at once, or the controller hears no host at all, no new
//!    fence is issued and an alarm ([`AlarmKind::MassFailure`],
//!    [`AlarmKind::ControllerIsolated`]) is raised; fencing resumes when the gate
//!    clears. A single-host cloud therefore never fences.
//! 5. **Unfence.** A fenced host that heartbeats again is not trusted (alarm) until an
//!    operator unfences it, which is refused while it reports resources that now run
//!    elsewhere. A VM the engine moved off it that it runs again (libvirt autostart) is
//!    destroyed there and its autostart turned off ([`Action::StopStaleCopy`]), when it
//!    lists it, when the move completes and when it is unfenced.
//!
//! Events about the same resource are one incident: while an incident owns the
//! resource, later events (e.g. libvirt after eBPF) only enrich its timeline; events
//! that happened before the resource was last restored, or that come from a host the
//! resource no longer runs on, are late and ignored. A watchdog inventory that no
//! longer lists a resource counts as its exit (a safety net for lost events).
//! A disk stall of a resource nobody owns is an incident of its own that records the
//! stall's start and end and acts on nothing.
//!
//! # Defaults
//!
//! See [`Config`]: heartbeat every 100 ms, Suspect after 3 missed (300 ms) on every
//! path, Confirming after 500 ms of silence, confirmation timeout 2 s, fence on a `Dead`
//! answer at once or on `Unknown` after 3 s of silence, 3 fence tries 2 s apart,
//! restart in place ≤ 3 times in 10 minutes, 3 evacuation tries, correlation window
//! 5 s, gate at more than half of the hosts dead, tick every 50 ms, self-fence off.

mod book;
mod config;
mod copies;
mod deadlines;
pub mod detector;
mod entries;
mod host_events;
mod hosts;
mod ids;
mod intent;
pub mod load;
mod operator;
mod reconcile;
mod replay;
mod state;
mod types;
mod unanswered;
mod unsure;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use detector::{Detector, Liveness};
use entries::{
    Gate, HeldExit, HostClock, HostEntry, Known, LeaseWord, ResourceEntry, Restored, MAX_HELD_EXITS,
};
use unsure::Tried;

pub use book::Incident;
pub use config::Config;
pub use ids::*;
pub use intent::{
    Completion, Intent, IntentEntry, IntentKey, IntentLog, IntentOutcome, IntentRecord, KeyScope,
    MemoryIntentLog,
};
pub use state::{HostState, IllegalTransition, Machine, ResourceState};
pub use types::*;

/// The incident engine. See the module docs for the states and rules.
#[derive(Clone, Debug)]
pub struct Engine {
    cfg: Config,
    detector: Detector,
    now: Timestamp,
    /// When the periodic work (gates, confirmations, retries) is next due.
    next_tick_at: Option<Timestamp>,
    /// The timer asked of the runtime and not yet fired: the earlier of the periodic
    /// tick and the first host deadline.
    armed_at: Option<Timestamp>,
    /// Up hosts' silence deadlines (deadlines.rs).
    deadlines: deadlines::Deadlines,
    /// The controller's own load (load.rs).
    load: load::SelfLoad,
    hosts: BTreeMap<HostId, HostEntry>,
    resources: BTreeMap<Resource, ResourceEntry>,
    incidents: BTreeMap<IncidentId, Incident>,
    /// Closed incidents in the order they closed: the oldest beyond
    /// [`Config::closed_incidents_kept`] are forgotten (the store keeps them all).
    closed: std::collections::VecDeque<IncidentId>,
    /// The length of `closed` at which the next forgetting runs.
    forget_at: usize,
    /// Closed incidents forgotten since start or resume.
    forgotten: u64,
    next_incident: u64,
    intents: BTreeMap<IntentKey, Known>,
    /// Open disk-stall incidents: a stall of a resource no other incident owns is an
    /// incident of its own (observed, not acted on: restarting a VM whose storage hangs
    /// cures nothing), closed when the stall ends.
    stalls: BTreeMap<Resource, IncidentId>,
    gate: Gate,
    /// Evacuations sent and not answered: held until the hosts that may run them say.
    unsure: BTreeMap<Resource, unsure::Unsure>,
    /// Open intents whose action was handed to an edge, and when (unanswered.rs).
    handed: BTreeMap<IntentKey, Timestamp>,
    /// Open intents handed to their edge again (at resume, or by the backstop): an
    /// earlier hand of the same key may have taken effect unheard (unanswered.rs).
    rehanded: BTreeSet<IntentKey>,
    /// Hosts an earlier controller process heard from (the store's event streams),
    /// handed in at resume: an evacuation whose target was forgotten may run on any.
    hosts_in_store: BTreeSet<HostId>,
    replaying: bool,
    /// Per incident, how many lines at the head of its timeline the replay rebuilt at
    /// resume (never recorded again: the store holds the originals, which
    /// [`Engine::restore_timeline`] puts in their place).
    replayed_lines: BTreeMap<IncidentId, usize>,
    out: Vec<Action>,
    revision: u64,
}

impl Engine {
    /// A fresh engine with no history.
    pub fn new(cfg: Config) -> Self {
        let forget_at = cfg.closed_incidents_kept + cfg.closed_incidents_kept / 2;
        Engine {
            detector: Detector::new(cfg.detector.clone()),
            cfg,
            now: Timestamp::ZERO,
            next_tick_at: None,
            armed_at: None,
            deadlines: deadlines::Deadlines::default(),
            load: load::SelfLoad::default(),
            hosts: BTreeMap::new(),
            resources: BTreeMap::new(),
            incidents: BTreeMap::new(),
            closed: std::collections::VecDeque::new(),
            forget_at,
            forgotten: 0,
            next_incident: 1,
            intents: BTreeMap::new(),
            stalls: BTreeMap::new(),
            gate: Gate::default(),
            unsure: BTreeMap::new(),
            handed: BTreeMap::new(),
            rehanded: BTreeSet::new(),
            hosts_in_store: BTreeSet::new(),
            replaying: false,
            replayed_lines: BTreeMap::new(),
            out: Vec::new(),
            revision: 0,
        }
    }

    /// Arms the first tick. Call once after [`Engine::new`].
    pub fn start(&mut self, now: Timestamp) -> Vec<Action> {
        self.now = self.now.max(now);
        self.arm_tick();
        self.arm_timer();
        std::mem::take(&mut self.out)
    }

    /// One step: take in `input` at `now`, return the actions to carry out in order.
    pub fn step(&mut self, now: Timestamp, input: Input) -> Vec<Action> {
        self.now = self.now.max(now);
        let mut reconcile = true;
        match input {
            Input::Heartbeat(hb) => {
                // Only a heartbeat that moved a host (back to Up) needs a reconcile; a
                // first heartbeat that merely registers a host waits for the next tick,
                // which always reconciles. With thousands of hosts starting at once, a
                // reconcile per registration would cost O(hosts²).
                reconcile = self.on_heartbeat(hb);
            }
            Input::HostEvent { host, event } => self.on_host_event(host, event),
            Input::HostAnswer {
                host,
                resource,
                runs,
            } => self.on_host_answer(&host, &resource, runs),
            Input::Timer(TimerId::Tick) => self.on_tick(),
            Input::Load(load) => {
                self.on_load(load);
                reconcile = false;
            }
            Input::ConfirmationResult {
                host,
                source,
                verdict,
            } => self.on_confirmation(host, source, verdict),
            Input::FenceResult { key, outcome, .. } => {
                self.complete(&key, IntentOutcome::Fence(outcome));
            }
            Input::HostActionResult { key, outcome, .. }
            | Input::RestoreResult { key, outcome, .. } => {
                let outcome = self.rehanded_outcome(&key, outcome);
                self.complete(&key, IntentOutcome::Restore(outcome));
            }
        }
        if reconcile {
            self.reconcile();
        }
        self.arm_timer();
        std::mem::take(&mut self.out)
    }

    /// An operator's command at `now`: the actions that carry it out, or why it is
    /// refused (then nothing changed and nothing is to be done).
    pub fn command(
        &mut self,
        now: Timestamp,
        cmd: OperatorCommand,
    ) -> Result<Vec<Action>, Refusal> {
        self.now = self.now.max(now);
        // Refused, nothing changed, and nothing is reconciled either: what a reconcile
        // issued would be dropped with the refusal (recorded as handed out, never
        // persisted nor carried out). The next tick reconciles.
        self.on_operator(cmd)?;
        self.reconcile();
        self.arm_timer();
        Ok(std::mem::take(&mut self.out))
    }

    // ---------------------------------------------------------------- read-only views

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The controller's own load as last reported (load.rs).
    pub fn self_load(&self) -> &load::SelfLoad {
        &self.load
    }

    /// The failure detector (per-path last-seen times).
    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// The latest `now` the engine has seen.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Bumped on every state change (hosts, resources, incidents, intents).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A host's state.
    pub fn host_state(&self, host: &HostId) -> Option<HostState> {
        self.hosts.get(host).map(|h| h.state)
    }

    /// A resource's state.
    pub fn resource_state(&self, r: &Resource) -> Option<ResourceState> {
        self.resources.get(r).map(|e| e.state)
    }

    /// Every host.
    pub fn hosts(&self) -> Vec<HostView> {
        self.hosts
            .iter()
            .map(|(h, e)| HostView {
                host: h.clone(),
                state: e.state,
                incident: e.incident,
                last_seen: self.detector.last_seen(h),
                evacuated: e.evacuated.iter().cloned().collect(),
                back: self.is_back(h),
                not_a_target: e.leases.as_ref().and_then(LeaseWord::lost),
                unprotected: e
                    .leases
                    .as_ref()
                    .map(|l| l.unprotected.iter().cloned().collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Every resource.
    pub fn resources(&self) -> Vec<ResourceView> {
        self.resources
            .iter()
            .map(|(r, e)| ResourceView {
                resource: r.clone(),
                host: e.host.clone(),
                state: e.state,
                owner: e.owner,
            })
            .collect()
    }

    /// One resource.
    pub fn resource(&self, r: &Resource) -> Option<ResourceView> {
        self.resources.get(r).map(|e| ResourceView {
            resource: r.clone(),
            host: e.host.clone(),
            state: e.state,
            owner: e.owner,
        })
    }

    /// Every incident the engine remembers: the open ones, and the last
    /// [`Config::closed_incidents_kept`] closed (more while something still refers to
    /// them, such as a host's last incident).
    pub fn incidents(&self) -> impl Iterator<Item = &Incident> {
        self.incidents.values()
    }

    /// Closed incidents forgotten (beyond [`Config::closed_incidents_kept`]) since this
    /// engine started or resumed.
    pub fn incidents_forgotten(&self) -> u64 {
        self.forgotten
    }

    /// One incident.
    pub fn incident(&self, id: IncidentId) -> Option<&Incident> {
        self.incidents.get(&id)
    }

    /// The open incident of a host.
    pub fn host_incident(&self, host: &HostId) -> Option<IncidentId> {
        self.hosts.get(host).and_then(|h| h.incident)
    }

    /// For each open incident, the resources it claims: a resource incident claims its
    /// resource, a host incident what it owns. The invariant "one owner per resource"
    /// is that no resource is claimed twice.
    pub fn claims(&self) -> Vec<(IncidentId, Resource)> {
        let mut out = Vec::new();
        for inc in self.incidents.values() {
            if inc.closed_at.is_some() {
                continue;
            }
            match &inc.subject {
                Subject::Resource(r) => out.push((inc.id, r.clone())),
                Subject::Host(h) => {
                    if let Some(he) = self.hosts.get(h) {
                        for r in &he.owned {
                            if self.resources.get(r).and_then(|e| e.owner) == Some(inc.id) {
                                out.push((inc.id, r.clone()));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Whether the engine holds a host back with an alarm (gate, failed or unverified
    /// fence, alive-but-silent): nothing will be restored from it without a human or
    /// a change in the world.
    pub fn host_alarmed(&self, host: &HostId) -> bool {
        self.hosts.get(host).is_some_and(|h| !h.alarmed.is_empty()) || !self.gate.open()
    }

    /// The intent keys known to this engine (from the log and issued since), with done
    /// flags.
    pub fn known_intents(&self) -> impl Iterator<Item = (&IntentKey, bool)> {
        self.intents.iter().map(|(k, v)| (k, v.done))
    }

    // ---------------------------------------------------------------- helpers

    /// Who restores a resource of this kind (a timeline source).
    fn source_for(&self, r: &Resource) -> Source {
        match r.kind() {
            ResourceKind::Vm => self.cfg.vm_restorer,
            ResourceKind::Router => Source::Neutron,
        }
    }

    fn bump(&mut self) {
        self.revision += 1;
    }

    /// Schedules the next periodic tick.
    fn arm_tick(&mut self) {
        self.next_tick_at = Some(self.now + self.cfg.tick);
    }

    /// Asks the runtime for a timer at the earlier of the periodic tick and the first
    /// host deadline, unless one at least that early is armed already (one
    /// [`Action::ArmTimer`] per change, not per step).
    fn arm_timer(&mut self) {
        let want = match (self.next_tick_at, self.deadlines.next()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(t) => t,
                None => return,
            },
        };
        if self.armed_at.is_some_and(|armed| armed <= want) {
            return;
        }
        self.armed_at = Some(want);
        self.out.push(Action::ArmTimer {
            id: TimerId::Tick,
            at: want,
        });
    }

    fn ensure_host(&mut self, host: &HostId) {
        if !self.hosts.contains_key(host) {
            self.hosts.insert(host.clone(), HostEntry::new());
            self.detector.register(host, self.now);
            self.queue_deadline(host);
            self.bump();
        }
    }

    /// A resource the engine hears of for the first time is known on `host`.
    fn ensure_resource(&mut self, r: &Resource, host: &HostId) {
        if !self.resources.contains_key(r) {
            self.resources
                .insert(r.clone(), ResourceEntry::new(host.clone()));
            self.bump();
        }
    }
}

#[cfg(test)]
mod tests;
