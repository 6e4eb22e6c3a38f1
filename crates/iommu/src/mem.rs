//! Memory the emulated IOMMU touches: host memory behind mappings, page-table pages, and the
//! byte copies a DMA performs. The crate's `unsafe` operations live in this module; callers
//! elsewhere only call its `unsafe fn`s (a DMA's copies, a table page from an entry), each
//! under the contract its `# Safety` section states.
//!
//! "Physical address" throughout the crate is a host virtual address. That is honest about what
//! the emulation is: page-table entries hold real pointers to real table pages, and a DMA copies
//! to the address the walk produced, just as hardware would with a bus address.
//!
//! Lifetime rules that make the raw pointers sound:
//! * A mapping keeps an `Arc` of the [`HostMemory`] behind it; the domain drops that `Arc` only
//!   after the mapping is gone from the page table *and* an IOTLB invalidation has drained every
//!   in-flight access (see `iotlb.rs`). So an address produced by a walk stays valid for the
//!   whole access that uses it.
//! * Table pages are owned by the page table's [`TableArena`]. A page unlinked from the tree is
//!   retired and only freed after the next drain, for the same reason.

#[cfg(debug_assertions)]
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Memory that can sit behind IOMMU mappings.
///
/// # Safety
/// The implementer promises that `[host_ptr(), host_ptr() + size())` is readable and writable
/// memory that stays mapped, at the same address, for as long as the value lives.
pub unsafe trait HostMemory: Send + Sync + 'static {
    /// Start of the region in this process's address space.
    fn host_ptr(&self) -> *mut u8;
    /// Size of the region in bytes.
    fn size(&self) -> usize;
}

/// Reads `buf.len()` bytes at `offset` of any host memory; `false` if out of bounds.
pub fn host_read(mem: &dyn HostMemory, offset: u64, buf: &mut [u8]) -> bool {
    let ok = offset
        .checked_add(buf.len() as u64)
        .is_some_and(|e| e <= mem.size() as u64);
    if ok {
        // SAFETY: in bounds of `mem`, which `HostMemory` keeps mapped while it lives, and
        // `mem` is borrowed for the whole call.
        unsafe { copy_from_host(mem.host_ptr() as u64 + offset, buf) };
    }
    ok
}

/// Writes `buf` at `offset` of any host memory; `false` if out of bounds.
pub fn host_write(mem: &dyn HostMemory, offset: u64, buf: &[u8]) -> bool {
    let ok = offset
        .checked_add(buf.len() as u64)
        .is_some_and(|e| e <= mem.size() as u64);
    if ok {
        // SAFETY: as for `host_read`.
        unsafe { copy_to_host(mem.host_ptr() as u64 + offset, buf) };
    }
    ok
}

/// Anonymous private memory from `mmap`, the stand-in for pinned guest memory.
#[derive(Debug)]
pub struct AnonMemory {
    ptr: *mut u8,
    size: usize,
}

// SAFETY: the region is plain memory owned by this value; concurrent access is the same as a
// device and a CPU sharing RAM, and all accesses go through raw copies, never references.
unsafe impl Send for AnonMemory {}
// SAFETY: as above.
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    /// Maps `size` bytes (rounded up to 4 KiB), aligned to the largest power of two not above
    /// the size, capped at 1 GiB, so that huge IOMMU leaves can map it. With `noreserve`, no
    /// swap is reserved, so a mostly untouched 1 TiB IOVA space costs only the pages written.
    pub fn new(size: usize, noreserve: bool) -> std::io::Result<Self> {
        let size = size.max(1).next_multiple_of(4096);
        let align = (1usize << (usize::BITS - 1 - size.leading_zeros())).clamp(4096, 1 << 30);
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if noreserve {
            flags |= libc::MAP_NORESERVE;
        }
        let total = size + align - 4096;
        // SAFETY: anonymous mapping with no address hint; the kernel picks a fresh range, so no
        // existing memory is affected. The result is checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(align);
        // SAFETY: both ranges lie inside the mapping just created and outside
        // `[start, start + size)`, which is the part kept.
        unsafe {
            if start > raw {
                libc::munmap(raw as *mut libc::c_void, start - raw);
            }
            let tail = raw + total - (start + size);
            if tail > 0 {
                libc::munmap((start + size) as *mut libc::c_void, tail);
            }
        }
        Ok(Self {
            ptr: start as *mut u8,
            size,
        })
    }

    /// Reads `buf.len()` bytes at `offset` (host-side check of what DMA wrote).
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.size));
        // SAFETY: in bounds (checked above) of the mapping this value owns while it lives.
        unsafe { copy_from_host(self.ptr as u64 + offset as u64, buf) }
    }

    /// Writes `buf` at `offset` (host-side setup of memory contents).
    pub fn write(&self, offset: usize, buf: &[u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.size));
        // SAFETY: as for `read`.
        unsafe { copy_to_host(self.ptr as u64 + offset as u64, buf) }
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly what mmap returned and nothing else unmaps them.
        unsafe {
            libc::munmap(self.ptr.cast(), self.size);
        }
    }
}

