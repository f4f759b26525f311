//! Actions whose answer never came: a backstop for an edge that loses one.
//!
//! Every edge answers what it is handed, a timeout included (the libvirt backend's
//! lost command is `Unknown`, Nova's tracker gives up after `restore_timeout`, each
//! fence level has its own). Should one lose an answer anyway, what waits on it would
//! wait forever: a host held in `Fencing`, a VM never restored. After
//! [`Config::unanswered_after`](super::Config::unanswered_after) the action is handed to
//! its edge again under the same key, which the edges answer from what they or the
//! world know (an answered key is answered again, one under way is joined, Nova reads
//! the server first). A libvirt evacuation is not: handed again, the backend would
//! pick a target afresh while the first may have started it, so it is taken as not
//! known and the hosts are asked, as after a controller restart.

use super::*;

impl Engine {
    /// Notes that the action of `key` was handed to its edge now.
    pub(super) fn handed(&mut self, key: &IntentKey) {
        self.handed.insert(key.clone(), self.now);
    }

    /// Per tick: hands again, or takes as not known, what has waited too long.
    pub(super) fn chase_unanswered(&mut self) {
        let after = self.cfg.unanswered_after;
        let now = self.now;
        let due: Vec<IntentKey> = self
            .handed
            .iter()
            .filter(|(_, at)| now.since(**at) >= after)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let record = match self.intents.get(&key) {
                Some(k) if !k.done => k.record.clone(),
                _ => {
                    self.handed.remove(&key);
                    continue;
                }
            };
            let secs = after.as_secs();
            if let Intent::Evacuate { resource, .. } = &record.intent {
                if !self.restorer_remembers_targets(resource) {
                    self.handed.remove(&key);
                    self.complete(
                        &key,
                        IntentOutcome::Restore(RestoreOutcome::Unknown {
                            target: None,
                            reason: format!(
                                "no answer within {secs} s, and the backend may have lost \
                                 where it sent it"
                            ),
                        }),
                    );
                    continue;
                }
            }
            let Some(action) = record.intent.action(&key) else {
                self.handed.remove(&key);
                continue;
            };
            if let Some(inc) = record.intent.incident() {
                let subject = self.incident_subject(inc);
                self.note(
                    inc,
                    subject,
                    format!("no answer to {key} within {secs} s: handed to its edge again"),
                    Source::Controller,
                );
            }
            self.out.push(action);
            self.handed(&key);
            self.rehanded.insert(key);
        }
    }

    /// A restart in place handed again (by a resumed controller, or by the backstop)
    /// that its edge could not carry out (the host's stream down, Nova's reboot never
    /// done) speaks for this hand only: the first hand of the same key may have started
    /// the VM, its answer lost with the process that sent it. Its outcome is not known,
    /// then, and the host is asked (unsure.rs) before an evacuation could start a
    /// second copy.
    pub(super) fn rehanded_outcome(
        &self,
        key: &IntentKey,
        outcome: RestoreOutcome,
    ) -> RestoreOutcome {
        let RestoreOutcome::Failed { reason } = &outcome else {
            return outcome;
        };
        if !self.rehanded.contains(key) {
            return outcome;
        }
        match self.intents.get(key) {
            Some(Known {
                record:
                    IntentRecord {
                        intent: Intent::RestartInPlace { host, .. },
                        ..
                    },
                done: false,
            }) => RestoreOutcome::Unknown {
                target: Some(host.clone()),
                reason: format!(
                    "handed again, and this hand failed ({reason}); an earlier hand may have \
                     started it"
                ),
            },
            _ => outcome,
        }
    }
}
