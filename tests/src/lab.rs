//! A namespaced lab for tests that need a controller, watchdogs on lab hosts and,
//! optionally, a BMC per host: [`LabNet`] for the network, real `defib-controller`,
//! `defib-watchdog` and `defibctl` binaries, state in a temporary directory.
//!
//! (tests/tests/controller_lab.rs has an older copy of the same harness inline.)
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::certs::LabCerts;
use crate::netns::LabNet;
use crate::{built_binary, stop_child};

pub const KEY: &str = "lab-key-0123456789abcdef0123456789";
pub const TOKEN: &str = "lab-api-token-0123456789";

/// A daemon run by the lab, its output in a log file; SIGTERM (then SIGKILL) on drop.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// The watchdog's `[libvirt]` section reporting only its own domains (the probes see
/// every qemu of the one kernel): of the system libvirt, or of the one at `uri` with its
/// qemu pid files in `pid_dir`.
fn libvirt_section(own: Option<(&str, &str)>) -> String {
    let mut t = "[libvirt]\nenabled = true\nonly_own_domains = true\n".to_string();
    if let Some((uri, pid_dir)) = own {
        t += &format!("uri = {uri:?}\npid_dir = {pid_dir:?}\n");
    }
    t
}

/// Host `h`'s watchdog TOML for a lab whose host `h` watches its own libvirt
/// (`libvirt[h]`: its URI and qemu pid directory).
pub fn own_libvirt(libvirt: Vec<(String, String)>) -> Box<dyn Fn(usize) -> String> {
    Box::new(move |h| {
        let (uri, pids) = &libvirt[h];
        libvirt_section(Some((uri, pids)))
    })
}

/// Watchdog TOML for two hosts: h0 watches the hostbed's system libvirt, h1 the libvirt
/// at `uri` (its qemu pid files in `pid_dir`).
pub fn system_and_own_libvirt(uri: String, pid_dir: String) -> Box<dyn Fn(usize) -> String> {
    Box::new(move |h| match h {
        0 => libvirt_section(None),
        _ => libvirt_section(Some((&uri, &pid_dir))),
    })
}

/// Controller TOML that fences h0 through its lab BMC at `bmc_addr` (IPMI, the
/// password in `{DIR}/bmc.pass`), with the lab's short waits: an `Unknown`
/// confirmation fences after 3 s of silence, a power-off is verified within 5 s.
pub fn fence_h0_by_ipmi(bmc_addr: &str) -> String {
    fence_by_ipmi("h0", bmc_addr)
}

/// Like [`fence_h0_by_ipmi`], for the lab host named `host`.
pub fn fence_by_ipmi(host: &str, bmc_addr: &str) -> String {
    use crate::bmc::{BMC_PORT, BMC_USER};
    format!(
        r#"[engine]
fence_on_unknown_after_ms = 3000
fence_retry_backoff_ms = 1000

[fence]
verify_timeout_ms = 5000
verify_poll_ms = 100

[[fence.host]]
name = "{host}"
levels = [{{ method = "ipmi", address = "{bmc_addr}", port = {BMC_PORT}, username = "{BMC_USER}", password_file = "{{DIR}}/bmc.pass", timeout_ms = 1000, attempts = 2, backoff_ms = 100 }}]
"#
    )
}

/// What a lab runs.
pub struct LabSpec {
    pub hosts: usize,
    /// The controller's `backend`.
    pub backend: &'static str,
    /// Appended to the controller's TOML (after `[controller]`; start with a section).
    /// `{DIR}` is replaced by the lab's directory, `{HOST0_NS}` by host 0's namespace.
    pub controller_extra: String,
    /// Appended to host `i`'s watchdog TOML.
    pub watchdog_extra: Box<dyn Fn(usize) -> String>,
    /// Whether the lab has a BMC network (see [`LabNet::add_bmc_network`]).
    pub bmc_network: bool,
}

