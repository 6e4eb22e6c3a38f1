//! The one page-table walker, written once over [`Format`].
//!
//! Structural operations (map, unmap, harvest, split, collapse) run under the domain's
//! structural lock and descend the tree recursively, so each table is visited once per call:
//! the recursion *is* the per-level cursor of Linux's `generic_pt`. DMA translations walk
//! lock-free from the root (see `domain.rs`); every entry they may race with is updated with a
//! single atomic store or compare-exchange, so a concurrent walk always sees either the old or
//! the new translation, both valid for the IOVA.
//!
//! Choices documented here because they are visible to users:
//! * `map` picks, at every position, the largest leaf the format encodes that the IOVA and the
//!   output address are aligned to and the remaining length covers (only 4 KiB when huge
//!   pages are off). Overlapping an existing translation fails with `EEXIST` before anything
//!   is written.
//! * `unmap` of part of a huge leaf **splits** the leaf (replicated AMD leaves first become
//!   default leaves of their level, default leaves become a table of 512 smaller ones), keeping
//!   the rest mapped and inheriting the dirty state, then removes the requested part.
//! * `read_and_clear_dirty` reports a dirty leaf clipped to the requested range (generic_pt
//!   behaviour, not the 6.x drivers' whole-leaf report) and clears the whole leaf. Because the
//!   part outside the range is then reported by no later walk, the recorder is also told the
//!   leaf's extent ([`RecordDirty::record_leaf`]), and the IOTLB gather gets the whole leaf.

use crate::format::{level_shift, Format, Perm, Pte, LEVELS, PAGE_SHIFT, PAGE_SIZE};
use crate::mem::{TableArena, TablePage, ENTRIES};
use std::sync::atomic::Ordering;

/// Flag for [`read_and_clear_dirty`]: report without resetting (Linux `IOMMU_DIRTY_NO_CLEAR`).
pub const DIRTY_NO_CLEAR: u32 = 1 << 0;

/// Receives dirty ranges (Linux's `iova_bitmap_set`).
pub trait RecordDirty {
    /// `[iova, iova + len)` is dirty; it lies inside the walked range.
    fn record(&mut self, iova: u64, len: u64);

    /// A dirty leaf `[leaf, leaf + leaf_len)`, of which `[iova, iova + len)` lies inside the
    /// walked range. A clearing walk resets the whole leaf, so a part outside the range is
    /// reported by no later walk: a caller that walks one request in pieces (iommufd's bitmap
    /// windows) must keep that part itself, as Linux's `iova_bitmap` sets bits ahead of its
    /// window. The default records only the part inside.
    fn record_leaf(&mut self, iova: u64, len: u64, _leaf: u64, _leaf_len: u64) {
        self.record(iova, len)
    }
}

impl<F: FnMut(u64, u64)> RecordDirty for F {
    fn record(&mut self, iova: u64, len: u64) {
        self(iova, len)
    }
}

/// The IOVA range whose IOTLB entries a batch of PTE changes made stale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbGather {
    pub start: u64,
    pub end: u64,
}

impl IotlbGather {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub fn add_range(&mut self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.is_empty() {
            self.start = iova;
            self.end = iova + len;
        } else {
            self.start = self.start.min(iova);
            self.end = self.end.max(iova + len);
        }
    }
}

/// Linux's `struct iommu_dirty_bitmap`: where a harvest reports to.
#[derive(Default)]
pub struct DirtyBitmap<'a> {
    /// Receives dirty ranges; `None` makes the walk only reset dirty state.
    pub bitmap: Option<&'a mut dyn RecordDirty>,
    /// Collects the range to invalidate after clearing.
    pub gather: Option<&'a mut IotlbGather>,
}

