//! `cargo xtask fencebed install|status`: what the fencing tests need on this machine.
//!
//! The BMCs and the cluster are per-test fixtures (tests/src/bmc.rs starts one
//! `ipmi_sim` per lab host in the lab's own network namespace; tests/src/pacemaker.rs a
//! corosync + Pacemaker node in each lab host's namespaces; both stop what they started
//! by PID), so this bed only installs: OpenIPMI's `ipmi_sim`, `ipmitool`, the ClusterLabs
//! fence agents (`fence_ipmilan`), corosync and Pacemaker with its CLI tools. Adapted from
//! the reference recipes 4 and 5 in ../shared/testbed/hostbed.
//! Idempotent: nothing is done when every program is there.
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Action {
    /// Install openipmi (ipmi_sim), ipmitool, fence-agents, corosync, pacemaker and
    /// pacemaker-cli-utils. Idempotent.
    Install,
    /// Print which of the programs are there.
    Status,
}

/// Debian package → the program the tests run from it.
const PACKAGES: &[(&str, &str)] = &[
    ("openipmi", "ipmi_sim"),
    ("ipmitool", "ipmitool"),
    ("fence-agents", "fence_ipmilan"),
    ("corosync", "corosync"),
    ("pacemaker", "pacemakerd"),
    ("pacemaker-cli-utils", "crm_mon"),
];

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Install => install(),
        Action::Status => {
            for (pkg, prog) in PACKAGES {
                let state = if have(prog) { "installed" } else { "missing" };
                println!("{prog:<14} ({pkg}): {state}");
            }
            Ok(())
        }
    }
}

fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn install() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, prog)| !have(prog))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::ensure!(defib_tests::is_root(), "installing {missing:?} needs root");
    let apt = ["-o", "DPkg::Lock::Timeout=600"];
    eprintln!("xtask fencebed: apt-get install {}", missing.join(" "));
    let status = Command::new("apt-get")
        .args(apt)
        .args(["update", "-q"])
        .status()
        .context("apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    let status = Command::new("apt-get")
        .args(apt)
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    let still: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, prog)| !have(prog))
        .map(|(_, prog)| *prog)
        .collect();
    anyhow::ensure!(still.is_empty(), "still missing after apt-get: {still:?}");
    Ok(())
}

/// For `cargo xtask test`: under `CI=true` a failed install fails the run; elsewhere the
/// fencing tests skip and say why.
pub fn for_tests() -> anyhow::Result<()> {
    match install() {
        Ok(()) => Ok(()),
        Err(e) if defib_tests::ci() => Err(e.context("installing the fencebed (CI=true)")),
        Err(e) => {
            eprintln!("xtask fencebed: not available ({e:#}); the fencing tests will skip");
            Ok(())
        }
    }
}
