//! The controller's own load, as the runtime measures it: how late it is and what it
//! lost, so that the engine never blames a host for silence the controller caused.
//!
//! A heartbeat the controller has not read yet, or one its kernel dropped because the
//! controller read too slowly, looks exactly like a silent host. So every silence is
//! judged net of what the controller owes: its lag (the longest a heartbeat recently
//! waited between the kernel and the engine, or how late the engine's timer fired),
//! held for [`LAG_HOLD`] after it was measured, plus the time within the silence during
//! which the controller lost heartbeats itself (blind windows). The allowance is capped
//! by [`super::Config::max_overload_allowance`]: a controller overloaded for longer
//! still suspects silent hosts, and its confirmation and gates still stand between a
//! suspicion and a fence.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Timestamp;

/// How long a measured lag keeps extending deadlines after it was measured, and how
/// long after its last loss the controller still counts itself blind: queues seen long
/// once may be long again, a heartbeat still unread now is not measured until it is
/// read, and a window in which no heartbeat happened to arrive proves no recovery.
pub const LAG_HOLD: Duration = Duration::from_secs(1);

/// Blind windows older than this are forgotten (no silence that long is excused).
const BLIND_KEPT: Duration = Duration::from_secs(120);

/// At most one `ControllerOverloaded` alarm per this long: a controller at the edge of
/// its capacity goes in and out of overload many times a minute, and one alarm (with the
/// count of episodes since the last) says as much as a hundred.
pub const ALARM_EVERY: Duration = Duration::from_secs(60);

/// What the runtime measured of itself over one window (an [`super::Input::Load`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerLoad {
    /// The window this report covers, ending now.
    pub window: Duration,
    /// The longest a heartbeat read in the window waited from its arrival in the
    /// kernel until the engine took it.
    pub heartbeat_wait: Duration,
    /// How late the engine's timer fired (last firing).
    pub timer_lateness: Duration,
    /// Heartbeats the controller itself lost in the window: dropped by the kernel on a
    /// full socket queue, or by the intake on a full engine queue.
    pub lost: u64,
    /// Messages waiting for the engine when the report was made.
    pub queue_depth: u64,
}

impl ControllerLoad {
    /// The lag this report shows: the longer of the two delays.
    pub fn lag(&self) -> Duration {
        self.heartbeat_wait.max(self.timer_lateness)
    }
}

/// Whether a report changed the controller's judgement of itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadChange {
    /// It is overloaded now (it was not).
    Overloaded,
    /// It keeps up again.
    Recovered,
}

/// The engine's memory of the controller's own load.
#[derive(Clone, Debug, Default)]
pub struct SelfLoad {
    /// Recent lags with when they were reported (kept for [`LAG_HOLD`]).
    lags: VecDeque<(Timestamp, Duration)>,
    /// Windows in which the controller lost heartbeats, oldest first, merged.
    blind: VecDeque<(Timestamp, Timestamp)>,
    /// Since when it is overloaded.
    overloaded_since: Option<Timestamp>,
    /// The last report, for the API and the alarm.
    last: ControllerLoad,
    /// When the last alarm was raised, and the overload episodes begun since.
    alarmed_at: Option<Timestamp>,
    episodes_since_alarm: u64,
}

impl SelfLoad {
    /// Takes in a report made at `now`. `overload_lag`: a lag above it is an overload.
    pub fn report(
        &mut self,
        now: Timestamp,
        load: ControllerLoad,
        overload_lag: Duration,
    ) -> Option<LoadChange> {
        self.lags.push_back((now, load.lag()));
        while self
            .lags
            .front()
            .is_some_and(|(at, _)| now.since(*at) > LAG_HOLD)
        {
            self.lags.pop_front();
        }
        if load.lost > 0 {
            let start = Timestamp(now.0.saturating_sub(load.window.as_millis() as u64));
            match self.blind.back_mut() {
                // Losses less than LAG_HOLD apart: one blind period.
                Some((_, end)) if *end + LAG_HOLD >= start => *end = (*end).max(now),
                _ => self.blind.push_back((start, now)),
            }
        }
        while self
            .blind
            .front()
            .is_some_and(|(_, end)| now.since(*end) > BLIND_KEPT)
        {
            self.blind.pop_front();
        }
        let overloaded = self.blind_now(now) || self.lag() > overload_lag;
        self.last = load;
        match (overloaded, self.overloaded_since) {
            (true, None) => {
                self.overloaded_since = Some(now);
                Some(LoadChange::Overloaded)
            }
            (false, Some(_)) => {
                self.overloaded_since = None;
                Some(LoadChange::Recovered)
            }
            _ => None,
        }
    }

    /// The lag that extends every deadline: the longest reported within [`LAG_HOLD`].
    pub fn lag(&self) -> Duration {
        self.lags.iter().map(|(_, l)| *l).max().unwrap_or_default()
    }

    /// At the start of an overload episode at `now`: whether to raise the alarm (at most
    /// one per [`ALARM_EVERY`]), and how many episodes began since the last one.
    pub fn alarm_due(&mut self, now: Timestamp) -> Option<u64> {
        self.episodes_since_alarm += 1;
        if self
            .alarmed_at
            .is_some_and(|at| now.since(at) < ALARM_EVERY)
        {
            return None;
        }
        self.alarmed_at = Some(now);
        Some(std::mem::take(&mut self.episodes_since_alarm))
    }

