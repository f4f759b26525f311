//! The watchdogs' event streams (TCP): a stream says `Hello` for its host, then its
//! events are stored through the engine task before they are acked, and the commands
//! edges send the host (`crate::edges::libvirt`) go out on it as frames, their results
//! routed back.
use std::collections::HashMap;
use std::sync::Arc;

use protocol::{encode_frame, BootId, Direction, Envelope, FrameDecoder, Key, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::Intake;
use crate::edges::libvirt::{
    CommandAnswer, CommandRequest, HostStreams, StreamRegistration, COMMANDS_QUEUED,
};
use crate::metrics::Metrics;

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
                        let highest = match rx.await? {
                            Ok(h) => h,
                            Err(why) => {
                                tracing::info!(host = %env.host_id, %why, "event stream refused");
                                anyhow::bail!("stream of {} refused: {why}", env.host_id);
                            }
                        };
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
    use std::time::Duration;

    use protocol::frame::HostCommand;

    use super::*;
    use crate::edges::libvirt::LibvirtRestorer;
    use crate::edges::Restorer;
    use crate::engine::{HostId, Input, IntentKey, Resource, RestoreOutcome};

    /// The whole path over a real loopback socket: the intake registers the stream at
    /// `Hello`, sends the restorer's command as a frame, and routes the watchdog's
    /// result back; the registration goes when the stream closes. (It was the libvirt
    /// edge's test; it lives here because an edge must not reach into the runtime.)
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
            mac.clone(),
            "c".into(),
            "ctl".into(),
            intake_tx,
            Arc::new(Metrics::new()),
            streams.clone(),
        ));

        let mut wd = tokio::net::TcpStream::connect(addr).await.unwrap();
        let env = |message| Envelope {
            cluster_id: "c".into(),
            host_id: "h1".into(),
            boot_id: BootId([7; 16]),
            incarnation: 1,
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
        wd.write_all(&encode_frame(&env(Message::Hello { last_event_id: 0 }), &mac).unwrap())
            .await
            .unwrap();
        assert!(matches!(next_frame(&mut wd).await, Message::Welcome { .. }));
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
