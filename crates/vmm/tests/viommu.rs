//! A real KVM guest driving the accelerator through its own IOMMU (`docs/viommu.md`), nested
//! and shadow: the guest checks every job, and the migration loop (harvest the device's
//! dirty pages, translated to guest pages; copy them; repeat) misses nothing while the guest
//! remaps throughout, unless a sabotage removes the read-dirty-before-unmap or the
//! IOVA → GPA translation.

mod common;
use common::*;
use iommufd::*;
use std::time::{Duration, Instant};
use vmm::layout::viommu_area;
use vmm::viommu::{area, harvest_hwpt, harvest_translated, UnmapLog};
use vmm::*;

fn vm_with(mode: ViommuMode) -> Vm {
    let vm = vm_only(mode);
    vm.programs().load(0, &Program::viommu_client(0, 1)).unwrap();
    vm
}

fn vm_only(mode: ViommuMode) -> Vm {
    let accel = AccelSetup {
        huge_pages: false,
        viommu: mode,
        ..Default::default()
    };
    Vm::new(VmConfig {
        mem_mib: 64,
        regions: 1,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(accel),
    })
    .unwrap()
}

/// Who tracks the device's writes: the IOMMU's dirty bits, or the device's own DMA log.
#[derive(Clone, Copy, Debug, PartialEq)]
enum By {
    Iommu,
    DeviceLog,
}

fn track(vm: &Vm, by: By) {
    let d = &vm.devices()[0];
    match by {
        By::Iommu => {
            d.fd.hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
                flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                hwpt_id: d.hwpt,
                __reserved: 0,
            })
            .unwrap();
            d.space.set_unmap_log(Some(UnmapLog::Hwpt));
        }
        By::DeviceLog => {
            let ranges: Vec<vfio::LogRange> = d
                .space
                .log_ranges()
                .unwrap()
                .into_iter()
                .map(|(iova, length)| vfio::LogRange { iova, length })
                .collect();
            d.migration.dma_logging_start(&ranges, 4096).unwrap();
            d.space.set_unmap_log(Some(UnmapLog::Device(d.migration.clone())));
        }
    }
}

