//! The Nova restore backend (`[controller] backend = "nova"`, `[nova]` section).
//!
//! ```text
//! engine ─ForceDown──► force the compute service down (≥ 2.53), list its servers
//!        ◄─Inventory (Nova) + HostActionResult
//! engine ─Evacuate×N─► batch (everything handed over within worker::BATCH_WINDOW) ─► plan
//!                      (crate::arrange: Placement capacity, priorities, spread)
//!                      ─► per target ≤ max_concurrent_per_target rebuilds at once,
//!                         POST evacuate {host: target} at ≤ 2.94 (stays ACTIVE)
//!                      ─► tracker polls Nova until ACTIVE on the target
//!        ◄─RestoreResult Ok{target} | Failed{reason}  (the engine retries a failure;
//!                      the retry avoids the targets that failed that server)
//! engine ─RestartInPlace─► start (SHUTOFF) or hard reboot, tracked to ACTIVE
//! engine ─Unfence─────► forced_down=false, retried while Nova answers 400 (it refuses
//!                      until the returned compute has cleaned up its evacuations)
//! ```
//!
//! Idempotent per intent key, and safe across a controller restart: a key already
//! answered is answered again with the first outcome; a key in flight is ignored; and
//! before evacuating, the server's own state is read — a server that already left the
//! failed host, or is being rebuilt (`task_state` set), is tracked, never evacuated a
//! second time (Nova itself refuses a second evacuate while one runs: 409).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::worker::{self, Answers, Core, JobOf, Jobs, Work};
use super::ResultSender;
use crate::arrange::{self, Amount, ClassCapacity};
use crate::clock::wall_clock_now;
use crate::edges::Restorer;
use crate::engine::{
    HostEvent, HostId, HostState, Input, IntentKey, Resource, RestoreOutcome, Source,
};
use crate::openstack::compute::{self, Compute, Server};
use crate::openstack::OsError;

/// How long the server list read at force-down stands for the host's first batch.
const LISTING_FRESH: Duration = Duration::from_secs(10);

/// How long capacity read during a force-down stands for the plan that follows.
const CAPACITY_FRESH: Duration = Duration::from_secs(5);

/// The restorer's settings (from the `[nova]` section).
#[derive(Debug, Clone)]
pub struct NovaSettings {
    /// At most this many rebuilds at once per target (Nova's `max_concurrent_builds`).
    pub max_concurrent_per_target: u32,
    /// Hosts kept free for failover: taken first.
    pub reserved_hosts: BTreeSet<String>,
    /// Only reserved hosts are targets.
    pub reserved_only: bool,
    /// Never targets (besides disabled, down and forced-down services).
    pub exclude_hosts: BTreeSet<String>,
    /// Server metadata key holding an integer priority (higher first).
    pub priority_key: String,
    /// How often server states are read while something is being restored.
    pub poll_interval: Duration,
    /// A server not ACTIVE this long after its evacuation or restart started: failed.
    pub restore_timeout: Duration,
    /// How long an unforce is retried while Nova refuses it.
    pub unforce_timeout: Duration,
    /// The engine's view of the hosts, kept up to date by the runtime
    /// ([`watch_hosts`]): hosts in maintenance are never targets; the automatic
    /// unforce waits for a host to heartbeat again.
    pub hosts: HostView,
    /// Evacuate with `force` (at 2.67): Nova's scheduler does not check the target
    /// again. Faster (no scheduler pass per server), but Nova's filters (server-group
    /// anti-affinity, aggregates, AZs, PCI/NUMA) are not applied: only for clouds whose
    /// placement rules the arrangement scheduler's capacity check covers.
    pub bypass_scheduler: bool,
    /// Unforce a recovered host without an operator, once it heartbeats again and its
    /// nova-compute reports again (`[nova] unforce = "automatic"`).
    pub auto_unforce: bool,
}

