//! Shared harness of the controller scenarios: the release `defib-controller` binary run
//! as a child on loopback (optionally pinned to some cores) with the scenario's hosts
//! enrolled, a minimal HTTP client for its API and /metrics, simulated watchdogs that send
//! real heartbeats signed with their own host keys and echoing the controller's session,
//! and batched UDP sends (`sendmmsg`).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use protocol::{decode_ack, BootId, Heartbeat, HostStatus, Key, MasterKey};

pub const CLUSTER: &str = "bench";
/// The bench controller's master key (its `controller.key_file`); every host's key is
/// derived from it, as `defibctl hosts enroll` hands it out.
const KEY: &[u8] = b"defib-bench-cluster-key-0123456789";

pub fn master() -> MasterKey {
    MasterKey::new(KEY).expect("a long enough key")
}

/// The key simulated host `i` signs with (and its acks are checked with).
pub fn host_key(i: usize) -> Key {
    master().host_key(&host_id(i))
}

pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `bench-h00042`: every simulated host id has the same length, so every heartbeat
/// datagram has the same size.
pub fn host_id(i: usize) -> String {
    format!("bench-h{i:05}")
}

/// The ack period simulated hosts ask for: what a watchdog with the default settings
/// asks (an eighth of its 3 s isolation timeout).
pub const ACK_PERIOD_MS: u32 = 375;

/// A heartbeat of simulated host `i` (path 0), signed with `key` (the host's own,
/// [`host_key`]), echoing the controller's `session` ([`learn_session`]; 0 before it is
/// known: such a heartbeat is acked but proves nothing) and asking for an ack every
/// [`ACK_PERIOD_MS`].
pub fn encode(key: &Key, host: &str, i: usize, sequence: u64, session: u64, out: &mut Vec<u8>) {
    encode_asking(key, host, i, sequence, session, ACK_PERIOD_MS, out);
}

/// [`encode`], asking for an ack every `ack_period_ms` (0: every heartbeat, paced only by
/// the controller's floor) instead of [`ACK_PERIOD_MS`].
pub fn encode_asking(
    key: &Key,
    host: &str,
    i: usize,
    sequence: u64,
    session: u64,
    ack_period_ms: u32,
    out: &mut Vec<u8>,
) {
    let mut boot = [0u8; 16];
    boot[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    Heartbeat {
        cluster_id: CLUSTER,
        host_id: host,
        boot_id: BootId(boot),
        incarnation: 1,
        sequence,
        sent_unix_ns: unix_ns(),
        sent_mono_ns: crate::monotonic_ns(),
        path_index: 0,
        session,
        ack_period_ms,
        status: HostStatus::default(),
    }
    .encode_into(key, out)
    .expect("encodable heartbeat");
}

/// The controller process's session, learnt as a watchdog learns it: simulated host `i`
/// sends one heartbeat with sequence `first_sequence` and no session (acked, without the
/// "counts" flag, and not a sign of life), and the ack, checked with the host's key,
/// carries the session. The session is one per controller process, so one host learns
/// it for all; a restarted controller has a new one (learn it again). A lost datagram is
/// retried with the next sequence. Returns the session and the host's next unused
/// sequence (the controller's replay window has seen the ones sent here).
pub fn learn_session(to: SocketAddr, i: usize, first_sequence: u64) -> anyhow::Result<(u64, u64)> {
    let key = host_key(i);
    let host = host_id(i);
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(to)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let (mut out, mut buf) = (Vec::new(), vec![0u8; protocol::DATAGRAM_RECV_BUFFER_LEN]);
    let mut sequence = first_sequence;
    for _ in 0..50 {
        encode(&key, &host, i, sequence, 0, &mut out);
        sequence += 1;
        sock.send(&out)?;
        let deadline = crate::monotonic_ns() + 200_000_000;
        while crate::monotonic_ns() < deadline {
            let Ok(n) = sock.recv(&mut buf) else {
                continue; // timed out (or a refused send): wait out the deadline
            };
            if let Ok(ack) = decode_ack(&buf[..n], &key) {
                if ack.host_id == host && ack.sequence == sequence - 1 && ack.session != 0 {
                    return Ok((ack.session, sequence));
                }
            }
        }
    }
    anyhow::bail!("no ack from the controller at {to} for {host} (is it enrolled?)")
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sends every datagram of `batch` on a connected socket with as few `sendmmsg` calls as
/// it takes; returns how many the kernel took.
pub fn send_batch(sock: &UdpSocket, batch: &[&[u8]]) -> usize {
    let mut iov: Vec<libc::iovec> = batch
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    // SAFETY: zeroed mmsghdr is valid (no name, no control); iov outlives the calls.
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut off = 0;
    let mut sent = 0;
    while off < msgs.len() {
        // SAFETY: msgs[off..] are initialised headers pointing at live buffers.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[off..].as_mut_ptr(),
                (msgs.len() - off) as libc::c_uint,
                0,
            )
        };
        if r <= 0 {
            // ENOBUFS/ECONNREFUSED and the like: skip this datagram (UDP may lose it).
            off += 1;
        } else {
            off += r as usize;
            sent += r as usize;
        }
    }
    sent
}

