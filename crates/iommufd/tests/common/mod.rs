#![allow(dead_code)]
use iommu::{AnonMemory, FormatKind, HostMemory};
use iommufd::*;
use std::sync::Arc;

pub const MIB: u64 = 1 << 20;

pub struct Fx {
    pub fd: IommuFd,
    pub ioas: u32,
    pub dev: u32,
    pub va: u64,
    pub mem: Arc<AnonMemory>,
}

/// An iommufd with one IOAS, one bound dirty-capable device and `size` bytes of user memory.
pub fn fx(fmt: FormatKind, size: u64) -> Fx {
    let fd = IommuFd::new();
    let mut a = IoasAlloc::default();
    fd.ioas_alloc(&mut a).unwrap();
    let dev = fd.bind_device(DeviceSpec::new("dev0", fmt));
    let mem = Arc::new(AnonMemory::new(size as usize, true).unwrap());
    let va = fd.register_user_memory(mem.clone() as Arc<dyn HostMemory>);
    Fx {
        fd,
        ioas: a.out_ioas_id,
        dev,
        va,
        mem,
    }
}

pub fn map(fx: &Fx, iova: u64, off: u64, len: u64) -> Result<u64, Errno> {
    let mut m = IoasMap {
        flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: fx.ioas,
        user_va: fx.va + off,
        length: len,
        iova,
        ..Default::default()
    };
    fx.fd.ioas_map(&mut m).map(|_| m.iova)
}

pub fn hwpt(fx: &Fx, flags: u32) -> Result<u32, Errno> {
    let mut h = HwptAlloc {
        flags,
        dev_id: fx.dev,
        pt_id: fx.ioas,
        ..Default::default()
    };
    fx.fd.hwpt_alloc(&mut h).map(|_| h.out_hwpt_id)
}

pub fn track(fx: &Fx, hwpt: u32, on: bool) -> Result<(), Errno> {
    fx.fd.hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
        flags: if on { IOMMU_HWPT_DIRTY_TRACKING_ENABLE } else { 0 },
        hwpt_id: hwpt,
        __reserved: 0,
    })
}

pub fn bitmap(
    fx: &Fx,
    hwpt: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    flags: u32,
    data: &mut [u8],
) -> Result<(), Errno> {
    fx.fd.hwpt_get_dirty_bitmap(&mut HwptGetDirtyBitmap {
        hwpt_id: hwpt,
        flags,
        __reserved: 0,
        iova,
        length,
        page_size,
        data,
    })
}

/// Set bit numbers of an LSB-first byte bitmap.
pub fn bits(data: &[u8]) -> Vec<u64> {
    (0..data.len() as u64 * 8)
        .filter(|n| data[(n / 8) as usize] >> (n % 8) & 1 != 0)
        .collect()
}

/// Type1 MAP_DMA of `size` bytes at `iova`, read-write.
pub fn map_rw(c: &iommufd::type1::Type1Container, vaddr: u64, iova: u64, size: u64) {
    use iommufd::type1::*;
    c.map_dma(&DmaMap {
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr,
        iova,
        size,
    })
    .unwrap();
}
