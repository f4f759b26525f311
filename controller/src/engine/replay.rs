//! Intents: issuing and completing them, the state each implies (live and on replay),
//! and rebuilding an engine from the intent log after a restart.

use super::*;

impl Engine {
    /// Rebuilds an engine from the intent log after a restart or leader change.
    ///
    /// Open incidents (those that recorded intents) come back in the state their
    /// intents and results imply; intents recorded but not done are handed to the edges
    /// again with the same key (they deduplicate); done intents are never issued again.
    /// Hosts get a fresh detector grace period from `now`.
    pub fn resume(cfg: Config, log: &dyn IntentLog, now: Timestamp) -> (Engine, Vec<Action>) {
        Self::resume_knowing(cfg, log, &[], now)
    }

    /// [`Engine::resume_knowing`] for a controller that takes the lead from another: it
    /// was hearing the hosts' heartbeats while it followed, and `heard` says when it
    /// last heard each host on each path (at or before `now`). Silence then counts from
    /// those times, not from `now`: a host that died with the old leader is suspected
    /// as soon as its silence is long enough, without a fresh grace period. A host
    /// never heard keeps the grace period from `now`.
    pub fn resume_warm(
        cfg: Config,
        log: &dyn IntentLog,
        hosts_in_store: &[HostId],
        heard: &[(HostId, PathId, Timestamp)],
        now: Timestamp,
    ) -> (Engine, Vec<Action>) {
        let (mut e, actions) = Self::resume_knowing(cfg, log, hosts_in_store, now);
        e.note_heard(heard);
        (e, actions)
    }

    /// Notes heartbeats heard elsewhere (by this controller while it followed), each at
    /// its own time, at or before the engine's `now`: the hosts become known and their
    /// silence counts from then. Decides nothing by itself.
    pub fn note_heard(&mut self, heard: &[(HostId, PathId, Timestamp)]) {
        for (host, path, at) in heard {
            self.ensure_host(host);
            self.detector.heard_before(host, *path, (*at).min(self.now));
            if let Some(h) = self.hosts.get_mut(host) {
                h.heard = true;
            }
            self.queue_deadline(host);
        }
    }

