//! The one page-table walker, written once over [`Format`].
//!
//! Everything rests on one cursor, [`Level`]: the entries of one table that a range covers,
//! yielded as [`Slot`]s (index, IOVA base, span, value), replicated ("contiguous") leaves
//! skipped as one, and a `descend` into the table an entry points to. It is Linux
//! `generic_pt`'s `pt_state` with `for_each_pt_level_entry`, `pt_next_entry` and `pt_descend`.
//! Each operation below is its algorithm written on that cursor, recursing once per level, so
//! every table is visited once per call.
//!
//! Structural operations (map, unmap, harvest, split, collapse) run under the domain's
//! structural lock: they borrow [`Tables`], which only the lock hands out. DMA translations
//! walk lock-free from the root (see `domain.rs`); every entry they may race with is updated
//! with a single atomic store or compare-exchange, so a concurrent walk always sees either the
//! old or the new translation, both valid for the IOVA.
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
use crate::mem::{TableArena, TablePage, TablePool, ENTRIES};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

mod harvest;
pub use harvest::HarvestParallelism;
pub(crate) use harvest::{read_and_clear_dirty, read_and_clear_dirty_naive};

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
        let arena = TableArena::new();
        let root = arena.alloc(TablePool::Upper);
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

/// Number of entries a leaf of `size_lg2` occupies in a table at `level` (Linux's
/// `pt_entry_num_contig_lg2`, as a count).
#[inline(always)]
fn num_contig(size_lg2: u32, level: usize) -> usize {
    1usize << (size_lg2 - level_shift(level))
}

/// One item of a [`Level`]: an entry, or all the replicas of a contiguous leaf.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Index of the (first) entry.
    idx: usize,
    /// Entries it occupies: the replicas of a contiguous leaf, else 1.
    n: usize,
    /// IOVA of what it translates (a leaf's own base, which may lie before the range).
    iova: u64,
    /// Bytes it translates.
    len: u64,
    /// The (first) entry's value, as read.
    pte: u64,
    kind: Pte,
}

impl Slot {
    fn end(&self) -> u64 {
        self.iova + self.len
    }
}

/// The entries of one table that a range covers.
///
/// It borrows the [`Tables`] it walks, which only the structural lock hands out; table pages
/// stay valid for that borrow because freeing them ([`TableArena::reclaim`]) needs `&mut`.
/// A `Level` can only be made from the root or by descending through an entry it read, so
/// every table address it dereferences is one the arena handed out.
struct Level<'t, F> {
    arena: &'t TableArena,
    table: &'t TablePage,
    /// The table's own address.
    pa: u64,
    level: usize,
    /// IOVA translated by entry 0.
    base: u64,
    /// The range, clipped to what the table spans.
    lo: u64,
    hi: u64,
    /// The first index the range covers, the next index to yield, and one past the last.
    first: usize,
    idx: usize,
    end: usize,
    _format: PhantomData<fn() -> F>,
}

impl<F> Clone for Level<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F> Copy for Level<'_, F> {}

impl<'t, F: Format> Level<'t, F> {
    /// The root table's entries covering `[lo, hi)`.
    fn root(t: &'t Tables, lo: u64, hi: u64) -> Self {
        // SAFETY: the root is the arena's own page, freed only with the arena.
        let table = unsafe { t.arena.table(t.root) };
        Self::over(&t.arena, table, t.root, LEVELS - 1, 0, lo, hi)
    }

    fn over(arena: &'t TableArena, table: &'t TablePage, pa: u64, level: usize, base: u64, lo: u64, hi: u64) -> Self {
        let lo = lo.max(base);
        let hi = hi.min(base + table_span(level));
        let (idx, end) = if lo < hi {
            (index(lo, level), index(hi - 1, level) + 1)
        } else {
            (0, 0)
        };
        Self {
            arena,
            table,
            pa,
            level,
            base,
            lo,
            hi,
            first: idx,
            idx,
            end,
            _format: PhantomData,
        }
    }

    /// The same table over a narrower range, from its first entry.
    fn narrow(&self, lo: u64, hi: u64) -> Self {
        Self::over(self.arena, self.table, self.pa, self.level, self.base, lo, hi)
    }

