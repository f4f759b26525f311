//! The libvirt watcher against libvirt's in-process test driver (`test:///default`: no
//! daemon, a predefined running domain "test", define/start/destroy/undefine with
//! lifecycle events), and against a URI that cannot be reached.
//!
//! Tests in this file run in parallel and share the test driver's state (all
//! connections to `test:///default` in one process see the same domains), so each
//! test defines its own domains and only looks at events about them.
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use virt::connect::Connect;
use virt::domain::Domain;
use watchdog::events::{LibvirtVm, WatchdogEvent};
use watchdog::libvirt::{ffi, LibvirtSettings, LibvirtWatcher};
use watchdog::uplink::{HostSummary, StatusTracker};

const TEST_URI: &str = "test:///default";

fn settings(uri: &str, pid_dir: &std::path::Path) -> LibvirtSettings {
    LibvirtSettings {
        uri: uri.into(),
        inventory_interval: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(40),
        alive_check_interval: Duration::from_millis(200),
        pid_dir: pid_dir.into(),
        log_every: Duration::from_secs(60),
    }
}

fn domain_xml(name: &str, uuid: &str) -> String {
    format!(
        "<domain type='test'>
           <name>{name}</name>
           <uuid>{uuid}</uuid>
           <memory>8192</memory>
           <os><type>hvm</type></os>
           <devices>
             <disk type='file' device='disk'>
               <source file='/var/lib/nova/instances/{uuid}/disk'/>
               <target dev='vda' bus='virtio'/>
             </disk>
             <disk type='block' device='disk'>
               <source dev='/dev/mapper/{name}-vol'/>
               <target dev='vdb' bus='virtio'/>
             </disk>
           </devices>
         </domain>"
    )
}

/// The next event that `pick` accepts, within 10 s; others are skipped.
async fn next_matching<T>(
    rx: &mut UnboundedReceiver<WatchdogEvent>,
    what: &str,
    mut pick: impl FnMut(&WatchdogEvent) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => {
                if let Some(t) = pick(&event) {
                    return t;
                }
            }
            Ok(None) => panic!("the watcher stopped while waiting for {what}"),
            Err(_) => panic!("no {what} within 10 s"),
        }
    }
}

async fn inventory(rx: &mut UnboundedReceiver<WatchdogEvent>) -> Vec<LibvirtVm> {
    next_matching(rx, "an inventory", |e| match e {
        WatchdogEvent::LibvirtInventory { vms, .. } => Some(vms.clone()),
        _ => None,
    })
    .await
}

/// Connects a watcher and waits for its first inventory.
async fn connected_watcher(
    pid_dir: &std::path::Path,
) -> (LibvirtWatcher, UnboundedReceiver<WatchdogEvent>) {
    ffi::ensure_event_loop().unwrap();
    let (tx, mut rx) = unbounded_channel();
    let watcher = LibvirtWatcher::start(settings(TEST_URI, pid_dir), tx).unwrap();
    next_matching(&mut rx, "libvirt_connected", |e| {
        matches!(e, WatchdogEvent::LibvirtConnected { .. }).then_some(())
    })
    .await;
    inventory(&mut rx).await;
    (watcher, rx)
}

