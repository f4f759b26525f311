//! The watchdog's probes against the real kernel: qemu exits (signal, killer, exit code,
//! OOM), processes found by the /proc scan, and both kinds of disk stall.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::process::Command;
use std::time::{Duration, Instant};

use defib_tests::{
    have_command, is_event, is_root, require, FakeQemu, FuseBed, LoopDevice, Watchdog,
};

const UUID: &str = "c0ffee00-0000-4000-8000-000000000001";
const WAIT: Duration = Duration::from_secs(10);

#[test]
fn a_sigkilled_qemu_is_reported_with_signal_killer_and_vm_uuid() {
    require!(is_root(), "root (BPF)");
    let mut wd = Watchdog::start(&[]);
    let qemu = FakeQemu::start("qemu-system-x86_64", "vm-kill", UUID, &[]);
    let pid = qemu.pid();
    wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));

    // The killer is a separate process, so its pid is not ours.
    let mut killer = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .spawn()
        .expect("kill");
    let killer_pid = killer.id();
    assert!(killer.wait().expect("wait kill").success());

    let ev = wd.expect("qemu_exited", WAIT, |v| is_event(v, "qemu_exited", pid));
    assert_eq!(ev["signal"], 9, "{ev}");
    assert_eq!(ev["signal_name"], "SIGKILL", "{ev}");
    assert_eq!(ev["exit_code"], serde_json::Value::Null, "{ev}");
    assert_eq!(ev["killer"]["pid"], killer_pid, "{ev}");
    assert_eq!(ev["killer"]["comm"], "kill", "{ev}");
    assert_eq!(ev["vm"]["uuid"], UUID, "{ev}");
    assert_eq!(ev["vm"]["name"], "vm-kill", "{ev}");
    assert_eq!(ev["comm"], "qemu-system-x86", "{ev}");
    assert_eq!(ev["oom_killed"], false, "{ev}");
    let (k, o) = (
        ev["kernel_ns"].as_u64().unwrap(),
        ev["observed_ns"].as_u64().unwrap(),
    );
    assert!(o >= k, "observed before the kernel stamped it: {ev}");
    let exits = wd
        .seen()
        .iter()
        .filter(|v| is_event(v, "qemu_exited", pid))
        .count();
    assert_eq!(exits, 1, "one exit, one event");
}

#[test]
fn a_qemu_that_exits_by_itself_is_reported_with_its_exit_code() {
    require!(is_root(), "root (BPF)");
    let mut wd = Watchdog::start(&[]);
    let qemu = FakeQemu::start(
        "qemu-kvm",
        "vm-exit",
        UUID,
        &["--defib-exit-after-ms", "300", "--defib-exit-code", "7"],
    );
    let pid = qemu.pid();
    let ev = wd.expect("qemu_exited", WAIT, |v| is_event(v, "qemu_exited", pid));
    assert_eq!(ev["exit_code"], 7, "{ev}");
    assert_eq!(ev["signal"], serde_json::Value::Null, "{ev}");
    assert_eq!(ev["killer"], serde_json::Value::Null, "{ev}");
    assert_eq!(ev["vm"]["uuid"], UUID, "{ev}");
}

#[test]
fn a_qemu_running_before_the_watchdog_starts_is_found_by_the_proc_scan() {
    require!(is_root(), "root (BPF)");
    let qemu = FakeQemu::start("qemu-system-x86_64", "vm-early", UUID, &[]);
    let pid = qemu.pid();
    let mut wd = Watchdog::start(&[]);
    let ev = wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));
    assert_eq!(ev["source"], "scan", "{ev}");
    assert_eq!(ev["vm"]["name"], "vm-early", "{ev}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let ev = wd.expect("qemu_exited", WAIT, |v| is_event(v, "qemu_exited", pid));
    assert_eq!(ev["signal_name"], "SIGTERM", "{ev}");
}

#[test]
fn a_process_with_another_name_is_not_watched() {
    require!(is_root(), "root (BPF)");
    let mut wd = Watchdog::start(&[]);
    let other = FakeQemu::start(
        "not-a-vm",
        "vm-other",
        UUID,
        &["--defib-exit-after-ms", "100"],
    );
    let pid = other.pid();
    // A watched process started after it proves the watchdog was looking all along.
    let qemu = FakeQemu::start(
        "qemu-system-x86_64",
        "vm-after",
        UUID,
        &["--defib-exit-after-ms", "200"],
    );
    wd.expect("qemu_exited", WAIT, |v| {
        is_event(v, "qemu_exited", qemu.pid())
    });
    assert!(
        !wd.seen().iter().any(|v| v["pid"] == pid),
        "events about an unwatched process: {:?}",
        wd.seen()
    );
}

#[test]
fn a_configured_name_is_watched_instead_of_the_defaults() {
    require!(is_root(), "root (BPF)");
    let mut wd = Watchdog::start(&["--watch-name", "my-hypervis*"]);
    let custom = FakeQemu::start(
        "my-hypervisor",
        "vm-custom",
        UUID,
        &["--defib-exit-after-ms", "200"],
    );
    let ev = wd.expect("qemu_exited", WAIT, |v| {
        is_event(v, "qemu_exited", custom.pid())
    });
    assert_eq!(ev["exit_code"], 0, "{ev}");
}

