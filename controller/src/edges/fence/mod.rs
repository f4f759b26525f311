//! Fence methods: the ways the controller powers a host off and reads its power back.
//!
//! Every method is a [`FenceDriver`]: `fence`, `is_fenced` (the verification) and
//! `verdict` (the confirmation), each made of bounded external calls (child processes
//! with a timeout, retried with backoff). A host has one or more drivers, its *levels*,
//! tried in order like Pacemaker's fencing topology: the first level whose fence is then
//! verified wins (see [`crate::edges::fencing`]).
//!
//! Evidence is tied to the attempt (DESIGN rule 8): `fence` returns a [`FenceAttempt`],
//! made when the fence is requested, and `is_fenced` judges only that attempt, so that
//! something true before it (an older fence in a history, a power state read before the
//! power-off) can never verify it. What each level accepts:
//!
//! - [`ipmi::IpmiTool`]: `ipmitool -I lanplus` against the host's BMC. Evidence: this
//!   attempt's own `chassis power off` was acknowledged (no attempt exists otherwise)
//!   **and** a `chassis power status` read after it says off.
//! - [`agent::FenceAgent`]: any ClusterLabs fence agent (`fence_ipmilan`, `fence_redfish`,
//!   ...) through its standard stdin interface (`key=value` lines). Same evidence:
//!   `action=off` exited 0, then `action=status` read after it exits 2 (off).
//! - [`pacemaker::Pacemaker`]: the cluster's own fencing (`stonith_admin --fence`).
//!   Evidence: a successful `off`/`reboot` of this node in the fencing history that was
//!   not there when the attempt was made (the history is read before the request) and
//!   that completed no earlier than the request, whoever asked for it; membership from
//!   `crm_mon`.
//!
//! - [`ceph::CephBlocklist`]: a storage fence, the host's Ceph client addresses on the
//!   OSD blocklist. Evidence: each address's entry is new (or renewed) against the list
//!   read before the attempt, and no image of the configured pools is still watched from
//!   one of them. It stops writes to RBD only ([`LevelKind::Storage`]).
//!
//! The self-fence is not a level here: the engine counts it (`SelfFenceDeadline`) when
//! the host's last heartbeat said its watchdog is armed and the host has been silent,
//! on the controller's clock, for the isolation timeout plus a margin since then.
//!
//! A BMC can still lie (answer off for a host that stays on); no reading of the BMC
//! alone can tell. The engine covers that case: a power-fenced host still heard with
//! the watchdog process it had (same boot id and incarnation) is not restored (see
//! `controller::engine`).
//!
//! The first two are only two ways of reaching the same thing, a host's power switch:
//! each implements [`PowerSwitch`] (power off, power status), and one blanket impl makes
//! every power switch a [`FenceDriver`], so what counts as fenced cannot differ between
//! them.
use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::engine::{FenceVerifier, Source, Verdict};

pub mod agent;
pub mod ceph;
pub mod ipmi;
pub mod pacemaker;

/// Chassis power as a BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    On,
    Off,
}

/// Why a fence call did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The program could not be started (not installed, not executable).
    #[error("cannot run {program}: {message}")]
    Spawn { program: String, message: String },
    /// No answer within the call's timeout; the child was killed.
    #[error("{program} gave no answer within {timeout_ms} ms")]
    Timeout { program: String, timeout_ms: u64 },
    /// The program ran and failed (BMC unreachable, refused, bad credentials, ...).
    #[error("{program} failed ({status}): {detail}")]
    Failed {
        program: String,
        status: String,
        detail: String,
    },
    /// The program answered something this driver does not understand.
    #[error("{program} answered something unexpected: {detail}")]
    Unexpected { program: String, detail: String },
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One fence attempt of one level, made when its fence is requested. It fixes what will
/// count as evidence for this attempt and nothing else: evidence from before it (an
/// older fence of the same node, a power-off someone else sent) is not tied to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceAttempt {
    /// The controller's wall clock when the fence was requested (taken before anything
    /// was sent or read for it).
    pub requested_at: SystemTime,
    /// What was true before the request, against which the evidence is judged.
    pub baseline: Baseline,
}

/// What a level knew when it requested the fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Baseline {
    /// A power switch acknowledged this attempt's own power-off (an attempt of a power
    /// switch exists only then): a power status read after it that says off verifies it.
    PowerOffAcknowledged,
    /// Pacemaker: the node's fencing events as the history listed them just before
    /// `stonith_admin --fence` was sent. None of them verifies the attempt.
    History(Vec<pacemaker::FenceEvent>),
    /// Ceph: the host's blocklist entries (address → expiry) just before this attempt
    /// added them; an entry the same as one of these is not this attempt's.
    Blocklist(std::collections::BTreeMap<String, String>),
}

/// What a level's fence stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelKind {
    /// The host itself (its power, or the cluster's fencing of the node).
    Power,
    /// Only the host's writes to shared storage ([`ceph::CephBlocklist`]). Alone it
    /// counts only where configured so (`counts_alone`), and the engine then restores
    /// only what it covers; otherwise a later power level must verify too.
    Storage { counts_alone: bool },
}

