//! Deterministic simulation of the engine against a fake world.
//!
//! A seed picks a cloud (3–6 hosts, VMs and routers), engine settings (fixed or
//! phi-accrual detector, self-fence on or off) and a fault schedule ([`Fault`], plain
//! data): host crashes and hangs, partitions between the controller and hosts (one
//! path or all), the controller cut off from everyone, flapping heartbeats, VM crashes
//! (seen by eBPF and libvirt, sometimes duplicated, sometimes late), maintenance,
//! controller restarts (the engine rebuilt with [`Engine::resume`] from the intent
//! log), broken BMCs, and random fence, confirmation and restore failures. On half the
//! seeds libvirt autostarts each VM on the host it first ran on: a host powered on again
//! starts a stale copy of every VM moved off it meanwhile, which only a destroy command
//! (`StopStaleCopy`, carried over the host's stream while the controller hears it)
//! stops. Effectors are fakes that act on the world after a delay and report back. At
//! `heal_at` every fault is lifted and the world runs until `end_at`.
//!
//! What issue 14 added:
//!
//! * one-way networks: a host that hears nothing from the controller while its
//!   heartbeats arrive ([`Fault::HostDeaf`]: no acks, its stream down), and one whose
//!   heartbeats are lost while its stream works ([`Fault::HeartbeatsLost`]); the
//!   world's self-fence counts from the send time of the last acked heartbeat, and a
//!   watchdog is armed (says so in its heartbeats) only once acked after its boot;
//! * late heartbeats, out of order ([`Fault::HeartbeatDelay`], up to 800 ms each);
//! * hosts' clocks drifting (up to ±500 ppm, or ±2 % on a clock gone wrong) on top of
//!   their offsets;
//! * the restorer per seed: Nova (keeps where each server went: an evacuation handed
//!   again is answered with its host) or the libvirt backend (`vm_restorer = Libvirt`:
//!   it picks the target when it sends the start and forgets it with its process, so an
//!   evacuation open at a restart becomes `Unknown { target: None }` and every host is
//!   asked; handed again, it would start a second copy);
//! * evacuations of VMs whose answer is lost after they were sent: `Unknown` with the
//!   target, the VM started there or not; a start sent to a target that dies; and, on a
//!   few seeds, a start carried out whose answer never comes at all (the engine's
//!   backstop, `unanswered_after`, 5 s here, hands it again or takes it as not known;
//!   [`Report::unanswered_open_at_end`] counts those still awaited at the end);
//! * the libvirt backend's restarts in place answered `Unknown` on their host, the
//!   domain started or not;
//! * a failing store: a write of an intent or of its outcome fails, or the process dies
//!   right after it; the controller acts on nothing more and restarts from what was
//!   written (after the event that killed it);
//! * self-fences that cannot kill (no permission, no watchdog device): the host's
//!   watchdog says "not armed" and does nothing when cut off; a hung daemon is a hung
//!   host, which an armed watchdog device powers off;
//! * hosts answering [`Action::AskHost`] from what runs there (a stale copy too), after
//!   every start sent to them before, over their stream while the controller hears
//!   them, sometimes with "cannot say"; the answer is lost with a restarted controller.
//!
//! What issue 15 added: several controllers sharing one store, electing a leader on
//! etcd (`leader.rs`):
//!
//! * two controller processes (three on a quarter of the seeds) and one modelled etcd:
//!   one lease at a time with the leader key bound to it, a TTL of 3 s (scaled like the
//!   run), renewed by the leader's keep-alives every second; etcd's lessor looks for
//!   expired leases every 500 ms (so a lease lives TTL to TTL + 0.5 s after the last
//!   keep-alive it received); with no leader key, the controllers that reach etcd
//!   campaign and one wins: its term resumes from the shared intent log with
//!   [`Engine::resume_knowing`], as a restarted controller does (its edges' memory and
//!   timers are its own, its wall clock stepped like a restart's, the open intents
//!   handed again), and reloads Nova's inventory;
//! * every store write of the leader is an etcd transaction guarded by its lease: it
//!   fails when the leader key is gone or bound to another lease (refused by the
//!   guard), or goes unanswered when etcd is out of reach or has no quorum; either stops
//!   the leader before anything after it in its batch, as a failed write does;
//! * the leader's local deadline: it stops acting at the send time of its last
//!   keep-alive etcd answered, plus TTL − 500 ms, on its own monotonic clock, which
//!   drifts (±500 ppm, or ±2 % on a clock gone wrong); it checks before every action
//!   and when the deadline comes; a leader that stops gives its lease back when it
//!   reaches etcd (a follower takes over at once);
//! * faults ([`Fault::LeaderKilled`], [`Fault::LeaderCutFromEtcd`],
//!   [`Fault::EtcdDown`], [`Fault::KeepAliveDelay`], [`Fault::LeaderStall`]): the leader
//!   killed (its lease lingers until it expires; the process starts again, a follower,
//!   0.5–2.5 s later); the leader cut off from etcd while it still hears the hosts (it
//!   runs its engine until its local deadline); etcd without quorum for up to 6 s (no
//!   write, no renewal, no election; a new etcd leader extends the leases, as etcd
//!   3.4's lessor does); etcd's answers to keep-alives late by up to 2.5 s; the leader's
//!   process stalled between its deadline check and its next write reaching etcd
//!   (50–400 ms, or 3–6 s: longer than the TTL, so another leads when the write
//!   arrives, and the guard must refuse it). [`Fault::ControllerRestart`] now restarts
//!   the leader's process (it gives its lease back first), and a failed store write
//!   kills it (its lease expires);
//! * a deposed leader's actions already handed to the world still complete there, their
//!   answers going nowhere, as with a controller that dies mid-action; the hosts' event
//!   streams are the leader's (events that reach no leader are sent again to the next);
//!   heartbeats reach every controller, and every controller acks them;
//! * the run goes on past `end_at` until a leader has acted for 5 s;
//! * [`Fault::ControllerIsolated`] cuts every controller off the hosts (they share a
//!   network).
//!
//! Found with it (seed 8069): a restart in place handed again by a new leader, whose
//! edge could not carry it out (its host hung), was read as "not running" and the VM
//! evacuated while the former leader's hand had started it there. The engine now takes
//! a re-handed restart that fails as not known and asks the host.
//!
//! Not modelled: the timeline lines (store writes too in the runtime, guarded alike)
//! are not written; a write whose answer is lost on a cut but applied (the store
//! failure "written, then the process died" covers a write applied unheard); the new
//! leader is not given the follower's knowledge of when each host was last heard (it
//! starts every host's detector afresh, as after a restart); a stall between the
//! deadline check and a send that writes nothing (`AskHost`, `StopStaleCopy`,
//! `Confirm`, alarms: only the local deadline keeps those from a deposed leader);
//! controllers hearing the hosts differently.
//!
//! Invariants, checked after every step (see [`Invariant`]):
//!
//! * no restore before a verified fence (and, in the world, no VM ever runs twice);
//! * never two owners for one resource;
//! * no VM left behind (after every step: every resource not settled has an owner;
//!   at the end, with a leader acting: every dead VM is restored, given up with an
//!   alarm, or behind a host the engine holds with an alarm);
//! * no action issued twice, across restarts and leaders (every world action was persisted first,
//!   no key is persisted twice, a done key is never issued again, and one engine hands
//!   an open key again only as its backstop for a lost answer, not sooner);
//! * one leader at a time ([`Invariant::OneLeader`]): every action that leaves a
//!   controller, and every store write, comes from the holder of the lease that is the
//!   leader key's on etcd's side at that instant; every world action an edge carries out
//!   (maybe after its controller stopped) had its intent written under a lease live on
//!   etcd at that write (by etcd's revisions); when a lease expires or is revoked on
//!   etcd's side its holder no longer acts (rule 9; a holder stalled before a write is
//!   the guard's to stop, and that write must be refused); no takeover while the former
//!   leader still acts;
//! * a new leader's first action comes after the last action of every earlier one
//!   ([`Invariant::LeadersInOrder`]);
//! * stale copies are destroyed (at the end, a copy on a host the controller hears, of
//!   a VM the engine has settled elsewhere, on a host still fenced or whose incident
//!   moved it off, is asked to be destroyed by the host's next listing; the others are
//!   counted in [`Report::stale_copies_left`]).
//!
//! [`run_seeds`] is the entry point for `cargo xtask sim --seeds N`.

