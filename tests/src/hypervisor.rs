//! A second, independent libvirt on this machine: its own `libvirtd` in its own mount
//! namespace, where `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt`
//! and `/var/cache/libvirt` are directories of its own. It has its own domains, its own
//! qemu pid files and its own socket, so a lab host that uses it is a hypervisor of its
//! own, beside the hostbed's system libvirt, sharing only the kernel and the file system
//! (which is the shared storage an evacuation needs).
//!
//! It runs under the project's child subreaper (the qemu processes it starts daemonize and
//! stay in its tree) and is stopped by PID on drop, after its domains are destroyed.
//!
//! Options ([`HypervisorOptions`]):
//! - `disk_leases`: libvirt's lock manager, as a cluster that evacuates without Nova
//!   should run it: qemu.conf `lock_manager = "lockd"`, qemu-lockd.conf
//!   `auto_disk_leases = 1`, `require_lease_for_disks = 1` and `file_lockspace_dir` =
//!   [`LOCKSPACE`] (indirect leases: one lock file per disk path, on the storage every
//!   instance shares), served by a `virtlockd` of its own in the same namespace (libvirtd
//!   does not start one by itself without systemd). virtlockd is started first, before
//!   libvirtd, and stopped by PID after it. A second start of a disk another instance's
//!   guest holds is then refused: `resource busy: Lockspace resource '…' is locked`.
//! - `slow_start_hook`: a qemu hook (`/etc/libvirt/hooks/qemu` of this instance) that
//!   sleeps in the `prepare` phase of a domain's start for as long as
//!   [`Hypervisor::slow_start`] said, so a test can catch a start in flight. While it
//!   sleeps, libvirt lists the domain active ("paused, starting up").
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::guests::run_virsh;

/// Where the instances keep their directories.
const BASE: &str = "/run/defib-hv";

/// The disk leases' lockspace, shared by every instance with `disk_leases` (a lease is a
/// file named after the SHA-256 of the disk's path, locked by the virtlockd of the
/// instance whose guest holds it).
pub const LOCKSPACE: &str = "/run/defib-hv/lockspace";

/// What an instance runs besides libvirtd (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct HypervisorOptions {
    /// libvirt's lock manager with a virtlockd of its own and a lease on every disk.
    pub disk_leases: bool,
    /// A qemu hook that can make a domain's start slow ([`Hypervisor::slow_start`]).
    pub slow_start_hook: bool,
    /// Its qemus run as root instead of the system instance's qemu user: another user
    /// on the wire, e.g. to give them another source address than the system
    /// instance's qemus (an iptables owner match, tests/tests/ceph_fence.rs).
    pub qemu_as_root: bool,
    /// Its libvirtd runs in a UTS namespace of its own with this host name, which is the
    /// name libvirt reports (`virConnectGetHostname`): Nova's libvirt driver takes it for
    /// its node, whose Placement resource provider must be unique, so two computes on
    /// one machine need two names.
    pub hostname: Option<String>,
}

/// A running second libvirt (see the module docs).
pub struct Hypervisor {
    name: String,
    root: PathBuf,
    child: Option<Child>,
    /// Its virtlockd, if it runs one.
    virtlockd: Option<u32>,
    options: HypervisorOptions,
}

impl Hypervisor {
    /// Starts the instance `name` and waits until it answers.
    pub fn start(name: &str) -> Result<Hypervisor, String> {
        Hypervisor::start_with(name, &HypervisorOptions::default())
    }

