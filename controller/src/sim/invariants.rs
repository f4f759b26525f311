//! The invariants the simulation checks after every step and at the end, and the
//! violation it reports when one breaks.

use super::*;

/// Which invariant broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Invariant {
    /// A restore before a verified fence, or a resource running twice in the world.
    NoRestoreBeforeVerifiedFence,
    /// Two owners for one resource.
    OneOwner,
    /// A dead resource nobody handles.
    NoVmLeftBehind,
    /// An action issued twice (or without its intent).
    NoActionTwice,
    /// A fence issued while the controller hears nobody (safety gate).
    SafetyGate,
    /// The engine panicked.
    NoPanic,
    /// A stale copy (a VM the engine moved off a host, which that host started again on
    /// its return) that the engine does not ask to destroy.
    StaleCopyDestroyed,
    /// Two controllers acting at once (rule 9): an action or store write from a
    /// controller whose lease was not valid on etcd's side at that instant, a lease that
    /// expired on etcd's side while its holder still acted, a deposed leader's write
    /// accepted, a takeover while the former leader still acted.
    OneLeader,
    /// A new leader acted before a former leader's last action.
    LeadersInOrder,
    /// The engine's published facts disagree with the last disk-lease word it took
    /// about a host: a host it was told lost its leases is still offered as a restore
    /// target, or one told they are back is still ruled out.
    LeaseLossHonoured,
}

/// A broken invariant, with the recent history that led to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Violation {
    /// The seed.
    pub seed: u64,
    /// Simulated time (ms).
    pub at: u64,
    /// Which invariant.
    pub invariant: Invariant,
    /// Details.
    pub detail: String,
    /// The last steps (inputs and actions).
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} at {} ms: {:?}: {}",
            self.seed, self.at, self.invariant, self.detail
        )?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

