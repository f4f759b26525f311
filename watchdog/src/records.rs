//! Decoding ring-buffer bytes into the typed records of `watchdog-common`.
use watchdog_common::{
    BlockSlowEndRecord, ExecRecord, ExitRecord, IoSlowEndRecord, RbdSlowEndRecord, RecordKind,
    UringSlowEndRecord,
};

#[derive(Debug, Clone, Copy)]
pub enum Record {
    Exec(ExecRecord),
    Exit(ExitRecord),
    IoSlowEnd(IoSlowEndRecord),
    BlockSlowEnd(BlockSlowEndRecord),
    UringSlowEnd(UringSlowEndRecord),
    RbdSlowEnd(RbdSlowEndRecord),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of {0} bytes is too short for its kind")]
    Short(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() < std::mem::size_of::<T>() {
        return Err(RecordError::Short(bytes.len()));
    }
    // SAFETY: length checked above; T is a #[repr(C)] record of plain integers and byte
    // arrays (every bit pattern is valid); read_unaligned copes with any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
    let kind: u32 = read(bytes)?;
    match RecordKind::from_u32(kind) {
        Some(RecordKind::Exec) => read(bytes).map(Record::Exec),
        Some(RecordKind::Exit) => read(bytes).map(Record::Exit),
        Some(RecordKind::IoSlowEnd) => read(bytes).map(Record::IoSlowEnd),
        Some(RecordKind::BlockSlowEnd) => read(bytes).map(Record::BlockSlowEnd),
        Some(RecordKind::UringSlowEnd) => read(bytes).map(Record::UringSlowEnd),
        Some(RecordKind::RbdSlowEnd) => read(bytes).map(Record::RbdSlowEnd),
        None => Err(RecordError::UnknownKind(kind)),
    }
}

/// A NUL-padded kernel comm as a string.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a plain #[repr(C)] record.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    #[test]
    fn an_exit_record_round_trips_through_ring_buffer_bytes() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"qemu");
        let rec = ExitRecord {
            kind: RecordKind::Exit as u32,
            tgid: 42,
            ts_ns: 7,
            status_known: 1,
            status: 9,
            oom_killed: 0,
            killer_tgid: 99,
            killer_signal: 9,
            _pad: 0,
            killer_ts_ns: 5,
            comm,
            killer_comm: [0; 16],
        };
        match decode(&bytes_of(&rec)).unwrap() {
            Record::Exit(r) => {
                assert_eq!((r.tgid, r.status, r.killer_tgid), (42, 9, 99));
                assert_eq!(comm_str(&r.comm), "qemu");
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn a_truncated_record_is_an_error_not_a_panic() {
        let bytes = (RecordKind::Exit as u32).to_ne_bytes();
        assert_eq!(decode(&bytes).unwrap_err(), RecordError::Short(4));
        assert_eq!(decode(&[1, 2]).unwrap_err(), RecordError::Short(2));
    }

    #[test]
    fn an_unknown_kind_is_reported() {
        assert_eq!(
            decode(&77u32.to_ne_bytes()).unwrap_err(),
            RecordError::UnknownKind(77)
        );
    }
}
