//! The storage fence's latency: from the decision to fence to a verified Ceph blocklist,
//! through the controller's own `ceph-blocklist` level (`ceph osd blocklist add`, then
//! `ceph osd blocklist ls` and `rbd status` polled every 50 ms) against the Ceph test bed.
//!
//! Each sample: a client writing to an RBD image (`rbd bench`, 4 KiB writes) as the
//! system libvirt's qemu user, whose TCP leaves from 127.0.0.10 (as a lab host's qemus
//! do in tests/tests/ceph_fence.rs), holds the image's watch; the level fences
//! 127.0.0.10 and is timed until `blocklist add` was acknowledged and until the fence
//! is verified (the entry listed, the watch gone); then the writer is stopped and the
//! entry lifted.
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use controller::edges::fence::ceph::CephBlocklist;
use controller::edges::fence::{CallPolicy, FenceDriver};
use defib_tests::cephbed::{Cephbed, SourceAddress};

use crate::report::{self, Series};

const ADDR: &str = "127.0.0.10";

/// `rbd bench` writing to `spec` as libvirt-qemu, until killed.
fn writer(ceph: &Cephbed, spec: &str) -> anyhow::Result<Child> {
    Ok(Command::new("setpriv")
        .args([
            "--reuid",
            "libvirt-qemu",
            "--regid",
            "kvm",
            "--clear-groups",
        ])
        .args(["rbd", "--id", "cinder", "bench", "--io-type", "write"])
        .args([
            "--io-size",
            "4096",
            "--io-threads",
            "1",
            "--io-total",
            "100G",
            spec,
        ])
        .env("CEPH_CONF", ceph.conf())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn watched_from(ceph: &Cephbed, spec: &str) -> bool {
    ceph.run(
        "rbd",
        &["status", spec, "--format", "json"],
        Duration::from_secs(30),
    )
    .is_ok_and(|t| t.contains(&format!("\"{ADDR}:")))
}

pub fn run(samples: usize) -> anyhow::Result<String> {
    anyhow::ensure!(samples > 0, "--samples must be > 0");
    let ceph = Cephbed::ensure().map_err(|e| {
        anyhow::anyhow!("this scenario needs the Ceph test bed (`cargo xtask cephbed start`): {e}")
    })?;
    let _address = SourceAddress::for_user("libvirt-qemu", ADDR);
    let image = ceph.import("bench-blocklist", &[0u8; 512], 64 << 20);
    let level = Arc::new(CephBlocklist {
        addresses: vec![ADDR.parse()?],
        pools: vec![defib_tests::cephbed::POOL.into()],
        ceph: "ceph".into(),
        rbd: "rbd".into(),
        common_args: vec!["--conf".into(), ceph.conf().display().to_string()],
        expire: Duration::from_secs(3600),
        counts_alone: true,
        policy: CallPolicy {
            timeout: Duration::from_secs(15),
            attempts: 3,
            backoff: Duration::from_millis(500),
        },
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut added, mut verified) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let mut w = writer(&ceph, &image.spec)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !watched_from(&ceph, &image.spec) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the writer never watched the image"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        // What the fencer does with a level: fence, then ask for this attempt's
        // evidence every 50 ms (its verify_poll_ms here) until it is there.
        let t0 = Instant::now();
        let attempt = rt.block_on(level.fence())?;
        added.push(t0.elapsed().as_secs_f64() * 1000.0);
        loop {
            if rt.block_on(level.is_fenced(&attempt))? {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "sample {i}: not verified within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = t0.elapsed().as_secs_f64() * 1000.0;
        verified.push(took);
        eprintln!(
            "sample {i}: blocklist add acknowledged after {:.0} ms, verified after {took:.0} ms",
            added[i]
        );
        let _ = w.kill();
        let _ = w.wait();
        rt.block_on(level.lift())?;
    }
    report::write(
        &report::results_dir(),
        "blocklist-fence",
        &format!("cargo xtask bench blocklist-fence --samples {samples}"),
        "The controller's ceph-blocklist fence level against the single-OSD Ceph test bed, \
         fencing 127.0.0.10 while a client writing from it (rbd bench as libvirt-qemu, its \
         source address rewritten) holds an image's watch. `blocklist add` is one `ceph osd \
         blocklist ls` (the baseline) and one `ceph osd blocklist add`; verified adds what the \
         fencer then does: `blocklist ls`, `rbd ls` and `rbd status` per image (two images \
         in the pool here), every 50 ms until the entry is in force and no watch from the \
         address is left. Each CLI call starts a Ceph client (~0.3 s): \
         the latency is the CLI's, not Ceph's.",
        &[
            Series {
                name: "decision → blocklist add acknowledged".into(),
                samples_ms: added,
            },
            Series {
                name: "decision → fence verified (entry listed, no watch left)".into(),
                samples_ms: verified,
            },
        ],
    )
}
