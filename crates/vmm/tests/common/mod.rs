#![allow(dead_code)]
use vm_memory::{Bytes, GuestAddress};
use vmm::programs::ctrl::{check_page, PageCheck, Stamp};
use vmm::*;

#[allow(unused_imports)]
pub use vmm::need_kvm;

pub const WS: u64 = vmm::layout::WORKSET_BASE;

/// Every stamped page of `[WS, WS + pages)` (vCPU 0's dirtier), verified: all must verify
/// except at most one stamp the vCPU was writing when it stopped. Returns the stamps and the
/// in-flight page, if any.
pub fn stamps(vm: &Vm, pages: u64) -> Vec<Stamp> {
    stamps_with_in_flight(vm, pages).0
}

pub fn stamps_with_in_flight(vm: &Vm, pages: u64) -> (Vec<Stamp>, Option<u64>) {
    let published = vm.programs().counters(0).pages_written;
    let mut out = Vec::new();
    let mut in_flight = None;
    for p in 0..pages {
        let gpa = WS + p * 4096;
        let mut b = [0u8; 32];
        vm.memory().read_slice(&mut b, GuestAddress(gpa)).unwrap();
        match check_page(gpa / 4096, &b, published) {
            PageCheck::Clean => {}
            PageCheck::Stamped(s) => out.push(s),
            PageCheck::InFlight => {
                assert!(
                    in_flight.is_none(),
                    "two torn stamps: {in_flight:?} and {:#x}",
                    gpa / 4096
                );
                in_flight = Some(gpa / 4096);
            }
            PageCheck::Bad(e) => panic!("page {gpa:#x}: {e}"),
        }
    }
    (out, in_flight)
}

pub fn small(mem_mib: u64, dirty: DirtyLogMode, accel: bool) -> VmConfig {
    VmConfig {
        mem_mib,
        regions: 1,
        vcpus: 1,
        dirty,
        devices: if accel {
            DeviceSet::one(AccelSetup::default())
        } else {
            DeviceSet::default()
        },
    }
}
