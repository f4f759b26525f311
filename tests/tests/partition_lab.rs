//! Asymmetric partitions, for real: two lab hosts (network namespaces, two paths each),
//! the controller binary, real watchdogs, h0's BMC an ipmi_sim whose power-off kills
//! h0's processes. The fault is made by iptables inside h0's own namespace, one
//! direction at a time:
//!
//! - **h0 hears nothing from the controller**: the heartbeat acks (UDP from port 7410)
//!   and every frame on the event stream (TCP from port 7411 carrying data: welcome,
//!   event acks, commands) are dropped on the way in. The TCP handshake and the
//!   controller's pure TCP acknowledgements pass (a packet of at most 80 bytes is all
//!   header: 20 of IP, at most 60 of TCP; every frame is longer, its MAC alone is 32
//!   bytes), so what h0 sends still reaches the controller. The controller hears h0:
//!   it must never fence it. The watchdog believes itself isolated and its stream
//!   never gets an ack: its spool must keep its bound.
//! - **The controller hears nothing from h0's heartbeats** (UDP to port 7410 dropped on
//!   the way out; the event stream still works both ways): h0 is silent by the
//!   detector's only measure, so the controller suspects it and, its BMC saying only
//!   "power on", fences it through the BMC before anything is restored (DESIGN rule 2).
//!
//! Needs root, ipmi_sim and ipmitool (`cargo xtask fencebed install`) and iptables:
//! under `CI=true` a missing one fails the test.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::path::Path;
use std::time::{Duration, Instant};

use controller::engine::{HostId, Intent};
use controller::store::{SqliteStore, Store as _};
use defib_tests::bmc::{Bmc, BMC_PASSWORD, BMC_PORT, BMC_USER};
use defib_tests::lab::{host_transitions, Lab, LabSpec};
use defib_tests::{have_command, is_root, require, FakeQemu};
use serde_json::Value;

/// The labs of this file kill processes by name and load BPF: one at a time.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// h0's spool bound, small so that a few killed qemus overflow it.
const SPOOL_MAX: usize = 8;

fn qemu_name(h: usize) -> String {
    format!("qemu-part-h{h}")
}

fn requirements() -> bool {
    is_root() && have_command("ipmi_sim") && have_command("ipmitool") && have_command("iptables")
}

