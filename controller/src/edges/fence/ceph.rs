//! The storage fence: a host's Ceph client addresses put on the OSD blocklist, so that no
//! qemu of that host can write to an RBD image any more, whatever runs on it.
//!
//! Ceph's own rule for a takeover is this one: blocklist the old client before another
//! one opens its image. An OSD refuses every op of a blocklisted address (errno 108,
//! nothing lands) and drops its watches on the next map, so what the fence is verified
//! by is what Ceph enforces, read back after the request:
//!
//! - the attempt exists only once `blocklist add` was acknowledged for every address
//!   (or, for an address, an entry in force for longer than that was there already);
//!   then each address has an entry in `ceph osd blocklist ls`, read after it, that is
//!   in force for at least half of `expire` past the request. Ceph (16.2) keeps an
//!   existing entry's expiry on a second `add`, so an entry that was there before the
//!   attempt and would lapse sooner is removed and added again by the attempt (nothing
//!   of this incident is restored before the fence is verified, so its one-second gap
//!   lets no second copy write);
//! - no image of the configured pools is still watched from one of the addresses
//!   (`rbd status`): a watch that is still there means the OSDs have not applied the
//!   blocklist yet.
//!
//! It stops the host's writes to RBD, not the host: its qemus keep running, and a disk
//! that is not an RBD image is not fenced at all. So a verified blocklist counts alone
//! only where its level says `counts = "alone"`, and the engine then restores only the
//! VMs whose every disk is on RBD. Otherwise it is done (it stops the old copies'
//! writes) but counts only once a later power level is verified too.
//!
//! The unfence lifts it (`blocklist rm`); the engine unfences only a clean host.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::{
    with_retries, Baseline, BoxFuture, CallPolicy, FenceAttempt, FenceDriver, FenceError,
    Invocation, LevelKind,
};
use crate::engine::{FenceVerifier, Source, Verdict};

/// One host's storage fence on one Ceph cluster.
#[derive(Debug, Clone)]
pub struct CephBlocklist {
    /// The host's addresses on Ceph's public network, as its clients connect from them.
    pub addresses: Vec<IpAddr>,
    /// Pools whose images are checked for watchers from those addresses.
    pub pools: Vec<String>,
    /// The `ceph` and `rbd` programs.
    pub ceph: String,
    pub rbd: String,
    /// Put before every command's own arguments: `--conf`, `--id`, `--keyring`.
    pub common_args: Vec<String>,
    /// How long an entry lasts if nobody lifts it (Ceph's `expire`).
    pub expire: Duration,
    /// Counts alone (for VMs whose every disk is on RBD), or only with a power fence.
    pub counts_alone: bool,
    pub policy: CallPolicy,
}

/// One entry of `ceph osd blocklist ls --format json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
struct BlocklistEntry {
    addr: String,
    #[serde(default)]
    until: String,
}

#[derive(Debug, Deserialize)]
struct RbdStatus {
    #[serde(default)]
    watchers: Vec<Watcher>,
}

#[derive(Debug, Deserialize)]
struct Watcher {
    address: String,
}

/// The blocklist entry that covers every client of `ip` (any port, any nonce).
pub fn entry_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:0/0"),
        IpAddr::V6(v6) => format!("[{v6}]:0/0"),
    }
}

/// The IP of a Ceph entity address (`10.0.0.5:0/2051715134`, `v1:10.0.0.5:6800/12`,
/// `[::1]:0/7`).
pub fn address_ip(addr: &str) -> Option<IpAddr> {
    let addr = addr
        .strip_prefix("v1:")
        .or_else(|| addr.strip_prefix("v2:"))
        .unwrap_or(addr);
    let addr = addr.split('/').next()?;
    let (host, _port) = addr.rsplit_once(':')?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// An entry's expiry as `blocklist ls` prints it (`2026-12-07T16:43:16.065632+0000`).
pub fn parse_until(text: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond][offset_hour sign:mandatory][offset_minute]"
    );
    time::OffsetDateTime::parse(text, format)
        .ok()
        .map(SystemTime::from)
}

