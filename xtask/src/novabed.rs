//! `cargo xtask novabed install|start|stop|status|env`: the project's real OpenStack
//! test bed — Nova 34 with Placement, Glance, Neutron (API, RPC server), RabbitMQ and
//! MariaDB, three nova-compute processes with a restartable fake virt driver (hosts
//! fake-1..fake-3) and one lab L3 agent per host (Neutron's own agent RPC: state
//! reports, router sync, notifications) — all on 127.0.0.1, installed under [`DIR`] (override with
//! `NOVABED`). The work is done by xtask/novabed/novabed.sh (adapted from the reference
//! recipe in ../shared/testbed/novabed, pitfalls included; see the comments there).
//!
//! Ports: nova-api 38774, placement 38778, glance 39292, neutron 39696, RabbitMQ
//! 35672/35673, epmd 34369, MariaDB 33306. Identity: no Keystone; nova-api trusts the
//! `X-User-Id`/`X-Project-Id`/`X-Roles` headers, Placement takes `X-Auth-Token: admin`.
//!
//! install: ~2 min once (apt + a pinned venv), then nothing. start: ~1 min cold, nothing
//! when it runs. stop: ends exactly the pids `start` recorded.
use std::path::PathBuf;
use std::process::Command;

use clap::Subcommand;

/// Where the test bed lives (venv, config, databases, logs, pid list).
pub const DIR: &str = "/var/lib/defib-novabed";

#[derive(Subcommand)]
pub enum Action {
    /// Install RabbitMQ, MariaDB (apt) and Nova, Placement, Glance, Neutron (a pinned
    /// venv). Idempotent: nothing to do when installed.
    Install,
    /// Install if needed, then start everything and wait until Nova has its 3 fake
    /// hosts, a flavor and an image, and Neutron 3 live L3 agents. Nothing to do when
    /// it runs (but start Neutron's RPC server and L3 agents if they do not run).
    Start,
    /// Stop what `start` started (by pid).
    Stop,
    /// Print what runs.
    Status,
    /// Print the endpoints and headers to use.
    Env,
}

fn script() -> PathBuf {
    defib_tests::workspace_root().join("xtask/novabed/novabed.sh")
}

fn command(arg: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg(script()).arg(arg);
    if std::env::var_os("NOVABED").is_none() {
        c.env("NOVABED", DIR);
    }
    c
}

fn run_script(arg: &str) -> anyhow::Result<()> {
    let status = command(arg).status()?;
    anyhow::ensure!(status.success(), "novabed {arg} failed ({status})");
    Ok(())
}

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Install => run_script("install"),
        Action::Start => {
            run_script("install")?;
            run_script("start")
        }
        Action::Stop => run_script("stop"),
        Action::Status => {
            // Exit code 3 means "not running": a status, not a failure.
            let status = command("status").status()?;
            anyhow::ensure!(
                status.success() || status.code() == Some(3),
                "novabed status failed ({status})"
            );
            Ok(())
        }
        Action::Env => run_script("env"),
    }
}

/// Whether the test bed answers now.
pub fn running() -> bool {
    command("status")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// For `cargo xtask test`: install and start it.
pub fn for_tests() -> anyhow::Result<()> {
    run_script("install")?;
    run_script("start")
}

pub fn stop() -> anyhow::Result<()> {
    run_script("stop")
}
