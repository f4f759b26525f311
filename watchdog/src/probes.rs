//! Loads the eBPF object built by build.rs, configures it, attaches every probe, and
//! gives typed access to its maps.
use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf,
};
use watchdog_common::{
    config_index, io_syscalls, rbd_ops, stat_index, BlockInflight, BlockKey, InflightIo,
    NamePattern, RbdInflight, RbdKey, UringInflight, WatchedProcess, MAX_NAME_PATTERNS,
};

use crate::config::WatchdogConfig;
use crate::metrics::ProgramSource;

/// The object file, built for bpfel-unknown-none by build.rs (aya-build).
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/defib-probes"));

/// (program, tracepoint category, tracepoint name) for every single-point probe.
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("qemu_exec", "sched", "sched_process_exec"),
    ("qemu_exit", "sched", "sched_process_exit"),
    ("qemu_signal_generate", "signal", "signal_generate"),
    ("qemu_oom_victim", "oom", "mark_victim"),
    ("blk_rq_issue", "block", "block_rq_issue"),
    ("blk_rq_complete", "block", "block_rq_complete"),
    ("blk_rq_requeue", "block", "block_rq_requeue"),
    ("uring_submit", "io_uring", "io_uring_submit_req"),
    ("uring_complete", "io_uring", "io_uring_complete"),
];

/// Probe counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProbeStats {
    pub ringbuf_drops: u64,
    pub inflight_full: u64,
    pub watch_full: u64,
    pub block_inflight_full: u64,
    pub uring_inflight_full: u64,
    pub rbd_inflight_full: u64,
}

pub struct Probes {
    ebpf: Ebpf,
    /// Where each program's run time is read (for the metrics), until taken.
    programs: crate::metrics::ProbePrograms,
    /// Set when the maps and links are pinned: the lock on the pin directory and what
    /// this start found there.
    pinned: Option<crate::pinning::PinSet>,
}

impl Probes {
    /// Loads and attaches everything, unpinned: the probes detach when this is dropped.
    /// Order matters: the exec probe is attached before the caller scans /proc, so a qemu
    /// started in between is seen by one or the other.
    pub fn load(cfg: &WatchdogConfig) -> anyhow::Result<Self> {
        Self::load_with(cfg, None)
    }

    /// Loads the probes with their maps and links pinned under `pin_dir` (see
    /// pinning.rs): a previous run's probes, still attached and recording, are taken
    /// over; what is missing is attached and pinned.
    pub fn load_pinned(cfg: &WatchdogConfig, pin_dir: &std::path::Path) -> anyhow::Result<Self> {
        let set = crate::pinning::PinSet::open(pin_dir, PROBES_OBJECT)?;
        Self::load_with(cfg, Some(set))
    }

