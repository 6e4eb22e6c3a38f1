//! Starting a vCPU directly in 64-bit long mode: identity page tables, GDT, control
//! registers, EFER and CPUID (`docs/vmm.md#long-mode`, `docs/vmm.md#guest-page-tables`,
//! `docs/vmm.md#other-vm-setup`).

use crate::layout::*;
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PTE_P: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT: null, code (64-bit, present, accessed), data (present, accessed), TSS (busy).
pub const GDT_ENTRIES: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_0067];

/// Writes the page tables and the GDT.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, d) in GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT + i as u64 * 8))?;
    }
    mem.write_obj(PDPT | PTE_P | PTE_RW | PTE_A, GuestAddress(PML4))?;
    for i in 0..PD_COUNT {
        let pd = PD + i * 4096;
        mem.write_obj(pd | PTE_P | PTE_RW | PTE_A, GuestAddress(PDPT + i * 8))?;
        let mut entries = [0u8; 4096];
        for j in 0..512u64 {
            let e = (i << 30) | (j << 21) | PTE_P | PTE_RW | PTE_PS | PTE_A | PTE_D;
            entries[j as usize * 8..j as usize * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode special registers for a vCPU (segments from the GDT above).
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let code = segment(0x08, 0xb, 1, 0);
    let data = segment(0x10, 0x3, 0, 1);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        ..code
    };
    s.gdt = kvm_dtable {
        base: GDT,
        limit: (GDT_ENTRIES.len() * 8 - 1) as u16,
        padding: [0; 3],
    };
    s.idt = kvm_dtable {
        base: 0,
        limit: 0,
        padding: [0; 3],
    };
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    s.cr3 = PML4;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// General registers to start `vcpu`'s program, interrupts off.
pub fn start_regs(vcpu: u32) -> kvm_regs {
    kvm_regs {
        rip: code(vcpu),
        rsp: stack_top(vcpu),
        rflags: 0x2,
        rdi: ctrl_page(vcpu),
        ..Default::default()
    }
}
