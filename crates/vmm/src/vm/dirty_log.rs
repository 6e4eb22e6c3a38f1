//! CPU dirty logging of a VM's memory slots, as a migration turns it on, harvests it and reads
//! its losses.

use super::*;

/// The VM's CPU dirty log, as a migration turns it on, harvests it and reads its losses. A view
/// of the VM ([`Vm::cpu_dirty_log`]).
pub struct CpuDirtyLog<'a>(pub(super) &'a Vm);

impl CpuDirtyLog<'_> {
    /// Ring or bitmap, as configured.
    pub fn mode(&self) -> DirtyLogMode {
        self.0.cfg.dirty
    }
    /// Turns logging on or off for every slot.
    pub fn set_logging(&self, on: bool) -> Result<(), VmError> {
        self.0.set_cpu_dirty_logging(on)
    }
    /// Adds the pages vCPUs dirtied since the last harvest to `out`, and re-arms tracking.
    pub fn harvest(&self, out: &mut PageBitmap) -> Result<HarvestStats, VmError> {
        self.0.harvest_cpu_dirty(out)
    }
    /// Harvests that reported every page because a dirty-ring overrun lost the log.
    pub fn lost_harvests(&self) -> u64 {
        self.0.dirty_lost_harvests()
    }
    /// Time spent collecting dirty rings outside `harvest` (reaper thread, full-ring exits).
    pub fn background_time(&self) -> Duration {
        self.0.dirty_background_time()
    }
}

impl Vm {
    /// Turns CPU dirty logging on or off for every slot.
    pub(crate) fn set_cpu_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for s in &self.slots {
            let hva = vm_memory::GuestMemoryBackend::get_host_address(&*self.mem, GuestAddress(s.gpa))
                .map_err(|e| VmError::Memory(e.to_string()))?;
            kvm_sys::set_memory_region(&self.fd, s.slot, s.gpa, s.size, hva as u64, flags)
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Harvests the pages vCPUs dirtied since the last harvest into `out` and re-arms their
    /// tracking (ring or bitmap, as configured).
    pub(crate) fn harvest_cpu_dirty(&self, out: &mut PageBitmap) -> Result<HarvestStats, VmError> {
        self.dirty.harvest(&self.fd, out).map_err(VmError::Dirty)
    }

    /// Backs guest RAM with transparent huge pages from here on (a migration destination:
    /// it first-touches most of its memory while receiving). Not for a VM whose writes are
    /// dirty-tracked, where KVM would have to split the huge mappings again.
    pub fn prefer_huge_pages(&self) -> Result<(), VmError> {
        for s in &self.slots {
            let hva = vm_memory::GuestMemoryBackend::get_host_address(&*self.mem, GuestAddress(s.gpa))
                .map_err(|e| VmError::Memory(e.to_string()))?;
            kvm_sys::advise_huge_pages(hva as u64, s.size);
        }
        Ok(())
    }

    /// Harvests that reported every page of guest RAM because a dirty-ring overrun lost the
    /// log (always 0 in bitmap mode).
    pub(crate) fn dirty_lost_harvests(&self) -> u64 {
        self.dirty.lost_harvests()
    }

    /// Time the VM spent collecting dirty rings outside [`Vm::harvest_cpu_dirty`] (the reaper
    /// thread and full-ring exits); zero in bitmap mode.
    pub(crate) fn dirty_background_time(&self) -> Duration {
        self.dirty.background_time()
    }
}
