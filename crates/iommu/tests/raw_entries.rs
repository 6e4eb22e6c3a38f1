//! Raw 64-bit entry values for every format and leaf size: after map, after a DMA write and
//! after read-and-clear, plus the non-leaf entries the walk marked Accessed.

use iommu::format::OA_MASK;
use iommu::{AnonMemory, DirtyBitmap, Domain, DomainConfig, FormatKind, HostMemory, Perm};
use std::sync::Arc;

const GIB: u64 = 1 << 30;

struct Case {
    fmt: FormatKind,
    size_lg2: u32,
    level: usize,
    /// Entry bits outside the output address, right after map.
    mapped: u64,
    /// ... after a DMA write (with tracking on, and for Arm after the enable-time clean).
    written: u64,
    /// ... after read-and-clear.
    cleared: u64,
    /// Bits of the size encoding inside the OA field (AMD NextLevel=7), ORed with the address.
    oa_ones: u64,
}

fn cases() -> Vec<Case> {
    use FormatKind::*;
    let c = |fmt, size_lg2, level, mapped, written, cleared, oa_ones| Case {
        fmt,
        size_lg2,
        level,
        mapped,
        written,
        cleared,
        oa_ones,
    };
    vec![
        // AMD v1: PR | FC | IR | IW, A = bit 5, D = bit 6; NextLevel=7 for 64 KiB and 4 MiB.
        c(
            AmdV1,
            12,
            0,
            0x7000_0000_0000_0001,
            0x7000_0000_0000_0061,
            0x7000_0000_0000_0021,
            0,
        ),
        c(
            AmdV1,
            16,
            0,
            0x7000_0000_0000_0e01,
            0x7000_0000_0000_0e61,
            0x7000_0000_0000_0e21,
            0x7000,
        ),
        c(
            AmdV1,
            21,
            1,
            0x7000_0000_0000_0001,
            0x7000_0000_0000_0061,
            0x7000_0000_0000_0021,
            0,
        ),
        c(
            AmdV1,
            22,
            1,
            0x7000_0000_0000_0e01,
            0x7000_0000_0000_0e61,
            0x7000_0000_0000_0e21,
            0x1f_f000,
        ),
        c(
            AmdV1,
            30,
            2,
            0x7000_0000_0000_0001,
            0x7000_0000_0000_0061,
            0x7000_0000_0000_0021,
            0,
        ),
        // VT-d second stage: R | W (| PS), A = bit 8, D = bit 9.
        c(VtdSs, 12, 0, 0x003, 0x303, 0x103, 0),
        c(VtdSs, 21, 1, 0x083, 0x383, 0x183, 0),
        c(VtdSs, 30, 2, 0x083, 0x383, 0x183, 0),
        // Arm stage 1: born writable-dirty (DBM, AP[2]=0); clean sets AP[2] (bit 7).
        c(
            ArmLpaeS1,
            12,
            0,
            0x0008_0000_0000_0f47,
            0x0008_0000_0000_0f47,
            0x0008_0000_0000_0fc7,
            0,
        ),
        c(
            ArmLpaeS1,
            21,
            1,
            0x0008_0000_0000_0f45,
            0x0008_0000_0000_0f45,
            0x0008_0000_0000_0fc5,
            0,
        ),
        c(
            ArmLpaeS1,
            30,
            2,
            0x0008_0000_0000_0f45,
            0x0008_0000_0000_0f45,
            0x0008_0000_0000_0fc5,
            0,
        ),
    ]
}

/// Leaf or table bits with the Accessed bit a walk sets removed (AMD bit 5, VT-d bit 8; Arm
/// sets AF at creation and has no table A).
fn without_walk_a(fmt: FormatKind, bits: u64) -> u64 {
    match fmt {
        FormatKind::AmdV1 => bits & !0x20,
        FormatKind::VtdSs => bits & !0x100,
        FormatKind::ArmLpaeS1 => bits,
    }
}

/// Expected non-leaf entry bits after a DMA walk, by the level of the table holding the entry.
fn table_bits(fmt: FormatKind, level: usize) -> u64 {
    match fmt {
        // PR | IR | IW | NextLevel = level | A
        FormatKind::AmdV1 => 0x6000_0000_0000_0021 | ((level as u64) << 9),
        // R | W | A
        FormatKind::VtdSs => 0x103,
        // table descriptor, no Access flag
        FormatKind::ArmLpaeS1 => 0x003,
    }
}

fn harvest(dom: &Domain, iova: u64, len: u64) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    let mut rec = |i, l| found.push((i, l));
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
    found
}

