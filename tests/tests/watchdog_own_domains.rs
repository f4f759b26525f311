//! `libvirt.only_own_domains` (issue 22, item 2): several hypervisors on one kernel, each
//! with its watchdog. The probes see every qemu of the kernel; each watchdog must count
//! and report only the qemus whose domain its own libvirt lists, from its first
//! heartbeat on (also right after a restart, before its libvirt watcher has listed the
//! domains, and when its libvirt has another host's domain defined but not running), and
//! not the exit of another host's qemu.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use defib_tests::guests::{unique_uuid, Guest, GuestDisk, GuestSpec};
use defib_tests::hypervisor::Hypervisor;
use defib_tests::lab::{own_libvirt, Lab, LabSpec};
use defib_tests::{is_root, require, require_hostbed};
use serde_json::Value;

/// Each host's `vm_count` from its latest heartbeat, as the controller has it.
fn counts(lab: &Lab) -> Vec<(String, u64)> {
    let hosts = lab.ctl(&["hosts"]);
    let mut v: Vec<(String, u64)> = hosts["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                h["host"].as_str().unwrap_or("").to_string(),
                h["vm_count"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    v.sort();
    v
}

/// The counts become one qemu per host (a heartbeat carries a count up to 100 ms after
/// the event, the controller publishes it up to 100 ms later) and stay so for `secs`
/// (many heartbeats): a count that is right once and then drifts is caught too.
fn assert_one_each_for(lab: &Lab, secs: u64, when: &str) {
    let want = vec![("h0".to_string(), 1), ("h1".to_string(), 1)];
    let deadline = Instant::now() + Duration::from_secs(5);
    while counts(lab) != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        assert_eq!(
            counts(lab),
            want,
            "{when}: each host runs one qemu of its own libvirt\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The qemu events (`--print-events` JSON lines) in a watchdog's log that name `uuid`.
fn qemu_events_about(log: &str, uuid: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["type"].as_str().is_some_and(|t| t.starts_with("qemu_")) && e["vm"]["uuid"] == uuid
        })
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn two_watchdogs_on_one_kernel_each_count_and_report_only_the_qemus_their_own_libvirt_runs_also_right_after_a_restart(
) {
    require!(is_root(), "root (libvirtds of their own, KVM, BPF)");
    let _hostbed = require_hostbed!();
    let hvs: Vec<Hypervisor> = (0..2)
        .map(|h| Hypervisor::start(&format!("own-h{h}")).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    // One guest on each hypervisor, running before any watchdog starts: each watchdog's
    // first /proc scan finds both qemus.
    let guests: Vec<Guest> = hvs
        .iter()
        .enumerate()
        .map(|(h, hv)| {
            Guest::start_spec_on(
                GuestSpec {
                    name: format!("own-h{h}"),
                    uuid: unique_uuid(),
                    disk: GuestDisk::Plain,
                    ib700: None,
                    wdt_pets: 0,
                },
                &hv.uri(),
                &hv.pid_dir(),
            )
        })
        .collect();
    let libvirt: Vec<(String, String)> = hvs
        .iter()
        .map(|hv| (hv.uri(), hv.pid_dir().display().to_string()))
        .collect();
    let spec = LabSpec {
        hosts: 2,
        backend: "libvirt",
        controller_extra: String::new(),
        watchdog_extra: own_libvirt(libvirt.to_vec()),
        bmc_network: false,
    };
    let mut lab = Lab::new(&spec);
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    for g in &guests {
        lab.wait_vm_listed(&format!("vm:{}", g.uuid()));
    }
    assert_one_each_for(&lab, 2, "after the start");

    // h1's libvirt also has h0's guest defined, shut off (as a host keeps the definition
    // of a guest evacuated from it): knowing a domain is not running its qemu.
    let xml = hvs[0]
        .virsh(
            &["dumpxml", "--inactive", guests[0].name()],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let xml_path = lab.path("h0-guest.xml");
    std::fs::write(&xml_path, xml).unwrap();
    hvs[1]
        .virsh(
            &["define", &xml_path.display().to_string()],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", hvs[1].log()));
    assert_one_each_for(&lab, 2, "after h1's libvirt defined h0's guest");

    // Both watchdogs again: each scan finds both qemus before its libvirt lists anything.
    for h in 0..2 {
        lab.restart_watchdog(h);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lab.watchdogs[h].log_text().contains("libvirt_inventory") {
            assert!(Instant::now() < deadline, "{}", lab.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_one_each_for(&lab, 2, "after both watchdogs restarted");

    // h1's guest crashes: h0's watchdog says nothing about it, and the counts stay right
    // through its restart in place.
    let other = guests[1].uuid().to_string();
    let old = guests[1].pid();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status();
    lab.wait_closed_incident(&format!("vm:{other}"), Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(10);
    while hvs[1].qemu_pid(guests[1].name()).is_none_or(|p| p == old) {
        assert!(Instant::now() < deadline, "{}", lab.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_one_each_for(&lab, 2, "after h1's guest was restarted in place");
    for h in 0..2 {
        let foreign = &guests[1 - h];
        let log = lab.watchdogs[h].log_text();
        let old_log = std::fs::read_to_string(lab.path(&format!("watchdog-h{h}.log.old")))
            .unwrap_or_default();
        let told = [
            qemu_events_about(&old_log, foreign.uuid()),
            qemu_events_about(&log, foreign.uuid()),
        ]
        .concat();
        assert!(
            told.is_empty(),
            "h{h}'s watchdog reported another host's qemu:\n{}",
            told.join("\n")
        );
    }
    drop(lab);
    drop(guests);
    drop(hvs);
}
