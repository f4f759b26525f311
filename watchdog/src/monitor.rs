//! The host monitor: consumes probe records, keeps the pid → VM map and the stall
//! tracker, and hands typed events to a sink. Runs on the tokio runtime of the daemon.
//! Events from outside the probes (the libvirt watcher) come in on an optional
//! channel and go to the same sink; the libvirt inventory also completes the pid → VM
//! map and says which qemus are this host's (see `reporting`).
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use watchdog_common::{io_syscalls, rbd_ops, uring_ops};

use crate::clock::{mono_to_unix_ms, monotonic_ns};
use crate::config::WatchdogConfig;
use crate::events::{signal_name, Killer, LibvirtVm, StuckIo, WatchdogEvent};
use crate::leases::{self, LeaseWatch, LeasedVm};
use crate::libvirt::inventory;
use crate::probes::{ProbeStats, Probes};
use crate::procfs::{self, VmIdentity};
use crate::records::{self, comm_str, Record};
use crate::reporting::Reporting;
use crate::stall::{InflightOp, Op, StallChange, StallTracker, StuckOp};

/// How long the previous run's pid → VM map is kept after the start: every exit record
/// written before the start's /proc scan has been read long before.
const FORGET_REMEMBERED_AFTER: Duration = Duration::from_secs(10);

/// How often the VMs' block devices are looked up again (their qemus' open files).
const BLOCK_DEVS_REFRESH: Duration = Duration::from_secs(1);

/// Where events go: stdout for `events`, the controller stream later.
pub trait EventSink {
    fn emit(&mut self, event: WatchdogEvent);
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct WatchedVm {
    comm: String,
    vm: VmIdentity,
}

pub struct Monitor {
    probes: Probes,
    proc_root: PathBuf,
    cfg: WatchdogConfig,
    vms: HashMap<u32, WatchedVm>,
    stalls: StallTracker,
    last_stats: ProbeStats,
    /// Events from outside the probes (the libvirt watcher).
    external: Option<mpsc::UnboundedReceiver<WatchdogEvent>>,
    /// qemu pid → VM, from the last libvirt inventory.
    libvirt_pids: HashMap<u32, VmIdentity>,
    /// Which qemus' events go to the sink (`libvirt.only_own_domains`).
    reporting: Reporting,
    /// Where the pid → VM map is kept for the next run (see `with_vm_cache`).
    vm_cache: Option<PathBuf>,
    /// The previous run's pid → VM map: names the VMs of qemus that exited while no
    /// daemon was reading (their exit records wait in the pinned ring buffer).
    remembered: HashMap<u32, WatchedVm>,
    /// The pid → VM map changed since the cache was last written.
    vm_cache_dirty: bool,
    /// The VMs' block devices whose requests the probes track: kernel `dev_t` → the
    /// qemu that has it open and the path it opened (from the libvirt inventory's disks
    /// and the qemus' open files).
    block_devs: HashMap<u32, (u32, String)>,
    /// The active domains' disk sources (qemu pid, path), from the last libvirt inventory.
    disk_sources: Vec<(u32, String)>,
    /// The disk-lease watch (`[disk_leases]`), if on.
    leases: Option<LeaseWatch>,
    /// The running domains' leased disks, from the last libvirt inventory.
    leased: Vec<LeasedVm>,
    /// When an operation seen in flight at the last scan crosses the stall threshold,
    /// if before the next regular scan (host monotonic ns).
    stall_due: Option<u64>,
}

impl Monitor {
    pub fn new(probes: Probes, cfg: WatchdogConfig) -> Self {
        let threshold = cfg.probes.stall_threshold_ms * 1_000_000;
        let cfg_leases = cfg
            .disk_leases
            .enabled
            .then(|| LeaseWatch::new(cfg.disk_leases.clone()));
        Self {
            probes,
            proc_root: PathBuf::from("/proc"),
            reporting: Reporting::new(cfg.libvirt.only_own_domains),
            cfg,
            vms: HashMap::new(),
            stalls: StallTracker::new(threshold),
            last_stats: ProbeStats::default(),
            external: None,
            libvirt_pids: HashMap::new(),
            vm_cache: None,
            remembered: HashMap::new(),
            vm_cache_dirty: false,
            block_devs: HashMap::new(),
            disk_sources: Vec::new(),
            leases: cfg_leases,
            leased: Vec::new(),
            stall_due: None,
        }
    }

