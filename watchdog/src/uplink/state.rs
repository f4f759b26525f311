//! What the uplink keeps on disk between runs, besides the spool: the incarnation.
//!
//! Every file under the state directory is replaced atomically ([`write_atomically`]):
//! a crash at any instant leaves either the old or the new content, never a torn one.
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::Path;

/// File name, under the state directory, of the last incarnation (decimal text).
pub const INCARNATION_FILE: &str = "incarnation";

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content:
/// write a temporary file beside it, fsync it, rename it over `path`, fsync the
/// directory (the rename itself is only durable once the directory is).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Makes the directory entries of `dir` (creations, renames) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Picks this run's incarnation and persists it before returning, so it is never
/// handed out twice: `max(stored + 1, now_unix_ms)`. The wall-clock floor keeps it
/// rising even if the state file is lost (the protocol's rule); the `stored + 1`
/// keeps it rising even if the wall clock steps back.
///
/// An unreadable or garbled file counts as absent (logged): the clock floor still
/// gives a number above any earlier run's unless the clock went back too.
pub fn raise_incarnation(state_dir: &Path, now_unix_ms: u64) -> io::Result<u64> {
    let path = state_dir.join(INCARNATION_FILE);
    let stored = match fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                tracing::warn!(path = %path.display(), "incarnation file is garbled; ignoring it");
                None
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let incarnation = stored
        .map_or(0, |s| s.saturating_add(1))
        .max(now_unix_ms)
        .max(1);
    write_atomically(&path, format!("{incarnation}\n").as_bytes())?;
    Ok(incarnation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_incarnation_is_the_wall_clock_in_milliseconds() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(raise_incarnation(dir.path(), 1_000).unwrap(), 1_000);
    }

    #[test]
    fn the_incarnation_rises_on_every_start_even_when_the_clock_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = raise_incarnation(dir.path(), 5_000).unwrap();
        let second = raise_incarnation(dir.path(), 4_000).unwrap();
        let third = raise_incarnation(dir.path(), 9_000).unwrap();
        assert_eq!((first, second, third), (5_000, 5_001, 9_000));
        let stored = fs::read_to_string(dir.path().join(INCARNATION_FILE)).unwrap();
        assert_eq!(stored.trim(), "9000");
    }

    #[test]
    fn a_garbled_incarnation_file_falls_back_to_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(INCARNATION_FILE), "not a number").unwrap();
        assert_eq!(raise_incarnation(dir.path(), 7_000).unwrap(), 7_000);
    }

    #[test]
    fn an_atomic_write_leaves_no_temporary_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x")]);
    }
}
