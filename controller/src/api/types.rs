//! The JSON bodies of the REST API, shared with `defibctl`.
//!
//! Lists come wrapped with the snapshot's `at_ms` (controller wall clock, unix ms) so a
//! client can show "3.2 s ago" against the controller's clock instead of its own.
use serde::{Deserialize, Serialize};

use crate::api::view::{AlarmSnapshot, HostSnapshot, IncidentSnapshot, ResourceSnapshot};
use crate::engine::TimelineEntry;

/// `GET /v1/hosts`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostsResponse {
    pub at_ms: u64,
    pub hosts: Vec<HostSnapshot>,
}

/// `GET /v1/hosts/{id}`: the host and the resources the engine places on it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostResponse {
    pub at_ms: u64,
    #[serde(flatten)]
    pub host: HostSnapshot,
    pub resources: Vec<ResourceSnapshot>,
}

/// `GET /v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmsResponse {
    pub at_ms: u64,
    pub vms: Vec<ResourceSnapshot>,
}

/// One incident in `GET /v1/incidents`: everything but the timeline, which is
/// summarised by its length and its last line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IncidentSummary {
    pub id: u64,
    pub subject: String,
    pub opened_at_ms: u64,
    pub closed_at_ms: Option<u64>,
    pub timeline_len: usize,
    pub last: Option<TimelineEntry>,
}

impl From<&IncidentSnapshot> for IncidentSummary {
    fn from(i: &IncidentSnapshot) -> Self {
        IncidentSummary {
            id: i.id,
            subject: i.subject.clone(),
            opened_at_ms: i.opened_at_ms,
            closed_at_ms: i.closed_at_ms,
            timeline_len: i.timeline.len(),
            last: i.timeline.last().cloned(),
        }
    }
}

/// `GET /v1/incidents`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IncidentsResponse {
    pub at_ms: u64,
    pub incidents: Vec<IncidentSummary>,
}

/// `GET /v1/incidents/{id}`: the incident with its full timeline.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IncidentResponse {
    pub at_ms: u64,
    #[serde(flatten)]
    pub incident: IncidentSnapshot,
}

/// `GET /v1/alarms`: newest last.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AlarmsResponse {
    pub at_ms: u64,
    pub alarms: Vec<AlarmSnapshot>,
}

/// Body of `PUT /v1/hosts/{id}/maintenance`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceRequest {
    pub on: bool,
}

/// Answer to `PUT /v1/hosts/{id}/maintenance`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MaintenanceResponse {
    pub host: String,
    pub maintenance: bool,
}

/// Answer to `POST /v1/hosts/{id}/unfence`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UnfenceResponse {
    pub host: String,
    pub unfenced: bool,
}

/// Answer to `POST` and `DELETE /v1/hosts/{id}/enrollment`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EnrollmentResponse {
    pub host: String,
    pub enrolled: bool,
    /// On enrollment: the host's key file contents (64 hex characters), to be written to
    /// the host's `controller.key_file` with mode 0600. It is derived from the master
    /// key, so asking again gives the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Every error: `{"error": "..."}` with a matching HTTP status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}
