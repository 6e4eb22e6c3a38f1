//! `--verify`: digests of guest memory and device state, taken by both sides at the
//! switchover point.

use crate::msg::Digest;
use vfio::stream::{Decoder, Record};
use vfio::{MigState, MigrationDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const CHUNK: u32 = 1 << 20;

/// Per-MiB CRC32C of every region (regions are MiB-aligned in size).
pub fn memory_digest(mem: &GuestMemoryMmap, regions: &[(u64, u64)]) -> Result<Vec<u32>, String> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut out = Vec::new();
    for &(gpa, size) in regions {
        let mut off = 0;
        while off < size {
            let n = (size - off).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(gpa + off))
                .map_err(|e| e.to_string())?;
            out.push(crc32c::crc32c(&buf[..n]));
            off += n as u64;
        }
    }
    Ok(out)
}

/// Extends `crc` with the device data carried by one framed vfio section (whole records).
/// Over every section a device sent, pre-copy and stop-copy, this is the CRC32C of its full
/// saved state for devices whose save stream is their pre-copy data followed by the rest, as
/// hisi_acc's (and the accelerator's) is.
pub fn device_data_crc(crc: u32, section: &[u8]) -> Result<u32, String> {
    let mut d = Decoder::new();
    let mut crc = crc;
    d.feed(section);
    while let Some(r) = d.next_record().map_err(|e| e.to_string())? {
        if let Record::Data(b) = r {
            crc = crc32c::crc32c_append(crc, &b);
        }
    }
    if d.pending() != 0 {
        return Err("a device section ends inside a record".into());
    }
    Ok(crc)
}

/// On the destination, with the device loaded and in STOP: save it again (STOP → STOP_COPY,
/// read to the end, → STOP) and return the CRC32C of what it saves. Equal to the source's
/// STOP_COPY data when the device loaded exactly what was sent.
pub fn resave_crc(dev: &MigrationDevice) -> Result<u32, String> {
    let s = dev
        .set_state(MigState::StopCopy)
        .map_err(|e| format!("STOP -> STOP_COPY: {e}"))?
        .ok_or("no STOP_COPY stream")?;
    let mut buf = vec![0u8; 64 << 10];
    let mut crc = 0u32;
    loop {
        let n = s.read(&mut buf).map_err(|e| format!("reading the re-save: {e}"))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
    dev.set_state(MigState::Stop)
        .map_err(|e| format!("STOP_COPY -> STOP: {e}"))?;
    Ok(crc)
}

pub fn digest(chunks: Vec<u32>, devices: Vec<u32>) -> Digest {
    Digest {
        chunk_bytes: CHUNK,
        chunks,
        devices,
    }
}
