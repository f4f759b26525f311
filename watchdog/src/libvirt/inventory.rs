//! The domain list: what libvirt says runs on this host (pure parts: the disks from a
//! domain's XML, the qemu pid file, what changed across a reconnect, and how the list
//! completes the probes' pid → VM map).
use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::events::{LibvirtDisk, LibvirtVm};
use crate::procfs::VmIdentity;

/// The `<disk>` elements of a domain's XML, in document order.
pub fn parse_disks(xml: &str) -> Result<Vec<LibvirtDisk>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let disks = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.parent().is_some_and(|p| p.has_tag_name("devices")))
        .map(|disk| {
            let mut backing = Vec::new();
            let mut store = child(disk, "backingStore");
            while let Some(s) = store {
                if let Some(src) = child(s, "source").and_then(source_of) {
                    backing.push(src);
                }
                store = child(s, "backingStore");
            }
            LibvirtDisk {
                target: child(disk, "target")
                    .and_then(|t| t.attribute("dev"))
                    .unwrap_or_default()
                    .to_string(),
                device: disk.attribute("device").unwrap_or("disk").to_string(),
                source: child(disk, "source").and_then(source_of),
                backing,
                readonly: child(disk, "readonly").is_some(),
            }
        })
        .collect();
    Ok(disks)
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(tag))
}

