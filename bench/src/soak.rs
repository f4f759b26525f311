//! A long run of the real controller with many simulated hosts: its CPU (the whole
//! process and the engine task), memory and lag every second, and every host it turned
//! Suspect. With `--churn`, hosts join late, leave for seconds and come back (true
//! suspicions), restart their watchdog (a gap shorter than the deadline) and lose every
//! other heartbeat for a while (one of two paths flapping): every suspicion of a host that
//! was not away is a false positive.
use std::collections::BTreeMap;
use std::time::Duration;

use crate::controller::{
    host_id, metric_labelled, metric_sum, unix_ns, ControllerProcess, Enrolled, PacedSenders,
};
use crate::report::{self, Series, Unit};

/// The soak's settings.
#[derive(Debug, Clone)]
pub struct Soak {
    pub hosts: usize,
    pub seconds: u64,
    /// The detector's (and the hosts') heartbeat interval; each host sends twice per
    /// interval (two paths).
    pub interval_ms: u64,
    pub churn: bool,
}

/// A small deterministic generator (the soak's churn is the same run to run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What happens to one host, by unix ms.
#[derive(Debug, Default)]
struct Away {
    /// Windows in which the host sent nothing for longer than the deadline (left, or not
    /// yet joined): a suspicion opened within one (or up to 2 s after it) is true.
    windows: Vec<(u64, u64)>,
}

/// When host `i`'s silence began if it is paused at `now_ms`: then, or when its last
/// pause began if that ended less than a send period (plus the churn loop's 10 ms) ago.
fn began(last_pause: &BTreeMap<usize, (u64, u64)>, i: usize, now_ms: u64, within_ms: u64) -> u64 {
    match last_pause.get(&i) {
        Some(&(began, resumed)) if now_ms <= resumed + within_ms => began,
        _ => now_ms,
    }
}

/// One host incident: its host, when it opened (unix ms) and its id.
fn host_incidents(c: &ControllerProcess) -> anyhow::Result<Vec<(String, u64, u64)>> {
    let v = c.get_json("/v1/incidents")?;
    let list = v
        .get("incidents")
        .and_then(|l| l.as_array())
        .or_else(|| v.as_array())
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|i| {
            let host = i["subject"].as_str()?.strip_prefix("host:")?.to_string();
            Some((host, i["opened_at_ms"].as_u64()?, i["id"].as_u64()?))
        })
        .collect())
}

fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Per second of the run.
#[derive(Debug, Default)]
struct Samples {
    cpu: Vec<f64>,
    engine: Vec<f64>,
    rss_mb: Vec<f64>,
    lag_ms: Vec<f64>,
}

