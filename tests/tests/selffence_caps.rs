//! Self-fence under the shipped unit's capabilities, against qemus of another user:
//! with the unit's set an isolated watchdog kills them and only then does the controller
//! count its host fenced; without CAP_KILL the watchdog says "not armed" and why, and the
//! controller never counts its silence as a fence.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::sync::Mutex;
use std::time::{Duration, Instant};

use defib_tests::lab::{Lab, LabSpec};
use defib_tests::{have_command, is_root, require, workspace_root, FakeQemu};
use serde_json::Value;

/// The labs share the machine's network namespaces' names: one at a time.
static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The watchdog unit's `CapabilityBoundingSet`, as written in the shipped unit.
fn unit_capabilities() -> Vec<String> {
    let unit = workspace_root().join("packaging/systemd/defib-watchdog.service");
    let text = std::fs::read_to_string(&unit).expect("the watchdog unit");
    text.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the watchdog unit bounds its capabilities")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The watchdog's command prefix: mount tracefs and bpffs with full privileges, as systemd
/// does before the unit starts (`ip netns exec` gives each command a fresh /sys without
/// them, and the unit's set cannot mount), then `setpriv` limiting the bounding set to
/// `caps` (the watchdog runs as uid 0, so it holds exactly these).
fn bounded_to(caps: &[String]) -> Vec<String> {
    let set: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    vec![
        "sh".into(),
        "-c".into(),
        "mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing; \
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; exec \"$@\""
            .into(),
        "systemd-mounts".into(),
        "setpriv".into(),
        format!("--bounding-set=-all,{}", set.join(",")),
    ]
}

/// The user libvirt runs qemu as (`libvirt-qemu`), or a system user made for the test
/// where libvirt is not installed.
fn qemu_user() -> (u32, u32) {
    for name in ["libvirt-qemu", "defib-test-qemu"] {
        if let Ok(Some(u)) = nix::unistd::User::from_name(name) {
            return (u.uid.as_raw(), u.gid.as_raw());
        }
    }
    let out = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "defib-test-qemu",
        ])
        .output()
        .expect("run useradd");
    assert!(out.status.success(), "useradd: {out:?}");
    let u = nix::unistd::User::from_name("defib-test-qemu")
        .unwrap()
        .expect("the user just made");
    (u.uid.as_raw(), u.gid.as_raw())
}

fn spec() -> LabSpec {
    LabSpec {
        // Two hosts: one dead host of two is not "more than half" (the mass-failure gate).
        hosts: 2,
        backend: "none",
        // No fence level for any host: the self-fence deadline is the only fence there is.
        controller_extra: r#"[engine]
fence_on_unknown_after_ms = 3000

[fence]
self_fence = true
self_fence_margin_ms = 1000
"#
        .into(),
        watchdog_extra: Box::new(|h| {
            let mut s = format!("[probes]\nwatch_names = [\"qemu-cap-h{h}\"]\n");
            if h == 0 {
                s.push_str("\n[self_fence]\nenabled = true\n");
            }
            s
        }),
        bmc_network: false,
    }
}

/// Starts the lab with the watchdogs under `caps`, and two qemus of `user` on h0 that run
/// before its watchdog starts.
fn lab_with(caps: &[String], user: (u32, u32)) -> (Lab, Vec<FakeQemu>) {
    let spec = spec();
    let mut lab = Lab::new(&spec);
    let ns = lab.net.host_ns(0);
    let vms: Vec<FakeQemu> = (0..2)
        .map(|i| {
            FakeQemu::start_as(
                Some(&ns),
                Some(user),
                "qemu-cap-h0",
                &format!("cap-vm{i}"),
                &format!("ca0ce000-0000-4000-8000-00000000000{i}"),
                &[],
            )
        })
        .collect();
    for vm in &vms {
        let uid = std::fs::metadata(format!("/proc/{}", vm.pid()))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap();
        assert_eq!(uid, user.0, "the fake qemu runs as the qemu user");
    }
    lab.watchdog_prefix = bounded_to(caps);
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    (lab, vms)
}

fn alive(vm: &mut FakeQemu) -> bool {
    matches!(vm.child.try_wait(), Ok(None))
}

