//! The controller's configuration: one TOML file, every field defaulted, validated (and
//! its secrets read) before anything binds. A bad file exits with code 64 naming the field.
use std::net::SocketAddr;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use service_manager::{check_range, OutOfRange};

use crate::edges::fencing::{FenceTable, VerifyPolicy};
use crate::engine;
use crate::engine::detector::{DetectorConfig, DetectorKind};

mod fence;
mod openstack;
#[cfg(test)]
mod tests;

pub use fence::{
    AgentLevel, FenceHost, FenceLevel, FenceSection, IpmiLevel, PacemakerLevel, PacemakerSection,
};
pub use openstack::{NeutronSection, NovaAuthKind, NovaResolved, NovaSection};

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
    pub etcd: EtcdSection,
    pub api: ApiSection,
    pub tls: TlsSection,
    pub intake: IntakeSection,
}

/// `[intake]`: what one source may cost the controller on the watchdog ports. The
/// defaults fit a cloud whose hosts each have their own address; a source that stands
/// for many hosts (a NAT, a test bed) needs a higher heartbeat rate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeSection {
    /// Heartbeat datagrams per second one source address may send on average; over
    /// it they are dropped before their MAC is checked (counted as
    /// `source_over_rate`). 0: no limit. A watchdog sends 10/s per path.
    pub heartbeat_rate_per_source: u64,
    /// How many datagrams one source may send at once.
    pub heartbeat_burst_per_source: u64,
    /// Event streams open at once from one source address; more are closed at accept.
    pub stream_connections_per_source: usize,
    /// Event streams open at once in total.
    pub stream_connections_total: usize,
    /// A new event stream must complete its `Hello` within this (slowloris).
    pub stream_handshake_timeout_ms: u64,
    /// An event stream with no frame from the watchdog for this long is closed (the
    /// watchdog reconnects and resends what was not acked).
    pub stream_idle_timeout_ms: u64,
    /// Hosts enrolled by this file, in addition to those enrolled in the store with
    /// `defibctl hosts enroll` (for clouds whose host list lives in configuration
    /// management). They cannot be revoked through the API: remove them here.
    pub enrolled_hosts: Vec<String>,
}

impl Default for IntakeSection {
    fn default() -> Self {
        Self {
            heartbeat_rate_per_source: 200,
            heartbeat_burst_per_source: 400,
            stream_connections_per_source: 8,
            stream_connections_total: 16_384,
            stream_handshake_timeout_ms: 10_000,
            stream_idle_timeout_ms: 1_800_000,
            enrolled_hosts: Vec::new(),
        }
    }
}

/// `[api]`: how the REST API treats its clients (its address and token file are
/// `controller.api_listen` and `controller.api_token_file`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Serve the API without a bearer token: anyone who reaches it can read every
    /// host and VM and set maintenance or unfence. Only for a throwaway test setup;
    /// the controller says so loudly at every start. Without it,
    /// `controller.api_token_file` is required.
    pub insecure_no_token: bool,
}

/// `[tls]`: the controller's certificate. Set: the API speaks HTTPS only. Unset: plain
/// HTTP, and the controller warns at every start that the API is not encrypted.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM certificate chain: the controller's own certificate first, then any
    /// intermediates. Its names (or IP addresses) must be those clients connect to.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1). Mode 0600, owned
    /// by the controller's user.
    pub key_file: Option<PathBuf>,
}

/// `[etcd]`: several controllers electing a leader on etcd, with the intents there.
/// Without endpoints (the default) the controller is alone and keeps its intents in
/// SQLite (`controller.store_path`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdSection {
    /// The etcd members' client URLs (`http://host:port`). Non-empty: several
    /// controllers, one leader; `controller.store_path` is not used.
    pub endpoints: Vec<String>,
    /// The leader's lease, in whole seconds (etcd's unit). Default 1: with etcd's
    /// `--heartbeat-interval 50 --election-timeout 500` a follower takes over 0.9–1.5 s
    /// after the leader dies. etcd silently grants at least ⌈1.5 × its election
    /// timeout⌉ (2 s with its defaults 100/1000); the controller logs what it got.
    pub lease_ttl_s: u64,
    /// The leader stops acting this long before its lease can expire on etcd's side
    /// (clock drift, scheduling delay between the check and the action).
    pub stop_margin_ms: u64,
    /// Bound of every etcd call; a call without an answer moves to the next member.
    pub call_timeout_ms: u64,
    /// How often a follower tries to take the lead (and the leader refreshes its view).
    pub campaign_every_ms: u64,
    /// Keys live under `<prefix><controller.cluster_id>/`.
    pub prefix: String,
    /// This controller's API as the others should name it to operators (a follower
    /// refusing a write says where the leader is). Default: `https://<api_listen>`
    /// with `[tls]`, `http://<api_listen>` without.
    pub advertise_api: String,
}