    /// The last report.
    pub fn last(&self) -> &ControllerLoad {
        &self.last
    }

    /// Since when the controller is overloaded (`None`: it keeps up).
    pub fn overloaded_since(&self) -> Option<Timestamp> {
        self.overloaded_since
    }

    /// Whether the controller lost heartbeats within [`LAG_HOLD`] before `now`: it
    /// counts itself blind until then.
    fn blind_now(&self, now: Timestamp) -> bool {
        self.blind
            .back()
            .is_some_and(|(_, end)| now.since(*end) <= LAG_HOLD)
    }

    /// How much of a silence from `since` to `now` the controller owes: its lag plus
    /// the blind time within the silence (a blind period still open runs to `now`),
    /// at most `cap`.
    pub fn allowance(&self, since: Timestamp, now: Timestamp, cap: Duration) -> Duration {
        let open = self.blind_now(now);
        let last = self.blind.len().saturating_sub(1);
        let blind: u64 = self
            .blind
            .iter()
            .enumerate()
            .map(|(i, (s, e))| {
                let e = if open && i == last { now } else { *e };
                let s = (*s).max(since);
                let e = e.min(now);
                e.0.saturating_sub(s.0)
            })
            .sum();
        (self.lag() + Duration::from_millis(blind)).min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn report(wait: u64, lost: u64) -> ControllerLoad {
        ControllerLoad {
            window: MS(50),
            heartbeat_wait: MS(wait),
            lost,
            ..ControllerLoad::default()
        }
    }

    #[test]
    fn a_lag_extends_deadlines_for_a_second_after_it_was_measured() {
        let mut l = SelfLoad::default();
        assert_eq!(
            l.report(Timestamp(1_000), report(200, 0), MS(50)),
            Some(LoadChange::Overloaded)
        );
        assert_eq!(l.report(Timestamp(1_500), report(2, 0), MS(50)), None);
        assert_eq!(l.lag(), MS(200), "still held");
        assert_eq!(
            l.allowance(Timestamp(1_400), Timestamp(1_500), MS(10_000)),
            MS(200)
        );
        assert_eq!(
            l.report(Timestamp(2_100), report(2, 0), MS(50)),
            Some(LoadChange::Recovered)
        );
        assert_eq!(l.lag(), MS(2));
    }

    #[test]
    fn time_in_which_the_controller_lost_heartbeats_is_not_counted_as_silence() {
        let mut l = SelfLoad::default();
        // Lost heartbeats in (950, 1000] and (1000, 1050]: one blind window 950..1050.
        l.report(Timestamp(1_000), report(0, 3), MS(50));
        l.report(Timestamp(1_050), report(0, 1), MS(50));
        // While the last loss is recent, the blind period runs to now.
        assert_eq!(
            l.allowance(Timestamp(900), Timestamp(1_500), MS(10_000)),
            MS(550)
        );
        l.report(Timestamp(2_200), report(0, 0), MS(50));
        // A silence from 900 overlaps the whole window; one from 1_020 only its end.
        assert_eq!(
            l.allowance(Timestamp(900), Timestamp(2_200), MS(10_000)),
            MS(100)
        );
        assert_eq!(
            l.allowance(Timestamp(1_020), Timestamp(2_200), MS(10_000)),
            MS(30)
        );
        assert_eq!(
            l.allowance(Timestamp(900), Timestamp(2_200), MS(40)),
            MS(40),
            "capped"
        );
        assert_eq!(
            l.allowance(Timestamp(1_100), Timestamp(2_200), MS(10_000)),
            MS(0),
            "a silence after the window owes nothing to it"
        );
    }

    #[test]
    fn overload_episodes_raise_one_alarm_a_minute_counting_the_episodes() {
        let mut l = SelfLoad::default();
        assert_eq!(l.alarm_due(Timestamp(1_000)), Some(1));
        assert_eq!(l.alarm_due(Timestamp(5_000)), None);
        assert_eq!(l.alarm_due(Timestamp(30_000)), None);
        assert_eq!(l.alarm_due(Timestamp(61_000)), Some(3));
    }

    #[test]
    fn losses_less_than_a_second_apart_make_one_blind_period_and_one_overload() {
        let mut l = SelfLoad::default();
        assert_eq!(
            l.report(Timestamp(1_000), report(0, 2), MS(50)),
            Some(LoadChange::Overloaded)
        );
        // A window without loss (no heartbeat happened to arrive) is no recovery.
        assert_eq!(l.report(Timestamp(1_050), report(0, 0), MS(50)), None);
        assert_eq!(l.report(Timestamp(1_600), report(0, 1), MS(50)), None);
        assert_eq!(
            l.allowance(Timestamp(900), Timestamp(1_600), MS(10_000)),
            MS(650)
        );
        assert_eq!(
            l.report(Timestamp(2_700), report(0, 0), MS(50)),
            Some(LoadChange::Recovered)
        );
    }
}
