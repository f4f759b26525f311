//! Shared by the spool targets: turning fuzzer bytes into a spool log.

use watchdog::uplink::spool::seal_record;

/// The first byte picks the mode. Odd: the rest is record bodies separated by NUL
/// bytes, and each gets its header (length and checksum) from the spool's own code;
/// without this the fuzzer would almost never get a checksum right, nor reach the JSON
/// behind it. Even: the rest is the log as it is.
pub fn log_from(data: &[u8]) -> Option<Vec<u8>> {
    let (mode, rest) = data.split_first()?;
    if mode & 1 == 0 {
        return Some(rest.to_vec());
    }
    Some(rest.split(|&b| b == 0).flat_map(seal_record).collect())
}
