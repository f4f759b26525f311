//! Turns the in-flight I/O the probes track into per-VM stall episodes.
//!
//! Pure: the daemon feeds it snapshots of the `INFLIGHT` map (taken every
//! `stall_scan_interval`), the `IoSlowEnd` records, and process exits, with the time
//! passed in; it answers with episode starts and ends. A VM is stalled from the moment
//! one of its I/O calls has been in flight for `threshold` until none is any more, so a
//! VM with several stuck worker threads gives one episode, not one per thread.
//!
//! Exactness: a call seen stuck and then gone from the map ends at the end time of its
//! `IoSlowEnd` record (the probe submits the record before it removes the entry, and the
//! daemon drains the ring before every scan). A slow call that returned between two scans
//! gives a start and an end together, so no stall longer than the threshold goes unreported.
use std::collections::{BTreeMap, HashMap};

use watchdog_common::{InflightIo, IoSlowEndRecord};

/// One I/O call of a stalled VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckOp {
    pub tid: u32,
    pub syscall_nr: u32,
    pub fd: i64,
    pub start_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StallChange {
    Started {
        tgid: u32,
        /// When the oldest stuck call was entered.
        since_ns: u64,
        ops: Vec<StuckOp>,
    },
    Ended {
        tgid: u32,
        since_ns: u64,
        end_ns: u64,
    },
}

#[derive(Debug, Default)]
struct VmStall {
    since_ns: u64,
    /// Stuck calls by (tid, start): a thread has at most one call in flight.
    ops: BTreeMap<(u32, u64), StuckOp>,
}

#[derive(Debug)]
pub struct StallTracker {
    threshold_ns: u64,
    stalled: HashMap<u32, VmStall>,
}

impl StallTracker {
    pub fn new(threshold_ns: u64) -> Self {
        Self {
            threshold_ns,
            stalled: HashMap::new(),
        }
    }

    pub fn threshold_ns(&self) -> u64 {
        self.threshold_ns
    }

    /// Number of VMs (processes) stalled right now.
    pub fn stalled_count(&self) -> usize {
        self.stalled.len()
    }

    /// A snapshot of every in-flight call (tid → call) at `now_ns`.
    pub fn on_scan(&mut self, now_ns: u64, inflight: &[(u32, InflightIo)]) -> Vec<StallChange> {
        let mut changes = Vec::new();
        // Calls that ended without a record (ring buffer full, or thread gone).
        let present: std::collections::HashSet<(u32, u64)> = inflight
            .iter()
            .map(|(tid, io)| (*tid, io.start_ns))
            .collect();
        let mut gone_vms = Vec::new();
        for (tgid, vm) in self.stalled.iter_mut() {
            vm.ops.retain(|key, _| present.contains(key));
            if vm.ops.is_empty() {
                gone_vms.push(*tgid);
            }
        }
        for tgid in gone_vms {
            if let Some(vm) = self.stalled.remove(&tgid) {
                changes.push(StallChange::Ended {
                    tgid,
                    since_ns: vm.since_ns,
                    end_ns: now_ns,
                });
            }
        }
        // Calls newly past the threshold, grouped by process.
        let mut new_ops: BTreeMap<u32, Vec<StuckOp>> = BTreeMap::new();
        for (tid, io) in inflight {
            if now_ns.saturating_sub(io.start_ns) < self.threshold_ns {
                continue;
            }
            let op = StuckOp {
                tid: *tid,
                syscall_nr: io.syscall_nr,
                fd: io.fd,
                start_ns: io.start_ns,
            };
            match self.stalled.get_mut(&io.tgid) {
                Some(vm) => {
                    vm.ops.insert((*tid, io.start_ns), op);
                }
                None => new_ops.entry(io.tgid).or_default().push(op),
            }
        }
        for (tgid, mut ops) in new_ops {
            ops.sort_by_key(|o| o.start_ns);
            let since_ns = ops[0].start_ns;
            let vm = VmStall {
                since_ns,
                ops: ops
                    .iter()
                    .map(|o| ((o.tid, o.start_ns), o.clone()))
                    .collect(),
            };
            self.stalled.insert(tgid, vm);
            changes.push(StallChange::Started {
                tgid,
                since_ns,
                ops,
            });
        }
        changes
    }

