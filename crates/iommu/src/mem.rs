//! Memory the emulated IOMMU touches: host memory behind mappings, page-table pages, and the
//! byte copies a DMA performs. Every `unsafe` block of the crate lives in this module.
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
        copy_from_host(mem.host_ptr() as u64 + offset, buf);
    }
    ok
}

/// Writes `buf` at `offset` of any host memory; `false` if out of bounds.
pub fn host_write(mem: &dyn HostMemory, offset: u64, buf: &[u8]) -> bool {
    let ok = offset
        .checked_add(buf.len() as u64)
        .is_some_and(|e| e <= mem.size() as u64);
    if ok {
        copy_to_host(mem.host_ptr() as u64 + offset, buf);
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
        copy_from_host(self.ptr as u64 + offset as u64, buf)
    }

    /// Writes `buf` at `offset` (host-side setup of memory contents).
    pub fn write(&self, offset: usize, buf: &[u8]) {
        assert!(offset.checked_add(buf.len()).is_some_and(|e| e <= self.size));
        copy_to_host(self.ptr as u64 + offset as u64, buf)
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

/// Copies `buf` to host address `hva`.
///
/// Crate-internal contract: `[hva, hva + buf.len())` is live, writable memory, either produced
/// by a walk inside an in-flight access (the mapping's memory cannot be released before the
/// access ends, see the module documentation) or owned by the caller.
#[inline(always)]
pub(crate) fn copy_to_host(hva: u64, buf: &[u8]) {
    // SAFETY: the crate-internal contract above; `buf` is a distinct Rust slice, so the ranges
    // do not overlap. Concurrent CPU or DMA writes to the same guest page are the normal
    // shared-memory behaviour of a VM and involve no Rust references.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), hva as *mut u8, buf.len()) }
}

/// Copies from host address `hva` into `buf`. Same contract as [`copy_to_host`].
#[inline(always)]
pub(crate) fn copy_from_host(hva: u64, buf: &mut [u8]) {
    // SAFETY: as for `copy_to_host`.
    unsafe { std::ptr::copy_nonoverlapping(hva as *const u8, buf.as_mut_ptr(), buf.len()) }
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
/// the kernel allows, so a harvest streams through them with few TLB misses.
const SLAB: usize = 2 << 20;
const SLAB_PAGES: usize = SLAB / 4096;

/// Owner of every table page of one page table.
///
/// Pages are handed out zeroed, referenced from entries by address, and freed in two steps:
/// [`TableArena::retire`] when unlinked, [`TableArena::reclaim`] after the next drain, which
/// zeroes them and puts them on a free list. Slabs go back to the OS with the arena.
pub struct TableArena {
    slabs: Vec<AnonMemory>,
    next: usize,
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
            slabs: Vec::new(),
            next: SLAB_PAGES,
            free: Vec::new(),
            retired: Vec::new(),
            in_use: 0,
            #[cfg(debug_assertions)]
            live: HashSet::new(),
        }
    }

    /// Allocates a zeroed table page and returns its address.
    pub fn alloc(&mut self) -> u64 {
        let pa = match self.free.pop() {
            Some(pa) => pa,
            None => {
                if self.next == SLAB_PAGES {
                    let slab = AnonMemory::new(SLAB, false).expect("out of memory for IOMMU page tables");
                    // SAFETY: advice on a range this arena owns; it changes no contents.
                    unsafe {
                        libc::madvise(slab.host_ptr().cast(), SLAB, libc::MADV_HUGEPAGE);
                    }
                    self.slabs.push(slab);
                    self.next = 0;
                }
                let slab = self.slabs.last().expect("slab just ensured");
                let pa = slab.host_ptr() as u64 + (self.next * 4096) as u64;
                self.next += 1;
                pa
            }
        };
        self.in_use += 1;
        #[cfg(debug_assertions)]
        self.live.insert(pa);
        pa
    }

    /// Number of table pages in use (live and retired).
    pub fn pages(&self) -> usize {
        self.in_use
    }

    /// Resolves a table address taken from an entry.
    ///
    /// The returned reference is only used while the caller either holds the page table's
    /// structural lock (so nothing is retired under it) or is inside an in-flight DMA access
    /// (so nothing retired is freed before the access ends).
    #[inline(always)]
    pub fn table<'a>(&self, pa: u64) -> &'a TablePage {
        #[cfg(debug_assertions)]
        assert!(self.live.contains(&pa), "entry points at unknown table {pa:#x}");
        table_at(pa)
    }

    /// Marks a page unlinked from the tree; it is freed by the next [`Self::reclaim`].
    pub fn retire(&mut self, pa: u64) {
        self.retired.push(pa);
    }

    /// Whether pages wait for a drain before they can be freed.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Recycles retired pages. Call only after an IOTLB invalidation has drained in-flight DMA.
    pub fn reclaim(&mut self) {
        for pa in std::mem::take(&mut self.retired) {
            let t = table_at(pa);
            for i in 0..ENTRIES {
                t.entry(i).store(0, Ordering::Relaxed);
            }
            #[cfg(debug_assertions)]
            self.live.remove(&pa);
            self.in_use -= 1;
            self.free.push(pa);
        }
    }
}

/// Table page at an address taken from a table entry.
///
/// Crate-internal contract: `pa` is a page allocated by a [`TableArena`] and the caller is
/// either under that page table's structural lock or inside an in-flight DMA access, so the
/// page cannot be freed while the reference is used.
#[inline(always)]
pub(crate) fn table_at<'a>(pa: u64) -> &'a TablePage {
    // SAFETY: the crate-internal contract above: pages are freed only by `reclaim`, after the
    // page was unlinked and a drain ended every access that could have read its address.
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
