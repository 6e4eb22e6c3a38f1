//! Intel VT-d second-stage page table (`docs/iommu.md#vt-d-second-stage`; Linux:
//! drivers/iommu/intel/iommu.h, pasid.c, generic_pt/fmt/vtdss.h).
//!
//! | bits  | non-leaf            | leaf                                  |
//! |-------|---------------------|---------------------------------------|
//! | 0     | R                   | R                                     |
//! | 1     | W                   | W                                     |
//! | 7     | PS = 0              | PS = 1 for 2 MiB and 1 GiB leaves     |
//! | 8     | A (SSADE)           | A (SSADE)                             |
//! | 9     | -                   | D (SSADE, writes)                     |
//! | 51:12 | next table address  | output address                        |
//!
//! There is no present bit: an entry is present when R or W is set. Linux writes non-leaf
//! entries as `addr | R | W`.
//!
//! With SSADE=1 in the PASID entry the remapping hardware sets A (bit 8) in every second-stage
//! paging-structure entry it uses for a translation, leaf or not
//! (`docs/iommu.md#hardware-updates-on-a-dma`). The harvest relies on that to skip subtrees
//! whose A is clear.

use super::{level_shift, AdEnable, FaultReason, Format, FormatKind, Perm, Pte, OA_MASK};

pub const R: u64 = 1 << 0;
pub const W: u64 = 1 << 1;
pub const PS: u64 = 1 << 7;
pub const A: u64 = 1 << 8;
pub const D: u64 = 1 << 9;
pub const SNP: u64 = 1 << 11;

/// ECAP: scalable mode translation support.
pub const ECAP_SMTS: u64 = 1 << 43;
/// ECAP: second-stage accessed/dirty support ("SLADS"/"SSADS").
pub const ECAP_SLADS: u64 = 1 << 45;

/// PASID-table entry qword 0 fields used here.
pub const PASID_P: u64 = 1 << 0;
/// Address width, bits 4:2; 2 = 48 bits, 4-level table.
pub const PASID_AW_SHIFT: u32 = 2;
/// PASID granular translation type, bits 8:6; 2 = second-stage only.
pub const PASID_PGTT_SHIFT: u32 = 6;
pub const PASID_PGTT_SL_ONLY: u64 = 2;
/// Second-stage accessed/dirty enable.
pub const PASID_SSADE: u64 = 1 << 9;

/// Marker type for the VT-d second-stage format.
pub struct VtdSs;

impl Format for VtdSs {
    const KIND: FormatKind = FormatKind::VtdSs;
    const TABLE_ACCESSED: bool = true;

    fn leaf_sizes(level: usize) -> &'static [u32] {
        match level {
            0 => &[12],
            1 => &[21],
            2 => &[30],
            _ => &[],
        }
    }

    #[inline(always)]
    fn decode(pte: u64, level: usize) -> Pte {
        if pte & (R | W) == 0 {
            return Pte::Empty;
        }
        if level == 0 || pte & PS != 0 {
            Pte::Leaf {
                pa: pte & OA_MASK,
                size_lg2: level_shift(level),
                perm: Perm::from_bits((pte & (R | W)) as u8),
            }
        } else {
            Pte::Table { pa: pte & OA_MASK }
        }
    }

    fn table(pa: u64, _level: usize) -> u64 {
        (pa & OA_MASK) | R | W
    }

    fn leaf(pa: u64, level: usize, size_lg2: u32, perm: Perm, _tracking_domain: bool) -> u64 {
        debug_assert_eq!(size_lg2, level_shift(level));
        let mut pte = (pa & OA_MASK) | perm.bits() as u64;
        if level > 0 {
            pte |= PS;
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
    fn is_contig(_pte: u64, _level: usize) -> bool {
        false // second-stage tables have no contiguous encoding
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
        let need = if write { W } else { R };
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
    fn untouched_table(pte: u64, level: usize) -> bool {
        level > 0 && pte & (R | W) != 0 && pte & (PS | A) == 0
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
            ECAP_SMTS | ECAP_SLADS
        } else {
            ECAP_SMTS
        }
    }
    fn capable_dirty(cap: u64) -> bool {
        cap & (ECAP_SMTS | ECAP_SLADS) == ECAP_SMTS | ECAP_SLADS
    }
    fn context(root_pa: u64, _tracking_domain: bool) -> u64 {
        (root_pa & !0xfff) | (PASID_PGTT_SL_ONLY << PASID_PGTT_SHIFT) | (2 << PASID_AW_SHIFT) | PASID_P
    }
    fn context_set_tracking(ctx: u64, enable: bool) -> u64 {
        if enable {
            ctx | PASID_SSADE
        } else {
            ctx & !PASID_SSADE
        }
    }
    #[inline(always)]
    fn context_ad(ctx: u64) -> AdEnable {
        let on = ctx & PASID_SSADE != 0;
        AdEnable { access: on, dirty: on }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_raw() {
        assert_eq!(
            VtdSs::leaf(0x1234_5678_0000, 0, 12, Perm::RW, true),
            0x0000_1234_5678_0003
        );
        assert_eq!(
            VtdSs::leaf(0x1234_5678_0000, 0, 12, Perm::READ, true),
            0x0000_1234_5678_0001
        );
        assert_eq!(VtdSs::leaf(0x4020_0000, 1, 21, Perm::RW, true), 0x0000_0000_4020_0083);
        assert_eq!(
            VtdSs::leaf(0x8000_0000, 2, 30, Perm::WRITE, true),
            0x0000_0000_8000_0082
        );
        assert_eq!(VtdSs::table(0x5000, 3), 0x5003);
        assert_eq!(VtdSs::decode(0x5003, 3), Pte::Table { pa: 0x5000 });
        assert_eq!(
            VtdSs::decode(0x4020_0083, 1),
            Pte::Leaf {
                pa: 0x4020_0000,
                size_lg2: 21,
                perm: Perm::RW
            }
        );
        assert_eq!(VtdSs::decode(0x4020_0080, 1), Pte::Empty);
    }

    #[test]
    fn hardware_updates() {
        let pte = 0x1234_5678_0003u64;
        let on = VtdSs::context_ad(VtdSs::context_set_tracking(0, true));
        assert_eq!(VtdSs::leaf_access(pte, true, on), Ok(pte | A | D));
        assert_eq!(VtdSs::leaf_access(pte, false, on), Ok(pte | A));
        assert_eq!(VtdSs::leaf_access(pte, true, AdEnable::default()), Ok(pte));
        assert_eq!(
            VtdSs::leaf_access(0x1234_5678_0001, true, on),
            Err(FaultReason::Permission)
        );
        assert_eq!(VtdSs::table_access(0x5003, on), 0x5103);
    }

    #[test]
    fn registers() {
        assert_eq!(VtdSs::capability_register(true), 0x0000_2800_0000_0000);
        assert!(!VtdSs::capable_dirty(VtdSs::capability_register(false)));
        let pe = VtdSs::context(0x7000, true);
        assert_eq!(pe, 0x7089);
        assert_eq!(VtdSs::context_set_tracking(pe, true), 0x7289);
    }
}
