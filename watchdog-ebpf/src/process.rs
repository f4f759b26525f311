//! Process lifecycle: start watching qemu at exec, report its death when its last thread
//! exits, and the death of a watched host service (see `SERVICES`) the same way.
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use watchdog_common::{
    config_index, stat_index, ExecRecord, ExitRecord, RecordKind, WatchedProcess, COMM_LEN,
    MAX_NAME_PATTERNS, SIGNAL_GROUP_EXIT,
};

use crate::maps::{
    config, count, current_ids, is_service, is_watched, EVENTS, INFLIGHT, KILLERS, NAME_PATTERNS,
    OOM_VICTIMS, SERVICES, WATCHED,
};

// sched/sched_process_exit: comm[16] @8, pid @24, prio @28, group_dead @32 (kernel ≥ 6.16).
const EXIT_GROUP_DEAD: usize = 32;

#[tracepoint]
pub fn qemu_exec(ctx: TracePointContext) -> u32 {
    try_qemu_exec(&ctx).unwrap_or(0)
}

fn try_qemu_exec(_ctx: &TracePointContext) -> Result<u32, i64> {
    let (tgid, _) = current_ids();
    let comm = bpf_get_current_comm()?;
    if !matches_a_pattern(&comm) {
        // A watched process that exec'd something else is no longer qemu.
        if is_watched(tgid) {
            let _ = WATCHED.remove(tgid);
        }
        return Ok(0);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if WATCHED
        .insert(tgid, WatchedProcess { since_ns: now }, 0)
        .is_err()
    {
        count(stat_index::WATCH_FULL);
    }
    match EVENTS.reserve::<ExecRecord>(0) {
        Some(mut entry) => {
            entry.write(ExecRecord {
                kind: RecordKind::Exec as u32,
                tgid,
                ts_ns: now,
                comm,
            });
            entry.submit(0);
        }
        None => count(stat_index::RINGBUF_DROPS),
    }
    Ok(0)
}

fn matches_a_pattern(comm: &[u8; COMM_LEN]) -> bool {
    for i in 0..MAX_NAME_PATTERNS {
        let Some(p) = NAME_PATTERNS.get(i) else {
            return false;
        };
        if p.len == 0 {
            return false;
        }
        if p.matches(comm) {
            return true;
        }
    }
    false
}

#[tracepoint]
pub fn qemu_exit(ctx: TracePointContext) -> u32 {
    try_qemu_exit(&ctx).unwrap_or(0)
}

fn try_qemu_exit(ctx: &TracePointContext) -> Result<u32, i64> {
    let (tgid, tid) = current_ids();
    let service = !is_watched(tgid);
    if service && !is_service(tgid) {
        return Ok(0);
    }
    // A thread that dies mid-syscall never reaches sys_exit: forget its in-flight I/O.
    if !service {
        let _ = INFLIGHT.remove(tid);
    }
    let group_dead: u8 = unsafe { ctx.read_at(EXIT_GROUP_DEAD)? };
    if group_dead == 0 {
        return Ok(0);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let (status_known, status) = exit_status();
    let killer = unsafe { KILLERS.get(tgid) }.copied().unwrap_or_default();
    let oom = unsafe { OOM_VICTIMS.get(tgid) }.is_some();
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    match EVENTS.reserve::<ExitRecord>(0) {
        Some(mut entry) => {
            entry.write(ExitRecord {
                kind: RecordKind::Exit as u32,
                tgid,
                ts_ns: now,
                status_known,
                status,
                oom_killed: oom as u32,
                killer_tgid: killer.tgid,
                killer_signal: killer.signal,
                _pad: 0,
                killer_ts_ns: killer.ts_ns,
                comm,
                killer_comm: killer.comm,
            });
            entry.submit(0);
        }
        None => count(stat_index::RINGBUF_DROPS),
    }
    let _ = WATCHED.remove(tgid);
    let _ = SERVICES.remove(tgid);
    let _ = KILLERS.remove(tgid);
    let _ = OOM_VICTIMS.remove(tgid);
    Ok(0)
}

/// The wait status the parent will see, computed as the kernel's `wait_task_zombie`
/// does: during a group exit (exit_group, or a fatal signal, which the kernel delivers
/// as a group-wide SIGKILL) it is `signal->group_exit_code`; otherwise the exiting task's
/// `exit_code`. Reading `current->exit_code` alone is wrong for real qemu: the last
/// thread of the group to exit can be a kernel-made worker (vhost, io_uring) that exits
/// with 0. Offsets come from the kernel's BTF via the daemon.
fn exit_status() -> (u32, i32) {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let group = read_group_exit_code(task);
    if let Some(code) = group {
        return (1, code);
    }
    let offset = config(config_index::TASK_EXIT_CODE_OFFSET);
    if offset == 0 {
        return (0, 0);
    }
    // SAFETY: a kernel read through the helper; a bad address fails, it does not fault.
    match unsafe { bpf_probe_read_kernel(task.add(offset as usize).cast::<i32>()) } {
        Ok(code) => (1, code),
        Err(_) => (0, 0),
    }
}

/// `Some(signal->group_exit_code)` when a group exit is in progress.
fn read_group_exit_code(task: *const u8) -> Option<i32> {
    let signal_off = config(config_index::TASK_SIGNAL_OFFSET);
    let flags_off = config(config_index::SIGNAL_FLAGS_OFFSET);
    let code_off = config(config_index::SIGNAL_GROUP_EXIT_CODE_OFFSET);
    if signal_off == 0 || code_off == 0 {
        return None;
    }
    // SAFETY: kernel reads through the helper; a bad address fails, it does not fault.
    unsafe {
        let signal: u64 =
            bpf_probe_read_kernel(task.add(signal_off as usize).cast::<u64>()).ok()?;
        let signal = signal as *const u8;
        let flags: u32 =
            bpf_probe_read_kernel(signal.add(flags_off as usize).cast::<u32>()).ok()?;
        if flags & SIGNAL_GROUP_EXIT == 0 {
            return None;
        }
        bpf_probe_read_kernel(signal.add(code_off as usize).cast::<i32>()).ok()
    }
}
