//! The accelerator's VFIO migration driver, modelled on hisi_acc_vfio_pci (`docs/accel.md`).
//!
//! Save stream layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `0xAACCFEEDDECADEDE` |
//! | 8 | 4 | qp_num |
//! | 12 | 4 | dev_id |
//! | 16 | 4 | que_iso_cfg |
//! | 20 | 4 | qp_base |
//! | 24 | 4 | vf_qm_state: 0 READY, 1 NOT_READY, as when this migration's first save began |
//! | 28 | 2+2 | major version 2, minor version 0 |
//! | 32 | 8 | reserved, 0 |
//! | 40 | 20 | registers: VF_STATE, MB_DATA_LO, MB_DATA_HI, MB_DEPTH, MB_STATUS (READY at the stop only) |
//! | 60 | 8 | jobs completed (READY only) |
//! | 68 | 44 × qp_num | per queue (READY only): sq_base u64, sq_depth u32, cq_base u64, cq_depth u32, sq_head, sq_tail, cq_head, cq_tail, cq_phase (u32 each) |
//! | then | 4096 | the peer window (`regs::PEER_WINDOW`), always |
//! | end − 4 | 4 | CRC32C of everything before |
//!
//! The first 40 bytes are the match prefix: pre-copy sends only them (`initial_bytes = 40`,
//! `dirty_bytes = 0`), and the destination checks them inside `write()` as soon as it has them,
//! refusing a different magic, major version, qp_num, dev_id or que_iso_cfg with `EFAULT`
//! while the source still runs. The state's length says what follows the prefix: a device
//! whose guest driver had not set VF_STATE READY when it stopped saves no registers or queues,
//! only its peer window (hisi saves the prefix alone; this device has memory to keep).
//!
//! One migration sends one prefix: the one saved first (at PRE_COPY, or at the stop) is reused
//! by every later save until the device runs again, so the stop-copy stream continues the
//! pre-copy one consistently even if the guest set READY in between, and a stopped device saved
//! twice saves the same bytes. A loaded device keeps the prefix it loaded, for the same reason.
//!
//! Version 2 added the peer window. Peers write it by DMA whatever state this device is in,
//! so a save is only complete if every peer had stopped initiating DMA (RUNNING_P2P) before
//! this device stopped.

use crate::device::{Queue, Regs, Shared};
use crate::regs::{PEER_WINDOW_SIZE, VF_STATE_READY};
use iommu::errno::*;
use iommu::Errno;
use std::sync::Arc;
use vfio::{DmaLog, DmaLogging, MigFlags, MigState, MigrationDriver, PrecopyInfo, StreamKind};
use MigState::*;

pub const MAGIC: u64 = 0xAACC_FEED_DECA_DEDE;
pub const MAJOR: u16 = 2;
pub const MINOR: u16 = 0;
pub const MATCH_SIZE: usize = 40;
const QUEUE_SIZE: usize = 44;

/// Full save-stream length for `qp_num` queues (a device that was READY when it stopped).
pub fn state_len(qp_num: u32) -> usize {
    MATCH_SIZE + 20 + 8 + QUEUE_SIZE * qp_num as usize + PEER_WINDOW_SIZE as usize + 4
}

/// Save-stream length of a device that was not READY when it stopped: the prefix, its peer
/// window and the CRC.
pub const NOT_READY_LEN: usize = MATCH_SIZE + PEER_WINDOW_SIZE as usize + 4;

pub(crate) struct AccelMigration {
    s: Arc<Shared>,
    log: Arc<DmaLog>,
    save: Vec<u8>,
    pos: usize,
    resume: Vec<u8>,
    match_done: bool,
    /// This migration's prefix, once saved or loaded; dropped when the device runs again.
    sent_prefix: Option<Vec<u8>>,
}

impl AccelMigration {
    pub fn new(s: Arc<Shared>) -> Self {
        Self {
            log: s.log.clone(),
            s,
            save: Vec::new(),
            pos: 0,
            resume: Vec::new(),
            match_done: false,
            sent_prefix: None,
        }
    }

    /// This migration's prefix: the one already sent, or the present one, kept from now on.
    fn this_prefix(&mut self) -> Vec<u8> {
        if self.sent_prefix.is_none() {
            let ready = self.s.lock().regs.vf_state & VF_STATE_READY != 0;
            self.sent_prefix = Some(self.prefix(ready));
        }
        self.sent_prefix.clone().unwrap_or_default()
    }

