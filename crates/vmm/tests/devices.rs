//! The accelerator driven by the guest program through the IOMMU; moving a running guest to a
//! fresh VM; refusing bad vCPU state.

mod common;
use common::*;
use iommufd::*;
use std::collections::BTreeSet;
use std::time::Duration;
use vmm::layout::{ACCEL_AREA, WORKSET_BASE};
use vmm::programs::ctrl::*;
use vmm::*;

fn with_accel(dirtier: bool, rate: f64) -> (Vm, Program) {
    // 4 KiB IOMMU leaves, so the HWPT bitmap shows exactly the pages the device wrote.
    let accel = AccelSetup {
        huge_pages: false,
        ..Default::default()
    };
    let vm = Vm::new(VmConfig {
        mem_mib: 128,
        regions: 2,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(accel),
    })
    .unwrap();
    let mut p = Program::dirtier(WORKSET_BASE, 4096, rate, Pattern::Uniform);
    p.dirtier = dirtier;
    p.accel_queue = Some(1);
    vm.programs().load(0, &p).unwrap();
    (vm, p)
}

fn hwpt_dirty(vm: &Vm) -> BTreeSet<u64> {
    let io = &vm.devices()[0];
    let pages = vm.mem_size() / 4096;
    let mut bm = vec![0u8; pages.div_ceil(8) as usize];
    io.fd
        .hwpt_get_dirty_bitmap(&mut HwptGetDirtyBitmap {
            hwpt_id: io.hwpt,
            flags: 0,
            __reserved: 0,
            iova: 0,
            length: vm.mem_size(),
            page_size: 4096,
            data: &mut bm,
        })
        .unwrap();
    (0..pages)
        .filter(|p| bm[(p / 8) as usize] >> (p % 8) & 1 != 0)
        .collect()
}

#[test]
fn accel_client_through_the_iommu() {
    need_kvm!();
    let (vm, _) = with_accel(false, 0.0);
    let io = &vm.devices()[0];
    io.fd
        .hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
            flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
            hwpt_id: io.hwpt,
            __reserved: 0,
        })
        .unwrap();
    vm.cpu_dirty_log().set_logging(true).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    vm.pause().unwrap();
    let c = vm.programs().counters(0);
    println!("{c:?}");
    assert!(c.jobs_completed > 200, "jobs completed: {}", c.jobs_completed);
    assert_eq!(c.errors, 0, "every result checked by the guest");
    assert!(c.jobs_submitted - c.jobs_completed < A_DEPTH);
    let done = vm.devices()[0].jobs_done();
    assert!(
        c.jobs_completed <= done && done <= c.jobs_submitted,
        "the device ran {done} of {} submitted",
        c.jobs_submitted
    );

    let mut kvm = PageBitmap::new(vm.mem_size() / 4096);
    vm.cpu_dirty_log().harvest(&mut kvm).unwrap();
    let kvm: BTreeSet<u64> = kvm.iter().collect();
    let iommu = hwpt_dirty(&vm);
    let cq = (ACCEL_AREA + A_CQ) / 4096;
    let dst: BTreeSet<u64> =
        ((ACCEL_AREA + A_DST) / 4096..(ACCEL_AREA + A_DST + A_DEPTH * A_DST_SIZE) / 4096).collect();
    // The device's writes (completions, destinations) are in the HWPT bitmap...
    assert!(iommu.contains(&cq));
    assert!(
        iommu.iter().all(|p| *p == cq || dst.contains(p)),
        "the IOMMU saw only device writes: {iommu:?}"
    );
    assert!(iommu.len() > 8);
    // ... and not in the KVM log, which holds what the guest CPU wrote.
    assert!(
        !kvm.contains(&cq) && kvm.is_disjoint(&dst),
        "device writes are not CPU writes"
    );
    assert!(kvm.contains(&((ACCEL_AREA + A_SQ) / 4096)), "the guest wrote SQEs");
    assert!(kvm.contains(&((ACCEL_AREA + A_SRC) / 4096)), "the guest wrote sources");
    assert!(kvm.contains(&(vmm::layout::ctrl_page(0) / 4096)));
}

