//! The reliable event stream to the controller over TCP: at-least-once delivery of
//! the spooled events, with per-host ids the controller deduplicates.
//!
//! One connection at a time. On connect: send `Hello {last_event_id}`, wait for
//! `Welcome {highest_event_id}`, release what the controller already holds, send every
//! spooled event above it in id order, then new events as they come. The controller's
//! cumulative `EventAck` releases events from the spool. Any error (refused, reset,
//! a bad frame, no `Welcome` or no ack in time) drops the connection. Events keep
//! going into the spool the whole time, whatever the connection is doing.
//!
//! Several controllers (`controller.event_addrs`), one of which leads: a follower
//! accepts the connection, reads the `Hello` and closes it without a `Welcome`
//! (redirect by refusal). The task tries the addresses in rounds: the one that led
//! last first, then the others in the configured order, each at once after the one
//! before failed (refused, unreachable, no `Welcome`), until one welcomes it. Only
//! when every address of a round failed does it wait (exponential backoff with
//! jitter) before the next round. Once welcomed it stays on that connection; when it
//! is lost, the next round starts (after the backoff's shortest delay, as the
//! `Welcome` reset it) at that same address: after a short blip it likely still leads.
//! One address is the same with rounds of one.
//!
//! The controller may also send `Command`s on an established stream (today
//! `StartDomain`, for its libvirt backend): each runs in its own task
//! ([`crate::libvirt::commands::execute`]) and its `CommandResult` is written back on
//! the same connection. A result whose connection is gone meanwhile is dropped; the
//! controller fails the command on its side and may send it again (commands are
//! idempotent).
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt as _;
use protocol::{decode_frame_keyed, encode_frame, Direction, Envelope, FrameKeys, Key, Message};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use super::sink::PendingEvent;
use super::spool::Spool;
use super::{stopped, RunIdentity};

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the controller may take to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one frame may take to write (a controller that stops reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sent events may wait for an ack before the connection is presumed dead: a
/// controller host that vanished leaves a TCP connection that looks open for minutes.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the stream task publishes about itself (a `tokio::sync::watch`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStatus {
    /// A controller answered `Hello` on the current connection.
    pub connected: bool,
    /// Which controller, once connected (its `controller_id`).
    pub controller_id: Option<String>,
    /// The address of the controller the stream is connected to, once connected: of
    /// several controllers, the leader.
    pub addr: Option<SocketAddr>,
    /// Events in the spool waiting for an ack.
    pub spooled: usize,
    /// The highest event id handed out.
    pub last_event_id: u64,
    /// Every event up to this id is acked (or dropped).
    pub released_up_to: u64,
    /// Events dropped unsent because the spool was full, since start.
    pub dropped: u64,
    /// Wall-clock stamp (unix ns) of the oldest event waiting in the spool.
    pub oldest_pending_unix_ns: Option<u64>,
}

/// Reconnect delays: start at `min`, double after every failure up to `max`, reset
/// after a successful `Welcome`. Each delay is drawn uniformly from its upper half, so
/// watchdogs cut off together do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Back to the shortest delay (after a good connection).
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A command of the controller, carried out; its result goes back on the connection
/// it came on.
#[derive(Debug)]
struct CommandDone {
    command_id: u64,
    ok: bool,
    detail: String,
}

/// How a connection ended.
enum Ended {
    Shutdown,
    /// Before a `Welcome`: no connection, a write failed, no `Welcome` in time, a bad
    /// or foreign frame.
    Failed(String),
    /// Closed (or reset) by the controller after the `Hello`, without a `Welcome`: a
    /// follower's refusal (or a controller going away just then).
    Refused(String),
    /// An established stream (after a `Welcome`) ended.
    Lost(String),
}