// SAFETY: the mapping lives until `Drop` runs, which cannot happen while `&self` exists.
unsafe impl HostMemory for AnonMemory {
    fn host_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn size(&self) -> usize {
        self.size
    }
}

/// Copies `buf` to host address `hva`, with volatile stores: the memory may be guest RAM
/// that running vCPUs read and write at the same time, and a plain copy into memory another
/// thread accesses concurrently is a data race in Rust's memory model. Volatile accesses are
/// what vm-memory uses for the same reason; they are done eight bytes at a time where the
/// address allows.
///
/// # Safety
/// `[hva, hva + buf.len())` must be mapped, writable memory for the whole call: produced by a
/// walk inside an in-flight access (the mapping's memory cannot be released before the access
/// ends, see the module documentation), or owned by the caller.
#[inline(always)]
pub(crate) unsafe fn copy_to_host(hva: u64, buf: &[u8]) {
    let dst = hva as *mut u8;
    let n = buf.len();
    let mut i = 0;
    // SAFETY: in all three loops, every address written is inside `[hva, hva + n)`, which the
    // caller guarantees is mapped and writable; `buf` is a distinct Rust slice.
    unsafe {
        while i < n && !(hva as usize + i).is_multiple_of(8) {
            dst.add(i).write_volatile(buf[i]);
            i += 1;
        }
        let src = buf.as_ptr();
        while i + 8 <= n {
            dst.add(i)
                .cast::<u64>()
                .write_volatile(src.add(i).cast::<u64>().read_unaligned());
            i += 8;
        }
        while i < n {
            dst.add(i).write_volatile(buf[i]);
            i += 1;
        }
    }
}

/// Copies from host address `hva` into `buf`, with volatile loads (see [`copy_to_host`]).
///
/// # Safety
/// `[hva, hva + buf.len())` must be mapped, readable memory for the whole call, as for
/// [`copy_to_host`].
#[inline(always)]
pub(crate) unsafe fn copy_from_host(hva: u64, buf: &mut [u8]) {
    let src = hva as *const u8;
    let n = buf.len();
    let mut i = 0;
    // SAFETY: in all three loops, every address read is inside `[hva, hva + n)`, which the
    // caller guarantees is mapped; `buf` is a distinct Rust slice.
    unsafe {
        while i < n && !(hva as usize + i).is_multiple_of(8) {
            buf[i] = src.add(i).read_volatile();
            i += 1;
        }
        let dst = buf.as_mut_ptr();
        while i + 8 <= n {
            dst.add(i)
                .cast::<u64>()
                .write_unaligned(src.add(i).cast::<u64>().read_volatile());
            i += 8;
        }
        while i < n {
            buf[i] = src.add(i).read_volatile();
            i += 1;
        }
    }
}

/// The 64-bit word at host address `hva`, for atomic access: a stage-1 entry in guest RAM,
/// which the guest's vCPUs write while the emulated IOMMU sets A/D in it.
///
/// # Safety
/// `hva` must be 8-byte aligned and `[hva, hva + 8)` mapped, readable and writable memory for
/// all of `'a`: produced by a stage-2 translation inside an in-flight access, whose memory
/// cannot be released before the access ends (module documentation).
#[inline(always)]
pub(crate) unsafe fn atomic_at<'a>(hva: u64) -> &'a AtomicU64 {
    debug_assert!(hva.is_multiple_of(8));
    // SAFETY: aligned and live for `'a` by the caller's contract; `AtomicU64` has the layout
    // of `u64`, and every other access to guest RAM is volatile or atomic, never a reference.
    unsafe { AtomicU64::from_ptr(hva as *mut u64) }
}

/// Number of entries in a table page (4 KiB of 64-bit entries, all three formats).
pub const ENTRIES: usize = 512;

/// One 4 KiB page-table page. Its address is what table entries point to.
#[repr(C, align(4096))]
pub struct TablePage(pub [AtomicU64; ENTRIES]);

