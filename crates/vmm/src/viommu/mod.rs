//! A guest that programs its own IOMMU (`docs/viommu.md`): the vIOMMU in front of an
//! accelerator, in one of two designs, and the address space the device's DMA goes through,
//! as a migration engine sees it ([`DmaSpace`]).
//!
//! * **Nested** (`nested.rs`): the guest writes a VT-d first-stage table in its RAM and
//!   invalidates through a VT-d invalidation queue; the host's stage 2 maps RAM at IOVA = GPA
//!   in a `NEST_PARENT | DIRTY_TRACKING` HWPT, whose bitmap is indexed by GPA.
//! * **Shadow** (`shadow.rs`): the guest sends virtio-iommu MAP and UNMAP requests; the VMM
//!   maps IOVA → guest RAM in a single-stage HWPT, keeps the IOVA → GPA table, and, while a
//!   migration logs, unmaps with `LIVEMIG_IOAS_UNMAP_DIRTY` so that no write is lost.
//!
//! Register block (4 KiB at [`crate::layout::viommu_mmio`]), little-endian:
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x000 | ID | r32 | `0x4c4d_5649` ("LMVI") |
//! | 0x004 | MODE | r32 | 1 nested, 2 shadow |
//! | 0x080 | IQH | r64 | nested: invalidation queue head (VT-d layout, index << 4) |
//! | 0x088 | IQT | rw64 | nested: tail; a write runs the queue up to it |
//! | 0x090 | IQA | rw64 | nested: queue base, size (VT-d layout) |
//! | 0x0b0 | IQERR | r32 | nested: non-zero when the queue stopped on a bad descriptor |
//! | 0x100 | REQ | w64 | shadow: guest-physical address of a virtio-iommu request; the write executes it |
//! | 0x108 | REQ_STATUS | r32 | shadow: the status of the last request |

mod nested;
mod shadow;

pub(crate) use nested::NestedViommu;
pub(crate) use shadow::ShadowViommu;

pub const ID_VALUE: u32 = 0x4c4d_5649;
pub const ID: u64 = 0x000;
pub const MODE: u64 = 0x004;
pub const IQH: u64 = iommu::nested::inv_queue::IQH_REG;
pub const IQT: u64 = iommu::nested::inv_queue::IQT_REG;
pub const IQA: u64 = iommu::nested::inv_queue::IQA_REG;
pub const IQERR: u64 = 0x0b0;
pub const REQ: u64 = 0x100;
pub const REQ_STATUS: u64 = 0x108;
pub const MMIO_SIZE: u64 = 0x1000;

/// The guest's side of the vIOMMU area (offsets from [`crate::layout::viommu_area`]).
pub mod area {
    /// Stage-1 tables, one chain: root, level 2, level 1, leaf table.
    pub const S1: u64 = 0x0000;
    pub const S1_LEAF: u64 = 0x3000;
    /// The invalidation queue: one page, 256 descriptors of 16 bytes.
    pub const IQ: u64 = 0x4000;
    pub const IQ_ENTRIES: u64 = 256;
    /// Where invalidation waits write their status.
    pub const WAIT_STATUS: u64 = 0x5000;
    /// The request buffer of the shadow design.
    pub const REQ: u64 = 0x5040;
    /// Per-slot state of the client: GPA, expected qword, busy, generation (32 bytes each).
    pub const SLOTS: u64 = 0x6000;
    /// Pages the client's buffers are taken from.
    pub const POOL: u64 = 0x1_0000;
    pub const POOL_PAGES: u64 = (0x20_0000 - POOL) / 4096;
}

/// virtio-iommu request types and statuses (virtio specification, IOMMU device).
pub mod virtio {
    pub const T_MAP: u8 = 3;
    pub const T_UNMAP: u8 = 4;
    pub const MAP_READ: u32 = 1 << 0;
    pub const MAP_WRITE: u32 = 1 << 1;
    pub const MAP_MMIO: u32 = 1 << 2;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
    pub const S_DEVERR: u8 = 3;
    pub const S_INVAL: u8 = 4;
    pub const S_RANGE: u8 = 5;
    /// `struct virtio_iommu_req_map`: head, domain, virt_start, virt_end, phys_start, flags,
    /// tail (status at 36).
    pub const MAP_LEN: usize = 40;
    pub const MAP_STATUS: usize = 36;
    /// `struct virtio_iommu_req_unmap`: head, domain, virt_start, virt_end, reserved, tail
    /// (status at 28).
    pub const UNMAP_LEN: usize = 32;
    pub const UNMAP_STATUS: usize = 28;
}

