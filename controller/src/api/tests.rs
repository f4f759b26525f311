//! The REST API against hand-made snapshots, through tower's `oneshot`: routes, auth, bodies and errors.
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

use super::*;
use crate::api::view::{
    AlarmSnapshot, HostSnapshot, IncidentSnapshot, PathSnapshot, ResourceSnapshot,
};
use crate::engine::{
    AlarmKind, HostId, HostState, Resource, ResourceState, Source, Subject, TimelineEntry,
    Timestamp,
};
use crate::metrics::Metrics;

const TOKEN: &str = "s3cret-token";
const NOW: u64 = 1_700_000_010_000;

fn entry(at: u64, from: &str, to: &str, cause: &str, source: Source) -> TimelineEntry {
    TimelineEntry {
        at: Timestamp::from_millis(at),
        subject: Subject::Host(HostId::new("h2")),
        from: from.into(),
        to: to.into(),
        cause: cause.into(),
        source,
    }
}

fn sample_snapshot() -> Snapshot {
    let host = |name: &str, state, incident, last: Option<u64>| HostSnapshot {
        host: name.into(),
        state,
        incident,
        last_heartbeat_ms: last,
        paths: last
            .map(|l| {
                vec![
                    PathSnapshot {
                        path: 0,
                        peer: Some("10.0.0.1:7411".into()),
                        last_heartbeat_ms: l,
                    },
                    PathSnapshot {
                        path: 1,
                        peer: None,
                        last_heartbeat_ms: l - 50,
                    },
                ]
            })
            .unwrap_or_default(),
        vm_count: 1,
        stalled_vm_count: 0,
        isolated: false,
        self_fence: "off".into(),
        boot_id: Some("b00t".into()),
        incarnation: Some(3),
        evacuated: vec![],
        not_a_target: None,
        unprotected: vec![],
    };
    let vm = |id: &str, host: &str, state, owner| ResourceSnapshot {
        resource: format!("vm:{id}"),
        kind: "vm".into(),
        id: id.into(),
        host: host.into(),
        state,
        owner,
    };
    Snapshot {
        controller_id: "ctl-1".into(),
        cluster_id: "lab".into(),
        at_ms: NOW,
        hosts: vec![
            host("h1", HostState::Up, None, Some(NOW - 100)),
            host("h2", HostState::Fencing, Some(1), Some(NOW - 4_000)),
        ],
        resources: vec![
            vm("aaaa", "h1", ResourceState::Running, None),
            vm(
                "bbbb",
                "h2",
                ResourceState::Evacuating { attempt: 1 },
                Some(1),
            ),
        ],
        incidents: vec![
            IncidentSnapshot {
                id: 1,
                subject: "host:h2".into(),
                opened_at_ms: NOW - 3_500,
                closed_at_ms: None,
                timeline: vec![
                    entry(
                        1_000,
                        "Up",
                        "Suspect",
                        "no heartbeat for 500 ms",
                        Source::Heartbeat,
                    ),
                    entry(1_200, "Suspect", "Confirming", "asking", Source::Controller),
                    entry(
                        1_900,
                        "Confirming",
                        "Fencing",
                        "not a member",
                        Source::Pacemaker,
                    ),
                ],
            },
            IncidentSnapshot {
                id: 2,
                subject: "vm:cccc".into(),
                opened_at_ms: NOW - 60_000,
                closed_at_ms: Some(NOW - 55_000),
                timeline: vec![TimelineEntry {
                    at: Timestamp::from_millis(5),
                    subject: Subject::Resource(Resource::vm("cccc")),
                    from: "Running".into(),
                    to: "Failed".into(),
                    cause: "SIGKILL".into(),
                    source: Source::Ebpf,
                }],
            },
        ],
        alarms: vec![AlarmSnapshot {
            at_ms: NOW - 1_000,
            kind: AlarmKind::FenceUnverified,
            host: Some("h2".into()),
            resource: None,
            reason: "BMC unreachable".into(),
        }],
        role: crate::api::view::RoleSnapshot {
            role: "leader".into(),
            store: "etcd".into(),
            leader: Some("ctl-1".into()),
            ..Default::default()
        },
    }
}

