//! Records shared by the probes (`watchdog-ebpf`) and the daemon (`watchdog`).
//!
//! Every record is `#[repr(C)]`, made of fixed-size integers and byte arrays only, and
//! padded explicitly so that the layout the BPF program writes is the layout userspace
//! reads. Records in the ring buffer start with a `u32` [`RecordKind`] so the reader can
//! tell them apart before it looks at the rest.
#![no_std]

/// Length of a task's `comm` in the kernel (including the trailing NUL).
pub const COMM_LEN: usize = 16;
/// How many process-name patterns the probes can match against at exec time.
pub const MAX_NAME_PATTERNS: u32 = 8;

/// The first `u32` of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A process whose name matches a watched pattern was exec'd: [`ExecRecord`].
    Exec = 1,
    /// The last thread of a watched process exited: [`ExitRecord`].
    Exit = 2,
    /// A tracked I/O syscall of a watched process returned after the stall threshold: [`IoSlowEndRecord`].
    IoSlowEnd = 3,
    /// A block request on a watched device completed after the stall threshold: [`BlockSlowEndRecord`].
    BlockSlowEnd = 4,
    /// An io_uring I/O request of a watched process completed after the stall threshold: [`UringSlowEndRecord`].
    UringSlowEnd = 5,
    /// A librbd request of a watched process completed after the stall threshold: [`RbdSlowEndRecord`].
    RbdSlowEnd = 6,
}

