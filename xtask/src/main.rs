//! `cargo xtask <task>`: the project's own commands. Each installs what it needs first
//! (idempotent, and fast when everything is there), so a fresh machine needs nothing else.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous tool, not async code

mod bundle;
mod cephbed;
mod demo;
mod fencebed;
mod fuzz;
mod hostbed;
mod lab;
mod linuxguest;
mod novabed;
mod setup;

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and prepare everything the build and the tests need (Debian packages,
    /// nightly rust-src, bpf-linker, tracefs/bpffs mounts). Idempotent.
    Setup,
    /// Setup, start the hostbed (libvirt and real KVM guests), the novabed (real Nova)
    /// and the cephbed (real Ceph), then run the whole test suite (`cargo test`, default members). Extra arguments go to cargo test.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The real-guest test bed: libvirtd under the project's subreaper, boot-sector KVM
    /// guests, a Linux guest under TCG (see xtask/src/hostbed.rs, xtask/src/linuxguest.rs).
    Hostbed {
        #[command(subcommand)]
        action: hostbed::Action,
    },
    /// What the fencing tests need: ipmi_sim, ipmitool, fence agents, corosync and
    /// Pacemaker (see xtask/src/fencebed.rs; BMCs and clusters are started by the tests).
    Fencebed {
        #[command(subcommand)]
        action: fencebed::Action,
    },
    /// The real OpenStack test bed: Nova 34, Placement, Glance, Neutron API, RabbitMQ,
    /// MariaDB, 3 fake-driver computes (see xtask/src/novabed.rs).
    Novabed {
        #[command(subcommand)]
        action: novabed::Action,
    },
    /// The real Ceph test bed: a single-node Ceph (mon, mgr, one OSD on a sparse file)
    /// for VM disks on RBD through qemu's librbd (see xtask/src/cephbed.rs).
    Cephbed {
        #[command(subcommand)]
        action: cephbed::Action,
    },
    /// Build the release binaries and pack the installable bundle: a versioned tar.gz
    /// (binaries, systemd units, example configs, install.sh, docs, Grafana dashboard)
    /// and its .sha256, in target/bundle/.
    Bundle(bundle::Args),
    /// The lab: defib on N namespaced hosts with KVM guests and BMCs, kept running
    /// (`lab up`, `lab status`, `lab drill vm-crash`, `lab drill random --rounds N`,
    /// `lab down`; see docs/lab.md).
    Lab {
        #[command(subcommand)]
        action: lab::Action,
    },
    /// Build the eBPF probes (they are built by watchdog/build.rs; this runs just that).
    BuildEbpf,
    /// Setup, then show the watchdog at work on this machine: a VM's qemu is killed, one
    /// exits by itself, one's disk stalls and recovers; every event is printed.
    Demo,
    /// Run the incident engine's deterministic simulation over N seeds (release build),
    /// checking every invariant after every step. The normal test run does 1,000.
    /// `--seed S` replays one seed and prints its whole trace.
    Sim {
        #[arg(long, default_value_t = 10_000)]
        seeds: u64,
        /// Replay this one seed, printing every step.
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
    },
    /// Run every cargo-fuzz target (protocol/fuzz: heartbeat, ack, frame; fuzz/:
    /// watchdog_config, controller_config, spool_records, spool_open) for N seconds
    /// each on a copy of its committed seed corpus (nightly; installs cargo-fuzz if
    /// missing). Fails naming the crash artifact if a target finds one.
    Fuzz {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Setup, then run a benchmark scenario (see bench/ and BENCHMARKS.md): exit-latency,
    /// stall-latency, real-guest-kill, suspect-latency, heartbeat-intake, soak, overload
    /// (root: a cgroup CPU quota), host-memory,
    /// fence-latency, nova-evacuate (needs the novabed: `cargo xtask novabed start`),
    /// watchdog-restart, restart-in-place, watchdog-cost (need the hostbed), host-loss.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => setup::run().and_then(|()| {
            // Stop afterwards what this run started (by PID); leave a hostbed that was
            // already running as it was.
            let was_running = hostbed::libvirt_answers();
            hostbed::for_tests()?;
            fencebed::for_tests()?;
            let nova_was_running = novabed::running();
            let ceph_was_running = cephbed::running();
            let tests = novabed::for_tests()
                .and_then(|()| cephbed::for_tests())
                .and_then(|()| run_tests(&args));
            if !ceph_was_running {
                if let Err(e) = cephbed::stop() {
                    eprintln!("xtask: stopping the cephbed: {e:#}");
                }
            }
            if !nova_was_running {
                if let Err(e) = novabed::stop() {
                    eprintln!("xtask: stopping the novabed: {e:#}");
                }
            }
            if !was_running {
                if let Err(e) = hostbed::stop() {
                    eprintln!("xtask: stopping the hostbed: {e:#}");
                }
            }
            tests
        }),
        Task::Hostbed { action } => hostbed::run(action),
        Task::Fencebed { action } => fencebed::run(action),
        Task::Novabed { action } => novabed::run(action),
        Task::Cephbed { action } => cephbed::run(action),
        Task::Bundle(args) => bundle::run(&args).map(|_| ()),
        Task::Lab { action } => if matches!(action, lab::Action::Up { .. }) {
            setup::run()
        } else {
            Ok(())
        }
        .and_then(|()| lab::run(action)),
        Task::BuildEbpf => cargo(&["build", "-p", "defib-watchdog"]),
        Task::Demo => setup::run().and_then(|()| demo::run()),
        Task::Sim {
            seed: Some(seed), ..
        } => cargo(&[
            "run",
            "--release",
            "-p",
            "defib-controller",
            "--example",
            "sim_replay",
            "--",
            &seed.to_string(),
        ]),
        Task::Sim { seeds, seed: None } => {
            std::env::set_var("DEFIB_SIM_SEEDS", seeds.to_string());
            cargo(&[
                "test",
                "--release",
                "-p",
                "defib-controller",
                "--test",
                "simulation",
                "--",
                "--nocapture",
            ])
        }
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Bench { args } => setup::run().and_then(|()| {
            let mut a = vec!["run", "--release", "-p", "defib-bench", "--"];
            a.extend(args.iter().map(String::as_str));
            cargo(&a)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_tests(args: &[String]) -> anyhow::Result<()> {
    // Binaries first: the end-to-end tests run them (and would otherwise build them from
    // inside the test run, one at a time).
    cargo(&["build", "--bins"])?;
    let mut a = vec!["test"];
    a.extend(args.iter().map(String::as_str));
    cargo(&a)
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = defib_tests::scrub_cargo_env(&mut Command::new(cargo))
        .args(args)
        .current_dir(defib_tests::workspace_root())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}
