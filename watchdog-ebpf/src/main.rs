//! defib's eBPF probes. One file per hook family; each probe is a thin wrapper
//! around a `try_*` function so the logic reads as ordinary Rust with `?`.
//!
//! - `process`: exec of a watched name (start watching), exit of a watched process.
//! - `signal`: who sent a terminating signal, and whether one was delivered fatally.
//! - `oom`: the OOM killer's victim.
//! - `io`: I/O syscalls of watched processes that are in flight (stall detection).
//! - `block`: block requests on the VMs' block devices in flight (Linux AIO, io_uring).
//! - `uring`: io_uring requests of watched processes in flight.
//! - `rbd`: librbd requests of watched processes in flight (uprobes).
#![no_std]
#![no_main]

mod block;
mod io;
mod maps;
mod oom;
mod process;
mod rbd;
mod signal;
mod uring;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves the probes cannot panic; this is never reached.
    loop {}
}

/// GPL-compatible: needed for some helpers (e.g. `bpf_probe_read_kernel`).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