/// `ceph osd blocklist ls --format json`: the address list comes first; Pacific prints
/// the range blocklist (a second list) right after it.
fn parse_blocklist(text: &str) -> Result<Vec<BlocklistEntry>, FenceError> {
    serde_json::Deserializer::from_str(text.trim())
        .into_iter::<Vec<BlocklistEntry>>()
        .next()
        .unwrap_or(Ok(Vec::new()))
        .map_err(|e| FenceError::Unexpected {
            program: "ceph osd blocklist ls".into(),
            detail: format!("{e}: {}", text.trim()),
        })
}

impl CephBlocklist {
    async fn run(&self, program: &str, args: &[&str]) -> Result<String, FenceError> {
        let inv = Invocation {
            program: program.to_string(),
            args: self
                .common_args
                .iter()
                .cloned()
                .chain(args.iter().map(|a| a.to_string()))
                .collect(),
            ..Default::default()
        };
        with_retries(self.policy, || async {
            let out = inv.run_once(self.policy.timeout).await?;
            if out.code == Some(0) {
                Ok(out.stdout)
            } else {
                Err(FenceError::Failed {
                    program: format!("{program} {}", args.join(" ")),
                    status: out.status(),
                    detail: out.detail(),
                })
            }
        })
        .await
    }

    /// This host's entries now: entry address → expiry.
    async fn entries(&self) -> Result<BTreeMap<String, String>, FenceError> {
        let text = self
            .run(&self.ceph, &["osd", "blocklist", "ls", "--format", "json"])
            .await?;
        let all = parse_blocklist(&text)?;
        let ours: Vec<String> = self.addresses.iter().map(|a| entry_for(*a)).collect();
        Ok(all
            .into_iter()
            .filter(|e| ours.contains(&e.addr))
            .map(|e| (e.addr, e.until))
            .collect())
    }

