//! Nested translation (`docs/viommu.md#nested-translation`): raw stage-1 and stage-2 entries
//! after guest writes and DMA, and a model-based test of two-stage translation with dirty
//! bits against a reference model.

use iommu::format::vtd_ss;
use iommu::nested::stage1::vtd_fs;
use iommu::{
    AnonMemory, DirtyBitmap, DmaError, Domain, DomainConfig, FaultReason, FormatKind, IotlbGather, NestedConfig,
    NestedDomain, Perm, Stage1Kind,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const GUEST: u64 = 32 << 20;
/// Stage-1 tables live here (guest-physical), data pages above.
const TABLES: u64 = 0x10_0000;
const TABLES_END: u64 = 0x20_0000;
const DATA: u64 = 0x40_0000;

/// What a guest driver does to its own stage-1 table: plain CPU stores into its RAM.
struct GuestTable {
    mem: Arc<AnonMemory>,
    kind: Stage1Kind,
    root: u64,
    next: u64,
}

impl GuestTable {
    fn new(mem: Arc<AnonMemory>, kind: Stage1Kind) -> Self {
        let root = TABLES;
        mem.write(root as usize, &[0u8; 4096]);
        Self {
            mem,
            kind,
            root,
            next: root + 4096,
        }
    }
    fn read(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.mem.read(gpa as usize, &mut b);
        u64::from_le_bytes(b)
    }
    fn write(&self, gpa: u64, v: u64) {
        self.mem.write(gpa as usize, &v.to_le_bytes());
    }
    fn slot(iova: u64, level: usize) -> u64 {
        ((iova >> (12 + 9 * level)) & 511) * 8
    }
    /// The leaf slot's GPA, building tables on the way.
    fn leaf_slot(&mut self, iova: u64) -> u64 {
        let mut table = self.root;
        for level in (1..4).rev() {
            let e = table + Self::slot(iova, level);
            let pte = self.read(e);
            table = match self.kind.decode(pte, level) {
                iommu::format::Pte::Table { pa } => pa,
                _ => {
                    let t = self.next;
                    assert!(t < TABLES_END, "test table region full");
                    self.next += 4096;
                    self.mem.write(t as usize, &[0u8; 4096]);
                    self.write(e, self.kind.table(t, level));
                    t
                }
            };
        }
        table + Self::slot(iova, 0)
    }
    fn map(&mut self, iova: u64, gpa: u64, perm: Perm) {
        let slot = self.leaf_slot(iova);
        self.write(slot, self.kind.leaf(gpa, 0, 12, perm));
    }
    fn unmap(&mut self, iova: u64) {
        let slot = self.leaf_slot(iova);
        self.write(slot, 0);
    }
    /// Every stage-1 table page and its contents.
    fn snapshot(&self) -> BTreeMap<u64, Vec<u8>> {
        (TABLES..self.next)
            .step_by(4096)
            .map(|g| {
                let mut b = vec![0u8; 4096];
                self.mem.read(g as usize, &mut b);
                (g, b)
            })
            .collect()
    }
}

fn parent(format: FormatKind, mem: &Arc<AnonMemory>, huge: bool) -> Domain {
    let mut cfg = DomainConfig::new(format);
    cfg.nest_parent = true;
    cfg.huge_pages = huge;
    let d = Domain::new(cfg).unwrap();
    d.map(0, GUEST, mem.clone(), 0, Perm::RW).unwrap();
    // A fresh tracking domain's Arm leaves are born dirty; start clean, as iommufd's enable does.
    harvest(&d, 0, GUEST);
    d.set_dirty_tracking(true).unwrap();
    d
}

/// Stage 2's dirty 4 KiB pages in `[start, end)`, cleared, with the IOTLB sync.
fn harvest(d: &Domain, start: u64, end: u64) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    let mut gather = IotlbGather::default();
    {
        let mut rec = |iova: u64, len: u64| {
            for p in (iova..iova + len).step_by(4096) {
                pages.insert(p);
            }
        };
        let mut out = DirtyBitmap {
            bitmap: Some(&mut rec),
            gather: Some(&mut gather),
        };
        if d.format() != FormatKind::ArmLpaeS1 && !d.dirty_tracking_enabled() {
            out.bitmap = None;
        }
        d.read_and_clear_dirty(start, end - start, 0, &mut out).unwrap();
    }
    d.iotlb_sync(&gather);
    pages
}

