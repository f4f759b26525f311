//! The heartbeat datagram (watchdog → controller, UDP, every 100 ms on every path).
//!
//! Layout (big-endian integers; offsets in bytes):
//!
//! ```text
//!  0   4  magic "DFIB"
//!  4   1  heartbeat layout version (4; no other is decoded, see "Versions" below)
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
//! 72   4  self-fence timeout, ms: the watchdog's own isolation timeout (0: self-fence off)
//! 76   1  self-fence state: 0 off, 1 armed, 2.. not armed, the code saying why
//! 77   4  reason detail a (e.g. the qemu pid it may not kill)
//! 81   4  reason detail b (e.g. that qemu's uid)
//! 85   8  controller session, echoed: the session of the newest ack heard on this path
//!         (0: none yet); see below
//! 93   4  ack period asked, ms: answer at most one heartbeat per this period on this
//!         path (see [`crate::ack`], "Pacing"; 0: every heartbeat)
//! 97   1  C = cluster id length (1..=64)
//! 98   C  cluster id, UTF-8
//!  .   1  H = host id length (1..=253)
//!  .   H  host id, UTF-8
//!  .  16  keyed BLAKE3 tag over every byte before it (see [`crate::Key`])
//! ```
//!
//! # Freshness across controller restarts: the echoed session
//!
//! Every controller process draws a random, non-zero 64-bit session at start and puts it
//! in every ack ([`crate::Ack::session`]). The watchdog echoes, in each heartbeat it sends
//! on a path, the session of the newest ack it got on that path. The controller counts a
//! heartbeat as a sign of life only when it echoes the controller's own session: a
//! heartbeat recorded before the controller restarted (a dead host's, replayed) carries
//! an older session and proves nothing, however fresh its sequence number looks to the
//! new process's empty replay window. Such a heartbeat is still acked, with the ack's
//! "counts" flag clear and without waiting for the ack period, so a live watchdog
//! learns the new session one interval after a controller restart. Nothing is persisted
//! for this, so it costs no store write.
//!
//! # Versions
//!
//! Version 4 brought the keyed-BLAKE3 tag (16 bytes, was a 32-byte HMAC-SHA256) and the
//! ack period (bytes 93..97). Older layouts (1: no self-fence block, 2: no session, 3:
//! HMAC) are no longer decoded: a controller answers a heartbeat of any version it
//! does not take with a [`crate::refusal`] datagram naming the versions it takes, so
//! that the watchdog can say why it is not heard, and counts it
//! ([`crate::RejectReason::OldVersion`] or [`crate::RejectReason::BadVersion`]).

use crate::error::{DecodeError, EncodeError};
use crate::ids::{check_cluster_id, check_host_id, BootId, MAX_CLUSTER_ID_LEN, MAX_HOST_ID_LEN};
use crate::key::{DatagramKey, Key, DATAGRAM_MAC_LEN};
use crate::wire::{self, Reader};

/// Kind byte of a heartbeat.
pub const KIND_HEARTBEAT: u8 = 1;

/// The heartbeat layout this build sends and takes: 4, with the keyed-BLAKE3 tag and the
/// ack period. No other version is decoded (see the module docs).
pub const HEARTBEAT_VERSION: u8 = 4;

/// Every heartbeat layout version this build takes, as a refusal lists them.
pub const HEARTBEAT_VERSIONS: [u8; 1] = [HEARTBEAT_VERSION];

pub(crate) const FIXED_LEN: usize = 97;
const FLAG_ISOLATED: u8 = 1 << 0;
const FLAG_LIBVIRT_REACHABLE: u8 = 1 << 1;
const FLAG_SELF_FENCE_ARMED: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = FLAG_ISOLATED | FLAG_LIBVIRT_REACHABLE | FLAG_SELF_FENCE_ARMED;

/// Longest valid heartbeat (longest ids): 432 bytes.
pub const MAX_HEARTBEAT_LEN: usize =
    FIXED_LEN + 1 + MAX_CLUSTER_ID_LEN + 1 + MAX_HOST_ID_LEN + DATAGRAM_MAC_LEN;
