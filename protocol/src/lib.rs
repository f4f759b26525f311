//! The wire format between `defib-watchdog` (one per hypervisor) and
//! `defib-controller`.
//!
//! Four kinds of message, all but the refusal authenticated under the watchdog's own host
//! key ([`Key`], loaded with [`load_key`]; the controller derives every enrolled host's
//! key from its master key, [`HostKeys`]):
//!
//! | kind | byte | transport | direction | MAC | module |
//! |---|---|---|---|---|---|
//! | heartbeat | 1 | UDP, every 100 ms on every path | watchdog → controller | keyed BLAKE3, 16 bytes | [`heartbeat`] |
//! | heartbeat ack | 2 | UDP, at most one per host, path and ack period | controller → watchdog | keyed BLAKE3, 16 bytes | [`ack`] |
//! | stream frame | 3 | TCP (any byte stream) | both | HMAC-SHA256, 32 bytes | [`frame`] |
//! | refusal | 4 | UDP, answers a heartbeat of a version the controller does not take | controller → watchdog | none (only ever logged) | [`refusal`] |
//!
//! Every message starts with the same preamble: the magic `"DFIB"`, the version of that
//! kind's layout and the kind byte; all integers are big-endian. Heartbeats are at
//! [`HEARTBEAT_VERSION`] (4), acks at [`ACK_VERSION`] (3), frames at
//! [`PROTOCOL_VERSION`] (1); no other version of a heartbeat or an ack is decoded, and a
//! controller answers a heartbeat of another version with a refusal naming the ones it
//! takes. A version is per kind so that a new layout of one kind leaves the others
//! unchanged. The MAC is the last bytes of a message and covers every byte before it,
//! preamble included, so one kind can never be passed off as another. Datagrams are
//! fixed binary layouts (decoded without allocating, for the controller's million
//! heartbeats a second); stream frames carry a length-prefixed JSON [`Envelope`],
//! because events are rare and their schema grows. The exact layouts are in each
//! module's docs and in the crate's `README.md`.
//!
//! # Example: one heartbeat and its ack
//!
//! ```
//! use protocol::*;
//!
//! // The controller's master key; each host's key derives from it.
//! let master = MasterKey::new(b"the controller's master key, 32b").expect("long enough");
//! let key = master.host_key("compute-17");
//! // Watchdog side (its key file holds master.host_key_text("compute-17")).
//! let hb = Heartbeat {
//!     cluster_id: "prod-az1",
//!     host_id: "compute-17",
//!     boot_id: "0f5a3c7e-1b2d-4e6f-8a9b-0c1d2e3f4a5b".parse()?,
//!     incarnation: 1_790_000_000_000,
//!     sequence: 1,
//!     sent_unix_ns: 1_790_000_000_000_000_000,
//!     sent_mono_ns: 9_000_000_000,
//!     path_index: 0,
//!     session: 0, // none heard yet
//!     ack_period_ms: 375, // an eighth of a 3 s isolation timeout
//!     status: HostStatus { vm_count: 12, libvirt_reachable: true, ..HostStatus::default() },
//! };
//! let datagram = encode_heartbeat(&hb, &key)?;
//!
//! // Controller side.
//! let mut hosts = HostKeys::new(master.clone());
//! hosts.enroll("compute-17");
//! let session = 0x5e55_1011; // random per controller process
//! let mut receiver = HeartbeatReceiver::per_host(hosts, "prod-az1", session);
//! let accepted = receiver.receive(&datagram).expect("authentic and fresh");
//! assert_eq!(accepted.freshness, Freshness::First);
//! // It does not echo this process's session yet: acked, but no sign of life.
//! assert!(!accepted.proven);
//! assert!(accepted.ack_due, "receive() acks every heartbeat; receive_paced() paces");
//! let answer = Ack::answering(&accepted.heartbeat, "ctl-a", 1_790_000_000_001_000_000)
//!     .with_session(session)
//!     .counting(accepted.ack_counts);
//! // Signed with the key the heartbeat was verified with.
//! let ack = encode_ack(&answer, &accepted.key)?;
//! assert_eq!(receiver.receive(&datagram).unwrap_err(), RejectReason::Replayed);
//!
//! // Back on the watchdog.
//! let mut acks = AckReceiver::new(key, "prod-az1", "compute-17", hb.boot_id, hb.incarnation);
//! let got = acks.receive(&ack, hb.sequence).expect("answers our heartbeat");
//! // The watchdog now echoes the session; this ack did not count for reachability.
//! assert_eq!(got.session, session);
//! assert_eq!(acks.newest_acked_send_mono_ns(), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Identity, incarnations and replay
//!
//! A watchdog run is identified by (host id, boot id, incarnation). The boot id is
//! the kernel's ([`BootId::current`]). The incarnation is a `u64` the watchdog
//! persists and raises on every start; it must never repeat or go down, even if the
//! state file is lost, so the watchdog should take
//! `max(stored + 1, unix time in ms at start)`. The controller orders runs by
//! incarnation alone ([`ReplayGuard`]): a higher one resets the sequence window, a
//! lower one is stale. Within a run, every heartbeat datagram (on any path) takes
//! the next sequence number; a 64-wide window ([`SequenceWindow`]) absorbs
//! reordering between paths and refuses duplicates.
//!
//! Event ids are per host, start at 1, and are persisted by the watchdog across
//! restarts, so the controller deduplicates resent events by (host id, event id)
//! with a high-water mark ([`EventDedup`]).
//!
//! # Robustness
//!
//! No decoder panics on any input, allocates from a length field beyond
//! [`MAX_FRAME_BODY_LEN`] (1 MiB), or reads past its buffer; every refusal is a
//! [`DecodeError`], and receivers count refusals by [`RejectReason`]. Property tests
//! and cargo-fuzz targets (`fuzz/`) exercise this.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod ack;
mod error;
pub mod frame;
mod guard;
pub mod heartbeat;
mod hostkeys;
mod ids;
mod key;
pub mod refusal;
mod wire;