    /// The table below a table entry this cursor yielded, over the part of the range it spans
    /// (Linux's `pt_descend`).
    fn descend(&self, s: &Slot) -> Self {
        let Pte::Table { pa } = s.kind else {
            unreachable!("descend through a {:?} entry", s.kind)
        };
        // SAFETY: `pa` was read from a present table entry of this tree while the caller
        // borrows `Tables` (see the type's documentation), so the page is the arena's and is
        // not reclaimed while `'t` lasts.
        let table = unsafe { self.arena.table(pa) };
        Self::over(self.arena, table, pa, self.level - 1, s.iova, self.lo, self.hi)
    }

    /// The slot whose entries include `idx`, read now.
    #[inline(always)]
    fn slot(&self, idx: usize) -> Slot {
        let pte = self.table.load(idx);
        let kind = F::decode(pte, self.level);
        let (first, n, len) = match kind {
            Pte::Leaf { size_lg2, .. } => {
                let n = num_contig(size_lg2, self.level);
                (idx & !(n - 1), n, 1u64 << size_lg2)
            }
            _ => (idx, 1, span(self.level)),
        };
        Slot {
            idx: first,
            n,
            iova: self.base + ((first as u64) << level_shift(self.level)),
            len,
            pte,
            kind,
        }
    }

    #[inline(always)]
    fn entry(&self, idx: usize) -> &'t AtomicU64 {
        self.table.entry(idx)
    }

    /// The entries of a slot (its replicas).
    fn entries(&self, s: &Slot) -> impl Iterator<Item = &'t AtomicU64> + 't {
        let table = self.table;
        (s.idx..s.idx + s.n).map(move |i| table.entry(i))
    }

    /// Whether the range covers all of what the slot translates.
    fn covers(&self, s: &Slot) -> bool {
        self.lo <= s.iova && s.end() <= self.hi
    }

    /// Makes the next item the slot again, after the caller rewrote it. A contiguous leaf may
    /// begin before the range; its pieces there are not the walk's to see.
    fn revisit(&mut self, s: &Slot) {
        self.idx = s.idx.max(self.first);
    }

    fn skip_to(&mut self, idx: usize) {
        self.idx = idx;
    }

    /// A fresh, zeroed table page for a child of this level.
    fn new_table(&self) -> (u64, &'t TablePage) {
        let pool = if self.level == 1 {
            TablePool::Leaf
        } else {
            TablePool::Upper
        };
        let pa = self.arena.alloc(pool);
        // SAFETY: the arena just handed this page out, and the borrow of `Tables` keeps it.
        (pa, unsafe { self.arena.table(pa) })
    }

    /// Whether every entry of the whole table is empty.
    fn table_is_empty(&self) -> bool {
        (0..ENTRIES).all(|i| self.table.load(i) == 0)
    }
}

impl<F: Format> Iterator for Level<'_, F> {
    type Item = Slot;

    /// The next entry in range (Linux's `pt_next_entry`: a contiguous leaf comes once).
    #[inline(always)]
    fn next(&mut self) -> Option<Slot> {
        if self.idx >= self.end {
            return None;
        }
        let s = self.slot(self.idx);
        self.idx = s.idx + s.n;
        Some(s)
    }
}

/// Builds a leaf with the given dirty state and accessed bits.
fn leaf_with<F: Format>(dirty: bool, accessed: u64, pa: u64, level: usize, lg2: u32, perm: Perm, o: LeafOpts) -> u64 {
    let fresh = F::leaf(pa, level, lg2, perm, o.tracking_domain);
    let fresh = if dirty { F::dirty(fresh) } else { F::clean(fresh) };
    fresh | accessed
}

/// Whether any leaf is present in `[start, end)`.
pub(crate) fn any_present<F: Format>(t: &Tables, start: u64, end: u64) -> bool {
    fn any<F: Format>(it: Level<'_, F>) -> bool {
        it.into_iter().any(|s| match s.kind {
            Pte::Empty => false,
            Pte::Leaf { .. } => true,
            Pte::Table { .. } => any(it.descend(&s)),
        })
    }
    any(Level::<F>::root(t, start, end))
}

