//! Intake: what the controller takes in from the watchdogs, and the messages it hands
//! the engine task ([`Intake`]). Everything is authenticated and replay-checked by the
//! protocol crate; refusals are counted by reason and dropped, never crash the daemon.
//!
//! - [`heartbeats`]: judging heartbeat datagrams (one replay guard per host across every
//!   path), acking the accepted ones at the pace their hosts ask for and forwarding a
//!   throttled few to the engine; [`refusals`]: how often a heartbeat of another layout
//!   version is answered with a refusal and logged;
//! - [`socket`]: one OS thread per heartbeat socket taking datagrams in batches
//!   (`recvmmsg`), judging a whole batch under one lock and acking it with one
//!   `sendmmsg` (BENCHMARKS.md, heartbeat-intake, has its rate on one core);
//! - [`streams`]: the watchdogs' TCP event streams (events in, stored before they are
//!   acked; commands out, for the edges that send them).
pub mod heartbeats;
pub mod limiter;
pub mod refusals;
pub mod socket;
pub mod streams;

use std::net::SocketAddr;

use protocol::{BootId, Event, HostStatus};
use tokio::sync::oneshot;

pub use heartbeats::{Datagram, HeartbeatIntake, IntakeCounters, SourceRate};
pub use socket::{serve_heartbeats, spawn_heartbeat_thread, Backlog, SocketBacklog, BATCH};
pub use streams::{serve_events, StreamSettings};

/// A heartbeat the intake accepted, as the engine task needs it.
#[derive(Debug, Clone)]
pub struct HeartbeatSeen {
    pub host: String,
    pub path: u8,
    pub peer: SocketAddr,
    pub boot_id: BootId,
    pub incarnation: u64,
    pub sent_unix_ns: u64,
    pub status: HostStatus,
    /// When the datagram reached this host (the kernel's stamp where the socket gives
    /// one): the engine dates the heartbeat by it and measures its own lag from it.
    pub received: tokio::time::Instant,
}

/// What the intake hands the engine task.
#[derive(Debug)]
pub enum Intake {
    /// The heartbeats of one received batch that are due for the engine.
    Heartbeats(Vec<HeartbeatSeen>),
    /// A watchdog opened its stream: what is the highest event id stored for it? A
    /// controller that does not lead refuses (the stream closes and the watchdog tries
    /// its next controller address).
    Hello {
        host: String,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// An event to store (deduplicated) and feed to the engine; the reply says it is
    /// stored, after which it may be acked.
    Event {
        host: String,
        event: Box<Event>,
        reply: oneshot::Sender<Result<EventStored, String>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventStored {
    /// false: a duplicate, dropped.
    pub new: bool,
    /// Every event of the host up to this id is stored: the cumulative ack.
    pub high_water: u64,
}
