//! The stale-copy edge: the engine's `StopStaleCopy` becomes a `DestroyDomain` command
//! over the host's open event stream, whatever the restore backend (the intake opens a
//! stream for every watchdog, Nova backend or not).
//!
//! ```text
//! engine ─StopStaleCopy─► StaleCopies ─► HostStreams[host] ─► the host's stream task ─► watchdog
//!                                                                 (virDomainDestroy if active,
//!   log + defib_stale_copies_total{outcome} ◄── CommandResult ◄──   autostart off, no undefine)
//! ```
//!
//! Nothing goes back to the engine: the host's next listing says whether the copy is
//! gone (a destroy makes libvirt send a lifecycle event, on which the watchdog lists its
//! domains again), and a listing that still shows it asks again. So a host whose stream
//! is not open is skipped (its next listing, which comes over that stream, asks again),
//! and a destroy already on its way to a host is not sent twice.
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::frame::HostCommand;

use super::libvirt::{command_id, run_command, CommandAnswer, HostStreams, COMMAND_TIMEOUT};
use super::CopyStopper;
use crate::engine::{HostId, IntentKey, Resource};
use crate::metrics::Metrics;

/// How a destroy ended, for `defib_stale_copies_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A copy ran and was destroyed.
    Destroyed,
    /// No copy ran (its autostart is off now).
    NotRunning,
    /// The watchdog could not destroy it, or did not answer.
    Failed,
    /// The host's stream is not open: not sent.
    NotConnected,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Destroyed => "destroyed",
            Outcome::NotRunning => "not_running",
            Outcome::Failed => "failed",
            Outcome::NotConnected => "not_connected",
        }
    }

    /// What the watchdog's answer says (its detail starts with `destroyed` when a copy
    /// ran, see `HostCommand::DestroyDomain`).
    fn of(answer: &Result<CommandAnswer, String>) -> Outcome {
        match answer {
            Ok(CommandAnswer { ok: true, detail }) if detail.starts_with("destroyed") => {
                Outcome::Destroyed
            }
            Ok(CommandAnswer { ok: true, .. }) => Outcome::NotRunning,
            _ => Outcome::Failed,
        }
    }
}

/// Sends the destroys (see the module docs).
pub struct StaleCopies {
    streams: Arc<HostStreams>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    /// (host, VM) pairs whose destroy is on its way.
    in_flight: Arc<Mutex<HashSet<(String, String)>>>,
    /// Makes each command's id its own (there is no intent key to derive it from).
    sent: u64,
}

impl StaleCopies {
    pub fn new(streams: Arc<HostStreams>, metrics: Arc<Metrics>) -> Self {
        StaleCopies {
            streams,
            metrics,
            timeout: COMMAND_TIMEOUT,
            in_flight: Arc::default(),
            sent: 0,
        }
    }

    fn count(metrics: &Metrics, outcome: Outcome) {
        metrics
            .stale_copies
            .get_or_create(&Metrics::label("outcome", outcome.label()))
            .inc();
    }
}

impl CopyStopper for StaleCopies {
    fn stop_stale_copy(&mut self, host: &HostId, resource: &Resource) {
        let Resource::Vm(vm) = resource else {
            return;
        };
        let pair = (host.to_string(), vm.as_str().to_string());
        if self.streams.sender(host.as_str()).is_none() {
            tracing::info!(%host, %resource, "stale copy not destroyed now: the host's watchdog is not connected (its next listing asks again)");
            Self::count(&self.metrics, Outcome::NotConnected);
            return;
        }
        if !self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pair.clone())
        {
            tracing::debug!(%host, %resource, "a destroy of this copy is already on its way");
            return;
        }
        self.sent += 1;
        let id = command_id(&IntentKey(format!(
            "stop-stale-copy/{host}/{}/{}",
            vm.as_str(),
            self.sent
        )));
        tracing::info!(%host, %resource, command_id = id, "asking the watchdog to destroy a stale copy");
        let command = HostCommand::DestroyDomain {
            vm_uuid: vm.as_str().to_string(),
        };
        let (streams, metrics, in_flight, timeout) = (
            self.streams.clone(),
            self.metrics.clone(),
            self.in_flight.clone(),
            self.timeout,
        );
        let (host, resource) = (host.clone(), resource.clone());
        tokio::spawn(async move {
            let answer = run_command(&streams, host.as_str(), id, command, timeout)
                .await
                .map_err(|e| e.reason().to_string());
            in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&pair);
            let outcome = Outcome::of(&answer);
            Self::count(&metrics, outcome);
            match (outcome, answer) {
                (Outcome::Destroyed, Ok(a)) => {
                    tracing::warn!(%host, %resource, detail = %a.detail, "stale copy destroyed")
                }
                (_, Ok(CommandAnswer { ok: true, detail })) => {
                    tracing::info!(%host, %resource, %detail, "no stale copy ran")
                }
                (_, Ok(CommandAnswer { detail, .. }) | Err(detail)) => {
                    tracing::warn!(%host, %resource, %detail, "the stale copy could not be destroyed (the host's next listing asks again)")
                }
            }
        });
    }
}

