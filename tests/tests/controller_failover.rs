//! Several controllers, one leader elected on etcd (issue 15), against the real
//! components: a 3-member etcd cluster in the lab's controller namespace, three
//! defib-controller processes, real watchdogs on lab hosts, hypervisors of their own
//! with KVM guests, an IPMI BMC (ipmi_sim).
//!
//! * The leader is SIGKILLed while a host is being lost: a follower takes the lead, and
//!   the lost host's guest runs again elsewhere exactly once (one start ever carried
//!   out; a start its target fails is retried elsewhere).
//! * The leader is cut off from etcd but still hears the hosts: it stops acting (and
//!   says so) before the new leader starts, as their logs' timestamps show.
//! * One etcd member down changes nothing; two down (no quorum): no controller acts, and
//!   the alarms say why; quorum back: a leader again.
//!
//! Needs root, the hostbed, ipmi_sim and etcd: under `CI=true` a missing one fails.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use defib_tests::bmc::{Bmc, BMC_PASSWORD};
use defib_tests::etcd::{self, EtcdCluster, EtcdOpts};
use defib_tests::guests::{unique_uuid, Guest, GuestDisk, GuestSpec};
use defib_tests::hypervisor::{Hypervisor, HypervisorOptions};
use defib_tests::lab::{fence_h0_by_ipmi, own_libvirt, Lab, LabSpec};
use defib_tests::logs::{line_unix_ms, strip_ansi};
use defib_tests::{have_command, is_root, require, require_hostbed};

/// Every watchdog sees every qemu on this one kernel: one lab at a time.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The lease TTL the controllers run with (the default).
const TTL: Duration = Duration::from_secs(1);

/// The StartFromDefinition commands for `uuid` a watchdog's log says it received and
/// carried out (`command done`). A start the target could not carry out (`command
/// failed`: its qemu would not start) is retried on another host as a new evacuation
/// attempt with its own intent, and does not count.
fn starts_done(watchdog_log: &str, uuid: &str) -> usize {
    let log = strip_ansi(watchdog_log);
    let id_of = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("command_id="))
            .map(str::to_owned)
    };
    let received: Vec<String> = log
        .lines()
        .filter(|l| {
            l.contains("command from the controller")
                && l.contains("StartFromDefinition")
                && l.contains(uuid)
        })
        .filter_map(id_of)
        .collect();
    log.lines()
        .filter(|l| l.contains("command done"))
        .filter_map(id_of)
        .filter(|id| received.contains(id))
        .count()
}

/// Whether `name` runs on `hv` (active in any state), as its libvirt says.
fn runs_on(hv: &Hypervisor, name: &str) -> bool {
    hv.virsh(&["domstate", name], Duration::from_secs(30))
        .is_ok_and(|s| !matches!(s.trim(), "shut off" | "crashed"))
}

/// The instant (unix ms) of the first line of `log` containing `what`.
fn logged_at(log: &str, what: &str) -> Option<u64> {
    line_unix_ms(log.lines().find(|l| l.contains(what))?)
}

