//! The Ceph test bed (`cargo xtask cephbed start`, xtask/cephbed/cephbed.sh) as the
//! tests use it: a single-node Ceph on 127.0.0.1, pool `volumes`, qemu's user
//! `client.cinder`. Images made here are removed when dropped; an OSD stopped here is
//! continued when its guard is dropped, so a failing test never leaves Ceph frozen.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the bed lives (xtask/src/cephbed.rs).
pub const DIR: &str = "/var/lib/defib-cephbed";
/// The pool RBD images go in.
pub const POOL: &str = "volumes";
/// The libvirt secret that holds `client.cinder`'s key (one per libvirt instance).
pub const SECRET_UUID: &str = "c0ffee00-cef0-4000-8000-000000000001";
/// The monitor's v1 address, as a libvirt `<host>` names it.
pub const MON_PORT: u16 = 26789;

/// A running Ceph test bed.
pub struct Cephbed {
    conf: PathBuf,
}

/// Fails the test (under `CI=true`) or skips it, with the reason, unless the Ceph test
/// bed runs.
#[macro_export]
macro_rules! require_cephbed {
    () => {
        match $crate::cephbed::Cephbed::ensure() {
            Ok(bed) => bed,
            Err(reason) => {
                if $crate::ci() {
                    panic!("this test needs: {reason} (CI=true, so a missing requirement is a failure)");
                }
                eprintln!("SKIP: {reason}");
                return;
            }
        }
    };
}

impl Cephbed {
    /// The bed if Ceph answers healthy, else why not.
    pub fn ensure() -> Result<Cephbed, String> {
        if !crate::is_root() {
            return Err("root (the Ceph test bed's files)".into());
        }
        let conf = Path::new(DIR).join("etc/ceph.conf");
        if !conf.exists() || !crate::have_command("ceph") {
            return Err("the Ceph test bed (`cargo xtask cephbed start`)".into());
        }
        let bed = Cephbed { conf };
        let health = bed
            .run("ceph", &["health"], Duration::from_secs(15))
            .map_err(|e| format!("a running Ceph test bed (`cargo xtask cephbed start`): {e}"))?;
        if !health.starts_with("HEALTH_OK") {
            return Err(format!("a healthy Ceph test bed: {}", health.trim()));
        }
        Ok(bed)
    }

    /// The configuration file clients (qemu, the CLIs) read.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// Runs a Ceph CLI (`ceph`, `rbd`) against the bed, as its admin; its stdout.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let out = Command::new("timeout")
            .arg(timeout.as_secs().max(1).to_string())
            .arg(program)
            .args(args)
            .env("CEPH_CONF", &self.conf)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {}: {} {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new image `name` of `size` bytes in [`POOL`] holding `data` at its start
    /// (unique names: several tests share the bed).
    pub fn import(&self, name: &str, data: &[u8], size: u64) -> RbdImage {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("image.raw");
        std::fs::write(&raw, data).expect("image data");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .and_then(|f| f.set_len(size))
            .expect("image size");
        let spec = format!("{POOL}/{name}-{}", crate::tag());
        let _ = self.run("rbd", &["rm", &spec], Duration::from_secs(30));
        self.run(
            "rbd",
            &["import", "--no-progress", &raw.display().to_string(), &spec],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("importing {spec}: {e}"));
        RbdImage {
            spec,
            conf: self.conf.clone(),
        }
    }

    /// The libvirt secret (its UUID) holding `client.cinder`'s key on the libvirt at
    /// `uri`, defined there if missing: a domain's RBD disk names it in `<auth>`, as Nova
    /// does with `rbd_secret_uuid`.
    pub fn libvirt_secret(&self, uri: &str) -> String {
        let uuid = SECRET_UUID;
        let virsh = |args: &[&str]| crate::guests::run_virsh(uri, args, Duration::from_secs(30));
        if virsh(&["secret-get-value", uuid]).is_err() {
            let dir = tempfile::tempdir().expect("tempdir");
            let xml = dir.path().join("secret.xml");
            std::fs::write(
                &xml,
                format!(
                    "<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>\
                     <usage type='ceph'><name>client.cinder {uuid}</name></usage></secret>"
                ),
            )
            .expect("secret xml");
            virsh(&["secret-define", &xml.display().to_string()])
                .unwrap_or_else(|e| panic!("defining the Ceph secret on {uri}: {e}"));
            let key = self
                .run(
                    "ceph",
                    &["auth", "get-key", "client.cinder"],
                    Duration::from_secs(15),
                )
                .unwrap_or_else(|e| panic!("client.cinder's key: {e}"));
            let file = dir.path().join("key");
            std::fs::write(&file, key.trim()).expect("key file");
            virsh(&[
                "secret-set-value",
                uuid,
                "--file",
                &file.display().to_string(),
            ])
            .unwrap_or_else(|e| panic!("setting the Ceph secret on {uri}: {e}"));
        }
        uuid.to_string()
    }

    /// The OSD daemon's pid (the bed records it).
    pub fn osd_pid(&self) -> u32 {
        let pids = std::fs::read_to_string(Path::new(DIR).join("pids")).expect("the bed's pids");
        pids.lines()
            .find_map(|l| {
                let (pid, name) = l.split_once(' ')?;
                name.starts_with("ceph-osd").then(|| pid.parse().ok())?
            })
            .expect("an OSD in the bed's pids")
    }

    /// SIGSTOPs the OSD: every request to it waits, with no error, until the guard is
    /// dropped (SIGCONT).
    pub fn stop_osd(&self) -> StoppedOsd {
        let pid = self.osd_pid();
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        StoppedOsd { pid }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("{sig} to the OSD {pid}: {e}"));
}

/// The OSD, stopped until this is dropped.
pub struct StoppedOsd {
    pid: u32,
}

impl Drop for StoppedOsd {
    fn drop(&mut self) {
        signal(self.pid, nix::sys::signal::Signal::SIGCONT);
    }
}

/// An RBD image of the bed, removed when dropped.
pub struct RbdImage {
    /// `pool/name`.
    pub spec: String,
    conf: PathBuf,
}

impl RbdImage {
    /// A libvirt `<disk>` for it: a network disk through qemu's librbd, as
    /// `client.cinder` with the key in the libvirt secret `secret_uuid`
    /// ([`Cephbed::libvirt_secret`]), as Nova writes one for a Cinder RBD volume.
    pub fn libvirt_disk_xml(&self, secret_uuid: &str) -> String {
        format!(
            "<disk type='network' device='disk'>\
             <driver name='qemu' type='raw' cache='none' error_policy='stop'/>\
             <source protocol='rbd' name='{}'><host name='127.0.0.1' port='{MON_PORT}'/></source>\
             <auth username='cinder'><secret type='ceph' uuid='{secret_uuid}'/></auth>\
             <target dev='vda' bus='virtio'/></disk>",
            self.spec
        )
    }

