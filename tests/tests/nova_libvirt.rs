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
//! The second test runs the same story through the whole product: watchdogs on both
//! hosts, the controller with the Nova backend, kvm-1 fenced through its lab BMC, and
//! kvm-1's return, whose compute's clean-up its watchdog reports onto kvm-1's incident.
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

/// The tests share the novabed and the host names kvm-1 and kvm-2: one at a time.
static NOVABED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    NOVABED.lock().unwrap_or_else(|e| e.into_inner())
}

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
    let _one = lock();
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
    let compute_pid = compute_pid_of("kvm-1").expect("kvm-1's compute runs");
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
    let stat = std::fs::read_to_string(format!("/proc/{compute_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "kvm-1's killed compute {compute_pid} runs: {stat}"
    );
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

/// The whole product on the same two libvirt hosts: a lab whose hosts are named kvm-1
/// and kvm-2 (network namespaces of their own, a watchdog each, watching its own
/// libvirtd), kvm-1 with a lab BMC; the controller runs with `backend = "nova"` against
/// the novabed (reached from its namespace through forwarders). kvm-1 is cut off on every
/// path; the controller fences it through its BMC (whose power-off kills kvm-1's
/// processes: its watchdog, its guests' qemus, its libvirtd and its nova-compute), forces
/// it down in Nova and evacuates onto kvm-2, where kvm-2's watchdog sees each new qemu.
#[test]
fn a_cut_off_libvirt_host_is_fenced_through_its_bmc_and_the_target_hosts_watchdog_sees_each_server_nova_rebuilt_there(
) {
    use defib_tests::bmc::{Bmc, BMC_PASSWORD};
    use defib_tests::lab::{fence_by_ipmi, host_transitions, own_libvirt, Lab, LabSpec};
    use defib_tests::novalab::forward_into_netns;
    let _one = lock();
    require!(
        is_root() && defib_tests::have_command("ipmi_sim") && defib_tests::have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _hostbed = require_hostbed!();
    let nova = Nova::connect();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();

    let mut hv1 = hypervisor("kvm-1");
    let hv2 = hypervisor("kvm-2");
    let kvm1 = LibvirtCompute::start("kvm-1", &hv1.uri());
    let _kvm2 = LibvirtCompute::start("kvm-2", &hv2.uri());
    let image = nova.hbguest_image();
    let prefix = format!("lvlab-{}", tag());
    let ids = nova.boot_image_on(&image, "kvm-1", 2, &prefix, json!({}));
    let old_qemus: Vec<u32> = ids.iter().map(|id| qemu_of(&hv1, id)).collect();

    let bmc_addr = defib_tests::netns::bmc_address(0);
    let libvirt = vec![
        (hv1.uri(), hv1.pid_dir().display().to_string()),
        (hv2.uri(), hv2.pid_dir().display().to_string()),
    ];
    let ctl_addr = "10.77.0.1";
    let spec = LabSpec {
        hosts: 2,
        backend: "nova",
        controller_extra: format!(
            "{}\n[nova]\nauth = \"headers\"\ncompute_url = \"http://{ctl_addr}:38774/v2.1\"\n\
             placement_url = \"http://{ctl_addr}:38778\"\npoll_interval_ms = 250\n\
             exclude_hosts = {:?}\n",
            fence_by_ipmi("kvm-1", &bmc_addr),
            HOSTS
        ),
        watchdog_extra: own_libvirt(libvirt),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    assert_eq!(lab.net.controller_addr(0), ctl_addr);
    lab.host_names = vec!["kvm-1".into(), "kvm-2".into()];
    for port in [38774, 38778] {
        forward_into_netns(
            &lab.net.controller_ns(),
            &format!("{ctl_addr}:{port}"),
            &format!("127.0.0.1:{port}"),
        );
    }
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    // kvm-1's power is also its libvirtd's, its guests' and its compute's: they run
    // outside its network namespace.
    let compute_pid = compute_pid_of("kvm-1").expect("kvm-1's compute runs");
    bmc.also_on_power_off(&format!(
        "for f in {pids}/*.pid {libvirtd}; do kill -9 $(cat $f); done; kill -9 {compute_pid} && \
         echo \"$(date +%s.%N) killed kvm-1's compute, qemus and libvirtd\"",
        pids = hv1.pid_dir().display(),
        libvirtd = hv1.daemon_pid_file().display(),
    ));
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("kvm-1 and kvm-2 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    let subjects: Vec<String> = ids.iter().map(|id| format!("vm:{id}")).collect();
    for s in &subjects {
        lab.wait_vm_on(s, "kvm-1", "Running", Duration::from_secs(60));
    }

    // kvm-1 is cut off on every path; its guests run on until its fence.
    lab.net.set_host_links(0, false);
    for s in &subjects {
        lab.wait_vm_on(s, "kvm-2", "Running", Duration::from_secs(180));
    }
    let done = nova.wait_all_active_elsewhere(&prefix, &ids, "kvm-1", Duration::from_secs(120));
    assert!(done.iter().all(|s| s.host.as_deref() == Some("kvm-2")));
    assert!(
        bmc.chassis_log().contains("killed kvm-1's compute"),
        "{}",
        bmc.chassis_log()
    );
    for pid in &old_qemus {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "kvm-1's qemu {pid} outlived its fence"
        );
    }
    let incident = lab.host_incident("kvm-1").expect("kvm-1's incident");
    let t = host_transitions(&incident);
    let pos = |s: &str| {
        t.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("no {s} in {t:?}: {incident}"))
    };
    assert!(pos("Fenced") < pos("Evacuating"), "{t:?}");
    // Each server runs on kvm-2 as a qemu of kvm-2's libvirt, which kvm-2's watchdog
    // reported (the controller's view of the VM is its hosts' word).
    let watchdog = lab.watchdog_log(1);
    for id in &ids {
        assert_eq!(nova.evacuations(id), 1, "{id} evacuated once");
        let pid = qemu_of(&hv2, id);
        // Its eBPF probes saw the qemu's exec and mapped it to the server.
        let started = watchdog.lines().find(|l| {
            l.contains("\"type\":\"qemu_started\"")
                && l.contains(&format!("\"pid\":{pid},"))
                && l.contains(id.as_str())
        });
        let started = started.unwrap_or_else(|| {
            panic!("kvm-2's watchdog never reported {id}'s qemu {pid}:\n{watchdog}")
        });
        eprintln!("kvm-2's watchdog: {started}");
        wait_guest_heartbeat("kvm-2", id, Duration::from_secs(60));
    }
    eprintln!("kvm-1's incident: {t:?}");

    // kvm-1 is powered on: its network, its libvirtd (the two old domains defined, shut
    // off), its watchdog, then its compute, which undefines the domains Nova evacuated
    // away; kvm-1's watchdog reports each, and kvm-1's incident says so.
    lab.net.set_host_links(0, true);
    hv1.boot_again().unwrap_or_else(|e| panic!("{e}"));
    let defined = domains(&hv1, true);
    assert!(ids.iter().all(|id| defined.contains(id)), "{defined:?}");
    lab.restart_watchdog(0);
    let restarted = Instant::now();
    kvm1.restart();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let incident = lab.host_incident("kvm-1").unwrap_or_default();
        let text = incident.to_string();
        let noted = |id: &String| text.contains(&format!("kvm-1's copy of vm:{id} undefined"));
        if ids.iter().all(noted) {
            let notes: Vec<&str> = incident["timeline"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["cause"].as_str())
                .filter(|c| c.contains("hypervisor"))
                .collect();
            eprintln!(
                "{:?} after kvm-1's compute started, its incident says:\n  {}",
                restarted.elapsed(),
                notes.join("\n  ")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kvm-1's undefines not on its incident: {text}\n--- kvm-1's compute\n{}\n{}",
            kvm1.log(),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let left = domains(&hv1, true);
    assert!(ids.iter().all(|id| !left.contains(id)), "{left:?}");
    assert!(kvm1.log().contains("has been evacuated from this host"));
    // The servers run on kvm-2 alone.
    let on_kvm2 = domains(&hv2, false);
    assert!(ids.iter().all(|id| on_kvm2.contains(id)), "{on_kvm2:?}");
    drop(lab);
    drop(kvm1);
    nova.delete_named(&prefix);
}
