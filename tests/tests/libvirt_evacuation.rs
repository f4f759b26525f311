//! Evacuation without Nova (issue 6): a fenced host's domain started on another
//! hypervisor from its definition. The second hypervisor is a libvirtd of its own
//! (tests/src/hypervisor.rs) beside the hostbed's system libvirt, sharing the file system.
//!
//! An evacuation whose answer was lost (issue 14): the controller is killed while the
//! target's start sleeps in a qemu hook; the resumed controller asks every host
//! (`QueryDomain`) instead of starting it again, on three hypervisors of their own with
//! disk leases (virtlockd), the backstop should a second start happen anyway.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use defib_tests::bmc::{Bmc, BMC_PASSWORD};
use defib_tests::guests::{unique_uuid, virsh, Guest, GuestDisk, GuestSpec};
use defib_tests::hypervisor::{Hypervisor, HypervisorOptions};
use defib_tests::lab::{fence_h0_by_ipmi, host_transitions, own_libvirt, Lab, LabSpec};
use defib_tests::{have_command, is_root, require, require_hostbed};

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

fn wait_vm(lab: &Lab, subject: &str, what: &str, ok: impl Fn(&(String, String)) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = lab.vm_view(subject);
        if view.as_ref().is_some_and(&ok) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{subject} {what}: not within 60 s ({view:?})\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_partitioned_hosts_guest_is_fenced_through_its_bmc_then_started_on_another_hypervisor_from_its_definition(
) {
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _hostbed = require_hostbed!();
    // h1's hypervisor: a libvirtd of its own. h0's is the hostbed's system libvirt.
    let hv = Hypervisor::start("evac-h1").unwrap_or_else(|e| panic!("{e}"));
    let uuid = unique_uuid();
    let guest = Guest::start("evac", &uuid, GuestDisk::Plain);
    let old_pid = guest.pid();
    let subject = format!("vm:{uuid}");

    let bmc_addr = defib_tests::netns::bmc_address(0);
    let (hv_uri, hv_pids) = (hv.uri(), hv.pid_dir().display().to_string());
    let spec = LabSpec {
        hosts: 2,
        backend: "libvirt",
        controller_extra: fence_h0_by_ipmi(&bmc_addr),
        // Each host watches its own libvirt and reports only its domains (the probes
        // see every qemu of this one kernel).
        watchdog_extra: defib_tests::lab::system_and_own_libvirt(hv_uri, hv_pids),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    assert_eq!(lab.net.bmc_addr(0), bmc_addr);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    // h0's power is also its guest's: libvirtd runs that qemu outside h0's namespace.
    bmc.also_on_power_off(&format!(
        "kill -9 $(cat /run/libvirt/qemu/{}.pid) && echo \"$(date +%s.%N) killed the guest's qemu\"",
        guest.name()
    ));
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    // The controller knows the guest runs on h0 (and, before that, its definition).
    wait_vm(&lab, &subject, "on h0", |(h, st)| {
        h == "h0" && st == "Running"
    });

    // h0 is cut off on every path but runs on: its guest too.
    lab.net.set_host_links(0, false);
    lab.wait_until("h0 Suspect", Duration::from_secs(10), |s| {
        s.iter()
            .any(|(h, st)| h == "h0" && matches!(st.as_str(), "Suspect" | "Confirming"))
    });
    assert!(
        std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "the guest died from a cut link alone"
    );

    // Fenced through the BMC (which killed the guest's qemu), then evacuated to h1.
    wait_vm(&lab, &subject, "running on h1", |(h, st)| {
        h == "h1" && st == "Running"
    });
    let incident = lab.host_incident("h0").expect("h0's incident");
    let t = host_transitions(&incident);
    let pos = |s: &str| {
        t.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("no {s} in {t:?}: {incident}"))
    };
    assert!(pos("Fenced") < pos("Evacuating"), "{t:?}");
    assert!(
        bmc.chassis_log().contains("killed the guest's qemu"),
        "{}",
        bmc.chassis_log()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{old_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "the fenced host's qemu {old_pid} still runs"
    );
    // The domain runs on h1's libvirt, with a new qemu; h0's copy is off.
    let state = hv
        .virsh(&["domstate", guest.name()], Duration::from_secs(30))
        .expect("domstate on h1");
    assert_eq!(state.trim(), "running", "{}", lab.logs());
    let new_pid = hv.qemu_pid(guest.name()).expect("a qemu on h1");
    assert_ne!(new_pid, old_pid);
    let h0_state = virsh(&["domstate", guest.name()], Duration::from_secs(30)).unwrap();
    assert_eq!(h0_state.trim(), "shut off");
    let ctl = lab.controller_log();
    assert!(ctl.contains("evacuated domain started"), "{ctl}");
    // The VM's own timeline names the move.
    let vm_incident = incident.to_string();
    assert!(
        vm_incident.contains("evacuat"),
        "no evacuation in h0's incident: {vm_incident}"
    );
    drop(lab);
    drop(hv);
    drop(guest);
}

/// The StartFromDefinition commands for `uuid` a watchdog's log says it received.
fn starts_received(watchdog_log: &str, uuid: &str) -> usize {
    watchdog_log
        .lines()
        .filter(|l| {
            l.contains("command from the controller")
                && l.contains("StartFromDefinition")
                && l.contains(uuid)
        })
        .count()
}

/// Whether `name` runs on `hv` (active in any state), as its libvirt says.
fn runs_on(hv: &Hypervisor, name: &str) -> bool {
    hv.virsh(&["domstate", name], Duration::from_secs(30))
        .is_ok_and(|s| !matches!(s.trim(), "shut off" | "crashed"))
}

#[test]
fn a_controller_killed_while_an_evacuations_start_is_in_flight_resumes_by_asking_and_never_starts_the_vm_twice(
) {
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _hostbed = require_hostbed!();
    // Three hypervisors with disk leases; h1's qemu hook can make a start slow.
    let leases = HypervisorOptions {
        disk_leases: true,
        ..HypervisorOptions::default()
    };
    let hvs = [
        Hypervisor::start_with("unk-h0", &leases),
        Hypervisor::start_with(
            "unk-h1",
            &HypervisorOptions {
                slow_start_hook: true,
                ..leases.clone()
            },
        ),
        Hypervisor::start_with("unk-h2", &leases),
    ]
    .map(|h| h.unwrap_or_else(|e| panic!("{e}")));
    let uuid = unique_uuid();
    let guest = Guest::start_spec_on(
        GuestSpec {
            name: "unk".into(),
            uuid: uuid.clone(),
            disk: GuestDisk::Plain,
            ib700: None,
            wdt_pets: 0,
        },
        &hvs[0].uri(),
        &hvs[0].pid_dir(),
    );
    let name = guest.name().to_string();
    let subject = format!("vm:{uuid}");
    // The evacuation's start on h1 (the first target: least loaded, then by name) sleeps
    // in its prepare hook long enough to kill the controller and start another.
    let slow = Duration::from_secs(12);
    hvs[1].slow_start(&name, slow);

    let bmc_addr = defib_tests::netns::bmc_address(0);
    let libvirt: Vec<(String, String)> = hvs
        .iter()
        .map(|h| (h.uri(), h.pid_dir().display().to_string()))
        .collect();
    let spec = LabSpec {
        hosts: 3,
        backend: "libvirt",
        controller_extra: fence_h0_by_ipmi(&bmc_addr),
        watchdog_extra: own_libvirt(libvirt.to_vec()),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    bmc.also_on_power_off(&format!(
        "kill -9 $(cat {}/{name}.pid) && echo \"$(date +%s.%N) killed the guest's qemu\"",
        hvs[0].pid_dir().display()
    ));
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0, h1 and h2 Up", Duration::from_secs(60), |s| {
        s.len() == 3 && s.iter().all(|(_, st)| st == "Up")
    });
    wait_vm(&lab, &subject, "on h0", |(h, st)| {
        h == "h0" && st == "Running"
    });

    // h0 is cut off; fenced through its BMC; its guest's evacuation goes to h1, whose
    // start sleeps in the hook.
    lab.net.set_host_links(0, false);
    let deadline = Instant::now() + Duration::from_secs(90);
    while !hvs[1].hook_log().contains(&format!("{name} prepare")) {
        assert!(
            Instant::now() < deadline,
            "no start of {name} on h1 within 90 s; hook log {:?}\n{}",
            hvs[1].hook_log(),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let in_flight = Instant::now();
    let first = lab.kill_controller();
    assert!(
        first.contains("asking a watchdog to start an evacuated domain"),
        "{first}"
    );
    assert!(!first.contains("evacuated domain started"), "{first}");

    // A new controller on the same store, while h1 is still starting the domain.
    let resumed_at = Instant::now();
    lab.start_controller(&spec);
    let ready = resumed_at.elapsed();
    let all_logs = |lab: &Lab| format!("--- first controller\n{first}\n{}", lab.logs());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if lab
            .vm_view(&subject)
            .is_some_and(|(h, st)| h == "h1" && st == "Running")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{subject} not running on h1 within 90 s of the resume ({:?})\n{}",
            lab.vm_view(&subject),
            all_logs(&lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let settled = resumed_at.elapsed();
    let start_took = in_flight.elapsed();

    // Every host's libvirt: it runs on h1 alone.
    let running: Vec<usize> = (0..3).filter(|&h| runs_on(&hvs[h], &name)).collect();
    assert_eq!(
        running,
        [1],
        "running on hosts {running:?}\n{}",
        all_logs(&lab)
    );
    assert!(hvs[1].qemu_pid(&name).is_some());
    // One start was ever sent, by the first controller; the resumed one asked instead.
    let starts: Vec<usize> = lab
        .watchdogs
        .iter()
        .map(|w| starts_received(&w.log_text(), &uuid))
        .collect();
    assert_eq!(
        starts,
        [0, 1, 0],
        "starts received per host\n{}",
        all_logs(&lab)
    );
    let resumed = lab.controller_log();
    assert!(
        !resumed.contains("asking a watchdog to start an evacuated domain"),
        "{resumed}"
    );
    assert!(
        resumed.contains("asking the watchdog whether the domain runs there"),
        "{resumed}"
    );
    let h1 = lab.watchdogs[1].log_text();
    assert!(
        h1.lines()
            .any(|l| l.contains("command done") && l.contains("running: running")),
        "h1 never answered that it runs it\n{h1}"
    );
    eprintln!(
        "resumed controller ready after {ready:?}; {subject} settled on h1 {settled:?} after \
         the resume ({start_took:?} after the start began, which slept {slow:?} in its hook)"
    );
    // How h1 took the commands and the query (for the record).
    for l in h1
        .lines()
        .filter(|l| l.contains("command from the controller") || l.contains("command done"))
    {
        eprintln!("h1: {}", l.chars().take(260).collect::<String>());
    }
    eprintln!("h1 hook: {}", hvs[1].hook_log());
    drop(lab);
    drop(bmc);
    drop(guest);
    drop(hvs);
}
