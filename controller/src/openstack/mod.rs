//! A small OpenStack client (reqwest) for what the controller needs from Nova,
//! Placement and Neutron: authentication (Keystone v3 password or application credential, a
//! `clouds.yaml` cloud, or the identity headers of a cloud without Keystone such as the
//! project's novabed), endpoints from the Keystone catalog or given, microversion
//! headers, clear errors for 4xx/5xx, and retries with backoff for transient failures.
//!
//! ```text
//! Session::request(service, method, path, body)
//!   ├─ token (Keystone: cached, renewed 2 min before it expires or after a 401)
//!   ├─ endpoint (override, or catalog by service type / interface / region)
//!   ├─ OpenStack-API-Version: compute 2.94 | placement 1.39
//!   └─ transient failure (connect error, timeout, 429, 502, 503, 504): retried with
//!      exponential backoff; a POST only when the request surely did not run
//! ```
pub mod clouds;
pub mod compute;
pub mod keystone;
pub mod network;
mod session;

pub use keystone::{Auth, Credentials};
pub use session::{Method, OsError, RetryPolicy, Service, Session, SessionConfig};
