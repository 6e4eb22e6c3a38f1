//! Nested translation: a guest-owned stage-1 table (IOVA → guest-physical) walked on top of a
//! host-owned stage-2 domain (guest-physical → host), as VT-d scalable-mode nesting (PGTT =
//! nested) and SMMUv3 stage 1 + stage 2 do (`docs/viommu.md#nested-translation`).
//!
//! What the hardware does, and so what this walk does, on an IOTLB miss:
//! 1. Every stage-1 entry it reads lives at a guest-physical address, which stage 2 translates
//!    first (VT-d specification 3.8, "Nested Translation": first-stage paging-structure
//!    accesses are second-stage translated).
//! 2. Setting A (and D on a write) in a stage-1 entry is a write to guest memory, so its
//!    stage-2 translation is a write: stage 2 marks the stage-1 table page dirty. That is why
//!    the guest's page tables migrate as ordinary RAM with nothing rebuilt but the IOTLB.
//!    (VT-d 3.8.1: the update needs read and write permission in stage 2; the walk has read
//!    the entry through a read translation first, and the update asks for a write one.)
//! 3. The stage-1 leaf's output address goes through stage 2 with the access's direction;
//!    stage 2 sets its own A/D there, so the parent's dirty bitmap is indexed by
//!    guest-physical address, the same index as KVM's log, however the guest remaps.
//!
//! The nested IOTLB caches the combined translation (IOVA page → host page). A guest changes
//! its stage 1 and then invalidates ([`NestedDomain::invalidate`], reached from the guest's
//! invalidation queue, `inv_queue.rs`); stage-2 changes invalidate every nested IOTLB on top
//! (`domain.rs`). Accesses through a nested handle are in flight in the parent, so a stage-2
//! invalidation drains them too.

pub mod inv_queue;
pub mod stage1;

use crate::domain::Domain;
use crate::error::IommuError;
use crate::fault::{Fault, FaultLog};
use crate::format::{level_shift, ArmLpaeS1, FaultReason, Perm, Pte, IOVA_BITS, LEVELS, PAGE_SIZE};
use crate::iotlb::{Iotlb, IotlbEntry};
use crate::mem::atomic_at;
use stage1::{Stage1, Stage1Kind, VtdFs};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How a nested domain is created (the driver-specific data of a nested `IOMMU_HWPT_ALLOC`).
#[derive(Clone, Debug)]
pub struct NestedConfig {
    pub stage1: Stage1Kind,
    /// Guest-physical address of the stage-1 root table.
    pub root: u64,
    /// IOTLB slots.
    pub iotlb_entries: usize,
    /// Fault records kept.
    pub fault_log_entries: usize,
}

impl NestedConfig {
    pub fn new(stage1: Stage1Kind, root: u64) -> Self {
        Self {
            stage1,
            root,
            iotlb_entries: 1024,
            fault_log_entries: 4096,
        }
    }
}

struct NestedShared {
    parent: Domain,
    cfg: NestedConfig,
    root: AtomicU64,
    iotlb: Arc<Iotlb>,
    faults: FaultLog,
    devices: crate::dma::Attached,
    invalidations: AtomicU64,
}

trait NestedOps: Send + Sync {
    fn shared(&self) -> &NestedShared;
    fn translate(&self, iova: u64, write: bool) -> Result<u64, FaultReason>;
}

struct NestedImpl<S: Stage1> {
    s: NestedShared,
    _s: PhantomData<fn() -> S>,
}

/// Walks that found an entry changed under them before the access gives up.
const MAX_RESTARTS: u32 = 1024;

/// Index of `iova`'s entry in a table at `level`, as a byte offset.
fn entry_offset(iova: u64, level: usize) -> u64 {
    ((iova >> level_shift(level)) & 511) * 8
}

impl<S: Stage1> NestedImpl<S> {
    /// Stage 2 for a guest-physical address the walk needs, its faults reported as stage 2's.
    fn stage2(&self, gpa: u64, write: bool) -> Result<crate::domain::Xlat, FaultReason> {
        self.s.parent.translate_full(gpa, write).map_err(FaultReason::in_stage2)
    }