impl DirtyBitmap<'_> {
    /// Reports the dirty leaf `[leaf, leaf + leaf_len)` of a walk over `[start, end)`.
    #[inline]
    fn record_leaf(&mut self, leaf: u64, leaf_len: u64, start: u64, end: u64) {
        let rs = leaf.max(start);
        let re = (leaf + leaf_len).min(end);
        if let Some(b) = self.bitmap.as_deref_mut() {
            b.record_leaf(rs, re - rs, leaf, leaf_len);
        }
        if let Some(g) = self.gather.as_deref_mut() {
            // The whole leaf was cleared, so IOTLB entries anywhere in it may still say "dirty
            // already set"; invalidating only the part in range would let a later write to
            // the rest skip the PTE and never be reported.
            g.add_range(leaf, leaf_len);
        }
    }
}

/// The page table: its pages and its root.
pub(crate) struct Tables {
    pub arena: TableArena,
    pub root: u64,
}

impl Tables {
    pub fn new() -> Self {
        let mut arena = TableArena::new();
        let root = arena.alloc();
        Self { arena, root }
    }
}

/// Leaf-encoding options fixed per domain.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeafOpts {
    /// Allow leaves larger than 4 KiB.
    pub huge: bool,
    /// The domain was allocated for dirty tracking (Arm: writable leaves get DBM).
    pub tracking_domain: bool,
}

#[inline(always)]
fn span(level: usize) -> u64 {
    1u64 << level_shift(level)
}

#[inline(always)]
fn table_span(level: usize) -> u64 {
    span(level) << 9
}

