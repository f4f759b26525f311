//! Turns the I/O the probes track in flight into per-VM stall episodes.
//!
//! Pure: the daemon feeds it snapshots of what is in flight (the syscall map, the
//! block-request map with each device resolved to its VM's qemu, the io_uring map and
//! the librbd map, taken every `stall_scan_interval`), the slow-end records, and process
//! exits, with the time passed in; it answers with episode starts and ends. A VM is stalled from the
//! moment one of its operations has been in flight for `threshold` until none is any
//! more, so a VM with several stuck worker threads, or one stuck request seen both as an
//! io_uring request and as a block request, gives one episode.
//!
//! Exactness: an operation seen stuck and then gone from its map ends at the end time
//! of its slow-end record (the probes submit the record before they remove the entry,
//! and the daemon drains the ring before every scan). A slow operation that ended
//! between two scans gives a start and an end together, so no stall longer than the
//! threshold goes unreported.
use std::collections::{BTreeMap, HashMap, HashSet};

/// An operation the probes track, with what identifies it in its map (each probe
/// family has its own) and what the report says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// A tracked I/O syscall of a qemu thread (a thread has one in flight at most).
    Syscall { tid: u32, nr: u32, fd: i64 },
    /// A block request on a VM's block device (kernel `dev_t`, first sector).
    Block { dev: u32, sector: u64, write: bool },
    /// An io_uring request of a qemu (the kernel's request pointer, `IORING_OP_*`).
    Uring { req: u64, opcode: u32 },
    /// A librbd request of a qemu (its completion pointer, `rbd_ops`).
    Rbd { completion: u64, op: u32 },
}

/// One operation of a stalled VM: an [`Op`] and when it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckOp {
    pub op: Op,
    pub start_ns: u64,
}

