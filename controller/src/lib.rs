//! defib-controller: the failure detector and incident engine, the edges that carry its
//! decisions out, and the store, REST API and metrics around them.
//!
//! The crate's map (docs/architecture.md draws it, with a heartbeat's and an
//! evacuation's path through it):
//!
//! * [`engine`]: the pure, sans-IO incident engine (inputs in, actions out, clock passed
//!   in), with its failure detector; the only place decisions are made.
//! * [`sim`]: a deterministic, seeded simulation of the engine against a fake world,
//!   with invariants checked after every step (`cargo xtask sim --seeds N`).
//! * [`edges`]: fencing, confirmation and restore backends (IPMI, fence agents,
//!   Pacemaker, Nova, Neutron, libvirt) behind small traits that speak typed facts.
//! * [`arrange`]: the pure arrangement scheduler the Nova edge plans evacuations with.
//! * [`openstack`]: the Keystone, Nova, Placement and Neutron client.
//! * [`store`]: intents, timelines and event marks (SQLite, or in memory).
//! * [`ha`]: several controllers: the leader election on etcd and the store there.
//! * [`config`]: the configuration file, parsed and validated (exit 64 on a bad one).
//! * [`runtime`]: builds everything from the configuration, binds, and serves: intake,
//!   the engine task, the edges.
//! * [`api`]: the REST API and the snapshot it serves (`defibctl` reads only this).
//! * [`tls`]: the controller's TLS certificate and key, one rustls configuration for
//!   every TLS listener.
//! * [`clock`], [`metrics`]: the engine's clock; the Prometheus metrics.

pub mod api;
pub mod arrange;
pub mod clock;
pub mod config;
pub mod edges;
pub mod engine;
pub mod ha;
pub mod metrics;
pub mod openstack;
pub mod runtime;
pub mod sim;
pub mod store;
pub mod tls;