/// What the restorer knows of a host from the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSeen {
    pub state: HostState,
    /// Last heartbeat, unix ms.
    pub last_heartbeat_ms: Option<u64>,
    /// Routers moved off the host by its incidents since its fence (from the engine,
    /// which rebuilds them from the intent log): the stale-router report.
    pub evacuated_routers: BTreeSet<String>,
}

/// The engine's hosts, shared between the runtime and the restorer.
pub type HostView = Arc<Mutex<BTreeMap<String, HostSeen>>>;

/// Keeps `view` equal to the hosts of the engine's snapshots.
pub async fn watch_hosts(
    mut snapshots: tokio::sync::watch::Receiver<Arc<crate::api::view::Snapshot>>,
    view: HostView,
) {
    loop {
        let now: BTreeMap<String, HostSeen> = snapshots
            .borrow_and_update()
            .hosts
            .iter()
            .map(|h| {
                (
                    h.host.clone(),
                    HostSeen {
                        state: h.state,
                        last_heartbeat_ms: h.last_heartbeat_ms,
                        evacuated_routers: h
                            .evacuated
                            .iter()
                            .filter_map(|r| r.strip_prefix("router:"))
                            .map(str::to_string)
                            .collect(),
                    },
                )
            })
            .collect();
        *view.lock().unwrap_or_else(|e| e.into_inner()) = now;
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

impl Default for NovaSettings {
    fn default() -> Self {
        NovaSettings {
            max_concurrent_per_target: 10,
            reserved_hosts: BTreeSet::new(),
            reserved_only: false,
            exclude_hosts: BTreeSet::new(),
            priority_key: "defib:priority".into(),
            poll_interval: Duration::from_millis(500),
            restore_timeout: Duration::from_secs(600),
            unforce_timeout: Duration::from_secs(900),
            hosts: HostView::default(),
            auto_unforce: false,
            bypass_scheduler: false,
        }
    }
}

/// What the restorer did, for tests and benchmarks (optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreEvent {
    ForcedDown {
        host: String,
    },
    Planned {
        placed: usize,
        unplaced: usize,
    },
    EvacuateCalled {
        server: String,
        target: String,
    },
    Tracked {
        server: String,
        reason: &'static str,
    },
    Restored {
        server: String,
        host: String,
    },
    Failed {
        server: String,
        reason: String,
    },
}

/// An evacuation, batched with those handed over together.
struct Evacuation {
    server: String,
    from: HostId,
}

/// A job run on its own.
enum Single {
    ForceDown { host: HostId },
    Restart { server: String, host: HostId },
    Unforce { host: HostId },
}

/// The [`Restorer`] handed to the engine task; the work runs on tokio tasks.
pub struct NovaRestorer {
    jobs: Jobs<Worker>,
}

impl NovaRestorer {
    /// Starts the worker (needs a tokio runtime).
    pub fn start(
        compute: Compute,
        settings: NovaSettings,
        results: ResultSender,
        events: Option<mpsc::UnboundedSender<RestoreEvent>>,
    ) -> Self {
        let worker = Worker {
            compute,
            settings,
            core: Core::new(results, events),
        };
        let tracker = worker.clone();
        tokio::spawn(async move { tracker.track_forever().await });
        if worker.settings.auto_unforce {
            let w = worker.clone();
            tokio::spawn(async move { w.auto_unforce().await });
        }
        NovaRestorer {
            jobs: worker::start(worker, "the Nova restorer stopped"),
        }
    }

    /// Hands the worker a job about a host.
    fn send_host_job(&self, host: &HostId, key: &IntentKey, job: Single) {
        self.jobs.send_host(host, key, Job::Alone(key.clone(), job));
    }

    /// Hands the worker a job about a VM (its server id); a router is refused at once.
    fn send_vm_job(&self, resource: &Resource, key: &IntentKey, job: impl FnOnce(String) -> Job) {
        match server_of(resource) {
            Some(server) => self.jobs.send_resource(resource, key, job(server)),
            None => self.jobs.answer(Input::RestoreResult {
                resource: resource.clone(),
                key: key.clone(),
                outcome: RestoreOutcome::Failed {
                    reason: "Nova restores VMs, not routers".into(),
                },
            }),
        }
    }
}

/// A server id from a resource (VMs only: Nova does not move routers).
fn server_of(resource: &Resource) -> Option<String> {
    match resource {
        Resource::Vm(v) => Some(v.to_string()),
        Resource::Router(_) => None,
    }
}

type Job = JobOf<Worker>;

impl Restorer for NovaRestorer {
    fn force_down(&mut self, host: &HostId, key: &IntentKey) {
        self.send_host_job(host, key, Single::ForceDown { host: host.clone() });
    }

    fn restart_in_place(
        &mut self,
        resource: &Resource,
        host: &HostId,
        _attempt: u32,
        key: &IntentKey,
    ) {
        self.send_vm_job(resource, key, |server| {
            Job::Alone(
                key.clone(),
                Single::Restart {
                    server,
                    host: host.clone(),
                },
            )
        });
    }

    fn evacuate(&mut self, resource: &Resource, from: &HostId, key: &IntentKey) {
        self.send_vm_job(resource, key, |server| {
            Job::Batch(
                key.clone(),
                Evacuation {
                    server,
                    from: from.clone(),
                },
            )
        });
    }

    fn unfence(&mut self, host: &HostId, key: &IntentKey) {
        self.send_host_job(host, key, Single::Unforce { host: host.clone() });
    }
}

/// What is being waited for on one server.
#[derive(Debug, Clone)]
struct Tracked {
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

#[derive(Default)]
struct State {
    /// Targets each server failed on.
    failed_on: HashMap<String, BTreeSet<String>>,
    /// Rebuilds running per target (a slot is held until the server is ACTIVE).
    building: HashMap<String, u32>,
    /// Planned evacuations waiting for a slot, per target.
    queued: BTreeMap<String, VecDeque<(String, String, IntentKey)>>,
    tracked: BTreeMap<String, Tracked>,
    /// The server list read right after a force-down, per host, for the first batch of
    /// that host's evacuations (taken once; later batches read Nova again).
    listed: HashMap<String, (tokio::time::Instant, HashMap<String, Server>)>,
    /// Servers that were SHUTOFF on the failed host: they stay SHUTOFF where they go.
    was_shutoff: HashSet<String>,
    /// Capacity read while a host was being forced down, for the plan right after.
    capacity: Option<(tokio::time::Instant, Capacity)>,
}

/// What the targets are made of.
struct Capacity {
    services: Vec<compute::ComputeService>,
    hypervisors: Vec<compute::Hypervisor>,
    /// Free room per resource provider (hypervisor id).
    room: HashMap<String, Amount>,
}

#[derive(Clone)]
struct Worker {
    compute: Compute,
    settings: NovaSettings,
    core: Core<State, RestoreEvent>,
}

impl Work for Worker {
    type Batched = Evacuation;
    type Alone = Single;
    type Now = Infallible;

    fn answers(&self) -> &Answers {
        self.core.answers()
    }

    async fn batch(self, batch: Vec<(IntentKey, Evacuation)>) {
        let batch = batch
            .into_iter()
            .map(|(key, e)| (e.server, e.from.to_string(), key))
            .collect();
        self.evacuate_batch(batch).await
    }

    async fn alone(self, key: IntentKey, job: Single) {
        match job {
            Single::ForceDown { host } => self.force_down(host, key).await,
            Single::Restart { server, host } => self.restart(server, host, key).await,
            Single::Unforce { host } => self.unforce(host, key).await,
        }
    }

    fn now(&self, job: Infallible) {
        match job {}
    }
}

impl Worker {
    fn finish_server(&self, server: &str, key: &IntentKey, outcome: RestoreOutcome) {
        match &outcome {
            RestoreOutcome::Ok { host } => self.core.event(RestoreEvent::Restored {
                server: server.into(),
                host: host.to_string(),
            }),
            RestoreOutcome::Failed { reason } => {
                tracing::warn!(server, %key, reason, "restore failed");
                self.core.event(RestoreEvent::Failed {
                    server: server.into(),
                    reason: reason.clone(),
                })
            }
        }
        self.core.finish(
            key,
            Input::RestoreResult {
                resource: Resource::vm(server),
                key: key.clone(),
                outcome,
            },
        );
    }

    // ------------------------------------------------------------ force down

    async fn force_down(&self, host: HostId, key: IntentKey) {
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
                        source: Source::Nova,
                        at: wall_clock_now(),
                    },
                });
                RestoreOutcome::Ok { host: host.clone() }
            }
            Err(reason) => RestoreOutcome::Failed { reason },
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

    // ------------------------------------------------------------ evacuate

    async fn evacuate_batch(&self, batch: Vec<(String, String, IntentKey)>) {
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
    async fn read_capacity(&self) -> Result<Capacity, OsError> {
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
            .settings
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, h)| h.state == HostState::Maintenance)
            .map(|(n, _)| n.clone())
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

    fn release(&self, target: &str) {
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

    fn track(
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

    // ------------------------------------------------------------ tracking

    /// One incremental poll per interval: the servers Nova changed since the newest
    /// change seen (Nova's own clock, less a margin), so each poll returns only what
    /// moved and costs Nova little while it rebuilds. A tracked server not seen yet is
    /// read once on its own; one past its timeout too.
    async fn track_forever(&self) {
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

    async fn restart(&self, server: String, host: HostId, key: IntentKey) {
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

    // ------------------------------------------------------------ unforce

    /// The automatic unforce policy: a host the engine has `Recovered` (every VM
    /// accounted for) that heartbeats again, and whose forced-down nova-compute reports
    /// again (its `updated_at` moves), is unfenced as an operator would: the engine
    /// checks it as it checks `defibctl unfence`, then hands the unforce back here.
    async fn auto_unforce(&self) {
        const EVERY: Duration = Duration::from_secs(2);
        const AGAIN_AFTER: Duration = Duration::from_secs(30);
        let mut last_report: HashMap<String, Option<String>> = HashMap::new();
        let mut asked: HashMap<String, tokio::time::Instant> = HashMap::new();
        loop {
            tokio::time::sleep(EVERY).await;
            let now_ms = wall_clock_now().0;
            let candidates: Vec<String> = self
                .settings
                .hosts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(_, h)| {
                    h.state == HostState::Recovered
                        && h.last_heartbeat_ms
                            .is_some_and(|t| now_ms.saturating_sub(t) < 2_000)
                })
                .map(|(n, _)| n.clone())
                .collect();
            last_report.retain(|h, _| candidates.contains(h));
            for host in candidates {
                let svc = match self.compute.compute_services(Some(&host)).await {
                    Ok(v) => v.into_iter().find(|s| s.host == host),
                    Err(e) => {
                        tracing::debug!(host, error = %e, "auto-unforce: reading the service");
                        continue;
                    }
                };
                let Some(svc) = svc else { continue };
                let previous = last_report.insert(host.clone(), svc.updated_at.clone());
                let reporting = matches!(previous, Some(p) if p != svc.updated_at);
                let recently = asked.get(&host).is_some_and(|t| t.elapsed() < AGAIN_AFTER);
                if reporting && !recently {
                    tracing::info!(host, "host is back: unfencing (policy)");
                    asked.insert(host.clone(), tokio::time::Instant::now());
                    self.core.report(Input::HostEvent {
                        host: HostId::new(&host),
                        event: HostEvent::ComputeServiceReporting,
                    });
                }
            }
        }
    }

    async fn unforce(&self, host: HostId, key: IntentKey) {
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
        self.core.finish(
            &key,
            Input::HostActionResult {
                host,
                key: key.clone(),
                outcome,
            },
        );
    }
}

impl From<OsError> for String {
    fn from(e: OsError) -> String {
        e.to_string()
    }
}

/// Whether `version` is one the restorer can work with (≥ 2.53).
pub fn version_supported(version: &str) -> bool {
    compute::parse_version(version).is_some_and(|v| v >= compute::MIN_COMPUTE_VERSION)
}
