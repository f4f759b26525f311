//! The running controller: intake (UDP heartbeats, TCP event streams), the engine task
//! that owns the pure engine and carries its actions out, the store, and what the API sees.
pub mod engine_task;
pub mod enrollment;
pub mod ha;
pub mod host_view;
pub mod intake;
pub mod systemd;
pub mod translate;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};

use crate::api::view::{ControllerSnapshot, RoleSnapshot};
use crate::config::{Backend, Resolved};
use crate::edges::unconfigured::UnconfiguredRestorer;
use crate::edges::{fencing, libvirt, neutron, nova, stale_copies, EdgeLinks, Restorer};
use crate::metrics::Metrics;
use engine_task::{EngineChannels, EngineTask, EngineTaskParts};
use intake::HeartbeatIntake;

/// Where a running controller listens (the OS picks ports given as 0).
#[derive(Debug, Clone)]
pub struct Bound {
    pub heartbeat: Vec<std::net::SocketAddr>,
    pub events: std::net::SocketAddr,
    pub api: std::net::SocketAddr,
}

/// Builds the edges for an engine task; kept so that every leadership term gets fresh
/// ones (an edge remembers the engine it serves).
#[derive(Clone)]
pub(crate) struct EdgeFactory {
    backend: Backend,
    streams: Arc<libvirt::HostStreams>,
    metrics: Arc<Metrics>,
    fence: Arc<crate::edges::fencing::FenceTable>,
    verify: crate::edges::fencing::VerifyPolicy,
    session: Option<Arc<crate::openstack::Session>>,
    nova: Option<crate::config::NovaResolved>,
    neutron: Option<crate::edges::neutron::NeutronSettings>,
}

impl EdgeFactory {
    pub(crate) fn new(
        resolved: &Resolved,
        streams: Arc<libvirt::HostStreams>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        // One session (token, connections) for Nova, Placement and Neutron.
        let session = match &resolved.nova {
            Some(n) => Some(Arc::new(
                crate::openstack::Session::new(n.session.clone())
                    .context("building the OpenStack client")?,
            )),
            None => None,
        };
        Ok(EdgeFactory {
            backend: resolved.cfg.controller.backend,
            streams,
            metrics,
            fence: resolved.fence.clone(),
            verify: resolved.verify,
            session,
            nova: resolved.nova.clone(),
            neutron: resolved.neutron.clone(),
        })
    }

    pub(crate) fn build(&self, links: EdgeLinks) -> engine_task::Edges {
        let results = links.results.clone();
        let compute = match (&self.nova, &self.session) {
            (Some(n), Some(s)) => Some((
                crate::openstack::compute::Compute::new(s.clone(), n.microversion.clone()),
                n.settings.clone(),
            )),
            _ => None,
        };
        // Routers: the Neutron half beside the Nova half.
        let neutron = match (&self.neutron, &self.session) {
            (Some(n), Some(s)) => Some((
                crate::openstack::network::Network::new(s.clone()),
                n.clone(),
            )),
            _ => None,
        };
        let restorer: Box<dyn Restorer + Send> = match (self.backend, compute) {
            (Backend::Libvirt, _) => Box::new(
                libvirt::LibvirtRestorer::new(results.clone(), self.streams.clone())
                    .with_host_facts(links.hosts.clone())
                    .with_old_copy_check(crate::edges::old_copies::OldCopyCheck::new(
                        self.fence.clone(),
                    )),
            ),
            (Backend::Nova, Some((compute, settings))) => match neutron {
                None => Box::new(nova::NovaRestorer::start(compute, settings, links, None)),
                Some((network, neutron_settings)) => Box::new(neutron::RouterAwareRestorer::start(
                    |halves| Box::new(nova::NovaRestorer::start(compute, settings, halves, None)),
                    network,
                    neutron_settings,
                    links,
                    None,
                )),
            },
            // `nova` without its section cannot pass the configuration check.
            (Backend::None | Backend::Nova, _) => Box::new(UnconfiguredRestorer {
                results: results.clone(),
            }),
        };
        // A host without fence levels gets a failed fence (an alarm, no restore) and
        // an `Unknown` confirmation: the same edges answer for it.
        engine_task::Edges {
            fencer: Box::new(fencing::LeveledFencer::new(
                self.fence.clone(),
                self.verify,
                results.clone(),
            )),
            restorer,
            confirmer: Box::new(fencing::PowerConfirmer::new(self.fence.clone(), results)),
            // Every backend: the watchdogs' streams are open whatever restores the VMs.
            copies: Box::new(stale_copies::StaleCopies::new(
                self.streams.clone(),
                self.metrics.clone(),
            )),
        }
    }
}

