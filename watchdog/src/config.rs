//! The watchdog's configuration: a TOML file, every field defaulted, validated before
//! anything is loaded or bound. A bad file makes the daemon exit with code 64 (EX_USAGE)
//! and a message that names the field.
//!
//! Sections: `[probes]` (what the eBPF probes watch), `[host]` (who this watchdog is and
//! where it keeps its state), `[controller]` (where heartbeats and events go;
//! optional for `events`, required for `run`), `[libvirt]` (the domain event and
//! inventory watcher), `[self_fence]` (opt-in: kill the VMs when isolated) and
//! `[metrics]` (opt-in: Prometheus `/metrics` of the daemon).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use service_manager::{check_range, OutOfRange};
use watchdog_common::{NamePattern, COMM_LEN, MAX_NAME_PATTERNS};

pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    pub probes: ProbeConfig,
    pub host: HostConfig,
    /// Absent: the watchdog reports to no controller (enough for `events`).
    pub controller: Option<ControllerConfig>,
    pub libvirt: LibvirtConfig,
    pub self_fence: SelfFenceConfig,
    pub metrics: MetricsConfig,
    pub disk_leases: DiskLeasesConfig,
}

/// `[disk_leases]`: libvirt's lock manager (`lock_manager = "lockd"`), whose daemon
/// (virtlockd) holds a lease on every disk of every running VM. When it dies, the leases
/// go with it while the qemus run on, and another host may start the same disk: the
/// watchdog sees that exit and reports the host unprotected (leases.rs). Off by default;
/// turn it on where libvirt runs with `lock_manager = "lockd"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiskLeasesConfig {
    pub enabled: bool,
    /// The pid file the lease daemon writes (virtlockd's default; `--pid-file`).
    pub pid_file: PathBuf,
    /// The daemon's process name: a pid file naming another process is stale.
    pub process_name: String,
    /// libvirt's lockd configuration: `file_lockspace_dir` there says where the leases
    /// are (one file per disk path, named by its SHA-256); without it the daemon locks
    /// the disks themselves.
    pub lockd_conf: PathBuf,
    /// How often the pid file and the leases are read (an exit is seen at once).
    pub check_interval_ms: u64,
}

impl Default for DiskLeasesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            pid_file: PathBuf::from("/run/virtlockd.pid"),
            process_name: "virtlockd".into(),
            lockd_conf: PathBuf::from("/etc/libvirt/qemu-lockd.conf"),
            check_interval_ms: 1_000,
        }
    }
}

impl DiskLeasesConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.pid_file.is_absolute() {
            return Err(invalid("disk_leases.pid_file", "must be an absolute path"));
        }
        if !self.lockd_conf.is_absolute() {
            return Err(invalid(
                "disk_leases.lockd_conf",
                "must be an absolute path",
            ));
        }
        if self.process_name.is_empty()
            || self.process_name.len() >= COMM_LEN
            || self.process_name.contains('/')
        {
            return Err(invalid(
                "disk_leases.process_name",
                format!("must be a process name of 1 to {} bytes", COMM_LEN - 1),
            ));
        }
        check_range(
            "disk_leases.check_interval_ms",
            self.check_interval_ms,
            100..=60_000,
        )?;
        Ok(())
    }
}

/// `[metrics]`: the daemon's Prometheus endpoint (`run` only). Off by default: a
/// hypervisor opens no port it was not asked to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// "ip:port" to serve `GET /metrics` on (plain HTTP, no authentication: keep it on
    /// loopback or a management network). Unset: no endpoint.
    pub listen: Option<String>,
    /// Report the probes' run time: the kernel's BPF run-time statistics are switched
    /// on while the daemon serves metrics (every BPF program on the host then pays two
    /// clock reads a run; needs CAP_SYS_ADMIN). Off, or without the capability: the
    /// run-time series count only while `kernel.bpf_stats_enabled = 1`.
    pub probe_run_time: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            probe_run_time: true,
        }
    }
}

