//! A fenced host's return: its moved routers reported stale until clean; the unfence.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{RouterEvent, Worker};
use crate::engine::{HostId, HostState, HostView, IntentKey, Resource, RestoreOutcome};
use crate::openstack::network::Agent;

/// A returned host's agents are read this often until they are clean (at most: the
/// engine publishes its hosts more often, heartbeats move them).
const CLEANUP_POLL: Duration = Duration::from_secs(1);

/// What the watcher acts on, per host: its state, whether it is back, and the routers
/// moved off it since its fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Watched {
    pub(super) state: HostState,
    back: bool,
    moved: BTreeSet<String>,
}

fn watched(hosts: &BTreeMap<HostId, HostView>) -> BTreeMap<HostId, Watched> {
    hosts
        .iter()
        .map(|(id, h)| {
            let moved = h
                .evacuated
                .iter()
                .filter_map(|r| match r {
                    Resource::Router(r) => Some(r.to_string()),
                    Resource::Vm(_) => None,
                })
                .collect();
            (
                id.clone(),
                Watched {
                    state: h.state,
                    back: h.back,
                    moved,
                },
            )
        })
        .collect()
}

impl Worker {
    /// Follows the engine's hosts: lists every fenced host not listed yet (after a
    /// restart: routers a failed listing left behind), reports the routers moved off a
    /// host once it is back, and clears the report once the host's agents hold nothing
    /// that is not theirs. Wakes when a host changes, and while a returned host is not
    /// clean yet, every [`CLEANUP_POLL`] to read its agents again.
    pub(super) async fn watch_returns(self) {
        let mut facts = self.hosts.clone();
        let mut next_check = tokio::time::Instant::now() + CLEANUP_POLL;
        loop {
            let hosts = watched(&facts.borrow_and_update());
            self.list_fenced(&hosts);
            let check = tokio::time::Instant::now() >= next_check;
            let (reported, cleaning) = self.follow_returns(&hosts, check).await;
            if check || reported {
                // A host just told is read a poll later, as one read just now.
                next_check = tokio::time::Instant::now() + CLEANUP_POLL;
            }
            let change = facts.wait_for(|now| watched(now) != hosts);
            let changed = if cleaning {
                tokio::select! {
                    changed = change => changed.map(|_| ()),
                    _ = tokio::time::sleep_until(next_check) => Ok(()),
                }
            } else {
                change.await.map(|_| ())
            };
            if changed.is_err() {
                return; // the engine task is gone
            }
        }
    }

    /// Reports the routers moved off each returned host (once per set) and, if `check`,
    /// reads whether the agents of a host told so are clean. Whether a host was told
    /// just now, and whether a returned host is not clean yet (to be read again).
    async fn follow_returns(&self, hosts: &BTreeMap<HostId, Watched>, check: bool) -> (bool, bool) {
        let (mut reported_now, mut cleaning) = (false, false);
        let back = hosts
            .iter()
            .filter(|(_, h)| h.state == HostState::Recovered && h.back && !h.moved.is_empty());
        for (host, seen) in back {
            let host = host.as_str();
            let moved = &seen.moved;
            let (reported, cleaned) = {
                let st = self.core.lock();
                (
                    st.reported.get(host) == Some(moved),
                    st.cleaned.contains(host),
                )
            };
            if !reported {
                self.inventory(host, moved);
                let mut st = self.core.lock();
                st.reported.insert(host.to_string(), moved.clone());
                st.cleaned.remove(host);
                drop(st);
                tracing::warn!(
                    host,
                    routers = moved.len(),
                    "routers moved off a returned host reported for cleanup"
                );
                self.core.event(RouterEvent::StaleReported {
                    host: host.to_string(),
                    routers: moved.iter().cloned().collect(),
                });
                reported_now = true;
                cleaning = true;
            } else if !cleaned {
                cleaning = true;
                if !check {
                    continue;
                }
                match self.holds_only_its_own(host).await {
                    Ok(None) => {
                        self.inventory(host, &BTreeSet::new());
                        self.core.lock().cleaned.insert(host.to_string());
                        tracing::info!(host, "returned host's L3 agents clean");
                        self.core.event(RouterEvent::CleanedUp {
                            host: host.to_string(),
                        });
                    }
                    Ok(Some(why)) => tracing::debug!(host, why, "not clean yet"),
                    Err(e) => tracing::warn!(host, error = %e, "reading the L3 agents"),
                }
            }
        }
        (reported_now, cleaning)
    }

