//! `cargo xtask hostbed install|start|stop|status`: the project's real-guest test bed.
//!
//! libvirtd and virtlogd run without systemd, each under the project's child subreaper
//! (`defib-subreaper`, tests/src/bin/subreaper.rs), with pid files and logs in
//! [`RUN_DIR`]. Guests are KVM guests whose disk is the 512-byte boot sector built here
//! from tests/guest/hbguest.S (tests/src/guests.rs runs them), and, where a test needs a
//! real guest kernel, a Linux guest under TCG (Debian's kernel and a busybox initramfs,
//! built by [`crate::linuxguest`]). Adapted from the reference
//! recipes 0–3 in ../shared/testbed/hostbed, with their pitfalls:
//!
//! - this image ships qemu-utils 10 from bookworm-backports, which breaks bookworm's qemu
//!   7.2: install `qemu-utils/bookworm --allow-downgrades`;
//! - without udev, /dev/kvm is root:root 0600 and qemu (user libvirt-qemu, group kvm)
//!   cannot open it: root:kvm 0660;
//! - libvirtd waits for a killed qemu's pid to vanish before it reports the death, and this
//!   sandbox's PID 1 reaps orphans every ~2 s: hence the subreaper.
//!
//! Everything is idempotent; `stop` ends only the processes whose pids it recorded (and
//! checks that each pid still runs the program it started) and the `dfb-` domains.
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Subcommand;
use defib_tests::guests::{image_path, virsh, GUEST_PREFIX, RUN_DIR};

#[derive(Subcommand)]
pub enum Action {
    /// Install the Debian packages (libvirt, qemu, binutils) and fix /dev/kvm. Idempotent.
    Install,
    /// Install if needed, build the guest images (the boot sector; the TCG Linux guest's
    /// kernel and initramfs, downloaded once into /var/cache/defib-hostbed), start virtlogd and libvirtd under the
    /// subreaper and wait until libvirt answers. Nothing to do when it already runs.
    Start,
    /// Destroy and undefine the `dfb-` guests, stop the daemons `start` started (by pid).
    Stop,
    /// Print what runs.
    Status,
}

/// libvirt and qemu as the reference recipe installs them (bookworm's libvirt 9.0 with
/// qemu 7.2); qemu-utils (qemu-img) comes from bookworm, see [`install`].
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-daemon-system",
    // Without it apt satisfies libvirt-daemon-system's init dependency with systemd-sysv.
    "libvirt-daemon-system-sysv",
    "libvirt-clients",
    // as and ld for the boot-sector guest.
    "binutils",
    // The TCG Linux guest's initramfs (xtask/src/linuxguest.rs).
    "busybox-static",
    "cpio",
];

/// The daemons, in start order.
const DAEMONS: &[Daemon] = &[
    Daemon {
        name: "virtlogd",
        exe: "/usr/sbin/virtlogd",
    },
    Daemon {
        name: "libvirtd",
        exe: "/usr/sbin/libvirtd",
    },
];

struct Daemon {
    name: &'static str,
    exe: &'static str,
}

impl Daemon {
    fn pidfile(&self) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{}.pid", self.name))
    }
    fn child_pidfile(&self) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{}.child.pid", self.name))
    }
    fn log(&self) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{}.log", self.name))
    }

    /// (subreaper pid, daemon pid) if the recorded subreaper still runs this daemon.
    fn running(&self) -> Option<(i32, Option<i32>)> {
        let sub = read_pid(&self.pidfile())?;
        let cmdline = live_cmdline(sub)?;
        if !(cmdline.first()?.ends_with("defib-subreaper") && cmdline.iter().any(|a| a == self.exe))
        {
            return None;
        }
        let child = read_pid(&self.child_pidfile())
            .filter(|&c| live_cmdline(c).is_some_and(|c| c.first().is_some_and(|a| a == self.exe)));
        Some((sub, child))
    }
}

pub fn run(action: Action) -> anyhow::Result<()> {
    match action {
        Action::Install => install(),
        Action::Start => start(),
        Action::Stop => stop(),
        Action::Status => status(),
    }
}

/// For `cargo xtask test`: start the hostbed so the real-guest tests run. Under `CI=true`
/// a failure fails the run; elsewhere those tests skip and say why.
pub fn for_tests() -> anyhow::Result<()> {
    match start() {
        Ok(()) => Ok(()),
        Err(e) if defib_tests::ci() => Err(e.context("starting the hostbed (CI=true)")),
        Err(e) => {
            eprintln!("xtask hostbed: not available ({e:#}); the real-guest tests will skip");
            Ok(())
        }
    }
}

