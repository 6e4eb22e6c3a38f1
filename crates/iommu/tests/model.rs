//! Model-based property tests: random sequences of map, unmap, DMA read/write, enable/disable
//! and read-and-clear (with and without NO_CLEAR) against a reference model, for every format,
//! with huge pages on and off and with the eager split/collapse policy.
//!
//! The model is deliberately simple: a map from IOVA to leaves (size, host offset,
//! permissions, dirty), the leaf-choice rule ("largest size the alignments allow"), the split
//! rule and the collapse rule, and shadow memory. Translations, fault records, memory contents,
//! reported dirty ranges and the leaf-size histogram must match exactly after every step.

mod common;
use common::runs;
use iommu::{
    AnonMemory, DirtyBitmap, DmaError, Domain, DomainConfig, Fault, FaultReason, FormatKind, HarvestParallelism,
    HostMemory, IotlbGather, Perm, SplitPolicy, DIRTY_NO_CLEAR,
};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const GIB: u64 = 1 << 30;
const WINDOW: u64 = 4 * GIB;
const HOST: u64 = 2 * GIB;
const DEV: u32 = 3;

#[derive(Clone, Copy, Debug)]
enum Target {
    Mapped(u32),
    Raw(u32),
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        align: u32,
        iova_k: u32,
        host_k: u32,
        units: u8,
        extra: u8,
        perm: u8,
    },
    Unmap {
        at: Target,
        pages: u32,
    },
    Write {
        at: Target,
        slot: u16,
        val: u64,
    },
    WriteSpan {
        at: Target,
        val: u64,
    },
    Read {
        at: Target,
        slot: u16,
    },
    Enable,
    Disable,
    Harvest {
        whole: bool,
        at: Target,
        pages: u32,
        no_clear: bool,
    },
    Translate(Target),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => any::<u32>().prop_map(Target::Mapped),
        1 => (0..(WINDOW >> 12) as u32).prop_map(Target::Raw),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let map = (
        prop_oneof![3 => Just(12u32), 2 => Just(13), 2 => Just(16), 3 => Just(21), 1 => Just(22), 1 => Just(30)],
        0u32..64,
        0u32..64,
        1u8..=3,
        0u8..=2,
        1u8..=3,
    )
        .prop_map(|(align, iova_k, host_k, units, extra, perm)| Op::Map {
            align,
            iova_k,
            host_k,
            units,
            extra,
            perm,
        });
    prop_oneof![
        4 => map,
        2 => (target(), 1u32..1100).prop_map(|(at, pages)| Op::Unmap { at, pages }),
        6 => (target(), 0u16..512, any::<u64>()).prop_map(|(at, slot, val)| Op::Write { at, slot, val }),
        1 => (target(), any::<u64>()).prop_map(|(at, val)| Op::WriteSpan { at, val }),
        2 => (target(), 0u16..512).prop_map(|(at, slot)| Op::Read { at, slot }),
        1 => Just(Op::Enable),
        1 => Just(Op::Disable),
        3 => (any::<bool>(), target(), 1u32..2048, any::<bool>())
            .prop_map(|(whole, at, pages, no_clear)| Op::Harvest { whole, at, pages, no_clear }),
        1 => target().prop_map(Op::Translate),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Leaf {
    lg2: u32,
    host: u64,
    perm: Perm,
    dirty: bool,
}

struct Model {
    fmt: FormatKind,
    huge: bool,
    split: bool,
    tracking: bool,
    leaves: BTreeMap<u64, Leaf>,
    shadow: HashMap<u64, u64>,
}

fn effective(fmt: FormatKind, p: Perm) -> Perm {
    if fmt == FormatKind::ArmLpaeS1 && p.write() {
        Perm::RW
    } else {
        p
    }
}

impl Model {
    fn sizes(&self) -> Vec<u32> {
        let huge_now = self.huge && !(self.split && self.tracking);
        let all: Vec<u32> = match self.fmt {
            FormatKind::AmdV1 => (12..=30).rev().collect(),
            _ => vec![30, 21, 12],
        };
        all.into_iter().filter(|&s| s == 12 || huge_now).collect()
    }

    fn leaf_at(&self, iova: u64) -> Option<(u64, Leaf)> {
        let (&s, &l) = self.leaves.range(..=iova).next_back()?;
        (iova < s + (1 << l.lg2)).then_some((s, l))
    }

    fn overlapping(&self, start: u64, end: u64) -> Vec<u64> {
        let mut v: Vec<u64> = self.leaves.range(start..end).map(|(k, _)| *k).collect();
        if let Some((s, _)) = self.leaf_at(start) {
            if s < start {
                v.insert(0, s);
            }
        }
        v
    }

    fn resolve(&self, t: Target) -> u64 {
        match t {
            Target::Raw(pfn) => (pfn as u64) << 12,
            Target::Mapped(seed) if self.leaves.is_empty() => ((seed as u64) % (WINDOW >> 12)) << 12,
            Target::Mapped(seed) => {
                let n = self.leaves.len() as u64;
                let (&s, l) = self.leaves.iter().nth((seed as u64 % n) as usize).unwrap();
                let pages = 1u64 << (l.lg2 - 12);
                s + ((seed as u64 / n) % pages) * 4096
            }
        }
    }

    /// The split rule: replicated leaves become default leaves of their level, default
    /// leaves become 512 default leaves one level down. Pieces inherit everything.
    fn split_one(&mut self, start: u64) {
        let l = self.leaves.remove(&start).unwrap();
        let level = (l.lg2 - 12) / 9;
        let item = 12 + 9 * level;
        let piece = if l.lg2 > item { item } else { l.lg2 - 9 };
        for k in 0..(1u64 << (l.lg2 - piece)) {
            self.leaves.insert(
                start + (k << piece),
                Leaf {
                    lg2: piece,
                    host: l.host + (k << piece),
                    ..l
                },
            );
        }
    }

    fn split_all(&mut self) {
        while let Some((&s, _)) = self.leaves.iter().find(|(_, l)| l.lg2 > 12) {
            self.split_one(s);
        }
    }

    fn collapse(&mut self) {
        for level in 1..=2u32 {
            let big = 12 + 9 * level;
            let small = big - 9;
            let starts: Vec<u64> = self
                .leaves
                .iter()
                .filter(|(s, l)| *s % (1 << big) == 0 && l.lg2 == small && l.host % (1 << big) == 0)
                .map(|(s, _)| *s)
                .collect();
            for s in starts {
                let first = self.leaves[&s];
                let run: Option<Vec<Leaf>> = (0..512u64)
                    .map(|k| {
                        self.leaves
                            .get(&(s + (k << small)))
                            .copied()
                            .filter(|l| l.lg2 == small && l.host == first.host + (k << small) && l.perm == first.perm)
                    })
                    .collect();
                if let Some(run) = run {
                    let dirty = run.iter().any(|l| l.dirty);
                    for k in 0..512u64 {
                        self.leaves.remove(&(s + (k << small)));
                    }
                    self.leaves.insert(
                        s,
                        Leaf {
                            lg2: big,
                            host: first.host,
                            perm: first.perm,
                            dirty,
                        },
                    );
                }
            }
        }
    }

    fn hw_dirty(&self) -> bool {
        self.fmt == FormatKind::ArmLpaeS1 || self.tracking
    }

    fn histogram(&self) -> BTreeMap<u32, u64> {
        let mut h = BTreeMap::new();
        for l in self.leaves.values() {
            *h.entry(l.lg2).or_default() += 1;
        }
        h
    }
}

struct Real {
    dom: Domain,
    dma: iommu::Dma,
    mem: Arc<AnonMemory>,
}

fn fault(iova: u64, write: bool, reason: FaultReason) -> Fault {
    Fault {
        device: DEV,
        iova,
        write,
        reason,
    }
}

/// Checks one DMA page against the model: Ok(host offset) or the fault the hardware raises.
fn page_access(m: &Model, iova: u64, write: bool) -> Result<(u64, u64), FaultReason> {
    let (s, l) = m.leaf_at(iova).ok_or(FaultReason::NotPresent)?;
    let p = effective(m.fmt, l.perm);
    if (write && !p.write()) || (!write && !p.read()) {
        return Err(FaultReason::Permission);
    }
    Ok((s, l.host + (iova - s)))
}

fn run(fmt: FormatKind, huge: bool, split: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut cfg = DomainConfig::new(fmt);
    cfg.huge_pages = huge;
    cfg.split_policy = if split {
        SplitPolicy::EagerSplit
    } else {
        SplitPolicy::Keep
    };
    cfg.iotlb_entries = 64;
    if ops.len() % 2 == 1 {
        // Half the cases harvest on three threads whatever the size, so the parallel path
        // (jobs per 1 GiB table, the barrier, helpers' buffers replayed in order) is
        // modelled as well as the one-thread path.
        cfg.harvest = HarvestParallelism::forced(3);
    }
    let dom = Domain::new(cfg).unwrap();
    let mem = Arc::new(AnonMemory::new(HOST as usize, true).unwrap());
    let r = Real {
        dma: dom.attach(DEV),
        dom,
        mem,
    };
    let base = r.mem.host_ptr() as u64;
    let mut m = Model {
        fmt,
        huge,
        split,
        tracking: false,
        leaves: BTreeMap::new(),
        shadow: HashMap::new(),
    };

    for (step, op) in ops.into_iter().enumerate() {
        let ctx = format!("step {step}: {op:?}");
        let mut want_faults = Vec::new();
        match op {
            Op::Map {
                align,
                iova_k,
                host_k,
                units,
                extra,
                perm,
            } => {
                let units = if align == 30 { 1 } else { units as u64 };
                let iova = ((iova_k as u64) << align) % WINDOW;
                let host = ((host_k as u64) << align) % HOST;
                let len = (units << align) + extra as u64 * 4096;
                let perm = Perm::from_bits(perm);
                let res = r.dom.map(iova, len, r.mem.clone(), host, perm);
                if host + len > HOST {
                    prop_assert_eq!(res.map_err(|e| e.errno()), Err(libc::EINVAL), "{}", ctx);
                } else if !m.overlapping(iova, iova + len).is_empty() {
                    prop_assert_eq!(res.map_err(|e| e.errno()), Err(libc::EEXIST), "{}", ctx);
                } else {
                    prop_assert!(res.is_ok(), "{}: {:?}", ctx, res);
                    let sizes = m.sizes();
                    let (mut pos, mut h) = (iova, host);
                    while pos < iova + len {
                        let lg2 = *sizes
                            .iter()
                            .find(|&&s| pos % (1 << s) == 0 && h % (1 << s) == 0 && iova + len - pos >= 1 << s)
                            .unwrap();
                        // Arm: writable leaves of a tracking domain are born dirty.
                        let dirty = fmt == FormatKind::ArmLpaeS1 && perm.write();
                        m.leaves.insert(
                            pos,
                            Leaf {
                                lg2,
                                host: h,
                                perm,
                                dirty,
                            },
                        );
                        pos += 1 << lg2;
                        h += 1 << lg2;
                    }
                }
            }
            Op::Unmap { at, pages } => {
                let start = m.resolve(at);
                let end = start + pages as u64 * 4096;
                let res = r.dom.unmap(start, end - start);
                while let Some(&s) = m
                    .overlapping(start, end)
                    .iter()
                    .find(|&&s| s < start || s + (1u64 << m.leaves[&s].lg2) > end)
                {
                    m.split_one(s);
                }
                let mut bytes = 0;
                for s in m.overlapping(start, end) {
                    bytes += 1u64 << m.leaves.remove(&s).unwrap().lg2;
                }
                prop_assert_eq!(res, Ok(bytes), "{}", ctx);
            }
            Op::Write { at, slot, val } => {
                let iova = m.resolve(at) + slot as u64 * 8;
                let res = r.dma.write(iova, &val.to_le_bytes());
                match page_access(&m, iova, true) {
                    Ok((s, host)) => {
                        prop_assert_eq!(res, Ok(()), "{}", ctx);
                        m.shadow.insert(host, val);
                        if m.hw_dirty() {
                            m.leaves.get_mut(&s).unwrap().dirty = true;
                        }
                    }
                    Err(reason) => {
                        let page = iova & !0xfff;
                        prop_assert_eq!(
                            res,
                            Err(DmaError::Fault {
                                iova: page,
                                write: true,
                                reason
                            }),
                            "{}",
                            ctx
                        );
                        want_faults.push(fault(page, true, reason));
                    }
                }
            }
            Op::WriteSpan { at, val } => {
                let p0 = m.resolve(at);
                let iova = p0 + 4096 - 8;
                let mut buf = [0u8; 16];
                buf[..8].copy_from_slice(&val.to_le_bytes());
                buf[8..].copy_from_slice(&(!val).to_le_bytes());
                let res = r.dma.write(iova, &buf);
                match (page_access(&m, p0, true), page_access(&m, p0 + 4096, true)) {
                    (Ok((s0, h0)), Ok((s1, h1))) => {
                        prop_assert_eq!(res, Ok(()), "{}", ctx);
                        m.shadow.insert(h0 + 4096 - 8, val);
                        m.shadow.insert(h1, !val);
                        if m.hw_dirty() {
                            m.leaves.get_mut(&s0).unwrap().dirty = true;
                            m.leaves.get_mut(&s1).unwrap().dirty = true;
                        }
                    }
                    (first, second) => {
                        // Pages are translated in order before any byte moves: the first
                        // page's translation (and its D update) may already have happened.
                        let (page, reason) = match first {
                            Err(reason) => (p0, reason),
                            Ok((s0, _)) => {
                                if m.hw_dirty() {
                                    m.leaves.get_mut(&s0).unwrap().dirty = true;
                                }
                                (p0 + 4096, second.unwrap_err())
                            }
                        };
                        prop_assert_eq!(
                            res,
                            Err(DmaError::Fault {
                                iova: page,
                                write: true,
                                reason
                            }),
                            "{}",
                            ctx
                        );
                        want_faults.push(fault(page, true, reason));
                    }
                }
            }
            Op::Read { at, slot } => {
                let iova = m.resolve(at) + slot as u64 * 8;
                let mut b = [0u8; 8];
                let res = r.dma.read(iova, &mut b);
                match page_access(&m, iova, false) {
                    Ok((_, host)) => {
                        prop_assert_eq!(res, Ok(()), "{}", ctx);
                        prop_assert_eq!(
                            u64::from_le_bytes(b),
                            m.shadow.get(&host).copied().unwrap_or(0),
                            "{}",
                            ctx
                        );
                    }
                    Err(reason) => {
                        let page = iova & !0xfff;
                        prop_assert_eq!(
                            res,
                            Err(DmaError::Fault {
                                iova: page,
                                write: false,
                                reason
                            }),
                            "{}",
                            ctx
                        );
                        want_faults.push(fault(page, false, reason));
                    }
                }
            }
            Op::Enable => {
                r.dom.set_dirty_tracking(true).unwrap();
                if split && huge {
                    m.split_all();
                }
                m.tracking = true;
            }
            Op::Disable => {
                r.dom.set_dirty_tracking(false).unwrap();
                m.tracking = false;
                if split && huge {
                    m.collapse();
                }
            }
            Op::Harvest {
                whole,
                at,
                pages,
                no_clear,
            } => {
                let (start, end) = if whole {
                    (0, WINDOW)
                } else {
                    let s = m.resolve(at);
                    (s, (s + pages as u64 * 4096).min(1 << 48))
                };
                let mut got = Vec::new();
                let mut gather = IotlbGather::new();
                let flags = if no_clear { DIRTY_NO_CLEAR } else { 0 };
                let res = {
                    let mut rec = |i, l| got.push((i, l));
                    r.dom.read_and_clear_dirty(
                        start,
                        end - start,
                        flags,
                        &mut DirtyBitmap {
                            bitmap: Some(&mut rec),
                            gather: Some(&mut gather),
                        },
                    )
                };
                if !m.tracking && fmt != FormatKind::ArmLpaeS1 {
                    prop_assert_eq!(res.map_err(|e| e.errno()), Err(libc::EINVAL), "{}", ctx);
                } else {
                    prop_assert!(res.is_ok(), "{}", ctx);
                    if !no_clear {
                        r.dom.iotlb_sync(&gather);
                    }
                    let mut want = Vec::new();
                    for s in m.overlapping(start, end) {
                        let l = m.leaves.get_mut(&s).unwrap();
                        if l.dirty {
                            let rs = s.max(start);
                            let re = (s + (1u64 << l.lg2)).min(end);
                            want.push((rs, re - rs));
                            if !no_clear {
                                l.dirty = false;
                            }
                        }
                    }
                    // The walker reports adjacent dirty leaves as one run; compare the runs.
                    prop_assert!(
                        got.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
                        "unordered: {:?} {}",
                        got,
                        ctx
                    );
                    prop_assert_eq!(runs(&got), runs(&want), "{}", ctx);
                }
            }
            Op::Translate(at) => {
                let iova = m.resolve(at);
                let want = m
                    .leaf_at(iova)
                    .map(|(s, l)| (base + l.host + (iova - s), effective(fmt, l.perm)));
                prop_assert_eq!(r.dom.translation(iova), want, "{}", ctx);
            }
        }
        prop_assert_eq!(r.dom.take_faults(), want_faults, "{}: fault log", ctx);
        prop_assert_eq!(r.dom.leaf_histogram(), m.histogram(), "{}: leaf sizes", ctx);
    }
    // Every leaf translates as modelled, at its first and last page.
    for (&s, l) in &m.leaves {
        for iova in [s, s + (1u64 << l.lg2) - 4096] {
            prop_assert_eq!(
                r.dom.translation(iova),
                Some((base + l.host + (iova - s), effective(fmt, l.perm)))
            );
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("MODEL_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

macro_rules! model_tests {
    ($($name:ident: $fmt:expr, $huge:expr, $split:expr;)*) => {$(
        proptest! {
            #![proptest_config(config())]
            #[test]
            fn $name(ops in proptest::collection::vec(op(), 1..40)) {
                run($fmt, $huge, $split, ops)?;
            }
        }
    )*};
}

model_tests! {
    amd_huge: FormatKind::AmdV1, true, false;
    amd_4k: FormatKind::AmdV1, false, false;
    amd_split: FormatKind::AmdV1, true, true;
    vtd_huge: FormatKind::VtdSs, true, false;
    vtd_4k: FormatKind::VtdSs, false, false;
    vtd_split: FormatKind::VtdSs, true, true;
    arm_huge: FormatKind::ArmLpaeS1, true, false;
    arm_4k: FormatKind::ArmLpaeS1, false, false;
    arm_split: FormatKind::ArmLpaeS1, true, true;
}
