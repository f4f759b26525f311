//! A real etcd cluster (Debian's etcd 3.4, `cargo xtask setup` installs it): N members
//! (default 3) on 127.0.0.1, each an `etcd` child process with its own data directory
//! and log file, for the controllers that elect a leader on etcd.
//!
//! Two ways to run one:
//! - [`EtcdCluster::start`]: owned by the test. Its members are stopped by PID when it is
//!   dropped (SIGTERM, then SIGKILL), and they get `PR_SET_PDEATHSIG` = SIGKILL, so that
//!   they do not outlive a test process that is itself killed. They stay in the test's
//!   process group (^C reaches them too). Members are spawned from one long-lived thread
//!   of the test process: the death signal is tied to the spawning *thread*, and a test's
//!   thread ends with the test.
//! - [`EtcdCluster::start_detached`] / [`EtcdCluster::stop_detached`]: for `cargo xtask
//!   lab up --ha`. The members run in a session of their own, their PIDs in
//!   `<dir>/pids/m<i>.pid`; a later call (another process) stops exactly those, after
//!   checking that each PID still is an etcd with that member's data directory.
//!
//! Layout of a cluster directory (`<dir>`): `cluster.json` (ports, token, timings, so that
//! a member is restarted with the very same flags), `data/m<i>/`, `logs/m<i>.log`
//! (appended to across restarts, each start headed by a line of the harness),
//! `pids/m<i>.pid`. Members are numbered from 0 (`m0`, `m1`, `m2`), like the lab's hosts.
//!
//! Ports: one block of 2·N consecutive ports (client ports first, then peer ports) picked
//! at random below the kernel's ephemeral range, so that no outgoing connection is ever
//! given one (a killed member gets its ports back on restart) and several clusters can
//! run at once; a block already bound is skipped, and a start that loses a race for a
//! port ("address already in use") is retried on another block.
//!
//! Measured facts behind the defaults (../shared/testbed/etcd/REPORT.md): heartbeat
//! 50 ms / election timeout 500 ms give the smallest lease TTL (1 s) and a first write
//! ~0.7 s after the etcd leader is SIGKILLed; `--grpc-keepalive-min-time 400ms` lets a
//! client ping every 500 ms without being cut off; a cluster answers `endpoint health`
//! 0.25–2.4 s after launch.
use std::collections::HashSet;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// What a test or xtask says when etcd (or etcdctl) is missing.
pub const NOT_INSTALLED: &str = "etcd not found: run `cargo xtask setup`";

/// Both `etcd` and `etcdctl` are on PATH.
pub fn installed() -> bool {
    crate::have_command("etcd") && crate::have_command("etcdctl")
}

/// How to run a cluster. `EtcdOpts::default()`: 3 members, 50/500 ms, fresh temp dir,
/// ports picked.
#[derive(Clone, Debug)]
pub struct EtcdOpts {
    /// Number of members.
    pub members: usize,
    /// `--heartbeat-interval` (ms).
    pub heartbeat_ms: u64,
    /// `--election-timeout` (ms).
    pub election_ms: u64,
    /// `--grpc-keepalive-min-time` (etcd's default 5 s cuts off clients that ping more often).
    pub grpc_keepalive_min_time: String,
    /// The first of 2·`members` consecutive ports (client ports, then peer ports); `None`:
    /// a free block is picked.
    pub base_port: Option<u16>,
    /// The cluster directory ([`EtcdCluster::start`] only; `None`: a fresh temp dir,
    /// removed on drop). A given directory's old data, logs and PIDs are removed first.
    pub dir: Option<PathBuf>,
    /// How long a start (or [`EtcdCluster::start_detached`]) may take until every member
    /// answers `endpoint health`.
    pub start_timeout: Duration,
    /// More `etcd` flags, given to every member.
    pub extra_args: Vec<String>,
    /// Run the members (and etcdctl) in this network namespace (the lab's controller
    /// namespace); `None`: this process's.
    pub netns: Option<String>,
    /// Listen for clients on every address (`0.0.0.0`), not only 127.0.0.1: a client may
    /// then reach a member through any 127.x.y.z address, which a test can cut on its
    /// own (one controller's path to etcd) with a firewall rule.
    pub listen_any: bool,
}

impl Default for EtcdOpts {
    fn default() -> Self {
        EtcdOpts {
            members: 3,
            heartbeat_ms: 50,
            election_ms: 500,
            grpc_keepalive_min_time: "400ms".into(),
            base_port: None,
            dir: None,
            start_timeout: Duration::from_secs(20),
            extra_args: Vec::new(),
            netns: None,
            listen_any: false,
        }
    }
}

