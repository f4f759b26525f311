//! Fixtures shared by the integration tests.
#![allow(dead_code)]

use protocol::{Ack, BootId, Heartbeat, HostStatus, Key};

pub const CLUSTER: &str = "prod-az1";
pub const HOST: &str = "compute-17.example.org";
pub const CONTROLLER: &str = "ctl-a";

pub const KEY_BYTES: &[u8] = b"an example cluster key, 32 bytes";

pub fn key() -> Key {
    Key::new(KEY_BYTES).unwrap()
}

pub fn other_key() -> Key {
    Key::new(b"a different key of the same size").unwrap()
}

pub fn boot(n: u8) -> BootId {
    BootId([n; 16])
}

pub fn heartbeat(incarnation: u64, sequence: u64) -> Heartbeat<'static> {
    Heartbeat {
        cluster_id: CLUSTER,
        host_id: HOST,
        boot_id: boot(1),
        incarnation,
        sequence,
        sent_unix_ns: 1_790_000_000_000_000_000,
        sent_mono_ns: 5_000_000_000 + sequence * 100_000_000,
        path_index: 0,
        session: 0,
        ack_period_ms: 375,
        status: HostStatus {
            vm_count: 42,
            stalled_vm_count: 1,
            isolated: false,
            libvirt_reachable: true,
            self_fence: protocol::SelfFence::Off,
            probe_drops: 3,
        },
    }
}

pub fn ack_for(hb: &Heartbeat<'static>) -> Ack<'static> {
    Ack::answering(hb, CONTROLLER, 1_790_000_000_050_000_000)
}
