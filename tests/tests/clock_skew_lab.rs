//! A host whose wall clock is ten minutes off, for real: two lab hosts, each with a
//! libvirt of its own (tests/src/hypervisor.rs) and a real KVM guest, the controller
//! binary with the libvirt backend, real watchdogs. h0's watchdog runs with its wall
//! clock ten minutes ahead (or behind); h1's is right. Within one test both hosts go
//! through the same faults and the controller's decisions about them are compared.
//!
//! How the clock is set: libfaketime (Debian's `faketime` package) preloaded into h0's
//! watchdog with `FAKETIME="+10m"` (or `"-10m"`) and `FAKETIME_DONT_FAKE_MONOTONIC=1`:
//! every `clock_gettime(CLOCK_REALTIME)` the process makes (Rust's `SystemTime`, the
//! watchdog's event stamps and incarnation) reads ten minutes off, while
//! CLOCK_MONOTONIC (tokio's timers, the heartbeat period, the isolation timeout, the
//! probes' `bpf_ktime_get_ns` stamps) stays true, as on a host whose NTP is wrong. A
//! time namespace cannot do this: it offsets CLOCK_MONOTONIC and CLOCK_BOOTTIME only,
//! never CLOCK_REALTIME; and setting the machine's clock would skew every process,
//! the controller's too. The test checks that the skew took (h0's incarnation, which
//! the watchdog draws from its wall clock, and the host-clock stamps of its events).
//!
//! What must hold (DESIGN rule 7: no host clock is trusted): a guest killed on the
//! skewed host is restarted in place exactly as on the right one (same timeline, same
//! order); a host cut off is suspected and comes back the same way; the skewed host is
//! otherwise never suspected nor fenced, and no alarm is raised about it.
//!
//! Needs root, the hostbed (`cargo xtask hostbed start`: KVM, libvirt, the guest image)
//! and libfaketime (`cargo xtask setup`): under `CI=true` a missing one fails the test.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::path::PathBuf;
use std::time::{Duration, Instant};

use controller::engine::Intent;
use controller::store::{SqliteStore, Store as _};
use defib_tests::guests::{unique_uuid, Guest, GuestDisk, GuestSpec};
use defib_tests::hypervisor::Hypervisor;
use defib_tests::lab::{host_transitions, own_libvirt, Lab, LabSpec};
use defib_tests::{is_root, require, require_hostbed};
use serde_json::Value;

/// Both tests run KVM guests and two libvirtds each: one at a time.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const TEN_MINUTES_MS: i64 = 600_000;

/// libfaketime's multi-threaded variant (the watchdog runs several threads), where
/// Debian installs it for this machine's architecture.
fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

/// The controller's host view of `host`.
fn host_view(lab: &Lab, host: &str) -> Value {
    let hosts = lab.ctl(&["hosts"]);
    hosts
        .as_array()
        .cloned()
        .or_else(|| hosts["hosts"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .find(|h| h["host"] == host)
        .unwrap_or(Value::Null)
}

/// Unix ms of a `YYYY-MM-DD HH:MM:SS.mmmZ (host clock)` stamp in `text`.
fn host_clock_ms(text: &str) -> Option<i64> {
    let end = text.find("Z (host clock)")?;
    let stamp = text.get(end.checked_sub(23)?..end)?;
    let n = |r: std::ops::Range<usize>| stamp.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, s, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    // Days from the civil date (Howard Hinnant's days_from_civil).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + h) * 60 + mi) * 60 + s) * 1000 + ms)
}

/// A timeline with what differs between two hosts by name only taken out: the VM's
/// uuid and domain name, then every digit (pids, times, host names, incident ids).
fn normalized(incident: &Value, uuid: &str, name: &str) -> Vec<String> {
    incident["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let line = format!(
                "{} | {} -> {} | {}",
                e["source"], e["from"], e["to"], e["cause"]
            )
            .replace(uuid, "UUID")
            .replace(name, "NAME");
            line.chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect()
        })
        .collect()
}

