//! `cargo xtask demo`: the watchdog's probes at work on this machine, on embedded defaults.
use std::time::Duration;

use defib_tests::{is_event, is_root, FakeQemu, FuseBed, LoopDevice, Watchdog};
use serde_json::Value;

fn show(v: &Value) {
    let vm = v["vm"]["name"].as_str().unwrap_or("?");
    let line = match v["type"].as_str().unwrap_or("") {
        "qemu_started" => format!(
            "qemu pid {} of VM {vm} is watched ({})",
            v["pid"], v["source"]
        ),
        "qemu_exited" => {
            let how = match (v["signal_name"].as_str(), v["exit_code"].as_i64()) {
                (Some(s), _) => format!("killed by {s}"),
                (None, Some(c)) => format!("exited with code {c}"),
                _ => "exited".into(),
            };
            let by = v["killer"]["pid"]
                .as_u64()
                .map(|p| {
                    format!(
                        " sent by pid {p} ({})",
                        v["killer"]["comm"].as_str().unwrap_or("?")
                    )
                })
                .unwrap_or_default();
            let lat = v["observed_ns"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(v["kernel_ns"].as_u64().unwrap_or(0));
            format!(
                "qemu pid {} of VM {vm} {how}{by}; in userspace {:.3} ms after the kernel saw it",
                v["pid"],
                lat as f64 / 1e6
            )
        }
        "disk_stall_started" => format!(
            "VM {vm}: disk I/O stuck for more than {} ms ({}) and still stuck",
            v["threshold_ms"],
            v["stuck_ops"][0]["path"].as_str().unwrap_or("?")
        ),
        "disk_stall_ended" => format!(
            "VM {vm}: disk I/O moving again after {} ms",
            v["duration_ms"]
        ),
        other => format!("{other}: {v}"),
    };
    println!("  {line}");
}

pub fn run() -> anyhow::Result<()> {
    anyhow::ensure!(is_root(), "the demo loads eBPF probes: run it as root");
    println!("defib demo: starting defib-watchdog (eBPF probes on qemu processes)…");
    let mut wd = Watchdog::start(&["--stall-threshold-ms", "1000"]);
    let t = Duration::from_secs(10);
    let uuid = "c0ffee00-0000-4000-8000-00000000d3m0";

    println!("\n1. a VM's qemu is SIGKILLed by another process");
    let vm = FakeQemu::start("qemu-system-x86_64", "demo-kill", uuid, &[]);
    let pid = vm.pid();
    show(&wd.expect("start", t, |v| is_event(v, "qemu_started", pid)));
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    show(&wd.expect("exit", t, |v| is_event(v, "qemu_exited", pid)));

    println!("\n2. a VM's qemu exits with an error code");
    let vm = FakeQemu::start(
        "qemu-kvm",
        "demo-exit",
        uuid,
        &["--defib-exit-after-ms", "300", "--defib-exit-code", "3"],
    );
    let pid = vm.pid();
    show(&wd.expect("exit", t, |v| is_event(v, "qemu_exited", pid)));

    println!("\n3. a VM's disk (loop device over a FUSE mount) stops answering for 3 s");
    let bed = FuseBed::new();
    let image = bed.create_image("demo.raw", 16 << 20);
    let lo = LoopDevice::attach(&image);
    let disk = lo.path.display().to_string();
    let vm = FakeQemu::start(
        "qemu-system-x86_64",
        "demo-stall",
        uuid,
        &["--defib-write", &disk, "--defib-direct"],
    );
    let pid = vm.pid();
    std::thread::sleep(Duration::from_millis(500));
    bed.stall();
    show(&wd.expect("stall", t, |v| is_event(v, "disk_stall_started", pid)));
    std::thread::sleep(Duration::from_secs(2));
    bed.resume();
    show(&wd.expect("stall end", t, |v| is_event(v, "disk_stall_ended", pid)));
    drop(vm);
    println!("\ndone. The same events stream live with: defib-watchdog events [--json]");
    Ok(())
}
