//! [`MemoryStore`]: the [`Store`] in process memory, for tests and simulation. Nothing
//! survives the process; it never fails.

use std::collections::BTreeMap;

use super::{Store, StoreResult};
use crate::engine::{Completion, IncidentId, IntentEntry, IntentKey, IntentRecord, TimelineEntry};

/// An in-memory [`Store`]. Behaves like [`SqliteStore`](super::SqliteStore), without
/// durability.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    intents: Vec<IntentEntry>,
    index: BTreeMap<IntentKey, usize>,
    timelines: BTreeMap<IncidentId, Vec<TimelineEntry>>,
    high_water: BTreeMap<String, u64>,
    /// (host, id) → (received at, payload).
    events: BTreeMap<(String, u64), (u64, String)>,
    meta: BTreeMap<String, String>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A stored event's payload, if still kept.
    pub fn event_payload(&self, host: &str, event_id: u64) -> Option<&str> {
        self.events
            .get(&(host.to_owned(), event_id))
            .map(|(_, p)| p.as_str())
    }
}

impl Store for MemoryStore {
    fn record_intent(&mut self, record: &IntentRecord) -> StoreResult<bool> {
        if self.index.contains_key(&record.key) {
            return Ok(false);
        }
        self.index.insert(record.key.clone(), self.intents.len());
        self.intents.push(IntentEntry {
            record: record.clone(),
            done: None,
        });
        Ok(true)
    }

    fn complete_intent(&mut self, key: &IntentKey, completion: &Completion) -> StoreResult<()> {
        if let Some(&i) = self.index.get(key) {
            let e = &mut self.intents[i];
            if e.done.is_none() {
                e.done = Some(completion.clone());
            }
        }
        Ok(())
    }

    fn intents(&self) -> StoreResult<Vec<IntentEntry>> {
        Ok(self.intents.clone())
    }

    fn append_timeline(&mut self, incident: IncidentId, entry: &TimelineEntry) -> StoreResult<()> {
        self.timelines
            .entry(incident)
            .or_default()
            .push(entry.clone());
        Ok(())
    }

    fn timeline(&self, incident: IncidentId) -> StoreResult<Vec<TimelineEntry>> {
        Ok(self.timelines.get(&incident).cloned().unwrap_or_default())
    }

    fn incidents_with_timelines(&self) -> StoreResult<Vec<(IncidentId, Vec<TimelineEntry>)>> {
        Ok(self
            .timelines
            .iter()
            .map(|(id, t)| (*id, t.clone()))
            .collect())
    }

    fn record_event(
        &mut self,
        host: &str,
        event_id: u64,
        received_unix_ms: u64,
        payload_json: &str,
    ) -> StoreResult<bool> {
        let mark = self.high_water.get(host).copied().unwrap_or(0);
        if event_id <= mark {
            return Ok(false);
        }
        self.high_water.insert(host.to_owned(), event_id);
        self.events.insert(
            (host.to_owned(), event_id),
            (received_unix_ms, payload_json.to_owned()),
        );
        Ok(true)
    }

    fn event_high_water(&self, host: &str) -> StoreResult<u64> {
        Ok(self.high_water.get(host).copied().unwrap_or(0))
    }

    fn event_high_waters(&self) -> StoreResult<Vec<(String, u64)>> {
        Ok(self
            .high_water
            .iter()
            .map(|(h, m)| (h.clone(), *m))
            .collect())
    }

    fn events_of_kind(&self, kind: &str) -> StoreResult<Vec<(String, String)>> {
        let mut out: Vec<(u64, &str, u64, &str)> = self
            .events
            .iter()
            .filter(|(_, (_, p))| {
                serde_json::from_str::<serde_json::Value>(p)
                    .ok()
                    .is_some_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some(kind))
            })
            .map(|((h, id), (at, p))| (*at, h.as_str(), *id, p.as_str()))
            .collect();
        out.sort();
        Ok(out
            .into_iter()
            .map(|(_, h, _, p)| (h.to_owned(), p.to_owned()))
            .collect())
    }

    fn prune_events(&mut self, before_unix_ms: u64) -> StoreResult<u64> {
        let before = self.events.len();
        self.events.retain(|_, (at, _)| *at >= before_unix_ms);
        Ok((before - self.events.len()) as u64)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> StoreResult<()> {
        self.meta.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self.meta.get(key).cloned())
    }

    fn flush(&mut self) -> StoreResult<()> {
        Ok(())
    }
}
