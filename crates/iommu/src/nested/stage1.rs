//! Stage-1 formats: the page tables a guest builds in its own memory, IOVA → guest-physical
//! (`docs/viommu.md#stage-1-formats`).
//!
//! Two are modelled:
//! * **VT-d first stage** ([`VtdFs`]): the x86-64 4-level paging format, which VT-d uses for its
//!   first stage and AMD for its guest (v2) table. Its natural parent is a VT-d second-stage
//!   domain (or an AMD v1 one).
//! * **Arm LPAE stage 1** ([`ArmLpaeS1`], the format the crate already has), with HTTU on: an
//!   SMMUv3 CD the guest owns.
//!
//! A stage-1 entry is never written by the host's software: the guest writes it, and the
//! hardware only sets Accessed and Dirty in it. Unlike a second-stage table, the A/D updates of
//! a stage-1 table are always on (VT-d has no enable for first-stage A/D; the Arm guest's CD
//! sets HA/HD), so these hooks take no context word.

use crate::format::{level_shift, AdEnable, ArmLpaeS1, FaultReason, Format, Perm, Pte, OA_MASK};

/// Which stage-1 format a nested domain walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage1Kind {
    VtdFs,
    ArmLpaeS1,
}

impl Stage1Kind {
    pub const ALL: [Stage1Kind; 2] = [Stage1Kind::VtdFs, Stage1Kind::ArmLpaeS1];

    pub fn name(self) -> &'static str {
        match self {
            Stage1Kind::VtdFs => "vtd-fs",
            Stage1Kind::ArmLpaeS1 => "arm-lpae-s1",
        }
    }

    pub fn parse(s: &str) -> Option<Stage1Kind> {
        Stage1Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The entry pointing at a table at guest-physical `gpa`, in a table at `level`.
    pub fn table(self, gpa: u64, level: usize) -> u64 {
        match self {
            Stage1Kind::VtdFs => VtdFs::table(gpa, level),
            Stage1Kind::ArmLpaeS1 => <ArmLpaeS1 as Stage1>::table(gpa, level),
        }
    }

    /// A leaf of `1 << size_lg2` bytes at `gpa` in a table at `level`, as a guest driver
    /// writes it (clean, not accessed).
    pub fn leaf(self, gpa: u64, level: usize, size_lg2: u32, perm: Perm) -> u64 {
        match self {
            Stage1Kind::VtdFs => VtdFs::leaf(gpa, level, size_lg2, perm),
            Stage1Kind::ArmLpaeS1 => <ArmLpaeS1 as Stage1>::leaf(gpa, level, size_lg2, perm),
        }
    }

    /// Decodes an entry of a table at `level`.
    pub fn decode(self, pte: u64, level: usize) -> Pte {
        match self {
            Stage1Kind::VtdFs => VtdFs::decode(pte, level),
            Stage1Kind::ArmLpaeS1 => <ArmLpaeS1 as Stage1>::decode(pte, level),
        }
    }

    /// Whether a leaf records a write.
    pub fn is_dirty(self, pte: u64) -> bool {
        match self {
            Stage1Kind::VtdFs => VtdFs::is_dirty(pte),
            Stage1Kind::ArmLpaeS1 => <ArmLpaeS1 as Stage1>::is_dirty(pte),
        }
    }

    /// Whether an entry (leaf, or table where the format has the bit) records that a walk used it.
    pub fn is_accessed(self, pte: u64) -> bool {
        match self {
            Stage1Kind::VtdFs => pte & vtd_fs::A != 0,
            Stage1Kind::ArmLpaeS1 => pte & crate::format::arm_lpae_s1::AF != 0,
        }
    }
}

impl std::fmt::Display for Stage1Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The encoding of a stage-1 format, as the nested walk uses it. All functions are pure.
pub trait Stage1: Send + Sync + 'static {
    const KIND: Stage1Kind;
    /// Decodes an entry of a table at `level`.
    fn decode(pte: u64, level: usize) -> Pte;
    /// Whether a table entry lets writes through to the leaves below it (x86's R/W is
    /// cumulative over the levels; Arm table descriptors here carry no permission).
    fn table_allows_write(_pte: u64) -> bool {
        true
    }
    /// The hardware's update of a table entry a walk uses.
    fn table_access(pte: u64) -> u64;
    /// The hardware's update of a leaf on an access, or a fault.
    fn leaf_access(pte: u64, write: bool) -> Result<u64, FaultReason>;
    fn is_dirty(pte: u64) -> bool;
    fn table(gpa: u64, level: usize) -> u64;
    fn leaf(gpa: u64, level: usize, size_lg2: u32, perm: Perm) -> u64;
}