/// How long a member gets to stop on SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often health is polled.
const POLL: Duration = Duration::from_millis(50);
/// Attempts of a start whose ports were picked (a lost race for a port is retried).
const START_ATTEMPTS: usize = 3;

/// Everything that names a cluster's members; written to `<dir>/cluster.json`.
#[derive(Clone, Debug)]
struct Layout {
    dir: PathBuf,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
    token: String,
    heartbeat_ms: u64,
    election_ms: u64,
    keepalive_min: String,
    extra_args: Vec<String>,
    netns: Option<String>,
    listen_any: bool,
}

impl Layout {
    fn new(dir: &Path, ports: (Vec<u16>, Vec<u16>), opts: &EtcdOpts) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
            client_ports: ports.0,
            peer_ports: ports.1,
            token: format!("defib-etcd-{}-{:08x}", crate::tag(), random() as u32),
            heartbeat_ms: opts.heartbeat_ms,
            election_ms: opts.election_ms,
            keepalive_min: opts.grpc_keepalive_min_time.clone(),
            extra_args: opts.extra_args.clone(),
            netns: opts.netns.clone(),
            listen_any: opts.listen_any,
        }
    }

    fn n(&self) -> usize {
        self.client_ports.len()
    }

    fn name(i: usize) -> String {
        format!("m{i}")
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        data_dir_in(&self.dir, i)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join("logs").join(format!("m{i}.log"))
    }

    fn pid_path(&self, i: usize) -> PathBuf {
        pid_path_in(&self.dir, i)
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.client_ports[i])
    }

    fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.peer_ports[i])
    }

    /// The `etcd` flags of member `i`; `state` is `new` or `existing`.
    fn args(&self, i: usize, state: &str) -> Vec<String> {
        let initial_cluster = (0..self.n())
            .map(|m| format!("{}={}", Self::name(m), self.peer_url(m)))
            .collect::<Vec<_>>()
            .join(",");
        let mut args: Vec<String> = [
            "--name",
            &Self::name(i),
            "--data-dir",
            &self.data_dir(i).display().to_string(),
            "--listen-client-urls",
            &if self.listen_any {
                format!("http://0.0.0.0:{}", self.client_ports[i])
            } else {
                self.endpoint(i)
            },
            "--advertise-client-urls",
            &self.endpoint(i),
            "--listen-peer-urls",
            &self.peer_url(i),
            "--initial-advertise-peer-urls",
            &self.peer_url(i),
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            &self.token,
            "--heartbeat-interval",
            &self.heartbeat_ms.to_string(),
            "--election-timeout",
            &self.election_ms.to_string(),
            "--grpc-keepalive-min-time",
            &self.keepalive_min,
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn to_json(&self) -> Value {
        json!({
            "client_ports": self.client_ports,
            "peer_ports": self.peer_ports,
            "token": self.token,
            "heartbeat_ms": self.heartbeat_ms,
            "election_ms": self.election_ms,
            "grpc_keepalive_min_time": self.keepalive_min,
            "extra_args": self.extra_args,
            "netns": self.netns,
            "listen_any": self.listen_any,
            "endpoints": (0..self.n()).map(|i| self.endpoint(i)).collect::<Vec<_>>(),
        })
    }

    fn from_json(dir: &Path, v: &Value) -> Option<Layout> {
        let ports = |k: &str| -> Option<Vec<u16>> {
            v[k].as_array()?
                .iter()
                .map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()))
                .collect()
        };
        let layout = Layout {
            dir: dir.to_path_buf(),
            client_ports: ports("client_ports")?,
            peer_ports: ports("peer_ports")?,
            token: v["token"].as_str()?.to_string(),
            heartbeat_ms: v["heartbeat_ms"].as_u64()?,
            election_ms: v["election_ms"].as_u64()?,
            keepalive_min: v["grpc_keepalive_min_time"].as_str()?.to_string(),
            extra_args: v["extra_args"]
                .as_array()?
                .iter()
                .map(|a| a.as_str().map(str::to_string))
                .collect::<Option<_>>()?,
            netns: v["netns"].as_str().map(str::to_string),
            listen_any: v["listen_any"].as_bool().unwrap_or(false),
        };
        (layout.client_ports.len() == layout.peer_ports.len() && layout.n() > 0).then_some(layout)
    }

    fn write(&self) -> Result<(), String> {
        let path = self.dir.join("cluster.json");
        let tmp = self.dir.join("cluster.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&self.to_json()).unwrap())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    fn read(dir: &Path) -> Option<Layout> {
        let text = std::fs::read_to_string(dir.join("cluster.json")).ok()?;
        Layout::from_json(dir, &serde_json::from_str(&text).ok()?)
    }

    /// The last lines of member `i`'s log, for error messages.
    fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Some member's log says it could not bind its port.
    fn lost_port_race(&self) -> bool {
        (0..self.n()).any(|i| {
            std::fs::read_to_string(self.log_path(i))
                .unwrap_or_default()
                .contains("address already in use")
        })
    }
}

