//! What the engine keeps per host and per resource, and the safety gate.

use super::*;

#[derive(Clone, Debug)]
pub(super) struct HostEntry {
    pub(super) state: HostState,
    /// Heard since it was (re)registered with the detector (its last reset).
    pub(super) heard: bool,
    /// The deadline the host is queued at in the engine's deadline heap (deadlines.rs);
    /// an entry at another time is a stale one.
    pub(super) queued: Option<Timestamp>,
    pub(super) incident: Option<IncidentId>,
    pub(super) boot_id: Option<u64>,
    /// The last heartbeat's self-fence: armed with this timeout (see [`Heartbeat`]).
    pub(super) self_fence: Option<Duration>,
    /// The current incident's timeline says its self-fence did not count (once).
    pub(super) self_fence_unarmed_noted: bool,
    /// The watchdog process last heard: `(boot id, incarnation)`. The incarnation is
    /// raised at every start of the daemon.
    pub(super) watchdog: Option<(u64, u64)>,
    pub(super) confirm_asked_at: Option<Timestamp>,
    pub(super) awaiting_confirmation: bool,
    pub(super) verdict: Option<(Verdict, Source)>,
    /// Fence tries of the current incident.
    pub(super) fence: Retry,
    pub(super) fenced_by: Option<FenceVerifier>,
    pub(super) fenced_at: Option<Timestamp>,
    /// Force-down tries of the current incident.
    pub(super) force_down: Retry,
    pub(super) owned: BTreeSet<Resource>,
    pub(super) folded: BTreeSet<Resource>,
    pub(super) stale: BTreeSet<Resource>,
    pub(super) alarmed: BTreeSet<AlarmKind>,
    /// The host incident that ended in `Recovered`: a source listing resources of the
    /// fenced host late (Neutron was unreachable at force-down) reopens it.
    pub(super) last_incident: Option<IncidentId>,
    /// Resources restored elsewhere by this host's incidents since its fence, until it
    /// is unfenced: what its data plane may still hold (the stale-router report). Kept
    /// here, not in the router restorer, so that it is rebuilt from the intent log.
    pub(super) evacuated: BTreeSet<Resource>,
    /// A heartbeat was received after the verified fence (controller clock): the host
    /// is back, and waits to be trusted again.
    pub(super) heard_since_fence: bool,
    /// The watchdog process (boot id, incarnation) last heard when a power fence (BMC,
    /// Pacemaker) was verified; `None` for a self-fence (the host stays up by design)
    /// or when none was heard yet (a replayed log). The same process heard after the
    /// verification ran through the power-off: the host was never powered off.
    pub(super) fenced_watchdog: Option<(u64, u64)>,
    /// `fenced_watchdog` was heard after its power fence was verified: the evidence was
    /// false (a BMC that says off for a host that stays on, or the wrong host fenced).
    /// Nothing more of the incident is restored.
    pub(super) fence_contradicted: bool,
    /// Resources a backend started here while the host was silent (suspect, confirming
    /// or being fenced; its incident takes them, for its fence stops them): a self-fence
    /// deadline says nothing about them (the host may have rebooted meanwhile), only a
    /// power fence does. Forgotten when the host is heard again.
    pub(super) arrived: BTreeSet<Resource>,
    /// Arrivals of a host fenced by its self-fence deadline: they may have died with it
    /// or run on it after a reboot. Not restored elsewhere, nor taken as running, until
    /// the host lists what it runs (a listing newer than their restore).
    pub(super) awaiting_word: BTreeSet<Resource>,
    /// The host's own clock as the controller reckons it from its heartbeats: a restore
    /// onto this host is dated with it, so that the host's later news can be told from
    /// its earlier news without comparing its clock with the controller's.
    pub(super) clock: Option<HostClock>,
    /// Resources restored onto this host while its clock was unknown: the next
    /// heartbeat dates their restore.
    pub(super) undated: BTreeSet<Resource>,
    /// Exits the host reported, on its own clock, about resources whose restore is not
    /// dated on that clock yet: they cannot be told from news older than the restore (a
    /// stream replaying its backlog to a new leader), so they wait for the heartbeat
    /// that dates the restore and are judged then (at most [`MAX_HELD_EXITS`]).
    pub(super) held_exits: Vec<HeldExit>,
    /// Resources whose every disk is on RBD, as the host's watchdog last listed them.
    pub(super) rbd_only: BTreeSet<Resource>,
    /// What the current fence attempt's intent recorded of `rbd_only` (see
    /// `Intent::Fence`): the resources a storage fence alone may restore.
    pub(super) storage_covered: BTreeSet<Resource>,
    /// The incident of the host's last unfence: where lifting its storage fence is
    /// recorded.
    pub(super) unfenced_from: Option<IncidentId>,
    /// When the host's watchdog last listed what it runs (controller clock, received).
    pub(super) listed_at: Option<Timestamp>,
    /// When a restore of a VM moved off this host last completed (controller clock). A
    /// host fenced by its blocklist alone ran on: only a listing received after that
    /// shows whether the copies it ran are gone, so it is not trusted again before one.
    pub(super) moved_off_at: Option<Timestamp>,
    /// What the host's watchdog last said of its disk leases; `None`: it watches none.
    pub(super) leases: Option<LeaseWord>,
}

