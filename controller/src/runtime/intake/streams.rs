//! The watchdogs' event streams (TCP): a stream says `Hello` for its host, then its
//! events are stored through the engine task before they are acked, and the commands
//! edges send the host (`crate::edges::libvirt`) go out on it as frames, their results
//! routed back.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use protocol::{
    decode_frame_keyed, encode_frame, frame_codec, BootId, Direction, Envelope, FrameKeys, Key,
    Message,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use super::Intake;
use crate::config::IntakeSection;
use crate::edges::libvirt::{
    CommandAnswer, CommandRequest, HostStreams, StreamRegistration, COMMANDS_QUEUED,
};
use crate::metrics::Metrics;

/// The largest frame body taken before the stream is welcomed: a Hello is a few hundred
/// bytes.
pub const HANDSHAKE_FRAME_MAX: usize = 4096;

/// How the event port treats its connections: the keys frames are checked with, and the
/// bounds on what one source may hold.
#[derive(Clone)]
pub struct StreamSettings {
    /// Per host (the daemon) or one key (tests).
    pub keys: FrameKeys,
    pub per_source: usize,
    pub total: usize,
    /// From accept to a `Hello` answered (the TLS handshake included).
    pub handshake_timeout: Duration,
    /// No frame from the watchdog for this long: closed.
    pub idle_timeout: Duration,
    /// With `[tls]`: streams are TLS, with the controller's certificate.
    pub tls: Option<crate::tls::TlsAcceptor>,
}

impl StreamSettings {
    /// The daemon's settings from `[intake]`.
    pub fn new(keys: FrameKeys, intake: &IntakeSection) -> Self {
        StreamSettings {
            keys,
            per_source: intake.stream_connections_per_source,
            total: intake.stream_connections_total,
            handshake_timeout: Duration::from_millis(intake.stream_handshake_timeout_ms),
            idle_timeout: Duration::from_millis(intake.stream_idle_timeout_ms),
            tls: None,
        }
    }

    /// Streams over TLS with `config`.
    pub fn with_tls(mut self, config: Option<Arc<crate::tls::ServerConfig>>) -> Self {
        self.tls = config.map(crate::tls::TlsAcceptor::from);
        self
    }
}

/// Open connections, per source address and in total; a slot is given back when its
/// [`ConnSlot`] drops.
#[derive(Default)]
struct ConnTable {
    /// Open connections per source address, and in total.
    open: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

struct ConnSlot {
    table: Arc<ConnTable>,
    source: IpAddr,
}

impl ConnTable {
    /// A slot for a new connection from `source`, or why not.
    fn take(
        self: &Arc<Self>,
        source: IpAddr,
        per_source: usize,
        total: usize,
    ) -> Result<ConnSlot, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (by, all) = &mut *open;
        if *all >= total {
            return Err("connections_total");
        }
        let n = by.entry(source).or_insert(0);
        if *n >= per_source {
            return Err("connections_per_source");
        }
        *n += 1;
        *all += 1;
        Ok(ConnSlot {
            table: self.clone(),
            source,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        let (by, all) = &mut *open;
        *all = all.saturating_sub(1);
        if let Some(n) = by.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by.remove(&self.source);
            }
        }
    }
}

