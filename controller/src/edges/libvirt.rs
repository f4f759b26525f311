//! The libvirt restore backend (`[controller] backend = "libvirt"`), for clusters
//! without OpenStack: a crashed domain is restarted in place by the watchdog of its host,
//! over that watchdog's open event stream (`Command {StartDomain}` →
//! `CommandResult`), which starts the defined, shut-off domain with `virDomainCreate`.
//!
//! ```text
//! engine ─RestartInPlace─► LibvirtRestorer ─► HostStreams[host] ─► the host's stream task
//!                                                                     │ Command frame
//!                                                                     ▼
//!   engine ◄─RestoreResult── waiter task ◄── oneshot ◄── CommandResult frame ◄── watchdog
//! ```
//!
//! - The command id is derived from the intent key, so a resumed controller that hands
//!   the same intent over again sends the same id; the watchdog answers a `StartDomain`
//!   for a domain that already runs with ok ("already running"), so a resent command is
//!   harmless.
//! - Restart in place, no stream for the host: `Failed` at once. No answer within
//!   [`COMMAND_TIMEOUT`], or the stream closes after the command was handed over:
//!   `Unknown` on that host. A second `StartDomain` there would answer "already
//!   running", but once the restart budget is spent the engine's next step is an
//!   evacuation elsewhere, so it asks the host first (as below).
//! - Evacuating (the engine asks only once the host's fence is verified): the domain is
//!   started on another host with an open stream (`Command {StartFromDefinition}`), from
//!   the definition its own host last reported (`DomainDefinition` events, kept here
//!   and reloaded from the store at start). The target is the connected host, other
//!   than the failed one, least tried for this VM, then with the fewest evacuations
//!   sent to it; its watchdog refuses a domain whose disks it cannot see (not shared
//!   storage). No definition, no other host, or the command never handed to the
//!   target's stream (it closed first): `Failed`. Handed over, then no answer within
//!   [`COMMAND_TIMEOUT`] or the stream closed before it: `Unknown` with that target, since
//!   the domain may be running there now, and a retry elsewhere could run it twice; the
//!   engine asks first.
//! - Asking (`ask_host`, after an `Unknown`): `Command {QueryDomain}` on the host's
//!   stream; its watchdog answers once every earlier command for the domain has finished
//!   (so after the start whose answer was lost), and the answer becomes
//!   `Input::HostAnswer` (`runs`: whether the domain is active there; `None` when there
//!   is no stream, no answer within [`QUERY_TIMEOUT`], or the watchdog could not tell).
//!   One query per host and VM is in flight at a time: the engine asks again every
//!   second while it waits, and a query queued behind a slow start answers for all.
//! - There is no compute service to force down without Nova: `force_down` and
//!   `unfence` are `Ok` at once (nothing to do; the fence itself is what protects).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::frame::{query_domain_answer, HostCommand};
use tokio::sync::{mpsc, oneshot};

use super::old_copies::OldCopyCheck;
use super::{HostFacts, ResultSender};
use crate::edges::Restorer;
use crate::engine::{HostId, HostState, Input, IntentKey, Resource, RestoreOutcome};

/// How long the restorer waits for a watchdog's `CommandResult`. The watchdog may wait
/// a few seconds for libvirt to notice a qemu's death before it can start the domain
/// again, and starting it takes a while too.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the restorer waits for a watchdog's answer to `QueryDomain`. The watchdog
/// answers after the domain's earlier commands (a start may take up to
/// [`COMMAND_TIMEOUT`] and more); meanwhile the engine's repeated asks are not sent again.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Commands a host's stream task may hold before a sender waits.
pub const COMMANDS_QUEUED: usize = 64;

/// The answer to a command, as the watchdog gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandAnswer {
    pub ok: bool,
    pub detail: String,
}

/// One command for a host's stream task to send; the answer goes to `reply`.
#[derive(Debug)]
pub struct CommandRequest {
    pub command_id: u64,
    pub command: HostCommand,
    pub reply: oneshot::Sender<CommandAnswer>,
}

/// Which hosts have an open event stream, and how to hand each one a command. Filled
/// by the intake when a stream says `Hello`, emptied when it closes.
#[derive(Debug, Default)]
pub struct HostStreams {
    inner: Mutex<HashMap<String, (u64, mpsc::Sender<CommandRequest>)>>,
    next_connection: AtomicU64,
    /// The last definition each host reported per domain (UUID → definition).
    definitions: Mutex<HashMap<String, StoredDefinition>>,
}

/// A domain's definition as its host last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDefinition {
    pub host: String,
    pub xml: String,
}

/// A stream's entry in [`HostStreams`]; dropping it removes the entry, unless a newer
/// stream of the same host has taken its place meanwhile.
#[derive(Debug)]
pub struct StreamRegistration {
    streams: Arc<HostStreams>,
    host: String,
    connection: u64,
}

