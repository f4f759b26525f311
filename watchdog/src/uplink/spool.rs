//! The on-disk event spool: every event the watchdog reports waits here, with its
//! per-host id, until the controller acknowledges it, so events survive a controller
//! outage and a watchdog restart (at-least-once delivery).
//!
//! Two files in the state directory:
//!
//! - [`SPOOL_FILE`] (`events.spool`): append-only records, one per event, in id order:
//!   `u32 body length (big-endian) | u32 FNV-1a checksum of the body | body`, where the
//!   body is the `protocol::Event` as JSON (the same object the stream frame carries,
//!   so a record is resent as it was first sent). A record cut short by a crash, or
//!   whose checksum fails, ends the log: it and everything after it are truncated away
//!   when the spool is opened.
//! - [`RELEASED_FILE`] (`events.released`): one decimal number, "every event with an
//!   id up to here is released": acknowledged by the controller, or dropped because the
//!   spool was full. Replaced atomically.
//!
//! The next event id is derived from both (`max(released, last id in the log) + 1`),
//! so it survives restarts without a file of its own; [`Spool::continue_above`] keeps it
//! so when the controller knows higher ids than the watchdog.
//!
//! Durability: every append is fsynced before [`Spool::append`] returns (events are
//! rare, a few a second at worst, so one fsync each is cheap), and the released mark is
//! written before the log is compacted, so a crash in between only leaves records
//! that are skipped as released on the next open.
//!
//! Bound: at most `max_events` unreleased events. When full, appending drops the
//! oldest one (its id is released and [`Spool::dropped`] counts it): the monitor is
//! never blocked. Nothing tells the controller about the gap in the ids; the drop is
//! logged and counted in the stream's status (`dropped`), and a VM whose exit was
//! dropped is caught as missing by the next libvirt listing.
//!
//! The unreleased events are also kept in memory (at most `max_events` of them), so
//! resending after a reconnect reads nothing back from disk.
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use protocol::{Event, EventPayload, MAX_FRAME_BODY_LEN};

use super::state::{sync_dir, write_atomically};

/// File name of the record log, under the state directory.
pub const SPOOL_FILE: &str = "events.spool";
/// File name of the released mark, under the state directory.
pub const RELEASED_FILE: &str = "events.released";

const RECORD_HEADER_LEN: usize = 8;
/// The highest event id the spool hands out or accepts. A released mark, a record or a
/// controller's word above it is corruption, not history: at a million events a second
/// it takes 290,000 years to get here, and the controller stores ids as SQLite's
/// signed 64-bit integers. Without the bound, such an id made the next id overflow.
pub const MAX_EVENT_ID: u64 = i64::MAX as u64;
/// Released records are compacted away once there are this many (or once nothing is
/// left unreleased): rewriting the log on every ack would cost more than it saves.
const COMPACT_MIN_RECORDS: usize = 1024;

