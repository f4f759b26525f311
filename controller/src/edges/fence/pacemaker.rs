//! Pacemaker as a fence level: membership from `crm_mon -1 --output-as=xml`, fencing
//! through `stonith_admin --fence NODE`, verification from the fencing history
//! (`stonith_admin --history NODE --verbose --output-as=xml`; without `--verbose` only
//! the newest event per node is listed).
//!
//! The commands run where Pacemaker's IPC is: on a cluster node, so `command_prefix`
//! (e.g. `["ssh", "root@node1"]`, or `["ip", "netns", "exec", NS]` in the lab) is put
//! in front of each.
//!
//! - Verdict: the node `online` → `Alive` (the cluster hears it: the controller alone is
//!   cut off from it); offline (clean or not) → `Dead`; not listed or no answer → an
//!   error (the engine counts `Unknown`).
//! - Verified: the node's newest fencing event succeeded and completed at most
//!   `history_max_age` ago, and Pacemaker does not still hold the node `unclean`.
//!   Pacemaker may fence a lost node itself before defib asks: that counts (the history
//!   is the evidence, whoever asked).
//! - Fence: when not verified already, `stonith_admin --fence NODE --timeout S`, which
//!   returns once the cluster's fencing is done (or failed).
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{with_retries, BoxFuture, CallPolicy, FenceDriver, FenceError, Invocation, Output};
use crate::engine::{FenceVerifier, Source, Verdict};

#[derive(Debug, Clone)]
pub struct Pacemaker {
    /// The host's node name in the cluster.
    pub node: String,
    /// Put in front of every command (empty: run them here).
    pub command_prefix: Vec<String>,
    /// For `crm_mon` and the history.
    pub policy: CallPolicy,
    /// For `stonith_admin --fence` (one try; Pacemaker retries its own devices).
    pub fence_timeout: Duration,
    /// A fencing event older than this does not verify anything.
    pub history_max_age: Duration,
}

/// One node in `crm_mon`'s `<nodes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub online: bool,
    pub unclean: bool,
}

/// One `<fence_event>` of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceEvent {
    pub target: String,
    pub action: String,
    pub status: String,
    /// Unix seconds, when completed.
    pub completed: Option<u64>,
}

impl Pacemaker {
    fn invocation(&self, program: &str, args: &[&str]) -> Invocation {
        let mut argv: Vec<String> = self.command_prefix.clone();
        argv.push(program.into());
        argv.extend(args.iter().map(|a| a.to_string()));
        let program = argv.remove(0);
        Invocation {
            program,
            args: argv,
            env: Vec::new(),
            stdin: None,
        }
    }

    async fn query(&self, program: &str, args: &[&str]) -> Result<Output, FenceError> {
        let inv = self.invocation(program, args);
        with_retries(self.policy, || async {
            let out = inv.run_once(self.policy.timeout).await?;
            if out.code == Some(0) {
                Ok(out)
            } else {
                Err(FenceError::Failed {
                    program: program.into(),
                    status: out.status(),
                    detail: out.detail(),
                })
            }
        })
        .await
    }

    /// The node as `crm_mon` lists it.
    pub async fn membership(&self) -> Result<NodeState, FenceError> {
        let out = self.query("crm_mon", &["-1", "--output-as=xml"]).await?;
        parse_node_state(&out.stdout, &self.node).map_err(|detail| FenceError::Unexpected {
            program: "crm_mon".into(),
            detail,
        })
    }

    /// The node's fencing events.
    pub async fn history(&self) -> Result<Vec<FenceEvent>, FenceError> {
        let out = self
            .query(
                "stonith_admin",
                &["--history", &self.node, "--verbose", "--output-as=xml"],
            )
            .await?;
        parse_history(&out.stdout).map_err(|detail| FenceError::Unexpected {
            program: "stonith_admin --history".into(),
            detail,
        })
    }

