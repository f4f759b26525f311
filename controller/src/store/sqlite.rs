//! [`SqliteStore`]: the default [`Store`], one embedded SQLite file.
//!
//! # Durability
//!
//! The point of the store is that an intent is on disk before its action runs (DESIGN
//! rule 3), so the file is opened with:
//!
//! * `journal_mode=WAL`: a write is one append to the log, readers never block it;
//! * `synchronous=FULL`: every commit is fsynced before the method returns. With
//!   `NORMAL`, WAL commits may be lost on power failure; a lost intent whose action has
//!   already run is exactly the double action the store exists to prevent, and a lost
//!   event that was already acknowledged to the watchdog is never resent. The cost is
//!   one fsync per write, and the controller writes only on decisions (intents,
//!   timeline lines) and watchdog events, never per heartbeat;
//! * `locking_mode=EXCLUSIVE`: the controller holds the file for as long as it runs, so
//!   a second controller pointed at the same file is refused
//!   ([`StoreError::Locked`]) instead of acting beside the first;
//! * `foreign_keys=ON`.
//!
//! Every method is one transaction (autocommit, or an explicit one when it writes two
//! tables).
//!
//! # Integrity
//!
//! `open` runs `PRAGMA integrity_check` under the exclusive lock, before any migration,
//! and refuses a damaged file ([`StoreError::Damaged`], naming it): a controller that
//! resumed from a damaged intent log could miss an intent (and act twice) or trip over
//! a broken page in the middle of an incident. `integrity_check` rather than the
//! cheaper `quick_check` because only it verifies that every index matches its table,
//! and the unique index on `intents.key` is what refuses an intent recorded twice. It
//! reads the whole file once per start: 90 ms for 100,000 intents (a 35 MB file in the
//! page cache), twice `quick_check`'s 40 ms; reading the file from disk costs more
//! than either (measured in `docs/controller.md`, "Store").
//!
//! # Schema
//!
//! Versioned with `PRAGMA user_version`; [`MIGRATIONS`] is the list of steps, the
//! version is the number applied. A file with a newer version is refused
//! ([`StoreError::NewerSchema`]). Values are stored as JSON (the engine types derive
//! `serde`), next to plain columns for the keys, ids and times that are looked up or
//! useful to an operator with the `sqlite3` shell.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Store, StoreError, StoreResult};
use crate::engine::{Completion, IncidentId, IntentEntry, IntentKey, IntentRecord, TimelineEntry};

/// The schema migrations, in order; `PRAGMA user_version` is how many were applied.
/// Never edit a released step: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: intents, timelines, watchdog event streams, meta.
    "
    CREATE TABLE intents (
        seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- recording order
        key             TEXT    NOT NULL UNIQUE,            -- idempotency key
        incident        INTEGER,                            -- engine IncidentId, if any
        recorded_at_ms  INTEGER NOT NULL,                   -- engine clock
        record_json     TEXT    NOT NULL,                   -- IntentRecord
        done_at_ms      INTEGER,                            -- engine clock; NULL while open
        completion_json TEXT,                               -- Completion; NULL while open
        CHECK ((done_at_ms IS NULL) = (completion_json IS NULL))
    );
    CREATE INDEX intents_by_incident ON intents (incident);
    CREATE INDEX intents_open ON intents (seq) WHERE completion_json IS NULL;

    CREATE TABLE timeline (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        incident   INTEGER NOT NULL,
        at_ms      INTEGER NOT NULL,                        -- engine clock
        subject    TEXT    NOT NULL,                        -- `host:cmp-07`, `vm:…`
        entry_json TEXT    NOT NULL                         -- TimelineEntry
    );
    CREATE INDEX timeline_by_incident ON timeline (incident, seq);

    CREATE TABLE event_streams (
        host       TEXT    PRIMARY KEY,
        high_water INTEGER NOT NULL CHECK (high_water >= 0)
    ) WITHOUT ROWID;

    CREATE TABLE events (
        host             TEXT    NOT NULL REFERENCES event_streams (host),
        event_id         INTEGER NOT NULL,
        received_unix_ms INTEGER NOT NULL,
        payload_json     TEXT    NOT NULL,
        PRIMARY KEY (host, event_id)
    ) WITHOUT ROWID;
    CREATE INDEX events_by_received ON events (received_unix_ms);

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    ",
];

/// The schema version this build writes (the number of migration steps it knows).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long `open` waits for a lock held by another process before giving up.
const LOCK_WAIT: Duration = Duration::from_millis(500);