fn data_dir_in(dir: &Path, i: usize) -> PathBuf {
    dir.join("data").join(format!("m{i}"))
}

fn pid_path_in(dir: &Path, i: usize) -> PathBuf {
    dir.join("pids").join(format!("m{i}.pid"))
}

/// A random u64 (std's per-process random hash keys, plus a counter).
fn random() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// 2·`n` consecutive free ports (client ports, then peer ports) below the ephemeral
/// range, never handed out twice in this process.
fn pick_ports(n: usize) -> Result<(Vec<u16>, Vec<u16>), String> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let width = 2 * n as u32;
    let (eph_lo, eph_hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let (lo, hi) = if eph_lo >= 12000 {
        (10000, eph_lo)
    } else if eph_hi <= 62000 {
        (eph_hi + 1, 65535)
    } else {
        (10000, 65535)
    };
    let blocks = ((hi - lo) / width).max(1);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..200 {
        let base = lo + (random() % u64::from(blocks)) as u32 * width;
        let ports: Vec<u16> = (base..base + width).map(|p| p as u16).collect();
        if ports.iter().any(|p| given.contains(p)) {
            continue;
        }
        // All bound at once: each is free now (etcd binds with SO_REUSEADDR, so the
        // listeners' closing leaves nothing behind).
        let bound: Result<Vec<_>, _> = ports
            .iter()
            .map(|&p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if bound.is_ok() {
            given.extend(ports.iter().copied());
            let (client, peer) = ports.split_at(n);
            return Ok((client.to_vec(), peer.to_vec()));
        }
    }
    Err(format!(
        "no block of {width} free ports found between {lo} and {hi}"
    ))
}

fn ports_from(base: u16, n: usize) -> Result<(Vec<u16>, Vec<u16>), String> {
    let end = u32::from(base) + 2 * n as u32;
    if end > 65536 {
        return Err(format!("base port {base} leaves no room for {n} members"));
    }
    let client = (0..n).map(|i| base + i as u16).collect();
    let peer = (0..n).map(|i| base + (n + i) as u16).collect();
    Ok((client, peer))
}

/// Spawns `cmd` from a thread that lives as long as the test process, so that a
/// `PR_SET_PDEATHSIG` set in the child fires when the process ends, not when the test's
/// thread (or whichever thread restarted a member) does.
fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the etcd spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("the etcd spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the etcd spawner thread is gone"))?
}

/// Starts member `i` (`state`: `new` or `existing`). `detached`: in a session of its own,
/// no death signal; otherwise it dies with the test process.
fn spawn_member(layout: &Layout, i: usize, state: &str, detached: bool) -> Result<Child, String> {
    for d in [
        layout.data_dir(i).parent().map(Path::to_path_buf),
        layout.log_path(i).parent().map(Path::to_path_buf),
        layout.pid_path(i).parent().map(Path::to_path_buf),
    ]
    .into_iter()
    .flatten()
    {
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let log_path = layout.log_path(i);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let args = layout.args(i, state);
    let _ = writeln!(
        log,
        "=== defib-tests: starting m{i} at {:.3} (unix time): etcd {}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        args.join(" ")
    );
    let mut cmd = match &layout.netns {
        None => Command::new("etcd"),
        Some(ns) => {
            // `ip netns exec` execs etcd in place: the PID is etcd's.
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "etcd"]);
            c
        }
    };
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // etcd refuses to start when an ETCD_* variable shadows one of its flags.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("ETCD_")) {
            cmd.env_remove(key);
        }
    }
    let spawned = if detached {
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        cmd.spawn()
    } else {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                Ok(())
            });
        }
        spawn_from_long_lived_thread(cmd)
    };
    let child = spawned.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NOT_INSTALLED.to_string()
        } else {
            format!("starting etcd member m{i}: {e}")
        }
    })?;
    let pid_path = layout.pid_path(i);
    std::fs::write(&pid_path, format!("{}\n", child.id()))
        .map_err(|e| format!("writing {}: {e}", pid_path.display()))?;
    Ok(child)
}