/// Notes the domain definitions the hosts reported (for evacuation without Nova), as
/// stored, in the hosts' streams.
pub(crate) fn note_stored_definitions(
    store: &dyn crate::store::Store,
    streams: &libvirt::HostStreams,
) -> anyhow::Result<()> {
    for (host, payload) in store
        .events_of_kind("domain_definition")
        .context("reading the stored domain definitions")?
    {
        if let Ok(protocol::EventPayload::DomainDefinition { vm_uuid, xml, .. }) =
            serde_json::from_str(&payload)
        {
            streams.note_definition(&host, &vm_uuid, &xml);
        }
    }
    Ok(())
}

/// The sockets, bound before anything is served: a port in use is a clear error at
/// start.
pub(crate) struct Sockets {
    pub udp: Vec<UdpSocket>,
    pub events: TcpListener,
    pub api: TcpListener,
    pub bound: Bound,
}

pub(crate) async fn bind(resolved: &Resolved) -> anyhow::Result<Sockets> {
    let mut udp = Vec::new();
    for addr in &resolved.heartbeat_addrs {
        udp.push(
            UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding heartbeat socket {addr}"))?,
        );
    }
    let events = TcpListener::bind(resolved.event_addr)
        .await
        .with_context(|| format!("binding event stream listener {}", resolved.event_addr))?;
    let api = TcpListener::bind(resolved.api_addr)
        .await
        .with_context(|| format!("binding API listener {}", resolved.api_addr))?;
    let bound = Bound {
        heartbeat: udp.iter().filter_map(|s| s.local_addr().ok()).collect(),
        events: events.local_addr()?,
        api: api.local_addr()?,
    };
    Ok(Sockets {
        udp,
        events,
        api,
        bound,
    })
}

/// Serves the heartbeat sockets and the event streams into `intake_tx`; returns the
/// heartbeat intake (its ack switch is what a follower turns off).
#[allow(
    clippy::too_many_arguments,
    reason = "the intake's parts, each made by the caller that also hands them elsewhere"
)]
pub(crate) fn serve_intake(
    resolved: &Resolved,
    udp: Vec<UdpSocket>,
    events: TcpListener,
    intake_tx: tokio::sync::mpsc::Sender<intake::Intake>,
    metrics: Arc<Metrics>,
    streams: Arc<libvirt::HostStreams>,
    enrolled: tokio::sync::watch::Receiver<Vec<String>>,
    backlog: Arc<intake::SocketBacklog>,
) -> Arc<HeartbeatIntake> {
    let cfg = &resolved.cfg;
    let c = &cfg.controller;
    // Forward at most four heartbeats per host and path per interval to the engine.
    let forward_every_ms = (cfg.detector.heartbeat_interval_ms / 4).max(1);
    let session = new_session();
    tracing::info!(session = format!("{session:016x}"), "heartbeat session");
    let receiver = protocol::HeartbeatReceiver::per_host(
        protocol::HostKeys::new(resolved.master.clone()),
        &c.cluster_id,
        session,
    );
    let hb_intake = HeartbeatIntake::new(
        receiver,
        intake::SourceRate {
            per_s: cfg.intake.heartbeat_rate_per_source,
            burst: cfg.intake.heartbeat_burst_per_source,
        },
        &c.id,
        forward_every_ms,
        intake_tx.clone(),
        metrics.clone(),
    );
    let configured = cfg.intake.enrolled_hosts.clone();
    hb_intake.set_enrolled(&enrollment::union(&enrolled.borrow(), &configured));
    tokio::spawn(enrollment::apply(enrolled, configured, hb_intake.clone()));
    for socket in udp {
        tokio::spawn(intake::serve_heartbeats(
            socket,
            hb_intake.clone(),
            backlog.clone(),
        ));
    }
    let keys_of = hb_intake.clone();
    tokio::spawn(intake::serve_events(
        events,
        intake::StreamSettings::new(
            protocol::FrameKeys::PerHost(Arc::new(move |h: &str| keys_of.key_for(h))),
            &cfg.intake,
        )
        .with_tls(resolved.tls.clone()),
        c.cluster_id.clone(),
        c.id.clone(),
        intake_tx,
        metrics,
        streams,
    ));
    hb_intake
}

/// A random, non-zero session for this process (protocol::heartbeat, "Freshness").
fn new_session() -> u64 {
    use std::io::Read as _;
    let mut buf = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    let random = u64::from_ne_bytes(buf);
    if read.is_err() || random == 0 {
        // No randomness: time and pid still differ between two runs of this process.
        let t = unix_ms() ^ (u64::from(std::process::id()) << 40);
        return t.max(1);
    }
    random
}

