//! Maps shared by the probes and read or written by the daemon (names are its API).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use watchdog_common::{
    config_index, stat_index, BlockInflight, BlockKey, InflightIo, KillerInfo, NamePattern,
    RbdInflight, RbdKey, UringInflight, WatchedProcess, MAX_NAME_PATTERNS,
};

/// Records to the daemon (exec, exit, slow I/O end).
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Processes we watch, by tgid. Filled by the daemon's /proc scan and by `process::exec`.
#[map(name = "WATCHED")]
pub static WATCHED: HashMap<u32, WatchedProcess> = HashMap::with_max_entries(8192, 0);

/// Name patterns (`qemu-system-*`, ...) checked at exec.
#[map(name = "NAME_PATTERNS")]
pub static NAME_PATTERNS: Array<NamePattern> = Array::with_max_entries(MAX_NAME_PATTERNS, 0);

/// u64 settings written by the daemon before it attaches the probes.
#[map(name = "CONFIG")]
pub static CONFIG: Array<u64> = Array::with_max_entries(config_index::LEN, 0);

/// Counters the daemon sums over CPUs and reports.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat_index::LEN, 0);

/// I/O syscalls in flight, by tid.
#[map(name = "INFLIGHT")]
pub static INFLIGHT: HashMap<u32, InflightIo> = HashMap::with_max_entries(16384, 0);

/// Block devices whose requests are tracked (the VMs' `type='block'` disks), by the
/// kernel's `dev_t`; written by the daemon from the libvirt inventory.
#[map(name = "WATCHED_DEVS")]
pub static WATCHED_DEVS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Block requests in flight on watched devices.
#[map(name = "BLK_INFLIGHT")]
pub static BLK_INFLIGHT: HashMap<BlockKey, BlockInflight> = HashMap::with_max_entries(16384, 0);

/// io_uring I/O requests of watched processes in flight, by request pointer.
#[map(name = "URING_INFLIGHT")]
pub static URING_INFLIGHT: HashMap<u64, UringInflight> = HashMap::with_max_entries(16384, 0);

/// librbd requests of watched processes in flight, by process and completion.
#[map(name = "RBD_INFLIGHT")]
pub static RBD_INFLIGHT: HashMap<RbdKey, RbdInflight> = HashMap::with_max_entries(16384, 0);

/// Host services whose exit the daemon must see (the disk-lease daemon, virtlockd), by
/// tgid. Kept apart from `WATCHED`: their I/O is nobody's VM's, so none is tracked.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// Last terminating signal sent to a watched process or service, by target tgid.
#[map(name = "KILLERS")]
pub static KILLERS: LruHashMap<u32, KillerInfo> = LruHashMap::with_max_entries(8192, 0);

/// OOM victims, by tgid.
#[map(name = "OOM_VICTIMS")]
pub static OOM_VICTIMS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(1024, 0);

#[inline(always)]
pub fn is_watched(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence, never read through the reference.
    unsafe { WATCHED.get(tgid).is_some() }
}

#[inline(always)]
pub fn is_service(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence, never read through the reference.
    unsafe { SERVICES.get(tgid).is_some() }
}

#[inline(always)]
pub fn count(stat: u32) {
    if let Some(p) = STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn config(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// Sends a record to the daemon; a full ring buffer is counted, never silent.
#[inline(always)]
pub fn send<T: 'static>(record: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(0);
        }
        None => count(stat_index::RINGBUF_DROPS),
    }
}

/// An operation begun at `start_ns` and over at `now_ns` lasted the stall threshold:
/// its end gets a slow-end record.
#[inline(always)]
pub fn was_slow(start_ns: u64, now_ns: u64) -> bool {
    let threshold = config(config_index::STALL_THRESHOLD_NS);
    threshold > 0 && now_ns.saturating_sub(start_ns) >= threshold
}

/// Splits `bpf_get_current_pid_tgid()` into (tgid, tid).
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let v = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    ((v >> 32) as u32, v as u32)
}
