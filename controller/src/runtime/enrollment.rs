//! The enrolled hosts: which host ids the controller takes heartbeats and event streams
//! from. Kept in the store (meta key [`ENROLLED_KEY`], a JSON array of host ids) so that
//! every controller of a cluster shares them, changed by `defibctl hosts enroll|revoke`
//! through the leader's API, and applied to the intake through a `watch` channel.
use std::sync::Arc;

use tokio::sync::watch;

use super::intake::HeartbeatIntake;
use crate::store::{Store, StoreError, StoreResult};

/// The store's meta key holding the enrolled host ids.
pub const ENROLLED_KEY: &str = "enrolled_hosts";

/// The enrolled host ids, sorted, as the store holds them (none: an empty list).
pub fn read(store: &dyn Store) -> StoreResult<Vec<String>> {
    match store.get_meta(ENROLLED_KEY)? {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(&text).map_err(|e| {
            StoreError::Corrupt(format!(
                "meta {ENROLLED_KEY} is not a list of host ids: {e}"
            ))
        }),
    }
}

/// Adds (`enroll`) or removes `host`; returns the new list and whether it changed. The
/// write is the store's own (guarded by the lease with several controllers).
pub fn change(store: &mut dyn Store, host: &str, enroll: bool) -> StoreResult<(Vec<String>, bool)> {
    let mut hosts = read(store)?;
    let present = hosts.iter().any(|h| h == host);
    let changed = match (enroll, present) {
        (true, false) => {
            hosts.push(host.to_owned());
            hosts.sort();
            true
        }
        (false, true) => {
            hosts.retain(|h| h != host);
            true
        }
        _ => false,
    };
    if changed {
        let text = serde_json::to_string(&hosts).unwrap_or_else(|_| "[]".into());
        store.set_meta(ENROLLED_KEY, &text)?;
    }
    Ok((hosts, changed))
}

/// The hosts enrolled in the store and those the configuration enrolls, sorted, once each.
pub fn union(stored: &[String], configured: &[String]) -> Vec<String> {
    let mut all: Vec<String> = stored.iter().chain(configured).cloned().collect();
    all.sort();
    all.dedup();
    all
}

/// Applies every change of the enrolled list (with the `configured` hosts) to the
/// heartbeat intake (and through it to the event streams, which look keys up there),
/// until the sender is gone.
pub async fn apply(
    mut rx: watch::Receiver<Vec<String>>,
    configured: Vec<String>,
    intake: Arc<HeartbeatIntake>,
) {
    loop {
        let hosts = union(&rx.borrow_and_update(), &configured);
        intake.set_enrolled(&hosts);
        tracing::info!(hosts = hosts.len(), "enrolled hosts applied");
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What the engine task needs to enroll and revoke: the master key (to hand an enrolled
/// host its key) and where the new list goes.
pub struct Enrollment {
    pub master: protocol::MasterKey,
    pub tx: watch::Sender<Vec<String>>,
    /// `intake.enrolled_hosts`: not revocable through the API.
    pub configured: Vec<String>,
}

/// The answer to an enrollment: the host's key file contents (for `enroll`).
pub type EnrollAnswer = Result<Option<String>, String>;

impl Enrollment {
    /// Enrolls (`enroll`) or revokes `host` in `store` and applies the new list; an
    /// enrollment answers with the host's key file contents.
    pub fn change(&self, store: &mut dyn Store, host: &str, enroll: bool) -> EnrollAnswer {
        protocol::check_host_id(host).map_err(|e| format!("host id {host:?}: {e}"))?;
        if !enroll && self.configured.iter().any(|h| h == host) {
            return Err(format!(
                "{host} is enrolled by the configuration (intake.enrolled_hosts): remove it there"
            ));
        }
        let (hosts, changed) =
            change(store, host, enroll).map_err(|e| format!("the store refused: {e}"))?;
        if changed {
            tracing::warn!(
                host,
                enrolled = enroll,
                "host enrollment changed by an operator"
            );
        }
        self.tx.send_replace(hosts);
        Ok(enroll.then(|| self.master.host_key_text(host)))
    }
}
