//! The failure detector: pure, fed heartbeats with their receive time, asked with `now`.
//!
//! Two kinds, chosen by [`DetectorConfig::kind`]:
//!
//! * **Fixed** (the default): a host is suspect when no heartbeat arrived on **any** path
//!   for `missed × interval`. Defaults: interval 100 ms (the watchdog's heartbeat
//!   period), 3 missed → suspect after 300 ms of silence.
//! * **Phi accrual** (Hayashibara et al., as in Akka/Cassandra): per path, the
//!   inter-arrival times of the last `window` heartbeats give a normal distribution; φ
//!   is `-log10` of the probability that a heartbeat is still this late. A host is
//!   suspect when φ exceeds the threshold on every path. Defaults: threshold 8.0,
//!   window 100 samples, minimum standard deviation 20 ms, acceptable pause 0. Until a
//!   path has 3 samples it falls back to the fixed rule.
//!
//! Per-path last-seen times are exposed so `defibctl` can show which network went
//! quiet. A host the detector has never heard from is judged from the time it was
//! registered (a grace period: a restarted controller does not suspect everyone).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{HostId, PathId, Timestamp};

/// Which detector and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DetectorKind {
    /// Suspect after `missed` intervals of silence on every path.
    Fixed {
        /// Missed heartbeats (default 3).
        missed: u32,
    },
    /// Suspect when φ exceeds `threshold` on every path.
    PhiAccrual {
        /// φ threshold (default 8.0).
        threshold: f64,
        /// Inter-arrival samples kept per path (default 100).
        window: usize,
        /// Floor for the standard deviation (default 20 ms).
        min_std_dev: Duration,
        /// Extra pause tolerated on top of the mean (default 0).
        acceptable_pause: Duration,
    },
}

/// Detector configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// The heartbeat period (default 100 ms).
    pub interval: Duration,
    /// Which detector (default fixed, 3 missed).
    pub kind: DetectorKind,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            interval: Duration::from_millis(100),
            kind: DetectorKind::Fixed { missed: 3 },
        }
    }
}

impl DetectorConfig {
    /// The default phi-accrual detector.
    pub fn phi_accrual() -> Self {
        DetectorConfig {
            interval: Duration::from_millis(100),
            kind: DetectorKind::PhiAccrual {
                threshold: 8.0,
                window: 100,
                min_std_dev: Duration::from_millis(20),
                acceptable_pause: Duration::ZERO,
            },
        }
    }

    /// The silence after which the fixed rule suspects a host (also the phi detector's
    /// fallback while it has too few samples).
    pub fn suspect_after(&self) -> Duration {
        let missed = match self.kind {
            DetectorKind::Fixed { missed } => missed,
            DetectorKind::PhiAccrual { .. } => 3,
        };
        self.interval * missed
    }
}

/// What the detector thinks of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Liveness {
    /// Heard recently enough on at least one path.
    Alive,
    /// Silent on every path.
    Suspect,
}

#[derive(Clone, Debug, Default)]
struct PathState {
    last_seen: Timestamp,
    intervals_ms: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
}

impl PathState {
    fn push(&mut self, x: f64, window: usize) {
        self.intervals_ms.push_back(x);
        self.sum += x;
        self.sum_sq += x * x;
        while self.intervals_ms.len() > window {
            if let Some(old) = self.intervals_ms.pop_front() {
                self.sum -= old;
                self.sum_sq -= old * old;
            }
        }
    }
}

#[derive(Clone, Debug)]
struct HostState {
    registered: Timestamp,
    /// By path, in path order (a host has one to a few paths: a vector beats a map).
    paths: Vec<(PathId, PathState)>,
}

impl HostState {
    fn new(registered: Timestamp) -> Self {
        HostState {
            registered,
            paths: Vec::new(),
        }
    }

    fn last_seen(&self) -> Option<Timestamp> {
        self.paths.iter().map(|(_, p)| p.last_seen).max()
    }

    fn silent_since(&self) -> Timestamp {
        self.last_seen()
            .unwrap_or(self.registered)
            .max(self.registered)
    }
}

/// The detector's memory: per host, per path, the last receive time. Looked up by host
/// only (never iterated), so a hash map: the engine asks it once per heartbeat.
#[derive(Clone, Debug)]
pub struct Detector {
    cfg: DetectorConfig,
    hosts: HashMap<HostId, HostState>,
}

