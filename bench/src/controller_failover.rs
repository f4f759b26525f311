//! Issue 15: several controllers, one leader elected on etcd.
//!
//! 1. **Takeover.** A real 3-member etcd cluster (etcd 3.4, `--heartbeat-interval 50
//!    --election-timeout 500`) and three defib-controller processes (release builds,
//!    default `[etcd]`: TTL 1 s, margin 250 ms) on 127.0.0.1. Each round SIGKILLs the
//!    leader and measures, from the kill, the new leader's lease win (`LEADER` in its
//!    log) and its first action: the first guarded write of its term (`LEADING`, logged
//!    after it; nothing acts before it). The killed controller is started again as a
//!    follower and the next round waits a random 0.5–1.5 s (a random keep-alive phase).
//! 2. **Host loss with the leader killed mid-recovery** (`--lab-rounds`, 0 to skip):
//!    `cargo xtask lab up --ha` (3 hosts with KVM guests, IPMI BMCs, three controllers on
//!    etcd in the controller namespace); each round powers a host off and SIGKILLs the
//!    leader 0.3 s later; the time until every VM of the host runs elsewhere.
//! 3. **Intents.** One leader's store writes, one after the other: a guarded etcd
//!    transaction per intent (3 members) against SQLite's fsynced commit on this disk;
//!    per-write latency and the intents per second one writer sustains.
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use controller::engine::{HostId, Intent, IntentKey, IntentRecord, Timestamp};
use controller::store::{SqliteStore, Store};
use defib_tests::etcd::{EtcdCluster, EtcdOpts};

use crate::report::{self, Series};

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One controller of the takeover part.
struct Ctl {
    i: usize,
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
    api: String,
}

