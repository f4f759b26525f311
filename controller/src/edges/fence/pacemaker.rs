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
//! - Fence: read the node's history (the attempt's baseline), then
//!   `stonith_admin --fence NODE --timeout S`, which returns once the cluster's fencing
//!   is done (or failed). A history that cannot be read first fails the level: without
//!   a baseline, this attempt's evidence cannot be told from older events.
//! - Verified ([`fenced_since`]): the history holds a successful `off` or `reboot` of
//!   this node that is not in the baseline and completed no earlier than the request
//!   (less [`CLOCK_MARGIN`]), and Pacemaker does not still hold the node `unclean`.
//!   Whoever asked counts: Pacemaker fencing the node on its own after the request is
//!   evidence of this loss. An older success (from an earlier incident a minute ago)
//!   is not, however recent.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    with_retries, Baseline, BoxFuture, CallPolicy, FenceAttempt, FenceDriver, FenceError,
    Invocation, Output,
};
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
}

/// The history's completion times are whole seconds read from a cluster node's clock,
/// not the controller's: an event may show up to this much before the request and
/// still be the attempt's (rounding, and a little clock difference). An event that old
/// also has to be missing from the baseline to count.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(2);

/// One node in `crm_mon`'s `<nodes>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub online: bool,
    pub unclean: bool,
}

/// One `<fence_event>` of the history. Two events are the same event when every field
/// is equal (the history has no event id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceEvent {
    pub target: String,
    pub action: String,
    pub status: String,
    /// Who asked (`stonith_admin.1234`, `pacemaker-controld.5928`).
    pub client: String,
    /// The node the request came from.
    pub origin: String,
    /// The node whose device carried it out.
    pub delegate: String,
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

    async fn verified(&self, attempt: &FenceAttempt) -> Result<bool, FenceError> {
        let Baseline::History(before) = &attempt.baseline else {
            return Err(FenceError::Unexpected {
                program: self.describe(),
                detail: "asked to verify an attempt without a fencing history baseline".into(),
            });
        };
        let events = self.history().await?;
        let Some(event) = fenced_since(&events, &self.node, attempt.requested_at, before) else {
            return Ok(false);
        };
        let state = self.membership().await?;
        // Offline and unclean: Pacemaker itself still wants it fenced.
        let verified = !state.unclean || state.online;
        if verified {
            tracing::info!(node = %self.node, client = %event.client, action = %event.action,
                completed = ?event.completed, "fencing history: fenced since the request");
        }
        Ok(verified)
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
            client: n.attribute("client").unwrap_or("").into(),
            origin: n.attribute("origin").unwrap_or("").into(),
            delegate: n.attribute("delegate").unwrap_or("").into(),
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

/// The evidence for an attempt requested at `requested_at` whose baseline is `before`:
/// a successful `off` or `reboot` of `node` (an `on` powers nothing off) that is not in
/// `before` and completed no earlier than `requested_at` less [`CLOCK_MARGIN`]. Both
/// checks, because each covers what the other cannot: the baseline needs no clock, and
/// the time catches an old event that only reached this node's history after the
/// baseline was read (Pacemaker syncs histories between nodes).
pub fn fenced_since<'a>(
    events: &'a [FenceEvent],
    node: &str,
    requested_at: SystemTime,
    before: &[FenceEvent],
) -> Option<&'a FenceEvent> {
    let requested = requested_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let earliest = requested.saturating_sub(CLOCK_MARGIN.as_secs());
    events.iter().find(|e| {
        e.target == node
            && e.status == "success"
            && matches!(e.action.as_str(), "off" | "reboot")
            && e.completed.is_some_and(|c| c >= earliest)
            && !before.contains(e)
    })
}

impl FenceDriver for Pacemaker {
    fn describe(&self) -> String {
        format!("pacemaker node {}", self.node)
    }

