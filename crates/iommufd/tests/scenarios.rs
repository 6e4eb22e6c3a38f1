//! Dirty-tracking scenarios through the uAPI, for each of the three formats, and the same
//! through the legacy type1 container.

mod common;
use common::*;
use iommu::{AnonMemory, FormatKind};
use iommufd::type1::*;
use iommufd::*;
use std::sync::Arc;

const IOVA: u64 = 0x4000_0000;
const PAGES: u64 = 256;
const PATTERN: [u64; 10] = [0, 1, 7, 8, 63, 64, 65, 127, 200, 255];

/// A bitmap buffer of `len` bytes placed so its start is `(address % 4096) == at`.
struct Buf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, at: usize) -> Self {
        let raw = vec![0u8; len + 8192];
        let base = raw.as_ptr() as usize;
        let off = (at + 4096 - base % 4096) % 4096;
        Buf { raw, off, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Buffer placements: 8-byte aligned, one byte off, and straddling a 4 KiB boundary.
fn placements() -> Vec<(&'static str, Buf)> {
    vec![
        ("aligned", Buf::new(32, 0)),
        ("offset by one", Buf::new(32, 1)),
        ("across a page", Buf::new(32, 4096 - 13)),
    ]
}

fn setup(fmt: FormatKind, extra_flags: u32) -> (Fx, u32, iommu::Dma) {
    let fx = fx(fmt, 8 * MIB);
    let mut o = IommuOption {
        option_id: IOMMU_OPTION_HUGE_PAGES,
        op: IOMMU_OPTION_OP_SET,
        __reserved: 0,
        object_id: fx.ioas,
        val64: 0,
    };
    fx.fd.option(&mut o).unwrap(); // 4 KiB leaves: the bitmap shows pages exactly
    map(&fx, IOVA, 0, PAGES * 4096).unwrap();
    let h = hwpt(&fx, IOMMU_HWPT_ALLOC_DIRTY_TRACKING | extra_flags).unwrap();
    fx.fd.attach(fx.dev, h).unwrap();
    track(&fx, h, true).unwrap();
    let dma = fx.fd.device_dma(fx.dev).unwrap();
    (fx, h, dma)
}

fn write_pattern(dma: &iommu::Dma) {
    for p in PATTERN {
        dma.write(IOVA + p * 4096 + 100, &p.to_le_bytes()).unwrap();
    }
}

#[test]
fn pattern_through_every_buffer_placement() {
    for fmt in FormatKind::ALL {
        let (fx, h, dma) = setup(fmt, 0);
        for (what, mut buf) in placements() {
            write_pattern(&dma);
            bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, buf.get()).unwrap();
            assert_eq!(bits(buf.get()), PATTERN.to_vec(), "{fmt}, {what}");
            // Cleared: nothing the next time.
            let mut again = vec![0u8; 32];
            bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, &mut again).unwrap();
            assert_eq!(bits(&again), Vec::<u64>::new(), "{fmt}, {what}: cleared");
            // The device's bytes landed.
            let mut b = [0u8; 8];
            fx.mem.read((200 * 4096 + 100) as usize, &mut b);
            assert_eq!(u64::from_le_bytes(b), 200);
        }
    }
}

#[test]
fn no_clear_keeps_bits_for_the_next_call() {
    for fmt in FormatKind::ALL {
        let (fx, h, dma) = setup(fmt, 0);
        write_pattern(&dma);
        for round in 0..3 {
            let mut buf = vec![0u8; 32];
            bitmap(
                &fx,
                h,
                IOVA,
                PAGES * 4096,
                4096,
                IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
                &mut buf,
            )
            .unwrap();
            assert_eq!(bits(&buf), PATTERN.to_vec(), "{fmt}, NO_CLEAR round {round}");
        }
        let mut buf = vec![0u8; 32];
        bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, &mut buf).unwrap();
        assert_eq!(bits(&buf), PATTERN.to_vec(), "{fmt}: the clearing read still sees them");
        let mut buf = vec![0u8; 32];
        bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, &mut buf).unwrap();
        assert!(bits(&buf).is_empty(), "{fmt}");
    }
}

#[test]
fn bits_are_only_set_never_cleared() {
    let (fx, h, dma) = setup(FormatKind::VtdSs, 0);
    dma.write(IOVA, &[1]).unwrap();
    let mut buf = vec![0u8; 32];
    buf[31] = 0x80; // a stale bit the caller left
    bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, &mut buf).unwrap();
    assert_eq!(bits(&buf), vec![0, 255]);
}

