//! Typed events: what the watchdog reports about qemu processes. `defib-watchdog events
//! --json` prints them one JSON object a line; the controller stream carries the same.
//!
//! Times: `kernel_ns` and `observed_ns` are CLOCK_MONOTONIC nanoseconds (the probe's
//! stamp and the moment the daemon decoded it, on the same clock, so their difference is
//! the delivery latency); `unix_ms` is wall-clock time for people.
use serde::Serialize;

use crate::probes::ProbeStats;
use crate::procfs::VmIdentity;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchdogEvent {
    /// A watched process appeared: exec'd (`source: "exec"`) or found by the /proc scan.
    QemuStarted {
        pid: u32,
        comm: String,
        vm: VmIdentity,
        source: &'static str,
        kernel_ns: Option<u64>,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// The last thread of a watched process exited.
    QemuExited {
        pid: u32,
        comm: String,
        vm: VmIdentity,
        /// `exit_group` code, when it exited by itself.
        exit_code: Option<i32>,
        /// The signal that killed it, when one did.
        signal: Option<i32>,
        signal_name: Option<&'static str>,
        core_dumped: bool,
        oom_killed: bool,
        /// The last process that sent it a terminating signal.
        killer: Option<Killer>,
        kernel_ns: u64,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// A VM's disk I/O has been in flight longer than the threshold; it is still stuck.
    DiskStallStarted {
        pid: u32,
        vm: VmIdentity,
        /// When the oldest stuck call was entered (CLOCK_MONOTONIC ns).
        since_ns: u64,
        threshold_ms: u64,
        stuck_ops: Vec<StuckIo>,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// The stall is over (every stuck call returned, or the process died).
    DiskStallEnded {
        pid: u32,
        vm: VmIdentity,
        since_ns: u64,
        end_ns: u64,
        duration_ms: u64,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// The probes' counters moved: records lost (ring buffer full) or maps full.
    ProbeLoss { stats: ProbeStats, observed_ns: u64 },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Killer {
    pub pid: u32,
    pub comm: String,
    pub signal: i32,
    pub kernel_ns: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StuckIo {
    pub tid: u32,
    pub syscall: &'static str,
    pub fd: i64,
    /// What the file descriptor points to (image file or block device), if it could be read.
    pub path: Option<String>,
    pub start_ns: u64,
}

impl WatchdogEvent {
    /// One line for people (the default output of `defib-watchdog events`).
    pub fn human(&self) -> String {
        let vm = |v: &VmIdentity| match (&v.name, &v.uuid) {
            (Some(n), Some(u)) => format!("{n} ({u})"),
            (Some(n), None) => n.clone(),
            (None, Some(u)) => u.clone(),
            (None, None) => "unknown VM".into(),
        };
        match self {
            Self::QemuStarted {
                pid, vm: v, source, ..
            } => {
                format!("started   pid {pid} {} [{source}]", vm(v))
            }
            Self::QemuExited {
                pid,
                vm: v,
                exit_code,
                signal_name,
                oom_killed,
                killer,
                ..
            } => {
                let how = match (exit_code, signal_name) {
                    (_, Some(s)) => format!("killed by {s}"),
                    (Some(c), None) => format!("exited with code {c}"),
                    (None, None) => "exited".into(),
                };
                let by = killer
                    .as_ref()
                    .map(|k| format!(" from pid {} ({})", k.pid, k.comm))
                    .unwrap_or_default();
                let oom = if *oom_killed { " [OOM]" } else { "" };
                format!("exited    pid {pid} {} {how}{by}{oom}", vm(v))
            }
            Self::DiskStallStarted {
                pid,
                vm: v,
                stuck_ops,
                ..
            } => {
                let paths: Vec<_> = stuck_ops
                    .iter()
                    .map(|o| format!("{} {}", o.syscall, o.path.as_deref().unwrap_or("?")))
                    .collect();
                format!(
                    "stalled   pid {pid} {} disk I/O stuck: {}",
                    vm(v),
                    paths.join(", ")
                )
            }
            Self::DiskStallEnded {
                pid,
                vm: v,
                duration_ms,
                ..
            } => {
                format!("unstalled pid {pid} {} after {duration_ms} ms", vm(v))
            }
            Self::ProbeLoss { stats, .. } => format!(
                "LOSS      ring buffer drops {}, in-flight map full {}, watch map full {}",
                stats.ringbuf_drops, stats.inflight_full, stats.watch_full
            ),
        }
    }
}

pub fn signal_name(sig: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(sig)
        .ok()
        .map(|s| s.as_str())
}