#[inline(always)]
fn index(iova: u64, level: usize) -> usize {
    ((iova >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize
}

/// Number of entries a leaf of `size_lg2` occupies in a table at `level`.
#[inline(always)]
fn replicas(size_lg2: u32, level: usize) -> usize {
    1usize << (size_lg2 - level_shift(level))
}

/// Builds a leaf with the given dirty state and accessed bits.
fn leaf_with<F: Format>(dirty: bool, accessed: u64, pa: u64, level: usize, lg2: u32, perm: Perm, o: LeafOpts) -> u64 {
    let fresh = F::leaf(pa, level, lg2, perm, o.tracking_domain);
    let fresh = if dirty { F::dirty(fresh) } else { F::clean(fresh) };
    fresh | accessed
}

/// Whether any leaf is present in `[start, end)`.
pub(crate) fn any_present<F: Format>(t: &Tables, start: u64, end: u64) -> bool {
    fn rec<F: Format>(a: &TableArena, tp: u64, level: usize, base: u64, start: u64, end: u64) -> bool {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let table = unsafe { a.table(tp) };
        let mut idx = index(start.max(base), level);
        let last = index((end - 1).min(base + table_span(level) - 1), level);
        while idx <= last {
            let ebase = base + ((idx as u64) << level_shift(level));
            match F::decode(table.load(idx), level) {
                Pte::Empty => {}
                Pte::Leaf { .. } => return true,
                Pte::Table { pa } => {
                    let s = start.max(ebase);
                    let e = end.min(ebase + span(level));
                    if rec::<F>(a, pa, level - 1, ebase, s, e) {
                        return true;
                    }
                }
            }
            idx += 1;
        }
        false
    }
    start < end && rec::<F>(&t.arena, t.root, LEVELS - 1, 0, start, end)
}

/// Maps `[iova, iova + len)` to `[pa, pa + len)`. The caller checked alignment and that the
/// range is free ([`any_present`]).
pub(crate) fn map<F: Format>(t: &mut Tables, iova: u64, pa: u64, len: u64, perm: Perm, o: LeafOpts) {
    #[allow(clippy::too_many_arguments)]
    fn rec<F: Format>(
        a: &mut TableArena,
        tp: u64,
        level: usize,
        base: u64,
        mut iova: u64,
        mut pa: u64,
        end: u64,
        perm: Perm,
        o: LeafOpts,
    ) {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let table = unsafe { a.table(tp) };
        let shift = level_shift(level);
        while iova < end {
            let idx = index(iova, level);
            if let Some(lg2) = fit::<F>(table, level, idx, iova, pa, end, o) {
                let pte = F::leaf(pa, level, lg2, perm, o.tracking_domain);
                for j in 0..replicas(lg2, level) {
                    table.entry(idx + j).store(pte, Ordering::Release);
                }
                iova += 1 << lg2;
                pa += 1 << lg2;
                continue;
            }
            let ebase = base + ((idx as u64) << shift);
            let child = match F::decode(table.load(idx), level) {
                Pte::Table { pa } => pa,
                Pte::Empty => {
                    let c = a.alloc();
                    table.entry(idx).store(F::table(c, level), Ordering::Release);
                    c
                }
                Pte::Leaf { .. } => unreachable!("map over a present leaf at {iova:#x}"),
            };
            let cend = end.min(ebase + span(level));
            rec::<F>(a, child, level - 1, ebase, iova, pa, cend, perm, o);
            pa += cend - iova;
            iova = cend;
        }
    }
    rec::<F>(&mut t.arena, t.root, LEVELS - 1, 0, iova, pa, iova + len, perm, o);
}

/// The largest leaf size that fits at this position, with every replica slot empty.
#[inline]
fn fit<F: Format>(
    table: &TablePage,
    level: usize,
    idx: usize,
    iova: u64,
    pa: u64,
    end: u64,
    o: LeafOpts,
) -> Option<u32> {
    for &lg2 in F::leaf_sizes(level) {
        let sz = 1u64 << lg2;
        if (lg2 > PAGE_SHIFT && !o.huge) || iova & (sz - 1) != 0 || pa & (sz - 1) != 0 || end - iova < sz {
            continue;
        }
        let n = replicas(lg2, level);
        if (0..n).all(|j| table.load(idx + j) == 0) {
            return Some(lg2);
        }
    }
    None
}

/// Unmaps what is mapped in `[start, end)`; returns the bytes unmapped. Partially covered huge
/// leaves are split first. Emptied tables are retired; the caller invalidates, drains and
/// reclaims.
pub(crate) fn unmap<F: Format>(t: &mut Tables, start: u64, end: u64, o: LeafOpts) -> u64 {
    fn rec<F: Format>(a: &mut TableArena, tp: u64, level: usize, base: u64, start: u64, end: u64, o: LeafOpts) -> u64 {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let table = unsafe { a.table(tp) };
        let shift = level_shift(level);
        let mut done = 0;
        let mut idx = index(start.max(base), level);
        let last = index((end - 1).min(base + table_span(level) - 1), level);
        while idx <= last {
            let pte = table.load(idx);
            let ebase = base + ((idx as u64) << shift);
            match F::decode(pte, level) {
                Pte::Empty => idx += 1,
                Pte::Table { pa } => {
                    done += rec::<F>(
                        a,
                        pa,
                        level - 1,
                        ebase,
                        start.max(ebase),
                        end.min(ebase + span(level)),
                        o,
                    );
                    // SAFETY: the address is the root or was read from a present entry of this arena's
                    // tree, and the caller holds the structural lock, so the page is not retired while
                    // the reference is used (`mem.rs`).
                    if table_is_empty(unsafe { a.table(pa) }) {
                        table.entry(idx).store(0, Ordering::Release);
                        a.retire(pa);
                    }
                    idx += 1;
                }
                Pte::Leaf { size_lg2, .. } => {
                    let n = replicas(size_lg2, level);
                    let first = idx & !(n - 1);
                    let lbase = base + ((first as u64) << shift);
                    let lend = lbase + (1u64 << size_lg2);
                    if start <= lbase && lend <= end {
                        for j in first..first + n {
                            table.entry(j).store(0, Ordering::Release);
                        }
                        done += 1u64 << size_lg2;
                        idx = first + n;
                    } else {
                        split_leaf::<F>(a, table, level, first, o);
                    }
                }
            }
        }
        done
    }
    if start >= end {
        return 0;
    }
    rec::<F>(&mut t.arena, t.root, LEVELS - 1, 0, start, end, o)
}

fn table_is_empty(table: &TablePage) -> bool {
    (0..ENTRIES).all(|i| table.load(i) == 0)
}

/// Splits the leaf whose first entry is `first` one step, keeping every translation valid: a
/// replicated leaf becomes default leaves of its level, a default leaf becomes a table of 512
/// default leaves one level down. Each entry changes with one compare-exchange (an atomic
/// replace, not break-before-make), retried if hardware set A or D meanwhile; the new pieces
/// inherit the leaf's dirty and accessed state, so no dirt is lost. The caller invalidates the
/// IOTLB afterwards.
pub(crate) fn split_leaf<F: Format>(a: &mut TableArena, table: &TablePage, level: usize, first: usize, o: LeafOpts) {
    let shift = level_shift(level);
    let Pte::Leaf { pa, size_lg2, perm } = F::decode(table.load(first), level) else {
        return;
    };
    let n = replicas(size_lg2, level);
    if n > 1 {
        // Any replica may carry the leaf's dirt: OR them into every piece.
        let mut dirty = false;
        let mut accessed = 0;
        for j in first..first + n {
            let v = table.load(j);
            dirty |= F::is_dirty(v);
            accessed |= F::leaf_accessed_bits(v);
        }
        for j in 0..n {
            let e = table.entry(first + j);
            let mut old = e.load(Ordering::Acquire);
            loop {
                let d = dirty || F::is_dirty(old);
                let a = accessed | F::leaf_accessed_bits(old);
                let new = leaf_with::<F>(d, a, pa + ((j as u64) << shift), level, shift, perm, o);
                match e.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(cur) => old = cur,
                }
            }
        }
        return;
    }
    debug_assert!(level > 0, "4 KiB leaves cannot be split");
    let child = a.alloc();
    // SAFETY: the address is the root or was read from a present entry of this arena's
    // tree, and the caller holds the structural lock, so the page is not retired while
    // the reference is used (`mem.rs`).
    let ct = unsafe { a.table(child) };
    let cshift = level_shift(level - 1);
    let e = table.entry(first);
    let mut old = e.load(Ordering::Acquire);
    loop {
        for k in 0..ENTRIES {
            let v = leaf_with::<F>(
                F::is_dirty(old),
                F::leaf_accessed_bits(old),
                pa + ((k as u64) << cshift),
                level - 1,
                cshift,
                perm,
                o,
            );
            ct.entry(k).store(v, Ordering::Relaxed);
        }
        let mut pde = F::table(child, level);
        if F::is_dirty(old) {
            // Keep "A clear means nothing dirty below" true for the harvest's skip.
            pde = F::table_set_accessed(pde);
        }
        match e.compare_exchange(old, pde, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(cur) => old = cur,
        }
    }
}

/// Splits every leaf larger than 4 KiB in `[start, end)` down to 4 KiB. Returns the number of
/// leaves split.
pub(crate) fn split_all<F: Format>(t: &mut Tables, start: u64, end: u64, o: LeafOpts) -> u64 {
    fn rec<F: Format>(a: &mut TableArena, tp: u64, level: usize, base: u64, start: u64, end: u64, o: LeafOpts) -> u64 {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let table = unsafe { a.table(tp) };
        let shift = level_shift(level);
        let mut n_split = 0;
        let mut idx = index(start.max(base), level);
        let last = index((end - 1).min(base + table_span(level) - 1), level);
        while idx <= last {
            let ebase = base + ((idx as u64) << shift);
            match F::decode(table.load(idx), level) {
                Pte::Empty => idx += 1,
                Pte::Table { pa } => {
                    n_split += rec::<F>(
                        a,
                        pa,
                        level - 1,
                        ebase,
                        start.max(ebase),
                        end.min(ebase + span(level)),
                        o,
                    );
                    idx += 1;
                }
                Pte::Leaf { size_lg2, .. } if size_lg2 > PAGE_SHIFT => {
                    let first = idx & !(replicas(size_lg2, level) - 1);
                    split_leaf::<F>(a, table, level, first, o);
                    n_split += 1;
                    idx = first; // look again at what the split produced
                }
                Pte::Leaf { .. } => idx += 1,
            }
        }
        n_split
    }
    if start >= end {
        return 0;
    }
    rec::<F>(&mut t.arena, t.root, LEVELS - 1, 0, start, end, o)
}

/// A collapse done by [`collapse_level`]: the old table stays allocated until the caller has
/// drained in-flight DMA and folded late dirt into the new leaf with [`collapse_finish`].
pub(crate) struct Collapsed {
    entry_table: u64,
    idx: usize,
    old_table: u64,
}

/// Replaces every table at `level - 1` whose 512 entries are default leaves with contiguous,
/// aligned output addresses and equal permissions by one leaf at `level` (an atomic replace of
/// the table entry). The new leaf is dirty if any piece was.
pub(crate) fn collapse_level<F: Format>(t: &mut Tables, level: usize, o: LeafOpts) -> Vec<Collapsed> {
    fn rec<F: Format>(a: &TableArena, tp: u64, tl: usize, target: usize, o: LeafOpts, out: &mut Vec<Collapsed>) {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let table = unsafe { a.table(tp) };
        for idx in 0..ENTRIES {
            let pte = table.load(idx);
            let Pte::Table { pa: child } = F::decode(pte, tl) else {
                continue;
            };
            if tl > target {
                rec::<F>(a, child, tl - 1, target, o, out);
                continue;
            }
            // SAFETY: the address is the root or was read from a present entry of this arena's
            // tree, and the caller holds the structural lock, so the page is not retired while
            // the reference is used (`mem.rs`).
            let ct = unsafe { a.table(child) };
            let cl = tl - 1;
            let cshift = level_shift(cl);
            let Pte::Leaf {
                pa: pa0,
                size_lg2,
                perm,
            } = F::decode(ct.load(0), cl)
            else {
                continue;
            };
            if size_lg2 != cshift || pa0 & (span(tl) - 1) != 0 {
                continue;
            }
            let mut dirty = false;
            let mut accessed = 0;
            let ok = (0..ENTRIES).all(|k| {
                let v = ct.load(k);
                dirty |= F::is_dirty(v);
                accessed |= F::leaf_accessed_bits(v);
                F::decode(v, cl)
                    == Pte::Leaf {
                        pa: pa0 + ((k as u64) << cshift),
                        size_lg2: cshift,
                        perm,
                    }
            });
            if !ok {
                continue;
            }
            let mut leaf = F::leaf(pa0, tl, level_shift(tl), perm, o.tracking_domain) | accessed;
            leaf = if dirty { F::dirty(leaf) } else { F::clean(leaf) };
            if table
                .entry(idx)
                .compare_exchange(pte, leaf, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                out.push(Collapsed {
                    entry_table: tp,
                    idx,
                    old_table: child,
                });
            }
        }
    }
    let mut out = Vec::new();
    if !F::leaf_sizes(level).contains(&level_shift(level)) || level == 0 || level >= LEVELS {
        return out;
    }
    rec::<F>(&t.arena, t.root, LEVELS - 1, level, o, &mut out);
    out
}

/// After the drain that follows [`collapse_level`]: carries dirt that DMA set in the old pieces
/// during the swap into the new leaf, then retires the old tables.
pub(crate) fn collapse_finish<F: Format>(t: &mut Tables, done: Vec<Collapsed>, level: usize) {
    for c in done {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let old = unsafe { t.arena.table(c.old_table) };
        if (0..ENTRIES).any(|k| F::is_dirty(old.load(k))) {
            // SAFETY: the address is the root or was read from a present entry of this arena's
            // tree, and the caller holds the structural lock, so the page is not retired while
            // the reference is used (`mem.rs`).
            let e = unsafe { t.arena.table(c.entry_table) }.entry(c.idx);
            let mut v = e.load(Ordering::Acquire);
            while matches!(F::decode(v, level), Pte::Leaf { .. }) && !F::is_dirty(v) {
                match e.compare_exchange(v, F::dirty(v), Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(cur) => v = cur,
                }
            }
        }
        t.arena.retire(c.old_table);
    }
}

/// Every entry a walk for `iova` reads, root first: (level, entry value).
pub(crate) fn path_entries<F: Format>(t: &Tables, iova: u64) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    if iova >> crate::format::IOVA_BITS != 0 {
        return out;
    }
    let mut tp = t.root;
    for level in (0..LEVELS).rev() {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let pte = unsafe { t.arena.table(tp) }.load(index(iova, level));
        out.push((level, pte));
        match F::decode(pte, level) {
            Pte::Table { pa } => tp = pa,
            _ => break,
        }
    }
    out
}

