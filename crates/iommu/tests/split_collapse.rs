//! The eager split/collapse policy: dirty granularity, leaf sizes, and translations that stay
//! valid while DMA runs.

use iommu::{AnonMemory, DirtyBitmap, Domain, DomainConfig, FormatKind, HostMemory, Perm, SplitPolicy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn harvest(dom: &Domain, iova: u64, len: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut rec = |i, l| v.push((i, l));
    dom.read_and_clear_dirty(
        iova,
        len,
        0,
        &mut DirtyBitmap {
            bitmap: Some(&mut rec),
            gather: None,
        },
    )
    .unwrap();
    dom.flush_iotlb_all();
    v
}

#[test]
fn eager_split_gives_4k_granularity_and_collapse_restores_huge_leaves() {
    let mem = Arc::new(AnonMemory::new(GIB as usize, true).unwrap());
    for fmt in FormatKind::ALL {
        for policy in [SplitPolicy::Keep, SplitPolicy::EagerSplit] {
            let mut cfg = DomainConfig::new(fmt);
            cfg.split_policy = policy;
            let dom = Domain::new(cfg).unwrap();
            let iova = GIB;
            dom.map(iova, GIB, mem.clone(), 0, Perm::RW).unwrap();
            assert_eq!(dom.leaf_histogram(), BTreeMap::from([(30, 1)]), "{fmt}");
            dom.read_and_clear_dirty(iova, GIB, 0, &mut DirtyBitmap::default())
                .unwrap();
            dom.set_dirty_tracking(true).unwrap();
            let dma = dom.attach(1);
            dma.write(iova + 3 * MIB + 0x123, &[1]).unwrap();
            let got = harvest(&dom, iova, GIB);
            match policy {
                SplitPolicy::Keep => {
                    assert_eq!(dom.leaf_histogram(), BTreeMap::from([(30, 1)]));
                    assert_eq!(got, vec![(iova, GIB)], "{fmt}: whole 1 GiB leaf");
                }
                SplitPolicy::EagerSplit => {
                    assert_eq!(dom.leaf_histogram(), BTreeMap::from([(12, 262_144)]));
                    assert_eq!(got, vec![(iova + 3 * MIB, 4096)], "{fmt}: one 4 KiB page");
                }
            }
            // A write after disable, then collapse: the dirt survives in the huge leaf.
            dma.write(iova + 5 * MIB, &[2]).unwrap();
            dom.set_dirty_tracking(false).unwrap();
            assert_eq!(dom.leaf_histogram(), BTreeMap::from([(30, 1)]), "{fmt}: collapsed back");
            dom.set_dirty_tracking(true).unwrap();
            let got = harvest(&dom, iova, GIB);
            let covered: u64 = got.iter().map(|r| r.1).sum();
            let contiguous = got.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0);
            match policy {
                SplitPolicy::Keep => assert_eq!(got, vec![(iova, GIB)], "{fmt}"),
                // After collapse the 1 GiB leaf was dirty; splitting again spreads that to
                // every 4 KiB piece, the conservative answer (reported as runs of pieces).
                SplitPolicy::EagerSplit => {
                    assert_eq!(dom.leaf_histogram(), BTreeMap::from([(12, 262_144)]), "{fmt}");
                    assert_eq!((got[0].0, covered, contiguous), (iova, GIB, true), "{fmt}")
                }
            }
            assert_eq!(harvest(&dom, iova, GIB), vec![], "{fmt}");
        }
    }
}

#[test]
fn collapse_needs_contiguity_and_equal_permissions() {
    let mem = Arc::new(AnonMemory::new(8 * MIB as usize, false).unwrap());
    for fmt in FormatKind::ALL {
        let mut cfg = DomainConfig::new(fmt);
        cfg.split_policy = SplitPolicy::EagerSplit;
        let dom = Domain::new(cfg).unwrap();
        dom.set_dirty_tracking(true).unwrap();
        // Mapped while tracking: 4 KiB leaves. [0, 2M) contiguous RW; [2M, 4M) mixed perms;
        // [4M, 6M) discontiguous host pages.
        dom.map(0, 2 * MIB, mem.clone(), 0, Perm::RW).unwrap();
        dom.map(2 * MIB, MIB, mem.clone(), 2 * MIB, Perm::RW).unwrap();
        dom.map(3 * MIB, MIB, mem.clone(), 3 * MIB, Perm::READ).unwrap();
        dom.map(4 * MIB, MIB, mem.clone(), 5 * MIB, Perm::RW).unwrap();
        dom.map(5 * MIB, MIB, mem.clone(), 4 * MIB, Perm::RW).unwrap();
        assert_eq!(dom.leaf_histogram(), BTreeMap::from([(12, 1536)]), "{fmt}");
        dom.set_dirty_tracking(false).unwrap();
        assert_eq!(dom.leaf_histogram(), BTreeMap::from([(12, 1024), (21, 1)]), "{fmt}");
        assert_eq!(dom.iova_to_phys(0x1234), Some(mem.host_ptr() as u64 + 0x1234));
    }
}

/// DMA keeps translating correctly while tracking toggles and leaves split and collapse.
#[test]
fn split_and_collapse_keep_translations_valid_under_dma() {
    let mem = Arc::new(AnonMemory::new(64 * MIB as usize, false).unwrap());
    for fmt in FormatKind::ALL {
        let mut cfg = DomainConfig::new(fmt);
        cfg.split_policy = SplitPolicy::EagerSplit;
        cfg.iotlb_entries = 256;
        let dom = Domain::new(cfg).unwrap();
        dom.map(0, 64 * MIB, mem.clone(), 0, Perm::RW).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..2u64 {
            let dma = dom.attach(t as u32);
            let (stop, errors, mem) = (stop.clone(), errors.clone(), mem.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Each thread owns every other 8-byte slot, so it can check its own data.
                    let off = rng.random_range(0..64 * MIB / 16) * 16 + t * 8;
                    n += 1;
                    if dma.write(off, &n.to_le_bytes()).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut b = [0u8; 8];
                    if dma.read(off, &mut b).is_err() || u64::from_le_bytes(b) != n {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut h = [0u8; 8];
                    mem.read(off as usize, &mut h);
                    if u64::from_le_bytes(h) != n {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n
            }));
        }
        for _ in 0..6 {
            dom.set_dirty_tracking(true).unwrap();
            assert_eq!(dom.leaf_histogram().keys().copied().collect::<Vec<_>>(), vec![12]);
            std::thread::sleep(std::time::Duration::from_millis(20));
            dom.set_dirty_tracking(false).unwrap();
            assert_eq!(dom.leaf_histogram(), BTreeMap::from([(21, 32)]), "{fmt}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(total > 1000, "{fmt}: DMA made progress ({total})");
        assert_eq!(
            errors.load(Ordering::Relaxed),
            0,
            "{fmt}: no fault or bad data during split/collapse"
        );
        assert_eq!(dom.faults().1, 0, "{fmt}");
    }
}
