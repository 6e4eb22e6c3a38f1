//! The per-vCPU control page: configuration the host writes before the program starts, and
//! counters the program keeps. All fields are little-endian u64.

/// Configuration (host → guest).
pub const C_MAGIC: u64 = 0x000;
pub const C_FLAGS: u64 = 0x008;
pub const C_TSC_KHZ: u64 = 0x010;
/// TSC ticks between two page writes of the dirtier; 0 = as fast as possible.
pub const C_TICKS_PER_PAGE: u64 = 0x018;
pub const C_WS_BASE: u64 = 0x020;
pub const C_WS_PAGES: u64 = 0x028;
pub const C_PATTERN: u64 = 0x030;
pub const C_HOT_PAGES: u64 = 0x038;
pub const C_HOT_PCT: u64 = 0x040;
pub const C_SEED: u64 = 0x048;
pub const C_VCPU: u64 = 0x050;
pub const C_MMIO: u64 = 0x058;
pub const C_AREA: u64 = 0x060;
pub const C_QN: u64 = 0x068;
/// Largest backlog of pages the dirtier catches up after it fell behind (a pause).
pub const C_BURST: u64 = 0x070;
/// Pages of the working set, from its base, that the accelerator can reach: all of them,
/// unless an IOVA window its IOMMU reserves (unmapped) cuts the working set short.
pub const C_DMA_PAGES: u64 = 0x078;
/// IOVA of a peer device's window: CRC32C jobs write their result there, at
/// `(tag % PEER_SLOTS) * 4` (peer-to-peer DMA). 0: into the job's own destination slot.
pub const C_PEER: u64 = 0x080;
pub const PEER_SLOTS: u64 = accel::regs::PEER_WINDOW_SIZE / 4;
/// The paced DMA writer: TSC ticks per chunk (0: off), where it writes, how many chunks its
/// working set holds, and the queue it submits on.
pub const C_DMA_TICKS: u64 = 0x088;
pub const C_DMA_BASE: u64 = 0x090;
pub const C_DMA_CHUNKS: u64 = 0x098;
pub const C_DMA_QN: u64 = 0x0a0;
/// The vIOMMU client: the vIOMMU's registers, its area in guest RAM, and the IOVA window.
pub const C_VIOMMU_MMIO: u64 = 0x0a8;
pub const C_VIOMMU_AREA: u64 = 0x0b0;
pub const C_VIOMMU_IOVA: u64 = 0x0b8;
/// The vIOMMU client's pace: TSC ticks per job (each job is one remap); 0 = as fast as it can.
pub const C_VIOMMU_TICKS: u64 = 0x0c0;

/// Counters (guest → host).
pub const K_PAGES: u64 = 0x800;
pub const K_TSC_START: u64 = 0x808;
pub const K_TSC_NOW: u64 = 0x810;
pub const K_SUBMITTED: u64 = 0x818;
pub const K_COMPLETED: u64 = 0x820;
pub const K_ERRORS: u64 = 0x828;
/// Reserved (was a loop counter; see `workload.rs` on why the loop does not store).
pub const K_LOOPS: u64 = 0x830;
/// The DMA writer's chunks submitted and completed.
pub const K_DMA_SUBMITTED: u64 = 0x838;
pub const K_DMA_DONE: u64 = 0x840;
/// The vIOMMU client's unmaps (each followed by a map of the same IOVA elsewhere).
pub const K_REMAPS: u64 = 0x848;
/// Register spill slots of the accel-client step.
pub const S_SPILL: u64 = 0x900;

pub const MAGIC: u64 = 0x4c4d_4947_4354_524c; // "LMIGCTRL"
pub const FLAG_DIRTIER: u64 = 1;
pub const FLAG_ACCEL: u64 = 2;
pub const FLAG_DMA: u64 = 4;

/// The accel-client's area (from `layout::ACCEL_AREA`).
pub const A_NEXT: u64 = 0x00;
pub const A_TAIL: u64 = 0x08;
pub const A_HEAD: u64 = 0x10;
pub const A_PHASE: u64 = 0x18;
pub const A_SQ: u64 = 0x1000;
pub const A_CQ: u64 = 0x2000;
pub const A_CRC_TABLE: u64 = 0x3000;
pub const A_SRC: u64 = 0x1_0000;
pub const A_DST: u64 = 0x3_0000;
pub const A_DEPTH: u64 = 32;
/// The DMA writer's state (pacing start, ring indices) and rings, and the 1 MiB it copies from.
pub const A_DMA_TAIL: u64 = 0x20;
pub const A_DMA_HEAD: u64 = 0x28;
pub const A_DMA_PHASE: u64 = 0x30;
pub const A_DMA_START: u64 = 0x38;
pub const A_DMA_SQ: u64 = 0x7_0000;
pub const A_DMA_CQ: u64 = 0x7_1000;
pub const A_DMA_SRC: u64 = 0x10_0000;
pub const A_DMA_SRC_SIZE: u64 = 0x10_0000;
/// Bytes per DMA-writer job: the unit the working set and the rate are counted in.
pub const DMA_CHUNK: u64 = 64 << 10;
/// Most chunks the DMA writer catches up after falling behind (a pause).
pub const DMA_BURST: u64 = 64;
/// CRC jobs run over this many bytes of the slot's private source: the tag and its complement.
pub const A_CRC_LEN: u64 = 16;
pub const A_SRC_SIZE: u64 = 4096;
pub const A_DST_SIZE: u64 = 8192;

