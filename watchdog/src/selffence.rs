//! Self-fencing (opt-in, `[self_fence]`): kill the watched qemus once isolated, and report
//! in every heartbeat whether that is armed, i.e. proven to work.
//!
//! For hosts without a BMC the controller could power off. The uplink judges
//! reachability from the controller's acks. The self-fence is *armed* only when it is
//! effective, checked again on every tick (qemus come and go):
//!
//! - a controller has acked this run at least once (a watchdog that starts while no
//!   controller answers must not kill VMs that no controller would restore);
//! - every watched qemu (`probes.watch_names`) may be signalled: `kill(pid, 0)` succeeds
//!   (a uid 0 daemon without CAP_KILL may not signal `libvirt-qemu`'s processes);
//! - with `watchdog_device`: the device runs with a timeout the driver took
//!   (`WDIOC_SETTIMEOUT`, read back with `WDIOC_GETTIMEOUT`) and that can be petted.
//!
//! Every heartbeat carries the result ([`protocol::SelfFence`]): armed with the timeout
//! the host keeps (the isolation timeout, or the device's if longer), or not armed and
//! why. The controller counts a silent host fenced only if its last heartbeat said armed,
//! once it has been silent for that timeout plus its own margin; a change is logged.
//!
//! Once isolated (no ack on any path for `controller.isolation_timeout_ms`) after having
//! been armed in this run, every watched qemu is SIGKILLed at once, and again on every
//! tick while the isolation lasts (a VM started meanwhile dies too). The device is
//! petted on every tick while the controller acks and no longer once isolated, so the
//! kernel resets the host even when this daemon hangs. A clean stop disarms it (magic
//! close) unless the driver was loaded with `nowayout`.
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use protocol::{NotArmed, SelfFence as Report};
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

/// Whether `pid` may be signalled; the seam the kill-permission check is tested through.
pub trait Signaller {
    /// `kill(pid, 0)`: Ok if a signal would be delivered.
    fn probe(&self, pid: u32) -> Result<(), Errno>;
}

/// The real one: `kill(2)` with no signal.
pub struct KillZero;

impl Signaller for KillZero {
    fn probe(&self, pid: u32) -> Result<(), Errno> {
        let raw = i32::try_from(pid).map_err(|_| Errno::ESRCH)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None)
    }
}

/// The first watched qemu (pid, owner uid) this daemon may not signal, as the reason it
/// is not armed. A qemu gone meanwhile (ESRCH) needs no killing.
pub fn check_kill_permission(
    qemus: &[(u32, u32)],
    signaller: &impl Signaller,
) -> Result<(), NotArmed> {
    for &(pid, uid) in qemus {
        match signaller.probe(pid) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(_) => return Err(NotArmed::CannotKill { pid, uid }),
        }
    }
    Ok(())
}

/// The watched qemus now: pid and owner uid (of `/proc/PID`, the process's euid).
pub fn watched_qemus(proc_root: &Path, patterns: &[NamePattern]) -> Vec<(u32, u32)> {
    crate::procfs::scan_matching(proc_root, patterns)
        .into_iter()
        .filter_map(|(pid, _)| {
            let uid = std::fs::metadata(proc_root.join(pid.to_string()))
                .ok()?
                .uid();
            Some((pid, uid))
        })
        .collect()
}

/// The two ioctls that set up a watchdog device; the seam its checks are tested through.
pub trait WatchdogTimeout {
    /// `WDIOC_SETTIMEOUT`: returns the timeout (s) the driver took.
    fn set_timeout(&mut self, secs: i32) -> std::io::Result<i32>;
    /// `WDIOC_GETTIMEOUT`: the timeout (s) in force.
    fn get_timeout(&mut self) -> std::io::Result<i32>;
}

