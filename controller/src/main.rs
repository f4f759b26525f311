//! defib-controller: thin main. Parse the command line, load and validate the config and
//! read its secrets (exit 64 on any problem, before anything binds), then run.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use controller::config::{ControllerConfig, EXIT_BAD_CONFIG};
use controller::runtime::systemd;
use service_manager::LogArgs;

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
    #[command(flatten)]
    log: LogArgs,
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
    service_manager::init_logging(cli.log.format());
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
            match rt.block_on(async {
                controller::runtime::run(resolved, shutdown_signal(), |bound| {
                    systemd::ready(&format!("api on {}", bound.api));
                })
                .await
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("defib-controller: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (then tells systemd the daemon is stopping). SIGHUP is
/// taken and logged rather than left to its default (which would kill the daemon): the
/// configuration is applied by a restart, which resumes from the store's intents.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot register signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => tracing::info!(
                "SIGHUP: the controller has nothing to reload live; restart it to apply a new configuration (it resumes from its intents)"
            ),
        }
    }
    tracing::info!("stopping: draining the engine and flushing the store");
    systemd::stopping();
}
