//! A second, independent libvirt on this machine: its own `libvirtd` in its own mount
//! namespace, where `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt`
//! and `/var/cache/libvirt` are directories of its own. It has its own domains, its own
//! qemu pid files and its own socket, so a lab host that uses it is a hypervisor of its
//! own, beside the hostbed's system libvirt, sharing only the kernel and the file system
//! (which is the shared storage an evacuation needs).
//!
//! It runs under the project's child subreaper (the qemu processes it starts daemonize and
//! stay in its tree) and is stopped by PID on drop, after its domains are destroyed.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::guests::run_virsh;

/// Where the instances keep their directories.
const BASE: &str = "/run/defib-hv";

/// A running second libvirt (see the module docs).
pub struct Hypervisor {
    name: String,
    root: PathBuf,
    child: Option<Child>,
}

impl Hypervisor {
    /// Starts the instance `name` and waits until it answers.
    pub fn start(name: &str) -> Result<Hypervisor, String> {
        let name = format!("{name}-{}", crate::tag());
        let root = Path::new(BASE).join(&name);
        let _ = std::fs::remove_dir_all(&root);
        for d in ["etc/qemu", "run", "lib", "log", "cache"] {
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
        std::fs::write(&qemu_conf, conf).map_err(|e| format!("qemu.conf: {e}"))?;
        let mut hv = Hypervisor {
            name,
            root,
            child: None,
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
        let run = self.root.join("run");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).map_err(|e| format!("run: {e}"))?;
        self.spawn()
    }

    /// The pid its `libvirtd` wrote (a lab BMC's power-off stops it by this).
    pub fn daemon_pid_file(&self) -> PathBuf {
        self.root.join("libvirtd.pid")
    }

    /// Starts `libvirtd` in its own mount namespace and waits until it answers.
    fn spawn(&mut self) -> Result<(), String> {
        let (name, root) = (&self.name, &self.root);
        let r = root.display().to_string();
        let script = format!(
            "set -e
mount --bind {r}/etc /etc/libvirt
mount --bind {r}/run /run/libvirt
mount --bind {r}/lib /var/lib/libvirt
mount --bind {r}/log /var/log/libvirt
mount --bind {r}/cache /var/cache/libvirt
exec /usr/sbin/libvirtd --pid-file {r}/libvirtd.pid"
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
            .args([
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
            ])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting libvirtd {name}: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.virsh(&["version"], Duration::from_secs(5)).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "libvirtd {} exited with {status}: {}",
                    self.name,
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "libvirtd {} does not answer after 30 s: {}",
                    self.name,
                    self.log()
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
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
