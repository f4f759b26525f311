//! The heartbeat sockets: one OS thread per socket takes datagrams in batches
//! (`recvmmsg`), has [`HeartbeatIntake::handle_batch`] judge each batch under one lock,
//! and sends the acks back with one `sendmmsg`; plus the kernel's peer addresses and
//! receive stamps (`SO_TIMESTAMPNS`) read back from the control messages, and
//! [`SocketBacklog`]: what the kernel dropped and how long unread datagrams have waited,
//! asked of the sockets without reading them, so that the controller knows how late it
//! reads and what it lost even while its socket threads get no CPU.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use protocol::DATAGRAM_RECV_BUFFER_LEN;
use tokio::net::UdpSocket;

use super::heartbeats::{Datagram, HeartbeatIntake, IntakeCounters};

/// Datagrams taken off a heartbeat socket per `recvmmsg` (and acks per `sendmmsg`).
pub const BATCH: usize = 64;

/// How often a socket thread blocked in `recvmmsg` looks whether it should stop.
const STOP_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Control-message space per datagram: a receive stamp (`SCM_TIMESTAMPNS`, a timespec)
/// with its header, and room to spare.
const CONTROL_LEN: usize = 64;

/// A kernel stamp further back than this is not believed (a wall clock stepped while
/// the datagram waited): the datagram is dated when it was read.
const MAX_BELIEVED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Receive buffer asked for on heartbeat sockets (the kernel caps it at
/// `net.core.rmem_max`), so bursts from many hosts wait rather than drop.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// The heartbeat sockets as the engine task sees them, without reading them: how many
/// datagrams the kernel dropped on their full receive queues (`SO_MEMINFO`), and how
/// long datagrams have been waiting unread (a socket with data queued whose thread last
/// read at time t has datagrams at least that old).
#[derive(Debug, Default)]
pub struct SocketBacklog {
    sockets: Mutex<Vec<Watched>>,
}

#[derive(Debug)]
struct Watched {
    /// A duplicate of the socket's descriptor (same socket), for `getsockopt`.
    fd: OwnedFd,
    /// When its thread last came back from `recvmmsg` (ms since `started`).
    last_read_ms: Arc<AtomicU64>,
}

/// What [`SocketBacklog::sample`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Datagrams the kernel dropped on these sockets so far (cumulative).
    pub dropped: u64,
    /// How long the oldest unread datagrams may have waited: since the last read of a
    /// socket that has data queued (zero when every queue is empty).
    pub unread_for: std::time::Duration,
}

