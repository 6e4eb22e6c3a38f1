//! Page-table formats. Each format only says how an entry is encoded; the walker
//! (`walker.rs`) does everything else once, for all of them. The hooks carry the names of
//! Linux's generic page table (`drivers/iommu/generic_pt`) as doc aliases, and the facts each
//! format encodes are in `docs/iommu.md`.
//!
//! Geometry shared by the three formats modelled here: a 4 KiB granule, 512 entries per table,
//! 4 levels, 48-bit IOVA. Levels are numbered from the leaf table up, as in Linux's
//! `generic_pt`: level 0 holds 4 KiB entries, level 1 2 MiB, level 2 1 GiB, level 3 is the root.

pub mod amd_v1;
pub mod arm_lpae_s1;
pub mod vtd_ss;

pub use amd_v1::AmdV1;
pub use arm_lpae_s1::ArmLpaeS1;
pub use vtd_ss::VtdSs;

/// Number of levels in every modelled table.
pub const LEVELS: usize = 4;
/// log2 of the granule.
pub const PAGE_SHIFT: u32 = 12;
/// The granule: 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Width of the IOVA space.
pub const IOVA_BITS: u32 = 48;
/// Bits 51:12, where AMD v1 and VT-d keep the output address (Arm uses bits 47:12,
/// `arm_lpae_s1::OA_MASK`: its bit 51 is DBM).
pub const OA_MASK: u64 = ((1u64 << 52) - 1) & !(PAGE_SIZE - 1);

/// log2 of the span of one entry in a table at `level`.
#[inline(always)]
pub const fn level_shift(level: usize) -> u32 {
    PAGE_SHIFT + 9 * level as u32
}

/// The level whose entries span `1 << size_lg2` or the next smaller power of 512.
#[inline(always)]
pub const fn level_of_size(size_lg2: u32) -> usize {
    ((size_lg2 - PAGE_SHIFT) / 9) as usize
}

/// Access permissions of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    pub const NONE: Perm = Perm(0);
    pub const READ: Perm = Perm(1);
    pub const WRITE: Perm = Perm(2);
    pub const RW: Perm = Perm(3);

    pub const fn bits(self) -> u8 {
        self.0
    }
    pub const fn from_bits(bits: u8) -> Perm {
        Perm(bits & 3)
    }
    pub const fn read(self) -> bool {
        self.0 & 1 != 0
    }
    pub const fn write(self) -> bool {
        self.0 & 2 != 0
    }
    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
}

/// What one entry means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pte {
    /// Not present.
    Empty,
    /// Points to the next-level table at `pa`.
    Table { pa: u64 },
    /// Maps `1 << size_lg2` bytes at `pa` (aligned to the size). A leaf larger than one entry's
    /// span is replicated over `1 << (size_lg2 - level_shift(level))` consecutive entries.
    Leaf { pa: u64, size_lg2: u32, perm: Perm },
}

/// Which hardware updates the per-domain enable allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AdEnable {
    /// Set Accessed bits (leaf and, where the format has them, non-leaf).
    pub access: bool,
    /// Set Dirty bits on writes.
    pub dirty: bool,
}

/// Why a translation faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// No valid translation for the IOVA.
    NotPresent,
    /// The leaf does not allow the access.
    Permission,
    /// The IOVA is above the 48-bit input range.
    AddressSize,
    /// Nested translation: stage 2 has no translation for a guest-physical address the walk
    /// needed (a stage-1 table, or the output of stage 1).
    Stage2NotPresent,
    /// Nested translation: stage 2 does not allow the access (a write to a read-only GPA, or
    /// a stage-1 A/D update to a stage-1 table that stage 2 maps read-only).
    Stage2Permission,
}

impl FaultReason {
    /// The same fault, raised by stage 2 of a nested walk.
    pub fn in_stage2(self) -> FaultReason {
        match self {
            FaultReason::NotPresent | FaultReason::AddressSize => FaultReason::Stage2NotPresent,
            FaultReason::Permission => FaultReason::Stage2Permission,
            other => other,
        }
    }
}

/// Identifies a format at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FormatKind {
    AmdV1,
    VtdSs,
    ArmLpaeS1,
}

