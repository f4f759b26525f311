//! The fake edges: they act on the world after a delay and report back, deduplicating
//! by intent key.

use super::*;

impl Sim<'_> {
    /// Carries out a batch of the current term's actions in order, as the runtime's
    /// engine task does: before each action that leaves the process it checks its
    /// local lease deadline, and every store write is an etcd transaction guarded by
    /// its lease; a deadline passed, or a write refused or unanswered, stops the term
    /// before anything after it.
    pub(super) fn apply_actions(&mut self, actions: Vec<Action>) -> Result<(), Box<Violation>> {
        let mut actions = actions.into_iter();
        while let Some(a) = actions.next() {
            if !self.acting {
                // The term stopped within this batch: nothing more of it runs.
                return Ok(());
            }
            if !matches!(a, Action::ArmTimer { .. } | Action::RecordTimeline { .. }) {
                self.trace(format!("{:>6} OUT {a:?}", self.now));
            }
            let write = matches!(a, Action::PersistIntent(_) | Action::CompleteIntent { .. });
            if acts(&a) {
                if std::mem::take(&mut self.deadline_checked) {
                    // The stalled write: its deadline was checked before the stall.
                } else if self.local_ms(self.leader) >= self.deadline_local {
                    return self.step_down(StepDown::LocalDeadline);
                }
                if write {
                    if let Some(ms) = self.stall_armed.take() {
                        self.stall(ms, std::iter::once(a).chain(actions).collect());
                        return Ok(());
                    }
                    if let Err(e) = self.guard(self.leader, self.lease_id) {
                        return self.step_down(e);
                    }
                }
                self.check_leader_acts(&a)?;
            }
            self.check_action(&a)?;
            match &a {
                Action::ArmTimer { id, at } => {
                    let id = id.clone();
                    let t = self.sim_time_at(*at);
                    self.at(t, Ev::Redeliver(self.lifetime, Input::Timer(id)));
                }
                Action::PersistIntent(_) | Action::CompleteIntent { .. } => {
                    if self.sc.p_store_fail > 0.0 && self.rng.chance(self.sc.p_store_fail) {
                        // The write fails, or the process dies right after it: the
                        // runtime acts on nothing more (the rest of this batch is
                        // dropped) and the process exits, to start again as a follower;
                        // the lease it held expires, and a leader resumes from what was
                        // written.
                        let written = self.rng.chance(0.5);
                        if written {
                            self.log.apply(&a);
                            self.note_write(&a);
                        }
                        self.report.store_failures += 1;
                        self.trace(format!(
                            "{:>6} STORE {}; the controller stops acting and restarts",
                            self.now,
                            if written {
                                "written, then the process died"
                            } else {
                                "write failed"
                            }
                        ));
                        self.kill_process(self.leader);
                        return Ok(());
                    }
                    self.log.apply(&a);
                    self.note_write(&a);
                }
                Action::RecordTimeline { entry, .. } => {
                    if matches!(entry.subject, crate::engine::Subject::Host(_))
                        && entry.to == "Suspect"
                    {
                        self.report.suspects += 1;
                        self.trace(format!("{:>6} SUSPECT {entry:?}", self.now));
                    }
                }
                Action::Alarm { .. } => self.report.alarms += 1,
                // Over the host's event stream, like a command: a host not heard drops
                // it (the engine asks again); its watchdog answers from what runs there.
                Action::AskHost { host, resource } => {
                    self.report.asks += 1;
                    let h = self.index(host);
                    if self.connected(h) {
                        let i = self.res_index(resource);
                        self.later(5, 300, Ev::Answer(h, i, self.lifetime));
                    }
                }
                // Over the host's event stream, open while the controller hears it; a
                // host not heard drops it (its next listing asks again).
                Action::StopStaleCopy { host, resource } => {
                    self.report.stale_copy_stops += 1;
                    let h = self.index(host);
                    if self.connected(h) {
                        let i = self.res_index(resource);
                        self.later(20, 300, Ev::StopCopy(h, i));
                    }
                }
                Action::Confirm { host } => {
                    let h = self.index(host);
                    let w = &self.hosts[h];
                    let verdict = if !w.powered || w.crashed {
                        Verdict::Dead
                    } else if w.hung {
                        Verdict::Unknown
                    } else if self.rng.chance(0.7) {
                        Verdict::Alive
                    } else {
                        Verdict::Unknown
                    };
                    if !self.rng.chance(0.1) {
                        let input = Input::ConfirmationResult {
                            host: host.clone(),
                            source: Source::Pacemaker,
                            verdict,
                        };
                        self.later(50, 500, Ev::Redeliver(self.lifetime, input));
                    }
                }
                Action::Fence { key, .. }
                | Action::ForceDown { key, .. }
                | Action::RestartInPlace { key, .. }
                | Action::Evacuate { key, .. }
                | Action::Unfence { key, .. } => {
                    match a {
                        Action::Fence { .. } => self.report.fences += 1,
                        Action::RestartInPlace { .. } => self.report.restarts += 1,
                        Action::Evacuate { .. } => self.report.evacuations += 1,
                        _ => {}
                    }
                    if matches!(self.effects.get(key), Some(None)) && self.unanswered.contains(key)
                    {
                        // Its answer was lost: handed again (the engine's backstop), the
                        // edge, which kept no answer, asks the world afresh, and the
                        // world answers from its state.
                        self.effects.remove(key);
                        self.under_way.remove(key);
                    }
                    match self.effects.get(key) {
                        // Already done: the fake reports the first outcome again.
                        Some(Some(result)) => {
                            let result = result.clone();
                            self.later(10, 100, Ev::Redeliver(self.lifetime, result));
                        }
                        Some(None) => {}
                        None => {
                            self.effects.insert(key.clone(), None);
                            let (lo, hi) = match a {
                                Action::Fence { .. } => (200, 1_500),
                                Action::Evacuate { .. } => (300, 2_500),
                                Action::RestartInPlace { .. } => (100, 800),
                                _ => (20, 300),
                            };
                            let nova = match &a {
                                Action::Evacuate { resource, .. } => self.remembers(resource),
                                _ => true,
                            };
                            if let (true, Some(asker)) = (nova, self.under_way.get_mut(key)) {
                                // Joins the request under way: its answer comes here.
                                *asker = self.lifetime;
                            } else {
                                // The libvirt backend keeps no record outside its
                                // process: handed again, it sends a start again.
                                self.under_way.insert(key.clone(), self.lifetime);
                                let target = self.pick_target(&a);
                                if let (Some(t), Action::Evacuate { resource, .. }) = (target, &a) {
                                    let i = self.res_index(resource);
                                    *self.starts_on_way.entry((t, i)).or_default() += 1;
                                }
                                self.later(lo, hi, Ev::Exec(a.clone(), self.lifetime, target));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Carries out an action in the world and reports back to the process that sent
    /// it, if that one still runs. The world answers a repeated action from its state,
    /// as Nova and libvirt do: a power-off of a host that is off is a success, an
    /// evacuation of a VM that already left the failed host reports where it is, a
    /// start of a running domain is a success.
    pub(super) fn exec(
        &mut self,
        a: Action,
        life: u64,
        sent_to: Option<usize>,
    ) -> Result<(), Box<Violation>> {
        self.check_exec_intent(&a)?;
        if let (Some(t), Action::Evacuate { resource, .. }) = (sent_to, &a) {
            let i = self.res_index(resource);
            if let Some(n) = self.starts_on_way.get_mut(&(t, i)) {
                *n -= 1;
                if *n == 0 {
                    self.starts_on_way.remove(&(t, i));
                }
            }
        }
        let asker = self
            .under_way
            .remove(a.intent_key().expect("an effect"))
            .unwrap_or(life);
        // The process that asked hears it if it is still the current term's (a stopped
        // term's deliveries go nowhere).
        let heard = asker == self.lifetime;
        let (key, result) = match a {
            Action::Fence { host, key, .. } => {
                let h = self.index(&host);
                let power_failed =
                    self.hosts[h].bmc_broken || self.rng.chance(self.sc.p_fence_fail);
                let outcome = if power_failed && self.sc.storage_fence {
                    // The next level: the host stays up, its RBD clients blocklisted.
                    self.hosts[h].blocklisted = true;
                    self.report.storage_fences += 1;
                    FenceOutcome::Verified(FenceVerifier::CephBlocklist)
                } else if power_failed {
                    FenceOutcome::Failed {
                        reason: "BMC did not answer".into(),
                    }
                } else if self.rng.chance(self.sc.p_fence_unverified) {
                    FenceOutcome::Unverified {
                        reason: "power state unreadable".into(),
                    }
                } else {
                    self.power_off(h);
                    if self.rng.chance(0.5) {
                        FenceOutcome::Verified(FenceVerifier::IpmiPowerOff)
                    } else {
                        FenceOutcome::Verified(FenceVerifier::PacemakerHistory)
                    }
                };
                let r = Input::FenceResult {
                    host,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            Action::ForceDown { host, key } => {
                let h = self.index(&host);
                let outcome = if self.rng.chance(0.05) {
                    RestoreOutcome::Failed {
                        reason: "nova API 503".into(),
                    }
                } else {
                    self.hosts[h].forced_down = true;
                    RestoreOutcome::Ok { host: host.clone() }
                };
                let r = Input::HostActionResult {
                    host,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            Action::Unfence { host, key } => {
                let h = self.index(&host);
                self.hosts[h].forced_down = false;
                // The fencer lifts the storage fence with the unfence.
                self.hosts[h].blocklisted = false;
                let r = Input::HostActionResult {
                    host: host.clone(),
                    key: key.clone(),
                    outcome: RestoreOutcome::Ok { host },
                };
                (key, r)
            }
            Action::RestartInPlace {
                resource,
                host,
                key,
                ..
            } => {
                let h = self.index(&host);
                let i = self.res_index(&resource);
                let w = &self.hosts[h];
                // A start of a domain that runs already is a success (libvirt's "already
                // active", and Nova's start of an ACTIVE server): the edge never says it
                // failed while it runs.
                let running = w.alive() && self.res[i].instances.contains(&h);
                let ok = running
                    || w.alive()
                        && !w.forced_down
                        && self.res[i].placement == h
                        && !self.rng.chance(self.sc.p_restore_fail);
                // The libvirt backend's start whose answer is lost (a start that sleeps
                // past its 30 s, a stream that closes): started or not, it cannot tell.
                let unknown =
                    !self.remembers(&resource) && self.rng.chance(self.sc.p_restore_unknown);
                let outcome = if ok {
                    if self.res[i].instances.iter().any(|&o| o != h) {
                        return self.fail(
                            Invariant::NoRestoreBeforeVerifiedFence,
                            format!("{resource} restarted on {host} while running elsewhere"),
                        );
                    }
                    self.res[i].instances.insert(h);
                    if unknown {
                        self.report.restores_unknown += 1;
                        RestoreOutcome::Unknown {
                            target: Some(host.clone()),
                            reason: "no answer within 30 s".into(),
                        }
                    } else {
                        RestoreOutcome::Ok { host: host.clone() }
                    }
                } else if unknown {
                    self.report.restores_unknown += 1;
                    RestoreOutcome::Unknown {
                        target: Some(host.clone()),
                        reason: "no answer within 30 s".into(),
                    }
                } else {
                    RestoreOutcome::Failed {
                        reason: "domain start failed".into(),
                    }
                };
                let r = Input::RestoreResult {
                    resource,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            Action::Evacuate {
                resource,
                from,
                key,
            } => {
                let i = self.res_index(&resource);
                let f = self.index(&from);
                if self.res[i].placement != f && self.remembers(&resource) {
                    // Nova: the server already left the failed host (an earlier
                    // request of this intent moved it); the edge tracks it there.
                    // (The libvirt backend has no such record: it starts it again.)
                    let r = Input::RestoreResult {
                        resource,
                        key: key.clone(),
                        outcome: RestoreOutcome::Ok {
                            host: self.hosts[self.res[i].placement].id.clone(),
                        },
                    };
                    return self.answer(key, r, heard);
                }
                // Nova's scheduler picks a target now; the libvirt backend picked it when
                // it sent the start there, and a target dead since never answers.
                let targets: Vec<usize> = if self.remembers(&resource) {
                    self.targets(&resource, f)
                } else {
                    sent_to.into_iter().collect()
                };
                let outcome = if let Some(t) = sent_to.filter(|&t| !self.hosts[t].alive()) {
                    self.report.restores_unknown += 1;
                    RestoreOutcome::Unknown {
                        target: Some(self.hosts[t].id.clone()),
                        reason: "the target did not answer".into(),
                    }
                } else if targets.is_empty() || self.rng.chance(self.sc.p_restore_fail) {
                    // Refused before anything started (no valid host, the command
                    // never sent): the edge knows it did not happen.
                    RestoreOutcome::Failed {
                        reason: "no valid host".into(),
                    }
                } else {
                    let t = targets[self.rng.index(targets.len())];
                    let target = self.hosts[t].id.clone();
                    // The answer lost or late after the request was sent: started there
                    // or not, the edge cannot tell.
                    // (VMs only: Neutron's router moves are answered, and nothing answers
                    // a question about a router.)
                    let unknown = resource.kind() == crate::engine::ResourceKind::Vm
                        && self.rng.chance(self.sc.p_restore_unknown);
                    let started = !unknown || self.rng.chance(0.5);
                    if started {
                        let writers = self.writers(i);
                        if !writers.is_empty() {
                            return self.fail(
                                Invariant::NoRestoreBeforeVerifiedFence,
                                format!(
                                    "{resource} evacuated to {target} while it still runs and writes on {writers:?} (running on {:?})",
                                    self.res[i].instances
                                ),
                            );
                        }
                        if !self.res[i].instances.is_empty() {
                            self.report.restored_past_blocklist += 1;
                        }
                        if self.hosts[t].leases_lost == Some(true) {
                            self.report.restored_onto_lost_leases += 1;
                        }
                        self.res[i].placement = t;
                        self.res[i].instances.insert(t);
                    }
                    if started && self.rng.chance(self.sc.p_answer_lost) {
                        self.report.answers_lost += 1;
                        self.unanswered.insert(key.clone());
                        self.trace(format!(
                            "{:>6} WORLD {resource} started on {target}; its answer never comes",
                            self.now
                        ));
                        return self.check_world();
                    }
                    if unknown {
                        self.report.restores_unknown += 1;
                        self.trace(format!(
                            "{:>6} WORLD {resource} {} on {target}; the answer is lost",
                            self.now,
                            if started { "started" } else { "not started" }
                        ));
                        RestoreOutcome::Unknown {
                            target: Some(target),
                            reason: "no answer within 30 s".into(),
                        }
                    } else {
                        RestoreOutcome::Ok { host: target }
                    }
                };
                let r = Input::RestoreResult {
                    resource,
                    key: key.clone(),
                    outcome,
                };
                (key, r)
            }
            _ => return Ok(()),
        };
        self.answer(key, result, heard)
    }

    /// The hosts an evacuation of `r` off `f` may go to. Nova's scheduler takes a host
    /// once its compute service reports, seconds after a boot (its watchdog's heartbeats
    /// start at once), and Neutron's an agent alike.
    fn targets(&self, r: &Resource, f: usize) -> Vec<usize> {
        let nova = self.remembers(r);
        (0..self.hosts.len())
            .filter(|&t| {
                let w = &self.hosts[t];
                // The libvirt backend forces nothing down (there is no compute service)
                // and sends a start to any host whose stream is open, fenced or not.
                t != f
                    && w.alive()
                    && !(nova && w.forced_down)
                    && !w.maintenance
                    // Both backends read the engine's facts: a host whose disk leases
                    // it holds lost is no target.
                    && self.engine_allows_target(t)
                    && !(nova && w.boot_id > 1 && self.now < w.booted_at + 2_000)
            })
            .collect()
    }

    /// Whether the engine's published facts leave host `t` a restore target.
    fn engine_allows_target(&self, t: usize) -> bool {
        let id = &self.hosts[t].id;
        self.engine
            .hosts()
            .into_iter()
            .find(|v| &v.host == id)
            .is_none_or(|v| v.not_a_target.is_none())
    }

    /// The libvirt backend picks an evacuation's target when it sends the start, among
    /// the hosts whose stream is open (a start it could not send is a failure).
    fn pick_target(&mut self, a: &Action) -> Option<usize> {
        let Action::Evacuate { resource, from, .. } = a else {
            return None;
        };
        if self.remembers(resource) {
            return None;
        }
        let f = self.index(from);
        let open: Vec<usize> = self
            .targets(resource, f)
            .into_iter()
            .filter(|&t| self.connected(t))
            .collect();
        (!open.is_empty()).then(|| open[self.rng.index(open.len())])
    }

    /// Whether the world keeps where a resource went (Nova's server record, Neutron's
    /// router binding), or only the libvirt backend's process knew.
    fn remembers(&self, r: &Resource) -> bool {
        r.kind() != crate::engine::ResourceKind::Vm || !self.sc.libvirt_restorer
    }

    /// Reports an effect's outcome, unless the process that asked is gone.
    fn answer(&mut self, key: IntentKey, result: Input, heard: bool) -> Result<(), Box<Violation>> {
        if !heard {
            self.trace(format!("{:>6} LOST {result:?}", self.now));
            return self.check_world();
        }
        self.effects.insert(key, Some(result.clone()));
        if self.rng.chance(0.05) {
            self.later(200, 3_000, Ev::Redeliver(self.lifetime, result.clone()));
        }
        self.deliver(result)?;
        self.check_world()
    }
}

/// Whether an action leaves the process (to the world, the store or the operator), as
/// opposed to the engine's own timers and timeline lines.
pub(super) fn acts(a: &Action) -> bool {
    !matches!(a, Action::ArmTimer { .. } | Action::RecordTimeline { .. })
}
