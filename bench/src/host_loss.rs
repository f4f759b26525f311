//! Issue 7: a whole host lost in the lab. The bench brings up `cargo xtask lab` (3 hosts
//! in network namespaces, each with its own libvirtd and KVM guests, its watchdog and an
//! ipmi_sim BMC; a controller with the libvirt backend and IPMI fencing; debug builds,
//! as `lab up` runs them) in a lab directory of its own, and each round powers one
//! host off at its BMC (its watchdog, its guests' qemus die and its links go dark), then
//! reads the host incident's timeline as the controller recorded it: → Suspect, → Fenced
//! (power off verified through IPMI), → first evacuation issued, → every VM of the host
//! Running on another host. Then the host is powered on, its watchdog starts again, it
//! is unfenced and Up before the next round.
//!
//! With `--nova` (`lab up --nova`): the hosts are the novabed's fake computes (fake-1…),
//! the VMs Nova servers, the controller's backend Nova; a power-off also kills the host's
//! nova-compute. Besides the timeline, Nova itself is polled for "every server of the host
//! ACTIVE on another compute", and before the next round the compute must be back (up,
//! not forced down: the unfence's unforce done).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::report::{self, Series};

const WAIT: Duration = Duration::from_secs(120);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z') && !r.starts_with('X'))
    })
}

/// The lab, brought up by `xtask lab up` in a directory of the bench's own and taken
/// down again on drop.
pub(crate) struct BenchLab {
    xtask: PathBuf,
    dir: PathBuf,
}

impl BenchLab {
    fn up(hosts: usize, guests_per_host: usize, nova: Option<usize>) -> anyhow::Result<BenchLab> {
        Self::up_with(hosts, guests_per_host, nova, false)
    }

    /// `lab up --ceph`: the last guest of each host on an RBD image.
    fn up_ceph(hosts: usize, guests_per_host: usize) -> anyhow::Result<BenchLab> {
        let lab = BenchLab {
            xtask: defib_tests::built_binary("xtask", "xtask"),
            dir: PathBuf::from("/run/defib-bench-lab"),
        };
        let (h, g) = (hosts.to_string(), guests_per_host.to_string());
        let (ok, out) = lab.xtask(&["up", "--hosts", &h, "--guests-per-host", &g, "--ceph"]);
        anyhow::ensure!(ok, "lab up --ceph:\n{out}");
        Ok(lab)
    }

    /// `lab up`, with `--ha` (three controllers on etcd) if `ha`.
    pub(crate) fn up_with(
        hosts: usize,
        guests_per_host: usize,
        nova: Option<usize>,
        ha: bool,
    ) -> anyhow::Result<BenchLab> {
        let lab = BenchLab {
            xtask: defib_tests::built_binary("xtask", "xtask"),
            dir: PathBuf::from("/run/defib-bench-lab"),
        };
        let (h, g) = (hosts.to_string(), guests_per_host.to_string());
        let mut args = vec!["up", "--hosts", &h, "--guests-per-host", &g];
        let n = nova.map(|n| n.to_string()).unwrap_or_default();
        if nova.is_some() {
            args.extend(["--nova", "--servers-per-host", &n]);
        }
        if ha {
            args.push("--ha");
        }
        let (ok, out) = lab.xtask(&args);
        anyhow::ensure!(ok, "lab up:\n{out}");
        Ok(lab)
    }

