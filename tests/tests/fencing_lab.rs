//! Confirm and fence for real: lab hosts whose BMC is OpenIPMI's ipmi_sim (power off =
//! every process of the lab host SIGKILLed and its links cut), BMCs on the management
//! network with ports of their own, ipmitool and fence_ipmilan as the fence methods; a
//! 3-node corosync + Pacemaker cluster of lab hosts. Only a verified fence lets the
//! engine restore, and only evidence tied to the attempt verifies it: an older fence in
//! Pacemaker's history does not, and a BMC that answers off for a host that stays on
//! gets no restore while the host is heard.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use defib_tests::bmc::{Bmc, BMC_PASSWORD, BMC_PORT, BMC_USER};
use defib_tests::lab::{host_transitions, Lab, LabSpec};
use defib_tests::pacemaker::Cluster;
use defib_tests::{have_command, is_root, require, FakeQemu};
use serde_json::Value;

/// Every watchdog sees every qemu on this one kernel, and the labs share names: one at a
/// time.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The fake qemus of lab host `h` run under this name, and only `h`'s watchdog watches it.
fn qemu_name(h: usize) -> String {
    format!("qemu-fence-h{h}")
}

/// h0 is the host that fails; h1 stays up (a controller that hears nobody suspects
/// itself and fences nobody). h0's fence levels are `levels` (TOML inline tables).
fn spec(levels: &str) -> LabSpec {
    LabSpec {
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

[[fence.host]]
name = "h0"
levels = [{levels}]
"#
        ),
        watchdog_extra: Box::new(|h| format!("[probes]\nwatch_names = [\"{}\"]\n", qemu_name(h))),
        bmc_network: true,
    }
}

fn ipmi_level(addr: &str, port: u16) -> String {
    format!(
        r#"{{ method = "ipmi", address = "{addr}", port = {port}, username = "{BMC_USER}", password_file = "{{DIR}}/bmc.pass", timeout_ms = 1000, attempts = 2, backoff_ms = 100 }}"#
    )
}

fn agent_level(addr: &str) -> String {
    format!(
        r#"{{ method = "agent", agent = "fence_ipmilan", password_file = "{{DIR}}/bmc.pass", timeout_ms = 10000, attempts = 1, options = {{ ip = "{addr}", ipport = "{BMC_PORT}", username = "{BMC_USER}", lanplus = "1", cipher = "3", power_wait = "0" }} }}"#
    )
}

/// Starts the lab with h0's BMC running.
fn start(levels: impl Fn(&str) -> String) -> (Lab, Bmc) {
    let addr = defib_tests::netns::bmc_address(0);
    let spec = spec(&levels(&addr));
    let mut lab = Lab::new(&spec);
    assert_eq!(lab.net.bmc_addr(0), addr);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    (lab, bmc)
}

fn vms_on_h0(lab: &Lab) -> Vec<FakeQemu> {
    vms_named(lab, &qemu_name(0))
}

fn vms_named(lab: &Lab, name: &str) -> Vec<FakeQemu> {
    let ns = lab.net.host_ns(0);
    (0..2)
        .map(|i| {
            FakeQemu::start_in(
                Some(&ns),
                name,
                &format!("fence-vm{i}"),
                &format!("fe0ce000-0000-4000-8000-00000000000{i}"),
                &[],
            )
        })
        .collect()
}

fn alive(vm: &mut FakeQemu) -> bool {
    matches!(vm.child.try_wait(), Ok(None))
}

/// Whether `vm` is still alive 2 s from now: a power-off's SIGKILL is sent before the
/// BMC answers, but the kernel may finish the process's exit a moment later.
fn outlives_a_kill(vm: &mut FakeQemu) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(vm) {
        if Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn requirements() -> bool {
    is_root() && have_command("ipmi_sim") && have_command("ipmitool")
}

/// Waits until h0 has been fenced (Fenced, or already restoring), then returns its
/// incident.
fn wait_fenced(lab: &Lab, timeout: Duration) -> Value {
    lab.wait_until("h0 fenced", timeout, |s| {
        s.iter().any(|(h, st)| {
            h == "h0" && matches!(st.as_str(), "Fenced" | "Evacuating" | "Recovered")
        })
    });
    lab.host_incident("h0").expect("a host incident for h0")
}

fn position(transitions: &[String], state: &str, incident: &Value) -> usize {
    transitions
        .iter()
        .position(|t| t == state)
        .unwrap_or_else(|| panic!("no {state} in {transitions:?}: {incident}"))
}

fn entry<'a>(incident: &'a Value, to: &str) -> &'a Value {
    incident["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["to"] == to)
        .unwrap_or_else(|| panic!("no entry to {to}: {incident}"))
}

