//! An IOMMU domain: one page table of one format, its context word (DTE / PASID entry / CD),
//! its IOTLB, fault log and attached devices.
//!
//! Concurrency model: map, unmap, harvest, split and collapse serialise on the structural
//! lock. DMA never takes it: a translation looks up the IOTLB and, on a miss, walks the table
//! from the root with atomic loads and compare-exchange updates of A/D bits, inside an
//! in-flight section that invalidations drain (see `iotlb.rs`).

use crate::error::IommuError;
use crate::fault::{Fault, FaultLog};
use crate::format::{
    level_shift, AmdV1, ArmLpaeS1, FaultReason, Format, FormatKind, Perm, Pte, VtdSs, IOVA_BITS, LEVELS, PAGE_SIZE,
};
use crate::iotlb::{InFlight, Iotlb, IotlbEntry};
use crate::mem::{table_at, HostMemory};
use crate::walker::{self, DirtyBitmap, HarvestParallelism, IotlbGather, LeafOpts, Tables};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What happens to huge leaves while dirty tracking is on (an extension; Linux has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SplitPolicy {
    /// Leave huge leaves alone: a write dirties the whole leaf (Linux behaviour).
    #[default]
    Keep,
    /// Split every huge leaf into 4 KiB leaves when tracking is enabled (and map new ranges
    /// with 4 KiB leaves while it is on); collapse back where possible when it is disabled.
    EagerSplit,
}

/// How a domain is created.
#[derive(Clone, Debug)]
pub struct DomainConfig {
    pub format: FormatKind,
    /// Allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: the domain gets dirty ops.
    pub dirty_tracking: bool,
    /// Allow leaves larger than 4 KiB.
    pub huge_pages: bool,
    pub split_policy: SplitPolicy,
    /// IOTLB slots.
    pub iotlb_entries: usize,
    /// The IOMMU advertises hardware dirty tracking in its capability register.
    pub hw_dirty_capable: bool,
    /// Use non-leaf Accessed bits to skip untouched subtrees while harvesting.
    pub skip_unaccessed: bool,
    /// Fault records kept.
    pub fault_log_entries: usize,
    /// How a harvest uses the cores.
    pub harvest: HarvestParallelism,
    /// Allocated with `IOMMU_HWPT_ALLOC_NEST_PARENT`: nested (stage-1) domains may use this
    /// one as their stage 2 (`docs/viommu.md#nested-translation`).
    pub nest_parent: bool,
}

impl DomainConfig {
    pub fn new(format: FormatKind) -> Self {
        Self {
            format,
            dirty_tracking: true,
            huge_pages: true,
            split_policy: SplitPolicy::Keep,
            iotlb_entries: 1024,
            hw_dirty_capable: true,
            skip_unaccessed: true,
            fault_log_entries: 4096,
            harvest: HarvestParallelism::default(),
            nest_parent: false,
        }
    }
}

struct MapRecord {
    len: u64,
    mem: Arc<dyn HostMemory>,
    offset: u64,
}

struct State {
    tables: Tables,
    /// Who owns the memory behind each mapping, keyed by IOVA.
    records: BTreeMap<u64, MapRecord>,
    /// How harvests use the cores (from the config; benchmarks change it).
    harvest: HarvestParallelism,
}

struct Shared {
    cfg: DomainConfig,
    cap: u64,
    ctx: AtomicU64,
    tracking: AtomicBool,
    huge: AtomicBool,
    root: u64,
    iotlb: Iotlb,
    inflight: InFlight,
    faults: FaultLog,
    state: Mutex<State>,
    devices: crate::dma::Attached,
    /// IOTLBs of the nested domains on top of this one. Their entries combine both stages, so
    /// every invalidation here invalidates them too (a stage-2 invalidation by domain id does
    /// the same on VT-d): otherwise a cached write-ready bit would outlive a harvest of stage 2.
    nested: Mutex<Vec<std::sync::Weak<Iotlb>>>,
    /// Test-only sabotage: leave nested IOTLBs alone, to show the loss it causes.
    keep_nested: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn flush_all(&self) {
        self.iotlb.invalidate_all();
        self.invalidate_nested();
        self.inflight.drain();
    }
    fn flush_range(&self, iova: u64, len: u64) {
        self.iotlb.invalidate_range(iova, len);
        self.invalidate_nested();
        self.inflight.drain();
    }
    /// Nested IOTLBs are tagged by IOVA, not by the guest-physical range that changed here,
    /// so they are invalidated whole.
    fn invalidate_nested(&self) {
        if self.keep_nested.load(Ordering::Relaxed) {
            return;
        }
        let mut v = self.nested.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| match w.upgrade() {
            Some(t) => {
                t.invalidate_all();
                true
            }
            None => false,
        });
    }
    fn opts(&self) -> LeafOpts {
        let split_now = self.cfg.split_policy == SplitPolicy::EagerSplit && self.tracking.load(Ordering::Relaxed);
        LeafOpts {
            huge: self.huge.load(Ordering::Relaxed) && !split_now,
            tracking_domain: self.cfg.dirty_tracking,
        }
    }
}

