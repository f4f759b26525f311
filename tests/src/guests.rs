//! Real guests on the project's hostbed: libvirtd (started by `cargo xtask hostbed start`
//! under the project's child subreaper) and KVM guests that are a 512-byte boot sector
//! (`tests/guest/hbguest.S`: one disk-sector write and one `HB-IO <n>` serial line every
//! second, optional ib700 watchdog).
//!
//! [`Hostbed::ensure`] checks that libvirtd answers (under `CI=true` its absence fails the
//! test, elsewhere it is a skip: see [`require_hostbed!`](crate::require_hostbed));
//! [`Guest::start`] defines and starts a domain and waits for its first disk write; a
//! [`Guest`] is destroyed and undefined on drop, its files removed.
//!
//! Where a test needs a real guest kernel, [`LinuxGuest`] runs Debian's kernel with a
//! busybox initramfs (`tests/guest/linux-init.sh`, built by `cargo xtask hostbed start`)
//! under TCG (`<domain type='qemu'>`: this host's PVM-based KVM cannot run a stock Linux
//! kernel), with an ISA pvpanic device and `<on_crash>destroy</on_crash>`, so that a guest
//! kernel panic reads as libvirt's `crashed (panicked)` then `stopped (crashed)`. It says
//! `HB-LINUX-UP` 10–12 s after `virsh start` on a quiet machine, 20–75 s while parallel
//! builds load it (128 MiB, qemu RSS ~190 MB); it writes its disk and prints `HB-IO <n>` once a
//! second as the boot-sector guest does.
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the hostbed keeps its pid files, logs, the built guest image and guests' files.
pub const RUN_DIR: &str = "/run/defib-hostbed";
/// Every domain the project defines is named with this prefix; `hostbed stop` removes them.
pub const GUEST_PREFIX: &str = "dfb-";
pub const LIBVIRT_URI: &str = "qemu:///system";
/// Where the system libvirt's qemu driver writes `NAME.pid`.
pub const QEMU_PID_DIR: &str = "/run/libvirt/qemu";
/// Size of the disks the harness makes.
pub const DISK_SIZE: u64 = 16 << 20;

/// The boot-sector image built by `cargo xtask hostbed start`.
pub fn image_path() -> PathBuf {
    Path::new(RUN_DIR).join("hbguest.bin")
}

/// Where guests' disks and serial logs go (readable by libvirt's qemu user).
pub fn guests_dir() -> PathBuf {
    Path::new(RUN_DIR).join("guests")
}

/// Where `cargo xtask hostbed start` puts the TCG Linux guest's kernel and initramfs.
pub fn linux_dir() -> PathBuf {
    Path::new(RUN_DIR).join("linux")
}

/// The TCG Linux guest's kernel (Debian's, unpacked from its package).
pub fn linux_kernel_path() -> PathBuf {
    linux_dir().join("vmlinuz")
}

/// The TCG Linux guest's busybox initramfs (`/init` is tests/guest/linux-init.sh).
pub fn linux_initrd_path() -> PathBuf {
    linux_dir().join("initrd.gz")
}

/// Runs `virsh -c qemu:///system ARGS` with a deadline; its stdout, or why it failed.
pub fn virsh(args: &[&str], timeout: Duration) -> Result<String, String> {
    run_virsh(LIBVIRT_URI, args, timeout)
}

