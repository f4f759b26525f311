//! A watchdog's key (or a shared one), the two MACs made with it, and how daemons load
//! it from a file.
//!
//! # Two MACs from one key
//!
//! - **Datagrams** (heartbeats, acks): keyed BLAKE3 with a 16-byte tag
//!   ([`DATAGRAM_MAC_LEN`]). The BLAKE3 key is `BLAKE3-derive_key(`[`DATAGRAM_MAC_CONTEXT`]`,
//!   key bytes)`: the key file's bytes, whatever their length, give a 32-byte key, and
//!   the derivation keeps it apart from the HMAC key below. BLAKE3 needs no nonce and no
//!   key schedule (the key is the initial chaining value), so a host's MAC state is just
//!   those 32 bytes, derived once when the key is loaded or the host enrolled. Measured
//!   on the project's machine (`cargo run -p defib-protocol --release --example mac_cost`),
//!   it costs about as much as HMAC-SHA256 with a pre-keyed
//!   state on a CPU with the SHA extensions, and a quarter of it on one without them
//!   (most Xeons before Ice Lake): BENCHMARKS.md, heartbeat intake.
//! - **Stream frames**: HMAC-SHA256 with a 32-byte tag ([`MAC_LEN`]), unchanged: frames
//!   are few (events, commands), and keeping their MAC keeps the event stream's layout.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Shortest key accepted, in bytes. Both MACs take any length, but a short key is
/// guessable; 16 bytes is 128 bits.
pub const MIN_KEY_LEN: usize = 16;

/// Length of the HMAC-SHA256 tag at the end of every stream frame.
pub const MAC_LEN: usize = 32;

/// Length of the keyed-BLAKE3 tag at the end of every datagram (heartbeat, ack): the
/// first 16 bytes of BLAKE3's output, 128 bits, as strong against forgery as the tags
/// of Poly1305 or AES-GCM.
pub const DATAGRAM_MAC_LEN: usize = 16;

/// The BLAKE3 `derive_key` context that turns key bytes into the datagram MAC's key.
/// Fixed: changing it changes every datagram's tag (a new datagram layout version).
pub const DATAGRAM_MAC_CONTEXT: &str = "defib 2026-12 datagram MAC v1: heartbeats and acks";

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// The key of the datagram MAC (keyed BLAKE3), derived from a [`Key`]: 32 bytes, cheap
/// to copy, so a receiver can hand it on with what it accepted and sign the answer
/// without looking the host up again. `Debug` never prints it.
#[derive(Clone, Copy)]
pub struct DatagramKey([u8; 32]);

impl DatagramKey {
    /// The 16-byte tag of `data`.
    pub fn tag(&self, data: &[u8]) -> [u8; DATAGRAM_MAC_LEN] {
        let hash = blake3::keyed_hash(&self.0, data);
        let mut tag = [0u8; DATAGRAM_MAC_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..DATAGRAM_MAC_LEN]);
        tag
    }

    /// Checks `tag` against `data` in constant time.
    pub(crate) fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        bool::from(self.tag(data).as_slice().ct_eq(tag))
    }
}

/// In constant time, like every comparison of secrets here.
impl PartialEq for DatagramKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for DatagramKey {}

impl AsRef<DatagramKey> for DatagramKey {
    fn as_ref(&self) -> &DatagramKey {
        self
    }
}

impl std::fmt::Debug for DatagramKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatagramKey(<redacted>)")
    }
}

/// A secret, ready to sign and verify: a watchdog's host key, or a shared key in tests
/// and tools.
///
/// It keeps both MACs ready (see the module docs): the 32-byte datagram key, and the
/// HMAC state with the key already absorbed (inner and outer pads hashed once), so
/// each message costs only its own blocks.
///
/// `Debug` never prints the key.
#[derive(Clone)]
pub struct Key {
    datagram: DatagramKey,
    frames: HmacSha256,
}

/// A key shorter than [`MIN_KEY_LEN`], given as bytes rather than from a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key is {len} bytes long; a key needs at least {MIN_KEY_LEN}")]
pub struct KeyTooShort {
    /// The length offered.
    pub len: usize,
}

/// Why a key file could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty (or only a newline).
    #[error("key file {} is empty", path.display())]
    Empty {
        /// The key file.
        path: PathBuf,
    },
    /// The file holds fewer than [`MIN_KEY_LEN`] bytes once the trailing newline is
    /// dropped.
    #[error(
        "key file {} holds {len} bytes; a key needs at least {MIN_KEY_LEN}",
        path.display()
    )]
    TooShort {
        /// The key file.
        path: PathBuf,
        /// Its length without the trailing newline.
        len: usize,
    },
    /// The file's mode gives group or others some access (see
    /// [`check_secret_file_mode`]).
    #[error(
        "key file {} has mode {mode:04o}; {}",
        path.display(),
        mode_advice(path)
    )]
    Mode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
}

