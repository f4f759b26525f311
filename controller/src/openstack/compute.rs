//! The Nova and Placement calls the restorer makes, typed.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};

use super::session::{Method, OsError, Service, Session};

/// Placement microversion: 1.39 has everything used here (inventories, usages,
/// `in_tree` and name filters).
pub const PLACEMENT_VERSION: &str = "1.39";

/// The oldest compute microversion the restorer accepts: force-down by service uuid
/// needs 2.53, the embedded flavor in server details 2.47.
pub const MIN_COMPUTE_VERSION: (u32, u32) = (2, 53);
/// The newest microversion that accepts `force` on evacuate (removed in 2.68).
pub const FORCE_VERSION: &str = "2.67";
/// The newest at which an evacuated server keeps its power state (ACTIVE stays ACTIVE);
/// from 2.95 on Nova leaves it SHUTOFF and the restorer starts it.
pub const KEEPS_POWER_STATE_UNTIL: (u32, u32) = (2, 94);

/// `"2.94"` → `(2, 94)`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Flavor {
    pub vcpus: u64,
    pub ram: u64,
    pub disk: u64,
    #[serde(default)]
    pub ephemeral: u64,
    #[serde(default)]
    pub swap: Value,
}

impl Flavor {
    /// Local disk in GB as Placement counts it (root + ephemeral + swap).
    pub fn disk_gb(&self) -> u64 {
        let swap_mb = self.swap.as_u64().unwrap_or(0);
        self.disk + self.ephemeral + swap_mb.div_ceil(1024)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Fault {
    #[serde(default)]
    pub message: String,
}

/// A server as `GET /servers/detail` (admin, ≥ 2.47) shows it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Server {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub status: String,
    #[serde(rename = "OS-EXT-SRV-ATTR:host")]
    pub host: Option<String>,
    #[serde(rename = "OS-EXT-STS:task_state")]
    pub task_state: Option<String>,
    #[serde(default)]
    pub flavor: Option<Flavor>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Last change (Nova's clock).
    #[serde(default)]
    pub updated: Option<String>,
}

/// A compute service (`GET /os-services`, ≥ 2.53: `id` is a uuid).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ComputeService {
    pub id: String,
    pub host: String,
    /// `enabled` or `disabled`.
    pub status: String,
    /// `up` or `down` (down when forced down).
    pub state: String,
    #[serde(default)]
    pub forced_down: bool,
    #[serde(default)]
    pub updated_at: Option<String>,
}

/// A hypervisor (`GET /os-hypervisors/detail`, ≥ 2.53: `id` is the compute node uuid,
/// which is also its Placement resource provider uuid).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Hypervisor {
    pub id: String,
    pub hypervisor_hostname: String,
    pub service: HypervisorService,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HypervisorService {
    pub host: String,
}

/// One resource class of a provider's inventory.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Inventory {
    pub total: u64,
    #[serde(default)]
    pub reserved: u64,
    #[serde(default = "one")]
    pub allocation_ratio: f64,
}

fn one() -> f64 {
    1.0
}

/// An evacuation migration (`GET /os-migrations`, ≥ 2.59).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Migration {
    pub instance_uuid: String,
    pub status: String,
    pub source_compute: Option<String>,
    pub dest_compute: Option<String>,
    pub migration_type: String,
}

/// The microversion hypervisors are listed at (the newest without uptimes; see
/// [`Compute::hypervisors`]).
const HYPERVISORS_VERSION: &str = "2.87";

/// Nova and Placement through one session, at one compute microversion.
#[derive(Clone)]
pub struct Compute {
    pub session: Arc<Session>,
    pub version: String,
}

#[derive(Deserialize)]
struct Servers {
    servers: Vec<Server>,
}
#[derive(Deserialize)]
struct OneServer {
    server: Server,
}
#[derive(Deserialize)]
struct Services {
    services: Vec<ComputeService>,
}
#[derive(Deserialize)]
struct Hypervisors {
    hypervisors: Vec<Hypervisor>,
}
#[derive(Deserialize)]
struct Inventories {
    inventories: BTreeMap<String, Inventory>,
}
#[derive(Deserialize)]
struct Usages {
    usages: BTreeMap<String, u64>,
}
#[derive(Deserialize)]
struct Migrations {
    migrations: Vec<Migration>,
}