/// Page stamp: the first 32 bytes of every page the dirtier writes.
pub const STAMP_MAGIC: u64 = 0x5354_414d_5000_0000; // "STAMP", vCPU in the low byte
/// Checksum multipliers: 31-bit, so the guest can use `imul r64, r/m64, imm32`.
pub const STAMP_K1: u64 = 0x7f4a_7c15;
pub const STAMP_K2: u64 = 0x27d4_eb4f;

/// A decoded page stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub vcpu: u8,
    pub pfn: u64,
    pub generation: u64,
}

/// Why a page's stamp does not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StampError {
    #[error("no stamp (never written)")]
    Missing,
    #[error("stamp names page {0:#x}")]
    WrongPage(u64),
    #[error("stamp checksum mismatch")]
    Checksum,
}

/// The checksum of a stamp.
pub fn stamp_checksum(magic: u64, pfn: u64, generation: u64) -> u64 {
    pfn.wrapping_mul(STAMP_K1) ^ generation.wrapping_mul(STAMP_K2) ^ magic
}

/// Verifies the stamp at the start of page `pfn` (`bytes` are its first 32 bytes).
pub fn verify_stamp(pfn: u64, bytes: &[u8; 32]) -> Result<Stamp, StampError> {
    let w = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8"));
    let (magic, page, generation, sum) = (w(0), w(1), w(2), w(3));
    if magic & !0xff != STAMP_MAGIC {
        return Err(StampError::Missing);
    }
    if page != pfn {
        return Err(StampError::WrongPage(page));
    }
    if sum != stamp_checksum(magic, page, generation) {
        return Err(StampError::Checksum);
    }
    Ok(Stamp {
        vcpu: magic as u8,
        pfn,
        generation,
    })
}

/// What a page of the working set holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageCheck {
    /// Never written.
    Clean,
    Stamped(Stamp),
    /// A stamp being written when the vCPU stopped: magic present, the rest a mix of the old
    /// and new stamp, and a generation not yet published (or not yet stored).
    InFlight,
    Bad(StampError),
}

/// Checks one page. `published` is the vCPU's `K_PAGES`: stamps up to that generation were
/// complete when it was stored. The dirtier stores page number, magic, generation, then the
/// checksum, so a torn stamp is the page number alone (a first write), or has a generation
/// above `published` (or 0 on a first write).
pub fn check_page(pfn: u64, bytes: &[u8; 32], published: u64) -> PageCheck {
    if bytes.iter().all(|&b| b == 0) {
        return PageCheck::Clean;
    }
    match verify_stamp(pfn, bytes) {
        Ok(s) => PageCheck::Stamped(s),
        Err(e) => {
            let w = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8"));
            let (magic, page, generation) = (w(0), w(1), w(2));
            let magic_ok = magic & !0xff == STAMP_MAGIC;
            // The dirtier stores the page number before the magic, so a first write stopped
            // between those two stores leaves the page number alone in a zero page.
            let number_only = magic == 0 && page == pfn && generation == 0 && w(3) == 0;
            if number_only || magic_ok && (page == pfn || page == 0) && (generation > published || generation == 0) {
                PageCheck::InFlight
            } else {
                PageCheck::Bad(e)
            }
        }
    }
}

/// The CRC32C (Castagnoli, reflected) table the accel-client uses to check CRC jobs.
pub fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (i, e) in t.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82f6_3b78 } else { c >> 1 };
        }
        *e = c;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_crc32c_crate() {
        let t = crc32c_table();
        let data = b"livemig stamps and checks";
        let mut c = !0u32;
        for &b in data {
            c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
        }
        assert_eq!(!c, crc32c::crc32c(data));
    }

    #[test]
    fn stamps() {
        let mut b = [0u8; 32];
        let magic = STAMP_MAGIC | 3;
        for (i, v) in [magic, 0x1234, 7, stamp_checksum(magic, 0x1234, 7)].iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            verify_stamp(0x1234, &b),
            Ok(Stamp {
                vcpu: 3,
                pfn: 0x1234,
                generation: 7
            })
        );
        assert_eq!(verify_stamp(0x1235, &b), Err(StampError::WrongPage(0x1234)));
        b[24] ^= 1;
        assert_eq!(verify_stamp(0x1234, &b), Err(StampError::Checksum));
        assert_eq!(verify_stamp(0, &[0; 32]), Err(StampError::Missing));
    }

    #[test]
    fn a_first_write_stopped_after_the_page_number_is_in_flight() {
        let mut b = [0u8; 32];
        b[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        assert_eq!(check_page(0x1234, &b, 10), PageCheck::InFlight);
        // The number of another page, or anything after it, is not a torn first write.
        assert_eq!(check_page(0x1235, &b, 10), PageCheck::Bad(StampError::Missing));
        b[16] = 1;
        assert_eq!(check_page(0x1234, &b, 10), PageCheck::Bad(StampError::Missing));
    }
}
