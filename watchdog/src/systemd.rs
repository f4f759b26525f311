//! systemd's service protocol, shared with the controller (see the
//! `defib-service-manager` crate).
pub use service_manager::{ready, stopping, WatchdogPinger};
