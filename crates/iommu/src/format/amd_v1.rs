//! AMD IOMMU v1 host page table (`docs/iommu.md#amd-v1`; Linux:
//! drivers/iommu/amd/amd_iommu_types.h, io_pgtable.c, generic_pt/fmt/amdv1.h).
//!
//! | bits  | PDE (table)              | PTE (leaf)                                    |
//! |-------|--------------------------|-----------------------------------------------|
//! | 0     | PR                       | PR                                            |
//! | 5     | A (set by walks, HAD)    | A                                             |
//! | 6     | -                        | D (set by writes, HAD = 11b)                  |
//! | 11:9  | NextLevel = next level   | NextLevel 0 (default size) or 7 (size in OA)  |
//! | 51:12 | next table address       | output address                                |
//! | 60    | -                        | FC (force coherent; Linux always sets it)     |
//! | 61/62 | IR / IW                  | IR / IW                                       |
//!
//! NextLevel = 7 encodes any power-of-two size between two default sizes: the output address
//! field is `(addr | (size - 1)) & !(size >> 1)`, i.e. ones below the size bit, and the leaf is
//! replicated over `size / entry_span` consecutive entries. Hardware may set D in only one
//! replica (`docs/iommu.md#amd-sizes-and-replicated-leaves`), which is why harvesting ORs them.
//!
//! The Accessed bit in a PDE is what lets the harvest skip untouched subtrees: with DTE.HAD
//! enabling access updates, the IOMMU sets A (bit 5) in every PDE and PTE it uses for a
//! translation (`docs/iommu.md#amd-registers`, `docs/iommu.md#hardware-updates-on-a-dma`).

use super::{level_shift, AdEnable, FaultReason, Format, FormatKind, Perm, Pte, OA_MASK};

pub const PR: u64 = 1 << 0;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const NEXT_LEVEL_SHIFT: u32 = 9;
pub const NEXT_LEVEL_MASK: u64 = 7 << NEXT_LEVEL_SHIFT;
pub const NL_SIZE: u64 = 7;
pub const FC: u64 = 1 << 60;
pub const IR: u64 = 1 << 61;
pub const IW: u64 = 1 << 62;

/// EFR: host access (A bit) update support.
pub const EFR_HASUP: u64 = 1 << 49;
/// EFR: host dirty update support; `capable(IOMMU_CAP_DIRTY_TRACKING)`.
pub const EFR_HDSUP: u64 = 1 << 52;

/// DTE qword 0 fields used here.
pub const DTE_V: u64 = 1 << 0;
pub const DTE_TV: u64 = 1 << 1;
/// DTE[HAD], bits 8:7. 11b enables access and dirty updates (Linux `DTE_FLAG_HAD`).
pub const DTE_HAD: u64 = 3 << 7;
pub const DTE_HAD_ACCESS: u64 = 1 << 7;
pub const DTE_MODE_SHIFT: u32 = 9;
pub const DTE_IR: u64 = 1 << 61;
pub const DTE_IW: u64 = 1 << 62;

/// Marker type for the AMD v1 format.
pub struct AmdV1;

const SIZES_L0: [u32; 9] = [20, 19, 18, 17, 16, 15, 14, 13, 12];
const SIZES_L1: [u32; 9] = [29, 28, 27, 26, 25, 24, 23, 22, 21];
const SIZES_L2: [u32; 1] = [30];

impl Format for AmdV1 {
    const KIND: FormatKind = FormatKind::AmdV1;
    const TABLE_ACCESSED: bool = true;

