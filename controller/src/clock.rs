//! The engine's clock: milliseconds on the controller's wall clock, advanced by tokio's
//! (pausable) monotonic clock so a wall-clock step never makes time run backwards and
//! tests can advance time by hand.
use tokio::time::Instant;

use crate::engine::{IntentLog, Timestamp};

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

/// The latest time the intent log holds (an intent's or a completion's), on the clock
/// of the controller that wrote it.
pub fn latest_in_log(log: &impl IntentLog) -> Option<Timestamp> {
    log.entries()
        .iter()
        .flat_map(|e| [Some(e.record.at), e.done.as_ref().map(|d| d.at)])
        .flatten()
        .max()
}

impl EngineClock {
    pub fn start() -> Self {
        Self {
            base_unix_ms: wall_clock_now().0,
            base: Instant::now(),
        }
    }

    /// Starts after `latest` (the latest time the store holds) even if the wall clock
    /// was stepped back while the controller was down: the engine compares the times it
    /// wrote before its restart with its clock now, and a retry or a deadline computed
    /// from them must not lie an hour ahead.
    pub fn start_not_before(latest: Option<Timestamp>) -> Self {
        let mut clock = Self::start();
        if let Some(latest) = latest {
            if clock.base_unix_ms <= latest.0 {
                tracing::warn!(
                    wall_ms = clock.base_unix_ms,
                    latest_in_store_ms = latest.0,
                    "the wall clock reads earlier than the store's latest intent (stepped \
                     back?); the engine's clock starts just after the store's"
                );
                clock.base_unix_ms = latest.0 + 1;
            }
        }
        clock
    }

    pub fn now(&self) -> Timestamp {
        Timestamp(self.base_unix_ms + self.base.elapsed().as_millis() as u64)
    }

    /// What the engine's clock read at `instant` (not before its start).
    pub fn at_instant(&self, instant: Instant) -> Timestamp {
        Timestamp(
            self.base_unix_ms + instant.saturating_duration_since(self.base).as_millis() as u64,
        )
    }

    /// The tokio instant at which the engine's clock reads `at`.
    pub fn instant_at(&self, at: Timestamp) -> Instant {
        self.base + std::time::Duration::from_millis(at.0.saturating_sub(self.base_unix_ms))
    }
}