/// Sends nothing: for an engine task built without watchdog streams (tests of its
/// other edges).
pub struct NoStreams;

impl CopyStopper for NoStreams {
    fn stop_stale_copy(&mut self, host: &HostId, resource: &Resource) {
        tracing::debug!(%host, %resource, "no watchdog streams: stale copy not destroyed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::libvirt::{CommandRequest, StreamRegistration, COMMANDS_QUEUED};
    use tokio::sync::mpsc;

    /// A stand-in for a host's stream task that answers each command with `answer` once
    /// `release` lets it, after recording it.
    fn fake_stream(
        streams: &Arc<HostStreams>,
        host: &str,
        answer: CommandAnswer,
    ) -> (
        StreamRegistration,
        mpsc::UnboundedReceiver<(u64, HostCommand)>,
        Arc<tokio::sync::Semaphore>,
    ) {
        let (tx, mut rx) = mpsc::channel::<CommandRequest>(COMMANDS_QUEUED);
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let gate = release.clone();
        let registration = streams.register(host, tx);
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let _ = seen_tx.send((req.command_id, req.command.clone()));
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                let _ = req.reply.send(answer.clone());
            }
        });
        (registration, seen, release)
    }

    fn metric(m: &Metrics, outcome: &str) -> u64 {
        m.stale_copies
            .get_or_create(&Metrics::label("outcome", outcome))
            .get()
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_stale_copy_is_destroyed_over_its_hosts_stream_and_not_sent_again_while_on_its_way() {
        let streams = HostStreams::new();
        let metrics = Arc::new(Metrics::new());
        let (_reg, mut seen, release) = fake_stream(
            &streams,
            "h2",
            CommandAnswer {
                ok: true,
                detail: "destroyed dfb-x (qemu pid 7); autostart turned off".into(),
            },
        );
        let mut edge = StaleCopies::new(streams.clone(), metrics.clone());
        let (h2, vm) = (HostId::new("h2"), Resource::vm("u-1"));
        edge.stop_stale_copy(&h2, &vm);
        let (_, command) = seen.recv().await.expect("sent");
        assert_eq!(
            command,
            HostCommand::DestroyDomain {
                vm_uuid: "u-1".into()
            }
        );
        // A second listing while the first destroy is on its way: not sent again.
        edge.stop_stale_copy(&h2, &vm);
        release.add_permits(1);
        until("the destroy counted", || metric(&metrics, "destroyed") == 1).await;
        assert!(seen.try_recv().is_err(), "sent twice");
        // Answered: a later listing that still shows it asks again.
        edge.stop_stale_copy(&h2, &vm);
        assert!(seen.recv().await.is_some());
        release.add_permits(1);
        until("the second destroy counted", || {
            metric(&metrics, "destroyed") == 2
        })
        .await;
    }

    #[tokio::test]
    async fn a_host_without_an_open_stream_is_skipped_and_a_copy_that_did_not_run_is_counted_so() {
        let streams = HostStreams::new();
        let metrics = Arc::new(Metrics::new());
        let mut edge = StaleCopies::new(streams.clone(), metrics.clone());
        edge.stop_stale_copy(&HostId::new("h9"), &Resource::vm("u-1"));
        assert_eq!(metric(&metrics, "not_connected"), 1);
        let (_reg, mut seen, release) = fake_stream(
            &streams,
            "h2",
            CommandAnswer {
                ok: true,
                detail: "dfb-x not running; autostart turned off".into(),
            },
        );
        release.add_permits(1);
        edge.stop_stale_copy(&HostId::new("h2"), &Resource::vm("u-1"));
        assert!(seen.recv().await.is_some());
        until("counted", || metric(&metrics, "not_running") == 1).await;
        // Routers have no domain to destroy.
        edge.stop_stale_copy(&HostId::new("h2"), &Resource::router("r-1"));
        assert!(seen.try_recv().is_err());
    }
}
