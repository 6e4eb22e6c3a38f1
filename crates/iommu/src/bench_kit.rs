//! Workloads shared by the criterion benchmarks (`benches/`) and `livemig bench`, so both
//! measure the same thing, always next to a baseline measured in the same run.

use crate::{AnonMemory, DirtyBitmap, Dma, Domain, DomainConfig, FormatKind, HarvestParallelism, IotlbGather, Perm};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Host memory behind the benchmark mappings. Large IOVA spaces alias it over and over, so a
/// 1 TiB IOVA space costs page tables, not 1 TiB of RAM.
const ALIAS: u64 = 64 << 20;

/// A domain with `iova_bytes` of IOVA mapped by 4 KiB leaves, and a DMA handle to dirty it.
pub struct HarvestBench {
    pub domain: Domain,
    dma: Dma,
    pub iova_bytes: u64,
    /// Pages dirtied per round, spread uniformly (a fixed hash decides which).
    dirty_pages: Vec<u64>,
    /// The bandwidth baseline's array: one u64 per leaf PTE.
    pte_sized: Vec<u64>,
    _mem: Arc<AnonMemory>,
}

/// Base IOVA of the mapped range.
pub const BASE: u64 = 1 << 40;

impl HarvestBench {
    /// Maps `iova_bytes` (a multiple of 4 KiB) and selects `dirty_fraction` of its pages,
    /// spread uniformly. `with_bandwidth_array` allocates the baseline array (8 bytes per
    /// 4 KiB of IOVA).
    pub fn new(fmt: FormatKind, iova_bytes: u64, dirty_fraction: f64, with_bandwidth_array: bool) -> Self {
        let threshold = (dirty_fraction * u32::MAX as f64) as u64;
        let dirty_pages = (0..iova_bytes >> 12)
            .filter(|p| dirty_fraction >= 1.0 || (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) < threshold)
            .collect();
        Self::with_pages(fmt, iova_bytes, dirty_pages, with_bandwidth_array)
    }

    /// Maps `iova_bytes` and dirties `dirty_bytes` of it in runs of `run_bytes`, the runs
    /// evenly spaced over the whole range: dirt clustered as a guest's working set is.
    pub fn clustered(fmt: FormatKind, iova_bytes: u64, dirty_bytes: u64, run_bytes: u64) -> Self {
        let runs = (dirty_bytes / run_bytes).max(1);
        let stride = iova_bytes / runs / run_bytes * run_bytes;
        let dirty_pages = (0..runs)
            .flat_map(|r| {
                let first = (r * stride) >> 12;
                first..first + (run_bytes >> 12)
            })
            .collect();
        Self::with_pages(fmt, iova_bytes, dirty_pages, false)
    }

    fn with_pages(fmt: FormatKind, iova_bytes: u64, dirty_pages: Vec<u64>, with_bandwidth_array: bool) -> Self {
        let mem = Arc::new(AnonMemory::new(ALIAS as usize, false).expect("mmap"));
        let mut cfg = DomainConfig::new(fmt);
        cfg.huge_pages = false;
        let domain = Domain::new(cfg).expect("domain");
        let mut iova = BASE;
        while iova < BASE + iova_bytes {
            let len = ALIAS.min(BASE + iova_bytes - iova);
            domain.map(iova, len, mem.clone(), 0, Perm::RW).expect("map");
            iova += len;
        }
        let pages = iova_bytes >> 12;
        domain
            .read_and_clear_dirty(BASE, iova_bytes, 0, &mut DirtyBitmap::default())
            .expect("clear");
        domain.set_dirty_tracking(true).expect("enable");
        let dma = domain.attach(1);
        let pte_sized = if with_bandwidth_array {
            vec![0x7000_0000_0000_0061u64; pages as usize]
        } else {
            Vec::new()
        };
        Self {
            domain,
            dma,
            iova_bytes,
            dirty_pages,
            pte_sized,
            _mem: mem,
        }
    }

    /// Harvests from now on use one thread, or every core for every size.
    pub fn set_threads(&self, one: bool) {
        self.domain.set_harvest_parallelism(if one {
            HarvestParallelism::SERIAL
        } else {
            HarvestParallelism {
                threads: 0,
                min_entries: 0,
                ..HarvestParallelism::default()
            }
        });
    }

    /// Number of pages each round dirties.
    pub fn dirty_count(&self) -> usize {
        self.dirty_pages.len()
    }