impl MetricsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr().map(|_| ())
    }

    /// Where to serve, if anywhere. An unspecified address (`0.0.0.0:7413`) is allowed
    /// here, unlike the controller's addresses: it means every interface.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(text) = &self.listen else {
            return Ok(None);
        };
        let addr: SocketAddr = text.parse().map_err(|_| {
            invalid(
                "metrics.listen",
                format!("{text:?} is not \"ip:port\" (an IPv4 or [IPv6] address and a port)"),
            )
        })?;
        if addr.port() == 0 {
            return Err(invalid(
                "metrics.listen",
                format!("{text:?} needs a nonzero port"),
            ));
        }
        Ok(Some(addr))
    }
}

/// `[self_fence]`: for hosts without a BMC. Once the watchdog is isolated (no ack for
/// `controller.isolation_timeout_ms` on any path) it SIGKILLs every watched qemu, and
/// keeps doing so while isolated, so the controller may restore the VMs elsewhere
/// after the isolation timeout plus a margin.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SelfFenceConfig {
    /// Off by default.
    pub enabled: bool,
    /// A hardware or software watchdog device (`/dev/watchdog`, softdog) to arm: its
    /// timeout is set to the isolation timeout (rounded up to whole seconds), it is
    /// petted while the controller acks, and no longer once isolated, so the host
    /// resets even when this daemon hangs. Unset: no device.
    pub watchdog_device: Option<PathBuf>,
}

impl SelfFenceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(dev) = &self.watchdog_device {
            if !self.enabled {
                return Err(invalid(
                    "self_fence.watchdog_device",
                    "needs self_fence.enabled = true",
                ));
            }
            if !dev.is_absolute() {
                return Err(invalid(
                    "self_fence.watchdog_device",
                    "must be an absolute path (/dev/watchdog)",
                ));
            }
        }
        Ok(())
    }
}

/// The libvirt watcher: domain events, the domain inventory, libvirt reachability.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// Connect to libvirt. Unset: yes for `run`, no for `events` (unless `--libvirt`).
    pub enabled: Option<bool>,
    /// The libvirt URI (opened read-only).
    pub uri: String,
    /// The domain list is sent this often (and on connect, and after every lifecycle
    /// event).
    pub inventory_interval_ms: u64,
    /// First delay before reconnecting; doubles on each failure…
    pub reconnect_min_ms: u64,
    /// …up to this.
    pub reconnect_max_ms: u64,
    /// Where libvirt's qemu driver writes `NAME.pid` for each running domain.
    pub pid_dir: PathBuf,
    /// Report only the qemu processes this libvirt runs (its domain list has their domain
    /// active, with their pid; a qemu's events wait for the list that says so, see
    /// `reporting`). For several hypervisor instances on one kernel (a lab on one
    /// machine, nested setups): the probes see every qemu of the kernel. Default
    /// `false`: every watched process is reported. Needs the libvirt watcher.
    pub only_own_domains: bool,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            uri: "qemu:///system".into(),
            inventory_interval_ms: 30_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            pid_dir: PathBuf::from("/run/libvirt/qemu"),
            only_own_domains: false,
        }
    }
}

impl LibvirtConfig {
    /// Whether `run` connects to libvirt.
    pub fn enabled_for_run(&self) -> bool {
        self.enabled.unwrap_or(true)
    }

    /// Whether `events` connects to libvirt (`--libvirt` forces it).
    pub fn enabled_for_events(&self, flag: bool) -> bool {
        flag || self.enabled.unwrap_or(false)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.pid_dir.is_absolute() {
            return Err(invalid("libvirt.pid_dir", "must be an absolute path"));
        }
        if self.uri.is_empty()
            || self.uri.contains('\0')
            || self.uri.chars().any(char::is_whitespace)
        {
            return Err(invalid(
                "libvirt.uri",
                "must be a libvirt URI such as \"qemu:///system\" (no spaces)",
            ));
        }
        check_range(
            "libvirt.inventory_interval_ms",
            self.inventory_interval_ms,
            1_000..=86_400_000,
        )?;
        check_range(
            "libvirt.reconnect_min_ms",
            self.reconnect_min_ms,
            10..=60_000,
        )?;
        check_range(
            "libvirt.reconnect_max_ms",
            self.reconnect_max_ms,
            10..=600_000,
        )?;
        // Without the watcher no domain list ever comes, and nothing would be reported.
        if self.only_own_domains && self.enabled == Some(false) {
            return Err(invalid(
                "libvirt.only_own_domains",
                "needs the libvirt watcher (libvirt.enabled = false: no domain list would ever say which qemus are this host's)",
            ));
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(invalid(
                "libvirt.reconnect_max_ms",
                "must not be below libvirt.reconnect_min_ms",
            ));
        }
        Ok(())
    }
}

