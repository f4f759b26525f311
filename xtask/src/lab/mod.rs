//! `cargo xtask lab up|status|down|drill`: the commands, and the state file through which
//! each finds the lab that the keeper holds.
//!
//! The lab is built from the test harness (tests/src: `Lab`, `LabNet`, `Bmc`,
//! `Hypervisor`, `Guest`), whose pieces clean up on drop. So that they outlive `lab up`,
//! they live in a *keeper*: `lab up` starts `xtask lab serve` in a session of its own,
//! which builds the lab, writes what it made to `state.json` in the lab directory
//! (`/run/defib-lab`, or `$DEFIB_LAB_DIR`) and waits for SIGTERM; then it drops the lab,
//! which removes exactly what it made. `lab down` sends that SIGTERM and, should the
//! keeper be gone (killed with SIGKILL), removes what the state file lists.
//!
//! `keeper`: `up` and the keeper (`serve`); `cleanup`: `down`; `drills`: the failures a
//! drill injects and what it waits for; `describe`: the controller's account of the lab
//! (`status`, incidents, host states) through defibctl; `nova`: the lab with Nova.
mod cleanup;
mod describe;
mod drills;
mod keeper;
mod nova;
mod placement;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::Subcommand;
use serde_json::Value;

#[derive(Subcommand)]
pub enum Action {
    /// Build everything and start the lab: N lab hosts in network namespaces (management
    /// and storage links, a defib-watchdog and a libvirtd each, an ipmi_sim BMC), KVM
    /// guests, a defib-controller (libvirt backend, IPMI fencing). Says so if it is up.
    /// With `--nova`: the lab hosts are the novabed's fake computes (fake-1…), the
    /// controller has the Nova backend, and Nova servers instead of KVM guests.
    Up {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        #[arg(long, default_value_t = 2)]
        guests_per_host: usize,
        /// The novabed's Nova (started if it does not run) with one fake compute per lab
        /// host; `backend = "nova"`.
        #[arg(long)]
        nova: bool,
        /// With `--nova`: servers booted onto each compute.
        #[arg(long, default_value_t = 4)]
        servers_per_host: usize,
        /// Three controllers electing a leader on a 3-member etcd cluster (in the
        /// controller namespace) instead of one controller on SQLite.
        #[arg(long)]
        ha: bool,
        /// The Ceph test bed (started if it does not run; `cargo xtask cephbed`): the
        /// last guest of each host has its disk on an RBD image through qemu's librbd,
        /// with the cephx key in every lab host's libvirt secret.
        #[arg(long)]
        ceph: bool,
    },
    /// What runs, and the controller's view of hosts and VMs.
    Status,
    /// Stop and remove everything `up` made (nothing else). A no-op when the lab is down.
    Down,
    /// Inject a failure and print the incident's timeline as defib recorded it.
    Drill {
        #[command(subcommand)]
        kind: Drill,
    },
    /// The keeper (run by `up`; not for direct use).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        hosts: usize,
        #[arg(long)]
        guests_per_host: usize,
        /// Servers per compute with `--nova`; absent: the libvirt lab.
        #[arg(long)]
        nova_servers_per_host: Option<usize>,
        /// Three controllers on etcd.
        #[arg(long)]
        ha: bool,
        /// Guests with RBD disks.
        #[arg(long)]
        ceph: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Subcommand)]
pub enum Drill {
    /// Kill the qemu of a guest where it runs now: seen by the kernel (eBPF) and by
    /// libvirt, restarted in place (elsewhere once its restarts in place are spent).
    VmCrash,
    /// Stop the storage under a guest's disk (its loop device's FUSE daemon) past the
    /// watchdog's stall threshold: the stall incident, then the storage back.
    DiskStall,
    /// Power a host off at its BMC: Suspect, fenced (IPMI power off verified), its guests
    /// started on the other hosts; then power it on and unfence it.
    HostLoss,
    /// Cut every link of a host (it runs on): fenced through its BMC, guests evacuated;
    /// then power it on and unfence it.
    Partition,
    /// With `lab up --ha`: power a host off and SIGKILL the leading controller right
    /// after; a follower takes the lead and finishes the recovery (the drill prints
    /// which); the keeper starts the killed controller again, as a follower.
    ControllerLoss,
    /// N drills of random kinds on random targets; after each, every VM must run exactly
    /// once (one qemu per VM UUID) and be Running in defib. Prints the seed first, so
    /// that a failure can be replayed with `--seed`.
    Random {
        /// How many drills.
        #[arg(long)]
        rounds: usize,
        /// The RNG's seed (default: a random one, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

impl Drill {
    /// The kinds `random` draws from (every drill but `random`).
    const KINDS: [Drill; 4] = [
        Drill::VmCrash,
        Drill::DiskStall,
        Drill::HostLoss,
        Drill::Partition,
    ];

    /// Its name on the command line.
    fn name(self) -> &'static str {
        match self {
            Drill::VmCrash => "vm-crash",
            Drill::DiskStall => "disk-stall",
            Drill::HostLoss => "host-loss",
            Drill::Partition => "partition",
            Drill::ControllerLoss => "controller-loss",
            Drill::Random { .. } => "random",
        }
    }
}

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Up {
            hosts,
            guests_per_host,
            nova,
            servers_per_host,
            ha,
            ceph,
        } => keeper::up(
            hosts,
            guests_per_host,
            nova.then_some(servers_per_host),
            ha,
            ceph,
        ),
        Action::Status => describe::status(),
        Action::Down => cleanup::down(),
        Action::Drill { kind } => drills::drill(kind),
        Action::Serve {
            hosts,
            guests_per_host,
            nova_servers_per_host,
            ha,
            ceph,
        } => keeper::serve(hosts, guests_per_host, nova_servers_per_host, ha, ceph),
    }
}

/// Where the lab keeps its state file and the keeper's log.
pub fn lab_dir() -> PathBuf {
    std::env::var_os("DEFIB_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/defib-lab"))
}

/// What the keeper made, as it last wrote it: every other command reads it.
fn state_path() -> PathBuf {
    lab_dir().join("state.json")
}

fn read_state() -> Option<Value> {
    let text = std::fs::read_to_string(state_path()).ok()?;
    serde_json::from_str(&text).ok()
}

/// The process runs (a zombie does not: its pid may be waited for and reused).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().next().map(String::from))
        })
        .is_some_and(|st| st != "Z" && st != "X")
}

/// The keeper's pid, if it still runs: a state file without a keeper is a leftover.
fn keeper_pid(state: &Value) -> Option<u64> {
    state["keeper_pid"].as_u64().filter(|&p| alive(p))
}

/// Written whole and renamed into place, so that a reader never sees half a file.
fn write_state(state: &Value) -> anyhow::Result<()> {
    let tmp = state_path().with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    std::fs::rename(&tmp, state_path())?;
    Ok(())
}

/// `kill -SIGNAL pid`; a process already gone is no error.
fn kill(pid: u64, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}
