//! `cargo xtask lab up --nova`: the lab's hosts are the novabed's fake computes.
//!
//! Each lab host is named after one of the novabed's computes (`fake-1`…`fake-N`): the
//! controller's Nova backend uses the engine's host id as the compute's host name, so the
//! watchdog of lab host `i` reports as `fake-{i+1}`. The novabed is shared with the
//! tests (which expect fake-1..3), so the lab adapts its names, not the novabed. The
//! host's power-off at its BMC also SIGKILLs its nova-compute (so Nova sees the compute
//! die, as with a real power loss); the keeper starts it again at power-on. The lab boots
//! its own servers (named `lab{tag}-fake-N…`) and removes only those.
//!
//! The controller runs in its namespace, and the novabed listens on 127.0.0.1 of the
//! machine: the keeper forwards the controller namespace's 127.0.0.1 ports of nova-api and
//! Placement to the machine's (a listener made in the namespace, connections made
//! from the machine's).
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use defib_tests::novalab::{novabed_dir, Nova, NOVA_URL, PLACEMENT_URL};
use serde_json::Value;

/// nova-api's and Placement's ports (as `NOVA_URL` and `PLACEMENT_URL` name them).
pub const PORTS: [u16; 2] = [38774, 38778];

/// The compute (Nova host name) of lab host `h`.
pub fn compute_name(h: usize) -> String {
    format!("fake-{}", h + 1)
}

/// The prefix of every server the lab boots.
pub fn server_prefix(tag: &str) -> String {
    format!("lab{tag}-")
}

/// The controller's `[nova]` section: header identity against the novabed.
pub fn controller_section() -> String {
    format!(
        "[nova]\nauth = \"headers\"\nheader_user_id = \"admin\"\nheader_project_id = \"admin\"\n\
         header_roles = \"admin,member,reader\"\nheader_token = \"admin\"\n\
         compute_url = {NOVA_URL:?}\nplacement_url = {PLACEMENT_URL:?}\n"
    )
}

/// The power-off hook's line for lab host `h`: SIGKILL its nova-compute, found in the
/// novabed's pid list and checked against its command line (a reused pid is left alone).
pub fn power_off_hook(h: usize) -> String {
    let name = format!("nova-compute-{}", compute_name(h));
    format!(
        "for p in $(awk '$2==\"{name}\" {{print $1}}' {pids}); do grep -qa nova-compute /proc/$p/cmdline 2>/dev/null && kill -9 $p && echo \"$(date +%s.%N) killed {name} $p\"; done",
        pids = novabed_dir().join("pids").display()
    )
}

/// Forwards `127.0.0.1:port` inside network namespace `ns` to `127.0.0.1:port` of the
/// machine, for every port of [`PORTS`], for as long as this process runs.
pub fn forward_into(ns: &str) -> anyhow::Result<()> {
    for port in PORTS {
        let path = format!("/run/netns/{ns}");
        // The listener is made by a thread that enters the namespace (a namespace is a
        // thread's); the socket stays in it. Everything else runs in the machine's.
        let listener = std::thread::spawn(move || -> anyhow::Result<TcpListener> {
            let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on an open namespace file; affects this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(TcpListener::bind(("127.0.0.1", port))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the forwarder's thread panicked"))??;
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || relay(conn, port));
            }
        });
    }
    Ok(())
}

/// One forwarded connection. The upstream connection is made only once the client has
/// sent its first bytes: an HTTP client may open a connection it then leaves unused, and
/// a gthread worker of the novabed's (8 threads) may give such a connection a thread
/// while it waits for a request; a connection that never carries one costs Nova nothing.
/// (Whether that ever mattered was not shown: the 60 s stalls first blamed on the
/// forwarder were nova-api's hypervisor uptime RPC, see `Compute::hypervisors`.)
fn relay(mut conn: TcpStream, port: u16) {
    let mut first = [0u8; 16384];
    let n = match conn.read(&mut first) {
        Ok(0) | Err(_) => return,
        Ok(n) => n,
    };
    let Ok(mut up) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    ) else {
        return;
    };
    let _ = conn.set_nodelay(true);
    let _ = up.set_nodelay(true);
    if up.write_all(&first[..n]).is_err() {
        return;
    }
    let (Ok(c2), Ok(u2)) = (conn.try_clone(), up.try_clone()) else {
        return;
    };
    std::thread::spawn(move || pipe(u2, c2));
    pipe(conn, up);
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing half.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