/// `UDP_SEGMENT` (linux/udp.h): the segment size of a UDP GSO send.
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `bytes`, equal-sized datagrams of `seg_len` bytes back to back, with one
/// `sendmsg` using UDP generic segmentation offload: the kernel cuts it into separate
/// datagrams (on loopback, before they reach the receiving socket, which sees ordinary
/// datagrams). Returns the datagrams sent.
pub fn send_gso(sock: &UdpSocket, bytes: &[u8], seg_len: usize) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: zeroed msghdr is valid; the control buffer holds one cmsg with a u16
    // (CMSG_SPACE(2) <= 64 bytes); every pointer outlives the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(2) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), seg_len as u16);
        let r = libc::sendmsg(sock.as_raw_fd(), &msg, 0);
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r as usize / seg_len)
    }
}

/// A free loopback port (the controller binds it right after).
fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

/// The bench controller's API token: `/v1` routes want it as a bearer token
/// (`/healthz` and `/metrics` need none).
const API_TOKEN: &str = "bench-api-token-0123456789abcdef";

/// Writes the bench controller's API token ([`API_TOKEN`]) into `dir`, mode 0600.
pub fn api_token_file(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("api.token");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?
        .write_all(format!("{API_TOKEN}\n").as_bytes())?;
    Ok(path)
}

/// The hosts a bench controller enrolls (`[intake] enrolled_hosts`): it refuses every other
/// host id as `unknown_host`.
pub enum Enrolled<'a> {
    /// Simulated hosts `host_id(0..n)`, all sending from the bench's one loopback address.
    /// The per-source heartbeat limit is off (`heartbeat_rate_per_source = 0`): at its
    /// default (200/s) it would drop nearly all of them, and the bench measures the
    /// intake, not the limiter.
    Simulated(usize),
    /// Real watchdogs with these host ids (one address each, 10 heartbeats/s per path):
    /// the default per-source limit stays, as it ships.
    Watchdogs(&'a [&'a str]),
}

impl Enrolled<'_> {
    /// The config's `[intake]` section.
    fn section(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::from("[intake]\nenrolled_hosts = [");
        let mut add = |h: &str| {
            let _ = write!(s, "\n  \"{h}\",");
        };
        match self {
            Enrolled::Simulated(n) => (0..*n).for_each(|i| add(&host_id(i))),
            Enrolled::Watchdogs(hosts) => hosts.iter().for_each(|h| add(h)),
        }
        s.push_str("\n]\n");
        if let Enrolled::Simulated(_) = self {
            s.push_str(
                "# Every simulated host sends from one address: no per-source limit (the\n\
                 # bench measures the intake, not the limiter).\n\
                 heartbeat_rate_per_source = 0\n",
            );
        }
        s
    }
}

