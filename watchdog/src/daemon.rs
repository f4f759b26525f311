//! `defib-watchdog run`: the daemon proper. The probes feed the monitor, the monitor
//! feeds the uplink (events to the spool and the stream, counts to the heartbeats),
//! until SIGTERM or SIGINT.
use std::future::Future;

use protocol::Key;

use crate::config::WatchdogConfig;
use crate::monitor::Monitor;
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
    let probes = crate::probes::Probes::load(&cfg)?;
    tracing::info!("probes attached");
    let uplink = Uplink::start(uplink_cfg, key)?;
    let monitored = async {
        let mut sink = uplink.sink(print_events);
        Monitor::new(probes, cfg.clone())
            .run(&mut sink, shutdown)
            .await
    }
    .await;
    let stream = uplink.shutdown().await;
    tracing::info!(
        spooled = stream.spooled,
        last_event_id = stream.last_event_id,
        dropped = stream.dropped,
        "stopped; unacknowledged events stay in the spool for the next run"
    );
    monitored
}
