//! The command line.
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The controller's API address when none is given.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7412";

/// Operate defib: hosts, VMs, incidents with their timelines, alarms, maintenance.
#[derive(Debug, Parser)]
#[command(name = "defibctl", version)]
pub struct Cli {
    /// The controller's API (`https://…` when the controller has a `[tls]` certificate).
    #[arg(long, env = "DEFIB_URL", default_value = DEFAULT_URL, global = true)]
    pub url: String,
    /// A file holding the API's bearer token (surrounding whitespace is ignored).
    #[arg(long, env = "DEFIB_TOKEN_FILE", global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA(s) that signed the controller's certificate: an https:// URL
    /// is trusted through these only. Without it, the public web CAs.
    #[arg(long, env = "DEFIB_CA_FILE", global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Print the API's JSON (pretty) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Cmd {
    /// Hosts with their state and heartbeats; one host also lists its resources.
    /// `hosts enroll HOST` lets a host speak to the controller and prints (or, with
    /// `--key-out`, writes with mode 0600) the key its watchdog signs with;
    /// `hosts revoke HOST` refuses it from then on.
    Hosts {
        /// Show only this host, with its VMs.
        host: Option<String>,
        /// With `enroll` or `revoke`: the host.
        target: Option<String>,
        /// With `enroll`: write the host's key to this file (mode 0600) instead of printing it.
        #[arg(long)]
        key_out: Option<std::path::PathBuf>,
    },
    /// VMs (and other restorable resources) with their state and owning incident.
    Vms {
        /// Only those on this host.
        #[arg(long)]
        host: Option<String>,
    },
    /// Incidents; one incident shows its timeline.
    Incidents {
        /// The incident (`12` or `i12`).
        id: Option<String>,
    },
    /// Recent alarms, oldest first.
    Alarms,
    /// Every controller (several elect a leader on etcd), which one leads, and since when.
    Controllers,
    /// Planned work on a host: its silence is not a failure while on.
    Maintenance {
        host: String,
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Trust a fenced host again (it must be clean).
    Unfence { host: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("defibctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_command() {
        let a = parse(&["--url", "http://c:1", "--json", "hosts"]).unwrap();
        let b = parse(&["hosts", "--json", "--url", "http://c:1"]).unwrap();
        for cli in [a, b] {
            assert_eq!(cli.url, "http://c:1");
            assert!(cli.json);
            assert_eq!(
                cli.command,
                Cmd::Hosts {
                    host: None,
                    target: None,
                    key_out: None
                }
            );
        }
    }

    #[test]
    fn the_url_defaults_to_the_local_controller() {
        // DEFIB_URL from the environment would win; the integration test covers it.
        if std::env::var_os("DEFIB_URL").is_none() {
            assert_eq!(parse(&["alarms"]).unwrap().url, DEFAULT_URL);
        }
    }

    #[test]
    fn maintenance_takes_a_host_and_on_or_off() {
        let cli = parse(&["maintenance", "h1", "on"]).unwrap();
        assert_eq!(
            cli.command,
            Cmd::Maintenance {
                host: "h1".into(),
                state: OnOff::On
            }
        );
        let cli = parse(&[
            "--token-file",
            "/etc/defib/token",
            "maintenance",
            "h1",
            "off",
        ])
        .unwrap();
        assert_eq!(cli.token_file, Some(PathBuf::from("/etc/defib/token")));
        assert!(matches!(
            cli.command,
            Cmd::Maintenance {
                state: OnOff::Off,
                ..
            }
        ));
        let cli = parse(&["hosts", "--ca-file", "/etc/defib/ca.pem"]).unwrap();
        assert_eq!(cli.ca_file, Some(PathBuf::from("/etc/defib/ca.pem")));
        assert!(parse(&["maintenance", "h1", "maybe"]).is_err());
        assert!(parse(&["maintenance", "h1"]).is_err());
    }

    #[test]
    fn incidents_take_an_optional_id_and_vms_an_optional_host_filter() {
        assert_eq!(
            parse(&["incidents"]).unwrap().command,
            Cmd::Incidents { id: None }
        );
        assert_eq!(
            parse(&["incidents", "i7"]).unwrap().command,
            Cmd::Incidents {
                id: Some("i7".into())
            }
        );
        assert_eq!(
            parse(&["vms", "--host", "h2"]).unwrap().command,
            Cmd::Vms {
                host: Some("h2".into())
            }
        );
        assert_eq!(
            parse(&["unfence", "h3"]).unwrap().command,
            Cmd::Unfence { host: "h3".into() }
        );
    }

    #[test]
    fn a_command_is_required_and_unknown_ones_are_refused() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["reboot"]).is_err());
    }
}
