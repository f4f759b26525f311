//! Commands from the controller that act on this host's libvirt: `StartDomain` (restart
//! a crashed domain in place), `StartFromDefinition` (start a fenced host's domain here)
//! and `QueryDomain` (does a domain run here: asked when an evacuation's answer was
//! lost), for the controller's libvirt backend; `DestroyDomain` (a stale copy of a
//! domain the controller moved off this host, e.g. started by libvirt's autostart when
//! the host came back: destroyed, its autostart turned off, its definition kept), for
//! every backend.
//!
//! The watcher's own connection stays read-only: each command opens a short-lived
//! connection to the watcher's URI (read-write to start, read-only to query), on a
//! blocking thread ([`tokio::task::spawn_blocking`]), so a hung libvirtd holds up neither
//! the stream nor the probes. Errors never stop anything: they are the command's failed
//! result.
//!
//! Commands for one domain run one after the other, in the order they arrived (their
//! place is taken when [`execute`] is called, before anything is awaited); commands for
//! different domains run at once. A `QueryDomain` thus answers only after every earlier
//! command for its domain has finished, so a query sent after a slow
//! `StartFromDefinition` (whose answer the controller lost) sees the start's result, not
//! the domain half-started. Per domain rather than one queue for all: an evacuation
//! starts many domains on one host at once, and one slow start (a hook, a big guest)
//! must not hold up the others. The order holds across the watchdog's connections (a
//! controller that restarted asks on a new one) but not across watchdog restarts (a
//! start handed to libvirtd by a watchdog that then died goes on in libvirtd; libvirt
//! reports the domain active from the moment it begins starting it, which is what a
//! query reads).
//!
//! "Runs" means libvirt reports the domain active, in any state: running, paused, shut
//! down in progress, and being started (during `virDomainCreate` libvirt marks it active
//! and "paused (starting up)" before it launches qemu, and while its `prepare` hook runs
//! a query waits for the domain's lock). Not defined here, or defined and shut off:
//! "not running". libvirt unreachable: the query fails (the controller could not tell).
//! The answer's exact form is [`protocol::frame::query_domain_detail`].
//!
//! Only a crash is undone: a domain shut off on purpose (destroyed, shut down by its
//! guest, saved, migrated, reverted to a snapshot) is not started; the command fails
//! with the reason. The kernel sees an operator's `virsh destroy` as a qemu killed by
//! libvirtd like any other exit, so the controller does ask.
//!
//! A hung guest is undone too: a domain whose guest watchdog fired (any action but
//! `reset`, which qemu carries out itself) or that libvirt reports crashed or paused by
//! a panic or a watchdog is still active, with a live qemu; `StartDomain` then destroys
//! it and starts it again. The watcher records each watchdog firing it sees
//! ([`note_hung`]) and forgets it when the domain starts ([`note_started`]), because a
//! watchdog with action `none` leaves the domain in a state that looks like any
//! running one.
//!
//! Which URI: the one the libvirt watcher of this process was started with
//! ([`set_target`], called by [`super::LibvirtWatcher::start`]). Without a watcher
//! (`libvirt.enabled = false`) every command fails with the reason.
//!
//! `StartDomain` right after a qemu was killed: the kernel's account (eBPF) reaches the
//! controller, and the command reaches the watchdog, before libvirt has noticed the death
//! (it does ~0.2 s later, when qemu's monitor socket closes); until then libvirt still
//! says the domain is active and `virDomainCreate` would fail with "domain is already
//! running". So an active domain is judged by its qemu process (its pid file): alive →
//! "already running", ok (a resent command is harmless); gone (or no pid file yet) → wait,
//! looking again every [`POLL`], until libvirt reports the domain shut off, then start
//! it; still active after [`StartSettings::wait_for_stop`] → failed if its qemu is gone,
//! ok ("already running") if libvirt names no pid file for it at all. (On libvirt 9.0
//! the first state query already answers "shut off": libvirtd answers it once it has
//! handled the death; the wait is the safeguard for one that answers earlier.)
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use protocol::frame::{query_domain_detail, HostCommand};
use tokio::sync::oneshot;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use crate::clock::monotonic_ns;

/// How often an active domain whose qemu is gone is looked at again.
pub const POLL: Duration = Duration::from_millis(50);
/// How long libvirt may take to notice a qemu's death before `StartDomain` gives up.
pub const WAIT_FOR_STOP: Duration = Duration::from_secs(3);

/// Where commands go: libvirt's URI, and where its qemu driver writes `NAME.pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartSettings {
    pub uri: String,
    pub pid_dir: PathBuf,
    pub proc_root: PathBuf,
    pub wait_for_stop: Duration,
}

