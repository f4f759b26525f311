//! Following servers to ACTIVE, and the restart in place that it follows.
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use super::Worker;
use crate::engine::{HostId, IntentKey, RestoreOutcome};
use crate::openstack::compute::Server;

/// What is being waited for on one server.
#[derive(Debug, Clone)]
pub(super) struct Tracked {
    key: IntentKey,
    /// The host it must leave (evacuation) or stay on (restart).
    from: String,
    /// Where it is being rebuilt (evacuation), if chosen here.
    target: Option<String>,
    evacuation: bool,
    started: tokio::time::Instant,
    /// Whether an `os-start` was sent after an evacuation left it SHUTOFF (≥ 2.95).
    started_after: bool,
}

impl Worker {
    pub(super) fn track(
        &self,
        server: &str,
        from: &str,
        target: Option<String>,
        key: IntentKey,
        evacuation: bool,
    ) {
        self.core.lock().tracked.insert(
            server.to_string(),
            Tracked {
                key,
                from: from.to_string(),
                target,
                evacuation,
                started: tokio::time::Instant::now(),
                started_after: false,
            },
        );
    }

    /// One incremental poll per interval: the servers Nova changed since the newest
    /// change seen (Nova's own clock, less a margin), so each poll returns only what
    /// moved and costs Nova little while it rebuilds. A tracked server not seen yet is
    /// read once on its own; one past its timeout too.
    pub(super) async fn track_forever(&self) {
        const MARGIN: Duration = Duration::from_secs(2);
        let mut since: Option<SystemTime> = None;
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            tokio::time::sleep(self.settings.poll_interval).await;
            if self.core.lock().tracked.is_empty() {
                since = None;
                seen.clear();
                continue;
            }
            let from = since.unwrap_or_else(|| SystemTime::now() - Duration::from_secs(300));
            let changed = match self.compute.servers_changed_since(from).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "polling server states failed; retrying");
                    continue;
                }
            };
            if let Some(newest) = changed
                .iter()
                .filter_map(|s| s.updated.as_deref())
                .filter_map(crate::openstack::keystone::parse_rfc3339)
                .max()
            {
                let next = newest - MARGIN;
                since = Some(since.map_or(next, |s| s.max(next)));
            }
            let servers: HashMap<String, Server> =
                changed.into_iter().map(|s| (s.id.clone(), s)).collect();
            let tracked: Vec<(String, Tracked)> = self
                .core
                .lock()
                .tracked
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            seen.retain(|id| tracked.iter().any(|(t, _)| t == id));
            for (id, t) in tracked {
                let s = match servers.get(&id) {
                    Some(s) => Some(s.clone()),
                    None if !seen.contains(&id)
                        || t.started.elapsed() > self.settings.restore_timeout =>
                    {
                        match self.compute.server(&id).await {
                            Ok(s) => s,
                            Err(_) => continue,
                        }
                    }
                    None => continue,
                };
                seen.insert(id.clone());
                self.check(&id, &t, s).await;
            }
        }
    }

    async fn check(&self, id: &str, t: &Tracked, s: Option<Server>) {
        let outcome = match s {
            None => Some(RestoreOutcome::Failed {
                reason: "the server was deleted".into(),
            }),
            Some(s) => {
                let host = s.host.clone().unwrap_or_default();
                let settled = s.task_state.is_none();
                let moved = host != t.from;
                if s.status == "ERROR" && settled {
                    Some(RestoreOutcome::Failed {
                        reason: format!(
                            "Nova set it to ERROR on {host}: {}",
                            s.fault.map(|f| f.message).unwrap_or_default()
                        ),
                    })
                } else if settled && s.status == "ACTIVE" && (moved || !t.evacuation) {
                    Some(RestoreOutcome::Ok {
                        host: HostId::new(host),
                    })
                } else if settled
                    && s.status == "SHUTOFF"
                    && moved
                    && t.evacuation
                    && self.core.lock().was_shutoff.contains(id)
                {
                    // It was stopped before its host failed: restored as it was.
                    Some(RestoreOutcome::Ok {
                        host: HostId::new(host),
                    })
                } else if settled && s.status == "SHUTOFF" && moved && t.evacuation {
                    // ≥ 2.95 leaves an evacuated server SHUTOFF: start it once.
                    if !t.started_after {
                        if let Err(e) = self.compute.start(id).await {
                            tracing::warn!(server = id, error = %e, "starting after evacuation");
                        }
                        if let Some(x) = self.core.lock().tracked.get_mut(id) {
                            x.started_after = true;
                        }
                    }
                    None
                } else if t.started.elapsed() > self.settings.restore_timeout {
                    Some(RestoreOutcome::Failed {
                        reason: format!(
                            "not ACTIVE after {} s (status {}, task {:?}, host {host})",
                            self.settings.restore_timeout.as_secs(),
                            s.status,
                            s.task_state
                        ),
                    })
                } else {
                    None
                }
            }
        };
        let Some(outcome) = outcome else { return };
        let removed = self.core.lock().tracked.remove(id);
        if removed.is_none() {
            return;
        }
        if t.evacuation {
            if let RestoreOutcome::Failed { .. } = &outcome {
                if let Some(target) = &t.target {
                    self.core
                        .lock()
                        .failed_on
                        .entry(id.to_string())
                        .or_default()
                        .insert(target.clone());
                }
            }
            if let Some(target) = &t.target {
                let held = self.core.lock().building.get(target).copied().unwrap_or(0) > 0;
                if held {
                    self.release(target);
                }
            }
        }
        self.finish_server(id, &t.key, outcome);
    }

    // ------------------------------------------------------------ restart in place

    pub(super) async fn restart(&self, server: String, host: HostId, key: IntentKey) {
        let result = async {
            let s = self
                .compute
                .server(&server)
                .await?
                .ok_or_else(|| "the server no longer exists in Nova".to_string())?;
            if s.host.as_deref() != Some(host.as_str()) {
                return Err(format!(
                    "the server runs on {:?}, not on {host}",
                    s.host.unwrap_or_default()
                ));
            }
            if s.status == "SHUTOFF" {
                self.compute.start(&server).await?;
            } else {
                self.compute.reboot_hard(&server).await?;
            }
            Ok::<(), String>(())
        }
        .await;
        match result {
            Ok(()) => self.track(&server, host.as_str(), None, key, false),
            Err(reason) => self.finish_server(&server, &key, RestoreOutcome::Failed { reason }),
        }
    }
}