/// The monotonic clock the backlog's read times are on.
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(tokio::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl SocketBacklog {
    /// Watches `socket`; the returned clock is its thread's, to set after every read.
    fn watch(&self, socket: &std::net::UdpSocket) -> std::io::Result<Arc<AtomicU64>> {
        let fd = socket.as_fd().try_clone_to_owned()?;
        let last_read_ms = Arc::new(AtomicU64::new(mono_ms()));
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Watched {
                fd,
                last_read_ms: last_read_ms.clone(),
            });
        Ok(last_read_ms)
    }

    /// Asks every watched socket now.
    pub fn sample(&self) -> Backlog {
        let now = mono_ms();
        let mut out = Backlog::default();
        for w in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SK_MEMINFO_VARS is 9 on every kernel this runs on (drops, index 8, is the last).
            let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
            let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `info`.
            let r = unsafe {
                libc::getsockopt(
                    w.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MEMINFO,
                    info.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            if r != 0 {
                continue;
            }
            out.dropped += u64::from(info[libc::SK_MEMINFO_DROPS as usize]);
            if info[libc::SK_MEMINFO_RMEM_ALLOC as usize] > 0 {
                let waited = now.saturating_sub(w.last_read_ms.load(Ordering::Relaxed));
                out.unread_for = out.unread_for.max(std::time::Duration::from_millis(waited));
            }
        }
        out
    }
}

/// Receives heartbeats on one socket and answers them (paced acks, refusals), on a
/// dedicated OS thread ([`spawn_heartbeat_thread`]) that stops once this future is dropped.
pub async fn serve_heartbeats(
    socket: UdpSocket,
    intake: Arc<HeartbeatIntake>,
    backlog: Arc<SocketBacklog>,
) {
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let started = socket
        .into_std()
        .and_then(|s| spawn_heartbeat_thread(s, intake, &backlog, stop));
    match started {
        Ok(_) => std::future::pending::<()>().await,
        Err(e) => tracing::error!(error = %e, "cannot start the heartbeat receiver thread"),
    }
}

/// Serves one heartbeat socket on its own thread until `stop` is set: `recvmmsg` takes up
/// to [`BATCH`] datagrams per call, [`HeartbeatIntake::handle_batch`] judges them under
/// one lock acquisition, and `sendmmsg` sends their acks back. The thread inherits the
/// caller's CPU affinity.
pub fn spawn_heartbeat_thread(
    socket: std::net::UdpSocket,
    intake: Arc<HeartbeatIntake>,
    backlog: &SocketBacklog,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let last_read = backlog.watch(&socket)?;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(STOP_CHECK))?;
    if let Err(error) = set_int_option(&socket, libc::SO_RCVBUF, RECEIVE_BUFFER) {
        tracing::debug!(%error, "SO_RCVBUF not raised");
    }
    if let Err(error) = set_int_option(&socket, libc::SO_TIMESTAMPNS, 1) {
        // Without stamps the datagrams are dated when read: said, not fatal.
        tracing::warn!(%error, "SO_TIMESTAMPNS not set on a heartbeat socket; the controller measures its own lag less well");
    }
    std::thread::Builder::new()
        .name("defib-heartbeats".into())
        .spawn(move || receive_loop(&socket, &intake, &last_read, &stop))
}