/// The leaf translating `iova`: (level, entry value), without hardware updates.
pub(crate) fn leaf_entry<F: Format>(t: &Tables, iova: u64) -> Option<(usize, u64)> {
    if iova >> crate::format::IOVA_BITS != 0 {
        return None;
    }
    let mut tp = t.root;
    for level in (0..LEVELS).rev() {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let pte = unsafe { t.arena.table(tp) }.load(index(iova, level));
        match F::decode(pte, level) {
            Pte::Empty => return None,
            Pte::Leaf { .. } => return Some((level, pte)),
            Pte::Table { pa } => tp = pa,
        }
    }
    None
}

/// Translates `iova` to its output address.
pub(crate) fn iova_to_phys<F: Format>(t: &Tables, iova: u64) -> Option<(u64, Perm)> {
    let (level, pte) = leaf_entry::<F>(t, iova)?;
    match F::decode(pte, level) {
        Pte::Leaf { pa, size_lg2, perm } => Some((pa + (iova & ((1u64 << size_lg2) - 1)), perm)),
        _ => None,
    }
}

/// Reports and (unless [`DIRTY_NO_CLEAR`]) resets the dirty leaves in `[start, end)`.
///
/// With `skip_unaccessed`, on formats whose table entries have an Accessed bit, subtrees whose
/// table entry has A clear are skipped: the hardware sets A on every level it walks before it
/// sets a leaf's D, so A clear means nothing below was written since A was last cleared.
///
/// Clearing A must not open a window where a walk that already read A=1 sets D after the leaf
/// was scanned, so a clearing harvest runs in two phases, as software would on hardware:
/// 1. walk the non-leaf entries, clear A in those the range covers completely and collect the
///    tables whose A was set;
/// 2. `drain()`: invalidate and wait for in-flight walks (each either finished its D update or
///    will re-set the A bits it finds clear);
/// 3. scan the collected tables' leaves.
///
/// Without clearing (`DIRTY_NO_CLEAR`) nothing changes A, and one pass suffices.
pub(crate) fn read_and_clear_dirty<F: Format>(
    t: &Tables,
    start: u64,
    end: u64,
    flags: u32,
    skip_unaccessed: bool,
    drain: &dyn Fn(),
    out: &mut DirtyBitmap<'_>,
) {
    if start >= end {
        return;
    }
    let mut w = Walk {
        arena: &t.arena,
        start,
        end,
        clear: flags & DIRTY_NO_CLEAR == 0,
        skip: skip_unaccessed && F::TABLE_ACCESSED,
        out,
    };
    if w.skip && w.clear {
        let mut work = Vec::new();
        collect_accessed::<F>(&w, t.root, LEVELS - 1, 0, &mut work);
        drain();
        // No software prefetch: table pages are contiguous on huge pages and the hardware
        // stream prefetcher does better alone. Measured with `livemig bench harvest`:
        // prefetching the next table made the dense 1 % case ~1.7x slower, and priming sparse
        // jumps (1 TiB at 0.1 %) gave no consistent gain.
        for seg in work {
            scan::<F>(&mut w, seg.tp, seg.level, seg.base, false, seg.lo, seg.hi);
        }
    } else {
        scan::<F>(&mut w, t.root, LEVELS - 1, 0, true, start, end);
    }
}

