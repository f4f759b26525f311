use std::process::ExitCode;

use clap::Parser;
use defibctl::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match defibctl::run(&cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("defibctl: {e}");
            ExitCode::from(1)
        }
    }
}
