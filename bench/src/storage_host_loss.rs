//! Host loss → VM with an RBD disk running elsewhere, with the storage fence alone: the
//! lost host is cut off on every path and its BMC answers nothing, so its only fence that
//! can work is the `ceph-blocklist` level (`counts = "alone"`), as in
//! tests/tests/ceph_fence.rs.
//!
//! Each round: a lab of two hosts (h0 the hostbed's system libvirt, whose qemus reach
//! Ceph from 127.0.0.10; h1 a libvirtd of its own), a guest on h0 whose disk is an RBD
//! image, the controller with h0's levels [ipmi at an address nothing answers,
//! ceph-blocklist alone]. h0's links are cut at t0; the host incident's timeline (unix
//! ms, this machine's clock) dates Suspect, Fenced and the VM Running on h1.
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use defib_tests::cephbed::{blocklist_alone_lab, Cephbed, SourceAddress};
use defib_tests::guests::{unique_uuid, Guest, GuestDisk, Hostbed};
use defib_tests::hypervisor::{Hypervisor, HypervisorOptions};
use defib_tests::lab::Lab;

use crate::report::{self, Series};

const H0_CEPH_ADDR: &str = "127.0.0.10";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Round {
    suspect: f64,
    fenced: f64,
    running: f64,
}

fn round(n: usize, hostbed: &Hostbed, ceph: &Cephbed) -> anyhow::Result<Round> {
    let began = Instant::now();
    let stage = |what: &str| eprintln!("round {n}: {what} at {:?}", began.elapsed());
    let hv = Hypervisor::start_with(
        &format!("shl-h1-{n}"),
        &HypervisorOptions {
            qemu_as_root: true,
            ..HypervisorOptions::default()
        },
    )
    .map_err(anyhow::Error::msg)?;
    let image = ceph.import("bench-shl", hostbed.boot_sector(), 16 << 20);
    let secret = ceph.libvirt_secret(defib_tests::guests::LIBVIRT_URI);
    anyhow::ensure!(ceph.libvirt_secret(&hv.uri()) == secret, "secrets differ");
    let uuid = unique_uuid();
    let guest = Guest::start(
        "bench-shl",
        &uuid,
        GuestDisk::Xml(image.libvirt_disk_xml(&secret)),
    );
    let subject = format!("vm:{uuid}");
    stage("guest started on h0");
    let dir = tempfile::tempdir()?;
    let spec = blocklist_alone_lab(ceph, &hv, H0_CEPH_ADDR, dir.path());
    let mut lab = Lab::new(&spec);
    defib_tests::write_secret(lab.path("bmc.pass"), "unused\n")?;
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    lab.wait_until("h0 and h1 Up", Duration::from_secs(60), |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "Up")
    });
    lab.wait_vm_on(&subject, "h0", "Running", Duration::from_secs(60));
    anyhow::ensure!(
        guest.wait_io(3, Duration::from_secs(60)),
        "the guest did not write"
    );
    // Heartbeats steady before the loss.
    std::thread::sleep(Duration::from_secs(2));
    stage("lab up, guest writing");

    let t0 = unix_ms();
    lab.net.set_host_links(0, false);
    lab.wait_vm_on(&subject, "h1", "Running", Duration::from_secs(90));
    let inc = lab
        .host_incident("h0")
        .ok_or_else(|| anyhow::anyhow!("no incident about h0"))?;
    let timeline = inc["timeline"].as_array().cloned().unwrap_or_default();
    let at = |pick: &dyn Fn(&serde_json::Value) -> bool, what: &str| -> anyhow::Result<f64> {
        let at = timeline
            .iter()
            .filter(|e| pick(e))
            .filter_map(|e| e["at"].as_u64())
            .min()
            .ok_or_else(|| anyhow::anyhow!("no {what} in h0's timeline: {inc}"))?;
        Ok(at.saturating_sub(t0) as f64)
    };
    let suspect = at(
        &|e| e["subject"]["Host"] == "h0" && e["to"] == "Suspect",
        "Suspect",
    )?;
    let fenced = at(
        &|e| e["subject"]["Host"] == "h0" && e["to"] == "Fenced",
        "Fenced",
    )?;
    let running = at(
        &|e| e["subject"].to_string().contains(&uuid) && e["to"] == "Running",
        "the VM Running",
    )?;
    let text = inc.to_string();
    anyhow::ensure!(
        text.contains("fence verified (CephBlocklist)"),
        "h0 was not fenced by its blocklist: {text}"
    );
    eprintln!(
        "round {n}: h0 cut → Suspect {suspect:.0} ms, Fenced (blocklist verified) {fenced:.0} ms, \
         its RBD VM Running on h1 {running:.0} ms"
    );
    // The lab, h1's copy and the guest go; h0's entry is lifted for the next round.
    drop(lab);
    stage("lab stopped");
    drop(guest);
    stage("h0's guest gone");
    drop(hv);
    stage("h1 gone");
    let _ = ceph.run(
        "ceph",
        &["osd", "blocklist", "rm", &format!("{H0_CEPH_ADDR}:0/0")],
        Duration::from_secs(30),
    );
    Ok(Round {
        suspect,
        fenced,
        running,
    })
}

pub fn run(rounds: usize) -> anyhow::Result<String> {
    anyhow::ensure!(rounds > 0, "--rounds must be > 0");
    let hostbed = Hostbed::ensure().map_err(|e| {
        anyhow::anyhow!("this scenario needs the hostbed (`cargo xtask hostbed start`): {e}")
    })?;
    let ceph = Cephbed::ensure().map_err(|e| {
        anyhow::anyhow!("this scenario needs the Ceph test bed (`cargo xtask cephbed start`): {e}")
    })?;
    let _h0_address = SourceAddress::for_user("libvirt-qemu", H0_CEPH_ADDR);
    let started = Instant::now();
    let (mut suspect, mut fenced, mut running) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..rounds {
        let r = round(n, &hostbed, &ceph)?;
        suspect.push(r.suspect);
        fenced.push(r.fenced);
        running.push(r.running);
    }
    eprintln!("{rounds} rounds in {:?}", started.elapsed());
    report::write(
        &report::results_dir(),
        "host-loss-storage-fence",
        &format!("cargo xtask bench storage-fence-host-loss --rounds {rounds}"),
        "A lab host (the hostbed's libvirt; its qemus reach Ceph from 127.0.0.10) whose VM's \
         disk is an RBD image on the Ceph test bed is cut off on every path while its BMC \
         answers nothing: its fence levels are [ipmi (fails), ceph-blocklist counts alone]. \
         Times from the cut to the host incident's timeline entries (unix ms, same machine \
         clock). Fenced waits for the confirmation's Unknown (no BMC answers: \
         `engine.fence_on_unknown_after_ms` = 3000 here), the ipmi level's failure (1 s), \
         then the blocklist verified (each Ceph CLI call starts a client, ~0.3 s); the VM is \
         then started on the other host (a libvirtd of its own, the libvirt backend) after \
         its watchers are read.",
        &[
            Series {
                name: "host cut off → Suspect".into(),
                samples_ms: suspect,
            },
            Series {
                name: "host cut off → Fenced (blocklist verified)".into(),
                samples_ms: fenced,
            },
            Series {
                name: "host cut off → its RBD VM Running elsewhere".into(),
                samples_ms: running,
            },
        ],
    )
}