impl Drop for StreamRegistration {
    fn drop(&mut self) {
        let mut map = self.streams.lock();
        if map.get(&self.host).map(|(c, _)| *c) == Some(self.connection) {
            map.remove(&self.host);
        }
    }
}

impl HostStreams {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<CommandRequest>)>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `host`'s stream is open: commands for it go to `commands` until the returned
    /// registration is dropped. A newer stream of the same host replaces an older one.
    pub fn register(
        self: &Arc<Self>,
        host: &str,
        commands: mpsc::Sender<CommandRequest>,
    ) -> StreamRegistration {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(host.to_string(), (connection, commands));
        StreamRegistration {
            streams: self.clone(),
            host: host.to_string(),
            connection,
        }
    }

    /// Where to send a command for `host`, if its stream is open.
    pub fn sender(&self, host: &str) -> Option<mpsc::Sender<CommandRequest>> {
        self.lock()
            .get(host)
            .map(|(_, tx)| tx.clone())
            .filter(|tx| !tx.is_closed())
    }

    /// `host` reported `xml` as the definition of domain `uuid` (the latest wins).
    pub fn note_definition(&self, host: &str, uuid: &str, xml: &str) {
        self.definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                uuid.to_ascii_lowercase(),
                StoredDefinition {
                    host: host.to_string(),
                    xml: xml.to_string(),
                },
            );
    }

    /// The last reported definition of domain `uuid`.
    pub fn definition(&self, uuid: &str) -> Option<StoredDefinition> {
        self.definitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uuid.to_ascii_lowercase())
            .cloned()
    }

    /// Hosts with an open stream, sorted.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.lock().keys().cloned().collect();
        hosts.sort();
        hosts
    }
}

/// The command id for an intent: FNV-1a over its key, so the same intent gives the same
/// id across controller restarts.
pub fn command_id(key: &IntentKey) -> u64 {
    fnv1a(key.as_str())
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Why a command has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// It never reached the host's stream (none open, or it closed first): not carried
    /// out.
    NotSent(String),
    /// It was handed to the host's stream, then no answer came (in time, or before the
    /// stream closed): it may have been carried out.
    NoAnswer(String),
}

impl CommandError {
    /// Why, in words.
    pub fn reason(&self) -> &str {
        match self {
            CommandError::NotSent(r) | CommandError::NoAnswer(r) => r,
        }
    }
}

/// Sends `command` to `host`'s watchdog and waits for its answer (at most `timeout` in
/// all).
pub async fn run_command(
    streams: &HostStreams,
    host: &str,
    command_id: u64,
    command: HostCommand,
    timeout: Duration,
) -> Result<CommandAnswer, CommandError> {
    let not_connected =
        || CommandError::NotSent(format!("the watchdog of {host} is not connected"));
    let Some(tx) = streams.sender(host) else {
        return Err(not_connected());
    };
    let (reply, answer) = oneshot::channel();
    let request = CommandRequest {
        command_id,
        command,
        reply,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let no_answer = || {
        format!(
            "no answer from the watchdog of {host} within {} s",
            timeout.as_secs_f64()
        )
    };
    // Until the stream task holds the request, nothing was sent.
    match tokio::time::timeout_at(deadline, tx.send(request)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(not_connected()),
        Err(_) => {
            return Err(CommandError::NotSent(format!(
                "{}; the command was never sent (its stream is full)",
                no_answer()
            )))
        }
    }
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(CommandError::NoAnswer(format!(
            "the event stream of {host} closed before the watchdog answered"
        ))),
        Err(_) => Err(CommandError::NoAnswer(no_answer())),
    }
}

/// The restorer of the libvirt backend (see the module docs).
pub struct LibvirtRestorer {
    pub results: ResultSender,
    pub streams: Arc<HostStreams>,
    pub timeout: Duration,
    /// Evacuations sent to each host, to spread them.
    sent_to: HashMap<String, u64>,
    /// Hosts an evacuation of each VM was sent to: a retry goes elsewhere.
    tried: HashMap<Resource, Vec<String>>,
    /// (host, VM) queries in flight: asked again meanwhile, nothing more is sent.
    asking: Arc<Mutex<HashSet<(String, String)>>>,
    /// Tells this process's queries apart from an earlier process's in command ids.
    query_nonce: u64,
    queries: u64,
    /// Asked before a VM with RBD disks is started elsewhere (see [`super::old_copies`]).
    old_copies: Option<Arc<OldCopyCheck>>,
    /// The engine's hosts: only an Up host that the engine does not rule out (its disk
    /// leases lost) is a target. `None` (tests of the commands alone): any connected host.
    hosts: Option<HostFacts>,
}

impl LibvirtRestorer {
    pub fn new(results: ResultSender, streams: Arc<HostStreams>) -> Self {
        Self {
            results,
            streams,
            timeout: COMMAND_TIMEOUT,
            sent_to: HashMap::new(),
            tried: HashMap::new(),
            asking: Arc::new(Mutex::new(HashSet::new())),
            query_nonce: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            queries: 0,
            old_copies: None,
            hosts: None,
        }
    }

