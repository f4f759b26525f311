//! Issue 9: a host whose L3 agent serves N routers fails in a real Neutron (the
//! novabed's, with its lab L3 agents) → every router bound to a live agent on another
//! host. Measured from "fenced" (the moment the fence is known verified) to the first
//! router bound elsewhere and to all N bound (each to exactly one live agent), read
//! from Neutron's own bindings by the bench. The controller is the in-process one of
//! tests/src/novalab.rs: engine task, store, Nova restorer and router restorer joined.
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use controller::edges::neutron::{NeutronSettings, RouterEvent};
use controller::edges::nova::NovaSettings;
use controller::engine::HostState;
use defib_tests::novalab::{Controller, Neutron, Nova};

use crate::report::{self, Series};

const TIMEOUT: Duration = Duration::from_secs(300);

struct Times {
    first_ms: f64,
    all_ms: f64,
}

fn round(nova: &Nova, neutron: &Neutron, routers: usize, round: usize) -> Times {
    let prefix = format!("bench-rm-{round}-{}", std::process::id());
    let ids = neutron.create_routers(&prefix, routers, false);
    for id in &ids {
        neutron.bind(id, "fake-1");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ctl = Controller::start_with_routers(
        &dir.path().join("store.sqlite"),
        NovaSettings::default(),
        NeutronSettings {
            poll_interval: Duration::from_millis(100),
            ..NeutronSettings::default()
        },
    );
    ctl.wait_host_state("fake-1", HostState::Up, Duration::from_secs(10));
    nova.kill_compute(1);
    neutron.kill_agent(1);
    ctl.silence("fake-1");
    let fenced = ctl.answer_fence("fake-1", Duration::from_secs(30));
    let first = loop {
        match ctl.next_router_event(Duration::from_secs(60)) {
            Some(RouterEvent::Moved { .. }) => break Instant::now(),
            Some(_) => {}
            None => panic!("no router moved"),
        }
    };
    // All bound: the restorer's verified moves, then Neutron's bindings checked.
    let mut verified = BTreeSet::new();
    while verified.len() < ids.len() {
        match ctl.next_router_event(TIMEOUT) {
            Some(RouterEvent::Verified { router, .. }) => {
                verified.insert(router);
            }
            Some(RouterEvent::Failed { router, reason }) => panic!("{router}: {reason}"),
            Some(_) => {}
            None => panic!("only {} of {} routers moved", verified.len(), ids.len()),
        }
    }
    let all = Instant::now();
    for id in &ids {
        let b = neutron.bindings(id);
        assert!(
            b.len() == 1 && b[0].host != "fake-1" && b[0].alive,
            "router {id} not bound to one live agent elsewhere: {b:?}"
        );
    }
    ctl.kill();
    nova.ensure_host_ready(1);
    neutron.ensure_agent_ready(1);
    neutron.delete_named(&prefix);
    Times {
        first_ms: (first - fenced).as_secs_f64() * 1e3,
        all_ms: (all - fenced).as_secs_f64() * 1e3,
    }
}

pub fn run(rounds: usize, counts: &[usize]) -> anyhow::Result<String> {
    anyhow::ensure!(
        rounds > 0 && !counts.is_empty(),
        "--rounds ≥ 1, --routers given"
    );
    let (Some(nova), Some(neutron)) = (Nova::connect(), Neutron::connect()) else {
        anyhow::bail!(
            "this scenario needs the novabed with its L3 agents (`cargo xtask novabed start`)"
        );
    };
    for n in 1..=3 {
        nova.ensure_host_ready(n);
        neutron.ensure_agent_ready(n);
    }
    let began = Instant::now();
    let mut series = Vec::new();
    for &n in counts {
        let (mut first, mut all) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let t = round(&nova, &neutron, n, r);
            eprintln!(
                "{n} routers, round {r}: first bound {:.0} ms, all bound {:.0} ms",
                t.first_ms, t.all_ms
            );
            first.push(t.first_ms);
            all.push(t.all_ms);
        }
        series.push(Series {
            name: format!("{n} routers: fenced → first bound elsewhere"),
            samples_ms: first,
        });
        series.push(Series {
            name: format!("{n} routers: fenced → all {n} bound to live agents"),
            samples_ms: all,
        });
    }
    let list: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
    let notes = format!(
        "{rounds} round(s) per size: N routers created in the novabed's Neutron 29 and bound \
         to the L3 agent of fake-1, whose nova-compute and L3 agent are then SIGKILLed. The \
         in-process controller (release build) is told the fence is verified; its router \
         restorer disables fake-1's agent, lists its routers, reads every router's bindings \
         (one listing per L3 agent), moves each (DELETE from the dead agent, POST to the least-loaded live agent of fake-2 \
         and fake-3, ≤ 10 at once) and polls Neutron until the router is bound to exactly \
         that agent. \"All bound\" is the last router verified; the bench then checks every \
         binding in Neutron. Neutron's own failover (allow_automatic_l3agent_failover, off by \
         default) would start only after agent_down_time (75 s by default). 2-core machine \
         shared with other work. Run took {:.0} s.",
        began.elapsed().as_secs_f64()
    );
    report::write(
        &report::results_dir(),
        "router-move",
        &format!(
            "cargo xtask bench router-move --rounds {rounds} --routers {}",
            list.join(",")
        ),
        &notes,
        &series,
    )
}
