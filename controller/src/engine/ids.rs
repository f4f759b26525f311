//! The engine's identifiers and its two kinds of time: the controller's own clock
//! ([`Timestamp`]), on which every decision is made, and a host's clock ([`HostTime`]),
//! which is shown and compared only with the same host's clock (DESIGN rule 7).

use std::fmt;
use std::ops::Add;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time on the controller's clock, in unix milliseconds: the runtime's clock
/// (`crate::clock::EngineClock`) reads the wall clock once at start and advances it by
/// the monotonic clock, so it never runs backwards. The engine never reads a clock
/// itself: the runtime passes `now` into every step. Every decision is made on this
/// clock.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The epoch.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        let ms = u64::try_from(rhs.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub String);

        impl $name {
            /// Builds the id from anything string-like.
            pub fn new(s: impl Into<String>) -> Self {
                $name(s.into())
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A hypervisor (Nova compute host name).
    HostId
);
string_id!(
    /// A VM (libvirt domain UUID = Nova instance UUID).
    VmId
);
string_id!(
    /// A Neutron logical router (hosted by an L3 agent on a host).
    RouterId
);

/// Which heartbeat path (network) a heartbeat came over; hosts send on every path.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct PathId(pub u16);

/// The kinds of resources the engine restores. A new kind is a new variant here and in
/// [`Resource`]; it goes through the same engine and the same rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ResourceKind {
    /// A KVM guest.
    Vm,
    /// A logical router on an L3 agent.
    Router,
}

impl ResourceKind {
    /// Whether a failed resource of this kind is first restarted where it was. A VM is
    /// (its host is healthy); a router is moved to a live agent straight away.
    pub fn restarts_in_place(self) -> bool {
        match self {
            ResourceKind::Vm => true,
            ResourceKind::Router => false,
        }
    }
}

/// One restorable thing: the unit of ownership.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resource {
    /// A VM.
    Vm(VmId),
    /// A logical router.
    Router(RouterId),
}

impl Resource {
    /// A VM resource.
    pub fn vm(id: impl Into<String>) -> Self {
        Resource::Vm(VmId::new(id))
    }
    /// A router resource.
    pub fn router(id: impl Into<String>) -> Self {
        Resource::Router(RouterId::new(id))
    }
    /// Its kind.
    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::Vm(_) => ResourceKind::Vm,
            Resource::Router(_) => ResourceKind::Router,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Vm(v) => write!(f, "vm:{v}"),
            Resource::Router(r) => write!(f, "router:{r}"),
        }
    }
}

/// An incident: one failure being handled, with one owner per resource.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct IncidentId(pub u64);

impl fmt::Display for IncidentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}", self.0)
    }
}

/// A point in time on one host's own clock (unix milliseconds as the host reads it):
/// when a heartbeat was sent or a qemu exited there. Hosts' clocks may be minutes off,
/// so a `HostTime` is shown, and compared only with times from the same host, never
/// with the controller's [`Timestamp`] (there is deliberately no conversion).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct HostTime(pub u64);

impl HostTime {
    /// Milliseconds since the unix epoch, as the host reads them.
    pub const fn as_millis(self) -> u64 {
        self.0
    }
}

/// `2026-12-05 09:04:31.480Z (host clock)`: a date and time as `defibctl` shows its
/// TIME column, and whose clock it is. Values too small to be a wall-clock reading
/// (simulations, tests) show as seconds.
impl fmt::Display for HostTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (host clock)", utc_ms(self.0))
    }
}

/// A unix time in ms as `YYYY-MM-DD HH:MM:SS.mmmZ` (UTC); before 2001-09-09 (not a
/// wall-clock reading: simulations, tests) as `S.mmms`.
pub fn utc_ms(unix_ms: u64) -> String {
    const PLAUSIBLE_UNIX_MS: u64 = 1_000_000_000_000;
    if unix_ms < PLAUSIBLE_UNIX_MS {
        return format!("{}.{:03}s", unix_ms / 1000, unix_ms % 1000);
    }
    let secs = unix_ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let day = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        day / 3600,
        day / 60 % 60,
        day % 60,
        unix_ms % 1000
    )
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// When a listing of a host's resources was taken, on the clock of whoever took it: the
/// host's watchdog, or an edge of the controller reading a control plane (Neutron).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListedAt {
    /// By the host itself.
    Host(HostTime),
    /// By the controller (its engine clock).
    Controller(Timestamp),
}

impl fmt::Display for ListedAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListedAt::Host(t) => t.fmt(f),
            ListedAt::Controller(t) => write!(f, "{} (controller clock)", utc_ms(t.0)),
        }
    }
}

/// What an incident or a timeline line is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Subject {
    /// A host.
    Host(HostId),
    /// A resource.
    Resource(Resource),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Host(h) => write!(f, "host:{h}"),
            Subject::Resource(r) => write!(f, "{r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_time_shows_as_a_utc_date_and_says_it_is_the_hosts_clock() {
        assert_eq!(
            HostTime(1_709_164_800_123).to_string(),
            "2024-02-29 00:00:00.123Z (host clock)"
        );
        assert_eq!(utc_ms(1_796_407_896_480), "2026-12-04 18:11:36.480Z");
        // Not a wall-clock reading (simulations, tests): seconds.
        assert_eq!(HostTime(1_500).to_string(), "1.500s (host clock)");
    }
}
