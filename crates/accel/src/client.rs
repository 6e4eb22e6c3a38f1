//! A guest driver for the accelerator written in Rust: what the guest program of the `vmm`
//! crate does in x86-64, for tests and benchmarks. It touches guest memory as a CPU does
//! (directly, not through the IOMMU) and the device only through MMIO.
//!
//! All its state lives in guest memory, so a copy of that memory continues on another device
//! instance exactly as a migrated vCPU would. Layout from `base` (IOVA = guest-physical
//! address):
//!
//! | offset | contents |
//! |---|---|
//! | 0x0000 | control block: u32 next_tag, cq_head, cq_phase, sq_tail, completed, errors, duplicates, target |
//! | 0x1000 | SQ: `DEPTH` × 64 bytes |
//! | 0x2000 | CQ: `DEPTH` × 16 bytes |
//! | 0x3000 | one byte per tag: 1 once its completion was consumed |
//! | 0x10000 | `DEPTH` source buffers of `BUF` bytes |
//! | 0x10000 + DEPTH × BUF | `DEPTH` destination buffers of 2 × `BUF` bytes |
//!
//! Job `tag` uses slot `tag % DEPTH`; its kind is `tag % 4` (COPY, CRC32C, LZ4_COMPRESS,
//! FILL) and its source bytes are a function of the tag, so every result can be checked.

use crate::regs::*;

pub const DEPTH: u32 = 32;
pub const BUF: u64 = 8192;
const CB_NEXT: u64 = 0;
const CB_CQ_HEAD: u64 = 4;
const CB_PHASE: u64 = 8;
const CB_SQ_TAIL: u64 = 12;
const CB_DONE: u64 = 16;
const CB_ERRORS: u64 = 20;
const CB_DUPS: u64 = 24;
const CB_TARGET: u64 = 28;
const SQ: u64 = 0x1000;
const CQ: u64 = 0x2000;
const SEEN: u64 = 0x3000;
const SRC: u64 = 0x10000;
const DST: u64 = SRC + DEPTH as u64 * BUF;
/// Guest memory the client uses from its base.
pub const FOOTPRINT: u64 = DST + DEPTH as u64 * 2 * BUF;
/// Most tags a client can track.
pub const MAX_TAGS: u32 = 0xd000;

/// How the client reaches guest memory and the device.
pub trait GuestBus {
    fn read(&self, gpa: u64, buf: &mut [u8]);
    fn write(&self, gpa: u64, buf: &[u8]);
    fn mmio_write(&self, offset: u64, data: &[u8]);
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
}

/// The client's counters, as stored in its control block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub submitted: u32,
    pub completed: u32,
    pub errors: u32,
    pub duplicates: u32,
}

pub struct Client<'a, B: GuestBus> {
    bus: &'a B,
    base: u64,
    qn: u16,
}

/// The source bytes of job `tag`: compressible but tag-specific.
pub fn source_bytes(tag: u32) -> Vec<u8> {
    let len = 1024 + (tag as usize * 97) % 6000;
    (0..len)
        .map(|i| {
            if (i / 64) % 3 == 0 {
                (tag as usize + i) as u8
            } else {
                (i % 7) as u8 ^ tag as u8
            }
        })
        .collect()
}