async fn stop(watcher: LibvirtWatcher) {
    let stopped = tokio::task::spawn_blocking(move || watcher.stop(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(stopped, "the watcher did not stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn define_start_destroy_and_undefine_arrive_as_typed_lifecycle_events_with_uuid_and_name() {
    let pid_dir = tempfile::tempdir().unwrap();
    let (watcher, mut rx) = connected_watcher(pid_dir.path()).await;

    let uuid = "0a5e0000-0000-4000-8000-00000000e001";
    let name = "defib-events";
    let mut conn = Connect::open(Some(TEST_URI)).unwrap();
    let dom = Domain::define_xml(&conn, &domain_xml(name, uuid)).unwrap();
    dom.create().unwrap();
    dom.destroy().unwrap();
    dom.undefine().unwrap();

    let mut seen = Vec::new();
    while seen.last().map(|(e, _): &(String, String)| e.as_str()) != Some("undefined") {
        let (event, detail) =
            next_matching(&mut rx, "a lifecycle event of the domain", |e| match e {
                WatchdogEvent::LibvirtLifecycle {
                    vm,
                    event,
                    detail,
                    source,
                    ..
                } if vm.uuid.as_deref() == Some(uuid) => {
                    assert_eq!(vm.name.as_deref(), Some(name));
                    assert_eq!(*source, "event");
                    Some((event.clone(), detail.clone()))
                }
                _ => None,
            })
            .await;
        seen.push((event, detail));
    }
    let seen: Vec<String> = seen.iter().map(|(e, d)| format!("{e}/{d}")).collect();
    assert_eq!(
        seen,
        [
            "defined/added",
            "started/booted",
            "stopped/destroyed",
            "undefined/removed"
        ]
    );
    drop(dom);
    conn.close().unwrap();
    stop(watcher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_lists_every_domain_with_its_state_pid_and_disks() {
    let pid_dir = tempfile::tempdir().unwrap();
    let (watcher, mut rx) = connected_watcher(pid_dir.path()).await;

    let mut conn = Connect::open(Some(TEST_URI)).unwrap();
    let (run_uuid, run_name) = ("0a5e0000-0000-4000-8000-00000000e002", "defib-inv-running");
    let (off_uuid, off_name) = ("0a5e0000-0000-4000-8000-00000000e003", "defib-inv-shutoff");
    // libvirt's qemu driver writes NAME.pid; the test driver does not, so the test does.
    std::fs::write(pid_dir.path().join(format!("{run_name}.pid")), "4242\n").unwrap();
    std::fs::write(pid_dir.path().join(format!("{off_name}.pid")), "4343\n").unwrap();
    let off = Domain::define_xml(&conn, &domain_xml(off_name, off_uuid)).unwrap();
    let running = Domain::define_xml(&conn, &domain_xml(run_name, run_uuid)).unwrap();
    running.create().unwrap();

    // Every lifecycle event is followed by a fresh list; wait for one that has both.
    let vms = loop {
        let vms = inventory(&mut rx).await;
        let state = |uuid: &str| vms.iter().find(|v| v.uuid == uuid).map(|v| v.state.clone());
        if state(run_uuid).as_deref() == Some("running") && state(off_uuid).is_some() {
            break vms;
        }
    };
    let find = |uuid: &str| vms.iter().find(|v| v.uuid == uuid).unwrap();
    let r = find(run_uuid);
    assert_eq!((r.name.as_str(), r.state.as_str()), (run_name, "running"));
    assert_eq!(r.pid, Some(4242));
    let sources: Vec<_> = r.disks.iter().map(|d| d.source.clone().unwrap()).collect();
    assert_eq!(
        sources,
        [
            format!("/var/lib/nova/instances/{run_uuid}/disk"),
            format!("/dev/mapper/{run_name}-vol")
        ]
    );
    assert_eq!(r.disks[0].target, "vda");
    let o = find(off_uuid);
    assert_eq!((o.name.as_str(), o.state.as_str()), (off_name, "shutoff"));
    assert_eq!(
        o.pid, None,
        "a shut-off domain has no qemu, whatever a stale pid file says"
    );
    // The test driver's own domain is there too, running.
    assert!(vms.iter().any(|v| v.name == "test" && v.state == "running"));

    running.destroy().unwrap();
    let vms = loop {
        let vms = inventory(&mut rx).await;
        if vms
            .iter()
            .any(|v| v.uuid == run_uuid && v.state == "shutoff")
        {
            break vms;
        }
    };
    let r = vms.iter().find(|v| v.uuid == run_uuid).unwrap();
    assert_eq!(r.reason, "destroyed");
    running.undefine().unwrap();
    off.undefine().unwrap();
    drop((running, off));
    conn.close().unwrap();
    stop(watcher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_libvirt_is_reported_once_in_the_heartbeat_status_and_retried_without_crashing(
) {
    ffi::ensure_event_loop().unwrap();
    let pid_dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = unbounded_channel();
    let uri = "qemu+unix:///system?socket=/nonexistent/defib-test/libvirt-sock";
    let watcher = LibvirtWatcher::start(settings(uri, pid_dir.path()), tx).unwrap();

    let reason = next_matching(&mut rx, "libvirt_disconnected", |e| match e {
        WatchdogEvent::LibvirtDisconnected { uri: u, reason, .. } => {
            assert_eq!(u, uri);
            Some(reason.clone())
        }
        _ => None,
    })
    .await;
    assert!(reason.contains("nonexistent"), "{reason}");

    // The heartbeat's status follows the watcher's events.
    let mut summary = HostSummary {
        libvirt_reachable: true,
        ..HostSummary::default()
    };
    let mut tracker = StatusTracker::default();
    tracker.observe(&WatchdogEvent::LibvirtDisconnected {
        uri: uri.into(),
        reason,
        observed_ns: 0,
        unix_ms: 0,
    });
    assert!(tracker.apply_to(&mut summary));
    assert!(!summary.libvirt_reachable);

    // It keeps retrying (every 10..40 ms here) without saying it again, and stops on
    // request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rx.try_recv().is_err(),
        "nothing more while still unreachable"
    );
    stop(watcher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_watcher_marks_libvirt_reachable_and_stops_cleanly() {
    let pid_dir = tempfile::tempdir().unwrap();
    ffi::ensure_event_loop().unwrap();
    let (tx, mut rx) = unbounded_channel();
    let watcher = LibvirtWatcher::start(settings(TEST_URI, pid_dir.path()), tx).unwrap();
    let first = next_matching(&mut rx, "a connection event", |e| match e {
        WatchdogEvent::LibvirtConnected { .. } | WatchdogEvent::LibvirtDisconnected { .. } => {
            Some(e.clone())
        }
        _ => None,
    })
    .await;
    let mut tracker = StatusTracker::default();
    tracker.observe(&first);
    let mut summary = HostSummary::default();
    tracker.apply_to(&mut summary);
    assert!(summary.libvirt_reachable, "{first:?}");
    stop(watcher).await;
}

#[test]
fn every_domain_event_subscription_and_the_close_callback_are_accepted_by_libvirt() {
    ffi::ensure_event_loop().unwrap();
    let mut conn = Connect::open_read_only(Some(TEST_URI)).unwrap();
    let (tx, _rx) = std::sync::mpsc::channel();
    let reg = ffi::register(&conn, &tx, 1);
    assert!(reg.refused.is_empty(), "{:?}", reg.refused);
    ffi::deregister(&conn, reg);
    conn.close().unwrap();
}
