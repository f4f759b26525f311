//! defib-watchdog: thin main. Parse the command line and config (exit 64 on a bad
//! config, before anything is loaded), then hand over to the library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use service_manager::LogArgs;
use watchdog::config::{WatchdogConfig, EXIT_BAD_CONFIG};
use watchdog::libvirt::{LibvirtSettings, LibvirtWatcher};
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
    #[command(flatten)]
    log: LogArgs,
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
        /// Also connect to libvirt ([libvirt] uri) and print its domain events and
        /// inventory (default: only if [libvirt] enabled = true).
        #[arg(long)]
        libvirt: bool,
    },
    /// Run the daemon: load the probes, send heartbeats and events to the controller
    /// (needs the [controller] section), until SIGTERM or SIGINT.
    Run {
        /// Also print every event to stdout, one JSON object a line.
        #[arg(long)]
        print_events: bool,
    },
    /// Validate the configuration (and read the controller key, if configured) and
    /// exit (0 if good, 64 if not).
    CheckConfig,
    /// Remove the pinned probes under probes.pin_dir (they detach, their maps are
    /// freed). For taking a host out of service; refused while a daemon runs.
    Unpin,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    service_manager::init_logging(cli.log.format());
    let mut cfg = match WatchdogConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return bad_config(e),
    };
    match cli.command {
        Command::CheckConfig => {
            if let Some(controller) = &cfg.controller {
                if let Err(e) = controller.load_key() {
                    return bad_config(e);
                }
            }
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Unpin => {
            if cfg.probes.pin_dir.is_empty() {
                println!("probes.pin_dir is empty: nothing is pinned");
                return ExitCode::SUCCESS;
            }
            match watchdog::pinning::unpin(std::path::Path::new(&cfg.probes.pin_dir)) {
                Ok(n) => {
                    println!("removed {n} pins under {}", cfg.probes.pin_dir);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("defib-watchdog: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { print_events } => {
            // Everything about the configuration is checked before anything is bound.
            let key = match cfg.controller_for_run().and_then(|c| c.load_key()) {
                Ok(key) => key,
                Err(e) => return bad_config(e),
            };
            match run_daemon(cfg, key, print_events) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("defib-watchdog: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Events {
            json,
            stall_threshold_ms,
            watch_names,
            libvirt,
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
            let libvirt = cfg.libvirt.enabled_for_events(libvirt);
            match run_events(cfg, json, libvirt) {
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

fn run_events(mut cfg: WatchdogConfig, json: bool, libvirt: bool) -> anyhow::Result<()> {
    // `events` follows libvirt only when asked: without its domain list, which qemus are
    // this host's cannot be told, and every one is printed.
    if !libvirt && cfg.libvirt.only_own_domains {
        tracing::info!(
            "libvirt.only_own_domains ignored: `events` runs without libvirt (--libvirt)"
        );
        cfg.libvirt.only_own_domains = false;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = shutdown_signal()?;
        watchdog::mounts::ensure_bpf_filesystems()?;
        let probes = watchdog::probes::Probes::load(&cfg)?;
        tracing::info!("probes attached");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = if libvirt {
            Some(LibvirtWatcher::start(
                LibvirtSettings::from_config(&cfg.libvirt),
                tx,
            )?)
        } else {
            None
        };
        let monitor = Monitor::new(probes, cfg).with_external_events(rx);
        let mut sink = StdoutSink { json };
        let result = monitor.run(&mut sink, shutdown).await;
        if let Some(watcher) = watcher {
            watchdog::daemon::stop_libvirt(watcher).await;
        }
        result
    })
}

fn run_daemon(cfg: WatchdogConfig, key: protocol::Key, print_events: bool) -> anyhow::Result<()> {
    // Two workers: the spool's fsyncs and the monitor's map scans never delay the
    // heartbeats much.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = shutdown_signal()?;
        watchdog::daemon::run(cfg, key, print_events, shutdown).await
    })
}

/// Registers for SIGTERM, SIGINT and SIGHUP now (so one that arrives while the probes
/// load is not fatal) and resolves on SIGTERM or SIGINT, after telling systemd the
/// daemon is stopping. SIGHUP is logged, not obeyed: a restart applies a new
/// configuration, and with pinned probes a restart leaves no blind window. Needs a
/// tokio runtime context.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = term.recv() => break,
                _ = hup.recv() => tracing::info!(
                    "SIGHUP: restart the daemon to apply a new configuration (the pinned probes keep recording meanwhile)"
                ),
            }
        }
        tracing::info!("stopping: draining events to the spool");
        watchdog::systemd::stopping();
    })
}