impl Detector {
    /// An empty detector.
    pub fn new(cfg: DetectorConfig) -> Self {
        Detector {
            cfg,
            hosts: HashMap::new(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Starts watching a host without a heartbeat yet; silence counts from `now`.
    pub fn register(&mut self, host: &HostId, now: Timestamp) {
        if !self.hosts.contains_key(host) {
            self.hosts.insert(host.clone(), HostState::new(now));
        }
    }

    /// Restarts the grace period of a host (after maintenance, unfence, controller
    /// restart): silence counts from `now` until the next heartbeat.
    pub fn reset(&mut self, host: &HostId, now: Timestamp) {
        self.hosts.insert(host.clone(), HostState::new(now));
    }

    /// A heartbeat from `host` over `path` was received at `at`, before the host was
    /// registered here (a follower heard it, then took the lead): silence counts from
    /// `at`, not from the registration.
    pub fn heard_before(&mut self, host: &HostId, path: PathId, at: Timestamp) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.registered = h.registered.min(at);
        }
        self.heartbeat(host, path, at);
    }

    /// A heartbeat from `host` over `path` was received at `now`. Returns the host's
    /// deadline under the fixed rule (see [`Detector::deadline`]).
    pub fn heartbeat(&mut self, host: &HostId, path: PathId, now: Timestamp) -> Option<Timestamp> {
        let window = match self.cfg.kind {
            DetectorKind::PhiAccrual { window, .. } => window.max(1),
            DetectorKind::Fixed { .. } => 0,
        };
        // No key clone for a known host (the common case, many times a second).
        let h = match self.hosts.get_mut(host) {
            Some(h) => h,
            None => self
                .hosts
                .entry(host.clone())
                .or_insert_with(|| HostState::new(now)),
        };
        match h.paths.iter_mut().find(|(p, _)| *p == path) {
            Some((_, p)) => {
                if now > p.last_seen {
                    if window > 0 {
                        p.push(now.since(p.last_seen).as_millis() as f64, window);
                    }
                    p.last_seen = now;
                }
            }
            None => {
                h.paths.push((
                    path,
                    PathState {
                        last_seen: now,
                        ..PathState::default()
                    },
                ));
                h.paths.sort_by_key(|(p, _)| *p);
            }
        }
        match self.cfg.kind {
            DetectorKind::Fixed { .. } => Some(h.silent_since() + self.cfg.suspect_after()),
            DetectorKind::PhiAccrual { .. } => None,
        }
    }

    /// The last heartbeat on any path.
    pub fn last_seen(&self, host: &HostId) -> Option<Timestamp> {
        self.hosts.get(host)?.last_seen()
    }

    /// Since when the host is silent: its last heartbeat on any path, or its
    /// (re)registration if later. `None` for a host the detector does not know.
    pub fn silent_since(&self, host: &HostId) -> Option<Timestamp> {
        Some(self.hosts.get(host)?.silent_since())
    }

    /// When the fixed rule turns the host suspect if nothing more is heard (`None`
    /// for an unknown host, and under phi accrual, whose deadline moves with φ: the
    /// engine's periodic tick judges those).
    pub fn deadline(&self, host: &HostId) -> Option<Timestamp> {
        match self.cfg.kind {
            DetectorKind::Fixed { .. } => Some(self.silent_since(host)? + self.cfg.suspect_after()),
            DetectorKind::PhiAccrual { .. } => None,
        }
    }

    /// The last heartbeat per path.
    pub fn path_last_seen(&self, host: &HostId) -> Vec<(PathId, Timestamp)> {
        self.hosts
            .get(host)
            .map(|h| h.paths.iter().map(|(p, s)| (*p, s.last_seen)).collect())
            .unwrap_or_default()
    }

    /// How long the host has been silent on every path (from registration if never
    /// heard). `None` for a host the detector does not know.
    pub fn silence(&self, host: &HostId, now: Timestamp) -> Option<Duration> {
        Some(now.since(self.silent_since(host)?))
    }

    /// φ for one host: the smallest over its paths (the host is as alive as its
    /// best path). Uses the fixed interval as the mean while samples are few.
    pub fn phi(&self, host: &HostId, now: Timestamp) -> Option<f64> {
        let h = self.hosts.get(host)?;
        let (min_std, pause) = match self.cfg.kind {
            DetectorKind::PhiAccrual {
                min_std_dev,
                acceptable_pause,
                ..
            } => (min_std_dev, acceptable_pause),
            DetectorKind::Fixed { .. } => (Duration::from_millis(20), Duration::ZERO),
        };
        let interval = self.cfg.interval.as_millis() as f64;
        let mut best: Option<f64> = None;
        for (_, p) in &h.paths {
            let n = p.intervals_ms.len();
            let (mean, std) = if n < 3 {
                (interval, min_std.as_millis() as f64)
            } else {
                let mean = p.sum / n as f64;
                let var = (p.sum_sq / n as f64 - mean * mean).max(0.0);
                (mean, var.sqrt().max(min_std.as_millis() as f64))
            };
            let elapsed = now.since(p.last_seen.max(h.registered)).as_millis() as f64;
            let phi = phi_of(elapsed, mean + pause.as_millis() as f64, std);
            best = Some(best.map_or(phi, |b: f64| b.min(phi)));
        }
        Some(best.unwrap_or_else(|| {
            let elapsed = now.since(h.registered).as_millis() as f64;
            phi_of(elapsed, interval, min_std.as_millis() as f64)
        }))
    }

    /// Alive or suspect, per the configured rule. Unknown hosts are alive (nothing
    /// to suspect yet).
    pub fn liveness(&self, host: &HostId, now: Timestamp) -> Liveness {
        let Some(silence) = self.silence(host, now) else {
            return Liveness::Alive;
        };
        let suspect = match self.cfg.kind {
            DetectorKind::Fixed { .. } => silence >= self.cfg.suspect_after(),
            DetectorKind::PhiAccrual { threshold, .. } => {
                let few = self
                    .hosts
                    .get(host)
                    .is_none_or(|h| h.paths.iter().all(|(_, p)| p.intervals_ms.len() < 3));
                if few {
                    silence >= self.cfg.suspect_after()
                } else {
                    self.phi(host, now).unwrap_or(0.0) > threshold
                }
            }
        };
        if suspect {
            Liveness::Suspect
        } else {
            Liveness::Alive
        }
    }

    /// Forgets a host.
    pub fn remove(&mut self, host: &HostId) {
        self.hosts.remove(host);
    }
}

/// φ for an elapsed time given a normal(mean, std) inter-arrival distribution, with
/// the logistic approximation of the normal CDF used by Akka.
fn phi_of(elapsed_ms: f64, mean_ms: f64, std_ms: f64) -> f64 {
    let y = (elapsed_ms - mean_ms) / std_ms;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p_later = if elapsed_ms > mean_ms {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    -(p_later.max(f64::MIN_POSITIVE)).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> HostId {
        HostId::new("cmp-1")
    }

    #[test]
    fn a_host_is_suspect_after_three_missed_heartbeats_on_every_path() {
        let mut d = Detector::new(DetectorConfig::default());
        d.heartbeat(&h(), PathId(0), Timestamp(1000));
        d.heartbeat(&h(), PathId(1), Timestamp(1100));
        assert_eq!(d.liveness(&h(), Timestamp(1399)), Liveness::Alive);
        assert_eq!(d.liveness(&h(), Timestamp(1400)), Liveness::Suspect);
        assert_eq!(
            d.path_last_seen(&h()),
            vec![(PathId(0), Timestamp(1000)), (PathId(1), Timestamp(1100))]
        );
    }

    #[test]
    fn one_live_path_keeps_a_host_alive() {
        let mut d = Detector::new(DetectorConfig::default());
        for t in 0..20 {
            d.heartbeat(&h(), PathId(1), Timestamp(t * 100));
        }
        d.heartbeat(&h(), PathId(0), Timestamp(0));
        assert_eq!(d.liveness(&h(), Timestamp(2000)), Liveness::Alive);
    }

    #[test]
    fn a_registered_host_gets_a_grace_period() {
        let mut d = Detector::new(DetectorConfig::default());
        d.register(&h(), Timestamp(5000));
        assert_eq!(d.liveness(&h(), Timestamp(5200)), Liveness::Alive);
        assert_eq!(d.liveness(&h(), Timestamp(5300)), Liveness::Suspect);
    }

    #[test]
    fn phi_grows_with_silence_and_crosses_the_threshold() {
        let mut d = Detector::new(DetectorConfig::phi_accrual());
        for t in 0..50 {
            d.heartbeat(&h(), PathId(0), Timestamp(t * 100));
        }
        let last = 4900;
        let p1 = d.phi(&h(), Timestamp(last + 100)).unwrap();
        let p2 = d.phi(&h(), Timestamp(last + 200)).unwrap();
        assert!(p1 < p2, "{p1} < {p2}");
        assert_eq!(d.liveness(&h(), Timestamp(last + 120)), Liveness::Alive);
        assert_eq!(d.liveness(&h(), Timestamp(last + 1000)), Liveness::Suspect);
    }
}