/// Waits until the device has finished every job the guest submitted (the vCPUs are paused).
fn quiesce(vm: &Vm) {
    let t0 = Instant::now();
    loop {
        let c = vm.programs().counters(0);
        let done = vm.devices()[0].jobs_done();
        if done >= c.jobs_submitted {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the device did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the client, tracks the device from its first write on, copies what each harvest
/// reports, and after the guest and device stopped compares the copy of the buffer pool
/// with memory: the number of pages that differ.
fn migrate_pool(vm: &Vm, rounds: u32, by: By) -> (u64, Counters) {
    let d = &vm.devices()[0];
    let pool = viommu_area(0) + area::POOL;
    let pool_len = (area::POOL_PAGES * 4096) as usize;
    track(vm, by);
    let mut copy = vec![0u8; pool_len];
    vm.memory()
        .read_slice(&mut copy, vm_memory::GuestAddress(pool))
        .unwrap();
    let mut buf = Vec::new();
    let mut round = |copy: &mut Vec<u8>| {
        let mut dirty = PageBitmap::new(vm.ram_end() / 4096);
        match by {
            By::Iommu => harvest_hwpt(&d.fd, d.hwpt, d.space.as_ref(), &mut buf, &mut dirty).unwrap(),
            By::DeviceLog => harvest_translated(d.space.as_ref(), &mut buf, &mut dirty, &mut |iova, len, bits| {
                d.migration.dma_logging_report(iova, len, 4096, bits)
            })
            .unwrap(),
        }
        for pfn in dirty.iter() {
            let gpa = pfn * 4096;
            if gpa >= pool && gpa < pool + pool_len as u64 {
                let off = (gpa - pool) as usize;
                vm.memory()
                    .read_slice(&mut copy[off..off + 4096], vm_memory::GuestAddress(gpa))
                    .unwrap();
            }
        }
    };
    vm.resume().unwrap();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(100));
        round(&mut copy);
    }
    // The switchover's share: what the guest and device did since the last round, which only
    // the final harvest can find. Short enough that no pool page is used twice in it (a slot
    // cycles through its 62 pages in ~60 ms here): a page used twice would be found through
    // its first use's unmap and copied with the second's content, hiding a lost bit.
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().unwrap();
    quiesce(vm);
    round(&mut copy);
    let mut now = vec![0u8; pool_len];
    vm.memory().read_slice(&mut now, vm_memory::GuestAddress(pool)).unwrap();
    let missed = (0..pool_len / 4096)
        .filter(|&i| copy[i * 4096..(i + 1) * 4096] != now[i * 4096..(i + 1) * 4096])
        .count() as u64;
    (missed, vm.programs().counters(0))
}

use vm_memory::Bytes;

#[test]
fn the_guest_remaps_and_checks_every_job_through_both_designs() {
    need_kvm!();
    for (mode, by) in [
        (ViommuMode::Off, By::Iommu),
        (ViommuMode::Nested, By::Iommu),
        (ViommuMode::Shadow, By::Iommu),
        (ViommuMode::Shadow, By::DeviceLog),
    ] {
        let vm = vm_with(mode);
        let (missed, c) = migrate_pool(&vm, 8, by);
        println!("{mode}, {by:?}: {c:?}, missed {missed}");
        assert!(
            c.jobs_completed > 100,
            "{mode}, {by:?}: jobs completed {}",
            c.jobs_completed
        );
        assert_eq!(c.errors, 0, "{mode}, {by:?}: every job checked by the guest");
        let remaps = vm
            .memory()
            .read_obj::<u64>(vm_memory::GuestAddress(layout::ctrl_page(0) + programs::ctrl::K_REMAPS))
            .unwrap();
        if mode != ViommuMode::Off {
            assert!(remaps > 50, "{mode}, {by:?}: remaps {remaps}");
        }
        assert_eq!(missed, 0, "{mode}, {by:?}: pool pages the harvests missed");
    }
}

/// A device log behind a nested vIOMMU is refused: its IOVAs cannot be translated after the
/// guest changed its table.
#[test]
fn a_device_log_behind_a_nested_viommu_is_refused() {
    need_kvm!();
    let vm = vm_with(ViommuMode::Nested);
    let e = vm.devices()[0].space.log_ranges().unwrap_err();
    assert!(e.contains("stage-1"), "{e}");
    let vm = vm_only(ViommuMode::Off);
    assert!(!vm.devices()[0].space.log_ranges().unwrap().is_empty());
    // The accel-client (IOVA = GPA) is refused on a device behind a vIOMMU.
    let vm = vm_only(ViommuMode::Shadow);
    let mut p = Program::dirtier(layout::WORKSET_BASE, 16, 1.0, Pattern::Sequential);
    p.accel_queue = Some(1);
    let e = vm.programs().load(0, &p).unwrap_err();
    assert!(e.to_string().contains("vIOMMU client"), "{e}");
}

/// Shadow: without the dirty read at unmap, or without the IOVA → GPA translation, the same
/// loop misses pages.
#[test]
fn shadow_sabotages_lose_device_writes() {
    need_kvm!();
    let vm = vm_with(ViommuMode::Shadow);
    vm.devices()[0].sabotage_skip_unmap_dirty(true);
    let (missed, c) = migrate_pool(&vm, 10, By::Iommu);
    assert_eq!(c.errors, 0);
    assert!(missed > 0, "skipping the dirty read before unmap must lose pages");
    let vm = vm_with(ViommuMode::Shadow);
    vm.devices()[0].sabotage_skip_unmap_dirty(true);
    let (missed, _) = migrate_pool(&vm, 10, By::DeviceLog);
    assert!(missed > 0, "skipping the log read after unmap must lose pages");

    let vm = vm_with(ViommuMode::Shadow);
    vm.devices()[0].sabotage_skip_translation(true);
    let (missed, c) = migrate_pool(&vm, 10, By::Iommu);
    println!("untranslated: missed {missed}, {c:?}");
    assert_eq!(c.errors, 0);
    assert!(missed > 0, "untranslated IOVA bits must lose pages");
}

/// The client's pace: asked 400 jobs (remaps) a second, it does about that many, in each design.
#[test]
fn the_client_keeps_the_remap_rate_it_is_asked() {
    need_kvm!();
    for mode in ViommuMode::ALL {
        let vm = vm_only(mode);
        let mut p = Program::viommu_client(0, 1);
        p.remap_rate = 400.0;
        vm.programs().load(0, &p).unwrap();
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let (c0, t0) = (vm.programs().counters(0), Instant::now());
        std::thread::sleep(Duration::from_millis(1000));
        let c1 = vm.programs().counters(0);
        let rate = (c1.jobs_completed - c0.jobs_completed) as f64 / t0.elapsed().as_secs_f64();
        assert!(
            (300.0..=480.0).contains(&rate),
            "{mode}: {rate:.0} jobs/s for 400 asked"
        );
        assert_eq!(c1.errors, 0);
    }
}
