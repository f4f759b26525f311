//! Evacuation: each batch planned at once, then started per target within its slots.
//!
//! The plan is `crate::arrange`'s, on Placement's capacity (read during the force-down
//! when it is fresh); a target runs at most `max_concurrent_per_target` rebuilds.
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use super::{RestoreEvent, Worker};
use crate::arrange::{self, Amount, ClassCapacity};
use crate::engine::{HostState, IntentKey, RestoreOutcome};
use crate::openstack::compute::{self, Server};
use crate::openstack::OsError;

/// How long the server list read at force-down stands for the host's first batch.
const LISTING_FRESH: Duration = Duration::from_secs(10);

/// How long capacity read during a force-down stands for the plan that follows.
const CAPACITY_FRESH: Duration = Duration::from_secs(5);

/// What the targets are made of.
pub(super) struct Capacity {
    services: Vec<compute::ComputeService>,
    hypervisors: Vec<compute::Hypervisor>,
    /// Free room per resource provider (hypervisor id).
    room: HashMap<String, Amount>,
}

impl Worker {
    pub(super) async fn evacuate_batch(&self, batch: Vec<(String, String, IntentKey)>) {
        // Read each failed host's servers once; servers not listed there are read alone.
        let mut by_host: BTreeMap<String, HashMap<String, Server>> = BTreeMap::new();
        for (_, from, _) in &batch {
            if by_host.contains_key(from) {
                continue;
            }
            let fresh = self
                .core
                .lock()
                .listed
                .remove(from)
                .filter(|(at, _)| at.elapsed() < LISTING_FRESH);
            if let Some((_, servers)) = fresh {
                by_host.insert(from.clone(), servers);
                continue;
            }
            let listed = match self.compute.servers_on_host(from).await {
                Ok(v) => v.into_iter().map(|s| (s.id.clone(), s)).collect(),
                Err(e) => {
                    tracing::warn!(host = from, error = %e, "listing servers failed");
                    HashMap::new()
                }
            };
            by_host.insert(from.clone(), listed);
        }
        let mut to_plan: Vec<(Server, String, IntentKey)> = Vec::new();
        for (id, from, key) in batch {
            let server = match by_host.get(&from).and_then(|m| m.get(&id)) {
                Some(s) => s.clone(),
                None => match self.compute.server(&id).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        self.finish_server(
                            &id,
                            &key,
                            RestoreOutcome::Failed {
                                reason: "the server no longer exists in Nova".into(),
                            },
                        );
                        continue;
                    }
                    Err(e) => {
                        self.finish_server(
                            &id,
                            &key,
                            RestoreOutcome::Failed {
                                reason: format!("reading the server: {e}"),
                            },
                        );
                        continue;
                    }
                },
            };
            let moved = server.host.as_deref().is_some_and(|h| h != from);
            if moved || server.task_state.is_some() {
                // Already on its way (an earlier controller's call, or Nova's own):
                // follow it, never evacuate twice.
                let reason = if moved {
                    "already left the failed host"
                } else {
                    "already being rebuilt"
                };
                self.core.event(RestoreEvent::Tracked {
                    server: id.clone(),
                    reason,
                });
                self.track(&id, &from, server.host.clone().filter(|_| moved), key, true);
                continue;
            }
            if server.status == "SHUTOFF" {
                self.core.lock().was_shutoff.insert(id.clone());
            }
            to_plan.push((server, from, key));
        }
        if to_plan.is_empty() {
            return;
        }
        let targets = match self.targets(&to_plan).await {
            Ok(t) => t,
            Err(e) => {
                for (s, _, key) in to_plan {
                    self.finish_server(
                        &s.id,
                        &key,
                        RestoreOutcome::Failed {
                            reason: format!("reading capacity: {e}"),
                        },
                    );
                }
                return;
            }
        };
        let failed_on = self.core.lock().failed_on.clone();
        let vms: Vec<arrange::Vm> = to_plan
            .iter()
            .map(|(s, from, _)| arrange::Vm {
                id: s.id.clone(),
                from: from.clone(),
                need: s.flavor.as_ref().map(|f| Amount {
                    vcpus: f.vcpus,
                    memory_mb: f.ram,
                    disk_gb: f.disk_gb(),
                }),
                priority: s
                    .metadata
                    .get(&self.settings.priority_key)
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(0),
                avoid: failed_on.get(&s.id).cloned().unwrap_or_default(),
            })
            .collect();
        let plan = arrange::plan(
            &vms,
            &targets,
            arrange::Policy {
                reserved_only: self.settings.reserved_only,
            },
        );
        tracing::info!(
            placed = plan.placements.len(),
            unplaced = plan.unplaced.len(),
            "evacuation plan"
        );
        self.core.event(RestoreEvent::Planned {
            placed: plan.placements.len(),
            unplaced: plan.unplaced.len(),
        });
        let keys: HashMap<String, (String, IntentKey)> = to_plan
            .into_iter()
            .map(|(s, from, key)| (s.id, (from, key)))
            .collect();
        for u in plan.unplaced {
            if let Some((_, key)) = keys.get(&u.vm) {
                self.finish_server(
                    &u.vm,
                    key,
                    RestoreOutcome::Failed {
                        reason: format!("no target: {}", u.reason),
                    },
                );
            }
        }
        {
            let mut st = self.core.lock();
            for p in plan.placements {
                if let Some((from, key)) = keys.get(&p.vm) {
                    st.queued.entry(p.target).or_default().push_back((
                        p.vm,
                        from.clone(),
                        key.clone(),
                    ));
                }
            }
        }
        self.pump();
    }

    /// Compute services, hypervisors and every provider's free room, read at once
    /// (independent reads: this is on the path to the first evacuation).
    pub(super) async fn read_capacity(&self) -> Result<Capacity, OsError> {
        let (services, hypervisors) = tokio::join!(
            self.compute.compute_services(None),
            self.compute.hypervisors()
        );
        let (services, hypervisors) = (services?, hypervisors?);
        let mut capacity = tokio::task::JoinSet::new();
        for h in &hypervisors {
            let c = self.compute.clone();
            let id = h.id.clone();
            capacity.spawn(async move {
                let r = c.provider_capacity(&id).await;
                (id, r)
            });
        }
        let mut room: HashMap<String, Amount> = HashMap::new();
        while let Some(joined) = capacity.join_next().await {
            let Ok((id, r)) = joined else { continue };
            let (inv, used) = r?;
            let classes: BTreeMap<String, ClassCapacity> = inv
                .into_iter()
                .map(|(k, i)| {
                    let u = used.get(&k).copied().unwrap_or(0);
                    (
                        k,
                        ClassCapacity {
                            total: i.total,
                            reserved: i.reserved,
                            allocation_ratio: i.allocation_ratio,
                            used: u,
                        },
                    )
                })
                .collect();
            room.insert(id, arrange::free_room(&classes));
        }
        Ok(Capacity {
            services,
            hypervisors,
            room,
        })
    }

    /// Every compute host as a target, with its free room and why it is excluded.
    async fn targets(
        &self,
        to_plan: &[(Server, String, IntentKey)],
    ) -> Result<Vec<arrange::Target>, OsError> {
        let failed: BTreeSet<&str> = to_plan.iter().map(|(_, f, _)| f.as_str()).collect();
        // Read while the host was being forced down, if just now; else read now.
        let prefetched = self
            .core
            .lock()
            .capacity
            .take()
            .filter(|(at, _)| at.elapsed() < CAPACITY_FRESH);
        let Capacity {
            services,
            hypervisors,
            room,
        } = match prefetched {
            Some((_, c)) => c,
            None => self.read_capacity().await?,
        };
        let building = self.core.lock().building.clone();
        let maintenance: BTreeSet<String> = self
            .hosts
            .borrow()
            .values()
            .filter(|h| h.state == HostState::Maintenance)
            .map(|h| h.host.to_string())
            .collect();
        // The engine's word on hosts that must not take VMs now (lost disk leases).
        let not_a_target: BTreeMap<String, String> = self
            .hosts
            .borrow()
            .values()
            .filter_map(|h| Some((h.host.to_string(), h.not_a_target.clone()?)))
            .collect();
        let mut out = Vec::new();
        for svc in services {
            if failed.contains(svc.host.as_str()) {
                continue;
            }
            let excluded = if self.settings.exclude_hosts.contains(&svc.host) {
                Some("is excluded by the configuration".to_string())
            } else if maintenance.contains(&svc.host) {
                Some("is in maintenance".into())
            } else if let Some(why) = not_a_target.get(&svc.host) {
                Some(format!("is no target: {why}"))
            } else if svc.forced_down {
                Some("is forced down".into())
            } else if svc.status != "enabled" {
                Some("is disabled".into())
            } else if svc.state != "up" {
                Some("is down".into())
            } else {
                None
            };
            // Free room: the sum over the host's nodes (one with most drivers).
            let mut free = Amount::default();
            if excluded.is_none() {
                for h in hypervisors.iter().filter(|h| h.service.host == svc.host) {
                    if let Some(f) = room.get(&h.id) {
                        free.vcpus += f.vcpus;
                        free.memory_mb += f.memory_mb;
                        free.disk_gb += f.disk_gb;
                    }
                }
            }
            out.push(arrange::Target {
                building: building.get(&svc.host).copied().unwrap_or(0),
                reserved: self.settings.reserved_hosts.contains(&svc.host),
                host: svc.host,
                free,
                excluded,
            });
        }
        Ok(out)
    }

    /// Starts queued evacuations while their target has a free slot.
    fn pump(&self) {
        let max = self.settings.max_concurrent_per_target.max(1);
        let mut start = Vec::new();
        {
            let mut st = self.core.lock();
            let targets: Vec<String> = st.queued.keys().cloned().collect();
            for t in targets {
                loop {
                    let running = st.building.get(&t).copied().unwrap_or(0);
                    if running >= max {
                        break;
                    }
                    let Some(item) = st.queued.get_mut(&t).and_then(VecDeque::pop_front) else {
                        break;
                    };
                    *st.building.entry(t.clone()).or_default() += 1;
                    start.push((t.clone(), item));
                }
            }
            st.queued.retain(|_, q| !q.is_empty());
        }
        for (target, (server, from, key)) in start {
            let w = self.clone();
            tokio::spawn(async move { w.evacuate_one(server, from, target, key).await });
        }
    }

    pub(super) fn release(&self, target: &str) {
        {
            let mut st = self.core.lock();
            if let Some(n) = st.building.get_mut(target) {
                *n = n.saturating_sub(1);
            }
        }
        self.pump();
    }

    async fn evacuate_one(&self, server: String, from: String, target: String, key: IntentKey) {
        self.core.event(RestoreEvent::EvacuateCalled {
            server: server.clone(),
            target: target.clone(),
        });
        tracing::info!(server, from, target, %key, "evacuating");
        let call = if self.settings.bypass_scheduler {
            self.compute.evacuate_forced(&server, &target).await
        } else {
            self.compute.evacuate(&server, Some(&target)).await
        };
        match call {
            Ok(()) => self.track(&server, &from, Some(target), key, true),
            Err(e) => {
                // A 409 may mean an evacuation already runs (resent after a timeout):
                // read the server before calling it a failure.
                if e.status() == Some(409) {
                    if let Ok(Some(s)) = self.compute.server(&server).await {
                        if s.task_state.is_some() || s.host.as_deref() != Some(&from) {
                            self.track(&server, &from, Some(target), key, true);
                            return;
                        }
                    }
                }
                self.core
                    .lock()
                    .failed_on
                    .entry(server.clone())
                    .or_default()
                    .insert(target.clone());
                self.release(&target);
                self.finish_server(
                    &server,
                    &key,
                    RestoreOutcome::Failed {
                        reason: format!("evacuate to {target}: {e}"),
                    },
                );
            }
        }
    }
}
