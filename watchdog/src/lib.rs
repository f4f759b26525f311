//! defib-watchdog: the host half of defib. See the crate README and docs/.
pub mod btf;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod events;
pub mod libvirt;
pub mod monitor;
pub mod mounts;
pub mod pinning;
pub mod probes;
pub mod procfs;
pub mod records;
pub mod reporting;
pub mod selffence;
pub mod stall;
pub mod systemd;
pub mod uplink;
