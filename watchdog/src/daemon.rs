//! `defib-watchdog run`: the daemon proper. The probes feed the monitor, the monitor
//! feeds the uplink (events to the spool and the stream, counts to the heartbeats),
//! until SIGTERM or SIGINT. The libvirt watcher (unless `libvirt.enabled = false`)
//! feeds the monitor from its own thread. With `[self_fence] enabled`, the self-fence
//! task watches the uplink's reachability (see `selffence`). With `[metrics] listen`,
//! a task serves `/metrics` (see `metrics`).
use std::future::Future;

use protocol::Key;

use crate::config::WatchdogConfig;
use crate::libvirt::{LibvirtSettings, LibvirtWatcher};
use crate::monitor::Monitor;
use crate::selffence::{SelfFence, SelfFenceSettings};
use crate::uplink::{Uplink, UplinkConfig};

/// Runs the daemon until `shutdown` resolves. `cfg` must be validated and have a
/// `[controller]` section; `key` is its key file's content. With `print_events`, every
/// event is also printed to stdout as a JSON line.
///
/// The uplink starts first, so a bad state directory fails before the probes are
/// attached; on the way out the uplink is stopped after the monitor, so every event
/// the monitor emitted is in the spool on disk.
pub async fn run(
    cfg: WatchdogConfig,
    key: Key,
    print_events: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let controller = cfg.controller_for_run()?;
    let uplink_cfg = UplinkConfig::from_config(&cfg.host, controller)?;
    // Probes first: the controller counts this host as watched from its first heartbeat,
    // so no heartbeat may leave before the probes see every qemu exit.
    crate::mounts::ensure_bpf_filesystems()?;
    let mut probes = if cfg.probes.pin_dir.is_empty() {
        crate::probes::Probes::load(&cfg)?
    } else {
        crate::probes::Probes::load_pinned(&cfg, std::path::Path::new(&cfg.probes.pin_dir))?
    };
    tracing::info!(
        pinned = !cfg.probes.pin_dir.is_empty(),
        took_over = probes.took_over(),
        "probes attached"
    );
    let isolation_timeout = uplink_cfg.isolation_timeout;
    let uplink = Uplink::start(uplink_cfg, key)?;
    let self_fence = cfg.self_fence.enabled.then(|| {
        SelfFence::start(
            SelfFenceSettings {
                patterns: cfg.name_patterns(),
                isolation_timeout,
                device: cfg.self_fence.watchdog_device.clone(),
                proc_root: "/proc".into(),
            },
            uplink.reachability(),
            uplink.status(),
        )
    });
    let (libvirt_tx, libvirt_rx) = tokio::sync::mpsc::unbounded_channel();
    let libvirt = if cfg.libvirt.enabled_for_run() {
        Some(LibvirtWatcher::start(
            LibvirtSettings::from_config(&cfg.libvirt),
            libvirt_tx,
        )?)
    } else {
        tracing::info!("libvirt watcher disabled (libvirt.enabled = false)");
        None
    };
    let metrics = serve_metrics(&cfg, &uplink, probes.take_programs())?;
    let vm_cache = cfg.host.state_dir.join("vms.json");
    crate::systemd::ready("probes attached");
    let monitored = async {
        let mut sink = uplink.sink(print_events);
        Monitor::new(probes, cfg.clone())
            .with_external_events(libvirt_rx)
            .with_vm_cache(vm_cache)
            .run(&mut sink, shutdown)
            .await
    }
    .await;
    if let Some(libvirt) = libvirt {
        stop_libvirt(libvirt).await;
    }
    if let Some(self_fence) = self_fence {
        self_fence.stop().await;
    }
    if let Some(mut metrics) = metrics {
        let _ = metrics.stop.send(true);
        // A scraper's idle keep-alive connection would hold a graceful stop up.
        if tokio::time::timeout(std::time::Duration::from_secs(1), &mut metrics.task)
            .await
            .is_err()
        {
            metrics.task.abort();
        }
    }
    let stream = uplink.shutdown().await;
    tracing::info!(
        spooled = stream.spooled,
        last_event_id = stream.last_event_id,
        dropped = stream.dropped,
        "stopped; unacknowledged events stay in the spool for the next run"
    );
    monitored
}

/// The metrics endpoint's task and the switch that stops it.
struct MetricsTask {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the metrics endpoint if `[metrics] listen` is set.
fn serve_metrics(
    cfg: &WatchdogConfig,
    uplink: &Uplink,
    programs: crate::metrics::ProbePrograms,
) -> anyhow::Result<Option<MetricsTask>> {
    use crate::metrics::{MetricsRegistry, RunTimeStats, ScrapeSources};
    let Some(listen) = cfg.metrics.listen_addr()? else {
        return Ok(None);
    };
    let registry = MetricsRegistry::new(ScrapeSources {
        metrics: uplink.metrics(),
        status: uplink.status().subscribe(),
        reachability: uplink.reachability(),
        stream: uplink.stream_status(),
        programs,
        run_time_stats: RunTimeStats::start(cfg.metrics.probe_run_time),
        mono_ns: crate::clock::monotonic_ns,
        unix_ns: crate::clock::realtime_ns,
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(crate::metrics::serve(
        listen,
        std::sync::Arc::new(registry),
        stopped,
    ));
    Ok(Some(MetricsTask { stop, task }))
}

/// Stops the libvirt watcher without blocking the runtime; a watcher stuck in a libvirt
/// call is not waited for longer than a second.
pub async fn stop_libvirt(watcher: LibvirtWatcher) {
    let stopped =
        tokio::task::spawn_blocking(move || watcher.stop(std::time::Duration::from_secs(1)))
            .await
            .unwrap_or(false);
    if !stopped {
        tracing::warn!("the libvirt watcher did not stop within 1 s; left behind");
    }
}
