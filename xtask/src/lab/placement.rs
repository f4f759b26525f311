//! Where each lab VM runs now, two ways: the machine's own account (its qemu processes,
//! found by UUID in /proc, and the lab host whose libvirt wrote that pid) and defib's
//! (the controller's VM list). Drills pick their targets from it, `lab status` explains
//! a watchdog's count with it, and the drills' health check compares the two.
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::alive;
use super::describe::defibctl_json;

/// One qemu process of a lab VM.
#[derive(Clone, Debug)]
pub(super) struct Qemu {
    pub pid: u64,
    /// The lab host whose libvirt runs it (its pid file names this pid), if any does.
    pub host: Option<String>,
}

/// One lab VM (a guest the keeper made), as the machine and as defib see it now.
#[derive(Clone, Debug)]
pub(super) struct Vm {
    pub name: String,
    pub uuid: String,
    pub qemus: Vec<Qemu>,
    /// Where defib places it and in which state (absent: defib does not list it).
    pub defib: Option<(String, String)>,
}

impl Vm {
    /// `dfb-…-h0-g0-… (uuid)`.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.uuid)
    }

    /// The one host it runs on and defib places it on, Running; `None` if that is not so.
    pub fn runs_once_on(&self) -> Option<&str> {
        let [q] = self.qemus.as_slice() else {
            return None;
        };
        match (&q.host, &self.defib) {
            (Some(h), Some((d, st))) if h == d && st == "Running" => Some(h),
            _ => None,
        }
    }

    /// What is wrong with it, in words: where its qemus run and where defib has it.
    pub fn problem(&self) -> Option<String> {
        if self.runs_once_on().is_some() {
            return None;
        }
        let qemus = if self.qemus.is_empty() {
            "no qemu runs".to_string()
        } else {
            let each: Vec<String> = self
                .qemus
                .iter()
                .map(|q| {
                    format!(
                        "pid {} on {}",
                        q.pid,
                        q.host.as_deref().unwrap_or("no lab host's libvirt")
                    )
                })
                .collect();
            format!("{} qemu(s): {}", self.qemus.len(), each.join(", "))
        };
        let defib = match &self.defib {
            Some((h, st)) => format!("defib has it {st} on {h}"),
            None => "defib does not list it".to_string(),
        };
        Some(format!("{}: {qemus}; {defib}", self.label()))
    }
}

/// Every lab VM now. Only the libvirt lab has VMs of its own (the Nova lab's servers
/// have no qemu): empty there.
pub(super) fn survey(state: &Value) -> anyhow::Result<Vec<Vm>> {
    let guests: Vec<(String, String)> = state["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["guests"].as_array().cloned().unwrap_or_default())
        .filter_map(|g| {
            Some((
                g["name"].as_str()?.to_string(),
                g["uuid"].as_str()?.to_string(),
            ))
        })
        .collect();
    if guests.is_empty() {
        return Ok(Vec::new());
    }
    let defib = defib_placement(state)?;
    let qemus = qemus_by_uuid();
    Ok(guests
        .into_iter()
        .map(|(name, uuid)| {
            let qemus = qemus
                .get(&uuid)
                .into_iter()
                .flatten()
                .map(|&pid| Qemu {
                    pid,
                    host: host_running(state, &name, pid),
                })
                .collect();
            Vm {
                defib: defib.get(&uuid).cloned(),
                name,
                uuid,
                qemus,
            }
        })
        .collect())
}

/// uuid → (host, state) of every VM in the controller's list.
pub(super) fn defib_placement(state: &Value) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let vms = defibctl_json(state, &["vms"])?;
    Ok(vms["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let uuid = v["resource"].as_str()?.strip_prefix("vm:")?;
            Some((
                uuid.to_string(),
                (
                    v["host"].as_str().unwrap_or("?").to_string(),
                    v["state"].as_str().unwrap_or("?").to_string(),
                ),
            ))
        })
        .collect())
}

/// The lab host whose libvirt runs `pid` as domain `name` (its pid file says so).
fn host_running(state: &Value, name: &str, pid: u64) -> Option<String> {
    state["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| {
            h["pid_dir"]
                .as_str()
                .and_then(|d| {
                    std::fs::read_to_string(Path::new(d).join(format!("{name}.pid"))).ok()
                })
                .and_then(|s| s.trim().parse::<u64>().ok())
                == Some(pid)
        })
        .and_then(|h| h["name"].as_str().map(String::from))
}

/// Every running qemu of the machine with a `-uuid` argument, by that UUID: the ground
/// truth of "runs twice", whichever libvirt (or none) started it.
fn qemus_by_uuid() -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.contains("qemu-system")) {
            continue;
        }
        let uuid = args
            .iter()
            .position(|a| a == "-uuid")
            .and_then(|i| args.get(i + 1));
        if let Some(uuid) = uuid.filter(|_| alive(pid)) {
            out.entry(uuid.clone()).or_default().push(pid);
        }
    }
    out
}
