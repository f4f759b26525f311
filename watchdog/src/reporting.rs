//! Which watched qemus the watchdog reports: all of them, or, with
//! `libvirt.only_own_domains`, only those this host's libvirt runs.
//!
//! The probes see every qemu of the kernel. Where several hypervisors share one kernel
//! (a lab on one machine, nested setups), a running qemu is this host's only if this
//! host's libvirt lists its domain as active, with this qemu's pid where the list has
//! one: a domain this libvirt merely knows may run elsewhere (its definition stays
//! behind on a host it was evacuated from). That is known only from libvirt's domain
//! list, which comes after the probes' first /proc scan and, for a domain started here
//! a moment ago, possibly after its qemu's exec. So an event about a qemu not (yet)
//! known to be this host's is held, not dropped, and each new list decides again: the
//! held events go out in their order once a list says the qemu is this host's. A qemu
//! that a list has found not to be this host's while it ran has its exit dropped; one
//! that started and exited between two lists is this host's if the list knows its domain
//! (its domain is no longer active anywhere to tell). A qemu reported once stays
//! reported until its exit (its domain may leave the list while it runs: it still runs
//! here).
//!
//! This keeps `qemu_started` and `qemu_exited` paired per reported qemu, which is what
//! the heartbeats' VM count (uplink::status) is built from.
use std::collections::{HashMap, HashSet};

use crate::events::{LibvirtVm, WatchdogEvent};
use crate::monitor::EventSink;
use crate::procfs::VmIdentity;

/// One domain of the latest list, by UUID and by name.
#[derive(Debug, Clone, Copy)]
struct Listed {
    active: bool,
    /// Its qemu's pid, when libvirt's pid file gave one.
    pid: Option<u32>,
}

/// Events held about one running qemu.
#[derive(Debug, Default)]
struct Held {
    events: Vec<WatchdogEvent>,
    /// A list has found that this host's libvirt does not run it.
    not_ours: bool,
}

/// See the module's documentation.
#[derive(Debug, Default)]
pub struct Reporting {
    only_own: bool,
    /// Every domain of the latest list, by UUID and by name; `None` before the first.
    listed: Option<HashMap<String, Listed>>,
    /// Qemus whose `qemu_started` went out and whose exit has not.
    reported: HashSet<u32>,
    /// Events about running qemus not known to be this host's, in order, per pid.
    held: HashMap<u32, Held>,
    /// Events about qemus that started and exited between two lists, with their VM.
    held_exited: Vec<(VmIdentity, Vec<WatchdogEvent>)>,
}

impl Reporting {
    /// `only_own`: `libvirt.only_own_domains`; without it every event goes out at once.
    pub fn new(only_own: bool) -> Self {
        Self {
            only_own,
            ..Self::default()
        }
    }

    /// The latest list's entry for `vm`, by UUID, else by name.
    fn listed(&self, vm: &VmIdentity) -> Option<Listed> {
        let listed = self.listed.as_ref()?;
        [&vm.uuid, &vm.name]
            .into_iter()
            .flatten()
            .find_map(|id| listed.get(id).copied())
    }

    /// Running qemu `pid` is this host's: always without `only_own`; with it, if the
    /// latest list has its domain active, with this pid where it has one.
    fn runs_here(&self, pid: u32, vm: &VmIdentity) -> bool {
        !self.only_own
            || self
                .listed(vm)
                .is_some_and(|l| l.active && l.pid.is_none_or(|p| p == pid))
    }

    /// An exited qemu no list saw running was this host's: always without `only_own`;
    /// with it, if the latest list knows its domain.
    fn ran_here(&self, vm: &VmIdentity) -> bool {
        !self.only_own || self.listed(vm).is_some()
    }

