//! Receiver-side validation: replay windows, incarnation ordering, ack matching
//! and event dedup. All of it is plain state with no I/O and no clock: the callers
//! feed in what arrived and get a verdict back, so the controller's engine tests can
//! drive it deterministically.

use std::collections::{BTreeMap, HashMap};

use crate::ack::{decode_ack, Ack, AckPacer};
use crate::error::{RejectCounters, RejectReason};
use crate::heartbeat::{decode_heartbeat_keyed, Heartbeat};
use crate::hostkeys::HostKeys;
use crate::ids::BootId;
use crate::key::{DatagramKey, Key};

/// How far back (in sequence numbers) a datagram may arrive out of order and still
/// be accepted. Heartbeats on different paths share one sequence, so a slow path's
/// copy arrives "late"; at 100 ms per heartbeat on a few paths, 64 is seconds of
/// slack.
pub const REORDER_WINDOW: u64 = 64;

/// A sliding anti-replay window over sequence numbers (as in IPsec and WireGuard):
/// anything above the highest seen is new; anything within [`REORDER_WINDOW`] below it
/// is new once; anything older is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequenceWindow {
    highest: Option<u64>,
    /// Bit `i` set: sequence `highest - i` has been accepted.
    seen: u64,
}

impl SequenceWindow {
    /// An empty window: the first sequence number it sees is accepted, whatever it is.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest sequence number accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Accepts `sequence` (and remembers it) or refuses it as a replay.
    pub fn accept(&mut self, sequence: u64) -> Result<(), RejectReason> {
        let Some(highest) = self.highest else {
            self.highest = Some(sequence);
            self.seen = 1;
            return Ok(());
        };
        if sequence > highest {
            let shift = sequence - highest;
            self.seen = if shift >= REORDER_WINDOW {
                1
            } else {
                (self.seen << shift) | 1
            };
            self.highest = Some(sequence);
            return Ok(());
        }
        let back = highest - sequence;
        if back >= REORDER_WINDOW {
            return Err(RejectReason::Replayed);
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            return Err(RejectReason::Replayed);
        }
        self.seen |= bit;
        Ok(())
    }
}

/// What a heartbeat that passed the [`ReplayGuard`] means for the host's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The first heartbeat this guard has seen from the host.
    First,
    /// The next heartbeat of the incarnation already followed.
    Current,
    /// The watchdog restarted: a higher incarnation. `rebooted` says the boot id
    /// changed too, i.e. the host itself restarted.
    NewIncarnation {
        /// The boot id changed as well.
        rebooted: bool,
    },
}

/// Per-host ordering of heartbeats (the controller keeps one per host).
///
/// Epochs are ordered by incarnation alone, because boot ids are random and cannot
/// be ordered. That is why the watchdog must never reuse or lower an incarnation,
/// even after losing its state (see the crate docs): a higher incarnation, with any
/// boot id, starts a new epoch and resets the sequence window; a lower one is
/// refused as stale, and so is the same incarnation with another boot id (two boots
/// cannot share an incarnation, so one of them is a replay).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayGuard {
    epoch: Option<(BootId, u64)>,
    window: SequenceWindow,
}

impl ReplayGuard {
    /// A guard that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The boot id and incarnation currently followed.
    pub fn epoch(&self) -> Option<(BootId, u64)> {
        self.epoch
    }

    /// The highest sequence accepted in the current epoch.
    pub fn highest_sequence(&self) -> Option<u64> {
        self.window.highest()
    }

    /// Judges one authenticated datagram's (boot id, incarnation, sequence). State
    /// changes only when it is accepted.
    pub fn check(
        &mut self,
        boot_id: BootId,
        incarnation: u64,
        sequence: u64,
    ) -> Result<Freshness, RejectReason> {
        let freshness = match self.epoch {
            None => Freshness::First,
            Some((current_boot, current_incarnation)) => {
                if incarnation > current_incarnation {
                    Freshness::NewIncarnation {
                        rebooted: boot_id != current_boot,
                    }
                } else if incarnation == current_incarnation && boot_id == current_boot {
                    self.window.accept(sequence)?;
                    return Ok(Freshness::Current);
                } else {
                    return Err(RejectReason::StaleIncarnation);
                }
            }
        };
        self.epoch = Some((boot_id, incarnation));
        self.window = SequenceWindow::new();
        // A fresh window accepts anything.
        self.window.accept(sequence)?;
        Ok(freshness)
    }

