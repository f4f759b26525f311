//! The controller's configuration: one TOML file, every field defaulted, validated (and
//! its secrets read) before anything binds. A bad file exits with code 64 naming the field.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::edges::fence::agent::{check_option, FenceAgent};
use crate::edges::fence::ipmi::IpmiTool;
use crate::edges::fence::pacemaker::Pacemaker;
use crate::edges::fence::{CallPolicy, FenceDriver};
use crate::edges::fencing::{FenceTable, VerifyPolicy};
use crate::engine;
use crate::engine::detector::{DetectorConfig, DetectorKind};

pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    pub controller: ControllerSection,
    pub detector: DetectorSection,
    pub engine: EngineSection,
    pub fence: FenceSection,
    pub nova: NovaSection,
    pub neutron: NeutronSection,
}

/// `[neutron]`: moving the routers of a failed host's L3 agents (with `backend =
/// "nova"`, whose `[nova]` authentication it shares).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NeutronSection {
    /// Move routers at all.
    pub enabled: bool,
    /// Neutron's endpoint instead of the catalog's (type `network`); required with
    /// `nova.auth = "headers"`.
    pub url: String,
    /// Leave HA (VRRP) and DVR routers to Neutron (they fail over by themselves).
    pub skip_ha: bool,
    /// Moves at once.
    pub max_concurrent: u32,
    /// Bindings are read this often while a move is being verified.
    pub poll_interval_ms: u64,
    /// A router not bound to exactly its new agent this long after the move: failed.
    pub verify_timeout_s: u64,
}

impl Default for NeutronSection {
    fn default() -> Self {
        let s = crate::edges::neutron::NeutronSettings::default();
        Self {
            enabled: false,
            url: String::new(),
            skip_ha: s.skip_ha,
            max_concurrent: s.max_concurrent as u32,
            poll_interval_ms: s.poll_interval.as_millis() as u64,
            verify_timeout_s: s.verify_timeout.as_secs(),
        }
    }
}

impl NeutronSection {
    /// The router restorer's settings, checked (`None`: not enabled).
    pub fn resolve(
        &self,
        backend: Backend,
    ) -> Result<Option<crate::edges::neutron::NeutronSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        if backend != Backend::Nova {
            return Err(invalid(
                "neutron.enabled",
                "needs controller.backend = \"nova\" (it shares the [nova] authentication)",
            ));
        }
        if !(1..=1000).contains(&self.max_concurrent) {
            return Err(invalid("neutron.max_concurrent", "must be 1..=1000"));
        }
        if !(50..=60_000).contains(&self.poll_interval_ms) {
            return Err(invalid("neutron.poll_interval_ms", "must be 50..=60000"));
        }
        if self.verify_timeout_s == 0 {
            return Err(invalid("neutron.verify_timeout_s", "must be at least 1 s"));
        }
        Ok(Some(crate::edges::neutron::NeutronSettings {
            skip_ha: self.skip_ha,
            max_concurrent: self.max_concurrent as usize,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            verify_timeout: Duration::from_secs(self.verify_timeout_s),
        }))
    }
}

/// `[fence]`: how each host is fenced and how a fence is verified.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FenceSection {
    /// After a level's power-off, read the power status until it says off for at most
    /// this long; not off by then = that level is unverified.
    pub verify_timeout_ms: u64,
    /// Pause between those reads.
    pub verify_poll_ms: u64,
    /// Opt-in: the watchdogs' `controller.isolation_timeout_ms`, for hosts whose
    /// watchdog self-fences (`[self_fence] enabled`). Such a host, silent for this plus
    /// `self_fence_margin_ms` while its last heartbeat said "armed", counts as fenced
    /// (`SelfFenceDeadline`). Unset: off.
    pub self_fence_isolation_timeout_ms: Option<u64>,
    /// Time for the isolated watchdog to kill its VMs (and for clock drift) after its
    /// isolation timeout (default 2000).
    pub self_fence_margin_ms: u64,
    /// How `method = "pacemaker"` levels reach the cluster.
    pub pacemaker: PacemakerSection,
    /// One entry per host; a host without one cannot be fenced (its fence fails with
    /// the reason, an alarm, and nothing is restored).
    pub host: Vec<FenceHost>,
}

/// `[fence.pacemaker]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PacemakerSection {
    /// Put in front of `crm_mon` and `stonith_admin` (they must run on a cluster node):
    /// e.g. `["ssh", "root@node1"]`. Empty: run them on the controller's machine.
    pub command_prefix: Vec<String>,
    /// One `crm_mon` or history call is killed after this long.
    pub timeout_ms: u64,
    /// Tries per call, with `backoff_ms` doubling between them.
    pub attempts: u32,
    pub backoff_ms: u64,
    /// `stonith_admin --fence --timeout` (Pacemaker's own), plus 5 s of ours.
    pub fence_timeout_ms: u64,
    /// A fencing event older than this verifies nothing.
    pub history_max_age_ms: u64,
}

impl Default for PacemakerSection {
    fn default() -> Self {
        Self {
            command_prefix: Vec::new(),
            timeout_ms: 10_000,
            attempts: 2,
            backoff_ms: 200,
            fence_timeout_ms: 60_000,
            history_max_age_ms: 120_000,
        }
    }
}

impl Default for FenceSection {
    fn default() -> Self {
        Self {
            verify_timeout_ms: 10_000,
            verify_poll_ms: 250,
            self_fence_isolation_timeout_ms: None,
            self_fence_margin_ms: 2_000,
            pacemaker: PacemakerSection::default(),
            host: Vec::new(),
        }
    }
}

/// `[[fence.host]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FenceHost {
    /// The host id its watchdog reports.
    pub name: String,
    /// Tried in order until one level's power-off is verified.
    pub levels: Vec<FenceLevel>,
}