/// Two hosts; h0 can be fenced through its BMC, and an unconfirmed silent h0 is fenced
/// after 3 s: a controller that wrongly took h0 for silent would fence it within the
/// window each test watches. With `self_fence`, h0's watchdog self-fences when it
/// believes itself isolated, and the controller counts a silent host whose self-fence
/// is armed fenced (after its timeout and a 1 s margin).
fn start(self_fence: bool) -> (Lab, Bmc) {
    let addr = defib_tests::netns::bmc_address(0);
    let spec = LabSpec {
        hosts: 2,
        // libvirt's force-down is a no-op, so a verified fence goes on to Evacuating.
        backend: "libvirt",
        controller_extra: format!(
            r#"[engine]
fence_on_unknown_after_ms = 3000
fence_retry_backoff_ms = 1000

[fence]
verify_timeout_ms = 5000
verify_poll_ms = 100
{self_fence}

[[fence.host]]
name = "h0"
levels = [{{ method = "ipmi", address = "{addr}", port = {BMC_PORT}, username = "{BMC_USER}", password_file = "{{DIR}}/bmc.pass", timeout_ms = 1000, attempts = 2, backoff_ms = 100 }}]
"#,
            self_fence = if self_fence {
                "self_fence = true\nself_fence_margin_ms = 1000"
            } else {
                ""
            }
        ),
        watchdog_extra: Box::new(move |h| {
            let mut s = format!("[probes]\nwatch_names = [\"{}\"]\n", qemu_name(h));
            if h == 0 && self_fence {
                s.push_str("\n[self_fence]\nenabled = true\n");
            }
            s
        }),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    lab.watchdog_controller_extra = vec![format!("spool_max_events = {SPOOL_MAX}")];
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    (lab, bmc)
}

/// The controller's host view of `host` (`defibctl hosts`).
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

/// The events of a watchdog's spool not released yet (neither acked nor dropped), and
/// the highest id it handed out, read from its files (format: watchdog/src/uplink/
/// spool.rs): `events.released` holds the released mark, `events.spool` records of
/// `u32 length | u32 checksum | JSON body`. A record being appended right now may be
/// cut short: reading stops there.
fn spool_on_disk(state_dir: &Path) -> (usize, u64) {
    let released: u64 = std::fs::read_to_string(state_dir.join("events.released"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let bytes = std::fs::read(state_dir.join("events.spool")).unwrap_or_default();
    let (mut at, mut pending, mut last) = (0usize, 0usize, released);
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        let Ok(event) = serde_json::from_slice::<Value>(body) else {
            break;
        };
        let id = event["id"].as_u64().expect("an event id");
        last = last.max(id);
        if id > released {
            pending += 1;
        }
        at += 8 + len;
    }
    (pending, last)
}

/// Drops what the controller sends h0 (see the module docs), from now on.
fn drop_acks(lab: &Lab) {
    let ns = lab.net.host_ns(0);
    lab.net.iptables(
        &ns,
        &["-A", "INPUT", "-p", "udp", "--sport", "7410", "-j", "DROP"],
    );
    lab.net.iptables(
        &ns,
        &[
            "-A", "INPUT", "-p", "tcp", "--sport", "7411", "-m", "length", "--length", "81:65535",
            "-j", "DROP",
        ],
    );
}

fn restore_acks(lab: &Lab) {
    lab.net.iptables(&lab.net.host_ns(0), &["-F", "INPUT"]);
}

/// Packets counted by h0's rules (`iptables -L -v -x`), rule by rule.
fn dropped_packets(lab: &Lab, chain: &str) -> Vec<u64> {
    lab.net
        .iptables(&lab.net.host_ns(0), &["-L", chain, "-v", "-n", "-x"])
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Every intent of the lab controller's store (read once the controller has stopped:
/// it holds the store's exclusive lock while it runs).
fn intents_after_stop(lab: &mut Lab) -> Vec<Intent> {
    drop(lab.controller.take());
    let store = SqliteStore::open(lab.path("controller.sqlite")).expect("the lab's store");
    store
        .intents()
        .expect("intents")
        .into_iter()
        .map(|e| e.record.intent)
        .collect()
}

#[test]
fn a_host_that_hears_no_acks_but_is_heard_is_never_fenced_and_its_event_spool_keeps_its_bound() {
    require!(
        requirements(),
        "root, ipmi_sim, ipmitool (cargo xtask fencebed install) and iptables"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut lab, bmc) = start(false);
    let ns = lab.net.host_ns(0);
    // A VM that lives through the whole test: a fence would kill it.
    let mut resident = FakeQemu::start_in(
        Some(&ns),
        &qemu_name(0),
        "part-resident",
        "9a000000-0000-4000-8000-0000000000ff",
        &[],
    );

    let began = Instant::now();
    drop_acks(&lab);

    // 15 s of it: 50 detector timeouts (300 ms), 5 times the unconfirmed-fence delay,
    // past the watchdog's isolation timeout (3 s) and its event-ack timeout (10 s).
    // Meanwhile h0 reports a dozen short-lived VMs: 24 events, three times its spool.
    let mut states_seen = std::collections::BTreeSet::new();
    let mut isolated_seen = false;
    let mut most_pending = 0;
    let mut kills = 0;
    let state_dir = lab.path("wd0-state");
    while began.elapsed() < Duration::from_secs(15) {
        if kills < 12 && began.elapsed() > Duration::from_millis(1000 * kills) {
            let uuid = format!("9a000000-0000-4000-8000-0000000000{kills:02x}");
            let vm = FakeQemu::start_in(Some(&ns), &qemu_name(0), "part-vm", &uuid, &[]);
            drop(vm); // SIGKILL
            kills += 1;
        }
        let states = lab.host_states();
        for (h, st) in &states {
            states_seen.insert(format!("{h} {st}"));
        }
        isolated_seen |= host_view(&lab, "h0")["isolated"] == true;
        let (pending, _) = spool_on_disk(&state_dir);
        most_pending = most_pending.max(pending);
        std::thread::sleep(Duration::from_millis(200));
    }
    let wd_log = lab.watchdogs[0].log_text();
    let (pending, last_id) = spool_on_disk(&state_dir);
    let spool_bytes = std::fs::metadata(state_dir.join("events.spool")).map_or(0, |m| m.len());
    eprintln!(
        "acks lost for {:?}: states seen {states_seen:?}; h0 isolated in its heartbeats: \
         {isolated_seen}; spool: {pending} pending (most {most_pending}), last id {last_id}, \
         {spool_bytes} bytes; dropped by h0's rules: {:?}",
        began.elapsed(),
        dropped_packets(&lab, "INPUT")
    );

    // The fault was real: both rules dropped packets, the watchdog counted itself
    // isolated (and said so in its heartbeats), its stream got no ack.
    assert!(
        dropped_packets(&lab, "INPUT").iter().all(|n| *n > 0),
        "{:?}",
        dropped_packets(&lab, "INPUT")
    );
    assert!(
        isolated_seen,
        "h0 never said it is isolated:\n{}",
        lab.logs()
    );
    assert!(
        wd_log.contains("no event ack") || wd_log.contains("no welcome in time"),
        "the stream never missed an ack:\n{wd_log}"
    );
    // The controller heard h0 throughout: h0 was Up at every look, never suspected.
    assert!(
        states_seen.iter().all(|s| s.ends_with(" Up")),
        "{states_seen:?}\n{}",
        lab.logs()
    );
    assert!(lab.host_incident("h0").is_none(), "{}", lab.logs());
    assert!(
        matches!(resident.child.try_wait(), Ok(None)),
        "h0's VM died"
    );
    // (The BMC answered power queries: the lab asks one when it starts it.)
    assert!(
        !bmc.chassis_log().contains("set power"),
        "h0's power was switched: {}",
        bmc.chassis_log()
    );
    // What h0 sent still reached the controller: VMs' deaths came in on the stream that
    // was up when the acks stopped (until the watchdog gave it up for want of acks;
    // its reconnections get no welcome, so later events wait in the spool).
    let incidents = lab.ctl(&["incidents"]).to_string();
    let reached = incidents
        .matches("\"subject\":\"vm:9a000000-0000-4000-8000-0000000000")
        .count();
    eprintln!("{reached} of {kills} killed VMs reached the controller while acks were lost");
    assert!(
        reached > 0,
        "no event of h0 reached the controller: {incidents}"
    );
    // The spool kept its bound (unacked events beyond it are dropped, oldest first)
    // while more than three times as many events were handed out.
    assert!(last_id >= 3 * SPOOL_MAX as u64, "only {last_id} events");
    assert!(
        most_pending <= SPOOL_MAX && pending <= SPOOL_MAX,
        "{most_pending} / {pending} unreleased events, bound {SPOOL_MAX}"
    );

    // The acks come back: h0 reconnects, is no longer isolated, nothing was fenced.
    restore_acks(&lab);
    let deadline = Instant::now() + Duration::from_secs(30);
    while host_view(&lab, "h0")["isolated"] != false {
        assert!(
            Instant::now() < deadline,
            "h0 still isolated\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while spool_on_disk(&state_dir).0 > 0 {
        assert!(
            Instant::now() < deadline,
            "h0's spool was never acked again: {:?}\n{}",
            spool_on_disk(&state_dir),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lab.state_of("h0"), "Up");
    let alarms = lab.ctl(&["alarms"]).to_string();
    assert!(!alarms.contains("Fence"), "{alarms}");
    drop(resident);
    let intents = intents_after_stop(&mut lab);
    assert!(
        !intents.iter().any(|i| matches!(i, Intent::Fence { .. })),
        "{intents:?}"
    );
}

#[test]
fn a_host_that_hears_no_acks_with_its_self_fence_armed_kills_its_vms_yet_is_never_counted_fenced_while_heard(
) {
    require!(
        requirements(),
        "root, ipmi_sim, ipmitool (cargo xtask fencebed install) and iptables"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut lab, bmc) = start(true);
    let ns = lab.net.host_ns(0);
    let uuid = "9c000000-0000-4000-8000-000000000001";
    let mut vm = FakeQemu::start_in(Some(&ns), &qemu_name(0), "part-sf", uuid, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host_view(&lab, "h0")["self_fence"]
        .as_str()
        .is_some_and(|s| s.starts_with("armed"))
    {
        assert!(
            Instant::now() < deadline,
            "h0's self-fence never armed\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The watchdog cannot tell "the controller does not hear me" from "I do not hear
    // the controller": isolated by its own measure, it kills its VMs (DESIGN: self-fence
    // when isolated). The controller hears it throughout and so never counts it
    // fenced: its silence is what a self-fence deadline is counted from.
    assert!(matches!(vm.child.try_wait(), Ok(None)), "the VM died early");
    let began = Instant::now();
    drop_acks(&lab);
    let mut states_seen = std::collections::BTreeSet::new();
    let mut killed_after = None;
    while began.elapsed() < Duration::from_secs(15) {
        if killed_after.is_none() && !matches!(vm.child.try_wait(), Ok(None)) {
            killed_after = Some(began.elapsed());
        }
        for (h, st) in lab.host_states() {
            states_seen.insert(format!("{h} {st}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let vm_incident = lab.ctl(&["incidents"]);
    let vm_view = lab.ctl(&["vms"]).to_string();
    eprintln!(
        "acks lost with the self-fence armed: VM killed {killed_after:?} after; states seen \
         {states_seen:?}; the VM at the controller: {vm_view}\nincidents: {vm_incident}"
    );
    assert!(
        killed_after.is_some(),
        "the isolated watchdog did not kill its VM"
    );
    let wd_log = lab.watchdogs[0].log_text();
    assert!(wd_log.contains("self-fence: SIGKILLed"), "{wd_log}");
    assert!(
        states_seen.iter().all(|s| s.ends_with(" Up")),
        "{states_seen:?}\n{}",
        lab.logs()
    );
    assert!(lab.host_incident("h0").is_none(), "{}", lab.logs());
    assert!(
        !bmc.chassis_log().contains("set power"),
        "{}",
        bmc.chassis_log()
    );

    restore_acks(&lab);
    let deadline = Instant::now() + Duration::from_secs(30);
    while host_view(&lab, "h0")["isolated"] != false {
        assert!(
            Instant::now() < deadline,
            "h0 still isolated\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lab.state_of("h0"), "Up");
    let intents = intents_after_stop(&mut lab);
    eprintln!("intents: {intents:?}");
    assert!(
        !intents.iter().any(|i| matches!(i, Intent::Fence { .. })),
        "{intents:?}"
    );
    assert!(
        !intents.iter().any(|i| matches!(i, Intent::Evacuate { .. })),
        "an evacuation while the host was heard: {intents:?}"
    );
}

#[test]
fn a_host_whose_heartbeats_are_lost_but_whose_event_stream_works_is_fenced_through_its_bmc_before_anything_is_restored(
) {
    require!(
        requirements(),
        "root, ipmi_sim, ipmitool (cargo xtask fencebed install) and iptables"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut lab, bmc) = start(false);
    let ns = lab.net.host_ns(0);
    let mut vms: Vec<FakeQemu> = (0..2)
        .map(|i| {
            FakeQemu::start_in(
                Some(&ns),
                &qemu_name(0),
                &format!("part-hb-vm{i}"),
                &format!("9b000000-0000-4000-8000-00000000000{i}"),
                &[],
            )
        })
        .collect();

    lab.net.iptables(
        &ns,
        &["-A", "OUTPUT", "-p", "udp", "--dport", "7410", "-j", "DROP"],
    );
    lab.wait_until("h0 Suspect", Duration::from_secs(10), |s| {
        s.iter()
            .any(|(h, st)| h == "h0" && matches!(st.as_str(), "Suspect" | "Confirming"))
    });
    // Silent by heartbeats only: its VMs run, its event stream is still connected.
    for vm in &mut vms {
        assert!(matches!(vm.child.try_wait(), Ok(None)), "a VM died early");
    }
    let wd_log = lab.watchdogs[0].log_text();
    assert!(
        !wd_log.contains("event stream lost"),
        "the stream was cut too:\n{wd_log}"
    );

    lab.wait_until("h0 fenced", Duration::from_secs(40), |s| {
        s.iter().any(|(h, st)| {
            h == "h0" && matches!(st.as_str(), "Fenced" | "Evacuating" | "Recovered")
        })
    });
    // By the time the fence counts, the BMC has killed h0's processes.
    for vm in &mut vms {
        assert!(
            !matches!(vm.child.try_wait(), Ok(None)),
            "fenced, but a VM still runs"
        );
    }
    assert_eq!(bmc.power_file(), "0");
    let deadline = Instant::now() + Duration::from_secs(20);
    let incident = loop {
        let inc = lab.host_incident("h0").expect("h0's incident");
        if host_transitions(&inc).iter().any(|t| t == "Evacuating") {
            break inc;
        }
        assert!(
            Instant::now() < deadline,
            "no restore: {inc}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let t = host_transitions(&incident);
    let pos = |s: &str| {
        t.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("no {s} in {t:?}: {incident}"))
    };
    assert!(
        pos("Suspect") < pos("Fencing") && pos("Fencing") < pos("Fenced"),
        "{t:?}"
    );
    assert!(pos("Fenced") < pos("Evacuating"), "{t:?}");
    let text = incident.to_string();
    assert!(text.contains("confirmation: Unknown"), "{text}");
    assert!(text.contains("IpmiPowerOff"), "{text}");
    // h1 was never touched.
    assert_eq!(lab.state_of("h1"), "Up");
    let intents = intents_after_stop(&mut lab);
    let fenced: Vec<&HostId> = intents
        .iter()
        .filter_map(|i| match i {
            Intent::Fence { host, .. } => Some(host),
            _ => None,
        })
        .collect();
    assert!(
        !fenced.is_empty() && fenced.iter().all(|h| h.as_str() == "h0"),
        "{intents:?}"
    );
}