pub fn run(s: &Soak) -> anyhow::Result<String> {
    anyhow::ensure!(s.hosts >= 10, "use at least 10 hosts");
    // Every host incident stays listed in the API, however many the run closes: the
    // false positives are counted from that list.
    let extra = format!(
        "[detector]\nheartbeat_interval_ms = {}\n[engine]\nclosed_incidents_kept = 1000000\n",
        s.interval_ms
    );
    let c = ControllerProcess::start(None, Enrolled::Simulated(s.hosts), &extra)?;
    let senders = PacedSenders::start(
        c.heartbeat,
        s.hosts,
        Duration::from_millis(s.interval_ms / 2),
    )?;
    let mut rng = Lcg(0x5eed_0017);
    let mut away: BTreeMap<usize, Away> = BTreeMap::new();
    // Churn: 2 % of the hosts join during the first minute.
    let mut joins: Vec<(u64, usize)> = Vec::new();
    let start_ms = unix_ns() / 1_000_000;
    if s.churn {
        for i in (0..s.hosts).filter(|i| i % 50 == 7) {
            senders.pause(i);
            let at = start_ms + 5_000 + rng.below(55_000);
            joins.push((at, i));
            away.entry(i).or_default().windows.push((start_ms, at));
        }
    }
    // Every host heard and Up (the joining ones excepted) before the measured run.
    let expected_up = s.hosts - joins.len();
    let deadline = crate::monotonic_ns() + 60_000_000_000;
    loop {
        let m = c.metrics()?;
        if metric_labelled(&m, "defib_hosts{state=\"Up\"}") as usize >= expected_up {
            break;
        }
        anyhow::ensure!(
            crate::monotonic_ns() < deadline,
            "the hosts were not all Up within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut samples = Samples::default();
    let mut prev_cpu = c.cpu_seconds()?;
    let engine_total = |m: &str| gauge(m, "defib_engine_busy_seconds_total");
    let mut prev_engine = engine_total(&c.metrics()?);
    let t0 = crate::monotonic_ns();
    // Pending churn: (unix ms, what); a pause also with when it began.
    let mut resumes: Vec<(u64, usize, u64)> = Vec::new();
    // A pause makes the host silent from its last heartbeat before it to the first after
    // it: up to the pause plus one send period. One that long (by when the bench really
    // resumed it) may rightly be suspected.
    let deadline_ms = 3 * s.interval_ms;
    let send_period_ms = s.interval_ms / 2;
    // Per host, its last pause: (when it began, when it was resumed). A pause that starts
    // within a send period of the last one's end continues it: the host sent nothing in
    // between, so its silence runs from the first pause's start.
    let mut last_pause: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    let mut unthins: Vec<(u64, usize)> = Vec::new();
    let (mut leaves, mut restarts, mut flaps) = (0u64, 0u64, 0u64);
    for sec in 1..=s.seconds {
        let target = t0 + sec * 1_000_000_000;
        // Churn every 100 ms, resumes looked at every 10 ms.
        let mut step = 0u64;
        loop {
            let now_ns = crate::monotonic_ns();
            if now_ns >= target {
                break;
            }
            let now_ms = unix_ns() / 1_000_000;
            joins.retain(|&(at, i)| {
                if at <= now_ms {
                    senders.resume(i);
                }
                at > now_ms
            });
            resumes.retain(|&(at, i, began)| {
                if at > now_ms {
                    return true;
                }
                senders.resume(i);
                if now_ms - began + send_period_ms >= deadline_ms {
                    away.entry(i).or_default().windows.push((began, now_ms));
                }
                last_pause.insert(i, (began, now_ms));
                false
            });
            unthins.retain(|&(at, i)| {
                if at <= now_ms {
                    senders.thin(i, false);
                }
                at > now_ms
            });
            step += 1;
            if s.churn && step % 10 == 1 {
                let busy = |i: usize, r: &[(u64, usize, u64)], u: &[(u64, usize)]| {
                    r.iter().any(|(_, h, _)| *h == i) || u.iter().any(|(_, h)| *h == i)
                };
                // Per 100 ms: a host leaves for 3–10 s with probability 1/20 (one every
                // 2 s), restarts its watchdog (silent 80–180 ms) with 1/4, loses one
                // path for 2–5 s with 1/4.
                let i = rng.below(s.hosts as u64) as usize;
                if i % 50 != 7 && !busy(i, &resumes, &unthins) {
                    match rng.below(20) {
                        0 => {
                            let back = now_ms + 3_000 + rng.below(7_000);
                            senders.pause(i);
                            resumes.push((
                                back,
                                i,
                                began(&last_pause, i, now_ms, send_period_ms + 10),
                            ));
                            leaves += 1;
                        }
                        1..=5 => {
                            senders.pause(i);
                            let back = now_ms + 80 + rng.below(100);
                            resumes.push((
                                back,
                                i,
                                began(&last_pause, i, now_ms, send_period_ms + 10),
                            ));
                            restarts += 1;
                        }
                        6..=10 => {
                            senders.thin(i, true);
                            unthins.push((now_ms + 2_000 + rng.below(3_000), i));
                            flaps += 1;
                        }
                        _ => {}
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10).min(Duration::from_nanos(
                target.saturating_sub(crate::monotonic_ns()),
            )));
        }
        let m = c.metrics()?;
        let cpu = c.cpu_seconds()?;
        let engine = engine_total(&m);
        samples.cpu.push(cpu - prev_cpu);
        samples.engine.push(engine - prev_engine);
        samples.rss_mb.push(c.rss_bytes()? as f64 / 1e6);
        samples
            .lag_ms
            .push(gauge(&m, "defib_controller_lag_seconds") * 1e3);
        (prev_cpu, prev_engine) = (cpu, engine);
        if sec % 30 == 0 {
            eprintln!(
                "second {sec}: controller {:.2} cores, engine {:.3}, RSS {:.0} MB, {} host incidents",
                samples.cpu.last().copied().unwrap_or(0.0),
                samples.engine.last().copied().unwrap_or(0.0),
                samples.rss_mb.last().copied().unwrap_or(0.0),
                host_incidents(&c)?.len()
            );
        }
    }
    // Hosts still away at the end.
    for (_, i, began) in &resumes {
        away.entry(*i)
            .or_default()
            .windows
            .push((*began, u64::MAX - 2_000));
    }
    let m = c.metrics()?;
    let incidents = host_incidents(&c)?;
    let ids: BTreeMap<String, usize> = (0..s.hosts).map(|i| (host_id(i), i)).collect();
    let mut false_positives = Vec::new();
    let mut true_positives = 0;
    for (host, opened, id) in &incidents {
        let explained = ids.get(host).and_then(|i| away.get(i)).is_some_and(|a| {
            a.windows
                .iter()
                .any(|(from, to)| *opened >= *from && *opened <= to + 2_000)
        });
        if explained {
            true_positives += 1;
        } else {
            // Why the controller suspected it: the first line of its timeline.
            let why = c
                .get_json(&format!("/v1/incidents/{id}"))
                .ok()
                .and_then(|v| v["timeline"][0]["cause"].as_str().map(str::to_string))
                .unwrap_or_default();
            false_positives.push((host.clone(), *opened, why));
        }
    }
    let alarms = metric_labelled(&m, "defib_alarms_total{kind=\"ControllerOverloaded\"}");
    let drops = metric_sum(&m, "defib_heartbeat_socket_drops_total");
    let busy = metric_labelled(
        &m,
        "defib_heartbeats_rejected_total{reason=\"engine_busy\"}",
    );
    let half = samples.rss_mb.len() / 2;
    let rss_first = samples.rss_mb.get(1).copied().unwrap_or(0.0);
    let rss_mid = samples.rss_mb.get(half).copied().unwrap_or(0.0);
    let rss_last = samples.rss_mb.last().copied().unwrap_or(0.0);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (cpu_first, cpu_second) = (mean(&samples.cpu[..half]), mean(&samples.cpu[half..]));
    let notes = format!(
        "defib-controller (release) with {} simulated hosts, each sending two heartbeats per \
         {} ms interval (two paths), for {} s{}. False positives (a host turned Suspect \
         while it was sending): {}{}. True suspicions (hosts that left): {true_positives}. \
         Controller CPU: mean {:.3} cores in the first half, {:.3} in the second; engine task \
         {:.3} of a core on average (max {:.3}); RSS {:.1} MB at 1 s, {:.1} MB at half time, \
         {:.1} MB at the end; lag up to {:.0} ms; {alarms} ControllerOverloaded alarms, {drops} \
         socket drops, {busy} heartbeats refused as engine_busy; {} heartbeats sent.",
        s.hosts,
        s.interval_ms,
        s.seconds,
        if s.churn {
            format!(
                "; churn: {} hosts joined late, {leaves} left for 3–10 s, {restarts} watchdog \
                 restarts (80–180 ms silent), {flaps} hosts lost one path for 2–5 s",
                s.hosts.div_ceil(50)
            )
        } else {
            String::new()
        },
        false_positives.len(),
        if false_positives.is_empty() {
            String::new()
        } else {
            format!(" ({false_positives:?})")
        },
        cpu_first,
        cpu_second,
        mean(&samples.engine),
        samples.engine.iter().copied().fold(0.0, f64::max),
        rss_first,
        rss_mid,
        rss_last,
        samples.lag_ms.iter().copied().fold(0.0, f64::max),
        senders.sent(),
    );
    eprintln!("{notes}");
    let name = format!(
        "soak{}-{}h-{}ms",
        if s.churn { "-churn" } else { "" },
        s.hosts,
        s.interval_ms
    );
    report::write_in(
        &report::results_dir(),
        &name,
        &format!(
            "cargo xtask bench soak --hosts {} {} --interval-ms {}{}",
            s.hosts,
            if s.seconds.is_multiple_of(60) {
                format!("--minutes {}", s.seconds / 60)
            } else {
                format!("--seconds {}", s.seconds)
            },
            s.interval_ms,
            if s.churn { " --churn" } else { "" }
        ),
        &notes,
        Unit {
            symbol: "per second",
            axis: "per-second samples",
        },
        &[
            Series {
                name: "controller CPU, cores".into(),
                samples_ms: samples.cpu,
            },
            Series {
                name: "engine task CPU, cores".into(),
                samples_ms: samples.engine,
            },
            Series {
                name: "controller RSS, MB".into(),
                samples_ms: samples.rss_mb,
            },
            Series {
                name: "controller lag, ms".into(),
                samples_ms: samples.lag_ms,
            },
        ],
    )
}
