//! Event frames for the reliable stream (TCP, both directions).
//!
//! Layout of one frame (big-endian integers; offsets in bytes):
//!
//! ```text
//!  0   4  magic "DFIB"
//!  4   1  protocol version (1)
//!  5   1  kind (3 = frame)
//!  6   2  reserved, zero
//!  8   4  L = body length (at most MAX_FRAME_BODY_LEN = 1 MiB)
//! 12   L  body: one Envelope as UTF-8 JSON
//!  .  32  HMAC-SHA256 over bytes 0..12+L (header and body)
//! ```
//!
//! The stream is a plain sequence of frames. Any decoding error is fatal for the
//! connection: after a bad MAC or a bad length there is no trustworthy way to find
//! the next frame, so [`FrameDecoder`] keeps returning the first error and the
//! caller closes the connection; the watchdog reconnects and resends what was not
//! acked.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, EncodeError};
use crate::ids::{check_cluster_id, check_controller_id, check_host_id, BootId};
use crate::key::{Key, MAC_LEN};
use crate::wire::{self, Reader};

/// Kind byte of a stream frame.
pub const KIND_FRAME: u8 = 3;
/// Bytes before the body: magic, version, kind, reserved, length.
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest frame body accepted. A length field above it is refused as soon as the
/// header has arrived, before anything is buffered or allocated for the body.
pub const MAX_FRAME_BODY_LEN: usize = 1 << 20;
/// Largest whole frame on the wire.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + MAX_FRAME_BODY_LEN + MAC_LEN;

/// Everything on the stream travels in an envelope that names the watchdog the
/// conversation is about, in both directions (the controller echoes the watchdog's
/// identity back, so a reply meant for another host or an older incarnation is
/// recognisable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The cluster.
    pub cluster_id: String,
    /// The watchdog's host id.
    pub host_id: String,
    /// The watchdog host's boot id.
    pub boot_id: BootId,
    /// The watchdog's incarnation.
    pub incarnation: u64,
    /// Binds the frame to its connection (0: not bound, as on [`Message::Challenge`]).
    /// From the watchdog: the controller's challenge for this connection; from the
    /// controller: the watchdog's nonce from its `Hello`. Each side refuses a frame
    /// whose value is not its own for this connection, so a frame recorded on one
    /// connection cannot be replayed on another (on top of TLS, which already stops a
    /// replay on the wire).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conn: u64,
    /// What this frame says.
    pub message: Message,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A fresh random nonce for a connection (never 0), from the kernel's random source.
pub fn fresh_nonce() -> u64 {
    use std::io::Read as _;
    let mut buf = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    let n = u64::from_ne_bytes(buf);
    if read.is_ok() && n != 0 {
        return n;
    }
    // No random source: the time still differs between two connections.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        .max(1)
}

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Watchdog → controller: [`Message::Hello`], [`Message::Event`],
    /// [`Message::CommandResult`].
    ToController,
    /// Controller → watchdog: [`Message::Welcome`], [`Message::EventAck`],
    /// [`Message::Command`].
    ToWatchdog,
}

