//! The storage fence for real (issue 24, item 2): a lab host whose VM's disk is an RBD
//! image on the Ceph test bed is cut off on every path, and its BMC does not answer. Its
//! only fence that can work is the `ceph-blocklist` level, which counts alone here: the
//! host's Ceph client address goes on the OSD blocklist, its qemu (which runs on) can no
//! longer write, and the VM is started on the other host.
//!
//! Hosts of this one machine share 127.0.0.1 towards Ceph, so h0 gets an address of its
//! own the way a hypervisor has one: its qemus (the hostbed's system libvirt, qemu user
//! `libvirt-qemu`) leave with source 127.0.0.10 (an iptables owner match and SNAT, made
//! here and removed on drop); h1's qemus (a libvirtd of its own, qemu as root) and the
//! controller's Ceph CLI keep 127.0.0.1. The controller runs in its lab namespace, so its
//! `ceph` and `rbd` are wrappers that enter this process's network namespace, where Ceph
//! listens.
//!
//! What is read back is the image itself. The boot-sector guest writes its counter `n`
//! into sector `n % 63 + 1` every second; the old copy ran for 30 writes or more before
//! the cut, and once the VM runs on h1 (whose copy counts from 1 again, its writes
//! counted by qemu), no sector may hold a number past the last one the old copy had
//! written when the fence was verified. The old copy itself is paused by qemu on the
//! I/O error (`error_policy='stop'`), not killed.
//!
//! Then the host returns: its stale copy is destroyed, an operator unfences it, and the
//! unfence lifts its blocklist entry (recorded on its incident).
//!
//! Needs root, KVM, the hostbed, the Ceph test bed, iptables and nsenter: under
//! `CI=true` a missing one fails the test.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use defib_tests::cephbed::{blocklist_alone_lab, cli_in_this_netns, Cephbed, SourceAddress};
use defib_tests::guests::{unique_uuid, virsh, Guest, GuestDisk};
use defib_tests::hypervisor::{Hypervisor, HypervisorOptions};
use defib_tests::lab::{host_transitions, Lab, LabSpec};
use defib_tests::{have_command, is_root, require, require_cephbed, require_hostbed};

/// h0's address on Ceph's network.
const H0_CEPH_ADDR: &str = "127.0.0.10";

/// The tests of this file give h0's qemus the same address and blocklist it: one at a
/// time (a test's blocklist would stop the other's guest).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Removes h0's blocklist entry when dropped, so that a failing test leaves none.
struct Unblock<'a>(&'a Cephbed);

impl Drop for Unblock<'_> {
    fn drop(&mut self) {
        let entry = format!("{H0_CEPH_ADDR}:0/0");
        let _ = self.0.run(
            "ceph",
            &["osd", "blocklist", "rm", &entry],
            Duration::from_secs(30),
        );
    }
}

/// The counter each written sector (1..=63) of the image holds now.
fn sector_counters(ceph: &Cephbed, spec: &str) -> Vec<u16> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("image.raw");
    ceph.run(
        "rbd",
        &["export", "--no-progress", spec, &out.display().to_string()],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("rbd export {spec}: {e}"));
    let data = std::fs::read(&out).expect("exported image");
    (1..=63)
        .map(|lba| u16::from_le_bytes([data[lba * 512], data[lba * 512 + 1]]))
        .collect()
}

