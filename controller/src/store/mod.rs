//! The durable store: intents (DESIGN rule 3), incident timelines, the watchdog event
//! streams' dedup marks and a few small settings.
//!
//! [`Store`] is the trait the runtime talks to; [`SqliteStore`] is the default (an
//! embedded SQLite file, path in the config), [`MemoryStore`] the in-process one for
//! tests and simulation. [`crate::ha::EtcdStore`], for several controllers with a leader
//! elected on etcd, implements the same trait: every method is one small, self-contained
//! write or read, so each maps onto one etcd transaction guarded by the leader's lease.
//!
//! # How the runtime uses it
//!
//! The engine task is the only writer. It carries the engine's actions out in order and
//! hands every store action to [`Store::apply_action`] first; **if that fails it stops
//! acting before anything after it**, so no action runs whose intent is not on disk.
//! A write that does not do what the engine asked is a failure too: an intent whose key
//! is already in the store ([`StoreError::IntentExists`]) means the store and the engine
//! disagree, and its action is refused, never carried out. (The engine's own
//! [`IntentLog`] is infallible; this trait is not, on purpose.) What the engine task
//! does then is in `runtime/engine_task.rs`. After a restart:
//!
//! ```text
//! let store = SqliteStore::open(&cfg.store.path)?;        // integrity-checked
//! let log = intent_log_snapshot(&store)?;                // intents + completions
//! let (engine, actions) = Engine::resume(cfg, &log, now); // re-hands open intents only
//! for (host, mark) in store.event_high_waters()? { dedup.restore(&host, mark) }
//! ```
//!
//! # Event dedup
//!
//! Watchdog event streams are delivered in order, at least once, with per-host ids that
//! start at 1 (see `protocol::EventDedup`). The store keeps a per-host high-water mark
//! next to the events: [`Store::record_event`] stores an event only if its id is above
//! the mark and moves the mark in the same transaction, so the mark survives a restart
//! and [`Store::prune_events`] can drop old payloads without forgetting the mark.

mod memory;
mod sqlite;

use std::path::PathBuf;

use crate::engine::{
    Action, Completion, IncidentId, IntentEntry, IntentKey, IntentLog, IntentRecord,
    MemoryIntentLog, TimelineEntry,
};

pub use memory::MemoryStore;
pub use sqlite::{SqliteStore, SCHEMA_VERSION};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file could not be opened or prepared.
    #[error("cannot open the store at {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// Another process (another controller?) holds the store file.
    #[error(
        "the store at {path} is locked by another process (is another defib-controller \
         running on the same file?)"
    )]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a newer controller; refusing to touch it.
    #[error(
        "the store at {path} has schema version {found}, but this defib-controller \
         understands up to version {supported}; refusing to open it (upgrade \
         defib-controller, or point it at another store)"
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A query failed on an open SQLite store.
    #[error("store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A value could not be encoded to, or decoded from, JSON.
    #[error("cannot {op} {what} as JSON: {source}")]
    Json {
        /// `encode` or `decode`.
        op: &'static str,
        /// What it was (`intent record`, `timeline entry`...).
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A number does not fit the store's signed 64-bit integers.
    #[error("{what} {value} is too large for the store (at most 2^63 - 1)")]
    OutOfRange {
        /// What it was.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// The file failed SQLite's integrity check at open: it is damaged.
    #[error(
        "the store at {path} is damaged (SQLite integrity check: {problems}); refusing to \
         open it (docs/operator-guide.md, \"A damaged store\", says what to do)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What the check found (its first lines, joined).
        problems: String,
    },
    /// The stored data contradicts itself.
    #[error("the store is inconsistent: {0}")]
    Corrupt(String),
    /// An intent's key is already in the store. The engine never issues a key twice, so
    /// the store and the engine disagree (another writer on the same store, a log
    /// replayed wrongly): the action is refused, not taken as recorded.
    #[error(
        "intent {key} is already in the store, but the engine has just issued it: the \
         store and the engine disagree (another controller on the same store?); its \
         action is refused"
    )]
    IntentExists {
        /// The key.
        key: IntentKey,
    },
    /// etcd did not answer, or answered with an error, on every member tried.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A write on etcd was refused or came too late because this controller does not
    /// (or no longer) lead: its action is not carried out.
    #[error("not the leader: {0}")]
    NotLeader(String),
}

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// The controller's durable state. Object-safe (`Box<dyn Store>`); one writer (the
/// engine task). Every method that returns `Ok` has made its write durable.
pub trait Store: Send {
    // ------------------------------------------------------------------ intents