/// `etcdctl --endpoints=E... ARGS`, its own environment cleared of ETCDCTL_*.
fn etcdctl_with(netns: Option<&str>, endpoints: &[String], args: &[&str]) -> Output {
    let mut cmd = match netns {
        None => Command::new("etcdctl"),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "etcdctl"]);
            c
        }
    };
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("ETCDCTL_")) {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["--dial-timeout=1s", "--command-timeout=2s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running etcdctl: {e}{}",
                if e.kind() == std::io::ErrorKind::NotFound {
                    format!(" ({NOT_INSTALLED})")
                } else {
                    String::new()
                }
            )
        })
}

/// One `endpoint health` over `members`: `Ok` when all answer, else the members that did
/// not and etcdctl's words.
fn health(layout: &Layout, members: &[usize]) -> Result<(), (Vec<usize>, String)> {
    if members.is_empty() {
        return Err((Vec::new(), "no member runs".into()));
    }
    let endpoints: Vec<String> = members.iter().map(|&i| layout.endpoint(i)).collect();
    let out = etcdctl_with(
        layout.netns.as_deref(),
        &endpoints,
        &[
            "--command-timeout=500ms",
            "--dial-timeout=500ms",
            "endpoint",
            "health",
        ],
    );
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let unhealthy = members
        .iter()
        .copied()
        .filter(|&i| {
            let healthy = format!("{} is healthy", layout.endpoint(i));
            !text.lines().any(|l| l.starts_with(&healthy))
        })
        .collect();
    Err((unhealthy, text.trim().to_string()))
}

