//! An attacker on a lab's management network (tests/tests/adversarial_lab.rs): a
//! namespace of its own plugged into the lab's bridges ([`Attacker`]), sockets opened
//! inside any namespace ([`in_netns`]), TLS connections from any of its addresses
//! ([`TlsClient`], `openssl s_client`), a relay that holds a connection's first bytes
//! back ([`Relay`]), a recorder of what the lab hosts send the controller, taken off
//! the controller's side of the wire ([`Recorder`]), and what the attacks are judged
//! by: the controller's metrics ([`Scrape`]), its memory and descriptors ([`rss_kib`],
//! [`open_fds`]) and the host states seen meanwhile ([`watching_hosts`]).
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ip;
use crate::lab::Lab;
use crate::netns::LabNet;

/// Moves the calling thread into network namespace `ns` (made by `ip netns add`):
/// sockets it opens from then on live there, wherever they are used later.
pub fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a descriptor of a namespace file, for this thread only.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", io::Error::last_os_error());
}

/// Runs `f` on a thread inside network namespace `ns` and returns what it returns
/// (sockets opened by `f` stay in `ns`).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A machine of the attacker's on the lab's networks: a namespace with a port on every
/// path's bridge, address `10.77.P.200` on path `P`, and `sources` more addresses on
/// path 0 (`10.77.0.201`, …) to attack from several addresses at once. Deleted on drop.
pub struct Attacker {
    pub ns: String,
    pub paths: usize,
    pub sources: usize,
}

impl Attacker {
    pub fn plug(net: &LabNet, sources: usize) -> Attacker {
        assert!(sources <= 50, "addresses 10.77.0.201..=250 only");
        let ns = format!("dfb-{}-atk", net.tag);
        ip(&["netns", "add", &ns]);
        let attacker = Attacker {
            ns: ns.clone(),
            paths: net.paths,
            sources,
        };
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let sw = net.switch_ns();
        for p in 0..net.paths {
            let outer = format!("atk-p{p}");
            let inner = format!("a{p}");
            ip(&[
                "-n", &sw, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns",
                &ns,
            ]);
            ip(&[
                "-n",
                &sw,
                "link",
                "set",
                &outer,
                "master",
                &format!("br{p}"),
                "up",
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", attacker.addr(p)),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
        }
        for i in 0..sources {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", attacker.source(i)),
                "dev",
                "a0",
            ]);
        }
        attacker
    }

    /// Its address on path `p`.
    pub fn addr(&self, p: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, p as u8, 200)
    }

    /// Its `i`-th extra address on path 0.
    pub fn source(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, 201 + i as u8)
    }

    /// A UDP socket on its address on path `p`.
    pub fn udp(&self, p: usize) -> UdpSocket {
        let addr = SocketAddrV4::new(self.addr(p), 0);
        in_netns(&self.ns, || UdpSocket::bind(addr)).expect("bind the attacker's UDP socket")
    }

    /// A TCP connection to `to` from its address on path 0.
    pub fn connect(&self, to: SocketAddrV4) -> io::Result<TcpStream> {
        let from = self.addr(0);
        in_netns(&self.ns, || connect_from(from, to))
    }

    /// `n` TCP connections to `to` from each of `from`, opened one after the other as
    /// fast as they go (a failed connect is an error in its slot).
    pub fn connect_many(
        &self,
        from: &[Ipv4Addr],
        n: usize,
        to: SocketAddrV4,
    ) -> Vec<(Ipv4Addr, io::Result<TcpStream>)> {
        in_netns(&self.ns, || {
            from.iter()
                .flat_map(|&src| (0..n).map(move |_| (src, connect_from(src, to))))
                .collect()
        })
    }

    /// `program` run inside the attacker's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// A TLS connection from address `from` to `to`, trusting the CA in `ca` (the lab's:
    /// anyone may make a TLS connection to the controller's ports, they authenticate
    /// only the server). With `close_on_eof`, [`TlsClient::finish`] ends the TLS session
    /// (close_notify); without, the connection stays until the server closes it.
    pub fn tls(
        &self,
        from: Ipv4Addr,
        to: SocketAddrV4,
        ca: &Path,
        close_on_eof: bool,
    ) -> TlsClient {
        TlsClient::start(self.command("openssl"), from, to, ca, close_on_eof)
    }
}

/// A TLS client (`openssl s_client`, run by [`Attacker::tls`]): what is written goes to
/// the server inside TLS, what the server sends is collected. Killed on drop.
pub struct TlsClient {
    child: Child,
    stdin: Option<ChildStdin>,
    received: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<String>>,
}

