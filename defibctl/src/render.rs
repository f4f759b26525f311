//! Human output: one table per listing, times as UTC ISO plus "ago" against the
//! snapshot's clock.
use controller::api::view::{HostSnapshot, ResourceSnapshot, RoleSnapshot};
use controller::api::TimelineEntry;
use controller::api::{
    AlarmsResponse, HostResponse, HostsResponse, IncidentResponse, IncidentsResponse, VmsResponse,
};

use crate::table::Table;
use crate::time::{ago, duration, iso, iso_ms};

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn incident_ref(id: Option<u64>) -> String {
    opt(id.map(|i| format!("i{i}")))
}

/// Newlines and tabs would break the table.
fn flat(s: &str) -> String {
    s.replace(['\n', '\t', '\r'], " ")
}

fn change(e: &TimelineEntry) -> String {
    if e.from == "-" && e.to == "-" {
        "-".to_string()
    } else {
        format!("{} → {}", e.from, e.to)
    }
}

fn host_row(t: &mut Table, h: &HostSnapshot, now: u64) {
    let paths = h
        .paths
        .iter()
        .map(|p| {
            format!(
                "p{} {}",
                p.path,
                duration(now.saturating_sub(p.last_heartbeat_ms))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut flags = Vec::new();
    if h.isolated {
        flags.push("isolated".to_string());
    }
    // The reason is in `--json` (`self_fence`): too long for a column.
    if h.self_fence.starts_with("not armed") {
        flags.push("self-fence-not-armed".to_string());
    }
    // Why, and which VMs: in `--json` (`not_a_target`, `unprotected`).
    if h.not_a_target.is_some() {
        flags.push(format!(
            "leases-lost({} VMs unprotected)",
            h.unprotected.len()
        ));
    }
    t.row([
        h.host.clone(),
        h.state.to_string(),
        incident_ref(h.incident),
        opt(h.last_heartbeat_ms.map(|l| ago(l, now))),
        if paths.is_empty() { "-".into() } else { paths },
        h.vm_count.to_string(),
        h.stalled_vm_count.to_string(),
        if flags.is_empty() {
            "-".into()
        } else {
            flags.join(",")
        },
    ]);
}

const HOST_HEADER: [&str; 8] = [
    "HOST",
    "STATE",
    "INCIDENT",
    "LAST HEARTBEAT",
    "PATHS (AGE)",
    "VMS",
    "STALLED",
    "FLAGS",
];

pub fn hosts(r: &HostsResponse) -> String {
    if r.hosts.is_empty() {
        return "no hosts known yet\n".into();
    }
    let mut t = Table::new(HOST_HEADER);
    for h in &r.hosts {
        host_row(&mut t, h, r.at_ms);
    }
    t.render()
}

fn resource_table(vms: &[ResourceSnapshot]) -> String {
    let mut t = Table::new(["RESOURCE", "HOST", "STATE", "INCIDENT"]);
    for v in vms {
        t.row([
            v.resource.clone(),
            v.host.clone(),
            v.state.to_string(),
            incident_ref(v.owner),
        ]);
    }
    t.render()
}

pub fn host(r: &HostResponse) -> String {
    let h = &r.host;
    let mut t = Table::new(HOST_HEADER);
    host_row(&mut t, h, r.at_ms);
    let mut out = t.render();
    let ids = format!(
        "boot id {}, incarnation {}",
        opt(h.boot_id.as_deref()),
        opt(h.incarnation)
    );
    out.push_str(&format!("\n{ids}\n"));
    for p in &h.paths {
        out.push_str(&format!(
            "path {}: last heartbeat {} ({}) from {}\n",
            p.path,
            iso_ms(p.last_heartbeat_ms),
            ago(p.last_heartbeat_ms, r.at_ms),
            opt(p.peer.as_deref())
        ));
    }
    out.push('\n');
    if r.resources.is_empty() {
        out.push_str("no resources on this host\n");
    } else {
        out.push_str(&resource_table(&r.resources));
    }
    out
}

pub fn vms(r: &VmsResponse) -> String {
    if r.vms.is_empty() {
        return "no VMs known\n".into();
    }
    resource_table(&r.vms)
}

pub fn incidents(r: &IncidentsResponse) -> String {
    if r.incidents.is_empty() {
        return "no incidents\n".into();
    }
    let mut t = Table::new(["ID", "SUBJECT", "OPENED", "STATUS", "ENTRIES", "LAST"]);
    for i in &r.incidents {
        let status = match i.closed_at_ms {
            Some(c) => format!(
                "closed after {}",
                duration(c.saturating_sub(i.opened_at_ms))
            ),
            None => format!("open {}", duration(r.at_ms.saturating_sub(i.opened_at_ms))),
        };
        let last = i.last.as_ref().map_or_else(
            || "-".into(),
            |e| flat(&format!("{} ({})", change(e), e.cause)),
        );
        t.row([
            format!("i{}", i.id),
            i.subject.clone(),
            iso(i.opened_at_ms),
            status,
            i.timeline_len.to_string(),
            last,
        ]);
    }
    t.render()
}

pub fn incident(r: &IncidentResponse) -> String {
    let i = &r.incident;
    let mut out = format!("incident i{}  {}\n", i.id, i.subject);
    out.push_str(&format!(
        "opened   {} ({})\n",
        iso_ms(i.opened_at_ms),
        ago(i.opened_at_ms, r.at_ms)
    ));
    match i.closed_at_ms {
        Some(c) => out.push_str(&format!(
            "closed   {} (after {})\n",
            iso_ms(c),
            duration(c.saturating_sub(i.opened_at_ms))
        )),
        None => out.push_str("status   open\n"),
    }
    out.push('\n');
    if i.timeline.is_empty() {
        out.push_str("no timeline entries\n");
        return out;
    }
    let start = i
        .timeline
        .iter()
        .map(|e| e.at.as_millis())
        .min()
        .unwrap_or(0);
    let mut t = Table::new(["TIME", "+", "SUBJECT", "FROM → TO", "CAUSE", "SOURCE"]);
    for e in &i.timeline {
        let since = e.at.as_millis().saturating_sub(start);
        t.row([
            iso_ms(e.at.as_millis()),
            format!("+{}.{:03}s", since / 1000, since % 1000),
            e.subject.to_string(),
            change(e),
            flat(&e.cause),
            format!("{:?}", e.source),
        ]);
    }
    out.push_str(&t.render());
    out
}

pub fn alarms(r: &AlarmsResponse) -> String {
    if r.alarms.is_empty() {
        return "no alarms\n".into();
    }
    let mut t = Table::new(["TIME", "AGE", "KIND", "HOST", "RESOURCE", "REASON"]);
    for a in &r.alarms {
        t.row([
            iso(a.at_ms),
            ago(a.at_ms, r.at_ms),
            format!("{:?}", a.kind),
            opt(a.host.as_deref()),
            opt(a.resource.as_deref()),
            flat(&a.reason),
        ]);
    }
    t.render()
}

/// The controllers: who leads since when, and what this one is.
pub fn controllers(r: &RoleSnapshot) -> String {
    let mut out = String::new();
    let leader = match (&r.leader, r.leader_since_ms) {
        (Some(l), Some(since)) => format!("{l} since {}", iso(since)),
        (Some(l), None) => l.clone(),
        (None, _) => "none".into(),
    };
    out.push_str(&format!(
        "store: {}    leader: {leader}    this controller: {}\n",
        if r.store.is_empty() { "-" } else { &r.store },
        if r.role.is_empty() {
            "starting"
        } else {
            &r.role
        }
    ));
    if let Some(p) = &r.problem {
        out.push_str(&format!("problem: {}\n", flat(p)));
    }
    if let Some(p) = &r.last_step_down {
        out.push_str(&format!("last step-down: {}\n", flat(p)));
    }
    let mut t = Table::new(["CONTROLLER", "ROLE", "API", "STARTED"]);
    for c in &r.controllers {
        t.row([
            c.id.clone(),
            if c.leader { "leader" } else { "follower" }.to_owned(),
            c.api.clone(),
            iso(c.started_ms),
        ]);
    }
    out.push_str(&t.render());
    out
}

#[cfg(test)]
mod tests {
    use controller::api::view::{AlarmSnapshot, IncidentSnapshot, PathSnapshot};
    use controller::api::IncidentSummary;
    use controller::api::{AlarmKind, HostId, HostState, Source, Subject, Timestamp};

    use super::*;

    const NOW: u64 = 1_700_000_010_000;

    #[test]
    fn controllers_show_the_leader_since_when_and_every_controller() {
        use controller::api::view::ControllerSnapshot;
        let r = RoleSnapshot {
            role: "follower".into(),
            store: "etcd".into(),
            leader: Some("c1".into()),
            leader_api: Some("http://127.0.0.1:1".into()),
            leader_since_ms: Some(NOW - 1_000),
            terms: 0,
            problem: None,
            last_step_down: None,
            controllers: vec![
                ControllerSnapshot {
                    id: "c1".into(),
                    api: "http://127.0.0.1:1".into(),
                    started_ms: NOW - 5_000,
                    leader: true,
                },
                ControllerSnapshot {
                    id: "c2".into(),
                    api: "http://127.0.0.1:2".into(),
                    started_ms: NOW - 4_000,
                    leader: false,
                },
            ],
        };
        assert_eq!(
            controllers(&r),
            "store: etcd    leader: c1 since 2023-11-14 22:13:29Z    this controller: follower\n\
             CONTROLLER  ROLE      API                 STARTED\n\
             c1          leader    http://127.0.0.1:1  2023-11-14 22:13:25Z\n\
             c2          follower  http://127.0.0.1:2  2023-11-14 22:13:26Z\n"
        );
    }

    fn entry(at: u64, from: &str, to: &str, cause: &str, source: Source) -> TimelineEntry {
        TimelineEntry {
            at: Timestamp(at),
            subject: Subject::Host(HostId::new("h2")),
            from: from.into(),
            to: to.into(),
            cause: cause.into(),
            source,
        }
    }

    fn h(name: &str, state: HostState, last: Option<u64>) -> HostSnapshot {
        HostSnapshot {
            host: name.into(),
            state,
            incident: None,
            last_heartbeat_ms: last,
            paths: last
                .map(|l| {
                    vec![PathSnapshot {
                        path: 0,
                        peer: Some("10.0.0.1:7411".into()),
                        last_heartbeat_ms: l,
                    }]
                })
                .unwrap_or_default(),
            vm_count: 3,
            stalled_vm_count: 0,
            isolated: false,
            self_fence: "off".into(),
            boot_id: None,
            incarnation: None,
            evacuated: vec![],
            not_a_target: None,
            unprotected: vec![],
        }
    }

    #[test]
    fn hosts_are_a_table_with_states_and_heartbeat_ages() {
        let mut h2 = h("compute-2", HostState::Fencing, Some(NOW - 4_200));
        h2.incident = Some(7);
        h2.isolated = true;
        let mut h3 = h("h3", HostState::Maintenance, None);
        h3.self_fence = "not armed: no permission to kill qemu pid 7 owned by uid 64055".into();
        let r = HostsResponse {
            at_ms: NOW,
            hosts: vec![h("h1", HostState::Up, Some(NOW - 100)), h2, h3],
        };
        assert_eq!(
            hosts(&r),
            "HOST       STATE        INCIDENT  LAST HEARTBEAT  PATHS (AGE)  VMS  STALLED  FLAGS\n\
             h1         Up           -         0.1 s ago       p0 0.1 s     3    0        -\n\
             compute-2  Fencing      i7        4.2 s ago       p0 4.2 s     3    0        isolated\n\
             h3         Maintenance  -         -               -            3    0        self-fence-not-armed\n"
        );
    }

    #[test]
    fn an_incident_shows_its_timeline_one_line_per_entry() {
        let r = IncidentResponse {
            at_ms: NOW,
            incident: IncidentSnapshot {
                id: 1,
                subject: "host:h2".into(),
                opened_at_ms: NOW - 3_500,
                closed_at_ms: None,
                timeline: vec![
                    entry(
                        NOW - 3_500,
                        "Up",
                        "Suspect",
                        "no heartbeat for 500 ms",
                        Source::Heartbeat,
                    ),
                    entry(
                        NOW - 2_800,
                        "Confirming",
                        "Fencing",
                        "not a member",
                        Source::Pacemaker,
                    ),
                    entry(
                        NOW - 2_700,
                        "-",
                        "-",
                        "note\nwith newline",
                        Source::Controller,
                    ),
                ],
            },
        };
        let text = incident(&r);
        assert_eq!(
            text,
            "incident i1  host:h2\n\
             opened   2023-11-14 22:13:26.500Z (3.5 s ago)\n\
             status   open\n\
             \n\
             TIME                      +        SUBJECT  FROM → TO             CAUSE                    SOURCE\n\
             2023-11-14 22:13:26.500Z  +0.000s  host:h2  Up → Suspect          no heartbeat for 500 ms  Heartbeat\n\
             2023-11-14 22:13:27.200Z  +0.700s  host:h2  Confirming → Fencing  not a member             Pacemaker\n\
             2023-11-14 22:13:27.300Z  +0.800s  host:h2  -                     note with newline        Controller\n"
        );
    }

    #[test]
    fn incidents_list_shows_status_and_the_last_change() {
        let r = IncidentsResponse {
            at_ms: NOW,
            incidents: vec![
                IncidentSummary {
                    id: 1,
                    subject: "host:h2".into(),
                    opened_at_ms: NOW - 3_500,
                    closed_at_ms: None,
                    timeline_len: 3,
                    last: Some(entry(
                        NOW,
                        "Confirming",
                        "Fencing",
                        "not a member",
                        Source::Pacemaker,
                    )),
                },
                IncidentSummary {
                    id: 2,
                    subject: "vm:cccc".into(),
                    opened_at_ms: NOW - 60_000,
                    closed_at_ms: Some(NOW - 55_000),
                    timeline_len: 0,
                    last: None,
                },
            ],
        };
        let text = incidents(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID  SUBJECT  OPENED"), "{text}");
        assert!(lines[1].contains("open 3.5 s"), "{text}");
        assert!(
            lines[1].ends_with("Confirming → Fencing (not a member)"),
            "{text}"
        );
        assert!(lines[2].contains("closed after 5.0 s"), "{text}");
    }

    #[test]
    fn empty_listings_say_so_instead_of_printing_a_bare_header() {
        assert_eq!(
            alarms(&AlarmsResponse {
                at_ms: NOW,
                alarms: vec![]
            }),
            "no alarms\n"
        );
        assert_eq!(
            incidents(&IncidentsResponse {
                at_ms: NOW,
                incidents: vec![]
            }),
            "no incidents\n"
        );
    }

    #[test]
    fn alarms_show_kind_host_and_reason() {
        let r = AlarmsResponse {
            at_ms: NOW,
            alarms: vec![AlarmSnapshot {
                at_ms: NOW - 1_000,
                kind: AlarmKind::FenceUnverified,
                host: Some("h2".into()),
                resource: None,
                reason: "BMC unreachable".into(),
            }],
        };
        assert_eq!(
            alarms(&r),
            "TIME                  AGE        KIND             HOST  RESOURCE  REASON\n\
             2023-11-14 22:13:29Z  1.0 s ago  FenceUnverified  h2    -         BMC unreachable\n"
        );
    }
}
