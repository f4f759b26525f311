//! A real one-member etcd for the store tests (the lab tests run a 3-member cluster:
//! tests/src/etcd.rs). Under `CI=true` a missing etcd fails the test; elsewhere the etcd
//! part is skipped with the reason printed.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // synchronous test code
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller::ha::conn::EtcdConn;
use controller::ha::{EtcdStore, Guard};

pub struct OneEtcd {
    child: Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
    pub endpoint: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

impl OneEtcd {
    /// Starts one member, or `None` (printed) when etcd is missing outside CI.
    pub fn start() -> Option<OneEtcd> {
        let installed = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("etcd is not installed (run `cargo xtask setup`); CI=true, so this fails");
            }
            eprintln!("SKIPPED the etcd store: etcd is not installed (run `cargo xtask setup`)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.path().join("etcd.log");
        let child = Command::new("etcd")
            .args(["--name", "s1", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("s1={peer_url}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--grpc-keepalive-min-time", "400ms"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("etcd log"))
            .spawn()
            .expect("starting etcd");
        let etcd = OneEtcd {
            child,
            _dir: dir,
            log,
            endpoint,
        };
        let rt = runtime();
        let started = Instant::now();
        let mut conn = EtcdConn::new(vec![etcd.endpoint.clone()], Duration::from_millis(500), 0);
        while rt.block_on(conn.get("health-probe")).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "etcd did not answer within 20 s; its log: {}",
                etcd.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(etcd)
    }

    /// Takes the leader key under `prefix` on a fresh lease (TTL 60 s): the guard a
    /// leader's store writes under.
    pub fn take_lead(&self, prefix: &str) -> Guard {
        let rt = runtime();
        let mut conn = EtcdConn::new(vec![self.endpoint.clone()], Duration::from_secs(2), 0);
        rt.block_on(async {
            let lease = conn.lease_grant(60).await.expect("lease").id();
            let key = format!("{prefix}leader");
            let txn = etcd_client::Txn::new()
                .when(vec![etcd_client::Compare::create_revision(
                    key.as_str(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then(vec![etcd_client::TxnOp::put(
                    key.as_str(),
                    "test",
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )]);
            let r = conn.txn(txn).await.expect("txn");
            assert!(r.succeeded(), "the leader key {key} is free");
            Guard {
                leader_key: key,
                create_revision: r.header().expect("header").revision(),
                lease,
            }
        })
    }

    /// Revokes a lease (its leader key goes with it).
    pub fn revoke(&self, lease: i64) {
        let rt = runtime();
        let mut conn = EtcdConn::new(vec![self.endpoint.clone()], Duration::from_secs(2), 0);
        rt.block_on(conn.lease_revoke(lease)).expect("revoke");
    }

    /// A store under `prefix` (ends with `/`), guarded by a fresh lead.
    pub fn leader_store(&self, prefix: &str) -> (EtcdStore, i64) {
        let guard = self.take_lead(prefix);
        let lease = guard.lease;
        let store = EtcdStore::open(
            vec![self.endpoint.clone()],
            Duration::from_secs(2),
            prefix.to_owned(),
            Some(guard),
            None,
        )
        .expect("etcd store");
        (store, lease)
    }
}

impl Drop for OneEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
