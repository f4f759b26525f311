//! A corosync 3 (knet) + Pacemaker 2.1 cluster of lab hosts: each lab host's network
//! namespace runs its own node (in a private mount and UTS namespace too, for the paths
//! corosync and Pacemaker hard-code: /var/lib/pacemaker, /etc/corosync, /run, and the
//! host name = the node name = the lab host id `h<i>`), on the host's path-0 address.
//! Fencing is `fence_ipmilan` against the lab hosts' ipmi_sim BMCs ([`crate::bmc`]).
//!
//! Adapted from the reference recipe 4 (../shared/testbed/hostbed/recipe-4-pacemaker.sh)
//! with its pitfalls: Pacemaker's IPC is abstract unix sockets, so `ip netns exec NS
//! crm_mon` from outside the node's mount namespace works; `stonith_admin --history`
//! needs `--verbose` to list more than the newest event per node.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::LabNet;

/// Runs inside `ip netns exec NS unshare -m -u --propagation private`:
/// `node-run.sh DIR NAME TOKEN_MS ADDR...` (ADDR: every node's ring0 address, in node id
/// order; NAME's own is the one of node id = its index + 1).
const NODE_RUN: &str = r#"#!/bin/bash
D=$1; NAME=$2; TOKEN=$3; shift 3
hostname "$NAME"
for d in lib-pacemaker/cib lib-pacemaker/pengine lib-pacemaker/blackbox lib-pacemaker/cores lib-corosync etc-corosync log-pacemaker log-cluster run; do mkdir -p $D/$d; done
chown -R hacluster:haclient $D/lib-pacemaker $D/log-pacemaker; chmod 750 $D/lib-pacemaker/*
mount --bind $D/lib-pacemaker /var/lib/pacemaker
mount --bind $D/lib-corosync /var/lib/corosync
mount --bind $D/etc-corosync /etc/corosync
mkdir -p /var/log/pacemaker /var/log/cluster
mount --bind $D/log-pacemaker /var/log/pacemaker
mount --bind $D/log-cluster /var/log/cluster
mount --bind $D/run /run
mkdir -p /run/crm /run/lock; chown hacluster:haclient /run/crm; ln -sfn /dev/shm /run/shm
{
printf 'totem {\n version: 2\n cluster_name: defiblab\n transport: knet\n crypto_cipher: none\n crypto_hash: none\n token: %s\n}\nnodelist {\n' "$TOKEN"
id=0
for a in "$@"; do printf ' node {\n  ring0_addr: %s\n  name: h%s\n  nodeid: %s\n }\n' "$a" "$id" "$((id+1))"; id=$((id+1)); done
printf '}\nquorum {\n provider: corosync_votequorum\n}\nlogging {\n to_logfile: yes\n logfile: /var/log/cluster/corosync.log\n to_stderr: no\n to_syslog: no\n timestamp: hires\n}\n'
} > /etc/corosync/corosync.conf
corosync -f > $D/corosync.stdout 2>&1 &
echo $! > $D/corosync.pid
for k in $(seq 1 50); do corosync-cfgtool -s >/dev/null 2>&1 && break; sleep 0.1; done
PCMK_logfile=/var/log/pacemaker/pacemaker.log pacemakerd > $D/pacemakerd.stdout 2>&1 &
echo $! > $D/pacemakerd.pid
wait
"#;

/// The cluster; every process it started is killed on drop.
pub struct Cluster {
    dir: PathBuf,
    /// Each node's namespace.
    namespaces: Vec<String>,
    runners: Vec<Child>,
}

impl Cluster {
    /// Starts a node on every lab host and waits until `crm_mon` on h0 lists them all
    /// online. `token_ms` is corosync's `totem.token`.
    pub fn start(net: &LabNet, dir: &Path, token_ms: u64) -> Cluster {
        let dir = dir.join("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("node-run.sh");
        std::fs::write(&script, NODE_RUN).unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let addrs: Vec<String> = (0..net.hosts).map(|h| net.host_addr(h, 0)).collect();
        let mut cluster = Cluster {
            dir: dir.clone(),
            namespaces: (0..net.hosts).map(|h| net.host_ns(h)).collect(),
            runners: Vec::new(),
        };
        for h in 0..net.hosts {
            let ndir = dir.join(format!("n{h}"));
            std::fs::create_dir_all(&ndir).unwrap();
            let out = std::fs::File::create(dir.join(format!("node{h}.out"))).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &net.host_ns(h)])
                .args(["unshare", "-m", "-u", "--propagation", "private"])
                .arg(&script)
                .arg(&ndir)
                .arg(format!("h{h}"))
                .arg(token_ms.to_string())
                .args(&addrs)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("start a cluster node");
            cluster.runners.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let xml = cluster.crm_mon();
            let online = xml.matches("online=\"true\"").count();
            if online == net.hosts {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not come up: {xml}\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        cluster
    }

    /// Runs `program args` in node `h`'s namespace; stdout, or stderr on failure.
    pub fn run_on(&self, h: usize, program: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[h], program])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{program} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `crm_mon -1 --output-as=xml` on h0 (empty when it does not answer).
    pub fn crm_mon(&self) -> String {
        self.run_on(0, "crm_mon", &["-1", "--output-as=xml"])
            .unwrap_or_default()
    }

    /// `stonith_admin --history NODE --verbose --output-as=xml` on h0.
    pub fn history(&self, node: &str) -> String {
        self.run_on(
            0,
            "stonith_admin",
            &["--history", node, "--verbose", "--output-as=xml"],
        )
        .unwrap_or_default()
    }

    /// One `fence_ipmilan` stonith device per node (never run on the node it fences),
    /// then waits until every device is started.
    pub fn configure_ipmi_fencing(&self, net: &LabNet, user: &str, password: &str) {
        for h in 0..net.hosts {
            let id = format!("fence-h{h}");
            let nv = |name: &str, value: &str| {
                format!(r#"<nvpair id="{id}-{name}" name="{name}" value="{value}"/>"#)
            };
            let attrs = [
                nv("ip", &net.bmc_addr(h)),
                nv("ipport", "623"),
                nv("username", user),
                nv("password", password),
                nv("lanplus", "1"),
                nv("cipher", "3"),
                nv("power_wait", "0"),
                nv("pcmk_host_list", &format!("h{h}")),
            ]
            .concat();
            let primitive = format!(
                r#"<primitive id="{id}" class="stonith" type="fence_ipmilan"><instance_attributes id="{id}-ia">{attrs}</instance_attributes><operations><op id="{id}-mon" name="monitor" interval="60s"/></operations></primitive>"#
            );
            self.run_on(
                0,
                "cibadmin",
                &["--create", "-o", "resources", "--xml-text", &primitive],
            )
            .expect("add a stonith device");
            let location =
                format!(r#"<rsc_location id="l-{id}" rsc="{id}" node="h{h}" score="-INFINITY"/>"#);
            self.run_on(
                0,
                "cibadmin",
                &["--create", "-o", "constraints", "--xml-text", &location],
            )
            .expect("add a location constraint");
        }
        self.run_on(
            0,
            "crm_attribute",
            &[
                "--type",
                "crm_config",
                "--name",
                "stonith-timeout",
                "--update",
                "60s",
            ],
        )
        .expect("stonith-timeout");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let xml = self.crm_mon();
            let started = xml
                .lines()
                .filter(|l| l.contains("<resource id=\"fence-h") && l.contains("role=\"Started\""))
                .count();
            if started == net.hosts {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stonith devices not started: {xml}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in 0..self.namespaces.len() {
            for f in [
                "node{h}.out",
                "n{h}/corosync.stdout",
                "n{h}/pacemakerd.stdout",
            ] {
                let p = self.dir.join(f.replace("{h}", &h.to_string()));
                s.push_str(&format!(
                    "--- {}\n{}\n",
                    p.display(),
                    std::fs::read_to_string(&p).unwrap_or_default()
                ));
            }
        }
        s
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `pid` and every process below it.
fn tree(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let ppid = std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")?
                            .1
                            .split_whitespace()
                            .nth(1)?
                            .parse::<i32>()
                            .ok()
                    });
                if ppid == Some(parent) && !all.contains(&p) {
                    all.push(p);
                }
            }
        }
        i += 1;
    }
    all
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A test cluster holds nothing worth a graceful stop: SIGKILL each node's
        // processes (pacemakerd's children, corosync) and the runners.
        for h in 0..self.namespaces.len() {
            let n = self.dir.join(format!("n{h}"));
            for f in ["pacemakerd.pid", "corosync.pid"] {
                if let Some(pid) = read_pid(&n.join(f)) {
                    // The parent first: pacemakerd respawns a child that dies.
                    for p in tree(pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(p),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        for r in &mut self.runners {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}