/// h0's `self_fence` in the controller's host view.
fn host_view_self_fence(lab: &Lab) -> String {
    let hosts = lab.ctl(&["hosts"]);
    let list = hosts
        .as_array()
        .cloned()
        .or_else(|| hosts["hosts"].as_array().cloned())
        .unwrap_or_default();
    list.iter()
        .find(|h| h["host"] == "h0")
        .map(|h| h["self_fence"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn wait_for(what: &str, lab: &Lab, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fenced(state: &str) -> bool {
    matches!(state, "Fenced" | "Evacuating" | "Recovered")
}

fn requirements() -> bool {
    is_root() && have_command("setpriv") && have_command("ip")
}

#[test]
fn with_the_units_capabilities_an_isolated_watchdog_kills_the_qemus_of_another_user_before_the_controller_counts_its_host_fenced(
) {
    require!(
        requirements(),
        "root (network namespaces, BPF, another user's processes) and setpriv"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let caps = unit_capabilities();
    assert!(caps.iter().any(|c| c == "CAP_KILL"), "{caps:?}");
    let user = qemu_user();
    let (lab, mut vms) = lab_with(&caps, user);

    wait_for("h0's watchdog armed", &lab, Duration::from_secs(10), || {
        lab.watchdogs[0].log_text().contains("self-fence armed")
    });
    wait_for(
        "the controller shows h0 armed",
        &lab,
        Duration::from_secs(10),
        || host_view_self_fence(&lab) == "armed (isolation timeout 3000 ms)",
    );
    assert!(!lab.watchdogs[0]
        .log_text()
        .contains("not armed: no permission"));

    let cut = Instant::now();
    lab.net.set_host_links(0, false);
    let (mut dead_at, mut fenced_at) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_at.is_none() || fenced_at.is_none() {
        if dead_at.is_none() && vms.iter_mut().all(|vm| !alive(vm)) {
            dead_at = Some(cut.elapsed());
        }
        if fenced_at.is_none() && fenced(&lab.state_of("h0")) {
            fenced_at = Some(cut.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "qemus of uid {} dead after {dead_at:?}, h0 fenced after {fenced_at:?}\n{}",
            user.0,
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (dead_at, fenced_at) = (dead_at.unwrap(), fenced_at.unwrap());
    eprintln!(
        "links cut: uid {}'s qemus killed after {dead_at:?}, h0 counted fenced after {fenced_at:?}",
        user.0
    );
    assert!(dead_at < fenced_at, "h0 counted fenced while its VMs ran");
    for vm in &mut vms {
        let status = vm.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status:?}"
        );
    }
    let wd = lab.watchdogs[0].log_text();
    assert!(wd.contains("self-fence: SIGKILLed"), "{wd}");
    assert!(!wd.contains("self-fence: cannot kill"), "{wd}");
    let incident = lab.host_incident("h0").expect("h0's incident");
    let text = incident.to_string();
    assert!(text.contains("SelfFenceDeadline"), "{incident}");
    // The heartbeat's 3 s plus the controller's 1 s margin after the last heartbeat it
    // received, never less, both on the controller's clock (the cut itself may come up
    // to a heartbeat interval after that heartbeat, so the wall time since the cut is
    // no exact measure).
    let fenced_entry = incident["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["to"] == "Fenced")
        .unwrap_or_else(|| panic!("no Fenced entry: {incident}"));
    let fenced_ms = fenced_entry["at"].as_u64().expect("entry time");
    let hosts = lab.ctl(&["hosts"]);
    let last_heard_ms = hosts
        .as_array()
        .cloned()
        .or_else(|| hosts["hosts"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .find(|h| h["host"] == "h0")
        .and_then(|h| h["last_heartbeat_ms"].as_u64())
        .expect("h0's last heartbeat");
    assert!(
        fenced_ms >= last_heard_ms + 4_000,
        "fenced {} ms after the last heartbeat: {incident}",
        fenced_ms as i64 - last_heard_ms as i64
    );
    assert!(
        fenced_ms <= last_heard_ms + 4_000 + 1_000,
        "fenced {} ms after the last heartbeat: {incident}",
        fenced_ms as i64 - last_heard_ms as i64
    );
}

#[test]
fn without_cap_kill_the_watchdog_says_not_armed_and_why_and_the_controller_never_counts_its_silence_as_a_fence(
) {
    require!(
        requirements(),
        "root (network namespaces, BPF, another user's processes) and setpriv"
    );
    let _one = ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The unit's set as it was before CAP_KILL was added.
    let caps: Vec<String> = unit_capabilities()
        .into_iter()
        .filter(|c| c != "CAP_KILL")
        .collect();
    let user = qemu_user();
    let (lab, mut vms) = lab_with(&caps, user);

    let reasons: Vec<String> = vms
        .iter()
        .map(|vm| {
            format!(
                "not armed: no permission to kill qemu pid {} owned by uid {}",
                vm.pid(),
                user.0
            )
        })
        .collect();
    wait_for(
        "h0's watchdog logs why it is not armed",
        &lab,
        Duration::from_secs(10),
        || {
            let wd = lab.watchdogs[0].log_text();
            reasons
                .iter()
                .any(|r| wd.contains(&format!("self-fence {r}")))
        },
    );
    wait_for(
        "the controller shows h0 not armed, with the reason",
        &lab,
        Duration::from_secs(10),
        || reasons.contains(&host_view_self_fence(&lab)),
    );
    assert!(!lab.watchdogs[0].log_text().contains("self-fence armed"));

    let cut = Instant::now();
    lab.net.set_host_links(0, false);
    // The controller suspects h0, finds no fence level, and is left in Fencing: it
    // waits and alarms. An armed host would be counted fenced 4 s after its last
    // heartbeat; watch twice that and more.
    let mut reached_fencing = None;
    while cut.elapsed() < Duration::from_secs(14) {
        let state = lab.state_of("h0");
        assert!(
            !fenced(&state),
            "h0 counted fenced after {:?} though its watchdog could not kill\n{}",
            cut.elapsed(),
            lab.logs()
        );
        if state == "Fencing" && reached_fencing.is_none() {
            reached_fencing = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reached = reached_fencing.expect("h0 reached Fencing (its silence was noticed)");
    assert!(
        reached < Duration::from_secs(9),
        "Fencing after {reached:?}"
    );
    for vm in &mut vms {
        assert!(alive(vm), "a qemu died although nothing fenced the host");
    }
    let wd = lab.watchdogs[0].log_text();
    assert!(
        wd.contains("never armed in this run: killing nothing"),
        "{wd}"
    );
    let incident: Value = lab.host_incident("h0").expect("h0's incident");
    let text = incident.to_string();
    assert!(!text.contains("SelfFenceDeadline"), "{incident}");
    assert!(text.contains("self-fence not counted"), "{incident}");
}