/// A host's disk leases as its watchdog last reported them (`HostEvent::DiskLeases`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LeaseWord {
    pub(super) daemon_running: bool,
    pub(super) unprotected: BTreeSet<Resource>,
    pub(super) reason: String,
}

impl LeaseWord {
    /// Why the host's VMs are not protected by their leases, if they are not.
    pub(super) fn lost(&self) -> Option<String> {
        if !self.daemon_running {
            Some(format!("its disk-lease daemon is down ({})", self.reason))
        } else if !self.unprotected.is_empty() {
            Some(format!(
                "{} VMs run without their disk leases ({})",
                self.unprotected.len(),
                self.reason
            ))
        } else {
            None
        }
    }
}

/// An exit report waiting for its host's clock (see `HostEntry::held_exits`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HeldExit {
    pub(super) resource: Resource,
    pub(super) source: Source,
    pub(super) at: HostTime,
    pub(super) reason: String,
}

/// Exits held per host at most: a host runs far fewer resources; beyond it the oldest
/// is dropped, for the host's inventory reports what is gone anyway.
pub(super) const MAX_HELD_EXITS: usize = 256;

impl HostEntry {
    pub(super) fn new() -> Self {
        HostEntry {
            state: HostState::Up,
            incident: None,
            boot_id: None,
            self_fence: None,
            self_fence_unarmed_noted: false,
            watchdog: None,
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
            fenced_watchdog: None,
            fence_contradicted: false,
            arrived: BTreeSet::new(),
            awaiting_word: BTreeSet::new(),
            clock: None,
            undated: BTreeSet::new(),
            held_exits: Vec::new(),
            rbd_only: BTreeSet::new(),
            storage_covered: BTreeSet::new(),
            unfenced_from: None,
            listed_at: None,
            moved_off_at: None,
            leases: None,
            queued: None,
            heard: false,
        }
    }

    /// Forget everything about the (closed) host incident.
    pub(super) fn clear_incident(&mut self) {
        let keep = (
            self.state,
            self.boot_id,
            self.self_fence,
            self.watchdog,
            std::mem::take(&mut self.stale),
            self.last_incident,
            std::mem::take(&mut self.evacuated),
            self.clock,
            std::mem::take(&mut self.undated),
            std::mem::take(&mut self.held_exits),
            std::mem::take(&mut self.rbd_only),
            self.unfenced_from,
            self.listed_at,
            self.moved_off_at,
            self.leases.take(),
        );
        *self = HostEntry::new();
        (
            self.state,
            self.boot_id,
            self.self_fence,
            self.watchdog,
            self.stale,
            self.last_incident,
            self.evacuated,
            self.clock,
            self.undated,
            self.held_exits,
            self.rbd_only,
            self.unfenced_from,
            self.listed_at,
            self.moved_off_at,
            self.leases,
        ) = keep;
    }
}

/// A host action that is retried (a fence, a force-down): tries so far, the one in
/// flight, and when the next may start.
#[derive(Clone, Debug, Default)]
pub(super) struct Retry {
    pub(super) attempts: u32,
    pub(super) in_flight: Option<IntentKey>,
    pub(super) next_at: Timestamp,
}

