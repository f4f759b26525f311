//! Restores whose outcome is not known: the hosts that may run the resource, asking
//! them, and settling it once one says it runs it, or every one has said no or been
//! powered off.
//!
//! An evacuation that was sent and not answered (a command that timed out, a stream
//! that closed, an answer lost with a restarted controller) may have started the
//! resource. Trying it anywhere else before that is ruled out could run it twice, so the
//! resource waits: each host that may run it is asked ([`Action::AskHost`]) until it
//! answers. A host rules itself out by answering "not running" (its watchdog answers
//! after every command sent to it before has finished), or by a power fence (BMC,
//! Pacemaker) verified after the evacuation was sent, or while it has not been heard
//! since. A self-fence deadline rules nothing out: the host may have rebooted and
//! started what it was sent. One host answering "running" settles it there.
//!
//! A restart in place not answered is held the same way on its own host: once its
//! restarts are spent the next step is an evacuation, which must not start a second
//! copy of a restart that did take.

use super::*;

/// How long a host that could not be asked (no stream, no answer) waits before it is
/// asked again.
pub(super) const ASK_AGAIN: Duration = Duration::from_secs(1);

/// What was sent and not answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tried {
    /// An evacuation off `from`.
    Evacuation,
    /// A restart in place on `from` (its target).
    Restart,
}

impl Tried {
    fn name(self) -> &'static str {
        match self {
            Tried::Evacuation => "evacuation",
            Tried::Restart => "restart in place",
        }
    }
}

/// A restore sent and not answered.
#[derive(Clone, Debug)]
pub(super) struct Unsure {
    pub(super) tried: Tried,
    pub(super) incident: IncidentId,
    pub(super) from: HostId,
    pub(super) attempt: u32,
    /// When its outcome became unknown (controller clock): a power fence verified after
    /// this stopped whatever the evacuation started.
    pub(super) since: Timestamp,
    /// Where it was sent; `None`: not known, so every host but `from` may run it,
    /// including hosts first heard after this began (a restarted controller hears its
    /// hosts again one by one).
    pub(super) target: Option<HostId>,
    /// The hosts that have ruled themselves out.
    pub(super) cleared: BTreeSet<HostId>,
    /// When the hosts still waited for are asked (again).
    pub(super) ask_at: Timestamp,
}

impl Engine {
    /// Whether the restore backend knows, after a controller restart, where an
    /// evacuation it was handed went. Nova does (the server record names its host, and
    /// a second evacuate is refused while the first runs); the libvirt backend picks a
    /// target the store does not record, so an unanswered evacuation is not handed to
    /// it again: it is not known, and the hosts are asked.
    pub(super) fn restorer_remembers_targets(&self, r: &Resource) -> bool {
        r.kind() != ResourceKind::Vm || self.cfg.vm_restorer != Source::Libvirt
    }

