//! The restore edge for a controller without a restore backend: answers at once, and on
//! the safe side (a restore that cannot be done fails with the reason). Fencing and
//! confirmation are in [`super::fencing`]; a host without fence levels gets a failed
//! fence and an `Unknown` confirmation there.
use super::{Restorer, ResultSender};
use crate::engine::{HostId, Input, IntentKey, Resource, RestoreOutcome};

pub struct UnconfiguredRestorer {
    pub results: ResultSender,
}

impl UnconfiguredRestorer {
    fn failed(what: &str) -> RestoreOutcome {
        RestoreOutcome::Failed {
            reason: format!("no restore backend configured: cannot {what}"),
        }
    }
}

impl Restorer for UnconfiguredRestorer {
    fn force_down(&mut self, host: &HostId, key: &IntentKey) {
        let _ = self.results.send(Input::HostActionResult {
            host: host.clone(),
            key: key.clone(),
            outcome: Self::failed("force the compute service down"),
        });
    }

    fn restart_in_place(
        &mut self,
        resource: &Resource,
        _host: &HostId,
        _attempt: u32,
        key: &IntentKey,
    ) {
        let _ = self.results.send(Input::RestoreResult {
            resource: resource.clone(),
            key: key.clone(),
            outcome: Self::failed("restart in place"),
        });
    }

    fn evacuate(&mut self, resource: &Resource, _from: &HostId, key: &IntentKey) {
        let _ = self.results.send(Input::RestoreResult {
            resource: resource.clone(),
            key: key.clone(),
            outcome: Self::failed("evacuate"),
        });
    }

    fn unfence(&mut self, host: &HostId, key: &IntentKey) {
        // Nothing was forced down, so trusting the host again needs no outside call.
        let _ = self.results.send(Input::HostActionResult {
            host: host.clone(),
            key: key.clone(),
            outcome: RestoreOutcome::Ok { host: host.clone() },
        });
    }
}
