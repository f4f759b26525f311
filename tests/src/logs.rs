//! Reading the daemons' text logs (`--log-format text`): colours off, a line's time.
use std::time::UNIX_EPOCH;

/// `s` without its ANSI colour sequences (ESC … letter).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The unix ms of a log line's leading RFC 3339 stamp (`2026-12-06T06:31:55.349239Z …`,
/// coloured or not); `None` for a line without one.
pub fn line_unix_ms(line: &str) -> Option<u64> {
    let plain = strip_ansi(line);
    let stamp = plain.split_whitespace().next()?;
    let at = controller::openstack::keystone::parse_rfc3339(stamp)?;
    Some(at.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coloured_log_line_gives_its_time_in_unix_ms() {
        let line = "\u{1b}[2m2026-12-06T18:48:49.284341Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m timeline \u{1b}[3mto\u{1b}[0m\u{1b}[2m=\u{1b}[0mSuspect";
        assert_eq!(line_unix_ms(line), Some(1_796_582_929_284));
        assert!(strip_ansi(line).ends_with("timeline to=Suspect"));
        assert_eq!(line_unix_ms("no stamp here"), None);
    }
}
