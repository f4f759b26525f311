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
    /// The libvirt connection is up (again): callbacks registered, domains listed.
    LibvirtConnected {
        uri: String,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// libvirt cannot be reached: the connection closed or died, or opening it failed.
    /// Emitted once per change (not on every retry).
    LibvirtDisconnected {
        uri: String,
        reason: String,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// A domain lifecycle event (`VIR_DOMAIN_EVENT_ID_LIFECYCLE`), or a change found by
    /// comparing the domain lists before and after a reconnect (`source: "reconcile"`).
    /// `event` and `detail` are lowercase libvirt names: e.g. `stopped`/`failed`,
    /// `stopped`/`crashed`, `suspended`/`ioerror`, `crashed`/`panicked` (guest panic).
    LibvirtLifecycle {
        vm: VmIdentity,
        event: String,
        detail: String,
        /// `event` (a libvirt callback) or `reconcile` (inferred after a reconnect).
        source: &'static str,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// A disk I/O error (`VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON`).
    LibvirtIoError {
        vm: VmIdentity,
        /// The disk's source (image file or device).
        src_path: String,
        /// The disk's device alias (e.g. `virtio-disk0`).
        dev_alias: String,
        /// What qemu did: `none`, `pause`, `report`.
        action: String,
        /// e.g. `enospc`, `eio`, or empty.
        reason: String,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// The guest's watchdog device fired (`VIR_DOMAIN_EVENT_ID_WATCHDOG`).
    LibvirtWatchdog {
        vm: VmIdentity,
        /// `none`, `pause`, `reset`, `poweroff`, `shutdown`, `debug`, `inject-nmi`.
        action: String,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// The guest rebooted (`VIR_DOMAIN_EVENT_ID_REBOOT`).
    LibvirtReboot {
        vm: VmIdentity,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// A disk's write threshold was crossed (`VIR_DOMAIN_EVENT_ID_BLOCK_THRESHOLD`).
    LibvirtBlockThreshold {
        vm: VmIdentity,
        dev: String,
        path: String,
        threshold: u64,
        excess: u64,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// libvirt lost control of the domain's qemu (`VIR_DOMAIN_EVENT_ID_CONTROL_ERROR`,
    /// e.g. the monitor socket broke).
    LibvirtControlError {
        vm: VmIdentity,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// A persistent domain's definition (inactive XML, no secrets), first seen or changed.
    LibvirtDefinition {
        vm: VmIdentity,
        #[serde(skip)]
        xml: String,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// Every domain libvirt knows on this host, with its state, qemu pid and disks.
    LibvirtInventory {
        vms: Vec<LibvirtVm>,
        observed_ns: u64,
        unix_ms: u64,
    },
    /// The host's disk leases changed (`[disk_leases]`, leases.rs): its lease daemon
    /// exited or started, or the VMs running without their leases are others now.
    DiskLeases {
        /// The lease daemon's pid while it runs.
        daemon_pid: Option<u32>,
        /// Running VMs whose writable disks are not all locked by the running daemon.
        unprotected: Vec<VmIdentity>,
        reason: String,
        observed_ns: u64,
        unix_ms: u64,
    },
}

/// One domain in a [`WatchdogEvent::LibvirtInventory`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LibvirtVm {
    pub uuid: String,
    pub name: String,
    /// `nostate`, `running`, `blocked`, `paused`, `shutdown`, `shutoff`, `crashed`,
    /// `pmsuspended`.
    pub state: String,
    /// Why it is in that state, lowercase (`ioerror` for paused, `crashed`,
    /// `destroyed`, `failed`, `shutdown` for shutoff, `panicked` for crashed, ...).
    pub reason: String,
    /// The qemu pid (from libvirt's pid file), when the domain is active.
    pub pid: Option<u32>,
    pub disks: Vec<LibvirtDisk>,
    /// A persistent domain's inactive XML (without secrets), for the controller to start
    /// it elsewhere; sent once per change as [`WatchdogEvent::LibvirtDefinition`].
    #[serde(skip)]
    pub definition: Option<String>,
}

impl LibvirtVm {
    /// The domain has a qemu process (anything but shut off).
    pub fn is_active(&self) -> bool {
        self.state != "shutoff"
    }

    pub fn identity(&self) -> VmIdentity {
        VmIdentity {
            uuid: Some(self.uuid.clone()),
            name: Some(self.name.clone()),
        }
    }
}

/// One `<disk>` of a domain: its guest target, its source and the backing chain below.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LibvirtDisk {
    /// `<target dev=...>`, e.g. `vda`.
    pub target: String,
    /// `disk` or `cdrom` (`<disk device=...>`).
    pub device: String,
    /// The image file or block device (`<source file|dev|dir|volume=...>`, or
    /// `protocol:name` for a network disk); none for an empty cdrom.
    pub source: Option<String>,
    /// The backing chain, top first (`<backingStore><source .../>`), as libvirt knows it.
    pub backing: Vec<String>,
    /// `<readonly/>`: the guest cannot write it, and libvirt's lock manager leases it not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Killer {
    /// The sender's process id (thread group).
    pub pid: u32,
    /// The sending thread's name (e.g. `prio-rpc-libvir` for a libvirtd worker).
    pub comm: String,
    /// The sending process's name (its main thread's `comm`), read from /proc when the
    /// exit was handled; `None` if it had exited already.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    pub signal: i32,
    pub kernel_ns: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StuckIo {
    /// The qemu thread in the call (`syscall` layer); 0 for the other layers.
    pub tid: u32,
    /// Where it waits: `syscall` (a read/write/flush call of a qemu thread), `block` (a
    /// request on the VM's block device) or `io_uring` (a request on a qemu's ring).
    pub layer: &'static str,
    /// The operation: the syscall's name, `read`/`write` for a block request, the
    /// io_uring opcode's name.
    pub syscall: &'static str,
    pub fd: i64,
    /// What the file descriptor points to (image file or block device), if it could be read.
    pub path: Option<String>,
    pub start_ns: u64,
}

impl WatchdogEvent {
    /// Its kind, as the JSON `type` field names it (the `kind` label of
    /// `defib_watchdog_events_total`).
    pub fn kind(&self) -> &'static str {
        match self {
            WatchdogEvent::QemuStarted { .. } => "qemu_started",
            WatchdogEvent::QemuExited { .. } => "qemu_exited",
            WatchdogEvent::DiskStallStarted { .. } => "disk_stall_started",
            WatchdogEvent::DiskStallEnded { .. } => "disk_stall_ended",
            WatchdogEvent::ProbeLoss { .. } => "probe_loss",
            WatchdogEvent::LibvirtConnected { .. } => "libvirt_connected",
            WatchdogEvent::LibvirtDisconnected { .. } => "libvirt_disconnected",
            WatchdogEvent::LibvirtLifecycle { .. } => "libvirt_lifecycle",
            WatchdogEvent::LibvirtIoError { .. } => "libvirt_io_error",
            WatchdogEvent::LibvirtWatchdog { .. } => "libvirt_watchdog",
            WatchdogEvent::LibvirtReboot { .. } => "libvirt_reboot",
            WatchdogEvent::LibvirtBlockThreshold { .. } => "libvirt_block_threshold",
            WatchdogEvent::LibvirtControlError { .. } => "libvirt_control_error",
            WatchdogEvent::LibvirtDefinition { .. } => "libvirt_definition",
            WatchdogEvent::LibvirtInventory { .. } => "libvirt_inventory",
            WatchdogEvent::DiskLeases { .. } => "disk_leases",
        }
    }

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
                "LOSS      ring buffer drops {}, in-flight map full {}, watch map full {}, block map full {}, io_uring map full {}, rbd map full {}",
                stats.ringbuf_drops,
                stats.inflight_full,
                stats.watch_full,
                stats.block_inflight_full,
                stats.uring_inflight_full,
                stats.rbd_inflight_full
            ),
            Self::LibvirtConnected { uri, .. } => format!("libvirt   connected to {uri}"),
            Self::LibvirtDisconnected { uri, reason, .. } => {
                format!("libvirt   UNREACHABLE {uri}: {reason}")
            }
            Self::LibvirtLifecycle {
                vm: v,
                event,
                detail,
                source,
                ..
            } => {
                let inferred = if *source == "reconcile" {
                    " [found after reconnect]"
                } else {
                    ""
                };
                format!("libvirt   {} {event} ({detail}){inferred}", vm(v))
            }
            Self::LibvirtIoError {
                vm: v,
                src_path,
                action,
                reason,
                ..
            } => format!(
                "libvirt   {} I/O error on {src_path}: {reason} (action {action})",
                vm(v)
            ),
            Self::LibvirtWatchdog { vm: v, action, .. } => {
                format!("libvirt   {} guest watchdog fired (action {action})", vm(v))
            }
            Self::LibvirtReboot { vm: v, .. } => format!("libvirt   {} rebooted", vm(v)),
            Self::LibvirtBlockThreshold {
                vm: v,
                dev,
                threshold,
                excess,
                ..
            } => format!(
                "libvirt   {} disk {dev} crossed its threshold {threshold} by {excess} bytes",
                vm(v)
            ),
            Self::LibvirtControlError { vm: v, .. } => {
                format!("libvirt   {} lost control of its qemu", vm(v))
            }
            Self::LibvirtDefinition { vm: v, xml, .. } => {
                format!("libvirt   {} definition ({} bytes)", vm(v), xml.len())
            }
            Self::LibvirtInventory { vms, .. } => {
                let list: Vec<String> = vms
                    .iter()
                    .map(|d| match d.pid {
                        Some(pid) => format!("{} {} pid {pid}", d.name, d.state),
                        None => format!("{} {}", d.name, d.state),
                    })
                    .collect();
                format!("inventory {} domains: {}", vms.len(), list.join(", "))
            }
            Self::DiskLeases {
                daemon_pid,
                unprotected,
                reason,
                ..
            } => {
                let daemon = match daemon_pid {
                    Some(pid) => format!("daemon pid {pid}"),
                    None => "DAEMON DOWN".into(),
                };
                let list: Vec<String> = unprotected.iter().map(vm).collect();
                format!(
                    "leases    {daemon}, {} VMs unprotected{}{}: {reason}",
                    unprotected.len(),
                    if list.is_empty() { "" } else { " " },
                    list.join(", ")
                )
            }
        }
    }
}

pub fn signal_name(sig: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(sig)
        .ok()
        .map(|s| s.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_kind_is_its_json_type() {
        let vm = VmIdentity::default;
        let events = [
            WatchdogEvent::ProbeLoss {
                stats: ProbeStats::default(),
                observed_ns: 1,
            },
            WatchdogEvent::LibvirtConnected {
                uri: "qemu:///system".into(),
                observed_ns: 1,
                unix_ms: 1,
            },
            WatchdogEvent::LibvirtDisconnected {
                uri: "qemu:///system".into(),
                reason: "gone".into(),
                observed_ns: 1,
                unix_ms: 1,
            },
            WatchdogEvent::LibvirtReboot {
                vm: vm(),
                observed_ns: 1,
                unix_ms: 1,
            },
            WatchdogEvent::LibvirtControlError {
                vm: vm(),
                observed_ns: 1,
                unix_ms: 1,
            },
            WatchdogEvent::LibvirtInventory {
                vms: Vec::new(),
                observed_ns: 1,
                unix_ms: 1,
            },
            WatchdogEvent::DiskLeases {
                daemon_pid: None,
                unprotected: vec![vm()],
                reason: "virtlockd exited".into(),
                observed_ns: 1,
                unix_ms: 1,
            },
            WatchdogEvent::DiskStallEnded {
                pid: 1,
                vm: vm(),
                since_ns: 1,
                end_ns: 2,
                duration_ms: 1,
                observed_ns: 2,
                unix_ms: 1,
            },
            WatchdogEvent::LibvirtBlockThreshold {
                vm: vm(),
                dev: "vda".into(),
                path: "/x".into(),
                threshold: 1,
                excess: 1,
                observed_ns: 1,
                unix_ms: 1,
            },
        ];
        for e in events {
            let json = serde_json::to_value(&e).unwrap();
            assert_eq!(json["type"], e.kind(), "{json}");
        }
    }
}
