//! Where things live in guest-physical memory. Guest RAM starts at 0; the accelerator's
//! registers sit in the hole below 4 GiB.
//!
//! | GPA | size | contents |
//! |---|---|---|
//! | 0x0000_0500 | 32 B | GDT: null, 64-bit code, data, TSS |
//! | 0x0000_9000 | 4 KiB | PML4 |
//! | 0x0000_a000 | 4 KiB | PDPT |
//! | 0x0030_0000 | 64 KiB | 16 page directories: identity map of 0–16 GiB with 2 MiB pages |
//! | 0x0001_0000 | 4 KiB × vCPU | per-vCPU control page: program config and counters ([`crate::programs::ctrl`]) |
//! | 0x0008_0000 | 4 KiB × vCPU | per-vCPU stacks (top of each page) |
//! | 0x0010_0000 | 64 KiB × vCPU | per-vCPU program code |
//! | 0x0040_0000 | 4 MiB × device | each accel-client's rings, buffers and CRC table (device 0, 1, 2); from + 2 MiB, the vIOMMU client's tables, queue and buffer pool ([`viommu_area`]) |
//! | 0x0100_0000 | to the end of low RAM | the dirtier's working sets, then the DMA writers' |
//! | 0xc000_0000 | to 4 GiB | the hole: no RAM ([`LOW_RAM_MAX`]) |
//! | 0xd000_0000 | 64 KiB × device | each accelerator's MMIO registers (`accel::regs`), its peer window at + 0x2000 |
//! | 0xd800_0000 | 4 KiB × device | the vIOMMU in front of each accelerator, when it has one (`crate::viommu`) |
//! | 0x1_0000_0000 | the rest of RAM | high RAM, for a guest of more than 3 GiB ([`HIGH_RAM`]) |
//!
//! The device sees guest RAM at IOVA = GPA except inside its IOMMU's reserved regions, which
//! stay unmapped in the IOAS: on Arm the SMMU driver's software MSI window
//! `[0x0800_0000, 0x0810_0000)` falls inside RAM of more than 128 MiB, and RAM there is
//! reachable by the vCPUs only (the dirtier may write it; the accel-client never DMAs there).
//! The x86 interrupt window `[0xfee0_0000, 0xfef0_0000)` lies above the largest RAM.
//! With several devices, each device's IOAS also maps every other device's peer window at the
//! window's guest-physical address ([`peer_window`]): that is the peer-to-peer path.
//! Page-table entries are created with Accessed (and, for leaves, Dirty) already set, and GDT
//! descriptors with Accessed set, so the CPU never writes them: the only pages the guest
//! dirties are the ones its programs store to.

pub const GDT: u64 = 0x500;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0x30_0000;
/// Page directories, 1 GiB each: the identity map covers `[0, PD_COUNT GiB)`, past the end of
/// the largest guest's high RAM.
pub const PD_COUNT: u64 = 16;
pub const CTRL_BASE: u64 = 0x1_0000;
pub const STACK_BASE: u64 = 0x8_0000;
pub const CODE_BASE: u64 = 0x10_0000;
pub const CODE_SIZE: u64 = 0x1_0000;
pub const ACCEL_AREA: u64 = 0x40_0000;
pub const ACCEL_AREA_SIZE: u64 = 0x40_0000;
pub const WORKSET_BASE: u64 = 0x100_0000;
pub const ACCEL_MMIO: u64 = 0xd000_0000;
/// Most devices the layout has room for: their clients' areas fill 4 to 16 MiB.
pub const MAX_DEVICES: u32 = 3;
/// Most vCPUs the layout has room for.
pub const MAX_VCPUS: u32 = 32;
/// Smallest guest RAM the layout fits in.
pub const MIN_MEM: u64 = WORKSET_BASE + (2 << 20);
/// RAM below 4 GiB ends here at most; the rest of the 32-bit space is the hole for the
/// accelerators' registers, the interrupt windows and KVM's TSS area.
pub const LOW_RAM_MAX: u64 = 0xc000_0000;
/// Where the RAM past [`LOW_RAM_MAX`] goes.
pub const HIGH_RAM: u64 = 1 << 32;
/// The memory ceiling, 8 GiB: a migration on one host holds the guest twice (source and
/// destination), and two 8 GiB guests with their buffers fit the 24 GiB machine this was
/// built on with room to spare. The destination also refuses a guest bigger than the memory
/// its host has available.
pub const MAX_MEM: u64 = 8 << 30;

/// Guest RAM of `mem` bytes split as the layout puts it: `(low, high)`, low from 0, high from
/// [`HIGH_RAM`].
pub fn ram_split(mem: u64) -> (u64, u64) {
    let low = mem.min(LOW_RAM_MAX);
    (low, mem - low)
}

pub fn ctrl_page(vcpu: u32) -> u64 {
    CTRL_BASE + vcpu as u64 * 4096
}
pub fn stack_top(vcpu: u32) -> u64 {
    STACK_BASE + (vcpu as u64 + 1) * 4096
}
pub fn code(vcpu: u32) -> u64 {
    CODE_BASE + vcpu as u64 * CODE_SIZE
}

/// Where device `dev`'s registers sit.
pub fn accel_mmio(dev: u32) -> u64 {
    ACCEL_MMIO + dev as u64 * accel::regs::MMIO_SIZE
}
/// Where device `dev`'s peer window sits, in guest-physical and IOVA space alike.
pub fn peer_window(dev: u32) -> u64 {
    accel_mmio(dev) + accel::regs::PEER_WINDOW
}
/// Where the vIOMMU in front of device `dev` has its registers.
pub fn viommu_mmio(dev: u32) -> u64 {
    VIOMMU_MMIO + dev as u64 * 4096
}
pub const VIOMMU_MMIO: u64 = 0xd800_0000;

/// The upper half of device `dev`'s accel area, where the vIOMMU client keeps its stage-1
/// tables, invalidation queue, requests and buffer pool (`crate::viommu`).
pub fn viommu_area(dev: u32) -> u64 {
    accel_area(dev) + VIOMMU_AREA_OFFSET
}
pub const VIOMMU_AREA_OFFSET: u64 = 0x20_0000;
/// The IOVA window the vIOMMU client maps its rings and buffers in: one leaf table's worth.
pub const VIOMMU_IOVA: u64 = 0x80_0000_0000;
pub const VIOMMU_IOVA_SIZE: u64 = 2 << 20;

/// The area the accel-client driving device `dev` keeps its rings and buffers in.
pub fn accel_area(dev: u32) -> u64 {
    ACCEL_AREA + dev as u64 * ACCEL_AREA_SIZE
}
