//! systemd's service protocol (sd_notify over `$NOTIFY_SOCKET`: readiness, watchdog
//! pings, stopping). Every call is a no-op when the daemon was not started by systemd
//! (no `$NOTIFY_SOCKET`), so tests and foreground runs need nothing.
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1`: everything is bound and the main loop is about to run.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: a stop was asked for and the daemon is draining.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// `WATCHDOG=1` pings at half of `$WATCHDOG_USEC`, driven by the main loop's own
/// `select!` (so a hung loop stops pinging and systemd restarts the daemon).
pub struct WatchdogPinger {
    interval: Option<tokio::time::Interval>,
}

impl WatchdogPinger {
    /// Reads `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, which must be this process if set).
    pub fn from_env() -> Self {
        Self::every(sd_notify::watchdog_enabled().map(|d| d / 2))
    }

    fn every(period: Option<Duration>) -> Self {
        let interval = period.filter(|p| !p.is_zero()).map(|p| {
            let mut i = tokio::time::interval(p);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Self { interval }
    }

    /// Resolves when the next ping is due; never without a systemd watchdog.
    pub async fn due(&mut self) {
        match &mut self.interval {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    pub fn ping(&self) {
        if self.interval.is_some() {
            send(&[NotifyState::Watchdog]);
        }
    }
}