impl TlsClient {
    fn start(
        mut cmd: Command,
        from: Ipv4Addr,
        to: SocketAddrV4,
        ca: &Path,
        close_on_eof: bool,
    ) -> TlsClient {
        cmd.args([
            "s_client",
            "-quiet",
            "-verify_quiet",
            "-verify_return_error",
        ])
        .args([
            "-connect",
            &to.to_string(),
            "-bind",
            &format!("{from}:0"),
            "-CAfile",
        ])
        .arg(ca);
        if close_on_eof {
            cmd.arg("-no_ign_eof");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl s_client");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().expect("stdout");
        let got = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        let mut err = child.stderr.take().expect("stderr");
        let text = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            text.lock().unwrap_or_else(|e| e.into_inner()).push_str(&s);
        });
        TlsClient {
            stdin: child.stdin.take(),
            child,
            received,
            stderr,
        }
    }

    /// Sends `bytes` inside TLS (an error once the connection is gone).
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(bytes).and_then(|()| stdin.flush()),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// No more input: with `close_on_eof`, the TLS session ends (close_notify).
    pub fn finish(&mut self) {
        self.stdin = None;
    }

    /// Whether the connection ended (the server closed it, or [`TlsClient::finish`]
    /// closed it) within `within`.
    pub fn wait_closed(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the server sent so far (decrypted).
    pub fn received(&self) -> Vec<u8> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What `openssl s_client` said on stderr (once it has ended).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay on the attacker's machine in front of `upstream`, for one connection: it
/// connects upstream as soon as its client connects, holds what the client sends for
/// `delay`, then passes everything both ways. [`Relay::upstream_closed_after`] says how
/// long after its upstream connect the upstream side closed.
pub struct Relay {
    pub listen: SocketAddrV4,
    closed_after: Arc<Mutex<Option<Duration>>>,
}

impl Relay {
    pub fn start(attacker: &Attacker, port: u16, upstream: SocketAddrV4, delay: Duration) -> Relay {
        let listen = SocketAddrV4::new(attacker.addr(0), port);
        let listener =
            in_netns(&attacker.ns, || std::net::TcpListener::bind(listen)).expect("bind the relay");
        let from = attacker.addr(0);
        let ns = attacker.ns.clone();
        let closed_after = Arc::new(Mutex::new(None));
        let closed = closed_after.clone();
        std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let up = in_netns(&ns, || connect_from(from, upstream)).expect("relay upstream");
            let connected = Instant::now();
            std::thread::sleep(delay);
            let (mut c_read, mut u_write) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = io::copy(&mut c_read, &mut u_write);
                let _ = u_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut u_read, mut c_write) = (up, client);
            let _ = io::copy(&mut u_read, &mut c_write);
            *closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(connected.elapsed());
            let _ = c_write.shutdown(std::net::Shutdown::Both);
        });
        Relay {
            listen,
            closed_after,
        }
    }

    /// How long after the relay connected upstream the upstream side closed, once it has.
    pub fn upstream_closed_after(&self) -> Option<Duration> {
        *self.closed_after.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        // The veth pairs go with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
    }
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection from address `from` (any port) to `to`, in the calling thread's
/// namespace.
pub fn connect_from(from: Ipv4Addr, to: SocketAddrV4) -> io::Result<TcpStream> {
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned at once; bind and connect read a live sockaddr_in of
    // the stated length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let local = sockaddr_in(SocketAddrV4::new(from, 0));
        if libc::bind(
            fd.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr_in(to);
        if libc::connect(
            fd.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(TcpStream::from(fd))
    }
}

/// One UDP datagram the [`Recorder`] took off the wire.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
    pub at: Instant,
}

/// A TCP connection's client-to-server direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

#[derive(Default)]
struct FlowBytes {
    /// The sequence number of its SYN, once seen.
    isn: Option<u32>,
    /// Payload by sequence number (a retransmission lands on the same key).
    segments: BTreeMap<u32, Vec<u8>>,
    first: Option<Instant>,
}

#[derive(Default)]
struct Recorded {
    datagrams: Vec<Datagram>,
    flows: HashMap<Flow, FlowBytes>,
}

/// Records, inside a namespace (the controller's), the IPv4 packets it receives: UDP
/// datagrams to `udp_port` from the addresses `udp_from` lets through, and the
/// client-to-server bytes of TCP connections to `tcp_ports` (reassembled by sequence
/// number). What someone on the management network sees of every watchdog's traffic.
pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    recorded: Arc<Mutex<Recorded>>,
}

