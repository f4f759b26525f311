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
//! host back (facts: Recovered, back) ─► its forced-down nova-compute reports again
//!        ◄─HostEvent ComputeServiceReporting  (a fact: the engine decides whether
//!                      that unfences the host, `engine::Config::auto_unfence`)
//! ```
//!
//! Idempotent per intent key, and safe across a controller restart: a key already
//! answered is answered again with the first outcome; a key in flight is ignored; and
//! before evacuating, the server's own state is read — a server that already left the
//! failed host, or is being rebuilt (`task_state` set), is tracked, never evacuated a
//! second time (Nova itself refuses a second evacuate while one runs: 409).
//!
//! Here: the settings, the jobs and the worker's state; `evacuate` plans and starts
//! the evacuations, `tracker` follows servers to ACTIVE (and restarts in place),
//! `host_jobs` forces a compute service down and back up and watches returned ones.
mod evacuate;
mod host_jobs;
mod tracker;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use tokio::sync::mpsc;

use super::worker::{self, Answers, Core, JobOf, Jobs, Work};
use super::{EdgeLinks, HostFacts};
use crate::clock::EngineClock;
use crate::edges::Restorer;
use crate::engine::{HostId, Input, IntentKey, Resource, RestoreOutcome};
use crate::openstack::compute::{self, Compute, Server};
use crate::openstack::OsError;

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
    /// Evacuate with `force` (at 2.67): Nova's scheduler does not check the target
    /// again. Faster (no scheduler pass per server), but Nova's filters (server-group
    /// anti-affinity, aggregates, AZs, PCI/NUMA) are not applied: only for clouds whose
    /// placement rules the arrangement scheduler's capacity check covers.
    pub bypass_scheduler: bool,
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
        links: EdgeLinks,
        events: Option<mpsc::UnboundedSender<RestoreEvent>>,
    ) -> Self {
        let worker = Worker {
            compute,
            settings,
            hosts: links.hosts,
            clock: links.clock,
            core: Core::new(links.results, events),
        };
        let tracker = worker.clone();
        tokio::spawn(async move { tracker.track_forever().await });
        let watcher = worker.clone();
        tokio::spawn(async move { watcher.watch_compute_services().await });
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

#[derive(Default)]
struct State {
    /// Targets each server failed on.
    failed_on: HashMap<String, BTreeSet<String>>,
    /// Rebuilds running per target (a slot is held until the server is ACTIVE).
    building: HashMap<String, u32>,
    /// Planned evacuations waiting for a slot, per target.
    queued: BTreeMap<String, VecDeque<(String, String, IntentKey)>>,
    tracked: BTreeMap<String, tracker::Tracked>,
    /// The server list read right after a force-down, per host, for the first batch of
    /// that host's evacuations (taken once; later batches read Nova again).
    listed: HashMap<String, (tokio::time::Instant, HashMap<String, Server>)>,
    /// Servers that were SHUTOFF on the failed host: they stay SHUTOFF where they go.
    was_shutoff: HashSet<String>,
    /// Capacity read while a host was being forced down, for the plan right after.
    capacity: Option<(tokio::time::Instant, evacuate::Capacity)>,
}

#[derive(Clone)]
struct Worker {
    compute: Compute,
    settings: NovaSettings,
    /// The engine's hosts: hosts in maintenance are never targets; the compute
    /// services of recovered hosts that are back are watched.
    hosts: HostFacts,
    /// The engine's clock: the listings this edge takes are dated on it.
    clock: EngineClock,
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
            RestoreOutcome::Failed { reason } | RestoreOutcome::Unknown { reason, .. } => {
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
