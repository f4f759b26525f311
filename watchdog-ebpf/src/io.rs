//! Disk I/O stalls. Every tracked I/O syscall of a watched process is put in `INFLIGHT`
//! (by tid) when it is entered and taken out when it returns. The daemon scans the map
//! every few tens of milliseconds, so a call stuck for longer than the threshold is seen
//! while it is stuck, whatever state the thread sleeps in: D (a loop device whose backing
//! file is on a stopped FUSE mount) or S (an image directly on the stopped FUSE mount).
//! When a call returns after the threshold, an `IoSlowEnd` record says when, so the stall
//! gets an exact end.
//!
//! The same two programs are attached to the enter/exit tracepoints of every syscall in
//! `watchdog_common::io_syscalls::TRACKED`: those tracepoints fire only for those calls,
//! which keeps the cost off every other syscall on the host.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use watchdog_common::{stat_index, InflightIo, IoSlowEndRecord, RecordKind};

use crate::maps::{count, current_ids, is_watched, send, was_slow, INFLIGHT};

// syscalls/sys_enter_*: __syscall_nr @8, first argument @16. sys_exit_*: ret @16.
const SYSCALL_NR: usize = 8;
const FIRST_ARG: usize = 16;
const RET: usize = 16;

#[tracepoint]
pub fn qemu_io_enter(ctx: TracePointContext) -> u32 {
    try_io_enter(&ctx).unwrap_or(0)
}

fn try_io_enter(ctx: &TracePointContext) -> Result<u32, i64> {
    let (tgid, tid) = current_ids();
    if !is_watched(tgid) {
        return Ok(0);
    }
    let nr: i32 = unsafe { ctx.read_at(SYSCALL_NR)? };
    let fd: i64 = unsafe { ctx.read_at(FIRST_ARG)? };
    let io = InflightIo {
        tgid,
        syscall_nr: nr as u32,
        start_ns: unsafe { bpf_ktime_get_ns() },
        fd,
    };
    if INFLIGHT.insert(tid, io, 0).is_err() {
        count(stat_index::INFLIGHT_FULL);
    }
    Ok(0)
}

#[tracepoint]
pub fn qemu_io_exit(ctx: TracePointContext) -> u32 {
    try_io_exit(&ctx).unwrap_or(0)
}

fn try_io_exit(ctx: &TracePointContext) -> Result<u32, i64> {
    let (_, tid) = current_ids();
    let Some(io) = (unsafe { INFLIGHT.get(tid) }).copied() else {
        return Ok(0);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if was_slow(io.start_ns, now) {
        // Submitted before the entry is removed: a daemon scan that no longer finds the
        // entry will find this record in the ring buffer first.
        send(IoSlowEndRecord {
            kind: RecordKind::IoSlowEnd as u32,
            tgid: io.tgid,
            tid,
            syscall_nr: io.syscall_nr,
            start_ns: io.start_ns,
            end_ns: now,
            fd: io.fd,
            ret: unsafe { ctx.read_at(RET) }.unwrap_or(0),
        });
    }
    let _ = INFLIGHT.remove(tid);
    Ok(0)
}
