//! Controller heartbeat intake on one core: the release controller pinned to core 0,
//! heartbeats of many simulated hosts (each enrolled, signed with its own key, echoing
//! the controller's session, so every one is a proven sign of life, and asking for an
//! ack every 375 ms like a default watchdog) blasted at it from the other cores over
//! loopback with `sendmmsg`, and the controller's own counts of accepted (proven)
//! datagrams and of acks sent read from /metrics once a second.
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::controller::{self, host_id, metric_labelled, metric_sum, ControllerProcess, Enrolled};
use crate::report::{self, Series, Unit};

const BATCH: usize = 64;

/// The controller's heartbeat socket thread ("defib-heartbeats", as the kernel keeps a
/// thread's name: 15 bytes).
const INTAKE_THREAD: &str = "defib-heartbeat";

/// Heartbeats pre-encoded for one sender thread: `rounds` rounds over its hosts, every
/// host's sequence increasing by one per round from `first_sequence`, every heartbeat
/// echoing `session`.
struct Pool {
    bytes: Vec<u8>,
    len: usize,
    count: usize,
}

fn pre_encode(
    hosts: &[usize],
    rounds: usize,
    first_sequence: u64,
    session: u64,
    ack_period_ms: u32,
) -> Pool {
    let ids: Vec<String> = hosts.iter().map(|&i| host_id(i)).collect();
    let keys: Vec<protocol::Key> = hosts.iter().map(|&i| controller::host_key(i)).collect();
    let mut one = Vec::new();
    controller::encode(&keys[0], &ids[0], hosts[0], 1, session, &mut one);
    let len = one.len();
    let count = rounds * hosts.len();
    let mut bytes = Vec::with_capacity(count * len);
    for r in 0..rounds {
        for (k, &i) in hosts.iter().enumerate() {
            let sequence = first_sequence + r as u64;
            controller::encode_asking(
                &keys[k],
                &ids[k],
                i,
                sequence,
                session,
                ack_period_ms,
                &mut one,
            );
            bytes.extend_from_slice(&one);
        }
    }
    Pool { bytes, len, count }
}

