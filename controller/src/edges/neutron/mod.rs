//! The router restorer: a failed host's logical routers moved to live L3 agents.
//!
//! Configured with `[neutron] enabled = true`, beside the Nova backend. It moves the
//! routers at once, instead of Neutron's own failover (off by default, and waiting
//! `agent_down_time`, 75 s).
//!
//! ```text
//! engine ─ForceDown──► the host's L3 agents admin-down (Neutron schedules nothing there,
//!                      and a returning agent's sync gets no router), list their routers
//!                      (HA/DVR skipped: Neutron fails those over itself); retried with
//!                      backoff while Neutron fails (each failure: InventoryFailed, an
//!                      alarm), also for every fenced host after a restart
//!        ◄─Inventory (Neutron: routers), whenever it works (the force-down's result
//!                      is Nova's alone: a Neutron outage never holds up the VMs)
//! engine ─Evacuate(router)×N─► batch ─► read the bindings (each L3 agent's routers):
//!                      already on one live agent elsewhere → verified, not moved again;
//!                      else plan (least routers per live, admin-up agent on a host
//!                      the facts show Up) ─► DELETE from the dead agent, POST to the chosen one
//!                      ─► poll until the router is bound to exactly that agent
//!        ◄─RestoreResult Ok{agent's host} | Failed{reason}
//! host back (facts: Recovered, back) ─► Inventory (Neutron) of the routers moved off it
//!                      (facts: evacuated):
//!                      the engine marks them stale (alarm; unfence refused) until the
//!                      host's agent reports again holding no more routers than are
//!                      bound to it ─► empty Inventory (Neutron): cleared
//! engine ─Unfence────► refused while an alive agent of the host reports more routers
//!                      than are bound to it; else the agents admin-up again
//! ```
//!
//! Idempotent per intent key (a key answered is answered again with its first outcome,
//! a key in flight is ignored), and safe across a controller restart: a router is only
//! moved after its bindings were read, so one a previous controller already moved is
//! verified where it is, never moved twice.
//!
//! The hosts come from the engine as typed facts ([`HostFacts`]): their states, whether
//! a fenced host is back, what was moved off it. The background watcher wakes when
//! they change (and, while a returned host is not clean yet, to read its agents again).
//!
//! Here: the settings, the jobs and the worker's state; `listing` disables a fenced
//! host's agents and lists its routers, `moves` moves them, `returns` follows the
//! host's return and unfence, `joined` puts this half and the Nova half together.
mod joined;
mod listing;
mod moves;
mod returns;

pub use joined::RouterAwareRestorer;
pub use moves::choose_agent;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use super::worker::{self, Answers, Core, JobOf, Jobs, Work};
use super::{EdgeLinks, HostFacts};
use crate::clock::EngineClock;
use crate::edges::Restorer;
use crate::engine::{HostEvent, HostId, Input, IntentKey, Resource, RestoreOutcome, Source};
use crate::openstack::network::{Agent, Network};

/// The restorer's settings (the `[neutron]` section).
#[derive(Debug, Clone)]
pub struct NeutronSettings {
    /// Leave HA (VRRP) and DVR routers to Neutron.
    pub skip_ha: bool,
    /// Moves at once.
    pub max_concurrent: usize,
    /// Bindings are read this often while a move is verified.
    pub poll_interval: Duration,
    /// Not bound to exactly the new agent this long after the move: failed.
    pub verify_timeout: Duration,
}

impl Default for NeutronSettings {
    fn default() -> Self {
        NeutronSettings {
            skip_ha: true,
            max_concurrent: 10,
            poll_interval: Duration::from_millis(200),
            verify_timeout: Duration::from_secs(30),
        }
    }
}

/// What the restorer did, for tests and benchmarks (optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterEvent {
    /// At force-down: the host's agents were disabled and its routers listed.
    Listed {
        host: String,
        routers: Vec<String>,
        skipped_ha: Vec<String>,
    },
    /// Listing a fenced host's routers failed; tried again after a pause.
    ListFailed {
        host: String,
        reason: String,
    },
    /// A batch of moves was planned: each target host's load as read (routers bound
    /// there plus moves planned there and not bound yet), and each router's new host.
    Planned {
        loads: BTreeMap<String, usize>,
        plan: BTreeMap<String, String>,
    },
    /// A router was bound to a new agent (Neutron answered the binding).
    Moved {
        router: String,
        from: String,
        to: String,
    },
    /// A router handed over again was found already on a live agent: not moved.
    AlreadyMoved {
        router: String,
        host: String,
    },
    /// A router is bound to exactly its new agent, or (`by_neutron`) to one live agent
    /// elsewhere that Neutron's own auto-scheduling gave it between the unbinding and
    /// the binding (a live agent syncing meanwhile: kept there, not moved again).
    Verified {
        router: String,
        host: String,
        by_neutron: bool,
    },
    Failed {
        router: String,
        reason: String,
    },
    /// A returned host was told which routers left it (the engine marks them stale).
    StaleReported {
        host: String,
        routers: Vec<String>,
    },
    /// The returned host's agents hold no router that is not theirs: stale cleared.
    CleanedUp {
        host: String,
    },
    /// At unfence: the host's agents are admin-up again.
    AgentsEnabled {
        host: String,
    },
}

/// A router move, batched with those handed over together.
struct Move {
    router: String,
    from: HostId,
}

/// Re-enable a host's L3 agents (the unfence), run on its own.
struct Enable {
    host: HostId,
}

/// Disable the host's L3 agents and list their routers (until it works): no intent,
/// started from the worker's loop.
struct List {
    host: HostId,
}

type Job = JobOf<Worker>;

