//! The guest program, assembled at run time: Rust that emits x86-64 with baseline instructions
//! only (no string instructions, no CRC32 instruction). `rdi` holds the vCPU's control page on
//! entry; the program never returns and keeps its long-lived state in registers (migrated with
//! the vCPU) and guest memory.
//!
//! The program is specialised when it is assembled: only the chosen page pattern and the parts
//! that are on are emitted. That matters on nested-virtualisation hosts, where a guest may run
//! at a few million instructions per second, so every instruction per page counts.
//!
//! Registers: r15 control page, r14 working-set base, r13 working-set pages, r12 pages written
//! (the generation of the last stamp), r11 xorshift state, r10 pacing start (TSC), r9 TSC
//! ticks per page, r8 sequential cursor, rbx stamp magic, rbp batch counter. The accel step
//! spills r8–r11 and rbp to the control page.
//!
//! Dirtier: pages due = `(tsc - start) / ticks_per_page`; when behind, the missing pages are
//! written in one batch (at most [`BATCH`], the backlog capped at `C_BURST` by moving the
//! pacing start), then `K_TSC_NOW` and `K_PAGES` are published together, so
//! `pages / (tsc_now - tsc_start)` is the achieved rate. Each page gets a stamp: magic | vCPU,
//! page frame number, generation, checksum (`ctrl::stamp_checksum`).
//!
//! Accel client, once per batch or whenever the dirtier has nothing due: reap completions whose
//! phase matches, check each (status 0; tags complete in order, so each job exactly once;
//! COPY: the destination holds the stamp magic and the page number of the copied page, or
//! zeros if it was never written (not the generation or checksum: the dirtier may rewrite the
//! page while the device copies it, and a torn copy mixes two stamps of the same page); CRC32C over the slot's 16-byte source: equal to a table-driven software CRC; LZ4:
//! a length within the destination), ring the CQ doorbell; then submit while fewer than 31 are
//! outstanding (job `tag` is COPY, CRC32C or LZ4_COMPRESS by `tag % 3`; COPY and LZ4 read
//! working-set page `tag % dma_pages`, `C_DMA_PAGES` being the part of the working set the
//! device can reach) and ring the SQ doorbell once. With a peer (`C_PEER`), a CRC32C job
//! writes its result into the peer device's window instead of its own slot: peer-to-peer DMA.
//!
//! DMA writer (optional, on a second queue): the device copies [`DMA_CHUNK`]-byte chunks into
//! a working set of its own at a paced rate (`C_DMA_TICKS` per chunk), so how much memory the
//! device dirties is a knob; `K_DMA_DONE` counts the chunks it completed.

use super::ctrl::*;
use super::Pattern;
use accel::regs::{
    doorbell, DB_CQ, DB_SQ, DOORBELL, MB_CMD, MB_CQC, MB_DATA_HI, MB_DATA_LO, MB_DEPTH, MB_SQC, VF_STATE,
};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// Pages the dirtier may owe after falling behind (a pause); older debt is forgiven.
pub const DEFAULT_BURST: u64 = 4096;
/// Most pages written between two accel steps.
pub const BATCH: u32 = 256;
/// Pages per batch when the rate is unlimited.
const UNLIMITED_BATCH: u32 = 64;

/// What to assemble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub dirtier: Option<Pattern>,
    pub accel: bool,
    /// The accel-client also runs the paced DMA writer (needs `accel`).
    pub dma: bool,
}

fn xorshift(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (left, n) in [(true, 13u32), (false, 7), (true, 17)] {
        a.mov(rax, r11)?;
        if left {
            a.shl(rax, n)?;
        } else {
            a.shr(rax, n)?;
        }
        a.xor(r11, rax)?;
    }
    Ok(())
}

/// rax = TSC (clobbers rdx).
pub(super) fn read_tsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32u32)?;
    a.or(rax, rdx)?;
    Ok(())
}

