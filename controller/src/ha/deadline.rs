//! The leader's local deadline: until when it may act, on its own clock, so that it
//! stops before etcd can expire its lease.
//!
//! etcd renews a lease when a keep-alive *arrives*, so a keep-alive sent at `s` and
//! answered keeps the lease on etcd's side until at least `s + TTL`. The leader stops
//! acting at `s + TTL − margin` after the latest answered keep-alive. The margin covers
//! the leader's clock running slow against etcd's (drift: ppm, so microseconds per
//! second) and, mostly, the time between looking at the deadline and an action reaching
//! the world (scheduling on a busy host). A keep-alive whose answer never comes renews
//! nothing here, even if etcd did renew: the deadline only ever errs early.
use std::time::Duration;

use tokio::time::Instant;

/// Until when this controller may act on its lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseDeadline {
    margin: Duration,
    until: Option<Instant>,
}

impl LeaseDeadline {
    /// No renewal yet: not valid. `margin` is subtracted from every renewal.
    pub fn new(margin: Duration) -> Self {
        LeaseDeadline {
            margin,
            until: None,
        }
    }

    /// A grant or keep-alive sent at `sent_at` was answered: the lease lives `ttl` from
    /// then (the TTL etcd reports, which may be longer than the one asked for).
    pub fn renewed(&mut self, sent_at: Instant, ttl: Duration) {
        let until = sent_at + ttl.saturating_sub(self.margin);
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// The lease is gone (etcd said so, or it was revoked).
    pub fn lost(&mut self) {
        self.until = None;
    }

    /// Whether this controller may still act at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// The instant acting must stop, if the lease was ever renewed.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_leader_may_act_until_the_ttl_after_its_last_answered_keep_alive_minus_the_margin() {
        let mut d = LeaseDeadline::new(Duration::from_millis(250));
        let t0 = Instant::now();
        assert!(!d.valid_at(t0), "never renewed: not valid");
        d.renewed(t0, Duration::from_secs(1));
        assert!(d.valid_at(t0 + Duration::from_millis(749)));
        assert!(!d.valid_at(t0 + Duration::from_millis(750)));
        // A later keep-alive moves it; an older answer arriving late never moves it back.
        d.renewed(t0 + Duration::from_millis(330), Duration::from_secs(1));
        d.renewed(t0 + Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(d.until(), Some(t0 + Duration::from_millis(1080)));
        d.lost();
        assert!(!d.valid_at(t0 + Duration::from_millis(331)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_margin_larger_than_the_ttl_never_lets_a_leader_act() {
        let mut d = LeaseDeadline::new(Duration::from_secs(5));
        let t0 = Instant::now();
        d.renewed(t0, Duration::from_secs(1));
        assert!(!d.valid_at(t0));
    }
}
