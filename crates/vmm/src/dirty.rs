//! CPU dirty tracking, both kinds behind one operation: harvest the pages vCPUs dirtied since
//! the last harvest into a [`PageBitmap`], and re-arm tracking for them.
//!
//! * Ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`): each vCPU publishes dirty pages in its own ring.
//!   A harvest collects every ring, merges entries vCPU threads collected when their ring
//!   filled (exit reason 31), then `KVM_RESET_DIRTY_RINGS` re-protects the pages. Rings must
//!   be enabled before any vCPU exists.
//! * Bitmap (`KVM_MEM_LOG_DIRTY_PAGES`, `KVM_GET_DIRTY_LOG`, and manual protection with
//!   `KVM_CLEAR_DIRTY_LOG`): per slot, read the bitmap, then clear exactly the bits it returned
//!   so only the pages that were written are re-protected.
//!
//! Rings are reaped every [`REAP_INTERVAL`] by a thread of the VM, so they never come near
//! full. That matters: on some hosts (seen on a nested-virtualisation machine where KVM
//! emulates guest stores) KVM pushes far past a ring's soft limit before the vCPU reaches its
//! full-ring exit, wraps, and overwrites entries userspace has not collected. A collection that
//! finds every slot of a ring dirty, or phantom entries found when realigning (which a full-ring
//! exit with nothing to collect triggers), is such an overrun. Its log is lost, so the next harvest reports every page of guest RAM as dirty
//! ([`HarvestStats::lost`]), as a lost log demands, and the rings are realigned with KVM
//! ([`crate::kvm_sys::DirtyRing::resync`]) so the vCPU can run on and tracking goes on; see
//! `docs/dirty-tracking.md`.
//!
//! On x86 the two are exclusive per VM: with rings on, `KVM_GET_DIRTY_LOG` fails with ENXIO.
//! Either way the re-protection happens inside the harvest, before the caller copies pages,
//! so a write racing with the copy is caught by the next harvest.

use crate::kvm_sys::{clear_dirty_log, reset_dirty_rings, DirtyRing};
use kvm_ioctls::VmFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

/// How often the reaper collects and resets the rings.
pub const REAP_INTERVAL: Duration = Duration::from_millis(5);

/// A harvest that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyError {
    /// A dirty-log ioctl failed.
    #[error("{op} failed with errno {errno}")]
    Ioctl { op: &'static str, errno: i32 },
}

/// Which mechanism tracks CPU writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Per-vCPU dirty rings of `entries` entries (a power of two from 256, one page, to 65,536).
    Ring { entries: u32 },
    /// Per-slot dirty bitmaps with manual protection.
    Bitmap,
}

impl Default for DirtyLogMode {
    fn default() -> Self {
        DirtyLogMode::Ring { entries: 65536 }
    }
}

/// One bit per 4 KiB page of guest-physical memory from 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl PageBitmap {
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }
    pub fn pages(&self) -> u64 {
        self.pages
    }
    #[inline]
    pub fn set(&mut self, pfn: u64) {
        if pfn < self.pages {
            self.words[(pfn / 64) as usize] |= 1 << (pfn % 64);
        }
    }
    pub fn unset(&mut self, pfn: u64) {
        if pfn < self.pages {
            self.words[(pfn / 64) as usize] &= !(1 << (pfn % 64));
        }
    }
    pub fn get(&self, pfn: u64) -> bool {
        pfn < self.pages && self.words[(pfn / 64) as usize] >> (pfn % 64) & 1 != 0
    }
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
    pub fn clear(&mut self) {
        self.words.fill(0);
    }
    /// Sets pages `[first, first + count)` (clipped to the bitmap).
    pub fn set_range(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.pages);
        let mut p = first;
        while p < end && !p.is_multiple_of(64) {
            self.set(p);
            p += 1;
        }
        while p + 64 <= end {
            self.words[(p / 64) as usize] = u64::MAX;
            p += 64;
        }
        while p < end {
            self.set(p);
            p += 1;
        }
    }
    pub fn union(&mut self, o: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&o.words) {
            *a |= *b;
        }
    }
    /// Sets pages from an LSB-first byte bitmap whose bit 0 is page `first`.
    pub fn set_from_bytes(&mut self, first: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let mut b = b;
            while b != 0 {
                let bit = b.trailing_zeros() as u64;
                b &= b - 1;
                self.set(first + i as u64 * 8 + bit);
            }
        }
    }
    pub fn words(&self) -> &[u64] {
        &self.words
    }
    /// Set page numbers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }
}