/// The bench controller's config: `extra` (top-level `[controller]` keys first, then
/// sections) after the `[controller]` keys, then the `[intake]` section.
fn config_text(
    dir: &std::path::Path,
    token: &std::path::Path,
    (heartbeat, events, api): (SocketAddr, SocketAddr, SocketAddr),
    enrolled: &Enrolled<'_>,
    extra: &str,
) -> String {
    format!(
        "[controller]\nid = \"bench-ctl\"\ncluster_id = \"{CLUSTER}\"\nkey_file = {:?}\n\
         heartbeat_listen = [\"{heartbeat}\"]\nevent_listen = \"{events}\"\n\
         api_listen = \"{api}\"\napi_token_file = {:?}\nstore_path = {:?}\n{extra}\n{}",
        dir.join("key").display().to_string(),
        token.display().to_string(),
        dir.join("store.sqlite").display().to_string(),
        enrolled.section(),
    )
}

/// The release `defib-controller` binary, running as a child on loopback with the default
/// detector and engine settings and `enrolled`'s hosts enrolled. Killed (SIGTERM, then
/// reaped) on drop.
pub struct ControllerProcess {
    child: Child,
    dir: PathBuf,
    pub heartbeat: SocketAddr,
    pub events: SocketAddr,
    pub api: SocketAddr,
}