    /// An event about qemu `pid` (started, exited, disk stall) whose VM is `vm` as known
    /// now: passed to `sink`, or held until the next domain list.
    pub fn event(
        &mut self,
        pid: u32,
        vm: &VmIdentity,
        event: WatchdogEvent,
        sink: &mut dyn EventSink,
    ) {
        let exited = matches!(event, WatchdogEvent::QemuExited { .. });
        if self.reported.contains(&pid) {
            if exited {
                self.reported.remove(&pid);
            }
            sink.emit(event);
            return;
        }
        // Once held, a qemu's events stay together until a list decides, in order.
        if let Some(held) = self.held.get_mut(&pid) {
            if !exited {
                held.events.push(event);
                return;
            }
            let mut held = self.held.remove(&pid).unwrap_or_default();
            if !held.not_ours {
                held.events.push(event);
                self.held_exited.push((vm.clone(), held.events));
            }
            return;
        }
        if exited {
            // A qemu this run never reported a start for: one of the previous run's,
            // whose exit record waited in the pinned ring buffer.
            if self.ran_here(vm) {
                sink.emit(event);
            } else {
                self.held_exited.push((vm.clone(), vec![event]));
            }
            return;
        }
        if self.runs_here(pid, vm) {
            if matches!(event, WatchdogEvent::QemuStarted { .. }) {
                self.reported.insert(pid);
            }
            sink.emit(event);
            return;
        }
        self.held.insert(
            pid,
            Held {
                events: vec![event],
                not_ours: false,
            },
        );
    }

    /// A new domain list: the held qemus it says run here are reported, with what they
    /// did meanwhile; held qemus that exited are reported if it knows their domain, and
    /// forgotten if not. `vm_of` names the VM of a running watched qemu as known now
    /// (libvirt may have just named it).
    pub fn domains(
        &mut self,
        list: &[LibvirtVm],
        vm_of: impl Fn(u32) -> Option<VmIdentity>,
        sink: &mut dyn EventSink,
    ) {
        let mut listed = HashMap::new();
        for v in list {
            let l = Listed {
                active: v.is_active(),
                pid: v.pid,
            };
            for id in [&v.uuid, &v.name] {
                if !id.is_empty() {
                    listed.insert(id.clone(), l);
                }
            }
        }
        self.listed = Some(listed);
        // Exited ones first: a pid in `held` may be a reuse of one of theirs.
        for (vm, events) in std::mem::take(&mut self.held_exited) {
            if self.ran_here(&vm) {
                for e in events {
                    sink.emit(with_vm(e, &vm));
                }
            }
        }
        let mut held: Vec<(u32, Held)> = std::mem::take(&mut self.held).into_iter().collect();
        held.sort_by_key(|(pid, _)| *pid);
        for (pid, held) in held {
            let vm = vm_of(pid).unwrap_or_default();
            if self.runs_here(pid, &vm) {
                self.reported.insert(pid);
                for e in held.events {
                    sink.emit(with_vm(e, &vm));
                }
            } else {
                self.held.insert(
                    pid,
                    Held {
                        events: still_true(held.events),
                        not_ours: true,
                    },
                );
            }
        }
    }

    /// Qemus reported as running now.
    pub fn reported(&self) -> usize {
        self.reported.len()
    }
}

/// What is still true of a running qemu's held events: its start, and its disk stall if
/// one is in progress (a qemu of another host may stall and recover many times: only
/// this much is kept).
fn still_true(events: Vec<WatchdogEvent>) -> Vec<WatchdogEvent> {
    let start = events
        .iter()
        .find(|e| matches!(e, WatchdogEvent::QemuStarted { .. }))
        .cloned();
    let stall = events
        .iter()
        .rev()
        .find(|e| {
            matches!(
                e,
                WatchdogEvent::DiskStallStarted { .. } | WatchdogEvent::DiskStallEnded { .. }
            )
        })
        .filter(|e| matches!(e, WatchdogEvent::DiskStallStarted { .. }))
        .cloned();
    start.into_iter().chain(stall).collect()
}

