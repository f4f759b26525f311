//! Wire facts into engine inputs: a heartbeat the intake judged authentic, and the
//! watchdogs' events (eBPF and libvirt accounts, inventories), with the host's own clock
//! kept as a [`HostTime`].
use protocol::EventPayload;

use super::intake::HeartbeatSeen;
use crate::engine::{
    Heartbeat, HostEvent, HostId, HostTime, ListedAt, PathId, Resource, Source, Timestamp,
};

/// The engine's heartbeat from one the intake accepted. Its send time is the host's
/// clock; liveness is judged by the engine's receive time.
pub fn heartbeat(hb: HeartbeatSeen, received: Timestamp) -> Heartbeat {
    let boot = u64::from_be_bytes(hb.boot_id.0[..8].try_into().unwrap_or([0; 8]));
    Heartbeat {
        host: HostId::new(hb.host),
        path: PathId(u16::from(hb.path)),
        boot_id: boot,
        incarnation: hb.incarnation,
        at: HostTime(hb.sent_unix_ns / 1_000_000),
        received: Some(received),
        // Only "armed" (never an older watchdog's unproven flag) with the host's own
        // timeout: see `protocol::SelfFence`.
        self_fence: hb
            .status
            .self_fence
            .armed_timeout_ms()
            .map(|ms| std::time::Duration::from_millis(u64::from(ms))),
    }
}

/// libvirt's shut-off reasons that are someone's decision (`virDomainShutoffReason`).
fn stopped_on_purpose(reason: &str) -> bool {
    matches!(
        reason,
        "shutdown" | "destroyed" | "migrated" | "saved" | "from_snapshot"
    )
}

