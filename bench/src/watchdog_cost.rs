//! Issue 7: what the watchdog costs a hypervisor. N real guests (the boot-sector KVM
//! guests: a disk write and a serial line every second each) run under the hostbed's
//! libvirtd, watched by one `defib-watchdog run` (libvirt enabled) that streams to a
//! release controller over loopback. With the kernel's BPF statistics on
//! (`kernel.bpf_stats_enabled`, put back as it was afterwards), every second the bench
//! reads the daemon's CPU time (/proc/PID/stat utime+stime) and each of its probe
//! programs' `run_time_ns`/`run_cnt` (/proc/PID/fdinfo of its BPF program fds; the
//! programs' names from the kernel's program info). The hostbed's libvirtd is measured the
//! same way beside it, as the alternative that already runs on every KVM host.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use defib_tests::guests::{unique_uuid, Guest, GuestDisk, Hostbed};

use crate::controller::{ControllerProcess, Enrolled};
use crate::report::{self, Series, Unit};
use crate::restart_in_place::WatchdogProcess;

const HOST: &str = "bench-cost";
const WAIT: Duration = Duration::from_secs(120);
/// Guests started at once (each start waits for the guest's first disk write).
const PARALLEL_STARTS: usize = 2;

/// `kernel.bpf_stats_enabled` on while this lives, then as it was.
pub(crate) struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(crate) fn enable() -> anyhow::Result<BpfStats> {
        let before = std::fs::read_to_string(BPF_STATS)?.trim().to_string();
        std::fs::write(BPF_STATS, "1")?;
        Ok(BpfStats { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.before) {
            eprintln!("could not put {BPF_STATS} back to {}: {e}", self.before);
        }
    }
}

/// user+system CPU time of a process, in ns.
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("odd /proc/{pid}/stat"))?;
    // Fields after the command: state is field 3, utime 14, stime 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / hz)
}

/// Per BPF program the process holds: id → (run_time_ns, run_cnt), from its fdinfo.
pub(crate) fn prog_stats(pid: u32) -> BTreeMap<u32, (u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for fd in fds.filter_map(Result::ok) {
        let is_prog = std::fs::read_link(fd.path())
            .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
        };
        if let (Some(id), Some(t), Some(n)) =
            (field("prog_id"), field("run_time_ns"), field("run_cnt"))
        {
            out.insert(id as u32, (t, n));
        }
    }
    out
}

/// The kernel's names of the programs with these ids.
pub(crate) fn prog_names(ids: impl Iterator<Item = u32>) -> BTreeMap<u32, String> {
    let wanted: Vec<u32> = ids.collect();
    let mut names = BTreeMap::new();
    for info in aya::programs::loaded_programs().filter_map(Result::ok) {
        if wanted.contains(&info.id()) {
            names.insert(info.id(), info.name_as_str().unwrap_or("?").to_string());
        }
    }
    names
}

