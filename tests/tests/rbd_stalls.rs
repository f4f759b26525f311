//! RBD stalls seen while stuck (issue 24, item 4): a libvirt KVM guest (the boot-sector
//! guest, one sector written a second) whose disk is an RBD network disk on the Ceph test
//! bed, as Nova writes one for a Cinder volume (qemu's own librbd driver, cephx key in a
//! libvirt secret); the OSD is stopped with SIGSTOP. librbd then waits with no error, no
//! D state and no block-layer request, and Ceph still says HEALTH_OK: only the watchdog's
//! librbd uprobes can see the VM's I/O stuck.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use defib_tests::guests::{unique_uuid, Guest, GuestDisk};
use defib_tests::{is_event, is_root, require, require_cephbed, require_hostbed, Watchdog};

const WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_vm_whose_rbd_osd_is_stopped_gets_a_stall_naming_its_disk_while_stuck_and_its_end_after_sigcont(
) {
    require!(is_root(), "root (BPF uprobes)");
    let hostbed = require_hostbed!();
    let ceph = require_cephbed!();
    let image = ceph.import("stall", hostbed.boot_sector(), 16 << 20);
    let secret = ceph.libvirt_secret(defib_tests::guests::LIBVIRT_URI);
    // With libvirt: its inventory names the VM's disk, which the stall report names.
    let mut wd = Watchdog::start(&["--stall-threshold-ms", "1000", "--libvirt"]);
    let uuid = unique_uuid();
    let guest = Guest::start(
        "rbd-stall",
        &uuid,
        GuestDisk::Xml(image.libvirt_disk_xml(&secret)),
    );
    let pid = guest.pid();
    wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));

    // The guest writes through librbd, and healthy I/O is no stall.
    assert!(
        guest.wait_io(guest.io_count() + 2, Duration::from_secs(30)),
        "the guest never wrote through librbd"
    );
    assert!(
        !wd.seen()
            .iter()
            .any(|v| is_event(v, "disk_stall_started", pid)),
        "a stall reported while Ceph was healthy: {:?}",
        wd.seen()
    );

    let stopped_at = Instant::now();
    let osd = ceph.stop_osd();
    // The OSD stays stopped until `osd` is dropped: an event found here was reported
    // while the guest's I/O was stuck.
    let started = wd.wait_for(Duration::from_secs(6), |v| {
        is_event(v, "disk_stall_started", pid)
    });
    let Some(started) = started else {
        drop(osd);
        let seen = wd.seen().to_vec();
        panic!(
            "no disk_stall_started while the OSD was stopped; events: {seen:?}\n{}",
            wd.stderr_text()
        );
    };
    eprintln!(
        "stall reported {:?} after the OSD stopped",
        stopped_at.elapsed()
    );
    let writes_while_stopped = guest.io_count();
    assert_eq!(started["vm"]["uuid"], uuid.as_str(), "{started}");
    let ops = started["stuck_ops"].as_array().expect("stuck_ops");
    assert!(
        !ops.is_empty() && ops.iter().all(|o| o["layer"] == "rbd"),
        "the stuck operations are librbd requests: {started}"
    );
    assert!(
        ops.iter()
            .any(|o| ["write", "read", "flush"].contains(&o["syscall"].as_str().unwrap_or(""))),
        "{started}"
    );
    let disk = format!("rbd:{}", image.spec);
    assert!(
        ops.iter().all(|o| o["path"] == disk.as_str()),
        "the stuck requests name the VM's RBD disk {disk}: {started}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !wd.seen()
            .iter()
            .any(|v| is_event(v, "disk_stall_ended", pid)),
        "the stall ended while the OSD was still stopped: {:?}",
        wd.seen()
    );
    assert_eq!(
        guest.io_count(),
        writes_while_stopped,
        "the guest wrote while its OSD was stopped"
    );

    drop(osd);
    let ended = wd.expect("disk_stall_ended", WAIT, |v| {
        is_event(v, "disk_stall_ended", pid)
    });
    assert_eq!(ended["since_ns"], started["since_ns"], "{ended}");
    let duration = ended["duration_ms"].as_u64().expect("duration_ms");
    assert!(
        duration >= 2500,
        "the stall lasted the whole stop (≥ 1 s to report + 1.5 s): {ended}"
    );
    // And the guest goes on writing.
    assert!(
        guest.wait_io(writes_while_stopped + 1, Duration::from_secs(15)),
        "the guest did not resume its writes"
    );
}
