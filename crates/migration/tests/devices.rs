//! Migrations of a VM with several accelerators, each behind its own IOMMU domain or all
//! behind one, in each device-tracking mode: the destination rebuilds the same devices from
//! the list that went over the wire, and every device's client keeps completing jobs there.
//!
//! With two devices or more, each client's CRC32C jobs write into the next device's peer
//! window (peer-to-peer DMA), so every one of these migrations also checks the P2P order: the
//! source refuses to go on if any device's state changed after it was saved.

mod common;
use common::*;
use migration::*;
use std::sync::Arc;
use vfio::MigFlags;
use vmm::layout::WORKSET_BASE;
use vmm::*;

/// A source with `n` accelerators and `n` vCPUs: vCPU k runs the dirtier and drives device k.
/// Device 0 has the migration flags `first_flags`.
fn source(n: u32, shared_domain: bool, first_flags: MigFlags) -> Arc<Vm> {
    let mut accels = vec![AccelSetup::default(); n as usize];
    accels[0].config.flags = first_flags;
    let vm = Vm::new(VmConfig {
        mem_mib: 256,
        regions: 1,
        vcpus: n,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet { accels, shared_domain },
    })
    .unwrap();
    for k in 0..n {
        let mut p = Program::dirtier(WORKSET_BASE + k as u64 * (16 << 20), 4096, 8.0, Pattern::Uniform);
        p.accel_queue = Some(1);
        p.accel_device = k;
        vm.programs().load(k, &p).unwrap();
    }
    vm.resume().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    Arc::new(vm)
}

fn jobs(vm: &Vm) -> Vec<u64> {
    (0..vm.vcpu_count())
        .map(|v| vm.programs().counters(v).jobs_completed)
        .collect()
}

fn migrate_devices(n: u32, shared_domain: bool, mode: DeviceTracking) {
    migrate_with(
        n,
        shared_domain,
        mode,
        MigFlags::STOP_COPY | MigFlags::P2P | MigFlags::PRE_COPY,
    );
}

fn migrate_with(n: u32, shared_domain: bool, mode: DeviceTracking, first_flags: MigFlags) {
    let vm = source(n, shared_domain, first_flags);
    let before = jobs(&vm);
    assert!(
        before.iter().all(|&j| j > 0),
        "every device works on the source: {before:?}"
    );
    let (addr, dest) = spawn_dest(DestOptions::default());
    let info = migrate(&vm, &addr, &opts(mode), &MigrationControl::default())
        .unwrap_or_else(|e| panic!("{n} devices, shared {shared_domain}, {mode}: {}", e.chain()));
    let incoming = dest.join().unwrap().unwrap();
    assert_eq!(info.status, Status::Completed);
    assert_eq!(info.livemig.devices, n);
    assert_eq!(info.livemig.verified, Some(true), "{}", info.livemig.verify_detail);
    if mode != DeviceTracking::None {
        assert!(info.livemig.device_dirty_pages > 0, "device writes were tracked");
    }
    let d = &incoming.vm;
    assert_eq!(d.devices().len(), n as usize);
    assert_eq!(d.config().devices.shared_domain, shared_domain);
    let domains = d
        .devices()
        .iter()
        .filter(|x| std::ptr::eq(*x, &d.devices()[0]) || !x.same_domain(&d.devices()[0]))
        .count();
    assert_eq!(
        domains,
        if shared_domain { 1 } else { n as usize },
        "IOMMU domains on the destination"
    );
    // Each device's client goes on completing jobs on the destination.
    let at = jobs(d);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let later = jobs(d);
    for k in 0..n as usize {
        assert!(
            later[k] > at[k],
            "device {k} completes jobs on the destination: {at:?} -> {later:?}"
        );
    }
}

#[test]
fn two_devices_each_behind_its_own_domain() {
    need_kvm!();
    migrate_devices(2, false, DeviceTracking::Iommu);
}

#[test]
fn two_devices_behind_one_domain() {
    need_kvm!();
    migrate_devices(2, true, DeviceTracking::Iommu);
}

#[test]
fn three_devices_with_their_own_dma_logs() {
    need_kvm!();
    migrate_devices(3, false, DeviceTracking::DeviceLog);
}

#[test]
fn two_devices_behind_one_domain_with_their_own_dma_logs() {
    need_kvm!();
    migrate_devices(2, true, DeviceTracking::DeviceLog);
}

/// Every flag set on the first device, beside two devices with P2P: one device may lack P2P
/// (it stops first), and each set migrates verified.
#[test]
fn devices_with_and_without_p2p_mixed() {
    need_kvm!();
    for flags in MigFlags::DEFINED {
        migrate_with(3, false, DeviceTracking::Iommu, flags);
    }
}