/// The restore after the fence: waits until the timeline shows Evacuating.
fn wait_restore_began(lab: &Lab) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let inc = lab.host_incident("h0").expect("incident");
        if host_transitions(&inc).iter().any(|t| t == "Evacuating") {
            return inc;
        }
        assert!(
            Instant::now() < deadline,
            "no restore after the fence: {inc}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_host_powered_off_through_its_bmc_is_confirmed_dead_fenced_with_power_status_off_and_only_then_restored(
) {
    require!(
        requirements(),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, bmc) = start(|a| ipmi_level(a, BMC_PORT));
    let mut vms = vms_on_h0(&lab);

    // The host loses power: its processes die, its links go dark.
    bmc.ipmitool(&lab.net, "off")
        .expect("power off through the BMC");
    assert_eq!(bmc.power_file(), "0");
    for vm in &mut vms {
        assert!(!outlives_a_kill(vm), "a power loss left a qemu running");
    }

    wait_fenced(&lab, Duration::from_secs(30));
    let incident = wait_restore_began(&lab);
    let t = host_transitions(&incident);
    let (suspect, confirming, fencing, fenced, evacuating) = (
        position(&t, "Suspect", &incident),
        position(&t, "Confirming", &incident),
        position(&t, "Fencing", &incident),
        position(&t, "Fenced", &incident),
        position(&t, "Evacuating", &incident),
    );
    assert!(
        suspect < confirming && confirming < fencing && fencing < fenced && fenced < evacuating,
        "out of order: {t:?}"
    );
    // The BMC confirmed it dead (power off), and its power status verified the fence.
    let text = incident.to_string();
    assert!(
        incident["timeline"].as_array().unwrap().iter().any(|e| {
            e["source"] == "Ipmi" && e["cause"].as_str().unwrap_or("").contains("Dead")
        }),
        "no confirmation from the BMC: {text}"
    );
    assert_eq!(
        entry(&incident, "Fencing")["cause"],
        "confirmed dead",
        "{text}"
    );
    let fenced = entry(&incident, "Fenced");
    assert_eq!(fenced["source"], "Ipmi", "{text}");
    assert!(
        fenced["cause"].as_str().unwrap().contains("IpmiPowerOff"),
        "{text}"
    );
    assert!(!lab.alarm_kinds("h0").iter().any(|k| k.starts_with("Fence")));
}

