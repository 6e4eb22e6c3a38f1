//! `livemig bench viommu`: the same guest with no vIOMMU, a nested one and a shadow one
//! (`docs/viommu.md#measured`). vCPU 0 runs the dirtier, vCPU 1 the vIOMMU client, which
//! maps, fills and unmaps buffers at the same paced rate in every design (without a vIOMMU
//! it maps nothing and uses IOVA = GPA). Per design: the client's remap and job rates, the device harvest's cost,
//! the IOTLB miss rate the device's translations saw, the DMA path's throughput against a
//! plain copy, and a verified migration's downtime and device-dirty pages. Ratios are
//! against the no-vIOMMU row of the same run.

use crate::bench::fmt_ratio;
use crate::bench_migration::median;
use anyhow::{anyhow, bail, Result};
use migration::{DestOptions, DeviceTracking, MigrationControl, SourceOptions, VerifyMode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::layout::{viommu_area, WORKSET_BASE};
use vmm::viommu::{area, harvest_hwpt, UnmapLog};
use vmm::*;

pub struct Args {
    pub memory_mib: u64,
    /// Dirtier rate, MiB/s.
    pub rate: f64,
    /// The vIOMMU client's jobs per second, each one remap (0: as fast as it can).
    pub remap_rate: f64,
    pub runs: usize,
    pub warmup_ms: u64,
}

/// One design's measurements from one run.
#[derive(Clone, Debug, Default)]
struct Sample {
    remaps_s: f64,
    jobs_s: f64,
    harvest_us: f64,
    miss_pct: f64,
    dma_mib_s: f64,
    downtime_ms: f64,
    device_dirty: f64,
}

fn guest(a: &Args, mode: ViommuMode) -> Result<Arc<Vm>> {
    let vm = Vm::new(VmConfig {
        mem_mib: a.memory_mib,
        regions: 1,
        vcpus: 2,
        dirty: DirtyLogMode::Ring { entries: 65536 },
        devices: DeviceSet::one(AccelSetup {
            viommu: mode,
            huge_pages: false,
            ..Default::default()
        }),
    })?;
    let ws = ((a.memory_mib << 20) - WORKSET_BASE).min(64 << 20) / 4096;
    let mut p = Program::dirtier(WORKSET_BASE, ws, a.rate, Pattern::Uniform);
    p.dirtier = a.rate > 0.0;
    vm.programs().load(0, &p)?;
    let mut client = Program::viommu_client(0, 1);
    client.remap_rate = a.remap_rate;
    vm.programs().load(1, &client)?;
    Ok(Arc::new(vm))
}

fn remaps(vm: &Vm) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    vm.memory()
        .read_obj::<u64>(GuestAddress(layout::ctrl_page(1) + programs::ctrl::K_REMAPS))
        .unwrap_or(0)
}

/// The IOTLB the device's own translations go through: the nested domain's, or the paging one's.
fn iotlb(d: &AttachedDevice) -> Result<(u64, u64)> {
    let dma = d.fd.device_dma(d.dev)?;
    Ok(match dma.nested() {
        Some(n) => n.iotlb_stats(),
        None => dma.domain().iotlb_stats(),
    })
}

/// MiB/s of 4 KiB writes through the device's DMA path to the buffers mapped now (the
/// guest paused), for `ms`. Pages the guest left unmapped at the pause are skipped.
fn dma_rate(vm: &Vm, ms: u64) -> Result<f64> {
    let d = &vm.devices()[0];
    let dma = d.fd.device_dma(d.dev)?;
    let targets: Vec<u64> = match d.viommu {
        ViommuMode::Off => (0..8).map(|s| viommu_area(0) + area::POOL + s * 4096).collect(),
        _ => (0..8).map(|s| layout::VIOMMU_IOVA + (2 + s) * 4096).collect(),
    };
    let page = [0x5au8; 4096];
    let live: Vec<u64> = targets.into_iter().filter(|&t| dma.write(t, &page).is_ok()).collect();
    if live.is_empty() {
        bail!("no buffer was mapped when the guest paused");
    }
    let (t0, mut n) = (Instant::now(), 0u64);
    while t0.elapsed() < Duration::from_millis(ms) {
        for &t in &live {
            dma.write(t, &page).map_err(|e| anyhow!("DMA to {t:#x}: {e}"))?;
        }
        n += live.len() as u64;
    }
    Ok((n * 4096) as f64 / 1048576.0 / t0.elapsed().as_secs_f64())
}

/// MiB/s of the same 4 KiB copies into plain memory: the baseline of the DMA path.
fn memcpy_rate(ms: u64) -> f64 {
    let mut dst = vec![0u8; 8 * 4096];
    let src = [0x5au8; 4096];
    let (t0, mut n) = (Instant::now(), 0u64);
    while t0.elapsed() < Duration::from_millis(ms) {
        for c in dst.chunks_mut(4096) {
            c.copy_from_slice(std::hint::black_box(&src));
        }
        n += 8;
        std::hint::black_box(&mut dst);
    }
    (n * 4096) as f64 / 1048576.0 / t0.elapsed().as_secs_f64()
}