    fn load_with(
        cfg: &WatchdogConfig,
        pinned: Option<crate::pinning::PinSet>,
    ) -> anyhow::Result<Self> {
        raise_memlock_limit();
        let mut loader = aya::EbpfLoader::new();
        if let Some(set) = &pinned {
            for name in crate::pinning::MAPS {
                loader.map_pin_path(name, set.map_path(name));
            }
        }
        let mut ebpf = loader
            .load(PROBES_OBJECT)
            .context("loading the eBPF object into the kernel")?;
        if pinned.is_some() {
            // A map missing from MAPS would be created fresh on every start, and the
            // probes a restart takes over would write to the old one.
            for (name, _) in ebpf.maps() {
                anyhow::ensure!(
                    crate::pinning::MAPS.contains(&name),
                    "map {name} is not in pinning::MAPS; add it there"
                );
            }
        }
        {
            let mut config: Array<_, u64> = Array::try_from(map(&mut ebpf, "CONFIG")?)?;
            config.set(
                config_index::STALL_THRESHOLD_NS,
                cfg.probes.stall_threshold_ms * 1_000_000,
                0,
            )?;
            // Where the exit status lives (see exit_status in watchdog-ebpf/src/process.rs).
            let btf = crate::btf::KernelBtf::read().context("reading the kernel's BTF")?;
            for (index, ty, field) in [
                (
                    config_index::TASK_EXIT_CODE_OFFSET,
                    "task_struct",
                    "exit_code",
                ),
                (config_index::TASK_SIGNAL_OFFSET, "task_struct", "signal"),
                (config_index::SIGNAL_FLAGS_OFFSET, "signal_struct", "flags"),
                (
                    config_index::SIGNAL_GROUP_EXIT_CODE_OFFSET,
                    "signal_struct",
                    "group_exit_code",
                ),
            ] {
                let offset = btf
                    .field_offset(ty, field)
                    .with_context(|| format!("finding {ty}.{field} for exit statuses"))?;
                config.set(index, u64::from(offset), 0)?;
            }
        }
        {
            let mut names: Array<_, NamePattern> =
                Array::try_from(map(&mut ebpf, "NAME_PATTERNS")?)?;
            for (i, p) in cfg
                .name_patterns()
                .into_iter()
                .enumerate()
                .take(MAX_NAME_PATTERNS as usize)
            {
                names.set(i as u32, p, 0)?;
            }
        }
        let mut programs = Vec::new();
        for (prog, category, name) in TRACEPOINTS {
            programs.push(attach(
                &mut ebpf,
                pinned.as_ref(),
                prog,
                &[(category, name)],
            )?);
        }
        let enters: Vec<String> = io_syscalls::TRACKED
            .iter()
            .map(|(n, _)| format!("sys_enter_{n}"))
            .collect();
        let exits: Vec<String> = io_syscalls::TRACKED
            .iter()
            .map(|(n, _)| format!("sys_exit_{n}"))
            .collect();
        let enters: Vec<(&str, &str)> = enters.iter().map(|n| ("syscalls", n.as_str())).collect();
        let exits: Vec<(&str, &str)> = exits.iter().map(|n| ("syscalls", n.as_str())).collect();
        programs.push(attach(
            &mut ebpf,
            pinned.as_ref(),
            "qemu_io_enter",
            &enters,
        )?);
        programs.push(attach(&mut ebpf, pinned.as_ref(), "qemu_io_exit", &exits)?);
        // RBD stalls are one kind of stall among others: a host where the uprobes cannot
        // be attached still watches everything else.
        match attach_librbd(&mut ebpf, pinned.as_ref(), &cfg.probes.librbd_path) {
            Ok(sources) => programs.extend(sources.into_iter().map(Some)),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "RBD stalls NOT tracked: the librbd uprobes cannot be attached (on kernels \
                 whose uprobe events need CAP_SYS_ADMIN, grant it to the unit: docs/watchdog.md, \
                 \"How the probes work\")"
            ),
        }
        if let Some(set) = &pinned {
            set.remove_other_versions();
        }
        let programs = crate::metrics::ProbePrograms(programs.into_iter().flatten().collect());
        Ok(Self {
            ebpf,
            programs,
            pinned,
        })
    }

    /// Whether this start took over probes a previous run left attached (pinned).
    pub fn took_over(&self) -> bool {
        self.pinned.as_ref().is_some_and(|p| p.took_over())
    }

    /// Takes out where the programs' run time is read (for the metrics endpoint).
    pub fn take_programs(&mut self) -> crate::metrics::ProbePrograms {
        std::mem::take(&mut self.programs)
    }

    /// Takes the ring buffer out (once); the caller polls it.
    pub fn take_ring(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let m = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| anyhow!("ring buffer EVENTS already taken or missing"))?;
        Ok(RingBuf::try_from(m)?)
    }

    /// Starts watching a process found by the /proc scan.
    pub fn watch(&mut self, tgid: u32, since_ns: u64) -> anyhow::Result<()> {
        let mut watched: HashMap<_, u32, WatchedProcess> =
            HashMap::try_from(map(&mut self.ebpf, "WATCHED")?)?;
        watched.insert(tgid, WatchedProcess { since_ns }, 0)?;
        Ok(())
    }

    /// Sees the exit of host service `tgid` (the disk-lease daemon): an exit record
    /// like a qemu's, and no I/O tracked.
    pub fn watch_service(&mut self, tgid: u32) -> anyhow::Result<()> {
        let mut services: HashMap<_, u32, u32> =
            HashMap::try_from(map(&mut self.ebpf, "SERVICES")?)?;
        services.insert(tgid, 1, 0)?;
        Ok(())
    }

    /// Whether the probes watch service `tgid` now (its exit removes it).
    pub fn watches_service(&mut self, tgid: u32) -> anyhow::Result<bool> {
        let services: HashMap<_, u32, u32> = HashMap::try_from(map(&mut self.ebpf, "SERVICES")?)?;
        Ok(services.get(&tgid, 0).is_ok())
    }

    pub fn watched_pids(&mut self) -> anyhow::Result<Vec<u32>> {
        let watched: HashMap<_, u32, WatchedProcess> =
            HashMap::try_from(map(&mut self.ebpf, "WATCHED")?)?;
        Ok(watched.keys().filter_map(Result::ok).collect())
    }

    /// Every tracked I/O call in flight right now, by tid.
    pub fn inflight(&mut self) -> anyhow::Result<Vec<(u32, InflightIo)>> {
        let inflight: HashMap<_, u32, InflightIo> =
            HashMap::try_from(map(&mut self.ebpf, "INFLIGHT")?)?;
        // An entry removed during iteration shows up as an error for that key: skip it.
        Ok(inflight.iter().filter_map(Result::ok).collect())
    }

    /// Block requests in flight on the watched devices right now.
    pub fn block_inflight(&mut self) -> anyhow::Result<Vec<(BlockKey, BlockInflight)>> {
        let m: HashMap<_, BlockKey, BlockInflight> =
            HashMap::try_from(map(&mut self.ebpf, "BLK_INFLIGHT")?)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// io_uring requests of watched processes in flight right now, by request pointer.
    pub fn uring_inflight(&mut self) -> anyhow::Result<Vec<(u64, UringInflight)>> {
        let m: HashMap<_, u64, UringInflight> =
            HashMap::try_from(map(&mut self.ebpf, "URING_INFLIGHT")?)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// librbd requests of watched processes in flight right now.
    pub fn rbd_inflight(&mut self) -> anyhow::Result<Vec<(RbdKey, RbdInflight)>> {
        let m: HashMap<_, RbdKey, RbdInflight> =
            HashMap::try_from(map(&mut self.ebpf, "RBD_INFLIGHT")?)?;
        Ok(m.iter().filter_map(Result::ok).collect())
    }

    /// Makes `devs` (kernel `dev_t`s) the set of block devices whose requests are
    /// tracked: added ones start, others stop (their requests in flight are dropped).
    pub fn set_watched_devs(
        &mut self,
        devs: &std::collections::BTreeSet<u32>,
    ) -> anyhow::Result<()> {
        let mut m: HashMap<_, u32, u32> = HashMap::try_from(map(&mut self.ebpf, "WATCHED_DEVS")?)?;
        let now: std::collections::BTreeSet<u32> = m.keys().filter_map(Result::ok).collect();
        for dev in now.difference(devs) {
            let _ = m.remove(dev);
        }
        for dev in devs.difference(&now) {
            m.insert(dev, 1, 0)
                .with_context(|| format!("watching block device {dev:#x}"))?;
        }
        let mut inflight: HashMap<_, BlockKey, BlockInflight> =
            HashMap::try_from(map(&mut self.ebpf, "BLK_INFLIGHT")?)?;
        let stale: Vec<BlockKey> = inflight
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !devs.contains(&k.dev))
            .collect();
        for k in stale {
            let _ = inflight.remove(&k);
        }
        Ok(())
    }

    pub fn stats(&mut self) -> anyhow::Result<ProbeStats> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(map(&mut self.ebpf, "STATS")?)?;
        let sum = |i: u32| -> anyhow::Result<u64> { Ok(stats.get(&i, 0)?.iter().sum()) };
        Ok(ProbeStats {
            ringbuf_drops: sum(stat_index::RINGBUF_DROPS)?,
            inflight_full: sum(stat_index::INFLIGHT_FULL)?,
            watch_full: sum(stat_index::WATCH_FULL)?,
            block_inflight_full: sum(stat_index::BLOCK_INFLIGHT_FULL)?,
            uring_inflight_full: sum(stat_index::URING_INFLIGHT_FULL)?,
            rbd_inflight_full: sum(stat_index::RBD_INFLIGHT_FULL)?,
        })
    }
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Attaches `prog` to each tracepoint. With a pin set, a tracepoint whose link is
/// already pinned (a previous run's, still attached) is left as it is, and every new
/// link is pinned; the program is loaded only if some link is missing, and then pinned
/// too. Returns where the program's run time can be read: its pin, or this run's fd;
/// None for a taken-over program a previous release did not pin.
fn attach(
    ebpf: &mut Ebpf,
    pinned: Option<&crate::pinning::PinSet>,
    prog: &str,
    points: &[(&str, &str)],
) -> anyhow::Result<Option<(String, ProgramSource)>> {
    let missing: Vec<(&str, &str)> = points
        .iter()
        .copied()
        .filter(|(category, name)| pinned.is_none_or(|set| !set.has_link(prog, category, name)))
        .collect();
    let pinned_source = |set: &crate::pinning::PinSet| {
        let path = set.program_path(prog);
        path.exists()
            .then(|| (prog.to_string(), ProgramSource::Pin(path)))
    };
    if missing.is_empty() {
        return Ok(pinned.and_then(pinned_source));
    }
    let program: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| anyhow!("program {prog} missing from the eBPF object"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("loading program {prog} (verifier)"))?;
    for (category, name) in missing {
        let id = program
            .attach(category, name)
            .with_context(|| format!("attaching {prog} to tracepoint {category}/{name}"))?;
        if let Some(set) = pinned {
            let link = program.take_link(id)?;
            let link = aya::programs::links::FdLink::try_from(link).with_context(|| {
                format!("{prog} on {category}/{name}: the kernel gave no BPF link to pin (needs Linux ≥ 5.15); set probes.pin_dir = \"\"")
            })?;
            set.pin_link(link, prog, category, name)?;
        }
    }
    match pinned {
        Some(set) => {
            // The program pin only lets a later run read this program's run time: the
            // links keep it attached. A pin left by an earlier run names the instance
            // this one replaces (some of its links were missing).
            let path = set.program_path(prog);
            let _ = std::fs::remove_file(&path);
            program
                .pin(&path)
                .with_context(|| format!("pinning the program {}", path.display()))?;
            Ok(pinned_source(set))
        }
        None => {
            let fd = program.fd()?.try_clone()?;
            Ok(Some((prog.to_string(), ProgramSource::Fd(fd))))
        }
    }
}

