//! A dead virtlockd noticed (issue 24, item 5): three hypervisors of their own with disk
//! leases (tests/src/hypervisor.rs), their watchdogs with `[disk_leases]` on, and a
//! controller on the libvirt backend. virtlockd alone is killed on h1: its watchdog sees
//! the exit through the probes, the controller raises `DiskLeasesLost` for h1, shows its
//! guest unprotected, and restores nothing onto it: h0's guest, evacuated after h0's
//! fence, goes to h2 (h1 would be the first pick otherwise: least loaded, then by name).
//! A virtlockd started again holds none of the running guest's leases, so h1 stays
//! unprotected until that guest is gone; then it is a target again.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use defib_tests::bmc::{Bmc, BMC_PASSWORD};
use defib_tests::guests::{unique_uuid, Guest, GuestDisk, GuestSpec};
use defib_tests::hypervisor::{Hypervisor, HypervisorOptions};
use defib_tests::lab::{fence_h0_by_ipmi, Lab, LabSpec};
use defib_tests::{have_command, is_root, require, require_hostbed};
use serde_json::Value;

/// The controller's view of `host` (`defibctl hosts --json`).
fn host_view(lab: &Lab, host: &str) -> Value {
    let hosts = lab.ctl(&["hosts"]);
    let list = hosts
        .as_array()
        .cloned()
        .or_else(|| hosts["hosts"].as_array().cloned())
        .unwrap_or_default();
    list.into_iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("{host} unknown to the controller: {hosts}"))
}