static TARGET: Mutex<Option<StartSettings>> = Mutex::new(None);

/// Domains (UUID, and name) whose guest watchdog fired since they last started.
static HUNG: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The guest of this domain stopped petting its watchdog and was left hung: a restart
/// must destroy it first.
pub fn note_hung(uuid: &str, name: &str) {
    let mut hung = HUNG.lock().unwrap_or_else(|e| e.into_inner());
    if !hung.iter().any(|(u, n)| u == uuid && n == name) {
        hung.push((uuid.to_string(), name.to_string()));
    }
}

/// The domain started (again): whatever hung before is gone.
pub fn note_started(uuid: &str, name: &str) {
    let mut hung = HUNG.lock().unwrap_or_else(|e| e.into_inner());
    hung.retain(|(u, n)| !same_domain((u, n), uuid, name));
}

fn noted_hung(uuid: &str, name: &str) -> bool {
    HUNG.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(u, n)| same_domain((u, n), uuid, name))
}

/// The same domain: same UUID, or same name (either may be unknown, i.e. empty).
fn same_domain((u, n): (&str, &str), uuid: &str, name: &str) -> bool {
    (!uuid.is_empty() && u == uuid) || (!name.is_empty() && n == name)
}

/// Why an active domain must be destroyed before it can run again, if it must: its
/// guest watchdog fired, or libvirt reports it crashed, or paused by a panic or by its
/// watchdog.
fn hung_reason(dom: &Domain, name: &str) -> Option<String> {
    let uuid = dom.get_uuid_string().unwrap_or_default();
    if noted_hung(&uuid, name) {
        return Some("its guest watchdog fired".into());
    }
    let (state, reason) = dom.get_state().ok()?;
    let reason_u = u32::try_from(reason).ok()?;
    let stuck = state == virt::sys::VIR_DOMAIN_CRASHED
        || (state == virt::sys::VIR_DOMAIN_PAUSED
            && matches!(
                reason_u,
                virt::sys::VIR_DOMAIN_PAUSED_WATCHDOG | virt::sys::VIR_DOMAIN_PAUSED_CRASHED
            ));
    stuck.then(|| {
        let (s, r) = super::names::state(state, reason);
        format!("libvirt reports it {s} ({r})")
    })
}

/// Commands go to this libvirt from now on (None: commands fail, no libvirt here).
pub fn set_target(target: Option<StartSettings>) {
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = target;
}

/// Where commands go, if anywhere.
pub fn target() -> Option<StartSettings> {
    TARGET.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The domain a command is about (its queue's key, see the module docs), if any.
fn domain_of(command: &HostCommand) -> Option<String> {
    match command {
        HostCommand::StartDomain { vm_uuid }
        | HostCommand::StartFromDefinition { vm_uuid, .. }
        | HostCommand::QueryDomain { vm_uuid }
        | HostCommand::DestroyDomain { vm_uuid } => Some(vm_uuid.to_ascii_lowercase()),
        HostCommand::Unknown => None,
    }
}

/// For each domain with commands queued or running: the newest command's number and
/// what its successor waits on (closed when that command has finished).
static QUEUES: Mutex<Vec<(String, u64, oneshot::Receiver<()>)>> = Mutex::new(Vec::new());
static NEXT_TURN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A command's place in its domain's queue: it may run once `before` is closed, and its
/// successor may once this is dropped.
struct Turn {
    domain: String,
    number: u64,
    before: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
}

impl Turn {
    /// Takes the next place in `domain`'s queue (synchronously: the order of calls is
    /// the order of running).
    fn take(domain: String) -> Turn {
        let number = NEXT_TURN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, after) = oneshot::channel();
        let mut queues = QUEUES.lock().unwrap_or_else(|e| e.into_inner());
        let before = match queues.iter().position(|(d, _, _)| *d == domain) {
            Some(i) => {
                let (_, _, prev) =
                    std::mem::replace(&mut queues[i], (domain.clone(), number, after));
                Some(prev)
            }
            None => {
                queues.push((domain.clone(), number, after));
                None
            }
        };
        Turn {
            domain,
            number,
            before,
            _done: done,
        }
    }

    /// Waits until every earlier command for the domain has finished.
    async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // Closed (never sent on) when the earlier command's turn is dropped.
            let _ = before.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Last in its queue: the queue goes (nobody waits on it).
        let mut queues = QUEUES.lock().unwrap_or_else(|e| e.into_inner());
        queues.retain(|(d, n, _)| !(*d == self.domain && *n == self.number));
    }
}

