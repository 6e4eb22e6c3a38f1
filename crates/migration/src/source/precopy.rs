//! Setup, the bulk round and the pre-copy iterations, until QEMU's convergence test (or the
//! iteration limit) says to switch over.

use super::link::{DeviceProgress, Link};
use super::SourceOptions;
use crate::control::MigrationControl;
use crate::convergence::Convergence;
use crate::dirty_source::DeviceDirty;
use crate::error::MigError;
use crate::info::Status;
use crate::pages::PageStats;
use crate::throttle::Throttle;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::{GuestProbe, PageBitmap, Vm};

/// Where pre-copy left off.
pub(super) struct Precopy {
    pub reason: &'static str,
    pub iteration: u64,
    pub expected: Duration,
    pub cpu_dirty_total: u64,
    pub dev_dirty_total: u64,
    /// Seconds of the iterations after the bulk round (what the dirty rates are over).
    pub seconds: f64,
    /// Seconds from the bulk round's start to the switchover: what sent `bytes`.
    pub sending: f64,
    pub bytes: u64,
    pub devp: DeviceProgress,
    /// What the guest's programs wrote over pre-copy, by their own counters: the vCPUs'
    /// dirtiers and the devices' DMA writers, in MiB/s.
    pub guest_cpu_mib_s: f64,
    pub guest_dma_mib_s: f64,
    /// Pages the last sync found dirty and that were not sent: the final round sends them
    /// with what the last harvest finds.
    pub pending: PageBitmap,
}

pub(super) fn run(
    link: &mut Link,
    vm: &Arc<Vm>,
    opts: &SourceOptions,
    ctl: &MigrationControl,
    t0: Instant,
    stats: &Arc<PageStats>,
) -> Result<Precopy, MigError> {
    // ---- setup: trackers, then the devices' pre-copy streams ----
    let (guest_t0, guest0) = (Instant::now(), vm.progress());
    let pages = vm.ram_end() / 4096;
    let mut scratch = PageBitmap::new(pages);
    vm.cpu_dirty_log().set_logging(true)?;
    vm.cpu_dirty_log().harvest(&mut scratch)?; // the bulk round sends everything anyway
    link.device_dirty = Some(DeviceDirty::start(vm, opts.mode)?);
    link.harvest_device(&mut scratch)?;
    let ndev = link.devices.devices().count();
    let mut devp = DeviceProgress {
        bytes: 0,
        hashes: (0..ndev).map(|_| Default::default()).collect(),
        saved: (opts.sabotage == Some(super::Sabotage::FlipDeviceByte)).then(|| vec![Vec::new(); ndev]),
    };
    let sections = link.devices.setup()?;
    link.send_sections(&sections, &mut devp, |_| {})?;
    if opts.auto_converge {
        link.throttle = Some(Throttle::new(vm.clone()));
    }
    let setup = t0.elapsed();
    ctl.update(|i| {
        i.status = Status::Active;
        i.setup_time = setup.as_millis() as u64;
    });

    // ---- bulk round ----
    let mut all = PageBitmap::new(pages);
    for s in vm.slots() {
        all.set_range(s.gpa / 4096, s.size / 4096);
    }
    let mut conv = Convergence::new(opts.downtime_limit, opts.auto_converge, Instant::now(), 0);
    let mut iteration = 1u64;
    let (mut cpu_dirty_total, mut dev_dirty_total) = (0u64, 0u64);
    let bulk = Instant::now();
    link.queue_pages(&all)?;
    link.end_iteration(1, all.count())?;
    // The bulk round can take long (a bandwidth cap): show it moving.
    link.flush_all_with(None, &mut || {
        ctl.update(|i| {
            i.total_time = t0.elapsed().as_millis() as u64;
            fill_ram(i, stats);
        })
    })?;
    let start = Instant::now();
    let mut last_sync = Instant::now();
    let mut cpu = PageBitmap::new(pages);
    let mut dev = PageBitmap::new(pages);
    let reason;
    let mut max_reached = None::<Instant>;
    // ---- iterations ----
    loop {
        if ctl.is_cancelled() {
            return Err(MigError::Cancelled);
        }
        link.check_back()?;
        // Flow control: the destination applies every iteration before the next sync, so
        // it never lags by more than one iteration of socket buffers and the switchover
        // does not start with a backlog.
        link.wait_iteration(iteration as u32)?;
        cpu.clear();
        dev.clear();
        vm.cpu_dirty_log().harvest(&mut cpu)?;
        link.harvest_device(&mut dev)?;
        let now = Instant::now();
        let dt = now.duration_since(last_sync).as_secs_f64().max(1e-6);
        last_sync = now;
        let (nc, nd) = (cpu.count(), dev.count());
        cpu_dirty_total += nc;
        dev_dirty_total += nd;
        cpu.union(&dev);
        let dirty = cpu.count();
        // Guest bytes of data pages moved, not wire bytes: see `convergence`.
        let sent = stats.data_pages() * 4096 + devp.bytes;
        conv.update(now, sent);
        if let Some(p) = conv.on_sync(dirty * 4096, sent) {
            if let Some(t) = &link.throttle {
                t.set(p);
            }
        }
        let pending = link.devices.pending();
        let allowed = link.peer.init_acked || !link.devices.needs_switchover_ack();
        let total_pending = dirty * 4096 + pending.exact;
        publish(
            ctl,
            stats,
            &conv,
            t0,
            iteration,
            dirty,
            devp.bytes,
            nc as f64 / dt,
            nd as f64 / dt,
            link,
        );
        if conv.can_switch(total_pending, allowed) {
            reason = "converged";
            break;
        }
        if iteration >= opts.max_iterations as u64 {
            if allowed {
                reason = "max-iterations";
                break;
            }
            // Never stop before the destination acknowledged the device's initial data.
            let waited = *max_reached.get_or_insert_with(Instant::now);
            if waited.elapsed() > opts.peer_timeout {
                return Err(MigError::Timeout("the destination's switchover acknowledgement"));
            }
        }
        if !allowed && dirty < 64 {
            // Waiting for the destination's acknowledgement with nothing much to send: wait
            // for it a little instead of spinning through empty dirty syncs.
            link.poll_back(Duration::from_millis(10))?;
        }
        iteration += 1;
        link.queue_pages(&cpu)?;
        let (sections, _) = link.devices.iterate()?;
        link.send_sections(&sections, &mut devp, |_| {})?;
        link.end_iteration(iteration as u32, dirty)?;
        link.flush_all()?;
    }
    let (secs, guest1) = (guest_t0.elapsed().as_secs_f64(), vm.progress());
    Ok(Precopy {
        guest_cpu_mib_s: guest0.mib_s(&guest1, vmm::progress::PAGES, secs),
        guest_dma_mib_s: guest0.mib_s(&guest1, vmm::progress::DMA_CHUNKS, secs),
        reason,
        iteration,
        expected: conv.expected_downtime,
        cpu_dirty_total,
        dev_dirty_total,
        seconds: start.elapsed().as_secs_f64().max(1e-6),
        sending: bulk.elapsed().as_secs_f64(),
        bytes: stats.wire_bytes.load(Ordering::Relaxed),
        devp,
        pending: cpu,
    })
}

