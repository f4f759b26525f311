//! A fenced host's return: its moved routers reported stale until clean; the unfence.
use std::collections::BTreeSet;
use std::time::Duration;

use super::{RouterEvent, Worker};
use crate::clock::wall_clock_now;
use crate::engine::{HostId, HostState, Input, IntentKey, RestoreOutcome};
use crate::openstack::network::Agent;

/// How often the hosts are looked at (fenced hosts not listed yet, stale report,
/// cleanup).
const RETURN_POLL: Duration = Duration::from_secs(1);

/// A host heartbeating within this long counts as back.
const BACK_WITHIN_MS: u64 = 2_000;

impl Worker {
    /// Lists every fenced host not listed yet (after a restart: routers a failed
    /// listing left behind), reports the routers moved off a host once it heartbeats
    /// again, and clears the report once the host's agents hold nothing that is not
    /// theirs.
    pub(super) async fn watch_returns(self) {
        loop {
            tokio::time::sleep(RETURN_POLL).await;
            let now = wall_clock_now().0;
            let hosts = self
                .settings
                .hosts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for (host, seen) in &hosts {
                let just_unfenced = {
                    let mut st = self.core.lock();
                    if !seen.state.fenced() {
                        st.unfenced.remove(host);
                    }
                    st.unfenced.contains(host)
                };
                if seen.state.fenced() && !just_unfenced {
                    self.start_listing(HostId::new(host));
                }
            }
            let back = hosts.into_iter().filter(|(_, h)| {
                h.state == HostState::Recovered
                    && h.last_heartbeat_ms
                        .is_some_and(|t| now.saturating_sub(t) < BACK_WITHIN_MS)
            });
            for (host, seen) in back {
                let moved = seen.evacuated_routers;
                if moved.is_empty() {
                    continue;
                }
                let (reported, cleaned) = {
                    let st = self.core.lock();
                    (
                        st.reported.get(&host) == Some(&moved),
                        st.cleaned.contains(&host),
                    )
                };
                if !reported {
                    self.inventory(&host, &moved);
                    let mut st = self.core.lock();
                    st.reported.insert(host.clone(), moved.clone());
                    st.cleaned.remove(&host);
                    drop(st);
                    tracing::warn!(
                        host,
                        routers = moved.len(),
                        "routers moved off a returned host reported for cleanup"
                    );
                    self.core.event(RouterEvent::StaleReported {
                        host: host.clone(),
                        routers: moved.into_iter().collect(),
                    });
                } else if !cleaned {
                    match self.holds_only_its_own(&host).await {
                        Ok(None) => {
                            self.inventory(&host, &BTreeSet::new());
                            self.core.lock().cleaned.insert(host.clone());
                            tracing::info!(host, "returned host's L3 agents clean");
                            self.core.event(RouterEvent::CleanedUp { host });
                        }
                        Ok(Some(why)) => tracing::debug!(host, why, "not clean yet"),
                        Err(e) => tracing::warn!(host, error = %e, "reading the L3 agents"),
                    }
                }
            }
        }
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
        self.core.finish(
            &key,
            Input::HostActionResult {
                host,
                key: key.clone(),
                outcome,
            },
        );
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
