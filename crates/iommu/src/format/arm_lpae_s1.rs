//! Arm SMMUv3 stage 1, VMSAv8-64 LPAE descriptors with a 4 KiB granule, with HTTU
//! (`docs/iommu.md#arm-lpae-stage-1`; Linux: drivers/iommu/io-pgtable-arm.c).
//!
//! | bits  | table descriptor   | block / page descriptor                            |
//! |-------|--------------------|----------------------------------------------------|
//! | 1:0   | 11b                | 01b block (2 MiB, 1 GiB), 11b page (4 KiB)         |
//! | 4:2   | -                  | AttrIndx = 1 (cacheable, Linux `MAIR_ATTR_IDX_CACHE`) |
//! | 6     | -                  | AP[1] = 1 (unprivileged access)                    |
//! | 7     | -                  | AP[2] = RDONLY                                     |
//! | 9:8   | -                  | SH = 11b (inner shareable)                         |
//! | 10    | -                  | AF (set at creation, as Linux does)                |
//! | 11    | -                  | nG                                                 |
//! | 47:12 | next table address | output address                                     |
//! | 51    | -                  | DBM                                                |
//!
//! Dirty state lives in AP[2]: writable-clean is DBM=1, AP[2]=1; writable-dirty is DBM=1,
//! AP[2]=0. With CD.HD set, a write through a writable-clean entry makes the SMMU clear AP[2]
//! atomically instead of faulting. Linux creates writable entries with DBM set and AP[2] clear,
//! so they are born dirty; the clearing pass that runs when tracking is enabled cleans them.
//! `set_dirty_tracking` does nothing: with HD in the CD, logging is always on.
//!
//! Table descriptors have no Access flag, so the harvest cannot skip subtrees in this format.

use super::{level_shift, AdEnable, FaultReason, Format, FormatKind, Perm, Pte};

pub const VALID: u64 = 1 << 0;
pub const TYPE_TABLE: u64 = 1 << 1;
pub const TYPE_PAGE: u64 = 1 << 1;
pub const ATTRINDX_CACHE: u64 = 1 << 2;
pub const AP_UNPRIV: u64 = 1 << 6;
pub const AP_RDONLY: u64 = 1 << 7;
pub const SH_IS: u64 = 3 << 8;
pub const AF: u64 = 1 << 10;
pub const NG: u64 = 1 << 11;
pub const DBM: u64 = 1 << 51;
/// Output address bits 47:12 (48-bit OA, no FEAT_LPA).
pub const OA_MASK: u64 = ((1u64 << 48) - 1) & !0xfff;

/// SMMU_IDR0.HTTU, bits 7:6: 1 = access flag, 2 = access and dirty.
pub const IDR0_HTTU_SHIFT: u32 = 6;
pub const IDR0_HTTU_MASK: u64 = 3 << IDR0_HTTU_SHIFT;
pub const IDR0_HTTU_HA_HD: u64 = 2 << IDR0_HTTU_SHIFT;
/// SMMU_IDR0.COHACC: coherent table walks (FEAT_COHERENCY), required for dirty tracking.
pub const IDR0_COHACC: u64 = 1 << 4;

/// CD word 0 fields used here (TTB0 lives in word 1 and is not modelled in the word).
pub const CD0_T0SZ_48: u64 = 16;
pub const CD0_IRGN0_WBWA: u64 = 1 << 8;
pub const CD0_ORGN0_WBWA: u64 = 1 << 10;
pub const CD0_SH0_IS: u64 = 3 << 12;
pub const CD0_EPD1: u64 = 1 << 30;
pub const CD0_V: u64 = 1 << 31;
pub const CD0_IPS_48: u64 = 5 << 32;
pub const CD0_AA64: u64 = 1 << 41;
pub const CD0_HD: u64 = 1 << 42;
pub const CD0_HA: u64 = 1 << 43;
pub const CD0_R: u64 = 1 << 45;
pub const CD0_A: u64 = 1 << 46;
pub const CD0_ASET: u64 = 1 << 47;