    /// [`ReplayGuard::check`] for a decoded heartbeat.
    pub fn check_heartbeat(
        &mut self,
        heartbeat: &Heartbeat<'_>,
    ) -> Result<Freshness, RejectReason> {
        self.check(heartbeat.boot_id, heartbeat.incarnation, heartbeat.sequence)
    }
}

/// A heartbeat the [`HeartbeatReceiver`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted<'a> {
    /// The heartbeat, borrowing from the datagram.
    pub heartbeat: Heartbeat<'a>,
    /// What it means for the host's epoch.
    pub freshness: Freshness,
    /// It echoes this receiver's session (always true for a receiver without one): a
    /// sign of life. False: authentic and not seen before by this process, but it may
    /// have been recorded before this controller started, so it proves nothing; ack it
    /// (without the "counts" flag) so that a live watchdog learns the session.
    pub proven: bool,
    /// The host's datagram key, looked up once to verify the heartbeat: sign the ack
    /// with it.
    pub key: DatagramKey,
    /// Whether to ack it now ([`HeartbeatReceiver::receive_paced`] applies the pacing of
    /// [`crate::ack`]; [`HeartbeatReceiver::receive`] says yes to every one).
    pub ack_due: bool,
    /// The "counts" flag its ack carries: proven, and the caller acts
    /// ([`HeartbeatReceiver::receive_paced`]'s `acting`; true for
    /// [`HeartbeatReceiver::receive`]).
    pub ack_counts: bool,
}

/// What a receiver keeps per host: its replay guard and its ack pacing, found with one
/// lookup.
#[derive(Debug, Clone, Default)]
struct HostState {
    guard: ReplayGuard,
    pacer: AckPacer,
}

/// Which key a heartbeat must be signed with.
#[derive(Debug, Clone)]
enum ReceiverKeys {
    /// One key for every host (tests, tools).
    Shared(Key),
    /// Each enrolled host's own key; any other host id is refused.
    PerHost(HostKeys),
}

/// The controller's heartbeat intake: decode, authenticate, check the cluster, then
/// the host's [`ReplayGuard`]; every refusal is counted by reason.
///
/// Hosts are added on their first authentic heartbeat (only key holders can add
/// one). After warm-up, accepting a heartbeat allocates nothing.
#[derive(Debug)]
pub struct HeartbeatReceiver {
    keys: ReceiverKeys,
    cluster_id: String,
    hosts: HashMap<String, HostState>,
    counters: RejectCounters,
    /// The session heartbeats must echo to be proven; `None`: not checked.
    session: Option<u64>,
}

impl HeartbeatReceiver {
    /// A receiver for heartbeats of `cluster_id` all signed with `key`, without a
    /// session (every accepted heartbeat is proven). For tests and tools; the
    /// controller uses [`HeartbeatReceiver::per_host`].
    pub fn new(key: Key, cluster_id: impl Into<String>) -> Self {
        HeartbeatReceiver {
            keys: ReceiverKeys::Shared(key),
            cluster_id: cluster_id.into(),
            hosts: HashMap::new(),
            counters: RejectCounters::default(),
            session: None,
        }
    }

    /// A receiver for heartbeats of `cluster_id` from the hosts enrolled in `keys`,
    /// each signed with its own key, proven only when they echo `session`.
    pub fn per_host(keys: HostKeys, cluster_id: impl Into<String>, session: u64) -> Self {
        HeartbeatReceiver {
            keys: ReceiverKeys::PerHost(keys),
            cluster_id: cluster_id.into(),
            hosts: HashMap::new(),
            counters: RejectCounters::default(),
            session: Some(session),
        }
    }

    /// The session heartbeats must echo, if checked.
    pub fn session(&self) -> Option<u64> {
        self.session
    }

    /// The key `host_id`'s heartbeats are signed with (and its acks must be).
    pub fn key_for(&self, host_id: &str) -> Option<&Key> {
        match &self.keys {
            ReceiverKeys::Shared(key) => Some(key),
            ReceiverKeys::PerHost(keys) => keys.get(host_id),
        }
    }

    /// The enrolled hosts' keys, to enroll or revoke (`None` for a shared-key receiver).
    /// A revoked host's replay state is dropped by [`HeartbeatReceiver::forget_host`].
    pub fn host_keys_mut(&mut self) -> Option<&mut HostKeys> {
        match &mut self.keys {
            ReceiverKeys::Shared(_) => None,
            ReceiverKeys::PerHost(keys) => Some(keys),
        }
    }

