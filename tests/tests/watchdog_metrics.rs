//! The watchdog's `/metrics` (issue 18, item 5) against the real components: a lab host
//! whose watchdog (the kernel's BPF probes) heartbeats a real controller on two paths
//! and watches a libvirtd of its own. What it serves must follow what really happens:
//! acks and round trips on each path, a qemu's start and exit, libvirt going away and
//! coming back, the probes' run time, and, once the controller is gone, isolation and
//! events piling up in the spool.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use defib_tests::attacks::Scrape;
use defib_tests::hypervisor::Hypervisor;
use defib_tests::lab::{Lab, LabSpec};
use defib_tests::{is_root, require, require_hostbed, FakeQemu};

/// Where h0's watchdog serves, inside h0's namespace.
const METRICS: &str = "127.0.0.1:7413";
const WAIT: Duration = Duration::from_secs(30);

/// `GET /metrics` of host `h`'s watchdog, from its namespace.
fn scrape(lab: &Lab, h: usize) -> Scrape {
    let out = lab
        .net
        .command_in(&lab.net.host_ns(h), std::path::Path::new("curl"))
        .args(["-sS", "--fail", "--max-time", "10"])
        .arg(format!("http://{METRICS}/metrics"))
        .output()
        .expect("run curl");
    if !out.status.success() {
        return Scrape::default();
    }
    Scrape::parse(&String::from_utf8_lossy(&out.stdout))
}

fn value(s: &Scrape, series: &str) -> f64 {
    s.0.get(series).copied().unwrap_or(0.0)
}

