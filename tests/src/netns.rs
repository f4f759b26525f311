//! A small lab network made of namespaces this test creates: one "switch" namespace with a
//! bridge per network path, a controller namespace, and one namespace per host, each with
//! a veth on every path. Only addresses inside these namespaces are used, and everything
//! is deleted on drop.
//!
//! ```text
//!   ctl ns                switch ns                 host ns (one per host)
//!   c0 10.77.P.1 ──veth── br-P ──veth── h0 10.77.P.(10+i)
//! ```
//! `P` is the path index (0 = management, 1 = storage, ...).
use std::process::{Command, Stdio};

use crate::{ip, tag};

pub struct LabNet {
    pub tag: String,
    pub paths: usize,
    pub hosts: usize,
    namespaces: Vec<String>,
}

/// Lab host `host`'s BMC address on the BMC network ([`LabNet::add_bmc_network`]), known
/// before the lab exists (a controller's fence configuration names it).
pub fn bmc_address(host: usize) -> String {
    format!("10.77.0.{}", 100 + host)
}

impl LabNet {
    pub fn new(hosts: usize, paths: usize) -> LabNet {
        let tag = tag();
        let mut net = LabNet {
            tag: tag.clone(),
            paths,
            hosts,
            namespaces: Vec::new(),
        };
        let sw = net.switch_ns();
        let ctl = net.controller_ns();
        let all: Vec<String> = [sw.clone(), ctl.clone()]
            .into_iter()
            .chain((0..hosts).map(|h| net.host_ns(h)))
            .collect();
        for ns in all {
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        for p in 0..paths {
            let br = format!("br{p}");
            ip(&["-n", &sw, "link", "add", &br, "type", "bridge"]);
            ip(&["-n", &sw, "link", "set", &br, "up"]);
            net.plug(
                &ctl,
                &format!("c{p}"),
                &format!("ctl-p{p}"),
                &br,
                &net.controller_addr(p),
            );
            for h in 0..hosts {
                let ns = net.host_ns(h);
                net.plug(
                    &ns,
                    &format!("h{p}"),
                    &format!("h{h}-p{p}"),
                    &br,
                    &net.host_addr(h, p),
                );
            }
        }
        net
    }

    /// A veth pair: `inner` inside `ns` with `addr/24`, `outer` on bridge `br` in the switch.
    fn plug(&self, ns: &str, inner: &str, outer: &str, br: &str, addr: &str) {
        let sw = self.switch_ns();
        ip(&[
            "-n", &sw, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns,
        ]);
        ip(&["-n", &sw, "link", "set", outer, "master", br, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", inner]);
        ip(&["-n", ns, "link", "set", inner, "up"]);
    }

    /// Adds the hosts' BMCs: one namespace holding every host's BMC address
    /// (`10.77.0.(100+i)`), plugged into path 0's bridge by a port of its own, as a
    /// BMC's LAN port is: the controller and the other hosts reach it, and cutting a
    /// host's links does not cut its BMC.
    pub fn add_bmc_network(&mut self) {
        let ns = self.bmc_ns();
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let sw = self.switch_ns();
        ip(&[
            "-n", &sw, "link", "add", "bmc-p0", "type", "veth", "peer", "name", "oob", "netns", &ns,
        ]);
        ip(&["-n", &sw, "link", "set", "bmc-p0", "master", "br0", "up"]);
        for h in 0..self.hosts {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.bmc_addr(h)),
                "dev",
                "oob",
            ]);
        }
        ip(&["-n", &ns, "link", "set", "oob", "up"]);
    }

    pub fn bmc_ns(&self) -> String {
        format!("dfb-{}-bmc", self.tag)
    }

    /// Host `host`'s BMC address (on path 0's network).
    pub fn bmc_addr(&self, host: usize) -> String {
        bmc_address(host)
    }

    pub fn switch_ns(&self) -> String {
        format!("dfb-{}-sw", self.tag)
    }
    pub fn controller_ns(&self) -> String {
        format!("dfb-{}-ctl", self.tag)
    }
    pub fn host_ns(&self, host: usize) -> String {
        format!("dfb-{}-h{host}", self.tag)
    }
    pub fn controller_addr(&self, path: usize) -> String {
        format!("10.77.{path}.1")
    }
    pub fn host_addr(&self, host: usize, path: usize) -> String {
        format!("10.77.{path}.{}", 10 + host)
    }

    /// Cuts (or restores) one host's link on one path, at the switch port.
    pub fn set_link(&self, host: usize, path: usize, up: bool) {
        let port = format!("h{host}-p{path}");
        ip(&[
            "-n",
            &self.switch_ns(),
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ]);
    }

    /// Cuts or restores every path of one host.
    pub fn set_host_links(&self, host: usize, up: bool) {
        for p in 0..self.paths {
            self.set_link(host, p, up);
        }
    }

    /// A command that runs inside namespace `ns` (`ip netns exec` execs it, so the child's
    /// pid is the program's pid).
    pub fn command_in(&self, ns: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// `iptables ARGS` inside namespace `ns` (one of this lab's), panicking with its
    /// stderr if it fails; returns its output. The rules live and die with the
    /// namespace, so a test that fails half-way leaves none behind.
    pub fn iptables(&self, ns: &str, args: &[&str]) -> String {
        assert!(
            self.namespaces.iter().any(|n| n == ns),
            "{ns} is not one of this lab's namespaces"
        );
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "iptables", "-w"])
            .args(args)
            .output()
            .expect("running iptables");
        assert!(
            out.status.success(),
            "iptables {} in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Does `ping` from `ns` reach `addr`?
    pub fn reachable(&self, ns: &str, addr: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
