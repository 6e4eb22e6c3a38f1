//! Migrating a guest that programs its own IOMMU while its device keeps writing
//! (`docs/viommu.md`), over real TCP with real KVM guests: each design with each tracking mode
//! that applies, verified, with the guest remapping throughout pre-copy and at the
//! switchover; and the shadow design's losses (no dirty read at unmap, no IOVA → GPA
//! translation) caught by the verification.

mod common;
use common::*;
use migration::*;
use std::sync::Arc;
use std::time::Duration;
use vmm::layout::WORKSET_BASE;
use vmm::*;

/// A running source: the vIOMMU client on vCPU 1, the dirtier on vCPU 0.
fn viommu_vm(mode: ViommuMode) -> Arc<Vm> {
    let vm = Vm::new(VmConfig {
        mem_mib: 128,
        regions: 1,
        vcpus: 2,
        dirty: DirtyLogMode::Ring { entries: 65536 },
        devices: DeviceSet::one(AccelSetup {
            viommu: mode,
            huge_pages: false,
            ..Default::default()
        }),
    })
    .unwrap();
    vm.programs()
        .load(0, &Program::dirtier(WORKSET_BASE, 8192, 16.0, Pattern::Uniform))
        .unwrap();
    vm.programs().load(1, &Program::viommu_client(0, 1)).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    Arc::new(vm)
}

fn remaps(vm: &Vm) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    vm.memory()
        .read_obj::<u64>(GuestAddress(layout::ctrl_page(1) + programs::ctrl::K_REMAPS))
        .unwrap()
}

#[test]
fn both_designs_migrate_verified_with_every_tracking_mode_that_applies() {
    need_kvm!();
    for (mode, tracking) in [
        (ViommuMode::Nested, DeviceTracking::Iommu),
        (ViommuMode::Nested, DeviceTracking::None),
        (ViommuMode::Shadow, DeviceTracking::Iommu),
        (ViommuMode::Shadow, DeviceTracking::DeviceLog),
        (ViommuMode::Shadow, DeviceTracking::None),
    ] {
        let vm = viommu_vm(mode);
        let before = remaps(&vm);
        let (addr, dest) = spawn_dest(DestOptions::default());
        let info = migrate(&vm, &addr, &opts(tracking), &MigrationControl::default())
            .unwrap_or_else(|e| panic!("{mode}, {tracking}: {}", e.chain()));
        let incoming = dest.join().unwrap().unwrap();
        let what = format!("{mode}, {tracking}");
        println!(
            "{what}: {} ms downtime, {} device-dirty pages, {}",
            info.downtime.unwrap_or(0),
            info.livemig.device_dirty_pages,
            info.livemig.verify_detail
        );
        assert_eq!(info.status, Status::Completed, "{what}");
        assert_eq!(
            info.livemig.verified,
            Some(true),
            "{what}: {}",
            info.livemig.verify_detail
        );
        assert!(remaps(&vm) > before + 20, "{what}: the guest remapped during pre-copy");
        assert!(info.livemig.device_dirty_pages > 0, "{what}");
        // The destination's guest goes on remapping and checking, without an error.
        let dvm = incoming.vm;
        let (r0, c0) = (remaps(&dvm), dvm.programs().counters(1));
        std::thread::sleep(Duration::from_millis(300));
        let c1 = dvm.programs().counters(1);
        assert!(remaps(&dvm) > r0, "{what}: remaps on the destination");
        assert!(c1.jobs_completed > c0.jobs_completed, "{what}: jobs on the destination");
        assert_eq!(c1.errors, 0, "{what}: the guest found every buffer as it expected");
    }
}

#[test]
fn a_device_log_behind_a_nested_viommu_is_refused_and_the_source_runs_on() {
    need_kvm!();
    let vm = viommu_vm(ViommuMode::Nested);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let e = migrate(
        &vm,
        &addr,
        &opts(DeviceTracking::DeviceLog),
        &MigrationControl::default(),
    )
    .expect_err("refused")
    .chain();
    assert!(e.contains("stage-1"), "{e}");
    let _ = dest.join();
    assert!(vm.running());
    let c0 = vm.programs().counters(1);
    std::thread::sleep(Duration::from_millis(100));
    assert!(vm.programs().counters(1).jobs_completed > c0.jobs_completed);
}

/// The checks that must see the loss: with the shadow vIOMMU's unmap no longer reading the
/// dirty bits, or its bits merged untranslated, the gate refuses and the source runs on.
#[test]
fn the_shadow_sabotages_fail_verification() {
    need_kvm!();
    for (what, tracking) in [
        ("skip the dirty read before unmap", DeviceTracking::Iommu),
        ("skip the log read after unmap", DeviceTracking::DeviceLog),
        ("skip the IOVA -> GPA translation", DeviceTracking::Iommu),
    ] {
        let vm = viommu_vm(ViommuMode::Shadow);
        let d = &vm.devices()[0];
        if what.contains("translation") {
            d.sabotage_skip_translation(true);
        } else {
            d.sabotage_skip_unmap_dirty(true);
        }
        let (addr, dest) = spawn_dest(DestOptions::default());
        let r = migrate(&vm, &addr, &opts(tracking), &MigrationControl::default());
        let e = r.expect_err("a sabotaged migration must fail").chain();
        println!("{what}: {e}");
        assert!(e.contains("page(s) of guest memory differ"), "{what}: {e}");
        assert!(matches!(dest.join().unwrap(), Err(MigError::Verification(_))), "{what}");
        assert!(vm.running(), "{what}: rolled back, the source runs on");
    }
}

/// The platform state is in the digest: a nested vIOMMU's queue head moved by one on the wire
/// loads at the destination without complaint, and the gate refuses it.
#[test]
fn a_corrupted_platform_state_fails_verification() {
    need_kvm!();
    let vm = viommu_vm(ViommuMode::Nested);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let o = SourceOptions {
        sabotage: Some(Sabotage::CorruptPlatformState),
        ..opts(DeviceTracking::Iommu)
    };
    let e = migrate(&vm, &addr, &o, &MigrationControl::default())
        .expect_err("a sabotaged migration must fail")
        .chain();
    assert!(e.contains("platform (vIOMMU) state differs"), "{e}");
    assert!(matches!(dest.join().unwrap(), Err(MigError::Verification(_))));
    assert!(vm.running(), "rolled back, the source runs on");
}
