//! What kvm-ioctls does not wrap, and every `unsafe` of the crate: memory slots, the per-vCPU
//! dirty ring (shared with KVM), `KVM_RESET_DIRTY_RINGS`, `KVM_CLEAR_DIRTY_LOG`, and the
//! signal that kicks a vCPU out of `KVM_RUN`. Modelled on kvm-ioctls' coalesced-MMIO ring.

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn, kvm_userspace_memory_region, KVMIO};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use vmm_sys_util::errno;
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page for userspace.
const GFN_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: userspace collected the entry; KVM may recycle it on reset.
const GFN_RESET: u32 = 2;

/// Asks for transparent huge pages on `[hva, hva + size)`. Advisory: failure changes nothing
/// but speed.
pub fn advise_huge_pages(hva: u64, size: u64) {
    // SAFETY: madvise(MADV_HUGEPAGE) only changes how the kernel backs the range; the range is
    // guest memory this process mapped and keeps mapped, and no Rust reference is affected.
    unsafe {
        libc::madvise(hva as *mut libc::c_void, size as usize, libc::MADV_HUGEPAGE);
    }
}

/// Registers `[hva, hva + size)` as guest-physical `[gpa, gpa + size)` in `slot`.
///
/// The caller keeps the host memory mapped for as long as the VM lives (the VM holds the
/// `GuestMemoryMmap` that owns it).
pub fn set_memory_region(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    hva: u64,
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    };
    // SAFETY: `hva` points at `size` bytes of guest memory owned by the `GuestMemoryMmap` the
    // VM keeps until after the VM file is closed, so KVM never maps freed memory.
    unsafe { vm.set_user_memory_region(region) }
}

/// One vCPU's dirty ring, mapped from its file at `KVM_DIRTY_LOG_PAGE_OFFSET`.
pub struct DirtyRing {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    bytes: usize,
    /// Next entry to look at.
    fetch: u32,
    /// Whether `gfns` is an mmap of the vCPU file (a test ring borrows a buffer).
    mapped: bool,
}

