//! The watchdog's uplink to the controller: heartbeats over UDP on every network
//! path ([`heartbeat`]), and a reliable event stream over TCP backed by an on-disk
//! spool ([`stream`], [`spool`]). Both speak the `protocol` crate's wire format.
//!
//! It knows nothing of the probes: the monitor's events reach it through an
//! [`EventSender`] (usually via [`UplinkSink`]), the host status through a
//! `watch` channel of [`HostSummary`], so it runs, and is tested, without BPF.
//!
//! ```text
//! monitor ─► UplinkSink ─► EventSender ─► stream task ─► spool (disk) ─► TCP ─► controller
//!                  └─► watch<HostSummary> ─► heartbeat task ─► UDP × paths ─► controller
//!                                   watch<ReachabilityReport> ◄── acks ◄──┘
//! ```
pub mod clock;
pub mod heartbeat;
pub mod sink;
pub mod spool;
pub mod state;
pub mod status;
pub mod stream;
pub mod tls;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use protocol::{BootId, Key};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use clock::{Clock, TokioClock};
pub use heartbeat::{Reachability, ReachabilityReport, ReachabilityTracker};
pub use sink::{pending_event, EventSender, PendingEvent, UplinkSink};
pub use spool::Spool;
pub use status::{HostSummary, StatusTracker};
pub use stream::{Backoff, StreamStatus};
pub use tls::StreamTls;

use crate::config::{ConfigError, ControllerConfig, HostConfig};
use crate::metrics::WatchdogMetrics;

/// Everything the uplink needs to run, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// `host.cluster_id`.
    pub cluster_id: String,
    /// `host.id`.
    pub host_id: String,
    /// `host.state_dir`: the incarnation and the spool.
    pub state_dir: PathBuf,
    /// `controller.heartbeat_addrs`: one per path, index = path index.
    pub heartbeat_addrs: Vec<SocketAddr>,
    /// `controller.event_addrs` (or `controller.event_addr` alone): every controller's
    /// event stream, tried in this order until one (the leader) answers `Hello` with a
    /// `Welcome`. Not empty.
    pub event_addrs: Vec<SocketAddr>,
    /// `controller.heartbeat_interval_ms`.
    pub heartbeat_interval: Duration,
    /// With `controller.ca_file`: the event stream speaks TLS.
    pub tls: Option<StreamTls>,
    /// `controller.isolation_timeout_ms`.
    pub isolation_timeout: Duration,
    /// `controller.spool_max_events`.
    pub spool_max_events: usize,
    /// First reconnect delay of the event stream (100 ms).
    pub reconnect_min: Duration,
    /// Longest reconnect delay of the event stream (5 s).
    pub reconnect_max: Duration,
}

/// Default first reconnect delay.
pub const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Default longest reconnect delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

impl UplinkConfig {
    /// From validated `[host]` and `[controller]` sections.
    pub fn from_config(
        host: &HostConfig,
        controller: &ControllerConfig,
    ) -> Result<Self, ConfigError> {
        Ok(UplinkConfig {
            cluster_id: host.cluster_id.clone(),
            host_id: host.id.clone(),
            state_dir: host.state_dir.clone(),
            heartbeat_addrs: controller.heartbeat_socket_addrs()?,
            event_addrs: controller.event_socket_addrs()?,
            heartbeat_interval: Duration::from_millis(controller.heartbeat_interval_ms),
            tls: controller.stream_tls()?,
            isolation_timeout: Duration::from_millis(controller.isolation_timeout_ms),
            spool_max_events: controller.spool_max_events,
            reconnect_min: RECONNECT_MIN,
            reconnect_max: RECONNECT_MAX,
        })
    }
}

/// Who is talking: one watchdog run, as every message names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIdentity {
    /// The cluster.
    pub cluster_id: String,
    /// The host.
    pub host_id: String,
    /// The kernel's boot id.
    pub boot_id: BootId,
    /// This run's incarnation (raised and persisted at start).
    pub incarnation: u64,
}

/// The running uplink: a heartbeat task and an event stream task on the current
/// tokio runtime, and the channels to feed and watch them.
pub struct Uplink {
    identity: RunIdentity,
    events: EventSender,
    status: watch::Sender<HostSummary>,
    reachability: watch::Receiver<ReachabilityReport>,
    stream_status: watch::Receiver<StreamStatus>,
    metrics: Arc<WatchdogMetrics>,
    shutdown: watch::Sender<bool>,
    heartbeats: JoinHandle<()>,
    stream: JoinHandle<StreamStatus>,
}

impl Uplink {
    /// Starts the uplink with the running kernel's boot id and the tokio clock. Must be
    /// called inside a tokio runtime.
    pub fn start(cfg: UplinkConfig, key: Key) -> anyhow::Result<Uplink> {
        let boot_id = BootId::current().context("reading the kernel's boot id")?;
        Self::start_with(cfg, key, boot_id, Arc::new(TokioClock::new()))
    }

