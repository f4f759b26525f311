//! The controller spine for real: three defib-watchdogs, each in its own network namespace
//! with two links (two network paths) to a controller in its own namespace. Heartbeats,
//! acks and the event stream cross real veth links and bridges.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use defib_tests::netns::LabNet;
use defib_tests::{built_binary, is_root, require};
use serde_json::Value;

const KEY: &str = "lab-key-0123456789abcdef0123456789";
const TOKEN: &str = "lab-api-token-0123456789";

struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("{} did not stop on SIGTERM; killed", self.name);
    }
}

struct Lab {
    net: LabNet,
    dir: tempfile::TempDir,
    controller: Option<Daemon>,
    watchdogs: Vec<Daemon>,
}

impl Lab {
    fn start(hosts: usize) -> Lab {
        let net = LabNet::new(hosts, 2);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cluster.key"), KEY).unwrap();
        std::fs::write(dir.path().join("api.token"), TOKEN).unwrap();
        let mut lab = Lab {
            net,
            dir,
            controller: None,
            watchdogs: Vec::new(),
        };
        lab.start_controller();
        for h in 0..hosts {
            lab.start_watchdog(h);
        }
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn(&self, name: &str, ns: &str, bin: &Path, args: &[&str]) -> Daemon {
        let log = self.path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = self
            .net
            .command_in(ns, bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon {
            name: name.into(),
            child,
            log,
        }
    }

    fn start_controller(&mut self) {
        let cfg = format!(
            r#"[controller]
id = "ctl-lab"
cluster_id = "lab"
key_file = {key:?}
heartbeat_listen = ["{a0}:7410", "{a1}:7410"]
event_listen = "{a0}:7411"
api_listen = "{a0}:7412"
api_token_file = {token:?}
store_path = {store:?}

[engine]
# Leave room to restore a cut link before anyone is fenced.
fence_on_unknown_after_ms = 20000
"#,
            key = self.path("cluster.key").display().to_string(),
            token = self.path("api.token").display().to_string(),
            store = self.path("controller.sqlite").display().to_string(),
            a0 = self.net.controller_addr(0),
            a1 = self.net.controller_addr(1),
        );
        std::fs::write(self.path("controller.toml"), cfg).unwrap();
        let bin = built_binary("defib-controller", "defib-controller");
        let conf = self.path("controller.toml").display().to_string();
        let d = self.spawn(
            "controller",
            &self.net.controller_ns(),
            &bin,
            &["--config", &conf, "run"],
        );
        self.controller = Some(d);
    }

    fn start_watchdog(&mut self, h: usize) {
        let state = self.path(&format!("wd{h}-state"));
        std::fs::create_dir_all(&state).unwrap();
        let cfg = format!(
            r#"[host]
id = "h{h}"
cluster_id = "lab"
state_dir = {state:?}

[controller]
heartbeat_addrs = ["{a0}:7410", "{a1}:7410"]
event_addr = "{a0}:7411"
key_file = {key:?}
"#,
            state = state.display().to_string(),
            key = self.path("cluster.key").display().to_string(),
            a0 = self.net.controller_addr(0),
            a1 = self.net.controller_addr(1),
        );
        let conf_path = self.path(&format!("wd{h}.toml"));
        std::fs::write(&conf_path, cfg).unwrap();
        let bin = built_binary("defib-watchdog", "defib-watchdog");
        let conf = conf_path.display().to_string();
        let d = self.spawn(
            &format!("watchdog-h{h}"),
            &self.net.host_ns(h),
            &bin,
            &["--config", &conf, "run"],
        );
        self.watchdogs.push(d);
    }

    /// `defibctl --json ARGS` run inside the controller's namespace.
    fn ctl(&self, args: &[&str]) -> Value {
        let bin = built_binary("defibctl", "defibctl");
        let url = format!("http://{}:7412", self.net.controller_addr(0));
        let out = self
            .net
            .command_in(&self.net.controller_ns(), &bin)
            .args(["--url", &url, "--token-file"])
            .arg(self.path("api.token"))
            .arg("--json")
            .args(args)
            .output()
            .expect("run defibctl");
        assert!(
            out.status.success(),
            "defibctl {args:?}: {}\ncontroller log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.controller_log()
        );
        serde_json::from_slice(&out.stdout).expect("defibctl --json output")
    }

    fn controller_log(&self) -> String {
        self.controller
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    fn host_states(&self) -> Vec<(String, String)> {
        let hosts = self.ctl(&["hosts"]);
        let list = hosts
            .as_array()
            .cloned()
            .or_else(|| hosts["hosts"].as_array().cloned())
            .unwrap_or_default();
        let mut v: Vec<(String, String)> = list
            .iter()
            .map(|h| {
                (
                    h["host"].as_str().unwrap_or("").to_string(),
                    h["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let states = self.host_states();
            if ok(&states) {
                return states;
            }
            if Instant::now() > deadline {
                let wd_logs: Vec<String> = self
                    .watchdogs
                    .iter()
                    .map(|w| format!("--- {}\n{}", w.name, w.log_text()))
                    .collect();
                panic!(
                    "{what}: not within {timeout:?}; hosts {states:?}\n--- controller\n{}\n{}",
                    self.controller_log(),
                    wd_logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn state_of<'a>(states: &'a [(String, String)], host: &str) -> &'a str {
    states
        .iter()
        .find(|(h, _)| h == host)
        .map(|(_, s)| s.as_str())
        .unwrap_or("absent")
}

#[test]
fn a_host_cut_off_on_every_path_goes_suspect_and_comes_back_up_unfenced_while_others_stay_up() {
    require!(is_root(), "root (network namespaces, BPF)");
    let lab = Lab::start(3);
    lab.wait_until("all three hosts Up", Duration::from_secs(60), |s| {
        s.len() == 3 && s.iter().all(|(_, st)| st == "Up")
    });

    // One path down: heartbeats still arrive on the other, the host stays Up.
    lab.net.set_link(0, 0, false);
    std::thread::sleep(Duration::from_millis(1500));
    let states = lab.host_states();
    assert_eq!(
        state_of(&states, "h0"),
        "Up",
        "one path lost made h0 {states:?}"
    );
    lab.net.set_link(0, 0, true);

    // Every path down: Suspect (then Confirming), the others stay Up.
    let cut_at = Instant::now();
    lab.net.set_host_links(0, false);
    let states = lab.wait_until("h0 Suspect", Duration::from_secs(10), |s| {
        matches!(state_of(s, "h0"), "Suspect" | "Confirming")
    });
    eprintln!("h0 left Up {:?} after its links were cut", cut_at.elapsed());
    assert_eq!(state_of(&states, "h1"), "Up", "{states:?}");
    assert_eq!(state_of(&states, "h2"), "Up", "{states:?}");

    // Links back before any fence: Up again, nothing fenced.
    lab.net.set_host_links(0, true);
    let states = lab.wait_until("h0 back Up", Duration::from_secs(10), |s| {
        state_of(s, "h0") == "Up"
    });
    assert!(states.iter().all(|(_, st)| st == "Up"), "{states:?}");
    let incidents = lab.ctl(&["incidents"]);
    let text = incidents.to_string();
    assert!(
        !text.contains("Fencing") && !text.contains("Fenced"),
        "a fence was started: {text}"
    );
    let alarms = lab.ctl(&["alarms"]).to_string();
    assert!(!alarms.contains("Fence"), "fence alarms: {alarms}");
}