/// `event` naming `vm`, if `vm` is known (a qemu found by the scan may have been named
/// by libvirt only since).
fn with_vm(mut event: WatchdogEvent, known: &VmIdentity) -> WatchdogEvent {
    if !known.is_known() {
        return event;
    }
    match &mut event {
        WatchdogEvent::QemuStarted { vm, .. }
        | WatchdogEvent::QemuExited { vm, .. }
        | WatchdogEvent::DiskStallStarted { vm, .. }
        | WatchdogEvent::DiskStallEnded { vm, .. } => *vm = known.clone(),
        _ => {}
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::status::{HostSummary, StatusTracker};

    #[derive(Default)]
    struct Sink(Vec<WatchdogEvent>);

    impl EventSink for Sink {
        fn emit(&mut self, event: WatchdogEvent) {
            self.0.push(event);
        }
    }

    impl Sink {
        /// (kind, pid) of every event, in order.
        fn seen(&self) -> Vec<(&'static str, u32)> {
            self.0
                .iter()
                .map(|e| match e {
                    WatchdogEvent::QemuStarted { pid, .. } => ("started", *pid),
                    WatchdogEvent::QemuExited { pid, .. } => ("exited", *pid),
                    WatchdogEvent::DiskStallStarted { pid, .. } => ("stall", *pid),
                    WatchdogEvent::DiskStallEnded { pid, .. } => ("stall ended", *pid),
                    _ => ("other", 0),
                })
                .collect()
        }

        /// The VM count the heartbeats would carry after these events.
        fn vm_count(&self) -> u32 {
            let mut t = StatusTracker::default();
            for e in &self.0 {
                t.observe(e);
            }
            let mut s = HostSummary::default();
            t.apply_to(&mut s);
            s.vm_count
        }
    }

    fn vm(n: u32) -> VmIdentity {
        VmIdentity {
            uuid: Some(format!("uuid-{n}")),
            name: Some(format!("dom-{n}")),
        }
    }

    fn started(pid: u32, vm: &VmIdentity) -> WatchdogEvent {
        WatchdogEvent::QemuStarted {
            pid,
            comm: "qemu-system-x86".into(),
            vm: vm.clone(),
            source: "scan",
            kernel_ns: None,
            observed_ns: 1,
            unix_ms: 1,
        }
    }

    fn exited(pid: u32, vm: &VmIdentity) -> WatchdogEvent {
        WatchdogEvent::QemuExited {
            pid,
            comm: "qemu-system-x86".into(),
            vm: vm.clone(),
            exit_code: None,
            signal: Some(9),
            signal_name: Some("SIGKILL"),
            core_dumped: false,
            oom_killed: false,
            killer: None,
            kernel_ns: 2,
            observed_ns: 2,
            unix_ms: 2,
        }
    }

    fn stall(pid: u32, vm: &VmIdentity, ended: bool) -> WatchdogEvent {
        if ended {
            WatchdogEvent::DiskStallEnded {
                pid,
                vm: vm.clone(),
                since_ns: 1,
                end_ns: 2,
                duration_ms: 0,
                observed_ns: 2,
                unix_ms: 2,
            }
        } else {
            WatchdogEvent::DiskStallStarted {
                pid,
                vm: vm.clone(),
                since_ns: 1,
                threshold_ms: 1000,
                stuck_ops: Vec::new(),
                observed_ns: 2,
                unix_ms: 2,
            }
        }
    }

    /// A domain of the list: running with qemu `pid`, or (`None`) defined and shut off.
    fn dom(vm: &VmIdentity, pid: Option<u32>) -> LibvirtVm {
        LibvirtVm {
            uuid: vm.uuid.clone().unwrap_or_default(),
            name: vm.name.clone().unwrap_or_default(),
            state: if pid.is_some() { "running" } else { "shutoff" }.into(),
            reason: String::new(),
            pid,
            disks: Vec::new(),
            definition: None,
        }
    }

    #[test]
    fn without_only_own_domains_every_qemu_is_reported_at_once() {
        let mut r = Reporting::new(false);
        let mut sink = Sink::default();
        r.event(10, &vm(1), started(10, &vm(1)), &mut sink);
        let unnamed = VmIdentity::default();
        r.event(11, &unnamed, started(11, &unnamed), &mut sink);
        r.event(10, &vm(1), exited(10, &vm(1)), &mut sink);
        assert_eq!(
            sink.seen(),
            [("started", 10), ("started", 11), ("exited", 10)]
        );
        assert_eq!(sink.vm_count(), 1);
    }

    #[test]
    fn qemus_found_before_the_first_domain_list_count_only_once_the_list_says_they_run_here() {
        // A lab host restarts its watchdog: its scan finds its own qemu and another
        // host's before its libvirt has listed anything.
        let mut r = Reporting::new(true);
        let mut sink = Sink::default();
        r.event(10, &vm(1), started(10, &vm(1)), &mut sink);
        r.event(20, &vm(2), started(20, &vm(2)), &mut sink);
        assert_eq!(sink.seen(), [], "nothing is known to be this host's yet");
        let vm_of = |pid| Some(if pid == 10 { vm(1) } else { vm(2) });
        r.domains(&[dom(&vm(1), Some(10))], vm_of, &mut sink);
        assert_eq!(sink.seen(), [("started", 10)]);
        assert_eq!(sink.vm_count(), 1);
    }

    #[test]
    fn a_qemu_whose_domain_this_libvirt_knows_only_shut_off_runs_elsewhere_and_is_not_counted() {
        // Evacuated from this host and back: its definition stays behind here, shut off,
        // while its qemu runs under the other host's libvirt.
        let mut r = Reporting::new(true);
        let mut sink = Sink::default();
        r.event(20, &vm(2), started(20, &vm(2)), &mut sink);
        r.domains(&[dom(&vm(2), None)], |_| Some(vm(2)), &mut sink);
        // Nor is one this libvirt lists running under another pid.
        r.event(21, &vm(3), started(21, &vm(3)), &mut sink);
        r.domains(
            &[dom(&vm(2), None), dom(&vm(3), Some(99))],
            |_| Some(vm(3)),
            &mut sink,
        );
        r.event(20, &vm(2), exited(20, &vm(2)), &mut sink);
        r.domains(&[dom(&vm(2), None)], |_| None, &mut sink);
        assert_eq!(sink.seen(), []);
        assert_eq!(sink.vm_count(), 0);
    }

    #[test]
    fn another_hosts_qemu_is_never_reported_nor_its_stalls_nor_its_exit() {
        let mut r = Reporting::new(true);
        let mut sink = Sink::default();
        r.domains(&[dom(&vm(1), Some(10))], |_| None, &mut sink);
        r.event(20, &vm(2), started(20, &vm(2)), &mut sink);
        r.domains(&[dom(&vm(1), Some(10))], |_| Some(vm(2)), &mut sink);
        r.event(20, &vm(2), stall(20, &vm(2), false), &mut sink);
        r.event(20, &vm(2), stall(20, &vm(2), true), &mut sink);
        r.event(20, &vm(2), exited(20, &vm(2)), &mut sink);
        r.domains(&[dom(&vm(1), Some(10))], |_| None, &mut sink);
        assert_eq!(sink.seen(), []);
        assert!(r.held.is_empty() && r.held_exited.is_empty(), "{r:?}");
    }

    #[test]
    fn a_qemu_that_starts_before_the_list_has_its_new_domain_running_is_reported_when_the_next_list_does(
    ) {
        // A domain evacuated here: its qemu's exec may beat the list that has it running.
        let mut r = Reporting::new(true);
        let mut sink = Sink::default();
        r.domains(&[dom(&vm(1), Some(10))], |_| None, &mut sink);
        r.event(30, &vm(3), started(30, &vm(3)), &mut sink);
        r.event(30, &vm(3), stall(30, &vm(3), false), &mut sink);
        // Defined, not yet started.
        r.domains(
            &[dom(&vm(1), Some(10)), dom(&vm(3), None)],
            |_| Some(vm(3)),
            &mut sink,
        );
        assert_eq!(sink.seen(), []);
        r.domains(
            &[dom(&vm(1), Some(10)), dom(&vm(3), Some(30))],
            |_| Some(vm(3)),
            &mut sink,
        );
        assert_eq!(sink.seen(), [("started", 30), ("stall", 30)]);
        // From then on its events go out at once.
        r.event(30, &vm(3), exited(30, &vm(3)), &mut sink);
        assert_eq!(sink.seen().last(), Some(&("exited", 30)));
        assert_eq!(sink.vm_count(), 0);
    }

    #[test]
    fn a_qemu_of_this_host_that_exits_before_the_first_list_is_reported_with_its_start_then_its_exit(
    ) {
        let mut r = Reporting::new(true);
        let mut sink = Sink::default();
        let unnamed = VmIdentity::default();
        r.event(10, &unnamed, started(10, &unnamed), &mut sink);
        // By its exit the monitor knew its VM (libvirt's pid file named it).
        r.event(10, &vm(1), exited(10, &vm(1)), &mut sink);
        // Its pid reused by the next qemu, of a domain that runs here.
        r.event(10, &vm(4), started(10, &vm(4)), &mut sink);
        r.domains(
            &[dom(&vm(1), None), dom(&vm(4), Some(10))],
            |_| Some(vm(4)),
            &mut sink,
        );
        assert_eq!(
            sink.seen(),
            [("started", 10), ("exited", 10), ("started", 10)],
            "the exited life first, then the pid's new one"
        );
        assert!(
            matches!(&sink.0[0], WatchdogEvent::QemuStarted { vm: named, .. } if *named == vm(1))
        );
        assert_eq!(sink.vm_count(), 1);
    }

    #[test]
    fn a_reported_qemu_stays_reported_until_it_exits_even_if_its_domain_leaves_the_list() {
        let mut r = Reporting::new(true);
        let mut sink = Sink::default();
        r.domains(&[dom(&vm(1), Some(10))], |_| None, &mut sink);
        r.event(10, &vm(1), started(10, &vm(1)), &mut sink);
        r.domains(&[], |_| Some(vm(1)), &mut sink);
        r.event(10, &vm(1), stall(10, &vm(1), false), &mut sink);
        r.event(10, &vm(1), exited(10, &vm(1)), &mut sink);
        assert_eq!(
            sink.seen(),
            [("started", 10), ("stall", 10), ("exited", 10)]
        );
        assert_eq!(r.reported(), 0);
    }

    #[test]
    fn another_hosts_qemu_that_stalls_again_and_again_is_held_as_its_start_and_its_current_stall() {
        let mut r = Reporting::new(true);
        let mut sink = Sink::default();
        r.domains(&[], |_| None, &mut sink);
        r.event(20, &vm(2), started(20, &vm(2)), &mut sink);
        for _ in 0..100 {
            r.event(20, &vm(2), stall(20, &vm(2), false), &mut sink);
            r.event(20, &vm(2), stall(20, &vm(2), true), &mut sink);
        }
        r.event(20, &vm(2), stall(20, &vm(2), false), &mut sink);
        r.domains(&[], |_| Some(vm(2)), &mut sink);
        assert_eq!(r.held[&20].events.len(), 2);
        // Should a list say it runs here after all, what is true of it goes out.
        r.domains(&[dom(&vm(2), Some(20))], |_| Some(vm(2)), &mut sink);
        assert_eq!(sink.seen(), [("started", 20), ("stall", 20)]);
    }
}