/// A KVM memory slot.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
}

pub(crate) struct CpuDirty {
    pub mode: DirtyLogMode,
    pub slots: Vec<Slot>,
    rings: Vec<Mutex<DirtyRing>>,
    ring_entries: u32,
    /// Pages the reaper and full-ring exits collected, not yet harvested.
    pending: Mutex<PageBitmap>,
    /// Entries were lost since the last harvest: it must report everything.
    overrun: AtomicBool,
    /// An overrun happened: rings may hold phantoms, so every collection realigns first.
    suspect: AtomicBool,
    /// Harvests that reported every page because the log was lost.
    lost_harvests: AtomicU64,
    /// Time spent collecting rings outside `harvest` (reaper and full-ring exits), so a
    /// harvest's cost can be charged with the work done on its behalf.
    background_ns: AtomicU64,
    /// Pages the VMM wrote into guest RAM on the guest's behalf (an emulated device's status
    /// write): KVM logs only the vCPUs' stores, so these are reported from here.
    host_writes: Mutex<PageBitmap>,
}

/// What a harvest cost and found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Ring entries collected, or bitmap words read.
    pub entries: u64,
    /// Pages newly set in the output.
    pub pages: u64,
    /// A ring overrun lost dirty entries: every page of guest RAM was reported instead.
    pub lost: bool,
}

fn gpa_of(slots: &[Slot], slot: u32, offset: u64) -> Option<u64> {
    slots.iter().find(|s| s.slot == slot).map(|s| s.gpa / 4096 + offset)
}

impl CpuDirty {
    pub fn new(mode: DirtyLogMode, slots: Vec<Slot>, mem_pages: u64) -> Self {
        let ring_entries = match mode {
            DirtyLogMode::Ring { entries } => entries,
            DirtyLogMode::Bitmap => 0,
        };
        Self {
            mode,
            slots,
            rings: Vec::new(),
            ring_entries,
            pending: Mutex::new(PageBitmap::new(mem_pages)),
            overrun: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            lost_harvests: AtomicU64::new(0),
            background_ns: AtomicU64::new(0),
            host_writes: Mutex::new(PageBitmap::new(mem_pages)),
        }
    }

    /// Records that the VMM wrote `[gpa, gpa + len)` of guest RAM. Call after the write: a
    /// harvest between the two then leaves the page to the next one, which sends it again.
    pub fn mark_host_write(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let Some(last) = gpa.checked_add(len - 1) else { return };
        let mut w = self.host_writes.lock().unwrap_or_else(|e| e.into_inner());
        let first = gpa / 4096;
        w.set_range(first, last / 4096 - first + 1);
    }

    /// Harvests so far that reported every page because a ring overrun lost its log.
    pub fn lost_harvests(&self) -> u64 {
        self.lost_harvests.load(Ordering::Relaxed)
    }

    fn lost(&self) {
        self.suspect.store(true, Ordering::Release);
        self.overrun.store(true, Ordering::Release);
    }

    /// Collects every ring into `pending` and resets them. Returns the entries collected and
    /// the phantom entries realigned.
    fn collect_rings(&self, vm: &VmFd, pending: &mut PageBitmap, realign: bool) -> (u64, u64) {
        let suspect = realign || self.suspect.load(Ordering::Acquire);
        let (mut total, mut phantoms) = (0u64, 0u64);
        for r in &self.rings {
            let mut ring = r.lock().unwrap_or_else(|e| e.into_inner());
            if suspect {
                phantoms += ring.resync() as u64;
            }
            let n = ring.collect(|slot, off| {
                if let Some(p) = gpa_of(&self.slots, slot, off) {
                    pending.set(p);
                }
            });
            if n >= self.ring_entries {
                // KVM never lets a ring fill completely unless it overran it.
                self.lost();
            }
            total += n as u64;
        }
        if phantoms > 0 {
            // Phantoms exist only after KVM lapped a ring: its log was lost.
            self.lost();
        }
        if total > 0 || phantoms > 0 {
            let _ = reset_dirty_rings(vm);
        }
        (total, phantoms)
    }

