//! Identifiers carried by every message: the kernel boot id and the rules for the
//! textual ids (cluster, host, controller).

use std::fmt;
use std::str::FromStr;

/// Longest cluster id, in bytes. Cluster ids are short names from the config.
pub const MAX_CLUSTER_ID_LEN: usize = 64;
/// Longest host id, in bytes: a fully qualified DNS name fits (253).
pub const MAX_HOST_ID_LEN: usize = 253;
/// Longest controller id, in bytes.
pub const MAX_CONTROLLER_ID_LEN: usize = 64;

/// Why an identifier is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Zero bytes long.
    #[error("is empty")]
    Empty,
    /// Longer than allowed.
    #[error("is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// Holds an ASCII control character; refused so an id can never forge a log line
    /// or a metrics label.
    #[error("holds a control character")]
    ControlCharacter,
}

fn check_id(id: &str, max: usize) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > max {
        return Err(IdError::TooLong { len: id.len(), max });
    }
    if id.bytes().any(|b| b.is_ascii_control()) {
        return Err(IdError::ControlCharacter);
    }
    Ok(())
}

/// Checks a cluster id: 1..=[`MAX_CLUSTER_ID_LEN`] bytes, no control characters.
pub fn check_cluster_id(id: &str) -> Result<(), IdError> {
    check_id(id, MAX_CLUSTER_ID_LEN)
}

/// Checks a host id: 1..=[`MAX_HOST_ID_LEN`] bytes, no control characters.
pub fn check_host_id(id: &str) -> Result<(), IdError> {
    check_id(id, MAX_HOST_ID_LEN)
}

/// Checks a controller id: 1..=[`MAX_CONTROLLER_ID_LEN`] bytes, no control
/// characters.
pub fn check_controller_id(id: &str) -> Result<(), IdError> {
    check_id(id, MAX_CONTROLLER_ID_LEN)
}

/// Where Linux publishes the id of the running boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The kernel's random boot id (a 128-bit UUID, new on every boot). It tells the
/// controller that a host rebooted, even if the watchdog's own state survived.
///
/// Its text form is the one in [`BOOT_ID_PATH`]: lowercase hyphenated hex,
/// `8-4-4-4-12`. In JSON it is that string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BootId(pub [u8; 16]);

/// A boot id string that is not a hyphenated 128-bit hex UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a boot id (want 8-4-4-4-12 hex digits): {0:?}")]
pub struct BootIdParseError(String);

impl BootId {
    /// Reads the running kernel's boot id from [`BOOT_ID_PATH`].
    pub fn current() -> std::io::Result<BootId> {
        let text = std::fs::read_to_string(BOOT_ID_PATH)?;
        text.parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl FromStr for BootId {
    type Err = BootIdParseError;

    /// Parses the hyphenated form, ignoring surrounding whitespace (the proc file
    /// ends with a newline).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || BootIdParseError(s.chars().take(64).collect());
        let trimmed = s.trim();
        let groups: Vec<&str> = trimmed.split('-').collect();
        let widths = [8, 4, 4, 4, 12];
        if groups.len() != widths.len() || groups.iter().zip(widths).any(|(g, w)| g.len() != w) {
            return Err(err());
        }
        let mut out = [0u8; 16];
        let mut nibbles = groups.concat().into_bytes().into_iter();
        for byte in out.iter_mut() {
            let hi = nibbles.next().and_then(hex_value).ok_or_else(err)?;
            let lo = nibbles.next().and_then(hex_value).ok_or_else(err)?;
            *byte = (hi << 4) | lo;
        }
        Ok(BootId(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BootId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootId({self})")
    }
}

impl serde::Serialize for BootId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BootId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = BootId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a hyphenated boot id")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BootId, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_id_parses_from_the_proc_file_form_and_prints_back_the_same() {
        let text = "0f5a3c7e-1b2d-4e6f-8a9b-0c1d2e3f4a5b\n";
        let id: BootId = text.parse().unwrap();
        assert_eq!(id.to_string(), text.trim());
    }

    #[test]
    fn a_boot_id_with_a_wrong_group_or_a_non_hex_digit_is_refused() {
        for bad in [
            "",
            "0f5a3c7e1b2d4e6f8a9b0c1d2e3f4a5b",
            "0f5a3c7e-1b2d-4e6f-8a9b-0c1d2e3f4a5",
            "0f5a3c7g-1b2d-4e6f-8a9b-0c1d2e3f4a5b",
            "0f5a3c7e-1b2d-4e6f-8a9b-0c1d2e3f4a5b-00",
            "é5a3c7e-1b2d-4e6f-8a9b-0c1d2e3f4a5b",
        ] {
            assert!(bad.parse::<BootId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_running_kernels_boot_id_can_be_read_when_proc_is_there() {
        if std::path::Path::new(BOOT_ID_PATH).exists() {
            let id = BootId::current().unwrap();
            assert_ne!(id, BootId::default());
        }
    }

    #[test]
    fn an_id_that_is_empty_too_long_or_has_a_control_character_is_refused() {
        assert_eq!(check_host_id(""), Err(IdError::Empty));
        assert_eq!(
            check_cluster_id(&"c".repeat(MAX_CLUSTER_ID_LEN + 1)),
            Err(IdError::TooLong {
                len: MAX_CLUSTER_ID_LEN + 1,
                max: MAX_CLUSTER_ID_LEN
            })
        );
        assert_eq!(
            check_controller_id("ctl\n1"),
            Err(IdError::ControlCharacter)
        );
        assert_eq!(check_host_id(&"h".repeat(MAX_HOST_ID_LEN)), Ok(()));
        assert_eq!(check_host_id("compute-1.example.org"), Ok(()));
    }
}
