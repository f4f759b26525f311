//! `lab drill`: each failure injected into the running lab, what it waits for until defib
//! has restored the lab, and the timeline it prints.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use super::describe::{defibctl, defibctl_json, host_state, newest_incident};
use super::placement::{self, Vm};
use super::{alive, keeper_pid, kill, read_state, Drill};

/// How a drill picks its target among those that qualify now: the usual one (each drill
/// says which), or one at random (`drill random`).
pub(super) enum Pick<'a> {
    Usual,
    Random(&'a mut fastrand::Rng),
}

impl Pick<'_> {
    /// `items[usual]`, or a random item; `None` if there are none.
    fn one<'i, T>(&mut self, items: &'i [T], usual: usize) -> Option<&'i T> {
        match self {
            _ if items.is_empty() => None,
            Pick::Usual => items.get(usual.min(items.len() - 1)),
            Pick::Random(rng) => items.get(rng.usize(..items.len())),
        }
    }
}

/// The running lab's state file (read again before each drill: a host that came back
/// has a new watchdog pid).
fn running_lab() -> anyhow::Result<Value> {
    read_state()
        .filter(|s| keeper_pid(s).is_some())
        .context("the lab is down (`cargo xtask lab up`)")
}

/// `lab drill KIND`, on a lab whose keeper runs.
pub(super) fn drill(kind: Drill) -> anyhow::Result<()> {
    let state = running_lab()?;
    // The Nova lab's hosts are fake computes: no qemu to kill, no disk to stall.
    if state["nova_prefix"].is_string()
        && matches!(
            kind,
            Drill::VmCrash | Drill::DiskStall | Drill::Random { .. }
        )
    {
        bail!(
            "the lab runs with --nova: its hosts are Nova's fake computes, whose servers have no \
             qemu and no disk (vm-crash, disk-stall and random need `cargo xtask lab up` without --nova)"
        );
    }
    match kind {
        Drill::Random { rounds, seed } => random(rounds, seed),
        kind => one(&state, kind, &mut Pick::Usual),
    }
}

/// One drill of `kind`.
fn one(state: &Value, kind: Drill, pick: &mut Pick) -> anyhow::Result<()> {
    match kind {
        Drill::VmCrash => vm_crash(state, pick),
        Drill::DiskStall => disk_stall(state, pick),
        Drill::HostLoss => lose_host(state, false, pick),
        Drill::Partition => lose_host(state, true, pick),
        Drill::ControllerLoss => controller_loss(state, pick),
        Drill::Random { .. } => bail!("random is not a drill of its own kind"),
    }
}

