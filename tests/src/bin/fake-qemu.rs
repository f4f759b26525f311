//! A stand-in for qemu in probe tests. Copied to a file named `qemu-system-x86_64` so the
//! kernel's comm is `qemu-system-x86`, and run with a qemu-like command line (`-uuid`,
//! `-name guest=...`), which it ignores. Its own options start with `--defib-`:
//!
//!   --defib-exit-after-ms N   exit after N ms (default: run until killed)
//!   --defib-exit-code C       ... with this code (default 0)
//!   --defib-write PATH        write 4 KiB to PATH and fdatasync, every 50 ms, from a
//!                             worker thread (as qemu's I/O threads do)
//!   --defib-direct            open PATH with O_DIRECT (as cache=none does)
//!   --defib-alloc-mb N        allocate and touch N MiB after --defib-alloc-after-ms
//!   --defib-alloc-after-ms N  (default 300)
//!
//! Prints "ready" on stdout once started.
#![allow(clippy::disallowed_methods)] // a synchronous test helper: thread::sleep is right here
use std::io::Write as _;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let flag = |name: &str| args.iter().any(|a| a == name);
    let num =
        |name: &str, default: u64| opt(name).map(|v| v.parse().expect(name)).unwrap_or(default);

    if let Some(path) = opt("--defib-write") {
        let direct = flag("--defib-direct");
        std::thread::Builder::new()
            .name("worker".into())
            .spawn(move || write_loop(&path, direct))
            .expect("spawn worker");
    }
    if let Some(mb) = opt("--defib-alloc-mb") {
        let mb: usize = mb.parse().expect("--defib-alloc-mb");
        let after = num("--defib-alloc-after-ms", 300);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(after));
            let mut chunks = Vec::new();
            for _ in 0..mb {
                let mut v = vec![0u8; 1 << 20];
                for i in (0..v.len()).step_by(4096) {
                    v[i] = 1;
                }
                chunks.push(v);
            }
            std::hint::black_box(&chunks);
            std::thread::sleep(Duration::from_secs(3600));
        });
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    match opt("--defib-exit-after-ms") {
        Some(ms) => {
            std::thread::sleep(Duration::from_millis(
                ms.parse().expect("--defib-exit-after-ms"),
            ));
            std::process::exit(num("--defib-exit-code", 0) as i32);
        }
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
}

fn write_loop(path: &str, direct: bool) {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file = opts
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"));
    // O_DIRECT wants an aligned buffer: take a 4 KiB-aligned slice of a larger one.
    let raw = vec![0xa5u8; 8192];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &raw[off..off + 4096];
    loop {
        file.write_at(buf, 0)
            .unwrap_or_else(|e| panic!("write {path}: {e}"));
        file.sync_data()
            .unwrap_or_else(|e| panic!("fdatasync {path}: {e}"));
        std::thread::sleep(Duration::from_millis(50));
    }
}
