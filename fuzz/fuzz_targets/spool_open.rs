//! Any bytes as what a crash or a bad disk leaves of the watchdog's spool files,
//! through `Spool::open` (the recovery the daemon runs at start), one append and a
//! reopen. The input's first line is the released mark (`events.released`), the rest
//! the record log (`events.spool`), raw or sealed (see `common::log_from`).
//!
//! Nothing may panic, and the spool's promises must hold: waiting events have ids
//! above the released mark, rising; a new event gets the next id; what was appended
//! is there after a reopen.
#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use protocol::EventPayload;
use watchdog::uplink::spool::{Spool, RELEASED_FILE, SPOOL_FILE};

/// Small, so the fuzzer also reaches the drop-the-oldest path.
const MAX_EVENTS: usize = 4;

/// One directory per fuzzing process, under the temporary directory (`cargo xtask
/// fuzz` points TMPDIR at tmpfs, as every run writes and fsyncs both files, and
/// removes it afterwards).
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::temp_dir().join(format!("defib-fuzz-spool-{}", std::process::id()))
    })
}

fn ids(spool: &Spool) -> Vec<u64> {
    spool.pending().map(|e| e.id).collect()
}

fuzz_target!(|data: &[u8]| {
    let (released, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&data[..0], data),
    };
    let Some(log) = common::log_from(rest) else {
        return;
    };
    let dir = dir();
    // A failure to prepare the files is the machine's, not the input's.
    let prepared = std::fs::remove_dir_all(dir)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .and_then(|()| std::fs::create_dir_all(dir))
        .and_then(|()| std::fs::write(dir.join(RELEASED_FILE), released))
        .and_then(|()| std::fs::write(dir.join(SPOOL_FILE), &log));
    if let Err(e) = prepared {
        panic!("cannot prepare {}: {e}", dir.display());
    }

    let Ok(mut spool) = Spool::open(dir, MAX_EVENTS) else {
        return;
    };
    let before = ids(&spool);
    assert!(
        before.len() <= MAX_EVENTS,
        "{} events over the bound",
        before.len()
    );
    assert!(
        before.windows(2).all(|w| w[0] < w[1]),
        "ids do not rise: {before:?}"
    );
    assert!(
        before
            .iter()
            .all(|&id| id > spool.released_up_to() && id <= spool.last_assigned_id()),
        "waiting ids {before:?} outside ({}, {}]",
        spool.released_up_to(),
        spool.last_assigned_id()
    );

    let expected = spool.last_assigned_id().checked_add(1);
    let payload = EventPayload::QemuStarted {
        vm_uuid: None,
        vm_name: None,
        pid: 1,
    };
    let Ok(id) = spool.append(1, 1, payload) else {
        return;
    };
    assert_eq!(Some(id), expected, "the new event did not get the next id");
    let after = ids(&spool);
    drop(spool);

    let Ok(reopened) = Spool::open(dir, MAX_EVENTS) else {
        return;
    };
    assert_eq!(
        ids(&reopened),
        after,
        "the reopened spool lost or gained events"
    );
});
