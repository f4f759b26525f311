//! `cargo xtask cephbed install|start|stop|status|env|wipe`: the project's real Ceph test bed
//! — a single-node Ceph 16.2 (Debian's packages: 1 mon, 1 mgr, 1 OSD whose bluestore is
//! a sparse file, pool `volumes` of size 1, user `client.cinder`) entirely in userspace
//! on 127.0.0.1, for qemu's librbd driver. The work is done by xtask/cephbed/cephbed.sh
//! (adapted from the reference recipe in ../shared/testbed/cephbed), under [`DIR`]
//! (override with `CEPHBED`).
//!
//! Ports (below the ephemeral range): mon 23300 (v2) and 26789 (v1), OSD and mgr
//! 26800–26899. install: ~30 s once (apt), then nothing. start: ~20 s cold (the first
//! one bootstraps the cluster), ~8 s warm, nothing when it runs. stop: ends exactly the
//! pids `start` recorded.
use std::path::PathBuf;
use std::process::Command;

use clap::Subcommand;

/// Where the test bed lives (configuration, keys, daemon data, logs, pid list).
pub const DIR: &str = defib_tests::cephbed::DIR;

#[derive(Subcommand)]
pub enum Action {
    /// Install Ceph's daemons and CLIs and qemu's rbd driver (apt). Idempotent.
    Install,
    /// Install if needed, then start mon, mgr and OSD (bootstrapping the cluster the
    /// first time) and wait for HEALTH_OK. Nothing to do when it runs.
    Start,
    /// Stop what `start` started (by pid).
    Stop,
    /// Print what runs.
    Status,
    /// Print what a client needs (CEPH_CONF, pool, qemu's drive).
    Env,
    /// Stop it and delete the cluster (the next start makes a new one).
    Wipe,
}

fn script() -> PathBuf {
    defib_tests::workspace_root().join("xtask/cephbed/cephbed.sh")
}

fn command(arg: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg(script()).arg(arg);
    if std::env::var_os("CEPHBED").is_none() {
        c.env("CEPHBED", DIR);
    }
    c
}

fn run_script(arg: &str) -> anyhow::Result<()> {
    let status = command(arg).status()?;
    anyhow::ensure!(status.success(), "cephbed {arg} failed ({status})");
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
                "cephbed status failed ({status})"
            );
            Ok(())
        }
        Action::Env => run_script("env"),
        Action::Wipe => run_script("wipe"),
    }
}

/// Whether the test bed runs now.
pub fn running() -> bool {
    command("status")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// For `cargo xtask test`: install and start it. Under `CI=true` a failure fails the
/// run; elsewhere it is said, and the tests that need Ceph skip with their reason.
pub fn for_tests() -> anyhow::Result<()> {
    match run_script("install").and_then(|()| run_script("start")) {
        Ok(()) => Ok(()),
        Err(e) if defib_tests::ci() => Err(e.context("starting the cephbed (CI=true)")),
        Err(e) => {
            eprintln!("xtask cephbed: not available ({e:#}); the tests that need Ceph will skip");
            Ok(())
        }
    }
}

/// For `lab up --ceph`: install and start it, or fail.
pub fn start() -> anyhow::Result<()> {
    run_script("install")?;
    run_script("start")
}

pub fn stop() -> anyhow::Result<()> {
    run_script("stop")
}