/// One fence level, chosen by `method`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum FenceLevel {
    /// `ipmitool -I lanplus` against the host's BMC.
    Ipmi(IpmiLevel),
    /// A ClusterLabs fence agent through its stdin interface.
    Agent(AgentLevel),
    /// Pacemaker's own fencing, verified by its fencing history.
    Pacemaker(PacemakerLevel),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PacemakerLevel {
    /// The host's node name in the cluster (default: the host's name).
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpmiLevel {
    /// The BMC's address (IP or name).
    pub address: String,
    #[serde(default = "default_ipmi_port")]
    pub port: u16,
    pub username: String,
    /// File holding the BMC password (one line).
    pub password_file: PathBuf,
    /// RMCP+ cipher suite (default 3: offered by nearly every BMC).
    #[serde(default = "default_cipher_suite")]
    pub cipher_suite: u8,
    /// Privilege level asked for (default `ADMINISTRATOR`).
    #[serde(default = "default_privilege")]
    pub privilege: String,
    /// One ipmitool call is killed after this long (default 5000).
    #[serde(default = "default_ipmi_timeout_ms")]
    pub timeout_ms: u64,
    /// Tries per call (default 3), with a pause of `backoff_ms` doubling each time.
    #[serde(default = "default_ipmi_attempts")]
    pub attempts: u32,
    #[serde(default = "default_ipmi_backoff_ms")]
    pub backoff_ms: u64,
    /// The ipmitool program (default `ipmitool` on PATH).
    #[serde(default = "default_ipmitool")]
    pub ipmitool: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentLevel {
    /// The agent: `fence_ipmilan`, `fence_redfish`, ... or a path.
    pub agent: String,
    /// The agent's options as its stdin takes them (`ip`, `username`, `lanplus`,
    /// `power_wait`, ...); not `action` and not `password`.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// File holding the password, sent as `password=` on the agent's stdin.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// One agent call is killed after this long (default 20000).
    #[serde(default = "default_agent_timeout_ms")]
    pub timeout_ms: u64,
    /// Tries per call (default 2), with a pause of `backoff_ms` doubling each time.
    #[serde(default = "default_agent_attempts")]
    pub attempts: u32,
    #[serde(default = "default_agent_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_ipmi_port() -> u16 {
    623
}
fn default_cipher_suite() -> u8 {
    3
}
fn default_privilege() -> String {
    "ADMINISTRATOR".into()
}
fn default_ipmi_timeout_ms() -> u64 {
    5_000
}
fn default_ipmi_attempts() -> u32 {
    3
}
fn default_ipmi_backoff_ms() -> u64 {
    200
}
fn default_ipmitool() -> String {
    "ipmitool".into()
}
fn default_agent_timeout_ms() -> u64 {
    20_000
}
fn default_agent_attempts() -> u32 {
    2
}
fn default_agent_backoff_ms() -> u64 {
    500
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSection {
    /// This controller's id (in acks and logs). Default: the hostname.
    pub id: String,
    /// Only heartbeats and streams of this cluster are taken in.
    pub cluster_id: String,
    /// HMAC key shared with every watchdog (≥ 16 bytes).
    pub key_file: PathBuf,
    /// UDP addresses for heartbeats, one per network path.
    pub heartbeat_listen: Vec<String>,
    /// TCP address for the watchdogs' event streams.
    pub event_listen: String,
    /// TCP address of the REST API and /metrics.
    pub api_listen: String,
    /// Bearer token for the API (everything but /healthz and /metrics). Required unless
    /// the API listens on loopback only.
    pub api_token_file: Option<PathBuf>,
    /// The SQLite store (intents, timelines, event dedup).
    pub store_path: PathBuf,
    /// How resources are restored: `none` (every restore fails with the reason),
    /// `libvirt` (restart a crashed domain in place through its host's watchdog, or
    /// evacuate it to another host from its reported definition),
    /// `nova` (force-down, evacuate, restart through OpenStack Nova; see `[nova]`).
    pub backend: Backend,
}

/// `controller.backend`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// No restore backend: restores fail with "no restore backend configured".
    #[default]
    None,
    /// libvirt only: restart in place through the host's watchdog; evacuate to another
    /// connected host from the definition its watchdog reported (shared storage).
    Libvirt,
    /// OpenStack Nova (`[nova]` section).
    Nova,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorSection {
    /// The watchdogs' heartbeat interval.
    pub heartbeat_interval_ms: u64,
    /// A host with no heartbeat on any path for this many intervals is Suspect.
    pub suspect_after_missed: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    pub tick_ms: u64,
    pub confirm_after_ms: u64,
    pub confirm_timeout_ms: u64,
    pub confirm_retry_ms: u64,
    pub fence_on_unknown_after_ms: u64,
    pub max_fence_attempts: u32,
    pub fence_retry_backoff_ms: u64,
    pub max_restarts_in_place: u32,
    pub restart_window_s: u64,
    pub max_evacuate_attempts: u32,
    pub max_dead_share: f64,
}

/// `[nova]`: how the controller reaches OpenStack and how it restores.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NovaSection {
    /// `cloud` (a clouds.yaml entry), `password`, `application_credential` (Keystone
    /// v3), or `headers` (no Keystone: identity headers, as the novabed takes them).
    pub auth: NovaAuthKind,
    /// clouds.yaml cloud name (`auth = "cloud"`).
    pub cloud: String,
    /// clouds.yaml file; default: the usual search path.
    pub clouds_file: Option<PathBuf>,
    /// Keystone (`password`, `application_credential`).
    pub auth_url: String,
    pub username: String,
    pub password_file: Option<PathBuf>,
    pub user_domain_name: String,
    pub project_name: String,
    pub project_domain_name: String,
    pub application_credential_id: String,
    pub application_credential_secret_file: Option<PathBuf>,
    /// `headers`: the identity sent as X-User-Id / X-Project-Id / X-Roles, and the
    /// X-Auth-Token (Placement's noauth2 takes `admin`).
    pub header_user_id: String,
    pub header_project_id: String,
    pub header_roles: String,
    pub header_token: String,
    /// Catalog region (empty: any) and interface.
    pub region_name: String,
    pub interface: String,
    /// Endpoints instead of the catalog's (required with `headers`).
    pub compute_url: String,
    pub placement_url: String,
    /// Compute microversion: ≥ 2.53 (force-down by service id); ≤ 2.94 keeps an
    /// evacuated server ACTIVE (above, the restorer starts it after).
    pub microversion: String,
    /// Rebuilds at once per target host (Nova's max_concurrent_builds).
    pub max_concurrent_per_target: u32,
    /// Hosts kept free for failover: filled first.
    pub reserved_hosts: Vec<String>,
    /// Only reserved hosts are evacuation targets.
    pub reserved_only: bool,
    /// Never evacuation targets.
    pub exclude_hosts: Vec<String>,
    /// Server metadata key with an integer priority (higher evacuated first).
    pub priority_key: String,
    pub poll_interval_ms: u64,
    pub restore_timeout_s: u64,
    pub unforce_timeout_s: u64,
    /// Per request, and tries for a transient failure (backoff 0.2 s doubling to 5 s).
    pub request_timeout_s: u64,
    pub request_attempts: u32,
    /// `operator` (defibctl unfence) or `automatic` (once the host heartbeats again
    /// and its nova-compute reports again).
    pub unforce: String,
    /// Evacuate with `force` (2.67): no scheduler pass per server, no Nova filters.
    pub bypass_scheduler: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NovaAuthKind {
    #[default]
    Cloud,
    Password,
    ApplicationCredential,
    Headers,
}

impl Default for NovaSection {
    fn default() -> Self {
        let s = crate::edges::nova::NovaSettings::default();
        Self {
            auth: NovaAuthKind::Cloud,
            cloud: String::new(),
            clouds_file: None,
            auth_url: String::new(),
            username: String::new(),
            password_file: None,
            user_domain_name: "Default".into(),
            project_name: String::new(),
            project_domain_name: "Default".into(),
            application_credential_id: String::new(),
            application_credential_secret_file: None,
            header_user_id: "admin".into(),
            header_project_id: "admin".into(),
            header_roles: "admin,member,reader".into(),
            header_token: "admin".into(),
            region_name: String::new(),
            interface: "internal".into(),
            compute_url: String::new(),
            placement_url: String::new(),
            microversion: "2.94".into(),
            max_concurrent_per_target: s.max_concurrent_per_target,
            reserved_hosts: Vec::new(),
            reserved_only: false,
            exclude_hosts: Vec::new(),
            priority_key: s.priority_key,
            poll_interval_ms: s.poll_interval.as_millis() as u64,
            restore_timeout_s: s.restore_timeout.as_secs(),
            unforce_timeout_s: s.unforce_timeout.as_secs(),
            request_timeout_s: 60,
            request_attempts: 5,
            unforce: "operator".into(),
            bypass_scheduler: false,
        }
    }
}

/// The `[nova]` section, checked and its secrets read.
#[derive(Debug, Clone)]
pub struct NovaResolved {
    pub session: crate::openstack::SessionConfig,
    pub microversion: String,
    pub settings: crate::edges::nova::NovaSettings,
}

/// A required secret file (see [`read_secret`]).
fn read_required_secret(field: &'static str, p: &Option<PathBuf>) -> Result<String, ConfigError> {
    let p = p.as_ref().ok_or_else(|| invalid(field, "required"))?;
    read_secret(field, p)
}

fn required(field: &'static str, v: &str) -> Result<String, ConfigError> {
    if v.trim().is_empty() {
        return Err(invalid(field, "required"));
    }
    Ok(v.trim().to_string())
}

fn opt(v: &str) -> Option<String> {
    Some(v.trim().to_string()).filter(|s| !s.is_empty())
}

impl NovaSection {
    /// `neutron_url`: `[neutron] url` when Neutron is enabled (`None`: from clouds.yaml
    /// or the catalog).
    pub fn resolve(&self, neutron_url: Option<&str>) -> Result<NovaResolved, ConfigError> {
        use crate::openstack::{Auth, Credentials, RetryPolicy, SessionConfig};
        let n = self;
        let mut region = opt(&n.region_name);
        let mut interface = n.interface.clone();
        let mut compute_url = opt(&n.compute_url);
        let mut placement_url = opt(&n.placement_url);
        let mut network_url = neutron_url.and_then(opt);
        let auth = match n.auth {
            NovaAuthKind::Cloud => {
                let name = required("nova.cloud", &n.cloud)?;
                let c = crate::openstack::clouds::load(&name, n.clouds_file.as_deref())
                    .map_err(|e| invalid("nova.cloud", e))?;
                region = region.or(c.region);
                if let Some(i) = c.interface {
                    interface = i;
                }
                compute_url = compute_url.or(c.compute_url);
                placement_url = placement_url.or(c.placement_url);
                network_url = network_url.or(c.network_url);
                c.auth
            }
            NovaAuthKind::Password => Auth::Keystone {
                auth_url: required("nova.auth_url", &n.auth_url)?,
                credentials: Credentials::Password {
                    username: required("nova.username", &n.username)?,
                    password: read_required_secret("nova.password_file", &n.password_file)?,
                    user_domain: required("nova.user_domain_name", &n.user_domain_name)?,
                    project_name: required("nova.project_name", &n.project_name)?,
                    project_domain: required("nova.project_domain_name", &n.project_domain_name)?,
                },
            },
            NovaAuthKind::ApplicationCredential => Auth::Keystone {
                auth_url: required("nova.auth_url", &n.auth_url)?,
                credentials: Credentials::ApplicationCredential {
                    id: required(
                        "nova.application_credential_id",
                        &n.application_credential_id,
                    )?,
                    secret: read_required_secret(
                        "nova.application_credential_secret_file",
                        &n.application_credential_secret_file,
                    )?,
                },
            },
            NovaAuthKind::Headers => {
                if compute_url.is_none() {
                    return Err(invalid(
                        "nova.compute_url",
                        "required with auth = \"headers\" (no catalog)",
                    ));
                }
                if placement_url.is_none() {
                    return Err(invalid(
                        "nova.placement_url",
                        "required with auth = \"headers\" (no catalog)",
                    ));
                }
                Auth::Headers {
                    user_id: required("nova.header_user_id", &n.header_user_id)?,
                    project_id: required("nova.header_project_id", &n.header_project_id)?,
                    roles: required("nova.header_roles", &n.header_roles)?,
                    token: required("nova.header_token", &n.header_token)?,
                }
            }
        };
        if !matches!(interface.as_str(), "public" | "internal" | "admin") {
            return Err(invalid("nova.interface", "public, internal or admin"));
        }
        if !crate::edges::nova::version_supported(&n.microversion) {
            return Err(invalid(
                "nova.microversion",
                "must be 2.53 or newer (force-down by service id)",
            ));
        }
        if !(1..=1000).contains(&n.max_concurrent_per_target) {
            return Err(invalid(
                "nova.max_concurrent_per_target",
                "must be 1..=1000",
            ));
        }
        if !(50..=60_000).contains(&n.poll_interval_ms) {
            return Err(invalid("nova.poll_interval_ms", "must be 50..=60000"));
        }
        if n.restore_timeout_s == 0 || n.unforce_timeout_s == 0 || n.request_timeout_s == 0 {
            return Err(invalid(
                "nova.restore_timeout_s",
                "timeouts must be at least 1 s",
            ));
        }
        if n.request_attempts == 0 {
            return Err(invalid("nova.request_attempts", "must be at least 1"));
        }
        let settings = crate::edges::nova::NovaSettings {
            max_concurrent_per_target: n.max_concurrent_per_target,
            reserved_hosts: n.reserved_hosts.iter().cloned().collect(),
            reserved_only: n.reserved_only,
            exclude_hosts: n.exclude_hosts.iter().cloned().collect(),
            priority_key: n.priority_key.clone(),
            poll_interval: Duration::from_millis(n.poll_interval_ms),
            restore_timeout: Duration::from_secs(n.restore_timeout_s),
            unforce_timeout: Duration::from_secs(n.unforce_timeout_s),
            bypass_scheduler: n.bypass_scheduler,
        };
        // The policy itself is the engine's (`engine_config`: `auto_unfence`).
        if !matches!(n.unforce.as_str(), "operator" | "automatic") {
            return Err(invalid("nova.unforce", "\"operator\" or \"automatic\""));
        }
        Ok(NovaResolved {
            session: SessionConfig {
                auth,
                region,
                interface,
                compute_url,
                placement_url,
                network_url,
                retry: RetryPolicy {
                    attempts: n.request_attempts,
                    timeout: Duration::from_secs(n.request_timeout_s),
                    ..RetryPolicy::default()
                },
            },
            microversion: n.microversion.clone(),
            settings,
        })
    }
}

impl Default for ControllerSection {
    fn default() -> Self {
        Self {
            id: hostname(),
            cluster_id: "default".into(),
            key_file: "/etc/defib/cluster.key".into(),
            heartbeat_listen: vec!["0.0.0.0:7410".into()],
            event_listen: "0.0.0.0:7411".into(),
            api_listen: "127.0.0.1:7412".into(),
            api_token_file: None,
            store_path: "/var/lib/defib-controller/defib.sqlite".into(),
            backend: Backend::None,
        }
    }
}

impl Default for DetectorSection {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            suspect_after_missed: 3,
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        let e = engine::Config::default();
        Self {
            tick_ms: e.tick.as_millis() as u64,
            confirm_after_ms: e.confirm_after.as_millis() as u64,
            confirm_timeout_ms: e.confirm_timeout.as_millis() as u64,
            confirm_retry_ms: e.confirm_retry.as_millis() as u64,
            fence_on_unknown_after_ms: e.fence_on_unknown_after.as_millis() as u64,
            max_fence_attempts: e.max_fence_attempts,
            fence_retry_backoff_ms: e.fence_retry_backoff.as_millis() as u64,
            max_restarts_in_place: e.max_restarts_in_place,
            restart_window_s: e.restart_window.as_secs(),
            max_evacuate_attempts: e.max_evacuate_attempts,
            max_dead_share: e.max_dead_share,
        }
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "defib-controller".into())
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Everything resolved and read, ready to bind.
#[derive(Clone)]
pub struct Resolved {
    pub cfg: ControllerConfig,
    /// Each configured host's fence levels, secrets read.
    pub fence: Arc<FenceTable>,
    pub verify: VerifyPolicy,
    pub key: protocol::Key,
    pub api_token: Option<String>,
    pub heartbeat_addrs: Vec<SocketAddr>,
    pub event_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// With `backend = "nova"`.
    pub nova: Option<NovaResolved>,
    /// With `[neutron] enabled = true`.
    pub neutron: Option<crate::edges::neutron::NeutronSettings>,
}

impl ControllerConfig {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            message: e.to_string(),
        })
    }

    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Ok(Self::default()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse {
                        path: p.display().to_string(),
                        message,
                    },
                    other => other,
                })
            }
        }
    }

    /// Checks every field and reads the secrets.
    pub fn resolve(self) -> Result<Resolved, ConfigError> {
        let c = &self.controller;
        protocol::check_controller_id(&c.id)
            .map_err(|e| invalid("controller.id", e.to_string()))?;
        protocol::check_cluster_id(&c.cluster_id)
            .map_err(|e| invalid("controller.cluster_id", e.to_string()))?;
        if c.heartbeat_listen.is_empty() || c.heartbeat_listen.len() > 8 {
            return Err(invalid(
                "controller.heartbeat_listen",
                "1 to 8 addresses, one per network path",
            ));
        }
        let heartbeat_addrs = c
            .heartbeat_listen
            .iter()
            .map(|a| a.parse::<SocketAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("controller.heartbeat_listen", format!("not ip:port: {e}")))?;
        let event_addr = c
            .event_listen
            .parse()
            .map_err(|e| invalid("controller.event_listen", format!("not ip:port: {e}")))?;
        let api_addr: SocketAddr = c
            .api_listen
            .parse()
            .map_err(|e| invalid("controller.api_listen", format!("not ip:port: {e}")))?;
        let key = protocol::load_key(&c.key_file)
            .map_err(|e| invalid("controller.key_file", e.to_string()))?;
        let api_token = match &c.api_token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| {
                    invalid("controller.api_token_file", format!("{}: {e}", p.display()))
                })?;
                let t = t.trim().to_string();
                if t.len() < 16 {
                    return Err(invalid(
                        "controller.api_token_file",
                        "token shorter than 16 characters",
                    ));
                }
                Some(t)
            }
            None if !api_addr.ip().is_loopback() => {
                return Err(invalid(
                    "controller.api_token_file",
                    "required when controller.api_listen is not a loopback address",
                ))
            }
            None => None,
        };
        if c.store_path.as_os_str().is_empty() {
            return Err(invalid("controller.store_path", "must not be empty"));
        }
        let neutron = self.neutron.resolve(c.backend)?;
        if neutron.is_some()
            && self.nova.auth == NovaAuthKind::Headers
            && opt(&self.neutron.url).is_none()
        {
            return Err(invalid(
                "neutron.url",
                "required with nova.auth = \"headers\" (no catalog)",
            ));
        }
        let nova = match c.backend {
            Backend::Nova => Some(
                self.nova
                    .resolve(neutron.is_some().then_some(self.neutron.url.as_str()))?,
            ),
            _ => None,
        };
        let d = &self.detector;
        if !(10..=10_000).contains(&d.heartbeat_interval_ms) {
            return Err(invalid(
                "detector.heartbeat_interval_ms",
                "must be 10..=10000",
            ));
        }
        if !(1..=100).contains(&d.suspect_after_missed) {
            return Err(invalid("detector.suspect_after_missed", "must be 1..=100"));
        }
        let e = &self.engine;
        if !(5..=1000).contains(&e.tick_ms) {
            return Err(invalid("engine.tick_ms", "must be 5..=1000"));
        }
        // Re-asking faster than the engine looks is pointless; re-asking slower than a
        // minute leaves a host that an operator's cluster already saw die unfenced.
        if !(e.tick_ms..=60_000).contains(&e.confirm_retry_ms) {
            return Err(invalid(
                "engine.confirm_retry_ms",
                "must be between engine.tick_ms and 60000",
            ));
        }
        if !(e.max_dead_share > 0.0 && e.max_dead_share <= 1.0) {
            return Err(invalid("engine.max_dead_share", "must be in (0, 1]"));
        }
        if e.max_fence_attempts == 0 {
            return Err(invalid("engine.max_fence_attempts", "must be at least 1"));
        }
        let (fence, verify) = resolve_fence(&self.fence)?;
        Ok(Resolved {
            cfg: self,
            fence: Arc::new(fence),
            verify,
            key,
            api_token,
            heartbeat_addrs,
            event_addr,
            api_addr,
            nova,
            neutron,
        })
    }

    /// The engine's configuration from these fields.
    pub fn engine_config(&self) -> engine::Config {
        let e = &self.engine;
        let ms = Duration::from_millis;
        let mut cfg = engine::Config {
            detector: DetectorConfig {
                interval: ms(self.detector.heartbeat_interval_ms),
                kind: DetectorKind::Fixed {
                    missed: self.detector.suspect_after_missed,
                },
            },
            tick: ms(e.tick_ms),
            confirm_after: ms(e.confirm_after_ms),
            confirm_timeout: ms(e.confirm_timeout_ms),
            confirm_retry: ms(e.confirm_retry_ms),
            fence_on_unknown_after: ms(e.fence_on_unknown_after_ms),
            max_fence_attempts: e.max_fence_attempts,
            fence_retry_backoff: ms(e.fence_retry_backoff_ms),
            max_restarts_in_place: e.max_restarts_in_place,
            restart_window: Duration::from_secs(e.restart_window_s),
            max_evacuate_attempts: e.max_evacuate_attempts,
            max_dead_share: e.max_dead_share,
            self_fence_deadline: self
                .fence
                .self_fence_isolation_timeout_ms
                .map(|t| ms(t.saturating_add(self.fence.self_fence_margin_ms))),
            vm_restorer: match self.controller.backend {
                Backend::Nova => engine::Source::Nova,
                Backend::Libvirt => engine::Source::Libvirt,
                Backend::None => engine::Source::Controller,
            },
            // Only the Nova backend reports a compute service coming back.
            auto_unfence: self.controller.backend == Backend::Nova
                && self.nova.unforce == "automatic",
            ..engine::Config::default()
        };
        cfg.detector.interval = ms(self.detector.heartbeat_interval_ms);
        cfg
    }
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the key, the token or the fence passwords.
        f.debug_struct("Resolved")
            .field("cfg", &self.cfg)
            .field("fenced_hosts", &self.fence.len())
            .field("heartbeat_addrs", &self.heartbeat_addrs)
            .field("event_addr", &self.event_addr)
            .field("api_addr", &self.api_addr)
            .finish_non_exhaustive()
    }
}