/// Stage 2's raw leaf for `gpa`, with the host address of the page replaced by the GPA (the
/// output address is a host pointer).
fn leaf2(d: &Domain, mem: &AnonMemory, gpa: u64) -> u64 {
    use iommu::HostMemory;
    let pte = d.leaf_entry(gpa).unwrap().1;
    let host = mem.host_ptr() as u64 + gpa;
    assert_eq!(
        pte & 0x000f_ffff_ffff_f000,
        host,
        "stage 2 maps {gpa:#x} to its host page"
    );
    pte - host + gpa
}

/// VT-d nesting: first-stage entries as the guest wrote them, then with A and D as a DMA read
/// and write leave them; stage 2 marks the stage-1 table pages dirty because those A/D
/// updates are writes, and the data page dirty only on the write.
#[test]
fn vtd_first_stage_raw_entries_after_guest_writes_and_dma() {
    let mem = Arc::new(AnonMemory::new(GUEST as usize, false).unwrap());
    let p = parent(FormatKind::VtdSs, &mem, false);
    let mut g = GuestTable::new(mem.clone(), Stage1Kind::VtdFs);
    let iova = 0x7f_1234_5000u64;
    let gpa = DATA + 0x3000;
    g.map(iova, gpa, Perm::RW);
    let n = NestedDomain::new(&p, NestedConfig::new(Stage1Kind::VtdFs, g.root)).unwrap();

    let path = n.stage1_entries(iova);
    let tables: Vec<u64> = path[..3].iter().map(|&(_, e)| e & 0x000f_ffff_ffff_f000).collect();
    assert_eq!(path.len(), 4);
    // Tables: address | P | R/W | U/S = 0x7; leaf: XD | address | U/S | R/W | P.
    for (i, &(level, pte)) in path[..3].iter().enumerate() {
        assert_eq!(level, 3 - i);
        assert_eq!(pte, tables[i] | 0x7, "level {level} table entry as written");
    }
    assert_eq!(path[3], (0, 0x8000_0000_0040_3007));
    assert_eq!(n.translation(iova), Some((gpa, Perm::RW)));

    let dma = n.attach(7);
    let mut b = [0u8; 8];
    dma.read(iova + 8, &mut b).unwrap();
    let path = n.stage1_entries(iova);
    for (i, &(_, pte)) in path[..3].iter().enumerate() {
        assert_eq!(pte, tables[i] | 0x27, "A set in every table entry the walk used");
    }
    assert_eq!(path[3].1, 0x8000_0000_0040_3027, "a read sets A, not D");
    // Stage 2: the data page was read (A, no D); the table pages were written by the walk.
    assert_eq!(leaf2(&p, &mem, gpa), (gpa | vtd_ss::R | vtd_ss::W | vtd_ss::A));
    for t in [g.root, tables[0], tables[1], tables[2]] {
        assert_eq!(leaf2(&p, &mem, t), t | 0x303, "table page {t:#x}: A and D in stage 2");
    }
    let dirty = harvest(&p, 0, GUEST);
    let want: BTreeSet<u64> = [g.root, tables[0], tables[1], tables[2]].into();
    assert_eq!(dirty, want, "a read dirties only the stage-1 tables it updated");

    dma.write(iova + 8, b"written!").unwrap();
    assert_eq!(n.stage1_entries(iova)[3].1, 0x8000_0000_0040_3067, "a write sets D");
    assert_eq!(leaf2(&p, &mem, gpa), gpa | 0x303, "and D in stage 2");
    let dirty = harvest(&p, 0, GUEST);
    assert_eq!(
        dirty,
        [tables[2], gpa].into(),
        "the leaf table (D set) and the data page"
    );
    let mut back = [0u8; 8];
    mem.read((gpa + 8) as usize, &mut back);
    assert_eq!(&back, b"written!");

    // A second write hits the IOTLB and changes nothing; after a stage-2 harvest cleared D,
    // the combined entry was invalidated, so the next write walks and dirties stage 2 again.
    dma.write(iova + 16, b"again").unwrap();
    assert_eq!(
        harvest(&p, 0, GUEST),
        [gpa].into(),
        "a write after a harvest is found again"
    );
    assert_eq!(
        n.stage1_entries(iova)[3].1,
        0x8000_0000_0040_3067,
        "stage 1 is the guest's: never cleaned"
    );
    let (lookups, misses) = n.iotlb_stats();
    assert_eq!(
        (lookups, misses),
        (3, 3),
        "read, write (not write-ready), write after the harvest's sync"
    );
    assert!(p.iotlb_stats().1 > 0);
}

