//! `cargo xtask fuzz`: every cargo-fuzz target, each for N seconds, on a copy of its
//! committed seed corpus; fails naming the crash artifact if a target finds one.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};

/// Pinned, like bpf-linker: a new cargo-fuzz can change flags or want a newer nightly.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The fuzz crates (each its own workspace, outside the main one) and their targets.
const FUZZ_CRATES: &[(&str, &[&str])] = &[
    ("protocol", &["heartbeat", "ack", "frame"]),
    (
        ".",
        &[
            "watchdog_config",
            "controller_config",
            "spool_records",
            "spool_open",
        ],
    ),
];

pub fn run(seconds: u64) -> anyhow::Result<()> {
    crate::setup::run()?;
    cargo_fuzz()?;
    let root = defib_tests::workspace_root();
    let scratch = root.join("target/fuzz-run");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("{}", scratch.display()))?;
    }
    // Build everything first, so a compile error shows before any time is spent
    // fuzzing and the per-target time below is fuzzing only.
    for (dir, _) in FUZZ_CRATES {
        let started = Instant::now();
        cargo_fuzz_cmd(&root.join(dir), "build").status_ok()?;
        eprintln!(
            "xtask fuzz: built {} in {:.0} s",
            Path::new(dir).join("fuzz").display(),
            started.elapsed().as_secs_f64()
        );
    }
    // The targets' own files (the spool's, the controller's fixtures) go here, on tmpfs
    // where there is one, and are removed afterwards.
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        shm.join(format!("defib-fuzz-{}", std::process::id()))
    } else {
        scratch.join("tmp")
    };
    std::fs::create_dir_all(&tmp)?;
    let mut crashes = Vec::new();
    let mut result = Ok(());
    'targets: for (dir, targets) in FUZZ_CRATES {
        let fuzz_dir = root.join(dir).join("fuzz");
        for target in *targets {
            match fuzz_one(&fuzz_dir, target, &scratch, &tmp, seconds) {
                Ok(Some(artifact)) => crashes.push(artifact),
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break 'targets;
                }
            }
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&tmp) {
        eprintln!("xtask fuzz: removing {}: {e}", tmp.display());
    }
    result?;
    if !crashes.is_empty() {
        for c in &crashes {
            eprintln!("xtask fuzz: crash artifact {}", c.display());
        }
        bail!(
            "{} fuzz target(s) crashed; replay one with `AYA_BUILD_SKIP=1 cargo +nightly fuzz \
             run --sanitizer none --debug-assertions <target> <artifact>` in the directory \
             holding its fuzz/",
            crashes.len()
        );
    }
    Ok(())
}

/// Runs one target on a copy of its corpus; Some(artifact) if it crashed.
fn fuzz_one(
    fuzz_dir: &Path,
    target: &str,
    scratch: &Path,
    tmp: &Path,
    seconds: u64,
) -> anyhow::Result<Option<PathBuf>> {
    let seeds = fuzz_dir.join("corpus").join(target);
    anyhow::ensure!(
        seeds.is_dir(),
        "{} has no seed corpus (commit one)",
        seeds.display()
    );
    // The copy grows as the fuzzer finds new inputs; the committed seeds stay as they are.
    let corpus = scratch.join("corpus").join(target);
    let artifacts = scratch.join("artifacts").join(target);
    std::fs::create_dir_all(&corpus)?;
    std::fs::create_dir_all(&artifacts)?;
    for entry in std::fs::read_dir(&seeds)? {
        let entry = entry?;
        std::fs::copy(entry.path(), corpus.join(entry.file_name()))?;
    }
    let seed_count = std::fs::read_dir(&corpus)?.count();
    // libFuzzer prints a line per new input; that goes to a log, and CI's shows the
    // summary, or the log's end if the target failed.
    let log_path = scratch.join("logs").join(format!("{target}.log"));
    std::fs::create_dir_all(scratch.join("logs"))?;
    let log = std::fs::File::create(&log_path)?;
    eprintln!("xtask fuzz: {target} for {seconds} s ({seed_count} seeds)");
    let started = Instant::now();
    let crate_dir = fuzz_dir.parent().context("fuzz dir has a parent")?;
    let status = cargo_fuzz_cmd(crate_dir, "run")
        .arg(target)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // A single input running this long is a hang, as good as a crash.
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .env("TMPDIR", tmp)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let runs = stat(&text, "stat::number_of_executed_units:");
    let per_sec = stat(&text, "stat::average_exec_per_sec:");
    let corpus_now = std::fs::read_dir(&corpus)?.count();
    eprintln!(
        "xtask fuzz: {target}: {status} after {:.0} s, {runs} runs, {per_sec} runs/s, \
         corpus {seed_count} -> {corpus_now} inputs (log: {})",
        started.elapsed().as_secs_f64(),
        log_path.display()
    );
    if status.success() {
        return Ok(None);
    }
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(60)..] {
        eprintln!("  {line}");
    }
    let artifact = std::fs::read_dir(&artifacts)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next();
    Ok(Some(artifact.unwrap_or(artifacts)))
}

/// The value of one of libFuzzer's final `stat::` lines, or "?" if it did not get
/// that far.
fn stat<'a>(log: &'a str, name: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(name))
        .map_or("?", str::trim)
}

/// `cargo +nightly fuzz <action>` in `crate_dir` (the directory holding `fuzz/`), with
/// the flags both `build` and `run` need so `run` reuses what `build` made.
fn cargo_fuzz_cmd(crate_dir: &Path, action: &str) -> Command {
    let mut cmd = Command::new("cargo");
    defib_tests::scrub_cargo_env(&mut cmd);
    cmd.current_dir(crate_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .args(["+nightly", "fuzz", action])
        // The targets are safe Rust: what they look for is panics, overflows (debug
        // assertions are on) and hangs, none of which needs a sanitizer, which would
        // only halve the runs per second.
        .args(["--sanitizer", "none", "--debug-assertions"])
        // The watchdog's parsers do not need its eBPF probes (see watchdog/build.rs).
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

fn cargo_fuzz() -> anyhow::Result<()> {
    let version = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if version.contains(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!("xtask fuzz: cargo install cargo-fuzz@{CARGO_FUZZ_VERSION}");
    Command::new("cargo")
        .args([
            "install",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
            "--locked",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .status_ok()
}

trait StatusOk {
    fn status_ok(&mut self) -> anyhow::Result<()>;
}

impl StatusOk for Command {
    fn status_ok(&mut self) -> anyhow::Result<()> {
        let status = self.status().with_context(|| format!("running {self:?}"))?;
        if !status.success() {
            bail!("{self:?} failed ({status})");
        }
        Ok(())
    }
}
