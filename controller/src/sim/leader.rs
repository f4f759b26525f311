//! Several controllers on etcd (issue 15): the controller processes, etcd's one lease
//! with the leader key bound to it, keep-alives, the leader's local deadline, elections,
//! takeovers (a new term resumes from the shared intent log) and the guard on every
//! store write.
//!
//! One term acts at a time: the one in `Sim::engine` (`lifetime`, `leader`, `lease_id`).
//! A leader that stops (its local deadline, a write refused or unanswered, a keep-alive
//! answered "no such lease", a restart) or whose process is killed leaves its term
//! without acting; etcd's lessor expires its lease (or it revokes it), the followers
//! campaign, and the winner's term takes over with `Engine::resume_knowing`. A term whose
//! process stalls before a store write keeps its batch (`Stalled`); if another took the
//! lead meanwhile, that write reaches etcd after the takeover and must be refused.

use super::*;

/// A controller process.
#[derive(Clone, Debug)]
pub(super) struct Ctl {
    /// Running (not killed, or started again).
    pub(super) up: bool,
    /// Cut off from etcd until then (ms).
    pub(super) etcd_cut_until: u64,
    /// Its monotonic clock's drift (ppm).
    pub(super) ppm: i64,
    /// Stalled until then (ms): it does nothing, campaigns neither.
    pub(super) paused_until: u64,
    /// A lease it stopped leading on and gives back as soon as it reaches etcd.
    pub(super) to_revoke: Option<u64>,
}

/// etcd, as the controllers see it: one lease at a time, the leader key bound to it.
#[derive(Clone, Debug)]
pub(super) struct Etcd {
    /// It has a quorum.
    pub(super) available: bool,
    /// Without one until then (ms).
    pub(super) down_until: u64,
    /// The leader's lease, while the leader key exists.
    pub(super) lease: Option<EtcdLease>,
    pub(super) next_id: u64,
    /// etcd's revision: every write, grant and revocation moves it (orders them within
    /// a millisecond).
    pub(super) revision: u64,
}

#[derive(Clone, Debug)]
pub(super) struct EtcdLease {
    pub(super) id: u64,
    pub(super) holder: usize,
    /// The lessor expires it at its first check from then on: the time etcd received
    /// the last keep-alive, plus the TTL.
    pub(super) expires_at: u64,
}

/// A term's batch, held from the store write at which its process stalled.
#[derive(Clone, Debug)]
pub(super) struct Stalled {
    pub(super) life: u64,
    pub(super) ctl: usize,
    pub(super) lease: u64,
    pub(super) actions: Vec<Action>,
    /// The engine's time when it made the batch.
    pub(super) engine_at: Timestamp,
}

/// Why a leader stops acting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepDown {
    /// Its local deadline passed: no keep-alive answered for TTL − margin.
    LocalDeadline,
    /// etcd answered a keep-alive: no such lease.
    LeaseGone,
    /// A store write refused by the guard: its lease is not the leader key's.
    GuardRefused,
    /// A store write unanswered: etcd unreachable or without quorum.
    Unreachable,
    /// Its process is restarted (it gives its lease back on the way out).
    Restart,
}

/// The keep-alive period (a third of the TTL, as etcd's clients do).
const KEEP_ALIVE_EVERY_MS: u64 = 1_000;
/// etcd's lessor looks for expired leases this often.
const LESSOR_EVERY_MS: u64 = 500;
/// A new etcd leader extends every lease by its TTL plus this (the election timeout).
const ETCD_ELECTION_MS: u64 = 1_000;