pub mod vtd_fs {
    //! VT-d first-stage entries: x86-64 paging entries (Intel VT-d specification, chapter 3.6
    //! "First-Stage Translation" and 9.7 "First-Stage Paging Entries"; Linux:
    //! drivers/iommu/intel/iommu.h, `DMA_FL_PTE_*`). `docs/viommu.md#vt-d-first-stage`.
    //!
    //! | bits  | table entry               | leaf (4 KiB at level 0; PS = 1 at levels 1, 2) |
    //! |-------|---------------------------|------------------------------------------------|
    //! | 0     | P                         | P                                              |
    //! | 1     | R/W: writes allowed below | R/W                                            |
    //! | 2     | U/S = 1                   | U/S = 1                                        |
    //! | 5     | A, set by the walk        | A                                              |
    //! | 6     | (ignored)                 | D, set on a write                              |
    //! | 7     | PS = 0                    | PS = 1 for 2 MiB and 1 GiB leaves              |
    //! | 51:12 | next table (GPA)          | output GPA (bit 12 is PAT in a huge leaf)      |
    //! | 63    | XD                        | XD = 1 (a device never executes)               |
    //!
    //! A present entry is always readable; a write needs R/W at every level of the walk.
    //! Requests from a device carry no supervisor privilege, so Linux sets U/S everywhere; the
    //! model requires it on the leaf.
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    pub const PS: u64 = 1 << 7;
    pub const XD: u64 = 1 << 63;
}

/// Marker type for the VT-d first-stage format.
pub struct VtdFs;

impl Stage1 for VtdFs {
    const KIND: Stage1Kind = Stage1Kind::VtdFs;

    #[inline(always)]
    fn decode(pte: u64, level: usize) -> Pte {
        use vtd_fs::*;
        if pte & P == 0 {
            return Pte::Empty;
        }
        if level == 0 || pte & PS != 0 {
            let size_lg2 = level_shift(level);
            let perm = if pte & RW != 0 { Perm::RW } else { Perm::READ };
            Pte::Leaf {
                pa: pte & OA_MASK & !((1u64 << size_lg2) - 1),
                size_lg2,
                perm,
            }
        } else {
            Pte::Table { pa: pte & OA_MASK }
        }
    }

    fn table_allows_write(pte: u64) -> bool {
        pte & vtd_fs::RW != 0
    }

    #[inline(always)]
    fn table_access(pte: u64) -> u64 {
        pte | vtd_fs::A
    }

    #[inline(always)]
    fn leaf_access(pte: u64, write: bool) -> Result<u64, FaultReason> {
        use vtd_fs::*;
        if pte & US == 0 || (write && pte & RW == 0) {
            return Err(FaultReason::Permission);
        }
        Ok(if write { pte | A | D } else { pte | A })
    }

    fn is_dirty(pte: u64) -> bool {
        pte & vtd_fs::D != 0
    }

    fn table(gpa: u64, _level: usize) -> u64 {
        use vtd_fs::*;
        (gpa & OA_MASK) | P | RW | US
    }

    fn leaf(gpa: u64, level: usize, size_lg2: u32, perm: Perm) -> u64 {
        use vtd_fs::*;
        debug_assert_eq!(size_lg2, level_shift(level));
        let mut pte = (gpa & OA_MASK) | P | US | XD;
        if perm.write() {
            pte |= RW;
        }
        if level > 0 {
            pte |= PS;
        }
        pte
    }
}

/// Arm LPAE stage 1 as a guest's table: HA and HD on in the guest's CD, writable leaves with
/// DBM (born clean here: a guest driver that wants to see its own writes starts them
/// writable-clean; the host never reads stage-1 dirt either way).
impl Stage1 for ArmLpaeS1 {
    const KIND: Stage1Kind = Stage1Kind::ArmLpaeS1;

    fn decode(pte: u64, level: usize) -> Pte {
        <ArmLpaeS1 as Format>::decode(pte, level)
    }
    fn table_access(pte: u64) -> u64 {
        pte
    }
    fn leaf_access(pte: u64, write: bool) -> Result<u64, FaultReason> {
        <ArmLpaeS1 as Format>::leaf_access(
            pte,
            write,
            AdEnable {
                access: true,
                dirty: true,
            },
        )
    }
    fn is_dirty(pte: u64) -> bool {
        <ArmLpaeS1 as Format>::is_dirty(pte)
    }
    fn table(gpa: u64, level: usize) -> u64 {
        <ArmLpaeS1 as Format>::table(gpa, level)
    }
    fn leaf(gpa: u64, level: usize, size_lg2: u32, perm: Perm) -> u64 {
        let pte = <ArmLpaeS1 as Format>::leaf(gpa, level, size_lg2, perm, true);
        let pte = <ArmLpaeS1 as Format>::clean(pte);
        pte & !crate::format::arm_lpae_s1::AF
    }
}