    /// The evacuation `attempt` of `resource` off `from` may have started it on
    /// `target` (anywhere but `from` when `None`), or the restart `attempt` on `from`
    /// (`target` is `from`): hold it until that is settled.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn begin_unsure(
        &mut self,
        tried: Tried,
        resource: &Resource,
        from: &HostId,
        incident: IncidentId,
        attempt: u32,
        target: Option<HostId>,
        reason: &str,
    ) {
        // A host known only from the store (heard by an earlier controller process)
        // gets a detector entry: silent, it is suspected and fenced like any other.
        let known: Vec<HostId> = match &target {
            Some(t) => vec![t.clone()],
            None => self.hosts_in_store.iter().cloned().collect(),
        };
        for h in &known {
            self.ensure_host(h);
        }
        let u = Unsure {
            tried,
            incident,
            from: from.clone(),
            attempt,
            since: self.now,
            target,
            cleared: BTreeSet::new(),
            ask_at: self.now,
        };
        let may_run = self.may_run(&u);
        let names: Vec<String> = may_run.iter().map(|h| h.to_string()).collect();
        self.note(
            incident,
            Subject::Resource(resource.clone()),
            format!(
                "{} #{attempt}: outcome not known ({reason}); not tried again or elsewhere \
                 until it is known not to run on: {}",
                tried.name(),
                names.join(", ")
            ),
            self.source_for(resource),
        );
        self.alarm(
            AlarmKind::RestoreOutcomeUnknown,
            None,
            Some(resource.clone()),
            format!(
                "{} #{attempt} not answered ({reason}); asking {}",
                tried.name(),
                names.join(", ")
            ),
        );
        self.unsure.insert(resource.clone(), u);
        self.bump();
    }

    /// The hosts that may still run what `u` sent and have not ruled themselves out.
    fn may_run(&self, u: &Unsure) -> BTreeSet<HostId> {
        let candidates: Vec<HostId> = match &u.target {
            Some(t) => vec![t.clone()],
            None => self
                .hosts
                .keys()
                .filter(|h| **h != u.from)
                .cloned()
                .collect(),
        };
        candidates
            .into_iter()
            .filter(|h| !u.cleared.contains(h))
            .collect()
    }

    /// Whether `host` cannot be running what an evacuation sent at `since` started: a
    /// power fence verified after it, or one it has not been heard from since and is
    /// silent. (Not heard is not enough: a resumed controller has heard nobody yet, and
    /// a host that came back after its fence may have been sent the start by the
    /// process that died.)
    fn ruled_out(&self, host: &HostId, since: Timestamp) -> bool {
        let Some(h) = self.hosts.get(host) else {
            return false;
        };
        let power = matches!(
            h.fenced_by,
            Some(FenceVerifier::IpmiPowerOff | FenceVerifier::PacemakerHistory)
        );
        let silent = self.silent(host);
        h.state.fenced()
            && power
            && (h.fenced_at.is_some_and(|t| t >= since) || !h.heard_since_fence && silent)
    }

    /// Per reconcile: drops the hosts a power fence ruled out, settles what no host may
    /// run any more, and asks the others when due.
    pub(super) fn reconcile_unsure(&mut self) {
        let resources: Vec<Resource> = self.unsure.keys().cloned().collect();
        for r in resources {
            let u = &self.unsure[&r];
            let out: Vec<HostId> = self
                .may_run(u)
                .into_iter()
                .filter(|h| self.ruled_out(h, u.since))
                .collect();
            for h in out {
                let u = self.unsure.get_mut(&r).expect("present");
                let inc = u.incident;
                u.cleared.insert(h.clone());
                self.note(
                    inc,
                    Subject::Resource(r.clone()),
                    format!("{h} is powered off: it does not run it"),
                    Source::Controller,
                );
            }
            let u = &self.unsure[&r];
            let ask = self.may_run(u);
            if ask.is_empty() {
                self.settle_not_running(&r);
                continue;
            }
            if self.now >= u.ask_at {
                let u = self.unsure.get_mut(&r).expect("present");
                u.ask_at = self.now + ASK_AGAIN;
                for host in ask {
                    self.out.push(Action::AskHost {
                        host,
                        resource: r.clone(),
                    });
                }
            }
        }
    }

    /// A host's answer to [`Action::AskHost`].
    pub(super) fn on_host_answer(&mut self, host: &HostId, r: &Resource, runs: Option<bool>) {
        let Some(u) = self.unsure.get(r) else {
            return;
        };
        if !self.may_run(u).contains(host) {
            return;
        }
        let inc = u.incident;
        match runs {
            None => {}
            Some(false) => {
                let u = self.unsure.get_mut(r).expect("present");
                u.cleared.insert(host.clone());
                self.note(
                    inc,
                    Subject::Resource(r.clone()),
                    format!("{host} does not run it"),
                    self.source_for(r),
                );
                if self.may_run(&self.unsure[r]).is_empty() {
                    self.settle_not_running(r);
                }
            }
            Some(true) => {
                let u = self.unsure[r].clone();
                self.note(
                    inc,
                    Subject::Resource(r.clone()),
                    format!(
                        "{host} runs it: the unanswered {} #{} started it",
                        u.tried.name(),
                        u.attempt
                    ),
                    self.source_for(r),
                );
                // Recorded, so a restarted controller knows it too; the outcome settles
                // it (apply_outcome, then `found_running`).
                let key = IntentKey::derive(u.incident, &format!("found-{}", u.attempt), r);
                let intent = Intent::FoundRunning {
                    resource: r.clone(),
                    from: u.from.clone(),
                    incident: u.incident,
                    attempt: u.attempt,
                    restart: u.tried == Tried::Restart,
                };
                // Already recorded (by a process that died before its outcome; this
                // one asked again): its outcome is still to come.
                self.issue(key.clone(), intent);
                let outcome = IntentOutcome::Restore(RestoreOutcome::Ok { host: host.clone() });
                if !self.complete(&key, outcome) {
                    self.unsure.remove(r);
                    self.bump();
                }
            }
        }
    }

    /// A host said it runs what an unanswered restore was for (live, or replayed from
    /// its [`Intent::FoundRunning`]): settled there.
    pub(super) fn found_running(
        &mut self,
        r: &Resource,
        from: &HostId,
        incident: IncidentId,
        restart: bool,
        on: &HostId,
        host_clock: Option<HostTime>,
    ) {
        if self.unsure.remove(r).is_some() {
            self.bump();
        }
        if restart {
            self.restart_settled(r, incident, Ok(host_clock));
        } else {
            self.evacuated_to(r, from, incident, on, host_clock);
        }
    }

    /// No host may run it: the unanswered restore counts as a failed one.
    fn settle_not_running(&mut self, r: &Resource) {
        let u = self.unsure.remove(r).expect("present");
        self.bump();
        let reason = "its outcome was not known, and no host runs it";
        match u.tried {
            Tried::Evacuation => self.evacuation_failed(r, u.incident, u.attempt, reason),
            Tried::Restart => self.restart_settled(r, u.incident, Err(reason)),
        }
        // Tried again at once: its pause was the wait for the hosts' word.
        if let Some(e) = self.resources.get_mut(r) {
            e.retry_at = self.now;
        }
    }
}