    /// Sets A/D in a stage-1 entry: a write to guest memory, translated as one by stage 2.
    /// False when the entry changed under us (the guest rewrote it): the walk restarts.
    fn update(&self, egpa: u64, old: u64, new: u64) -> Result<bool, FaultReason> {
        let x = self.stage2(egpa, true)?;
        // SAFETY: `x.host` comes from a stage-2 translation inside the caller's in-flight
        // access, so its page stays mapped until the access ends; entries are 8-byte aligned.
        let e = unsafe { atomic_at(x.host) };
        Ok(e.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }

    /// The two-stage walk of one access; returns the combined IOTLB entry.
    fn walk(&self, iova: u64, write: bool) -> Result<IotlbEntry, FaultReason> {
        let mut restarts = 0u32;
        'restart: loop {
            // A guest that rewrites an entry under every walk would stall the device (and a
            // drain waiting for it) for ever: after enough tries the access faults.
            restarts += 1;
            if restarts > MAX_RESTARTS {
                return Err(FaultReason::NotPresent);
            }
            let mut table = self.s.root.load(Ordering::Acquire);
            let mut writable = true;
            let mut level = LEVELS - 1;
            loop {
                let egpa = table + entry_offset(iova, level);
                let x = self.stage2(egpa, false)?;
                // SAFETY: as in `update`.
                let pte = unsafe { atomic_at(x.host) }.load(Ordering::SeqCst);
                match S::decode(pte, level) {
                    Pte::Empty => return Err(FaultReason::NotPresent),
                    Pte::Table { pa } => {
                        writable &= S::table_allows_write(pte);
                        let want = S::table_access(pte);
                        if want != pte && !self.update(egpa, pte, want)? {
                            continue 'restart;
                        }
                        table = pa;
                        level -= 1;
                    }
                    Pte::Leaf { pa, size_lg2, perm } => {
                        if write && !writable {
                            return Err(FaultReason::Permission);
                        }
                        let new = S::leaf_access(pte, write)?;
                        if new != pte && !self.update(egpa, pte, new)? {
                            continue 'restart;
                        }
                        let gpa = pa + (iova & ((1u64 << size_lg2) - 1));
                        let out = self.stage2(gpa, write)?;
                        let s1_write = perm.write() && writable;
                        return Ok(IotlbEntry {
                            host_page: out.host & !(PAGE_SIZE - 1),
                            read: out.read,
                            write: s1_write && out.write,
                            // Both stages must already hold the write, or the next one walks.
                            write_ready: s1_write && S::is_dirty(new) && out.write_ready,
                        });
                    }
                }
            }
        }
    }
}

impl<S: Stage1> NestedOps for NestedImpl<S> {
    fn shared(&self) -> &NestedShared {
        &self.s
    }

    #[inline]
    fn translate(&self, iova: u64, write: bool) -> Result<u64, FaultReason> {
        if iova >> IOVA_BITS != 0 {
            return Err(FaultReason::AddressSize);
        }
        let (pfn, off) = (iova >> 12, iova & (PAGE_SIZE - 1));
        let tlb = &self.s.iotlb;
        if let Some(e) = tlb.lookup(pfn) {
            if (write && e.write && e.write_ready) || (!write && e.read) {
                tlb.count(false);
                return Ok(e.host_page | off);
            }
        }
        tlb.count(true);
        let ticket = tlb.ticket();
        let e = self.walk(iova, write)?;
        tlb.fill(pfn, e, ticket);
        Ok(e.host_page | off)
    }
}

/// A nested (stage-1) domain: an iommufd nested HWPT's hardware side. Cloning shares it.
#[derive(Clone)]
pub struct NestedDomain(Arc<dyn NestedOps>);

impl std::fmt::Debug for NestedDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedDomain")
            .field("stage1", &self.stage1())
            .field("root", &format_args!("{:#x}", self.root()))
            .field("parent", &self.parent())
            .finish()
    }
}

impl NestedDomain {
    /// A stage-1 domain on `parent`, which must have been allocated as a nesting parent
    /// (`EINVAL` otherwise, as Linux's VT-d driver answers).
    pub fn new(parent: &Domain, cfg: NestedConfig) -> Result<NestedDomain, IommuError> {
        if !parent.config().nest_parent {
            return Err(IommuError::NotNestParent);
        }
        check_root(cfg.root)?;
        let iotlb = Arc::new(Iotlb::new(cfg.iotlb_entries));
        parent.add_nested_iotlb(&iotlb);
        let s = NestedShared {
            parent: parent.clone(),
            root: AtomicU64::new(cfg.root),
            faults: FaultLog::new(cfg.fault_log_entries.max(1)),
            devices: Default::default(),
            invalidations: AtomicU64::new(0),
            iotlb,
            cfg,
        };
        let ops: Arc<dyn NestedOps> = match s.cfg.stage1 {
            Stage1Kind::VtdFs => Arc::new(NestedImpl::<VtdFs> { s, _s: PhantomData }),
            Stage1Kind::ArmLpaeS1 => Arc::new(NestedImpl::<ArmLpaeS1> { s, _s: PhantomData }),
        };
        Ok(NestedDomain(ops))
    }

