//! Leader election on an etcd lease: grant a lease, keep it alive, and hold the leader
//! key (put-if-absent, bound to the lease) while it lives. Publishes this controller's
//! [`Role`] on a watch channel; decides nothing else.
//!
//! The election is one key, `<prefix>leader`, created only if absent and bound to the
//! candidate's lease; followers try again every `campaign_every`. The key's create
//! revision is the fencing token ([`Guard`]): every store write of the leader is a
//! transaction that succeeds only while that key, with that revision, exists
//! (`ha::store`). etcd's election API (Campaign) is not used: after an etcd leader loss
//! a Campaign call can hang for the server's request timeout (6–7 s measured), and a cut
//! Campaign stream resigns the candidate behind the caller's back (shared/testbed/etcd,
//! pitfalls 3 and 4); a bounded put-if-absent has neither problem.
//!
//! Leadership ends when the local deadline passes ([`LeaseDeadline`]: the last answered
//! keep-alive plus the TTL minus the margin), when etcd says the lease is gone, or when
//! the runtime asks ([`StepDown`]). Then the lease is revoked if etcd answers (a
//! follower takes over at once) and a new lease is granted for the next campaign.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::conn::{EtcdConn, EtcdError};
use super::deadline::LeaseDeadline;
use super::EtcdSettings;

/// The leader key's identity while this controller holds it: the fencing token every
/// store write is guarded by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    /// `<prefix>leader`.
    pub leader_key: String,
    /// The revision that created the leader key for this term.
    pub create_revision: i64,
    /// The lease the key is bound to.
    pub lease: i64,
}

/// What `<prefix>leader` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The leading controller's id.
    pub id: String,
    /// Its API, for followers to point at.
    pub api: String,
    /// Since when it leads (its wall clock, unix ms).
    pub since_unix_ms: u64,
}

/// What `<prefix>members/<id>` holds (bound to the member's lease: a dead controller's
/// entry goes with its lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The controller's id.
    pub id: String,
    /// Its API.
    pub api: String,
    /// When it started (its wall clock, unix ms).
    pub started_unix_ms: u64,
}

/// This controller's role.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// Not leading. `leader`: who does, as etcd says (none during a handover);
    /// `problem`: why this controller cannot even campaign (etcd unreachable...).
    Follower {
        leader: Option<LeaderRecord>,
        problem: Option<String>,
    },
    /// Leading: act until `until` (the local deadline), every write guarded by `guard`.
    Leader {
        guard: Guard,
        since_unix_ms: u64,
        until: Instant,
    },
}

/// What the leadership task publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct LeadershipState {
    pub role: Role,
    /// How many times this controller became leader (a new term each time).
    pub term: u64,
    /// The controllers etcd knows (each with a live lease), by id.
    pub members: Vec<MemberRecord>,
    /// Why the last term ended, if one did.
    pub last_step_down: Option<String>,
}

impl LeadershipState {
    fn initial() -> Self {
        LeadershipState {
            role: Role::Follower {
                leader: None,
                problem: Some("starting: no lease yet".into()),
            },
            term: 0,
            members: Vec::new(),
            last_step_down: None,
        }
    }

    /// The leader's guard and deadline, if this controller leads.
    pub fn leading(&self) -> Option<(&Guard, Instant)> {
        match &self.role {
            Role::Leader { guard, until, .. } => Some((guard, *until)),
            Role::Follower { .. } => None,
        }
    }
}

/// What the runtime may ask of the leadership task.
#[derive(Debug, Clone)]
pub enum StepDown {
    /// Give the lead up (revoke the lease) and campaign again after one TTL, so that
    /// another controller gets the chance (the term failed: a store write refused...).
    Restart(String),
    /// Give the lead up and stop campaigning (shutdown).
    Retire,
}

impl StepDown {
    /// Why the term ends, for the log and the alarm.
    fn reason(&self) -> String {
        match self {
            StepDown::Restart(why) => why.clone(),
            StepDown::Retire => "shutting down".to_owned(),
        }
    }
}

/// The running election: its state and how to ask it to step down.
pub struct LeadershipHandle {
    pub state: watch::Receiver<LeadershipState>,
    pub step_down: mpsc::UnboundedSender<StepDown>,
    /// Shared with the store: the current deadline (for the check after every write).
    pub deadline: SharedDeadline,
}

/// The leader's deadline, shared between the keep-alive task, the election loop and
/// the store (which refuses to report a write as done once it is past).
#[derive(Debug, Clone)]
pub struct SharedDeadline(Arc<Mutex<LeaseDeadline>>);

