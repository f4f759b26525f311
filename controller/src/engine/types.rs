//! The engine's vocabulary: its inputs (facts from the world), its actions (decisions
//! as values), evidence, outcomes, alarms and the read-only views.
//!
//! Everything here is `serde`-serialisable so that inputs can be recorded, actions
//! written to the store and both replayed in tests.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ids::*;
use super::intent::{IntentKey, IntentRecord};
use super::state::{HostState, ResourceState};

/// Where a piece of evidence came from (timeline `source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Source {
    /// The failure detector (heartbeats).
    Heartbeat,
    /// An eBPF probe on the host.
    Ebpf,
    /// The libvirt event stream.
    Libvirt,
    /// An IPMI BMC.
    Ipmi,
    /// Pacemaker/corosync membership or fencing history.
    Pacemaker,
    /// The host's own self-fence deadline.
    SelfFence,
    /// Ceph (the OSD blocklist, the images' watchers).
    Ceph,
    /// Nova (inventory, evacuation).
    Nova,
    /// Neutron (router moves).
    Neutron,
    /// An operator command.
    Operator,
    /// The controller's own decision (timers, gates).
    Controller,
}

/// What an independent source says about a silent host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The host is down (not a member, powered off).
    Dead,
    /// The host is up: the controller is cut off from it, the host is fine.
    Alive,
    /// The source does not know.
    Unknown,
}

/// Which evidence verified a fence. Only these count (DESIGN rule 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FenceVerifier {
    /// The BMC reports chassis power off.
    IpmiPowerOff,
    /// Pacemaker's fencing history says the node was fenced.
    PacemakerHistory,
    /// Opt-in: the host's self-fence deadline passed while its watchdog was armed.
    SelfFenceDeadline,
    /// A storage fence: the host's Ceph client addresses are on the OSD blocklist (an
    /// entry made by this attempt) and none of them still watches an image. It stops
    /// the host's writes to RBD, not the host: only VMs whose every disk is on RBD may
    /// be restored on it alone (the fence level's `counts = "alone"`).
    CephBlocklist,
}

/// The outcome of a fence action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceOutcome {
    /// Fenced and verified by independent evidence.
    Verified(FenceVerifier),
    /// The agent says it fenced, but nothing verified it: an alarm, never a restore.
    Unverified {
        /// Why it could not be verified.
        reason: String,
    },
    /// The fence did not happen.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The outcome of a restore action (restart in place, evacuate, force-down).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestoreOutcome {
    /// Done; for a restore, the host the resource now runs on.
    Ok {
        /// Where the resource runs now (for force-down: the host itself).
        host: HostId,
    },
    /// Not done.
    Failed {
        /// Why.
        reason: String,
    },
    /// Not known: the restore was sent and may have been carried out, but no answer
    /// came (a command that timed out, a stream that closed before the answer, an
    /// answer lost with the controller process that waited for it). The resource is
    /// neither retried elsewhere nor taken as running until the host that may run it
    /// says (see [`Action::AskHost`]) or is fenced.
    Unknown {
        /// Where the restore was sent; `None`: the edge does not know (it forgot with a
        /// restarted controller), so every host may run it.
        target: Option<HostId>,
        /// Why it is not known.
        reason: String,
    },
}