/// Why a secret file (a key, a token, a password) is refused by
/// [`check_secret_file_mode`]. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file's mode could not be read.
    #[error("cannot read the mode of {}: {source}", path.display())]
    Stat {
        /// The secret file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file's mode gives group or others some access.
    #[error("{} has mode {mode:04o}; {}", path.display(), mode_advice(path))]
    Mode {
        /// The secret file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
}

/// The permission bits a secret file may not have: any access for group or others.
pub const SECRET_MODE_FORBIDDEN: u32 = 0o077;

fn mode_advice(path: &Path) -> String {
    format!(
        "group and others must have no access to it: it needs mode 0600 or 0400 (chmod 600 {})",
        path.display()
    )
}

/// `Err(mode)` when `meta`'s mode gives group or others any access.
fn secret_mode(meta: &std::fs::Metadata) -> Result<(), u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & SECRET_MODE_FORBIDDEN != 0 {
        return Err(mode);
    }
    Ok(())
}

/// Refuses a secret file (following symlinks) whose mode gives group or others any
/// access (`mode & 0o077 != 0`): a key, token or password that other users of the
/// host can read is no longer a secret. 0600 and 0400 pass. [`load_key`] does this
/// check itself; the controller applies it to its API token and password files.
pub fn check_secret_file_mode(path: impl AsRef<Path>) -> Result<(), SecretFileError> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|source| SecretFileError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    secret_mode(&meta).map_err(|mode| SecretFileError::Mode {
        path: path.to_path_buf(),
        mode,
    })
}

impl Key {
    /// Builds a key from raw bytes, refusing fewer than [`MIN_KEY_LEN`].
    pub fn new(bytes: &[u8]) -> Result<Key, KeyTooShort> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyTooShort { len: bytes.len() });
        }
        // new_from_slice only fails for fixed-size-key MACs; HMAC takes any length.
        let frames = HmacSha256::new_from_slice(bytes).map_err(|_| KeyTooShort { len: 0 })?;
        let datagram = DatagramKey(blake3::derive_key(DATAGRAM_MAC_CONTEXT, bytes));
        Ok(Key { datagram, frames })
    }

    /// The datagram MAC's key.
    pub fn datagram_key(&self) -> &DatagramKey {
        &self.datagram
    }

    /// The 16-byte keyed-BLAKE3 tag a datagram (heartbeat, ack) over `data` ends with;
    /// for tests and tools that build datagrams by hand.
    pub fn datagram_tag(&self, data: &[u8]) -> [u8; DATAGRAM_MAC_LEN] {
        self.datagram.tag(data)
    }

    /// The 32-byte HMAC-SHA256 tag a stream frame over `data` ends with; for tests and
    /// tools that build frames by hand.
    pub fn frame_tag(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.frames.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Checks a stream frame's `tag` against `data` in constant time.
    pub(crate) fn verify_frame(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.frames.clone();
        mac.update(data);
        mac.verify_slice(tag).is_ok()
    }
}

impl AsRef<DatagramKey> for Key {
    fn as_ref(&self) -> &DatagramKey {
        &self.datagram
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Loads the key from `path`, as both daemons do at start.
///
/// The file's bytes are the key, except that a trailing newline (`\n` or `\r\n`,
/// as editors and `echo` leave) is dropped so the same secret typed by hand and
/// generated by a tool gives the same key. Empty files, keys shorter than
/// [`MIN_KEY_LEN`] and files whose mode gives group or others any access (see
/// [`check_secret_file_mode`]: the key must be 0600 or 0400) are refused, naming the
/// path.
pub fn load_key(path: impl AsRef<Path>) -> Result<Key, KeyError> {
    use std::io::Read;
    let path = path.as_ref();
    let read_error = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    // The mode of the file opened, not of whatever the path names a moment later.
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    secret_mode(&file.metadata().map_err(read_error)?).map_err(|mode| KeyError::Mode {
        path: path.to_path_buf(),
        mode,
    })?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_error)?;
    let trimmed = trim_trailing_newline(&bytes);
    if trimmed.is_empty() {
        return Err(KeyError::Empty {
            path: path.to_path_buf(),
        });
    }
    Key::new(trimmed).map_err(|e| KeyError::TooShort {
        path: path.to_path_buf(),
        len: e.len,
    })
}

fn trim_trailing_newline(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `contents` with mode 0600, as a key file must be.
    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        temp_file_with_mode(name, contents, 0o600)
    }