/// Maps `[iova, iova + len)` to `[pa, pa + len)`. The caller checked alignment and that the
/// range is free ([`any_present`]).
pub(crate) fn map<F: Format>(t: &mut Tables, iova: u64, pa: u64, len: u64, perm: Perm, o: LeafOpts) {
    /// `delta` turns an IOVA into its output address.
    fn map_in<F: Format>(mut it: Level<'_, F>, delta: u64, perm: Perm, o: LeafOpts) {
        while let Some(s) = it.next() {
            let iova = s.iova.max(it.lo);
            let pa = iova.wrapping_add(delta);
            if let Some(lg2) = fit(&it, s.idx, iova, pa, o) {
                let pte = F::leaf(pa, it.level, lg2, perm, o.tracking_domain);
                let n = num_contig(lg2, it.level);
                for j in s.idx..s.idx + n {
                    it.entry(j).store(pte, Ordering::Release);
                }
                it.skip_to(s.idx + n);
                continue;
            }
            let s = match s.kind {
                Pte::Table { .. } => s,
                Pte::Empty => {
                    let (child, _) = it.new_table();
                    it.entry(s.idx).store(F::table(child, it.level), Ordering::Release);
                    it.slot(s.idx)
                }
                Pte::Leaf { .. } => unreachable!("map over a present leaf at {iova:#x}"),
            };
            map_in(it.descend(&s), delta, perm, o);
        }
    }
    map_in(Level::<F>::root(t, iova, iova + len), pa.wrapping_sub(iova), perm, o);
}

/// The largest leaf size (Linux: `possible_sizes`) that fits at entry `idx` for `iova`, with
/// every replica slot empty.
#[inline]
fn fit<F: Format>(it: &Level<'_, F>, idx: usize, iova: u64, pa: u64, o: LeafOpts) -> Option<u32> {
    F::leaf_sizes(it.level).iter().copied().find(|&lg2| {
        let sz = 1u64 << lg2;
        (lg2 == PAGE_SHIFT || o.huge)
            && iova & (sz - 1) == 0
            && pa & (sz - 1) == 0
            && it.hi - iova >= sz
            && (idx..idx + num_contig(lg2, it.level)).all(|j| it.table.load(j) == 0)
    })
}

/// Unmaps what is mapped in `[start, end)`; returns the bytes unmapped. Partially covered huge
/// leaves are split first. Emptied tables are retired; the caller invalidates, drains and
/// reclaims.
/// Removes every translation in `[start, end)`, splitting leaves the range cuts. With `dirty`,
/// each removed leaf is taken out with an atomic swap and, if it was dirty, reported whole to
/// `dirty` (it lies inside the range): a walk that set D before the swap is in the swapped
/// value, and one that comes after finds nothing and faults, so no write is lost between the
/// last harvest and the unmap (`docs/viommu.md#unmap-with-dirty`).
pub(crate) fn unmap<F: Format>(
    t: &mut Tables,
    start: u64,
    end: u64,
    o: LeafOpts,
    mut dirty: Option<&mut dyn FnMut(u64, u64)>,
) -> u64 {
    fn unmap_in<F: Format>(mut it: Level<'_, F>, o: LeafOpts, dirty: &mut Option<&mut dyn FnMut(u64, u64)>) -> u64 {
        let mut done = 0;
        while let Some(s) = it.next() {
            match s.kind {
                Pte::Empty => {}
                Pte::Table { pa } => {
                    let child = it.descend(&s);
                    done += unmap_in(child, o, dirty);
                    if child.table_is_empty() {
                        it.entry(s.idx).store(0, Ordering::Release);
                        it.arena.retire(pa);
                    }
                }
                Pte::Leaf { .. } if it.covers(&s) => {
                    match dirty {
                        Some(record) => {
                            let was = it
                                .entries(&s)
                                .fold(false, |d, e| d | F::is_dirty(e.swap(0, Ordering::AcqRel)));
                            if was {
                                record(s.iova, s.len);
                            }
                        }
                        None => it.entries(&s).for_each(|e| e.store(0, Ordering::Release)),
                    }
                    done += s.len;
                }
                Pte::Leaf { .. } => {
                    split_leaf(&it, &s, o);
                    it.revisit(&s);
                }
            }
        }
        done
    }
    unmap_in(Level::<F>::root(t, start, end), o, &mut dirty)
}

