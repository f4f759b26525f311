//! defib-controller: the failure detector, the incident engine and (later) the
//! effectors, store, REST API and metrics around them.
//!
//! The pure parts:
//!
//! * [`detector`]: heartbeats in, per-host liveness out (fixed k × interval or
//!   phi-accrual).
//! * [`engine`]: the sans-IO incident engine (inputs in, actions out, clock passed in).
//! * [`sim`]: a deterministic, seeded simulation of the engine against a fake world,
//!   with invariants checked after every step (`cargo xtask sim --seeds N` calls
//!   [`sim::run_seeds`]).

pub mod api;
pub mod arrange;
pub mod config;
pub mod detector;
pub mod engine;
pub mod fence;
pub mod openstack;
pub mod runtime;
pub mod sim;
pub mod store;
