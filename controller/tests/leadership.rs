//! The election's campaign round against a real etcd (one member): what a controller
//! concludes from the leader key.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::time::Duration;

use controller::ha::conn::EtcdConn;
use controller::ha::leadership::{campaign, Campaign};
use controller::ha::EtcdSettings;

// Only the one-member cluster is used here, not its store helpers.
#[allow(dead_code)]
#[path = "support/etcd.rs"]
mod etcd;

fn settings(endpoint: &str, id: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints: vec![endpoint.to_owned()],
        lease_ttl: Duration::from_secs(5),
        stop_margin: Duration::from_millis(250),
        call_timeout: Duration::from_secs(2),
        campaign_every: Duration::from_millis(100),
        prefix: "/defib/campaign/".into(),
        controller_id: id.into(),
        advertise_api: format!("http://{id}:7403"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_campaign_whose_winning_answer_was_lost_finds_the_key_on_its_own_lease_and_leads() {
    let Some(etcd) = etcd::OneEtcd::start() else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let s = settings(&etcd.endpoint, "ctl-a");
        let key = format!("{}leader", s.prefix);
        let mut conn = EtcdConn::new(s.endpoints.clone(), s.call_timeout, 0);
        let lease = conn.lease_grant(5).await.expect("lease").id();
        // The first round's put lands on etcd, but its answer never reaches the
        // controller (a timeout: an unknown outcome).
        let Campaign::Won(first, _) = campaign(&mut conn, &key, lease, &s).await.unwrap() else {
            panic!("the key was free");
        };
        // The next round finds the key on this controller's own lease: it leads, with
        // the same fencing token (not a follower of itself, which would leave nobody
        // leading while it keeps its lease alive).
        match campaign(&mut conn, &key, lease, &s).await.unwrap() {
            Campaign::Won(again, _) => assert_eq!(again, first),
            other => panic!("{other:?}"),
        }
        // Another controller, on its own lease, sees ctl-a leading.
        let other = settings(&etcd.endpoint, "ctl-b");
        let their_lease = conn.lease_grant(5).await.expect("lease").id();
        match campaign(&mut conn, &key, their_lease, &other)
            .await
            .unwrap()
        {
            Campaign::Lost(Some(leader)) => assert_eq!(leader.id, "ctl-a"),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_controller_that_has_just_started_hears_the_hosts_for_one_lease_ttl_before_it_campaigns() {
    let Some(etcd) = etcd::OneEtcd::start() else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let mut s = settings(&etcd.endpoint, "ctl-fresh");
        s.lease_ttl = Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        let handle = controller::ha::leadership::start(s);
        let mut state = handle.state.clone();
        // Nobody leads, yet it does not campaign while it warms up: a follower that has
        // heard the hosts all along (none here) would win first.
        let led_after = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if state.borrow_and_update().leading().is_some() {
                    return started.elapsed();
                }
                state.changed().await.expect("the election task runs");
            }
        })
        .await
        .expect("it leads once warmed up");
        assert!(
            led_after >= Duration::from_secs(2),
            "led {led_after:?} after its start"
        );
        let _ = handle
            .step_down
            .send(controller::ha::leadership::StepDown::Retire);
    });
}
