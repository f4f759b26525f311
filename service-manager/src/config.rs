//! The range check both daemons' configurations use: the error message is written from
//! the range itself, so the accepted values and the message saying them cannot drift.
use std::fmt::Display;
use std::ops::{Bound, RangeBounds};

/// A configuration value outside its range: the field as the daemon names it and the
/// message, e.g. `must be 10..=60000`. Each daemon turns it into its own config error
/// (`From`), so `check_range(..)?` reads like any other check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfRange<F> {
    pub field: F,
    pub message: String,
}

/// `Ok` when `value` lies in `range`; otherwise the field with a message made from the
/// range: `a..=b` gives "must be a..=b", `a..` "must be at least a", `..=b` "must be
/// at most b", anything else interval notation ("must be in (0, 1]"). `field` is kept
/// as given (`&'static str` for the watchdog, a built path for the controller's fence
/// levels). Checks between fields, or of anything but a value, stay hand-written.
pub fn check_range<F, T, R>(field: F, value: T, range: R) -> Result<(), OutOfRange<F>>
where
    T: PartialOrd + Display,
    R: RangeBounds<T>,
{
    if range.contains(&value) {
        return Ok(());
    }
    Err(OutOfRange {
        field,
        message: describe(range.start_bound(), range.end_bound()),
    })
}

fn describe<T: Display>(start: Bound<&T>, end: Bound<&T>) -> String {
    use Bound::{Excluded, Included, Unbounded};
    match (start, end) {
        (Included(a), Included(b)) => format!("must be {a}..={b}"),
        (Included(a), Unbounded) => format!("must be at least {a}"),
        (Unbounded, Included(b)) => format!("must be at most {b}"),
        (start, end) => {
            let low = match start {
                Included(a) => format!("[{a}"),
                Excluded(a) => format!("({a}"),
                Unbounded => "(-inf".to_string(),
            };
            let high = match end {
                Included(b) => format!("{b}]"),
                Excluded(b) => format!("{b})"),
                Unbounded => "inf)".to_string(),
            };
            format!("must be in {low}, {high}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<T: PartialOrd + Display>(value: T, range: impl RangeBounds<T>) -> String {
        check_range("f", value, range).unwrap_err().message
    }

    #[test]
    fn a_value_in_range_passes_and_the_bounds_are_inclusive() {
        assert_eq!(check_range("f", 10_u64, 10..=60_000), Ok(()));
        assert_eq!(check_range("f", 60_000_u64, 10..=60_000), Ok(()));
        assert_eq!(check_range("f", 1_u32, 1..), Ok(()));
        assert_eq!(
            check_range("f", 1.0_f64, (Bound::Excluded(0.0), Bound::Included(1.0))),
            Ok(())
        );
    }

    #[test]
    fn the_message_is_written_from_the_range_and_names_the_field() {
        let err = check_range("libvirt.reconnect_min_ms", 0_u64, 10..=60_000).unwrap_err();
        assert_eq!(err.field, "libvirt.reconnect_min_ms");
        assert_eq!(err.message, "must be 10..=60000");
        assert_eq!(message(0_u32, 1..), "must be at least 1");
        assert_eq!(message(60_001_u64, ..=60_000), "must be at most 60000");
        assert_eq!(
            message(0.0_f64, (Bound::Excluded(0.0), Bound::Included(1.0))),
            "must be in (0, 1]"
        );
        assert_eq!(
            message(f64::NAN, (Bound::Excluded(0.0), Bound::Included(1.0))),
            "must be in (0, 1]"
        );
        assert_eq!(message(5_i32, 0..5), "must be in [0, 5)");
    }

    #[test]
    fn a_built_field_name_is_kept() {
        let err = check_range(
            format!("fence.host[{}].timeout_ms", 0),
            1_u64,
            100..=600_000,
        )
        .unwrap_err();
        assert_eq!(err.field, "fence.host[0].timeout_ms");
    }
}