impl Sim<'_> {
    pub(super) fn violation(&self, invariant: Invariant, detail: String) -> Violation {
        Violation {
            seed: self.sc.seed,
            at: self.now,
            invariant,
            detail,
            trace: self.trace.iter().rev().take(40).rev().cloned().collect(),
        }
    }

    pub(super) fn fail(&self, invariant: Invariant, detail: String) -> Result<(), Box<Violation>> {
        Err(Box::new(self.violation(invariant, detail)))
    }

    /// Every action that leaves a controller (and every store write it makes) comes
    /// from the holder of the lease that is the leader key's on etcd's side at that
    /// instant: at most one controller acts at a time. A term's first act comes after
    /// the last act of every earlier term.
    pub(super) fn check_leader_acts(&mut self, a: &Action) -> Result<(), Box<Violation>> {
        let valid = self
            .etcd
            .lease
            .as_ref()
            .is_some_and(|l| l.id == self.lease_id && l.holder == self.leader);
        if !valid || !self.acting || self.paused_until.is_some() {
            return self.fail(
                Invariant::OneLeader,
                format!(
                    "ctl-{} acts under lease {} while etcd's leader key is {:?}: {a:?}",
                    self.leader,
                    self.lease_id,
                    self.etcd.lease.as_ref().map(|l| (l.id, l.holder))
                ),
            );
        }
        if self.term_first_act.is_none() {
            if let Some((t, life)) = self.earlier_terms_last_act {
                if self.now <= t {
                    return self.fail(
                        Invariant::LeadersInOrder,
                        format!(
                            "ctl-{}'s term {} first acts at {} ms, not after term {life}'s last act at {t} ms",
                            self.leader, self.lifetime, self.now
                        ),
                    );
                }
            }
            self.term_first_act = Some(self.now);
        }
        self.term_last_act = Some(self.now);
        Ok(())
    }

    /// An intent written to the store: by whom, under which lease, at which etcd
    /// revision.
    pub(super) fn note_write(&mut self, a: &Action) {
        self.etcd.revision += 1;
        if let Action::PersistIntent(rec) = a {
            self.intent_writes.insert(
                rec.key.clone(),
                (self.leader, self.lease_id, self.etcd.revision),
            );
        }
    }

    /// A world action carried out (by an edge, maybe long after its controller stopped):
    /// its intent was written by a controller whose lease was the leader key's on etcd's
    /// side at that instant, by the history of the leases.
    pub(super) fn check_exec_intent(&self, a: &Action) -> Result<(), Box<Violation>> {
        let Some(key) = a.intent_key() else {
            return Ok(());
        };
        let valid = self.intent_writes.get(key).is_some_and(|(c, lease, at)| {
            self.lease_history
                .get(lease)
                .is_some_and(|(holder, from, until)| {
                    holder == c && from <= at && until.is_none_or(|u| *at < u)
                })
        });
        if !valid {
            return self.fail(
                Invariant::OneLeader,
                format!(
                    "{key} carried out, its intent written {:?} (controller, lease, etcd revision) outside that lease's life on etcd",
                    self.intent_writes.get(key)
                ),
            );
        }
        Ok(())
    }

    /// Rule 9 at the instant a lease goes on etcd's side (expired or revoked): its
    /// holder does not act any more. A holder stalled before a write is the guard's to
    /// stop: that write is refused when it arrives.
    pub(super) fn check_lease_gone(
        &self,
        l: &super::leader::EtcdLease,
    ) -> Result<(), Box<Violation>> {
        if l.id == self.lease_id && self.acting && self.paused_until.is_none() {
            return self.fail(
                Invariant::OneLeader,
                format!(
                    "lease {} expired on etcd's side while ctl-{} still acts on it (its clock {} ms, local deadline {} ms)",
                    l.id,
                    l.holder,
                    self.local_ms(l.holder),
                    self.deadline_local
                ),
            );
        }
        Ok(())
    }

    /// The engine time of the batch being carried out: now, or when a stalled batch was
    /// made.
    fn batch_time(&self) -> Timestamp {
        self.batch_engine_at.unwrap_or_else(|| self.engine_now())
    }

    pub(super) fn check_action(&mut self, a: &Action) -> Result<(), Box<Violation>> {
        match a {
            Action::PersistIntent(rec) => {
                if self.log.contains(&rec.key) {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("intent {} persisted twice", rec.key),
                    );
                }
                if let Some(r) = rec.intent.resource() {
                    if let Some(other) = self.open_per_resource.get(r) {
                        if self.log.get(other).is_some_and(|e| e.done.is_none()) {
                            return self.fail(
                                Invariant::OneOwner,
                                format!("{r}: {} issued while {other} is open", rec.key),
                            );
                        }
                    }
                    self.open_per_resource.insert(r.clone(), rec.key.clone());
                }
                if let Intent::Evacuate {
                    resource, incident, ..
                } = &rec.intent
                {
                    // Rule 2, on the log: a host incident's restore needs a verified fence.
                    let fences: Vec<_> = self
                        .log
                        .iter()
                        .filter(|e| {
                            matches!(&e.record.intent, Intent::Fence { incident: i, .. } if *i == *incident)
                        })
                        .collect();
                    let verified = fences.iter().any(|e| {
                        matches!(
                            e.done.as_ref().map(|c| &c.outcome),
                            Some(IntentOutcome::Fence(FenceOutcome::Verified(_)))
                        )
                    });
                    if !fences.is_empty() && !verified {
                        return self.fail(
                            Invariant::NoRestoreBeforeVerifiedFence,
                            format!("{resource} evacuated by {incident} without a verified fence"),
                        );
                    }
                    // And in the world: nothing restored that may still write (a copy
                    // of a VM on RBD on a blocklisted host runs, but cannot).
                    let i = self.res_index(resource);
                    let writers = self.writers(i);
                    if !writers.is_empty() {
                        return self.fail(
                            Invariant::NoRestoreBeforeVerifiedFence,
                            format!(
                                "{resource} evacuation decided while it runs and writes on {writers:?} (running on {:?})",
                                self.res[i].instances
                            ),
                        );
                    }
                }
            }
            Action::Fence { key, .. }
            | Action::ForceDown { key, .. }
            | Action::RestartInPlace { key, .. }
            | Action::Evacuate { key, .. }
            | Action::Unfence { key, .. } => {
                let Some(entry) = self.log.get(key) else {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} carried out without a persisted intent"),
                    );
                };
                if entry.done.is_some() {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} issued again after it was done"),
                    );
                }
                // Once the detector had time to notice: the fixed one suspects a host
                // after 300 ms; the phi-accrual one adapts to the gaps in a host's
                // history (an earlier isolation, lost heartbeats), and may take longer.
                let notice = if self.sc.phi { 3_000 } else { 1_000 };
                if matches!(a, Action::Fence { .. })
                    && self.isolated
                    && self.now > self.isolated_since + notice
                    && entry.record.at == self.batch_time()
                {
                    return self.fail(
                        Invariant::SafetyGate,
                        format!("{key} issued while the controller hears nobody"),
                    );
                }
                // Handed again by one engine only as its backstop for an answer that
                // never came, not sooner.
                let backstop = self.engine.config().unanswered_after.as_millis() as u64;
                // When the engine handed it: a stalled batch is sent later than that.
                let handed_at = self
                    .now
                    .saturating_sub(self.engine_now().0.saturating_sub(self.batch_time().0));
                let again = self.issued_this_life.insert(key.clone(), handed_at);
                if again.is_some_and(|before| self.now < before + backstop) {
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} issued twice by one engine within {backstop} ms"),
                    );
                }
                if entry.record.at != self.batch_time()
                    && !self.resumed_open.contains(key)
                    && again.is_none()
                {
                    // Only a resumed engine, or the backstop, may hand an older intent
                    // out again.
                    return self.fail(
                        Invariant::NoActionTwice,
                        format!("{key} re-issued without a restart"),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The hosts where resource `i` runs and can write: a copy on a blocklisted host
    /// cannot if every disk of the VM is on RBD (it runs, but it is not a writer); any
    /// other copy can.
    pub(super) fn writers(&self, i: usize) -> Vec<usize> {
        let r = &self.res[i];
        let on_rbd = self.sc.rbd_vms.contains(&r.r);
        r.instances
            .iter()
            .copied()
            .filter(|h| !(on_rbd && self.hosts[*h].blocklisted))
            .collect()
    }

    pub(super) fn check_world(&self) -> Result<(), Box<Violation>> {
        for (i, r) in self.res.iter().enumerate() {
            let writers = self.writers(i);
            if writers.len() > 1 {
                return self.fail(
                    Invariant::NoRestoreBeforeVerifiedFence,
                    format!(
                        "{} runs and writes on {} hosts: {:?} (running on {:?})",
                        r.r,
                        writers.len(),
                        writers,
                        r.instances
                    ),
                );
            }
        }
        Ok(())
    }

    /// Stale copies still running at the end on a host the controller hears: one of a
    /// VM the engine has settled elsewhere, on a host still fenced or whose incident
    /// moved it off, must be asked to be destroyed by the host's next listing (delivered
    /// here, so that a copy that came up just before the end is judged like the others).
    /// The others (the host was trusted again before its listing showed the copy, and
    /// the VM had left it by its own incident or was not settled elsewhere at the
    /// unfence) are counted: the stale-resource alarm is all they get.
    fn check_copies(&mut self) -> Result<(), Box<Violation>> {
        let moved_off: BTreeMap<HostId, Vec<Resource>> = self
            .engine
            .hosts()
            .into_iter()
            .map(|v| (v.host, v.evacuated))
            .collect();
        for i in 0..self.res.len() {
            for h in self.res[i].copies.clone() {
                if !self.connected(h) {
                    continue;
                }
                let (r, id) = (self.res[i].r.clone(), self.hosts[h].id.clone());
                let settled_elsewhere = self.engine.resource(&r).is_some_and(|v| {
                    v.host != id && v.state == ResourceState::Running && v.owner.is_none()
                });
                let fenced = self.engine.host_state(&id).is_some_and(|s| s.fenced());
                let moved = fenced || moved_off.get(&id).is_some_and(|m| m.contains(&r));
                if !(settled_elsewhere && moved) {
                    self.report.stale_copies_left += 1;
                    continue;
                }
                let listing = Input::HostEvent {
                    host: id.clone(),
                    event: HostEvent::Inventory {
                        resources: self.listing(h, false),
                        stopped: vec![],
                        rbd_only: vec![],
                        source: Source::Libvirt,
                        at: ListedAt::Host(self.host_time(h)),
                    },
                };
                self.trace(format!("{:>6} IN  {listing:?}", self.now));
                let out = self.engine.step(self.engine_now(), listing);
                let asked = out.iter().any(|a| {
                    matches!(a, Action::StopStaleCopy { host, resource } if *host == id && *resource == r)
                });
                self.apply_actions(out)?;
                if !asked {
                    return self.fail(
                        Invariant::StaleCopyDestroyed,
                        format!("{id} lists a copy of {r}, which runs elsewhere; not destroyed"),
                    );
                }
            }
        }
        Ok(())
    }

    pub(super) fn check_engine(&mut self) -> Result<(), Box<Violation>> {
        let rev = self.engine.revision();
        if rev == self.last_revision {
            return Ok(());
        }
        self.last_revision = rev;
        let views = self.engine.hosts();
        for (&h, &lost) in &self.lease_words_taken {
            let id = &self.hosts[h].id;
            let ruled_out = views
                .iter()
                .find(|v| &v.host == id)
                .is_some_and(|v| v.not_a_target.is_some());
            if ruled_out != lost {
                return self.fail(
                    Invariant::LeaseLossHonoured,
                    format!(
                        "{id}: told its disk leases are {}, the engine has it {}",
                        if lost { "lost" } else { "held" },
                        if ruled_out { "ruled out" } else { "a target" }
                    ),
                );
            }
        }
        let mut claimed: BTreeMap<Resource, crate::engine::IncidentId> = BTreeMap::new();
        for (inc, r) in self.engine.claims() {
            if let Some(other) = claimed.insert(r.clone(), inc) {
                return self.fail(
                    Invariant::OneOwner,
                    format!("{r} claimed by {other} and {inc}"),
                );
            }
        }
        for v in self.engine.resources() {
            if !v.state.is_settled() {
                let open = v
                    .owner
                    .and_then(|o| self.engine.incident(o))
                    .is_some_and(|i| i.closed_at.is_none());
                if !open {
                    return self.fail(
                        Invariant::NoVmLeftBehind,
                        format!("{} is {} with no open owner", v.resource, v.state),
                    );
                }
            }
            if let Some(o) = v.owner {
                if claimed.get(&v.resource) != Some(&o) {
                    return self.fail(
                        Invariant::OneOwner,
                        format!("{} owned by {o} which does not claim it", v.resource),
                    );
                }
            }
        }
        Ok(())
    }

    pub(super) fn final_check(&mut self) -> Result<(), Box<Violation>> {
        self.check_world()?;
        if !self.acting || self.paused_until.is_some() {
            return self.fail(
                Invariant::NoVmLeftBehind,
                "no controller leads at the end (30 s after it should have)".into(),
            );
        }
        if let Some(since) = self.leaderless_since.take() {
            let until = self.now.min(self.sc.end_at);
            self.report.leaderless_ms += until.saturating_sub(since.min(until));
        }
        self.report.incidents_forgotten += self.engine.incidents_forgotten();
        self.report.unanswered_open_at_end = self
            .unanswered
            .iter()
            .filter(|k| self.log.get(k).is_some_and(|e| e.done.is_none()))
            .count() as u64;
        self.check_copies()?;
        let gave_up: BTreeSet<Resource> = self
            .engine
            .resources()
            .into_iter()
            .filter(|v| v.state == ResourceState::GaveUp)
            .map(|v| v.resource)
            .collect();
        for i in 0..self.res.len() {
            if !self.res[i].instances.is_empty() {
                continue;
            }
            let r = self.res[i].r.clone();
            // A copy autostarted while the VM ran elsewhere, which outlived the other
            // one, is the VM now: running where the engine has it is not left behind.
            let runs_as_copy = self.engine.resource(&r).is_some_and(|v| {
                v.state == ResourceState::Running
                    && self.res[i]
                        .copies
                        .iter()
                        .any(|&h| self.hosts[h].id == v.host)
            });
            if runs_as_copy {
                continue;
            }
            if gave_up.contains(&r) {
                self.report.gave_up += 1;
                continue;
            }
            let h = self.res[i].placement;
            let host = self.hosts[h].id.clone();
            let held = self.engine.host_alarmed(&host)
                || self.hosts[h].maintenance
                || self.engine.host_state(&host) == Some(HostState::Maintenance);
            if held {
                self.report.held += 1;
                continue;
            }
            // Still being worked on at the end (a late retry) is fine if owned.
            let owned = self.engine.resource(&r).is_some_and(|v| v.owner.is_some());
            if owned {
                continue;
            }
            return self.fail(
                Invariant::NoVmLeftBehind,
                format!(
                    "{r} is dead in the world (placed on {host}, host {:?}) and nobody handles it: engine says {:?}",
                    self.engine.host_state(&host),
                    self.engine.resource(&r)
                ),
            );
        }
        Ok(())
    }
}
