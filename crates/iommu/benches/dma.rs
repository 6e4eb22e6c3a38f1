//! DMA write throughput of 4 KiB buffers through the IOTLB against a plain memcpy of the same
//! bytes to the same pages, in the same run. `cargo bench -p iommu --bench dma`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iommu::bench_kit::DmaBench;
use iommu::FormatKind;
use std::time::Duration;

fn dma(c: &mut Criterion) {
    for fmt in FormatKind::ALL {
        // 256 pages fit the 1024-entry IOTLB; 16384 pages do not.
        for pages in [256u64, 16384] {
            let mut b = DmaBench::new(fmt, pages);
            let mut g = c.benchmark_group(format!("dma-write-4KiB/{fmt}/{pages}-pages"));
            g.throughput(Throughput::Bytes(b.bytes()));
            g.measurement_time(Duration::from_secs(2));
            g.bench_function("dma", |bn| bn.iter(|| b.dma_pass()));
            g.bench_function("memcpy", |bn| bn.iter(|| b.memcpy_pass()));
            g.finish();
        }
    }
}

criterion_group!(benches, dma);
criterion_main!(benches);
