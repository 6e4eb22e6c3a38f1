//! Huge leaves that cross the edge of a bitmap window or of the requested range, through the
//! uAPI: iommufd's GET_DIRTY_BITMAP (windows of 2 MiB of bitmap, 64 GiB of IOVA at 4 KiB)
//! and type1's GET_BITMAP, and the IOTLB invalidation a harvest of part of a leaf needs.

mod common;
use common::*;
use iommu::{AnonMemory, FormatKind};
use iommufd::type1::*;
use iommufd::*;
use std::sync::Arc;

const GIB: u64 = 1 << 30;
/// 66 leaves of 1 GiB from 64 GiB up.
const MAP_IOVA: u64 = 64 * GIB;
const MAP_LEN: u64 = 66 * GIB;
/// The range asked for: it starts half a leaf in, so its 64 GiB window boundary (bit 2^24,
/// IOVA 128.5 GiB) falls in the middle of the leaf `[128 GiB, 129 GiB)`.
const RANGE_IOVA: u64 = 64 * GIB + 512 * MIB;
const RANGE_LEN: u64 = 65 * GIB;
/// The DMA write, inside that leaf.
const WRITE_AT: u64 = 128 * GIB + 0x3000;
/// Bits of the leaf relative to RANGE_IOVA: (128 - 64.5) GiB / 4 KiB, and
/// (129 - 64.5) GiB / 4 KiB - 1.
const LEAF_FIRST_BIT: u64 = 16_646_144;
const LEAF_LAST_BIT: u64 = 16_908_287;
/// The first bit of the second window: 2 MiB * 8 bits.
const WINDOW_BITS: u64 = 16_777_216;

// The numbers above, checked: the leaf's bits, and the window boundary inside them.
const _: () = assert!(LEAF_FIRST_BIT == (WRITE_AT & !(GIB - 1)) / 4096 - RANGE_IOVA / 4096);
const _: () = assert!(LEAF_LAST_BIT == LEAF_FIRST_BIT + GIB / 4096 - 1);
const _: () = assert!(WINDOW_BITS == iommufd::bitmap::WINDOW_BYTES * 8);
const _: () = assert!(LEAF_FIRST_BIT < WINDOW_BITS && WINDOW_BITS <= LEAF_LAST_BIT);

/// Runs of set bits, as inclusive (first, last) bit numbers.
fn runs(data: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &b) in data.iter().enumerate() {
        if b == 0 {
            continue;
        }
        for k in 0..8 {
            if b >> k & 1 != 0 {
                let n = i as u64 * 8 + k;
                match out.last_mut() {
                    Some(r) if r.1 + 1 == n => r.1 = n,
                    _ => out.push((n, n)),
                }
            }
        }
    }
    out
}