fn check_range(iova: u64, len: u64) -> Result<u64, IommuError> {
    if len == 0 {
        return Err(IommuError::ZeroLength { iova });
    }
    if !iova.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(IommuError::Unaligned { iova, len });
    }
    match iova.checked_add(len) {
        Some(end) if end <= 1u64 << IOVA_BITS => Ok(end),
        _ => Err(IommuError::OutOfRange { iova, len }),
    }
}

/// One translation: host address, what the hardware grants, and whether a write may proceed
/// without a page-table update.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Xlat {
    pub host: u64,
    pub read: bool,
    pub write: bool,
    pub write_ready: bool,
}

/// Format-independent face of a domain; implemented once per format by `DomainImpl<F>`.
trait DomainOps: Send + Sync {
    fn shared(&self) -> &Shared;
    fn map(&self, iova: u64, len: u64, mem: Arc<dyn HostMemory>, offset: u64, perm: Perm) -> Result<(), IommuError>;
    fn unmap(&self, iova: u64, len: u64, dirty: Option<&mut dyn FnMut(u64, u64)>) -> Result<u64, IommuError>;
    fn iova_to_phys(&self, iova: u64) -> Option<(u64, Perm)>;
    fn read_software(&self, iova: u64, buf: &mut [u8]) -> bool;
    fn leaf_entry(&self, iova: u64) -> Option<(usize, u64)>;
    fn path_entries(&self, iova: u64) -> Vec<(usize, u64)>;
    fn set_dirty_tracking(&self, enable: bool) -> Result<(), IommuError>;
    fn read_and_clear_dirty(
        &self,
        iova: u64,
        len: u64,
        flags: u32,
        naive: bool,
        out: &mut DirtyBitmap<'_>,
    ) -> Result<(), IommuError>;
    fn translate(&self, iova: u64, write: bool) -> Result<Xlat, FaultReason>;
    fn leaf_histogram(&self) -> BTreeMap<u32, u64>;
    fn effective_perm(&self, perm: Perm) -> Perm;
}

struct DomainImpl<F: Format> {
    s: Shared,
    _f: PhantomData<fn() -> F>,
}

impl<F: Format> DomainImpl<F> {
    fn new(cfg: DomainConfig) -> Self {
        let tables = Tables::new();
        let root = tables.root;
        let cap = F::capability_register(cfg.hw_dirty_capable);
        let ctx = F::context(root, cfg.dirty_tracking);
        Self {
            s: Shared {
                cap,
                ctx: AtomicU64::new(ctx),
                tracking: AtomicBool::new(false),
                huge: AtomicBool::new(cfg.huge_pages),
                root,
                iotlb: Iotlb::new(cfg.iotlb_entries),
                inflight: InFlight::default(),
                faults: FaultLog::new(cfg.fault_log_entries.max(1)),
                state: Mutex::new(State {
                    tables,
                    records: BTreeMap::new(),
                    harvest: cfg.harvest,
                }),
                devices: Default::default(),
                nested: Mutex::new(Vec::new()),
                keep_nested: AtomicBool::new(false),
                cfg,
            },
            _f: PhantomData,
        }
    }