/// The order the P2P states exist for, broken on purpose: the devices stop one at a time,
/// without the P2P step, while the guest runs. Device 1 goes on writing CRCs into device 0's
/// window after device 0 saved its state (and the guest goes on ringing device 0's
/// doorbells), so the saved state lacks those writes. The source finds device 0's state
/// changed since it was saved and rolls back: the guest runs on at the source, and the
/// destination discards what it received. The same VM migrates verified in the right order
/// (`two_devices_each_behind_its_own_domain` and the tests beside it). That the peer's write
/// alone is such a change, and the P2P step alone prevents it, is shown without a VM in
/// `accel/tests/jobs.rs` (`a_peer_write_after_the_stop_is_lost_unless_peers_enter_p2p_first`).
#[test]
fn breaking_the_p2p_order_loses_a_peer_write_and_is_caught() {
    need_kvm!();
    let vm = source(2, false, MigFlags::STOP_COPY | MigFlags::P2P | MigFlags::PRE_COPY);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let ctl = MigrationControl::default();
    let o = SourceOptions {
        sabotage: Some(Sabotage::SkipP2p),
        ..opts(DeviceTracking::Iommu)
    };
    let e = migrate(&vm, &addr, &o, &ctl).expect_err("a lost peer write must stop the migration");
    let e = e.chain();
    assert!(
        e.contains("accel0: its state changed after it was saved"),
        "the device that lost the write is named: {e}"
    );
    assert!(dest.join().unwrap().is_err(), "the destination discards");
    let info = ctl.snapshot();
    assert_eq!(
        (info.status, info.livemig.outcome),
        (Status::Failed, Outcome::RolledBack)
    );
    assert!(info.downtime.is_none(), "the destination never resumed");
    // Rolled back: both clients complete jobs again on the source, with no error.
    assert!(vm.running());
    let at = jobs(&vm);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let later = jobs(&vm);
    assert!(later[0] > at[0] && later[1] > at[1], "{at:?} -> {later:?}");
    assert_eq!(
        (vm.programs().counters(0).errors, vm.programs().counters(1).errors),
        (0, 0)
    );
}

/// A guest of more than 3 GiB: RAM goes on at 4 GiB, past the hole. The device's DMA writer
/// copies into that high RAM at IOVA = GPA above 4 GiB, the dirtier writes there too, and
/// the migration carries both, verified, with the IOMMU's dirty bits as the device tracker.
#[test]
fn a_guest_with_ram_past_the_hole_migrates() {
    need_kvm!();
    let vm = Vm::new(VmConfig {
        mem_mib: 3072 + 64,
        regions: 1,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet::one(AccelSetup::default()),
    })
    .unwrap();
    let mut p = Program::dirtier(1 << 32, 4096, 16.0, Pattern::Uniform);
    p.accel_queue = Some(1);
    p.dma = Some(DmaLoad {
        rate_mib_s: 32.0,
        base: (1 << 32) + (32 << 20),
        pages: 8 << 8,
    });
    vm.programs().load(0, &p).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let vm = Arc::new(vm);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let info = migrate(&vm, &addr, &opts(DeviceTracking::Iommu), &MigrationControl::default())
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    let incoming = dest.join().unwrap().unwrap();
    assert_eq!(info.livemig.verified, Some(true), "{}", info.livemig.verify_detail);
    assert!(
        info.livemig.guest_dma_write_mib_s > 16.0,
        "{}",
        info.livemig.guest_dma_write_mib_s
    );
    assert!(
        info.livemig.device_dirty_pages >= 8 << 8,
        "the DMA set's pages were tracked"
    );
    let d = &incoming.vm;
    assert_eq!(d.ram_end(), (1 << 32) + (64 << 20));
    let at = d.programs().counters(0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let later = d.programs().counters(0);
    assert!(later.dma_chunks > at.dma_chunks && later.pages_written > at.pages_written);
    assert_eq!(later.errors, 0);
}

/// Two devices and one vCPU: device 1 has no client, so its guest driver never sets it up,
/// but device 0's CRC jobs fill its peer window. That window is all device 1's state, and it
/// arrives whole. (A device not set up once saved its match data alone, losing the window,
/// and both sides' digests agreed.)
#[test]
fn a_device_its_guest_never_set_up_keeps_what_its_peer_wrote() {
    need_kvm!();
    let vm = Vm::new(VmConfig {
        mem_mib: 256,
        regions: 1,
        vcpus: 1,
        dirty: DirtyLogMode::Bitmap,
        devices: DeviceSet {
            accels: vec![AccelSetup::default(); 2],
            shared_domain: false,
        },
    })
    .unwrap();
    let mut p = Program::dirtier(WORKSET_BASE, 4096, 8.0, Pattern::Uniform);
    p.accel_queue = Some(1);
    vm.programs().load(0, &p).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let vm = Arc::new(vm);
    // The window as it arrived: taken the moment the destination's guest resumes.
    let arrived = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = arrived.clone();
    let (addr, dest) = spawn_dest(DestOptions {
        on_running: Some(OnRunning(Arc::new(move |d: &Arc<Vm>| {
            *keep.lock().unwrap() = d.devices()[1].peer_window();
        }))),
        ..Default::default()
    });
    let info = migrate(&vm, &addr, &opts(DeviceTracking::Iommu), &MigrationControl::default())
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    dest.join().unwrap().unwrap();
    assert_eq!(info.livemig.verified, Some(true), "{}", info.livemig.verify_detail);
    // The source holds its copy paused, device 1 as it was saved.
    let held = vm.devices()[1].peer_window();
    assert!(held.iter().any(|&b| b != 0), "device 0 wrote device 1's window");
    let arrived = arrived.lock().unwrap().clone();
    let same = held.iter().zip(&arrived).filter(|(a, b)| a == b).count();
    // The guest may have run a job or two before the window was read.
    assert!(
        same > held.len() * 9 / 10,
        "{same} of {} window bytes arrived",
        held.len()
    );
}
