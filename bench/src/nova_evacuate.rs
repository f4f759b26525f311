//! Issue 4: a host with N servers fails in a real Nova (the novabed) → every server
//! ACTIVE on another host. Measured from "fenced" (the moment the fence is known
//! verified) to the first evacuate call and to all N ACTIVE, for defib (an in-process
//! controller: engine task, store, Nova restorer with the arrangement scheduler, see
//! tests/src/novalab.rs) and, in the same run, for the naive way: force the service
//! down, then evacuate one server at a time through Nova's scheduler, waiting for each.
use std::time::{Duration, Instant};

use controller::edges::nova::{NovaSettings, RestoreEvent};
use controller::engine::HostState;
use defib_tests::novalab::{Controller, Nova};
use serde_json::json;

use crate::report::{self, Series};

const POLL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_secs(600);

fn wait_all_active(nova: &Nova, prefix: &str, ids: &[String]) -> Instant {
    nova.wait_all_active_elsewhere(prefix, ids, "fake-1", TIMEOUT);
    Instant::now()
}

/// Brings fake-1 back (compute restarted, unforced) and deletes the round's servers.
fn restore(nova: &Nova, prefix: &str) {
    nova.start_compute(1);
    nova.ensure_host_ready(1);
    nova.delete_named(prefix);
}

struct Times {
    first_ms: f64,
    all_ms: f64,
}

fn defib_round(nova: &Nova, servers: usize, round: usize, bypass: bool) -> Times {
    let prefix = format!("bench-defib-{round}-{bypass}-{}", std::process::id());
    let ids = nova.boot_on("fake-1", servers, &prefix, json!({}));
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = NovaSettings {
        poll_interval: Duration::from_millis(250),
        bypass_scheduler: bypass,
        ..NovaSettings::default()
    };
    let mut ctl = Controller::start(&dir.path().join("store.sqlite"), settings);
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
    nova.kill_compute(1);
    ctl.silence("fake-1");
    let fenced = ctl.answer_fence("fake-1", Duration::from_secs(30));
    let first = loop {
        match ctl.next_event(Duration::from_secs(60)) {
            Some(RestoreEvent::EvacuateCalled { .. }) => break Instant::now(),
            Some(_) => {}
            None => panic!("no evacuation started"),
        }
    };
    let all = wait_all_active(nova, &prefix, &ids);
    ctl.kill();
    restore(nova, &prefix);
    Times {
        first_ms: (first - fenced).as_secs_f64() * 1e3,
        all_ms: (all - fenced).as_secs_f64() * 1e3,
    }
}

fn naive_round(nova: &Nova, servers: usize, round: usize) -> Times {
    let prefix = format!("bench-naive-{round}-{}", std::process::id());
    let ids = nova.boot_on("fake-1", servers, &prefix, json!({}));
    nova.kill_compute(1);
    let fenced = Instant::now();
    let c = &nova.compute;
    let svc = nova.service("fake-1");
    nova.block(c.set_forced_down(&svc.id, true))
        .expect("force down");
    let on_host = nova.block(c.servers_on_host("fake-1")).expect("list");
    let mut first = None;
    for s in on_host.iter().filter(|s| ids.contains(&s.id)) {
        first.get_or_insert_with(Instant::now);
        nova.block(c.evacuate(&s.id, None)).expect("evacuate");
        let t0 = Instant::now();
        loop {
            let x = nova
                .block(c.server(&s.id))
                .expect("server")
                .expect("exists");
            assert!(x.status != "ERROR", "evacuation failed: {:?}", x.fault);
            if x.status == "ACTIVE" && x.task_state.is_none() && x.host.as_deref() != Some("fake-1")
            {
                break;
            }
            assert!(t0.elapsed() < TIMEOUT, "server not ACTIVE in time");
            std::thread::sleep(POLL);
        }
    }
    let all = wait_all_active(nova, &prefix, &ids);
    restore(nova, &prefix);
    Times {
        first_ms: (first.expect("servers") - fenced).as_secs_f64() * 1e3,
        all_ms: (all - fenced).as_secs_f64() * 1e3,
    }
}

