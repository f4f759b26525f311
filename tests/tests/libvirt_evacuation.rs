//! Evacuation without Nova (issue 6): a fenced host's domain started on another
//! hypervisor from its definition. The second hypervisor is a libvirtd of its own
//! (tests/src/hypervisor.rs) beside the hostbed's system libvirt, sharing the file system.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::Duration;

use defib_tests::guests::{unique_uuid, virsh, Guest, GuestDisk};
use defib_tests::hypervisor::Hypervisor;
use defib_tests::{is_root, require, require_hostbed};

#[test]
fn a_second_hypervisor_runs_a_hostbed_guest_from_its_definition_on_the_shared_disk() {
    require!(is_root(), "root (a libvirtd of its own, KVM)");
    let _hostbed = require_hostbed!();
    let hv = Hypervisor::start("evac-smoke").unwrap_or_else(|e| panic!("{e}"));
    let uuid = unique_uuid();
    let guest = Guest::start("evac-smoke", &uuid, GuestDisk::Plain);
    let xml = virsh(
        &["dumpxml", "--inactive", guest.name()],
        Duration::from_secs(30),
    )
    .expect("dumpxml");
    // The hostbed's copy stops (as a fence would stop it), then the other one starts.
    virsh(&["destroy", guest.name()], Duration::from_secs(30)).expect("destroy");
    let xml_path = std::env::temp_dir().join(format!("{}.xml", guest.name()));
    std::fs::write(&xml_path, xml).unwrap();
    hv.virsh(
        &["define", &xml_path.display().to_string()],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", hv.log()));
    hv.virsh(&["start", guest.name()], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", hv.log()));
    let _ = std::fs::remove_file(&xml_path);
    let pid = hv
        .qemu_pid(guest.name())
        .expect("a qemu pid in the second instance");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // The system libvirt does not list it running; the second one does.
    let system = virsh(&["domstate", guest.name()], Duration::from_secs(30)).unwrap();
    assert_eq!(system.trim(), "shut off");
    let other = hv
        .virsh(&["domstate", guest.name()], Duration::from_secs(30))
        .unwrap();
    assert_eq!(other.trim(), "running");
    drop(hv);
    drop(guest);
}
