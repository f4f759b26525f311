//! `defib-watchdog run` as a process: configuration errors exit 64 naming the field
//! before anything is loaded or bound (no root needed), and, as root, the daemon sends
//! heartbeats to a controller and stops cleanly on SIGTERM.
//!
//! Synchronous harness code: std's clock and sleep are the right tools here.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_defib-watchdog");

fn run_with_config(dir: &Path, toml: &str) -> (i32, String) {
    let path = dir.join("watchdog.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("run")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes a key file with mode 0600, as `run` requires of it.
fn write_key(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn controller_section(key_file: &Path, extra: &str) -> String {
    format!(
        "[controller]\nheartbeat_addrs = [\"127.0.0.1:7400\"]\nevent_addr = \"127.0.0.1:7401\"\nkey_file = \"{}\"\n{extra}\n",
        key_file.display()
    )
}

#[test]
fn a_bad_heartbeat_interval_makes_run_exit_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    write_key(&key, "0123456789abcdef0123456789abcdef\n");
    let (code, stderr) = run_with_config(
        dir.path(),
        &controller_section(&key, "heartbeat_interval_ms = 5"),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("controller.heartbeat_interval_ms"),
        "{stderr}"
    );
}

#[test]
fn a_missing_key_file_makes_run_exit_64_naming_controller_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_with_config(
        dir.path(),
        &controller_section(&dir.path().join("no-such.key"), ""),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("controller.key_file"), "{stderr}");
}

#[test]
fn a_key_shorter_than_sixteen_bytes_makes_run_exit_64_naming_controller_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("short.key");
    write_key(&key, "short\n");
    let (code, stderr) = run_with_config(dir.path(), &controller_section(&key, ""));
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("controller.key_file"), "{stderr}");
}

#[test]
fn a_key_file_readable_by_group_or_others_makes_run_exit_64_naming_controller_key_file_and_its_mode(
) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    write_key(&key, "0123456789abcdef0123456789abcdef\n");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = run_with_config(dir.path(), &controller_section(&key, ""));
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("controller.key_file"), "{stderr}");
    assert!(
        stderr.contains(&format!("key file {} has mode 0644", key.display())),
        "{stderr}"
    );
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn run_without_a_controller_section_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_with_config(dir.path(), "[host]\ncluster_id = \"az1\"\n");
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("`controller`"), "{stderr}");
}

#[test]
fn an_unknown_field_in_the_controller_section_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    write_key(&key, "0123456789abcdef0123456789abcdef\n");
    let (code, stderr) = run_with_config(
        dir.path(),
        &controller_section(&key, "heartbeat_interval = 100"),
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("heartbeat_interval"), "{stderr}");
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

#[test]
fn the_daemon_sends_heartbeats_to_the_controller_and_stops_cleanly_on_sigterm() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        if ci() {
            panic!("this test needs root (for the BPF probes); CI=true, so that is a failure");
        }
        eprintln!("SKIP: needs root (for the BPF probes)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_text = "0123456789abcdef0123456789abcdef";
    let key_path = dir.path().join("cluster.key");
    write_key(&key_path, key_text);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let events = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let toml = format!(
        "[probes]\npin_dir = \"\"\n[host]\nid = \"daemon-test\"\ncluster_id = \"t\"\nstate_dir = \"{}\"\n\
         [controller]\nheartbeat_addrs = [\"{}\"]\nevent_addr = \"{}\"\nkey_file = \"{}\"\n",
        dir.path().join("state").display(),
        udp.local_addr().unwrap(),
        events.local_addr().unwrap(),
        key_path.display(),
    );
    let config = dir.path().join("watchdog.toml");
    std::fs::write(&config, toml).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["run", "--print-events"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let key = protocol::Key::new(key_text.as_bytes()).unwrap();
    let mut receiver = protocol::HeartbeatReceiver::new(key, "t");
    let mut accepted = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; protocol::DATAGRAM_RECV_BUFFER_LEN];
    while accepted < 5 && Instant::now() < deadline {
        if let Ok(n) = udp.recv(&mut buf) {
            if let Ok(a) = receiver.receive(&buf[..n]) {
                assert_eq!(a.heartbeat.host_id, "daemon-test");
                accepted += 1;
            }
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    use std::io::Read as _;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(
        accepted, 5,
        "heartbeats from the daemon; its stderr:\n{stderr}"
    );
    assert!(status.success(), "exit {status:?}; stderr:\n{stderr}");
    assert!(dir.path().join("state/incarnation").exists());
}