/// Scrapes until `pred` holds (at most [`WAIT`]); the scrape that satisfied it.
fn wait_scrape(lab: &Lab, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(lab, 0);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {WAIT:?}; last scrape: {:#?}\n{}",
            s.0,
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_watchdogs_metrics_follow_acks_per_path_qemu_events_libvirt_the_probes_and_the_spool() {
    require!(
        is_root(),
        "root (the watchdog's BPF probes, a libvirtd, network namespaces)"
    );
    let _hostbed = require_hostbed!();
    let mut hv = Hypervisor::start("metrics-h0").unwrap_or_else(|e| panic!("{e}"));
    let (uri, pids) = (hv.uri(), hv.pid_dir().display().to_string());
    let spec = LabSpec {
        hosts: 1,
        backend: "none",
        controller_extra: String::new(),
        watchdog_extra: Box::new(move |_| {
            format!(
                "[libvirt]\nenabled = true\nuri = {uri:?}\npid_dir = {pids:?}\n\
                 [metrics]\nlisten = \"{METRICS}\"\n"
            )
        }),
        bmc_network: false,
    };
    let mut lab = Lab::new(&spec);
    lab.start_controller(&spec);
    lab.start_watchdogs(&spec);

    // Both paths acked by the acting controller, with their round trips; libvirt and the
    // event stream up; the probes' run time counted (the lab runs the watchdog as root,
    // so it switches the kernel's statistics on itself).
    let up =
        wait_scrape(
            &lab,
            "reachable on both paths, libvirt and stream up",
            |s| {
                value(s, "defib_watchdog_reachability{state=\"reachable\"}") == 1.0
                    && (0..2).all(|p| {
                        value(
                    s,
                    &format!("defib_watchdog_heartbeat_acks_total{{path=\"{p}\",counts=\"true\"}}"),
                ) >= 2.0
                    && value(
                        s,
                        &format!("defib_watchdog_heartbeat_rtt_seconds_count{{path=\"{p}\"}}"),
                    ) >= 2.0
                    })
                    && value(s, "defib_watchdog_libvirt_connected") == 1.0
                    && value(s, "defib_watchdog_stream_connected") == 1.0
            },
        );
    for p in 0..2 {
        let sum = value(
            &up,
            &format!("defib_watchdog_heartbeat_rtt_seconds_sum{{path=\"{p}\"}}"),
        );
        let count = value(
            &up,
            &format!("defib_watchdog_heartbeat_rtt_seconds_count{{path=\"{p}\"}}"),
        );
        // A lab path is a veth pair and a bridge: far below a second a round trip.
        assert!(
            sum > 0.0 && sum / count < 1.0,
            "path {p}: mean round trip {} s",
            sum / count
        );
        assert!(
            value(
                &up,
                &format!("defib_watchdog_heartbeats_sent_total{{path=\"{p}\"}}")
            ) >= count
        );
        assert!(
            value(
                &up,
                &format!("defib_watchdog_last_ack_age_seconds{{path=\"{p}\"}}")
            ) < 3.0,
            "{:#?}",
            up.0
        );
    }
    assert_eq!(value(&up, "defib_watchdog_probe_run_time_counted"), 1.0);
    assert!(
        value(
            &up,
            "defib_watchdog_events_total{kind=\"libvirt_connected\"}"
        ) >= 1.0
    );
    assert_eq!(
        value(
            &up,
            "defib_watchdog_probe_drops_total{reason=\"ringbuf_full\"}"
        ),
        0.0
    );

    // A qemu starts and is killed: both events counted; every exec on the host (curl's
    // too) ran the exec probe, now with its run time.
    let qemu = FakeQemu::start(
        "qemu-system-x86_64",
        "vm-metrics",
        "c0ffee00-0000-4000-8000-0000000000a1",
        &[],
    );
    wait_scrape(&lab, "the qemu counted alive", |s| {
        value(s, "defib_watchdog_vms") == 1.0
            && value(s, "defib_watchdog_events_total{kind=\"qemu_started\"}") >= 1.0
    });
    drop(qemu);
    let after = wait_scrape(&lab, "the qemu's exit counted and delivered", |s| {
        value(s, "defib_watchdog_vms") == 0.0
            && value(s, "defib_watchdog_events_total{kind=\"qemu_exited\"}") >= 1.0
            && value(s, "defib_watchdog_spool_events") == 0.0
    });
    assert!(
        value(
            &after,
            "defib_watchdog_probe_runs_total{program=\"qemu_exec\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &after,
            "defib_watchdog_probe_run_seconds_total{program=\"qemu_exec\"}"
        ) > 0.0
    );
    assert!(
        value(
            &after,
            "defib_watchdog_probe_runs_total{program=\"qemu_exit\"}"
        ) >= value(
            &up,
            "defib_watchdog_probe_runs_total{program=\"qemu_exit\"}"
        ) + 1.0,
        "the exit probe ran for the qemu's exit"
    );
    assert_eq!(
        value(&after, "defib_watchdog_spool_oldest_event_age_seconds"),
        0.0
    );

    // libvirtd goes away, then comes back as after a restart.
    let libvirtd: i32 = std::fs::read_to_string(hv.daemon_pid_file())
        .expect("libvirtd pid file")
        .trim()
        .parse()
        .expect("libvirtd pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(libvirtd),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill libvirtd");
    wait_scrape(&lab, "libvirt disconnected", |s| {
        value(s, "defib_watchdog_libvirt_connected") == 0.0
            && value(
                s,
                "defib_watchdog_events_total{kind=\"libvirt_disconnected\"}",
            ) >= 1.0
    });
    hv.boot_again().unwrap_or_else(|e| panic!("{e}"));
    wait_scrape(&lab, "libvirt connected again", |s| {
        value(s, "defib_watchdog_libvirt_connected") == 1.0
            && value(s, "defib_watchdog_events_total{kind=\"libvirt_connected\"}") >= 2.0
    });

    // The controller dies: no more acks, isolation after the timeout (3 s), and a
    // qemu's events wait in the spool, getting older.
    lab.kill_controller();
    let isolated = wait_scrape(&lab, "isolated", |s| {
        value(s, "defib_watchdog_reachability{state=\"isolated\"}") == 1.0
            && value(s, "defib_watchdog_stream_connected") == 0.0
    });
    for p in 0..2 {
        assert!(
            value(
                &isolated,
                &format!("defib_watchdog_last_ack_age_seconds{{path=\"{p}\"}}")
            ) >= 3.0,
            "{:#?}",
            isolated.0
        );
    }
    let qemu = FakeQemu::start(
        "qemu-system-x86_64",
        "vm-metrics-2",
        "c0ffee00-0000-4000-8000-0000000000a2",
        &[],
    );
    drop(qemu);
    let spooled = wait_scrape(&lab, "the qemu's events spooled", |s| {
        value(s, "defib_watchdog_spool_events") >= 2.0
            && value(s, "defib_watchdog_spool_oldest_event_age_seconds") > 0.0
    });
    std::thread::sleep(Duration::from_secs(1));
    let later = scrape(&lab, 0);
    assert!(
        value(&later, "defib_watchdog_spool_oldest_event_age_seconds")
            >= value(&spooled, "defib_watchdog_spool_oldest_event_age_seconds") + 0.9,
        "the oldest spooled event ages: {} then {}",
        value(&spooled, "defib_watchdog_spool_oldest_event_age_seconds"),
        value(&later, "defib_watchdog_spool_oldest_event_age_seconds")
    );
    for p in 0..2 {
        let acks = format!("defib_watchdog_heartbeat_acks_total{{path=\"{p}\",counts=\"true\"}}");
        assert_eq!(
            value(&later, &acks),
            value(&isolated, &acks),
            "no acks once the controller is gone"
        );
    }
}
