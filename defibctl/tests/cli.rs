//! `defibctl` (the built binary) against the real `controller::api::router`, served on
//! 127.0.0.1 with a sample snapshot and a small task standing in for the engine.
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use controller::api::router;
use controller::api::view::{
    AlarmSnapshot, ApiHandle, Command as EngineCommand, HostSnapshot, IncidentSnapshot,
    PathSnapshot, ResourceSnapshot, Snapshot,
};
use controller::api::{
    AlarmKind, HostId, HostState, Metrics, ResourceState, Source, Subject, TimelineEntry, Timestamp,
};
use tokio::sync::{mpsc, watch};

const TOKEN: &str = "0123456789abcdef-token";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn sample_snapshot() -> Snapshot {
    let now = now_ms();
    let host = |name: &str, state, incident, last: u64| HostSnapshot {
        host: name.into(),
        state,
        incident,
        last_heartbeat_ms: Some(last),
        paths: vec![PathSnapshot {
            path: 0,
            peer: Some("127.0.0.1:7411".into()),
            last_heartbeat_ms: last,
        }],
        vm_count: 1,
        stalled_vm_count: 0,
        isolated: false,
        self_fence: "off".into(),
        boot_id: None,
        incarnation: None,
        evacuated: vec![],
        not_a_target: None,
        unprotected: vec![],
    };
    let entry = |at: u64, from: &str, to: &str, cause: &str, source| TimelineEntry {
        at: Timestamp(at),
        subject: Subject::Host(HostId::new("compute-2")),
        from: from.into(),
        to: to.into(),
        cause: cause.into(),
        source,
    };
    Snapshot {
        controller_id: "ctl-1".into(),
        cluster_id: "lab".into(),
        at_ms: now,
        hosts: vec![
            host("h1", HostState::Up, None, now - 100),
            host("compute-2", HostState::Fencing, Some(1), now - 4_000),
        ],
        resources: vec![ResourceSnapshot {
            resource: "vm:bbbb".into(),
            kind: "vm".into(),
            id: "bbbb".into(),
            host: "compute-2".into(),
            state: ResourceState::Evacuating { attempt: 1 },
            owner: Some(1),
        }],
        incidents: vec![IncidentSnapshot {
            id: 1,
            subject: "host:compute-2".into(),
            opened_at_ms: now - 3_500,
            closed_at_ms: None,
            timeline: vec![
                entry(
                    now - 3_500,
                    "Up",
                    "Suspect",
                    "no heartbeat for 500 ms",
                    Source::Heartbeat,
                ),
                entry(
                    now - 3_300,
                    "Suspect",
                    "Confirming",
                    "asking pacemaker",
                    Source::Controller,
                ),
                entry(
                    now - 2_800,
                    "Confirming",
                    "Fencing",
                    "not a member",
                    Source::Pacemaker,
                ),
            ],
        }],
        alarms: vec![AlarmSnapshot {
            at_ms: now - 1_000,
            kind: AlarmKind::FenceUnverified,
            host: Some("compute-2".into()),
            resource: None,
            reason: "BMC unreachable".into(),
        }],
        role: controller::api::view::RoleSnapshot {
            role: "follower".into(),
            store: "etcd".into(),
            leader: Some("ctl-0".into()),
            leader_api: Some("http://10.0.0.1:7412".into()),
            leader_since_ms: Some(now - 60_000),
            terms: 0,
            problem: None,
            last_step_down: None,
            controllers: vec![
                controller::api::view::ControllerSnapshot {
                    id: "ctl-0".into(),
                    api: "http://10.0.0.1:7412".into(),
                    started_ms: now - 120_000,
                    leader: true,
                },
                controller::api::view::ControllerSnapshot {
                    id: "ctl-1".into(),
                    api: "http://10.0.0.2:7412".into(),
                    started_ms: now - 110_000,
                    leader: false,
                },
            ],
        },
    }
}

/// A served API; the runtime (and with it the server) stops when this is dropped.
struct Server {
    url: String,
    _rt: tokio::runtime::Runtime,
}

