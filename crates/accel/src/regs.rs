//! The register map and the ring entry layouts (little-endian throughout).
//!
//! MMIO register block, 64 KiB, at a guest-physical address the VMM chooses (`vmm` documents
//! where it puts it):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0000 | ID | r32 | `0x19e5_a250`: vendor 0x19e5, device 0xa250 |
//! | 0x0004 | VERSION | r32 | `0x0001_0000` |
//! | 0x0008 | QP_NUM | r32 | number of queue pairs |
//! | 0x000c | SQE_SIZE | r32 | 64 |
//! | 0x0010 | STATUS | r32 | bit 0: executing jobs; bit 1: a job is in flight |
//! | 0x0014 | JOBS_DONE | r32 | completed jobs, low 32 bits |
//! | 0x0060 | VF_STATE | rw32 | bit 0 READY: the guest driver finished setting up (QM_VF_STATE) |
//! | 0x0300 | MB_CMD | w32 | mailbox: bits 7:0 command, bits 31:16 queue; the write executes it |
//! | 0x0304 | MB_DATA_LO | rw32 | ring base IOVA, bits 31:0 |
//! | 0x0308 | MB_DATA_HI | rw32 | ring base IOVA, bits 63:32 |
//! | 0x030c | MB_DEPTH | rw32 | ring depth in entries: a power of two from 2 to 4096 |
//! | 0x0310 | MB_STATUS | r32 | result of the last command: 0 ok, 1 bad queue, 2 bad ring, 3 bad command |
//! | 0x1000 | DOORBELL | w64 | `qn \| cmd << 12 \| rand << 16 \| index << 32 \| prio << 48` |
//! | 0x2000 | PEER_WINDOW | rw, 4 KiB | device memory that peers write by DMA (peer-to-peer) |
//!
//! Mailbox commands: 0 SQC (load a submission-queue context: base and depth), 1 CQC (load a
//! completion-queue context), 4 SQC_BT and 5 CQC_BT (read a context's base back into
//! MB_DATA_LO/HI). Loading a context resets that ring's indices (and the CQ phase to 1).
//! Doorbell commands: 0 SQ (index = the new SQ tail), 1 CQ (index = the new CQ head, the
//! entries the guest consumed). Ring bases must be 64-byte aligned.
//!
//! Submission entry (SQE), 64 bytes:
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | u8 opcode: 1 COPY, 2 CRC32C, 3 LZ4_COMPRESS, 4 LZ4_DECOMPRESS, 5 FILL |
//! | 0x04 | u32 tag, echoed in the completion |
//! | 0x08 | u64 source IOVA |
//! | 0x10 | u64 destination IOVA |
//! | 0x18 | u32 source length (at most 1 MiB) |
//! | 0x1c | u32 destination capacity |
//! | 0x20 | u64 FILL pattern (low byte), CRC32C seed (low 32 bits) |
//!
//! Completion entry (CQE), 16 bytes (`struct qm_cqe`-like):
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | u32 result: bytes written (COPY, FILL, LZ4), the CRC (CRC32C) |
//! | 0x04 | u32 tag |
//! | 0x08 | u16 sq_head after this job |
//! | 0x0a | u16 sq_num, the queue |
//! | 0x0c | u16 status (see [`Status`]) |
//! | 0x0e | u16 w7: bit 0 is the phase |
//!
//! The first pass over a CQ writes phase 1, the next phase 0, and so on: the guest consumes
//! entries while their phase matches the one it expects. CRC32C jobs write their CRC as 4
//! bytes at the destination too, when the destination capacity is at least 4.

pub const ID: u64 = 0x0000;
pub const VERSION: u64 = 0x0004;
pub const QP_NUM: u64 = 0x0008;
pub const SQE_SIZE_REG: u64 = 0x000c;
pub const STATUS: u64 = 0x0010;
pub const JOBS_DONE: u64 = 0x0014;
pub const VF_STATE: u64 = 0x0060;
pub const MB_CMD: u64 = 0x0300;
pub const MB_DATA_LO: u64 = 0x0304;
pub const MB_DATA_HI: u64 = 0x0308;
pub const MB_DEPTH: u64 = 0x030c;
pub const MB_STATUS: u64 = 0x0310;
pub const DOORBELL: u64 = 0x1000;
/// A page of device memory in the register block: the target of peer-to-peer DMA. A VMM maps
/// it into its IOMMU domains at the block's address + this offset, as VFIO maps BARs, so that
/// other devices' jobs can write it. It is part of the migrated state.
pub const PEER_WINDOW: u64 = 0x2000;
pub const PEER_WINDOW_SIZE: u64 = 0x1000;
/// Size of the register block.
pub const MMIO_SIZE: u64 = 0x1_0000;

