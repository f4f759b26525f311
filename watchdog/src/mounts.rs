//! bpffs and tracefs are not mounted at boot on every host (nor in containers): aya
//! attaches tracepoints through tracefs, and pinning (for restarts) needs bpffs.
use std::path::Path;

use anyhow::Context as _;
use nix::mount::{mount, MsFlags};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const TRACEFS: &str = "/sys/kernel/tracing";

fn is_mounted(target: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                let _src = f.next();
                f.next() == Some(target) && f.next() == Some(fstype)
            })
        })
        .unwrap_or(false)
}

/// Mounts `fstype` on `target` unless it is there already. Idempotent.
pub fn ensure_mounted(target: &str, fstype: &str) -> anyhow::Result<()> {
    if is_mounted(target, fstype) {
        return Ok(());
    }
    if !Path::new(target).is_dir() {
        std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    }
    mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting {fstype} on {target}"))?;
    tracing::info!(target, fstype, "mounted");
    Ok(())
}

pub fn ensure_bpf_filesystems() -> anyhow::Result<()> {
    ensure_mounted(TRACEFS, "tracefs")?;
    ensure_mounted(BPFFS, "bpf")
}
