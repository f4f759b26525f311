//! The router restorer (`[neutron] enabled = true`, beside the Nova backend): moves the
//! logical routers of a failed host's L3 agents to live agents, at once, instead of
//! Neutron's own failover (off by default, and waiting `agent_down_time`, 75 s).
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
//!                      that is Up) ─► DELETE from the dead agent, POST to the chosen one
//!                      ─► poll until the router is bound to exactly that agent
//!        ◄─RestoreResult Ok{agent's host} | Failed{reason}
//! host heartbeats again (Recovered) ─► Inventory (Neutron) of the routers moved off it:
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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};

use super::nova::HostView;
use super::worker::{self, Answers, Core, JobOf, Jobs, Work};
use super::ResultSender;
use crate::clock::wall_clock_now;
use crate::edges::Restorer;
use crate::engine::{
    HostEvent, HostId, HostState, Input, IntentKey, Resource, RestoreOutcome, Source,
};
use crate::openstack::network::{Agent, Network};

/// How often the hosts are looked at (fenced hosts not listed yet, stale report,
/// cleanup).
const RETURN_POLL: Duration = Duration::from_secs(1);

/// A failed listing of a fenced host's routers is tried again after this long,
/// doubling up to [`LIST_RETRY_MAX`].
const LIST_RETRY_FIRST: Duration = Duration::from_secs(1);
const LIST_RETRY_MAX: Duration = Duration::from_secs(30);

/// A host heartbeating within this long counts as back.
const BACK_WITHIN_MS: u64 = 2_000;

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
    /// The engine's view of the hosts (only agents on Up hosts are targets; a
    /// Recovered host heartbeating again gets its stale report).
    pub hosts: HostView,
}