#[derive(Clone, Debug)]
pub(super) struct ResourceEntry {
    pub(super) host: HostId,
    pub(super) state: ResourceState,
    pub(super) owner: Option<IncidentId>,
    pub(super) in_flight: Option<IntentKey>,
    /// Resource-level intents issued under the current owner (key step counter).
    pub(super) steps: u32,
    pub(super) restarts: Vec<Timestamp>,
    /// When it was last started again (in place or elsewhere).
    pub(super) restored: Option<Restored>,
    /// A failed restore is not tried again before this (a target that failed at once,
    /// such as a host whose stream is reconnecting, gets time to recover).
    pub(super) retry_at: Timestamp,
    /// The incident opened by the last failure, and when that failure happened (on the
    /// clock of whoever saw it): a second account of the same failure (libvirt after
    /// eBPF) that arrives after the incident has ended still belongs to its timeline.
    pub(super) last_failure: Option<(IncidentId, ListedAt)>,
}

/// A host's clock as the controller reckons it: a reading heard from the host, and when
/// (controller clock) it was heard. The reading plus the controller's own time since is
/// a lower bound of the host's clock now (the reading was on its way for a while), and
/// no host clock is ever compared with the controller's.
#[derive(Clone, Copy, Debug)]
pub(super) struct HostClock {
    pub(super) read: HostTime,
    pub(super) heard_at: Timestamp,
}

impl HostClock {
    pub(super) fn at(&self, now: Timestamp) -> HostTime {
        let since = u64::try_from(now.since(self.heard_at).as_millis()).unwrap_or(u64::MAX);
        HostTime(self.read.0.saturating_add(since))
    }
}

/// How far a host's clock as the controller reckons it ([`HostClock`]: the last
/// heartbeat's send time plus the controller's time since it arrived) may run behind the
/// host's own: by that heartbeat's time in transit, and by what the host's clock gained
/// since (drift). A restore dated on the reckoning may have happened that much later on
/// the host's clock, so a listing dated within this after it may have been taken before
/// it: it is no proof that the restored resource is gone (the next listing is).
pub(super) const RECKONING_SLACK: Duration = Duration::from_secs(1);

/// When a resource was last restored, on both clocks that may date news about it: the
/// controller's, and its host's as last heard at that moment (unknown until the host is
/// heard). The line between news from before the restore (late) and after it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Restored {
    pub(super) at: Timestamp,
    pub(super) host_clock: Option<HostTime>,
}

impl ResourceEntry {
    pub(super) fn new(host: HostId) -> Self {
        ResourceEntry {
            host,
            state: ResourceState::Running,
            owner: None,
            in_flight: None,
            steps: 0,
            restarts: Vec::new(),
            restored: None,
            retry_at: Timestamp::ZERO,
            last_failure: None,
        }
    }

    /// News dated `t` happened before the resource's last restore. Each clock is
    /// compared only with itself; news whose clock the restore has no date on (its host
    /// was not heard yet) is not late.
    pub(super) fn before_restore(&self, t: ListedAt) -> bool {
        match (self.restored, t) {
            (None, _) => false,
            (Some(r), ListedAt::Controller(at)) => at < r.at,
            (Some(r), ListedAt::Host(at)) => r.host_clock.is_some_and(|c| at < c),
        }
    }

    /// News dated `t` is newer than the resource's last restore (never true while the
    /// restore has no date on that clock: a listing of unknown age does not undo it).
    /// On the host's clock only beyond [`RECKONING_SLACK`]: the restore's date there is
    /// reckoned, and may run behind.
    pub(super) fn after_restore(&self, t: ListedAt) -> bool {
        match (self.restored, t) {
            (None, _) => true,
            (Some(r), ListedAt::Controller(at)) => at > r.at,
            (Some(r), ListedAt::Host(at)) => r.host_clock.is_some_and(|c| {
                let slack = u64::try_from(RECKONING_SLACK.as_millis()).unwrap_or(u64::MAX);
                at.0 > c.0.saturating_add(slack)
            }),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Known {
    pub(super) record: IntentRecord,
    pub(super) done: bool,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Gate {
    pub(super) isolated: bool,
    pub(super) mass: bool,
}

impl Gate {
    pub(super) fn open(&self) -> bool {
        !self.isolated && !self.mass
    }
}
