//! What /proc says about qemu processes: which are running (the scan at start, before
//! the exec probe has seen anything), and which VM each one runs (its command line).
use std::path::Path;

use serde::{Deserialize, Serialize};
use watchdog_common::{NamePattern, COMM_LEN};

/// The VM a qemu process runs. libvirt passes the domain UUID (= the Nova instance UUID)
/// as `-uuid` and the domain name as `-name guest=NAME,...`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmIdentity {
    pub uuid: Option<String>,
    pub name: Option<String>,
}

impl VmIdentity {
    pub fn is_known(&self) -> bool {
        self.uuid.is_some() || self.name.is_some()
    }
}

/// Reads the identity from a qemu command line (argv without NULs).
pub fn vm_identity_from_args<S: AsRef<str>>(args: &[S]) -> VmIdentity {
    let mut id = VmIdentity::default();
    let mut it = args.iter().map(AsRef::as_ref);
    while let Some(arg) = it.next() {
        // qemu accepts both -opt and --opt.
        let opt = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'));
        match opt {
            Some("uuid") => id.uuid = it.next().map(|u| u.to_ascii_lowercase()),
            Some("name") => id.name = it.next().and_then(name_from_option),
            _ => {}
        }
    }
    id
}

/// `-name` takes `NAME`, `guest=NAME,debug-threads=on`, or `NAME,process=...`; a comma
/// inside a value is written twice (qemu's option syntax).
fn name_from_option(value: &str) -> Option<String> {
    for part in split_qemu_opts(value).into_iter().enumerate() {
        match part {
            (_, p) if p.starts_with("guest=") => return Some(p["guest=".len()..].to_string()),
            (0, p) if !p.contains('=') => return Some(p),
            _ => {}
        }
    }
    None
}

fn split_qemu_opts(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("never empty").push(c);
        }
    }
    parts
}

/// argv of a process, or None if it is gone (or a kernel thread).
pub fn read_args(proc_root: &Path, pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

pub fn read_comm(proc_root: &Path, pid: u32) -> Option<[u8; COMM_LEN]> {
    let text = std::fs::read(proc_root.join(pid.to_string()).join("comm")).ok()?;
    let text = text.strip_suffix(b"\n").unwrap_or(&text);
    let mut comm = [0u8; COMM_LEN];
    let n = text.len().min(COMM_LEN - 1);
    comm[..n].copy_from_slice(&text[..n]);
    Some(comm)
}

/// Is the process a zombie (exited, not yet reaped by its parent)?
pub fn is_zombie(proc_root: &Path, pid: u32) -> bool {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Live processes (thread-group leaders) whose comm matches one of the patterns. A
/// zombie is skipped: it has already exited (and its command line is gone).
pub fn scan_matching(proc_root: &Path, patterns: &[NamePattern]) -> Vec<(u32, [u8; COMM_LEN])> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found: Vec<_> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read_comm(proc_root, pid)?)))
        .filter(|(_, comm)| patterns.iter().any(|p| p.matches(comm)))
        .filter(|(pid, _)| !is_zombie(proc_root, *pid))
        .collect();
    found.sort_unstable_by_key(|(pid, _)| *pid);
    found
}

/// Where a process's file descriptor points (the disk image or device of a stuck call).
pub fn fd_target(proc_root: &Path, pid: u32, fd: i64) -> Option<String> {
    let link = proc_root
        .join(pid.to_string())
        .join("fd")
        .join(fd.to_string());
    std::fs::read_link(link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The kernel's `dev_t` (`major << 20 | minor`, as the block tracepoints give it) of a
/// block device node, or `None` for anything else (a file, a missing path).
pub fn block_dev_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    Some((major << 20) | (minor & 0xf_ffff))
}

/// The block devices a process has open, by kernel `dev_t`, with the path it opened.
pub fn open_block_devices(proc_root: &Path, pid: u32) -> Vec<(u32, String)> {
    let Ok(fds) = std::fs::read_dir(proc_root.join(pid.to_string()).join("fd")) else {
        return Vec::new();
    };
    let mut devs = Vec::new();
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if !target.starts_with("/dev") {
            continue;
        }
        if let Some(dev) = block_dev_of(&fd.path()) {
            devs.push((dev, target.to_string_lossy().into_owned()));
        }
    }
    devs.sort();
    devs.dedup();
    devs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libvirt_command_line_gives_uuid_and_guest_name() {
        let args = [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=instance-0000002a,debug-threads=on",
            "-S",
            "-uuid",
            "8A3C0F7E-1111-4222-8333-944455556666",
        ];
        let id = vm_identity_from_args(&args);
        assert_eq!(
            id.uuid.as_deref(),
            Some("8a3c0f7e-1111-4222-8333-944455556666")
        );
        assert_eq!(id.name.as_deref(), Some("instance-0000002a"));
    }

    #[test]
    fn a_plain_name_and_doubled_commas_are_understood() {
        let id = vm_identity_from_args(&["qemu-kvm", "--name", "web,,1,process=x"]);
        assert_eq!(id.name.as_deref(), Some("web,1"));
        assert_eq!(id.uuid, None);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a synchronous test waiting for a child to exit
    fn an_unreaped_child_is_a_zombie_and_a_live_one_is_not() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let root = Path::new("/proc");
        // Not waited for yet: once it has exited it stays a zombie.
        let mut zombie = false;
        for _ in 0..5000 {
            if is_zombie(root, pid) {
                zombie = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(zombie, "pid {pid} never showed as a zombie");
        child.wait().unwrap();
        assert!(!is_zombie(root, std::process::id()));
    }

    #[test]
    fn a_command_line_without_identity_is_unknown() {
        let id = vm_identity_from_args(&["qemu-system-x86_64", "-m", "16", "-name"]);
        assert!(!id.is_known());
    }

    #[test]
    fn the_scan_finds_this_test_by_its_own_name_and_not_others() {
        let me = std::process::id();
        let comm = read_comm(Path::new("/proc"), me).unwrap();
        let text = crate::records::comm_str(&comm);
        let found = scan_matching(Path::new("/proc"), &[NamePattern::parse(&text)]);
        assert!(found.iter().any(|(pid, _)| *pid == me));
        let none = scan_matching(
            Path::new("/proc"),
            &[NamePattern::parse("no-such-name-xyz")],
        );
        assert!(none.is_empty());
    }
}
