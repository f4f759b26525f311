//! Between the monitor and the uplink: turns the monitor's events into protocol
//! event payloads and keeps the heartbeat's status summary.
use protocol::{EventPayload, VmInfo};
use tokio::sync::{mpsc, watch};

use super::status::{HostSummary, StatusTracker};
use crate::clock::{monotonic_ns, realtime_ns};
use crate::events::{LibvirtVm, WatchdogEvent};
use crate::monitor::{EventSink, StdoutSink};
use crate::procfs::VmIdentity;

/// An event on its way to the spool, where it gets its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    /// Wall clock when the watchdog observed it, unix ns.
    pub unix_ns: u64,
    /// Host monotonic clock when the watchdog observed it, ns.
    pub mono_ns: u64,
    /// What happened.
    pub payload: EventPayload,
}

/// Hands events to the uplink without ever waiting: the channel is unbounded because
/// the spool is the bound (it drops the oldest when full); the channel only holds what
/// arrived since the stream task last ran, moments ago.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: mpsc::UnboundedSender<PendingEvent>,
}

impl EventSender {
    pub(crate) fn new(tx: mpsc::UnboundedSender<PendingEvent>) -> Self {
        EventSender { tx }
    }

    /// Queues one event for the spool; false once the uplink has stopped.
    pub fn send(&self, event: PendingEvent) -> bool {
        self.tx.send(event).is_ok()
    }
}

