//! Simulated BMCs for lab hosts: OpenIPMI's `ipmi_sim` serving IPMI 2.0 (RMCP+) on a
//! lab host's management address, user `admin`, password [`BMC_PASSWORD`]. Its chassis
//! power is a file; "power off" first runs the host's power-off hook, which does to the
//! lab host what a power loss does: every process in the host's network namespace is
//! SIGKILLed (its watchdog, its fake qemus) and its links go down at the switch.
//!
//! Adapted from the reference recipe 5 (../shared/testbed/hostbed/recipe-5-ipmi.sh); its
//! pitfall: ipmitool must be given `-C 3` (the default suite 17 is not offered here).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::LabNet;

pub const BMC_USER: &str = "admin";
pub const BMC_PASSWORD: &str = "lab-bmc-secret";
pub const BMC_PORT: u16 = 623;

/// One running ipmi_sim for lab host `host`.
pub struct Bmc {
    pub host: usize,
    pub address: String,
    dir: PathBuf,
    child: Option<Child>,
}

const EMU: &str = "mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
";

/// ipmi_sim's chassis_control program: `chassis.sh get power` prints `power:<0|1>`;
/// `chassis.sh set power 0|1` runs the off/on hook, then records the new state, so the
/// power reads off only once the host's processes are gone.
const CHASSIS: &str = r#"#!/bin/sh
D=$(dirname "$0"); f=$D/power
[ -f "$f" ] || echo 1 > "$f"
op=$1; shift
echo "$(date +%s.%N) $op $*" >> "$D/chassis.log"
case "$op" in
  get) for p in "$@"; do case "$p" in power) echo "power:$(cat "$f")";; *) echo "$p:0";; esac; done;;
  set) while [ $# -ge 2 ]; do p=$1; v=$2; shift 2
         case "$p" in
           power) if [ "$v" = 0 ]; then "$D/off.sh" >> "$D/chassis.log" 2>&1; echo 0 > "$f"
                  else echo 1 > "$f"; fi;;
           reset) "$D/off.sh" >> "$D/chassis.log" 2>&1; echo 1 > "$f";;
         esac; done;;
esac
exit 0
"#;

impl Bmc {
    /// Starts host `host`'s BMC in the lab's BMC namespace (see
    /// [`LabNet::add_bmc_network`]), with `dir` for its files.
    pub fn start(net: &LabNet, host: usize, dir: &Path) -> Bmc {
        let dir = dir.join(format!("bmc-h{host}"));
        std::fs::create_dir_all(dir.join("state")).expect("bmc dir");
        let address = net.bmc_addr(host);
        let _ = std::fs::remove_file(dir.join("power"));
        write_exec(&dir.join("chassis.sh"), CHASSIS);
        // Power loss: the host's processes die and its links go dark.
        let mut off = String::from("#!/bin/sh\n");
        for p in 0..net.paths {
            off.push_str(&format!(
                "ip -n {} link set h{host}-p{p} down\n",
                net.switch_ns()
            ));
        }
        off.push_str(&format!(
            "for p in $(ip netns pids {}); do kill -9 $p && echo \"$(date +%s.%N) killed $p\"; done\n",
            net.host_ns(host)
        ));
        write_exec(&dir.join("off.sh"), &off);
        std::fs::write(dir.join("bmc.emu"), EMU).unwrap();
        let conf = format!(
            r#"name "h{host}"
set_working_mc 0x20
  startlan 1
    addr {address} {BMC_PORT}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcd{host:02x}
  endlan
  chassis_control "{chassis}"
  user 1 true  ""       "test"   user  10 none md2 md5 straight
  user 2 true  "{BMC_USER}"  "{BMC_PASSWORD}" admin 10 none md2 md5 straight
"#,
            chassis = dir.join("chassis.sh").display()
        );
        std::fs::write(dir.join("lan.conf"), conf).unwrap();
        let log = std::fs::File::create(dir.join("ipmi_sim.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &net.bmc_ns(), "ipmi_sim", "-n", "-c"])
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("bmc.emu"))
            .arg("-s")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ipmi_sim (is openipmi installed? cargo xtask fencebed install)");
        let mut bmc = Bmc {
            host,
            address,
            dir,
            child: Some(child),
        };
        bmc.wait_ready(net);
        bmc
    }

    fn wait_ready(&mut self, net: &LabNet) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ipmitool(net, "status").is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "ipmi_sim for h{} exited ({status}): {}",
                    self.host,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim for h{} does not answer: {}",
                self.host,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Also runs `sh` (shell lines) at power off, after the host's processes are killed:
    /// for what belongs to the lab host outside its namespace (e.g. the qemu of a real
    /// guest, which its libvirtd starts in the root namespace).
    pub fn also_on_power_off(&self, sh: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("off.sh"))
            .expect("the power-off hook");
        writeln!(f, "{sh}").expect("extend the power-off hook");
    }

    /// Makes this BMC lie: from now on "power off" does nothing to the host and runs
    /// only `sh` (shell lines), yet the chassis records the power as off, so every
    /// later status says off for a host that stays on. Like many real BMCs it answers
    /// the power-off at once and its power reads off only later: once `sh` is done
    /// (which may `sleep` to say how much later).
    pub fn lie_on_power_off(&self, sh: &str) {
        write_exec(&self.dir.join("off.sh"), &format!("#!/bin/sh\n{sh}\n"));
        let sync = r#"then "$D/off.sh" >> "$D/chassis.log" 2>&1; echo 0 > "$f""#;
        assert!(CHASSIS.contains(sync), "the chassis script changed");
        let later = r#"then ( "$D/off.sh"; echo 0 > "$f" ) >> "$D/chassis.log" 2>&1 &"#;
        write_exec(&self.dir.join("chassis.sh"), &CHASSIS.replace(sync, later));
    }

    /// `ipmitool ... chassis power WHAT` from the controller's namespace.
    pub fn ipmitool(&self, net: &LabNet, what: &str) -> Result<String, String> {
        chassis_power(&net.controller_ns(), &self.address, what)
    }

    /// The ipmi_sim process (its `ip netns exec` execs it), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The chassis power file: "0" off, "1" on.
    pub fn power_file(&self) -> String {
        std::fs::read_to_string(self.dir.join("power"))
            .unwrap_or_else(|_| "1".into())
            .trim()
            .to_string()
    }

    /// What the chassis script did (commands and the hook's kills).
    pub fn chassis_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("chassis.log")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ipmi_sim.log")).unwrap_or_default()
    }

    /// Stops ipmi_sim (the BMC becomes unreachable).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `ipmitool ... chassis power WHAT` against the lab BMC at `address`, run in namespace
/// `ns` (the controller's, which reaches the BMC network).
pub fn chassis_power(ns: &str, address: &str, what: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ipmitool"])
        .args(["-I", "lanplus", "-C", "3", "-H", address])
        .args(["-p", &BMC_PORT.to_string(), "-U", BMC_USER, "-E"])
        .args(["-N", "1", "-R", "1", "chassis", "power", what])
        .env("IPMI_PASSWORD", BMC_PASSWORD)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
