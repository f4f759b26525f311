//! The controller's account of the lab, through defibctl in its namespace: `lab status`,
//! incidents, host states.
use std::process::Command;

use anyhow::bail;
use serde_json::Value;

use super::placement::{self, Vm};
use super::{alive, keeper_pid, read_state, state_path};

/// `defibctl ARGS` against the lab's controller (with `--ha`: the one that leads now),
/// from its namespace.
pub(super) fn defibctl(state: &Value, args: &[&str]) -> anyhow::Result<String> {
    let url = match leader(state)? {
        Some(l) => l.url,
        None => state["api_url"].as_str().unwrap_or("").to_owned(),
    };
    defibctl_at(state, &url, args)
}

/// The controller that leads, as it says.
pub(super) struct Leader {
    pub id: String,
    pub url: String,
    /// When its term began (its wall clock, unix ms): a controller killed and started
    /// again (the keeper does, as systemd would) may lead again under the same id.
    pub since_ms: u64,
}

/// With `--ha`: the leading controller, waiting up to 10 s for one (a handover); `None`
/// for a lab of one controller.
pub(super) fn leader(state: &Value) -> anyhow::Result<Option<Leader>> {
    let Some(controllers) = state["controllers"].as_array().filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        for c in controllers {
            let Some(url) = c["api_url"].as_str() else {
                continue;
            };
            let answer = defibctl_at(state, url, &["--json", "controllers"])
                .ok()
                .and_then(|out| serde_json::from_str::<Value>(&out).ok())
                .filter(|v| v["role"] == "leader");
            if let Some(v) = answer {
                return Ok(Some(Leader {
                    id: c["id"].as_str().unwrap_or("?").to_owned(),
                    url: url.to_owned(),
                    since_ms: v["leader_since_ms"].as_u64().unwrap_or(0),
                }));
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("no lab controller leads (etcd without quorum?); `cargo xtask lab status`");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `defibctl ARGS` against the controller at `url`.
fn defibctl_at(state: &Value, url: &str, args: &[&str]) -> anyhow::Result<String> {
    // Built by `up`; building again here would only cost time.
    let bin = defib_tests::workspace_root().join("target/debug/defibctl");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            state["controller_ns"].as_str().unwrap_or(""),
        ])
        .arg(bin)
        .args(["--url", url])
        .args(["--token-file", state["token_file"].as_str().unwrap_or("")])
        // The lab CA (a lab kept by an older xtask has none, and plain HTTP).
        .args(
            state["ca_file"]
                .as_str()
                .map(|ca| ["--ca-file", ca])
                .into_iter()
                .flatten(),
        )
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "defibctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `defibctl --json ARGS`: what the drills read.
pub(super) fn defibctl_json(state: &Value, args: &[&str]) -> anyhow::Result<Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    Ok(serde_json::from_str(&defibctl(state, &a)?)?)
}

/// `lab status`: what the keeper made (from the state file), then the controller's hosts
/// and VMs.
pub(super) fn status() -> anyhow::Result<()> {
    let Some(state) = read_state() else {
        println!("the lab is down (`cargo xtask lab up` starts it)");
        return Ok(());
    };
    let Some(pid) = keeper_pid(&state) else {
        println!(
            "the lab's keeper is gone; {} lists what is left (`cargo xtask lab down` removes it)",
            state_path().display()
        );
        return Ok(());
    };
    println!("lab keeper pid {pid}, files in {}", state["dir"]);
    match state["controllers"].as_array().filter(|c| !c.is_empty()) {
        Some(_) => {
            println!(
                "controllers in namespace {} on etcd {}:",
                state["controller_ns"], state["etcd_endpoints"]
            );
            print!("{}", defibctl(&state, &["controllers"])?);
        }
        None => println!(
            "controller pid {} in namespace {} ({})",
            state["pids"]["controller"], state["controller_ns"], state["api_url"]
        ),
    }
    for h in state["hosts"].as_array().into_iter().flatten() {
        let guests: Vec<&str> = h["guests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["name"].as_str())
            .collect();
        println!(
            "{}: namespace {}, watchdog pid {} ({}), libvirt {}, BMC {} (ipmi_sim pid {}), guests {}",
            h["name"].as_str().unwrap_or("?"),
            h["ns"].as_str().unwrap_or("?"),
            h["watchdog_pid"],
            if h["watchdog_pid"].as_u64().is_some_and(alive) {
                "running"
            } else {
                "gone"
            },
            h["libvirt_uri"].as_str().unwrap_or("none (a Nova fake compute)"),
            h["bmc_addr"].as_str().unwrap_or("?"),
            h["bmc_pid"],
            guests.join(", ")
        );
    }
    println!();
    print!("{}", hosts_table(&state)?);
    println!();
    print!("{}", defibctl(&state, &["vms"])?);
    if let Some(prefix) = state["nova_prefix"].as_str() {
        println!();
        let hosts = state["hosts"].as_array().map_or(0, Vec::len);
        super::nova::print_status(hosts, prefix)?;
    }
    Ok(())
}

/// The newest incident about `subject` (its summary), if any.
pub(super) fn newest_incident(state: &Value, subject: &str) -> anyhow::Result<Option<Value>> {
    let list = defibctl_json(state, &["incidents"])?;
    Ok(list["incidents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["subject"] == subject)
        .max_by_key(|i| i["id"].as_u64())
        .cloned())
}

/// The controller's state of `host` ("absent" if it does not know the host).
pub(super) fn host_state(state: &Value, host: &str) -> anyhow::Result<String> {
    let hosts = defibctl_json(state, &["hosts"])?;
    Ok(hosts["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["host"] == host)
        .and_then(|h| h["state"].as_str())
        .unwrap_or("absent")
        .to_string())
}

/// The controller's hosts, with VMS counting the VMs defib places on each host (its VM
/// list). A host's watchdog counts the qemus it reports; where that differs, a line
/// below the table says by how much and why.
fn hosts_table(state: &Value) -> anyhow::Result<String> {
    let hosts = defibctl_json(state, &["hosts"])?;
    let vms = defibctl_json(state, &["vms"])?;
    let at = hosts["at_ms"].as_u64().unwrap_or(0);
    let lab_vms = placement::survey(state)?;
    let mut rows = vec![[
        "HOST",
        "STATE",
        "INCIDENT",
        "LAST HEARTBEAT",
        "VMS",
        "STALLED",
    ]
    .map(String::from)];
    let mut notes = Vec::new();
    for h in hosts["hosts"].as_array().into_iter().flatten() {
        let name = h["host"].as_str().unwrap_or("?");
        let placed = vms["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["kind"] == "vm" && v["host"] == name)
            .count();
        let age = h["last_heartbeat_ms"]
            .as_u64()
            .map(|l| at.saturating_sub(l));
        rows.push([
            name.to_string(),
            h["state"].as_str().unwrap_or("?").to_string(),
            h["incident"]
                .as_u64()
                .map_or("-".to_string(), |i| format!("i{i}")),
            age.map_or("-".to_string(), |a| {
                format!("{:.1} s ago", a as f64 / 1000.0)
            }),
            placed.to_string(),
            h["stalled_vm_count"].to_string(),
        ]);
        let counted = h["vm_count"].as_u64().unwrap_or(0) as usize;
        if counted != placed {
            let why = count_differs_because(state, h, age, &lab_vms);
            notes.push(format!(
                "{name}: its watchdog counts {counted} qemu(s), defib places {placed} VM(s) there: {why}"
            ));
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for n in notes {
        out.push_str(&format!("{n}\n"));
    }
    Ok(out)
}

/// Why a host's watchdog counts other than defib places there, in a few words.
fn count_differs_because(state: &Value, host: &Value, age_ms: Option<u64>, vms: &[Vm]) -> String {
    let name = host["host"].as_str().unwrap_or("?");
    let st = host["state"].as_str().unwrap_or("?");
    match age_ms {
        None => {
            return format!(
                "the count is from an earlier heartbeat; the controller has none from it now (the host is {st})"
            )
        }
        Some(a) if a > 1_000 || !matches!(st, "Up" | "Recovered") => {
            return format!(
                "the count is from its last heartbeat, {:.1} s ago (the host is {st})",
                a as f64 / 1000.0
            )
        }
        Some(_) => {}
    }
    if state["nova_prefix"].is_string() {
        return "a Nova fake compute's servers have no qemu".into();
    }
    let here = |v: &&Vm| v.qemus.iter().any(|q| q.host.as_deref() == Some(name));
    let placed_here = |v: &&Vm| v.defib.as_ref().is_some_and(|(h, _)| h == name);
    let mut why: Vec<String> = vms
        .iter()
        .filter(|v| here(v) && !placed_here(v))
        .map(|v| match &v.defib {
            Some((h, st)) => format!("{} runs here, defib has it {st} on {h}", v.name),
            None => format!("{} runs here, defib does not list it", v.name),
        })
        .collect();
    why.extend(
        vms.iter()
            .filter(|v| placed_here(v) && !here(v))
            .map(|v| format!("{} is placed here, its qemu does not run here", v.name)),
    );
    let runs = vms.iter().filter(here).count();
    let counted = host["vm_count"].as_u64().unwrap_or(0) as usize;
    if counted != runs {
        why.push(format!(
            "this host's libvirt runs {runs} lab qemu(s): a start or an exit the heartbeats do not carry yet, or a qemu that is not the lab's"
        ));
    }
    if why.is_empty() {
        why.push("no lab VM explains it".into());
    }
    why.join("; ")
}
