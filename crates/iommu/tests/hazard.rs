//! The IOTLB hazard, proven both ways, and fault behaviour.

use iommu::{
    AnonMemory, DirtyBitmap, DmaError, Domain, DomainConfig, Fault, FaultReason, FormatKind, IotlbGather, Perm,
};
use std::sync::Arc;

const BASE: u64 = 0x4000_0000;

fn setup(fmt: FormatKind) -> (Domain, Arc<AnonMemory>) {
    let mem = Arc::new(AnonMemory::new(64 << 12, false).unwrap());
    let mut cfg = DomainConfig::new(fmt);
    cfg.huge_pages = false; // 4 KiB dirty granularity
    let dom = Domain::new(cfg).unwrap();
    dom.map(BASE, 64 << 12, mem.clone(), 0, Perm::RW).unwrap();
    // As iommufd enables: clear everything (Arm entries are born dirty), then enable.
    dom.read_and_clear_dirty(BASE, 64 << 12, 0, &mut DirtyBitmap::default())
        .unwrap();
    dom.set_dirty_tracking(true).unwrap();
    (dom, mem)
}

/// Read-and-clear; with `sync`, invalidate the gathered range as iommufd does.
fn harvest(dom: &Domain, sync: bool) -> Vec<u64> {
    let mut pages = Vec::new();
    let mut gather = IotlbGather::new();
    {
        let mut rec = |iova: u64, len: u64| pages.extend((iova..iova + len).step_by(4096));
        dom.read_and_clear_dirty(
            BASE,
            64 << 12,
            0,
            &mut DirtyBitmap {
                bitmap: Some(&mut rec),
                gather: Some(&mut gather),
            },
        )
        .unwrap();
    }
    if sync {
        dom.iotlb_sync(&gather);
    }
    pages
}

#[test]
fn clearing_without_invalidation_loses_a_write() {
    for fmt in FormatKind::ALL {
        let (dom, mem) = setup(fmt);
        let dma = dom.attach(1);
        let page = BASE + 5 * 4096;
        dma.write(page, &[1]).unwrap();
        assert_eq!(harvest(&dom, false), vec![page], "{fmt}: first write reported");
        // The IOTLB still says "dirty already set": this write skips the PTE entirely.
        dma.write(page, &[2]).unwrap();
        let mut b = [0u8];
        mem.read(5 * 4096, &mut b);
        assert_eq!(b[0], 2, "{fmt}: the data landed");
        assert_eq!(
            harvest(&dom, false),
            Vec::<u64>::new(),
            "{fmt}: ... but the write was lost"
        );
        // It stays lost: nothing will ever report it.
        assert_eq!(harvest(&dom, true), Vec::<u64>::new(), "{fmt}: still lost");
    }
}

#[test]
fn clearing_with_invalidation_loses_nothing() {
    for fmt in FormatKind::ALL {
        let (dom, _mem) = setup(fmt);
        let dma = dom.attach(1);
        let page = BASE + 5 * 4096;
        for round in 0..5u8 {
            dma.write(page, &[round]).unwrap();
            dma.write(page + 8, &[round]).unwrap();
            assert_eq!(harvest(&dom, true), vec![page], "{fmt}: round {round}");
        }
        assert_eq!(harvest(&dom, true), Vec::<u64>::new(), "{fmt}: nothing new");
    }
}

#[test]
fn harvest_of_part_of_a_leaf_gathers_the_whole_leaf() {
    const MIB: u64 = 1 << 20;
    for fmt in FormatKind::ALL {
        let mem = Arc::new(AnonMemory::new(2 << 20, false).unwrap());
        let dom = Domain::new(DomainConfig::new(fmt)).unwrap();
        dom.map(BASE, 2 * MIB, mem, 0, Perm::RW).unwrap();
        assert_eq!(dom.leaf_histogram().into_iter().collect::<Vec<_>>(), vec![(21, 1)]);
        dom.read_and_clear_dirty(BASE, 2 * MIB, 0, &mut DirtyBitmap::default())
            .unwrap();
        dom.set_dirty_tracking(true).unwrap();
        let dma = dom.attach(1);
        // Caches "dirty already set" for the first page.
        dma.write(BASE + 0x5000, &[1]).unwrap();
        let mut got = Vec::new();
        let mut gather = IotlbGather::new();
        {
            let mut rec = |iova: u64, len: u64| got.push((iova, len));
            let mut out = DirtyBitmap {
                bitmap: Some(&mut rec),
                gather: Some(&mut gather),
            };
            dom.read_and_clear_dirty(BASE + MIB, MIB, 0, &mut out).unwrap();
        }
        assert_eq!(got, vec![(BASE + MIB, MIB)], "{fmt}: reported clipped");
        // The whole leaf was reset, so its whole IOVA range is stale in the IOTLB.
        assert_eq!(
            gather,
            IotlbGather {
                start: BASE,
                end: BASE + 2 * MIB
            },
            "{fmt}"
        );
        dom.iotlb_sync(&gather);
        dma.write(BASE + 0x5000, &[2]).unwrap();
        let mut again = Vec::new();
        {
            let mut rec = |iova: u64, len: u64| again.push((iova, len));
            let mut out = DirtyBitmap {
                bitmap: Some(&mut rec),
                gather: None,
            };
            dom.read_and_clear_dirty(BASE, 2 * MIB, 0, &mut out).unwrap();
        }
        assert_eq!(
            again,
            vec![(BASE, 2 * MIB)],
            "{fmt}: the write after the harvest is seen"
        );
    }
}

