//! Idempotent machine setup. Each step checks first and only installs what is missing.
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

/// Debian packages the build and tests use: FUSE passthrough and loop devices for disk
/// stalls, iproute2 and ping for network namespaces, libvirt-dev and pkg-config to link the
/// watchdog's libvirt watcher, systemd for `systemd-analyze verify` and `systemd-sysusers`
/// (the bundle test; nothing needs systemd running), binutils to strip the bundle's
/// binaries, iptables to drop one direction of a lab host's traffic (the asymmetric
/// partitions) and faketime (libfaketime) to run a lab host's watchdog on a wall clock
/// ten minutes off, etcd (server and etcdctl) for several controllers electing a leader,
/// and protoc with its well-known types, which the `etcd-client` crate's build script
/// needs to generate its gRPC code; openssl (`s_client`) and curl, the adversarial
/// suite's TLS clients.
const DEBIAN_PACKAGES: &[&str] = &[
    "bindfs",
    "fuse3",
    "util-linux",
    "iproute2",
    "iputils-ping",
    "libvirt-dev",
    "pkg-config",
    "systemd",
    "binutils",
    "iptables",
    "faketime",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
    "openssl",
    "curl",
];
const BPF_LINKER_VERSION: &str = "0.10.0";

pub fn run() -> anyhow::Result<()> {
    debian_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    mounts()?;
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn run_cmd(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask setup: {what}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .contains("install ok installed")
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = ["-o", "DPkg::Lock::Timeout=600"];
    run_cmd(
        "apt-get update",
        Command::new("apt-get").args(apt).arg("update").arg("-q"),
    )?;
    run_cmd(
        &format!("apt-get install {}", missing.join(" ")),
        Command::new("apt-get")
            .args(apt)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]));
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run_cmd(
            "rustup toolchain install nightly",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run_cmd(
            "rustup component add rust-src --toolchain nightly",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version"));
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    // bpf-linker 0.10 links with the nightly's own LLVM; ≥ 0.11 wants system LLVM 21+
    // development packages that Debian 12 does not have.
    run_cmd(
        &format!("cargo install bpf-linker@{BPF_LINKER_VERSION}"),
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
            ])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

fn mounted(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target))
}

fn mounts() -> anyhow::Result<()> {
    for (fstype, target) in [("tracefs", "/sys/kernel/tracing"), ("bpf", "/sys/fs/bpf")] {
        if !mounted(target) && !ok(Command::new("mount").args(["-t", fstype, fstype, target])) {
            // Not fatal here: without root the tests that need it say so themselves.
            eprintln!("xtask setup: could not mount {fstype} on {target} (not root?)");
        }
    }
    Ok(())
}