/// The messages on the stream.
///
/// The conversation: the watchdog connects; the controller sends `Challenge` with a
/// fresh nonce; the watchdog answers `Hello` carrying that nonce (in
/// [`Envelope::conn`]) and a fresh nonce of its own; the controller answers `Welcome`
/// with the highest event id it holds for the host (carrying the watchdog's nonce, as
/// every later frame of either side carries the other's); the watchdog sends
/// every event above that id, in order, then new events as they happen; the
/// controller sends `EventAck` (cumulative) once events are stored. At-least-once
/// delivery, with the controller deduplicating by (host id, event id)
/// ([`crate::EventDedup`]).
///
/// Once the stream is open (after `Welcome`) the controller may also send `Command`s
/// for the watchdog to carry out on its host; the watchdog answers each with a
/// `CommandResult` naming the same `command_id`. Commands are idempotent by design (a
/// resent `StartDomain` for a running domain answers ok), so the controller may send
/// one again after a lost connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Controller → watchdog, the first frame on a connection: a fresh nonce that the
    /// watchdog's `Hello` (and every later frame of the watchdog on this connection)
    /// must carry in [`Envelope::conn`]. A recorded `Hello` replayed on a new connection
    /// answers an old challenge and is refused.
    Challenge {
        /// The challenge.
        nonce: u64,
    },
    /// Watchdog → controller, the answer to `Challenge`.
    Hello {
        /// The highest event id the watchdog has assigned (0: none yet).
        last_event_id: u64,
        /// The watchdog's own fresh nonce: every later frame of the controller on this
        /// connection carries it in [`Envelope::conn`].
        #[serde(default)]
        nonce: u64,
    },
    /// Controller → watchdog, the answer to `Hello`.
    ///
    /// If `highest_event_id` is above the watchdog's own `last_event_id`, the
    /// watchdog lost its event state: it must continue numbering above
    /// `highest_event_id`, or the controller would drop its new events as
    /// duplicates.
    Welcome {
        /// Which controller answered.
        controller_id: String,
        /// The highest event id the controller holds for this host (0: none).
        highest_event_id: u64,
    },
    /// Watchdog → controller, one event.
    Event(Event),
    /// Controller → watchdog: every event with an id up to and including
    /// `up_to_event_id` is stored; the watchdog may forget them.
    EventAck {
        /// Which controller acked.
        controller_id: String,
        /// Cumulative high-water mark.
        up_to_event_id: u64,
    },
    /// Controller → watchdog: carry out `command` on this host and answer with a
    /// [`Message::CommandResult`] for `command_id`.
    Command {
        /// Which controller asks.
        controller_id: String,
        /// Chosen by the controller (derived from the intent it carries out); echoed in
        /// the result.
        command_id: u64,
        /// What to do.
        command: HostCommand,
    },
    /// Watchdog → controller: how a [`Message::Command`] ended.
    CommandResult {
        /// The command's id.
        command_id: u64,
        /// It was done (or there was nothing to do).
        ok: bool,
        /// What happened, or why it failed, for the incident's timeline.
        detail: String,
    },
}

impl Message {
    /// Which way this message is allowed to travel.
    pub fn direction(&self) -> Direction {
        match self {
            Message::Hello { .. } | Message::Event(_) | Message::CommandResult { .. } => {
                Direction::ToController
            }
            Message::Challenge { .. }
            | Message::Welcome { .. }
            | Message::EventAck { .. }
            | Message::Command { .. } => Direction::ToWatchdog,
        }
    }
}