struct Walk<'a, 'b> {
    arena: &'a TableArena,
    start: u64,
    end: u64,
    clear: bool,
    skip: bool,
    out: &'a mut DirtyBitmap<'b>,
}

/// Phase 1 of a clearing harvest: clears A in fully covered table entries and lists, in IOVA
/// order, the segments of tables (at any level) to scan for leaves: runs of entries between
/// the table entries it descends into, reached through entries whose A was set.
fn collect_accessed<F: Format>(w: &Walk<'_, '_>, tp: u64, level: usize, base: u64, work: &mut Vec<Segment>) {
    let s = w.start.max(base);
    let e = w.end.min(base + table_span(level));
    if level == 0 {
        work.push(Segment {
            tp,
            level,
            base,
            lo: s,
            hi: e,
        });
        return;
    }
    // SAFETY: the address is the root or was read from a present entry of this arena's
    // tree, and the caller holds the structural lock, so the page is not retired while
    // the reference is used (`mem.rs`).
    let table = unsafe { w.arena.table(tp) };
    let shift = level_shift(level);
    let mut seg_lo = s;
    let mut idx = index(s, level);
    let last = index(e - 1, level);
    while idx <= last {
        let entry = table.entry(idx);
        let pte = entry.load(Ordering::SeqCst);
        if let Pte::Table { pa } = F::decode(pte, level) {
            let ebase = base + ((idx as u64) << shift);
            if ebase > seg_lo {
                work.push(Segment {
                    tp,
                    level,
                    base,
                    lo: seg_lo,
                    hi: ebase,
                });
            }
            seg_lo = (ebase + span(level)).min(e);
            if F::table_accessed(pte) {
                if w.start <= ebase && ebase + span(level) <= w.end {
                    entry.fetch_and(!(pte ^ F::table_clear_accessed(pte)), Ordering::SeqCst);
                }
                collect_accessed::<F>(w, pa, level - 1, ebase, work);
            }
        }
        idx += 1;
    }
    if e > seg_lo {
        work.push(Segment {
            tp,
            level,
            base,
            lo: seg_lo,
            hi: e,
        });
    }
}