/// Polls [`health`] every 50 ms until `deadline`; `exited` reports a member that has
/// exited (then waiting is pointless).
fn wait_health(
    layout: &Layout,
    members: &[usize],
    timeout: Duration,
    mut exited: impl FnMut() -> Option<(usize, String)>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match health(layout, members) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if let Some((i, status)) = exited() {
            return Err(format!(
                "etcd member m{i} exited ({status}); its log: {}\n{}",
                layout.log_path(i).display(),
                layout.log_tail(i, 20)
            ));
        }
        if Instant::now() >= deadline {
            let (unhealthy, text) = last;
            let mut msg = format!(
                "etcd members {} not healthy after {timeout:?}: {text}",
                unhealthy
                    .iter()
                    .map(|i| format!("m{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for &i in &unhealthy {
                msg.push_str(&format!(
                    "\n--- m{i}'s log: {} (last lines)\n{}",
                    layout.log_path(i).display(),
                    layout.log_tail(i, 10)
                ));
            }
            return Err(msg);
        }
        std::thread::sleep(POLL);
    }
}

/// `/proc/<pid>/stat`'s state letter, `None` when there is no such process.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Gone or a zombie: PID 1 here reaps orphans only every ~2 s, so waiting for the PID to
/// vanish would wait for the reaper, not for the member.
fn dead(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

/// The process `pid` is the etcd of data directory `data_dir` (a PID reused by another
/// process is not).
fn is_etcd_of(pid: u32, data_dir: &Path) -> bool {
    if dead(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Some(argv0) = args.first() else {
        return false;
    };
    if Path::new(argv0).file_name().and_then(|n| n.to_str()) != Some("etcd") {
        return false;
    }
    let want = data_dir.display().to_string();
    args.windows(2)
        .any(|w| w[0] == "--data-dir" && w[1] == want)
        || args
            .iter()
            .any(|a| a.strip_prefix("--data-dir=") == Some(want.as_str()))
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = send_signal(Pid::from_raw(p), sig);
    }
}

/// SIGTERM (and SIGCONT, for a stopped one) to every PID, SIGKILL to those still alive
/// after the grace period; waits until each is gone or a zombie. `reap`: then reaps those
/// that are this process's children (not for a `Child`, which reaps its own: a PID
/// reaped behind its back could be reused before it signals it). Returns the PIDs that
/// did not die.
fn terminate(pids: &[u32], reap: bool) -> Vec<u32> {
    for &pid in pids {
        signal(pid, Signal::SIGTERM);
        signal(pid, Signal::SIGCONT);
    }
    let wait_all = |until: Instant| {
        while Instant::now() < until && !pids.iter().all(|&p| dead(p)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_all(Instant::now() + STOP_GRACE);
    for &pid in pids {
        if !dead(pid) {
            signal(pid, Signal::SIGKILL);
        }
    }
    wait_all(Instant::now() + Duration::from_secs(5));
    for &pid in pids.iter().filter(|_| reap) {
        // Our own child (one started detached by this process): reap it. Another
        // process's: ECHILD, nothing done.
        if let Ok(p) = i32::try_from(pid) {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(p),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
    pids.iter().copied().filter(|&p| !dead(p)).collect()
}

/// Stops members (member, PID) of a cluster, the leader last. An etcd leader that gets
/// SIGTERM hands its leadership to the follower it has heard from longest and waits for
/// the handover up to etcd's request timeout (5 s + 2 × election timeout): when that
/// follower is stopping too, it waits all that time (measured: a whole cluster SIGTERMed
/// at once took the full 5 s grace, and so did a leader SIGTERMed right after its
/// followers had exited, while it still counted one as connected). A leader that has
/// lost its quorum steps down within about two election timeouts, and one that does not
/// lead skips the handover: so the followers go first, then the leader once it has
/// stepped down (or after 3 × election timeout), then the grace period applies.
/// `live`: the members that can say who leads; `reap` as for [`terminate`].
fn stop_members(layout: &Layout, members: &[(usize, u32)], live: &[usize], reap: bool) -> Vec<u32> {
    let leader = leader_of(layout, live).filter(|l| members.iter().any(|m| m.0 == *l));
    let (last, first): (Vec<&(usize, u32)>, Vec<_>) =
        members.iter().partition(|m| Some(m.0) == leader);
    let mut survivors = terminate(&first.iter().map(|m| m.1).collect::<Vec<_>>(), reap);
    if let Some(l) = leader.filter(|_| layout.n() > 1 && !first.is_empty()) {
        let deadline = Instant::now() + Duration::from_millis(3 * layout.election_ms);
        while Instant::now() < deadline && leader_of(layout, &[l]) == Some(l) {
            std::thread::sleep(POLL);
        }
    }
    survivors.extend(terminate(
        &last.iter().map(|m| m.1).collect::<Vec<_>>(),
        reap,
    ));
    survivors
}

/// Which of `members` leads, as they report it (`endpoint status`): the one that says it
/// leads, the highest raft term winning.
fn leader_of(layout: &Layout, members: &[usize]) -> Option<usize> {
    if members.is_empty() {
        return None;
    }
    let endpoints: Vec<String> = members.iter().map(|&i| layout.endpoint(i)).collect();
    let out = etcdctl_with(
        layout.netns.as_deref(),
        &endpoints,
        &[
            "--command-timeout=500ms",
            "--dial-timeout=500ms",
            "-w",
            "json",
            "endpoint",
            "status",
        ],
    );
    let statuses: Value = serde_json::from_slice(&out.stdout).ok()?;
    statuses
        .as_array()?
        .iter()
        .filter_map(|s| {
            let endpoint = s["Endpoint"].as_str()?;
            let i = members
                .iter()
                .copied()
                .find(|&i| layout.endpoint(i) == endpoint)?;
            let st = &s["Status"];
            let me = st["header"]["member_id"].as_u64()?;
            (st["leader"].as_u64()? == me).then_some((st["raftTerm"].as_u64()?, i))
        })
        .max()
        .map(|(_, i)| i)
}

/// Removes a cluster directory's old state (a fresh start).
fn clear_dir(dir: &Path) -> Result<(), String> {
    for sub in ["data", "logs", "pids"] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(|e| format!("removing {}: {e}", p.display()))?;
        }
    }
    let _ = std::fs::remove_file(dir.join("cluster.json"));
    Ok(())
}

fn absolute_dir(dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    std::fs::canonicalize(dir).map_err(|e| format!("resolving {}: {e}", dir.display()))
}

/// A cluster started with [`EtcdCluster::start_detached`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetachedCluster {
    /// The cluster directory (absolute).
    pub dir: PathBuf,
    /// `http://127.0.0.1:PORT` of each member.
    pub endpoints: Vec<String>,
    /// Each member's PID.
    pub pids: Vec<u32>,
    /// Every member was running already (nothing was started).
    pub already_running: bool,
}

/// A running etcd cluster owned by the test; every member is stopped on drop.
pub struct EtcdCluster {
    layout: Layout,
    opts: EtcdOpts,
    /// Each member's process while it runs (`None`: killed or stopped).
    children: Vec<Option<Child>>,
    paused: Vec<bool>,
    /// Dropped last (the fields after the Drop impl has run): the temp dir, if ours.
    _tmp: Option<tempfile::TempDir>,
}

impl EtcdCluster {
    /// Starts the cluster and waits until every member answers `endpoint health`; panics
    /// with the reason (and the failing member's log file) otherwise. Tests check
    /// [`installed`] first (`require!(etcd::installed(), "{}", etcd::NOT_INSTALLED)`).
    pub fn start(opts: EtcdOpts) -> EtcdCluster {
        Self::try_start(opts).unwrap_or_else(|e| panic!("starting an etcd cluster: {e}"))
    }

    /// [`EtcdCluster::start`], with the failure as an error.
    pub fn try_start(opts: EtcdOpts) -> Result<EtcdCluster, String> {
        if !installed() {
            return Err(NOT_INSTALLED.to_string());
        }
        if opts.members == 0 {
            return Err("an etcd cluster needs at least one member".into());
        }
        let (tmp, dir) = match &opts.dir {
            Some(d) => (None, absolute_dir(d)?),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("defib-etcd")
                    .tempdir()
                    .map_err(|e| format!("creating a temp dir: {e}"))?;
                let d = absolute_dir(t.path())?;
                (Some(t), d)
            }
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            clear_dir(&dir)?;
            let ports = match opts.base_port {
                Some(b) => ports_from(b, opts.members)?,
                None => pick_ports(opts.members)?,
            };
            let layout = Layout::new(&dir, ports, &opts);
            layout.write()?;
            let mut cluster = EtcdCluster {
                layout,
                opts: opts.clone(),
                children: (0..opts.members).map(|_| None).collect(),
                paused: vec![false; opts.members],
                _tmp: None,
            };
            for i in 0..opts.members {
                cluster.children[i] = Some(spawn_member(&cluster.layout, i, "new", false)?);
            }
            match cluster.wait_healthy(opts.start_timeout) {
                Ok(()) => {
                    cluster._tmp = tmp;
                    return Ok(cluster);
                }
                Err(e) => {
                    let retry = opts.base_port.is_none()
                        && attempt < START_ATTEMPTS
                        && cluster.layout.lost_port_race();
                    // Stops the members (the temp dir stays, with the logs, until it is
                    // dropped below or kept by the next attempt).
                    drop(cluster);
                    if !retry {
                        if let Some(t) = tmp {
                            // Keep the logs the error names.
                            let _ = t.keep();
                        }
                        return Err(e);
                    }
                }
            }
        }
    }

    /// The cluster directory (data, logs, PIDs, cluster.json).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.layout.n()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.n() == 0
    }

    /// `http://127.0.0.1:PORT` of every member (running or not).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.layout.endpoint(i)).collect()
    }

    /// `http://127.0.0.1:PORT` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.layout.endpoint(i)
    }

    /// The members that run and are not paused.
    pub fn live(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.children[i].is_some() && !self.paused[i])
            .collect()
    }

    /// The endpoints of [`EtcdCluster::live`] members.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.live().into_iter().map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s log file (appended to across restarts).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.layout.log_path(i)
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.layout.data_dir(i)
    }

    /// Member `i`'s PID while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(Child::id)
    }

    pub fn is_paused(&self, i: usize) -> bool {
        self.paused[i]
    }

    /// SIGKILLs member `i` and reaps it (so it is gone when this returns). A no-op for a
    /// member that does not run.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(self.layout.pid_path(i));
        }
        self.paused[i] = false;
    }

    /// Stops member `i` (SIGTERM, SIGKILL after 5 s). A no-op for a member that does not run.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            // A paused member would keep its SIGTERM pending.
            signal(c.id(), Signal::SIGCONT);
            crate::stop_child(&mut c, STOP_GRACE);
            let _ = std::fs::remove_file(self.layout.pid_path(i));
        }
        self.paused[i] = false;
    }

    /// Starts member `i` again (after [`kill`](Self::kill) or [`stop`](Self::stop)) with
    /// `--initial-cluster-state existing`, the same data directory, ports and flags. Does
    /// not wait: follow with [`wait_healthy`](Self::wait_healthy). Panics if it runs.
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.children[i].is_none(),
            "etcd member m{i} runs: kill or stop it before restarting it"
        );
        let child = spawn_member(&self.layout, i, "existing", false)
            .unwrap_or_else(|e| panic!("restarting etcd member m{i}: {e}"));
        self.children[i] = Some(child);
    }

    /// SIGSTOPs member `i`: it hangs (connections open, nothing answered), as a member
    /// whose machine stalls. It no longer counts as live.
    pub fn pause(&mut self, i: usize) {
        let pid = self.pid(i).unwrap_or_else(|| panic!("m{i} does not run"));
        signal(pid, Signal::SIGSTOP);
        self.paused[i] = true;
    }

    /// SIGCONTs a paused member `i`.
    pub fn resume(&mut self, i: usize) {
        let pid = self.pid(i).unwrap_or_else(|| panic!("m{i} does not run"));
        signal(pid, Signal::SIGCONT);
        self.paused[i] = false;
    }

    /// Which member leads, as the live members report it (`endpoint status`): the one
    /// that says it leads, the highest raft term winning. `None` when no live member
    /// says so (no quorum, an election under way).
    pub fn leader(&self) -> Option<usize> {
        leader_of(&self.layout, &self.live())
    }

    /// Waits (polling every 50 ms) until every live member answers `endpoint health`,
    /// which needs a quorum; the error names the members that did not and their logs.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let live = self.live();
        let layout = self.layout.clone();
        let children = &mut self.children;
        wait_health(&layout, &live, timeout, || {
            live.iter().find_map(|&i| {
                let c = children[i].as_mut()?;
                match c.try_wait() {
                    Ok(Some(status)) => Some((i, status.to_string())),
                    _ => None,
                }
            })
        })
    }

    /// `etcdctl --endpoints=<live members> --dial-timeout=1s --command-timeout=2s ARGS`
    /// (flags in `args` override these).
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl_with(self.layout.netns.as_deref(), &self.live_endpoints(), args)
    }

    /// [`etcdctl`](Self::etcdctl) against the given members only.
    pub fn etcdctl_on(&self, members: &[usize], args: &[&str]) -> Output {
        let endpoints: Vec<String> = members.iter().map(|&i| self.endpoint(i)).collect();
        etcdctl_with(self.layout.netns.as_deref(), &endpoints, args)
    }

    /// The options it was started with.
    pub fn opts(&self) -> &EtcdOpts {
        &self.opts
    }

    /// Starts a cluster in `dir` whose members outlive this process (a session of their
    /// own, PIDs in `<dir>/pids/m<i>.pid`), and waits until all answer `endpoint health`.
    /// Idempotent: if its members run already it only waits for their health and returns
    /// them (`already_running`); members missing from a cluster that has data are
    /// restarted with their flags of before (`opts` then only gives the start timeout);
    /// otherwise the directory is cleared and a new cluster started. `opts.dir` is ignored.
    pub fn start_detached(dir: &Path, opts: &EtcdOpts) -> Result<DetachedCluster, String> {
        if !installed() {
            return Err(NOT_INSTALLED.to_string());
        }
        if opts.members == 0 {
            return Err("an etcd cluster needs at least one member".into());
        }
        let dir = absolute_dir(dir)?;
        let running = |layout: &Layout, i: usize| {
            read_pid(&layout.pid_path(i)).filter(|&p| is_etcd_of(p, &layout.data_dir(i)))
        };
        if let Some(layout) = Layout::read(&dir) {
            let pids: Vec<Option<u32>> = (0..layout.n()).map(|i| running(&layout, i)).collect();
            let has_data = (0..layout.n()).any(|i| layout.data_dir(i).join("member").exists());
            if pids.iter().any(Option::is_some) || has_data {
                let already_running = pids.iter().all(Option::is_some);
                let mut started = Vec::new();
                for (i, pid) in pids.iter().enumerate() {
                    if pid.is_none() {
                        let state = if layout.data_dir(i).join("member").exists() {
                            "existing"
                        } else {
                            "new"
                        };
                        match spawn_member(&layout, i, state, true) {
                            Ok(child) => started.push((i, child.id())),
                            Err(e) => {
                                terminate(&started.iter().map(|s| s.1).collect::<Vec<_>>(), true);
                                return Err(e);
                            }
                        }
                    }
                }
                return Self::finish_detached(&layout, opts.start_timeout, &started).map(|pids| {
                    DetachedCluster {
                        dir: dir.clone(),
                        endpoints: (0..layout.n()).map(|i| layout.endpoint(i)).collect(),
                        pids,
                        already_running,
                    }
                });
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            clear_dir(&dir)?;
            let ports = match opts.base_port {
                Some(b) => ports_from(b, opts.members)?,
                None => pick_ports(opts.members)?,
            };
            let layout = Layout::new(&dir, ports, opts);
            layout.write()?;
            let mut started = Vec::new();
            for i in 0..opts.members {
                match spawn_member(&layout, i, "new", true) {
                    Ok(child) => started.push((i, child.id())),
                    Err(e) => {
                        terminate(&started.iter().map(|s| s.1).collect::<Vec<_>>(), true);
                        return Err(e);
                    }
                }
            }
            match Self::finish_detached(&layout, opts.start_timeout, &started) {
                Ok(pids) => {
                    return Ok(DetachedCluster {
                        dir: dir.clone(),
                        endpoints: (0..layout.n()).map(|i| layout.endpoint(i)).collect(),
                        pids,
                        already_running: false,
                    })
                }
                Err(e) => {
                    let retry = opts.base_port.is_none()
                        && attempt < START_ATTEMPTS
                        && layout.lost_port_race();
                    if !retry {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Waits for a detached cluster's health; on failure stops the members `started` here
    /// (member, PID). Returns every member's PID.
    fn finish_detached(
        layout: &Layout,
        timeout: Duration,
        started: &[(usize, u32)],
    ) -> Result<Vec<u32>, String> {
        let all: Vec<usize> = (0..layout.n()).collect();
        let result = wait_health(layout, &all, timeout, || {
            started
                .iter()
                .find(|&&(_, pid)| dead(pid))
                .map(|&(i, _)| (i, "it is gone".to_string()))
        });
        let pids: Vec<Option<u32>> = (0..layout.n())
            .map(|i| read_pid(&layout.pid_path(i)).filter(|&p| is_etcd_of(p, &layout.data_dir(i))))
            .collect();
        match (result, pids.iter().copied().collect::<Option<Vec<u32>>>()) {
            (Ok(()), Some(pids)) => Ok(pids),
            (r, _) => {
                terminate(&started.iter().map(|s| s.1).collect::<Vec<_>>(), true);
                for &(i, _) in started {
                    let _ = std::fs::remove_file(layout.pid_path(i));
                }
                Err(r
                    .err()
                    .unwrap_or_else(|| "a member of the cluster is gone".into()))
            }
        }
    }

    /// Stops the members a [`start_detached`](Self::start_detached) on `dir` started:
    /// each PID in `<dir>/pids/m<i>.pid` that is still an etcd with data directory
    /// `<dir>/data/m<i>` (a PID since reused by another process is left alone) gets
    /// SIGTERM, then SIGKILL after 5 s. Removes the PID files; keeps data and logs.
    /// Returns the PIDs it stopped. Nothing running (or no such dir) is no error.
    pub fn stop_detached(dir: &Path) -> Result<Vec<u32>, String> {
        let Ok(dir) = std::fs::canonicalize(dir) else {
            return Ok(Vec::new());
        };
        let Ok(entries) = std::fs::read_dir(dir.join("pids")) else {
            return Ok(Vec::new());
        };
        let mut pid_files = Vec::new();
        let mut members = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(i) = name
                .strip_prefix('m')
                .and_then(|s| s.strip_suffix(".pid"))
                .and_then(|s| s.parse::<usize>().ok())
            else {
                continue;
            };
            if let Some(pid) = read_pid(&e.path()) {
                if is_etcd_of(pid, &data_dir_in(&dir, i)) {
                    members.push((i, pid));
                }
            }
            pid_files.push(e.path());
        }
        members.sort_unstable();
        let survivors = match Layout::read(&dir) {
            Some(layout) if members.iter().all(|m| m.0 < layout.n()) => {
                let live: Vec<usize> = members.iter().map(|m| m.0).collect();
                stop_members(&layout, &members, &live, true)
            }
            _ => terminate(&members.iter().map(|m| m.1).collect::<Vec<_>>(), true),
        };
        if !survivors.is_empty() {
            return Err(format!(
                "etcd members {survivors:?} of {} still run after SIGKILL",
                dir.display()
            ));
        }
        for f in pid_files {
            let _ = std::fs::remove_file(f);
        }
        Ok(members.into_iter().map(|m| m.1).collect())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let members: Vec<(usize, u32)> = (0..self.len())
            .filter_map(|i| Some((i, self.pid(i)?)))
            .collect();
        stop_members(&self.layout, &members, &self.live(), false);
        for (i, slot) in self.children.iter_mut().enumerate() {
            if let Some(mut c) = slot.take() {
                // Dead by now (SIGKILLed at the latest): reaps it.
                let _ = c.kill();
                let _ = c.wait();
                let _ = std::fs::remove_file(self.layout.pid_path(i));
            }
        }
    }
}
