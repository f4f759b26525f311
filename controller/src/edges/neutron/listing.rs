//! Force-down: a fenced host's L3 agents disabled and their routers listed, retried.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::returns::Watched;
use super::{RouterEvent, Worker};
use crate::engine::{HostEvent, HostId, Input, Source};

/// A failed listing of a fenced host's routers is tried again after this long,
/// doubling up to [`LIST_RETRY_MAX`].
const LIST_RETRY_FIRST: Duration = Duration::from_secs(1);
const LIST_RETRY_MAX: Duration = Duration::from_secs(30);

impl Worker {
    /// Lists every host the engine has fenced, unless it is listed or being listed
    /// already, or was just unfenced (the engine's hosts, published a moment later,
    /// may still show it fenced: it is left alone until they show it trusted, so that
    /// the agents an unfence enabled are never disabled again).
    pub(super) fn list_fenced(&self, hosts: &BTreeMap<HostId, Watched>) {
        for (host, seen) in hosts {
            let just_unfenced = {
                let mut st = self.core.lock();
                if !seen.state.fenced() {
                    st.unfenced.remove(host.as_str());
                }
                st.unfenced.contains(host.as_str())
            };
            if seen.state.fenced() && !just_unfenced {
                self.start_listing(host.clone());
            }
        }
    }

    /// Lists a fenced host's routers unless that is under way or done since its fence.
    pub(super) fn start_listing(&self, host: HostId) {
        {
            let mut st = self.core.lock();
            if st.listed.contains(host.as_str()) || !st.listing.insert(host.to_string()) {
                return;
            }
        }
        let w = self.clone();
        tokio::spawn(async move { w.list_until_done(host).await });
    }

    /// Still wanted: not unfenced meanwhile (an unfence stops the listing).
    fn still_listing(&self, host: &str) -> bool {
        self.core.lock().listing.contains(host)
    }

    async fn list_until_done(&self, host: HostId) {
        let mut pause = LIST_RETRY_FIRST;
        while self.still_listing(host.as_str()) {
            match self.disable_and_list(host.as_str()).await {
                Ok(routers) => {
                    let mut st = self.core.lock();
                    if !st.listing.remove(host.as_str()) {
                        return;
                    }
                    st.listed.insert(host.to_string());
                    // A host already told about its stale routers keeps them in its
                    // inventory (this one replaces the last), until it is clean.
                    let mut all: BTreeSet<String> = routers.into_iter().collect();
                    if !st.cleaned.contains(host.as_str()) {
                        if let Some(stale) = st.reported.get(host.as_str()) {
                            all.extend(stale.iter().cloned());
                        }
                    }
                    drop(st);
                    self.inventory(host.as_str(), &all);
                    return;
                }
                Err(reason) => {
                    tracing::warn!(
                        %host,
                        reason,
                        retry_in = ?pause,
                        "listing the fenced host's routers failed; VMs go on, routers wait"
                    );
                    self.core.event(RouterEvent::ListFailed {
                        host: host.to_string(),
                        reason: reason.clone(),
                    });
                    self.core.report(Input::HostEvent {
                        host: host.clone(),
                        event: HostEvent::InventoryFailed {
                            source: Source::Neutron,
                            reason: format!("neutron: {reason}"),
                        },
                    });
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LIST_RETRY_MAX);
                }
            }
        }
    }

    /// Disables the host's L3 agents and lists the routers to move.
    async fn disable_and_list(&self, host: &str) -> Result<Vec<String>, String> {
        let agents = self.host_agents(host).await?;
        let mut routers = BTreeSet::new();
        let mut skipped = BTreeSet::new();
        for a in &agents {
            if a.admin_state_up {
                self.network
                    .set_agent_admin_state(&a.id, false)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            for r in self
                .network
                .agent_routers(&a.id)
                .await
                .map_err(|e| e.to_string())?
            {
                if self.settings.skip_ha && r.failover_by_neutron() {
                    skipped.insert(r.id);
                } else {
                    routers.insert(r.id);
                }
            }
        }
        let routers: Vec<String> = routers.into_iter().collect();
        tracing::info!(
            host,
            agents = agents.len(),
            routers = routers.len(),
            left_to_neutron = skipped.len(),
            "L3 agents disabled; routers to move"
        );
        self.core.event(RouterEvent::Listed {
            host: host.into(),
            routers: routers.clone(),
            skipped_ha: skipped.into_iter().collect(),
        });
        Ok(routers)
    }
}
