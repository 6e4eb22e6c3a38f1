//! The IOTLB and the drain of in-flight accesses.
//!
//! The IOTLB is a bounded, direct-mapped cache from a 4 KiB IOVA page to its translation: host
//! page, permissions, and whether a write may proceed without a page-table update (the leaf's
//! dirty state is already set, or tracking is off). That last bit is what real IOTLBs cache
//! too, and it is why clearing dirty bits without invalidating loses writes: a write that hits
//! such an entry never goes back to the PTE.
//!
//! Lookups are lock-free: each slot is a tiny seqlock (an even/odd sequence word around two
//! data words). Fills take the slot's sequence with one compare-exchange and give up if it is
//! busy. Two counters make invalidation race-free against fills that walked the table before
//! the PTE change but insert after it:
//! * `gen`, bumped by a global flush; a slot is valid only with the current `gen`;
//! * `inval_seq`, bumped by every invalidation *before* it clears slots; a fill re-checks it
//!   under the slot's sequence and drops its entry if an invalidation started since its walk.
//!
//! Invalidation then **drains**: it waits until every access that was in flight when it
//! started has finished. That models the completion semantics of a hardware invalidation
//! (VT-d invalidation-wait descriptors, and the drain-reads/drain-writes hints of IOTLB
//! invalidate descriptors; AMD COMPLETION_WAIT after INVALIDATE_IOMMU_PAGES; see
//! `docs/iommu.md#iotlb`): once it returns, no write that used
//! a stale translation or a stale "already dirty" bit can still land. A VMM that harvests,
//! invalidates and then copies pages therefore sees every write either in the bits or in the
//! copy. The drain also makes it safe to free unlinked table pages afterwards.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

const VALID: u64 = 1;
const DATA_R: u64 = 1 << 0;
const DATA_W: u64 = 1 << 1;
const DATA_WRITE_READY: u64 = 1 << 2;
const PAGE_MASK: u64 = !0xfff;

/// A cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// Host address of the 4 KiB page.
    pub host_page: u64,
    pub read: bool,
    pub write: bool,
    /// A write may proceed without touching the PTE.
    pub write_ready: bool,
}

struct Slot {
    seq: AtomicU64,
    /// `iova_pfn << 1 | VALID`
    tag: AtomicU64,
    gen: AtomicU64,
    data: AtomicU64,
}

/// Ticket taken before a walk; a fill with a stale ticket is dropped.
#[derive(Clone, Copy, Debug)]
pub struct FillTicket {
    inval_seq: u64,
    gen: u64,
}

/// The bounded IOTLB of one domain.
pub struct Iotlb {
    slots: Box<[Slot]>,
    mask: u64,
    gen: AtomicU64,
    inval_seq: AtomicU64,
    counts: Counts,
}

/// Translation counters, on their own cache line so that counting does not evict `gen`, which
/// every lookup reads.
#[repr(align(64))]
#[derive(Default)]
struct Counts {
    lookups: AtomicU64,
    misses: AtomicU64,
}

impl Iotlb {
    /// An IOTLB with `entries` slots (rounded up to a power of two, at least 1).
    pub fn new(entries: usize) -> Self {
        let n = entries.max(1).next_power_of_two();
        let slots = (0..n)
            .map(|_| Slot {
                seq: AtomicU64::new(0),
                tag: AtomicU64::new(0),
                gen: AtomicU64::new(0),
                data: AtomicU64::new(0),
            })
            .collect();
        Self {
            slots,
            mask: n as u64 - 1,
            gen: AtomicU64::new(1),
            inval_seq: AtomicU64::new(0),
            counts: Counts::default(),
        }
    }

    /// Counts one translation that asked the IOTLB, and whether it had to walk. The caller
    /// counts, because a hit that lacks write-readiness is a miss too.
    #[inline(always)]
    pub fn count(&self, missed: bool) {
        self.counts.lookups.fetch_add(1, Ordering::Relaxed);
        if missed {
            self.counts.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Translations counted so far and how many of them walked.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.counts.lookups.load(Ordering::Relaxed),
            self.counts.misses.load(Ordering::Relaxed),
        )
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline(always)]
    fn slot(&self, pfn: u64) -> &Slot {
        // Multiplicative hash so strided IOVAs do not all collide.
        let h = pfn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
        &self.slots[(h & self.mask) as usize]
    }

    /// Looks up the translation of IOVA page `pfn`.
    #[inline]
    pub fn lookup(&self, pfn: u64) -> Option<IotlbEntry> {
        let s = self.slot(pfn);
        let s1 = s.seq.load(Ordering::Acquire);
        if s1 & 1 != 0 {
            return None;
        }
        let tag = s.tag.load(Ordering::Relaxed);
        let gen = s.gen.load(Ordering::Relaxed);
        let data = s.data.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if s.seq.load(Ordering::Relaxed) != s1 {
            return None;
        }
        if tag != (pfn << 1 | VALID) || gen != self.gen.load(Ordering::Acquire) {
            return None;
        }
        Some(IotlbEntry {
            host_page: data & PAGE_MASK,
            read: data & DATA_R != 0,
            write: data & DATA_W != 0,
            write_ready: data & DATA_WRITE_READY != 0,
        })
    }

    /// Takes a ticket before walking for a fill.
    #[inline]
    pub fn ticket(&self) -> FillTicket {
        FillTicket {
            inval_seq: self.inval_seq.load(Ordering::SeqCst),
            gen: self.gen.load(Ordering::SeqCst),
        }
    }