fn output(cmd: &mut Command) -> String {
    cmd.stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn run_cmd(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask hostbed: {what}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Package → installed version, for the packages dpkg knows as installed.
fn installed_versions() -> Vec<(String, String)> {
    output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${Version} ${Status}\n"])
            .args(PACKAGES),
    )
    .lines()
    .filter(|l| l.ends_with("install ok installed"))
    .filter_map(|l| {
        let mut w = l.split_whitespace();
        Some((w.next()?.to_string(), w.next()?.to_string()))
    })
    .collect()
}

/// Every package installed, and qemu-utils of the same build as qemu-system-x86 (not the
/// image's backports qemu-utils, which breaks qemu 7.2).
fn packages_ok() -> bool {
    let v = installed_versions();
    let version = |p: &str| v.iter().find(|(n, _)| n == p).map(|(_, v)| v.as_str());
    PACKAGES.iter().all(|p| version(p).is_some())
        && version("qemu-utils") == version("qemu-system-x86")
}

pub fn install() -> anyhow::Result<()> {
    if !packages_ok() {
        anyhow::ensure!(
            defib_tests::is_root(),
            "installing libvirt and qemu needs root"
        );
        let apt = ["-o", "DPkg::Lock::Timeout=600"];
        run_cmd(
            "apt-get update",
            Command::new("apt-get").args(apt).args(["update", "-q"]),
        )?;
        let others: Vec<&str> = PACKAGES
            .iter()
            .copied()
            .filter(|p| *p != "qemu-utils")
            .collect();
        run_cmd(
            &format!("apt-get install qemu-utils/bookworm {}", others.join(" ")),
            Command::new("apt-get")
                .args(apt)
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "--allow-downgrades",
                    "qemu-utils/bookworm",
                ])
                .args(&others)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        anyhow::ensure!(
            packages_ok(),
            "after apt-get install, the packages are still not all there: {:?}",
            installed_versions()
        );
    }
    kvm_perms()
}

/// What udev would do: /dev/kvm root:kvm 0660, so that libvirt's qemu user can open it.
fn kvm_perms() -> anyhow::Result<()> {
    let kvm = Path::new("/dev/kvm");
    let meta = std::fs::metadata(kvm).context("/dev/kvm (this machine has no KVM)")?;
    let gid = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"kvm")).then(|| f.get(2)?.parse::<u32>().ok())?
        })
        .context("no group kvm (is qemu-system-x86 installed?)")?;
    if meta.gid() != gid {
        std::os::unix::fs::chown(kvm, None, Some(gid)).context("chgrp kvm /dev/kvm")?;
    }
    if meta.mode() & 0o777 != 0o660 {
        std::fs::set_permissions(kvm, std::fs::Permissions::from_mode(0o660))
            .context("chmod 0660 /dev/kvm")?;
    }
    Ok(())
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The argv of a live (not zombie) process.
fn live_cmdline(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

pub fn libvirt_answers() -> bool {
    virsh(&["version"], Duration::from_secs(5)).is_ok()
}

fn guest_source() -> PathBuf {
    defib_tests::workspace_root().join("tests/guest/hbguest.S")
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).ok()?.modified().ok()
}

/// Builds tests/guest/hbguest.S into the run dir's 512-byte boot sector (if out of date).
fn build_image() -> anyhow::Result<()> {
    let src = guest_source();
    let out = image_path();
    let src_time = mtime(&src).with_context(|| format!("{}", src.display()))?;
    if mtime(&out).is_some_and(|t| t >= src_time) {
        return Ok(());
    }
    let obj = Path::new(RUN_DIR).join("hbguest.o");
    let tmp = Path::new(RUN_DIR).join("hbguest.bin.tmp");
    run_cmd(
        &format!("as {}", src.display()),
        Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src),
    )?;
    run_cmd(
        "ld the boot sector",
        Command::new("ld")
            .args(["-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary"])
            .args(["-e", "_start", "-o"])
            .arg(&tmp)
            .arg(&obj),
    )?;
    let _ = std::fs::remove_file(&obj);
    let image = std::fs::read(&tmp)?;
    anyhow::ensure!(
        image.len() == 512 && image[510..] == [0x55, 0xaa],
        "{} is not a 512-byte boot sector ({} bytes)",
        tmp.display(),
        image.len()
    );
    std::fs::rename(&tmp, &out)?;
    Ok(())
}