fn serve() -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(async {
        let (snap_tx, snap_rx) = watch::channel(Arc::new(sample_snapshot()));
        let (cmd_tx, mut cmd_rx) = mpsc::channel::<EngineCommand>(8);
        tokio::spawn(async move {
            let _keep = snap_tx;
            while let Some(cmd) = cmd_rx.recv().await {
                match cmd {
                    EngineCommand::Maintenance { host, reply, .. }
                    | EngineCommand::Unfence { host, reply } => {
                        let _ = reply.send(if host == "h1" {
                            Ok(())
                        } else {
                            Err(format!("{host} is being fenced"))
                        });
                    }
                    EngineCommand::Enrollment {
                        host,
                        enroll,
                        reply,
                    } => {
                        let _ = reply.send(Ok(enroll.then(|| format!("key-of-{host}"))));
                    }
                }
            }
        });
        let handle = ApiHandle {
            snapshot: snap_rx,
            commands: cmd_tx,
            metrics: Arc::new(Metrics::new()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(handle, Some(TOKEN.to_string()));
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    });
    Server { url, _rt: rt }
}

fn token_file(name: &str, contents: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("defibctl-{}-{name}.token", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    // 0600, as a secret file is written for defib's daemons.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn defibctl(url: &str, token: Option<&PathBuf>, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_defibctl"));
    cmd.env_remove("DEFIB_URL")
        .env_remove("DEFIB_TOKEN_FILE")
        .env_remove("DEFIB_CA_FILE")
        .arg("--url")
        .arg(url);
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.args(args).output().unwrap();
    Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

#[test]
fn hosts_shows_every_host_with_its_state() {
    let server = serve();
    let token = token_file("hosts", &format!("{TOKEN}\n"));
    let run = defibctl(&server.url, Some(&token), &["hosts"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("HOST "), "{}", run.stdout);
    assert!(
        lines[1].starts_with("h1 ") && lines[1].contains(" Up "),
        "{}",
        run.stdout
    );
    assert!(
        lines[2].starts_with("compute-2 ")
            && lines[2].contains(" Fencing ")
            && lines[2].contains(" i1 "),
        "{}",
        run.stdout
    );
    assert!(lines[2].contains("s ago"), "{}", run.stdout);
}

#[test]
fn incidents_with_an_id_shows_the_timeline() {
    let server = serve();
    let token = token_file("incident", TOKEN);
    let run = defibctl(&server.url, Some(&token), &["incidents", "1"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let out = &run.stdout;
    assert!(out.starts_with("incident i1  host:compute-2\n"), "{out}");
    for expected in [
        "host:compute-2  Up → Suspect",
        "Suspect → Confirming",
        "Confirming → Fencing",
        "no heartbeat for 500 ms",
        "Pacemaker",
        "+0.000s",
        "+0.700s",
    ] {
        assert!(out.contains(expected), "{expected:?} missing in\n{out}");
    }
    let list = defibctl(&server.url, Some(&token), &["incidents"]);
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    assert!(
        list.stdout.contains("i1  host:compute-2"),
        "{}",
        list.stdout
    );
}

#[test]
fn an_unknown_incident_shows_the_servers_error() {
    let server = serve();
    let token = token_file("unknown", TOKEN);
    let run = defibctl(&server.url, Some(&token), &["incidents", "99"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("no incident 99 (HTTP 404)"),
        "{}",
        run.stderr
    );
}

#[test]
fn json_hosts_prints_the_apis_json() {
    let server = serve();
    let token = token_file("json", TOKEN);
    let run = defibctl(&server.url, Some(&token), &["--json", "hosts"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["hosts"][0]["host"], "h1");
    assert_eq!(v["hosts"][1]["state"], "Fencing");
    // The API's key order is kept.
    let keys: Vec<&str> = v["hosts"][0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(run.stdout.find("\"at_ms\"").unwrap() < run.stdout.find("\"hosts\"").unwrap());
    assert!(keys.contains(&"last_heartbeat_ms"));
}

#[test]
fn vms_and_alarms_are_listed() {
    let server = serve();
    let token = token_file("vms", TOKEN);
    let run = defibctl(&server.url, Some(&token), &["vms"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("vm:bbbb   compute-2  Evacuating#1  i1"),
        "{}",
        run.stdout
    );
    let run = defibctl(&server.url, Some(&token), &["alarms"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("FenceUnverified  compute-2"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("BMC unreachable"), "{}", run.stdout);
}

#[test]
fn controllers_shows_which_controller_leads_and_every_controller() {
    let server = serve();
    let token = token_file("controllers", TOKEN);
    let run = defibctl(&server.url, Some(&token), &["controllers"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("store: etcd    leader: ctl-0 since"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("this controller: follower"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("ctl-0       leader    http://10.0.0.1:7412"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("ctl-1       follower  http://10.0.0.2:7412"),
        "{}",
        run.stdout
    );
}

#[test]
fn maintenance_on_succeeds_and_a_refusal_shows_the_engines_reason() {
    let server = serve();
    let token = token_file("maint", TOKEN);
    let run = defibctl(&server.url, Some(&token), &["maintenance", "h1", "on"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "h1: maintenance on\n");
    let run = defibctl(
        &server.url,
        Some(&token),
        &["maintenance", "compute-2", "off"],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("compute-2 is being fenced (HTTP 409)"),
        "{}",
        run.stderr
    );
    let run = defibctl(&server.url, Some(&token), &["unfence", "h1"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.stdout, "h1: unfence accepted\n");
}

#[test]
fn a_wrong_token_exits_non_zero_naming_the_token() {
    let server = serve();
    let token = token_file("wrong", "not-the-token");
    let run = defibctl(&server.url, Some(&token), &["hosts"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("token rejected"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    let run = defibctl(&server.url, None, &["hosts"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("wants a token"), "{}", run.stderr);
}

#[test]
fn an_unreachable_controller_exits_1_naming_the_url() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let run = defibctl(&url, None, &["hosts"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains(&format!("cannot reach the controller at {url}")),
        "{}",
        run.stderr
    );
}

#[test]
fn the_url_and_token_file_can_come_from_the_environment() {
    let server = serve();
    let token = token_file("env", TOKEN);
    let out = Command::new(env!("CARGO_BIN_EXE_defibctl"))
        .env("DEFIB_URL", &server.url)
        .env("DEFIB_TOKEN_FILE", &token)
        .arg("alarms")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("FenceUnverified"));
}

#[test]
fn a_missing_token_file_is_reported_by_path() {
    let run = defibctl(
        "http://127.0.0.1:9",
        Some(&PathBuf::from("/nonexistent/defib.token")),
        &["hosts"],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains("cannot read the token file /nonexistent/defib.token"),
        "{}",
        run.stderr
    );
}

#[test]
fn hosts_enroll_prints_or_writes_the_hosts_key_and_hosts_revoke_says_so() {
    let server = serve();
    let token = token_file("enroll", TOKEN);
    let run = defibctl(&server.url, Some(&token), &["hosts", "enroll", "h7"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("h7: enrolled"), "{}", run.stdout);
    assert!(run.stdout.contains("key-of-h7"), "{}", run.stdout);

    let out = std::env::temp_dir().join(format!("defibctl-enroll-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let run = defibctl(
        &server.url,
        Some(&token),
        &["hosts", "enroll", "h7", "--key-out", out.to_str().unwrap()],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        !run.stdout.contains("key-of-h7"),
        "the key goes to the file only"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "key-of-h7");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let _ = std::fs::remove_file(&out);

    let run = defibctl(&server.url, Some(&token), &["hosts", "revoke", "h7"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "h7: revoked\n"));
    let run = defibctl(&server.url, Some(&token), &["hosts", "rename", "h7"]);
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("unknown hosts action"),
        "{}",
        run.stderr
    );
}
