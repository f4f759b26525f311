//! The fencing edges: a [`Fencer`] that tries a host's configured fence levels in order
//! and verifies each fence, and a [`Confirmer`] that asks the host's levels (its BMC's
//! chassis power, Pacemaker's membership) whether it is dead.
//!
//! ```text
//! engine ─Fence{key}─► LeveledFencer ─spawn─► level 1: fence ─► poll is_fenced until true ─► Verified
//!                                               │ failed / never off
//!                                               ▼
//!                                             level 2 ... ─► all failed: Failed (or Unverified) ─► alarm
//! ```
//!
//! Rules kept here:
//! - Only independent evidence tied to this attempt verifies a fence (DESIGN rule 8): a
//!   level's `fence` returns the [`FenceAttempt`] and only `is_fenced(attempt)` is asked
//!   (power status read back as *off* after the attempt's own acknowledged power-off; a
//!   success in Pacemaker's history that was not there before the request). A fence
//!   command that "succeeded" but is never verified is `Unverified` (an alarm, no
//!   restore).
//! - Idempotent per intent key: a key handed over again while its fence runs is
//!   ignored; one that has finished gets its first outcome again, nothing is redone.
//! - A BMC reporting power *on* does not make a silent host `Alive`: the chassis runs,
//!   but that says nothing about whether its OS still runs VMs (a cut-off host and a
//!   hung one look the same). Only Pacemaker membership can say `Alive`. So power on
//!   is `Unknown`, and the engine fences after its `fence_on_unknown_after` silence.
//!   The first level that answers gives the verdict.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ResultSender;
use crate::edges::fence::{FenceAttempt, FenceDriver, LevelKind};
use crate::edges::{Confirmer, Fencer};
use crate::engine::{
    FenceMethod, FenceOutcome, HostEvent, HostId, Input, IntentKey, Source, Verdict,
};

/// Each host's fence levels, in the order they are tried.
pub type FenceTable = HashMap<HostId, Vec<Arc<dyn FenceDriver>>>;

/// How a power-off is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// Read the power status until it says off, for at most this long.
    pub timeout: Duration,
    /// Pause between reads.
    pub poll: Duration,
}

/// Tries a host's levels in order until one is verified.
pub struct LeveledFencer {
    table: Arc<FenceTable>,
    verify: VerifyPolicy,
    results: ResultSender,
    /// Intent key → its outcome once known (`None` while it runs). One entry per fence
    /// try of an incident: small, and it must outlive the try to answer a repeat.
    outcomes: Arc<Mutex<HashMap<IntentKey, Option<FenceOutcome>>>>,
}

impl LeveledFencer {
    pub fn new(table: Arc<FenceTable>, verify: VerifyPolicy, results: ResultSender) -> Self {
        LeveledFencer {
            table,
            verify,
            results,
            outcomes: Arc::default(),
        }
    }
}

impl Fencer for LeveledFencer {
    fn fence(&mut self, host: &HostId, method: FenceMethod, key: &IntentKey) {
        let send = |results: &ResultSender, outcome: FenceOutcome| {
            let _ = results.send(Input::FenceResult {
                host: host.clone(),
                key: key.clone(),
                outcome,
            });
        };
        {
            let mut outcomes = self.outcomes.lock().expect("fence outcomes");
            match outcomes.get(key) {
                Some(None) => {
                    tracing::info!(%host, %key, "fence already running for this intent");
                    return;
                }
                Some(Some(done)) => {
                    send(&self.results, done.clone());
                    return;
                }
                None => {}
            }
            outcomes.insert(key.clone(), None);
        }
        let Some(levels) = self.table.get(host).cloned().filter(|l| !l.is_empty()) else {
            let outcome = FenceOutcome::Failed {
                reason: format!(
                    "no fence method configured for host {host} (asked for {method:?})"
                ),
            };
            self.outcomes
                .lock()
                .expect("fence outcomes")
                .insert(key.clone(), Some(outcome.clone()));
            send(&self.results, outcome);
            return;
        };
        let (host, key) = (host.clone(), key.clone());
        let (verify, results, outcomes) =
            (self.verify, self.results.clone(), self.outcomes.clone());
        tokio::spawn(async move {
            tracing::info!(%host, %key, levels = levels.len(), "fencing");
            let outcome = fence_through_levels(&host, &levels, verify).await;
            tracing::info!(%host, %key, ?outcome, "fence finished");
            outcomes
                .lock()
                .expect("fence outcomes")
                .insert(key.clone(), Some(outcome.clone()));
            let _ = results.send(Input::FenceResult { host, key, outcome });
        });
    }

