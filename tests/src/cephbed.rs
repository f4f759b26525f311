//! The Ceph test bed (`cargo xtask cephbed start`, xtask/cephbed/cephbed.sh) as the
//! tests use it: a single-node Ceph on 127.0.0.1, pool `volumes`, qemu's user
//! `client.cinder`. Images made here are removed when dropped; an OSD stopped here is
//! continued when its guard is dropped, so a failing test never leaves Ceph frozen.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where the bed lives (xtask/src/cephbed.rs).
pub const DIR: &str = "/var/lib/defib-cephbed";
/// The pool RBD images go in.
pub const POOL: &str = "volumes";

/// A running Ceph test bed.
pub struct Cephbed {
    conf: PathBuf,
}

/// Fails the test (under `CI=true`) or skips it, with the reason, unless the Ceph test
/// bed runs.
#[macro_export]
macro_rules! require_cephbed {
    () => {
        match $crate::cephbed::Cephbed::ensure() {
            Ok(bed) => bed,
            Err(reason) => {
                if $crate::ci() {
                    panic!("this test needs: {reason} (CI=true, so a missing requirement is a failure)");
                }
                eprintln!("SKIP: {reason}");
                return;
            }
        }
    };
}

impl Cephbed {
    /// The bed if Ceph answers healthy, else why not.
    pub fn ensure() -> Result<Cephbed, String> {
        if !crate::is_root() {
            return Err("root (the Ceph test bed's files)".into());
        }
        let conf = Path::new(DIR).join("etc/ceph.conf");
        if !conf.exists() || !crate::have_command("ceph") {
            return Err("the Ceph test bed (`cargo xtask cephbed start`)".into());
        }
        let bed = Cephbed { conf };
        let health = bed
            .run("ceph", &["health"], Duration::from_secs(15))
            .map_err(|e| format!("a running Ceph test bed (`cargo xtask cephbed start`): {e}"))?;
        if !health.starts_with("HEALTH_OK") {
            return Err(format!("a healthy Ceph test bed: {}", health.trim()));
        }
        Ok(bed)
    }

    /// The configuration file clients (qemu, the CLIs) read.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// Runs a Ceph CLI (`ceph`, `rbd`) against the bed, as its admin; its stdout.
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let out = Command::new("timeout")
            .arg(timeout.as_secs().max(1).to_string())
            .arg(program)
            .args(args)
            .env("CEPH_CONF", &self.conf)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {}: {} {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A new image `name` of `size` bytes in [`POOL`] holding `data` at its start
    /// (unique names: several tests share the bed).
    pub fn import(&self, name: &str, data: &[u8], size: u64) -> RbdImage {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("image.raw");
        std::fs::write(&raw, data).expect("image data");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .and_then(|f| f.set_len(size))
            .expect("image size");
        let spec = format!("{POOL}/{name}-{}", crate::tag());
        let _ = self.run("rbd", &["rm", &spec], Duration::from_secs(30));
        self.run(
            "rbd",
            &["import", "--no-progress", &raw.display().to_string(), &spec],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("importing {spec}: {e}"));
        RbdImage {
            spec,
            conf: self.conf.clone(),
        }
    }

    /// The OSD daemon's pid (the bed records it).
    pub fn osd_pid(&self) -> u32 {
        let pids = std::fs::read_to_string(Path::new(DIR).join("pids")).expect("the bed's pids");
        pids.lines()
            .find_map(|l| {
                let (pid, name) = l.split_once(' ')?;
                name.starts_with("ceph-osd").then(|| pid.parse().ok())?
            })
            .expect("an OSD in the bed's pids")
    }

    /// SIGSTOPs the OSD: every request to it waits, with no error, until the guard is
    /// dropped (SIGCONT).
    pub fn stop_osd(&self) -> StoppedOsd {
        let pid = self.osd_pid();
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        StoppedOsd { pid }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("{sig} to the OSD {pid}: {e}"));
}

/// The OSD, stopped until this is dropped.
pub struct StoppedOsd {
    pid: u32,
}

impl Drop for StoppedOsd {
    fn drop(&mut self) {
        signal(self.pid, nix::sys::signal::Signal::SIGCONT);
    }
}

/// An RBD image of the bed, removed when dropped.
pub struct RbdImage {
    /// `pool/name`.
    pub spec: String,
    conf: PathBuf,
}

impl RbdImage {
    /// qemu's `-drive` for it, through its own librbd driver as `client.cinder`.
    pub fn qemu_drive(&self, cache: &str) -> String {
        format!(
            "file=rbd:{}:id=cinder:conf={},format=raw,if=virtio,cache={cache}",
            self.spec,
            self.conf.display()
        )
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["30", "rbd", "rm", "--no-progress", &self.spec])
            .env("CEPH_CONF", &self.conf)
            .output();
    }
}
