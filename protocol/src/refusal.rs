//! The refusal datagram (controller → watchdog, UDP): "I do not take the layout version
//! of the datagram you sent; these are the versions I take". A controller sends it in
//! answer to a heartbeat of a version it does not decode, so that a watchdog of another
//! version hears why it is not acked instead of silence, and logs it as an error.
//!
//! Layout (offsets in bytes):
//!
//! ```text
//!  0   4  magic "DFIB"
//!  4   1  refusal layout version (1)
//!  5   1  kind (4 = refusal)
//!  6   1  the kind of the datagram refused (1 = heartbeat)
//!  7   1  the layout version that datagram carried
//!  8   1  N = how many versions of that kind the sender takes (1..=16)
//!  9   N  those versions, ascending
//! ```
//!
//! # Frozen, so that any two versions understand each other
//!
//! Every build, past and future, sends and reads bytes 0..9+N exactly as above; a later
//! layout may only append bytes after them, which [`decode_refusal`] ignores, and it
//! takes any refusal layout version from 1 up. So whatever the next heartbeat version,
//! a watchdog of this build told "no" by a newer controller (or the other way round)
//! can say which version was refused and which ones the controller takes.
//!
//! # Unauthenticated, small, and rate-limited
//!
//! A refusal carries no MAC: the controller cannot verify a datagram it cannot decode,
//! and has no way to know the key of a layout it does not speak. So a refusal is only
//! ever logged by a watchdog and changes nothing else (anyone can forge one). It is
//! always shorter than the datagram that caused it ([`refusal_for`] returns nothing
//! otherwise; a heartbeat of any version is several times longer), and a controller
//! sends at most one per source address per second, so spoofing a victim's address gets
//! the victim fewer and smaller datagrams than the spoofer sent: no amplification.

use crate::error::DecodeError;
use crate::heartbeat::{HEARTBEAT_VERSIONS, KIND_HEARTBEAT};
use crate::ids::{check_host_id, MAX_HOST_ID_LEN};
use crate::wire::{self, Reader};
use crate::MAGIC;

/// Kind byte of a refusal.
pub const KIND_REFUSAL: u8 = 4;

/// The refusal layout this build sends. It takes any from 1 up (see the module docs).
pub const REFUSAL_VERSION: u8 = 1;

/// At most this many versions are listed.
pub const MAX_REFUSAL_VERSIONS: usize = 16;

/// A decoded refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal<'a> {
    /// The kind of datagram refused ([`KIND_HEARTBEAT`]).
    pub refused_kind: u8,
    /// The layout version it carried.
    pub refused_version: u8,
    /// The versions of that kind the sender takes, ascending.
    pub accepted_versions: &'a [u8],
}

impl Refusal<'_> {
    /// Appends the datagram to `out` after clearing it. At most
    /// [`MAX_REFUSAL_VERSIONS`] versions are written.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let versions = self
            .accepted_versions
            .get(..MAX_REFUSAL_VERSIONS)
            .unwrap_or(self.accepted_versions);
        out.clear();
        wire::put_preamble_of(out, REFUSAL_VERSION, KIND_REFUSAL);
        out.push(self.refused_kind);
        out.push(self.refused_version);
        // At most 16, checked above.
        out.push(u8::try_from(versions.len()).unwrap_or(0));
        out.extend_from_slice(versions);
    }
}

impl std::fmt::Display for Refusal<'_> {
    /// "heartbeat version 3 refused; the controller takes version 4", as a watchdog
    /// logs it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.refused_kind {
            KIND_HEARTBEAT => "heartbeat".to_string(),
            kind => format!("datagram kind {kind}"),
        };
        let list: Vec<String> = self
            .accepted_versions
            .iter()
            .map(|v| v.to_string())
            .collect();
        let takes = match list.len() {
            0 => "none".to_string(),
            1 => format!("version {}", list[0]),
            _ => format!("versions {}", list.join(", ")),
        };
        write!(
            f,
            "{what} version {} refused; the peer takes {takes}",
            self.refused_version
        )
    }
}