impl TablePage {
    /// The entry at `idx`.
    #[inline(always)]
    pub fn entry(&self, idx: usize) -> &AtomicU64 {
        &self.0[idx]
    }
    /// Relaxed load of entry `idx`.
    #[inline(always)]
    pub fn load(&self, idx: usize) -> u64 {
        self.0[idx].load(Ordering::Relaxed)
    }
}

/// Table pages come from 2 MiB slabs: contiguous and backed by transparent huge pages where
/// the kernel allows, so a harvest streams through them with few TLB misses. Leaf tables and
/// the tables above them come from different slabs ([`TablePool`]).
const SLAB: usize = 2 << 20;
const SLAB_PAGES: usize = SLAB / 4096;

/// Owner of every table page of one page table.
///
/// Pages are handed out zeroed, referenced from entries by address, and freed in two steps:
/// [`TableArena::retire`] when unlinked, [`TableArena::reclaim`] after the next drain, which
/// zeroes them and puts them on a free list. Slabs go back to the OS with the arena.
///
/// Allocation and retirement take `&self` (the bookkeeping sits behind its own lock) so that a
/// walk can hold table pages borrowed from the arena while it allocates or retires others;
/// only [`TableArena::reclaim`], which frees, needs `&mut self`, and therefore no borrowed
/// table page can outlive it.
pub(crate) struct TableArena {
    books: Mutex<Books>,
}

/// Which slabs a table page comes from. A 4 KiB-mapped space has 512 leaf tables to every
/// table above; cut from the same slabs, each upper table would sit in its own 2 MiB page
/// among leaf tables, and a sparse harvest that reads the upper tables whole and a few leaf
/// tables would miss the TLB on every one (measured: the 1 TiB clustered harvest of
/// docs/benchmarks.md#harvest spent most of its time so). Kept apart, the upper tables of
/// 1 TiB share one huge page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TablePool {
    /// Tables of the lowest level (their entries are 4 KiB leaves).
    Leaf,
    /// Every other table, the root included.
    Upper,
}

struct Books {
    slabs: Vec<AnonMemory>,
    /// Per pool: the slab pages are being cut from, and the next page in it.
    bump: [(usize, usize); 2],
    free: Vec<u64>,
    retired: Vec<u64>,
    in_use: usize,
    #[cfg(debug_assertions)]
    live: HashSet<u64>,
}

impl Default for TableArena {
    fn default() -> Self {
        Self::new()
    }
}

