//! `defibctl` (the built binary) against the controller's API served over TLS on
//! 127.0.0.1 with the lab's certificates (`defib_tests::certs`).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use controller::api::view::{ApiHandle, Snapshot};
use controller::api::Metrics;
use defib_tests::certs::{write_lab_certs, LabCerts};
use tokio::sync::{mpsc, watch};

const TOKEN: &str = "0123456789abcdef-https-token";

struct Server {
    url: String,
    certs: LabCerts,
    token: PathBuf,
    _dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

fn serve_https() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let certs = write_lab_certs(dir.path(), &[]).unwrap();
    let token = dir.path().join("api.token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let tls = controller::tls::load_server_config(&certs.cert, &certs.key).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let snapshot = Snapshot {
            controller_id: "ctl-tls".into(),
            ..Snapshot::default()
        };
        let (snap_tx, snap_rx) = watch::channel(Arc::new(snapshot));
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let handle = ApiHandle {
            snapshot: snap_rx,
            commands: cmd_tx,
            metrics: Arc::new(Metrics::new()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = controller::api::router(handle, Some(TOKEN.to_string()));
        tokio::spawn(async move {
            let _keep = (snap_tx, cmd_rx);
            controller::api::serve(listener, app, Some(tls)).await
        });
        addr
    });
    Server {
        url: format!("https://{addr}"),
        certs,
        token,
        _dir: dir,
        _rt: rt,
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn defibctl(url: &str, token: &Path, ca_file: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_defibctl"));
    cmd.env_remove("DEFIB_URL")
        .env_remove("DEFIB_TOKEN_FILE")
        .env_remove("DEFIB_CA_FILE")
        .args(["--url", url, "--token-file"])
        .arg(token);
    if let Some(ca) = ca_file {
        cmd.arg("--ca-file").arg(ca);
    }
    let out = cmd.args(args).output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[test]
fn defibctl_trusting_the_ca_file_talks_to_an_https_controller() {
    let server = serve_https();
    let run = defibctl(
        &server.url,
        &server.token,
        Some(&server.certs.ca),
        &["--json", "controllers"],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("\"role\""), "{}", run.stdout);
}

#[test]
fn the_ca_file_can_come_from_the_environment() {
    let server = serve_https();
    let out = Command::new(env!("CARGO_BIN_EXE_defibctl"))
        .env("DEFIB_URL", &server.url)
        .env("DEFIB_TOKEN_FILE", &server.token)
        .env("DEFIB_CA_FILE", &server.certs.ca)
        .arg("alarms")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn without_the_ca_file_the_certificate_is_not_trusted_and_the_error_says_how_to_give_it() {
    let server = serve_https();
    let run = defibctl(&server.url, &server.token, None, &["hosts"]);
    assert_eq!(run.code, Some(1));
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .contains(&format!("cannot reach the controller at {}", server.url)),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--ca-file"), "{}", run.stderr);
}

#[test]
fn a_ca_file_of_another_ca_is_refused() {
    let server = serve_https();
    let other = tempfile::tempdir().unwrap();
    let other_ca = write_lab_certs(other.path(), &[]).unwrap().ca;
    let run = defibctl(&server.url, &server.token, Some(&other_ca), &["hosts"]);
    assert_eq!(run.code, Some(1));
    // Both lab CAs have the same name: the signature does not check out.
    assert!(
        run.stderr.contains("invalid peer certificate"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--ca-file"), "{}", run.stderr);
}

#[test]
fn a_missing_or_bad_ca_file_is_named() {
    let server = serve_https();
    let missing = PathBuf::from("/nonexistent/defib-ca.pem");
    let run = defibctl(&server.url, &server.token, Some(&missing), &["hosts"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains("cannot read the CA file /nonexistent/defib-ca.pem"),
        "{}",
        run.stderr
    );
    // The token file is not a PEM certificate.
    let run = defibctl(&server.url, &server.token, Some(&server.token), &["hosts"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains(&format!(
            "the CA file {}: holds no PEM certificate",
            server.token.display()
        )),
        "{}",
        run.stderr
    );
}

#[test]
fn an_http_url_to_the_https_port_is_told_to_use_https() {
    let server = serve_https();
    let url = server.url.replace("https://", "http://");
    let run = defibctl(&url, &server.token, Some(&server.certs.ca), &["hosts"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("this API speaks HTTPS"),
        "{}",
        run.stderr
    );
}
