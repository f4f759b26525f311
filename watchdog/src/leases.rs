//! The host's disk leases (libvirt's lockd): whether the lease daemon (virtlockd) runs,
//! and whether it holds the lease of every writable disk of every running VM. Read from
//! its pid file, /proc and /proc/locks; its exit is seen at once by the probes (the
//! `SERVICES` map), like a qemu's.
//!
//! Why: when virtlockd alone dies, its leases go with it and the qemus run on; another
//! host may then start the same disk and two VMs write it (measured in
//! `../shared/testbed/virtlockd`). A virtlockd started again holds none of the running
//! VMs' leases (libvirt takes a lease only when it starts a guest's vCPUs), so the VMs
//! stay unprotected until they are started again; the lock file of each is read here, not
//! assumed.
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::clock::{mono_to_unix_ms, monotonic_ns};
use crate::config::DiskLeasesConfig;
use crate::events::{LibvirtVm, WatchdogEvent};
use crate::procfs::{self, VmIdentity};
use crate::records::comm_str;

/// A running VM's disks that libvirt leases: every writable disk with a local path (a
/// network disk gets no lease; a read-only one is not locked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasedVm {
    pub vm: VmIdentity,
    pub disks: Vec<String>,
}

/// The VMs whose leases are judged: those libvirt runs now (a paused guest has released
/// its leases by design, and a starting one has none yet), with their leased disks.
pub fn leased_vms(vms: &[LibvirtVm]) -> Vec<LeasedVm> {
    vms.iter()
        .filter(|v| matches!(v.state.as_str(), "running" | "blocked" | "in shutdown"))
        .map(|v| LeasedVm {
            vm: v.identity(),
            disks: v
                .disks
                .iter()
                .filter(|d| !d.readonly && d.device != "cdrom")
                .filter_map(|d| d.source.clone())
                .filter(|s| s.starts_with('/'))
                .collect(),
        })
        .filter(|v| !v.disks.is_empty())
        .collect()
}