    /// `None` when every L3 agent of `host` reports (alive) and holds no more routers
    /// than Neutron binds to it (a returning neutron-l3-agent's first full sync removes
    /// the namespaces of routers not scheduled to it; an admin-down agent gets none);
    /// otherwise why not.
    async fn holds_only_its_own(&self, host: &str) -> Result<Option<String>, String> {
        let agents = self.host_agents(host).await?;
        for a in agents {
            if !a.alive {
                return Ok(Some(format!("L3 agent {} does not report", a.id)));
            }
            if let Some(why) = self.holds_foreign(&a).await? {
                return Ok(Some(why));
            }
        }
        Ok(None)
    }

    async fn holds_foreign(&self, a: &Agent) -> Result<Option<String>, String> {
        let bound = self
            .network
            .agent_routers(&a.id)
            .await
            .map_err(|e| e.to_string())?
            .len() as u64;
        Ok(match a.reported_routers() {
            Some(n) if n > bound => Some(format!(
                "L3 agent {} on {} still serves {n} routers, {bound} of them bound to it",
                a.id, a.host
            )),
            _ => None,
        })
    }

    pub(super) async fn enable(&self, host: HostId, key: IntentKey) {
        // Trusted again: a listing still retrying stops (its routers stay with the
        // host's own agent), and a next fence lists again.
        {
            let mut st = self.core.lock();
            st.listing.remove(host.as_str());
            st.listed.remove(host.as_str());
            st.unfenced.insert(host.to_string());
        }
        let outcome = match self.enable_agents(host.as_str()).await {
            Ok(()) => {
                let mut st = self.core.lock();
                st.reported.remove(host.as_str());
                st.cleaned.remove(host.as_str());
                drop(st);
                self.core.event(RouterEvent::AgentsEnabled {
                    host: host.to_string(),
                });
                RestoreOutcome::Ok { host: host.clone() }
            }
            Err(reason) => RestoreOutcome::Failed {
                reason: format!("neutron: {reason}"),
            },
        };
        self.core.finish_host(host, key, outcome);
    }

    /// Trusts the host's L3 agents again: refused while one that reports serves more
    /// routers than are bound to it (stale routers still on its data plane).
    async fn enable_agents(&self, host: &str) -> Result<(), String> {
        let agents = self.host_agents(host).await?;
        for a in agents.iter().filter(|a| a.alive) {
            if let Some(why) = self.holds_foreign(a).await? {
                return Err(format!("{why}: clean it up before it is trusted again"));
            }
        }
        for a in agents.iter().filter(|a| !a.admin_state_up) {
            self.network
                .set_agent_admin_state(&a.id, true)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_watched_by_its_state_its_return_and_the_routers_moved_off_it() {
        let h = HostId::new("h1");
        let view = HostView {
            host: h.clone(),
            state: HostState::Recovered,
            incident: None,
            last_seen: None,
            evacuated: vec![Resource::vm("vm-1"), Resource::router("r-1")],
            back: true,
            not_a_target: None,
            unprotected: vec![],
        };
        let hosts: BTreeMap<HostId, HostView> = [(h.clone(), view.clone())].into();
        let w = &watched(&hosts)[&h];
        assert_eq!(w.state, HostState::Recovered);
        assert!(w.back);
        assert_eq!(w.moved, BTreeSet::from(["r-1".to_string()]), "routers only");
        // A heartbeat moves `last_seen` only: nothing the watcher acts on changed.
        let later: BTreeMap<HostId, HostView> = [(
            h.clone(),
            HostView {
                last_seen: Some(crate::engine::Timestamp(5)),
                ..view
            },
        )]
        .into();
        assert_eq!(watched(&later), watched(&hosts));
    }
}