/// The protocol event for a monitor event, stamped with when it was observed; `None`
/// for probe losses and libvirt connection changes, which travel in the heartbeat's
/// status instead (probe drop count, libvirt reachable).
///
/// The protocol has two libvirt kinds, `libvirt_lifecycle` and `inventory`. The
/// libvirt events that are not lifecycle events travel as `libvirt_lifecycle` with
/// their own `event` name: `io_error` (detail: the reason, e.g. `enospc`, or
/// `unknown`), `watchdog` (detail: the action, e.g. `reset`), `reboot`,
/// `block_threshold` (detail: the device) and `control_error` (detail empty).
///
/// `now_mono_ns`/`now_unix_ns` are one reading of both clocks, used to convert the
/// event's monotonic observation time to wall time.
pub fn pending_event(
    event: &WatchdogEvent,
    now_mono_ns: u64,
    now_unix_ns: u64,
) -> Option<PendingEvent> {
    let vm = |v: &VmIdentity| (v.uuid.clone(), v.name.clone());
    let (observed_ns, payload) = match event {
        WatchdogEvent::QemuStarted {
            pid,
            vm: v,
            observed_ns,
            ..
        } => {
            let (vm_uuid, vm_name) = vm(v);
            (
                *observed_ns,
                EventPayload::QemuStarted {
                    vm_uuid,
                    vm_name,
                    pid: *pid,
                },
            )
        }
        WatchdogEvent::QemuExited {
            pid,
            vm: v,
            exit_code,
            signal,
            oom_killed,
            killer,
            kernel_ns,
            observed_ns,
            ..
        } => {
            let (vm_uuid, vm_name) = vm(v);
            (
                *observed_ns,
                EventPayload::QemuExited {
                    vm_uuid,
                    vm_name,
                    pid: *pid,
                    exit_code: *exit_code,
                    signal: *signal,
                    killer_pid: killer.as_ref().map(|k| k.pid),
                    killer_comm: killer.as_ref().map(|k| k.comm.clone()),
                    by_hypervisor: killer
                        .as_ref()
                        .and_then(|k| k.process.as_deref())
                        .is_some_and(is_hypervisor_daemon),
                    oom_killed: *oom_killed,
                    kernel_ts_ns: *kernel_ns,
                },
            )
        }
        WatchdogEvent::DiskStallStarted {
            pid,
            vm: v,
            since_ns,
            stuck_ops,
            observed_ns,
            ..
        } => {
            let (vm_uuid, vm_name) = vm(v);
            let mut paths: Vec<String> = stuck_ops.iter().filter_map(|o| o.path.clone()).collect();
            paths.sort();
            paths.dedup();
            (
                *observed_ns,
                EventPayload::DiskStallStarted {
                    vm_uuid,
                    vm_name,
                    pid: *pid,
                    since_ns: *since_ns,
                    stuck_ops: u32::try_from(stuck_ops.len()).unwrap_or(u32::MAX),
                    paths,
                },
            )
        }
        WatchdogEvent::DiskStallEnded {
            pid,
            vm: v,
            duration_ms,
            observed_ns,
            ..
        } => {
            let (vm_uuid, vm_name) = vm(v);
            (
                *observed_ns,
                EventPayload::DiskStallEnded {
                    vm_uuid,
                    vm_name,
                    pid: *pid,
                    duration_ms: *duration_ms,
                },
            )
        }
        WatchdogEvent::ProbeLoss { .. }
        | WatchdogEvent::LibvirtConnected { .. }
        | WatchdogEvent::LibvirtDisconnected { .. } => return None,
        WatchdogEvent::LibvirtLifecycle {
            vm: v,
            event,
            detail,
            observed_ns,
            ..
        } => (*observed_ns, lifecycle(v, event, detail)),
        WatchdogEvent::LibvirtIoError {
            vm: v,
            reason,
            observed_ns,
            ..
        } => {
            let detail = if reason.is_empty() { "unknown" } else { reason };
            (*observed_ns, lifecycle(v, "io_error", detail))
        }
        WatchdogEvent::LibvirtWatchdog {
            vm: v,
            action,
            observed_ns,
            ..
        } => (*observed_ns, lifecycle(v, "watchdog", action)),
        WatchdogEvent::LibvirtReboot {
            vm: v, observed_ns, ..
        } => (*observed_ns, lifecycle(v, "reboot", "")),
        WatchdogEvent::LibvirtBlockThreshold {
            vm: v,
            dev,
            observed_ns,
            ..
        } => (*observed_ns, lifecycle(v, "block_threshold", dev)),
        WatchdogEvent::LibvirtControlError {
            vm: v, observed_ns, ..
        } => (*observed_ns, lifecycle(v, "control_error", "")),
        WatchdogEvent::LibvirtDefinition {
            vm: v,
            xml,
            observed_ns,
            ..
        } => (
            *observed_ns,
            EventPayload::DomainDefinition {
                vm_uuid: v.uuid.clone().unwrap_or_default(),
                vm_name: v.name.clone().unwrap_or_default(),
                xml: xml.clone(),
            },
        ),
        WatchdogEvent::LibvirtInventory {
            vms, observed_ns, ..
        } => (
            *observed_ns,
            EventPayload::Inventory {
                vms: vms.iter().map(vm_info).collect(),
            },
        ),
        WatchdogEvent::DiskLeases {
            daemon_pid,
            unprotected,
            reason,
            observed_ns,
            ..
        } => (
            *observed_ns,
            EventPayload::DiskLeases {
                daemon_pid: *daemon_pid,
                // Named as the inventory names them: the UUID, else the name.
                unprotected: unprotected
                    .iter()
                    .filter_map(|v| v.uuid.clone().or_else(|| v.name.clone()))
                    .collect(),
                reason: reason.clone(),
            },
        ),
    };
    let age_ns = now_mono_ns.saturating_sub(observed_ns);
    Some(PendingEvent {
        unix_ns: now_unix_ns.saturating_sub(age_ns),
        mono_ns: observed_ns,
        payload,
    })
}

/// The hypervisor's management daemons: a qemu they signal is being destroyed or shut
/// down on someone's order (libvirt's monolithic daemon, or its modular qemu driver).
pub const HYPERVISOR_DAEMONS: &[&str] = &["libvirtd", "virtqemud"];

/// Whether a process name is one of [`HYPERVISOR_DAEMONS`].
pub fn is_hypervisor_daemon(process: &str) -> bool {
    HYPERVISOR_DAEMONS.contains(&process)
}

