//! A returning host does not keep running stale copies (issue 14): a fenced host that
//! boots with libvirt autostart on starts the VM that was moved off it, and its watchdog
//! destroys that copy at the controller's word and turns its autostart off.
//!
//! Two hypervisors of their own (tests/src/hypervisor.rs), one per lab host, share the
//! file system; the guest's disk is `<shareable/>` so that a second qemu can open it, as
//! shared storage without locking lets two hosts do. h0's BMC power-off kills its guest,
//! its libvirtd and (as for every lab host) its watchdog; "power on" starts that libvirtd
//! again on an empty /run, as a boot does (it autostarts the guest), then a new watchdog
//! process, as the unit's `After=libvirtd.service` orders them.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use defib_tests::bmc::{Bmc, BMC_PASSWORD};
use defib_tests::guests::{unique_uuid, Guest, GuestDisk, GuestSpec};
use defib_tests::hypervisor::Hypervisor;
use defib_tests::lab::{fence_h0_by_ipmi, own_libvirt, Lab, LabSpec};
use defib_tests::{have_command, is_root, require, require_hostbed};

/// How long a stale copy may run before the test gives up on its destroy.
const DESTROY_WITHIN: Duration = Duration::from_secs(60);

/// When a copy of the domain came up on a hypervisor (its qemu pid file appeared) and
/// when its qemu was gone, measured from `since`.
#[derive(Debug, Clone, Copy)]
struct CopyLife {
    pid: u32,
    up: Duration,
    gone: Duration,
}

impl CopyLife {
    fn lifetime(&self) -> Duration {
        self.gone.saturating_sub(self.up)
    }
}

fn qemu_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// Watches `pid_file` (polled every 2 ms) for a qemu that comes up and then ends, for at
/// most `DESTROY_WITHIN` after it came up (`None`: none came up within 60 s, or it ran on).
fn watch_copy(pid_file: PathBuf, since: Instant) -> JoinHandle<Option<CopyLife>> {
    std::thread::spawn(move || {
        let poll = Duration::from_millis(2);
        let deadline = Instant::now() + Duration::from_secs(60);
        let (pid, up) = loop {
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pid) = pid.filter(|p| qemu_alive(*p)) {
                break (pid, since.elapsed());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(poll);
        };
        let deadline = Instant::now() + DESTROY_WITHIN;
        while qemu_alive(pid) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(poll);
        }
        Some(CopyLife {
            pid,
            up,
            gone: since.elapsed(),
        })
    })
}

/// The qemu processes of domain `name` running on this machine (any hypervisor).
fn qemus_of(name: &str) -> Vec<u32> {
    let needle = format!("guest={name},");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                && qemu_alive(*pid)
        })
        .collect()
}

fn dominfo_field(hv: &Hypervisor, name: &str, field: &str) -> String {
    let info = hv
        .virsh(&["dominfo", name], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("dominfo {name}: {e}"));
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in {info}"))
}