impl Ended {
    /// The same failure, before the `Welcome`.
    fn before_welcome(self) -> Ended {
        match self {
            Ended::Lost(reason) => Ended::Failed(reason),
            other => other,
        }
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum ReadError {
    /// The controller closed the connection.
    Closed,
    /// Reading failed (reset, …).
    Io(String),
    /// A frame that does not decode or verify.
    BadFrame(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Closed => f.write_str("closed by the controller"),
            ReadError::Io(e) => write!(f, "read: {e}"),
            ReadError::BadFrame(e) => write!(f, "bad frame: {e}"),
        }
    }
}

/// The stream task's state; the spool lives here alone, so nothing else touches it.
pub(crate) struct EventStream {
    pub identity: RunIdentity,
    pub key: Key,
    /// With `controller.ca_file`: connections are TLS.
    pub tls: Option<super::StreamTls>,
    /// The current connection's binding (protocol `Envelope::conn`): the controller's
    /// challenge, carried by every frame sent, and this side's nonce, which every frame
    /// received must carry. 0 between connections.
    pub conn_out: u64,
    pub conn_in: u64,
    /// Every controller's event address, in the configured order; not empty.
    pub addrs: Vec<SocketAddr>,
    /// Index in `addrs` of the controller that welcomed the stream last (0 before
    /// any did): each round starts there.
    pub last_leader: usize,
    pub spool: Spool,
    pub events: mpsc::UnboundedReceiver<PendingEvent>,
    pub events_open: bool,
    pub status: watch::Sender<StreamStatus>,
    pub backoff: Backoff,
}

impl EventStream {
    /// Connects, streams, reconnects, until `shutdown` turns true; then moves every
    /// event still in the channel into the spool and returns.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> StreamStatus {
        self.publish(None);
        // Rounds in a row in which no controller welcomed the stream: moves between
        // addresses are logged at info in the first, at debug in the following ones
        // (a long outage must not flood the log).
        let mut failed_rounds: u32 = 0;
        'rounds: loop {
            let order = self.round_order();
            let mut lost = false;
            for (k, &index) in order.iter().enumerate() {
                // round_order gives indexes into `addrs` only.
                let addr = self.addrs[index];
                let next = order.get(k + 1).map(|&i| self.addrs[i]);
                let loud = failed_rounds == 0;
                match self.connect_and_stream(index, &mut shutdown).await {
                    Ended::Shutdown => break 'rounds,
                    Ended::Lost(reason) => {
                        self.publish(None);
                        tracing::warn!(%addr, %reason, "event stream lost; reconnecting");
                        failed_rounds = 0;
                        lost = true;
                        break;
                    }
                    Ended::Refused(reason) => match next {
                        Some(next) if loud => tracing::info!(
                            %reason,
                            "event stream: {addr} refused (not the leader?); trying {next}"
                        ),
                        Some(next) => tracing::debug!(
                            %reason,
                            "event stream: {addr} refused (not the leader?); trying {next}"
                        ),
                        None => tracing::debug!(%addr, %reason, "event stream refused"),
                    },
                    Ended::Failed(reason) => match next {
                        Some(next) if loud => tracing::info!(
                            %reason,
                            "event stream: {addr} failed; trying {next}"
                        ),
                        Some(next) => tracing::debug!(
                            %reason,
                            "event stream: {addr} failed; trying {next}"
                        ),
                        None => tracing::debug!(%addr, %reason, "event stream not connected"),
                    },
                }
            }
            let delay = self.backoff.next_delay();
            if !lost {
                failed_rounds = failed_rounds.saturating_add(1);
                if failed_rounds == 1 && self.addrs.len() > 1 {
                    tracing::info!(
                        addrs = ?self.addrs,
                        ?delay,
                        "event stream: no controller accepted it; trying them all again after a delay"
                    );
                } else {
                    tracing::debug!(?delay, failed_rounds, "event stream: round failed");
                }
            }
            if self
                .while_spooling(&mut shutdown, tokio::time::sleep(delay))
                .await
                .is_none()
            {
                break;
            }
        }
        self.flush();
        self.publish(None);
        self.status.borrow().clone()
    }

    /// The indexes in `addrs` to try in the next round: the controller that led last
    /// (likely still leading after a short blip), then the others in the configured
    /// order.
    fn round_order(&self) -> Vec<usize> {
        round_order(self.addrs.len(), self.last_leader)
    }

    /// Takes every event already queued into the spool (appends are fsynced, so once
    /// they are in, they are on disk).
    fn flush(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.spool_event(event);
        }
    }

    fn spool_event(&mut self, event: PendingEvent) {
        match self
            .spool
            .append(event.unix_ns, event.mono_ns, event.payload)
        {
            Ok(id) => tracing::debug!(event_id = id, "event spooled"),
            Err(e) => tracing::error!(
                error = %e,
                "cannot write an event to the spool; it is kept in memory only"
            ),
        }
        self.publish_counts();
    }

    /// Runs `fut` while still taking events into the spool; `None` on shutdown.
    async fn while_spooling<F: Future>(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        fut: F,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                _ = stopped(shutdown) => return None,
                out = &mut fut => return Some(out),
                event = self.events.recv(), if self.events_open => match event {
                    Some(event) => self.spool_event(event),
                    None => self.events_open = false,
                },
            }
        }
    }

    fn envelope(&self, message: Message) -> Envelope {
        Envelope {
            cluster_id: self.identity.cluster_id.clone(),
            host_id: self.identity.host_id.clone(),
            boot_id: self.identity.boot_id,
            incarnation: self.identity.incarnation,
            conn: self.conn_out,
            message,
        }
    }

    /// A reply from the controller must echo this run's identity.
    fn is_for_us(&self, envelope: &Envelope) -> bool {
        envelope.cluster_id == self.identity.cluster_id
            && envelope.host_id == self.identity.host_id
            && envelope.boot_id == self.identity.boot_id
            && envelope.incarnation == self.identity.incarnation
            && envelope.conn == self.conn_in
    }

    /// One connection to `addrs[index]`, until it ends; a `Welcome` makes `index` the
    /// last leader.
    async fn connect_and_stream(
        &mut self,
        index: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let Some(addr) = self.addrs.get(index).copied() else {
            return Ended::Failed(format!("no event address {index}"));
        };
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
        let stream = match self.while_spooling(shutdown, connect).await {
            None => return Ended::Shutdown,
            Some(Err(_)) => return Ended::Failed("connect timed out".into()),
            Some(Ok(Err(e))) => return Ended::Failed(format!("connect: {e}")),
            Some(Ok(Ok(stream))) => stream,
        };
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Duplex> = match self.tls.clone() {
            None => Box::new(stream),
            Some(tls) => {
                let handshake = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(addr, stream));
                match self.while_spooling(shutdown, handshake).await {
                    None => return Ended::Shutdown,
                    Some(Err(_)) => return Ended::Failed("TLS handshake timed out".into()),
                    Some(Ok(Err(e))) => return Ended::Failed(format!("TLS: {e}")),
                    Some(Ok(Ok(tls))) => Box::new(tls),
                }
            }
        };
        let (read_half, mut writer) = tokio::io::split(stream);
        // A separate reader keeps acks flowing while a long resend is being written,
        // so neither side can block the other with full buffers.
        let (inbound_tx, mut inbound) = mpsc::channel(64);
        let _reader = AbortOnDrop(tokio::spawn(read_frames(
            read_half,
            self.key.clone(),
            inbound_tx,
        )));

        // The handshake: Hello with a fresh nonce of ours; the controller's Challenge
        // (carrying our nonce); Hello again, carrying the challenge; Welcome.
        self.conn_out = 0;
        self.conn_in = protocol::fresh_nonce();
        let hello = self.envelope(Message::Hello {
            last_event_id: self.spool.last_assigned_id(),
            nonce: self.conn_in,
        });
        if let Err(ended) = self.write(shutdown, &mut writer, &hello).await {
            return ended.before_welcome();
        }
        let challenge = match self.handshake_reply(shutdown, &mut inbound).await {
            Err(ended) => return ended,
            Ok(envelope) => match envelope.message {
                Message::Challenge { nonce } if self.is_for_us(&envelope) && nonce != 0 => nonce,
                other => {
                    return Ended::Failed(format!("expected a challenge for us, got {other:?}"))
                }
            },
        };
        self.conn_out = challenge;
        let answer = self.envelope(Message::Hello {
            last_event_id: self.spool.last_assigned_id(),
            nonce: self.conn_in,
        });
        if let Err(ended) = self.write(shutdown, &mut writer, &answer).await {
            return ended.before_welcome();
        }
        let (controller_id, highest) = match self.handshake_reply(shutdown, &mut inbound).await {
            Err(ended) => return ended,
            Ok(envelope) => match envelope.message {
                Message::Welcome {
                    controller_id,
                    highest_event_id,
                } if self.is_for_us(&envelope) => (controller_id, highest_event_id),
                other => return Ended::Failed(format!("expected a welcome for us, got {other:?}")),
            },
        };
        if let Err(e) = self
            .spool
            .continue_above(highest)
            .and_then(|()| self.spool.release_up_to(highest))
        {
            tracing::error!(error = %e, "cannot update the event spool");
        }
        self.backoff.reset();
        self.last_leader = index;
        tracing::info!(
            %addr,
            %controller_id,
            controller_highest = highest,
            resending = self.spool.len(),
            "event stream connected"
        );
        self.publish(Some((addr, controller_id)));

        let mut sent_up_to = highest;
        // Since when sent events have waited for an ack without progress.
        let mut awaiting_ack_since: Option<Instant> = None;
        // Results of the controller's commands, to be written back on this connection.
        let (results_tx, mut results) = mpsc::unbounded_channel::<CommandDone>();
        loop {
            while let Some(event) = self.spool.first_after(sent_up_to) {
                let id = event.id;
                let envelope = self.envelope(Message::Event(event.clone()));
                if let Err(ended) = self.write(shutdown, &mut writer, &envelope).await {
                    return ended;
                }
                sent_up_to = id;
                awaiting_ack_since.get_or_insert_with(Instant::now);
                while let Ok(message) = inbound.try_recv() {
                    if let Err(reason) =
                        self.take_reply(message, sent_up_to, &mut awaiting_ack_since, &results_tx)
                    {
                        return Ended::Lost(reason);
                    }
                }
            }
            let ack_deadline = awaiting_ack_since.map(|t| t + ACK_TIMEOUT);
            tokio::select! {
                _ = stopped(shutdown) => return Ended::Shutdown,
                event = self.events.recv(), if self.events_open => match event {
                    Some(event) => self.spool_event(event),
                    None => self.events_open = false,
                },
                message = inbound.recv() => {
                    let Some(message) = message else {
                        return Ended::Lost("connection closed".into());
                    };
                    if let Err(reason) = self.take_reply(message, sent_up_to, &mut awaiting_ack_since, &results_tx) {
                        return Ended::Lost(reason);
                    }
                }
                Some(done) = results.recv() => {
                    let envelope = self.envelope(Message::CommandResult {
                        command_id: done.command_id,
                        ok: done.ok,
                        detail: done.detail,
                    });
                    if let Err(ended) = self.write(shutdown, &mut writer, &envelope).await {
                        return ended;
                    }
                }
                _ = sleep_until_some(ack_deadline) => {
                    return Ended::Lost(format!("no event ack for {ACK_TIMEOUT:?}"));
                }
            }
        }
    }

    /// The controller's next frame during the handshake, within [`WELCOME_TIMEOUT`].
    async fn handshake_reply(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        inbound: &mut mpsc::Receiver<Result<Envelope, ReadError>>,
    ) -> Result<Envelope, Ended> {
        let reply = tokio::time::timeout(WELCOME_TIMEOUT, inbound.recv());
        match self.while_spooling(shutdown, reply).await {
            None => Err(Ended::Shutdown),
            Some(Err(_)) => Err(Ended::Failed("no welcome in time".into())),
            Some(Ok(None)) => Err(Ended::Refused("connection closed".into())),
            Some(Ok(Some(Err(e @ (ReadError::Closed | ReadError::Io(_)))))) => {
                Err(Ended::Refused(e.to_string()))
            }
            Some(Ok(Some(Err(e)))) => Err(Ended::Failed(e.to_string())),
            Some(Ok(Some(Ok(envelope)))) => Ok(envelope),
        }
    }

    /// Handles one frame from the controller on an established stream.
    fn take_reply(
        &mut self,
        message: Result<Envelope, ReadError>,
        sent_up_to: u64,
        awaiting_ack_since: &mut Option<Instant>,
        command_results: &mpsc::UnboundedSender<CommandDone>,
    ) -> Result<(), String> {
        let envelope = message.map_err(|e| e.to_string())?;
        if !self.is_for_us(&envelope) {
            return Err("a frame for another watchdog run".into());
        }
        match envelope.message {
            Message::EventAck { up_to_event_id, .. } => {
                // Never release what was not sent on this connection.
                let up_to = up_to_event_id.min(sent_up_to);
                if up_to > self.spool.released_up_to() {
                    if let Err(e) = self.spool.release_up_to(up_to) {
                        tracing::error!(error = %e, "cannot record an event ack in the spool");
                    }
                    *awaiting_ack_since = (up_to < sent_up_to).then(Instant::now);
                    self.publish_counts();
                }
                Ok(())
            }
            Message::Command {
                controller_id,
                command_id,
                command,
            } => {
                tracing::info!(%controller_id, command_id, ?command, "command from the controller");
                let results = command_results.clone();
                // Called here, not in the task: its place among the domain's commands
                // is the order they arrived in.
                let job = crate::libvirt::commands::execute(command);
                tokio::spawn(async move {
                    let (ok, detail) = job.await;
                    if ok {
                        tracing::info!(command_id, %detail, "command done");
                    } else {
                        tracing::warn!(command_id, %detail, "command failed");
                    }
                    let _ = results.send(CommandDone {
                        command_id,
                        ok,
                        detail,
                    });
                });
                Ok(())
            }
            other => Err(format!("unexpected frame {other:?}")),
        }
    }

    /// Writes one frame, still spooling events meanwhile.
    async fn write(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        writer: &mut (impl AsyncWrite + Unpin),
        envelope: &Envelope,
    ) -> Result<(), Ended> {
        let frame = match encode_frame(envelope, &self.key) {
            Ok(frame) => frame,
            Err(e) => {
                // Only an event beyond the frame size limit can fail here; skipping it
                // beats wedging the stream on it forever.
                tracing::error!(error = %e, "cannot encode a frame; skipped");
                return Ok(());
            }
        };
        let write = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&frame));
        match self.while_spooling(shutdown, write).await {
            None => Err(Ended::Shutdown),
            Some(Err(_)) => Err(Ended::Lost("write timed out".into())),
            Some(Ok(Err(e))) => Err(Ended::Lost(format!("write: {e}"))),
            Some(Ok(Ok(()))) => Ok(()),
        }
    }

    /// The connection's state: the controller's address and id while connected.
    fn publish(&self, connection: Option<(SocketAddr, String)>) {
        self.status.send_modify(|s| {
            s.connected = connection.is_some();
            (s.addr, s.controller_id) = connection.unzip();
        });
        self.publish_counts();
    }

    fn publish_counts(&self) {
        let spool = &self.spool;
        self.status.send_if_modified(|s| {
            let before = s.clone();
            s.spooled = spool.len();
            s.last_event_id = spool.last_assigned_id();
            s.released_up_to = spool.released_up_to();
            s.dropped = spool.dropped();
            s.oldest_pending_unix_ns = spool.pending().next().map(|e| e.unix_ns);
            *s != before
        });
    }
}