/// Shortest valid heartbeat (one-byte ids): 117 bytes.
pub const MIN_HEARTBEAT_LEN: usize = FIXED_LEN + 1 + 1 + 1 + 1 + DATAGRAM_MAC_LEN;

/// The watchdog's self-fence as its heartbeats report it.
///
/// Armed means *effective*: the watchdog has been acked by a controller, may signal
/// every qemu it watches (`kill(pid, 0)` succeeded for each, re-checked on every tick),
/// and, with a hardware watchdog device, has it running with a timeout the driver took.
/// Only then may the controller count the host fenced once it has been silent for
/// `timeout_ms` plus the controller's margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SelfFence {
    /// Not enabled on this host.
    #[default]
    Off,
    /// Armed: once isolated for `timeout_ms` (no controller ack), the host kills its
    /// qemus, and a hung daemon lets the device reset the host within it.
    Armed {
        /// The watchdog's own isolation timeout (at least the device's, if it has one).
        timeout_ms: u32,
    },
    /// Enabled but not armed: its silence proves nothing.
    NotArmed {
        /// The isolation timeout it would keep (0 when unknown, as from an old watchdog).
        timeout_ms: u32,
        /// Why.
        reason: NotArmed,
    },
}

impl SelfFence {
    /// The isolation timeout the host promises to self-fence within, if armed.
    pub fn armed_timeout_ms(&self) -> Option<u32> {
        match *self {
            SelfFence::Armed { timeout_ms } => Some(timeout_ms),
            _ => None,
        }
    }
}

impl std::fmt::Display for SelfFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelfFence::Off => f.write_str("off"),
            SelfFence::Armed { timeout_ms } => {
                write!(f, "armed (isolation timeout {timeout_ms} ms)")
            }
            SelfFence::NotArmed { reason, .. } => write!(f, "not armed: {reason}"),
        }
    }
}

/// Why a host's self-fence is not armed. On the wire: a code and two details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotArmed {
    /// No controller has acked this run yet (a watchdog that no controller hears must
    /// not kill VMs that nobody would restore). Code 2.
    AwaitingFirstAck,
    /// `kill(pid, 0)` on a watched qemu failed (EPERM: no CAP_KILL for another user's
    /// process). Code 3.
    CannotKill {
        /// The qemu's pid.
        pid: u32,
        /// Its owner's uid.
        uid: u32,
    },
    /// The watchdog device could not be opened or set up. Code 4.
    DeviceFailed {
        /// The errno of the failing call.
        errno: u32,
    },
    /// The watchdog device's driver took a timeout that cannot back the promise (none,
    /// disagreeing read-back, or too short to be petted in time). Code 5.
    DeviceTimeout {
        /// Seconds asked for.
        requested_s: u32,
        /// Seconds the driver reports it took.
        taken_s: u32,
    },
    /// A version 1 heartbeat, from a watchdog that did not prove its self-fence. Code 6;
    /// no longer produced since version 1 is refused, still decoded (a code is never
    /// given another meaning).
    Unproven,
    /// A code this build does not know (from a newer watchdog); still not armed.
    Other {
        /// The code.
        code: u8,
        /// Detail a.
        a: u32,
        /// Detail b.
        b: u32,
    },
}

impl std::fmt::Display for NotArmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            NotArmed::AwaitingFirstAck => f.write_str("no controller has acked this watchdog yet"),
            NotArmed::CannotKill { pid, uid } => {
                write!(f, "no permission to kill qemu pid {pid} owned by uid {uid}")
            }
            NotArmed::DeviceFailed { errno } => {
                write!(f, "the watchdog device cannot be armed (errno {errno})")
            }
            NotArmed::DeviceTimeout {
                requested_s,
                taken_s,
            } => write!(
                f,
                "the watchdog device took a timeout of {taken_s} s (asked for {requested_s} s)"
            ),
            NotArmed::Unproven => f.write_str(
                "an older watchdog (heartbeat version 1) does not prove it can self-fence",
            ),
            NotArmed::Other { code, a, b } => {
                write!(
                    f,
                    "reason code {code} unknown to this controller ({a}, {b})"
                )
            }
        }
    }
}