/// Runs `virsh -c URI ARGS` with a deadline; its stdout, or why it failed.
pub fn run_virsh(uri: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running virsh: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "virsh {} gave no answer within {timeout:?}",
                    args.join(" ")
                ));
            }
            Err(e) => return Err(format!("waiting for virsh: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "virsh {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The running hostbed.
pub struct Hostbed {
    image: Vec<u8>,
}

impl Hostbed {
    /// The hostbed if libvirtd answers and the guest image is built, else why not.
    pub fn ensure() -> Result<Hostbed, String> {
        if !crate::is_root() {
            return Err("root (libvirt's system instance, BPF)".into());
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("/dev/kvm".into());
        }
        if !crate::have_command("virsh") {
            return Err("virsh (run `cargo xtask hostbed start`, which installs libvirt)".into());
        }
        virsh(&["version"], Duration::from_secs(10))
            .map_err(|e| format!("a running libvirtd (`cargo xtask hostbed start`): {e}"))?;
        let image = std::fs::read(image_path()).map_err(|e| {
            format!(
                "the guest image {} (`cargo xtask hostbed start` builds it): {e}",
                image_path().display()
            )
        })?;
        if image.len() != 512 || image[510..] != [0x55, 0xaa] {
            return Err(format!("{} is not a boot sector", image_path().display()));
        }
        Ok(Hostbed { image })
    }

    /// The TCG Linux guest's kernel and initramfs, if `cargo xtask hostbed start` built
    /// them, else why not.
    pub fn linux_images() -> Result<(PathBuf, PathBuf), String> {
        let (kernel, initrd) = (linux_kernel_path(), linux_initrd_path());
        for f in [&kernel, &initrd] {
            let len = std::fs::metadata(f).map(|m| m.len()).map_err(|e| {
                format!(
                    "the TCG Linux guest's {} (`cargo xtask hostbed start` builds it): {e}",
                    f.display()
                )
            })?;
            if len == 0 {
                return Err(format!("{} is empty", f.display()));
            }
        }
        Ok((kernel, initrd))
    }

    /// The 512-byte boot sector.
    pub fn boot_sector(&self) -> &[u8] {
        &self.image
    }

    /// Writes the boot sector at the start of `path` (a file or a block device), leaving
    /// the rest as it is. `wdt_pets` > 0 arms the ib700 watchdog and pets it that many
    /// times (one a second) before it stops.
    pub fn write_boot_sector(&self, path: &Path, wdt_pets: u8) {
        let mut sector = self.image.clone();
        sector[0x1f0] = wdt_pets;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        f.write_all_at(&sector, 0)
            .unwrap_or_else(|e| panic!("write boot sector to {}: {e}", path.display()));
        f.sync_all().expect("sync boot disk");
    }

    /// Makes a new bootable disk image of [`DISK_SIZE`] at `path`.
    pub fn make_boot_disk(&self, path: &Path, format: DiskFormat, wdt_pets: u8) {
        match format {
            DiskFormat::Raw => {
                let f = std::fs::File::create(path)
                    .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
                f.set_len(DISK_SIZE).expect("size disk");
                drop(f);
                self.write_boot_sector(path, wdt_pets);
            }
            DiskFormat::Qcow2 => {
                let raw = path.with_extension("boot-raw.tmp");
                self.make_boot_disk(&raw, DiskFormat::Raw, wdt_pets);
                let out = Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(path)
                    .output()
                    .expect("running qemu-img");
                let _ = std::fs::remove_file(&raw);
                assert!(
                    out.status.success(),
                    "qemu-img convert: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Skips the test (or fails it under `CI=true`) unless the hostbed runs; else evaluates to
/// the [`Hostbed`].
#[macro_export]
macro_rules! require_hostbed {
    () => {
        match $crate::guests::Hostbed::ensure() {
            Ok(hostbed) => hostbed,
            Err(reason) => {
                if $crate::ci() {
                    panic!("this test needs: {reason} (CI=true, so a missing requirement is a failure)");
                }
                eprintln!("SKIP: {reason}");
                return;
            }
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A guest's one disk (virtio, `vda`).
#[derive(Clone, Debug)]
pub enum GuestDisk {
    /// A raw image the harness makes in the run dir (removed with the guest).
    Plain,
    /// As [`GuestDisk::Plain`], with qemu's I/O engine named (`io='threads'`, `'native'`
    /// or `'io_uring'`).
    PlainIo(&'static str),
    /// As [`GuestDisk::Plain`], marked `<shareable/>`: qemu takes no exclusive lock on
    /// it, so a second hypervisor of this machine can run the domain at the same time,
    /// as shared storage without locking lets two hosts do (the stale copy a returning
    /// host starts; qemu's own image lock refuses it on a plain disk).
    Shared,
    /// A block device that already holds a boot disk (e.g. a loop device whose backing
    /// file got [`Hostbed::write_boot_sector`]): `io='threads' cache='none'
    /// error_policy='stop'`, as recipe A of the reference test bed.
    Block(PathBuf),
    /// As [`GuestDisk::Block`], with qemu's other I/O engines: `io='native'` (Linux
    /// AIO: `io_submit` returns at once and the request waits in the block layer) or
    /// `io='io_uring'` (requests on a ring, never through the read/write syscalls).
    BlockWith { dev: PathBuf, io: &'static str },
    /// An image file the caller made with [`Hostbed::make_boot_disk`], e.g. on a FUSE
    /// mount: `cache='none' error_policy='stop'`. qemu runs as root for this one (a FUSE
    /// mount without `allow_other` admits only its owner) and libvirt does not relabel it.
    File { path: PathBuf, format: DiskFormat },
    /// A libvirt `<disk>` the caller wrote, e.g. an RBD network disk
    /// ([`crate::cephbed::RbdImage::libvirt_disk_xml`]) that already holds a boot disk.
    Xml(String),
}

/// What a guest is made of.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// Part of the domain name: `dfb-<name>-<tag>`.
    pub name: String,
    /// The libvirt domain UUID (`-uuid` on qemu's command line).
    pub uuid: String,
    pub disk: GuestDisk,
    /// `Some(action)`: an ib700 watchdog device with this libvirt action (`none`, `pause`,
    /// `reset`, `poweroff`...); the guest arms it only if its disk's boot sector says so.
    pub ib700: Option<String>,
    /// For a [`GuestDisk::Plain`] disk: > 0 makes the guest arm its ib700 watchdog and pet
    /// it this many times (one a second) before it stops, so that it fires.
    pub wdt_pets: u8,
}

/// A running libvirt domain, destroyed and undefined on drop.
pub struct Guest {
    name: String,
    uuid: String,
    /// The libvirt it is defined on, and where that libvirt writes qemu pid files.
    uri: String,
    pid_dir: PathBuf,
    pid: u32,
    serial: PathBuf,
    own_files: Vec<PathBuf>,
    /// The boot disk, for a [`GuestDisk::Plain`] guest.
    plain_disk: Option<PathBuf>,
    /// How long a (re)start may take until the first disk write.
    boot_timeout: Duration,
}

/// The parts of a libvirt domain definition that differ between the guest kinds.
struct DomainXml<'a> {
    /// `kvm` or `qemu` (TCG).
    domain_type: &'a str,
    memory_mib: u32,
    /// The inside of `<os>`.
    os: String,
    /// The inside of `<features>`.
    features: &'a str,
    disk: String,
    /// Devices beyond the disk and the serial port (a watchdog, a panic device).
    extra_devices: String,
    seclabel: &'a str,
}

/// A domain about to be defined: [`Guest::launch`] defines and starts it.
struct Launch {
    name: String,
    uuid: String,
    /// The libvirt to define it on, and where that libvirt writes qemu pid files.
    uri: String,
    pid_dir: PathBuf,
    xml: String,
    xml_path: PathBuf,
    serial: PathBuf,
    own_files: Vec<PathBuf>,
    plain_disk: Option<PathBuf>,
    boot_timeout: Duration,
}

/// A file-backed raw virtio disk (`cache='none' error_policy='stop'`).
fn raw_file_disk_xml(path: &Path) -> String {
    format!(
        "<disk type='file' device='disk'>\
         <driver name='qemu' type='raw' cache='none' error_policy='stop'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        xml_escape(&path.display().to_string())
    )
}

fn domain_xml(name: &str, uuid: &str, serial: &Path, d: &DomainXml) -> String {
    format!(
        "<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>{os}</os>
  <features>{features}</features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disk}
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    {extra}
    <memballoon model='none'/>
  </devices>
  {seclabel}
</domain>
",
        domain_type = d.domain_type,
        uuid = xml_escape(uuid),
        memory = d.memory_mib,
        os = d.os,
        features = d.features,
        disk = d.disk,
        serial = xml_escape(&serial.display().to_string()),
        extra = d.extra_devices,
        seclabel = d.seclabel,
    )
}

/// The domain's name (`dfb-<name>-<tag>`), its serial log (created empty) and XML path,
/// after removing a stale domain with this UUID.
fn prepare(uri: &str, name: &str, uuid: &str) -> (String, PathBuf, PathBuf) {
    let name = format!("{GUEST_PREFIX}{name}-{}", crate::tag());
    let dir = guests_dir();
    std::fs::create_dir_all(&dir).expect("create guests dir");
    remove_stale_domain(uri, uuid);
    let serial = dir.join(format!("{name}.serial.log"));
    std::fs::File::create(&serial).expect("create serial log");
    let xml_path = dir.join(format!("{name}.xml"));
    (name, serial, xml_path)
}

/// A UUID unique to this test process and call (libvirt refuses a second domain with the
/// UUID of a defined one).
pub fn unique_uuid() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "defb0000-{:04x}-4{:03x}-8000-{:012x}",
        std::process::id() & 0xffff,
        N.fetch_add(1, Ordering::Relaxed) & 0xfff,
        nanos & 0xffff_ffff_ffff
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

const VIRSH_WAIT: Duration = Duration::from_secs(30);

impl Guest {
    /// Starts a guest without a watchdog device; see [`Guest::start_spec`].
    pub fn start(name: &str, uuid: &str, disk: GuestDisk) -> Guest {
        Guest::start_spec(GuestSpec {
            name: name.into(),
            uuid: uuid.into(),
            disk,
            ib700: None,
            wdt_pets: 0,
        })
    }

    /// Defines and starts the domain `dfb-<name>-<tag>` (type kvm, 16 MiB, one vCPU, the
    /// boot disk, serial to a log file) and waits until the guest has written its disk
    /// once (`HB-IO` on its serial port).
    pub fn start_spec(spec: GuestSpec) -> Guest {
        Guest::start_spec_on(spec, LIBVIRT_URI, Path::new(QEMU_PID_DIR))
    }

    /// As [`Guest::start_spec`], on the libvirt at `uri` whose qemu driver writes its
    /// pid files to `pid_dir` (e.g. a [`crate::hypervisor::Hypervisor`] of a lab host).
    pub fn start_spec_on(spec: GuestSpec, uri: &str, pid_dir: &Path) -> Guest {
        let hostbed = Hostbed::ensure().unwrap_or_else(|e| panic!("hostbed: {e}"));
        let (name, serial, xml_path) = prepare(uri, &spec.name, &spec.uuid);
        let mut own_files = vec![serial.clone(), xml_path.clone()];

        let mut plain_disk = None;
        let (disk, seclabel) = match &spec.disk {
            GuestDisk::Plain | GuestDisk::Shared | GuestDisk::PlainIo(_) => {
                let path = guests_dir().join(format!("{name}.raw"));
                hostbed.make_boot_disk(&path, DiskFormat::Raw, spec.wdt_pets);
                own_files.push(path.clone());
                plain_disk = Some(path.clone());
                let mut disk = raw_file_disk_xml(&path);
                match spec.disk {
                    GuestDisk::Shared => disk = disk.replace("</disk>", "<shareable/></disk>"),
                    GuestDisk::PlainIo(io) => {
                        disk = disk.replace("cache='none'", &format!("cache='none' io='{io}'"))
                    }
                    _ => {}
                }
                (disk, "")
            }
            GuestDisk::Block(dev) => (
                format!(
                    "<disk type='block' device='disk'>\
                     <driver name='qemu' type='raw' cache='none' io='threads' error_policy='stop'/>\
                     <source dev='{}'/><target dev='vda' bus='virtio'/></disk>",
                    xml_escape(&dev.display().to_string())
                ),
                "",
            ),
            GuestDisk::BlockWith { dev, io } => (
                format!(
                    "<disk type='block' device='disk'>\
                     <driver name='qemu' type='raw' cache='none' io='{io}' error_policy='stop'/>\
                     <source dev='{}'/><target dev='vda' bus='virtio'/></disk>",
                    xml_escape(&dev.display().to_string())
                ),
                "",
            ),
            GuestDisk::Xml(xml) => (xml.clone(), ""),
            GuestDisk::File { path, format } => (
                format!(
                    "<disk type='file' device='disk'>\
                     <driver name='qemu' type='{}' cache='none' error_policy='stop'/>\
                     <source file='{}'/><target dev='vda' bus='virtio'/></disk>",
                    format.as_str(),
                    xml_escape(&path.display().to_string())
                ),
                "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>",
            ),
        };
        let watchdog = spec
            .ib700
            .as_deref()
            .map(|a| format!("<watchdog model='ib700' action='{}'/>", xml_escape(a)))
            .unwrap_or_default();
        let xml = domain_xml(
            &name,
            &spec.uuid,
            &serial,
            &DomainXml {
                domain_type: "kvm",
                memory_mib: 16,
                os: "<type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/>".into(),
                features: "<acpi/>",
                disk,
                extra_devices: watchdog,
                seclabel,
            },
        );
        Guest::launch(Launch {
            name,
            uuid: spec.uuid,
            uri: uri.to_string(),
            pid_dir: pid_dir.to_path_buf(),
            xml,
            xml_path,
            serial,
            own_files,
            plain_disk,
            boot_timeout: Duration::from_secs(30),
        })
    }

    /// Writes the definition, defines and starts the domain and waits for the guest's
    /// first disk write. Every guest kind starts through here (and is cleaned up by the
    /// one [`Drop`]).
    fn launch(l: Launch) -> Guest {
        std::fs::File::create(&l.xml_path)
            .and_then(|mut f| f.write_all(l.xml.as_bytes()))
            .expect("write domain xml");

        // From here on, Drop cleans up whatever was made.
        let mut guest = Guest {
            name: l.name,
            uuid: l.uuid,
            uri: l.uri,
            pid_dir: l.pid_dir,
            pid: 0,
            serial: l.serial,
            own_files: l.own_files,
            plain_disk: l.plain_disk,
            boot_timeout: l.boot_timeout,
        };
        let xml_arg = l.xml_path.display().to_string();
        if let Err(e) = run_virsh(&guest.uri, &["define", &xml_arg], VIRSH_WAIT) {
            panic!("defining {}: {e}\n{}", guest.name, l.xml);
        }
        let started = Instant::now();
        if let Err(e) = run_virsh(&guest.uri, &["start", &guest.name], VIRSH_WAIT) {
            panic!("starting {}: {e}", guest.name);
        }
        guest.pid = guest.pid_from_libvirt();
        guest.wait_first_io("");
        eprintln!(
            "guest {} (qemu pid {}) running, first disk write {:?} after virsh start",
            guest.name,
            guest.pid,
            started.elapsed()
        );
        guest
    }

    /// The qemu pid libvirt wrote for the running domain.
    fn pid_from_libvirt(&self) -> u32 {
        let pidfile = self.pid_dir.join(format!("{}.pid", self.name));
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no qemu pid in {}", pidfile.display()))
    }

    fn wait_first_io(&self, what: &str) {
        if !self.wait_io(1, self.boot_timeout) {
            panic!(
                "{}{what} wrote nothing to its disk within {:?}; serial: {:?}",
                self.name,
                self.boot_timeout,
                std::fs::read_to_string(&self.serial).unwrap_or_default()
            );
        }
    }

    /// Rewrites the boot sector of a [`GuestDisk::Plain`] guest so that its next boot does
    /// not arm the ib700 watchdog (the running guest keeps the boot sector it loaded).
    pub fn disarm_watchdog_for_next_boot(&self) {
        let disk = self
            .plain_disk
            .as_ref()
            .expect("only a Plain-disk guest can be disarmed");
        let hostbed = Hostbed::ensure().unwrap_or_else(|e| panic!("hostbed: {e}"));
        hostbed.write_boot_sector(disk, 0);
    }

    /// Starts the (defined, shut off) domain again with `virsh start`, e.g. after its qemu
    /// was killed, and waits as [`Guest::start_spec`] does for the new qemu's first disk
    /// write; returns the new qemu's pid (also [`Guest::pid`]). Much faster than defining
    /// a new guest; the disk and serial log are reused (the log is emptied first).
    pub fn restart(&mut self) -> u32 {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.serial);
        let started = Instant::now();
        if let Err(e) = run_virsh(&self.uri, &["start", &self.name], VIRSH_WAIT) {
            panic!("starting {} again: {e}", self.name);
        }
        self.pid = self.pid_from_libvirt();
        self.wait_first_io(" (restarted)");
        eprintln!(
            "guest {} (qemu pid {}) running again, first disk write {:?} after virsh start",
            self.name,
            self.pid,
            started.elapsed()
        );
        self.pid
    }

    /// The libvirt domain name (qemu's `-name guest=`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The libvirt URI the guest is defined on.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The qemu process (from `<pid_dir>/<name>.pid`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn serial_log(&self) -> &Path {
        &self.serial
    }

    /// The number of the guest's newest completed disk write (`HB-IO <n>`), 0 if none.
    pub fn io_count(&self) -> u64 {
        let log = std::fs::read(&self.serial).unwrap_or_default();
        String::from_utf8_lossy(&log)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("HB-IO "))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }

    /// Waits until the guest has completed its `n`th disk write.
    pub fn wait_io(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.io_count() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// For a report: every thread of the qemu with its state, wchan and current syscall
    /// (`/proc/PID/task/*/{stat,wchan,syscall}`).
    pub fn threads(&self) -> String {
        let mut out = String::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return out;
        };
        let mut tasks: Vec<_> = tasks.filter_map(Result::ok).map(|e| e.path()).collect();
        tasks.sort();
        for t in tasks {
            let read = |f: &str| {
                std::fs::read_to_string(t.join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let stat = read("stat");
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            let syscall = read("syscall");
            let nr = syscall.split_whitespace().next().unwrap_or("?").to_string();
            out.push_str(&format!(
                "{:>8} {:<16} {} wchan={:<24} syscall={} ({})\n",
                t.file_name().unwrap_or_default().to_string_lossy(),
                read("comm"),
                state,
                read("wchan"),
                nr,
                syscall
            ));
        }
        out
    }
}

/// A Linux guest under TCG (see the module doc): Debian's kernel, the hostbed's busybox
/// initramfs, a raw virtio disk whose first sector is the guest's control line, an ISA
/// pvpanic device, `<on_crash>destroy</on_crash>`. A [`Guest`] (deref) for everything
/// else; destroyed and undefined on drop like any.
pub struct LinuxGuest {
    guest: Guest,
    disk: PathBuf,
}

impl std::ops::Deref for LinuxGuest {
    type Target = Guest;
    fn deref(&self) -> &Guest {
        &self.guest
    }
}

impl std::ops::DerefMut for LinuxGuest {
    fn deref_mut(&mut self) -> &mut Guest {
        &mut self.guest
    }
}

/// The kernel command line: `panic=0` leaves a panicked kernel halted (no reboot), so
/// that libvirt's `<on_crash>` decides what happens to the domain.
const LINUX_CMDLINE: &str = "console=ttyS0 quiet panic=0";
/// TCG boots in ~10 s on an idle machine; a loaded 2-core machine is slower.
const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

impl LinuxGuest {
    /// Defines and starts the domain `dfb-<name>-<tag>` (type qemu, i.e. TCG; 128 MiB,
    /// one vCPU) and waits until its init has written the disk once: `HB-LINUX-UP` then
    /// `HB-IO 1` on its serial port.
    pub fn start(name: &str, uuid: &str) -> LinuxGuest {
        let (kernel, initrd) = Hostbed::linux_images().unwrap_or_else(|e| panic!("hostbed: {e}"));
        let (name, serial, xml_path) = prepare(LIBVIRT_URI, name, uuid);
        let disk = guests_dir().join(format!("{name}.raw"));
        let f = std::fs::File::create(&disk)
            .unwrap_or_else(|e| panic!("create {}: {e}", disk.display()));
        f.set_len(DISK_SIZE).expect("size disk");
        drop(f);
        let own_files = vec![serial.clone(), xml_path.clone(), disk.clone()];
        write_control_sector(&disk, "hb_panic=off");
        let xml = domain_xml(
            &name,
            uuid,
            &serial,
            &DomainXml {
                domain_type: "qemu",
                memory_mib: 128,
                os: format!(
                    "<type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel>\
                     <initrd>{}</initrd><cmdline>{LINUX_CMDLINE}</cmdline>",
                    xml_escape(&kernel.display().to_string()),
                    xml_escape(&initrd.display().to_string()),
                ),
                features: "<acpi/><tcg><tb-cache unit='MiB'>32</tb-cache></tcg>",
                disk: raw_file_disk_xml(&disk),
                extra_devices: "<panic model='isa'/>".into(),
                seclabel: "",
            },
        );
        let guest = Guest::launch(Launch {
            name,
            uuid: uuid.into(),
            uri: LIBVIRT_URI.into(),
            pid_dir: PathBuf::from(QEMU_PID_DIR),
            xml,
            xml_path,
            serial,
            own_files,
            plain_disk: None,
            boot_timeout: LINUX_BOOT_TIMEOUT,
        });
        let linux = LinuxGuest { guest, disk };
        let up = linux.up_line().unwrap_or_else(|| {
            panic!(
                "{} wrote its disk but never said HB-LINUX-UP: {}",
                linux.name(),
                linux.serial_text()
            )
        });
        eprintln!("guest {}: {up}", linux.name());
        linux
    }

    /// Makes the guest panic its kernel: its init reads the disk's control line once a
    /// second, and on `hb_panic=now` rewrites it to `hb_panic=done` (so the next boot
    /// runs on), prints `HB-PANIC-NOW` and crashes the kernel with sysrq `c`.
    pub fn panic_now(&self) {
        write_control_sector(&self.disk, "hb_panic=now");
    }

    /// The disk's control line as it is now (`hb_panic=off|now|done`).
    pub fn control_line(&self) -> String {
        let mut sector = [0u8; 512];
        std::fs::File::open(&self.disk)
            .and_then(|f| f.read_exact_at(&mut sector, 0))
            .unwrap_or_else(|e| panic!("read {}: {e}", self.disk.display()));
        String::from_utf8_lossy(&sector)
            .trim_matches(char::from(0))
            .trim()
            .to_string()
    }

    /// What the serial port has printed since the domain (last) started.
    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.serial_log()).unwrap_or_default()).into_owned()
    }

    /// The init's newest `HB-LINUX-UP ...` line (it names the control line it read at
    /// boot, e.g. `control= hb_panic=done `).
    pub fn up_line(&self) -> Option<String> {
        self.serial_text()
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with("HB-LINUX-UP"))
            .map(|l| l.trim().to_string())
    }

    /// Waits until the serial port has printed a line containing `needle`.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial_text().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The Linux guest's control line in its disk's first sector (the init's disk writes go
/// to the 4 KiB blocks after it).
fn write_control_sector(disk: &Path, line: &str) {
    let mut sector = [0u8; 512];
    let line = format!("{line}\n");
    sector[..line.len()].copy_from_slice(line.as_bytes());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .unwrap_or_else(|e| panic!("open {}: {e}", disk.display()));
    f.write_all_at(&sector, 0)
        .unwrap_or_else(|e| panic!("write the control sector of {}: {e}", disk.display()));
    f.sync_all().expect("sync the disk");
}

/// A domain left behind with this UUID by an earlier run that was killed: removed if it
/// is one of ours, else the test cannot go on.
fn remove_stale_domain(uri: &str, uuid: &str) {
    if let Ok(name) = run_virsh(uri, &["domname", uuid], VIRSH_WAIT) {
        let name = name.trim();
        assert!(
            name.starts_with(GUEST_PREFIX),
            "a domain that is not the tests' ({name}) has UUID {uuid}"
        );
        let _ = run_virsh(uri, &["destroy", name], VIRSH_WAIT);
        let _ = run_virsh(uri, &["undefine", name], VIRSH_WAIT);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // destroy fails when the qemu is already gone (a test killed it): fine.
        let _ = run_virsh(&self.uri, &["destroy", &self.name], VIRSH_WAIT);
        if let Err(e) = run_virsh(&self.uri, &["undefine", &self.name], VIRSH_WAIT) {
            eprintln!("undefine {}: {e}", self.name);
        }
        for f in &self.own_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The argv of a live (not zombie) process, as `xtask hostbed` checks its pids.
fn live_cmdline(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

const LIBVIRTD_EXE: &str = "/usr/sbin/libvirtd";

/// The hostbed's libvirtd as `cargo xtask hostbed start` recorded it: (the
/// `defib-subreaper` pid from `libvirtd.pid`, the libvirtd pid from `libvirtd.child.pid`
/// if it still runs libvirtd), or why not (e.g. a libvirtd somebody started by hand,
/// which the tests never touch).
pub fn hostbed_libvirtd() -> Result<(i32, Option<i32>), String> {
    let pidfile = Path::new(RUN_DIR).join("libvirtd.pid");
    let read = |p: &Path| -> Option<i32> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let sub = read(&pidfile).ok_or_else(|| format!("no pid in {}", pidfile.display()))?;
    let cmdline = live_cmdline(sub).ok_or_else(|| format!("pid {sub} (libvirtd.pid) is gone"))?;
    if !(cmdline
        .first()
        .is_some_and(|a| a.ends_with("defib-subreaper"))
        && cmdline.iter().any(|a| a == LIBVIRTD_EXE))
    {
        return Err(format!(
            "pid {sub} (libvirtd.pid) is not the hostbed's subreaper of libvirtd: {cmdline:?}"
        ));
    }
    let child = read(&Path::new(RUN_DIR).join("libvirtd.child.pid"))
        .filter(|&c| live_cmdline(c).is_some_and(|c| c.first().is_some_and(|a| a == LIBVIRTD_EXE)));
    Ok((sub, child))
}

/// The hostbed's libvirtd, stopped by [`stop_libvirtd`]; started again by
/// [`LibvirtdDown::start`], or on drop (so a failing test leaves it running). Running
/// guests survive: their qemu goes on, and libvirtd reconnects to it when it starts.
#[must_use = "libvirtd is started again when this is dropped"]
pub struct LibvirtdDown {
    started: bool,
}

/// Stops the hostbed's libvirtd by pid, as `cargo xtask hostbed stop` does: SIGTERM to its
/// `defib-subreaper` (which forwards it to libvirtd and exits with it), then waits until
/// both are gone and libvirt no longer answers. virtlogd stays.
pub fn stop_libvirtd() -> Result<LibvirtdDown, String> {
    let (sub, child) = hostbed_libvirtd()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sub),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| format!("SIGTERM to the libvirtd subreaper {sub}: {e}"))?;
    // From here on, the guard starts it again whatever happens.
    let down = LibvirtdDown { started: false };
    let mut pids = vec![sub];
    pids.extend(child);
    let deadline = Instant::now() + VIRSH_WAIT;
    while pids.iter().any(|&p| live_cmdline(p).is_some()) {
        if Instant::now() > deadline {
            return Err(format!(
                "libvirtd (pids {pids:?}) still runs {VIRSH_WAIT:?} after SIGTERM"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("libvirtd stopped (pids {pids:?})");
    Ok(down)
}

/// Starts the hostbed's libvirtd as `cargo xtask hostbed start` does (by running it: it
/// starts what is not running and does nothing when all runs), then waits until
/// `virsh version` answers.
pub fn start_libvirtd() -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    // stdout and stderr to a file, not a pipe: nothing that outlives the command (the
    // daemon it starts) may hold our end open.
    let log_path = Path::new(RUN_DIR).join(format!("test-hostbed-start.{}.log", crate::tag()));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("create {}: {e}", log_path.display()))?;
    let status = Command::new(cargo)
        .args(["xtask", "hostbed", "start"])
        .current_dir(crate::workspace_root())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .status()
        .map_err(|e| format!("running cargo xtask hostbed start: {e}"));
    let out = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let status = status?;
    if !status.success() {
        return Err(format!("cargo xtask hostbed start: {status}\n{out}"));
    }
    let deadline = Instant::now() + VIRSH_WAIT;
    loop {
        match virsh(&["version"], Duration::from_secs(5)) {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "libvirt does not answer after the start: {e}\n{out}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    eprintln!(
        "libvirtd started again, answers {:?} after `cargo xtask hostbed start`",
        started.elapsed()
    );
    Ok(())
}

impl LibvirtdDown {
    /// Starts libvirtd again (see [`start_libvirtd`]).
    pub fn start(mut self) -> Result<(), String> {
        self.started = true;
        start_libvirtd()
    }
}

impl Drop for LibvirtdDown {
    fn drop(&mut self) {
        if !self.started {
            if let Err(e) = start_libvirtd() {
                eprintln!("starting libvirtd again after a failure: {e}");
            }
        }
    }
}

/// Restarts the hostbed's libvirtd by pid: [`stop_libvirtd`], then [`start_libvirtd`].
pub fn restart_libvirtd() -> Result<(), String> {
    stop_libvirtd()?.start()
}