#[test]
fn a_partitioned_host_that_still_runs_is_powered_off_through_its_bmc_before_anything_is_restored() {
    require!(
        requirements() && have_command("fence_ipmilan"),
        "root, ipmi_sim, ipmitool and fence_ipmilan (cargo xtask fencebed install)"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Level 1 points at a port where no BMC answers; level 2 is fence_ipmilan.
    let (mut lab, bmc) = start(|a| format!("{}, {}", ipmi_level(a, 9), agent_level(a)));
    let mut vms = vms_on_h0(&lab);

    // Cut off on every path, but running: its qemus and its watchdog live on.
    lab.net.set_host_links(0, false);
    lab.wait_until("h0 Suspect", Duration::from_secs(10), |s| {
        s.iter()
            .any(|(h, st)| h == "h0" && matches!(st.as_str(), "Suspect" | "Confirming"))
    });
    for vm in &mut vms {
        assert!(alive(vm), "a qemu died from a cut link alone");
    }

    let incident = wait_fenced(&lab, Duration::from_secs(40));
    // By the time the fence counts as verified, the BMC has killed the host's processes.
    for vm in &mut vms {
        assert!(
            !outlives_a_kill(vm),
            "fenced, but a qemu still runs: {incident}"
        );
    }
    // The watchdog was killed too (a process holding BPF programs may take a moment
    // to be reaped).
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(lab.watchdogs[0].child.try_wait(), Ok(None)) {
        assert!(
            Instant::now() < deadline,
            "the fenced host's watchdog (pid {}) still runs",
            lab.watchdogs[0].pid()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        bmc.chassis_log().contains("killed"),
        "{}",
        bmc.chassis_log()
    );
    assert_eq!(bmc.power_file(), "0");

    let incident = wait_restore_began(&lab);
    let t = host_transitions(&incident);
    assert!(
        position(&t, "Fencing", &incident) < position(&t, "Fenced", &incident)
            && position(&t, "Fenced", &incident) < position(&t, "Evacuating", &incident),
        "{t:?}"
    );
    let text = incident.to_string();
    // Power on says nothing about the OS: Unknown, then fenced after long silence.
    assert!(text.contains("confirmation: Unknown"), "{text}");
    assert!(
        entry(&incident, "Fencing")["cause"]
            .as_str()
            .unwrap()
            .starts_with("unconfirmed, silent for"),
        "{text}"
    );
    assert!(
        entry(&incident, "Fenced")["cause"]
            .as_str()
            .unwrap()
            .contains("IpmiPowerOff"),
        "{text}"
    );
    // fence_ipmilan did it (level 2), after level 1 failed.
    let log = lab.controller_log();
    assert!(log.contains("level 1 (ipmi 10.77.0.100:9)"), "{log}");
    assert!(
        bmc.chassis_log().lines().any(|l| l.contains("set power 0")),
        "{}",
        bmc.chassis_log()
    );
}

#[test]
fn with_its_bmc_unreachable_a_silent_host_is_not_restored_and_the_controller_raises_an_alarm_and_waits(
) {
    require!(
        requirements(),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, mut bmc) = start(|a| ipmi_level(a, BMC_PORT));
    let mut vms = vms_on_h0(&lab);
    bmc.stop();

    lab.net.set_host_links(0, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lab.alarm_kinds("h0").iter().any(|k| k == "FenceExhausted") {
        assert!(
            Instant::now() < deadline,
            "no FenceExhausted alarm: {:?}\n{}",
            lab.alarm_kinds("h0"),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let kinds = lab.alarm_kinds("h0");
    assert!(kinds.iter().any(|k| k == "FenceFailed"), "{kinds:?}");
    // The incident waits in Fencing: nothing fenced, nothing restored, the VMs untouched.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.state_of("h0"), "Fencing");
    let incident = lab.host_incident("h0").expect("incident");
    assert!(incident["closed_at_ms"].is_null(), "{incident}");
    let t = host_transitions(&incident);
    assert!(
        !t.iter()
            .any(|s| matches!(s.as_str(), "Fenced" | "Evacuating" | "Recovered")),
        "{t:?}: {incident}"
    );
    let text = incident.to_string();
    assert!(text.contains("confirmation: Unknown"), "{text}");
    assert!(text.contains("no restore"), "{text}");
    assert!(
        text.contains("level 1 (ipmi 10.77.0.100:623): power off failed"),
        "{text}"
    );
    for vm in &mut vms {
        assert!(alive(vm), "a qemu died although nothing fenced the host");
    }
}

#[test]
fn an_isolated_watchdog_that_self_fences_kills_its_vms_and_only_then_does_the_controller_count_its_host_fenced(
) {
    require!(is_root(), "root (network namespaces, BPF)");
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // No BMC: h0's watchdog self-fences (isolation timeout 3 s, the default, carried in
    // its heartbeats), and the controller counts it fenced 3 s + 1 s after its last one.
    let spec = LabSpec {
        hosts: 2,
        backend: "libvirt",
        controller_extra: r#"[engine]
fence_on_unknown_after_ms = 5000

[fence]
self_fence = true
self_fence_margin_ms = 1000
"#
        .into(),
        watchdog_extra: Box::new(|h| {
            let mut s = format!("[probes]\nwatch_names = [\"qemu-sf-h{h}\"]\n");
            if h == 0 {
                s.push_str("\n[self_fence]\nenabled = true\n");
            }
            s
        }),
        bmc_network: false,
    };
    let mut lab = Lab::new(&spec);
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.watchdogs[0].log_text().contains("self-fence armed") {
        assert!(Instant::now() < deadline, "{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!lab.watchdogs[1].log_text().contains("self-fence"));
    // The controller learns "armed" from the heartbeats that follow (every 100 ms): let
    // several reach it before the cut, or it rightly never counts h0 self-fenced.
    std::thread::sleep(Duration::from_secs(1));
    let mut vms = vms_named(&lab, "qemu-sf-h0");

    let cut = Instant::now();
    lab.net.set_host_links(0, false);
    let (mut dead_at, mut fenced_at) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_at.is_none() || fenced_at.is_none() {
        if dead_at.is_none() && vms.iter_mut().all(|vm| !alive(vm)) {
            dead_at = Some(cut.elapsed());
        }
        if fenced_at.is_none()
            && matches!(
                lab.state_of("h0").as_str(),
                "Fenced" | "Evacuating" | "Recovered"
            )
        {
            fenced_at = Some(cut.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "qemus dead after {dead_at:?}, h0 fenced after {fenced_at:?}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (dead_at, fenced_at) = (dead_at.unwrap(), fenced_at.unwrap());
    eprintln!("links cut: qemus killed by the watchdog after {dead_at:?}, h0 counted fenced after {fenced_at:?}");
    assert!(
        dead_at < fenced_at,
        "the controller counted h0 fenced while its VMs ran"
    );
    // Never before the isolation timeout plus the margin.
    assert!(fenced_at >= Duration::from_secs(4), "{fenced_at:?}");
    // The watchdog killed its VMs, not itself.
    assert!(
        matches!(lab.watchdogs[0].child.try_wait(), Ok(None)),
        "{}",
        lab.watchdogs[0].log_text()
    );
    let wd = lab.watchdogs[0].log_text();
    assert!(wd.contains("self-fence: isolated"), "{wd}");
    let incident = wait_restore_began(&lab);
    let fenced = entry(&incident, "Fenced");
    assert_eq!(fenced["source"], "SelfFence", "{incident}");
    assert!(
        fenced["cause"]
            .as_str()
            .unwrap()
            .contains("SelfFenceDeadline"),
        "{incident}"
    );
}

#[test]
fn a_bmc_that_answers_off_for_a_host_that_stays_on_gets_no_restore_while_the_host_is_heard_but_an_alarm(
) {
    require!(
        requirements(),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, bmc) = start(|a| ipmi_level(a, BMC_PORT));
    let mut vms = vms_on_h0(&lab);
    // The BMC lies: its power-off kills nothing and records "off". Meanwhile h0's
    // partition heals, 1.5 s before the BMC's power reads off (time for the links'
    // neighbours to be found again and for many heartbeats), so h0 is heard again
    // when its BMC says it is off.
    let mut heal: String = (0..lab.net.paths)
        .map(|p| format!("ip -n {} link set h0-p{p} up\n", lab.net.switch_ns()))
        .collect();
    heal.push_str("sleep 1.5\n");
    bmc.lie_on_power_off(&heal);

    lab.net.set_host_links(0, false);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !lab
        .alarm_kinds("h0")
        .iter()
        .any(|k| k == "FenceContradicted")
    {
        assert!(
            Instant::now() < deadline,
            "no FenceContradicted alarm: {:?} {:?}\n{}",
            lab.alarm_kinds("h0"),
            lab.host_incident("h0"),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The BMC did say off, and the fence was verified by it ...
    assert_eq!(bmc.power_file(), "0");
    assert!(
        bmc.chassis_log().lines().any(|l| l.contains("set power 0")),
        "{}",
        bmc.chassis_log()
    );
    // ... but while h0 is heard, nothing of it is restored: give a restore time to show.
    std::thread::sleep(Duration::from_secs(3));
    let incident = lab.host_incident("h0").expect("incident");
    assert_eq!(lab.state_of("h0"), "Fenced", "{incident}");
    let t = host_transitions(&incident);
    assert!(t.iter().any(|s| s == "Fenced"), "{t:?}: {incident}");
    assert!(
        !t.iter()
            .any(|s| matches!(s.as_str(), "Evacuating" | "Recovered")),
        "{t:?}: {incident}"
    );
    assert!(
        incident.to_string().contains("never powered off"),
        "{incident}"
    );
    for vm in &mut vms {
        assert!(
            alive(vm),
            "h0's qemu died, but nothing should have touched it"
        );
    }
}

/// Three lab hosts are three cluster nodes, each with its BMC; h1's only fence level is
/// Pacemaker, asked through h0. `pacemaker_extra` goes into `[fence.pacemaker]`.
fn pacemaker_lab(pacemaker_extra: &str) -> (Lab, Vec<Bmc>, Cluster, Vec<FakeQemu>) {
    let spec = LabSpec {
        hosts: 3,
        backend: "libvirt",
        controller_extra: format!(
            r#"[fence.pacemaker]
command_prefix = ["ip", "netns", "exec", "{{HOST0_NS}}"]
{pacemaker_extra}

[[fence.host]]
name = "h1"
levels = [{{ method = "pacemaker" }}]
"#
        ),
        watchdog_extra: Box::new(|h| format!("[probes]\nwatch_names = [\"qemu-pm-h{h}\"]\n")),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    let bmcs: Vec<Bmc> = (0..3)
        .map(|h| Bmc::start(&lab.net, h, lab.dir.path()))
        .collect();
    let cluster = Cluster::start(&lab.net, lab.dir.path(), 1000);
    cluster.configure_ipmi_fencing(&lab.net, BMC_USER, BMC_PASSWORD);
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("three hosts Up", Duration::from_secs(60), |s| {
        s.len() == 3 && s.iter().all(|(_, st)| st == "Up")
    });
    let ns = lab.net.host_ns(1);
    let vms: Vec<FakeQemu> = (0..2)
        .map(|i| {
            FakeQemu::start_in(
                Some(&ns),
                "qemu-pm-h1",
                &format!("pm-vm{i}"),
                &format!("fe0ce000-0000-4000-8000-0000000001{i:02}"),
                &[],
            )
        })
        .collect();
    (lab, bmcs, cluster, vms)
}

fn pacemaker_requirements() -> bool {
    requirements()
        && have_command("fence_ipmilan")
        && have_command("corosync")
        && have_command("pacemakerd")
        && have_command("crm_mon")
}

/// The `<fence_event>` lines of `history` that `stonith_admin` asked for (Pacemaker's
/// own controller may add a reboot of its own, client `pacemaker-controld`).
fn asked_through_stonith_admin(history: &str) -> Vec<&str> {
    history
        .lines()
        .filter(|l| l.contains("<fence_event") && l.contains("client=\"stonith_admin"))
        .collect()
}

#[test]
fn a_node_pacemaker_fenced_before_the_controller_asked_is_fenced_again_and_verified_by_the_new_history_entry(
) {
    require!(
        pacemaker_requirements(),
        "root, ipmi_sim, ipmitool, fence-agents, corosync and pacemaker (cargo xtask fencebed install)"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, bmcs, cluster, mut vms) = pacemaker_lab("");

    // The cluster fences h1 on its own (as it does for a node it lost), before the
    // controller has noticed anything: fence_ipmilan through h1's BMC, whose power-off
    // kills everything on h1.
    cluster
        .run_on(0, "stonith_admin", &["--fence", "h1", "--timeout", "60"])
        .expect("Pacemaker fences h1");
    assert!(cluster.history("h1").contains("status=\"success\""));
    for vm in &mut vms {
        assert!(
            !outlives_a_kill(vm),
            "fenced by Pacemaker, but a qemu still runs"
        );
    }

    lab.wait_until("h1 fenced", Duration::from_secs(60), |s| {
        s.iter().any(|(h, st)| {
            h == "h1" && matches!(st.as_str(), "Fenced" | "Evacuating" | "Recovered")
        })
    });
    let incident = lab.host_incident("h1").expect("incident");
    let text = incident.to_string();
    let t = host_transitions(&incident);
    assert!(
        position(&t, "Confirming", &incident) < position(&t, "Fencing", &incident)
            && position(&t, "Fencing", &incident) < position(&t, "Fenced", &incident),
        "{t:?}"
    );
    // Pacemaker's membership confirmed it dead, its history verified the fence.
    assert!(
        incident["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| { e["source"] == "Pacemaker" && e["cause"] == "confirmation: Dead" }),
        "{text}"
    );
    let fenced = entry(&incident, "Fenced");
    assert_eq!(fenced["source"], "Pacemaker", "{text}");
    assert!(
        fenced["cause"]
            .as_str()
            .unwrap()
            .contains("PacemakerHistory"),
        "{text}"
    );
    // The earlier fence, seconds old, was not taken as this attempt's evidence: the
    // controller fenced h1 itself, and its own new event verified it.
    let log = lab.controller_log();
    assert!(
        log.contains("fencing history: fenced since the request"),
        "{log}"
    );
    let history = cluster.history("h1");
    let asked = asked_through_stonith_admin(&history);
    assert_eq!(asked.len(), 2, "{history}");
    assert!(
        asked.iter().all(|l| l.contains("status=\"success\"")),
        "{history}"
    );
    // `stonith_admin --fence` is an "off": the BMC left h1 off.
    assert_eq!(bmcs[1].power_file(), "0");
    assert!(bmcs[1].chassis_log().contains("set power 0"));
    drop(cluster);
    drop(bmcs);
    drop(lab);
}

#[test]
fn an_older_successful_fence_in_pacemakers_history_does_not_verify_a_new_attempt_whose_fence_device_fails(
) {
    require!(
        pacemaker_requirements(),
        "root, ipmi_sim, ipmitool, fence-agents, corosync and pacemaker (cargo xtask fencebed install)"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Pacemaker's own timeout bounds the failing fence (the call gets 5 s more).
    let (lab, mut bmcs, cluster, _vms) = pacemaker_lab("fence_timeout_ms = 15000");

    // A successful fence of h1 ...
    cluster
        .run_on(0, "stonith_admin", &["--fence", "h1", "--timeout", "60"])
        .expect("Pacemaker fences h1");
    let first = Instant::now();
    assert!(cluster.history("h1").contains("status=\"success\""));
    // ... and then h1's fence device fails: its BMC no longer answers.
    bmcs[1].stop();

    // The controller's attempt comes well within 120 s of that success, and fails.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !lab.alarm_kinds("h1").iter().any(|k| k == "FenceFailed") {
        let state = lab.state_of("h1");
        assert!(
            !matches!(state.as_str(), "Fenced" | "Evacuating" | "Recovered"),
            "h1 counted fenced on the strength of the older fence: {state}\n{}\n{}",
            cluster.history("h1"),
            lab.logs()
        );
        assert!(
            Instant::now() < deadline,
            "no FenceFailed alarm: {:?}\n{}",
            lab.alarm_kinds("h1"),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        first.elapsed() < Duration::from_secs(120),
        "the older success was not recent enough to show anything: {:?}",
        first.elapsed()
    );
    assert_eq!(lab.state_of("h1"), "Fencing");
    let incident = lab.host_incident("h1").expect("incident");
    let t = host_transitions(&incident);
    assert!(
        !t.iter()
            .any(|s| matches!(s.as_str(), "Fenced" | "Evacuating" | "Recovered")),
        "{t:?}: {incident}"
    );
    let text = incident.to_string();
    assert!(
        text.contains("level 1 (pacemaker node h1): power off failed"),
        "{text}"
    );
    assert!(text.contains("no restore"), "{text}");
    // The controller did ask (the older event alone is no reason not to), and the
    // history still holds that older success next to it.
    let history = cluster.history("h1");
    let asked = asked_through_stonith_admin(&history);
    assert!(asked.len() >= 2, "{history}");
    assert!(
        asked.iter().any(|l| l.contains("status=\"success\"")),
        "{history}"
    );
    assert!(
        !lab.controller_log()
            .contains("fencing history: fenced since the request"),
        "{}",
        lab.controller_log()
    );
    drop(cluster);
    drop(bmcs);
    drop(lab);
}
