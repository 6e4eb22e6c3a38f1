//! The parallel harvest against the serial one: twin domains given the same mappings and the
//! same DMA writes must report the same runs and gather the same ranges, over 24 GiB of
//! IOVA (so the parallel path runs with jobs of one 1 GiB table), every format, huge pages on
//! and off, random sub-ranges and NO_CLEAR; and a concurrency stress across twelve 1 GiB
//! tables with writers racing the parallel harvester (0 misses, 0 stale pages).

mod common;
use common::runs;
use iommu::{
    AnonMemory, DirtyBitmap, Domain, DomainConfig, FormatKind, HarvestParallelism, IotlbGather, Perm, DIRTY_NO_CLEAR,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const GIB: u64 = 1 << 30;
const SPAN_GIB: u64 = 24;

fn dom(fmt: FormatKind, huge: bool, par: HarvestParallelism) -> Domain {
    let mut cfg = DomainConfig::new(fmt);
    cfg.huge_pages = huge;
    cfg.iotlb_entries = 64;
    cfg.harvest = par;
    Domain::new(cfg).unwrap()
}

fn harvest(d: &Domain, s: u64, e: u64, flags: u32) -> (Vec<(u64, u64)>, IotlbGather) {
    let mut got = Vec::new();
    let mut g = IotlbGather::new();
    {
        let mut rec = |i, l| got.push((i, l));
        d.read_and_clear_dirty(
            s,
            e - s,
            flags,
            &mut DirtyBitmap {
                bitmap: Some(&mut rec),
                gather: Some(&mut g),
            },
        )
        .unwrap();
    }
    if flags & DIRTY_NO_CLEAR == 0 {
        d.iotlb_sync(&g);
    }
    (got, g)
}

fn differential(fmt: FormatKind, huge: bool, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mem = Arc::new(AnonMemory::new(GIB as usize, true).unwrap());
    let a = dom(fmt, huge, HarvestParallelism::SERIAL);
    let b = dom(fmt, huge, HarvestParallelism::forced(1 + rng.random_range(1..5usize)));
    let mut regions = Vec::new();
    for k in 0..SPAN_GIB {
        if rng.random_range(0..5) == 0 {
            continue;
        }
        let align: u32 = [12, 12, 13, 16, 20, 21, 22, 30][rng.random_range(0..8)];
        let units = if align == 30 { 1 } else { rng.random_range(1..4u64) };
        let off = if align == 30 {
            0
        } else {
            (rng.random_range(0..(GIB >> align) - units - 1)) << align
        };
        let iova = k * GIB + off;
        let len = (units << align)
            + if align < 30 {
                rng.random_range(0..3u64) * 4096
            } else {
                0
            };
        let host = iova % GIB;
        if host + len > GIB {
            continue;
        }
        for d in [&a, &b] {
            d.map(iova, len, mem.clone(), host, Perm::RW).unwrap();
        }
        regions.push((iova, len));
    }
    for d in [&a, &b] {
        d.set_dirty_tracking(true).unwrap();
        harvest(d, 0, SPAN_GIB * GIB, 0);
    }
    let (da, db) = (a.attach(1), b.attach(1));
    for round in 0..60 {
        for _ in 0..rng.random_range(0..200) {
            let (iova, len) = regions[rng.random_range(0..regions.len())];
            let at = iova + rng.random_range(0..len / 8) * 8;
            da.write_u64(at, round).unwrap();
            db.write_u64(at, round).unwrap();
        }
        let (s, e) = if rng.random_bool(0.3) {
            (0, SPAN_GIB * GIB)
        } else {
            let s = rng.random_range(0..SPAN_GIB * GIB / 4096) * 4096;
            let e = (s + rng.random_range(1..(SPAN_GIB * GIB / 4096)) * 4096).min(SPAN_GIB * GIB);
            (s, e)
        };
        let flags = if rng.random_bool(0.2) { DIRTY_NO_CLEAR } else { 0 };
        let (ga, gga) = harvest(&a, s, e, flags);
        let (gb, ggb) = harvest(&b, s, e, flags);
        assert!(
            gb.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "{fmt} seed {seed} round {round}: unordered {gb:x?}"
        );
        assert_eq!(
            runs(&ga),
            runs(&gb),
            "{fmt} huge={huge} seed {seed} round {round} [{s:#x},{e:#x}) flags {flags}"
        );
        assert_eq!(gga, ggb, "{fmt} seed {seed} round {round}: gathers");
    }
}

#[test]
fn parallel_matches_serial() {
    let n: u64 = std::env::var("SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    for seed in 0..n {
        for fmt in FormatKind::ALL {
            for huge in [false, true] {
                differential(fmt, huge, seed);
            }
        }
    }
}

/// Concurrency: writers over 12 1 GiB tables, a parallel harvester copying reported pages.
fn stress(fmt: FormatKind, par: HarvestParallelism, rounds: u64) {
    const REG: u64 = 12;
    const PAGES: u64 = 64;
    let mem = Arc::new(AnonMemory::new((REG * PAGES * 4096) as usize, false).unwrap());
    let d = dom(fmt, false, par);
    let iova_of = |r: u64, p: u64| r * GIB + 0x20_0000 * r + p * 4096;
    for r in 0..REG {
        d.map(iova_of(r, 0), PAGES * 4096, mem.clone(), r * PAGES * 4096, Perm::RW)
            .unwrap();
    }
    d.set_dirty_tracking(true).unwrap();
    harvest(&d, 0, (REG + 1) * GIB, 0);
    d.flush_iotlb_all();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let dma = d.attach(t as u32);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let mut written = vec![false; (REG * PAGES) as usize];
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) || n < 10000 {
                    n += 1;
                    let (r, p) = (rng.random_range(0..REG), rng.random_range(0..PAGES));
                    dma.write_u64(iova_of(r, p) + t * 8, (t << 56) | n).unwrap();
                    written[(r * PAGES + p) as usize] = true;
                }
                written
            })
        })
        .collect();
    let size = (REG * PAGES * 4096) as usize;
    let mut dest = vec![0u8; size];
    let mut reported = vec![false; (REG * PAGES) as usize];
    let once = |dest: &mut Vec<u8>, reported: &mut Vec<bool>| {
        let (got, _) = harvest(&d, 0, (REG + 1) * GIB, 0);
        for (i, l) in got {
            let mut a = i;
            while a < i + l {
                let r = a / GIB;
                let p = (a - iova_of(r, 0)) / 4096;
                let k = (r * PAGES + p) as usize;
                reported[k] = true;
                mem.read(k * 4096, &mut dest[k * 4096..(k + 1) * 4096]);
                a += 4096;
            }
        }
    };
    for _ in 0..rounds {
        once(&mut dest, &mut reported);
    }
    stop.store(true, Ordering::Relaxed);
    let w: Vec<Vec<bool>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    once(&mut dest, &mut reported);
    let mut src = vec![0u8; size];
    mem.read(0, &mut src);
    let misses = (0..reported.len())
        .filter(|&k| w.iter().any(|w| w[k]) && !reported[k])
        .count();
    let stale = (0..reported.len())
        .filter(|&k| src[k * 4096..(k + 1) * 4096] != dest[k * 4096..(k + 1) * 4096])
        .count();
    println!("{fmt}: misses {misses} stale {stale}");
    assert_eq!((misses, stale), (0, 0), "{fmt}");
}

#[test]
fn parallel_stress() {
    let par = HarvestParallelism::forced(3);
    for fmt in FormatKind::ALL {
        stress(fmt, par, 400);
    }
}