mod effectors;
mod invariants;
mod leader;
mod rng;
mod scenario;
mod world;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::detector::DetectorConfig;
use crate::engine::{
    Action, Config, Engine, FenceOutcome, FenceVerifier, Heartbeat, HostEvent, HostId, HostState,
    HostTime, Input, Intent, IntentKey, IntentLog, IntentOutcome, ListedAt, MemoryIntentLog,
    OperatorCommand, PathId, Resource, ResourceState, RestoreOutcome, Source, Timestamp, Verdict,
};

pub use invariants::{Invariant, Violation};
use leader::{Ctl, Etcd, EtcdLease, Stalled, StepDown};
pub use rng::Rng;
pub use scenario::{Fault, Scenario};
use world::{by_controller_lister, Ev, Queued, Sim};

/// What one scenario did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Hosts turned Suspect (true or false: the slow-controller suite expects none).
    pub suspects: u64,
    /// Engine steps taken.
    pub steps: u64,
    /// Faults injected.
    pub faults: usize,
    /// Fences issued (world actions, not counting resumed re-hands).
    pub fences: u64,
    /// Restarts in place issued.
    pub restarts: u64,
    /// Evacuations issued.
    pub evacuations: u64,
    /// Alarms raised.
    pub alarms: u64,
    /// Controller processes restarted: the leader's restarts, kills, and deaths after a
    /// store write (each starts again as a follower).
    pub controller_restarts: u64,
    /// Resources given up on at the end.
    pub gave_up: u64,
    /// Resources dead at the end, behind a held (alarmed) host.
    pub held: u64,
    /// Stale copies a returning host's autostart started (the VM ran elsewhere).
    #[serde(default)]
    pub stale_copies_started: u64,
    /// Stale copies a destroy command stopped.
    #[serde(default)]
    pub stale_copies_destroyed: u64,
    /// Stale copies left at the end on a host the controller hears, that the engine
    /// does not destroy: the host was trusted again before the VM was settled elsewhere,
    /// or the VM is not settled (the stale-resource alarm reports them).
    #[serde(default)]
    pub stale_copies_left: u64,
    /// `StopStaleCopy` actions the engine issued.
    #[serde(default)]
    pub stale_copy_stops: u64,
    /// Fences verified by a host's storage fence (its Ceph blocklist) alone.
    #[serde(default)]
    pub storage_fences: u64,
    /// VMs on RBD restored elsewhere while their old copy ran on, blocklisted.
    #[serde(default)]
    pub restored_past_blocklist: u64,
    /// Hosts whose disk-lease daemon died.
    #[serde(default)]
    pub lease_daemon_deaths: u64,
    /// Closed incidents the engines forgot (the scenarios keep 1 in memory).
    #[serde(default)]
    pub incidents_forgotten: u64,
    /// VMs started on a host whose lease daemon was dead at that moment: sent before its
    /// watchdog's word reached the engine (the word's way, 1 to 40 ms, or longer while
    /// its stream is down), never after (the LeaseLossHonoured invariant).
    #[serde(default)]
    pub restored_onto_lost_leases: u64,
    /// Restores (evacuations, and the libvirt backend's restarts in place) whose edge
    /// reported `Unknown` (started or not).
    #[serde(default)]
    pub restores_unknown: u64,
    /// `AskHost` actions the engine issued.
    #[serde(default)]
    pub asks: u64,
    /// Evacuations carried out whose answer never reached the engine.
    #[serde(default)]
    pub answers_lost: u64,
    /// Of those, the ones whose intent was still open at the end (the engine still
    /// waiting for an answer that will never come).
    #[serde(default)]
    pub unanswered_open_at_end: u64,
    /// Store writes that failed (or after which the process died): each stopped the
    /// controller, which restarted from what was written.
    #[serde(default)]
    pub store_failures: u64,
    /// Terms after the first: a controller won the leader key and resumed from the
    /// intent log (the same controller again counts too).
    #[serde(default)]
    pub leader_changes: u64,
    /// Store writes of a deposed leader that etcd's guard refused (its lease no longer
    /// the leader key's).
    #[serde(default)]
    pub guard_refusals: u64,
    /// Leaders that stopped at their local deadline (no keep-alive answered for
    /// TTL − margin).
    #[serde(default)]
    pub deadline_stops: u64,
    /// Leaders whose store write went unanswered (etcd unreachable or without quorum),
    /// and stopped.
    #[serde(default)]
    pub etcd_write_failures: u64,
    /// etcd outages (no quorum).
    #[serde(default)]
    pub etcd_outages: u64,
    /// Leaders killed (SIGKILL).
    #[serde(default)]
    pub leader_kills: u64,
    /// Leaders stalled before a store write.
    #[serde(default)]
    pub leader_stalls: u64,
    /// Time without a controller acting, up to `end_at` (ms).
    #[serde(default)]
    pub leaderless_ms: u64,
    /// A digest (FNV-1a) of every traced line, in order: two runs with equal digests
    /// took the same steps (determinism is checked on this, not on counts).
    pub trace_digest: u64,
}