fn start_guests(n: usize, io: &'static str) -> Vec<Guest> {
    let mut guests = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(PARALLEL_STARTS) {
        let started: Vec<Guest> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|i| {
                    s.spawn(move || {
                        // A guest that boots too slowly on a loaded machine (its first
                        // disk write within 30 s) is removed and started again.
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            let start = || {
                                Guest::start(
                                    &format!("bench-cost-{i}"),
                                    &unique_uuid(),
                                    GuestDisk::PlainIo(io),
                                )
                            };
                            match std::panic::catch_unwind(start) {
                                Ok(g) => break g,
                                Err(e) if tries >= 3 => std::panic::resume_unwind(e),
                                Err(_) => eprintln!("guest {i}: starting again"),
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a guest did not start"))
                .collect()
        });
        guests.extend(started);
        eprintln!("{} of {n} guests running", guests.len());
    }
    guests
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `io`: the guests' disk I/O engine (`threads`, `native`, `io_uring`); `scan_ms`: the
/// watchdog's `probes.stall_scan_interval_ms`.
pub fn run(
    guests: usize,
    seconds: u64,
    interval_ms: u64,
    io: &str,
    scan_ms: u64,
) -> anyhow::Result<String> {
    let io: &'static str = match io {
        "threads" => "threads",
        "native" => "native",
        "io_uring" => "io_uring",
        other => anyhow::bail!("--io {other}: threads, native or io_uring"),
    };
    anyhow::ensure!(
        guests > 0 && seconds > 0,
        "--guests and --seconds must be > 0"
    );
    Hostbed::ensure().map_err(|e| {
        anyhow::anyhow!("this scenario needs the hostbed (`cargo xtask hostbed start`): {e}")
    })?;
    let libvirtd = defib_tests::guests::hostbed_libvirtd()
        .ok()
        .and_then(|(_, child)| child)
        .map(|p| p as u32);
    let ctl = ControllerProcess::start(
        None,
        Enrolled::Watchdogs(&[HOST]),
        &format!("backend = \"libvirt\"\n[detector]\nheartbeat_interval_ms = {interval_ms}\n"),
    )?;
    let wd = WatchdogProcess::start_with_probes(
        &ctl,
        HOST,
        &format!("heartbeat_interval_ms = {interval_ms}\n"),
        &format!("stall_scan_interval_ms = {scan_ms}\n"),
    )?;
    let vms = start_guests(guests, io);
    // Every guest known to the controller as Running through this watchdog.
    wait_for("every guest Running at the controller", || {
        let list = ctl.get_json("/v1/vms").ok()?;
        let running = list["vms"]
            .as_array()?
            .iter()
            .filter(|v| v["host"] == HOST && v["state"] == "Running")
            .count();
        (running >= guests).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}; watchdog log:\n{}", wd.log()))?;
    // Let the starts' bursts (libvirt events, inventories, definitions) pass.
    std::thread::sleep(Duration::from_secs(5));

    let stats = BpfStats::enable()?;
    let pid = wd.pid();
    let ids: Vec<u32> = prog_stats(pid).keys().copied().collect();
    anyhow::ensure!(
        !ids.is_empty(),
        "no BPF program fds in /proc/{pid}/fd: {}",
        wd.log()
    );
    let names = prog_names(ids.iter().copied());
    let ns_per_s = |d_ns: u64, dt: Duration| d_ns as f64 / dt.as_secs_f64() / 1e3; // µs per s
    let (mut daemon, mut probes_all, mut libvirt) = (Vec::new(), Vec::new(), Vec::new());
    let first_progs = prog_stats(pid);
    let first_cpu = cpu_ns(pid)?;
    let (mut last_t, mut last_cpu, mut last_progs) =
        (Instant::now(), first_cpu, first_progs.clone());
    let mut last_lv = libvirtd.and_then(|p| cpu_ns(p).ok());
    let began = Instant::now();
    let lv_first = last_lv;
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        let (t, cpu, progs) = (Instant::now(), cpu_ns(pid)?, prog_stats(pid));
        let dt = t - last_t;
        daemon.push(ns_per_s(cpu.saturating_sub(last_cpu), dt));
        let mut all = 0;
        for (id, (rt, _)) in &progs {
            let d = rt.saturating_sub(last_progs.get(id).map_or(0, |x| x.0));
            all += d;
        }
        probes_all.push(ns_per_s(all, dt));
        if let (Some(p), Some(l)) = (libvirtd, last_lv) {
            if let Ok(c) = cpu_ns(p) {
                libvirt.push(ns_per_s(c.saturating_sub(l), dt));
                last_lv = Some(c);
            }
        }
        (last_t, last_cpu, last_progs) = (t, cpu, progs);
    }
    let period = began.elapsed().as_secs_f64();
    drop(stats);
    let running_guests = vms.len();
    drop(vms);
    drop(wd);
    drop(ctl);

    let pct = |us_per_s: f64| us_per_s / 10_000.0;
    let mut series = vec![
        Series {
            name: "defib-watchdog (user + system CPU), each second".into(),
            samples_ms: daemon.clone(),
        },
        Series {
            name: "all its probes (kernel BPF run time), each second".into(),
            samples_ms: probes_all.clone(),
        },
    ];
    if !libvirt.is_empty() {
        series.push(Series {
            name: "libvirtd beside it (user + system CPU), each second".into(),
            samples_ms: libvirt.clone(),
        });
    }
    // The per-program table over the whole period.
    let mut rows = Vec::new();
    for (id, (rt_end, cnt_end)) in &last_progs {
        let (rt0, cnt0) = first_progs.get(id).copied().unwrap_or((0, 0));
        let (rt, cnt) = (rt_end.saturating_sub(rt0), cnt_end.saturating_sub(cnt0));
        let name = names.get(id).cloned().unwrap_or_else(|| format!("id {id}"));
        rows.push((name, cnt, rt));
    }
    rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let mut table = String::from(
        "\n| probe program | runs/s | mean ns per run | % of one core |\n|---|---:|---:|---:|\n",
    );
    for (name, cnt, rt) in &rows {
        table.push_str(&format!(
            "| `{name}` | {:.0} | {:.0} | {:.4} |\n",
            *cnt as f64 / period,
            if *cnt > 0 {
                *rt as f64 / *cnt as f64
            } else {
                0.0
            },
            *rt as f64 / period / 1e9 * 100.0
        ));
    }
    let probe_total: u64 = rows.iter().map(|r| r.2).sum();
    let lv_total = match (lv_first, last_lv) {
        (Some(a), Some(b)) => format!(
            "; libvirtd {:.3} %",
            b.saturating_sub(a) as f64 / period / 1e9 * 100.0
        ),
        _ => String::new(),
    };
    let summary = format!(
        "Over the whole {period:.0} s with {running_guests} guests: defib-watchdog {:.3} % of one \
         core (p50 of the seconds {:.3} %, max {:.3} %), its {} probe programs {:.3} % together \
         (in the kernel, on whichever core the traced task ran; not part of the daemon's \
         figure){lv_total}.",
        last_cpu.saturating_sub(first_cpu) as f64 / period / 1e9 * 100.0,
        pct(report::percentile(&sorted(&daemon), 50.0)),
        pct(daemon.iter().copied().fold(0.0, f64::max)),
        rows.len(),
        probe_total as f64 / period / 1e9 * 100.0,
    );
    eprintln!("{summary}");
    let notes = format!(
        "{summary} {guests} boot-sector KVM guests (16 MiB, 1 vCPU, plain raw disk with io='{io}'; \
         one disk write and one serial line a second each) under the hostbed's libvirtd; one \
         defib-watchdog `run` (release build, libvirt enabled, unpinned probes) heartbeating \
         every {interval_ms} ms, scanning its in-flight maps every {scan_ms} ms, and streaming to a release defib-controller over loopback. Sampled every \
         second for {seconds} s after every guest was Running at the controller and 5 s more. \
         CPU is µs of CPU time per second of wall time (10 000 µs/s = 1 % of one core): the \
         daemon's and libvirtd's from /proc/PID/stat (utime+stime, 10 ms ticks, so single \
         seconds are coarse), the probes' from the kernel's BPF statistics \
         (kernel.bpf_stats_enabled = 1 during the run, then put back; /proc/PID/fdinfo of \
         the daemon's program fds: run_time_ns, run_cnt). The probes run for every task on \
         the machine that hits their tracepoints (the I/O probes on every pread/pwrite/preadv/\
         pwritev (and -v2), fsync, fdatasync, io_submit and fallocate of any process, the block \
         probes on every block request's issue and completion (a map lookup unless its device \
         is a VM's), the io_uring probes on every io_uring submission and completion, the exit \
         probe on every process exit), so their cost follows the whole machine's activity, \
         not only the guests'. Per program over the whole period:\n{table}",
    );
    let md = report::write_in(
        &report::results_dir(),
        &match (interval_ms, io, scan_ms) {
            (100, "threads", 50) => "watchdog-cost".to_string(),
            (_, "threads", 50) => format!("watchdog-cost-{interval_ms}ms"),
            (_, _, 50) => format!("watchdog-cost-{interval_ms}ms-{io}"),
            _ => format!("watchdog-cost-{interval_ms}ms-{io}-scan-{scan_ms}ms"),
        },
        &format!(
            "cargo xtask bench watchdog-cost --guests {guests} --seconds {seconds} --interval-ms {interval_ms} --io {io} --scan-interval-ms {scan_ms}"
        ),
        &notes,
        Unit {
            symbol: "µs CPU/s",
            axis: "CPU time per second of wall time (µs; 10 000 = 1 % of a core)",
        },
        &series,
    )?;
    Ok(md)
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s
}
