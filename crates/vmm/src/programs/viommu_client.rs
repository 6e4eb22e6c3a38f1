//! The vIOMMU client: a guest driver that keeps the accelerator busy on buffers it maps and
//! unmaps all the time through the VM's vIOMMU (`docs/viommu.md#the-guest-program`).
//!
//! Setup: map the submission and completion rings at the first two pages of the IOVA window
//! (`C_VIOMMU_IOVA`), program the queue contexts with those IOVAs, mark the function READY.
//! Then, forever, over [`SLOTS`] buffer slots (slot `s` at IOVA window + (2 + s) pages):
//!
//! 1. reap completions: each must have status 0 and its buffer, read by the CPU at the
//!    guest-physical page the slot was mapped to, must hold the job's fill pattern; then the
//!    slot is free;
//! 2. take the slot of the next tag; if its job is still running, go back to 1. Otherwise
//!    unmap its IOVA (when it was mapped before), map the same IOVA to another page of the
//!    pool, and submit a FILL job of that page with a pattern derived from the tag.
//!
//! With a pace (`C_VIOMMU_TICKS`), step 2 waits until the job is due: jobs (and so remaps)
//! `due = (tsc - start) / ticks`, as the dirtier paces pages.
//!
//! So an IOVA is reused for different guest pages, and a buffer is unmapped while the jobs on
//! the other slots are in flight. Each slot cycles through its own pages of the pool, so no
//! two jobs in flight share a page.
//!
//! Nested mode: a map writes the VT-d first-stage leaf in the table the firmware set up; an
//! unmap clears it, then queues a PASID-based IOTLB invalidation of the page and a wait
//! descriptor, writes the tail register (the VMM runs the queue in that exit), and checks the
//! wait's status. Shadow mode: a virtio-iommu MAP or UNMAP request written in the vIOMMU area,
//! its address written to the REQ register, its status checked.
//!
//! Registers: r15 control page, rbp accel area (ring state), r14 vIOMMU area, r13 accel MMIO,
//! r12 vIOMMU MMIO, rbx next tag, r11 invalidation-queue tail (nested).

use super::ctrl::*;
use super::workload::{advance_cq_head, read_tsc, ring_doorbell};
use crate::viommu::{area, virtio, IQA, IQT, REQ};
use accel::regs::{DB_CQ, DB_SQ, MB_CMD, MB_CQC, MB_DATA_HI, MB_DATA_LO, MB_DEPTH, MB_SQC, VF_STATE};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Buffer slots: jobs in flight at most.
pub const SLOTS: u64 = 8;
/// Pool pages each slot cycles through.
pub const PAGES_PER_SLOT: u64 = area::POOL_PAGES / SLOTS;
/// Stage-1 leaf for a guest page: XD | U/S | R/W | P (A and D left to the IOMMU).
const S1_LEAF_RW: u64 = 0x8000_0000_0000_0007;

/// Which vIOMMU the client drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No vIOMMU: the VMM mapped all RAM at IOVA = GPA, so a map or unmap is nothing and a
    /// buffer's IOVA is its guest-physical address. The same jobs and checks, the baseline
    /// `livemig bench viommu` compares the two designs with.
    Off,
    Nested,
    Shadow,
}

/// map_page: rdi = IOVA, rsi = GPA. Clobbers rax, rcx.
fn emit_map(a: &mut CodeAssembler, mode: Mode) -> Result<(), IcedError> {
    match mode {
        Mode::Off => {}
        Mode::Nested => {
            a.mov(rax, rdi)?;
            a.shr(rax, 12u32)?;
            a.and(eax, 511i32)?;
            a.mov(rcx, S1_LEAF_RW)?;
            a.or(rcx, rsi)?;
            a.mov(qword_ptr(r14 + rax * 8 + area::S1_LEAF), rcx)?;
        }
        Mode::Shadow => {
            a.mov(qword_ptr(r14 + area::REQ), virtio::T_MAP as i32)?;
            a.mov(qword_ptr(r14 + area::REQ + 8), rdi)?;
            a.lea(rax, ptr(rdi + 4095))?;
            a.mov(qword_ptr(r14 + area::REQ + 16), rax)?;
            a.mov(qword_ptr(r14 + area::REQ + 24), rsi)?;
            a.mov(dword_ptr(r14 + area::REQ + 32), virtio::MAP_READ | virtio::MAP_WRITE)?;
            emit_request(a, virtio::MAP_STATUS as u64)?;
        }
    }
    Ok(())
}