/// Something a host's watchdog reported (over the reliable event stream), or Nova's
/// inventory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostEvent {
    /// A resource's process exited or crashed (eBPF exit probe, libvirt Stopped/Failed),
    /// or it stopped working while its process lives on (a guest watchdog that fired and
    /// left the guest hung): either way it must be restarted.
    ResourceExited {
        /// Which resource.
        resource: Resource,
        /// Who saw it.
        source: Source,
        /// When it happened (the host's clock).
        at: HostTime,
        /// Signal, OOM, libvirt reason...
        reason: String,
    },
    /// A qemu thread or block request started stalling on I/O (timeline only).
    DiskStallStarted {
        /// Affected resource, if known.
        resource: Option<Resource>,
        /// When.
        at: HostTime,
    },
    /// The stall ended (timeline only).
    DiskStallEnded {
        /// Affected resource, if known.
        resource: Option<Resource>,
        /// When.
        at: HostTime,
    },
    /// A resource's domain on the host was destroyed or undefined by the host's own
    /// management (libvirt's `stopped (destroyed)` or `undefined`: Nova's compute, an
    /// operator, the controller's own stale-copy destroy). Someone's decision, not a
    /// failure: the engine only notes it where it ends a copy that was moved away.
    ResourceRemoved {
        /// Which resource.
        resource: Resource,
        /// What happened to it ("destroyed", "undefined").
        what: String,
        /// When (the host's clock).
        at: HostTime,
    },
    /// The full list of resources running on the host.
    Inventory {
        /// The resources.
        resources: Vec<Resource>,
        /// Resources defined on the host but stopped on someone's decision (libvirt:
        /// shut off because destroyed, shut down, saved, migrated): no longer running,
        /// and not failed either. The engine stops tracking them.
        #[serde(default)]
        stopped: Vec<Resource>,
        /// Of `resources`, those whose every disk is an RBD image (libvirt's network
        /// disks of protocol `rbd`, as the watchdog lists them): the ones a Ceph
        /// blocklist alone stops from writing. Empty from sources that do not know the
        /// disks (Nova, Neutron) and from older watchdogs.
        #[serde(default)]
        rbd_only: Vec<Resource>,
        /// Who reported it (the watchdog's scan or Nova).
        source: Source,
        /// When the list was taken.
        at: ListedAt,
    },
    /// A source could not list the host's resources and keeps trying (Neutron
    /// unreachable while a fenced host's routers are to be listed). The resources it
    /// would list stay where they are until its inventory comes, late.
    InventoryFailed {
        /// Who tried (Neutron).
        source: Source,
        /// Why it failed.
        reason: String,
    },
    /// The host's compute service reports to its control plane again (Nova: the
    /// forced-down `nova-compute`'s `updated_at` moves). A fact only: whether that
    /// unfences the host is the engine's decision ([`super::Config::auto_unfence`]).
    ComputeServiceReporting,
    /// The host's storage fence was lifted after its unfence (its Ceph blocklist
    /// entries removed), or lifting it failed: `error` says why, and the host cannot
    /// write to RBD until an operator removes them.
    StorageFenceLifted {
        /// What was removed (`ceph osd blocklist rm 10.0.0.5:0/0`), for the timeline.
        removed: Vec<String>,
        /// Why lifting failed, if it did.
        error: Option<String>,
    },
    /// The host's disk leases, from a watchdog that watches them (libvirt's lock
    /// manager, virtlockd): whether their daemon runs, and which VMs run without their
    /// leases. A host that never said this is not judged by its leases.
    DiskLeases {
        /// The lease daemon runs.
        daemon_running: bool,
        /// VMs running on the host whose disks are not all leased (all of them while
        /// the daemon is down): another host could start them a second time.
        unprotected: Vec<Resource>,
        /// The watchdog's account, for people.
        reason: String,
    },
}

/// Timers the engine asks for; the runtime feeds them back as [`Input::Timer`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TimerId {
    /// The periodic evaluation tick (detector, deadlines, retries).
    Tick,
}

/// Why the engine refused an operator command (the operator is told; nothing changed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What was refused and why, for the operator.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Refusal {}

/// A command from `defibctl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorCommand {
    /// Planned work on a host: silence is not a failure.
    MaintenanceOn {
        /// The host.
        host: HostId,
    },
    /// Planned work is over.
    MaintenanceOff {
        /// The host.
        host: HostId,
    },
    /// Trust a host again after it was fenced (DESIGN rule 5) or after a failed fence.
    Unfence {
        /// The host.
        host: HostId,
    },
}

impl OperatorCommand {
    /// The host it is about.
    pub fn host(&self) -> &HostId {
        match self {
            OperatorCommand::MaintenanceOn { host }
            | OperatorCommand::MaintenanceOff { host }
            | OperatorCommand::Unfence { host } => host,
        }
    }
}

