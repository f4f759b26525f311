//! The `[nova]` and `[neutron]` sections: how the controller reaches OpenStack, restores
//! servers and moves routers, checked (together: Neutron shares Nova's authentication)
//! and their secrets read.
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use service_manager::check_range;

use super::{invalid, read_secret, Backend, ConfigError};

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
        check_range("neutron.max_concurrent", self.max_concurrent, 1..=1000)?;
        check_range(
            "neutron.poll_interval_ms",
            self.poll_interval_ms,
            50..=60_000,
        )?;
        check_range("neutron.verify_timeout_s", self.verify_timeout_s, 1..)?;
        Ok(Some(crate::edges::neutron::NeutronSettings {
            skip_ha: self.skip_ha,
            max_concurrent: self.max_concurrent as usize,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            verify_timeout: Duration::from_secs(self.verify_timeout_s),
        }))
    }
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
        check_range(
            "nova.max_concurrent_per_target",
            n.max_concurrent_per_target,
            1..=1000,
        )?;
        check_range("nova.poll_interval_ms", n.poll_interval_ms, 50..=60_000)?;
        // Each timeout is named on its own (this was one check that named
        // nova.restore_timeout_s for any of the three).
        check_range("nova.restore_timeout_s", n.restore_timeout_s, 1..)?;
        check_range("nova.unforce_timeout_s", n.unforce_timeout_s, 1..)?;
        check_range("nova.request_timeout_s", n.request_timeout_s, 1..)?;
        check_range("nova.request_attempts", n.request_attempts, 1..)?;
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

/// `[nova]` and `[neutron]` as the backend uses them: `(nova, neutron)`, each `None`
/// when not in use. One function because Neutron takes Nova's authentication, so one
/// section is checked against the other.
pub(super) fn resolve(
    backend: Backend,
    nova: &NovaSection,
    neutron: &NeutronSection,
) -> Result<
    (
        Option<NovaResolved>,
        Option<crate::edges::neutron::NeutronSettings>,
    ),
    ConfigError,
> {
    let neutron_settings = neutron.resolve(backend)?;
    if neutron_settings.is_some()
        && nova.auth == NovaAuthKind::Headers
        && opt(&neutron.url).is_none()
    {
        return Err(invalid(
            "neutron.url",
            "required with nova.auth = \"headers\" (no catalog)",
        ));
    }
    let nova = match backend {
        Backend::Nova => {
            Some(nova.resolve(neutron_settings.is_some().then_some(neutron.url.as_str()))?)
        }
        _ => None,
    };
    Ok((nova, neutron_settings))
}
