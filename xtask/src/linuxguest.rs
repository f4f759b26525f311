//! The hostbed's Linux guest, for tests that need a real guest kernel (a kernel panic,
//! pvpanic): Debian's kernel, downloaded with `apt-get download` and unpacked (never
//! installed), plus a busybox initramfs whose `/init` is tests/guest/linux-init.sh.
//!
//! This host's /dev/kvm is PVM-based and a stock Linux kernel cannot run under it, so the
//! guest runs under TCG (`<domain type='qemu'>`, tests/src/guests.rs `LinuxGuest`).
//!
//! The kernel and the few modules the initramfs loads are kept in [`CACHE_DIR`] (which
//! survives a reboot of the run dir), one directory per kernel release, made complete
//! before it is renamed into place: a second run downloads nothing. The kernel and the
//! initramfs the guests boot are copies in the run dir ([`linux_kernel_path`],
//! [`linux_initrd_path`]), rebuilt only when the init script or the cached kernel changed.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use defib_tests::guests::{linux_dir, linux_initrd_path, linux_kernel_path};

/// Survives `/run`: the download (70 MB) and unpacking are the slow part.
pub const CACHE_DIR: &str = "/var/cache/defib-hostbed/linux";

/// The modules /init loads, in order: virtio-blk for the disk, pvpanic-mmio for the ISA
/// pvpanic device (libvirt's `<panic model='isa'/>`).
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "pvpanic",
    "pvpanic-mmio",
];

/// Debian's metapackage for the current amd64 kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

fn init_source() -> PathBuf {
    defib_tests::workspace_root().join("tests/guest/linux-init.sh")
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).ok()?.modified().ok()
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask hostbed: {what}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// A cached kernel release: `CACHE_DIR/<release>/` with `vmlinuz`, `modules/*.ko` and a
/// `complete` marker written last.
fn cached_kernel() -> Option<PathBuf> {
    let mut done: Vec<PathBuf> = std::fs::read_dir(CACHE_DIR)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("complete").exists())
        .collect();
    done.sort();
    done.pop()
}

/// The kernel package `linux-image-amd64` depends on (e.g. `linux-image-6.1.0-56-amd64`).
fn kernel_package() -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let p = l.trim().strip_prefix("Depends: ")?;
        p.starts_with("linux-image-").then(|| p.to_string())
    })
}

/// Downloads and unpacks Debian's kernel into the cache; its directory.
fn download_kernel() -> anyhow::Result<PathBuf> {
    let package = match kernel_package() {
        Some(p) => p,
        None => {
            run(
                "apt-get update (to find the kernel package)",
                Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-q"]),
            )?;
            kernel_package().with_context(|| {
                format!("apt-cache depends {KERNEL_METAPACKAGE} names no linux-image package")
            })?
        }
    };
    std::fs::create_dir_all(CACHE_DIR).with_context(|| format!("mkdir {CACHE_DIR}"))?;
    let work = Path::new(CACHE_DIR).join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = (|| {
        run(
            &format!("apt-get download {package} (the TCG guest's kernel, into {CACHE_DIR})"),
            Command::new("apt-get")
                // Into a root-only directory: as root, without apt's _apt sandbox.
                .args(["-q", "-o", "APT::Sandbox::User=root", "download", &package])
                .current_dir(&work),
        )?;
        let deb = std::fs::read_dir(&work)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", work.display()))?;
        let tree = work.join("x");
        run(
            &format!("dpkg-deb -x {}", deb.display()),
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
        )?;
        let release = std::fs::read_dir(tree.join("lib/modules"))
            .context("the kernel package has no lib/modules")?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .context("the kernel package has no module tree")?;
        let staged = work.join("out");
        std::fs::create_dir_all(staged.join("modules"))?;
        std::fs::copy(
            tree.join(format!("boot/vmlinuz-{release}")),
            staged.join("vmlinuz"),
        )
        .with_context(|| format!("boot/vmlinuz-{release} in {}", deb.display()))?;
        let module_tree = tree.join("lib/modules").join(&release);
        for m in MODULES {
            let found = find_file(&module_tree, &format!("{m}.ko"))
                .with_context(|| format!("module {m}.ko in kernel {release}"))?;
            std::fs::copy(&found, staged.join(format!("modules/{m}.ko")))?;
        }
        std::fs::write(staged.join("package"), format!("{package}\n"))?;
        std::fs::write(staged.join("complete"), "")?;
        let dest = Path::new(CACHE_DIR).join(&release);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&staged, &dest)?;
        Ok(dest)
    })();
    // The .deb and the unpacked tree (400 MB) go; the few files kept are in `dest`.
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let p = e.path();
        let ft = e.file_type().ok()?;
        if ft.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if e.file_name() == name {
            return Some(p);
        }
    }
    None
}