#[test]
fn guest_continues_on_another_vm() {
    need_kvm!();
    let (a, _) = with_accel(true, 32.0);
    a.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.pause().unwrap();
    let snap = a.snapshots().take().unwrap();
    let before = a.programs().counters(0);
    assert!(before.pages_written > 100 && before.jobs_completed > 50, "{before:?}");
    let mut mem = vec![0u8; a.mem_size() as usize];
    vm_memory::Bytes::read_slice(&**a.memory(), &mut mem, vm_memory::GuestAddress(0)).unwrap();

    let (b, _) = with_accel(true, 32.0);
    vm_memory::Bytes::write_slice(&**b.memory(), &mem, vm_memory::GuestAddress(0)).unwrap();
    b.snapshots().restore(&snap).unwrap();
    // The verification digest of the vCPU state survives the round trip exactly, and sees a
    // change of one register.
    let saved = state::decode(&snap.vcpus, 1).unwrap();
    let reloaded = b.snapshots().save_vcpus().unwrap();
    assert_eq!(state::digest(&reloaded), state::digest(&saved));
    let mut bad = saved.clone();
    bad[0].regs.rbx ^= 1;
    assert_ne!(state::digest(&bad), state::digest(&saved));
    b.resume_devices().unwrap();
    b.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    b.pause().unwrap();
    let after = b.programs().counters(0);
    println!("before {before:?}\nafter  {after:?}");
    assert_eq!(b.vcpu_stopped(), None);
    assert!(
        after.pages_written > before.pages_written,
        "the dirtier advances from where it was"
    );
    assert!(
        after.jobs_completed > before.jobs_completed,
        "accel jobs keep completing"
    );
    // The guest TSC moved with the vCPU: it continues from where it was on the old VM (a new
    // VM's TSC starts near zero), and the pacing origin only ever moves forward (the dirtier
    // moves it past a long pause so the catch-up burst is bounded).
    let hz = b.tsc_khz() as u64 * 1000;
    assert!(
        after.tsc_now > before.tsc_now && after.tsc_now - before.tsc_now < 10 * hz,
        "{before:?} -> {after:?}"
    );
    assert!(after.tsc_start >= before.tsc_start);
    assert_eq!(after.errors, 0);
    // Stamps stay consistent: every one verifies, and none is from the future. The counter
    // is published once per batch, so the batch in progress may be ahead of it by a batch.
    let s = stamps(&b, 4096);
    let batch = vmm::programs::workload::BATCH as u64;
    assert!(s.iter().all(|x| x.generation <= after.pages_written + batch));
    assert!(
        s.iter().any(|x| x.generation > before.pages_written),
        "new stamps on the new VM"
    );
}

#[test]
fn bad_vcpu_state_is_refused() {
    need_kvm!();
    let a = Vm::new(small(64, DirtyLogMode::Bitmap, false)).unwrap();
    a.programs()
        .load(0, &Program::dirtier(WORKSET_BASE, 64, 8.0, Pattern::Sequential))
        .unwrap();
    a.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    a.pause().unwrap();
    let good = a.snapshots().take().unwrap();
    let b = Vm::new(small(64, DirtyLogMode::Bitmap, false)).unwrap();

    let mut v = good.clone();
    v.vcpus[8] = 99;
    let e = b.snapshots().restore(&v).unwrap_err();
    assert!(
        matches!(e, VmError::State(StateError::UnsupportedVersion { found: 99 })),
        "{e:?}"
    );
    assert!(std::error::Error::source(&e)
        .unwrap()
        .to_string()
        .contains("version 99"));

    let mut t = good.clone();
    t.vcpus.truncate(t.vcpus.len() - 100);
    assert!(matches!(
        b.snapshots().restore(&t).unwrap_err(),
        VmError::State(StateError::Truncated)
    ));

    let two = Vm::new(VmConfig {
        vcpus: 2,
        ..small(64, DirtyLogMode::Bitmap, false)
    })
    .unwrap();
    let e = two.snapshots().restore(&good).unwrap_err();
    assert!(
        matches!(e, VmError::State(StateError::WrongVcpuCount { found: 1, expected: 2 })),
        "{e:?}"
    );

    let mut c = good.clone();
    let n = c.vcpus.len();
    c.vcpus[n / 2] ^= 0x40;
    assert!(matches!(
        b.snapshots().restore(&c).unwrap_err(),
        VmError::State(StateError::Checksum)
    ));
    // Nothing was applied by the refusals: the good state still loads and runs.
    b.programs()
        .load(0, &Program::dirtier(WORKSET_BASE, 64, 8.0, Pattern::Sequential))
        .unwrap();
    b.snapshots().restore(&good).unwrap();
    b.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    b.pause().unwrap();
    assert_eq!(b.vcpu_stopped(), None);
}

