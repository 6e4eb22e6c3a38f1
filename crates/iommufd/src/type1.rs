//! The legacy VFIO type1 interface, for comparison (Linux: drivers/vfio/vfio_iommu_type1.c,
//! `docs/iommufd.md#vfio-type1`), built on the same emulated IOMMU domain.
//!
//! Dirty pages are harvested from the domain into a bitmap kept per mapping (`vfio_dma`)
//! inside the container and then copied into the caller's buffer on GET_BITMAP, shifted to the
//! caller's bit offset. That copy is what type1 costs in Linux and is kept on purpose so it can
//! be measured against iommufd's copy-free bitmap. When a device in the container cannot track
//! dirty pages, every mapped page is reported dirty on every GET ("perpetually dirty").

use crate::bitmap::set_bits;
use crate::errno::{err, Errno};
use crate::ictx::DeviceSpec;
use crate::user_memory::UserMemory;
use iommu::errno::*;
use iommu::{DirtyBitmap, Domain, DomainConfig, FormatKind, HostMemory, IotlbGather, Perm};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
pub const VFIO_DMA_UNMAP_FLAG_VADDR: u32 = 1 << 2;
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_START: u32 = 1 << 0;
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP: u32 = 1 << 1;
pub const VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP: u32 = 1 << 2;
/// `VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: u16 = 2;
/// At most INT_MAX bits per bitmap (256 MiB of bitmap, 8 TiB at 4 KiB).
pub const DIRTY_BITMAP_PAGES_MAX: u64 = i32::MAX as u64;

const PGSIZE: u64 = iommu::PAGE_SIZE;

/// `struct vfio_iommu_type1_dma_map`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaMap {
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_bitmap`: `size` is the buffer size in bytes.
#[derive(Debug)]
pub struct VfioBitmap<'a> {
    pub pgsize: u64,
    pub size: u64,
    pub data: &'a mut [u8],
}

/// `struct vfio_iommu_type1_dma_unmap`, with the optional trailing bitmap. `size` is
/// rewritten with the bytes unmapped.
#[derive(Debug, Default)]
pub struct DmaUnmap<'a> {
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
    pub bitmap: Option<VfioBitmap<'a>>,
}

/// `struct vfio_iommu_type1_dirty_bitmap_get`.
#[derive(Debug)]
pub struct DirtyBitmapGet<'a> {
    pub iova: u64,
    pub size: u64,
    pub bitmap: VfioBitmap<'a>,
}

/// `struct vfio_iommu_type1_dirty_bitmap` with its data.
#[derive(Debug, Default)]
pub struct DirtyPages<'a> {
    pub flags: u32,
    pub get: Option<DirtyBitmapGet<'a>>,
}

/// `struct vfio_iommu_type1_info_cap_migration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationCap {
    pub flags: u32,
    pub pgsize_bitmap: u64,
    pub max_dirty_bitmap_size: u64,
}

struct VfioDma {
    size: u64,
    /// One bit per page, allocated while dirty tracking is started.
    bitmap: Option<Vec<u64>>,
}

struct State {
    dmas: BTreeMap<u64, VfioDma>,
    started: bool,
}

/// A type1 container with its devices.
pub struct Type1Container {
    st: Mutex<State>,
    user: UserMemory,
    domain: Domain,
    /// Some device lacks dirty tracking: every mapped page is always dirty.
    no_tracker: bool,
}

