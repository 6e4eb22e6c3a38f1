//! Building the VM the source announced, after checking that this host can hold it.

use super::DestOptions;
use crate::error::MigError;
use crate::msg::VmConfigMsg;
use vmm::{DeviceSet, DirtyLogMode, Vm, VmConfig};

/// Most page connections a destination accepts.
pub const MAX_CHANNELS: u16 = 64;

/// Memory this host can still give a new VM, from `/proc/meminfo` (`MemAvailable`).
fn available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses, before anything is allocated, a VM this side cannot build or hold.
pub(super) fn check_config(cfg: &VmConfigMsg) -> Result<(), MigError> {
    let max_mib = vmm::layout::MAX_MEM >> 20;
    let Some(bytes) = cfg.mem_mib.checked_mul(1 << 20).filter(|_| cfg.mem_mib <= max_mib) else {
        return Err(MigError::Incompatible(format!(
            "the source's VM has {} MiB of RAM; this VMM builds at most {max_mib} MiB",
            cfg.mem_mib
        )));
    };
    if let Some(avail) = available_bytes() {
        if bytes > avail {
            return Err(MigError::Incompatible(format!(
                "the source's VM has {} MiB of RAM; this host has {} MiB available",
                cfg.mem_mib,
                avail >> 20
            )));
        }
    }
    if cfg.vcpus == 0 || cfg.vcpus > vmm::layout::MAX_VCPUS {
        return Err(MigError::Incompatible(format!(
            "the source's VM has {} vCPUs; this VMM runs 1 to {}",
            cfg.vcpus,
            vmm::layout::MAX_VCPUS
        )));
    }
    if cfg.channels > MAX_CHANNELS {
        return Err(MigError::Incompatible(format!(
            "{} page connections asked for; at most {MAX_CHANNELS}",
            cfg.channels
        )));
    }
    let total: u64 = cfg.regions.iter().map(|r| r.1).sum();
    if total != bytes {
        return Err(MigError::Incompatible(format!(
            "the memory map holds {total:#x} bytes, not the {} MiB announced",
            cfg.mem_mib
        )));
    }
    Ok(())
}

pub(super) fn build_vm(cfg: &VmConfigMsg, opts: &DestOptions) -> Result<Vm, MigError> {
    let devices = DeviceSet::decode(&cfg.devices, opts.dev_id)
        .map_err(|e| MigError::Incompatible(format!("the source's devices: {e}")))?;
    let vm = Vm::new(VmConfig {
        mem_mib: cfg.mem_mib,
        // Low-RAM slots: the slot past the hole comes with the size.
        regions: cfg.regions.iter().filter(|r| r.0 < vmm::layout::HIGH_RAM).count() as u32,
        vcpus: cfg.vcpus,
        dirty: DirtyLogMode::Bitmap,
        devices,
    })
    .map_err(|e| MigError::Incompatible(format!("cannot build the announced VM: {}", MigError::Vm(e).chain())))?;
    let mine: Vec<(u64, u64)> = vm.slots().iter().map(|s| (s.gpa, s.size)).collect();
    if mine != cfg.regions {
        return Err(MigError::Incompatible(format!(
            "memory map {:x?} differs from this VM's {mine:x?}",
            cfg.regions
        )));
    }
    // This VM first-touches most of its RAM while receiving; on a nested host every 4 KiB
    // first-touch fault costs microseconds, and during the final round they add to downtime.
    vm.prefer_huge_pages()?;
    Ok(vm)
}
