//! The watchdog's probes against real qemu processes started by libvirt on the project's
//! hostbed (`cargo xtask hostbed start`): KVM guests whose disk is a boot sector that
//! writes a sector and prints `HB-IO <n>` every second (tests/guest/hbguest.S).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use defib_tests::guests::{unique_uuid, DiskFormat, Guest, GuestDisk};
use defib_tests::{
    have_command, is_event, require, require_hostbed, FuseBed, LoopDevice, Watchdog,
};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn a_real_guest_whose_qemu_is_sigkilled_is_reported_once_with_signal_killer_and_libvirt_uuid_and_name(
) {
    let _hostbed = require_hostbed!();
    let mut wd = Watchdog::start(&[]);
    let uuid = unique_uuid();
    let guest = Guest::start("kill", &uuid, GuestDisk::Plain);
    let pid = guest.pid();
    let started = wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));
    assert_eq!(started["vm"]["uuid"], uuid, "{started}");
    assert_eq!(started["vm"]["name"], guest.name(), "{started}");

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
    assert_eq!(ev["vm"]["uuid"], uuid, "{ev}");
    assert_eq!(ev["vm"]["name"], guest.name(), "{ev}");
    assert_eq!(ev["comm"], "qemu-system-x86", "{ev}");
    assert_eq!(ev["oom_killed"], false, "{ev}");
    // libvirtd notices the death and cleans up after it (signals to a dead pid, its own
    // monitor teardown): still one exit, one event.
    std::thread::sleep(Duration::from_millis(1500));
    let exits = wd
        .seen()
        .iter()
        .filter(|v| is_event(v, "qemu_exited", pid))
        .count();
    assert_eq!(exits, 1, "one exit, one event: {:?}", wd.seen());
}

/// Stall kind A on a real guest: its disk is a loop device (`type='block'`,
/// `io='threads'`) whose backing file sits on a FUSE mount whose daemon is stopped.
#[test]
fn a_real_guest_on_a_loop_device_over_stopped_fuse_gives_a_stall_while_stuck_and_an_end_after() {
    let hostbed = require_hostbed!();
    require!(have_command("bindfs"), "bindfs (FUSE passthrough)");
    require!(Path::new("/dev/fuse").exists(), "/dev/fuse");
    let bed = FuseBed::new();
    let image = bed.create_image("guest-a.raw", defib_tests::guests::DISK_SIZE);
    hostbed.write_boot_sector(&bed.real_dir().join("guest-a.raw"), 0);
    let lo = LoopDevice::attach(&image);
    let lo_name = lo.path.display().to_string();
    let guest = Guest::start("stall-a", &unique_uuid(), GuestDisk::Block(lo.path.clone()));
    stall_scenario(&bed, &guest, &lo_name, "syscall");
}

/// Stall kind A with Linux AIO (`io='native' cache='none'`): `io_submit` returns at once,
/// so no syscall is in flight; the request waits in the block layer of the loop device.
#[test]
fn a_real_guest_with_native_aio_on_a_loop_device_over_stopped_fuse_gives_a_stall_while_stuck_and_an_end_after(
) {
    block_stall_with_io("native");
}

/// Stall kind A with io_uring (`io='io_uring'`): the request is on qemu's ring and in the
/// block layer, never in a read/write syscall.
#[test]
fn a_real_guest_with_io_uring_on_a_loop_device_over_stopped_fuse_gives_a_stall_while_stuck_and_an_end_after(
) {
    block_stall_with_io("io_uring");
}

fn block_stall_with_io(io: &'static str) {
    let hostbed = require_hostbed!();
    require!(have_command("bindfs"), "bindfs (FUSE passthrough)");
    require!(Path::new("/dev/fuse").exists(), "/dev/fuse");
    let bed = FuseBed::new();
    let file = format!("guest-{io}.raw");
    let image = bed.create_image(&file, defib_tests::guests::DISK_SIZE);
    hostbed.write_boot_sector(&bed.real_dir().join(&file), 0);
    let lo = LoopDevice::attach(&image);
    let lo_name = lo.path.display().to_string();
    let guest = Guest::start(
        &format!("stall-{}", io.replace('_', "")),
        &unique_uuid(),
        GuestDisk::BlockWith {
            dev: lo.path.clone(),
            io,
        },
    );
    // Only the block layer sees a native request (io_submit has long returned); an
    // io_uring one is seen on its ring too.
    let layer = if io == "native" { "block" } else { "io_uring" };
    stall_scenario(&bed, &guest, &lo_name, layer);
}