/// Sets the device's timeout to the isolation timeout (whole seconds, rounded up) and
/// returns what the driver took, as read back. Refused: a failing ioctl, a read-back
/// that disagrees with what SETTIMEOUT returned, or a timeout shorter than two ticks
/// (petted once a tick, it would reset a healthy host).
pub fn set_device_timeout(
    device: &mut impl WatchdogTimeout,
    isolation_timeout: Duration,
    tick: Duration,
) -> Result<Duration, NotArmed> {
    let requested = i32::try_from(isolation_timeout.as_secs_f64().ceil() as u64)
        .unwrap_or(i32::MAX)
        .max(1);
    let errno = |e: std::io::Error| NotArmed::DeviceFailed {
        errno: e
            .raw_os_error()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    };
    let taken = device.set_timeout(requested).map_err(errno)?;
    let read_back = device.get_timeout().map_err(errno)?;
    let bad = NotArmed::DeviceTimeout {
        requested_s: u32::try_from(requested).unwrap_or(0),
        taken_s: u32::try_from(read_back).unwrap_or(0),
    };
    let secs = u64::try_from(read_back).map_err(|_| bad)?;
    if read_back != taken || Duration::from_secs(secs) < tick * 2 {
        return Err(bad);
    }
    Ok(Duration::from_secs(secs))
}

