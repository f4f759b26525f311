//! Issue 6: restart in place with the libvirt backend. A real guest's qemu is SIGKILLed on
//! a host whose watchdog streams to a controller configured with `backend = "libvirt"`;
//! the controller's incident asks the watchdog to start the domain again. Measured from
//! the kill: the new qemu process exists (libvirt's pid file names a live new pid), the
//! controller closes the incident (the watchdog answered "started"), and the guest runs
//! again (its first disk write, `HB-IO` on its serial port).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use defib_tests::guests::{unique_uuid, Guest, GuestDisk, Hostbed};

use crate::controller::{ControllerProcess, Enrolled};
use crate::report::{self, Series};

const HOST: &str = "bench-rip";
/// Generous: these waits bound a failure, they are not what is measured.
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(2);

pub fn run(kills: usize) -> anyhow::Result<String> {
    anyhow::ensure!(kills > 0, "--kills must be at least 1");
    Hostbed::ensure().map_err(|e| {
        anyhow::anyhow!("this scenario needs the hostbed (`cargo xtask hostbed start`): {e}")
    })?;
    let began = Instant::now();
    // Every kill is a new failure: lift the restart budget (default 3 in 10 min).
    let ctl = ControllerProcess::start(
        None,
        Enrolled::Watchdogs(&[HOST]),
        "backend = \"libvirt\"\n[engine]\nmax_restarts_in_place = 1000000\n",
    )?;
    let wd = WatchdogProcess::start(&ctl, HOST)?;
    wait_for("the host Up at the controller", || {
        let hosts = ctl.get_json("/v1/hosts").ok()?;
        let list = hosts["hosts"].as_array().or(hosts.as_array())?.clone();
        list.iter()
            .any(|h| h["host"] == HOST && h["state"] == "Up")
            .then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}; watchdog log:\n{}", wd.log()))?;

    let uuid = unique_uuid();
    let guest = Guest::start("bench-rip", &uuid, GuestDisk::Plain);
    let subject = format!("vm:{uuid}");
    let (mut to_qemu, mut to_closed, mut to_guest) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..kills {
        // The controller knows the guest runs (libvirt inventory), and its last incident
        // (if any) is closed.
        wait_for("the VM Running at the controller", || {
            let vms = ctl.get_json("/v1/vms").ok()?;
            let list = vms["vms"].as_array().or(vms.as_array())?.clone();
            list.iter()
                .any(|v| v["resource"] == subject.as_str() && v["state"] == "Running")
                .then_some(())
        })?;
        let old_pid = qemu_pid(guest.name()).ok_or_else(|| anyhow::anyhow!("no qemu pid"))?;
        let serial_len = std::fs::metadata(guest.serial_log())
            .map(|m| m.len())
            .unwrap_or(0);
        let kill_unix_ms = unix_ms();
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let new_pid = wait_for("a new qemu", || {
            qemu_pid(guest.name())
                .filter(|p| *p != old_pid && Path::new(&format!("/proc/{p}")).exists())
        })?;
        let qemu_ms = t0.elapsed().as_secs_f64() * 1e3;
        wait_for("the guest's first disk write", || {
            wrote_since(guest.serial_log(), serial_len).then_some(())
        })?;
        let guest_ms = t0.elapsed().as_secs_f64() * 1e3;
        let closed_at_ms = wait_for("the incident closed", || {
            let list = ctl.get_json("/v1/incidents").ok()?;
            let ours: Vec<serde_json::Value> = list["incidents"]
                .as_array()?
                .iter()
                .filter(|inc| inc["subject"] == subject.as_str())
                .cloned()
                .collect();
            // The incident of this kill (one per kill).
            (ours.len() > i).then_some(())?;
            ours.last()?["closed_at_ms"].as_u64()
        })?;
        let closed_ms = closed_at_ms.saturating_sub(kill_unix_ms) as f64;
        eprintln!(
            "kill {}/{kills}: qemu {old_pid} → {new_pid} in {qemu_ms:.0} ms, incident closed \
             {closed_ms:.0} ms, guest writing again {guest_ms:.0} ms after the kill",
            i + 1
        );
        to_qemu.push(qemu_ms);
        to_closed.push(closed_ms);
        to_guest.push(guest_ms);
    }
    let incidents = ctl.get_json("/v1/incidents")?;
    let ours = incidents["incidents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["subject"] == subject.as_str())
                .count()
        })
        .unwrap_or(0);
    anyhow::ensure!(
        ours == kills,
        "{ours} incidents for {kills} kills: {incidents}"
    );
    drop(guest);
    drop(wd);
    drop(ctl);
    let wall = began.elapsed();

    let series = [
        Series {
            name: "kill() → new qemu process (libvirt pid file)".into(),
            samples_ms: to_qemu,
        },
        Series {
            name: "kill() → incident closed at the controller (domain started)".into(),
            samples_ms: to_closed,
        },
        Series {
            name: "kill() → guest's first disk write".into(),
            samples_ms: to_guest,
        },
    ];
    let notes = format!(
        "One KVM guest (boot sector, 16 MiB, plain raw disk) under the hostbed's libvirtd; one \
         defib-watchdog (`run`, libvirt enabled) streaming over loopback to a release \
         defib-controller with `backend = \"libvirt\"` (restart budget lifted so that every kill \
         is restarted). Each kill is a SIGKILL of the guest's qemu once the controller lists the \
         VM Running again; one incident per kill ({kills} incidents checked). The kernel's \
         account reaches the controller first, which sends `start_domain` to the watchdog; the \
         watchdog starts the domain as soon as libvirt reports it shut off. The incident's \
         close time is the controller's wall clock (ms resolution); the other two are polled \
         every {poll} ms by the bench. The guest's first write includes SeaBIOS booting the \
         boot sector. Whole run {wall:.0} s.",
        poll = POLL.as_millis(),
        wall = wall.as_secs_f64(),
    );
    report::write(
        &report::results_dir(),
        "restart-in-place",
        &format!("cargo xtask bench restart-in-place --kills {kills}"),
        &notes,
        &series,
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn qemu_pid(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// An `HB-IO` line written after the first `from` bytes of the serial log (libvirt may
/// also have truncated the log when it started the new qemu).
fn wrote_since(log: &Path, from: u64) -> bool {
    let bytes = std::fs::read(log).unwrap_or_default();
    let start = if (bytes.len() as u64) < from {
        0
    } else {
        from as usize
    };
    String::from_utf8_lossy(&bytes[start..]).contains("HB-IO")
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(POLL);
    }
}

/// `defib-watchdog run` on this host, streaming to the scenario's controller over
/// loopback, libvirt enabled. Stopped (SIGTERM, then reaped) on drop.
pub(crate) struct WatchdogProcess {
    child: Child,
    dir: PathBuf,
}

impl WatchdogProcess {
    /// Reports as host `host` (which `ctl` must enroll), with that host's own key.
    pub(crate) fn start(ctl: &ControllerProcess, host: &str) -> anyhow::Result<Self> {
        Self::start_with(ctl, host, "")
    }

    /// [`WatchdogProcess::start`] with more `[controller]` keys (`controller_keys`, e.g.
    /// `heartbeat_interval_ms = 50`).
    pub(crate) fn start_with(
        ctl: &ControllerProcess,
        host: &str,
        controller_keys: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with_probes(ctl, host, controller_keys, "")
    }

    /// [`WatchdogProcess::start_with`] with more `[probes]` keys (e.g.
    /// `stall_scan_interval_ms = 10`).
    pub(crate) fn start_with_probes(
        ctl: &ControllerProcess,
        host: &str,
        controller_keys: &str,
        probes_keys: &str,
    ) -> anyhow::Result<Self> {
        let bin = defib_tests::built_binary("defib-watchdog", "defib-watchdog");
        let dir = std::env::temp_dir().join(format!("defib-bench-rip-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state"))?;
        // The host's own key, as `defibctl hosts enroll --key-out` writes it (mode 0600).
        let key = dir.join("host.key");
        defib_tests::write_secret(&key, crate::controller::master().host_key_text(host))?;
        let cfg = format!(
            "[host]\nid = \"{host}\"\ncluster_id = \"{cluster}\"\nstate_dir = {state:?}\n\n\
             [controller]\nheartbeat_addrs = [\"{hb}\"]\nevent_addr = \"{ev}\"\nkey_file = {key:?}\n{controller_keys}\n\
             [libvirt]\nenabled = true\n\n\
             [probes]\n# Its own probes, not pinned: the machine's pin directory is not ours.\npin_dir = \"\"\n{probes_keys}\n",
            cluster = crate::controller::CLUSTER,
            state = dir.join("state").display().to_string(),
            hb = ctl.heartbeat,
            ev = ctl.events,
            key = key.display().to_string(),
        );
        std::fs::write(dir.join("watchdog.toml"), cfg)?;
        let log = std::fs::File::create(dir.join("watchdog.log"))?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(dir.join("watchdog.toml"))
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(WatchdogProcess { child, dir })
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("watchdog.log")).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for WatchdogProcess {
    fn drop(&mut self) {
        defib_tests::stop_child(&mut self.child, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wiring the hostbed scenarios (restart-in-place, watchdog-cost) share, without
    /// the hostbed: a real watchdog with its own host key, enrolled by the bench
    /// controller, learns the session and is Up. Needs root (the watchdog's probes):
    /// `cargo test -p defib-bench -- --ignored`.
    #[test]
    #[ignore = "needs root and BPF; starts a real watchdog and controller"]
    fn a_real_watchdog_with_its_own_key_is_up_at_the_bench_controller() {
        let ctl = ControllerProcess::start(None, Enrolled::Watchdogs(&[HOST]), "").unwrap();
        let wd = WatchdogProcess::start(&ctl, HOST).unwrap();
        let up = wait_for("the host Up at the controller", || {
            let hosts = ctl.get_json("/v1/hosts").ok()?;
            let list = hosts["hosts"].as_array().or(hosts.as_array())?.clone();
            list.iter()
                .any(|h| h["host"] == HOST && h["state"] == "Up")
                .then_some(())
        });
        assert!(up.is_ok(), "{up:?}; watchdog log:\n{}", wd.log());
        let m = ctl.metrics().unwrap();
        assert!(crate::controller::metric_sum(&m, "defib_heartbeats_accepted_total") > 0);
    }
}
