//! The CPU dirty-harvest measurement shared by the criterion bench and `livemig bench
//! cpu-dirty`: a real guest dirties memory at a configured rate while the host harvests at a
//! fixed interval, ring or bitmap.

use crate::devices::DeviceSet;
use crate::{layout, DirtyLogMode, PageBitmap, Pattern, Program, Vm, VmConfig, VmError};
use std::time::{Duration, Instant};

/// One measurement point.
#[derive(Clone, Debug)]
pub struct HarvestPoint {
    pub mode: DirtyLogMode,
    pub mem_mib: u64,
    /// Configured dirty rate (0: the guest runs but writes nothing).
    pub rate_mib_s: f64,
    /// The rate the guest achieved, from its own TSC readings.
    pub achieved_mib_s: f64,
    pub harvests: u32,
    /// Mean cost of one harvest, including ring collection done by the reaper and full-ring
    /// exits since the previous harvest.
    pub mean: Duration,
    /// Mean pages found per harvest.
    pub pages_per_harvest: f64,
}

impl HarvestPoint {
    /// Mean harvest cost per GiB of guest RAM.
    pub fn per_gib(&self) -> Duration {
        self.mean.mul_f64(1024.0 / self.mem_mib as f64)
    }
}

/// Runs the dirtier at `rate_mib_s` (sequential over every page above the working-set base)
/// for `duration`, harvesting every `interval`; returns the mean harvest cost.
pub fn measure(
    mode: DirtyLogMode,
    mem_mib: u64,
    vcpus: u32,
    rate_mib_s: f64,
    duration: Duration,
    interval: Duration,
) -> Result<HarvestPoint, VmError> {
    let vm = Vm::new(VmConfig {
        mem_mib,
        regions: 1,
        vcpus,
        dirty: mode,
        devices: DeviceSet::default(),
    })?;
    let mem = vm.mem_size().min(layout::LOW_RAM_MAX);
    if mem <= layout::WORKSET_BASE + ((vcpus as u64) << 20) {
        return Err(VmError::Config(format!(
            "{mem_mib} MiB leaves no working set above {:#x}",
            layout::WORKSET_BASE
        )));
    }
    // Each vCPU dirties its own slice of the working set at its share of the rate.
    let slice = (mem - layout::WORKSET_BASE) / 4096 / vcpus as u64;
    for v in 0..vcpus {
        let base = layout::WORKSET_BASE + v as u64 * slice * 4096;
        let mut p = Program::dirtier(base, slice, rate_mib_s / vcpus as f64, Pattern::Sequential);
        p.dirtier = rate_mib_s > 0.0;
        vm.programs().load(v, &p)?;
    }
    vm.cpu_dirty_log().set_logging(true)?;
    let mut out = PageBitmap::new(vm.ram_end() / 4096);
    vm.resume()?;
    // Warm-up: the first pass over a slot costs more (KVM's first write-protect).
    std::thread::sleep(interval);
    vm.cpu_dirty_log().harvest(&mut out)?;
    let c0: Vec<_> = (0..vcpus).map(|v| vm.programs().counters(v)).collect();
    let bg0 = vm.cpu_dirty_log().background_time();
    let (mut total, mut pages, mut n) = (Duration::ZERO, 0u64, 0u32);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        std::thread::sleep(interval);
        out.clear();
        let t = Instant::now();
        let h = vm.cpu_dirty_log().harvest(&mut out)?;
        total += t.elapsed();
        pages += h.pages;
        n += 1;
    }
    total += vm.cpu_dirty_log().background_time() - bg0;
    vm.pause()?;
    let mut achieved = 0.0;
    for (v, c0) in c0.iter().enumerate() {
        let c = vm.programs().counters(v as u32);
        let secs = c.tsc_now.saturating_sub(c0.tsc_now) as f64 / (vm.tsc_khz() as f64 * 1e3);
        if secs > 0.0 {
            achieved += (c.pages_written - c0.pages_written) as f64 * 4096.0 / secs / 1048576.0;
        }
    }
    Ok(HarvestPoint {
        mode,
        mem_mib,
        rate_mib_s,
        achieved_mib_s: achieved,
        harvests: n,
        mean: total / n.max(1),
        pages_per_harvest: pages as f64 / n.max(1) as f64,
    })
}

/// `size` bytes of RAM as a new VM gets its guest memory: anonymous, untouched, huge pages
/// advised. A benchmark lands a raw TCP stream in it to measure what receiving into fresh
/// guest memory costs on this host, the first touch of every page included.
pub fn fresh_ram(size: u64) -> Result<vm_memory::GuestMemoryMmap, VmError> {
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), size as usize)])
        .map_err(|e| VmError::Memory(e.to_string()))?;
    let hva = vm_memory::GuestMemoryBackend::get_host_address(&mem, vm_memory::GuestAddress(0))
        .map_err(|e| VmError::Memory(e.to_string()))?;
    crate::kvm_sys::advise_huge_pages(hva as u64, size);
    Ok(mem)
}