/// Who this watchdog is, and where it keeps what must survive a restart.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// The host's id in heartbeats and events (its Nova compute host name). Defaults to
    /// the hostname.
    pub id: String,
    /// The cluster this host belongs to; the controller ignores other clusters'.
    pub cluster_id: String,
    /// The incarnation and the event spool live here.
    pub state_dir: PathBuf,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            // An unreadable hostname leaves the id empty, which validation then names.
            id: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            cluster_id: "default".into(),
            state_dir: PathBuf::from("/var/lib/defib-watchdog"),
        }
    }
}

/// Where the controller listens, and how the watchdog talks to it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// One "ip:port" per network path; every heartbeat goes out on each.
    pub heartbeat_addrs: Vec<String>,
    /// "ip:port" of the controller's event stream (TCP), for a single controller.
    /// Exclusive with `event_addrs`.
    pub event_addr: String,
    /// "ip:port" of every controller's event stream (TCP), for several controllers of
    /// which one leads: the followers refuse the stream (they close it after the
    /// `Hello`) and the watchdog tries the next address. Exclusive with `event_addr`.
    pub event_addrs: Vec<String>,
    /// File holding this host's own key, as `defibctl hosts enroll` hands it out.
    pub key_file: PathBuf,
    /// PEM file of the CA(s) that signed the controllers' certificate. Set: the event
    /// stream speaks TLS (the controllers must have `[tls]`); unset: plain TCP, and a
    /// warning at every start.
    pub ca_file: Option<PathBuf>,
    /// The name the controllers' certificate must carry; empty: the IP address of the
    /// event address connected to.
    pub tls_server_name: String,
    /// Time between heartbeats.
    pub heartbeat_interval_ms: u64,
    /// No ack for this long on any path: the watchdog reports itself isolated.
    pub isolation_timeout_ms: u64,
    /// Most events kept on disk while the controller is unreachable; beyond that the
    /// oldest are dropped (and counted).
    pub spool_max_events: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            heartbeat_addrs: Vec::new(),
            event_addr: String::new(),
            event_addrs: Vec::new(),
            key_file: PathBuf::new(),
            ca_file: None,
            tls_server_name: String::new(),
            heartbeat_interval_ms: 100,
            isolation_timeout_ms: 3000,
            spool_max_events: 100_000,
        }
    }
}

/// Most heartbeat paths: the path index is one byte on the wire.
pub const MAX_HEARTBEAT_PATHS: usize = 256;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Process names to watch: exact, or a prefix ending in `*`. Matched against the
    /// kernel's comm (15 bytes), at exec and by the /proc scan at start.
    pub watch_names: Vec<String>,
    /// An I/O call of a watched process in flight this long is a disk stall.
    pub stall_threshold_ms: u64,
    /// How often the in-flight I/O map is scanned; bounds the detection delay past the threshold.
    pub stall_scan_interval_ms: u64,
    /// How often /proc is scanned again for watched processes the exec probe could not
    /// have seen (e.g. a qemu that forked without exec).
    pub proc_rescan_interval_ms: u64,
    /// bpffs directory where `run` pins the probes' maps and links, so that a restarted
    /// watchdog takes over the probes that kept running (and the events they recorded
    /// meanwhile) instead of starting blind. Empty: no pinning (the probes detach when
    /// the daemon exits). `events` never pins. One daemon per directory (it is locked).
    pub pin_dir: String,
    /// librbd, whose requests the probes follow to see a stall of a disk on Ceph RBD
    /// (uprobes on every process that maps it). Missing, or empty: not tracked.
    pub librbd_path: String,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            watch_names: vec!["qemu-system-*".into(), "qemu-kvm".into()],
            stall_threshold_ms: 1000,
            stall_scan_interval_ms: 50,
            proc_rescan_interval_ms: 5000,
            pin_dir: "/sys/fs/bpf/defib".into(),
            librbd_path: "/usr/lib/x86_64-linux-gnu/librbd.so.1".into(),
        }
    }
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