    /// The hardware walk of a DMA: sets A on every table entry used and A/D on the leaf, as
    /// the context word allows, with compare-exchange. Returns the host page, permissions, and
    /// whether later writes may skip the PTE update.
    fn walk(&self, iova: u64, write: bool) -> Result<(u64, Perm, bool), FaultReason> {
        'restart: loop {
            let ad = F::context_ad(self.s.ctx.load(Ordering::Acquire));
            let mut tp = self.s.root;
            let mut level = LEVELS - 1;
            loop {
                // SAFETY: `tp` is the root or was read from a present entry of this domain's
                // tree inside an in-flight DMA access; a page unlinked meanwhile is freed only
                // after the drain that waits for this access (`mem.rs`).
                let entry = unsafe { table_at(tp) }.entry(((iova >> level_shift(level)) & 511) as usize);
                let mut pte = entry.load(Ordering::SeqCst);
                match F::decode(pte, level) {
                    Pte::Empty => return Err(FaultReason::NotPresent),
                    Pte::Table { pa } => {
                        let want = F::table_access(pte, ad);
                        if want != pte
                            && entry
                                .compare_exchange(pte, want, Ordering::SeqCst, Ordering::SeqCst)
                                .is_err()
                        {
                            continue 'restart;
                        }
                        tp = pa;
                        level -= 1;
                    }
                    Pte::Leaf { pa, size_lg2, perm } => {
                        loop {
                            let new = F::leaf_access(pte, write, ad)?;
                            if new == pte {
                                break;
                            }
                            match entry.compare_exchange(pte, new, Ordering::SeqCst, Ordering::SeqCst) {
                                Ok(_) => {
                                    pte = new;
                                    break;
                                }
                                Err(cur) => match F::decode(cur, level) {
                                    Pte::Leaf {
                                        pa: p2, size_lg2: s2, ..
                                    } if p2 == pa && s2 == size_lg2 => pte = cur,
                                    _ => continue 'restart,
                                },
                            }
                        }
                        let page = (pa + (iova & ((1u64 << size_lg2) - 1))) & !(PAGE_SIZE - 1);
                        let ready = perm.write() && (!ad.dirty || F::is_dirty(pte));
                        return Ok((page, perm, ready));
                    }
                }
            }
        }
    }
}

impl<F: Format> DomainOps for DomainImpl<F> {
    fn shared(&self) -> &Shared {
        &self.s
    }

