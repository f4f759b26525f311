//! Both halves of the restore edge as one: VMs to Nova, routers to Neutron.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{NeutronRestorer, NeutronSettings, RouterEvent};
use crate::edges::{EdgeLinks, Restorer};
use crate::engine::{HostId, Input, IntentKey, Resource, RestoreOutcome};
use crate::openstack::network::Network;

/// The restore edge with routers: VMs go to `vms` (the Nova restorer), routers to
/// Neutron. A force-down goes to both, and its result is the VM half's alone: the
/// router half lists the host's routers in the background, retrying while Neutron is
/// out (see [`NeutronRestorer`]'s `force_down`), so that a Neutron outage (likely when
/// the failed host was also a network node) never holds up a VM. An unfence goes to
/// both and its one result is theirs joined (Ok when both are; else the failures'
/// reasons): a host's L3 agents are trusted again only once Neutron says so. Both
/// halves answer a key handed over again with their first outcome, so a joined key is
/// answered again too.
pub struct RouterAwareRestorer {
    vms: Box<dyn Restorer + Send>,
    routers: NeutronRestorer,
    joined: Arc<Mutex<HashMap<IntentKey, Option<Input>>>>,
}

impl RouterAwareRestorer {
    /// `vms` is built with the links it is handed: the engine's hosts, and a results
    /// sender whose results pass through the joiner; the Neutron half likewise.
    pub fn start(
        vms: impl FnOnce(EdgeLinks) -> Box<dyn Restorer + Send>,
        network: Network,
        settings: NeutronSettings,
        links: EdgeLinks,
        events: Option<mpsc::UnboundedSender<RouterEvent>>,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
        let joined: Arc<Mutex<HashMap<IntentKey, Option<Input>>>> = Arc::default();
        let EdgeLinks {
            results,
            hosts,
            clock,
        } = links;
        let halves = EdgeLinks {
            results: tx,
            hosts,
            clock,
        };
        let vms = vms(halves.clone());
        let routers = NeutronRestorer::start(network, settings, halves, events);
        let j = joined.clone();
        tokio::spawn(async move {
            while let Some(input) = rx.recv().await {
                let out = match &input {
                    Input::HostActionResult { key, .. } => {
                        let mut map = j.lock().unwrap_or_else(|e| e.into_inner());
                        match map.get_mut(key) {
                            // Not joined (cannot happen: both halves answer host
                            // actions only when handed one through here).
                            None => Some(input),
                            Some(first @ None) => {
                                *first = Some(input);
                                None
                            }
                            Some(Some(first)) => {
                                let joined = join(first, &input);
                                map.insert(key.clone(), None);
                                Some(joined)
                            }
                        }
                    }
                    _ => Some(input),
                };
                if let Some(out) = out {
                    if results.send(out).is_err() {
                        return;
                    }
                }
            }
        });
        RouterAwareRestorer {
            vms,
            routers,
            joined,
        }
    }

    fn expect_two(&self, key: &IntentKey) {
        self.joined
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), None);
    }
}

/// Two halves' results of one host action, as one.
fn join(a: &Input, b: &Input) -> Input {
    let (
        Input::HostActionResult {
            host,
            key,
            outcome: oa,
        },
        Input::HostActionResult { outcome: ob, .. },
    ) = (a, b)
    else {
        return b.clone();
    };
    let outcome = match (oa, ob) {
        (RestoreOutcome::Ok { .. }, RestoreOutcome::Ok { .. }) => {
            RestoreOutcome::Ok { host: host.clone() }
        }
        (RestoreOutcome::Failed { reason }, RestoreOutcome::Ok { .. })
        | (RestoreOutcome::Ok { .. }, RestoreOutcome::Failed { reason }) => {
            RestoreOutcome::Failed {
                reason: reason.clone(),
            }
        }
        (RestoreOutcome::Failed { reason: x }, RestoreOutcome::Failed { reason: y }) => {
            RestoreOutcome::Failed {
                reason: format!("{x}; {y}"),
            }
        }
        // One half may have been carried out: the whole is not known either.
        (u @ RestoreOutcome::Unknown { .. }, _) | (_, u @ RestoreOutcome::Unknown { .. }) => {
            u.clone()
        }
    };
    Input::HostActionResult {
        host: host.clone(),
        key: key.clone(),
        outcome,
    }
}

impl Restorer for RouterAwareRestorer {
    fn force_down(&mut self, host: &HostId, key: &IntentKey) {
        self.vms.force_down(host, key);
        self.routers.force_down(host, key);
    }

    fn restart_in_place(&mut self, resource: &Resource, host: &HostId, n: u32, key: &IntentKey) {
        match resource {
            Resource::Vm(_) => self.vms.restart_in_place(resource, host, n, key),
            Resource::Router(_) => self.routers.restart_in_place(resource, host, n, key),
        }
    }

    fn evacuate(&mut self, resource: &Resource, from: &HostId, key: &IntentKey) {
        match resource {
            Resource::Vm(_) => self.vms.evacuate(resource, from, key),
            Resource::Router(_) => self.routers.evacuate(resource, from, key),
        }
    }

    fn unfence(&mut self, host: &HostId, key: &IntentKey) {
        self.expect_two(key);
        self.vms.unfence(host, key);
        self.routers.unfence(host, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joined_host_action_fails_with_the_failing_halfs_reason() {
        let r = |o| Input::HostActionResult {
            host: HostId::new("h"),
            key: IntentKey("k".into()),
            outcome: o,
        };
        let ok = || RestoreOutcome::Ok {
            host: HostId::new("h"),
        };
        let bad = |s: &str| RestoreOutcome::Failed { reason: s.into() };
        assert!(matches!(
            join(&r(ok()), &r(ok())),
            Input::HostActionResult {
                outcome: RestoreOutcome::Ok { .. },
                ..
            }
        ));
        let Input::HostActionResult { outcome, .. } = join(&r(ok()), &r(bad("neutron: down")))
        else {
            panic!()
        };
        assert_eq!(outcome, bad("neutron: down"));
        let Input::HostActionResult { outcome, .. } = join(&r(bad("x")), &r(bad("y"))) else {
            panic!()
        };
        assert_eq!(outcome, bad("x; y"));
    }
}