/// unmap_page: rdi = IOVA. Clobbers rax, rcx, rdx.
fn emit_unmap(a: &mut CodeAssembler, mode: Mode) -> Result<(), IcedError> {
    match mode {
        Mode::Off => return Ok(()),
        Mode::Nested => {
            let mut ok = a.create_label();
            a.mov(rax, rdi)?;
            a.shr(rax, 12u32)?;
            a.and(eax, 511i32)?;
            a.mov(qword_ptr(r14 + rax * 8 + area::S1_LEAF), 0i32)?;
            // P_IOTLB, page-selective (granularity 3), one page: qw0 = 0x36, qw1 = IOVA.
            a.mov(rax, r11)?;
            a.shl(rax, 4u32)?;
            a.lea(rcx, ptr(r14 + rax + area::IQ))?;
            a.mov(qword_ptr(rcx), 0x36i32)?;
            a.mov(qword_ptr(rcx + 8), rdi)?;
            // Wait with status write and fence: data = the tag, at WAIT_STATUS.
            a.mov(rax, rbx)?;
            a.shl(rax, 32u32)?;
            a.or(rax, 0x65i32)?;
            a.mov(qword_ptr(rcx + 16), rax)?;
            a.lea(rax, ptr(r14 + area::WAIT_STATUS))?;
            a.mov(qword_ptr(rcx + 24), rax)?;
            a.add(r11, 2i32)?;
            a.and(r11, (area::IQ_ENTRIES - 1) as i32)?;
            a.mov(rax, r11)?;
            a.shl(rax, 4u32)?;
            a.mov(qword_ptr(r12 + IQT), rax)?;
            a.cmp(dword_ptr(r14 + area::WAIT_STATUS), ebx)?;
            a.je(ok)?;
            a.inc(qword_ptr(r15 + K_ERRORS))?;
            a.set_label(&mut ok)?;
        }
        Mode::Shadow => {
            a.mov(qword_ptr(r14 + area::REQ), virtio::T_UNMAP as i32)?;
            a.mov(qword_ptr(r14 + area::REQ + 8), rdi)?;
            a.lea(rax, ptr(rdi + 4095))?;
            a.mov(qword_ptr(r14 + area::REQ + 16), rax)?;
            a.mov(dword_ptr(r14 + area::REQ + 24), 0i32)?;
            emit_request(a, virtio::UNMAP_STATUS as u64)?;
        }
    }
    a.inc(qword_ptr(r15 + K_REMAPS))?;
    Ok(())
}

/// Sends the request at `area::REQ` (status byte at `status`) and counts a failure.
fn emit_request(a: &mut CodeAssembler, status: u64) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.mov(byte_ptr(r14 + area::REQ + status), 0xffu32)?;
    a.lea(rax, ptr(r14 + area::REQ))?;
    a.mov(qword_ptr(r12 + REQ), rax)?;
    a.cmp(byte_ptr(r14 + area::REQ + status), virtio::S_OK as u32)?;
    a.je(ok)?;
    a.inc(qword_ptr(r15 + K_ERRORS))?;
    a.set_label(&mut ok)?;
    Ok(())
}