impl WatchdogConfig {
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg = match path {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse {
                        path: path.display().to_string(),
                        message,
                    },
                    other => other,
                })?
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        // toml's message names the offending key and line.
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            message: e.to_string(),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.probes;
        if p.watch_names.is_empty() {
            return Err(invalid(
                "probes.watch_names",
                "must name at least one process",
            ));
        }
        if p.watch_names.len() > MAX_NAME_PATTERNS as usize {
            return Err(invalid(
                "probes.watch_names",
                format!("at most {MAX_NAME_PATTERNS} names"),
            ));
        }
        for n in &p.watch_names {
            let body = n.strip_suffix('*').unwrap_or(n);
            if body.is_empty() || body.contains('*') || body.contains('/') {
                return Err(invalid(
                    "probes.watch_names",
                    format!("{n:?} is not a process name or a prefix ending in '*'"),
                ));
            }
            if body.len() >= COMM_LEN && !n.ends_with('*') {
                // Not an error: the kernel cuts comm to 15 bytes, and so does the matcher.
                tracing::info!(name = %n, "longer than the kernel's comm; matched by its first 15 bytes");
            }
        }
        check_range(
            "probes.stall_threshold_ms",
            p.stall_threshold_ms,
            10..=3_600_000,
        )?;
        check_range(
            "probes.stall_scan_interval_ms",
            p.stall_scan_interval_ms,
            5..=10_000,
        )?;
        if p.stall_scan_interval_ms > p.stall_threshold_ms {
            return Err(invalid(
                "probes.stall_scan_interval_ms",
                "must not exceed probes.stall_threshold_ms",
            ));
        }
        check_range(
            "probes.proc_rescan_interval_ms",
            p.proc_rescan_interval_ms,
            100..=3_600_000,
        )?;
        if !p.librbd_path.is_empty() && !Path::new(&p.librbd_path).is_absolute() {
            return Err(invalid(
                "probes.librbd_path",
                "must be an absolute path (or empty: RBD stalls not tracked)",
            ));
        }
        if !p.pin_dir.is_empty() && !Path::new(&p.pin_dir).is_absolute() {
            return Err(invalid(
                "probes.pin_dir",
                "must be an absolute path on a bpffs mount (or empty for no pinning)",
            ));
        }
        self.host.validate()?;
        if let Some(controller) = &self.controller {
            controller.validate()?;
        }
        self.libvirt.validate()?;
        self.self_fence.validate()?;
        self.metrics.validate()?;
        self.disk_leases.validate()?;
        if self.disk_leases.enabled && !self.libvirt.enabled_for_run() {
            return Err(invalid(
                "disk_leases.enabled",
                "needs the libvirt watcher (libvirt.enabled = false): leases are judged per running domain",
            ));
        }
        if self.self_fence.enabled && self.controller.is_none() {
            return Err(invalid(
                "self_fence.enabled",
                "needs a [controller] section: isolation is the loss of its acks",
            ));
        }
        Ok(())
    }

    /// The `[controller]` section, which `run` cannot do without.
    pub fn controller_for_run(&self) -> Result<&ControllerConfig, ConfigError> {
        self.controller.as_ref().ok_or_else(|| {
            invalid(
                "controller",
                "the [controller] section is required by `run` (heartbeat_addrs, event_addrs or event_addr, key_file)",
            )
        })
    }

    pub fn name_patterns(&self) -> Vec<NamePattern> {
        self.probes
            .watch_names
            .iter()
            .map(|n| NamePattern::parse(n))
            .collect()
    }
}

impl HostConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id.is_empty() {
            return Err(invalid(
                "host.id",
                "is empty (the hostname could not be read?); set it",
            ));
        }
        protocol::check_host_id(&self.id).map_err(|e| invalid("host.id", e.to_string()))?;
        protocol::check_cluster_id(&self.cluster_id)
            .map_err(|e| invalid("host.cluster_id", e.to_string()))?;
        if !self.state_dir.is_absolute() {
            return Err(invalid("host.state_dir", "must be an absolute path"));
        }
        Ok(())
    }
}

