//! RBD stalls seen while stuck (issue 24, item 4): a real qemu (KVM, the boot-sector
//! guest, one sector written a second) whose disk is an image of the Ceph test bed
//! through qemu's own librbd driver; the OSD is stopped with SIGSTOP. librbd then waits
//! with no error, no D state and no block-layer request, and Ceph still says HEALTH_OK:
//! only the watchdog's librbd uprobes can see the VM's I/O stuck.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use defib_tests::{is_event, is_root, require, require_cephbed, require_hostbed, Watchdog};

const UUID: &str = "c0ffee00-0000-4000-8000-00000000cb01";
const WAIT: Duration = Duration::from_secs(15);

/// A qemu process, killed when dropped.
struct Qemu {
    child: Child,
    serial: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    /// The boot-sector guest on `drive`, named `name` with [`UUID`] (the watchdog names
    /// the VM from these, as libvirt passes them).
    fn start(name: &str, drive: &str) -> Qemu {
        let dir = tempfile::tempdir().expect("tempdir");
        let serial = dir.path().join("serial.log");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "kvm", "-machine", "pc", "-m", "16", "-nodefaults"])
            .args(["-display", "none", "-no-user-config"])
            .args(["-name", &format!("guest={name}"), "-uuid", UUID])
            .args(["-drive", drive])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        Qemu {
            child,
            serial,
            _dir: dir,
        }
    }

    /// Sector writes the guest reported done (its serial heartbeat lines).
    fn writes(&self) -> usize {
        std::fs::read_to_string(&self.serial)
            .map(|s| s.lines().filter(|l| l.starts_with("HB-IO")).count())
            .unwrap_or(0)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_vm_whose_rbd_osd_is_stopped_gets_a_stall_while_stuck_and_its_end_after_sigcont() {
    require!(is_root(), "root (BPF uprobes)");
    let hostbed = require_hostbed!();
    let ceph = require_cephbed!();
    let image = ceph.import("stall", hostbed.boot_sector(), 16 << 20);
    let mut wd = Watchdog::start(&["--stall-threshold-ms", "1000"]);
    let qemu = Qemu::start("vm-rbd-stall", &image.qemu_drive("none"));
    let pid = qemu.child.id();
    wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));

    // The guest writes through librbd, and healthy I/O is no stall.
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu.writes() < 3 {
        assert!(
            Instant::now() < deadline,
            "the guest never wrote through librbd"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
    let writes_while_stopped = qemu.writes();
    assert_eq!(started["vm"]["uuid"], UUID, "{started}");
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
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !wd.seen()
            .iter()
            .any(|v| is_event(v, "disk_stall_ended", pid)),
        "the stall ended while the OSD was still stopped: {:?}",
        wd.seen()
    );
    assert_eq!(
        qemu.writes(),
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
    let deadline = Instant::now() + Duration::from_secs(15);
    while qemu.writes() <= writes_while_stopped {
        assert!(
            Instant::now() < deadline,
            "the guest did not resume its writes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
