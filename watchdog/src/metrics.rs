//! The watchdog's own Prometheus metrics (`[metrics] listen`): what it saw, what its
//! probes lost, how well it reaches the controller, and what its probes cost. Names,
//! labels and meaning are listed in docs/metrics.md ("Watchdog metrics").
//!
//! Counters of things that happen (events, heartbeats, acks) are counted where they
//! happen, through [`WatchdogMetrics`], shared by the monitor's sink and the heartbeat
//! task. Everything that is a state (the spool, reachability, libvirt, the probes' map
//! counters and run time) is read when scraped, from the channels the daemon already
//! keeps, so nothing is copied on the hot paths.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::programs::{ProgramFd, ProgramInfo};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::events::WatchdogEvent;
use crate::probes::ProbeStats;
use crate::uplink::{HostSummary, Reachability, ReachabilityReport, StreamStatus};

/// A family's labels: (name, value) pairs, as the controller's.
pub type Labels = Vec<(&'static str, String)>;

/// Round trips of heartbeat acks, seconds: from 100 µs (loopback) to 1 s (a path in
/// trouble; the isolation timeout is 3 s by default).
const RTT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

fn rtt_histogram() -> Histogram {
    Histogram::new(RTT_BUCKETS.into_iter())
}

/// What the daemon counts as it happens. Cheap to update, and updated whether or not an
/// endpoint serves it.
#[derive(Debug)]
pub struct WatchdogMetrics {
    /// Events the monitor emitted, by kind.
    events: Family<Labels, Counter>,
    /// Heartbeats sent, by path.
    heartbeats_sent: Family<Labels, Counter>,
    /// Heartbeats the kernel refused to send, by path.
    heartbeat_send_errors: Family<Labels, Counter>,
    /// Authentic acks for this run, by path and whether they count.
    heartbeat_acks: Family<Labels, Counter>,
    /// Send-to-ack time of every authentic ack, by path.
    heartbeat_rtt: Family<Labels, Histogram, fn() -> Histogram>,
    /// The probes' counters as the latest `probe_loss` event had them (cumulative).
    probe_stats: Mutex<ProbeStats>,
}

impl Default for WatchdogMetrics {
    fn default() -> Self {
        WatchdogMetrics {
            events: Family::default(),
            heartbeats_sent: Family::default(),
            heartbeat_send_errors: Family::default(),
            heartbeat_acks: Family::default(),
            heartbeat_rtt: Family::new_with_constructor(rtt_histogram),
            probe_stats: Mutex::new(ProbeStats::default()),
        }
    }
}

fn path_label(path: usize) -> Labels {
    vec![("path", path.to_string())]
}

impl WatchdogMetrics {
    /// An event the monitor emitted.
    pub fn observe(&self, event: &WatchdogEvent) {
        self.events
            .get_or_create(&vec![("kind", event.kind().to_string())])
            .inc();
        if let WatchdogEvent::ProbeLoss { stats, .. } = event {
            // The probes' counters only grow; a poisoned lock still holds a number.
            *self.probe_stats.lock().unwrap_or_else(|p| p.into_inner()) = *stats;
        }
    }

    /// A heartbeat left on `path` (`ok`) or the kernel refused it.
    pub fn heartbeat_sent(&self, path: usize, ok: bool) {
        let family = if ok {
            &self.heartbeats_sent
        } else {
            &self.heartbeat_send_errors
        };
        family.get_or_create(&path_label(path)).inc();
    }

    /// An authentic ack for this run arrived on `path`, answering a heartbeat sent `rtt`
    /// ago; `counts`: the controller took it as a sign of life.
    pub fn heartbeat_acked(&self, path: u8, counts: bool, rtt: Duration) {
        self.heartbeat_acks
            .get_or_create(&vec![
                ("path", path.to_string()),
                ("counts", counts.to_string()),
            ])
            .inc();
        self.heartbeat_rtt
            .get_or_create(&path_label(usize::from(path)))
            .observe(rtt.as_secs_f64());
    }

    fn probe_stats(&self) -> ProbeStats {
        *self.probe_stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where one probe program's run time is read.
#[derive(Debug)]
pub enum ProgramSource {
    /// A program this run loaded: its fd's `/proc/self/fdinfo` has the counters.
    Fd(ProgramFd),
    /// A pinned program (this run's or one taken over): read from its pin.
    Pin(PathBuf),
}

/// A probe program's accumulated run time and run count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramRunTime {
    pub program: String,
    pub run_time_ns: u64,
    pub runs: u64,
}

/// The probe programs, by name, to read their run time from.
#[derive(Debug, Default)]
pub struct ProbePrograms(pub Vec<(String, ProgramSource)>);

impl ProbePrograms {
    /// Every program's counters now; a program that cannot be read is left out.
    pub fn run_times(&self) -> Vec<ProgramRunTime> {
        self.0
            .iter()
            .filter_map(|(program, source)| {
                let (run_time_ns, runs) = match source {
                    ProgramSource::Fd(fd) => {
                        use std::os::fd::{AsFd as _, AsRawFd as _};
                        let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
                        fdinfo_run_time(&std::fs::read_to_string(path).ok()?)?
                    }
                    ProgramSource::Pin(path) => {
                        let info = ProgramInfo::from_pin(path).ok()?;
                        (
                            u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                            info.run_count(),
                        )
                    }
                };
                Some(ProgramRunTime {
                    program: program.clone(),
                    run_time_ns,
                    runs,
                })
            })
            .collect()
    }
}

/// (`run_time_ns`, `run_cnt`) from a BPF program fd's fdinfo.
fn fdinfo_run_time(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    Some((field("run_time_ns:")?, field("run_cnt:")?))
}

/// Whether the kernel counts BPF run time now: our own `BPF_ENABLE_STATS` fd, or the
/// `kernel.bpf_stats_enabled` sysctl.
#[derive(Debug)]
pub struct RunTimeStats {
    /// Held for as long as the daemon runs: the kernel counts while any such fd is open.
    enabled: Option<std::os::fd::OwnedFd>,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl RunTimeStats {
    /// Switches the kernel's run-time statistics on (`wanted`), or only watches the
    /// sysctl. Switching needs CAP_SYS_ADMIN, which the shipped unit does not grant:
    /// then the run time is counted only while an operator sets the sysctl.
    pub fn start(wanted: bool) -> Self {
        if !wanted {
            return RunTimeStats { enabled: None };
        }
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => {
                tracing::info!(
                    "BPF run-time statistics on while the daemon runs (metrics.probe_run_time)"
                );
                RunTimeStats { enabled: Some(fd) }
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot switch the kernel's BPF run-time statistics on (needs CAP_SYS_ADMIN); \
                     the probes' run time is counted only while kernel.bpf_stats_enabled = 1"
                );
                RunTimeStats { enabled: None }
            }
        }
    }

    /// Whether run time is being counted now.
    pub fn counting(&self) -> bool {
        self.enabled.is_some()
            || std::fs::read_to_string(BPF_STATS_SYSCTL).is_ok_and(|s| s.trim() == "1")
    }
}

/// What a scrape reads: the daemon's channels and the probe programs.
pub struct ScrapeSources {
    pub metrics: Arc<WatchdogMetrics>,
    pub status: watch::Receiver<HostSummary>,
    pub reachability: watch::Receiver<ReachabilityReport>,
    pub stream: watch::Receiver<StreamStatus>,
    pub programs: ProbePrograms,
    pub run_time_stats: RunTimeStats,
    /// CLOCK_MONOTONIC now, ns (the clock of the reachability report).
    pub mono_ns: fn() -> u64,
    /// Wall clock now, unix ns (the clock of the spooled events' stamps).
    pub unix_ns: fn() -> u64,
}

impl std::fmt::Debug for ScrapeSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeSources").finish_non_exhaustive()
    }
}

fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A family of metrics of one type read at scrape time: descriptor first, then one
/// sample per label set (none at all is fine: the family is still declared).
fn encode_family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: prometheus_client::metrics::MetricType,
    samples: &[(Labels, M)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn seconds(ns: u64) -> f64 {
    Duration::from_nanos(ns).as_secs_f64()
}

impl Collector for ScrapeSources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let summary = *self.status.borrow();
        let reach = self.reachability.borrow().clone();
        let stream = self.stream.borrow().clone();
        let now_mono = (self.mono_ns)();

        encode_one(
            &mut encoder,
            "vms",
            "qemu processes (VMs) this watchdog reports alive",
            &ConstGauge::new(i64::from(summary.vm_count)),
        )?;
        encode_one(
            &mut encoder,
            "stalled_vms",
            "Of those, how many have a disk stall in progress",
            &ConstGauge::new(i64::from(summary.stalled_vm_count)),
        )?;
        encode_one(
            &mut encoder,
            "libvirt_connected",
            "Whether the libvirt watcher's connection is up (1) or not (0; always 0 with libvirt.enabled = false)",
            &ConstGauge::new(i64::from(summary.libvirt_reachable)),
        )?;

        let states = [
            (Reachability::Unconfirmed, "unconfirmed"),
            (Reachability::Reachable, "reachable"),
            (Reachability::Isolated, "isolated"),
        ];
        let samples: Vec<(Labels, ConstGauge)> = states
            .iter()
            .map(|(state, name)| {
                (
                    vec![("state", name.to_string())],
                    ConstGauge::new(i64::from(reach.state == *state)),
                )
            })
            .collect();
        encode_family(
            &mut encoder,
            "reachability",
            "Whether the controller hears this watchdog: 1 for the current state",
            MetricType::Gauge,
            &samples,
        )?;
        let samples: Vec<(Labels, ConstGauge<f64>)> = reach
            .last_acked_send_mono_ns_by_path
            .iter()
            .enumerate()
            .filter_map(|(path, sent)| {
                let age = now_mono.saturating_sub((*sent)?);
                Some((path_label(path), ConstGauge::new(seconds(age))))
            })
            .collect();
        encode_family(
            &mut encoder,
            "last_ack_age_seconds",
            "Age of the newest heartbeat an acting controller acked on each path (absent until the first)",
            MetricType::Gauge,
            &samples,
        )?;

        encode_one(
            &mut encoder,
            "stream_connected",
            "Whether the event stream is connected to a controller that answered its Hello (1) or not (0)",
            &ConstGauge::new(i64::from(stream.connected)),
        )?;
        encode_one(
            &mut encoder,
            "spool_events",
            "Events in the on-disk spool waiting for the controller's ack",
            &ConstGauge::new(i64::try_from(stream.spooled).unwrap_or(i64::MAX)),
        )?;
        let age = stream
            .oldest_pending_unix_ns
            .map_or(0, |t| (self.unix_ns)().saturating_sub(t));
        encode_one(
            &mut encoder,
            "spool_oldest_event_age_seconds",
            "Age of the oldest event waiting in the spool (0 when it is empty)",
            &ConstGauge::new(seconds(age)),
        )?;
        encode_one(
            &mut encoder,
            "spool_dropped_events",
            "Events dropped unsent because the spool was full, since the daemon started",
            &ConstCounter::new(stream.dropped),
        )?;

        let stats = self.metrics.probe_stats();
        let samples: Vec<(Labels, ConstCounter)> = [
            ("ringbuf_full", stats.ringbuf_drops),
            ("inflight_full", stats.inflight_full),
            ("watch_full", stats.watch_full),
            ("block_inflight_full", stats.block_inflight_full),
            ("uring_inflight_full", stats.uring_inflight_full),
            ("rbd_inflight_full", stats.rbd_inflight_full),
        ]
        .into_iter()
        .map(|(reason, n)| (vec![("reason", reason.to_string())], ConstCounter::new(n)))
        .collect();
        encode_family(
            &mut encoder,
            "probe_drops",
            "Probe records lost (ring buffer full) or not tracked (a map full), since the probes were loaded",
            MetricType::Counter,
            &samples,
        )?;

        let rbd = self.programs.0.iter().any(|(p, _)| p == "rbd_release");
        encode_one(
            &mut encoder,
            "rbd_stalls_tracked",
            "Whether the librbd uprobes are attached, so stalls of disks on Ceph RBD are seen (1) or not (0)",
            &ConstGauge::new(i64::from(rbd)),
        )?;
        encode_one(
            &mut encoder,
            "probe_run_time_counted",
            "Whether the kernel counts the probes' run time now (1) or not (0: the run-time series stand still)",
            &ConstGauge::new(i64::from(self.run_time_stats.counting())),
        )?;
        let run_times = self.programs.run_times();
        let samples: Vec<(Labels, ConstCounter<f64>)> = run_times
            .iter()
            .map(|r| {
                (
                    vec![("program", r.program.clone())],
                    ConstCounter::new(seconds(r.run_time_ns)),
                )
            })
            .collect();
        encode_family(
            &mut encoder,
            "probe_run_seconds",
            "CPU time the probe programs ran, by program (while the kernel counts it)",
            MetricType::Counter,
            &samples,
        )?;
        let samples: Vec<(Labels, ConstCounter)> = run_times
            .iter()
            .map(|r| {
                (
                    vec![("program", r.program.clone())],
                    ConstCounter::new(r.runs),
                )
            })
            .collect();
        encode_family(
            &mut encoder,
            "probe_runs",
            "Runs of the probe programs, by program (while the kernel counts them)",
            MetricType::Counter,
            &samples,
        )?;
        Ok(())
    }
}

