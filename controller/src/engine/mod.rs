//! The incident engine: pure, sans-IO. Inputs in, actions out, the clock passed in.
//!
//! ```text
//! Engine::start(now)                  -> Vec<Action>   (arms the first tick)
//! Engine::step(&mut self, now, input) -> Vec<Action>
//! Engine::resume(cfg, &log, now)      -> (Engine, Vec<Action>)
//! ```
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
//!    fencing history, or, opt-in, the self-fence deadline passed with the watchdog
//!    armed) and a successful force-down. An unverified or failed fence raises an alarm
//!    and is retried (at most `max_fence_attempts`), never followed by a restore.
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
//!    elsewhere.
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

mod config;
pub mod detector;
mod ids;
mod intent;
mod state;
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use detector::{Detector, Liveness};

pub use config::Config;
pub use ids::*;
pub use intent::{
    Completion, Intent, IntentEntry, IntentKey, IntentLog, IntentOutcome, IntentRecord, KeyScope,
    MemoryIntentLog,
};
pub use state::{HostState, IllegalTransition, Machine, ResourceState};
pub use types::*;

/// An incident and its timeline.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Incident {
    /// Its id.
    pub id: IncidentId,
    /// The host or resource it is about.
    pub subject: Subject,
    /// Opened at.
    pub opened_at: Timestamp,
    /// Closed at (`None` while open).
    pub closed_at: Option<Timestamp>,
    /// Every transition and note, in order.
    pub timeline: Vec<TimelineEntry>,
}

#[derive(Clone, Debug)]
struct HostEntry {
    state: HostState,
    incident: Option<IncidentId>,
    boot_id: Option<u64>,
    self_fence_armed: bool,
    confirm_asked_at: Option<Timestamp>,
    awaiting_confirmation: bool,
    verdict: Option<(Verdict, Source)>,
    /// Fence tries of the current incident.
    fence: Retry,
    fenced_by: Option<FenceVerifier>,
    fenced_at: Option<Timestamp>,
    /// Force-down tries of the current incident.
    force_down: Retry,
    owned: BTreeSet<Resource>,
    folded: BTreeSet<Resource>,
    stale: BTreeSet<Resource>,
    alarmed: BTreeSet<AlarmKind>,
    /// The host incident that ended in `Recovered`: a source listing resources of the
    /// fenced host late (Neutron was unreachable at force-down) reopens it.
    last_incident: Option<IncidentId>,
    /// Resources restored elsewhere by this host's incidents since its fence, until it
    /// is unfenced: what its data plane may still hold (the stale-router report). Kept
    /// here, not in the router restorer, so that it is rebuilt from the intent log.
    evacuated: BTreeSet<Resource>,
    /// A heartbeat was received after the verified fence (controller clock): the host
    /// is back, and waits to be trusted again.
    heard_since_fence: bool,
    /// The host's own clock as the controller reckons it from its heartbeats: a restore
    /// onto this host is dated with it, so that the host's later news can be told from
    /// its earlier news without comparing its clock with the controller's.
    clock: Option<HostClock>,
    /// Resources restored onto this host while its clock was unknown: the next
    /// heartbeat dates their restore.
    undated: BTreeSet<Resource>,
}

impl HostEntry {
    fn new() -> Self {
        HostEntry {
            state: HostState::Up,
            incident: None,
            boot_id: None,
            self_fence_armed: false,
            confirm_asked_at: None,
            awaiting_confirmation: false,
            verdict: None,
            fence: Retry::default(),
            fenced_by: None,
            fenced_at: None,
            force_down: Retry::default(),
            owned: BTreeSet::new(),
            folded: BTreeSet::new(),
            stale: BTreeSet::new(),
            alarmed: BTreeSet::new(),
            last_incident: None,
            evacuated: BTreeSet::new(),
            heard_since_fence: false,
            clock: None,
            undated: BTreeSet::new(),
        }
    }

    /// Forget everything about the (closed) host incident.
    fn clear_incident(&mut self) {
        let keep = (
            self.state,
            self.boot_id,
            self.self_fence_armed,
            std::mem::take(&mut self.stale),
            self.last_incident,
            std::mem::take(&mut self.evacuated),
            self.clock,
            std::mem::take(&mut self.undated),
        );
        *self = HostEntry::new();
        (
            self.state,
            self.boot_id,
            self.self_fence_armed,
            self.stale,
            self.last_incident,
            self.evacuated,
            self.clock,
            self.undated,
        ) = keep;
    }
}

/// A host action that is retried (a fence, a force-down): tries so far, the one in
/// flight, and when the next may start.
#[derive(Clone, Debug, Default)]
struct Retry {
    attempts: u32,
    in_flight: Option<IntentKey>,
    next_at: Timestamp,
}

#[derive(Clone, Debug)]
struct ResourceEntry {
    host: HostId,
    state: ResourceState,
    owner: Option<IncidentId>,
    in_flight: Option<IntentKey>,
    /// Resource-level intents issued under the current owner (key step counter).
    steps: u32,
    restarts: Vec<Timestamp>,
    /// When it was last started again (in place or elsewhere).
    restored: Option<Restored>,
    /// The incident opened by the last failure, and when that failure happened (on the
    /// clock of whoever saw it): a second account of the same failure (libvirt after
    /// eBPF) that arrives after the incident has ended still belongs to its timeline.
    last_failure: Option<(IncidentId, ListedAt)>,
}

/// A host's clock as the controller reckons it: a reading heard from the host, and when
/// (controller clock) it was heard. The reading plus the controller's own time since is
/// a lower bound of the host's clock now (the reading was on its way for a while), and
/// no host clock is ever compared with the controller's.
#[derive(Clone, Copy, Debug)]
struct HostClock {
    read: HostTime,
    heard_at: Timestamp,
}

impl HostClock {
    fn at(&self, now: Timestamp) -> HostTime {
        let since = u64::try_from(now.since(self.heard_at).as_millis()).unwrap_or(u64::MAX);
        HostTime(self.read.0.saturating_add(since))
    }
}

/// When a resource was last restored, on both clocks that may date news about it: the
/// controller's, and its host's as last heard at that moment (unknown until the host is
/// heard). The line between news from before the restore (late) and after it.
#[derive(Clone, Copy, Debug)]
struct Restored {
    at: Timestamp,
    host_clock: Option<HostTime>,
}

impl ResourceEntry {
    fn new(host: HostId) -> Self {
        ResourceEntry {
            host,
            state: ResourceState::Running,
            owner: None,
            in_flight: None,
            steps: 0,
            restarts: Vec::new(),
            restored: None,
            last_failure: None,
        }
    }

    /// News dated `t` happened before the resource's last restore. Each clock is
    /// compared only with itself; news whose clock the restore has no date on (its host
    /// was not heard yet) is not late.
    fn before_restore(&self, t: ListedAt) -> bool {
        match (self.restored, t) {
            (None, _) => false,
            (Some(r), ListedAt::Controller(at)) => at < r.at,
            (Some(r), ListedAt::Host(at)) => r.host_clock.is_some_and(|c| at < c),
        }
    }

    /// News dated `t` is newer than the resource's last restore (never true while the
    /// restore has no date on that clock: a listing of unknown age does not undo it).
    fn after_restore(&self, t: ListedAt) -> bool {
        match (self.restored, t) {
            (None, _) => true,
            (Some(r), ListedAt::Controller(at)) => at > r.at,
            (Some(r), ListedAt::Host(at)) => r.host_clock.is_some_and(|c| at > c),
        }
    }
}

#[derive(Clone, Debug)]
struct Known {
    record: IntentRecord,
    done: bool,
}

#[derive(Clone, Debug, Default)]
struct Gate {
    isolated: bool,
    mass: bool,
}

impl Gate {
    fn open(&self) -> bool {
        !self.isolated && !self.mass
    }
}

/// The incident engine. See the module docs for the states and rules.
#[derive(Clone, Debug)]
pub struct Engine {
    cfg: Config,
    detector: Detector,
    now: Timestamp,
    next_tick_at: Option<Timestamp>,
    hosts: BTreeMap<HostId, HostEntry>,
    resources: BTreeMap<Resource, ResourceEntry>,
    incidents: BTreeMap<IncidentId, Incident>,
    next_incident: u64,
    intents: BTreeMap<IntentKey, Known>,
    /// Open disk-stall incidents: a stall of a resource no other incident owns is an
    /// incident of its own (observed, not acted on: restarting a VM whose storage hangs
    /// cures nothing), closed when the stall ends.
    stalls: BTreeMap<Resource, IncidentId>,
    gate: Gate,
    replaying: bool,
    out: Vec<Action>,
    revision: u64,
}