/// A harvest of stage 2 must invalidate the combined translations cached on top of it: a
/// write after the harvest has to walk and set stage-2 D again. Sabotaged (the nested IOTLB
/// kept), the second write hits a stale write-ready entry and the harvest never sees it.
#[test]
fn a_stage2_harvest_invalidates_nested_iotlbs_or_writes_are_lost() {
    for sabotage in [false, true] {
        let mem = Arc::new(AnonMemory::new(GUEST as usize, false).unwrap());
        let p = parent(FormatKind::VtdSs, &mem, false);
        let mut g = GuestTable::new(mem.clone(), Stage1Kind::VtdFs);
        g.map(0x5000, DATA, Perm::RW);
        let n = NestedDomain::new(&p, NestedConfig::new(Stage1Kind::VtdFs, g.root)).unwrap();
        let dma = n.attach(1);
        p.sabotage_keep_nested_iotlbs(sabotage);
        dma.write_u64(0x5000, 1).unwrap();
        assert!(harvest(&p, 0, GUEST).contains(&DATA));
        dma.write_u64(0x5000, 2).unwrap();
        let found = harvest(&p, 0, GUEST).contains(&DATA);
        assert_eq!(found, !sabotage, "sabotage {sabotage}: the second write found");
    }
}

/// Arm stage 1 in the guest's memory with HTTU: a leaf the guest wrote writable-clean and not
/// yet accessed gets AF on a read and loses AP[2] (becomes writable-dirty) on a write.
#[test]
fn arm_stage1_raw_entries_after_guest_writes_and_dma() {
    let mem = Arc::new(AnonMemory::new(GUEST as usize, false).unwrap());
    let p = parent(FormatKind::AmdV1, &mem, false);
    let mut g = GuestTable::new(mem.clone(), Stage1Kind::ArmLpaeS1);
    let iova = 0x1234_5678_0000u64;
    let gpa = DATA;
    g.map(iova, gpa, Perm::RW);
    let n = NestedDomain::new(&p, NestedConfig::new(Stage1Kind::ArmLpaeS1, g.root)).unwrap();
    // DBM | output | SH | AP[2] (clean) | AP[1] | AttrIndx 1 | page | valid; AF clear.
    assert_eq!(n.stage1_entries(iova)[3], (0, 0x0008_0000_0040_0bc7));
    let dma = n.attach(1);
    dma.read_u64(iova).unwrap();
    assert_eq!(n.stage1_entries(iova)[3].1, 0x0008_0000_0040_0fc7, "AF set by the read");
    dma.write_u64(iova, 5).unwrap();
    assert_eq!(
        n.stage1_entries(iova)[3].1,
        0x0008_0000_0040_0f47,
        "AP[2] cleared: dirty"
    );
    // Arm table descriptors have no access flag: stage 2 saw writes only to the leaf table.
    let leaf_table = n.stage1_entries(iova)[2].1 & 0xffff_ffff_f000;
    assert_eq!(harvest(&p, 0, GUEST), [leaf_table, gpa].into());

    // A read-only stage-1 leaf faults a write, and stage 1 says so.
    g.map(iova + 4096, gpa + 4096, Perm::READ);
    n.invalidate(iova + 4096, 1);
    assert_eq!(
        dma.write_u64(iova + 4096, 1),
        Err(DmaError::Fault {
            iova: iova + 4096,
            write: true,
            reason: FaultReason::Permission
        })
    );
}

