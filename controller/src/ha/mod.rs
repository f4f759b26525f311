//! Several controllers, one leader: the election on an etcd lease and the intent store
//! on etcd, every write guarded by that lease (DESIGN rule 9).
//!
//! * [`conn`]: one etcd connection that fails over between members, every call bounded;
//! * [`deadline`]: the leader's local deadline (it stops before etcd can expire it);
//! * [`leadership`]: the election task, publishing this controller's [`Role`];
//! * [`store`]: [`EtcdStore`], the [`Store`](crate::store::Store) on etcd.
//!
//! The runtime (`runtime::ha`) runs the engine only while this controller leads.
pub mod conn;
pub mod deadline;
pub mod leadership;
pub mod store;

use std::time::Duration;

pub use leadership::{Guard, LeaderRecord, LeadershipHandle, LeadershipState, MemberRecord, Role};
pub use store::EtcdStore;

/// `[etcd]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    /// `http://host:port` of each member.
    pub endpoints: Vec<String>,
    /// The lease asked for.
    pub lease_ttl: Duration,
    /// Stop acting this long before the lease can expire.
    pub stop_margin: Duration,
    /// Bound of every etcd call.
    pub call_timeout: Duration,
    /// A follower's campaign period.
    pub campaign_every: Duration,
    /// `<prefix><cluster>/`: every key of this cluster lives under it.
    pub prefix: String,
    /// `controller.id`.
    pub controller_id: String,
    /// This controller's API URL, for the others to point at.
    pub advertise_api: String,
}