    /// Every watcher's address on the image `spec` (`pool/image`); none for an image
    /// that does not exist.
    pub async fn image_watchers(&self, spec: &str) -> Result<Vec<String>, FenceError> {
        let text = match self
            .run(&self.rbd, &["status", spec, "--format", "json"])
            .await
        {
            Ok(t) => t,
            Err(FenceError::Failed { detail, .. })
                if detail.contains("No such file or directory") =>
            {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let status: RbdStatus =
            serde_json::from_str(text.trim()).map_err(|e| FenceError::Unexpected {
                program: "rbd status".into(),
                detail: format!("{e}: {}", text.trim()),
            })?;
        Ok(status.watchers.into_iter().map(|w| w.address).collect())
    }

    /// Watchers from this host's addresses on the pools' images, as `pool/image addr`.
    async fn our_watchers(&self) -> Result<Vec<String>, FenceError> {
        let mut found = Vec::new();
        for pool in &self.pools {
            let text = self
                .run(&self.rbd, &["ls", "--pool", pool, "--format", "json"])
                .await?;
            let images: Vec<String> =
                serde_json::from_str(text.trim()).map_err(|e| FenceError::Unexpected {
                    program: "rbd ls".into(),
                    detail: format!("{e}: {}", text.trim()),
                })?;
            for image in images {
                let spec = format!("{pool}/{image}");
                for w in self.image_watchers(&spec).await? {
                    if address_ip(&w).is_some_and(|ip| self.addresses.contains(&ip)) {
                        found.push(format!("{spec} {w}"));
                    }
                }
            }
        }
        Ok(found)
    }
}

impl FenceDriver for CephBlocklist {
    fn describe(&self) -> String {
        let addrs: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        format!("ceph-blocklist {}", addrs.join(","))
    }

    fn fence(&self) -> BoxFuture<'_, Result<FenceAttempt, FenceError>> {
        Box::pin(async move {
            let requested_at = SystemTime::now();
            let before = self.entries().await?;
            let expire = self.expire.as_secs().to_string();
            let wanted_until = requested_at + self.expire / 2;
            for ip in &self.addresses {
                let entry = entry_for(*ip);
                if let Some(until) = before.get(&entry) {
                    if parse_until(until).is_some_and(|u| u >= wanted_until) {
                        continue;
                    }
                    // A second add would keep its expiry: a fresh entry instead.
                    self.run(&self.ceph, &["osd", "blocklist", "rm", &entry])
                        .await?;
                }
                self.run(&self.ceph, &["osd", "blocklist", "add", &entry, &expire])
                    .await?;
            }
            Ok(FenceAttempt {
                requested_at,
                baseline: Baseline::Blocklist(before),
            })
        })
    }

    fn is_fenced<'a>(
        &'a self,
        attempt: &'a FenceAttempt,
    ) -> BoxFuture<'a, Result<bool, FenceError>> {
        Box::pin(async move {
            if !matches!(attempt.baseline, Baseline::Blocklist(_)) {
                return Err(FenceError::Unexpected {
                    program: self.describe(),
                    detail: "asked to verify an attempt that did not blocklist".into(),
                });
            }
            let wanted_until = attempt.requested_at + self.expire / 2;
            let now = self.entries().await?;
            let all_in_force = self.addresses.iter().all(|ip| {
                now.get(&entry_for(*ip))
                    .and_then(|until| parse_until(until))
                    .is_some_and(|u| u >= wanted_until)
            });
            if !all_in_force {
                return Ok(false);
            }
            let left = self.our_watchers().await?;
            if !left.is_empty() {
                tracing::info!(watchers = ?left, "blocklisted, but still watching images");
            }
            Ok(left.is_empty())
        })
    }

    /// A blocklist says nothing about whether the host is alive.
    fn verdict(&self) -> BoxFuture<'_, Result<Verdict, FenceError>> {
        Box::pin(async { Ok(Verdict::Unknown) })
    }

    fn verifier(&self) -> FenceVerifier {
        FenceVerifier::CephBlocklist
    }

    fn source(&self) -> Source {
        Source::Ceph
    }

    fn kind(&self) -> LevelKind {
        LevelKind::Storage {
            counts_alone: self.counts_alone,
        }
    }

    fn as_ceph_blocklist(&self) -> Option<&CephBlocklist> {
        Some(self)
    }

    fn lift(&self) -> BoxFuture<'_, Result<Vec<String>, FenceError>> {
        Box::pin(async move {
            let mut removed = Vec::new();
            for ip in &self.addresses {
                let entry = entry_for(*ip);
                self.run(&self.ceph, &["osd", "blocklist", "rm", &entry])
                    .await?;
                removed.push(format!("ceph osd blocklist rm {entry}"));
            }
            Ok(removed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_addresses_of_every_form_give_their_ip() {
        let ip = |s: &str| address_ip(s).map(|a| a.to_string());
        assert_eq!(ip("127.0.0.10:0/2051715134").as_deref(), Some("127.0.0.10"));
        assert_eq!(ip("v1:10.0.0.5:6800/12").as_deref(), Some("10.0.0.5"));
        assert_eq!(ip("[::1]:0/7").as_deref(), Some("::1"));
        assert_eq!(ip("garbage"), None);
    }

    #[test]
    fn the_blocklist_listing_is_read_up_to_the_range_list_that_follows_it() {
        let text = r#"[{"addr":"127.0.0.10:0/0","until":"2026-12-07T16:10:57.010706+0000"}][]"#;
        let all = parse_blocklist(text).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].addr, "127.0.0.10:0/0");
        assert!(parse_blocklist("").unwrap().is_empty());
        assert!(parse_blocklist("listed 3 entries").is_err());
    }

    #[test]
    fn an_entrys_expiry_is_read_as_ceph_prints_it() {
        let t = parse_until("2026-12-07T16:43:16.065632+0000").unwrap();
        let unix = t.duration_since(std::time::UNIX_EPOCH).unwrap();
        assert_eq!(unix.as_secs(), 1_796_661_796);
        assert_eq!(parse_until("2026-12-07 16:43"), None);
    }

    #[test]
    fn an_entry_covers_every_client_of_the_address() {
        assert_eq!(entry_for("10.0.0.5".parse().unwrap()), "10.0.0.5:0/0");
        assert_eq!(entry_for("fd00::5".parse().unwrap()), "[fd00::5]:0/0");
    }
}
