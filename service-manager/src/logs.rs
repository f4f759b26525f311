//! How a daemon logs on stderr: the format flags both command lines take, and the
//! subscriber they set up.
/// `--log-format`: how a daemon logs on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human lines.
    Text,
    /// One JSON object a line, for journald or a log shipper.
    Json,
}

/// Logs to stderr at `RUST_LOG` (default `info`), in `format`.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