const STATE_OFF: u8 = 0;
const STATE_ARMED: u8 = 1;

impl NotArmed {
    fn to_wire(self) -> (u8, u32, u32) {
        match self {
            NotArmed::AwaitingFirstAck => (2, 0, 0),
            NotArmed::CannotKill { pid, uid } => (3, pid, uid),
            NotArmed::DeviceFailed { errno } => (4, errno, 0),
            NotArmed::DeviceTimeout {
                requested_s,
                taken_s,
            } => (5, requested_s, taken_s),
            NotArmed::Unproven => (6, 0, 0),
            NotArmed::Other { code, a, b } => (code, a, b),
        }
    }

    /// The reason for `code` (2..), or None if the details are not the canonical ones
    /// of a known code (every accepted datagram re-encodes to the same bytes).
    fn from_wire(code: u8, a: u32, b: u32) -> Option<NotArmed> {
        let r = match code {
            STATE_OFF | STATE_ARMED => return None,
            2 => NotArmed::AwaitingFirstAck,
            3 => NotArmed::CannotKill { pid: a, uid: b },
            4 => NotArmed::DeviceFailed { errno: a },
            5 => NotArmed::DeviceTimeout {
                requested_s: a,
                taken_s: b,
            },
            6 => NotArmed::Unproven,
            _ => NotArmed::Other { code, a, b },
        };
        (r.to_wire() == (code, a, b)).then_some(r)
    }
}

impl SelfFence {
    fn to_wire(self) -> (u32, u8, u32, u32) {
        match self {
            SelfFence::Off => (0, STATE_OFF, 0, 0),
            SelfFence::Armed { timeout_ms } => (timeout_ms, STATE_ARMED, 0, 0),
            SelfFence::NotArmed { timeout_ms, reason } => {
                let (code, a, b) = reason.to_wire();
                (timeout_ms, code, a, b)
            }
        }
    }

    fn from_wire(timeout_ms: u32, state: u8, a: u32, b: u32) -> Result<SelfFence, DecodeError> {
        let bad = DecodeError::Malformed("inconsistent self-fence block");
        match state {
            STATE_OFF if (timeout_ms, a, b) == (0, 0, 0) => Ok(SelfFence::Off),
            STATE_ARMED if timeout_ms > 0 && (a, b) == (0, 0) => {
                Ok(SelfFence::Armed { timeout_ms })
            }
            STATE_OFF | STATE_ARMED => Err(bad),
            code => NotArmed::from_wire(code, a, b)
                .map(|reason| SelfFence::NotArmed { timeout_ms, reason })
                .ok_or(bad),
        }
    }
}

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
    /// The watchdog's self-fence: armed (with the timeout it keeps), not armed and why,
    /// or off. Flag bit 2 says "armed" and always agrees with it.
    pub self_fence: SelfFence,
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
    /// The controller session this watchdog last heard on this path, echoed (0: none
    /// yet). See the module docs.
    pub session: u64,
    /// How often this watchdog wants its heartbeats on this path acked, at most, in ms
    /// (0: every one). See [`crate::ack`], "Pacing".
    pub ack_period_ms: u32,
    /// The status summary.
    pub status: HostStatus,
}