/// Assembles the program for `spec` to run at guest address `at`.
pub fn assemble(at: u64, spec: Spec) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut main = a.create_label();
    let mut idle = a.create_label();
    let mut accel_step = a.create_label();

    a.mov(r15, rdi)?;
    a.mov(r14, qword_ptr(r15 + C_WS_BASE))?;
    a.mov(r13, qword_ptr(r15 + C_WS_PAGES))?;
    a.mov(r11, qword_ptr(r15 + C_SEED))?;
    a.mov(r9, qword_ptr(r15 + C_TICKS_PER_PAGE))?;
    a.mov(rbx, STAMP_MAGIC)?;
    a.or(rbx, qword_ptr(r15 + C_VCPU))?;
    a.xor(r12, r12)?;
    a.xor(r8, r8)?;
    read_tsc(&mut a)?;
    a.mov(r10, rax)?;
    a.mov(qword_ptr(r15 + K_TSC_START), r10)?;
    if spec.accel {
        // Program SQC and CQC through the mailbox, then mark the function READY.
        a.mov(rsi, qword_ptr(r15 + C_MMIO))?;
        a.mov(rdi, qword_ptr(r15 + C_AREA))?;
        let mut rings = vec![(C_QN, A_SQ, MB_SQC), (C_QN, A_CQ, MB_CQC)];
        if spec.dma {
            rings.extend([(C_DMA_QN, A_DMA_SQ, MB_SQC), (C_DMA_QN, A_DMA_CQ, MB_CQC)]);
            a.mov(qword_ptr(rdi + A_DMA_PHASE), 1i32)?;
            a.mov(qword_ptr(rdi + A_DMA_START), r10)?;
        }
        for (qn, ring, cmd) in rings {
            a.lea(rax, ptr(rdi + ring))?;
            a.mov(dword_ptr(rsi + MB_DATA_LO), eax)?;
            a.shr(rax, 32u32)?;
            a.mov(dword_ptr(rsi + MB_DATA_HI), eax)?;
            a.mov(dword_ptr(rsi + MB_DEPTH), A_DEPTH as u32)?;
            a.mov(rax, qword_ptr(r15 + qn))?;
            a.shl(eax, 16u32)?;
            a.or(eax, cmd)?;
            a.mov(dword_ptr(rsi + MB_CMD), eax)?;
        }
        a.mov(qword_ptr(rdi + A_PHASE), 1i32)?;
        a.mov(dword_ptr(rsi + VF_STATE), 1u32)?;
    }

    a.set_label(&mut main)?;
    a.nop()?; // labels must not share an instruction when parts are left out
    if let Some(pattern) = spec.dirtier {
        let mut unlimited = a.create_label();
        let mut batch = a.create_label();
        let mut page = a.create_label();
        // ---- pacing: rcx = pages to write now ----
        a.test(r9, r9)?;
        a.jz(unlimited)?;
        read_tsc(&mut a)?;
        a.sub(rax, r10)?;
        a.xor(edx, edx)?;
        a.div(r9)?;
        a.mov(rcx, rax)?;
        a.sub(rcx, r12)?;
        a.jbe(idle)?; // nothing due
        a.cmp(rcx, qword_ptr(r15 + C_BURST))?;
        let mut no_debt = a.create_label();
        a.jbe(no_debt)?;
        // Fell far behind (a pause): move the pacing start so the catch-up is bounded.
        a.sub(rcx, qword_ptr(r15 + C_BURST))?;
        a.imul_2(rcx, r9)?;
        a.add(r10, rcx)?;
        a.mov(qword_ptr(r15 + K_TSC_START), r10)?;
        a.mov(rcx, qword_ptr(r15 + C_BURST))?;
        a.set_label(&mut no_debt)?;
        a.mov(eax, BATCH)?;
        a.cmp(rcx, rax)?;
        a.cmova(rcx, rax)?;
        a.jmp(batch)?;
        a.set_label(&mut unlimited)?;
        a.mov(ecx, UNLIMITED_BATCH)?;
        a.set_label(&mut batch)?;
        a.mov(rbp, rcx)?;

        // ---- one page: index in rcx ----
        a.set_label(&mut page)?;
        match pattern {
            Pattern::Sequential => {
                let mut ok = a.create_label();
                a.mov(rcx, r8)?;
                a.inc(r8)?;
                a.cmp(r8, r13)?;
                a.jb(ok)?;
                a.xor(r8, r8)?;
                a.set_label(&mut ok)?;
                a.nop()?;
            }
            Pattern::Uniform => {
                xorshift(&mut a)?;
                a.mov(rax, r11)?;
                a.mul(r13)?;
                a.mov(rcx, rdx)?;
            }
            Pattern::HotCold { .. } => {
                let mut cold = a.create_label();
                let mut done = a.create_label();
                xorshift(&mut a)?;
                a.mov(rax, r11)?;
                a.mov(ecx, 100u32)?;
                a.mul(rcx)?; // rdx = 0..99
                a.mov(rdi, rdx)?;
                xorshift(&mut a)?;
                a.mov(rax, r11)?;
                a.cmp(rdi, qword_ptr(r15 + C_HOT_PCT))?;
                a.jae(cold)?;
                a.mul(qword_ptr(r15 + C_HOT_PAGES))?;
                a.jmp(done)?;
                a.set_label(&mut cold)?;
                a.mul(r13)?;
                a.set_label(&mut done)?;
                a.mov(rcx, rdx)?;
            }
        }
        // rdi = page address; stamp = magic, pfn, generation, checksum.
        a.mov(rdi, rcx)?;
        a.shl(rdi, 12u32)?;
        a.add(rdi, r14)?;
        a.inc(r12)?;
        a.mov(rax, rdi)?;
        a.shr(rax, 12u32)?;
        // The page number before the magic: x86 keeps stores in order, so a device copying the
        // page while it is first written sees either no magic (a page never written, accepted)
        // or the magic with its page number, never the magic with a zero page number.
        a.mov(qword_ptr(rdi + 8), rax)?;
        a.mov(qword_ptr(rdi), rbx)?;
        a.mov(qword_ptr(rdi + 16), r12)?;
        a.imul_3(rax, rax, STAMP_K1 as i32)?;
        a.imul_3(rcx, r12, STAMP_K2 as i32)?;
        a.xor(rax, rcx)?;
        a.xor(rax, rbx)?;
        a.mov(qword_ptr(rdi + 24), rax)?;
        a.dec(rbp)?;
        a.jnz(page)?;
        // Counters change once per batch: guest stores to tracked pages may each cost a
        // dirty-log fault.
        read_tsc(&mut a)?;
        a.mov(qword_ptr(r15 + K_TSC_NOW), rax)?;
        a.mov(qword_ptr(r15 + K_PAGES), r12)?;
        if spec.accel {
            a.jmp(accel_step)?;
        } else {
            a.jmp(main)?;
        }
    }

    a.set_label(&mut idle)?;
    a.nop()?;
    if spec.accel {
        a.set_label(&mut accel_step)?;
        emit_accel_step(&mut a, spec.dma)?;
    }
    a.pause()?;
    a.jmp(main)?;

    a.assemble(at)
}