#[test]
fn faults_are_logged_and_touch_no_memory() {
    for fmt in FormatKind::ALL {
        let mem = Arc::new(AnonMemory::new(16 << 12, false).unwrap());
        mem.write(0, &[0xaa; 4096 * 4]);
        let dom = Domain::new(DomainConfig::new(fmt)).unwrap();
        dom.map(BASE, 2 << 12, mem.clone(), 0, Perm::RW).unwrap();
        dom.map(BASE + (2 << 12), 1 << 12, mem.clone(), 2 << 12, Perm::READ)
            .unwrap();
        let dma = dom.attach(9);

        // Unmapped IOVA.
        let hole = BASE + (8 << 12);
        assert_eq!(
            dma.write(hole, &[1, 2, 3]),
            Err(DmaError::Fault {
                iova: hole,
                write: true,
                reason: FaultReason::NotPresent
            })
        );
        let mut buf = [0u8; 4];
        assert_eq!(
            dma.read(hole + 4, &mut buf),
            Err(DmaError::Fault {
                iova: hole,
                write: false,
                reason: FaultReason::NotPresent
            })
        );
        assert_eq!(buf, [0; 4], "{fmt}: failed read fills nothing");

        // Write to the read-only page.
        let ro = BASE + (2 << 12);
        assert_eq!(
            dma.write(ro, &[0x55; 16]),
            Err(DmaError::Fault {
                iova: ro,
                write: true,
                reason: FaultReason::Permission
            })
        );
        // A write spanning a good page and the read-only one moves no byte at all.
        assert_eq!(
            dma.write(ro - 8, &[0x55; 16]),
            Err(DmaError::Fault {
                iova: ro,
                write: true,
                reason: FaultReason::Permission
            })
        );
        // Above the 48-bit input range.
        assert_eq!(
            dma.read(1 << 48, &mut buf),
            Err(DmaError::Fault {
                iova: 1 << 48,
                write: false,
                reason: FaultReason::AddressSize
            })
        );
        let mut all = vec![0u8; 4096 * 4];
        mem.read(0, &mut all);
        assert!(all.iter().all(|&b| b == 0xaa), "{fmt}: memory unchanged");

        let (log, total) = dom.faults();
        assert_eq!(total, 5, "{fmt}");
        assert_eq!(
            log,
            vec![
                Fault {
                    device: 9,
                    iova: hole,
                    write: true,
                    reason: FaultReason::NotPresent
                },
                Fault {
                    device: 9,
                    iova: hole,
                    write: false,
                    reason: FaultReason::NotPresent
                },
                Fault {
                    device: 9,
                    iova: ro,
                    write: true,
                    reason: FaultReason::Permission
                },
                Fault {
                    device: 9,
                    iova: ro,
                    write: true,
                    reason: FaultReason::Permission
                },
                Fault {
                    device: 9,
                    iova: 1 << 48,
                    write: false,
                    reason: FaultReason::AddressSize
                },
            ],
            "{fmt}"
        );
        // The device keeps working after faults.
        dma.write(BASE, &[7]).unwrap();
        dma.read(ro, &mut buf).unwrap();
        assert_eq!(buf, [0xaa; 4]);
        // Detached devices fail without touching memory or the log.
        dom.detach(9);
        assert_eq!(dma.write(BASE, &[8]), Err(DmaError::Detached { device: 9 }));
        let mut b = [0u8];
        mem.read(0, &mut b);
        assert_eq!(b, [7]);
    }
}