    fn map(&self, iova: u64, len: u64, mem: Arc<dyn HostMemory>, offset: u64, perm: Perm) -> Result<(), IommuError> {
        let end = check_range(iova, len)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(IommuError::Unaligned { iova: offset, len });
        }
        if perm == Perm::NONE {
            return Err(IommuError::NoPermission);
        }
        let size = mem.size() as u64;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(IommuError::HostRange { offset, len, size });
        }
        let mut st = self.s.lock();
        if walker::any_present::<F>(&st.tables, iova, end) {
            return Err(IommuError::Exists { iova, len });
        }
        let pa = mem.host_ptr() as u64 + offset;
        walker::map::<F>(&mut st.tables, iova, pa, len, perm, self.s.opts());
        st.records.insert(iova, MapRecord { len, mem, offset });
        Ok(())
    }

    fn unmap(&self, iova: u64, len: u64, dirty: Option<&mut dyn FnMut(u64, u64)>) -> Result<u64, IommuError> {
        let end = check_range(iova, len)?;
        if dirty.is_some() && !self.s.cfg.dirty_tracking {
            return Err(IommuError::NoDirtyOps);
        }
        let mut st = self.s.lock();
        let mut o = self.s.opts();
        o.huge = true; // splitting keeps what the leaf was
        let done = walker::unmap::<F>(&mut st.tables, iova, end, o, dirty);
        // Trim ownership records; the memory is released only after the drain below.
        let mut released = Vec::new();
        let keys: Vec<u64> = st
            .records
            .range(..end)
            .filter(|(k, r)| **k + r.len > iova)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let r = st.records.remove(&k).expect("key just listed");
            if k < iova {
                st.records.insert(
                    k,
                    MapRecord {
                        len: iova - k,
                        mem: r.mem.clone(),
                        offset: r.offset,
                    },
                );
            }
            if k + r.len > end {
                st.records.insert(
                    end,
                    MapRecord {
                        len: k + r.len - end,
                        mem: r.mem.clone(),
                        offset: r.offset + (end - k),
                    },
                );
            }
            released.push(r);
        }
        self.s.flush_range(iova, len);
        st.tables.arena.reclaim();
        drop(st);
        drop(released);
        Ok(done)
    }

    fn iova_to_phys(&self, iova: u64) -> Option<(u64, Perm)> {
        walker::iova_to_phys::<F>(&self.s.lock().tables, iova)
    }

    fn read_software(&self, iova: u64, buf: &mut [u8]) -> bool {
        // Under the structural lock: no unmap can release the memory while we copy.
        let st = self.s.lock();
        let mut off = 0usize;
        while off < buf.len() {
            let cur = iova + off as u64;
            let Some((pa, _)) = walker::iova_to_phys::<F>(&st.tables, cur) else {
                return false;
            };
            let n = ((PAGE_SIZE - (cur & (PAGE_SIZE - 1))) as usize).min(buf.len() - off);
            // SAFETY: `pa` is inside a mapping the lock keeps alive (`mem.rs`), and the piece
            // does not cross its 4 KiB page.
            unsafe { crate::mem::copy_from_host(pa, &mut buf[off..off + n]) };
            off += n;
        }
        true
    }

    fn leaf_entry(&self, iova: u64) -> Option<(usize, u64)> {
        walker::leaf_entry::<F>(&self.s.lock().tables, iova)
    }

    fn path_entries(&self, iova: u64) -> Vec<(usize, u64)> {
        walker::path_entries::<F>(&self.s.lock().tables, iova)
    }

    fn set_dirty_tracking(&self, enable: bool) -> Result<(), IommuError> {
        if !self.s.cfg.dirty_tracking {
            return Err(IommuError::NoDirtyOps);
        }
        let mut st = self.s.lock();
        let split = self.s.cfg.split_policy == SplitPolicy::EagerSplit && self.s.huge.load(Ordering::Relaxed);
        let o = LeafOpts {
            huge: true,
            tracking_domain: true,
        };
        if enable {
            if split && walker::split_all::<F>(&mut st.tables, 0, 1 << IOVA_BITS, o) > 0 {
                self.s.flush_all();
            }
            let ctx = self.s.ctx.load(Ordering::Relaxed);
            self.s.ctx.store(F::context_set_tracking(ctx, true), Ordering::Release);
            self.s.tracking.store(true, Ordering::Release);
            self.s.flush_all();
        } else {
            let ctx = self.s.ctx.load(Ordering::Relaxed);
            self.s.ctx.store(F::context_set_tracking(ctx, false), Ordering::Release);
            self.s.tracking.store(false, Ordering::Release);
            self.s.flush_all();
            if split {
                for level in 1..LEVELS - 1 {
                    let done = walker::collapse_level::<F>(&mut st.tables, level, o);
                    if !done.is_empty() {
                        self.s.flush_all();
                        walker::collapse_finish::<F>(&mut st.tables, done, level);
                        st.tables.arena.reclaim();
                    }
                }
            }
        }
        Ok(())
    }

    fn read_and_clear_dirty(
        &self,
        iova: u64,
        len: u64,
        flags: u32,
        naive: bool,
        out: &mut DirtyBitmap<'_>,
    ) -> Result<(), IommuError> {
        if !self.s.cfg.dirty_tracking {
            return Err(IommuError::NoDirtyOps);
        }
        if len == 0 {
            return Err(IommuError::ZeroLength { iova });
        }
        let end = match iova.checked_add(len) {
            Some(e) if e <= 1 << IOVA_BITS => e,
            _ => return Err(IommuError::OutOfRange { iova, len }),
        };
        // AMD and Intel drivers refuse a bitmap while tracking is off; Arm logs always.
        if out.bitmap.is_some() && F::KIND != FormatKind::ArmLpaeS1 && !self.s.tracking.load(Ordering::Acquire) {
            return Err(IommuError::TrackingDisabled);
        }
        let st = self.s.lock();
        if naive {
            walker::read_and_clear_dirty_naive::<F>(&st.tables, iova, end, flags, out);
        } else {
            let drain = || self.s.inflight.drain();
            let (skip, par) = (self.s.cfg.skip_unaccessed, st.harvest);
            walker::read_and_clear_dirty::<F>(&st.tables, iova..end, flags, skip, par, &drain, out);
        }
        Ok(())
    }

    #[inline]
    fn translate(&self, iova: u64, write: bool) -> Result<Xlat, FaultReason> {
        if iova >> IOVA_BITS != 0 {
            return Err(FaultReason::AddressSize);
        }
        let pfn = iova >> 12;
        let off = iova & (PAGE_SIZE - 1);
        if let Some(e) = self.s.iotlb.lookup(pfn) {
            if (write && e.write && e.write_ready) || (!write && e.read) {
                self.s.iotlb.count(false);
                return Ok(Xlat {
                    host: e.host_page | off,
                    read: e.read,
                    write: e.write,
                    write_ready: e.write_ready,
                });
            }
        }
        self.s.iotlb.count(true);
        let ticket = self.s.iotlb.ticket();
        let (page, perm, ready) = self.walk(iova, write)?;
        let e = IotlbEntry {
            host_page: page,
            read: F::effective_perm(perm).read(),
            write: perm.write(),
            write_ready: ready,
        };
        self.s.iotlb.fill(pfn, e, ticket);
        Ok(Xlat {
            host: page | off,
            read: e.read,
            write: e.write,
            write_ready: ready,
        })
    }

    fn leaf_histogram(&self) -> BTreeMap<u32, u64> {
        walker::leaf_histogram::<F>(&self.s.lock().tables)
    }

    fn effective_perm(&self, perm: Perm) -> Perm {
        F::effective_perm(perm)
    }
}

