//! Auto-converge's CPU throttle slows the guest by the percentage asked.

mod common;
use migration::throttle::Throttle;
use std::time::Duration;
use vmm::need_kvm;
use vmm::DirtyLogMode;

fn pages_in(vm: &vmm::Vm, d: Duration) -> u64 {
    let a = vm.programs().counters(0).pages_written;
    std::thread::sleep(d);
    vm.programs().counters(0).pages_written - a
}

#[test]
fn throttle_slows_the_guest_and_stopping_it_restores_the_rate() {
    need_kvm!();
    // Unpaced dirtier (rate 0 = as fast as the vCPU goes) so run time is what limits it.
    let vm = common::source_vm(128, 0.0, DirtyLogMode::Bitmap);
    let full = pages_in(&vm, Duration::from_millis(300));
    let mut t = Throttle::new(vm.clone());
    t.set(75);
    let slow = pages_in(&vm, Duration::from_millis(300));
    t.stop();
    let after = pages_in(&vm, Duration::from_millis(300));
    println!("pages in 300 ms: unthrottled {full}, 75 % throttle {slow}, after {after}");
    // 25 % of the time running, with pause/resume overheads: well under half the full rate.
    assert!(slow * 2 < full, "throttled {slow} vs {full}");
    // The unthrottled rate itself varies with host load; recovered means clearly above the
    // throttled rate again.
    assert!(
        after > slow * 2,
        "the rate recovers: {after} after, {slow} throttled, {full} before"
    );
    assert_eq!(vm.vcpu_stopped(), None);
}
