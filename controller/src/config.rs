//! The controller's configuration: one TOML file, every field defaulted, validated (and
//! its secrets read) before anything binds. A bad file exits with code 64 naming the field.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::detector::{DetectorConfig, DetectorKind};
use crate::engine;

pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    pub controller: ControllerSection,
    pub detector: DetectorSection,
    pub engine: EngineSection,
    pub nova: NovaSection,
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
    /// `libvirt` (restart a crashed domain in place through its host's watchdog),
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
    /// libvirt only: restart in place through the host's watchdog (no evacuation yet).
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
        let s = crate::runtime::nova_backend::NovaSettings::default();
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
    pub settings: crate::runtime::nova_backend::NovaSettings,
}

fn read_secret(field: &'static str, p: &Option<PathBuf>) -> Result<String, ConfigError> {
    let p = p.as_ref().ok_or_else(|| invalid(field, "required"))?;
    let t =
        std::fs::read_to_string(p).map_err(|e| invalid(field, format!("{}: {e}", p.display())))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(invalid(field, format!("{} is empty", p.display())));
    }
    Ok(t)
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
    pub fn resolve(&self) -> Result<NovaResolved, ConfigError> {
        use crate::openstack::{Auth, Credentials, RetryPolicy, SessionConfig};
        let n = self;
        let mut region = opt(&n.region_name);
        let mut interface = n.interface.clone();
        let mut compute_url = opt(&n.compute_url);
        let mut placement_url = opt(&n.placement_url);
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
                c.auth
            }
            NovaAuthKind::Password => Auth::Keystone {
                auth_url: required("nova.auth_url", &n.auth_url)?,
                credentials: Credentials::Password {
                    username: required("nova.username", &n.username)?,
                    password: read_secret("nova.password_file", &n.password_file)?,
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
                    secret: read_secret(
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
        if !crate::runtime::nova_backend::version_supported(&n.microversion) {
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
        let settings = crate::runtime::nova_backend::NovaSettings {
            max_concurrent_per_target: n.max_concurrent_per_target,
            reserved_hosts: n.reserved_hosts.iter().cloned().collect(),
            reserved_only: n.reserved_only,
            exclude_hosts: n.exclude_hosts.iter().cloned().collect(),
            priority_key: n.priority_key.clone(),
            poll_interval: Duration::from_millis(n.poll_interval_ms),
            restore_timeout: Duration::from_secs(n.restore_timeout_s),
            unforce_timeout: Duration::from_secs(n.unforce_timeout_s),
            hosts: Default::default(),
            bypass_scheduler: n.bypass_scheduler,
            auto_unforce: match n.unforce.as_str() {
                "operator" => false,
                "automatic" => true,
                _ => return Err(invalid("nova.unforce", "\"operator\" or \"automatic\"")),
            },
        };
        Ok(NovaResolved {
            session: SessionConfig {
                auth,
                region,
                interface,
                compute_url,
                placement_url,
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
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Everything resolved and read, ready to bind.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub cfg: ControllerConfig,
    pub key: protocol::Key,
    pub api_token: Option<String>,
    pub heartbeat_addrs: Vec<SocketAddr>,
    pub event_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// With `backend = "nova"`.
    pub nova: Option<NovaResolved>,
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
        let nova = match c.backend {
            Backend::Nova => Some(self.nova.resolve()?),
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
        if !(e.max_dead_share > 0.0 && e.max_dead_share <= 1.0) {
            return Err(invalid("engine.max_dead_share", "must be in (0, 1]"));
        }
        if e.max_fence_attempts == 0 {
            return Err(invalid("engine.max_fence_attempts", "must be at least 1"));
        }
        Ok(Resolved {
            cfg: self,
            key,
            api_token,
            heartbeat_addrs,
            event_addr,
            api_addr,
            nova,
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
            fence_on_unknown_after: ms(e.fence_on_unknown_after_ms),
            max_fence_attempts: e.max_fence_attempts,
            fence_retry_backoff: ms(e.fence_retry_backoff_ms),
            max_restarts_in_place: e.max_restarts_in_place,
            restart_window: Duration::from_secs(e.restart_window_s),
            max_evacuate_attempts: e.max_evacuate_attempts,
            max_dead_share: e.max_dead_share,
            ..engine::Config::default()
        };
        cfg.detector.interval = ms(self.detector.heartbeat_interval_ms);
        cfg
    }
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
        let (_d, text) = with_key("backend = \"libvirt\"\n");
        let r = ControllerConfig::parse(&text).unwrap().resolve().unwrap();
        assert_eq!(r.cfg.controller.backend, Backend::Libvirt);
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
