//! Verification must catch a loss, in both modes: the test-only sabotage switches drop a
//! dirty page from the final round, flip a byte of device state, or change a vCPU register,
//! each after the source took its own digest. The gate refuses before the guest resumes and
//! the source runs on; the audit lets the guest resume, then fails loudly, and the source
//! holds the original, paused and resumable. The migrations of `modes.rs`, the same but for the
//! sabotage, verify: the check tells the two apart.

mod common;
use common::*;
use migration::*;
use std::sync::Arc;
use std::time::Duration;
use vmm::{DirtyLogMode, Vm};

fn run(
    verify: VerifyMode,
    sabotage: Sabotage,
) -> (
    Arc<Vm>,
    Result<MigrationInfo, MigError>,
    MigrationInfo,
    Result<Incoming, MigError>,
) {
    let vm = source_vm(128, 32.0, DirtyLogMode::Bitmap);
    let (addr, dest) = spawn_dest(DestOptions::default());
    let ctl = MigrationControl::default();
    let o = SourceOptions {
        verify,
        sabotage: Some(sabotage),
        ..opts(DeviceTracking::Iommu)
    };
    let r = migrate(&vm, &addr, &o, &ctl);
    let d = dest.join().unwrap();
    (vm, r, ctl.snapshot(), d)
}

fn expected(s: Sabotage) -> &'static str {
    match s {
        Sabotage::DropFinalPage => "page(s) of guest memory differ",
        Sabotage::FlipDeviceByte => "device state differs",
        Sabotage::CorruptVcpuRegister => "vCPU state differs",
        Sabotage::SkipP2p => "changed after it was saved",
        // Needs a vIOMMU to have anything to change (tests/viommu.rs).
        Sabotage::CorruptPlatformState => "platform (vIOMMU) state differs",
    }
}

const ALL: [Sabotage; 3] = [
    Sabotage::DropFinalPage,
    Sabotage::FlipDeviceByte,
    Sabotage::CorruptVcpuRegister,
];

#[test]
fn the_gate_refuses_every_sabotage_and_the_source_runs_on() {
    need_kvm!();
    for s in ALL {
        let (vm, r, info, d) = run(VerifyMode::Gate, s);
        let e = r.expect_err("a sabotaged migration must fail").chain();
        println!("{s:?}: {e}");
        assert!(e.contains(expected(s)), "{s:?}: {e}");
        assert_eq!(info.status, Status::Failed);
        assert_eq!(info.livemig.outcome, Outcome::RolledBack);
        assert!(info.downtime.is_none(), "the destination never resumed");
        assert!(
            matches!(d, Err(MigError::Verification(_))),
            "{s:?}: the destination discarded"
        );
        // Rolled back: the guest runs again on the source.
        assert!(vm.running());
        let c0 = vm.programs().counters(0);
        std::thread::sleep(Duration::from_millis(150));
        assert!(vm.programs().counters(0).pages_written > c0.pages_written);
    }
}

#[test]
fn the_audit_fails_loudly_and_the_source_holds_the_original() {
    need_kvm!();
    for s in ALL {
        let (vm, r, info, d) = run(VerifyMode::Audit, s);
        let e = r.expect_err("a sabotaged migration must fail").chain();
        println!("{s:?}: {e}");
        assert!(e.contains(expected(s)), "{s:?}: {e}");
        assert_eq!(info.status, Status::Failed);
        assert_eq!(info.livemig.outcome, Outcome::Held);
        assert_eq!(info.livemig.destination, DestState::Discarded);
        assert_eq!(info.livemig.verified, Some(false));
        assert!(
            info.downtime.is_some(),
            "the guest did resume there: no blackout was spent"
        );
        assert!(
            matches!(d, Err(MigError::Verification(_))),
            "{s:?}: the destination stopped its guest"
        );
        // The source holds the guest, paused; resuming it (an operator's `cont`) works.
        assert!(!vm.running());
        let c0 = vm.programs().counters(0);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(vm.programs().counters(0), c0, "held paused");
        vm.resume_devices().unwrap();
        vm.resume().unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let c1 = vm.programs().counters(0);
        assert!(
            c1.pages_written > c0.pages_written && c1.errors == 0,
            "{c0:?} -> {c1:?}"
        );
    }
}
