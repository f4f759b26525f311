//! What a datagram's MAC costs, to choose one (issue 17): HMAC-SHA256 with the key
//! schedule redone per message, HMAC-SHA256 from a pre-keyed state cloned per message,
//! and keyed BLAKE3 (what heartbeats and acks use since heartbeat version 4), over
//! heartbeat-sized messages; then the whole decode of a heartbeat. A timing loop, not a
//! test (it asserts nothing about time), so an example. Run it in release on an idle
//! core:
//!
//! ```text
//! cargo run -p defib-protocol --release --example mac_cost
//! ```
//!
//! BENCHMARKS.md (heartbeat intake) has the figures measured on the project's machine.
// A wall-clock timing loop: nothing here runs under a paused tokio clock.
#![allow(clippy::disallowed_types)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use common::*;
use hmac::{Hmac, Mac};
use protocol::{decode_heartbeat, encode_heartbeat, Heartbeat};
use sha2::Sha256;

fn main() {
    what_a_datagram_mac_costs();
    what_judging_a_heartbeat_costs_among_10000_hosts();
}

/// Best of 5 runs of `n` calls, in ns per call.
fn ns_per_call(n: u64, mut f: impl FnMut(u64) -> u8) -> f64 {
    for i in 0..n / 10 {
        black_box(f(i));
    }
    (0..5)
        .map(|_| {
            let t = Instant::now();
            let mut acc = 0u8;
            for i in 0..n {
                acc ^= f(i);
            }
            black_box(acc);
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .fold(f64::MAX, f64::min)
}

fn what_a_datagram_mac_costs() {
    let n = 1_000_000;
    let key_bytes = KEY_BYTES;
    let key = key();
    // The signed part of a heartbeat with the bench's ids, and with longer real ones.
    for (cluster, host) in [("bench", "bench-h00042"), (CLUSTER, HOST)] {
        let hb = Heartbeat {
            cluster_id: cluster,
            host_id: host,
            ..heartbeat(7, 100)
        };
        let datagram = encode_heartbeat(&hb, &key).unwrap();
        let signed = &datagram[..datagram.len() - protocol::DATAGRAM_MAC_LEN];
        println!(
            "heartbeat of {} bytes ({} signed):",
            datagram.len(),
            signed.len()
        );
        let t = ns_per_call(n, |i| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key_bytes).unwrap();
            mac.update(black_box(signed));
            mac.update(&i.to_be_bytes()[7..]);
            mac.finalize().into_bytes()[0]
        });
        println!("  HMAC-SHA256, key schedule per message:   {t:6.0} ns");
        let keyed = Hmac::<Sha256>::new_from_slice(key_bytes).unwrap();
        let t = ns_per_call(n, |i| {
            let mut mac = keyed.clone();
            mac.update(black_box(signed));
            mac.update(&i.to_be_bytes()[7..]);
            mac.finalize().into_bytes()[0]
        });
        println!("  HMAC-SHA256, pre-keyed state cloned:     {t:6.0} ns");
        let t = ns_per_call(n, |i| {
            let mut hasher = blake3::Hasher::new_keyed(&[0x42; 32]);
            hasher.update(black_box(signed));
            hasher.update(&i.to_be_bytes()[7..]);
            hasher.finalize().as_bytes()[0]
        });
        println!("  keyed BLAKE3 (what datagrams use):       {t:6.0} ns");
        let t = ns_per_call(n, |i| {
            black_box(key.datagram_tag(black_box(signed)))[(i % 16) as usize]
        });
        println!("  Key::datagram_tag (16-byte tag):         {t:6.0} ns");
        let t = ns_per_call(n, |_| {
            let hb = decode_heartbeat(black_box(&datagram), &key).unwrap();
            hb.path_index
        });
        println!("  decode_heartbeat (parse + verify):       {t:6.0} ns");
    }
}

fn what_judging_a_heartbeat_costs_among_10000_hosts() {
    use protocol::{HeartbeatReceiver, HostKeys, MasterKey};
    const HOSTS: usize = 10_000;
    const ROUNDS: u64 = 50;
    let master = MasterKey::new(b"the controller's master key, 32b").unwrap();
    let mut keys = HostKeys::new(master.clone());
    let ids: Vec<String> = (0..HOSTS).map(|i| format!("bench-h{i:05}")).collect();
    for id in &ids {
        keys.enroll(id);
    }
    let session = 0x5e55;
    // Round-robin over the hosts, as the intake bench sends: every lookup a cache miss.
    let datagrams: Vec<Vec<u8>> = (1..=ROUNDS)
        .flat_map(|seq| {
            ids.iter()
                .map(move |id| (id.clone(), seq))
                .collect::<Vec<_>>()
        })
        .map(|(id, seq)| {
            let hb = Heartbeat {
                cluster_id: "bench",
                host_id: &id,
                session,
                ..heartbeat(7, seq)
            };
            encode_heartbeat(&hb, &master.host_key(&id)).unwrap()
        })
        .collect();
    let mut rx = HeartbeatReceiver::per_host(keys, "bench", session);
    // Warm-up: every host and path known.
    for d in &datagrams[..HOSTS] {
        rx.receive_paced(d, 0, true).unwrap();
    }
    let rest = &datagrams[HOSTS..];
    let t = Instant::now();
    let mut due = 0usize;
    for (i, d) in rest.iter().enumerate() {
        let got = rx
            .receive_paced(black_box(d), 10 + i as u64 / 1000, true)
            .unwrap();
        due += usize::from(got.ack_due);
    }
    let ns = t.elapsed().as_nanos() as f64 / rest.len() as f64;
    println!(
        "receive_paced, {HOSTS} hosts round-robin: {ns:6.0} ns per heartbeat ({due} acks due of {})",
        rest.len()
    );
}
