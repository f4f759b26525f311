//! The controller made the slow one on purpose: its process starved of CPU by a cgroup
//! quota while a flood of forged heartbeats fills its socket, with healthy simulated hosts
//! heartbeating all along. It must turn none of them Suspect (docs/scale.md), raise
//! `ControllerOverloaded`, and show its lag; with its allowance turned off
//! (`engine.max_overload_allowance_ms = 0`) the same run suspects healthy hosts.
use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use protocol::Key;

use crate::controller::{
    encode, host_id, metric_labelled, metric_sum, send_batch, ControllerProcess, Enrolled,
    PacedSenders,
};
use crate::report::{self, Series, Unit};

/// One overload run's settings.
#[derive(Debug, Clone)]
pub struct Overload {
    /// Healthy simulated hosts.
    pub hosts: usize,
    /// Each host's heartbeat period (50 ms: one host's two paths at the default 100 ms).
    pub interval: Duration,
    /// How long the controller is starved and flooded.
    pub seconds: u64,
    /// The controller's CPU quota while starved, in percent of one core.
    pub quota_pct: u64,
    /// Send forged heartbeats as fast as one thread can.
    pub flood: bool,
    /// Turn the controller's own-lag allowance off (the control run).
    pub allowance_off: bool,
}

/// What one overload run saw.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Hosts turned Suspect (each opens a host incident); every host was healthy.
    pub false_suspects: u64,
    /// `ControllerOverloaded` alarms raised.
    pub overloaded_alarms: u64,
    /// The largest `defib_controller_lag_seconds` sampled.
    pub max_lag_s: f64,
    /// Datagrams the kernel dropped at the heartbeat socket during the run.
    pub socket_drops: u64,
    /// Forged datagrams sent.
    pub flood_sent: u64,
    /// Heartbeats of the healthy hosts sent.
    pub heartbeats_sent: u64,
    /// Heartbeats accepted by the controller during the run.
    pub accepted: u64,
    /// Lag samples (ms), one per 200 ms.
    pub lag_samples_ms: Vec<f64>,
    /// The controller's CPU use while starved (cores).
    pub cpu_share: f64,
}

/// A cgroup the controller is moved into, with a CPU quota; the process is moved back
/// and the group removed on drop. cgroup v2 (`cpu.max`) where the cpu controller is on
/// the unified hierarchy, else v1 (`cpu.cfs_quota_us`).
struct CpuQuota {
    dir: PathBuf,
    root: PathBuf,
    pid: u32,
}

