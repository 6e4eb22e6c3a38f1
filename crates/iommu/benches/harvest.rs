//! read_and_clear over 64 GiB of IOVA mapped with 4 KiB leaves, at 0 %, 1 % and 100 % dirty,
//! against the naive per-IOVA root walk and a linear read+write pass over an array the size of
//! the leaf-PTE array, all in the same run. `cargo bench -p iommu --bench harvest`.
//! `livemig bench harvest` prints the same comparison as a table with ratios.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iommu::bench_kit::HarvestBench;
use iommu::FormatKind;
use std::time::{Duration, Instant};

const IOVA: u64 = 64 << 30;

fn harvest(c: &mut Criterion) {
    for fmt in [FormatKind::AmdV1, FormatKind::VtdSs, FormatKind::ArmLpaeS1] {
        for (label, frac) in [("0%", 0.0), ("1%", 0.01), ("100%", 1.0)] {
            let mut b = HarvestBench::new(fmt, IOVA, frac, fmt == FormatKind::AmdV1 && frac == 0.0);
            let mut g = c.benchmark_group(format!("harvest-64GiB/{fmt}/{label}"));
            g.throughput(Throughput::Bytes(IOVA));
            g.sample_size(10);
            g.warm_up_time(Duration::from_millis(500));
            g.measurement_time(Duration::from_secs(3));
            g.bench_function("walker", |bn| {
                bn.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        b.redirty();
                        let t = Instant::now();
                        std::hint::black_box(b.harvest());
                        total += t.elapsed();
                    }
                    total
                })
            });
            g.bench_function("naive", |bn| {
                bn.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        b.redirty();
                        let t = Instant::now();
                        std::hint::black_box(b.harvest_naive());
                        total += t.elapsed();
                    }
                    total
                })
            });
            if fmt == FormatKind::AmdV1 && frac == 0.0 {
                // The bandwidth baseline does not depend on the format or the dirty share.
                g.bench_function("bandwidth-pass", |bn| {
                    bn.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            b.bandwidth_reset();
                            let t = Instant::now();
                            std::hint::black_box(b.bandwidth_pass());
                            total += t.elapsed();
                        }
                        total
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, harvest);
criterion_main!(benches);