impl FenceAttempt {
    /// An attempt requested now.
    pub fn now(baseline: Baseline) -> Self {
        FenceAttempt {
            requested_at: SystemTime::now(),
            baseline,
        }
    }
}

/// One fence method for one host.
pub trait FenceDriver: Send + Sync {
    /// A short description for logs and timelines (`ipmi 10.0.0.5:623`).
    fn describe(&self) -> String;
    /// Fence the host (hard power off, not a graceful shutdown). `Ok` means the method
    /// says it did so, and carries the attempt; only [`FenceDriver::is_fenced`] on that
    /// attempt verifies it.
    fn fence(&self) -> BoxFuture<'_, Result<FenceAttempt, FenceError>>;
    /// Independent evidence, produced after `attempt` was requested, that the host is
    /// fenced (a power status read after the acknowledged power-off says off; a success
    /// in Pacemaker's history that the attempt's baseline does not hold).
    fn is_fenced<'a>(
        &'a self,
        attempt: &'a FenceAttempt,
    ) -> BoxFuture<'a, Result<bool, FenceError>>;
    /// What this source says about a silent host (see [`crate::edges::fencing`]).
    fn verdict(&self) -> BoxFuture<'_, Result<Verdict, FenceError>>;
    /// The evidence a verified fence by this driver counts as.
    fn verifier(&self) -> FenceVerifier;
    /// The timeline source of its confirmations.
    fn source(&self) -> Source;
    /// What its fence stops (a power fence unless it says otherwise).
    fn kind(&self) -> LevelKind {
        LevelKind::Power
    }
    /// The Ceph client of a `ceph-blocklist` level (the old-copy check reads watchers
    /// through it).
    fn as_ceph_blocklist(&self) -> Option<&ceph::CephBlocklist> {
        None
    }
    /// Lifts what its fence left in force once the host is trusted again (the unfence),
    /// returning what it removed; a power fence leaves nothing (the host boots).
    fn lift(&self) -> BoxFuture<'_, Result<Vec<String>, FenceError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// A host's power switch, however it is reached (ipmitool, a fence agent): it can cut the
/// host's chassis power and read it back. That is all a power-based fence method needs;
/// the [`FenceDriver`] on top is the same for every switch (the impl below).
pub trait PowerSwitch: Send + Sync {
    /// A short description for logs and timelines (`ipmi 10.0.0.5:623`).
    fn describe(&self) -> String;
    /// Hard power off (not a graceful shutdown). `Ok` means the switch says it did so;
    /// only a later [`PowerSwitch::power_status`] verifies it.
    fn power_off(&self) -> BoxFuture<'_, Result<(), FenceError>>;
    /// The chassis power now.
    fn power_status(&self) -> BoxFuture<'_, Result<Power, FenceError>>;
}

/// Every power switch fences the same way: power off, verified by the power status
/// read after the acknowledged power-off saying off, confirmed by [`power_verdict`]. A blanket impl rather than a wrapper
/// type, so a switch is used as a driver as it is (`Arc::new(IpmiTool { .. })` is an
/// `Arc<dyn FenceDriver>`); drivers with other evidence (Pacemaker) implement
/// [`FenceDriver`] themselves and must not also be a `PowerSwitch`.
impl<T: PowerSwitch> FenceDriver for T {
    fn describe(&self) -> String {
        PowerSwitch::describe(self)
    }

    /// The attempt exists only once the switch acknowledged this power-off: a switch
    /// that refused or did not answer gives no attempt, so a status of off read later
    /// (someone else's power-off, a BMC that always says off) verifies nothing.
    fn fence(&self) -> BoxFuture<'_, Result<FenceAttempt, FenceError>> {
        Box::pin(async move {
            let requested_at = SystemTime::now();
            self.power_off().await?;
            Ok(FenceAttempt {
                requested_at,
                baseline: Baseline::PowerOffAcknowledged,
            })
        })
    }

    /// Called only after `fence` returned the attempt, so the status is read after the
    /// acknowledged power-off.
    fn is_fenced<'a>(
        &'a self,
        attempt: &'a FenceAttempt,
    ) -> BoxFuture<'a, Result<bool, FenceError>> {
        Box::pin(async move {
            if attempt.baseline != Baseline::PowerOffAcknowledged {
                return Err(FenceError::Unexpected {
                    program: PowerSwitch::describe(self),
                    detail: "asked to verify an attempt that did not power this switch off".into(),
                });
            }
            Ok(self.power_status().await? == Power::Off)
        })
    }

    fn verdict(&self) -> BoxFuture<'_, Result<Verdict, FenceError>> {
        Box::pin(async move { Ok(power_verdict(self.power_status().await?)) })
    }

    /// Whichever client read it (ipmitool, a fence agent), the chassis power comes from
    /// the host's management controller: the same evidence as IPMI's power status.
    fn verifier(&self) -> FenceVerifier {
        FenceVerifier::IpmiPowerOff
    }

    fn source(&self) -> Source {
        Source::Ipmi
    }
}