impl RecordKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Exec),
            2 => Some(Self::Exit),
            3 => Some(Self::IoSlowEnd),
            4 => Some(Self::BlockSlowEnd),
            5 => Some(Self::UringSlowEnd),
            6 => Some(Self::RbdSlowEnd),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecRecord {
    pub kind: u32,
    pub tgid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the exec completed.
    pub ts_ns: u64,
    pub comm: [u8; COMM_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitRecord {
    pub kind: u32,
    pub tgid: u32,
    /// CLOCK_MONOTONIC ns when the last thread of the process exited.
    pub ts_ns: u64,
    /// 1 if `status` was read from the task (its offset is known from the kernel's BTF).
    pub status_known: u32,
    /// The wait status, as `waitpid` would see it: `task_struct.exit_code` of the last
    /// thread (for a group exit, the group's exit code). Low 7 bits: the signal that
    /// killed it; bit 7: core dumped; bits 8..16: the exit code.
    pub status: i32,
    /// 1 if the OOM killer chose this process (`oom:mark_victim`).
    pub oom_killed: u32,
    /// Thread group id of the last task that sent this process a terminating signal, 0 if none.
    pub killer_tgid: u32,
    /// Signal that the killer sent.
    pub killer_signal: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns when the killer's signal was generated (the kill(2) call).
    pub killer_ts_ns: u64,
    pub comm: [u8; COMM_LEN],
    pub killer_comm: [u8; COMM_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IoSlowEndRecord {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Syscall number (x86_64) of the I/O call.
    pub syscall_nr: u32,
    /// CLOCK_MONOTONIC ns when the syscall was entered.
    pub start_ns: u64,
    /// CLOCK_MONOTONIC ns when it returned.
    pub end_ns: u64,
    /// First argument of the syscall: the file descriptor.
    pub fd: i64,
    /// Return value of the syscall.
    pub ret: i64,
}

/// Key of the block-request in-flight map: the request's device (the kernel's `dev_t`,
/// `major << 20 | minor`, as the block tracepoints give it) and first sector. Two
/// requests in flight at once on the same sector of one device are not told apart (the
/// second is counted as a collision, and the first one's completion ends both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub dev: u32,
    pub _pad: u32,
    pub sector: u64,
}

/// Value of the block-request in-flight map: when the request was issued to the driver.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockInflight {
    pub start_ns: u64,
    pub nr_sector: u32,
    /// 1 for a write (or flush), 0 for a read.
    pub write: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockSlowEndRecord {
    pub kind: u32,
    pub dev: u32,
    pub sector: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The completion's status (0, or a negative errno).
    pub error: i32,
    /// 1 for a write (or flush), 0 for a read, as at its issue.
    pub write: u32,
}

/// Value of the io_uring in-flight map (key: the kernel's request pointer, which the
/// submit and complete tracepoints both carry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UringInflight {
    pub tgid: u32,
    /// `IORING_OP_*`.
    pub opcode: u32,
    pub start_ns: u64,
    pub user_data: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UringSlowEndRecord {
    pub kind: u32,
    pub tgid: u32,
    pub req: u64,
    pub opcode: u32,
    pub res: i32,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// The io_uring operations that move guest disk data (UAPI numbers): readv, writev,
/// fsync, read/write fixed, sync_file_range, fallocate, read, write. Others (a poll
/// qemu keeps armed on its event fds, timeouts) wait by design and are not tracked.
pub mod uring_ops {
    pub const TRACKED: [(&str, u32); 9] = [
        ("readv", 1),
        ("writev", 2),
        ("fsync", 3),
        ("read_fixed", 4),
        ("write_fixed", 5),
        ("sync_file_range", 8),
        ("fallocate", 17),
        ("read", 22),
        ("write", 23),
    ];

    #[inline(always)]
    pub fn tracked(op: u32) -> bool {
        matches!(op, 1..=5 | 8 | 17 | 22 | 23)
    }

    pub fn name(op: u32) -> &'static str {
        let mut i = 0;
        while i < TRACKED.len() {
            if TRACKED[i].1 == op {
                return TRACKED[i].0;
            }
            i += 1;
        }
        "unknown"
    }
}

/// Key of the librbd in-flight map: the qemu and the request's completion (an
/// `rbd_completion_t`, a pointer in that process: unique there while the request runs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RbdKey {
    pub tgid: u32,
    pub _pad: u32,
    pub completion: u64,
}

/// Value of the librbd in-flight map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RbdInflight {
    /// [`rbd_ops`].
    pub op: u32,
    pub _pad: u32,
    pub start_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RbdSlowEndRecord {
    pub kind: u32,
    pub tgid: u32,
    pub completion: u64,
    pub op: u32,
    pub _pad: u32,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// The librbd calls that submit a guest's disk I/O (qemu's rbd driver), as the probes
/// number them: the attach cookie of each uprobe. Every one takes the request's
/// completion as one of its arguments; `rbd_aio_release` ends the request.
pub mod rbd_ops {
    /// (librbd symbol, op, op name, argument index of the completion: one probe program
    /// per index, `rbd_submit_a1`, `_a3`, `_a4`).
    pub const TRACKED: [(&str, u32, &str, usize); 7] = [
        ("rbd_aio_readv", 1, "read", 4),
        ("rbd_aio_read", 1, "read", 4),
        ("rbd_aio_writev", 2, "write", 4),
        ("rbd_aio_write", 2, "write", 4),
        ("rbd_aio_flush", 3, "flush", 1),
        ("rbd_aio_discard", 4, "discard", 3),
        ("rbd_aio_write_zeroes", 5, "write_zeroes", 3),
    ];
    /// Where a request ends (its completion is the first argument).
    pub const RELEASE: &str = "rbd_aio_release";

    pub fn name(op: u32) -> &'static str {
        match op {
            1 => "read",
            2 => "write",
            3 => "flush",
            4 => "discard",
            5 => "write_zeroes",
            _ => "unknown",
        }
    }
}

/// Value of the in-flight map (key: tid): one I/O syscall of a watched thread that has
/// been entered and has not returned yet. The daemon scans this map to see stalls while
/// they last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InflightIo {
    pub tgid: u32,
    pub syscall_nr: u32,
    pub start_ns: u64,
    pub fd: i64,
}

/// Value of the watched-process map (key: tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WatchedProcess {
    /// CLOCK_MONOTONIC ns when the process became watched (exec, or the daemon's /proc scan).
    pub since_ns: u64,
}

/// Last terminating signal sent to a watched process (key: target tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KillerInfo {
    pub tgid: u32,
    pub signal: u32,
    pub ts_ns: u64,
    pub comm: [u8; COMM_LEN],
}

