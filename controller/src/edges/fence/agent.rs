//! Any ClusterLabs fence agent (`fence_ipmilan`, `fence_redfish`, `fence_virsh`, ...)
//! through its standard stdin interface: the agent runs without arguments and reads
//! `name=value` lines, one per option (the long option without its dashes, `-` or `_`
//! alike), with `action=off|status`. This is how Pacemaker's fencer calls them, and it
//! keeps the password off the command line.
//!
//! Exit status: `off` 0 = done; `status` 0 = on, 2 = off, anything else = no answer
//! (the fence-agents API).
use std::collections::BTreeMap;

use super::{
    with_retries, BoxFuture, CallPolicy, FenceError, Invocation, Output, Power, PowerSwitch,
};

/// One fence agent configured for one host.
#[derive(Debug, Clone)]
pub struct FenceAgent {
    /// The agent program (`fence_ipmilan` or a path).
    pub agent: String,
    /// Its options (`ip`, `username`, `lanplus`, `power_wait`, ...), without `action`
    /// and without the password.
    pub options: BTreeMap<String, String>,
    /// Sent as `password=` when set (read from a file by the configuration).
    pub password: Option<String>,
    pub policy: CallPolicy,
}

/// Why an option cannot be sent to an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("option name {0:?} must be letters, digits, '_' or '-'")]
    BadName(String),
    #[error("option {0:?}: a value must be one line")]
    MultiLine(String),
    #[error("option {0:?} is set by defib (action) or from password_file (password)")]
    Reserved(String),
}

/// Checks an option the way the agent's stdin parser needs it.
pub fn check_option(name: &str, value: &str) -> Result<(), OptionError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(OptionError::BadName(name.into()));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(OptionError::MultiLine(name.into()));
    }
    if matches!(
        name.replace('-', "_").as_str(),
        "action" | "option" | "password" | "passwd"
    ) {
        return Err(OptionError::Reserved(name.into()));
    }
    Ok(())
}

impl FenceAgent {
    /// The agent's stdin for `action`.
    pub fn render_stdin(&self, action: &str) -> String {
        let mut s = format!("action={action}\n");
        for (k, v) in &self.options {
            s.push_str(&format!("{k}={v}\n"));
        }
        if let Some(p) = &self.password {
            s.push_str(&format!("password={p}\n"));
        }
        s
    }

    fn invocation(&self, action: &str) -> Invocation {
        Invocation {
            program: self.agent.clone(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: Some(self.render_stdin(action)),
        }
    }

    async fn call(
        &self,
        action: &str,
        accept: impl Fn(&Output) -> bool,
    ) -> Result<Output, FenceError> {
        let inv = self.invocation(action);
        with_retries(self.policy, || async {
            let out = inv.run_once(self.policy.timeout).await?;
            if accept(&out) {
                Ok(out)
            } else {
                Err(FenceError::Failed {
                    program: format!("{} -o {action}", self.agent),
                    status: out.status(),
                    detail: out.detail(),
                })
            }
        })
        .await
    }
}

/// Reads a `status` answer: exit 0 = on, 2 = off.
pub fn parse_status(out: &Output) -> Option<Power> {
    match out.code {
        Some(0) => Some(Power::On),
        Some(2) => Some(Power::Off),
        _ => None,
    }
}

impl PowerSwitch for FenceAgent {
    fn describe(&self) -> String {
        match self
            .options
            .get("ip")
            .or_else(|| self.options.get("ipaddr"))
        {
            Some(ip) => format!("{} {ip}", self.agent),
            None => self.agent.clone(),
        }
    }

    /// `action=off`.
    fn power_off(&self) -> BoxFuture<'_, Result<(), FenceError>> {
        Box::pin(async move {
            self.call("off", |o| o.code == Some(0)).await?;
            Ok(())
        })
    }

    /// `action=status`.
    fn power_status(&self) -> BoxFuture<'_, Result<Power, FenceError>> {
        Box::pin(async move {
            let out = self.call("status", |o| parse_status(o).is_some()).await?;
            Ok(parse_status(&out).expect("accepted above"))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn agent(program: &str) -> FenceAgent {
        FenceAgent {
            agent: program.into(),
            options: [
                ("ip", "10.0.0.5"),
                ("username", "admin"),
                ("lanplus", "1"),
                ("power_wait", "0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            password: Some("s3cret".into()),
            policy: CallPolicy {
                timeout: Duration::from_secs(5),
                attempts: 1,
                backoff: Duration::from_millis(1),
            },
        }
    }

    #[test]
    fn stdin_carries_the_action_every_option_and_the_password_last() {
        assert_eq!(
            agent("fence_ipmilan").render_stdin("off"),
            "action=off\nip=10.0.0.5\nlanplus=1\npower_wait=0\nusername=admin\npassword=s3cret\n"
        );
    }

    #[test]
    fn options_that_would_break_the_stdin_protocol_are_refused() {
        assert_eq!(check_option("power_wait", "0"), Ok(()));
        assert_eq!(check_option("power-wait", "0"), Ok(()));
        assert!(matches!(
            check_option("ip\nx", "1"),
            Err(OptionError::BadName(_))
        ));
        assert!(matches!(
            check_option("ip", "1\naction=on"),
            Err(OptionError::MultiLine(_))
        ));
        assert!(matches!(
            check_option("action", "on"),
            Err(OptionError::Reserved(_))
        ));
        assert!(matches!(
            check_option("password", "x"),
            Err(OptionError::Reserved(_))
        ));
    }

    /// A stand-in agent written as a shell script, for the exit-status contract only
    /// (the real agents are exercised in tests/tests/fencing_lab.rs).
    fn script(dir: &tempfile::TempDir, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.path().join("fence_test");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    #[tokio::test]
    async fn status_exit_two_is_off_zero_is_on_and_one_is_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(&script(&dir, "cat >/dev/null; exit 2"));
        assert_eq!(a.power_status().await, Ok(Power::Off));
        let a = agent(&script(&dir, "cat >/dev/null; exit 0"));
        assert_eq!(a.power_status().await, Ok(Power::On));
        let a = agent(&script(
            &dir,
            "cat >/dev/null; echo 'Failed: Unable to obtain correct plug status' >&2; exit 1",
        ));
        let err = a.power_status().await.unwrap_err().to_string();
        assert!(
            err.contains("Unable to obtain correct plug status"),
            "{err}"
        );
    }
}