#[test]
fn guest_ram_is_mapped_around_each_formats_reserved_window() {
    need_kvm!();
    for format in iommu::FormatKind::ALL {
        let vm = Vm::new(VmConfig {
            mem_mib: 256,
            regions: 2,
            vcpus: 1,
            dirty: DirtyLogMode::Bitmap,
            devices: DeviceSet::one(AccelSetup {
                format,
                ..Default::default()
            }),
        })
        .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        let io = &vm.devices()[0];
        let areas: Vec<(u64, u64)> = io
            .fd
            .ioas_areas(io.ioas)
            .unwrap()
            .into_iter()
            .map(|(iova, len, _)| (iova, iova + len))
            .collect();
        let want = match format {
            // The SMMU driver's software MSI window, [128 MiB, 129 MiB), stays unmapped.
            iommu::FormatKind::ArmLpaeS1 => vec![(0, 128 << 20), (129 << 20, 256 << 20)],
            // The x86 interrupt window is above this RAM: both slots map whole.
            _ => vec![(0, 128 << 20), (128 << 20, 256 << 20)],
        };
        assert_eq!(areas, want, "{format:?}");
        // The working set runs to the end of RAM, across the Arm window: the device reads
        // only the part below it.
        let ws_pages = ((256 << 20) - WORKSET_BASE) / 4096;
        let mut p = Program::dirtier(WORKSET_BASE, ws_pages, 16.0, Pattern::Uniform);
        p.accel_queue = Some(1);
        vm.programs().load(0, &p).unwrap();
        let reach: u64 = vm_memory::Bytes::read_obj(
            &**vm.memory(),
            vm_memory::GuestAddress(vmm::layout::ctrl_page(0) + C_DMA_PAGES),
        )
        .unwrap();
        let want = match format {
            iommu::FormatKind::ArmLpaeS1 => ((128 << 20) - WORKSET_BASE) / 4096,
            _ => ws_pages,
        };
        assert_eq!(reach, want, "{format:?}");
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let c = vm.programs().counters(0);
        assert!(c.jobs_completed > 0 && c.errors == 0, "{format:?}: {c:?}");
    }
}

/// Two devices, each driven by its own vCPU: every CRC32C job of device k writes its result
/// into device k+1's peer window through device k's IOMMU. Each window holds, at every slot
/// the last completed jobs used, the CRC the guest checked.
#[test]
fn crc_jobs_write_into_the_peers_window() {
    need_kvm!();
    let vm = Vm::new(VmConfig {
        mem_mib: 128,
        regions: 1,
        vcpus: 2,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet {
            accels: vec![AccelSetup::default(); 2],
            shared_domain: false,
        },
    })
    .unwrap();
    for v in 0..2u32 {
        let mut p = Program::dirtier(WORKSET_BASE + v as u64 * (8 << 20), 2048, 0.0, Pattern::Uniform);
        p.dirtier = false;
        p.accel_queue = Some(0);
        p.accel_device = v;
        vm.programs().load(v, &p).unwrap();
    }
    assert_eq!((vm.programs().peer_of(0), vm.programs().peer_of(1)), (Some(1), Some(0)));
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    vm.pause().unwrap();
    for v in 0..2u32 {
        let c = vm.programs().counters(v);
        assert!(c.jobs_completed > 100, "vCPU {v}: {c:?}");
        assert_eq!(c.errors, 0);
        let window = vm.devices()[vm.programs().peer_of(v).unwrap() as usize].peer_window();
        let mut checked = 0;
        for t in c.jobs_completed.saturating_sub(PEER_SLOTS - A_DEPTH)..c.jobs_completed {
            if t % 3 != 1 {
                continue;
            }
            let src = [t.to_le_bytes(), (!t).to_le_bytes()].concat();
            let at = ((t % PEER_SLOTS) * 4) as usize;
            assert_eq!(
                u32::from_le_bytes(window[at..at + 4].try_into().unwrap()),
                crc32c::crc32c(&src),
                "vCPU {v}'s job {t} in its peer's window"
            );
            checked += 1;
        }
        assert!(checked > 30, "{checked} jobs checked");
    }
    // A device's own window is written by its peer alone.
    let one = Vm::new(VmConfig {
        mem_mib: 128,
        regions: 1,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(AccelSetup::default()),
    })
    .unwrap();
    assert_eq!(one.programs().peer_of(0), None);
}

fn dma_vm(rate: f64, dma_mib: u64) -> (Vm, Program) {
    let vm = Vm::new(VmConfig {
        mem_mib: 128,
        regions: 1,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(AccelSetup {
            huge_pages: false,
            ..Default::default()
        }),
    })
    .unwrap();
    let mut p = Program::dirtier(WORKSET_BASE, 1024, 8.0, Pattern::Uniform);
    p.accel_queue = Some(1);
    p.dma = Some(DmaLoad {
        rate_mib_s: rate,
        base: WORKSET_BASE + (16 << 20),
        pages: dma_mib << 8,
    });
    (vm, p)
}

