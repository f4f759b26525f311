//! Errors of the encoders and decoders, and the reasons a receiver counts when it
//! rejects something.

/// Why a datagram or a frame could not be decoded.
///
/// Every decoder in this crate returns one of these for any input it refuses; none of
/// them panics. [`DecodeError::reason`] folds an error into the [`RejectReason`] a
/// receiver counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first four bytes are not [`crate::MAGIC`]: not ours at all.
    #[error("bad magic: not a defib message")]
    BadMagic,
    /// Ours, but a version of this kind's layout this build does not speak and that is
    /// not older than those it does: a newer peer, or garbage (frames:
    /// [`crate::PROTOCOL_VERSION`]; acks: [`crate::ACK_VERSION`]; heartbeats:
    /// [`crate::HEARTBEAT_VERSION`]).
    #[error("unsupported protocol version {0} for this kind of message")]
    UnsupportedVersion(u8),
    /// Ours, but an older version of this kind's layout than any this build speaks: a
    /// peer that has not been upgraded.
    #[error("protocol version {0} of this kind of message is older than any this build speaks")]
    OldVersion(u8),
    /// A valid header for another kind of message (for example an ack where a
    /// heartbeat was expected, or a heartbeat replayed on the ack port).
    #[error("unexpected message kind {found} (expected {expected})")]
    WrongKind {
        /// The kind byte the message carries.
        found: u8,
        /// The kind byte the decoder expected.
        expected: u8,
    },
    /// The bytes end before the message does.
    #[error("truncated: the message needs {need} bytes but only {have} arrived")]
    Truncated {
        /// Bytes the message needs, as far as the decoder could tell.
        need: usize,
        /// Bytes there were.
        have: usize,
    },
    /// Longer than any valid message of this kind; refused before anything is
    /// allocated for it.
    #[error("oversize: {len} bytes, the limit is {max}")]
    Oversize {
        /// The length the message has or declares.
        len: usize,
        /// The largest length accepted.
        max: usize,
    },
    /// Structurally wrong: trailing bytes, an identifier that is empty, too long,
    /// not UTF-8 or holding control characters, reserved bits set, a frame sent in
    /// the wrong direction.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The HMAC does not match: forged, corrupted, or signed with another key.
    #[error("bad MAC: forged, corrupted or signed with another key")]
    BadMac,
    /// Signed, as far as can be told, for a host the receiver has no key for: a host
    /// that was never enrolled, or was revoked. Refused before any MAC is computed.
    #[error("unknown host: no key is enrolled for this host id")]
    UnknownHost,
    /// The frame is authentic but its JSON payload does not parse as an envelope.
    /// Only possible between peers that disagree on the schema, since the MAC has
    /// already been checked.
    #[error("bad payload: {0}")]
    BadPayload(String),
}

impl DecodeError {
    /// The counter this error belongs under.
    pub fn reason(&self) -> RejectReason {
        match self {
            DecodeError::BadMagic => RejectReason::BadMagic,
            DecodeError::UnsupportedVersion(_) => RejectReason::BadVersion,
            DecodeError::OldVersion(_) => RejectReason::OldVersion,
            DecodeError::WrongKind { .. } => RejectReason::WrongKind,
            DecodeError::Truncated { .. } => RejectReason::Truncated,
            DecodeError::Oversize { .. } => RejectReason::Oversize,
            DecodeError::Malformed(_) | DecodeError::BadPayload(_) => RejectReason::Malformed,
            DecodeError::BadMac => RejectReason::BadMac,
            DecodeError::UnknownHost => RejectReason::UnknownHost,
        }
    }
}

/// Why an encoder refused to build a message. These are caller bugs or bad
/// configuration, so a daemon should check its identifiers with
/// [`crate::check_host_id`] and friends before it binds anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// An identifier breaks the rules in [`crate::IdError`].
    #[error("{field}: {error}")]
    BadId {
        /// Which identifier (`cluster_id`, `host_id`, `controller_id`).
        field: &'static str,
        /// What is wrong with it.
        error: crate::IdError,
    },
    /// The frame body would exceed [`crate::MAX_FRAME_BODY_LEN`], so the peer would
    /// refuse it; split the payload (for example an inventory) instead.
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The body's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Every reason a receiver rejects a datagram or a frame, as one counter each.
///
/// The first group comes from decoding ([`DecodeError::reason`]); the rest from the
/// receiver's state ([`crate::ReplayGuard`], [`crate::HeartbeatReceiver`],
/// [`crate::AckReceiver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not our magic.
    BadMagic,
    /// Our magic, a protocol version that is not older than this build's but not one
    /// it speaks (a newer peer).
    BadVersion,
    /// Our magic, an older protocol version than any this build speaks (a peer not yet
    /// upgraded).
    OldVersion,
    /// A message of another kind than the receiver takes.
    WrongKind,
    /// Shorter than its own header says.
    Truncated,
    /// Longer than the limit.
    Oversize,
    /// Structurally invalid.
    Malformed,
    /// HMAC mismatch.
    BadMac,
    /// From a host id with no enrolled key (never enrolled, or revoked).
    UnknownHost,
    /// Authentic, but for another cluster id than the receiver's.
    UnknownCluster,
    /// A sequence number already seen, or older than the reorder window.
    Replayed,
    /// From an older incarnation (or an older boot) of the sender than the one the
    /// receiver already follows.
    StaleIncarnation,
    /// An ack that does not answer this watchdog: another host id, boot id or
    /// incarnation, or a sequence number never sent.
    NotForUs,
}

impl RejectReason {
    /// Every reason, in counter order.
    pub const ALL: [RejectReason; 13] = [
        RejectReason::BadMagic,
        RejectReason::BadVersion,
        RejectReason::OldVersion,
        RejectReason::WrongKind,
        RejectReason::Truncated,
        RejectReason::Oversize,
        RejectReason::Malformed,
        RejectReason::BadMac,
        RejectReason::UnknownHost,
        RejectReason::UnknownCluster,
        RejectReason::Replayed,
        RejectReason::StaleIncarnation,
        RejectReason::NotForUs,
    ];

    /// A stable snake_case name, fit for a Prometheus label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadMagic => "bad_magic",
            RejectReason::BadVersion => "bad_version",
            RejectReason::OldVersion => "old_version",
            RejectReason::WrongKind => "wrong_kind",
            RejectReason::Truncated => "truncated",
            RejectReason::Oversize => "oversize",
            RejectReason::Malformed => "malformed",
            RejectReason::BadMac => "bad_mac",
            RejectReason::UnknownHost => "unknown_host",
            RejectReason::UnknownCluster => "unknown_cluster",
            RejectReason::Replayed => "replayed",
            RejectReason::StaleIncarnation => "stale_incarnation",
            RejectReason::NotForUs => "not_for_us",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One counter per [`RejectReason`]; cheap to keep per receiver or per host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RejectCounters {
    counts: [u64; RejectReason::ALL.len()],
}

impl RejectCounters {
    /// Counts one rejection.
    pub fn record(&mut self, reason: RejectReason) {
        let slot = &mut self.counts[reason.index()];
        *slot = slot.saturating_add(1);
    }

    /// How many rejections were counted for `reason`.
    pub fn get(&self, reason: RejectReason) -> u64 {
        self.counts[reason.index()]
    }

    /// All rejections together.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Every reason with its count (zeros included, so a metrics exporter shows
    /// every series from the start).
    pub fn iter(&self) -> impl Iterator<Item = (RejectReason, u64)> + '_ {
        RejectReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }
}
