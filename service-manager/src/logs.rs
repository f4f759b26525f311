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

/// The log flags both daemons take, flattened into their command lines
/// (`#[command(flatten)]`); global, so they go before or after the subcommand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr: `text`, or `json` (one object a line, for journald or a
    /// log shipper).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Same as `--log-format json`.
    #[arg(long, global = true)]
    pub log_json: bool,
}

impl LogArgs {
    /// The format asked for: `--log-json` wins over `--log-format`.
    pub fn format(&self) -> LogFormat {
        if self.log_json {
            LogFormat::Json
        } else {
            self.log_format
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(clap::Subcommand)]
    enum Command {
        Run,
    }

    fn format(args: &[&str]) -> LogFormat {
        Cli::try_parse_from(args).unwrap().log.format()
    }

    #[test]
    fn text_by_default_json_on_either_flag_and_on_either_side_of_the_subcommand() {
        assert_eq!(format(&["d", "run"]), LogFormat::Text);
        assert_eq!(format(&["d", "--log-json", "run"]), LogFormat::Json);
        assert_eq!(format(&["d", "run", "--log-json"]), LogFormat::Json);
        assert_eq!(
            format(&["d", "--log-format", "json", "run"]),
            LogFormat::Json
        );
        assert_eq!(
            format(&["d", "run", "--log-format", "json"]),
            LogFormat::Json
        );
        assert_eq!(
            format(&["d", "--log-format", "text", "--log-json", "run"]),
            LogFormat::Json
        );
        assert!(Cli::try_parse_from(["d", "--log-format", "xml", "run"]).is_err());
    }
}
