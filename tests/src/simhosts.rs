//! Simulated watchdogs for tests that drive a real controller without real hosts: each
//! host signs its heartbeats with its own key (derived from the controller's master key,
//! as `defibctl hosts enroll` hands it out) and echoes the session the controller's acks
//! carry, as a real watchdog does.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::{decode_ack, encode_heartbeat, BootId, Heartbeat, HostStatus, MasterKey};
use tokio::net::UdpSocket;

/// Sends a heartbeat every 100 ms from each host in `alive` to `to`, until the runtime
/// ends; the controller must have the hosts enrolled.
pub fn spawn_heartbeats(
    to: SocketAddr,
    master: MasterKey,
    cluster: &'static str,
    alive: Arc<Mutex<BTreeSet<String>>>,
) {
    tokio::spawn(async move {
        let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        // Per host: the session of the newest ack (by the sequence it answers).
        let sessions: Arc<Mutex<BTreeMap<String, (u64, u64)>>> = Arc::default();
        {
            let (sock, sessions, master, alive) = (
                sock.clone(),
                sessions.clone(),
                master.clone(),
                alive.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];
                loop {
                    let Ok((n, _)) = sock.recv_from(&mut buf).await else {
                        return;
                    };
                    let hosts: Vec<String> = alive.lock().unwrap().iter().cloned().collect();
                    for host in hosts {
                        if let Ok(ack) = decode_ack(&buf[..n], &master.host_key(&host)) {
                            let mut s = sessions.lock().unwrap();
                            let slot = s.entry(host).or_insert((0, 0));
                            if ack.sequence > slot.0 {
                                *slot = (ack.sequence, ack.session);
                            }
                            break;
                        }
                    }
                }
            });
        }
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for seq in 1u64.. {
            every.tick().await;
            let hosts: Vec<String> = alive.lock().unwrap().iter().cloned().collect();
            for host in hosts {
                let session = sessions.lock().unwrap().get(&host).map_or(0, |s| s.1);
                let datagram = encode_heartbeat(
                    &Heartbeat {
                        cluster_id: cluster,
                        host_id: &host,
                        boot_id: BootId([7; 16]),
                        incarnation: 5,
                        sequence: seq,
                        sent_unix_ns: seq * 100_000_000,
                        sent_mono_ns: seq * 100_000_000,
                        path_index: 0,
                        session,
                        ack_period_ms: 375,
                        status: HostStatus::default(),
                    },
                    &master.host_key(&host),
                )
                .unwrap();
                let _ = sock.send_to(&datagram, to).await;
            }
        }
    });
}