pub fn attach() -> anyhow::Result<Nova> {
    Nova::attach().context("the novabed's Nova does not answer (`cargo xtask novabed status`)")
}

/// Every compute of the lab runs, is not forced down and is up; then `per_host` servers
/// are booted onto each. Returns the servers' (id, host).
pub fn boot_servers(
    nova: &Nova,
    hosts: usize,
    per_host: usize,
    prefix: &str,
) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for h in 0..hosts {
        nova.ensure_host_ready(h as u32 + 1);
    }
    for h in 0..hosts {
        let host = compute_name(h);
        let ids = nova.boot_on(
            &host,
            per_host,
            &format!("{prefix}{host}"),
            serde_json::json!({}),
        );
        all.extend(ids.into_iter().map(|id| (id, host.clone())));
    }
    all
}

/// The lab host's compute runs again (after a power-on).
pub fn start_compute_if_dead(nova: &Nova, h: usize) {
    let n = h as u32 + 1;
    if nova.compute_pid(n).is_none() {
        nova.start_compute(n);
    }
}

/// `lab down`: the lab's servers deleted, its computes running and not forced down.
pub fn clean_up(hosts: usize, prefix: &str) -> anyhow::Result<()> {
    let nova = attach()?;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        nova.delete_named(prefix);
        for h in 0..hosts {
            nova.ensure_host_ready(h as u32 + 1);
        }
    }));
    result.map_err(|_| anyhow::anyhow!("cleaning up the lab's Nova servers and computes failed"))
}

/// Nova's view of the lab's computes: service state and servers (the lab's, all).
pub fn print_status(hosts: usize, prefix: &str) -> anyhow::Result<()> {
    let nova = attach()?;
    let servers = nova.servers_named("");
    println!("Nova (novabed):");
    for h in 0..hosts {
        let host = compute_name(h);
        let s = nova.service(&host);
        let on: Vec<_> = servers
            .iter()
            .filter(|x| x.host.as_deref() == Some(host.as_str()))
            .collect();
        let ours = on.iter().filter(|x| x.name.starts_with(prefix)).count();
        let active = on.iter().filter(|x| x.status == "ACTIVE").count();
        println!(
            "  {host}: nova-compute {}{}, {} servers ({ours} the lab's, {active} ACTIVE)",
            s.state,
            if s.forced_down { " (forced down)" } else { "" },
            on.len(),
        );
    }
    Ok(())
}

/// The lab's servers on `host` now.
pub fn servers_on(nova: &Nova, prefix: &str, host: &str) -> Vec<String> {
    nova.servers_named(prefix)
        .into_iter()
        .filter(|s| s.host.as_deref() == Some(host))
        .map(|s| s.id)
        .collect()
}

/// Whether every server of `ids` is ACTIVE, settled (no task), on another host than
/// `not_on`.
pub fn all_active_elsewhere(nova: &Nova, prefix: &str, ids: &[String], not_on: &str) -> bool {
    let ss = nova.servers_named(prefix);
    ids.iter().all(|id| {
        ss.iter().any(|s| {
            &s.id == id
                && s.status == "ACTIVE"
                && s.task_state.is_none()
                && s.host.as_deref().is_some_and(|h| h != not_on)
        })
    })
}

/// Waits until Nova has `host`'s compute not forced down and up again.
pub fn wait_compute_back(nova: &Nova, host: &str, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = nova.service(host);
        if !s.forced_down && s.state == "up" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{host}'s nova-compute not back (up, not forced down) within {secs} s: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Where each of `ids` runs now, for the drill's print.
pub fn placement_of(nova: &Nova, prefix: &str, ids: &[String]) -> Vec<Value> {
    nova.servers_named(prefix)
        .into_iter()
        .filter(|s| ids.contains(&s.id))
        .map(
            |s| serde_json::json!({"id": s.id, "name": s.name, "status": s.status, "host": s.host}),
        )
        .collect()
}