pub fn run(rounds: usize, servers: usize) -> anyhow::Result<String> {
    anyhow::ensure!(rounds > 0 && servers > 0, "--rounds and --servers ≥ 1");
    let nova = Nova::connect().ok_or_else(|| {
        anyhow::anyhow!("this scenario needs the novabed (`cargo xtask novabed start`)")
    })?;
    for n in 1..=3 {
        nova.ensure_host_ready(n);
    }
    let began = Instant::now();
    let (mut d_first, mut d_all, mut n_first, mut n_all, mut ratio) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut b_first, mut b_all, mut b_ratio) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let d = defib_round(&nova, servers, r, false);
        let b = defib_round(&nova, servers, r, true);
        let n = naive_round(&nova, servers, r);
        eprintln!(
            "round {r}: defib first {:.0} ms, all {:.0} ms; defib bypass first {:.0} ms, all {:.0} ms; naive first {:.0} ms, all {:.0} ms",
            d.first_ms, d.all_ms, b.first_ms, b.all_ms, n.first_ms, n.all_ms
        );
        ratio.push(n.all_ms / d.all_ms);
        b_ratio.push(n.all_ms / b.all_ms);
        d_first.push(d.first_ms);
        d_all.push(d.all_ms);
        b_first.push(b.first_ms);
        b_all.push(b.all_ms);
        n_first.push(n.first_ms);
        n_all.push(n.all_ms);
    }
    let series = vec![
        Series {
            name: "defib: fenced → first evacuate call".into(),
            samples_ms: d_first,
        },
        Series {
            name: format!("defib: fenced → all {servers} ACTIVE elsewhere"),
            samples_ms: d_all,
        },
        Series {
            name: "defib, bypass_scheduler: fenced → first evacuate call".into(),
            samples_ms: b_first,
        },
        Series {
            name: format!("defib, bypass_scheduler: fenced → all {servers} ACTIVE elsewhere"),
            samples_ms: b_all,
        },
        Series {
            name: "naive: fenced → first evacuate call".into(),
            samples_ms: n_first,
        },
        Series {
            name: format!("naive (one at a time, Nova scheduler): fenced → all {servers} ACTIVE"),
            samples_ms: n_all,
        },
        Series {
            name: "per-round ratio naive / defib, all ACTIVE (×, not ms)".into(),
            samples_ms: ratio,
        },
        Series {
            name: "per-round ratio naive / defib bypass_scheduler, all ACTIVE (×, not ms)".into(),
            samples_ms: b_ratio,
        },
    ];
    let notes = format!(
        "{rounds} round(s) of {servers} servers booted on fake-1 of the novabed (Nova 34, \
         fake driver, 3 hosts on this 2-core machine), its nova-compute SIGKILLed. defib: the \
         in-process controller (release build) is told the fence is verified; it forces the \
         service down, lists the servers, plans them over fake-2 and fake-3 (Placement \
         capacity, ≤ 10 rebuilds per target) and evacuates in parallel with explicit targets \
         at 2.94 (Nova's scheduler validates each target), tracking by polling Nova every 250 ms \
         for the servers changed since the last change seen; \"defib, bypass_scheduler\": the same with \
         `force` at 2.67 (no scheduler pass per server). naive, same run: force down, list, \
         then evacuate one server at a time without a target (Nova's scheduler) and wait for \
         it to be ACTIVE (polled every 100 ms) before the next. \"All ACTIVE\" is seen by the \
         bench listing the servers every 250 ms, for both. Run took {:.0} s.",
        began.elapsed().as_secs_f64()
    );
    report::write(
        &report::results_dir(),
        "nova-evacuate",
        &format!("cargo xtask bench nova-evacuate --rounds {rounds} --servers {servers}"),
        &notes,
        &series,
    )
}
