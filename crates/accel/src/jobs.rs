//! Executing one job: every byte moves through the device's DMA handle.

use crate::regs::{Opcode, Sqe, Status, MAX_JOB_LEN};
use iommu::Dma;
use vfio::DmaLog;

/// A DMA handle that counts every access and logs every write for device-side dirty tracking.
pub(crate) struct DeviceDma<'a> {
    pub dma: &'a Dma,
    pub log: &'a DmaLog,
    pub ops: &'a std::sync::atomic::AtomicU64,
}

impl DeviceDma<'_> {
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), iommu::DmaError> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dma.read(iova, buf)
    }
    /// Logged twice, as a device that logs at issue and again at completion. After: a report
    /// that read and cleared the bit while the write was in flight sees it set again once the
    /// data has landed. Before: a VMM that unmaps the IOVA (which waits for the write) and
    /// then reports the range finds it, even if the write has not been logged after yet; the
    /// late second bit then marks a page spuriously, never misses one.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), iommu::DmaError> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.log.record(iova, buf.len() as u64);
        self.dma.write(iova, buf)?;
        self.log.record(iova, buf.len() as u64);
        Ok(())
    }
}

/// Runs `sqe`; returns (status, result).
pub(crate) fn run(d: &DeviceDma<'_>, sqe: &Sqe) -> (Status, u32) {
    let Some(op) = Opcode::from_u8(sqe.opcode) else {
        return (Status::BadOpcode, 0);
    };
    if sqe.src_len > MAX_JOB_LEN || (op == Opcode::Fill && sqe.dst_len > MAX_JOB_LEN) {
        return (Status::TooLong, 0);
    }
    let mut src = vec![0u8; if op == Opcode::Fill { 0 } else { sqe.src_len as usize }];
    if d.read(sqe.src, &mut src).is_err() {
        return (Status::ReadFault, 0);
    }
    let out: Vec<u8> = match op {
        Opcode::Copy => src,
        Opcode::Fill => vec![sqe.arg as u8; sqe.dst_len as usize],
        Opcode::Crc32c => {
            let crc = crc32c::crc32c_append(sqe.arg as u32, &src);
            if sqe.dst_len >= 4 && d.write(sqe.dst, &crc.to_le_bytes()).is_err() {
                return (Status::WriteFault, 0);
            }
            return (Status::Ok, crc);
        }
        Opcode::Lz4Compress => {
            let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(src.len())];
            match lz4_flex::compress_into(&src, &mut out) {
                Ok(n) => {
                    out.truncate(n);
                    out
                }
                Err(_) => return (Status::NoSpace, 0),
            }
        }
        Opcode::Lz4Decompress => {
            let mut out = vec![0u8; sqe.dst_len.min(MAX_JOB_LEN) as usize];
            match lz4_flex::decompress_into(&src, &mut out) {
                Ok(n) => {
                    out.truncate(n);
                    out
                }
                Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) => return (Status::NoSpace, 0),
                Err(_) => return (Status::BadInput, 0),
            }
        }
    };
    if out.len() > sqe.dst_len as usize {
        return (Status::NoSpace, 0);
    }
    if d.write(sqe.dst, &out).is_err() {
        return (Status::WriteFault, 0);
    }
    (Status::Ok, out.len() as u32)
}