/// The vIOMMU state a migration carries with the vCPUs (registers, the shadow table): the
/// guest's stage-1 tables and queue are in its RAM and migrate as pages.
pub(crate) trait ViommuState: Send + Sync {
    fn save(&self) -> Vec<u8>;
    /// Loads a saved state into this (never run) vIOMMU.
    fn restore(&self, b: &[u8]) -> Result<(), String>;
}

/// Splits a platform state (`Snapshots::save_platform`): a device count, then per device its
/// vIOMMU mode, a u32 length and that many bytes of state. Refuses anything cut or extended.
pub fn parse_platform(b: &[u8]) -> Result<Vec<(u8, &[u8])>, String> {
    let (&n, mut rest) = b.split_first().ok_or("empty")?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (head, tail) = rest.split_at_checked(5).ok_or("cut short")?;
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        let (st, tail) = tail.split_at_checked(len).ok_or("cut short")?;
        out.push((head[0], st));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err("bytes after the last device".into());
    }
    Ok(out)
}

/// Little-endian u64 at `o`, if `b` holds it.
pub(crate) fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Whether a device has a vIOMMU, and which design.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ViommuMode {
    /// The VMM maps all of guest RAM at IOVA = GPA once.
    #[default]
    Off,
    /// The guest's stage 1 on the host's stage 2.
    Nested,
    /// The guest asks the VMM to map and unmap (virtio-iommu style).
    Shadow,
}

impl ViommuMode {
    pub const ALL: [ViommuMode; 3] = [ViommuMode::Off, ViommuMode::Nested, ViommuMode::Shadow];