/// The librbd uprobes (`rbd_submit_aN` on every submitting call whose completion is
/// argument N, with the operation as its cookie; `rbd_release` on `rbd_aio_release`), on the library at `path`: every
/// process that maps it, now or later, runs them. No library there (a host without
/// Ceph) or an empty path: nothing is attached, and that is said once. Pinned like the
/// tracepoints (the link's "category" is `uprobe`, its name the symbol).
fn attach_librbd(
    ebpf: &mut Ebpf,
    pinned: Option<&crate::pinning::PinSet>,
    path: &str,
) -> anyhow::Result<Vec<(String, ProgramSource)>> {
    if path.is_empty() {
        tracing::info!("RBD stalls not tracked (probes.librbd_path is empty)");
        return Ok(Vec::new());
    }
    if !std::path::Path::new(path).exists() {
        tracing::info!(
            path,
            "RBD stalls not tracked: no librbd at probes.librbd_path"
        );
        return Ok(Vec::new());
    }
    // The program that reads the completion from the call's argument `arg`.
    let submits = |arg: usize| -> Vec<(&'static str, u64)> {
        rbd_ops::TRACKED
            .iter()
            .filter(|t| t.3 == arg)
            .map(|(symbol, op, _, _)| (*symbol, u64::from(*op)))
            .collect()
    };
    let mut sources = Vec::new();
    for (prog, calls) in [
        ("rbd_submit_a1", submits(1)),
        ("rbd_submit_a3", submits(3)),
        ("rbd_submit_a4", submits(4)),
        ("rbd_release", vec![(rbd_ops::RELEASE, 0)]),
    ] {
        let missing: Vec<(&str, u64)> = calls
            .iter()
            .copied()
            .filter(|(symbol, _)| pinned.is_none_or(|set| !set.has_link(prog, "uprobe", symbol)))
            .collect();
        if !missing.is_empty() {
            let program: &mut UProbe = ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("program {prog} missing from the eBPF object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading program {prog} (verifier)"))?;
            for (symbol, cookie) in missing {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::Symbol(symbol),
                    cookie: Some(cookie),
                };
                let id = program
                    .attach(point, path, UProbeScope::AllProcesses)
                    .with_context(|| format!("attaching {prog} to {symbol} in {path}"))?;
                if let Some(set) = pinned {
                    let link = aya::programs::links::FdLink::try_from(program.take_link(id)?)
                        .with_context(|| format!("{prog} on {symbol}: no BPF link to pin"))?;
                    set.pin_link(link, prog, "uprobe", symbol)?;
                }
            }
            match pinned {
                Some(set) => {
                    let pin = set.program_path(prog);
                    let _ = std::fs::remove_file(&pin);
                    program
                        .pin(&pin)
                        .with_context(|| format!("pinning the program {}", pin.display()))?;
                }
                None => sources.push((
                    prog.to_string(),
                    ProgramSource::Fd(program.fd()?.try_clone()?),
                )),
            }
        }
        if let Some(set) = pinned {
            let pin = set.program_path(prog);
            if pin.exists() {
                sources.push((prog.to_string(), ProgramSource::Pin(pin)));
            }
        }
    }
    tracing::info!(path, "RBD stalls tracked (librbd uprobes)");
    Ok(sources)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memcg and ignore it.
fn raise_memlock_limit() {
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels ≥ 5.11");
    }
}