    /// qemu's `-drive` for it, through its own librbd driver as `client.cinder`.
    pub fn qemu_drive(&self, cache: &str) -> String {
        format!(
            "file=rbd:{}:id=cinder:conf={},format=raw,if=virtio,cache={cache}",
            self.spec,
            self.conf.display()
        )
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        remove_image(&self.spec, &self.conf);
    }
}

/// Removes `spec`. A client killed with SIGKILL (a lab host's power-off) leaves its
/// watch on the image until the OSD's watch timeout (30 s) ends it, and `rbd rm`
/// refuses an image with watchers: it is tried again for up to 45 s.
pub fn remove_image(spec: &str, conf: &Path) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    loop {
        let out = Command::new("timeout")
            .args(["30", "rbd", "rm", "--no-progress", spec])
            .env("CEPH_CONF", conf)
            .output();
        let Ok(out) = out else { return false };
        if out.status.success() {
            return true;
        }
        let watched = String::from_utf8_lossy(&out.stderr).contains("watchers");
        if !watched || std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A plain qemu (KVM) running the hostbed's boot-sector guest (one sector written and
/// one serial line a second) from a disk given as a `-drive`, without libvirt; killed
/// when dropped. The watchdog names its VM from `-name` and `-uuid`, as libvirt passes
/// them.
pub struct BootSectorQemu {
    child: Child,
    serial: PathBuf,
    _dir: tempfile::TempDir,
}

impl BootSectorQemu {
    pub fn start(name: &str, uuid: &str, drive: &str) -> BootSectorQemu {
        let dir = tempfile::tempdir().expect("tempdir");
        let serial = dir.path().join("serial.log");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "kvm", "-machine", "pc", "-m", "16", "-nodefaults"])
            .args(["-display", "none", "-no-user-config"])
            .args(["-name", &format!("guest={name}"), "-uuid", uuid])
            .args(["-drive", drive])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        BootSectorQemu {
            child,
            serial,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sector writes the guest reported done (its serial heartbeat lines).
    pub fn writes(&self) -> usize {
        std::fs::read_to_string(&self.serial)
            .map(|s| s.lines().filter(|l| l.starts_with("HB-IO")).count())
            .unwrap_or(0)
    }

    /// Waits until the guest has reported `n` writes; false after `timeout`.
    pub fn wait_writes(&self, n: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.writes() < n {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

impl Drop for BootSectorQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TCP of one local user's processes leaves with another source address while this
/// lives (an iptables owner match marks it, SNAT rewrites it; removed on drop): on this
/// one machine, a lab host's qemus reach Ceph from an address of their own, as a
/// hypervisor's do, so that a blocklist can name them alone.
pub struct SourceAddress {
    chain: String,
}

impl SourceAddress {
    /// `user`'s TCP leaves from `addr` (a 127/8 address: every one is local).
    pub fn for_user(user: &str, addr: &str) -> SourceAddress {
        let chain = format!("defib-src-{}", addr.replace('.', "-"));
        let this = SourceAddress { chain };
        this.remove();
        let mark = "0x4cef";
        let ipt = |args: &[&str]| {
            let out = Command::new("iptables")
                .args(args)
                .output()
                .expect("iptables");
            assert!(
                out.status.success(),
                "iptables {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let chain = this.chain.as_str();
        ipt(&["-t", "mangle", "-N", chain]);
        ipt(&["-t", "mangle", "-A", "OUTPUT", "-j", chain]);
        ipt(&[
            "-t",
            "mangle",
            "-A",
            chain,
            "-p",
            "tcp",
            "-m",
            "owner",
            "--uid-owner",
            user,
            "-j",
            "MARK",
            "--set-mark",
            mark,
        ]);
        ipt(&["-t", "nat", "-N", chain]);
        ipt(&["-t", "nat", "-A", "POSTROUTING", "-j", chain]);
        ipt(&[
            "-t",
            "nat",
            "-A",
            chain,
            "-m",
            "mark",
            "--mark",
            mark,
            "-j",
            "SNAT",
            "--to-source",
            addr,
        ]);
        this
    }

    fn remove(&self) {
        for (table, hook) in [("mangle", "OUTPUT"), ("nat", "POSTROUTING")] {
            let ipt = |args: &[&str]| {
                let _ = Command::new("iptables").args(args).output();
            };
            ipt(&["-t", table, "-D", hook, "-j", &self.chain]);
            ipt(&["-t", table, "-F", &self.chain]);
            ipt(&["-t", table, "-X", &self.chain]);
        }
    }
}

impl Drop for SourceAddress {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A wrapper script in `dir` that runs `program` (`ceph`, `rbd`) in this process's network
/// namespace, where the Ceph test bed listens: for a lab controller, which runs in a
/// namespace of its own. Returns its path.
pub fn cli_in_this_netns(dir: &Path, program: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(format!("{program}-in-test-netns"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec nsenter --net=/proc/{}/ns/net -- {program} \"$@\"\n",
            std::process::id()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

/// The lab of tests/tests/ceph_fence.rs and its bench: two hosts on the libvirt backend,
/// h0 the hostbed's system libvirt (whose qemus reach Ceph from `h0_ceph_addr`), h1 the
/// hypervisor `h1`; h0's fence levels are an ipmi level at an address nothing answers,
/// then the `ceph-blocklist` level counting alone, whose Ceph CLI runs in this process's
/// network namespace through wrappers written to `dir`.
pub fn blocklist_alone_lab(
    ceph: &Cephbed,
    h1: &crate::hypervisor::Hypervisor,
    h0_ceph_addr: &str,
    dir: &Path,
) -> crate::lab::LabSpec {
    let (ceph_bin, rbd_bin) = (
        cli_in_this_netns(dir, "ceph"),
        cli_in_this_netns(dir, "rbd"),
    );
    let controller_extra = format!(
        r#"[engine]
fence_on_unknown_after_ms = 3000
fence_retry_backoff_ms = 1000

[fence]
verify_timeout_ms = 10000
verify_poll_ms = 50

[[fence.host]]
name = "h0"
levels = [
  {{ method = "ipmi", address = "{bmc}", port = 9623, username = "admin", password_file = "{{DIR}}/bmc.pass", timeout_ms = 1000, attempts = 1 }},
  {{ method = "ceph-blocklist", addresses = ["{h0_ceph_addr}"], pools = ["{POOL}"], counts = "alone", conf = {conf:?}, ceph = {ceph_bin:?}, rbd = {rbd_bin:?} }},
]
"#,
        bmc = crate::netns::bmc_address(0),
        conf = ceph.conf().display().to_string(),
    );
    let (hv_uri, hv_pids) = (h1.uri(), h1.pid_dir().display().to_string());
    crate::lab::LabSpec {
        hosts: 2,
        backend: "libvirt",
        controller_extra,
        watchdog_extra: crate::lab::system_and_own_libvirt(hv_uri, hv_pids),
        bmc_network: true,
    }
}
