//! The edges: traits for the things that touch the world. Real implementations (IPMI,
//! fence agents, Pacemaker, Nova, Neutron) live elsewhere; the simulation has fakes.
//!
//! Each call only *starts* the work: the implementation reports back later by feeding
//! the matching [`Input`](super::Input) (`FenceResult`, `ForceDownResult`,
//! `RestoreResult`, `ConfirmationResult`) into the engine. Implementations must be
//! idempotent per [`IntentKey`]: a resumed engine may hand them an intent again whose
//! outcome was never recorded, and they must then report the first outcome instead of
//! acting twice.

use super::intent::IntentKey;
use super::types::{Action, FenceMethod, HostId, Resource};

/// Powers hosts off and verifies it.
pub trait Fencer {
    /// Start fencing `host`.
    fn fence(&mut self, host: &HostId, method: FenceMethod, key: &IntentKey);
}

/// Restores resources and manages compute services.
pub trait Restorer {
    /// Force the host's compute service down.
    fn force_down(&mut self, host: &HostId, key: &IntentKey);
    /// Restart a resource on its own host.
    fn restart_in_place(
        &mut self,
        resource: &Resource,
        host: &HostId,
        attempt: u32,
        key: &IntentKey,
    );
    /// Restore a resource on another host.
    fn evacuate(&mut self, resource: &Resource, from: &HostId, key: &IntentKey);
    /// Trust a host again (undo force-down).
    fn unfence(&mut self, host: &HostId, key: &IntentKey);
}

/// Asks independent sources whether a silent host is dead.
pub trait Confirmer {
    /// Start asking about `host`.
    fn confirm(&mut self, host: &HostId);
}

/// Hands a world-changing action to its edge. Returns `false` for actions that are not
/// for an edge (timers, store writes, timeline, alarms): the runtime handles those.
pub fn dispatch(
    action: &Action,
    fencer: &mut dyn Fencer,
    restorer: &mut dyn Restorer,
    confirmer: &mut dyn Confirmer,
) -> bool {
    match action {
        Action::Fence {
            host,
            method_hint,
            key,
        } => fencer.fence(host, *method_hint, key),
        Action::ForceDown { host, key } => restorer.force_down(host, key),
        Action::RestartInPlace {
            resource,
            host,
            attempt,
            key,
        } => restorer.restart_in_place(resource, host, *attempt, key),
        Action::Evacuate {
            resource,
            from,
            key,
        } => restorer.evacuate(resource, from, key),
        Action::Unfence { host, key } => restorer.unfence(host, key),
        Action::Confirm { host } => confirmer.confirm(host),
        _ => return false,
    }
    true
}