// SAFETY: the mapping is plain shared memory; the ring is only touched through `&mut self`
// (callers serialise with a mutex), and each entry's flags with atomic operations.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu` (`entries` of 16 bytes).
    pub fn map(vcpu: &VcpuFd, entries: u32) -> std::io::Result<Self> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let page = 4096i64;
        // SAFETY: a fresh shared mapping of the vCPU file at the offset KVM defines for the
        // dirty ring; KVM fills it. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64 * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            gfns: p.cast(),
            entries,
            bytes,
            fetch: 0,
            mapped: true,
        })
    }

    /// A ring over `buf`, which plays KVM's side in tests. The caller keeps `buf` alive and
    /// unmoved for as long as the ring exists.
    #[cfg(test)]
    fn over(buf: &mut [kvm_dirty_gfn]) -> Self {
        Self {
            gfns: buf.as_mut_ptr(),
            entries: buf.len() as u32,
            bytes: 0,
            fetch: 0,
            mapped: false,
        }
    }

    /// Collects every published entry: calls `f(slot, page_offset)` and marks it for reset.
    /// The acquire load of the flags pairs with KVM's release when it publishes an entry; the
    /// release store of RESET hands the entry back (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
    pub fn collect(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let idx = (self.fetch % self.entries) as usize;
            let flags = self.flags(self.fetch);
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: `idx < entries`, inside the mapping; slot and offset are read only after
            // the acquire above that makes KVM's writes of them visible.
            let (slot, offset) = unsafe {
                let entry = self.gfns.add(idx);
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*entry).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*entry).offset)),
                )
            };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl DirtyRing {
    /// The flags word of entry `idx` (taken modulo the ring size).
    fn flags(&self, idx: u32) -> &AtomicU32 {
        let idx = (idx % self.entries) as usize;
        // SAFETY: `idx < entries`, inside the mapping, which lives as long as `self`; the flags
        // word is 4-byte aligned at the start of each 16-byte entry and KVM accesses it
        // atomically too.
        unsafe { &*(std::ptr::addr_of_mut!((*self.gfns.add(idx)).flags) as *const AtomicU32) }
    }

    /// Realigns this ring with KVM after KVM overran it (docs/dirty-tracking.md, "Ring
    /// overruns"). When KVM pushes more entries than the ring holds between two collections,
    /// it reuses slots; after userspace collects and KVM resets them, KVM still counts some
    /// entries as outstanding whose slots are already clear ("phantoms"). They sit at the
    /// fetch position, before the first entry KVM published after them, and KVM's reset
    /// stops at the first of them for good, so the ring stays full and the vCPU cannot run.
    ///
    /// If the entry at the fetch position is clear and a published entry follows within one
    /// lap, every clear slot between them is such a phantom: KVM publishes in order, so a
    /// slot before a published one was published earlier, and it reads clear only because a
    /// reset already recycled it. Each is marked collected with a compare-exchange from
    /// clear, so an entry KVM publishes concurrently is never overwritten, and the next
    /// `KVM_RESET_DIRTY_RINGS` walks past them. Returns the phantoms marked; 0 when the ring
    /// is aligned or when nothing proves where KVM is.
    pub fn resync(&mut self) -> u32 {
        if self.flags(self.fetch).load(Ordering::Acquire) & GFN_DIRTY != 0 {
            return 0;
        }
        let Some(k) = (1..self.entries)
            .find(|k| self.flags(self.fetch.wrapping_add(*k)).load(Ordering::Acquire) & GFN_DIRTY != 0)
        else {
            return 0;
        };
        // The acquire of the published entry orders these loads after KVM's earlier
        // publications: a slot KVM filled before it cannot read clear here.
        for i in 0..k {
            let f = self.flags(self.fetch.wrapping_add(i));
            if f.compare_exchange(0, GFN_RESET, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Not a phantom after all (published meanwhile): undo nothing, collect from here.
                self.fetch = self.fetch.wrapping_add(i);
                return i;
            }
        }
        self.fetch = self.fetch.wrapping_add(k);
        k
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        if !self.mapped {
            return;
        }
        // SAFETY: exactly the mapping created in `map`.
        unsafe {
            libc::munmap(self.gfns.cast(), self.bytes);
        }
    }
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects every page whose entry was marked for reset.
pub fn reset_dirty_rings(vm: &VmFd) -> Result<u32, errno::Error> {
    // SAFETY: an argument-less ioctl on a VM file.
    let r = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if r < 0 {
        Err(errno::Error::last())
    } else {
        Ok(r as u32)
    }
}

/// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages set in `bitmap` (bit `i` is page
/// `first_page + i` of `slot`). `first_page` must be a multiple of 64, and so must
/// `num_pages` unless the range ends at the end of the slot.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &mut [u64],
) -> Result<(), errno::Error> {
    assert!(bitmap.len() * 64 >= num_pages as usize);
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `arg` points at a bitmap of at least `num_pages` bits that lives across the call.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        Err(errno::Error::last())
    } else {
        Ok(())
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (it returns `EINTR`).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs a no-op handler for [`kick_signal`] (once per process), without SA_RESTART so
/// `KVM_RUN` is interrupted.
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .expect("installing the vCPU kick handler");
    });
}

