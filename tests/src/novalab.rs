//! The Nova lab: the project's novabed (`cargo xtask novabed start`: a real Nova 34 with
//! Placement and three fake-driver computes fake-1..fake-3) and an in-process
//! controller — the real engine task, the real SQLite store and the real Nova restorer
//! — whose hosts heartbeat through its real intake channel.
//!
//! The lab hosts are Nova's fake computes, with no watchdog and no BMC: a host "fails"
//! when the test SIGKILLs its nova-compute and silences its heartbeats, and the
//! fence the engine then asks for is answered by the test ([`Controller::answer_fence`],
//! as a verified IPMI power-off: the compute process is dead, which is what a power-off
//! would make sure of). Everything after that is the controller's own path.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use controller::api::view::{Command as OpCommand, Snapshot};
use controller::edges::fencing::PowerConfirmer;
use controller::edges::neutron::{NeutronSettings, RouterAwareRestorer, RouterEvent};
use controller::edges::nova::{NovaRestorer, NovaSettings, RestoreEvent};
use controller::edges::Fencer;
use controller::engine::{
    Config as EngineConfig, FenceMethod, FenceOutcome, FenceVerifier, HostId, HostState, Input,
    IntentKey,
};
use controller::openstack::compute::{ComputeService, Server};
use controller::openstack::network::{Agent, Network};
use controller::openstack::{
    compute::Compute, Auth, Method, RetryPolicy, Service, Session, SessionConfig,
};
use controller::runtime::engine_task::{Edges, EngineChannels, EngineTask, EngineTaskParts};
use controller::runtime::intake::{HeartbeatSeen, Intake};
use serde_json::json;

pub const NOVA_URL: &str = "http://127.0.0.1:38774/v2.1";
pub const PLACEMENT_URL: &str = "http://127.0.0.1:38778";
pub const NEUTRON_URL: &str = "http://127.0.0.1:39696";
pub const HOSTS: [&str; 3] = ["fake-1", "fake-2", "fake-3"];

/// Where the novabed lives (as `cargo xtask novabed` installs it).
pub fn novabed_dir() -> PathBuf {
    std::env::var_os("NOVABED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/defib-novabed"))
}

fn script() -> PathBuf {
    crate::workspace_root().join("xtask/novabed/novabed.sh")
}

/// The session config for the novabed's header identity.
pub fn session_config() -> SessionConfig {
    SessionConfig {
        auth: Auth::Headers {
            user_id: "admin".into(),
            project_id: "admin".into(),
            roles: "admin,member,reader".into(),
            token: "admin".into(),
        },
        region: None,
        interface: "internal".into(),
        compute_url: Some(NOVA_URL.into()),
        placement_url: Some(PLACEMENT_URL.into()),
        network_url: Some(NEUTRON_URL.into()),
        retry: RetryPolicy::default(),
    }
}

pub fn network_client() -> Network {
    network_client_at(NEUTRON_URL)
}

/// A Neutron client talking to `url` (e.g. a port where nothing listens yet).
pub fn network_client_at(url: &str) -> Network {
    Network::new(Arc::new(
        Session::new(SessionConfig {
            network_url: Some(url.into()),
            ..session_config()
        })
        .expect("client"),
    ))
}

