//! The Neutron calls the router restorer makes, typed: L3 agents, their routers, and
//! moving a router from one agent to another (Neutron's l3_agent_scheduler extension).
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::session::{Method, OsError, Service, Session};

/// Neutron's name for the L3 agent type (`agent_type` filter and field).
pub const L3_AGENT_TYPE: &str = "L3 agent";

/// An agent as `GET /v2.0/agents` shows it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Agent {
    pub id: String,
    pub host: String,
    #[serde(default)]
    pub agent_type: String,
    /// Neutron's own liveness: a state report within its `agent_down_time`.
    #[serde(default)]
    pub alive: bool,
    #[serde(default)]
    pub admin_state_up: bool,
    /// What the agent reported last (an L3 agent: `routers`, `agent_mode`, ...).
    #[serde(default)]
    pub configurations: Value,
}

impl Agent {
    /// The number of routers the agent itself says it serves (its last report).
    pub fn reported_routers(&self) -> Option<u64> {
        self.configurations.get("routers").and_then(Value::as_u64)
    }
}

/// A router as the agent and router APIs show it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Router {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// HA (VRRP) router: Neutron fails it over by itself (admin only; absent without
    /// the l3-ha extension).
    #[serde(default)]
    pub ha: Option<bool>,
    /// DVR router (its bindings are per compute host; not moved here).
    #[serde(default)]
    pub distributed: Option<bool>,
}

impl Router {
    /// Neutron moves it itself (VRRP between its agents) or has no single binding (DVR).
    pub fn failover_by_neutron(&self) -> bool {
        self.ha == Some(true) || self.distributed == Some(true)
    }
}

#[derive(Deserialize)]
struct Agents {
    agents: Vec<Agent>,
}
#[derive(Deserialize)]
struct Routers {
    routers: Vec<Router>,
}
#[derive(Deserialize)]
struct OneRouter {
    router: Router,
}

/// Neutron's API (`/v2.0`), through the shared [`Session`].
#[derive(Clone)]
pub struct Network {
    pub session: Arc<Session>,
}

/// Percent-encodes a query value (agent types have spaces, host names may have more).
fn enc(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Network {
    pub fn new(session: Arc<Session>) -> Self {
        Network { session }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, OsError> {
        self.session
            .request(Service::Network, Method::Get, path, None)
            .await
    }

    /// The L3 agents, all or those of `host`.
    pub async fn l3_agents(&self, host: Option<&str>) -> Result<Vec<Agent>, OsError> {
        let mut path = format!("/v2.0/agents?agent_type={}", enc(L3_AGENT_TYPE));
        if let Some(h) = host {
            path.push_str(&format!("&host={}", enc(h)));
        }
        Ok(self.get::<Agents>(&path).await?.agents)
    }

    /// The routers bound to an L3 agent.
    pub async fn agent_routers(&self, agent: &str) -> Result<Vec<Router>, OsError> {
        Ok(self
            .get::<Routers>(&format!("/v2.0/agents/{agent}/l3-routers"))
            .await?
            .routers)
    }

    /// The L3 agents a router is bound to.
    pub async fn router_agents(&self, router: &str) -> Result<Vec<Agent>, OsError> {
        Ok(self
            .get::<Agents>(&format!("/v2.0/routers/{router}/l3-agents"))
            .await?
            .agents)
    }

    pub async fn router(&self, router: &str) -> Result<Router, OsError> {
        Ok(self
            .get::<OneRouter>(&format!("/v2.0/routers/{router}"))
            .await?
            .router)
    }

    /// Unbinds `router` from `agent`. Already unbound (404) counts as done: the call is
    /// repeated after a controller restart.
    pub async fn remove_router(&self, agent: &str, router: &str) -> Result<(), OsError> {
        match self
            .session
            .request_raw(
                Service::Network,
                Method::Delete,
                &format!("/v2.0/agents/{agent}/l3-routers/{router}"),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Binds `router` to `agent` (Neutron refuses a legacy router bound elsewhere: 409).
    pub async fn add_router(&self, agent: &str, router: &str) -> Result<(), OsError> {
        self.session
            .request_raw(
                Service::Network,
                Method::Post,
                &format!("/v2.0/agents/{agent}/l3-routers"),
                Some(&json!({ "router_id": router })),
            )
            .await
            .map(|_| ())
    }

    /// Enables or disables an agent: Neutron's schedulers skip an admin-down agent, and
    /// its sync returns no routers.
    pub async fn set_agent_admin_state(&self, agent: &str, up: bool) -> Result<(), OsError> {
        self.session
            .request_raw(
                Service::Network,
                Method::Put,
                &format!("/v2.0/agents/{agent}"),
                Some(&json!({ "agent": { "admin_state_up": up } })),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(enc("L3 agent"), "L3%20agent");
        assert_eq!(enc("net-1.example"), "net-1.example");
    }

    #[test]
    fn ha_and_dvr_routers_are_left_to_neutron() {
        let r: Router =
            serde_json::from_value(json!({"id": "r", "ha": true, "distributed": false})).unwrap();
        assert!(r.failover_by_neutron());
        let r: Router = serde_json::from_value(json!({"id": "r"})).unwrap();
        assert!(!r.failover_by_neutron());
    }
}