/// Stall kind B on a real guest: its qcow2 image sits directly on the stopped FUSE mount.
#[test]
fn a_real_guest_with_a_qcow2_image_on_a_stopped_fuse_mount_gives_a_stall_while_stuck_and_an_end_after(
) {
    let hostbed = require_hostbed!();
    require!(have_command("bindfs"), "bindfs (FUSE passthrough)");
    require!(Path::new("/dev/fuse").exists(), "/dev/fuse");
    require!(have_command("qemu-img"), "qemu-img (qemu-utils)");
    let bed = FuseBed::new();
    hostbed.make_boot_disk(&bed.real_dir().join("guest-b.qcow2"), DiskFormat::Qcow2, 0);
    let guest = Guest::start(
        "stall-b",
        &unique_uuid(),
        GuestDisk::File {
            path: bed.fuse_dir().join("guest-b.qcow2"),
            format: DiskFormat::Qcow2,
        },
    );
    stall_scenario(&bed, &guest, "guest-b.qcow2", "syscall");
}

/// Resumes the FUSE daemon when dropped, so that a failing test does not leave a qemu
/// stuck on it while the guest is destroyed.
struct ResumeOnDrop<'a>(&'a FuseBed);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// `layer`: the probe family that must report a stuck operation (`syscall`, `block`,
/// `io_uring`).
fn stall_scenario(bed: &FuseBed, guest: &Guest, path_contains: &str, layer: &str) {
    let _resume = ResumeOnDrop(bed);
    let mut wd = Watchdog::start(&["--stall-threshold-ms", "1000"]);
    let pid = guest.pid();
    let uuid = guest.uuid().to_string();
    wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));

    // Healthy I/O for a while: the guest writes, no stall.
    let before = guest.io_count();
    assert!(
        guest.wait_io(before + 2, Duration::from_secs(5)),
        "the guest does not write its disk: {}",
        std::fs::read_to_string(guest.serial_log()).unwrap_or_default()
    );
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
    // reported while the I/O was stuck. The guest writes once a second, so its next write
    // comes within 1 s, and the threshold is 1 s.
    let started = wd.wait_for(Duration::from_secs(8), |v| {
        is_event(v, "disk_stall_started", pid)
    });
    let stuck_io = guest.io_count();
    eprintln!(
        "qemu {pid} threads {:?} after the mount stopped:\n{}",
        stopped_at.elapsed(),
        guest.threads()
    );
    let Some(started) = started else {
        bed.resume();
        let seen = wd.seen().to_vec();
        panic!(
            "no disk_stall_started while stuck; events: {seen:?}\n{}",
            wd.stderr_text()
        );
    };
    eprintln!(
        "stall reported {:?} after the mount stopped: {started}",
        stopped_at.elapsed()
    );
    assert_eq!(started["vm"]["uuid"], uuid.as_str(), "{started}");
    assert_eq!(started["vm"]["name"], guest.name(), "{started}");
    assert_eq!(started["threshold_ms"], 1000, "{started}");
    let ops = started["stuck_ops"].as_array().expect("stuck_ops");
    assert!(!ops.is_empty(), "{started}");
    assert!(
        ops.iter()
            .any(|o| o["path"].as_str().unwrap_or("").contains(path_contains)),
        "no stuck op on {path_contains}: {started}"
    );
    assert!(
        ops.iter().any(|o| o["layer"] == layer),
        "no stuck op seen by the {layer} probes: {started}"
    );
    assert!(
        !wd.seen()
            .iter()
            .any(|v| is_event(v, "disk_stall_ended", pid)),
        "ended before the mount was resumed: {:?}",
        wd.seen()
    );
    // The guest is really stuck: no disk write completes while the mount is stopped.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(guest.io_count(), stuck_io, "the guest wrote while stuck");

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
    // And the guest goes on writing.
    assert!(
        guest.wait_io(stuck_io + 2, Duration::from_secs(10)),
        "the guest did not resume writing: {}",
        std::fs::read_to_string(guest.serial_log()).unwrap_or_default()
    );
    let starts = wd
        .seen()
        .iter()
        .filter(|v| is_event(v, "disk_stall_started", pid))
        .count();
    assert_eq!(starts, 1, "one stall, one episode: {:?}", wd.seen());
}
