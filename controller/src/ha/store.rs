//! [`EtcdStore`]: the [`Store`] on etcd, for several controllers. Every write is one
//! transaction guarded by the leader key's create revision (the fencing token), so a
//! write from a deposed leader fails and its action is never carried out.
//!
//! # Keys (under the cluster's prefix, e.g. `/defib/<cluster>/`)
//!
//! | key | value |
//! |---|---|
//! | `intents/<intent key>` | the `IntentRecord` (JSON); recording order = create revision |
//! | `done/<intent key>` | its `Completion` (JSON), created once |
//! | `timeline/<incident, 20 digits>/<lease hex>-<n>` | a `TimelineEntry` (JSON) |
//! | `events/hw/<host>` | the host's event high-water mark |
//! | `events/data/<host>/<id, 20 digits>` | `{received_unix_ms, payload}` |
//! | `meta/<name>` | a small value |
//!
//! # Writes
//!
//! Each write is `If(create_revision(leader) == guard) Then(...)`, plus the write's own
//! condition (an intent is created only if absent...). A call that gets no answer is
//! tried again on the next member while the lease is valid: one etcd member lost changes
//! nothing. A retried write that finds its own value already there (the first try
//! landed, its answer was lost) counts as done. After every write that succeeded the
//! leader's local deadline is looked at: a write that landed after it is reported as
//! failed, so its action is not carried out (the next leader resumes the intent).
//!
//! # Sync over async
//!
//! The [`Store`] trait is synchronous (the engine task carries actions out in order and
//! must not act before a write returns). The store owns a small runtime thread that
//! runs the etcd calls; each method waits for its call's answer.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::conn::{EtcdConn, EtcdError};
use super::leadership::{Guard, SharedDeadline};
use crate::engine::{Completion, IncidentId, IntentEntry, IntentKey, IntentRecord, TimelineEntry};
use crate::store::{Store, StoreError, StoreResult};

/// An event's stored value.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEvent {
    received_unix_ms: u64,
    payload: String,
}

/// The store on etcd. Built with a [`Guard`] by a leader (it may write), without one by
/// a follower (reads only: every write is refused).
pub struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    conn: Arc<Mutex<EtcdConn>>,
    attempts: usize,
    prefix: String,
    guard: Option<Guard>,
    deadline: Option<SharedDeadline>,
    /// Unique per term: timeline keys never collide across leaders.
    writer_tag: String,
    next_line: u64,
}