/// The states host `host`'s newest incident went through, as the leader shows its
/// timeline.
fn host_steps(lab: &Lab, host: &str) -> Vec<String> {
    let incident = lab
        .host_incident(host)
        .unwrap_or_else(|| panic!("no incident about {host}"));
    incident["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["subject"]["Host"] == host && e["to"] != "-")
        .map(|e| e["to"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// A lab of `hosts` lab hosts with an etcd cluster in its controller namespace and
/// three controllers; etcd listens on every address so that each controller can reach
/// it through an address of its own (`127.0.1.(i+1)`), which a test may cut.
fn start_ha_lab(spec: &LabSpec) -> (Lab, EtcdCluster) {
    let lab = Lab::new(spec);
    let etcd = EtcdCluster::start(EtcdOpts {
        netns: Some(lab.net.controller_ns()),
        listen_any: true,
        ..EtcdOpts::default()
    });
    (lab, etcd)
}

/// Controller `i`'s view of the etcd members: through its own loopback address.
fn endpoints_for(etcd: &EtcdCluster, i: usize) -> Vec<String> {
    etcd.endpoints()
        .iter()
        .map(|e| e.replace("127.0.0.1", &format!("127.0.1.{}", i + 1)))
        .collect()
}

/// Three hypervisors of their own (`<prefix>-h0..2`, disk leases on) and a KVM guest
/// started on the first: the guest and its uuid.
fn three_hypervisors_and_a_guest_on_the_first(prefix: &str) -> ([Hypervisor; 3], Guest, String) {
    let leases = HypervisorOptions {
        disk_leases: true,
        ..HypervisorOptions::default()
    };
    let hvs = [0, 1, 2]
        .map(|h| Hypervisor::start_with(&format!("{prefix}-h{h}"), &leases))
        .map(|h| h.unwrap_or_else(|e| panic!("{e}")));
    let uuid = unique_uuid();
    let guest = Guest::start_spec_on(
        GuestSpec {
            name: prefix.into(),
            uuid: uuid.clone(),
            disk: GuestDisk::Plain,
            ib700: None,
            wdt_pets: 0,
        },
        &hvs[0].uri(),
        &hvs[0].pid_dir(),
    );
    (hvs, guest, uuid)
}

#[test]
fn a_sigkilled_leader_is_replaced_and_a_host_lost_during_the_handover_is_recovered_exactly_once() {
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let _hostbed = require_hostbed!();
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (hvs, guest, uuid) = three_hypervisors_and_a_guest_on_the_first("ha");
    let name = guest.name().to_string();
    let subject = format!("vm:{uuid}");
    let bmc_addr = defib_tests::netns::bmc_address(0);
    let libvirt: Vec<(String, String)> = hvs
        .iter()
        .map(|h| (h.uri(), h.pid_dir().display().to_string()))
        .collect();
    let spec = LabSpec {
        hosts: 3,
        backend: "libvirt",
        controller_extra: fence_h0_by_ipmi(&bmc_addr),
        watchdog_extra: own_libvirt(libvirt.to_vec()),
        bmc_network: true,
    };
    let (mut lab, etcd) = start_ha_lab(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    bmc.also_on_power_off(&format!(
        "kill -9 $(cat {}/{name}.pid)",
        hvs[0].pid_dir().display()
    ));
    lab.start_controllers(&spec, 3, |i| endpoints_for(&etcd, i));
    lab.start_watchdogs(&spec);
    let first_leader = lab.wait_leader(Duration::from_secs(30));
    lab.wait_until("h0, h1 and h2 Up", Duration::from_secs(60), |s| {
        s.len() == 3 && s.iter().all(|(_, st)| st == "Up")
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab.vm_view(&subject) != Some(("h0".into(), "Running".into())) {
        assert!(
            Instant::now() < deadline,
            "{subject} not seen on h0\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every follower says who leads.
    for i in (0..3).filter(|&i| i != first_leader) {
        let c = lab.ctl_at(i, &["controllers"]).unwrap();
        assert_eq!(c["role"], "follower", "{c}");
        assert_eq!(c["leader"], format!("ctl-{first_leader}"), "{c}");
    }

    // h0 is cut off; as soon as the leader suspects it, the leader dies.
    lab.net.set_host_links(0, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = lab.controllers[first_leader].as_ref().unwrap().log_text();
        if log
            .lines()
            .any(|l| l.contains("timeline") && l.contains("host:h0") && l.contains("Suspect"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader never suspected h0\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_at = Instant::now();
    let killed_log = lab.kill_controller_at(first_leader);
    let new_leader = lab.wait_leader(Duration::from_secs(10));
    let takeover = killed_at.elapsed();
    assert_ne!(new_leader, first_leader);
    // The lease expires TTL (+ up to 0.5 s of etcd's lessor tick) after the last
    // keep-alive; a follower campaigns every 100 ms (the figures are in BENCHMARKS.md).
    assert!(
        takeover < TTL + Duration::from_secs(2),
        "the new leader took {takeover:?}\n{}",
        lab.logs()
    );

    // The new leader recovers h0: fence, then the guest starts on h1 or h2.
    let deadline = Instant::now() + Duration::from_secs(120);
    let all_logs = |lab: &Lab| format!("--- killed leader\n{killed_log}\n{}", lab.logs());
    loop {
        if let Some((h, st)) = lab.vm_view(&subject) {
            if h != "h0" && st == "Running" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{subject} not running elsewhere within 120 s ({:?})\n{}",
            lab.vm_view(&subject),
            all_logs(&lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let running: Vec<usize> = (0..3).filter(|&h| runs_on(&hvs[h], &name)).collect();
    assert_eq!(
        running.len(),
        1,
        "running on {running:?}\n{}",
        all_logs(&lab)
    );
    assert_ne!(running, [0]);
    let starts: usize = lab
        .watchdogs
        .iter()
        .map(|w| starts_done(&w.log_text(), &uuid))
        .sum();
    assert_eq!(starts, 1, "starts carried out\n{}", all_logs(&lab));
    // The new leader shows the incident's whole timeline: the suspicion the killed
    // leader wrote before it died, then its own steps.
    let steps = host_steps(&lab, "h0");
    assert_eq!(
        steps.first().map(String::as_str),
        Some("Suspect"),
        "{steps:?}"
    );
    assert!(steps.iter().any(|s| s == "Fenced"), "{steps:?}");
    // The new leader finished the recovery; the killed one had not fenced yet.
    let finisher = lab.controllers[new_leader].as_ref().unwrap().log_text();
    assert!(finisher.contains("evacuated domain started"), "{finisher}");
    assert!(
        !strip_ansi(&killed_log).contains("action=\"fence\""),
        "{killed_log}"
    );
    // Exactly one fence of h0 is in the store, and h0's BMC was turned off once.
    let fences = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/defib/lab/intents/"]);
    let fence_keys: Vec<String> = String::from_utf8_lossy(&fences.stdout)
        .lines()
        .filter(|k| k.contains("fence") && k.contains("host:h0"))
        .map(str::to_owned)
        .collect();
    assert_eq!(fence_keys.len(), 1, "{fence_keys:?}");
    drop(lab);
    drop(guest);
}

#[test]
fn a_leader_cut_off_from_etcd_but_hearing_the_hosts_stops_acting_before_the_new_leader_starts() {
    require!(is_root(), "root (network namespaces)");
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let spec = LabSpec {
        hosts: 2,
        backend: "none",
        controller_extra: String::new(),
        watchdog_extra: Box::new(|_| String::new()),
        bmc_network: false,
    };
    let (mut lab, etcd) = start_ha_lab(&spec);
    lab.start_controllers(&spec, 3, |i| endpoints_for(&etcd, i));
    lab.start_watchdogs(&spec);
    let old = lab.wait_leader(Duration::from_secs(30));
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    // Black-hole the leader's path to etcd (its packets dropped, nothing reset); the
    // hosts' heartbeats still reach it.
    let ns = lab.net.controller_ns();
    let addr = format!("127.0.1.{}", old + 1);
    lab.net
        .iptables(&ns, &["-I", "OUTPUT", "-d", &addr, "-j", "DROP"]);
    let cut = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    let new = loop {
        if let Some(i) = lab.leader().filter(|&i| i != old) {
            break i;
        }
        assert!(Instant::now() < deadline, "no new leader\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    let handover = cut.elapsed();
    // The cut-off controller says it follows, and why.
    let c = lab.ctl_at(old, &["controllers"]).unwrap();
    assert_eq!(c["role"], "follower", "{c}");
    let alarms = lab.ctl_at(old, &["alarms"]).unwrap().to_string();
    assert!(alarms.contains("LeadershipLost"), "{alarms}");
    // On the logs' clock (one machine): the old leader stopped before the new one
    // started leading.
    let old_log = lab.controllers[old].as_ref().unwrap().log_text();
    let new_log = lab.controllers[new].as_ref().unwrap().log_text();
    let stopped = logged_at(&old_log, "term ended: this controller no longer acts")
        .unwrap_or_else(|| panic!("the old leader never said it stopped\n{old_log}"));
    let started = logged_at(&new_log, "LEADING: first guarded write done")
        .unwrap_or_else(|| panic!("the new leader never said it leads\n{new_log}"));
    assert!(
        stopped < started,
        "old stopped at {stopped}, new started at {started} (handover {handover:?})"
    );
    // The hosts stay Up under the new leader (heartbeats were never lost), and a
    // write on the old one is refused: it does not lead, and says why (it cannot reach
    // etcd, so it cannot know who leads now).
    lab.wait_until(
        "h0 and h1 Up under the new leader",
        Duration::from_secs(30),
        |s| s.len() == 2 && s.iter().all(|(_, st)| st == "Up"),
    );
    let refused = lab.ctl_at(old, &["maintenance", "h1", "on"]).unwrap_err();
    assert!(
        refused.contains(&format!("this controller (ctl-{old}) does not lead")),
        "{refused}"
    );
    // A write on the new leader is taken.
    lab.ctl_at(new, &["maintenance", "h1", "off"])
        .unwrap_or_else(|e| panic!("{e}"));
    // Healed: the old leader stays a follower (the lead does not flap back).
    lab.net
        .iptables(&ns, &["-D", "OUTPUT", "-d", &addr, "-j", "DROP"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.leader(), Some(new));
    drop(lab);
}

#[test]
fn one_etcd_member_down_changes_nothing_and_without_quorum_no_controller_acts_and_the_alarms_say_why(
) {
    require!(is_root(), "root (network namespaces)");
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let spec = LabSpec {
        hosts: 2,
        backend: "none",
        controller_extra: String::new(),
        watchdog_extra: Box::new(|_| String::new()),
        bmc_network: false,
    };
    let (mut lab, mut etcd) = start_ha_lab(&spec);
    lab.start_controllers(&spec, 3, |i| endpoints_for(&etcd, i));
    lab.start_watchdogs(&spec);
    let leader = lab.wait_leader(Duration::from_secs(30));
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    // One member down, the etcd leader itself (the worst one to lose: etcd elects a new
    // leader, 0.5–2 s without answers). The same controller leads afterwards: a leader
    // whose keep-alives went unanswered past its deadline stops acting, and leads again
    // on the same lease, which etcd's new leader renewed; no follower ever takes over.
    let etcd_leader = etcd.leader().expect("an etcd leader");
    etcd.kill(etcd_leader);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        lab.wait_leader(Duration::from_secs(10)),
        leader,
        "{}",
        lab.logs()
    );
    for i in (0..3).filter(|&i| i != leader) {
        let log = lab.controllers[i].as_ref().unwrap().log_text();
        assert!(
            !log.contains("LEADING"),
            "controller {i} took the lead\n{log}"
        );
    }
    lab.wait_until("hosts still Up", Duration::from_secs(5), |s| {
        s.iter().all(|(_, st)| st == "Up")
    });

    // A second member down: no quorum. The leader stops, nobody takes over.
    let second = etcd.live()[0];
    etcd.kill(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.leader().is_some() {
        assert!(
            Instant::now() < deadline,
            "a controller still leads without quorum\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // While there is no quorum, a host lost is acted on by nobody.
    lab.net.set_host_links(1, false);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(lab.leader(), None, "{}", lab.logs());
    for i in 0..3 {
        let log = strip_ansi(&lab.controllers[i].as_ref().unwrap().log_text());
        let since_cut = log
            .lines()
            .skip_while(|l| {
                !l.contains("LEADERSHIP LOST") && !l.contains("no controller can be seen leading")
            })
            .filter(|l| l.contains(" action=\""))
            .count();
        assert_eq!(since_cut, 0, "controller {i} acted without quorum\n{log}");
        let alarms = lab.ctl_at(i, &["alarms"]).unwrap().to_string();
        assert!(
            alarms.contains("NoLeader") || alarms.contains("LeadershipLost"),
            "controller {i}: {alarms}"
        );
    }
    let old_alarms = lab.ctl_at(leader, &["alarms"]).unwrap().to_string();
    assert!(old_alarms.contains("LeadershipLost"), "{old_alarms}");

    // Quorum back: a controller leads again and takes up the lost host.
    etcd.restart(second);
    etcd.wait_healthy(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    lab.wait_leader(Duration::from_secs(20));
    lab.wait_until(
        "h1 suspected by the new term",
        Duration::from_secs(30),
        |s| s.iter().any(|(h, st)| h == "h1" && st != "Up"),
    );
    drop(lab);
}

/// Where in a host's recovery the leader is killed: the first leader log line that
/// matches (the `--log-format text` lines, colours stripped).
const STEPS: [(&str, &str); 5] = [
    ("suspected", "to=Suspect"),
    ("confirming", "action=\"confirm\""),
    ("fence issued", "action=\"fence\""),
    ("fence verified", "to=Fenced"),
    (
        "evacuation sent",
        "asking a watchdog to start an evacuated domain",
    ),
];

#[test]
fn killing_the_leader_at_every_step_of_a_recovery_never_runs_a_vm_twice_nor_issues_an_action_twice()
{
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let _hostbed = require_hostbed!();
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (hvs, guest, uuid) = three_hypervisors_and_a_guest_on_the_first("st");
    let name = guest.name().to_string();
    let subject = format!("vm:{uuid}");
    // Every host is fenced through its own BMC.
    let fence_hosts: String = (0..3)
        .map(|h| {
            format!(
                "[[fence.host]]\nname = \"h{h}\"\nlevels = [{{ method = \"ipmi\", address = \"{}\", port = {}, username = \"{}\", password_file = \"{{DIR}}/bmc.pass\", timeout_ms = 1000, attempts = 2, backoff_ms = 100 }}]\n",
                defib_tests::netns::bmc_address(h),
                defib_tests::bmc::BMC_PORT,
                defib_tests::bmc::BMC_USER,
            )
        })
        .collect();
    let libvirt: Vec<(String, String)> = hvs
        .iter()
        .map(|h| (h.uri(), h.pid_dir().display().to_string()))
        .collect();
    let spec = LabSpec {
        hosts: 3,
        backend: "libvirt",
        controller_extra: format!(
            "[engine]\nfence_on_unknown_after_ms = 3000\nfence_retry_backoff_ms = 1000\n\n\
             [fence]\nverify_timeout_ms = 5000\nverify_poll_ms = 100\n\n{fence_hosts}"
        ),
        watchdog_extra: own_libvirt(libvirt.to_vec()),
        bmc_network: true,
    };
    let (mut lab, etcd) = start_ha_lab(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmcs: Vec<Bmc> = (0..3)
        .map(|h| {
            let bmc = Bmc::start(&lab.net, h, lab.dir.path());
            bmc.also_on_power_off(&format!(
                "[ -f {dir}/{name}.pid ] && kill -9 $(cat {dir}/{name}.pid)",
                dir = hvs[h].pid_dir().display()
            ));
            bmc
        })
        .collect();
    lab.start_controllers(&spec, 3, |i| endpoints_for(&etcd, i));
    lab.start_watchdogs(&spec);
    lab.wait_until("h0, h1 and h2 Up", Duration::from_secs(60), |s| {
        s.len() == 3 && s.iter().all(|(_, st)| st == "Up")
    });
    let mut killed_logs = String::new();
    for (round, (step, marker)) in STEPS.iter().enumerate() {
        // Where the guest runs now (defib's view, then libvirt's).
        let deadline = Instant::now() + Duration::from_secs(60);
        let host = loop {
            if let Some((h, st)) = lab.vm_view(&subject) {
                if st == "Running" {
                    break h;
                }
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {subject} not Running\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let h: usize = host.trim_start_matches('h').parse().unwrap();
        let leader = lab.wait_leader(Duration::from_secs(30));
        let starts_before: usize = lab
            .watchdogs
            .iter()
            .map(|w| starts_done(&w.log_text(), &uuid))
            .sum();
        // Measured on the text the loop below reads (colours stripped).
        let leader_log_len =
            strip_ansi(&lab.controllers[leader].as_ref().unwrap().log_text()).len();
        // The host loses power; the leader dies at `step`.
        defib_tests::bmc::chassis_power(
            &lab.net.controller_ns(),
            &defib_tests::netns::bmc_address(h),
            "off",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = strip_ansi(&lab.controllers[leader].as_ref().unwrap().log_text());
            if log.get(leader_log_len.min(log.len())..).is_some_and(|new| {
                new.lines().any(|l| {
                    l.contains(marker)
                        && (l.contains(&format!("host:{host}"))
                            || l.contains(&format!("\"{host}\""))
                            || l.contains(&uuid))
                })
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the leader never reached '{step}'\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        killed_logs.push_str(&format!(
            "--- ctl-{leader} killed at '{step}'\n{}\n",
            lab.kill_controller_at(leader)
        ));
        // Recovered by the next leader: the guest runs on one other host, started once.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if lab
                .vm_view(&subject)
                .is_some_and(|(on, st)| on != host && st == "Running")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round} ({step}): {subject} not running elsewhere ({:?})\n{killed_logs}{}",
                lab.vm_view(&subject),
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let running: Vec<usize> = (0..3).filter(|&x| runs_on(&hvs[x], &name)).collect();
        assert_eq!(
            running.len(),
            1,
            "round {round} ({step}): runs on {running:?}\n{killed_logs}{}",
            lab.logs()
        );
        // The new leader shows the incident's whole timeline, the killed leader's steps
        // first (a resumed incident keeps what was written before the takeover).
        let steps = host_steps(&lab, &host);
        assert_eq!(
            steps.first().map(String::as_str),
            Some("Suspect"),
            "round {round} ({step}): {steps:?}"
        );
        assert_eq!(
            steps.iter().filter(|s| *s == "Fenced").count(),
            1,
            "round {round} ({step}): {steps:?}"
        );
        let starts: usize = lab
            .watchdogs
            .iter()
            .map(|w| starts_done(&w.log_text(), &uuid))
            .sum();
        assert_eq!(
            starts - starts_before,
            1,
            "round {round} ({step}): starts carried out\n{killed_logs}{}",
            lab.logs()
        );
        // Back: the killed controller starts again (a follower), the host is powered on,
        // its links up and its watchdog started, then unfenced.
        lab.restart_controller_at(&spec, leader, &endpoints_for(&etcd, leader));
        defib_tests::bmc::chassis_power(
            &lab.net.controller_ns(),
            &defib_tests::netns::bmc_address(h),
            "on",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        lab.net.set_host_links(h, true);
        lab.restart_watchdog(h);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Refused while the host still lists the guest (its libvirt may not have
            // seen the killed qemu yet): asked again, as an operator would.
            let l = lab.wait_leader(Duration::from_secs(30));
            let _ = lab.ctl_at(l, &["unfence", &host]);
            if lab.state_of(&host) == "Up" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {host} not Up again\n{}",
                lab.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    // No intent was ever written twice, and each host incident fenced its host once:
    // one fence intent per incident.
    let keys = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/defib/lab/intents/"]);
    let keys: Vec<String> = String::from_utf8_lossy(&keys.stdout)
        .lines()
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    let fences: Vec<&String> = keys.iter().filter(|k| k.contains("/fence-")).collect();
    assert_eq!(fences.len(), STEPS.len(), "{fences:?}");
    drop(bmcs);
    drop(lab);
    drop(guest);
}