fn wait_view(lab: &Lab, host: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = host_view(lab, host);
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{host} {what}: not within 60 s ({v})\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_vm(lab: &Lab, subject: &str, host: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let view = lab.vm_view(subject);
        if view
            .as_ref()
            .is_some_and(|(h, st)| h == host && st == "Running")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{subject} not running on {host} within 90 s ({view:?})\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn guest_on(hv: &Hypervisor, name: &str) -> Guest {
    Guest::start_spec_on(
        GuestSpec {
            name: name.into(),
            uuid: unique_uuid(),
            disk: GuestDisk::Plain,
            ib700: None,
            wdt_pets: 0,
        },
        &hv.uri(),
        &hv.pid_dir(),
    )
}

#[test]
fn a_host_whose_virtlockd_died_is_alarmed_shows_its_vms_unprotected_and_takes_no_vm_until_its_leases_are_back(
) {
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _hostbed = require_hostbed!();
    let leases = HypervisorOptions {
        disk_leases: true,
        ..HypervisorOptions::default()
    };
    let mut hvs = ["lw-h0", "lw-h1", "lw-h2"]
        .map(|n| Hypervisor::start_with(n, &leases).unwrap_or_else(|e| panic!("{e}")));
    let g0 = guest_on(&hvs[0], "lw0");
    let g1 = guest_on(&hvs[1], "lw1");
    let (vm0, vm1) = (format!("vm:{}", g0.uuid()), format!("vm:{}", g1.uuid()));

    let bmc_addr = defib_tests::netns::bmc_address(0);
    let per_host: Vec<String> = hvs
        .iter()
        .map(|h| {
            format!(
                "[libvirt]\nenabled = true\nonly_own_domains = true\nuri = {:?}\npid_dir = {:?}\n\n\
                 [disk_leases]\nenabled = true\npid_file = {:?}\nlockd_conf = {:?}\n",
                h.uri(),
                h.pid_dir().display().to_string(),
                h.virtlockd_pid_file().display().to_string(),
                h.lockd_conf().display().to_string(),
            )
        })
        .collect();
    let spec = LabSpec {
        hosts: 3,
        backend: "libvirt",
        controller_extra: fence_h0_by_ipmi(&bmc_addr),
        watchdog_extra: Box::new(move |h| per_host[h].clone()),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    bmc.also_on_power_off(&format!(
        "kill -9 $(cat {}/{}.pid) && echo \"$(date +%s.%N) killed the guest's qemu\"",
        hvs[0].pid_dir().display(),
        g0.name()
    ));
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0, h1 and h2 Up", Duration::from_secs(60), |s| {
        s.len() == 3 && s.iter().all(|(_, st)| st == "Up")
    });
    wait_vm(&lab, &vm0, "h0");
    wait_vm(&lab, &vm1, "h1");
    // Every watchdog has read its leases: held, so every host is a target.
    for h in ["h0", "h1", "h2"] {
        let log = |lab: &Lab| lab.watchdogs[h[1..].parse::<usize>().unwrap()].log_text();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !log(&lab).contains("disk-lease daemon running") {
            assert!(
                Instant::now() < deadline,
                "{h} never found its virtlockd\n{}",
                log(&lab)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    for h in ["h0", "h1", "h2"] {
        let v = host_view(&lab, h);
        assert!(v.get("not_a_target").is_none(), "{h}: {v}\n{}", lab.logs());
        assert!(!lab.alarm_kinds(h).contains(&"DiskLeasesLost".to_string()));
    }

    // virtlockd alone dies on h1; its guest runs on.
    let killed_at = Instant::now();
    let old = hvs[1].kill_virtlockd();
    let alarmed = loop {
        if lab
            .alarm_kinds("h1")
            .contains(&"DiskLeasesLost".to_string())
        {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no DiskLeasesLost for h1 within 30 s\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let v = host_view(&lab, "h1");
    assert_eq!(v["state"], "Up", "{v}");
    assert!(
        v["not_a_target"]
            .as_str()
            .is_some_and(|w| w.contains("daemon is down") && w.contains(&format!("pid {old}"))),
        "{v}"
    );
    assert_eq!(v["unprotected"], serde_json::json!([vm1.clone()]), "{v}");
    let h1_log = lab.watchdogs[1].log_text();
    assert!(h1_log.contains("killed by SIGKILL"), "{h1_log}");
    assert!(g1.pid() > 0 && std::path::Path::new(&format!("/proc/{}", g1.pid())).exists());

    // h0 is cut off and fenced; its guest goes to h2, never to h1.
    lab.net.set_host_links(0, false);
    wait_vm(&lab, &vm0, "h2");
    assert!(
        hvs[1].qemu_pid(g0.name()).is_none(),
        "h0's guest was started on h1\n{}",
        lab.logs()
    );
    let starts_on_h1 = lab.watchdogs[1]
        .log_text()
        .lines()
        .filter(|l| l.contains("command from the controller") && l.contains(g0.uuid()))
        .count();
    assert_eq!(starts_on_h1, 0, "{}", lab.logs());

    // virtlockd runs again, but holds no lease of the guest it did not start.
    let new = hvs[1]
        .start_virtlockd_again()
        .unwrap_or_else(|e| panic!("{e}"));
    let v = wait_view(&lab, "h1", "sees the new virtlockd", |v| {
        v["not_a_target"]
            .as_str()
            .is_some_and(|w| w.contains("run without their disk leases"))
    });
    assert_eq!(v["unprotected"], serde_json::json!([vm1.clone()]), "{v}");
    let h1_log = lab.watchdogs[1].log_text();
    assert!(
        h1_log
            .lines()
            .any(|l| l.contains("disk-lease daemon running") && l.contains(&new.to_string())),
        "{h1_log}"
    );

    // The unprotected guest is gone: every VM h1 runs holds its leases (none), and h1
    // is a target again.
    hvs[1]
        .virsh(&["destroy", g1.name()], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = wait_view(&lab, "h1", "a target again", |v| {
        v.get("not_a_target").is_none()
    });
    assert!(v.get("unprotected").is_none(), "{v}");
    eprintln!(
        "virtlockd pid {old} killed on h1: DiskLeasesLost seen through the API {alarmed:?} \
         later; h0's guest evacuated to h2; virtlockd again as pid {new}"
    );
    drop(lab);
    drop(bmc);
    drop(g1);
    drop(g0);
    drop(hvs);
}