impl ControllerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let addrs = self.heartbeat_socket_addrs()?;
        if addrs.is_empty() {
            return Err(invalid(
                "controller.heartbeat_addrs",
                "must list at least one \"ip:port\" (one per network path)",
            ));
        }
        if addrs.len() > MAX_HEARTBEAT_PATHS {
            return Err(invalid(
                "controller.heartbeat_addrs",
                format!("at most {MAX_HEARTBEAT_PATHS} paths"),
            ));
        }
        if let Some((i, a)) = addrs
            .iter()
            .enumerate()
            .find(|(i, a)| addrs[..*i].contains(a))
        {
            return Err(invalid(
                "controller.heartbeat_addrs",
                format!("{a} is listed twice (entry {i})"),
            ));
        }
        self.event_socket_addrs()?;
        if self.key_file.as_os_str().is_empty() {
            return Err(invalid(
                "controller.key_file",
                "is required (a file holding this host's key)",
            ));
        }
        check_range(
            "controller.heartbeat_interval_ms",
            self.heartbeat_interval_ms,
            10..=10_000,
        )?;
        check_range(
            "controller.isolation_timeout_ms",
            self.isolation_timeout_ms,
            20..=3_600_000,
        )?;
        if self.isolation_timeout_ms < 2 * self.heartbeat_interval_ms {
            return Err(invalid(
                "controller.isolation_timeout_ms",
                "must be at least twice controller.heartbeat_interval_ms (one lost heartbeat must not isolate the host)",
            ));
        }
        check_range(
            "controller.spool_max_events",
            self.spool_max_events,
            1..=10_000_000,
        )?;
        Ok(())
    }

    /// The heartbeat paths, parsed; index = path index.
    pub fn heartbeat_socket_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        self.heartbeat_addrs
            .iter()
            .map(|a| parse_addr("controller.heartbeat_addrs", a))
            .collect()
    }

    /// The event stream's addresses, parsed, in the configured order: `event_addrs`, or
    /// `event_addr` alone. Exactly one of the two must be set, without duplicates.
    pub fn event_socket_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        match (self.event_addr.is_empty(), self.event_addrs.is_empty()) {
            (false, false) => Err(invalid(
                "controller.event_addrs",
                "set either event_addrs (every controller) or event_addr (a single controller), not both",
            )),
            (true, true) => Err(invalid(
                "controller.event_addrs",
                "is required: the \"ip:port\" of every controller's event stream (or event_addr for a single controller)",
            )),
            (false, true) => Ok(vec![parse_addr("controller.event_addr", &self.event_addr)?]),
            (true, false) => {
                let addrs = self
                    .event_addrs
                    .iter()
                    .map(|a| parse_addr("controller.event_addrs", a))
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some((i, a)) = addrs
                    .iter()
                    .enumerate()
                    .find(|(i, a)| addrs[..*i].contains(a))
                {
                    return Err(invalid(
                        "controller.event_addrs",
                        format!("{a} is listed twice (entry {i})"),
                    ));
                }
                Ok(addrs)
            }
        }
    }

    /// The event stream's TLS client with `ca_file`, or `None` without it; a bad CA file
    /// or server name is a configuration error naming its field.
    pub fn stream_tls(&self) -> Result<Option<crate::uplink::StreamTls>, ConfigError> {
        let Some(ca) = &self.ca_file else {
            if !self.tls_server_name.is_empty() {
                return Err(invalid(
                    "controller.tls_server_name",
                    "needs controller.ca_file (TLS is on only with a CA)",
                ));
            }
            return Ok(None);
        };
        crate::uplink::StreamTls::new(ca, &self.tls_server_name)
            .map(Some)
            .map_err(|e| {
                let field = if e.starts_with(&format!("{:?}", self.tls_server_name))
                    && !self.tls_server_name.is_empty()
                {
                    "controller.tls_server_name"
                } else {
                    "controller.ca_file"
                };
                invalid(field, e)
            })
    }

    /// Reads the key named by `key_file`; a missing, empty or short key is a
    /// configuration error naming `controller.key_file`.
    pub fn load_key(&self) -> Result<protocol::Key, ConfigError> {
        protocol::load_key(&self.key_file)
            .map_err(|e| invalid("controller.key_file", e.to_string()))
    }
}

