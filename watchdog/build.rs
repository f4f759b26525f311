//! Builds the eBPF object (package `watchdog-ebpf`) with the nightly toolchain and
//! bpf-linker, into OUT_DIR, where `src/probes.rs` embeds it. Set AYA_BUILD_SKIP=1 to
//! skip it (the daemon then refuses to start: it has no probes).
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../watchdog-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("{}", ebpf_dir.display()))?;
    let root = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The probes share their records with this crate through watchdog-common.
    println!("cargo:rerun-if-changed=../watchdog-common/src");
    let package = aya_build::Package {
        name: "watchdog-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
