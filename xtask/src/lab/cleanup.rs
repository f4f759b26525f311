//! `lab down`: the keeper stopped (it removes what it made), or, if it is gone, what the
//! state file lists removed here, each thing only if it is still the lab's.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use defib_tests::guests::{run_virsh, LIBVIRT_URI};
use serde_json::Value;

use super::{alive, keeper_pid, kill, lab_dir, read_state};

/// `lab down`.
pub(super) fn down() -> anyhow::Result<()> {
    let Some(state) = read_state() else {
        println!("the lab is down");
        return Ok(());
    };
    if let Some(pid) = keeper_pid(&state) {
        println!("lab: stopping (keeper pid {pid}) …");
        kill(pid, "-TERM");
        let deadline = Instant::now() + Duration::from_secs(180);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        if alive(pid) {
            eprintln!(
                "lab: the keeper did not stop within 180 s; SIGKILL and removing what it made"
            );
            kill(pid, "-KILL");
        }
    }
    // Whatever is still there (a keeper killed with SIGKILL leaves it all).
    remove_leftovers(&state);
    let dir = lab_dir();
    if dir.join("started-hostbed").exists() {
        crate::hostbed::stop()?;
    }
    // The Nova lab's servers and computes: its servers deleted, every compute running
    // and not forced down (a drill's power-off may have left one dead or forced down).
    if let Some(prefix) = state["nova_prefix"].as_str() {
        let hosts = state["hosts"].as_array().map_or(0, Vec::len);
        println!("lab: deleting the lab's Nova servers ({prefix}*), computes back up");
        if let Err(e) = super::nova::clean_up(hosts, prefix) {
            eprintln!("lab: {e:#}");
        }
    }
    if dir.join("started-novabed").exists() {
        crate::novabed::stop()?;
    }
    if dir.join("started-cephbed").exists() {
        crate::cephbed::stop()?;
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("lab: down");
    Ok(())
}

/// Removes what the state file lists and still exists: guests, processes (by pid, if
/// still the program recorded), namespaces, directories.
fn remove_leftovers(state: &Value) {
    for h in state["hosts"].as_array().into_iter().flatten() {
        for g in h["guests"].as_array().into_iter().flatten() {
            let name = g["name"].as_str().unwrap_or("");
            let uri = h["libvirt_uri"].as_str().unwrap_or(LIBVIRT_URI);
            for uri in [uri, LIBVIRT_URI] {
                if run_virsh(uri, &["domstate", name], Duration::from_secs(5)).is_ok() {
                    let _ = run_virsh(uri, &["destroy", name], Duration::from_secs(30));
                    let _ = run_virsh(uri, &["undefine", name], Duration::from_secs(30));
                }
            }
        }
    }
    // The guests' stallable disks: storage running again, the loop device detached (if it
    // still reads the lab's file), the FUSE mount gone; bindfs is stopped with the rest.
    for d in state["stall_disks"].as_array().into_iter().flatten() {
        if let Some(pid) = d["bindfs_pid"].as_u64().filter(|&p| alive(p)) {
            kill(pid, "-CONT");
        }
        let lo = d["loop"].as_str().unwrap_or("");
        let backing = Path::new("/sys/block")
            .join(lo.trim_start_matches("/dev/"))
            .join("loop/backing_file");
        let file = std::fs::read_to_string(backing).unwrap_or_default();
        if !lo.is_empty() && file.trim() == d["backing_file"].as_str().unwrap_or("-") {
            eprintln!("lab: detaching leftover loop device {lo}");
            let _ = Command::new("losetup").args(["-d", lo]).status();
        }
        let mount = d["mount"].as_str().unwrap_or("");
        if !mount.is_empty() && is_mounted(mount) {
            eprintln!("lab: unmounting leftover FUSE mount {mount}");
            let _ = Command::new("fusermount")
                .args(["-u", "-z", mount])
                .stderr(Stdio::null())
                .status();
        }
    }
    for p in state["processes"].as_array().into_iter().flatten() {
        let (Some(pid), Some(exe)) = (p["pid"].as_u64(), p["comm"].as_str()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if alive(pid) && comm.trim() == exe {
            eprintln!("lab: stopping leftover {exe} (pid {pid})");
            kill(pid, "-KILL");
        }
    }
    for ns in state["namespaces"].as_array().into_iter().flatten() {
        let ns = ns.as_str().unwrap_or("");
        if Path::new("/run/netns").join(ns).exists() {
            eprintln!("lab: removing leftover namespace {ns}");
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
    for d in state["dirs"].as_array().into_iter().flatten() {
        let d = Path::new(d.as_str().unwrap_or(""));
        if d.is_absolute() && d.exists() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    // RBD images of `--ceph` (their guests' qemus are gone by now).
    for image in state["rbd_images"].as_array().into_iter().flatten() {
        let image = image.as_str().unwrap_or("");
        let conf = Path::new(defib_tests::cephbed::DIR).join("etc/ceph.conf");
        if !image.is_empty() && conf.exists() && defib_tests::cephbed::remove_image(image, &conf) {
            eprintln!("lab: removed leftover RBD image {image}");
        }
    }
}

/// `mountpoint` is a mount point now.
fn is_mounted(mountpoint: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(mountpoint))
}
