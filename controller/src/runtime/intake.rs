//! Intake: heartbeat datagrams (UDP, one socket per network path) and the watchdogs'
//! event streams (TCP). Everything is authenticated and replay-checked by the protocol
//! crate; refusals are counted by reason and dropped, never crash the daemon.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use protocol::{
    encode_frame, Ack, BootId, Direction, Envelope, Event, FrameDecoder, Freshness,
    HeartbeatReceiver, HostStatus, Key, Message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use super::metrics::Metrics;

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
    last_forwarded_ms: HashMap<(String, u8), u64>,
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
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

    /// Handles one datagram: `Some(ack bytes)` if it was accepted.
    pub fn handle(&self, datagram: &[u8], peer: SocketAddr, ack: &mut Vec<u8>) -> bool {
        let now_ns = unix_ns();
        let forward = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let IntakeState {
                receiver,
                last_forwarded_ms,
            } = &mut *st;
            let accepted = match receiver.receive(datagram) {
                Ok(a) => a,
                Err(reason) => {
                    drop(st);
                    self.metrics
                        .heartbeats_rejected
                        .get_or_create(&Metrics::label("reason", reason.as_str()))
                        .inc();
                    return false;
                }
            };
            let hb = accepted.heartbeat;
            if Ack::answering(&hb, &self.controller_id, now_ns)
                .encode_into(&self.key, ack)
                .is_err()
            {
                return false;
            }
            self.metrics.heartbeats_accepted.inc();
            let now_ms = now_ns / 1_000_000;
            let slot = (hb.host_id.to_string(), hb.path_index);
            let due = match last_forwarded_ms.get(&slot) {
                Some(last) => now_ms.saturating_sub(*last) >= self.forward_every_ms,
                None => true,
            };
            let new_epoch = !matches!(accepted.freshness, Freshness::Current);
            (due || new_epoch).then(|| {
                last_forwarded_ms.insert(slot, now_ms);
                HeartbeatSeen {
                    host: hb.host_id.to_string(),
                    path: hb.path_index,
                    peer,
                    boot_id: hb.boot_id,
                    incarnation: hb.incarnation,
                    sent_unix_ns: hb.sent_unix_ns,
                    status: hb.status,
                }
            })
        };
        if let Some(seen) = forward {
            self.metrics
                .heartbeats_received
                .get_or_create(&Metrics::label("path", seen.path.to_string()))
                .inc();
            if self.tx.try_send(Intake::Heartbeat(seen)).is_err() {
                self.metrics
                    .heartbeats_rejected
                    .get_or_create(&Metrics::label("reason", "engine_busy"))
                    .inc();
            }
        }
        true
    }
}

/// Receives heartbeats on one socket and acks each accepted one back to its sender.
pub async fn serve_heartbeats(socket: UdpSocket, intake: Arc<HeartbeatIntake>) {
    let mut buf = vec![0u8; 2048];
    let mut ack = Vec::with_capacity(512);
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat socket receive failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if intake.handle(&buf[..n], peer, &mut ack) {
            if let Err(e) = socket.send_to(&ack, peer).await {
                tracing::debug!(error = %e, %peer, "ack not sent");
            }
        }
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
        loop {
            let n = stream.read(&mut buf).await?;
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