/// One heartbeat datagram, as the ingest decoded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sender.
    pub host: HostId,
    /// Which network it came over.
    pub path: PathId,
    /// The host's boot id (changes on reboot).
    pub boot_id: u64,
    /// The watchdog process incarnation (changes on daemon restart).
    pub incarnation: u64,
    /// Sent at (host clock); liveness is judged by the receive time.
    pub at: HostTime,
    /// When it reached the controller (controller clock), if the runtime knows: a
    /// heartbeat that waited in the controller's queues is dated by its arrival, not
    /// by when the engine took it. `None`: at the step's `now`.
    #[serde(default)]
    pub received: Option<Timestamp>,
    /// The host's self-fence: `Some(t)` when its watchdog says it is armed (proven able
    /// to kill its qemus) and self-fences within `t` (its own isolation timeout) of
    /// losing the controller; `None` when not armed, off, or unknown (an older watchdog).
    pub self_fence: Option<Duration>,
}

/// Everything the engine reacts to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// A heartbeat arrived.
    Heartbeat(Heartbeat),
    /// A host event arrived.
    HostEvent {
        /// The host it is about.
        host: HostId,
        /// The event.
        event: HostEvent,
    },
    /// A timer the engine armed fired.
    Timer(TimerId),
    /// The runtime's measure of the controller's own load (lag, heartbeats it lost),
    /// reported periodically: silence the controller caused is not held against hosts.
    Load(super::load::ControllerLoad),
    /// An independent source answered a [`Action::Confirm`].
    ConfirmationResult {
        /// The host.
        host: HostId,
        /// Who answered.
        source: Source,
        /// What they said.
        verdict: Verdict,
    },
    /// A fence finished.
    FenceResult {
        /// The host.
        host: HostId,
        /// The intent it answers.
        key: IntentKey,
        /// How it went.
        outcome: FenceOutcome,
    },
    /// A host-level restore action finished: a force-down (Nova compute service
    /// forced down) or an unfence.
    HostActionResult {
        /// The host.
        host: HostId,
        /// The intent it answers.
        key: IntentKey,
        /// How it went.
        outcome: RestoreOutcome,
    },
    /// A restart in place or an evacuation finished.
    RestoreResult {
        /// The resource.
        resource: Resource,
        /// The intent it answers.
        key: IntentKey,
        /// How it went.
        outcome: RestoreOutcome,
    },
    /// A host answered an [`Action::AskHost`]: whether the resource runs there now,
    /// as its watchdog sees it after every command it was sent before has finished.
    HostAnswer {
        /// The host asked.
        host: HostId,
        /// The resource asked about.
        resource: Resource,
        /// `Some(true)`: it runs there (active in any state); `Some(false)`: it does
        /// not (not defined, or shut off); `None`: the host could not be asked (no open
        /// stream, no answer in time, an error), so nothing is known yet.
        runs: Option<bool>,
    },
}

/// How the runtime should fence (a hint; the fencer edge picks the agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceMethod {
    /// Power off over IPMI and read the power state back.
    Ipmi,
    /// Ask Pacemaker to fence the node and read its fencing history.
    Pacemaker,
}