    fn temp_file_with_mode(name: &str, contents: &[u8], mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("defib-protocol-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_file_open_to_group_or_others_is_refused_naming_its_path_its_mode_and_the_mode_it_needs(
    ) {
        for mode in [
            0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o610, 0o601, 0o777,
        ] {
            let path = temp_file_with_mode(&format!("open-{mode:o}"), b"0123456789abcdef\n", mode);
            let err = load_key(&path).unwrap_err();
            assert!(
                matches!(err, KeyError::Mode { mode: m, .. } if m == mode),
                "{mode:o}: {err:?}"
            );
            let text = err.to_string();
            let shown = path.display().to_string();
            assert!(
                text.starts_with(&format!("key file {shown} has mode 0{mode:o};")),
                "{text}"
            );
            assert!(text.contains("0600 or 0400"), "{text}");
            assert!(text.contains(&format!("chmod 600 {shown}")), "{text}");
        }
    }

    #[test]
    fn a_key_file_only_its_owner_can_read_is_accepted() {
        for mode in [0o600, 0o400] {
            let path = temp_file_with_mode(&format!("owner-{mode:o}"), b"0123456789abcdef\n", mode);
            load_key(&path).unwrap_or_else(|e| panic!("{mode:o}: {e}"));
        }
    }

    #[test]
    fn any_secret_file_open_to_group_or_others_fails_the_shared_mode_check() {
        let open = temp_file_with_mode("token-open", b"a token\n", 0o640);
        let err = check_secret_file_mode(&open).unwrap_err();
        assert!(
            matches!(err, SecretFileError::Mode { mode: 0o640, .. }),
            "{err:?}"
        );
        let shown = open.display().to_string();
        assert_eq!(
            err.to_string(),
            format!(
                "{shown} has mode 0640; group and others must have no access to it: it \
                 needs mode 0600 or 0400 (chmod 600 {shown})"
            )
        );
        let closed = temp_file_with_mode("token-closed", b"a token\n", 0o600);
        check_secret_file_mode(&closed).unwrap();
        let missing = std::env::temp_dir().join("defib-protocol-no-such-secret-file");
        let err = check_secret_file_mode(&missing).unwrap_err();
        assert!(matches!(err, SecretFileError::Stat { .. }), "{err:?}");
        assert!(err
            .to_string()
            .contains("defib-protocol-no-such-secret-file"));
    }

    #[test]
    fn a_key_file_with_a_trailing_newline_gives_the_same_key_as_without() {
        let with = load_key(temp_file("with-newline", b"0123456789abcdef\n")).unwrap();
        let without = load_key(temp_file("without-newline", b"0123456789abcdef")).unwrap();
        let crlf = load_key(temp_file("crlf", b"0123456789abcdef\r\n")).unwrap();
        assert_eq!(with.frame_tag(b"x"), without.frame_tag(b"x"));
        assert_eq!(crlf.frame_tag(b"x"), without.frame_tag(b"x"));
        assert_eq!(with.datagram_tag(b"x"), without.datagram_tag(b"x"));
        assert_eq!(crlf.datagram_tag(b"x"), without.datagram_tag(b"x"));
    }

    #[test]
    fn an_empty_key_file_is_refused_naming_its_path() {
        let path = temp_file("empty", b"\n");
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, KeyError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn a_key_shorter_than_sixteen_bytes_is_refused_naming_its_path() {
        let path = temp_file("short", b"0123456789abcde\n");
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, KeyError::TooShort { len: 15, .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn a_missing_key_file_is_an_error_naming_its_path() {
        let path = std::env::temp_dir().join("defib-protocol-no-such-key-file");
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, KeyError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("defib-protocol-no-such-key-file"));
    }

    #[test]
    fn a_key_never_shows_its_bytes_in_debug_output() {
        let key = Key::new(b"super-secret-key-material").unwrap();
        assert!(!format!("{key:?}").contains("secret"));
        assert_eq!(
            format!("{:?}", key.datagram_key()),
            "DatagramKey(<redacted>)"
        );
    }

    #[test]
    fn the_datagram_tag_is_keyed_blake3_under_the_derived_key_cut_to_sixteen_bytes() {
        let bytes = b"an example cluster key, 32 bytes";
        let key = Key::new(bytes).unwrap();
        let derived = blake3::derive_key(DATAGRAM_MAC_CONTEXT, bytes);
        let full = blake3::keyed_hash(&derived, b"message");
        assert_eq!(key.datagram_tag(b"message"), full.as_bytes()[..16]);
        // Not the raw key: the derivation keeps the BLAKE3 key apart from the HMAC key.
        let mut raw = [0u8; 32];
        raw.copy_from_slice(bytes);
        assert_ne!(
            key.datagram_tag(b"message"),
            blake3::keyed_hash(&raw, b"message").as_bytes()[..16]
        );
    }

    #[test]
    fn a_datagram_tag_verifies_only_for_its_own_data_and_its_whole_length() {
        let key = Key::new(b"an example cluster key, 32 bytes").unwrap();
        let dk = key.datagram_key();
        let tag = key.datagram_tag(b"data");
        assert!(dk.verify(b"data", &tag));
        assert!(!dk.verify(b"date", &tag));
        assert!(!dk.verify(b"data", &tag[..15]), "a shortened tag");
        let other = Key::new(b"a different key of the same size").unwrap();
        assert!(!other.datagram_key().verify(b"data", &tag));
    }
}