    /// [`Engine::resume`], knowing the hosts an earlier controller process heard from
    /// (the store's event streams): an evacuation it sent and never heard back about
    /// may run on any of them.
    pub fn resume_knowing(
        cfg: Config,
        log: &dyn IntentLog,
        hosts_in_store: &[HostId],
        now: Timestamp,
    ) -> (Engine, Vec<Action>) {
        let mut e = Engine::new(cfg);
        e.hosts_in_store = hosts_in_store.iter().cloned().collect();
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
        e.replayed_lines = e
            .incidents
            .iter()
            .map(|(id, i)| (*id, i.timeline.len()))
            .collect();
        e.now = now.max(e.now);
        let now = e.now;
        let hosts: Vec<HostId> = e.hosts.keys().cloned().collect();
        for h in &hosts {
            e.reset_silence(h, now);
        }
        for entry in &entries {
            if entry.done.is_none() {
                if let Intent::Evacuate { resource, .. } = &entry.record.intent {
                    if !e.restorer_remembers_targets(resource) {
                        // Handed again, the backend would pick a target afresh, maybe
                        // another one than the first: not known, and the hosts are asked.
                        e.complete(
                            &entry.record.key,
                            IntentOutcome::Restore(RestoreOutcome::Unknown {
                                target: None,
                                reason: "the controller restarted before the answer, and the backend does not \
                                         remember where it sent it"
                                    .into(),
                            }),
                        );
                        continue;
                    }
                }
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
                    e.handed(&entry.record.key);
                    e.rehanded.insert(entry.record.key.clone());
                }
            }
        }
        e.arm_tick();
        e.reconcile();
        let out = std::mem::take(&mut e.out);
        (e, out)
    }

    /// Records and emits an intent. Returns false (and does nothing) if the key exists.
    pub(super) fn issue(&mut self, key: IntentKey, intent: Intent) -> bool {
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
            self.handed(&key);
        }
        true
    }

    /// Completes an open intent. Late or duplicate results (unknown or done keys) are
    /// ignored.
    pub(super) fn complete(&mut self, key: &IntentKey, outcome: IntentOutcome) -> bool {
        let record = match self.intents.get_mut(key) {
            Some(k) if !k.done => {
                k.done = true;
                k.record.clone()
            }
            _ => return false,
        };
        self.handed.remove(key);
        self.rehanded.remove(key);
        // A restore is dated on its host's clock too (see `Restored`).
        let host_clock = match (&record.intent, &outcome) {
            (
                Intent::RestartInPlace { .. }
                | Intent::Evacuate { .. }
                | Intent::FoundRunning { .. },
                IntentOutcome::Restore(RestoreOutcome::Ok { host }),
            ) => self
                .hosts
                .get(host)
                .and_then(|h| h.clock)
                .map(|c| c.at(self.now)),
            _ => None,
        };
        // A self-fence kills the VMs, not the host: its watchdog goes on by design.
        let fenced_watchdog = match (&record.intent, &outcome) {
            (
                Intent::Fence { host, .. },
                IntentOutcome::Fence(FenceOutcome::Verified(
                    FenceVerifier::IpmiPowerOff | FenceVerifier::PacemakerHistory,
                )),
            ) => self.hosts.get(host).and_then(|h| h.watchdog),
            _ => None,
        };
        let completion = Completion {
            at: self.now,
            outcome,
            host_clock,
            fenced_watchdog,
        };
        self.out.push(Action::CompleteIntent {
            key: key.clone(),
            completion: completion.clone(),
        });
        self.apply_outcome(&record, &completion);
        true
    }

    /// The state an issued intent implies (live and on replay).
    pub(super) fn apply_issue(&mut self, rec: &IntentRecord) {
        let key = &rec.key;
        self.bump();
        match &rec.intent {
            Intent::Fence {
                host,
                incident,
                attempt,
                method,
                resources,
                rbd_only,
            } => {
                self.ensure_host(host);
                self.ensure_incident(*incident, Subject::Host(host.clone()), rec.at);
                self.hosts.get_mut(host).expect("ensured").storage_covered =
                    rbd_only.iter().cloned().collect();
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
                // A later try supersedes an unanswered one's wait (a replayed log: the
                // wait was settled before this was issued).
                self.supersede_wait(resource, *incident, host);
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
                self.supersede_wait(resource, *incident, from);
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
            // Settled by its outcome (apply_outcome).
            Intent::FoundRunning { .. } => {}
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
                    self.reset_silence(host, now);
                    self.queue_deadline(host);
                }
            }
            Intent::Unfence {
                host,
                before_return,
            } => {
                self.ensure_host(host);
                self.stop_copies_before_trust(host);
                let now = self.now;
                let inc = self.hosts[host].incident;
                let h = self.hosts.get_mut(host).expect("ensured");
                h.unfenced_from = inc.or(h.last_incident);
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
                // Trusted before it is back: those destroys cannot reach it, and its
                // libvirt may autostart what was moved off it when it boots. What was
                // moved stays marked until a listing of its return settles it.
                if !before_return {
                    h.evacuated.clear();
                }
                h.last_incident = None;
                h.fenced_at = None;
                self.reset_silence(host, now);
                self.queue_deadline(host);
            }
        }
    }

    /// The state a result implies (live and on replay).
    pub(super) fn apply_outcome(&mut self, rec: &IntentRecord, completion: &Completion) {
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
                            // When it was verified (on replay, the log's time, not the
                            // resumed engine's: an evacuation sent before it is not one
                            // it stopped).
                            h.fenced_at = Some(completion.at);
                            h.fenced_watchdog = completion.fenced_watchdog;
                            self.set_host_state(
                                host,
                                HostState::Fenced,
                                &format!("fence verified ({by:?})"),
                                verifier_source(*by),
                            );
                            if *by == FenceVerifier::SelfFenceDeadline {
                                self.await_word_on_arrivals(host, *incident);
                            }
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
                    // Forcing a service down again is harmless: not known is failed.
                    RestoreOutcome::Failed { reason } | RestoreOutcome::Unknown { reason, .. } => {
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
                    resource,
                    incident,
                    host,
                    attempt,
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
                            RestoreOutcome::Failed { .. } | RestoreOutcome::Unknown { .. } => {
                                ResourceState::Failed
                            }
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
                        self.restart_settled(resource, *incident, Ok(completion.host_clock));
                    }
                    RestoreOutcome::Failed { reason } => {
                        e.retry_at = now + self.cfg.restore_retry_backoff;
                        self.set_resource_state(
                            resource,
                            ResourceState::Failed,
                            &format!("restart failed: {reason}"),
                            Source::Libvirt,
                        );
                    }
                    // A second start on the same host would be harmless ("already
                    // running"), but once the restarts are spent the next step is an
                    // evacuation: held until the host says (unsure.rs).
                    RestoreOutcome::Unknown { reason, .. } => {
                        self.begin_unsure(
                            Tried::Restart,
                            resource,
                            host,
                            *incident,
                            *attempt,
                            Some(host.clone()),
                            reason,
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
                match o {
                    RestoreOutcome::Ok { host: to } => {
                        self.evacuated_to(resource, from, *incident, to, completion.host_clock);
                    }
                    RestoreOutcome::Failed { reason } => {
                        self.evacuation_failed(resource, *incident, *attempt, reason);
                    }
                    RestoreOutcome::Unknown { target, reason } => {
                        self.begin_unsure(
                            Tried::Evacuation,
                            resource,
                            from,
                            *incident,
                            *attempt,
                            target.clone(),
                            reason,
                        );
                    }
                }
            }
            (
                Intent::FoundRunning {
                    resource,
                    from,
                    incident,
                    restart,
                    ..
                },
                IntentOutcome::Restore(RestoreOutcome::Ok { host: on }),
            ) => {
                self.ensure_host(on);
                self.ensure_resource(resource, from);
                self.found_running(
                    resource,
                    from,
                    *incident,
                    *restart,
                    on,
                    completion.host_clock,
                );
            }
            _ => {}
        }
    }

    /// A host fenced by its self-fence deadline: what a backend started on it after it
    /// fell silent is not covered by that (it died with the host if the host was merely
    /// cut off, or runs if the host had rebooted meanwhile). The incident keeps it but
    /// neither restores it elsewhere nor lets it go until the host lists what it runs
    /// ([`Engine::hear_word_on_arrivals`]).
    /// Whether `incident` is a resource's own (a crash), not its host's.
    fn is_resource_incident(&self, incident: IncidentId) -> bool {
        self.incidents
            .get(&incident)
            .is_some_and(|i| matches!(i.subject, Subject::Resource(_)))
    }

    /// A restore of `resource` on or off `on` by `incident` ends the wait of an
    /// unanswered try. Live, a later restore is issued only after that wait was settled;
    /// a wait of another incident was settled by a host that said it ran the resource (a
    /// retry would be the same incident's), which the log does not hold: on replay the
    /// later restore says it was `on`, and that settles the wait as it did.
    fn supersede_wait(&mut self, resource: &Resource, incident: IncidentId, on: &HostId) {
        let Some(u) = self.unsure.remove(resource) else {
            return;
        };
        if self.replaying && u.incident != incident {
            match u.tried {
                Tried::Evacuation => self.evacuated_to(resource, &u.from, u.incident, on, None),
                Tried::Restart => self.restart_settled(resource, u.incident, Ok(None)),
            }
        }
    }

    /// A restart in place of `resource` by `incident` took (`Ok`, with the host's clock
    /// when known) or did not (`Err`, why), answered late: its host said after an
    /// unanswered try, or a power fence ruled it out.
    pub(super) fn restart_settled(
        &mut self,
        resource: &Resource,
        incident: IncidentId,
        result: Result<Option<HostTime>, &str>,
    ) {
        let current = self
            .resources
            .get(resource)
            .is_some_and(|e| e.owner == Some(incident));
        match result {
            Ok(host_clock) if current => {
                self.mark_restored(resource, host_clock);
                self.set_resource_state(
                    resource,
                    ResourceState::Running,
                    "restarted in place",
                    Source::Libvirt,
                );
                // Released after the state change, so the change is on the owning
                // incident's timeline.
                if let Some(e) = self.resources.get_mut(resource) {
                    e.owner = None;
                }
                self.close_incident(incident);
            }
            Err(reason) if current => {
                // Tried again at once: its pause was the wait for the host's word.
                self.resources.get_mut(resource).expect("known").retry_at = self.now;
                self.set_resource_state(
                    resource,
                    ResourceState::Failed,
                    &format!("restart failed: {reason}"),
                    Source::Libvirt,
                );
            }
            // Superseded by a host incident meanwhile: the state follows the result, the
            // host incident keeps it.
            _ => {
                let (to, cause) = match result {
                    Ok(_) => (
                        ResourceState::Running,
                        "superseded restart took".to_string(),
                    ),
                    Err(reason) => (
                        ResourceState::Failed,
                        format!("superseded restart failed: {reason}"),
                    ),
                };
                self.set_resource_state(resource, to, &cause, Source::Libvirt);
                if let Some(e) = self.resources.get_mut(resource) {
                    e.retry_at = self.now;
                }
            }
        }
    }

    /// An evacuation of `resource` off `from` by `incident` started it on `to`
    /// (answered, or a host that says it runs it after an unanswered one).
    pub(super) fn evacuated_to(
        &mut self,
        resource: &Resource,
        from: &HostId,
        incident: IncidentId,
        to: &HostId,
        host_clock: Option<HostTime>,
    ) {
        let resource_incident = self.is_resource_incident(incident);
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
        self.mark_restored(resource, host_clock);
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
            self.close_incident(incident);
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
            if let Some(h) = self.hosts.get_mut(&to) {
                h.arrived.insert(resource.clone());
            }
        } else if let Some(h) = self
            .hosts
            .get_mut(to)
            .filter(|h| matches!(h.state, HostState::Suspect | HostState::Confirming))
        {
            // Silent, not yet fenced: a fence decided later takes what
            // runs here, this too, and its self-fence deadline must
            // still tell it apart.
            h.arrived.insert(resource.clone());
        } else if self
            .hosts
            .get(to)
            .is_some_and(|h| h.state.fenced() && h.fenced_by == Some(FenceVerifier::CephBlocklist))
            && !self.replaying
        {
            // Started (the start was sent before) on a host its blocklist alone fenced:
            // the host may be hung, and a VM on RBD there cannot write. Whether it
            // serves is not known; restoring it elsewhere could make a second writer
            // of a VM off RBD. An operator decides.
            let to = to.clone();
            self.host_alarm(
                &to,
                AlarmKind::AwaitingHostWord,
                format!(
                    "{resource} was started on {to} after {to} was fenced by its Ceph \
                     blocklist alone: it may not run or, on RBD, not write; check it there \
                     and restore it by hand"
                ),
            );
        }
        self.stop_copy_left_behind(resource, from);
    }

    /// Evacuation `attempt` of `resource` by `incident` did not start it: try again
    /// after a pause, or give up after the configured tries.
    pub(super) fn evacuation_failed(
        &mut self,
        resource: &Resource,
        incident: IncidentId,
        attempt: u32,
        reason: &str,
    ) {
        let now = self.now;
        let resource_incident = self.is_resource_incident(incident);
        if attempt >= self.cfg.max_evacuate_attempts {
            let e = self.resources.get_mut(resource).expect("known");
            e.steps = 0;
            self.set_resource_state(
                resource,
                ResourceState::GaveUp,
                &format!("evacuation #{attempt} failed: {reason}; giving up"),
                self.source_for(resource),
            );
            // Released after the state change, so the change is on the owning
            // incident's timeline.
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
                self.close_incident(incident);
            }
        } else {
            let e = self.resources.get_mut(resource).expect("known");
            e.retry_at = now + self.cfg.restore_retry_backoff;
            self.note(
                incident,
                Subject::Resource(resource.clone()),
                format!("evacuation #{attempt} failed: {reason}"),
                self.source_for(resource),
            );
        }
    }

    fn await_word_on_arrivals(&mut self, host: &HostId, incident: IncidentId) {
        let arrived = std::mem::take(&mut self.hosts.get_mut(host).expect("known").arrived);
        let mut waiting = Vec::new();
        for r in arrived {
            if self
                .resources
                .get(&r)
                .is_none_or(|e| e.owner != Some(incident))
            {
                continue;
            }
            self.note(
                incident,
                Subject::Resource(r.clone()),
                "started here while the host was silent: its self-fence deadline does not \
                 say whether it still runs; waiting for the host to list what it runs"
                    .into(),
                Source::Controller,
            );
            waiting.push(r.to_string());
            self.hosts
                .get_mut(host)
                .expect("known")
                .awaiting_word
                .insert(r);
        }
        if !waiting.is_empty() {
            self.host_alarm(
                host,
                AlarmKind::AwaitingHostWord,
                format!(
                    "started here while the host was silent, before its self-fence deadline \
                     passed: {}; not restored elsewhere until the host lists what it runs \
                     (or is powered off and unfenced by hand)",
                    waiting.join(", ")
                ),
            );
        }
    }

    /// Dates a resource's restore on the controller's clock and on its host's clock as
    /// last heard (`host_clock`); a host not heard yet dates it with its next heartbeat.
    pub(super) fn mark_restored(&mut self, r: &Resource, host_clock: Option<HostTime>) {
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
    pub(super) fn date_restores(&mut self, host: &HostId, at: HostTime) {
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
}

fn verifier_source(by: FenceVerifier) -> Source {
    match by {
        FenceVerifier::IpmiPowerOff => Source::Ipmi,
        FenceVerifier::PacemakerHistory => Source::Pacemaker,
        FenceVerifier::SelfFenceDeadline => Source::SelfFence,
        FenceVerifier::CephBlocklist => Source::Ceph,
    }
}
