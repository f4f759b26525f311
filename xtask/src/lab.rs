//! `cargo xtask lab up|status|down|drill`: defib at work on one machine, kept running
//! between commands.
//!
//! The lab is built from the test harness (tests/src: `Lab`, `LabNet`, `Bmc`,
//! `Hypervisor`, `Guest`), whose pieces clean up on drop. So that they outlive `lab up`,
//! they live in a *keeper*: `lab up` starts `xtask lab serve` in a session of its own,
//! which builds the lab, writes what it made to `state.json` in the lab directory
//! (`/run/defib-lab`, or `$DEFIB_LAB_DIR`) and waits for SIGTERM; then it drops the lab,
//! which removes exactly what it made. `lab down` sends that SIGTERM and, should the
//! keeper be gone (killed with SIGKILL), removes what the state file lists.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use defib_tests::bmc::{Bmc, BMC_PASSWORD, BMC_PORT, BMC_USER};
use defib_tests::guests::{run_virsh, unique_uuid, Guest, GuestDisk, GuestSpec, LIBVIRT_URI};
use defib_tests::hypervisor::Hypervisor;
use defib_tests::lab::{Lab, LabSpec};
use defib_tests::{FuseBed, LoopDevice};
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum Action {
    /// Build everything and start the lab: N lab hosts in network namespaces (management
    /// and storage links, a defib-watchdog and a libvirtd each, an ipmi_sim BMC), KVM
    /// guests, a defib-controller (libvirt backend, IPMI fencing). Says so if it is up.
    /// With `--nova`: the lab hosts are the novabed's fake computes (fake-1…), the
    /// controller has the Nova backend, and Nova servers instead of KVM guests.
    Up {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        #[arg(long, default_value_t = 2)]
        guests_per_host: usize,
        /// The novabed's Nova (started if it does not run) with one fake compute per lab
        /// host; `backend = "nova"`.
        #[arg(long)]
        nova: bool,
        /// With `--nova`: servers booted onto each compute.
        #[arg(long, default_value_t = 4)]
        servers_per_host: usize,
    },
    /// What runs, and the controller's view of hosts and VMs.
    Status,
    /// Stop and remove everything `up` made (nothing else). A no-op when the lab is down.
    Down,
    /// Inject a failure and print the incident's timeline as defib recorded it.
    Drill {
        #[arg(value_enum)]
        kind: Drill,
    },
    /// The keeper (run by `up`; not for direct use).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        hosts: usize,
        #[arg(long)]
        guests_per_host: usize,
        /// Servers per compute with `--nova`; absent: the libvirt lab.
        #[arg(long)]
        nova_servers_per_host: Option<usize>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Drill {
    /// Kill a guest's qemu: seen by the kernel (eBPF) and by libvirt, restarted in place.
    VmCrash,
    /// Stop the storage under a guest's disk (its loop device's FUSE daemon) past the
    /// watchdog's stall threshold: the stall incident, then the storage back.
    DiskStall,
    /// Power a host off at its BMC: Suspect, fenced (IPMI power off verified), its guests
    /// started on the other hosts; then power it on and unfence it.
    HostLoss,
    /// Cut every link of a host (it runs on): fenced through its BMC, guests evacuated;
    /// then power it on and unfence it.
    Partition,
}

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Up {
            hosts,
            guests_per_host,
            nova,
            servers_per_host,
        } => up(hosts, guests_per_host, nova.then_some(servers_per_host)),
        Action::Status => status(),
        Action::Down => down(),
        Action::Drill { kind } => drill(kind),
        Action::Serve {
            hosts,
            guests_per_host,
            nova_servers_per_host,
        } => serve(hosts, guests_per_host, nova_servers_per_host),
    }
}

/// Where the lab keeps its state file and the keeper's log.
pub fn lab_dir() -> PathBuf {
    std::env::var_os("DEFIB_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/defib-lab"))
}

fn state_path() -> PathBuf {
    lab_dir().join("state.json")
}

