//! The virtual machine: guest memory, KVM slots, vCPUs, the MMIO bus, the accelerator behind
//! the emulated IOMMU, CPU dirty tracking, guest programs, and the snapshot/restore hooks the
//! migration engine calls.

use crate::devices::{self, AccelSetup, AttachedDevice, DeviceSet};
use crate::dirty::{CpuDirty, DirtyLogMode, HarvestStats, PageBitmap, Slot};
use crate::layout::*;
use crate::mmio::MmioBus;
use crate::programs::{ctrl::*, viommu_client, workload, Content, Pattern, Program};
use crate::state::{self, VcpuState};
use crate::vcpu::{self, RunState, VcpuCtl, VcpuEnv, VcpuHandle, VcpuStop};
use crate::{kvm_sys, x86, VmError};

mod dirty_log;
mod program_load;
mod snapshot;
pub use dirty_log::CpuDirtyLog;
use iommu::Errno;
use kvm_bindings::{kvm_enable_cap, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
pub use program_load::Programs;
pub use snapshot::Snapshots;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How a VM is built.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in MiB, from guest-physical 0.
    pub mem_mib: u64,
    /// RAM is split into this many equal regions (KVM slots and IOAS areas).
    pub regions: u32,
    pub vcpus: u32,
    pub dirty: DirtyLogMode,
    pub devices: DeviceSet,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_mib: 1024,
            regions: 1,
            vcpus: 1,
            dirty: DirtyLogMode::default(),
            devices: DeviceSet::one(AccelSetup::default()),
        }
    }
}

/// The guest program's counters (control page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub pages_written: u64,
    pub tsc_start: u64,
    pub tsc_now: u64,
    pub jobs_submitted: u64,
    pub jobs_completed: u64,
    pub errors: u64,
    pub loops: u64,
    /// Chunks of `ctrl::DMA_CHUNK` bytes the DMA writer's device completed.
    pub dma_chunks: u64,
}

/// Device and vCPU state, as `Snapshots::take` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSnapshot {
    /// `state::encode` of every vCPU.
    pub vcpus: Vec<u8>,
    /// Each device's STOP_COPY stream.
    pub devices: Vec<(String, Vec<u8>)>,
}

pub struct Vm {
    cfg: VmConfig,
    fd: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    slots: Vec<Slot>,
    bus: Arc<MmioBus>,
    dirty: Arc<CpuDirty>,
    vcpus: Vec<VcpuHandle>,
    tsc_khz: u32,
    devices: Vec<AttachedDevice>,
    /// Per vCPU: the device its loaded program drives, if any (one client per device: the
    /// client's area is the device's).
    drivers: std::sync::Mutex<Vec<Option<u32>>>,
    port_signal: Arc<AtomicU64>,
    reaper: Option<(Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>)>,
    _kvm: Kvm,
}

fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Kvm { op, errno: e.errno() }
}

