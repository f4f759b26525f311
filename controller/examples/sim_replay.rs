//! Replays one simulation seed and prints its whole trace: `cargo xtask sim --seed S`.
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(seed) = std::env::args().nth(1).and_then(|s| s.parse::<u64>().ok()) else {
        eprintln!("usage: sim_replay SEED");
        return ExitCode::from(64);
    };
    let (outcome, trace) = controller::sim::replay_seed(seed);
    for line in &trace {
        println!("{line}");
    }
    match outcome {
        Ok(report) => {
            println!("seed {seed}: every invariant held: {report:?}");
            ExitCode::SUCCESS
        }
        Err(v) => {
            println!(
                "seed {seed} at {} ms: {:?}: {}",
                v.at, v.invariant, v.detail
            );
            ExitCode::FAILURE
        }
    }
}
