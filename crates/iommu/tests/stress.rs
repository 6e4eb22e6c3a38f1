//! Concurrency stress: writer threads DMA into random pages while a harvester reads, clears
//! and invalidates in a loop, copying every reported page to a destination image, the way a
//! migration does. After the writers stop and one final harvest, every page written after
//! tracking was enabled must have been reported at least once (misses counted and asserted
//! zero), and the destination must equal the source byte for byte.

use iommu::{AnonMemory, DirtyBitmap, Domain, DomainConfig, FormatKind, HarvestParallelism, IotlbGather, Perm};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const PAGES: u64 = 256;
/// With the harvest forced onto several threads: three leaf tables across a 1 GiB boundary,
/// so that two threads each collect and scan one 1 GiB table's part.
const PAGES_PARALLEL: u64 = 3 * 512;
const IOVA: u64 = 0x80_0000_0000;
/// Two leaf tables below a 1 GiB boundary, one above.
const IOVA_PARALLEL: u64 = 0x80_4000_0000 - (4 << 20);
const WRITERS: u64 = 3;
/// Writers keep going until the harvester has run this many rounds alongside them.
const MIN_ROUNDS: u64 = 3000;
const MIN_WRITES_PER_THREAD: u64 = 20_000;

fn run(fmt: FormatKind, huge: bool) {
    run_with(fmt, huge, IOVA, PAGES, HarvestParallelism::default(), MIN_ROUNDS);
    // Every harvest split over three threads (two 1 GiB tables' parts: the thread that
    // reports scans straight into the recorder, the others buffer).
    let forced = HarvestParallelism::forced(3);
    // Starting helper threads next to three busy writers on a small host is slow: fewer
    // rounds, each still racing every writer.
    run_with(fmt, huge, IOVA_PARALLEL, PAGES_PARALLEL, forced, MIN_ROUNDS / 10);
}

fn run_with(fmt: FormatKind, huge: bool, base: u64, pages: u64, par: HarvestParallelism, min_rounds: u64) {
    let size = pages * 4096;
    let mem = Arc::new(AnonMemory::new(size as usize, false).unwrap());
    let mut cfg = DomainConfig::new(fmt);
    cfg.huge_pages = huge;
    cfg.iotlb_entries = 512;
    cfg.harvest = par;
    let dom = Domain::new(cfg).unwrap();
    dom.map(base, size, mem.clone(), 0, Perm::RW).unwrap();
    dom.read_and_clear_dirty(base, size, 0, &mut DirtyBitmap::default())
        .unwrap();
    dom.flush_iotlb_all();
    dom.set_dirty_tracking(true).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let dma = dom.attach(t as u32);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut written = vec![false; pages as usize];
                let mut rng = SmallRng::seed_from_u64(t);
                let mut n = 0u64;
                while n < MIN_WRITES_PER_THREAD || !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let page = rng.random_range(0..pages);
                    let stamp = (t << 56) | n;
                    dma.write(base + page * 4096 + t * 16, &stamp.to_le_bytes()).unwrap();
                    written[page as usize] = true;
                }
                written
            })
        })
        .collect();

    let mut dest = vec![0u8; size as usize];
    let mut reported = vec![false; pages as usize];
    let mut rounds = 0u64;
    let harvest = |reported: &mut Vec<bool>, dest: &mut Vec<u8>| {
        let mut pages = Vec::new();
        let mut gather = IotlbGather::new();
        {
            let mut rec = |iova: u64, len: u64| pages.extend(((iova - base) / 4096)..((iova + len - base) / 4096));
            dom.read_and_clear_dirty(
                base,
                size,
                0,
                &mut DirtyBitmap {
                    bitmap: Some(&mut rec),
                    gather: Some(&mut gather),
                },
            )
            .unwrap();
        }
        dom.iotlb_sync(&gather);
        for p in pages {
            reported[p as usize] = true;
            let off = (p * 4096) as usize;
            mem.read(off, &mut dest[off..off + 4096]);
        }
    };
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let w: Vec<Vec<bool>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
            done.store(true, Ordering::Release);
            w
        })
    };
    while !done.load(Ordering::Acquire) {
        harvest(&mut reported, &mut dest);
        rounds += 1;
        if rounds == min_rounds {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let written = watcher.join().unwrap();
    harvest(&mut reported, &mut dest); // the final harvest

    let mut writes = 0;
    let mut misses = 0;
    for p in 0..pages as usize {
        if written.iter().any(|w| w[p]) {
            writes += 1;
            if !reported[p] {
                misses += 1;
            }
        }
    }
    let mut src = vec![0u8; size as usize];
    mem.read(0, &mut src);
    let stale = (0..pages as usize)
        .filter(|&p| src[p * 4096..(p + 1) * 4096] != dest[p * 4096..(p + 1) * 4096])
        .count();
    println!(
        "{fmt} huge={huge} pages={pages} threads={}: {rounds} harvest rounds, {writes} pages written, {misses} misses, {stale} stale pages",
        par.threads
    );
    assert!(rounds >= min_rounds, "the harvester ran concurrently");
    assert_eq!(misses, 0, "{fmt}: written pages never reported");
    assert_eq!(stale, 0, "{fmt}: destination pages differing from the source");
}

#[test]
fn stress_amd_v1() {
    run(FormatKind::AmdV1, false);
    run(FormatKind::AmdV1, true);
}

#[test]
fn stress_vtd_ss() {
    run(FormatKind::VtdSs, false);
    run(FormatKind::VtdSs, true);
}

#[test]
fn stress_arm_lpae_s1() {
    run(FormatKind::ArmLpaeS1, false);
    run(FormatKind::ArmLpaeS1, true);
}
