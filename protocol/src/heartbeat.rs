//! The heartbeat datagram (watchdog → controller, UDP, every 100 ms on every path).
//!
//! Layout (big-endian integers; offsets in bytes):
//!
//! ```text
//!  0   4  magic "DFIB"
//!  4   1  protocol version (1)
//!  5   1  kind (1 = heartbeat)
//!  6   1  path index: which network path this copy was sent on
//!  7   1  flags: bit 0 isolated, bit 1 libvirt reachable, bit 2 self-fence armed, bits 3..7 zero
//!  8  16  boot id
//! 24   8  incarnation
//! 32   8  sequence
//! 40   8  send time, unix ns (wall clock)
//! 48   8  send time, host monotonic ns (CLOCK_MONOTONIC / BOOTTIME)
//! 56   4  VM count
//! 60   4  VMs with an active disk stall
//! 64   8  probe drop count (cumulative since the watchdog started)
//! 72   1  C = cluster id length (1..=64)
//! 73   C  cluster id, UTF-8
//!  .   1  H = host id length (1..=253)
//!  .   H  host id, UTF-8
//!  .  32  HMAC-SHA256 over every byte before it
//! ```

use crate::error::{DecodeError, EncodeError};
use crate::ids::{check_cluster_id, check_host_id, BootId, MAX_CLUSTER_ID_LEN, MAX_HOST_ID_LEN};
use crate::key::{Key, MAC_LEN};
use crate::wire::{self, Reader};

/// Kind byte of a heartbeat.
pub const KIND_HEARTBEAT: u8 = 1;

const FIXED_LEN: usize = 72;
const FLAG_ISOLATED: u8 = 1 << 0;
const FLAG_LIBVIRT_REACHABLE: u8 = 1 << 1;
const FLAG_SELF_FENCE_ARMED: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = FLAG_ISOLATED | FLAG_LIBVIRT_REACHABLE | FLAG_SELF_FENCE_ARMED;

/// Longest valid heartbeat (longest ids): 423 bytes.
pub const MAX_HEARTBEAT_LEN: usize =
    FIXED_LEN + 1 + MAX_CLUSTER_ID_LEN + 1 + MAX_HOST_ID_LEN + MAC_LEN;
/// Shortest valid heartbeat (one-byte ids).
pub const MIN_HEARTBEAT_LEN: usize = FIXED_LEN + 1 + 1 + 1 + 1 + MAC_LEN;

/// What the watchdog reports about its host in every heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStatus {
    /// qemu processes (VMs) the watchdog sees on the host.
    pub vm_count: u32,
    /// VMs with a disk stall in progress.
    pub stalled_vm_count: u32,
    /// The watchdog has had no ack from any controller for its isolation timeout: it
    /// believes it is cut off (and may be about to self-fence).
    pub isolated: bool,
    /// The watchdog's libvirt connection is up.
    pub libvirt_reachable: bool,
    /// The watchdog self-fences: once isolated it kills its VMs (and, with a hardware
    /// watchdog, lets the host reset), so the controller may count the host fenced once
    /// its self-fence deadline has passed.
    pub self_fence_armed: bool,
    /// Events the eBPF probes dropped (ring buffer full), cumulative since the
    /// watchdog started; a rise means the controller's view may be missing events.
    pub probe_drops: u64,
}

/// One heartbeat. Decoding borrows the ids from the datagram, so it never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat<'a> {
    /// The cluster this watchdog belongs to; the controller drops other clusters'.
    pub cluster_id: &'a str,
    /// The host's id (its Nova compute host name).
    pub host_id: &'a str,
    /// The host kernel's boot id.
    pub boot_id: BootId,
    /// Bumped on every watchdog start and never lower than the previous one, even
    /// across reboots: see the crate docs on incarnations.
    pub incarnation: u64,
    /// Bumped for every datagram of this incarnation, over all paths together.
    pub sequence: u64,
    /// Wall-clock send time, unix ns.
    pub sent_unix_ns: u64,
    /// Monotonic send time on the host, ns; immune to clock steps, so the controller
    /// can measure the host's send jitter.
    pub sent_mono_ns: u64,
    /// Which network path (index in the watchdog's configured list) this copy took.
    pub path_index: u8,
    /// The status summary.
    pub status: HostStatus,
}