/// Kinds of alarms (each raised once per episode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlarmKind {
    /// More than the configured share of hosts look dead at once: fencing stopped.
    MassFailure,
    /// The controller hears no host at all: it suspects itself, fences nobody.
    ControllerIsolated,
    /// An independent source says a silent host is alive: not fenced.
    HostAliveButSilent,
    /// A fence failed.
    FenceFailed,
    /// A fence could not be verified: no restore.
    FenceUnverified,
    /// Fencing gave up after the configured attempts: operator needed.
    FenceExhausted,
    /// A power-fenced host was heard from the same watchdog process (boot id and
    /// incarnation) after its fence was verified: the evidence was false (a BMC answering off for a host that stays on).
    /// Nothing more of it is restored; operator needed.
    FenceContradicted,
    /// Forcing the compute service down failed.
    ForceDownFailed,
    /// A fenced host's resources could not be listed (Neutron unreachable: its routers
    /// are not moved yet); the lister keeps trying, and they are moved once it answers.
    InventoryFailed,
    /// A resource could not be restored: given up.
    RestoreGaveUp,
    /// A fenced host is heartbeating again and waits for an unfence.
    HostBackAwaitingUnfence,
    /// A host reports a resource that runs elsewhere (stale qemu); a VM the engine moved
    /// off that host is destroyed there ([`Action::StopStaleCopy`]).
    StaleResource,
    /// A host fenced by its self-fence deadline had resources started on it while it
    /// was silent: whether they run is not known until the host lists what it runs;
    /// they are neither restored elsewhere nor taken as running until then.
    AwaitingHostWord,
    /// A host fenced by its Ceph blocklist alone runs VMs with disks off RBD: the
    /// blocklist does not stop those, so they are not restored (an operator powers the
    /// host off and unfences it, or fixes its power fence).
    StorageFenceUncovered,
    /// A host's storage fence could not be lifted after its unfence: it cannot write to
    /// RBD until an operator removes its blocklist entries.
    StorageUnfenceFailed,
    /// A host's disk leases are lost: its lease daemon (virtlockd) died or restarted,
    /// so VMs run there without their leases and a second start of them elsewhere would
    /// not be refused. The host is no restore target until every running VM holds its
    /// leases again (see [`HostView::not_a_target`]).
    DiskLeasesLost,
    /// An evacuation or a restart in place was sent and not answered: it may have
    /// started the resource. It is tried again nowhere until every host that may run it
    /// has said it does not, or was powered off since; a host that says it runs it
    /// settles it there.
    RestoreOutcomeUnknown,
    /// An operator command was refused (unfence of a host that is not clean or not
    /// fenced, maintenance during a fence).
    CommandRefused,
    /// The controller is the slow one: its heartbeats wait longer than
    /// [`super::Config::overload_lag`] between the kernel and the engine, its timers
    /// fire that late, or it lost heartbeats itself (a full socket or engine queue).
    /// While it lasts, every host's silence deadline is extended by the controller's
    /// own lag and blind time (capped by [`super::Config::max_overload_allowance`]).
    ControllerOverloaded,
    /// Several controllers: this controller led and stopped acting (its lease was not
    /// renewed in time, etcd refused a write, or it was asked to step down). Raised by
    /// the runtime, never by the engine.
    LeadershipLost,
    /// Several controllers: this controller cannot take part in the election (etcd
    /// unreachable, or without quorum); while that lasts no controller may act. Raised
    /// by the runtime, never by the engine.
    NoLeader,
}

/// One line of an incident's timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// When (controller clock).
    pub at: Timestamp,
    /// The host or resource that changed.
    pub subject: Subject,
    /// State before (or `-` for a note).
    pub from: String,
    /// State after (or `-` for a note).
    pub to: String,
    /// Why.
    pub cause: String,
    /// Evidence source.
    pub source: Source,
}

