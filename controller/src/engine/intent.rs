//! Intents: every action that changes the world is written down, with an idempotency
//! key, before it is carried out (DESIGN rule 3).
//!
//! Keys are derived from meaning, not from a counter: `"{scope}/{step}/{target}"`, for
//! example `i4/fence-1/host:cmp-07` or `i4/evacuate-2/vm:5f0c…` for an incident's steps,
//! `op/unfence@1796407896480/host:cmp-07` for an operator's command. A restarted engine
//! that reaches the same decision computes the same key, sees it in the log and does not
//! act twice.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ids::{HostId, HostTime, IncidentId, Resource, Timestamp};
use super::types::{Action, FenceMethod, FenceOutcome, RestoreOutcome};

/// An idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IntentKey(pub String);

/// Whose decision an intent carries out: the first part of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyScope {
    /// A step of an incident (`i4`).
    Incident(IncidentId),
    /// An operator's command (`op`).
    Operator,
    /// A policy the operator configured, such as the automatic unfence (`policy`).
    Policy,
}

impl From<IncidentId> for KeyScope {
    fn from(id: IncidentId) -> Self {
        KeyScope::Incident(id)
    }
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyScope::Incident(id) => id.fmt(f),
            KeyScope::Operator => f.write_str("op"),
            KeyScope::Policy => f.write_str("policy"),
        }
    }
}

impl IntentKey {
    /// `"{scope}/{step}/{target}"`.
    pub fn derive(scope: impl Into<KeyScope>, step: &str, target: &dyn fmt::Display) -> Self {
        IntentKey(format!("{}/{step}/{target}", scope.into()))
    }
    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IntentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an intent is about to do. Carries enough to rebuild the engine's state on
/// replay (`Engine::resume`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Fence a host for a host incident; `resources` is what the incident owns.
    Fence {
        /// The host.
        host: HostId,
        /// The host incident.
        incident: IncidentId,
        /// 1-based try.
        attempt: u32,
        /// The method asked for; `None` for a self-fence deadline decision (no action).
        method: Option<FenceMethod>,
        /// Resources the host incident owns.
        resources: Vec<Resource>,
        /// Of `resources`, those whose every disk is on RBD as the host last listed
        /// them: what a storage fence (Ceph blocklist) alone may restore. Kept in the
        /// intent so that a resumed engine, which cannot ask a dead host, knows it.
        #[serde(default)]
        rbd_only: Vec<Resource>,
    },
    /// Force the compute service down before evacuating.
    ForceDown {
        /// The host.
        host: HostId,
        /// The host incident.
        incident: IncidentId,
        /// 1-based try.
        attempt: u32,
        /// Resources the host incident owns (may have grown since the fence).
        resources: Vec<Resource>,
    },
    /// Restart a resource on its host.
    RestartInPlace {
        /// The resource.
        resource: Resource,
        /// Its host.
        host: HostId,
        /// The resource incident.
        incident: IncidentId,
        /// 1-based try in the window.
        attempt: u32,
    },
    /// Restore a resource elsewhere.
    Evacuate {
        /// The resource.
        resource: Resource,
        /// Where it was.
        from: HostId,
        /// The owning incident (host or resource incident).
        incident: IncidentId,
        /// 1-based try.
        attempt: u32,
    },
    /// A host said it runs a resource whose restore was not answered (recorded so that
    /// a restarted controller knows where it runs: asked again, the host might be
    /// fenced or gone by then). Carried out by nothing; completed at once.
    FoundRunning {
        /// The resource.
        resource: Resource,
        /// The host the unanswered restore moved it off (for a restart in place, the
        /// host it runs on).
        from: HostId,
        /// The incident whose restore it was.
        incident: IncidentId,
        /// That restore's try.
        attempt: u32,
        /// A restart in place, not an evacuation.
        restart: bool,
    },
    /// Operator: maintenance on/off (recorded so that it survives a restart).
    Maintenance {
        /// The host.
        host: HostId,
        /// On or off.
        on: bool,
    },
    /// Operator: trust a host again.
    Unfence {
        /// The host.
        host: HostId,
        /// Trusted before it was back (not heard since its fence): what was moved off
        /// it stays marked until a listing of its return settles it (logs from before
        /// this field read as `false`).
        #[serde(default)]
        before_return: bool,
    },
}

impl Intent {
    /// The action that carries the intent out, if it has one (maintenance and
    /// self-fence decisions are records only).
    pub fn action(&self, key: &IntentKey) -> Option<Action> {
        let key = key.clone();
        match self {
            Intent::Fence {
                host,
                method: Some(m),
                ..
            } => Some(Action::Fence {
                host: host.clone(),
                method_hint: *m,
                key,
            }),
            Intent::Fence { method: None, .. } => None,
            Intent::ForceDown { host, .. } => Some(Action::ForceDown {
                host: host.clone(),
                key,
            }),
            Intent::RestartInPlace {
                resource,
                host,
                attempt,
                ..
            } => Some(Action::RestartInPlace {
                resource: resource.clone(),
                host: host.clone(),
                attempt: *attempt,
                key,
            }),
            Intent::Evacuate { resource, from, .. } => Some(Action::Evacuate {
                resource: resource.clone(),
                from: from.clone(),
                key,
            }),
            Intent::Unfence { host, .. } => Some(Action::Unfence {
                host: host.clone(),
                key,
            }),
            Intent::Maintenance { .. } | Intent::FoundRunning { .. } => None,
        }
    }

