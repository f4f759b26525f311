//! libvirt's enum values as stable lowercase names (libvirt's own, from
//! `libvirt-domain.h`, without the prefix). A value this table does not know (a newer
//! libvirt) becomes `unknown-N`, so nothing is dropped.

fn pick(table: &[&str], n: i32) -> String {
    usize::try_from(n)
        .ok()
        .and_then(|i| table.get(i))
        .map(|s| (*s).to_string())
        .unwrap_or_else(|| format!("unknown-{n}"))
}

const EVENTS: &[&str] = &[
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
];

/// `virDomainEventType` and its detail (`virDomainEvent*DetailType`).
pub fn lifecycle(event: i32, detail: i32) -> (String, String) {
    let details: &[&str] = match event {
        0 => &["added", "updated", "renamed", "from_snapshot"],
        1 => &["removed", "renamed"],
        2 => &["booted", "migrated", "restored", "from_snapshot", "wakeup"],
        3 => &[
            "paused",
            "migrated",
            "ioerror",
            "watchdog",
            "restored",
            "from_snapshot",
            "api_error",
            "postcopy",
            "postcopy_failed",
        ],
        4 => &[
            "unpaused",
            "migrated",
            "from_snapshot",
            "postcopy",
            "postcopy_failed",
        ],
        5 => &[
            "shutdown",
            "destroyed",
            "crashed",
            "migrated",
            "saved",
            "failed",
            "from_snapshot",
        ],
        6 => &["finished", "guest", "host"],
        7 => &["memory", "disk"],
        8 => &["panicked", "crashloaded"],
        _ => &[],
    };
    (pick(EVENTS, event), pick(details, detail))
}

const STATES: &[&str] = &[
    "nostate",
    "running",
    "blocked",
    "paused",
    "shutdown",
    "shutoff",
    "crashed",
    "pmsuspended",
];

/// `virDomainState` and its reason (`virDomain*Reason`).
pub fn state(state: u32, reason: i32) -> (String, String) {
    let reasons: &[&str] = match state {
        1 => &[
            "unknown",
            "booted",
            "migrated",
            "restored",
            "from_snapshot",
            "unpaused",
            "migration_canceled",
            "save_canceled",
            "wakeup",
            "crashed",
            "postcopy",
            "postcopy_failed",
        ],
        3 => &[
            "unknown",
            "user",
            "migration",
            "save",
            "dump",
            "ioerror",
            "watchdog",
            "from_snapshot",
            "shutting_down",
            "snapshot",
            "crashed",
            "starting_up",
            "postcopy",
            "postcopy_failed",
            "api_error",
        ],
        4 => &["unknown", "user"],
        5 => &[
            "unknown",
            "shutdown",
            "destroyed",
            "crashed",
            "migrated",
            "saved",
            "failed",
            "from_snapshot",
            "daemon",
        ],
        6 => &["unknown", "panicked"],
        _ => &["unknown"],
    };
    (
        pick(STATES, i32::try_from(state).unwrap_or(-1)),
        pick(reasons, reason),
    )
}

/// `virDomainEventWatchdogAction`.
pub fn watchdog_action(action: i32) -> String {
    pick(
        &[
            "none",
            "pause",
            "reset",
            "poweroff",
            "shutdown",
            "debug",
            "inject-nmi",
        ],
        action,
    )
}

/// `virDomainEventIOErrorAction`.
pub fn io_error_action(action: i32) -> String {
    pick(&["none", "pause", "report"], action)
}

/// `virConnectCloseReason`.
pub fn close_reason(reason: i32) -> String {
    pick(
        &[
            "connection error",
            "end of file from libvirtd",
            "keepalive timeout",
            "closed by the client",
        ],
        reason,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_events_read_as_libvirt_names_them() {
        let pair = |e, d| {
            let (e, d) = lifecycle(e, d);
            format!("{e}/{d}")
        };
        assert_eq!(pair(5, 5), "stopped/failed");
        assert_eq!(pair(5, 2), "stopped/crashed");
        assert_eq!(pair(5, 1), "stopped/destroyed");
        assert_eq!(pair(5, 0), "stopped/shutdown");
        assert_eq!(pair(3, 2), "suspended/ioerror");
        assert_eq!(pair(8, 0), "crashed/panicked");
        assert_eq!(pair(0, 0), "defined/added");
        assert_eq!(pair(1, 0), "undefined/removed");
        assert_eq!(pair(2, 0), "started/booted");
    }

    #[test]
    fn values_a_newer_libvirt_adds_are_kept_as_numbers() {
        assert_eq!(lifecycle(42, 0).0, "unknown-42");
        assert_eq!(lifecycle(5, 99).1, "unknown-99");
        assert_eq!(state(5, 6), ("shutoff".into(), "failed".into()));
        assert_eq!(state(3, 5), ("paused".into(), "ioerror".into()));
        assert_eq!(state(9, 0).0, "unknown-9");
        assert_eq!(watchdog_action(6), "inject-nmi");
        assert_eq!(io_error_action(-1), "unknown--1");
    }
}