/// The router half of the restore edge (see [`RouterAwareRestorer`] for the whole).
pub struct NeutronRestorer {
    jobs: Jobs<Worker>,
}

#[derive(Default)]
struct State {
    /// Fenced hosts whose routers are being listed (retried until Neutron answers),
    /// and those listed since their fence. In memory only: a restarted restorer lists
    /// every fenced host once more (cheap: routers already moved are no longer bound
    /// there), which is what hands the engine routers a failed listing left behind.
    listing: BTreeSet<String>,
    listed: BTreeSet<String>,
    /// Hosts unfenced that the engine's view (published a moment later) may still show
    /// fenced: the background lister leaves them alone until the view shows them
    /// trusted, so that it never disables the agents an unfence just enabled.
    unfenced: BTreeSet<String>,
    /// Hosts told about their stale routers (with what they were told), and hosts
    /// whose cleanup was seen. What was moved off a host comes from the engine
    /// ([`HostView::evacuated`](crate::engine::HostView::evacuated)), which rebuilds it from
    /// the intent log: a restarted controller reports it again.
    reported: BTreeMap<String, BTreeSet<String>>,
    cleaned: BTreeSet<String>,
    /// Moves planned onto each agent whose binding is not made yet: a batch planned
    /// while an earlier one is still binding counts them (Neutron does not yet).
    binding: HashMap<String, usize>,
}

#[derive(Clone)]
struct Worker {
    network: Network,
    settings: NeutronSettings,
    /// The engine's hosts: only agents on Up hosts are targets; fenced hosts are
    /// listed; a Recovered host that is back gets its stale report.
    hosts: HostFacts,
    /// The engine's clock: the listings this edge takes are dated on it.
    clock: EngineClock,
    core: Core<State, RouterEvent>,
    moves: Arc<Semaphore>,
}

impl NeutronRestorer {
    /// Starts the worker (needs a tokio runtime).
    pub fn start(
        network: Network,
        settings: NeutronSettings,
        links: EdgeLinks,
        events: Option<mpsc::UnboundedSender<RouterEvent>>,
    ) -> Self {
        let worker = Worker {
            moves: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
            network,
            settings,
            hosts: links.hosts,
            clock: links.clock,
            core: Core::new(links.results, events),
        };
        let w = worker.clone();
        tokio::spawn(async move { w.watch_returns().await });
        NeutronRestorer {
            jobs: worker::start(worker, "the Neutron restorer stopped"),
        }
    }
}

impl Restorer for NeutronRestorer {
    /// Starts listing the host's routers, and gives **no** result for `key`: the
    /// force-down's outcome is the VM half's (a Neutron outage must not hold up the VMs'
    /// restore). The listing goes on in the background, retried with backoff while
    /// Neutron fails (each failure an `InventoryFailed` host event: the engine's alarm),
    /// and hands the engine its routers when it works, late if need be.
    fn force_down(&mut self, host: &HostId, _key: &IntentKey) {
        self.jobs
            .send_unanswered(Job::Now(List { host: host.clone() }));
    }

    fn restart_in_place(&mut self, resource: &Resource, _: &HostId, _: u32, key: &IntentKey) {
        // The engine never restarts a router in place (it moves it); say so if asked.
        self.jobs.answer(Input::RestoreResult {
            resource: resource.clone(),
            key: key.clone(),
            outcome: RestoreOutcome::Failed {
                reason: "routers are moved, not restarted in place".into(),
            },
        });
    }

    fn evacuate(&mut self, resource: &Resource, from: &HostId, key: &IntentKey) {
        match resource {
            Resource::Router(r) => self.jobs.send_resource(
                resource,
                key,
                Job::Batch(
                    key.clone(),
                    Move {
                        router: r.to_string(),
                        from: from.clone(),
                    },
                ),
            ),
            Resource::Vm(_) => self.jobs.answer(Input::RestoreResult {
                resource: resource.clone(),
                key: key.clone(),
                outcome: RestoreOutcome::Failed {
                    reason: "Neutron moves routers, not VMs".into(),
                },
            }),
        }
    }

    fn unfence(&mut self, host: &HostId, key: &IntentKey) {
        self.jobs.send_host(
            host,
            key,
            Job::Alone(key.clone(), Enable { host: host.clone() }),
        );
    }
}

impl Work for Worker {
    type Batched = Move;
    type Alone = Enable;
    type Now = List;

    fn answers(&self) -> &Answers {
        self.core.answers()
    }

    async fn batch(self, batch: Vec<(IntentKey, Move)>) {
        let moves = batch
            .into_iter()
            .map(|(key, m)| (m.router, m.from, key))
            .collect();
        self.move_batch(moves).await
    }

    async fn alone(self, key: IntentKey, job: Enable) {
        self.enable(job.host, key).await
    }

    fn now(&self, job: List) {
        self.core.lock().unfenced.remove(job.host.as_str());
        self.start_listing(job.host)
    }
}

impl Worker {
    /// The host's L3 agents, as Neutron lists them.
    async fn host_agents(&self, host: &str) -> Result<Vec<Agent>, String> {
        self.network
            .l3_agents(Some(host))
            .await
            .map_err(|e| e.to_string())
    }

    fn inventory(&self, host: &str, routers: &BTreeSet<String>) {
        self.core.report(Input::HostEvent {
            host: HostId::new(host),
            event: HostEvent::Inventory {
                resources: routers.iter().map(Resource::router).collect(),
                stopped: vec![],
                rbd_only: vec![],
                source: Source::Neutron,
                at: crate::engine::ListedAt::Controller(self.clock.now()),
            },
        });
    }
}