pub fn compute_client() -> Compute {
    Compute::new(
        Arc::new(Session::new(session_config()).expect("client")),
        "2.94",
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The test's own view of Nova (synchronous helpers).
pub struct Nova {
    rt: tokio::runtime::Runtime,
    pub compute: Compute,
}

impl Nova {
    /// `None` when the novabed does not answer.
    pub fn connect() -> Option<Nova> {
        let rt = runtime();
        let compute = compute_client();
        let ok = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), compute.compute_services(None))
                .await
                .is_ok_and(|r| r.is_ok_and(|s| s.len() >= 3))
        });
        let nova = ok.then_some(Nova { rt, compute })?;
        // The test bed is the project's: servers an earlier, interrupted run (or a
        // benchmark) left behind would count against the capacity and the plans here.
        nova.delete_named("");
        Some(nova)
    }

    /// Like [`Nova::connect`], but leaves every server as it is (the lab shares the
    /// novabed and removes only its own servers).
    pub fn attach() -> Option<Nova> {
        let rt = runtime();
        let compute = compute_client();
        let ok = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), compute.compute_services(None))
                .await
                .is_ok_and(|r| r.is_ok_and(|s| s.len() >= 3))
        });
        ok.then_some(Nova { rt, compute })
    }

    pub fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn service(&self, host: &str) -> ComputeService {
        self.block(self.compute.compute_services(Some(host)))
            .expect("os-services")
            .into_iter()
            .find(|s| s.host == host)
            .expect("service of host")
    }

    pub fn servers_named(&self, prefix: &str) -> Vec<Server> {
        self.block(self.compute.servers(&format!("name=%5E{prefix}")))
            .expect("servers")
    }

    /// Boots `n` servers named `{prefix}-…` on `host` (2.74 `host`), with `metadata`, and
    /// waits until all are ACTIVE. Returns their ids.
    pub fn boot_on(
        &self,
        host: &str,
        n: usize,
        prefix: &str,
        metadata: serde_json::Value,
    ) -> Vec<String> {
        let image = std::fs::read_to_string(novabed_dir().join("data/image_id"))
            .expect("novabed image id")
            .trim()
            .to_string();
        self.boot_image_on(&image, host, n, prefix, metadata)
    }

    /// The project's boot-sector guest (the hostbed's, `cargo xtask hostbed start`) as a
    /// Glance image, for hosts with the libvirt driver; uploaded once.
    pub fn hbguest_image(&self) -> String {
        let out = Command::new("bash")
            .arg(script())
            .arg("hbguest-image")
            .arg(crate::guests::image_path())
            .env("NOVABED", novabed_dir())
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("novabed.sh hbguest-image");
        assert!(out.status.success(), "hbguest-image: {}", out.status);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("an image id")
            .trim()
            .to_string()
    }

    /// Like [`Nova::boot_on`], from the Glance image `image`.
    pub fn boot_image_on(
        &self,
        image: &str,
        host: &str,
        n: usize,
        prefix: &str,
        metadata: serde_json::Value,
    ) -> Vec<String> {
        let body = json!({"server": {
            "name": prefix, "imageRef": image, "flavorRef": "1", "networks": "none",
            "min_count": n, "max_count": n, "host": host, "metadata": metadata}});
        let boot = || {
            self.block(self.compute.session.request_raw(
                Service::Compute("2.74"),
                Method::Post,
                "/servers",
                Some(&body),
            ))
            .expect("boot servers");
        };
        boot();
        let t0 = Instant::now();
        loop {
            let ss = self.servers_named(prefix);
            if let Some(bad) = ss.iter().find(|s| s.status == "ERROR") {
                // A host that Nova's API already lists up may not be in its scheduler's
                // view yet (a compute service just restarted by the test before): the
                // boot is tried again, for a minute, before it counts as a failure.
                let no_host = bad
                    .fault
                    .as_ref()
                    .is_some_and(|f| f.message.contains("No valid host"));
                if no_host && t0.elapsed() < Duration::from_secs(60) {
                    eprintln!("boot on {host}: no valid host yet; trying again");
                    self.delete_named(prefix);
                    std::thread::sleep(Duration::from_secs(2));
                    boot();
                    continue;
                }
                panic!("boot ERROR: {:?}", bad.fault);
            }
            if ss.len() == n && ss.iter().all(|s| s.status == "ACTIVE") {
                assert!(ss.iter().all(|s| s.host.as_deref() == Some(host)));
                return ss.into_iter().map(|s| s.id).collect();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "servers not ACTIVE in time"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Deletes every server named `{prefix}…` and waits until Nova has them gone.
    pub fn delete_named(&self, prefix: &str) {
        for s in self.servers_named(prefix) {
            let _ = self.block(self.compute.session.request_raw(
                Service::Compute("2.94"),
                Method::Delete,
                &format!("/servers/{}", s.id),
                None,
            ));
        }
        let t0 = Instant::now();
        while !self.servers_named(prefix).is_empty() && t0.elapsed() < Duration::from_secs(180) {
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Evacuation migrations Nova recorded for `server`.
    pub fn evacuations(&self, server: &str) -> usize {
        self.block(self.compute.evacuations(Some(server)))
            .expect("os-migrations")
            .len()
    }

    /// The pid of fake-`n`'s running nova-compute (from the novabed's pid list, checked
    /// against the process's command line).
    pub fn compute_pid(&self, n: u32) -> Option<i32> {
        compute_pid_of(&format!("fake-{n}"))
    }

    /// SIGKILLs host fake-`n`'s nova-compute (the host "dies").
    pub fn kill_compute(&self, n: u32) {
        kill_compute_of(&format!("fake-{n}"));
    }

    /// Starts host fake-`n`'s nova-compute again (the host "returns").
    pub fn start_compute(&self, n: u32) {
        let st = Command::new("bash")
            .arg(script())
            .args(["start-compute", &n.to_string()])
            .env("NOVABED", novabed_dir())
            .status()
            .expect("start-compute");
        assert!(st.success());
    }

    /// Brings `fake-n` to a clean start: its compute runs, it is not forced down, and
    /// Nova sees it up (a test that failed half-way may have left it otherwise).
    pub fn ensure_host_ready(&self, n: u32) {
        let host = format!("fake-{n}");
        if self.compute_pid(n).is_none() {
            self.start_compute(n);
        }
        let t0 = Instant::now();
        loop {
            let s = self.service(&host);
            if s.forced_down {
                let _ = self.block(self.compute.set_forced_down(&s.id, false));
            } else if s.state == "up" {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "{host} did not come back up: {s:?}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits until every server of `ids` is ACTIVE, settled, and not on `not_on`.
    pub fn wait_all_active_elsewhere(
        &self,
        prefix: &str,
        ids: &[String],
        not_on: &str,
        timeout: Duration,
    ) -> Vec<Server> {
        let t0 = Instant::now();
        loop {
            let ss = self.servers_named(prefix);
            let done: Vec<Server> = ss
                .iter()
                .filter(|s| {
                    ids.contains(&s.id)
                        && s.status == "ACTIVE"
                        && s.task_state.is_none()
                        && s.host.as_deref().is_some_and(|h| h != not_on)
                })
                .cloned()
                .collect();
            if done.len() == ids.len() {
                return done;
            }
            if t0.elapsed() >= timeout {
                // What each server was doing says whether the controller never asked or
                // Nova never finished.
                let states: Vec<String> = ss
                    .iter()
                    .filter(|s| ids.contains(&s.id))
                    .map(|s| {
                        format!(
                            "{} {} task={:?} host={:?} evacuations={}",
                            s.id,
                            s.status,
                            s.task_state,
                            s.host,
                            self.evacuations(&s.id)
                        )
                    })
                    .collect();
                panic!(
                    "only {} of {} ACTIVE elsewhere after {timeout:?}: {states:#?}",
                    done.len(),
                    ids.len()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The pid of `host`'s running nova-compute (from the novabed's pid list, checked against
/// the process's command line: a pid recorded long ago may be another process's now).
pub fn compute_pid_of(host: &str) -> Option<i32> {
    let pids = std::fs::read_to_string(novabed_dir().join("pids")).ok()?;
    let name = format!("nova-compute-{host}");
    pids.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, nm)| nm.trim() == name)
        .filter_map(|(p, _)| p.parse::<i32>().ok())
        .rfind(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("nova-compute") && c.contains(&format!("compute-{host}.conf"))
            })
        })
}

/// SIGKILLs `host`'s nova-compute.
pub fn kill_compute_of(host: &str) {
    let pid = compute_pid_of(host).expect("a running nova-compute");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill nova-compute");
}

/// A host of the novabed whose nova-compute has Nova's libvirt driver, against a test's
/// own libvirtd (its host name is the node's name): started new, and on drop its compute
/// stopped and its service deleted (the test deletes its servers first).
pub struct LibvirtCompute {
    pub host: String,
}

impl LibvirtCompute {
    /// Starts `host`'s compute against the libvirtd at `uri` and waits until Nova lists
    /// its hypervisor.
    pub fn start(host: &str, uri: &str) -> LibvirtCompute {
        let st = Command::new("bash")
            .arg(script())
            .args(["start-libvirt-compute", host, uri])
            .env("NOVABED", novabed_dir())
            .status()
            .expect("start-libvirt-compute");
        let compute = LibvirtCompute { host: host.into() };
        assert!(
            st.success(),
            "start-libvirt-compute {host}: {st}\n{}",
            compute.log_tail()
        );
        compute
    }

    /// Starts its compute again, as it had been (the host returns after a power-off).
    pub fn restart(&self) {
        let st = Command::new("bash")
            .arg(script())
            .args(["restart-libvirt-compute", &self.host])
            .env("NOVABED", novabed_dir())
            .status()
            .expect("restart-libvirt-compute");
        assert!(st.success(), "restart-libvirt-compute {}: {st}", self.host);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(novabed_dir().join(format!("logs/nova-compute-{}.log", self.host)))
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for LibvirtCompute {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["remove-compute", &self.host])
            .env("NOVABED", novabed_dir())
            .status();
    }
}

/// A fencer that hands every fence request to the test.
struct TestFencer {
    asked: std_mpsc::Sender<(HostId, IntentKey)>,
}

impl Fencer for TestFencer {
    fn fence(&mut self, host: &HostId, _method: FenceMethod, key: &IntentKey) {
        let _ = self.asked.send((host.clone(), key.clone()));
    }
}

/// An in-process controller with the Nova restorer.
pub struct Controller {
    rt: tokio::runtime::Runtime,
    pub channels: EngineChannels,
    fences: std_mpsc::Receiver<(HostId, IntentKey)>,
    events: tokio::sync::mpsc::UnboundedReceiver<RestoreEvent>,
    router_events: tokio::sync::mpsc::UnboundedReceiver<RouterEvent>,
    silent: Arc<Mutex<BTreeSet<String>>>,
    /// Each host's boots so far, less one: raised when it returns (see
    /// [`Controller::resume_heartbeats`]).
    reboots: Arc<Mutex<BTreeMap<String, u8>>>,
    /// The engine task's metrics (its alarms and `defib_stopped_acting`).
    pub metrics: Arc<controller::metrics::Metrics>,
    /// How the engine task ended, once it has (the error's whole chain as text).
    ended: std_mpsc::Receiver<Result<(), String>>,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Controller {
    /// Starts the engine task on `store` (resuming what it holds) with the Nova
    /// restorer; `HOSTS` heartbeat every 100 ms unless silenced. The engine's settings
    /// are its defaults: an operator unfences.
    pub fn start(store: &Path, settings: NovaSettings) -> Controller {
        Self::start_with(store, EngineConfig::default(), settings, None, &HOSTS)
    }

    /// Like [`Controller::start`], with `hosts` heartbeating instead of [`HOSTS`].
    pub fn start_for_hosts(store: &Path, settings: NovaSettings, hosts: &[&str]) -> Controller {
        Self::start_with(store, EngineConfig::default(), settings, None, hosts)
    }

    /// Like [`Controller::start`], with the engine's settings `engine` (e.g. the
    /// automatic unfence policy, `auto_unfence`, that `[nova] unforce = "automatic"`
    /// sets: the engine unfences a returned host whose compute service the Nova
    /// restorer sees reporting again).
    pub fn start_with_engine(
        store: &Path,
        engine: EngineConfig,
        settings: NovaSettings,
    ) -> Controller {
        Self::start_with(store, engine, settings, None, &HOSTS)
    }

    /// Like [`Controller::start`], with routers: the Nova restorer and the Neutron
    /// router restorer joined (as the runtime does with `[neutron] enabled = true`).
    pub fn start_with_routers(
        store: &Path,
        settings: NovaSettings,
        neutron: NeutronSettings,
    ) -> Controller {
        Self::start_with(
            store,
            EngineConfig::default(),
            settings,
            Some((neutron, NEUTRON_URL.into())),
            &HOSTS,
        )
    }

    /// Like [`Controller::start_with_routers`], with Neutron at `neutron_url`.
    pub fn start_with_routers_at(
        store: &Path,
        settings: NovaSettings,
        neutron: NeutronSettings,
        neutron_url: &str,
    ) -> Controller {
        Self::start_with(
            store,
            EngineConfig::default(),
            settings,
            Some((neutron, neutron_url.into())),
            &HOSTS,
        )
    }

    fn start_with(
        store: &Path,
        engine: EngineConfig,
        settings: NovaSettings,
        neutron: Option<(NeutronSettings, String)>,
        hosts: &[&str],
    ) -> Controller {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let rt = runtime();
        let (rev_tx, router_events) = tokio::sync::mpsc::unbounded_channel();
        let (fence_tx, fences) = std_mpsc::channel();
        let (ev_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let silent: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let reboots: Arc<Mutex<BTreeMap<String, u8>>> = Arc::default();
        let metrics = Arc::new(controller::metrics::Metrics::new());
        let (ended_tx, ended) = std_mpsc::channel();
        let channels = rt.block_on(async {
            let store = controller::store::SqliteStore::open(store).expect("store");
            let parts = EngineTaskParts {
                // The automatic unforce is the engine's policy; the restorer reports.
                engine_config: engine,
                store: Box::new(store),
                metrics: metrics.clone(),
                controller_id: "lab".into(),
                cluster_id: "lab".into(),
                heard: Vec::new(),
                end_on_store_failure: false,
                role: Default::default(),
                enrollment: None,
                backlog: Default::default(),
            };
            let (task, channels) = EngineTask::new(parts, |links| Edges {
                fencer: Box::new(TestFencer { asked: fence_tx }),
                // No fence levels: the heartbeats are the only source ("Unknown").
                confirmer: Box::new(PowerConfirmer::new(Arc::default(), links.results.clone())),
                restorer: match neutron {
                    None => Box::new(NovaRestorer::start(
                        compute_client(),
                        settings,
                        links,
                        Some(ev_tx),
                    )),
                    Some((n, url)) => Box::new(RouterAwareRestorer::start(
                        |halves| {
                            Box::new(NovaRestorer::start(
                                compute_client(),
                                settings,
                                halves,
                                Some(ev_tx),
                            ))
                        },
                        network_client_at(&url),
                        n,
                        links,
                        Some(rev_tx),
                    )),
                },
                // The fake hosts have no watchdog streams.
                copies: Box::new(controller::edges::stale_copies::NoStreams),
            })
            .expect("engine task");
            tokio::spawn(async move {
                let result = task.run(std::future::pending::<()>()).await;
                if let Err(e) = &result {
                    // Said here too: a test that does not wait for the end still shows it.
                    eprintln!("engine task ended: {e}");
                }
                let _ = ended_tx.send(result.map_err(|e| format!("{e:#}")));
            });
            let intake = channels.intake.clone();
            let silent = silent.clone();
            let reboots = reboots.clone();
            tokio::spawn(async move {
                let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let quiet = silent.lock().expect("lock").clone();
                    let reboots = reboots.lock().expect("lock").clone();
                    for (i, h) in hosts.iter().enumerate() {
                        if quiet.contains(h) {
                            continue;
                        }
                        let hb = HeartbeatSeen {
                            host: h.to_string(),
                            path: 0,
                            peer,
                            boot_id: protocol::BootId({
                                let mut id = [i as u8 + 1; 16];
                                id[0] = id[0].wrapping_add(reboots.get(h).copied().unwrap_or(0));
                                id
                            }),
                            incarnation: 1,
                            sent_unix_ns: unix_ns(),
                            status: Default::default(),
                            received: tokio::time::Instant::now(),
                        };
                        if intake.send(Intake::Heartbeats(vec![hb])).await.is_err() {
                            return;
                        }
                    }
                }
            });
            channels
        });
        Controller {
            rt,
            channels,
            fences,
            events,
            router_events,
            silent,
            reboots,
            metrics,
            ended,
        }
    }

    /// `host` stops heartbeating.
    pub fn silence(&self, host: &str) {
        self.silent.lock().expect("lock").insert(host.into());
    }

    /// `host` heartbeats again: it is back from its fence, a power-off, so it heartbeats
    /// with a new boot id (the same one would say it never lost power: the engine's
    /// `FenceContradicted`).
    pub fn resume_heartbeats(&self, host: &str) {
        *self
            .reboots
            .lock()
            .expect("lock")
            .entry(host.into())
            .or_default() += 1;
        self.silent.lock().expect("lock").remove(host);
    }

    /// Waits for the engine to ask for `host`'s fence and answers: verified. Returns
    /// when the answer was handed in.
    pub fn answer_fence(&self, host: &str, timeout: Duration) -> Instant {
        let t0 = Instant::now();
        loop {
            let left = timeout.saturating_sub(t0.elapsed());
            let (h, key) = self
                .fences
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no fence of {host} asked within {timeout:?}"));
            if h.as_str() != host {
                continue;
            }
            let at = Instant::now();
            self.channels
                .results
                .send(Input::FenceResult {
                    host: h,
                    key,
                    outcome: FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
                })
                .expect("engine task runs");
            return at;
        }
    }

    /// The next fence the engine asks for `host`, unanswered (None within `timeout`).
    pub fn next_fence(&self, host: &str, timeout: Duration) -> Option<IntentKey> {
        let t0 = Instant::now();
        loop {
            let left = timeout.saturating_sub(t0.elapsed());
            let (h, key) = self.fences.recv_timeout(left).ok()?;
            if h.as_str() == host {
                return Some(key);
            }
        }
    }

    /// Answers the fence `key` of `host`: verified by its BMC.
    pub fn verify_fence(&self, host: &str, key: IntentKey) {
        self.send(Input::FenceResult {
            host: HostId::new(host),
            key,
            outcome: FenceOutcome::Verified(FenceVerifier::IpmiPowerOff),
        });
    }

    pub fn send(&self, input: Input) {
        self.channels.results.send(input).expect("engine task runs");
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.channels.snapshot.borrow().clone()
    }

    pub fn host_state(&self, host: &str) -> Option<HostState> {
        self.snapshot()
            .hosts
            .iter()
            .find(|h| h.host == host)
            .map(|h| h.state)
    }

    pub fn wait_host_state(&self, host: &str, state: HostState, timeout: Duration) {
        let t0 = Instant::now();
        while self.host_state(host) != Some(state) {
            assert!(
                t0.elapsed() < timeout,
                "{host} not {state:?} within {timeout:?}: {:?}",
                self.host_state(host)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `host` has gone past `state` on the way of a recovery (the snapshot
    /// is published on a timer, so a fast host may skip showing `state` itself).
    pub fn wait_host_state_past(&self, host: &str, state: HostState, timeout: Duration) {
        use HostState::*;
        let order = [
            Up, Suspect, Confirming, Fencing, Fenced, Evacuating, Recovered,
        ];
        let rank = |s: HostState| order.iter().position(|o| *o == s);
        let want = rank(state);
        let t0 = Instant::now();
        while self.host_state(host).and_then(rank) < want {
            assert!(
                t0.elapsed() < timeout,
                "{host} not past {state:?} within {timeout:?}: {:?}",
                self.host_state(host)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The operator's unfence (as `defibctl unfence` sends it).
    pub fn unfence(&self, host: &str) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let commands = self.channels.commands.clone();
        let host = host.to_string();
        self.rt.block_on(async move {
            commands
                .send(OpCommand::Unfence { host, reply: tx })
                .await
                .map_err(|e| e.to_string())?;
            rx.await.map_err(|e| e.to_string())?
        })
    }

    /// The restorer's events so far.
    pub fn events(&mut self) -> Vec<RestoreEvent> {
        let mut v = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            v.push(e);
        }
        v
    }

    /// The next restorer event (waits up to `timeout`).
    pub fn next_event(&mut self, timeout: Duration) -> Option<RestoreEvent> {
        let ev = &mut self.events;
        self.rt.block_on(async {
            tokio::time::timeout(timeout, ev.recv())
                .await
                .ok()
                .flatten()
        })
    }

    /// The router restorer's events so far.
    pub fn router_events(&mut self) -> Vec<RouterEvent> {
        let mut v = Vec::new();
        while let Ok(e) = self.router_events.try_recv() {
            v.push(e);
        }
        v
    }

    /// The next router restorer event (waits up to `timeout`).
    pub fn next_router_event(&mut self, timeout: Duration) -> Option<RouterEvent> {
        let ev = &mut self.router_events;
        self.rt.block_on(async {
            tokio::time::timeout(timeout, ev.recv())
                .await
                .ok()
                .flatten()
        })
    }

    /// How the engine task ended, if it ends within `timeout`.
    pub fn wait_ended(&self, timeout: Duration) -> Option<Result<(), String>> {
        self.ended.recv_timeout(timeout).ok()
    }

    /// Ends the controller at once, like a crash: every task stops where it is.
    pub fn kill(self) {
        self.rt.shutdown_background();
    }
}

/// The test's own view of Neutron and of the lab L3 agents (one per lab host, the
/// novabed's `l3_agent_lab.py`: Neutron's own agent RPC, no kernel work).
pub struct Neutron {
    rt: tokio::runtime::Runtime,
    pub network: Network,
}

impl Neutron {
    /// `None` when Neutron does not answer with three live L3 agents.
    pub fn connect() -> Option<Neutron> {
        let rt = runtime();
        let network = network_client();
        let ok = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), network.l3_agents(None))
                .await
                .is_ok_and(|r| r.is_ok_and(|a| a.len() >= 3))
        });
        let neutron = ok.then_some(Neutron { rt, network })?;
        // The test bed is the project's: routers an earlier, interrupted run (or a
        // benchmark) left behind would weigh on the agents' loads here.
        neutron.delete_named("");
        Some(neutron)
    }

    pub fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn raw(&self, method: Method, path: &str, body: Option<serde_json::Value>) -> Vec<u8> {
        self.block(
            self.network
                .session
                .request_raw(Service::Network, method, path, body.as_ref()),
        )
        .unwrap_or_else(|e| panic!("{method:?} {path}: {e}"))
    }

    /// The L3 agent of `host`.
    pub fn agent(&self, host: &str) -> Agent {
        self.block(self.network.l3_agents(Some(host)))
            .expect("agents")
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no L3 agent on {host}"))
    }

    /// Creates `n` routers named `{prefix}-i` (`ha` as given); returns their ids in
    /// that order. (Neutron has no bulk create for routers: 8 requests at once.)
    pub fn create_routers(&self, prefix: &str, n: usize, ha: bool) -> Vec<String> {
        let sem = Arc::new(tokio::sync::Semaphore::new(8));
        let futs: Vec<_> = (0..n)
            .map(|i| {
                let body = json!({"router": {
                    "name": format!("{prefix}-{i}"), "project_id": "admin", "ha": ha}});
                let (session, sem) = (self.network.session.clone(), sem.clone());
                self.rt.spawn(async move {
                    let _slot = sem.acquire().await;
                    session
                        .request::<serde_json::Value>(
                            Service::Network,
                            Method::Post,
                            "/v2.0/routers",
                            Some(&body),
                        )
                        .await
                })
            })
            .collect();
        futs.into_iter()
            .map(|f| {
                let v = self
                    .block(f)
                    .expect("task")
                    .unwrap_or_else(|e| panic!("creating a router: {e}"));
                v["router"]["id"].as_str().expect("id").to_string()
            })
            .collect()
    }

    /// Deletes every router whose name starts with `prefix` ("" = all).
    pub fn delete_named(&self, prefix: &str) {
        let out = self.raw(Method::Get, "/v2.0/routers", None);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        for r in v["routers"].as_array().into_iter().flatten() {
            if r["name"].as_str().unwrap_or("").starts_with(prefix) {
                let id = r["id"].as_str().expect("id");
                let _ = self.block(self.network.session.request_raw(
                    Service::Network,
                    Method::Delete,
                    &format!("/v2.0/routers/{id}"),
                    None,
                ));
            }
        }
    }

    /// Binds `router` to the agent of `host` only.
    /// (Neutron may schedule a new router on its own meanwhile: retried until so.)
    pub fn bind(&self, router: &str, host: &str) {
        let to = self.agent(host);
        for _ in 0..20 {
            let b = self.bindings(router);
            if b.len() == 1 && b[0].id == to.id {
                return;
            }
            for a in b.iter().filter(|a| a.id != to.id) {
                self.block(self.network.remove_router(&a.id, router))
                    .expect("unbind");
            }
            if !b.iter().any(|a| a.id == to.id) {
                let _ = self.block(self.network.add_router(&to.id, router));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("router {router} could not be bound to {host} alone");
    }

    pub fn bindings(&self, router: &str) -> Vec<Agent> {
        self.block(self.network.router_agents(router))
            .expect("l3-agents")
    }

    fn agent_pid(n: u32) -> Option<i32> {
        let pids = std::fs::read_to_string(novabed_dir().join("pids")).ok()?;
        let name = format!("l3-agent-fake-{n}");
        pids.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, nm)| *nm == name)
            .filter_map(|(p, _)| p.parse::<i32>().ok())
            .rfind(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("l3_agent_lab.py"))
            })
    }

    /// SIGKILLs the L3 agent of fake-`n` (its routers' state file stays: the data
    /// plane of a killed agent keeps its namespaces).
    pub fn kill_agent(&self, n: u32) {
        let pid = Self::agent_pid(n).expect("a running L3 agent");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill l3 agent");
    }

    /// Starts the L3 agent of fake-`n` again.
    pub fn start_agent(&self, n: u32) {
        let st = Command::new("bash")
            .arg(script())
            .args(["start-l3-agent", &n.to_string()])
            .env("NOVABED", novabed_dir())
            .status()
            .expect("start-l3-agent");
        assert!(st.success());
    }

    /// fake-`n`'s agent runs, is admin-up and alive (a failed test may have left it
    /// otherwise).
    pub fn ensure_agent_ready(&self, n: u32) {
        let host = format!("fake-{n}");
        if Self::agent_pid(n).is_none() {
            self.start_agent(n);
        }
        let t0 = Instant::now();
        loop {
            let a = self.agent(&host);
            if !a.admin_state_up {
                let _ = self.block(self.network.set_agent_admin_state(&a.id, true));
            } else if a.alive {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the L3 agent of {host} is not alive: {a:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Routers the agent of fake-`n` gained since `since_ms` (unix ms), as its own log
    /// says (each line: a sync that found the router newly bound to it).
    pub fn gained_since(n: u32, since_ms: u64) -> Vec<String> {
        let log = novabed_dir().join(format!("data/neutron/l3-agent-fake-{n}.json.log"));
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split(' ');
                let t: u64 = it.next()?.parse().ok()?;
                (it.next()? == "gained" && t >= since_ms).then(|| it.next().map(str::to_string))?
            })
            .collect()
    }
}

/// Now, in unix ms.
pub fn unix_ms() -> u64 {
    unix_ns() / 1_000_000
}

/// A TCP port that forwards to another once opened: before [`Forwarder::open`] nothing
/// listens there (connections are refused, as with a Neutron API that is down).
pub struct Forwarder {
    pub port: u16,
    to: SocketAddr,
}

impl Forwarder {
    /// A free port on 127.0.0.1, closed for now.
    pub fn closed(to: &str) -> Forwarder {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        Forwarder {
            port,
            to: to.parse().expect("addr"),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on, every connection is forwarded (for the rest of the process).
    pub fn open(&self) {
        let l = std::net::TcpListener::bind(("127.0.0.1", self.port)).expect("bind forwarder");
        forward(l, self.to);
    }
}

/// Makes `to` (an address of this process's network namespace, e.g. the novabed's Nova on
/// 127.0.0.1) reachable at `at` inside the network namespace `ns` (e.g. a lab
/// controller's), for the rest of the process: the listener is opened in `ns`, each
/// connection onwards from here.
pub fn forward_into_netns(ns: &str, at: &str, to: &str) {
    let at: SocketAddr = at.parse().expect("addr");
    let l = crate::attacks::in_netns(ns, || std::net::TcpListener::bind(at))
        .unwrap_or_else(|e| panic!("bind {at} in {ns}: {e}"));
    forward(l, to.parse().expect("addr"));
}

/// Accepts on `l` and copies each connection both ways to a new one to `to`.
fn forward(l: std::net::TcpListener, to: SocketAddr) {
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(a) = c else { continue };
            let Ok(b) = std::net::TcpStream::connect(to) else {
                continue;
            };
            let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
                let _ = a2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}
