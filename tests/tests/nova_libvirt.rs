//! A real hypervisor behind Nova (issue 25, item 8): two novabed hosts, kvm-1 and kvm-2,
//! whose nova-compute runs Nova's libvirt driver against a libvirtd of the test's own
//! (tests/src/hypervisor.rs, each in a UTS namespace named after its host), with the
//! project's boot-sector guest as a Glance image booted under KVM.
//!
//! kvm-1 loses its power: its nova-compute and its guests' qemus are SIGKILLed and its
//! heartbeats stop. The in-process controller (tests/src/novalab.rs: the real engine
//! task, store and Nova restorer) has the fence answered "verified", forces kvm-1 down
//! and evacuates; Nova rebuilds each server on kvm-2 from its image, which there is a
//! real qemu whose guest writes its heartbeat lines to the console log Nova gave it.
//! Then kvm-1's compute starts again, as after a reboot, and destroys the domains that
//! were evacuated away from it.
//!
//! Needs root, KVM, the hostbed's boot sector (`cargo xtask hostbed start`) and the
//! novabed (`cargo xtask novabed start`): under `CI=true` a missing one fails the test.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use controller::edges::nova::{NovaSettings, RestoreEvent};
use controller::engine::HostState;
use defib_tests::hypervisor::{Hypervisor, HypervisorOptions};
use defib_tests::novalab::{
    compute_pid_of, kill_compute_of, novabed_dir, Controller, LibvirtCompute, Nova, HOSTS,
};
use defib_tests::{is_root, require, require_hostbed, tag};
use serde_json::json;

/// A hypervisor for the novabed host `host`: qemus run as root (Nova's instance files
/// are root's), its libvirt host name is `host` (the node name Nova takes).
fn hypervisor(host: &str) -> Hypervisor {
    Hypervisor::start_with(
        host,
        &HypervisorOptions {
            qemu_as_root: true,
            hostname: Some(host.into()),
            ..HypervisorOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The uuids of `hv`'s domains (`--all`: defined ones too, else only running ones).
fn domains(hv: &Hypervisor, all: bool) -> BTreeSet<String> {
    let mut args = vec!["list", "--uuid"];
    if all {
        args.push("--all");
    }
    hv.virsh(&args, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("virsh list: {e}"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The qemu pid of `hv`'s running domain `uuid`.
fn qemu_of(hv: &Hypervisor, uuid: &str) -> u32 {
    let name = hv
        .virsh(&["domname", uuid], Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("virsh domname {uuid}: {e}"));
    let pid = hv
        .qemu_pid(name.trim())
        .unwrap_or_else(|| panic!("no qemu pid file for {name}"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("qemu-system"),
        "pid {pid} of {uuid} is not a qemu"
    );
    pid
}

/// Waits until the console log Nova gave server `id` on `host` shows its guest running
/// (a heartbeat line of the boot-sector guest).
fn wait_guest_heartbeat(host: &str, id: &str, within: Duration) {
    let log = novabed_dir().join(format!("data/nova/{host}/instances/{id}/console.log"));
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("HB-IO") {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "no guest heartbeat in {} within {within:?}: {text:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_powered_off_libvirt_host_has_its_servers_rebuilt_by_nova_as_real_qemus_on_the_other_and_its_returning_compute_destroys_the_old_domains(
) {
    require!(is_root(), "root (libvirtd, KVM)");
    let _hostbed = require_hostbed!();
    let nova = Nova::connect();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();

    let hv1 = hypervisor("kvm-1");
    let hv2 = hypervisor("kvm-2");
    let kvm1 = LibvirtCompute::start("kvm-1", &hv1.uri());
    let _kvm2 = LibvirtCompute::start("kvm-2", &hv2.uri());
    let image = nova.hbguest_image();

    let prefix = format!("lv-{}", tag());
    let ids = nova.boot_image_on(&image, "kvm-1", 2, &prefix, json!({}));
    let on_kvm1 = domains(&hv1, false);
    let mut old_qemus = Vec::new();
    for id in &ids {
        assert!(
            on_kvm1.contains(id),
            "{id} runs on kvm-1's libvirt: {on_kvm1:?}"
        );
        old_qemus.push(qemu_of(&hv1, id));
        wait_guest_heartbeat("kvm-1", id, Duration::from_secs(60));
    }

    // Only the libvirt hosts are targets: the fake ones would take the servers too.
    let settings = NovaSettings {
        poll_interval: Duration::from_millis(250),
        exclude_hosts: HOSTS.iter().map(|h| h.to_string()).collect(),
        ..NovaSettings::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start_for_hosts(
        &dir.path().join("store.sqlite"),
        settings,
        &["kvm-1", "kvm-2"],
    );
    ctl.wait_host_state("kvm-1", HostState::Up, Duration::from_secs(10));
    ctl.wait_host_state("kvm-2", HostState::Up, Duration::from_secs(10));

    // kvm-1 loses its power: its compute and its guests die, its heartbeats stop.
    ctl.silence("kvm-1");
    kill_compute_of("kvm-1");
    for pid in &old_qemus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let fenced = ctl.answer_fence("kvm-1", Duration::from_secs(30));

    let done = nova.wait_all_active_elsewhere(&prefix, &ids, "kvm-1", Duration::from_secs(300));
    let active = fenced.elapsed();
    assert!(
        done.iter().all(|s| s.host.as_deref() == Some("kvm-2")),
        "every server on kvm-2: {done:?}"
    );
    let on_kvm2 = domains(&hv2, false);
    for id in &ids {
        assert_eq!(nova.evacuations(id), 1, "{id} evacuated exactly once");
        assert!(
            on_kvm2.contains(id),
            "{id} runs on kvm-2's libvirt: {on_kvm2:?}"
        );
        let pid = qemu_of(&hv2, id);
        assert!(!old_qemus.contains(&pid));
        wait_guest_heartbeat("kvm-2", id, Duration::from_secs(60));
    }
    eprintln!(
        "fence verified → {} servers ACTIVE on kvm-2 (real qemus): {active:?}",
        ids.len()
    );
    let events = ctl.events();
    assert!(
        matches!(events.first(), Some(RestoreEvent::ForcedDown { host }) if host == "kvm-1"),
        "forced down first: {events:?}"
    );
    ctl.wait_host_state("kvm-1", HostState::Recovered, Duration::from_secs(30));

    // kvm-1 boots again: its libvirt still has the two (dead) domains defined; its
    // returning compute destroys them, since Nova has the servers on kvm-2.
    let left = domains(&hv1, true);
    assert!(
        ids.iter().all(|id| left.contains(id)),
        "kvm-1 still defines its old domains: {left:?}"
    );
    assert!(compute_pid_of("kvm-1").is_none());
    let restarted = Instant::now();
    kvm1.restart();
    let t0 = Instant::now();
    loop {
        let left = domains(&hv1, true);
        if ids.iter().all(|id| !left.contains(id)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "kvm-1's compute left its evacuated domains: {left:?}\n{}",
            kvm1.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "kvm-1's compute restarted: the evacuated domains gone {:?} after its start",
        restarted.elapsed()
    );
    assert!(
        kvm1.log().contains("has been evacuated from this host"),
        "the compute says why it destroyed them"
    );
    // The new copies run on.
    assert_eq!(
        domains(&hv2, false).intersection(&on_kvm2).count(),
        ids.len()
    );

    ctl.kill();
    nova.delete_named(&prefix);
}
