#![allow(dead_code)]
use accel::client::GuestBus;
use accel::{Accel, AccelConfig};
use iommu::{AnonMemory, FormatKind, HostMemory};
use iommufd::*;
use std::sync::Arc;

pub const MEM: u64 = 32 << 20;

/// Guest memory, an iommufd context with guest RAM mapped at IOVA = GPA in a dirty-tracking
/// HWPT, and an accelerator attached to it.
pub struct Rig {
    pub mem: Arc<AnonMemory>,
    pub fd: IommuFd,
    pub hwpt: u32,
    pub ioas: u32,
    pub accel: Accel,
}

impl Rig {
    pub fn new(fmt: FormatKind, cfg: AccelConfig) -> Rig {
        let mem = Arc::new(AnonMemory::new(MEM as usize, false).unwrap());
        let fd = IommuFd::new();
        let va = fd.register_user_memory(mem.clone() as Arc<dyn HostMemory>);
        let mut a = IoasAlloc::default();
        fd.ioas_alloc(&mut a).unwrap();
        let mut o = IommuOption {
            option_id: IOMMU_OPTION_HUGE_PAGES,
            op: IOMMU_OPTION_OP_SET,
            __reserved: 0,
            object_id: a.out_ioas_id,
            val64: 0,
        };
        fd.option(&mut o).unwrap();
        let mut m = IoasMap {
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: a.out_ioas_id,
            user_va: va,
            length: MEM,
            iova: 0,
            ..Default::default()
        };
        fd.ioas_map(&mut m).unwrap();
        let dev = fd.bind_device(DeviceSpec::new("accel", fmt));
        let mut h = HwptAlloc {
            flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            dev_id: dev,
            pt_id: a.out_ioas_id,
            ..Default::default()
        };
        fd.hwpt_alloc(&mut h).unwrap();
        fd.attach(dev, h.out_hwpt_id).unwrap();
        let accel = Accel::new(cfg, fd.device_dma(dev).unwrap()).unwrap();
        Rig {
            mem,
            fd,
            hwpt: h.out_hwpt_id,
            ioas: a.out_ioas_id,
            accel,
        }
    }

    pub fn track(&self, on: bool) {
        self.fd
            .hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
                flags: on as u32,
                hwpt_id: self.hwpt,
                __reserved: 0,
            })
            .unwrap();
    }

    /// Dirty pages (IOVA page numbers) the IOMMU saw, read and cleared.
    pub fn iommu_dirty(&self) -> Vec<u64> {
        let mut bm = vec![0u8; (MEM / 4096 / 8) as usize];
        self.fd
            .hwpt_get_dirty_bitmap(&mut HwptGetDirtyBitmap {
                hwpt_id: self.hwpt,
                flags: 0,
                __reserved: 0,
                iova: 0,
                length: MEM,
                page_size: 4096,
                data: &mut bm,
            })
            .unwrap();
        (0..MEM / 4096)
            .filter(|p| bm[(p / 8) as usize] >> (p % 8) & 1 != 0)
            .collect()
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; MEM as usize];
        self.mem.read(0, &mut v);
        v
    }
}

impl GuestBus for Rig {
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        self.mem.read(gpa as usize, buf)
    }
    fn write(&self, gpa: u64, buf: &[u8]) {
        self.mem.write(gpa as usize, buf)
    }
    fn mmio_write(&self, off: u64, data: &[u8]) {
        self.accel.mmio_write(off, data)
    }
    fn mmio_read(&self, off: u64, data: &mut [u8]) {
        self.accel.mmio_read(off, data)
    }
}

/// Runs `f` until it returns true or `secs` pass.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    false
}