    /// Writes an intent before its action runs. Returns `true` if it was recorded now,
    /// `false` if the key exists (then nothing changes, whatever the record says).
    fn record_intent(&mut self, record: &IntentRecord) -> StoreResult<bool>;

    /// Marks an intent done. An unknown or already-done key is a no-op (the first
    /// completion stays).
    fn complete_intent(&mut self, key: &IntentKey, completion: &Completion) -> StoreResult<()>;

    /// Every intent with its completion, in recording order.
    fn intents(&self) -> StoreResult<Vec<IntentEntry>>;

    // ---------------------------------------------------------------- timelines

    /// Appends one line to an incident's timeline.
    fn append_timeline(&mut self, incident: IncidentId, entry: &TimelineEntry) -> StoreResult<()>;

    /// An incident's timeline, in order (empty if unknown).
    fn timeline(&self, incident: IncidentId) -> StoreResult<Vec<TimelineEntry>>;

    /// Every incident that has a timeline, by id, each with its lines in order.
    fn incidents_with_timelines(&self) -> StoreResult<Vec<(IncidentId, Vec<TimelineEntry>)>>;

    // ------------------------------------------------------------ watchdog events

    /// Stores a watchdog event if it is new: its id is above the host's high-water
    /// mark. Returns `true` if stored (and the mark moved to `event_id`), `false` for a
    /// duplicate or older id (nothing stored).
    fn record_event(
        &mut self,
        host: &str,
        event_id: u64,
        received_unix_ms: u64,
        payload_json: &str,
    ) -> StoreResult<bool>;

    /// The highest event id stored for a host (0: none).
    fn event_high_water(&self, host: &str) -> StoreResult<u64>;

    /// Every host's high-water mark, by host name (to restore `protocol::EventDedup`).
    fn event_high_waters(&self) -> StoreResult<Vec<(String, u64)>>;

    /// Drops stored event payloads received before `before_unix_ms`; the high-water
    /// marks stay. Returns how many were dropped.
    fn prune_events(&mut self, before_unix_ms: u64) -> StoreResult<u64>;

    /// The stored events of one payload kind (e.g. `domain_definition`), oldest first,
    /// as (host, payload JSON).
    fn events_of_kind(&self, kind: &str) -> StoreResult<Vec<(String, String)>>;

    // --------------------------------------------------------------------- meta

    /// Sets a small named value (e.g. the controller incarnation).
    fn set_meta(&mut self, key: &str, value: &str) -> StoreResult<()>;

    /// A small named value, if set.
    fn get_meta(&self, key: &str) -> StoreResult<Option<String>>;

    // -------------------------------------------------------------------- misc

    /// Pushes anything buffered to stable storage (writes are already durable when
    /// their method returns; for SQLite this folds the write-ahead log into the main
    /// file). Call at shutdown.
    fn flush(&mut self) -> StoreResult<()>;

    /// Carries out the store-related engine actions ([`Action::PersistIntent`],
    /// [`Action::CompleteIntent`], [`Action::RecordTimeline`]); other actions are left
    /// alone. Returns whether `action` was a store action. The runtime calls this for
    /// every action in order and stops on an error, so that no action runs whose intent
    /// was not persisted. An intent whose key is already stored is an error
    /// ([`StoreError::IntentExists`]), not a success: the engine has just issued it, so
    /// whoever stored it first is not this engine.
    fn apply_action(&mut self, action: &Action) -> StoreResult<bool> {
        match action {
            Action::PersistIntent(record) => {
                if !self.record_intent(record)? {
                    return Err(StoreError::IntentExists {
                        key: record.key.clone(),
                    });
                }
                Ok(true)
            }
            Action::CompleteIntent { key, completion } => {
                self.complete_intent(key, completion)?;
                Ok(true)
            }
            Action::RecordTimeline { incident, entry } => {
                self.append_timeline(*incident, entry)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// The store's intents as an in-memory [`IntentLog`], to hand to
/// [`Engine::resume`](crate::engine::Engine::resume) after a restart.
pub fn intent_log_snapshot(store: &dyn Store) -> StoreResult<MemoryIntentLog> {
    let mut log = MemoryIntentLog::new();
    for entry in store.intents()? {
        let key = entry.record.key.clone();
        log.record(entry.record);
        if let Some(done) = entry.done {
            log.mark_done(&key, done);
        }
    }
    Ok(log)
}