    /// The stage-2 domain under this one.
    pub fn parent(&self) -> &Domain {
        &self.0.shared().parent
    }
    pub fn stage1(&self) -> Stage1Kind {
        self.0.shared().cfg.stage1
    }
    /// Guest-physical address of the stage-1 root table.
    pub fn root(&self) -> u64 {
        self.0.shared().root.load(Ordering::Acquire)
    }

    /// Points the domain at another stage-1 root (the guest rewrote its PASID entry or CD) and
    /// invalidates everything cached from the old one.
    pub fn set_root(&self, root: u64) -> Result<(), IommuError> {
        check_root(root)?;
        self.0.shared().root.store(root, Ordering::Release);
        self.invalidate_all();
        Ok(())
    }

    /// The guest's IOTLB invalidation of `npages` 4 KiB pages from `iova` (all of them when
    /// `npages` is `u64::MAX`, as the VT-d invalidation uAPI spells "everything"). Returns once
    /// no access that used a dropped translation is still in flight.
    pub fn invalidate(&self, iova: u64, npages: u64) {
        let s = self.0.shared();
        s.invalidations.fetch_add(1, Ordering::Relaxed);
        match npages.checked_mul(PAGE_SIZE) {
            Some(len) if npages != u64::MAX => s.iotlb.invalidate_range(iova & !(PAGE_SIZE - 1), len),
            _ => s.iotlb.invalidate_all(),
        }
        s.parent.drain();
    }

    /// Invalidates the whole nested IOTLB and drains.
    pub fn invalidate_all(&self) {
        self.invalidate(0, u64::MAX);
    }

    /// Invalidations received so far.
    pub fn invalidations(&self) -> u64 {
        self.0.shared().invalidations.load(Ordering::Relaxed)
    }

    /// Translations through the nested IOTLB so far, and how many of them walked both stages.
    pub fn iotlb_stats(&self) -> (u64, u64) {
        self.0.shared().iotlb.stats()
    }

    /// Attaches `device` and returns its DMA handle.
    pub fn attach(&self, device: u32) -> crate::dma::Dma {
        let flag = self.0.shared().devices.attach(device);
        crate::dma::Dma::new(crate::dma::Target::Nested(self.clone()), device, flag)
    }

    /// Detaches `device`: its handles fail from now on, and no access of it is still running
    /// when this returns.
    pub fn detach(&self, device: u32) {
        self.0.shared().devices.detach(device);
        self.invalidate_all();
    }

    /// The guest-physical address and stage-1 permission of `iova`, read without touching
    /// A/D (software's view, for the VMM and tests); `None` where stage 1 or 2 has nothing.
    pub fn translation(&self, iova: u64) -> Option<(u64, Perm)> {
        let path = self.stage1_entries(iova);
        let (level, pte) = *path.last()?;
        let kind = self.stage1();
        match kind.decode(pte, level) {
            Pte::Leaf { pa, size_lg2, perm } => {
                let writable = path[..path.len() - 1]
                    .iter()
                    .all(|&(_, t)| kind != Stage1Kind::VtdFs || t & stage1::vtd_fs::RW != 0);
                let perm = if writable { perm } else { Perm::READ };
                Some((pa + (iova & ((1u64 << size_lg2) - 1)), perm))
            }
            _ => None,
        }
    }

    /// The raw stage-1 entries a walk for `iova` reads, root first, with their levels; it
    /// stops at the first entry that is not a table or whose page stage 2 does not map.
    pub fn stage1_entries(&self, iova: u64) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        let mut table = self.root();
        for level in (0..LEVELS).rev() {
            let mut b = [0u8; 8];
            if !self.parent().read_software(table + entry_offset(iova, level), &mut b) {
                break;
            }
            let pte = u64::from_le_bytes(b);
            out.push((level, pte));
            match self.stage1().decode(pte, level) {
                Pte::Table { pa } => table = pa,
                _ => break,
            }
        }
        out
    }

    /// Fault records kept and the total number of faults ever logged.
    pub fn faults(&self) -> (Vec<Fault>, u64) {
        self.0.shared().faults.snapshot()
    }
    /// Removes and returns the kept fault records.
    pub fn take_faults(&self) -> Vec<Fault> {
        self.0.shared().faults.take()
    }

    pub(crate) fn translate(&self, iova: u64, write: bool) -> Result<u64, FaultReason> {
        self.0.translate(iova, write)
    }
    pub(crate) fn log_fault(&self, f: Fault) {
        self.0.shared().faults.push(f);
    }
}

fn check_root(root: u64) -> Result<(), IommuError> {
    if !root.is_multiple_of(PAGE_SIZE) {
        return Err(IommuError::Unaligned {
            iova: root,
            len: PAGE_SIZE,
        });
    }
    if root >> IOVA_BITS != 0 {
        return Err(IommuError::OutOfRange {
            iova: root,
            len: PAGE_SIZE,
        });
    }
    Ok(())
}