fn one(a: &Args, mode: ViommuMode) -> Result<Sample> {
    let vm = guest(a, mode)?;
    vm.resume()?;
    std::thread::sleep(Duration::from_millis(a.warmup_ms));
    let d = vm.devices()[0].clone();
    // Harvest cost and IOTLB misses under tracking, while the guest runs.
    d.fd.hwpt_set_dirty_tracking(&iommufd::HwptSetDirtyTracking {
        flags: iommufd::IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
        hwpt_id: d.hwpt,
        __reserved: 0,
    })?;
    d.space.set_unmap_log(Some(UnmapLog::Hwpt));
    let (r0, c0, i0, t0) = (remaps(&vm), vm.programs().counters(1), iotlb(&d)?, Instant::now());
    let (mut buf, mut out) = (Vec::new(), PageBitmap::new(vm.ram_end() / 4096));
    let mut costs = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        harvest_hwpt(&d.fd, d.hwpt, d.space.as_ref(), &mut buf, &mut out)?;
        costs.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t0.elapsed().as_secs_f64();
    let (r1, c1, i1) = (remaps(&vm), vm.programs().counters(1), iotlb(&d)?);
    d.space.set_unmap_log(None);
    d.fd.hwpt_set_dirty_tracking(&iommufd::HwptSetDirtyTracking {
        flags: 0,
        hwpt_id: d.hwpt,
        __reserved: 0,
    })?;
    if c1.errors > 0 {
        bail!("{mode}: the guest counted {} error(s)", c1.errors);
    }
    let lookups = (i1.0 - i0.0).max(1);
    // The DMA path with the guest paused (its buffers stay mapped).
    vm.pause()?;
    let dma_mib_s = dma_rate(&vm, 200)?;
    vm.resume()?;
    std::thread::sleep(Duration::from_millis(200));
    // A verified migration with IOMMU tracking.
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let dest = std::thread::spawn(move || migration::receive(&l, &DestOptions::default()));
    let opts = SourceOptions {
        mode: DeviceTracking::Iommu,
        verify: VerifyMode::Gate,
        ..Default::default()
    };
    let info = migration::migrate(&vm, &addr, &opts, &MigrationControl::default())
        .map_err(|e| anyhow!("{mode}: {}", e.chain()))?;
    let inc = dest
        .join()
        .map_err(|_| anyhow!("destination panicked"))?
        .map_err(|e| anyhow!("{mode}: {}", e.chain()))?;
    if info.livemig.verified != Some(true) {
        bail!("{mode}: verification failed: {}", info.livemig.verify_detail);
    }
    drop(inc);
    Ok(Sample {
        remaps_s: (r1 - r0) as f64 / secs,
        jobs_s: (c1.jobs_completed - c0.jobs_completed) as f64 / secs,
        harvest_us: median(costs),
        miss_pct: 100.0 * (i1.1 - i0.1) as f64 / lookups as f64,
        dma_mib_s,
        downtime_ms: info.downtime_us.unwrap_or(0) as f64 / 1000.0,
        device_dirty: info.livemig.device_dirty_pages as f64,
    })
}

pub fn run(a: &Args) -> Result<()> {
    vmm::kvm_for_tests().map_err(|e| anyhow!("bench viommu needs KVM: {e}"))?;
    let modes = [ViommuMode::Off, ViommuMode::Nested, ViommuMode::Shadow];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    let mut copies = Vec::new();
    // Interleaved, so that a slow spell of the host lands on every design alike.
    for r in 0..a.runs {
        copies.push(memcpy_rate(200));
        for (i, &m) in modes.iter().enumerate() {
            eprintln!("run {}/{}: {m}", r + 1, a.runs);
            samples[i].push(one(a, m)?);
        }
    }
    let memcpy = median(copies);
    let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    println!(
        "Guest: {} MiB, dirtier {} MiB/s on vCPU 0, the vIOMMU client on vCPU 1 (8 buffers, FILL \
         jobs, {} jobs/s asked, each a remap behind a vIOMMU); medians of {} run(s); memcpy of 4 KiB \
         blocks: {:.0} MiB/s.\n",
        a.memory_mib,
        a.rate,
        if a.remap_rate > 0.0 {
            format!("{}", a.remap_rate)
        } else {
            "as many".into()
        },
        a.runs,
        memcpy
    );
    println!(
        "| vIOMMU | downtime ms | ÷ off | device-dirty pages | harvest µs | ÷ off | IOTLB misses | remaps/s | jobs/s | DMA MiB/s | ÷ memcpy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let (d0, h0) = (med(0, |s| s.downtime_ms), med(0, |s| s.harvest_us));
    for (i, m) in modes.iter().enumerate() {
        let (dt, h, dma) = (
            med(i, |s| s.downtime_ms),
            med(i, |s| s.harvest_us),
            med(i, |s| s.dma_mib_s),
        );
        println!(
            "| {m} | {dt:.1} | {} | {:.0} | {h:.0} | {} | {:.2} % | {:.0} | {:.0} | {dma:.0} | {} |",
            fmt_ratio(dt / d0.max(1e-9)),
            med(i, |s| s.device_dirty),
            fmt_ratio(h / h0.max(1e-9)),
            med(i, |s| s.miss_pct),
            med(i, |s| s.remaps_s),
            med(i, |s| s.jobs_s),
            fmt_ratio(dma / memcpy.max(1e-9)),
        );
    }
    Ok(())
}
