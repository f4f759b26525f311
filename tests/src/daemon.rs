//! A `defib-watchdog run` daemon with pinned probes, for restart tests and the
//! watchdog-restart benchmark: its events come from `--print-events` (stdout, one JSON
//! object a line), its controller is a bound UDP socket and a TCP listener nobody
//! answers (the daemon spools its events and keeps running).
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::built_binary;

/// Everything one daemon configuration needs, kept across restarts.
pub struct PinnedSetup {
    pub dir: tempfile::TempDir,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    _udp: std::net::UdpSocket,
    _tcp: std::net::TcpListener,
}

impl PinnedSetup {
    /// A configuration watching `watch_name` (a comm or prefix), pinning under a bpffs
    /// directory unique to this test (`pinned` = false: no pinning, for comparisons).
    pub fn new(watch_name: &str, pinned: bool) -> PinnedSetup {
        let dir = tempfile::Builder::new()
            .prefix("defib-restart")
            .tempdir()
            .expect("tempdir");
        let key = dir.path().join("cluster.key");
        crate::write_secret(&key, "restart-test-key-0123456789abcdef\n").expect("key");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/defib-test-{}", crate::tag()));
        let config = dir.path().join("watchdog.toml");
        let toml = format!(
            "[probes]\nwatch_names = [{watch_name:?}]\npin_dir = {pin:?}\n\
             [host]\nid = \"restart-test\"\ncluster_id = \"t\"\nstate_dir = {state:?}\n\
             [controller]\nheartbeat_addrs = [\"{hb}\"]\nevent_addr = \"{ev}\"\nkey_file = {key:?}\n\
             [libvirt]\nenabled = false\n",
            pin = if pinned {
                pin_dir.display().to_string()
            } else {
                String::new()
            },
            state = dir.path().join("state").display().to_string(),
            hb = udp.local_addr().expect("addr"),
            ev = tcp.local_addr().expect("addr"),
            key = key.display().to_string(),
        );
        std::fs::write(&config, toml).expect("config");
        PinnedSetup {
            dir,
            pin_dir,
            config,
            _udp: udp,
            _tcp: tcp,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a daemon; its events go to `events` (shared across restarts).
    pub fn start(&self, events: &Sender<Value>) -> RunningWatchdog {
        RunningWatchdog::start(&self.config, events.clone())
    }

    /// `defib-watchdog unpin` for this configuration.
    pub fn unpin(&self) -> std::process::Output {
        Command::new(built_binary("defib-watchdog", "defib-watchdog"))
            .arg("--config")
            .arg(&self.config)
            .arg("unpin")
            .output()
            .expect("running defib-watchdog unpin")
    }
}

impl Drop for PinnedSetup {
    fn drop(&mut self) {
        // Whatever happened, leave no probes attached.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

pub struct RunningWatchdog {
    pub child: Child,
    stderr: Arc<Mutex<String>>,
    /// When the daemon said its probes were attached.
    pub attached_at: Option<Instant>,
}

impl RunningWatchdog {
    fn start(config: &Path, events: Sender<Value>) -> RunningWatchdog {
        let bin = built_binary("defib-watchdog", "defib-watchdog");
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .args(["run", "--print-events"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning defib-watchdog run");
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if events.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let pipe = child.stderr.take().expect("stderr");
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut s = stderr.lock().unwrap_or_else(|e| e.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        RunningWatchdog {
            child,
            stderr,
            attached_at: None,
        }
    }

    pub fn log(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the probes are attached (panics after `timeout` or if it exits).
    pub fn wait_attached(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains("probes attached") {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("defib-watchdog exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "defib-watchdog did not attach its probes:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        self.attached_at = Some(Instant::now());
    }

    /// SIGTERM, and waits for the exit; returns whether it exited by itself in time.
    pub fn stop(&mut self) -> bool {
        crate::stop_child(&mut self.child, Duration::from_secs(10))
    }
}

impl Drop for RunningWatchdog {
    fn drop(&mut self) {
        crate::stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// Drains `rx` into `seen` for `quiet` after the last event (at most `max`).
pub fn collect(rx: &Receiver<Value>, seen: &mut Vec<Value>, quiet: Duration, max: Duration) {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        match rx.recv_timeout(quiet) {
            Ok(v) => seen.push(v),
            Err(_) => break,
        }
    }
}
