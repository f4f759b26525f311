//! Byte-level reading and writing shared by the datagram codecs. The reader never
//! indexes: every access goes through `get`, so a short or hostile buffer turns into
//! a [`DecodeError`], never a panic.

use crate::error::DecodeError;
use crate::ids::IdError;
use crate::key::{DatagramKey, Key, DATAGRAM_MAC_LEN};
use crate::{MAGIC, PROTOCOL_VERSION};

/// Size of the header every datagram and frame starts with: magic, version, kind.
pub(crate) const PREAMBLE_LEN: usize = 6;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Oversize {
            len: usize::MAX,
            max: self.buf.len(),
        })?;
        let bytes = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated {
            need: end,
            have: self.buf.len(),
        })?;
        self.pos = end;
        Ok(bytes)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string with a one-byte length prefix, checked by `check`.
    pub(crate) fn short_str(
        &mut self,
        check: fn(&str) -> Result<(), IdError>,
        what: &'static str,
    ) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed(what))?;
        check(s).map_err(|_| DecodeError::Malformed(what))?;
        Ok(s)
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
}

/// Checks the magic, version ([`PROTOCOL_VERSION`]) and kind at the start of `buf`.
pub(crate) fn check_preamble(buf: &[u8], expected_kind: u8) -> Result<(), DecodeError> {
    check_preamble_of(buf, expected_kind, &[PROTOCOL_VERSION]).map(|_| ())
}

/// Checks the magic, the version (one of `versions`: each kind's layout has its own
/// version, see the crate docs) and the kind at the start of `buf`; returns the version.
/// A version older than all of `versions` is [`DecodeError::OldVersion`], any other
/// unknown one [`DecodeError::UnsupportedVersion`].
///
/// The magic is checked on whatever prefix arrived, so a short datagram of someone
/// else's protocol counts as bad magic, not as truncated. The kind is checked before
/// the version, since versions are per kind: a heartbeat reflected onto the ack port is
/// refused for its kind, whatever its layout version.
pub(crate) fn check_preamble_of(
    buf: &[u8],
    expected_kind: u8,
    versions: &[u8],
) -> Result<u8, DecodeError> {
    let have = buf.len().min(MAGIC.len());
    if buf.get(..have) != MAGIC.get(..have) {
        return Err(DecodeError::BadMagic);
    }
    let mut r = Reader::new(buf);
    r.take(MAGIC.len())?;
    let version = r.u8()?;
    let kind = r.u8()?;
    if kind != expected_kind {
        return Err(DecodeError::WrongKind {
            found: kind,
            expected: expected_kind,
        });
    }
    if !versions.contains(&version) {
        if versions.iter().all(|v| version < *v) {
            return Err(DecodeError::OldVersion(version));
        }
        return Err(DecodeError::UnsupportedVersion(version));
    }
    Ok(version)
}

/// After a datagram's body has been read: exactly [`DATAGRAM_MAC_LEN`] bytes must
/// remain, and they must be the keyed-BLAKE3 tag of everything before them.
pub(crate) fn check_trailing_mac(
    buf: &[u8],
    r: &Reader<'_>,
    key: &DatagramKey,
) -> Result<(), DecodeError> {
    let body_end = r.position();
    match r.remaining() {
        n if n < DATAGRAM_MAC_LEN => {
            return Err(DecodeError::Truncated {
                need: body_end.saturating_add(DATAGRAM_MAC_LEN),
                have: buf.len(),
            })
        }
        n if n > DATAGRAM_MAC_LEN => {
            return Err(DecodeError::Malformed("trailing bytes after the MAC"))
        }
        _ => {}
    }
    let (signed, tag) = buf
        .split_at_checked(body_end)
        .ok_or(DecodeError::Truncated {
            need: body_end,
            have: buf.len(),
        })?;
    if key.verify(signed, tag) {
        Ok(())
    } else {
        Err(DecodeError::BadMac)
    }
}

pub(crate) fn put_preamble(out: &mut Vec<u8>, kind: u8) {
    put_preamble_of(out, PROTOCOL_VERSION, kind);
}

/// The preamble of a kind whose layout has its own version.
pub(crate) fn put_preamble_of(out: &mut Vec<u8>, version: u8, kind: u8) {
    out.extend_from_slice(&MAGIC);
    out.push(version);
    out.push(kind);
}

/// Appends a one-byte-length-prefixed string; the caller has checked its length.
pub(crate) fn put_short_str(out: &mut Vec<u8>, s: &str) {
    // Ids are checked to be at most 253 bytes before this is called.
    out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(s.as_bytes());
}

/// Appends the datagram tag (keyed BLAKE3, [`DATAGRAM_MAC_LEN`] bytes) of `out`.
pub(crate) fn append_datagram_mac(out: &mut Vec<u8>, key: &DatagramKey) {
    let tag = key.tag(out);
    out.extend_from_slice(&tag);
}

/// Appends the frame tag (HMAC-SHA256, [`crate::MAC_LEN`] bytes) of `out`.
pub(crate) fn append_frame_mac(out: &mut Vec<u8>, key: &Key) {
    let tag = key.frame_tag(out);
    out.extend_from_slice(&tag);
}