/// The SQLite [`Store`]. See the module docs for the durability settings and schema.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the store file at `path`, checks its integrity and
    /// brings its schema up to date. The parent directory must exist. Fails if the file
    /// is not a SQLite database, is held by another controller, is damaged, or has a
    /// newer schema; the error names the path.
    pub fn open(path: impl AsRef<Path>) -> StoreResult<Self> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open(&path).map_err(|e| open_error(&path, e))?;
        Self::prepare(conn, path)
    }

    /// A store in memory (tests): the same schema and code, nothing on disk.
    pub fn open_in_memory() -> StoreResult<Self> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|e| open_error(&path, e))?;
        Self::prepare(conn, path)
    }

    /// The file it was opened from (`:memory:` for an in-memory store).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version in the file (after `open`: [`SCHEMA_VERSION`]).
    pub fn schema_version(&self) -> StoreResult<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn prepare(mut conn: Connection, path: PathBuf) -> StoreResult<Self> {
        let err = |e| open_error(&path, e);
        conn.busy_timeout(LOCK_WAIT).map_err(err)?;
        // Before the first access, so that WAL runs without shared memory and the lock
        // taken by the first write is held until the connection closes.
        conn.pragma_update_and_check(None, "locking_mode", "EXCLUSIVE", |r| r.get::<_, String>(0))
            .map_err(err)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(err)?;

        // One write transaction, always: it checks the version, applies what is
        // missing, and takes the exclusive lock even when nothing is to be done.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(err)?;
        let found: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        check_integrity(&tx, &path)?;
        for (i, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
            tx.execute_batch(step).map_err(err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(SqliteStore { conn, path })
    }
}

/// How many of the integrity check's findings go into the error (it reports up to 100;
/// the first few say what is wrong, the rest are mostly pages left unreachable).
const PROBLEMS_SHOWN: usize = 3;

/// Runs `PRAGMA integrity_check` (see the module docs for why not `quick_check`): `ok`,
/// or [`StoreError::Damaged`] with its first findings.
fn check_integrity(conn: &Connection, path: &Path) -> StoreResult<()> {
    let mut stmt = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|e| open_error(path, e))?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| open_error(path, e))?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    // A row may hold several findings, one a line, under a `*** in database ***` head.
    let found: Vec<&str> = rows
        .iter()
        .flat_map(|r| r.lines())
        .filter(|l| !l.starts_with("***"))
        .collect();
    let mut problems = found[..found.len().min(PROBLEMS_SHOWN)].join("; ");
    if found.len() > PROBLEMS_SHOWN {
        problems.push_str(&format!(" and {} more", found.len() - PROBLEMS_SHOWN));
    }
    Err(StoreError::Damaged {
        path: path.to_path_buf(),
        problems,
    })
}

fn open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy) => StoreError::Locked { path },
        // A page too broken to read while opening: the same refusal as a failed check.
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Damaged {
            path,
            problems: e.to_string(),
        },
        _ => StoreError::Open { path, source: e },
    }
}

fn to_json<T: Serialize>(what: &'static str, v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|source| StoreError::Json {
        op: "encode",
        what,
        source,
    })
}

fn from_json<T: DeserializeOwned>(what: &'static str, s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|source| StoreError::Json {
        op: "decode",
        what,
        source,
    })
}

