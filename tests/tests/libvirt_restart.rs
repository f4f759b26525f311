//! libvirtd restarted under a running watchdog (`events --libvirt`) on the project's
//! hostbed: the watchdog reports the lost connection, reconnects, and misses nothing
//! afterwards. A test binary of its own, so that stopping libvirtd never hits the other
//! real-guest tests.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::process::Command;
use std::time::{Duration, Instant};

use defib_tests::guests::{hostbed_libvirtd, stop_libvirtd, unique_uuid, virsh, Guest, GuestDisk};
use defib_tests::{is_event, require, require_hostbed, Watchdog};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// The index of the first event at or after `from` that satisfies `pred`, waiting up to
/// `timeout` for it; panics with every event and the watchdog's log if none comes.
fn expect_after(
    wd: &mut Watchdog,
    from: usize,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(i) = wd.seen()[from..].iter().position(&pred) {
            return from + i;
        }
        if Instant::now() > deadline {
            let seen = wd.seen().to_vec();
            panic!(
                "no {what} (after event #{from}) within {timeout:?}.\nevents seen: {:#?}\nwatchdog log:\n{}",
                seen,
                wd.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_lifecycle(v: &Value, uuid: &str) -> bool {
    v["type"] == "libvirt_lifecycle" && v["vm"]["uuid"] == uuid
}

fn inventory_state<'a>(v: &'a Value, uuid: &str) -> Option<&'a str> {
    if v["type"] != "libvirt_inventory" {
        return None;
    }
    v["vms"]
        .as_array()?
        .iter()
        .find(|d| d["uuid"] == uuid)?
        .get("state")?
        .as_str()
}

/// SIGKILL from a separate `kill` process.
fn sigkill(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -9 {pid}");
}

fn qemu_killed(v: &Value, pid: u32) -> bool {
    is_event(v, "qemu_exited", pid) && v["signal"] == 9
}

#[test]
fn a_watchdog_reconnects_after_libvirtd_restarts_and_sees_the_next_guest_failure() {
    let _hostbed = require_hostbed!();
    let managed = hostbed_libvirtd();
    require!(
        managed.is_ok(),
        "a libvirtd started by `cargo xtask hostbed start` (the test restarts it by pid): {}",
        managed.unwrap_err()
    );

    let mut wd = Watchdog::start(&["--libvirt"]);
    wd.expect("libvirt_connected", WAIT, |v| {
        v["type"] == "libvirt_connected"
    });

    // Guest A lives through the restart; guest B's qemu dies while libvirtd is down.
    let uuid_a = unique_uuid();
    let uuid_b = unique_uuid();
    let guest_a = Guest::start("lvrst-a", &uuid_a, GuestDisk::Plain);
    let guest_b = Guest::start("lvrst-b", &uuid_b, GuestDisk::Plain);
    let (pid_a, pid_b) = (guest_a.pid(), guest_b.pid());
    for (pid, uuid) in [(pid_a, &uuid_a), (pid_b, &uuid_b)] {
        let ev = wd.expect("qemu_started", WAIT, |v| is_event(v, "qemu_started", pid));
        assert_eq!(ev["vm"]["uuid"], uuid.as_str(), "{ev}");
    }
    // The watchdog's last domain list before the restart has both running: that is
    // what it compares with after it reconnects.
    wd.expect("an inventory with both guests running", WAIT, |v| {
        inventory_state(v, &uuid_a) == Some("running")
            && inventory_state(v, &uuid_b) == Some("running")
    });

    // Declared after the guests, so dropped before them: on a failure libvirtd is
    // started again before the guests are destroyed through it.
    let mark = wd.seen().len();
    let down = stop_libvirtd().unwrap_or_else(|e| panic!("stopping libvirtd: {e}"));
    let disconnected = expect_after(&mut wd, mark, "libvirt_disconnected", WAIT, |v| {
        v["type"] == "libvirt_disconnected"
    });
    eprintln!(
        "watchdog: {} after libvirtd stopped",
        wd.seen()[disconnected]
    );

    // Guest B's qemu dies while nobody watches it but the probes.
    sigkill(pid_b);
    expect_after(
        &mut wd,
        mark,
        "qemu_exited (SIGKILL) of guest B",
        WAIT,
        |v| qemu_killed(v, pid_b),
    );

    down.start()
        .unwrap_or_else(|e| panic!("starting libvirtd again: {e}"));
    let reconnected = expect_after(
        &mut wd,
        disconnected,
        "libvirt_connected again",
        WAIT,
        |v| v["type"] == "libvirt_connected",
    );
    eprintln!(
        "watchdog: {} after libvirtd started",
        wd.seen()[reconnected]
    );
    let (sub, child) = hostbed_libvirtd().expect("the restarted libvirtd");
    eprintln!("libvirtd runs again: subreaper {sub}, libvirtd {child:?}");

    // Guest B: libvirtd finds its qemu gone when it starts; the watchdog reports it, as
    // the change found after the reconnect (or as libvirt's event, if libvirtd
    // noticed only after the watchdog was back).
    let b_stop = expect_after(
        &mut wd,
        disconnected,
        "libvirt_lifecycle stopped of guest B (killed while libvirtd was down)",
        WAIT,
        |v| is_lifecycle(v, &uuid_b) && v["event"] == "stopped",
    );
    let b_ev = wd.seen()[b_stop].clone();
    eprintln!("guest B, killed while libvirtd was down: {b_ev}");
    assert_eq!(b_ev["source"], "reconcile", "{b_ev}");

    // Guest A survived the restart: the same qemu runs, libvirt knows it running.
    assert_eq!(
        virsh(&["domstate", guest_a.name()], WAIT)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| e),
        "running",
        "guest A after the libvirtd restart"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{pid_a}")).exists(),
        "guest A's qemu {pid_a} is gone after the libvirtd restart"
    );

    // Now the next failure: both the probes and libvirt's events must report it.
    let mark = wd.seen().len();
    sigkill(pid_a);
    let exited = expect_after(
        &mut wd,
        mark,
        "qemu_exited (SIGKILL) of guest A",
        WAIT,
        |v| qemu_killed(v, pid_a),
    );
    let exited = wd.seen()[exited].clone();
    assert_eq!(exited["vm"]["uuid"], uuid_a.as_str(), "{exited}");
    let stopped = expect_after(
        &mut wd,
        mark,
        "libvirt_lifecycle stopped of guest A",
        WAIT,
        |v| is_lifecycle(v, &uuid_a) && v["event"] == "stopped",
    );
    let stopped = wd.seen()[stopped].clone();
    eprintln!("guest A, killed after the reconnect: {exited}\n  and {stopped}");
    assert_eq!(stopped["source"], "event", "{stopped}");
    assert!(
        ["failed", "crashed"].contains(&stopped["detail"].as_str().unwrap_or("")),
        "{stopped}"
    );
    assert_eq!(stopped["vm"]["name"], guest_a.name(), "{stopped}");
}