impl EtcdStore {
    /// A store under `prefix` (ends with `/`). `guard` and `deadline` come from the
    /// leadership of the term that writes; a follower passes `None`.
    pub fn open(
        endpoints: Vec<String>,
        call_timeout: Duration,
        prefix: String,
        guard: Option<Guard>,
        deadline: Option<SharedDeadline>,
    ) -> StoreResult<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd(format!("cannot start the store's runtime: {e}")))?;
        let attempts = endpoints.len().max(1);
        let writer_tag = guard
            .as_ref()
            .map_or_else(|| "ro".to_owned(), |g| format!("{:016x}", g.lease));
        Ok(EtcdStore {
            rt: Some(rt),
            conn: Arc::new(Mutex::new(EtcdConn::new(endpoints, call_timeout, 0))),
            attempts,
            prefix,
            guard,
            deadline,
            writer_tag,
            next_line: 0,
        })
    }

    /// Runs `fut` on the store's runtime and waits for it.
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> StoreResult<T> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| StoreError::Etcd("the store is closed".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Etcd("the store's runtime stopped".into()))
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Every key under `rest`, in creation order (a read: any controller may).
    fn read_prefix(&self, rest: &str) -> StoreResult<Vec<KeyValue>> {
        let (conn, prefix, attempts) = (self.conn.clone(), self.key(rest), self.attempts);
        let mut kvs = self
            .block(async move {
                let mut conn = conn.lock().await;
                let mut last = None;
                for _ in 0..attempts {
                    match conn.get_prefix(&prefix).await {
                        Ok(kvs) => return Ok(kvs),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.expect("at least one attempt"))
            })?
            .map_err(etcd)?;
        kvs.sort_by_key(KeyValue::create_revision);
        Ok(kvs)
    }

    fn read_one(&self, rest: &str) -> StoreResult<Option<KeyValue>> {
        let (conn, key, attempts) = (self.conn.clone(), self.key(rest), self.attempts);
        self.block(async move {
            let mut conn = conn.lock().await;
            let mut last = None;
            for _ in 0..attempts {
                match conn.get(&key).await {
                    Ok(kv) => return Ok(kv),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("at least one attempt"))
        })?
        .map_err(etcd)
    }

    /// One guarded transaction: `extra` conditions besides the guard, `then` if they
    /// all hold. Tried on the next member when a call fails, while the lease is valid.
    /// `Ok(Some(answers))`: the guard held; `answers` are the `then` answers if
    /// `succeeded`, else the answers of `[get leader, get each key in look]`.
    fn guarded(
        &mut self,
        what: &str,
        extra: Vec<Compare>,
        then: Vec<TxnOp>,
        look: Vec<String>,
    ) -> StoreResult<Guarded> {
        let guard = self.guard.clone().ok_or_else(|| {
            StoreError::NotLeader(format!(
                "{what}: this controller does not lead (a follower's store is read-only)"
            ))
        })?;
        let deadline = self.deadline.clone();
        let (conn, attempts) = (self.conn.clone(), self.attempts);
        let result = self.block(async move {
            let mut conn = conn.lock().await;
            let mut last = None;
            for attempt in 0..attempts {
                if deadline.as_ref().is_some_and(|d| !d.valid_now()) {
                    break;
                }
                let mut when = vec![Compare::create_revision(
                    guard.leader_key.as_str(),
                    CompareOp::Equal,
                    guard.create_revision,
                )];
                when.extend(extra.iter().cloned());
                let mut otherwise = vec![TxnOp::get(guard.leader_key.as_str(), None)];
                otherwise.extend(look.iter().map(|k| TxnOp::get(k.as_str(), None)));
                let txn = Txn::new()
                    .when(when)
                    .and_then(then.clone())
                    .or_else(otherwise);
                match conn.txn(txn).await {
                    Ok(r) => return Ok((attempt, r)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last)
        })?;
        let (attempt, r) = match result {
            Ok(x) => x,
            Err(Some(e)) => return Err(etcd(e)),
            Err(None) => {
                return Err(StoreError::NotLeader(format!(
                    "{what} not written: the leader's local deadline passed"
                )))
            }
        };
        let answers = r.op_responses();
        if !r.succeeded() {
            // Who holds the leader key now?
            let leader_rev = match answers.first() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map(KeyValue::create_revision),
                _ => None,
            };
            let guard = self.guard.as_ref().expect("checked above");
            if leader_rev != Some(guard.create_revision) {
                return Err(StoreError::NotLeader(format!(
                    "{what} refused by etcd: the leader key (revision {}) is no longer this \
                     controller's (its term began at revision {}); another controller leads",
                    leader_rev.map_or("none".into(), |r| r.to_string()),
                    guard.create_revision
                )));
            }
            let looked = answers
                .into_iter()
                .skip(1)
                .map(|a| match a {
                    TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                    _ => None,
                })
                .collect();
            return Ok(Guarded::Declined {
                looked,
                retried: attempt > 0,
            });
        }
        if let Some(d) = &self.deadline {
            if !d.valid_now() {
                return Err(StoreError::NotLeader(format!(
                    "{what} landed after the leader's local deadline; its action is not \
                     carried out (the next leader resumes it)"
                )));
            }
        }
        Ok(Guarded::Done)
    }

    fn decode<T: DeserializeOwned>(kv: &KeyValue, what: &'static str) -> StoreResult<T> {
        serde_json::from_slice(kv.value()).map_err(|source| StoreError::Json {
            op: "decode",
            what,
            source,
        })
    }
}

enum Guarded {
    Done,
    /// The guard held, the write's own condition did not: what the looked-up keys hold.
    Declined {
        looked: Vec<Option<KeyValue>>,
        retried: bool,
    },
}

fn etcd(e: EtcdError) -> StoreError {
    StoreError::Etcd(e.to_string())
}

fn encode<T: Serialize>(v: &T, what: &'static str) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|source| StoreError::Json {
        op: "encode",
        what,
        source,
    })
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    fn record_intent(&mut self, record: &IntentRecord) -> StoreResult<bool> {
        let key = self.key(&format!("intents/{}", record.key));
        let value = encode(record, "intent record")?;
        match self.guarded(
            &format!("intent {}", record.key),
            vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)],
            vec![TxnOp::put(key.as_str(), value.as_str(), None)],
            vec![key.clone()],
        )? {
            Guarded::Done => Ok(true),
            // A retry that finds exactly what it wrote: the first try landed.
            Guarded::Declined { looked, retried } => Ok(retried
                && looked
                    .first()
                    .and_then(Option::as_ref)
                    .is_some_and(|kv| kv.value() == value.as_bytes())),
        }
    }

    fn complete_intent(&mut self, key: &IntentKey, completion: &Completion) -> StoreResult<()> {
        let intent = self.key(&format!("intents/{key}"));
        let done = self.key(&format!("done/{key}"));
        let value = encode(completion, "completion")?;
        // Only a recorded intent is completed, and only once (the first stays).
        self.guarded(
            &format!("completion of intent {key}"),
            vec![
                Compare::version(intent.as_str(), CompareOp::Greater, 0),
                Compare::create_revision(done.as_str(), CompareOp::Equal, 0),
            ],
            vec![TxnOp::put(done.as_str(), value.as_str(), None)],
            vec![],
        )?;
        Ok(())
    }

    fn intents(&self) -> StoreResult<Vec<IntentEntry>> {
        let mut done: BTreeMap<Vec<u8>, Completion> = BTreeMap::new();
        let done_prefix = self.key("done/");
        for kv in self.read_prefix("done/")? {
            let k = kv.key()[done_prefix.len()..].to_vec();
            done.insert(k, Self::decode(&kv, "completion")?);
        }
        let intent_prefix = self.key("intents/");
        self.read_prefix("intents/")?
            .iter()
            .map(|kv| {
                let record: IntentRecord = Self::decode(kv, "intent record")?;
                let done = done.remove(&kv.key()[intent_prefix.len()..]);
                Ok(IntentEntry { record, done })
            })
            .collect()
    }

    fn append_timeline(&mut self, incident: IncidentId, entry: &TimelineEntry) -> StoreResult<()> {
        self.next_line += 1;
        let key = self.key(&format!(
            "timeline/{:020}/{}-{:012}",
            incident.0, self.writer_tag, self.next_line
        ));
        let value = encode(entry, "timeline entry")?;
        // A plain put: a retry writes the same key with the same value.
        self.guarded(
            &format!("timeline line of incident {}", incident.0),
            vec![],
            vec![TxnOp::put(key.as_str(), value.as_str(), None)],
            vec![],
        )?;
        Ok(())
    }

    fn timeline(&self, incident: IncidentId) -> StoreResult<Vec<TimelineEntry>> {
        self.read_prefix(&format!("timeline/{:020}/", incident.0))?
            .iter()
            .map(|kv| Self::decode(kv, "timeline entry"))
            .collect()
    }

    fn incidents_with_timelines(&self) -> StoreResult<Vec<(IncidentId, Vec<TimelineEntry>)>> {
        let prefix = self.key("timeline/");
        let mut by: BTreeMap<u64, Vec<TimelineEntry>> = BTreeMap::new();
        for kv in self.read_prefix("timeline/")? {
            let rest = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            let id = rest
                .split('/')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("timeline key {rest}")))?;
            by.entry(id)
                .or_default()
                .push(Self::decode(&kv, "timeline entry")?);
        }
        Ok(by.into_iter().map(|(i, t)| (IncidentId(i), t)).collect())
    }

    fn record_event(
        &mut self,
        host: &str,
        event_id: u64,
        received_unix_ms: u64,
        payload_json: &str,
    ) -> StoreResult<bool> {
        let hw_key = self.key(&format!("events/hw/{host}"));
        let data_key = self.key(&format!("events/data/{host}/{event_id:020}"));
        let value = encode(
            &StoredEvent {
                received_unix_ms,
                payload: payload_json.to_owned(),
            },
            "event",
        )?;
        for _ in 0..2 {
            let hw = self.read_one(&format!("events/hw/{host}"))?;
            let (mark, rev) = match &hw {
                Some(kv) => (
                    String::from_utf8_lossy(kv.value())
                        .parse::<u64>()
                        .unwrap_or(0),
                    kv.mod_revision(),
                ),
                None => (0, 0),
            };
            if event_id <= mark {
                return Ok(false);
            }
            match self.guarded(
                &format!("event {event_id} of {host}"),
                vec![Compare::mod_revision(
                    hw_key.as_str(),
                    CompareOp::Equal,
                    rev,
                )],
                vec![
                    TxnOp::put(hw_key.as_str(), event_id.to_string(), None),
                    TxnOp::put(data_key.as_str(), value.as_str(), None),
                ],
                vec![hw_key.clone()],
            )? {
                Guarded::Done => return Ok(true),
                Guarded::Declined { looked, retried } => {
                    // Our own first try landed (its answer lost).
                    let now = looked.first().and_then(Option::as_ref).map(|kv| {
                        String::from_utf8_lossy(kv.value())
                            .parse::<u64>()
                            .unwrap_or(0)
                    });
                    if retried && now == Some(event_id) {
                        return Ok(true);
                    }
                }
            }
        }
        Err(StoreError::Corrupt(format!(
            "the high-water mark of {host} moved under this leader twice"
        )))
    }

    fn event_high_water(&self, host: &str) -> StoreResult<u64> {
        Ok(self
            .read_one(&format!("events/hw/{host}"))?
            .map_or(0, |kv| {
                String::from_utf8_lossy(kv.value()).parse().unwrap_or(0)
            }))
    }

    fn event_high_waters(&self) -> StoreResult<Vec<(String, u64)>> {
        let prefix = self.key("events/hw/");
        let mut out: Vec<(String, u64)> = self
            .read_prefix("events/hw/")?
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned(),
                    String::from_utf8_lossy(kv.value()).parse().unwrap_or(0),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn prune_events(&mut self, before_unix_ms: u64) -> StoreResult<u64> {
        let old: Vec<String> = self
            .read_prefix("events/data/")?
            .iter()
            .filter(|kv| {
                Self::decode::<StoredEvent>(kv, "event")
                    .is_ok_and(|e| e.received_unix_ms < before_unix_ms)
            })
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        // etcd takes at most 128 operations per transaction.
        for chunk in old.chunks(100) {
            self.guarded(
                "pruning old events",
                vec![],
                chunk
                    .iter()
                    .map(|k| TxnOp::delete(k.as_str(), None))
                    .collect(),
                vec![],
            )?;
        }
        Ok(old.len() as u64)
    }

    fn events_of_kind(&self, kind: &str) -> StoreResult<Vec<(String, String)>> {
        let prefix = self.key("events/data/");
        let mut out = Vec::new();
        for kv in self.read_prefix("events/data/")? {
            let e: StoredEvent = Self::decode(&kv, "event")?;
            let is_kind = serde_json::from_str::<serde_json::Value>(&e.payload)
                .ok()
                .is_some_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some(kind));
            if is_kind {
                let rest = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                let host = rest
                    .rsplit_once('/')
                    .map_or(rest.as_str(), |(h, _)| h)
                    .to_owned();
                out.push((e.received_unix_ms, host, e.payload));
            }
        }
        out.sort_by_key(|e| e.0);
        Ok(out.into_iter().map(|(_, h, p)| (h, p)).collect())
    }

    fn set_meta(&mut self, key: &str, value: &str) -> StoreResult<()> {
        let k = self.key(&format!("meta/{key}"));
        self.guarded(
            &format!("meta {key}"),
            vec![],
            vec![TxnOp::put(k.as_str(), value, None)],
            vec![],
        )?;
        Ok(())
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self
            .read_one(&format!("meta/{key}"))?
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    fn flush(&mut self) -> StoreResult<()> {
        // Every write is committed by etcd's quorum before it returns.
        Ok(())
    }
}
