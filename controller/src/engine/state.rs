//! The host and resource state machines, as explicit enums with transition functions.
//!
//! The functions only say which moves are legal; the engine decides when to make them
//! and appends every move to the incident timeline.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A state machine's states: which moves are legal. Hosts and resources are two
/// machines; the engine moves both the same way (and records every move).
pub trait Machine: Copy + Eq + fmt::Debug + fmt::Display {
    /// Whether `self → to` is a legal move.
    fn can_become(self, to: Self) -> bool;

    /// The move, or an error naming it.
    fn transition(self, to: Self) -> Result<Self, IllegalTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(IllegalTransition {
                from: format!("{self:?}"),
                to: format!("{to:?}"),
            })
        }
    }
}

/// A hypervisor's state (DESIGN.md, "States").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum HostState {
    /// Heartbeats arrive.
    Up,
    /// No heartbeat on any path for the detector's threshold.
    Suspect,
    /// Independent sources (Pacemaker, IPMI) are being asked.
    Confirming,
    /// A fence was decided; it is in flight or being retried.
    Fencing,
    /// A fence was verified. Resources may be restored from here on.
    Fenced,
    /// Its resources are being restored elsewhere.
    Evacuating,
    /// Everything was handled; the host waits for an operator to unfence it.
    Recovered,
    /// Planned work: silence is not a failure.
    Maintenance,
}

impl Machine for HostState {
    fn can_become(self, to: HostState) -> bool {
        use HostState::*;
        matches!(
            (self, to),
            (Up, Suspect)
                | (Suspect, Up)
                | (Suspect, Confirming)
                | (Confirming, Up)
                | (Confirming, Fencing)
                | (Fencing, Fenced)
                | (Fenced, Evacuating)
                | (Evacuating, Recovered)
                // resources of the fenced host listed late (Neutron was unreachable)
                | (Recovered, Evacuating)
                // an operator unfence: after recovery, or to give up on a failed fence
                | (Recovered, Up)
                | (Fencing, Up)
                // ... or to give back the VMs a storage fence alone did not cover
                | (Evacuating, Up)
                // planned work, only before fencing started
                | (Up, Maintenance)
                | (Suspect, Maintenance)
                | (Confirming, Maintenance)
                | (Maintenance, Up)
        )
    }
}

impl HostState {
    /// The host has an open incident in this state.
    pub fn in_incident(self) -> bool {
        use HostState::*;
        matches!(self, Suspect | Confirming | Fencing | Fenced | Evacuating)
    }

    /// A fence was decided (resources on the host belong to the host incident).
    pub fn fence_decided(self) -> bool {
        use HostState::*;
        matches!(self, Fencing | Fenced | Evacuating)
    }

    /// A verified fence happened and the host has not been unfenced since.
    pub fn fenced(self) -> bool {
        use HostState::*;
        matches!(self, Fenced | Evacuating | Recovered)
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A resource's state (DESIGN.md, "States"; the same machine for every kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResourceState {
    /// Running (as far as the engine knows).
    Running,
    /// Seen dead; an action is about to be chosen.
    Failed,
    /// Being restarted on its own (healthy) host.
    RestartingInPlace {
        /// 1-based try within the window.
        attempt: u32,
    },
    /// Being restored on another host.
    Evacuating {
        /// 1-based try.
        attempt: u32,
    },
    /// Could not be restored; an alarm was raised.
    GaveUp,
}

impl Machine for ResourceState {
    fn can_become(self, to: ResourceState) -> bool {
        use ResourceState::*;
        match (self, to) {
            (Running, Failed) => true,
            // a host incident takes a running resource straight to evacuation
            (Running, Evacuating { attempt }) => attempt == 1,
            (Failed, RestartingInPlace { .. }) => true,
            (Failed, Evacuating { .. }) => true,
            (Failed, GaveUp) => true,
            (RestartingInPlace { .. }, Running) => true,
            (RestartingInPlace { .. }, Failed) => true,
            // superseded by a host incident
            (RestartingInPlace { .. }, Evacuating { attempt }) => attempt == 1,
            (Evacuating { .. }, Running) => true,
            (Evacuating { attempt: a }, Evacuating { attempt: b }) => b == a + 1,
            (Evacuating { .. }, GaveUp) => true,
            // a resource given up on can be found running again (inventory)
            (GaveUp, Running) => true,
            _ => false,
        }
    }
}

impl ResourceState {
    /// Nothing more will be done about it (until something new happens).
    pub fn is_settled(self) -> bool {
        matches!(self, ResourceState::Running | ResourceState::GaveUp)
    }
}

impl fmt::Display for ResourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceState::RestartingInPlace { attempt } => {
                write!(f, "RestartingInPlace#{attempt}")
            }
            ResourceState::Evacuating { attempt } => write!(f, "Evacuating#{attempt}"),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

/// A move the state machine does not allow (a bug in the engine if it happens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IllegalTransition {
    /// From.
    pub from: String,
    /// To.
    pub to: String,
}

impl fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "illegal transition {} -> {}", self.from, self.to)
    }
}

impl std::error::Error for IllegalTransition {}