/// Sets a `SOL_SOCKET` option that takes a C int.
fn set_int_option(
    socket: &impl AsRawFd,
    option: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt reads a c_int from a live local.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn receive_loop(
    socket: &std::net::UdpSocket,
    intake: &HeartbeatIntake,
    last_read: &AtomicU64,
    stop: &AtomicBool,
) {
    let fd = socket.as_raw_fd();
    // One buffer per datagram of a batch, each the protocol's receive buffer size (larger
    // than any valid datagram, so a longer one is refused as oversize, not read in part).
    let mut bufs = vec![0u8; BATCH * DATAGRAM_RECV_BUFFER_LEN];
    // SAFETY (all zeroed() below): these are plain C structs for which all-zero is valid.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    // u64s, so that every control buffer is aligned for a cmsghdr.
    let mut controls = vec![0u64; BATCH * CONTROL_LEN / 8];
    let mut acks: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| Vec::with_capacity(protocol::MAX_ACK_LEN))
        .collect();
    let mut ack_iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut ack_msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut accepted = [false; BATCH];
    let mut counters = IntakeCounters::new(intake.metrics.clone());
    let unknown_peer = SocketAddr::from(([0, 0, 0, 0], 0));
    while !stop.load(Ordering::Relaxed) {
        let base = bufs.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * DATAGRAM_RECV_BUFFER_LEN + DATAGRAM_RECV_BUFFER_LEN <= bufs.len().
            iovs[i].iov_base = unsafe { base.add(i * DATAGRAM_RECV_BUFFER_LEN) }.cast();
            iovs[i].iov_len = DATAGRAM_RECV_BUFFER_LEN;
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            // SAFETY: i * CONTROL_LEN / 8 + CONTROL_LEN / 8 <= controls.len().
            h.msg_control = unsafe { controls.as_mut_ptr().add(i * CONTROL_LEN / 8) }.cast();
            h.msg_controllen = CONTROL_LEN as _;
            msgs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers of the stated sizes.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        last_read.store(mono_ms(), Ordering::Relaxed);
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) {
                tracing::warn!(error = %e, "heartbeat socket receive failed");
                pause_after_error();
            }
            continue;
        }
        let n = r as usize;
        let read_at = tokio::time::Instant::now();
        let wall_now = std::time::SystemTime::now();
        let datagrams: Vec<Datagram> = (0..n)
            .map(|i| {
                let len = (msgs[i].msg_len as usize).min(DATAGRAM_RECV_BUFFER_LEN);
                // SAFETY: the kernel wrote `len` bytes at this offset; nothing writes to
                // `bufs` until the next recvmmsg, after these slices are gone.
                let bytes = unsafe {
                    std::slice::from_raw_parts(base.add(i * DATAGRAM_RECV_BUFFER_LEN), len)
                };
                let peer = socket_addr(&names[i], msgs[i].msg_hdr.msg_namelen);
                // SAFETY: the header's control fields are what the kernel left there.
                let stamp = unsafe { receive_stamp(&msgs[i].msg_hdr) };
                let waited = stamp
                    .and_then(|t| wall_now.duration_since(t).ok())
                    .filter(|w| *w <= MAX_BELIEVED_WAIT)
                    .unwrap_or_default();
                Datagram {
                    bytes,
                    peer: peer.unwrap_or(unknown_peer),
                    received: read_at - waited,
                }
            })
            .collect();
        intake.handle_batch(
            &datagrams,
            &mut acks[..n],
            &mut accepted[..n],
            &mut counters,
        );
        drop(datagrams);
        // Answered: the authentic heartbeats whose ack is due by the pacing (a sign of
        // life, or one that echoed an old session: its ack teaches the session), and the
        // refusals of other heartbeat versions.
        if !accepted[..n].iter().any(|a| *a) {
            continue;
        }
        let mut k = 0;
        for i in (0..n).filter(|&i| accepted[i]) {
            ack_iovs[k].iov_base = acks[i].as_mut_ptr().cast();
            ack_iovs[k].iov_len = acks[i].len();
            let h = &mut ack_msgs[k].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = msgs[i].msg_hdr.msg_namelen;
            h.msg_iov = &mut ack_iovs[k];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            k += 1;
        }
        let mut off = 0;
        while off < k {
            // SAFETY: ack_msgs[off..k] point at live acks and peer addresses.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    ack_msgs[off..].as_mut_ptr(),
                    (k - off) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                off += r as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                // This ack is lost (the watchdog retries with its next heartbeat).
                tracing::debug!(error = %e, "ack not sent");
                off += 1;
            }
        }
    }
}

/// When the kernel received a datagram (`SCM_TIMESTAMPNS`, the wall clock), from its
/// control messages.
///
/// # Safety
/// `hdr.msg_control` must point at `hdr.msg_controllen` readable bytes, as the kernel
/// left them after `recvmmsg`.
unsafe fn receive_stamp(hdr: &libc::msghdr) -> Option<std::time::SystemTime> {
    let mut out = None;
    if hdr.msg_control.is_null() || (hdr.msg_flags & libc::MSG_CTRUNC) != 0 {
        return out;
    }
    // SAFETY: the CMSG_* macros walk the buffer within msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: c points at a complete cmsghdr inside the buffer.
        let (level, kind) = unsafe { ((*c).cmsg_level, (*c).cmsg_type) };
        // SAFETY: the data follows the header; the kernel wrote the type it names.
        let data = unsafe { libc::CMSG_DATA(c) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS {
            // SAFETY: SCM_TIMESTAMPNS carries a timespec (maybe unaligned).
            let ts = unsafe { std::ptr::read_unaligned(data.cast::<libc::timespec>()) };
            if ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec) {
                out = Some(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
                );
            }
        }
        // SAFETY: as above.
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
    out
}

#[allow(
    clippy::disallowed_methods,
    reason = "a dedicated OS thread, outside the async runtime"
)]
fn pause_after_error() {
    std::thread::sleep(std::time::Duration::from_millis(10));
}