#[test]
fn a_qemu_chosen_by_the_oom_killer_is_flagged() {
    require!(is_root(), "root (BPF, memory cgroup)");
    let memcg = std::path::Path::new("/sys/fs/cgroup/memory");
    require!(
        memcg.join("memory.limit_in_bytes").exists(),
        "a cgroup v1 memory controller at {}",
        memcg.display()
    );
    let group = memcg.join(format!("defib-oom-test-{}", std::process::id()));
    std::fs::create_dir_all(&group).expect("create memory cgroup");
    std::fs::write(group.join("memory.limit_in_bytes"), "48M").expect("limit");
    let _ = std::fs::write(group.join("memory.memsw.limit_in_bytes"), "48M");

    let mut wd = Watchdog::start(&[]);
    let qemu = FakeQemu::start(
        "qemu-system-x86_64",
        "vm-oom",
        UUID,
        &["--defib-alloc-mb", "256", "--defib-alloc-after-ms", "500"],
    );
    let pid = qemu.pid();
    std::fs::write(group.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
    let ev = wd.expect("qemu_exited", Duration::from_secs(30), |v| {
        is_event(v, "qemu_exited", pid)
    });
    drop(qemu);
    let _ = std::fs::remove_dir(&group);
    assert_eq!(ev["oom_killed"], true, "{ev}");
    assert_eq!(ev["signal_name"], "SIGKILL", "{ev}");
}

/// Stall kind A: the disk is a loop device whose backing file sits on a FUSE mount whose
/// daemon is stopped: the writer sleeps in D state with a block request in flight.
#[test]
fn a_disk_on_a_loop_device_over_stopped_fuse_gives_a_stall_while_stuck_and_an_end_after() {
    require!(is_root(), "root (BPF, loop devices, FUSE)");
    require!(have_command("bindfs"), "bindfs (FUSE passthrough)");
    require!(std::path::Path::new("/dev/fuse").exists(), "/dev/fuse");
    let bed = FuseBed::new();
    let image = bed.create_image("disk-a.raw", 16 << 20);
    let lo = LoopDevice::attach(&image);
    stall_scenario(&bed, &lo.path.display().to_string(), true, "loop");
}

/// Stall kind B: the image file sits directly on the stopped FUSE mount: the writer
/// sleeps in S state inside FUSE.
#[test]
fn a_disk_image_on_a_stopped_fuse_mount_gives_a_stall_while_stuck_and_an_end_after() {
    require!(is_root(), "root (BPF, FUSE)");
    require!(have_command("bindfs"), "bindfs (FUSE passthrough)");
    require!(std::path::Path::new("/dev/fuse").exists(), "/dev/fuse");
    let bed = FuseBed::new();
    let image = bed.create_image("disk-b.raw", 16 << 20);
    stall_scenario(&bed, &image.display().to_string(), false, "disk-b.raw");
}

fn stall_scenario(bed: &FuseBed, disk: &str, direct: bool, path_contains: &str) {
    let mut wd = Watchdog::start(&["--stall-threshold-ms", "1000"]);
    let mut args = vec!["--defib-write", disk];
    if direct {
        args.push("--defib-direct");
    }
    let qemu = FakeQemu::start("qemu-system-x86_64", "vm-stall", UUID, &args);
    let pid = qemu.pid();
    wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));
    // Healthy I/O for a while: no stall.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !wd.seen()
            .iter()
            .any(|v| is_event(v, "disk_stall_started", pid)),
        "stall reported while I/O was healthy: {:?}",
        wd.seen()
    );

    let stopped_at = Instant::now();
    bed.stall();
    // The mount stays stopped until this wait is over, so an event found here was
    // reported while the I/O was stuck.
    let started = wd.wait_for(Duration::from_secs(6), |v| {
        is_event(v, "disk_stall_started", pid)
    });
    let Some(started) = started else {
        bed.resume();
        let seen = wd.seen().to_vec();
        panic!(
            "no disk_stall_started while stuck; events: {seen:?}\n{}",
            wd.stderr_text()
        );
    };
    eprintln!(
        "stall reported {:?} after the mount stopped",
        stopped_at.elapsed()
    );
    assert_eq!(started["vm"]["uuid"], UUID, "{started}");
    assert_eq!(started["threshold_ms"], 1000, "{started}");
    let ops = started["stuck_ops"].as_array().expect("stuck_ops");
    assert!(!ops.is_empty(), "{started}");
    assert!(
        ops.iter()
            .any(|o| o["path"].as_str().unwrap_or("").contains(path_contains)),
        "no stuck op on {path_contains}: {started}"
    );
    assert!(
        !wd.seen()
            .iter()
            .any(|v| is_event(v, "disk_stall_ended", pid)),
        "ended before the mount was resumed"
    );

    std::thread::sleep(Duration::from_millis(500));
    bed.resume();
    let ended = wd.expect("disk_stall_ended", WAIT, |v| {
        is_event(v, "disk_stall_ended", pid)
    });
    let duration = ended["duration_ms"].as_u64().expect("duration_ms");
    assert!(
        duration >= 1000,
        "a stall shorter than the threshold was reported: {ended}"
    );
    assert_eq!(
        ended["since_ns"], started["since_ns"],
        "ended is not the end of the same episode"
    );
    let starts = wd
        .seen()
        .iter()
        .filter(|v| is_event(v, "disk_stall_started", pid))
        .count();
    assert_eq!(starts, 1, "one stall, one episode: {:?}", wd.seen());
}