    /// Starts the instance `name` with `options` and waits until it answers.
    pub fn start_with(name: &str, options: &HypervisorOptions) -> Result<Hypervisor, String> {
        let name = format!("{name}-{}", crate::tag());
        let root = Path::new(BASE).join(&name);
        let _ = std::fs::remove_dir_all(&root);
        for d in ["etc/qemu", "etc/hooks", "run", "lib", "log", "cache"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| format!("{d}: {e}"))?;
        }
        // The system instance's daemon settings, but none of its domains, networks or
        // pools; no virtlogd (qemu writes its log files itself).
        if let Ok(entries) = std::fs::read_dir("/etc/libvirt") {
            for e in entries.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    let _ = std::fs::copy(e.path(), root.join("etc").join(e.file_name()));
                }
            }
        }
        let qemu_conf = root.join("etc/qemu.conf");
        let mut conf = std::fs::read_to_string(&qemu_conf).unwrap_or_default();
        // No virtlogd in this instance. No remembered owners: the labels libvirt keeps in
        // xattrs on shared files (a guest's disk and serial log, which another instance
        // used last) would make a start right after an evacuation fail with "already in
        // use" until that instance has restored them.
        conf.push_str("\n# defib test hypervisor\nstdio_handler = \"file\"\nremember_owner = 0\n");
        if options.qemu_as_root {
            conf.push_str("user = \"root\"\ngroup = \"root\"\n");
        }
        if options.disk_leases {
            conf.push_str("lock_manager = \"lockd\"\n");
            let lockd_conf = root.join("etc/qemu-lockd.conf");
            let mut lockd = std::fs::read_to_string(&lockd_conf).unwrap_or_default();
            lockd.push_str(&format!(
                "\n# defib test hypervisor\nauto_disk_leases = 1\nrequire_lease_for_disks = 1\n\
                 file_lockspace_dir = \"{LOCKSPACE}\"\n"
            ));
            std::fs::write(&lockd_conf, lockd).map_err(|e| format!("qemu-lockd.conf: {e}"))?;
            std::fs::create_dir_all(LOCKSPACE).map_err(|e| format!("{LOCKSPACE}: {e}"))?;
        }
        std::fs::write(&qemu_conf, conf).map_err(|e| format!("qemu.conf: {e}"))?;
        if options.slow_start_hook {
            // libvirtd looks for hooks once, at start: the script must be there first.
            write_hook(&root)?;
        }

        let mut hv = Hypervisor {
            name,
            root,
            child: None,
            virtlockd: None,
            options: options.clone(),
        };
        hv.spawn()?;
        Ok(hv)
    }

    /// Starts its `libvirtd` as a host's boot does, after the daemon was stopped (or
    /// killed, e.g. by a lab BMC's power-off): `/run/libvirt` is empty again, so libvirt
    /// starts every domain whose autostart is on. Waits until it answers.
    pub fn boot_again(&mut self) -> Result<(), String> {
        if let Some(mut child) = self.child.take() {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                crate::stop_child(&mut child, Duration::from_secs(15));
            }
        }
        if let Some(pid) = self.virtlockd.take() {
            stop_pid(pid, "virtlockd", Duration::from_secs(10));
        }
        let run = self.root.join("run");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).map_err(|e| format!("run: {e}"))?;
        let _ = std::fs::remove_file(self.root.join("virtlockd.pid"));
        self.spawn()
    }

    /// The pid its `libvirtd` wrote (a lab BMC's power-off stops it by this).
    pub fn daemon_pid_file(&self) -> PathBuf {
        self.root.join("libvirtd.pid")
    }

    /// Starts `libvirtd` (and its virtlockd, with `disk_leases`) in its own mount
    /// namespace and waits until it answers.
    fn spawn(&mut self) -> Result<(), String> {
        let (name, root, options) = (self.name.clone(), self.root.clone(), self.options.clone());
        let r = root.display().to_string();
        // virtlockd first (libvirtd asks it at each domain start), in the background of
        // this shell, its pid recorded for the stop; then libvirtd in the shell's place.
        // Its pid file goes in this instance's /run/libvirt: the default, /run/virtlockd.pid,
        // is every instance's, and a second virtlockd would find it locked.
        let virtlockd = if options.disk_leases {
            format!(
                "/usr/sbin/virtlockd --pid-file /run/libvirt/virtlockd.pid > {r}/virtlockd.log 2>&1 &
echo $! > {r}/virtlockd.pid
n=0
until [ -S /run/libvirt/virtlockd-sock ]; do
  n=$((n+1)); [ $n -gt 200 ] && {{ echo virtlockd did not start:; cat {r}/virtlockd.log; exit 1; }}
  sleep 0.05
done
"
            )
        } else {
            String::new()
        };
        let hostname = match &options.hostname {
            Some(h) => format!("hostname {h}\n"),
            None => String::new(),
        };
        let script = format!(
            "set -e
{hostname}mount --bind {r}/etc /etc/libvirt
mount --bind {r}/run /run/libvirt
mount --bind {r}/lib /var/lib/libvirt
mount --bind {r}/log /var/log/libvirt
mount --bind {r}/cache /var/cache/libvirt
{virtlockd}exec /usr/sbin/libvirtd --pid-file {r}/libvirtd.pid"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("libvirtd.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new(crate::built_binary("defib-tests", "defib-subreaper"))
            .arg("--child-pidfile")
            .arg(root.join("child.pid"))
            .arg("--")
            .args(["unshare", "--mount"])
            .args(options.hostname.as_ref().map(|_| "--uts"))
            .args(["--propagation", "private", "--", "sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting libvirtd {name}: {e}"))?;
        let hv = self;
        hv.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if options.disk_leases && hv.virtlockd.is_none() {
                hv.virtlockd = std::fs::read_to_string(hv.root.join("virtlockd.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
            }
            if hv.virsh(&["version"], Duration::from_secs(5)).is_ok()
                && (!options.disk_leases || hv.virtlockd.is_some())
            {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = hv.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "libvirtd {} exited with {status}: {}",
                    hv.name,
                    hv.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "libvirtd {} does not answer after 30 s: {}",
                    hv.name,
                    hv.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its URI (the system driver, through this instance's socket).
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.root.join("run/libvirt-sock").display()
        )
    }

    /// Its directory (configuration, sockets, state, logs); removed on drop.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where its qemu driver writes `NAME.pid`.
    pub fn pid_dir(&self) -> PathBuf {
        self.root.join("run/qemu")
    }

    /// The qemu pid of its running domain `name`, if it runs.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.pid_dir().join(format!("{name}.pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// `virsh -c URI ARGS` against this instance.
    pub fn virsh(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        run_virsh(&self.uri(), args, timeout)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("libvirtd.log")).unwrap_or_default()
    }

    /// Its virtlockd's pid, if it runs one (`disk_leases`).
    pub fn virtlockd_pid(&self) -> Option<u32> {
        self.virtlockd
    }

    /// Where its virtlockd writes its pid (the watchdog's `disk_leases.pid_file`).
    pub fn virtlockd_pid_file(&self) -> PathBuf {
        self.root.join("run/virtlockd.pid")
    }

    /// Its libvirt lock manager's configuration (`disk_leases.lockd_conf`).
    pub fn lockd_conf(&self) -> PathBuf {
        self.root.join("etc/qemu-lockd.conf")
    }

    /// Kills its virtlockd alone (SIGKILL), as a crash would, and waits until it is gone;
    /// libvirtd and the guests run on.
    pub fn kill_virtlockd(&mut self) -> u32 {
        let pid = self
            .virtlockd
            .take()
            .expect("a hypervisor with disk leases");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        stop_pid(pid, "virtlockd", Duration::from_secs(10));
        pid
    }

    /// Starts a virtlockd again in its namespace, as an init system would after a crash
    /// (the running guests' leases are not taken again by it), and waits for its socket.
    pub fn start_virtlockd_again(&mut self) -> Result<u32, String> {
        let libvirtd: u32 = std::fs::read_to_string(self.root.join("libvirtd.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or("no libvirtd pid")?;
        let r = self.root.display();
        let script = format!(
            "/usr/sbin/virtlockd --pid-file /run/libvirt/virtlockd.pid >> {r}/virtlockd.log 2>&1 &
pid=$!
echo $pid > {r}/virtlockd.pid
n=0
until [ \"$(cat /run/libvirt/virtlockd.pid 2>/dev/null)\" = \"$pid\" ] && [ -S /run/libvirt/virtlockd-sock ]; do
  n=$((n+1)); [ $n -gt 200 ] && {{ echo virtlockd did not start; exit 1; }}
  sleep 0.05
done"
        );
        let out = Command::new("nsenter")
            .args(["-t", &libvirtd.to_string(), "-m", "--", "sh", "-c", &script])
            .output()
            .map_err(|e| format!("nsenter: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "starting virtlockd again: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let pid: u32 = std::fs::read_to_string(self.root.join("virtlockd.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or("no virtlockd pid")?;
        self.virtlockd = Some(pid);
        Ok(pid)
    }

    /// The next starts of domain `name` sleep `delay` in the hook's `prepare` phase
    /// (needs `slow_start_hook`); [`Duration::ZERO`] makes them quick again.
    pub fn slow_start(&self, name: &str, delay: Duration) {
        let file = self.root.join("slow-start").join(name);
        if delay.is_zero() {
            let _ = std::fs::remove_file(file);
        } else {
            std::fs::create_dir_all(self.root.join("slow-start")).expect("slow-start dir");
            std::fs::write(file, format!("{:.3}\n", delay.as_secs_f64())).expect("slow-start");
        }
    }

    /// What the slow-start hook did, one line per call: `<unix time> <domain>
    /// <operation> <sub-operation>`, and `<unix time> <domain> slept` after a sleep.
    pub fn hook_log(&self) -> String {
        std::fs::read_to_string(self.root.join("hook.log")).unwrap_or_default()
    }
}

/// Writes the slow-start hook into `root`'s configuration (see the module docs).
fn write_hook(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let r = root.display();
    // libvirt calls it as `qemu DOMAIN OPERATION SUB-OPERATION EXTRA` with the domain's
    // XML on stdin; a failing prepare hook would fail the start, so it always exits 0.
    let hook = format!(
        "#!/bin/sh
cat > /dev/null
echo \"$(date +%s.%N) $1 $2 $3\" >> {r}/hook.log
if [ \"$2\" = prepare ] && [ -f \"{r}/slow-start/$1\" ]; then
  sleep \"$(cat \"{r}/slow-start/$1\")\"
  echo \"$(date +%s.%N) $1 slept\" >> {r}/hook.log
fi
exit 0
"
    );
    let path = root.join("etc/hooks/qemu");
    std::fs::write(&path, hook).map_err(|e| format!("hook: {e}"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("hook: {e}"))
}

/// `defib-qemu-nolock` (tests/src/bin/qemu-nolock.rs), copied where libvirt's qemu user
/// can run it, for a domain's `<emulator>`: qemu without its own image locks, so that
/// only libvirt's lock manager guards a disk (as between hosts whose shared file system
/// does not carry qemu's locks).
pub fn qemu_without_image_locks() -> PathBuf {
    static LOCK: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);
    let mut done = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = done.as_ref() {
        return p.clone();
    }
    let dir = Path::new(BASE).join("bin");
    std::fs::create_dir_all(&dir).expect("create the hypervisors' bin dir");
    let exe = dir.join("defib-qemu-nolock");
    // Copied under a name of this process's, then renamed: a qemu being started from the
    // old copy by another test keeps running it.
    let tmp = dir.join(format!(".defib-qemu-nolock.{}", std::process::id()));
    std::fs::copy(
        crate::built_binary("defib-tests", "defib-qemu-nolock"),
        &tmp,
    )
    .expect("copy defib-qemu-nolock");
    std::fs::rename(&tmp, &exe).expect("rename defib-qemu-nolock");
    *done = Some(exe.clone());
    exe
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        // Its domains first (their qemu processes would outlive the daemon), then it.
        if let Ok(names) = self.virsh(&["list", "--all", "--name"], Duration::from_secs(10)) {
            for n in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
                let _ = self.virsh(&["destroy", n], Duration::from_secs(30));
                let _ = self.virsh(&["undefine", n], Duration::from_secs(30));
            }
        }
        if let Some(mut child) = self.child.take() {
            if !crate::stop_child(&mut child, Duration::from_secs(15)) {
                eprintln!("libvirtd {} did not stop on SIGTERM; killed", self.name);
            }
        }
        // Its virtlockd outlives the subreaper (an orphan of the shell that started it).
        if let Some(pid) = self.virtlockd.take() {
            stop_pid(pid, "virtlockd", Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// SIGTERM to `pid` if it still runs `program`, SIGKILL after `grace`; waits until it is
/// gone.
fn stop_pid(pid: u32, program: &str, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    let runs = || {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(program));
        !zombie && ours
    };
    let target = nix::unistd::Pid::from_raw(pid as i32);
    if !runs() {
        return;
    }
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while runs() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if runs() {
        eprintln!("{program} {pid} did not stop on SIGTERM; killed");
        let _ = kill(target, Signal::SIGKILL);
    }
}