/// Reads one big-endian u16 / u32 at `at`.
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Recorder {
    pub fn start(
        ns: &str,
        udp_port: u16,
        udp_from: impl Fn(Ipv4Addr) -> bool + Send + 'static,
        tcp_ports: &[u16],
    ) -> Recorder {
        let stop = Arc::new(AtomicBool::new(false));
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (ns, stop, recorded) = (ns.to_string(), stop.clone(), recorded.clone());
            let tcp_ports = tcp_ports.to_vec();
            std::thread::spawn(move || {
                enter_netns(&ns);
                let fd = packet_socket();
                let _ = ready_tx.send(());
                capture(&fd, &stop, &recorded, udp_port, &udp_from, &tcp_ports);
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the recorder's socket");
        Recorder {
            stop,
            thread: Some(thread),
            recorded,
        }
    }

    /// The datagrams recorded from `src` so far, in arrival order.
    pub fn datagrams_from(&self, src: Ipv4Addr) -> Vec<Datagram> {
        let r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        r.datagrams
            .iter()
            .filter(|d| *d.src.ip() == src)
            .cloned()
            .collect()
    }

    /// Every datagram recorded so far.
    pub fn datagrams(&self) -> Vec<Datagram> {
        let r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        r.datagrams.clone()
    }

    /// The client-to-server bytes of each TCP connection to port `dst_port` from
    /// `src`, oldest connection first: from its first byte up to the first gap.
    pub fn client_bytes(&self, src: Ipv4Addr, dst_port: u16) -> Vec<(Flow, Vec<u8>)> {
        let r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        let mut flows: Vec<(Instant, Flow, Vec<u8>)> = r
            .flows
            .iter()
            .filter(|(f, _)| *f.src.ip() == src && f.dst.port() == dst_port)
            .filter_map(|(f, b)| Some((b.first?, *f, b.assembled()?)))
            .collect();
        flows.sort_by_key(|(at, ..)| *at);
        flows.into_iter().map(|(_, f, b)| (f, b)).collect()
    }
}

impl FlowBytes {
    fn assembled(&self) -> Option<Vec<u8>> {
        let start = self.isn?.wrapping_add(1);
        let mut out: Vec<u8> = Vec::new();
        let mut segments: Vec<(u32, &Vec<u8>)> = self
            .segments
            .iter()
            .map(|(seq, data)| (seq.wrapping_sub(start), data))
            .collect();
        segments.sort_by_key(|(rel, _)| *rel);
        for (rel, data) in segments {
            let rel = rel as usize;
            if rel > out.len() {
                break;
            }
            if rel + data.len() > out.len() {
                out.extend_from_slice(&data[out.len() - rel..]);
            }
        }
        Some(out)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An AF_PACKET socket for every IPv4 packet of the calling thread's namespace, with a
/// 100 ms receive timeout (so its reader sees a stop flag).
fn packet_socket() -> OwnedFd {
    // SAFETY: a new socket, owned at once; setsockopt reads live locals of the stated
    // sizes.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from((libc::ETH_P_IP as u16).to_be()),
        );
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let rcvbuf: libc::c_int = 16 << 20;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&rcvbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        fd
    }
}

fn capture(
    fd: &OwnedFd,
    stop: &AtomicBool,
    recorded: &Mutex<Recorded>,
    udp_port: u16,
    udp_from: &dyn Fn(Ipv4Addr) -> bool,
    tcp_ports: &[u16],
) {
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: all-zero is a valid sockaddr_ll; recvfrom writes at most the lengths
        // given into live buffers.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            continue;
        }
        // What this namespace sends is seen once more on its way out.
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let at = Instant::now();
        let pkt = &buf[..n as usize];
        if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            continue;
        }
        let ihl = usize::from(pkt[0] & 0xf) * 4;
        let total = match usize::from(be16(pkt, 2)) {
            0 => pkt.len(),
            t => t.min(pkt.len()),
        };
        if total < ihl + 8 {
            continue;
        }
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let l4 = &pkt[ihl..total];
        let (sport, dport) = (be16(l4, 0), be16(l4, 2));
        let (src, dst) = (SocketAddrV4::new(src, sport), SocketAddrV4::new(dst, dport));
        match pkt[9] {
            17 if dport == udp_port && udp_from(*src.ip()) => {
                let mut r = recorded.lock().unwrap_or_else(|e| e.into_inner());
                r.datagrams.push(Datagram {
                    src,
                    dst,
                    payload: l4[8..].to_vec(),
                    at,
                });
            }
            6 if tcp_ports.contains(&dport) && l4.len() >= 20 => {
                let seq = be32(l4, 4);
                let offset = usize::from(l4[12] >> 4) * 4;
                let syn = l4[13] & 0x02 != 0;
                let mut r = recorded.lock().unwrap_or_else(|e| e.into_inner());
                let flow = r.flows.entry(Flow { src, dst }).or_default();
                flow.first.get_or_insert(at);
                if syn {
                    flow.isn = Some(seq);
                } else if l4.len() > offset {
                    flow.segments.insert(seq, l4[offset..].to_vec());
                }
            }
            _ => {}
        }
    }
}