impl<'a, B: GuestBus> Client<'a, B> {
    pub fn new(bus: &'a B, base: u64, qn: u16) -> Self {
        Self { bus, base, qn }
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.bus.read(self.base + off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w32(&self, off: u64, v: u32) {
        self.bus.write(self.base + off, &v.to_le_bytes());
    }
    fn mmio32(&self, off: u64, v: u32) {
        self.bus.mmio_write(off, &v.to_le_bytes());
    }

    /// Programs the queue pair and marks the function READY; `target` jobs will be run.
    pub fn setup(&self, target: u32) -> Result<(), String> {
        if target > MAX_TAGS {
            return Err(format!("at most {MAX_TAGS} jobs"));
        }
        self.bus.write(self.base, &[0u8; 32]);
        self.bus.write(self.base + SEEN, &vec![0u8; target as usize]);
        self.w32(CB_PHASE, 1);
        self.w32(CB_TARGET, target);
        for (cmd, ring) in [(MB_SQC, SQ), (MB_CQC, CQ)] {
            let iova = self.base + ring;
            self.mmio32(MB_DATA_LO, iova as u32);
            self.mmio32(MB_DATA_HI, (iova >> 32) as u32);
            self.mmio32(MB_DEPTH, DEPTH);
            self.mmio32(MB_CMD, cmd | (self.qn as u32) << 16);
            let mut st = [0u8; 4];
            self.bus.mmio_read(MB_STATUS, &mut st);
            if u32::from_le_bytes(st) != 0 {
                return Err(format!(
                    "mailbox command {cmd} failed with status {}",
                    u32::from_le_bytes(st)
                ));
            }
        }
        self.mmio32(VF_STATE, VF_STATE_READY);
        Ok(())
    }

    pub fn counters(&self) -> Counters {
        Counters {
            submitted: self.r32(CB_NEXT),
            completed: self.r32(CB_DONE),
            errors: self.r32(CB_ERRORS),
            duplicates: self.r32(CB_DUPS),
        }
    }

    /// Whether every target job completed.
    pub fn finished(&self) -> bool {
        self.r32(CB_DONE) >= self.r32(CB_TARGET)
    }

    /// One step of the driver loop: consume completions, then submit while there is room.
    /// Returns how many completions it consumed.
    pub fn step(&self) -> u32 {
        let consumed = self.reap();
        let target = self.r32(CB_TARGET);
        let mut next = self.r32(CB_NEXT);
        let mut tail = self.r32(CB_SQ_TAIL);
        let mut rang = false;
        while next < target && next - self.r32(CB_DONE) < DEPTH - 1 {
            let slot = (next % DEPTH) as u64;
            let src = source_bytes(next);
            self.bus.write(self.base + SRC + slot * BUF, &src);
            let dst = self.base + DST + slot * 2 * BUF;
            let (opcode, arg) = match next % 4 {
                0 => (Opcode::Copy, 0),
                1 => (Opcode::Crc32c, 0xffff_ffff),
                2 => (Opcode::Lz4Compress, 0),
                _ => (Opcode::Fill, next as u64 & 0xff),
            };
            let sqe = Sqe {
                opcode: opcode as u8,
                tag: next,
                src: self.base + SRC + slot * BUF,
                dst,
                src_len: src.len() as u32,
                dst_len: 2 * BUF as u32,
                arg,
            };
            self.bus.write(self.base + SQ + tail as u64 * SQE_SIZE, &sqe.to_bytes());
            tail = (tail + 1) % DEPTH;
            next += 1;
            self.w32(CB_NEXT, next);
            self.w32(CB_SQ_TAIL, tail);
            rang = true;
        }
        if rang {
            self.bus
                .mmio_write(DOORBELL, &doorbell(self.qn, DB_SQ, tail as u16).to_le_bytes());
        }
        consumed
    }

    fn reap(&self) -> u32 {
        let mut head = self.r32(CB_CQ_HEAD);
        let mut phase = self.r32(CB_PHASE) != 0;
        let mut n = 0;
        loop {
            // The phase word first, then the entry, as a driver must: the device writes the
            // phase last, so an entry whose phase matches is complete when read after it.
            let at = self.base + CQ + head as u64 * CQE_SIZE;
            let mut w7 = [0u8; 2];
            self.bus.read(at + 14, &mut w7);
            if (u16::from_le_bytes(w7) & 1 != 0) != phase {
                break;
            }
            let mut raw = [0u8; CQE_SIZE as usize];
            self.bus.read(at, &mut raw);
            let cqe = Cqe::from_bytes(&raw);
            self.check(&cqe);
            head = (head + 1) % DEPTH;
            if head == 0 {
                phase = !phase;
            }
            self.w32(CB_CQ_HEAD, head);
            self.w32(CB_PHASE, phase as u32);
            self.w32(CB_DONE, self.r32(CB_DONE) + 1);
            n += 1;
        }
        if n > 0 {
            self.bus
                .mmio_write(DOORBELL, &doorbell(self.qn, DB_CQ, head as u16).to_le_bytes());
        }
        n
    }

    fn check(&self, cqe: &Cqe) {
        let tag = cqe.tag;
        let mut seen = [0u8];
        self.bus.read(self.base + SEEN + tag as u64, &mut seen);
        if seen[0] != 0 {
            self.w32(CB_DUPS, self.r32(CB_DUPS) + 1);
            return;
        }
        self.bus.write(self.base + SEEN + tag as u64, &[1]);
        let src = source_bytes(tag);
        let dst = self.base + DST + (tag % DEPTH) as u64 * 2 * BUF;
        let ok = cqe.status == Status::Ok as u16
            && match tag % 4 {
                0 => self.read_vec(dst, src.len()) == src && cqe.result as usize == src.len(),
                1 => {
                    cqe.result == crc32c::crc32c_append(0xffff_ffff, &src)
                        && self.read_vec(dst, 4) == cqe.result.to_le_bytes()
                }
                2 => {
                    let c = self.read_vec(dst, cqe.result as usize);
                    lz4_flex::decompress(&c, src.len()).is_ok_and(|d| d == src)
                }
                _ => {
                    cqe.result as u64 == 2 * BUF && self.read_vec(dst, 2 * BUF as usize).iter().all(|&b| b == tag as u8)
                }
            };
        if !ok {
            self.w32(CB_ERRORS, self.r32(CB_ERRORS) + 1);
        }
    }

    fn read_vec(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.bus.read(gpa, &mut v);
        v
    }
}
