//! What the hosts report: qemu exits (eBPF, libvirt), disk stalls and inventories,
//! folded into incidents under the one-owner rule; late news recognised on its own clock.

use super::*;

impl Engine {
    pub(super) fn on_host_event(&mut self, host: HostId, event: HostEvent) {
        self.ensure_host(&host);
        match event {
            HostEvent::ResourceExited {
                resource,
                source,
                at,
                reason,
            } => self.on_exit(&host, resource, source, ListedAt::Host(at), &reason),
            HostEvent::ResourceRemoved { resource, what, at } => {
                self.note_copy_removed(&host, &resource, &what, at)
            }
            HostEvent::DiskStallStarted { resource, at } => {
                self.note_stall(&host, resource, at, Stall::Started)
            }
            HostEvent::DiskStallEnded { resource, at } => {
                self.note_stall(&host, resource, at, Stall::Ended)
            }
            HostEvent::Inventory {
                resources,
                stopped,
                rbd_only,
                source,
                at,
            } => {
                // Only the watchdog's listing knows the disks (Nova's and Neutron's
                // leave this empty, which must not erase it).
                if source == Source::Libvirt {
                    let h = self.hosts.get_mut(&host).expect("ensured");
                    h.rbd_only = rbd_only.into_iter().collect();
                    h.listed_at = Some(self.now);
                }
                self.forget_stopped(&host, &stopped, at);
                self.on_inventory(&host, resources, source, at)
            }
            HostEvent::StorageFenceLifted { removed, error } => {
                self.on_storage_fence_lifted(&host, removed, error)
            }
            HostEvent::DiskLeases {
                daemon_running,
                unprotected,
                reason,
            } => self.on_disk_leases(
                &host,
                LeaseWord {
                    daemon_running,
                    unprotected: unprotected.into_iter().collect(),
                    reason,
                },
            ),
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

    pub(super) fn on_exit(
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
        if let (
            ListedAt::Host(t),
            Some(Restored {
                host_clock: None, ..
            }),
        ) = (at, e.restored)
        {
            // Not yet comparable with the restore: judged once the host's next
            // heartbeat dates it (`release_held_exits`).
            let held = HeldExit {
                resource: resource.clone(),
                source,
                at: t,
                reason: reason.to_string(),
            };
            let h = self.hosts.get_mut(host).expect("known");
            // (A restore told to a process that had not met the host yet was not put
            // on its list to date.)
            h.undated.insert(resource.clone());
            if !h.held_exits.contains(&held) {
                if h.held_exits.len() >= MAX_HELD_EXITS {
                    h.held_exits.remove(0);
                }
                h.held_exits.push(held);
                self.bump();
            }
            if let Some(inc) = self.resources[&resource].owner {
                self.note(
                    inc,
                    subject,
                    format!("held until {host}'s clock dates the last restore: {cause}"),
                    source,
                );
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

    /// The exits held for the host's clock, judged now that its heartbeat dated the
    /// restores they wait for.
    pub(super) fn release_held_exits(&mut self, host: &HostId) {
        let held = std::mem::take(&mut self.hosts.get_mut(host).expect("known").held_exits);
        for x in held {
            self.on_exit(host, x.resource, x.source, ListedAt::Host(x.at), &x.reason);
        }
    }

    /// Resources stopped on purpose are no longer running there, and nothing is to be
    /// restored: the engine forgets them (unless an incident owns them; it finishes).
    /// Started again, they come back with the next inventory. A list taken before the
    /// resource's last restore is old news (it shows the stop that the restore undid).
    pub(super) fn forget_stopped(&mut self, host: &HostId, stopped: &[Resource], at: ListedAt) {
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

    /// Records the lift of a host's storage fence on its last unfenced incident; a
    /// failure is an alarm, for the host cannot write to RBD until it is lifted.
    fn on_storage_fence_lifted(
        &mut self,
        host: &HostId,
        removed: Vec<String>,
        error: Option<String>,
    ) {
        let inc = self.hosts[host].unfenced_from;
        let line = match &error {
            None => format!("storage fence lifted: {}", removed.join(", ")),
            Some(e) => {
                format!("lifting the storage fence failed (the host cannot write to RBD): {e}")
            }
        };
        if let Some(inc) = inc {
            self.note(inc, Subject::Host(host.clone()), line, Source::Ceph);
        }
        match error {
            Some(e) => self.host_alarm(
                host,
                AlarmKind::StorageUnfenceFailed,
                format!(
                    "its Ceph blocklist entries could not be removed after its unfence, so \
                     its VMs cannot write to RBD: {e} (remove them with `ceph osd blocklist rm`)"
                ),
            ),
            None => {
                self.clear_host_alarm(host, AlarmKind::StorageUnfenceFailed);
            }
        }
    }

    /// The host's disk leases as its watchdog reports them. Lost (the daemon down, or
    /// VMs running without their leases): an alarm naming the host and its VMs, once
    /// until they are back, and the host is no restore target meanwhile
    /// ([`HostView::not_a_target`], which the restore backends read).
    fn on_disk_leases(&mut self, host: &HostId, word: LeaseWord) {
        let h = self.hosts.get_mut(host).expect("known");
        if h.leases.as_ref() == Some(&word) {
            return;
        }
        let was_lost = h.leases.as_ref().and_then(LeaseWord::lost).is_some();
        let lost = word.lost();
        let vms: Vec<String> = word.unprotected.iter().map(|r| r.to_string()).collect();
        let inc = h.incident;
        h.leases = Some(word);
        self.bump();
        match lost {
            Some(why) => {
                if let Some(inc) = inc {
                    self.note(
                        inc,
                        Subject::Host(host.clone()),
                        format!("disk leases lost: {why}"),
                        Source::Ebpf,
                    );
                }
                if was_lost {
                    return;
                }
                self.host_alarm(
                    host,
                    AlarmKind::DiskLeasesLost,
                    format!(
                        "{why}; unprotected VMs: [{}]. A second start of them elsewhere would \
                         not be refused; the host is no restore target until every VM it \
                         runs holds its leases again (start its lease daemon, restart \
                         libvirtd so that it registers its lockspaces again, then restart \
                         or migrate the VMs listed)",
                        vms.join(", ")
                    ),
                );
            }
            None => {
                if self.clear_host_alarm(host, AlarmKind::DiskLeasesLost) {
                    if let Some(inc) = inc {
                        self.note(
                            inc,
                            Subject::Host(host.clone()),
                            "disk leases back: every running VM holds its leases".into(),
                            Source::Ebpf,
                        );
                    }
                }
            }
        }
    }

    pub(super) fn on_inventory(
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
                    if listed_before_restore(e, at) || source == Source::Nova {
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
            self.hear_word_on_arrivals(host, &listed, &covers, source, at);
            if !hstate.fenced() {
                self.forget_moved_copies_not_listed(host, &listed, &covers, at);
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
                let stopping = self.stop_listed_copies(host, &stale, at);
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
                    } else if stopping > 0 {
                        format!(
                            "host reports resources that run elsewhere: {}; the VMs moved \
                             off it are being destroyed there (their autostart turned off)",
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

    /// A host unfenced before it was back keeps what was moved off it marked (its
    /// copies are destroyed when listed); a listing of it, newer than their restore,
    /// that does not show one settles that one: listed later, someone migrated it there.
    fn forget_moved_copies_not_listed(
        &mut self,
        host: &HostId,
        listed: &BTreeSet<Resource>,
        covers: &dyn Fn(&Resource) -> bool,
        at: ListedAt,
    ) {
        let gone: Vec<Resource> = self.hosts[host]
            .evacuated
            .iter()
            .filter(|r| {
                covers(r)
                    && !listed.contains(*r)
                    && self
                        .resources
                        .get(*r)
                        .is_none_or(|e| !listed_before_restore(e, at))
            })
            .cloned()
            .collect();
        let h = self.hosts.get_mut(host).expect("known");
        for r in gone {
            h.evacuated.remove(&r);
        }
    }

    /// A host's listing, newer than their restore, settles the arrivals it was fenced
    /// with by its self-fence deadline: listed, they run there and the incident lets
    /// them go; not listed, they are dead and the incident restores them elsewhere.
    pub(super) fn hear_word_on_arrivals(
        &mut self,
        host: &HostId,
        listed: &BTreeSet<Resource>,
        covers: &dyn Fn(&Resource) -> bool,
        source: Source,
        at: ListedAt,
    ) {
        let waiting: Vec<Resource> = self.hosts[host]
            .awaiting_word
            .iter()
            .filter(|r| covers(r))
            .filter(|r| self.resources.get(*r).is_some_and(|e| e.after_restore(at)))
            .cloned()
            .collect();
        if waiting.is_empty() {
            return;
        }
        for r in waiting {
            self.hosts
                .get_mut(host)
                .expect("known")
                .awaiting_word
                .remove(&r);
            let Some(inc) = self.resources.get(&r).and_then(|e| e.owner) else {
                continue;
            };
            if listed.contains(&r) {
                self.note(
                    inc,
                    Subject::Resource(r.clone()),
                    "listed by its host: it runs there; left running".into(),
                    source,
                );
                if let Some(e) = self.resources.get_mut(&r) {
                    e.owner = None;
                }
                if let Some(h) = self.hosts.get_mut(host) {
                    h.owned.remove(&r);
                }
            } else {
                self.note(
                    inc,
                    Subject::Resource(r.clone()),
                    "not listed by its host since its restore: it died with the host; \
                     restoring it elsewhere"
                        .into(),
                    source,
                );
            }
        }
        let h = self.hosts.get_mut(host).expect("known");
        if h.awaiting_word.is_empty() && h.alarmed.remove(&AlarmKind::AwaitingHostWord) {
            self.bump();
        }
    }

    /// A `Recovered` host (fenced, everything it owned handled) whose routers Neutron
    /// lists only now (it was unreachable at force-down): the host incident reopens
    /// (`Recovered → Evacuating`, same incident, so a replayed log rebuilds it) and
    /// takes the routers it never heard of that are still bound there; they are moved
    /// like the others, then it is `Recovered` again. Routers it lists that run
    /// elsewhere are the stale report, not this; given-up ones stay given up.
    pub(super) fn reopen_for_late_resources(&mut self, host: &HostId, listed: &BTreeSet<Resource>) {
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
}

/// A listing that shows a resource the engine has on another host is old news only on a
/// clock its restore is dated on too: the controller's (a lister of the controller's,
/// Neutron). A host dates its listing on its own clock, and the restore is dated on the
/// clock of the host it went to: no host clock is compared with another's, so such a
/// listing counts as current.
fn listed_before_restore(e: &ResourceEntry, at: ListedAt) -> bool {
    matches!(at, ListedAt::Controller(_)) && e.before_restore(at)
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
