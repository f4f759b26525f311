//! The controller's REST API (read by `defibctl`, Prometheus and operators' scripts).
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /healthz` | no | `{"status":"ok","controller":ID,"role":"leader"\|"follower"\|"starting","leader":ID}` |
//! | `GET /metrics` | no | Prometheus text |
//! | `GET /v1/hosts` | yes | every host ([`HostsResponse`]) |
//! | `GET /v1/hosts/{id}` | yes | one host and its resources ([`HostResponse`]) |
//! | `PUT /v1/hosts/{id}/maintenance` | yes | body `{"on": true\|false}` |
//! | `POST /v1/hosts/{id}/unfence` | yes | trust a fenced host again |
//! | `POST /v1/hosts/{id}/enrollment` | yes | enroll a host; the answer carries its key ([`EnrollmentResponse`]) |
//! | `DELETE /v1/hosts/{id}/enrollment` | yes | revoke a host: its heartbeats and streams are refused |
//! | `GET /v1/vms[?host=ID]` | yes | resources ([`VmsResponse`]) |
//! | `GET /v1/incidents` | yes | incidents without their timelines ([`IncidentsResponse`]) |
//! | `GET /v1/incidents/{id}` | yes | one incident with its timeline ([`IncidentResponse`]); `12` or `i12` |
//! | `GET /v1/alarms` | yes | recent alarms, newest last ([`AlarmsResponse`]) |
//! | `GET /v1/controllers` | yes | this controller's role, the leader, every controller ([`RoleSnapshot`]) |
//! | `GET /v1/snapshot` | yes | the whole [`Snapshot`] |
//!
//! When a token is configured, every `/v1` route wants `Authorization: Bearer <token>`
//! (compared in constant time). Errors are `{"error": "..."}` with a fitting status:
//! 400 bad request, 401 no or wrong token, 404 unknown host/incident/route, 405 wrong
//! method, 409 the engine refused a command (the body says why), 413 a body over
//! [`MAX_BODY_BYTES`], 503 the engine did not answer a command within
//! [`COMMAND_TIMEOUT`] or is not running, or the request took over [`REQUEST_TIMEOUT`].
//!
//! [`serve()`] serves the router, over TLS when the controller has a certificate.
//!
//! The API never touches the engine directly: reads come from the latest published
//! [`Snapshot`], commands go over [`ApiHandle::commands`] and wait for the engine's reply.
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::api::view::{ApiHandle, Command, RoleSnapshot, Snapshot};

pub mod serve;
mod types;
pub mod view;
/// The engine's and the runtime's types the API's bodies and handle carry: a client
/// (`defibctl`) needs nothing but this module.
pub use crate::engine::{
    utc_ms, AlarmKind, HostId, HostState, ResourceState, Source, Subject, TimelineEntry, Timestamp,
};
pub use crate::metrics::Metrics;
pub use serve::serve;
pub use types::*;

#[cfg(test)]
mod tests;

/// How long a command waits for the engine's answer before the API gives up with 503.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest request body the API reads (its bodies are a few bytes of JSON).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The longest a request may take, its body included, from its headers to its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The content type of `/metrics` (Prometheus text exposition format).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The default listen address of the API (and `defibctl`'s default URL).
pub const DEFAULT_PORT: u16 = 7412;

#[derive(Clone)]
struct AppState {
    handle: ApiHandle,
    /// The expected bearer token, trimmed; `None`: no auth.
    token: Option<Arc<[u8]>>,
}

/// The API's router. `token`: the bearer token every `/v1` route requires (surrounding
/// whitespace, such as a token file's final newline, is ignored); `None` disables auth.
/// A token that is empty after trimming refuses every `/v1` request.
pub fn router(handle: ApiHandle, token: Option<String>) -> Router {
    let token = token.map(|t| Arc::<[u8]>::from(t.trim().as_bytes()));
    let state = AppState { handle, token };
    let v1 = Router::new()
        .route("/hosts", get(hosts))
        .route("/hosts/{id}", get(host))
        .route("/hosts/{id}/maintenance", put(maintenance))
        .route("/hosts/{id}/unfence", post(unfence))
        .route("/hosts/{id}/enrollment", post(enroll).delete(revoke))
        .route("/vms", get(vms))
        .route("/incidents", get(incidents))
        .route("/incidents/{id}", get(incident))
        .route("/alarms", get(alarms))
        .route("/controllers", get(controllers))
        .route("/snapshot", get(snapshot))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        // Outermost first: the size is refused before any route runs.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(limit_request))
}

/// A declared body over [`MAX_BODY_BYTES`] is refused at once (a body without a
/// length is cut by the extractor, [`DefaultBodyLimit`]); every request ends within
/// [`REQUEST_TIMEOUT`].
async fn limit_request(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return ApiError::too_large().into_response();
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::unavailable(format!(
            "the request took over {} s",
            REQUEST_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

/// An error answer: `{"error": message}` with `status`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY_BYTES} bytes"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        let Some(given) = bearer_token(req.headers()) else {
            return ApiError::unauthorized("missing bearer token (Authorization: Bearer <token>)")
                .into_response();
        };
        if !token_matches(expected, given.as_bytes()) {
            return ApiError::unauthorized("token rejected").into_response();
        }
    }
    next.run(req).await
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Constant-time in the contents (the length is not secret); an empty expected token
/// matches nothing.
fn token_matches(expected: &[u8], given: &[u8]) -> bool {
    !expected.is_empty() && bool::from(expected.ct_eq(given))
}

fn latest(state: &AppState) -> Arc<Snapshot> {
    state.handle.snapshot.borrow().clone()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        state.handle.metrics.encode(),
    )
}

/// Liveness with the role: a follower is healthy too (it is ready to take over).
async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    let snap = latest(&state);
    let role = if snap.role.role.is_empty() {
        "starting"
    } else {
        snap.role.role.as_str()
    };
    Json(serde_json::json!({
        "status": "ok",
        "controller": snap.controller_id,
        "role": role,
        "leader": snap.role.leader,
    }))
}

async fn controllers(State(state): State<AppState>) -> Json<RoleSnapshot> {
    Json(latest(&state).role.clone())
}

async fn snapshot(State(state): State<AppState>) -> Json<Snapshot> {
    Json(Snapshot::clone(&latest(&state)))
}

async fn hosts(State(state): State<AppState>) -> Json<HostsResponse> {
    let snap = latest(&state);
    Json(HostsResponse {
        at_ms: snap.at_ms,
        hosts: snap.hosts.clone(),
    })
}

async fn host(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<HostResponse> {
    let snap = latest(&state);
    let host = snap
        .hosts
        .iter()
        .find(|h| h.host == id)
        .ok_or_else(|| ApiError::not_found(format!("no host named {id:?}")))?;
    Ok(Json(HostResponse {
        at_ms: snap.at_ms,
        host: host.clone(),
        resources: snap
            .resources
            .iter()
            .filter(|v| v.host == id)
            .cloned()
            .collect(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmsQuery {
    host: Option<String>,
}

async fn vms(
    State(state): State<AppState>,
    query: Result<Query<VmsQuery>, QueryRejection>,
) -> ApiResult<VmsResponse> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let snap = latest(&state);
    let vms = snap
        .resources
        .iter()
        .filter(|v| query.host.as_ref().is_none_or(|h| &v.host == h))
        .cloned()
        .collect();
    Ok(Json(VmsResponse {
        at_ms: snap.at_ms,
        vms,
    }))
}

async fn incidents(State(state): State<AppState>) -> Json<IncidentsResponse> {
    let snap = latest(&state);
    Json(IncidentsResponse {
        at_ms: snap.at_ms,
        incidents: snap.incidents.iter().map(IncidentSummary::from).collect(),
    })
}

/// An incident id as written by people: `12` or `i12` (the engine's display form).
fn parse_incident_id(raw: &str) -> Option<u64> {
    raw.strip_prefix('i').unwrap_or(raw).parse().ok()
}

async fn incident(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> ApiResult<IncidentResponse> {
    let id = parse_incident_id(&raw).ok_or_else(|| {
        ApiError::bad_request(format!(
            "bad incident id {raw:?}: expected a number such as 12 or i12"
        ))
    })?;
    let snap = latest(&state);
    let incident = snap
        .incidents
        .iter()
        .find(|i| i.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no incident {id}")))?;
    Ok(Json(IncidentResponse {
        at_ms: snap.at_ms,
        incident: incident.clone(),
    }))
}

async fn alarms(State(state): State<AppState>) -> Json<AlarmsResponse> {
    let snap = latest(&state);
    Json(AlarmsResponse {
        at_ms: snap.at_ms,
        alarms: snap.alarms.clone(),
    })
}

/// Parses a JSON body whatever its content type (curl's `-d` sends form encoding), so
/// that every mistake is a 400 naming the problem (and a body over
/// [`MAX_BODY_BYTES`] a 413).
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(),
        status => ApiError::new(status, e.body_text()),
    })?;
    if body.is_empty() {
        return Err(ApiError::bad_request("missing JSON body"));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn maintenance(
    State(state): State<AppState>,
    Path(host): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<MaintenanceResponse> {
    let MaintenanceRequest { on } = json_body(body)?;
    let h = host.clone();
    send_command(&state, move |reply| Command::Maintenance {
        host: h,
        on,
        reply,
    })
    .await?;
    Ok(Json(MaintenanceResponse {
        host,
        maintenance: on,
    }))
}

async fn unfence(
    State(state): State<AppState>,
    Path(host): Path<String>,
) -> ApiResult<UnfenceResponse> {
    let h = host.clone();
    send_command(&state, move |reply| Command::Unfence { host: h, reply }).await?;
    Ok(Json(UnfenceResponse {
        host,
        unfenced: true,
    }))
}

/// Enrolls a host: from now on its heartbeats and streams are taken, signed with its own
/// key, which the answer carries (install it as the host's `controller.key_file`).
async fn enroll(
    State(state): State<AppState>,
    Path(host): Path<String>,
) -> ApiResult<EnrollmentResponse> {
    let h = host.clone();
    let key = send_command(&state, move |reply| Command::Enrollment {
        host: h,
        enroll: true,
        reply,
    })
    .await?;
    Ok(Json(EnrollmentResponse {
        host,
        enrolled: true,
        key,
    }))
}

/// Revokes a host: its heartbeats and streams are refused from the next one on.
async fn revoke(
    State(state): State<AppState>,
    Path(host): Path<String>,
) -> ApiResult<EnrollmentResponse> {
    let h = host.clone();
    send_command(&state, move |reply| Command::Enrollment {
        host: h,
        enroll: false,
        reply,
    })
    .await?;
    Ok(Json(EnrollmentResponse {
        host,
        enrolled: false,
        key: None,
    }))
}

/// Hands a command to the engine and waits (at most [`COMMAND_TIMEOUT`], queueing
/// included) for its answer; a refusal is 409 with the engine's reason.
async fn send_command<T>(
    state: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let command = make(tx);
    let exchange = async {
        state
            .handle
            .commands
            .send(command)
            .await
            .map_err(|_| ApiError::unavailable("the engine is not running"))?;
        match rx.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(reason)) => Err(ApiError::new(StatusCode::CONFLICT, reason)),
            Err(_) => Err(ApiError::unavailable(
                "the engine dropped the command without answering",
            )),
        }
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::unavailable(format!(
            "the engine did not answer within {} s",
            COMMAND_TIMEOUT.as_secs()
        ))),
    }
}