/// `defibctl` against the lab's controller; its stderr when it fails.
fn try_ctl(lab: &Lab, args: &[&str]) -> Result<String, String> {
    let bin = defib_tests::built_binary("defibctl", "defibctl");
    let out = lab
        .net
        .command_in(&lab.net.controller_ns(), &bin)
        .args(["--url", &lab.api_url(7412), "--token-file"])
        .arg(lab.path("api.token"))
        .arg("--ca-file")
        .arg(lab.ca_file())
        .args(args)
        .output()
        .expect("run defibctl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn blocklisted(ceph: &Cephbed) -> bool {
    ceph.run(
        "ceph",
        &["osd", "blocklist", "ls", "--format", "json"],
        Duration::from_secs(30),
    )
    .map(|t| t.contains(&format!("\"{H0_CEPH_ADDR}:0/0\"")))
    .unwrap_or(false)
}

#[test]
fn a_cut_off_host_with_a_dead_bmc_is_blocklisted_its_rbd_vm_runs_elsewhere_and_no_write_of_the_old_copy_lands_after_the_fence(
) {
    require!(
        is_root() && have_command("iptables") && have_command("nsenter"),
        "root, iptables and nsenter"
    );
    let hostbed = require_hostbed!();
    let ceph = require_cephbed!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _unblock = Unblock(&ceph);
    // h0's qemus: the system libvirt's qemu user.
    let _h0_address = SourceAddress::for_user("libvirt-qemu", H0_CEPH_ADDR);

    let hv = Hypervisor::start_with(
        "ceph-h1",
        &HypervisorOptions {
            qemu_as_root: true,
            ..HypervisorOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let image = ceph.import("fence", hostbed.boot_sector(), 16 << 20);
    let secret = ceph.libvirt_secret(defib_tests::guests::LIBVIRT_URI);
    assert_eq!(ceph.libvirt_secret(&hv.uri()), secret);
    let uuid = unique_uuid();
    let guest = Guest::start(
        "ceph-fence",
        &uuid,
        GuestDisk::Xml(image.libvirt_disk_xml(&secret)),
    );
    let old_pid = guest.pid();
    let subject = format!("vm:{uuid}");

    // h0's BMC address answers nothing (no BMC runs there); the blocklist counts alone.
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = blocklist_alone_lab(&ceph, &hv, H0_CEPH_ADDR, dir.path());
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), "unused\n").unwrap();
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    lab.wait_vm_on(&subject, "h0", "Running", Duration::from_secs(60));
    // The old copy runs long enough that its counter is past anything the new copy
    // writes in the seconds it is watched.
    assert!(
        guest.wait_io(30, Duration::from_secs(90)),
        "the guest did not write 30 times"
    );
    let ours = ceph
        .run(
            "rbd",
            &["status", &image.spec, "--format", "json"],
            Duration::from_secs(30),
        )
        .expect("rbd status");
    assert!(
        ours.contains(&format!("\"{H0_CEPH_ADDR}:")),
        "h0's qemu does not reach Ceph from its own address: {ours}"
    );

    lab.net.set_host_links(0, false);
    lab.wait_until("h0 fenced", Duration::from_secs(60), |s| {
        s.iter().any(|(h, st)| {
            h == "h0" && matches!(st.as_str(), "Fenced" | "Evacuating" | "Recovered")
        })
    });
    let at_fence = sector_counters(&ceph, &image.spec);
    let last_old = *at_fence.iter().max().expect("sectors");
    assert!(last_old >= 30, "{at_fence:?}");
    assert!(blocklisted(&ceph), "no blocklist entry for h0");
    assert!(
        std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "the old copy's qemu died: the storage fence must not need that"
    );

    lab.wait_vm_on(&subject, "h1", "Running", Duration::from_secs(60));
    let new_pid = hv.qemu_pid(guest.name()).expect("a qemu on h1");
    assert_ne!(new_pid, old_pid);
    // The new copy writes (qemu counts its completed writes, and with
    // `error_policy='stop'` a failed one would pause it); the old one writes nothing
    // more: no sector holds a number past the last it wrote before the fence. (The new
    // copy counts from 1 again, so the numbers alone do not tell its writes apart.)
    let writes = |hv: &Hypervisor| -> u64 {
        hv.virsh(
            &["domblkstat", guest.name(), "vda"],
            Duration::from_secs(30),
        )
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.trim().strip_prefix("vda wr_req"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while writes(&hv) < 5 {
        assert!(
            Instant::now() < deadline,
            "the new copy on h1 did not write: {:?}",
            hv.virsh(&["domblkstat", guest.name()], Duration::from_secs(30))
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let h1_state = hv
        .virsh(
            &["domstate", "--reason", guest.name()],
            Duration::from_secs(30),
        )
        .expect("domstate on h1");
    assert!(h1_state.starts_with("running"), "h1's copy: {h1_state}");
    let after = sector_counters(&ceph, &image.spec);
    assert!(
        after.iter().all(|v| *v <= last_old),
        "a write of the old copy landed after the fence (its last was {last_old}): {after:?}"
    );
    // The old copy hit the blocklist: qemu stopped it on the I/O error.
    let old_state = virsh(
        &["domstate", "--reason", guest.name()],
        Duration::from_secs(30),
    )
    .expect("domstate on h0");
    assert!(old_state.contains("paused"), "h0's copy: {old_state}");

    let incident = lab.host_incident("h0").expect("h0's incident");
    let text = incident.to_string();
    assert!(
        text.contains("fence verified (CephBlocklist)"),
        "{text}\n{}",
        lab.logs()
    );
    // The BMC level was tried first and failed.
    let log = lab.controller_log();
    assert!(
        log.contains("level 1 (ipmi") && log.contains("fence failed"),
        "{log}"
    );
    let t = host_transitions(&incident);
    let pos = |s: &str| t.iter().position(|x| x == s).unwrap_or(usize::MAX);
    assert!(pos("Fenced") < pos("Evacuating"), "{t:?}");

    // The host returns: its stale copy is destroyed, and only then is it clean.
    lab.net.set_host_links(0, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while virsh(&["domstate", guest.name()], Duration::from_secs(30))
        .is_ok_and(|s| !s.contains("shut off"))
    {
        assert!(
            Instant::now() < deadline,
            "h0's stale copy was not destroyed\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(blocklisted(&ceph), "lifted before the unfence");
    // Refused while the host still lists its stale copy; taken once it is clean.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = try_ctl(&lab, &["unfence", "h0"]) {
        assert!(
            e.contains("refused") && Instant::now() < deadline,
            "unfence: {e}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while blocklisted(&ceph) {
        assert!(
            Instant::now() < deadline,
            "h0's blocklist entry outlived its unfence\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = lab
            .host_incident("h0")
            .map(|i| i.to_string())
            .unwrap_or_default();
        if text.contains("storage fence lifted") {
            break;
        }
        assert!(Instant::now() < deadline, "not recorded: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(lab);
    drop(guest);
    drop(hv);
}

/// "Is the old copy gone?" (issue 24, item 3): h0's BMC powers h0 off (its watchdog
/// dies) but the guest's qemu, run by the system libvirt outside h0's namespace, runs on
/// and keeps its RBD image open: a power fence that said *off* while a copy still holds
/// the image. Before the VM starts on h1, the controller reads the image's watchers,
/// finds h0's address, blocklists it (its ceph-blocklist level, never reached by the
/// fence: the BMC level was verified first) and starts the VM only once the watch is
/// gone.
#[test]
fn a_power_fenced_hosts_rbd_guest_that_runs_on_is_blocklisted_by_the_watcher_check_before_its_vm_starts_elsewhere(
) {
    use defib_tests::bmc::{Bmc, BMC_PASSWORD, BMC_PORT, BMC_USER};
    require!(
        is_root()
            && have_command("iptables")
            && have_command("nsenter")
            && have_command("ipmi_sim")
            && have_command("ipmitool"),
        "root, iptables, nsenter, ipmi_sim and ipmitool"
    );
    let hostbed = require_hostbed!();
    let ceph = require_cephbed!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _unblock = Unblock(&ceph);
    let _h0_address = SourceAddress::for_user("libvirt-qemu", H0_CEPH_ADDR);
    let hv = Hypervisor::start_with(
        "ceph-w1",
        &HypervisorOptions {
            qemu_as_root: true,
            ..HypervisorOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let image = ceph.import("watch", hostbed.boot_sector(), 16 << 20);
    let secret = ceph.libvirt_secret(defib_tests::guests::LIBVIRT_URI);
    assert_eq!(ceph.libvirt_secret(&hv.uri()), secret);
    let uuid = unique_uuid();
    let guest = Guest::start(
        "ceph-watch",
        &uuid,
        GuestDisk::Xml(image.libvirt_disk_xml(&secret)),
    );
    let old_pid = guest.pid();
    let subject = format!("vm:{uuid}");

    let dir = tempfile::tempdir().expect("tempdir");
    let (ceph_bin, rbd_bin) = (
        cli_in_this_netns(dir.path(), "ceph"),
        cli_in_this_netns(dir.path(), "rbd"),
    );
    let bmc_addr = defib_tests::netns::bmc_address(0);
    let controller_extra = format!(
        r#"[engine]
fence_on_unknown_after_ms = 3000
fence_retry_backoff_ms = 1000

[fence]
verify_timeout_ms = 5000
verify_poll_ms = 100

[[fence.host]]
name = "h0"
levels = [
  {{ method = "ipmi", address = "{bmc_addr}", port = {BMC_PORT}, username = "{BMC_USER}", password_file = "{{DIR}}/bmc.pass", timeout_ms = 1000, attempts = 2, backoff_ms = 100 }},
  {{ method = "ceph-blocklist", addresses = ["{H0_CEPH_ADDR}"], pools = ["{pool}"], conf = {conf:?}, ceph = {ceph_bin:?}, rbd = {rbd_bin:?} }},
]
"#,
        pool = defib_tests::cephbed::POOL,
        conf = ceph.conf().display().to_string(),
    );
    let (hv_uri, hv_pids) = (hv.uri(), hv.pid_dir().display().to_string());
    let spec = LabSpec {
        hosts: 2,
        backend: "libvirt",
        controller_extra,
        watchdog_extra: defib_tests::lab::system_and_own_libvirt(hv_uri, hv_pids),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n")).unwrap();
    let bmc = Bmc::start(&lab.net, 0, lab.dir.path());
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    lab.wait_vm_on(&subject, "h0", "Running", Duration::from_secs(60));
    assert!(
        guest.wait_io(3, Duration::from_secs(60)),
        "the guest did not write"
    );

    lab.net.set_host_links(0, false);
    lab.wait_vm_on(&subject, "h1", "Running", Duration::from_secs(90));
    let incident = lab.host_incident("h0").expect("h0's incident");
    let text = incident.to_string();
    assert!(text.contains("fence verified (IpmiPowerOff)"), "{text}");
    assert!(
        bmc.chassis_log().contains("set power 0"),
        "{}",
        bmc.chassis_log()
    );
    let log = lab.controller_log();
    assert!(
        log.contains("the old copy still holds its RBD images after the fence"),
        "{log}"
    );
    assert!(
        blocklisted(&ceph),
        "h0 not blocklisted by the watcher check"
    );
    // The old copy ran through the power-off and was stopped by the blocklist alone.
    assert!(
        std::path::Path::new(&format!("/proc/{old_pid}")).exists(),
        "the old copy's qemu died"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = virsh(
            &["domstate", "--reason", guest.name()],
            Duration::from_secs(30),
        )
        .unwrap_or_default();
        if state.contains("paused") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "h0's copy still runs unhindered: {state}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let new_pid = hv.qemu_pid(guest.name()).expect("a qemu on h1");
    assert_ne!(new_pid, old_pid);
    drop(lab);
    drop(bmc);
    drop(guest);
    drop(hv);
}