fn big_fx(fmt: FormatKind) -> (Fx, u32, iommu::Dma) {
    let fx = fx(fmt, MAP_LEN);
    map(&fx, MAP_IOVA, 0, MAP_LEN).unwrap();
    let h = hwpt(&fx, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
    let dom = fx.fd.hwpt_domain(h).unwrap();
    assert_eq!(
        dom.leaf_histogram().into_iter().collect::<Vec<_>>(),
        vec![(30, 66)],
        "{fmt}: 1 GiB leaves"
    );
    fx.fd.attach(fx.dev, h).unwrap();
    track(&fx, h, true).unwrap();
    let dma = fx.fd.device_dma(fx.dev).unwrap();
    (fx, h, dma)
}

#[test]
fn leaf_across_the_64_gib_window_boundary_is_reported_whole() {
    for fmt in FormatKind::ALL {
        let (fx, h, dma) = big_fx(fmt);
        dma.write(WRITE_AT, &[1]).unwrap();
        let bytes = (RANGE_LEN / 4096 / 8) as usize;
        let mut buf = vec![0u8; bytes];
        bitmap(&fx, h, RANGE_IOVA, RANGE_LEN, 4096, 0, &mut buf).unwrap();
        // Before the fix only (16646144, 16777215) came back: the walk of the first window
        // stopped at its end and the clear took the whole leaf.
        assert_eq!(runs(&buf), vec![(LEAF_FIRST_BIT, LEAF_LAST_BIT)], "{fmt}");
        assert_eq!(buf[(WINDOW_BITS / 8) as usize], 0xff, "{fmt}: first byte of window 2");
        assert_eq!(buf[(LEAF_LAST_BIT / 8) as usize], 0xff, "{fmt}: last byte of the leaf");
        assert_eq!(
            buf[(LEAF_LAST_BIT / 8 + 1) as usize],
            0x00,
            "{fmt}: byte after the leaf"
        );
        let mut again = vec![0u8; bytes];
        bitmap(&fx, h, RANGE_IOVA, RANGE_LEN, 4096, 0, &mut again).unwrap();
        assert_eq!(runs(&again), vec![], "{fmt}: second read is empty");

        // NO_CLEAR reports the same and leaves the leaf dirty.
        dma.write(WRITE_AT, &[2]).unwrap();
        for _ in 0..2 {
            let mut nc = vec![0u8; bytes];
            let flags = IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR;
            bitmap(&fx, h, RANGE_IOVA, RANGE_LEN, 4096, flags, &mut nc).unwrap();
            assert_eq!(runs(&nc), vec![(LEAF_FIRST_BIT, LEAF_LAST_BIT)], "{fmt}: NO_CLEAR");
        }
        let mut last = vec![0u8; bytes];
        bitmap(&fx, h, RANGE_IOVA, RANGE_LEN, 4096, 0, &mut last).unwrap();
        assert_eq!(
            runs(&last),
            vec![(LEAF_FIRST_BIT, LEAF_LAST_BIT)],
            "{fmt}: after NO_CLEAR"
        );
    }
}

#[test]
fn leaf_across_the_end_of_the_range_is_reported_only_inside() {
    // One window exactly: the range ends at 128.5 GiB, in the middle of the leaf. As in Linux,
    // the leaf is cleared whole and only its part inside the range is reported.
    for fmt in FormatKind::ALL {
        let (fx, h, dma) = big_fx(fmt);
        dma.write(WRITE_AT, &[1]).unwrap();
        let len = 64 * GIB;
        let mut buf = vec![0u8; (len / 4096 / 8) as usize];
        bitmap(&fx, h, RANGE_IOVA, len, 4096, 0, &mut buf).unwrap();
        assert_eq!(runs(&buf), vec![(LEAF_FIRST_BIT, WINDOW_BITS - 1)], "{fmt}");
        let mut rest = vec![0u8; (512 * MIB / 4096 / 8) as usize];
        bitmap(&fx, h, RANGE_IOVA + len, 512 * MIB, 4096, 0, &mut rest).unwrap();
        assert_eq!(runs(&rest), vec![], "{fmt}: the part outside went with the clear");
    }
}

#[test]
fn harvest_of_part_of_a_leaf_invalidates_the_whole_leaf() {
    // A write to a page of a 2 MiB leaf caches "dirty already set" in the IOTLB. A clearing
    // harvest of the other half resets the whole leaf; if it invalidated only that half, the
    // next write to the first page would hit the stale entry, skip the PTE, and be lost.
    for fmt in FormatKind::ALL {
        let fx = fx(fmt, 8 * MIB);
        let iova = 0x8000_0000;
        map(&fx, iova, 0, 2 * MIB).unwrap();
        let h = hwpt(&fx, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
        assert_eq!(
            fx.fd
                .hwpt_domain(h)
                .unwrap()
                .leaf_histogram()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![(21, 1)]
        );
        fx.fd.attach(fx.dev, h).unwrap();
        track(&fx, h, true).unwrap();
        let dma = fx.fd.device_dma(fx.dev).unwrap();
        dma.write(iova + 0x5000, &[1]).unwrap();
        let mut half = vec![0u8; 32];
        bitmap(&fx, h, iova + MIB, MIB, 4096, 0, &mut half).unwrap();
        assert_eq!(runs(&half), vec![(0, 255)], "{fmt}: the half asked for");
        dma.write(iova + 0x5000, &[2]).unwrap();
        let mut all = vec![0u8; 64];
        bitmap(&fx, h, iova, 2 * MIB, 4096, 0, &mut all).unwrap();
        assert_eq!(runs(&all), vec![(0, 511)], "{fmt}: the second write is seen");
    }
}

#[test]
fn type1_leaf_past_64_gib_of_bitmap_is_reported_whole() {
    // Type1 harvests whole mappings into per-mapping bitmaps, with no windows: the same leaf
    // position is reported whole. A 512 MiB mapping first puts the leaf where iommufd's
    // window boundary would cut it.
    for fmt in FormatKind::ALL {
        let c = Type1Container::new(&[DeviceSpec::new("d", fmt)]).unwrap();
        let mem = Arc::new(AnonMemory::new(MAP_LEN as usize, true).unwrap());
        let va = c.register_user_memory(mem);
        let first = 512 * MIB;
        for (iova, vaddr, size) in [(RANGE_IOVA, va + first, first), (65 * GIB, va + GIB, RANGE_LEN - first)] {
            map_rw(&c, vaddr, iova, size);
        }
        assert_eq!(c.domain().leaf_histogram().get(&30), Some(&64), "{fmt}");
        c.dirty_pages(&mut DirtyPages {
            flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
            get: None,
        })
        .unwrap();
        let dma = c.domain().attach(1);
        let bytes = RANGE_LEN / 4096 / 8;
        for round in 0..2u8 {
            dma.write(WRITE_AT, &[round]).unwrap();
            let mut buf = vec![0u8; bytes as usize];
            c.dirty_pages(&mut DirtyPages {
                flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
                get: Some(DirtyBitmapGet {
                    iova: RANGE_IOVA,
                    size: RANGE_LEN,
                    bitmap: VfioBitmap {
                        pgsize: 4096,
                        size: bytes,
                        data: &mut buf,
                    },
                }),
            })
            .unwrap();
            assert_eq!(runs(&buf), vec![(LEAF_FIRST_BIT, LEAF_LAST_BIT)], "{fmt} round {round}");
        }
        dma.write(WRITE_AT, &[9]).unwrap();
        let mut buf = vec![0u8; ((RANGE_LEN - first) / 4096 / 8) as usize];
        let mut u = DmaUnmap {
            flags: VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            iova: 65 * GIB,
            size: RANGE_LEN - first,
            bitmap: Some(VfioBitmap {
                pgsize: 4096,
                size: buf.len() as u64,
                data: &mut buf,
            }),
        };
        c.unmap_dma(&mut u).unwrap();
        let at = (128 * GIB - 65 * GIB) / 4096;
        assert_eq!(runs(&buf), vec![(at, at + GIB / 4096 - 1)], "{fmt}: UNMAP_DMA");
    }
}
