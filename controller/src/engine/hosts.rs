//! Hosts' liveness: heartbeats, each host's silence deadline and the periodic tick that
//! ask the detector (net of the controller's own lag), the safety gate, the
//! confirmation of a silent host and the decision to fence it.

use super::*;

impl Engine {
    /// Returns whether the host changed state.
    pub(super) fn on_heartbeat(&mut self, hb: Heartbeat) -> bool {
        // Dated by its arrival: a heartbeat that waited in the controller's queues was
        // heard when it arrived, not when the engine got to it.
        let now = hb.received.map_or(self.now, |r| r.min(self.now));
        // Many times a second per host: one lookup of the host here, one in the detector,
        // no key cloned unless its deadline is queued again.
        let Some(h) = self.hosts.get_mut(&hb.host) else {
            self.ensure_host(&hb.host);
            return self.on_heartbeat(hb);
        };
        if let Some(at) = self.detector.heartbeat(&hb.host, hb.path, now) {
            if h.queued.is_none_or(|q| q > at) {
                h.queued = Some(at);
                self.deadlines.push(at, hb.host.clone());
            }
        }
        h.heard = true;
        h.self_fence = hb.self_fence;
        let old_boot = h.boot_id.replace(hb.boot_id);
        h.watchdog = Some((hb.boot_id, hb.incarnation));
        // Heartbeats may arrive out of order over two paths: the clock only goes
        // forward, unless the host rebooted (a new clock for a new boot).
        let read = match h.clock {
            Some(c) if old_boot == Some(hb.boot_id) => c.at(now).max(hb.at),
            _ => hb.at,
        };
        h.clock = Some(HostClock {
            read,
            heard_at: now,
        });
        let (state, fenced_at, undated) = (h.state, h.fenced_at, !h.undated.is_empty());
        let host = hb.host;
        if undated {
            self.date_restores(&host, hb.at);
        }
        if !self.hosts[&host].held_exits.is_empty() {
            self.release_held_exits(&host);
        }
        if old_boot.is_some_and(|b| b != hb.boot_id) {
            if let Some(inc) = self.hosts[&host].incident {
                self.note(
                    inc,
                    Subject::Host(host.clone()),
                    format!("host rebooted (boot id {})", hb.boot_id),
                    Source::Heartbeat,
                );
            }
        }
        match state {
            HostState::Suspect | HostState::Confirming => {
                self.set_host_state(
                    &host,
                    HostState::Up,
                    "heartbeats resumed",
                    Source::Heartbeat,
                );
                self.close_host_incident(&host);
                true
            }
            // Received after the verified fence, on the controller's clock (a host's own
            // clock is never compared with the controller's); dated by its arrival, so a
            // heartbeat that waited in the controller's queues across the verification
            // is not taken for one sent after it.
            HostState::Fenced | HostState::Evacuating | HostState::Recovered
                if fenced_at.is_some_and(|t| now > t) =>
            {
                let h = self.hosts.get_mut(&host).expect("ensured");
                if !h.heard_since_fence {
                    h.heard_since_fence = true;
                    self.bump();
                }
                let h = &self.hosts[&host];
                if h.fenced_watchdog == Some((hb.boot_id, hb.incarnation)) && !h.fence_contradicted
                {
                    self.contradict_fence(&host, state);
                }
                self.host_alarm(
                    &host,
                    AlarmKind::HostBackAwaitingUnfence,
                    "fenced host heartbeats again; not trusted until unfenced".into(),
                );
                false
            }
            _ => false,
        }
    }