pub struct Lab {
    pub net: LabNet,
    pub dir: tempfile::TempDir,
    pub controller: Option<Daemon>,
    pub watchdogs: Vec<Daemon>,
    /// Each host's id (its watchdog's `host.id`): `h0`, `h1`, … unless set before
    /// [`Lab::start_watchdogs`] (the Nova lab names them after Nova's computes).
    pub host_names: Vec<String>,
    /// Put in front of each watchdog's command line if set before
    /// [`Lab::start_watchdogs`], e.g. `setpriv --bounding-set=…` to run it with the
    /// unit's capabilities only.
    pub watchdog_prefix: Vec<String>,
    /// Extra environment of host `i`'s watchdog (index `i`; hosts past the end get
    /// none), set before [`Lab::start_watchdogs`]: e.g. libfaketime's variables to run
    /// one host on a wall clock of its own.
    pub watchdog_env: Vec<Vec<(String, String)>>,
    /// Lines added to host `i`'s `[controller]` section (index `i`), set before
    /// [`Lab::start_watchdogs`]: e.g. `spool_max_events = 8`.
    pub watchdog_controller_extra: Vec<String>,
    /// Several controllers ([`Lab::start_controllers`]): controller `i` (`ctl-i`), or
    /// `None` once killed. Empty with one controller ([`Lab::controller`]).
    pub controllers: Vec<Option<Daemon>>,
    /// Lines added to the controllers' `[intake]` section, set before
    /// [`Lab::start_controller`]: e.g. `stream_handshake_timeout_ms = 1000` (the
    /// section cannot be given twice, so [`LabSpec::controller_extra`] cannot set it).
    pub intake_extra: String,
}

/// Where controller `i` of several listens in the controller namespace: heartbeats,
/// event streams, API (controller 0 on the single controller's ports).
pub fn controller_ports(i: usize) -> (u16, u16, u16) {
    let base = 7410 + 10 * i as u16;
    (base, base + 1, base + 2)
}