/// Waits until libvirt says the domain is shut off: its qemu is gone a moment before
/// libvirt has handled the end ("in shutdown" meanwhile).
fn wait_shut_off(hv: &Hypervisor, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = hv
            .virsh(&["domstate", "--reason", name], Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("domstate {name}: {e}"));
        if state.trim().starts_with("shut off") {
            eprintln!("{name} on {}: {}", hv.uri(), state.trim());
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {state}, not shut off");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the controller has logged `n` watchdog answers "destroyed" (the answer
/// comes once libvirt's destroy returned and the autostart is off, which may be a while
/// after the qemu is gone), and prints the stale-copy lines of its log.
fn wait_destroyed_answers(lab: &Lab, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = lab.controller_log();
        if log.matches("stale copy destroyed").count() >= n {
            for line in log.lines().filter(|l| l.contains("edges::stale_copies")) {
                eprintln!("controller: {line}");
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} stale copies destroyed:\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_file(hv: &Hypervisor, name: &str) -> PathBuf {
    hv.pid_dir().join(format!("{name}.pid"))
}

#[test]
fn a_returning_hosts_autostarted_copy_of_an_evacuated_vm_is_destroyed_and_its_autostart_turned_off()
{
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _hostbed = require_hostbed!();
    let mut hv0 = Hypervisor::start("stale-h0").unwrap_or_else(|e| panic!("{e}"));
    let hv1 = Hypervisor::start("stale-h1").unwrap_or_else(|e| panic!("{e}"));
    let uuid = unique_uuid();
    let guest = Guest::start_spec_on(
        GuestSpec {
            name: "stale".into(),
            uuid: uuid.clone(),
            disk: GuestDisk::Shared,
            ib700: None,
            wdt_pets: 0,
        },
        &hv0.uri(),
        &hv0.pid_dir(),
    );
    let name = guest.name().to_string();
    hv0.virsh(&["autostart", &name], Duration::from_secs(30))
        .expect("autostart on");
    assert_eq!(dominfo_field(&hv0, &name, "Autostart"), "enable");
    let subject = format!("vm:{uuid}");

    let bmc_addr = defib_tests::netns::bmc_address(0);
    let uris = [
        (hv0.uri(), hv0.pid_dir().display().to_string()),
        (hv1.uri(), hv1.pid_dir().display().to_string()),
    ];
    let spec = LabSpec {
        hosts: 2,
        backend: "libvirt",
        controller_extra: fence_h0_by_ipmi(&bmc_addr),
        // Each host watches its own hypervisor.
        watchdog_extra: own_libvirt(uris.to_vec()),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    // h0's power is also its hypervisor's: its guest's qemu and its libvirtd run outside
    // h0's namespace.
    bmc.also_on_power_off(&format!(
        "kill -9 $(cat {}) && echo \"$(date +%s.%N) killed the guest's qemu\"\n\
         kill -9 $(cat {}) && echo \"$(date +%s.%N) killed h0's libvirtd\"",
        pid_file(&hv0, &name).display(),
        hv0.daemon_pid_file().display()
    ));
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    lab.wait_vm_on(&subject, "h0", "Running", Duration::from_secs(60));

    // h0 is cut off; fenced through its BMC, its VM evacuated to h1.
    lab.net.set_host_links(0, false);
    lab.wait_vm_on(&subject, "h1", "Running", Duration::from_secs(60));
    lab.wait_until("h0 Recovered", Duration::from_secs(30), |s| {
        s.iter().any(|(h, st)| h == "h0" && st == "Recovered")
    });
    assert!(
        bmc.chassis_log().contains("killed h0's libvirtd"),
        "{}",
        bmc.chassis_log()
    );
    let on_h1 = hv1.qemu_pid(&name).expect("the VM's qemu on h1");
    assert_eq!(qemus_of(&name), [on_h1]);

    // h0 powered on: its network, then its libvirtd, which autostarts the guest (a
    // second qemu on the shared disk), then its watchdog.
    let t0 = Instant::now();
    let copy = watch_copy(pid_file(&hv0, &name), t0);
    lab.net.set_host_links(0, true);
    hv0.boot_again().unwrap_or_else(|e| panic!("{e}"));
    let libvirtd_up = t0.elapsed();
    lab.restart_watchdog(0);
    let watchdog_started = t0.elapsed();
    let life = copy
        .join()
        .expect("watcher")
        .unwrap_or_else(|| panic!("no autostarted copy, or not destroyed\n{}", lab.logs()));
    eprintln!(
        "autostart at boot: libvirtd answered at {libvirtd_up:?}, the copy (qemu pid {}) \
         was up at {:?}, the watchdog started at {watchdog_started:?}, the copy was gone at \
         {:?}: it ran {:?}",
        life.pid,
        life.up,
        life.gone,
        life.lifetime()
    );
    // Destroyed, not autostarted again, still defined; the VM runs on h1 alone.
    wait_shut_off(&hv0, &name);
    wait_destroyed_answers(&lab, 1);
    assert_eq!(dominfo_field(&hv0, &name, "Autostart"), "disable");
    assert_eq!(dominfo_field(&hv0, &name, "Persistent"), "yes");
    assert_eq!(hv1.qemu_pid(&name), Some(on_h1));
    assert_eq!(qemus_of(&name), [on_h1]);
    assert_eq!(lab.vm_view(&subject), Some(("h1".into(), "Running".into())));
    let incident = lab.host_incident("h0").expect("h0's incident").to_string();
    assert!(incident.contains("destroying that copy"), "{incident}");
    assert!(lab.alarm_kinds("h0").iter().any(|k| k == "StaleResource"));

    // Started by hand on h0 while its watchdog runs: destroyed again, each time.
    let mut by_hand = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let copy = watch_copy(pid_file(&hv0, &name), t);
        hv0.virsh(&["start", &name], Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("virsh start on h0: {e}\n{}", hv0.log()));
        let started = t.elapsed();
        let life = copy.join().expect("watcher").unwrap_or_else(|| {
            panic!("the copy started by hand was not destroyed\n{}", lab.logs())
        });
        eprintln!(
            "by hand: virsh start returned at {started:?}, the copy (qemu pid {}) was up at \
             {:?}, gone at {:?}: it ran {:?}",
            life.pid,
            life.up,
            life.gone,
            life.lifetime()
        );
        by_hand.push(life.lifetime());
        wait_shut_off(&hv0, &name);
        wait_destroyed_answers(&lab, by_hand.len() + 1);
        assert_eq!(dominfo_field(&hv0, &name, "Autostart"), "disable");
        assert_eq!(qemus_of(&name), [on_h1]);
    }
    by_hand.sort();
    eprintln!(
        "copies started by hand ran {:?} (min {:?}, median {:?}, max {:?})",
        by_hand,
        by_hand[0],
        by_hand[by_hand.len() / 2],
        by_hand[by_hand.len() - 1]
    );
    assert_eq!(lab.vm_view(&subject), Some(("h1".into(), "Running".into())));
    drop(lab);
    drop(guest);
    drop(hv0);
    drop(hv1);
}
