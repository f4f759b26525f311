//! Harness for defib's end-to-end tests: real kernel, real processes, real mounts.
//!
//! This crate is synchronous test-harness code, so std::time::Instant and
//! std::thread::sleep (banned in async code by clippy.toml) are the right tools here.
//!
//! A test that needs something this machine lacks (root, BPF, FUSE, a component) calls
//! [`require!`]: under `CI=true` that fails the test, elsewhere it prints why and skips.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod attacks;
pub mod bmc;
pub mod cephbed;
pub mod certs;
pub mod daemon;
pub mod etcd;
pub mod guests;
pub mod hypervisor;
pub mod lab;
pub mod logs;
pub mod netns;
pub mod novalab;
pub mod pacemaker;
pub mod simhosts;
pub mod tmpfs;

/// A short tag unique to this test process and call, for names of namespaces and files.
pub fn tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{}",
        std::process::id() & 0xffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip ARGS`, panicking with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// `require!(condition, "reason {}", x)`: fail under CI, skip (return) with a printed reason otherwise.
#[macro_export]
macro_rules! require {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            let reason = format!($($reason)+);
            if $crate::ci() {
                panic!("this test needs: {reason} (CI=true, so a missing requirement is a failure)");
            }
            eprintln!("SKIP: {reason}");
            return;
        }
    };
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have_command(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Writes a secret (a cluster key, an API token, a BMC password) to `path` with mode
/// 0600, as the daemons require of their secret files (a key or token that group or
/// others may read is refused). An existing file is made 0600 before it is rewritten.
pub fn write_secret(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.set_len(0)?;
    file.write_all(contents.as_ref())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Removes the variables cargo sets for the package it runs (a test binary, xtask) from
/// a nested cargo's environment. Some build scripts (ring's) rerun when
/// `CARGO_PKG_NAME` or `CARGO_MANIFEST_DIR` change, so a build from a test and one from
/// xtask would otherwise rebuild each other's artifacts every time.
pub fn scrub_cargo_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_BIN_")
            || matches!(
                k,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR"
            )
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Builds (once per test process) and returns the path of a workspace binary. Running
/// cargo from a test is fine: cargo releases its build lock before it runs tests.
/// `DEFIB_RELEASE=1` uses release builds (the benchmarks set it).
pub fn built_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let release = std::env::var("DEFIB_RELEASE").is_ok_and(|v| v == "1");
    let path = target_dir()
        .join(if release { "release" } else { "debug" })
        .join(bin);
    if !built.iter().any(|b| b == bin) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut args = vec!["build", "--quiet", "-p", package, "--bin", bin];
        if release {
            args.push("--release");
        }
        let status = scrub_cargo_env(&mut Command::new(cargo))
            .args(&args)
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {bin} failed"
        );
        built.push(bin.to_string());
    }
    path
}

/// A running `defib-watchdog events --json`, with its events collected as they come.
pub struct Watchdog {
    child: Child,
    rx: Receiver<Value>,
    seen: Vec<Value>,
    stderr: Arc<Mutex<String>>,
}

impl Watchdog {
    /// Starts the watchdog and waits until its probes are attached.
    pub fn start(extra_args: &[&str]) -> Watchdog {
        let bin = built_binary("defib-watchdog", "defib-watchdog");
        let mut child = Command::new(bin)
            .args(["events", "--json"])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning defib-watchdog");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => panic!("watchdog printed a line that is not JSON ({e}): {line}"),
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        {
            let stderr_pipe = child.stderr.take().expect("stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                    if line.contains("probes attached") {
                        let _ = ready_tx.send(());
                    }
                    let mut s = stderr.lock().unwrap_or_else(|e| e.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let mut wd = Watchdog {
            child,
            rx,
            seen: Vec::new(),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = wd.child.try_wait() {
                        panic!(
                            "defib-watchdog exited ({status}) before attaching:\n{}",
                            wd.stderr_text()
                        );
                    }
                }
                Err(_) => panic!(
                    "defib-watchdog did not attach its probes:\n{}",
                    wd.stderr_text()
                ),
            }
        }
        wd
    }

    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first event (already seen or arriving within `timeout`) that satisfies `pred`.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return Some(v.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return Some(v);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Like `wait_for`, but panics with the events seen and the daemon's log.
    pub fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        match self.wait_for(timeout, pred) {
            Some(v) => v,
            None => panic!(
                "no {what} within {timeout:?}.\nevents seen: {:#?}\nwatchdog log:\n{}",
                self.seen,
                self.stderr_text()
            ),
        }
    }

    /// Every event seen so far (after draining what has arrived).
    pub fn seen(&mut self) -> &[Value] {
        while let Ok(v) = self.rx.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// Stops a child the way its daemon expects (SIGTERM), and kills it if it has not exited
/// within `grace`. Returns whether it stopped on SIGTERM.
pub fn stop_child(child: &mut Child, grace: Duration) -> bool {
    // Already reaped: its pid may be another process's by now.
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Matches events of one type about one pid.
pub fn is_event(v: &Value, ty: &str, pid: u32) -> bool {
    v["type"] == ty && v["pid"] == pid
}

/// A fake qemu (tests/src/bin/fake-qemu.rs) run under a qemu name, killed on drop.
pub struct FakeQemu {
    pub child: Child,
}

/// The fake-qemu binary copied under `name`, once per test process. Copies are made under
/// a lock: a file still open for writing when another test thread forks makes exec fail
/// with ETXTBSY (the child holds the fd until its own exec).
fn fake_qemu_named(name: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("defib-fakeqemu")
            .tempdir()
            .expect("tempdir")
    });
    let exe = dir.path().join(name);
    if !exe.exists() {
        let tmp = dir.path().join(format!(".{name}.tmp"));
        std::fs::copy(built_binary("defib-tests", "fake-qemu"), &tmp).expect("copy fake-qemu");
        std::fs::rename(&tmp, &exe).expect("rename fake-qemu");
    }
    exe
}

impl FakeQemu {
    /// Starts `NAME -name guest=<vm_name>,debug-threads=on -uuid <uuid> <extra...>` where
    /// NAME is a copy of the fake-qemu binary, and waits until it prints "ready".
    pub fn start(name: &str, vm_name: &str, uuid: &str, extra: &[&str]) -> FakeQemu {
        Self::start_in(None, name, vm_name, uuid, extra)
    }

    /// [`FakeQemu::start`] inside network namespace `netns` (a lab host's), so that what
    /// ends that lab host's processes ends it too.
    pub fn start_in(
        netns: Option<&str>,
        name: &str,
        vm_name: &str,
        uuid: &str,
        extra: &[&str],
    ) -> FakeQemu {
        Self::start_as(netns, None, name, vm_name, uuid, extra)
    }

    /// [`FakeQemu::start_in`], run as `user` (uid, gid) if given, as libvirt runs qemu
    /// as `libvirt-qemu`: `setpriv` (which execs, keeping the pid) switches to it.
    pub fn start_as(
        netns: Option<&str>,
        user: Option<(u32, u32)>,
        name: &str,
        vm_name: &str,
        uuid: &str,
        extra: &[&str],
    ) -> FakeQemu {
        let exe = fake_qemu_named(name);
        if user.is_some() {
            // Another user must reach the copy: its directory is 0700 when made.
            use std::os::unix::fs::PermissionsExt as _;
            let dir = exe.parent().expect("the copy's directory");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .expect("chmod the fake qemu directory");
        }
        let mut tries = 0;
        let mut child = loop {
            // `ip netns exec` and `setpriv` exec the next program: the child's pid is the
            // fake qemu's.
            let mut argv: Vec<std::ffi::OsString> = Vec::new();
            if let Some(ns) = netns {
                argv.extend(["ip", "netns", "exec", ns].map(Into::into));
            }
            if let Some((uid, gid)) = user {
                argv.push("setpriv".into());
                argv.push(format!("--reuid={uid}").into());
                argv.push(format!("--regid={gid}").into());
                argv.push("--clear-groups".into());
            }
            argv.push(exe.clone().into());
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            let spawned = cmd
                .args([
                    "-name",
                    &format!("guest={vm_name},debug-threads=on"),
                    "-uuid",
                    uuid,
                ])
                .args(["-machine", "pc,accel=kvm", "-m", "16"])
                .args(extra)
                .stdout(Stdio::piped())
                .spawn();
            match spawned {
                Ok(c) => break c,
                // ETXTBSY: see fake_qemu_named; the other child execs within moments.
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("spawn fake qemu {}: {e}", exe.display()),
            }
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready");
        assert_eq!(line.trim(), "ready", "fake qemu did not start");
        FakeQemu { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A FUSE passthrough mount (bindfs) whose daemon can be stopped to make every I/O on
/// the mount hang, as a dead NFS server or storage path would.
pub struct FuseBed {
    pub dir: tempfile::TempDir,
    bindfs: Child,
}

impl FuseBed {
    pub fn new() -> FuseBed {
        let dir = tempfile::Builder::new()
            .prefix("defib-fuse")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("real")).expect("mkdir real");
        std::fs::create_dir(dir.path().join("fuse")).expect("mkdir fuse");
        let bindfs = Command::new("bindfs")
            .arg("-f")
            .arg(dir.path().join("real"))
            .arg(dir.path().join("fuse"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn bindfs");
        let bed = FuseBed { dir, bindfs };
        let mountpoint = bed.fuse_dir().display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(mountpoint.as_str()))
        {
            assert!(
                Instant::now() < deadline,
                "bindfs did not mount {mountpoint}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bed
    }

    /// The FUSE daemon's pid (what [`FuseBed::stall`] stops).
    pub fn pid(&self) -> u32 {
        self.bindfs.id()
    }

    pub fn real_dir(&self) -> PathBuf {
        self.dir.path().join("real")
    }

    pub fn fuse_dir(&self) -> PathBuf {
        self.dir.path().join("fuse")
    }

    /// Creates a file of `size` bytes in the real directory; returns its path through FUSE.
    pub fn create_image(&self, name: &str, size: u64) -> PathBuf {
        let f = std::fs::File::create(self.real_dir().join(name)).expect("create image");
        f.set_len(size).expect("size image");
        self.fuse_dir().join(name)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.bindfs.id() as i32), sig)
            .expect("signal bindfs");
    }

    /// Every I/O on the mount hangs from now on.
    pub fn stall(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

impl Default for FuseBed {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FuseBed {
    fn drop(&mut self) {
        self.resume();
        let _ = Command::new("fusermount")
            .arg("-u")
            .arg(self.fuse_dir())
            .stderr(Stdio::null())
            .status();
        let _ = self.bindfs.kill();
        let _ = self.bindfs.wait();
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}
