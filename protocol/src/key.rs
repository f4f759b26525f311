//! The shared HMAC-SHA256 key and how daemons load it from a file.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest key accepted, in bytes. HMAC-SHA256 accepts any length, but a short key
/// is guessable; 16 bytes is 128 bits.
pub const MIN_KEY_LEN: usize = 16;

/// Length of the HMAC-SHA256 tag at the end of every message.
pub const MAC_LEN: usize = 32;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// The cluster's shared secret, ready to sign and verify.
///
/// It keeps the HMAC state with the key already absorbed (inner and outer pads
/// hashed once), so each message costs only its own blocks: this is what lets the
/// controller check a million heartbeats a second on one core.
///
/// `Debug` never prints the key.
#[derive(Clone)]
pub struct Key {
    keyed: HmacSha256,
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
        let keyed = HmacSha256::new_from_slice(bytes).map_err(|_| KeyTooShort { len: 0 })?;
        Ok(Key { keyed })
    }

    /// Signs `data`.
    pub(crate) fn sign(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Checks `tag` against `data` in constant time.
    pub(crate) fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.keyed.clone();
        mac.update(data);
        mac.verify_slice(tag).is_ok()
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
        assert_eq!(with.sign(b"x"), without.sign(b"x"));
        assert_eq!(crlf.sign(b"x"), without.sign(b"x"));
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
    }
}
