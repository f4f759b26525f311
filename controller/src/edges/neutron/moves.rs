//! Moving routers: a batch planned onto live L3 agents, bound there and verified.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{RouterEvent, Worker};
use crate::engine::{HostId, HostState, Input, IntentKey, Resource, RestoreOutcome};
use crate::openstack::network::Agent;

/// One router's new agent: the least loaded of `candidates` (agent id → routers bound),
/// ties broken by agent id so that a plan is reproducible. The count is increased.
pub fn choose_agent(loads: &mut BTreeMap<String, usize>) -> Option<String> {
    let (agent, _) = loads.iter().min_by_key(|(id, n)| (**n, (*id).clone()))?;
    let agent = agent.clone();
    *loads.get_mut(&agent).expect("present") += 1;
    Some(agent)
}

impl Worker {
    /// Live, admin-up L3 agents on hosts the engine has Up (or does not know: a
    /// network node without a watchdog), not on `failed`.
    fn targets(&self, agents: &[Agent], failed: &BTreeSet<String>) -> Vec<Agent> {
        let hosts = self.hosts.borrow().clone();
        agents
            .iter()
            .filter(|a| a.alive && a.admin_state_up && !failed.contains(&a.host))
            .filter(|a| {
                hosts
                    .get(&HostId::new(&a.host))
                    .is_none_or(|h| h.state == HostState::Up)
            })
            .cloned()
            .collect()
    }

    pub(super) async fn move_batch(&self, moves: Vec<(String, HostId, IntentKey)>) {
        let failed: BTreeSet<String> = moves.iter().map(|(_, f, _)| f.to_string()).collect();
        // Every router's bindings at once: one listing per L3 agent, not one read per
        // router (200 routers cost 12 s of reads that way before the first move).
        let (targets, mut loads, mut bindings) = match self.read_bindings(&failed).await {
            Ok(t) => t,
            Err(reason) => {
                for (router, _, key) in moves {
                    self.finish_router(&router, &key, Err(reason.clone()));
                }
                return;
            }
        };
        // One already on a live agent elsewhere (moved by a controller before a
        // restart, or scheduled there by Neutron) stays there: never moved twice.
        let mut todo = Vec::new();
        for (router, from, key) in moves {
            let b = bindings.remove(&router).unwrap_or_default();
            let live: Vec<&Agent> = b.iter().filter(|a| targets.contains_key(&a.id)).collect();
            if b.len() == 1 && live.len() == 1 {
                let host = live[0].host.clone();
                self.core.event(RouterEvent::AlreadyMoved {
                    router: router.clone(),
                    host: host.clone(),
                });
                self.finish_router(&router, &key, Ok(host));
            } else {
                todo.push((router, from, key, b));
            }
        }
        // Least routers first, in a stable order.
        todo.sort_by(|a, b| a.0.cmp(&b.0));
        let mut loads_read: BTreeMap<String, usize> = BTreeMap::new();
        for (agent, n) in &loads {
            *loads_read.entry(targets[agent].clone()).or_default() += n;
        }
        let mut plan = BTreeMap::new();
        let mut jobs = Vec::new();
        for (router, from, key, bindings) in todo {
            let Some(agent) = choose_agent(&mut loads) else {
                self.finish_router(
                    &router,
                    &key,
                    Err("no live L3 agent on a healthy host to move it to".into()),
                );
                continue;
            };
            let to_host = targets[&agent].clone();
            plan.insert(router.clone(), to_host.clone());
            *self.core.lock().binding.entry(agent.clone()).or_default() += 1;
            jobs.push((router, from, key, bindings, agent, to_host));
        }
        if !plan.is_empty() {
            self.core.event(RouterEvent::Planned {
                loads: loads_read,
                plan,
            });
        }
        for (router, from, key, bindings, agent, to_host) in jobs {
            let w = self.clone();
            tokio::spawn(async move {
                let _slot = w.moves.acquire().await;
                let r = w
                    .move_one(&router, from.as_str(), &bindings, &agent, &to_host)
                    .await;
                w.finish_router(&router, &key, r);
            });
        }
    }

    /// The target agents (id → host), their loads (routers bound now, plus moves
    /// planned there and not bound yet) and every router's bindings (router → agents),
    /// from one listing of the L3 agents and one of each agent's routers.
    #[allow(clippy::type_complexity)]
    async fn read_bindings(
        &self,
        failed: &BTreeSet<String>,
    ) -> Result<
        (
            BTreeMap<String, String>,
            BTreeMap<String, usize>,
            HashMap<String, Vec<Agent>>,
        ),
        String,
    > {
        let agents = self
            .network
            .l3_agents(None)
            .await
            .map_err(|e| e.to_string())?;
        let targets = self.targets(&agents, failed);
        let mut reads = tokio::task::JoinSet::new();
        for a in agents {
            let (net, moves) = (self.network.clone(), self.moves.clone());
            reads.spawn(async move {
                let _slot = moves.acquire().await;
                let routers = net.agent_routers(&a.id).await;
                (a, routers)
            });
        }
        let mut loads = BTreeMap::new();
        let mut bindings: HashMap<String, Vec<Agent>> = HashMap::new();
        while let Some(r) = reads.join_next().await {
            let Ok((agent, routers)) = r else { continue };
            let routers = routers.map_err(|e| format!("routers of L3 agent {}: {e}", agent.id))?;
            if targets.iter().any(|t| t.id == agent.id) {
                let pending = self
                    .core
                    .lock()
                    .binding
                    .get(&agent.id)
                    .copied()
                    .unwrap_or(0);
                loads.insert(agent.id.clone(), routers.len() + pending);
            }
            for r in routers {
                bindings.entry(r.id).or_default().push(agent.clone());
            }
        }
        Ok((
            targets.into_iter().map(|a| (a.id, a.host)).collect(),
            loads,
            bindings,
        ))
    }

