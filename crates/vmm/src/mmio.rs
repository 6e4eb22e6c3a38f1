//! The MMIO bus: guest-physical ranges dispatched to device register blocks.

use std::sync::{Arc, RwLock};

/// A device register block.
pub trait MmioDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

impl MmioDevice for accel::Accel {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data)
    }
}

struct Range {
    base: u64,
    size: u64,
    dev: Arc<dyn MmioDevice>,
}

/// Ranges of guest-physical addresses and their devices.
#[derive(Default)]
pub struct MmioBus {
    ranges: RwLock<Vec<Range>>,
}

impl MmioBus {
    /// Adds a device at `[base, base + size)`; `false` if it overlaps another.
    pub fn register(&self, base: u64, size: u64, dev: Arc<dyn MmioDevice>) -> bool {
        let mut r = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if r.iter().any(|x| base < x.base + x.size && x.base < base + size) {
            return false;
        }
        r.push(Range { base, size, dev });
        true
    }

    fn find(&self, addr: u64) -> Option<(Arc<dyn MmioDevice>, u64)> {
        let r = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .find(|x| addr >= x.base && addr < x.base + x.size)
            .map(|x| (x.dev.clone(), addr - x.base))
    }

    /// A read exit: fills `data` (all ones where no device answers, like an empty bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A write exit; writes nowhere are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((d, off)) => {
                d.write(off, data);
                true
            }
            None => false,
        }
    }
}
