//! The libvirt watcher: one connection to libvirt (`qemu:///system` by default), kept
//! up across libvirtd restarts, that turns domain events into typed
//! [`WatchdogEvent`]s and lists the domains (state, qemu pid, disks) for the
//! inventory.
//!
//! ```text
//! libvirt-events thread (process-wide): virEventRunDefaultImpl ─► callbacks (ffi.rs)
//!        │ Raw, over a std channel
//!        ▼
//! libvirt-watcher thread: connect ─ register ─ list ─ wait ─ (lost) ─ back off ─ …
//!        │ WatchdogEvent, over a tokio unbounded channel
//!        ▼
//! Monitor (pid → VM map) ─► sink (stdout / uplink: spool, stream, heartbeat status)
//! ```
//!
//! The controller's commands (`StartDomain`, [`commands`]) open a short-lived
//! read-write connection of their own on a blocking thread; the watcher's connection
//! stays read-only.
//!
//! Everything the watcher does with libvirt happens on these two OS threads: a libvirt
//! call that blocks (a hung libvirtd) or fails never holds up the probes or the
//! heartbeats.
//! The heartbeats learn whether libvirt is reachable from the
//! [`WatchdogEvent::LibvirtConnected`] and [`WatchdogEvent::LibvirtDisconnected`]
//! events (see `uplink::status`).
pub mod commands;
pub mod ffi;
pub mod inventory;
pub mod names;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;

use crate::clock::{mono_to_unix_ms, monotonic_ns};
use crate::config::LibvirtConfig;
use crate::events::{LibvirtVm, WatchdogEvent};
use crate::uplink::Backoff;
use ffi::{Msg, Raw};

/// Keepalive: a probe every 5 s, the connection declared dead after 3 unanswered
/// (libvirt then closes it and the close callback fires).
pub const KEEPALIVE_INTERVAL_S: i32 = 5;
pub const KEEPALIVE_COUNT: u32 = 3;

/// What the watcher needs, resolved from the `[libvirt]` section.
#[derive(Debug, Clone)]
pub struct LibvirtSettings {
    pub uri: String,
    /// The domain list is taken again this often (and after every lifecycle event).
    pub inventory_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How often `virConnectIsAlive` is checked, for drivers without a close callback.
    pub alive_check_interval: Duration,
    /// Where the qemu driver writes `NAME.pid`.
    pub pid_dir: PathBuf,
    /// Same delay between repeated "still unreachable" warnings.
    pub log_every: Duration,
}

impl LibvirtSettings {
    pub fn from_config(cfg: &LibvirtConfig) -> Self {
        LibvirtSettings {
            uri: cfg.uri.clone(),
            inventory_interval: Duration::from_millis(cfg.inventory_interval_ms),
            reconnect_min: Duration::from_millis(cfg.reconnect_min_ms),
            reconnect_max: Duration::from_millis(cfg.reconnect_max_ms),
            alive_check_interval: Duration::from_secs(1),
            pid_dir: cfg.pid_dir.clone(),
            log_every: Duration::from_secs(60),
        }
    }
}