impl Ctl {
    fn start(&mut self) -> anyhow::Result<()> {
        let bin = defib_tests::built_binary("defib-controller", "defib-controller");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.child = Some(
            Command::new(bin)
                .arg("--config")
                .arg(&self.conf)
                .args(["--log-format", "text", "run"])
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        Ok(())
    }

    fn role(&self) -> Option<String> {
        let mut s =
            TcpStream::connect_timeout(&self.api.parse().ok()?, Duration::from_millis(300)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let body = out.split_once("\r\n\r\n")?.1;
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        v["role"].as_str().map(str::to_owned)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first line of `log` with `what` stamped at or after `since` (unix ms).
fn first_after(log: &Path, what: &str, since: u64) -> Option<u64> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .filter(|l| l.contains(what))
        .filter_map(defib_tests::logs::line_unix_ms)
        .find(|&t| t >= since)
}

fn takeover(rounds: usize, dir: &Path) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<String>)> {
    let etcd = EtcdCluster::try_start(EtcdOpts::default()).map_err(anyhow::Error::msg)?;
    defib_tests::write_secret(dir.join("key"), "0123456789abcdef0123456789abcdef\n")?;
    let mut ctls: Vec<Ctl> = Vec::new();
    for i in 0..3 {
        let base = 27_410 + 10 * i as u16;
        let conf = dir.join(format!("c{i}.toml"));
        std::fs::write(
            &conf,
            format!(
                "[controller]\nid = \"c{i}\"\ncluster_id = \"bench{}\"\nkey_file = {:?}\n\
                 heartbeat_listen = [\"127.0.0.1:{base}\"]\nevent_listen = \"127.0.0.1:{}\"\n\
                 api_listen = \"127.0.0.1:{}\"\napi_token_file = {:?}\n\n[etcd]\nendpoints = {:?}\n",
                std::process::id(),
                dir.join("key").display().to_string(),
                base + 1,
                base + 2,
                crate::controller::api_token_file(dir)?.display().to_string(),
                etcd.endpoints()
            ),
        )?;
        let mut c = Ctl {
            i,
            child: None,
            conf,
            log: dir.join(format!("c{i}.log")),
            api: format!("127.0.0.1:{}", base + 2),
        };
        c.start()?;
        ctls.push(c);
    }
    let leader_of = |ctls: &[Ctl]| -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = ctls.iter().find(|c| c.role().as_deref() == Some("leader")) {
                return Ok(c.i);
            }
            anyhow::ensure!(Instant::now() < deadline, "no controller leads");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (mut won, mut acted, mut who) = (Vec::new(), Vec::new(), Vec::new());
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for n in 1..=rounds {
        let old = leader_of(&ctls)?;
        // Followers settled (every one a follower knowing the leader).
        std::thread::sleep(Duration::from_millis(300));
        let killed_at = unix_ms();
        ctls[old].kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (new, w, a) = loop {
            let found = ctls.iter().filter(|c| c.i != old).find_map(|c| {
                let a = first_after(&c.log, "LEADING:", killed_at)?;
                let w = first_after(&c.log, "LEADER: this controller leads", killed_at)?;
                Some((c.i, w, a))
            });
            if let Some(f) = found {
                break f;
            }
            anyhow::ensure!(Instant::now() < deadline, "round {n}: no new leader");
            std::thread::sleep(Duration::from_millis(20));
        };
        won.push(w.saturating_sub(killed_at) as f64);
        acted.push(a.saturating_sub(killed_at) as f64);
        who.push(format!("c{old}→c{new}"));
        eprintln!(
            "round {n}: c{old} killed; c{new} won the lease after {} ms, first guarded write after {} ms",
            w.saturating_sub(killed_at),
            a.saturating_sub(killed_at)
        );
        ctls[old].start()?;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(500 + rng % 1000));
    }
    drop(ctls);
    drop(etcd);
    Ok((won, acted, who))
}

fn record(i: usize) -> IntentRecord {
    IntentRecord {
        key: IntentKey(format!("i{i}/fence-1/host:h{}", i % 100)),
        at: Timestamp(1_800_000_000_000 + i as u64),
        intent: Intent::Maintenance {
            host: HostId::new(format!("h{}", i % 100)),
            on: true,
        },
    }
}

/// Per-write latencies (ms) and the rate (intents/s) of one writer.
type Writes = (Vec<f64>, f64);

/// [`Writes`] of `n` intents written one after the other into `store`.
fn writes(store: &mut dyn Store, n: usize) -> anyhow::Result<Writes> {
    let mut lat = Vec::with_capacity(n);
    let began = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        anyhow::ensure!(store.record_intent(&record(i))?, "intent {i} refused");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((lat, n as f64 / began.elapsed().as_secs_f64()))
}

/// The same `n` intents on etcd (guarded, 3 members), then on SQLite.
fn intents(n: usize, dir: &Path) -> anyhow::Result<(Writes, Writes)> {
    let etcd = EtcdCluster::try_start(EtcdOpts::default()).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut conn = controller::ha::conn::EtcdConn::new(etcd.endpoints(), Duration::from_secs(2), 0);
    let prefix = "/defib/bench/".to_string();
    let guard = rt.block_on(async {
        let lease = conn.lease_grant(60).await?.id();
        let key = format!("{prefix}leader");
        let txn = etcd_client::Txn::new().and_then(vec![etcd_client::TxnOp::put(
            key.as_str(),
            "bench",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )]);
        let r = conn.txn(txn).await?;
        Ok::<_, controller::ha::conn::EtcdError>(controller::ha::Guard {
            leader_key: key,
            create_revision: r.header().map(|h| h.revision()).unwrap_or(0),
            lease,
        })
    })?;
    let mut store = controller::ha::EtcdStore::open(
        etcd.endpoints(),
        Duration::from_secs(2),
        prefix,
        Some(guard),
        None,
    )?;
    let on_etcd = writes(&mut store, n)?;
    drop(store);
    drop(etcd);
    let mut sqlite = SqliteStore::open(dir.join("bench.sqlite"))?;
    let on_sqlite = writes(&mut sqlite, n)?;
    Ok((on_etcd, on_sqlite))
}

pub fn run(rounds: usize, lab_rounds: usize, intents_n: usize) -> anyhow::Result<String> {
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        defib_tests::etcd::installed(),
        "{}",
        defib_tests::etcd::NOT_INSTALLED
    );
    let began = Instant::now();
    let tmp = tempfile::tempdir_in("/var/tmp")?;
    let (won, acted, who) = takeover(rounds, tmp.path())?;
    let ((etcd_lat, etcd_rate), (sqlite_lat, sqlite_rate)) = intents(intents_n, tmp.path())?;
    let mut series = vec![
        Series {
            name: "leader SIGKILL → a follower wins the lease".into(),
            samples_ms: won,
        },
        Series {
            name: "leader SIGKILL → the new leader's first action (first guarded write)".into(),
            samples_ms: acted,
        },
    ];
    let mut lab_note =
        String::from("Part 2 (host loss with the leader killed) skipped (--lab-rounds 0).");
    if lab_rounds > 0 {
        let lab = crate::host_loss::BenchLab::up_with(3, 2, None, true)?;
        let mut all = Vec::new();
        let mut names = Vec::new();
        for n in 1..=lab_rounds {
            let r =
                crate::host_loss::round_killing(&lab, n, None, Some(Duration::from_millis(300)))?;
            if let Some((old, new, at)) = &r.killed {
                let again = if new == old { " started again" } else { "" };
                names.push(format!(
                    "{} ({} VMs; {old} killed at {at:.0} ms, {new}{again} finished)",
                    r.host, r.vms
                ));
            }
            all.push(r.all_running);
        }
        drop(lab);
        series.push(Series {
            name: "host power loss, leader SIGKILLed 0.3 s later → every VM of the host Running elsewhere".into(),
            samples_ms: all,
        });
        lab_note = format!(
            "Part 2: `cargo xtask lab up --ha --hosts 3 --guests-per-host 2` (debug builds as the \
             lab runs them; t0 the BMC's log of the power-off's first kill, as in host-loss); \
             rounds: {}.",
            names.join(", ")
        );
    }
    series.push(Series {
        name: "one intent written: etcd, guarded transaction (3 members)".into(),
        samples_ms: etcd_lat,
    });
    series.push(Series {
        name: "one intent written: SQLite (fsync per commit, one controller)".into(),
        samples_ms: sqlite_lat,
    });
    let notes = format!(
        "Part 1: etcd 3.4 (3 members on 127.0.0.1, --heartbeat-interval 50 \
         --election-timeout 500, data on disk), three release defib-controllers with the \
         default [etcd] settings (lease TTL 1 s, stop margin 250 ms, campaign every 100 ms), \
         no hosts. t0 is just before the SIGKILL (unix ms); the figures are the controllers' \
         own log stamps (same clock). Rounds (old→new): {}. {lab_note} Part 3: {intents_n} \
         intents recorded one after the other by one writer: etcd {etcd_rate:.0} intents/s, \
         SQLite {sqlite_rate:.0} intents/s (a file under /var/tmp on this machine's virtio \
         disk). Whole run {:.0} s.",
        who.join(", "),
        began.elapsed().as_secs_f64()
    );
    report::write(
        &report::results_dir(),
        "controller-failover",
        &format!(
            "cargo xtask bench controller-failover --rounds {rounds} --lab-rounds {lab_rounds} --intents {intents_n}"
        ),
        &notes,
        &series,
    )
}