/// Decodes a refusal. Never panics, never allocates; ignores bytes after the version
/// list (a later refusal layout may append some) and takes any refusal layout version
/// from 1 up.
pub fn decode_refusal(datagram: &[u8]) -> Result<Refusal<'_>, DecodeError> {
    let have = datagram.len().min(MAGIC.len());
    if datagram.get(..have) != MAGIC.get(..have) {
        return Err(DecodeError::BadMagic);
    }
    let mut r = Reader::new(datagram);
    r.take(MAGIC.len())?;
    let version = r.u8()?;
    let kind = r.u8()?;
    if kind != KIND_REFUSAL {
        return Err(DecodeError::WrongKind {
            found: kind,
            expected: KIND_REFUSAL,
        });
    }
    if version == 0 {
        return Err(DecodeError::UnsupportedVersion(0));
    }
    let refused_kind = r.u8()?;
    let refused_version = r.u8()?;
    let n = usize::from(r.u8()?);
    if n == 0 || n > MAX_REFUSAL_VERSIONS {
        return Err(DecodeError::Malformed(
            "refusal lists no versions, or too many",
        ));
    }
    let accepted_versions = r.take(n)?;
    Ok(Refusal {
        refused_kind,
        refused_version,
        accepted_versions,
    })
}

/// What a controller knows of a heartbeat datagram whose version it does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedHeartbeat<'a> {
    /// The layout version it carries.
    pub version: u8,
    /// The host id it claims, read where the known older layouts (1 to 3) and this
    /// one put it; unauthenticated (the MAC cannot be checked), for logs only. None
    /// for an unknown layout or one too short to hold it.
    pub claimed_host_id: Option<&'a str>,
}

/// Where the known heartbeat layouts put the cluster id's length byte (the host id
/// follows the cluster id): version 1, 2, 3, 4.
const CLUSTER_ID_AT: [(u8, usize); 4] =
    [(1, 72), (2, 85), (3, 93), (4, crate::heartbeat::FIXED_LEN)];

/// If `datagram` is a heartbeat (our magic, the heartbeat kind) of a version this build
/// does not take, what it carries and the refusal to answer it with (written to `out`,
/// after clearing it); None for anything else. The refusal is written only if it is
/// shorter than `datagram` (see the module docs); `out` is left empty otherwise.
pub fn refusal_for<'a>(datagram: &'a [u8], out: &mut Vec<u8>) -> Option<RefusedHeartbeat<'a>> {
    out.clear();
    match wire::check_preamble_of(datagram, KIND_HEARTBEAT, &HEARTBEAT_VERSIONS) {
        Err(DecodeError::UnsupportedVersion(_) | DecodeError::OldVersion(_)) => {}
        _ => return None,
    }
    let version = *datagram.get(4)?;
    let claimed_host_id = CLUSTER_ID_AT
        .iter()
        .find(|(v, _)| *v == version)
        .and_then(|(_, at)| claimed_host_id(datagram, *at));
    let refusal = Refusal {
        refused_kind: KIND_HEARTBEAT,
        refused_version: version,
        accepted_versions: &HEARTBEAT_VERSIONS,
    };
    refusal.encode_into(out);
    if out.len() >= datagram.len() {
        out.clear();
    }
    Some(RefusedHeartbeat {
        version,
        claimed_host_id,
    })
}