    /// Also forwards the events arriving on `rx` (the libvirt watcher's) to the sink;
    /// a libvirt inventory among them also updates the pid → VM map.
    pub fn with_external_events(mut self, rx: mpsc::UnboundedReceiver<WatchdogEvent>) -> Self {
        self.external = Some(rx);
        self
    }

    /// Keeps the pid → VM map in `path` (rewritten when it changes) and reads the one a
    /// previous run left there. With pinned probes, a qemu that exits while the daemon
    /// restarts has its exit record read by the next run, which then names its VM from
    /// this file.
    pub fn with_vm_cache(mut self, path: PathBuf) -> Self {
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<HashMap<u32, WatchedVm>>(&bytes) {
                Ok(map) => self.remembered = map,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable VM cache ignored")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the VM cache")
            }
        }
        self.vm_cache = Some(path);
        self
    }

    /// Writes the cache if the map changed: once per turn of the main loop, however many
    /// qemus a ring-buffer batch or a /proc scan added.
    fn save_vm_cache(&mut self) {
        if !std::mem::take(&mut self.vm_cache_dirty) {
            return;
        }
        let Some(path) = &self.vm_cache else { return };
        let mut all = self.remembered.clone();
        all.extend(self.vms.iter().map(|(k, v)| (*k, v.clone())));
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec(&all)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the VM cache");
        }
    }

    /// Watches every matching process already running. Called after the probes are
    /// attached (see `Probes::load`), and again every `proc_rescan_interval_ms`.
    pub fn scan_proc(&mut self, sink: &mut dyn EventSink) {
        let patterns = self.cfg.name_patterns();
        for (pid, comm) in procfs::scan_matching(&self.proc_root, &patterns) {
            if self.vms.contains_key(&pid) {
                continue;
            }
            let now = monotonic_ns();
            if let Err(e) = self.probes.watch(pid, now) {
                tracing::warn!(pid, error = %e, "cannot watch process");
                continue;
            }
            self.started(pid, comm_str(&comm), "scan", None, sink);
        }
    }

    fn started(
        &mut self,
        pid: u32,
        comm: String,
        source: &'static str,
        kernel_ns: Option<u64>,
        sink: &mut dyn EventSink,
    ) {
        let vm = procfs::read_args(&self.proc_root, pid)
            .map(|a| procfs::vm_identity_from_args(&a))
            .filter(VmIdentity::is_known)
            .or_else(|| self.libvirt_pids.get(&pid).cloned())
            // A qemu found by the start's scan while it was exiting has no command line
            // left to read; the previous run knew it.
            .or_else(|| {
                self.remembered
                    .get(&pid)
                    .filter(|w| w.comm == comm)
                    .map(|w| w.vm.clone())
            })
            .unwrap_or_default();
        self.vms.insert(
            pid,
            WatchedVm {
                comm: comm.clone(),
                vm: vm.clone(),
            },
        );
        self.vm_cache_dirty = true;
        let observed_ns = monotonic_ns();
        let event = WatchdogEvent::QemuStarted {
            pid,
            comm,
            vm: vm.clone(),
            source,
            kernel_ns,
            observed_ns,
            unix_ms: mono_to_unix_ms(kernel_ns.unwrap_or(observed_ns)),
        };
        self.reporting.event(pid, &vm, event, sink);
    }

    fn handle(&mut self, bytes: &[u8], sink: &mut dyn EventSink) {
        let record = match records::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable probe record dropped");
                return;
            }
        };
        match record {
            Record::Exec(r) => {
                if !self.vms.contains_key(&r.tgid) {
                    self.started(r.tgid, comm_str(&r.comm), "exec", Some(r.ts_ns), sink);
                }
            }
            Record::Exit(r) if self.leases.as_ref().is_some_and(|l| l.is_daemon(r.tgid)) => {
                let (exit_code, signal, _) = decode_wait_status(r.status_known, r.status);
                let mut how = match (exit_code, signal.and_then(signal_name)) {
                    (_, Some(s)) => format!("killed by {s}"),
                    (Some(c), None) => format!("exited with code {c}"),
                    (None, None) => "exited".into(),
                };
                if r.killer_tgid != 0 {
                    how.push_str(&format!(
                        " from pid {} ({})",
                        r.killer_tgid,
                        comm_str(&r.killer_comm)
                    ));
                }
                let leased = &self.leased;
                if let Some(event) = self
                    .leases
                    .as_mut()
                    .and_then(|l| l.daemon_exited(how, leased))
                {
                    sink.emit(event);
                }
            }
            Record::Exit(r) => {
                let observed_ns = monotonic_ns();
                let comm_now = comm_str(&r.comm);
                // Its stall ends first, while the map still names its VM.
                for c in self.stalls.on_exit(r.tgid, r.ts_ns) {
                    self.emit_stall(c, sink);
                }
                let known = match self.vms.remove(&r.tgid) {
                    Some(k) => {
                        self.vm_cache_dirty = true;
                        Some(k)
                    }
                    // Exited while no daemon was reading: the previous run knew it.
                    None => self
                        .remembered
                        .remove(&r.tgid)
                        .filter(|k| k.comm == comm_now),
                };
                let (exit_code, signal, core_dumped) = decode_wait_status(r.status_known, r.status);
                let killer = (r.killer_tgid != 0).then(|| Killer {
                    pid: r.killer_tgid,
                    comm: comm_str(&r.killer_comm),
                    process: procfs::read_comm(&self.proc_root, r.killer_tgid)
                        .map(|c| comm_str(&c)),
                    signal: r.killer_signal as i32,
                    kernel_ns: r.killer_ts_ns,
                });
                let (comm, vm) = match known {
                    Some(k) => (k.comm, k.vm),
                    None => (comm_now, VmIdentity::default()),
                };
                let event = WatchdogEvent::QemuExited {
                    pid: r.tgid,
                    comm,
                    vm: vm.clone(),
                    exit_code,
                    signal,
                    signal_name: signal.and_then(signal_name),
                    core_dumped,
                    oom_killed: r.oom_killed != 0,
                    killer,
                    kernel_ns: r.ts_ns,
                    observed_ns,
                    unix_ms: mono_to_unix_ms(r.ts_ns),
                };
                self.reporting.event(r.tgid, &vm, event, sink);
            }
            Record::IoSlowEnd(r) => {
                let op = Op::Syscall {
                    tid: r.tid,
                    nr: r.syscall_nr,
                    fd: r.fd,
                };
                self.stall_op_ended(r.tgid, op, r.start_ns, r.end_ns, sink);
            }
            Record::BlockSlowEnd(r) => {
                let Some(&(tgid, _)) = self.block_devs.get(&r.dev) else {
                    return;
                };
                let op = Op::Block {
                    dev: r.dev,
                    sector: r.sector,
                    write: r.write != 0,
                };
                self.stall_op_ended(tgid, op, r.start_ns, r.end_ns, sink);
            }
            Record::UringSlowEnd(r) => {
                let op = Op::Uring {
                    req: r.req,
                    opcode: r.opcode,
                };
                self.stall_op_ended(r.tgid, op, r.start_ns, r.end_ns, sink);
            }
            Record::RbdSlowEnd(r) => {
                let op = Op::Rbd {
                    completion: r.completion,
                    op: r.op,
                };
                self.stall_op_ended(r.tgid, op, r.start_ns, r.end_ns, sink);
            }
        }
    }

    /// A slow-end record: an operation of `tgid` begun at `start_ns` ended at `end_ns`,
    /// after the threshold.
    fn stall_op_ended(
        &mut self,
        tgid: u32,
        op: Op,
        start_ns: u64,
        end_ns: u64,
        sink: &mut dyn EventSink,
    ) {
        let stuck = StuckOp { op, start_ns };
        for c in self.stalls.on_slow_end(tgid, stuck, end_ns) {
            self.emit_stall(c, sink);
        }
    }

    fn emit_stall(&mut self, change: StallChange, sink: &mut dyn EventSink) {
        let observed_ns = monotonic_ns();
        let vm_of = |pid| self.vms.get(&pid).map(|v| v.vm.clone()).unwrap_or_default();
        let tgid = match &change {
            StallChange::Started { tgid, .. } | StallChange::Ended { tgid, .. } => *tgid,
        };
        let vm = vm_of(tgid);
        let event = match change {
            StallChange::Started {
                tgid,
                since_ns,
                ops,
            } => WatchdogEvent::DiskStallStarted {
                pid: tgid,
                vm: vm_of(tgid),
                since_ns,
                threshold_ms: self.cfg.probes.stall_threshold_ms,
                stuck_ops: ops.into_iter().map(|o| self.stuck_io(tgid, o)).collect(),
                observed_ns,
                unix_ms: mono_to_unix_ms(observed_ns),
            },
            StallChange::Ended {
                tgid,
                since_ns,
                end_ns,
            } => WatchdogEvent::DiskStallEnded {
                pid: tgid,
                vm: vm_of(tgid),
                since_ns,
                end_ns,
                duration_ms: end_ns.saturating_sub(since_ns) / 1_000_000,
                observed_ns,
                unix_ms: mono_to_unix_ms(end_ns),
            },
        };
        self.reporting.event(tgid, &vm, event, sink);
    }

    /// A stuck operation as the event reports it.
    fn stuck_io(&self, tgid: u32, o: StuckOp) -> StuckIo {
        let (layer, op, tid, fd, path) = match o.op {
            Op::Syscall { tid, nr, fd } => (
                "syscall",
                io_syscalls::name(nr),
                tid,
                fd,
                procfs::fd_target(&self.proc_root, tgid, fd),
            ),
            Op::Block { dev, write, .. } => (
                "block",
                if write { "write" } else { "read" },
                0,
                -1,
                self.block_devs.get(&dev).map(|(_, p)| p.clone()),
            ),
            Op::Uring { opcode, .. } => ("io_uring", uring_ops::name(opcode), 0, -1, None),
            // librbd does not say which image a completion belongs to: name the VM's RBD
            // disk when libvirt lists exactly one.
            Op::Rbd { op, .. } => ("rbd", rbd_ops::name(op), 0, -1, self.only_rbd_disk(tgid)),
        };
        StuckIo {
            tid,
            layer,
            syscall: op,
            fd,
            path,
            start_ns: o.start_ns,
        }
    }

    /// The one RBD disk (`rbd:pool/image`) libvirt lists for the qemu `tgid`, if it
    /// lists exactly one.
    fn only_rbd_disk(&self, tgid: u32) -> Option<String> {
        let mut rbd = self
            .disk_sources
            .iter()
            .filter(|(pid, source)| *pid == tgid && source.starts_with("rbd:"));
        match (rbd.next(), rbd.next()) {
            (Some((_, source)), None) => Some(source.clone()),
            _ => None,
        }
    }

    fn scan_stalls(&mut self, sink: &mut dyn EventSink) {
        let mut ops: Vec<InflightOp> = Vec::new();
        let op = |tgid, op, start_ns| InflightOp {
            tgid,
            stuck: StuckOp { op, start_ns },
        };
        match self.probes.inflight() {
            Ok(inflight) => ops.extend(inflight.into_iter().map(|(tid, io)| {
                let nr = io.syscall_nr;
                op(io.tgid, Op::Syscall { tid, nr, fd: io.fd }, io.start_ns)
            })),
            Err(e) => tracing::warn!(error = %e, "cannot read the in-flight I/O map"),
        }
        if !self.block_devs.is_empty() {
            match self.probes.block_inflight() {
                // A device no VM has open any more is not charged to anyone.
                Ok(inflight) => ops.extend(inflight.into_iter().filter_map(|(key, rq)| {
                    let &(tgid, _) = self.block_devs.get(&key.dev)?;
                    let (dev, sector, write) = (key.dev, key.sector, rq.write != 0);
                    Some(op(tgid, Op::Block { dev, sector, write }, rq.start_ns))
                })),
                Err(e) => tracing::warn!(error = %e, "cannot read the block-request map"),
            }
        }
        match self.probes.uring_inflight() {
            Ok(inflight) => ops.extend(inflight.into_iter().map(|(req, io)| {
                let opcode = io.opcode;
                op(io.tgid, Op::Uring { req, opcode }, io.start_ns)
            })),
            Err(e) => tracing::warn!(error = %e, "cannot read the io_uring request map"),
        }
        match self.probes.rbd_inflight() {
            Ok(inflight) => ops.extend(inflight.into_iter().map(|(key, io)| {
                let (completion, rbd_op) = (key.completion, io.op);
                op(
                    key.tgid,
                    Op::Rbd {
                        completion,
                        op: rbd_op,
                    },
                    io.start_ns,
                )
            })),
            Err(e) => tracing::warn!(error = %e, "cannot read the librbd request map"),
        }
        let now = monotonic_ns();
        for c in self.stalls.on_scan(now, &ops) {
            self.emit_stall(c, sink);
        }
        // An operation that crosses the threshold before the next scan gets a scan of its
        // own, due then (a stall is reported within a timer's precision, not up to a
        // scan interval late); only one still in flight this close to it does.
        let interval_ns = self.cfg.probes.stall_scan_interval_ms * 1_000_000;
        self.stall_due = self
            .stalls
            .next_crossing(now, &ops)
            .filter(|&due| due < now.saturating_add(interval_ns));
    }

    /// Which block devices the VMs use: their libvirt disks that are block devices, and
    /// the block devices their qemus have open. The probes track requests on these only.
    /// Run at every libvirt inventory and every second (a qemu opens its disks after
    /// its exec, and for a qemu libvirt does not list its open files are all there is).
    fn refresh_block_devs(&mut self) {
        let mut devs: HashMap<u32, (u32, String)> = HashMap::new();
        for (pid, source) in &self.disk_sources {
            if let Some(dev) = procfs::block_dev_of(std::path::Path::new(source)) {
                devs.insert(dev, (*pid, source.clone()));
            }
        }
        // A qemu libvirt lists has its disks named above; only the others' open files
        // are read (every second for each of 50 qemus, they cost the daemon about half
        // its CPU: bench watchdog-cost).
        let listed: std::collections::HashSet<u32> =
            self.disk_sources.iter().map(|(pid, _)| *pid).collect();
        for pid in self.vms.keys().filter(|pid| !listed.contains(pid)) {
            for (dev, path) in procfs::open_block_devices(&self.proc_root, *pid) {
                devs.entry(dev).or_insert((*pid, path));
            }
        }
        if devs == self.block_devs {
            return;
        }
        let set: std::collections::BTreeSet<u32> = devs.keys().copied().collect();
        match self.probes.set_watched_devs(&set) {
            Ok(()) => {
                tracing::info!(devices = ?devs.values().map(|(p, d)| format!("{d} (qemu {p})")).collect::<Vec<_>>(),
                    "tracking block requests on the VMs' block devices");
                self.block_devs = devs;
            }
            Err(e) => tracing::warn!(error = %e, "cannot update the watched block devices"),
        }
    }

    fn external(&mut self, event: WatchdogEvent, sink: &mut dyn EventSink) {
        let inventory = matches!(event, WatchdogEvent::LibvirtInventory { .. });
        if let WatchdogEvent::LibvirtInventory { vms, .. } = &event {
            self.reconcile_with_libvirt(vms, sink);
        }
        sink.emit(event);
        if inventory {
            if let Some(word) = self.leases.as_mut().and_then(LeaseWatch::repeat) {
                sink.emit(word);
            }
        }
    }

    /// Takes libvirt's list of domains into the pid → VM map: a watched qemu whose
    /// command line did not name its VM gets it from libvirt, and the qemu of a
    /// running domain the probes do not watch (its name matched no pattern, or it was
    /// missed) is watched from now on.
    fn reconcile_with_libvirt(&mut self, vms: &[LibvirtVm], sink: &mut dyn EventSink) {
        self.libvirt_pids = inventory::pid_map(vms);
        self.leased = leases::leased_vms(vms);
        self.disk_sources = vms
            .iter()
            .filter(|vm| vm.is_active())
            .filter_map(|vm| vm.pid.map(|pid| (pid, vm)))
            .flat_map(|(pid, vm)| {
                vm.disks
                    .iter()
                    .filter_map(move |d| d.source.clone().map(|s| (pid, s)))
            })
            .collect();
        self.refresh_block_devs();
        let watched: HashMap<u32, VmIdentity> = self
            .vms
            .iter()
            .map(|(pid, w)| (*pid, w.vm.clone()))
            .collect();
        let r = inventory::reconcile(&watched, &self.libvirt_pids);
        for (pid, vm) in r.identify {
            if let Some(w) = self.vms.get_mut(&pid) {
                tracing::info!(pid, ?vm, "libvirt names the VM of a watched qemu");
                w.vm = vm;
                self.vm_cache_dirty = true;
            }
        }
        // Which qemus are this host's: decided on the names just updated.
        let known = &self.vms;
        self.reporting
            .domains(vms, |pid| known.get(&pid).map(|w| w.vm.clone()), sink);
        for (pid, vm) in r.unwatched {
            // The pid file may be stale, or the pid reused: the process must exist and
            // must not be running another VM.
            let Some(comm) = procfs::read_comm(&self.proc_root, pid) else {
                continue;
            };
            if procfs::is_zombie(&self.proc_root, pid) {
                continue;
            }
            let own = procfs::read_args(&self.proc_root, pid)
                .map(|a| procfs::vm_identity_from_args(&a))
                .unwrap_or_default();
            if own.uuid.is_some() && own.uuid != vm.uuid {
                continue;
            }
            if let Err(e) = self.probes.watch(pid, monotonic_ns()) {
                tracing::warn!(pid, error = %e, "cannot watch a qemu libvirt runs");
                continue;
            }
            // Exited before it was watched: its exit record never comes, so it is not
            // counted as alive.
            if procfs::read_comm(&self.proc_root, pid).is_none()
                || procfs::is_zombie(&self.proc_root, pid)
            {
                continue;
            }
            tracing::warn!(pid, ?vm, comm = %comm_str(&comm),
                "libvirt runs a qemu the probes did not watch (check probes.watch_names); watching it now");
            self.started(pid, comm_str(&comm), "libvirt", None, sink);
        }
    }

    /// Reads the lease daemon's pid file and the leases (`[disk_leases]`).
    fn check_leases(&mut self, sink: &mut dyn EventSink) {
        let Some(watch) = self.leases.as_mut() else {
            return;
        };
        let probes = &mut self.probes;
        let mut see_exit = |pid| match probes.watch_service(pid) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot watch the disk-lease daemon");
                false
            }
        };
        if let Some(event) = watch.check(&self.leased, &mut see_exit) {
            sink.emit(event);
        }
    }

    fn check_stats(&mut self, sink: &mut dyn EventSink) {
        if let Ok(stats) = self.probes.stats() {
            if stats != self.last_stats {
                self.last_stats = stats;
                tracing::warn!(?stats, "probe records lost or maps full");
                sink.emit(WatchdogEvent::ProbeLoss {
                    stats,
                    observed_ns: monotonic_ns(),
                });
            }
        }
    }

    /// Handles every record waiting in the ring buffer.
    fn drain(&mut self, rb: &mut aya::maps::RingBuf<aya::maps::MapData>, sink: &mut dyn EventSink) {
        let mut pending = Vec::new();
        while let Some(item) = rb.next() {
            pending.push(item.to_vec());
        }
        for bytes in pending {
            self.handle(&bytes, sink);
        }
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        mut self,
        sink: &mut dyn EventSink,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let ring = self.probes.take_ring()?;
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays
        // open for as long as it is registered (the I/O-safety condition of `register`).
        let mut ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        // What the pinned probes recorded while no daemon was reading comes first (an
        // exit recorded then belongs to the pid's old process, not to one the /proc
        // scan might find under a reused pid); the previous run's map names the VMs.
        let rb = ring.get_mut();
        let mut pending = Vec::new();
        while let Some(item) = rb.next() {
            pending.push(item.to_vec());
        }
        if !pending.is_empty() {
            tracing::info!(
                records = pending.len(),
                "probe records waiting in the ring buffer at start"
            );
        }
        for bytes in pending {
            self.handle(&bytes, sink);
        }
        self.scan_proc(sink);
        // A qemu that died between the drain and the scan was not found by the scan; its
        // exit record comes in the loop below, still named by the previous run's map.
        // What is left of that map after a while belongs to records that never came.
        self.remembered.retain(|pid, _| !self.vms.contains_key(pid));
        let forget_remembered = tokio::time::sleep(FORGET_REMEMBERED_AFTER);
        tokio::pin!(forget_remembered);
        self.vm_cache_dirty = true;
        self.save_vm_cache();
        let mut stall_tick = tokio::time::interval(Duration::from_millis(
            self.cfg.probes.stall_scan_interval_ms,
        ));
        let mut rescan_tick = tokio::time::interval(Duration::from_millis(
            self.cfg.probes.proc_rescan_interval_ms,
        ));
        let mut block_devs_tick = tokio::time::interval(BLOCK_DEVS_REFRESH);
        let mut leases_tick = tokio::time::interval(Duration::from_millis(
            self.cfg.disk_leases.check_interval_ms,
        ));
        leases_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        block_devs_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        stall_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The scan due when an operation crosses the threshold (see `scan_stalls`).
        let crossing = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(crossing);
        let mut external = self.external.take();
        let mut sd_watchdog = crate::systemd::WatchdogPinger::from_env();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let rb = guard.get_inner_mut();
                    while let Some(item) = rb.next() {
                        let bytes: Vec<u8> = item.to_vec();
                        drop(item);
                        self.handle(&bytes, sink);
                    }
                    guard.clear_ready();
                }
                _ = stall_tick.tick() => {
                    // Drain first: a call that just ended has its record in the ring
                    // before its entry leaves the in-flight map (see stall.rs).
                    self.drain(ring.get_mut(), sink);
                    self.scan_stalls(sink);
                    self.check_stats(sink);
                    arm_crossing(self.stall_due, crossing.as_mut());
                }
                _ = &mut crossing, if self.stall_due.is_some() => {
                    self.drain(ring.get_mut(), sink);
                    self.scan_stalls(sink);
                    arm_crossing(self.stall_due, crossing.as_mut());
                }
                _ = rescan_tick.tick() => self.scan_proc(sink),
                _ = block_devs_tick.tick() => self.refresh_block_devs(),
                _ = leases_tick.tick(), if self.leases.is_some() => self.check_leases(sink),
                // From this loop, so a loop that hangs stops the pings.
                _ = sd_watchdog.due() => sd_watchdog.ping(),
                event = next_external(&mut external) => match event {
                    Some(event) => self.external(event, sink),
                    None => external = None,
                },
                _ = &mut forget_remembered, if !self.remembered.is_empty() => {
                    self.remembered.clear();
                    self.vm_cache_dirty = true;
                }
                _ = &mut shutdown => break,
            }
            self.save_vm_cache();
        }
        Ok(())
    }
}

