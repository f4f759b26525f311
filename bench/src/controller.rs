//! Shared harness of the controller scenarios: the release `defib-controller` binary run
//! as a child on loopback (optionally pinned to some cores), a minimal HTTP client for its
//! API and /metrics, simulated watchdogs that send real signed heartbeats, and batched
//! UDP sends (`sendmmsg`).
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
use protocol::{BootId, Heartbeat, HostStatus, Key};

pub const CLUSTER: &str = "bench";
const KEY: &[u8] = b"defib-bench-cluster-key-0123456789";

pub fn key() -> Key {
    Key::new(KEY).expect("a long enough key")
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

/// A signed heartbeat of simulated host `i` (path 0).
pub fn encode(key: &Key, host: &str, i: usize, sequence: u64, out: &mut Vec<u8>) {
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
        session: 0,
        status: HostStatus::default(),
    }
    .encode_into(key, out)
    .expect("encodable heartbeat");
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

/// Writes the bench controller's API token (the API wants one; the bench reads only
/// `/healthz` and `/metrics`, which need none) into `dir`, mode 0600.
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
        .write_all(b"bench-api-token-0123456789abcdef\n")?;
    Ok(path)
}

/// The release `defib-controller` binary, running as a child on loopback with the default
/// detector and engine settings. Killed (SIGTERM, then reaped) on drop.
pub struct ControllerProcess {
    child: Child,
    dir: PathBuf,
    pub heartbeat: SocketAddr,
    pub events: SocketAddr,
    pub api: SocketAddr,
}

impl ControllerProcess {
    /// `cpus`: pin the whole process (every thread) to these cores. `extra`: more TOML
    /// appended to the config (e.g. a `[detector]` section).
    pub fn start(cpus: Option<Vec<usize>>, extra: &str) -> anyhow::Result<Self> {
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
        let cfg = format!(
            "[controller]\nid = \"bench-ctl\"\ncluster_id = \"{CLUSTER}\"\nkey_file = {:?}\n\
             heartbeat_listen = [\"{heartbeat}\"]\nevent_listen = \"{events}\"\n\
             api_listen = \"{api}\"\napi_token_file = {:?}\nstore_path = {:?}\n{extra}",
            dir.join("key").display().to_string(),
            api_token_file(&dir)?.display().to_string(),
            dir.join("store.sqlite").display().to_string(),
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

    /// The cluster key file the watchdogs of a scenario must use too.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key")
    }

    /// GET over a fresh connection: (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.api, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
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

/// Simulated watchdogs: one thread sends a signed heartbeat for each of `hosts` every
/// `interval` (hosts spread evenly over the interval, like unsynchronised watchdogs), each
/// host with its own increasing sequence. A host can be paused and resumed; the time of
/// its last sent heartbeat is kept.
pub struct PacedSenders {
    shared: Arc<PacedShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PacedShared {
    paused: Vec<AtomicBool>,
    last_sent_unix_ns: Vec<AtomicU64>,
    sent: AtomicU64,
    stop: AtomicBool,
}

impl PacedSenders {
    pub fn start(to: SocketAddr, hosts: usize, interval: Duration) -> anyhow::Result<Self> {
        let shared = Arc::new(PacedShared {
            paused: (0..hosts).map(|_| AtomicBool::new(false)).collect(),
            last_sent_unix_ns: (0..hosts).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.connect(to)?;
        let sh = shared.clone();
        let thread = std::thread::spawn(move || paced_loop(&sock, &sh, interval));
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

fn paced_loop(sock: &UdpSocket, sh: &PacedShared, interval: Duration) {
    let key = key();
    let hosts = sh.paused.len();
    let ids: Vec<String> = (0..hosts).map(host_id).collect();
    let mut seq = vec![0u64; hosts];
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
            seq[i] += 1;
            if bufs.len() <= n {
                bufs.push(Vec::new());
            }
            encode(&key, &ids[i], i, seq[i], &mut bufs[n]);
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
        let k = key();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(&k, &host_id(0), 0, 1, &mut a);
        encode(&k, &host_id(99_999), 99_999, u64::MAX, &mut b);
        assert_eq!(a.len(), b.len());
        assert!(protocol::decode_heartbeat(&a, &k).is_ok());
    }
}
