//! Heartbeat loss → Suspect: N simulated watchdogs heartbeat the real controller every
//! 100 ms; one at a time stops, and the controller's own timeline says when it turned
//! the host Suspect.
use std::time::Duration;

use anyhow::Context as _;

use crate::controller::{host_id, unix_ns, ControllerProcess, Enrolled, PacedSenders};
use crate::report::{self, Series};

fn host_state(c: &ControllerProcess, host: &str) -> anyhow::Result<(String, Option<u64>)> {
    // The host's fields are flattened into the response.
    let v = c.get_json(&format!("/v1/hosts/{host}"))?;
    Ok((
        v["state"].as_str().unwrap_or_default().to_string(),
        v["incident"].as_u64(),
    ))
}

fn wait_state(
    c: &ControllerProcess,
    host: &str,
    accept: impl Fn(&str) -> bool,
    within: Duration,
) -> anyhow::Result<(String, Option<u64>, u64)> {
    let deadline = crate::monotonic_ns() + within.as_nanos() as u64;
    loop {
        if let Ok((state, incident)) = host_state(c, host) {
            if accept(&state) {
                return Ok((state, incident, unix_ns()));
            }
        }
        anyhow::ensure!(
            crate::monotonic_ns() < deadline,
            "{host} did not reach the expected state within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn run(hosts: usize, samples: usize, interval_ms: u64) -> anyhow::Result<String> {
    let interval = Duration::from_millis(interval_ms);
    anyhow::ensure!(
        hosts >= 3,
        "use at least 3 hosts (one silent host must stay a minority)"
    );
    let c = ControllerProcess::start(
        None,
        Enrolled::Simulated(hosts),
        &format!("[detector]\nheartbeat_interval_ms = {interval_ms}\n"),
    )?;
    let senders = PacedSenders::start(c.heartbeat, hosts, interval)?;
    for i in 0..hosts {
        wait_state(&c, &host_id(i), |s| s == "Up", Duration::from_secs(10))?;
    }
    std::thread::sleep(Duration::from_millis(500));
    let (mut from_last, mut from_stop, mut to_api) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..samples {
        let i = k % hosts;
        let host = host_id(i);
        // Vary the phase of the stop against the heartbeat and engine-tick cadence.
        std::thread::sleep(interval * 3 / 2 + interval * ((k as u32 * 37) % 100) / 100);
        let stop_ns = unix_ns();
        senders.pause(i);
        let (_, incident, seen_ns) = wait_state(
            &c,
            &host,
            |s| s != "Up" && s != "Maintenance",
            Duration::from_secs(5),
        )?;
        let incident = incident.context("a Suspect host without an incident")?;
        let last_ns = senders.last_sent_unix_ns(i);
        // The incident's fields are flattened into the response.
        let inc = c.get_json(&format!("/v1/incidents/{incident}"))?;
        let suspect_at_ms = inc["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["from"] == "Up" && e["to"] == "Suspect")
            .and_then(|e| e["at"].as_u64())
            .with_context(|| format!("no Up → Suspect entry in incident {incident}: {inc}"))?;
        let at_ns = suspect_at_ms * 1_000_000;
        from_last.push(crate::ms(at_ns.saturating_sub(last_ns)));
        from_stop.push(crate::ms(at_ns.saturating_sub(stop_ns)));
        to_api.push(crate::ms(seen_ns.saturating_sub(at_ns)));
        senders.resume(i);
        wait_state(&c, &host, |s| s == "Up", Duration::from_secs(5))?;
    }
    let series = [
        Series {
            name: "last heartbeat sent → Up→Suspect (timeline)".into(),
            samples_ms: from_last,
        },
        Series {
            name: "heartbeats stopped → Up→Suspect (timeline)".into(),
            samples_ms: from_stop,
        },
        Series {
            name: "Up→Suspect (timeline) → seen in the API (2 ms polls)".into(),
            samples_ms: to_api,
        },
    ];
    drop(senders);
    let name = if interval_ms == 100 {
        "suspect-latency".to_string()
    } else {
        format!("suspect-latency-{interval_ms}ms")
    };
    report::write(
        &report::results_dir(),
        &name,
        &format!(
            "cargo xtask bench suspect-latency --hosts {hosts} --samples {samples} --interval-ms {interval_ms}"
        ),
        &format!(
            "defib-controller (release binary, detector: {interval_ms} ms interval, 3 missed → \
             Suspect, each host's deadline falling due on its own timer) on loopback; {hosts} \
             simulated watchdogs in the bench (enrolled, each signing with its own key and \
             echoing the controller's session) send heartbeats every {interval_ms} ms, spread \
             over the interval. Per sample one host stops; the Up → Suspect timestamp is the \
             controller's timeline entry (its clock, unix ms, so ±1 ms), compared with the \
             bench's wall clock at the host's last sent heartbeat and at the stop. The host \
             then resumes and is Up again before the next sample. Target: p99 of the first \
             series ≤ 3 × {interval_ms} + 15 = {} ms.",
            3 * interval_ms + 15
        ),
        &series,
    )
}
