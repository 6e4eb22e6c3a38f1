//! The accelerator: registers, queue pairs, and the worker thread that executes jobs.
//!
//! Execution gate (what migration states mean for this device):
//! * RUNNING, PRE_COPY: the worker takes jobs from every queue with work.
//! * RUNNING_P2P, PRE_COPY_P2P: no new job starts; entering these states waits for the job in
//!   flight to finish (its completion written). Doorbells are still accepted.
//! * STOP, STOP_COPY, RESUMING: no DMA at all.
//!
//! A job's indices advance only after its completion entry is written, so a stopped device's
//! state holds every submitted job either as completed or as pending in its SQ: each runs
//! exactly once, before or after a migration.

use crate::jobs::{run, DeviceDma};
use crate::regs::*;
use iommu::mem::AnonMemory;
use iommu::{Dma, HostMemory};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use vfio::{DmaLog, MigFlags, MigrationDevice};

/// Static configuration; part of it is the migration match prefix.
#[derive(Clone, Debug)]
pub struct AccelConfig {
    pub qp_num: u32,
    pub flags: MigFlags,
    /// The device identity checked on the destination (`dev_id` of hisi's match data).
    pub dev_id: u32,
    /// Queue isolation/config word (`que_iso_cfg`), checked on the destination.
    pub que_iso_cfg: u32,
    /// First queue of this function in the parent's table (`qp_base`), informational.
    pub qp_base: u32,
    /// Offer device-side DMA logging (`log_ops`).
    pub dma_logging: bool,
}

impl Default for AccelConfig {
    fn default() -> Self {
        Self {
            qp_num: 2,
            flags: MigFlags::STOP_COPY | MigFlags::P2P | MigFlags::PRE_COPY,
            dev_id: 0xa250,
            que_iso_cfg: 0x1,
            qp_base: 0,
            dma_logging: true,
        }
    }
}

/// One queue pair's context and indices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    pub sq_base: u64,
    pub sq_depth: u32,
    pub cq_base: u64,
    pub cq_depth: u32,
    pub sq_head: u32,
    pub sq_tail: u32,
    pub cq_head: u32,
    pub cq_tail: u32,
    pub cq_phase: bool,
}

impl Queue {
    pub fn ready(&self) -> bool {
        self.sq_depth != 0 && self.cq_depth != 0
    }
    fn has_job(&self) -> bool {
        self.ready() && self.sq_head != self.sq_tail
    }
    fn cq_full(&self) -> bool {
        (self.cq_tail + 1) % self.cq_depth == self.cq_head
    }
}

/// Registers a guest can write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    pub vf_state: u32,
    pub mb_data_lo: u32,
    pub mb_data_hi: u32,
    pub mb_depth: u32,
    pub mb_status: u32,
}

pub(crate) struct Core {
    pub regs: Regs,
    pub queues: Vec<Queue>,
    /// Jobs may start.
    pub executing: bool,
    /// A job is between its start and its completion write.
    pub busy: bool,
    pub jobs_done: u64,
    pub shutdown: bool,
    next_queue: usize,
}

pub(crate) struct Shared {
    pub cfg: AccelConfig,
    pub core: Mutex<Core>,
    pub cv: Condvar,
    pub log: Arc<DmaLog>,
    pub dma_ops: AtomicU64,
    /// The peer window: written by other devices' DMA through the IOMMU, whatever state this
    /// device is in. That is why the P2P states exist (`docs/vfio.md#several-devices`).
    pub window: Arc<AnonMemory>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops starting jobs and waits for the one in flight.
    pub fn quiesce(&self) {
        let mut c = self.lock();
        c.executing = false;
        while c.busy {
            c = self.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) {
        self.lock().executing = true;
        self.cv.notify_all();
    }

    /// Device reset: contexts and registers cleared, executing.
    pub fn reset(&self) {
        self.quiesce();
        let mut c = self.lock();
        c.regs = Regs::default();
        for q in c.queues.iter_mut() {
            *q = Queue::default();
        }
        c.executing = true;
        drop(c);
        self.window.write(0, &[0u8; PEER_WINDOW_SIZE as usize]);
        self.cv.notify_all();
    }

    pub fn window_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; PEER_WINDOW_SIZE as usize];
        self.window.read(0, &mut b);
        b
    }
}

/// The accelerator device. Dropping it stops its worker.
pub struct Accel {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    mig: MigrationDevice,
}