/// The order of one round over `len` addresses: `first` (the last leader), then the
/// others in the configured order.
fn round_order(len: usize, first: usize) -> Vec<usize> {
    let first = if first < len { Some(first) } else { None };
    first
        .into_iter()
        .chain((0..len).filter(|&i| Some(i) != first))
        .collect()
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A connection to a controller: plain TCP or TLS over it.
trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// Aborts the task when dropped, so a connection's reader never outlives it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads frames from the controller (tokio-util's length-delimited codec over the frame
/// header) and passes them on; the first error (or the end of the stream) is passed on
/// too and ends the reader.
async fn read_frames(
    read: impl AsyncRead + Unpin,
    key: Key,
    frames: mpsc::Sender<Result<Envelope, ReadError>>,
) {
    let keys = FrameKeys::One(key);
    let mut reader = FramedRead::new(read, protocol::frame_codec());
    loop {
        let outcome = match reader.next().await {
            None => Err(ReadError::Closed),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(ReadError::BadFrame(e.to_string()))
            }
            Some(Err(e)) => Err(ReadError::Io(e.to_string())),
            Some(Ok(frame)) => decode_frame_keyed(&frame, &keys, Direction::ToWatchdog)
                .map_err(|e| ReadError::BadFrame(e.to_string())),
        };
        let failed = outcome.is_err();
        if frames.send(outcome).await.is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::frame::HostCommand;
    use protocol::BootId;
    use protocol::FrameDecoder;
    use tokio::io::AsyncReadExt as _;

    /// A controller that welcomes the watchdog, sends it one command, and returns the
    /// frame that answers it.
    async fn controller_sending(
        listener: tokio::net::TcpListener,
        key: Key,
        command: HostCommand,
    ) -> Message {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut decoder = FrameDecoder::new(key.clone(), Direction::ToController);
        let mut buf = vec![0u8; 16 * 1024];
        let mut hello: Option<Envelope> = None;
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the watchdog closed the stream");
            decoder.push(&buf[..n]);
            while let Some(env) = decoder.next_frame().unwrap() {
                match &env.message {
                    Message::Hello { nonce, .. } if env.conn == 0 => {
                        let challenge = Envelope {
                            conn: *nonce,
                            message: Message::Challenge { nonce: 42 },
                            ..env.clone()
                        };
                        conn.write_all(&encode_frame(&challenge, &key).unwrap())
                            .await
                            .unwrap();
                    }
                    Message::Hello { nonce, .. } => {
                        assert_eq!(env.conn, 42, "the second Hello answers the challenge");
                        for message in [
                            Message::Welcome {
                                controller_id: "ctl".into(),
                                highest_event_id: 0,
                            },
                            Message::Command {
                                controller_id: "ctl".into(),
                                command_id: 77,
                                command: command.clone(),
                            },
                        ] {
                            let frame = encode_frame(
                                &Envelope {
                                    conn: *nonce,
                                    message,
                                    ..env.clone()
                                },
                                &key,
                            )
                            .unwrap();
                            conn.write_all(&frame).await.unwrap();
                        }
                        hello = Some(env.clone());
                    }
                    Message::CommandResult { .. } => {
                        assert!(hello.is_some(), "a result before hello");
                        return env.message;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_command_on_the_stream_is_answered_with_its_result_on_the_same_connection() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new(b"stream-test-key-0123456789abcdef").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_events_tx, events) = mpsc::unbounded_channel();
        let (status, _status_rx) = watch::channel(StreamStatus::default());
        let stream = EventStream {
            identity: RunIdentity {
                cluster_id: "c".into(),
                host_id: "h1".into(),
                boot_id: BootId([3; 16]),
                incarnation: 9,
            },
            key: key.clone(),
            tls: None,
            conn_out: 0,
            conn_in: 0,
            addrs: vec![addr],
            last_leader: 0,
            spool: Spool::open(dir.path(), 100).unwrap(),
            events,
            events_open: true,
            status,
            backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
        };
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(stream.run(stop_rx));
        // A command this watchdog does not know fails, whatever libvirt is here; the
        // stream carries its result back and stays up.
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            controller_sending(listener, key, HostCommand::Unknown),
        )
        .await
        .expect("an answer in time");
        match answer {
            Message::CommandResult { command_id, ok, .. } => {
                assert_eq!(command_id, 77);
                assert!(!ok);
            }
            other => panic!("{other:?}"),
        }
        let _ = stop.send(true);
        task.await.unwrap();
    }

    #[test]
    fn a_round_tries_the_last_leader_first_then_the_others_in_the_configured_order() {
        assert_eq!(round_order(1, 0), [0]);
        assert_eq!(round_order(3, 0), [0, 1, 2]);
        assert_eq!(round_order(3, 1), [1, 0, 2]);
        assert_eq!(round_order(4, 3), [3, 0, 1, 2]);
        // An index past the end (cannot happen) still gives every address once.
        assert_eq!(round_order(2, 5), [0, 1]);
        assert!(round_order(0, 0).is_empty());
    }

    #[test]
    fn reconnect_delays_double_from_the_minimum_to_the_maximum_within_their_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for ceiling in ceilings {
            let delay = backoff.next_delay();
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} not within {ceiling:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
