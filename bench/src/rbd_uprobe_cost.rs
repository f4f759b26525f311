//! Issue 24: what the librbd uprobes cost a qemu doing RBD I/O. `qemu-img bench` drives
//! qemu's own rbd block driver (the same `rbd_aio_writev`/`rbd_aio_release` calls a VM's
//! disk makes) against an image of the Ceph test bed: 4 KiB writes, 16 in flight,
//! `cache=none`. Each round runs it once with no watchdog (no uprobe on librbd), then
//! once under `defib-watchdog events` watching `qemu-img` (every request then runs two
//! uprobes, its submission and its release, and lands in the in-flight map). With the
//! kernel's BPF statistics on, the watchdog's rbd programs' run time per run is read
//! from its program fds; the trap into the kernel a uprobe costs is not in that figure,
//! only in the difference between the two runs' time per request.
use std::process::Command;
use std::time::{Duration, Instant};

use defib_tests::cephbed::Cephbed;
use defib_tests::Watchdog;

use crate::report::{self, Series, Unit};

const MICROSECONDS: Unit = Unit {
    symbol: "µs",
    axis: "time (µs)",
};

/// Runs `qemu-img bench` writing `requests` 4 KiB blocks to `filename`; its wall time.
fn qemu_img_bench(filename: &str, requests: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new("qemu-img")
        .args([
            "bench", "-f", "raw", "-w", "-t", "none", "-d", "16", "-s", "4096",
        ])
        .args(["-c", &requests.to_string(), filename])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-img bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(started.elapsed())
}

/// The rbd programs' summed (run time ns, runs) in the process `pid`.
fn rbd_prog_runs(pid: u32) -> (u64, u64) {
    let stats = crate::watchdog_cost::prog_stats(pid);
    let names = crate::watchdog_cost::prog_names(stats.keys().copied());
    stats
        .iter()
        .filter(|(id, _)| names.get(id).is_some_and(|n| n.starts_with("rbd_")))
        .fold((0, 0), |(t, n), (_, (dt, dn))| (t + dt, n + dn))
}

pub fn run(rounds: usize, requests: usize) -> anyhow::Result<String> {
    anyhow::ensure!(
        rounds > 0 && requests > 0,
        "--rounds and --requests must be > 0"
    );
    let ceph = Cephbed::ensure().map_err(|e| {
        anyhow::anyhow!("this scenario needs the Ceph test bed (`cargo xtask cephbed start`): {e}")
    })?;
    let image = ceph.import("bench-uprobe", &[0u8; 512], 256 << 20);
    let filename = format!(
        "rbd:{}:id=cinder:conf={}",
        image.spec,
        ceph.conf().display()
    );
    let _stats = crate::watchdog_cost::BpfStats::enable()?;
    // Warm up the image (first writes allocate its objects).
    qemu_img_bench(&filename, requests)?;
    let per_request_us = |d: Duration| d.as_secs_f64() * 1e6 / requests as f64;
    let (mut without, mut with, mut prog_ns) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        without.push(per_request_us(qemu_img_bench(&filename, requests)?));
        let wd = Watchdog::start(&["--watch-name", "qemu-img"]);
        let before = rbd_prog_runs(wd.pid());
        let took = qemu_img_bench(&filename, requests)?;
        let after = rbd_prog_runs(wd.pid());
        with.push(per_request_us(took));
        let (dt, dn) = (after.0 - before.0, after.1 - before.1);
        anyhow::ensure!(
            dn >= requests as u64,
            "the rbd uprobes ran {dn} times for {requests} requests: not attached?\n{}",
            wd.stderr_text()
        );
        prog_ns.push(dt as f64 / dn as f64 / 1000.0);
        eprintln!(
            "round {round}: {:.1} µs/request without, {:.1} with; {dn} uprobe runs, {:.0} ns each",
            without[round],
            with[round],
            dt as f64 / dn as f64
        );
    }
    report::write_in(
        &report::results_dir(),
        "rbd-uprobe-cost",
        &format!("cargo xtask bench rbd-uprobe-cost --rounds {rounds} --requests {requests}"),
        "qemu-img bench (qemu's rbd driver: rbd_aio_writev, rbd_aio_release) writing 4 KiB \
         blocks, 16 in flight, cache=none, to an RBD image of the single-OSD Ceph test bed: \
         wall time per request without a watchdog, then with `defib-watchdog events` watching \
         qemu-img (two uprobes per request, each putting or taking an in-flight map entry), \
         alternating, one pair per round; and the rbd programs' own run time per run from \
         the kernel's BPF statistics (the uprobe's trap is not in it). With 16 in flight, \
         time per request is the inverse of the IOPS, not one request's latency.",
        MICROSECONDS,
        &[
            Series {
                name: "time per request, no uprobes".into(),
                samples_ms: without,
            },
            Series {
                name: "time per request, librbd uprobes (watched)".into(),
                samples_ms: with,
            },
            Series {
                name: "rbd probe programs' run time per run".into(),
                samples_ms: prog_ns,
            },
        ],
    )
}