#[test]
fn raw_entries_every_format_and_size() {
    let mem = Arc::new(AnonMemory::new(2 * GIB as usize, true).unwrap());
    let base = mem.host_ptr() as u64;
    for c in cases() {
        let size = 1u64 << c.size_lg2;
        let dom = Domain::new(DomainConfig::new(c.fmt)).unwrap();
        let iova = 2 * GIB; // aligned for every size
        let offset = GIB;
        let pa = base + offset;
        dom.map(iova, size, mem.clone(), offset, Perm::RW).unwrap();
        let what = format!("{} 2^{}", c.fmt, c.size_lg2);

        let (level, pte) = dom.leaf_entry(iova).unwrap();
        assert_eq!(level, c.level, "{what}: leaf level");
        assert_eq!(pte, (pa | c.oa_ones) & OA_MASK | c.mapped, "{what}: after map");
        // Every replica of a replicated leaf is identical.
        let (_, last) = dom.leaf_entry(iova + size - 4096).unwrap();
        assert_eq!(last, pte, "{what}: last replica");
        // Before tracking, nothing walked: non-leaf entries have A clear.
        for (l, e) in dom.path_entries(iova).into_iter().filter(|(l, _)| *l > c.level) {
            assert_eq!(
                e & !OA_MASK,
                without_walk_a(c.fmt, table_bits(c.fmt, l)),
                "{what}: table entry at level {l} before any walk"
            );
        }

        // Enable as iommufd does: clear pass with no bitmap, then the driver enable.
        dom.read_and_clear_dirty(iova, size, 0, &mut DirtyBitmap::default())
            .unwrap();
        dom.set_dirty_tracking(true).unwrap();
        let (_, pte) = dom.leaf_entry(iova).unwrap();
        assert_eq!(
            pte,
            (pa | c.oa_ones) & OA_MASK | without_walk_a(c.fmt, c.cleared),
            "{what}: after enable"
        );

        // A DMA write in the middle of the leaf.
        let dma = dom.attach(7);
        let target = iova + size / 2 + 0x10;
        dma.write(target, &0x1122_3344_5566_7788u64.to_le_bytes()).unwrap();
        let mut back = [0u8; 8];
        mem.read((offset + size / 2 + 0x10) as usize, &mut back);
        assert_eq!(u64::from_le_bytes(back), 0x1122_3344_5566_7788, "{what}: bytes landed");
        let (_, hit) = dom.leaf_entry(target).unwrap();
        assert_eq!(hit, (pa | c.oa_ones) & OA_MASK | c.written, "{what}: after DMA write");
        if c.oa_ones != 0 {
            // AMD: hardware updated only the replica it walked.
            let (_, first) = dom.leaf_entry(iova).unwrap();
            assert_eq!(
                first,
                (pa | c.oa_ones) & OA_MASK | c.mapped,
                "{what}: untouched replica"
            );
        }
        for (l, e) in dom.path_entries(target).into_iter().filter(|(l, _)| *l > c.level) {
            assert_eq!(
                e & !OA_MASK,
                table_bits(c.fmt, l),
                "{what}: table entry at level {l} after walk"
            );
        }

        // Read-and-clear reports the leaf clipped to the range and resets every replica.
        assert_eq!(harvest(&dom, iova, size), vec![(iova, size)], "{what}: report");
        for probe in [iova, target, iova + size - 4096] {
            let (_, e) = dom.leaf_entry(probe).unwrap();
            // Only the walked replica of an AMD replicated leaf has A.
            let slot_shift = 12 + 9 * c.level as u32;
            let walked = probe >> slot_shift == target >> slot_shift || c.oa_ones == 0;
            let expect_a = if walked { c.cleared } else { c.mapped };
            assert_eq!(
                e,
                (pa | c.oa_ones) & OA_MASK | expect_a,
                "{what}: after clear at {probe:#x}"
            );
        }
        assert_eq!(harvest(&dom, iova, size), vec![], "{what}: second harvest is empty");

        // Clipping: a write reported through a harvest of part of the leaf.
        dma.write(target, &[1]).unwrap();
        dom.flush_iotlb_all();
        dma.write(target, &[2]).unwrap();
        if size > 4096 {
            let lo = iova + size / 2;
            assert_eq!(harvest(&dom, lo, 4096), vec![(lo, 4096)], "{what}: clipped report");
        }
        assert_eq!(dom.take_faults(), vec![], "{what}: no faults");
    }
}

#[test]
fn read_only_and_write_only_encodings() {
    let mem = Arc::new(AnonMemory::new(1 << 21, false).unwrap());
    let pa = mem.host_ptr() as u64;
    let expect = [
        (FormatKind::AmdV1, Perm::READ, 0x3000_0000_0000_0001u64),
        (FormatKind::AmdV1, Perm::WRITE, 0x5000_0000_0000_0001),
        (FormatKind::VtdSs, Perm::READ, 0x001),
        (FormatKind::VtdSs, Perm::WRITE, 0x002),
        (FormatKind::ArmLpaeS1, Perm::READ, 0x0000_0000_0000_0fc7),
        // Stage 1 cannot express write-only: writable (and readable), with DBM.
        (FormatKind::ArmLpaeS1, Perm::WRITE, 0x0008_0000_0000_0f47),
    ];
    for (fmt, perm, bits) in expect {
        let dom = Domain::new(DomainConfig::new(fmt)).unwrap();
        dom.map(0x4000, 4096, mem.clone(), 0, perm).unwrap();
        assert_eq!(dom.leaf_entry(0x4000), Some((0, pa | bits)), "{fmt} {perm:?}");
    }
}