    /// A call returned after at least the threshold.
    pub fn on_slow_end(&mut self, rec: &IoSlowEndRecord) -> Vec<StallChange> {
        let key = (rec.tid, rec.start_ns);
        if let Some(vm) = self.stalled.get_mut(&rec.tgid) {
            if vm.ops.remove(&key).is_some() && vm.ops.is_empty() {
                let since_ns = vm.since_ns;
                self.stalled.remove(&rec.tgid);
                return vec![StallChange::Ended {
                    tgid: rec.tgid,
                    since_ns,
                    end_ns: rec.end_ns,
                }];
            }
            // Part of an episode that other calls keep open.
            return Vec::new();
        }
        if rec.end_ns.saturating_sub(rec.start_ns) < self.threshold_ns {
            return Vec::new();
        }
        // Stuck and done between two scans: report it whole.
        vec![
            StallChange::Started {
                tgid: rec.tgid,
                since_ns: rec.start_ns,
                ops: vec![StuckOp {
                    tid: rec.tid,
                    syscall_nr: rec.syscall_nr,
                    fd: rec.fd,
                    start_ns: rec.start_ns,
                }],
            },
            StallChange::Ended {
                tgid: rec.tgid,
                since_ns: rec.start_ns,
                end_ns: rec.end_ns,
            },
        ]
    }

    /// The process died: an open episode ends with it.
    pub fn on_exit(&mut self, tgid: u32, now_ns: u64) -> Vec<StallChange> {
        match self.stalled.remove(&tgid) {
            Some(vm) => vec![StallChange::Ended {
                tgid,
                since_ns: vm.since_ns,
                end_ns: now_ns,
            }],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn io(tgid: u32, start_ms: u64) -> InflightIo {
        InflightIo {
            tgid,
            syscall_nr: 296,
            start_ns: start_ms * MS,
            fd: 12,
        }
    }

    fn slow_end(tgid: u32, tid: u32, start_ms: u64, end_ms: u64) -> IoSlowEndRecord {
        IoSlowEndRecord {
            kind: 3,
            tgid,
            tid,
            syscall_nr: 296,
            start_ns: start_ms * MS,
            end_ns: end_ms * MS,
            fd: 12,
            ret: 4096,
        }
    }

    #[test]
    fn a_call_in_flight_shorter_than_the_threshold_is_not_a_stall() {
        let mut t = StallTracker::new(1000 * MS);
        assert!(t.on_scan(900 * MS, &[(11, io(10, 0))]).is_empty());
    }

    #[test]
    fn a_call_past_the_threshold_starts_a_stall_while_it_is_still_stuck() {
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(1050 * MS, &[(11, io(10, 0))]);
        assert!(
            matches!(&c[..], [StallChange::Started { tgid: 10, since_ns: 0, ops }] if ops.len() == 1)
        );
        // Still stuck on the next scan: nothing new.
        assert!(t.on_scan(1100 * MS, &[(11, io(10, 0))]).is_empty());
    }

    #[test]
    fn several_stuck_threads_of_one_vm_make_one_episode_that_ends_with_the_last() {
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(2000 * MS, &[(11, io(10, 0)), (12, io(10, 500))]);
        assert_eq!(c.len(), 1);
        assert!(t.on_slow_end(&slow_end(10, 11, 0, 2100)).is_empty());
        let c = t.on_slow_end(&slow_end(10, 12, 500, 2200));
        assert_eq!(
            c,
            vec![StallChange::Ended {
                tgid: 10,
                since_ns: 0,
                end_ns: 2200 * MS
            }]
        );
    }

    #[test]
    fn a_stall_that_ended_between_two_scans_is_reported_whole() {
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_slow_end(&slow_end(10, 11, 0, 1020));
        assert!(matches!(c[0], StallChange::Started { since_ns: 0, .. }));
        assert!(matches!(c[1], StallChange::Ended { end_ns, .. } if end_ns == 1020 * MS));
    }

    #[test]
    fn a_stuck_call_that_vanished_without_a_record_ends_at_the_scan() {
        let mut t = StallTracker::new(1000 * MS);
        t.on_scan(1500 * MS, &[(11, io(10, 0))]);
        let c = t.on_scan(1550 * MS, &[]);
        assert_eq!(
            c,
            vec![StallChange::Ended {
                tgid: 10,
                since_ns: 0,
                end_ns: 1550 * MS
            }]
        );
    }

    #[test]
    fn a_process_that_dies_while_stalled_ends_its_episode() {
        let mut t = StallTracker::new(1000 * MS);
        t.on_scan(1500 * MS, &[(11, io(10, 0))]);
        assert_eq!(t.on_exit(10, 1600 * MS).len(), 1);
        assert_eq!(t.stalled_count(), 0);
    }

    #[test]
    fn two_vms_stall_and_recover_independently() {
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(1500 * MS, &[(11, io(10, 0)), (21, io(20, 100))]);
        assert_eq!(c.len(), 2);
        let c = t.on_scan(1600 * MS, &[(21, io(20, 100))]);
        assert!(matches!(c[..], [StallChange::Ended { tgid: 10, .. }]));
        assert_eq!(t.stalled_count(), 1);
    }
}