/// The spool of one host's unacknowledged events. See the module docs.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    log: File,
    log_len: u64,
    records_in_log: usize,
    pending: VecDeque<Event>,
    released_up_to: u64,
    next_id: u64,
    max_events: usize,
    dropped: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering what an earlier run left:
    /// unreleased events come back in id order, a torn tail is truncated.
    pub fn open(dir: &Path, max_events: usize) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        let released_up_to = read_released(&dir.join(RELEASED_FILE))?;
        let log_path = dir.join(SPOOL_FILE);
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes)?;
        let (records, good_len) = parse_records(&bytes);
        if good_len < bytes.len() {
            tracing::warn!(
                path = %log_path.display(),
                kept_bytes = good_len,
                cut_bytes = bytes.len() - good_len,
                "event spool ends in a torn or corrupt record (a crash mid-write); truncating it"
            );
            log.set_len(good_len as u64)?;
            log.sync_all()?;
        }
        let last_id = records.last().map_or(0, |e| e.id);
        let records_in_log = records.len();
        let pending: VecDeque<Event> = records
            .into_iter()
            .filter(|e| e.id > released_up_to)
            .collect();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            log,
            log_len: good_len as u64,
            records_in_log,
            pending,
            released_up_to,
            next_id: released_up_to.max(last_id) + 1,
            max_events: max_events.max(1),
            dropped: 0,
        };
        // The bound may have been lowered since the last run.
        while spool.pending.len() > spool.max_events {
            spool.drop_oldest()?;
        }
        spool.maybe_compact()?;
        Ok(spool)
    }

    /// Gives the event the next id, stores it durably and returns the id. When the
    /// spool is full the oldest unreleased event is dropped first.
    ///
    /// On an I/O error the event still waits in memory (it is sent if the controller is
    /// reachable before the watchdog stops) but would not survive a restart; the log
    /// is cut back to its last whole record so later appends stay readable.
    pub fn append(&mut self, unix_ns: u64, mono_ns: u64, payload: EventPayload) -> io::Result<u64> {
        if self.pending.len() >= self.max_events {
            // The new event matters more than persisting the drop; a mark that could
            // not be written only means the dropped event may be resent after a restart.
            if let Err(e) = self.drop_oldest() {
                tracing::error!(error = %e, "cannot record a dropped event in the spool");
            }
        }
        let event = Event {
            id: self.next_id,
            unix_ns,
            mono_ns,
            payload,
        };
        self.next_id += 1;
        let record = encode_record(&event);
        self.pending.push_back(event);
        let written = self
            .log
            .write_all(&record)
            .and_then(|()| self.log.sync_data());
        match written {
            Ok(()) => {
                self.log_len += record.len() as u64;
                self.records_in_log += 1;
                Ok(self.next_id - 1)
            }
            Err(e) => {
                let _ = self.log.set_len(self.log_len);
                Err(e)
            }
        }
    }

    /// Releases every event with an id up to `id`: the controller acknowledged them
    /// (a cumulative `EventAck`, or the `highest_event_id` of its `Welcome`).
    pub fn release_up_to(&mut self, id: u64) -> io::Result<()> {
        check_id(id)?;
        if id <= self.released_up_to {
            return Ok(());
        }
        self.set_released(id)?;
        while self.pending.front().is_some_and(|e| e.id <= id) {
            self.pending.pop_front();
        }
        // An ack beyond the ids handed out (a controller that knows more than we do)
        // must not let an id be reused.
        self.next_id = self.next_id.max(id + 1);
        self.maybe_compact()
    }

    /// The controller holds events up to `highest` for this host. If that is beyond
    /// the ids this spool handed out, the watchdog lost its state (a wiped state
    /// directory): numbering continues above `highest`, and the events waiting here are
    /// renumbered above it too, or the controller would drop them as duplicates.
    pub fn continue_above(&mut self, highest: u64) -> io::Result<()> {
        // Renumbering stays below the bound too: the waiting events need room above.
        check_id(highest.saturating_add(self.pending.len() as u64))?;
        if highest < self.next_id {
            return Ok(());
        }
        tracing::warn!(
            controller_highest = highest,
            own_last = self.last_assigned_id(),
            "the controller holds higher event ids than this watchdog (lost state?); continuing above them"
        );
        let mut id = highest;
        for event in self.pending.iter_mut() {
            id += 1;
            event.id = id;
        }
        self.next_id = id + 1;
        // Log first, mark second: a crash in between leaves renumbered records above an
        // old mark, which reopens correctly.
        self.rewrite_log()?;
        self.set_released(highest)
    }

    /// The oldest unreleased event with an id above `id`: the next one to send on a
    /// connection that has sent everything up to `id`.
    pub fn first_after(&self, id: u64) -> Option<&Event> {
        let at = self.pending.partition_point(|e| e.id <= id);
        self.pending.get(at)
    }

    /// The unreleased events, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &Event> {
        self.pending.iter()
    }

    /// How many events wait for an ack.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Nothing waits for an ack.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The highest id handed out so far (0: none); what `Hello` reports.
    pub fn last_assigned_id(&self) -> u64 {
        self.next_id - 1
    }

    /// Every event with an id up to this one is acknowledged or dropped.
    pub fn released_up_to(&self) -> u64 {
        self.released_up_to
    }

    /// Events dropped unsent because the spool was full, since it was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn drop_oldest(&mut self) -> io::Result<()> {
        if let Some(oldest) = self.pending.pop_front() {
            self.dropped += 1;
            if self.dropped == 1 || self.dropped.is_multiple_of(1000) {
                tracing::warn!(
                    event_id = oldest.id,
                    dropped_total = self.dropped,
                    max_events = self.max_events,
                    "event spool full: dropped the oldest unacknowledged event"
                );
            }
            self.set_released(oldest.id)?;
            self.maybe_compact()?;
        }
        Ok(())
    }

    fn set_released(&mut self, id: u64) -> io::Result<()> {
        write_atomically(&self.dir.join(RELEASED_FILE), format!("{id}\n").as_bytes())?;
        self.released_up_to = id;
        Ok(())
    }

    fn maybe_compact(&mut self) -> io::Result<()> {
        let released_records = self.records_in_log - self.pending.len();
        let worth_it = released_records >= COMPACT_MIN_RECORDS.max(self.pending.len());
        if released_records > 0 && (self.pending.is_empty() || worth_it) {
            self.rewrite_log()?;
        }
        Ok(())
    }

    /// Replaces the log with just the unreleased events (temp file, fsync, rename,
    /// directory fsync), then appends go to the new file.
    fn rewrite_log(&mut self) -> io::Result<()> {
        let path = self.dir.join(SPOOL_FILE);
        let tmp = self.dir.join(format!("{SPOOL_FILE}.tmp"));
        let mut len = 0u64;
        {
            let mut file = File::create(&tmp)?;
            let mut buf = Vec::new();
            for event in &self.pending {
                buf.extend_from_slice(&encode_record(event));
            }
            file.write_all(&buf)?;
            file.sync_all()?;
            len += buf.len() as u64;
        }
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        self.log = OpenOptions::new().append(true).open(&path)?;
        self.log_len = len;
        self.records_in_log = self.pending.len();
        Ok(())
    }
}

