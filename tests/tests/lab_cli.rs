//! `cargo xtask lab up|status|drill|down` (issue 7): the lab comes up, shows itself, its
//! drills leave it healthy, and it goes away without leaving anything it made (processes,
//! namespaces, directories, loop devices, FUSE mounts, domains). With `--nova` the lab's
//! hosts are the novabed's computes: a host lost at its BMC has its servers evacuated by
//! Nova, and the lab leaves Nova as it found it.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use defib_tests::{built_binary, have_command, is_root, require, require_hostbed};
use serde_json::Value;

fn xtask(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(built_binary("xtask", "xtask"))
        .args(["lab"])
        .args(args)
        .env("DEFIB_LAB_DIR", dir)
        .current_dir(defib_tests::workspace_root())
        .output()
        .expect("run xtask");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn read_state(lab_dir: &Path) -> Value {
    std::fs::read_to_string(lab_dir.join("state.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// One lab at a time: each brings up daemons for several hosts on a 2-core machine.
static ONE_LAB: Mutex<()> = Mutex::new(());

#[test]
fn lab_up_shows_every_host_up_drills_leave_it_healthy_and_lab_down_leaves_nothing_it_made() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let _hostbed = require_hostbed!();
    let dir = tempfile::tempdir().unwrap();
    let lab_dir = dir.path().join("lab");

    // Down when down is a no-op.
    let (ok, out) = xtask(&lab_dir, &["down"]);
    assert!(ok && out.contains("the lab is down"), "{out}");

    let (ok, out) = xtask(&lab_dir, &["up", "--hosts", "2", "--guests-per-host", "1"]);
    let state = read_state(&lab_dir);
    // Whatever happens below, the lab goes down again.
    struct Down<'a>(&'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = xtask(self.0, &["down"]);
        }
    }
    let guard = Down(&lab_dir);
    assert!(ok, "lab up failed:\n{out}");
    assert_eq!(state["ready"], true, "{state}");
    // `up` prints the status: both hosts Up in the controller's own table.
    for h in ["h0", "h1"] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(h) && l.contains("Up")),
            "{h} not Up in:\n{out}"
        );
    }
    let (ok, again) = xtask(&lab_dir, &["up", "--hosts", "2", "--guests-per-host", "1"]);
    assert!(ok && again.contains("already up"), "{again}");
    let (ok, status) = xtask(&lab_dir, &["status"]);
    assert!(ok && status.contains("Running"), "{status}");

    // The drills print defib's own account and leave the lab healthy.
    let (ok, out) = xtask(&lab_dir, &["drill", "vm-crash"]);
    assert!(ok, "drill vm-crash:\n{out}");
    for seen in ["Ebpf", "Libvirt", "RestartingInPlace", "restarted in place"] {
        assert!(out.contains(seen), "no {seen} in:\n{out}");
    }
    // The storage under a guest's loop device stops past the watchdog's threshold: the
    // probe's stall is an incident of its own, started then ended, and the guest runs on.
    let (ok, out) = xtask(&lab_dir, &["drill", "disk-stall"]);
    assert!(ok, "drill disk-stall:\n{out}");
    let order: Vec<usize> = [
        "disk stall started",
        "disk stall ended",
        "writes its disk again",
    ]
    .iter()
    .map(|s| out.find(s).unwrap_or_else(|| panic!("no {s} in:\n{out}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert!(
        out.lines()
            .filter(|l| l.contains("disk stall"))
            .all(|l| l.trim_end().ends_with("Ebpf")),
        "the stall is not the probe's account:\n{out}"
    );
    let (ok, out) = xtask(&lab_dir, &["drill", "host-loss"]);
    assert!(ok, "drill host-loss:\n{out}");
    let order: Vec<usize> = [
        "Up → Suspect",
        "fence verified (IpmiPowerOff)",
        "restored on h0",
        "h1 is Up again",
    ]
    .iter()
    .map(|s| out.find(s).unwrap_or_else(|| panic!("no {s} in:\n{out}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    // What runs now (h1 came back with a new watchdog).
    let state = read_state(&lab_dir);
    assert_eq!(state["ready"], true, "{state}");

    let namespaces: Vec<String> = state["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert_eq!(namespaces.len(), 2 + 1 + 2, "{state}");
    for ns in &namespaces {
        assert!(Path::new("/run/netns").join(ns).exists(), "{ns}");
    }
    let pids: Vec<u64> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .chain(state["keeper_pid"].as_u64())
        .collect();
    // The controller, per host a watchdog, a BMC, a libvirtd, its virtlockd (disk leases)
    // and a bindfs (the first guest's stallable disk); the keeper.
    assert_eq!(pids.len(), 1 + 5 * 2 + 1, "{state}");
    assert!(pids.iter().all(|&p| alive(p)), "{state}");
    let guests: Vec<String> = state["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|h| h["guests"].as_array().unwrap().clone())
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(guests.len(), 2);
    let stall_disks = state["stall_disks"].as_array().unwrap().clone();
    assert_eq!(stall_disks.len(), 2, "{state}");
    let mounts = || std::fs::read_to_string("/proc/self/mounts").unwrap();
    let loops = || {
        String::from_utf8_lossy(&Command::new("losetup").arg("-a").output().unwrap().stdout)
            .into_owned()
    };
    for d in &stall_disks {
        assert!(mounts().contains(d["mount"].as_str().unwrap()), "{d}");
        assert!(loops().contains(d["backing_file"].as_str().unwrap()), "{d}");
    }

    drop(guard);
    let (ok, out) = xtask(&lab_dir, &["down"]);
    assert!(ok && out.contains("the lab is down"), "{out}");
    for ns in &namespaces {
        assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} left");
    }
    for p in &pids {
        assert!(!alive(*p), "pid {p} left running");
    }
    for d in state["dirs"].as_array().unwrap() {
        assert!(!Path::new(d.as_str().unwrap()).exists(), "{d} left");
    }
    assert!(!lab_dir.exists(), "the lab's directory is left");
    for d in &stall_disks {
        assert!(
            !mounts().contains(d["mount"].as_str().unwrap()),
            "mount left: {d}"
        );
        let lo = d["loop"].as_str().unwrap();
        let backing = d["backing_file"].as_str().unwrap();
        assert!(!loops().contains(backing), "loop device {lo} left: {d}");
    }
    let all = defib_tests::guests::virsh(
        &["list", "--all", "--name"],
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    for g in &guests {
        assert!(!all.contains(g.as_str()), "guest {g} left defined");
    }
}

#[test]
fn nova_lab_loses_a_compute_at_its_bmc_its_servers_run_elsewhere_and_lab_down_leaves_nova_as_found()
{
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    require!(
        is_root() && have_command("ipmi_sim") && have_command("ipmitool"),
        "root, ipmi_sim and ipmitool (cargo xtask fencebed install)"
    );
    let nova = defib_tests::novalab::Nova::attach();
    require!(nova.is_some(), "the novabed (cargo xtask novabed start)");
    let nova = nova.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lab_dir = dir.path().join("lab");

    let (ok, out) = xtask(&lab_dir, &["up", "--nova", "--servers-per-host", "2"]);
    let state = read_state(&lab_dir);
    struct Down<'a>(&'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = xtask(self.0, &["down"]);
        }
    }
    let guard = Down(&lab_dir);
    assert!(ok, "lab up --nova failed:\n{out}");
    assert_eq!(state["ready"], true, "{state}");
    let prefix = state["nova_prefix"]
        .as_str()
        .expect("a Nova lab")
        .to_string();
    // The lab hosts are the computes, Up in the controller's table; Nova has the lab's
    // servers on each.
    for h in defib_tests::novalab::HOSTS {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(h) && l.contains("Up")),
            "{h} not Up in:\n{out}"
        );
        let on = nova
            .servers_named(&prefix)
            .into_iter()
            .filter(|s| s.host.as_deref() == Some(h) && s.status == "ACTIVE")
            .count();
        assert_eq!(on, 2, "{h}: lab servers ACTIVE\n{out}");
    }
    assert!(out.contains("Nova (novabed):"), "{out}");

    // No qemu to kill on a fake compute: said, not attempted.
    let (ok, refused) = xtask(&lab_dir, &["drill", "vm-crash"]);
    assert!(!ok && refused.contains("--nova"), "{refused}");

    let compute_pid = nova.compute_pid(3).expect("fake-3's nova-compute runs");
    let (ok, out) = xtask(&lab_dir, &["drill", "host-loss"]);
    assert!(ok, "drill host-loss:\n{out}");
    let order: Vec<usize> = [
        "drill host-loss: fake-3 powered off",
        "Up → Suspect",
        "fence verified (IpmiPowerOff)",
        "forced down",
        "restored on fake-",
        "fake-3: nova-compute up, not forced down",
        "fake-3 is Up again",
    ]
    .iter()
    .map(|s| out.find(s).unwrap_or_else(|| panic!("no {s} in:\n{out}")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    // The power-off killed the compute; the power-on started another one.
    assert!(
        !alive(compute_pid as u64),
        "fake-3's old nova-compute runs on"
    );
    assert!(
        nova.compute_pid(3).is_some(),
        "fake-3's nova-compute not started again"
    );
    // Nova: the two servers of fake-3 moved, none left there.
    let servers = nova.servers_named(&prefix);
    assert_eq!(servers.len(), 6, "{servers:?}");
    assert!(
        servers
            .iter()
            .all(|s| s.status == "ACTIVE" && s.host.as_deref() != Some("fake-3")),
        "{servers:?}"
    );

    let state = read_state(&lab_dir);
    let namespaces: Vec<String> = state["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let pids: Vec<u64> = state["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .chain(state["keeper_pid"].as_u64())
        .collect();
    // The controller, per host a watchdog and a BMC; the keeper.
    assert_eq!(pids.len(), 1 + 2 * 3 + 1, "{state}");

    drop(guard);
    for ns in &namespaces {
        assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} left");
    }
    for p in &pids {
        assert!(!alive(*p), "pid {p} left running");
    }
    assert!(!lab_dir.exists(), "the lab's directory is left");
    // Nova as found: no lab server, every compute running, up and not forced down.
    assert!(nova.servers_named(&prefix).is_empty(), "lab servers left");
    for (n, h) in defib_tests::novalab::HOSTS.iter().enumerate() {
        let s = nova.service(h);
        assert!(!s.forced_down && s.state == "up", "{h}: {s:?}");
        assert!(
            nova.compute_pid(n as u32 + 1).is_some(),
            "{h}: no nova-compute"
        );
    }
}
