//! A small tmpfs the tests mount to run out of disk space on purpose (the store on a
//! full disk). Needs root.
use std::io::Write as _;
use std::path::PathBuf;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A tmpfs of `size` mounted on a fresh directory; lazily unmounted when dropped (the
/// test's tasks may still hold a file on it while a failed test unwinds).
pub struct Tmpfs {
    pub mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("store");
        std::fs::create_dir(&mnt).expect("mount point");
        mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount tmpfs");
        Tmpfs { mnt, _dir: dir }
    }

    /// Writes a file until the filesystem has no room left; returns its path.
    pub fn fill(&self) -> PathBuf {
        let path = self.mnt.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        for chunk in [64 * 1024, 4096, 512, 1] {
            let buf = vec![0x5a; chunk];
            loop {
                match f.write(&buf) {
                    Ok(n) if n == chunk => continue,
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                    Err(e) => panic!("filling {}: {e}", path.display()),
                }
            }
        }
        f.sync_all().expect("sync filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.mnt, MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.mnt.display());
        }
    }
}
