//! The running controller: intake (UDP heartbeats, TCP event streams), the engine task
//! that owns the pure engine and carries its actions out, the store, and what the API sees.
pub mod engine_task;
pub mod host_view;
pub mod intake;
pub mod systemd;
pub mod translate;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};

use crate::config::{Backend, Resolved};
use crate::edges::unconfigured::UnconfiguredRestorer;
use crate::edges::{fencing, libvirt, neutron, nova, stale_copies, Restorer};
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

/// Opens the store, binds every socket, then runs until `shutdown`. `on_ready` is called
/// once everything is bound (systemd readiness, tests). After a failed store write the
/// engine task stops acting and, once the store takes writes again, ends with an error:
/// the caller exits non-zero so that the restart resumes from the store
/// ([`engine_task`] says why).
pub async fn run(
    resolved: Resolved,
    shutdown: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(&Bound),
) -> anyhow::Result<()> {
    let cfg = &resolved.cfg;
    let c = &cfg.controller;
    let metrics = Arc::new(Metrics::new());
    let store = crate::store::SqliteStore::open(&c.store_path)
        .with_context(|| format!("opening the store {}", c.store_path.display()))?;
    // The hosts whose event stream is open, for edges that send them commands, and the
    // domain definitions the hosts reported (for evacuation without Nova), as stored.
    let streams = libvirt::HostStreams::new();
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
    let parts = EngineTaskParts {
        engine_config: cfg.engine_config(),
        store: Box::new(store),
        metrics: metrics.clone(),
        controller_id: c.id.clone(),
        cluster_id: c.cluster_id.clone(),
    };
    let backend = c.backend;
    let restorer_streams = streams.clone();
    let (copies_streams, copies_metrics) = (streams.clone(), metrics.clone());
    let (fence_table, verify) = (resolved.fence.clone(), resolved.verify);
    tracing::info!(hosts = fence_table.len(), "fence levels configured");
    // One session (token, connections) for Nova, Placement and Neutron.
    let session = match &resolved.nova {
        Some(n) => Some(Arc::new(
            crate::openstack::Session::new(n.session.clone())
                .context("building the OpenStack client")?,
        )),
        None => None,
    };
    let nova = match (&resolved.nova, &session) {
        (Some(n), Some(s)) => Some(crate::openstack::compute::Compute::new(
            s.clone(),
            n.microversion.clone(),
        )),
        _ => None,
    };
    let nova_settings = resolved.nova.as_ref().map(|n| n.settings.clone());
    // Routers: the Neutron half beside the Nova half.
    let neutron = match (&resolved.neutron, &session) {
        (Some(n), Some(s)) => Some((
            crate::openstack::network::Network::new(s.clone()),
            n.clone(),
        )),
        _ => None,
    };
    let (task, channels) = EngineTask::new(parts, |links| {
        let results = links.results.clone();
        let restorer: Box<dyn Restorer + Send> = match (backend, nova, nova_settings) {
            (Backend::Libvirt, _, _) => Box::new(libvirt::LibvirtRestorer::new(
                results.clone(),
                restorer_streams,
            )),
            (Backend::Nova, Some(compute), Some(settings)) => match neutron {
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
            (Backend::None | Backend::Nova, _, _) => Box::new(UnconfiguredRestorer {
                results: results.clone(),
            }),
        };
        // A host without fence levels gets a failed fence (an alarm, no restore) and
        // an `Unknown` confirmation: the same edges answer for it.
        engine_task::Edges {
            fencer: Box::new(fencing::LeveledFencer::new(
                fence_table.clone(),
                verify,
                results.clone(),
            )),
            restorer,
            confirmer: Box::new(fencing::PowerConfirmer::new(fence_table, results)),
            // Every backend: the watchdogs' streams are open whatever restores the VMs.
            copies: Box::new(stale_copies::StaleCopies::new(
                copies_streams,
                copies_metrics,
            )),
        }
    })?;
    tracing::info!(backend = ?backend, "restore backend");
    let EngineChannels {
        intake: intake_tx,
        commands,
        snapshot,
        ..
    } = channels;

    // Bind everything before serving anything: a port in use is a clear error at start.
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

    // Forward at most four heartbeats per host and path per interval to the engine.
    let forward_every_ms = (cfg.detector.heartbeat_interval_ms / 4).max(1);
    let hb_intake = HeartbeatIntake::new(
        resolved.key.clone(),
        &c.cluster_id,
        &c.id,
        forward_every_ms,
        intake_tx.clone(),
        metrics.clone(),
    );
    for socket in udp {
        tokio::spawn(intake::serve_heartbeats(socket, hb_intake.clone()));
    }
    tokio::spawn(intake::serve_events(
        events,
        resolved.key.clone(),
        c.cluster_id.clone(),
        c.id.clone(),
        intake_tx,
        metrics.clone(),
        streams,
    ));
    let handle = crate::api::view::ApiHandle {
        snapshot,
        commands,
        metrics,
    };
    let router = crate::api::router(handle, resolved.api_token.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api, router).await {
            tracing::error!(error = %e, "API server stopped");
        }
    });
    tracing::info!(?bound, controller = %c.id, cluster = %c.cluster_id, "defib-controller ready");
    on_ready(&bound);
    task.run(shutdown).await?;
    tracing::info!("defib-controller stopped");
    Ok(())
}