/// What the controller can ask a watchdog to do on its host. Serialized with an `"op"`
/// tag in snake_case.
///
/// New commands may be added without a protocol version bump: an older watchdog
/// decodes them as [`HostCommand::Unknown`] and answers with a failed result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HostCommand {
    /// Start a defined, shut-off libvirt domain (`virDomainCreate`). A domain that is
    /// already running is an ok result ("already running"), so a resent command is
    /// harmless.
    StartDomain {
        /// The domain's UUID (or, for a domain known only by name, its name).
        vm_uuid: String,
    },
    /// Evacuation without Nova: define the domain on this host from the definition its
    /// failed (and fenced) host reported, then start it as [`HostCommand::StartDomain`]
    /// does. Refused unless every disk it names exists here (shared storage). A domain
    /// already running here is an ok result, so a resent command is harmless.
    StartFromDefinition {
        /// The domain's UUID.
        vm_uuid: String,
        /// The domain XML (libvirt's inactive definition).
        xml: String,
    },
    /// Read only: does the domain run on this host now? Asked when an evacuation's
    /// outcome is not known (its answer was lost), before it is tried anywhere else.
    ///
    /// The watchdog answers only after every command it received earlier for the same
    /// domain (same `vm_uuid`, ignoring case) has finished, so a query sent after a slow
    /// [`HostCommand::StartFromDefinition`] sees that start's result.
    ///
    /// The answer is a [`Message::CommandResult`]; [`query_domain_answer`] reads it:
    /// - `ok = true`, `detail` = `"running"`, or `"running: "` and the state: the domain
    ///   is active in any state (running, paused, being started, shutting down);
    /// - `ok = true`, `detail` = `"not running"`, or `"not running: "` and why: the
    ///   domain is not defined here, or it is defined and shut off;
    /// - `ok = false`: the watchdog could not tell (libvirt unreachable, or a watchdog
    ///   too old to know this command, which answers as to any [`HostCommand::Unknown`]);
    ///   `detail` says why.
    QueryDomain {
        /// The domain's UUID.
        vm_uuid: String,
    },
    /// A stale copy: the controller moved this domain off this host and it runs
    /// elsewhere. Destroy it if it is active (`virDomainDestroy`) and turn its autostart
    /// off, so that the next boot does not start it either; never undefine it (its
    /// definition is for operators and Nova to clean up). Ok with what was done: the
    /// detail starts with `destroyed` when a copy ran, with `not running` when none did
    /// (also for a domain not defined here). A resent command is harmless.
    DestroyDomain {
        /// The domain's UUID (or, for a domain known only by name, its name).
        vm_uuid: String,
    },
    /// A command this build does not know (sent by a newer controller).
    #[serde(other)]
    Unknown,
}

/// How a [`HostCommand::QueryDomain`] answer's `detail` begins when the domain runs.
pub const QUERY_RUNNING: &str = "running";
/// How a [`HostCommand::QueryDomain`] answer's `detail` begins when it does not.
pub const QUERY_NOT_RUNNING: &str = "not running";

/// The `detail` of a [`HostCommand::QueryDomain`] answer (sent with `ok = true`):
/// whether the domain runs, then, if `why` is not empty, `": "` and `why`.
pub fn query_domain_detail(runs: bool, why: &str) -> String {
    let word = if runs {
        QUERY_RUNNING
    } else {
        QUERY_NOT_RUNNING
    };
    if why.is_empty() {
        word.to_string()
    } else {
        format!("{word}: {why}")
    }
}

/// Reads a [`HostCommand::QueryDomain`] answer: `Some(true)` it runs there,
/// `Some(false)` it does not, `None` the watchdog could not tell (or answered something
/// this build cannot read, which is not taken as either).
pub fn query_domain_answer(ok: bool, detail: &str) -> Option<bool> {
    if !ok {
        return None;
    }
    let is = |word: &str| {
        detail
            .strip_prefix(word)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(": "))
    };
    if is(QUERY_RUNNING) {
        Some(true)
    } else if is(QUERY_NOT_RUNNING) {
        Some(false)
    } else {
        None
    }
}

/// One event seen on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Per-host event id: starts at 1, grows by one per event, survives watchdog
    /// restarts and reboots (the watchdog persists it). 0 is never an event id.
    pub id: u64,
    /// Wall clock when the watchdog recorded the event, unix ns.
    pub unix_ns: u64,
    /// The host's monotonic clock when the watchdog recorded the event, ns; orders
    /// events of one boot even across clock steps.
    pub mono_ns: u64,
    /// What happened.
    pub payload: EventPayload,
}

