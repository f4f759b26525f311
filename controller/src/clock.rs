//! The engine's clock: milliseconds on the controller's wall clock, advanced by tokio's
//! (pausable) monotonic clock so a wall-clock step never makes time run backwards and
//! tests can advance time by hand.
use tokio::time::Instant;

use crate::engine::Timestamp;

#[derive(Debug, Clone, Copy)]
pub struct EngineClock {
    base_unix_ms: u64,
    base: Instant,
}

/// The wall clock in the engine's unit (unix ms): read once, when the engine's clock
/// starts.
fn wall_clock_now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

impl EngineClock {
    pub fn start() -> Self {
        Self {
            base_unix_ms: wall_clock_now().0,
            base: Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        Timestamp(self.base_unix_ms + self.base.elapsed().as_millis() as u64)
    }

    /// The tokio instant at which the engine's clock reads `at`.
    pub fn instant_at(&self, at: Timestamp) -> Instant {
        self.base + std::time::Duration::from_millis(at.0.saturating_sub(self.base_unix_ms))
    }
}
