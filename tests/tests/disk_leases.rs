//! libvirt's disk leases (virtlockd) as the backstop of evacuation without Nova: two
//! hypervisors (tests/src/hypervisor.rs, `disk_leases`) share the file system, and a
//! second start of a disk whose lease the other holds is refused by the lock manager.
//!
//! qemu's own image locks are switched off here (tests/src/bin/qemu-nolock.rs): on one
//! kernel they would refuse the second qemu first, which hosts whose shared file system
//! does not carry them would not.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use defib_tests::guests::{guests_dir, unique_uuid, DiskFormat, GUEST_PREFIX};
use defib_tests::hypervisor::{qemu_without_image_locks, Hypervisor, HypervisorOptions, LOCKSPACE};
use defib_tests::{is_root, require, require_hostbed};

const VIRSH: Duration = Duration::from_secs(60);

/// A guest's files, removed on drop (its domains go with their hypervisors).
struct Files(Vec<PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The boot-sector guest's definition with qemu's image locks off.
fn definition(name: &str, uuid: &str, disk: &Path, serial: &Path, emulator: &Path) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>\
         <memory unit='MiB'>16</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
         <features><acpi/></features>\
         <devices><emulator>{emulator}</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>\
         <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
         <controller type='usb' model='none'/>\
         <serial type='file'><source path='{serial}'/><target port='0'/></serial>\
         <memballoon model='none'/></devices></domain>",
        emulator = emulator.display(),
        disk = disk.display(),
        serial = serial.display(),
    )
}

/// How many disk writes the guest reported on its serial port.
fn writes(serial: &Path) -> usize {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .matches("HB-IO")
        .count()
}

fn wait_writes(serial: &Path, more_than: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while writes(serial) <= more_than {
        assert!(
            Instant::now() < deadline,
            "{what}: no disk write within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The lease file virtlockd locks for `disk` (indirect leases: SHA-256 of its path).
fn lease_file(disk: &Path) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "printf %s \"$1\" | sha256sum", "sh"])
        .arg(disk)
        .output()
        .expect("sha256sum");
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text.split_whitespace().next().expect("a hash");
    Path::new(LOCKSPACE).join(hash)
}

fn qemu_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

#[test]
fn a_disk_whose_lease_one_hypervisor_holds_cannot_be_started_on_another_until_its_guest_is_gone() {
    require!(is_root(), "root (libvirtd and virtlockd of their own, KVM)");
    let hostbed = require_hostbed!();
    let leases = HypervisorOptions {
        disk_leases: true,
        ..HypervisorOptions::default()
    };
    let a = Hypervisor::start_with("lease-a", &leases).unwrap_or_else(|e| panic!("{e}"));
    let b = Hypervisor::start_with("lease-b", &leases).unwrap_or_else(|e| panic!("{e}"));
    let emulator = qemu_without_image_locks();
    let uuid = unique_uuid();
    let name = format!("{GUEST_PREFIX}lease-{}", defib_tests::tag());
    let dir = guests_dir();
    let disk = dir.join(format!("{name}.raw"));
    let (serial_a, serial_b) = (
        dir.join(format!("{name}.a.serial.log")),
        dir.join(format!("{name}.b.serial.log")),
    );
    let (xml_a, xml_b) = (
        dir.join(format!("{name}.a.xml")),
        dir.join(format!("{name}.b.xml")),
    );
    let _files = Files(vec![
        disk.clone(),
        serial_a.clone(),
        serial_b.clone(),
        xml_a.clone(),
        xml_b.clone(),
    ]);
    hostbed.make_boot_disk(&disk, DiskFormat::Raw, 0);
    // The same domain (name, UUID, disk) on both, each with a serial log of its own.
    for (hv, xml, serial) in [(&a, &xml_a, &serial_a), (&b, &xml_b, &serial_b)] {
        std::fs::write(serial, "").unwrap();
        std::fs::write(xml, definition(&name, &uuid, &disk, serial, &emulator)).unwrap();
        hv.virsh(&["define", &xml.display().to_string()], VIRSH)
            .unwrap_or_else(|e| panic!("{e}\n{}", hv.log()));
    }
    a.virsh(&["start", &name], VIRSH)
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    wait_writes(&serial_a, 0, "the guest on a");
    let qemu_a = a.qemu_pid(&name).expect("a's qemu");
    assert!(
        lease_file(&disk).exists(),
        "no lease file {} for {}",
        lease_file(&disk).display(),
        disk.display()
    );

    // A second start on b: its qemu is launched, then stopped when the lease is refused
    // (the first try also has libvirt probe the emulator; the second one does not).
    let mut refused_after = Vec::new();
    let mut err = String::new();
    for _ in 0..2 {
        let t0 = Instant::now();
        let refused = b.virsh(&["start", &name], VIRSH);
        refused_after.push(t0.elapsed());
        err = refused.expect_err("b started a disk whose lease a holds");
        assert!(
            err.contains("resource busy") && err.contains("is locked"),
            "refused, but not by the lock manager: {err}"
        );
        assert!(
            !err.contains("write\" lock"),
            "qemu's own lock refused: {err}"
        );
    }
    let state_b = b.virsh(&["domstate", &name], VIRSH).unwrap();
    assert_eq!(state_b.trim(), "shut off");
    // a's guest was not disturbed: it keeps writing.
    let before = writes(&serial_a);
    wait_writes(&serial_a, before, "the guest on a after b's refused start");
    assert!(qemu_runs(qemu_a));
    eprintln!("b's starts refused by virtlockd after {refused_after:?}: {err}");

    // a's guest dies (as a power fence ends it): its lease goes with its qemu.
    let t1 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu_a as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut tries = 0;
    loop {
        tries += 1;
        match b.virsh(&["start", &name], VIRSH) {
            Ok(_) => break,
            Err(e) => assert!(
                t1.elapsed() < Duration::from_secs(30),
                "b still cannot start it 30 s after a's qemu died: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let started_after = t1.elapsed();
    wait_writes(&serial_b, 0, "the guest on b");
    eprintln!("b started it {started_after:?} after a's qemu was killed ({tries} tries)");
    drop(b);
    drop(a);
}
