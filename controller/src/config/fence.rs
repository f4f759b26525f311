//! The `[fence]` section: each host's fence levels (IPMI, fence agent, Pacemaker) and how
//! a fence is verified, checked and turned into the fence drivers, their passwords read.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use service_manager::check_range;

use super::{invalid, read_secret, ConfigError};
use crate::edges::fence::agent::{check_option, FenceAgent};
use crate::edges::fence::ceph::CephBlocklist;
use crate::edges::fence::ipmi::IpmiTool;
use crate::edges::fence::pacemaker::Pacemaker;
use crate::edges::fence::{CallPolicy, FenceDriver};
use crate::edges::fencing::{FenceTable, VerifyPolicy};
use crate::engine;

/// `[fence]`: how each host is fenced and how a fence is verified.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FenceSection {
    /// After a level's power-off, read the power status until it says off for at most
    /// this long; not off by then = that level is unverified.
    pub verify_timeout_ms: u64,
    /// Pause between those reads.
    pub verify_poll_ms: u64,
    /// Opt-in (default false): a host whose watchdog self-fences (`[self_fence] enabled`)
    /// and whose last heartbeat said "armed" counts as fenced (`SelfFenceDeadline`) once
    /// silent for the isolation timeout that heartbeat carried plus
    /// `self_fence_margin_ms`. A host not armed is never fenced by its silence.
    pub self_fence: bool,
    /// Time for the isolated watchdog to kill its VMs (and for its tick) after its
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
    /// Deprecated and ignored: an event's age never decided whether it was evidence
    /// for the attempt at hand (an older success within it was wrongly accepted); a
    /// fence now counts only if it is new since the attempt's request. Still accepted
    /// (and range-checked as before) so that existing configurations keep working; a
    /// warning says it is ignored.
    pub history_max_age_ms: Option<u64>,
}

impl Default for PacemakerSection {
    fn default() -> Self {
        Self {
            command_prefix: Vec::new(),
            timeout_ms: 10_000,
            attempts: 2,
            backoff_ms: 200,
            fence_timeout_ms: 60_000,
            history_max_age_ms: None,
        }
    }
}

