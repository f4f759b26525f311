//! A host's compute service: force-down, unforce, and the watcher of returned ones.
//!
//! The force-down reads the host's servers and the targets' capacity at once; the
//! unforce is retried while Nova refuses it (400).
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{RestoreEvent, Worker};
use crate::engine::{
    HostEvent, HostId, HostState, HostView, Input, IntentKey, Resource, RestoreOutcome, Source,
};
use crate::openstack::compute::Server;

/// The compute services of returned hosts are read this often.
const SERVICE_POLL: Duration = Duration::from_secs(2);

/// A host whose compute service was reported reporting is left alone this long before
/// it is read (and reported) again: the engine may have refused to act on it then
/// (e.g. stale resources), and may act now.
const REPORT_AGAIN_AFTER: Duration = Duration::from_secs(30);

/// The hosts the engine has `Recovered` and back: those whose compute service is
/// watched.
fn returned(hosts: &BTreeMap<HostId, HostView>) -> Vec<String> {
    hosts
        .values()
        .filter(|h| h.state == HostState::Recovered && h.back)
        .map(|h| h.host.to_string())
        .collect()
}

impl Worker {
    pub(super) async fn force_down(&self, host: HostId, key: IntentKey) {
        let outcome = match self.force_down_and_list(host.as_str()).await {
            Ok(servers) => {
                self.core.lock().listed.insert(
                    host.to_string(),
                    (
                        tokio::time::Instant::now(),
                        servers.iter().map(|s| (s.id.clone(), s.clone())).collect(),
                    ),
                );
                self.core.event(RestoreEvent::ForcedDown {
                    host: host.to_string(),
                });
                // The engine learns what ran there before it starts evacuating.
                self.core.report(Input::HostEvent {
                    host: host.clone(),
                    event: HostEvent::Inventory {
                        resources: servers.iter().map(|s| Resource::vm(&s.id)).collect(),
                        stopped: vec![],
                        rbd_only: vec![],
                        source: Source::Nova,
                        at: crate::engine::ListedAt::Controller(self.clock.now()),
                    },
                });
                RestoreOutcome::Ok { host: host.clone() }
            }
            Err(reason) => RestoreOutcome::Failed { reason },
        };
        self.core.finish_host(host, key, outcome);
    }

    async fn force_down_and_list(&self, host: &str) -> Result<Vec<Server>, String> {
        let services = self
            .compute
            .compute_services(Some(host))
            .await
            .map_err(|e| e.to_string())?;
        let svc = services
            .iter()
            .find(|s| s.host == host)
            .ok_or_else(|| format!("Nova has no nova-compute service on host {host}"))?;
        // The force-down, the server list and the targets' capacity at once: the
        // evacuations wait for all three (reads only besides the force-down; nothing
        // is evacuated before the force-down succeeded).
        let force = async {
            if svc.forced_down {
                Ok(())
            } else {
                self.compute.set_forced_down(&svc.id, true).await
            }
        };
        let (forced, servers, capacity) = tokio::join!(
            force,
            self.compute.servers_on_host(host),
            self.read_capacity()
        );
        forced.map_err(|e| e.to_string())?;
        tracing::info!(host, "compute service forced down");
        if let Ok(c) = capacity {
            self.core.lock().capacity = Some((tokio::time::Instant::now(), c));
        }
        servers.map_err(|e| e.to_string())
    }

    // ------------------------------------------------------------ unforce

    /// Watches the compute services of the hosts the engine has `Recovered` (every VM
    /// accounted for) and back (heard again since the fence), and reports
    /// [`HostEvent::ComputeServiceReporting`] when a forced-down service reports again
    /// (its `updated_at` moves between two reads), at most every [`REPORT_AGAIN_AFTER`]
    /// per host. A fact, not a decision: whether that unfences the host is the engine's
    /// policy (`engine::Config::auto_unfence`, from `[nova] unforce`), under the checks
    /// of an operator's unfence. With no such host it waits for the engine's hosts to
    /// change; with some, it reads their services every [`SERVICE_POLL`].
    pub(super) async fn watch_compute_services(&self) {
        let mut facts = self.hosts.clone();
        let mut last_read: HashMap<String, Option<String>> = HashMap::new();
        let mut told: HashMap<String, tokio::time::Instant> = HashMap::new();
        loop {
            let watched = returned(&facts.borrow_and_update());
            last_read.retain(|h, _| watched.contains(h));
            if watched.is_empty() {
                if facts.wait_for(|h| !returned(h).is_empty()).await.is_err() {
                    return; // the engine task is gone
                }
                continue;
            }
            for host in watched {
                if told
                    .get(&host)
                    .is_some_and(|t| t.elapsed() < REPORT_AGAIN_AFTER)
                {
                    continue;
                }
                let svc = match self.compute.compute_services(Some(&host)).await {
                    Ok(v) => v.into_iter().find(|s| s.host == host),
                    Err(e) => {
                        tracing::debug!(host, error = %e, "reading a returned host's compute service");
                        continue;
                    }
                };
                let Some(svc) = svc else { continue };
                let previous = last_read.insert(host.clone(), svc.updated_at.clone());
                let moved = matches!(previous, Some(p) if p != svc.updated_at);
                if svc.forced_down && moved {
                    tracing::info!(host, "forced-down compute service reports again");
                    told.insert(host.clone(), tokio::time::Instant::now());
                    self.core.report(Input::HostEvent {
                        host: HostId::new(&host),
                        event: HostEvent::ComputeServiceReporting,
                    });
                }
            }
            tokio::time::sleep(SERVICE_POLL).await;
        }
    }

    pub(super) async fn unforce(&self, host: HostId, key: IntentKey) {
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_secs(1);
        let outcome = loop {
            let attempt = async {
                let services = self.compute.compute_services(Some(host.as_str())).await?;
                match services.iter().find(|s| s.host == host.as_str()) {
                    Some(s) if s.forced_down => self.compute.set_forced_down(&s.id, false).await,
                    _ => Ok(()),
                }
            }
            .await;
            match attempt {
                Ok(()) => break RestoreOutcome::Ok { host: host.clone() },
                // 400: the host's evacuations are not cleaned up yet (its compute has
                // not come back, or not finished init_host): ask again.
                Err(e) if e.status() == Some(400) || e.status().is_none() => {
                    if started.elapsed() > self.settings.unforce_timeout {
                        break RestoreOutcome::Failed {
                            reason: format!(
                                "Nova still refuses after {} s: {e}",
                                self.settings.unforce_timeout.as_secs()
                            ),
                        };
                    }
                    tracing::info!(host = %host, error = %e, "unforce refused for now; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    break RestoreOutcome::Failed {
                        reason: e.to_string(),
                    }
                }
            }
        };
        self.core.finish_host(host, key, outcome);
    }
}