    /// Picks targets among the hosts the engine allows (see `hosts`).
    pub fn with_host_facts(mut self, hosts: HostFacts) -> Self {
        self.hosts = Some(hosts);
        self
    }

    /// Why the engine rules `host` out as a target now, if it does.
    fn ruled_out(&self, host: &str) -> Option<String> {
        let facts = self.hosts.as_ref()?.borrow();
        let view = facts.get(&HostId::new(host))?;
        if let Some(why) = &view.not_a_target {
            return Some(why.clone());
        }
        (view.state != HostState::Up).then(|| format!("is {:?}", view.state))
    }

    /// Reads an RBD-disked VM's watchers before starting it elsewhere.
    pub fn with_old_copy_check(mut self, check: Option<Arc<OldCopyCheck>>) -> Self {
        self.old_copies = check;
        self
    }

    /// The connected host other than `from` with the fewest evacuations sent to it (by
    /// name on a tie), preferring those not tried for `resource` yet: a retry goes
    /// elsewhere when there is an elsewhere, and to the least-tried host when not (a
    /// refusal may be passing, e.g. a shared file still labelled for the failed host).
    fn pick_target(&self, resource: &Resource, from: &HostId) -> Option<String> {
        let tried = self.tried.get(resource);
        let times_tried = |h: &String| tried.map_or(0, |t| t.iter().filter(|x| *x == h).count());
        self.streams
            .hosts()
            .into_iter()
            .filter(|h| h != from.as_str())
            .filter(|h| self.ruled_out(h).is_none())
            .min_by_key(|h| {
                (
                    times_tried(h),
                    self.sent_to.get(h).copied().unwrap_or(0),
                    h.clone(),
                )
            })
    }

    fn restore_result(&self, resource: &Resource, key: &IntentKey, outcome: RestoreOutcome) {
        let _ = self.results.send(Input::RestoreResult {
            resource: resource.clone(),
            key: key.clone(),
            outcome,
        });
    }
}

impl Restorer for LibvirtRestorer {
    fn force_down(&mut self, host: &HostId, key: &IntentKey) {
        // Without Nova there is no compute service that could place VMs on the host:
        // nothing to force down. The fence is what keeps the host from running them.
        let _ = self.results.send(Input::HostActionResult {
            host: host.clone(),
            key: key.clone(),
            outcome: RestoreOutcome::Ok { host: host.clone() },
        });
    }

    fn restart_in_place(
        &mut self,
        resource: &Resource,
        host: &HostId,
        attempt: u32,
        key: &IntentKey,
    ) {
        let Resource::Vm(vm) = resource else {
            self.restore_result(
                resource,
                key,
                RestoreOutcome::Failed {
                    reason: "the libvirt backend restarts VMs only".into(),
                },
            );
            return;
        };
        let command_id = command_id(key);
        let command = HostCommand::StartDomain {
            vm_uuid: vm.as_str().to_string(),
        };
        if self.streams.sender(host.as_str()).is_none() {
            self.restore_result(
                resource,
                key,
                RestoreOutcome::Failed {
                    reason: format!("the watchdog of {host} is not connected"),
                },
            );
            return;
        }
        tracing::info!(%host, %resource, attempt, %key, command_id, "asking the watchdog to start the domain");
        let streams = self.streams.clone();
        let results = self.results.clone();
        let timeout = self.timeout;
        let (resource, host, key) = (resource.clone(), host.clone(), key.clone());
        tokio::spawn(async move {
            let answer = run_command(&streams, host.as_str(), command_id, command, timeout).await;
            let outcome = match answer {
                Ok(CommandAnswer { ok: true, detail }) => {
                    tracing::info!(%host, %resource, %key, %detail, "domain started by the watchdog");
                    RestoreOutcome::Ok { host: host.clone() }
                }
                Ok(CommandAnswer { ok: false, detail }) => {
                    tracing::warn!(%host, %resource, %key, %detail, "the watchdog could not start the domain");
                    RestoreOutcome::Failed { reason: detail }
                }
                Err(CommandError::NotSent(reason)) => {
                    tracing::warn!(%host, %resource, %key, %reason, "restart in place failed");
                    RestoreOutcome::Failed { reason }
                }
                // Sent: it may be running now. A second start here would be harmless
                // (module docs), but an evacuation after the last restart would not.
                Err(CommandError::NoAnswer(reason)) => {
                    tracing::warn!(%host, %resource, %key, %reason, "restart in place not answered: its outcome is not known");
                    RestoreOutcome::Unknown {
                        target: Some(host.clone()),
                        reason,
                    }
                }
            };
            let _ = results.send(Input::RestoreResult {
                resource,
                key,
                outcome,
            });
        });
    }