/// The peer address the kernel wrote into `ss` (IPv4 or IPv6).
fn socket_addr(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in, and storage is large enough.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::intake::heartbeats::tests::{hb, intake, key};
    use crate::runtime::intake::Intake;
    use protocol::{decode_ack, Key};

    fn storage_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: all-zero is a valid sockaddr_storage; the writes below stay inside it.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = unsafe {
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = unsafe {
                    &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_scope_id = a.scope_id();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }

    #[test]
    #[allow(clippy::disallowed_methods, reason = "a plain test thread, no runtime")]
    fn the_backlog_sees_kernel_drops_and_how_long_datagrams_wait_unread() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The kernel's minimum wins.
        set_int_option(&server, libc::SO_RCVBUF, 1).unwrap();
        let backlog = SocketBacklog::default();
        let _last_read = backlog.watch(&server).unwrap();
        assert_eq!(backlog.sample(), Backlog::default(), "nothing yet");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..500 {
            client
                .send_to(&[0u8; 200], server.local_addr().unwrap())
                .unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(60));
        let b = backlog.sample();
        assert!(b.dropped > 0, "{b:?}");
        assert!(
            b.unread_for >= std::time::Duration::from_millis(50),
            "{b:?}"
        );
    }

    #[test]
    fn peer_addresses_are_read_back_from_the_kernel_structures() {
        for addr in [
            "10.1.2.3:7410".parse::<SocketAddr>().unwrap(),
            "[fe80::1%2]:65535".parse().unwrap(),
        ] {
            let (ss, len) = storage_of(addr);
            assert_eq!(socket_addr(&ss, len), Some(addr));
            assert_eq!(socket_addr(&ss, 2), None, "a truncated address");
        }
        // SAFETY: as above.
        let unknown: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        assert_eq!(socket_addr(&unknown, 128), None);
    }

    #[test]
    fn the_socket_thread_acks_batches_over_loopback_and_stops_when_told() {
        let (i, mut rx, m) = intake(60_000, 1024);
        let k = key();
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let backlog = SocketBacklog::default();
        let thread = spawn_heartbeat_thread(server, i, &backlog, stop.clone()).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // More than one batch, sent before the thread reads, plus one forgery. Each from
        // a host of its own: a host's first heartbeat is acked at once, the others of a
        // burst only once its ack period has passed (protocol::ack, "Pacing").
        let n = BATCH as u64 + 10;
        for seq in 1..=n {
            client
                .send_to(&hb(&format!("h{seq}"), 5, seq, 0, &k), to)
                .unwrap();
        }
        client
            .send_to(
                &hb(
                    "h1",
                    5,
                    n + 1,
                    0,
                    &Key::new(b"another-key-0123456789abcdefghij").unwrap(),
                ),
                to,
            )
            .unwrap();
        let mut seqs = Vec::new();
        let mut buf = [0u8; DATAGRAM_RECV_BUFFER_LEN];
        while seqs.len() < n as usize {
            let got = client.recv(&mut buf).expect("an ack");
            seqs.push(decode_ack(&buf[..got], &k).unwrap().sequence);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
        assert_eq!(m.heartbeats_accepted.get(), n);
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        assert!(client.recv(&mut buf).is_err(), "the forgery was acked");
        assert!(m
            .encode()
            .contains("defib_heartbeats_rejected_total{reason=\"bad_mac\"} 1"));
        let seen = match rx.try_recv() {
            Ok(Intake::Heartbeats(batch)) => batch[0].clone(),
            other => panic!("expected forwarded heartbeats, got {other:?}"),
        };
        assert_eq!(seen.peer, client.local_addr().unwrap());
        assert!(
            seen.received <= tokio::time::Instant::now(),
            "dated by the kernel's stamp, in the past"
        );
        stop.store(true, Ordering::SeqCst);
        thread.join().unwrap();
    }
}