    /// A power-fenced host heard after the verification from the watchdog process heard
    /// before it: that process ran through the power-off, so the host never lost power,
    /// whatever the BMC or the history said. Nothing more is restored (see
    /// `restore_held`); what was restored already may run twice, which the alarm says.
    fn contradict_fence(&mut self, host: &HostId, state: HostState) {
        let h = self.hosts.get_mut(host).expect("known");
        h.fence_contradicted = true;
        let by = h.fenced_by;
        // An open incident gets the alarm in its timeline (host_alarm); a recovered host's
        // closed one gets it here, next to the restores it questions.
        let closed = h.incident.is_none().then_some(h.last_incident).flatten();
        self.bump();
        let what = format!(
            "heard after its fence was verified ({by:?}) from the same watchdog process (same \
             boot, same incarnation): it was never powered off; {}",
            if state == HostState::Recovered {
                "its resources were restored elsewhere already and may run twice"
            } else {
                "nothing more of it is restored"
            }
        );
        if let Some(inc) = closed {
            self.note(
                inc,
                Subject::Host(host.clone()),
                what.clone(),
                Source::Heartbeat,
            );
        }
        self.host_alarm(host, AlarmKind::FenceContradicted, what);
    }

    /// Fenced, heard again since the fence, and not silent now.
    pub(super) fn is_back(&self, host: &HostId) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|h| h.state.fenced() && h.heard_since_fence && !self.silent(host))
    }

    /// Restarts the host's grace period (after maintenance, unfence, a restart): its
    /// silence counts from `now` until it is heard again.
    pub(super) fn reset_silence(&mut self, host: &HostId, now: Timestamp) {
        self.detector.reset(host, now);
        if let Some(h) = self.hosts.get_mut(host) {
            h.heard = false;
        }
    }

    /// Queues the host's silence deadline unless it is queued at that time or earlier
    /// (deadlines.rs): a later deadline is found when the earlier entry falls due, an
    /// earlier one (silence dated back, at a takeover) is queued at once.
    pub(super) fn queue_deadline(&mut self, host: &HostId) {
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        let Some(at) = self.detector.deadline(host) else {
            return;
        };
        if h.queued.is_some_and(|q| q <= at) {
            return;
        }
        h.queued = Some(at);
        self.deadlines.push(at, host.clone());
    }

    /// The detector's judgement of a host and its silence, net of what the controller
    /// owes (its lag and the time it lost heartbeats itself, load.rs): the host is
    /// judged as of `now` minus that allowance.
    pub(super) fn judge(&self, host: &HostId) -> (Liveness, Duration) {
        let owed = self.judge_owed(host);
        let at = Timestamp(self.now.0.saturating_sub(owed.as_millis() as u64));
        (
            self.detector.liveness(host, at),
            self.detector.silence(host, at).unwrap_or_default(),
        )
    }

    /// Whether the host is silent past its deadline, net of the controller's own lag.
    pub(super) fn silent(&self, host: &HostId) -> bool {
        self.judge(host).0 == Liveness::Suspect
    }

    pub(super) fn on_tick(&mut self) {
        let now = self.now;
        if self.armed_at.is_some_and(|t| now >= t) {
            self.armed_at = None;
        }
        // Hosts whose deadline fell due: judged now, not on the next periodic tick.
        while let Some((due, host)) = self.deadlines.pop_due(now) {
            let Some(h) = self.hosts.get_mut(&host) else {
                continue;
            };
            if h.queued != Some(due) {
                // Superseded by an earlier entry for the same host.
                continue;
            }
            h.queued = None;
            if h.state != HostState::Up {
                // The periodic tick follows it until it is heard again.
                continue;
            }
            let (live, silence) = self.judge(&host);
            if live == Liveness::Suspect {
                self.evaluate_host(&host, live, silence);
            } else if let Some(at) = self.detector.deadline(&host) {
                // Heard since it was queued, or excused by the controller's lag: due
                // again at its new deadline, or as soon as the lag is spent.
                let owed = self.judge_owed(&host);
                let next = (at + owed).max(now + Duration::from_millis(1));
                let h = self.hosts.get_mut(&host).expect("known");
                h.queued = Some(next);
                self.deadlines.push(next, host);
            }
        }
        if self.next_tick_at.is_some_and(|t| now < t) {
            return;
        }
        self.arm_tick();
        // Every host, every periodic tick: an Up host whose deadline is queued later than
        // now is alive by construction (its deadline falls due in the heap above), so it
        // costs no judgement here; the others (and every host under phi accrual, which
        // has no deadline) are judged, and the gate counts them all.
        let mut judged: Vec<(HostId, Liveness, Duration)> = Vec::new();
        let (mut n, mut silent) = (0usize, 0usize);
        for (host, h) in &self.hosts {
            let counted = !matches!(h.state, HostState::Maintenance | HostState::Recovered);
            if h.state == HostState::Up && h.queued.is_some_and(|q| q > now) {
                // Alive; it counts once it was heard since it was (re)registered.
                if counted && h.heard {
                    n += 1;
                    // Past its own deadline and queued later only because the
                    // controller's lag excuses it: not suspected, but no proof that the
                    // controller hears anyone either (it may be the one cut off).
                    if self.detector.liveness(host, now) == Liveness::Suspect {
                        silent += 1;
                    }
                }
                continue;
            }
            let (live, silence) = self.judge(host);
            // For the gate, silence the controller's lag excuses still counts as silence:
            // the allowance spares a host an incident, it does not show the controller
            // hears it.
            let gate_silent =
                live == Liveness::Suspect || self.detector.liveness(host, now) == Liveness::Suspect;
            // A host not heard since it was (re)registered — back from maintenance, or
            // just known — is not yet silent, but it is no proof that the controller
            // hears anyone either: it does not count until it is heard or turns Suspect.
            if counted && (gate_silent || self.detector.last_seen(host).is_some()) {
                n += 1;
                if gate_silent {
                    silent += 1;
                }
            }
            judged.push((host.clone(), live, silence));
        }
        self.evaluate_gate(n, silent);
        for (host, live, silence) in &judged {
            self.evaluate_host(host, *live, *silence);
        }
        self.chase_unanswered();
    }

    /// What the controller owes the host's current silence (load.rs).
    fn judge_owed(&self, host: &HostId) -> Duration {
        let since = self.detector.silent_since(host).unwrap_or(self.now);
        self.load
            .allowance(since, self.now, self.cfg.max_overload_allowance)
    }

    /// The runtime's report of the controller's own load: kept for the judgements, and
    /// an alarm when the controller turns overloaded.
    pub(super) fn on_load(&mut self, load: super::load::ControllerLoad) {
        let report = load.clone();
        match self.load.report(self.now, load, self.cfg.overload_lag) {
            Some(super::load::LoadChange::Overloaded) => {
                self.bump();
                let Some(episodes) = self.load.alarm_due(self.now) else {
                    return;
                };
                self.alarm(
                    AlarmKind::ControllerOverloaded,
                    None,
                    None,
                    format!(
                        "the controller is the slow one ({episodes} overload episode(s) since the last alarm): heartbeats waited up to {} ms to reach the engine, its timer fired {} ms late, it lost {} heartbeats itself, {} messages queued; every host's silence deadline is extended by its lag ({} ms) and blind time, at most {} s",
                        report.heartbeat_wait.as_millis(),
                        report.timer_lateness.as_millis(),
                        report.lost,
                        report.queue_depth,
                        self.load.lag().as_millis(),
                        self.cfg.max_overload_allowance.as_secs()
                    ),
                );
            }
            Some(super::load::LoadChange::Recovered) => self.bump(),
            None => {}
        }
    }

    /// The safety gate from the counts of a periodic tick: `n` hosts that count (heard,
    /// not in maintenance nor recovered), `silent` of them Suspect.
    pub(super) fn evaluate_gate(&mut self, n: usize, silent: usize) {
        let isolated = n > 0 && silent == n;
        let mass = n > 0 && (silent as f64) > self.cfg.max_dead_share * n as f64;
        if isolated && !self.gate.isolated {
            self.alarm(
                AlarmKind::ControllerIsolated,
                None,
                None,
                format!("no heartbeat from any of {n} hosts: suspecting a partition of the controller; fencing nobody"),
            );
        } else if mass && !isolated && !self.gate.mass {
            self.alarm(
                AlarmKind::MassFailure,
                None,
                None,
                format!(
                    "{silent} of {n} hosts look dead (more than {:.0}%): fencing stopped",
                    self.cfg.max_dead_share * 100.0
                ),
            );
        }
        if self.gate.isolated != isolated || self.gate.mass != mass {
            self.bump();
        }
        self.gate = Gate { isolated, mass };
    }

    pub(super) fn evaluate_host(&mut self, host: &HostId, live: Liveness, silence: Duration) {
        let now = self.now;
        let state = self.hosts[host].state;
        match state {
            HostState::Up if live == Liveness::Suspect => {
                let owed = self.judge_owed(host);
                let cause = if owed.is_zero() {
                    format!("no heartbeat on any path for {} ms", silence.as_millis())
                } else {
                    format!(
                        "no heartbeat on any path for {} ms beyond the {} ms the controller's own lag and lost heartbeats excuse",
                        silence.as_millis(),
                        owed.as_millis()
                    )
                };
                self.open_host_incident(host);
                self.set_host_state(host, HostState::Suspect, &cause, Source::Heartbeat);
            }
            HostState::Suspect if silence >= self.cfg.confirm_after => {
                self.set_host_state(
                    host,
                    HostState::Confirming,
                    &format!(
                        "silent for {} ms; asking independent sources",
                        silence.as_millis()
                    ),
                    Source::Heartbeat,
                );
                self.ask_confirmation(host);
            }
            HostState::Confirming => {
                let h = &self.hosts[host];
                let asked = h.confirm_asked_at.unwrap_or(now);
                if h.awaiting_confirmation && now >= asked + self.cfg.confirm_timeout {
                    let h = self.hosts.get_mut(host).expect("known");
                    h.awaiting_confirmation = false;
                    if h.verdict.is_none() {
                        h.verdict = Some((Verdict::Unknown, Source::Controller));
                    }
                    let inc = h.incident;
                    self.bump();
                    if let Some(inc) = inc {
                        self.note(
                            inc,
                            Subject::Host(host.clone()),
                            "confirmation timed out".into(),
                            Source::Controller,
                        );
                    }
                }
                let h = &self.hosts[host];
                let verdict = h.verdict.map(|v| v.0);
                if !h.awaiting_confirmation
                    && matches!(verdict, Some(Verdict::Alive | Verdict::Unknown))
                    && now >= asked + self.cfg.confirm_retry
                {
                    self.ask_confirmation(host);
                }
                let decide = match verdict {
                    Some(Verdict::Dead) => true,
                    Some(Verdict::Unknown) => silence >= self.cfg.fence_on_unknown_after,
                    Some(Verdict::Alive) | None => false,
                };
                if decide && live == Liveness::Suspect && self.gate.open() {
                    let cause = match verdict {
                        Some(Verdict::Dead) => "confirmed dead".to_string(),
                        _ => format!("unconfirmed, silent for {} ms", silence.as_millis()),
                    };
                    let src = self.hosts[host].verdict.map_or(Source::Controller, |v| v.1);
                    self.decide_fence(host, &cause, src);
                }
            }
            _ => {}
        }
    }

    pub(super) fn ask_confirmation(&mut self, host: &HostId) {
        let now = self.now;
        let h = self.hosts.get_mut(host).expect("known");
        h.confirm_asked_at = Some(now);
        h.awaiting_confirmation = true;
        self.bump();
        self.out.push(Action::Confirm { host: host.clone() });
    }

    pub(super) fn on_confirmation(&mut self, host: HostId, source: Source, verdict: Verdict) {
        let Some(h) = self.hosts.get_mut(&host) else {
            return;
        };
        if h.state != HostState::Confirming {
            return;
        }
        h.awaiting_confirmation = false;
        h.verdict = Some((verdict, source));
        let inc = h.incident;
        self.bump();
        if let Some(inc) = inc {
            self.note(
                inc,
                Subject::Host(host.clone()),
                format!("confirmation: {verdict:?}"),
                source,
            );
        }
        if verdict == Verdict::Alive {
            self.host_alarm(
                &host,
                AlarmKind::HostAliveButSilent,
                format!("{source:?} says the host is alive but the controller hears nothing: not fencing"),
            );
        }
        // A Dead verdict fences on the next tick (after the gates are evaluated).
    }
}