/// `drill random`: `rounds` drills of random kinds on random targets, each followed by
/// the health check; the seed first, so that a failure can be replayed.
fn random(rounds: usize, seed: Option<u64>) -> anyhow::Result<()> {
    let seed = seed.unwrap_or_else(|| fastrand::u64(..));
    println!(
        "drill random: seed {seed}, {rounds} rounds (replay: cargo xtask lab drill random --rounds {rounds} --seed {seed})"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    // A lab that is not healthy before the first drill would be blamed on it.
    healthy(&running_lab()?).context("before the first drill")?;
    for round in 1..=rounds {
        let kind = Drill::KINDS[rng.usize(..Drill::KINDS.len())];
        println!("\n== round {round}/{rounds}: {} (seed {seed})", kind.name());
        let state = running_lab()?;
        one(&state, kind, &mut Pick::Random(&mut rng))
            .and_then(|()| healthy(&state))
            .with_context(|| format!("round {round} of {rounds}, {}, seed {seed}", kind.name()))?;
    }
    println!("\ndrill random: {rounds} rounds passed (seed {seed})");
    Ok(())
}

/// How long after a drill the lab may take to settle (a heartbeat's count, the
/// controller's list) before the health check fails.
const SETTLE: Duration = Duration::from_secs(10);

/// The check after each drill: every lab VM runs exactly once (one qemu with its UUID on
/// the whole machine, run by the libvirt of the host defib places it on) and is Running
/// in defib, and each host's watchdog counts what defib places on it. A second qemu of a
/// VM fails at once (the lab kills a lost host's qemus with its power, so there is no
/// moment when two may run); the rest may take `SETTLE`.
pub(super) fn healthy(state: &Value) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let vms = placement::survey(state)?;
        if let Some(twice) = vms.iter().find(|v| v.qemus.len() > 1) {
            bail!("a VM runs twice: {}", twice.problem().unwrap_or_default());
        }
        let mut problems: Vec<String> = vms.iter().filter_map(Vm::problem).collect();
        problems.extend(count_problems(state, &vms)?);
        if problems.is_empty() {
            println!(
                "check: each of {} VMs runs exactly once and is Running in defib; every watchdog counts what defib places on its host",
                vms.len()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not healthy {} s after the drill:\n  {}",
                SETTLE.as_secs(),
                problems.join("\n  ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Hosts whose watchdog's VM count differs from the VMs defib places there.
fn count_problems(state: &Value, vms: &[Vm]) -> anyhow::Result<Vec<String>> {
    let hosts = defibctl_json(state, &["hosts"])?;
    Ok(hosts["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| {
            let name = h["host"].as_str()?;
            let placed = vms
                .iter()
                .filter(|v| v.defib.as_ref().is_some_and(|(on, _)| on == name))
                .count() as u64;
            let counted = h["vm_count"].as_u64()?;
            (counted != placed).then(|| {
                format!(
                    "{name}: its watchdog counts {counted} qemus, defib places {placed} VMs there"
                )
            })
        })
        .collect())
}

/// Kills the qemu of a lab VM that runs (once, Running in defib) with SIGKILL, wherever
/// it runs now (usually the first lab guest that does), waits until defib closed the
/// incident and the VM runs again (restarted in place, or evacuated once its restart
/// budget is spent), and prints the incident's timeline.
fn vm_crash(state: &Value, pick: &mut Pick) -> anyhow::Result<()> {
    let vms = placement::survey(state)?;
    anyhow::ensure!(!vms.is_empty(), "the lab has no guests");
    let running: Vec<&Vm> = vms.iter().filter(|v| v.runs_once_on().is_some()).collect();
    let Some(vm) = pick.one(&running, 0) else {
        let why: Vec<String> = vms.iter().filter_map(Vm::problem).collect();
        bail!(
            "no lab VM runs once and Running in defib:\n  {}",
            why.join("\n  ")
        );
    };
    let (name, uuid, pid) = (&vm.name, &vm.uuid, vm.qemus[0].pid);
    let on = vm.runs_once_on().unwrap_or("?").to_string();
    let subject = format!("vm:{uuid}");
    let before = newest_incident(state, &subject)?.map(|i| i["id"].clone());
    println!("drill vm-crash: SIGKILL to qemu pid {pid} of {name} on {on}");
    kill(pid, "-KILL");
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some(inc) = newest_incident(state, &subject)? {
            if Some(&inc["id"]) != before.as_ref() && !inc["closed_at_ms"].is_null() {
                break inc["id"].as_u64().unwrap_or(0);
            }
        }
        if Instant::now() > deadline {
            bail!("no closed incident about {subject} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    print!("{}", defibctl(state, &["incidents", &id.to_string()])?);
    // A new qemu: restarted in place, or on another host once the VM's restart budget
    // (engine.max_restarts_in_place within engine.restart_window_s) is spent.
    let mut again = None;
    wait_for(&format!("{name} running again"), 30, || {
        let now = placement::survey(state)?;
        again = now
            .iter()
            .find(|v| v.uuid == *uuid)
            .and_then(|v| Some((v.runs_once_on()?.to_string(), v.qemus[0].pid)))
            .filter(|(_, p)| *p != pid);
        Ok(again.is_some())
    })?;
    let (now_on, new_pid) = again.unwrap_or_default();
    let how = if now_on == on {
        "restarted in place".to_string()
    } else {
        format!("not restarted in place: started on another host than {on}, see the timeline")
    };
    println!("{name} runs again on {now_on}: qemu pid {new_pid} ({how})");
    Ok(())
}

/// Sends SIGCONT to the FUSE daemon when dropped: a drill that fails half-way does not
/// leave a guest's storage hanging.
struct ResumeStorage(u64);

impl Drop for ResumeStorage {
    fn drop(&mut self) {
        kill(self.0, "-CONT");
    }
}

/// Wall clock, unix ms: comparable with the controller's timeline times (one machine).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Completed disk writes in a guest's serial log (`HB-IO <n>` lines; a restarted guest
/// counts from 1 again, so lines are counted, not numbers read).
fn io_lines(serial: &Path) -> usize {
    String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default())
        .lines()
        .filter(|l| l.trim().starts_with("HB-IO "))
        .count()
}

/// Stops the FUSE daemon under a running guest's loop device past the watchdog's stall
/// threshold, waits for the stall incident, lets the storage run again, waits until the
/// incident is closed and the guest writes again, and prints the timeline.
fn disk_stall(state: &Value, pick: &mut Pick) -> anyhow::Result<()> {
    let vms = placement::survey(state)?;
    // The stallable guests that run now (wherever an earlier drill put them); usually
    // the first.
    let stallable: Vec<(Value, &Vm)> = state["stall_disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            let vm = vms
                .iter()
                .find(|v| d["guest"] == v.name.as_str() && v.runs_once_on().is_some())?;
            Some((d.clone(), vm))
        })
        .collect();
    let (disk, vm) = pick
        .one(&stallable, 0)
        .context("no guest with a stallable disk runs (`cargo xtask lab status`)")?;
    let (disk, uuid) = (disk.clone(), vm.uuid.clone());
    let name = disk["guest"].as_str().unwrap_or("?").to_string();
    let on = vm.runs_once_on().unwrap_or("?").to_string();
    let bindfs = disk["bindfs_pid"]
        .as_u64()
        .filter(|&p| alive(p))
        .context("the guest's FUSE daemon is gone")?;
    let serial = defib_tests::guests::guests_dir().join(format!("{name}.serial.log"));
    let subject = format!("vm:{uuid}");
    let before = newest_incident(state, &subject)?.map(|i| i["id"].clone());
    println!(
        "drill disk-stall: the storage of {name} on {on} stops (SIGSTOP to bindfs pid {bindfs} under {})",
        disk["loop"].as_str().unwrap_or("?")
    );
    let stopped_ms = unix_ms();
    let resume = ResumeStorage(bindfs);
    kill(bindfs, "-STOP");
    let mut id = 0;
    wait_for("the stall incident", 60, || {
        Ok(match newest_incident(state, &subject)? {
            Some(inc) if Some(&inc["id"]) != before.as_ref() => {
                id = inc["id"].as_u64().unwrap_or(0);
                true
            }
            _ => false,
        })
    })?;
    // The guest is stuck: no disk write completes while the storage is stopped.
    let stuck = io_lines(&serial);
    std::thread::sleep(Duration::from_millis(1000));
    anyhow::ensure!(
        io_lines(&serial) == stuck,
        "{name} wrote its disk while its storage was stopped"
    );
    println!("{name}: stall incident i{id} open; the storage runs again");
    let resumed_ms = unix_ms();
    drop(resume);
    wait_for("the stall incident closed", 60, || {
        let inc = defibctl_json(state, &["incidents", &id.to_string()])?;
        Ok(!inc["closed_at_ms"].is_null())
    })?;
    let inc = defibctl_json(state, &["incidents", &id.to_string()])?;
    print!("{}", defibctl(state, &["incidents", &id.to_string()])?);
    let at = |what: &str| {
        inc["timeline"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["cause"].as_str().is_some_and(|c| c.starts_with(what)))
            .and_then(|e| e["at"].as_u64())
    };
    let (Some(seen), Some(ended)) = (at("disk stall started"), at("disk stall ended")) else {
        bail!("incident i{id} is not the stall's (no disk stall started and ended): {inc}");
    };
    println!(
        "stall seen by the probe (in the controller) at +{} ms after the storage stopped; ended at +{} ms after it ran again",
        seen.saturating_sub(stopped_ms),
        ended.saturating_sub(resumed_ms)
    );
    // Healthy again: the guest writes its disk, and still runs where it ran.
    let now = io_lines(&serial);
    wait_for(&format!("{name} writing its disk again"), 30, || {
        Ok(io_lines(&serial) >= now + 2)
    })?;
    let vms = defibctl_json(state, &["vms"])?;
    anyhow::ensure!(
        vms["vms"].as_array().into_iter().flatten().any(|v| {
            v["resource"] == subject.as_str() && v["state"] == "Running" && v["host"] == on.as_str()
        }),
        "{name} is not Running on {on} after the stall: {vms}"
    );
    println!("{name} writes its disk again and runs on {on}");
    Ok(())
}

/// Polls `ok` every 100 ms for up to `secs`.
fn wait_for(
    what: &str,
    secs: u64,
    mut ok: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok()? {
        if Instant::now() > deadline {
            bail!("{what}: not within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The host-loss and partition drills on the last lab host: the failure, the host's
/// incident until its guests run elsewhere, its timeline; then the host back.
/// `drill controller-loss`: a host powered off, and the leading controller SIGKILLed
/// right after (while it detects the loss); a follower takes the lead and finishes.
fn controller_loss(state: &Value, pick: &mut Pick) -> anyhow::Result<()> {
    let Some(leader) = super::describe::leader(state)? else {
        bail!("controller-loss needs several controllers: `cargo xtask lab up --ha`");
    };
    let old = leader.id;
    let pid = state["controllers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["id"] == old.as_str())
        .and_then(|c| c["pid"].as_u64())
        .context("the state file has no pid for the leader")?;
    lose_host_then(state, false, pick, &mut |_| {
        std::thread::sleep(Duration::from_millis(200));
        let killed_ms = unix_ms();
        kill(pid, "-KILL");
        let at = Instant::now();
        println!("drill controller-loss: the leader {old} (pid {pid}) SIGKILLed");
        let new = wait_new_term(state, killed_ms)?;
        println!(
            "drill controller-loss: {}{} leads {:.2} s after the kill",
            new.id,
            if new.id == old {
                " (killed, started again by the keeper as systemd would, and elected again)"
            } else {
                ""
            },
            at.elapsed().as_secs_f64()
        );
        Ok(())
    })?;
    if let Some(finisher) = super::describe::leader(state)? {
        println!(
            "drill controller-loss: the recovery was finished by {} (the killed leader was {old})",
            finisher.id
        );
    }
    Ok(())
}

/// Waits until a controller leads in a term that began after `after_ms` (unix ms): any
/// other controller, or the killed one started again.
fn wait_new_term(state: &Value, after_ms: u64) -> anyhow::Result<super::describe::Leader> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(l)) = super::describe::leader(state) {
            if l.since_ms >= after_ms {
                return Ok(l);
            }
        }
        if Instant::now() > deadline {
            bail!("no controller began a new term within 30 s of the kill");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lose_host(state: &Value, partition: bool, pick: &mut Pick) -> anyhow::Result<()> {
    lose_host_then(state, partition, pick, &mut |_| Ok(()))
}

/// A host lost (powered off, or cut off with `partition`); `meanwhile` runs right after
/// the loss; then the wait for the recovery, the timeline, and the host back.
fn lose_host_then(
    state: &Value,
    partition: bool,
    pick: &mut Pick,
    meanwhile: &mut dyn FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    // A host that runs a VM now (an earlier drill may have emptied one), usually the last:
    // as the controller sees them, or, in the Nova lab, as Nova does (the controller
    // learns a host's servers from Nova only when it forces the host's compute down).
    let vms = defibctl_json(state, &["vms"])?;
    let vms = vms["vms"].as_array().cloned().unwrap_or_default();
    let nova = match state["nova_prefix"].as_str() {
        Some(prefix) => Some((super::nova::attach()?, prefix.to_string())),
        None => None,
    };
    let runs_vms = |h: &Value| match &nova {
        Some((api, prefix)) => {
            !super::nova::servers_on(api, prefix, h["name"].as_str().unwrap_or("?")).is_empty()
        }
        None => vms
            .iter()
            .any(|v| v["host"] == h["name"] && v["state"] == "Running"),
    };
    let candidates: Vec<&Value> = state["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| runs_vms(h))
        .collect();
    let host = *pick
        .one(&candidates, candidates.len().saturating_sub(1))
        .context("no lab host runs a VM")?;
    let name = host["name"].as_str().unwrap_or("?").to_string();
    let h = host["index"]
        .as_u64()
        .context("the state file names no host index")? as usize;
    let ctl_ns = state["controller_ns"].as_str().unwrap_or("");
    let bmc = host["bmc_addr"].as_str().unwrap_or("");
    let servers: Vec<String> = match &nova {
        Some((api, prefix)) => super::nova::servers_on(api, prefix, &name),
        None => Vec::new(),
    };
    let subjects: Vec<String> = match &nova {
        Some(_) => servers.iter().map(|id| format!("vm:{id}")).collect(),
        None => vms
            .iter()
            .filter(|v| v["host"] == name.as_str() && v["state"] == "Running")
            .filter_map(|v| v["resource"].as_str().map(String::from))
            .collect(),
    };
    let earlier = newest_incident(state, &format!("host:{name}"))?.map(|i| i["id"].clone());
    let old_wd = host["watchdog_pid"].as_u64();
    anyhow::ensure!(
        host_state(state, &name)? == "Up",
        "{name} is not Up; run the drill on a healthy lab"
    );
    if partition {
        let sw = state["namespaces"][0].as_str().unwrap_or("");
        println!("drill partition: every link of {name} cut at the switch ({name} runs on)");
        for p in 0..2 {
            let port = format!("h{h}-p{p}");
            let st = Command::new("ip")
                .args(["-n", sw, "link", "set", &port, "down"])
                .status()?;
            anyhow::ensure!(st.success(), "cutting {port}");
        }
    } else {
        println!("drill host-loss: {name} powered off at its BMC ({bmc})");
        defib_tests::bmc::chassis_power(ctl_ns, bmc, "off").map_err(anyhow::Error::msg)?;
    }
    meanwhile(&name)?;
    // Fenced, and every guest of the host running on another one (in the Nova lab: every
    // server ACTIVE on another compute, as Nova says).
    if let Some((api, prefix)) = &nova {
        println!(
            "{name}'s nova-compute killed with it; {} servers of the lab on {name}",
            servers.len()
        );
        wait_for(&format!("{name}'s servers ACTIVE elsewhere"), 180, || {
            Ok(super::nova::all_active_elsewhere(
                api, prefix, &servers, &name,
            ))
        })?;
    }
    wait_for(&format!("{name}'s guests running elsewhere"), 120, || {
        let vms = defibctl_json(state, &["vms"])?;
        let list = vms["vms"].as_array().cloned().unwrap_or_default();
        Ok(subjects.iter().all(|s| {
            list.iter().any(|v| {
                v["resource"] == s.as_str() && v["state"] == "Running" && v["host"] != name.as_str()
            })
        }))
    })?;
    let id = newest_incident(state, &format!("host:{name}"))?
        .filter(|i| Some(&i["id"]) != earlier.as_ref())
        .and_then(|i| i["id"].as_u64())
        .context("no new incident about the host")?;
    print!("{}", defibctl(state, &["incidents", &id.to_string()])?);
    print!("{}", defibctl(state, &["vms"])?);
    if let Some((api, prefix)) = &nova {
        println!("Nova:");
        for s in super::nova::placement_of(api, prefix, &servers) {
            println!(
                "  {} {} {} on {}",
                s["id"].as_str().unwrap_or("?"),
                s["name"].as_str().unwrap_or("?"),
                s["status"].as_str().unwrap_or("?"),
                s["host"].as_str().unwrap_or("?")
            );
        }
    }

    // Back to healthy: power on (the keeper brings its links up and starts its watchdog
    // again), then trust it again.
    println!("\n{name}: power on, unfence");
    defib_tests::bmc::chassis_power(ctl_ns, bmc, "on").map_err(anyhow::Error::msg)?;
    wait_for(&format!("{name}'s watchdog started again"), 30, || {
        Ok(read_state()
            .and_then(|s| {
                s["hosts"]
                    .as_array()
                    .and_then(|l| l.iter().find(|x| x["name"] == name.as_str()).cloned())
            })
            .and_then(|x| x["watchdog_pid"].as_u64())
            .is_some_and(|p| Some(p) != old_wd && alive(p)))
    })?;
    // Its heartbeats back, the fenced host is Recovered: the operator's word trusts it.
    wait_for(&format!("{name} Recovered"), 60, || {
        Ok(host_state(state, &name)? == "Recovered")
    })?;
    // Refused while the host still lists a domain that now runs elsewhere (its libvirt
    // may not have noticed the killed qemu yet): asked again, as an operator would.
    let mut refused = None;
    wait_for(&format!("{name} unfenced"), 60, || {
        match defibctl(state, &["unfence", &name]) {
            Ok(out) => {
                print!("{out}");
                Ok(true)
            }
            Err(e) => {
                if refused.is_none() {
                    println!("{e} (asking again)");
                }
                refused = Some(e);
                Ok(false)
            }
        }
    })?;
    wait_for(&format!("{name} Up again"), 60, || {
        Ok(host_state(state, &name)? == "Up")
    })?;
    // In the Nova lab the unfence also unforces the compute (Nova refuses until the
    // returned nova-compute has cleaned up its evacuated servers; the controller retries).
    if let Some((api, _)) = &nova {
        super::nova::wait_compute_back(api, &name, 180)?;
        println!("{name}: nova-compute up, not forced down");
    }
    println!("{name} is Up again");
    Ok(())
}
