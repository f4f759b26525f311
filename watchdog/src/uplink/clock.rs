//! The uplink's clock: host monotonic time driven by tokio's clock, so tests can pause
//! and advance it, and wall time.
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::{monotonic_ns, realtime_ns};

/// Where the uplink reads the time. Heartbeats carry both readings; isolation is
/// judged on the monotonic one.
pub trait Clock: Send + Sync + 'static {
    /// Host monotonic time, ns (CLOCK_MONOTONIC, the probes' clock).
    fn mono_ns(&self) -> u64;
    /// Wall-clock time, unix ns.
    fn unix_ns(&self) -> u64;
    /// The tokio instant at which [`Clock::mono_ns`] reads `mono_ns`, to sleep until a
    /// deadline expressed on the monotonic clock.
    fn instant_at(&self, mono_ns: u64) -> Instant;
}

/// CLOCK_MONOTONIC read once at creation, advanced by tokio's clock from then on: in
/// production tokio's clock is CLOCK_MONOTONIC itself, so readings match the probes';
/// under a paused test runtime they move only when the test advances time.
#[derive(Debug, Clone)]
pub struct TokioClock {
    anchor: Instant,
    anchor_mono_ns: u64,
}

impl TokioClock {
    /// Anchors the clock now. Needs a tokio runtime context.
    pub fn new() -> Self {
        TokioClock {
            anchor: Instant::now(),
            anchor_mono_ns: monotonic_ns(),
        }
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.anchor.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn mono_ns(&self) -> u64 {
        self.anchor_mono_ns.saturating_add(self.elapsed_ns())
    }

    // Read afresh, so wall-clock steps show (it times nothing, it only stamps).
    fn unix_ns(&self) -> u64 {
        realtime_ns()
    }

    fn instant_at(&self, mono_ns: u64) -> Instant {
        let after = mono_ns.saturating_sub(self.anchor_mono_ns);
        self.anchor + Duration::from_nanos(after)
    }
}