    fn evacuate(&mut self, resource: &Resource, from: &HostId, key: &IntentKey) {
        let failed = |reason: String| RestoreOutcome::Failed { reason };
        let Resource::Vm(vm) = resource else {
            self.restore_result(
                resource,
                key,
                failed("the libvirt backend evacuates VMs only".into()),
            );
            return;
        };
        let Some(definition) = self.streams.definition(vm.as_str()) else {
            self.restore_result(
                resource,
                key,
                failed(format!(
                    "no definition of {vm} was reported by its host: cannot start it elsewhere"
                )),
            );
            return;
        };
        let Some(target) = self.pick_target(resource, from) else {
            let others: Vec<String> = self
                .streams
                .hosts()
                .into_iter()
                .filter(|h| h != from.as_str())
                .filter_map(|h| Some(format!("{h} {}", self.ruled_out(&h)?)))
                .collect();
            let reason = if others.is_empty() {
                format!("no other host's watchdog is connected to start {vm} on")
            } else {
                format!("no other host may take {vm}: {}", others.join("; "))
            };
            self.restore_result(resource, key, failed(reason));
            return;
        };
        *self.sent_to.entry(target.clone()).or_default() += 1;
        self.tried
            .entry(resource.clone())
            .or_default()
            .push(target.clone());
        let command_id = command_id(key);
        let check = self
            .old_copies
            .clone()
            .map(|c| (c, from.clone(), definition.xml.clone()));
        let command = HostCommand::StartFromDefinition {
            vm_uuid: vm.as_str().to_string(),
            xml: definition.xml,
        };
        tracing::info!(%from, %target, %resource, %key, command_id, "asking a watchdog to start an evacuated domain");
        let streams = self.streams.clone();
        let results = self.results.clone();
        let timeout = self.timeout;
        let (resource, key) = (resource.clone(), key.clone());
        tokio::spawn(async move {
            if let Some((check, from, xml)) = check {
                if let Err(reason) = check.before_start(&from, &xml).await {
                    tracing::error!(%from, %resource, %key, %reason, "the old copy may still hold its RBD images: not started");
                    let _ = results.send(Input::RestoreResult {
                        resource,
                        key,
                        outcome: RestoreOutcome::Failed { reason },
                    });
                    return;
                }
            }
            let answer = run_command(&streams, &target, command_id, command, timeout).await;
            let outcome = match answer {
                Ok(CommandAnswer { ok: true, detail }) => {
                    tracing::info!(%target, %resource, %key, %detail, "evacuated domain started");
                    RestoreOutcome::Ok {
                        host: HostId::new(target.clone()),
                    }
                }
                Ok(CommandAnswer { ok: false, detail }) => {
                    tracing::warn!(%target, %resource, %key, %detail, "the target could not start the evacuated domain");
                    RestoreOutcome::Failed {
                        reason: format!("on {target}: {detail}"),
                    }
                }
                Err(CommandError::NotSent(reason)) => {
                    tracing::warn!(%target, %resource, %key, %reason, "evacuation failed");
                    RestoreOutcome::Failed {
                        reason: format!("on {target}: {reason}"),
                    }
                }
                // Sent: it may be running there now.
                Err(CommandError::NoAnswer(reason)) => {
                    tracing::warn!(%target, %resource, %key, %reason, "evacuation not answered: its outcome is not known");
                    RestoreOutcome::Unknown {
                        target: Some(HostId::new(target.clone())),
                        reason: format!("on {target}: {reason}"),
                    }
                }
            };
            let _ = results.send(Input::RestoreResult {
                resource,
                key,
                outcome,
            });
        });
    }

    fn unfence(&mut self, host: &HostId, key: &IntentKey) {
        // Nothing was forced down (see force_down).
        let _ = self.results.send(Input::HostActionResult {
            host: host.clone(),
            key: key.clone(),
            outcome: RestoreOutcome::Ok { host: host.clone() },
        });
    }