/// Carries out one command from the controller; `(ok, detail)` for its result. Takes
/// the command's place in its domain's queue when called (see the module docs), then
/// runs it on its own task, which goes on if the returned future is dropped. Never
/// panics and never blocks the async runtime. Must be called within a tokio runtime.
pub fn execute(command: HostCommand) -> impl Future<Output = (bool, String)> {
    let settings = target();
    let turn = settings
        .as_ref()
        .and_then(|_| domain_of(&command))
        .map(Turn::take);
    let job = tokio::spawn(async move {
        let Some(settings) = settings else {
            return (
                false,
                "this watchdog does not watch libvirt (libvirt.enabled = false)".into(),
            );
        };
        let mut turn = turn;
        if let Some(t) = turn.as_mut() {
            t.wait().await;
        }
        let job = tokio::task::spawn_blocking(move || run(&settings, command));
        let result = match job.await {
            Ok(Ok(detail)) => (true, detail),
            Ok(Err(reason)) => (false, reason),
            Err(e) => (false, format!("the command failed: {e}")),
        };
        // Only now may the domain's next command run.
        drop(turn);
        result
    });
    async move {
        job.await
            .unwrap_or_else(|e| (false, format!("the command failed: {e}")))
    }
}

/// One command, on a blocking thread.
fn run(settings: &StartSettings, command: HostCommand) -> Result<String, String> {
    match command {
        HostCommand::StartDomain { vm_uuid } => start_domain(settings, &vm_uuid),
        HostCommand::StartFromDefinition { vm_uuid, xml } => {
            start_from_definition(settings, &vm_uuid, &xml)
        }
        HostCommand::QueryDomain { vm_uuid } => query_domain(settings, &vm_uuid),
        HostCommand::DestroyDomain { vm_uuid } => destroy_domain(settings, &vm_uuid),
        HostCommand::Unknown => Err("a command this watchdog does not know".into()),
    }
}

/// Whether domain `vm` (UUID) runs here: the `detail` of an ok answer
/// ([`query_domain_detail`]), or why it cannot tell. Blocking.
pub fn query_domain(settings: &StartSettings, vm: &str) -> Result<String, String> {
    let uri = &settings.uri;
    let mut conn = Connect::open_read_only(Some(uri))
        .map_err(|e| format!("cannot connect to {uri}: {}", e.message()))?;
    let result = match Domain::lookup_by_uuid_string(&conn, vm) {
        Ok(dom) => match (dom.is_active(), dom.get_state()) {
            (Ok(active), Ok((state, reason))) => {
                let (s, r) = super::names::state(state, reason);
                Ok(query_domain_detail(active, &format!("{s} ({r})")))
            }
            (Err(e), _) | (_, Err(e)) => Err(format!("reading the state of {vm}: {}", e.message())),
        },
        Err(e) if e.code() == ErrorNumber::NoDomain => {
            Ok(query_domain_detail(false, "not defined here"))
        }
        Err(e) => Err(format!("looking up {vm}: {}", e.message())),
    };
    if let Err(e) = conn.close() {
        tracing::debug!(error = %e, "closing the query's libvirt connection");
    }
    result
}

/// Starts the defined domain `vm` (UUID, or name) unless it already runs; what was done,
/// or why not. Blocking.
pub fn start_domain(settings: &StartSettings, vm: &str) -> Result<String, String> {
    let uri = &settings.uri;
    let mut conn = Connect::open(Some(uri))
        .map_err(|e| format!("cannot connect to {uri} read-write: {}", e.message()))?;
    let result = match Domain::lookup_by_uuid_string(&conn, vm)
        .or_else(|_| Domain::lookup_by_name(&conn, vm))
    {
        Ok(dom) => start_on(settings, &dom, vm, Restart::InPlace),
        Err(e) => Err(format!(
            "no domain {vm} defined in {uri} (a transient domain is gone once its qemu \
             died): {}",
            e.message()
        )),
    };
    if let Err(e) = conn.close() {
        tracing::debug!(error = %e, "closing the command's libvirt connection");
    }
    result
}

/// Destroys the stale copy `vm` (UUID, or name) if it is active and turns its autostart
/// off; never undefines it. What was done; a domain not defined here, or not running, is
/// ok ("not running"). Blocking.
pub fn destroy_domain(settings: &StartSettings, vm: &str) -> Result<String, String> {
    let uri = &settings.uri;
    let mut conn = Connect::open(Some(uri))
        .map_err(|e| format!("cannot connect to {uri} read-write: {}", e.message()))?;
    let result = match Domain::lookup_by_uuid_string(&conn, vm)
        .or_else(|_| Domain::lookup_by_name(&conn, vm))
    {
        Ok(dom) => destroy_copy(settings, &dom, vm),
        Err(_) => Ok(format!("not running: no domain {vm} is defined in {uri}")),
    };
    if let Err(e) = conn.close() {
        tracing::debug!(error = %e, "closing the command's libvirt connection");
    }
    result
}

