//! The engine's knobs, with the documented defaults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::detector::DetectorConfig;

/// Engine configuration. [`Config::default`] gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// The failure detector (default: fixed, 3 missed 100 ms heartbeats = 300 ms).
    pub detector: DetectorConfig,
    /// How often the engine evaluates timers (default 50 ms).
    pub tick: Duration,
    /// Silence (no heartbeat on any path) after which a Suspect host is confirmed with
    /// independent sources (default 500 ms).
    pub confirm_after: Duration,
    /// No answer from the confirmation sources after this long counts as `Unknown`
    /// (default 2 s).
    pub confirm_timeout: Duration,
    /// Re-ask the confirmation sources this often while the answer is `Alive` or
    /// `Unknown` (default 2 s).
    pub confirm_retry: Duration,
    /// With an `Unknown` answer, fence once the host has been silent this long
    /// (default 3 s). A `Dead` answer fences at once.
    pub fence_on_unknown_after: Duration,
    /// Fence tries before giving up and alarming (default 3).
    pub max_fence_attempts: u32,
    /// Pause between fence (and force-down) tries (default 2 s).
    pub fence_retry_backoff: Duration,
    /// Opt-in: a silent host whose last heartbeat said its self-fence is armed, with a
    /// timeout `t`, counts as fenced once `t` plus this margin has passed since that
    /// heartbeat arrived (default `None`: off).
    pub self_fence_margin: Option<Duration>,
    /// Restart-in-place tries per resource in [`Config::restart_window`] (default 3).
    pub max_restarts_in_place: u32,
    /// The window for restart tries (default 10 min).
    pub restart_window: Duration,
    /// Evacuation tries per resource and incident before giving up (default 3).
    pub max_evacuate_attempts: u32,
    /// Pause before a failed restore (restart in place or evacuation) is tried again
    /// (default 1 s): a target that fails at once (its watchdog's stream reconnecting
    /// after a partition) gets time to recover instead of the tries being spent within
    /// milliseconds.
    pub restore_retry_backoff: Duration,
    /// A backstop for an edge that never answers: an action (fence, force-down,
    /// restore, unfence) not answered after this long is handed to its edge again under
    /// its key, and a libvirt evacuation (whose target the backend may have lost) is
    /// taken as not known, so the hosts are asked (default 15 min: longer than the
    /// edges' own default timeouts, so it does not fire while they keep their word).
    pub unanswered_after: Duration,
    /// Events about the same resource within this window belong to one incident: the
    /// first acts, later ones only enrich the timeline (default 5 s).
    pub correlation_window: Duration,
    /// A controller whose own lag (heartbeat wait from the kernel to the engine, or
    /// timer lateness) exceeds this is overloaded and raises
    /// [`super::AlarmKind::ControllerOverloaded`] (default 50 ms). Any lag, however
    /// small, extends the hosts' silence deadlines.
    pub overload_lag: Duration,
    /// The most a silence is excused by the controller's own lag and blind time
    /// (default 30 s): past it, a silent host is suspected however loaded the
    /// controller is (its confirmation and the gates still stand before a fence).
    pub max_overload_allowance: Duration,
    /// Safety gate: if more than this share of the (non-maintenance) hosts look dead at
    /// once, nothing is fenced and an alarm is raised (default 0.5).
    pub max_dead_share: f64,
    /// How the fence is asked for (default IPMI).
    pub fence_method: super::types::FenceMethod,
    /// Who restores VMs, named as the source of force-down and VM restore steps on the
    /// timeline (default Nova; the libvirt backend is `Libvirt`).
    pub vm_restorer: super::types::Source,
    /// Opt-in policy: a `Recovered` host that is heard again, holds no stale resource and
    /// whose compute service reports again is unfenced without an operator (default
    /// false: an operator runs `defibctl unfence`).
    pub auto_unfence: bool,
    /// Closed incidents kept in memory, for the API's incident list and late notes
    /// (default 1,000): without a bound a long-lived controller grows with every crash
    /// it has handled and copies every timeline into each snapshot. Older ones are
    /// forgotten with their intents, except one something still refers to (a host's
    /// last incident); the store keeps them all.
    pub closed_incidents_kept: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            detector: DetectorConfig::default(),
            tick: Duration::from_millis(50),
            confirm_after: Duration::from_millis(500),
            confirm_timeout: Duration::from_secs(2),
            confirm_retry: Duration::from_secs(2),
            fence_on_unknown_after: Duration::from_secs(3),
            max_fence_attempts: 3,
            fence_retry_backoff: Duration::from_secs(2),
            self_fence_margin: None,
            max_restarts_in_place: 3,
            restart_window: Duration::from_secs(600),
            max_evacuate_attempts: 3,
            restore_retry_backoff: Duration::from_secs(1),
            unanswered_after: Duration::from_secs(900),
            correlation_window: Duration::from_secs(5),
            overload_lag: Duration::from_millis(50),
            max_overload_allowance: Duration::from_secs(30),
            max_dead_share: 0.5,
            fence_method: super::types::FenceMethod::Ipmi,
            vm_restorer: super::types::Source::Nova,
            auto_unfence: false,
            closed_incidents_kept: 1000,
        }
    }
}