/// "ip:port" only: a host name would make the start depend on DNS.
fn parse_addr(field: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        invalid(
            field,
            format!("{text:?} is not \"ip:port\" (an IPv4 or [IPv6] address and a port)"),
        )
    })?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(invalid(
            field,
            format!("{text:?} needs a real address and a nonzero port"),
        ));
    }
    Ok(addr)
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// `check_range(..)?` in the checks above.
impl From<OutOfRange<&'static str>> for ConfigError {
    fn from(e: OutOfRange<&'static str>) -> Self {
        invalid(e.field, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let cfg = WatchdogConfig::parse("").unwrap();
        assert_eq!(cfg, WatchdogConfig::default());
        assert_eq!(cfg.probes.stall_threshold_ms, 1000);
        cfg.validate().unwrap();
    }

    #[test]
    fn an_unknown_field_is_named_in_the_error() {
        let err = WatchdogConfig::parse("[probes]\nstall_treshold_ms = 5\n").unwrap_err();
        assert!(err.to_string().contains("stall_treshold_ms"), "{err}");
    }

    #[test]
    fn a_value_out_of_range_names_its_field() {
        let cfg = WatchdogConfig::parse("[probes]\nstall_threshold_ms = 0\n").unwrap();
        let err = cfg.validate().unwrap_err();
        assert!(
            err.to_string().contains("probes.stall_threshold_ms"),
            "{err}"
        );
    }

    #[test]
    fn metrics_are_off_by_default_and_a_bad_listen_address_names_metrics_listen() {
        let cfg = WatchdogConfig::parse("").unwrap();
        assert_eq!(cfg.metrics.listen_addr().unwrap(), None);
        let on = WatchdogConfig::parse("[metrics]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
        on.validate().unwrap();
        assert_eq!(
            on.metrics.listen_addr().unwrap(),
            Some("127.0.0.1:9464".parse().unwrap())
        );
        for bad in ["localhost:9464", "127.0.0.1", "127.0.0.1:0"] {
            let cfg = WatchdogConfig::parse(&format!("[metrics]\nlisten = {bad:?}\n")).unwrap();
            let err = cfg.validate().unwrap_err();
            assert!(err.to_string().contains("metrics.listen"), "{bad}: {err}");
        }
    }

    const CONTROLLER: &str = "[controller]\nheartbeat_addrs = [\"10.0.0.1:7400\", \"10.1.0.1:7400\"]\nevent_addr = \"10.0.0.1:7401\"\nkey_file = \"/etc/defib/cluster.key\"\n";

    #[test]
    fn a_controller_section_gets_the_documented_defaults() {
        let cfg = WatchdogConfig::parse(CONTROLLER).unwrap();
        cfg.validate().unwrap();
        let c = cfg.controller_for_run().unwrap();
        assert_eq!(c.heartbeat_interval_ms, 100);
        assert_eq!(c.isolation_timeout_ms, 3000);
        assert_eq!(c.spool_max_events, 100_000);
        assert_eq!(c.heartbeat_socket_addrs().unwrap().len(), 2);
        assert_eq!(cfg.host.cluster_id, "default");
        assert_eq!(cfg.host.state_dir, PathBuf::from("/var/lib/defib-watchdog"));
    }

    #[test]
    fn self_fence_is_off_by_default_and_its_device_needs_it_on_and_an_absolute_path() {
        let cfg = WatchdogConfig::parse(CONTROLLER).unwrap();
        assert!(!cfg.self_fence.enabled);
        assert_eq!(cfg.self_fence.watchdog_device, None);
        let on = format!(
            "{CONTROLLER}[self_fence]\nenabled = true\nwatchdog_device = \"/dev/watchdog\"\n"
        );
        WatchdogConfig::parse(&on).unwrap().validate().unwrap();
        let off = format!("{CONTROLLER}[self_fence]\nwatchdog_device = \"/dev/watchdog\"\n");
        let err = WatchdogConfig::parse(&off).unwrap().validate().unwrap_err();
        assert!(
            err.to_string().contains("self_fence.watchdog_device"),
            "{err}"
        );
        let rel =
            format!("{CONTROLLER}[self_fence]\nenabled = true\nwatchdog_device = \"watchdog\"\n");
        let err = WatchdogConfig::parse(&rel).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        let alone = WatchdogConfig::parse("[self_fence]\nenabled = true\n").unwrap();
        let err = alone.validate().unwrap_err();
        assert!(err.to_string().contains("self_fence.enabled"), "{err}");
    }

    #[test]
    fn run_without_a_controller_section_is_refused_naming_it() {
        let cfg = WatchdogConfig::parse("").unwrap();
        let err = cfg.controller_for_run().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "controller",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn each_bad_controller_or_host_value_names_its_field() {
        let cases = [
            ("heartbeat_addrs = []", "controller.heartbeat_addrs"),
            (
                "heartbeat_addrs = [\"ctl:7400\"]",
                "controller.heartbeat_addrs",
            ),
            (
                "heartbeat_addrs = [\"10.0.0.1:1\", \"10.0.0.1:1\"]",
                "controller.heartbeat_addrs",
            ),
            ("event_addr = \"10.0.0.1\"", "controller.event_addr"),
            ("event_addr = \"\"", "controller.event_addrs"),
            ("key_file = \"\"", "controller.key_file"),
            (
                "heartbeat_interval_ms = 5",
                "controller.heartbeat_interval_ms",
            ),
            (
                "isolation_timeout_ms = 150",
                "controller.isolation_timeout_ms",
            ),
            ("spool_max_events = 0", "controller.spool_max_events"),
        ];
        for (line, field) in cases {
            let key = line.split(' ').next().unwrap();
            let text: String = CONTROLLER
                .lines()
                .filter(|l| !l.starts_with(key))
                .chain([line])
                .collect::<Vec<_>>()
                .join("\n");
            let err = WatchdogConfig::parse(&text)
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
                "{line}: {err}"
            );
        }
        for (text, field) in [
            ("[host]\nid = \"\"", "host.id"),
            ("[host]\ncluster_id = \"a\\u0007b\"", "host.cluster_id"),
            ("[host]\nstate_dir = \"relative\"", "host.state_dir"),
        ] {
            let err = WatchdogConfig::parse(text).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn event_addrs_lists_every_controller_in_order_and_event_addr_alone_still_names_one() {
        let one = WatchdogConfig::parse(CONTROLLER).unwrap();
        one.validate().unwrap();
        assert_eq!(
            one.controller_for_run()
                .unwrap()
                .event_socket_addrs()
                .unwrap(),
            ["10.0.0.1:7401".parse::<SocketAddr>().unwrap()]
        );
        let several = CONTROLLER.replace(
            "event_addr = \"10.0.0.1:7401\"",
            "event_addrs = [\"10.0.0.3:7401\", \"10.0.0.1:7401\", \"[fd00::2]:7401\"]",
        );
        let cfg = WatchdogConfig::parse(&several).unwrap();
        cfg.validate().unwrap();
        let addrs: Vec<String> = cfg
            .controller_for_run()
            .unwrap()
            .event_socket_addrs()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addrs, ["10.0.0.3:7401", "10.0.0.1:7401", "[fd00::2]:7401"]);
    }

    #[test]
    fn event_addrs_with_event_addr_or_neither_or_a_duplicate_or_a_bad_entry_is_refused() {
        let without = CONTROLLER.replace("event_addr = \"10.0.0.1:7401\"\n", "");
        for (extra, field, words) in [
            (
                "event_addr = \"10.0.0.1:7401\"\nevent_addrs = [\"10.0.0.2:7401\"]",
                "controller.event_addrs",
                "not both",
            ),
            ("", "controller.event_addrs", "is required"),
            ("event_addrs = []", "controller.event_addrs", "is required"),
            (
                "event_addrs = [\"10.0.0.1:7401\", \"10.0.0.2:7401\", \"10.0.0.1:7401\"]",
                "controller.event_addrs",
                "10.0.0.1:7401 is listed twice (entry 2)",
            ),
            (
                "event_addrs = [\"10.0.0.1:7401\", \"ctl-2:7401\"]",
                "controller.event_addrs",
                "\"ctl-2:7401\" is not",
            ),
            (
                "event_addrs = [\"10.0.0.1:0\"]",
                "controller.event_addrs",
                "nonzero port",
            ),
            (
                "event_addr = \"0.0.0.0:7401\"",
                "controller.event_addr",
                "real address",
            ),
        ] {
            let text = format!("{without}{extra}\n");
            let err = WatchdogConfig::parse(&text)
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, message } if *f == field && message.contains(words)),
                "{extra}: {err}"
            );
        }
    }

    #[test]
    fn a_missing_key_file_is_a_config_error_naming_controller_key_file() {
        let cfg = WatchdogConfig::parse(
            &CONTROLLER.replace("/etc/defib/cluster.key", "/nonexistent/defib-test.key"),
        )
        .unwrap();
        let err = cfg.controller_for_run().unwrap().load_key().unwrap_err();
        assert!(err.to_string().contains("controller.key_file"), "{err}");
    }

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_a_config_error_naming_controller_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        for ca in [
            "/nonexistent/ca.pem".to_string(),
            not_pem.display().to_string(),
        ] {
            let cfg = WatchdogConfig::parse(&format!("{CONTROLLER}ca_file = {ca:?}\n")).unwrap();
            let err = cfg.controller_for_run().unwrap().stream_tls().unwrap_err();
            assert!(err.to_string().contains("controller.ca_file"), "{err}");
        }
        // A server name without a CA turns nothing on: refused.
        let cfg =
            WatchdogConfig::parse(&format!("{CONTROLLER}tls_server_name = \"ctl\"\n")).unwrap();
        let err = cfg.controller_for_run().unwrap().stream_tls().unwrap_err();
        assert!(
            err.to_string().contains("controller.tls_server_name"),
            "{err}"
        );
        // No CA: plain TCP.
        let cfg = WatchdogConfig::parse(CONTROLLER).unwrap();
        assert!(cfg
            .controller_for_run()
            .unwrap()
            .stream_tls()
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_libvirt_section_defaults_to_the_system_uri_on_for_run_and_off_for_events() {
        let cfg = WatchdogConfig::parse("").unwrap();
        let l = &cfg.libvirt;
        assert_eq!(l.uri, "qemu:///system");
        assert_eq!(l.inventory_interval_ms, 30_000);
        assert_eq!((l.reconnect_min_ms, l.reconnect_max_ms), (100, 5_000));
        assert!(l.enabled_for_run());
        assert!(!l.enabled_for_events(false));
        assert!(l.enabled_for_events(true));
        let off = WatchdogConfig::parse("[libvirt]\nenabled = false\n").unwrap();
        assert!(!off.libvirt.enabled_for_run());
        let on = WatchdogConfig::parse("[libvirt]\nenabled = true\n").unwrap();
        assert!(on.libvirt.enabled_for_events(false));
    }

    #[test]
    fn each_bad_libvirt_value_names_its_field() {
        let err = WatchdogConfig::parse("[libvirt]\nurl = \"qemu:///system\"\n").unwrap_err();
        assert!(err.to_string().contains("url"), "{err}");
        for (text, field) in [
            ("uri = \"\"", "libvirt.uri"),
            ("uri = \"qemu:///system x\"", "libvirt.uri"),
            (
                "inventory_interval_ms = 10",
                "libvirt.inventory_interval_ms",
            ),
            ("reconnect_min_ms = 0", "libvirt.reconnect_min_ms"),
            ("reconnect_max_ms = 1000000", "libvirt.reconnect_max_ms"),
            (
                "reconnect_min_ms = 2000\nreconnect_max_ms = 1000",
                "libvirt.reconnect_max_ms",
            ),
            (
                "enabled = false\nonly_own_domains = true",
                "libvirt.only_own_domains",
            ),
        ] {
            let err = WatchdogConfig::parse(&format!("[libvirt]\n{text}\n"))
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn a_pattern_with_a_star_in_the_middle_is_refused() {
        let cfg = WatchdogConfig::parse("[probes]\nwatch_names = [\"qemu*x\"]\n").unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("probes.watch_names"));
    }
}