impl Default for FenceSection {
    fn default() -> Self {
        Self {
            verify_timeout_ms: 10_000,
            verify_poll_ms: 250,
            self_fence: false,
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
    /// A storage fence: the host's Ceph client addresses on the OSD blocklist.
    #[serde(rename = "ceph-blocklist")]
    CephBlocklist(CephBlocklistLevel),
}

/// Whether a verified storage fence counts on its own.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StorageFenceCounts {
    /// Only together with a power fence of a later level (the default): the blocklist
    /// still stops the old copies' writes at once.
    #[default]
    WithPower,
    /// Alone, for the VMs whose every disk is on RBD (the others wait for an operator).
    Alone,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CephBlocklistLevel {
    /// The host's IP addresses on Ceph's public network (its qemus connect from them).
    pub addresses: Vec<String>,
    /// Pools whose images are checked for watchers from those addresses (the pools the
    /// host's VM disks are in: Cinder's `volumes`, Nova's `vms`).
    pub pools: Vec<String>,
    /// `with-power` (default) or `alone`.
    #[serde(default)]
    pub counts: StorageFenceCounts,
    /// `ceph.conf` of the cluster (default: the programs' own default).
    #[serde(default)]
    pub conf: Option<PathBuf>,
    /// The Ceph user, without `client.` (default: the programs' default, `admin`); it
    /// needs `mon 'allow r, allow command "osd blocklist"'` and `osd 'allow r'`.
    #[serde(default)]
    pub id: Option<String>,
    /// Its keyring (default: the one `ceph.conf` names).
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// How long an entry lasts if it is never lifted, in seconds (default 604800, a
    /// week; the unfence lifts it).
    #[serde(default = "default_blocklist_expire_s")]
    pub expire_s: u64,
    #[serde(default = "default_ceph_program")]
    pub ceph: String,
    #[serde(default = "default_rbd_program")]
    pub rbd: String,
    /// One call is killed after this long (default 15000).
    #[serde(default = "default_ceph_timeout_ms")]
    pub timeout_ms: u64,
    /// Tries per call (default 3), with a pause of `backoff_ms` doubling each time.
    #[serde(default = "default_ipmi_attempts")]
    pub attempts: u32,
    #[serde(default = "default_agent_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_blocklist_expire_s() -> u64 {
    604_800
}
fn default_ceph_program() -> String {
    "ceph".into()
}
fn default_rbd_program() -> String {
    "rbd".into()
}
fn default_ceph_timeout_ms() -> u64 {
    15_000
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

fn policy(
    field: &str,
    timeout_ms: u64,
    attempts: u32,
    backoff_ms: u64,
) -> Result<CallPolicy, ConfigError> {
    check_range(format!("{field}.timeout_ms"), timeout_ms, 100..=600_000)?;
    check_range(format!("{field}.attempts"), attempts, 1..=10)?;
    check_range(format!("{field}.backoff_ms"), backoff_ms, ..=60_000)?;
    Ok(CallPolicy {
        timeout: Duration::from_millis(timeout_ms),
        attempts,
        backoff: Duration::from_millis(backoff_ms),
    })
}

/// Checks `[fence]` and reads every password file.
pub(super) fn resolve_fence(f: &FenceSection) -> Result<(FenceTable, VerifyPolicy), ConfigError> {
    check_range(
        "fence.verify_timeout_ms",
        f.verify_timeout_ms,
        100..=600_000,
    )?;
    check_range("fence.verify_poll_ms", f.verify_poll_ms, 10..=60_000)?;
    check_range(
        "fence.self_fence_margin_ms",
        f.self_fence_margin_ms,
        500..=600_000,
    )?;
    let pm = &f.pacemaker;
    let pm_policy = policy("fence.pacemaker", pm.timeout_ms, pm.attempts, pm.backoff_ms)?;
    check_range(
        "fence.pacemaker.fence_timeout_ms",
        pm.fence_timeout_ms,
        1_000..=3_600_000,
    )?;
    if let Some(age) = pm.history_max_age_ms {
        check_range(
            "fence.pacemaker.history_max_age_ms",
            age,
            1_000..=86_400_000,
        )?;
        tracing::warn!(
            field = "fence.pacemaker.history_max_age_ms",
            "deprecated and ignored: a Pacemaker fence is verified only by a fencing event \
             that is new since the attempt's request, whatever its age; remove the field"
        );
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
                    check_range(format!("{at}.cipher_suite"), l.cipher_suite, 0..=17)?;
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
                FenceLevel::CephBlocklist(l) => Arc::new(ceph_level(&at, l)?),
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

/// Checks a `ceph-blocklist` level and builds its driver.
fn ceph_level(at: &str, l: &CephBlocklistLevel) -> Result<CephBlocklist, ConfigError> {
    if l.addresses.is_empty() {
        return Err(invalid(format!("{at}.addresses"), "at least one address"));
    }
    let mut addresses = Vec::new();
    for a in &l.addresses {
        let ip: std::net::IpAddr = a.parse().map_err(|_| {
            invalid(
                format!("{at}.addresses"),
                format!("{a:?} is not an IP address"),
            )
        })?;
        if ip.is_unspecified() {
            return Err(invalid(
                format!("{at}.addresses"),
                "0.0.0.0 or :: would blocklist every client",
            ));
        }
        addresses.push(ip);
    }
    if l.pools.is_empty() || l.pools.iter().any(|p| p.is_empty() || p.starts_with('-')) {
        return Err(invalid(
            format!("{at}.pools"),
            "at least one pool, each a pool name",
        ));
    }
    check_range(format!("{at}.expire_s"), l.expire_s, 60..=31_536_000)?;
    for (field, program) in [("ceph", &l.ceph), ("rbd", &l.rbd)] {
        if program.is_empty() {
            return Err(invalid(format!("{at}.{field}"), "must name a program"));
        }
    }
    let mut common_args = Vec::new();
    if let Some(conf) = &l.conf {
        common_args.extend(["--conf".to_string(), conf.display().to_string()]);
    }
    if let Some(id) = &l.id {
        if id.is_empty() || id.starts_with("client.") || id.chars().any(char::is_whitespace) {
            return Err(invalid(
                format!("{at}.id"),
                "a Ceph user name without `client.`",
            ));
        }
        common_args.extend(["--id".to_string(), id.clone()]);
    }
    if let Some(keyring) = &l.keyring {
        common_args.extend(["--keyring".to_string(), keyring.display().to_string()]);
    }
    Ok(CephBlocklist {
        addresses,
        pools: l.pools.clone(),
        ceph: l.ceph.clone(),
        rbd: l.rbd.clone(),
        common_args,
        expire: Duration::from_secs(l.expire_s),
        counts_alone: l.counts == StorageFenceCounts::Alone,
        policy: policy(at, l.timeout_ms, l.attempts, l.backoff_ms)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ControllerConfig;

    fn dir_with_secrets() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let secret = crate::config::tests::write_secret;
        secret(&dir.path().join("k"), "0123456789abcdef0123456789abcdef\n");
        secret(&dir.path().join("bmc.pass"), "bmc-pass-7f3a\n");
        dir
    }

    fn text(dir: &tempfile::TempDir, fence: &str) -> String {
        format!(
            "[api]\ninsecure_no_token = true\n[controller]\nkey_file = {:?}\n{fence}",
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
    fn a_password_file_open_to_group_or_others_is_refused_naming_the_level_and_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = dir_with_secrets();
        let pass = dir.path().join("bmc.pass");
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o604)).unwrap();
        let t = text(
            &dir,
            "[[fence.host]]\nname = \"h0\"\nlevels = [{ method = \"ipmi\", address = \"a\", username = \"u\", password_file = \"PASS\" }]\n",
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
        assert!(
            err.contains(&format!("{} has mode 0604", pass.display())),
            "{err}"
        );
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
    fn the_self_fence_is_off_by_default_and_when_on_its_margin_is_added_to_each_hosts_own_timeout()
    {
        let dir = dir_with_secrets();
        let r = ControllerConfig::parse(&text(&dir, ""))
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(r.cfg.engine_config().self_fence_margin, None);
        let t = text(&dir, "[fence]\nself_fence = true\n");
        let r = ControllerConfig::parse(&t).unwrap().resolve().unwrap();
        assert_eq!(
            r.cfg.engine_config().self_fence_margin,
            Some(Duration::from_millis(2000))
        );
        let t = text(
            &dir,
            "[fence]\nself_fence = true\nself_fence_margin_ms = 0\n",
        );
        let err = ControllerConfig::parse(&t)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("fence.self_fence_margin_ms"), "{err}");
        // The old setting that had to match the watchdogs' is gone: refused as unknown.
        let t = text(&dir, "[fence]\nself_fence_isolation_timeout_ms = 3000\n");
        let err = ControllerConfig::parse(&t).unwrap_err().to_string();
        assert!(err.contains("self_fence_isolation_timeout_ms"), "{err}");
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
    fn the_deprecated_history_max_age_is_still_accepted_and_still_range_checked() {
        let dir = dir_with_secrets();
        let level = "[[fence.host]]\nname = \"node2\"\nlevels = [{ method = \"pacemaker\" }]\n";
        let t = text(
            &dir,
            &format!("[fence.pacemaker]\nhistory_max_age_ms = 120000\n{level}"),
        );
        let r = ControllerConfig::parse(&t).unwrap().resolve().unwrap();
        assert_eq!(
            r.fence[&engine::HostId::new("node2")][0].describe(),
            "pacemaker node node2"
        );
        let t = text(
            &dir,
            &format!("[fence.pacemaker]\nhistory_max_age_ms = 5\n{level}"),
        );
        let err = ControllerConfig::parse(&t)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("fence.pacemaker.history_max_age_ms"), "{err}");
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

    #[test]
    fn a_ceph_blocklist_level_resolves_as_a_storage_level_that_counts_with_power_by_default() {
        use crate::edges::fence::LevelKind;
        let dir = dir_with_secrets();
        let t = text(
            &dir,
            r#"
[[fence.host]]
name = "h0"
levels = [
  { method = "ceph-blocklist", addresses = ["10.0.0.5", "fd00::5"], pools = ["volumes", "vms"], id = "defib", conf = "/etc/ceph/ceph.conf" },
  { method = "ceph-blocklist", addresses = ["10.0.0.6"], pools = ["volumes"], counts = "alone" },
]
"#,
        );
        let r = ControllerConfig::parse(&t).unwrap().resolve().unwrap();
        let levels = &r.fence[&engine::HostId::new("h0")];
        assert_eq!(levels[0].describe(), "ceph-blocklist 10.0.0.5,fd00::5");
        assert_eq!(
            levels[0].kind(),
            LevelKind::Storage {
                counts_alone: false
            }
        );
        assert_eq!(levels[1].kind(), LevelKind::Storage { counts_alone: true });
    }

    #[test]
    fn a_ceph_blocklist_level_without_addresses_or_with_a_wildcard_or_a_bad_policy_is_refused_naming_the_field(
    ) {
        let dir = dir_with_secrets();
        for (level, field) in [
            (
                r#"addresses = [], pools = ["volumes"]"#,
                "levels[0].addresses",
            ),
            (
                r#"addresses = ["0.0.0.0"], pools = ["volumes"]"#,
                "levels[0].addresses",
            ),
            (
                r#"addresses = ["h0.example"], pools = ["volumes"]"#,
                "levels[0].addresses",
            ),
            (r#"addresses = ["10.0.0.5"], pools = []"#, "levels[0].pools"),
            (
                r#"addresses = ["10.0.0.5"], pools = ["v"], id = "client.admin""#,
                "levels[0].id",
            ),
            (
                r#"addresses = ["10.0.0.5"], pools = ["v"], expire_s = 5"#,
                "levels[0].expire_s",
            ),
        ] {
            let t = text(
                &dir,
                &format!(
                    "[[fence.host]]\nname = \"h0\"\nlevels = [{{ method = \"ceph-blocklist\", {level} }}]\n"
                ),
            );
            let err = ControllerConfig::parse(&t)
                .and_then(|c| c.resolve().map(|_| ()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{level}: {err}");
        }
        let t = text(
            &dir,
            "[[fence.host]]\nname = \"h0\"\nlevels = [{ method = \"ceph-blocklist\", addresses = [\"10.0.0.5\"], pools = [\"v\"], counts = \"sometimes\" }]\n",
        );
        let err = ControllerConfig::parse(&t).unwrap_err().to_string();
        assert!(err.contains("sometimes"), "{err}");
    }
}
