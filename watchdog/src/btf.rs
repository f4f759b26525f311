//! Just enough of a BTF reader to find where a field sits in a kernel struct: the probes
//! read `task_struct.exit_code` at this offset (the tracepoints do not carry the exit code,
//! and this kernel family offers no kprobes). aya-obj parses BTF too, but keeps its lookups
//! private; the format is small and stable (kernel Documentation/bpf/btf.rst).
use std::path::Path;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("cannot read {0}: {1} (is the kernel built with CONFIG_DEBUG_INFO_BTF?)")]
    Read(String, String),
    #[error("not BTF data (bad magic or truncated header)")]
    BadHeader,
    #[error("BTF type section is truncated")]
    Truncated,
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("struct {0} has no field {1} in the kernel's BTF")]
    NotFound(String, String),
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn u32_at(&self, at: usize) -> Result<u32, BtfError> {
        let s = self.b.get(at..at + 4).ok_or(BtfError::Truncated)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
}

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    members: Vec<Member>,
}

/// Byte offset of `field` in `struct name`, looking through anonymous struct/union members.
pub fn field_offset(data: &[u8], name: &str, field: &str) -> Result<u32, BtfError> {
    let r = Reader { b: data };
    let magic = data.get(0..2).ok_or(BtfError::BadHeader)?;
    if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
        return Err(BtfError::BadHeader);
    }
    let hdr_len = r.u32_at(4)? as usize;
    let type_off = r.u32_at(8)? as usize;
    let type_len = r.u32_at(12)? as usize;
    let str_off = r.u32_at(16)? as usize;
    let str_len = r.u32_at(20)? as usize;
    let types_start = hdr_len + type_off;
    let types_end = types_start + type_len;
    let strings = data
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .ok_or(BtfError::Truncated)?;
    let string = |off: u32| -> &[u8] {
        let s = strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())]
    };

    // Type ids start at 1 (0 is void).
    let mut types: Vec<Option<Type>> = vec![None];
    let mut at = types_start;
    while at < types_end {
        let name_off = r.u32_at(at)?;
        let info = r.u32_at(at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kflag = info >> 31 == 1;
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF.., FUNC, FLOAT, TYPE_TAG
            k => return Err(BtfError::UnknownKind(k)),
        };
        if kind == KIND_STRUCT || kind == KIND_UNION {
            let mut members = Vec::with_capacity(vlen);
            for i in 0..vlen {
                let m = at + i * 12;
                let off = r.u32_at(m + 8)?;
                members.push(Member {
                    name_off: r.u32_at(m)?,
                    type_id: r.u32_at(m + 4)?,
                    // With kflag the top 8 bits are a bitfield size.
                    bit_offset: if kflag { off & 0x00ff_ffff } else { off },
                });
            }
            types.push(Some(Type {
                name_off,
                kind,
                members,
            }));
        } else {
            types.push(None);
        }
        at += extra;
    }

    fn find(
        types: &[Option<Type>],
        string: &dyn Fn(u32) -> Vec<u8>,
        t: &Type,
        field: &str,
        depth: u32,
    ) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            let mname = string(m.name_off);
            if mname == field.as_bytes() {
                return Some(m.bit_offset);
            }
            if mname.is_empty() {
                if let Some(Some(inner)) = types.get(m.type_id as usize) {
                    if let Some(off) = find(types, string, inner, field, depth + 1) {
                        return Some(m.bit_offset + off);
                    }
                }
            }
        }
        None
    }

    let owned = |off: u32| string(off).to_vec();
    for t in types.iter().flatten() {
        if t.kind == KIND_STRUCT && string(t.name_off) == name.as_bytes() {
            if let Some(bits) = find(&types, &owned, t, field, 0) {
                return Ok(bits / 8);
            }
        }
    }
    Err(BtfError::NotFound(name.into(), field.into()))
}

/// The running kernel's BTF, read once.
pub struct KernelBtf {
    data: Vec<u8>,
}

impl KernelBtf {
    pub fn read() -> Result<Self, BtfError> {
        let data = std::fs::read(Path::new(VMLINUX_BTF))
            .map_err(|e| BtfError::Read(VMLINUX_BTF.into(), e.to_string()))?;
        Ok(Self { data })
    }

    /// Byte offset of `field` in `struct name`.
    pub fn field_offset(&self, name: &str, field: &str) -> Result<u32, BtfError> {
        field_offset(&self.data, name, field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int` and `struct s { int a; union { int x; int code; }; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0code\0x\0".to_vec();
        let (int, s, a, code, x) = (1u32, 5u32, 7u32, 9u32, 14u32);
        let mut types = Vec::new();
        let mut push = |v: &[u32]| {
            v.iter()
                .for_each(|w| types.extend_from_slice(&w.to_le_bytes()))
        };
        push(&[int, 1 << 24, 4, 32]); // [1] INT
        push(&[0, (5 << 24) | 2, 4, x, 1, 0, code, 1, 0]); // [2] anonymous UNION {x, code}
        push(&[s, (4 << 24) | 2, 8, a, 1, 0, 0, 2, 32]); // [3] STRUCT s {a @0, union @32 bits}
        let mut data = Vec::new();
        for w in [
            MAGIC as u32 | (1 << 16),
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        // The header's first word holds magic (u16), version (u8) and flags (u8).
        data[2] = 1;
        data[3] = 0;
        data.extend_from_slice(&types);
        data.extend_from_slice(&strings);
        data
    }

    #[test]
    fn a_field_inside_an_anonymous_union_is_found_at_the_unions_offset() {
        assert_eq!(field_offset(&sample(), "s", "code"), Ok(4));
        assert_eq!(field_offset(&sample(), "s", "a"), Ok(0));
    }

    #[test]
    fn a_missing_field_and_garbage_input_are_errors_not_panics() {
        assert!(matches!(
            field_offset(&sample(), "s", "nope"),
            Err(BtfError::NotFound(..))
        ));
        assert_eq!(
            field_offset(b"garbage!", "s", "a"),
            Err(BtfError::BadHeader)
        );
        let mut cut = sample();
        cut.truncate(40);
        assert!(field_offset(&cut, "s", "a").is_err());
    }

    #[test]
    fn the_running_kernel_has_every_field_the_exit_probe_reads() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIP: no {VMLINUX_BTF}");
            return;
        }
        let btf = KernelBtf::read().unwrap();
        for (ty, field) in [
            ("task_struct", "exit_code"),
            ("task_struct", "signal"),
            ("signal_struct", "flags"),
            ("signal_struct", "group_exit_code"),
        ] {
            let off = btf.field_offset(ty, field).unwrap();
            assert!(
                off > 0 && off < 16384,
                "implausible offset {off} of {ty}.{field}"
            );
        }
    }
}
