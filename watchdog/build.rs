//! Builds the eBPF object (package `watchdog-ebpf`) with the nightly toolchain and
//! bpf-linker, into OUT_DIR, where `src/probes.rs` embeds it. Set AYA_BUILD_SKIP=1 to
//! skip it (the daemon then refuses to start: it has no probes); the fuzz targets
//! (fuzz/) build this way, as they only need the parsers.
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
    // The same test as aya-build's own.
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // aya-build then writes nothing, but probes.rs embeds the file: an empty one
        // lets the crate build, and loading it fails, so the daemon still refuses to start.
        let out = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
        std::fs::write(std::path::Path::new(&out).join("defib-probes"), b"")?;
    }
    let package = aya_build::Package {
        name: "watchdog-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