/// A decision, as a value. The runtime carries actions out **in order**; an action with
/// an intent key is always preceded (in the same batch) by the [`Action::PersistIntent`]
/// that records it, except when a resumed engine re-issues an intent that was already
/// recorded but not finished. If persisting fails the runtime must stop before the
/// action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Call back with [`Input::Timer`] at `at`.
    ArmTimer {
        /// Which timer.
        id: TimerId,
        /// When.
        at: Timestamp,
    },
    /// Write the intent to the store before carrying it out.
    PersistIntent(IntentRecord),
    /// Mark the intent done in the store.
    CompleteIntent {
        /// The intent.
        key: IntentKey,
        /// How it ended, and when.
        completion: super::intent::Completion,
    },
    /// Append to an incident's timeline in the store.
    RecordTimeline {
        /// The incident.
        incident: IncidentId,
        /// The line.
        entry: TimelineEntry,
    },
    /// Ask independent sources (Pacemaker membership, IPMI power state) about a silent
    /// host; answer with [`Input::ConfirmationResult`]. Read-only, so no intent.
    Confirm {
        /// The host.
        host: HostId,
    },
    /// Fence the host; answer with [`Input::FenceResult`].
    Fence {
        /// The host.
        host: HostId,
        /// Preferred method.
        method_hint: FenceMethod,
        /// Idempotency key.
        key: IntentKey,
    },
    /// Force the host's compute service down (Nova) so its resources can be evacuated;
    /// answer with [`Input::HostActionResult`].
    ForceDown {
        /// The host.
        host: HostId,
        /// Idempotency key.
        key: IntentKey,
    },
    /// Restart a crashed resource where it was; answer with [`Input::RestoreResult`].
    RestartInPlace {
        /// The resource.
        resource: Resource,
        /// Its (healthy) host.
        host: HostId,
        /// 1-based try number within the window.
        attempt: u32,
        /// Idempotency key.
        key: IntentKey,
    },
    /// Restore a resource elsewhere (Nova evacuate / Neutron router move); answer with
    /// [`Input::RestoreResult`] naming the new host.
    Evacuate {
        /// The resource.
        resource: Resource,
        /// The host it was on (fenced, or healthy with a dead resource).
        from: HostId,
        /// Idempotency key.
        key: IntentKey,
    },
    /// Undo the force-down / Pacemaker unfence for a host an operator trusts again;
    /// answer with [`Input::HostActionResult`].
    Unfence {
        /// The host.
        host: HostId,
        /// Idempotency key.
        key: IntentKey,
    },
    /// Ask `host` whether `resource` runs there now (read-only, so no intent); answer
    /// with [`Input::HostAnswer`]. Asked when a restore's outcome is unknown, before
    /// it is tried anywhere else.
    AskHost {
        /// The host to ask.
        host: HostId,
        /// The resource asked about.
        resource: Resource,
    },
    /// Destroy `host`'s copy of the VM `resource` if it runs there, and stop `host`
    /// from starting it again (libvirt autostart off); its definition stays. The engine
    /// moved the VM off `host` and knows it runs elsewhere, so whatever runs there is a
    /// stale copy (libvirt's autostart on the host's return). No intent and no answer:
    /// destroying a copy that does not run changes nothing, so a repeat is harmless,
    /// and every listing of `host` that still shows the copy asks again.
    StopStaleCopy {
        /// The host the VM was moved off.
        host: HostId,
        /// The VM.
        resource: Resource,
    },
    /// Tell a human.
    Alarm {
        /// What kind.
        kind: AlarmKind,
        /// The host concerned, if any.
        host: Option<HostId>,
        /// The resource concerned, if any.
        resource: Option<Resource>,
        /// Details.
        reason: String,
    },
}

impl Action {
    /// The idempotency key of an action that changes the world.
    pub fn intent_key(&self) -> Option<&IntentKey> {
        match self {
            Action::Fence { key, .. }
            | Action::ForceDown { key, .. }
            | Action::RestartInPlace { key, .. }
            | Action::Evacuate { key, .. }
            | Action::Unfence { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A read-only view of one host, for `defibctl` and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// The host.
    pub host: HostId,
    /// Its state.
    pub state: HostState,
    /// Its open incident.
    pub incident: Option<IncidentId>,
    /// The last heartbeat seen on any path.
    pub last_seen: Option<Timestamp>,
    /// Resources restored elsewhere from this host since it was fenced (its stale
    /// copies to clean up), until it is unfenced. Rebuilt from the intent log.
    pub evacuated: Vec<Resource>,
    /// Fenced, and heard again since the fence (by the controller's receive time) and
    /// not silent now: the host is back and waits to be trusted again.
    pub back: bool,
    /// Why nothing is restored onto this host now, though it may be up (its disk leases
    /// are lost); `None`: it may be a target as far as the engine knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_a_target: Option<String>,
    /// VMs running on it without the protection of their disk leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unprotected: Vec<Resource>,
}

/// A read-only view of one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceView {
    /// The resource.
    pub resource: Resource,
    /// Where the engine believes it runs (or ran).
    pub host: HostId,
    /// Its state.
    pub state: ResourceState,
    /// The incident that owns it, if any.
    pub owner: Option<IncidentId>,
}
