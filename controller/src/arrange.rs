//! The arrangement scheduler: where each VM of the failed hosts is rebuilt. Pure (no
//! I/O, no clock): the Nova restorer reads capacity from Placement and the server
//! list from Nova, calls [`plan`], and carries the plan out.
//!
//! Why the controller decides and not Nova's scheduler one VM at a time: all VMs of all
//! failed hosts are placed together, so they spread over many targets at once (Nova
//! rebuilds at most `max_concurrent_builds`, default 10, per host at a time: the
//! more targets, the more rebuilds run in parallel), the important VMs go first, and a
//! plan that cannot be met says which VMs and why before anything is moved.
//!
//! Rules, in order:
//! 1. VMs are taken by priority (higher first, from server metadata, e.g.
//!    `defib:priority`), then larger first (memory, vCPUs: big ones are hardest to
//!    fit), then by id (a stable plan for the same input).
//! 2. A VM goes to a target that is usable (not excluded: disabled, down, forced down,
//!    in maintenance), is not its own host, is not one it already failed on, and has
//!    room for its vCPUs, memory and disk (Placement's free capacity:
//!    `(total − reserved) × allocation_ratio − used`).
//! 3. Reserved hosts (kept free for failover) are taken before the others; with
//!    `reserved_only` they are the only targets.
//! 4. Among those, the least loaded target wins (VMs planned there plus rebuilds already
//!    running there), then the one with the most free memory, then by name: the VMs
//!    spread evenly, so every target rebuilds its share at the same time.
//! 5. The start order is the plan's order; the executor keeps at most
//!    `max_concurrent_per_target` rebuilds running per target.
use std::collections::{BTreeMap, BTreeSet};

/// vCPUs, memory and local disk: a VM's need or a host's free room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Amount {
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_gb: u64,
}

impl Amount {
    fn fits_in(&self, room: &Amount) -> bool {
        self.vcpus <= room.vcpus && self.memory_mb <= room.memory_mb && self.disk_gb <= room.disk_gb
    }
    fn minus(&self, o: &Amount) -> Amount {
        Amount {
            vcpus: self.vcpus.saturating_sub(o.vcpus),
            memory_mb: self.memory_mb.saturating_sub(o.memory_mb),
            disk_gb: self.disk_gb.saturating_sub(o.disk_gb),
        }
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} vCPU, {} MB, {} GB",
            self.vcpus, self.memory_mb, self.disk_gb
        )
    }
}

/// One resource class of a Placement inventory with its usage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassCapacity {
    pub total: u64,
    pub reserved: u64,
    pub allocation_ratio: f64,
    pub used: u64,
}

impl ClassCapacity {
    /// What Placement would still allocate: `(total − reserved) × ratio − used`.
    pub fn free(&self) -> u64 {
        let cap = (self.total.saturating_sub(self.reserved) as f64 * self.allocation_ratio).floor();
        (cap as u64).saturating_sub(self.used)
    }
}

/// Free room from the VCPU, MEMORY_MB and DISK_GB classes (a missing class: none).
pub fn free_room(classes: &BTreeMap<String, ClassCapacity>) -> Amount {
    let f = |k: &str| classes.get(k).map_or(0, ClassCapacity::free);
    Amount {
        vcpus: f("VCPU"),
        memory_mb: f("MEMORY_MB"),
        disk_gb: f("DISK_GB"),
    }
}

/// A host a VM could go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub free: Amount,
    /// Rebuilds already running there (from an earlier plan).
    pub building: u32,
    /// Kept free for failover: taken first.
    pub reserved: bool,
    /// Why it must not be used (disabled, down, forced down, maintenance), if so.
    pub excluded: Option<String>,
}

/// A VM to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    pub id: String,
    /// The host it ran on (never a target for it).
    pub from: String,
    /// `None`: its size is unknown (Nova did not say), so it cannot be planned.
    pub need: Option<Amount>,
    /// Higher first.
    pub priority: i64,
    /// Targets it already failed on.
    pub avoid: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Only reserved hosts are targets (when any is configured).
    pub reserved_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub vm: String,
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub vm: String,
    pub reason: String,
}