    /// The reaper's periodic pass.
    pub fn reap(&self, vm: &VmFd) {
        let t = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.collect_rings(vm, &mut pending, false);
        self.background_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Total time spent collecting rings outside `harvest`.
    pub fn background_time(&self) -> Duration {
        Duration::from_nanos(self.background_ns.load(Ordering::Relaxed))
    }

    pub fn add_ring(&mut self, ring: DirtyRing) {
        self.rings.push(Mutex::new(ring));
    }

    /// A vCPU thread's full-ring exit: collect and reset so it can run on. Finding nothing
    /// to collect means either that the reaper collected the ring a moment ago (the vCPU then
    /// simply runs on), or that KVM counts phantom entries after it lapped the ring; a
    /// realigning pass tells the two apart and marks the log lost only in the second case.
    pub fn ring_full(&self, vm: &VmFd, _vcpu: usize) {
        let t = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if self.collect_rings(vm, &mut pending, false) == (0, 0) && self.collect_rings(vm, &mut pending, true) == (0, 0)
        {
            // Nothing proves where KVM is yet: let it publish before the vCPU retries,
            // rather than spin on exits.
            std::thread::sleep(Duration::from_micros(200));
        }
        self.background_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Harvests CPU-dirtied pages into `out` and re-arms tracking for them.
    pub fn harvest(&self, vm: &VmFd, out: &mut PageBitmap) -> Result<HarvestStats, DirtyError> {
        let before = out.count();
        let mut entries = 0u64;
        let mut lost = false;
        match self.mode {
            DirtyLogMode::Ring { .. } => {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                entries += self.collect_rings(vm, &mut pending, false).0;
                out.union(&pending);
                pending.clear();
                // Swapped after collecting: a loss detected before this point is covered
                // by this harvest, a later one by the next.
                if self.overrun.swap(false, Ordering::AcqRel) {
                    lost = true;
                    self.lost_harvests.fetch_add(1, Ordering::Relaxed);
                    for s in &self.slots {
                        out.set_range(s.gpa / 4096, s.size / 4096);
                    }
                }
            }
            DirtyLogMode::Bitmap => {
                for s in &self.slots {
                    let mut bm = vm
                        .get_dirty_log(s.slot, s.size as usize)
                        .map_err(|e| DirtyError::Ioctl {
                            op: "KVM_GET_DIRTY_LOG",
                            errno: e.errno(),
                        })?;
                    entries += bm.len() as u64;
                    let first = s.gpa / 4096;
                    let mut any = false;
                    for (i, &w) in bm.iter().enumerate() {
                        let mut w = w;
                        any |= w != 0;
                        while w != 0 {
                            let b = w.trailing_zeros() as u64;
                            w &= w - 1;
                            out.set(first + i as u64 * 64 + b);
                        }
                    }
                    if any {
                        let pages = (s.size / 4096) as u32;
                        clear_dirty_log(vm, s.slot, 0, pages, &mut bm).map_err(|e| DirtyError::Ioctl {
                            op: "KVM_CLEAR_DIRTY_LOG",
                            errno: e.errno(),
                        })?;
                    }
                }
            }
        }
        {
            let mut w = self.host_writes.lock().unwrap_or_else(|e| e.into_inner());
            out.union(&w);
            w.clear();
        }
        Ok(HarvestStats {
            entries,
            pages: out.count() - before,
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bitmap() {
        let mut b = PageBitmap::new(130);
        b.set(0);
        b.set(64);
        b.set(129);
        b.set(500); // out of range: ignored
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert_eq!(b.count(), 3);
        let mut c = PageBitmap::new(130);
        c.set_from_bytes(8, &[0b101, 0x80]);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![8, 10, 23]);
        b.union(&c);
        assert_eq!(b.count(), 6);
        let mut r = PageBitmap::new(300);
        r.set_range(3, 200);
        assert_eq!(r.iter().collect::<Vec<_>>(), (3..203).collect::<Vec<_>>());
        r.set_range(250, 1000);
        assert_eq!(r.count(), 250, "clipped at the end");
    }
}