/// An IOMMU domain (an iommufd HWPT's hardware side). Cloning shares the domain.
#[derive(Clone)]
pub struct Domain(Arc<dyn DomainOps>);

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("format", &self.format())
            .field("tracking", &self.dirty_tracking_enabled())
            .finish()
    }
}

impl Domain {
    /// Creates a domain. Dirty tracking needs the IOMMU's capability (`EOPNOTSUPP` otherwise).
    pub fn new(cfg: DomainConfig) -> Result<Domain, IommuError> {
        if cfg.dirty_tracking && !cfg.hw_dirty_capable {
            return Err(IommuError::NotCapable);
        }
        let ops: Arc<dyn DomainOps> = match cfg.format {
            FormatKind::AmdV1 => Arc::new(DomainImpl::<AmdV1>::new(cfg)),
            FormatKind::VtdSs => Arc::new(DomainImpl::<VtdSs>::new(cfg)),
            FormatKind::ArmLpaeS1 => Arc::new(DomainImpl::<ArmLpaeS1>::new(cfg)),
        };
        Ok(Domain(ops))
    }

    /// The configuration the domain was created with (`huge_pages` may have changed since;
    /// see [`Domain::huge_pages`]).
    pub fn config(&self) -> &DomainConfig {
        &self.0.shared().cfg
    }

    /// Whether new mappings may use leaves larger than 4 KiB.
    pub fn huge_pages(&self) -> bool {
        self.0.shared().huge.load(Ordering::Acquire)
    }

    /// Changes how harvests from now on use the cores (benchmarks compare one thread with all).
    pub fn set_harvest_parallelism(&self, par: HarvestParallelism) {
        self.0.shared().lock().harvest = par;
    }