impl TableArena {
    pub fn new() -> Self {
        Self {
            books: Mutex::new(Books {
                slabs: Vec::new(),
                bump: [(0, SLAB_PAGES); 2],
                free: Vec::new(),
                retired: Vec::new(),
                in_use: 0,
                #[cfg(debug_assertions)]
                live: HashSet::new(),
            }),
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        // The books hold no invariant a panicking holder could break half-way.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates a zeroed table page from `pool` and returns its address.
    pub fn alloc(&self, pool: TablePool) -> u64 {
        let mut b = self.books();
        let pa = match b.free.pop() {
            Some(pa) => pa,
            None => {
                let books = &mut *b;
                let (slab, next) = &mut books.bump[pool as usize];
                if *next == SLAB_PAGES {
                    let fresh = AnonMemory::new(SLAB, false).expect("out of memory for IOMMU page tables");
                    // SAFETY: advice on a range this arena owns; it changes no contents.
                    unsafe {
                        libc::madvise(fresh.host_ptr().cast(), SLAB, libc::MADV_HUGEPAGE);
                    }
                    books.slabs.push(fresh);
                    (*slab, *next) = (books.slabs.len() - 1, 0);
                }
                let pa = books.slabs[*slab].host_ptr() as u64 + (*next * 4096) as u64;
                *next += 1;
                pa
            }
        };
        b.in_use += 1;
        #[cfg(debug_assertions)]
        b.live.insert(pa);
        pa
    }

    /// Number of table pages in use (live and retired).
    pub fn pages(&self) -> usize {
        self.books().in_use
    }

    /// Resolves a table address taken from an entry.
    ///
    /// # Safety
    /// `pa` must be a page this arena handed out and has not reclaimed (the root, or an
    /// address read from a present entry of its tree while the caller holds the page table's
    /// structural lock). Retired pages stay valid until [`Self::reclaim`], which needs
    /// `&mut self` and so cannot run while the returned reference lives.
    #[inline(always)]
    pub unsafe fn table(&self, pa: u64) -> &TablePage {
        #[cfg(debug_assertions)]
        assert!(self.books().live.contains(&pa), "entry points at unknown table {pa:#x}");
        // SAFETY: this function's own contract, and the borrow of `self` keeps `reclaim` away.
        unsafe { table_at(pa) }
    }

    /// Marks a page unlinked from the tree; it is freed by the next [`Self::reclaim`].
    pub fn retire(&self, pa: u64) {
        let mut b = self.books();
        #[cfg(debug_assertions)]
        assert!(
            b.live.contains(&pa) && !b.retired.contains(&pa),
            "retiring {pa:#x}, which is not a live table of this arena"
        );
        b.retired.push(pa);
    }

    /// Recycles retired pages. Call only after an IOTLB invalidation has drained in-flight DMA.
    pub fn reclaim(&mut self) {
        let b = self.books.get_mut().unwrap_or_else(|e| e.into_inner());
        for pa in std::mem::take(&mut b.retired) {
            // SAFETY: a retired page is one this arena handed out, and it is still allocated
            // (it goes to the free list below, never back to the OS while the arena lives).
            let t = unsafe { table_at(pa) };
            for i in 0..ENTRIES {
                t.entry(i).store(0, Ordering::Relaxed);
            }
            #[cfg(debug_assertions)]
            b.live.remove(&pa);
            b.in_use -= 1;
            b.free.push(pa);
        }
    }
}

/// Table page at an address taken from a table entry.
///
/// # Safety
/// `pa` must be a page allocated by a [`TableArena`], and the caller must be either under that
/// page table's structural lock or inside an in-flight DMA access, so that the page cannot be
/// freed while the reference is used.
#[inline(always)]
pub(crate) unsafe fn table_at<'a>(pa: u64) -> &'a TablePage {
    // SAFETY: the contract above: pages are freed only by `reclaim`, after the page was
    // unlinked and a drain ended every access that could have read its address.
    unsafe { &*(pa as *const TablePage) }
}

/// One region of a vm-memory `GuestMemoryMmap`, as memory behind IOMMU mappings. Holding it
/// keeps the whole guest memory mapped.
pub struct GuestRamRegion {
    _mem: std::sync::Arc<vm_memory::GuestMemoryMmap>,
    hva: *mut u8,
    size: usize,
    gpa: u64,
}

// SAFETY: the region is guest RAM shared with vCPUs and devices by design; this value only
// hands out its address, and every access goes through raw copies.
unsafe impl Send for GuestRamRegion {}
// SAFETY: as above.
unsafe impl Sync for GuestRamRegion {}

impl GuestRamRegion {
    /// The region of `mem` that starts at guest-physical address `gpa`.
    pub fn new(mem: std::sync::Arc<vm_memory::GuestMemoryMmap>, gpa: u64) -> Option<Self> {
        use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
        let r = mem.find_region(GuestAddress(gpa))?;
        if r.start_addr().0 != gpa {
            return None;
        }
        let hva = mem.get_host_address(GuestAddress(gpa)).ok()?;
        let size = r.len() as usize;
        Some(Self {
            _mem: mem.clone(),
            hva,
            size,
            gpa,
        })
    }

    /// Guest-physical start of the region.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
}

// SAFETY: `GuestMemoryMmap` keeps its regions mapped at fixed addresses until it is dropped,
// and this value holds an `Arc` of it.
unsafe impl HostMemory for GuestRamRegion {
    fn host_ptr(&self) -> *mut u8 {
        self.hva
    }
    fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time volatile copies against a plain model: every start alignment and
    /// length around a word, bytes outside the range untouched.
    #[test]
    fn volatile_copies_match_a_byte_copy_at_every_alignment() {
        let mem = AnonMemory::new(4096, false).unwrap();
        let base = mem.host_ptr() as u64;
        for off in 0..16u64 {
            for len in 0..40usize {
                let fill = vec![0xeeu8; 64];
                host_write(&mem, 0, &fill);
                let src: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(37).wrapping_add(off as u8))
                    .collect();
                // SAFETY: `[base + off, base + off + len)` lies inside `mem`'s 4 KiB.
                unsafe { copy_to_host(base + off, &src) };
                let mut all = vec![0u8; 64];
                host_read(&mem, 0, &mut all);
                let mut want = fill.clone();
                want[off as usize..off as usize + len].copy_from_slice(&src);
                assert_eq!(all, want, "write at {off}, {len} bytes");
                let mut back = vec![0u8; len];
                // SAFETY: as above.
                unsafe { copy_from_host(base + off, &mut back) };
                assert_eq!(back, src, "read at {off}, {len} bytes");
            }
        }
    }
}