/// Stage-2 faults in a nested walk are reported as such: a stage-1 table page stage 2 maps
/// read-only cannot take the walk's A update; an output page stage 2 does not map faults.
#[test]
fn stage2_faults_during_a_nested_walk() {
    let mem = Arc::new(AnonMemory::new(GUEST as usize, false).unwrap());
    let p = parent(FormatKind::VtdSs, &mem, false);
    let mut g = GuestTable::new(mem.clone(), Stage1Kind::VtdFs);
    g.map(0x1000, DATA, Perm::RW);
    g.map(0x2000, DATA + 0x1000, Perm::RW);
    let n = NestedDomain::new(&p, NestedConfig::new(Stage1Kind::VtdFs, g.root)).unwrap();
    let dma = n.attach(3);
    let f = |iova, write, reason| Err(DmaError::Fault { iova, write, reason });
    // The root page read-only in stage 2: reading it is fine, setting A in it is not.
    p.unmap(g.root, 4096).unwrap();
    p.map(g.root, 4096, mem.clone(), g.root, Perm::READ).unwrap();
    assert_eq!(dma.read_u64(0x1000), f(0x1000, false, FaultReason::Stage2Permission));
    assert_eq!(
        n.stage1_entries(0x1000)[0].1 & vtd_fs::A,
        0,
        "the update did not happen"
    );
    p.unmap(g.root, 4096).unwrap();
    p.map(g.root, 4096, mem.clone(), g.root, Perm::RW).unwrap();
    assert_eq!(dma.read_u64(0x1000), Ok(0));
    p.unmap(DATA + 0x1000, 4096).unwrap();
    assert_eq!(dma.read_u64(0x2000), f(0x2000, false, FaultReason::Stage2NotPresent));
    assert_eq!(n.faults().1, 2);
    // A nested domain needs a nesting parent.
    let plain = Domain::new(DomainConfig::new(FormatKind::VtdSs)).unwrap();
    let e = NestedDomain::new(&plain, NestedConfig::new(Stage1Kind::VtdFs, 0)).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert_eq!(
        NestedDomain::new(&p, NestedConfig::new(Stage1Kind::VtdFs, 0x1234))
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
}

#[derive(Clone, Debug)]
enum Op {
    S1Map { iova: u8, gpa: u8, write: bool },
    S1Unmap { iova: u8 },
    S2Unmap { gpa: u8 },
    S2Map { gpa: u8, write: bool },
    Dma { iova: u8, write: bool, off: u16 },
    Harvest,
    InvalidateAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..32u8, 0..32u8, any::<bool>()).prop_map(|(iova, gpa, write)| Op::S1Map { iova, gpa, write }),
        1 => (0..32u8).prop_map(|iova| Op::S1Unmap { iova }),
        1 => (0..32u8).prop_map(|gpa| Op::S2Unmap { gpa }),
        1 => (0..32u8, any::<bool>()).prop_map(|(gpa, write)| Op::S2Map { gpa, write }),
        8 => (0..32u8, any::<bool>(), 0..4089u16).prop_map(|(iova, write, off)| Op::Dma { iova, write, off }),
        2 => Just(Op::Harvest),
        1 => Just(Op::InvalidateAll),
    ]
}

/// IOVA of model page `i`: spread over several stage-1 tables at every level.
fn iova_of(i: u8) -> u64 {
    let i = i as u64;
    ((i % 4) << 39) | ((i / 4 % 2) << 30) | ((i / 8 % 2) << 21) | ((i / 16) << 12) | 0x40_0000_0000
}
fn gpa_of(i: u8) -> u64 {
    DATA + i as u64 * 4096
}

