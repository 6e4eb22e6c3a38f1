//! End-to-end migrations of a busy guest over loopback TCP, verified, in every device-tracking
//! mode and with parallel page connections.

mod common;
use common::*;
use migration::*;
use vmm::DirtyLogMode;

fn migrate_ok(mode: DeviceTracking, channels: u16, dirty: DirtyLogMode) -> MigrationInfo {
    let vm = source_vm(256, 32.0, dirty);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let ctl = MigrationControl::default();
    let o = SourceOptions { channels, ..opts(mode) };
    let info = migrate(&vm, &addr, &o, &ctl).unwrap_or_else(|e| panic!("{mode}: {}", e.chain()));
    let incoming = dest.join().unwrap().unwrap();
    println!("{}", serde_json::to_string_pretty(&info).unwrap());
    assert_eq!(info.status, Status::Completed);
    assert_eq!(info.livemig.verified, Some(true), "{}", info.livemig.verify_detail);
    assert!(info.livemig.dest_pages_after > info.livemig.dest_pages_before);
    assert!(info.livemig.dest_jobs_after > info.livemig.dest_jobs_before);
    assert!(info.downtime.is_some());
    let v = incoming.report.verify.unwrap();
    assert!(v.digest_ok && v.reason.is_empty(), "{}", v.reason);
    // The source moved: its vCPUs stay paused.
    assert!(!info.livemig.source_vcpus_running);
    info
}

#[test]
fn iommu_mode() {
    need_kvm!();
    let i = migrate_ok(DeviceTracking::Iommu, 0, DirtyLogMode::Ring { entries: 65536 });
    assert!(i.livemig.device_dirty_pages > 0, "the IOMMU reported device writes");
}

#[test]
fn device_log_mode() {
    need_kvm!();
    let i = migrate_ok(DeviceTracking::DeviceLog, 0, DirtyLogMode::Bitmap);
    assert!(i.livemig.device_dirty_pages > 0, "the device's DMA log reported writes");
}

#[test]
fn none_mode_is_correct_just_slower() {
    need_kvm!();
    let i = migrate_ok(DeviceTracking::None, 0, DirtyLogMode::Ring { entries: 65536 });
    // Every sync counts all 256 MiB of DMA-mapped memory as dirty.
    assert_eq!(i.livemig.device_dirty_pages, 65536 * i.ram.dirty_sync_count);
    assert!(i.ram.dirty_sync_count >= 1);
}

#[test]
fn four_page_channels() {
    need_kvm!();
    let i = migrate_ok(DeviceTracking::Iommu, 4, DirtyLogMode::Ring { entries: 65536 });
    assert_eq!(i.livemig.channels, 4);
}