fn read_state() -> Option<Value> {
    let text = std::fs::read_to_string(state_path()).ok()?;
    serde_json::from_str(&text).ok()
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().next().map(String::from))
        })
        .is_some_and(|st| st != "Z" && st != "X")
}

fn keeper_pid(state: &Value) -> Option<u64> {
    state["keeper_pid"].as_u64().filter(|&p| alive(p))
}

fn up(hosts: usize, guests_per_host: usize, nova: Option<usize>) -> anyhow::Result<()> {
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
    let dir = lab_dir();
    std::fs::create_dir_all(&dir)?;
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

/// `defibctl ARGS` against the lab's controller, from its namespace.
fn defibctl(state: &Value, args: &[&str]) -> anyhow::Result<String> {
    // Built by `up`; building again here would only cost time.
    let bin = defib_tests::workspace_root().join("target/debug/defibctl");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            state["controller_ns"].as_str().unwrap_or(""),
        ])
        .arg(bin)
        .args(["--url", state["api_url"].as_str().unwrap_or("")])
        .args(["--token-file", state["token_file"].as_str().unwrap_or("")])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "defibctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn defibctl_json(state: &Value, args: &[&str]) -> anyhow::Result<Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    Ok(serde_json::from_str(&defibctl(state, &a)?)?)
}