impl Heartbeat<'_> {
    /// Appends the signed datagram to `out` after clearing it. With a reused `out`
    /// this allocates nothing once `out` has grown to [`MAX_HEARTBEAT_LEN`].
    pub fn encode_into(&self, key: &Key, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        check_cluster_id(self.cluster_id).map_err(|error| EncodeError::BadId {
            field: "cluster_id",
            error,
        })?;
        check_host_id(self.host_id).map_err(|error| EncodeError::BadId {
            field: "host_id",
            error,
        })?;
        out.clear();
        out.reserve(MAX_HEARTBEAT_LEN);
        wire::put_preamble(out, KIND_HEARTBEAT);
        out.push(self.path_index);
        let mut flags = 0;
        if self.status.isolated {
            flags |= FLAG_ISOLATED;
        }
        if self.status.libvirt_reachable {
            flags |= FLAG_LIBVIRT_REACHABLE;
        }
        if self.status.self_fence_armed {
            flags |= FLAG_SELF_FENCE_ARMED;
        }
        out.push(flags);
        out.extend_from_slice(&self.boot_id.0);
        out.extend_from_slice(&self.incarnation.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.sent_unix_ns.to_be_bytes());
        out.extend_from_slice(&self.sent_mono_ns.to_be_bytes());
        out.extend_from_slice(&self.status.vm_count.to_be_bytes());
        out.extend_from_slice(&self.status.stalled_vm_count.to_be_bytes());
        out.extend_from_slice(&self.status.probe_drops.to_be_bytes());
        wire::put_short_str(out, self.cluster_id);
        wire::put_short_str(out, self.host_id);
        wire::append_mac(out, key);
        Ok(())
    }
}

/// Encodes and signs a heartbeat into a new buffer.
pub fn encode_heartbeat(heartbeat: &Heartbeat<'_>, key: &Key) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(MAX_HEARTBEAT_LEN);
    heartbeat.encode_into(key, &mut out)?;
    Ok(out)
}

/// Decodes and authenticates a heartbeat datagram.
///
/// Never panics and never allocates: the ids borrow from `datagram`, and the HMAC is
/// computed once, over the datagram in place. It checks structure and MAC only; the
/// cluster id, sequence and incarnation are the receiver's business
/// ([`crate::HeartbeatReceiver`]).
pub fn decode_heartbeat<'a>(datagram: &'a [u8], key: &Key) -> Result<Heartbeat<'a>, DecodeError> {
    if datagram.len() > MAX_HEARTBEAT_LEN {
        return Err(DecodeError::Oversize {
            len: datagram.len(),
            max: MAX_HEARTBEAT_LEN,
        });
    }
    wire::check_preamble(datagram, KIND_HEARTBEAT)?;
    let mut r = Reader::new(datagram);
    r.take(wire::PREAMBLE_LEN)?;
    let path_index = r.u8()?;
    let flags = r.u8()?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::Malformed("reserved heartbeat flag bits set"));
    }
    let boot_id = BootId(r.array()?);
    let incarnation = r.u64()?;
    let sequence = r.u64()?;
    let sent_unix_ns = r.u64()?;
    let sent_mono_ns = r.u64()?;
    let vm_count = r.u32()?;
    let stalled_vm_count = r.u32()?;
    let probe_drops = r.u64()?;
    let cluster_id = r.short_str(check_cluster_id, "invalid cluster id")?;
    let host_id = r.short_str(check_host_id, "invalid host id")?;
    wire::check_trailing_mac(datagram, &r, key)?;
    Ok(Heartbeat {
        cluster_id,
        host_id,
        boot_id,
        incarnation,
        sequence,
        sent_unix_ns,
        sent_mono_ns,
        path_index,
        status: HostStatus {
            vm_count,
            stalled_vm_count,
            isolated: flags & FLAG_ISOLATED != 0,
            libvirt_reachable: flags & FLAG_LIBVIRT_REACHABLE != 0,
            self_fence_armed: flags & FLAG_SELF_FENCE_ARMED != 0,
            probe_drops,
        },
    })
}
