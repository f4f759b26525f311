//! Deterministic simulation: 1,000 seeded fault scenarios, invariants checked after
//! every step. More seeds: `cargo xtask sim --seeds N` (calls `controller::sim::run_seeds`)
//! or `DEFIB_SIM_SEEDS=N cargo test -p defib-controller --test simulation`. One seed's
//! whole trace, to replay a failure: `cargo xtask sim --seed S`.

use controller::sim;

fn seeds() -> u64 {
    std::env::var("DEFIB_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000)
}

#[test]
fn a_thousand_seeded_fault_scenarios_keep_every_invariant() {
    let n = seeds();
    // Two halves on two threads (the machine has two cores).
    let half = n / 2;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| sim::run_seeds(0..half));
        let b = s.spawn(|| sim::run_seeds(half..n));
        (a.join().expect("sim thread"), b.join().expect("sim thread"))
    });
    let violations: Vec<_> = a.violations.iter().chain(b.violations.iter()).collect();
    let steps = a.totals.steps + b.totals.steps;
    let fences = a.totals.fences + b.totals.fences;
    let evacuations = a.totals.evacuations + b.totals.evacuations;
    let restarts = a.totals.restarts + b.totals.restarts;
    let resumes = a.totals.controller_restarts + b.totals.controller_restarts;
    eprintln!(
        "{n} seeds, {steps} steps, {fences} fences, {restarts} restarts in place, {evacuations} evacuations, {resumes} controller restarts, {} violations",
        violations.len()
    );
    let copies_started = a.totals.stale_copies_started + b.totals.stale_copies_started;
    let copies_destroyed = a.totals.stale_copies_destroyed + b.totals.stale_copies_destroyed;
    let copies_left = a.totals.stale_copies_left + b.totals.stale_copies_left;
    let stops = a.totals.stale_copy_stops + b.totals.stale_copy_stops;
    eprintln!(
        "stale copies: {copies_started} autostarted on a host's return, {copies_destroyed} destroyed, {copies_left} left at the end (reported, not destroyable), {stops} StopStaleCopy actions"
    );
    let unknown = a.totals.restores_unknown + b.totals.restores_unknown;
    let asks = a.totals.asks + b.totals.asks;
    let lost = a.totals.answers_lost + b.totals.answers_lost;
    let stuck = a.totals.unanswered_open_at_end + b.totals.unanswered_open_at_end;
    eprintln!(
        "unknown outcomes: {unknown} restores (evacuations, restarts in place) answered Unknown, {asks} AskHost actions, {lost} evacuations never answered ({stuck} of them still awaited at the end)"
    );
    let store = a.totals.store_failures + b.totals.store_failures;
    eprintln!("store: {store} writes failed or were the last before the process died");
    for v in violations.iter().take(3) {
        eprintln!("{v}");
        eprintln!(
            "  replay it step by step: cargo xtask sim --seed {}",
            v.seed
        );
    }
    assert!(
        violations.is_empty(),
        "{} seeds broke an invariant",
        violations.len()
    );
    // The scenarios must actually exercise the interesting paths.
    assert!(fences > n / 10, "too few fences: {fences}");
    assert!(evacuations > n / 10, "too few evacuations: {evacuations}");
    assert!(restarts > n / 10, "too few restarts: {restarts}");
    assert!(resumes > n / 10, "too few controller restarts: {resumes}");
    assert!(
        copies_destroyed > n / 100,
        "too few stale copies destroyed: {copies_destroyed}"
    );
}

#[test]
fn the_same_seed_gives_the_same_run_step_for_step() {
    // Compared on the whole outcome, trace digest included (or the violation with its
    // trace), so two runs that fail alike or take different steps to the same counts
    // are told apart.
    for seed in [1, 42, 977, 65_488] {
        let a = serde_json::to_string(&sim::run_seed(seed)).unwrap();
        let b = serde_json::to_string(&sim::run_seed(seed)).unwrap();
        assert_eq!(a, b, "seed {seed}");
    }
}

#[test]
fn different_seeds_take_different_steps() {
    // The check above would pass on a digest that never changes.
    let digests: std::collections::BTreeSet<u64> = (0..20)
        .map(|seed| sim::run_seed(seed).expect("a clean seed").trace_digest)
        .collect();
    assert_eq!(digests.len(), 20);
}

#[test]
fn a_replayed_seed_has_its_whole_trace_and_the_same_outcome() {
    for seed in [42, 65_488] {
        let (replayed, trace) = sim::replay_seed(seed);
        let digest = replayed.expect("a clean seed").trace_digest;
        assert_eq!(digest, sim::run_seed(seed).unwrap().trace_digest);
        // Every line that went into the digest is in the trace, in order.
        let mut d: u64 = 0xcbf2_9ce4_8422_2325;
        for b in trace.iter().flat_map(|l| l.bytes().chain([b'\n'])) {
            d = (d ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(d, digest, "seed {seed}: {} lines", trace.len());
    }
}
