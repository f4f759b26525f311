//! io_uring stalls: the data-moving requests of watched processes, from submission to
//! completion.
//!
//! With `io='io_uring'` qemu's disk I/O never passes through the read/write syscalls:
//! a request is submitted on a ring and completed by the kernel (inline, from a worker,
//! or from the block layer). Each tracked request (`uring_ops`) of a watched process is
//! put in `URING_INFLIGHT` by its request pointer and taken out at its completion; the
//! daemon scans the map, and a completion after the threshold leaves an
//! `UringSlowEnd` record. qemu's own long waits on its rings (polls) are not tracked.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use watchdog_common::{stat_index, uring_ops, RecordKind, UringInflight, UringSlowEndRecord};

use crate::maps::{count, current_ids, is_watched, send, was_slow, URING_INFLIGHT};

// io_uring/io_uring_submit_req: req @16, user_data @24, opcode @32 (u8).
// io_uring/io_uring_complete: req @16, res @32 (i32).
const REQ: usize = 16;
const USER_DATA: usize = 24;
const SUBMIT_OPCODE: usize = 32;
const COMPLETE_RES: usize = 32;

#[tracepoint]
pub fn uring_submit(ctx: TracePointContext) -> u32 {
    try_submit(&ctx).unwrap_or(0)
}

fn try_submit(ctx: &TracePointContext) -> Result<u32, i64> {
    let (tgid, _) = current_ids();
    if !is_watched(tgid) {
        return Ok(0);
    }
    let opcode: u8 = unsafe { ctx.read_at(SUBMIT_OPCODE)? };
    if !uring_ops::tracked(u32::from(opcode)) {
        return Ok(0);
    }
    let req: u64 = unsafe { ctx.read_at(REQ)? };
    let value = UringInflight {
        tgid,
        opcode: u32::from(opcode),
        start_ns: unsafe { bpf_ktime_get_ns() },
        user_data: unsafe { ctx.read_at(USER_DATA)? },
    };
    if URING_INFLIGHT.insert(&req, &value, 0).is_err() {
        count(stat_index::URING_INFLIGHT_FULL);
    }
    Ok(0)
}

#[tracepoint]
pub fn uring_complete(ctx: TracePointContext) -> u32 {
    try_complete(&ctx).unwrap_or(0)
}

fn try_complete(ctx: &TracePointContext) -> Result<u32, i64> {
    let req: u64 = unsafe { ctx.read_at(REQ)? };
    let Some(io) = (unsafe { URING_INFLIGHT.get(&req) }).copied() else {
        return Ok(0);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if was_slow(io.start_ns, now) {
        send(UringSlowEndRecord {
            kind: RecordKind::UringSlowEnd as u32,
            tgid: io.tgid,
            req,
            opcode: io.opcode,
            res: unsafe { ctx.read_at(COMPLETE_RES) }.unwrap_or(0),
            start_ns: io.start_ns,
            end_ns: now,
        });
    }
    let _ = URING_INFLIGHT.remove(&req);
    Ok(0)
}