impl Default for NeutronSettings {
    fn default() -> Self {
        NeutronSettings {
            skip_ha: true,
            max_concurrent: 10,
            poll_interval: Duration::from_millis(200),
            verify_timeout: Duration::from_secs(30),
            hosts: HostView::default(),
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

/// One router's new agent: the least loaded of `candidates` (agent id → routers bound),
/// ties broken by agent id so that a plan is reproducible. The count is increased.
pub fn choose_agent(loads: &mut BTreeMap<String, usize>) -> Option<String> {
    let (agent, _) = loads.iter().min_by_key(|(id, n)| (**n, (*id).clone()))?;
    let agent = agent.clone();
    *loads.get_mut(&agent).expect("present") += 1;
    Some(agent)
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
    /// ([`super::nova::HostSeen::evacuated_routers`]), which rebuilds it from
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
    core: Core<State, RouterEvent>,
    moves: Arc<Semaphore>,
}

impl NeutronRestorer {
    /// Starts the worker (needs a tokio runtime).
    pub fn start(
        network: Network,
        settings: NeutronSettings,
        results: ResultSender,
        events: Option<mpsc::UnboundedSender<RouterEvent>>,
    ) -> Self {
        let worker = Worker {
            moves: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
            network,
            settings,
            core: Core::new(results, events),
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
    // ------------------------------------------------------------ force down

    /// Lists a fenced host's routers unless that is under way or done since its fence.
    fn start_listing(&self, host: HostId) {
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

    /// The host's L3 agents, as Neutron lists them.
    async fn host_agents(&self, host: &str) -> Result<Vec<Agent>, String> {
        self.network
            .l3_agents(Some(host))
            .await
            .map_err(|e| e.to_string())
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

    // ------------------------------------------------------------ moves

    /// Live, admin-up L3 agents on hosts the engine has Up (or does not know: a
    /// network node without a watchdog), not on `failed`.
    fn targets(&self, agents: &[Agent], failed: &BTreeSet<String>) -> Vec<Agent> {
        let hosts = self
            .settings
            .hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        agents
            .iter()
            .filter(|a| a.alive && a.admin_state_up && !failed.contains(&a.host))
            .filter(|a| hosts.get(&a.host).is_none_or(|h| h.state == HostState::Up))
            .cloned()
            .collect()
    }

    async fn move_batch(&self, moves: Vec<(String, HostId, IntentKey)>) {
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
            *self.core.lock().binding.entry(agent.clone()).or_default() += 1;
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

    // ------------------------------------------------------------ return, unfence

    /// Lists every fenced host not listed yet (after a restart: routers a failed
    /// listing left behind), reports the routers moved off a host once it heartbeats
    /// again, and clears the report once the host's agents hold nothing that is not
    /// theirs.
    async fn watch_returns(self) {
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

    fn inventory(&self, host: &str, routers: &BTreeSet<String>) {
        self.core.report(Input::HostEvent {
            host: HostId::new(host),
            event: HostEvent::Inventory {
                resources: routers.iter().map(Resource::router).collect(),
                stopped: vec![],
                source: Source::Neutron,
                at: wall_clock_now(),
            },
        });
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

    async fn enable(&self, host: HostId, key: IntentKey) {
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

// ---------------------------------------------------------------- both halves

/// The restore edge with routers: VMs go to `vms` (the Nova restorer), routers to
/// Neutron. A force-down goes to both, and its result is the VM half's alone: the
/// router half lists the host's routers in the background, retrying while Neutron is
/// out (see [`NeutronRestorer`]'s `force_down`), so that a Neutron outage (likely when
/// the failed host was also a network node) never holds up a VM. An unfence goes to
/// both and its one result is theirs joined (Ok when both are; else the failures'
/// reasons): a host's L3 agents are trusted again only once Neutron says so. Both
/// halves answer a key handed over again with their first outcome, so a joined key is
/// answered again too.
pub struct RouterAwareRestorer {
    vms: Box<dyn Restorer + Send>,
    routers: NeutronRestorer,
    joined: Arc<Mutex<HashMap<IntentKey, Option<Input>>>>,
}

impl RouterAwareRestorer {
    /// `vms` is built with the results sender it is handed (its results pass through
    /// the joiner); the Neutron half likewise.
    pub fn start(
        vms: impl FnOnce(ResultSender) -> Box<dyn Restorer + Send>,
        network: Network,
        settings: NeutronSettings,
        results: ResultSender,
        events: Option<mpsc::UnboundedSender<RouterEvent>>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
        let joined: Arc<Mutex<HashMap<IntentKey, Option<Input>>>> = Arc::default();
        let vms = vms(tx.clone());
        let routers = NeutronRestorer::start(network, settings, tx, events);
        let j = joined.clone();
        tokio::spawn(async move {
            while let Some(input) = rx.recv().await {
                let out = match &input {
                    Input::HostActionResult { key, .. } => {
                        let mut map = j.lock().unwrap_or_else(|e| e.into_inner());
                        match map.get_mut(key) {
                            // Not joined (cannot happen: both halves answer host
                            // actions only when handed one through here).
                            None => Some(input),
                            Some(first @ None) => {
                                *first = Some(input);
                                None
                            }
                            Some(Some(first)) => {
                                let joined = join(first, &input);
                                map.insert(key.clone(), None);
                                Some(joined)
                            }
                        }
                    }
                    _ => Some(input),
                };
                if let Some(out) = out {
                    if results.send(out).is_err() {
                        return;
                    }
                }
            }
        });
        RouterAwareRestorer {
            vms,
            routers,
            joined,
        }
    }

    fn expect_two(&self, key: &IntentKey) {
        self.joined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), None);
    }
}

/// Two halves' results of one host action, as one.
fn join(a: &Input, b: &Input) -> Input {
    let (
        Input::HostActionResult {
            host,
            key,
            outcome: oa,
        },
        Input::HostActionResult { outcome: ob, .. },
    ) = (a, b)
    else {
        return b.clone();
    };
    let outcome = match (oa, ob) {
        (RestoreOutcome::Ok { .. }, RestoreOutcome::Ok { .. }) => {
            RestoreOutcome::Ok { host: host.clone() }
        }
        (RestoreOutcome::Failed { reason }, RestoreOutcome::Ok { .. })
        | (RestoreOutcome::Ok { .. }, RestoreOutcome::Failed { reason }) => {
            RestoreOutcome::Failed {
                reason: reason.clone(),
            }
        }
        (RestoreOutcome::Failed { reason: x }, RestoreOutcome::Failed { reason: y }) => {
            RestoreOutcome::Failed {
                reason: format!("{x}; {y}"),
            }
        }
    };
    Input::HostActionResult {
        host: host.clone(),
        key: key.clone(),
        outcome,
    }
}

impl Restorer for RouterAwareRestorer {
    fn force_down(&mut self, host: &HostId, key: &IntentKey) {
        self.vms.force_down(host, key);
        self.routers.force_down(host, key);
    }

    fn restart_in_place(&mut self, resource: &Resource, host: &HostId, n: u32, key: &IntentKey) {
        match resource {
            Resource::Vm(_) => self.vms.restart_in_place(resource, host, n, key),
            Resource::Router(_) => self.routers.restart_in_place(resource, host, n, key),
        }
    }

    fn evacuate(&mut self, resource: &Resource, from: &HostId, key: &IntentKey) {
        match resource {
            Resource::Vm(_) => self.vms.evacuate(resource, from, key),
            Resource::Router(_) => self.routers.evacuate(resource, from, key),
        }
    }

    fn unfence(&mut self, host: &HostId, key: &IntentKey) {
        self.expect_two(key);
        self.vms.unfence(host, key);
        self.routers.unfence(host, key);
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

    #[test]
    fn a_joined_host_action_fails_with_the_failing_halfs_reason() {
        let r = |o| Input::HostActionResult {
            host: HostId::new("h"),
            key: IntentKey("k".into()),
            outcome: o,
        };
        let ok = || RestoreOutcome::Ok {
            host: HostId::new("h"),
        };
        let bad = |s: &str| RestoreOutcome::Failed { reason: s.into() };
        assert!(matches!(
            join(&r(ok()), &r(ok())),
            Input::HostActionResult {
                outcome: RestoreOutcome::Ok { .. },
                ..
            }
        ));
        let Input::HostActionResult { outcome, .. } = join(&r(ok()), &r(bad("neutron: down")))
        else {
            panic!()
        };
        assert_eq!(outcome, bad("neutron: down"));
        let Input::HostActionResult { outcome, .. } = join(&r(bad("x")), &r(bad("y"))) else {
            panic!()
        };
        assert_eq!(outcome, bad("x; y"));
    }
}
