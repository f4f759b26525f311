//! Intake: heartbeat datagrams (UDP, one socket per network path) and the watchdogs'
//! event streams (TCP). Everything is authenticated and replay-checked by the protocol
//! crate; refusals are counted by reason and dropped, never crash the daemon.
//!
//! Each heartbeat socket has its own OS thread taking datagrams in batches
//! (`recvmmsg`), judging a whole batch under one lock and acking it with one
//! `sendmmsg` (BENCHMARKS.md, heartbeat-intake, has its rate on one core).
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use protocol::{
    encode_frame, Ack, BootId, Direction, Envelope, Event, FrameDecoder, Freshness,
    HeartbeatReceiver, HostStatus, Key, Message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use crate::edges::libvirt::{
    CommandAnswer, CommandRequest, HostStreams, StreamRegistration, COMMANDS_QUEUED,
};
use crate::metrics::Metrics;

/// A heartbeat the intake accepted, as the engine task needs it.
#[derive(Debug, Clone)]
pub struct HeartbeatSeen {
    pub host: String,
    pub path: u8,
    pub peer: SocketAddr,
    pub boot_id: BootId,
    pub incarnation: u64,
    pub sent_unix_ns: u64,
    pub status: HostStatus,
}

/// What the intake hands the engine task.
#[derive(Debug)]
pub enum Intake {
    Heartbeat(HeartbeatSeen),
    /// A watchdog opened its stream: what is the highest event id stored for it?
    Hello {
        host: String,
        reply: oneshot::Sender<u64>,
    },
    /// An event to store (deduplicated) and feed to the engine; the reply says it is
    /// stored, after which it may be acked.
    Event {
        host: String,
        event: Box<Event>,
        reply: oneshot::Sender<Result<EventStored, String>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventStored {
    /// false: a duplicate, dropped.
    pub new: bool,
    /// Every event of the host up to this id is stored: the cumulative ack.
    pub high_water: u64,
}

/// Datagrams taken off a heartbeat socket per `recvmmsg` (and acks per `sendmmsg`).
pub const BATCH: usize = 64;

/// Receive buffer per datagram: larger than any heartbeat, so a longer datagram is
/// refused by the decoder (oversize, or its MAC fails) rather than read in part.
const DATAGRAM_BUF: usize = 2048;

/// How often a socket thread blocked in `recvmmsg` looks whether it should stop.
const STOP_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Receive buffer asked for on heartbeat sockets (the kernel caps it at
/// `net.core.rmem_max`), so bursts from many hosts wait rather than drop.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Shared by the UDP sockets: one replay guard per host across every path (a watchdog
/// numbers its heartbeats with one counter over all paths).
pub struct HeartbeatIntake {
    state: Mutex<IntakeState>,
    key: Key,
    controller_id: String,
    /// Forward at most one heartbeat per host and path per this many ms to the engine:
    /// the detector's resolution needs no more, and the engine's load stays bounded
    /// whatever the datagram rate. Every heartbeat is still acked.
    forward_every_ms: u64,
    tx: mpsc::Sender<Intake>,
    metrics: Arc<Metrics>,
}

struct IntakeState {
    receiver: HeartbeatReceiver,
    /// Per host, per path index: when a heartbeat was last forwarded (unix ms). Looked
    /// up by `&str`, so a known host costs no allocation.
    last_forwarded_ms: HashMap<String, Vec<(u8, u64)>>,
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The intake's labelled counters, resolved once per socket thread: the hot path
/// increments plain counters and never builds a label set or looks one up. A labelled
/// counter is created on its first use, so /metrics shows only what happened.
pub struct IntakeCounters {
    metrics: Arc<Metrics>,
    rejected: Vec<(&'static str, Counter)>,
    /// By path index.
    received: Vec<Option<Counter>>,
}

impl IntakeCounters {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            rejected: Vec::new(),
            received: vec![None; 256],
        }
    }

    fn reject(&mut self, reason: &'static str) {
        if let Some((_, c)) = self.rejected.iter().find(|(r, _)| *r == reason) {
            c.inc();
            return;
        }
        let c = self
            .metrics
            .heartbeats_rejected
            .get_or_create(&Metrics::label("reason", reason))
            .clone();
        c.inc();
        self.rejected.push((reason, c));
    }

    fn received(&mut self, path: u8) {
        let metrics = &self.metrics;
        self.received[usize::from(path)]
            .get_or_insert_with(|| {
                metrics
                    .heartbeats_received
                    .get_or_create(&Metrics::label("path", path.to_string()))
                    .clone()
            })
            .inc();
    }
}

impl HeartbeatIntake {
    pub fn new(
        key: Key,
        cluster_id: &str,
        controller_id: &str,
        forward_every_ms: u64,
        tx: mpsc::Sender<Intake>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(IntakeState {
                receiver: HeartbeatReceiver::new(key.clone(), cluster_id),
                last_forwarded_ms: HashMap::new(),
            }),
            key,
            controller_id: controller_id.to_string(),
            forward_every_ms,
            tx,
            metrics,
        })
    }

    /// Handles one datagram: true, with its ack in `ack`, if it was accepted.
    pub fn handle(&self, datagram: &[u8], peer: SocketAddr, ack: &mut Vec<u8>) -> bool {
        let mut counters = IntakeCounters::new(self.metrics.clone());
        let mut accepted = [false];
        self.handle_batch(
            &[(datagram, peer)],
            std::slice::from_mut(ack),
            &mut accepted,
            &mut counters,
        );
        accepted[0]
    }

    /// Judges a batch of datagrams under one acquisition of the lock. For each datagram
    /// `i`, `accepted[i]` says whether it was accepted and must be acked, and `acks[i]`
    /// then holds the signed ack. Heartbeats due for the engine are forwarded after the
    /// lock is released. Returns how many were accepted.
    pub fn handle_batch(
        &self,
        datagrams: &[(&[u8], SocketAddr)],
        acks: &mut [Vec<u8>],
        accepted: &mut [bool],
        counters: &mut IntakeCounters,
    ) -> usize {
        let now_ns = unix_ns();
        let now_ms = now_ns / 1_000_000;
        let mut n_accepted = 0;
        let mut forwards = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let IntakeState {
                receiver,
                last_forwarded_ms,
            } = &mut *st;
            for (((datagram, peer), ack), ok) in datagrams.iter().zip(acks).zip(&mut *accepted) {
                *ok = false;
                let verdict = match receiver.receive(datagram) {
                    Ok(a) => a,
                    Err(reason) => {
                        counters.reject(reason.as_str());
                        continue;
                    }
                };
                let hb = verdict.heartbeat;
                if Ack::answering(&hb, &self.controller_id, now_ns)
                    .encode_into(&self.key, ack)
                    .is_err()
                {
                    continue;
                }
                *ok = true;
                n_accepted += 1;
                let new_epoch = !matches!(verdict.freshness, Freshness::Current);
                let paths = match last_forwarded_ms.get_mut(hb.host_id) {
                    Some(p) => p,
                    None => last_forwarded_ms
                        .entry(hb.host_id.to_owned())
                        .or_insert_with(|| Vec::with_capacity(1)),
                };
                let due = match paths.iter_mut().find(|(p, _)| *p == hb.path_index) {
                    Some((_, last)) => {
                        let due =
                            new_epoch || now_ms.saturating_sub(*last) >= self.forward_every_ms;
                        if due {
                            *last = now_ms;
                        }
                        due
                    }
                    None => {
                        paths.push((hb.path_index, now_ms));
                        true
                    }
                };
                if due {
                    forwards.push(HeartbeatSeen {
                        host: hb.host_id.to_string(),
                        path: hb.path_index,
                        peer: *peer,
                        boot_id: hb.boot_id,
                        incarnation: hb.incarnation,
                        sent_unix_ns: hb.sent_unix_ns,
                        status: hb.status,
                    });
                }
            }
        }
        self.metrics.heartbeats_accepted.inc_by(n_accepted as u64);
        for seen in forwards {
            counters.received(seen.path);
            if self.tx.try_send(Intake::Heartbeat(seen)).is_err() {
                counters.reject("engine_busy");
            }
        }
        n_accepted
    }
}

/// Receives heartbeats on one socket and acks each accepted one back to its sender, on a
/// dedicated OS thread ([`spawn_heartbeat_thread`]) that stops once this future is dropped.
pub async fn serve_heartbeats(socket: UdpSocket, intake: Arc<HeartbeatIntake>) {
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
        .and_then(|s| spawn_heartbeat_thread(s, intake, stop));
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
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(STOP_CHECK))?;
    // SAFETY: setsockopt reads a c_int from a live local.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&RECEIVE_BUFFER as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "SO_RCVBUF not raised");
    }
    std::thread::Builder::new()
        .name("defib-heartbeats".into())
        .spawn(move || receive_loop(&socket, &intake, &stop))
}

