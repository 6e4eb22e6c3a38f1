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
        })
    }

    /// Collects every published entry: calls `f(slot, page_offset)` and marks it for reset.
    /// The acquire load of the flags pairs with KVM's release when it publishes an entry; the
    /// release store of RESET hands the entry back (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`).
    pub fn collect(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let idx = (self.fetch % self.entries) as usize;
            // SAFETY: `idx < entries`, inside the mapping. The flags word is 4-byte aligned at
            // the start of each 16-byte entry and KVM accesses it atomically too; slot and
            // offset are read only after the acquire that makes them visible.
            let (flags, slot, offset) = unsafe {
                let entry = self.gfns.add(idx);
                let flags = &*(std::ptr::addr_of_mut!((*entry).flags) as *const AtomicU32);
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                (
                    flags,
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

impl Drop for DirtyRing {
    fn drop(&mut self) {
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