impl Heartbeat<'_> {
    /// Appends the signed datagram to `out` after clearing it. With a reused `out`
    /// this allocates nothing once `out` has grown to [`MAX_HEARTBEAT_LEN`]. `key` is a
    /// [`Key`] or its [`DatagramKey`].
    pub fn encode_into(
        &self,
        key: &impl AsRef<DatagramKey>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
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
        wire::put_preamble_of(out, HEARTBEAT_VERSION, KIND_HEARTBEAT);
        out.push(self.path_index);
        let mut flags = 0;
        if self.status.isolated {
            flags |= FLAG_ISOLATED;
        }
        if self.status.libvirt_reachable {
            flags |= FLAG_LIBVIRT_REACHABLE;
        }
        if self.status.self_fence.armed_timeout_ms().is_some() {
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
        let (timeout_ms, state, a, b) = self.status.self_fence.to_wire();
        out.extend_from_slice(&timeout_ms.to_be_bytes());
        out.push(state);
        out.extend_from_slice(&a.to_be_bytes());
        out.extend_from_slice(&b.to_be_bytes());
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.ack_period_ms.to_be_bytes());
        wire::put_short_str(out, self.cluster_id);
        wire::put_short_str(out, self.host_id);
        wire::append_datagram_mac(out, key.as_ref());
        Ok(())
    }
}

/// Encodes and signs a heartbeat into a new buffer.
pub fn encode_heartbeat(
    heartbeat: &Heartbeat<'_>,
    key: &impl AsRef<DatagramKey>,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(MAX_HEARTBEAT_LEN);
    heartbeat.encode_into(key, &mut out)?;
    Ok(out)
}

/// Decodes and authenticates a heartbeat datagram.
///
/// Never panics and never allocates: the ids borrow from `datagram`, and the MAC is
/// computed once, over the datagram in place. It checks structure and MAC only; the
/// cluster id, sequence and incarnation are the receiver's business
/// ([`crate::HeartbeatReceiver`]).
pub fn decode_heartbeat<'a>(datagram: &'a [u8], key: &Key) -> Result<Heartbeat<'a>, DecodeError> {
    decode_heartbeat_keyed(datagram, |_| Some(key))
}

/// [`decode_heartbeat`] with a key per host: `key_for` is asked for the key of the host
/// id the datagram names (after the structure has been checked, before the MAC is);
/// `None` refuses it as [`DecodeError::UnknownHost`] without computing a MAC.
pub fn decode_heartbeat_keyed<'a, 'k>(
    datagram: &'a [u8],
    key_for: impl FnOnce(&str) -> Option<&'k Key>,
) -> Result<Heartbeat<'a>, DecodeError> {
    if datagram.len() > MAX_HEARTBEAT_LEN {
        return Err(DecodeError::Oversize {
            len: datagram.len(),
            max: MAX_HEARTBEAT_LEN,
        });
    }
    wire::check_preamble_of(datagram, KIND_HEARTBEAT, &HEARTBEAT_VERSIONS)?;
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
    let timeout_ms = r.u32()?;
    let state = r.u8()?;
    let (a, b) = (r.u32()?, r.u32()?);
    let self_fence = SelfFence::from_wire(timeout_ms, state, a, b)?;
    if self_fence.armed_timeout_ms().is_some() != (flags & FLAG_SELF_FENCE_ARMED != 0) {
        return Err(DecodeError::Malformed(
            "the armed flag disagrees with the self-fence block",
        ));
    }
    let session = r.u64()?;
    let ack_period_ms = r.u32()?;
    let cluster_id = r.short_str(check_cluster_id, "invalid cluster id")?;
    let host_id = r.short_str(check_host_id, "invalid host id")?;
    let key = key_for(host_id).ok_or(DecodeError::UnknownHost)?;
    wire::check_trailing_mac(datagram, &r, key.datagram_key())?;
    Ok(Heartbeat {
        cluster_id,
        host_id,
        boot_id,
        incarnation,
        sequence,
        sent_unix_ns,
        sent_mono_ns,
        path_index,
        session,
        ack_period_ms,
        status: HostStatus {
            vm_count,
            stalled_vm_count,
            isolated: flags & FLAG_ISOLATED != 0,
            libvirt_reachable: flags & FLAG_LIBVIRT_REACHABLE != 0,
            self_fence,
            probe_drops,
        },
    })
}