/// One operation in flight, with the qemu (tgid) it is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightOp {
    pub tgid: u32,
    pub stuck: StuckOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StallChange {
    Started {
        tgid: u32,
        /// When the oldest stuck operation began.
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
    /// Stuck operations by (operation, start).
    ops: BTreeMap<(Op, u64), StuckOp>,
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

    /// A snapshot of every operation in flight at `now_ns`.
    pub fn on_scan(&mut self, now_ns: u64, inflight: &[InflightOp]) -> Vec<StallChange> {
        let mut changes = Vec::new();
        // Operations that ended without a record (ring buffer full, or thread gone).
        let present: HashSet<(Op, u64)> = inflight
            .iter()
            .map(|i| (i.stuck.op, i.stuck.start_ns))
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
        // Operations newly past the threshold, grouped by process.
        let mut new_ops: BTreeMap<u32, Vec<StuckOp>> = BTreeMap::new();
        for i in inflight {
            if now_ns.saturating_sub(i.stuck.start_ns) < self.threshold_ns {
                continue;
            }
            match self.stalled.get_mut(&i.tgid) {
                Some(vm) => {
                    vm.ops
                        .insert((i.stuck.op, i.stuck.start_ns), i.stuck.clone());
                }
                None => new_ops.entry(i.tgid).or_default().push(i.stuck.clone()),
            }
        }
        for (tgid, mut ops) in new_ops {
            ops.sort_by_key(|o| (o.start_ns, o.op));
            let since_ns = ops[0].start_ns;
            let vm = VmStall {
                since_ns,
                ops: ops
                    .iter()
                    .map(|o| ((o.op, o.start_ns), o.clone()))
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

    /// When the next of `inflight` crosses the threshold, if one has not yet: the scan
    /// due then reports it within a timer's precision, instead of up to a scan interval
    /// late. Only operations still in flight at this scan count; most end long before.
    pub fn next_crossing(&self, now_ns: u64, inflight: &[InflightOp]) -> Option<u64> {
        inflight
            .iter()
            .map(|i| i.stuck.start_ns.saturating_add(self.threshold_ns))
            .filter(|&due| due > now_ns)
            .min()
    }

    /// An operation of `tgid` ended at `end_ns` after at least the threshold.
    pub fn on_slow_end(&mut self, tgid: u32, op: StuckOp, end_ns: u64) -> Vec<StallChange> {
        let key = (op.op, op.start_ns);
        if let Some(vm) = self.stalled.get_mut(&tgid) {
            if vm.ops.remove(&key).is_some() && vm.ops.is_empty() {
                let since_ns = vm.since_ns;
                self.stalled.remove(&tgid);
                return vec![StallChange::Ended {
                    tgid,
                    since_ns,
                    end_ns,
                }];
            }
            // Part of an episode that other operations keep open (or one the episode
            // never saw: it began and ended between two scans while others were stuck).
            return Vec::new();
        }
        if end_ns.saturating_sub(op.start_ns) < self.threshold_ns {
            return Vec::new();
        }
        // Stuck and done between two scans: report it whole.
        let since_ns = op.start_ns;
        vec![
            StallChange::Started {
                tgid,
                since_ns,
                ops: vec![op],
            },
            StallChange::Ended {
                tgid,
                since_ns,
                end_ns,
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

    fn syscall(tid: u32, start_ms: u64) -> StuckOp {
        StuckOp {
            op: Op::Syscall {
                tid,
                nr: 296,
                fd: 12,
            },
            start_ns: start_ms * MS,
        }
    }

    fn io(tgid: u32, tid: u32, start_ms: u64) -> InflightOp {
        InflightOp {
            tgid,
            stuck: syscall(tid, start_ms),
        }
    }

    fn block(tgid: u32, sector: u64, start_ms: u64) -> InflightOp {
        InflightOp {
            tgid,
            stuck: StuckOp {
                op: Op::Block {
                    dev: 7 << 20 | 3,
                    sector,
                    write: true,
                },
                start_ns: start_ms * MS,
            },
        }
    }

    fn uring(tgid: u32, req: u64, start_ms: u64) -> InflightOp {
        InflightOp {
            tgid,
            stuck: StuckOp {
                op: Op::Uring { req, opcode: 23 },
                start_ns: start_ms * MS,
            },
        }
    }

    #[test]
    fn a_call_in_flight_shorter_than_the_threshold_is_not_a_stall() {
        let mut t = StallTracker::new(1000 * MS);
        assert!(t.on_scan(900 * MS, &[io(10, 11, 0)]).is_empty());
    }

    #[test]
    fn the_next_crossing_is_the_earliest_threshold_of_what_is_still_under_it() {
        let t = StallTracker::new(1000 * MS);
        let ops = [io(10, 11, 0), block(10, 8, 300), uring(12, 1, 150)];
        // At 900 ms: the call begun at 0 crosses first, at 1000 ms.
        assert_eq!(t.next_crossing(900 * MS, &ops), Some(1000 * MS));
        // At 1100 ms it is past (a stall already): the next is the io_uring request's.
        assert_eq!(t.next_crossing(1100 * MS, &ops), Some(1150 * MS));
        assert_eq!(t.next_crossing(1400 * MS, &ops), None);
        assert_eq!(t.next_crossing(0, &[]), None);
    }

    #[test]
    fn a_call_past_the_threshold_starts_a_stall_while_it_is_still_stuck() {
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(1050 * MS, &[io(10, 11, 0)]);
        assert!(
            matches!(&c[..], [StallChange::Started { tgid: 10, since_ns: 0, ops }] if ops.len() == 1)
        );
        // Still stuck on the next scan: nothing new.
        assert!(t.on_scan(1100 * MS, &[io(10, 11, 0)]).is_empty());
    }

    #[test]
    fn several_stuck_threads_of_one_vm_make_one_episode_that_ends_with_the_last() {
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(2000 * MS, &[io(10, 11, 0), io(10, 12, 500)]);
        assert_eq!(c.len(), 1);
        assert!(t.on_slow_end(10, syscall(11, 0), 2100 * MS).is_empty());
        let c = t.on_slow_end(10, syscall(12, 500), 2200 * MS);
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
        let c = t.on_slow_end(10, syscall(11, 0), 1020 * MS);
        assert!(matches!(c[0], StallChange::Started { since_ns: 0, .. }));
        assert!(matches!(c[1], StallChange::Ended { end_ns, .. } if end_ns == 1020 * MS));
    }

    #[test]
    fn a_stuck_call_that_vanished_without_a_record_ends_at_the_scan() {
        let mut t = StallTracker::new(1000 * MS);
        t.on_scan(1500 * MS, &[io(10, 11, 0)]);
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
        t.on_scan(1500 * MS, &[io(10, 11, 0)]);
        assert_eq!(t.on_exit(10, 1600 * MS).len(), 1);
        assert_eq!(t.stalled_count(), 0);
    }

    #[test]
    fn two_vms_stall_and_recover_independently() {
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(1500 * MS, &[io(10, 11, 0), io(20, 21, 100)]);
        assert_eq!(c.len(), 2);
        let c = t.on_scan(1600 * MS, &[io(20, 21, 100)]);
        assert!(matches!(c[..], [StallChange::Ended { tgid: 10, .. }]));
        assert_eq!(t.stalled_count(), 1);
    }

    #[test]
    fn a_request_stuck_in_the_block_layer_and_on_its_ring_is_one_episode_that_ends_with_both() {
        // io='io_uring' on a block device: the ring's request and the block request it
        // became are both in flight.
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(1500 * MS, &[uring(10, 0xffff_1000, 0), block(10, 2048, 1)]);
        assert!(
            matches!(&c[..], [StallChange::Started { tgid: 10, since_ns: 0, ops }] if ops.len() == 2),
            "{c:?}"
        );
        // The block request completes first; the ring's completion ends the episode.
        assert!(t
            .on_slow_end(10, block(10, 2048, 1).stuck, 3000 * MS)
            .is_empty());
        let c = t.on_slow_end(10, uring(10, 0xffff_1000, 0).stuck, 3001 * MS);
        assert_eq!(
            c,
            vec![StallChange::Ended {
                tgid: 10,
                since_ns: 0,
                end_ns: 3001 * MS
            }]
        );
    }

    #[test]
    fn a_block_request_stuck_without_any_syscall_in_flight_is_a_stall() {
        // io='native': io_submit returned long ago; only the block request waits.
        let mut t = StallTracker::new(1000 * MS);
        let c = t.on_scan(1200 * MS, &[block(10, 8, 100)]);
        assert!(matches!(&c[..], [StallChange::Started { tgid: 10, .. }]));
        let c = t.on_scan(1300 * MS, &[]);
        assert!(matches!(&c[..], [StallChange::Ended { tgid: 10, .. }]));
    }
}
