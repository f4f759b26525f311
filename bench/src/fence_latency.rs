//! Host loss → fence verified, end to end with the real pieces of tests/tests/fencing_lab.rs:
//! watchdogs in network namespaces, the release controller, ipmi_sim BMCs, and a 3-node
//! corosync + Pacemaker cluster (token 1000 ms) of lab hosts.
//!
//! - ipmi: h0 loses power through its BMC (all its processes die, its links go dark);
//!   the controller confirms it dead from the BMC's power status, powers it off through
//!   ipmitool and reads the power back. A fresh lab per sample.
//! - pacemaker: h1's links are cut (lost to the cluster and to the controller). Pacemaker
//!   detects it (crm_mon on h0 says offline) and fences it with fence_ipmilan; the
//!   controller's Pacemaker level confirms it dead from crm_mon and verifies the fence
//!   from the fencing history. Pacemaker's own detection and fencing are timed in the
//!   same run, by polling crm_mon and the history from h0. A fresh lab and cluster per
//!   sample.
//!
//! Times: t0 is the bench's wall clock right before the loss; the controller's timeline
//! entries carry its wall clock (unix ms); Pacemaker's are when the bench first saw them.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use defib_tests::bmc::{Bmc, BMC_PASSWORD, BMC_PORT, BMC_USER};
use defib_tests::lab::{Lab, LabSpec};
use defib_tests::pacemaker::Cluster;
use serde_json::Value;

use crate::report::{self, Series};

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Unix ms of the first timeline entry of `host`'s incident going to `to`.
fn entered(lab: &Lab, host: &str, to: &str) -> Option<f64> {
    let inc: Value = lab.host_incident(host)?;
    inc["timeline"]
        .as_array()?
        .iter()
        .find(|e| e["to"] == to)
        .and_then(|e| e["at"].as_u64())
        .map(|ms| ms as f64)
}

