//! What both defib daemons share to run as services: systemd's protocol (readiness,
//! watchdog pings, stopping), their log flags and logging, and the range check of their
//! configurations.
mod config;
mod logs;
mod systemd;

pub use config::{check_range, OutOfRange};
pub use logs::{init_logging, LogArgs, LogFormat};
pub use systemd::{ready, stopping, WatchdogPinger};