/// How the fake engine answers commands.
#[derive(Clone, Copy)]
enum Engine {
    /// Maintenance/unfence of h1 accepted, anything else refused with a reason.
    Answers,
    /// Takes commands and never answers (keeps the reply sender).
    Silent,
    /// Not running (receiver dropped).
    Gone,
}

fn app(token: Option<&str>, engine: Engine) -> (Router, Arc<Metrics>) {
    let (_snap_tx, snap_rx) = watch::channel(Arc::new(sample_snapshot()));
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(8);
    match engine {
        Engine::Answers => {
            tokio::spawn(async move {
                while let Some(cmd) = cmd_rx.recv().await {
                    match cmd {
                        Command::Maintenance { host, reply, .. } => {
                            let _ = reply.send(if host == "h1" {
                                Ok(())
                            } else {
                                Err(format!("{host} is being fenced"))
                            });
                        }
                        Command::Unfence { host, reply } => {
                            let _ = reply.send(if host == "h1" {
                                Ok(())
                            } else {
                                Err(format!("{host} is not fenced"))
                            });
                        }
                        Command::Enrollment {
                            host,
                            enroll,
                            reply,
                        } => {
                            let _ = reply.send(Ok(enroll.then(|| format!("key-of-{host}"))));
                        }
                    }
                }
            });
        }
        Engine::Silent => {
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Some(cmd) = cmd_rx.recv().await {
                    held.push(cmd);
                }
            });
        }
        Engine::Gone => drop(cmd_rx),
    }
    let metrics = Arc::new(Metrics::new());
    let handle = ApiHandle {
        snapshot: snap_rx,
        commands: cmd_tx,
        metrics: metrics.clone(),
    };
    (router(handle, token.map(str::to_string)), metrics)
}

struct Reply {
    status: StatusCode,
    content_type: Option<String>,
    www_authenticate: Option<String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", self.body))
            .to_string()
    }
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let text_header = |name| {
        resp.headers()
            .get(name)
            .map(|v: &header::HeaderValue| v.to_str().unwrap().to_string())
    };
    let content_type = text_header(header::CONTENT_TYPE);
    let www_authenticate = text_header(header::WWW_AUTHENTICATE);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    Reply {
        status,
        content_type,
        www_authenticate,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn get(app: &Router, uri: &str) -> Reply {
    call(app, Method::GET, uri, Some(TOKEN), None).await
}

#[tokio::test]
async fn healthz_answers_ok_without_a_token() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = call(&app, Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["role"], "leader", "{v}");
    assert_eq!(v["leader"], "ctl-1", "{v}");
}

