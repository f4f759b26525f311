//! The decisions that move incidents forward: fence, force down, restart in place,
//! evacuate, each issued as an intent once its preconditions hold.

use super::*;

impl Engine {
    pub(super) fn decide_fence(&mut self, host: &HostId, cause: &str, source: Source) {
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

    pub(super) fn reconcile(&mut self) {
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
        self.reconcile_unsure();
    }

    /// With the self-fence opted in, a host being fenced whose last heartbeat did not say
    /// "armed" is never counted fenced by its silence: its incident says so once, so the
    /// operator looking at a stuck fence knows the deadline does not apply (the reason is
    /// in the host view, from the heartbeat).
    fn note_unarmed_self_fence(&mut self, host: &HostId) {
        if self.cfg.self_fence_margin.is_none() {
            return;
        }
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        let Some(inc) = h.incident else {
            return;
        };
        if h.state != HostState::Fencing
            || h.fenced_by.is_some()
            || h.self_fence.is_some()
            || h.self_fence_unarmed_noted
        {
            return;
        }
        h.self_fence_unarmed_noted = true;
        self.note(
            inc,
            Subject::Host(host.clone()),
            "self-fence not counted: the host's last heartbeat did not say its self-fence is \
             armed (the host view's self_fence says why)"
                .into(),
            Source::Heartbeat,
        );
    }

    pub(super) fn reconcile_host(&mut self, host: &HostId) {
        self.note_unarmed_self_fence(host);
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
                // Silence is reckoned from the controller's receive times; the timeout is
                // the one the host's last heartbeat promised (no setting to keep equal on
                // both sides), and a host that did not say "armed" is never fenced by it.
                let silence = self.judge(host).1;
                let self_fenced = match (self.cfg.self_fence_margin, h.self_fence) {
                    (Some(margin), Some(timeout)) => silence >= timeout.saturating_add(margin),
                    _ => false,
                };
                let attempt = h.fence.attempts + 1;
                let resources: Vec<Resource> = h.owned.iter().cloned().collect();
                let rbd_only: Vec<Resource> = h.owned.intersection(&h.rbd_only).cloned().collect();
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
                        rbd_only,
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
                } else if now >= h.fence.next_at && self.gate.open() && self.silent(host) {
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
                        rbd_only,
                    };
                    self.issue(key, intent);
                }
            }
            HostState::Fenced | HostState::Evacuating if self.restore_held(host) => {
                // Heard from the watchdog process that ran at its power fence: see
                // restore_held.
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
                let awaiting = h.awaiting_word.clone();
                let uncovered = self.storage_uncovered(host);
                let mut all_done = true;
                for r in owned {
                    let e = &self.resources[&r];
                    if e.owner != Some(inc) {
                        continue;
                    }
                    all_done = false;
                    if uncovered.contains(&r) {
                        // Fenced by its blocklist alone: a disk off RBD may still be
                        // written by the copy on the host (the alarm below).
                        continue;
                    }
                    if e.in_flight.is_some()
                        || now < e.retry_at
                        || awaiting.contains(&r)
                        || self.unsure.contains_key(&r)
                    {
                        continue;
                    }
                    let attempt = match e.state {
                        ResourceState::Evacuating { attempt } => attempt + 1,
                        _ => 1,
                    };
                    self.issue_evacuate(&r, host, inc, attempt);
                }
                if !uncovered.is_empty() {
                    let names: Vec<String> = uncovered.iter().map(ToString::to_string).collect();
                    self.host_alarm(
                        host,
                        AlarmKind::StorageFenceUncovered,
                        format!(
                            "fenced by its Ceph blocklist alone, which does not stop writes to \
                             disks off RBD: {} not restored (power the host off and unfence \
                             it, or fix its power fence)",
                            names.join(", ")
                        ),
                    );
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
                    let (fenced_watchdog, contradicted) = (h.fenced_watchdog, h.fence_contradicted);
                    h.clear_incident();
                    (h.fenced_watchdog, h.fence_contradicted) = (fenced_watchdog, contradicted);
                    h.fenced_at = fenced_at;
                    h.fenced_by = fenced_by;
                    h.heard_since_fence = heard;
                    h.last_incident = Some(inc);
                }
            }
            _ => {}
        }
    }

    /// The resources of a host fenced by its storage fence alone (a Ceph blocklist) that
    /// the fence does not cover: some disk off RBD, or disks not known when the fence
    /// was issued. Empty for any other fence.
    pub(super) fn storage_uncovered(&self, host: &HostId) -> BTreeSet<Resource> {
        let h = &self.hosts[host];
        if h.fenced_by != Some(FenceVerifier::CephBlocklist) {
            return BTreeSet::new();
        }
        h.owned
            .iter()
            .filter(|r| !h.storage_covered.contains(*r))
            .cloned()
            .collect()
    }

    /// Whether a fenced host's restore waits: it was power-fenced and is heard from the
    /// watchdog process (same boot id, same incarnation) heard when the fence was
    /// verified. Heard after the verification, that process ran through the power-off,
    /// which did not happen (`fence_contradicted`): it waits for an operator. Heard only
    /// before it (its last heartbeats may have left just before the power-off), it waits
    /// until the host is silent. A host that rebooted (a new boot id) was powered off; a
    /// self-fenced one stays up by design and is not held. A new incarnation on the same
    /// boot (the daemon restarted) is not taken as proof either way: it is how a lab
    /// host, which shares the test machine's kernel, comes back from its power-off.
    pub(super) fn restore_held(&self, host: &HostId) -> bool {
        let h = &self.hosts[host];
        h.fence_contradicted
            || (h.fenced_watchdog.is_some()
                && h.fenced_watchdog == h.watchdog
                && !self.silent(host))
    }

    pub(super) fn reconcile_resource(&mut self, r: &Resource) {
        let e = &self.resources[r];
        let inc = e.owner.expect("owned");
        let host = e.host.clone();
        let hstate = self.hosts.get(&host).map_or(HostState::Up, |h| h.state);
        let can_restart = r.kind().restarts_in_place() && hstate == HostState::Up;
        let fenced = hstate.fenced();
        if self.now < e.retry_at || self.unsure.contains_key(r) {
            // A failed try's pause, or an unanswered one that may have started it.
            return;
        }
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

    pub(super) fn issue_evacuate(
        &mut self,
        r: &Resource,
        from: &HostId,
        inc: IncidentId,
        attempt: u32,
    ) {
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
}