    /// Judges one datagram as it came off the socket; every accepted heartbeat is to be
    /// acked ([`Accepted::ack_due`]), counting if proven. For tests and tools: the
    /// controller paces its acks with [`HeartbeatReceiver::receive_paced`].
    pub fn receive<'a>(&mut self, datagram: &'a [u8]) -> Result<Accepted<'a>, RejectReason> {
        let verdict = self.judge(datagram, None);
        if let Err(reason) = verdict {
            self.counters.record(reason);
        }
        verdict
    }

    /// [`HeartbeatReceiver::receive`] with the ack pacing of [`crate::ack`]: at
    /// `now_ms` (the caller's monotonic clock, ms), is the ack of this heartbeat due?
    /// `acting`: the caller's acks say "counts" for proven heartbeats (a leader, or the
    /// only controller); a follower's never do.
    pub fn receive_paced<'a>(
        &mut self,
        datagram: &'a [u8],
        now_ms: u64,
        acting: bool,
    ) -> Result<Accepted<'a>, RejectReason> {
        let verdict = self.judge(datagram, Some((now_ms, acting)));
        if let Err(reason) = verdict {
            self.counters.record(reason);
        }
        verdict
    }

    fn judge<'a>(
        &mut self,
        datagram: &'a [u8],
        paced: Option<(u64, bool)>,
    ) -> Result<Accepted<'a>, RejectReason> {
        // The key is looked up once: to verify, and (copied out) to sign the ack.
        let mut key = None;
        let heartbeat = match &self.keys {
            ReceiverKeys::Shared(k) => decode_heartbeat_keyed(datagram, |_| {
                key = Some(*k.datagram_key());
                Some(k)
            }),
            ReceiverKeys::PerHost(keys) => decode_heartbeat_keyed(datagram, |h| {
                let k = keys.get(h)?;
                key = Some(*k.datagram_key());
                Some(k)
            }),
        }
        .map_err(|e| e.reason())?;
        // Decoding succeeded, so the key was found.
        let key = key.ok_or(RejectReason::UnknownHost)?;
        if heartbeat.cluster_id != self.cluster_id {
            return Err(RejectReason::UnknownCluster);
        }
        let host = match self.hosts.get_mut(heartbeat.host_id) {
            Some(host) => host,
            None => self.hosts.entry(heartbeat.host_id.to_owned()).or_default(),
        };
        let freshness = host.guard.check_heartbeat(&heartbeat)?;
        let proven = self.session.is_none_or(|s| s == heartbeat.session);
        let (ack_due, ack_counts) = match paced {
            None => (true, proven),
            Some((now_ms, acting)) => {
                let counts = acting && proven;
                let new_run = !matches!(freshness, Freshness::Current);
                let due = host.pacer.due(
                    heartbeat.path_index,
                    now_ms,
                    heartbeat.ack_period_ms,
                    counts,
                    new_run,
                );
                (due, counts)
            }
        };
        Ok(Accepted {
            heartbeat,
            freshness,
            proven,
            key,
            ack_due,
            ack_counts,
        })
    }

    /// Rejections so far, by reason.
    pub fn counters(&self) -> &RejectCounters {
        &self.counters
    }

    /// The guard of one host, if it has been heard from.
    pub fn guard(&self, host_id: &str) -> Option<&ReplayGuard> {
        self.hosts.get(host_id).map(|h| &h.guard)
    }

    /// Forgets a host (for example one removed from the cluster); its next heartbeat
    /// is treated as the first (and acked at once).
    pub fn forget_host(&mut self, host_id: &str) -> Option<ReplayGuard> {
        self.hosts.remove(host_id).map(|h| h.guard)
    }
}

/// The watchdog's ack intake: is this authentic ack an answer to one of *our*
/// heartbeats?
///
/// It does not refuse duplicate acks (several controllers may ack the same
/// heartbeat). Only acks with the "counts" flag ([`Ack::counts`]) move reachability;
/// the others are returned (for their session) and change nothing here. Replays cannot fake reachability anyway: what counts is
/// [`AckReceiver::newest_acked_send_mono_ns`], the send time of the newest
/// heartbeat any controller answered, which the MAC protects. The watchdog's
/// isolation timeout runs from that instant, not from when an ack arrived.
#[derive(Debug)]
pub struct AckReceiver {
    key: Key,
    cluster_id: String,
    host_id: String,
    boot_id: BootId,
    incarnation: u64,
    newest_acked_send_mono_ns: Option<u64>,
    newest_acked_by_path: BTreeMap<u8, u64>,
    counters: RejectCounters,
}