fn read_secret(field: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_string();
    if secret.is_empty() {
        return Err(invalid(field, format!("{} is empty", path.display())));
    }
    if secret.contains(['\n', '\r', '\0']) {
        return Err(invalid(
            field,
            format!("{} holds more than one line", path.display()),
        ));
    }
    Ok(secret)
}

fn policy(
    field: &str,
    timeout_ms: u64,
    attempts: u32,
    backoff_ms: u64,
) -> Result<CallPolicy, ConfigError> {
    if !(100..=600_000).contains(&timeout_ms) {
        return Err(invalid(
            format!("{field}.timeout_ms"),
            "must be 100..=600000",
        ));
    }
    if !(1..=10).contains(&attempts) {
        return Err(invalid(format!("{field}.attempts"), "must be 1..=10"));
    }
    if backoff_ms > 60_000 {
        return Err(invalid(
            format!("{field}.backoff_ms"),
            "must be at most 60000",
        ));
    }
    Ok(CallPolicy {
        timeout: Duration::from_millis(timeout_ms),
        attempts,
        backoff: Duration::from_millis(backoff_ms),
    })
}

/// Checks `[fence]` and reads every password file.
fn resolve_fence(f: &FenceSection) -> Result<(FenceTable, VerifyPolicy), ConfigError> {
    if !(100..=600_000).contains(&f.verify_timeout_ms) {
        return Err(invalid("fence.verify_timeout_ms", "must be 100..=600000"));
    }
    if !(10..=60_000).contains(&f.verify_poll_ms) {
        return Err(invalid("fence.verify_poll_ms", "must be 10..=60000"));
    }
    if let Some(t) = f.self_fence_isolation_timeout_ms {
        if !(20..=3_600_000).contains(&t) {
            return Err(invalid(
                "fence.self_fence_isolation_timeout_ms",
                "must be 20..=3600000 (the watchdogs' controller.isolation_timeout_ms)",
            ));
        }
    }
    if !(500..=600_000).contains(&f.self_fence_margin_ms) {
        return Err(invalid(
            "fence.self_fence_margin_ms",
            "must be 500..=600000",
        ));
    }
    let pm = &f.pacemaker;
    let pm_policy = policy("fence.pacemaker", pm.timeout_ms, pm.attempts, pm.backoff_ms)?;
    if !(1_000..=3_600_000).contains(&pm.fence_timeout_ms) {
        return Err(invalid(
            "fence.pacemaker.fence_timeout_ms",
            "must be 1000..=3600000",
        ));
    }
    if !(1_000..=86_400_000).contains(&pm.history_max_age_ms) {
        return Err(invalid(
            "fence.pacemaker.history_max_age_ms",
            "must be 1000..=86400000",
        ));
    }
    if pm.command_prefix.iter().any(String::is_empty) {
        return Err(invalid(
            "fence.pacemaker.command_prefix",
            "no empty arguments",
        ));
    }
    let mut table = FenceTable::new();
    for (i, h) in f.host.iter().enumerate() {
        let at = format!("fence.host[{i}]");
        if h.name.is_empty() {
            return Err(invalid(format!("{at}.name"), "must not be empty"));
        }
        let id = engine::HostId::new(h.name.clone());
        if table.contains_key(&id) {
            return Err(invalid(
                format!("{at}.name"),
                format!("host {:?} listed twice", h.name),
            ));
        }
        if h.levels.is_empty() {
            return Err(invalid(format!("{at}.levels"), "at least one level"));
        }
        let mut levels: Vec<Arc<dyn FenceDriver>> = Vec::new();
        for (j, level) in h.levels.iter().enumerate() {
            let at = format!("{at}.levels[{j}]");
            let driver: Arc<dyn FenceDriver> = match level {
                FenceLevel::Ipmi(l) => {
                    if l.address.is_empty() || l.address.chars().any(char::is_whitespace) {
                        return Err(invalid(format!("{at}.address"), "must be an address"));
                    }
                    if l.username.is_empty() {
                        return Err(invalid(format!("{at}.username"), "must not be empty"));
                    }
                    if !["ADMINISTRATOR", "OPERATOR", "USER", "CALLBACK", "OEM"]
                        .contains(&l.privilege.as_str())
                    {
                        return Err(invalid(
                            format!("{at}.privilege"),
                            "one of ADMINISTRATOR, OPERATOR, USER, CALLBACK, OEM",
                        ));
                    }
                    if l.cipher_suite > 17 {
                        return Err(invalid(format!("{at}.cipher_suite"), "must be 0..=17"));
                    }
                    Arc::new(IpmiTool {
                        program: l.ipmitool.clone(),
                        address: l.address.clone(),
                        port: l.port,
                        username: l.username.clone(),
                        password: read_secret(&format!("{at}.password_file"), &l.password_file)?,
                        cipher_suite: l.cipher_suite,
                        privilege: l.privilege.clone(),
                        policy: policy(&at, l.timeout_ms, l.attempts, l.backoff_ms)?,
                    })
                }
                FenceLevel::Pacemaker(l) => {
                    let node = l.node.clone().unwrap_or_else(|| h.name.clone());
                    if node.is_empty() || node.chars().any(char::is_whitespace) {
                        return Err(invalid(format!("{at}.node"), "must be a node name"));
                    }
                    Arc::new(Pacemaker {
                        node,
                        command_prefix: pm.command_prefix.clone(),
                        policy: pm_policy,
                        fence_timeout: Duration::from_millis(pm.fence_timeout_ms),
                        history_max_age: Duration::from_millis(pm.history_max_age_ms),
                    })
                }
                FenceLevel::Agent(l) => {
                    if l.agent.is_empty() || l.agent.chars().any(char::is_whitespace) {
                        return Err(invalid(
                            format!("{at}.agent"),
                            "must be an agent name or path (fence_ipmilan, ...)",
                        ));
                    }
                    for (k, v) in &l.options {
                        check_option(k, v)
                            .map_err(|e| invalid(format!("{at}.options"), e.to_string()))?;
                    }
                    let password = match &l.password_file {
                        Some(p) => Some(read_secret(&format!("{at}.password_file"), p)?),
                        None => None,
                    };
                    Arc::new(FenceAgent {
                        agent: l.agent.clone(),
                        options: l.options.clone(),
                        password,
                        policy: policy(&at, l.timeout_ms, l.attempts, l.backoff_ms)?,
                    })
                }
            };
            levels.push(driver);
        }
        table.insert(id, levels);
    }
    let verify = VerifyPolicy {
        timeout: Duration::from_millis(f.verify_timeout_ms),
        poll: Duration::from_millis(f.verify_poll_ms),
    };
    Ok((table, verify))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(extra: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        let text = format!(
            "[controller]\nkey_file = {:?}\n{extra}",
            key.display().to_string()
        );
        (dir, text)
    }

    #[test]
    fn a_file_with_only_the_key_gives_the_documented_defaults() {
        let (_d, text) = with_key("");
        let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
        assert_eq!(r.cfg.detector.heartbeat_interval_ms, 100);
        assert_eq!(r.cfg.detector.suspect_after_missed, 3);
        assert_eq!(r.heartbeat_addrs.len(), 1);
        assert!(r.api_token.is_none());
    }

    #[test]
    fn an_unknown_field_is_named() {
        let err = ControllerConfig::parse("[detector]\nheartbeat_intervall_ms = 5\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_intervall_ms"), "{err}");
    }

    #[test]
    fn a_missing_key_file_names_the_field() {
        let cfg =
            ControllerConfig::parse("[controller]\nkey_file = \"/nonexistent/key\"\n").unwrap();
        let err = cfg.resolve().unwrap_err();
        assert!(err.to_string().contains("controller.key_file"), "{err}");
    }

    #[test]
    fn the_confirm_retry_is_configurable_and_a_retry_below_the_tick_is_named() {
        let (_d, text) = with_key("[engine]\nconfirm_retry_ms = 500\n");
        let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
        assert_eq!(
            r.cfg.engine_config().confirm_retry,
            Duration::from_millis(500)
        );

        let (_d, text) = with_key("[engine]\ntick_ms = 50\nconfirm_retry_ms = 10\n");
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("engine.confirm_retry_ms"), "{err}");
    }

    #[test]
    fn an_api_on_a_public_address_without_a_token_is_refused() {
        let (_d, text) = with_key("api_listen = \"0.0.0.0:7412\"\n");
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string().contains("controller.api_token_file"),
            "{err}"
        );
    }

    #[test]
    fn the_backend_defaults_to_none_and_libvirt_can_be_chosen() {
        let (_d, text) = with_key("");
        let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
        assert_eq!(r.cfg.controller.backend, Backend::None);
        assert_eq!(
            r.cfg.engine_config().vm_restorer,
            engine::Source::Controller
        );
        let (_d, text) = with_key("backend = \"libvirt\"\n");
        let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
        assert_eq!(r.cfg.controller.backend, Backend::Libvirt);
        // The timeline names who restores VMs.
        assert_eq!(r.cfg.engine_config().vm_restorer, engine::Source::Libvirt);
    }

    #[test]
    fn the_nova_backend_needs_its_auth_and_names_the_missing_field() {
        let (_d, text) = with_key("backend = \"nova\"\n");
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("nova.cloud"), "{err}");
        let (_d, text) = with_key(
            "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n\"\n",
        );
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("nova.placement_url"), "{err}");
        let (_d, text) = with_key(
            "backend = \"nova\"\n[nova]\nauth = \"password\"\nauth_url = \"http://k\"\nusername = \"u\"\nproject_name = \"p\"\npassword_file = \"/nonexistent\"\n",
        );
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("nova.password_file"), "{err}");
    }

    #[test]
    fn the_nova_backend_with_header_identity_resolves_with_the_documented_defaults() {
        let (_d, text) = with_key(
            "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n/v2.1\"\nplacement_url = \"http://p\"\n",
        );
        let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
        let n = r.nova.unwrap();
        assert_eq!(n.microversion, "2.94");
        assert_eq!(n.settings.max_concurrent_per_target, 10);
        assert_eq!(n.settings.priority_key, "defib:priority");
        let (_d, text) = with_key(
            "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n\"\nplacement_url = \"http://p\"\nmicroversion = \"2.50\"\n",
        );
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("nova.microversion"), "{err}");
    }

    #[test]
    fn the_automatic_unforce_setting_is_the_engines_unfence_policy() {
        let nova = "backend = \"nova\"\n[nova]\nauth = \"headers\"\ncompute_url = \"http://n\"\nplacement_url = \"http://p\"\n";
        let (_d, text) = with_key(nova);
        let c = ControllerConfig::parse(&text).unwrap();
        assert!(!c.engine_config().auto_unfence, "operator by default");
        let (_d, text) = with_key(&format!("{nova}unforce = \"automatic\"\n"));
        let c = ControllerConfig::parse(&text).unwrap();
        assert!(c.engine_config().auto_unfence);
    }

    #[test]
    fn an_unknown_backend_is_named() {
        let (_d, text) = with_key("backend = \"xen\"\n");
        let err = ControllerConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("xen") && err.contains("backend"), "{err}");
    }

    #[test]
    fn a_bad_listen_address_names_the_field() {
        let (_d, text) = with_key("heartbeat_listen = [\"nowhere\"]\n");
        let err = ControllerConfig::parse(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string().contains("controller.heartbeat_listen"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    fn dir_with_secrets() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::write(dir.path().join("bmc.pass"), "bmc-pass-7f3a\n").unwrap();
        dir
    }

    fn text(dir: &tempfile::TempDir, fence: &str) -> String {
        format!(
            "[controller]\nkey_file = {:?}\n{fence}",
            dir.path().join("k").display().to_string()
        )
        .replace("PASS", &dir.path().join("bmc.pass").display().to_string())
    }

    #[test]
    fn a_host_with_an_ipmi_level_and_an_agent_level_resolves_both_in_order() {
        let dir = dir_with_secrets();
        let t = text(
            &dir,
            r#"
[fence]
verify_timeout_ms = 5000

[[fence.host]]
name = "h0"
levels = [
  { method = "ipmi", address = "10.0.0.5", username = "admin", password_file = "PASS" },
  { method = "agent", agent = "fence_ipmilan", password_file = "PASS", options = { ip = "10.0.0.5", lanplus = "1", power_wait = "0" } },
]
"#,
        );
        let r = ControllerConfig::parse(&t).unwrap().resolve().unwrap();
        let levels = &r.fence[&engine::HostId::new("h0")];
        assert_eq!(levels.len(), 2);
        assert_eq!(levels[0].describe(), "ipmi 10.0.0.5:623");
        assert_eq!(levels[1].describe(), "fence_ipmilan 10.0.0.5");
        assert_eq!(r.verify.timeout, Duration::from_secs(5));
        // The password is read but never printed.
        assert!(!format!("{r:?}").contains("bmc-pass-7f3a"));
    }

    #[test]
    fn an_unknown_level_field_or_method_is_named() {
        let dir = dir_with_secrets();
        let t = text(
            &dir,
            "[[fence.host]]\nname = \"h0\"\nlevels = [{ method = \"ipmi\", address = \"a\", username = \"u\", password_file = \"PASS\", cipher = 3 }]\n",
        );
        let err = ControllerConfig::parse(&t).unwrap_err().to_string();
        assert!(err.contains("cipher"), "{err}");
        let t = text(
            &dir,
            "[[fence.host]]\nname = \"h0\"\nlevels = [{ method = \"telepathy\" }]\n",
        );
        let err = ControllerConfig::parse(&t).unwrap_err().to_string();
        assert!(err.contains("telepathy"), "{err}");
    }

    #[test]
    fn a_missing_password_file_names_the_level() {
        let dir = dir_with_secrets();
        let t = text(
            &dir,
            "[[fence.host]]\nname = \"h0\"\nlevels = [{ method = \"ipmi\", address = \"a\", username = \"u\", password_file = \"/nonexistent/p\" }]\n",
        );
        let err = ControllerConfig::parse(&t)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fence.host[0].levels[0].password_file"),
            "{err}"
        );
    }

    #[test]
    fn an_agent_option_that_would_inject_a_line_is_refused() {
        let dir = dir_with_secrets();
        let t = text(
            &dir,
            "[[fence.host]]\nname = \"h0\"\nlevels = [{ method = \"agent\", agent = \"fence_ipmilan\", options = { ip = \"a\\naction=on\" } }]\n",
        );
        let err = ControllerConfig::parse(&t)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("fence.host[0].levels[0].options"), "{err}");
    }

    #[test]
    fn the_self_fence_deadline_is_the_isolation_timeout_plus_the_margin_and_off_by_default() {
        let dir = dir_with_secrets();
        let r = ControllerConfig::parse(&text(&dir, ""))
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(r.cfg.engine_config().self_fence_deadline, None);
        let t = text(&dir, "[fence]\nself_fence_isolation_timeout_ms = 3000\n");
        let r = ControllerConfig::parse(&t).unwrap().resolve().unwrap();
        assert_eq!(
            r.cfg.engine_config().self_fence_deadline,
            Some(Duration::from_millis(5000))
        );
        let t = text(
            &dir,
            "[fence]\nself_fence_isolation_timeout_ms = 3000\nself_fence_margin_ms = 0\n",
        );
        let err = ControllerConfig::parse(&t)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("fence.self_fence_margin_ms"), "{err}");
    }

    #[test]
    fn a_pacemaker_level_takes_the_hosts_name_unless_it_names_its_node() {
        let dir = dir_with_secrets();
        let t = text(
            &dir,
            r#"
[fence.pacemaker]
command_prefix = ["ssh", "root@node1"]

[[fence.host]]
name = "node2"
levels = [{ method = "pacemaker" }]

[[fence.host]]
name = "compute-3"
levels = [{ method = "pacemaker", node = "node3" }]
"#,
        );
        let r = ControllerConfig::parse(&t).unwrap().resolve().unwrap();
        assert_eq!(
            r.fence[&engine::HostId::new("node2")][0].describe(),
            "pacemaker node node2"
        );
        assert_eq!(
            r.fence[&engine::HostId::new("compute-3")][0].describe(),
            "pacemaker node node3"
        );
    }

    #[test]
    fn a_host_listed_twice_is_refused() {
        let dir = dir_with_secrets();
        let one = "[[fence.host]]\nname = \"h0\"\nlevels = [{ method = \"agent\", agent = \"fence_x\" }]\n";
        let t = text(&dir, &format!("{one}{one}"));
        let err = ControllerConfig::parse(&t)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("fence.host[1].name"), "{err}");
    }
}