    async fn verified_now(&self) -> Result<bool, FenceError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let events = self.history().await?;
        if !recently_fenced(&events, &self.node, now, self.history_max_age) {
            return Ok(false);
        }
        let state = self.membership().await?;
        // Offline and unclean: Pacemaker itself still wants it fenced.
        Ok(!state.unclean || state.online)
    }
}

/// Finds `name` in `crm_mon`'s XML.
pub fn parse_node_state(xml: &str, name: &str) -> Result<NodeState, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    let node = doc
        .descendants()
        .filter(|n| n.has_tag_name("node"))
        // <nodes><node .../> (not node_history's or a resource's <node>)
        .filter(|n| n.parent().is_some_and(|p| p.has_tag_name("nodes")))
        .find(|n| n.attribute("name") == Some(name))
        .ok_or_else(|| format!("node {name:?} is not in the cluster"))?;
    let flag = |a: &str| node.attribute(a) == Some("true");
    Ok(NodeState {
        online: flag("online"),
        unclean: flag("unclean"),
    })
}

/// Reads `stonith_admin --history ... --output-as=xml`.
pub fn parse_history(xml: &str) -> Result<Vec<FenceEvent>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("fence_event"))
        .map(|n| FenceEvent {
            target: n.attribute("target").unwrap_or("").into(),
            action: n.attribute("action").unwrap_or("").into(),
            status: n.attribute("status").unwrap_or("").into(),
            completed: n.attribute("completed").and_then(parse_completed),
        })
        .collect())
}