    fn ask_host(&mut self, host: &HostId, resource: &Resource) {
        let answer = |runs: Option<bool>| Input::HostAnswer {
            host: host.clone(),
            resource: resource.clone(),
            runs,
        };
        let Resource::Vm(vm) = resource else {
            let _ = self.results.send(answer(None));
            return;
        };
        if self.streams.sender(host.as_str()).is_none() {
            tracing::info!(%host, %resource, "cannot ask: the watchdog is not connected");
            let _ = self.results.send(answer(None));
            return;
        }
        let asked = (host.as_str().to_string(), vm.as_str().to_string());
        if !lock(&self.asking).insert(asked.clone()) {
            // Its answer to the query in flight answers this ask too.
            return;
        }
        self.queries += 1;
        let command_id = fnv1a(&format!(
            "query/{}/{}/{host}/{resource}",
            self.query_nonce, self.queries
        ));
        let command = HostCommand::QueryDomain {
            vm_uuid: vm.as_str().to_string(),
        };
        tracing::info!(%host, %resource, command_id, "asking the watchdog whether the domain runs there");
        let streams = self.streams.clone();
        let results = self.results.clone();
        let asking = self.asking.clone();
        let (host, resource) = (host.clone(), resource.clone());
        tokio::spawn(async move {
            let answer =
                run_command(&streams, host.as_str(), command_id, command, QUERY_TIMEOUT).await;
            lock(&asking).remove(&asked);
            let runs = match answer {
                Ok(CommandAnswer { ok, detail }) => {
                    let runs = query_domain_answer(ok, &detail);
                    tracing::info!(%host, %resource, ?runs, %detail, "the watchdog answered");
                    runs
                }
                Err(e) => {
                    tracing::warn!(%host, %resource, reason = e.reason(), "no answer to the query");
                    None
                }
            };
            let _ = results.send(Input::HostAnswer {
                host,
                resource,
                runs,
            });
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IntentKey {
        IntentKey(s.into())
    }

    /// A stand-in for a host's stream task: answers every command with `answer`, after
    /// recording it.
    fn fake_stream(
        streams: &Arc<HostStreams>,
        host: &str,
        answer: Option<CommandAnswer>,
    ) -> (
        StreamRegistration,
        mpsc::UnboundedReceiver<(u64, HostCommand)>,
    ) {
        let (tx, mut rx) = mpsc::channel::<CommandRequest>(COMMANDS_QUEUED);
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let registration = streams.register(host, tx);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(req) = rx.recv().await {
                let _ = seen_tx.send((req.command_id, req.command.clone()));
                match &answer {
                    Some(a) => {
                        let _ = req.reply.send(a.clone());
                    }
                    // A watchdog that never answers: keep the reply open.
                    None => held.push(req.reply),
                }
            }
        });
        (registration, seen)
    }

    fn restorer(streams: &Arc<HostStreams>) -> (LibvirtRestorer, mpsc::UnboundedReceiver<Input>) {
        let (results, rx) = mpsc::unbounded_channel();
        (LibvirtRestorer::new(results, streams.clone()), rx)
    }

    async fn next_outcome(
        rx: &mut mpsc::UnboundedReceiver<Input>,
    ) -> (Resource, IntentKey, RestoreOutcome) {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(Input::RestoreResult {
                resource,
                key,
                outcome,
            })) => (resource, key, outcome),
            other => panic!("expected a restore result, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_restart_sends_start_domain_to_the_hosts_stream_and_its_ok_answer_restores_the_vm() {
        let streams = HostStreams::new();
        let (_reg, mut seen) = fake_stream(
            &streams,
            "h1",
            Some(CommandAnswer {
                ok: true,
                detail: "started".into(),
            }),
        );
        let (mut r, mut results) = restorer(&streams);
        let k = key("3/restart-1/vm:u-1");
        r.restart_in_place(&Resource::vm("u-1"), &HostId::new("h1"), 1, &k);
        let (id, command) = seen.recv().await.unwrap();
        assert_eq!(id, command_id(&k));
        assert_eq!(
            command,
            HostCommand::StartDomain {
                vm_uuid: "u-1".into()
            }
        );
        let (resource, got_key, outcome) = next_outcome(&mut results).await;
        assert_eq!((resource, got_key), (Resource::vm("u-1"), k));
        assert_eq!(
            outcome,
            RestoreOutcome::Ok {
                host: HostId::new("h1")
            }
        );
    }

    #[tokio::test]
    async fn a_failed_answer_carries_the_watchdogs_reason() {
        let streams = HostStreams::new();
        let (_reg, _seen) = fake_stream(
            &streams,
            "h1",
            Some(CommandAnswer {
                ok: false,
                detail: "no domain with UUID u-1".into(),
            }),
        );
        let (mut r, mut results) = restorer(&streams);
        r.restart_in_place(&Resource::vm("u-1"), &HostId::new("h1"), 1, &key("k"));
        let (_, _, outcome) = next_outcome(&mut results).await;
        assert_eq!(
            outcome,
            RestoreOutcome::Failed {
                reason: "no domain with UUID u-1".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watchdog_that_never_answers_leaves_the_restart_unknown_on_its_host_after_the_timeout(
    ) {
        let streams = HostStreams::new();
        let (_reg, mut seen) = fake_stream(&streams, "h1", None);
        let (mut r, mut results) = restorer(&streams);
        let started = tokio::time::Instant::now();
        r.restart_in_place(&Resource::vm("u-1"), &HostId::new("h1"), 1, &key("k"));
        assert!(seen.recv().await.is_some(), "the command was sent");
        let (_, _, outcome) = next_outcome(&mut results).await;
        assert!(started.elapsed() >= COMMAND_TIMEOUT);
        match outcome {
            RestoreOutcome::Unknown { target, reason } => {
                assert_eq!(target, Some(HostId::new("h1")));
                assert!(
                    reason.contains("no answer from the watchdog of h1"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_host_without_an_open_stream_fails_the_restart_at_once() {
        let streams = HostStreams::new();
        let (_other, _) = fake_stream(&streams, "h2", None);
        let (mut r, mut results) = restorer(&streams);
        r.restart_in_place(&Resource::vm("u-1"), &HostId::new("h1"), 1, &key("k"));
        match results.try_recv() {
            Ok(Input::RestoreResult {
                outcome: RestoreOutcome::Failed { reason },
                ..
            }) => assert_eq!(reason, "the watchdog of h1 is not connected"),
            other => panic!("expected an immediate failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stream_that_closes_after_taking_the_restart_leaves_it_unknown_on_its_host() {
        let streams = HostStreams::new();
        let (tx, mut rx) = mpsc::channel::<CommandRequest>(COMMANDS_QUEUED);
        let registration = streams.register("h1", tx);
        tokio::spawn(async move {
            // Takes the command, then the connection is gone.
            let req = rx.recv().await;
            drop(registration);
            drop(req);
        });
        let (mut r, mut results) = restorer(&streams);
        r.restart_in_place(&Resource::vm("u-1"), &HostId::new("h1"), 1, &key("k"));
        match next_outcome(&mut results).await.2 {
            RestoreOutcome::Unknown { target, reason } => {
                assert_eq!(target, Some(HostId::new("h1")));
                assert!(
                    reason.contains("closed before the watchdog answered"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(streams.hosts().is_empty());
    }

    #[tokio::test]
    async fn a_closed_stream_leaves_the_registry_but_not_a_newer_stream_of_the_same_host() {
        let streams = HostStreams::new();
        let (old_tx, _old_rx) = mpsc::channel(1);
        let (new_tx, _new_rx) = mpsc::channel(1);
        let old = streams.register("h1", old_tx);
        assert_eq!(streams.hosts(), ["h1"]);
        let new = streams.register("h1", new_tx.clone());
        drop(old);
        let sender = streams.sender("h1").expect("the newer stream stays");
        assert!(sender.same_channel(&new_tx));
        drop(new);
        assert!(streams.sender("h1").is_none());
        assert!(streams.hosts().is_empty());
    }

    #[test]
    fn the_same_intent_always_gives_the_same_command_id_and_others_differ() {
        let a = key("7/restart-1/vm:u-1");
        assert_eq!(command_id(&a), command_id(&a.clone()));
        assert_ne!(command_id(&a), command_id(&key("7/restart-2/vm:u-1")));
    }

    #[tokio::test]
    async fn an_evacuation_starts_the_reported_definition_on_the_least_loaded_other_host() {
        let streams = HostStreams::new();
        let ok = Some(CommandAnswer {
            ok: true,
            detail: "started".into(),
        });
        let (_r0, mut seen0) = fake_stream(&streams, "h0", ok.clone());
        let (_r1, mut seen1) = fake_stream(&streams, "h1", ok.clone());
        let (_r2, mut seen2) = fake_stream(&streams, "h2", ok);
        streams.note_definition("h0", "U-1", "<domain>one</domain>");
        streams.note_definition("h0", "u-2", "<domain>two</domain>");
        let (mut r, mut results) = restorer(&streams);
        let from = HostId::new("h0");
        r.evacuate(&Resource::vm("u-1"), &from, &key("1/evacuate-1/vm:u-1"));
        r.evacuate(&Resource::vm("u-2"), &from, &key("1/evacuate-1/vm:u-2"));
        let mut placed = Vec::new();
        for _ in 0..2 {
            match next_outcome(&mut results).await {
                (vm, _, RestoreOutcome::Ok { host }) => placed.push((vm, host)),
                other => panic!("{other:?}"),
            }
        }
        placed.sort();
        // Never the failed host; one VM each on the two others.
        assert_eq!(
            placed,
            vec![
                (Resource::vm("u-1"), HostId::new("h1")),
                (Resource::vm("u-2"), HostId::new("h2"))
            ]
        );
        assert!(seen0.try_recv().is_err());
        let (_, cmd) = seen1.recv().await.unwrap();
        assert_eq!(
            cmd,
            HostCommand::StartFromDefinition {
                vm_uuid: "u-1".into(),
                xml: "<domain>one</domain>".into()
            }
        );
        assert!(matches!(
            seen2.recv().await,
            Some((_, HostCommand::StartFromDefinition { .. }))
        ));
    }

    #[tokio::test]
    async fn an_evacuation_goes_to_no_host_the_engine_rules_out_and_says_why_when_none_is_left() {
        let streams = HostStreams::new();
        let ok = Some(CommandAnswer {
            ok: true,
            detail: "started".into(),
        });
        let (_r1, mut seen1) = fake_stream(&streams, "h1", ok.clone());
        let (_r2, mut seen2) = fake_stream(&streams, "h2", ok);
        streams.note_definition("h0", "u-1", "<domain>one</domain>");
        streams.note_definition("h0", "u-2", "<domain>two</domain>");
        let view = |host: &str, state: HostState, not_a_target: Option<&str>| {
            let host = HostId::new(host);
            let v = crate::engine::HostView {
                host: host.clone(),
                state,
                incident: None,
                last_seen: None,
                evacuated: vec![],
                back: false,
                not_a_target: not_a_target.map(str::to_string),
                unprotected: vec![],
            };
            (host, v)
        };
        let (facts_tx, facts) = tokio::sync::watch::channel(Arc::new(
            [
                view("h1", HostState::Up, Some("its disk-lease daemon is down")),
                view("h2", HostState::Up, None),
            ]
            .into_iter()
            .collect(),
        ));
        let (r, mut results) = restorer(&streams);
        let mut r = r.with_host_facts(facts);
        let from = HostId::new("h0");
        r.evacuate(&Resource::vm("u-1"), &from, &key("1/evacuate-1/vm:u-1"));
        match next_outcome(&mut results).await {
            (_, _, RestoreOutcome::Ok { host }) => assert_eq!(host, HostId::new("h2")),
            other => panic!("{other:?}"),
        }
        assert!(seen2.recv().await.is_some());
        assert!(seen1.try_recv().is_err(), "h1 has lost its leases");

        facts_tx.send_replace(Arc::new(
            [
                view("h1", HostState::Up, Some("its disk-lease daemon is down")),
                view("h2", HostState::Maintenance, None),
            ]
            .into_iter()
            .collect(),
        ));
        r.evacuate(&Resource::vm("u-2"), &from, &key("1/evacuate-1/vm:u-2"));
        match next_outcome(&mut results).await {
            (_, _, RestoreOutcome::Failed { reason }) => {
                assert!(
                    reason.contains("h1 its disk-lease daemon is down"),
                    "{reason}"
                );
                assert!(reason.contains("h2 is Maintenance"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(seen1.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_failed_evacuation_is_retried_on_another_host_first_then_on_the_least_tried() {
        let streams = HostStreams::new();
        let no = Some(CommandAnswer {
            ok: false,
            detail: "disk /img is not on this host (not shared storage)".into(),
        });
        let (_r1, _seen1) = fake_stream(&streams, "h1", no.clone());
        let (_r2, _seen2) = fake_stream(&streams, "h2", no);
        streams.note_definition("h0", "u-1", "<domain/>");
        let (mut r, mut results) = restorer(&streams);
        let (vm, from) = (Resource::vm("u-1"), HostId::new("h0"));
        let mut tried = Vec::new();
        for attempt in 1..=3 {
            r.evacuate(&vm, &from, &key(&format!("1/evacuate-{attempt}/vm:u-1")));
            match next_outcome(&mut results).await {
                (_, _, RestoreOutcome::Failed { reason }) => tried.push(reason),
                other => panic!("{other:?}"),
            }
        }
        assert!(tried[0].starts_with("on h1: disk /img"), "{tried:?}");
        assert!(tried[1].starts_with("on h2: disk /img"), "{tried:?}");
        assert!(tried[2].starts_with("on h1: disk /img"), "{tried:?}");
        // With no other host connected at all, it fails at once.
        let lonely = HostStreams::new();
        lonely.note_definition("h0", "u-1", "<domain/>");
        let (mut alone, mut results) = restorer(&lonely);
        alone.evacuate(&vm, &from, &key("2/evacuate-1/vm:u-1"));
        match results.try_recv() {
            Ok(Input::RestoreResult {
                outcome: RestoreOutcome::Failed { reason },
                ..
            }) => assert!(
                reason.contains("no other host's watchdog is connected"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_evacuation_sent_and_never_answered_is_unknown_on_its_target_not_failed() {
        let streams = HostStreams::new();
        let (_r1, mut seen) = fake_stream(&streams, "h1", None);
        streams.note_definition("h0", "u-1", "<domain/>");
        let (mut r, mut results) = restorer(&streams);
        let started = tokio::time::Instant::now();
        r.evacuate(
            &Resource::vm("u-1"),
            &HostId::new("h0"),
            &key("1/evacuate-1/vm:u-1"),
        );
        assert!(seen.recv().await.is_some(), "the command was sent");
        let (_, _, outcome) = next_outcome(&mut results).await;
        assert!(started.elapsed() >= COMMAND_TIMEOUT);
        match outcome {
            RestoreOutcome::Unknown { target, reason } => {
                assert_eq!(target, Some(HostId::new("h1")));
                assert!(
                    reason.starts_with("on h1: no answer from the watchdog of h1"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_evacuation_whose_stream_closes_after_taking_it_is_unknown_on_that_host() {
        let streams = HostStreams::new();
        let (tx, mut rx) = mpsc::channel::<CommandRequest>(COMMANDS_QUEUED);
        let registration = streams.register("h1", tx);
        tokio::spawn(async move {
            let req = rx.recv().await;
            drop(registration);
            drop(req);
        });
        streams.note_definition("h0", "u-1", "<domain/>");
        let (mut r, mut results) = restorer(&streams);
        r.evacuate(&Resource::vm("u-1"), &HostId::new("h0"), &key("k"));
        match next_outcome(&mut results).await.2 {
            RestoreOutcome::Unknown { target, reason } => {
                assert_eq!(target, Some(HostId::new("h1")));
                assert!(
                    reason.contains("closed before the watchdog answered"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_evacuation_never_handed_to_a_stream_fails_because_nothing_was_sent() {
        let streams = HostStreams::new();
        // h1 is still listed, but its stream task is gone: the command cannot be handed.
        let (tx, rx) = mpsc::channel::<CommandRequest>(1);
        let _registration = streams.register("h1", tx);
        drop(rx);
        streams.note_definition("h0", "u-1", "<domain/>");
        let (mut r, mut results) = restorer(&streams);
        r.evacuate(&Resource::vm("u-1"), &HostId::new("h0"), &key("k"));
        match next_outcome(&mut results).await.2 {
            RestoreOutcome::Failed { reason } => {
                assert_eq!(reason, "on h1: the watchdog of h1 is not connected")
            }
            other => panic!("{other:?}"),
        }
    }

    async fn next_answer(
        rx: &mut mpsc::UnboundedReceiver<Input>,
    ) -> (HostId, Resource, Option<bool>) {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
            Ok(Some(Input::HostAnswer {
                host,
                resource,
                runs,
            })) => (host, resource, runs),
            other => panic!("expected a host answer, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn asking_a_host_sends_query_domain_and_its_answer_says_whether_the_vm_runs_there() {
        let streams = HostStreams::new();
        let answer = |ok: bool, detail: &str| {
            Some(CommandAnswer {
                ok,
                detail: detail.into(),
            })
        };
        let (_r1, mut seen1) = fake_stream(
            &streams,
            "h1",
            answer(true, "running: paused (starting_up)"),
        );
        let (_r2, _) = fake_stream(
            &streams,
            "h2",
            answer(true, "not running: not defined here"),
        );
        let (_r3, _) = fake_stream(
            &streams,
            "h3",
            answer(false, "cannot connect to qemu:///system"),
        );
        let (mut r, mut results) = restorer(&streams);
        let vm = Resource::vm("u-1");
        for (host, runs) in [("h1", Some(true)), ("h2", Some(false)), ("h3", None)] {
            r.ask_host(&HostId::new(host), &vm);
            assert_eq!(
                next_answer(&mut results).await,
                (HostId::new(host), vm.clone(), runs)
            );
        }
        let (id, command) = seen1.recv().await.unwrap();
        assert_eq!(
            command,
            HostCommand::QueryDomain {
                vm_uuid: "u-1".into()
            }
        );
        // Each query has an id of its own, unlike any intent's.
        r.ask_host(&HostId::new("h1"), &vm);
        next_answer(&mut results).await;
        let (again, _) = seen1.recv().await.unwrap();
        assert_ne!(id, again);
        // Not connected: not known, at once.
        r.ask_host(&HostId::new("h9"), &vm);
        match results.try_recv() {
            Ok(Input::HostAnswer {
                host, runs: None, ..
            }) => assert_eq!(host, HostId::new("h9")),
            other => panic!("expected an immediate answer, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_asked_again_before_it_answered_gets_one_query_and_silence_is_not_known() {
        let streams = HostStreams::new();
        let (_r1, mut seen) = fake_stream(&streams, "h1", None);
        let (mut r, mut results) = restorer(&streams);
        let (h1, vm) = (HostId::new("h1"), Resource::vm("u-1"));
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            r.ask_host(&h1, &vm);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(seen.recv().await.is_some());
        assert!(
            seen.try_recv().is_err(),
            "asked again while the first was in flight"
        );
        assert_eq!(
            next_answer(&mut results).await,
            (h1.clone(), vm.clone(), None)
        );
        assert!(started.elapsed() >= QUERY_TIMEOUT);
        // Once it is over, the next ask is sent.
        r.ask_host(&h1, &vm);
        assert!(seen.recv().await.is_some());
    }

    #[tokio::test]
    async fn without_nova_force_down_and_unfence_are_nothing_to_do_and_an_unknown_vm_cannot_move() {
        let streams = HostStreams::new();
        let (mut r, mut results) = restorer(&streams);
        let h = HostId::new("h1");
        r.force_down(&h, &key("f"));
        r.unfence(&h, &key("u"));
        r.evacuate(&Resource::vm("u-1"), &h, &key("e"));
        for _ in 0..2 {
            match results.try_recv() {
                Ok(Input::HostActionResult {
                    outcome: RestoreOutcome::Ok { host },
                    ..
                }) => assert_eq!(host, h),
                other => panic!("{other:?}"),
            }
        }
        match results.try_recv() {
            Ok(Input::RestoreResult {
                outcome: RestoreOutcome::Failed { reason },
                ..
            }) => assert!(reason.contains("no definition of u-1"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