/// Page size for server lists.
const PAGE: usize = 1000;

impl Compute {
    pub fn new(session: Arc<Session>, version: impl Into<String>) -> Self {
        Compute {
            session,
            version: version.into(),
        }
    }

    fn nova(&self) -> Service<'_> {
        Service::Compute(&self.version)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, OsError> {
        self.session
            .request(self.nova(), Method::Get, path, None)
            .await
    }

    async fn post_action(&self, id: &str, body: Value) -> Result<(), OsError> {
        self.session
            .request_raw(
                self.nova(),
                Method::Post,
                &format!("/servers/{id}/action"),
                Some(&body),
            )
            .await
            .map(|_| ())
    }

    /// Every server matching `query` (e.g. `host=cmp-1`), all projects, paged.
    pub async fn servers(&self, query: &str) -> Result<Vec<Server>, OsError> {
        let mut all: Vec<Server> = Vec::new();
        loop {
            let marker = all
                .last()
                .map(|s| format!("&marker={}", s.id))
                .unwrap_or_default();
            let page: Servers = self
                .get(&format!(
                    "/servers/detail?all_tenants=1&limit={PAGE}&{query}{marker}"
                ))
                .await?;
            let n = page.servers.len();
            all.extend(page.servers);
            if n < PAGE {
                return Ok(all);
            }
        }
    }

    /// The servers Nova places on `host`.
    pub async fn servers_on_host(&self, host: &str) -> Result<Vec<Server>, OsError> {
        self.servers(&format!("host={}", enc(host))).await
    }

    /// Servers changed since `since` (Nova's clock), deleted ones included.
    pub async fn servers_changed_since(&self, since: SystemTime) -> Result<Vec<Server>, OsError> {
        self.servers(&format!("changes-since={}", enc(&format_rfc3339(since))))
            .await
    }