/// A controller's id beyond [`MAX_EVENT_ID`] is refused: counting on above it would
/// overflow, and the controller cannot have stored it.
fn check_id(id: u64) -> io::Result<()> {
    if id > MAX_EVENT_ID {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("event id {id} is above the highest possible, {MAX_EVENT_ID}"),
        ));
    }
    Ok(())
}

fn read_released(path: &Path) -> io::Result<u64> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text
            .trim()
            .parse()
            .ok()
            .filter(|&id| id <= MAX_EVENT_ID)
            .unwrap_or_else(|| {
                // Resending acknowledged events is harmless (the controller dedups them).
                tracing::warn!(
                    path = %path.display(),
                    "released mark is garbled; resending the whole spool"
                );
                0
            })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// One event as a spool record (header and JSON body), exactly as [`Spool::append`]
/// writes it. Public for the fuzz targets and their seed corpus (fuzz/).
pub fn encode_record(event: &Event) -> Vec<u8> {
    // Serializing a struct of strings and integers into a Vec cannot fail.
    seal_record(&serde_json::to_vec(event).unwrap_or_default())
}

/// A record of any body: the header (length, checksum) in front of it. Public so the
/// fuzz targets can hand the decoder bodies that pass the checksum.
pub fn seal_record(body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(RECORD_HEADER_LEN + body.len());
    record.extend_from_slice(&(body.len() as u32).to_be_bytes());
    record.extend_from_slice(&fnv1a32(body).to_be_bytes());
    record.extend_from_slice(body);
    record
}

/// The whole records at the start of `bytes`, in order, and how many bytes they take.
/// Stops at the first record that is short, fails its checksum, is not an event, has
/// an id of 0 or above [`MAX_EVENT_ID`], or does not have a higher id than the one
/// before. This is what [`Spool::open`] reads a
/// log with; public for the fuzz targets (fuzz/).
pub fn parse_records(bytes: &[u8]) -> (Vec<Event>, usize) {
    let mut events: Vec<Event> = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + RECORD_HEADER_LEN) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let sum = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME_BODY_LEN {
            break;
        }
        let body_at = at + RECORD_HEADER_LEN;
        let Some(body) = bytes.get(body_at..body_at + len) else {
            break;
        };
        if fnv1a32(body) != sum {
            break;
        }
        let Ok(event) = serde_json::from_slice::<Event>(body) else {
            break;
        };
        if event.id == 0
            || event.id > MAX_EVENT_ID
            || events.last().is_some_and(|last| event.id <= last.id)
        {
            break;
        }
        events.push(event);
        at = body_at + len;
    }
    (events, at)
}