    /// Starts the uplink: raises the incarnation, opens the spool, binds one UDP socket
    /// per path, and spawns the heartbeat and event stream tasks. Fails only on the
    /// local state (the state directory, the sockets); an unreachable controller is
    /// the normal case it is built for.
    pub fn start_with(
        cfg: UplinkConfig,
        key: Key,
        boot_id: BootId,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Uplink> {
        anyhow::ensure!(
            !cfg.event_addrs.is_empty(),
            "no event stream address (controller.event_addrs)"
        );
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating the state directory {}", cfg.state_dir.display()))?;
        let incarnation = state::raise_incarnation(&cfg.state_dir, clock.unix_ns() / 1_000_000)
            .with_context(|| {
                format!("persisting the incarnation in {}", cfg.state_dir.display())
            })?;
        let spool = Spool::open(&cfg.state_dir, cfg.spool_max_events)
            .with_context(|| format!("opening the event spool in {}", cfg.state_dir.display()))?;
        let identity = RunIdentity {
            cluster_id: cfg.cluster_id.clone(),
            host_id: cfg.host_id.clone(),
            boot_id,
            incarnation,
        };
        let paths = cfg
            .heartbeat_addrs
            .iter()
            .map(|addr| bind_path(*addr).map(|socket| (*addr, Arc::new(socket))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        tracing::info!(
            host = %identity.host_id,
            cluster = %identity.cluster_id,
            boot_id = %identity.boot_id,
            incarnation,
            paths = ?cfg.heartbeat_addrs,
            event_addrs = ?cfg.event_addrs,
            spooled = spool.len(),
            last_event_id = spool.last_assigned_id(),
            "uplink starting"
        );
        if cfg.tls.is_none() {
            tracing::warn!(
                "the event stream is NOT ENCRYPTED (no controller.ca_file): domain definitions \
                 and events cross the network in clear text (frames are still authenticated)"
            );
        }

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (status, status_rx) = watch::channel(HostSummary::default());
        let tracker = ReachabilityTracker::new(paths.len(), cfg.isolation_timeout, clock.mono_ns());
        let (reachability_tx, reachability) = watch::channel(tracker.report().clone());
        let (stream_status_tx, stream_status) = watch::channel(StreamStatus::default());
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(WatchdogMetrics::default());

        let heartbeats = tokio::spawn(
            heartbeat::HeartbeatTask {
                identity: identity.clone(),
                key: key.clone(),
                paths,
                interval: cfg.heartbeat_interval,
                ack_period_ms: heartbeat::ack_period_asked(
                    cfg.heartbeat_interval,
                    cfg.isolation_timeout,
                ),
                tracker,
                status: status_rx,
                reachability: reachability_tx,
                clock,
                metrics: metrics.clone(),
            }
            .run(shutdown_rx.clone()),
        );
        let stream = tokio::spawn(
            stream::EventStream {
                identity: identity.clone(),
                key,
                tls: cfg.tls.clone(),
                conn_out: 0,
                conn_in: 0,
                addrs: cfg.event_addrs,
                last_leader: 0,
                spool,
                events: events_rx,
                events_open: true,
                status: stream_status_tx,
                backoff: Backoff::new(cfg.reconnect_min, cfg.reconnect_max),
            }
            .run(shutdown_rx),
        );
        Ok(Uplink {
            identity,
            events: EventSender::new(events_tx),
            status,
            reachability,
            stream_status,
            metrics,
            shutdown,
            heartbeats,
            stream,
        })
    }

    /// This run's identity (with its incarnation).
    pub fn identity(&self) -> &RunIdentity {
        &self.identity
    }

    /// Where to send events for the controller.
    pub fn event_sender(&self) -> EventSender {
        self.events.clone()
    }

    /// The status summary the heartbeats carry; update it with `send_modify`.
    pub fn status(&self) -> watch::Sender<HostSummary> {
        self.status.clone()
    }

    /// Whether the controller hears this watchdog; wakes on every state change.
    pub fn reachability(&self) -> watch::Receiver<ReachabilityReport> {
        self.reachability.clone()
    }

    /// The event stream's connection and spool counters.
    pub fn stream_status(&self) -> watch::Receiver<StreamStatus> {
        self.stream_status.clone()
    }

    /// What the daemon counts (events, heartbeats, acks), for the metrics endpoint.
    pub fn metrics(&self) -> Arc<WatchdogMetrics> {
        self.metrics.clone()
    }

    /// The monitor's sink that feeds this uplink (and prints JSON lines if asked).
    pub fn sink(&self, print_json: bool) -> UplinkSink {
        UplinkSink::new(self.event_sender(), self.status(), print_json)
            .with_metrics(self.metrics.clone())
    }

    /// Stops both tasks. Every event sent before this call is in the spool on disk
    /// when it returns (the stream task drains its channel first). Returns the final
    /// stream status.
    pub async fn shutdown(self) -> StreamStatus {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.heartbeats.await {
            tracing::error!(error = %e, "heartbeat task failed");
        }
        match self.stream.await {
            Ok(status) => status,
            Err(e) => {
                tracing::error!(error = %e, "event stream task failed");
                self.stream_status.borrow().clone()
            }
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A UDP socket for one heartbeat path. Not connected: a connect fails at once when
/// the path's network has no route, and a path that is down at start must not stop the
/// daemon; sends name the address instead, and acks are judged by their MAC, not by
/// where they come from.
fn bind_path(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .with_context(|| format!("binding a heartbeat socket for {addr}"))?;
    UdpSocket::from_std(socket)
        .with_context(|| format!("registering the heartbeat socket for {addr}"))
}