impl Accel {
    /// A device whose DMA goes through `dma`, running.
    pub fn new(cfg: AccelConfig, dma: Dma) -> Result<Accel, iommu::Errno> {
        if cfg.qp_num == 0 || cfg.qp_num > 64 {
            return iommu::errno::err(iommu::errno::EINVAL, "1 to 64 queue pairs");
        }
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                regs: Regs::default(),
                queues: vec![Queue::default(); cfg.qp_num as usize],
                executing: true,
                busy: false,
                jobs_done: 0,
                shutdown: false,
                next_queue: 0,
            }),
            cv: Condvar::new(),
            log: DmaLog::new(4096),
            dma_ops: AtomicU64::new(0),
            window: Arc::new(
                AnonMemory::new(PEER_WINDOW_SIZE as usize, false)
                    .map_err(|_| iommu::Errno::new(iommu::errno::ENOMEM, "cannot map the peer window"))?,
            ),
            cfg,
        });
        let mig = MigrationDevice::new("accel", crate::migration::AccelMigration::new(shared.clone()))?;
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("accel-worker".into())
            .spawn(move || worker(s, dma))
            .map_err(|_| iommu::Errno::new(iommu::errno::ENOMEM, "cannot start the worker"))?;
        Ok(Accel {
            shared,
            worker: Some(worker),
            mig,
        })
    }

    pub fn config(&self) -> &AccelConfig {
        &self.shared.cfg
    }

    /// The VFIO migration face of the device.
    pub fn migration(&self) -> &MigrationDevice {
        &self.mig
    }

    /// DMA operations performed so far (reads and writes, including ring entries).
    pub fn dma_ops(&self) -> u64 {
        self.shared.dma_ops.load(Ordering::Relaxed)
    }

    /// Jobs completed so far.
    pub fn jobs_done(&self) -> u64 {
        self.shared.lock().jobs_done
    }

    /// A snapshot of the queue pairs.
    pub fn queues(&self) -> Vec<Queue> {
        self.shared.lock().queues.clone()
    }

    /// The peer window's memory, for a VMM to map into IOMMU domains at
    /// `PEER_WINDOW` of wherever it puts the register block.
    pub fn peer_window(&self) -> Arc<dyn HostMemory> {
        self.shared.window.clone()
    }

    /// A copy of the peer window's contents.
    pub fn peer_window_bytes(&self) -> Vec<u8> {
        self.shared.window_bytes()
    }

    /// A snapshot of the guest-writable registers.
    pub fn regs(&self) -> Regs {
        self.shared.lock().regs
    }

    /// MMIO read of `data.len()` bytes (1, 2, 4 or 8) at `offset` in the register block.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if let Some(at) = window_offset(offset, data.len()) {
            self.shared.window.read(at, data);
            return;
        }
        let c = self.shared.lock();
        let v: u64 = match offset & !3 {
            ID => ID_VALUE as u64,
            VERSION => VERSION_VALUE as u64,
            QP_NUM => self.shared.cfg.qp_num as u64,
            SQE_SIZE_REG => SQE_SIZE,
            STATUS => (c.executing as u64) | ((c.busy as u64) << 1),
            JOBS_DONE => c.jobs_done & 0xffff_ffff,
            VF_STATE => c.regs.vf_state as u64,
            MB_DATA_LO => c.regs.mb_data_lo as u64,
            MB_DATA_HI => c.regs.mb_data_hi as u64,
            MB_DEPTH => c.regs.mb_depth as u64,
            MB_STATUS => c.regs.mb_status as u64,
            _ => 0,
        };
        let shift = (offset & 3) * 8;
        let v = v >> shift;
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    /// MMIO write at `offset` in the register block.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if let Some(at) = window_offset(offset, data.len()) {
            self.shared.window.write(at, data);
            return;
        }
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(raw);
        let mut c = self.shared.lock();
        match offset {
            VF_STATE => c.regs.vf_state = v as u32,
            MB_DATA_LO => c.regs.mb_data_lo = v as u32,
            MB_DATA_HI => c.regs.mb_data_hi = v as u32,
            MB_DEPTH => c.regs.mb_depth = v as u32,
            MB_CMD => mailbox(&mut c, v as u32),
            DOORBELL if n == 8 => {
                let qn = (v & 0xfff) as usize;
                let cmd = (v >> 12) & 0xf;
                let index = ((v >> 32) & 0xffff) as u32;
                if let Some(q) = c.queues.get_mut(qn) {
                    match cmd {
                        DB_SQ if q.sq_depth != 0 => q.sq_tail = index % q.sq_depth,
                        DB_CQ if q.cq_depth != 0 => q.cq_head = index % q.cq_depth,
                        _ => {}
                    }
                }
                drop(c);
                self.shared.cv.notify_all();
            }
            _ => {}
        }
    }
}