fn wait_entered(lab: &Lab, host: &str, to: &str, within: Duration) -> anyhow::Result<f64> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(at) = entered(lab, host, to) {
            return Ok(at);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{host} never reached {to}:\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn up(lab: &Lab, n: usize) {
    lab.wait_until("every host Up", Duration::from_secs(60), |s| {
        s.len() == n && s.iter().all(|(_, st)| st == "Up")
    });
}

fn ipmi_sample() -> anyhow::Result<[f64; 3]> {
    let addr = "10.77.0.100";
    let spec = LabSpec {
        hosts: 2,
        backend: "libvirt",
        controller_extra: format!(
            r#"[fence]
verify_poll_ms = 50

[[fence.host]]
name = "h0"
levels = [{{ method = "ipmi", address = "{addr}", port = {BMC_PORT}, username = "{BMC_USER}", password_file = "{{DIR}}/bmc.pass" }}]
"#
        ),
        watchdog_extra: Box::new(|h| format!("[probes]\nwatch_names = [\"qemu-fb-h{h}\"]\n")),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n"))?;
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    up(&lab, 2);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = unix_ms();
    bmc.ipmitool(&lab.net, "off")
        .map_err(|e| anyhow::anyhow!("power off: {e}"))?;
    let fenced = wait_entered(&lab, "h0", "Fenced", Duration::from_secs(30))?;
    let suspect = entered(&lab, "h0", "Suspect").context("no Suspect")?;
    let fencing = entered(&lab, "h0", "Fencing").context("no Fencing")?;
    Ok([suspect - t0, fencing - t0, fenced - t0])
}

struct PacemakerSample {
    defib: [f64; 4],
    pacemaker_offline: f64,
    pacemaker_fenced: f64,
}

fn pacemaker_sample(token_ms: u64, confirm_retry_ms: u64) -> anyhow::Result<PacemakerSample> {
    let spec = LabSpec {
        hosts: 3,
        backend: "libvirt",
        controller_extra: format!(
            r#"[engine]
confirm_retry_ms = {confirm_retry_ms}

[fence]
verify_poll_ms = 100

[fence.pacemaker]
command_prefix = ["ip", "netns", "exec", "{{HOST0_NS}}"]

[[fence.host]]
name = "h1"
levels = [{{ method = "pacemaker" }}]
"#
        ),
        watchdog_extra: Box::new(|h| format!("[probes]\nwatch_names = [\"qemu-fb-h{h}\"]\n")),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    let bmcs: Vec<Bmc> = (0..3)
        .map(|h| Bmc::start(&lab.net, h, lab.dir.path()))
        .collect();
    let cluster = Cluster::start(&lab.net, lab.dir.path(), token_ms);
    cluster.configure_ipmi_fencing(&lab.net, BMC_USER, BMC_PASSWORD);
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    up(&lab, 3);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = unix_ms();
    lab.net.set_host_links(1, false);
    // Pacemaker's own view, polled from h0 while the controller works.
    let (mut offline, mut fenced) = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while offline.is_none() || fenced.is_none() {
        if offline.is_none() {
            let xml = cluster.crm_mon();
            if xml
                .lines()
                .any(|l| l.contains("<node name=\"h1\"") && l.contains("online=\"false\""))
            {
                offline = Some(unix_ms() - t0);
            }
        }
        if fenced.is_none() && cluster.history("h1").contains("status=\"success\"") {
            fenced = Some(unix_ms() - t0);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "Pacemaker: offline after {offline:?}, fenced after {fenced:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let done = wait_entered(&lab, "h1", "Fenced", Duration::from_secs(60))?;
    let suspect = entered(&lab, "h1", "Suspect").context("no Suspect")?;
    let fencing = entered(&lab, "h1", "Fencing").context("no Fencing")?;
    let dead = lab
        .host_incident("h1")
        .and_then(|inc| {
            inc["timeline"].as_array()?.iter().find_map(|e| {
                (e["cause"] == "confirmation: Dead")
                    .then(|| e["at"].as_u64())
                    .flatten()
            })
        })
        .map(|ms| ms as f64)
        .context("no Dead confirmation")?;
    drop(cluster);
    drop(bmcs);
    drop(lab);
    Ok(PacemakerSample {
        defib: [suspect - t0, dead - t0, fencing - t0, done - t0],
        pacemaker_offline: offline.unwrap_or(f64::NAN),
        pacemaker_fenced: fenced.unwrap_or(f64::NAN),
    })
}

pub fn run(
    ipmi_samples: usize,
    pacemaker_samples: usize,
    token_ms: u64,
    confirm_retry_ms: u64,
) -> anyhow::Result<String> {
    let mut s: Vec<Vec<f64>> = vec![Vec::new(); 9];
    for i in 0..ipmi_samples {
        let [a, b, c] = ipmi_sample()?;
        eprintln!("ipmi sample {i}: Suspect {a:.0} ms, Fencing {b:.0} ms, Fenced {c:.0} ms");
        s[0].push(a);
        s[1].push(b);
        s[2].push(c);
    }
    for i in 0..pacemaker_samples {
        let p = pacemaker_sample(token_ms, confirm_retry_ms)?;
        eprintln!(
            "pacemaker sample {i}: defib {:?}, Pacemaker offline {:.0} ms, fenced {:.0} ms",
            p.defib, p.pacemaker_offline, p.pacemaker_fenced
        );
        for (k, v) in p.defib.iter().enumerate() {
            s[3 + k].push(*v);
        }
        s[7].push(p.pacemaker_offline);
        s[8].push(p.pacemaker_fenced);
    }
    let names = [
        "ipmi: power loss → Suspect",
        "ipmi: power loss → Fencing (BMC: power off = Dead)",
        "ipmi: power loss → Fenced (power status off read back)",
        "pacemaker: links cut → Suspect",
        "pacemaker: links cut → crm_mon says offline = Dead (defib)",
        "pacemaker: links cut → Fencing (defib)",
        "pacemaker: links cut → Fenced (history verified, defib)",
        "pacemaker itself: links cut → node offline in crm_mon (50 ms polls)",
        "pacemaker itself: links cut → fencing success in its history (50 ms polls)",
    ];
    let series: Vec<Series> = names
        .iter()
        .zip(s)
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| Series {
            name: (*n).into(),
            samples_ms: v,
        })
        .collect();
    report::write(
        &report::results_dir(),
        "fence-latency",
        &format!(
            "cargo xtask bench fence-latency --ipmi-samples {ipmi_samples} --pacemaker-samples {pacemaker_samples} --token-ms {token_ms} --confirm-retry-ms {confirm_retry_ms}"
        ),
        &format!(
            "Real watchdogs in network namespaces and the release defib-controller (engine: \
             Suspect after 300 ms of silence, Confirming after 500 ms, confirmation \
             re-asked every {confirm_retry_ms} ms), a fresh lab per sample. ipmi: h0's ipmi_sim BMC powers it \
             off (its processes SIGKILLed, its links cut); fence level: ipmitool lanplus -C 3, \
             verify poll 50 ms. pacemaker: 3 lab hosts are a corosync 3 (knet, token \
             {token_ms} ms) + Pacemaker 2.1.5 cluster with fence_ipmilan (power_wait=0) \
             against their ipmi_sim BMCs; h1's links are cut; its only defib fence level is \
             Pacemaker (crm_mon and stonith_admin run on h0). t0 = the bench's wall clock \
             before the loss; defib's times are its timeline (unix ms); Pacemaker's are when \
             the bench first saw them."
        ),
        &series,
    )
}