/// One scrape of a controller's `/metrics`: every series (name and labels, as printed)
/// with its value.
#[derive(Debug, Clone, Default)]
pub struct Scrape(pub BTreeMap<String, f64>);

impl Scrape {
    /// `GET /metrics` of the lab's controller (over HTTPS with the lab CA, from the
    /// controller's namespace, with curl).
    pub fn take(lab: &Lab) -> Scrape {
        let out = lab
            .net
            .command_in(&lab.net.controller_ns(), std::path::Path::new("curl"))
            .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(lab.ca_file())
            .arg(format!("{}/metrics", lab.api_url(7412)))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "GET /metrics: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.controller_log()
        );
        Scrape::parse(&String::from_utf8_lossy(&out.stdout))
    }

    pub fn parse(text: &str) -> Scrape {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// A series' value (0 when the controller has not printed it: a labelled counter
    /// appears at its first use).
    pub fn get(&self, series: &str) -> u64 {
        self.0.get(series).copied().unwrap_or(0.0) as u64
    }

    /// `defib_heartbeats_rejected_total{reason="…"}`.
    pub fn heartbeats_rejected(&self, reason: &str) -> u64 {
        self.get(&format!(
            "defib_heartbeats_rejected_total{{reason=\"{reason}\"}}"
        ))
    }

    /// `defib_frames_rejected_total{reason="…"}`.
    pub fn frames_rejected(&self, reason: &str) -> u64 {
        self.get(&format!(
            "defib_frames_rejected_total{{reason=\"{reason}\"}}"
        ))
    }

    /// Every series that changed since `before`, with its change.
    pub fn changes_since(&self, before: &Scrape) -> BTreeMap<String, i64> {
        self.0
            .iter()
            .filter(|(k, _)| k.ends_with("_total") || k.contains("_total{"))
            .map(|(k, v)| (k.clone(), *v as i64 - before.get(k) as i64))
            .filter(|(_, d)| *d != 0)
            .collect()
    }

    /// The changes of the rejection counters (heartbeats and frames) since `before`.
    pub fn rejections_since(&self, before: &Scrape) -> BTreeMap<String, i64> {
        self.changes_since(before)
            .into_iter()
            .filter(|(k, _)| k.contains("_rejected_total"))
            .collect()
    }
}

/// A process's resident memory, KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How many descriptors a process has open (/proc/PID/fd).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What [`watching_hosts`] saw.
#[derive(Debug, Default, Clone)]
pub struct HostWatch {
    /// Polls answered by the controller.
    pub polls: usize,
    /// Polls the controller did not answer (e.g. while it restarted).
    pub unanswered: usize,
    /// Every (time since the watch began, host, state) of a watched host not `Up`.
    pub not_up: Vec<(Duration, String, String)>,
    /// Every state seen per watched host, in order, without repeats.
    pub states: BTreeMap<String, Vec<String>>,
}

impl HostWatch {
    /// Whether every watched host was `Up` at every answered poll.
    pub fn always_up(&self) -> bool {
        self.not_up.is_empty()
    }
}

/// Runs `f` while another thread polls the controller's host states (`defibctl
/// hosts`, every `every`) and notes every state of `hosts`.
pub fn watching_hosts<T: Send>(
    lab: &Lab,
    hosts: &[&str],
    every: Duration,
    f: impl FnOnce() -> T + Send,
) -> (T, HostWatch) {
    let done = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|s| {
        let poller = s.spawn(|| {
            let mut watch = HostWatch::default();
            loop {
                let last = done.load(Ordering::SeqCst);
                poll_hosts(lab, hosts, started, &mut watch);
                if last {
                    return watch;
                }
                let next = Instant::now() + every;
                while Instant::now() < next && !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        let result = {
            // Set even when `f` panics: the scope waits for the poller before it
            // passes the panic on.
            let _stop = StopOnDrop(&done);
            f()
        };
        let watch = poller
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        (result, watch)
    })
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn poll_hosts(lab: &Lab, hosts: &[&str], started: Instant, watch: &mut HostWatch) {
    let Ok(answer) = lab.ctl_at(0, &["hosts"]) else {
        watch.unanswered += 1;
        return;
    };
    watch.polls += 1;
    let list = answer
        .as_array()
        .cloned()
        .or_else(|| answer["hosts"].as_array().cloned())
        .unwrap_or_default();
    for host in hosts {
        let state = list
            .iter()
            .find(|h| h["host"] == *host)
            .and_then(|h| h["state"].as_str())
            .unwrap_or("absent")
            .to_string();
        let seen = watch.states.entry(host.to_string()).or_default();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state != "Up" {
            watch
                .not_up
                .push((started.elapsed(), host.to_string(), state));
        }
    }
}