pub const ID_VALUE: u32 = 0x19e5_a250;
pub const VERSION_VALUE: u32 = 0x0001_0000;
pub const VF_STATE_READY: u32 = 1;

pub const MB_SQC: u32 = 0;
pub const MB_CQC: u32 = 1;
pub const MB_SQC_BT: u32 = 4;
pub const MB_CQC_BT: u32 = 5;

pub const DB_SQ: u64 = 0;
pub const DB_CQ: u64 = 1;

pub const SQE_SIZE: u64 = 64;
pub const CQE_SIZE: u64 = 16;
pub const MAX_DEPTH: u32 = 4096;
pub const MAX_JOB_LEN: u32 = 1 << 20;

/// Doorbell value for `qn`, command `cmd`, `index`.
pub const fn doorbell(qn: u16, cmd: u64, index: u16) -> u64 {
    qn as u64 | (cmd << 12) | ((index as u64) << 32) | (1 << 48)
}

/// Job opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    Copy = 1,
    Crc32c = 2,
    Lz4Compress = 3,
    Lz4Decompress = 4,
    Fill = 5,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            1 => Opcode::Copy,
            2 => Opcode::Crc32c,
            3 => Opcode::Lz4Compress,
            4 => Opcode::Lz4Decompress,
            5 => Opcode::Fill,
            _ => return None,
        })
    }
}

/// Completion status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    /// A DMA read (SQE or source) faulted.
    ReadFault = 1,
    /// A DMA write (destination) faulted.
    WriteFault = 2,
    BadOpcode = 3,
    /// The result does not fit the destination.
    NoSpace = 4,
    /// LZ4 input is corrupt.
    BadInput = 5,
    /// Source longer than 1 MiB.
    TooLong = 6,
}

impl Status {
    pub fn from_u16(v: u16) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::ReadFault,
            2 => Status::WriteFault,
            3 => Status::BadOpcode,
            4 => Status::NoSpace,
            5 => Status::BadInput,
            6 => Status::TooLong,
            _ => return None,
        })
    }
}

/// A submission entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub opcode: u8,
    pub tag: u32,
    pub src: u64,
    pub dst: u64,
    pub src_len: u32,
    pub dst_len: u32,
    pub arg: u64,
}

impl Sqe {
    pub fn to_bytes(&self) -> [u8; SQE_SIZE as usize] {
        let mut b = [0u8; SQE_SIZE as usize];
        b[0] = self.opcode;
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..16].copy_from_slice(&self.src.to_le_bytes());
        b[16..24].copy_from_slice(&self.dst.to_le_bytes());
        b[24..28].copy_from_slice(&self.src_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.dst_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.arg.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; SQE_SIZE as usize]) -> Sqe {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        Sqe {
            opcode: b[0],
            tag: u32_at(4),
            src: u64_at(8),
            dst: u64_at(16),
            src_len: u32_at(24),
            dst_len: u32_at(28),
            arg: u64_at(32),
        }
    }
}

/// A completion entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    pub result: u32,
    pub tag: u32,
    pub sq_head: u16,
    pub sq_num: u16,
    pub status: u16,
    pub phase: bool,
}

impl Cqe {
    pub fn to_bytes(&self) -> [u8; CQE_SIZE as usize] {
        let mut b = [0u8; CQE_SIZE as usize];
        b[0..4].copy_from_slice(&self.result.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        b[10..12].copy_from_slice(&self.sq_num.to_le_bytes());
        b[12..14].copy_from_slice(&self.status.to_le_bytes());
        b[14..16].copy_from_slice(&(self.phase as u16).to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; CQE_SIZE as usize]) -> Cqe {
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().expect("2"));
        Cqe {
            result: u32::from_le_bytes(b[0..4].try_into().expect("4")),
            tag: u32::from_le_bytes(b[4..8].try_into().expect("4")),
            sq_head: u16_at(8),
            sq_num: u16_at(10),
            status: u16_at(12),
            phase: u16_at(14) & 1 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let s = Sqe {
            opcode: 3,
            tag: 0xdead,
            src: 0x1000,
            dst: 0x2000,
            src_len: 4096,
            dst_len: 8192,
            arg: 7,
        };
        let b = s.to_bytes();
        assert_eq!(b[0], 3);
        assert_eq!(&b[4..8], &[0xad, 0xde, 0, 0]);
        assert_eq!(Sqe::from_bytes(&b), s);
        let c = Cqe {
            result: 1,
            tag: 2,
            sq_head: 3,
            sq_num: 4,
            status: 5,
            phase: true,
        };
        let b = c.to_bytes();
        assert_eq!(b, [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 4, 0, 5, 0, 1, 0]);
        assert_eq!(Cqe::from_bytes(&b), c);
        assert_eq!(doorbell(3, DB_SQ, 5), 0x0001_0005_0000_0003);
    }
}