impl Vm {
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        let mem_size = cfg.mem_mib.saturating_mul(1 << 20);
        if !(MIN_MEM..=MAX_MEM).contains(&mem_size) {
            return Err(VmError::Config(format!(
                "memory must be between {} MiB and {} MiB (the ceiling: see layout::MAX_MEM)",
                MIN_MEM >> 20,
                MAX_MEM >> 20
            )));
        }
        let (low, high) = ram_split(mem_size);
        cfg.devices.check()?;
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!("vcpus must be between 1 and {MAX_VCPUS}")));
        }
        if cfg.regions == 0
            || cfg.regions > 8
            || !(low / cfg.regions as u64).is_multiple_of(2 << 20)
            || !high.is_multiple_of(2 << 20)
        {
            return Err(VmError::Config(
                "regions must be 1 to 8, each a multiple of 2 MiB (and RAM past 3 GiB a multiple of 2 MiB)".into(),
            ));
        }
        let kvm_h = Kvm::new().map_err(|e| VmError::NoKvm(e.to_string()))?;
        let fd = Arc::new(kvm_h.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
        match cfg.dirty {
            DirtyLogMode::Ring { entries } => {
                if !entries.is_power_of_two() || !(256..=65536).contains(&entries) {
                    return Err(VmError::Config(
                        "dirty ring entries: a power of two from 256 (one page) to 65536".into(),
                    ));
                }
                let bytes = entries as u64 * 16;
                let max = fd.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL as _);
                if (max as u64) < bytes {
                    return Err(VmError::Unsupported(format!(
                        "KVM dirty ring of {bytes} bytes (host allows {max})"
                    )));
                }
                fd.enable_cap(&kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                    args: [bytes, 0, 0, 0],
                    ..Default::default()
                })
                .map_err(kvm("enable KVM_CAP_DIRTY_LOG_RING_ACQ_REL"))?;
            }
            DirtyLogMode::Bitmap => {
                fd.enable_cap(&kvm_enable_cap {
                    cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64, 0, 0, 0],
                    ..Default::default()
                })
                .map_err(kvm("enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"))?;
            }
        }
        // `regions` equal slots of low RAM, and one slot of high RAM past the hole.
        let region = low / cfg.regions as u64;
        let mut ranges: Vec<(GuestAddress, usize)> = (0..cfg.regions as u64)
            .map(|i| (GuestAddress(i * region), region as usize))
            .collect();
        if high > 0 {
            ranges.push((GuestAddress(HIGH_RAM), high as usize));
        }
        let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| VmError::Memory(e.to_string()))?);
        let mut slots = Vec::new();
        for (i, (gpa, size)) in ranges.iter().enumerate() {
            let hva = vm_memory::GuestMemoryBackend::get_host_address(&*mem, *gpa)
                .map_err(|e| VmError::Memory(e.to_string()))?;
            kvm_sys::set_memory_region(&fd, i as u32, gpa.0, *size as u64, hva as u64, 0)
                .map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
            slots.push(Slot {
                slot: i as u32,
                gpa: gpa.0,
                size: *size as u64,
            });
        }
        fd.set_tss_address(0xfffb_d000).map_err(kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        x86::write_boot_structures(&mem).map_err(|e| VmError::Memory(e.to_string()))?;
        // Until a program is loaded, each vCPU's entry point halts: a vCPU given no program
        // waits there instead of executing zeroed memory (`hlt; jmp $-1`).
        for id in 0..cfg.vcpus {
            mem.write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(code(id)))
                .map_err(|e| VmError::Memory(e.to_string()))?;
        }

        let mut cpuid = kvm_h
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let ram_end = slots.iter().map(|s| s.gpa + s.size).max().unwrap_or(0);
        let mut dirty = CpuDirty::new(cfg.dirty, slots.clone(), ram_end / 4096);
        let bus = Arc::new(MmioBus::default());
        let port_signal = Arc::new(AtomicU64::new(0));
        kvm_sys::install_kick_handler();
        let mut fds = Vec::new();
        let mut tsc_khz = 0;
        for id in 0..cfg.vcpus {
            let vcpu = fd.create_vcpu(id as u64).map_err(kvm("KVM_CREATE_VCPU"))?;
            for e in cpuid.as_mut_slice() {
                if e.function == 1 {
                    // Initial APIC id; no XSAVE/OSXSAVE, so the legacy XSAVE area is the whole
                    // extended state (see kvm_sys::set_xsave).
                    e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
                    e.ecx &= !((1 << 26) | (1 << 27));
                }
            }
            vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
            let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&x86::long_mode_sregs(sregs))
                .map_err(kvm("KVM_SET_SREGS"))?;
            vcpu.set_regs(&x86::start_regs(id)).map_err(kvm("KVM_SET_REGS"))?;
            // With the in-kernel LAPIC every vCPU but the first would wait for INIT and SIPI
            // from a guest that sends none: each starts at its own entry point instead.
            vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm("KVM_SET_MP_STATE"))?;
            tsc_khz = vcpu.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
            if let DirtyLogMode::Ring { entries } = cfg.dirty {
                dirty.add_ring(
                    kvm_sys::DirtyRing::map(&vcpu, entries)
                        .map_err(|e| VmError::Memory(format!("mapping the dirty ring: {e}")))?,
                );
            }
            fds.push(vcpu);
        }
        let dirty = Arc::new(dirty);
        let mut vcpus = Vec::new();
        for (id, vcpu) in fds.into_iter().enumerate() {
            let ctl = Arc::new(VcpuCtl::new());
            let env = VcpuEnv {
                vm: fd.clone(),
                bus: bus.clone(),
                dirty: dirty.clone(),
                port_signal: port_signal.clone(),
            };
            let c = ctl.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run(vcpu, id, env, c))
                .map_err(|_| VmError::Internal("spawning a vCPU thread"))?;
            vcpus.push(VcpuHandle { ctl, thread: Some(t) });
        }
        let reaper = if matches!(cfg.dirty, DirtyLogMode::Ring { .. }) {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (s, d, f) = (stop.clone(), dirty.clone(), fd.clone());
            let t = std::thread::Builder::new()
                .name("dirty-reaper".into())
                .spawn(move || {
                    while !s.load(std::sync::atomic::Ordering::Acquire) {
                        std::thread::sleep(crate::dirty::REAP_INTERVAL);
                        d.reap(&f);
                    }
                })
                .map_err(|_| VmError::Internal("spawning the dirty-ring reaper"))?;
            Some((stop, t))
        } else {
            None
        };
        let mut vm = Vm {
            cfg: cfg.clone(),
            fd,
            mem,
            slots,
            bus,
            dirty,
            vcpus,
            tsc_khz,
            devices: Vec::new(),
            drivers: std::sync::Mutex::new(vec![None; cfg.vcpus as usize]),
            port_signal,
            reaper,
            _kvm: kvm_h,
        };
        for (i, a) in cfg.devices.accels.iter().enumerate() {
            let join = vm.devices.first().filter(|_| cfg.devices.shared_domain);
            let d = devices::attach(i as u32, a, join, &vm.mem, &vm.slots, &vm.bus, &vm.dirty)?;
            vm.devices.push(d);
        }
        devices::map_peer_windows(&vm.devices)?;
        Ok(vm)
    }

    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }
    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        self.cfg.mem_mib << 20
    }
    /// The guest-physical address past the last byte of RAM: what page bitmaps span. Above
    /// 3 GiB of RAM it is past the hole below 4 GiB, so it exceeds `mem_size`.
    pub fn ram_end(&self) -> u64 {
        self.slots.iter().map(|s| s.gpa + s.size).max().unwrap_or(0)
    }
    /// Whether `[start, end)` is RAM throughout (it may span adjacent slots, not the hole).
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        while at < end {
            match self.slots.iter().find(|s| s.gpa <= at && at < s.gpa + s.size) {
                Some(s) => at = s.gpa + s.size,
                None => return false,
            }
        }
        start < end
    }
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }
    pub fn vcpu_count(&self) -> u32 {
        self.cfg.vcpus
    }
    /// The TSC frequency KVM reports for the vCPUs.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }
    /// The attached devices, in configuration order.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }
    /// Its guest programs: loading them, and what they count.
    pub fn programs(&self) -> Programs<'_> {
        Programs(self)
    }
    /// Its CPU dirty log.
    pub fn cpu_dirty_log(&self) -> CpuDirtyLog<'_> {
        CpuDirtyLog(self)
    }
    /// Saving and restoring its vCPU and device state.
    pub fn snapshots(&self) -> Snapshots<'_> {
        Snapshots(self)
    }
    /// Total KVM exits handled by all vCPUs.
    pub fn exits(&self) -> u64 {
        self.vcpus
            .iter()
            .map(|v| v.ctl.exits.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Starts or resumes every vCPU; returns how long it took until all were running.
    pub fn resume(&self) -> Result<Duration, VmError> {
        for v in &self.vcpus {
            if let RunState::Stopped(s) = v.ctl.run_state() {
                return Err(VmError::VcpuStopped(s));
            }
        }
        let t = Instant::now();
        for v in &self.vcpus {
            v.resume(Duration::from_secs(2))?;
        }
        Ok(t.elapsed())
    }

    /// Pauses every vCPU; returns how long it took until all were parked.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let t = Instant::now();
        for v in &self.vcpus {
            v.ctl.pause.store(true, std::sync::atomic::Ordering::Release);
        }
        for v in &self.vcpus {
            v.pause(Duration::from_secs(2))?;
        }
        Ok(t.elapsed())
    }

    /// Whether every vCPU is running now: none paused, parked or stopped.
    pub fn running(&self) -> bool {
        self.vcpus
            .iter()
            .all(|v| matches!(v.ctl.run_state(), RunState::Running))
    }

    /// Whether any vCPU stopped on its own (shutdown, failed entry), and why.
    pub fn vcpu_stopped(&self) -> Option<VcpuStop> {
        self.vcpus.iter().find_map(|v| match v.ctl.run_state() {
            RunState::Stopped(s) => Some(s),
            _ => None,
        })
    }

    /// The last byte a guest program wrote to port 0x510.
    pub fn port_signal(&self) -> u64 {
        self.port_signal.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some((stop, t)) = self.reaper.take() {
            stop.store(true, std::sync::atomic::Ordering::Release);
            let _ = t.join();
        }
        for v in &mut self.vcpus {
            v.quit();
        }
    }
}