/// A process-name pattern (entry of the `NAME_PATTERNS` array map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NamePattern {
    pub bytes: [u8; COMM_LEN],
    /// Number of significant bytes in `bytes`; 0 marks an unused slot.
    pub len: u32,
    /// 1: `comm` must start with the pattern; 0: `comm` must equal it.
    pub prefix: u32,
}

impl NamePattern {
    /// Builds a pattern from `qemu-system-*` (prefix) or `qemu-kvm` (exact) syntax. Names
    /// longer than the kernel's comm (15 bytes) are cut, as the kernel cuts comm.
    pub fn parse(text: &str) -> Self {
        let (body, prefix) = match text.strip_suffix('*') {
            Some(b) => (b, 1),
            None => (text, 0),
        };
        let mut bytes = [0u8; COMM_LEN];
        let n = body.len().min(COMM_LEN - 1);
        bytes[..n].copy_from_slice(&body.as_bytes()[..n]);
        // A name cut to comm length can only be matched as a prefix of the cut comm.
        let prefix = if body.len() > COMM_LEN - 1 { 1 } else { prefix };
        NamePattern {
            bytes,
            len: n as u32,
            prefix,
        }
    }

    /// Does a NUL-padded comm match? The same rule the probe applies in the kernel.
    pub fn matches(&self, comm: &[u8; COMM_LEN]) -> bool {
        let len = self.len as usize;
        if len == 0 || len >= COMM_LEN {
            return false;
        }
        if comm[..len] != self.bytes[..len] {
            return false;
        }
        self.prefix == 1 || comm[len] == 0
    }
}

/// Indexes into the `CONFIG` array map (u64 values).
pub mod config_index {
    /// Syscalls lasting at least this long are reported by an `IoSlowEnd` record.
    pub const STALL_THRESHOLD_NS: u32 = 0;
    /// Byte offsets found by the daemon in the kernel's BTF (0: unknown, the status is
    /// then not read): `task_struct.exit_code`, `task_struct.signal`,
    /// `signal_struct.flags` and `signal_struct.group_exit_code`.
    pub const TASK_EXIT_CODE_OFFSET: u32 = 1;
    pub const TASK_SIGNAL_OFFSET: u32 = 2;
    pub const SIGNAL_FLAGS_OFFSET: u32 = 3;
    pub const SIGNAL_GROUP_EXIT_CODE_OFFSET: u32 = 4;
    pub const LEN: u32 = 5;
}

/// `signal_struct.flags`: a group exit (exit_group, fatal signal) is in progress; its
/// status is then `signal_struct.group_exit_code` (include/linux/sched/signal.h).
pub const SIGNAL_GROUP_EXIT: u32 = 0x0000_0004;

/// Indexes into the per-CPU `STATS` counters.
pub mod stat_index {
    /// Records lost because the ring buffer was full.
    pub const RINGBUF_DROPS: u32 = 0;
    /// In-flight I/O entries that did not fit in the map.
    pub const INFLIGHT_FULL: u32 = 1;
    /// Processes that could not be added to the watched map at exec.
    pub const WATCH_FULL: u32 = 2;
    /// Block requests on watched devices that did not fit in their in-flight map.
    pub const BLOCK_INFLIGHT_FULL: u32 = 3;
    /// io_uring requests of watched processes that did not fit in their in-flight map.
    pub const URING_INFLIGHT_FULL: u32 = 4;
    /// librbd requests of watched processes that did not fit in their in-flight map.
    pub const RBD_INFLIGHT_FULL: u32 = 5;
    pub const LEN: u32 = 6;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for InflightIo {}
    unsafe impl aya::Pod for BlockKey {}
    unsafe impl aya::Pod for BlockInflight {}
    unsafe impl aya::Pod for UringInflight {}
    unsafe impl aya::Pod for RbdKey {}
    unsafe impl aya::Pod for RbdInflight {}
    unsafe impl aya::Pod for WatchedProcess {}
    unsafe impl aya::Pod for KillerInfo {}
    unsafe impl aya::Pod for NamePattern {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn comm(s: &str) -> [u8; COMM_LEN] {
        let mut c = [0u8; COMM_LEN];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    #[test]
    fn a_prefix_pattern_matches_the_kernels_cut_qemu_comm() {
        let p = NamePattern::parse("qemu-system-*");
        assert!(p.matches(&comm("qemu-system-x86")));
        assert!(!p.matches(&comm("qemu-img")));
    }