/// `2026-11-22 18:10:16Z` (UTC) → unix seconds.
pub fn parse_completed(text: &str) -> Option<u64> {
    let t = text.trim().trim_end_matches('Z');
    let (date, time) = t.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut c = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (c.next()??, c.next()??, c.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// The newest completed event for `node` succeeded, at most `max_age` before `now`.
pub fn recently_fenced(events: &[FenceEvent], node: &str, now: u64, max_age: Duration) -> bool {
    events
        .iter()
        .filter(|e| e.target == node && e.completed.is_some())
        .max_by_key(|e| e.completed)
        .is_some_and(|e| {
            e.status == "success"
                && e.completed
                    .is_some_and(|c| now.saturating_sub(c) <= max_age.as_secs())
        })
}

impl FenceDriver for Pacemaker {
    fn describe(&self) -> String {
        format!("pacemaker node {}", self.node)
    }

    fn fence(&self) -> BoxFuture<'_, Result<(), FenceError>> {
        Box::pin(async move {
            if self.verified_now().await.unwrap_or(false) {
                tracing::info!(node = %self.node, "Pacemaker has fenced the node already");
                return Ok(());
            }
            let secs = self.fence_timeout.as_secs().max(1).to_string();
            let inv = self.invocation(
                "stonith_admin",
                &["--fence", &self.node, "--timeout", &secs],
            );
            // Pacemaker's own timeout first; ours a little later.
            let out = inv
                .run_once(self.fence_timeout + Duration::from_secs(5))
                .await?;
            if out.code == Some(0) {
                Ok(())
            } else {
                Err(FenceError::Failed {
                    program: format!("stonith_admin --fence {}", self.node),
                    status: out.status(),
                    detail: out.detail(),
                })
            }
        })
    }

    fn is_fenced(&self) -> BoxFuture<'_, Result<bool, FenceError>> {
        Box::pin(self.verified_now())
    }

    fn verdict(&self) -> BoxFuture<'_, Result<Verdict, FenceError>> {
        Box::pin(async move {
            let s = self.membership().await?;
            Ok(if s.online {
                Verdict::Alive
            } else {
                Verdict::Dead
            })
        })
    }

    fn verifier(&self) -> FenceVerifier {
        FenceVerifier::PacemakerHistory
    }

    fn source(&self) -> Source {
        Source::Pacemaker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shapes as Pacemaker 2.1.5 prints them (trimmed).
    const CRM_MON: &str = r#"<pacemaker-result api-version="2.25" request="crm_mon -1 --output-as=xml">
  <nodes>
    <node name="node1" id="1" online="true" standby="false" unclean="false" type="member"/>
    <node name="node2" id="2" online="false" standby="false" unclean="true" type="member"/>
  </nodes>
  <node_history>
    <node name="node2"/>
  </node_history>
  <status code="0" message="OK"/>
</pacemaker-result>"#;

    const HISTORY: &str = r#"<pacemaker-result api-version="2.25" request="stonith_admin --history * --verbose --output-as=xml">
  <list name="fencing history" count="3">
    <fence_event action="reboot" target="node2" client="pacemaker-controld.5928" origin="node3" status="success" delegate="node1" completed="2026-11-22 18:10:16Z"/>
    <fence_event action="off" target="node2" client="stonith_admin.1" origin="node1" status="failed" completed="2026-11-22 18:00:00Z"/>
    <fence_event action="reboot" target="node3" origin="node1" status="pending"/>
  </list>
  <status code="0" message="OK"/>
</pacemaker-result>"#;

    #[test]
    fn crm_mon_gives_each_nodes_membership_and_an_unknown_node_is_an_error() {
        assert_eq!(
            parse_node_state(CRM_MON, "node1"),
            Ok(NodeState {
                online: true,
                unclean: false
            })
        );
        assert_eq!(
            parse_node_state(CRM_MON, "node2"),
            Ok(NodeState {
                online: false,
                unclean: true
            })
        );
        assert!(parse_node_state(CRM_MON, "node9").is_err());
        assert!(parse_node_state("not xml", "node1").is_err());
    }

    #[test]
    fn the_history_lists_every_event_with_its_completion_time() {
        let h = parse_history(HISTORY).unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h[0].status, "success");
        assert_eq!(h[0].completed, Some(1_795_371_016));
        assert_eq!(h[2].completed, None);
    }

    #[test]
    fn completion_times_are_utc_seconds() {
        assert_eq!(parse_completed("1970-01-01 00:00:00Z"), Some(0));
        assert_eq!(parse_completed("2000-03-01 00:00:01Z"), Some(951_868_801));
        assert_eq!(parse_completed("2026-11-22 18:10:16Z"), Some(1_795_371_016));
        assert_eq!(parse_completed("yesterday"), None);
    }

    #[test]
    fn only_a_recent_success_as_the_newest_event_counts_as_fenced() {
        let h = parse_history(HISTORY).unwrap();
        let at = 1_795_371_016;
        let age = Duration::from_secs(120);
        assert!(recently_fenced(&h, "node2", at + 5, age));
        assert!(!recently_fenced(&h, "node2", at + 600, age), "too old");
        assert!(!recently_fenced(&h, "node3", at, age), "pending only");
        assert!(!recently_fenced(&h, "node1", at, age), "no event");
        let mut failed_last = h.clone();
        failed_last.push(FenceEvent {
            target: "node2".into(),
            action: "off".into(),
            status: "failed".into(),
            completed: Some(at + 1),
        });
        assert!(!recently_fenced(&failed_last, "node2", at + 5, age));
    }

    #[test]
    fn commands_run_behind_the_prefix() {
        let p = Pacemaker {
            node: "node2".into(),
            command_prefix: vec!["ssh".into(), "root@node1".into()],
            policy: CallPolicy {
                timeout: Duration::from_secs(1),
                attempts: 1,
                backoff: Duration::from_millis(1),
            },
            fence_timeout: Duration::from_secs(60),
            history_max_age: Duration::from_secs(120),
        };
        let inv = p.invocation("crm_mon", &["-1", "--output-as=xml"]);
        assert_eq!(inv.program, "ssh");
        assert_eq!(inv.args, ["root@node1", "crm_mon", "-1", "--output-as=xml"]);
    }
}