pub(super) fn fill_ram(i: &mut crate::info::MigrationInfo, stats: &PageStats) {
    i.ram.transferred = stats.wire_bytes.load(Ordering::Relaxed);
    i.ram.duplicate = stats.zero_pages.load(Ordering::Relaxed);
    i.ram.normal = stats.data_pages();
    i.ram.normal_bytes = i.ram.normal * 4096;
    i.livemig.compressed_pages = stats.compressed_pages.load(Ordering::Relaxed);
    i.livemig.compressed_bytes = stats.compressed_bytes.load(Ordering::Relaxed);
}

#[allow(clippy::too_many_arguments)]
fn publish(
    ctl: &MigrationControl,
    stats: &PageStats,
    conv: &Convergence,
    t0: Instant,
    iteration: u64,
    dirty: u64,
    vfio_bytes: u64,
    cpu_rate: f64,
    dev_rate: f64,
    link: &Link,
) {
    let throttle = link.throttle.as_ref().map_or(0, |t| t.pct());
    ctl.update(|i| {
        i.total_time = t0.elapsed().as_millis() as u64;
        i.expected_downtime = conv.expected_downtime.as_millis() as u64;
        i.cpu_throttle_percentage = throttle;
        i.ram.remaining = dirty * 4096;
        i.ram.dirty_sync_count += 1;
        i.ram.iteration_count = iteration;
        i.ram.mbps = conv.bandwidth * 1000.0 * 8.0 / 1e6;
        i.ram.dirty_pages_rate = (cpu_rate + dev_rate) as u64;
        i.vfio.transferred = vfio_bytes;
        fill_ram(i, stats);
    });
}
