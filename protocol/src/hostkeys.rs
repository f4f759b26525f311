//! One key per host: derived from the controller's master key by HKDF over the host id,
//! and the set of hosts the controller knows (enrolled) with their keys.
//!
//! Why per host: with one shared key, whoever holds any hypervisor's key can sign for
//! every other host, and invent hosts. With a key per host, a compromised hypervisor
//! can speak only for itself, and a host id nobody enrolled is refused before any MAC
//! is computed.
//!
//! Why derived rather than stored: the controller keeps one secret (the master key) and
//! needs no key database; a host's key is `HKDF-SHA256(salt = "defib host key v1",
//! ikm = master key, info = host id)`, 32 bytes, written to the host's key file as 64
//! lowercase hex characters. The watchdog loads that file like any key file (its key
//! bytes are the 64 ASCII characters, from which [`crate::Key`] makes the datagram MAC's
//! BLAKE3 key and the frames' HMAC key), so a watchdog needs no code to know it is keyed
//! per host. Both are made once, at enrollment (controller) or at start (watchdog). Revoking a host removes it from the enrolled set; rotating every host's key is
//! rotating the master key (see docs/security.md).

use std::collections::HashMap;
use std::path::Path;

use hkdf::Hkdf;
use sha2::Sha256;

use crate::ids::check_host_id;
use crate::key::{load_key, Key, KeyError, MIN_KEY_LEN};

/// The HKDF salt: fixed, names the derivation and its version.
const HOST_KEY_SALT: &[u8] = b"defib host key v1";

/// The controller's master secret, from which every host's key is derived. `Debug`
/// never prints it.
#[derive(Clone)]
pub struct MasterKey {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// A master key from raw bytes; `None` if shorter than [`MIN_KEY_LEN`].
    pub fn new(bytes: &[u8]) -> Option<MasterKey> {
        (bytes.len() >= MIN_KEY_LEN).then(|| MasterKey {
            bytes: bytes.to_vec(),
        })
    }

    /// Loads the master key from a key file, with every check [`load_key`] makes (the
    /// file's mode, emptiness, length); a trailing newline is dropped.
    pub fn load(path: impl AsRef<Path>) -> Result<MasterKey, KeyError> {
        let path = path.as_ref();
        // The checks live in one place: load_key refuses what a master key must not be.
        load_key(path)?;
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        MasterKey::new(bytes).ok_or_else(|| KeyError::TooShort {
            path: path.to_path_buf(),
            len: bytes.len(),
        })
    }

    /// The host's key file contents: 64 lowercase hex characters (no newline).
    pub fn host_key_text(&self, host_id: &str) -> String {
        let hk = Hkdf::<Sha256>::new(Some(HOST_KEY_SALT), &self.bytes);
        let mut okm = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: this cannot fail.
        hk.expand(host_id.as_bytes(), &mut okm).unwrap_or_default();
        okm.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The host's key, as its watchdog loads it from the file [`Self::host_key_text`]
    /// gives.
    pub fn host_key(&self, host_id: &str) -> Key {
        let text = self.host_key_text(host_id);
        Key::new(text.as_bytes()).expect("64 bytes is above MIN_KEY_LEN")
    }
}

/// The hosts a controller knows, each with its key; what the heartbeat and event
/// intakes verify against. A host id not in it is refused as
/// [`crate::RejectReason::UnknownHost`].
#[derive(Clone, Debug)]
pub struct HostKeys {
    master: MasterKey,
    keys: HashMap<String, Key>,
}

impl HostKeys {
    /// No host enrolled yet.
    pub fn new(master: MasterKey) -> Self {
        HostKeys {
            master,
            keys: HashMap::new(),
        }
    }

    /// Adds `host_id` (its key derived now); true if it was not enrolled before. An
    /// invalid host id is refused (false) and not added.
    pub fn enroll(&mut self, host_id: &str) -> bool {
        if check_host_id(host_id).is_err() || self.keys.contains_key(host_id) {
            return false;
        }
        self.keys
            .insert(host_id.to_owned(), self.master.host_key(host_id));
        true
    }

    /// Removes `host_id`; true if it was enrolled.
    pub fn revoke(&mut self, host_id: &str) -> bool {
        self.keys.remove(host_id).is_some()
    }

    /// Makes the enrolled set exactly `hosts` (as read back from the store), keeping
    /// the keys already derived.
    pub fn set_enrolled<'a>(&mut self, hosts: impl IntoIterator<Item = &'a str>) {
        let wanted: std::collections::HashSet<&str> = hosts.into_iter().collect();
        self.keys.retain(|h, _| wanted.contains(h.as_str()));
        for h in wanted {
            self.enroll(h);
        }
    }

    /// The key of an enrolled host.
    pub fn get(&self, host_id: &str) -> Option<&Key> {
        self.keys.get(host_id)
    }

    /// Whether `host_id` is enrolled.
    pub fn is_enrolled(&self, host_id: &str) -> bool {
        self.keys.contains_key(host_id)
    }

    /// The enrolled host ids, sorted.
    pub fn enrolled(&self) -> Vec<String> {
        let mut v: Vec<String> = self.keys.keys().cloned().collect();
        v.sort();
        v
    }

    /// The master key the host keys derive from.
    pub fn master(&self) -> &MasterKey {
        &self.master
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master() -> MasterKey {
        MasterKey::new(b"the controller's master key, 32b").unwrap()
    }

    #[test]
    fn a_host_key_is_64_hex_characters_and_the_same_every_time() {
        let a = master().host_key_text("compute-1");
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(a, master().host_key_text("compute-1"));
    }

    #[test]
    fn two_hosts_get_different_keys_and_another_master_gives_other_keys() {
        let m = master();
        assert_ne!(m.host_key_text("compute-1"), m.host_key_text("compute-2"));
        let other = MasterKey::new(b"another master key of 32 bytes!!").unwrap();
        assert_ne!(
            m.host_key_text("compute-1"),
            other.host_key_text("compute-1")
        );
    }

    #[test]
    fn a_host_key_signs_what_the_host_key_text_signs() {
        let m = master();
        let from_text = Key::new(m.host_key_text("h").as_bytes()).unwrap();
        assert_eq!(m.host_key("h").frame_tag(b"x"), from_text.frame_tag(b"x"));
        assert_eq!(
            m.host_key("h").datagram_tag(b"x"),
            from_text.datagram_tag(b"x")
        );
    }

    #[test]
    fn only_enrolled_hosts_have_a_key_and_a_revoked_host_has_none() {
        let mut keys = HostKeys::new(master());
        assert!(keys.get("h1").is_none());
        assert!(keys.enroll("h1"));
        assert!(!keys.enroll("h1"), "enrolling twice changes nothing");
        assert!(keys.get("h1").is_some());
        assert!(keys.revoke("h1"));
        assert!(keys.get("h1").is_none());
        assert!(!keys.enroll("bad host\n"), "an invalid id is refused");
        keys.set_enrolled(["a", "b"]);
        assert_eq!(keys.enrolled(), ["a", "b"]);
        keys.set_enrolled(["b"]);
        assert_eq!(keys.enrolled(), ["b"]);
    }
}
