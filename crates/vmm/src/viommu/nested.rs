//! The nested vIOMMU: the guest's VT-d first-stage table, its invalidation queue, and the
//! iommufd objects under them (`docs/viommu.md#the-nested-viommu`).
//!
//! Set up like a VMM with a VT-d vIOMMU in nested mode: guest RAM in an IOAS at IOVA = GPA,
//! a paging HWPT allocated with `NEST_PARENT` (and `DIRTY_TRACKING`) on it, and a nested HWPT
//! whose stage-1 root is the table the guest's firmware set up at `viommu_area + S1` (the
//! PASID entry's first-stage pointer). The guest's invalidation descriptors reach
//! `IOMMU_HWPT_INVALIDATE`, one entry per descriptor.

use super::{area, ID, ID_VALUE, IQA, IQERR, IQH, IQT, MODE};
use crate::dirty::CpuDirty;
use crate::mmio::MmioDevice;
use iommu::nested::inv_queue::{Descriptor, InvQueue, Pages};
use iommu::Stage1Kind;
use iommufd::{HwptInvalidate, IommuFd, VtdS1Invalidate, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, IOMMU_VTD_INV_FLAGS_LEAF};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub(crate) struct NestedViommu {
    fd: Arc<IommuFd>,
    nested: u32,
    mem: Arc<GuestMemoryMmap>,
    /// Where the status writes of wait descriptors are logged for migration.
    dirty: Arc<CpuDirty>,
    queue: Mutex<InvQueue>,
    /// Non-zero once the queue stopped on an error (cleared by an IQA write).
    error: AtomicU32,
}

impl NestedViommu {
    pub fn new(fd: Arc<IommuFd>, nested: u32, mem: Arc<GuestMemoryMmap>, dirty: Arc<CpuDirty>) -> Self {
        Self {
            fd,
            nested,
            mem,
            dirty,
            queue: Mutex::new(InvQueue::default()),
            error: AtomicU32::new(0),
        }
    }

    /// What the guest's firmware leaves at `base` (its vIOMMU area): the upper levels of one
    /// stage-1 chain covering `iova`'s 2 MiB, and an empty leaf table. Entries are written as
    /// a driver writes them, A and D clear: the emulated IOMMU sets them.
    pub fn write_firmware_tables(mem: &GuestMemoryMmap, base: u64, iova: u64) -> Result<(), String> {
        let root = base + area::S1;
        mem.write_slice(&[0u8; 4 * 4096], GuestAddress(root))
            .map_err(|e| e.to_string())?;
        for level in (1..4).rev() {
            let table = root + (3 - level as u64) * 4096;
            let slot = ((iova >> (12 + 9 * level)) & 511) * 8;
            let entry = Stage1Kind::VtdFs.table(table + 4096, level);
            mem.write_obj(entry, GuestAddress(table + slot))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn run_queue(&self, iqt: u64) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut read = |gpa: u64, buf: &mut [u8]| self.mem.read_slice(buf, GuestAddress(gpa)).is_ok();
        // A wait's status write is the IOMMU writing guest memory: logged like a device's.
        let mut write = |gpa: u64, buf: &[u8]| {
            let ok = self.mem.write_slice(buf, GuestAddress(gpa)).is_ok();
            if ok {
                self.dirty.mark_host_write(gpa, buf.len() as u64);
            }
            ok
        };
        let mut apply = |d: &Descriptor| {
            let Descriptor::PasidIotlb { pages, .. } = *d else {
                return;
            };
            let e = match pages {
                Pages::All => VtdS1Invalidate {
                    addr: 0,
                    npages: u64::MAX,
                    ..Default::default()
                },
                Pages::Range {
                    addr,
                    npages,
                    leaf_only,
                } => VtdS1Invalidate {
                    addr,
                    npages,
                    flags: if leaf_only { IOMMU_VTD_INV_FLAGS_LEAF } else { 0 },
                    __reserved: 0,
                },
            };
            let bytes = e.to_bytes();
            let mut cmd = HwptInvalidate {
                hwpt_id: self.nested,
                data_type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
                entry_len: bytes.len() as u32,
                entry_num: 1,
                __reserved: 0,
                data: &bytes,
            };
            if let Err(e) = self.fd.hwpt_invalidate(&mut cmd) {
                tracing::warn!("vIOMMU: IOMMU_HWPT_INVALIDATE failed: {e}");
            }
        };
        if let Err(e) = q.write_iqt(iqt, &mut read, &mut write, &mut apply) {
            tracing::warn!("vIOMMU: invalidation queue stopped: {e}");
            self.error.store(1, Ordering::Release);
        }
    }
}

impl super::ViommuState for NestedViommu {
    fn save(&self) -> Vec<u8> {
        let (iqa, head, tail, stopped) = self.queue.lock().unwrap_or_else(|e| e.into_inner()).save();
        let stopped = stopped || self.error.load(Ordering::Acquire) != 0;
        let mut b = Vec::with_capacity(25);
        for v in [iqa, head, tail] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(stopped as u8);
        b
    }
    fn restore(&self, b: &[u8]) -> Result<(), String> {
        let (Some(iqa), Some(head), Some(tail), Some(&stopped), 25) = (
            super::u64_at(b, 0),
            super::u64_at(b, 8),
            super::u64_at(b, 16),
            b.get(24),
            b.len(),
        ) else {
            return Err(format!("nested vIOMMU state of {} bytes (25 expected)", b.len()));
        };
        if stopped > 1 {
            return Err(format!("invalidation queue state {stopped} (0 running, 1 stopped)"));
        }
        let q = InvQueue::restore(iqa, head, tail, stopped == 1)
            .ok_or_else(|| format!("invalidation queue head {head} or tail {tail} outside the queue"))?;
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = q;
        self.error.store((stopped == 1) as u32, Ordering::Release);
        Ok(())
    }
}

impl MmioDevice for NestedViommu {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let v: u64 = match offset {
            ID => ID_VALUE as u64,
            MODE => super::ViommuMode::Nested.register() as u64,
            IQH => q.iqh(),
            IQT => q.iqt(),
            IQA => q.iqa(),
            IQERR => self.error.load(Ordering::Acquire) as u64,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        match offset {
            IQA => {
                self.queue.lock().unwrap_or_else(|e| e.into_inner()).write_iqa(v);
                self.error.store(0, Ordering::Release);
            }
            IQT => self.run_queue(v),
            _ => {}
        }
    }
}
