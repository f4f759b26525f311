//! `lab up` and the keeper it starts (`lab serve`): builds the lab, records it in the
//! state file, holds it (powering hosts on again after a drill) until SIGTERM, then drops it.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use defib_tests::bmc::{Bmc, BMC_PASSWORD, BMC_PORT, BMC_USER};
use defib_tests::cephbed::{Cephbed, RbdImage};
use defib_tests::guests::{unique_uuid, Guest, GuestDisk, GuestSpec};
use defib_tests::hypervisor::{Hypervisor, HypervisorOptions};
use defib_tests::lab::{Lab, LabSpec};
use defib_tests::{FuseBed, LoopDevice};
use serde_json::{json, Value};

use super::describe::status;
use super::{keeper_pid, lab_dir, read_state, state_path, write_state};

/// `lab up`: the keeper started in a session of its own, then waited for until its state
/// file says the lab is ready (or it exits, and its log says why).
pub(super) fn up(
    hosts: usize,
    guests_per_host: usize,
    nova: Option<usize>,
    ha: bool,
    ceph: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !ceph || (nova.is_none() && guests_per_host >= 2),
        "--ceph puts the last guest of each host on RBD: it needs the libvirt lab (not --nova) \
         and --guests-per-host of at least 2 (the first guest's disk is the one disk-stall stops)"
    );
    anyhow::ensure!(
        hosts >= 2,
        "a lab needs at least 2 hosts (one to evacuate to)"
    );
    anyhow::ensure!(
        nova.is_none() || hosts <= 3,
        "with --nova, at most 3 hosts: one per fake compute of the novabed (fake-1..fake-3)"
    );
    anyhow::ensure!(
        defib_tests::is_root(),
        "the lab makes namespaces and loads BPF: run it as root"
    );
    if let Some(state) = read_state() {
        if keeper_pid(&state).is_some() {
            println!("the lab is already up (`cargo xtask lab status`, `cargo xtask lab down`)");
            return Ok(());
        }
        bail!(
            "a lab state file {} is left from a lab whose keeper is gone: `cargo xtask lab down` removes what it lists",
            state_path().display()
        );
    }
    crate::fencebed::install()?;
    // The libvirt lab's guests boot from the hostbed's image; the Nova lab has no guests
    // of libvirt's but needs the novabed (shared: started only if it does not run).
    let (started_hostbed, started_novabed) = if nova.is_some() {
        let was = crate::novabed::running();
        if !was {
            println!("lab: starting the novabed (`cargo xtask novabed start`) …");
            crate::novabed::for_tests()?;
        }
        (false, !was)
    } else {
        let was = crate::hostbed::libvirt_answers();
        crate::hostbed::start()?;
        (!was, false)
    };
    // Everything the keeper runs, built now (as the keeper's harness builds them, so
    // that its builds are no-ops) so that build errors show here.
    for (package, bin) in [
        ("defib-controller", "defib-controller"),
        ("defib-watchdog", "defib-watchdog"),
        ("defibctl", "defibctl"),
        ("defib-tests", "defib-subreaper"),
    ] {
        defib_tests::built_binary(package, bin);
    }
    let started_cephbed = ceph && !crate::cephbed::running();
    if started_cephbed {
        println!("lab: starting the cephbed (`cargo xtask cephbed start`) …");
        crate::cephbed::start()?;
    }
    let dir = lab_dir();
    std::fs::create_dir_all(&dir)?;
    if started_cephbed {
        std::fs::write(dir.join("started-cephbed"), "")?;
    }
    if started_hostbed {
        std::fs::write(dir.join("started-hostbed"), "")?;
    }
    if started_novabed {
        std::fs::write(dir.join("started-novabed"), "")?;
    }
    let log = std::fs::File::create(dir.join("keeper.log"))?;
    // `setsid`: a session of its own, so the terminal's hangup or ^C does not reach it.
    let mut keeper = Command::new("setsid")
        .arg(std::env::current_exe()?)
        .args(["lab", "serve", "--hosts", &hosts.to_string()])
        .args(["--guests-per-host", &guests_per_host.to_string()])
        .args(
            nova.map(|n| vec!["--nova-servers-per-host".to_string(), n.to_string()])
                .unwrap_or_default(),
        )
        .args(ha.then_some("--ha"))
        .args(ceph.then_some("--ceph"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the lab keeper")?;
    println!("lab: starting (keeper pid {}) …", keeper.id());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(state) = read_state() {
            if state["ready"] == true {
                break;
            }
        }
        if let Some(status) = keeper.try_wait()? {
            let log = std::fs::read_to_string(dir.join("keeper.log")).unwrap_or_default();
            bail!("the lab keeper exited ({status}) before the lab was up:\n{log}");
        }
        if Instant::now() > deadline {
            bail!(
                "the lab is not up after 300 s; see {}",
                dir.join("keeper.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("lab: up");
    status()
}

/// Controllers of a lab started with `--ha`.
const HA_CONTROLLERS: usize = 3;

/// Set by SIGTERM or SIGINT: the keeper leaves its loop and drops the lab.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// One lab host as the keeper holds it.
struct Host {
    // Fields drop in order: the guests before their libvirtd.
    guests: Vec<Guest>,
    uri: String,
    pid_dir: PathBuf,
    hv: Hypervisor,
}

/// A guest's disk that can be made to hang: a loop device whose backing file is on a
/// FUSE (bindfs) mount; stopping bindfs (SIGSTOP) makes every I/O of the guest hang in
/// the kernel, as a dead storage path would.
struct StallDisk {
    // Fields drop in order: the loop device is detached before the mount goes.
    lo: LoopDevice,
    bed: FuseBed,
    host: usize,
    /// The guest's domain name (set once the guest is defined).
    guest: String,
    /// The backing file, as seen outside the mount.
    image: PathBuf,
}

impl StallDisk {
    fn new(host: usize, file: &str) -> anyhow::Result<StallDisk> {
        let hostbed =
            defib_tests::guests::Hostbed::ensure().map_err(|e| anyhow::anyhow!("hostbed: {e}"))?;
        let bed = FuseBed::new();
        let through_fuse = bed.create_image(file, defib_tests::guests::DISK_SIZE);
        let image = bed.real_dir().join(file);
        hostbed.write_boot_sector(&image, 0);
        let lo = LoopDevice::attach(&through_fuse);
        Ok(StallDisk {
            lo,
            bed,
            host,
            guest: String::new(),
            image,
        })
    }

    fn describe(&self) -> Value {
        json!({
            "host": format!("h{}", self.host),
            "guest": self.guest,
            "bindfs_pid": self.bed.pid(),
            "dir": self.bed.dir.path(),
            "mount": self.bed.fuse_dir(),
            "loop": self.lo.path,
            "backing_file": self.bed.fuse_dir().join(self.image.file_name().unwrap_or_default()),
        })
    }
}

/// The keeper: builds the lab, records it, holds it until SIGTERM, then drops it.
pub(super) fn serve(
    hosts: usize,
    guests_per_host: usize,
    nova: Option<usize>,
    ha: bool,
    ceph: bool,
) -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let tag = defib_tests::tag();
    // Under --nova the hosts are Nova's fake computes: no libvirt, no guests of the lab's
    // own (Nova does not know them), Nova servers instead.
    let guests_per_host = if nova.is_some() { 0 } else { guests_per_host };
    let host_name = |h: usize| {
        if nova.is_some() {
            super::nova::compute_name(h)
        } else {
            format!("h{h}")
        }
    };
    // Each host's hypervisor: a libvirtd of its own, so that the lab's hosts see only the
    // lab's guests (the hostbed's system libvirt is shared with the tests), with disk
    // leases (a virtlockd of its own): the backstop a cluster without Nova should run,
    // should a guest be started on a second host while its first qemu still runs.
    // RBD images outlive the guests on them (declared first, dropped last): an image a
    // qemu still has open cannot be removed.
    let mut rbd_images: Vec<RbdImage> = Vec::new();
    let ceph = if ceph {
        Some(Cephbed::ensure().map_err(|e| anyhow::anyhow!("--ceph: {e}"))?)
    } else {
        None
    };
    let mut lab_hosts = Vec::new();
    // Their qemus run as root: a power-off drill kills a host's qemus but not its libvirtd
    // (the lab's libvirtds are the hosts' only hypervisors and outlive the drill), and that
    // libvirtd, seeing its qemu die, gives the disk back to root (DAC relabeling) while
    // the VM's new host starts it: a qemu running as libvirt-qemu then cannot open it
    // ("Permission denied", seen once in CI in lab_drills). As root it can.
    let leases = HypervisorOptions {
        disk_leases: true,
        qemu_as_root: true,
        ..HypervisorOptions::default()
    };
    for h in (0..hosts).filter(|_| nova.is_none()) {
        let hv =
            Hypervisor::start_with(&format!("lab-h{h}"), &leases).map_err(anyhow::Error::msg)?;
        lab_hosts.push(Host {
            uri: hv.uri(),
            pid_dir: hv.pid_dir(),
            hv,
            guests: Vec::new(),
        });
    }
    let fence_hosts: String = (0..hosts)
        .map(|h| {
            format!(
                "[[fence.host]]\nname = \"{}\"\nlevels = [{{ method = \"ipmi\", address = \"{}\", port = {BMC_PORT}, username = \"{BMC_USER}\", password_file = \"{{DIR}}/bmc.pass\", timeout_ms = 1000, attempts = 2, backoff_ms = 100 }}]\n",
                host_name(h),
                defib_tests::netns::bmc_address(h)
            )
        })
        .collect();
    let (backend, nova_section) = match nova {
        Some(_) => ("nova", super::nova::controller_section()),
        None => ("libvirt", String::new()),
    };
    // (URI, qemu pid dir, virtlockd pid file, lockd configuration) per host.
    let libvirt: Vec<(String, String, String, String)> = lab_hosts
        .iter()
        .map(|h| {
            (
                h.uri.clone(),
                h.pid_dir.display().to_string(),
                h.hv.virtlockd_pid_file().display().to_string(),
                h.hv.lockd_conf().display().to_string(),
            )
        })
        .collect();
    let spec = LabSpec {
        hosts,
        backend,
        controller_extra: format!(
            "[engine]\nfence_on_unknown_after_ms = 3000\nfence_retry_backoff_ms = 1000\n\n\
             [fence]\nverify_timeout_ms = 5000\nverify_poll_ms = 100\n\n{fence_hosts}\n{nova_section}"
        ),
        // Each host watches its own libvirt and reports only its own domains (one kernel's
        // probes see every qemu), and its own virtlockd. The Nova lab's hosts have no
        // libvirt.
        watchdog_extra: Box::new(move |h| {
            let Some((uri, pids, lockd_pid, lockd_conf)) = libvirt.get(h) else {
                return String::new();
            };
            format!(
                "[libvirt]\nenabled = true\nonly_own_domains = true\nuri = {uri:?}\npid_dir = {pids:?}\n\n\
                 [disk_leases]\nenabled = true\npid_file = {lockd_pid:?}\nlockd_conf = {lockd_conf:?}\n"
            )
        }),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    lab.host_names = (0..hosts).map(host_name).collect();
    defib_tests::write_secret(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n"))?;
    let mut bmcs = Vec::new();
    for h in 0..hosts {
        let bmc = Bmc::start(&lab.net, h, lab.dir.path());
        match lab_hosts.get(h) {
            // Power loss takes the host's guests too: its libvirt runs their qemus outside
            // the host's namespace. Only the lab's own domains (by name) are killed.
            Some(host) => bmc.also_on_power_off(&format!(
                "for f in {}/dfb-lab{tag}-*.pid; do [ -f \"$f\" ] && kill -9 $(cat \"$f\") && echo \"$(date +%s.%N) killed guest qemu $f\"; done",
                host.pid_dir.display()
            )),
            // … and its nova-compute (which runs outside the namespace too).
            None => bmc.also_on_power_off(&super::nova::power_off_hook(h)),
        }
        bmcs.push(bmc);
    }
    let nova_api = match nova {
        Some(_) => {
            super::nova::forward_into(&lab.net.controller_ns())?;
            Some(super::nova::attach()?)
        }
        None => None,
    };
    let nova_prefix = super::nova::server_prefix(&tag);
    // The first guest of each host has its disk on a loop device over FUSE, so that
    // `drill disk-stall` can make its storage hang (the others have plain image files).
    let mut stall_disks: Vec<StallDisk> = Vec::new();
    // With --ceph, every host's libvirt holds the cephx key (an evacuated guest's
    // definition names the secret), and each host's last guest is on RBD.
    let rbd_secret = match &ceph {
        Some(ceph) => {
            let mut secret = String::new();
            for host in &lab_hosts {
                secret = ceph.libvirt_secret(&host.uri);
            }
            Some(secret)
        }
        None => None,
    };
    for (h, host) in lab_hosts.iter_mut().enumerate() {
        for g in 0..guests_per_host {
            let name = format!("lab{tag}-h{h}-g{g}");
            let on_rbd = g + 1 == guests_per_host && g > 0;
            let disk = if let (Some(ceph), Some(secret), true) = (&ceph, &rbd_secret, on_rbd) {
                let hostbed = defib_tests::guests::Hostbed::ensure()
                    .map_err(|e| anyhow::anyhow!("hostbed: {e}"))?;
                let image =
                    ceph.import(&name, hostbed.boot_sector(), defib_tests::guests::DISK_SIZE);
                let xml = image.libvirt_disk_xml(secret);
                rbd_images.push(image);
                GuestDisk::Xml(xml)
            } else if g == 0 {
                let d = StallDisk::new(h, &format!("{name}.raw"))?;
                let dev = d.lo.path.clone();
                stall_disks.push(d);
                GuestDisk::Block(dev)
            } else {
                GuestDisk::Plain
            };
            let spec = GuestSpec {
                name,
                uuid: unique_uuid(),
                disk,
                ib700: None,
                wdt_pets: 0,
            };
            let guest = Guest::start_spec_on(spec, &host.uri, &host.pid_dir);
            if g == 0 {
                if let Some(d) = stall_disks.last_mut() {
                    d.guest = guest.name().to_string();
                }
            }
            host.guests.push(guest);
        }
    }
    // With --ha: a 3-member etcd cluster in the controller namespace (stopped with the
    // keeper: its members die with it) and three controllers electing a leader on it.
    let etcd = if ha {
        let etcd = defib_tests::etcd::EtcdCluster::try_start(defib_tests::etcd::EtcdOpts {
            netns: Some(lab.net.controller_ns()),
            dir: Some(lab.path("etcd")),
            ..Default::default()
        })
        .map_err(anyhow::Error::msg)?;
        lab.start_controllers(&spec, HA_CONTROLLERS, |_| etcd.endpoints());
        Some(etcd)
    } else {
        lab.start_controller(&spec);
        None
    };
    lab.start_watchdogs(&spec);
    let nova_state = nova.map(|_| nova_prefix.as_str());
    write_state(&lab_state(
        &lab,
        &lab_hosts,
        &bmcs,
        &stall_disks,
        &rbd_images,
        &tag,
        nova_state,
        etcd.as_ref(),
        false,
    ))?;
    // Up when the controller sees every host Up and every guest Running.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vms = lab.ctl(&["vms"]);
        let running = vms["vms"]
            .as_array()
            .or(vms.as_array())
            .map(|l| l.iter().filter(|v| v["state"] == "Running").count())
            .unwrap_or(0);
        let states = lab.host_states();
        if states.len() == hosts
            && states.iter().all(|(_, s)| s == "Up")
            && running >= hosts * guests_per_host
        {
            break;
        }
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "lab: not up within 120 s: hosts {states:?}, {running} VMs running\n{}",
                lab.logs()
            );
            STOP.store(true, Ordering::SeqCst);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let (Some(per_host), Some(api), false) = (nova, &nova_api, STOP.load(Ordering::SeqCst)) {
        eprintln!("lab: booting {per_host} Nova servers onto each of {hosts} computes");
        let booted = super::nova::boot_servers(api, hosts, per_host, &nova_prefix);
        eprintln!("lab: {} servers ACTIVE", booted.len());
    }
    if !STOP.load(Ordering::SeqCst) {
        write_state(&lab_state(
            &lab,
            &lab_hosts,
            &bmcs,
            &stall_disks,
            &rbd_images,
            &tag,
            nova_state,
            etcd.as_ref(),
            true,
        ))?;
        eprintln!("lab: up; waiting for SIGTERM (`cargo xtask lab down`)");
    }
    while !STOP.load(Ordering::SeqCst) {
        // A controller killed by a drill (`controller-loss`) starts again, as a
        // follower, as systemd would restart it.
        if let Some(etcd) = &etcd {
            for i in 0..lab.controllers.len() {
                let dead = lab.controllers[i]
                    .as_mut()
                    .is_none_or(|d| d.child.try_wait().ok().flatten().is_some());
                if dead {
                    lab.restart_controller_at(&spec, i, &etcd.endpoints());
                    eprintln!("lab: controller ctl-{i} started again");
                    write_state(&lab_state(
                        &lab,
                        &lab_hosts,
                        &bmcs,
                        &stall_disks,
                        &rbd_images,
                        &tag,
                        nova_state,
                        Some(etcd),
                        true,
                    ))?;
                }
            }
        }
        // A host powered on again after a power loss (a drill's `chassis power on`)
        // boots: its links come up and its watchdog starts again.
        for h in 0..hosts {
            let dead = lab.watchdogs[h].child.try_wait().ok().flatten().is_some();
            if dead && bmcs[h].power_file() == "1" {
                lab.net.set_host_links(h, true);
                lab.restart_watchdog(h);
                eprintln!(
                    "lab: {} powered on: links up, watchdog pid {}",
                    lab.host_names[h],
                    lab.watchdogs[h].pid()
                );
                // A Nova lab host boots its nova-compute too.
                if let Some(api) = &nova_api {
                    super::nova::start_compute_if_dead(api, h);
                    eprintln!("lab: {}: nova-compute started", lab.host_names[h]);
                }
                write_state(&lab_state(
                    &lab,
                    &lab_hosts,
                    &bmcs,
                    &stall_disks,
                    &rbd_images,
                    &tag,
                    nova_state,
                    etcd.as_ref(),
                    true,
                ))?;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("lab: stopping");
    // Daemons first (so nothing reacts to the rest going), then guests, hypervisors, BMCs, network.
    lab.controller = None;
    lab.controllers.clear();
    lab.watchdogs.clear();
    drop(etcd);
    for host in &mut lab_hosts {
        host.guests.clear();
    }
    // A guest evacuated to another host is on that host's libvirtd, which destroys its
    // domains when it stops.
    drop(lab_hosts);
    // Their qemus gone, the guests' loop devices and FUSE mounts can go.
    drop(stall_disks);
    drop(bmcs);
    drop(lab);
    let _ = std::fs::remove_file(state_path());
    eprintln!("lab: stopped");
    Ok(())
}

/// What the keeper made, for the state file.
#[allow(clippy::too_many_arguments)] // one call shape, four callers: the state file's parts
fn lab_state(
    lab: &Lab,
    lab_hosts: &[Host],
    bmcs: &[Bmc],
    disks: &[StallDisk],
    rbd_images: &[RbdImage],
    tag: &str,
    nova_prefix: Option<&str>,
    etcd: Option<&defib_tests::etcd::EtcdCluster>,
    ready: bool,
) -> Value {
    let hosts = lab.watchdogs.len().max(lab_hosts.len());
    {
        let mut processes = vec![
            json!({"pid": lab.controller.as_ref().map(|d| d.pid()), "comm": "defib-controlle"}),
        ];
        let host_list: Vec<Value> = (0..hosts)
            .map(|h| {
                let wd = lab.watchdogs.get(h).map(|w| w.pid());
                processes.push(json!({"pid": wd, "comm": "defib-watchdog"}));
                let host = lab_hosts.get(h);
                json!({
                    "name": lab.host_names[h],
                    "index": h,
                    "ns": lab.net.host_ns(h),
                    "watchdog_pid": wd,
                    "libvirt_uri": host.map(|x| x.uri.clone()),
                    "pid_dir": host.map(|x| x.pid_dir.clone()),
                    "bmc_addr": lab.net.bmc_addr(h),
                    "bmc_pid": bmcs[h].pid(),
                    "bmc_dir": lab.path(&format!("bmc-h{h}")),
                    "guests": host.map(|x| x.guests.iter().map(|g| json!({"name": g.name(), "uuid": g.uuid()})).collect::<Vec<_>>()).unwrap_or_default(),
                })
            })
            .collect();
        for b in bmcs {
            processes.push(json!({"pid": b.pid(), "comm": "ipmi_sim"}));
        }
        // Several controllers and their etcd.
        let controllers: Vec<Value> = lab
            .controllers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let pid = d.as_ref().map(|d| d.pid());
                processes.push(json!({"pid": pid, "comm": "defib-controlle"}));
                json!({
                    "id": format!("ctl-{i}"),
                    "pid": pid,
                    "api_url": lab.api_url(defib_tests::lab::controller_ports(i).2),
                })
            })
            .collect();
        if let Some(etcd) = etcd {
            for i in 0..etcd.len() {
                processes.push(json!({"pid": etcd.pid(i), "comm": "etcd"}));
            }
        }
        for d in disks {
            processes.push(json!({"pid": d.bed.pid(), "comm": "bindfs"}));
        }
        // The lab's own libvirtds (their domains are destroyed first, by URI).
        for hv in lab_hosts.iter().map(|h| &h.hv) {
            let pid = std::fs::read_to_string(hv.root().join("child.pid")).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<u64>() {
                processes.push(json!({"pid": pid, "comm": "libvirtd"}));
            }
            // Its virtlockd (after its libvirtd in this list, as the stop goes).
            if let Some(pid) = hv.virtlockd_pid() {
                processes.push(json!({"pid": pid, "comm": "virtlockd"}));
            }
        }
        let mut namespaces = vec![
            lab.net.switch_ns(),
            lab.net.controller_ns(),
            lab.net.bmc_ns(),
        ];
        namespaces.extend((0..hosts).map(|h| lab.net.host_ns(h)));
        let mut dirs = vec![lab.dir.path().display().to_string()];
        dirs.extend(
            lab_hosts
                .iter()
                .map(|h| &h.hv)
                .map(|hv| hv.root().display().to_string()),
        );
        dirs.extend(disks.iter().map(|d| d.bed.dir.path().display().to_string()));
        json!({
            "ready": ready,
            "keeper_pid": std::process::id(),
            "tag": tag,
            "nova_prefix": nova_prefix,
            "dir": lab.dir.path(),
            "controller_ns": lab.net.controller_ns(),
            "api_url": lab.api_url(7412),
            "token_file": lab.path("api.token"),
            "ca_file": lab.ca_file(),
            "pids": {"controller": lab.controller.as_ref().map(|d| d.pid())},
            "controllers": controllers,
            "etcd_endpoints": etcd.map(|e| e.endpoints()),
            "hosts": host_list,
            "stall_disks": disks.iter().map(StallDisk::describe).collect::<Vec<_>>(),
            "rbd_images": rbd_images.iter().map(|i| i.spec.clone()).collect::<Vec<_>>(),
            "processes": processes,
            "namespaces": namespaces,
            "dirs": dirs,
        })
    }
}