/// Part of one table to scan in phase 3.
struct Segment {
    tp: u64,
    level: usize,
    base: u64,
    lo: u64,
    hi: u64,
}

/// Scans the leaves of one table in range; with `descend`, also the tables below it (skipping
/// those whose A is clear when the walk skips).
fn scan<F: Format>(w: &mut Walk<'_, '_>, tp: u64, level: usize, base: u64, descend: bool, lo: u64, hi: u64) {
    // SAFETY: the address is the root or was read from a present entry of this arena's
    // tree, and the caller holds the structural lock, so the page is not retired while
    // the reference is used (`mem.rs`).
    let table = unsafe { w.arena.table(tp) };
    let shift = level_shift(level);
    let s = lo.max(base);
    let e = hi.min(base + table_span(level));
    let mut idx = index(s, level);
    let last = index(e - 1, level);
    while idx <= last {
        if level == 0 && idx & 7 == 0 && idx + 8 <= last + 1 {
            // Fast path: most leaf entries are clean; test eight at a time.
            let mut any = false;
            for j in idx..idx + 8 {
                any |= F::is_dirty(table.load(j));
            }
            if !any {
                idx += 8;
                continue;
            }
        }
        let pte = table.load(idx);
        match F::decode(pte, level) {
            Pte::Empty => idx += 1,
            Pte::Table { pa } => {
                if descend && (!w.skip || F::table_accessed(pte)) {
                    scan::<F>(w, pa, level - 1, base + ((idx as u64) << shift), true, lo, hi);
                }
                idx += 1;
            }
            Pte::Leaf { size_lg2, .. } => {
                let n = replicas(size_lg2, level);
                let first = idx & !(n - 1);
                let mut dirty = false;
                for j in first..first + n {
                    let entry = table.entry(j);
                    let v = entry.load(Ordering::Relaxed);
                    if !F::is_dirty(v) {
                        continue;
                    }
                    dirty = true;
                    if w.clear {
                        // A plain store, as generic_pt's make_write_clean: hardware never
                        // changes an entry that is already dirty (A/AF are set with D), so no
                        // update can be lost; writes that still use a cached "dirty" state are
                        // ordered by the caller's IOTLB flush, which drains them.
                        entry.store(F::clean(v), Ordering::Relaxed);
                    }
                }
                if dirty {
                    let lb = base + ((first as u64) << shift);
                    w.out.record_leaf(lb, 1u64 << size_lg2, w.start, w.end);
                }
                idx = first + n;
            }
        }
    }
}

