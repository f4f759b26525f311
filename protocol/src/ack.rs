//! The heartbeat ack datagram (controller → watchdog, UDP, sent back on the path the
//! heartbeat came in on, at most one per ack period: see "Pacing"). Acks are how a
//! watchdog knows it is reachable; a watchdog that gets none for a while reports itself
//! isolated and may self-fence.
//!
//! Layout (big-endian integers; offsets in bytes):
//!
//! ```text
//!  0   4  magic "DFIB"
//!  4   1  ack layout version (3)
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
//!  .  16  keyed BLAKE3 tag over every byte before it (see [`crate::Key`])
//! ```
//!
//! Version 3 differs from version 2 only by its tag (was a 32-byte HMAC-SHA256); a
//! watchdog takes no other version.
//!
//! # Pacing: at most one ack per host, path and ack period
//!
//! Acking every heartbeat cost the controller more than judging it (an ack's MAC, and
//! above all its delivery). A watchdog needs far fewer: it is reachable as of the send
//! time of the newest heartbeat acked with "counts", and isolated only once that is
//! its isolation timeout old. So each heartbeat says how often it wants an ack
//! ([`crate::Heartbeat::ack_period_ms`]; the watchdog asks for an eighth of its
//! isolation timeout, never less than its heartbeat interval), and the controller
//! ([`crate::HeartbeatReceiver::receive_paced`], [`AckPacer`]) acks, per host and path:
//!
//! - a heartbeat that arrives once [`ack_spacing_ms`] of that period has passed since
//!   its last ack on that path: the period clamped to
//!   [[`ACK_PERIOD_FLOOR_MS`], [`ACK_PERIOD_CEILING_MS`]], less a quarter, so that a
//!   watchdog asking for its own heartbeat interval gets every heartbeat acked despite
//!   timer jitter, and one asking for more gets an ack within about the period plus
//!   one interval. The ack echoes that heartbeat's sequence and send time, so round
//!   trips and reachability are measured exactly as with an ack per heartbeat;
//! - at once (but never twice within [`ACK_PERIOD_FLOOR_MS`]), a heartbeat whose ack
//!   would differ in its "counts" flag from the last one sent on that path, and the
//!   first heartbeat of a new watchdog run: a watchdog that restarted, or has not yet
//!   echoed this controller's session, learns it (and its first counting ack) without
//!   waiting a period; one whose controller starts to lead hears it at once.
//!
//! A lost ack costs the watchdog one period, so the eighth leaves it several lost acks
//! in a row before it counts itself isolated.

use crate::error::{DecodeError, EncodeError};
use crate::heartbeat::Heartbeat;
use crate::ids::{
    check_cluster_id, check_controller_id, check_host_id, BootId, MAX_CLUSTER_ID_LEN,
    MAX_CONTROLLER_ID_LEN, MAX_HOST_ID_LEN,
};
use crate::key::{DatagramKey, Key, DATAGRAM_MAC_LEN};
use crate::wire::{self, Reader};

/// Kind byte of a heartbeat ack.
pub const KIND_ACK: u8 = 2;

/// The ack layout this build sends and takes: 3, with the keyed-BLAKE3 tag.
pub const ACK_VERSION: u8 = 3;

/// The shortest ack period a controller grants, ms: a heartbeat asking for less (or for
/// 0) gets at most one ack per this on each path. The watchdogs' shortest heartbeat
/// interval, so it never thins a watchdog's acks below one per heartbeat; it bounds
/// what a misbehaving key holder can make the controller send.
pub const ACK_PERIOD_FLOOR_MS: u32 = 10;

/// The longest ack period a controller keeps to, ms: a watchdog with a long isolation
/// timeout still gets an ack at least this often on each path it is heard on, so its
/// round-trip times and its view of the controller stay current.
pub const ACK_PERIOD_CEILING_MS: u32 = 1_000;

/// The time that must have passed since the last ack on a path before a heartbeat
/// asking for `asked_ms` is acked: the period clamped to [[`ACK_PERIOD_FLOOR_MS`],
/// [`ACK_PERIOD_CEILING_MS`]], less a quarter for the jitter of the watchdog's timer
/// and the network (see the module docs).
pub fn ack_spacing_ms(asked_ms: u32) -> u64 {
    let period = u64::from(asked_ms.clamp(ACK_PERIOD_FLOOR_MS, ACK_PERIOD_CEILING_MS));
    period - period / 4
}

const FIXED_LEN: usize = 64;
const FLAG_COUNTS: u8 = 1 << 0;

/// Longest valid ack: 464 bytes.
pub const MAX_ACK_LEN: usize = FIXED_LEN
    + 1
    + MAX_CLUSTER_ID_LEN
    + 1
    + MAX_HOST_ID_LEN
    + 1
    + MAX_CONTROLLER_ID_LEN
    + DATAGRAM_MAC_LEN;

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

    /// Appends the signed datagram to `out` after clearing it. `key` is the host's
    /// [`Key`] or its [`DatagramKey`] (as [`crate::Accepted::key`] hands it on).
    pub fn encode_into(
        &self,
        key: &impl AsRef<DatagramKey>,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
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
        wire::append_datagram_mac(out, key.as_ref());
        Ok(())
    }
}

