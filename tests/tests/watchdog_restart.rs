//! A restarted watchdog keeps detecting: `run` pins the probes' maps and links under
//! bpffs, so the probes go on recording while the daemon is down, and the next daemon
//! takes them over and reads what they recorded. Real kernel, real BPF, real processes.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::collections::HashMap;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use defib_tests::daemon::{collect, PinnedSetup};
use defib_tests::{is_root, require, tag, FakeQemu};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill fake qemu");
}

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

#[test]
fn a_watchdog_restart_under_load_loses_no_qemu_exit_and_names_every_vm() {
    require!(is_root(), "root, for the BPF probes");
    require!(
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "kernel BTF (/sys/kernel/btf/vmlinux)"
    );
    // A comm of our own (≤ 15 bytes), so other tests' processes are not watched.
    let name = format!("dfrst{}", tag());
    let setup = PinnedSetup::new(&name, true);
    // The pins of another probe version (an upgrade): removed once ours are attached.
    std::fs::create_dir_all(setup.pin_dir.join("0000000000000000")).expect("old version dir");
    let (tx, rx) = channel::<Value>();
    let mut seen = Vec::new();

    let mut first = setup.start(&tx);
    first.wait_attached(Duration::from_secs(60));
    assert!(
        first.log().contains("no pinned probes found"),
        "{}",
        first.log()
    );
    assert!(
        !setup.pin_dir.join("0000000000000000").exists(),
        "the other version's pins were not removed:\n{}",
        first.log()
    );

    const N: usize = 24;
    let mut fakes: Vec<FakeQemu> = (0..N)
        .map(|i| FakeQemu::start(&name, &format!("vm{i}"), &uuid(i), &[]))
        .collect();
    let pids: Vec<u32> = fakes.iter().map(FakeQemu::pid).collect();
    let expected: HashMap<u32, String> = pids
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, uuid(i)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pids.iter().all(|p| {
        seen.iter()
            .any(|v: &Value| v["type"] == "qemu_started" && v["pid"] == *p)
    }) {
        assert!(
            Instant::now() < deadline,
            "not every fake qemu was seen starting: {seen:#?}"
        );
        collect(
            &rx,
            &mut seen,
            Duration::from_millis(50),
            Duration::from_millis(200),
        );
    }

    // Six phases of four kills: while the first daemon runs, while it stops, while no
    // daemon runs, while the second one starts, and after.
    let mut next = pids.iter().copied();
    let mut kill_n = |n: usize| {
        for pid in next.by_ref().take(n) {
            sigkill(pid);
            std::thread::sleep(Duration::from_millis(3));
        }
    };
    kill_n(4);
    // Stopping: SIGTERM, then kills while it drains.
    kill(Pid::from_raw(first.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    kill_n(4);
    assert!(first.stop(), "the first daemon did not stop on SIGTERM");
    kill_n(4);
    let mut second = setup.start(&tx);
    kill_n(4);
    second.wait_attached(Duration::from_secs(60));
    assert!(
        second.log().contains("taking over the pinned probes"),
        "{}",
        second.log()
    );
    kill_n(8);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        collect(
            &rx,
            &mut seen,
            Duration::from_millis(100),
            Duration::from_millis(500),
        );
        let exits = seen.iter().filter(|v| v["type"] == "qemu_exited").count();
        if exits >= N || Instant::now() > deadline {
            break;
        }
    }
    for pid in &pids {
        let exits: Vec<&Value> = seen
            .iter()
            .filter(|v| v["type"] == "qemu_exited" && v["pid"] == *pid)
            .collect();
        assert_eq!(
            exits.len(),
            1,
            "pid {pid}: {} exit events (want exactly one).\nfirst daemon:\n{}\nsecond daemon:\n{}",
            exits.len(),
            first.log(),
            second.log()
        );
        assert_eq!(exits[0]["signal"], 9, "{:#}", exits[0]);
        assert_eq!(
            exits[0]["vm"]["uuid"],
            expected[pid].as_str(),
            "the exit of pid {pid} does not name its VM: {:#}",
            exits[0]
        );
    }

    // Pins are refused to a second daemon and to `unpin` while one runs.
    let out = setup.unpin();
    assert!(!out.status.success(), "unpin succeeded while a daemon runs");
    assert!(second.stop(), "the second daemon did not stop on SIGTERM");
    let out = setup.unpin();
    assert!(
        out.status.success(),
        "unpin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !setup.pin_dir.exists(),
        "unpin left {}",
        setup.pin_dir.display()
    );
    for f in &mut fakes {
        let _ = f.child.wait();
    }
}
