#![allow(dead_code)]
use migration::*;
use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm::layout::WORKSET_BASE;
use vmm::*;

#[allow(unused_imports)]
pub use vmm::need_kvm;

/// A running source: the dirtier at `rate` MiB/s over 64 MiB and the accel-client, busy.
pub fn source_vm(mem_mib: u64, rate: f64, dirty: DirtyLogMode) -> Arc<Vm> {
    let vm = Vm::new(VmConfig {
        mem_mib,
        regions: 2,
        vcpus: 1,
        dirty,
        devices: DeviceSet::one(AccelSetup::default()),
    })
    .unwrap();
    let mut p = Program::dirtier(WORKSET_BASE, 16384, rate, Pattern::Uniform);
    p.accel_queue = Some(1);
    vm.programs().load(0, &p).unwrap();
    vm.resume().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    Arc::new(vm)
}

/// A destination on an ephemeral loopback port, receiving in a thread.
pub fn spawn_dest(opts: DestOptions) -> (String, JoinHandle<Result<Incoming, MigError>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    // The destination's events, in the test's output.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let h = std::thread::spawn(move || receive(&l, &opts));
    (addr, h)
}

pub fn opts(mode: DeviceTracking) -> SourceOptions {
    SourceOptions {
        mode,
        verify: VerifyMode::Gate,
        max_iterations: 10,
        ..Default::default()
    }
}