    /// No shortcut for a node Pacemaker fenced already: that fence happened before this
    /// attempt and is in its baseline, so the node is fenced again (an `off` of a node
    /// that is off succeeds and leaves the attempt's own event in the history).
    fn fence(&self) -> BoxFuture<'_, Result<FenceAttempt, FenceError>> {
        Box::pin(async move {
            let requested_at = SystemTime::now();
            let before: Vec<FenceEvent> = self
                .history()
                .await?
                .into_iter()
                .filter(|e| e.target == self.node)
                .collect();
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
                Ok(FenceAttempt {
                    requested_at,
                    baseline: Baseline::History(before),
                })
            } else {
                Err(FenceError::Failed {
                    program: format!("stonith_admin --fence {}", self.node),
                    status: out.status(),
                    detail: out.detail(),
                })
            }
        })
    }

    fn is_fenced<'a>(
        &'a self,
        attempt: &'a FenceAttempt,
    ) -> BoxFuture<'a, Result<bool, FenceError>> {
        Box::pin(self.verified(attempt))
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
        assert_eq!(h[0].client, "pacemaker-controld.5928");
        assert_eq!(
            (h[0].origin.as_str(), h[0].delegate.as_str()),
            ("node3", "node1")
        );
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

    /// 2026-11-22 18:10:16Z, the completion of HISTORY's success for node2.
    const AT: u64 = 1_795_371_016;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn event(target: &str, action: &str, status: &str, client: &str, completed: u64) -> FenceEvent {
        FenceEvent {
            target: target.into(),
            action: action.into(),
            status: status.into(),
            client: client.into(),
            origin: "node1".into(),
            delegate: "node3".into(),
            completed: Some(completed),
        }
    }

    /// node2's events in HISTORY: what a baseline taken now holds.
    fn baseline() -> Vec<FenceEvent> {
        parse_history(HISTORY)
            .unwrap()
            .into_iter()
            .filter(|e| e.target == "node2")
            .collect()
    }

    #[test]
    fn an_older_successful_fence_of_the_same_node_in_the_history_is_not_evidence_for_a_new_attempt()
    {
        // A minute after an earlier incident's fence, a new attempt: the history holds
        // that success, and nothing new arrives.
        let history = parse_history(HISTORY).unwrap();
        let requested = at(AT + 60);
        assert_eq!(
            fenced_since(&history, "node2", requested, &baseline()),
            None
        );
        // Nor when the old success reached this node's history only after the baseline
        // was read (an empty baseline): it completed before the request.
        assert_eq!(fenced_since(&history, "node2", requested, &[]), None);
    }

    #[test]
    fn a_fence_completed_after_the_request_counts() {
        let requested = at(AT + 60);
        let mut history = parse_history(HISTORY).unwrap();
        let ours = event("node2", "off", "success", "stonith_admin.4242", AT + 63);
        history.push(ours.clone());
        assert_eq!(
            fenced_since(&history, "node2", requested, &baseline()),
            Some(&ours)
        );
        // Completed in the second of the request (the history's times are whole seconds)
        // or a little before it by the cluster's clock: still this attempt's, being new.
        let same_second = event("node2", "off", "success", "stonith_admin.4242", AT + 59);
        assert!(fenced_since(&[same_second], "node2", requested, &baseline()).is_some());
        // A failed or a pending fence after the request is no evidence, nor is an `on`.
        let failed = event("node2", "off", "failed", "stonith_admin.4242", AT + 63);
        let mut pending = event("node2", "off", "pending", "stonith_admin.4242", AT + 63);
        pending.completed = None;
        let on = event("node2", "on", "success", "stonith_admin.4242", AT + 63);
        for e in [failed, pending, on] {
            assert_eq!(
                fenced_since(std::slice::from_ref(&e), "node2", requested, &baseline()),
                None,
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_fence_of_another_node_does_not_count() {
        let requested = at(AT + 60);
        let mut history = parse_history(HISTORY).unwrap();
        history.push(event(
            "node3",
            "off",
            "success",
            "stonith_admin.4242",
            AT + 63,
        ));
        assert_eq!(
            fenced_since(&history, "node2", requested, &baseline()),
            None
        );
    }

    #[test]
    fn pacemakers_own_fence_after_the_request_counts() {
        // The cluster lost the node and rebooted it itself, while (or before) defib's
        // stonith_admin ran: after the request, so tied to this loss.
        let requested = at(AT + 60);
        let mut history = parse_history(HISTORY).unwrap();
        let own = event(
            "node2",
            "reboot",
            "success",
            "pacemaker-controld.5928",
            AT + 64,
        );
        history.push(own.clone());
        assert_eq!(
            fenced_since(&history, "node2", requested, &baseline()),
            Some(&own)
        );
        // One that was still pending when the baseline was read and completed since
        // is new too.
        let mut was_pending = own.clone();
        was_pending.status = "pending".into();
        was_pending.completed = None;
        let mut before = baseline();
        before.push(was_pending);
        assert_eq!(
            fenced_since(&history, "node2", requested, &before),
            Some(&own)
        );
    }

    #[tokio::test]
    async fn a_pacemaker_level_refuses_to_verify_an_attempt_without_a_history_baseline() {
        let p = pacemaker();
        let power = FenceAttempt::now(Baseline::PowerOffAcknowledged);
        assert!(matches!(
            p.is_fenced(&power).await,
            Err(FenceError::Unexpected { .. })
        ));
    }

    fn pacemaker() -> Pacemaker {
        Pacemaker {
            node: "node2".into(),
            command_prefix: vec!["ssh".into(), "root@node1".into()],
            policy: CallPolicy {
                timeout: Duration::from_secs(1),
                attempts: 1,
                backoff: Duration::from_millis(1),
            },
            fence_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn commands_run_behind_the_prefix() {
        let inv = pacemaker().invocation("crm_mon", &["-1", "--output-as=xml"]);
        assert_eq!(inv.program, "ssh");
        assert_eq!(inv.args, ["root@node1", "crm_mon", "-1", "--output-as=xml"]);
    }
}