/// The summary of many seeds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Totals over all seeds.
    pub totals: Report,
    /// Every violation found.
    pub violations: Vec<Violation>,
}

/// Runs one seed.
pub fn run_seed(seed: u64) -> Result<Report, Box<Violation>> {
    let sc = Scenario::generate(seed);
    run_scenario(&sc)
}

/// Runs one seed and keeps its whole trace (every input but heartbeats and timers, every
/// action but timers): `cargo xtask sim --seed S` prints it, to replay a failing seed.
pub fn replay_seed(seed: u64) -> (Result<Report, Box<Violation>>, Vec<String>) {
    replay_scenario(&Scenario::generate(seed))
}

/// [`replay_seed`] for a scenario (possibly hand-written): its outcome and whole trace.
pub fn replay_scenario(sc: &Scenario) -> (Result<Report, Box<Violation>>, Vec<String>) {
    let mut sim = Sim::new(sc);
    sim.keep_whole_trace = true;
    let r = run_sim(&mut sim);
    (r, std::mem::take(&mut sim.trace))
}

/// Runs every seed in the range; `cargo xtask sim --seeds N` calls this with `0..N`.
pub fn run_seeds(seeds: Range<u64>) -> Summary {
    let mut s = Summary::default();
    for seed in seeds {
        s.seeds += 1;
        match run_seed(seed) {
            Ok(r) => {
                let t = &mut s.totals;
                t.steps += r.steps;
                t.faults += r.faults;
                t.fences += r.fences;
                t.restarts += r.restarts;
                t.evacuations += r.evacuations;
                t.alarms += r.alarms;
                t.controller_restarts += r.controller_restarts;
                t.gave_up += r.gave_up;
                t.held += r.held;
                t.stale_copies_started += r.stale_copies_started;
                t.stale_copies_destroyed += r.stale_copies_destroyed;
                t.stale_copies_left += r.stale_copies_left;
                t.stale_copy_stops += r.stale_copy_stops;
                t.storage_fences += r.storage_fences;
                t.restored_past_blocklist += r.restored_past_blocklist;
                t.lease_daemon_deaths += r.lease_daemon_deaths;
                t.incidents_forgotten += r.incidents_forgotten;
                t.restored_onto_lost_leases += r.restored_onto_lost_leases;
                t.restores_unknown += r.restores_unknown;
                t.asks += r.asks;
                t.answers_lost += r.answers_lost;
                t.unanswered_open_at_end += r.unanswered_open_at_end;
                t.store_failures += r.store_failures;
                t.leader_changes += r.leader_changes;
                t.guard_refusals += r.guard_refusals;
                t.deadline_stops += r.deadline_stops;
                t.etcd_write_failures += r.etcd_write_failures;
                t.etcd_outages += r.etcd_outages;
                t.leader_kills += r.leader_kills;
                t.leader_stalls += r.leader_stalls;
                t.leaderless_ms += r.leaderless_ms;
                t.trace_digest ^= r.trace_digest.rotate_left((seed % 64) as u32);
            }
            Err(v) => s.violations.push(*v),
        }
    }
    s
}

/// Runs a scenario (possibly hand-written).
pub fn run_scenario(sc: &Scenario) -> Result<Report, Box<Violation>> {
    run_sim(&mut Sim::new(sc))
}

fn run_sim(sim: &mut Sim<'_>) -> Result<Report, Box<Violation>> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    match r {
        Ok(Ok(())) => Ok(sim.report.clone()),
        Ok(Err(v)) => Err(v),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Box::new(
                sim.violation(Invariant::NoPanic, format!("panic: {msg}")),
            ))
        }
    }
}