#[test]
fn non_tracking_domains_and_capability_registers() {
    let mem = Arc::new(AnonMemory::new(1 << 21, false).unwrap());
    let pa = mem.host_ptr() as u64;
    for fmt in FormatKind::ALL {
        let mut cfg = DomainConfig::new(fmt);
        cfg.dirty_tracking = false;
        let dom = Domain::new(cfg.clone()).unwrap();
        dom.map(0x4000, 4096, mem.clone(), 0, Perm::RW).unwrap();
        let dma = dom.attach(1);
        dma.write(0x4000, &[9]).unwrap();
        let (_, e) = dom.leaf_entry(0x4000).unwrap();
        // No A/D updates without the per-domain enable; Arm has no DBM.
        let want = match fmt {
            FormatKind::AmdV1 => pa | 0x7000_0000_0000_0001,
            FormatKind::VtdSs => pa | 0x3,
            FormatKind::ArmLpaeS1 => pa | 0xf47,
        };
        assert_eq!(e, want, "{fmt}");
        assert_eq!(
            dom.set_dirty_tracking(true).unwrap_err().errno(),
            iommu::errno::EOPNOTSUPP
        );
        // An IOMMU without the capability cannot give a tracking domain.
        cfg.dirty_tracking = true;
        cfg.hw_dirty_capable = false;
        assert_eq!(Domain::new(cfg).unwrap_err().errno(), iommu::errno::EOPNOTSUPP);
    }
    // Capability registers and enables, raw.
    let amd = Domain::new(DomainConfig::new(FormatKind::AmdV1)).unwrap();
    assert_eq!(amd.capability_register(), 1 << 52 | 1 << 49);
    assert_eq!(amd.context_word() & 0x180, 0, "DTE.HAD off");
    amd.set_dirty_tracking(true).unwrap();
    assert_eq!(amd.context_word() & 0x180, 0x180, "DTE.HAD = 11b");
    let vtd = Domain::new(DomainConfig::new(FormatKind::VtdSs)).unwrap();
    assert_eq!(vtd.capability_register(), 1 << 45 | 1 << 43);
    assert_eq!(vtd.context_word() & 0xfff, 0x089);
    vtd.set_dirty_tracking(true).unwrap();
    assert_eq!(vtd.context_word() & 0xfff, 0x289, "SSADE");
    vtd.set_dirty_tracking(false).unwrap();
    assert_eq!(vtd.context_word() & 0xfff, 0x089);
    let arm = Domain::new(DomainConfig::new(FormatKind::ArmLpaeS1)).unwrap();
    assert_eq!(arm.capability_register(), 0x90);
    assert_eq!(arm.context_word(), 0x0000_ee05_c000_3510, "CD.HD and CD.HA always on");
    arm.set_dirty_tracking(false).unwrap();
    assert_eq!(arm.context_word(), 0x0000_ee05_c000_3510);
}

/// A contiguous AMD leaf that the harvested range cuts carries its dirt in the replica the DMA
/// walked, which may lie outside the range: the harvest must still find it, at the range's
/// tail and at its head, and report the part inside the range.
#[test]
fn a_contiguous_leaf_cut_by_the_range_is_read_through_every_replica() {
    const KIB: u64 = 1 << 10;
    let base = 0x4000_0000;
    for (write_at, range) in [
        // Dirt in the last replica, range ending in the middle of the leaf (its tail edge).
        (base + 60 * KIB, (base, base + 32 * KIB)),
        // Dirt in the first replica, range starting in the middle of the leaf (its head edge).
        (base, (base + 32 * KIB, base + 128 * KIB)),
    ] {
        let mem = Arc::new(AnonMemory::new((256 * KIB) as usize, false).unwrap());
        let dom = Domain::new(DomainConfig::new(FormatKind::AmdV1)).unwrap();
        // Separate 64 KiB maps, so that each is one 64 KiB leaf of sixteen replicas.
        for k in 0..3 {
            dom.map(base + k * 64 * KIB, 64 * KIB, mem.clone(), k * 64 * KIB, Perm::RW)
                .unwrap();
        }
        assert_eq!(dom.leaf_histogram().into_iter().collect::<Vec<_>>(), vec![(16, 3)]);
        dom.read_and_clear_dirty(base, 192 * KIB, 0, &mut DirtyBitmap::default())
            .unwrap();
        dom.set_dirty_tracking(true).unwrap();
        dom.attach(1).write(write_at, &[1]).unwrap();
        let (s, e) = range;
        let got = harvest(&dom, s, e - s);
        let leaf = base;
        let want_lo = s.max(leaf);
        let want_hi = e.min(leaf + 64 * KIB);
        assert_eq!(
            got,
            vec![(want_lo, want_hi - want_lo)],
            "write at {write_at:#x}, range {s:#x}..{e:#x}"
        );
    }
}
