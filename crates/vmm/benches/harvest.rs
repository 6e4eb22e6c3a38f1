//! Criterion: one CPU dirty harvest of a 1 GiB guest whose dirtier runs at 64 MiB/s, ring
//! against bitmap. `livemig bench cpu-dirty` sweeps rates and prints the table in
//! docs/benchmarks.md.

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::{Duration, Instant};
use vmm::DeviceSet;
use vmm::{DirtyLogMode, PageBitmap, Pattern, Program, Vm, VmConfig};

fn harvest(c: &mut Criterion) {
    if let Err(why) = vmm::kvm_for_tests() {
        println!("skipped: {why}");
        return;
    }
    let mut g = c.benchmark_group("cpu_dirty_harvest_1gib_64mib_s");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for (name, mode) in [
        ("ring", DirtyLogMode::Ring { entries: 65536 }),
        ("bitmap", DirtyLogMode::Bitmap),
    ] {
        let vm = Vm::new(VmConfig {
            mem_mib: 1024,
            regions: 1,
            vcpus: 1,
            dirty: mode,
            devices: DeviceSet::default(),
        })
        .unwrap();
        let ws = vmm::layout::WORKSET_BASE;
        vm.programs()
            .load(
                0,
                &Program::dirtier(ws, (1 << 30) / 4096 - ws / 4096, 64.0, Pattern::Sequential),
            )
            .unwrap();
        vm.cpu_dirty_log().set_logging(true).unwrap();
        vm.resume().unwrap();
        let mut out = PageBitmap::new(vm.ram_end() / 4096);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Ring collection the reaper does while we sleep is part of the cost.
                    let bg = vm.cpu_dirty_log().background_time();
                    std::thread::sleep(Duration::from_millis(10));
                    out.clear();
                    let t = Instant::now();
                    vm.cpu_dirty_log().harvest(&mut out).unwrap();
                    total += t.elapsed() + (vm.cpu_dirty_log().background_time() - bg);
                }
                total
            })
        });
        vm.pause().unwrap();
    }
    g.finish();
}

criterion_group!(benches, harvest);
criterion_main!(benches);