/// How far (ms) the host-clock stamp of the incident's eBPF account lies from the
/// controller's time of that entry.
fn ebpf_stamp_offset(incident: &Value) -> i64 {
    let entry = incident["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["source"] == "Ebpf")
        .unwrap_or_else(|| panic!("no eBPF account: {incident}"));
    let cause = entry["cause"].as_str().unwrap_or("");
    let host = host_clock_ms(cause).unwrap_or_else(|| panic!("no host clock in {cause}"));
    host - entry["at"].as_i64().expect("the entry's controller time")
}

fn skewed_host_is_judged_like_a_right_one(offset: &str, offset_ms: i64) {
    require!(is_root(), "root (network namespaces, BPF, libvirtd)");
    let _hostbed = require_hostbed!();
    let faketime = libfaketime();
    require!(
        faketime.is_some(),
        "libfaketime (the Debian package faketime; cargo xtask setup)"
    );
    let faketime = faketime.unwrap();
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());

    let hvs: Vec<Hypervisor> = (0..2)
        .map(|h| Hypervisor::start(&format!("clk-h{h}")).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let guests: Vec<Guest> = hvs
        .iter()
        .enumerate()
        .map(|(h, hv)| {
            Guest::start_spec_on(
                GuestSpec {
                    name: format!("clk-h{h}"),
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
        controller_extra: "[engine]\n# A cut link is restored long before anyone is fenced.\n\
                           fence_on_unknown_after_ms = 20000\n"
            .into(),
        // Each host watches its own libvirt and reports only its own domains.
        watchdog_extra: own_libvirt(libvirt.to_vec()),
        bmc_network: false,
    };
    let mut lab = Lab::new(&spec);
    lab.watchdog_env = vec![vec![
        ("LD_PRELOAD".into(), faketime.display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]];
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    let subjects: Vec<String> = guests.iter().map(|g| format!("vm:{}", g.uuid())).collect();
    for s in &subjects {
        lab.wait_vm_listed(s);
    }

    // The skew took: the incarnation is the watchdog's wall clock (ms) at its start.
    // A host is listed from its event stream's first event; its incarnation only from
    // its first proven heartbeat (one ack round trip later, longer on a busy machine).
    let inc = |h: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = host_view(&lab, h)["incarnation"].as_i64() {
                return i;
            }
            eprintln!("{h} listed, no proven heartbeat yet");
            assert!(
                Instant::now() < deadline,
                "{h}: no heartbeat proven within 30 s: {}\n{}",
                host_view(&lab, h),
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let skew = inc("h0") - inc("h1");
    eprintln!("h0's incarnation is {skew} ms from h1's");
    assert!(
        (skew - offset_ms).abs() < 30_000,
        "h0's wall clock is {skew} ms from h1's, not {offset_ms}"
    );

    // ---- a guest killed on each host: h1 (right clock) first, then h0.
    let mut incidents = Vec::new();
    for h in [1, 0] {
        let old_pid = guests[h].pid();
        let status = std::process::Command::new("kill")
            .args(["-9", &old_pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let incident = lab.wait_closed_incident(&subjects[h], Duration::from_secs(60));
        // Running again on its own hypervisor, with a new qemu.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pid = hvs[h].qemu_pid(guests[h].name());
            if pid.is_some_and(|p| {
                p != old_pid && std::path::Path::new(&format!("/proc/{p}")).exists()
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "h{h}'s guest not running again: {pid:?}\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        incidents.push((h, incident));
    }
    let timeline = |h: usize| {
        let (_, inc) = incidents.iter().find(|(x, _)| *x == h).unwrap();
        normalized(inc, guests[h].uuid(), guests[h].name())
    };
    let (t0, t1) = (timeline(0), timeline(1));
    eprintln!(
        "h0 ({offset}):\n  {}\nh1:\n  {}",
        t0.join("\n  "),
        t1.join("\n  ")
    );
    // The host stamps are h0's own clock, shown as such; the decisions are the same.
    let stamp = |h: usize| ebpf_stamp_offset(&incidents.iter().find(|(x, _)| *x == h).unwrap().1);
    let (s0, s1) = (stamp(0), stamp(1));
    eprintln!("eBPF stamps: h0 {s0} ms, h1 {s1} ms from the controller's clock");
    assert!((s0 - offset_ms).abs() < 30_000, "h0's stamp is {s0} ms off");
    assert!(s1.abs() < 30_000, "h1's stamp is {s1} ms off");
    // Same state changes in the same order; the same notes (a second account's place
    // among them depends on when libvirt's event came, on either host).
    let split = |t: &[String]| {
        let (mut notes, changes): (Vec<String>, Vec<String>) = t
            .iter()
            .cloned()
            .partition(|l| l.contains("| \"-\" -> \"-\" |"));
        notes.sort();
        (changes, notes)
    };
    assert_eq!(
        split(&t0),
        split(&t1),
        "the skewed host's guest was handled differently"
    );
    assert!(
        t0.iter().any(|l| l.contains("restart in place #")),
        "{t0:?}"
    );

    // ---- each host cut off on every path for a moment: suspected, then Up again.
    let mut transitions = Vec::new();
    for h in [1, 0] {
        let host = format!("h{h}");
        lab.net.set_host_links(h, false);
        lab.wait_until(&format!("{host} Suspect"), Duration::from_secs(10), |s| {
            s.iter()
                .any(|(x, st)| *x == host && matches!(st.as_str(), "Suspect" | "Confirming"))
        });
        lab.net.set_host_links(h, true);
        lab.wait_until(&format!("{host} Up"), Duration::from_secs(10), |s| {
            s.iter().any(|(x, st)| *x == host && st == "Up")
        });
        let inc = lab.host_incident(&host).expect("a host incident");
        transitions.push(host_transitions(&inc));
    }
    eprintln!(
        "host transitions: h1 {:?}, h0 {:?}",
        transitions[0], transitions[1]
    );
    assert_eq!(transitions[0], transitions[1]);

    // Nothing else about either host: one host incident each (the cut), the same
    // alarms (none about a clock), no fence intent.
    let list = lab.ctl(&["incidents"]);
    for host in ["host:h0", "host:h1"] {
        let n = list["incidents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["subject"] == host)
            .count();
        assert_eq!(n, 1, "{host}: {list}");
    }
    let (a0, a1) = (lab.alarm_kinds("h0"), lab.alarm_kinds("h1"));
    assert_eq!(a0, a1, "alarms differ");
    let alarms = lab.ctl(&["alarms"]).to_string().to_lowercase();
    assert!(!alarms.contains("clock"), "{alarms}");
    assert_eq!(lab.state_of("h0"), "Up");
    drop(lab.controller.take());
    let store = SqliteStore::open(lab.path("controller.sqlite")).expect("the lab's store");
    let intents = store.intents().expect("intents");
    assert!(
        !intents
            .iter()
            .any(|e| matches!(e.record.intent, Intent::Fence { .. })),
        "{intents:?}"
    );
    // The lab's daemons stop before the guests and their libvirtds.
    drop(lab);
    drop(guests);
    drop(hvs);
}

#[test]
fn a_host_whose_clock_is_ten_minutes_ahead_gets_the_same_decisions_as_a_host_whose_clock_is_right()
{
    skewed_host_is_judged_like_a_right_one("+10m", TEN_MINUTES_MS);
}

#[test]
fn a_host_whose_clock_is_ten_minutes_behind_gets_the_same_decisions_as_a_host_whose_clock_is_right()
{
    skewed_host_is_judged_like_a_right_one("-10m", -TEN_MINUTES_MS);
}