/// Where each VM goes, in start order, and the VMs that cannot go anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub unplaced: Vec<Unplaced>,
}

/// Places `vms` on `targets` (see the module's rules).
pub fn plan(vms: &[Vm], targets: &[Target], policy: Policy) -> Plan {
    let mut order: Vec<&Vm> = vms.iter().collect();
    order.sort_by(|a, b| {
        let size = |v: &Vm| v.need.map(|n| (n.memory_mb, n.vcpus, n.disk_gb));
        b.priority
            .cmp(&a.priority)
            .then_with(|| size(b).cmp(&size(a)))
            .then_with(|| a.id.cmp(&b.id))
    });
    let any_reserved = targets.iter().any(|t| t.reserved && t.excluded.is_none());
    let mut room: Vec<Amount> = targets.iter().map(|t| t.free).collect();
    let mut load: Vec<u32> = targets.iter().map(|t| t.building).collect();
    let mut out = Plan::default();
    for vm in order {
        let Some(need) = vm.need else {
            out.unplaced.push(Unplaced {
                vm: vm.id.clone(),
                reason: "its size is unknown (no flavor in Nova's answer)".into(),
            });
            continue;
        };
        // Targets allowed for this VM, with the reason for each one that is not.
        let mut refused: Vec<String> = Vec::new();
        let mut allowed: Vec<usize> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            if let Some(why) = &t.excluded {
                refused.push(format!("{} {why}", t.host));
            } else if t.host == vm.from {
                // Its own (failed) host: not worth naming.
            } else if vm.avoid.contains(&t.host) {
                refused.push(format!("{} failed it before", t.host));
            } else if policy.reserved_only && any_reserved && !t.reserved {
                // Not a reserved host: not a target under this policy.
            } else {
                allowed.push(i);
            }
        }
        if allowed.is_empty() {
            let why = if refused.is_empty() {
                "no other host to go to".to_string()
            } else {
                format!("no usable target ({})", refused.join("; "))
            };
            out.unplaced.push(Unplaced {
                vm: vm.id.clone(),
                reason: why,
            });
            continue;
        }
        let fitting = |reserved: bool| {
            allowed
                .iter()
                .copied()
                .filter(|&i| targets[i].reserved == reserved && need.fits_in(&room[i]))
                .min_by(|&a, &b| {
                    load[a]
                        .cmp(&load[b])
                        .then_with(|| room[b].memory_mb.cmp(&room[a].memory_mb))
                        .then_with(|| targets[a].host.cmp(&targets[b].host))
                })
        };
        let chosen = fitting(true).or_else(|| fitting(false));
        match chosen {
            Some(i) => {
                room[i] = room[i].minus(&need);
                load[i] += 1;
                out.placements.push(Placement {
                    vm: vm.id.clone(),
                    target: targets[i].host.clone(),
                });
            }
            None => {
                let best = allowed
                    .iter()
                    .max_by_key(|&&i| (room[i].memory_mb, room[i].vcpus, room[i].disk_gb))
                    .map(|&i| format!("{} has {}", targets[i].host, room[i]))
                    .unwrap_or_default();
                out.unplaced.push(Unplaced {
                    vm: vm.id.clone(),
                    reason: format!("no target has room for {need} (most room: {best})"),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn amt(vcpus: u64, memory_mb: u64, disk_gb: u64) -> Amount {
        Amount {
            vcpus,
            memory_mb,
            disk_gb,
        }
    }

    fn target(host: &str, free: Amount) -> Target {
        Target {
            host: host.into(),
            free,
            building: 0,
            reserved: false,
            excluded: None,
        }
    }

    fn vm(id: &str, need: Amount, priority: i64) -> Vm {
        Vm {
            id: id.into(),
            from: "h1".into(),
            need: Some(need),
            priority,
            avoid: BTreeSet::new(),
        }
    }

    const POLICY: Policy = Policy {
        reserved_only: false,
    };

    fn count(p: &Plan) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for pl in &p.placements {
            *m.entry(pl.target.clone()).or_default() += 1;
        }
        m
    }

    #[test]
    fn placement_capacity_counts_reserved_and_the_allocation_ratio() {
        let c = ClassCapacity {
            total: 64,
            reserved: 4,
            allocation_ratio: 4.0,
            used: 10,
        };
        assert_eq!(c.free(), 230);
        let full = ClassCapacity {
            total: 8,
            reserved: 0,
            allocation_ratio: 1.0,
            used: 9,
        };
        assert_eq!(full.free(), 0);
        let mut m = BTreeMap::new();
        m.insert("VCPU".to_string(), c);
        assert_eq!(free_room(&m), amt(230, 0, 0));
    }

    #[test]
    fn thirty_equal_vms_spread_evenly_over_the_targets() {
        let vms: Vec<Vm> = (0..30)
            .map(|i| vm(&format!("v{i:02}"), amt(1, 512, 1), 0))
            .collect();
        let targets = [
            target("h2", amt(64, 131072, 2048)),
            target("h3", amt(64, 131072, 2048)),
            target("h4", amt(64, 131072, 2048)),
        ];
        let p = plan(&vms, &targets, POLICY);
        assert!(p.unplaced.is_empty());
        let c = count(&p);
        assert_eq!(c.values().copied().collect::<Vec<_>>(), vec![10, 10, 10]);
        // Round robin: the first three go to three different hosts.
        let first: BTreeSet<_> = p.placements[..3].iter().map(|p| &p.target).collect();
        assert_eq!(first.len(), 3);
    }

    #[test]
    fn vms_with_a_higher_priority_come_first_in_the_start_order() {
        let vms = [
            vm("low", amt(1, 512, 1), 0),
            vm("high", amt(1, 512, 1), 10),
            vm("mid", amt(1, 512, 1), 5),
        ];
        let p = plan(&vms, &[target("h2", amt(8, 8192, 100))], POLICY);
        let order: Vec<_> = p.placements.iter().map(|p| p.vm.as_str()).collect();
        assert_eq!(order, ["high", "mid", "low"]);
    }

    #[test]
    fn a_vm_that_fits_nowhere_is_named_with_the_reason() {
        let vms = [
            vm("big", amt(16, 65536, 10), 0),
            vm("small", amt(1, 512, 1), 0),
        ];
        let p = plan(
            &vms,
            &[
                target("h2", amt(8, 32768, 100)),
                target("h3", amt(4, 8192, 100)),
            ],
            POLICY,
        );
        assert_eq!(p.placements.len(), 1);
        assert_eq!(p.placements[0].vm, "small");
        assert_eq!(p.unplaced.len(), 1);
        assert_eq!(p.unplaced[0].vm, "big");
        assert!(
            p.unplaced[0].reason.contains("16 vCPU, 65536 MB")
                && p.unplaced[0].reason.contains("h2 has 8 vCPU"),
            "{}",
            p.unplaced[0].reason
        );
    }

    #[test]
    fn capacity_is_used_up_as_vms_are_placed() {
        let vms: Vec<Vm> = (0..5)
            .map(|i| vm(&format!("v{i}"), amt(2, 1024, 10), 0))
            .collect();
        let p = plan(&vms, &[target("h2", amt(4, 100_000, 1000))], POLICY);
        assert_eq!(p.placements.len(), 2);
        assert_eq!(p.unplaced.len(), 3);
    }

    #[test]
    fn excluded_and_failed_targets_are_not_used_and_are_named() {
        let mut t2 = target("h2", amt(64, 131072, 2048));
        t2.excluded = Some("is disabled".into());
        let t3 = target("h3", amt(64, 131072, 2048));
        let mut v = vm("v", amt(1, 512, 1), 0);
        v.avoid.insert("h3".into());
        let p = plan(&[v], &[t2, t3], POLICY);
        assert!(p.placements.is_empty());
        let r = &p.unplaced[0].reason;
        assert!(
            r.contains("h2 is disabled") && r.contains("h3 failed it before"),
            "{r}"
        );
    }

    #[test]
    fn a_vm_never_goes_back_to_its_own_host() {
        let p = plan(
            &[vm("v", amt(1, 512, 1), 0)],
            &[target("h1", amt(64, 131072, 2048))],
            POLICY,
        );
        assert_eq!(p.unplaced[0].reason, "no other host to go to");
    }

    #[test]
    fn reserved_hosts_are_filled_first_and_can_be_the_only_targets() {
        let mut r = target("spare", amt(2, 100_000, 1000));
        r.reserved = true;
        let o = target("h2", amt(64, 131072, 2048));
        let vms: Vec<Vm> = (0..4)
            .map(|i| vm(&format!("v{i}"), amt(1, 512, 1), 0))
            .collect();
        let p = plan(&vms, &[r.clone(), o.clone()], POLICY);
        let c = count(&p);
        assert_eq!(c["spare"], 2);
        assert_eq!(c["h2"], 2);
        let p = plan(
            &vms,
            &[r, o],
            Policy {
                reserved_only: true,
            },
        );
        assert_eq!(p.placements.len(), 2);
        assert_eq!(p.unplaced.len(), 2);
    }

    #[test]
    fn running_rebuilds_count_as_load() {
        let mut busy = target("h2", amt(64, 131072, 2048));
        busy.building = 10;
        let idle = target("h3", amt(64, 131072, 2048));
        let p = plan(&[vm("v", amt(1, 512, 1), 0)], &[busy, idle], POLICY);
        assert_eq!(p.placements[0].target, "h3");
    }

    #[test]
    fn a_vm_of_unknown_size_is_unplaced_with_the_reason() {
        let mut v = vm("v", amt(1, 1, 1), 0);
        v.need = None;
        let p = plan(&[v], &[target("h2", amt(64, 131072, 2048))], POLICY);
        assert!(p.unplaced[0].reason.contains("size is unknown"));
    }

    proptest! {
        #[test]
        fn every_vm_is_accounted_for_once_and_no_target_is_overfilled(
            needs in proptest::collection::vec((1u64..8, 1u64..8192, 1u64..50, 0i64..3, 0usize..4), 0..40),
            rooms in proptest::collection::vec((0u64..32, 0u64..40000, 0u64..300, any::<bool>(), any::<bool>()), 1..5),
        ) {
            let targets: Vec<Target> = rooms.iter().enumerate().map(|(i, (c, m, d, res, ex))| Target {
                host: format!("h{i}"),
                free: amt(*c, *m, *d),
                building: 0,
                reserved: *res,
                excluded: ex.then(|| "is down".to_string()),
            }).collect();
            let vms: Vec<Vm> = needs.iter().enumerate().map(|(i, (c, m, d, prio, from))| Vm {
                id: format!("v{i}"),
                from: format!("h{from}"),
                need: Some(amt(*c, *m, *d)),
                priority: *prio,
                avoid: BTreeSet::new(),
            }).collect();
            let p = plan(&vms, &targets, POLICY);
            let mut seen = BTreeSet::new();
            for x in p.placements.iter().map(|p| &p.vm).chain(p.unplaced.iter().map(|u| &u.vm)) {
                prop_assert!(seen.insert(x.clone()), "{x} twice");
            }
            prop_assert_eq!(seen.len(), vms.len());
            let by_id: BTreeMap<_, _> = vms.iter().map(|v| (v.id.clone(), v)).collect();
            let mut used: BTreeMap<String, Amount> = BTreeMap::new();
            let mut last_prio = i64::MAX;
            for pl in &p.placements {
                let v = by_id[&pl.vm];
                prop_assert!(v.priority <= last_prio);
                last_prio = v.priority;
                prop_assert!(pl.target != v.from);
                let t = targets.iter().find(|t| t.host == pl.target).unwrap();
                prop_assert!(t.excluded.is_none());
                let u = used.entry(t.host.clone()).or_default();
                let n = v.need.unwrap();
                u.vcpus += n.vcpus; u.memory_mb += n.memory_mb; u.disk_gb += n.disk_gb;
                prop_assert!(u.fits_in(&t.free), "{} overfilled", t.host);
            }
        }
    }
}
