//! "Is the old copy gone?" for RBD disks: before a VM whose disks are RBD images is
//! started elsewhere, its images' watchers are read.
//!
//! Every qemu that opened an image through librbd watches it until it closes it or
//! its client is blocklisted; a qemu killed with SIGKILL keeps its watch for the OSD's
//! `osd_client_watch_timeout` (30 s). So a watcher is the one sign Ceph gives of an old
//! copy that may still write, whatever the fence said (a BMC that answered *off* for a
//! host whose qemus run on):
//!
//! - a watcher from the fenced host's own Ceph address (its `ceph-blocklist` level's
//!   `addresses`) is ended: the host is blocklisted (lifted at its unfence), and the start
//!   waits until the watch is gone;
//! - a watcher from any other address is a copy this controller cannot stop: the start
//!   is refused with the reason (the engine retries, and gives up with `RestoreGaveUp`);
//! - watchers that cannot be read refuse the start too: an unknown is not "gone".
//!
//! It needs a Ceph client: the controller has one only through a `ceph-blocklist` fence
//! level (any host's). Without one, or for a VM without RBD disks, nothing is checked.
use std::sync::Arc;
use std::time::Duration;

use crate::edges::fence::ceph::{address_ip, CephBlocklist};
use crate::edges::fencing::FenceTable;
use crate::engine::HostId;

/// The RBD images (`pool/image`) a domain definition's disks use.
pub fn rbd_images(xml: &str) -> Result<Vec<String>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("type") == Some("network"))
        .filter_map(|d| d.children().find(|c| c.has_tag_name("source")))
        .filter(|s| s.attribute("protocol") == Some("rbd"))
        .filter_map(|s| s.attribute("name"))
        .map(str::to_string)
        .collect())
}

/// The check, built from the fence levels.
pub struct OldCopyCheck {
    table: Arc<FenceTable>,
    /// How long a blocklisted watch may take to go.
    settle: Duration,
}

impl OldCopyCheck {
    /// `None` when no host has a `ceph-blocklist` level (no Ceph client).
    pub fn new(table: Arc<FenceTable>) -> Option<Arc<Self>> {
        let any = table
            .values()
            .flatten()
            .any(|l| l.as_ceph_blocklist().is_some());
        any.then(|| {
            Arc::new(OldCopyCheck {
                table,
                settle: Duration::from_secs(10),
            })
        })
    }

    fn ceph_of(&self, host: &HostId) -> Option<&CephBlocklist> {
        self.table
            .get(host)?
            .iter()
            .find_map(|l| l.as_ceph_blocklist())
    }

    fn any_client(&self) -> &CephBlocklist {
        self.table
            .values()
            .flatten()
            .find_map(|l| l.as_ceph_blocklist())
            .expect("built only with a ceph-blocklist level")
    }

    /// Whether `xml`'s VM, moved off `from`, may start now: `Err` says why not.
    pub async fn before_start(&self, from: &HostId, xml: &str) -> Result<(), String> {
        let images = rbd_images(xml)?;
        if images.is_empty() {
            return Ok(());
        }
        let client = self.ceph_of(from).unwrap_or_else(|| self.any_client());
        let from_level = self.ceph_of(from);
        let deadline = tokio::time::Instant::now() + self.settle;
        let mut blocklisted = false;
        loop {
            let mut ours = Vec::new();
            for spec in &images {
                let watchers = client
                    .image_watchers(spec)
                    .await
                    .map_err(|e| format!("cannot read the watchers of {spec}: {e}"))?;
                for w in watchers {
                    let from_host = address_ip(&w)
                        .is_some_and(|ip| from_level.is_some_and(|l| l.addresses.contains(&ip)));
                    if !from_host {
                        return Err(format!(
                            "{spec} is still open (watched from {w}, not an address of \
                             {from}): another copy may run; not started"
                        ));
                    }
                    ours.push(format!("{spec} {w}"));
                }
            }
            if ours.is_empty() {
                return Ok(());
            }
            let level = from_level.expect("a watcher from its addresses");
            if !blocklisted {
                tracing::error!(%from, watchers = ?ours, "the old copy still holds its RBD images after the fence: blocklisting its host");
                use crate::edges::fence::FenceDriver as _;
                level
                    .fence()
                    .await
                    .map_err(|e| format!("blocklisting {from} for {ours:?}: {e}"))?;
                blocklisted = true;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{from} blocklisted, but {ours:?} still watched after {} s; not started",
                    self.settle.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rbd_images_of_a_definition_are_its_rbd_network_disks() {
        let xml = r#"<domain type='kvm'><name>v</name><devices>
<disk type='file' device='disk'><source file='/var/lib/a.img'/><target dev='vda'/></disk>
<disk type='network' device='disk'><source protocol='rbd' name='volumes/volume-1'><host name='10.0.0.7' port='6789'/></source><target dev='vdb'/></disk>
<disk type='network' device='cdrom'><source protocol='http' name='/iso'/><target dev='sda'/></disk>
</devices></domain>"#;
        assert_eq!(
            rbd_images(xml).unwrap(),
            vec!["volumes/volume-1".to_string()]
        );
        assert!(rbd_images("<domain").is_err());
    }
}
