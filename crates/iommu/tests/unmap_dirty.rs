//! Unmap that returns the dirty bits of what it removes (`docs/viommu.md#unmap-with-dirty`):
//! exact reports for every format and leaf size, and a concurrency test where a device writes
//! right up to the unmap and not one write is lost.

use iommu::{AnonMemory, DirtyBitmap, DmaError, Domain, DomainConfig, FormatKind, IotlbGather, Perm};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

fn domain(format: FormatKind, huge: bool) -> Domain {
    let mut cfg = DomainConfig::new(format);
    cfg.huge_pages = huge;
    Domain::new(cfg).unwrap()
}

fn clean_and_enable(d: &Domain, iova: u64, len: u64) {
    let mut g = IotlbGather::default();
    d.read_and_clear_dirty(
        iova,
        len,
        0,
        &mut DirtyBitmap {
            bitmap: None,
            gather: Some(&mut g),
        },
    )
    .unwrap();
    d.iotlb_sync(&g);
    d.set_dirty_tracking(true).unwrap();
}

fn unmap_dirty(d: &Domain, iova: u64, len: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    d.unmap_read_dirty(iova, len, &mut |a, l| v.push((a, l))).unwrap();
    v
}

/// Each format, 4 KiB and huge leaves: only leaves a write dirtied are reported, whole; an
/// unmap that cuts a huge leaf reports the removed piece (which inherited the dirt) and leaves
/// the rest mapped and dirty.
#[test]
fn reports_exactly_the_dirty_leaves_it_removes() {
    const BASE: u64 = 1 << 30;
    for format in FormatKind::ALL {
        let mem = Arc::new(AnonMemory::new(8 << 20, false).unwrap());
        // 4 KiB leaves.
        let d = domain(format, false);
        d.map(BASE, 8 << 20, mem.clone(), 0, Perm::RW).unwrap();
        clean_and_enable(&d, BASE, 8 << 20);
        let dma = d.attach(1);
        dma.write_u64(BASE + 0x3008, 1).unwrap();
        dma.read_u64(BASE + 0x5000).unwrap();
        dma.write(BASE + 0x6ff8, &[1; 16]).unwrap(); // two pages
        assert_eq!(
            unmap_dirty(&d, BASE, 0x10000),
            vec![
                (BASE + 0x3000, 0x1000),
                (BASE + 0x6000, 0x1000),
                (BASE + 0x7000, 0x1000)
            ],
            "{format}"
        );
        assert_eq!(
            dma.write_u64(BASE + 0x3008, 2).unwrap_err().errno(),
            libc::EFAULT,
            "{format}: unmapped"
        );
        assert_eq!(unmap_dirty(&d, BASE + 0x10000, 0x10000), vec![], "{format}: clean");

        // A 2 MiB leaf cut by the unmap: the piece removed carries the leaf's dirt.
        // Two maps, so that AMD cannot make one 4 MiB leaf of them.
        let d = domain(format, true);
        d.map(BASE, 2 << 20, mem.clone(), 0, Perm::RW).unwrap();
        d.map(BASE + (2 << 20), 2 << 20, mem.clone(), 2 << 20, Perm::RW)
            .unwrap();
        assert_eq!(d.leaf_histogram().get(&21), Some(&2), "{format}");
        clean_and_enable(&d, BASE, 4 << 20);
        let dma = d.attach(1);
        dma.write_u64(BASE + (2 << 20) + 8, 1).unwrap();
        let got = unmap_dirty(&d, BASE + (2 << 20), 0x4000);
        let merged: u64 = got.iter().map(|&(_, l)| l).sum();
        assert_eq!(got.first().map(|g| g.0), Some(BASE + (2 << 20)), "{format}: {got:x?}");
        assert_eq!(merged, 0x4000, "{format}: the removed piece, whole: {got:x?}");
        // The rest of the leaf stays mapped and still dirty.
        let mut rest = Vec::new();
        d.read_and_clear_dirty(
            BASE + (2 << 20),
            2 << 20,
            iommu::DIRTY_NO_CLEAR,
            &mut DirtyBitmap {
                bitmap: Some(&mut |a, l| rest.push((a, l))),
                gather: None,
            },
        )
        .unwrap();
        let rest_len: u64 = rest.iter().map(|&(_, l)| l).sum();
        assert_eq!(rest_len, (2 << 20) - 0x4000, "{format}: {rest:x?}");
        // And the untouched 2 MiB leaf below is reported by nobody.
        assert_eq!(unmap_dirty(&d, BASE, 2 << 20), vec![], "{format}");
    }
    // A domain without dirty ops refuses.
    let mut cfg = DomainConfig::new(FormatKind::VtdSs);
    cfg.dirty_tracking = false;
    let d = Domain::new(cfg).unwrap();
    let mem = Arc::new(AnonMemory::new(1 << 20, false).unwrap());
    d.map(0, 1 << 20, mem, 0, Perm::RW).unwrap();
    let e = d.unmap_read_dirty(0, 4096, &mut |_, _| {}).unwrap_err();
    assert_eq!(e.errno(), libc::EOPNOTSUPP);
}