/// What happened. Serialized with a `"kind"` tag in snake_case.
///
/// New kinds may be added without a protocol version bump: an older controller
/// decodes them as [`EventPayload::Unknown`], stores nothing for them, and still
/// acks them so the stream moves on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventPayload {
    /// A qemu process exited (eBPF `sched_process_exit`, with the signal and its
    /// sender from `signal_generate` and OOM from `mark_victim`).
    QemuExited {
        /// The VM's libvirt domain UUID (= Nova instance UUID), if the pid was mapped.
        vm_uuid: Option<String>,
        /// The libvirt domain name, if known.
        vm_name: Option<String>,
        /// The qemu process id.
        pid: u32,
        /// The exit code, if it exited normally.
        exit_code: Option<i32>,
        /// The signal that killed it, if any.
        signal: Option<i32>,
        /// The pid that sent the signal, if known.
        killer_pid: Option<u32>,
        /// The sender's command name, if known.
        killer_comm: Option<String>,
        /// The signal came from the hypervisor's own management daemon (libvirtd,
        /// virtqemud): a destroy or shutdown it carried out (an operator's `virsh
        /// destroy`, Nova's stop or hard reboot). Its own lifecycle event says whether
        /// that was a failure, so this account alone is not one. Absent from older
        /// watchdogs: `false`.
        #[serde(default)]
        by_hypervisor: bool,
        /// The kernel's OOM killer chose it.
        oom_killed: bool,
        /// Kernel timestamp of the exit (`bpf_ktime_get_ns`, host monotonic ns).
        kernel_ts_ns: u64,
    },
    /// A qemu process started.
    QemuStarted {
        /// The VM's UUID, if mapped.
        vm_uuid: Option<String>,
        /// The VM's name, if known.
        vm_name: Option<String>,
        /// The qemu process id.
        pid: u32,
    },
    /// A VM's I/O has been stuck past the stall threshold.
    DiskStallStarted {
        /// The VM's UUID, if mapped.
        vm_uuid: Option<String>,
        /// The VM's name, if known.
        vm_name: Option<String>,
        /// The qemu process id.
        pid: u32,
        /// When the oldest stuck request or thread began waiting, host monotonic ns.
        since_ns: u64,
        /// Requests or threads stuck right now.
        stuck_ops: u32,
        /// The disks (device or image paths) involved, as far as known.
        paths: Vec<String>,
    },
    /// A VM's I/O moves again.
    DiskStallEnded {
        /// The VM's UUID, if mapped.
        vm_uuid: Option<String>,
        /// The VM's name, if known.
        vm_name: Option<String>,
        /// The qemu process id.
        pid: u32,
        /// How long the stall lasted.
        duration_ms: u64,
    },
    /// A libvirt domain lifecycle event.
    LibvirtLifecycle {
        /// The domain UUID, if known.
        vm_uuid: Option<String>,
        /// The domain name, if known.
        vm_name: Option<String>,
        /// The event (`Stopped`, `Crashed`, …) as libvirt names it.
        event: String,
        /// The event's detail (`Failed`, `Destroyed`, …).
        detail: String,
    },
    /// A persistent domain's definition (libvirt's inactive XML, without secrets), sent
    /// when the watchdog first sees it and whenever it changes, so that the controller
    /// can start the domain elsewhere once this host is fenced.
    DomainDefinition {
        /// The domain UUID.
        vm_uuid: String,
        /// The domain name.
        vm_name: String,
        /// The XML.
        xml: String,
    },
    /// The full list of VMs on the host; sent after connecting and when it changes.
    Inventory {
        /// Every VM.
        vms: Vec<VmInfo>,
    },
    /// The host's disk leases (libvirt's lock manager, virtlockd), from a watchdog that
    /// watches them: sent when its daemon exits or starts and whenever the set of VMs
    /// running without their leases changes. A host without this word is not judged by
    /// its leases.
    DiskLeases {
        /// The lease daemon's pid while it runs; `None` when it does not.
        daemon_pid: Option<u32>,
        /// VMs (UUID, or name when libvirt gave none) running on the host whose writable
        /// disks are not all locked by the running daemon: a second start of them on
        /// another host would not be refused. Every such VM while the daemon is down.
        unprotected: Vec<String>,
        /// What happened, for people ("virtlockd pid 812 killed by signal 9 from pid
        /// 1201 (kill)", "2 VMs run without their leases").
        reason: String,
    },
    /// An event kind this build does not know (sent by a newer watchdog).
    #[serde(other)]
    Unknown,
}