impl Engine {
    /// A fresh engine with no history.
    pub fn new(cfg: Config) -> Self {
        Engine {
            detector: Detector::new(cfg.detector.clone()),
            cfg,
            now: Timestamp::ZERO,
            next_tick_at: None,
            hosts: BTreeMap::new(),
            resources: BTreeMap::new(),
            incidents: BTreeMap::new(),
            next_incident: 1,
            intents: BTreeMap::new(),
            stalls: BTreeMap::new(),
            gate: Gate::default(),
            replaying: false,
            out: Vec::new(),
            revision: 0,
        }
    }

    /// Arms the first tick. Call once after [`Engine::new`].
    pub fn start(&mut self, now: Timestamp) -> Vec<Action> {
        self.now = self.now.max(now);
        self.arm_tick();
        std::mem::take(&mut self.out)
    }

    /// Rebuilds an engine from the intent log after a restart or leader change.
    ///
    /// Open incidents (those that recorded intents) come back in the state their
    /// intents and results imply; intents recorded but not done are handed to the edges
    /// again with the same key (they deduplicate); done intents are never issued again.
    /// Hosts get a fresh detector grace period from `now`.
    pub fn resume(cfg: Config, log: &dyn IntentLog, now: Timestamp) -> (Engine, Vec<Action>) {
        let mut e = Engine::new(cfg);
        e.now = now;
        e.replaying = true;
        let entries = log.entries();
        // Replay issues and completions in time order. Within one instant, results come
        // before issues: the engine issues in reaction to what it has learnt (a result
        // and the operator's unfence it allowed can share a millisecond, and replaying
        // the unfence first would lose where the result put the VM). An intent issued
        // and completed within the same instant is replayed issue first, then result.
        let mut events: Vec<(Timestamp, u8, usize, u8)> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            events.push((entry.record.at, 1, i, 0));
            if let Some(c) = &entry.done {
                if c.at > entry.record.at {
                    events.push((c.at, 0, i, 1));
                } else {
                    events.push((entry.record.at, 1, i, 1));
                }
            }
        }
        events.sort();
        for (at, _, i, kind) in events {
            let entry = &entries[i];
            e.now = at.max(e.now);
            if kind == 0 {
                e.intents.insert(
                    entry.record.key.clone(),
                    Known {
                        record: entry.record.clone(),
                        done: false,
                    },
                );
                e.note_incident_id(entry.record.intent.incident());
                e.apply_issue(&entry.record);
            } else if let Some(c) = &entry.done {
                if let Some(k) = e.intents.get_mut(&entry.record.key) {
                    k.done = true;
                }
                e.apply_outcome(&entry.record, c);
            }
        }
        e.replaying = false;
        e.now = now.max(e.now);
        let now = e.now;
        let hosts: Vec<HostId> = e.hosts.keys().cloned().collect();
        for h in &hosts {
            e.detector.reset(h, now);
        }
        for entry in &entries {
            if entry.done.is_none() {
                if let Some(a) = entry.record.intent.action(&entry.record.key) {
                    if let Some(inc) = entry.record.intent.incident() {
                        let subject = e.incident_subject(inc);
                        e.note(
                            inc,
                            subject,
                            format!(
                                "controller resumed; re-handing open intent {}",
                                entry.record.key
                            ),
                            Source::Controller,
                        );
                    }
                    e.out.push(a);
                }
            }
        }
        e.arm_tick();
        e.reconcile();
        let out = std::mem::take(&mut e.out);
        (e, out)
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
            Input::Timer(TimerId::Tick) => self.on_tick(),
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
                self.complete(&key, IntentOutcome::Restore(outcome));
            }
        }
        if reconcile {
            self.reconcile();
        }
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
        let taken = self.on_operator(cmd);
        self.reconcile();
        let out = std::mem::take(&mut self.out);
        taken.map(|()| out)
    }

    // ---------------------------------------------------------------- read-only views

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
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
            })
            .collect()
    }

    /// Fenced, heard again since the fence, and not silent now.
    fn is_back(&self, host: &HostId) -> bool {
        self.hosts.get(host).is_some_and(|h| {
            h.state.fenced()
                && h.heard_since_fence
                && self.detector.liveness(host, self.now) != Liveness::Suspect
        })
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

    /// Every incident the engine remembers (open and closed since start/resume).
    pub fn incidents(&self) -> impl Iterator<Item = &Incident> {
        self.incidents.values()
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

    // ---------------------------------------------------------------- inputs

    /// Returns whether the host changed state.
    fn on_heartbeat(&mut self, hb: Heartbeat) -> bool {
        let now = self.now;
        let host = hb.host.clone();
        self.ensure_host(&host);
        self.detector.heartbeat(&host, hb.path, now);
        let (state, fenced_at, old_boot) = {
            let h = self.hosts.get_mut(&host).expect("ensured");
            h.self_fence_armed = hb.self_fence_armed;
            let old = h.boot_id.replace(hb.boot_id);
            // Heartbeats may arrive out of order over two paths: the clock only goes
            // forward, unless the host rebooted (a new clock for a new boot).
            let read = match h.clock {
                Some(c) if old == Some(hb.boot_id) => c.at(now).max(hb.at),
                _ => hb.at,
            };
            h.clock = Some(HostClock {
                read,
                heard_at: now,
            });
            (h.state, h.fenced_at, old)
        };
        self.date_restores(&host, hb.at);
        if old_boot.is_some_and(|b| b != hb.boot_id) {
            if let Some(inc) = self.hosts[&host].incident {
                self.note(
                    inc,
                    Subject::Host(host.clone()),
                    format!("host rebooted (boot id {})", hb.boot_id),
                    Source::Heartbeat,
                );
            }
        }
        match state {
            HostState::Suspect | HostState::Confirming => {
                self.set_host_state(
                    &host,
                    HostState::Up,
                    "heartbeats resumed",
                    Source::Heartbeat,
                );
                self.close_host_incident(&host);
                true
            }
            // Received after the verified fence, on the controller's clock (a host's own
            // clock is never compared with the controller's).
            HostState::Fenced | HostState::Evacuating | HostState::Recovered
                if fenced_at.is_some_and(|t| now > t) =>
            {
                let h = self.hosts.get_mut(&host).expect("ensured");
                if !h.heard_since_fence {
                    h.heard_since_fence = true;
                    self.bump();
                }
                self.host_alarm(
                    &host,
                    AlarmKind::HostBackAwaitingUnfence,
                    "fenced host heartbeats again; not trusted until unfenced".into(),
                );
                false
            }
            _ => false,
        }
    }

    fn on_host_event(&mut self, host: HostId, event: HostEvent) {
        self.ensure_host(&host);
        match event {
            HostEvent::ResourceExited {
                resource,
                source,
                at,
                reason,
            } => self.on_exit(&host, resource, source, ListedAt::Host(at), &reason),
            HostEvent::DiskStallStarted { resource, at } => {
                self.note_stall(&host, resource, at, Stall::Started)
            }
            HostEvent::DiskStallEnded { resource, at } => {
                self.note_stall(&host, resource, at, Stall::Ended)
            }
            HostEvent::Inventory {
                resources,
                stopped,
                source,
                at,
            } => {
                self.forget_stopped(&host, &stopped, at);
                self.on_inventory(&host, resources, source, at)
            }
            HostEvent::ComputeServiceReporting => self.on_compute_reporting(&host),
            HostEvent::InventoryFailed { source, reason } => {
                let h = &self.hosts[&host];
                // Only a fenced host's listing matters (its resources wait for it); a
                // late report about a host trusted again is noise.
                if h.state.fence_decided() || h.state == HostState::Recovered {
                    if let Some(inc) = h.incident {
                        self.note(
                            inc,
                            Subject::Host(host.clone()),
                            format!("listing the host's resources failed (retrying): {reason}"),
                            source,
                        );
                    }
                    self.host_alarm(
                        &host,
                        AlarmKind::InventoryFailed,
                        format!(
                            "{source:?} cannot list this fenced host's resources (retrying; \
                             they are moved once it answers): {reason}"
                        ),
                    );
                }
            }
        }
    }

    /// A disk stall goes to the timeline of the incident that owns the resource (or its
    /// host's incident). A stall nobody owns opens a stall incident of its own, which
    /// records the start and the end and closes at the end; it changes no state and
    /// issues no action (the watchdog's stall threshold has already passed when the
    /// event arrives, and the cure is the storage, not a restart).
    fn note_stall(
        &mut self,
        host: &HostId,
        resource: Option<Resource>,
        at: HostTime,
        phase: Stall,
    ) {
        let ended = phase == Stall::Ended;
        let owner = resource
            .as_ref()
            .and_then(|r| self.resources.get(r))
            .and_then(|e| e.owner)
            .or(self.hosts.get(host).and_then(|h| h.incident));
        let stall = resource.as_ref().and_then(|r| self.stalls.get(r)).copied();
        let subject = resource
            .clone()
            .map(Subject::Resource)
            .unwrap_or(Subject::Host(host.clone()));
        let cause = format!("{phase} at {at}");
        if let Some(inc) = owner {
            self.note(inc, subject.clone(), cause.clone(), Source::Ebpf);
        }
        match (stall, resource) {
            (Some(inc), Some(r)) if Some(inc) != owner => {
                self.note(inc, subject, cause, Source::Ebpf);
                if ended {
                    self.stalls.remove(&r);
                    self.close_incident(inc);
                }
            }
            (None, Some(r)) if owner.is_none() && !ended && self.resources.contains_key(&r) => {
                let inc = self.new_incident(subject.clone());
                self.stalls.insert(r, inc);
                self.note(inc, subject, cause, Source::Ebpf);
            }
            _ => {}
        }
    }

    fn on_exit(
        &mut self,
        host: &HostId,
        resource: Resource,
        source: Source,
        at: ListedAt,
        reason: &str,
    ) {
        self.ensure_resource(&resource, host);
        let e = &self.resources[&resource];
        let subject = Subject::Resource(resource.clone());
        let cause = format!("exited ({reason}) at {at}");
        if &e.host != host {
            // Late news from a host the resource has left.
            if let Some(inc) = e.owner {
                self.note(inc, subject, format!("late: {cause} on {host}"), source);
            }
            return;
        }
        if e.before_restore(at) {
            if let Some(inc) = e.owner {
                self.note(inc, subject, format!("late: {cause}"), source);
            }
            return;
        }
        if let Some(inc) = e.owner {
            // Correlated: the first event acted, this one enriches the timeline.
            self.note(inc, subject, format!("also: {cause}"), source);
            return;
        }
        if e.state == ResourceState::GaveUp {
            // Given up: nothing to act on, but another source's account of the same
            // failure goes into that incident's timeline.
            if let Some((inc, failed_at)) = e.last_failure {
                if same_failure(failed_at, at, self.cfg.correlation_window) {
                    self.note(inc, subject, format!("also: {cause}"), source);
                }
            }
            return;
        }
        let hstate = self.hosts[host].state;
        match hstate {
            HostState::Maintenance => {}
            HostState::Suspect | HostState::Confirming | HostState::Fencing => {
                // Rule 1: folded into the host incident, never restarted separately.
                let inc = self.hosts[host].incident;
                self.hosts
                    .get_mut(host)
                    .expect("known")
                    .folded
                    .insert(resource.clone());
                self.bump();
                if let Some(inc) = inc {
                    self.note(
                        inc,
                        subject,
                        format!("folded into host incident: {cause}"),
                        source,
                    );
                }
            }
            HostState::Up | HostState::Fenced | HostState::Evacuating | HostState::Recovered => {
                self.open_resource_incident(&resource, &cause, source);
                if let Some(e) = self.resources.get_mut(&resource) {
                    e.last_failure = e.owner.map(|inc| (inc, at));
                }
            }
        }
    }

    /// Resources stopped on purpose are no longer running there, and nothing is to be
    /// restored: the engine forgets them (unless an incident owns them; it finishes).
    /// Started again, they come back with the next inventory. A list taken before the
    /// resource's last restore is old news (it shows the stop that the restore undid).
    fn forget_stopped(&mut self, host: &HostId, stopped: &[Resource], at: ListedAt) {
        for r in stopped {
            let forget = self.resources.get(r).is_some_and(|e| {
                &e.host == host
                    && e.owner.is_none()
                    && e.after_restore(at)
                    && matches!(e.state, ResourceState::Running | ResourceState::GaveUp)
            });
            if forget {
                self.resources.remove(r);
                self.bump();
            }
        }
    }

    fn on_inventory(
        &mut self,
        host: &HostId,
        resources: Vec<Resource>,
        source: Source,
        at: ListedAt,
    ) {
        let listed: BTreeSet<Resource> = resources.into_iter().collect();
        // The lister answered: a later failure is a new episode worth an alarm.
        if self
            .hosts
            .get_mut(host)
            .expect("known")
            .alarmed
            .remove(&AlarmKind::InventoryFailed)
        {
            self.bump();
        }
        if source == Source::Neutron && self.hosts[host].state == HostState::Recovered {
            self.reopen_for_late_resources(host, &listed);
        }
        let hstate = self.hosts[host].state;
        let incident = self.hosts[host].incident;
        let mut stale = BTreeSet::new();
        for r in &listed {
            match self.resources.get(r) {
                None => {
                    self.ensure_resource(r, host);
                    // A fence was decided, so the host incident is open; should a
                    // state ever lack one, the resource is merely known, never a panic.
                    if let (true, Some(inc)) = (hstate.fence_decided(), incident) {
                        self.take_ownership(r, inc, host);
                    }
                }
                Some(e) if &e.host == host => {
                    let gave_up = e.state == ResourceState::GaveUp;
                    // Neutron's list of a fenced host's agents says where a router is
                    // bound, not that it runs: a given-up router there stays given up.
                    let fenced_listing = source == Source::Neutron && hstate.fenced();
                    if gave_up && source != Source::Nova && !fenced_listing {
                        self.set_resource_state(
                            r,
                            ResourceState::Running,
                            "found running again",
                            source,
                        );
                    }
                }
                Some(e) => {
                    if e.before_restore(at) || source == Source::Nova {
                        continue;
                    }
                    stale.insert(r.clone());
                }
            }
        }
        if source != Source::Nova {
            // A host's inventory speaks for the kind its source sees: Neutron's for the
            // routers of the host's L3 agents, a watchdog's for its VMs. What it does
            // not list of another kind is not missing, nor stale.
            let covers =
                |r: &Resource| (r.kind() == ResourceKind::Router) == (source == Source::Neutron);
            // Resources the host no longer runs: a missed exit.
            let missing: Vec<Resource> = self
                .resources
                .iter()
                .filter(|(r, e)| {
                    covers(r)
                        && &e.host == host
                        && e.owner.is_none()
                        && e.state == ResourceState::Running
                        && e.after_restore(at)
                        && !listed.contains(*r)
                })
                .map(|(r, _)| r.clone())
                .collect();
            if hstate == HostState::Up {
                for r in missing {
                    self.on_exit(host, r, source, at, "missing from inventory");
                }
            }
            let h = self.hosts.get_mut(host).expect("known");
            let mut now_stale: BTreeSet<Resource> =
                h.stale.iter().filter(|r| !covers(r)).cloned().collect();
            now_stale.extend(stale.iter().cloned());
            if h.stale != now_stale {
                h.stale = now_stale;
                self.revision += 1;
            }
            if !stale.is_empty() {
                let list: Vec<String> = stale.iter().map(|r| r.to_string()).collect();
                self.host_alarm(
                    host,
                    AlarmKind::StaleResource,
                    if source == Source::Neutron {
                        format!(
                            "routers moved off this host while it was fenced may still be \
                             served by its data plane (stale namespaces): {}; clean up \
                             before its L3 agent is trusted again",
                            list.join(", ")
                        )
                    } else {
                        format!(
                            "host reports resources that run elsewhere: {}",
                            list.join(", ")
                        )
                    },
                );
            }
        }
    }

    /// A `Recovered` host (fenced, everything it owned handled) whose routers Neutron
    /// lists only now (it was unreachable at force-down): the host incident reopens
    /// (`Recovered → Evacuating`, same incident, so a replayed log rebuilds it) and
    /// takes the routers it never heard of that are still bound there; they are moved
    /// like the others, then it is `Recovered` again. Routers it lists that run
    /// elsewhere are the stale report, not this; given-up ones stay given up.
    fn reopen_for_late_resources(&mut self, host: &HostId, listed: &BTreeSet<Resource>) {
        // Only resources the engine has never heard of: one it knows on this host was
        // taken by the incident when the fence was decided (and is handled); one it
        // knows elsewhere is stale here, not late.
        let late: Vec<Resource> = listed
            .iter()
            .filter(|r| !self.resources.contains_key(*r))
            .cloned()
            .collect();
        let Some(inc) = self.hosts[host].last_incident else {
            return;
        };
        if late.is_empty() {
            return;
        }
        if let Some(i) = self.incidents.get_mut(&inc) {
            i.closed_at = None;
        }
        let h = self.hosts.get_mut(host).expect("known");
        h.incident = Some(inc);
        self.bump();
        self.set_host_state(
            host,
            HostState::Evacuating,
            &format!(
                "Neutron listed {} routers of the fenced host late; moving them",
                late.len()
            ),
            Source::Neutron,
        );
        for r in &late {
            self.ensure_resource(r, host);
            self.take_ownership(r, inc, host);
        }
    }

    fn on_tick(&mut self) {
        let now = self.now;
        if self.next_tick_at.is_none_or(|t| now >= t) {
            self.arm_tick();
        }
        // The detector is asked once per host and tick.
        let seen: Vec<(HostId, Liveness, Duration)> = self
            .hosts
            .keys()
            .map(|h| {
                (
                    h.clone(),
                    self.detector.liveness(h, now),
                    self.detector.silence(h, now).unwrap_or_default(),
                )
            })
            .collect();
        self.evaluate_gate(&seen);
        for (host, live, silence) in &seen {
            self.evaluate_host(host, *live, *silence);
        }
    }

    fn evaluate_gate(&mut self, seen: &[(HostId, Liveness, Duration)]) {
        let mut n = 0usize;
        let mut silent = 0usize;
        for (h, live, _) in seen {
            if matches!(
                self.hosts[h].state,
                HostState::Maintenance | HostState::Recovered
            ) {
                continue;
            }
            // A host not heard since it was (re)registered — back from maintenance, or
            // just known — is not yet silent, but it is no proof that the controller
            // hears anyone either: it does not count until it is heard or turns Suspect.
            if *live != Liveness::Suspect && self.detector.last_seen(h).is_none() {
                continue;
            }
            n += 1;
            if *live == Liveness::Suspect {
                silent += 1;
            }
        }
        let isolated = n > 0 && silent == n;
        let mass = n > 0 && (silent as f64) > self.cfg.max_dead_share * n as f64;
        if isolated && !self.gate.isolated {
            self.alarm(
                AlarmKind::ControllerIsolated,
                None,
                None,
                format!("no heartbeat from any of {n} hosts: suspecting a partition of the controller; fencing nobody"),
            );
        } else if mass && !isolated && !self.gate.mass {
            self.alarm(
                AlarmKind::MassFailure,
                None,
                None,
                format!(
                    "{silent} of {n} hosts look dead (more than {:.0}%): fencing stopped",
                    self.cfg.max_dead_share * 100.0
                ),
            );
        }
        if self.gate.isolated != isolated || self.gate.mass != mass {
            self.bump();
        }
        self.gate = Gate { isolated, mass };
    }

    fn evaluate_host(&mut self, host: &HostId, live: Liveness, silence: Duration) {
        let now = self.now;
        let state = self.hosts[host].state;
        match state {
            HostState::Up if live == Liveness::Suspect => {
                self.open_host_incident(host);
                self.set_host_state(
                    host,
                    HostState::Suspect,
                    &format!("no heartbeat on any path for {} ms", silence.as_millis()),
                    Source::Heartbeat,
                );
            }
            HostState::Suspect if silence >= self.cfg.confirm_after => {
                self.set_host_state(
                    host,
                    HostState::Confirming,
                    &format!(
                        "silent for {} ms; asking independent sources",
                        silence.as_millis()
                    ),
                    Source::Heartbeat,
                );
                self.ask_confirmation(host);
            }
            HostState::Confirming => {
                let h = &self.hosts[host];
                let asked = h.confirm_asked_at.unwrap_or(now);
                if h.awaiting_confirmation && now >= asked + self.cfg.confirm_timeout {
                    let h = self.hosts.get_mut(host).expect("known");
                    h.awaiting_confirmation = false;
                    if h.verdict.is_none() {
                        h.verdict = Some((Verdict::Unknown, Source::Controller));
                    }
                    let inc = h.incident;
                    self.bump();
                    if let Some(inc) = inc {
                        self.note(
                            inc,
                            Subject::Host(host.clone()),
                            "confirmation timed out".into(),
                            Source::Controller,
                        );
                    }
                }
                let h = &self.hosts[host];
                let verdict = h.verdict.map(|v| v.0);
                if !h.awaiting_confirmation
                    && matches!(verdict, Some(Verdict::Alive | Verdict::Unknown))
                    && now >= asked + self.cfg.confirm_retry
                {
                    self.ask_confirmation(host);
                }
                let decide = match verdict {
                    Some(Verdict::Dead) => true,
                    Some(Verdict::Unknown) => silence >= self.cfg.fence_on_unknown_after,
                    Some(Verdict::Alive) | None => false,
                };
                if decide && live == Liveness::Suspect && self.gate.open() {
                    let cause = match verdict {
                        Some(Verdict::Dead) => "confirmed dead".to_string(),
                        _ => format!("unconfirmed, silent for {} ms", silence.as_millis()),
                    };
                    let src = self.hosts[host].verdict.map_or(Source::Controller, |v| v.1);
                    self.decide_fence(host, &cause, src);
                }
            }
            _ => {}
        }
    }

    fn ask_confirmation(&mut self, host: &HostId) {
        let now = self.now;
        let h = self.hosts.get_mut(host).expect("known");
        h.confirm_asked_at = Some(now);
        h.awaiting_confirmation = true;
        self.bump();
        self.out.push(Action::Confirm { host: host.clone() });
    }

    fn on_confirmation(&mut self, host: HostId, source: Source, verdict: Verdict) {
        let Some(h) = self.hosts.get_mut(&host) else {
            return;
        };
        if h.state != HostState::Confirming {
            return;
        }
        h.awaiting_confirmation = false;
        h.verdict = Some((verdict, source));
        let inc = h.incident;
        self.bump();
        if let Some(inc) = inc {
            self.note(
                inc,
                Subject::Host(host.clone()),
                format!("confirmation: {verdict:?}"),
                source,
            );
        }
        if verdict == Verdict::Alive {
            self.host_alarm(
                &host,
                AlarmKind::HostAliveButSilent,
                format!("{source:?} says the host is alive but the controller hears nothing: not fencing"),
            );
        }
        // A Dead verdict fences on the next tick (after the gates are evaluated).
    }

    /// The automatic unfence policy: a recovered host that is back and clean, whose
    /// compute service reports again, is trusted again as an operator would trust it
    /// (the same checks as `defibctl unfence`; a host not clean yet waits, and its
    /// stale-resource alarm says why).
    fn on_compute_reporting(&mut self, host: &HostId) {
        let h = &self.hosts[host];
        if !self.cfg.auto_unfence
            || h.state != HostState::Recovered
            || !self.is_back(host)
            || self.unfence_refusal(host).is_some()
        {
            return;
        }
        let key = IntentKey::derive(
            KeyScope::Policy,
            &format!("unfence@{}", self.now.0),
            &Subject::Host(host.clone()),
        );
        self.issue(key, Intent::Unfence { host: host.clone() });
    }

    /// Why an unfence of `host` would be refused now, if it would.
    fn unfence_refusal(&self, host: &HostId) -> Option<String> {
        let h = self.hosts.get(host)?;
        if !matches!(h.state, HostState::Recovered | HostState::Fencing) {
            Some(format!("host is {}", h.state))
        } else if h.fence.in_flight.is_some() {
            Some("a fence is in flight".to_string())
        } else if !h.stale.is_empty() {
            Some(format!("host still runs {} stale resources", h.stale.len()))
        } else {
            None
        }
    }

    fn on_operator(&mut self, cmd: OperatorCommand) -> Result<(), Refusal> {
        let now = self.now;
        match cmd {
            OperatorCommand::MaintenanceOn { host } => {
                self.ensure_host(&host);
                let state = self.hosts[&host].state;
                if state == HostState::Maintenance {
                    return Ok(());
                }
                if !state.can_become(HostState::Maintenance) {
                    return Err(Refusal {
                        reason: format!("maintenance refused: host is {state}"),
                    });
                }
                let key = operator_key("maintenance-on", now, &host);
                self.issue(key.clone(), Intent::Maintenance { host, on: true });
                self.complete(&key, IntentOutcome::Recorded);
            }
            OperatorCommand::MaintenanceOff { host } => {
                if self.host_state(&host) != Some(HostState::Maintenance) {
                    return Ok(());
                }
                let key = operator_key("maintenance-off", now, &host);
                self.issue(key.clone(), Intent::Maintenance { host, on: false });
                self.complete(&key, IntentOutcome::Recorded);
            }
            OperatorCommand::Unfence { host } => {
                if !self.hosts.contains_key(&host) {
                    return Ok(());
                }
                if let Some(why) = self.unfence_refusal(&host) {
                    return Err(Refusal {
                        reason: format!("unfence refused: {why}"),
                    });
                }
                let key = operator_key("unfence", now, &host);
                self.issue(key, Intent::Unfence { host });
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- decisions

    fn decide_fence(&mut self, host: &HostId, cause: &str, source: Source) {
        let inc = self.hosts[host].incident.expect("host incident open");
        self.set_host_state(host, HostState::Fencing, cause, source);
        // Rule 1: the host incident takes everything on the host, except resources
        // already being restored elsewhere by their own incident.
        let on_host: Vec<Resource> = self
            .resources
            .iter()
            .filter(|(_, e)| {
                &e.host == host
                    && e.state != ResourceState::GaveUp
                    && !(e.owner.is_some() && matches!(e.state, ResourceState::Evacuating { .. }))
            })
            .map(|(r, _)| r.clone())
            .collect();
        for r in on_host {
            self.take_ownership(&r, inc, host);
        }
    }

    fn reconcile(&mut self) {
        // Hosts without an incident have nothing to reconcile (reconcile_host returns at
        // once for them); skipping them here saves a clone per healthy host.
        let hosts: Vec<HostId> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.incident.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for h in &hosts {
            self.reconcile_host(h);
        }
        let pending: Vec<Resource> = self
            .resources
            .iter()
            .filter(|(_, e)| {
                e.in_flight.is_none()
                    && e.owner.is_some_and(|o| {
                        self.incidents
                            .get(&o)
                            .is_some_and(|i| matches!(i.subject, Subject::Resource(_)))
                    })
            })
            .map(|(r, _)| r.clone())
            .collect();
        for r in pending {
            self.reconcile_resource(&r);
        }
    }

    fn reconcile_host(&mut self, host: &HostId) {
        let now = self.now;
        let h = &self.hosts[host];
        let Some(inc) = h.incident else {
            return;
        };
        match h.state {
            HostState::Fencing if h.fenced_by.is_none() => {
                let waiting = h
                    .owned
                    .iter()
                    .any(|r| self.resources.get(r).is_some_and(|e| e.in_flight.is_some()));
                if waiting {
                    // A superseded restart is still in flight; its result comes first.
                    return;
                }
                let silence = self.detector.silence(host, now).unwrap_or_default();
                let self_fenced = self
                    .cfg
                    .self_fence_deadline
                    .is_some_and(|d| h.self_fence_armed && silence >= d);
                let attempt = h.fence.attempts + 1;
                let resources: Vec<Resource> = h.owned.iter().cloned().collect();
                if self_fenced {
                    let key = IntentKey::derive(
                        inc,
                        &format!("self-fence-{attempt}"),
                        &Subject::Host(host.clone()),
                    );
                    let intent = Intent::Fence {
                        host: host.clone(),
                        incident: inc,
                        attempt,
                        method: None,
                        resources,
                    };
                    if self.issue(key.clone(), intent) {
                        self.complete(
                            &key,
                            IntentOutcome::Fence(FenceOutcome::Verified(
                                FenceVerifier::SelfFenceDeadline,
                            )),
                        );
                    }
                } else if h.fence.in_flight.is_some() {
                    // Wait for the fence result (or the self-fence deadline).
                } else if h.fence.attempts >= self.cfg.max_fence_attempts {
                    let n = h.fence.attempts;
                    self.host_alarm(
                        host,
                        AlarmKind::FenceExhausted,
                        format!(
                            "{n} fence tries failed; operator needed (unfence or fix the fence)"
                        ),
                    );
                } else if now >= h.fence.next_at
                    && self.gate.open()
                    && self.detector.liveness(host, now) == Liveness::Suspect
                {
                    let key = IntentKey::derive(
                        inc,
                        &format!("fence-{attempt}"),
                        &Subject::Host(host.clone()),
                    );
                    let intent = Intent::Fence {
                        host: host.clone(),
                        incident: inc,
                        attempt,
                        method: Some(self.cfg.fence_method),
                        resources,
                    };
                    self.issue(key, intent);
                }
            }
            HostState::Fenced if h.force_down.in_flight.is_none() => {
                let attempt = h.force_down.attempts + 1;
                if h.force_down.attempts >= self.cfg.max_fence_attempts {
                    self.host_alarm(
                        host,
                        AlarmKind::ForceDownFailed,
                        "forcing the compute service down keeps failing; operator needed".into(),
                    );
                } else if now >= h.force_down.next_at {
                    let key = IntentKey::derive(
                        inc,
                        &format!("force-down-{attempt}"),
                        &Subject::Host(host.clone()),
                    );
                    let intent = Intent::ForceDown {
                        host: host.clone(),
                        incident: inc,
                        attempt,
                        resources: h.owned.iter().cloned().collect(),
                    };
                    self.issue(key, intent);
                }
            }
            HostState::Evacuating => {
                let owned: Vec<Resource> = h.owned.iter().cloned().collect();
                let mut all_done = true;
                for r in owned {
                    let e = &self.resources[&r];
                    if e.owner != Some(inc) {
                        continue;
                    }
                    all_done = false;
                    if e.in_flight.is_some() {
                        continue;
                    }
                    let attempt = match e.state {
                        ResourceState::Evacuating { attempt } => attempt + 1,
                        _ => 1,
                    };
                    self.issue_evacuate(&r, host, inc, attempt);
                }
                if all_done {
                    self.set_host_state(
                        host,
                        HostState::Recovered,
                        "every resource handled; waiting for an operator to unfence",
                        Source::Controller,
                    );
                    self.close_incident(inc);
                    let h = self.hosts.get_mut(host).expect("known");
                    let fenced_at = h.fenced_at;
                    let fenced_by = h.fenced_by;
                    let heard = h.heard_since_fence;
                    h.clear_incident();
                    h.fenced_at = fenced_at;
                    h.fenced_by = fenced_by;
                    h.heard_since_fence = heard;
                    h.last_incident = Some(inc);
                }
            }
            _ => {}
        }
    }

    fn reconcile_resource(&mut self, r: &Resource) {
        let e = &self.resources[r];
        let inc = e.owner.expect("owned");
        let host = e.host.clone();
        let hstate = self.hosts.get(&host).map_or(HostState::Up, |h| h.state);
        let can_restart = r.kind().restarts_in_place() && hstate == HostState::Up;
        let fenced = hstate.fenced();
        match e.state {
            ResourceState::Failed if hstate == HostState::Up || fenced => {
                let window_start = Timestamp(
                    self.now
                        .0
                        .saturating_sub(self.cfg.restart_window.as_millis() as u64),
                );
                let tries = e.restarts.iter().filter(|t| **t >= window_start).count() as u32;
                if can_restart && tries < self.cfg.max_restarts_in_place {
                    let step = e.steps + 1;
                    let key = IntentKey::derive(inc, &format!("restart-{step}"), r);
                    self.issue(
                        key,
                        Intent::RestartInPlace {
                            resource: r.clone(),
                            host,
                            incident: inc,
                            attempt: tries + 1,
                        },
                    );
                } else {
                    self.issue_evacuate(r, &host, inc, 1);
                }
            }
            ResourceState::Evacuating { attempt } => {
                // A failed try: the next one (the resource is known dead, or its host
                // fenced, so it cannot run twice).
                self.issue_evacuate(r, &host, inc, attempt + 1);
            }
            _ => {}
        }
    }

    fn issue_evacuate(&mut self, r: &Resource, from: &HostId, inc: IncidentId, attempt: u32) {
        let key = IntentKey::derive(inc, &format!("evacuate-{attempt}"), r);
        self.issue(
            key,
            Intent::Evacuate {
                resource: r.clone(),
                from: from.clone(),
                incident: inc,
                attempt,
            },
        );
    }

    // ---------------------------------------------------------------- intents

    /// Records and emits an intent. Returns false (and does nothing) if the key exists.
    fn issue(&mut self, key: IntentKey, intent: Intent) -> bool {
        if self.intents.contains_key(&key) {
            return false;
        }
        let record = IntentRecord {
            key: key.clone(),
            at: self.now,
            intent,
        };
        self.intents.insert(
            key.clone(),
            Known {
                record: record.clone(),
                done: false,
            },
        );
        self.out.push(Action::PersistIntent(record.clone()));
        self.apply_issue(&record);
        if let Some(a) = record.intent.action(&key) {
            self.out.push(a);
        }
        true
    }

    /// Completes an open intent. Late or duplicate results (unknown or done keys) are
    /// ignored.
    fn complete(&mut self, key: &IntentKey, outcome: IntentOutcome) -> bool {
        let record = match self.intents.get_mut(key) {
            Some(k) if !k.done => {
                k.done = true;
                k.record.clone()
            }
            _ => return false,
        };
        // A restore is dated on its host's clock too (see `Restored`).
        let host_clock = match (&record.intent, &outcome) {
            (
                Intent::RestartInPlace { .. } | Intent::Evacuate { .. },
                IntentOutcome::Restore(RestoreOutcome::Ok { host }),
            ) => self
                .hosts
                .get(host)
                .and_then(|h| h.clock)
                .map(|c| c.at(self.now)),
            _ => None,
        };
        let completion = Completion {
            at: self.now,
            outcome,
            host_clock,
        };
        self.out.push(Action::CompleteIntent {
            key: key.clone(),
            completion: completion.clone(),
        });
        self.apply_outcome(&record, &completion);
        true
    }

    /// The state an issued intent implies (live and on replay).
    fn apply_issue(&mut self, rec: &IntentRecord) {
        let key = &rec.key;
        self.bump();
        match &rec.intent {
            Intent::Fence {
                host,
                incident,
                attempt,
                method,
                resources,
            } => {
                self.ensure_host(host);
                self.ensure_incident(*incident, Subject::Host(host.clone()), rec.at);
                if self.replaying {
                    let h = self.hosts.get_mut(host).expect("ensured");
                    h.state = HostState::Fencing;
                    h.incident = Some(*incident);
                }
                for r in resources {
                    self.ensure_resource(r, host);
                    self.take_ownership(r, *incident, host);
                }
                let h = self.hosts.get_mut(host).expect("ensured");
                h.fence.attempts = *attempt;
                if method.is_some() {
                    h.fence.in_flight = Some(key.clone());
                }
                let what = match method {
                    Some(m) => format!("fence #{attempt} ({m:?}) issued as {key}"),
                    None => format!("self-fence deadline passed; recorded as {key}"),
                };
                self.note(
                    *incident,
                    Subject::Host(host.clone()),
                    what,
                    Source::Controller,
                );
            }
            Intent::ForceDown {
                host,
                incident,
                attempt,
                resources,
            } => {
                self.ensure_host(host);
                for r in resources {
                    self.ensure_resource(r, host);
                    self.take_ownership(r, *incident, host);
                }
                let h = self.hosts.get_mut(host).expect("ensured");
                h.force_down.attempts = *attempt;
                h.force_down.in_flight = Some(key.clone());
                self.note(
                    *incident,
                    Subject::Host(host.clone()),
                    format!("force-down #{attempt} issued as {key}"),
                    self.cfg.vm_restorer,
                );
            }
            Intent::RestartInPlace {
                resource,
                host,
                incident,
                attempt,
            } => {
                self.ensure_host(host);
                self.ensure_resource(resource, host);
                if self.replaying {
                    self.ensure_incident(*incident, Subject::Resource(resource.clone()), rec.at);
                    let e = self.resources.get_mut(resource).expect("ensured");
                    if e.owner != Some(*incident) {
                        e.steps = 0;
                    }
                    e.owner = Some(*incident);
                    e.state = ResourceState::Failed;
                }
                let e = self.resources.get_mut(resource).expect("ensured");
                e.steps += 1;
                let window = self.cfg.restart_window;
                e.restarts.retain(|t| rec.at.since(*t) < window);
                e.restarts.push(rec.at);
                e.in_flight = Some(key.clone());
                self.set_resource_state(
                    resource,
                    ResourceState::RestartingInPlace { attempt: *attempt },
                    &format!("restart in place #{attempt} issued as {key}"),
                    Source::Controller,
                );
            }
            Intent::Evacuate {
                resource,
                from,
                incident,
                attempt,
            } => {
                self.ensure_host(from);
                self.ensure_resource(resource, from);
                if self.replaying {
                    self.ensure_incident(*incident, Subject::Resource(resource.clone()), rec.at);
                    let e = self.resources.get_mut(resource).expect("ensured");
                    if e.owner != Some(*incident) {
                        e.steps = 0;
                    }
                    e.owner = Some(*incident);
                    e.state = if *attempt > 1 {
                        ResourceState::Evacuating {
                            attempt: attempt - 1,
                        }
                    } else {
                        ResourceState::Failed
                    };
                }
                let e = self.resources.get_mut(resource).expect("ensured");
                e.steps += 1;
                e.in_flight = Some(key.clone());
                // A resource the host incident took after its force-down intent (listed
                // by Nova or, late, by Neutron) is in no intent's resource list: its
                // evacuation says it is the incident's, so that a replayed log has the
                // incident wait for it (and retry it) like the rest.
                if let Some(h) = self.hosts.get_mut(from) {
                    if h.incident == Some(*incident) && h.owned.insert(resource.clone()) {
                        self.revision += 1;
                    }
                }
                self.set_resource_state(
                    resource,
                    ResourceState::Evacuating { attempt: *attempt },
                    &format!("evacuation #{attempt} from {from} issued as {key}"),
                    Source::Controller,
                );
            }
            Intent::Maintenance { host, on } => {
                self.ensure_host(host);
                let now = self.now;
                if *on {
                    let state = self.hosts[host].state;
                    if state != HostState::Maintenance {
                        if self.replaying {
                            self.hosts.get_mut(host).expect("ensured").state =
                                HostState::Maintenance;
                        } else {
                            self.set_host_state(
                                host,
                                HostState::Maintenance,
                                "operator: maintenance on",
                                Source::Operator,
                            );
                        }
                        if state.in_incident() {
                            self.close_host_incident(host);
                        }
                    }
                } else {
                    if self.replaying {
                        self.hosts.get_mut(host).expect("ensured").state = HostState::Up;
                    } else {
                        self.set_host_state(
                            host,
                            HostState::Up,
                            "operator: maintenance off",
                            Source::Operator,
                        );
                    }
                    self.detector.reset(host, now);
                }
            }
            Intent::Unfence { host } => {
                self.ensure_host(host);
                let now = self.now;
                let inc = self.hosts[host].incident;
                if self.replaying {
                    self.hosts.get_mut(host).expect("ensured").state = HostState::Up;
                } else {
                    self.set_host_state(host, HostState::Up, "operator: unfence", Source::Operator);
                }
                // Give up a held fence: release what the host incident owned; resources
                // seen dead go to their own incidents.
                if let Some(inc) = inc {
                    let owned: Vec<Resource> = self.hosts[host].owned.iter().cloned().collect();
                    let folded = self.hosts[host].folded.clone();
                    for r in owned {
                        let e = self.resources.get_mut(&r).expect("owned exists");
                        if e.owner == Some(inc) {
                            e.owner = None;
                            e.in_flight = None;
                            e.steps = 0;
                            if !folded.contains(&r) && e.state == ResourceState::Running {
                                continue;
                            }
                            e.state = ResourceState::Running;
                            if !self.replaying {
                                self.open_resource_incident(
                                    &r,
                                    "seen dead while its host was being fenced",
                                    Source::Operator,
                                );
                            }
                        }
                    }
                    self.close_incident(inc);
                }
                let h = self.hosts.get_mut(host).expect("ensured");
                h.clear_incident();
                h.stale.clear();
                h.evacuated.clear();
                h.last_incident = None;
                h.fenced_at = None;
                self.detector.reset(host, now);
            }
        }
    }

    /// The state a result implies (live and on replay).
    fn apply_outcome(&mut self, rec: &IntentRecord, completion: &Completion) {
        let now = self.now;
        let key = &rec.key;
        let outcome = &completion.outcome;
        self.bump();
        match (&rec.intent, outcome) {
            (Intent::Fence { host, incident, .. }, IntentOutcome::Fence(o)) => {
                let h = self.hosts.get_mut(host).expect("fenced host known");
                if h.fence.in_flight.as_ref() == Some(key) {
                    h.fence.in_flight = None;
                }
                let current = h.incident == Some(*incident) && h.state == HostState::Fencing;
                let subject = Subject::Host(host.clone());
                match o {
                    FenceOutcome::Verified(by) => {
                        if current {
                            let h = self.hosts.get_mut(host).expect("known");
                            h.fenced_by = Some(*by);
                            h.fenced_at = Some(now);
                            self.set_host_state(
                                host,
                                HostState::Fenced,
                                &format!("fence verified ({by:?})"),
                                verifier_source(*by),
                            );
                        } else {
                            self.note(
                                *incident,
                                subject,
                                format!("late fence result {key}: verified ({by:?})"),
                                verifier_source(*by),
                            );
                        }
                    }
                    FenceOutcome::Unverified { reason } | FenceOutcome::Failed { reason } => {
                        let (kind, what) = match o {
                            FenceOutcome::Unverified { .. } => {
                                (AlarmKind::FenceUnverified, "unverified")
                            }
                            _ => (AlarmKind::FenceFailed, "failed"),
                        };
                        let h = self.hosts.get_mut(host).expect("known");
                        h.fence.next_at = now + self.cfg.fence_retry_backoff;
                        self.note(
                            *incident,
                            subject,
                            format!("fence {key} {what}: {reason}; no restore"),
                            Source::Ipmi,
                        );
                        if current {
                            self.host_alarm(
                                host,
                                kind,
                                format!("fence {what}: {reason}; nothing restored"),
                            );
                        }
                    }
                }
            }
            (Intent::ForceDown { host, incident, .. }, IntentOutcome::Restore(o)) => {
                let h = self.hosts.get_mut(host).expect("known");
                if h.force_down.in_flight.as_ref() == Some(key) {
                    h.force_down.in_flight = None;
                }
                let current = h.incident == Some(*incident) && h.state == HostState::Fenced;
                match o {
                    RestoreOutcome::Ok { .. } if current => {
                        self.set_host_state(
                            host,
                            HostState::Evacuating,
                            "compute service forced down; evacuating",
                            self.cfg.vm_restorer,
                        );
                    }
                    RestoreOutcome::Ok { .. } => {}
                    RestoreOutcome::Failed { reason } => {
                        let h = self.hosts.get_mut(host).expect("known");
                        h.force_down.next_at = now + self.cfg.fence_retry_backoff;
                        self.note(
                            *incident,
                            Subject::Host(host.clone()),
                            format!("force-down {key} failed: {reason}"),
                            self.cfg.vm_restorer,
                        );
                    }
                }
            }
            (
                Intent::RestartInPlace {
                    resource, incident, ..
                },
                IntentOutcome::Restore(o),
            ) => {
                let e = self.resources.get_mut(resource).expect("known");
                let mine = e.in_flight.as_ref() == Some(key);
                let current = e.owner == Some(*incident) && mine;
                if !current {
                    if mine {
                        // Superseded by a host incident: the resource's state follows
                        // the result, its owner stays the host incident.
                        e.in_flight = None;
                        let to = match o {
                            RestoreOutcome::Ok { .. } => ResourceState::Running,
                            RestoreOutcome::Failed { .. } => ResourceState::Failed,
                        };
                        self.set_resource_state(
                            resource,
                            to,
                            &format!("superseded restart {key} finished"),
                            Source::Libvirt,
                        );
                    }
                    self.note(
                        *incident,
                        Subject::Resource(resource.clone()),
                        format!("superseded restart {key} finished: {o:?}"),
                        self.cfg.vm_restorer,
                    );
                    return;
                }
                e.in_flight = None;
                match o {
                    RestoreOutcome::Ok { .. } => {
                        self.mark_restored(resource, completion.host_clock);
                        self.set_resource_state(
                            resource,
                            ResourceState::Running,
                            "restarted in place",
                            Source::Libvirt,
                        );
                        // Released after the state change, so the change is on the
                        // owning incident's timeline.
                        if let Some(e) = self.resources.get_mut(resource) {
                            e.owner = None;
                        }
                        self.close_incident(*incident);
                    }
                    RestoreOutcome::Failed { reason } => {
                        self.set_resource_state(
                            resource,
                            ResourceState::Failed,
                            &format!("restart failed: {reason}"),
                            Source::Libvirt,
                        );
                    }
                }
            }
            (
                Intent::Evacuate {
                    resource,
                    from,
                    incident,
                    attempt,
                },
                IntentOutcome::Restore(o),
            ) => {
                let e = self.resources.get_mut(resource).expect("known");
                let current = e.owner == Some(*incident) && e.in_flight.as_ref() == Some(key);
                if !current {
                    self.note(
                        *incident,
                        Subject::Resource(resource.clone()),
                        format!("late evacuation result {key}: {o:?}"),
                        self.source_for(resource),
                    );
                    return;
                }
                e.in_flight = None;
                let resource_incident = self
                    .incidents
                    .get(incident)
                    .is_some_and(|i| matches!(i.subject, Subject::Resource(_)));
                match o {
                    RestoreOutcome::Ok { host: to } => {
                        if !resource_incident && to != from {
                            // Moved off a fenced host by its incident: its data plane
                            // may still hold a copy until it is cleaned and unfenced.
                            if let Some(h) = self.hosts.get_mut(from) {
                                h.evacuated.insert(resource.clone());
                            }
                        }
                        let e = self.resources.get_mut(resource).expect("known");
                        e.host = to.clone();
                        e.steps = 0;
                        self.ensure_host(to);
                        self.mark_restored(resource, completion.host_clock);
                        self.set_resource_state(
                            resource,
                            ResourceState::Running,
                            &format!("restored on {to}"),
                            self.source_for(resource),
                        );
                        // Released after the state change, so the change is on the
                        // owning incident's timeline.
                        if let Some(e) = self.resources.get_mut(resource) {
                            e.owner = None;
                        }
                        if resource_incident {
                            self.close_incident(*incident);
                        }
                        // The backend picks targets; if it picked a host that is about
                        // to be fenced, that fence will stop the VM again: the host's
                        // incident takes it, to restore it once more after the fence.
                        // (A VM started on a host fenced already was not stopped by that
                        // fence and must not be restored elsewhere on its account.)
                        if let Some(target_incident) = self
                            .hosts
                            .get(to)
                            .filter(|h| h.state == HostState::Fencing)
                            .and_then(|h| h.incident)
                        {
                            let to = to.clone();
                            self.take_ownership(resource, target_incident, &to);
                        }
                    }
                    RestoreOutcome::Failed { reason } => {
                        if *attempt >= self.cfg.max_evacuate_attempts {
                            let e = self.resources.get_mut(resource).expect("known");
                            e.steps = 0;
                            self.set_resource_state(
                                resource,
                                ResourceState::GaveUp,
                                &format!("evacuation #{attempt} failed: {reason}; giving up"),
                                self.source_for(resource),
                            );
                            // Released after the state change, so the change is on the
                            // owning incident's timeline.
                            if let Some(e) = self.resources.get_mut(resource) {
                                e.owner = None;
                            }
                            self.alarm(
                                AlarmKind::RestoreGaveUp,
                                None,
                                Some(resource.clone()),
                                format!("{attempt} restore tries failed, last: {reason}"),
                            );
                            if resource_incident {
                                self.close_incident(*incident);
                            }
                        } else {
                            self.note(
                                *incident,
                                Subject::Resource(resource.clone()),
                                format!("evacuation #{attempt} failed: {reason}"),
                                self.source_for(resource),
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------- helpers

    /// Who restores a resource of this kind (a timeline source).
    fn source_for(&self, r: &Resource) -> Source {
        match r.kind() {
            ResourceKind::Vm => self.cfg.vm_restorer,
            ResourceKind::Router => Source::Neutron,
        }
    }

    /// Dates a resource's restore on the controller's clock and on its host's clock as
    /// last heard (`host_clock`); a host not heard yet dates it with its next heartbeat.
    fn mark_restored(&mut self, r: &Resource, host_clock: Option<HostTime>) {
        let now = self.now;
        let e = self.resources.get_mut(r).expect("known");
        e.restored = Some(Restored {
            at: now,
            host_clock,
        });
        if host_clock.is_none() {
            let host = e.host.clone();
            if let Some(h) = self.hosts.get_mut(&host) {
                h.undated.insert(r.clone());
            }
        }
    }

    /// The first heartbeat of a host after restores it could not date dates them.
    fn date_restores(&mut self, host: &HostId, at: HostTime) {
        let h = self.hosts.get_mut(host).expect("known");
        if h.undated.is_empty() {
            return;
        }
        for r in std::mem::take(&mut h.undated) {
            if let Some(e) = self.resources.get_mut(&r) {
                if &e.host != host {
                    continue;
                }
                if let Some(restored) = e.restored.as_mut().filter(|x| x.host_clock.is_none()) {
                    restored.host_clock = Some(at);
                }
            }
        }
    }

    fn bump(&mut self) {
        self.revision += 1;
    }

    fn arm_tick(&mut self) {
        let at = self.now + self.cfg.tick;
        self.next_tick_at = Some(at);
        self.out.push(Action::ArmTimer {
            id: TimerId::Tick,
            at,
        });
    }

    fn ensure_host(&mut self, host: &HostId) {
        if !self.hosts.contains_key(host) {
            self.hosts.insert(host.clone(), HostEntry::new());
            self.detector.register(host, self.now);
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

    fn note_incident_id(&mut self, id: Option<IncidentId>) {
        if let Some(id) = id {
            self.next_incident = self.next_incident.max(id.0 + 1);
        }
    }

    fn ensure_incident(&mut self, id: IncidentId, subject: Subject, at: Timestamp) {
        self.note_incident_id(Some(id));
        self.incidents.entry(id).or_insert(Incident {
            id,
            subject,
            opened_at: at,
            closed_at: None,
            timeline: Vec::new(),
        });
    }

    fn incident_subject(&self, id: IncidentId) -> Subject {
        self.incidents
            .get(&id)
            .map(|i| i.subject.clone())
            .unwrap_or(Subject::Host(HostId::new("?")))
    }

    fn new_incident(&mut self, subject: Subject) -> IncidentId {
        let id = IncidentId(self.next_incident);
        self.next_incident += 1;
        self.ensure_incident(id, subject, self.now);
        self.bump();
        id
    }

    fn open_host_incident(&mut self, host: &HostId) {
        let id = self.new_incident(Subject::Host(host.clone()));
        let h = self.hosts.get_mut(host).expect("known");
        h.clear_incident();
        h.incident = Some(id);
    }

    fn open_resource_incident(&mut self, r: &Resource, cause: &str, source: Source) {
        let id = self.new_incident(Subject::Resource(r.clone()));
        let e = self.resources.get_mut(r).expect("known");
        e.owner = Some(id);
        e.steps = 0;
        e.in_flight = None;
        if e.state != ResourceState::Running {
            // e.g. found dead again after being given up: start from Running.
            e.state = ResourceState::Running;
        }
        self.set_resource_state(r, ResourceState::Failed, cause, source);
    }

    fn close_incident(&mut self, id: IncidentId) {
        let now = self.now;
        if let Some(i) = self.incidents.get_mut(&id) {
            if i.closed_at.is_none() {
                i.closed_at = Some(now);
                self.bump();
            }
        }
    }

    /// Host incident over without a fence (heartbeats resumed, maintenance): hand the
    /// crashes folded into it to their own incidents.
    fn close_host_incident(&mut self, host: &HostId) {
        let h = self.hosts.get_mut(host).expect("known");
        let folded = std::mem::take(&mut h.folded);
        if let Some(inc) = h.incident {
            self.close_incident(inc);
        }
        self.hosts.get_mut(host).expect("known").clear_incident();
        if self.hosts[host].state == HostState::Maintenance {
            return;
        }
        for r in folded {
            let e = &self.resources[&r];
            if &e.host == host && e.owner.is_none() && e.state == ResourceState::Running {
                self.open_resource_incident(
                    &r,
                    "crash seen while its host was suspect",
                    Source::Controller,
                );
            }
        }
    }

    fn take_ownership(&mut self, r: &Resource, inc: IncidentId, host: &HostId) {
        let e = self.resources.get_mut(r).expect("known");
        self.hosts
            .get_mut(host)
            .expect("known")
            .owned
            .insert(r.clone());
        if e.owner == Some(inc) {
            return;
        }
        let old = e.owner.replace(inc);
        // A stall incident would wait for an end its dead host never reports.
        if let Some(stall) = self.stalls.remove(r) {
            self.note(
                stall,
                Subject::Resource(r.clone()),
                format!("superseded by host incident {inc}"),
                Source::Controller,
            );
            self.close_incident(stall);
        }
        let e = self.resources.get_mut(r).expect("known");
        // An in-flight action of the superseded incident stays recorded in `in_flight`
        // until its result arrives: the host incident waits for it before fencing, so
        // that a restart can never take effect after the fence.
        e.steps = 0;
        self.bump();
        if let Some(old) = old {
            self.note(
                old,
                Subject::Resource(r.clone()),
                format!("superseded by host incident {inc}"),
                Source::Controller,
            );
            self.close_incident(old);
        }
        self.note(
            inc,
            Subject::Resource(r.clone()),
            "owned by the host incident".into(),
            Source::Controller,
        );
    }

    fn set_host_state(&mut self, host: &HostId, to: HostState, cause: &str, source: Source) {
        let h = self.hosts.get_mut(host).expect("known");
        let owner = h.incident;
        if let Some(from) = step_machine(&mut h.state, to, self.replaying) {
            self.record_move(owner, Subject::Host(host.clone()), from, to, cause, source);
        }
    }

    fn set_resource_state(&mut self, r: &Resource, to: ResourceState, cause: &str, source: Source) {
        let e = self.resources.get_mut(r).expect("known");
        let owner = e.owner;
        if let Some(from) = step_machine(&mut e.state, to, self.replaying) {
            self.record_move(owner, Subject::Resource(r.clone()), from, to, cause, source);
        }
    }

    /// A state change happened: the revision moves, and the owning incident's timeline
    /// shows it.
    fn record_move<S: Machine>(
        &mut self,
        owner: Option<IncidentId>,
        subject: Subject,
        from: S,
        to: S,
        cause: &str,
        source: Source,
    ) {
        self.bump();
        if let Some(inc) = owner {
            self.timeline(
                inc,
                subject,
                &from.to_string(),
                &to.to_string(),
                cause.to_string(),
                source,
            );
        }
    }

    /// A timeline line that records no state change: evidence, a decision's why.
    fn note(&mut self, inc: IncidentId, subject: Subject, cause: String, source: Source) {
        self.timeline(inc, subject, "-", "-", cause, source);
    }

    fn timeline(
        &mut self,
        inc: IncidentId,
        subject: Subject,
        from: &str,
        to: &str,
        cause: String,
        source: Source,
    ) {
        let entry = TimelineEntry {
            at: self.now,
            subject,
            from: from.to_string(),
            to: to.to_string(),
            cause,
            source,
        };
        if let Some(i) = self.incidents.get_mut(&inc) {
            i.timeline.push(entry.clone());
        }
        if !self.replaying {
            self.out.push(Action::RecordTimeline {
                incident: inc,
                entry,
            });
        }
    }

    fn alarm(
        &mut self,
        kind: AlarmKind,
        host: Option<HostId>,
        resource: Option<Resource>,
        reason: String,
    ) {
        if !self.replaying {
            self.out.push(Action::Alarm {
                kind,
                host,
                resource,
                reason,
            });
        }
    }

    /// An alarm about a host, raised once per host incident (or until cleared).
    fn host_alarm(&mut self, host: &HostId, kind: AlarmKind, reason: String) {
        let h = self.hosts.get_mut(host).expect("known");
        if !h.alarmed.insert(kind) {
            return;
        }
        let inc = h.incident;
        self.bump();
        if let Some(inc) = inc {
            self.note(
                inc,
                Subject::Host(host.clone()),
                format!("alarm {kind:?}: {reason}"),
                Source::Controller,
            );
        }
        self.alarm(kind, Some(host.clone()), None, reason);
    }
}

/// Moves `state` to `to`, returning where it was; `None` when it is there already. A
/// move the machine does not allow is a bug in the engine (replay restores states
/// without walking every move).
fn step_machine<S: Machine>(state: &mut S, to: S, replaying: bool) -> Option<S> {
    let from = *state;
    if from == to {
        return None;
    }
    debug_assert!(
        replaying || from.can_become(to),
        "illegal transition {from:?} -> {to:?}"
    );
    *state = to;
    Some(from)
}

/// The key of an operator's command about a host, issued at `now`.
fn operator_key(step: &str, now: Timestamp, host: &HostId) -> IntentKey {
    IntentKey::derive(
        KeyScope::Operator,
        &format!("{step}@{}", now.0),
        &Subject::Host(host.clone()),
    )
}

/// Two accounts of a failure (eBPF's and libvirt's) within the correlation window of
/// each other, on the same clock, are the same failure.
fn same_failure(a: ListedAt, b: ListedAt, window: Duration) -> bool {
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    match (a, b) {
        (ListedAt::Host(a), ListedAt::Host(b)) => a.0.abs_diff(b.0) <= window,
        (ListedAt::Controller(a), ListedAt::Controller(b)) => a.0.abs_diff(b.0) <= window,
        _ => false,
    }
}

/// Where a disk stall is: its start or its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stall {
    Started,
    Ended,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stall::Started => "disk stall started",
            Stall::Ended => "disk stall ended",
        })
    }
}

fn verifier_source(by: FenceVerifier) -> Source {
    match by {
        FenceVerifier::IpmiPowerOff => Source::Ipmi,
        FenceVerifier::PacemakerHistory => Source::Pacemaker,
        FenceVerifier::SelfFenceDeadline => Source::SelfFence,
    }
}

#[cfg(test)]
mod tests;