impl FormatKind {
    pub const ALL: [FormatKind; 3] = [FormatKind::AmdV1, FormatKind::VtdSs, FormatKind::ArmLpaeS1];

    pub fn name(self) -> &'static str {
        match self {
            FormatKind::AmdV1 => "amd-v1",
            FormatKind::VtdSs => "vtd-ss",
            FormatKind::ArmLpaeS1 => "arm-lpae-s1",
        }
    }

    pub fn parse(s: &str) -> Option<FormatKind> {
        FormatKind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether a table descriptor carries an Accessed bit that hardware sets while tracking,
    /// which lets the harvest skip untouched subtrees.
    pub fn has_table_accessed(self) -> bool {
        match self {
            FormatKind::AmdV1 => AmdV1::TABLE_ACCESSED,
            FormatKind::VtdSs => VtdSs::TABLE_ACCESSED,
            FormatKind::ArmLpaeS1 => ArmLpaeS1::TABLE_ACCESSED,
        }
    }
}

impl std::fmt::Display for FormatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Encoding of one page-table format, plus its capability and per-domain context registers.
///
/// All functions are pure; the walker applies them with atomic operations.
pub trait Format: Send + Sync + 'static {
    const KIND: FormatKind;
    /// Whether non-leaf entries have an Accessed bit set by the walk while tracking.
    const TABLE_ACCESSED: bool;

    /// log2 of the leaf sizes an entry of a table at `level` can encode, largest first.
    /// The first one at each level above 0 is the default ("huge") leaf of that level, except
    /// where replicated encodings give larger sizes.
    #[doc(alias = "possible_sizes")]
    #[doc(alias = "pt_possible_sizes")]
    fn leaf_sizes(level: usize) -> &'static [u32];
    /// Decodes an entry of a table at `level`.
    fn decode(pte: u64, level: usize) -> Pte;
    /// An entry of a table at `level` pointing to the table at `pa` (one level down).
    fn table(pa: u64, level: usize) -> u64;
    /// Replica number `replica` of a leaf of `1 << size_lg2` bytes at `pa`, in a table at
    /// `level`. `tracking_domain` is true for domains allocated for dirty tracking (Arm sets DBM).
    fn leaf(pa: u64, level: usize, size_lg2: u32, perm: Perm, tracking_domain: bool) -> u64;
    /// The permissions the hardware actually grants for a requested set.
    fn effective_perm(perm: Perm) -> Perm {
        perm
    }

    /// Whether a leaf entry records a write.
    #[doc(alias = "entry_is_write_dirty")]
    #[doc(alias = "pt_entry_is_write_dirty")]
    fn is_dirty(pte: u64) -> bool;
    /// Bits of a leaf entry that are all zero unless it is dirty, so that the OR of a run of
    /// entries' `dirty_bits` is zero exactly when none is dirty: the harvest tests eight
    /// entries with a few instructions this way.
    #[inline(always)]
    fn dirty_bits(pte: u64) -> u64 {
        Self::is_dirty(pte) as u64
    }
    /// Whether none of eight leaf entries is dirty: the harvest's test of a block of a leaf
    /// table, where most entries are clean at low dirt.
    #[inline(always)]
    fn none_dirty(block: &[u64; 8]) -> bool {
        block.iter().fold(0, |acc, &pte| acc | Self::dirty_bits(pte)) == 0
    }
    /// Whether a present leaf entry of a table at `level` is one replica of a contiguous leaf
    /// (a leaf that occupies more than one entry). The harvest asks this of every dirty entry,
    /// so formats answer it without a full decode.
    #[doc(alias = "entry_num_contig_lg2")]
    #[doc(alias = "pt_entry_num_contig_lg2")]
    #[inline(always)]
    fn is_contig(pte: u64, level: usize) -> bool {
        matches!(Self::decode(pte, level), Pte::Leaf { size_lg2, .. } if size_lg2 > level_shift(level))
    }
    /// The entry with its dirty state reset ("write clean").
    #[doc(alias = "entry_make_write_clean")]
    #[doc(alias = "pt_entry_make_write_clean")]
    fn clean(pte: u64) -> u64;
    /// The entry marked dirty, as software does when it splits a dirty leaf.
    #[doc(alias = "entry_make_write_dirty")]
    fn dirty(pte: u64) -> u64;
    /// The accessed-state bits of a leaf (copied to the pieces of a split).
    fn leaf_accessed_bits(pte: u64) -> u64;

    /// The hardware's update of a leaf on an access: the new value (equal to `pte` when no
    /// update is needed) or a fault.
    fn leaf_access(pte: u64, write: bool, ad: AdEnable) -> Result<u64, FaultReason>;
    /// The hardware's update of a non-leaf entry used by a walk.
    fn table_access(pte: u64, ad: AdEnable) -> u64;
    /// Whether a non-leaf entry has its Accessed bit set (always true without `TABLE_ACCESSED`).
    fn table_accessed(pte: u64) -> bool;
    /// Whether an entry of a table at `level` points to a table and has Accessed clear: no
    /// walk went through it since A was cleared. The harvest asks this of every table entry
    /// it passes, so formats with table A bits answer it without a full decode.
    #[inline(always)]
    fn untouched_table(pte: u64, level: usize) -> bool {
        matches!(Self::decode(pte, level), Pte::Table { .. }) && !Self::table_accessed(pte)
    }
    /// Whether all eight entries of a table at `level` are [`untouched_table`](Self::untouched_table):
    /// the harvest's phase 1 passes a block of a sparsely touched table at once. Without
    /// short-circuits, so that the eight tests compile to straight-line code.
    #[inline(always)]
    fn untouched_tables(block: &[u64; 8], level: usize) -> bool {
        block
            .iter()
            .fold(true, |acc, &pte| acc & Self::untouched_table(pte, level))
    }
    /// The non-leaf entry with Accessed cleared.
    fn table_clear_accessed(pte: u64) -> u64;
    /// The non-leaf entry with Accessed set (software, when it builds a subtree holding dirt).
    fn table_set_accessed(pte: u64) -> u64;

    /// Capability register value of an IOMMU of this kind, with or without dirty tracking.
    fn capability_register(dirty_capable: bool) -> u64;
    /// Whether the capability register advertises hardware dirty tracking.
    fn capable_dirty(cap: u64) -> bool;
    /// The per-domain context word (DTE qword 0, PASID entry qword 0, CD word 0) for a table
    /// rooted at `root_pa`, as set up at attach time.
    fn context(root_pa: u64, tracking_domain: bool) -> u64;
    /// The context word with tracking switched on or off.
    fn context_set_tracking(ctx: u64, enable: bool) -> u64;
    /// Which updates the context word enables.
    fn context_ad(ctx: u64) -> AdEnable;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert_eq!(level_shift(0), 12);
        assert_eq!(level_shift(1), 21);
        assert_eq!(level_shift(2), 30);
        assert_eq!(level_shift(3), 39);
        assert_eq!(level_of_size(12), 0);
        assert_eq!(level_of_size(20), 0);
        assert_eq!(level_of_size(21), 1);
        assert_eq!(level_of_size(30), 2);
        assert_eq!(OA_MASK, 0x000f_ffff_ffff_f000);
    }

    fn fast_tests_agree<F: Format>(pte: u64) {
        assert_eq!(
            F::dirty_bits(pte) != 0,
            F::is_dirty(pte),
            "{:?} dirty_bits of {pte:#x}",
            F::KIND
        );
        for level in 0..LEVELS - 1 {
            if let Pte::Leaf { size_lg2, .. } = F::decode(pte, level) {
                let want = size_lg2 > level_shift(level);
                assert_eq!(
                    F::is_contig(pte, level),
                    want,
                    "{:?} is_contig of {pte:#x} at {level}",
                    F::KIND
                );
            }
        }
    }

    fn block_agrees<F: Format>(picks: &[u8; 8], raw: &[u64; 8]) {
        let leaf = F::leaf(0x4000_0000, 0, 12, Perm::RW, true);
        let block: [u64; 8] = std::array::from_fn(|j| match picks[j] {
            0 => F::clean(leaf),
            1 => F::dirty(leaf),
            2 => 0,
            _ => raw[j],
        });
        let want = !block.iter().any(|&pte| F::is_dirty(pte));
        assert_eq!(F::none_dirty(&block), want, "{:?} {block:x?}", F::KIND);
    }

    fn tables_agree<F: Format>(picks: &[u8; 8], raw: &[u64; 8], level: usize) {
        let table = F::table(0x4000_0000, level);
        let block: [u64; 8] = std::array::from_fn(|j| match picks[j] {
            0 => F::table_clear_accessed(table),
            1 => F::table_set_accessed(table),
            2 => 0,
            _ => raw[j],
        });
        let want = block.iter().all(|&pte| F::untouched_table(pte, level));
        assert_eq!(F::untouched_tables(&block, level), want, "{:?} {block:x?}", F::KIND);
    }

    proptest::proptest! {
        /// The harvest's shortcuts (`dirty_bits`, `is_contig`) say what `is_dirty` and a full
        /// decode say, for any 64-bit value.
        #[test]
        fn shortcuts_match_the_decode(pte in proptest::num::u64::ANY) {
            fast_tests_agree::<AmdV1>(pte);
            fast_tests_agree::<VtdSs>(pte);
            fast_tests_agree::<ArmLpaeS1>(pte);
            for level in 0..LEVELS {
                let slow = |d: Pte, accessed: bool| matches!(d, Pte::Table { .. }) && !accessed;
                proptest::prop_assert_eq!(AmdV1::untouched_table(pte, level), slow(AmdV1::decode(pte, level), AmdV1::table_accessed(pte)));
                proptest::prop_assert_eq!(VtdSs::untouched_table(pte, level), slow(VtdSs::decode(pte, level), VtdSs::table_accessed(pte)));
            }
        }

        /// `none_dirty` of a block says what `is_dirty` of each entry says, for blocks of
        /// clean, dirty, empty and arbitrary entries.
        #[test]
        fn block_test_matches_is_dirty(picks in proptest::array::uniform8(0u8..4), raw in proptest::array::uniform8(proptest::num::u64::ANY)) {
            block_agrees::<AmdV1>(&picks, &raw);
            block_agrees::<VtdSs>(&picks, &raw);
            block_agrees::<ArmLpaeS1>(&picks, &raw);
        }

        /// `untouched_tables` of a block says what `untouched_table` of each entry says, for
        /// blocks of untouched, accessed, empty and arbitrary entries at every level.
        #[test]
        fn table_block_test_matches_untouched_table(picks in proptest::array::uniform8(0u8..4), raw in proptest::array::uniform8(proptest::num::u64::ANY), level in 1..LEVELS) {
            tables_agree::<AmdV1>(&picks, &raw, level);
            tables_agree::<VtdSs>(&picks, &raw, level);
        }
    }

    #[test]
    fn shortcuts_on_real_leaves() {
        use crate::format::amd_v1::{D, NEXT_LEVEL_SHIFT, NL_SIZE};
        // A 64 KiB AMD leaf at level 0 is sixteen replicas with NextLevel 7.
        let leaf = AmdV1::leaf(0x10_0000, 0, 16, Perm::RW, true);
        assert_eq!((leaf >> NEXT_LEVEL_SHIFT) & 7, NL_SIZE);
        assert!(AmdV1::is_contig(leaf, 0));
        assert!(!AmdV1::is_contig(AmdV1::leaf(0x10_0000, 0, 12, Perm::RW, true), 0));
        assert_eq!(AmdV1::dirty_bits(leaf | D), D);
        let arm = ArmLpaeS1::leaf(0x10_0000, 0, 12, Perm::RW, true);
        assert_eq!(
            ArmLpaeS1::dirty_bits(ArmLpaeS1::clean(arm)),
            0,
            "clean: DBM with AP[2] set"
        );
        assert_ne!(ArmLpaeS1::dirty_bits(arm), 0, "a fresh writable leaf is dirty");
        assert_ne!(ArmLpaeS1::dirty_bits(ArmLpaeS1::dirty(arm)), 0);
    }
}
