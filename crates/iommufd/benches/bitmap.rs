//! Harvest of 64 GiB of IOVA at 4 KiB granularity with 1 % of pages dirty, through iommufd's
//! `hwpt_get_dirty_bitmap` and through type1's GET_BITMAP, in the same run.
//! `cargo bench -p iommufd --bench bitmap`; `livemig bench bitmap` prints the ratio.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iommu::FormatKind;
use iommufd::bench_kit::BitmapBench;
use std::time::{Duration, Instant};

fn bitmap(c: &mut Criterion) {
    let mut b = BitmapBench::new(FormatKind::VtdSs, 64 << 30, 0.01);
    let mut g = c.benchmark_group("dirty-bitmap-64GiB-1%");
    g.throughput(Throughput::Bytes(b.iova_bytes));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    for which in ["iommufd", "type1"] {
        g.bench_function(which, |bn| {
            bn.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    b.redirty();
                    let t = Instant::now();
                    if which == "iommufd" {
                        b.iommufd_get()
                    } else {
                        b.type1_get()
                    }
                    total += t.elapsed();
                    std::hint::black_box(b.bits_set());
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
