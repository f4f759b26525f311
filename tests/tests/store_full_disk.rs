//! The controller on a full disk, for real: `controller::runtime::run` with its SQLite
//! store on a 2 MiB tmpfs that the test fills until writes fail. The controller raises
//! the alarm, keeps the intents it had, carries out nothing it could not persist, and
//! once space is freed it ends so that its restart resumes from the store.
//!
//! Needs root (to mount the tmpfs): under `CI=true` a missing root fails the test.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // test code

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller::config::ControllerConfig;
use controller::engine::{HostId, Intent};
use controller::store::{SqliteStore, Store};
use defib_tests::tmpfs::Tmpfs;
use defib_tests::{is_root, require};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &[u8] = b"full-disk-test-key-0123456789abcdef";

/// One run of the controller on `store`.
struct Controller {
    bound: controller::runtime::Bound,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Its end, with the error's whole chain as text.
    task: tokio::task::JoinHandle<Result<(), String>>,
}

async fn start(dir: &Path, store: &Path) -> Controller {
    let text = format!(
        "[controller]\nid = \"ctl-t\"\ncluster_id = \"t\"\nkey_file = {:?}\n\
         heartbeat_listen = [\"127.0.0.1:0\"]\nevent_listen = \"127.0.0.1:0\"\n\
         api_listen = \"127.0.0.1:0\"\nstore_path = {:?}\n[api]\ninsecure_no_token = true\n\
         [intake]\nenrolled_hosts = [\"h0\", \"h1\", \"h2\", \"h3\"]\n",
        dir.join("key").display().to_string(),
        store.display().to_string()
    );
    let resolved = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        controller::runtime::run(
            resolved,
            async {
                let _ = stop_rx.await;
            },
            move |b| {
                let _ = ready_tx.send(b.clone());
            },
        )
        .await
        .map_err(|e| format!("{e:#}"))
    });
    let bound = ready_rx.await.expect("controller ready");
    Controller { bound, stop, task }
}

/// Heartbeats every 100 ms from each host in `alive` to `to`, each signed with its own
/// key and echoing the controller's session.
fn heartbeats(to: std::net::SocketAddr, alive: Arc<Mutex<BTreeSet<String>>>) {
    let master = protocol::MasterKey::new(KEY).unwrap();
    defib_tests::simhosts::spawn_heartbeats(to, master, "t", alive);
}

/// One HTTP request to the API: (status, body).
async fn http(api: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(api).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

async fn metrics(api: std::net::SocketAddr) -> String {
    http(api, "GET", "/metrics", "").await.1
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// Waits up to `within` for `cond` on the metrics.
async fn until_metrics(api: std::net::SocketAddr, within: Duration, cond: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let m = metrics(api).await;
        if cond(&m) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn host_state(api: std::net::SocketAddr, host: &str) -> String {
    let (status, body) = http(api, "GET", &format!("/v1/hosts/{host}"), "").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("host JSON");
    v["state"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_disk_the_controller_alarms_keeps_its_intents_and_acts_on_nothing_unpersisted() {
    require!(is_root(), "root, to mount a tmpfs");
    let dir = tempfile::tempdir().unwrap();
    defib_tests::write_secret(dir.path().join("key"), KEY).unwrap();
    let disk = Tmpfs::mount("2m");
    let store = disk.mnt.join("defib.sqlite");

    // ---- first run: four hosts heartbeat; an operator puts h3 in maintenance (an
    // intent, written while the disk has room).
    let c = start(dir.path(), &store).await;
    let alive = Arc::new(Mutex::new(
        ["h0", "h1", "h2", "h3"]
            .map(String::from)
            .into_iter()
            .collect(),
    ));
    heartbeats(c.bound.heartbeat[0], alive.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = http(
        c.bound.api,
        "PUT",
        "/v1/hosts/h3/maintenance",
        r#"{"on":true}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // ---- the disk fills; then h1 dies. Its first timeline line cannot be written.
    let filler = disk.fill();
    alive.lock().unwrap().remove("h1");
    until_metrics(c.bound.api, Duration::from_secs(10), |m| {
        has_line(m, "defib_stopped_acting 1")
    })
    .await;
    let m = metrics(c.bound.api).await;
    assert!(
        has_line(&m, r#"defib_store_write_failures_total{reason="error"} 1"#),
        "{m}"
    );
    assert!(
        has_line(&m, r#"defib_alarms_total{kind="StoreWriteFailed"} 1"#),
        "{m}"
    );

    // Stopped: h1 is never confirmed nor fenced, however long it stays silent; the
    // API still answers and says why an operator's command is refused.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let m = metrics(c.bound.api).await;
    assert!(!m.contains("defib_actions_total{"), "acted: {m}");
    let (status, refused) = http(
        c.bound.api,
        "PUT",
        "/v1/hosts/h3/maintenance",
        r#"{"on":false}"#,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused.contains("stopped acting"), "{refused}");
    assert!(refused.contains("full"), "{refused}");
    let (_, alarms) = http(c.bound.api, "GET", "/v1/alarms", "").await;
    assert!(alarms.contains("CommandRefused"), "{alarms}");
    assert!(!c.task.is_finished(), "the disk is still full: it waits");

    // ---- space is freed: the controller ends (under systemd: exits non-zero and is
    // started again), naming the write that failed.
    std::fs::remove_file(&filler).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), c.task)
        .await
        .expect("the controller ends once the store takes writes")
        .unwrap()
        .expect_err("it ends with the store failure");
    assert!(ended.contains("stopped acting"), "{ended}");
    assert!(ended.contains("full"), "{ended}");
    drop(c.stop);

    // The store holds what was persisted, intact, and nothing after the failure.
    {
        let s = SqliteStore::open(&store).expect("the store is intact");
        let intents = s.intents().unwrap();
        assert_eq!(intents.len(), 1, "{intents:?}");
        assert!(
            matches!(&intents[0].record.intent,
                Intent::Maintenance { host, on: true } if *host == HostId::new("h3")),
            "{intents:?}"
        );
    }

    // ---- the restart resumes from the store. h1 is back too; the heartbeats nobody
    // heard while the controller was stopped are not held against any host.
    alive.lock().unwrap().insert("h1".into());
    let c = start(dir.path(), &store).await;
    heartbeats(c.bound.heartbeat[0], alive.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host_state(c.bound.api, "h3").await, "Maintenance");
    for _ in 0..10 {
        for h in ["h0", "h1", "h2"] {
            assert_eq!(host_state(c.bound.api, h).await, "Up", "{h}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let m = metrics(c.bound.api).await;
    assert!(has_line(&m, "defib_stopped_acting 0"), "{m}");
    assert!(!m.contains("defib_actions_total{"), "{m}");
    let _ = c.stop.send(());
    c.task.await.unwrap().expect("a clean stop");
}