/// Where an access of `len` bytes at register offset `offset` falls in the peer window, if it
/// lies wholly inside it.
fn window_offset(offset: u64, len: usize) -> Option<usize> {
    let at = offset.checked_sub(PEER_WINDOW)?;
    (at.checked_add(len as u64)? <= PEER_WINDOW_SIZE).then_some(at as usize)
}

fn mailbox(c: &mut Core, cmd: u32) {
    let op = cmd & 0xff;
    let qn = (cmd >> 16) as usize;
    let base = (c.regs.mb_data_hi as u64) << 32 | c.regs.mb_data_lo as u64;
    let depth = c.regs.mb_depth;
    let Some(q) = c.queues.get_mut(qn) else {
        c.regs.mb_status = 1;
        return;
    };
    let ring_ok = depth.is_power_of_two() && (2..=MAX_DEPTH).contains(&depth) && base.is_multiple_of(64);
    match op {
        MB_SQC | MB_CQC if !ring_ok => c.regs.mb_status = 2,
        MB_SQC => {
            q.sq_base = base;
            q.sq_depth = depth;
            q.sq_head = 0;
            q.sq_tail = 0;
            c.regs.mb_status = 0;
        }
        MB_CQC => {
            q.cq_base = base;
            q.cq_depth = depth;
            q.cq_head = 0;
            q.cq_tail = 0;
            q.cq_phase = true;
            c.regs.mb_status = 0;
        }
        MB_SQC_BT | MB_CQC_BT => {
            let b = if op == MB_SQC_BT { q.sq_base } else { q.cq_base };
            c.regs.mb_data_lo = b as u32;
            c.regs.mb_data_hi = (b >> 32) as u32;
            c.regs.mb_status = 0;
        }
        _ => c.regs.mb_status = 3,
    }
}

impl Drop for Accel {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cv.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The worker: one job at a time, round-robin over queues with work and CQ room.
fn worker(s: Arc<Shared>, dma: Dma) {
    let d = DeviceDma {
        dma: &dma,
        log: &s.log,
        ops: &s.dma_ops,
    };
    loop {
        let (qn, q) = {
            let mut c = s.lock();
            loop {
                if c.shutdown {
                    return;
                }
                if c.executing {
                    let n = c.queues.len();
                    let start = c.next_queue;
                    let pick = (0..n)
                        .map(|i| (start + i) % n)
                        .find(|&i| c.queues[i].has_job() && !c.queues[i].cq_full());
                    if let Some(i) = pick {
                        c.busy = true;
                        c.next_queue = (i + 1) % n;
                        break (i, c.queues[i]);
                    }
                }
                c = s.cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut raw = [0u8; SQE_SIZE as usize];
        let (status, result, tag) = if d.read(q.sq_base + q.sq_head as u64 * SQE_SIZE, &mut raw).is_err() {
            (Status::ReadFault, 0, 0)
        } else {
            let sqe = Sqe::from_bytes(&raw);
            let (st, res) = run(&d, &sqe);
            (st, res, sqe.tag)
        };
        let new_head = (q.sq_head + 1) % q.sq_depth;
        let cqe = Cqe {
            result,
            tag,
            sq_head: new_head as u16,
            sq_num: qn as u16,
            status: status as u16,
            phase: q.cq_phase,
        };
        // A CQE that cannot be written is lost like on hardware; the job still counts as run.
        // The body goes first and the word with the phase bit last, as a device must: a driver
        // that sees the new phase then reads the rest, and must find it complete.
        let at = q.cq_base + q.cq_tail as u64 * CQE_SIZE;
        let bytes = cqe.to_bytes();
        if d.write(at, &bytes[..14]).is_ok() {
            let _ = d.write(at + 14, &bytes[14..]);
        }
        let mut c = s.lock();
        let qq = &mut c.queues[qn];
        // Contexts reloaded meanwhile (a reset, a new SQC) invalidate this completion.
        if qq.sq_base == q.sq_base && qq.cq_base == q.cq_base && qq.sq_head == q.sq_head && qq.cq_tail == q.cq_tail {
            qq.sq_head = new_head;
            qq.cq_tail = (q.cq_tail + 1) % q.cq_depth;
            if qq.cq_tail == 0 {
                qq.cq_phase = !qq.cq_phase;
            }
        }
        c.jobs_done += 1;
        c.busy = false;
        drop(c);
        s.cv.notify_all();
    }
}