/// Assembles the client for `mode` to run at guest address `at`.
pub fn assemble(at: u64, mode: Mode) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut main = a.create_label();
    let mut reap = a.create_label();
    let mut reap_done = a.create_label();
    let mut bad = a.create_label();
    let mut checked = a.create_label();
    let mut no_cq_bell = a.create_label();
    let mut fresh = a.create_label();

    a.mov(r15, rdi)?;
    a.mov(rbp, qword_ptr(r15 + C_AREA))?;
    a.mov(r14, qword_ptr(r15 + C_VIOMMU_AREA))?;
    a.mov(r13, qword_ptr(r15 + C_MMIO))?;
    a.mov(r12, qword_ptr(r15 + C_VIOMMU_MMIO))?;
    a.xor(ebx, ebx)?;
    a.xor(r11d, r11d)?;
    read_tsc(&mut a)?;
    a.mov(qword_ptr(r15 + K_TSC_START), rax)?;
    if mode == Mode::Nested {
        // The invalidation queue: one page of 128-bit descriptors (QS = 0, DW = 0).
        a.lea(rax, ptr(r14 + area::IQ))?;
        a.mov(qword_ptr(r12 + IQA), rax)?;
    }
    // The rings at the first two pages of the window, then their contexts, then READY.
    for (page, ring, cmd) in [(0u64, A_SQ, MB_SQC), (1, A_CQ, MB_CQC)] {
        if mode == Mode::Off {
            a.lea(rax, ptr(rbp + ring))?;
        } else {
            a.mov(rdi, qword_ptr(r15 + C_VIOMMU_IOVA))?;
            a.add(rdi, (page * 4096) as i32)?;
            a.lea(rsi, ptr(rbp + ring))?;
            emit_map(&mut a, mode)?;
            a.mov(rax, qword_ptr(r15 + C_VIOMMU_IOVA))?;
            a.add(rax, (page * 4096) as i32)?;
        }
        a.mov(dword_ptr(r13 + MB_DATA_LO), eax)?;
        a.shr(rax, 32u32)?;
        a.mov(dword_ptr(r13 + MB_DATA_HI), eax)?;
        a.mov(dword_ptr(r13 + MB_DEPTH), A_DEPTH as u32)?;
        a.mov(rax, qword_ptr(r15 + C_QN))?;
        a.shl(eax, 16u32)?;
        a.or(eax, cmd)?;
        a.mov(dword_ptr(r13 + MB_CMD), eax)?;
    }
    a.mov(qword_ptr(rbp + A_PHASE), 1i32)?;
    a.mov(dword_ptr(r13 + VF_STATE), 1u32)?;

    a.set_label(&mut main)?;
    // -- reap: r8 counts entries reaped --
    a.xor(r8d, r8d)?;
    a.set_label(&mut reap)?;
    a.mov(rax, qword_ptr(rbp + A_HEAD))?;
    a.shl(rax, 4u32)?;
    a.lea(rdi, ptr(rbp + rax + A_CQ))?;
    a.movzx(eax, word_ptr(rdi + 14))?;
    a.and(eax, 1i32)?;
    a.cmp(rax, qword_ptr(rbp + A_PHASE))?;
    a.jne(reap_done)?;
    a.mov(r9d, dword_ptr(rdi + 4))?; // tag
    a.and(r9, (SLOTS - 1) as i32)?;
    a.shl(r9, 5u32)?;
    a.lea(r9, ptr(r14 + r9 + area::SLOTS))?; // the slot's state
    a.cmp(word_ptr(rdi + 12), 0i32)?;
    a.jne(bad)?;
    a.mov(rsi, qword_ptr(r9))?; // its guest page, read by the CPU
    a.mov(rax, qword_ptr(rsi))?;
    a.cmp(rax, qword_ptr(r9 + 8))?;
    a.jne(bad)?;
    a.mov(rax, qword_ptr(rsi + 4088))?;
    a.cmp(rax, qword_ptr(r9 + 8))?;
    a.je(checked)?;
    a.set_label(&mut bad)?;
    a.inc(qword_ptr(r15 + K_ERRORS))?;
    a.set_label(&mut checked)?;
    a.mov(qword_ptr(r9 + 16), 0i32)?; // free
    a.inc(qword_ptr(r15 + K_COMPLETED))?;
    a.inc(r8)?;
    advance_cq_head(&mut a, A_HEAD, A_PHASE)?;
    a.jmp(reap)?;
    a.set_label(&mut reap_done)?;
    a.test(r8, r8)?;
    a.jz(no_cq_bell)?;
    ring_doorbell(&mut a, r13, C_QN, DB_CQ, A_HEAD)?;
    a.set_label(&mut no_cq_bell)?;

    // -- paced: is the next job due? --
    let mut due = a.create_label();
    a.cmp(qword_ptr(r15 + C_VIOMMU_TICKS), 0i32)?;
    a.je(due)?;
    read_tsc(&mut a)?;
    a.sub(rax, qword_ptr(r15 + K_TSC_START))?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(r15 + C_VIOMMU_TICKS))?;
    a.cmp(rbx, rax)?;
    a.jae(main)?;
    a.set_label(&mut due)?;

    // -- the next tag's slot: r9 its state, r10 its IOVA --
    a.mov(r9, rbx)?;
    a.and(r9, (SLOTS - 1) as i32)?;
    a.lea(r10, ptr(r9 + 2))?;
    a.shl(r10, 12u32)?;
    a.add(r10, qword_ptr(r15 + C_VIOMMU_IOVA))?;
    a.shl(r9, 5u32)?;
    a.lea(r9, ptr(r14 + r9 + area::SLOTS))?;
    a.cmp(qword_ptr(r9 + 16), 0i32)?;
    a.jne(main)?; // its job still runs
    a.cmp(qword_ptr(r9 + 24), 0i32)?;
    a.je(fresh)?;
    a.mov(rdi, r10)?;
    emit_unmap(&mut a, mode)?;
    a.set_label(&mut fresh)?;
    // Its next page: pool + (slot + SLOTS × (generation % PAGES_PER_SLOT)) pages.
    a.mov(rax, qword_ptr(r9 + 24))?;
    a.xor(edx, edx)?;
    a.mov(ecx, PAGES_PER_SLOT as u32)?;
    a.div(rcx)?;
    a.shl(rdx, SLOTS.trailing_zeros())?;
    a.mov(rax, rbx)?;
    a.and(rax, (SLOTS - 1) as i32)?;
    a.add(rdx, rax)?;
    a.shl(rdx, 12u32)?;
    a.lea(rsi, ptr(r14 + rdx + area::POOL))?;
    a.mov(qword_ptr(r9), rsi)?;
    a.inc(qword_ptr(r9 + 24))?;
    a.mov(rdi, r10)?;
    emit_map(&mut a, mode)?;
    if mode == Mode::Off {
        a.mov(r10, rsi)?; // the buffer's address is its guest-physical one
    }
    // The pattern: (tag & 0x7f) | 1 in every byte.
    a.mov(rax, rbx)?;
    a.and(eax, 0x7fi32)?;
    a.or(eax, 1i32)?;
    a.mov(rcx, 0x0101_0101_0101_0101u64)?;
    a.imul_2(rcx, rax)?;
    a.mov(qword_ptr(r9 + 8), rcx)?;
    a.mov(qword_ptr(r9 + 16), 1i32)?; // busy
                                      // The SQE: FILL 4096 bytes at the slot's IOVA.
    a.mov(rdi, qword_ptr(rbp + A_TAIL))?;
    a.shl(rdi, 6u32)?;
    a.lea(rdi, ptr(rbp + rdi + A_SQ))?;
    a.mov(qword_ptr(rdi), 5i32)?;
    a.mov(dword_ptr(rdi + 4), ebx)?;
    a.mov(qword_ptr(rdi + 8), 0i32)?;
    a.mov(qword_ptr(rdi + 16), r10)?;
    a.mov(dword_ptr(rdi + 24), 0i32)?;
    a.mov(dword_ptr(rdi + 28), 4096u32)?;
    a.mov(qword_ptr(rdi + 32), rax)?;
    a.mov(rax, qword_ptr(rbp + A_TAIL))?;
    a.inc(rax)?;
    a.and(rax, (A_DEPTH - 1) as i32)?;
    a.mov(qword_ptr(rbp + A_TAIL), rax)?;
    ring_doorbell(&mut a, r13, C_QN, DB_SQ, A_TAIL)?;
    // Counted after the doorbell: a count the device has not been told of would never finish.
    a.inc(qword_ptr(r15 + K_SUBMITTED))?;
    a.inc(rbx)?;
    a.jmp(main)?;

    a.assemble(at)
}