/// The shadow design's hazard: the guest unmaps a buffer while the device is still writing to
/// it. The migration copies what each harvest reports, then what the unmap reports; after
/// the unmap no write can land, so the copy must equal memory on every page. With a plain
/// unmap (the sabotage), writes between the last harvest and the unmap are lost.
#[test]
fn a_write_just_before_an_unmap_is_never_lost() {
    for format in FormatKind::ALL {
        let (missed, writes) = run_unmap_race(format, false);
        assert!(writes > 3_000, "{format}: the device wrote {writes} times");
        assert_eq!(missed, 0, "{format}: pages lost across the unmap");
    }
    let (missed, _) = run_unmap_race(FormatKind::VtdSs, true);
    eprintln!("sabotaged: {missed} pages lost");
    assert!(missed > 0, "the sabotaged unmap must lose writes: {missed}");
}

/// Maps, lets a device write, harvests and copies a few times, unmaps with dirty and copies,
/// `ROUNDS` times over; returns the pages where the copy and memory differ, and the writes made.
fn run_unmap_race(format: FormatKind, plain_unmap: bool) -> (usize, u64) {
    const LEN: u64 = 64 << 12;
    const ROUNDS: usize = 60;
    const IOVA: u64 = 1 << 32;
    let mem = Arc::new(AnonMemory::new(LEN as usize, false).unwrap());
    let d = domain(format, false);
    d.set_dirty_tracking(true).unwrap();
    let mut copy = vec![0u8; LEN as usize];
    let mut missed = 0;
    let writes = Arc::new(AtomicU64::new(0));
    for _ in 0..ROUNDS {
        d.map(IOVA, LEN, mem.clone(), 0, Perm::RW).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (dma, stop, writes) = (d.attach(1), stop.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut x = writes.load(Ordering::Relaxed);
                // Write until the unmap makes writes fault, then stop when told.
                loop {
                    x += 1;
                    match dma.write_u64(IOVA + (x * 4104) % (LEN - 8), x) {
                        Ok(()) => {
                            writes.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(DmaError::Fault { .. }) if stop.load(Ordering::Relaxed) => break,
                        Err(_) => std::hint::spin_loop(),
                    }
                }
            })
        };
        let mut copy_pages = |pages: &mut dyn Iterator<Item = (u64, u64)>| {
            for (a, l) in pages {
                let off = (a - IOVA) as usize;
                mem.read(off, &mut copy[off..off + l as usize]);
            }
        };
        let wait_for_writes = |n: u64| {
            let (w0, t0) = (writes.load(Ordering::Relaxed), std::time::Instant::now());
            while writes.load(Ordering::Relaxed) < w0 + n {
                assert!(t0.elapsed().as_secs() < 30, "the device stopped writing");
                std::thread::yield_now();
            }
        };
        for _ in 0..3 {
            wait_for_writes(20);
            let mut found = Vec::new();
            let mut g = IotlbGather::default();
            d.read_and_clear_dirty(
                IOVA,
                LEN,
                0,
                &mut DirtyBitmap {
                    bitmap: Some(&mut |a, l| found.push((a, l))),
                    gather: Some(&mut g),
                },
            )
            .unwrap();
            d.iotlb_sync(&g);
            copy_pages(&mut found.into_iter());
        }
        wait_for_writes(20);
        let mut at_unmap = Vec::new();
        if plain_unmap {
            d.unmap(IOVA, LEN).unwrap();
        } else {
            d.unmap_read_dirty(IOVA, LEN, &mut |a, l| at_unmap.push((a, l)))
                .unwrap();
        }
        copy_pages(&mut at_unmap.into_iter());
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let mut now = vec![0u8; LEN as usize];
        mem.read(0, &mut now);
        missed += (0..LEN as usize / 4096)
            .filter(|&i| copy[i * 4096..(i + 1) * 4096] != now[i * 4096..(i + 1) * 4096])
            .count();
        copy.copy_from_slice(&now); // start the next round in agreement
    }
    (missed, writes.load(Ordering::Relaxed))
}