/// The engine's view of a watchdog event (None: timeline-less kinds).
pub fn host_event(payload: &EventPayload, unix_ns: u64) -> Option<HostEvent> {
    // The watchdog's stamp: the host's clock.
    let at = HostTime(unix_ns / 1_000_000);
    let vm = |uuid: &Option<String>, name: &Option<String>| {
        uuid.clone().or_else(|| name.clone()).map(Resource::vm)
    };
    match payload {
        EventPayload::QemuExited {
            vm_uuid,
            vm_name,
            pid,
            exit_code,
            signal,
            killer_pid,
            killer_comm,
            by_hypervisor,
            oom_killed,
            ..
        } => {
            // libvirt ended this qemu itself (a destroy, a shutdown, a hard reboot): its
            // lifecycle event says whether that was a failure ("stopped (crashed)") or
            // someone's decision ("stopped (destroyed)"). The kernel's account stays in
            // the event table.
            if *by_hypervisor {
                return None;
            }
            let resource = vm(vm_uuid, vm_name)?;
            let mut reason = match (signal, exit_code) {
                (Some(s), _) => format!("qemu pid {pid} killed by signal {s}"),
                (None, Some(c)) => format!("qemu pid {pid} exited with code {c}"),
                (None, None) => format!("qemu pid {pid} exited"),
            };
            if let Some(k) = killer_pid {
                reason.push_str(&format!(
                    " from pid {k} ({})",
                    killer_comm.as_deref().unwrap_or("?")
                ));
            }
            if *oom_killed {
                reason.push_str(" [OOM]");
            }
            Some(HostEvent::ResourceExited {
                resource,
                source: Source::Ebpf,
                at,
                reason,
            })
        }
        EventPayload::DiskStallStarted {
            vm_uuid, vm_name, ..
        } => Some(HostEvent::DiskStallStarted {
            resource: vm(vm_uuid, vm_name),
            at,
        }),
        EventPayload::DiskStallEnded {
            vm_uuid, vm_name, ..
        } => Some(HostEvent::DiskStallEnded {
            resource: vm(vm_uuid, vm_name),
            at,
        }),
        EventPayload::LibvirtLifecycle {
            vm_uuid,
            vm_name,
            event,
            detail,
        } => {
            // A destroy or an undefine is someone's decision (Nova's stop or its
            // clean-up of an evacuated domain, an operator), not a crash: the engine
            // notes it only where it ends a copy that was moved away.
            let removed = match (event.as_str(), detail.as_str()) {
                ("stopped", "destroyed") => Some("destroyed"),
                ("undefined", _) => Some("undefined"),
                _ => None,
            };
            if let Some(what) = removed {
                return Some(HostEvent::ResourceRemoved {
                    resource: vm(vm_uuid, vm_name)?,
                    what: what.into(),
                    at,
                });
            }
            // Otherwise failures only: a shutdown is someone's decision too. They stay
            // in the event table.
            let reason = match event.as_str() {
                "stopped" if matches!(detail.as_str(), "failed" | "crashed") => {
                    format!("libvirt: {event} ({detail})")
                }
                "crashed" => format!("libvirt: {event} ({detail})"),
                // The guest stopped petting its watchdog device: it hangs. With `reset`
                // qemu has rebooted it already; with any other action (pause, none,
                // poweroff, shutdown, dump, inject-nmi) it stays hung or off until
                // someone restarts it.
                "watchdog" if detail != "reset" => format!(
                    "libvirt: guest watchdog fired (action {detail}): the guest stopped responding"
                ),
                _ => return None,
            };
            Some(HostEvent::ResourceExited {
                resource: vm(vm_uuid, vm_name)?,
                source: Source::Libvirt,
                at,
                reason,
            })
        }
        EventPayload::Inventory { vms } => {
            let id = |v: &protocol::VmInfo| {
                Resource::vm(if v.uuid.is_empty() {
                    v.name.clone()
                } else {
                    v.uuid.clone()
                })
            };
            Some(HostEvent::Inventory {
                // What runs on the host: a defined but shut-off domain does not.
                resources: vms
                    .iter()
                    .filter(|v| {
                        matches!(
                            v.state.as_str(),
                            "running" | "paused" | "blocked" | "in shutdown"
                        )
                    })
                    .map(id)
                    .collect(),
                // Shut off on someone's decision: not running, and not failed either
                // (a domain shut off because it crashed or failed is neither listed here
                // nor running: the engine counts it as an exit).
                stopped: vms
                    .iter()
                    .filter(|v| v.state == "shutoff" && stopped_on_purpose(&v.reason))
                    .map(id)
                    .collect(),
                // Every disk source an RBD image (the watchdog names those `rbd:`): what
                // a Ceph blocklist alone stops from writing. No disk known, no claim.
                rbd_only: vms
                    .iter()
                    .filter(|v| {
                        !v.disks.is_empty() && v.disks.iter().all(|d| d.starts_with("rbd:"))
                    })
                    .map(id)
                    .collect(),
                // The watchdog takes its inventory from libvirt.
                source: Source::Libvirt,
                at: ListedAt::Host(at),
            })
        }
        EventPayload::DiskLeases {
            daemon_pid,
            unprotected,
            reason,
        } => Some(HostEvent::DiskLeases {
            daemon_running: daemon_pid.is_some(),
            unprotected: unprotected.iter().cloned().map(Resource::vm).collect(),
            reason: reason.clone(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(event: &str, detail: &str) -> EventPayload {
        EventPayload::LibvirtLifecycle {
            vm_uuid: Some("u-1".into()),
            vm_name: Some("web".into()),
            event: event.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn a_libvirt_destroy_or_undefine_is_a_removal_and_never_an_exit() {
        for (event, detail, what) in [
            ("stopped", "destroyed", "destroyed"),
            ("undefined", "removed", "undefined"),
        ] {
            match host_event(&lifecycle(event, detail), 3_000_000) {
                Some(HostEvent::ResourceRemoved {
                    resource,
                    what: said,
                    at,
                }) => {
                    assert_eq!(resource, Resource::vm("u-1"));
                    assert_eq!(said, what);
                    assert_eq!(at, HostTime(3));
                }
                other => panic!("{event} {detail}: {other:?}"),
            }
        }
        // A shutdown (the guest's own or Nova's stop) is neither.
        assert_eq!(host_event(&lifecycle("stopped", "shutdown"), 0), None);
    }

    #[test]
    fn a_libvirt_stopped_failed_is_a_vm_exit_seen_by_libvirt() {
        match host_event(&lifecycle("stopped", "failed"), 2_000_000) {
            Some(HostEvent::ResourceExited {
                resource,
                source,
                at,
                reason,
            }) => {
                assert_eq!(resource, Resource::vm("u-1"));
                assert_eq!(source, Source::Libvirt);
                assert_eq!(at, HostTime(2));
                assert!(reason.contains("stopped (failed)"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(host_event(&lifecycle("crashed", "panicked"), 0).is_some());
    }

    #[test]
    fn a_disk_leases_word_says_whether_the_daemon_runs_and_names_the_unprotected_vms() {
        let p = EventPayload::DiskLeases {
            daemon_pid: None,
            unprotected: vec!["u-1".into()],
            reason: "virtlockd pid 8 killed by SIGKILL".into(),
        };
        assert_eq!(
            host_event(&p, 0),
            Some(HostEvent::DiskLeases {
                daemon_running: false,
                unprotected: vec![Resource::vm("u-1")],
                reason: "virtlockd pid 8 killed by SIGKILL".into(),
            })
        );
        let p = EventPayload::DiskLeases {
            daemon_pid: Some(9),
            unprotected: vec![],
            reason: String::new(),
        };
        assert!(matches!(
            host_event(&p, 0),
            Some(HostEvent::DiskLeases {
                daemon_running: true,
                ..
            })
        ));
    }

    #[test]
    fn a_shutdown_or_destroy_by_someone_is_not_a_failure() {
        assert_eq!(host_event(&lifecycle("stopped", "shutdown"), 0), None);
        // A destroy is a removal (a_libvirt_destroy_or_undefine_is_a_removal…), no exit.
        assert!(!matches!(
            host_event(&lifecycle("stopped", "destroyed"), 0),
            Some(HostEvent::ResourceExited { .. })
        ));
        assert_eq!(host_event(&lifecycle("started", "booted"), 0), None);
    }

    #[test]
    fn an_inventory_counts_only_active_domains_as_running_and_names_those_shut_off_on_purpose() {
        let vm = |uuid: &str, state: &str, reason: &str| protocol::VmInfo {
            uuid: uuid.into(),
            name: uuid.into(),
            state: state.into(),
            reason: reason.into(),
            pid: None,
            disks: vec![],
        };
        let p = EventPayload::Inventory {
            vms: vec![
                vm("a", "running", "booted"),
                vm("b", "shutoff", "destroyed"),
                vm("c", "paused", "watchdog"),
                vm("d", "shutoff", "crashed"),
                vm("e", "shutoff", "shutdown"),
            ],
        };
        match host_event(&p, 0) {
            Some(HostEvent::Inventory {
                resources, stopped, ..
            }) => {
                assert_eq!(resources, vec![Resource::vm("a"), Resource::vm("c")]);
                // A crashed domain is neither running nor stopped on purpose.
                assert_eq!(stopped, vec![Resource::vm("b"), Resource::vm("e")]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_guest_watchdog_that_leaves_the_guest_hung_is_a_failure_but_a_reset_is_not() {
        for action in [
            "pause",
            "none",
            "poweroff",
            "shutdown",
            "dump",
            "inject-nmi",
        ] {
            match host_event(&lifecycle("watchdog", action), 0) {
                Some(HostEvent::ResourceExited { source, reason, .. }) => {
                    assert_eq!(source, Source::Libvirt);
                    assert!(reason.contains("guest watchdog fired"), "{reason}");
                    assert!(reason.contains(action), "{reason}");
                }
                other => panic!("{action}: {other:?}"),
            }
        }
        assert_eq!(host_event(&lifecycle("watchdog", "reset"), 0), None);
    }

    #[test]
    fn a_qemu_ended_by_libvirts_daemon_waits_for_libvirts_own_account() {
        let p = EventPayload::QemuExited {
            vm_uuid: Some("u-1".into()),
            vm_name: None,
            pid: 42,
            exit_code: Some(0),
            signal: None,
            killer_pid: Some(7),
            killer_comm: Some("prio-rpc-libvir".into()),
            by_hypervisor: true,
            oom_killed: false,
            kernel_ts_ns: 0,
        };
        assert_eq!(host_event(&p, 0), None);
    }

    #[test]
    fn io_errors_reboots_block_thresholds_and_control_errors_are_not_exits() {
        for event in ["io_error", "reboot", "block_threshold", "control_error"] {
            assert_eq!(host_event(&lifecycle(event, "x"), 0), None, "{event}");
        }
    }

    #[test]
    fn an_ebpf_exit_names_signal_and_killer() {
        let p = EventPayload::QemuExited {
            vm_uuid: Some("u-1".into()),
            vm_name: None,
            pid: 42,
            exit_code: None,
            signal: Some(9),
            killer_pid: Some(7),
            killer_comm: Some("virsh".into()),
            by_hypervisor: false,
            oom_killed: false,
            kernel_ts_ns: 0,
        };
        match host_event(&p, 0) {
            Some(HostEvent::ResourceExited { reason, source, .. }) => {
                assert_eq!(source, Source::Ebpf);
                assert_eq!(reason, "qemu pid 42 killed by signal 9 from pid 7 (virsh)");
            }
            other => panic!("{other:?}"),
        }
    }
}