/// One VM in an [`EventPayload::Inventory`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// libvirt domain UUID (= Nova instance UUID).
    pub uuid: String,
    /// libvirt domain name.
    pub name: String,
    /// libvirt domain state (`running`, `paused`, `shutoff`, …).
    pub state: String,
    /// Why it is in that state (libvirt's reason: `booted`, `crashed`, `destroyed`,
    /// `shutdown`, …); empty from older watchdogs.
    #[serde(default)]
    pub reason: String,
    /// qemu pid, when running.
    pub pid: Option<u32>,
    /// Disk sources (device or image paths).
    pub disks: Vec<String>,
}

fn check_envelope(envelope: &Envelope) -> Result<(), EncodeError> {
    let bad = |field| move |error| EncodeError::BadId { field, error };
    check_cluster_id(&envelope.cluster_id).map_err(bad("cluster_id"))?;
    check_host_id(&envelope.host_id).map_err(bad("host_id"))?;
    match &envelope.message {
        Message::Welcome { controller_id, .. }
        | Message::EventAck { controller_id, .. }
        | Message::Command { controller_id, .. } => {
            check_controller_id(controller_id).map_err(bad("controller_id"))
        }
        Message::Challenge { .. }
        | Message::Hello { .. }
        | Message::Event(_)
        | Message::CommandResult { .. } => Ok(()),
    }
}

/// Encodes and signs one frame.
///
/// Fails on an invalid id or on a body above [`MAX_FRAME_BODY_LEN`] (which the peer
/// would refuse; split a large inventory instead).
pub fn encode_frame(envelope: &Envelope, key: &Key) -> Result<Vec<u8>, EncodeError> {
    check_envelope(envelope)?;
    let mut out = Vec::with_capacity(256);
    wire::put_preamble(&mut out, KIND_FRAME);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&[0; 4]); // length, patched below
                                    // Serializing plain structs of strings and integers into a Vec cannot fail.
    serde_json::to_writer(&mut out, envelope).unwrap_or_default();
    let body_len = out.len() - FRAME_HEADER_LEN;
    let too_large = EncodeError::FrameTooLarge {
        len: body_len,
        max: MAX_FRAME_BODY_LEN,
    };
    if body_len > MAX_FRAME_BODY_LEN {
        return Err(too_large);
    }
    let len_bytes = u32::try_from(body_len)
        .map_err(|_| too_large)?
        .to_be_bytes();
    if let Some(slot) = out.get_mut(8..FRAME_HEADER_LEN) {
        slot.copy_from_slice(&len_bytes);
    }
    wire::append_frame_mac(&mut out, key);
    Ok(out)
}

/// Reads the header at the start of `buf` and returns the whole frame's length, or
/// `Ok(None)` if the header has not fully arrived.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    // The preamble is judged on whatever has arrived, so garbage fails fast.
    match wire::check_preamble(buf, KIND_FRAME) {
        Ok(()) => {}
        Err(DecodeError::Truncated { .. }) => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut r = Reader::new(buf);
    let header = match r.array::<FRAME_HEADER_LEN>() {
        Ok(h) => h,
        Err(_) => return Ok(None),
    };
    let [.., r0, r1, l0, l1, l2, l3] = header;
    if (r0, r1) != (0, 0) {
        return Err(DecodeError::Malformed("reserved frame header bytes set"));
    }
    let body_len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if body_len > MAX_FRAME_BODY_LEN {
        return Err(DecodeError::Oversize {
            len: body_len,
            max: MAX_FRAME_BODY_LEN,
        });
    }
    Ok(Some(FRAME_HEADER_LEN + body_len + MAC_LEN))
}

/// Gives the key of an enrolled host, `None` for any other host id.
pub type KeyLookup = Arc<dyn Fn(&str) -> Option<Key> + Send + Sync>;

/// The key(s) a [`FrameDecoder`] verifies with.
#[derive(Clone)]
pub enum FrameKeys {
    /// Every frame is signed with this key: a watchdog reading its controller's
    /// frames, signed with the watchdog's own host key.
    One(Key),
    /// Each frame is signed with the key of the host its envelope names; the function
    /// gives it for an enrolled host and `None` for any other (refused as
    /// [`DecodeError::UnknownHost`]). What the controller reads watchdog streams with.
    PerHost(KeyLookup),
}

