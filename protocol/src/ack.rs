//! The heartbeat ack datagram (controller → watchdog, UDP, one per heartbeat, sent
//! back on the path the heartbeat came in on). Acks are how a watchdog knows it is
//! reachable; a watchdog that gets none for a while reports itself isolated and may
//! self-fence.
//!
//! Layout (big-endian integers; offsets in bytes):
//!
//! ```text
//!  0   4  magic "DFIB"
//!  4   1  ack layout version (2)
//!  5   1  kind (2 = ack)
//!  6   1  path index, echoed from the heartbeat
//!  7   1  flags: bit 0 "counts" (see [`Ack::counts`]), bits 1..7 zero
//!  8  16  boot id, echoed
//! 24   8  incarnation, echoed
//! 32   8  sequence, echoed
//! 40   8  the heartbeat's monotonic send time, echoed (lets the watchdog measure
//!         round-trip time without keeping state per heartbeat)
//! 48   8  controller time, unix ns (wall clock)
//! 56   8  controller session (random per controller process, never 0)
//! 64   1  C = cluster id length (1..=64)
//! 65   C  cluster id
//!  .   1  H = host id length (1..=253)
//!  .   H  host id, echoed
//!  .   1  K = controller id length (1..=64)
//!  .   K  controller id
//!  .  32  HMAC-SHA256 over every byte before it
//! ```

use crate::error::{DecodeError, EncodeError};
use crate::heartbeat::Heartbeat;
use crate::ids::{
    check_cluster_id, check_controller_id, check_host_id, BootId, MAX_CLUSTER_ID_LEN,
    MAX_CONTROLLER_ID_LEN, MAX_HOST_ID_LEN,
};
use crate::key::{Key, MAC_LEN};
use crate::wire::{self, Reader};

/// Kind byte of a heartbeat ack.
pub const KIND_ACK: u8 = 2;

/// The ack layout this build sends and takes: 2, with the flags and the session.
pub const ACK_VERSION: u8 = 2;

const FIXED_LEN: usize = 64;
const FLAG_COUNTS: u8 = 1 << 0;

/// Longest valid ack: 480 bytes.
pub const MAX_ACK_LEN: usize =
    FIXED_LEN + 1 + MAX_CLUSTER_ID_LEN + 1 + MAX_HOST_ID_LEN + 1 + MAX_CONTROLLER_ID_LEN + MAC_LEN;

/// A controller's answer to one heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    /// The cluster, as in the heartbeat.
    pub cluster_id: &'a str,
    /// The heartbeat's host id.
    pub host_id: &'a str,
    /// The heartbeat's boot id.
    pub boot_id: BootId,
    /// The heartbeat's incarnation.
    pub incarnation: u64,
    /// The heartbeat's sequence number.
    pub sequence: u64,
    /// The heartbeat's path index.
    pub path_index: u8,
    /// The heartbeat's monotonic send time, so the watchdog gets the round trip as
    /// `now_mono - echoed_sent_mono_ns`.
    pub echoed_sent_mono_ns: u64,
    /// Which controller answered.
    pub controller_id: &'a str,
    /// The controller's wall clock when it answered, unix ns; lets the watchdog
    /// notice a large clock difference.
    pub controller_unix_ns: u64,
    /// The controller process's session, for the watchdog to echo in its next
    /// heartbeats on this path (see [`crate::heartbeat`], "Freshness").
    pub session: u64,
    /// Whether this ack says "a controller that acts (the leader, or the only one)
    /// heard your heartbeat as a fresh sign of life". Only such acks keep a watchdog
    /// reachable (and its self-fence disarmed). A follower's acks, and acks to a
    /// heartbeat that echoed an old session, only teach the session.
    pub counts: bool,
}