    pub fn name(self) -> &'static str {
        match self {
            ViommuMode::Off => "off",
            ViommuMode::Nested => "nested",
            ViommuMode::Shadow => "shadow",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
    /// The MODE register's value.
    pub fn register(self) -> u32 {
        self as u32
    }
}

impl std::fmt::Display for ViommuMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One mapping to guest RAM: `(iova, length, gpa)`.
pub type Mapping = (u64, u64, u64);

/// What an unmap does with the dirty state of what it removes, while a migration tracks the
/// device's writes (`docs/viommu.md#the-shadow-viommu`).
#[derive(Clone)]
pub enum UnmapLog {
    /// The HWPT's bits leave with the translation: unmap with `LIVEMIG_IOAS_UNMAP_DIRTY`.
    Hwpt,
    /// The device logs by IOVA over the whole window: unmap (which drains the device's
    /// accesses), then read and clear the device's log for the range.
    Device(vfio::MigrationDevice),
}

/// How a device's addresses lead to guest RAM, for whoever tracks its writes. With IOVA = GPA
/// (no vIOMMU, or nested, where the tracked HWPT is stage 2) this is the identity on RAM;
/// with a shadow vIOMMU it is the guest's current mappings, and unmaps hand over their dirt.
pub trait DmaSpace: Send + Sync {
    /// Calls `f` with the IOVA ranges mapped now that lead to guest RAM and holds them still
    /// while it runs: a harvest reads the bits of a range and translates them before the
    /// guest can unmap or remap it.
    fn with_ram_mappings(&self, f: &mut dyn FnMut(&[Mapping]));
    /// Whether the device's addresses are guest-physical addresses (no translation needed).
    fn identity(&self) -> bool;
    /// The IOVA ranges a device's own DMA log must cover to see every write, whatever the
    /// guest maps later: RAM for the identity, the whole IOVA window for a shadow vIOMMU. An
    /// error where a device log cannot be translated to guest pages (nested: see
    /// `docs/viommu.md#device-dma-logging`).
    fn log_ranges(&self) -> Result<Vec<(u64, u64)>, String>;
    /// From now on, unmaps keep the dirt of what they remove (`Some`), or not (`None`).
    fn set_unmap_log(&self, log: Option<UnmapLog>);
    /// Guest page frames whose dirt left with an unmap since the last call.
    fn take_unmapped_dirty(&self) -> Vec<u64>;
}

/// Reads and clears the dirty bits of `(iova, length)` into an LSB-first bitmap of 4 KiB pages.
pub type ReadDirty<'a> = dyn FnMut(u64, u64, &mut [u8]) -> Result<(), iommu::Errno> + 'a;

/// Adds to `out` the guest pages `read` reports dirty for the device's current mappings
/// (`read(iova, length, bitmap)` fills an LSB-first bitmap of 4 KiB pages and clears what it
/// reports), translated through `space`, plus the pages whose dirt left with an unmap. This
/// is where IOVA-indexed bits become guest-physical pages, before they meet KVM's log.
pub fn harvest_translated(
    space: &dyn DmaSpace,
    buf: &mut Vec<u8>,
    out: &mut crate::PageBitmap,
    read: &mut ReadDirty<'_>,
) -> Result<(), iommu::Errno> {
    let mut r = Ok(());
    space.with_ram_mappings(&mut |maps| {
        for &(iova, len, gpa) in maps {
            buf.clear();
            buf.resize((len / 4096).div_ceil(8) as usize, 0);
            if let Err(e) = read(iova, len, buf) {
                r = Err(e);
                return;
            }
            out.set_from_bytes(gpa / 4096, buf);
        }
    });
    for pfn in space.take_unmapped_dirty() {
        out.set(pfn);
    }
    r
}

/// [`harvest_translated`] from a paging HWPT's dirty bits (`IOMMU_HWPT_GET_DIRTY_BITMAP`).
pub fn harvest_hwpt(
    fd: &iommufd::IommuFd,
    hwpt: u32,
    space: &dyn DmaSpace,
    buf: &mut Vec<u8>,
    out: &mut crate::PageBitmap,
) -> Result<(), iommu::Errno> {
    harvest_translated(space, buf, out, &mut |iova, length, data| {
        fd.hwpt_get_dirty_bitmap(&mut iommufd::HwptGetDirtyBitmap {
            hwpt_id: hwpt,
            flags: 0,
            __reserved: 0,
            iova,
            length,
            page_size: 4096,
            data,
        })
    })
}

/// The identity space: the IOAS's areas that are RAM, at IOVA = GPA. With a nested vIOMMU
/// this holds for the HWPT that is tracked (stage 2), not for the addresses the device
/// issues, which are the guest's IOVAs: then a device log is refused.
pub(crate) struct IdentitySpace {
    pub fd: std::sync::Arc<iommufd::IommuFd>,
    pub ioas: u32,
    pub slots: Vec<crate::Slot>,
    pub nested: bool,
}

impl DmaSpace for IdentitySpace {
    fn with_ram_mappings(&self, f: &mut dyn FnMut(&[Mapping])) {
        f(&self.ram_mappings())
    }
    fn identity(&self) -> bool {
        true
    }
    fn log_ranges(&self) -> Result<Vec<(u64, u64)>, String> {
        if self.nested {
            return Err(
                "a device's DMA log behind a nested vIOMMU is indexed by the guest's IOVAs, \
                        and the guest changes its stage-1 table without the VMM seeing the old \
                        translation: track with the IOMMU (stage 2 is indexed by guest-physical \
                        address) instead"
                    .into(),
            );
        }
        Ok(self.ram_mappings().into_iter().map(|(i, l, _)| (i, l)).collect())
    }
    fn set_unmap_log(&self, _log: Option<UnmapLog>) {}
    fn take_unmapped_dirty(&self) -> Vec<u64> {
        Vec::new()
    }
}

impl IdentitySpace {
    fn ram_mappings(&self) -> Vec<Mapping> {
        let in_ram = |iova: u64, len: u64| self.slots.iter().any(|s| s.gpa <= iova && iova + len <= s.gpa + s.size);
        self.fd
            .ioas_areas(self.ioas)
            .unwrap_or_default()
            .into_iter()
            .filter(|&(i, l, _)| in_ram(i, l))
            .map(|(i, l, _)| (i, l, i))
            .collect()
    }
}