    #[test]
    fn an_exact_pattern_does_not_match_a_longer_name() {
        let p = NamePattern::parse("qemu-kvm");
        assert!(p.matches(&comm("qemu-kvm")));
        assert!(!p.matches(&comm("qemu-kvm2")));
    }

    #[test]
    fn a_full_binary_name_longer_than_comm_matches_its_cut_form() {
        let p = NamePattern::parse("qemu-system-x86_64");
        assert!(p.matches(&comm("qemu-system-x86")));
    }

    #[test]
    fn records_have_the_layout_the_probes_write() {
        assert_eq!(core::mem::size_of::<ExitRecord>(), 80);
        assert_eq!(core::mem::size_of::<IoSlowEndRecord>(), 48);
        assert_eq!(core::mem::size_of::<ExecRecord>(), 32);
        assert_eq!(core::mem::size_of::<InflightIo>(), 24);
        assert_eq!(core::mem::size_of::<BlockKey>(), 16);
        assert_eq!(core::mem::size_of::<BlockInflight>(), 16);
        assert_eq!(core::mem::size_of::<BlockSlowEndRecord>(), 40);
        assert_eq!(core::mem::size_of::<UringInflight>(), 24);
        assert_eq!(core::mem::size_of::<UringSlowEndRecord>(), 40);
        assert_eq!(core::mem::size_of::<RbdKey>(), 16);
        assert_eq!(core::mem::size_of::<RbdInflight>(), 16);
        assert_eq!(core::mem::size_of::<RbdSlowEndRecord>(), 40);
    }

    #[test]
    fn every_tracked_rbd_call_has_its_completion_where_the_probe_reads_it() {
        for (symbol, op, name, arg) in rbd_ops::TRACKED {
            assert!(
                [1, 3, 4].contains(&arg),
                "{symbol}: no rbd_submit_a{arg} program"
            );
            assert_eq!(rbd_ops::name(op), name, "{symbol}");
        }
    }

    #[test]
    fn the_tracked_uring_ops_and_their_fast_test_agree() {
        for op in 0..64 {
            assert_eq!(
                uring_ops::tracked(op),
                uring_ops::TRACKED.iter().any(|(_, o)| *o == op),
                "op {op}"
            );
        }
    }
}

/// Would this signal terminate a process whose handler is `SIG_DFL`? The probe records the
/// sender of such a signal as the process's killer; SIGCHLD, SIGCONT, SIGSTOP and the
/// like never kill.
pub const fn is_default_fatal(sig: i32) -> bool {
    // 17 SIGCHLD, 18 SIGCONT, 19 SIGSTOP, 20 SIGTSTP, 21 SIGTTIN, 22 SIGTTOU, 23 SIGURG, 28 SIGWINCH
    sig > 0 && sig < 65 && !matches!(sig, 17..=23 | 28)
}

/// The I/O syscalls (x86_64 numbers) whose duration the probes track: the calls through
/// which qemu reads, writes and flushes guest disks with `io='threads'`, and submission
/// with `io='native'` (which blocks on filesystems without native AIO, such as FUSE).
pub mod io_syscalls {
    pub const TRACKED: [(&str, u32); 10] = [
        ("pread64", 17),
        ("pwrite64", 18),
        ("fsync", 74),
        ("fdatasync", 75),
        ("io_submit", 209),
        ("fallocate", 285),
        ("preadv", 295),
        ("pwritev", 296),
        ("preadv2", 327),
        ("pwritev2", 328),
    ];

    pub fn name(nr: u32) -> &'static str {
        let mut i = 0;
        while i < TRACKED.len() {
            if TRACKED[i].1 == nr {
                return TRACKED[i].0;
            }
            i += 1;
        }
        "unknown"
    }
}
