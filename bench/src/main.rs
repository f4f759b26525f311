//! defib-bench: runs a scenario many times against the real kernel and writes every
//! sample (JSON), a percentile table (Markdown) and a CDF plot (SVG) to bench/results/.
//! Speed goals live here, not in timed test assertions.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // a synchronous harness

mod blocklist_fence;
mod controller;
mod controller_failover;
mod fence_latency;
mod heartbeat_intake;
mod host_loss;
mod host_memory;
mod nova_evacuate;
mod overload;
mod rbd_uprobe_cost;
mod real_guest_kill;
mod report;
mod restart_in_place;
mod router_move;
mod soak;
mod storage_host_loss;
mod suspect_latency;
mod watchdog_cost;
mod watchdog_restart;

use std::time::Duration;

use clap::{Parser, Subcommand};
use defib_tests::cephbed::{BootSectorQemu, Cephbed};
use defib_tests::guests::{unique_uuid, Guest, GuestDisk, Hostbed};
use defib_tests::{is_event, is_root, FakeQemu, FuseBed, LoopDevice, Watchdog};
use report::Series;

#[derive(Parser)]
#[command(name = "defib-bench")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// kill(SIGKILL) of a watched qemu → its exit event decoded in defib-watchdog.
    ExitLatency {
        #[arg(long, default_value_t = 200)]
        kills: usize,
    },
    /// A disk that stops answering → the stall event, measured past the threshold.
    StallLatency {
        /// Episodes per stall kind (A: loop over FUSE, B: image on FUSE, then real guests
        /// on such a loop device with io='native' and io='io_uring', and on RBD).
        #[arg(long, default_value_t = 10)]
        episodes: usize,
        #[arg(long, default_value_t = 1000)]
        threshold_ms: u64,
        /// The watchdog's `probes.stall_scan_interval_ms` (default 50: its default).
        #[arg(long, default_value_t = 50)]
        scan_interval_ms: u64,
    },
    /// Heartbeats of one host stop → the controller's Up → Suspect timeline entry.
    SuspectLatency {
        #[arg(long, default_value_t = 20)]
        hosts: usize,
        #[arg(long, default_value_t = 100)]
        samples: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// A long run with many simulated hosts (two heartbeats per interval each): the
    /// controller's CPU, engine CPU, memory and lag per second, and every false Suspect;
    /// `--churn`: hosts join, leave, restart and lose a path meanwhile.
    Soak {
        #[arg(long, default_value_t = 10_000)]
        hosts: usize,
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Overrides --minutes (short runs).
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long)]
        churn: bool,
    },
    /// The controller starved of CPU (a cgroup quota) and flooded, with healthy hosts:
    /// false Suspects with and without its own-lag allowance.
    Overload {
        #[arg(long, default_value_t = 1_000)]
        hosts: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 10)]
        quota_pct: u64,
    },
    /// Accepted heartbeat datagrams per second, the controller pinned to one core.
    HeartbeatIntake {
        #[arg(long, default_value_t = 10_000)]
        hosts: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Sender threads (on the cores other than the controller's).
        #[arg(long, default_value_t = 2)]
        senders: usize,
        /// Pre-encode enough datagrams to send at this rate for the whole run.
        #[arg(long, default_value_t = 1_500_000)]
        pool_rate: u64,
        /// Run the controller with this detector.heartbeat_interval_ms instead of the
        /// default 100 (the intake forwards to the engine at most every interval/4 per host).
        #[arg(long)]
        interval_ms: Option<u64>,
        /// Send with sendmmsg instead of UDP GSO (one core of senders may then not
        /// reach 1 M datagrams/s).
        #[arg(long)]
        no_gso: bool,
        /// The ack period the simulated hosts ask for, ms (a default watchdog's: 375;
        /// 0 asks for every heartbeat to be acked, as before heartbeat version 4).
        #[arg(long, default_value_t = 375)]
        ack_period_ms: u32,
    },
    /// Controller RSS idle and with N hosts heartbeating: bytes per tracked host.
    HostMemory {
        /// Host counts, comma-separated (one controller run each).
        #[arg(long, value_delimiter = ',', default_values_t = [1000, 10_000])]
        hosts: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Watchdog restarts while watched processes are killed every few ms: restart time
    /// and exit events lost, with pinned probes and without.
    WatchdogRestart {
        #[arg(long, default_value_t = 20)]
        restarts: usize,
        #[arg(long, default_value_t = 5)]
        kill_every_ms: u64,
        /// Processes started per restart with pinned probes (must outlast the restart at
        /// that kill rate). Every event is fsynced to the spool, so a bigger burst makes
        /// the stop slower.
        #[arg(long, default_value_t = 100)]
        pool: usize,
        /// The same without pinning (an unpinned stop takes about 2 s: it detaches every
        /// probe).
        #[arg(long, default_value_t = 600)]
        pool_unpinned: usize,
    },
    /// SIGKILL of a real guest's qemu (libvirt, KVM) → the watchdog's kernel event and
    /// libvirt's lifecycle event, both seen by one watchdog (needs the hostbed).
    RealGuestKill {
        #[arg(long, default_value_t = 100)]
        kills: usize,
    },
    /// The ceph-blocklist storage fence: decision → blocklist acknowledged and →
    /// verified, against the Ceph test bed.
    BlocklistFence {
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
    /// Host loss → its RBD VM running elsewhere with the storage fence alone (a dead
    /// BMC, the ceph-blocklist level counting alone), against the Ceph test bed.
    StorageFenceHostLoss {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Host loss → fence verified, through ipmi_sim and through Pacemaker, with
    /// Pacemaker's own detection and fencing timed in the same run.
    FenceLatency {
        #[arg(long, default_value_t = 5)]
        ipmi_samples: usize,
        #[arg(long, default_value_t = 3)]
        pacemaker_samples: usize,
        /// corosync totem.token
        #[arg(long, default_value_t = 1000)]
        token_ms: u64,
        /// The controller's `engine.confirm_retry_ms` (how often a confirmation that
        /// answered Alive is asked again).
        #[arg(long, default_value_t = 2000)]
        confirm_retry_ms: u64,
    },
    /// SIGKILL of a real guest's qemu with the controller's libvirt backend → the domain
    /// started again by its host's watchdog (needs the hostbed).
    RestartInPlace {
        #[arg(long, default_value_t = 30)]
        kills: usize,
    },
    /// A lab host powered off at its BMC → Suspect, → fenced, → first evacuation, → its
    /// VMs running on the other hosts (brings up its own `cargo xtask lab`).
    HostLoss {
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[arg(long, default_value_t = 2)]
        guests_per_host: usize,
        /// `lab up --nova`: the hosts are the novabed's fake computes, the VMs Nova
        /// servers (`--servers-per-host` each), the controller's Nova backend.
        #[arg(long)]
        nova: bool,
        #[arg(long, default_value_t = 4)]
        servers_per_host: usize,
        /// `lab up --ceph`: the last guest of each host on an RBD image.
        #[arg(long)]
        ceph: bool,
    },
    /// Several controllers on etcd: leader SIGKILL → the new leader's first action; a
    /// host lost with the leader killed mid-recovery (lab --ha); per-intent etcd write
    /// latency and rate against SQLite.
    ControllerFailover {
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// Host-loss rounds in `lab up --ha` (0: skip).
        #[arg(long, default_value_t = 20)]
        lab_rounds: usize,
        #[arg(long, default_value_t = 2000)]
        intents: usize,
    },
    /// The watchdog's cost with N real guests: the daemon's CPU and each probe's run
    /// time from the kernel's BPF statistics, libvirtd beside it (needs the hostbed).
    WatchdogCost {
        #[arg(long, default_value_t = 50)]
        guests: usize,
        /// How long to sample (once a second).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The heartbeat interval of the watchdog and the controller's detector.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// The guests' disk I/O engine: threads, native (Linux AIO) or io_uring.
        #[arg(long, default_value = "threads")]
        io: String,
        /// The watchdog's `probes.stall_scan_interval_ms` (its default: 50).
        #[arg(long, default_value_t = 50)]
        scan_interval_ms: u64,
    },
    /// What the librbd uprobes cost a qemu doing RBD I/O: `qemu-img bench` on an image
    /// of the Ceph test bed without and with a watchdog watching it (needs the cephbed).
    RbdUprobeCost {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// 4 KiB writes per run.
        #[arg(long, default_value_t = 20000)]
        requests: usize,
    },
    /// A Nova host with N servers fails → all ACTIVE elsewhere: defib's planned parallel
    /// evacuation against the naive one-at-a-time way, same run (needs the novabed).
    NovaEvacuate {
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[arg(long, default_value_t = 30)]
        servers: usize,
    },
    /// A host's L3 agent with N routers fails → all routers bound to live agents on the
    /// other hosts, through a real Neutron (needs the novabed).
    RouterMove {
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Router counts, one measurement series each.
        #[arg(long, value_delimiter = ',', default_value = "20,200")]
        routers: Vec<usize>,
    },
}

pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        is_root(),
        "run the benchmarks as root (eBPF probes, FUSE, loop devices)"
    );
    // Measure the daemon as it ships.
    std::env::set_var("DEFIB_RELEASE", "1");
    let md = match cli.scenario {
        Scenario::ExitLatency { kills } => exit_latency(kills)?,
        Scenario::StallLatency {
            episodes,
            threshold_ms,
            scan_interval_ms,
        } => stall_latency(episodes, threshold_ms, scan_interval_ms)?,
        Scenario::SuspectLatency {
            hosts,
            samples,
            interval_ms,
        } => suspect_latency::run(hosts, samples, interval_ms)?,
        Scenario::HeartbeatIntake {
            hosts,
            seconds,
            senders,
            pool_rate,
            interval_ms,
            no_gso,
            ack_period_ms,
        } => heartbeat_intake::run(
            hosts,
            seconds,
            senders,
            pool_rate,
            interval_ms,
            !no_gso,
            ack_period_ms,
        )?,
        Scenario::Soak {
            hosts,
            minutes,
            seconds,
            interval_ms,
            churn,
        } => soak::run(&soak::Soak {
            hosts,
            seconds: seconds.unwrap_or(minutes * 60),
            interval_ms,
            churn,
        })?,
        Scenario::Overload {
            hosts,
            seconds,
            quota_pct,
        } => overload::run(hosts, seconds, quota_pct)?,
        Scenario::HostMemory { hosts, seconds } => host_memory::run(&hosts, seconds)?,
        Scenario::RealGuestKill { kills } => real_guest_kill::run(kills)?,
        Scenario::FenceLatency {
            ipmi_samples,
            pacemaker_samples,
            token_ms,
            confirm_retry_ms,
        } => fence_latency::run(ipmi_samples, pacemaker_samples, token_ms, confirm_retry_ms)?,
        Scenario::RestartInPlace { kills } => restart_in_place::run(kills)?,
        Scenario::HostLoss {
            rounds,
            guests_per_host,
            nova: false,
            ceph,
            ..
        } => host_loss::run(rounds, guests_per_host, ceph)?,
        Scenario::HostLoss {
            rounds,
            servers_per_host,
            nova: true,
            ..
        } => host_loss::run_nova(rounds, servers_per_host)?,
        Scenario::WatchdogCost {
            guests,
            seconds,
            interval_ms,
            io,
            scan_interval_ms,
        } => watchdog_cost::run(guests, seconds, interval_ms, &io, scan_interval_ms)?,
        Scenario::ControllerFailover {
            rounds,
            lab_rounds,
            intents,
        } => controller_failover::run(rounds, lab_rounds, intents)?,
        Scenario::NovaEvacuate { rounds, servers } => nova_evacuate::run(rounds, servers)?,
        Scenario::RbdUprobeCost { rounds, requests } => rbd_uprobe_cost::run(rounds, requests)?,
        Scenario::BlocklistFence { samples } => blocklist_fence::run(samples)?,
        Scenario::StorageFenceHostLoss { rounds } => storage_host_loss::run(rounds)?,
        Scenario::RouterMove { rounds, routers } => router_move::run(rounds, &routers)?,
        Scenario::WatchdogRestart {
            restarts,
            kill_every_ms,
            pool,
            pool_unpinned,
        } => watchdog_restart::run(restarts, kill_every_ms, pool, pool_unpinned)?,
    };
    println!("{md}");
    Ok(())
}

fn exit_latency(kills: usize) -> anyhow::Result<String> {
    let mut wd = Watchdog::start(&[]);
    let wait = Duration::from_secs(10);
    let (mut total, mut kernel, mut delivery) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..kills {
        let vm = FakeQemu::start(
            "qemu-system-x86_64",
            &format!("bench-{i}"),
            "c0ffee00-0000-4000-8000-00000000be1c",
            &[],
        );
        let pid = vm.pid();
        wd.expect("qemu_started", wait, |v| is_event(v, "qemu_started", pid));
        let t0 = monotonic_ns();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let ev = wd.expect("qemu_exited", wait, |v| is_event(v, "qemu_exited", pid));
        anyhow::ensure!(ev["signal"] == 9, "unexpected exit event {ev}");
        let k = ev["kernel_ns"].as_u64().unwrap_or(0);
        let o = ev["observed_ns"].as_u64().unwrap_or(0);
        total.push(ms(o.saturating_sub(t0)));
        kernel.push(ms(k.saturating_sub(t0)));
        delivery.push(ms(o.saturating_sub(k)));
        drop(vm); // reaps it
    }
    let series = [
        Series {
            name: "kill() → event in userspace".into(),
            samples_ms: total,
        },
        Series {
            name: "kill() → last thread exits (kernel stamp)".into(),
            samples_ms: kernel,
        },
        Series {
            name: "kernel stamp → decoded in daemon".into(),
            samples_ms: delivery,
        },
    ];
    report::write(
        &report::results_dir(),
        "exit-latency",
        &format!("cargo xtask bench exit-latency --kills {kills}"),
        "t0 is CLOCK_MONOTONIC read by the bench right before kill(2); the event's observed_ns is \
         CLOCK_MONOTONIC read by defib-watchdog (release build) when it decoded the ring-buffer record. \
         Target: p99 ≤ 5 ms.",
        &series,
    )
}

fn stall_latency(
    episodes: usize,
    threshold_ms: u64,
    scan_interval_ms: u64,
) -> anyhow::Result<String> {
    let threshold = threshold_ms.to_string();
    let config = tempfile::NamedTempFile::new()?;
    std::fs::write(
        config.path(),
        format!("[probes]\nstall_scan_interval_ms = {scan_interval_ms}\n"),
    )?;
    let config_path = config.path().display().to_string();
    let mut wd = Watchdog::start(&["--stall-threshold-ms", &threshold, "--config", &config_path]);
    let mut series = Vec::new();
    for kind in ["A", "B"] {
        let bed = FuseBed::new();
        let image = bed.create_image(&format!("bench-{kind}.raw"), 16 << 20);
        let lo = (kind == "A").then(|| LoopDevice::attach(&image));
        let disk = lo
            .as_ref()
            .map(|l| l.path.display().to_string())
            .unwrap_or_else(|| image.display().to_string());
        let mut args = vec!["--defib-write", disk.as_str()];
        if kind == "A" {
            args.push("--defib-direct");
        }
        let vm = FakeQemu::start(
            "qemu-system-x86_64",
            &format!("bench-stall-{kind}"),
            "c0ffee00-0000-4000-8000-00000000be1d",
            &args,
        );
        let label = format!("kind {kind}");
        series.extend(stall_episodes(
            &mut wd,
            &bed,
            vm.pid(),
            episodes,
            threshold_ms,
            &label,
        ));
        drop(vm);
    }
    // qemu's other I/O engines, on real KVM guests (a fake writer would not use them):
    // only the block and io_uring probes see these requests.
    let hostbed = Hostbed::ensure().map_err(|e| {
        anyhow::anyhow!(
            "the native and io_uring kinds need the hostbed (`cargo xtask hostbed start`): {e}"
        )
    })?;
    for io in ["native", "io_uring"] {
        let bed = FuseBed::new();
        let file = format!("bench-{io}.raw");
        let image = bed.create_image(&file, defib_tests::guests::DISK_SIZE);
        hostbed.write_boot_sector(&bed.real_dir().join(&file), 0);
        let lo = LoopDevice::attach(&image);
        let guest = Guest::start(
            &format!("bench-stall-{}", io.replace('_', "")),
            &unique_uuid(),
            GuestDisk::BlockWith {
                dev: lo.path.clone(),
                io,
            },
        );
        anyhow::ensure!(
            guest.wait_io(guest.io_count() + 2, Duration::from_secs(10)),
            "the {io} guest does not write its disk"
        );
        let label = format!("io='{io}' guest");
        let pid = guest.pid();
        series.extend(stall_episodes(
            &mut wd,
            &bed,
            pid,
            episodes,
            threshold_ms,
            &label,
        ));
        drop(guest);
    }
    // A real KVM guest whose disk is an RBD image of the Ceph test bed (qemu's librbd):
    // only the librbd uprobes see its requests; the OSD is stopped.
    let ceph = Cephbed::ensure().map_err(|e| {
        anyhow::anyhow!("the rbd kind needs the Ceph test bed (`cargo xtask cephbed start`): {e}")
    })?;
    let image = ceph.import("bench-stall", hostbed.boot_sector(), 16 << 20);
    let guest = BootSectorQemu::start("bench-stall-rbd", &unique_uuid(), &image.qemu_drive("none"));
    anyhow::ensure!(
        guest.wait_writes(3, Duration::from_secs(30)),
        "the RBD guest does not write its disk"
    );
    let osd = ceph.osd_pid();
    let signal = |sig| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(osd as i32), sig);
    };
    let stop = || signal(nix::sys::signal::Signal::SIGSTOP);
    let resume = || signal(nix::sys::signal::Signal::SIGCONT);
    // Whatever happens below (a panic on a missing event), Ceph is not left frozen.
    struct ContinueOsd<F: Fn()>(F);
    impl<F: Fn()> Drop for ContinueOsd<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let _continue = ContinueOsd(resume);
    series.extend(stall_episodes_with(
        &mut wd,
        (&stop, &resume, "SIGSTOP of the OSD"),
        guest.pid(),
        episodes,
        threshold_ms,
        "RBD guest",
    ));
    drop(guest);
    let scenario = match scan_interval_ms {
        50 => "stall-latency".to_string(),
        n => format!("stall-latency-scan-{n}ms"),
    };
    report::write(
        &report::results_dir(),
        &scenario,
        &format!(
            "cargo xtask bench stall-latency --episodes {episodes} --threshold-ms {threshold_ms} --scan-interval-ms {scan_interval_ms}"
        ),
        "Kind A: a disk on a loop device whose backing file is on a bindfs (FUSE) mount, O_DIRECT \
         writes, bindfs SIGSTOPped (writer in D state). Kind B: the image file directly on the \
         bindfs mount (writer asleep in FUSE, S state). Then real KVM guests whose disk is such a \
         loop device with io='native' cache='none' (Linux AIO: seen by the block-layer probes \
         only) and io='io_uring' (seen on the ring and in the block layer), and a guest whose \
         disk is an RBD image of the Ceph test bed through qemu's librbd, its OSD SIGSTOPped \
         (seen by the librbd uprobes only); a guest writes once a second, so its SIGSTOP → event row includes the wait for its next write. The first \
         row of each kind is the detection delay past the threshold (the daemon scans the \
         in-flight maps every --scan-interval-ms). Targets: ≤ 150 ms (issue 18), ≤ 20 ms \
         (issue 24).",
        &series,
    )
}