/// FNV-1a, 32 bits: enough to tell a torn or zero-filled record from a whole one
/// (this guards against crashes, not attackers: the stream frames carry the HMAC).
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(pid: u32) -> EventPayload {
        EventPayload::QemuStarted {
            vm_uuid: None,
            vm_name: None,
            pid,
        }
    }

    fn ids(spool: &Spool) -> Vec<u64> {
        spool.pending().map(|e| e.id).collect()
    }

    #[test]
    fn appended_events_get_increasing_ids_from_one_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(spool.last_assigned_id(), 0);
        for pid in 1..=3 {
            spool.append(100, 200, started(pid)).unwrap();
        }
        assert_eq!(ids(&spool), [1, 2, 3]);
        drop(spool);
        let spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(ids(&spool), [1, 2, 3]);
        assert_eq!(spool.pending().nth(1).unwrap().payload, started(2));
        assert_eq!(spool.last_assigned_id(), 3);
    }

    #[test]
    fn released_events_are_gone_after_a_reopen_and_ids_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        for pid in 1..=3 {
            spool.append(0, 0, started(pid)).unwrap();
        }
        spool.release_up_to(2).unwrap();
        assert_eq!(ids(&spool), [3]);
        spool.release_up_to(3).unwrap();
        assert!(spool.is_empty());
        // Everything released: the log was compacted to nothing.
        assert_eq!(fs::metadata(dir.path().join(SPOOL_FILE)).unwrap().len(), 0);
        drop(spool);
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.append(0, 0, started(4)).unwrap(), 4);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_event_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 3).unwrap();
        for pid in 1..=5 {
            spool.append(0, 0, started(pid)).unwrap();
        }
        assert_eq!(ids(&spool), [3, 4, 5]);
        assert_eq!(spool.dropped(), 2);
        assert_eq!(spool.released_up_to(), 2);
        drop(spool);
        let mut spool = Spool::open(dir.path(), 3).unwrap();
        assert_eq!(ids(&spool), [3, 4, 5]);
        assert_eq!(spool.append(0, 0, started(6)).unwrap(), 6);
    }

    #[test]
    fn a_record_torn_by_a_crash_is_cut_off_and_the_ones_before_it_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        for pid in 1..=2 {
            spool.append(0, 0, started(pid)).unwrap();
        }
        drop(spool);
        let path = dir.path().join(SPOOL_FILE);
        let whole = fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(
            &encode_record(&Event {
                id: 3,
                unix_ns: 0,
                mono_ns: 0,
                payload: started(3),
            })[..12],
        );
        fs::write(&path, &torn).unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(ids(&spool), [1, 2]);
        assert_eq!(fs::read(&path).unwrap(), whole);
        assert_eq!(spool.append(0, 0, started(3)).unwrap(), 3);
        drop(spool);
        assert_eq!(ids(&Spool::open(dir.path(), 10).unwrap()), [1, 2, 3]);
    }

    #[test]
    fn a_zero_filled_tail_fails_its_checksum_and_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        spool.append(0, 0, started(1)).unwrap();
        drop(spool);
        let path = dir.path().join(SPOOL_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let whole = bytes.len();
        // What a crash can leave on some filesystems: the size grew, the data did not.
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0]);
        fs::write(&path, &bytes).unwrap();
        let spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(ids(&spool), [1]);
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, whole);
    }

    #[test]
    fn a_controller_holding_higher_ids_makes_the_spool_renumber_above_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        spool.append(0, 0, started(1)).unwrap();
        spool.append(0, 0, started(2)).unwrap();
        spool.continue_above(40).unwrap();
        assert_eq!(ids(&spool), [41, 42]);
        assert_eq!(spool.last_assigned_id(), 42);
        drop(spool);
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(ids(&spool), [41, 42]);
        assert_eq!(spool.append(0, 0, started(3)).unwrap(), 43);
        // A lower or equal highest changes nothing.
        spool.continue_above(10).unwrap();
        assert_eq!(ids(&spool), [41, 42, 43]);
    }

    #[test]
    fn first_after_finds_the_next_event_to_send() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        for pid in 1..=3 {
            spool.append(0, 0, started(pid)).unwrap();
        }
        assert_eq!(spool.first_after(0).unwrap().id, 1);
        assert_eq!(spool.first_after(2).unwrap().id, 3);
        assert!(spool.first_after(3).is_none());
    }

    #[test]
    fn a_released_mark_too_high_to_count_above_is_garbled_and_the_whole_spool_is_resent() {
        // Found by the spool_open fuzz target: next id = mark + 1 overflowed.
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        spool.append(0, 0, started(1)).unwrap();
        spool.append(0, 0, started(2)).unwrap();
        drop(spool);
        fs::write(dir.path().join(RELEASED_FILE), format!("{}\n", u64::MAX)).unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(ids(&spool), [1, 2]);
        assert_eq!(spool.released_up_to(), 0);
        assert_eq!(spool.append(0, 0, started(3)).unwrap(), 3);
    }

    #[test]
    fn a_record_with_an_id_too_high_to_count_above_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        spool.append(0, 0, started(1)).unwrap();
        drop(spool);
        let path = dir.path().join(SPOOL_FILE);
        let whole = fs::read(&path).unwrap();
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&encode_record(&Event {
            id: u64::MAX,
            unix_ns: 0,
            mono_ns: 0,
            payload: started(2),
        }));
        fs::write(&path, &bytes).unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(ids(&spool), [1]);
        assert_eq!(fs::read(&path).unwrap(), whole);
        assert_eq!(spool.append(0, 0, started(2)).unwrap(), 2);
    }

    #[test]
    fn a_controller_claiming_an_id_too_high_to_count_above_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        spool.append(0, 0, started(1)).unwrap();
        for highest in [MAX_EVENT_ID + 1, u64::MAX] {
            let err = spool.continue_above(highest).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let err = spool.release_up_to(highest).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        }
        assert_eq!(ids(&spool), [1]);
        assert_eq!(spool.append(0, 0, started(2)).unwrap(), 2);
    }

    /// The seeds of the fuzz targets `spool_records` (a log) and `spool_open` (a
    /// released mark line, then a log): logs as the encoder writes them, one torn.
    fn fuzz_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        let event = |id: u64, payload: EventPayload| Event {
            id,
            unix_ns: 1_790_000_000_000_000_000 + id,
            mono_ns: 9_000_000_000 + id,
            payload,
        };
        let exited = EventPayload::QemuExited {
            vm_uuid: Some("5b3a2f7e-1c2d-4e6f-8a9b-0c1d2e3f4a5b".into()),
            vm_name: Some("instance-0000002a".into()),
            pid: 4242,
            exit_code: None,
            signal: Some(9),
            killer_pid: Some(1),
            killer_comm: Some("systemd".into()),
            by_hypervisor: false,
            oom_killed: false,
            kernel_ts_ns: 9_000_000_002,
        };
        let one = encode_record(&event(1, started(4242)));
        let three: Vec<u8> = [
            event(1, started(4242)),
            event(2, exited),
            event(3, EventPayload::Unknown),
        ]
        .iter()
        .flat_map(encode_record)
        .collect();
        let mut torn = three.clone();
        torn.extend_from_slice(&encode_record(&event(4, started(7)))[..20]);
        // The targets' first byte (after the mark line, for spool_open): 0 for a log as
        // it is, 1 for NUL-separated bodies the target seals (fuzz/fuzz_targets/common.rs).
        let raw = |log: &[u8]| [&[0u8][..], log].concat();
        let sealed = |events: &[Event]| {
            let bodies: Vec<Vec<u8>> = events
                .iter()
                .map(|e| serde_json::to_vec(e).unwrap())
                .collect();
            [vec![1u8], bodies.join(&0u8)].concat()
        };
        let with_mark = |mark: &str, input: &[u8]| [mark.as_bytes(), input].concat();
        let sealed_pair = sealed(&[event(5, started(9)), event(6, EventPayload::Unknown)]);
        vec![
            ("spool_records", "one", raw(&one)),
            ("spool_records", "three", raw(&three)),
            ("spool_records", "torn", raw(&torn)),
            ("spool_records", "sealed", sealed_pair.clone()),
            ("spool_open", "unreleased", with_mark("\n", &raw(&three))),
            ("spool_open", "released_two", with_mark("2\n", &raw(&three))),
            (
                "spool_open",
                "garbled_mark_torn",
                with_mark("x\n", &raw(&torn)),
            ),
            ("spool_open", "mark_only", with_mark("5\n", &raw(&[]))),
            ("spool_open", "sealed", with_mark("4\n", &sealed_pair)),
        ]
    }

    #[test]
    fn the_committed_fuzz_seeds_are_what_the_encoder_writes() {
        // DEFIB_WRITE_FUZZ_SEEDS=1 rewrites them after a record format change.
        let write = std::env::var_os("DEFIB_WRITE_FUZZ_SEEDS").is_some();
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (target, name, bytes) in fuzz_seeds() {
            let path = corpus.join(target).join(format!("{name}.bin"));
            if write {
                fs::create_dir_all(corpus.join(target)).unwrap();
                fs::write(&path, &bytes).unwrap();
            }
            let committed = fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (DEFIB_WRITE_FUZZ_SEEDS=1 writes it)",
                    path.display()
                )
            });
            assert_eq!(committed, bytes, "{} is stale", path.display());
        }
    }
}