impl ControllerProcess {
    /// `cpus`: pin the whole process (every thread) to these cores. `extra`: more TOML
    /// appended to the config (e.g. a `[detector]` section; no `[intake]`, which
    /// `enrolled` makes).
    pub fn start(
        cpus: Option<Vec<usize>>,
        enrolled: Enrolled<'_>,
        extra: &str,
    ) -> anyhow::Result<Self> {
        // DEFIB_BENCH_CONTROLLER: another build to compare (e.g. before a change).
        let bin = match std::env::var_os("DEFIB_BENCH_CONTROLLER") {
            Some(p) => PathBuf::from(p),
            None => defib_tests::built_binary("defib-controller", "defib-controller"),
        };
        let dir = std::env::temp_dir().join(format!("defib-bench-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        defib_tests::write_secret(dir.join("key"), KEY)?;
        let heartbeat: SocketAddr = format!("127.0.0.1:{}", free_port(true)?).parse()?;
        let events: SocketAddr = format!("127.0.0.1:{}", free_port(false)?).parse()?;
        let api: SocketAddr = format!("127.0.0.1:{}", free_port(false)?).parse()?;
        let cfg = config_text(
            &dir,
            &api_token_file(&dir)?,
            (heartbeat, events, api),
            &enrolled,
            extra,
        );
        std::fs::write(dir.join("controller.toml"), cfg)?;
        let log = std::fs::File::create(dir.join("controller.log"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(dir.join("controller.toml"))
            .arg("run")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(cpus) = cpus {
            // SAFETY: only sched_setaffinity (async-signal-safe) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    for &c in &cpus {
                        libc::CPU_SET(c, &mut set);
                    }
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut c = ControllerProcess {
            child,
            dir,
            heartbeat,
            events,
            api,
        };
        for _ in 0..500 {
            if let Ok((200, _)) = c.get("/healthz") {
                return Ok(c);
            }
            if let Some(status) = c.child.try_wait()? {
                anyhow::bail!(
                    "defib-controller exited with {status}: {}",
                    std::fs::read_to_string(c.dir.join("controller.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        anyhow::bail!("defib-controller did not answer /healthz within 5 s")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET over a fresh connection, with the API token: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.api, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {API_TOKEN}\r\n\
             Connection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get(path)?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// The /metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.get("/metrics")?;
        anyhow::ensure!(status == 200, "GET /metrics: {status}");
        Ok(body)
    }

    /// CPU time the controller used so far (every thread, user and system), seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').context("bad /proc/pid/stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(ticks as f64 / hz)
    }

    /// CPU time (user + system) of the controller's threads named `comm` (as the kernel
    /// keeps it: at most 15 bytes), seconds.
    pub fn thread_cpu_seconds(&self, comm: &str) -> anyhow::Result<f64> {
        let mut ticks = 0u64;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid()))? {
            let dir = task?.path();
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if name.trim_end() != comm {
                continue;
            }
            let stat = std::fs::read_to_string(dir.join("stat"))?;
            let rest = stat
                .rsplit_once(')')
                .context("bad /proc/pid/task/tid/stat")?
                .1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            ticks += f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        }
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(ticks as f64 / hz)
    }

    /// Resident set size of the controller process, bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024)
    }

    /// Datagrams the kernel dropped at the heartbeat socket (receive buffer full), from
    /// the `drops` column of /proc/net/udp.
    pub fn socket_drops(&self) -> anyhow::Result<u64> {
        let table = std::fs::read_to_string("/proc/net/udp")?;
        let local = format!("0100007F:{:04X}", self.heartbeat.port());
        table
            .lines()
            .skip(1)
            .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|d| d.parse().ok())
            .context("heartbeat socket not in /proc/net/udp")
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sum of a metric's samples in the Prometheus text (every label set), 0 if absent.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One metric sample with exactly this label set (`name{k="v"}`), 0 if absent.
pub fn metric_labelled(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0) as u64
}

/// Simulated watchdogs: one thread sends a heartbeat for each of `hosts` every `interval`
/// (hosts spread evenly over the interval, like unsynchronised watchdogs), each signed
/// with the host's own key, with its own increasing sequence, and echoing the
/// controller's session (learnt once at start: the controller must not restart under
/// them). A host can be paused and resumed; the time of its last sent heartbeat is kept.
pub struct PacedSenders {
    shared: Arc<PacedShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PacedShared {
    paused: Vec<AtomicBool>,
    /// Hosts that send only every other heartbeat (one of two paths down).
    thinned: Vec<AtomicBool>,
    last_sent_unix_ns: Vec<AtomicU64>,
    sent: AtomicU64,
    stop: AtomicBool,
}

impl PacedSenders {
    pub fn start(to: SocketAddr, hosts: usize, interval: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(hosts > 0, "no hosts to simulate");
        let (session, next0) = learn_session(to, 0, 1)?;
        let mut seq = vec![0u64; hosts];
        // The last sequence host 0 used to learn the session.
        seq[0] = next0 - 1;
        let shared = Arc::new(PacedShared {
            paused: (0..hosts).map(|_| AtomicBool::new(false)).collect(),
            thinned: (0..hosts).map(|_| AtomicBool::new(false)).collect(),
            last_sent_unix_ns: (0..hosts).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.connect(to)?;
        let sh = shared.clone();
        let thread = std::thread::spawn(move || paced_loop(&sock, &sh, interval, session, seq));
        Ok(PacedSenders {
            shared,
            thread: Some(thread),
        })
    }

    pub fn pause(&self, host: usize) {
        self.shared.paused[host].store(true, Ordering::SeqCst);
    }

    pub fn resume(&self, host: usize) {
        self.shared.paused[host].store(false, Ordering::SeqCst);
    }

    /// `on`: the host sends only every other heartbeat (one of its two paths is down).
    pub fn thin(&self, host: usize, on: bool) {
        self.shared.thinned[host].store(on, Ordering::SeqCst);
    }

    pub fn last_sent_unix_ns(&self, host: usize) -> u64 {
        self.shared.last_sent_unix_ns[host].load(Ordering::SeqCst)
    }

    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }
}

impl Drop for PacedSenders {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `seq`: each host's last used sequence.
fn paced_loop(
    sock: &UdpSocket,
    sh: &PacedShared,
    interval: Duration,
    session: u64,
    mut seq: Vec<u64>,
) {
    let hosts = sh.paused.len();
    let ids: Vec<String> = (0..hosts).map(host_id).collect();
    let keys: Vec<Key> = (0..hosts).map(host_key).collect();
    // Slots of the interval: host i sends in slot i % slots.
    let slots = hosts.clamp(1, 100);
    let slot_ns = interval.as_nanos() as u64 / slots as u64;
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let start = crate::monotonic_ns();
    let mut tick: u64 = 0;
    while !sh.stop.load(Ordering::Relaxed) {
        let slot = (tick % slots as u64) as usize;
        let mut n = 0;
        let mut sent_hosts = Vec::new();
        for i in (slot..hosts).step_by(slots) {
            if sh.paused[i].load(Ordering::SeqCst) {
                continue;
            }
            if sh.thinned[i].load(Ordering::Relaxed) && (tick / slots as u64) % 2 == 1 {
                continue;
            }
            seq[i] += 1;
            if bufs.len() <= n {
                bufs.push(Vec::new());
            }
            encode(&keys[i], &ids[i], i, seq[i], session, &mut bufs[n]);
            sent_hosts.push(i);
            n += 1;
        }
        let batch: Vec<&[u8]> = bufs[..n].iter().map(Vec::as_slice).collect();
        let sent = send_batch(sock, &batch);
        let now = unix_ns();
        for &i in &sent_hosts {
            sh.last_sent_unix_ns[i].store(now, Ordering::SeqCst);
        }
        sh.sent.fetch_add(sent as u64, Ordering::Relaxed);
        tick += 1;
        let next = start + tick * slot_ns;
        let now = crate::monotonic_ns();
        if next > now {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_and_labelled_samples_are_read_from_the_text() {
        let text = "# HELP x\ndefib_heartbeats_rejected_total{reason=\"bad_mac\"} 2\n\
                    defib_heartbeats_rejected_total{reason=\"replayed\"} 3\n\
                    defib_heartbeats_accepted_total 10\ndefib_heartbeats_accepted_totalx 1\n";
        assert_eq!(metric_sum(text, "defib_heartbeats_rejected_total"), 5);
        assert_eq!(metric_sum(text, "defib_heartbeats_accepted_total"), 10);
        assert_eq!(
            metric_labelled(text, "defib_heartbeats_rejected_total{reason=\"replayed\"}"),
            3
        );
        assert_eq!(metric_labelled(text, "defib_nothing"), 0);
    }

    #[test]
    fn simulated_heartbeats_all_have_one_size() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&host_key(0), &host_id(0), 0, 1, 7, &mut a);
        encode(
            &host_key(99_999),
            &host_id(99_999),
            99_999,
            u64::MAX,
            7,
            &mut b,
        );
        assert_eq!(a.len(), b.len());
    }

    #[test]
    fn simulated_heartbeats_are_proven_only_by_their_own_key_and_the_session() {
        let mut keys = protocol::HostKeys::new(master());
        keys.enroll(&host_id(0));
        keys.enroll(&host_id(1));
        let mut rx = protocol::HeartbeatReceiver::per_host(keys, CLUSTER, 7);
        let mut d = Vec::new();
        encode(&host_key(0), &host_id(0), 0, 1, 7, &mut d);
        assert!(rx.receive(&d).expect("host 0 with its own key").proven);
        encode(&host_key(1), &host_id(1), 1, 1, 0, &mut d);
        assert!(
            !rx.receive(&d).expect("authentic").proven,
            "no session echoed"
        );
        encode(&host_key(0), &host_id(1), 1, 2, 7, &mut d);
        assert!(rx.receive(&d).is_err(), "host 1 signed with host 0's key");
        encode(&host_key(2), &host_id(2), 2, 1, 7, &mut d);
        assert!(rx.receive(&d).is_err(), "host 2 is not enrolled");
    }

    #[test]
    fn the_config_enrolls_the_hosts_and_lifts_the_limit_only_for_simulated_ones() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let dir = std::path::Path::new("/nonexistent");
        let parse = |e: Enrolled<'_>, extra: &str| {
            controller::config::ControllerConfig::parse(&config_text(
                dir,
                &dir.join("t"),
                (addr, addr, addr),
                &e,
                extra,
            ))
            .expect("the bench's config parses")
        };
        let sim = parse(
            Enrolled::Simulated(3),
            "backend = \"libvirt\"\n[engine]\nmax_restarts_in_place = 5\n",
        );
        assert_eq!(
            sim.intake.enrolled_hosts,
            ["bench-h00000", "bench-h00001", "bench-h00002"]
        );
        assert_eq!(sim.intake.heartbeat_rate_per_source, 0);
        let real = parse(Enrolled::Watchdogs(&["bench-rip"]), "");
        assert_eq!(real.intake.enrolled_hosts, ["bench-rip"]);
        assert_eq!(
            real.intake.heartbeat_rate_per_source,
            controller::config::IntakeSection::default().heartbeat_rate_per_source
        );
    }
}
