//! The engine's hosts, published to the edges as typed facts ([`HostFacts`]) after the
//! engine task's steps: an edge reads states and returns from here, never from the
//! API's display strings, and never decides with them what the engine decides.
use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::edges::HostFacts;
use crate::engine::{HostId, HostView};

/// The sending side of [`HostFacts`], owned by the engine task.
pub struct HostFactsPublisher {
    tx: watch::Sender<Arc<BTreeMap<HostId, HostView>>>,
}

impl HostFactsPublisher {
    /// A publisher with no host yet, and the receiver the edges clone.
    pub fn new() -> (Self, HostFacts) {
        let (tx, rx) = watch::channel(Arc::default());
        (HostFactsPublisher { tx }, rx)
    }

    /// Publishes `hosts` if they differ from what was published last, so that edges
    /// waiting on a change wake only for one. The last heartbeat's time is left out: it
    /// moves ten times a second, and liveness is the engine's to judge (`back`, states).
    pub fn publish(&self, hosts: Vec<HostView>) {
        let next: BTreeMap<HostId, HostView> = hosts
            .into_iter()
            .map(|h| {
                let fact = HostView {
                    last_seen: None,
                    ..h
                };
                (fact.host.clone(), fact)
            })
            .collect();
        self.tx.send_if_modified(|current| {
            if **current == next {
                return false;
            }
            *current = Arc::new(next);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::HostState;

    fn view(host: &str, state: HostState) -> HostView {
        HostView {
            host: HostId::new(host),
            state,
            incident: None,
            last_seen: None,
            evacuated: vec![],
            back: false,
            not_a_target: None,
            unprotected: vec![],
        }
    }

    #[test]
    fn edges_see_a_change_of_the_hosts_and_only_a_change() {
        let (publisher, mut facts) = HostFactsPublisher::new();
        publisher.publish(vec![view("h1", HostState::Up)]);
        assert!(facts.has_changed().unwrap());
        assert_eq!(
            facts.borrow_and_update()[&HostId::new("h1")].state,
            HostState::Up
        );
        publisher.publish(vec![HostView {
            last_seen: Some(crate::engine::Timestamp(5)),
            ..view("h1", HostState::Up)
        }]);
        assert!(
            !facts.has_changed().unwrap(),
            "the same hosts again, heard once more"
        );
        publisher.publish(vec![view("h1", HostState::Suspect)]);
        assert!(facts.has_changed().unwrap());
    }
}