/// The host id after the cluster id whose length byte is at `cluster_at`, if it is a
/// valid id.
fn claimed_host_id(datagram: &[u8], cluster_at: usize) -> Option<&str> {
    let cluster_len = usize::from(*datagram.get(cluster_at)?);
    let host_at = cluster_at.checked_add(1)?.checked_add(cluster_len)?;
    let host_len = usize::from(*datagram.get(host_at)?);
    if host_len > MAX_HOST_ID_LEN {
        return None;
    }
    let bytes = datagram.get(host_at + 1..host_at + 1 + host_len)?;
    let host = std::str::from_utf8(bytes).ok()?;
    check_host_id(host).ok()?;
    Some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_magic_version_kind_then_what_was_refused_and_what_is_taken() {
        let mut out = Vec::new();
        Refusal {
            refused_kind: KIND_HEARTBEAT,
            refused_version: 3,
            accepted_versions: &[4],
        }
        .encode_into(&mut out);
        assert_eq!(out, [b'D', b'F', b'I', b'B', 1, 4, 1, 3, 1, 4]);
        let back = decode_refusal(&out).unwrap();
        assert_eq!(
            (
                back.refused_kind,
                back.refused_version,
                back.accepted_versions
            ),
            (1, 3, &[4u8][..])
        );
        assert_eq!(
            back.to_string(),
            "heartbeat version 3 refused; the peer takes version 4"
        );
    }

    #[test]
    fn a_later_refusal_layout_with_appended_bytes_is_still_understood() {
        let later = [b'D', b'F', b'I', b'B', 7, 4, 1, 4, 2, 5, 6, 0xee, 0xff];
        let back = decode_refusal(&later).unwrap();
        assert_eq!(back.refused_version, 4);
        assert_eq!(back.accepted_versions, [5, 6]);
        assert_eq!(
            back.to_string(),
            "heartbeat version 4 refused; the peer takes versions 5, 6"
        );
    }

    #[test]
    fn a_refusal_that_lists_nothing_or_is_cut_short_is_refused_without_panicking() {
        let good = [b'D', b'F', b'I', b'B', 1, 4, 1, 3, 1, 4];
        for len in 0..good.len() {
            assert!(decode_refusal(&good[..len]).is_err(), "cut at {len}");
        }
        let none = [b'D', b'F', b'I', b'B', 1, 4, 1, 3, 0];
        assert!(matches!(
            decode_refusal(&none),
            Err(DecodeError::Malformed(_))
        ));
        let mut too_many = vec![b'D', b'F', b'I', b'B', 1, 4, 1, 3, 17];
        too_many.extend([0; 17]);
        assert!(decode_refusal(&too_many).is_err());
        assert_eq!(
            decode_refusal(&[b'D', b'F', b'I', b'B', 0, 4, 1, 3, 1, 4]),
            Err(DecodeError::UnsupportedVersion(0))
        );
        assert!(matches!(
            decode_refusal(&[b'D', b'F', b'I', b'B', 3, 2, 0, 0]),
            Err(DecodeError::WrongKind { found: 2, .. })
        ));
    }

    /// A heartbeat as a watchdog of layout `version` sent it: the fixed part (zeros
    /// but for the preamble), the ids, a 32-byte HMAC's worth of zeros.
    fn old_heartbeat(version: u8, fixed: usize) -> Vec<u8> {
        let mut d = vec![0u8; fixed];
        d[..4].copy_from_slice(b"DFIB");
        d[4] = version;
        d[5] = KIND_HEARTBEAT;
        d.push(8);
        d.extend_from_slice(b"prod-az1");
        d.push(10);
        d.extend_from_slice(b"compute-17");
        d.extend_from_slice(&[0; 32]);
        d
    }

    #[test]
    fn an_older_heartbeat_gets_a_shorter_refusal_naming_the_host_it_claims() {
        for (version, fixed) in [(1, 72), (2, 85), (3, 93)] {
            let d = old_heartbeat(version, fixed);
            let mut out = Vec::new();
            let seen = refusal_for(&d, &mut out).expect("a heartbeat of another version");
            assert_eq!(seen.version, version);
            assert_eq!(seen.claimed_host_id, Some("compute-17"));
            assert!(!out.is_empty() && out.len() < d.len());
            let r = decode_refusal(&out).unwrap();
            assert_eq!(r.refused_version, version);
            assert_eq!(r.accepted_versions, HEARTBEAT_VERSIONS);
        }
    }

    #[test]
    fn a_newer_heartbeat_is_refused_too_without_a_host_id_from_an_unknown_layout() {
        let d = old_heartbeat(9, 120);
        let mut out = Vec::new();
        let seen = refusal_for(&d, &mut out).unwrap();
        assert_eq!((seen.version, seen.claimed_host_id), (9, None));
        assert_eq!(decode_refusal(&out).unwrap().refused_version, 9);
    }

    #[test]
    fn no_refusal_for_a_current_heartbeat_another_kind_or_someone_elses_bytes() {
        let mut out = vec![1];
        let current = old_heartbeat(crate::HEARTBEAT_VERSION, 97);
        assert_eq!(refusal_for(&current, &mut out), None);
        let mut ack = old_heartbeat(3, 93);
        ack[5] = crate::KIND_ACK;
        assert_eq!(refusal_for(&ack, &mut out), None);
        assert_eq!(refusal_for(b"GET / HTTP/1.1\r\n\r\n", &mut out), None);
        assert!(out.is_empty());
    }

    #[test]
    fn no_refusal_is_sent_for_a_datagram_no_longer_than_the_refusal() {
        // The shortest thing that passes as an old heartbeat's preamble.
        let tiny = [b'D', b'F', b'I', b'B', 3, KIND_HEARTBEAT, 0, 0, 0, 0];
        let mut out = Vec::new();
        let seen = refusal_for(&tiny, &mut out).expect("still reported");
        assert_eq!(seen.claimed_host_id, None);
        assert!(out.is_empty(), "a refusal as long as the request amplifies");
        let longer = [b'D', b'F', b'I', b'B', 3, KIND_HEARTBEAT, 0, 0, 0, 0, 0];
        refusal_for(&longer, &mut out).unwrap();
        assert_eq!(out.len(), 10);
    }
}