/// One accel step: reap, then submit (then the DMA writer's step, with `dma`). Spills and
/// restores r8–r11 and rbp.
fn emit_accel_step(a: &mut CodeAssembler, dma: bool) -> Result<(), IcedError> {
    let mut reap = a.create_label();
    let mut reap_done = a.create_label();
    let mut bad = a.create_label();
    let mut checked = a.create_label();
    let mut kind1 = a.create_label();
    let mut kind2 = a.create_label();
    let mut no_cq_bell = a.create_label();
    let mut submit = a.create_label();
    let mut submit_done = a.create_label();
    let mut no_sq_bell = a.create_label();
    let mut crc_job = a.create_label();
    let mut sqe_out = a.create_label();

    let spill = [r8, r9, r10, r11, rbp];
    for (i, r) in spill.into_iter().enumerate() {
        a.mov(qword_ptr(r15 + S_SPILL + i as u64 * 8), r)?;
    }
    a.mov(rbp, qword_ptr(r15 + C_AREA))?;
    a.xor(r11, r11)?; // entries reaped

    // -- reap --
    a.set_label(&mut reap)?;
    a.mov(rax, qword_ptr(rbp + A_HEAD))?;
    a.shl(rax, 4u32)?;
    a.lea(rdi, ptr(rbp + rax + A_CQ))?;
    a.movzx(eax, word_ptr(rdi + 14))?;
    a.and(eax, 1i32)?;
    a.cmp(rax, qword_ptr(rbp + A_PHASE))?;
    a.jne(reap_done)?;
    a.mov(r8d, dword_ptr(rdi + 4))?; // tag
    a.cmp(r8, qword_ptr(r15 + K_COMPLETED))?; // in order: exactly once
    a.jne(bad)?;
    a.cmp(word_ptr(rdi + 12), 0i32)?;
    a.jne(bad)?;
    a.mov(r9, r8)?;
    a.and(r9, (A_DEPTH - 1) as i32)?; // slot
    a.mov(rax, r8)?;
    a.xor(edx, edx)?;
    a.mov(ecx, 3u32)?;
    a.div(rcx)?;
    a.cmp(edx, 1i32)?;
    a.je(kind1)?;
    a.cmp(edx, 2i32)?;
    a.je(kind2)?;
    // COPY: the destination starts with a valid stamp of page (tag % dma_pages), or zeros.
    a.cmp(dword_ptr(rdi), A_SRC_SIZE as i32)?;
    a.jne(bad)?;
    a.mov(rsi, r9)?;
    a.shl(rsi, 13u32)?;
    a.lea(rsi, ptr(rbp + rsi + A_DST))?;
    a.mov(rax, qword_ptr(rsi))?;
    a.test(rax, rax)?;
    a.jz(checked)?; // never-written page copied
    a.mov(rcx, rax)?;
    a.shr(rcx, 8u32)?;
    a.mov(rdx, STAMP_MAGIC >> 8)?;
    a.cmp(rcx, rdx)?;
    a.jne(bad)?;
    a.mov(rax, r8)?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(r15 + C_DMA_PAGES))?;
    a.mov(rcx, r14)?;
    a.shr(rcx, 12u32)?;
    a.add(rcx, rdx)?; // expected pfn
    a.cmp(rcx, qword_ptr(rsi + 8))?;
    a.jne(bad)?;
    a.jmp(checked)?;
    // CRC32C over the slot's 16-byte source (tag, !tag): a table-driven CRC, unrolled.
    a.set_label(&mut kind1)?;
    a.mov(eax, 0xffff_ffffu32)?;
    a.mov(rsi, r8)?;
    for byte in 0..A_CRC_LEN {
        if byte == 8 {
            a.mov(rsi, r8)?;
            a.not(rsi)?;
        }
        a.movzx(edx, sil)?;
        a.xor(dl, al)?;
        a.shr(eax, 8u32)?;
        a.xor(eax, dword_ptr(rbp + rdx * 4 + A_CRC_TABLE))?;
        a.shr(rsi, 8u32)?;
    }
    a.not(eax)?;
    a.cmp(eax, dword_ptr(rdi))?;
    a.jne(bad)?;
    a.jmp(checked)?;
    // LZ4 compress: a length within the destination.
    a.set_label(&mut kind2)?;
    a.mov(eax, dword_ptr(rdi))?;
    a.test(eax, eax)?;
    a.jz(bad)?;
    a.cmp(eax, A_DST_SIZE as i32)?;
    a.ja(bad)?;
    a.jmp(checked)?;
    a.set_label(&mut bad)?;
    a.inc(qword_ptr(r15 + K_ERRORS))?;
    a.set_label(&mut checked)?;
    a.inc(qword_ptr(r15 + K_COMPLETED))?;
    a.inc(r11)?;
    advance_cq_head(a, A_HEAD, A_PHASE)?;
    a.jmp(reap)?;
    a.set_label(&mut reap_done)?;
    a.test(r11, r11)?;
    a.jz(no_cq_bell)?;
    a.mov(rsi, qword_ptr(r15 + C_MMIO))?;
    ring_doorbell(a, rsi, C_QN, DB_CQ, A_HEAD)?;
    a.set_label(&mut no_cq_bell)?;

    // -- submit while fewer than DEPTH - 1 are outstanding --
    a.xor(r11, r11)?; // entries submitted
    a.set_label(&mut submit)?;
    a.mov(r8, qword_ptr(rbp + A_NEXT))?;
    a.mov(rax, r8)?;
    a.sub(rax, qword_ptr(r15 + K_COMPLETED))?;
    a.cmp(rax, (A_DEPTH - 1) as i32)?;
    a.jae(submit_done)?;
    a.mov(r9, r8)?;
    a.and(r9, (A_DEPTH - 1) as i32)?;
    a.mov(rdi, qword_ptr(rbp + A_TAIL))?;
    a.shl(rdi, 6u32)?;
    a.lea(rdi, ptr(rbp + rdi + A_SQ))?; // the SQE
    a.mov(rax, r9)?;
    a.shl(rax, 13u32)?;
    a.lea(rax, ptr(rbp + rax + A_DST))?;
    a.mov(qword_ptr(rdi + 16), rax)?; // destination slot
    a.mov(dword_ptr(rdi + 4), r8d)?;
    a.mov(dword_ptr(rdi + 28), A_DST_SIZE as u32)?;
    a.mov(qword_ptr(rdi + 32), 0i32)?;
    a.mov(rax, r8)?;
    a.xor(edx, edx)?;
    a.mov(ecx, 3u32)?;
    a.div(rcx)?;
    a.cmp(edx, 1i32)?;
    a.je(crc_job)?;
    // COPY (1) or LZ4_COMPRESS (3) of working-set page (tag % dma_pages).
    a.mov(r10d, 1u32)?;
    a.mov(ecx, 3u32)?;
    a.test(edx, edx)?;
    a.cmovnz(r10d, ecx)?;
    a.mov(qword_ptr(rdi), r10)?; // opcode, reserved bytes zero
    a.mov(dword_ptr(rdi + 4), r8d)?;
    a.mov(rax, r8)?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(r15 + C_DMA_PAGES))?;
    a.shl(rdx, 12u32)?;
    a.add(rdx, r14)?;
    a.mov(qword_ptr(rdi + 8), rdx)?;
    a.mov(dword_ptr(rdi + 24), A_SRC_SIZE as u32)?;
    a.jmp(sqe_out)?;
    // CRC32C over the slot's private 16 bytes: (tag, !tag).
    a.set_label(&mut crc_job)?;
    a.mov(qword_ptr(rdi), 2i32)?;
    a.mov(dword_ptr(rdi + 4), r8d)?;
    a.mov(rax, r9)?;
    a.shl(rax, 5u32)?;
    a.lea(rax, ptr(rbp + rax + A_SRC))?;
    a.mov(qword_ptr(rax), r8)?;
    a.mov(rcx, r8)?;
    a.not(rcx)?;
    a.mov(qword_ptr(rax + 8), rcx)?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    a.mov(dword_ptr(rdi + 24), A_CRC_LEN as u32)?;
    // Peer-to-peer: the CRC goes to the peer's window instead of this slot.
    a.mov(rax, qword_ptr(r15 + C_PEER))?;
    a.test(rax, rax)?;
    a.jz(sqe_out)?;
    a.mov(rcx, r8)?;
    a.and(rcx, (PEER_SLOTS - 1) as i32)?;
    a.lea(rax, ptr(rax + rcx * 4))?;
    a.mov(qword_ptr(rdi + 16), rax)?;
    a.mov(dword_ptr(rdi + 28), 4u32)?;
    a.set_label(&mut sqe_out)?;
    a.mov(rax, qword_ptr(rbp + A_TAIL))?;
    a.inc(rax)?;
    a.and(rax, (A_DEPTH - 1) as i32)?;
    a.mov(qword_ptr(rbp + A_TAIL), rax)?;
    a.inc(qword_ptr(rbp + A_NEXT))?;
    a.inc(qword_ptr(r15 + K_SUBMITTED))?;
    a.inc(r11)?;
    a.jmp(submit)?;
    a.set_label(&mut submit_done)?;
    a.test(r11, r11)?;
    a.jz(no_sq_bell)?;
    a.mov(rsi, qword_ptr(r15 + C_MMIO))?;
    ring_doorbell(a, rsi, C_QN, DB_SQ, A_TAIL)?;
    a.set_label(&mut no_sq_bell)?;
    if dma {
        emit_dma_step(a)?;
    }
    for (i, r) in spill.into_iter().enumerate() {
        a.mov(r, qword_ptr(r15 + S_SPILL + i as u64 * 8))?;
    }
    Ok(())
}

