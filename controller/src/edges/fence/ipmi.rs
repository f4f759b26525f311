//! IPMI over LAN through `ipmitool -I lanplus` (IPMI 2.0, RMCP+).
//!
//! The password goes to ipmitool in its environment (`-E` reads `IPMI_PASSWORD`), never
//! on the command line. The cipher suite is always given: ipmitool 1.8.19's default (17)
//! is not offered by many BMCs (ipmi_sim among them), and without `-C` it first spends
//! about 10 s on "Unable to Get Channel Cipher Suites" before falling back.
use std::time::Duration;

use super::{
    with_retries, BoxFuture, CallPolicy, FenceError, Invocation, Output, Power, PowerSwitch,
};

/// One BMC, reached with ipmitool.
#[derive(Debug, Clone)]
pub struct IpmiTool {
    /// The ipmitool binary (default `ipmitool` on PATH).
    pub program: String,
    pub address: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub cipher_suite: u8,
    /// IPMI privilege level to ask for (`ADMINISTRATOR`, `OPERATOR`).
    pub privilege: String,
    pub policy: CallPolicy,
}

impl IpmiTool {
    /// The command line for `chassis power <what>` (without the password).
    pub fn invocation(&self, what: &str) -> Invocation {
        // ipmitool retries a lost datagram itself: keep its own budget inside ours.
        let per_try_s = (self.policy.timeout.as_secs() / 2).max(1);
        let args: Vec<String> = [
            "-I",
            "lanplus",
            "-C",
            &self.cipher_suite.to_string(),
            "-H",
            &self.address,
            "-p",
            &self.port.to_string(),
            "-U",
            &self.username,
            "-L",
            &self.privilege,
            "-E",
            "-N",
            &per_try_s.to_string(),
            "-R",
            "1",
            "chassis",
            "power",
            what,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Invocation {
            program: self.program.clone(),
            args,
            env: vec![("IPMI_PASSWORD".into(), self.password.clone())],
            stdin: None,
        }
    }

    async fn call(&self, what: &str) -> Result<Output, FenceError> {
        let inv = self.invocation(what);
        with_retries(self.policy, || async {
            let out = inv.run_once(self.policy.timeout).await?;
            if out.code == Some(0) {
                Ok(out)
            } else {
                Err(FenceError::Failed {
                    program: format!("ipmitool {}:{}", self.address, self.port),
                    status: out.status(),
                    detail: out.detail(),
                })
            }
        })
        .await
    }
}

/// Reads `Chassis Power is on|off` (ipmitool's answer to `chassis power status`).
pub fn parse_power_status(stdout: &str) -> Option<Power> {
    stdout.lines().find_map(|l| {
        let l = l.trim().to_ascii_lowercase();
        let rest = l.strip_prefix("chassis power is ")?;
        match rest.trim() {
            "on" => Some(Power::On),
            "off" => Some(Power::Off),
            _ => None,
        }
    })
}

impl PowerSwitch for IpmiTool {
    fn describe(&self) -> String {
        format!("ipmi {}:{}", self.address, self.port)
    }

    /// `chassis power off`.
    fn power_off(&self) -> BoxFuture<'_, Result<(), FenceError>> {
        Box::pin(async move {
            let out = self.call("off").await?;
            // "Chassis Power Control: Down/Off"
            if out.stdout.to_ascii_lowercase().contains("down/off") {
                Ok(())
            } else {
                Err(FenceError::Unexpected {
                    program: self.describe(),
                    detail: out.detail(),
                })
            }
        })
    }

    /// `chassis power status`.
    fn power_status(&self) -> BoxFuture<'_, Result<Power, FenceError>> {
        Box::pin(async move {
            let out = self.call("status").await?;
            parse_power_status(&out.stdout).ok_or_else(|| FenceError::Unexpected {
                program: self.describe(),
                detail: out.detail(),
            })
        })
    }
}

/// The default per-call policy for a BMC: 5 s per call, 3 tries, 200 ms then 400 ms.
pub fn default_policy() -> CallPolicy {
    CallPolicy {
        timeout: Duration::from_secs(5),
        attempts: 3,
        backoff: Duration::from_millis(200),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bmc() -> IpmiTool {
        IpmiTool {
            program: "ipmitool".into(),
            address: "10.0.0.5".into(),
            port: 623,
            username: "admin".into(),
            password: "s3cret".into(),
            cipher_suite: 3,
            privilege: "ADMINISTRATOR".into(),
            policy: default_policy(),
        }
    }

    #[test]
    fn the_command_line_names_interface_cipher_and_target_and_never_the_password() {
        let inv = bmc().invocation("status");
        let line = inv.args.join(" ");
        assert_eq!(
            line,
            "-I lanplus -C 3 -H 10.0.0.5 -p 623 -U admin -L ADMINISTRATOR -E -N 2 -R 1 chassis power status"
        );
        assert!(!line.contains("s3cret"));
        assert_eq!(
            inv.env,
            vec![("IPMI_PASSWORD".to_string(), "s3cret".to_string())]
        );
    }

    #[test]
    fn power_status_answers_are_read_whatever_their_case() {
        assert_eq!(parse_power_status("Chassis Power is on\n"), Some(Power::On));
        assert_eq!(parse_power_status("Chassis Power is off"), Some(Power::Off));
        assert_eq!(
            parse_power_status("warning: x\nchassis power is OFF\n"),
            Some(Power::Off)
        );
        assert_eq!(parse_power_status("Chassis Power is unknown"), None);
        assert_eq!(parse_power_status(""), None);
    }

    #[tokio::test]
    async fn an_unreachable_bmc_is_an_error_naming_it_not_a_hang() {
        // A port on loopback where nothing answers: ipmitool fails or times out.
        let mut b = bmc();
        b.address = "127.0.0.1".into();
        b.port = 9;
        b.policy = CallPolicy {
            timeout: Duration::from_secs(3),
            attempts: 1,
            backoff: Duration::from_millis(1),
        };
        if which("ipmitool").is_none() {
            b.program = "/nonexistent/ipmitool".into();
        }
        let r = b.power_status().await;
        assert!(r.is_err(), "{r:?}");
    }

    fn which(p: &str) -> Option<std::path::PathBuf> {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(p))
                .find(|f| f.exists())
        })
    }
}