impl CpuQuota {
    fn apply(pid: u32, pct: u64) -> anyhow::Result<CpuQuota> {
        let period: u64 = 100_000;
        let quota = (period * pct / 100).max(1_000);
        let v2 = PathBuf::from("/sys/fs/cgroup");
        let (root, v2) = if v2.join("cgroup.controllers").exists()
            && std::fs::read_to_string(v2.join("cgroup.controllers"))?.contains("cpu")
        {
            (v2, true)
        } else {
            (PathBuf::from("/sys/fs/cgroup/cpu"), false)
        };
        anyhow::ensure!(
            root.exists(),
            "no cpu cgroup controller at {} (neither cgroup v2 with cpu nor v1 cpu)",
            root.display()
        );
        let dir = root.join(format!("defib-overload-{pid}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))?;
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", dir.display()))?;
        Ok(CpuQuota { dir, root, pid })
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Host incidents the controller opened (each one a host turned Suspect).
fn host_incidents(c: &ControllerProcess) -> anyhow::Result<u64> {
    let v = c.get_json("/v1/incidents")?;
    let list = v
        .get("incidents")
        .and_then(|l| l.as_array())
        .or_else(|| v.as_array())
        .context("no incident list")?;
    Ok(list
        .iter()
        .filter(|i| {
            i["subject"]
                .as_str()
                .is_some_and(|s| s.starts_with("host:"))
        })
        .count() as u64)
}

fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Forged heartbeats of the enrolled hosts (signed with a wrong key: each costs the
/// controller a MAC check before it is refused), sent as fast as one thread can.
fn flood(to: std::net::SocketAddr, hosts: usize, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let wrong = Key::new(b"not-the-host-key-0123456789abcdef").expect("a 32-byte key");
    let pool: Vec<Vec<u8>> = (0..256)
        .map(|k| {
            let mut out = Vec::new();
            encode(&wrong, &host_id(k % hosts), k % hosts, 1 << 40, 0, &mut out);
            out
        })
        .collect();
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0") else {
        return;
    };
    if sock.connect(to).is_err() {
        return;
    }
    let batch: Vec<&[u8]> = pool.iter().map(Vec::as_slice).collect();
    while !stop.load(Ordering::Relaxed) {
        for chunk in batch.chunks(64) {
            let n = send_batch(&sock, chunk);
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// One run: the hosts heartbeat, the controller is starved and flooded for `seconds`,
/// then given its CPU back; what it did meanwhile.
pub fn run_once(o: &Overload) -> anyhow::Result<Outcome> {
    let extra = if o.allowance_off {
        "[engine]\nmax_overload_allowance_ms = 0\n"
    } else {
        ""
    };
    let c = ControllerProcess::start(None, Enrolled::Simulated(o.hosts), extra)?;
    let senders = PacedSenders::start(c.heartbeat, o.hosts, o.interval)?;
    // Every host heard and Up before the trouble starts.
    let deadline = crate::monotonic_ns() + 20_000_000_000;
    loop {
        let m = c.metrics()?;
        if metric_labelled(&m, "defib_hosts{state=\"Up\"}") as usize == o.hosts {
            break;
        }
        anyhow::ensure!(
            crate::monotonic_ns() < deadline,
            "not every host Up within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    anyhow::ensure!(
        host_incidents(&c)? == 0,
        "a host was suspected before the overload"
    );
    let m0 = c.metrics()?;
    let (acc0, drops0, sent0) = (
        metric_sum(&m0, "defib_heartbeats_accepted_total"),
        c.socket_drops()?,
        senders.sent(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flood_sent = Arc::new(AtomicU64::new(0));
    let quota = CpuQuota::apply(c.pid(), o.quota_pct)?;
    let flooder = o.flood.then(|| {
        let (stop, sent, to, hosts) = (stop.clone(), flood_sent.clone(), c.heartbeat, o.hosts);
        std::thread::spawn(move || flood(to, hosts, stop, sent))
    });
    let cpu0 = c.cpu_seconds()?;
    let t0 = crate::monotonic_ns();
    let mut out = Outcome::default();
    while crate::monotonic_ns() < t0 + o.seconds * 1_000_000_000 {
        std::thread::sleep(Duration::from_millis(200));
        // The API answers slowly while starved; a sample that times out is skipped.
        if let Ok(m) = c.metrics() {
            let lag = gauge(&m, "defib_controller_lag_seconds");
            out.max_lag_s = out.max_lag_s.max(lag);
            out.lag_samples_ms.push(lag * 1_000.0);
        }
    }
    let secs = (crate::monotonic_ns() - t0) as f64 / 1e9;
    out.cpu_share = (c.cpu_seconds()? - cpu0) / secs;
    stop.store(true, Ordering::SeqCst);
    if let Some(f) = flooder {
        let _ = f.join();
    }
    drop(quota);
    // Its CPU back: it catches up, and whatever it decided meanwhile shows.
    std::thread::sleep(Duration::from_secs(2));
    let m = c.metrics()?;
    out.false_suspects = host_incidents(&c)?;
    if out.false_suspects > 0 {
        if let Ok(v) = c.get_json("/v1/incidents") {
            let list = v.get("incidents").cloned().unwrap_or(v);
            // Its timeline says why (the diagnosis of a failing run).
            if let Some(id) = list
                .as_array()
                .and_then(|l| l.first())
                .and_then(|i| i["id"].as_u64())
            {
                if let Ok(inc) = c.get_json(&format!("/v1/incidents/{id}")) {
                    eprintln!("first false suspect: {inc}");
                }
            }
        }
    }
    out.overloaded_alarms =
        metric_labelled(&m, "defib_alarms_total{kind=\"ControllerOverloaded\"}");
    out.socket_drops = c.socket_drops()? - drops0;
    out.accepted = metric_sum(&m, "defib_heartbeats_accepted_total") - acc0;
    out.heartbeats_sent = senders.sent() - sent0;
    out.flood_sent = flood_sent.load(Ordering::Relaxed);
    Ok(out)
}

/// `cargo xtask bench overload`: the run with the allowance and the control run without
/// it, reported side by side.
pub fn run(hosts: usize, seconds: u64, quota_pct: u64) -> anyhow::Result<String> {
    let mut o = Overload {
        hosts,
        interval: Duration::from_millis(50),
        seconds,
        quota_pct,
        flood: true,
        allowance_off: false,
    };
    let with = run_once(&o)?;
    eprintln!("with the allowance: {with:?}");
    o.allowance_off = true;
    let without = run_once(&o)?;
    eprintln!("without it: {without:?}");
    let notes = format!(
        "defib-controller (release) with {hosts} simulated hosts heartbeating every 50 ms \
         (two paths at the default 100 ms), all healthy; for {seconds} s its process is held \
         to {quota_pct} % of one core by a cgroup CPU quota while one thread floods its \
         heartbeat socket with forged heartbeats of those hosts. With the allowance (the \
         default): {} hosts turned Suspect, {} ControllerOverloaded alarms, lag up to {:.0} \
         ms, {} datagrams dropped by the kernel at its socket, {} of {} heartbeats accepted, \
         {} forged sent, {:.2} cores used. Without it (max_overload_allowance_ms = 0, the \
         control): {} hosts turned Suspect, lag up to {:.0} ms, {} socket drops. The series \
         are the lag sampled every 200 ms.",
        with.false_suspects,
        with.overloaded_alarms,
        with.max_lag_s * 1e3,
        with.socket_drops,
        with.accepted,
        with.heartbeats_sent,
        with.flood_sent,
        with.cpu_share,
        without.false_suspects,
        without.max_lag_s * 1e3,
        without.socket_drops,
    );
    report::write_in(
        &report::results_dir(),
        "overload",
        &format!(
            "cargo xtask bench overload --hosts {hosts} --seconds {seconds} --quota-pct {quota_pct}"
        ),
        &notes,
        Unit {
            symbol: "ms",
            axis: "controller lag (ms)",
        },
        &[
            Series {
                name: format!(
                    "lag with the allowance ({} false Suspect)",
                    with.false_suspects
                ),
                samples_ms: with.lag_samples_ms,
            },
            Series {
                name: format!("lag without it ({} false Suspect)", without.false_suspects),
                samples_ms: without.lag_samples_ms,
            },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use defib_tests::{is_root, require};

    fn settings(allowance_off: bool) -> Overload {
        Overload {
            hosts: 200,
            interval: Duration::from_millis(50),
            seconds: 12,
            quota_pct: 5,
            flood: true,
            allowance_off,
        }
    }

    #[test]
    fn a_controller_starved_of_cpu_and_flooded_suspects_no_healthy_host_and_would_without_its_allowance(
    ) {
        require!(is_root(), "root, to set a cgroup CPU quota");
        let out = run_once(&settings(false)).expect("the overload run");
        eprintln!("with the allowance: {out:?}");
        assert!(
            out.overloaded_alarms >= 1 && out.max_lag_s > 0.0,
            "the run did not overload the controller: {out:?}"
        );
        assert_eq!(out.false_suspects, 0, "{out:?}");
        // The assertion above can fail: the same run with the allowance off (one after
        // the other: two at once would starve each other's simulated hosts).
        let control = run_once(&settings(true)).expect("the control run");
        eprintln!("without it: {control:?}");
        assert!(control.false_suspects > 0, "{control:?}");
    }
}