fn destroy_copy(settings: &StartSettings, dom: &Domain, vm: &str) -> Result<String, String> {
    let name = dom.get_name().unwrap_or_else(|_| vm.to_string());
    let active = dom
        .is_active()
        .map_err(|e| format!("reading the state of {name}: {}", e.message()))?;
    // Destroyed first: a copy that runs on is the harm, an autostart only a later one.
    let done = if active {
        let pid = super::inventory::read_pid(&settings.pid_dir, &name);
        match dom.destroy() {
            Ok(()) => {
                tracing::warn!(domain = %name, ?pid, "destroyed a stale copy the controller moved off this host");
                match pid {
                    Some(pid) => format!("destroyed {name} (qemu pid {pid})"),
                    None => format!("destroyed {name}"),
                }
            }
            // It stopped meanwhile (its qemu died, someone destroyed it): nothing runs.
            Err(e) if !dom.is_active().unwrap_or(true) => {
                format!(
                    "not running: {name} stopped as it was destroyed ({})",
                    e.message()
                )
            }
            Err(e) => return Err(format!("destroying {name}: {}", e.message())),
        }
    } else {
        format!("not running: {name} is shut off")
    };
    // A transient domain has no autostart (and refuses the call).
    let autostart = match dom.get_autostart() {
        Ok(false) => "autostart was off".to_string(),
        Ok(true) => match dom.set_autostart(false) {
            Ok(_) => "autostart turned off".to_string(),
            Err(e) => {
                return Err(format!(
                    "{done}, but its autostart could not be turned off: {}",
                    e.message()
                ))
            }
        },
        Err(e) => format!("autostart unknown ({})", e.message()),
    };
    Ok(format!("{done}; {autostart}"))
}

/// Whether `pid` is a live process (not a zombie) whose command line does not name
/// another domain than `name`.
fn qemu_alive(proc_root: &Path, pid: u32, name: &str) -> bool {
    let Some(args) = crate::procfs::read_args(proc_root, pid) else {
        return false;
    };
    if crate::procfs::is_zombie(proc_root, pid) {
        return false;
    }
    let id = crate::procfs::vm_identity_from_args(&args);
    id.name.as_deref().is_none_or(|n| n == name)
}

/// Starts a domain evacuated from a fenced host: checks that the definition is the
/// domain's and that every disk it names is here (shared storage), defines it (or
/// updates the definition of a domain already defined here), then starts it. Blocking.
pub fn start_from_definition(
    settings: &StartSettings,
    vm: &str,
    xml: &str,
) -> Result<String, String> {
    check_definition(vm, xml, Path::new("/"))?;
    let uri = &settings.uri;
    let mut conn = Connect::open(Some(uri))
        .map_err(|e| format!("cannot connect to {uri} read-write: {}", e.message()))?;
    let result = match Domain::lookup_by_uuid_string(&conn, vm) {
        // Already defined here and running (a resent command): nothing to define.
        Ok(dom) if dom.is_active().unwrap_or(false) => {
            start_on(settings, &dom, vm, Restart::Evacuation)
        }
        _ => match Domain::define_xml(&conn, xml) {
            Ok(dom) => start_on(settings, &dom, vm, Restart::Evacuation)
                .map(|done| format!("defined from its fenced host's definition; {done}")),
            Err(e) => Err(format!("defining {vm} here: {}", e.message())),
        },
    };
    if let Err(e) = conn.close() {
        tracing::debug!(error = %e, "closing the command's libvirt connection");
    }
    result
}

/// The definition is for `vm` and every disk it names exists under `root` (the disks
/// must be on storage this host shares with the failed one). Network disks (`rbd:…`,
/// `iscsi:…`) and pool volumes cannot be looked at here and are taken as shared.
fn check_definition(vm: &str, xml: &str, root: &Path) -> Result<(), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable definition: {e}"))?;
    let uuid = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("uuid"))
        .and_then(|n| n.text())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if uuid != vm.to_ascii_lowercase() {
        return Err(format!(
            "the definition is for domain {uuid:?}, not {vm}; not starting it"
        ));
    }
    let disks = super::inventory::parse_disks(xml)?;
    for path in disks
        .iter()
        .flat_map(|d| d.source.iter().chain(&d.backing))
        .filter(|p| p.starts_with('/'))
    {
        let here = root.join(path.trim_start_matches('/'));
        if std::fs::metadata(&here).is_err() {
            return Err(format!(
                "disk {path} of {vm} is not on this host (not shared storage); not starting it"
            ));
        }
    }
    Ok(())
}

