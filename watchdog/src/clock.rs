//! The kernel's clocks. The probes stamp records with `bpf_ktime_get_ns()`, which is
//! CLOCK_MONOTONIC; the daemon stamps what it observes on the same clock so the two can
//! be subtracted, and converts to wall time for people.
use nix::time::{clock_gettime, ClockId};

pub fn monotonic_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

pub fn realtime_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Wall-clock unix milliseconds of a CLOCK_MONOTONIC instant (now's offset applied).
pub fn mono_to_unix_ms(mono_ns: u64) -> u64 {
    let offset = realtime_ns() as i128 - monotonic_ns() as i128;
    ((mono_ns as i128 + offset) / 1_000_000).max(0) as u64
}