/// The registry a scrape encodes: the counted families and the scrape-time ones.
pub struct MetricsRegistry {
    registry: Registry,
}

impl MetricsRegistry {
    pub fn new(sources: ScrapeSources) -> Self {
        let mut registry = Registry::with_prefix("defib_watchdog");
        let m = sources.metrics.clone();
        registry.register(
            "events",
            "Events the watchdog emitted, by kind",
            m.events.clone(),
        );
        registry.register(
            "heartbeats_sent",
            "Heartbeats sent, by path",
            m.heartbeats_sent.clone(),
        );
        registry.register(
            "heartbeat_send_errors",
            "Heartbeats the kernel refused to send (no route, buffer full), by path",
            m.heartbeat_send_errors.clone(),
        );
        registry.register(
            "heartbeat_acks",
            "Authentic heartbeat acks for this run, by path and whether they count as the controller hearing this host",
            m.heartbeat_acks.clone(),
        );
        registry.register(
            "heartbeat_rtt_seconds",
            "Time from sending a heartbeat to taking in its ack, by path",
            m.heartbeat_rtt.clone(),
        );
        registry.register_collector(Box::new(sources));
        MetricsRegistry { registry }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of the exposition (OpenMetrics text, as the controller's).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// First wait before binding the endpoint again after a failure; doubles to
/// [`BIND_RETRY_MAX`].
const BIND_RETRY_MIN: Duration = Duration::from_secs(1);
const BIND_RETRY_MAX: Duration = Duration::from_secs(60);

/// Serves `GET /metrics` on `listen` until `shutdown` turns true. An address that
/// cannot be bound (in use, not on this host yet) is logged and retried with backoff:
/// the metrics endpoint never stops the daemon from watching its VMs.
pub async fn serve(
    listen: SocketAddr,
    registry: Arc<MetricsRegistry>,
    mut shutdown: watch::Receiver<bool>,
) {
    use axum::routing::get;
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "metrics are served beyond loopback, without authentication");
    }
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    registry.encode(),
                )
            }
        }),
    );
    let mut retry = BIND_RETRY_MIN;
    let listener = loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%listen, error = %e, retry_in = ?retry, "cannot serve metrics (metrics.listen)");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                retry = (retry * 2).min(BIND_RETRY_MAX);
            }
        }
    };
    tracing::info!(%listen, "serving metrics on /metrics");
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "the metrics endpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> (
        ScrapeSources,
        watch::Sender<HostSummary>,
        watch::Sender<ReachabilityReport>,
        watch::Sender<StreamStatus>,
    ) {
        let (status_tx, status) = watch::channel(HostSummary::default());
        let (reach_tx, reachability) = watch::channel(ReachabilityReport {
            state: Reachability::Unconfirmed,
            since_mono_ns: 0,
            last_acked_send_mono_ns: None,
            last_acked_send_mono_ns_by_path: vec![None, None],
        });
        let (stream_tx, stream) = watch::channel(StreamStatus::default());
        (
            ScrapeSources {
                metrics: Arc::new(WatchdogMetrics::default()),
                status,
                reachability,
                stream,
                programs: ProbePrograms::default(),
                run_time_stats: RunTimeStats::start(false),
                mono_ns: || 10_000_000_000,
                unix_ns: || 1_000_000_000_000,
            },
            status_tx,
            reach_tx,
            stream_tx,
        )
    }

    #[test]
    fn the_exposition_has_the_counted_families_and_the_states_read_at_scrape_time() {
        let (sources, status, reach, stream) = sources();
        let metrics = sources.metrics.clone();
        let registry = MetricsRegistry::new(sources);
        metrics.observe(&WatchdogEvent::LibvirtConnected {
            uri: "qemu:///system".into(),
            observed_ns: 1,
            unix_ms: 1,
        });
        metrics.observe(&WatchdogEvent::ProbeLoss {
            stats: ProbeStats {
                ringbuf_drops: 3,
                block_inflight_full: 2,
                ..ProbeStats::default()
            },
            observed_ns: 1,
        });
        metrics.heartbeat_sent(1, true);
        metrics.heartbeat_sent(1, false);
        metrics.heartbeat_acked(1, true, Duration::from_micros(300));
        status.send_modify(|s| {
            s.vm_count = 4;
            s.libvirt_reachable = true;
        });
        reach.send_modify(|r| {
            r.state = Reachability::Reachable;
            r.last_acked_send_mono_ns_by_path[1] = Some(9_750_000_000);
        });
        stream.send_modify(|s| {
            s.spooled = 7;
            s.oldest_pending_unix_ns = Some(1_000_000_000_000 - 2_500_000_000);
            s.dropped = 5;
        });
        let text = registry.encode();
        for line in [
            "defib_watchdog_events_total{kind=\"libvirt_connected\"} 1",
            "defib_watchdog_events_total{kind=\"probe_loss\"} 1",
            "defib_watchdog_heartbeats_sent_total{path=\"1\"} 1",
            "defib_watchdog_heartbeat_send_errors_total{path=\"1\"} 1",
            "defib_watchdog_heartbeat_acks_total{path=\"1\",counts=\"true\"} 1",
            "defib_watchdog_heartbeat_rtt_seconds_bucket{le=\"0.0005\",path=\"1\"} 1",
            "defib_watchdog_heartbeat_rtt_seconds_bucket{le=\"0.00025\",path=\"1\"} 0",
            "defib_watchdog_vms 4",
            "defib_watchdog_libvirt_connected 1",
            "defib_watchdog_reachability{state=\"reachable\"} 1",
            "defib_watchdog_reachability{state=\"isolated\"} 0",
            "defib_watchdog_last_ack_age_seconds{path=\"1\"} 0.25",
            "defib_watchdog_spool_events 7",
            "defib_watchdog_spool_oldest_event_age_seconds 2.5",
            "defib_watchdog_spool_dropped_events_total 5",
            "defib_watchdog_probe_drops_total{reason=\"ringbuf_full\"} 3",
            "defib_watchdog_probe_drops_total{reason=\"block_inflight_full\"} 2",
            "defib_watchdog_probe_run_time_counted ",
            "defib_watchdog_rbd_stalls_tracked 0",
            "# TYPE defib_watchdog_probe_run_seconds counter",
            "# TYPE defib_watchdog_probe_runs counter",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(
            !text.contains("last_ack_age_seconds{path=\"0\"}"),
            "a path never acked has no age:\n{text}"
        );
    }

    #[tokio::test]
    async fn an_address_in_use_is_retried_until_it_is_free_and_then_served() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = blocker.local_addr().unwrap();
        let (sources, ..) = sources();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(
            addr,
            Arc::new(MetricsRegistry::new(sources)),
            stopped,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !task.is_finished(),
            "a failed bind must not end the endpoint"
        );
        drop(blocker);
        // The first retry comes 1 s after the failed bind.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let body = loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut text = String::new();
                s.read_to_string(&mut text).await.unwrap();
                break text;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(body.contains("defib_watchdog_spool_events 0"), "{body}");
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn a_bpf_programs_fdinfo_gives_its_run_time_and_count() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nrun_time_ns:\t123456\nrun_cnt:\t42\n";
        assert_eq!(fdinfo_run_time(text), Some((123_456, 42)));
        assert_eq!(fdinfo_run_time("pos:\t0\n"), None);
    }
}