    fn lift(&mut self, host: &HostId) {
        self.lift_storage(host);
    }
}

impl LeveledFencer {
    /// Lifts every storage level of `host` and reports what it removed (or why not).
    fn lift_storage(&self, host: &HostId) {
        let levels: Vec<Arc<dyn FenceDriver>> = self
            .table
            .get(host)
            .into_iter()
            .flatten()
            .filter(|l| matches!(l.kind(), LevelKind::Storage { .. }))
            .cloned()
            .collect();
        if levels.is_empty() {
            return;
        }
        let (host, results) = (host.clone(), self.results.clone());
        tokio::spawn(async move {
            let mut removed = Vec::new();
            let mut error = None;
            for level in &levels {
                match level.lift().await {
                    Ok(r) => removed.extend(r),
                    Err(e) => {
                        tracing::error!(%host, level = %level.describe(), error = %e, "lifting the storage fence failed");
                        error = Some(format!("{}: {e}", level.describe()));
                    }
                }
            }
            tracing::info!(%host, ?removed, "storage fence lifted");
            let _ = results.send(Input::HostEvent {
                host,
                event: HostEvent::StorageFenceLifted { removed, error },
            });
        });
    }
}

/// Level by level: fence, then look for that attempt's evidence until it is there.
pub async fn fence_through_levels(
    host: &HostId,
    levels: &[Arc<dyn FenceDriver>],
    verify: VerifyPolicy,
) -> FenceOutcome {
    let mut reasons = Vec::new();
    let mut unverified = false;
    for (i, level) in levels.iter().enumerate() {
        let what = format!("level {} ({})", i + 1, level.describe());
        let attempt = match level.fence().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%host, level = %what, error = %e, "fence failed");
                reasons.push(format!("{what}: {} failed: {e}", verb(level.as_ref())));
                continue;
            }
        };
        match (
            wait_fenced(level.as_ref(), &attempt, verify).await,
            level.kind(),
        ) {
            (Ok(()), LevelKind::Power) => return FenceOutcome::Verified(level.verifier()),
            (Ok(()), LevelKind::Storage { counts_alone: true }) => {
                return FenceOutcome::Verified(level.verifier())
            }
            (
                Ok(()),
                LevelKind::Storage {
                    counts_alone: false,
                },
            ) => {
                // Done, and it stops the old copies' writes; but by its policy it counts
                // only with a power fence: the next levels are tried.
                tracing::info!(%host, level = %what, "storage fence verified; needs a power fence too");
                unverified = true;
                reasons.push(format!(
                    "{what}: verified, but it counts only with a power fence (counts = \"with-power\")"
                ));
            }
            (Err(why), _) => {
                tracing::warn!(%host, level = %what, %why, "fence not verified");
                unverified = true;
                reasons.push(format!(
                    "{what}: {} sent but not verified: {why}",
                    verb(level.as_ref())
                ));
            }
        }
    }
    let reason = reasons.join("; ");
    if unverified {
        FenceOutcome::Unverified { reason }
    } else {
        FenceOutcome::Failed { reason }
    }
}

/// What a level's fence does, for reasons.
fn verb(level: &dyn FenceDriver) -> &'static str {
    match level.kind() {
        LevelKind::Power => "power off",
        LevelKind::Storage { .. } => "blocklist",
    }
}

async fn wait_fenced(
    level: &dyn FenceDriver,
    attempt: &FenceAttempt,
    verify: VerifyPolicy,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + verify.timeout;
    let mut last;
    loop {
        match level.is_fenced(attempt).await {
            Ok(true) => return Ok(()),
            Ok(false) => {
                last = "not fenced yet (power status on, no fencing in the history since \
                        this attempt was requested, or a blocklisted address still watching)"
                    .to_string()
            }
            Err(e) => last = format!("no evidence: {e}"),
        }
        if tokio::time::Instant::now() + verify.poll > deadline {
            return Err(format!("{last} after {} ms", verify.timeout.as_millis()));
        }
        tokio::time::sleep(verify.poll).await;
    }
}

/// Asks each host's fence levels, in order, for the chassis power.
pub struct PowerConfirmer {
    table: Arc<FenceTable>,
    results: ResultSender,
    /// Hosts being asked now: the engine may ask again before the answer.
    asking: Arc<Mutex<HashSet<HostId>>>,
}

