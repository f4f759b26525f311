//! What the running controller shows the outside: a snapshot of the engine published
//! after every step (read by the REST API and `defibctl`), and the commands an operator
//! sends in. The engine task owns the engine; everyone else sees snapshots.
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::{AlarmKind, HostState, ResourceState, TimelineEntry};

/// The whole picture, as of `at_ms` (controller wall clock, unix ms).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub controller_id: String,
    pub cluster_id: String,
    pub at_ms: u64,
    pub hosts: Vec<HostSnapshot>,
    /// Every resource the engine tracks: VMs and routers (`kind` says which).
    pub resources: Vec<ResourceSnapshot>,
    pub incidents: Vec<IncidentSnapshot>,
    /// The most recent alarms, newest last (bounded).
    pub alarms: Vec<AlarmSnapshot>,
    /// This controller's role among the controllers, and who they are.
    #[serde(default)]
    pub role: RoleSnapshot,
}

/// Whether this controller leads, and the controllers it knows of.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RoleSnapshot {
    /// `leader` (acts), `follower` (hears heartbeats, acts on nothing), `starting`.
    pub role: String,
    /// Where intents live: `sqlite` (one controller) or `etcd` (several).
    pub store: String,
    /// The leading controller's id, if known.
    pub leader: Option<String>,
    /// The leader's API URL, if known.
    pub leader_api: Option<String>,
    /// Since when the leader leads (its wall clock, unix ms), if known.
    pub leader_since_ms: Option<u64>,
    /// How many times this controller became leader since it started.
    pub terms: u64,
    /// Why this controller does not lead or cannot campaign, if there is a reason
    /// beyond another controller leading (etcd unreachable, lease lost...).
    pub problem: Option<String>,
    /// Why this controller's last term ended.
    pub last_step_down: Option<String>,
    /// Every controller with a live lease (with etcd), or just this one (SQLite).
    pub controllers: Vec<ControllerSnapshot>,
}

/// One controller.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ControllerSnapshot {
    pub id: String,
    pub api: String,
    /// When it started (its wall clock, unix ms).
    pub started_ms: u64,
    /// Whether it leads.
    pub leader: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostSnapshot {
    pub host: String,
    pub state: HostState,
    pub incident: Option<u64>,
    /// Last heartbeat on any path (unix ms, controller clock).
    pub last_heartbeat_ms: Option<u64>,
    /// Last heartbeat per network path.
    pub paths: Vec<PathSnapshot>,
    /// From the latest heartbeat's status summary.
    pub vm_count: u32,
    pub stalled_vm_count: u32,
    pub isolated: bool,
    /// The watchdog's self-fence as its latest heartbeat reports it: `off`, `armed
    /// (isolation timeout N ms)`, or `not armed: <why>` (such a host is never counted
    /// fenced by its silence).
    #[serde(default)]
    pub self_fence: String,
    pub boot_id: Option<String>,
    pub incarnation: Option<u64>,
    /// Resources restored elsewhere by this host's incidents since its fence (its
    /// stale copies: the stale-router report), until it is unfenced.
    #[serde(default)]
    pub evacuated: Vec<String>,
    /// Why nothing is restored onto this host now (its disk leases are lost), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_a_target: Option<String>,
    /// VMs running on it without the protection of their disk leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unprotected: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PathSnapshot {
    pub path: u16,
    /// Where heartbeats on this path come from (ip:port).
    pub peer: Option<String>,
    pub last_heartbeat_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResourceSnapshot {
    /// `vm:<uuid>` or `router:<id>`.
    pub resource: String,
    pub kind: String,
    pub id: String,
    pub host: String,
    pub state: ResourceState,
    pub owner: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IncidentSnapshot {
    pub id: u64,
    /// `host:<id>`, `vm:<uuid>`, ...
    pub subject: String,
    pub opened_at_ms: u64,
    pub closed_at_ms: Option<u64>,
    pub timeline: Vec<TimelineEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AlarmSnapshot {
    pub at_ms: u64,
    pub kind: AlarmKind,
    pub host: Option<String>,
    pub resource: Option<String>,
    pub reason: String,
}

/// An operator's command, answered once the engine has taken it in.
#[derive(Debug)]
pub enum Command {
    Maintenance {
        host: String,
        on: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Unfence {
        host: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Enroll (`enroll = true`, answered with the host's key file contents) or revoke a
    /// host: which hosts the controller takes heartbeats and streams from.
    Enrollment {
        host: String,
        enroll: bool,
        reply: oneshot::Sender<Result<Option<String>, String>>,
    },
}

/// What the API needs from the runtime.
#[derive(Clone)]
pub struct ApiHandle {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub commands: mpsc::Sender<Command>,
    pub metrics: Arc<crate::metrics::Metrics>,
}