impl Sim<'_> {
    /// Controller `c`'s monotonic clock now (ms since the run started, drifting).
    pub(super) fn local_ms(&self, c: usize) -> u64 {
        let ppm = self.ctls[c].ppm;
        (self.now as i64 + self.now as i64 * ppm / 1_000_000) as u64
    }

    /// The first simulated time (not before now) at which controller `c`'s clock reads
    /// `local`.
    pub(super) fn sim_at_local(&self, c: usize, local: u64) -> u64 {
        let ppm = self.ctls[c].ppm;
        let clock = |t: u64| (t as i64 + t as i64 * ppm / 1_000_000) as u64;
        let mut t = (local as i128 * 1_000_000 / (1_000_000 + ppm as i128)) as u64;
        t = t.saturating_sub(2);
        while clock(t) < local {
            t += 1;
        }
        t.max(self.now)
    }

    fn etcd_cut(&self, c: usize) -> bool {
        self.now < self.ctls[c].etcd_cut_until
    }

    /// Controller `c` can talk to etcd, and etcd can answer.
    fn etcd_reachable(&self, c: usize) -> bool {
        self.ctls[c].up && !self.etcd_cut(c) && self.etcd.available
    }

    /// etcd's guard on a store write of controller `c` under `lease`: the leader key
    /// still exists with that lease.
    pub(super) fn guard(&self, c: usize, lease: u64) -> Result<(), StepDown> {
        if !self.etcd_reachable(c) {
            return Err(StepDown::Unreachable);
        }
        match &self.etcd.lease {
            Some(l) if l.id == lease && l.holder == c => Ok(()),
            _ => Err(StepDown::GuardRefused),
        }
    }

    pub(super) fn handle_leader(&mut self, ev: Ev) -> Result<(), Box<Violation>> {
        match ev {
            Ev::Lessor => self.lessor(),
            Ev::Elect => self.elect(),
            Ev::KeepAlive(life) => {
                if life != self.lifetime || !self.acting {
                    return Ok(());
                }
                if let Some(until) = self.paused_until {
                    self.at(until, Ev::KeepAlive(life));
                    return Ok(());
                }
                let c = self.leader;
                let sent = self.local_ms(c);
                if self.etcd_reachable(c) {
                    let arrives = self.now + self.rng.range(1, 10);
                    self.at(arrives, Ev::KeepAliveArrives(life, self.lease_id, sent));
                }
                let next = self.sim_at_local(c, sent + KEEP_ALIVE_EVERY_MS);
                self.at(next, Ev::KeepAlive(life));
                Ok(())
            }
            Ev::KeepAliveArrives(life, lease, sent) => {
                if !self.etcd.available {
                    // No quorum: no renewal, no answer.
                    return Ok(());
                }
                if life == self.lifetime && self.etcd_cut(self.leader) {
                    // Cut off on its way. (An answer sent before a cut still arrives:
                    // a late one is late on etcd's side.)
                    return Ok(());
                }
                let ttl = self.sc.lease_ttl_ms;
                let ok = match &mut self.etcd.lease {
                    Some(l) if l.id == lease => {
                        l.expires_at = self.now + ttl;
                        true
                    }
                    _ => false,
                };
                let delay = if self.now < self.keep_alive_delay_until {
                    self.rng.range(1, self.keep_alive_delay_ms.max(1))
                } else {
                    self.rng.range(1, 10)
                };
                self.at(
                    self.now + delay,
                    Ev::KeepAliveAnswered(life, lease, sent, ok),
                );
                Ok(())
            }
            Ev::KeepAliveAnswered(life, lease, sent, ok) => {
                let c = self.leader;
                if !self.ctls[c].up {
                    return Ok(());
                }
                if life != self.lifetime || !self.acting || lease != self.lease_id {
                    return Ok(());
                }
                if let Some(until) = self.paused_until {
                    self.at(until, Ev::KeepAliveAnswered(life, lease, sent, ok));
                    return Ok(());
                }
                if !ok {
                    return self.step_down(StepDown::LeaseGone);
                }
                // Counted from when it was sent: etcd received it after that, so its
                // lease lives at least TTL from then, on etcd's clock.
                let from = if self.sc.lease_deadline_from_reply {
                    self.local_ms(c)
                } else {
                    sent
                };
                let deadline =
                    (from + self.sc.lease_ttl_ms).saturating_sub(self.sc.lease_margin_ms);
                if deadline > self.deadline_local {
                    self.deadline_local = deadline;
                    let t = self.sim_at_local(c, deadline);
                    self.at(t, Ev::Deadline(life));
                }
                Ok(())
            }
            Ev::Deadline(life) => {
                if life == self.lifetime
                    && self.acting
                    && self.paused_until.is_none()
                    && self.local_ms(self.leader) >= self.deadline_local
                {
                    self.step_down(StepDown::LocalDeadline)?;
                }
                Ok(())
            }
            Ev::Wake(life) => self.wake(life),
            Ev::ControllerUp(c) => {
                if !self.ctls[c].up {
                    self.ctls[c].up = true;
                    self.trace(format!("{:>6} CTL ctl-{c} started (a follower)", self.now));
                }
                Ok(())
            }
            Ev::EtcdUp => {
                if !self.etcd.available && self.now >= self.etcd.down_until {
                    self.etcd_up();
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn etcd_up(&mut self) {
        self.etcd.available = true;
        // A new etcd leader's lessor extends every lease (etcd 3.4: `Promote`).
        if let Some(l) = &mut self.etcd.lease {
            l.expires_at = self.now + self.sc.lease_ttl_ms + ETCD_ELECTION_MS;
        }
        self.trace(format!("{:>6} ETCD has a quorum again", self.now));
    }

    /// etcd's lessor: stepped-down leaders that reach etcd give their lease back, an
    /// expired lease goes (and the leader key with it); with no leader key, the
    /// followers campaign.
    fn lessor(&mut self) -> Result<(), Box<Violation>> {
        self.at(self.now + LESSOR_EVERY_MS, Ev::Lessor);
        if !self.etcd.available {
            return Ok(());
        }
        for c in 0..self.ctls.len() {
            if let Some(id) = self.ctls[c].to_revoke {
                if self.etcd_reachable(c) && self.ctls[c].paused_until <= self.now {
                    self.ctls[c].to_revoke = None;
                    if self.etcd.lease.as_ref().is_some_and(|l| l.id == id) {
                        self.lease_gone(&format!("revoked by ctl-{c}, which stopped leading"))?;
                    }
                }
            }
        }
        if self
            .etcd
            .lease
            .as_ref()
            .is_some_and(|l| self.now >= l.expires_at)
        {
            self.lease_gone("expired")?;
        }
        if self.etcd.lease.is_none() {
            self.later(1, 50, Ev::Elect);
        }
        Ok(())
    }

    /// The lease (and the leader key bound to it) is gone on etcd's side. Rule 9: its
    /// holder no longer acts (a holder stalled before a write is let be: the guard
    /// refuses that write).
    fn lease_gone(&mut self, why: &str) -> Result<(), Box<Violation>> {
        let Some(l) = self.etcd.lease.take() else {
            return Ok(());
        };
        self.etcd.revision += 1;
        if let Some(h) = self.lease_history.get_mut(&l.id) {
            h.2 = Some(self.etcd.revision);
        }
        self.trace(format!(
            "{:>6} ETCD lease {} of ctl-{} {why}; the leader key is gone",
            self.now, l.id, l.holder
        ));
        self.check_lease_gone(&l)?;
        self.later(1, 50, Ev::Elect);
        Ok(())
    }

    /// The controllers that can reach etcd campaign; one wins the leader key and takes
    /// over.
    fn elect(&mut self) -> Result<(), Box<Violation>> {
        if !self.etcd.available || self.etcd.lease.is_some() {
            return Ok(());
        }
        let candidates: Vec<usize> = (0..self.ctls.len())
            .filter(|&c| {
                self.etcd_reachable(c)
                    && self.ctls[c].paused_until <= self.now
                    && !(c == self.leader && self.acting)
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let c = candidates[self.rng.index(candidates.len())];
        let id = self.etcd.next_id;
        self.etcd.next_id += 1;
        self.etcd.lease = Some(EtcdLease {
            id,
            holder: c,
            expires_at: self.now + self.sc.lease_ttl_ms,
        });
        self.ctls[c].to_revoke = None;
        self.etcd.revision += 1;
        self.lease_history.insert(id, (c, self.etcd.revision, None));
        self.trace(format!(
            "{:>6} ETCD ctl-{c} won the leader key with lease {id}",
            self.now
        ));
        self.take_over(c, id)
    }

    /// Controller `c`'s term starts: it resumes from the shared intent log like a
    /// restarted controller, then acts.
    fn take_over(&mut self, c: usize, lease: u64) -> Result<(), Box<Violation>> {
        if self.acting {
            if self.paused_until.is_some() {
                // Stalled before a write: that write reaches etcd when it wakes.
                self.stalled_old = self.stalled.take();
            } else {
                return self.fail(
                    Invariant::OneLeader,
                    format!(
                        "ctl-{c} takes the lead while ctl-{}'s term still acts",
                        self.leader
                    ),
                );
            }
        }
        if let Some(t) = self.term_last_act {
            if self.earlier_terms_last_act.is_none_or(|(e, _)| t >= e) {
                self.earlier_terms_last_act = Some((t, self.lifetime));
            }
        }
        if let Some(since) = self.leaderless_since.take() {
            let until = self.now.min(self.sc.end_at);
            self.report.leaderless_ms += until.saturating_sub(since.min(until));
        }
        self.report.leader_changes += 1;
        self.leader = c;
        self.lease_id = lease;
        self.acting = true;
        self.paused_until = None;
        self.stall_armed = None;
        self.stalled = None;
        self.deadline_checked = false;
        self.term_first_act = None;
        self.term_last_act = None;
        self.term_started_at = self.now;
        // Its campaign was sent just now: its deadline counts from then.
        self.deadline_local =
            (self.local_ms(c) + self.sc.lease_ttl_ms).saturating_sub(self.sc.lease_margin_ms);
        self.step_controller_clock();
        // The store's event streams name every host a process heard.
        let heard: Vec<HostId> = self.hosts.iter().map(|w| w.id.clone()).collect();
        let (engine, actions) =
            Engine::resume_knowing(self.cfg.clone(), &self.log, &heard, self.engine_now());
        self.report.incidents_forgotten += self.engine.incidents_forgotten();
        self.engine = engine;
        // The new process knows no host's leases until they are reported to it.
        self.lease_words_taken.clear();
        self.lifetime += 1;
        let life = self.lifetime;
        self.at(
            self.sim_at_local(c, self.deadline_local),
            Ev::Deadline(life),
        );
        let ka = self.sim_at_local(c, self.local_ms(c) + KEEP_ALIVE_EVERY_MS);
        self.at(ka, Ev::KeepAlive(life));
        // The edges' memory is the new process's: a re-handed intent is sent to the
        // world again, which answers from what it now is.
        self.effects.clear();
        // The in-process listers' news on their way to the former term dies with it: a
        // listing dated on its clock never reaches this one.
        self.queue.retain(|Reverse(Queued(_, _, ev))| {
            !matches!(ev, Ev::Deliver(Input::HostEvent { event, .. }) if by_controller_lister(event))
        });
        for w in &mut self.hosts {
            w.outbox.retain(|e| !by_controller_lister(e));
        }
        self.issued_this_life.clear();
        // A patient operator asks the new leader again.
        self.unfence_asked.clear();
        self.resumed_open = self.log.open().into_iter().map(|r| r.key).collect();
        self.last_revision = u64::MAX;
        self.trace(format!(
            "{:>6} RESUME ctl-{c} lease {lease} open={:?}",
            self.now, self.resumed_open
        ));
        self.apply_actions(actions)?;
        self.check_engine()?;
        // The runtime reloads Nova's inventory at start.
        for h in 0..self.hosts.len() {
            let resources = self.listing(h, true);
            self.deliver(Input::HostEvent {
                host: self.hosts[h].id.clone(),
                event: HostEvent::Inventory {
                    resources,
                    stopped: vec![],
                    rbd_only: vec![],
                    source: Source::Nova,
                    at: ListedAt::Controller(self.engine_now()),
                },
            })?;
        }
        Ok(())
    }

    /// The current term stops acting (its process stays up, a follower now); it gives
    /// its lease back as soon as it reaches etcd (at once if it can).
    pub(super) fn step_down(&mut self, why: StepDown) -> Result<(), Box<Violation>> {
        if !self.acting {
            return Ok(());
        }
        let c = self.leader;
        self.end_term();
        match why {
            StepDown::LocalDeadline => self.report.deadline_stops += 1,
            StepDown::GuardRefused => self.report.guard_refusals += 1,
            StepDown::Unreachable => self.report.etcd_write_failures += 1,
            StepDown::LeaseGone | StepDown::Restart => {}
        }
        self.trace(format!(
            "{:>6} LEADER ctl-{c} stops acting: {why:?} (its clock {} ms, deadline {} ms)",
            self.now,
            self.local_ms(c),
            self.deadline_local
        ));
        if matches!(why, StepDown::LocalDeadline | StepDown::Restart) {
            self.ctls[c].to_revoke = Some(self.lease_id);
            if self.etcd_reachable(c)
                && self
                    .etcd
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.id == self.lease_id)
            {
                self.ctls[c].to_revoke = None;
                self.lease_gone(&format!("revoked by ctl-{c}, which stopped leading"))?;
            }
        }
        Ok(())
    }

    fn end_term(&mut self) {
        self.acting = false;
        self.paused_until = None;
        self.stall_armed = None;
        self.stalled = None;
        self.deadline_checked = false;
        self.ctls[self.leader].paused_until = 0;
        if self.leaderless_since.is_none() {
            self.leaderless_since = Some(self.now);
        }
    }

    /// Controller process `c` dies at once (SIGKILL, or a store error it exits on): its
    /// lease stays on etcd until it expires; systemd starts it again, a follower.
    pub(super) fn kill_process(&mut self, c: usize) {
        if !self.ctls[c].up {
            return;
        }
        if c == self.leader && self.acting {
            self.end_term();
        }
        if self.stalled_old.as_ref().is_some_and(|s| s.ctl == c) {
            self.stalled_old = None;
        }
        let w = &mut self.ctls[c];
        w.up = false;
        w.paused_until = 0;
        w.to_revoke = None;
        self.report.controller_restarts += 1;
        self.trace(format!("{:>6} CTL ctl-{c} killed", self.now));
        self.later(500, 2_500, Ev::ControllerUp(c));
    }

    /// The current term's process stalls for `ms` before the write that starts
    /// `actions`.
    pub(super) fn stall(&mut self, ms: u64, actions: Vec<Action>) {
        let until = self.now + ms;
        self.paused_until = Some(until);
        self.ctls[self.leader].paused_until = until;
        self.stalled = Some(Stalled {
            life: self.lifetime,
            ctl: self.leader,
            lease: self.lease_id,
            actions,
            engine_at: self.engine_now(),
        });
        self.report.leader_stalls += 1;
        self.trace(format!(
            "{:>6} LEADER ctl-{} stalls {ms} ms before its write reaches etcd",
            self.now, self.leader
        ));
        self.at(until, Ev::Wake(self.lifetime));
    }

    fn wake(&mut self, life: u64) -> Result<(), Box<Violation>> {
        if life == self.lifetime && self.acting {
            let Some(s) = self.stalled.take() else {
                return Ok(());
            };
            self.paused_until = None;
            self.ctls[s.ctl].paused_until = 0;
            self.trace(format!("{:>6} LEADER ctl-{} runs again", self.now, s.ctl));
            self.deadline_checked = true;
            self.batch_engine_at = Some(s.engine_at);
            let r = self.apply_actions(s.actions);
            self.batch_engine_at = None;
            self.deadline_checked = false;
            r?;
            self.check_engine()?;
            self.at(self.now, Ev::Deadline(life));
            return Ok(());
        }
        let Some(s) = self.stalled_old.take_if(|s| s.life == life) else {
            return Ok(());
        };
        self.ctls[s.ctl].paused_until = 0;
        // Another took the lead while this one stalled: the write it had on its way
        // reaches etcd now, and must be refused.
        match self.guard(s.ctl, s.lease) {
            Ok(()) => self.fail(
                Invariant::OneLeader,
                format!(
                    "ctl-{}'s write under lease {} accepted after ctl-{} took the lead",
                    s.ctl, s.lease, self.leader
                ),
            ),
            Err(e) => {
                match e {
                    StepDown::GuardRefused => self.report.guard_refusals += 1,
                    _ => self.report.etcd_write_failures += 1,
                }
                self.trace(format!(
                    "{:>6} STORE ctl-{}'s write under lease {} (a deposed leader's): {e:?}; it stops acting",
                    self.now, s.ctl, s.lease
                ));
                Ok(())
            }
        }
    }

    pub(super) fn leader_fault(&mut self, f: Fault) -> Result<(), Box<Violation>> {
        let c = self.leader;
        match f {
            Fault::LeaderKilled if self.ctls[c].up => {
                self.report.leader_kills += 1;
                self.kill_process(c);
            }
            Fault::LeaderCutFromEtcd { for_ms } => {
                let w = &mut self.ctls[c];
                w.etcd_cut_until = w.etcd_cut_until.max(self.now + for_ms);
            }
            Fault::EtcdDown { for_ms } => {
                self.report.etcd_outages += 1;
                self.etcd.available = false;
                self.etcd.down_until = self.etcd.down_until.max(self.now + for_ms);
                self.at(self.etcd.down_until, Ev::EtcdUp);
            }
            Fault::KeepAliveDelay { for_ms, max_ms } => {
                self.keep_alive_delay_ms = max_ms;
                self.keep_alive_delay_until = self.now + for_ms;
            }
            Fault::LeaderStall { for_ms } if self.acting && self.paused_until.is_none() => {
                self.stall_armed = Some(for_ms);
            }
            _ => {}
        }
        Ok(())
    }

    /// At `heal_at`: etcd has its quorum, every controller reaches it, answers come on
    /// time, no stall is pending.
    pub(super) fn heal_etcd(&mut self) -> Result<(), Box<Violation>> {
        if !self.etcd.available {
            self.etcd.down_until = self.now;
            self.etcd_up();
        }
        for w in &mut self.ctls {
            w.etcd_cut_until = 0;
        }
        self.keep_alive_delay_until = 0;
        self.stall_armed = None;
        Ok(())
    }
}