/// Rings doorbell `cmd` of the queue numbered at `[r15 + qn]` with the index at
/// `[rbp + index]`, on the register block at `mmio` (clobbers rax, rcx).
pub(super) fn ring_doorbell(
    a: &mut CodeAssembler,
    mmio: AsmRegister64,
    qn: u64,
    cmd: u64,
    index: u64,
) -> Result<(), IcedError> {
    a.mov(rax, qword_ptr(rbp + index))?;
    a.shl(rax, 32u32)?;
    a.or(rax, qword_ptr(r15 + qn))?;
    a.mov(rcx, doorbell(0, cmd, 0))?;
    a.or(rax, rcx)?;
    a.mov(qword_ptr(mmio + DOORBELL), rax)
}

/// Moves a completion-queue head at `[rbp + head]` on by one, flipping the expected phase at
/// `[rbp + phase]` when it wraps (clobbers rax).
pub(super) fn advance_cq_head(a: &mut CodeAssembler, head: u64, phase: u64) -> Result<(), IcedError> {
    let mut no_wrap = a.create_label();
    a.mov(rax, qword_ptr(rbp + head))?;
    a.inc(rax)?;
    a.and(rax, (A_DEPTH - 1) as i32)?;
    a.mov(qword_ptr(rbp + head), rax)?;
    a.jnz(no_wrap)?;
    a.xor(qword_ptr(rbp + phase), 1i32)?;
    a.set_label(&mut no_wrap)
}

