//! Showing controller times (unix ms): ISO-8601 in UTC and "3.2 s ago" against the
//! snapshot's own clock (so the operator's clock skew does not matter).

/// Times before this (2001-09-09) are not wall-clock unix ms: shown as seconds.
const PLAUSIBLE_UNIX_MS: u64 = 1_000_000_000_000;

/// `2023-11-14 22:13:20Z` (UTC).
pub fn iso(unix_ms: u64) -> String {
    let full = iso_ms(unix_ms);
    if unix_ms < PLAUSIBLE_UNIX_MS {
        return full;
    }
    // Without the milliseconds: `…20.123Z` → `…20Z`.
    format!("{}Z", &full[..full.len() - 5])
}

/// `2023-11-14 22:13:20.123Z` (UTC), for timelines: as the controller shows host times.
pub fn iso_ms(unix_ms: u64) -> String {
    controller::api::utc_ms(unix_ms)
}

/// A duration in ms, short: `0.1 s`, `42.0 s`, `4m 12s`, `3h 05m`, `2d 04h`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    if ms < 60_000 {
        format!("{}.{} s", s, ms % 1000 / 100)
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}d {:02}h", s / 86_400, s / 3600 % 24)
    }
}

/// `3.2 s ago`, as seen at `now_ms` (a time after `now_ms` counts as now).
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    format!("{} ago", duration(now_ms.saturating_sub(then_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_shows_utc_dates_including_leap_days() {
        assert_eq!(iso(1_700_000_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(iso_ms(1_709_164_800_123), "2024-02-29 00:00:00.123Z");
        assert_eq!(iso(1_000_000_000_000), "2001-09-09 01:46:40Z");
    }

    #[test]
    fn times_too_small_to_be_wall_clock_are_shown_as_seconds() {
        assert_eq!(iso(12_345), "12.345s");
        assert_eq!(iso_ms(5), "0.005s");
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = 1_700_000_000_000;
        assert_eq!(ago(now - 3_250, now), "3.2 s ago");
        assert_eq!(ago(now - 100, now), "0.1 s ago");
        assert_eq!(ago(now + 500, now), "0.0 s ago");
        assert_eq!(ago(now - 252_000, now), "4m 12s ago");
        assert_eq!(ago(now - 3 * 3_600_000 - 5 * 60_000, now), "3h 05m ago");
        assert_eq!(ago(now - 52 * 3_600_000, now), "2d 04h ago");
    }
}