/// Marker type for the Arm LPAE stage-1 format.
pub struct ArmLpaeS1;

impl Format for ArmLpaeS1 {
    const KIND: FormatKind = FormatKind::ArmLpaeS1;
    const TABLE_ACCESSED: bool = false;

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
        if pte & VALID == 0 {
            return Pte::Empty;
        }
        if level > 0 && pte & TYPE_TABLE != 0 {
            return Pte::Table { pa: pte & OA_MASK };
        }
        if level == 0 && pte & TYPE_PAGE == 0 {
            // 01b at the last level is reserved: treat as invalid, as the walker would fault.
            return Pte::Empty;
        }
        let writable = pte & AP_RDONLY == 0 || pte & DBM != 0;
        Pte::Leaf {
            pa: pte & OA_MASK,
            size_lg2: level_shift(level),
            perm: if writable { Perm::RW } else { Perm::READ },
        }
    }

    fn table(pa: u64, _level: usize) -> u64 {
        (pa & OA_MASK) | TYPE_TABLE | VALID
    }

    fn leaf(pa: u64, level: usize, size_lg2: u32, perm: Perm, tracking_domain: bool) -> u64 {
        debug_assert_eq!(size_lg2, level_shift(level));
        let mut pte = (pa & OA_MASK) | NG | AP_UNPRIV | ATTRINDX_CACHE | SH_IS | AF | VALID;
        if level == 0 {
            pte |= TYPE_PAGE;
        }
        if !perm.write() {
            pte |= AP_RDONLY;
        } else if tracking_domain {
            pte |= DBM;
        }
        pte
    }

    fn effective_perm(perm: Perm) -> Perm {
        // Stage 1 cannot express write-only: a writable entry is readable too.
        if perm.write() {
            Perm::RW
        } else {
            perm
        }
    }

    #[inline(always)]
    fn is_dirty(pte: u64) -> bool {
        pte & (DBM | AP_RDONLY) == DBM
    }
    #[inline(always)]
    fn dirty_bits(pte: u64) -> u64 {
        // DBM set and AP[2] clear: AP[2] shifted up onto DBM's position knocks DBM out.
        pte & !(pte << (DBM.trailing_zeros() - AP_RDONLY.trailing_zeros())) & DBM
    }
    #[inline(always)]
    fn none_dirty(block: &[u64; 8]) -> bool {
        // Clean entries of a tracking domain have AP[2] set (writable ones wait for DBM to
        // clear it): one AND answers for a whole block of them.
        block.iter().fold(!0, |acc, &pte| acc & pte) & AP_RDONLY != 0
            || block.iter().fold(0, |acc, &pte| acc | Self::dirty_bits(pte)) == 0
    }
    #[inline(always)]
    fn is_contig(_pte: u64, _level: usize) -> bool {
        false // the contiguous hint is not modelled: every leaf is one entry
    }
    #[inline(always)]
    fn clean(pte: u64) -> u64 {
        if pte & DBM != 0 {
            pte | AP_RDONLY
        } else {
            pte
        }
    }
    fn dirty(pte: u64) -> u64 {
        if pte & DBM != 0 {
            pte & !AP_RDONLY
        } else {
            pte
        }
    }
    fn leaf_accessed_bits(pte: u64) -> u64 {
        pte & AF
    }

    #[inline(always)]
    fn leaf_access(pte: u64, write: bool, ad: AdEnable) -> Result<u64, FaultReason> {
        let mut new = pte;
        if ad.access {
            new |= AF;
        }
        if write && pte & AP_RDONLY != 0 {
            if pte & DBM != 0 && ad.dirty {
                new &= !AP_RDONLY;
            } else {
                return Err(FaultReason::Permission);
            }
        }
        Ok(new)
    }
    #[inline(always)]
    fn table_access(pte: u64, _ad: AdEnable) -> u64 {
        pte
    }
    #[inline(always)]
    fn table_accessed(_pte: u64) -> bool {
        true
    }
    fn table_clear_accessed(pte: u64) -> u64 {
        pte
    }
    fn table_set_accessed(pte: u64) -> u64 {
        pte
    }

    fn capability_register(dirty_capable: bool) -> u64 {
        if dirty_capable {
            IDR0_HTTU_HA_HD | IDR0_COHACC
        } else {
            IDR0_COHACC
        }
    }
    fn capable_dirty(cap: u64) -> bool {
        cap & IDR0_HTTU_MASK == IDR0_HTTU_HA_HD && cap & IDR0_COHACC != 0
    }
    fn context(_root_pa: u64, tracking_domain: bool) -> u64 {
        let mut cd = CD0_T0SZ_48
            | CD0_IRGN0_WBWA
            | CD0_ORGN0_WBWA
            | CD0_SH0_IS
            | CD0_EPD1
            | CD0_V
            | CD0_IPS_48
            | CD0_AA64
            | CD0_R
            | CD0_A
            | CD0_ASET;
        if tracking_domain {
            cd |= CD0_HA | CD0_HD;
        }
        cd
    }
    fn context_set_tracking(ctx: u64, _enable: bool) -> u64 {
        // Linux's arm_smmu_set_dirty_tracking() returns 0 and touches nothing.
        ctx
    }
    #[inline(always)]
    fn context_ad(ctx: u64) -> AdEnable {
        AdEnable {
            access: ctx & CD0_HA != 0,
            dirty: ctx & CD0_HD != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_raw() {
        // Page, writable, dirty-tracking domain: born dirty (DBM=1, AP[2]=0).
        let page = ArmLpaeS1::leaf(0x1234_5678_0000, 0, 12, Perm::RW, true);
        assert_eq!(page, 0x0008_1234_5678_0f47);
        assert!(ArmLpaeS1::is_dirty(page));
        // Read-only page: AP[2] set, no DBM.
        assert_eq!(
            ArmLpaeS1::leaf(0x1234_5678_0000, 0, 12, Perm::READ, true),
            0x0000_1234_5678_0fc7
        );
        // Writable page in a domain without HD: no DBM.
        assert_eq!(
            ArmLpaeS1::leaf(0x1234_5678_0000, 0, 12, Perm::RW, false),
            0x0000_1234_5678_0f47
        );
        // 2 MiB block: type 01b.
        assert_eq!(
            ArmLpaeS1::leaf(0x4020_0000, 1, 21, Perm::RW, true),
            0x0008_0000_4020_0f45
        );
        assert_eq!(ArmLpaeS1::table(0x5000, 2), 0x5003);
    }

    #[test]
    fn httu_dirty_state_machine() {
        let on = ArmLpaeS1::context_ad(ArmLpaeS1::context(0, true));
        let born = ArmLpaeS1::leaf(0x1000, 0, 12, Perm::RW, true);
        let clean = ArmLpaeS1::clean(born);
        assert_eq!(clean, born | AP_RDONLY);
        assert!(!ArmLpaeS1::is_dirty(clean));
        // A write to writable-clean clears AP[2].
        assert_eq!(ArmLpaeS1::leaf_access(clean, true, on), Ok(born));
        // A read changes nothing.
        assert_eq!(ArmLpaeS1::leaf_access(clean, false, on), Ok(clean));
        // Without HD the same write is a permission fault.
        assert_eq!(
            ArmLpaeS1::leaf_access(clean, true, AdEnable::default()),
            Err(FaultReason::Permission)
        );
        let ro = ArmLpaeS1::leaf(0x1000, 0, 12, Perm::READ, true);
        assert_eq!(ArmLpaeS1::leaf_access(ro, true, on), Err(FaultReason::Permission));
    }

    #[test]
    fn registers() {
        assert_eq!(ArmLpaeS1::capability_register(true), 0x90);
        assert!(ArmLpaeS1::capable_dirty(0x90));
        assert!(!ArmLpaeS1::capable_dirty(0x50));
        assert_eq!(ArmLpaeS1::context(0, true), 0x0000_ee05_c000_3510);
        assert_eq!(ArmLpaeS1::context(0, false), 0x0000_e205_c000_3510);
    }
}