/// Splits a leaf one step, keeping every translation valid: a replicated leaf becomes default
/// leaves of its level, a default leaf becomes a table of 512 default leaves one level down.
/// Each entry changes with one compare-exchange (an atomic replace, not break-before-make),
/// retried if hardware set A or D meanwhile; the new pieces inherit the leaf's dirty and
/// accessed state, so no dirt is lost. The caller invalidates the IOTLB afterwards.
fn split_leaf<F: Format>(it: &Level<'_, F>, s: &Slot, o: LeafOpts) {
    let Pte::Leaf { pa, perm, .. } = s.kind else {
        return;
    };
    let level = it.level;
    let shift = level_shift(level);
    if s.n > 1 {
        // Any replica may carry the leaf's dirt: OR them into every piece.
        let (dirty, accessed) = it.entries(s).fold((false, 0), |(d, a), e| {
            let v = e.load(Ordering::Relaxed);
            (d | F::is_dirty(v), a | F::leaf_accessed_bits(v))
        });
        for (j, e) in it.entries(s).enumerate() {
            let piece = |old| {
                let d = dirty || F::is_dirty(old);
                let a = accessed | F::leaf_accessed_bits(old);
                leaf_with::<F>(d, a, pa + ((j as u64) << shift), level, shift, perm, o)
            };
            replace(e, piece);
        }
        return;
    }
    debug_assert!(level > 0, "4 KiB leaves cannot be split");
    let (child, ct) = it.new_table();
    let cshift = level_shift(level - 1);
    replace(it.entry(s.idx), |old| {
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
        let pde = F::table(child, level);
        // Keep "A clear means nothing dirty below" true for the harvest's skip.
        if F::is_dirty(old) {
            F::table_set_accessed(pde)
        } else {
            pde
        }
    });
}

/// Replaces an entry with `new(old)` by compare-exchange, recomputing when hardware changed
/// the entry (set A or D) in between.
fn replace(e: &AtomicU64, mut new: impl FnMut(u64) -> u64) {
    let mut old = e.load(Ordering::Acquire);
    while let Err(cur) = e.compare_exchange(old, new(old), Ordering::AcqRel, Ordering::Acquire) {
        old = cur;
    }
}

/// Splits every leaf larger than 4 KiB in `[start, end)` down to 4 KiB. Returns the number of
/// leaves split.
pub(crate) fn split_all<F: Format>(t: &mut Tables, start: u64, end: u64, o: LeafOpts) -> u64 {
    fn split_in<F: Format>(mut it: Level<'_, F>, o: LeafOpts) -> u64 {
        let mut n_split = 0;
        while let Some(s) = it.next() {
            match s.kind {
                Pte::Table { .. } => n_split += split_in(it.descend(&s), o),
                Pte::Leaf { size_lg2, .. } if size_lg2 > PAGE_SHIFT => {
                    split_leaf(&it, &s, o);
                    n_split += 1;
                    it.revisit(&s); // look again at what the split produced
                }
                _ => {}
            }
        }
        n_split
    }
    split_in(Level::<F>::root(t, start, end), o)
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
    fn collapse_in<F: Format>(mut it: Level<'_, F>, target: usize, o: LeafOpts, out: &mut Vec<Collapsed>) {
        while let Some(s) = it.next() {
            if !matches!(s.kind, Pte::Table { .. }) {
                continue;
            }
            let child = it.descend(&s);
            if it.level > target {
                collapse_in(child, target, o, out);
                continue;
            }
            let Some(leaf) = collapsed_leaf(&child, o) else {
                continue;
            };
            if it
                .entry(s.idx)
                .compare_exchange(s.pte, leaf, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                out.push(Collapsed {
                    entry_table: it.pa,
                    idx: s.idx,
                    old_table: child.pa,
                });
            }
        }
    }
    let mut out = Vec::new();
    if level == 0 || level >= LEVELS || !F::leaf_sizes(level).contains(&level_shift(level)) {
        return out;
    }
    collapse_in(
        Level::<F>::root(t, 0, 1 << crate::format::IOVA_BITS),
        level,
        o,
        &mut out,
    );
    out
}

