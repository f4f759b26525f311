//! A real guest kernel panics (issue 6): the hostbed's Linux guest under TCG (Debian's
//! kernel, a busybox initramfs, an ISA pvpanic device, `<on_crash>destroy</on_crash>`)
//! crashes its kernel on a one-shot switch on its disk; libvirt reports `crashed
//! (panicked)` and destroys it; the watchdog's account reaches the controller as one VM
//! incident, and with the libvirt backend the watchdog starts the domain again in place.
//! The restarted guest finds the switch spent and runs on.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use defib_tests::guests::{unique_uuid, virsh, Hostbed, LinuxGuest};
use defib_tests::lab::{Lab, LabSpec};
use defib_tests::{is_root, require, require_hostbed};
use serde_json::Value;

/// A TCG boot on a loaded 2-core machine is slow; these are limits, not expectations.
const WAIT: Duration = Duration::from_secs(180);

/// The incidents about `subject` (id, closed).
fn incidents_of(lab: &Lab, subject: &str) -> Vec<(u64, bool)> {
    lab.ctl(&["incidents"])["incidents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["subject"] == subject)
        .filter_map(|i| Some((i["id"].as_u64()?, !i["closed_at_ms"].is_null())))
        .collect()
}

/// The watchdog's printed events (`run --print-events`: one JSON object a line).
fn printed_events(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn cause(e: &Value) -> &str {
    e["cause"].as_str().unwrap_or("")
}

#[test]
fn a_linux_guest_whose_kernel_panics_is_one_incident_and_runs_again_after_its_watchdog_restarts_it()
{
    require!(is_root(), "root (network namespaces, BPF, libvirt)");
    let _hostbed = require_hostbed!();
    let images = Hostbed::linux_images();
    require!(
        images.is_ok(),
        "the TCG Linux guest: {}",
        images.unwrap_err()
    );

    let spec = LabSpec {
        hosts: 1,
        backend: "libvirt",
        controller_extra: String::new(),
        watchdog_extra: Box::new(|_| "[libvirt]\nenabled = true\n".into()),
        bmc_network: false,
    };
    let mut lab = Lab::new(&spec);
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 Up", Duration::from_secs(60), |s| {
        s.iter().any(|(h, st)| h == "h0" && st == "Up")
    });

    let uuid = unique_uuid();
    let subject = format!("vm:{uuid}");
    let booted = Instant::now();
    let guest = LinuxGuest::start("tcg-panic", &uuid);
    eprintln!(
        "TCG Linux guest up {:?} after virsh start began",
        booted.elapsed()
    );
    let up = guest.up_line().expect("HB-LINUX-UP");
    assert!(up.contains("vda=yes"), "no virtio disk in the guest: {up}");
    assert!(
        up.contains("pvpanic=yes"),
        "the guest kernel has no pvpanic driver: {up}"
    );
    assert!(up.contains("hb_panic=off"), "{up}");
    // The controller knows the guest runs on h0 (the watchdog's libvirt inventory)
    // before anything happens to it.
    let deadline = Instant::now() + WAIT;
    while lab.vm_view(&subject) != Some(("h0".into(), "Running".into())) {
        assert!(
            Instant::now() < deadline,
            "{subject} never listed running on h0: {:?}\n{}",
            lab.vm_view(&subject),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{subject} listed running on h0");
    let before = incidents_of(&lab, &subject);
    assert!(
        before.is_empty(),
        "an incident before the panic: {}\n{}",
        before
            .iter()
            .map(|(id, _)| lab.ctl(&["incidents", &id.to_string()]).to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        lab.logs()
    );
    let old_pid = guest.pid();

    guest.panic_now();
    assert!(
        guest.wait_serial("Kernel panic", WAIT),
        "the guest kernel did not panic: {}",
        guest.serial_text()
    );

    // One incident, closed once the watchdog has started the domain again.
    let deadline = Instant::now() + WAIT;
    let incident = loop {
        let ours = incidents_of(&lab, &subject);
        assert!(ours.len() <= 1, "one panic, several incidents: {ours:?}");
        if let Some(&(id, true)) = ours.first() {
            break lab.ctl(&["incidents", &id.to_string()]);
        }
        assert!(
            Instant::now() < deadline,
            "no closed incident for {subject}: {ours:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("incident: {incident}");
    let timeline = incident["timeline"].as_array().expect("timeline");
    // libvirt's account is what acted: the qemu was ended by libvirtd (on_crash
    // destroy), which the kernel's account alone does not call a failure. Either its
    // `crashed (panicked)` event or, when the watcher's domain list was taken while that
    // event was still on its way, the list that shows the domain no longer running.
    assert_eq!(timeline[0]["source"], "Libvirt", "{incident}");
    assert!(
        cause(&timeline[0]).contains("libvirt: crashed (panicked)")
            || cause(&timeline[0]).contains("missing from inventory"),
        "{incident}"
    );
    let panic_entry = timeline
        .iter()
        .position(|e| e["source"] == "Libvirt" && cause(e).contains("libvirt: crashed (panicked)"))
        .unwrap_or_else(|| panic!("the incident does not name the panic: {incident}"));
    let restart = timeline
        .iter()
        .position(|e| cause(e).contains("restart in place #1 issued"))
        .unwrap_or_else(|| panic!("no restart in place in {incident}"));
    assert!(restart > 0, "{incident}");
    assert!(
        !incident.to_string().contains("restart failed"),
        "a restart failed: {incident}"
    );
    // libvirt's "stopped (crashed)" that follows the panic, where it made the timeline
    // (it may come after the incident closed, then it is only in the event table),
    // joined this incident after the panic and opened none of its own.
    if let Some(stopped) = timeline
        .iter()
        .position(|e| cause(e).contains("libvirt: stopped (crashed)"))
    {
        assert!(stopped > panic_entry, "{incident}");
    }

    // What the watchdog sent: libvirt's crashed (panicked) then its stopped (crashed), and
    // the kernel's account of the old qemu's end (SIGTERM from libvirtd: the
    // hypervisor's doing, which the controller keeps in its event table only).
    let wd_log = lab.watchdogs[0].log_text();
    let events = printed_events(&wd_log);
    let pos = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("the watchdog sent no {what}:\n{wd_log}"))
    };
    let lifecycle = |ev: &'static str, detail: &'static str| {
        let uuid = uuid.clone();
        move |v: &Value| {
            v["type"] == "libvirt_lifecycle"
                && v["vm"]["uuid"] == uuid.as_str()
                && v["event"] == ev
                && v["detail"] == detail
        }
    };
    let panicked = pos("crashed (panicked)", &lifecycle("crashed", "panicked"));
    let stopped = pos("stopped (crashed)", &lifecycle("stopped", "crashed"));
    assert!(panicked < stopped, "{wd_log}");
    let exited = &events[pos("qemu_exited of the panicked guest", &|v| {
        v["type"] == "qemu_exited" && v["pid"] == old_pid
    })];
    assert_eq!(exited["vm"]["uuid"], uuid.as_str(), "{exited}");
    // qemu handles the SIGTERM and exits: the kernel names libvirtd as the last sender.
    assert_eq!(exited["killer"]["process"], "libvirtd", "{exited}");
    assert_eq!(exited["killer"]["signal"], 15, "{exited}");
    assert!(
        wd_log.contains("command from the controller"),
        "the watchdog got no command:\n{wd_log}"
    );
    assert!(
        lab.controller_log()
            .contains("domain started by the watchdog"),
        "{}",
        lab.controller_log()
    );

    // libvirt runs the domain again, with a new qemu, and the new guest boots and runs
    // on: its init found the switch spent (the panicked kernel's init rewrote it).
    let state = virsh(&["domstate", guest.name()], Duration::from_secs(30)).expect("domstate");
    assert_eq!(state.trim(), "running", "domstate of {}", guest.name());
    let new_pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", guest.name()))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .expect("a qemu pid file");
    assert_ne!(new_pid, old_pid, "the qemu pid did not change");
    assert_eq!(guest.control_line(), "hb_panic=done");
    // What the newest boot printed (whether qemu truncates the serial log on a start or
    // appends to it).
    let this_boot = || {
        let text = guest.serial_text();
        let at = text.rfind("HB-LINUX-UP").unwrap_or(text.len());
        text[at..].to_string()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let boot = this_boot();
        if boot.contains("hb_panic=done") && boot.matches("HB-IO ").count() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted guest did not come up and write its disk: {}",
            guest.serial_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !this_boot().contains("HB-PANIC-NOW"),
        "the restarted guest panicked again: {}",
        guest.serial_text()
    );
    assert_eq!(lab.vm_view(&subject), Some(("h0".into(), "Running".into())));
    assert_eq!(
        incidents_of(&lab, &subject).len(),
        1,
        "{}",
        lab.ctl(&["incidents"])
    );
    // The lab's daemons stop before the guest is undefined.
    drop(lab);
    drop(guest);
}