impl std::fmt::Debug for FrameKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameKeys::One(_) => f.write_str("FrameKeys::One(<redacted>)"),
            FrameKeys::PerHost(_) => f.write_str("FrameKeys::PerHost"),
        }
    }
}

impl From<Key> for FrameKeys {
    fn from(key: Key) -> Self {
        FrameKeys::One(key)
    }
}

/// Just the host id of an envelope, read to pick the key before the MAC is checked.
#[derive(Deserialize)]
struct HostOfEnvelope<'a> {
    #[serde(borrow)]
    host_id: std::borrow::Cow<'a, str>,
}

/// Authenticates and parses one complete frame (`frame` is exactly one frame), with the
/// key the envelope's host has.
fn parse_frame_keyed(frame: &[u8], keys: &FrameKeys) -> Result<Envelope, DecodeError> {
    let per_host = match keys {
        FrameKeys::One(key) => return parse_frame(frame, key),
        FrameKeys::PerHost(f) => f,
    };
    let body = frame
        .get(FRAME_HEADER_LEN..frame.len().saturating_sub(MAC_LEN))
        .ok_or(DecodeError::Truncated {
            need: FRAME_HEADER_LEN + MAC_LEN,
            have: frame.len(),
        })?;
    let host: HostOfEnvelope<'_> =
        serde_json::from_slice(body).map_err(|e| DecodeError::BadPayload(e.to_string()))?;
    let key = per_host(&host.host_id).ok_or(DecodeError::UnknownHost)?;
    parse_frame(frame, &key)
}

/// Authenticates and parses one complete frame (`frame` is exactly one frame).
fn parse_frame(frame: &[u8], key: &Key) -> Result<Envelope, DecodeError> {
    let mac_at = frame.len().saturating_sub(MAC_LEN);
    let (signed, tag) = frame
        .split_at_checked(mac_at)
        .ok_or(DecodeError::Truncated {
            need: MAC_LEN,
            have: frame.len(),
        })?;
    if !key.verify_frame(signed, tag) {
        return Err(DecodeError::BadMac);
    }
    let body = signed
        .get(FRAME_HEADER_LEN..)
        .ok_or(DecodeError::Truncated {
            need: FRAME_HEADER_LEN,
            have: signed.len(),
        })?;
    let envelope: Envelope =
        serde_json::from_slice(body).map_err(|e| DecodeError::BadPayload(e.to_string()))?;
    check_envelope(&envelope).map_err(|_| DecodeError::Malformed("invalid id in envelope"))?;
    if let Message::Event(Event { id: 0, .. }) = envelope.message {
        return Err(DecodeError::Malformed("event id 0"));
    }
    Ok(envelope)
}

/// Decodes the first frame in `bytes`, returning it and the number of bytes it
/// took. An incomplete frame is [`DecodeError::Truncated`]; use [`FrameDecoder`] on
/// a stream.
pub fn decode_frame(bytes: &[u8], key: &Key) -> Result<(Envelope, usize), DecodeError> {
    let len = frame_len(bytes)?.ok_or(DecodeError::Truncated {
        need: FRAME_HEADER_LEN,
        have: bytes.len(),
    })?;
    let frame = bytes.get(..len).ok_or(DecodeError::Truncated {
        need: len,
        have: bytes.len(),
    })?;
    Ok((parse_frame(frame, key)?, len))
}