    async fn move_one(
        &self,
        router: &str,
        from: &str,
        bindings: &[Agent],
        agent: &str,
        to_host: &str,
    ) -> Result<String, String> {
        for b in bindings.iter().filter(|b| b.id != agent) {
            if let Err(e) = self.network.remove_router(&b.id, router).await {
                self.bound(agent);
                return Err(format!("unbinding from {} ({}): {e}", b.id, b.host));
            }
        }
        if !bindings.iter().any(|b| b.id == agent) {
            match self.network.add_router(agent, router).await {
                Ok(()) => self.core.event(RouterEvent::Moved {
                    router: router.into(),
                    from: from.into(),
                    to: to_host.into(),
                }),
                // A POST whose answer was lost (or a 409: bound meanwhile) may have
                // bound it: the bindings decide, below.
                Err(e) => {
                    tracing::warn!(router, agent, error = %e, "binding failed; reading bindings")
                }
            }
        }
        self.bound(agent);
        // Verify: bound to exactly the chosen agent. Between the DELETE and the POST a
        // live agent's own sync may have had Neutron schedule the router (with
        // router_auto_schedule, Neutron's default, get_router_ids schedules unbound
        // routers): bound to exactly one live agent elsewhere is as good, and is kept.
        let t0 = tokio::time::Instant::now();
        loop {
            match self.network.router_agents(router).await {
                Ok(b) if b.len() == 1 && b[0].id == agent => {
                    self.core.event(RouterEvent::Verified {
                        router: router.into(),
                        host: to_host.into(),
                        by_neutron: false,
                    });
                    return Ok(to_host.to_string());
                }
                Ok(b) if b.len() == 1 && b[0].alive && b[0].admin_state_up && b[0].host != from => {
                    tracing::info!(router, host = %b[0].host, "scheduled by Neutron meanwhile; kept");
                    self.core.event(RouterEvent::Verified {
                        router: router.into(),
                        host: b[0].host.clone(),
                        by_neutron: true,
                    });
                    return Ok(b[0].host.clone());
                }
                Ok(b) if b.iter().all(|a| a.id != agent) => {
                    return Err(format!(
                        "not bound to the chosen agent on {to_host} (bound to: {:?})",
                        b.iter().map(|a| &a.host).collect::<Vec<_>>()
                    ))
                }
                Ok(_) | Err(_) if t0.elapsed() < self.settings.verify_timeout => {}
                Ok(b) => {
                    return Err(format!(
                        "still bound to {} agents after {:?}",
                        b.len(),
                        self.settings.verify_timeout
                    ))
                }
                Err(e) => return Err(e.to_string()),
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
    }

    /// A planned binding is made (or given up): Neutron counts it from now on.
    fn bound(&self, agent: &str) {
        let mut st = self.core.lock();
        if let Some(n) = st.binding.get_mut(agent) {
            *n = n.saturating_sub(1);
        }
    }

    fn finish_router(&self, router: &str, key: &IntentKey, r: Result<String, String>) {
        let outcome = match r {
            Ok(host) => RestoreOutcome::Ok {
                host: HostId::new(host),
            },
            Err(reason) => {
                tracing::warn!(router, %key, reason, "router move failed");
                self.core.event(RouterEvent::Failed {
                    router: router.into(),
                    reason: reason.clone(),
                });
                RestoreOutcome::Failed { reason }
            }
        };
        self.core.finish(
            key,
            Input::RestoreResult {
                resource: Resource::router(router),
                key: key.clone(),
                outcome,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_go_to_the_least_loaded_agent_and_spread_evenly() {
        let mut loads: BTreeMap<String, usize> = [
            ("a".to_string(), 5),
            ("b".to_string(), 0),
            ("c".to_string(), 2),
        ]
        .into();
        let picks: Vec<String> = (0..9).map(|_| choose_agent(&mut loads).unwrap()).collect();
        // b catches up with c, then with a, then they take turns.
        assert_eq!(&picks[..2], ["b", "b"]);
        assert_eq!(loads.values().copied().collect::<Vec<_>>(), vec![6, 5, 5]);
        assert!(loads.values().max().unwrap() - loads.values().min().unwrap() <= 1);
    }

    #[test]
    fn no_agent_no_target() {
        assert_eq!(choose_agent(&mut BTreeMap::new()), None);
    }
}
