//! The edges: everything that touches the world on the engine's behalf, behind four
//! small traits ([`Fencer`], [`Restorer`], [`Confirmer`], [`CopyStopper`]) that take the
//! engine's actions and answer with typed facts (engine [`Input`]s) on a
//! [`ResultSender`].
//!
//! - [`fencing`] and [`fence`]: per-host fence levels (IPMI, fence agents, Pacemaker),
//!   verification and confirmation;
//! - [`nova`], [`neutron`]: the OpenStack restore backend (VMs and routers);
//! - [`libvirt`]: the restore backend for clouds without Nova;
//! - [`old_copies`]: before a VM with RBD disks starts elsewhere, its images' watchers
//!   say whether its old copy is gone (the libvirt backend asks);
//! - [`unconfigured`]: the restore edge of a controller without a backend;
//! - [`stale_copies`]: stale copies of moved VMs destroyed on the host they left, over
//!   that host's event stream, whatever the backend;
//! - [`worker`]: the job loop the OpenStack edges share (jobs that arrive together
//!   batched, each intent key acted on once).
//!
//! Each call only *starts* the work: the implementation reports back later by feeding
//! the matching [`Input`] (`FenceResult`, `HostActionResult` for a force-down or an
//! unfence, `RestoreResult`, `ConfirmationResult`) into the engine. What an edge finds
//! on its own (a listing, a compute service reporting again) goes back as an
//! `Input::HostEvent`: a fact, which the engine decides on. Implementations must be
//! idempotent per [`IntentKey`]: a resumed engine may hand them an intent again whose
//! outcome was never recorded, and they must then report the first outcome instead of
//! acting twice.

pub mod fence;
pub mod fencing;
pub mod libvirt;
pub mod neutron;
pub mod nova;
pub mod old_copies;
pub mod stale_copies;
pub mod unconfigured;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::engine::{Action, FenceMethod, HostId, HostView, Input, IntentKey, Resource};

/// Powers hosts off and verifies it.
pub trait Fencer {
    /// Start fencing `host`.
    fn fence(&mut self, host: &HostId, method: FenceMethod, key: &IntentKey);
    /// `host` is trusted again (unfenced): lift what its fence left in force (a storage
    /// fence's blocklist entries), answering with `HostEvent::StorageFenceLifted` if
    /// there was something to lift.
    fn lift(&mut self, host: &HostId) {
        let _ = host;
    }
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
    /// Ask `host` whether `resource` runs there now; answer with `Input::HostAnswer`.
    /// The engine asks only after a restore answered `RestoreOutcome::Unknown`, so a
    /// backend that never answers that is never asked (and does nothing here).
    fn ask_host(&mut self, host: &HostId, resource: &Resource) {
        let _ = (host, resource);
    }
}

/// Asks independent sources whether a silent host is dead.
pub trait Confirmer {
    /// Start asking about `host`.
    fn confirm(&mut self, host: &HostId);
}

/// Destroys stale copies of VMs on the hosts they were moved off. Nothing answers: the
/// host's next listing says whether the copy is gone.
pub trait CopyStopper {
    /// Destroy `resource`'s copy on `host` if it runs there, and turn its autostart off.
    fn stop_stale_copy(&mut self, host: &HostId, resource: &Resource);
}

/// Hands a world-changing action to its edge. Returns `false` for actions that are not
/// for an edge (timers, store writes, timeline, alarms): the runtime handles those.
pub fn dispatch(
    action: &Action,
    fencer: &mut dyn Fencer,
    restorer: &mut dyn Restorer,
    confirmer: &mut dyn Confirmer,
    copies: &mut dyn CopyStopper,
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
        Action::Unfence { host, key } => {
            restorer.unfence(host, key);
            fencer.lift(host);
        }
        Action::AskHost { host, resource } => restorer.ask_host(host, resource),
        Action::Confirm { host } => confirmer.confirm(host),
        Action::StopStaleCopy { host, resource } => copies.stop_stale_copy(host, resource),
        _ => return false,
    }
    true
}

/// Results go back to the engine task through this channel.
pub type ResultSender = mpsc::UnboundedSender<Input>;

/// The engine's hosts as typed facts (state, whether a fenced host is back, what was
/// moved off it), as the engine task last published them: what an edge needs to pick
/// targets and to follow a host's return. Read-only; decisions stay in the engine.
pub type HostFacts = watch::Receiver<Arc<BTreeMap<HostId, HostView>>>;

/// What every edge is handed when it is built: where to send its answers, and the hosts
/// as the engine sees them.
#[derive(Clone)]
pub struct EdgeLinks {
    /// Results (and facts an edge finds) go back to the engine here.
    pub results: ResultSender,
    /// The engine's hosts.
    pub hosts: HostFacts,
    /// The engine's clock, for facts an edge dates itself (a listing it took), so the
    /// engine compares them with its own times on one clock.
    pub clock: crate::clock::EngineClock,
}

/// A restore backend's record of the intents it was handed, so that each is acted on
/// once: the engine hands an open intent out again after a restart or a retry, and a
/// key in flight must be ignored, a key answered must get its first answer again.
#[derive(Debug, Default)]
pub struct AnsweredOnce {
    answered: HashMap<IntentKey, Input>,
    in_flight: HashSet<IntentKey>,
}

impl AnsweredOnce {
    /// Claims `key` for acting on it: false if it is in flight (ignored) or answered
    /// (its first answer is sent again on `results`).
    pub fn claim(&mut self, key: &IntentKey, results: &ResultSender) -> bool {
        if let Some(first) = self.answered.get(key) {
            let _ = results.send(first.clone());
            return false;
        }
        self.in_flight.insert(key.clone())
    }

    /// Records `answer` as `key`'s answer (the caller sends it).
    pub fn answer(&mut self, key: &IntentKey, answer: &Input) {
        self.in_flight.remove(key);
        self.answered.insert(key.clone(), answer.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{HostId, RestoreOutcome};

    #[test]
    fn an_intent_is_acted_on_once_and_a_repeat_gets_the_first_answer_again() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut intents = AnsweredOnce::default();
        let key = IntentKey("i1/force-down-1/host:h1".into());
        assert!(intents.claim(&key, &tx));
        assert!(!intents.claim(&key, &tx), "in flight: ignored");
        assert!(rx.try_recv().is_err());
        let answer = Input::HostActionResult {
            host: HostId::new("h1"),
            key: key.clone(),
            outcome: RestoreOutcome::Ok {
                host: HostId::new("h1"),
            },
        };
        intents.answer(&key, &answer);
        assert!(!intents.claim(&key, &tx), "answered: not acted on again");
        assert_eq!(rx.try_recv().ok(), Some(answer));
    }
}