impl Default for EtcdSection {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            lease_ttl_s: 1,
            stop_margin_ms: 250,
            call_timeout_ms: 500,
            campaign_every_ms: 100,
            prefix: "/defib/".into(),
            advertise_api: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSection {
    /// This controller's id (in acks and logs). Default: the hostname.
    pub id: String,
    /// Only heartbeats and streams of this cluster are taken in.
    pub cluster_id: String,
    /// The master key (≥ 16 bytes, mode 0600): each enrolled host's key is derived
    /// from it by HKDF over the host id (`defibctl hosts enroll` prints a host's key).
    pub key_file: PathBuf,
    /// UDP addresses for heartbeats, one per network path.
    pub heartbeat_listen: Vec<String>,
    /// TCP address for the watchdogs' event streams.
    pub event_listen: String,
    /// TCP address of the REST API and /metrics.
    pub api_listen: String,
    /// Bearer token for the API (everything but /healthz and /metrics). Required unless
    /// `api.insecure_no_token` is set.
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
    pub restore_retry_backoff_ms: u64,
    pub unanswered_after_ms: u64,
    pub max_dead_share: f64,
    /// A lag of the controller's own above this is an overload (alarm).
    pub overload_lag_ms: u64,
    /// The most a silence is excused by the controller's own lag and blind time.
    pub max_overload_allowance_ms: u64,
    /// Closed incidents kept in memory (the API's list); the store keeps them all.
    pub closed_incidents_kept: usize,
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
            restore_retry_backoff_ms: e.restore_retry_backoff.as_millis() as u64,
            unanswered_after_ms: e.unanswered_after.as_millis() as u64,
            max_dead_share: e.max_dead_share,
            overload_lag_ms: e.overload_lag.as_millis() as u64,
            max_overload_allowance_ms: e.max_overload_allowance.as_millis() as u64,
            closed_incidents_kept: e.closed_incidents_kept,
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

/// `check_range(..)?` in the checks of every section.
impl<F: Into<String>> From<OutOfRange<F>> for ConfigError {
    fn from(e: OutOfRange<F>) -> Self {
        invalid(e.field, e.message)
    }
}

/// Everything resolved and read, ready to bind.
#[derive(Clone)]
pub struct Resolved {
    pub cfg: ControllerConfig,
    /// Each configured host's fence levels, secrets read.
    pub fence: Arc<FenceTable>,
    pub verify: VerifyPolicy,
    /// The master key every host's key derives from (`controller.key_file`).
    pub master: protocol::MasterKey,
    /// `None` only with `api.insecure_no_token`.
    pub api_token: Option<String>,
    /// With `[tls]`: the certificate and key, ready for every TLS listener.
    pub tls: Option<Arc<crate::tls::ServerConfig>>,
    pub heartbeat_addrs: Vec<SocketAddr>,
    pub event_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// With `backend = "nova"`.
    pub nova: Option<NovaResolved>,
    /// With `[neutron] enabled = true`.
    pub neutron: Option<crate::edges::neutron::NeutronSettings>,
    /// With `[etcd] endpoints`: several controllers, one leader.
    pub etcd: Option<crate::ha::EtcdSettings>,
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
        let master = protocol::MasterKey::load(&c.key_file)
            .map_err(|e| invalid("controller.key_file", e.to_string()))?;
        let i = &self.intake;
        if i.heartbeat_rate_per_source > 0 && i.heartbeat_burst_per_source == 0 {
            return Err(invalid(
                "intake.heartbeat_burst_per_source",
                "must be at least 1 when intake.heartbeat_rate_per_source is set",
            ));
        }
        for h in &i.enrolled_hosts {
            protocol::check_host_id(h)
                .map_err(|e| invalid("intake.enrolled_hosts", format!("{h:?}: {e}")))?;
        }
        for (field, v) in [
            (
                "intake.stream_connections_per_source",
                i.stream_connections_per_source,
            ),
            (
                "intake.stream_connections_total",
                i.stream_connections_total,
            ),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        for (field, v) in [
            (
                "intake.stream_handshake_timeout_ms",
                i.stream_handshake_timeout_ms,
            ),
            ("intake.stream_idle_timeout_ms", i.stream_idle_timeout_ms),
        ] {
            if v < 100 {
                return Err(invalid(field, "must be at least 100 ms"));
            }
        }
        let api_token = match &c.api_token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| {
                    invalid("controller.api_token_file", format!("{}: {e}", p.display()))
                })?;
                protocol::check_secret_file_mode(p)
                    .map_err(|e| invalid("controller.api_token_file", e.to_string()))?;
                let t = t.trim().to_string();
                if t.len() < 16 {
                    return Err(invalid(
                        "controller.api_token_file",
                        "token shorter than 16 characters",
                    ));
                }
                Some(t)
            }
            None if self.api.insecure_no_token => None,
            None => {
                return Err(invalid(
                    "controller.api_token_file",
                    "required: the API wants a bearer token (api.insecure_no_token = true \
                     serves it to anyone, for a throwaway test setup only)",
                ))
            }
        };
        if api_token.is_some() && self.api.insecure_no_token {
            return Err(invalid(
                "api.insecure_no_token",
                "set together with controller.api_token_file: remove one of them",
            ));
        }
        let tls = resolve_tls(&self.tls)?;
        if c.store_path.as_os_str().is_empty() {
            return Err(invalid("controller.store_path", "must not be empty"));
        }
        let (nova, neutron) = openstack::resolve(c.backend, &self.nova, &self.neutron)?;
        let d = &self.detector;
        check_range(
            "detector.heartbeat_interval_ms",
            d.heartbeat_interval_ms,
            10..=10_000,
        )?;
        check_range(
            "detector.suspect_after_missed",
            d.suspect_after_missed,
            1..=100,
        )?;
        let e = &self.engine;
        check_range("engine.tick_ms", e.tick_ms, 5..=1000)?;
        // Re-asking faster than the engine looks is pointless; re-asking slower than a
        // minute leaves a host that an operator's cluster already saw die unfenced.
        if !(e.tick_ms..=60_000).contains(&e.confirm_retry_ms) {
            return Err(invalid(
                "engine.confirm_retry_ms",
                "must be between engine.tick_ms and 60000",
            ));
        }
        check_range(
            "engine.restore_retry_backoff_ms",
            e.restore_retry_backoff_ms,
            0..=60_000,
        )?;
        check_range(
            "engine.unanswered_after_ms",
            e.unanswered_after_ms,
            60_000..=86_400_000,
        )?;
        check_range(
            "engine.max_dead_share",
            e.max_dead_share,
            (Bound::Excluded(0.0), Bound::Included(1.0)),
        )?;
        check_range("engine.max_fence_attempts", e.max_fence_attempts, 1..)?;
        check_range("engine.overload_lag_ms", e.overload_lag_ms, 1..=60_000)?;
        check_range(
            "engine.max_overload_allowance_ms",
            e.max_overload_allowance_ms,
            0..=600_000,
        )?;
        check_range(
            "engine.closed_incidents_kept",
            e.closed_incidents_kept,
            10..=1_000_000,
        )?;
        let (fence, verify) = fence::resolve_fence(&self.fence)?;
        let etcd = resolve_etcd(&self.etcd, c, api_addr, tls.is_some())?;
        Ok(Resolved {
            cfg: self,
            fence: Arc::new(fence),
            verify,
            master,
            api_token,
            tls,
            heartbeat_addrs,
            event_addr,
            api_addr,
            nova,
            neutron,
            etcd,
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
            restore_retry_backoff: ms(e.restore_retry_backoff_ms),
            unanswered_after: ms(e.unanswered_after_ms),
            max_dead_share: e.max_dead_share,
            overload_lag: ms(e.overload_lag_ms),
            max_overload_allowance: ms(e.max_overload_allowance_ms),
            closed_incidents_kept: e.closed_incidents_kept,
            self_fence_margin: self
                .fence
                .self_fence
                .then(|| ms(self.fence.self_fence_margin_ms)),
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
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// `[tls]` checked and loaded: both files or neither.
fn resolve_tls(t: &TlsSection) -> Result<Option<Arc<crate::tls::ServerConfig>>, ConfigError> {
    let (cert, key) = match (&t.cert_file, &t.key_file) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (Some(_), None) => {
            return Err(invalid(
                "tls.key_file",
                "missing: tls.cert_file is set, and its private key is needed with it",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "tls.cert_file",
                "missing: tls.key_file is set, and its certificate is needed with it",
            ))
        }
    };
    crate::tls::load_server_config(cert, key)
        .map(Some)
        .map_err(|e| match e.file {
            crate::tls::TlsFile::Cert => invalid("tls.cert_file", e.message),
            crate::tls::TlsFile::Key => invalid("tls.key_file", e.message),
        })
}

/// `http://` or, with `[tls]`, `https://`: how clients name this controller's API.
pub fn api_scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// `[etcd]` checked: `None` without endpoints (one controller on SQLite).
fn resolve_etcd(
    e: &EtcdSection,
    c: &ControllerSection,
    api_addr: SocketAddr,
    tls: bool,
) -> Result<Option<crate::ha::EtcdSettings>, ConfigError> {
    if e.endpoints.is_empty() {
        return Ok(None);
    }
    for (i, ep) in e.endpoints.iter().enumerate() {
        let hostport = ep.strip_prefix("http://").unwrap_or(ep);
        if ep.starts_with("https://") {
            return Err(invalid(
                "etcd.endpoints",
                format!("{ep}: TLS to etcd is not supported yet; use http:// on a trusted network"),
            ));
        }
        if hostport.is_empty() || !hostport.contains(':') || hostport.contains('/') {
            return Err(invalid(
                "etcd.endpoints",
                format!("{ep}: not http://host:port"),
            ));
        }
        if e.endpoints[..i].contains(ep) {
            return Err(invalid("etcd.endpoints", format!("{ep} is listed twice")));
        }
    }
    check_range("etcd.lease_ttl_s", e.lease_ttl_s, 1..=60)?;
    let ttl_ms = e.lease_ttl_s * 1000;
    if e.stop_margin_ms < 50 || e.stop_margin_ms * 2 > ttl_ms {
        return Err(invalid(
            "etcd.stop_margin_ms",
            "must be at least 50 and at most half of etcd.lease_ttl_s",
        ));
    }
    if e.call_timeout_ms < 50 || e.call_timeout_ms >= ttl_ms - e.stop_margin_ms {
        return Err(invalid(
            "etcd.call_timeout_ms",
            "must be at least 50 and below etcd.lease_ttl_s minus etcd.stop_margin_ms (a \
             keep-alive must be able to answer in time)",
        ));
    }
    check_range("etcd.campaign_every_ms", e.campaign_every_ms, 10..=10_000)?;
    if !e.prefix.starts_with('/') || !e.prefix.ends_with('/') {
        return Err(invalid("etcd.prefix", "must start and end with '/'"));
    }
    let advertise_api = if e.advertise_api.is_empty() {
        format!("{}://{api_addr}", api_scheme(tls))
    } else {
        e.advertise_api.clone()
    };
    let ms = Duration::from_millis;
    Ok(Some(crate::ha::EtcdSettings {
        endpoints: e
            .endpoints
            .iter()
            .map(|ep| {
                if ep.starts_with("http://") {
                    ep.clone()
                } else {
                    format!("http://{ep}")
                }
            })
            .collect(),
        lease_ttl: Duration::from_secs(e.lease_ttl_s),
        stop_margin: ms(e.stop_margin_ms),
        call_timeout: ms(e.call_timeout_ms),
        campaign_every: ms(e.campaign_every_ms),
        prefix: format!("{}{}/", e.prefix, c.cluster_id),
        controller_id: c.id.clone(),
        advertise_api,
    }))
}

fn read_secret(field: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    protocol::check_secret_file_mode(path).map_err(|e| invalid(field, e.to_string()))?;
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