    /// Dirties the selected pages through real DMA writes (untimed setup), on every core: as
    /// DMA from several engines arrives, and so that every core has just run when the timed
    /// harvest starts. On a host whose idle cores sleep, a harvest after a one-core setup
    /// would otherwise wait milliseconds for its helper to be woken (docs/host-notes.md).
    pub fn redirty(&self) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = self.dirty_pages.len().div_ceil(cores).max(1);
        std::thread::scope(|s| {
            for part in self.dirty_pages.chunks(chunk) {
                let dma = self.dma.clone();
                s.spawn(move || {
                    for &p in part {
                        dma.write(BASE + (p << 12), &[1]).expect("dma");
                    }
                });
            }
        });
    }

    /// [`Self::redirty`], then 20 ms with nothing to run: the harvest that follows starts
    /// with the other cores asleep, as after a quiet spell in a VMM.
    pub fn redirty_then_idle(&self) {
        self.redirty();
        std::thread::sleep(Duration::from_millis(20));
    }

    /// One harvest with the generic walker into a counting sink; returns pages reported.
    pub fn harvest(&self) -> u64 {
        self.harvest_with(false)
    }

    /// One harvest with the Linux ≤ 6.x per-IOVA root walk.
    pub fn harvest_naive(&self) -> u64 {
        self.harvest_with(true)
    }

    fn harvest_with(&self, naive: bool) -> u64 {
        let mut n = 0u64;
        let mut gather = IotlbGather::new();
        {
            let mut rec = |_iova: u64, len: u64| n += len >> 12;
            let mut out = DirtyBitmap {
                bitmap: Some(&mut rec),
                gather: Some(&mut gather),
            };
            let r = if naive {
                self.domain
                    .read_and_clear_dirty_naive(BASE, self.iova_bytes, 0, &mut out)
            } else {
                self.domain.read_and_clear_dirty(BASE, self.iova_bytes, 0, &mut out)
            };
            r.expect("harvest");
        }
        self.domain.iotlb_sync(&gather);
        n
    }

    /// The bandwidth baseline: one linear pass reading and writing the PTE-sized array.
    pub fn bandwidth_pass(&mut self) -> u64 {
        let mut acc = 0u64;
        for e in self.pte_sized.iter_mut() {
            acc |= *e;
            *e &= !0x40;
        }
        std::hint::black_box(acc)
    }

    /// The floor for any harvest that has to look at every leaf PTE: a read-only pass over
    /// the PTE-sized array, split over all available cores. Returns the minimum of `runs`.
    pub fn time_read_floor(&self, runs: usize) -> Duration {
        self.time_read_pass(runs, std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// A read-only pass over the PTE-sized array on `threads` threads (minimum of `runs`).
    pub fn time_read_pass(&self, runs: usize, threads: usize) -> Duration {
        let chunk = self.pte_sized.len().div_ceil(threads).max(1);
        min_time(
            runs,
            || {},
            || {
                std::thread::scope(|s| {
                    let hs: Vec<_> = self
                        .pte_sized
                        .chunks(chunk)
                        .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &e| a | (e & 0x40))))
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, |a, b| a | b)
                })
            },
        )
    }

    /// Restores the array after a pass, so every pass does the same work (untimed).
    pub fn bandwidth_reset(&mut self) {
        self.pte_sized.fill(0x7000_0000_0000_0061);
    }

    /// Minimum time of `runs` bandwidth passes, each after an untimed reset.
    pub fn time_bandwidth(&mut self, runs: usize) -> Duration {
        let mut best = Duration::MAX;
        for _ in 0..runs {
            self.bandwidth_reset();
            let t = Instant::now();
            std::hint::black_box(self.bandwidth_pass());
            best = best.min(t.elapsed());
        }
        best
    }
}

/// Times `f` `n` times after running `setup` (untimed) before each, returning the minimum.
pub fn min_time<T>(n: usize, mut setup: impl FnMut(), mut f: impl FnMut() -> T) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..n {
        setup();
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed());
    }
    best
}

/// DMA throughput workload: 4 KiB writes through the IOTLB to a working set of pages.
pub struct DmaBench {
    pub dma: Dma,
    pub pages: u64,
    buf: Vec<u8>,
    /// The memcpy baseline's destination, as large as the working set.
    plain: Vec<u8>,
    _mem: Arc<AnonMemory>,
    _domain: Domain,
}

impl DmaBench {
    /// `pages` of working set, tracking on (so the first write per page per round sets D).
    pub fn new(fmt: FormatKind, pages: u64) -> Self {
        let mem = Arc::new(AnonMemory::new((pages << 12) as usize, false).expect("mmap"));
        let mut cfg = DomainConfig::new(fmt);
        cfg.huge_pages = false;
        let domain = Domain::new(cfg).expect("domain");
        domain.map(BASE, pages << 12, mem.clone(), 0, Perm::RW).expect("map");
        domain.set_dirty_tracking(true).expect("enable");
        let dma = domain.attach(1);
        let bench = Self {
            dma,
            pages,
            buf: vec![0xa5; 4096],
            plain: vec![0x5a; (pages << 12) as usize],
            _mem: mem,
            _domain: domain,
        };
        bench.dma_pass(); // fault in host pages, warm the IOTLB
        bench
    }

    /// One 4 KiB DMA write to every page of the working set.
    pub fn dma_pass(&self) {
        for p in 0..self.pages {
            self.dma.write(BASE + (p << 12), &self.buf).expect("dma");
        }
    }

    /// The baseline: a plain memcpy of the same bytes to as many pages of ordinary memory
    /// (DMA copies are volatile, since guest memory is shared with running vCPUs).
    pub fn memcpy_pass(&mut self) {
        for p in 0..self.pages as usize {
            self.plain[p << 12..(p + 1) << 12].copy_from_slice(&self.buf);
        }
        std::hint::black_box(&self.plain);
    }

    pub fn bytes(&self) -> u64 {
        self.pages << 12
    }
}