/// The frame layout as tokio-util's length-delimited codec reads it (feature `codec`):
/// the 4-byte body length at offset 8 of the 12-byte header, the 32-byte MAC after the
/// body; each item is one whole frame, header and MAC included, for
/// [`decode_frame_keyed`]. A length above [`MAX_FRAME_BODY_LEN`] fails the stream from
/// the header alone (`InvalidData`), before anything is buffered for the body.
#[cfg(feature = "codec")]
pub fn frame_codec() -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_offset(FRAME_HEADER_LEN - 4)
        .length_field_length(4)
        // With nothing skipped the codec hands over `length + adjustment` bytes from the
        // frame's first byte: the header before the body and the MAC after it.
        .length_adjustment((FRAME_HEADER_LEN + MAC_LEN) as isize)
        .num_skip(0)
        .max_frame_length(MAX_FRAME_BODY_LEN)
        .big_endian()
        .new_codec()
}

/// Decodes exactly one whole frame (as a length-delimited codec hands it over) with
/// `keys`, refusing one meant for the other `direction`.
pub fn decode_frame_keyed(
    frame: &[u8],
    keys: &FrameKeys,
    direction: Direction,
) -> Result<Envelope, DecodeError> {
    let len = frame_len(frame)?.ok_or(DecodeError::Truncated {
        need: FRAME_HEADER_LEN,
        have: frame.len(),
    })?;
    if len != frame.len() {
        return Err(DecodeError::Malformed(
            "frame length disagrees with its header",
        ));
    }
    let envelope = parse_frame_keyed(frame, keys)?;
    if envelope.message.direction() != direction {
        return Err(DecodeError::Malformed("frame sent in the wrong direction"));
    }
    Ok(envelope)
}

/// Splits a byte stream into authenticated envelopes, whatever the transport: push
/// the bytes as they arrive, then pop frames until it returns `Ok(None)`.
///
/// It only accepts frames meant to travel in `direction`, so a frame reflected back
/// at its sender is refused. The first error is sticky (see the module docs): close
/// the connection.
#[derive(Debug)]
pub struct FrameDecoder {
    keys: FrameKeys,
    direction: Direction,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed; compacted lazily so popping is cheap.
    start: usize,
    failed: Option<DecodeError>,
}

impl FrameDecoder {
    /// A decoder for frames travelling in `direction`, signed with `keys` (one key, or
    /// [`FrameKeys::PerHost`]).
    pub fn new(keys: impl Into<FrameKeys>, direction: Direction) -> Self {
        FrameDecoder {
            keys: keys.into(),
            direction,
            buf: Vec::new(),
            start: 0,
            failed: None,
        }
    }