/// SQLite integers are signed 64-bit.
fn int(what: &'static str, value: u64) -> StoreResult<i64> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

fn uint(what: &'static str, value: i64) -> StoreResult<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what} {value}")))
}

impl Store for SqliteStore {
    fn record_intent(&mut self, record: &IntentRecord) -> StoreResult<bool> {
        let json = to_json("intent record", record)?;
        let incident = match record.intent.incident() {
            Some(i) => Some(int("incident id", i.0)?),
            None => None,
        };
        let n = self.conn.execute(
            "INSERT INTO intents (key, incident, recorded_at_ms, record_json)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key) DO NOTHING",
            params![
                record.key.as_str(),
                incident,
                int("timestamp", record.at.as_millis())?,
                json
            ],
        )?;
        Ok(n == 1)
    }

    fn complete_intent(&mut self, key: &IntentKey, completion: &Completion) -> StoreResult<()> {
        let json = to_json("intent completion", completion)?;
        self.conn.execute(
            "UPDATE intents SET done_at_ms = ?2, completion_json = ?3
             WHERE key = ?1 AND completion_json IS NULL",
            params![
                key.as_str(),
                int("timestamp", completion.at.as_millis())?,
                json
            ],
        )?;
        Ok(())
    }

    fn intents(&self) -> StoreResult<Vec<IntentEntry>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, record_json, completion_json FROM intents ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (key, record, done) = row?;
            let record: IntentRecord = from_json("intent record", &record)?;
            if record.key.as_str() != key {
                return Err(StoreError::Corrupt(format!(
                    "intent row {key} holds the record of {}",
                    record.key
                )));
            }
            let done = match done {
                Some(c) => Some(from_json::<Completion>("intent completion", &c)?),
                None => None,
            };
            out.push(IntentEntry { record, done });
        }
        Ok(out)
    }

    fn append_timeline(&mut self, incident: IncidentId, entry: &TimelineEntry) -> StoreResult<()> {
        let json = to_json("timeline entry", entry)?;
        self.conn.execute(
            "INSERT INTO timeline (incident, at_ms, subject, entry_json) VALUES (?1, ?2, ?3, ?4)",
            params![
                int("incident id", incident.0)?,
                int("timestamp", entry.at.as_millis())?,
                entry.subject.to_string(),
                json
            ],
        )?;
        Ok(())
    }

    fn timeline(&self, incident: IncidentId) -> StoreResult<Vec<TimelineEntry>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT entry_json FROM timeline WHERE incident = ?1 ORDER BY seq")?;
        let rows = stmt.query_map([int("incident id", incident.0)?], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(from_json("timeline entry", &row?)?);
        }
        Ok(out)
    }

    fn incidents_with_timelines(&self) -> StoreResult<Vec<(IncidentId, Vec<TimelineEntry>)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT incident, entry_json FROM timeline ORDER BY incident, seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out: Vec<(IncidentId, Vec<TimelineEntry>)> = Vec::new();
        for row in rows {
            let (id, json) = row?;
            let id = IncidentId(uint("incident id", id)?);
            let entry = from_json("timeline entry", &json)?;
            match out.last_mut() {
                Some((last, entries)) if *last == id => entries.push(entry),
                _ => out.push((id, vec![entry])),
            }
        }
        Ok(out)
    }

    fn record_event(
        &mut self,
        host: &str,
        event_id: u64,
        received_unix_ms: u64,
        payload_json: &str,
    ) -> StoreResult<bool> {
        let id = int("event id", event_id)?;
        let received = int("receive time", received_unix_ms)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mark: Option<i64> = tx
            .query_row(
                "SELECT high_water FROM event_streams WHERE host = ?1",
                [host],
                |r| r.get(0),
            )
            .optional()?;
        if id <= mark.unwrap_or(0) {
            return Ok(false); // the transaction rolls back on drop: nothing written
        }
        tx.execute(
            "INSERT INTO event_streams (host, high_water) VALUES (?1, ?2)
             ON CONFLICT (host) DO UPDATE SET high_water = excluded.high_water",
            params![host, id],
        )?;
        tx.execute(
            "INSERT INTO events (host, event_id, received_unix_ms, payload_json)
             VALUES (?1, ?2, ?3, ?4)",
            params![host, id, received, payload_json],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn event_high_water(&self, host: &str) -> StoreResult<u64> {
        let mark: Option<i64> = self
            .conn
            .query_row(
                "SELECT high_water FROM event_streams WHERE host = ?1",
                [host],
                |r| r.get(0),
            )
            .optional()?;
        uint("event high-water mark", mark.unwrap_or(0))
    }

    fn event_high_waters(&self) -> StoreResult<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT host, high_water FROM event_streams ORDER BY host")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (host, mark) = row?;
            out.push((host, uint("event high-water mark", mark)?));
        }
        Ok(out)
    }

    fn events_of_kind(&self, kind: &str) -> StoreResult<Vec<(String, String)>> {
        let mut stmt = self.conn.prepare(
            "SELECT host, payload_json FROM events
             WHERE json_extract(payload_json, '$.kind') = ?1
             ORDER BY received_unix_ms, host, event_id",
        )?;
        let rows = stmt.query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn prune_events(&mut self, before_unix_ms: u64) -> StoreResult<u64> {
        // Saturate: "everything" is a fine reading of a far-future cut-off.
        let before = i64::try_from(before_unix_ms).unwrap_or(i64::MAX);
        let n = self
            .conn
            .execute("DELETE FROM events WHERE received_unix_ms < ?1", [before])?;
        Ok(n as u64)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> StoreResult<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn flush(&mut self) -> StoreResult<()> {
        // In memory there is no log to fold in; the pragma answers with a row either way.
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_bring_a_new_file_to_the_current_version() {
        let s = SqliteStore::open_in_memory().unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        const { assert!(SCHEMA_VERSION >= 1) };
    }

    #[test]
    fn a_file_store_runs_in_wal_mode_with_full_sync_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("defib.db")).unwrap();
        let text = |p: &str| -> String {
            s.conn
                .pragma_query_value(None, p, |r| r.get::<_, String>(0))
                .unwrap()
        };
        let num = |p: &str| -> i64 { s.conn.pragma_query_value(None, p, |r| r.get(0)).unwrap() };
        assert_eq!(text("journal_mode"), "wal");
        assert_eq!(text("locking_mode"), "exclusive");
        assert_eq!(num("synchronous"), 2, "FULL");
        assert_eq!(num("foreign_keys"), 1);
    }

    #[test]
    fn an_event_id_beyond_sqlite_integers_is_refused_not_wrapped() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let e = s.record_event("h", u64::MAX, 0, "{}").unwrap_err();
        assert!(matches!(e, StoreError::OutOfRange { .. }), "{e}");
        assert_eq!(s.event_high_water("h").unwrap(), 0);
    }
}