    fn prefix(&self, ready: bool) -> Vec<u8> {
        let c = &self.s.cfg;
        let mut b = Vec::with_capacity(MATCH_SIZE);
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&c.qp_num.to_le_bytes());
        b.extend_from_slice(&c.dev_id.to_le_bytes());
        b.extend_from_slice(&c.que_iso_cfg.to_le_bytes());
        b.extend_from_slice(&c.qp_base.to_le_bytes());
        b.extend_from_slice(&(!ready as u32).to_le_bytes());
        b.extend_from_slice(&MAJOR.to_le_bytes());
        b.extend_from_slice(&MINOR.to_le_bytes());
        b.extend_from_slice(&[0u8; 8]);
        b
    }

    /// The whole state of a quiesced device, after this migration's prefix.
    fn full_state(&mut self) -> Vec<u8> {
        let mut b = self.this_prefix();
        let c = self.s.lock();
        let ready = c.regs.vf_state & VF_STATE_READY != 0;
        if ready {
            for r in [
                c.regs.vf_state,
                c.regs.mb_data_lo,
                c.regs.mb_data_hi,
                c.regs.mb_depth,
                c.regs.mb_status,
            ] {
                b.extend_from_slice(&r.to_le_bytes());
            }
            b.extend_from_slice(&c.jobs_done.to_le_bytes());
            for q in &c.queues {
                b.extend_from_slice(&q.sq_base.to_le_bytes());
                b.extend_from_slice(&q.sq_depth.to_le_bytes());
                b.extend_from_slice(&q.cq_base.to_le_bytes());
                b.extend_from_slice(&q.cq_depth.to_le_bytes());
                for v in [q.sq_head, q.sq_tail, q.cq_head, q.cq_tail, q.cq_phase as u32] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        drop(c);
        b.extend_from_slice(&self.s.window_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// `vf_qm_check_match`.
    fn check_match(&self, p: &[u8]) -> Result<(), Errno> {
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().expect("4"));
        let c = &self.s.cfg;
        if u64::from_le_bytes(p[0..8].try_into().expect("8")) != MAGIC
            || u16::from_le_bytes(p[28..30].try_into().expect("2")) != MAJOR
        {
            return err(EFAULT, "migration data of another format");
        }
        if u32_at(8) != c.qp_num || u32_at(12) != c.dev_id || u32_at(16) != c.que_iso_cfg {
            return err(EFAULT, "source device does not match this one");
        }
        Ok(())
    }

    /// RESUMING → STOP: validates and loads.
    fn load(&mut self) -> Result<(), Errno> {
        let b = std::mem::take(&mut self.resume);
        if b.len() < MATCH_SIZE {
            return err(EINVAL, "shorter than the match data");
        }
        if !self.match_done {
            self.check_match(&b)?;
        }
        let full = state_len(self.s.cfg.qp_num);
        if b.len() != full && b.len() != NOT_READY_LEN {
            return err(
                EINVAL,
                if b.len() == MATCH_SIZE {
                    "only the match data arrived: the device's state (at least its peer window) was lost on the way"
                } else {
                    "device state of the wrong length"
                },
            );
        }
        let (body, tail) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(tail.try_into().expect("4")) {
            return err(EINVAL, "device state fails its checksum");
        }
        let window = &body[body.len() - PEER_WINDOW_SIZE as usize..];
        if b.len() == NOT_READY_LEN {
            // Not set up by its guest driver when it stopped: its memory is all there is.
            self.s.window.write(0, window);
            self.sent_prefix = Some(b[..MATCH_SIZE].to_vec());
            return Ok(());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let regs = Regs {
            vf_state: u32_at(40),
            mb_data_lo: u32_at(44),
            mb_data_hi: u32_at(48),
            mb_depth: u32_at(52),
            mb_status: u32_at(56),
        };
        let mut queues = Vec::new();
        for i in 0..self.s.cfg.qp_num as usize {
            let o = 68 + i * QUEUE_SIZE;
            let q = Queue {
                sq_base: u64_at(o),
                sq_depth: u32_at(o + 8),
                cq_base: u64_at(o + 12),
                cq_depth: u32_at(o + 20),
                sq_head: u32_at(o + 24),
                sq_tail: u32_at(o + 28),
                cq_head: u32_at(o + 32),
                cq_tail: u32_at(o + 36),
                cq_phase: u32_at(o + 40) != 0,
            };
            let ring_ok = |base: u64, depth: u32| {
                depth == 0 || (depth.is_power_of_two() && depth <= crate::regs::MAX_DEPTH && base.is_multiple_of(64))
            };
            let idx_ok = |i: u32, depth: u32| depth == 0 && i == 0 || i < depth;
            if !ring_ok(q.sq_base, q.sq_depth)
                || !ring_ok(q.cq_base, q.cq_depth)
                || !idx_ok(q.sq_head, q.sq_depth)
                || !idx_ok(q.sq_tail, q.sq_depth)
                || !idx_ok(q.cq_head, q.cq_depth)
                || !idx_ok(q.cq_tail, q.cq_depth)
            {
                return err(EINVAL, "queue context out of range");
            }
            queues.push(q);
        }
        self.s.window.write(0, window);
        self.sent_prefix = Some(b[..MATCH_SIZE].to_vec());
        let mut c = self.s.lock();
        c.regs = regs;
        c.queues = queues;
        c.jobs_done = u64_at(60);
        Ok(())
    }
}

impl MigrationDriver for AccelMigration {
    fn migration_flags(&self) -> MigFlags {
        self.s.cfg.flags
    }

    fn step(&mut self, from: MigState, to: MigState) -> Result<Option<StreamKind>, Errno> {
        Ok(match (from, to) {
            // Leaving normal operation: no new job; the one in flight completes.
            (Running, RunningP2p) | (Running, Stop) | (PreCopy, PreCopyP2p) => {
                self.s.quiesce();
                None
            }
            (RunningP2p, Running) | (PreCopyP2p, PreCopy) | (Stop, Running) => {
                self.sent_prefix = None;
                self.s.resume();
                None
            }
            (Stop, RunningP2p) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => {
                // Running again: the next migration sends its own prefix.
                self.sent_prefix = None;
                None
            }
            (RunningP2p, Stop) => None,
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                self.sent_prefix = None;
                self.save = self.this_prefix();
                self.pos = 0;
                Some(StreamKind::Save)
            }
            (PreCopy, StopCopy) | (PreCopyP2p, StopCopy) => {
                self.s.quiesce();
                self.save = self.full_state();
                None
            }
            (Stop, StopCopy) => {
                self.save = self.full_state();
                self.pos = 0;
                Some(StreamKind::Save)
            }
            (StopCopy, Stop) => {
                self.save.clear();
                None
            }
            (Stop, Resuming) => {
                self.resume.clear();
                self.match_done = false;
                Some(StreamKind::Resume)
            }
            (Resuming, Stop) => {
                self.load()?;
                None
            }
            _ => return err(EINVAL, "arc not implemented by this device"),
        })
    }

    fn save_read(&mut self, _state: MigState, buf: &mut [u8]) -> Result<usize, Errno> {
        let n = buf.len().min(self.save.len().saturating_sub(self.pos));
        buf[..n].copy_from_slice(&self.save[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
        if self.resume.len() + buf.len() > state_len(self.s.cfg.qp_num) {
            return err(ENOMEM, "more data than a device state");
        }
        if !self.match_done && self.resume.len() + buf.len() >= MATCH_SIZE {
            let mut p = self.resume.clone();
            p.extend_from_slice(&buf[..MATCH_SIZE.saturating_sub(self.resume.len()).min(buf.len())]);
            self.check_match(&p)?;
            self.match_done = true;
        }
        self.resume.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn precopy_info(&mut self) -> PrecopyInfo {
        PrecopyInfo {
            initial_bytes: MATCH_SIZE.saturating_sub(self.pos) as u64,
            dirty_bytes: 0,
        }
    }

    fn stop_copy_size(&mut self) -> Result<u64, Errno> {
        Ok(state_len(self.s.cfg.qp_num) as u64)
    }

    fn reset(&mut self) {
        self.s.reset();
        self.sent_prefix = None;
        self.save.clear();
        self.resume.clear();
        self.pos = 0;
        self.match_done = false;
    }

    fn dma_logging(&mut self) -> Option<&mut dyn DmaLogging> {
        if self.s.cfg.dma_logging {
            Some(&mut self.log)
        } else {
            None
        }
    }
}
