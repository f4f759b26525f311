//! Suspicion when it falls due: each host's silence deadline in a min-heap, so that a
//! host turns Suspect at its deadline rather than on the next periodic tick.
//!
//! One live entry per host (its `queued` time in [`super::entries::HostEntry`]; an entry
//! at another time is stale and skipped): a heartbeat only moves the host's last-heard
//! time and costs no heap operation; when an
//! entry falls due the engine judges the host and, if it is still heard in time, queues
//! it again at its new deadline. With N hosts and silence deadline D that is about N/D
//! heap operations per second, whatever the heartbeat rate.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::{HostId, Timestamp};

/// The hosts' deadlines, earliest first.
#[derive(Clone, Debug, Default)]
pub struct Deadlines {
    heap: BinaryHeap<Reverse<(Timestamp, HostId)>>,
}

impl Deadlines {
    /// Queues `host` to be judged at `at`.
    pub fn push(&mut self, at: Timestamp, host: HostId) {
        self.heap.push(Reverse((at, host)));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Timestamp> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Takes the earliest host whose deadline is at or before `now`, with its deadline.
    pub fn pop_due(&mut self, now: Timestamp) -> Option<(Timestamp, HostId)> {
        if self.next()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(entry)| entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_fall_due_in_deadline_order_and_not_before() {
        let mut d = Deadlines::default();
        d.push(Timestamp(300), HostId::new("b"));
        d.push(Timestamp(100), HostId::new("a"));
        d.push(Timestamp(200), HostId::new("c"));
        assert_eq!(d.next(), Some(Timestamp(100)));
        assert_eq!(d.pop_due(Timestamp(99)), None);
        assert_eq!(
            d.pop_due(Timestamp(250)),
            Some((Timestamp(100), HostId::new("a")))
        );
        assert_eq!(
            d.pop_due(Timestamp(250)),
            Some((Timestamp(200), HostId::new("c")))
        );
        assert_eq!(d.pop_due(Timestamp(250)), None);
        assert_eq!(d.next(), Some(Timestamp(300)));
    }
}