#[test]
fn enabling_again_clears_stale_bits() {
    for fmt in FormatKind::ALL {
        let (fx, h, dma) = setup(fmt, 0);
        write_pattern(&dma);
        track(&fx, h, false).unwrap();
        // Disabling clears nothing: the dirt is still there (read with NO_CLEAR after a
        // re-enable would not show it, so look at the PTEs directly).
        let dom = fx.fd.hwpt_domain(h).unwrap();
        let dirty_ptes = PATTERN
            .iter()
            .filter(|&&p| {
                let (_, pte) = dom.leaf_entry(IOVA + p * 4096).unwrap();
                match fmt {
                    FormatKind::AmdV1 => pte & 0x40 != 0,
                    FormatKind::VtdSs => pte & 0x200 != 0,
                    FormatKind::ArmLpaeS1 => pte & (1 << 51 | 1 << 7) == 1 << 51,
                }
            })
            .count();
        assert_eq!(dirty_ptes, PATTERN.len(), "{fmt}: disable left the dirty bits");
        track(&fx, h, true).unwrap();
        let mut buf = vec![0u8; 32];
        bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, &mut buf).unwrap();
        assert!(bits(&buf).is_empty(), "{fmt}: enable cleared stale bits");
        // ... and flushed the IOTLB: a write to a page whose entry said "dirty" is seen.
        dma.write(IOVA + 8 * 4096, &[9]).unwrap();
        bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, &mut buf).unwrap();
        assert_eq!(bits(&buf), vec![8], "{fmt}");
        // Enabling while enabled clears too.
        dma.write(IOVA + 9 * 4096, &[9]).unwrap();
        track(&fx, h, true).unwrap();
        let mut buf = vec![0u8; 32];
        bitmap(&fx, h, IOVA, PAGES * 4096, 4096, 0, &mut buf).unwrap();
        assert!(bits(&buf).is_empty(), "{fmt}: every enable clears");
    }
}

#[test]
fn huge_leaf_reports_whole_leaf_clipped_and_eager_split_one_page() {
    for fmt in FormatKind::ALL {
        for split in [false, true] {
            let fx = fx(fmt, 8 * MIB);
            let iova = 0x8000_0000;
            // Two areas, so that AMD's NextLevel=7 encoding cannot pick one 4 MiB leaf.
            map(&fx, iova, 0, 2 * MIB).unwrap();
            map(&fx, iova + 2 * MIB, 2 * MIB, 2 * MIB).unwrap();
            let flags = IOMMU_HWPT_ALLOC_DIRTY_TRACKING | if split { LIVEMIG_HWPT_ALLOC_EAGER_SPLIT } else { 0 };
            let h = hwpt(&fx, flags).unwrap();
            let dom = fx.fd.hwpt_domain(h).unwrap();
            assert_eq!(dom.leaf_histogram().get(&21), Some(&2), "{fmt}: two 2 MiB leaves");
            fx.fd.attach(fx.dev, h).unwrap();
            track(&fx, h, true).unwrap();
            let dma = fx.fd.device_dma(fx.dev).unwrap();
            dma.write(iova + 2 * MIB + 0x5123, &[1]).unwrap(); // page 0x205 of the range
                                                               // The whole range: bits 512..1023 for the leaf, or just 517 after a split.
            let mut buf = vec![0u8; 128];
            bitmap(
                &fx,
                h,
                iova,
                4 * MIB,
                4096,
                IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
                &mut buf,
            )
            .unwrap();
            let want: Vec<u64> = if split { vec![517] } else { (512..1024).collect() };
            assert_eq!(bits(&buf), want, "{fmt} split={split}");
            // A range covering the second half of the leaf only: clipped, nothing outside.
            let mut buf = vec![0u8; 64];
            bitmap(&fx, h, iova + 3 * MIB, MIB, 4096, 0, &mut buf).unwrap();
            let want: Vec<u64> = if split { vec![] } else { (0..256).collect() };
            assert_eq!(bits(&buf), want, "{fmt} split={split}: clipped");
        }
    }
}

#[test]
fn page_size_larger_than_4k_ors_pages() {
    for fmt in FormatKind::ALL {
        let (fx, h, dma) = setup(fmt, 0);
        write_pattern(&dma);
        let mut buf = vec![0u8; 2];
        bitmap(&fx, h, IOVA, PAGES * 4096, 64 * 1024, 0, &mut buf).unwrap();
        // 16 pages per bit: {0,1,7,8}→0, 63→3, {64,65}→4, 127→7, 200→12, 255→15.
        assert_eq!(bits(&buf), vec![0, 3, 4, 7, 12, 15], "{fmt}");
    }
}

