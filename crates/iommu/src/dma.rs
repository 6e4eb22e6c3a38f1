//! The device's side: a DMA handle that reads and writes IOVAs through the IOMMU.

use crate::domain::Domain;
use crate::error::DmaError;
use crate::fault::Fault;
use crate::format::PAGE_SIZE;
use crate::iotlb::AccessSeq;
use crate::mem::{copy_from_host, copy_to_host};
use crate::nested::NestedDomain;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How a device reaches memory. Every access is translated page by page through the IOTLB and,
/// on a miss, a page-table walk that sets Accessed/Dirty bits as the hardware would. A fault
/// on any page fails the whole access before any byte moves, and is logged.
///
/// A handle is one access stream: it is `Send` but not `Sync`. Clone it to give each device
/// thread its own stream (invalidations wait for every stream's access in flight).
pub struct Dma {
    target: Target,
    seq: Arc<AccessSeq>,
    device: u32,
    attached: Arc<AtomicBool>,
    _not_sync: PhantomData<Cell<()>>,
}

/// The devices attached to a domain or nested domain: one flag each, which every DMA handle of
/// the device checks, so that a detach fails the handles already given out.
#[derive(Default)]
pub(crate) struct Attached(std::sync::Mutex<std::collections::HashMap<u32, Arc<AtomicBool>>>);

impl Attached {
    /// The device's flag, set (attaching again reuses it).
    pub fn attach(&self, device: u32) -> Arc<AtomicBool> {
        let flag = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(device)
            .or_insert_with(|| Arc::new(AtomicBool::new(true)))
            .clone();
        flag.store(true, Ordering::SeqCst);
        flag
    }
    /// Clears and forgets the device's flag; the caller then drains its accesses.
    pub fn detach(&self, device: u32) {
        if let Some(f) = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&device) {
            f.store(false, Ordering::SeqCst);
        }
    }
    /// The attached devices, sorted.
    pub fn list(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }
}

/// What a handle translates through: one page table, or a guest's stage 1 on top of one.
#[derive(Clone)]
pub(crate) enum Target {
    Paging(Domain),
    Nested(NestedDomain),
}

impl Target {
    /// The domain whose table holds the final translation (stage 2 of a nested domain).
    fn paging(&self) -> &Domain {
        match self {
            Target::Paging(d) => d,
            Target::Nested(n) => n.parent(),
        }
    }
}

impl Clone for Dma {
    fn clone(&self) -> Self {
        Dma::new(self.target.clone(), self.device, self.attached.clone())
    }
}

impl std::fmt::Debug for Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dma")
            .field("device", &self.device)
            .field("domain", self.target.paging())
            .field("nested", &matches!(self.target, Target::Nested(_)))
            .finish()
    }
}

/// Most accesses span few pages; translate those without allocating.
const INLINE_PAGES: usize = 16;

impl Dma {
    pub(crate) fn new(target: Target, device: u32, attached: Arc<AtomicBool>) -> Dma {
        // A nested access is in flight in its parent too: a stage-2 invalidation must wait
        // for it like for any other.
        let seq = target.paging().register_stream();
        Dma {
            target,
            seq,
            device,
            attached,
            _not_sync: PhantomData,
        }
    }

    /// The device this handle belongs to.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// The domain whose page table holds this handle's final translation: its own domain, or
    /// the stage-2 parent of a nested one.
    pub fn domain(&self) -> &Domain {
        self.target.paging()
    }

    /// The nested domain this handle translates through first, if any.
    pub fn nested(&self) -> Option<&NestedDomain> {
        match &self.target {
            Target::Nested(n) => Some(n),
            Target::Paging(_) => None,
        }
    }

    /// DMA read of `buf.len()` bytes at `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        self.access(iova, len, false, |off, hva, n| {
            // SAFETY: `access` hands out a host range the walk just translated, inside the
            // in-flight access that keeps its mapping's memory alive (`mem.rs`).
            unsafe { copy_from_host(hva, &mut buf[off..off + n]) }
        })
    }

    /// DMA write of `buf` at `iova`.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.access(iova, buf.len(), true, |off, hva, n| {
            // SAFETY: as for `read`.
            unsafe { copy_to_host(hva, &buf[off..off + n]) }
        })
    }

    /// Little-endian u64 read.
    pub fn read_u64(&self, iova: u64) -> Result<u64, DmaError> {
        let mut b = [0u8; 8];
        self.read(iova, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Little-endian u64 write.
    pub fn write_u64(&self, iova: u64, v: u64) -> Result<(), DmaError> {
        self.write(iova, &v.to_le_bytes())
    }

    fn access(
        &self,
        iova: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(usize, u64, usize),
    ) -> Result<(), DmaError> {
        if len == 0 {
            return Ok(());
        }
        self.seq.begin();
        let r = if !self.attached.load(Ordering::SeqCst) {
            Err(DmaError::Detached { device: self.device })
        } else {
            self.translate_and_copy(iova, len, write, &mut copy)
        };
        self.seq.end();
        r
    }

    fn translate_and_copy(
        &self,
        iova: u64,
        len: usize,
        write: bool,
        copy: &mut impl FnMut(usize, u64, usize),
    ) -> Result<(), DmaError> {
        let Some(last) = iova.checked_add(len as u64 - 1) else {
            return Err(self.fault(iova, write, crate::format::FaultReason::AddressSize));
        };
        let pages = ((last >> 12) - (iova >> 12) + 1) as usize;
        if pages == 1 {
            let hva = self.translate(iova, write)?;
            copy(0, hva, len);
            return Ok(());
        }
        // Translate every page first so a fault leaves memory untouched.
        let mut inline = [0u64; INLINE_PAGES];
        let mut heap = Vec::new();
        let hvas: &mut [u64] = if pages <= INLINE_PAGES {
            &mut inline[..pages]
        } else {
            heap.resize(pages, 0);
            &mut heap
        };
        let mut cur = iova;
        for h in hvas.iter_mut() {
            *h = self.translate(cur, write)?;
            cur = (cur & !(PAGE_SIZE - 1)) + PAGE_SIZE;
        }
        let mut off = 0usize;
        let mut cur = iova;
        for &h in hvas.iter() {
            let n = ((PAGE_SIZE - (cur & (PAGE_SIZE - 1))) as usize).min(len - off);
            copy(off, h, n);
            off += n;
            cur += n as u64;
        }
        Ok(())
    }

    #[inline]
    fn translate(&self, iova: u64, write: bool) -> Result<u64, DmaError> {
        let r = match &self.target {
            Target::Paging(d) => d.translate(iova, write),
            Target::Nested(n) => n.translate(iova, write),
        };
        r.map_err(|reason| self.fault(iova & !(PAGE_SIZE - 1), write, reason))
    }

    fn fault(&self, iova: u64, write: bool, reason: crate::format::FaultReason) -> DmaError {
        let f = Fault {
            device: self.device,
            iova,
            write,
            reason,
        };
        match &self.target {
            Target::Paging(d) => d.log_fault(f),
            Target::Nested(n) => n.log_fault(f),
        }
        DmaError::Fault { iova, write, reason }
    }
}