impl PowerConfirmer {
    pub fn new(table: Arc<FenceTable>, results: ResultSender) -> Self {
        PowerConfirmer {
            table,
            results,
            asking: Arc::default(),
        }
    }
}

impl Confirmer for PowerConfirmer {
    fn confirm(&mut self, host: &HostId) {
        let Some(levels) = self.table.get(host).cloned().filter(|l| !l.is_empty()) else {
            // Nothing to ask but the heartbeats, which already said "silent".
            let _ = self.results.send(Input::ConfirmationResult {
                host: host.clone(),
                source: Source::Heartbeat,
                verdict: Verdict::Unknown,
            });
            return;
        };
        if !self.asking.lock().expect("asking").insert(host.clone()) {
            return;
        }
        let (host, results, asking) = (host.clone(), self.results.clone(), self.asking.clone());
        tokio::spawn(async move {
            let (source, verdict) = levels_verdict(&host, &levels).await;
            asking.lock().expect("asking").remove(&host);
            let _ = results.send(Input::ConfirmationResult {
                host,
                source,
                verdict,
            });
        });
    }
}

/// The first level that answers gives the verdict; none answering is `Unknown` (see the
/// module comment).
pub async fn levels_verdict(host: &HostId, levels: &[Arc<dyn FenceDriver>]) -> (Source, Verdict) {
    // A storage fence knows nothing of the host's life: it is not asked.
    for level in levels.iter().filter(|l| l.kind() == LevelKind::Power) {
        match level.verdict().await {
            Ok(v) => {
                tracing::info!(%host, level = %level.describe(), verdict = ?v, "confirmation");
                return (level.source(), v);
            }
            Err(e) => {
                tracing::warn!(%host, level = %level.describe(), error = %e, "confirmation: no answer");
            }
        }
    }
    let source = levels.first().map_or(Source::Heartbeat, |l| l.source());
    (source, Verdict::Unknown)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::edges::fence::{power_verdict, Baseline, BoxFuture, FenceError, Power};
    use crate::engine::FenceVerifier;

    /// A scripted driver for the level logic only (real BMCs are in tests/).
    struct Scripted {
        off_ok: bool,
        /// Status answers in order; the last one repeats.
        statuses: Vec<Result<Power, ()>>,
        reads: AtomicU32,
        offs: AtomicU32,
    }

    impl Scripted {
        fn new(off_ok: bool, statuses: Vec<Result<Power, ()>>) -> Arc<Scripted> {
            Arc::new(Scripted {
                off_ok,
                statuses,
                reads: AtomicU32::new(0),
                offs: AtomicU32::new(0),
            })
        }
    }

    fn err() -> FenceError {
        FenceError::Failed {
            program: "scripted".into(),
            status: "exit 1".into(),
            detail: "unreachable".into(),
        }
    }

    impl FenceDriver for Scripted {
        fn describe(&self) -> String {
            "scripted".into()
        }
        fn fence(&self) -> BoxFuture<'_, Result<FenceAttempt, FenceError>> {
            self.offs.fetch_add(1, Ordering::SeqCst);
            let ok = self.off_ok;
            Box::pin(async move {
                if ok {
                    Ok(FenceAttempt::now(Baseline::PowerOffAcknowledged))
                } else {
                    Err(err())
                }
            })
        }
        fn is_fenced<'a>(
            &'a self,
            _attempt: &'a FenceAttempt,
        ) -> BoxFuture<'a, Result<bool, FenceError>> {
            let a = self.status();
            Box::pin(async move { a.map(|p| p == Power::Off).map_err(|()| err()) })
        }
        fn verdict(&self) -> BoxFuture<'_, Result<Verdict, FenceError>> {
            let a = self.status();
            Box::pin(async move { a.map(power_verdict).map_err(|()| err()) })
        }
        fn verifier(&self) -> FenceVerifier {
            FenceVerifier::IpmiPowerOff
        }
        fn source(&self) -> Source {
            Source::Ipmi
        }
    }

    impl Scripted {
        fn status(&self) -> Result<Power, ()> {
            let i = self.reads.fetch_add(1, Ordering::SeqCst) as usize;
            self.statuses[i.min(self.statuses.len() - 1)]
        }
    }

    const VERIFY: VerifyPolicy = VerifyPolicy {
        timeout: Duration::from_millis(300),
        poll: Duration::from_millis(10),
    };

    fn h() -> HostId {
        HostId::new("h0")
    }

    #[tokio::test]
    async fn the_first_level_that_powers_off_and_reads_off_verifies_the_fence() {
        let first = Scripted::new(false, vec![Err(())]);
        let second = Scripted::new(true, vec![Ok(Power::On), Ok(Power::Off)]);
        let third = Scripted::new(true, vec![Ok(Power::Off)]);
        let levels: Vec<Arc<dyn FenceDriver>> = vec![first.clone(), second.clone(), third.clone()];
        let o = fence_through_levels(&h(), &levels, VERIFY).await;
        assert_eq!(o, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
        assert_eq!(first.offs.load(Ordering::SeqCst), 1);
        assert_eq!(second.reads.load(Ordering::SeqCst), 2);
        assert_eq!(
            third.offs.load(Ordering::SeqCst),
            0,
            "a later level was tried"
        );
    }

    /// A power switch (through the blanket `FenceDriver` impl) whose power-off is refused
    /// but whose status always reads off: someone else's power-off, or a BMC that says
    /// off whatever happens.
    struct OffWithoutAck {
        reads: AtomicU32,
    }

    impl crate::edges::fence::PowerSwitch for OffWithoutAck {
        fn describe(&self) -> String {
            "always-off".into()
        }
        fn power_off(&self) -> BoxFuture<'_, Result<(), FenceError>> {
            Box::pin(async { Err(err()) })
        }
        fn power_status(&self) -> BoxFuture<'_, Result<Power, FenceError>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(Power::Off) })
        }
    }

    #[tokio::test]
    async fn a_power_status_of_off_without_the_attempts_own_acknowledged_power_off_verifies_nothing(
    ) {
        let switch = Arc::new(OffWithoutAck {
            reads: AtomicU32::new(0),
        });
        let o = fence_through_levels(&h(), &[switch.clone() as Arc<dyn FenceDriver>], VERIFY).await;
        assert!(matches!(o, FenceOutcome::Failed { .. }), "{o:?}");
        assert_eq!(
            switch.reads.load(Ordering::SeqCst),
            0,
            "status read as evidence"
        );
        // Nor does an attempt made by another kind of level.
        let foreign = FenceAttempt::now(Baseline::History(Vec::new()));
        assert!(switch.is_fenced(&foreign).await.is_err());
    }

    #[tokio::test]
    async fn a_power_off_that_never_reads_off_is_unverified_with_the_reason() {
        let only = Scripted::new(true, vec![Ok(Power::On)]);
        let o = fence_through_levels(&h(), &[only as Arc<dyn FenceDriver>], VERIFY).await;
        match o {
            FenceOutcome::Unverified { reason } => {
                assert!(reason.contains("not fenced yet"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn every_level_failing_is_a_failed_fence_naming_each_level() {
        let a = Scripted::new(false, vec![Err(())]);
        let b = Scripted::new(false, vec![Err(())]);
        let o = fence_through_levels(&h(), &[a as Arc<dyn FenceDriver>, b], VERIFY).await;
        match o {
            FenceOutcome::Failed { reason } => {
                assert!(
                    reason.contains("level 1") && reason.contains("level 2"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn power_off_is_dead_power_on_is_unknown_and_an_unreachable_bmc_asks_the_next() {
        let off = Scripted::new(true, vec![Ok(Power::Off)]);
        let on = Scripted::new(true, vec![Ok(Power::On)]);
        let down = Scripted::new(true, vec![Err(())]);
        let v =
            |levels: Vec<Arc<dyn FenceDriver>>| async move { levels_verdict(&h(), &levels).await };
        assert_eq!(v(vec![off.clone()]).await, (Source::Ipmi, Verdict::Dead));
        assert_eq!(v(vec![on]).await, (Source::Ipmi, Verdict::Unknown));
        assert_eq!(
            v(vec![down.clone()]).await,
            (Source::Ipmi, Verdict::Unknown)
        );
        assert_eq!(v(vec![down, off]).await, (Source::Ipmi, Verdict::Dead));
    }

    #[tokio::test]
    async fn an_intent_handed_over_again_is_not_fenced_twice_and_gets_its_first_outcome() {
        let level = Scripted::new(true, vec![Ok(Power::Off)]);
        let mut table = FenceTable::new();
        table.insert(h(), vec![level.clone() as Arc<dyn FenceDriver>]);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut f = LeveledFencer::new(Arc::new(table), VERIFY, tx);
        let key = IntentKey("i1/fence-1/host:h0".into());
        f.fence(&h(), FenceMethod::Ipmi, &key);
        f.fence(&h(), FenceMethod::Ipmi, &key);
        let first = rx.recv().await.unwrap();
        f.fence(&h(), FenceMethod::Ipmi, &key);
        let again = rx.recv().await.unwrap();
        assert_eq!(level.offs.load(Ordering::SeqCst), 1);
        let outcome = |i: &Input| match i {
            Input::FenceResult { outcome, .. } => outcome.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(outcome(&first), outcome(&again));
        assert_eq!(
            outcome(&first),
            FenceOutcome::Verified(FenceVerifier::IpmiPowerOff)
        );
    }

    #[tokio::test]
    async fn a_host_without_levels_fails_at_once_with_the_reason() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut f = LeveledFencer::new(Arc::default(), VERIFY, tx);
        f.fence(&h(), FenceMethod::Ipmi, &IntentKey("k".into()));
        match rx.recv().await.unwrap() {
            Input::FenceResult {
                outcome: FenceOutcome::Failed { reason },
                ..
            } => assert!(reason.contains("no fence method configured"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    /// A storage level for the walk only: its fence always verifies.
    struct Storage {
        counts_alone: bool,
        fenced: AtomicU32,
    }

    impl FenceDriver for Storage {
        fn describe(&self) -> String {
            "storage".into()
        }
        fn fence(&self) -> BoxFuture<'_, Result<FenceAttempt, FenceError>> {
            self.fenced.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(FenceAttempt::now(Baseline::Blocklist(Default::default()))) })
        }
        fn is_fenced<'a>(
            &'a self,
            _attempt: &'a FenceAttempt,
        ) -> BoxFuture<'a, Result<bool, FenceError>> {
            Box::pin(async { Ok(true) })
        }
        fn verdict(&self) -> BoxFuture<'_, Result<Verdict, FenceError>> {
            Box::pin(async { Ok(Verdict::Alive) })
        }
        fn verifier(&self) -> FenceVerifier {
            FenceVerifier::CephBlocklist
        }
        fn source(&self) -> Source {
            Source::Ceph
        }
        fn kind(&self) -> LevelKind {
            LevelKind::Storage {
                counts_alone: self.counts_alone,
            }
        }
    }

    fn storage(counts_alone: bool) -> Arc<Storage> {
        Arc::new(Storage {
            counts_alone,
            fenced: AtomicU32::new(0),
        })
    }

    #[tokio::test]
    async fn a_storage_fence_that_counts_only_with_power_is_done_and_then_the_power_level_decides()
    {
        let s = storage(false);
        let power = Scripted::new(true, vec![Ok(Power::Off)]);
        let o =
            fence_through_levels(&h(), &[s.clone() as Arc<dyn FenceDriver>, power], VERIFY).await;
        assert_eq!(o, FenceOutcome::Verified(FenceVerifier::IpmiPowerOff));
        assert_eq!(
            s.fenced.load(Ordering::SeqCst),
            1,
            "the blocklist was still made"
        );

        let s = storage(false);
        let dead_bmc = Scripted::new(false, vec![Err(())]);
        let o = fence_through_levels(&h(), &[s as Arc<dyn FenceDriver>, dead_bmc], VERIFY).await;
        match o {
            FenceOutcome::Unverified { reason } => {
                assert!(
                    reason.contains("counts only with a power fence"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_storage_fence_that_counts_alone_verifies_the_fence_when_the_bmc_is_unreachable() {
        let dead_bmc = Scripted::new(false, vec![Err(())]);
        let s = storage(true);
        let o = fence_through_levels(&h(), &[dead_bmc as Arc<dyn FenceDriver>, s], VERIFY).await;
        assert_eq!(o, FenceOutcome::Verified(FenceVerifier::CephBlocklist));
    }

    #[tokio::test]
    async fn a_storage_level_is_never_asked_whether_the_host_is_alive() {
        let s = storage(true);
        let on = Scripted::new(true, vec![Ok(Power::Off)]);
        let (source, verdict) = levels_verdict(&h(), &[s as Arc<dyn FenceDriver>, on]).await;
        assert_eq!((source, verdict), (Source::Ipmi, Verdict::Dead));
    }
}
