//! Nested HWPTs and the unmap that returns dirty bits, through the uAPI: every check's errno
//! in Linux's order, attach, DMA through a guest's stage 1, `IOMMU_HWPT_INVALIDATE`, and a
//! parent HWPT's bitmap indexed by guest-physical address (`docs/viommu.md`).

mod common;
use common::*;
use iommu::{FormatKind, Perm, Stage1Kind};
use iommufd::*;

/// Guest RAM is the IOAS at IOVA = GPA 0; stage-1 tables at 1 MiB, data from 4 MiB.
const GUEST: u64 = 16 * MIB;
const ROOT: u64 = MIB;

fn e(code: i32) -> Errno {
    Errno::new(code, "")
}

/// Writes a 4-level stage-1 table into guest memory mapping `iova` → `gpa` (4 KiB), with
/// tables at `ROOT`, `ROOT + 4 KiB`, … (one chain: every IOVA here shares it).
fn guest_map(fx: &Fx, kind: Stage1Kind, iova: u64, gpa: u64, perm: Perm) {
    let put = |at: u64, v: u64| fx.mem.write(at as usize, &v.to_le_bytes());
    for level in (1..4).rev() {
        let table = ROOT + (3 - level as u64) * 4096;
        let slot = ((iova >> (12 + 9 * level)) & 511) * 8;
        put(table + slot, kind.table(table + 4096, level));
    }
    let leaf_table = ROOT + 3 * 4096;
    put(leaf_table + ((iova >> 12) & 511) * 8, kind.leaf(gpa, 0, 12, perm));
}

fn alloc(fx: &Fx, flags: u32, pt_id: u32, data_type: u32, data: &[u8]) -> Result<u32, Errno> {
    // The data goes through user memory, as a user pointer does.
    let at = GUEST - 4096;
    fx.mem.write(at as usize, data);
    let mut h = HwptAlloc {
        flags,
        dev_id: fx.dev,
        pt_id,
        data_type,
        data_len: data.len() as u32,
        data_uptr: if data.is_empty() { 0 } else { fx.va + at },
        ..Default::default()
    };
    fx.fd.hwpt_alloc(&mut h).map(|_| h.out_hwpt_id)
}

fn s1(root: u64) -> Vec<u8> {
    VtdS1 {
        flags: 0,
        pgtbl_addr: root,
        addr_width: 48,
        __reserved: 0,
    }
    .to_bytes()
    .to_vec()
}

fn invalidate(fx: &Fx, hwpt: u32, entries: &[VtdS1Invalidate]) -> (Result<(), Errno>, u32) {
    let data: Vec<u8> = entries.iter().flat_map(|e| e.to_bytes()).collect();
    let mut c = HwptInvalidate {
        hwpt_id: hwpt,
        data_type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
        entry_len: 24,
        entry_num: entries.len() as u32,
        __reserved: 0,
        data: &data,
    };
    let r = fx.fd.hwpt_invalidate(&mut c);
    (r, c.entry_num)
}