/// Rings doorbell `cmd` of queue `C_DMA_QN` with the index at `[rbp + index]`.
fn dma_doorbell(a: &mut CodeAssembler, cmd: u64, index: u64) -> Result<(), IcedError> {
    a.mov(rsi, qword_ptr(r15 + C_MMIO))?;
    ring_doorbell(a, rsi, C_DMA_QN, cmd, index)
}

/// The DMA writer's step (inside the accel step: rbp is the area, r8–r11 are free). Reap its
/// completions (a status other than 0 counts an error), then submit COPY jobs of
/// [`DMA_CHUNK`] bytes while the chunks due by the TSC exceed those submitted: chunk `n`
/// goes to `C_DMA_BASE + (n % C_DMA_CHUNKS) * DMA_CHUNK`, from a 64-byte-aligned offset of
/// the area's source megabyte that moves with `n`, so a page's new contents differ from its
/// old. After a pause, at most [`DMA_BURST`] chunks are caught up.
fn emit_dma_step(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut reap = a.create_label();
    let mut reap_done = a.create_label();
    let mut ok = a.create_label();
    let mut no_cq_bell = a.create_label();
    let mut no_debt = a.create_label();
    let mut submit = a.create_label();
    let mut submit_done = a.create_label();
    let mut no_sq_bell = a.create_label();
    let mut done = a.create_label();

    a.xor(r11, r11)?;
    a.set_label(&mut reap)?;
    a.mov(rax, qword_ptr(rbp + A_DMA_HEAD))?;
    a.shl(rax, 4u32)?;
    a.lea(rdi, ptr(rbp + rax + A_DMA_CQ))?;
    a.movzx(eax, word_ptr(rdi + 14))?;
    a.and(eax, 1i32)?;
    a.cmp(rax, qword_ptr(rbp + A_DMA_PHASE))?;
    a.jne(reap_done)?;
    a.cmp(word_ptr(rdi + 12), 0i32)?;
    a.je(ok)?;
    a.inc(qword_ptr(r15 + K_ERRORS))?;
    a.set_label(&mut ok)?;
    a.inc(qword_ptr(r15 + K_DMA_DONE))?;
    a.inc(r11)?;
    advance_cq_head(a, A_DMA_HEAD, A_DMA_PHASE)?;
    a.jmp(reap)?;
    a.set_label(&mut reap_done)?;
    a.test(r11, r11)?;
    a.jz(no_cq_bell)?;
    dma_doorbell(a, DB_CQ, A_DMA_HEAD)?;
    a.set_label(&mut no_cq_bell)?;

    // -- pacing: r10 = chunks due in all --
    read_tsc(a)?;
    a.sub(rax, qword_ptr(rbp + A_DMA_START))?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(r15 + C_DMA_TICKS))?;
    a.mov(r10, rax)?;
    a.mov(rcx, rax)?;
    a.sub(rcx, qword_ptr(r15 + K_DMA_SUBMITTED))?;
    a.jbe(done)?;
    a.cmp(rcx, DMA_BURST as i32)?;
    a.jbe(no_debt)?;
    // Fell far behind (a pause): move the pacing start so the catch-up is bounded.
    a.sub(rcx, DMA_BURST as i32)?;
    a.imul_2(rcx, qword_ptr(r15 + C_DMA_TICKS))?;
    a.add(qword_ptr(rbp + A_DMA_START), rcx)?;
    a.mov(r10, qword_ptr(r15 + K_DMA_SUBMITTED))?;
    a.add(r10, DMA_BURST as i32)?;
    a.set_label(&mut no_debt)?;

    // -- submit while due and fewer than DEPTH - 1 are outstanding --
    a.xor(r11, r11)?;
    a.set_label(&mut submit)?;
    a.mov(r8, qword_ptr(r15 + K_DMA_SUBMITTED))?;
    a.cmp(r8, r10)?;
    a.jae(submit_done)?;
    a.mov(rax, r8)?;
    a.sub(rax, qword_ptr(r15 + K_DMA_DONE))?;
    a.cmp(rax, (A_DEPTH - 1) as i32)?;
    a.jae(submit_done)?;
    a.mov(rdi, qword_ptr(rbp + A_DMA_TAIL))?;
    a.shl(rdi, 6u32)?;
    a.lea(rdi, ptr(rbp + rdi + A_DMA_SQ))?;
    a.mov(qword_ptr(rdi), 1i32)?; // COPY, reserved bytes zero
    a.mov(dword_ptr(rdi + 4), r8d)?;
    a.imul_3(rax, r8, 0x1040i32)?;
    a.and(eax, ((A_DMA_SRC_SIZE - DMA_CHUNK - 1) & !63) as i32)?;
    a.lea(rax, ptr(rbp + rax + A_DMA_SRC))?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    a.mov(rax, r8)?;
    a.xor(edx, edx)?;
    a.div(qword_ptr(r15 + C_DMA_CHUNKS))?;
    a.shl(rdx, DMA_CHUNK.trailing_zeros())?;
    a.add(rdx, qword_ptr(r15 + C_DMA_BASE))?;
    a.mov(qword_ptr(rdi + 16), rdx)?;
    a.mov(dword_ptr(rdi + 24), DMA_CHUNK as u32)?;
    a.mov(dword_ptr(rdi + 28), DMA_CHUNK as u32)?;
    a.mov(qword_ptr(rdi + 32), 0i32)?;
    a.mov(rax, qword_ptr(rbp + A_DMA_TAIL))?;
    a.inc(rax)?;
    a.and(rax, (A_DEPTH - 1) as i32)?;
    a.mov(qword_ptr(rbp + A_DMA_TAIL), rax)?;
    a.inc(qword_ptr(r15 + K_DMA_SUBMITTED))?;
    a.inc(r11)?;
    a.jmp(submit)?;
    a.set_label(&mut submit_done)?;
    a.test(r11, r11)?;
    a.jz(no_sq_bell)?;
    dma_doorbell(a, DB_SQ, A_DMA_TAIL)?;
    a.set_label(&mut no_sq_bell)?;
    a.nop()?;
    a.set_label(&mut done)?;
    a.nop()
}