/// `file_lockspace_dir` from libvirt's `qemu-lockd.conf` text (`key = "value"`, `#`
/// comments); `None`: leases are locks on the disks themselves.
pub fn lockspace_dir(conf: &str) -> Option<PathBuf> {
    conf.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == "file_lockspace_dir")
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .rfind(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The file the daemon locks for `disk`: `<lockspace>/<SHA-256 of the path>` with a
/// lockspace, else the disk itself.
pub fn lease_file(disk: &str, lockspace: Option<&Path>) -> PathBuf {
    match lockspace {
        Some(dir) => {
            let digest = sha2::Sha256::digest(disk.as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            dir.join(hex)
        }
        None => PathBuf::from(disk),
    }
}

/// A file as /proc/locks names it: (major, minor, inode) of its file system's device.
pub type LockedFile = (u32, u32, u64);

/// The files `pid` holds a POSIX lock on (read or write), from /proc/locks text. Lines
/// of waiters (`->`) are not locks held.
pub fn locks_of(proc_locks: &str, pid: u32) -> HashSet<LockedFile> {
    let mut out = HashSet::new();
    for line in proc_locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: POSIX  ADVISORY  WRITE 8221 fe:00:10011316 0 EOF"
        let [_, kind, _, _, holder, file, ..] = fields.as_slice() else {
            continue;
        };
        if *kind != "POSIX" || holder.parse::<u32>().ok() != Some(pid) {
            continue;
        }
        let mut parts = file.split(':');
        let (Some(major), Some(minor), Some(inode), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(major), Ok(minor), Ok(inode)) = (
            u32::from_str_radix(major, 16),
            u32::from_str_radix(minor, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        out.insert((major, minor, inode));
    }
    out
}

/// `path`'s file as /proc/locks names it.
fn locked_file_of(path: &Path) -> Option<LockedFile> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let dev = meta.dev();
    // glibc's gnu_dev_major / gnu_dev_minor.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Some((major as u32, minor as u32, meta.ino()))
}

/// What the watch last said (or will say): the daemon's pid and the VMs without leases.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Word {
    daemon_pid: Option<u32>,
    unprotected: BTreeSet<VmIdentity>,
}

/// The lease watch of one host (see the module docs). The monitor owns it.
pub struct LeaseWatch {
    cfg: DiskLeasesConfig,
    proc_root: PathBuf,
    /// The daemon's pid while it is taken to run.
    daemon: Option<u32>,
    /// Why the daemon is down, from its exit record: said with the next word.
    exit_reason: Option<String>,
    /// VMs found without their leases at the last check: a VM counts only when two
    /// checks in a row find it so (a lease is released a moment before libvirt lists the
    /// guest as gone, and taken a moment after it lists it as running).
    unleased_once: BTreeSet<VmIdentity>,
    said: Option<Word>,
}

impl LeaseWatch {
    pub fn new(cfg: DiskLeasesConfig) -> Self {
        Self::with_proc_root(cfg, PathBuf::from("/proc"))
    }

    pub fn with_proc_root(cfg: DiskLeasesConfig, proc_root: PathBuf) -> Self {
        LeaseWatch {
            cfg,
            proc_root,
            daemon: None,
            exit_reason: None,
            unleased_once: BTreeSet::new(),
            said: None,
        }
    }

    /// Whether `pid` is the lease daemon taken to run.
    pub fn is_daemon(&self, pid: u32) -> bool {
        self.daemon == Some(pid)
    }

    /// The daemon's pid from its pid file, if that process runs under the daemon's name.
    fn running_daemon(&self) -> Option<u32> {
        let text = std::fs::read_to_string(&self.cfg.pid_file).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        let comm = procfs::read_comm(&self.proc_root, pid)?;
        (comm_str(&comm) == self.cfg.process_name && !procfs::is_zombie(&self.proc_root, pid))
            .then_some(pid)
    }

    /// The daemon exited (its exit record): every running VM is unprotected now.
    pub fn daemon_exited(&mut self, how: String, vms: &[LeasedVm]) -> Option<WatchdogEvent> {
        let pid = self.daemon.take()?;
        let reason = format!("{} pid {pid} {how}", self.cfg.process_name);
        tracing::error!(%reason, vms = vms.len(), "the disk-lease daemon is gone: this host's VMs run without their leases");
        self.exit_reason = Some(reason);
        let unprotected = vms.iter().map(|v| v.vm.clone()).collect();
        self.say(None, unprotected)
    }

    /// Reads the pid file and the leases. `watch` makes the probes see a daemon's exit
    /// (false when it cannot: the next check finds it gone). Returns a word when it
    /// differs from the last one said.
    pub fn check(
        &mut self,
        vms: &[LeasedVm],
        watch: &mut dyn FnMut(u32) -> bool,
    ) -> Option<WatchdogEvent> {
        let running = self.running_daemon();
        if running != self.daemon {
            match running {
                Some(pid) => {
                    if !watch(pid) {
                        tracing::warn!(
                            pid,
                            "cannot watch the disk-lease daemon's exit; it is read every check"
                        );
                    }
                    tracing::info!(pid, "disk-lease daemon running");
                    self.exit_reason = None;
                }
                None => {
                    let gone = self
                        .daemon
                        .map(|p| format!("{} pid {p} is gone", self.cfg.process_name));
                    self.exit_reason = gone.or_else(|| {
                        Some(format!(
                            "{} is not running (pid file {})",
                            self.cfg.process_name,
                            self.cfg.pid_file.display()
                        ))
                    });
                }
            }
            self.daemon = running;
        }
        let unleased: BTreeSet<VmIdentity> = match self.daemon {
            None => vms.iter().map(|v| v.vm.clone()).collect(),
            Some(pid) => {
                let held = std::fs::read_to_string(self.proc_root.join("locks"))
                    .map(|t| locks_of(&t, pid))
                    .unwrap_or_default();
                let conf = std::fs::read_to_string(&self.cfg.lockd_conf).unwrap_or_default();
                let lockspace = lockspace_dir(&conf);
                let seen = vms
                    .iter()
                    .filter(|v| {
                        !v.disks.iter().all(|d| {
                            locked_file_of(&lease_file(d, lockspace.as_deref()))
                                .is_some_and(|f| held.contains(&f))
                        })
                    })
                    .map(|v| v.vm.clone())
                    .collect::<BTreeSet<_>>();
                let twice = seen.intersection(&self.unleased_once).cloned().collect();
                self.unleased_once = seen;
                twice
            }
        };
        self.say(self.daemon, unleased)
    }

    /// The last word again, stamped now: sent with every libvirt inventory, so that a
    /// controller that lost it (a new leader, a pruned event table, a full spool) has
    /// it again as soon as it has the host's VMs.
    pub fn repeat(&mut self) -> Option<WatchdogEvent> {
        let word = self.said.take()?;
        self.say(word.daemon_pid, word.unprotected)
    }

    fn say(
        &mut self,
        daemon_pid: Option<u32>,
        unprotected: BTreeSet<VmIdentity>,
    ) -> Option<WatchdogEvent> {
        let word = Word {
            daemon_pid,
            unprotected,
        };
        if self.said.as_ref() == Some(&word) {
            return None;
        }
        let name = &self.cfg.process_name;
        let reason = match (daemon_pid, word.unprotected.len()) {
            (None, _) => self
                .exit_reason
                .clone()
                .unwrap_or_else(|| format!("{name} is not running")),
            (Some(pid), 0) => format!("{name} pid {pid} holds the lease of every running VM"),
            (Some(pid), n) => format!(
                "{name} pid {pid} runs, but {n} running VMs hold no lease on their disks (a \
                 restarted {name} holds none of the guests it did not start)"
            ),
        };
        let observed_ns = monotonic_ns();
        let event = WatchdogEvent::DiskLeases {
            daemon_pid,
            unprotected: word.unprotected.iter().cloned().collect(),
            reason,
            observed_ns,
            unix_ms: mono_to_unix_ms(observed_ns),
        };
        self.said = Some(word);
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::LibvirtDisk;

    fn disk(source: &str, device: &str, readonly: bool) -> LibvirtDisk {
        LibvirtDisk {
            target: "vda".into(),
            device: device.into(),
            source: Some(source.into()),
            backing: vec!["/base/image".into()],
            readonly,
        }
    }

    fn vm(name: &str, state: &str, disks: Vec<LibvirtDisk>) -> LibvirtVm {
        LibvirtVm {
            uuid: format!("u-{name}"),
            name: name.into(),
            state: state.into(),
            reason: String::new(),
            pid: Some(1),
            disks,
            definition: None,
        }
    }

    #[test]
    fn only_running_vms_writable_local_disks_are_leased_and_not_their_backing_files() {
        let vms = [
            vm(
                "a",
                "running",
                vec![
                    disk("/images/a.qcow2", "disk", false),
                    disk("/images/seed.iso", "cdrom", true),
                    disk("/images/ro.img", "disk", true),
                    disk("rbd:volumes/v1", "disk", false),
                ],
            ),
            vm("b", "paused", vec![disk("/images/b.qcow2", "disk", false)]),
            vm("c", "running", vec![disk("rbd:volumes/v2", "disk", false)]),
            vm("d", "shutoff", vec![disk("/images/d.qcow2", "disk", false)]),
        ];
        let leased = leased_vms(&vms);
        assert_eq!(leased.len(), 1, "{leased:?}");
        assert_eq!(leased[0].vm.name.as_deref(), Some("a"));
        assert_eq!(leased[0].disks, vec!["/images/a.qcow2".to_string()]);
    }

    #[test]
    fn the_lockspace_comes_from_qemu_lockd_conf_and_names_leases_by_the_paths_sha256() {
        let conf = "# file_lockspace_dir = \"/commented\"\nauto_disk_leases = 1\n\
                    file_lockspace_dir = \"/var/lib/libvirt/lockd/files\"  # indirect\n";
        let dir = lockspace_dir(conf).unwrap();
        assert_eq!(dir, PathBuf::from("/var/lib/libvirt/lockd/files"));
        assert_eq!(lockspace_dir("auto_disk_leases = 1\n"), None);
        // The test bed's measured name for this path (../shared/testbed/virtlockd).
        assert_eq!(
            lease_file("/tmp/vlk/shared/images/vm1.qcow2", Some(Path::new("/ls"))),
            PathBuf::from("/ls/1135d2d71f9c711e49d87cc224643a23d4cb46f50e3a5c7444b6444fcc19f0b3")
        );
        assert_eq!(lease_file("/img", None), PathBuf::from("/img"));
    }

    #[test]
    fn proc_locks_gives_the_files_a_pid_holds_not_those_it_waits_for_or_anothers() {
        let text = "1: POSIX  ADVISORY  WRITE 8221 fe:00:10011245 0 0\n\
                    2: OFDLCK ADVISORY  WRITE -1 fe:00:99 0 EOF\n\
                    2: -> POSIX  ADVISORY  WRITE 8221 fe:00:55 0 0\n\
                    3: POSIX  ADVISORY  READ 8221 103:0a:77 0 EOF\n\
                    4: POSIX  ADVISORY  WRITE 9000 fe:00:66 0 0\n\
                    garbage\n";
        let held = locks_of(text, 8221);
        assert_eq!(
            held,
            HashSet::from([(0xfe, 0, 10011245), (0x103, 0x0a, 77)])
        );
    }

    fn config(dir: &Path) -> DiskLeasesConfig {
        DiskLeasesConfig {
            enabled: true,
            pid_file: dir.join("virtlockd.pid"),
            lockd_conf: dir.join("qemu-lockd.conf"),
            ..DiskLeasesConfig::default()
        }
    }

    #[test]
    fn a_dead_daemon_leaves_every_running_vm_unprotected_and_says_it_once() {
        let dir = tempfile::tempdir().unwrap();
        // A pid file naming a process that does not run under the daemon's name.
        std::fs::write(dir.path().join("virtlockd.pid"), "4000000\n").unwrap();
        let mut watch = LeaseWatch::new(config(dir.path()));
        let vms = leased_vms(&[vm("a", "running", vec![disk("/i/a", "disk", false)])]);
        let mut never = |_| panic!("no daemon to watch");
        match watch.check(&vms, &mut never) {
            Some(WatchdogEvent::DiskLeases {
                daemon_pid: None,
                unprotected,
                reason,
                ..
            }) => {
                assert_eq!(unprotected.len(), 1);
                assert!(reason.contains("not running"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(watch.check(&vms, &mut never), None, "said once");
        assert!(
            matches!(
                watch.repeat(),
                Some(WatchdogEvent::DiskLeases {
                    daemon_pid: None,
                    ..
                })
            ),
            "and again when asked"
        );
    }

    #[test]
    fn a_running_daemon_holding_every_lease_protects_the_host_and_its_exit_unprotects_it() {
        let dir = tempfile::tempdir().unwrap();
        let lockspace = dir.path().join("lockspace");
        std::fs::create_dir(&lockspace).unwrap();
        std::fs::write(
            dir.path().join("qemu-lockd.conf"),
            format!("file_lockspace_dir = \"{}\"\n", lockspace.display()),
        )
        .unwrap();
        // This test process plays the daemon: its own lock on the lease file.
        let me = std::process::id();
        let comm = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        std::fs::write(dir.path().join("virtlockd.pid"), format!("{me}\n")).unwrap();
        let cfg = DiskLeasesConfig {
            process_name: comm.trim().to_string(),
            ..config(dir.path())
        };
        let lease = lease_file("/i/a", Some(&lockspace));
        let file = std::fs::File::create(&lease).unwrap();
        let vms = leased_vms(&[vm("a", "running", vec![disk("/i/a", "disk", false)])]);
        let mut watch = LeaseWatch::new(cfg);
        let mut watched = Vec::new();
        let mut record = |pid| {
            watched.push(pid);
            true
        };
        // Without the lock: the first check does not count it yet, the second does.
        assert!(matches!(
            watch.check(&vms, &mut record),
            Some(WatchdogEvent::DiskLeases { daemon_pid: Some(p), ref unprotected, .. }) if p == me && unprotected.is_empty()
        ));
        match watch.check(&vms, &mut record) {
            Some(WatchdogEvent::DiskLeases { unprotected, .. }) => {
                assert_eq!(unprotected.len(), 1)
            }
            other => panic!("{other:?}"),
        }
        // Still without it: nothing new to say.
        assert_eq!(watch.check(&vms, &mut record), None);
        posix_write_lock(&file);
        match watch.check(&vms, &mut record) {
            Some(WatchdogEvent::DiskLeases { unprotected, .. }) => {
                assert!(unprotected.is_empty(), "{unprotected:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(watched, vec![me], "the daemon is watched once");
        assert!(watch.is_daemon(me));
        match watch.daemon_exited("killed by SIGKILL".into(), &vms) {
            Some(WatchdogEvent::DiskLeases {
                daemon_pid: None,
                unprotected,
                reason,
                ..
            }) => {
                assert_eq!(unprotected.len(), 1);
                assert!(reason.contains("killed by SIGKILL"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A POSIX write lock on the whole of `file`, held by this process until the file
    /// is closed.
    fn posix_write_lock(file: &std::fs::File) {
        let lock = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as i16,
            l_whence: nix::libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(file),
            nix::fcntl::FcntlArg::F_SETLK(&lock),
        )
        .expect("a POSIX lock");
    }
}