impl<'a> Ack<'a> {
    /// The ack that answers `heartbeat`.
    pub fn answering(
        heartbeat: &Heartbeat<'a>,
        controller_id: &'a str,
        controller_unix_ns: u64,
    ) -> Self {
        Ack {
            cluster_id: heartbeat.cluster_id,
            host_id: heartbeat.host_id,
            boot_id: heartbeat.boot_id,
            incarnation: heartbeat.incarnation,
            sequence: heartbeat.sequence,
            path_index: heartbeat.path_index,
            echoed_sent_mono_ns: heartbeat.sent_mono_ns,
            controller_id,
            controller_unix_ns,
            session: 0,
            counts: true,
        }
    }

    /// The same ack carrying the controller's `session`.
    pub fn with_session(self, session: u64) -> Self {
        Ack { session, ..self }
    }

    /// The same ack with its "counts" flag set to `counts`.
    pub fn counting(self, counts: bool) -> Self {
        Ack { counts, ..self }
    }

    /// Appends the signed datagram to `out` after clearing it.
    pub fn encode_into(&self, key: &Key, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let bad = |field| move |error| EncodeError::BadId { field, error };
        check_cluster_id(self.cluster_id).map_err(bad("cluster_id"))?;
        check_host_id(self.host_id).map_err(bad("host_id"))?;
        check_controller_id(self.controller_id).map_err(bad("controller_id"))?;
        out.clear();
        out.reserve(MAX_ACK_LEN);
        wire::put_preamble_of(out, ACK_VERSION, KIND_ACK);
        out.push(self.path_index);
        out.push(if self.counts { FLAG_COUNTS } else { 0 });
        out.extend_from_slice(&self.boot_id.0);
        out.extend_from_slice(&self.incarnation.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.echoed_sent_mono_ns.to_be_bytes());
        out.extend_from_slice(&self.controller_unix_ns.to_be_bytes());
        out.extend_from_slice(&self.session.to_be_bytes());
        wire::put_short_str(out, self.cluster_id);
        wire::put_short_str(out, self.host_id);
        wire::put_short_str(out, self.controller_id);
        wire::append_mac(out, key);
        Ok(())
    }
}

/// Encodes and signs an ack into a new buffer.
pub fn encode_ack(ack: &Ack<'_>, key: &Key) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(MAX_ACK_LEN);
    ack.encode_into(key, &mut out)?;
    Ok(out)
}

/// Decodes and authenticates an ack datagram. Never panics, never allocates.
/// Whether the ack answers this watchdog is [`crate::AckReceiver`]'s business.
pub fn decode_ack<'a>(datagram: &'a [u8], key: &Key) -> Result<Ack<'a>, DecodeError> {
    if datagram.len() > MAX_ACK_LEN {
        return Err(DecodeError::Oversize {
            len: datagram.len(),
            max: MAX_ACK_LEN,
        });
    }
    wire::check_preamble_of(datagram, KIND_ACK, &[ACK_VERSION])?;
    let mut r = Reader::new(datagram);
    r.take(wire::PREAMBLE_LEN)?;
    let path_index = r.u8()?;
    let flags = r.u8()?;
    if flags & !FLAG_COUNTS != 0 {
        return Err(DecodeError::Malformed("reserved ack flag bits set"));
    }
    let boot_id = BootId(r.array()?);
    let incarnation = r.u64()?;
    let sequence = r.u64()?;
    let echoed_sent_mono_ns = r.u64()?;
    let controller_unix_ns = r.u64()?;
    let session = r.u64()?;
    let cluster_id = r.short_str(check_cluster_id, "invalid cluster id")?;
    let host_id = r.short_str(check_host_id, "invalid host id")?;
    let controller_id = r.short_str(check_controller_id, "invalid controller id")?;
    wire::check_trailing_mac(datagram, &r, key)?;
    Ok(Ack {
        cluster_id,
        host_id,
        boot_id,
        incarnation,
        sequence,
        path_index,
        echoed_sent_mono_ns,
        controller_id,
        controller_unix_ns,
        session,
        counts: flags & FLAG_COUNTS != 0,
    })
}