fn make_run_dir() -> anyhow::Result<()> {
    for d in [
        PathBuf::from(RUN_DIR),
        Path::new(RUN_DIR).join("bin"),
        defib_tests::guests::guests_dir(),
        defib_tests::guests::linux_dir(),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
        // libvirt's qemu user reads guests' disks and serial logs in there.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// The subreaper, copied into the run dir so that a `cargo clean` or a rebuild does not
/// touch the file a running daemon's parent was started from.
fn subreaper() -> anyhow::Result<PathBuf> {
    let built = defib_tests::built_binary("defib-tests", "defib-subreaper");
    let dest = Path::new(RUN_DIR).join("bin/defib-subreaper");
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&built, &tmp).with_context(|| format!("copy {}", built.display()))?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

pub fn start() -> anyhow::Result<()> {
    let t0 = Instant::now();
    anyhow::ensure!(
        defib_tests::is_root(),
        "the hostbed (libvirt's system instance) needs root"
    );
    install()?;
    make_run_dir()?;
    build_image()?;
    crate::linuxguest::build().context("the TCG Linux guest")?;

    if DAEMONS.iter().all(|d| d.running().is_some()) && libvirt_answers() {
        eprintln!("xtask hostbed: already running ({:?})", t0.elapsed());
        return Ok(());
    }
    if DAEMONS.iter().all(|d| d.running().is_none()) && libvirt_answers() {
        // Somebody else's libvirtd (e.g. one a person started by hand): use it, never
        // touch it.
        eprintln!("xtask hostbed: a libvirtd not started by the hostbed answers; using it");
        return Ok(());
    }

    let subreaper = subreaper()?;
    for d in DAEMONS {
        if d.running().is_some() {
            continue;
        }
        let log = std::fs::File::create(d.log())?;
        let child = Command::new(&subreaper)
            .arg("--child-pidfile")
            .arg(d.child_pidfile())
            .arg("--")
            .arg(d.exe)
            .current_dir(RUN_DIR)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} under {}", d.name, subreaper.display()))?;
        std::fs::write(d.pidfile(), format!("{}\n", child.id()))?;
        eprintln!(
            "xtask hostbed: {} started under defib-subreaper (pid {})",
            d.name,
            child.id()
        );
    }

    let deadline = Instant::now() + Duration::from_secs(30);
    while !libvirt_answers() {
        for d in DAEMONS {
            if d.running().is_none() {
                bail!(
                    "{} exited at start; its log ({}):\n{}",
                    d.name,
                    d.log().display(),
                    std::fs::read_to_string(d.log()).unwrap_or_default()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "libvirtd does not answer after 30 s; its log ({}):\n{}",
                DAEMONS[1].log().display(),
                std::fs::read_to_string(DAEMONS[1].log()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "xtask hostbed: libvirt answers ({:?} after start)",
        t0.elapsed()
    );
    Ok(())
}

/// The `dfb-` domains libvirt knows (running or only defined).
fn lab_domains() -> Vec<String> {
    virsh(&["list", "--all", "--name"], Duration::from_secs(10))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(GUEST_PREFIX))
        .map(String::from)
        .collect()
}

/// `kill -SIG PID`, for one recorded pid.
fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| live_cmdline(p).is_none()) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn stop() -> anyhow::Result<()> {
    if libvirt_answers() {
        for name in lab_domains() {
            let _ = virsh(&["destroy", &name], Duration::from_secs(30));
            match virsh(&["undefine", &name], Duration::from_secs(30)) {
                Ok(_) => eprintln!("xtask hostbed: removed guest {name}"),
                Err(e) => eprintln!("xtask hostbed: {e}"),
            }
        }
    }
    // Disks, logs and XML of guests whose test was killed before it could remove them.
    if let Ok(entries) = std::fs::read_dir(defib_tests::guests::guests_dir()) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(GUEST_PREFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // libvirtd first, then the virtlogd it logs through.
    for d in DAEMONS.iter().rev() {
        let Some((sub, child)) = d.running() else {
            let _ = std::fs::remove_file(d.pidfile());
            let _ = std::fs::remove_file(d.child_pidfile());
            continue;
        };
        let mut pids = vec![sub];
        pids.extend(child);
        // The subreaper forwards SIGTERM to the daemon and exits with it.
        signal(sub, "TERM");
        if !wait_gone(&pids, Duration::from_secs(15)) {
            eprintln!("xtask hostbed: {} did not stop on SIGTERM; SIGKILL", d.name);
            for &p in pids.iter().rev() {
                signal(p, "KILL");
            }
            wait_gone(&pids, Duration::from_secs(5));
        }
        eprintln!("xtask hostbed: stopped {} (pids {pids:?})", d.name);
        let _ = std::fs::remove_file(d.pidfile());
        let _ = std::fs::remove_file(d.child_pidfile());
    }
    Ok(())
}

pub fn status() -> anyhow::Result<()> {
    let versions = installed_versions();
    println!(
        "packages: {}",
        if packages_ok() {
            "installed"
        } else {
            "missing or mismatched (cargo xtask hostbed install)"
        }
    );
    for (p, v) in &versions {
        println!("  {p} {v}");
    }
    println!("run dir: {RUN_DIR}");
    for d in DAEMONS {
        match d.running() {
            Some((sub, child)) => println!(
                "{}: running, defib-subreaper pid {sub}, {} pid {}",
                d.name,
                d.name,
                child.map_or("?".into(), |c| c.to_string())
            ),
            None => println!("{}: not started by the hostbed", d.name),
        }
    }
    let answers = libvirt_answers();
    println!(
        "libvirt ({}): {}",
        defib_tests::guests::LIBVIRT_URI,
        if answers { "answers" } else { "no answer" }
    );
    println!(
        "guest image: {} ({})",
        image_path().display(),
        if image_path().exists() {
            "built"
        } else {
            "not built"
        }
    );
    println!("TCG Linux guest: {}", crate::linuxguest::describe());
    if answers {
        let all = virsh(&["list", "--all"], Duration::from_secs(10)).unwrap_or_default();
        let lab: Vec<&str> = all
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|n| n.starts_with(GUEST_PREFIX))
            })
            .collect();
        println!("{} guests: {}", GUEST_PREFIX, lab.len());
        for l in lab {
            println!("  {}", l.trim());
        }
    }
    Ok(())
}
