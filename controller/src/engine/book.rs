//! The incident book: incidents, who owns which resource, every state move and note
//! on their timelines, and alarms.

use super::*;

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

impl Engine {
    pub(super) fn note_incident_id(&mut self, id: Option<IncidentId>) {
        if let Some(id) = id {
            self.next_incident = self.next_incident.max(id.0 + 1);
        }
    }

    pub(super) fn ensure_incident(&mut self, id: IncidentId, subject: Subject, at: Timestamp) {
        self.note_incident_id(Some(id));
        self.incidents.entry(id).or_insert(Incident {
            id,
            subject,
            opened_at: at,
            closed_at: None,
            timeline: Vec::new(),
        });
    }

    /// Puts what an incident's timeline held before a resume (as the store kept it:
    /// written by the process or the leader that acted before) in place of the lines
    /// the replay rebuilt, in front of what this engine has recorded since. The
    /// timeline is a record for operators; no decision reads it.
    pub fn restore_timeline(&mut self, id: IncidentId, earlier: Vec<TimelineEntry>) {
        let replayed = self.replayed_lines.remove(&id).unwrap_or(0);
        if let Some(incident) = self.incidents.get_mut(&id) {
            let rebuilt = replayed.min(incident.timeline.len());
            let since: Vec<TimelineEntry> = incident.timeline.drain(rebuilt..).collect();
            incident.timeline = earlier;
            incident.timeline.extend(since);
            self.bump();
        }
    }

    pub(super) fn incident_subject(&self, id: IncidentId) -> Subject {
        self.incidents
            .get(&id)
            .map(|i| i.subject.clone())
            .unwrap_or(Subject::Host(HostId::new("?")))
    }

    pub(super) fn new_incident(&mut self, subject: Subject) -> IncidentId {
        let id = IncidentId(self.next_incident);
        self.next_incident += 1;
        self.ensure_incident(id, subject, self.now);
        self.bump();
        id
    }

    pub(super) fn open_host_incident(&mut self, host: &HostId) {
        let id = self.new_incident(Subject::Host(host.clone()));
        let h = self.hosts.get_mut(host).expect("known");
        h.clear_incident();
        h.incident = Some(id);
    }

    pub(super) fn open_resource_incident(&mut self, r: &Resource, cause: &str, source: Source) {
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

    pub(super) fn close_incident(&mut self, id: IncidentId) {
        let now = self.now;
        if let Some(i) = self.incidents.get_mut(&id) {
            if i.closed_at.is_none() {
                i.closed_at = Some(now);
                self.closed.push_back(id);
                self.bump();
            }
        }
        // In batches (every half bound of closes), so that finding what is still
        // referred to (every host and resource) is paid once per many closes.
        if self.closed.len() > self.forget_at {
            self.forget_old_closed_incidents();
            self.forget_at = self.closed.len() + self.cfg.closed_incidents_kept / 2;
        }
    }

    /// Forgets the oldest closed incidents beyond [`Config::closed_incidents_kept`],
    /// with their intents, except one something still refers to: a host's (last)
    /// incident (a late listing may reopen it, a returned host's copies are noted on
    /// it), a resource's owner, a given-up resource's failure, a stall, or an intent
    /// not yet answered. Ids are never reused, so a forgotten incident's keys cannot be
    /// issued again, a late answer to one is ignored as a done one is, and a late note
    /// on one still reaches the store (`RecordTimeline`).
    fn forget_old_closed_incidents(&mut self) {
        let mut referred: BTreeSet<IncidentId> = BTreeSet::new();
        for h in self.hosts.values() {
            referred.extend(h.incident);
            referred.extend(h.last_incident);
            referred.extend(h.unfenced_from);
        }
        for e in self.resources.values() {
            referred.extend(e.owner);
            // A given-up VM's later accounts of the same failure are noted on it.
            if e.state == ResourceState::GaveUp {
                referred.extend(e.last_failure.map(|(i, _)| i));
            }
        }
        referred.extend(self.stalls.values().copied());
        for k in self.intents.values().filter(|k| !k.done) {
            referred.extend(k.record.intent.incident());
        }
        let mut kept = std::collections::VecDeque::new();
        while self.closed.len() + kept.len() > self.cfg.closed_incidents_kept {
            let Some(id) = self.closed.pop_front() else {
                break;
            };
            let still_closed = self
                .incidents
                .get(&id)
                .is_some_and(|i| i.closed_at.is_some());
            if !still_closed {
                // Reopened (queued again when it closes again) or already gone.
                continue;
            }
            if referred.contains(&id) {
                kept.push_back(id);
                continue;
            }
            self.incidents.remove(&id);
            self.replayed_lines.remove(&id);
            self.forgotten += 1;
            let prefix = format!("{id}/");
            let keys: Vec<IntentKey> = self
                .intents
                .range(IntentKey(prefix.clone())..)
                .take_while(|(k, _)| k.as_str().starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                self.intents.remove(&k);
            }
        }
        // The referred-to ones wait at the front, oldest first, for the next batch.
        while let Some(id) = kept.pop_back() {
            self.closed.push_front(id);
        }
    }

    /// Host incident over without a fence (heartbeats resumed, maintenance): hand the
    /// crashes folded into it to their own incidents.
    pub(super) fn close_host_incident(&mut self, host: &HostId) {
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

    pub(super) fn take_ownership(&mut self, r: &Resource, inc: IncidentId, host: &HostId) {
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

    pub(super) fn set_host_state(
        &mut self,
        host: &HostId,
        to: HostState,
        cause: &str,
        source: Source,
    ) {
        let h = self.hosts.get_mut(host).expect("known");
        let owner = h.incident;
        if to == HostState::Up {
            // Heard again: what arrived during the silence is judged by the next one.
            h.arrived.clear();
            h.awaiting_word.clear();
        }
        if let Some(from) = step_machine(&mut h.state, to, self.replaying) {
            self.record_move(owner, Subject::Host(host.clone()), from, to, cause, source);
        }
    }

    pub(super) fn set_resource_state(
        &mut self,
        r: &Resource,
        to: ResourceState,
        cause: &str,
        source: Source,
    ) {
        let e = self.resources.get_mut(r).expect("known");
        let owner = e.owner;
        if let Some(from) = step_machine(&mut e.state, to, self.replaying) {
            self.record_move(owner, Subject::Resource(r.clone()), from, to, cause, source);
        }
    }

    /// A state change happened: the revision moves, and the owning incident's timeline
    /// shows it.
    pub(super) fn record_move<S: Machine>(
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
    pub(super) fn note(
        &mut self,
        inc: IncidentId,
        subject: Subject,
        cause: String,
        source: Source,
    ) {
        self.timeline(inc, subject, "-", "-", cause, source);
    }

    pub(super) fn timeline(
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

    pub(super) fn alarm(
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
    pub(super) fn host_alarm(&mut self, host: &HostId, kind: AlarmKind, reason: String) {
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

impl Engine {
    /// Ends a host alarm's hold (`host_alarm` raises it again after this); whether it was
    /// raised.
    pub(super) fn clear_host_alarm(&mut self, host: &HostId, kind: AlarmKind) -> bool {
        let cleared = self
            .hosts
            .get_mut(host)
            .is_some_and(|h| h.alarmed.remove(&kind));
        if cleared {
            self.bump();
        }
        cleared
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