/// `KVM_SET_XSAVE` with the legacy 4 KiB area.
pub fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_bindings::kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the guest CPUID livemig sets has no XSAVE bit, so no extended component beyond
    // the legacy 4 KiB region is enabled and `kvm_xsave` holds the whole state KVM reads.
    unsafe { vcpu.set_xsave(xsave) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM's side of one ring, as Linux 6.x implements it: pushes publish at `dirty` and are
    /// never refused (KVM only warns when a ring is full, which is how it overruns), and a
    /// reset walks from `reset` over collected entries, whatever `dirty` is.
    struct Kvm {
        dirty: u32,
        reset: u32,
    }

    impl Kvm {
        fn flags(ring: &[kvm_dirty_gfn], i: u32) -> &AtomicU32 {
            let e = &ring[(i as usize) % ring.len()];
            // SAFETY: the test owns `ring`; the flags word is aligned and only accessed
            // atomically while the borrow lasts.
            unsafe { &*(std::ptr::addr_of!(e.flags) as *const AtomicU32) }
        }
        fn push(&mut self, ring: &mut [kvm_dirty_gfn], gfn: u64) {
            let n = ring.len();
            let e = &mut ring[(self.dirty as usize) % n];
            e.slot = 0;
            e.offset = gfn;
            Self::flags(ring, self.dirty).store(GFN_DIRTY, Ordering::Release);
            self.dirty += 1;
        }
        fn reset(&mut self, ring: &[kvm_dirty_gfn]) -> u32 {
            let mut n = 0;
            while Self::flags(ring, self.reset).load(Ordering::Acquire) & GFN_RESET != 0 {
                Self::flags(ring, self.reset).store(0, Ordering::Release);
                self.reset += 1;
                n += 1;
            }
            n
        }
        fn used(&self) -> u32 {
            self.dirty.wrapping_sub(self.reset)
        }
    }

    fn collect(r: &mut DirtyRing) -> Vec<u64> {
        let mut v = Vec::new();
        r.collect(|_, off| v.push(off));
        v
    }

    #[test]
    fn a_healthy_ring_needs_no_resync() {
        let mut buf = vec![kvm_dirty_gfn::default(); 16];
        let mut r = DirtyRing::over(&mut buf);
        let mut kvm = Kvm { dirty: 0, reset: 0 };
        for round in 0..5u64 {
            for g in 0..11 {
                kvm.push(&mut buf, round * 100 + g);
            }
            assert_eq!(r.resync(), 0, "aligned: nothing to realign");
            assert_eq!(collect(&mut r), (0..11).map(|g| round * 100 + g).collect::<Vec<_>>());
            assert_eq!(kvm.reset(&buf), 11);
            assert_eq!(kvm.used(), 0);
        }
        assert_eq!(r.resync(), 0, "an empty ring has nothing to prove");
    }

    #[test]
    fn an_overrun_leaves_phantoms_that_resync_clears() {
        const N: u32 = 16;
        let mut buf = vec![kvm_dirty_gfn::default(); N as usize];
        let mut r = DirtyRing::over(&mut buf);
        let mut kvm = Kvm { dirty: 0, reset: 0 };
        // KVM publishes N + 5 entries before userspace looks: the last 5 overwrite the
        // first 5, whose pages are lost.
        for g in 0..N as u64 + 5 {
            kvm.push(&mut buf, 1000 + g);
        }
        let got = collect(&mut r);
        assert_eq!(got.len() as u32, N, "a full lap: the overrun's signature");
        assert_eq!(kvm.reset(&buf), N);
        assert_eq!(
            kvm.used(),
            5,
            "5 phantoms: KVM still counts them, their slots are clear"
        );
        // KVM publishes 3 more after the phantoms. Without a resync, nothing is collected
        // and the reset cannot move: the ring stays full for good.
        for g in 0..3 {
            kvm.push(&mut buf, 2000 + g);
        }
        assert!(collect(&mut r).is_empty());
        assert_eq!(kvm.reset(&buf), 0);
        assert_eq!(kvm.used(), 8);
        // The resync marks the 5 phantoms; the next collection and reset realign.
        assert_eq!(r.resync(), 5);
        assert_eq!(collect(&mut r), vec![2000, 2001, 2002]);
        assert_eq!(kvm.reset(&buf), 8);
        assert_eq!(kvm.used(), 0, "aligned with KVM again");
        // And tracking goes on, with nothing lost from here.
        for g in 0..12 {
            kvm.push(&mut buf, 3000 + g);
        }
        assert_eq!(r.resync(), 0);
        assert_eq!(collect(&mut r), (3000..3012).collect::<Vec<_>>());
        assert_eq!(kvm.reset(&buf), 12);
        assert_eq!(kvm.used(), 0);
    }

    #[test]
    fn resync_never_claims_a_published_entry() {
        // A clear slot at the fetch position with no published entry after it proves
        // nothing: resync must leave it alone, or KVM's reset would run past `dirty`.
        let mut buf = vec![kvm_dirty_gfn::default(); 8];
        let mut r = DirtyRing::over(&mut buf);
        let mut kvm = Kvm { dirty: 0, reset: 0 };
        assert_eq!(r.resync(), 0);
        assert_eq!(kvm.reset(&buf), 0, "nothing was marked");
        kvm.push(&mut buf, 7);
        assert_eq!(r.resync(), 0, "the published entry is at the fetch position");
        assert_eq!(collect(&mut r), vec![7]);
        assert_eq!(kvm.reset(&buf), 1);
        assert_eq!(kvm.used(), 0);
    }
}
