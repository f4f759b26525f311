//! defib-controller: thin main. Parse the command line, load and validate the config and
//! read its secrets (exit 64 on any problem, before anything binds), then run.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use controller::config::{ControllerConfig, EXIT_BAD_CONFIG};

#[derive(Parser)]
#[command(
    name = "defib-controller",
    version,
    about = "defib's central failure detector and incident engine"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short = 'c', global = true)]
    config: Option<PathBuf>,
    /// Log as JSON lines on stderr.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run,
    /// Validate the configuration (and read its secrets), then exit: 0 good, 64 bad.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let resolved =
        match ControllerConfig::load(cli.config.as_deref()).and_then(ControllerConfig::resolve) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("defib-controller: bad configuration: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG as u8);
            }
        };
    match cli.command {
        Command::CheckConfig => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Run => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("defib-controller: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(controller::runtime::run(
                resolved,
                shutdown_signal(),
                |_| {},
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("defib-controller: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}