    fn xtask(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(&self.xtask)
            .arg("lab")
            .args(args)
            .env("DEFIB_LAB_DIR", &self.dir)
            // The lab's daemons as `lab up` runs them (debug builds).
            .env_remove("DEFIB_RELEASE")
            .current_dir(defib_tests::workspace_root())
            .output();
        match out {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    pub(crate) fn state(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            self.dir.join("state.json"),
        )?)?)
    }

    /// `defibctl --json ARGS` against the lab's controller (with `--ha`, the one that
    /// leads now), from its namespace.
    fn ctl(&self, args: &[&str]) -> anyhow::Result<Value> {
        let st = self.state()?;
        let url = match self.leader()? {
            Some(l) => l.url,
            None => st["api_url"].as_str().unwrap_or("").to_owned(),
        };
        self.ctl_at(&url, args)
    }

    /// With `--ha`: the leading controller, waiting up to 10 s.
    pub(crate) fn leader(&self) -> anyhow::Result<Option<LabLeader>> {
        let st = self.state()?;
        let Some(controllers) = st["controllers"].as_array().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for c in controllers {
                let url = c["api_url"].as_str().unwrap_or("");
                let answer = self
                    .ctl_at(url, &["controllers"])
                    .ok()
                    .filter(|v| v["role"] == "leader");
                if let Some(v) = answer {
                    return Ok(Some(LabLeader {
                        id: c["id"].as_str().unwrap_or("?").to_owned(),
                        url: url.to_owned(),
                        pid: c["pid"].as_u64().unwrap_or(0),
                        since_ms: v["leader_since_ms"].as_u64().unwrap_or(0),
                    }));
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no lab controller leads");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ctl_at(&self, url: &str, args: &[&str]) -> anyhow::Result<Value> {
        let st = self.state()?;
        let out = Command::new("ip")
            .args(["netns", "exec", st["controller_ns"].as_str().unwrap_or("")])
            .arg(defib_tests::workspace_root().join("target/debug/defibctl"))
            .args(["--url", url])
            .args(["--token-file", st["token_file"].as_str().unwrap_or("")])
            .args(
                st["ca_file"]
                    .as_str()
                    .map(|ca| ["--ca-file", ca])
                    .into_iter()
                    .flatten(),
            )
            .arg("--json")
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "defibctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn host_state(&self, host: &str) -> anyhow::Result<String> {
        let hosts = self.ctl(&["hosts"])?;
        Ok(hosts["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["host"] == host)
            .and_then(|h| h["state"].as_str())
            .unwrap_or("absent")
            .to_string())
    }

    fn newest_incident(&self, subject: &str) -> anyhow::Result<Option<u64>> {
        let list = self.ctl(&["incidents"])?;
        Ok(list["incidents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["subject"] == subject)
            .filter_map(|i| i["id"].as_u64())
            .max())
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        let (_, out) = self.xtask(&["down"]);
        eprintln!("{}", out.trim());
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !ok()? {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// One round's figures (ms after the loss).
pub(crate) struct Round {
    pub host: String,
    pub vms: usize,
    suspect: f64,
    pub fenced: f64,
    first_evacuation: f64,
    pub all_running: f64,
    /// With a leader killed: (its id, the new leader's id, ms from the loss to the kill).
    pub killed: Option<(String, String, f64)>,
    /// Nova lab: when polling Nova first saw every server ACTIVE elsewhere.
    nova_active: Option<f64>,
}

/// The Nova lab's view: Nova, and the prefix of the lab's servers.
pub(crate) struct NovaView {
    nova: defib_tests::novalab::Nova,
    prefix: String,
}

impl NovaView {
    /// The lab's servers on `host`.
    fn servers_on(&self, host: &str) -> Vec<String> {
        self.nova
            .servers_named(&self.prefix)
            .into_iter()
            .filter(|s| s.host.as_deref() == Some(host))
            .map(|s| s.id)
            .collect()
    }

    fn all_active_elsewhere(&self, ids: &[String], not_on: &str) -> bool {
        let ss = self.nova.servers_named(&self.prefix);
        ids.iter().all(|id| {
            ss.iter().any(|s| {
                &s.id == id
                    && s.status == "ACTIVE"
                    && s.task_state.is_none()
                    && s.host.as_deref().is_some_and(|h| h != not_on)
            })
        })
    }

    fn compute_back(&self, host: &str) -> bool {
        let s = self.nova.service(host);
        !s.forced_down && s.state == "up"
    }
}

fn round(lab: &BenchLab, n: usize, nova: Option<&NovaView>) -> anyhow::Result<Round> {
    round_killing(lab, n, nova, None)
}

/// The lab's leading controller, as it says.
pub(crate) struct LabLeader {
    pub id: String,
    pub url: String,
    pub pid: u64,
    /// When its term began (its wall clock, unix ms).
    pub since_ms: u64,
}

/// A round; with `kill_leader_after`, the leading controller is SIGKILLed that long
/// after the power-off (mid-recovery).
pub(crate) fn round_killing(
    lab: &BenchLab,
    n: usize,
    nova: Option<&NovaView>,
    kill_leader_after: Option<Duration>,
) -> anyhow::Result<Round> {
    let leader = match kill_leader_after {
        Some(_) => lab.leader()?,
        None => None,
    };
    let state = lab.state()?;
    let vms = lab.ctl(&["vms"])?;
    let vms = vms["vms"].as_array().cloned().unwrap_or_default();
    // The last host that runs a VM now (earlier rounds move VMs around). In the Nova lab:
    // the host with the most of the lab's servers, as Nova says (the controller learns a
    // host's servers when it forces it down), so that every round moves several.
    let hosts = state["hosts"].as_array().cloned().unwrap_or_default();
    let host = match nova {
        Some(v) => hosts
            .iter()
            .map(|h| (v.servers_on(h["name"].as_str().unwrap_or("?")).len(), h))
            .filter(|(n, _)| *n > 0)
            .max_by_key(|(n, _)| *n)
            .map(|(_, h)| h.clone()),
        None => hosts
            .iter()
            .rfind(|h| {
                vms.iter()
                    .any(|v| v["host"] == h["name"] && v["state"] == "Running")
            })
            .cloned(),
    }
    .ok_or_else(|| anyhow::anyhow!("no lab host runs a VM"))?;
    let name = host["name"].as_str().unwrap_or("?").to_string();
    anyhow::ensure!(lab.host_state(&name)? == "Up", "{name} is not Up");
    let servers: Vec<String> = nova.map(|v| v.servers_on(&name)).unwrap_or_default();
    let subjects: Vec<String> = match nova {
        Some(_) => servers.iter().map(|id| format!("vm:{id}")).collect(),
        None => vms
            .iter()
            .filter(|v| v["host"] == name.as_str() && v["state"] == "Running")
            .filter_map(|v| v["resource"].as_str().map(String::from))
            .collect(),
    };
    let earlier = lab.newest_incident(&format!("host:{name}"))?;
    let wd = host["watchdog_pid"]
        .as_u64()
        .filter(|&p| alive(p))
        .ok_or_else(|| anyhow::anyhow!("{name}'s watchdog does not run"))?;
    let (ns, bmc) = (
        state["controller_ns"].as_str().unwrap_or("").to_string(),
        host["bmc_addr"].as_str().unwrap_or("").to_string(),
    );
    // The loss is the moment the BMC's power-off killed the host's processes (its
    // watchdog first): the BMC's own log of the kill, on the machine's clock.
    let chassis_log = match host["bmc_dir"].as_str() {
        Some(d) => PathBuf::from(d),
        None => Path::new(state["dir"].as_str().unwrap_or("")).join(format!("bmc-{name}")),
    }
    .join("chassis.log");
    let sent = unix_ms();
    defib_tests::bmc::chassis_power(&ns, &bmc, "off")
        .map_err(|e| anyhow::anyhow!("power off: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(wd) {
        anyhow::ensure!(Instant::now() < deadline, "{name} did not lose power");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut killed = None;
    if let (Some(after), Some(old)) = (kill_leader_after, &leader) {
        std::thread::sleep(after);
        let at = unix_ms();
        let _ = Command::new("kill")
            .args(["-KILL", &old.pid.to_string()])
            .status();
        // The next term: another controller, or the killed one started again by the
        // lab's keeper (as systemd would) and elected again.
        let deadline = Instant::now() + Duration::from_secs(30);
        let new = loop {
            if let Ok(Some(l)) = lab.leader() {
                if l.since_ms >= at {
                    break l.id;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no controller began a new term after {} was killed",
                old.id
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        killed = Some((old.id.clone(), new, at));
    }
    let t0 = std::fs::read_to_string(&chassis_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" killed "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .find(|&ms| ms >= sent)
        .ok_or_else(|| anyhow::anyhow!("no kill after {sent} in {}", chassis_log.display()))?;
    let mut nova_active = None;
    if let Some(v) = nova {
        wait_for(&format!("{name}'s servers ACTIVE elsewhere (Nova)"), || {
            Ok(v.all_active_elsewhere(&servers, &name))
        })?;
        nova_active = Some(unix_ms().saturating_sub(t0) as f64);
    }
    wait_for(&format!("{name}'s VMs running elsewhere"), || {
        let vms = lab.ctl(&["vms"])?;
        let list = vms["vms"].as_array().cloned().unwrap_or_default();
        Ok(subjects.iter().all(|s| {
            list.iter().any(|v| {
                v["resource"] == s.as_str() && v["state"] == "Running" && v["host"] != name.as_str()
            })
        }))
    })?;
    let id = lab
        .newest_incident(&format!("host:{name}"))?
        .filter(|&i| Some(i) != earlier)
        .ok_or_else(|| anyhow::anyhow!("no new incident about {name}"))?;
    let inc = lab.ctl(&["incidents", &id.to_string()])?;
    let timeline = inc["timeline"].as_array().cloned().unwrap_or_default();
    let of_host = |to: &str| {
        timeline
            .iter()
            .find(|e| e["subject"]["Host"] == name.as_str() && e["to"] == to)
            .and_then(|e| e["at"].as_u64())
    };
    let since = |at: Option<u64>, what: &str| -> anyhow::Result<f64> {
        let at = at.ok_or_else(|| anyhow::anyhow!("no {what} in the timeline: {inc}"))?;
        Ok(at.saturating_sub(t0) as f64)
    };
    let suspect = since(of_host("Suspect"), "Suspect")?;
    let fenced = since(of_host("Fenced"), "Fenced")?;
    let first_evacuation = since(
        timeline
            .iter()
            .filter(|e| {
                e["to"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("Evacuating"))
            })
            .filter_map(|e| e["at"].as_u64())
            .min(),
        "evacuation",
    )?;
    let mut all_running = 0.0f64;
    for s in &subjects {
        let uuid = s.trim_start_matches("vm:");
        let at = timeline
            .iter()
            .filter(|e| e["subject"].to_string().contains(uuid) && e["to"] == "Running")
            .filter_map(|e| e["at"].as_u64())
            .max();
        all_running = all_running.max(since(at, &format!("{s} Running"))?);
    }
    eprintln!(
        "round {n}: {name} ({} VMs) → Suspect {suspect:.0} ms, Fenced {fenced:.0} ms, first \
         evacuation {first_evacuation:.0} ms, all Running elsewhere {all_running:.0} ms{}",
        subjects.len(),
        nova_active
            .map(|a| format!(", Nova: all ACTIVE elsewhere seen at {a:.0} ms"))
            .unwrap_or_default()
    );

    // Back: power on (the keeper brings its links up and starts its watchdog again), wait
    // for Recovered, unfence, Up.
    let ns = state["controller_ns"].as_str().unwrap_or("");
    let bmc = host["bmc_addr"].as_str().unwrap_or("");
    defib_tests::bmc::chassis_power(ns, bmc, "on").map_err(|e| anyhow::anyhow!("power on: {e}"))?;
    wait_for(&format!("{name} Recovered"), || {
        Ok(lab.host_state(&name)? == "Recovered")
    })?;
    // Refused while the host still lists a domain that now runs elsewhere (its libvirt
    // may not have noticed the killed qemu yet): asked again, as an operator would.
    wait_for(&format!("{name} unfenced"), || {
        Ok(lab.ctl(&["unfence", &name]).is_ok())
    })?;
    wait_for(&format!("{name} Up"), || Ok(lab.host_state(&name)? == "Up"))?;
    if let Some(v) = nova {
        wait_for(
            &format!("{name}'s nova-compute up and not forced down"),
            || Ok(v.compute_back(&name)),
        )?;
    }
    // Its heartbeats steady again before the next loss.
    std::thread::sleep(Duration::from_secs(2));
    Ok(Round {
        host: name,
        vms: subjects.len(),
        suspect,
        fenced,
        first_evacuation,
        all_running,
        nova_active,
        killed: killed.map(|(old, new, at)| (old, new, at.saturating_sub(t0) as f64)),
    })
}

pub fn run(rounds: usize, guests_per_host: usize, ceph: bool) -> anyhow::Result<String> {
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        !Path::new("/run/defib-bench-lab/state.json").exists(),
        "/run/defib-bench-lab/state.json exists: a bench lab is up (DEFIB_LAB_DIR=/run/defib-bench-lab cargo xtask lab down)"
    );
    let began = Instant::now();
    let lab = if ceph {
        BenchLab::up_ceph(3, guests_per_host)?
    } else {
        BenchLab::up(3, guests_per_host, None)?
    };
    let mut done = Vec::new();
    for n in 1..=rounds {
        done.push(round(&lab, n, None)?);
    }
    drop(lab);
    let pick = |f: fn(&Round) -> f64| done.iter().map(f).collect::<Vec<f64>>();
    let series = [
        Series {
            name: "power loss → Suspect".into(),
            samples_ms: pick(|r| r.suspect),
        },
        Series {
            name: "power loss → Fenced (IPMI power off read back)".into(),
            samples_ms: pick(|r| r.fenced),
        },
        Series {
            name: "power loss → first evacuation issued".into(),
            samples_ms: pick(|r| r.first_evacuation),
        },
        Series {
            name: "power loss → every VM of the host Running on another host".into(),
            samples_ms: pick(|r| r.all_running),
        },
    ];
    let per_round: Vec<String> = done
        .iter()
        .map(|r| format!("{} ({} VMs)", r.host, r.vms))
        .collect();
    let notes = format!(
        "`cargo xtask lab up --hosts 3 --guests-per-host {guests_per_host}` in its own lab \
         directory (debug builds of the daemons, as `lab up` runs them; controller engine \
         defaults except fence_on_unknown_after_ms = 3000; one IPMI fence level per host \
         through its ipmi_sim BMC, verify poll 100 ms; libvirt backend). Each round powers \
         off the last host that runs VMs with `ipmitool chassis power off` at its BMC; t0 is \
         the BMC's own log of killing the host's first process (its power-off cuts the \
         host's links, kills its processes, the watchdog among them, then its guests' \
         qemus; date +%s.%N), so the host's last heartbeat was at most 100 ms before t0. The other times are the controller's own \
         timeline entries (unix ms, same machine clock). \"Running\" is the watchdog of the \
         target host having started the domain from its definition (libvirt: the qemu runs); \
         the guests' disks are on the machine's file system or loop devices, which every lab \
         host sees (shared storage){}. Rounds: {}. Whole run {:.0} s.",
        if ceph {
            "; with --ceph, the last guest of each host has its disk on an RBD image of the \
             Ceph test bed instead (qemu's librbd, the cephx key in each host's libvirt \
             secret), whose killed qemu keeps its watch for 30 s: the new copy breaks the \
             image's lock (the lab's controller has no ceph-blocklist level, so no watcher \
             check), and \"every VM Running\" includes it"
        } else {
            ""
        },
        per_round.join(", "),
        began.elapsed().as_secs_f64()
    );
    let (scenario, flag) = if ceph {
        ("host-loss-ceph", " --ceph")
    } else {
        ("host-loss", "")
    };
    report::write(
        &report::results_dir(),
        scenario,
        &format!(
            "cargo xtask bench host-loss --rounds {rounds} --guests-per-host {guests_per_host}{flag}"
        ),
        &notes,
        &series,
    )
}

/// `--nova`: the same rounds in `lab up --nova` (the novabed's computes as lab hosts).
pub fn run_nova(rounds: usize, servers_per_host: usize) -> anyhow::Result<String> {
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        !Path::new("/run/defib-bench-lab/state.json").exists(),
        "/run/defib-bench-lab/state.json exists: a bench lab is up (DEFIB_LAB_DIR=/run/defib-bench-lab cargo xtask lab down)"
    );
    let began = Instant::now();
    let lab = BenchLab::up(3, 0, Some(servers_per_host))?;
    let nova = NovaView {
        nova: defib_tests::novalab::Nova::attach()
            .ok_or_else(|| anyhow::anyhow!("the novabed's Nova does not answer"))?,
        prefix: lab.state()?["nova_prefix"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the lab is not a Nova lab"))?
            .to_string(),
    };
    let mut done = Vec::new();
    for n in 1..=rounds {
        done.push(round(&lab, n, Some(&nova))?);
    }
    drop(lab);
    let pick = |f: fn(&Round) -> f64| done.iter().map(f).collect::<Vec<f64>>();
    let series = [
        Series {
            name: "power loss → Suspect".into(),
            samples_ms: pick(|r| r.suspect),
        },
        Series {
            name: "power loss → Fenced (IPMI power off read back)".into(),
            samples_ms: pick(|r| r.fenced),
        },
        Series {
            name: "power loss → first evacuation issued".into(),
            samples_ms: pick(|r| r.first_evacuation),
        },
        Series {
            name: "power loss → every server Running elsewhere (controller's timeline)".into(),
            samples_ms: pick(|r| r.all_running),
        },
        Series {
            name: "power loss → every server ACTIVE on another compute (Nova, polled)".into(),
            samples_ms: pick(|r| r.nova_active.unwrap_or(f64::NAN)),
        },
    ];
    let per_round: Vec<String> = done
        .iter()
        .map(|r| format!("{} ({} servers)", r.host, r.vms))
        .collect();
    let notes = format!(
        "`cargo xtask lab up --nova --hosts 3 --servers-per-host {servers_per_host}` in its own \
         lab directory: the lab hosts are the novabed's fake computes fake-1..fake-3 (Nova 34, \
         fake virt driver: a rebuild does no guest work), each with its watchdog in a network \
         namespace and an ipmi_sim BMC whose power-off also SIGKILLs the host's nova-compute; \
         the controller (debug build) has backend = \"nova\" (header identity, default [nova] \
         settings: poll 500 ms, at most 10 rebuilds at once per target, Nova's scheduler), \
         engine defaults except fence_on_unknown_after_ms = 3000. t0 is the BMC's own log of \
         the kill, as in host-loss. Each round loses the compute with the most of the lab's \
         servers. \"Running elsewhere\" is the controller's timeline entry \
         for the server (the restorer saw it ACTIVE on the target); \"ACTIVE (Nova, polled)\" \
         is this bench's own poll of GET /servers/detail every 100 ms plus the request's time. \
         Between rounds the host is powered on (nova-compute started again), unfenced, Up, and \
         its compute up and no longer forced down. Rounds: {}. Whole run {:.0} s.",
        per_round.join(", "),
        began.elapsed().as_secs_f64()
    );
    report::write(
        &report::results_dir(),
        "host-loss-nova",
        &format!(
            "cargo xtask bench host-loss --nova --rounds {rounds} --servers-per-host {servers_per_host}"
        ),
        &notes,
        &series,
    )
}
