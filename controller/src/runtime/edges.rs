//! Edges for a controller that has no fencing or restore method configured yet. They
//! answer at once, and always on the safe side: a fence that cannot be done is a failed
//! fence (an alarm, never a restore), a restore that cannot be done fails with the reason,
//! and a confirmation with no independent source is `Unknown`. Real edges (IPMI, fence
//! agents, Pacemaker, Nova, libvirt) replace them per host as they are configured.
use tokio::sync::mpsc;

use crate::engine::edge::{Confirmer, Fencer, Restorer};
use crate::engine::{
    FenceMethod, FenceOutcome, HostId, Input, IntentKey, Resource, RestoreOutcome, Source, Verdict,
};

/// Results go back to the engine task through this channel.
pub type ResultSender = mpsc::UnboundedSender<Input>;

pub struct UnconfiguredFencer {
    pub results: ResultSender,
}

impl Fencer for UnconfiguredFencer {
    fn fence(&mut self, host: &HostId, method: FenceMethod, key: &IntentKey) {
        let _ = self.results.send(Input::FenceResult {
            host: host.clone(),
            key: key.clone(),
            outcome: FenceOutcome::Failed {
                reason: format!(
                    "no fence method configured for host {host} (asked for {method:?})"
                ),
            },
        });
    }
}

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

/// Heartbeats are the only source: the answer is always `Unknown`.
pub struct HeartbeatOnlyConfirmer {
    pub results: ResultSender,
}

impl Confirmer for HeartbeatOnlyConfirmer {
    fn confirm(&mut self, host: &HostId) {
        let _ = self.results.send(Input::ConfirmationResult {
            host: host.clone(),
            source: Source::Heartbeat,
            verdict: Verdict::Unknown,
        });
    }
}