fn status() -> anyhow::Result<()> {
    let Some(state) = read_state() else {
        println!("the lab is down (`cargo xtask lab up` starts it)");
        return Ok(());
    };
    let Some(pid) = keeper_pid(&state) else {
        println!(
            "the lab's keeper is gone; {} lists what is left (`cargo xtask lab down` removes it)",
            state_path().display()
        );
        return Ok(());
    };
    println!("lab keeper pid {pid}, files in {}", state["dir"]);
    println!(
        "controller pid {} in namespace {} ({})",
        state["pids"]["controller"], state["controller_ns"], state["api_url"]
    );
    for h in state["hosts"].as_array().into_iter().flatten() {
        let guests: Vec<&str> = h["guests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["name"].as_str())
            .collect();
        println!(
            "{}: namespace {}, watchdog pid {} ({}), libvirt {}, BMC {} (ipmi_sim pid {}), guests {}",
            h["name"].as_str().unwrap_or("?"),
            h["ns"].as_str().unwrap_or("?"),
            h["watchdog_pid"],
            if h["watchdog_pid"].as_u64().is_some_and(alive) {
                "running"
            } else {
                "gone"
            },
            h["libvirt_uri"].as_str().unwrap_or("none (a Nova fake compute)"),
            h["bmc_addr"].as_str().unwrap_or("?"),
            h["bmc_pid"],
            guests.join(", ")
        );
    }
    println!();
    print!("{}", defibctl(&state, &["hosts"])?);
    println!();
    print!("{}", defibctl(&state, &["vms"])?);
    if let Some(prefix) = state["nova_prefix"].as_str() {
        println!();
        let hosts = state["hosts"].as_array().map_or(0, Vec::len);
        crate::lab_nova::print_status(hosts, prefix)?;
    }
    Ok(())
}

fn down() -> anyhow::Result<()> {
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
        if let Err(e) = crate::lab_nova::clean_up(hosts, prefix) {
            eprintln!("lab: {e:#}");
        }
    }
    if dir.join("started-novabed").exists() {
        crate::novabed::stop()?;
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("lab: down");
    Ok(())
}

fn kill(pid: u64, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
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
}

fn is_mounted(mountpoint: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(mountpoint))
}

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
fn serve(hosts: usize, guests_per_host: usize, nova: Option<usize>) -> anyhow::Result<()> {
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
            crate::lab_nova::compute_name(h)
        } else {
            format!("h{h}")
        }
    };
    // Each host's hypervisor: a libvirtd of its own, so that the lab's hosts see only the
    // lab's guests (the hostbed's system libvirt is shared with the tests).
    let mut lab_hosts = Vec::new();
    for h in (0..hosts).filter(|_| nova.is_none()) {
        let hv = Hypervisor::start(&format!("lab-h{h}")).map_err(anyhow::Error::msg)?;
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
        Some(_) => ("nova", crate::lab_nova::controller_section()),
        None => ("libvirt", String::new()),
    };
    let libvirt: Vec<(String, String)> = lab_hosts
        .iter()
        .map(|h| (h.uri.clone(), h.pid_dir.display().to_string()))
        .collect();
    let spec = LabSpec {
        hosts,
        backend,
        controller_extra: format!(
            "[engine]\nfence_on_unknown_after_ms = 3000\nfence_retry_backoff_ms = 1000\n\n\
             [fence]\nverify_timeout_ms = 5000\nverify_poll_ms = 100\n\n{fence_hosts}\n{nova_section}"
        ),
        // Each host watches its own libvirt and reports only its own domains (one kernel's
        // probes see every qemu). The Nova lab's hosts have no libvirt.
        watchdog_extra: Box::new(move |h| {
            let Some((uri, pids)) = libvirt.get(h) else {
                return String::new();
            };
            format!(
                "[libvirt]\nenabled = true\nonly_own_domains = true\nuri = {uri:?}\npid_dir = {pids:?}\n"
            )
        }),
        bmc_network: true,
    };
    let mut lab = Lab::new(&spec);
    lab.host_names = (0..hosts).map(host_name).collect();
    std::fs::write(lab.path("bmc.pass"), format!("{BMC_PASSWORD}\n"))?;
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
            None => bmc.also_on_power_off(&crate::lab_nova::power_off_hook(h)),
        }
        bmcs.push(bmc);
    }
    let nova_api = match nova {
        Some(_) => {
            crate::lab_nova::forward_into(&lab.net.controller_ns())?;
            Some(crate::lab_nova::attach()?)
        }
        None => None,
    };
    let nova_prefix = crate::lab_nova::server_prefix(&tag);
    // The first guest of each host has its disk on a loop device over FUSE, so that
    // `drill disk-stall` can make its storage hang (the others have plain image files).
    let mut stall_disks: Vec<StallDisk> = Vec::new();
    for (h, host) in lab_hosts.iter_mut().enumerate() {
        for g in 0..guests_per_host {
            let name = format!("lab{tag}-h{h}-g{g}");
            let disk = if g == 0 {
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
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);
    let nova_state = nova.map(|_| nova_prefix.as_str());
    write_state(&describe(
        &lab,
        &lab_hosts,
        &bmcs,
        &stall_disks,
        &tag,
        nova_state,
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
        let booted = crate::lab_nova::boot_servers(api, hosts, per_host, &nova_prefix);
        eprintln!("lab: {} servers ACTIVE", booted.len());
    }
    if !STOP.load(Ordering::SeqCst) {
        write_state(&describe(
            &lab,
            &lab_hosts,
            &bmcs,
            &stall_disks,
            &tag,
            nova_state,
            true,
        ))?;
        eprintln!("lab: up; waiting for SIGTERM (`cargo xtask lab down`)");
    }
    while !STOP.load(Ordering::SeqCst) {
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
                    crate::lab_nova::start_compute_if_dead(api, h);
                    eprintln!("lab: {}: nova-compute started", lab.host_names[h]);
                }
                write_state(&describe(
                    &lab,
                    &lab_hosts,
                    &bmcs,
                    &stall_disks,
                    &tag,
                    nova_state,
                    true,
                ))?;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("lab: stopping");
    // Daemons first (so nothing reacts to the rest going), then guests, hypervisors, BMCs, network.
    lab.controller = None;
    lab.watchdogs.clear();
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

fn write_state(state: &Value) -> anyhow::Result<()> {
    let tmp = state_path().with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    std::fs::rename(&tmp, state_path())?;
    Ok(())
}

fn drill(kind: Drill) -> anyhow::Result<()> {
    let state = read_state()
        .filter(|s| keeper_pid(s).is_some())
        .context("the lab is down (`cargo xtask lab up`)")?;
    // The Nova lab's hosts are fake computes: no qemu to kill, no disk to stall.
    if state["nova_prefix"].is_string() && matches!(kind, Drill::VmCrash | Drill::DiskStall) {
        bail!(
            "the lab runs with --nova: its hosts are Nova's fake computes, whose servers have no \
             qemu and no disk (vm-crash and disk-stall need `cargo xtask lab up` without --nova)"
        );
    }
    match kind {
        Drill::VmCrash => vm_crash(&state),
        Drill::DiskStall => disk_stall(&state),
        Drill::HostLoss => lose_host(&state, false),
        Drill::Partition => lose_host(&state, true),
    }
}

/// Kills the qemu of the first guest of h1 (or h0) with SIGKILL, waits for the VM to run
/// again, and prints its incident's timeline.
fn vm_crash(state: &Value) -> anyhow::Result<()> {
    let host = state["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["guests"].as_array().is_some_and(|g| !g.is_empty()))
        .context("the lab has no guests")?;
    let guest = &host["guests"][0];
    let (name, uuid) = (
        guest["name"].as_str().unwrap_or(""),
        guest["uuid"].as_str().unwrap_or(""),
    );
    let pid_dir = Path::new(host["pid_dir"].as_str().unwrap_or(""));
    let pid: u64 = std::fs::read_to_string(pid_dir.join(format!("{name}.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("{name} does not run on {}", host["name"]))?;
    let subject = format!("vm:{uuid}");
    let before = newest_incident(state, &subject)?.map(|i| i["id"].clone());
    println!(
        "drill vm-crash: SIGKILL to qemu pid {pid} of {name} on {}",
        host["name"].as_str().unwrap_or("?")
    );
    kill(pid, "-KILL");
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some(inc) = newest_incident(state, &subject)? {
            if Some(&inc["id"]) != before.as_ref() && !inc["closed_at_ms"].is_null() {
                break inc["id"].as_u64().unwrap_or(0);
            }
        }
        if Instant::now() > deadline {
            bail!("no closed incident about {subject} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    print!("{}", defibctl(state, &["incidents", &id.to_string()])?);
    let new_pid = std::fs::read_to_string(pid_dir.join(format!("{name}.pid"))).unwrap_or_default();
    println!("{name} runs again: qemu pid {}", new_pid.trim());
    Ok(())
}

/// Sends SIGCONT to the FUSE daemon when dropped: a drill that fails half-way does not
/// leave a guest's storage hanging.
struct ResumeStorage(u64);

impl Drop for ResumeStorage {
    fn drop(&mut self) {
        kill(self.0, "-CONT");
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Completed disk writes in a guest's serial log (`HB-IO <n>` lines; a restarted guest
/// counts from 1 again, so lines are counted, not numbers read).
fn io_lines(serial: &Path) -> usize {
    String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default())
        .lines()
        .filter(|l| l.trim().starts_with("HB-IO "))
        .count()
}

/// Stops the FUSE daemon under a running guest's loop device past the watchdog's stall
/// threshold, waits for the stall incident, lets the storage run again, waits until the
/// incident is closed and the guest writes again, and prints the timeline.
fn disk_stall(state: &Value) -> anyhow::Result<()> {
    let vms = defibctl_json(state, &["vms"])?;
    let vms = vms["vms"].as_array().cloned().unwrap_or_default();
    let guests: Vec<Value> = state["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["guests"].as_array().cloned().unwrap_or_default())
        .collect();
    // A stallable guest that runs now (wherever an earlier drill put it).
    let (disk, uuid, vm) = state["stall_disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| {
            let g = guests.iter().find(|g| g["name"] == d["guest"])?;
            let uuid = g["uuid"].as_str()?.to_string();
            let vm = vms
                .iter()
                .find(|v| v["resource"] == format!("vm:{uuid}") && v["state"] == "Running")?;
            Some((d.clone(), uuid, vm.clone()))
        })
        .context("no guest with a stallable disk runs (`cargo xtask lab status`)")?;
    let name = disk["guest"].as_str().unwrap_or("?").to_string();
    let on = vm["host"].as_str().unwrap_or("?").to_string();
    let bindfs = disk["bindfs_pid"]
        .as_u64()
        .filter(|&p| alive(p))
        .context("the guest's FUSE daemon is gone")?;
    let serial = defib_tests::guests::guests_dir().join(format!("{name}.serial.log"));
    let subject = format!("vm:{uuid}");
    let before = newest_incident(state, &subject)?.map(|i| i["id"].clone());
    println!(
        "drill disk-stall: the storage of {name} on {on} stops (SIGSTOP to bindfs pid {bindfs} under {})",
        disk["loop"].as_str().unwrap_or("?")
    );
    let stopped_ms = unix_ms();
    let resume = ResumeStorage(bindfs);
    kill(bindfs, "-STOP");
    let mut id = 0;
    wait_for("the stall incident", 60, || {
        Ok(match newest_incident(state, &subject)? {
            Some(inc) if Some(&inc["id"]) != before.as_ref() => {
                id = inc["id"].as_u64().unwrap_or(0);
                true
            }
            _ => false,
        })
    })?;
    // The guest is stuck: no disk write completes while the storage is stopped.
    let stuck = io_lines(&serial);
    std::thread::sleep(Duration::from_millis(1000));
    anyhow::ensure!(
        io_lines(&serial) == stuck,
        "{name} wrote its disk while its storage was stopped"
    );
    println!("{name}: stall incident i{id} open; the storage runs again");
    let resumed_ms = unix_ms();
    drop(resume);
    wait_for("the stall incident closed", 60, || {
        let inc = defibctl_json(state, &["incidents", &id.to_string()])?;
        Ok(!inc["closed_at_ms"].is_null())
    })?;
    let inc = defibctl_json(state, &["incidents", &id.to_string()])?;
    print!("{}", defibctl(state, &["incidents", &id.to_string()])?);
    let at = |what: &str| {
        inc["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["cause"].as_str().is_some_and(|c| c.starts_with(what)))
            .and_then(|e| e["at"].as_u64())
    };
    let (Some(seen), Some(ended)) = (at("disk stall started"), at("disk stall ended")) else {
        bail!("incident i{id} is not the stall's (no disk stall started and ended): {inc}");
    };
    println!(
        "stall seen by the probe (in the controller) at +{} ms after the storage stopped; ended at +{} ms after it ran again",
        seen.saturating_sub(stopped_ms),
        ended.saturating_sub(resumed_ms)
    );
    // Healthy again: the guest writes its disk, and still runs where it ran.
    let now = io_lines(&serial);
    wait_for(&format!("{name} writing its disk again"), 30, || {
        Ok(io_lines(&serial) >= now + 2)
    })?;
    let vms = defibctl_json(state, &["vms"])?;
    anyhow::ensure!(
        vms["vms"].as_array().into_iter().flatten().any(|v| {
            v["resource"] == subject.as_str() && v["state"] == "Running" && v["host"] == on.as_str()
        }),
        "{name} is not Running on {on} after the stall: {vms}"
    );
    println!("{name} writes its disk again and runs on {on}");
    Ok(())
}

/// The newest incident about `subject` (its summary), if any.
fn newest_incident(state: &Value, subject: &str) -> anyhow::Result<Option<Value>> {
    let list = defibctl_json(state, &["incidents"])?;
    Ok(list["incidents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["subject"] == subject)
        .max_by_key(|i| i["id"].as_u64())
        .cloned())
}

/// What the keeper made, for the state file.
fn describe(
    lab: &Lab,
    lab_hosts: &[Host],
    bmcs: &[Bmc],
    disks: &[StallDisk],
    tag: &str,
    nova_prefix: Option<&str>,
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
        for d in disks {
            processes.push(json!({"pid": d.bed.pid(), "comm": "bindfs"}));
        }
        // The lab's own libvirtds (their domains are destroyed first, by URI).
        for hv in lab_hosts.iter().map(|h| &h.hv) {
            let pid = std::fs::read_to_string(hv.root().join("child.pid")).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<u64>() {
                processes.push(json!({"pid": pid, "comm": "libvirtd"}));
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
            "api_url": format!("http://{}:7412", lab.net.controller_addr(0)),
            "token_file": lab.path("api.token"),
            "pids": {"controller": lab.controller.as_ref().map(|d| d.pid())},
            "hosts": host_list,
            "stall_disks": disks.iter().map(StallDisk::describe).collect::<Vec<_>>(),
            "processes": processes,
            "namespaces": namespaces,
            "dirs": dirs,
        })
    }
}

fn host_state(state: &Value, host: &str) -> anyhow::Result<String> {
    let hosts = defibctl_json(state, &["hosts"])?;
    Ok(hosts["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["host"] == host)
        .and_then(|h| h["state"].as_str())
        .unwrap_or("absent")
        .to_string())
}

/// Polls `ok` every 100 ms for up to `secs`.
fn wait_for(
    what: &str,
    secs: u64,
    mut ok: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok()? {
        if Instant::now() > deadline {
            bail!("{what}: not within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The host-loss and partition drills on the last lab host: the failure, the host's
/// incident until its guests run elsewhere, its timeline; then the host back.
fn lose_host(state: &Value, partition: bool) -> anyhow::Result<()> {
    // The last host that runs a VM now (an earlier drill may have emptied one): as the
    // controller sees them, or, in the Nova lab, as Nova does (the controller learns a
    // host's servers from Nova only when it forces the host's compute down).
    let vms = defibctl_json(state, &["vms"])?;
    let vms = vms["vms"].as_array().cloned().unwrap_or_default();
    let nova = match state["nova_prefix"].as_str() {
        Some(prefix) => Some((crate::lab_nova::attach()?, prefix.to_string())),
        None => None,
    };
    let runs_vms = |h: &Value| match &nova {
        Some((api, prefix)) => {
            !crate::lab_nova::servers_on(api, prefix, h["name"].as_str().unwrap_or("?")).is_empty()
        }
        None => vms
            .iter()
            .any(|v| v["host"] == h["name"] && v["state"] == "Running"),
    };
    let host = state["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .rfind(|h| runs_vms(h))
        .context("no lab host runs a VM")?;
    let name = host["name"].as_str().unwrap_or("?").to_string();
    let h = host["index"]
        .as_u64()
        .context("the state file names no host index")? as usize;
    let ctl_ns = state["controller_ns"].as_str().unwrap_or("");
    let bmc = host["bmc_addr"].as_str().unwrap_or("");
    let servers: Vec<String> = match &nova {
        Some((api, prefix)) => crate::lab_nova::servers_on(api, prefix, &name),
        None => Vec::new(),
    };
    let subjects: Vec<String> = match &nova {
        Some(_) => servers.iter().map(|id| format!("vm:{id}")).collect(),
        None => vms
            .iter()
            .filter(|v| v["host"] == name.as_str() && v["state"] == "Running")
            .filter_map(|v| v["resource"].as_str().map(String::from))
            .collect(),
    };
    let earlier = newest_incident(state, &format!("host:{name}"))?.map(|i| i["id"].clone());
    let old_wd = host["watchdog_pid"].as_u64();
    anyhow::ensure!(
        host_state(state, &name)? == "Up",
        "{name} is not Up; run the drill on a healthy lab"
    );
    if partition {
        let sw = state["namespaces"][0].as_str().unwrap_or("");
        println!("drill partition: every link of {name} cut at the switch ({name} runs on)");
        for p in 0..2 {
            let port = format!("h{h}-p{p}");
            let st = Command::new("ip")
                .args(["-n", sw, "link", "set", &port, "down"])
                .status()?;
            anyhow::ensure!(st.success(), "cutting {port}");
        }
    } else {
        println!("drill host-loss: {name} powered off at its BMC ({bmc})");
        defib_tests::bmc::chassis_power(ctl_ns, bmc, "off").map_err(anyhow::Error::msg)?;
    }
    // Fenced, and every guest of the host running on another one (in the Nova lab: every
    // server ACTIVE on another compute, as Nova says).
    if let Some((api, prefix)) = &nova {
        println!(
            "{name}'s nova-compute killed with it; {} servers of the lab on {name}",
            servers.len()
        );
        wait_for(&format!("{name}'s servers ACTIVE elsewhere"), 180, || {
            Ok(crate::lab_nova::all_active_elsewhere(
                api, prefix, &servers, &name,
            ))
        })?;
    }
    wait_for(&format!("{name}'s guests running elsewhere"), 120, || {
        let vms = defibctl_json(state, &["vms"])?;
        let list = vms["vms"].as_array().cloned().unwrap_or_default();
        Ok(subjects.iter().all(|s| {
            list.iter().any(|v| {
                v["resource"] == s.as_str() && v["state"] == "Running" && v["host"] != name.as_str()
            })
        }))
    })?;
    let id = newest_incident(state, &format!("host:{name}"))?
        .filter(|i| Some(&i["id"]) != earlier.as_ref())
        .and_then(|i| i["id"].as_u64())
        .context("no new incident about the host")?;
    print!("{}", defibctl(state, &["incidents", &id.to_string()])?);
    print!("{}", defibctl(state, &["vms"])?);
    if let Some((api, prefix)) = &nova {
        println!("Nova:");
        for s in crate::lab_nova::placement_of(api, prefix, &servers) {
            println!(
                "  {} {} {} on {}",
                s["id"].as_str().unwrap_or("?"),
                s["name"].as_str().unwrap_or("?"),
                s["status"].as_str().unwrap_or("?"),
                s["host"].as_str().unwrap_or("?")
            );
        }
    }

    // Back to healthy: power on (the keeper brings its links up and starts its watchdog
    // again), then trust it again.
    println!("\n{name}: power on, unfence");
    defib_tests::bmc::chassis_power(ctl_ns, bmc, "on").map_err(anyhow::Error::msg)?;
    wait_for(&format!("{name}'s watchdog started again"), 30, || {
        Ok(read_state()
            .and_then(|s| {
                s["hosts"]
                    .as_array()
                    .and_then(|l| l.iter().find(|x| x["name"] == name.as_str()).cloned())
            })
            .and_then(|x| x["watchdog_pid"].as_u64())
            .is_some_and(|p| Some(p) != old_wd && alive(p)))
    })?;
    // Its heartbeats back, the fenced host is Recovered: the operator's word trusts it.
    wait_for(&format!("{name} Recovered"), 60, || {
        Ok(host_state(state, &name)? == "Recovered")
    })?;
    // Refused while the host still lists a domain that now runs elsewhere (its libvirt
    // may not have noticed the killed qemu yet): asked again, as an operator would.
    let mut refused = None;
    wait_for(&format!("{name} unfenced"), 60, || {
        match defibctl(state, &["unfence", &name]) {
            Ok(out) => {
                print!("{out}");
                Ok(true)
            }
            Err(e) => {
                if refused.is_none() {
                    println!("{e} (asking again)");
                }
                refused = Some(e);
                Ok(false)
            }
        }
    })?;
    wait_for(&format!("{name} Up again"), 60, || {
        Ok(host_state(state, &name)? == "Up")
    })?;
    // In the Nova lab the unfence also unforces the compute (Nova refuses until the
    // returned nova-compute has cleaned up its evacuated servers; the controller retries).
    if let Some((api, _)) = &nova {
        crate::lab_nova::wait_compute_back(api, &name, 180)?;
        println!("{name}: nova-compute up, not forced down");
    }
    println!("{name} is Up again");
    Ok(())
}