/// The running watcher (its thread). Dropping it asks the thread to stop.
pub struct LibvirtWatcher {
    tx: Sender<Msg>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl LibvirtWatcher {
    /// Starts the watcher thread; events go to `out`. Fails only if the thread cannot
    /// be spawned: an unreachable libvirt is reported as events and retried forever.
    pub fn start(
        settings: LibvirtSettings,
        out: UnboundedSender<WatchdogEvent>,
    ) -> anyhow::Result<Self> {
        // Commands from the controller (StartDomain) act on the libvirt watched here.
        commands::set_target(Some(commands::StartSettings {
            uri: settings.uri.clone(),
            pid_dir: settings.pid_dir.clone(),
            proc_root: PathBuf::from("/proc"),
            wait_for_stop: commands::WAIT_FOR_STOP,
        }));
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let thread_tx = tx.clone();
        let thread = std::thread::Builder::new()
            .name("libvirt-watcher".into())
            .spawn(move || {
                Watcher::new(settings, out, rx, thread_tx).run();
                let _ = done_tx.send(());
            })
            .map_err(|e| anyhow::anyhow!("starting the libvirt watcher thread: {e}"))?;
        Ok(LibvirtWatcher {
            tx,
            done,
            thread: Some(thread),
        })
    }

    /// Asks the thread to deregister, close the connection and stop, and waits up to
    /// `wait` for it (a libvirt call stuck on a hung libvirtd is not waited for: the
    /// thread is left to finish on its own). True if it stopped in time.
    pub fn stop(mut self, wait: Duration) -> bool {
        let _ = self.tx.send(Msg::Stop);
        let stopped = self.done.recv_timeout(wait).is_ok();
        if stopped {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        stopped
    }
}

impl Drop for LibvirtWatcher {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

/// How a connection ended.
enum Ended {
    Stop,
    Lost(String),
}

/// Logs "still unreachable" at most once per `every`, or when the reason changes.
struct LogLimiter {
    every_ns: u64,
    last_ns: Option<u64>,
    last_reason: String,
    suppressed: u64,
}

impl LogLimiter {
    fn new(every: Duration) -> Self {
        LogLimiter {
            every_ns: u64::try_from(every.as_nanos()).unwrap_or(u64::MAX),
            last_ns: None,
            last_reason: String::new(),
            suppressed: 0,
        }
    }

    fn unreachable(&mut self, uri: &str, reason: &str) {
        let now = monotonic_ns();
        let due = self
            .last_ns
            .is_none_or(|t| now.saturating_sub(t) >= self.every_ns);
        if due || reason != self.last_reason {
            tracing::warn!(
                uri,
                reason,
                failed_attempts_not_logged = self.suppressed,
                "libvirt is unreachable; retrying"
            );
            self.last_ns = Some(now);
            self.last_reason = reason.to_string();
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    fn reset(&mut self) {
        self.last_ns = None;
        self.last_reason.clear();
        self.suppressed = 0;
    }
}

struct Watcher {
    settings: LibvirtSettings,
    out: UnboundedSender<WatchdogEvent>,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    /// Numbers the connections, so a late callback of an old one is ignored.
    generation: u64,
    backoff: Backoff,
    /// The last domain list, kept across a disconnect to find what changed meanwhile.
    last_inventory: Option<Vec<LibvirtVm>>,
    /// The definition last sent for each domain (UUID → XML): sent again only when it
    /// changes. Kept across reconnects; the watchdog's event spool keeps what was sent.
    sent_definitions: HashMap<String, String>,
    /// What the last connection event said (none yet: the first failure is reported).
    reachable: Option<bool>,
    log: LogLimiter,
}

impl Watcher {
    fn new(
        settings: LibvirtSettings,
        out: UnboundedSender<WatchdogEvent>,
        rx: Receiver<Msg>,
        tx: Sender<Msg>,
    ) -> Self {
        Watcher {
            backoff: Backoff::new(settings.reconnect_min, settings.reconnect_max),
            log: LogLimiter::new(settings.log_every),
            settings,
            out,
            rx,
            tx,
            generation: 0,
            last_inventory: None,
            sent_definitions: HashMap::new(),
            reachable: None,
        }
    }

    fn emit(&self, event: WatchdogEvent) {
        // The monitor has stopped: the watcher is being stopped too.
        let _ = self.out.send(event);
    }

    fn run(mut self) {
        if let Err(e) = ffi::ensure_event_loop() {
            // Without the event loop there are no events: report libvirt unreachable
            // for good, and wait to be stopped.
            tracing::error!(error = %e, "libvirt watcher cannot start");
            self.unreachable(e);
            while !matches!(self.rx.recv(), Ok(Msg::Stop) | Err(_)) {}
            return;
        }
        tracing::info!(uri = %self.settings.uri, "libvirt watcher starting");
        loop {
            match self.connect() {
                Ok(conn) => {
                    self.backoff.reset();
                    match self.connected(conn) {
                        Ended::Stop => return,
                        Ended::Lost(reason) => self.unreachable(reason),
                    }
                }
                Err(reason) => self.unreachable(reason),
            }
            let delay = self.backoff.next_delay();
            if self.wait_for_stop(delay) {
                return;
            }
        }
    }

    fn connect(&self) -> Result<Connect, String> {
        // Read-only: the watchdog only watches; it needs no write access to libvirt.
        Connect::open_read_only(Some(&self.settings.uri))
            .map_err(|e| format!("cannot connect to {}: {}", self.settings.uri, e.message()))
    }

    /// Sleeps `delay`, unless told to stop first (true then). Callbacks of a closed
    /// connection that arrive meanwhile are dropped.
    fn wait_for_stop(&self, delay: Duration) -> bool {
        let deadline = monotonic_ns().saturating_add(nanos(delay));
        loop {
            let left = deadline.saturating_sub(monotonic_ns());
            if left == 0 {
                return false;
            }
            match self.rx.recv_timeout(Duration::from_nanos(left)) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return true,
                Ok(Msg::Event { .. }) => {}
                Err(RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    fn unreachable(&mut self, reason: String) {
        if self.reachable != Some(false) {
            self.reachable = Some(false);
            tracing::warn!(uri = %self.settings.uri, %reason, "libvirt is unreachable");
            let observed_ns = monotonic_ns();
            self.emit(WatchdogEvent::LibvirtDisconnected {
                uri: self.settings.uri.clone(),
                reason: reason.clone(),
                observed_ns,
                unix_ms: mono_to_unix_ms(observed_ns),
            });
            // The first failure is logged above; the limiter takes the next ones.
            self.log.reset();
            self.log.last_ns = Some(observed_ns);
            self.log.last_reason = reason;
        } else {
            self.log.unreachable(&self.settings.uri, &reason);
        }
    }

    /// Runs one connection until it is lost or the watcher is stopped.
    fn connected(&mut self, mut conn: Connect) -> Ended {
        self.generation += 1;
        let generation = self.generation;
        if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
            tracing::debug!(error = %e, "libvirt keepalive not available on this connection");
        }
        let reg = ffi::register(&conn, &self.tx, generation);
        for (what, why) in &reg.refused {
            tracing::info!(uri = %self.settings.uri, subscription = what, reason = %why,
                "libvirt refused a subscription on this connection");
        }
        let ended = self.watch(&conn, generation);
        ffi::deregister(&conn, reg);
        if let Err(e) = conn.close() {
            tracing::debug!(error = %e, "closing the libvirt connection");
        }
        ended
    }

    fn watch(&mut self, conn: &Connect, generation: u64) -> Ended {
        // Callbacks first, then the list: a change after the list is an event, a
        // change before it is in the list.
        let vms = match take_inventory(conn, &self.settings) {
            Ok(vms) => vms,
            Err(e) => return Ended::Lost(format!("listing domains: {e}")),
        };
        self.reachable = Some(true);
        self.log.reset();
        tracing::info!(uri = %self.settings.uri, domains = vms.len(), "libvirt connected");
        let observed_ns = monotonic_ns();
        self.emit(WatchdogEvent::LibvirtConnected {
            uri: self.settings.uri.clone(),
            observed_ns,
            unix_ms: mono_to_unix_ms(observed_ns),
        });
        if let Some(before) = &self.last_inventory {
            for (vm, event, detail) in inventory::changes_while_away(before, &vms) {
                tracing::info!(?vm, %event, %detail, "domain changed while libvirt was unreachable");
                self.emit(WatchdogEvent::LibvirtLifecycle {
                    vm,
                    event,
                    detail,
                    source: "reconcile",
                    observed_ns,
                    unix_ms: mono_to_unix_ms(observed_ns),
                });
            }
        }
        self.send_inventory(vms);

        let now = monotonic_ns();
        let mut next_inventory = now.saturating_add(nanos(self.settings.inventory_interval));
        let mut next_check = now.saturating_add(nanos(self.settings.alive_check_interval));
        loop {
            let wait = next_inventory
                .min(next_check)
                .saturating_sub(monotonic_ns());
            let mut inventory_due = false;
            let mut first = match self.rx.recv_timeout(Duration::from_nanos(wait)) {
                Ok(msg) => Some(msg),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ended::Stop,
            };
            // Everything that is already there, then one domain list for all of it.
            while let Some(msg) = first.take().or_else(|| self.rx.try_recv().ok()) {
                match msg {
                    Msg::Stop => return Ended::Stop,
                    Msg::Event { generation: g, .. } if g != generation => {}
                    Msg::Event {
                        raw: Raw::Closed { reason },
                        ..
                    } => {
                        return Ended::Lost(format!(
                            "connection closed: {}",
                            names::close_reason(reason)
                        ))
                    }
                    Msg::Event { raw, .. } => {
                        inventory_due |= matches!(raw, Raw::Lifecycle { .. });
                        let observed_ns = monotonic_ns();
                        if let Some(event) = typed(raw, observed_ns) {
                            tracing::debug!(?event, "libvirt event");
                            // Before the controller hears of it (and may ask for a
                            // restart): what a restart of this domain must undo.
                            note_for_commands(&event);
                            self.emit(event);
                        }
                    }
                }
            }
            let now = monotonic_ns();
            if now >= next_check {
                next_check = now.saturating_add(nanos(self.settings.alive_check_interval));
                match conn.is_alive() {
                    Ok(true) => {}
                    Ok(false) => return Ended::Lost("connection is no longer alive".into()),
                    Err(e) => return Ended::Lost(format!("connection check failed: {e}")),
                }
            }
            if inventory_due || now >= next_inventory {
                next_inventory = now.saturating_add(nanos(self.settings.inventory_interval));
                match take_inventory(conn, &self.settings) {
                    Ok(vms) => self.send_inventory(vms),
                    Err(e) => return Ended::Lost(format!("listing domains: {e}")),
                }
            }
        }
    }

    fn send_inventory(&mut self, vms: Vec<LibvirtVm>) {
        // Definitions first: a controller that learns of a domain can start it elsewhere.
        for vm in &vms {
            let Some(xml) = &vm.definition else { continue };
            if self.sent_definitions.get(&vm.uuid) == Some(xml) {
                continue;
            }
            self.sent_definitions.insert(vm.uuid.clone(), xml.clone());
            let observed_ns = monotonic_ns();
            self.emit(WatchdogEvent::LibvirtDefinition {
                vm: vm.identity(),
                xml: xml.clone(),
                observed_ns,
                unix_ms: mono_to_unix_ms(observed_ns),
            });
        }
        let observed_ns = monotonic_ns();
        self.last_inventory = Some(vms.clone());
        self.emit(WatchdogEvent::LibvirtInventory {
            vms,
            observed_ns,
            unix_ms: mono_to_unix_ms(observed_ns),
        });
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Every domain, sorted by name: UUID, name, state and its reason, qemu pid (active
/// domains), disks from the XML. A domain that disappears while it is being read is
/// left out (it will be in the next list, or its undefine event comes).
fn take_inventory(
    conn: &Connect,
    settings: &LibvirtSettings,
) -> Result<Vec<LibvirtVm>, virt::error::Error> {
    let mut vms = Vec::new();
    for dom in conn.list_all_domains(0)? {
        let (Ok(uuid), Ok(name), Ok((state, reason))) =
            (dom.get_uuid_string(), dom.get_name(), dom.get_state())
        else {
            continue;
        };
        let (state, reason) = names::state(state, reason);
        // The persistent definition, to start the domain elsewhere (no secrets: the
        // controller keeps it, and VIR_DOMAIN_XML_SECURE is not asked for).
        let definition = if dom.is_persistent().unwrap_or(false) {
            dom.get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE).ok()
        } else {
            None
        };
        let disks = match dom.get_xml_desc(0) {
            Ok(xml) => inventory::parse_disks(&xml).unwrap_or_else(|e| {
                tracing::warn!(domain = %name, error = %e, "unreadable domain XML; disks unknown");
                Vec::new()
            }),
            Err(_) => continue,
        };
        let mut vm = LibvirtVm {
            uuid: uuid.to_ascii_lowercase(),
            name,
            state,
            reason,
            pid: None,
            disks,
            definition,
        };
        if vm.is_active() {
            vm.pid = inventory::read_pid(&settings.pid_dir, &vm.name);
        }
        vms.push(vm);
    }
    vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
    Ok(vms)
}

/// Tells the command side which domains hang (their guest watchdog fired, action other
/// than `reset`) and which started again.
fn note_for_commands(event: &WatchdogEvent) {
    let ids = |vm: &crate::procfs::VmIdentity| {
        (
            vm.uuid.clone().unwrap_or_default(),
            vm.name.clone().unwrap_or_default(),
        )
    };
    match event {
        WatchdogEvent::LibvirtWatchdog { vm, action, .. } if action != "reset" => {
            let (uuid, name) = ids(vm);
            commands::note_hung(&uuid, &name);
        }
        WatchdogEvent::LibvirtLifecycle { vm, event, .. } if event == "started" => {
            let (uuid, name) = ids(vm);
            commands::note_started(&uuid, &name);
        }
        _ => {}
    }
}

/// The typed event for a callback's record (none for a connection close, which the
/// watcher handles itself).
pub fn typed(raw: Raw, observed_ns: u64) -> Option<WatchdogEvent> {
    let unix_ms = mono_to_unix_ms(observed_ns);
    Some(match raw {
        Raw::Lifecycle { vm, event, detail } => {
            let (event, detail) = names::lifecycle(event, detail);
            WatchdogEvent::LibvirtLifecycle {
                vm,
                event,
                detail,
                source: "event",
                observed_ns,
                unix_ms,
            }
        }
        Raw::IoError {
            vm,
            src_path,
            dev_alias,
            action,
            reason,
        } => WatchdogEvent::LibvirtIoError {
            vm,
            src_path,
            dev_alias,
            action: names::io_error_action(action),
            reason,
            observed_ns,
            unix_ms,
        },
        Raw::Watchdog { vm, action } => WatchdogEvent::LibvirtWatchdog {
            vm,
            action: names::watchdog_action(action),
            observed_ns,
            unix_ms,
        },
        Raw::Reboot { vm } => WatchdogEvent::LibvirtReboot {
            vm,
            observed_ns,
            unix_ms,
        },
        Raw::BlockThreshold {
            vm,
            dev,
            path,
            threshold,
            excess,
        } => WatchdogEvent::LibvirtBlockThreshold {
            vm,
            dev,
            path,
            threshold,
            excess,
            observed_ns,
            unix_ms,
        },
        Raw::ControlError { vm } => WatchdogEvent::LibvirtControlError {
            vm,
            observed_ns,
            unix_ms,
        },
        Raw::Closed { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::VmIdentity;

    fn vm() -> VmIdentity {
        VmIdentity {
            uuid: Some("6d1c0000-0000-0000-0000-000000000001".into()),
            name: Some("instance-0000002a".into()),
        }
    }

    #[test]
    fn a_guest_panic_reads_as_crashed_panicked() {
        let event = typed(
            Raw::Lifecycle {
                vm: vm(),
                event: 8,
                detail: 0,
            },
            5,
        )
        .unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "libvirt_lifecycle");
        assert_eq!(json["event"], "crashed");
        assert_eq!(json["detail"], "panicked");
        assert_eq!(json["source"], "event");
        assert_eq!(json["vm"]["name"], "instance-0000002a");
    }

    #[test]
    fn io_errors_and_watchdog_actions_get_their_names() {
        let io = typed(
            Raw::IoError {
                vm: vm(),
                src_path: "/img".into(),
                dev_alias: "virtio-disk0".into(),
                action: 1,
                reason: "enospc".into(),
            },
            1,
        )
        .unwrap();
        assert!(
            matches!(io, WatchdogEvent::LibvirtIoError { ref action, ref reason, .. }
            if action == "pause" && reason == "enospc")
        );
        let wd = typed(
            Raw::Watchdog {
                vm: vm(),
                action: 3,
            },
            1,
        )
        .unwrap();
        assert!(
            matches!(wd, WatchdogEvent::LibvirtWatchdog { ref action, .. } if action == "poweroff")
        );
        assert_eq!(typed(Raw::Closed { reason: 1 }, 1), None);
    }

    #[test]
    fn repeated_failures_are_logged_once_a_minute_unless_the_reason_changes() {
        let mut log = LogLimiter::new(Duration::from_secs(60));
        log.unreachable("test:///x", "refused");
        log.unreachable("test:///x", "refused");
        log.unreachable("test:///x", "refused");
        assert_eq!(log.suppressed, 2);
        log.unreachable("test:///x", "no such socket");
        assert_eq!(log.suppressed, 0);
    }
}