    fn leaf_sizes(level: usize) -> &'static [u32] {
        match level {
            0 => &SIZES_L0,
            1 => &SIZES_L1,
            2 => &SIZES_L2,
            _ => &[],
        }
    }

    #[inline(always)]
    fn decode(pte: u64, level: usize) -> Pte {
        if pte & PR == 0 {
            return Pte::Empty;
        }
        let nl = (pte & NEXT_LEVEL_MASK) >> NEXT_LEVEL_SHIFT;
        let perm = Perm::from_bits(((pte & IR != 0) as u8) | (((pte & IW != 0) as u8) << 1));
        match nl {
            0 => Pte::Leaf {
                pa: pte & OA_MASK,
                size_lg2: level_shift(level),
                perm,
            },
            NL_SIZE => {
                // size = 1 << (1 + ffz(pte | 0xfff))
                let size_lg2 = 1 + (pte | 0xfff).trailing_ones();
                Pte::Leaf {
                    pa: pte & OA_MASK & !((1u64 << size_lg2) - 1),
                    size_lg2,
                    perm,
                }
            }
            _ => Pte::Table { pa: pte & OA_MASK },
        }
    }

    fn table(pa: u64, level: usize) -> u64 {
        // NextLevel names the level of the table pointed to, counted from 1 = 4 KiB table.
        (pa & OA_MASK) | ((level as u64) << NEXT_LEVEL_SHIFT) | PR | IR | IW
    }

    fn leaf(pa: u64, level: usize, size_lg2: u32, perm: Perm, _tracking_domain: bool) -> u64 {
        let mut pte = if size_lg2 == level_shift(level) {
            pa & OA_MASK
        } else {
            let sz = 1u64 << size_lg2;
            (((pa | (sz - 1)) & !(sz >> 1)) & OA_MASK) | (NL_SIZE << NEXT_LEVEL_SHIFT)
        };
        pte |= PR | FC;
        if perm.read() {
            pte |= IR;
        }
        if perm.write() {
            pte |= IW;
        }
        pte
    }

    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        pte & D != 0
    }
    #[inline(always)]
    fn dirty_bits(pte: u64) -> u64 {
        pte & D
    }
    #[inline(always)]
    fn is_contig(pte: u64, level: usize) -> bool {
        // NextLevel 7 in a leaf means "size encoded in the address bits": a replicated leaf
        // when that size exceeds the level's own entry.
        pte & (NEXT_LEVEL_MASK | PR) == (NL_SIZE << NEXT_LEVEL_SHIFT) | PR
            && 1 + (pte | 0xfff).trailing_ones() > level_shift(level)
    }
    #[inline(always)]
    fn clean(pte: u64) -> u64 {
        pte & !D
    }
    fn dirty(pte: u64) -> u64 {
        pte | D
    }
    fn leaf_accessed_bits(pte: u64) -> u64 {
        pte & A
    }

    #[inline(always)]
    fn leaf_access(pte: u64, write: bool, ad: AdEnable) -> Result<u64, FaultReason> {
        let need = if write { IW } else { IR };
        if pte & need == 0 {
            return Err(FaultReason::Permission);
        }
        let mut new = pte;
        if ad.access {
            new |= A;
        }
        if write && ad.dirty {
            new |= D;
        }
        Ok(new)
    }
    #[inline(always)]
    fn table_access(pte: u64, ad: AdEnable) -> u64 {
        if ad.access {
            pte | A
        } else {
            pte
        }
    }
    #[inline(always)]
    fn untouched_table(pte: u64, _level: usize) -> bool {
        let nl = (pte & NEXT_LEVEL_MASK) >> NEXT_LEVEL_SHIFT;
        pte & (PR | A) == PR && nl != 0 && nl != NL_SIZE
    }
    #[inline(always)]
    fn table_accessed(pte: u64) -> bool {
        pte & A != 0
    }
    fn table_clear_accessed(pte: u64) -> u64 {
        pte & !A
    }
    fn table_set_accessed(pte: u64) -> u64 {
        pte | A
    }

    fn capability_register(dirty_capable: bool) -> u64 {
        if dirty_capable {
            EFR_HASUP | EFR_HDSUP
        } else {
            0
        }
    }
    fn capable_dirty(cap: u64) -> bool {
        cap & EFR_HDSUP != 0
    }
    fn context(root_pa: u64, _tracking_domain: bool) -> u64 {
        // Mode 4: a 4-level table, 48-bit IOVA.
        DTE_V | DTE_TV | (4 << DTE_MODE_SHIFT) | (root_pa & OA_MASK) | DTE_IR | DTE_IW
    }
    fn context_set_tracking(ctx: u64, enable: bool) -> u64 {
        if enable {
            ctx | DTE_HAD
        } else {
            ctx & !DTE_HAD
        }
    }
    #[inline(always)]
    fn context_ad(ctx: u64) -> AdEnable {
        AdEnable {
            access: ctx & DTE_HAD_ACCESS != 0,
            dirty: ctx & DTE_HAD == DTE_HAD,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PA: u64 = 0x1234_5678_0000;

    #[test]
    fn default_leaves_raw() {
        assert_eq!(AmdV1::leaf(PA, 0, 12, Perm::RW, true), 0x7000_1234_5678_0001);
        assert_eq!(AmdV1::leaf(PA, 0, 12, Perm::READ, true), 0x3000_1234_5678_0001);
        // 2 MiB and 1 GiB default leaves: NextLevel 0 at levels 1 and 2.
        assert_eq!(AmdV1::leaf(0x4000_0000, 1, 21, Perm::RW, true), 0x7000_0000_4000_0001);
        assert_eq!(
            AmdV1::leaf(0x4000_0000, 2, 30, Perm::WRITE, true),
            0x5000_0000_4000_0001
        );
    }

    #[test]
    fn next_level_7_sizes() {
        // 8 KiB at 0x2000_0000: OA = (pa | 0x1fff) & !0x1000 -> bit 12 clear, NL=7.
        let pte = AmdV1::leaf(0x2000_0000, 0, 13, Perm::RW, true);
        assert_eq!(pte, 0x7000_0000_2000_0e01);
        assert_eq!(
            AmdV1::decode(pte, 0),
            Pte::Leaf {
                pa: 0x2000_0000,
                size_lg2: 13,
                perm: Perm::RW
            }
        );
        // 64 KiB: bits 14:12 ones, bit 15 zero.
        let pte = AmdV1::leaf(0x2000_0000, 0, 16, Perm::READ, true);
        assert_eq!(pte, 0x3000_0000_2000_7e01);
        // 4 MiB at level 1: ones in 20:12, bit 21 clear.
        let pte = AmdV1::leaf(0x4000_0000, 1, 22, Perm::RW, true);
        assert_eq!(pte, 0x7000_0000_401f_fe01);
        for lg2 in 12..=30u32 {
            let level = super::super::level_of_size(lg2);
            let pa = 0x40_0000_0000u64;
            let pte = AmdV1::leaf(pa, level, lg2, Perm::RW, true);
            assert_eq!(
                AmdV1::decode(pte, level),
                Pte::Leaf {
                    pa,
                    size_lg2: lg2,
                    perm: Perm::RW
                },
                "size 2^{lg2}"
            );
        }
    }

    #[test]
    fn pde_raw() {
        // Root (level 3) entry pointing at a level-2 table: NextLevel = 3.
        assert_eq!(AmdV1::table(0xabc_d000, 3), 0x6000_0000_0abc_d601);
        assert_eq!(AmdV1::table(0xabc_d000, 1), 0x6000_0000_0abc_d201);
        assert_eq!(
            AmdV1::decode(AmdV1::table(0xabc_d000, 1), 1),
            Pte::Table { pa: 0xabc_d000 }
        );
    }

    #[test]
    fn hardware_updates() {
        let pte = AmdV1::leaf(PA, 0, 12, Perm::RW, true);
        let on = AmdV1::context_ad(AmdV1::context_set_tracking(0, true));
        let off = AmdV1::context_ad(0);
        assert_eq!(AmdV1::leaf_access(pte, true, on), Ok(pte | A | D));
        assert_eq!(AmdV1::leaf_access(pte, false, on), Ok(pte | A));
        assert_eq!(AmdV1::leaf_access(pte, true, off), Ok(pte));
        let ro = AmdV1::leaf(PA, 0, 12, Perm::READ, true);
        assert_eq!(AmdV1::leaf_access(ro, true, on), Err(FaultReason::Permission));
        assert_eq!(AmdV1::clean(pte | A | D), pte | A);
    }

    #[test]
    fn registers() {
        assert_eq!(AmdV1::capability_register(true), 0x0012_0000_0000_0000);
        assert!(AmdV1::capable_dirty(AmdV1::capability_register(true)));
        assert!(!AmdV1::capable_dirty(AmdV1::capability_register(false)));
        let dte = AmdV1::context(0x10_0000, true);
        assert_eq!(dte, 0x6000_0000_0010_0803);
        assert_eq!(AmdV1::context_set_tracking(dte, true), 0x6000_0000_0010_0983);
        assert_eq!(
            AmdV1::context_set_tracking(AmdV1::context_set_tracking(dte, true), false),
            dte
        );
    }
}
