//! `watchdog-restart`: how long a watchdog restart takes, and how many qemu exits it
//! loses, with pinned probes (the default) and without. During every restart a thread
//! SIGKILLs a watched process every few milliseconds, from the SIGTERM to the old
//! daemon until shortly after the new one has attached its probes; afterwards every
//! killed pid must have exactly one `qemu_exited` event (from either daemon) that names
//! its VM.
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use defib_tests::daemon::{collect, PinnedSetup};
use defib_tests::FakeQemu;
use serde_json::Value;

use crate::report::{self, Series};

struct ModeResult {
    restart_ms: Vec<f64>,
    stop_ms: Vec<f64>,
    /// Exit → event decoded, for every exit seen (kernel stamp to the daemon's).
    delay_ms: Vec<f64>,
    kills: usize,
    lost: usize,
    unnamed: usize,
    duplicated: usize,
}

fn run_mode(
    pinned: bool,
    restarts: usize,
    kill_every_ms: u64,
    pool: usize,
) -> anyhow::Result<ModeResult> {
    let name = format!("dfbench{}", defib_tests::tag());
    let setup = PinnedSetup::new(&name, pinned);
    let (tx, rx) = channel::<Value>();
    let mut seen: Vec<Value> = Vec::new();
    let mut daemon = setup.start(&tx);
    daemon.wait_attached(Duration::from_secs(60));
    let mut result = ModeResult {
        restart_ms: Vec::new(),
        stop_ms: Vec::new(),
        delay_ms: Vec::new(),
        kills: 0,
        lost: 0,
        unnamed: 0,
        duplicated: 0,
    };
    let mut killed_all: Vec<(u32, String)> = Vec::new();
    for r in 0..restarts {
        let fakes: Vec<(FakeQemu, String)> = (0..pool)
            .map(|i| {
                let uuid = format!("00000000-0000-4000-8000-{:06x}{:06x}", r, i);
                (
                    FakeQemu::start(&name, &format!("b{r}-{i}"), &uuid, &[]),
                    uuid,
                )
            })
            .collect();
        // Every one watched by the running daemon before the restart begins.
        let deadline = Instant::now() + Duration::from_secs(30);
        let pids: HashSet<u32> = fakes.iter().map(|(f, _)| f.pid()).collect();
        loop {
            let started: HashSet<u32> = seen
                .iter()
                .filter(|v| v["type"] == "qemu_started")
                .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
                .collect();
            if pids.is_subset(&started) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "fake qemus not all seen starting"
            );
            collect(
                &rx,
                &mut seen,
                Duration::from_millis(20),
                Duration::from_millis(100),
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let targets: Vec<(u32, String)> = fakes.iter().map(|(f, u)| (f.pid(), u.clone())).collect();
        let killer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut killed = Vec::new();
                for (pid, uuid) in targets {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    killed.push((pid, uuid));
                    std::thread::sleep(Duration::from_millis(kill_every_ms));
                }
                killed
            })
        };
        let t0 = Instant::now();
        anyhow::ensure!(daemon.stop(), "the daemon did not stop on SIGTERM");
        let stopped = t0.elapsed();
        if std::env::var_os("DEFIB_BENCH_DEBUG").is_some() {
            let log = daemon.log();
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            eprintln!("old daemon's last lines: {tail:#?}");
        }
        daemon = setup.start(&tx);
        daemon.wait_attached(Duration::from_secs(60));
        let restarted = t0.elapsed();
        eprintln!(
            "restart {r} ({}): stopped after {stopped:?}, attached after {restarted:?}",
            if pinned { "pinned" } else { "unpinned" }
        );
        result.stop_ms.push(stopped.as_secs_f64() * 1e3);
        result.restart_ms.push(restarted.as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        let killed = killer
            .join()
            .map_err(|_| anyhow::anyhow!("killer thread panicked"))?;
        anyhow::ensure!(
            killed.len() < pool,
            "the pool of {pool} was used up before the restart ended ({restarted:?}); raise --pool"
        );
        killed_all.extend(killed);
        // The survivors are killed (and their exits counted) too, before the next round.
        for (f, u) in &fakes {
            if !killed_all.iter().any(|(p, _)| *p == f.pid()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(f.pid() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed_all.push((f.pid(), u.clone()));
            }
        }
        drop(fakes); // reaps them
        collect(
            &rx,
            &mut seen,
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
    }
    drop(daemon);
    collect(
        &rx,
        &mut seen,
        Duration::from_millis(200),
        Duration::from_secs(5),
    );
    result.kills = killed_all.len();
    for (pid, uuid) in &killed_all {
        let exits: Vec<&Value> = seen
            .iter()
            .filter(|v| v["type"] == "qemu_exited" && v["pid"] == *pid)
            .collect();
        match exits.len() {
            0 => result.lost += 1,
            1 => {}
            _ => result.duplicated += 1,
        }
        if let Some(e) = exits.first() {
            let k = e["kernel_ns"].as_u64().unwrap_or(0);
            let o = e["observed_ns"].as_u64().unwrap_or(0);
            result.delay_ms.push(o.saturating_sub(k) as f64 / 1e6);
            if e["vm"]["uuid"] != uuid.as_str() {
                if result.unnamed == 0 {
                    let started: Vec<&Value> = seen
                        .iter()
                        .filter(|v| v["type"] == "qemu_started" && v["pid"] == *pid)
                        .collect();
                    eprintln!("first exit not naming its VM {uuid}: {e}\nstarted: {started:?}");
                }
                result.unnamed += 1;
            }
        }
    }
    if pinned {
        let out = setup.unpin();
        anyhow::ensure!(out.status.success(), "unpin failed");
    }
    Ok(result)
}

pub fn run(
    restarts: usize,
    kill_every_ms: u64,
    pool: usize,
    pool_unpinned: usize,
) -> anyhow::Result<String> {
    let pinned = run_mode(true, restarts, kill_every_ms, pool)?;
    let unpinned = run_mode(false, restarts, kill_every_ms, pool_unpinned)?;
    let notes = format!(
        "Each restart: SIGTERM to `defib-watchdog run` (release build), wait for its exit, start a new \
         one, until it logs \"probes attached\" (the sample). Meanwhile a thread SIGKILLs one watched \
         process every {kill_every_ms} ms, from the SIGTERM until 50 ms after the new daemon attached; \
         then the rest are killed; each round starts {pool} processes (pinned) or {pool_unpinned} \
         (unpinned), so each restart follows a burst of that many events, each fsynced to the spool \
         before the daemon can stop (the controller here never acks). Pinned (probes.pin_dir set, the default): {} kills, {} exit events \
         lost, {} duplicated, {} not naming their VM. Unpinned (pin_dir = \"\"): {} kills, {} lost, \
         {} duplicated, {} not naming their VM.",
        pinned.kills,
        pinned.lost,
        pinned.duplicated,
        pinned.unnamed,
        unpinned.kills,
        unpinned.lost,
        unpinned.duplicated,
        unpinned.unnamed
    );
    let series = [
        Series {
            name: "pinned: SIGTERM → old daemon exited".into(),
            samples_ms: pinned.stop_ms,
        },
        Series {
            name: "restart, pinned: SIGTERM → new daemon attached".into(),
            samples_ms: pinned.restart_ms,
        },
        Series {
            name: "restart, unpinned: SIGTERM → new daemon attached".into(),
            samples_ms: unpinned.restart_ms,
        },
        Series {
            name: "pinned: every kill's exit → its event decoded".into(),
            samples_ms: pinned.delay_ms,
        },
        Series {
            name: "unpinned: the same, for the exits seen".into(),
            samples_ms: unpinned.delay_ms,
        },
    ];
    report::write(
        &report::results_dir(),
        "watchdog-restart",
        &format!(
            "cargo xtask bench watchdog-restart --restarts {restarts} --kill-every-ms {kill_every_ms} --pool {pool} --pool-unpinned {pool_unpinned}"
        ),
        &notes,
        &series,
    )
}
