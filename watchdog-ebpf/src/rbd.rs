//! librbd stalls: the requests qemu's rbd driver submits, from submission to release.
//!
//! With a disk on Ceph RBD, qemu talks to the OSDs over TCP through librbd, in
//! userspace: a stalled OSD shows no D state, no syscall stuck on the disk and no block
//! request. Uprobes on librbd see it: each submitting call (`rbd_ops::TRACKED`; the
//! program is chosen by where the call takes its completion, the attach cookie says
//! which operation it is) of a watched process puts its completion in
//! `RBD_INFLIGHT`, and `rbd_aio_release` (qemu's completion callback releases every
//! completion) takes it out; the daemon scans the map, and a release after the
//! threshold leaves an `RbdSlowEnd` record.
use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_ktime_get_ns},
    macros::uprobe,
    programs::ProbeContext,
    EbpfContext as _,
};
use watchdog_common::{stat_index, RbdInflight, RbdKey, RbdSlowEndRecord, RecordKind};

use crate::maps::{count, current_ids, is_watched, send, was_slow, RBD_INFLIGHT};

// One program per argument that holds the completion: a read at an offset chosen at
// run time from the context is refused by the verifier.

/// Calls whose completion is the second argument (`rbd_aio_flush`).
#[uprobe]
pub fn rbd_submit_a1(ctx: ProbeContext) -> u32 {
    try_submit(&ctx, ctx.arg(1)).unwrap_or(0)
}

/// Calls whose completion is the fourth argument (`rbd_aio_discard`, `_write_zeroes`).
#[uprobe]
pub fn rbd_submit_a3(ctx: ProbeContext) -> u32 {
    try_submit(&ctx, ctx.arg(3)).unwrap_or(0)
}

/// Calls whose completion is the fifth argument (`rbd_aio_readv`, `_writev`, ...).
#[uprobe]
pub fn rbd_submit_a4(ctx: ProbeContext) -> u32 {
    try_submit(&ctx, ctx.arg(4)).unwrap_or(0)
}

fn try_submit(ctx: &ProbeContext, completion: Option<u64>) -> Result<u32, i64> {
    let (tgid, _) = current_ids();
    if !is_watched(tgid) {
        return Ok(0);
    }
    let completion = completion.ok_or(1i64)?;
    // SAFETY: the helper only reads the cookie the daemon attached this probe with.
    let op = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let key = RbdKey {
        tgid,
        _pad: 0,
        completion,
    };
    let value = RbdInflight {
        op,
        _pad: 0,
        start_ns: unsafe { bpf_ktime_get_ns() },
    };
    if RBD_INFLIGHT.insert(&key, &value, 0).is_err() {
        count(stat_index::RBD_INFLIGHT_FULL);
    }
    Ok(0)
}

#[uprobe]
pub fn rbd_release(ctx: ProbeContext) -> u32 {
    try_release(&ctx).unwrap_or(0)
}

fn try_release(ctx: &ProbeContext) -> Result<u32, i64> {
    // The completion callback runs on a librbd thread of the same process.
    let (tgid, _) = current_ids();
    let completion: u64 = ctx.arg(0).ok_or(1i64)?;
    let key = RbdKey {
        tgid,
        _pad: 0,
        completion,
    };
    let Some(io) = (unsafe { RBD_INFLIGHT.get(&key) }).copied() else {
        return Ok(0);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if was_slow(io.start_ns, now) {
        send(RbdSlowEndRecord {
            kind: RecordKind::RbdSlowEnd as u32,
            tgid,
            completion,
            op: io.op,
            _pad: 0,
            start_ns: io.start_ns,
            end_ns: now,
        });
    }
    let _ = RBD_INFLIGHT.remove(&key);
    Ok(0)
}