    /// Allows or forbids huge leaves for mappings made from now on (existing leaves stay).
    pub fn set_huge_pages(&self, on: bool) {
        let _st = self.0.shared().lock();
        self.0.shared().huge.store(on, Ordering::Release);
    }
    pub fn format(&self) -> FormatKind {
        self.config().format
    }
    /// Whether two handles are the same domain.
    pub fn same(&self, other: &Domain) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Maps `[iova, iova + len)` to `mem[offset .. offset + len)`. The domain keeps `mem`
    /// alive for as long as any part of the mapping exists.
    pub fn map(
        &self,
        iova: u64,
        len: u64,
        mem: Arc<dyn HostMemory>,
        offset: u64,
        perm: Perm,
    ) -> Result<(), IommuError> {
        self.0.map(iova, len, mem, offset, perm)
    }

    /// Unmaps whatever is mapped in `[iova, iova + len)` and returns the bytes unmapped.
    /// Invalidates the IOTLB and drains in-flight DMA before returning.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<u64, IommuError> {
        self.0.unmap(iova, len, None)
    }

    /// Unmaps like [`Domain::unmap`] and reports to `dirty` every removed leaf that was dirty,
    /// whole, in IOVA order: the dirty state leaves with the translation and is not lost
    /// (`docs/viommu.md#unmap-with-dirty`). When it returns, no write through the removed
    /// translations is still in flight. Needs a domain allocated for dirty tracking
    /// (`EOPNOTSUPP`); with tracking disabled, AMD and VT-d leaves carry no D and nothing is
    /// reported.
    pub fn unmap_read_dirty(&self, iova: u64, len: u64, dirty: &mut dyn FnMut(u64, u64)) -> Result<u64, IommuError> {
        self.0.unmap(iova, len, Some(dirty))
    }

    /// The host address `iova` translates to.
    pub fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        self.0.iova_to_phys(iova).map(|(pa, _)| pa)
    }

    /// The translation and the permissions the hardware grants for `iova`.
    pub fn translation(&self, iova: u64) -> Option<(u64, Perm)> {
        self.0.iova_to_phys(iova).map(|(pa, p)| (pa, self.0.effective_perm(p)))
    }

    /// Reads `buf.len()` bytes at `iova` as software does, without setting Accessed or Dirty
    /// and without a device: false if any page is unmapped.
    pub fn read_software(&self, iova: u64, buf: &mut [u8]) -> bool {
        self.0.read_software(iova, buf)
    }

    /// Raw leaf entry translating `iova`, with the level of its table.
    pub fn leaf_entry(&self, iova: u64) -> Option<(usize, u64)> {
        self.0.leaf_entry(iova)
    }

    /// Raw entries a walk for `iova` reads, root first, with their table levels.
    pub fn path_entries(&self, iova: u64) -> Vec<(usize, u64)> {
        self.0.path_entries(iova)
    }

    /// The driver's `set_dirty_tracking`: flips the per-domain enable in the context word
    /// (DTE.HAD, PASID-entry SSADE; a no-op for Arm, where CD.HD is always on) and flushes the
    /// IOTLB. It does not clear dirty state; the iommufd layer does that first on enable.
    /// Under [`SplitPolicy::EagerSplit`] it splits huge leaves before enabling and collapses
    /// them after disabling.
    pub fn set_dirty_tracking(&self, enable: bool) -> Result<(), IommuError> {
        self.0.set_dirty_tracking(enable)
    }

    pub fn dirty_tracking_enabled(&self) -> bool {
        self.0.shared().tracking.load(Ordering::Acquire)
    }

    /// The driver's `read_and_clear_dirty` (generic walker, per-level cursor).
    pub fn read_and_clear_dirty(
        &self,
        iova: u64,
        len: u64,
        flags: u32,
        out: &mut DirtyBitmap<'_>,
    ) -> Result<(), IommuError> {
        self.0.read_and_clear_dirty(iova, len, flags, false, out)
    }

    /// The same, with the Linux ≤ 6.x per-IOVA root walk (benchmark baseline).
    pub fn read_and_clear_dirty_naive(
        &self,
        iova: u64,
        len: u64,
        flags: u32,
        out: &mut DirtyBitmap<'_>,
    ) -> Result<(), IommuError> {
        self.0.read_and_clear_dirty(iova, len, flags, true, out)
    }

    /// `iommu_iotlb_sync`: invalidates the gathered range and drains in-flight DMA.
    pub fn iotlb_sync(&self, gather: &IotlbGather) {
        if !gather.is_empty() {
            self.0.shared().flush_range(gather.start, gather.end - gather.start);
        }
    }

    /// Invalidates one IOVA range of the IOTLB and drains in-flight DMA.
    pub fn flush_iotlb_range(&self, iova: u64, len: u64) {
        self.0.shared().flush_range(iova, len);
    }

    /// Invalidates the whole IOTLB and drains in-flight DMA.
    pub fn flush_iotlb_all(&self) {
        self.0.shared().flush_all();
    }

    /// Attaches `device` and returns its DMA handle. Attaching again returns another handle
    /// for the same device.
    pub fn attach(&self, device: u32) -> crate::dma::Dma {
        let flag = self.0.shared().devices.attach(device);
        crate::dma::Dma::new(crate::dma::Target::Paging(self.clone()), device, flag)
    }

    /// Detaches `device`: its handles fail from now on, and no access of it is still running
    /// when this returns.
    pub fn detach(&self, device: u32) {
        self.0.shared().devices.detach(device);
        self.flush_iotlb_all();
    }

    /// Devices currently attached.
    pub fn attached_devices(&self) -> Vec<u32> {
        self.0.shared().devices.list()
    }

    /// Fault records kept and the total number of faults ever logged.
    pub fn faults(&self) -> (Vec<Fault>, u64) {
        self.0.shared().faults.snapshot()
    }
    /// Removes and returns the kept fault records.
    pub fn take_faults(&self) -> Vec<Fault> {
        self.0.shared().faults.take()
    }

    /// The capability register (EFR, ECAP or IDR0) of the IOMMU behind this domain.
    pub fn capability_register(&self) -> u64 {
        self.0.shared().cap
    }
    /// The per-domain context word (DTE qword 0, PASID entry qword 0, CD word 0).
    pub fn context_word(&self) -> u64 {
        self.0.shared().ctx.load(Ordering::Acquire)
    }

    /// Leaves by size (log2 bytes → count).
    pub fn leaf_histogram(&self) -> BTreeMap<u32, u64> {
        self.0.leaf_histogram()
    }
    /// Table pages owned by the page table.
    pub fn table_pages(&self) -> usize {
        self.0.shared().lock().tables.arena.pages()
    }
    /// IOTLB slots.
    pub fn iotlb_capacity(&self) -> usize {
        self.0.shared().iotlb.capacity()
    }
    /// Translations through this domain's IOTLB so far, and how many of them walked the table.
    pub fn iotlb_stats(&self) -> (u64, u64) {
        self.0.shared().iotlb.stats()
    }

    pub(crate) fn translate(&self, iova: u64, write: bool) -> Result<u64, FaultReason> {
        self.0.translate(iova, write).map(|x| x.host)
    }
    /// The translation with the permissions and write-readiness a nested walk combines.
    pub(crate) fn translate_full(&self, iova: u64, write: bool) -> Result<Xlat, FaultReason> {
        self.0.translate(iova, write)
    }
    /// Registers a nested domain's IOTLB, to be invalidated with this domain's.
    pub(crate) fn add_nested_iotlb(&self, t: &Arc<Iotlb>) {
        let mut v = self.0.shared().nested.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(t));
    }
    /// Sabotage for tests: stage-2 invalidations stop reaching the IOTLBs of nested domains,
    /// so a combined entry's write-ready bit outlives a harvest. Never use it otherwise.
    #[doc(hidden)]
    pub fn sabotage_keep_nested_iotlbs(&self, on: bool) {
        self.0.shared().keep_nested.store(on, Ordering::Relaxed);
    }

    /// Waits for every DMA in flight through this domain or a domain nested on it.
    pub(crate) fn drain(&self) {
        self.0.shared().inflight.drain();
    }
    pub(crate) fn register_stream(&self) -> Arc<crate::iotlb::AccessSeq> {
        self.0.shared().inflight.register()
    }
    pub(crate) fn log_fault(&self, f: Fault) {
        self.0.shared().faults.push(f);
    }
}
