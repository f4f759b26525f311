//! defib-watchdog: thin main. Parse the command line and config (exit 64 on a bad
//! config, before anything is loaded), then hand over to the library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use watchdog::config::{WatchdogConfig, EXIT_BAD_CONFIG};
use watchdog::monitor::{Monitor, StdoutSink};

#[derive(Parser)]
#[command(
    name = "defib-watchdog",
    version,
    about = "defib host watchdog: eBPF probes for qemu exits and disk stalls"
)]
struct Cli {
    /// TOML configuration file (every field has a default).
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
    /// Load the probes and print every event about watched processes to stdout.
    Events {
        /// One JSON object a line instead of human lines.
        #[arg(long)]
        json: bool,
        /// Override probes.stall_threshold_ms.
        #[arg(long)]
        stall_threshold_ms: Option<u64>,
        /// Override probes.watch_names (repeat for several).
        #[arg(long = "watch-name")]
        watch_names: Vec<String>,
    },
    /// Validate the configuration and exit (0 if good, 64 if not).
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let mut cfg = match WatchdogConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return bad_config(e),
    };
    match cli.command {
        Command::CheckConfig => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Events {
            json,
            stall_threshold_ms,
            watch_names,
        } => {
            if let Some(t) = stall_threshold_ms {
                cfg.probes.stall_threshold_ms = t;
            }
            if !watch_names.is_empty() {
                cfg.probes.watch_names = watch_names;
            }
            if let Err(e) = cfg.validate() {
                return bad_config(e);
            }
            match run_events(cfg, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("defib-watchdog: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn bad_config(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("defib-watchdog: bad configuration: {e}");
    ExitCode::from(EXIT_BAD_CONFIG as u8)
}

fn run_events(cfg: WatchdogConfig, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        watchdog::mounts::ensure_bpf_filesystems()?;
        let probes = watchdog::probes::Probes::load(&cfg)?;
        tracing::info!("probes attached");
        let monitor = Monitor::new(probes, cfg);
        let mut sink = StdoutSink { json };
        monitor.run(&mut sink, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