/// A `<source>` as one string: the file, device or directory; `pool/volume` for a
/// storage pool volume; `protocol:name` for a network disk (rbd, iscsi, nbd, ...).
fn source_of(source: roxmltree::Node<'_, '_>) -> Option<String> {
    for attr in ["file", "dev", "dir"] {
        if let Some(v) = source.attribute(attr) {
            return Some(v.to_string());
        }
    }
    if let (Some(pool), Some(vol)) = (source.attribute("pool"), source.attribute("volume")) {
        return Some(format!("{pool}/{vol}"));
    }
    match (source.attribute("protocol"), source.attribute("name")) {
        (Some(p), Some(n)) => Some(format!("{p}:{n}")),
        (None, Some(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// The qemu pid libvirt wrote for a running domain, if there is one.
pub fn read_pid(pid_dir: &Path, domain_name: &str) -> Option<u32> {
    // A domain name never contains '/', but a pid file path must not be steered.
    if domain_name.is_empty() || domain_name.contains('/') {
        return None;
    }
    let text = std::fs::read_to_string(pid_dir.join(format!("{domain_name}.pid"))).ok()?;
    text.trim().parse().ok().filter(|pid| *pid > 0)
}

/// One change inferred by comparing the domain lists taken before a disconnect and
/// after the reconnect: (domain, event, detail), as a lifecycle event would name them.
pub type Inferred = (VmIdentity, String, String);

/// What must have happened while the connection was down, domain by domain, in the
/// order libvirt would have reported it. Nothing for a domain that looks the same.
pub fn changes_while_away(before: &[LibvirtVm], after: &[LibvirtVm]) -> Vec<Inferred> {
    let old: HashMap<&str, &LibvirtVm> = before.iter().map(|v| (v.uuid.as_str(), v)).collect();
    let new: HashSet<&str> = after.iter().map(|v| v.uuid.as_str()).collect();
    let mut out = Vec::new();
    let mut push = |vm: &LibvirtVm, event: &str, detail: &str| {
        out.push((vm.identity(), event.to_string(), detail.to_string()))
    };
    for a in after {
        let b = old.get(a.uuid.as_str()).copied();
        if b.is_none() {
            push(a, "defined", "unknown");
        }
        let was_active = b.is_some_and(LibvirtVm::is_active);
        let restarted = was_active
            && a.is_active()
            && matches!((b.and_then(|b| b.pid), a.pid), (Some(p), Some(q)) if p != q);
        if was_active && (!a.is_active() || restarted) {
            let detail = if a.is_active() {
                "unknown"
            } else {
                a.reason.as_str()
            };
            push(a, "stopped", detail);
        }
        if !a.is_active() {
            continue;
        }
        let mut previous = "running";
        if !was_active || restarted {
            // The running reasons that are start details keep their name.
            let detail = match a.reason.as_str() {
                r @ ("booted" | "migrated" | "restored" | "from_snapshot" | "wakeup") => r,
                _ => "unknown",
            };
            push(a, "started", detail);
        } else if let Some(b) = b {
            previous = b.state.as_str();
        }
        match (previous, a.state.as_str()) {
            (p, "paused") if p != "paused" => push(a, "suspended", &a.reason),
            ("paused", "running") => push(a, "resumed", "unknown"),
            (p, "crashed") if p != "crashed" => push(a, "crashed", &a.reason),
            _ => {}
        }
    }
    for b in before {
        if !new.contains(b.uuid.as_str()) {
            if b.is_active() {
                push(b, "stopped", "unknown");
            }
            push(b, "undefined", "unknown");
        }
    }
    out
}

/// qemu pid → VM, for the active domains whose pid is known.
pub fn pid_map(vms: &[LibvirtVm]) -> HashMap<u32, VmIdentity> {
    vms.iter()
        .filter(|v| v.is_active())
        .filter_map(|v| v.pid.map(|pid| (pid, v.identity())))
        .collect()
}

/// How the libvirt list completes the probes' view, given the watched pids and the
/// VM each one's command line named.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Watched pids whose VM the command line did not tell, and libvirt does.
    pub identify: Vec<(u32, VmIdentity)>,
    /// qemu pids of running domains the probes do not watch (their name matched no
    /// pattern, or they were missed): to be watched now.
    pub unwatched: Vec<(u32, VmIdentity)>,
}

pub fn reconcile(
    watched: &HashMap<u32, VmIdentity>,
    libvirt: &HashMap<u32, VmIdentity>,
) -> Reconciliation {
    let mut r = Reconciliation::default();
    for (pid, vm) in libvirt {
        match watched.get(pid) {
            Some(known) if known.is_known() => {}
            Some(_) => r.identify.push((*pid, vm.clone())),
            None => r.unwatched.push((*pid, vm.clone())),
        }
    }
    r.identify.sort_by_key(|(pid, _)| *pid);
    r.unwatched.sort_by_key(|(pid, _)| *pid);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm' id='3'>
  <name>instance-0000002a</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nova/instances/6d1c/disk' index='2'/>
      <backingStore type='file' index='3'>
        <format type='raw'/>
        <source file='/var/lib/nova/instances/_base/abc'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/disk/by-path/ip-10.0.0.5:3260-iscsi-iqn.2010-10.org.openstack:volume-1-lun-0'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='volumes/volume-2'>
        <host name='10.0.0.7' port='6789'/>
      </source>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn disks_come_from_the_domain_xml_with_their_backing_chain() {
        let disks = parse_disks(XML).unwrap();
        assert_eq!(disks.len(), 4);
        assert_eq!(disks[0].target, "vda");
        assert_eq!(
            disks[0].source.as_deref(),
            Some("/var/lib/nova/instances/6d1c/disk")
        );
        assert_eq!(disks[0].backing, vec!["/var/lib/nova/instances/_base/abc"]);
        assert!(disks[1]
            .source
            .as_deref()
            .unwrap()
            .starts_with("/dev/disk/by-path/"));
        assert_eq!(disks[2].source.as_deref(), Some("rbd:volumes/volume-2"));
        assert_eq!(
            (disks[3].device.as_str(), disks[3].source.as_deref()),
            ("cdrom", None)
        );
        assert_eq!(
            disks.iter().map(|d| d.readonly).collect::<Vec<_>>(),
            [false, false, false, true]
        );
    }

    #[test]
    fn a_broken_domain_xml_is_an_error_not_a_panic() {
        assert!(parse_disks("<domain><devices>").is_err());
    }

    #[test]
    fn the_pid_comes_from_libvirts_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("guest-1.pid"), "4242").unwrap();
        std::fs::write(dir.path().join("junk.pid"), "not a pid\n").unwrap();
        assert_eq!(read_pid(dir.path(), "guest-1"), Some(4242));
        assert_eq!(read_pid(dir.path(), "junk"), None);
        assert_eq!(read_pid(dir.path(), "absent"), None);
        assert_eq!(read_pid(dir.path(), "../guest-1"), None);
    }

    fn vm(uuid: &str, state: &str, reason: &str, pid: Option<u32>) -> LibvirtVm {
        LibvirtVm {
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            state: state.into(),
            reason: reason.into(),
            pid,
            disks: vec![],
            definition: None,
        }
    }

    fn names(changes: &[Inferred]) -> Vec<String> {
        changes
            .iter()
            .map(|(v, e, d)| format!("{} {e}/{d}", v.uuid.as_deref().unwrap()))
            .collect()
    }

    #[test]
    fn an_unchanged_host_yields_no_inferred_events() {
        let list = vec![
            vm("a", "running", "booted", Some(10)),
            vm("b", "shutoff", "shutdown", None),
            vm("c", "paused", "ioerror", Some(12)),
        ];
        assert!(changes_while_away(&list, &list).is_empty());
    }

    #[test]
    fn domains_that_stopped_or_vanished_while_away_show_up_as_lifecycle_changes() {
        let before = vec![
            vm("a", "running", "booted", Some(10)),
            vm("b", "running", "booted", Some(11)),
            vm("c", "running", "booted", Some(12)),
            vm("d", "shutoff", "shutdown", None),
            vm("e", "running", "booted", Some(14)),
        ];
        let after = vec![
            vm("a", "shutoff", "crashed", None),
            vm("c", "paused", "ioerror", Some(12)),
            vm("e", "running", "booted", Some(99)),
            vm("f", "running", "booted", Some(15)),
        ];
        assert_eq!(
            names(&changes_while_away(&before, &after)),
            vec![
                "a stopped/crashed",
                "c suspended/ioerror",
                "e stopped/unknown",
                "e started/booted",
                "f defined/unknown",
                "f started/booted",
                "b stopped/unknown",
                "b undefined/unknown",
                "d undefined/unknown",
            ]
        );
    }

    #[test]
    fn the_libvirt_list_names_unidentified_pids_and_finds_unwatched_ones() {
        let list = vec![
            vm("a", "running", "booted", Some(10)),
            vm("b", "running", "booted", Some(11)),
            vm("c", "running", "booted", Some(12)),
            vm("d", "shutoff", "shutdown", None),
        ];
        let libvirt = pid_map(&list);
        assert_eq!(libvirt.len(), 3);
        let watched = HashMap::from([
            (10, list[0].identity()),
            (11, VmIdentity::default()),
            (77, VmIdentity::default()),
        ]);
        let r = reconcile(&watched, &libvirt);
        assert_eq!(r.identify, vec![(11, list[1].identity())]);
        assert_eq!(r.unwatched, vec![(12, list[2].identity())]);
    }
}