/// A BMC's power as a confirmation: off → `Dead`; on → `Unknown`, because chassis power
/// says nothing about whether the OS still runs VMs (a cut-off host and a hung one both
/// show power on).
pub fn power_verdict(p: Power) -> Verdict {
    match p {
        Power::Off => Verdict::Dead,
        Power::On => Verdict::Unknown,
    }
}

/// Timeouts and retries of one driver's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    /// One call (one child process) is killed after this long.
    pub timeout: Duration,
    /// Tries per call (1 = no retry).
    pub attempts: u32,
    /// Pause before the second try; doubled before each further one.
    pub backoff: Duration,
}

/// What a finished child process said.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stderr (or stdout when stderr is empty), trimmed to one short line for messages.
    pub fn detail(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let one: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let mut s = one.join(" / ");
        if s.len() > 300 {
            let mut cut = 300;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push('…');
        }
        s
    }

    pub fn status(&self) -> String {
        match self.code {
            Some(c) => format!("exit {c}"),
            None => "killed by a signal".into(),
        }
    }
}

/// A child process to run: program, arguments, environment, stdin.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    /// Extra environment (secrets go here or on stdin, never in `args`, which any
    /// local user can read in /proc).
    pub env: Vec<(String, String)>,
    pub stdin: Option<String>,
}

impl Invocation {
    /// Runs it once, killing it after `timeout`.
    pub async fn run_once(&self, timeout: Duration) -> Result<Output, FenceError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| FenceError::Spawn {
            program: self.program.clone(),
            message: e.to_string(),
        })?;
        if let (Some(text), Some(mut pipe)) = (&self.stdin, child.stdin.take()) {
            // A program that exits without reading its stdin is not an error here: its
            // exit status says what happened.
            let _ = pipe.write_all(text.as_bytes()).await;
            drop(pipe);
        }
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => Ok(Output {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
            Ok(Err(e)) => Err(FenceError::Spawn {
                program: self.program.clone(),
                message: e.to_string(),
            }),
            // Dropping the future drops the child, which kill_on_drop kills.
            Err(_) => Err(FenceError::Timeout {
                program: self.program.clone(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// Calls `call` up to `policy.attempts` times with doubling pauses, until it gives an
/// answer. A program that cannot be started is not retried (it will not appear).
pub async fn with_retries<T, F, Fut>(policy: CallPolicy, mut call: F) -> Result<T, FenceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, FenceError>>,
{
    let mut pause = policy.backoff;
    let mut last = None;
    for attempt in 1..=policy.attempts.max(1) {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e @ FenceError::Spawn { .. }) => return Err(e),
            Err(e) => {
                tracing::debug!(attempt, error = %e, "fence call failed");
                last = Some(e);
            }
        }
        if attempt < policy.attempts {
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2);
        }
    }
    Err(last.expect("at least one attempt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32) -> CallPolicy {
        CallPolicy {
            timeout: Duration::from_secs(5),
            attempts,
            backoff: Duration::from_millis(1),
        }
    }

    #[tokio::test]
    async fn a_call_that_fails_twice_then_answers_is_tried_three_times() {
        let mut n = 0;
        let r = with_retries(policy(3), || {
            n += 1;
            let this = n;
            async move {
                if this < 3 {
                    Err(FenceError::Failed {
                        program: "x".into(),
                        status: "exit 1".into(),
                        detail: "no".into(),
                    })
                } else {
                    Ok(this)
                }
            }
        })
        .await;
        assert_eq!(r, Ok(3));
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_not_retried() {
        let mut n = 0;
        let r: Result<(), _> = with_retries(policy(5), || {
            n += 1;
            async {
                Invocation {
                    program: "/nonexistent/fence_nothing".into(),
                    ..Default::default()
                }
                .run_once(Duration::from_secs(1))
                .await
                .map(|_| ())
            }
        })
        .await;
        assert!(matches!(r, Err(FenceError::Spawn { .. })), "{r:?}");
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn a_call_that_hangs_is_killed_at_its_timeout() {
        let inv = Invocation {
            program: "sleep".into(),
            args: vec!["30".into()],
            ..Default::default()
        };
        let r = inv.run_once(Duration::from_millis(100)).await;
        assert!(matches!(r, Err(FenceError::Timeout { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn stdin_reaches_the_program_and_its_output_comes_back() {
        let inv = Invocation {
            program: "sh".into(),
            args: vec!["-c".into(), "cat; echo err >&2; exit 2".into()],
            stdin: Some("action=status\n".into()),
            ..Default::default()
        };
        let out = inv.run_once(Duration::from_secs(5)).await.unwrap();
        assert_eq!(out.code, Some(2));
        assert_eq!(out.stdout, "action=status\n");
        assert_eq!(out.detail(), "err");
    }
}