pub fn run(
    hosts: usize,
    seconds: u64,
    senders: usize,
    pool_rate: u64,
    interval_ms: Option<u64>,
    gso: bool,
    ack_period_ms: u32,
) -> anyhow::Result<String> {
    let cores = controller::cores();
    anyhow::ensure!(
        cores >= 2,
        "needs 2 cores: one for the controller, one for the senders"
    );
    anyhow::ensure!(
        hosts >= senders && senders >= 1,
        "need at least one host per sender"
    );
    let sender_cpus: Vec<usize> = (1..cores).collect();

    // The controller first: the heartbeats must echo its session, which it draws at start.
    let extra = interval_ms
        .map(|ms| format!("[detector]\nheartbeat_interval_ms = {ms}\n"))
        .unwrap_or_default();
    let c = ControllerProcess::start(Some(vec![0]), Enrolled::Simulated(hosts), &extra)?;
    // Host 0 learns it with its first sequences; every host's pooled heartbeats start after
    // them (a sequence that skips ahead is fresh).
    let (session, first_sequence) = controller::learn_session(c.heartbeat, 0, 1)?;

    // Enough datagrams for `pool_rate`/s over the warm-up and the measured seconds.
    let warmup = 2u64;
    let total = pool_rate * (seconds + warmup + 1);
    let rounds = (total as usize).div_ceil(hosts).max(1);
    eprintln!(
        "pre-encoding {rounds} rounds × {hosts} hosts ({} datagrams) on {senders} threads…",
        rounds * hosts
    );
    let pools: Vec<Pool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..senders)
            .map(|t| {
                let mine: Vec<usize> = (t..hosts).step_by(senders).collect();
                s.spawn(move || pre_encode(&mine, rounds, first_sequence, session, ack_period_ms))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("encoder thread"))
            .collect()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..senders).map(|_| AtomicU64::new(0)).collect());
    let exhausted = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for (t, pool) in pools.into_iter().enumerate() {
        let (stop, sent, exhausted, cpus) = (
            stop.clone(),
            sent.clone(),
            exhausted.clone(),
            sender_cpus.clone(),
        );
        let to = c.heartbeat;
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            controller::pin_current_thread(&cpus)?;
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sock.connect(to)?;
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if next >= pool.count {
                    exhausted.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                let end = (next + BATCH).min(pool.count);
                let n = if gso {
                    let bytes = &pool.bytes[next * pool.len..end * pool.len];
                    controller::send_gso(&sock, bytes, pool.len)?
                } else {
                    let batch: Vec<&[u8]> = (next..end)
                        .map(|k| &pool.bytes[k * pool.len..(k + 1) * pool.len])
                        .collect();
                    controller::send_batch(&sock, &batch)
                };
                sent[t].fetch_add(n as u64, Ordering::Relaxed);
                next = end;
            }
            Ok(())
        }));
    }

    let read = |c: &ControllerProcess| -> anyhow::Result<(u64, u64, u64, u64, u64)> {
        let m = c.metrics()?;
        Ok((
            metric_sum(&m, "defib_heartbeats_accepted_total"),
            metric_sum(&m, "defib_heartbeats_rejected_total"),
            metric_labelled(
                &m,
                "defib_heartbeats_rejected_total{reason=\"engine_busy\"}",
            ),
            c.socket_drops()?,
            metric_sum(&m, "defib_heartbeat_acks_total"),
        ))
    };
    let total_sent = || sent.iter().map(|s| s.load(Ordering::Relaxed)).sum::<u64>();

    std::thread::sleep(Duration::from_secs(warmup));
    let (acc0, rej0, busy0, drop0, acks0) = read(&c)?;
    let sent0 = total_sent();
    let t0 = crate::monotonic_ns();
    let cpu0 = c.cpu_seconds()?;
    let intake_cpu0 = c.thread_cpu_seconds(INTAKE_THREAD)?;
    let mut rates = Vec::new();
    let mut sent_rates = Vec::new();
    let mut per_cpu = Vec::new();
    let mut per_intake_cpu = Vec::new();
    let mut ack_rates = Vec::new();
    let (mut prev_acc, mut prev_sent, mut prev_t, mut prev_cpu, mut prev_acks) =
        (acc0, sent0, t0, cpu0, acks0);
    let mut prev_intake_cpu = intake_cpu0;
    for s in 1..=seconds {
        let target = t0 + s * 1_000_000_000;
        let now = crate::monotonic_ns();
        if target > now {
            std::thread::sleep(Duration::from_nanos(target - now));
        }
        let (acc, _, _, _, acks) = read(&c)?;
        let (snt, t, cpu) = (total_sent(), crate::monotonic_ns(), c.cpu_seconds()?);
        let intake_cpu = c.thread_cpu_seconds(INTAKE_THREAD)?;
        let dt = (t - prev_t) as f64 / 1e9;
        rates.push((acc - prev_acc) as f64 / dt);
        sent_rates.push((snt - prev_sent) as f64 / dt);
        per_cpu.push((acc - prev_acc) as f64 / (cpu - prev_cpu).max(0.01));
        ack_rates.push((acks - prev_acks) as f64 / dt);
        per_intake_cpu.push((acc - prev_acc) as f64 / (intake_cpu - prev_intake_cpu).max(0.01));
        let prev_intake_cpu_before = std::mem::replace(&mut prev_intake_cpu, intake_cpu);
        eprintln!(
            "second {s}: accepted {:.0}/s, sent {:.0}/s, acks {:.0}/s, controller CPU {:.2} \
             (intake thread {:.2})",
            rates.last().copied().unwrap_or(0.0),
            sent_rates.last().copied().unwrap_or(0.0),
            ack_rates.last().copied().unwrap_or(0.0),
            (cpu - prev_cpu) / dt,
            (intake_cpu - prev_intake_cpu_before) / dt,
        );
        (prev_acc, prev_sent, prev_t, prev_cpu, prev_acks) = (acc, snt, t, cpu, acks);
    }
    let (acc1, rej1, busy1, drop1, acks1) = read(&c)?;
    let cpu1 = c.cpu_seconds()?;
    let intake_cpu1 = c.thread_cpu_seconds(INTAKE_THREAD)?;
    let sent1 = total_sent();
    let t1 = crate::monotonic_ns();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("sender thread")?;
    }
    let secs = (t1 - t0) as f64 / 1e9;
    let ran_out = exhausted.load(Ordering::SeqCst);
    let m = c.metrics()?;
    let up = metric_labelled(&m, "defib_hosts{state=\"Up\"}");
    // Only the heartbeats that learnt the session: every pooled one echoes it.
    let unproven_total = metric_labelled(
        &m,
        "defib_heartbeats_rejected_total{reason=\"unproven_session\"}",
    );
    anyhow::ensure!(
        unproven_total < first_sequence,
        "{unproven_total} heartbeats did not prove the session (the pool's session is wrong)"
    );
    drop(c);

    let series = [
        Series {
            name: "accepted by the controller (heartbeats_accepted), per second".into(),
            samples_ms: rates,
        },
        Series {
            name: "accepted per CPU-second the controller used, per second".into(),
            samples_ms: per_cpu,
        },
        Series {
            name: "accepted per CPU-second the intake thread used, per second".into(),
            samples_ms: per_intake_cpu,
        },
        Series {
            name: "sent by the bench, per second".into(),
            samples_ms: sent_rates,
        },
        Series {
            name: "acks sent by the controller (heartbeat_acks), per second".into(),
            samples_ms: ack_rates,
        },
    ];
    let how = if gso {
        "one sendmsg with UDP GSO each, which the kernel splits into separate datagrams before \
         the controller's socket"
    } else {
        "sendmmsg"
    };
    let notes = format!(
        "defib-controller (release binary) with every thread pinned to core 0; {senders} \
         sender threads on cores {sender_cpus:?} send pre-encoded signed heartbeats (layout \
         version {}) of {hosts} hosts (distinct ids, all enrolled by the config, each signing \
         with its own key and with its own increasing sequence, every heartbeat echoing the \
         controller's session, learnt from one ack before the run, and asking for an ack every \
         {} ms) to its one heartbeat socket over loopback, {BATCH} per system call ({how}), as \
         fast as they can; the per-source limit is off (every host sends from one address). \
         Over the {secs:.1} s measured: {} datagrams sent, {} accepted ({:.0}/s), {} acks sent \
         ({:.0}/s: at most one per host and ack period), {} rejected by the controller (of \
         which {} forwards to the engine refused as engine_busy), {} dropped by the kernel at \
         the controller's full socket buffer; {up} hosts Up at the end. The controller used \
         {:.2} CPU-seconds per second, its intake thread (defib-heartbeats: receiving, \
         judging, acking) {:.2}, the rest (the engine task and the runtime) the difference.{} \
         Target: ≥ 1 000 000 accepted datagrams/s.",
        protocol::HEARTBEAT_VERSION,
        ack_period_ms,
        sent1 - sent0,
        acc1 - acc0,
        (acc1 - acc0) as f64 / secs,
        acks1 - acks0,
        (acks1 - acks0) as f64 / secs,
        rej1 - rej0,
        busy1 - busy0,
        drop1 - drop0,
        (cpu1 - cpu0) / secs,
        (intake_cpu1 - intake_cpu0) / secs,
        if ran_out > 0 {
            " The pre-encoded pool ran out before the end: raise --pool-rate."
        } else {
            ""
        },
    );
    report::write_in(
        &report::results_dir(),
        "heartbeat-intake",
        &format!(
            "cargo xtask bench heartbeat-intake --hosts {hosts} --seconds {seconds} --senders {senders}{}{}{}",
            interval_ms.map(|ms| format!(" --interval-ms {ms}")).unwrap_or_default(),
            if gso { "" } else { " --no-gso" },
            if ack_period_ms == controller::ACK_PERIOD_MS {
                String::new()
            } else {
                format!(" --ack-period-ms {ack_period_ms}")
            },
        ),
        &notes,
        Unit {
            symbol: "datagrams/s",
            axis: "datagrams per second",
        },
        &series,
    )
}