fn receive_loop(socket: &std::net::UdpSocket, intake: &HeartbeatIntake, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * DATAGRAM_BUF];
    // SAFETY (all zeroed() below): these are plain C structs for which all-zero is valid.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
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
            // SAFETY: i * DATAGRAM_BUF + DATAGRAM_BUF <= bufs.len().
            iovs[i].iov_base = unsafe { base.add(i * DATAGRAM_BUF) }.cast();
            iovs[i].iov_len = DATAGRAM_BUF;
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
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
        let datagrams: Vec<(&[u8], SocketAddr)> = (0..n)
            .map(|i| {
                let len = (msgs[i].msg_len as usize).min(DATAGRAM_BUF);
                // SAFETY: the kernel wrote `len` bytes at this offset; nothing writes to
                // `bufs` until the next recvmmsg, after these slices are gone.
                let bytes = unsafe { std::slice::from_raw_parts(base.add(i * DATAGRAM_BUF), len) };
                let peer = socket_addr(&names[i], msgs[i].msg_hdr.msg_namelen);
                (bytes, peer.unwrap_or(unknown_peer))
            })
            .collect();
        let n_accepted = intake.handle_batch(
            &datagrams,
            &mut acks[..n],
            &mut accepted[..n],
            &mut counters,
        );
        drop(datagrams);
        if n_accepted == 0 {
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

/// Accepts watchdog event streams.
pub async fn serve_events(
    listener: TcpListener,
    key: Key,
    cluster_id: String,
    controller_id: String,
    tx: mpsc::Sender<Intake>,
    metrics: Arc<Metrics>,
    streams: Arc<HostStreams>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let conn = EventConnection {
                    key: key.clone(),
                    cluster_id: cluster_id.clone(),
                    controller_id: controller_id.clone(),
                    tx: tx.clone(),
                    metrics: metrics.clone(),
                    streams: streams.clone(),
                };
                tokio::spawn(async move {
                    if let Err(e) = conn.run(stream).await {
                        tracing::info!(%peer, error = %e, "event stream closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an event stream failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

struct EventConnection {
    key: Key,
    cluster_id: String,
    controller_id: String,
    tx: mpsc::Sender<Intake>,
    metrics: Arc<Metrics>,
    /// Where this stream registers itself once its `Hello` names the host, so edges
    /// can send the watchdog commands (`crate::edges::libvirt`).
    streams: Arc<HostStreams>,
}

impl EventConnection {
    fn reject(&self, reason: &str) {
        self.metrics
            .frames_rejected
            .get_or_create(&Metrics::label("reason", reason))
            .inc();
    }

    async fn run(self, mut stream: TcpStream) -> anyhow::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut decoder = FrameDecoder::new(self.key.clone(), Direction::ToController);
        let mut buf = vec![0u8; 16 * 1024];
        // Set by Hello: which host this stream speaks for, and its epoch for the replies.
        let mut peer: Option<(String, BootId, u64)> = None;
        // Commands for this host's watchdog (registered at Hello, gone when this returns),
        // and the ones sent that wait for their result, by command id.
        let (command_tx, mut commands) = mpsc::channel::<CommandRequest>(COMMANDS_QUEUED);
        let mut _registration: Option<StreamRegistration> = None;
        let mut waiting: HashMap<u64, Vec<oneshot::Sender<CommandAnswer>>> = HashMap::new();
        loop {
            let n = tokio::select! {
                read = stream.read(&mut buf) => read?,
                Some(request) = commands.recv() => {
                    let Some((host, boot_id, incarnation)) = peer.clone() else {
                        continue;
                    };
                    tracing::info!(%host, command_id = request.command_id, command = ?request.command, "command sent to the watchdog");
                    let out = encode_frame(
                        &Envelope {
                            cluster_id: self.cluster_id.clone(),
                            host_id: host,
                            boot_id,
                            incarnation,
                            message: Message::Command {
                                controller_id: self.controller_id.clone(),
                                command_id: request.command_id,
                                command: request.command,
                            },
                        },
                        &self.key,
                    )?;
                    waiting
                        .entry(request.command_id)
                        .or_default()
                        .push(request.reply);
                    stream.write_all(&out).await?;
                    continue;
                }
            };
            if n == 0 {
                return Ok(());
            }
            decoder.push(&buf[..n]);
            loop {
                let env = match decoder.next_frame() {
                    Ok(Some(env)) => env,
                    Ok(None) => break,
                    Err(e) => {
                        self.reject(e.reason().as_str());
                        anyhow::bail!("bad frame: {e}");
                    }
                };
                if env.cluster_id != self.cluster_id {
                    self.reject("unknown_cluster");
                    anyhow::bail!("frame for cluster {:?}", env.cluster_id);
                }
                let reply = match env.message {
                    Message::Hello { last_event_id } => {
                        let (tx, rx) = oneshot::channel();
                        self.tx
                            .send(Intake::Hello {
                                host: env.host_id.clone(),
                                reply: tx,
                            })
                            .await?;
                        let highest = rx.await?;
                        tracing::info!(host = %env.host_id, last_event_id, highest, "event stream opened");
                        peer = Some((env.host_id.clone(), env.boot_id, env.incarnation));
                        _registration =
                            Some(self.streams.register(&env.host_id, command_tx.clone()));
                        Message::Welcome {
                            controller_id: self.controller_id.clone(),
                            highest_event_id: highest,
                        }
                    }
                    Message::Event(event) => {
                        let Some((host, _, _)) = &peer else {
                            self.reject("event_before_hello");
                            anyhow::bail!("event before hello");
                        };
                        if *host != env.host_id {
                            self.reject("host_changed");
                            anyhow::bail!("stream of {host} sent a frame for {}", env.host_id);
                        }
                        let id = event.id;
                        // For the libvirt backend's evacuations, once stored.
                        let definition = match &event.payload {
                            protocol::EventPayload::DomainDefinition { vm_uuid, xml, .. } => {
                                Some((vm_uuid.clone(), xml.clone()))
                            }
                            _ => None,
                        };
                        let (tx, rx) = oneshot::channel();
                        self.tx
                            .send(Intake::Event {
                                host: host.clone(),
                                event: Box::new(event),
                                reply: tx,
                            })
                            .await?;
                        let stored = match rx.await? {
                            Ok(s) => s,
                            // Not stored: no ack, so the watchdog keeps it and resends.
                            Err(e) => anyhow::bail!("event {id} not stored: {e}"),
                        };
                        if let Some((uuid, xml)) = definition {
                            self.streams.note_definition(host, &uuid, &xml);
                        }
                        if stored.new {
                            self.metrics.events_received.inc();
                        } else {
                            self.metrics.events_duplicate.inc();
                        }
                        Message::EventAck {
                            controller_id: self.controller_id.clone(),
                            up_to_event_id: stored.high_water,
                        }
                    }
                    Message::CommandResult {
                        command_id,
                        ok,
                        detail,
                    } => {
                        let host = peer.as_ref().map(|(h, _, _)| h.as_str()).unwrap_or("?");
                        tracing::info!(host, command_id, ok, %detail, "command result");
                        for reply in waiting.remove(&command_id).unwrap_or_default() {
                            let _ = reply.send(CommandAnswer {
                                ok,
                                detail: detail.clone(),
                            });
                        }
                        continue;
                    }
                    other => {
                        self.reject("wrong_direction");
                        anyhow::bail!("unexpected frame {other:?}");
                    }
                };
                let (host, boot_id, incarnation) = peer.clone().unwrap_or_default();
                let out = encode_frame(
                    &Envelope {
                        cluster_id: self.cluster_id.clone(),
                        host_id: host,
                        boot_id,
                        incarnation,
                        message: reply,
                    },
                    &self.key,
                )?;
                stream.write_all(&out).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{decode_ack, encode_heartbeat, Heartbeat};

    const KEY: &[u8] = b"intake-test-key-0123456789abcdef";

    fn key() -> Key {
        Key::new(KEY).unwrap()
    }

    fn hb(host: &str, incarnation: u64, seq: u64, path: u8, key: &Key) -> Vec<u8> {
        encode_heartbeat(
            &Heartbeat {
                cluster_id: "t",
                host_id: host,
                boot_id: BootId([7; 16]),
                incarnation,
                sequence: seq,
                sent_unix_ns: 1,
                sent_mono_ns: seq,
                path_index: path,
                status: HostStatus::default(),
            },
            key,
        )
        .unwrap()
    }

    fn intake(
        forward_every_ms: u64,
        capacity: usize,
    ) -> (Arc<HeartbeatIntake>, mpsc::Receiver<Intake>, Arc<Metrics>) {
        let (tx, rx) = mpsc::channel(capacity);
        let metrics = Arc::new(Metrics::new());
        let i = HeartbeatIntake::new(key(), "t", "ctl", forward_every_ms, tx, metrics.clone());
        (i, rx, metrics)
    }

    fn forwarded(rx: &mut mpsc::Receiver<Intake>) -> Vec<(String, u8, u64)> {
        let mut out = Vec::new();
        while let Ok(Intake::Heartbeat(h)) = rx.try_recv() {
            out.push((h.host, h.path, h.incarnation));
        }
        out
    }

    fn run_batch(i: &HeartbeatIntake, datagrams: &[Vec<u8>]) -> (Vec<bool>, Vec<Vec<u8>>) {
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let batch: Vec<(&[u8], SocketAddr)> =
            datagrams.iter().map(|d| (d.as_slice(), peer)).collect();
        let mut acks = vec![Vec::new(); datagrams.len()];
        let mut accepted = vec![true; datagrams.len()];
        let mut counters = IntakeCounters::new(i.metrics.clone());
        let n = i.handle_batch(&batch, &mut acks, &mut accepted, &mut counters);
        assert_eq!(n, accepted.iter().filter(|a| **a).count());
        (accepted, acks)
    }

    #[test]
    fn a_batch_acks_every_accepted_datagram_and_counts_refusals_by_reason() {
        let (i, mut rx, m) = intake(60_000, 16);
        let k = key();
        let forged = hb(
            "h1",
            5,
            2,
            0,
            &Key::new(b"another-key-0123456789abcdefghij").unwrap(),
        );
        let batch = vec![
            hb("h1", 5, 1, 0, &k),
            hb("h1", 5, 1, 0, &k), // replayed
            forged,
            hb("h1", 5, 3, 0, &k)[..20].to_vec(), // truncated
            hb("h2", 5, 1, 0, &k),
            hb("h1", 5, 2, 0, &k),
        ];
        let (accepted, acks) = run_batch(&i, &batch);
        assert_eq!(accepted, [true, false, false, false, true, true]);
        for (n, seq, host) in [(0, 1, "h1"), (4, 1, "h2"), (5, 2, "h1")] {
            let ack = decode_ack(&acks[n], &k).expect("a valid ack");
            assert_eq!(
                (ack.host_id, ack.sequence, ack.controller_id),
                (host, seq, "ctl")
            );
        }
        assert_eq!(m.heartbeats_accepted.get(), 3);
        let text = m.encode();
        for reason in ["replayed", "bad_mac", "truncated"] {
            assert!(
                text.contains(&format!(
                    "defib_heartbeats_rejected_total{{reason=\"{reason}\"}} 1"
                )),
                "{text}"
            );
        }
        // h1's second accepted heartbeat came well within forward_every_ms.
        assert_eq!(
            forwarded(&mut rx),
            [("h1".to_string(), 0, 5), ("h2".to_string(), 0, 5)]
        );
        assert!(
            text.contains("defib_heartbeats_received_total{path=\"0\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn each_path_is_forwarded_on_its_own_and_a_new_incarnation_at_once() {
        let (i, mut rx, _) = intake(60_000, 16);
        let k = key();
        let batch = vec![
            hb("h1", 5, 1, 0, &k),
            hb("h1", 5, 2, 1, &k),
            hb("h1", 5, 3, 0, &k),
            hb("h1", 5, 4, 1, &k),
            hb("h1", 6, 1, 0, &k), // the watchdog restarted
        ];
        let (accepted, _) = run_batch(&i, &batch);
        assert!(accepted.iter().all(|a| *a));
        assert_eq!(
            forwarded(&mut rx),
            [
                ("h1".to_string(), 0, 5),
                ("h1".to_string(), 1, 5),
                ("h1".to_string(), 0, 6)
            ]
        );
        // With no rate limit every heartbeat goes through.
        let (i, mut rx, _) = intake(0, 16);
        run_batch(&i, &[hb("h1", 5, 1, 0, &k), hb("h1", 5, 2, 0, &k)]);
        assert_eq!(forwarded(&mut rx).len(), 2);
    }

    #[test]
    fn a_full_engine_queue_is_counted_and_the_heartbeat_still_acked() {
        let (i, mut rx, m) = intake(60_000, 1);
        let k = key();
        let mut ack = Vec::new();
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        assert!(i.handle(&hb("h1", 5, 1, 0, &k), peer, &mut ack));
        assert!(i.handle(&hb("h2", 5, 1, 0, &k), peer, &mut ack));
        assert_eq!(decode_ack(&ack, &k).unwrap().host_id, "h2");
        assert_eq!(forwarded(&mut rx).len(), 1);
        assert_eq!(m.heartbeats_accepted.get(), 2);
        assert!(m
            .encode()
            .contains("defib_heartbeats_rejected_total{reason=\"engine_busy\"} 1"));
    }

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
        let thread = spawn_heartbeat_thread(server, i, stop.clone()).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // More than one batch, sent before the thread reads, plus one forgery.
        let n = BATCH as u64 + 10;
        for seq in 1..=n {
            client.send_to(&hb("h1", 5, seq, 0, &k), to).unwrap();
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
        let mut buf = [0u8; 1024];
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
        let peer = match rx.try_recv() {
            Ok(Intake::Heartbeat(h)) => h.peer,
            other => panic!("expected a forwarded heartbeat, got {other:?}"),
        };
        assert_eq!(peer, client.local_addr().unwrap());
        stop.store(true, Ordering::SeqCst);
        thread.join().unwrap();
    }
}
