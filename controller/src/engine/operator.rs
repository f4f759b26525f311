//! Operator commands (maintenance, unfence) and the automatic unfence policy: taken or
//! refused with the reason.

use super::*;

impl Engine {
    /// The automatic unfence policy: a recovered host that is back and clean, whose
    /// compute service reports again, is trusted again as an operator would trust it
    /// (the same checks as `defibctl unfence`; a host not clean yet waits, and its
    /// stale-resource alarm says why).
    pub(super) fn on_compute_reporting(&mut self, host: &HostId) {
        let h = &self.hosts[host];
        if !self.cfg.auto_unfence
            || h.state != HostState::Recovered
            || !self.is_back(host)
            || self.unfence_refusal(host).is_some()
        {
            return;
        }
        let key = IntentKey::derive(
            KeyScope::Policy,
            &format!("unfence@{}", self.now.0),
            &Subject::Host(host.clone()),
        );
        self.issue(
            key,
            Intent::Unfence {
                host: host.clone(),
                before_return: false,
            },
        );
    }

    /// Why an unfence of `host` would be refused now, if it would.
    pub(super) fn unfence_refusal(&self, host: &HostId) -> Option<String> {
        let h = self.hosts.get(host)?;
        // A host fenced by its blocklist alone keeps, in Evacuating, the VMs it does
        // not cover; once the rest is restored, trusting it again gives those back.
        let storage_held = h.state == HostState::Evacuating
            && h.fenced_by == Some(FenceVerifier::CephBlocklist)
            && h.owned.iter().all(|r| {
                self.resources.get(r).is_none_or(|e| {
                    e.owner != h.incident
                        || (!h.storage_covered.contains(r) && e.in_flight.is_none())
                })
            });
        if !matches!(h.state, HostState::Recovered | HostState::Fencing) && !storage_held {
            Some(format!("host is {}", h.state))
        } else if h.fence.in_flight.is_some() {
            Some("a fence is in flight".to_string())
        } else if h.fenced_by == Some(FenceVerifier::CephBlocklist)
            && !h.listed_at.is_some_and(|l| {
                h.fenced_at.is_none_or(|f| l > f) && h.moved_off_at.is_none_or(|m| l > m)
            })
        {
            // Its blocklist stopped its writes, not its qemus: lifted now, a copy of a
            // VM restored elsewhere would write again. Only its own listing shows them.
            Some(
                "fenced by its Ceph blocklist alone, it may still run copies of the VMs \
                 restored elsewhere: not before its watchdog has listed what it runs since \
                 the last of them was restored"
                    .to_string(),
            )
        } else if !h.stale.is_empty() {
            Some(format!("host still runs {} stale resources", h.stale.len()))
        } else {
            None
        }
    }

    pub(super) fn on_operator(&mut self, cmd: OperatorCommand) -> Result<(), Refusal> {
        let now = self.now;
        match cmd {
            OperatorCommand::MaintenanceOn { host } => {
                self.ensure_host(&host);
                let state = self.hosts[&host].state;
                if state == HostState::Maintenance {
                    return Ok(());
                }
                if !state.can_become(HostState::Maintenance) {
                    return Err(Refusal {
                        reason: format!("maintenance refused: host is {state}"),
                    });
                }
                let key = operator_key("maintenance-on", now, &host);
                self.issue(key.clone(), Intent::Maintenance { host, on: true });
                self.complete(&key, IntentOutcome::Recorded);
            }
            OperatorCommand::MaintenanceOff { host } => {
                if self.host_state(&host) != Some(HostState::Maintenance) {
                    return Ok(());
                }
                let key = operator_key("maintenance-off", now, &host);
                self.issue(key.clone(), Intent::Maintenance { host, on: false });
                self.complete(&key, IntentOutcome::Recorded);
            }
            OperatorCommand::Unfence { host } => {
                if !self.hosts.contains_key(&host) {
                    return Ok(());
                }
                if let Some(why) = self.unfence_refusal(&host) {
                    return Err(Refusal {
                        reason: format!("unfence refused: {why}"),
                    });
                }
                let key = operator_key("unfence", now, &host);
                let before_return = !self.is_back(&host);
                self.issue(
                    key,
                    Intent::Unfence {
                        host,
                        before_return,
                    },
                );
            }
        }
        Ok(())
    }
}

/// The key of an operator's command about a host, issued at `now`.
fn operator_key(step: &str, now: Timestamp, host: &HostId) -> IntentKey {
    IntentKey::derive(
        KeyScope::Operator,
        &format!("{step}@{}", now.0),
        &Subject::Host(host.clone()),
    )
}
