//! `cargo xtask bundle`: one versioned tar.gz for installing defib on KVM hosts and on
//! the controller: the three binaries (the watchdog carries its eBPF object inside),
//! systemd units, the sysusers.d file, example configurations with every option,
//! the Grafana dashboard, the docs and `install.sh`; a `.sha256` file beside it in
//! `sha256sum -c` format.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use sha2::Digest as _;

use crate::cargo;

const BINARIES: &[&str] = &["defib-watchdog", "defib-controller", "defibctl"];

#[derive(clap::Args)]
pub struct Args {
    /// Cargo profile to build the binaries with (`release`, or `dev` for a quick bundle
    /// of debug builds, as the tests do).
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// Directory the tarball and its checksum are written to.
    #[arg(long, default_value = "target/bundle")]
    pub out: PathBuf,
    /// Pack the binaries already built for the profile instead of building them (the
    /// bundle test builds them itself first).
    #[arg(long)]
    pub no_build: bool,
}

/// Builds the bundle; returns the tarball's path.
pub fn run(args: &Args) -> anyhow::Result<PathBuf> {
    let root = defib_tests::workspace_root();
    let mut build = vec!["build", "--profile", &args.profile, "--bins"];
    // A dev bundle (the tests') builds exactly what `cargo xtask test` builds, so the
    // two share every artifact; a release bundle builds only what it ships.
    if args.profile != "dev" {
        for package in ["defib-watchdog", "defib-controller", "defibctl"] {
            build.extend(["-p", package]);
        }
    }
    if !args.no_build {
        cargo(&build)?;
    }
    let profile_dir = match args.profile.as_str() {
        "dev" | "test" => "debug",
        "release" | "bench" => "release",
        other => other,
    };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bins = target.join(profile_dir);

    let version = version(&root);
    let name = format!("defib-{version}-{}-linux", std::env::consts::ARCH);
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let stage = out.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    std::fs::create_dir_all(stage.join("bin"))?;
    for bin in BINARIES {
        let dst = stage.join("bin").join(bin);
        std::fs::copy(bins.join(bin), &dst)
            .with_context(|| format!("copying {}", bins.join(bin).display()))?;
        // Debug info stays in the build tree; symbols stay for backtraces.
        if !Command::new("strip")
            .arg("--strip-debug")
            .arg(&dst)
            .status()
            .is_ok_and(|s| s.success())
        {
            eprintln!("xtask bundle: strip not available; {bin} keeps its debug info");
        }
    }
    let packaging = root.join("packaging");
    for dir in ["systemd", "sysusers.d", "config", "grafana"] {
        copy_dir(&packaging.join(dir), &stage.join(dir))?;
    }
    std::fs::copy(packaging.join("install.sh"), stage.join("install.sh"))?;
    copy_dir(&root.join("docs"), &stage.join("docs"))?;
    std::fs::write(stage.join("VERSION"), format!("{version}\n"))?;

    let tarball = out.join(format!("{name}.tar.gz"));
    let status = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-czf",
        ])
        .arg(&tarball)
        .arg("-C")
        .arg(&out)
        .arg(&name)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar failed ({status})");
    }
    std::fs::remove_dir_all(&stage)?;
    let digest = sha2::Sha256::digest(std::fs::read(&tarball)?);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let file_name = tarball.file_name().unwrap_or_default().to_string_lossy();
    std::fs::write(
        out.join(format!("{file_name}.sha256")),
        format!("{hex}  {file_name}\n"),
    )?;
    println!("{}", tarball.display());
    Ok(tarball)
}

/// The workspace version, with the commit when built from git (`0.1.0+g93b78e2`).
fn version(root: &Path) -> String {
    let base = env!("CARGO_PKG_VERSION");
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty());
    match commit {
        Some(c) => format!("{base}+g{c}"),
        None => base.to_string(),
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}