    /// One server; `None` when Nova does not know it (deleted).
    pub async fn server(&self, id: &str) -> Result<Option<Server>, OsError> {
        match self.get::<OneServer>(&format!("/servers/{id}")).await {
            Ok(s) => Ok(Some(s.server)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Compute services (of `host`, or all).
    pub async fn compute_services(
        &self,
        host: Option<&str>,
    ) -> Result<Vec<ComputeService>, OsError> {
        let q = host
            .map(|h| format!("&host={}", enc(h)))
            .unwrap_or_default();
        Ok(self
            .get::<Services>(&format!("/os-services?binary=nova-compute{q}"))
            .await?
            .services)
    }

    /// Forces a compute service down (or lets Nova judge it again).
    pub async fn set_forced_down(&self, service_id: &str, down: bool) -> Result<(), OsError> {
        self.session
            .request_raw(
                self.nova(),
                Method::Put,
                &format!("/os-services/{service_id}"),
                Some(&json!({ "forced_down": down })),
            )
            .await
            .map(|_| ())
    }

    /// Rebuilds a server of a down host on `target` (`None`: Nova's scheduler picks).
    pub async fn evacuate(&self, id: &str, target: Option<&str>) -> Result<(), OsError> {
        let body = match target {
            Some(h) => json!({"evacuate": {"host": h}}),
            None => json!({"evacuate": {}}),
        };
        self.post_action(id, body).await
    }

    /// Rebuilds a server of a down host on `target` without Nova's scheduler checking
    /// the target (`force`, which exists up to microversion 2.67; the call is made at
    /// 2.67, where an evacuated server also keeps its power state). Placement
    /// allocations are still made by Nova.
    pub async fn evacuate_forced(&self, id: &str, target: &str) -> Result<(), OsError> {
        self.session
            .request_raw(
                Service::Compute(FORCE_VERSION),
                Method::Post,
                &format!("/servers/{id}/action"),
                Some(&json!({"evacuate": {"host": target, "force": true}})),
            )
            .await
            .map(|_| ())
    }

    pub async fn reboot_hard(&self, id: &str) -> Result<(), OsError> {
        self.post_action(id, json!({"reboot": {"type": "HARD"}}))
            .await
    }

    pub async fn start(&self, id: &str) -> Result<(), OsError> {
        self.post_action(id, json!({"os-start": null})).await
    }

    pub async fn stop(&self, id: &str) -> Result<(), OsError> {
        self.post_action(id, json!({"os-stop": null})).await
    }

    /// Every hypervisor with its service's host. Asked at 2.87, whatever the configured
    /// microversion: from 2.88 on the detail view carries each hypervisor's uptime, which
    /// nova-api asks every compute it believes up for over RPC, and a compute that has
    /// just died (still counted up: its last report is recent, and this list is read
    /// while it is being forced down) never answers: the request then takes Nova's RPC
    /// timeout (60 s) and fails with 500 (seen in the lab's host-loss drill).
    pub async fn hypervisors(&self) -> Result<Vec<Hypervisor>, OsError> {
        let minor = |v: &str| v.split_once('.').and_then(|(_, m)| m.parse::<u32>().ok());
        let version = match minor(&self.version) {
            Some(m) if m >= 88 => HYPERVISORS_VERSION,
            _ => self.version.as_str(),
        };
        Ok(self
            .session
            .request::<Hypervisors>(
                Service::Compute(version),
                Method::Get,
                "/os-hypervisors/detail",
                None,
            )
            .await?
            .hypervisors)
    }

    /// Evacuation migrations (of one server, or all).
    pub async fn evacuations(&self, instance: Option<&str>) -> Result<Vec<Migration>, OsError> {
        let q = instance
            .map(|i| format!("&instance_uuid={i}"))
            .unwrap_or_default();
        Ok(self
            .get::<Migrations>(&format!(
                "/os-migrations?migration_type=evacuation&limit=1000{q}"
            ))
            .await?
            .migrations)
    }

    /// A resource provider's inventories and usages.
    pub async fn provider_capacity(
        &self,
        rp: &str,
    ) -> Result<(BTreeMap<String, Inventory>, BTreeMap<String, u64>), OsError> {
        let p = Service::Placement(PLACEMENT_VERSION);
        let inv: Inventories = self
            .session
            .request(
                p,
                Method::Get,
                &format!("/resource_providers/{rp}/inventories"),
                None,
            )
            .await?;
        let usages: Usages = self
            .session
            .request(
                p,
                Method::Get,
                &format!("/resource_providers/{rp}/usages"),
                None,
            )
            .await?;
        Ok((inv.inventories, usages.usages))
    }
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A time as `2026-11-22T18:47:03Z` (UTC, whole seconds, rounded down).
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_and_parse_back() {
        for secs in [0u64, 951_782_400, 1_795_373_223, 4_102_444_800] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            let s = format_rfc3339(t);
            assert_eq!(super::super::keystone::parse_rfc3339(&s), Some(t), "{s}");
        }
        assert_eq!(
            format_rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn a_server_of_nova_2_94_decodes_with_its_flavor_and_metadata() {
        let s: Server = serde_json::from_str(
            r#"{"id": "u1", "name": "a", "status": "ACTIVE",
                "OS-EXT-SRV-ATTR:host": "fake-1", "OS-EXT-STS:task_state": null,
                "flavor": {"vcpus": 2, "ram": 512, "disk": 1, "ephemeral": 0, "swap": 0,
                           "original_name": "m1.tiny", "extra_specs": {}},
                "metadata": {"defib:priority": "10"}}"#,
        )
        .unwrap();
        assert_eq!(s.flavor.unwrap().disk_gb(), 1);
        assert_eq!(s.metadata["defib:priority"], "10");
        assert_eq!(s.host.as_deref(), Some("fake-1"));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(enc("2026-01-01T00:00:00Z"), "2026-01-01T00%3A00%3A00Z");
        assert_eq!(enc("cmp 1&x"), "cmp%201%26x");
    }
}