/// Builds (if out of date) the kernel and initramfs the TCG Linux guests boot.
pub fn build() -> anyhow::Result<()> {
    let kernel = match cached_kernel() {
        Some(k) => k,
        None => download_kernel()?,
    };
    let init = init_source();
    let init_time = mtime(&init).with_context(|| format!("{}", init.display()))?;
    let kernel_time = mtime(&kernel.join("complete")).unwrap_or(init_time);
    let (out_kernel, out_initrd) = (linux_kernel_path(), linux_initrd_path());
    let stamp = linux_dir().join("kernel-release");
    let release = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let up_to_date = mtime(&out_initrd).is_some_and(|t| t >= init_time && t >= kernel_time)
        && out_kernel.exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == release);
    if up_to_date {
        return Ok(());
    }
    eprintln!("xtask hostbed: building the TCG Linux guest (kernel {release})");
    std::fs::create_dir_all(linux_dir())?;

    let root = linux_dir().join("initramfs.tmp");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "proc", "sys", "dev", "tmp", "lib/modules"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("/bin/busybox (Debian's busybox-static)")?;
    for m in MODULES {
        std::fs::copy(
            kernel.join(format!("modules/{m}.ko")),
            root.join(format!("lib/modules/{m}.ko")),
        )
        .with_context(|| format!("cached module {m}.ko"))?;
    }
    std::fs::copy(&init, root.join("init"))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))?;

    let tmp_initrd = out_initrd.with_extension("tmp");
    let archive = std::fs::File::create(&tmp_initrd)?;
    // newc cpio, gzip'd: what the kernel unpacks as an initramfs.
    run(
        "cpio | gzip the initramfs",
        Command::new("sh")
            .args([
                "-c",
                "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1",
            ])
            .current_dir(&root)
            .stdout(archive),
    )?;
    let _ = std::fs::remove_dir_all(&root);
    let tmp_kernel = out_kernel.with_extension("tmp");
    std::fs::copy(kernel.join("vmlinuz"), &tmp_kernel)?;
    for f in [&tmp_kernel, &tmp_initrd] {
        // libvirt's qemu user reads them.
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
    }
    std::fs::rename(&tmp_kernel, &out_kernel)?;
    std::fs::rename(&tmp_initrd, &out_initrd)?;
    std::fs::write(&stamp, format!("{release}\n"))?;
    Ok(())
}

/// For `hostbed status`.
pub fn describe() -> String {
    let cached = cached_kernel()
        .map(|k| format!("kernel cached in {}", k.display()))
        .unwrap_or_else(|| format!("no kernel cached in {CACHE_DIR}"));
    let built = if linux_kernel_path().exists() && linux_initrd_path().exists() {
        format!(
            "built in {} ({})",
            linux_dir().display(),
            std::fs::read_to_string(linux_dir().join("kernel-release"))
                .unwrap_or_default()
                .trim()
        )
    } else {
        "not built".into()
    };
    format!("{cached}; {built}")
}