fn lifecycle(v: &VmIdentity, event: &str, detail: &str) -> EventPayload {
    EventPayload::LibvirtLifecycle {
        vm_uuid: v.uuid.clone(),
        vm_name: v.name.clone(),
        event: event.to_string(),
        detail: detail.to_string(),
    }
}

/// One inventory entry: `disks` lists every disk's source and then its backing chain,
/// each path once, in order (a stall on a backing file names the VM too).
fn vm_info(v: &LibvirtVm) -> VmInfo {
    let mut disks: Vec<String> = Vec::new();
    for d in &v.disks {
        for path in d.source.iter().chain(&d.backing) {
            if !disks.contains(path) {
                disks.push(path.clone());
            }
        }
    }
    VmInfo {
        uuid: v.uuid.clone(),
        name: v.name.clone(),
        state: v.state.clone(),
        reason: v.reason.clone(),
        pid: v.pid,
        disks,
    }
}

/// The monitor's sink in the daemon: forwards every event to the uplink, keeps the
/// status summary for the heartbeats, and optionally prints events as JSON lines.
pub struct UplinkSink {
    events: EventSender,
    status: watch::Sender<HostSummary>,
    tracker: StatusTracker,
    print: Option<StdoutSink>,
    metrics: Option<std::sync::Arc<crate::metrics::WatchdogMetrics>>,
}

impl UplinkSink {
    /// A sink feeding `events` and `status`; with `print_json`, also prints each event
    /// to stdout as `defib-watchdog events --json` does.
    pub fn new(events: EventSender, status: watch::Sender<HostSummary>, print_json: bool) -> Self {
        UplinkSink {
            events,
            status,
            tracker: StatusTracker::default(),
            print: print_json.then_some(StdoutSink { json: true }),
            metrics: None,
        }
    }