    /// Appends bytes read from the transport. Ignored once the decoder has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error
    /// that ended this stream.
    pub fn next_frame(&mut self) -> Result<Option<Envelope>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.try_next() {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Envelope>, DecodeError> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let Some(len) = frame_len(pending)? else {
            return Ok(None);
        };
        let Some(frame) = pending.get(..len) else {
            return Ok(None);
        };
        let envelope = parse_frame_keyed(frame, &self.keys)?;
        if envelope.message.direction() != self.direction {
            return Err(DecodeError::Malformed("frame sent in the wrong direction"));
        }
        self.start += len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(envelope))
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }

    /// The error that ended this stream, if any.
    pub fn error(&self) -> Option<&DecodeError> {
        self.failed.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new(b"an example cluster key, 32 bytes").unwrap()
    }

    /// Builds a correctly signed frame around any body, as a peer with another
    /// schema would.
    fn signed_frame(body: &str) -> Vec<u8> {
        let mut out = Vec::new();
        wire::put_preamble(&mut out, KIND_FRAME);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body.as_bytes());
        wire::append_frame_mac(&mut out, &key());
        out
    }

    const BOOT: &str = "01010101-0101-0101-0101-010101010101";

    #[test]
    fn an_event_kind_from_a_newer_watchdog_decodes_as_unknown_so_it_can_be_acked() {
        let body = format!(
            r#"{{"cluster_id":"c","host_id":"h","boot_id":"{BOOT}","incarnation":1,
               "message":{{"type":"event","id":9,"unix_ns":1,"mono_ns":2,
                           "payload":{{"kind":"vm_migrated","to":"x"}}}}}}"#
        );
        let (env, _) = decode_frame(&signed_frame(&body), &key()).unwrap();
        let Message::Event(event) = env.message else {
            panic!("not an event: {env:?}")
        };
        assert_eq!(event.id, 9);
        assert_eq!(event.payload, EventPayload::Unknown);
    }

    #[test]
    fn fields_added_by_a_newer_peer_are_ignored() {
        let body = format!(
            r#"{{"cluster_id":"c","host_id":"h","boot_id":"{BOOT}","incarnation":1,
               "zone":"az1","message":{{"type":"hello","last_event_id":3,"extra":true}}}}"#
        );
        let (env, _) = decode_frame(&signed_frame(&body), &key()).unwrap();
        assert_eq!(
            env.message,
            Message::Hello {
                last_event_id: 3,
                nonce: 0
            }
        );
    }

    #[test]
    fn an_event_with_id_zero_is_refused_because_zero_means_none() {
        let body = format!(
            r#"{{"cluster_id":"c","host_id":"h","boot_id":"{BOOT}","incarnation":1,
               "message":{{"type":"event","id":0,"unix_ns":1,"mono_ns":2,
                           "payload":{{"kind":"qemu_started","vm_uuid":null,"vm_name":null,"pid":1}}}}}}"#
        );
        assert_eq!(
            decode_frame(&signed_frame(&body), &key()).unwrap_err(),
            DecodeError::Malformed("event id 0")
        );
    }

    #[test]
    fn an_authentic_frame_whose_body_is_not_an_envelope_is_a_bad_payload() {
        for body in ["", "{}", "null", "[1,2]", r#"{"cluster_id":"c"}"#, "\u{0}"] {
            let err = decode_frame(&signed_frame(body), &key()).unwrap_err();
            assert!(
                matches!(err, DecodeError::BadPayload(_)),
                "{body:?}: {err:?}"
            );
        }
    }

    #[test]
    fn an_envelope_with_a_control_character_in_its_host_id_is_refused_on_decode() {
        let body = format!(
            r#"{{"cluster_id":"c","host_id":"h\u001b[31m","boot_id":"{BOOT}","incarnation":1,
               "message":{{"type":"hello","last_event_id":3}}}}"#
        );
        assert!(matches!(
            decode_frame(&signed_frame(&body), &key()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_query_domain_travels_as_its_op_and_the_uuid() {
        let body = format!(
            r#"{{"cluster_id":"c","host_id":"h","boot_id":"{BOOT}","incarnation":1,
               "message":{{"type":"command","controller_id":"ctl","command_id":5,
                           "command":{{"op":"query_domain","vm_uuid":"u-1"}}}}}}"#
        );
        let (env, _) = decode_frame(&signed_frame(&body), &key()).unwrap();
        assert_eq!(
            env.message,
            Message::Command {
                controller_id: "ctl".into(),
                command_id: 5,
                command: HostCommand::QueryDomain {
                    vm_uuid: "u-1".into()
                },
            }
        );
    }

    #[test]
    fn a_query_answer_reads_as_runs_does_not_run_or_could_not_tell() {
        for (runs, why) in [(true, ""), (true, "paused (starting up)"), (false, "")] {
            let detail = query_domain_detail(runs, why);
            assert_eq!(query_domain_answer(true, &detail), Some(runs), "{detail}");
        }
        assert_eq!(
            query_domain_detail(false, "not defined here"),
            "not running: not defined here"
        );
        assert_eq!(
            query_domain_answer(true, "not running: shut off (crashed)"),
            Some(false)
        );
        // The watchdog could not tell; an older one does not know the command.
        assert_eq!(query_domain_answer(false, "running"), None);
        assert_eq!(
            query_domain_answer(false, "a command this watchdog does not know"),
            None
        );
        // Anything else is not read as either answer.
        for detail in ["", "runningx", "started u-1", "not runnings", "Running"] {
            assert_eq!(query_domain_answer(true, detail), None, "{detail:?}");
        }
    }
}
