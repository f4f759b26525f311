//! Signals: who sent a terminating signal to a watched process or service. `signal_generate` runs in
//! the sender's context, so the current task is the killer. (How the process died is read
//! from its exit code at exit, see `process.rs`: `signal_deliver` cannot tell, because for
//! a default-fatal signal the kernel zaps every thread with SIGKILL.)
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use watchdog_common::{is_default_fatal, KillerInfo};

use crate::maps::{current_ids, is_service, is_watched, KILLERS};

// signal/signal_generate: sig @8, errno @12, code @16, comm @20, pid @36, group @40, result @44
const GEN_SIG: usize = 8;
const GEN_PID: usize = 36;
const GEN_RESULT: usize = 44;
// TRACE_SIGNAL_DELIVERED and TRACE_SIGNAL_ALREADY_PENDING: the signal will reach the task.
const RESULT_DELIVERED: i32 = 0;
const RESULT_ALREADY_PENDING: i32 = 2;

#[tracepoint]
pub fn qemu_signal_generate(ctx: TracePointContext) -> u32 {
    try_signal_generate(&ctx).unwrap_or(0)
}

fn try_signal_generate(ctx: &TracePointContext) -> Result<u32, i64> {
    let target: i32 = unsafe { ctx.read_at(GEN_PID)? };
    if target <= 0 || !(is_watched(target as u32) || is_service(target as u32)) {
        return Ok(0);
    }
    let sig: i32 = unsafe { ctx.read_at(GEN_SIG)? };
    let result: i32 = unsafe { ctx.read_at(GEN_RESULT)? };
    if !is_default_fatal(sig) || (result != RESULT_DELIVERED && result != RESULT_ALREADY_PENDING) {
        return Ok(0);
    }
    let (sender, _) = current_ids();
    let info = KillerInfo {
        tgid: sender,
        signal: sig as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm()?,
    };
    KILLERS.insert(target as u32, info, 0)?;
    Ok(0)
}