impl SharedDeadline {
    /// Not valid until renewed.
    pub fn new(margin: Duration) -> Self {
        SharedDeadline(Arc::new(Mutex::new(LeaseDeadline::new(margin))))
    }
    /// A keep-alive sent at `sent_at` was answered with `ttl` (the election task does
    /// this; tests too).
    pub fn renewed(&self, sent_at: Instant, ttl: Duration) {
        self.with(|d| d.renewed(sent_at, ttl));
    }
    fn with<T>(&self, f: impl FnOnce(&mut LeaseDeadline) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
    /// Whether the lease may still be acted on now.
    pub fn valid_now(&self) -> bool {
        self.with(|d| d.valid_at(Instant::now()))
    }
    /// The instant acting stops.
    pub fn until(&self) -> Option<Instant> {
        self.with(|d| d.until())
    }
}

/// etcd 3.4 looks for expired leases every 500 ms: a lease goes at most this long after
/// its TTL.
const LESSOR_SLACK: Duration = Duration::from_millis(500);

/// Starts the election task.
pub fn start(settings: EtcdSettings) -> LeadershipHandle {
    let (tx, rx) = watch::channel(LeadershipState::initial());
    let (step_tx, step_rx) = mpsc::unbounded_channel();
    let deadline = SharedDeadline::new(settings.stop_margin);
    tokio::spawn(run(settings, tx, step_rx, deadline.clone()));
    LeadershipHandle {
        state: rx,
        step_down: step_tx,
        deadline,
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a controller's connections start: spread over the members by id.
fn start_index(id: &str) -> usize {
    id.bytes().map(usize::from).sum()
}

async fn run(
    s: EtcdSettings,
    tx: watch::Sender<LeadershipState>,
    mut step_rx: mpsc::UnboundedReceiver<StepDown>,
    deadline: SharedDeadline,
) {
    let started_unix_ms = unix_ms();
    let started = Instant::now();
    let leader_key = format!("{}leader", s.prefix);
    let member_key = format!("{}members/{}", s.prefix, s.controller_id);
    let mut conn = EtcdConn::new(
        s.endpoints.clone(),
        s.call_timeout,
        start_index(&s.controller_id),
    );
    let mut backoff = s.campaign_every;
    loop {
        // A lease for this campaign.
        let sent = Instant::now();
        let (lease, ttl) = match conn.lease_grant(s.lease_ttl.as_secs() as i64).await {
            Ok(r) => (r.id(), Duration::from_secs(r.ttl().max(0) as u64)),
            Err(e) => {
                set_problem(&tx, format!("cannot reach etcd to get a lease: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = s.campaign_every;
        if ttl > s.lease_ttl {
            tracing::warn!(
                asked_s = s.lease_ttl.as_secs(),
                granted_s = ttl.as_secs(),
                "etcd granted a longer lease than configured (its minimum is 1.5 × its \
                 election timeout): a takeover after a leader loss takes that long"
            );
        }
        deadline.with(|d| {
            d.lost();
            d.renewed(sent, ttl);
        });
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let last_error: Arc<Mutex<Option<String>>> = Arc::default();
        let keeper = tokio::spawn(keep_alive(
            EtcdConn::new(
                s.endpoints.clone(),
                s.call_timeout,
                start_index(&s.controller_id) + 1,
            ),
            lease,
            ttl,
            deadline.clone(),
            gone.clone(),
            last_error.clone(),
        ));
        let member = MemberRecord {
            id: s.controller_id.clone(),
            api: s.advertise_api.clone(),
            started_unix_ms,
        };
        let member_json = serde_json::to_string(&member).unwrap_or_default();
        let mut member_written = false;
        let mut members_read_at: Option<Instant> = None;
        let mut leading: Option<(Guard, u64)> = None;
        // A term that stopped at its deadline, and when: it may resume on the same lease.
        let mut lapsed: Option<((Guard, u64), Instant)> = None;
        let mut pending_step: Option<StepDown> = None;
        // Sleeps `d`, or leaves the campaign loop on a step-down request.
        macro_rules! wait_or_step {
            ($d:expr) => {
                tokio::select! {
                    _ = tokio::time::sleep($d) => {}
                    step = step_rx.recv() => {
                        let step = step.unwrap_or(StepDown::Retire);
                        pending_step = Some(step.clone());
                        break step.reason();
                    }
                }
            };
        }
        // Campaign and hold, until the lease is gone or a step-down is asked.
        let end_reason = loop {
            if let Ok(step) = step_rx.try_recv() {
                pending_step = Some(step.clone());
                break step.reason();
            }
            let now = Instant::now();
            if gone.load(std::sync::atomic::Ordering::SeqCst) {
                break "etcd says the lease is gone".to_owned();
            }
            if !deadline.valid_now() {
                let err = last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| "no answer".into());
                let why = format!(
                    "the lease was not renewed in time (the local deadline, TTL {} s minus \
                     {} ms, passed; last etcd error: {err})",
                    ttl.as_secs(),
                    s.stop_margin.as_millis()
                );
                // Stop acting now. The lease may still live on etcd's side (an etcd
                // leader election renews every lease): keep it alive, and if it comes
                // back before etcd could have expired it, lead again on it.
                if let Some(held) = leading.take() {
                    tracing::warn!(controller = %s.controller_id, reason = %why, "LEADERSHIP LOST: this controller stopped acting");
                    tx.send_modify(|st| {
                        st.role = Role::Follower {
                            leader: None,
                            problem: Some(why.clone()),
                        };
                        st.last_step_down = Some(why.clone());
                    });
                    lapsed = Some((held, now));
                }
                match &lapsed {
                    // etcd expires a lease at most TTL + 0.5 s after its last renewal.
                    Some((_, since)) if now.duration_since(*since) < ttl + LESSOR_SLACK => {
                        wait_or_step!(s.campaign_every);
                        continue;
                    }
                    _ => break why,
                }
            }
            if let Some(((guard, since), _)) = lapsed.take() {
                // Renewed again after a lapse: lead again only if the leader key is
                // still this term's (its lease outlived the lapse).
                let key = conn.get(&leader_key).await;
                match key {
                    Ok(Some(kv)) if kv.create_revision() == guard.create_revision => {
                        tracing::info!(
                            controller = %s.controller_id,
                            revision = guard.create_revision,
                            "LEADER: this controller leads again (its lease outlived etcd's unavailability)"
                        );
                        begin_term(&tx, &guard, since, deadline.until().unwrap_or(now));
                        leading = Some((guard, since));
                    }
                    Ok(_) => break "the leader key is gone after a lapse".to_owned(),
                    Err(e) => {
                        lapsed = Some(((guard, since), now));
                        set_problem(&tx, format!("cannot read the leader key: {e}"));
                        wait_or_step!(s.campaign_every);
                        continue;
                    }
                }
            }
            if !member_written {
                let put = Txn::new().and_then(vec![TxnOp::put(
                    member_key.as_str(),
                    member_json.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
                member_written = conn.txn(put).await.is_ok();
            }
            match &leading {
                Some((guard, since)) => {
                    let until = deadline.until().unwrap_or(now);
                    let role = Role::Leader {
                        guard: guard.clone(),
                        since_unix_ms: *since,
                        until,
                    };
                    publish_role(&tx, role);
                }
                // Warming up: a controller that has just started (a restart right
                // after a crash, the usual way a killed leader comes back) has heard
                // the hosts for less than a TTL; a follower that has heard them all
                // along should take over first. It only reads who leads.
                None if started.elapsed() < s.lease_ttl => match conn.get(&leader_key).await {
                    Ok(kv) => {
                        let role = Role::Follower {
                            leader: kv.and_then(|kv| serde_json::from_slice(kv.value()).ok()),
                            problem: None,
                        };
                        publish_role(&tx, role);
                    }
                    Err(e) => set_problem(&tx, format!("cannot read who leads: {e}")),
                },
                None => match campaign(&mut conn, &leader_key, lease, &s).await {
                    Ok(Campaign::Won(guard, since)) => {
                        tracing::info!(
                            controller = %s.controller_id,
                            lease = format!("{lease:x}"),
                            revision = guard.create_revision,
                            "LEADER: this controller leads"
                        );
                        begin_term(&tx, &guard, since, deadline.until().unwrap_or(now));
                        leading = Some((guard, since));
                    }
                    Ok(Campaign::Lost(leader)) => {
                        let role = Role::Follower {
                            leader,
                            problem: None,
                        };
                        publish_role(&tx, role);
                    }
                    Err(e) => set_problem(&tx, format!("cannot campaign: {e}")),
                },
            }
            if members_read_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                members_read_at = Some(now);
                if let Ok(kvs) = conn.get_prefix(&format!("{}members/", s.prefix)).await {
                    let mut members: Vec<MemberRecord> = kvs
                        .iter()
                        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                        .collect();
                    members.sort_by(|a, b| a.id.cmp(&b.id));
                    tx.send_if_modified(|st| {
                        if st.members != members {
                            st.members = members;
                            true
                        } else {
                            false
                        }
                    });
                }
            }
            // Wake for the next campaign round, or just as the deadline passes.
            let next = Instant::now() + s.campaign_every;
            let wake = deadline.until().map_or(next, |u| u.min(next));
            wait_or_step!(wake.saturating_duration_since(Instant::now()));
        };
        // The term (if any) ends here: nothing may act on this lease any more.
        keeper.abort();
        deadline.with(LeaseDeadline::lost);
        let was_leading = leading.is_some();
        if was_leading {
            tracing::warn!(controller = %s.controller_id, reason = %end_reason, "LEADERSHIP LOST: this controller stopped acting");
        }
        let was_leading = was_leading || lapsed.is_some();
        tx.send_modify(|st| {
            st.role = Role::Follower {
                leader: None,
                problem: Some(end_reason.clone()),
            };
            if was_leading {
                st.last_step_down = Some(end_reason.clone());
            }
        });
        // Revoke so a follower need not wait for the TTL; if etcd does not answer, the
        // lease expires by itself.
        if let Err(e) = conn.lease_revoke(lease).await {
            tracing::debug!(error = %e, "revoking the old lease failed; it expires by itself");
        }
        match pending_step {
            Some(StepDown::Retire) => return,
            Some(StepDown::Restart(_)) => tokio::time::sleep(ttl).await,
            None => {}
        }
    }
}

/// Keeps `lease` alive every third of its TTL, moving the deadline on each answer.
async fn keep_alive(
    mut conn: EtcdConn,
    lease: i64,
    ttl: Duration,
    deadline: SharedDeadline,
    gone: Arc<std::sync::atomic::AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let mut next = Instant::now() + every;
    loop {
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        match conn.keep_alive_once(lease).await {
            Ok(remaining) if remaining > 0 => {
                deadline.with(|d| d.renewed(sent, Duration::from_secs(remaining as u64)));
                next = sent + every;
            }
            Ok(_) => {
                gone.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "keep-alive failed; trying the next member");
                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                // Try again soon, on the next member.
                next = Instant::now() + Duration::from_millis(50);
            }
        }
    }
}

/// One campaign round's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Campaign {
    /// This controller holds the leader key: the guard, and since when it leads.
    Won(Guard, u64),
    /// Another controller holds it (who, if its record reads).
    Lost(Option<LeaderRecord>),
}

/// One round: create the leader key if absent, bound to `lease`; else read who leads.
pub async fn campaign(
    conn: &mut EtcdConn,
    leader_key: &str,
    lease: i64,
    s: &EtcdSettings,
) -> Result<Campaign, EtcdError> {
    let since = unix_ms();
    let record = LeaderRecord {
        id: s.controller_id.clone(),
        api: s.advertise_api.clone(),
        since_unix_ms: since,
    };
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            leader_key,
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(
            leader_key,
            serde_json::to_string(&record).unwrap_or_default(),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else(vec![TxnOp::get(leader_key, None)]);
    let r = conn.txn(txn).await?;
    if r.succeeded() {
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        return Ok(Campaign::Won(
            Guard {
                leader_key: leader_key.to_owned(),
                create_revision: revision,
                lease,
            },
            since,
        ));
    }
    let held = r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    });
    let leader = held
        .as_ref()
        .and_then(|kv| serde_json::from_slice::<LeaderRecord>(kv.value()).ok());
    // The key on our own lease: an earlier round's put took effect although its answer
    // was lost (a timeout is an unknown outcome). The key is ours; not claiming it
    // would leave nobody leading for as long as this controller keeps its lease alive.
    if let (Some(kv), Some(record)) = (&held, &leader) {
        if kv.lease() == lease {
            return Ok(Campaign::Won(
                Guard {
                    leader_key: leader_key.to_owned(),
                    create_revision: kv.create_revision(),
                    lease,
                },
                record.since_unix_ms,
            ));
        }
    }
    Ok(Campaign::Lost(leader))
}

/// A new term: this controller leads under `guard` until `until` (its deadline now).
fn begin_term(tx: &watch::Sender<LeadershipState>, guard: &Guard, since: u64, until: Instant) {
    tx.send_modify(|st| {
        st.term += 1;
        st.role = Role::Leader {
            guard: guard.clone(),
            since_unix_ms: since,
            until,
        };
    });
}

/// Publishes `role` if it changed.
fn publish_role(tx: &watch::Sender<LeadershipState>, role: Role) {
    tx.send_if_modified(|st| {
        if st.role != role {
            st.role = role;
            true
        } else {
            false
        }
    });
}

fn set_problem(tx: &watch::Sender<LeadershipState>, problem: String) {
    tracing::warn!(%problem, "leadership");
    tx.send_if_modified(|st| match &mut st.role {
        Role::Follower { problem: p, leader } => {
            if p.as_deref() != Some(problem.as_str()) {
                *p = Some(problem);
                *leader = None;
                true
            } else {
                false
            }
        }
        // A leader's trouble shows as its deadline passing, not here.
        Role::Leader { .. } => false,
    });
}