/// The reference model of two-stage translation: stage 1 and stage 2 as maps, the dirty set
/// as "data pages written since the last harvest" plus "stage-1 table pages whose contents the
/// hardware changed since the last harvest".
fn run_model(parent_fmt: FormatKind, s1: Stage1Kind, ops: &[Op]) -> Result<(), TestCaseError> {
    let mem = Arc::new(AnonMemory::new(GUEST as usize, false).unwrap());
    let p = parent(parent_fmt, &mem, false);
    let mut g = GuestTable::new(mem.clone(), s1);
    let n = NestedDomain::new(&p, NestedConfig::new(s1, g.root)).unwrap();
    let dma = n.attach(9);
    let mut m1: BTreeMap<u8, (u8, bool)> = BTreeMap::new();
    let mut m2: BTreeMap<u8, bool> = (0..32).map(|g| (g, true)).collect();
    let mut dirty: BTreeSet<u64> = BTreeSet::new();
    let mut tables = g.snapshot();
    // Table pages the hardware changed since the last harvest; the guest's own stores between
    // two snapshots must not hide them.
    let mut hw_changed: BTreeSet<u64> = BTreeSet::new();
    let changed_since = |then: &BTreeMap<u64, Vec<u8>>, now: &BTreeMap<u64, Vec<u8>>| -> BTreeSet<u64> {
        now.iter()
            .filter(|(gp, c)| then.get(gp).is_some_and(|t| t != *c))
            .map(|(gp, _)| *gp)
            .collect()
    };
    let mut stamp = 0u64;
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::S1Map { iova, gpa, write } => {
                hw_changed.extend(changed_since(&tables, &g.snapshot()));
                let perm = if write { Perm::RW } else { Perm::READ };
                g.map(iova_of(iova), gpa_of(gpa), perm);
                m1.insert(iova, (gpa, write));
                n.invalidate(iova_of(iova), 1);
                // The guest's own stores are the CPU's, not the IOMMU's.
                tables = g.snapshot();
            }
            Op::S1Unmap { iova } => {
                hw_changed.extend(changed_since(&tables, &g.snapshot()));
                g.unmap(iova_of(iova));
                m1.remove(&iova);
                n.invalidate(iova_of(iova), 1);
                tables = g.snapshot();
            }
            Op::S2Unmap { gpa } => {
                if m2.remove(&gpa).is_some() {
                    p.unmap(gpa_of(gpa), 4096).unwrap();
                    dirty.remove(&gpa_of(gpa));
                }
            }
            Op::S2Map { gpa, write } => {
                if let std::collections::btree_map::Entry::Vacant(e) = m2.entry(gpa) {
                    let perm = if write { Perm::RW } else { Perm::READ };
                    p.map(gpa_of(gpa), 4096, mem.clone(), gpa_of(gpa), perm).unwrap();
                    e.insert(write);
                    if parent_fmt == FormatKind::ArmLpaeS1 && write {
                        dirty.insert(gpa_of(gpa)); // born dirty (docs/iommu.md#arm-lpae-stage-1)
                    }
                }
            }
            Op::Dma { iova, write, off } => {
                let va = iova_of(iova) + off as u64;
                let want = match m1.get(&iova) {
                    None => Err(FaultReason::NotPresent),
                    Some(&(_, w1)) if write && !w1 => Err(FaultReason::Permission),
                    Some(&(gp, _)) => match m2.get(&gp) {
                        None => Err(FaultReason::Stage2NotPresent),
                        Some(&w2) if write && !w2 => Err(FaultReason::Stage2Permission),
                        Some(_) => Ok(gp),
                    },
                };
                stamp += 1;
                let got = if write {
                    dma.write_u64(va, stamp).map(|_| ())
                } else {
                    dma.read_u64(va).map(|_| ())
                };
                match (want, got) {
                    (Ok(gp), Ok(())) => {
                        if write {
                            let mut b = [0u8; 8];
                            mem.read((gpa_of(gp) + off as u64) as usize, &mut b);
                            prop_assert_eq!(u64::from_le_bytes(b), stamp, "step {}: data at the model's GPA", step);
                            dirty.insert(gpa_of(gp));
                        }
                    }
                    (Err(r), Err(DmaError::Fault { reason, .. })) => {
                        prop_assert_eq!(r, reason, "step {}: fault", step)
                    }
                    (w, g) => prop_assert!(false, "step {}: {:?} want {:?} got {:?}", step, op, w, g),
                }
            }
            Op::Harvest => {
                let got = harvest(&p, 0, GUEST);
                let now = g.snapshot();
                hw_changed.extend(changed_since(&tables, &now));
                let want: BTreeSet<u64> = dirty.union(&hw_changed).copied().collect();
                prop_assert_eq!(&got, &want, "step {}: stage-2 dirty pages", step);
                dirty.clear();
                hw_changed.clear();
                tables = now;
            }
            Op::InvalidateAll => n.invalidate_all(),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random guest stage-1 changes, host stage-2 changes and DMA against the reference model,
    /// for both stage-1 formats on every parent format.
    #[test]
    fn nesting_matches_the_two_stage_model(ops in proptest::collection::vec(op(), 1..120), pf in 0..3usize, s1 in 0..2usize) {
        run_model(FormatKind::ALL[pf], Stage1Kind::ALL[s1], &ops)?;
    }
}