impl AckReceiver {
    /// A receiver for acks to the heartbeats of this watchdog run.
    pub fn new(
        key: Key,
        cluster_id: impl Into<String>,
        host_id: impl Into<String>,
        boot_id: BootId,
        incarnation: u64,
    ) -> Self {
        AckReceiver {
            key,
            cluster_id: cluster_id.into(),
            host_id: host_id.into(),
            boot_id,
            incarnation,
            newest_acked_send_mono_ns: None,
            newest_acked_by_path: BTreeMap::new(),
            counters: RejectCounters::default(),
        }
    }

    /// Judges one datagram. `highest_sent_sequence` is the last sequence number this
    /// watchdog sent: an ack for a higher one answers a heartbeat never sent.
    pub fn receive<'a>(
        &mut self,
        datagram: &'a [u8],
        highest_sent_sequence: u64,
    ) -> Result<Ack<'a>, RejectReason> {
        let verdict = self.judge(datagram, highest_sent_sequence);
        if let Err(reason) = verdict {
            self.counters.record(reason);
        }
        verdict
    }

    fn judge<'a>(
        &mut self,
        datagram: &'a [u8],
        highest_sent: u64,
    ) -> Result<Ack<'a>, RejectReason> {
        let ack = decode_ack(datagram, &self.key).map_err(|e| e.reason())?;
        if ack.cluster_id != self.cluster_id {
            return Err(RejectReason::UnknownCluster);
        }
        if ack.host_id != self.host_id {
            return Err(RejectReason::NotForUs);
        }
        if ack.boot_id != self.boot_id || ack.incarnation != self.incarnation {
            return Err(RejectReason::StaleIncarnation);
        }
        if ack.sequence > highest_sent {
            return Err(RejectReason::NotForUs);
        }
        if !ack.counts {
            // Authentic and ours, but from a follower or for a heartbeat that echoed an
            // old session: it teaches the session, and says nothing about reachability.
            return Ok(ack);
        }
        let newest = self.newest_acked_send_mono_ns.get_or_insert(0);
        *newest = (*newest).max(ack.echoed_sent_mono_ns);
        let on_path = self.newest_acked_by_path.entry(ack.path_index).or_insert(0);
        *on_path = (*on_path).max(ack.echoed_sent_mono_ns);
        Ok(ack)
    }

    /// Monotonic send time of the newest heartbeat some controller acked, on any
    /// path: the watchdog was reachable at that instant.
    pub fn newest_acked_send_mono_ns(&self) -> Option<u64> {
        self.newest_acked_send_mono_ns
    }

    /// The same, for one path.
    pub fn newest_acked_send_mono_ns_on_path(&self, path_index: u8) -> Option<u64> {
        self.newest_acked_by_path.get(&path_index).copied()
    }

    /// Rejections so far, by reason.
    pub fn counters(&self) -> &RejectCounters {
        &self.counters
    }
}

/// Whether an event is new to the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventVerdict {
    /// Not stored yet. `missing` counts the ids skipped between the last stored
    /// event and this one (non-zero means the watchdog lost events).
    New {
        /// Ids between the high-water mark and this event that never arrived.
        missing: u64,
    },
    /// Already stored (a resend after a reconnect); ack it again, store nothing.
    Duplicate,
}

/// The controller's per-host event high-water marks, for at-least-once delivery
/// with dedup.
///
/// Event ids are per host and survive watchdog restarts, and the stream delivers
/// them in order, so one number per host is enough: an id at or below the mark is
/// a duplicate. [`EventDedup::check`] does not move the mark; call
/// [`EventDedup::commit`] once the event is stored, so an event whose store failed
/// is taken again when the watchdog resends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventDedup {
    highest: HashMap<String, u64>,
}

impl EventDedup {
    /// No host known yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a host's mark from the store (at controller start).
    pub fn restore(&mut self, host_id: &str, highest_stored: u64) {
        self.highest.insert(host_id.to_owned(), highest_stored);
    }

    /// The highest event id stored for `host_id` (0: none); what a `Welcome` says.
    pub fn highest(&self, host_id: &str) -> u64 {
        self.highest.get(host_id).copied().unwrap_or(0)
    }

    /// New or duplicate? Does not change anything.
    pub fn check(&self, host_id: &str, event_id: u64) -> EventVerdict {
        let highest = self.highest(host_id);
        if event_id <= highest {
            EventVerdict::Duplicate
        } else {
            EventVerdict::New {
                missing: event_id - highest - 1,
            }
        }
    }

    /// Records that `event_id` is stored; the mark never moves down.
    pub fn commit(&mut self, host_id: &str, event_id: u64) {
        match self.highest.get_mut(host_id) {
            Some(highest) => *highest = (*highest).max(event_id),
            None => {
                self.highest.insert(host_id.to_owned(), event_id);
            }
        }
    }
}