/// The paced DMA writer: the device dirties its working set at the rate asked (within 15 %,
/// measured from the chunks it completed), each write through the IOMMU (the HWPT bitmap
/// holds those pages and the CPU log does not), and the pages hold the source's bytes.
#[test]
fn the_dma_writer_dirties_at_the_rate_asked() {
    need_kvm!();
    for rate in [16.0, 96.0] {
        let (vm, p) = dma_vm(rate, 8);
        vm.programs().load(0, &p).unwrap();
        let io = &vm.devices()[0];
        io.fd
            .hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
                flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                hwpt_id: io.hwpt,
                __reserved: 0,
            })
            .unwrap();
        vm.cpu_dirty_log().set_logging(true).unwrap();
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let (c0, t0) = (vm.programs().counters(0).dma_chunks, std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(1000));
        let (c1, t1) = (vm.programs().counters(0).dma_chunks, std::time::Instant::now());
        vm.pause().unwrap();
        let achieved = (c1 - c0) as f64 * (DMA_CHUNK as f64 / 1048576.0) / (t1 - t0).as_secs_f64();
        println!("asked {rate} MiB/s, achieved {achieved:.1} MiB/s");
        assert!(
            (achieved / rate - 1.0).abs() < 0.15,
            "asked {rate}, achieved {achieved:.1}"
        );
        let c = vm.programs().counters(0);
        assert_eq!(c.errors, 0, "{c:?}");
        assert!(
            c.jobs_completed > 0 && c.pages_written > 0,
            "the rest of the program runs"
        );
        let dma = p.dma.unwrap();
        let set: BTreeSet<u64> = (dma.base / 4096..dma.base / 4096 + dma.pages).collect();
        let iommu = hwpt_dirty(&vm);
        let mut kvm = PageBitmap::new(vm.mem_size() / 4096);
        vm.cpu_dirty_log().harvest(&mut kvm).unwrap();
        let kvm: BTreeSet<u64> = kvm.iter().collect();
        // 8 MiB at 16 MiB/s and more: every page of the set was written in the second.
        assert!(set.is_subset(&iommu), "the IOMMU saw every page of the DMA set");
        assert!(kvm.is_disjoint(&set), "no CPU write in the DMA set");
        // Chunk 0 holds a copy of the source megabyte, from some 64-byte-aligned offset.
        let mut chunk = vec![0u8; DMA_CHUNK as usize];
        let mut src = vec![0u8; A_DMA_SRC_SIZE as usize];
        use vm_memory::Bytes;
        vm.memory()
            .read_slice(&mut chunk, vm_memory::GuestAddress(dma.base))
            .unwrap();
        vm.memory()
            .read_slice(&mut src, vm_memory::GuestAddress(ACCEL_AREA + A_DMA_SRC))
            .unwrap();
        assert!(
            (0..src.len() - chunk.len())
                .step_by(64)
                .any(|o| src[o..o + chunk.len()] == chunk[..]),
            "the DMA set holds copies of the source"
        );
    }
}

#[test]
fn a_dma_writer_that_cannot_work_is_refused() {
    need_kvm!();
    let (vm, p) = dma_vm(16.0, 8);
    let refuse = |p: &Program, what: &str| {
        let e = vm.programs().load(0, p).unwrap_err().to_string();
        assert!(e.contains(what), "{what}: {e}");
    };
    let mut q = p.clone();
    q.accel_queue = None;
    refuse(&q, "accel-client");
    let mut q = p.clone();
    q.dma.as_mut().unwrap().base = WORKSET_BASE;
    refuse(&q, "overlaps the program's working set");
    let mut q = p.clone();
    q.dma.as_mut().unwrap().pages = 15;
    refuse(&q, "whole 64 KiB chunks");
    let mut q = p.clone();
    q.dma.as_mut().unwrap().base = (128 << 20) - 4096 * 16;
    q.dma.as_mut().unwrap().pages = 32;
    refuse(&q, "whole 64 KiB chunks");
    let mut q = p.clone();
    q.dma.as_mut().unwrap().rate_mib_s = 0.0;
    refuse(&q, "rate");
    let one_queue = Vm::new(VmConfig {
        mem_mib: 128,
        regions: 1,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(AccelSetup {
            config: accel::AccelConfig {
                qp_num: 1,
                ..Default::default()
            },
            ..Default::default()
        }),
    })
    .unwrap();
    let mut q = p.clone();
    q.accel_queue = Some(0);
    let e = one_queue.programs().load(0, &q).unwrap_err().to_string();
    assert!(e.contains("second queue pair"), "{e}");
}
