//! Both daemons speak systemd's service protocol as their units expect (Type=notify,
//! WatchdogSec): READY=1 once they serve, WATCHDOG=1 at half of $WATCHDOG_USEC from
//! their main loop, STOPPING=1 and a clean exit on SIGTERM; SIGHUP does not kill them;
//! `--log-format json` makes every log line a JSON object. The test plays systemd: it
//! binds the $NOTIFY_SOCKET datagram socket itself.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::io::{BufRead as _, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use defib_tests::{built_binary, is_root, require};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

struct Notified {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notified {
    fn bind(path: &Path) -> Notified {
        let socket = UnixDatagram::bind(path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        Notified {
            socket,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram with a line equal to `line`; panics with what came.
    fn expect(&mut self, line: &str, timeout: Duration, child: &mut Child, log: &Mutex<String>) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = msg.lines().any(|l| l == line);
                self.seen.push(msg);
                if found {
                    return;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the daemon exited ({status}) before {line}; log:\n{}",
                    log.lock().unwrap()
                );
            }
        }
        panic!(
            "no {line} within {timeout:?}; notifications: {:?}; log:\n{}",
            self.seen,
            log.lock().unwrap()
        );
    }

    fn count(&self, line: &str) -> usize {
        self.seen
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }
}

fn spawn(bin: &Path, config: &Path, notify: &Path) -> (Child, Arc<Mutex<String>>) {
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json", "run"])
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", "300000")
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn daemon");
    let log = Arc::new(Mutex::new(String::new()));
    let pipe = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
            s.push_str(&line);
            s.push('\n');
        }
    });
    (child, log)
}

/// The whole protocol, for one daemon already configured in `config`.
fn speaks_the_protocol(bin: &Path, config: &Path, dir: &Path) {
    let notify = dir.join("notify.sock");
    let mut n = Notified::bind(&notify);
    let (mut child, log) = spawn(bin, config, &notify);
    n.expect("READY=1", Duration::from_secs(60), &mut child, &log);
    // 300 ms watchdog: a ping every 150 ms, from the main loop.
    let t0 = Instant::now();
    n.expect("WATCHDOG=1", Duration::from_secs(2), &mut child, &log);
    n.expect("WATCHDOG=1", Duration::from_secs(2), &mut child, &log);
    n.expect("WATCHDOG=1", Duration::from_secs(2), &mut child, &log);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "three pings took {:?}",
        t0.elapsed()
    );
    // SIGHUP is logged, not fatal.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    n.expect("WATCHDOG=1", Duration::from_secs(2), &mut child, &log);
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "SIGHUP killed it"
    );
    assert_eq!(n.count("READY=1"), 1, "{:?}", n.seen);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    n.expect("STOPPING=1", Duration::from_secs(10), &mut child, &log);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        log.lock().unwrap()
    );
    // Give the log reader a moment to see the last lines.
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(log.contains("SIGHUP"), "SIGHUP not logged:\n{log}");
}

#[test]
fn the_controller_notifies_ready_pings_the_watchdog_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    defib_tests::write_secret(dir.path().join("key"), "sd-test-key-0123456789abcdef").expect("key");
    let cfg = format!(
        "[controller]\nid = \"sd\"\nkey_file = {:?}\nheartbeat_listen = [\"127.0.0.1:0\"]\n\
         event_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\nstore_path = {:?}\n\
         [api]\ninsecure_no_token = true\n",
        dir.path().join("key").display().to_string(),
        dir.path().join("s.sqlite").display().to_string(),
    );
    std::fs::write(dir.path().join("c.toml"), cfg).expect("config");
    speaks_the_protocol(
        &built_binary("defib-controller", "defib-controller"),
        &dir.path().join("c.toml"),
        dir.path(),
    );
}

#[test]
fn the_watchdog_notifies_ready_pings_the_watchdog_and_stops_on_sigterm() {
    require!(is_root(), "root, for the BPF probes");
    let dir = tempfile::tempdir().expect("tempdir");
    defib_tests::write_secret(dir.path().join("key"), "sd-test-key-0123456789abcdef").expect("key");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let cfg = format!(
        "[probes]\nwatch_names = [\"dfsd-none\"]\npin_dir = \"\"\n\
         [host]\nid = \"sd\"\nstate_dir = {:?}\n\
         [controller]\nheartbeat_addrs = [\"{}\"]\nevent_addr = \"{}\"\nkey_file = {:?}\n\
         [libvirt]\nenabled = false\n",
        dir.path().join("state").display().to_string(),
        udp.local_addr().expect("addr"),
        tcp.local_addr().expect("addr"),
        dir.path().join("key").display().to_string(),
    );
    std::fs::write(dir.path().join("w.toml"), cfg).expect("config");
    speaks_the_protocol(
        &built_binary("defib-watchdog", "defib-watchdog"),
        &dir.path().join("w.toml"),
        dir.path(),
    );
}
