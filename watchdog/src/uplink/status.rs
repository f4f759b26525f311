//! The host status summary every heartbeat carries, and how it is kept from the
//! monitor's own events.
use std::collections::HashSet;

use crate::events::WatchdogEvent;
use crate::probes::ProbeStats;

/// What the heartbeats report about the host, apart from isolation (which the uplink
/// knows itself). Shared through a `tokio::sync::watch` channel: each producer
/// updates only its own fields (`send_modify`), so a later libvirt watcher can set
/// `libvirt_reachable` without touching the monitor's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostSummary {
    /// Reported qemu processes (VMs) alive now: with `libvirt.only_own_domains`, only
    /// those this host's libvirt runs.
    pub vm_count: u32,
    /// Of those, how many have a disk stall in progress.
    pub stalled_vm_count: u32,
    /// The libvirt watcher's connection is up (set from its `libvirt_connected` and
    /// `libvirt_disconnected` events; false until it first connects, and always
    /// false when the watcher is disabled).
    pub libvirt_reachable: bool,
    /// Probe losses since the watchdog started: ring buffer drops plus in-flight and
    /// watch map overflows, since any of them means the controller's view may be
    /// missing something.
    pub probe_drops: u64,
    /// The self-fence: off, armed with its timeout, or not armed and why (set by the
    /// self-fence task, see `selffence`).
    pub self_fence: protocol::SelfFence,
}

/// Derives the monitor's part of [`HostSummary`] from the events it emits.
///
/// The monitor emits `qemu_started` exactly when it starts reporting a process (at once,
/// or with `libvirt.only_own_domains` once this host's libvirt lists it running, see
/// `reporting`), `qemu_exited` when a reported process exits, and ends a process's stall
/// (`disk_stall_ended`) before reporting its exit, so following the events counts the
/// qemus this host reports, without reaching into the monitor's tables.
#[derive(Debug, Default)]
pub struct StatusTracker {
    alive: HashSet<u32>,
    stalled: HashSet<u32>,
    probe_drops: u64,
    /// None until the libvirt watcher says something: the field is left alone then.
    libvirt_reachable: Option<bool>,
}

impl StatusTracker {
    /// Takes one event into account.
    pub fn observe(&mut self, event: &WatchdogEvent) {
        match event {
            WatchdogEvent::QemuStarted { pid, .. } => {
                self.alive.insert(*pid);
            }
            WatchdogEvent::QemuExited { pid, .. } => {
                self.alive.remove(pid);
                self.stalled.remove(pid);
            }
            WatchdogEvent::DiskStallStarted { pid, .. } => {
                self.stalled.insert(*pid);
            }
            WatchdogEvent::DiskStallEnded { pid, .. } => {
                self.stalled.remove(pid);
            }
            WatchdogEvent::ProbeLoss { stats, .. } => {
                let ProbeStats {
                    ringbuf_drops,
                    inflight_full,
                    watch_full,
                    block_inflight_full,
                    uring_inflight_full,
                    rbd_inflight_full,
                } = *stats;
                // The probe counters are cumulative, so the latest report is the total.
                self.probe_drops = ringbuf_drops
                    .saturating_add(inflight_full)
                    .saturating_add(watch_full)
                    .saturating_add(block_inflight_full)
                    .saturating_add(uring_inflight_full)
                    .saturating_add(rbd_inflight_full);
            }
            WatchdogEvent::LibvirtConnected { .. } => self.libvirt_reachable = Some(true),
            WatchdogEvent::LibvirtDisconnected { .. } => self.libvirt_reachable = Some(false),
            WatchdogEvent::LibvirtLifecycle { .. }
            | WatchdogEvent::LibvirtIoError { .. }
            | WatchdogEvent::LibvirtWatchdog { .. }
            | WatchdogEvent::LibvirtReboot { .. }
            | WatchdogEvent::LibvirtBlockThreshold { .. }
            | WatchdogEvent::LibvirtControlError { .. }
            | WatchdogEvent::LibvirtDefinition { .. }
            | WatchdogEvent::LibvirtInventory { .. }
            | WatchdogEvent::DiskLeases { .. } => {}
        }
    }

    /// Writes the tracked fields into `summary`; true if anything changed.
    pub fn apply_to(&self, summary: &mut HostSummary) -> bool {
        let before = *summary;
        summary.vm_count = u32::try_from(self.alive.len()).unwrap_or(u32::MAX);
        summary.stalled_vm_count = u32::try_from(self.stalled.len()).unwrap_or(u32::MAX);
        summary.probe_drops = self.probe_drops;
        if let Some(reachable) = self.libvirt_reachable {
            summary.libvirt_reachable = reachable;
        }
        *summary != before
    }
}
