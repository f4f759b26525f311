//! The OOM killer: `oom/mark_victim` names the process it is about to kill.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::maps::{is_watched, OOM_VICTIMS};

// oom/mark_victim: pid @8
const VICTIM_PID: usize = 8;

#[tracepoint]
pub fn qemu_oom_victim(ctx: TracePointContext) -> u32 {
    try_oom_victim(&ctx).unwrap_or(0)
}

fn try_oom_victim(ctx: &TracePointContext) -> Result<u32, i64> {
    let pid: i32 = unsafe { ctx.read_at(VICTIM_PID)? };
    if pid <= 0 || !is_watched(pid as u32) {
        return Ok(0);
    }
    OOM_VICTIMS.insert(pid as u32, 1, 0)?;
    Ok(0)
}