/// Accepts watchdog event streams.
pub async fn serve_events(
    listener: TcpListener,
    settings: StreamSettings,
    cluster_id: String,
    controller_id: String,
    tx: mpsc::Sender<Intake>,
    metrics: Arc<Metrics>,
    streams: Arc<HostStreams>,
) {
    let table = Arc::new(ConnTable::default());
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let slot = match table.take(peer.ip(), settings.per_source, settings.total) {
                    Ok(slot) => slot,
                    Err(reason) => {
                        metrics
                            .frames_rejected
                            .get_or_create(&Metrics::label("reason", reason))
                            .inc();
                        tracing::debug!(%peer, reason, "event stream refused at accept");
                        drop(stream);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The handshake deadline counts from here, the TLS handshake included.
                let accepted = tokio::time::Instant::now();
                let conn = EventConnection {
                    keys: settings.keys.clone(),
                    cluster_id: cluster_id.clone(),
                    controller_id: controller_id.clone(),
                    tx: tx.clone(),
                    metrics: metrics.clone(),
                    streams: streams.clone(),
                    handshake_timeout: settings.handshake_timeout,
                    idle_timeout: settings.idle_timeout,
                };
                let tls = settings.tls.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let result = match tls {
                        None => conn.run(stream, accepted).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(
                                conn.handshake_timeout,
                                crate::tls::accept(&acceptor, stream),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => conn.run(tls, accepted).await,
                                Ok(Err(e)) => {
                                    conn.reject("tls_handshake");
                                    Err(anyhow::anyhow!("{e}"))
                                }
                                Err(_) => {
                                    conn.reject("handshake_timeout");
                                    Err(anyhow::anyhow!("TLS handshake timed out"))
                                }
                            }
                        }
                    };
                    if let Err(e) = result {
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
    keys: FrameKeys,
    cluster_id: String,
    controller_id: String,
    tx: mpsc::Sender<Intake>,
    metrics: Arc<Metrics>,
    /// Where this stream registers itself once its `Hello` names the host, so edges
    /// can send the watchdog commands (`crate::edges::libvirt`).
    streams: Arc<HostStreams>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

impl EventConnection {
    fn reject(&self, reason: &str) {
        self.metrics
            .frames_rejected
            .get_or_create(&Metrics::label("reason", reason))
            .inc();
    }

    /// Serves one stream accepted at `opened` (the handshake deadline counts from it).
    async fn run<S>(self, stream: S, opened: tokio::time::Instant) -> anyhow::Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let (read, mut write) = tokio::io::split(stream);
        // Until the stream is welcomed only a small frame (a Hello) is taken: a source
        // that never says Hello cannot make the controller buffer a mebibyte per
        // connection until the handshake timeout.
        let mut codec = frame_codec();
        codec.set_max_frame_length(HANDSHAKE_FRAME_MAX);
        let mut frames = FramedRead::new(read, codec);
        // Set by Hello: which host this stream speaks for, its key, and its epoch for
        // the replies.
        let mut peer: Option<(String, BootId, u64)> = None;
        let mut key: Option<Key> = None;
        // The handshake: the challenge sent for the first Hello, the watchdog's nonce
        // (carried by every frame this side sends), and whether the second Hello, which
        // answered the challenge, was welcomed.
        let mut challenge: Option<u64> = None;
        let mut watchdog_nonce = 0u64;
        let mut welcomed = false;
        // Commands for this host's watchdog (registered at Hello, gone when this returns),
        // and the ones sent that wait for their result, by command id.
        let (command_tx, mut commands) = mpsc::channel::<CommandRequest>(COMMANDS_QUEUED);
        let mut _registration: Option<StreamRegistration> = None;
        let mut waiting: HashMap<u64, Vec<oneshot::Sender<CommandAnswer>>> = HashMap::new();
        loop {
            // Before Hello the handshake deadline holds; after it, the idle timeout.
            let wait = if welcomed {
                self.idle_timeout
            } else {
                self.handshake_timeout.saturating_sub(opened.elapsed())
            };
            let frame = tokio::select! {
                next = tokio::time::timeout(wait, frames.next()) => match next {
                    Err(_) => {
                        let reason = if welcomed { "idle_timeout" } else { "handshake_timeout" };
                        self.reject(reason);
                        anyhow::bail!("no frame within {wait:?} ({reason})");
                    }
                    Ok(None) => return Ok(()),
                    Ok(Some(Err(e))) => {
                        let reason = if e.kind() == std::io::ErrorKind::InvalidData { "oversize" } else { "read_failed" };
                        self.reject(reason);
                        anyhow::bail!("reading the stream: {e}");
                    }
                    Ok(Some(Ok(frame))) => frame,
                },
                Some(request) = commands.recv() => {
                    let (Some((host, boot_id, incarnation)), Some(key), true) = (peer.clone(), key.as_ref(), welcomed) else {
                        continue;
                    };
                    tracing::info!(%host, command_id = request.command_id, command = ?request.command, "command sent to the watchdog");
                    let out = encode_frame(
                        &Envelope {
                            cluster_id: self.cluster_id.clone(),
                            host_id: host,
                            boot_id,
                            incarnation,
                            conn: watchdog_nonce,
                            message: Message::Command {
                                controller_id: self.controller_id.clone(),
                                command_id: request.command_id,
                                command: request.command,
                            },
                        },
                        key,
                    )?;
                    waiting
                        .entry(request.command_id)
                        .or_default()
                        .push(request.reply);
                    write.write_all(&out).await?;
                    continue;
                }
            };
            {
                let env = match decode_frame_keyed(&frame, &self.keys, Direction::ToController) {
                    Ok(env) => env,
                    Err(e) => {
                        self.reject(e.reason().as_str());
                        anyhow::bail!("bad frame: {e}");
                    }
                };
                if env.cluster_id != self.cluster_id {
                    self.reject("unknown_cluster");
                    anyhow::bail!("frame for cluster {:?}", env.cluster_id);
                }
                if let Some((host, _, _)) = &peer {
                    if *host != env.host_id {
                        self.reject("host_changed");
                        anyhow::bail!("stream of {host} sent a frame for {}", env.host_id);
                    }
                }
                // After the challenge, every frame must carry it.
                if let Some(c) = challenge {
                    if env.conn != c {
                        self.reject("wrong_connection");
                        anyhow::bail!("a frame not bound to this connection's challenge");
                    }
                }
                let reply = match env.message {
                    Message::Hello { nonce, .. } if challenge.is_none() => {
                        // The first Hello names the host (and so the key) and brings the
                        // watchdog's nonce; it proves nothing yet (it may be recorded):
                        // answer with a challenge only a holder of the host's key can
                        // answer with a second Hello.
                        if nonce == 0 {
                            self.reject("no_nonce");
                            anyhow::bail!("a Hello without a nonce from {}", env.host_id);
                        }
                        key = match &self.keys {
                            FrameKeys::One(k) => Some(k.clone()),
                            FrameKeys::PerHost(f) => f(&env.host_id),
                        };
                        peer = Some((env.host_id.clone(), env.boot_id, env.incarnation));
                        watchdog_nonce = nonce;
                        let c = protocol::fresh_nonce();
                        challenge = Some(c);
                        Message::Challenge { nonce: c }
                    }
                    Message::Hello { last_event_id, .. } => {
                        if welcomed {
                            self.reject("second_hello");
                            anyhow::bail!("a second Hello on the stream of {}", env.host_id);
                        }
                        let (tx, rx) = oneshot::channel();
                        self.tx
                            .send(Intake::Hello {
                                host: env.host_id.clone(),
                                reply: tx,
                            })
                            .await?;
                        let highest = match rx.await? {
                            Ok(h) => h,
                            Err(why) => {
                                tracing::info!(host = %env.host_id, %why, "event stream refused");
                                anyhow::bail!("stream of {} refused: {why}", env.host_id);
                            }
                        };
                        tracing::info!(host = %env.host_id, last_event_id, highest, "event stream opened");
                        welcomed = true;
                        frames
                            .decoder_mut()
                            .set_max_frame_length(protocol::MAX_FRAME_BODY_LEN);
                        _registration =
                            Some(self.streams.register(&env.host_id, command_tx.clone()));
                        Message::Welcome {
                            controller_id: self.controller_id.clone(),
                            highest_event_id: highest,
                        }
                    }
                    Message::Event(event) => {
                        let (Some((host, _, _)), true) = (&peer, welcomed) else {
                            self.reject("event_before_hello");
                            anyhow::bail!("event before hello");
                        };
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
                        // A duplicate (a resend, or a replay) changes nothing: the
                        // definition noted is the one stored first under this id.
                        if let (Some((uuid, xml)), true) = (definition, stored.new) {
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
                        if !welcomed {
                            self.reject("result_before_hello");
                            anyhow::bail!("a command result before hello");
                        }
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
                let Some(key) = key.as_ref() else {
                    // Revoked between the frame's check and Hello's lookup.
                    self.reject("unknown_host");
                    anyhow::bail!("no key for {host}");
                };
                let out = encode_frame(
                    &Envelope {
                        cluster_id: self.cluster_id.clone(),
                        host_id: host,
                        boot_id,
                        incarnation,
                        conn: watchdog_nonce,
                        message: reply,
                    },
                    key,
                )?;
                write.write_all(&out).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use protocol::frame::HostCommand;

    use super::*;
    use crate::edges::libvirt::LibvirtRestorer;
    use crate::edges::Restorer;
    use crate::engine::{HostId, Input, IntentKey, Resource, RestoreOutcome};
    use protocol::FrameDecoder;
    use tokio::io::AsyncReadExt;

    /// The whole path over a real loopback socket: the intake registers the stream at
    /// `Hello`, sends the restorer's command as a frame, and routes the watchdog's
    /// result back; the registration goes when the stream closes. (It was the libvirt
    /// edge's test; it lives here because an edge must not reach into the runtime.)
    /// A port with tight bounds for the tests below: 2 streams per source, 300 ms to
    /// say Hello; an intake that stores every event as new unless `dup` says it is a
    /// duplicate.
    use std::net::SocketAddr;

    async fn bounded_port(
        dup: Arc<std::sync::atomic::AtomicBool>,
    ) -> (SocketAddr, Arc<Metrics>, Arc<HostStreams>, Key) {
        let mac = Key::new(b"bounds-test-key-0123456789abcdef").unwrap();
        let streams = HostStreams::new();
        let metrics = Arc::new(Metrics::new());
        let (intake_tx, mut intake_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(msg) = intake_rx.recv().await {
                match msg {
                    Intake::Hello { reply, .. } => {
                        let _ = reply.send(Ok(0));
                    }
                    Intake::Event { event, reply, .. } => {
                        let new = !dup.load(std::sync::atomic::Ordering::SeqCst);
                        let _ = reply.send(Ok(super::super::EventStored {
                            new,
                            high_water: event.id,
                        }));
                    }
                    Intake::Heartbeats(_) => {}
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let intake = crate::config::IntakeSection {
            stream_connections_per_source: 2,
            stream_handshake_timeout_ms: 300,
            ..Default::default()
        };
        tokio::spawn(serve_events(
            listener,
            StreamSettings::new(FrameKeys::One(mac.clone()), &intake),
            "c".into(),
            "ctl".into(),
            intake_tx,
            metrics.clone(),
            streams.clone(),
        ));
        (addr, metrics, streams, mac)
    }

    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn a_silent_stream_is_closed_at_the_handshake_timeout_and_a_third_from_one_source_at_accept(
    ) {
        let (addr, metrics, _, _) = bounded_port(Arc::default()).await;
        let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = tokio::net::TcpStream::connect(addr).await.unwrap();
        // One byte, as a slowloris sends it: not a Hello.
        b.write_all(b"D").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut c, Duration::from_millis(200)).await,
            "a third stream from one source is refused at accept"
        );
        assert!(closed_within(&mut a, Duration::from_secs(5)).await);
        assert!(closed_within(&mut b, Duration::from_secs(5)).await);
        let text = metrics.encode();
        for line in [
            "defib_frames_rejected_total{reason=\"connections_per_source\"} 1",
            "defib_frames_rejected_total{reason=\"handshake_timeout\"} 2",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        // Their slots are given back.
        let mut d = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(!closed_within(&mut d, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn a_frame_declaring_more_than_a_mebibyte_ends_the_stream_before_its_body_arrives() {
        let (addr, metrics, _, _) = bounded_port(Arc::default()).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut header = b"DFIB\x01\x03\x00\x00".to_vec();
        header.extend_from_slice(&(protocol::MAX_FRAME_BODY_LEN as u32 + 1).to_be_bytes());
        s.write_all(&header).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        assert!(metrics
            .encode()
            .contains("defib_frames_rejected_total{reason=\"oversize\"} 1"));
    }

    #[tokio::test]
    async fn before_its_hello_a_stream_may_not_announce_more_than_a_small_frame() {
        let (addr, metrics, _, _) = bounded_port(Arc::default()).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut header = b"DFIB\x01\x03\x00\x00".to_vec();
        header.extend_from_slice(&(HANDSHAKE_FRAME_MAX as u32 + 1).to_be_bytes());
        s.write_all(&header).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(5)).await);
        assert!(metrics
            .encode()
            .contains("defib_frames_rejected_total{reason=\"oversize\"} 1"));
    }

    #[tokio::test]
    async fn a_duplicate_event_does_not_overwrite_the_domain_definition_stored_first() {
        let dup = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (addr, _, streams, mac) = bounded_port(dup.clone()).await;
        let mut wd = tokio::net::TcpStream::connect(addr).await.unwrap();
        let env = |conn, message| Envelope {
            cluster_id: "c".into(),
            host_id: "h1".into(),
            boot_id: BootId([7; 16]),
            incarnation: 1,
            conn,
            message,
        };
        let mut decoder = FrameDecoder::new(mac.clone(), Direction::ToWatchdog);
        let mut buf = vec![0u8; 4096];
        let mut next_frame = async |wd: &mut tokio::net::TcpStream| loop {
            if let Some(env) = decoder.next_frame().unwrap() {
                return env.message;
            }
            let n = wd.read(&mut buf).await.unwrap();
            assert!(n > 0, "the controller closed the stream");
            decoder.push(&buf[..n]);
        };
        let hello = Message::Hello {
            last_event_id: 0,
            nonce: 5,
        };
        wd.write_all(&encode_frame(&env(0, hello.clone()), &mac).unwrap())
            .await
            .unwrap();
        let Message::Challenge { nonce: c } = next_frame(&mut wd).await else {
            panic!("expected a challenge");
        };
        wd.write_all(&encode_frame(&env(c, hello), &mac).unwrap())
            .await
            .unwrap();
        assert!(matches!(next_frame(&mut wd).await, Message::Welcome { .. }));
        let definition = |xml: &str| {
            Message::Event(protocol::Event {
                id: 1,
                unix_ns: 1,
                mono_ns: 1,
                payload: protocol::EventPayload::DomainDefinition {
                    vm_uuid: "u-1".into(),
                    vm_name: "vm1".into(),
                    xml: xml.into(),
                },
            })
        };
        wd.write_all(&encode_frame(&env(c, definition("<domain>first</domain>")), &mac).unwrap())
            .await
            .unwrap();
        assert!(matches!(
            next_frame(&mut wd).await,
            Message::EventAck { .. }
        ));
        // The same event id again, with another definition: a duplicate.
        dup.store(true, std::sync::atomic::Ordering::SeqCst);
        wd.write_all(&encode_frame(&env(c, definition("<domain>forged</domain>")), &mac).unwrap())
            .await
            .unwrap();
        assert!(matches!(
            next_frame(&mut wd).await,
            Message::EventAck { .. }
        ));
        assert_eq!(
            streams.definition("u-1").unwrap().xml,
            "<domain>first</domain>"
        );
    }

    #[tokio::test]
    async fn over_the_event_stream_a_command_goes_out_as_a_frame_and_its_result_comes_back() {
        let mac = Key::new(b"backend-test-key-0123456789abcdef").unwrap();
        let streams = HostStreams::new();
        let (intake_tx, mut intake_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(msg) = intake_rx.recv().await {
                if let Intake::Hello { reply, .. } = msg {
                    let _ = reply.send(Ok(0));
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_events(
            listener,
            StreamSettings::new(
                FrameKeys::One(mac.clone()),
                &crate::config::IntakeSection::default(),
            ),
            "c".into(),
            "ctl".into(),
            intake_tx,
            Arc::new(Metrics::new()),
            streams.clone(),
        ));

        let mut wd = tokio::net::TcpStream::connect(addr).await.unwrap();
        let env_on = |conn, message| Envelope {
            cluster_id: "c".into(),
            host_id: "h1".into(),
            boot_id: BootId([7; 16]),
            incarnation: 1,
            conn,
            message,
        };
        let mut decoder = FrameDecoder::new(mac.clone(), Direction::ToWatchdog);
        let mut buf = vec![0u8; 4096];
        let mut next_frame = async |wd: &mut tokio::net::TcpStream| loop {
            if let Some(env) = decoder.next_frame().unwrap() {
                assert_eq!(env.conn, 77, "every controller frame carries our nonce");
                return env.message;
            }
            let n = wd.read(&mut buf).await.unwrap();
            assert!(n > 0, "the controller closed the stream");
            decoder.push(&buf[..n]);
        };
        let hello = Message::Hello {
            last_event_id: 0,
            nonce: 77,
        };
        wd.write_all(&encode_frame(&env_on(0, hello.clone()), &mac).unwrap())
            .await
            .unwrap();
        let Message::Challenge { nonce: challenge } = next_frame(&mut wd).await else {
            panic!("expected a challenge");
        };
        assert_eq!(
            streams.hosts(),
            Vec::<String>::new(),
            "not before the answer"
        );
        wd.write_all(&encode_frame(&env_on(challenge, hello), &mac).unwrap())
            .await
            .unwrap();
        assert!(matches!(next_frame(&mut wd).await, Message::Welcome { .. }));
        let env = |message| env_on(challenge, message);
        assert_eq!(streams.hosts(), ["h1"]);

        let (results_tx, mut results) = mpsc::unbounded_channel();
        let mut r = LibvirtRestorer::new(results_tx, streams.clone());
        let k = IntentKey("5/restart-1/vm:u-9".into());
        r.restart_in_place(&Resource::vm("u-9"), &HostId::new("h1"), 1, &k);
        let Message::Command {
            controller_id,
            command_id,
            command,
        } = next_frame(&mut wd).await
        else {
            panic!("expected a command");
        };
        assert_eq!(controller_id, "ctl");
        assert_eq!(command_id, crate::edges::libvirt::command_id(&k));
        assert_eq!(
            command,
            HostCommand::StartDomain {
                vm_uuid: "u-9".into()
            }
        );
        let result = Message::CommandResult {
            command_id,
            ok: true,
            detail: "started".into(),
        };
        wd.write_all(&encode_frame(&env(result), &mac).unwrap())
            .await
            .unwrap();
        let (resource, got, outcome) =
            match tokio::time::timeout(Duration::from_secs(60), results.recv()).await {
                Ok(Some(Input::RestoreResult {
                    resource,
                    key,
                    outcome,
                })) => (resource, key, outcome),
                other => panic!("expected a restore result, got {other:?}"),
            };
        assert_eq!((resource, got), (Resource::vm("u-9"), k));
        assert_eq!(
            outcome,
            RestoreOutcome::Ok {
                host: HostId::new("h1")
            }
        );

        drop(wd);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !streams.hosts().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "still registered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