#[tokio::test]
async fn metrics_are_prometheus_text_without_a_token() {
    let (app, metrics) = app(Some(TOKEN), Engine::Answers);
    metrics.events_received.inc();
    let r = call(&app, Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.content_type
            .as_deref()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.content_type
    );
    assert!(
        r.body.contains("defib_events_received_total 1"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_v1_route_without_a_token_is_refused_with_401_and_a_json_error() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = call(&app, Method::GET, "/v1/hosts", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.error().contains("missing bearer token"), "{}", r.body);
    assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"));
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_401() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    for wrong in ["s3cret-tokeN", "s3cret", "s3cret-token-and-more"] {
        let r = call(&app, Method::GET, "/v1/hosts", Some(wrong), None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{wrong}");
        assert_eq!(r.error(), "token rejected");
    }
}

#[tokio::test]
async fn a_non_bearer_authorization_header_is_refused() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let req = Request::builder()
        .uri("/v1/hosts")
        .header(header::AUTHORIZATION, format!("Basic {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn commands_also_require_the_token() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = call(
        &app,
        Method::PUT,
        "/v1/hosts/h1/maintenance",
        None,
        Some(r#"{"on":true}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_right_token_is_accepted_and_surrounding_whitespace_in_the_configured_one_is_ignored() {
    let (app, _) = app(Some("  s3cret-token\n"), Engine::Answers);
    let r = get(&app, "/v1/hosts").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn an_empty_configured_token_refuses_everything_rather_than_allowing_everything() {
    let (app, _) = app(Some("\n"), Engine::Answers);
    let r = call(&app, Method::GET, "/v1/hosts", Some(""), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&app, Method::GET, "/v1/hosts", Some("x"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_a_configured_token_no_auth_is_needed() {
    let (app, _) = app(None, Engine::Answers);
    let r = call(&app, Method::GET, "/v1/hosts", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn hosts_lists_every_host_with_its_state_and_heartbeat_paths() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = get(&app, "/v1/hosts").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    let parsed: HostsResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(parsed.at_ms, NOW);
    assert_eq!(parsed.hosts, sample_snapshot().hosts);
    let v = r.json();
    assert_eq!(v["hosts"][0]["host"], "h1");
    assert_eq!(v["hosts"][0]["state"], "Up");
    assert_eq!(v["hosts"][0]["paths"][1]["last_heartbeat_ms"], NOW - 150);
    assert_eq!(v["hosts"][1]["state"], "Fencing");
    assert_eq!(v["hosts"][1]["incident"], 1);
}

#[tokio::test]
async fn one_host_comes_with_the_resources_on_it() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = get(&app, "/v1/hosts/h2").await;
    assert_eq!(r.status, StatusCode::OK);
    let parsed: HostResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(parsed.host.host, "h2");
    assert_eq!(parsed.host.state, HostState::Fencing);
    assert_eq!(parsed.resources.len(), 1);
    assert_eq!(parsed.resources[0].id, "bbbb");
}

#[tokio::test]
async fn an_unknown_host_is_404() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = get(&app, "/v1/hosts/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.error().contains("nope"), "{}", r.body);
}

#[tokio::test]
async fn vms_lists_resources_and_can_be_filtered_by_host() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let all: VmsResponse = serde_json::from_str(&get(&app, "/v1/vms").await.body).unwrap();
    assert_eq!(all.vms, sample_snapshot().resources);
    let v = get(&app, "/v1/vms").await.json();
    assert_eq!(v["vms"][1]["state"]["Evacuating"]["attempt"], 1);
    assert_eq!(v["vms"][1]["owner"], 1);

    let on_h1: VmsResponse =
        serde_json::from_str(&get(&app, "/v1/vms?host=h1").await.body).unwrap();
    assert_eq!(on_h1.vms.len(), 1);
    assert_eq!(on_h1.vms[0].host, "h1");

    let r = get(&app, "/v1/vms?colour=red").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("colour"), "{}", r.body);
}

#[tokio::test]
async fn incidents_are_listed_with_a_timeline_length_instead_of_the_timeline() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = get(&app, "/v1/incidents").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert!(v["incidents"][0].get("timeline").is_none(), "{}", r.body);
    let parsed: IncidentsResponse = serde_json::from_str(&r.body).unwrap();
    assert_eq!(parsed.incidents.len(), 2);
    let first = &parsed.incidents[0];
    assert_eq!(
        (first.id, first.subject.as_str(), first.timeline_len),
        (1, "host:h2", 3)
    );
    assert_eq!(first.last.as_ref().unwrap().to, "Fencing");
    assert_eq!(parsed.incidents[1].closed_at_ms, Some(NOW - 55_000));
}

#[tokio::test]
async fn one_incident_comes_with_its_full_timeline_by_number_or_display_id() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    for uri in ["/v1/incidents/1", "/v1/incidents/i1"] {
        let r = get(&app, uri).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        let parsed: IncidentResponse = serde_json::from_str(&r.body).unwrap();
        assert_eq!(parsed.incident, sample_snapshot().incidents[0]);
        assert_eq!(r.json()["timeline"][2]["source"], "Pacemaker");
        assert_eq!(r.json()["timeline"][0]["subject"]["Host"], "h2");
    }
}

#[tokio::test]
async fn an_unknown_incident_is_404_and_a_malformed_id_is_400() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = get(&app, "/v1/incidents/99").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), "no incident 99");
    let r = get(&app, "/v1/incidents/abc").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("abc"), "{}", r.body);
}

#[tokio::test]
async fn alarms_and_the_whole_snapshot_are_served() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let alarms: AlarmsResponse = serde_json::from_str(&get(&app, "/v1/alarms").await.body).unwrap();
    assert_eq!(alarms.alarms, sample_snapshot().alarms);
    assert_eq!(
        get(&app, "/v1/alarms").await.json()["alarms"][0]["kind"],
        "FenceUnverified"
    );
    let snap: Snapshot = serde_json::from_str(&get(&app, "/v1/snapshot").await.body).unwrap();
    assert_eq!(snap, sample_snapshot());
}

