//! Self-fencing (opt-in, `[self_fence]`), for hosts without a BMC the controller could
//! power off.
//!
//! The uplink judges reachability from the controller's acks. Once this run has been
//! acked at least once, self-fencing is *armed*: every heartbeat says so, and the
//! controller may then count this host fenced when it has been silent for the isolation
//! timeout plus a margin. From then on:
//!
//! - isolated (no ack on any path for `controller.isolation_timeout_ms`): every process
//!   whose name the probes watch (`probes.watch_names`: the qemus) is SIGKILLed at once,
//!   and again on every tick while the isolation lasts (a VM started meanwhile dies too);
//! - with `watchdog_device`: the device's timeout is set to the isolation timeout, it is
//!   petted on every tick while the controller acks, and no longer once isolated, so the
//!   kernel resets the host even when this daemon hangs. A clean stop disarms it
//!   (magic close) unless the driver was loaded with `nowayout`.
//!
//! Not armed before the first ack: a watchdog that starts while no controller answers
//! must not kill VMs that no controller would restore.
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use watchdog_common::NamePattern;

use crate::uplink::{HostSummary, Reachability, ReachabilityReport};

/// What the self-fence task needs.
#[derive(Debug, Clone)]
pub struct SelfFenceSettings {
    /// The processes to kill: the probes' watch patterns.
    pub patterns: Vec<NamePattern>,
    /// `controller.isolation_timeout_ms`.
    pub isolation_timeout: Duration,
    /// `self_fence.watchdog_device`.
    pub device: Option<PathBuf>,
    /// Where processes are listed (`/proc`).
    pub proc_root: PathBuf,
}

impl SelfFenceSettings {
    /// Tick: a quarter of the isolation timeout, 50 ms to 1 s.
    pub fn tick(&self) -> Duration {
        (self.isolation_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// The running task.
pub struct SelfFence {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SelfFence {
    pub fn start(
        settings: SelfFenceSettings,
        reachability: watch::Receiver<ReachabilityReport>,
        status: watch::Sender<HostSummary>,
    ) -> SelfFence {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(settings, reachability, status, shutdown_rx));
        SelfFence { shutdown, task }
    }

    /// Stops the task; a watchdog device is disarmed (magic close).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

async fn run(
    settings: SelfFenceSettings,
    mut reachability: watch::Receiver<ReachabilityReport>,
    status: watch::Sender<HostSummary>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(settings.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut armed = false;
    let mut isolated_logged = false;
    let mut device: Option<WatchdogDevice> = None;
    tracing::info!(
        isolation_timeout_ms = settings.isolation_timeout.as_millis() as u64,
        device = ?settings.device,
        "self-fence enabled; armed after the controller's first ack"
    );
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = reachability.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        let state = reachability.borrow().state;
        match state {
            Reachability::Reachable => {
                if !armed {
                    armed = true;
                    if let Some(path) = &settings.device {
                        match WatchdogDevice::arm(path, settings.isolation_timeout) {
                            Ok(d) => device = Some(d),
                            Err(e) => tracing::error!(
                                device = %path.display(), error = %e,
                                "cannot arm the watchdog device; self-fence kills the VMs but cannot reset a hung host"
                            ),
                        }
                    }
                    status.send_modify(|s| s.self_fence_armed = true);
                    tracing::info!("self-fence armed");
                }
                if isolated_logged {
                    tracing::info!("self-fence: the controller acks again");
                    isolated_logged = false;
                }
                if let Some(d) = &mut device {
                    if let Err(e) = d.pet() {
                        tracing::error!(error = %e, "cannot pet the watchdog device");
                    }
                }
            }
            Reachability::Isolated if armed => {
                if !isolated_logged {
                    tracing::warn!(
                        petting = false,
                        "self-fence: isolated; killing every watched qemu"
                    );
                    isolated_logged = true;
                }
                let killed = kill_watched(&settings.proc_root, &settings.patterns);
                if !killed.is_empty() {
                    tracing::warn!(?killed, "self-fence: SIGKILLed");
                }
            }
            _ => {}
        }
    }
    if let Some(d) = device {
        d.disarm();
    }
}

/// SIGKILLs every live process whose comm matches; returns their pids.
pub fn kill_watched(proc_root: &Path, patterns: &[NamePattern]) -> Vec<u32> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    crate::procfs::scan_matching(proc_root, patterns)
        .into_iter()
        .filter_map(|(pid, _)| {
            let raw = i32::try_from(pid).ok()?;
            match kill(Pid::from_raw(raw), Signal::SIGKILL) {
                Ok(()) => Some(pid),
                Err(e) => {
                    tracing::error!(pid, error = %e, "self-fence: cannot kill");
                    None
                }
            }
        })
        .collect()
}

/// An open Linux watchdog device (`/dev/watchdog`): opening it starts the countdown.
struct WatchdogDevice {
    file: File,
}

/// `_IOWR('W', 6, int)`: set the timeout in seconds (the driver writes back the value
/// it took).
const WDIOC_SETTIMEOUT: u64 = 0xC004_5706;

impl WatchdogDevice {
    fn arm(path: &Path, timeout: Duration) -> std::io::Result<WatchdogDevice> {
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        let mut secs: libc::c_int = i32::try_from(timeout.as_secs_f64().ceil() as u64)
            .unwrap_or(i32::MAX)
            .max(1);
        // SAFETY: WDIOC_SETTIMEOUT takes a pointer to one int, which outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut secs) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // Leave the device as the driver wants it closed; it was armed by open.
            let mut d = WatchdogDevice { file };
            d.disarm_in_place();
            return Err(e);
        }
        tracing::info!(device = %path.display(), timeout_s = secs, "watchdog device armed");
        Ok(WatchdogDevice { file })
    }

    fn pet(&mut self) -> std::io::Result<()> {
        self.file.write_all(b"\0")
    }

    fn disarm_in_place(&mut self) {
        // The magic close: 'V' just before close stops the countdown (unless nowayout).
        let _ = self.file.write_all(b"V");
    }

    fn disarm(mut self) {
        self.disarm_in_place();
        tracing::info!("watchdog device disarmed (magic close)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_a_quarter_of_the_isolation_timeout_within_bounds() {
        let s = |ms| SelfFenceSettings {
            patterns: Vec::new(),
            isolation_timeout: Duration::from_millis(ms),
            device: None,
            proc_root: PathBuf::from("/proc"),
        };
        assert_eq!(s(3000).tick(), Duration::from_millis(750));
        assert_eq!(s(100).tick(), Duration::from_millis(50));
        assert_eq!(s(60_000).tick(), Duration::from_secs(1));
    }

    #[test]
    fn a_regular_file_is_not_a_watchdog_device() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-a-watchdog");
        std::fs::write(&p, "").unwrap();
        assert!(WatchdogDevice::arm(&p, Duration::from_secs(3)).is_err());
    }
}
