//! Memory per tracked host: the release controller's resident set idle, then with N
//! simulated watchdogs heartbeating every 100 ms.
use std::time::Duration;

use crate::controller::{metric_labelled, ControllerProcess, Enrolled, PacedSenders};
use crate::report::{self, Series, Unit};

const INTERVAL: Duration = Duration::from_millis(100);

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub fn run(counts: &[usize], seconds: u64) -> anyhow::Result<String> {
    anyhow::ensure!(
        seconds >= 4,
        "--seconds must be at least 4 (3 s of warm-up)"
    );
    let mut series = Vec::new();
    let mut lines = Vec::new();
    for &n in counts {
        let c = ControllerProcess::start(None, Enrolled::Simulated(n), "")?;
        std::thread::sleep(Duration::from_secs(1));
        let idle = c.rss_bytes()?;
        let senders = PacedSenders::start(c.heartbeat, n, INTERVAL)?;
        let mut per_host = Vec::new();
        let mut rss = 0;
        for s in 1..=seconds {
            std::thread::sleep(Duration::from_secs(1));
            // The first seconds: every host registered, the store and snapshots settled.
            if s > 3 {
                rss = c.rss_bytes()?;
                per_host.push(rss.saturating_sub(idle) as f64 / n as f64);
            }
        }
        let m = c.metrics()?;
        let up = metric_labelled(&m, "defib_hosts{state=\"Up\"}");
        let sent = senders.sent();
        drop(senders);
        drop(c);
        eprintln!(
            "{n} hosts: idle {:.1} MiB, loaded {:.1} MiB, {up} Up",
            mib(idle),
            mib(rss)
        );
        lines.push(format!(
            "{n} hosts: RSS idle {:.1} MiB, with the hosts {:.1} MiB at the end ({up} of them \
             Up, {sent} heartbeats sent)",
            mib(idle),
            mib(rss)
        ));
        series.push(Series {
            name: format!("{n} hosts: (RSS − idle RSS) / hosts, sampled each second"),
            samples_ms: per_host,
        });
    }
    let list = counts
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    report::write_in(
        &report::results_dir(),
        "host-memory",
        &format!("cargo xtask bench host-memory --hosts {list} --seconds {seconds}"),
        &format!(
            "A fresh defib-controller (release binary, child process) per host count, every \
             host enrolled by its config (so the idle RSS already holds each host's derived \
             key); VmRSS from /proc/<pid>/status after 1 s idle, then each second from the 4th to the \
             {seconds}th of the hosts heartbeating every 100 ms (each signing with its own key \
             and echoing the controller's session). {}.",
            lines.join("; ")
        ),
        Unit {
            symbol: "bytes",
            axis: "bytes per tracked host",
        },
        &series,
    )
}
