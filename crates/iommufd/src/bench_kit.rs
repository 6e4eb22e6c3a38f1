//! The bitmap benchmark's workload, shared by `benches/bitmap.rs` and `livemig bench bitmap`:
//! the same IOVA space and dirty pattern harvested through iommufd's copy-free
//! `hwpt_get_dirty_bitmap` and through type1's per-mapping bitmap plus copy.

use crate::type1::*;
use crate::*;
use iommu::{AnonMemory, Dma, FormatKind, HostMemory};
use std::sync::Arc;

const IOVA: u64 = 1 << 40;

pub struct BitmapBench {
    pub iova_bytes: u64,
    fd: IommuFd,
    hwpt: u32,
    fd_dma: Dma,
    t1: Type1Container,
    t1_dma: Dma,
    pages: Vec<u64>,
    buf: Vec<u8>,
    _mem: Arc<AnonMemory>,
}

impl BitmapBench {
    /// `iova_bytes` of guest-like memory (one area, one `vfio_dma`), 4 KiB leaves,
    /// `dirty_fraction` of its pages dirtied per round.
    pub fn new(fmt: FormatKind, iova_bytes: u64, dirty_fraction: f64) -> Self {
        let mem = Arc::new(AnonMemory::new(iova_bytes as usize, true).expect("mmap"));
        let mut spec = DeviceSpec::new("bench", fmt);
        spec.huge_iova = false;

        let fd = IommuFd::new();
        let va = fd.register_user_memory(mem.clone() as Arc<dyn HostMemory>);
        let mut a = IoasAlloc::default();
        fd.ioas_alloc(&mut a).expect("ioas");
        let dev = fd.bind_device(spec.clone());
        let mut m = IoasMap {
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: a.out_ioas_id,
            user_va: va,
            length: iova_bytes,
            iova: IOVA,
            ..Default::default()
        };
        fd.ioas_map(&mut m).expect("map");
        let mut h = HwptAlloc {
            flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            dev_id: dev,
            pt_id: a.out_ioas_id,
            ..Default::default()
        };
        fd.hwpt_alloc(&mut h).expect("hwpt");
        fd.attach(dev, h.out_hwpt_id).expect("attach");
        fd.hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
            flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
            hwpt_id: h.out_hwpt_id,
            __reserved: 0,
        })
        .expect("track");
        let fd_dma = fd.device_dma(dev).expect("dma");

        let t1 = Type1Container::new(&[spec]).expect("container");
        let va1 = t1.register_user_memory(mem.clone());
        t1.map_dma(&DmaMap {
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: va1,
            iova: IOVA,
            size: iova_bytes,
        })
        .expect("map_dma");
        t1.dirty_pages(&mut DirtyPages {
            flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
            get: None,
        })
        .expect("start");
        let t1_dma = t1.domain().attach(1);

        let n = iova_bytes >> 12;
        let threshold = (dirty_fraction * u32::MAX as f64) as u64;
        let pages = (0..n)
            .filter(|p| dirty_fraction >= 1.0 || (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) < threshold)
            .collect();
        Self {
            iova_bytes,
            fd,
            hwpt: h.out_hwpt_id,
            fd_dma,
            t1,
            t1_dma,
            pages,
            buf: vec![0u8; (n as usize).div_ceil(8)],
            _mem: mem,
        }
    }

    pub fn dirty_count(&self) -> usize {
        self.pages.len()
    }

    /// Dirties the selected pages in both domains (untimed) and zeroes the caller buffer.
    pub fn redirty(&mut self) {
        for &p in &self.pages {
            self.fd_dma.write(IOVA + (p << 12), &[1]).expect("dma");
            self.t1_dma.write(IOVA + (p << 12), &[1]).expect("dma");
        }
        self.buf.fill(0);
    }

    /// Bits set in the caller buffer by the last `*_get` (count them outside the timing).
    pub fn bits_set(&self) -> u64 {
        self.buf.iter().map(|b| b.count_ones() as u64).sum()
    }

    /// The raw walker under the uAPI: read-and-clear on the HWPT's own domain into a counting
    /// sink, then the IOTLB flush, as the ioctl does minus validation and bitmap; returns
    /// the pages reported.
    pub fn walker_get(&mut self) -> u64 {
        let domain = self.fd.hwpt_domain(self.hwpt).expect("hwpt");
        let mut n = 0;
        let mut gather = iommu::IotlbGather::new();
        {
            let mut rec = |_iova: u64, len: u64| n += len >> 12;
            let mut out = iommu::DirtyBitmap {
                bitmap: Some(&mut rec),
                gather: Some(&mut gather),
            };
            domain
                .read_and_clear_dirty(IOVA, self.iova_bytes, 0, &mut out)
                .expect("harvest");
        }
        domain.iotlb_sync(&gather);
        n
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` over the whole space into the caller buffer.
    pub fn iommufd_get(&mut self) {
        self.fd
            .hwpt_get_dirty_bitmap(&mut HwptGetDirtyBitmap {
                hwpt_id: self.hwpt,
                flags: 0,
                __reserved: 0,
                iova: IOVA,
                length: self.iova_bytes,
                page_size: 4096,
                data: &mut self.buf,
            })
            .expect("get_dirty_bitmap");
    }

    /// `VFIO_IOMMU_DIRTY_PAGES` GET_BITMAP over the whole space into the caller buffer.
    pub fn type1_get(&mut self) {
        let size = self.buf.len() as u64;
        self.t1
            .dirty_pages(&mut DirtyPages {
                flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
                get: Some(DirtyBitmapGet {
                    iova: IOVA,
                    size: self.iova_bytes,
                    bitmap: VfioBitmap {
                        pgsize: 4096,
                        size,
                        data: &mut self.buf,
                    },
                }),
            })
            .expect("get_bitmap");
    }
}