#[tokio::test]
async fn maintenance_on_and_off_round_trips_through_the_engine() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    for on in [true, false] {
        let r = call(
            &app,
            Method::PUT,
            "/v1/hosts/h1/maintenance",
            Some(TOKEN),
            Some(&format!(r#"{{"on": {on}}}"#)),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let parsed: MaintenanceResponse = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            parsed,
            MaintenanceResponse {
                host: "h1".into(),
                maintenance: on
            }
        );
    }
}

#[tokio::test]
async fn a_maintenance_the_engine_refuses_is_409_with_its_reason() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = call(
        &app,
        Method::PUT,
        "/v1/hosts/h2/maintenance",
        Some(TOKEN),
        Some(r#"{"on":true}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.error(), "h2 is being fenced");
}

#[tokio::test]
async fn unfence_is_accepted_or_refused_by_the_engine() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = call(
        &app,
        Method::POST,
        "/v1/hosts/h1/unfence",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["unfenced"], true);
    let r = call(
        &app,
        Method::POST,
        "/v1/hosts/h2/unfence",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.error(), "h2 is not fenced");
}

#[tokio::test]
async fn a_bad_maintenance_body_is_400_naming_the_problem() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let cases = [
        ("{\"on\": tru", "invalid JSON body"),
        ("{}", "missing field `on`"),
        ("{\"on\": \"yes\"}", "invalid type"),
        ("{\"on\": true, \"for\": 3}", "unknown field `for`"),
        ("", "missing JSON body"),
    ];
    for (body, expected) in cases {
        let r = call(
            &app,
            Method::PUT,
            "/v1/hosts/h1/maintenance",
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert!(r.error().contains(expected), "{body:?}: {}", r.body);
    }
}

#[tokio::test(start_paused = true)]
async fn a_command_the_engine_does_not_answer_within_5_s_is_503() {
    let (app, _) = app(Some(TOKEN), Engine::Silent);
    let r = call(
        &app,
        Method::PUT,
        "/v1/hosts/h1/maintenance",
        Some(TOKEN),
        Some(r#"{"on":true}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.error().contains("did not answer within 5 s"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn a_command_when_the_engine_is_gone_is_503() {
    let (app, _) = app(Some(TOKEN), Engine::Gone);
    let r = call(
        &app,
        Method::POST,
        "/v1/hosts/h1/unfence",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error(), "the engine is not running");
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json_errors() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let r = get(&app, "/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), "no such route");
    let r = call(&app, Method::DELETE, "/v1/hosts", Some(TOKEN), None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.error().contains("method not allowed"), "{}", r.body);
    let r = call(
        &app,
        Method::GET,
        "/v1/hosts/h1/maintenance",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[test]
fn bearer_tokens_are_parsed_case_insensitively_and_empty_ones_ignored() {
    let mut h = HeaderMap::new();
    assert_eq!(bearer_token(&h), None);
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("bearer  abc "),
    );
    assert_eq!(bearer_token(&h), Some("abc"));
    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
    assert_eq!(bearer_token(&h), None);
    assert!(token_matches(b"abc", b"abc"));
    assert!(!token_matches(b"abc", b"abd"));
    assert!(!token_matches(b"", b""));
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413_and_a_json_error() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    // A body without a declared length: cut by the extractor.
    let big = format!(r#"{{"on": true, "pad": "{}"}}"#, "x".repeat(MAX_BODY_BYTES));
    let r = call(
        &app,
        Method::PUT,
        "/v1/hosts/h1/maintenance",
        Some(TOKEN),
        Some(&big),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(r.error(), "request body over 65536 bytes");
    // A declared length over the limit: refused before any route runs, even one that
    // reads no body, and before the token is looked at.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/hosts/h1/unfence")
        .header(header::CONTENT_LENGTH, (MAX_BODY_BYTES + 1).to_string())
        .body(Body::from(vec![b' '; MAX_BODY_BYTES + 1]))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "request body over 65536 bytes");
    // A body just under the limit is read (and judged on its contents).
    let padded = format!("{{\"on\": true}}{}", " ".repeat(MAX_BODY_BYTES - 20));
    let r = call(
        &app,
        Method::PUT,
        "/v1/hosts/h1/maintenance",
        Some(TOKEN),
        Some(&padded),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_body_never_ends_is_answered_503_after_the_request_timeout() {
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    let never = futures_util::stream::pending::<Result<axum::body::Bytes, std::io::Error>>();
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/v1/hosts/h1/maintenance")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from_stream(never))
        .unwrap();
    let started = tokio::time::Instant::now();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "the request took over 30 s");
}

/// The router served on a loopback port over TLS with a fresh CA; the CA's PEM.
async fn serve_tls(dir: &std::path::Path) -> (std::net::SocketAddr, String) {
    let certs = crate::tls::test_certs::write(dir);
    let tls = crate::tls::load_server_config(&certs.cert, &certs.key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    tokio::spawn(serve(listener, app, Some(tls)));
    (addr, certs.ca_pem)
}

/// A TLS client trusting only `ca_pem`.
fn tls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One `GET path` with `Connection: close`; the whole answer as text.
async fn raw_get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn a_client_trusting_the_ca_gets_healthz_over_tls_on_a_real_loopback_port() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = serve_tls(dir.path()).await;
    for name in ["127.0.0.1", "localhost"] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        let tls = tls_client(&ca).connect(server_name, tcp).await.unwrap();
        let answer = raw_get(tls, "/healthz").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{name}: {answer}");
        assert!(answer.contains(r#""status":"ok""#), "{answer}");
    }
}

#[tokio::test]
async fn a_client_trusting_another_ca_fails_its_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (addr, _) = serve_tls(dir.path()).await;
    let other_ca = crate::tls::test_certs::write(other.path()).ca_pem;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let err = tls_client(&other_ca)
        .connect(server_name, tcp)
        .await
        .unwrap_err();
    // Both test CAs have the same (empty) name: the signature does not check out.
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plain_http_client_on_the_tls_port_gets_no_api_answer_but_is_told_to_use_https() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = serve_tls(dir.path()).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let answer = raw_get(tcp, "/healthz").await.unwrap_or_default();
    assert!(!answer.contains(r#""status":"ok""#), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("this API speaks HTTPS"), "{answer}");
    // The server goes on serving TLS clients.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tls_client(&ca).connect(server_name, tcp).await.unwrap();
    let answer = raw_get(tls, "/healthz").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[tokio::test]
async fn a_client_stuck_in_its_handshake_or_sending_garbage_does_not_hold_up_the_others() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca) = serve_tls(dir.path()).await;
    // Connected, silent (it would be dropped after the handshake timeout).
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A TLS record header, then nothing.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    // Garbage that is not a TLS record at all.
    let mut garbage = tokio::net::TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&[0x00; 64]).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let server_name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tls_client(&ca).connect(server_name, tcp),
    )
    .await
    .expect("handshake not held up")
    .unwrap();
    let answer = raw_get(tls, "/healthz").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[tokio::test]
async fn plain_http_is_served_without_tls() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    tokio::spawn(serve(listener, app, None));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let answer = raw_get(tcp, "/healthz").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_sends_no_request_headers_is_closed_after_the_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, _) = app(Some(TOKEN), Engine::Answers);
    tokio::spawn(serve(listener, app, None));
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 256];
    // The server closes it (an empty read, or a 408 answer then the close).
    loop {
        match silent.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let waited = started.elapsed();
    assert!(
        waited >= serve::HEADER_READ_TIMEOUT && waited < serve::HEADER_READ_TIMEOUT * 2,
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_starts_no_tls_handshake_or_does_not_finish_it_is_closed_after_10_s() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (addr, _) = serve_tls(dir.path()).await;
    // Silent; a TLS record header and nothing more.
    for sends in [&[][..], &[0x16, 0x03, 0x01, 0x02, 0x00][..]] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = tokio::time::Instant::now();
        stream.write_all(sends).await.unwrap();
        let mut buf = [0u8; 256];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let waited = started.elapsed();
        assert!(
            waited >= crate::tls::HANDSHAKE_TIMEOUT
                && waited < crate::tls::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
            "held for {waited:?}"
        );
    }
}
