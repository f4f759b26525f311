//! Pinned probes: `run` pins every map and every tracepoint link of the eBPF object
//! under `probes.pin_dir/<object hash>/` on bpffs. The kernel keeps pinned links
//! attached and pinned maps alive after the daemon exits, so the probes go on
//! recording (into the same ring buffer, with the same watched-pid and in-flight maps)
//! while the daemon restarts; the next run opens the pins, takes the probes over and
//! reads what was recorded meanwhile. The consumer position of the ring buffer lives
//! in the map itself, so the new reader starts exactly where the old one stopped.
//!
//! The object's hash names the directory: a watchdog with a different object (an
//! upgrade) attaches its own probes beside the old ones and then removes the old
//! directory, which detaches them. The pin directory is locked (flock) so that two
//! daemons never read one ring buffer.
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::programs::links::{FdLink, PinnedLink};
use sha2::Digest as _;

/// Every map of the object (watchdog-ebpf/src/maps.rs). `Probes` refuses to pin an
/// object with a map not listed here.
pub const MAPS: &[&str] = &[
    "EVENTS",
    "WATCHED",
    "NAME_PATTERNS",
    "CONFIG",
    "STATS",
    "INFLIGHT",
    "WATCHED_DEVS",
    "BLK_INFLIGHT",
    "URING_INFLIGHT",
    "RBD_INFLIGHT",
    "SERVICES",
    "KILLERS",
    "OOM_VICTIMS",
];

/// The pins of one object version, with the directory lock held.
pub struct PinSet {
    root: PathBuf,
    dir: PathBuf,
    took_over: bool,
    _lock: File,
}

/// The first 16 hex digits of the object's SHA-256: the name of its pin directory.
pub fn object_version(object: &[u8]) -> String {
    let digest = sha2::Sha256::digest(object);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl PinSet {
    /// Creates (if needed) and locks `root`, and opens `root/<object hash>`.
    pub fn open(root: &Path, object: &[u8]) -> anyhow::Result<Self> {
        crate::mounts::ensure_bpf_filesystems()?;
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating the pin directory {}", root.display()))?;
        let lock = File::open(root)
            .with_context(|| format!("opening the pin directory {}", root.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "another defib-watchdog holds the pin directory {} (probes.pin_dir); one daemon per directory",
                root.display()
            );
        }
        let dir = root.join(object_version(object));
        let took_over = dir
            .join(link_file("qemu_exit", "sched", "sched_process_exit"))
            .exists();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the pin directory {}", dir.display()))?;
        if took_over {
            tracing::info!(dir = %dir.display(), "taking over the pinned probes of a previous run");
        } else {
            tracing::info!(dir = %dir.display(), "no pinned probes found; attaching and pinning new ones");
        }
        Ok(Self {
            root: root.to_path_buf(),
            dir,
            took_over,
            _lock: lock,
        })
    }

    pub fn took_over(&self) -> bool {
        self.took_over
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("map_{name}"))
    }

    /// Where a program is pinned: not to keep it (its links do), but so that a run that
    /// takes it over can read its run time.
    pub fn program_path(&self, prog: &str) -> PathBuf {
        self.dir.join(format!("prog_{prog}"))
    }

    fn link_path(&self, prog: &str, category: &str, name: &str) -> PathBuf {
        self.dir.join(link_file(prog, category, name))
    }

    /// Whether a live link is pinned for `prog` on `category/name`. A pin that cannot be
    /// opened is removed (and attached anew by the caller).
    pub fn has_link(&self, prog: &str, category: &str, name: &str) -> bool {
        let path = self.link_path(prog, category, name);
        if !path.exists() {
            return false;
        }
        match PinnedLink::from_pin(&path) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unusable link pin; re-attaching");
                let _ = std::fs::remove_file(&path);
                false
            }
        }
    }

    pub fn pin_link(
        &self,
        link: FdLink,
        prog: &str,
        category: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let path = self.link_path(prog, category, name);
        // Dropping the PinnedLink closes our fd; the pin keeps the link attached.
        link.pin(&path)
            .with_context(|| format!("pinning the link {}", path.display()))?;
        Ok(())
    }

    /// Removes the pins of other object versions (an upgrade): their probes detach now
    /// that this version's are attached, so there is no gap between the two.
    pub fn remove_other_versions(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path != self.dir && path.is_dir() {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {
                        tracing::info!(dir = %path.display(), "removed the pins of another probe version")
                    }
                    Err(e) => {
                        tracing::warn!(dir = %path.display(), error = %e, "cannot remove old pins")
                    }
                }
            }
        }
    }
}

fn link_file(prog: &str, category: &str, name: &str) -> String {
    format!("link_{prog}_{category}_{name}")
}

/// `defib-watchdog unpin`: removes every pin under `root`, which detaches the probes and
/// frees their maps once no daemon holds them. Refused while a daemon holds the lock.
pub fn unpin(root: &Path) -> anyhow::Result<usize> {
    if !root.exists() {
        return Ok(0);
    }
    let lock = File::open(root).with_context(|| format!("opening {}", root.display()))?;
    // SAFETY: as in PinSet::open.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "a running defib-watchdog holds {}; stop it first",
            root.display()
        );
    }
    let mut removed = 0;
    for entry in std::fs::read_dir(root)?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            removed += std::fs::read_dir(&path)?.count();
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    drop(lock);
    std::fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_version_changes_with_the_object_and_only_then() {
        assert_eq!(object_version(b"abc"), object_version(b"abc"));
        assert_ne!(object_version(b"abc"), object_version(b"abd"));
        assert_eq!(object_version(b"abc").len(), 16);
    }
}