    /// Caches a translation found by a walk that started with `ticket`.
    #[inline]
    pub fn fill(&self, pfn: u64, e: IotlbEntry, ticket: FillTicket) {
        let s = self.slot(pfn);
        let cur = s.seq.load(Ordering::Relaxed);
        if cur & 1 != 0
            || s.seq
                .compare_exchange(cur, cur + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        fence(Ordering::SeqCst);
        if self.inval_seq.load(Ordering::SeqCst) == ticket.inval_seq {
            let mut data = e.host_page & PAGE_MASK;
            if e.read {
                data |= DATA_R;
            }
            if e.write {
                data |= DATA_W;
            }
            if e.write_ready {
                data |= DATA_WRITE_READY;
            }
            s.tag.store(pfn << 1 | VALID, Ordering::Relaxed);
            s.gen.store(ticket.gen, Ordering::Relaxed);
            s.data.store(data, Ordering::Relaxed);
        }
        s.seq.store(cur + 2, Ordering::Release);
    }

    /// Invalidates the entries of `[iova, iova + len)`. Does not drain; see [`InFlight`].
    pub fn invalidate_range(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.inval_seq.fetch_add(1, Ordering::SeqCst);
        let first = iova >> 12;
        let last = (iova.saturating_add(len - 1)) >> 12;
        if last - first >= self.slots.len() as u64 {
            // Cheaper to visit every slot than every page.
            for s in self.slots.iter() {
                Self::clear_slot_if(s, |tag| {
                    let pfn = tag >> 1;
                    tag & VALID != 0 && pfn >= first && pfn <= last
                });
            }
        } else {
            for pfn in first..=last {
                Self::clear_slot_if(self.slot(pfn), |tag| tag == (pfn << 1 | VALID));
            }
        }
    }

    /// Invalidates everything. Does not drain; see [`InFlight`].
    pub fn invalidate_all(&self) {
        self.inval_seq.fetch_add(1, Ordering::SeqCst);
        self.gen.fetch_add(1, Ordering::SeqCst);
    }

    fn clear_slot_if(s: &Slot, pred: impl Fn(u64) -> bool) {
        loop {
            let cur = s.seq.load(Ordering::Relaxed);
            if cur & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            if s.seq
                .compare_exchange(cur, cur + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            if pred(s.tag.load(Ordering::Relaxed)) {
                s.tag.store(0, Ordering::Relaxed);
            }
            s.seq.store(cur + 2, Ordering::Release);
            return;
        }
    }
}

/// One access stream's in-flight marker: odd while an access is running.
#[derive(Default)]
pub(crate) struct AccessSeq(AtomicU64);

impl AccessSeq {
    /// Marks the start of an access. The SeqCst fence orders the marker before every read of
    /// the IOTLB and page table (Dekker with [`InFlight::drain`]).
    #[inline(always)]
    pub fn begin(&self) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v + 1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }
    /// Marks the end of an access; all its memory writes happen before.
    #[inline(always)]
    pub fn end(&self) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v + 1, Ordering::Release);
    }
}

/// Registry of the access streams of one domain.
#[derive(Default)]
pub(crate) struct InFlight {
    streams: Mutex<Vec<Weak<AccessSeq>>>,
}

impl InFlight {
    pub fn register(&self) -> Arc<AccessSeq> {
        let s = Arc::new(AccessSeq::default());
        let mut v = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(&s));
        s
    }

    /// Waits until every access that was running when this was called has ended.
    pub fn drain(&self) {
        fence(Ordering::SeqCst);
        let streams: Vec<Arc<AccessSeq>> = {
            let v = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            v.iter().filter_map(Weak::upgrade).collect()
        };
        for s in streams {
            let v = s.0.load(Ordering::Acquire);
            if v & 1 != 0 {
                let mut spins = 0u32;
                while s.0.load(Ordering::Acquire) == v {
                    spins += 1;
                    if spins < 1000 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(page: u64) -> IotlbEntry {
        IotlbEntry {
            host_page: page,
            read: true,
            write: true,
            write_ready: true,
        }
    }

    #[test]
    fn fill_lookup_invalidate() {
        let t = Iotlb::new(64);
        assert_eq!(t.lookup(5), None);
        t.fill(5, e(0x7000), t.ticket());
        assert_eq!(t.lookup(5), Some(e(0x7000)));
        t.invalidate_range(5 << 12, 4096);
        assert_eq!(t.lookup(5), None);
        t.fill(5, e(0x7000), t.ticket());
        t.invalidate_range(6 << 12, 4096);
        assert_eq!(t.lookup(5), Some(e(0x7000)), "other pages untouched");
        t.invalidate_all();
        assert_eq!(t.lookup(5), None);
    }

    #[test]
    fn stale_fill_is_dropped() {
        let t = Iotlb::new(64);
        let ticket = t.ticket();
        t.invalidate_range(0, 1 << 30);
        t.fill(9, e(0x9000), ticket);
        assert_eq!(t.lookup(9), None);
        let ticket = t.ticket();
        t.invalidate_all();
        t.fill(9, e(0x9000), ticket);
        assert_eq!(t.lookup(9), None);
    }

    #[test]
    fn large_range_scans_slots() {
        let t = Iotlb::new(4);
        for pfn in 0..4 {
            t.fill(pfn * 1000, e(0x1000 * (pfn + 1)), t.ticket());
        }
        t.invalidate_range(0, 3000 << 12);
        for pfn in 0..3 {
            assert_eq!(t.lookup(pfn * 1000), None);
        }
    }
}