/// Why a domain is started: it decides whether a stop on purpose may be undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// A crashed or hung domain on its own host: one stopped on purpose stays off.
    InPlace,
    /// A fenced host's domain, started here: whatever this host's libvirt last did with
    /// it (e.g. it was evacuated away once and destroyed) is history.
    Evacuation,
}

fn start_on(
    settings: &StartSettings,
    dom: &Domain,
    vm: &str,
    why: Restart,
) -> Result<String, String> {
    let name = dom.get_name().unwrap_or_else(|_| vm.to_string());
    let deadline = monotonic_ns()
        .saturating_add(u64::try_from(settings.wait_for_stop.as_nanos()).unwrap_or(u64::MAX));
    let mut waited = false;
    // Set once this command destroyed a hung domain: its "destroyed" state is ours.
    let mut destroyed_hung: Option<String> = None;
    loop {
        let active = dom
            .is_active()
            .map_err(|e| format!("reading the state of {name}: {}", e.message()))?;
        if active && destroyed_hung.is_none() {
            if let Some(why) = hung_reason(dom, &name) {
                dom.destroy()
                    .map_err(|e| format!("destroying hung {name} ({why}): {}", e.message()))?;
                tracing::info!(domain = %name, reason = %why, "destroyed a hung domain to restart it");
                destroyed_hung = Some(why);
                continue;
            }
        }
        if !active {
            // Only a crash is undone: a domain shut off on purpose (an operator's destroy,
            // the guest's own shutdown, a save or a migration) stays off, even though its
            // qemu exit looked like any other to the kernel.
            if let Ok((state, reason)) = dom.get_state() {
                if state == virt::sys::VIR_DOMAIN_SHUTOFF
                    && stopped_on_purpose(reason)
                    && destroyed_hung.is_none()
                    && why == Restart::InPlace
                {
                    let (_, why) = super::names::state(state, reason);
                    return Err(format!(
                        "{name} was shut off on purpose ({why}); not starting it"
                    ));
                }
            }
            match dom.create() {
                Ok(_) => {
                    let pid = super::inventory::read_pid(&settings.pid_dir, &name);
                    let after = match (&destroyed_hung, waited) {
                        (Some(why), _) => format!(" (destroyed first: {why})"),
                        (None, true) => " (after libvirt noticed its old qemu was gone)".into(),
                        (None, false) => String::new(),
                    };
                    return Ok(match pid {
                        Some(pid) => format!("started {name}, qemu pid {pid}{after}"),
                        None => format!("started {name}{after}"),
                    });
                }
                // Someone else may have started it meanwhile: look again.
                Err(e) if dom.is_active().unwrap_or(false) => {
                    tracing::info!(domain = %name, error = %e.message(), "domain became active while starting it");
                }
                Err(e) => return Err(format!("starting {name}: {}", e.message())),
            }
        }
        let pid = super::inventory::read_pid(&settings.pid_dir, &name);
        if let Some(pid) = pid {
            if qemu_alive(&settings.proc_root, pid, &name) {
                return Ok(format!("already running, qemu pid {pid}"));
            }
        }
        if monotonic_ns() >= deadline {
            return match pid {
                Some(pid) => Err(format!(
                    "libvirt still reports {name} active {:?} after its qemu pid {pid} was found gone",
                    settings.wait_for_stop
                )),
                None => Ok(format!(
                    "already running (libvirt reports {name} active; no qemu pid file)"
                )),
            };
        }
        waited = true;
        pause(POLL);
    }
}

/// A shut-off reason that is someone's decision, not a failure.
fn stopped_on_purpose(reason: i32) -> bool {
    u32::try_from(reason).is_ok_and(|r| {
        matches!(
            r,
            virt::sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN
                | virt::sys::VIR_DOMAIN_SHUTOFF_DESTROYED
                | virt::sys::VIR_DOMAIN_SHUTOFF_MIGRATED
                | virt::sys::VIR_DOMAIN_SHUTOFF_SAVED
                | virt::sys::VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT
        )
    })
}

