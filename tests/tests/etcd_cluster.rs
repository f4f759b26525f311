//! The etcd cluster fixture (tests/src/etcd.rs) against real etcd 3.4 members: a put/get
//! works, the cluster survives its leader's death and takes the member back, two dead
//! members of three stop writes until one returns, and a detached cluster (`cargo xtask
//! lab up --ha`) is started once and stopped by exactly its PIDs.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use defib_tests::etcd::{self, EtcdCluster, EtcdOpts};
use defib_tests::require;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `etcdctl put KEY VALUE` with a 1 s command timeout.
fn put(cluster: &EtcdCluster, key: &str, value: &str) -> Result<(), String> {
    let out = cluster.etcdctl(&["--command-timeout=1s", "put", key, value]);
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

/// The value of `key` read (linearizably) through members `on`.
fn get_on(cluster: &EtcdCluster, on: &[usize], key: &str) -> Option<String> {
    let out = cluster.etcdctl_on(on, &["get", "--print-value-only", key]);
    assert!(out.status.success(), "etcdctl get {key}: {}", text(&out));
    let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!value.is_empty()).then_some(value)
}

/// Puts until one succeeds; the time it took, or the last error after `timeout`.
fn put_within(
    cluster: &EtcdCluster,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    loop {
        let out = cluster.etcdctl(&["--command-timeout=300ms", "put", key, value]);
        if out.status.success() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn a_started_cluster_answers_a_put_and_a_get_through_etcdctl() {
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let t0 = Instant::now();
    let cluster = EtcdCluster::start(EtcdOpts::default());
    eprintln!("3 members healthy after {:?}", t0.elapsed());
    assert_eq!(cluster.len(), 3);
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    for (i, e) in endpoints.iter().enumerate() {
        assert!(e.starts_with("http://127.0.0.1:"), "{e}");
        assert_eq!(*e, cluster.endpoint(i));
        assert!(cluster.log_path(i).exists(), "{:?}", cluster.log_path(i));
    }
    put(&cluster, "/defib/test", "hello").expect("put");
    // Read through each member: all of them serve the cluster's data.
    for i in 0..3 {
        assert_eq!(
            get_on(&cluster, &[i], "/defib/test").as_deref(),
            Some("hello")
        );
    }
    let leader = cluster.leader().expect("a leader");
    assert!(leader < 3);
}

#[test]
fn killing_the_etcd_leader_leaves_a_working_cluster_and_restart_brings_the_member_back() {
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let mut cluster = EtcdCluster::start(EtcdOpts::default());
    put(&cluster, "/defib/before", "1").expect("put before the kill");
    let leader = cluster.leader().expect("a leader");
    let pid = cluster.pid(leader).expect("the leader's pid");

    cluster.kill(leader);
    assert!(!alive(pid), "the killed leader (pid {pid}) still runs");
    assert_eq!(cluster.pid(leader), None);
    assert_eq!(cluster.live().len(), 2);
    let took = put_within(&cluster, "/defib/after", "2", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("no put within 5 s of killing the leader m{leader}: {e}"));
    eprintln!("first put {took:?} after SIGKILL of the etcd leader m{leader}");
    let new_leader = cluster.leader().expect("a new leader");
    assert_ne!(new_leader, leader);

    let t0 = Instant::now();
    cluster.restart(leader);
    cluster
        .wait_healthy(Duration::from_secs(10))
        .expect("the restarted member rejoins");
    eprintln!("restarted member healthy after {:?}", t0.elapsed());
    // The restarted member serves what was written while it was dead.
    assert_eq!(
        get_on(&cluster, &[leader], "/defib/after").as_deref(),
        Some("2")
    );
    assert_eq!(
        get_on(&cluster, &[leader], "/defib/before").as_deref(),
        Some("1")
    );
    let log = std::fs::read_to_string(cluster.log_path(leader)).unwrap();
    assert_eq!(
        log.matches("=== defib-tests: starting").count(),
        2,
        "one log for both runs of the member"
    );
}

#[test]
fn with_two_of_three_members_killed_a_put_fails_and_after_a_restart_it_works_again() {
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let mut cluster = EtcdCluster::start(EtcdOpts::default());
    put(&cluster, "/defib/q", "before").expect("put with all members");

    cluster.kill(0);
    cluster.kill(1);
    let err = put(&cluster, "/defib/q", "without-quorum")
        .expect_err("a put with one member of three must fail");
    eprintln!("put without quorum: {}", err.trim());
    assert!(cluster.wait_healthy(Duration::from_millis(300)).is_err());

    let t0 = Instant::now();
    cluster.restart(0);
    cluster
        .wait_healthy(Duration::from_secs(10))
        .expect("two of three members are a quorum");
    eprintln!("quorum back {:?} after the restart", t0.elapsed());
    let took = put_within(&cluster, "/defib/q", "after", Duration::from_secs(5))
        .expect("a put once the quorum is back");
    eprintln!("put {took:?} after the cluster was healthy again");
    assert_eq!(get_on(&cluster, &[0], "/defib/q").as_deref(), Some("after"));

    let t0 = Instant::now();
    cluster.restart(1);
    cluster
        .wait_healthy(Duration::from_secs(10))
        .expect("all three again");
    eprintln!("third member healthy {:?} after its restart", t0.elapsed());
    assert_eq!(get_on(&cluster, &[1], "/defib/q").as_deref(), Some("after"));
}

#[test]
fn a_paused_member_does_not_stop_the_others_and_resumes() {
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let mut cluster = EtcdCluster::start(EtcdOpts::default());
    let leader = cluster.leader().expect("a leader");
    cluster.pause(leader);
    assert!(!cluster.live().contains(&leader));
    let took = put_within(&cluster, "/defib/p", "1", Duration::from_secs(5))
        .expect("a put with the leader hung");
    eprintln!("first put {took:?} after SIGSTOP of the etcd leader m{leader}");
    cluster.resume(leader);
    cluster
        .wait_healthy(Duration::from_secs(10))
        .expect("the resumed member answers");
    assert_eq!(
        get_on(&cluster, &[leader], "/defib/p").as_deref(),
        Some("1")
    );
    // Dropped while paused: Drop must still stop it.
    cluster.pause(leader);
}

/// Stops a detached cluster even when the test fails half-way.
struct StopDetached(std::path::PathBuf);

impl Drop for StopDetached {
    fn drop(&mut self) {
        let _ = EtcdCluster::stop_detached(&self.0);
    }
}

#[test]
fn start_detached_is_idempotent_and_stop_detached_stops_exactly_its_pids() {
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let dir = tempfile::Builder::new()
        .prefix("defib-etcd-detached")
        .tempdir()
        .unwrap();
    let _stop = StopDetached(dir.path().to_path_buf());
    let opts = EtcdOpts::default();

    let first = EtcdCluster::start_detached(dir.path(), &opts).expect("start_detached");
    assert!(!first.already_running);
    assert_eq!(first.endpoints.len(), 3);
    assert_eq!(first.pids.len(), 3);
    for (i, pid) in first.pids.iter().enumerate() {
        let file = dir.path().join(format!("pids/m{i}.pid"));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().trim(),
            pid.to_string()
        );
        assert!(alive(*pid));
    }
    let out = Command::new("etcdctl")
        .arg(format!("--endpoints={}", first.endpoints.join(",")))
        .args(["put", "/defib/detached", "yes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Again: the same members, nothing started.
    let second = EtcdCluster::start_detached(dir.path(), &opts).expect("start_detached again");
    assert!(second.already_running);
    assert_eq!(second.pids, first.pids);
    assert_eq!(second.endpoints, first.endpoints);

    // Bystanders: an etcd of another cluster and an unrelated process.
    let other = EtcdCluster::start(EtcdOpts {
        members: 1,
        ..EtcdOpts::default()
    });
    let other_pid = other.pid(0).unwrap();
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();

    let mut stopped = EtcdCluster::stop_detached(dir.path()).expect("stop_detached");
    stopped.sort_unstable();
    let mut expected = first.pids.clone();
    expected.sort_unstable();
    assert_eq!(stopped, expected);
    for pid in &first.pids {
        assert!(!alive(*pid), "detached member {pid} still runs");
    }
    assert!(!dir.path().join("pids/m0.pid").exists());
    assert!(alive(other_pid) && alive(sleeper.id()));
    // Again: nothing left to stop.
    assert_eq!(
        EtcdCluster::stop_detached(dir.path()).unwrap(),
        Vec::<u32>::new()
    );

    // PID files whose PIDs now belong to other processes (reused PIDs): left alone.
    std::fs::create_dir_all(dir.path().join("pids")).unwrap();
    std::fs::write(dir.path().join("pids/m0.pid"), other_pid.to_string()).unwrap();
    std::fs::write(dir.path().join("pids/m1.pid"), sleeper.id().to_string()).unwrap();
    assert_eq!(
        EtcdCluster::stop_detached(dir.path()).unwrap(),
        Vec::<u32>::new()
    );
    assert!(alive(other_pid) && alive(sleeper.id()));
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // Started again on the same directory: the same cluster, its data kept.
    let third = EtcdCluster::start_detached(dir.path(), &opts).expect("start_detached after stop");
    assert!(!third.already_running);
    assert_eq!(third.endpoints, first.endpoints);
    let out = Command::new("etcdctl")
        .arg(format!("--endpoints={}", third.endpoints.join(",")))
        .args(["get", "--print-value-only", "/defib/detached"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
    assert_eq!(
        EtcdCluster::stop_detached(dir.path()).unwrap().len(),
        3,
        "stops the restarted members"
    );
}

#[test]
fn a_member_that_cannot_start_is_named_with_its_log_file() {
    require!(etcd::installed(), "{}", etcd::NOT_INSTALLED);
    let dir = tempfile::tempdir().unwrap();
    let err = EtcdCluster::try_start(EtcdOpts {
        members: 1,
        dir: Some(dir.path().to_path_buf()),
        extra_args: vec!["--no-such-flag".into()],
        start_timeout: Duration::from_secs(5),
        ..EtcdOpts::default()
    })
    .err()
    .expect("etcd refuses an unknown flag");
    assert!(err.contains("m0") && err.contains("m0.log"), "{err}");
}