    /// The resource a resource-level intent acts on.
    pub fn resource(&self) -> Option<&Resource> {
        match self {
            Intent::RestartInPlace { resource, .. } | Intent::Evacuate { resource, .. } => {
                Some(resource)
            }
            _ => None,
        }
    }

    /// The incident it belongs to.
    pub fn incident(&self) -> Option<IncidentId> {
        match self {
            Intent::Fence { incident, .. }
            | Intent::ForceDown { incident, .. }
            | Intent::RestartInPlace { incident, .. }
            | Intent::Evacuate { incident, .. }
            | Intent::FoundRunning { incident, .. } => Some(*incident),
            _ => None,
        }
    }
}

/// How an intent ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IntentOutcome {
    /// A fence result.
    Fence(FenceOutcome),
    /// A restore or force-down result.
    Restore(RestoreOutcome),
    /// A record-only decision (maintenance, unfence).
    Recorded,
}

/// One row of the intent log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// The idempotency key (unique).
    pub key: IntentKey,
    /// When it was decided.
    pub at: Timestamp,
    /// What it does.
    pub intent: Intent,
}

/// How and when an intent ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// When the result was taken in (controller clock).
    pub at: Timestamp,
    /// The result.
    pub outcome: IntentOutcome,
    /// For a restore that succeeded: the clock of the host the resource runs on now, as
    /// last heard when the result was taken in. News from that host stamped before it
    /// happened before the restore (a late account of the failure it cured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_clock: Option<HostTime>,
    /// For a verified power fence (IPMI, Pacemaker): the watchdog process the host was
    /// last heard from when the result was taken in, `(boot id, incarnation)`. Heard
    /// from it after the fence, the host never lost power; kept here so that a resumed
    /// engine still knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_watchdog: Option<(u64, u64)>,
}

/// A row with its completion, as [`IntentLog::entries`] returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentEntry {
    /// The record.
    pub record: IntentRecord,
    /// Its completion once done.
    pub done: Option<Completion>,
}

/// The store's intent table. Small on purpose: a SQLite or etcd store implements these
/// four methods. Entries come back in the order they were recorded.
pub trait IntentLog {
    /// Writes a new intent. Recording a key that exists is a no-op.
    fn record(&mut self, record: IntentRecord);
    /// Marks an intent done. Unknown or already-done keys are a no-op.
    fn mark_done(&mut self, key: &IntentKey, completion: Completion);
    /// Every intent, in recording order.
    fn entries(&self) -> Vec<IntentEntry>;
    /// The intents recorded but not done.
    fn open(&self) -> Vec<IntentRecord> {
        self.entries()
            .into_iter()
            .filter(|e| e.done.is_none())
            .map(|e| e.record)
            .collect()
    }
}

/// An in-memory [`IntentLog`] (the simulation's store).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryIntentLog {
    entries: Vec<IntentEntry>,
    index: BTreeMap<IntentKey, usize>,
}

impl MemoryIntentLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }
    /// Whether the key was recorded.
    pub fn contains(&self, key: &IntentKey) -> bool {
        self.index.contains_key(key)
    }
    /// The entry for a key.
    pub fn get(&self, key: &IntentKey) -> Option<&IntentEntry> {
        self.index.get(key).map(|&i| &self.entries[i])
    }
    /// Every entry, in recording order, without copying.
    pub fn iter(&self) -> impl Iterator<Item = &IntentEntry> {
        self.entries.iter()
    }
    /// Number of intents recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// No intent recorded yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Applies the store-related actions of a batch (what a runtime does with
    /// [`Action::PersistIntent`] and [`Action::CompleteIntent`]).
    pub fn apply(&mut self, action: &Action) {
        match action {
            Action::PersistIntent(r) => self.record(r.clone()),
            Action::CompleteIntent { key, completion } => self.mark_done(key, completion.clone()),
            _ => {}
        }
    }
}

impl IntentLog for MemoryIntentLog {
    fn record(&mut self, record: IntentRecord) {
        if self.index.contains_key(&record.key) {
            return;
        }
        self.index.insert(record.key.clone(), self.entries.len());
        self.entries.push(IntentEntry { record, done: None });
    }

    fn mark_done(&mut self, key: &IntentKey, completion: Completion) {
        if let Some(&i) = self.index.get(key) {
            let e = &mut self.entries[i];
            if e.done.is_none() {
                e.done = Some(completion);
            }
        }
    }

    fn entries(&self) -> Vec<IntentEntry> {
        self.entries.clone()
    }
}
