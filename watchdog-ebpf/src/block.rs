//! Block-layer stalls: requests on the VMs' block devices, from issue to completion.
//!
//! With `io='native'` (Linux AIO) or `io='io_uring'` the submitting call returns at once
//! and the request waits below it, where no syscall probe sees it. Every request issued
//! to a watched device (`WATCHED_DEVS`, the VMs' `type='block'` disks) is put in
//! `BLK_INFLIGHT` and taken out at its completion; the daemon scans the map like the
//! syscall one, and a request that completes after the threshold leaves a
//! `BlockSlowEnd` record for the stall's exact end. Requests on other devices cost a
//! lookup and nothing more.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use watchdog_common::{stat_index, BlockInflight, BlockKey, BlockSlowEndRecord, RecordKind};

use crate::maps::{count, send, was_slow, BLK_INFLIGHT, WATCHED_DEVS};

// block/block_rq_{issue,complete,requeue}: dev @8 (u32), sector @16 (u64),
// nr_sector @24 (u32); complete: error @28 (i32); issue: rwbs @34.
const DEV: usize = 8;
const SECTOR: usize = 16;
const NR_SECTOR: usize = 24;
const COMPLETE_ERROR: usize = 28;
const ISSUE_RWBS: usize = 34;

fn key(ctx: &TracePointContext) -> Result<Option<BlockKey>, i64> {
    let dev: u32 = unsafe { ctx.read_at(DEV)? };
    // SAFETY: presence test only.
    if unsafe { WATCHED_DEVS.get(&dev) }.is_none() {
        return Ok(None);
    }
    let sector: u64 = unsafe { ctx.read_at(SECTOR)? };
    Ok(Some(BlockKey {
        dev,
        _pad: 0,
        sector,
    }))
}

#[tracepoint]
pub fn blk_rq_issue(ctx: TracePointContext) -> u32 {
    try_issue(&ctx).unwrap_or(0)
}

fn try_issue(ctx: &TracePointContext) -> Result<u32, i64> {
    let Some(key) = key(ctx)? else {
        return Ok(0);
    };
    let nr_sector: u32 = unsafe { ctx.read_at(NR_SECTOR)? };
    let rwbs: u8 = unsafe { ctx.read_at(ISSUE_RWBS)? };
    let value = BlockInflight {
        start_ns: unsafe { bpf_ktime_get_ns() },
        nr_sector,
        write: u32::from(rwbs == b'W' || rwbs == b'F'),
    };
    if BLK_INFLIGHT.insert(&key, &value, 0).is_err() {
        count(stat_index::BLOCK_INFLIGHT_FULL);
    }
    Ok(0)
}

#[tracepoint]
pub fn blk_rq_complete(ctx: TracePointContext) -> u32 {
    try_complete(&ctx, true).unwrap_or(0)
}

/// A requeued request is issued again later: its wait restarts then.
#[tracepoint]
pub fn blk_rq_requeue(ctx: TracePointContext) -> u32 {
    try_complete(&ctx, false).unwrap_or(0)
}

fn try_complete(ctx: &TracePointContext, completed: bool) -> Result<u32, i64> {
    let Some(key) = key(ctx)? else {
        return Ok(0);
    };
    let Some(rq) = (unsafe { BLK_INFLIGHT.get(&key) }).copied() else {
        return Ok(0);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if completed && was_slow(rq.start_ns, now) {
        // Submitted before the entry goes: a scan that misses the entry finds this.
        send(BlockSlowEndRecord {
            kind: RecordKind::BlockSlowEnd as u32,
            dev: key.dev,
            sector: key.sector,
            start_ns: rq.start_ns,
            end_ns: now,
            error: unsafe { ctx.read_at(COMPLETE_ERROR) }.unwrap_or(0),
            write: rq.write,
        });
    }
    let _ = BLK_INFLIGHT.remove(&key);
    Ok(0)
}