/// A VT-d fixture: guest RAM mapped at GPA 0 in a parent allocated with
/// `NEST_PARENT | DIRTY_TRACKING`, tracking on.
fn parent_fx() -> (Fx, u32) {
    let fx = fx(FormatKind::VtdSs, GUEST);
    let mut o = IommuOption {
        option_id: IOMMU_OPTION_HUGE_PAGES,
        op: IOMMU_OPTION_OP_SET,
        object_id: fx.ioas,
        ..Default::default()
    };
    fx.fd.option(&mut o).unwrap();
    map(&fx, 0, 0, GUEST - 2 * MIB).unwrap();
    let parent = hwpt(&fx, IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
    track(&fx, parent, true).unwrap();
    (fx, parent)
}

#[test]
fn nested_allocation_checks_in_linux_order() {
    let (fx, parent) = parent_fx();
    let plain = hwpt(&fx, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
    let data = s1(ROOT);
    // Flags on a nested allocation (DIRTY_TRACKING belongs on the parent) and missing data.
    assert_eq!(
        alloc(
            &fx,
            IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            parent,
            IOMMU_HWPT_DATA_VTD_S1,
            &data
        ),
        Err(e(libc::EOPNOTSUPP))
    );
    assert_eq!(
        alloc(&fx, 0, parent, IOMMU_HWPT_DATA_NONE, &[]),
        Err(e(libc::EOPNOTSUPP))
    );
    // A parent not allocated with NEST_PARENT: EINVAL, before the data is looked at.
    assert_eq!(alloc(&fx, 0, plain, 77, &data), Err(e(libc::EINVAL)));
    assert_eq!(
        alloc(&fx, 0, parent, 77, &data),
        Err(e(libc::EOPNOTSUPP)),
        "unknown data type"
    );
    assert_eq!(
        alloc(&fx, 0, parent, IOMMU_HWPT_DATA_VTD_S1, &data[..16]),
        Err(e(libc::EINVAL))
    );
    let mut long = data.clone();
    long.extend_from_slice(&[0, 0, 0, 1]);
    assert_eq!(
        alloc(&fx, 0, parent, IOMMU_HWPT_DATA_VTD_S1, &long),
        Err(e(libc::E2BIG))
    );
    long.truncate(24);
    long.extend_from_slice(&[0; 8]);
    assert!(
        alloc(&fx, 0, parent, IOMMU_HWPT_DATA_VTD_S1, &long).is_ok(),
        "a zero tail is fine"
    );
    assert_eq!(
        alloc(&fx, 0, parent, IOMMU_HWPT_DATA_VTD_S1, &s1(ROOT + 8)),
        Err(e(libc::EINVAL))
    );
    let mut h = HwptAlloc {
        dev_id: fx.dev,
        pt_id: parent,
        data_type: IOMMU_HWPT_DATA_VTD_S1,
        data_len: 24,
        data_uptr: 8,
        ..Default::default()
    };
    assert_eq!(fx.fd.hwpt_alloc(&mut h), Err(e(libc::EFAULT)), "unbacked data pointer");
    h.data_len = 16;
    assert_eq!(
        fx.fd.hwpt_alloc(&mut h),
        Err(e(libc::EINVAL)),
        "too short, before the copy"
    );

    // A nested HWPT is not a paging HWPT: the dirty ioctls do not know it.
    let nested = alloc(&fx, 0, parent, IOMMU_HWPT_DATA_VTD_S1, &data).unwrap();
    assert_eq!(track(&fx, nested, true), Err(e(libc::ENOENT)));
    assert_eq!(bitmap(&fx, nested, 0, MIB, 4096, 0, &mut [0; 32]), Err(e(libc::ENOENT)));
    // Nor can it be a parent.
    assert_eq!(
        alloc(&fx, 0, nested, IOMMU_HWPT_DATA_VTD_S1, &data),
        Err(e(libc::EINVAL))
    );

    // Attach: the PASID entry's checks.
    for (flags, width) in [(IOMMU_VTD_S1_SRE, 48), (IOMMU_VTD_S1_EAFE, 48), (0, 57), (0, 39)] {
        let d = VtdS1 {
            flags,
            pgtbl_addr: ROOT,
            addr_width: width,
            __reserved: 0,
        }
        .to_bytes();
        let n = alloc(&fx, 0, parent, IOMMU_HWPT_DATA_VTD_S1, &d).unwrap();
        assert_eq!(
            fx.fd.attach(fx.dev, n),
            Err(e(libc::EINVAL)),
            "flags {flags}, width {width}"
        );
    }
    fx.fd.attach(fx.dev, nested).unwrap();
    assert_eq!(fx.fd.destroy(nested), Err(e(libc::EBUSY)), "a device is attached");
    assert_eq!(fx.fd.destroy(parent), Err(e(libc::EBUSY)), "nested HWPTs hang on it");
    fx.fd.detach(fx.dev).unwrap();
    fx.fd.destroy(nested).unwrap();
}

/// DMA through the guest's stage 1 lands at the GPA it maps, and the parent's bitmap (indexed
/// by GPA) reports the data page and the stage-1 table pages whose A/D bits changed. After
/// the guest remaps the IOVA, the old translation holds until it invalidates.
#[test]
fn dma_through_a_guest_stage1_and_its_invalidation() {
    for kind in Stage1Kind::ALL {
        let (fx, parent) = parent_fx();
        let iova = 0x7f_0000_0000;
        guest_map(&fx, kind, iova, 4 * MIB, Perm::RW);
        let ty = match kind {
            Stage1Kind::VtdFs => IOMMU_HWPT_DATA_VTD_S1,
            Stage1Kind::ArmLpaeS1 => LIVEMIG_HWPT_DATA_ARM_S1,
        };
        let nested = alloc(&fx, 0, parent, ty, &s1(ROOT)).unwrap();
        fx.fd.attach(fx.dev, nested).unwrap();
        let dma = fx.fd.device_dma(fx.dev).unwrap();
        dma.write_u64(iova + 16, 0x1111).unwrap();
        let mut b = [0u8; 8];
        fx.mem.read((4 * MIB + 16) as usize, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1111, "{kind}");

        let mut bm = vec![0u8; (GUEST / 4096 / 8) as usize];
        bitmap(&fx, parent, 0, GUEST - 2 * MIB, 4096, 0, &mut bm).unwrap();
        let data_page = 4 * MIB / 4096;
        let leaf_table = (ROOT + 3 * 4096) / 4096;
        let mut want = vec![leaf_table, data_page];
        if kind == Stage1Kind::VtdFs {
            // VT-d tables have A bits too; Arm table descriptors do not.
            want = vec![ROOT / 4096, ROOT / 4096 + 1, ROOT / 4096 + 2, leaf_table, data_page];
        }
        assert_eq!(bits(&bm), want, "{kind}: stage-2 dirty pages, by GPA");

        // The harvest's IOTLB sync dropped the nested entries too; cache the IOVA again. Then
        // the guest moves it to another page, and the IOTLB still has the old one.
        dma.write_u64(iova + 16, 0x1111).unwrap();
        guest_map(&fx, kind, iova, 5 * MIB, Perm::RW);
        dma.write_u64(iova + 16, 0x2222).unwrap();
        fx.mem.read((4 * MIB + 16) as usize, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x2222, "{kind}: stale until invalidated");
        let inv = VtdS1Invalidate {
            addr: iova,
            npages: 1,
            flags: IOMMU_VTD_INV_FLAGS_LEAF,
            __reserved: 0,
        };
        assert_eq!(invalidate(&fx, nested, &[inv]), (Ok(()), 1));
        dma.write_u64(iova + 16, 0x3333).unwrap();
        fx.mem.read((5 * MIB + 16) as usize, &mut b);
        assert_eq!(
            u64::from_le_bytes(b),
            0x3333,
            "{kind}: the new page after the invalidation"
        );
    }
}

#[test]
fn invalidate_checks_in_linux_order() {
    let (fx, parent) = parent_fx();
    let nested = alloc(&fx, 0, parent, IOMMU_HWPT_DATA_VTD_S1, &s1(ROOT)).unwrap();
    let ok = VtdS1Invalidate {
        addr: 0x1000,
        npages: 4,
        flags: 0,
        __reserved: 0,
    };
    let run = |hwpt, data_type, entry_len, entries: &[VtdS1Invalidate], reserved| {
        let mut data: Vec<u8> = Vec::new();
        for en in entries {
            data.extend_from_slice(&en.to_bytes());
            data.resize(data.len() + entry_len as usize - 24.min(entry_len as usize), 0);
        }
        let mut c = HwptInvalidate {
            hwpt_id: hwpt,
            data_type,
            entry_len,
            entry_num: entries.len() as u32,
            __reserved: reserved,
            data: &data,
        };
        let r = fx.fd.hwpt_invalidate(&mut c);
        (r, c.entry_num)
    };
    let t = IOMMU_HWPT_INVALIDATE_DATA_VTD_S1;
    assert_eq!(run(nested, t, 24, &[ok], 1), (Err(e(libc::EOPNOTSUPP)), 0), "reserved");
    assert_eq!(run(nested, t, 0, &[ok], 0), (Err(e(libc::EINVAL)), 0), "entry_len 0");
    assert_eq!(run(999, t, 24, &[ok], 0), (Err(e(libc::ENOENT)), 0), "no such object");
    assert_eq!(run(parent, t, 24, &[ok], 0), (Err(e(libc::EINVAL)), 0), "a paging HWPT");
    assert_eq!(run(fx.ioas, t, 24, &[ok], 0), (Err(e(libc::EINVAL)), 0), "an IOAS");
    assert_eq!(run(nested, 5, 24, &[], 0), (Ok(()), 0), "a probe takes any type");
    assert_eq!(run(nested, 5, 24, &[ok], 0), (Err(e(libc::EINVAL)), 0), "unknown type");
    let mut short = vec![0u8; 16];
    let mut c = HwptInvalidate {
        hwpt_id: nested,
        data_type: t,
        entry_len: 16,
        entry_num: 1,
        __reserved: 0,
        data: &short,
    };
    assert_eq!(
        fx.fd.hwpt_invalidate(&mut c),
        Err(e(libc::EINVAL)),
        "entry_len below 24"
    );
    short.clear();
    let bad_flags = VtdS1Invalidate { flags: 2, ..ok };
    let unaligned = VtdS1Invalidate { addr: 0x1008, ..ok };
    let all_from = VtdS1Invalidate {
        addr: 0x1000,
        npages: u64::MAX,
        ..ok
    };
    let all = VtdS1Invalidate {
        addr: 0,
        npages: u64::MAX,
        ..ok
    };
    assert_eq!(
        run(nested, t, 24, &[ok, bad_flags, ok], 0),
        (Err(e(libc::EOPNOTSUPP)), 1)
    );
    assert_eq!(run(nested, t, 24, &[ok, ok, unaligned], 0), (Err(e(libc::EINVAL)), 2));
    assert_eq!(run(nested, t, 24, &[all_from], 0), (Err(e(libc::EINVAL)), 0));
    assert_eq!(run(nested, t, 24, &[all, ok], 0), (Ok(()), 2));
    assert_eq!(
        run(nested, t, 32, &[ok, ok], 0),
        (Ok(()), 2),
        "longer entries, zero tails"
    );
    let d = fx.fd.hwpt_nested_domain(nested).unwrap();
    assert_eq!(d.invalidations(), 7, "each entry handled reached the IOMMU");

    // The raw ioctl: entry_num is written back; an unbacked array after the checks is EFAULT.
    let mut raw = vec![0u8; 32];
    raw[..4].copy_from_slice(&32u32.to_le_bytes());
    raw[4..8].copy_from_slice(&nested.to_le_bytes());
    let arr = GUEST - 8192;
    fx.mem
        .write(arr as usize, &[ok.to_bytes(), bad_flags.to_bytes()].concat());
    raw[8..16].copy_from_slice(&(fx.va + arr).to_le_bytes());
    raw[20..24].copy_from_slice(&24u32.to_le_bytes());
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(fx.fd.ioctl(IOMMU_HWPT_INVALIDATE, &mut raw), Err(e(libc::EOPNOTSUPP)));
    assert_eq!(u32::from_le_bytes(raw[24..28].try_into().unwrap()), 1);
    raw[8..16].copy_from_slice(&8u64.to_le_bytes());
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(fx.fd.ioctl(IOMMU_HWPT_INVALIDATE, &mut raw), Err(e(libc::EFAULT)));
    raw[4..8].copy_from_slice(&999u32.to_le_bytes());
    assert_eq!(
        fx.fd.ioctl(IOMMU_HWPT_INVALIDATE, &mut raw),
        Err(e(libc::ENOENT)),
        "checks first"
    );
}

/// The shadow design's unmap: a device write just before the unmap comes back in the bitmap;
/// the plain unmap would drop it. Errors for bad input.
#[test]
fn unmap_dirty_returns_what_the_device_wrote() {
    for fmt in FormatKind::ALL {
        let fx = fx(fmt, 8 * MIB);
        let mut o = IommuOption {
            option_id: IOMMU_OPTION_HUGE_PAGES,
            op: IOMMU_OPTION_OP_SET,
            object_id: fx.ioas,
            ..Default::default()
        };
        fx.fd.option(&mut o).unwrap();
        const IOVA: u64 = 0x1000_0000;
        map(&fx, IOVA, 0, MIB).unwrap();
        map(&fx, IOVA + MIB, MIB, MIB).unwrap();
        let h = hwpt(&fx, IOMMU_HWPT_ALLOC_DIRTY_TRACKING).unwrap();
        fx.fd.attach(fx.dev, h).unwrap();
        track(&fx, h, true).unwrap();
        let dma = fx.fd.device_dma(fx.dev).unwrap();
        dma.write_u64(IOVA + 0x5000, 1).unwrap();
        dma.write_u64(IOVA + MIB + 0x2000, 1).unwrap();
        let mut data = vec![0u8; 64];
        let mut c = IoasUnmapDirty {
            ioas_id: fx.ioas,
            flags: 0,
            __reserved: 0,
            iova: IOVA,
            length: MIB,
            page_size: 4096,
            data: &mut data,
        };
        fx.fd.ioas_unmap_dirty(&mut c).unwrap();
        assert_eq!(c.length, MIB);
        assert_eq!(bits(&data), vec![5], "{fmt}");
        assert!(dma.write_u64(IOVA + 0x5000, 2).is_err(), "{fmt}: gone");

        let call = |iova, length, page_size, flags, data: &mut [u8]| {
            fx.fd.ioas_unmap_dirty(&mut IoasUnmapDirty {
                ioas_id: fx.ioas,
                flags,
                __reserved: 0,
                iova,
                length,
                page_size,
                data,
            })
        };
        let mut d = vec![0u8; 64];
        assert_eq!(call(IOVA + MIB, MIB, 4096, 1, &mut d), Err(e(libc::EOPNOTSUPP)));
        assert_eq!(call(0, u64::MAX, 4096, 0, &mut d), Err(e(libc::EINVAL)));
        assert_eq!(
            call(IOVA + MIB, MIB / 2, 4096, 0, &mut d),
            Err(e(libc::ENOENT)),
            "bisects"
        );
        assert_eq!(call(IOVA, MIB, 4096, 0, &mut d), Err(e(libc::ENOENT)), "already gone");
        assert_eq!(call(IOVA + MIB, MIB, 3000, 0, &mut d), Err(e(libc::EINVAL)));
        assert_eq!(call(IOVA + MIB, MIB, 4096, 0, &mut d[..8]), Err(e(libc::EFAULT)));
        // Raw ABI: the bitmap through user memory, the length written back.
        let bm = 7 * MIB;
        fx.mem.write(bm as usize, &[0u8; 64]);
        let mut raw = vec![0u8; 48];
        raw[..4].copy_from_slice(&48u32.to_le_bytes());
        raw[4..8].copy_from_slice(&fx.ioas.to_le_bytes());
        raw[16..24].copy_from_slice(&(IOVA + MIB).to_le_bytes());
        raw[24..32].copy_from_slice(&MIB.to_le_bytes());
        raw[32..40].copy_from_slice(&4096u64.to_le_bytes());
        raw[40..48].copy_from_slice(&(fx.va + bm).to_le_bytes());
        fx.fd.ioctl(LIVEMIG_IOAS_UNMAP_DIRTY, &mut raw).unwrap();
        let mut got = [0u8; 64];
        fx.mem.read(bm as usize, &mut got);
        assert_eq!(bits(&got), vec![2], "{fmt}: raw");
        assert_eq!(u64::from_le_bytes(raw[24..32].try_into().unwrap()), MIB);
    }
}
