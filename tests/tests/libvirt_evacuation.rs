//! Evacuation without Nova (issue 6): a fenced host's domain started on another
//! hypervisor from its definition. The second hypervisor is a libvirtd of its own
//! (tests/src/hypervisor.rs) beside the hostbed's system libvirt, sharing the file system.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use defib_tests::bmc::{Bmc, BMC_PASSWORD, BMC_PORT, BMC_USER};
use defib_tests::guests::{unique_uuid, virsh, Guest, GuestDisk};
use defib_tests::hypervisor::Hypervisor;
use defib_tests::lab::LabSpec;
use defib_tests::lab::{host_transitions, Lab};
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

/// The engine's view of a VM: (host, state), if it knows the VM.
fn vm_view(lab: &Lab, subject: &str) -> Option<(String, String)> {
    let vms = lab.ctl(&["vms"]);
    let list = vms
        .as_array()
        .cloned()
        .or_else(|| vms["vms"].as_array().cloned())
        .unwrap_or_default();
    list.iter().find(|v| v["resource"] == subject).map(|v| {
        (
            v["host"].as_str().unwrap_or("").to_string(),
            v["state"].as_str().unwrap_or("").to_string(),
        )
    })
}

fn wait_vm(lab: &Lab, subject: &str, what: &str, ok: impl Fn(&(String, String)) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = vm_view(lab, subject);
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
        controller_extra: format!(
            r#"[engine]
fence_on_unknown_after_ms = 3000
fence_retry_backoff_ms = 1000

[fence]
verify_timeout_ms = 5000
verify_poll_ms = 100

[[fence.host]]
name = "h0"
levels = [{{ method = "ipmi", address = "{bmc_addr}", port = {BMC_PORT}, username = "{BMC_USER}", password_file = "{{DIR}}/bmc.pass", timeout_ms = 1000, attempts = 2, backoff_ms = 100 }}]
"#
        ),
        // Each host watches its own libvirt and reports only its domains (the probes
        // see every qemu of this one kernel).
        watchdog_extra: Box::new(move |h| {
            match h {
            0 => "[libvirt]\nenabled = true\nonly_own_domains = true\n".into(),
            _ => format!(
                "[libvirt]\nenabled = true\nonly_own_domains = true\nuri = {hv_uri:?}\npid_dir = {hv_pids:?}\n"
            ),
        }
        }),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    assert_eq!(lab.net.bmc_addr(0), bmc_addr);
    std::fs::write(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
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