#[test]
fn several_hwpts_of_different_formats_share_one_ioas() {
    let fx = fx(FormatKind::AmdV1, 8 * MIB);
    let arm = fx.fd.bind_device(DeviceSpec::new("arm", FormatKind::ArmLpaeS1));
    let mut o = IommuOption {
        option_id: IOMMU_OPTION_HUGE_PAGES,
        op: IOMMU_OPTION_OP_SET,
        __reserved: 0,
        object_id: fx.ioas,
        val64: 0,
    };
    fx.fd.option(&mut o).unwrap();
    map(&fx, IOVA, 0, MIB).unwrap();
    let h_amd = hwpt(&fx, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
    let mut c = HwptAlloc {
        flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        dev_id: arm,
        pt_id: fx.ioas,
        ..Default::default()
    };
    fx.fd.hwpt_alloc(&mut c).unwrap();
    let h_arm = c.out_hwpt_id;
    fx.fd.attach(fx.dev, h_amd).unwrap();
    fx.fd.attach(arm, h_arm).unwrap();
    // A map after allocation reaches both page tables.
    map(&fx, IOVA + 4 * MIB, MIB, MIB).unwrap();
    for h in [h_amd, h_arm] {
        let d = fx.fd.hwpt_domain(h).unwrap();
        assert_eq!(d.iova_to_phys(IOVA + 4 * MIB + 0x1000), Some(fx.va + MIB + 0x1000));
        track(&fx, h, true).unwrap();
    }
    let (a, b) = (fx.fd.device_dma(fx.dev).unwrap(), fx.fd.device_dma(arm).unwrap());
    a.write(IOVA + 4 * MIB, &[1]).unwrap();
    b.write(IOVA + 4 * MIB + 0x3000, &[2]).unwrap();
    // Each HWPT sees only its own device's writes (A/D bits live in each page table).
    let mut buf = vec![0u8; 256];
    bitmap(&fx, h_amd, IOVA + 4 * MIB, MIB, 4096, 0, &mut buf).unwrap();
    let amd_bits = bits(&buf);
    let mut buf = vec![0u8; 256];
    bitmap(&fx, h_arm, IOVA + 4 * MIB, MIB, 4096, 0, &mut buf).unwrap();
    let arm_bits = bits(&buf);
    assert_eq!(amd_bits, vec![0]);
    // The Arm table was enabled after its map: the clearing pass cleaned the born-dirty
    // entries, so only the device's write shows.
    assert_eq!(arm_bits, vec![3]);
    // An unmap reaches both, with invalidation: the devices fault afterwards.
    let mut u = IoasUnmap {
        ioas_id: fx.ioas,
        iova: IOVA + 4 * MIB,
        length: MIB,
    };
    fx.fd.ioas_unmap(&mut u).unwrap();
    assert!(a.write(IOVA + 4 * MIB, &[1]).is_err());
    assert!(b.write(IOVA + 4 * MIB, &[1]).is_err());
}

fn type1_get(c: &Type1Container, iova: u64, size: u64, buf: &mut [u8]) {
    let len = buf.len() as u64;
    c.dirty_pages(&mut DirtyPages {
        flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
        get: Some(DirtyBitmapGet {
            iova,
            size,
            bitmap: VfioBitmap {
                pgsize: 4096,
                size: len,
                data: buf,
            },
        }),
    })
    .unwrap();
}

#[test]
fn type1_same_bits_as_iommufd() {
    for fmt in FormatKind::ALL {
        let mut spec = DeviceSpec::new("d", fmt);
        spec.huge_iova = false;
        let c = Type1Container::new(&[spec]).unwrap();
        let mem = Arc::new(AnonMemory::new(8 * MIB as usize, false).unwrap());
        let va = c.register_user_memory(mem.clone());
        // Two mappings; the second starts at page 100, not on a byte of the bitmap.
        map_rw(&c, va, IOVA, 100 * 4096);
        map_rw(&c, va + MIB, IOVA + 100 * 4096, 156 * 4096);
        start_dirty(&c);
        let dma = c.domain().attach(1);
        for (what, mut buf) in placements() {
            write_pattern(&dma);
            type1_get(&c, IOVA, PAGES * 4096, buf.get());
            assert_eq!(bits(buf.get()), PATTERN.to_vec(), "{fmt}, {what}");
            let mut again = vec![0u8; 32];
            type1_get(&c, IOVA, PAGES * 4096, &mut again);
            assert!(bits(&again).is_empty(), "{fmt}: cleared");
        }
        // UNMAP_DMA with GET_DIRTY_BITMAP fetches the bits first.
        dma.write(IOVA + 120 * 4096, &[1]).unwrap();
        let mut buf = vec![0u8; 20];
        let mut u = DmaUnmap {
            flags: VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            iova: IOVA + 100 * 4096,
            size: 156 * 4096,
            bitmap: Some(VfioBitmap {
                pgsize: 4096,
                size: 20,
                data: &mut buf,
            }),
        };
        c.unmap_dma(&mut u).unwrap();
        assert_eq!(u.size, 156 * 4096);
        assert_eq!(bits(&buf), vec![20]);
    }
}

#[test]
fn type1_no_tracker_reports_every_mapped_page() {
    let mut spec = DeviceSpec::new("old", FormatKind::VtdSs);
    spec.dirty_tracking = false;
    let c = Type1Container::new(&[spec]).unwrap();
    let mem = Arc::new(AnonMemory::new(MIB as usize, false).unwrap());
    let va = c.register_user_memory(mem);
    map_rw(&c, va, IOVA, 10 * 4096);
    map_rw(&c, va, IOVA + 20 * 4096, 3 * 4096);
    start_dirty(&c);
    for _ in 0..3 {
        let mut buf = vec![0u8; 4];
        type1_get(&c, IOVA, 23 * 4096, &mut buf);
        let want: Vec<u64> = (0..10).chain(20..23).collect();
        assert_eq!(bits(&buf), want, "perpetually dirty, every GET");
    }
}

/// Type1 DIRTY_PAGES START.
fn start_dirty(c: &Type1Container) {
    c.dirty_pages(&mut DirtyPages {
        flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
        get: None,
    })
    .unwrap();
}