/// The Linux ≤ 6.x AMD and Intel algorithm, kept as the benchmark's naive baseline: for every
/// IOVA, walk from the root (`fetch_pte`), test-and-clear, advance by the leaf size.
pub(crate) fn read_and_clear_dirty_naive<F: Format>(
    t: &Tables,
    start: u64,
    end: u64,
    flags: u32,
    out: &mut DirtyBitmap<'_>,
) {
    let clear = flags & DIRTY_NO_CLEAR == 0;
    let mut iova = start;
    while iova < end {
        let mut tp = t.root;
        let mut step = PAGE_SIZE;
        for level in (0..LEVELS).rev() {
            // SAFETY: the address is the root or was read from a present entry of this arena's
            // tree, and the caller holds the structural lock, so the page is not retired while
            // the reference is used (`mem.rs`).
            let table = unsafe { t.arena.table(tp) };
            let idx = index(iova, level);
            match F::decode(table.load(idx), level) {
                Pte::Empty => {
                    step = span(level) - (iova & (span(level) - 1));
                    break;
                }
                Pte::Table { pa } => tp = pa,
                Pte::Leaf { size_lg2, .. } => {
                    let n = replicas(size_lg2, level);
                    let first = idx & !(n - 1);
                    let mut dirty = false;
                    for j in first..first + n {
                        let entry = table.entry(j);
                        let v = entry.load(Ordering::Acquire);
                        if F::is_dirty(v) {
                            dirty = true;
                            if clear {
                                let _ = entry.compare_exchange(v, F::clean(v), Ordering::AcqRel, Ordering::Acquire);
                            }
                        }
                    }
                    let sz = 1u64 << size_lg2;
                    let lb = iova & !(sz - 1);
                    if dirty {
                        out.record_leaf(lb, sz, start, end);
                    }
                    step = lb + sz - iova;
                    break;
                }
            }
        }
        iova = iova.saturating_add(step);
    }
}

/// Counts leaves by size (log2) in the whole table: for tests and the demo.
pub(crate) fn leaf_histogram<F: Format>(t: &Tables) -> std::collections::BTreeMap<u32, u64> {
    fn rec<F: Format>(a: &TableArena, tp: u64, level: usize, h: &mut std::collections::BTreeMap<u32, u64>) {
        // SAFETY: the address is the root or was read from a present entry of this arena's
        // tree, and the caller holds the structural lock, so the page is not retired while
        // the reference is used (`mem.rs`).
        let table = unsafe { a.table(tp) };
        let mut idx = 0;
        while idx < ENTRIES {
            match F::decode(table.load(idx), level) {
                Pte::Empty => idx += 1,
                Pte::Table { pa } => {
                    rec::<F>(a, pa, level - 1, h);
                    idx += 1;
                }
                Pte::Leaf { size_lg2, .. } => {
                    *h.entry(size_lg2).or_default() += 1;
                    idx = (idx & !(replicas(size_lg2, level) - 1)) + replicas(size_lg2, level);
                }
            }
        }
    }
    let mut h = std::collections::BTreeMap::new();
    rec::<F>(&t.arena, t.root, LEVELS - 1, &mut h);
    h
}