/// The leaf one level up that translates what a whole table of default leaves does, if they
/// are contiguous, aligned and of one permission.
fn collapsed_leaf<F: Format>(child: &Level<'_, F>, o: LeafOpts) -> Option<u64> {
    let cl = child.level;
    let cshift = level_shift(cl);
    let Pte::Leaf { pa: pa0, perm, .. } = child.slot(0).kind else {
        return None;
    };
    if pa0 & (span(cl + 1) - 1) != 0 {
        return None;
    }
    let mut dirty = false;
    let mut accessed = 0;
    let mut count = 0;
    for (k, s) in child.enumerate() {
        let piece = Pte::Leaf {
            pa: pa0 + ((k as u64) << cshift),
            size_lg2: cshift,
            perm,
        };
        if s.kind != piece {
            return None;
        }
        dirty |= F::is_dirty(s.pte);
        accessed |= F::leaf_accessed_bits(s.pte);
        count += 1;
    }
    if count != ENTRIES {
        return None;
    }
    let leaf = F::leaf(pa0, cl + 1, level_shift(cl + 1), perm, o.tracking_domain) | accessed;
    Some(if dirty { F::dirty(leaf) } else { F::clean(leaf) })
}

/// After the drain that follows [`collapse_level`]: carries dirt that DMA set in the old pieces
/// during the swap into the new leaf, then retires the old tables.
pub(crate) fn collapse_finish<F: Format>(t: &mut Tables, done: Vec<Collapsed>, level: usize) {
    for c in done {
        // SAFETY: `collapse_level` read both addresses from this tree under the structural
        // lock, which the caller still holds, and the old table is retired only below.
        let (old, parent) = unsafe { (t.arena.table(c.old_table), t.arena.table(c.entry_table)) };
        if (0..ENTRIES).any(|k| F::is_dirty(old.load(k))) {
            let e = parent.entry(c.idx);
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

/// Descends from the root towards `iova`, handing each entry a walk for it reads to `visit`
/// (level, value), and returns where the path ends: the level and the last slot.
fn walk_path<F: Format>(t: &Tables, iova: u64, mut visit: impl FnMut(usize, u64)) -> Option<(usize, Slot)> {
    if iova >> crate::format::IOVA_BITS != 0 {
        return None;
    }
    let mut it = Level::<F>::root(t, iova, iova + 1);
    loop {
        let s = it.next()?;
        // The entry at the IOVA's own index: of a contiguous leaf's replicas, the one a
        // hardware walk reads and updates.
        visit(it.level, it.table.load(index(iova, it.level)));
        match s.kind {
            Pte::Table { .. } => it = it.descend(&s),
            _ => return Some((it.level, s)),
        }
    }
}

/// Every entry a walk for `iova` reads, root first: (level, entry value).
pub(crate) fn path_entries<F: Format>(t: &Tables, iova: u64) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    walk_path::<F>(t, iova, |level, pte| out.push((level, pte)));
    out
}

/// The leaf translating `iova`: (level, entry value), without hardware updates.
pub(crate) fn leaf_entry<F: Format>(t: &Tables, iova: u64) -> Option<(usize, u64)> {
    let mut last = None;
    let (_, s) = walk_path::<F>(t, iova, |level, pte| last = Some((level, pte)))?;
    matches!(s.kind, Pte::Leaf { .. }).then_some(last?)
}

/// Translates `iova` to its output address.
pub(crate) fn iova_to_phys<F: Format>(t: &Tables, iova: u64) -> Option<(u64, Perm)> {
    match walk_path::<F>(t, iova, |_, _| {})?.1.kind {
        Pte::Leaf { pa, size_lg2, perm } => Some((pa + (iova & ((1u64 << size_lg2) - 1)), perm)),
        _ => None,
    }
}

/// Counts leaves by size (log2) in the whole table: for tests and the demo.
pub(crate) fn leaf_histogram<F: Format>(t: &Tables) -> std::collections::BTreeMap<u32, u64> {
    fn count<F: Format>(mut it: Level<'_, F>, h: &mut std::collections::BTreeMap<u32, u64>) {
        while let Some(s) = it.next() {
            match s.kind {
                Pte::Empty => {}
                Pte::Table { .. } => count(it.descend(&s), h),
                Pte::Leaf { size_lg2, .. } => *h.entry(size_lg2).or_default() += 1,
            }
        }
    }
    let mut h = std::collections::BTreeMap::new();
    count(Level::<F>::root(t, 0, 1 << crate::format::IOVA_BITS), &mut h);
    h
}