/// The migration loop against a device writing through a guest that remaps all the time:
/// harvest stage 2, copy what it reported, repeat; after the last round the copy must equal
/// memory on every page. Remapping moves the device's writes between guest pages, and the
/// GPA-indexed bitmap follows them without any translation. Missed pages are counted.
/// Sabotaged (stage-2 invalidations kept from the nested IOTLB), the same loop misses pages.
#[test]
fn harvest_and_copy_misses_nothing_while_the_guest_remaps() {
    for s1 in Stage1Kind::ALL {
        assert_eq!(
            migrate_while_remapping(s1, false, true),
            0,
            "{s1}: pages the harvests missed"
        );
    }
    // Without the remapping, whose invalidations would hide it now and then.
    let lost = migrate_while_remapping(Stage1Kind::VtdFs, true, false);
    assert!(lost > 0, "the sabotage must be seen: {lost} pages missed");
}

fn migrate_while_remapping(s1: Stage1Kind, sabotage: bool, remap: bool) -> usize {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const PAGES: u64 = 64;
    {
        let mem = Arc::new(AnonMemory::new(GUEST as usize, false).unwrap());
        let p = parent(FormatKind::VtdSs, &mem, false);
        let mut g = GuestTable::new(mem.clone(), s1);
        for i in 0..16 {
            g.map(0x100_0000 + i * 4096, DATA + i * 4096, Perm::RW);
        }
        let n = NestedDomain::new(&p, NestedConfig::new(s1, g.root)).unwrap();
        p.sabotage_keep_nested_iotlbs(sabotage);
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let writer = {
            let (dma, stop, writes) = (n.attach(1), stop.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x += 1;
                    let iova = 0x100_0000 + (x % 16) * 4096 + (x * 8) % 4096;
                    if dma.write_u64(iova, x).is_ok() {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let remapper = {
            let (n, stop) = (n.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut k = 0u64;
                while remap && !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let iova = 0x100_0000 + (k % 16) * 4096;
                    g.unmap(iova);
                    n.invalidate(iova, 1);
                    // The same IOVA on another guest page.
                    g.map(iova, DATA + (k * 7 % PAGES) * 4096, Perm::RW);
                    n.invalidate(iova, 1);
                }
            })
        };
        let mut copy = vec![0u8; (DATA + PAGES * 4096) as usize];
        let round = |copy: &mut Vec<u8>| {
            for gp in harvest(&p, 0, GUEST) {
                mem.read(gp as usize, &mut copy[gp as usize..gp as usize + 4096]);
            }
        };
        // The initial bulk copy, then rounds while everything runs.
        mem.read(0, &mut copy);
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(300) || writes.load(Ordering::Relaxed) < 10_000 {
            round(&mut copy);
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "the writer made no progress"
            );
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        remapper.join().unwrap();
        round(&mut copy);
        let mut now = vec![0u8; copy.len()];
        mem.read(0, &mut now);
        // Only the device's pages: the guest's own stores to its tables are the CPU's, which a
        // VMM finds in KVM's log, not here.
        (DATA as usize / 4096..copy.len() / 4096)
            .filter(|&i| copy[i * 4096..(i + 1) * 4096] != now[i * 4096..(i + 1) * 4096])
            .count()
    }
}