impl Type1Container {
    /// A container for `devices`, which must share one IOMMU format. Tracking uses the IOMMU
    /// when every device can; otherwise the container falls back to "perpetually dirty".
    pub fn new(devices: &[DeviceSpec]) -> Result<Self, Errno> {
        let Some(first) = devices.first() else {
            return err(EINVAL, "a container needs a device");
        };
        if devices.iter().any(|d| d.format != first.format) {
            return err(EINVAL, "devices behind different IOMMU formats");
        }
        let tracker = devices.iter().all(|d| d.dirty_tracking);
        let mut cfg = DomainConfig::new(first.format);
        cfg.dirty_tracking = tracker;
        cfg.hw_dirty_capable = tracker;
        cfg.huge_pages = devices.iter().all(|d| d.huge_iova);
        cfg.iotlb_entries = first.iotlb_entries;
        Ok(Self {
            st: Mutex::new(State {
                dmas: BTreeMap::new(),
                started: false,
            }),
            user: UserMemory::new(),
            domain: Domain::new(cfg)?,
            no_tracker: !tracker,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register_user_memory(&self, mem: Arc<dyn HostMemory>) -> u64 {
        self.user.register(mem)
    }

    /// The container's domain (devices' DMA handles come from it).
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    pub fn format(&self) -> FormatKind {
        self.domain.format()
    }

    /// The migration capability of `VFIO_IOMMU_GET_INFO`.
    pub fn migration_cap(&self) -> MigrationCap {
        let huge = if self.domain.huge_pages() {
            match self.format() {
                FormatKind::AmdV1 => ((1u64 << 31) - 1) & !(PGSIZE - 1),
                _ => PGSIZE | (2 << 20) | (1 << 30),
            }
        } else {
            PGSIZE
        };
        MigrationCap {
            flags: 0,
            pgsize_bitmap: huge,
            max_dirty_bitmap_size: DIRTY_BITMAP_PAGES_MAX.div_ceil(8),
        }
    }

    /// `VFIO_IOMMU_MAP_DMA`.
    pub fn map_dma(&self, cmd: &DmaMap) -> Result<(), Errno> {
        if cmd.flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0 {
            return err(EINVAL, "unknown flags");
        }
        let mut perm = Perm::NONE;
        if cmd.flags & VFIO_DMA_MAP_FLAG_READ != 0 {
            perm = perm.union(Perm::READ);
        }
        if cmd.flags & VFIO_DMA_MAP_FLAG_WRITE != 0 {
            perm = perm.union(Perm::WRITE);
        }
        if perm == Perm::NONE || cmd.size == 0 {
            return err(EINVAL, "no permission or zero size");
        }
        if (cmd.iova | cmd.size | cmd.vaddr) & (PGSIZE - 1) != 0 {
            return err(EINVAL, "not page aligned");
        }
        if cmd.iova.checked_add(cmd.size - 1).is_none() {
            return err(EINVAL, "iova + size wraps");
        }
        let Some((mem, offset)) = self.user.resolve(cmd.vaddr, cmd.size) else {
            return err(EFAULT, "vaddr is not backed by registered memory");
        };
        let mut st = self.lock();
        let last = cmd.iova + cmd.size - 1;
        if st
            .dmas
            .range(..=last)
            .next_back()
            .is_some_and(|(k, d)| k + d.size > cmd.iova)
        {
            return err(EEXIST, "overlaps an existing mapping");
        }
        self.domain.map(cmd.iova, cmd.size, mem, offset, perm)?;
        let bitmap = st
            .started
            .then(|| vec![0u64; (cmd.size / PGSIZE).div_ceil(64) as usize]);
        st.dmas.insert(cmd.iova, VfioDma { size: cmd.size, bitmap });
        Ok(())
    }

    /// The mappings `[iova, iova + size)` covers, or `EINVAL` if it cuts one.
    fn whole_dmas(st: &State, iova: u64, size: u64) -> Result<Vec<u64>, Errno> {
        let end = iova.checked_add(size).ok_or(Errno::new(EINVAL, "range wraps"))?;
        let mut v = Vec::new();
        if let Some((k, d)) = st.dmas.range(..iova).next_back() {
            if k + d.size > iova {
                return err(EINVAL, "range bisects a mapping");
            }
        }
        for (k, d) in st.dmas.range(iova..end) {
            if k + d.size > end {
                return err(EINVAL, "range bisects a mapping");
            }
            v.push(*k);
        }
        Ok(v)
    }

    /// `VFIO_IOMMU_UNMAP_DMA`, optionally fetching the range's dirty bitmap first.
    pub fn unmap_dma(&self, cmd: &mut DmaUnmap<'_>) -> Result<(), Errno> {
        let known = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP | VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_VADDR;
        if cmd.flags & !known != 0 || cmd.flags & VFIO_DMA_UNMAP_FLAG_VADDR != 0 {
            return err(EINVAL, "unknown or unsupported flags");
        }
        let all = cmd.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0;
        let get = cmd.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0;
        if all && (get || cmd.iova != 0 || cmd.size != 0) {
            return err(EINVAL, "ALL takes no range and no bitmap");
        }
        let mut st = self.lock();
        let keys = if all {
            st.dmas.keys().copied().collect()
        } else {
            if cmd.size == 0 || (cmd.iova | cmd.size) & (PGSIZE - 1) != 0 {
                return err(EINVAL, "zero or unaligned range");
            }
            Self::whole_dmas(&st, cmd.iova, cmd.size)?
        };
        if get {
            let Some(bm) = cmd.bitmap.as_mut() else {
                return err(EINVAL, "GET_DIRTY_BITMAP without a bitmap");
            };
            self.fill_user_bitmap(&mut st, cmd.iova, cmd.size, bm, &keys)?;
        }
        let mut unmapped = 0;
        for k in keys {
            let d = st.dmas.remove(&k).expect("listed");
            self.domain.unmap(k, d.size)?;
            unmapped += d.size;
        }
        cmd.size = unmapped;
        Ok(())
    }

    /// `VFIO_IOMMU_DIRTY_PAGES` with exactly one of START, STOP and GET_BITMAP.
    pub fn dirty_pages(&self, cmd: &mut DirtyPages<'_>) -> Result<(), Errno> {
        let mut st = self.lock();
        match cmd.flags {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START => {
                if !st.started {
                    if !self.no_tracker {
                        let mut gather = IotlbGather::new();
                        for (&k, d) in &st.dmas {
                            self.domain.read_and_clear_dirty(
                                k,
                                d.size,
                                0,
                                &mut DirtyBitmap {
                                    bitmap: None,
                                    gather: Some(&mut gather),
                                },
                            )?;
                        }
                        self.domain.iotlb_sync(&gather);
                        self.domain.set_dirty_tracking(true)?;
                    }
                    for d in st.dmas.values_mut() {
                        d.bitmap = Some(vec![0u64; (d.size / PGSIZE).div_ceil(64) as usize]);
                    }
                    st.started = true;
                }
                Ok(())
            }
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP => {
                if st.started {
                    if !self.no_tracker {
                        self.domain.set_dirty_tracking(false)?;
                    }
                    for d in st.dmas.values_mut() {
                        d.bitmap = None;
                    }
                    st.started = false;
                }
                Ok(())
            }
            VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP => {
                let Some(get) = cmd.get.as_mut() else {
                    return err(EINVAL, "GET_BITMAP without a range");
                };
                if get.size == 0 || (get.iova | get.size) & (get.bitmap.pgsize.max(1) - 1) != 0 {
                    return err(EINVAL, "zero or unaligned range");
                }
                let keys = Self::whole_dmas(&st, get.iova, get.size)?;
                self.fill_user_bitmap(&mut st, get.iova, get.size, &mut get.bitmap, &keys)
            }
            _ => err(EINVAL, "flags must be exactly one of START, STOP, GET_BITMAP"),
        }
    }

    /// Harvests each mapping's dirty pages into its own bitmap, copies that into the caller's
    /// buffer at the mapping's bit offset, and clears it (what type1's update_user_bitmap does).
    fn fill_user_bitmap(
        &self,
        st: &mut State,
        iova: u64,
        size: u64,
        bm: &mut VfioBitmap<'_>,
        keys: &[u64],
    ) -> Result<(), Errno> {
        if !st.started {
            return err(EINVAL, "dirty tracking is not started");
        }
        if bm.pgsize != PGSIZE {
            return err(EINVAL, "pgsize is not the smallest supported page size");
        }
        let pages = size / PGSIZE;
        if pages > DIRTY_BITMAP_PAGES_MAX || bm.size < pages.div_ceil(8) || (bm.data.len() as u64) < pages.div_ceil(8) {
            return err(EINVAL, "bitmap too small or too large");
        }
        let mut gather = IotlbGather::new();
        for &k in keys {
            let d = st.dmas.get_mut(&k).expect("listed");
            let words = d.bitmap.as_mut().expect("started");
            if self.no_tracker {
                let n = d.size / PGSIZE;
                words.iter_mut().for_each(|w| *w = u64::MAX);
                if !n.is_multiple_of(64) {
                    *words.last_mut().expect("non-empty") = (1u64 << (n % 64)) - 1;
                }
            } else {
                let mut rec = |i: u64, l: u64| {
                    for p in (i - k) / PGSIZE..(i + l - k) / PGSIZE {
                        words[(p / 64) as usize] |= 1 << (p % 64);
                    }
                };
                self.domain.read_and_clear_dirty(
                    k,
                    d.size,
                    0,
                    &mut DirtyBitmap {
                        bitmap: Some(&mut rec),
                        gather: Some(&mut gather),
                    },
                )?;
            }
            copy_bits_to(bm.data, (k - iova) / PGSIZE, words, d.size / PGSIZE);
            words.iter_mut().for_each(|w| *w = 0);
        }
        self.domain.iotlb_sync(&gather);
        Ok(())
    }
}

/// ORs `n` bits of `src` into the LSB-first byte bitmap `dst` starting at bit `at`: the shift
/// type1 performs for mappings that do not start on a byte boundary of the caller's bitmap.
fn copy_bits_to(dst: &mut [u8], at: u64, src: &[u64], n: u64) {
    let mut p = 0u64;
    while p < n {
        let w = src[(p / 64) as usize];
        if w == 0 {
            p += 64;
            continue;
        }
        let bit = p % 64;
        if (w >> bit) & 1 != 0 {
            // Extend over the run of set bits in this word.
            let run = ((!(w >> bit)).trailing_zeros() as u64).min(64 - bit).min(n - p);
            set_bits(dst, at + p, at + p + run - 1);
            p += run;
        } else {
            p += 1;
        }
    }
}