#[allow(
    clippy::disallowed_methods,
    reason = "runs on a blocking thread (spawn_blocking), outside the async runtime"
)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_URI: &str = "test:///default";

    fn settings(pid_dir: &Path, wait: Duration) -> StartSettings {
        StartSettings {
            uri: TEST_URI.into(),
            pid_dir: pid_dir.into(),
            proc_root: "/proc".into(),
            wait_for_stop: wait,
        }
    }

    /// A domain of the test driver (shared by every connection of this process), defined
    /// and shut off; undefined on drop.
    struct TestDomain {
        conn: Connect,
        name: String,
        uuid: String,
    }

    impl TestDomain {
        fn define(name: &str, uuid: &str) -> TestDomain {
            let conn = Connect::open(Some(TEST_URI)).unwrap();
            let xml = format!(
                "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
                 <memory>8192</memory><os><type>hvm</type></os></domain>"
            );
            Domain::define_xml(&conn, &xml).unwrap();
            TestDomain {
                conn,
                name: name.into(),
                uuid: uuid.into(),
            }
        }

        fn dom(&self) -> Domain {
            Domain::lookup_by_name(&self.conn, &self.name).unwrap()
        }
    }

    impl Drop for TestDomain {
        fn drop(&mut self) {
            // Never panic here: a failed test is unwinding through it.
            if let Ok(dom) = Domain::lookup_by_name(&self.conn, &self.name) {
                let _ = dom.destroy();
                let _ = dom.undefine();
            }
            let _ = self.conn.close();
        }
    }

    #[test]
    fn a_shut_off_domain_is_started_by_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-start", "0c0d0000-0000-4000-8000-000000000001");
        let detail = start_domain(&settings(dir.path(), WAIT_FOR_STOP), &d.uuid).unwrap();
        assert!(detail.starts_with("started cmd-start"), "{detail}");
        assert!(d.dom().is_active().unwrap());
    }

    #[test]
    fn a_domain_already_running_with_a_live_qemu_is_ok_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-running", "0c0d0000-0000-4000-8000-000000000002");
        d.dom().create().unwrap();
        // This test process stands in for the domain's live qemu.
        std::fs::write(
            dir.path().join("cmd-running.pid"),
            std::process::id().to_string(),
        )
        .unwrap();
        let detail = start_domain(
            &settings(dir.path(), Duration::from_secs(60)),
            "cmd-running",
        )
        .unwrap();
        assert_eq!(
            detail,
            format!("already running, qemu pid {}", std::process::id())
        );
    }

    #[test]
    fn an_active_domain_whose_qemu_is_gone_is_judged_once_libvirt_sees_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-dying", "0c0d0000-0000-4000-8000-000000000003");
        d.dom().create().unwrap();
        // A pid that is certainly gone: a child that exited and was reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(dir.path().join("cmd-dying.pid"), dead.to_string()).unwrap();
        // libvirt notices the end a little later. (The test driver can only destroy, so
        // the end is judged deliberate here; a real qemu's death reads "crashed" and is
        // started, as the controller lab shows.)
        let dom = d.dom();
        let noticer = std::thread::spawn(move || {
            pause(Duration::from_millis(300));
            dom.destroy().unwrap();
        });
        let t0 = monotonic_ns();
        let err = start_domain(&settings(dir.path(), WAIT_FOR_STOP), &d.uuid).unwrap_err();
        let waited_ms = (monotonic_ns() - t0) / 1_000_000;
        noticer.join().unwrap();
        assert!(
            waited_ms >= 250,
            "answered after {waited_ms} ms, before libvirt saw the stop"
        );
        assert!(err.contains("shut off on purpose (destroyed)"), "{err}");
    }

    #[test]
    fn an_active_domain_whose_qemu_is_gone_for_good_fails_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-stuck", "0c0d0000-0000-4000-8000-000000000004");
        d.dom().create().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(dir.path().join("cmd-stuck.pid"), dead.to_string()).unwrap();
        let err =
            start_domain(&settings(dir.path(), Duration::from_millis(200)), &d.uuid).unwrap_err();
        assert!(err.contains("still reports cmd-stuck active"), "{err}");
    }

    #[test]
    fn a_domain_destroyed_on_purpose_is_not_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-destroyed", "0c0d0000-0000-4000-8000-000000000005");
        let dom = d.dom();
        dom.create().unwrap();
        dom.destroy().unwrap();
        let err = start_domain(&settings(dir.path(), WAIT_FOR_STOP), &d.uuid).unwrap_err();
        assert_eq!(
            err,
            "cmd-destroyed was shut off on purpose (destroyed); not starting it"
        );
        assert!(!dom.is_active().unwrap());
    }

    #[test]
    fn only_a_crash_or_an_unknown_reason_lets_a_shut_off_domain_start() {
        for r in [
            virt::sys::VIR_DOMAIN_SHUTOFF_UNKNOWN,
            virt::sys::VIR_DOMAIN_SHUTOFF_CRASHED,
            virt::sys::VIR_DOMAIN_SHUTOFF_FAILED,
            virt::sys::VIR_DOMAIN_SHUTOFF_DAEMON,
        ] {
            assert!(!stopped_on_purpose(r as i32), "{r}");
        }
        for r in [
            virt::sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN,
            virt::sys::VIR_DOMAIN_SHUTOFF_DESTROYED,
            virt::sys::VIR_DOMAIN_SHUTOFF_SAVED,
        ] {
            assert!(stopped_on_purpose(r as i32), "{r}");
        }
    }

    #[test]
    fn a_stale_copy_is_destroyed_and_its_autostart_turned_off_but_its_definition_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-stale", "0c0d0000-0000-4000-8000-000000000006");
        let dom = d.dom();
        dom.set_autostart(true).unwrap();
        dom.create().unwrap();
        let s = settings(dir.path(), WAIT_FOR_STOP);
        let detail = destroy_domain(&s, &d.uuid).unwrap();
        assert_eq!(detail, "destroyed cmd-stale; autostart turned off");
        assert!(!dom.is_active().unwrap());
        assert!(!dom.get_autostart().unwrap());
        assert!(dom.is_persistent().unwrap(), "still defined");
        // Again (a resent command, a second listing): nothing runs, nothing to do.
        let again = destroy_domain(&s, "cmd-stale").unwrap();
        assert_eq!(
            again,
            "not running: cmd-stale is shut off; autostart was off"
        );
    }

    #[test]
    fn a_stale_copy_that_is_not_running_only_loses_its_autostart_and_an_unknown_one_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-stale-off", "0c0d0000-0000-4000-8000-000000000007");
        d.dom().set_autostart(true).unwrap();
        let s = settings(dir.path(), WAIT_FOR_STOP);
        let detail = destroy_domain(&s, &d.uuid).unwrap();
        assert_eq!(
            detail,
            "not running: cmd-stale-off is shut off; autostart turned off"
        );
        assert!(!d.dom().get_autostart().unwrap());
        let unknown = destroy_domain(&s, "0c0d0000-0000-4000-8000-0000000000fe").unwrap();
        assert!(unknown.starts_with("not running: no domain"), "{unknown}");
    }

    #[test]
    fn an_unknown_domain_fails_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let err = start_domain(
            &settings(dir.path(), WAIT_FOR_STOP),
            "0c0d0000-0000-4000-8000-0000000000ff",
        )
        .unwrap_err();
        assert!(err.contains("no domain"), "{err}");
    }

    #[test]
    fn an_unreachable_libvirt_fails_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path(), WAIT_FOR_STOP);
        s.uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock".into();
        let err = start_domain(&s, "x").unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }

    fn test_xml(name: &str, uuid: &str, disk: Option<&Path>) -> String {
        let disk = disk
            .map(|p| {
                format!(
                    "<disk type='file' device='disk'><source file='{}'/>\
                     <target dev='vda' bus='virtio'/></disk>",
                    p.display()
                )
            })
            .unwrap_or_default();
        format!(
            "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory>8192</memory><os><type>hvm</type></os><devices>{disk}</devices></domain>"
        )
    }

    #[test]
    fn a_definition_is_accepted_only_for_its_own_domain_with_every_disk_present() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, b"x").unwrap();
        let uuid = "0c0d0000-0000-4000-8000-0000000000a1";
        let root = Path::new("/");
        check_definition(uuid, &test_xml("d", uuid, Some(&disk)), root).unwrap();
        // UUIDs compare without regard to case.
        check_definition(&uuid.to_uppercase(), &test_xml("d", uuid, None), root).unwrap();
        let err = check_definition(
            "0c0d0000-0000-4000-8000-0000000000a2",
            &test_xml("d", uuid, None),
            root,
        )
        .unwrap_err();
        assert!(
            err.contains("not 0c0d0000-0000-4000-8000-0000000000a2"),
            "{err}"
        );
        let gone = dir.path().join("elsewhere.raw");
        let err = check_definition(uuid, &test_xml("d", uuid, Some(&gone)), root).unwrap_err();
        assert!(
            err.contains("not on this host (not shared storage)"),
            "{err}"
        );
        assert!(check_definition(uuid, "<domain", root).is_err());
    }

    #[test]
    fn a_fenced_hosts_domain_is_defined_and_started_from_its_definition_once() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = "0c0d0000-0000-4000-8000-0000000000a3";
        let xml = test_xml("cmd-evacuated", uuid, None);
        let s = settings(dir.path(), WAIT_FOR_STOP);
        // Undefined on drop. Its connection is opened first: the test driver's state
        // lives only while a connection to it is open.
        let d = TestDomain {
            conn: Connect::open(Some(TEST_URI)).unwrap(),
            name: "cmd-evacuated".into(),
            uuid: uuid.into(),
        };
        let detail = start_from_definition(&s, uuid, &xml).unwrap();
        assert!(
            detail.starts_with("defined from its fenced host's definition; started cmd-evacuated"),
            "{detail}"
        );
        assert!(d.dom().is_active().unwrap());
        // A resent command finds it running (this process stands in for its qemu).
        std::fs::write(
            dir.path().join("cmd-evacuated.pid"),
            std::process::id().to_string(),
        )
        .unwrap();
        let again = start_from_definition(&s, uuid, &xml).unwrap();
        assert!(again.starts_with("already running"), "{again}");
    }

    #[tokio::test]
    async fn a_domains_commands_run_in_the_order_taken_and_other_domains_do_not_wait() {
        let mut first = Turn::take("order-a".into());
        let mut second = Turn::take("order-a".into());
        let mut other = Turn::take("order-b".into());
        first.wait().await;
        // Another domain's command does not wait for this one's.
        tokio::time::timeout(Duration::from_secs(5), other.wait())
            .await
            .expect("another domain's command runs at once");
        let waiting = tokio::spawn(async move {
            second.wait().await;
            second
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "the second ran before the first ended"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the second runs once the first ended")
            .unwrap();
        drop(other);
        drop(second);
        assert!(
            !QUEUES
                .lock()
                .unwrap()
                .iter()
                .any(|(d, _, _)| d.starts_with("order-")),
            "a finished queue stays"
        );
    }

    #[test]
    fn a_query_says_whether_the_domain_is_active_and_a_domain_not_defined_does_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), WAIT_FOR_STOP);
        let d = TestDomain::define("cmd-query", "0c0d0000-0000-4000-8000-0000000000b1");
        let read = |detail: &str| protocol::frame::query_domain_answer(true, detail);
        let off = query_domain(&s, &d.uuid).unwrap();
        assert_eq!(off, "not running: shutoff (unknown)");
        d.dom().create().unwrap();
        let on = query_domain(&s, &d.uuid).unwrap();
        assert_eq!(read(&on), Some(true), "{on}");
        assert!(on.starts_with("running: running ("), "{on}");
        d.dom().suspend().unwrap();
        let paused = query_domain(&s, &d.uuid).unwrap();
        assert_eq!(read(&paused), Some(true), "{paused}");
        let gone = query_domain(&s, "0c0d0000-0000-4000-8000-0000000000bf").unwrap();
        assert_eq!(gone, "not running: not defined here");
        let mut bad = s.clone();
        bad.uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock".into();
        let err = query_domain(&bad, &d.uuid).unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }

    /// Through [`execute`], as the stream calls it: a query taken after a start that is
    /// still waiting answers with the start's outcome, not the state before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_after_a_slow_start_of_the_same_domain_answers_once_the_start_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-queued", "0c0d0000-0000-4000-8000-0000000000b2");
        let dom = d.dom();
        dom.create().unwrap();
        // Active, but its qemu is gone: the start waits for libvirt to see it stopped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(dir.path().join("cmd-queued.pid"), dead.to_string()).unwrap();
        set_target(Some(settings(dir.path(), WAIT_FOR_STOP)));
        let t0 = tokio::time::Instant::now();
        let start = execute(HostCommand::StartDomain {
            vm_uuid: d.uuid.to_uppercase(),
        });
        let query = execute(HostCommand::QueryDomain {
            vm_uuid: d.uuid.clone(),
        });
        // Meanwhile libvirt notices the end (the test driver can only destroy).
        let noticer = std::thread::spawn(move || {
            pause(Duration::from_millis(300));
            dom.destroy().unwrap();
        });
        let (ok, detail) = query.await;
        let waited = t0.elapsed();
        noticer.join().unwrap();
        let (start_ok, start_detail) = start.await;
        set_target(None);
        assert!(!start_ok, "{start_detail}");
        assert!(ok, "{detail}");
        // Without the queue it would have said "running" at once.
        assert_eq!(detail, "not running: shutoff (destroyed)");
        assert!(
            waited >= Duration::from_millis(250),
            "answered after {waited:?}"
        );
    }

    #[test]
    fn an_evacuated_domain_once_destroyed_here_may_be_started_here_again() {
        let dir = tempfile::tempdir().unwrap();
        let d = TestDomain::define("cmd-back", "0c0d0000-0000-4000-8000-0000000000a4");
        let dom = d.dom();
        dom.create().unwrap();
        dom.destroy().unwrap();
        let xml = test_xml("cmd-back", &d.uuid, None);
        let detail =
            start_from_definition(&settings(dir.path(), WAIT_FOR_STOP), &d.uuid, &xml).unwrap();
        assert!(detail.contains("started cmd-back"), "{detail}");
        assert!(dom.is_active().unwrap());
    }
}