/// Serves the REST API and /metrics: HTTPS with `[tls]`, else plain HTTP. What is not
/// protected is said loudly at every start.
pub(crate) fn serve_api(
    api: TcpListener,
    handle: crate::api::view::ApiHandle,
    resolved: &Resolved,
) {
    let addr = resolved.api_addr;
    if resolved.tls.is_none() {
        tracing::warn!(
            %addr,
            "the API is NOT ENCRYPTED (no [tls] section): its token and answers cross the \
             network in clear text; set tls.cert_file and tls.key_file"
        );
    }
    if resolved.api_token.is_none() {
        tracing::warn!(
            %addr,
            "the API accepts UNAUTHENTICATED requests (api.insecure_no_token = true): \
             anyone who reaches it can read every host and VM, set maintenance and unfence \
             hosts; set controller.api_token_file"
        );
    }
    let router = crate::api::router(handle, resolved.api_token.clone());
    tokio::spawn(crate::api::serve(api, router, resolved.tls.clone()));
}

/// This controller's API as clients name it (`https://` with `[tls]`).
pub(crate) fn api_url(resolved: &Resolved) -> String {
    format!(
        "{}://{}",
        crate::config::api_scheme(resolved.tls.is_some()),
        resolved.api_addr
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens the store, binds every socket, then runs until `shutdown`. `on_ready` is called
/// once everything is bound (systemd readiness, tests). With `[etcd]` endpoints the
/// controller is one of several and acts only while it leads ([`ha`]); without, it is
/// alone on SQLite. After a failed store write the engine task stops acting and, once
/// the store takes writes again, ends with an error: the caller exits non-zero so that
/// the restart resumes from the store ([`engine_task`] says why).
pub async fn run(
    resolved: Resolved,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&Bound),
) -> anyhow::Result<()> {
    if let Some(etcd) = resolved.etcd.clone() {
        return ha::run(resolved, etcd, shutdown, on_ready).await;
    }
    let cfg = &resolved.cfg;
    let c = &cfg.controller;
    let metrics = Arc::new(Metrics::new());
    let store = crate::store::SqliteStore::open(&c.store_path)
        .with_context(|| format!("opening the store {}", c.store_path.display()))?;
    // The hosts whose event stream is open, for edges that send them commands, and the
    // domain definitions the hosts reported (for evacuation without Nova), as stored.
    let streams = libvirt::HostStreams::new();
    note_stored_definitions(&store, &streams)?;
    let started_ms = unix_ms();
    let role = RoleSnapshot {
        role: "leader".into(),
        store: "sqlite".into(),
        leader: Some(c.id.clone()),
        leader_api: Some(api_url(&resolved)),
        leader_since_ms: Some(started_ms),
        terms: 1,
        problem: None,
        last_step_down: None,
        controllers: vec![ControllerSnapshot {
            id: c.id.clone(),
            api: api_url(&resolved),
            started_ms,
            leader: true,
        }],
    };
    metrics.leader.set(1);
    metrics.leader_terms.inc();
    let (enrolled_tx, enrolled_rx) = tokio::sync::watch::channel(
        enrollment::read(&store).context("reading the enrolled hosts from the store")?,
    );
    let backlog = Arc::new(intake::SocketBacklog::default());
    let parts = EngineTaskParts {
        enrollment: Some(Arc::new(enrollment::Enrollment {
            master: resolved.master.clone(),
            tx: enrolled_tx,
            configured: cfg.intake.enrolled_hosts.clone(),
        })),
        engine_config: cfg.engine_config(),
        store: Box::new(store),
        metrics: metrics.clone(),
        controller_id: c.id.clone(),
        cluster_id: c.cluster_id.clone(),
        heard: Vec::new(),
        end_on_store_failure: false,
        role,
        backlog: backlog.clone(),
    };
    let factory = EdgeFactory::new(&resolved, streams.clone(), metrics.clone())?;
    tracing::info!(hosts = resolved.fence.len(), "fence levels configured");
    let (task, channels) = EngineTask::new(parts, |links| factory.build(links))?;
    tracing::info!(backend = ?c.backend, "restore backend");
    let EngineChannels {
        intake: intake_tx,
        commands,
        snapshot,
        ..
    } = channels;
    let Sockets {
        udp,
        events,
        api,
        bound,
    } = bind(&resolved).await?;
    serve_intake(
        &resolved,
        udp,
        events,
        intake_tx,
        metrics.clone(),
        streams,
        enrolled_rx,
        backlog,
    );
    let handle = crate::api::view::ApiHandle {
        snapshot,
        commands,
        metrics,
    };
    serve_api(api, handle, &resolved);
    tracing::info!(?bound, controller = %c.id, cluster = %c.cluster_id, "defib-controller ready");
    on_ready(&bound);
    task.run(shutdown).await?;
    tracing::info!("defib-controller stopped");
    Ok(())
}
