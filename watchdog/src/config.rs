//! The watchdog's configuration: a TOML file, every field defaulted, validated before
//! anything is loaded or bound. A bad file makes the daemon exit with code 64 (EX_USAGE)
//! and a message that names the field.
use std::path::Path;

use serde::Deserialize;
use watchdog_common::{NamePattern, COMM_LEN, MAX_NAME_PATTERNS};

pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    pub probes: ProbeConfig,
}

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
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            watch_names: vec!["qemu-system-*".into(), "qemu-kvm".into()],
            stall_threshold_ms: 1000,
            stall_scan_interval_ms: 50,
            proc_rescan_interval_ms: 5000,
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
        if !(10..=3_600_000).contains(&p.stall_threshold_ms) {
            return Err(invalid("probes.stall_threshold_ms", "must be 10..=3600000"));
        }
        if !(5..=10_000).contains(&p.stall_scan_interval_ms) {
            return Err(invalid(
                "probes.stall_scan_interval_ms",
                "must be 5..=10000",
            ));
        }
        if p.stall_scan_interval_ms > p.stall_threshold_ms {
            return Err(invalid(
                "probes.stall_scan_interval_ms",
                "must not exceed probes.stall_threshold_ms",
            ));
        }
        if !(100..=3_600_000).contains(&p.proc_rescan_interval_ms) {
            return Err(invalid(
                "probes.proc_rescan_interval_ms",
                "must be 100..=3600000",
            ));
        }
        Ok(())
    }

    pub fn name_patterns(&self) -> Vec<NamePattern> {
        self.probes
            .watch_names
            .iter()
            .map(|n| NamePattern::parse(n))
            .collect()
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
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
    fn a_pattern_with_a_star_in_the_middle_is_refused() {
        let cfg = WatchdogConfig::parse("[probes]\nwatch_names = [\"qemu*x\"]\n").unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("probes.watch_names"));
    }
}