    /// Also counts every event in `metrics`.
    pub fn with_metrics(
        mut self,
        metrics: std::sync::Arc<crate::metrics::WatchdogMetrics>,
    ) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl EventSink for UplinkSink {
    fn emit(&mut self, event: WatchdogEvent) {
        self.tracker.observe(&event);
        if let Some(metrics) = &self.metrics {
            metrics.observe(&event);
        }
        self.status
            .send_if_modified(|summary| self.tracker.apply_to(summary));
        if let Some(pending) = pending_event(&event, monotonic_ns(), realtime_ns()) {
            if !self.events.send(pending) {
                tracing::warn!("the uplink has stopped; event not reported to the controller");
            }
        }
        if let Some(print) = &mut self.print {
            print.emit(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Killer, StuckIo};
    use crate::probes::ProbeStats;

    fn vm() -> VmIdentity {
        VmIdentity {
            uuid: Some("6d1c0000-0000-0000-0000-000000000001".into()),
            name: Some("instance-0000002a".into()),
        }
    }

    #[test]
    fn a_qemu_exit_maps_to_the_protocol_event_with_killer_and_both_clocks() {
        let event = WatchdogEvent::QemuExited {
            pid: 42,
            comm: "qemu-system-x86".into(),
            vm: vm(),
            exit_code: None,
            signal: Some(9),
            signal_name: Some("SIGKILL"),
            core_dumped: false,
            oom_killed: true,
            killer: Some(Killer {
                pid: 1,
                comm: "systemd".into(),
                process: Some("systemd".into()),
                signal: 9,
                kernel_ns: 900,
            }),
            kernel_ns: 1_000,
            observed_ns: 2_000,
            unix_ms: 0,
        };
        let pending = pending_event(&event, 5_000, 1_000_000).unwrap();
        assert_eq!(pending.mono_ns, 2_000);
        assert_eq!(pending.unix_ns, 1_000_000 - 3_000);
        assert_eq!(
            pending.payload,
            EventPayload::QemuExited {
                vm_uuid: vm().uuid,
                vm_name: vm().name,
                pid: 42,
                exit_code: None,
                signal: Some(9),
                killer_pid: Some(1),
                killer_comm: Some("systemd".into()),
                by_hypervisor: false,
                oom_killed: true,
                kernel_ts_ns: 1_000,
            }
        );
    }

    #[test]
    fn a_qemu_signalled_by_libvirts_daemon_is_marked_as_the_hypervisors_doing() {
        let exit = |process: Option<&str>| WatchdogEvent::QemuExited {
            pid: 42,
            comm: "qemu-system-x86".into(),
            vm: vm(),
            exit_code: Some(0),
            signal: None,
            signal_name: None,
            core_dumped: false,
            oom_killed: false,
            killer: Some(Killer {
                pid: 7,
                // libvirtd's RPC worker thread sends the SIGTERM of a `virsh destroy`.
                comm: "prio-rpc-libvir".into(),
                process: process.map(str::to_string),
                signal: 15,
                kernel_ns: 900,
            }),
            kernel_ns: 1_000,
            observed_ns: 2_000,
            unix_ms: 0,
        };
        let by = |process| match pending_event(&exit(process), 5_000, 1_000_000)
            .unwrap()
            .payload
        {
            EventPayload::QemuExited { by_hypervisor, .. } => by_hypervisor,
            other => panic!("{other:?}"),
        };
        assert!(by(Some("libvirtd")));
        assert!(by(Some("virtqemud")));
        assert!(!by(Some("bash")));
        // The sender was gone before the exit was handled: not known to be libvirt.
        assert!(!by(None));
    }

    #[test]
    fn a_stall_maps_to_the_protocol_event_with_its_distinct_paths() {
        let op = |tid, path: &str| StuckIo {
            layer: "syscall",
            tid,
            syscall: "pwrite64",
            fd: 3,
            path: Some(path.into()),
            start_ns: 1,
        };
        let event = WatchdogEvent::DiskStallStarted {
            pid: 7,
            vm: VmIdentity::default(),
            since_ns: 10,
            threshold_ms: 1000,
            stuck_ops: vec![op(1, "/dev/loop0"), op(2, "/dev/loop0"), op(3, "/img")],
            observed_ns: 20,
            unix_ms: 0,
        };
        let pending = pending_event(&event, 20, 100).unwrap();
        assert_eq!(
            pending.payload,
            EventPayload::DiskStallStarted {
                vm_uuid: None,
                vm_name: None,
                pid: 7,
                since_ns: 10,
                stuck_ops: 3,
                paths: vec!["/dev/loop0".into(), "/img".into()],
            }
        );
    }

    #[test]
    fn libvirt_lifecycle_and_inventory_map_to_their_protocol_kinds() {
        let event = WatchdogEvent::LibvirtLifecycle {
            vm: vm(),
            event: "stopped".into(),
            detail: "failed".into(),
            source: "event",
            observed_ns: 10,
            unix_ms: 0,
        };
        assert_eq!(
            pending_event(&event, 10, 100).unwrap().payload,
            EventPayload::LibvirtLifecycle {
                vm_uuid: vm().uuid,
                vm_name: vm().name,
                event: "stopped".into(),
                detail: "failed".into(),
            }
        );
        let io = WatchdogEvent::LibvirtIoError {
            vm: vm(),
            src_path: "/img".into(),
            dev_alias: "virtio-disk0".into(),
            action: "pause".into(),
            reason: "enospc".into(),
            observed_ns: 10,
            unix_ms: 0,
        };
        assert!(matches!(
            pending_event(&io, 10, 100).unwrap().payload,
            EventPayload::LibvirtLifecycle { event, detail, .. } if event == "io_error" && detail == "enospc"
        ));
        let disk = |source: &str, backing: &[&str]| crate::events::LibvirtDisk {
            target: "vda".into(),
            device: "disk".into(),
            source: Some(source.into()),
            backing: backing.iter().map(|b| b.to_string()).collect(),
            readonly: false,
        };
        let inventory = WatchdogEvent::LibvirtInventory {
            vms: vec![LibvirtVm {
                uuid: "u1".into(),
                name: "guest".into(),
                state: "running".into(),
                reason: "booted".into(),
                pid: Some(42),
                disks: vec![disk("/a", &["/base"]), disk("/b", &["/base"])],
                definition: Some("<domain/>".into()),
            }],
            observed_ns: 10,
            unix_ms: 0,
        };
        assert_eq!(
            pending_event(&inventory, 10, 100).unwrap().payload,
            EventPayload::Inventory {
                vms: vec![VmInfo {
                    uuid: "u1".into(),
                    name: "guest".into(),
                    state: "running".into(),
                    reason: "booted".into(),
                    pid: Some(42),
                    disks: vec!["/a".into(), "/base".into(), "/b".into()],
                }]
            }
        );
    }

    #[test]
    fn libvirt_reachability_is_not_an_event_but_the_heartbeats_flag() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(HostSummary::default());
        let mut sink = UplinkSink::new(EventSender::new(tx), status_tx, false);
        sink.emit(WatchdogEvent::LibvirtConnected {
            uri: "test:///default".into(),
            observed_ns: 1,
            unix_ms: 0,
        });
        assert!(status_rx.borrow().libvirt_reachable);
        sink.emit(WatchdogEvent::LibvirtDisconnected {
            uri: "test:///default".into(),
            reason: "gone".into(),
            observed_ns: 2,
            unix_ms: 0,
        });
        assert!(!status_rx.borrow().libvirt_reachable);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn probe_losses_are_not_events_but_the_heartbeats_drop_count() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(HostSummary::default());
        let mut sink = UplinkSink::new(EventSender::new(tx), status_tx, false);
        sink.emit(WatchdogEvent::ProbeLoss {
            stats: ProbeStats {
                ringbuf_drops: 3,
                inflight_full: 1,
                watch_full: 0,
                block_inflight_full: 2,
                uring_inflight_full: 1,
                rbd_inflight_full: 2,
            },
            observed_ns: 1,
        });
        assert!(rx.try_recv().is_err());
        assert_eq!(status_rx.borrow().probe_drops, 9);
    }

    #[test]
    fn the_sink_counts_live_and_stalled_vms_from_the_events_it_forwards() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(HostSummary {
            libvirt_reachable: true,
            ..HostSummary::default()
        });
        let mut sink = UplinkSink::new(EventSender::new(tx), status_tx, false);
        let started = |pid| WatchdogEvent::QemuStarted {
            pid,
            comm: "qemu-kvm".into(),
            vm: VmIdentity::default(),
            source: "scan",
            kernel_ns: None,
            observed_ns: 1,
            unix_ms: 0,
        };
        sink.emit(started(1));
        sink.emit(started(2));
        sink.emit(WatchdogEvent::DiskStallStarted {
            pid: 2,
            vm: VmIdentity::default(),
            since_ns: 1,
            threshold_ms: 1000,
            stuck_ops: vec![],
            observed_ns: 2,
            unix_ms: 0,
        });
        let summary = *status_rx.borrow();
        assert_eq!((summary.vm_count, summary.stalled_vm_count), (2, 1));
        // Fields the monitor does not own are left alone.
        assert!(summary.libvirt_reachable);
        sink.emit(WatchdogEvent::QemuExited {
            pid: 2,
            comm: "qemu-kvm".into(),
            vm: VmIdentity::default(),
            exit_code: Some(0),
            signal: None,
            signal_name: None,
            core_dumped: false,
            oom_killed: false,
            killer: None,
            kernel_ns: 3,
            observed_ns: 3,
            unix_ms: 0,
        });
        let summary = *status_rx.borrow();
        assert_eq!((summary.vm_count, summary.stalled_vm_count), (1, 0));
        let forwarded: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(forwarded.len(), 4);
    }
}