pub use ack::{
    ack_spacing_ms, decode_ack, encode_ack, Ack, AckPacer, ACK_PERIOD_CEILING_MS,
    ACK_PERIOD_FLOOR_MS, ACK_VERSION, KIND_ACK, MAX_ACK_LEN,
};
pub use error::{DecodeError, EncodeError, RejectCounters, RejectReason};
#[cfg(feature = "codec")]
pub use frame::frame_codec;
pub use frame::{
    decode_frame, decode_frame_keyed, encode_frame, fresh_nonce, Direction, Envelope, Event,
    EventPayload, FrameDecoder, FrameKeys, Message, VmInfo, FRAME_HEADER_LEN, KIND_FRAME,
    MAX_FRAME_BODY_LEN, MAX_FRAME_LEN,
};
pub use guard::{
    Accepted, AckReceiver, EventDedup, EventVerdict, Freshness, HeartbeatReceiver, ReplayGuard,
    SequenceWindow, REORDER_WINDOW,
};
pub use heartbeat::{
    decode_heartbeat, decode_heartbeat_keyed, encode_heartbeat, Heartbeat, HostStatus, NotArmed,
    SelfFence, HEARTBEAT_VERSION, HEARTBEAT_VERSIONS, KIND_HEARTBEAT, MAX_HEARTBEAT_LEN,
    MIN_HEARTBEAT_LEN,
};
pub use hostkeys::{HostKeys, MasterKey};
pub use ids::{
    check_cluster_id, check_controller_id, check_host_id, BootId, BootIdParseError, IdError,
    BOOT_ID_PATH, MAX_CLUSTER_ID_LEN, MAX_CONTROLLER_ID_LEN, MAX_HOST_ID_LEN,
};
pub use key::{
    check_secret_file_mode, load_key, DatagramKey, Key, KeyError, KeyTooShort, SecretFileError,
    DATAGRAM_MAC_CONTEXT, DATAGRAM_MAC_LEN, MAC_LEN, MIN_KEY_LEN, SECRET_MODE_FORBIDDEN,
};
pub use refusal::{
    decode_refusal, refusal_for, Refusal, RefusedHeartbeat, KIND_REFUSAL, REFUSAL_VERSION,
};

/// The four bytes every message starts with.
pub const MAGIC: [u8; 4] = *b"DFIB";

/// The version of the stream frame layout. A receiver refuses any other for it
/// (heartbeats and acks have their own, [`HEARTBEAT_VERSION`] and [`ACK_VERSION`]).
pub const PROTOCOL_VERSION: u8 = 1;

/// The receive buffer for one heartbeat or ack datagram, the one size every receiver
/// uses (the controller's heartbeat sockets, the watchdog's ack sockets, their tests).
/// It is larger than the largest valid datagram (an ack, [`MAX_ACK_LEN`]; a heartbeat,
/// [`MAX_HEARTBEAT_LEN`], is shorter), so a datagram longer than any valid one still
/// arrives longer than valid and is refused as oversize, instead of being cut by the
/// kernel to a length that passes the length check and is then refused for its MAC
/// (the wrong reason in the counters). Any size above the largest valid datagram does
/// that (checked below); 1024 is about twice it, room for longer ids, and small enough
/// for the controller, which holds one such buffer per datagram of a `recvmmsg` batch.
pub const DATAGRAM_RECV_BUFFER_LEN: usize = 1024;

// Any valid datagram fits the receive buffer with room to spare.
const _: () = assert!(MAX_HEARTBEAT_LEN < DATAGRAM_RECV_BUFFER_LEN);
const _: () = assert!(MAX_ACK_LEN < DATAGRAM_RECV_BUFFER_LEN);