/// Encodes and signs an ack into a new buffer.
pub fn encode_ack(ack: &Ack<'_>, key: &impl AsRef<DatagramKey>) -> Result<Vec<u8>, EncodeError> {
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
    wire::check_trailing_mac(datagram, &r, key.datagram_key())?;
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

/// One host's ack pacing, per path: what [`crate::HeartbeatReceiver::receive_paced`]
/// keeps next to the host's replay guard (see "Pacing" in the module docs). No clock
/// and no I/O: the caller passes its monotonic time in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckPacer {
    /// One slot per path index heard (at most 256).
    paths: Vec<PacedPath>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PacedPath {
    path: u8,
    /// When the last ack on this path was sent, caller's monotonic ms.
    last_ms: u64,
    /// Whether that ack carried "counts".
    counted: bool,
}

impl AckPacer {
    /// Nothing acked yet on any path.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to ack, at `now_ms` (the controller's monotonic clock, in ms), an
    /// accepted heartbeat on `path` that asks for `asked_ms` and whose ack would carry
    /// `counts`; `new_run` says it is the first of a watchdog run this controller heard.
    /// If so, it is recorded as the path's last ack.
    pub fn due(
        &mut self,
        path: u8,
        now_ms: u64,
        asked_ms: u32,
        counts: bool,
        new_run: bool,
    ) -> bool {
        let Some(slot) = self.paths.iter_mut().find(|p| p.path == path) else {
            self.paths.push(PacedPath {
                path,
                last_ms: now_ms,
                counted: counts,
            });
            return true;
        };
        let since = now_ms.saturating_sub(slot.last_ms);
        let due = if new_run || counts != slot.counted {
            since >= u64::from(ACK_PERIOD_FLOOR_MS)
        } else {
            since >= ack_spacing_ms(asked_ms)
        };
        if due {
            slot.last_ms = now_ms;
            slot.counted = counts;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spacing_is_three_quarters_of_the_period_clamped_to_the_floor_and_ceiling() {
        assert_eq!(ack_spacing_ms(375), 282);
        assert_eq!(ack_spacing_ms(100), 75);
        assert_eq!(ack_spacing_ms(0), 8, "the floor, 10 ms, less a quarter");
        assert_eq!(
            ack_spacing_ms(60_000),
            750,
            "the ceiling, 1 s, less a quarter"
        );
    }

    #[test]
    fn heartbeats_every_100_ms_asking_375_ms_are_acked_every_300_to_400_ms() {
        let mut p = AckPacer::new();
        let acked: Vec<u64> = (0..=20u64)
            .map(|k| k * 100)
            .filter(|&t| p.due(0, t, 375, true, t == 0))
            .collect();
        assert_eq!(acked, [0, 300, 600, 900, 1200, 1500, 1800]);
    }

    #[test]
    fn a_watchdog_asking_for_its_own_interval_gets_every_heartbeat_acked_despite_jitter() {
        let mut p = AckPacer::new();
        // Heartbeats nominally every 100 ms, each a few ms early or late.
        let arrivals = [0u64, 103, 198, 301, 396, 500, 597];
        let acked = arrivals
            .iter()
            .filter(|&&t| p.due(0, t, 100, true, t == 0))
            .count();
        assert_eq!(acked, arrivals.len());
    }

    #[test]
    fn each_path_is_paced_on_its_own() {
        let mut p = AckPacer::new();
        assert!(p.due(0, 0, 375, true, true));
        assert!(p.due(1, 10, 375, true, false), "path 1's first heartbeat");
        assert!(!p.due(0, 100, 375, true, false));
        assert!(!p.due(1, 110, 375, true, false));
        assert!(p.due(0, 300, 375, true, false));
        assert!(!p.due(1, 200, 375, true, false));
    }

    #[test]
    fn an_ack_that_would_change_the_counts_flag_is_sent_at_once_but_not_within_the_floor() {
        let mut p = AckPacer::new();
        // A restarted controller: the first heartbeat echoes an old session.
        assert!(p.due(0, 0, 375, false, true));
        // The watchdog learnt the session; its next heartbeat counts: acked at once.
        assert!(p.due(0, 100, 375, true, false));
        // Never two within the floor, whatever the flag does (a follower's ack, say,
        // 5 ms after the last one).
        assert!(!p.due(0, 105, 375, false, false));
        assert!(p.due(0, 110, 375, false, false));
        assert!(!p.due(0, 200, 375, false, false), "then paced again");
    }

    #[test]
    fn unproven_heartbeats_are_acked_no_more_often_than_proven_ones() {
        let mut p = AckPacer::new();
        let acked = (0..10u64)
            .filter(|&k| p.due(0, k * 100, 375, false, k == 0))
            .count();
        assert_eq!(acked, 4, "at 0, 300, 600 and 900 ms");
    }

    #[test]
    fn a_new_watchdog_run_is_acked_at_once() {
        let mut p = AckPacer::new();
        assert!(p.due(0, 0, 375, true, true));
        assert!(!p.due(0, 100, 375, true, false));
        assert!(p.due(0, 150, 375, true, true), "the watchdog restarted");
    }
}
