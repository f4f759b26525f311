//! The restore edge for a controller without a restore backend. It answers at once, and
//! on the safe side: a restore that cannot be done fails with the reason. (Fencing and
//! confirmation are in [`super::fencing`]; a host without fence levels gets a failed
//! fence and an `Unknown` confirmation there.)
use std::collections::{HashMap, HashSet};

use tokio::sync::mpsc;

use crate::engine::edge::Restorer;
use crate::engine::{HostId, Input, IntentKey, Resource, RestoreOutcome};

/// Results go back to the engine task through this channel.
pub type ResultSender = mpsc::UnboundedSender<Input>;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::HostId;

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