/// `episodes` stalls of the writer `pid` on `bed`: each stops the FUSE daemon, waits for
/// the stall, resumes it and waits for the end. Two series: past the threshold, and
/// since the stop.
fn stall_episodes(
    wd: &mut Watchdog,
    bed: &FuseBed,
    pid: u32,
    episodes: usize,
    threshold_ms: u64,
    label: &str,
) -> [Series; 2] {
    let stop = || bed.stall();
    let resume = || bed.resume();
    stall_episodes_with(
        wd,
        (&stop, &resume, "SIGSTOP of the FUSE daemon"),
        pid,
        episodes,
        threshold_ms,
        label,
    )
}

/// [`stall_episodes`] with any way to stop and resume the writer's storage.
fn stall_episodes_with(
    wd: &mut Watchdog,
    (stop, resume, stopped_what): (&dyn Fn(), &dyn Fn(), &str),
    pid: u32,
    episodes: usize,
    threshold_ms: u64,
    label: &str,
) -> [Series; 2] {
    let wait = Duration::from_secs(threshold_ms / 1000 + 10);
    let (mut past_threshold, mut since_stop) = (Vec::new(), Vec::new());
    for _ in 0..episodes {
        std::thread::sleep(Duration::from_millis(300));
        let stopped = monotonic_ns();
        stop();
        let started = wd.expect("disk_stall_started", wait, |v| {
            is_event(v, "disk_stall_started", pid)
                && v["since_ns"].as_u64().unwrap_or(0) >= stopped.saturating_sub(200_000_000)
        });
        resume();
        let since = started["since_ns"].as_u64().unwrap_or(0);
        let observed = started["observed_ns"].as_u64().unwrap_or(0);
        past_threshold.push(ms(observed.saturating_sub(since + threshold_ms * 1_000_000)));
        since_stop.push(ms(observed.saturating_sub(stopped)));
        wd.expect("disk_stall_ended", wait, |v| {
            is_event(v, "disk_stall_ended", pid) && v["since_ns"] == started["since_ns"]
        });
    }
    [
        Series {
            name: format!("{label}: stuck operation's start + threshold → event"),
            samples_ms: past_threshold,
        },
        Series {
            name: format!("{label}: {stopped_what} → event"),
            samples_ms: since_stop,
        },
    ]
}
