//! The controller's account of the lab, through defibctl in its namespace: `lab status`,
//! incidents, host states.
use std::process::Command;

use anyhow::bail;
use serde_json::Value;

use super::{alive, keeper_pid, read_state, state_path};

/// `defibctl ARGS` against the lab's controller, from its namespace.
pub(super) fn defibctl(state: &Value, args: &[&str]) -> anyhow::Result<String> {
    // Built by `up`; building again here would only cost time.
    let bin = defib_tests::workspace_root().join("target/debug/defibctl");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            state["controller_ns"].as_str().unwrap_or(""),
        ])
        .arg(bin)
        .args(["--url", state["api_url"].as_str().unwrap_or("")])
        .args(["--token-file", state["token_file"].as_str().unwrap_or("")])
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
    println!(
        "controller pid {} in namespace {} ({})",
        state["pids"]["controller"], state["controller_ns"], state["api_url"]
    );
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
    print!("{}", defibctl(&state, &["hosts"])?);
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
