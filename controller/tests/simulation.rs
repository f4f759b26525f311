//! Deterministic simulation: 1,000 seeded fault scenarios, invariants checked after
//! every step. More seeds: `cargo xtask sim --seeds N` (calls `controller::sim::run_seeds`)
//! or `DEFIB_SIM_SEEDS=N cargo test -p defib-controller --test simulation`.

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
    for v in violations.iter().take(3) {
        eprintln!("{v}");
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
}

#[test]
fn the_same_seed_gives_the_same_run() {
    for seed in [1, 42, 977] {
        let a = sim::run_seed(seed).map(|r| serde_json::to_string(&r).unwrap());
        let b = sim::run_seed(seed).map(|r| serde_json::to_string(&r).unwrap());
        assert_eq!(a.ok(), b.ok());
    }
}