/// Sets the crossing timer to the host monotonic time `due` (1 ms past it, so that the
/// operation is past the threshold when scanned).
fn arm_crossing(due: Option<u64>, timer: std::pin::Pin<&mut tokio::time::Sleep>) {
    if let Some(due) = due {
        let wait =
            Duration::from_nanos(due.saturating_sub(monotonic_ns())) + Duration::from_millis(1);
        timer.reset(tokio::time::Instant::now() + wait);
    }
}

/// The next external event; never resolves without a channel.
async fn next_external(
    rx: &mut Option<mpsc::UnboundedReceiver<WatchdogEvent>>,
) -> Option<WatchdogEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Prints events to stdout, JSON lines or human lines, flushed one by one.
pub struct StdoutSink {
    pub json: bool,
}

impl EventSink for StdoutSink {
    fn emit(&mut self, event: WatchdogEvent) {
        use std::io::Write as _;
        let line = if self.json {
            serde_json::to_string(&event)
                .unwrap_or_else(|e| format!("{{\"type\":\"error\",\"error\":\"{e}\"}}"))
        } else {
            event.human()
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout (the reader went away) is not worth crashing the monitor for.
        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    }
}

/// (exit code, signal, core dumped) from a wait status, as WIFEXITED/WTERMSIG would read it.
pub fn decode_wait_status(known: u32, status: i32) -> (Option<i32>, Option<i32>, bool) {
    if known == 0 {
        return (None, None, false);
    }
    let sig = status & 0x7f;
    if sig == 0 {
        (Some((status >> 8) & 0xff), None, false)
    } else {
        (None, Some(sig), status & 0x80 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::decode_wait_status;

    #[test]
    fn wait_statuses_decode_like_waitpid() {
        assert_eq!(decode_wait_status(1, 7 << 8), (Some(7), None, false));
        assert_eq!(decode_wait_status(1, 9), (None, Some(9), false));
        assert_eq!(decode_wait_status(1, 0x80 | 11), (None, Some(11), true));
        assert_eq!(decode_wait_status(0, 9), (None, None, false));
    }
}