/// The heartbeat's self-fence report from this tick's facts: armed only when acked,
/// every watched qemu may be killed, and the device (if configured) took a timeout.
/// The timeout promised is the isolation timeout, or the device's if that is longer
/// (a hung daemon is reset only then).
pub fn decide(
    acked: bool,
    isolation_timeout: Duration,
    kill: Result<(), NotArmed>,
    device: Option<Result<Duration, NotArmed>>,
) -> Report {
    let device_timeout = match device {
        None => Ok(Duration::ZERO),
        Some(d) => d,
    };
    let promised = isolation_timeout.max(*device_timeout.as_ref().unwrap_or(&Duration::ZERO));
    let timeout_ms = u32::try_from(promised.as_millis()).unwrap_or(u32::MAX);
    let reason = if !acked {
        Some(NotArmed::AwaitingFirstAck)
    } else {
        kill.err().or(device_timeout.err())
    };
    match reason {
        None => Report::Armed { timeout_ms },
        Some(reason) => Report::NotArmed { timeout_ms, reason },
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

/// Publishes `report` for the heartbeats, and logs it when it changes.
fn publish(status: &watch::Sender<HostSummary>, report: Report) {
    let changed = status.send_if_modified(|s| {
        let changed = s.self_fence != report;
        s.self_fence = report;
        changed
    });
    if !changed {
        return;
    }
    match report {
        Report::Armed { timeout_ms } => {
            tracing::info!(timeout_ms, "self-fence armed");
        }
        Report::NotArmed { timeout_ms, reason } => {
            let (pid, uid) = match reason {
                NotArmed::CannotKill { pid, uid } => (Some(pid), Some(uid)),
                _ => (None, None),
            };
            tracing::warn!(
                timeout_ms,
                pid,
                uid,
                "self-fence not armed: {reason}; the controller will not count this host fenced by its silence"
            );
        }
        Report::Off => {}
    }
}

async fn run(
    settings: SelfFenceSettings,
    mut reachability: watch::Receiver<ReachabilityReport>,
    status: watch::Sender<HostSummary>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tick_every = settings.tick();
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked = false;
    // Once a heartbeat of this run said "armed", the controller may hold it as the last
    // one it heard and count this host fenced after its silence: from then on an
    // isolation kills, whatever the later checks say.
    let mut armed_once = false;
    let mut isolated_logged = false;
    let mut device: Option<WatchdogDevice> = None;
    let mut device_error: Option<NotArmed> = None;
    let mut device_timeout = Duration::ZERO;
    tracing::info!(
        isolation_timeout_ms = settings.isolation_timeout.as_millis() as u64,
        device = ?settings.device,
        "self-fence enabled; armed once a controller acks and every watched qemu may be killed"
    );
    publish(
        &status,
        decide(false, settings.isolation_timeout, Ok(()), None),
    );
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            changed = reachability.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        let state = reachability.borrow().state;
        if state == Reachability::Reachable && !acked {
            acked = true;
        }
        // The device is opened once acked (opening starts its countdown), and tried again
        // on later ticks if that failed, only while the controller acks: opened while
        // isolated, it would reset a host that was never armed.
        if state == Reachability::Reachable && device.is_none() {
            if let Some(path) = &settings.device {
                match WatchdogDevice::arm(path, settings.isolation_timeout, tick_every) {
                    Ok((d, took)) => {
                        device = Some(d);
                        device_timeout = took;
                        device_error = None;
                    }
                    Err(reason) => {
                        if device_error != Some(reason) {
                            tracing::error!(device = %path.display(), "cannot arm the watchdog device: {reason}");
                        }
                        device_error = Some(reason);
                    }
                }
            }
        }
        let qemus = watched_qemus(&settings.proc_root, &settings.patterns);
        let kill = check_kill_permission(&qemus, &KillZero);
        let device_check = settings.device.as_ref().map(|_| match device_error {
            Some(reason) => Err(reason),
            None => Ok(device_timeout),
        });
        let report = decide(acked, settings.isolation_timeout, kill, device_check);
        armed_once |= matches!(report, Report::Armed { .. });
        publish(&status, report);
        match state {
            Reachability::Reachable => {
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
            Reachability::Isolated if armed_once => {
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
            Reachability::Isolated => {
                if !isolated_logged {
                    tracing::warn!(
                        "self-fence: isolated, but never armed in this run: killing nothing (the controller does not count this host fenced)"
                    );
                    isolated_logged = true;
                }
            }
            Reachability::Unconfirmed => {}
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
/// `_IOR('W', 7, int)`: read the timeout in force.
const WDIOC_GETTIMEOUT: u64 = 0x8004_5707;

impl WatchdogTimeout for WatchdogDevice {
    fn set_timeout(&mut self, secs: i32) -> std::io::Result<i32> {
        let mut value: libc::c_int = secs;
        // SAFETY: WDIOC_SETTIMEOUT takes a pointer to one int, which outlives the call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut value) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(value)
    }

    fn get_timeout(&mut self) -> std::io::Result<i32> {
        let mut value: libc::c_int = 0;
        // SAFETY: WDIOC_GETTIMEOUT writes one int through the pointer, which outlives the
        // call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), WDIOC_GETTIMEOUT as _, &mut value) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(value)
    }
}

impl WatchdogDevice {
    /// Opens the device and sets its timeout; returns it with the timeout it took.
    fn arm(
        path: &Path,
        isolation_timeout: Duration,
        tick: Duration,
    ) -> Result<(WatchdogDevice, Duration), NotArmed> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| NotArmed::DeviceFailed {
                errno: e
                    .raw_os_error()
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0),
            })?;
        let mut d = WatchdogDevice { file };
        match set_device_timeout(&mut d, isolation_timeout, tick) {
            Ok(took) => {
                tracing::info!(device = %path.display(), timeout_s = took.as_secs(), "watchdog device armed");
                Ok((d, took))
            }
            Err(reason) => {
                // Opening armed it: close it the way that stops the countdown.
                d.disarm_in_place();
                Err(reason)
            }
        }
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

    fn settings(ms: u64) -> SelfFenceSettings {
        SelfFenceSettings {
            patterns: Vec::new(),
            isolation_timeout: Duration::from_millis(ms),
            device: None,
            proc_root: PathBuf::from("/proc"),
        }
    }

    #[test]
    fn the_tick_is_a_quarter_of_the_isolation_timeout_within_bounds() {
        assert_eq!(settings(3000).tick(), Duration::from_millis(750));
        assert_eq!(settings(100).tick(), Duration::from_millis(50));
        assert_eq!(settings(60_000).tick(), Duration::from_secs(1));
    }

    /// Answers `kill(pid, 0)` from a table: pids not in it may be signalled.
    struct FakeSignaller(Vec<(u32, Errno)>);

    impl Signaller for FakeSignaller {
        fn probe(&self, pid: u32) -> Result<(), Errno> {
            match self.0.iter().find(|(p, _)| *p == pid) {
                Some((_, e)) => Err(*e),
                None => Ok(()),
            }
        }
    }

    const T: Duration = Duration::from_millis(3000);

    #[test]
    fn a_qemu_this_daemon_may_not_signal_names_itself_as_the_reason_the_host_is_not_armed() {
        let qemus = [(100, 0), (200, 64055), (300, 64055)];
        let verdict = check_kill_permission(&qemus, &FakeSignaller(vec![(200, Errno::EPERM)]));
        assert_eq!(
            verdict,
            Err(NotArmed::CannotKill {
                pid: 200,
                uid: 64055
            })
        );
        let report = decide(true, T, verdict, None);
        assert_eq!(report.armed_timeout_ms(), None);
        assert_eq!(
            report.to_string(),
            "not armed: no permission to kill qemu pid 200 owned by uid 64055"
        );
    }

    #[test]
    fn a_qemu_gone_since_the_scan_needs_no_killing_and_does_not_disarm() {
        let qemus = [(100, 0), (200, 64055)];
        let signaller = FakeSignaller(vec![(200, Errno::ESRCH)]);
        assert_eq!(check_kill_permission(&qemus, &signaller), Ok(()));
    }

    #[test]
    fn acked_with_every_qemu_killable_and_no_device_is_armed_with_the_isolation_timeout() {
        let kill = check_kill_permission(&[(100, 64055)], &FakeSignaller(vec![]));
        assert_eq!(
            decide(true, T, kill, None),
            Report::Armed { timeout_ms: 3000 }
        );
    }

    #[test]
    fn a_watchdog_no_controller_has_acked_is_not_armed_even_if_it_could_kill() {
        assert_eq!(
            decide(false, T, Ok(()), None),
            Report::NotArmed {
                timeout_ms: 3000,
                reason: NotArmed::AwaitingFirstAck
            }
        );
    }

    /// A watchdog driver as the ioctls see it: what SETTIMEOUT takes and reports, what
    /// GETTIMEOUT reads back, or an errno. No device is opened.
    struct FakeDriver {
        takes: Result<i32, i32>,
        reads: Result<i32, i32>,
        asked: Option<i32>,
    }

    impl WatchdogTimeout for FakeDriver {
        fn set_timeout(&mut self, secs: i32) -> std::io::Result<i32> {
            self.asked = Some(secs);
            self.takes.map_err(std::io::Error::from_raw_os_error)
        }
        fn get_timeout(&mut self) -> std::io::Result<i32> {
            self.reads.map_err(std::io::Error::from_raw_os_error)
        }
    }

    fn driver(takes: Result<i32, i32>, reads: Result<i32, i32>) -> FakeDriver {
        FakeDriver {
            takes,
            reads,
            asked: None,
        }
    }

    const TICK: Duration = Duration::from_millis(750);

    #[test]
    fn the_device_is_asked_for_the_isolation_timeout_rounded_up_to_whole_seconds() {
        let mut d = driver(Ok(4), Ok(4));
        let took = set_device_timeout(&mut d, Duration::from_millis(3500), TICK);
        assert_eq!(d.asked, Some(4));
        assert_eq!(took, Ok(Duration::from_secs(4)));
    }

    #[test]
    fn a_device_whose_driver_took_a_longer_timeout_arms_the_host_with_that_longer_timeout() {
        let mut d = driver(Ok(5), Ok(5));
        let took = set_device_timeout(&mut d, T, TICK);
        assert_eq!(took, Ok(Duration::from_secs(5)));
        assert_eq!(
            decide(true, T, Ok(()), Some(took)),
            Report::Armed { timeout_ms: 5000 }
        );
    }

    #[test]
    fn a_device_whose_read_back_disagrees_with_what_it_said_it_took_is_not_armed() {
        let mut d = driver(Ok(3), Ok(60));
        let took = set_device_timeout(&mut d, T, TICK);
        assert_eq!(
            took,
            Err(NotArmed::DeviceTimeout {
                requested_s: 3,
                taken_s: 60
            })
        );
        let report = decide(true, T, Ok(()), Some(took));
        assert_eq!(report.armed_timeout_ms(), None);
    }

    #[test]
    fn a_device_timeout_too_short_to_be_petted_every_tick_is_not_armed() {
        // A driver that clamps to 1 s, while petting happens every 750 ms.
        let mut d = driver(Ok(1), Ok(1));
        assert_eq!(
            set_device_timeout(&mut d, T, TICK),
            Err(NotArmed::DeviceTimeout {
                requested_s: 3,
                taken_s: 1
            })
        );
    }

    #[test]
    fn a_failing_ioctl_leaves_the_host_not_armed_with_its_errno() {
        let mut d = driver(Err(libc::EINVAL), Ok(3));
        let took = set_device_timeout(&mut d, T, TICK);
        assert_eq!(
            took,
            Err(NotArmed::DeviceFailed {
                errno: libc::EINVAL as u32
            })
        );
        let mut d = driver(Ok(3), Err(libc::ENOTTY));
        assert_eq!(
            set_device_timeout(&mut d, T, TICK),
            Err(NotArmed::DeviceFailed {
                errno: libc::ENOTTY as u32
            })
        );
    }

    #[test]
    fn a_kill_permission_failure_is_reported_before_a_device_failure() {
        let report = decide(
            true,
            T,
            Err(NotArmed::CannotKill { pid: 1, uid: 2 }),
            Some(Err(NotArmed::DeviceFailed { errno: 5 })),
        );
        assert_eq!(
            report,
            Report::NotArmed {
                timeout_ms: 3000,
                reason: NotArmed::CannotKill { pid: 1, uid: 2 }
            }
        );
    }

    #[test]
    fn a_regular_file_is_not_a_watchdog_device() {
        // The only path through the real ioctls here: this machine has no watchdog
        // device, and a regular file refuses them (ENOTTY).
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-a-watchdog");
        std::fs::write(&p, "").unwrap();
        let err = WatchdogDevice::arm(&p, T, TICK).err();
        assert_eq!(
            err,
            Some(NotArmed::DeviceFailed {
                errno: libc::ENOTTY as u32
            })
        );
    }

    #[test]
    fn this_process_may_signal_itself_and_a_missing_pid_counts_as_gone() {
        let me = std::process::id();
        assert_eq!(KillZero.probe(me), Ok(()));
        // Above pid_max (at most 2^22): no such process.
        assert_eq!(KillZero.probe(1 << 23), Err(Errno::ESRCH));
        assert_eq!(
            check_kill_permission(&[(me, 0), (1 << 23, 0)], &KillZero),
            Ok(())
        );
    }

    #[test]
    fn a_watched_process_is_listed_with_its_owner_uid() {
        let me = std::process::id();
        let comm = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        let pattern = NamePattern::parse(comm.trim());
        let found = watched_qemus(Path::new("/proc"), &[pattern]);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        assert!(found.contains(&(me, uid)), "{found:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_reports_awaiting_the_first_ack_then_armed_with_its_timeout_once_acked() {
        let proc_root = tempfile::tempdir().unwrap();
        let (reach_tx, reach_rx) = watch::channel(ReachabilityReport {
            state: Reachability::Unconfirmed,
            since_mono_ns: 0,
            last_acked_send_mono_ns: None,
            last_acked_send_mono_ns_by_path: vec![None],
        });
        let (status_tx, mut status_rx) = watch::channel(HostSummary::default());
        let task = SelfFence::start(
            SelfFenceSettings {
                proc_root: proc_root.path().to_path_buf(),
                ..settings(3000)
            },
            reach_rx,
            status_tx,
        );
        status_rx.changed().await.unwrap();
        assert_eq!(
            status_rx.borrow_and_update().self_fence,
            Report::NotArmed {
                timeout_ms: 3000,
                reason: NotArmed::AwaitingFirstAck
            }
        );
        reach_tx.send_modify(|r| r.state = Reachability::Reachable);
        status_rx.changed().await.unwrap();
        assert_eq!(
            status_rx.borrow().self_fence,
            Report::Armed { timeout_ms: 3000 }
        );
        task.stop().await;
    }
}
