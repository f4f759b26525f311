//! Stale copies: a VM the engine moved off a host, which that host runs again (libvirt
//! autostart when it returns) or may start at its next boot, is destroyed there and its
//! autostart turned off ([`Action::StopStaleCopy`]).
//!
//! Asked for at three moments, each time only for a VM the engine knows runs elsewhere:
//! - a listing of the host shows the copy (every such listing asks again, so a host whose
//!   stream was closed when it was asked is asked at its next listing);
//! - the move completes (the host may have come back and started it while the move was
//!   under way, and a host that is reachable gets its autostart turned off at once);
//! - the host is unfenced (trusted again before its first listing showed the copy, or
//!   with an autostart that would start it at its next boot).

use super::*;

impl Engine {
    /// Whether a copy of `r` on `host` is stale: `r` is a VM that runs on another host as
    /// far as the engine knows, settled there (running, no incident handles it, nothing
    /// in flight, no evacuation whose outcome is unknown), and not an arrival of `host`
    /// that waits for its word. `require_untrusted` adds that `host` is fenced and not
    /// unfenced since (nothing may be started there meanwhile) or that its incident moved
    /// `r` off it: a VM that a trusted host lists while the engine has it elsewhere was
    /// migrated there by someone (its old host's "shut off, migrated" comes later), not a
    /// copy to destroy.
    fn stale_copy(&self, host: &HostId, r: &Resource, require_untrusted: bool) -> bool {
        let (Some(e), Some(h)) = (self.resources.get(r), self.hosts.get(host)) else {
            return false;
        };
        r.kind() == ResourceKind::Vm
            && &e.host != host
            && (!require_untrusted || h.state.fenced() || h.evacuated.contains(r))
            && !h.awaiting_word.contains(r)
            && e.state == ResourceState::Running
            && e.owner.is_none()
            && e.in_flight.is_none()
            && !self.unsure.contains_key(r)
    }

    /// `host` listed `stale` (resources the engine has elsewhere): the VMs whose copy
    /// there is stale are destroyed; what is left is the alarm's to report. Returns how
    /// many copies are being destroyed.
    pub(super) fn stop_listed_copies(
        &mut self,
        host: &HostId,
        stale: &BTreeSet<Resource>,
        at: ListedAt,
    ) -> usize {
        let copies: Vec<Resource> = stale
            .iter()
            .filter(|r| self.stale_copy(host, r, true))
            .cloned()
            .collect();
        for r in &copies {
            let runs_on = self.resources[r].host.clone();
            self.stop_copy(
                host,
                r,
                format!(
                    "listed by {host} (at {at}) while it runs on {runs_on}: destroying that \
                     copy and turning its autostart off"
                ),
            );
        }
        copies.len()
    }

    /// `r` was just moved off `from` (an evacuation answered): `from` may run a copy
    /// already (back before the move completed) or start one at its next boot.
    pub(super) fn stop_copy_left_behind(&mut self, r: &Resource, from: &HostId) {
        let now = self.now;
        if let Some(h) = self.hosts.get_mut(from) {
            h.moved_off_at = Some(now);
        }
        if self.stale_copy(from, r, false) {
            let to = self.resources[r].host.clone();
            self.stop_copy(
                from,
                r,
                format!(
                    "moved to {to}: destroying any copy left on {from} and turning its \
                     autostart off"
                ),
            );
        }
    }

    /// `host` is trusted again: what its incidents moved off it must not run there, nor
    /// start at its next boot (its last listing may not have shown it yet).
    pub(super) fn stop_copies_before_trust(&mut self, host: &HostId) {
        let Some(h) = self.hosts.get(host) else {
            return;
        };
        let moved: Vec<Resource> = h
            .evacuated
            .iter()
            .filter(|r| self.stale_copy(host, r, true))
            .cloned()
            .collect();
        for r in &moved {
            let runs_on = self.resources[r].host.clone();
            self.stop_copy(
                host,
                r,
                format!(
                    "{host} is trusted again and {r} runs on {runs_on}: destroying any copy \
                     on {host} and turning its autostart off"
                ),
            );
        }
    }

    /// `host` says its domain of `r` was destroyed or undefined: where that is the copy
    /// `host`'s incident moved away (Nova's returning compute cleans up its evacuated
    /// domains; the controller's own stale-copy destroy), the timeline that moved it
    /// says so. Anything else is someone's ordinary stop, and the event table has it.
    pub(super) fn note_copy_removed(
        &mut self,
        host: &HostId,
        r: &Resource,
        what: &str,
        at: HostTime,
    ) {
        let (Some(e), Some(h)) = (self.resources.get(r), self.hosts.get(host)) else {
            return;
        };
        if &e.host == host || !h.evacuated.contains(r) {
            return;
        }
        let Some(inc) = h.incident.or(h.last_incident) else {
            return;
        };
        let cause = format!(
            "{host}'s copy of {r} {what} by {host}'s hypervisor at {at}; {r} runs on {}",
            e.host
        );
        self.note(inc, Subject::Resource(r.clone()), cause, Source::Libvirt);
    }

    /// Asks for the destroy and notes it on the timeline of `host`'s incident (the one
    /// that moved the VM, or its last one), or of the VM's own last one.
    fn stop_copy(&mut self, host: &HostId, r: &Resource, cause: String) {
        if self.replaying {
            return;
        }
        let h = &self.hosts[host];
        let inc = h
            .incident
            .or(h.last_incident)
            .or(self.resources[r].last_failure.map(|(i, _)| i));
        if let Some(inc) = inc {
            self.note(inc, Subject::Resource(r.clone()), cause, Source::Controller);
        }
        self.out.push(Action::StopStaleCopy {
            host: host.clone(),
            resource: r.clone(),
        });
    }
}