impl Lab {
    /// Builds the network; the daemons start with [`Lab::start_controller`] and
    /// [`Lab::start_watchdogs`] (so that fixtures such as BMCs can start in between).
    pub fn new(spec: &LabSpec) -> Lab {
        let mut net = LabNet::new(spec.hosts, 2);
        if spec.bmc_network {
            net.add_bmc_network();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        crate::write_secret(dir.path().join("cluster.key"), KEY).unwrap();
        crate::write_secret(dir.path().join("api.token"), TOKEN).unwrap();
        Lab {
            net,
            dir,
            controller: None,
            watchdogs: Vec::new(),
            host_names: (0..spec.hosts).map(|h| format!("h{h}")).collect(),
            watchdog_prefix: Vec::new(),
            watchdog_env: Vec::new(),
            watchdog_controller_extra: Vec::new(),
            controllers: Vec::new(),
            intake_extra: String::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The lab's TLS files in its directory ([`crate::certs`]: `ca.pem`, `server.pem`,
    /// `server.key`), made on first use: a lab CA and a certificate it signs for the
    /// controllers' addresses on both paths. Every controller config has their `[tls]`.
    pub fn certs(&self) -> LabCerts {
        let certs = LabCerts::in_dir(self.dir.path());
        if !certs.key.exists() {
            let ips = [0, 1].map(|p| {
                self.net
                    .controller_addr(p)
                    .parse()
                    .expect("a controller address")
            });
            crate::certs::write_lab_certs(self.dir.path(), &ips).expect("lab certificates");
        }
        certs
    }

    /// The lab CA's certificate (PEM): what a client of a lab controller trusts.
    pub fn ca_file(&self) -> PathBuf {
        self.certs().ca
    }

    /// The API of controller `i` of several (`api_port` = [`controller_ports`]`(i).2`,
    /// 7412 for the single controller), over HTTPS.
    pub fn api_url(&self, api_port: u16) -> String {
        format!("https://{}:{api_port}", self.net.controller_addr(0))
    }

    pub fn spawn(&self, name: &str, ns: &str, bin: &Path, args: &[&str]) -> Daemon {
        self.spawn_with_env(name, ns, bin, args, &[])
    }

    /// [`Lab::spawn`] with `env` added to the daemon's environment.
    pub fn spawn_with_env(
        &self,
        name: &str,
        ns: &str,
        bin: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Daemon {
        let log = self.path(&format!("{name}.log"));
        let err = std::fs::File::create(&log).unwrap();
        let out = err.try_clone().unwrap();
        let child = self
            .net
            .command_in(ns, bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn start_controller(&mut self, spec: &LabSpec) {
        let dir = self.dir.path().display().to_string();
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
backend = "{backend}"

{intake}
{tls}
{extra}
"#,
            intake = self.intake_section(),
            key = self.path("cluster.key").display().to_string(),
            token = self.path("api.token").display().to_string(),
            tls = self.certs().tls_section(),
            store = self.path("controller.sqlite").display().to_string(),
            a0 = self.net.controller_addr(0),
            a1 = self.net.controller_addr(1),
            backend = spec.backend,
            extra = spec
                .controller_extra
                .replace("{DIR}", &dir)
                .replace("{HOST0_NS}", &self.net.host_ns(0)),
        );
        std::fs::write(self.path("controller.toml"), cfg).unwrap();
        let bin = built_binary("defib-controller", "defib-controller");
        let conf = self.path("controller.toml").display().to_string();
        let mut d = self.spawn(
            "controller",
            &self.net.controller_ns(),
            &bin,
            &["--config", &conf, "run"],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.log_text().contains("defib-controller ready") {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("controller exited ({status}):\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "controller not ready:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.controller = Some(d);
    }

    /// Starts `n` controllers that elect a leader on etcd (`[etcd]`, issue 15), each on
    /// ports of its own ([`controller_ports`]); `etcd_endpoints(i)` is how controller `i`
    /// reaches the etcd members. The watchdogs started after this send heartbeats to
    /// every controller and try their event streams on each in turn.
    pub fn start_controllers(
        &mut self,
        spec: &LabSpec,
        n: usize,
        etcd_endpoints: impl Fn(usize) -> Vec<String>,
    ) {
        for i in 0..n {
            let d = self.spawn_ha_controller(spec, i, &etcd_endpoints(i));
            self.controllers.push(Some(d));
        }
        for i in 0..n {
            self.wait_ready(i);
        }
    }

    fn spawn_ha_controller(&self, spec: &LabSpec, i: usize, endpoints: &[String]) -> Daemon {
        let dir = self.dir.path().display().to_string();
        let (hb, ev, api) = controller_ports(i);
        let cfg = format!(
            r#"[controller]
id = "ctl-{i}"
cluster_id = "lab"
key_file = {key:?}
heartbeat_listen = ["{a0}:{hb}", "{a1}:{hb}"]
event_listen = "{a0}:{ev}"
api_listen = "{a0}:{api}"
api_token_file = {token:?}
store_path = {store:?}
backend = "{backend}"

[etcd]
endpoints = {endpoints:?}

{intake}
{tls}
{extra}
"#,
            intake = self.intake_section(),
            key = self.path("cluster.key").display().to_string(),
            token = self.path("api.token").display().to_string(),
            tls = self.certs().tls_section(),
            store = self
                .path(&format!("controller-{i}.sqlite"))
                .display()
                .to_string(),
            a0 = self.net.controller_addr(0),
            a1 = self.net.controller_addr(1),
            backend = spec.backend,
            extra = spec
                .controller_extra
                .replace("{DIR}", &dir)
                .replace("{HOST0_NS}", &self.net.host_ns(0)),
        );
        let conf = self.path(&format!("controller-{i}.toml"));
        std::fs::write(&conf, cfg).unwrap();
        let bin = built_binary("defib-controller", "defib-controller");
        let conf = conf.display().to_string();
        self.spawn(
            &format!("controller-{i}"),
            &self.net.controller_ns(),
            &bin,
            &["--config", &conf, "run"],
        )
    }

    fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let d = self.controllers[i].as_mut().expect("started");
        while !d.log_text().contains("defib-controller ready") {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("controller {i} exited ({status}):\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "controller {i} not ready:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts controller `i` of several again (after [`Lab::kill_controller_at`]).
    pub fn restart_controller_at(&mut self, spec: &LabSpec, i: usize, endpoints: &[String]) {
        let d = self.spawn_ha_controller(spec, i, endpoints);
        self.controllers[i] = Some(d);
        self.wait_ready(i);
    }

    /// SIGKILLs controller `i` of several; its log is kept as `controller-i.log.N` and
    /// returned.
    pub fn kill_controller_at(&mut self, i: usize) -> String {
        let d = self.controllers.get_mut(i).and_then(Option::take);
        self.kill_keeping_log(d, &format!("controller-{i}"))
    }

    /// SIGKILLs `d` (if any) and keeps its log as `<name>.log.N` (N = 1 for the first
    /// one killed); its text.
    fn kill_keeping_log(&self, d: Option<Daemon>, name: &str) -> String {
        let Some(mut d) = d else {
            return String::new();
        };
        let _ = d.child.kill();
        let _ = d.child.wait();
        let mut n = 1;
        while self.path(&format!("{name}.log.{n}")).exists() {
            n += 1;
        }
        let kept = self.path(&format!("{name}.log.{n}"));
        let _ = std::fs::rename(&d.log, &kept);
        d.log = kept;
        d.log_text()
    }

    /// `defibctl --json ARGS` against controller `i` of several (any role).
    pub fn ctl_at(&self, i: usize, args: &[&str]) -> Result<Value, String> {
        let bin = built_binary("defibctl", "defibctl");
        let url = self.api_url(controller_ports(i).2);
        let out = self
            .net
            .command_in(&self.net.controller_ns(), &bin)
            .args(["--url", &url, "--token-file"])
            .arg(self.path("api.token"))
            .arg("--ca-file")
            .arg(self.ca_file())
            .arg("--json")
            .args(args)
            .output()
            .map_err(|e| format!("run defibctl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("defibctl --json output: {e}"))
    }

    /// Which of several controllers says it leads (acts), if one does.
    pub fn leader(&self) -> Option<usize> {
        (0..self.controllers.len())
            .filter(|&i| self.controllers[i].is_some())
            .find(|&i| {
                self.ctl_at(i, &["controllers"])
                    .is_ok_and(|v| v["role"] == "leader")
            })
    }

    /// Waits until one of several controllers leads; returns it.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no controller leads within {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The controllers' `[intake]` section: every lab host enrolled by the configuration;
    /// the lab's hosts share a source address, so the per-source heartbeat rate is raised
    /// to fit them all.
    fn intake_section(&self) -> String {
        format!(
            "[intake]\nenrolled_hosts = {:?}\nheartbeat_rate_per_source = 5000\n\
             heartbeat_burst_per_source = 10000\n{}",
            self.host_names, self.intake_extra
        )
    }

    /// Lab host `h`'s own key file (derived from the master key, as `defibctl hosts
    /// enroll` hands it out), written on first use with mode 0600.
    pub fn host_key_file(&self, h: usize) -> PathBuf {
        let path = self.path(&format!("wd{h}.key"));
        if !path.exists() {
            let master = protocol::MasterKey::new(KEY.as_bytes()).expect("lab master key");
            crate::write_secret(&path, master.host_key_text(&self.host_names[h]))
                .expect("host key");
        }
        path
    }

    pub fn start_watchdogs(&mut self, spec: &LabSpec) {
        for h in 0..spec.hosts {
            let state = self.path(&format!("wd{h}-state"));
            std::fs::create_dir_all(&state).unwrap();
            // Probes not pinned: several lab watchdogs (and maybe a real one) share this
            // machine's bpffs, and a pin directory is one daemon's.
            let extra = match (spec.watchdog_extra)(h) {
                e if e.contains("[probes]\n") => {
                    e.replacen("[probes]\n", "[probes]\npin_dir = \"\"\n", 1)
                }
                e => format!("[probes]\npin_dir = \"\"\n\n{e}"),
            };
            let cfg = format!(
                r#"[host]
id = "{id}"
cluster_id = "lab"
state_dir = {state:?}

[controller]
heartbeat_addrs = {heartbeat_addrs}
{event_addrs}
key_file = {key:?}
ca_file = {ca:?}
{controller_extra}

{libvirt}
{extra}
"#,
                id = self.host_names[h],
                state = state.display().to_string(),
                key = self.host_key_file(h).display().to_string(),
                ca = self.ca_file().display().to_string(),
                heartbeat_addrs = self.watchdog_heartbeat_addrs(),
                event_addrs = self.watchdog_event_addrs(),
                extra = extra,
                controller_extra = self
                    .watchdog_controller_extra
                    .get(h)
                    .map_or("", String::as_str),
                // One kernel and one libvirtd serve every lab host: a host watches
                // libvirt only if its extra configuration says which one.
                libvirt = if extra.contains("[libvirt]") {
                    ""
                } else {
                    "[libvirt]\nenabled = false\n"
                },
            );
            std::fs::write(self.path(&format!("wd{h}.toml")), cfg).unwrap();
            let d = self.spawn_watchdog(h);
            self.watchdogs.push(d);
        }
    }

    /// The controllers' heartbeat addresses as a watchdog lists them: every path of
    /// every controller.
    fn watchdog_heartbeat_addrs(&self) -> String {
        let n = self.controllers.len().max(1);
        let addrs: Vec<String> = (0..n)
            .flat_map(|i| {
                let port = controller_ports(i).0;
                [
                    format!("{}:{port}", self.net.controller_addr(0)),
                    format!("{}:{port}", self.net.controller_addr(1)),
                ]
            })
            .collect();
        format!("{addrs:?}")
    }

    /// The `event_addr` line (one controller) or `event_addrs` (several).
    fn watchdog_event_addrs(&self) -> String {
        let a0 = self.net.controller_addr(0);
        if self.controllers.is_empty() {
            return format!("event_addr = \"{a0}:7411\"");
        }
        let addrs: Vec<String> = (0..self.controllers.len())
            .map(|i| format!("{a0}:{}", controller_ports(i).1))
            .collect();
        format!("event_addrs = {addrs:?}")
    }

    /// SIGKILLs the controller (as a crash or a power loss of its machine would end it,
    /// with whatever it was waiting for lost); its log is kept as `controller.log.N`
    /// (N = 1 for the first one killed), and returned.
    pub fn kill_controller(&mut self) -> String {
        let d = self.controller.take();
        self.kill_keeping_log(d, "controller")
    }

    /// Host `h`'s watchdog on the configuration [`Lab::start_watchdogs`] wrote.
    fn spawn_watchdog(&self, h: usize) -> Daemon {
        let bin = built_binary("defib-watchdog", "defib-watchdog");
        let conf = self.path(&format!("wd{h}.toml")).display().to_string();
        let args = ["--config", &conf, "run", "--print-events"];
        let env = self.watchdog_env.get(h).map_or(&[][..], Vec::as_slice);
        let Some((program, prefix)) = self.watchdog_prefix.split_first() else {
            return self.spawn_with_env(
                &format!("watchdog-h{h}"),
                &self.net.host_ns(h),
                &bin,
                &args,
                env,
            );
        };
        let bin = bin.display().to_string();
        let all: Vec<&str> = prefix
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(bin.as_str()))
            .chain(args)
            .collect();
        self.spawn_with_env(
            &format!("watchdog-h{h}"),
            &self.net.host_ns(h),
            Path::new(program),
            &all,
            env,
        )
    }

    /// Starts host `h`'s watchdog again (e.g. after a power loss killed it), its earlier
    /// log kept beside the new one.
    pub fn restart_watchdog(&mut self, h: usize) {
        let old = self.path(&format!("watchdog-h{h}.log"));
        let _ = std::fs::rename(&old, old.with_extension("log.old"));
        let d = self.spawn_watchdog(h);
        self.watchdogs[h] = d;
    }

    /// `defibctl --json ARGS` run inside the controller's namespace (with several
    /// controllers: against the one that leads now).
    pub fn ctl(&self, args: &[&str]) -> Value {
        if !self.controllers.is_empty() {
            let leader = self.wait_leader(Duration::from_secs(30));
            return self
                .ctl_at(leader, args)
                .unwrap_or_else(|e| panic!("defibctl {args:?}: {e}\n{}", self.logs()));
        }
        let bin = built_binary("defibctl", "defibctl");
        let url = self.api_url(7412);
        let out = self
            .net
            .command_in(&self.net.controller_ns(), &bin)
            .args(["--url", &url, "--token-file"])
            .arg(self.path("api.token"))
            .arg("--ca-file")
            .arg(self.ca_file())
            .arg("--json")
            .args(args)
            .output()
            .expect("run defibctl");
        assert!(
            out.status.success(),
            "defibctl {args:?}: {}\n--- controller\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.controller_log(),
        );
        serde_json::from_slice(&out.stdout).expect("defibctl --json output")
    }

    pub fn controller_log(&self) -> String {
        self.controller
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    /// Every daemon's log, for failure messages.
    /// Host `h`'s watchdog's log so far.
    pub fn watchdog_log(&self, h: usize) -> String {
        self.watchdogs[h].log_text()
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- controller\n{}", self.controller_log());
        for d in self.controllers.iter().flatten() {
            s.push_str(&format!("\n--- {}\n{}", d.name, d.log_text()));
        }
        for w in &self.watchdogs {
            s.push_str(&format!("\n--- {}\n{}", w.name, w.log_text()));
        }
        s
    }

    /// (host, state) for every host the controller knows, sorted.
    pub fn host_states(&self) -> Vec<(String, String)> {
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

    pub fn state_of(&self, host: &str) -> String {
        self.host_states()
            .into_iter()
            .find(|(h, _)| h == host)
            .map(|(_, s)| s)
            .unwrap_or_else(|| "absent".into())
    }

    /// Polls the host states until `ok`, panicking with every log after `timeout`.
    pub fn wait_until(
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
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; hosts {states:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The open or closed host incident of `host` (the newest), with its timeline.
    pub fn host_incident(&self, host: &str) -> Option<Value> {
        let subject = format!("host:{host}");
        let list = self.ctl(&["incidents"]);
        let id = list["incidents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["subject"] == subject.as_str())
            .filter_map(|i| i["id"].as_u64())
            .max()?;
        Some(self.ctl(&["incidents", &id.to_string()]))
    }

    /// Waits until the controller lists `subject` (e.g. `vm:UUID`) among its VMs: the
    /// watchdog's libvirt inventory reached it.
    pub fn wait_vm_listed(&self, subject: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vms = self.ctl(&["vms"]).to_string();
            if vms.contains(subject) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{subject} never listed: {vms}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The controller's view of a VM (`vm:UUID`): the host it runs on and its state, if
    /// the controller knows it.
    pub fn vm_view(&self, subject: &str) -> Option<(String, String)> {
        let vms = self.ctl(&["vms"]);
        let list = vms
            .as_array()
            .cloned()
            .or_else(|| vms["vms"].as_array().cloned())
            .unwrap_or_default();
        list.iter().find(|v| v["resource"] == subject).map(|v| {
            (
                v["host"].as_str().unwrap_or("").to_string(),
                v["state"].as_str().unwrap_or("").to_string(),
            )
        })
    }

    /// Waits (at most `timeout`) until the controller's view of `subject` is `host`,
    /// `state`.
    pub fn wait_vm_on(&self, subject: &str, host: &str, state: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.vm_view(subject);
            if view
                .as_ref()
                .is_some_and(|(h, st)| h == host && st == state)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{subject} not {state} on {host} within {timeout:?} ({view:?})\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the one incident about `subject` to close and returns it with its
    /// timeline; fails if a second incident about it appears meanwhile.
    pub fn wait_closed_incident(&self, subject: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last_seen = Value::Null;
        loop {
            let list = self.ctl(&["incidents"]);
            let ours: Vec<&Value> = list["incidents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["subject"] == subject)
                .collect();
            if ours.len() > 1 {
                let timelines: Vec<String> = ours
                    .iter()
                    .map(|i| self.ctl(&["incidents", &i["id"].to_string()]).to_string())
                    .collect();
                panic!(
                    "one failure, several incidents:\n{}\n{}",
                    timelines.join("\n"),
                    self.logs()
                );
            }
            if let Some(inc) = ours.first() {
                let full = self.ctl(&["incidents", &inc["id"].to_string()]);
                if !inc["closed_at_ms"].is_null() {
                    return full;
                }
                last_seen = full;
            }
            assert!(
                Instant::now() < deadline,
                "no closed incident for {subject}: {last_seen}\n{list}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The kinds of every alarm raised about `host`.
    pub fn alarm_kinds(&self, host: &str) -> Vec<String> {
        let alarms = self.ctl(&["alarms"]);
        let list = alarms
            .as_array()
            .cloned()
            .or_else(|| alarms["alarms"].as_array().cloned())
            .unwrap_or_default();
        list.iter()
            .filter(|a| a["host"] == host)
            .filter_map(|a| a["kind"].as_str().map(String::from))
            .collect()
    }
}

/// The `to` states of a host incident's timeline entries about the host, in order.
pub fn host_transitions(incident: &Value) -> Vec<String> {
    incident["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["to"].as_str().is_some_and(|t| t != "-"))
        .filter(|e| {
            e["subject"].get("Host").is_some()
                || e["subject"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("host:"))
        })
        .filter_map(|e| e["to"].as_str().map(String::from))
        .collect()
}
