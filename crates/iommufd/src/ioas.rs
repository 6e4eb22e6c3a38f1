//! An I/O address space: its areas, allowed ranges and the IOVA allocator (Linux:
//! drivers/iommu/iommufd/io_pagetable.c). Pure data; `ictx.rs` applies it to the domains.

use crate::errno::{err, Errno};
use crate::uapi::IovaRange;
use iommu::errno::*;
use iommu::{HostMemory, Perm};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest alignment the allocator keeps from `user_va` (HPAGE_SIZE).
pub const HPAGE_SIZE: u64 = 2 << 20;
/// The allocator never returns IOVAs below this, so never 0 (Linux starts at PAGE_SIZE).
const ALLOC_FLOOR: u64 = 4096;

/// One mapped range of user memory.
#[derive(Clone)]
pub struct Area {
    pub length: u64,
    pub user_va: u64,
    pub mem: Arc<dyn HostMemory>,
    pub offset: u64,
    pub perm: Perm,
}

impl Area {
    pub fn last(&self, iova: u64) -> u64 {
        iova + self.length - 1
    }
}

#[derive(Default)]
pub struct Ioas {
    pub areas: BTreeMap<u64, Area>,
    pub allowed: Vec<IovaRange>,
    pub disable_large_pages: bool,
    /// Paging HWPTs whose page tables mirror this IOAS.
    pub hwpts: Vec<u32>,
}

/// Whether two inclusive ranges intersect.
pub fn intersects(a: IovaRange, b: IovaRange) -> bool {
    a.start <= b.last && b.start <= a.last
}

/// Sorts and merges inclusive ranges.
pub fn merge(mut v: Vec<IovaRange>) -> Vec<IovaRange> {
    v.sort_unstable();
    let mut out: Vec<IovaRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.last.saturating_add(1) => l.last = l.last.max(r.last),
            _ => out.push(r),
        }
    }
    out
}

/// The gaps of `[0, u64::MAX]` between merged `reserved` ranges.
pub fn complement(reserved: &[IovaRange]) -> Vec<IovaRange> {
    let mut out = Vec::new();
    let mut next = Some(0u64);
    for r in reserved {
        if let Some(n) = next {
            if r.start > n {
                out.push(IovaRange {
                    start: n,
                    last: r.start - 1,
                });
            }
        }
        next = r.last.checked_add(1);
    }
    if let Some(n) = next {
        out.push(IovaRange {
            start: n,
            last: u64::MAX,
        });
    }
    out
}

impl Ioas {
    /// Areas intersecting `[start, last]`, in order.
    pub fn areas_in(&self, start: u64, last: u64) -> impl Iterator<Item = (u64, &Area)> {
        let before = self
            .areas
            .range(..start)
            .next_back()
            .filter(|(k, a)| a.last(**k) >= start)
            .map(|(k, a)| (*k, a));
        before
            .into_iter()
            .chain(self.areas.range(start..=last).map(|(k, a)| (*k, a)))
    }

    pub fn any_area_in(&self, start: u64, last: u64) -> bool {
        self.areas_in(start, last).next().is_some()
    }

    /// Kernel-chosen IOVA: the lowest hole of `length` bytes that is never 0, keeps the
    /// alignment of `user_va` up to [`HPAGE_SIZE`] (and at least `min_align`), lies inside the
    /// allowed ranges if any, and avoids reserved ranges and existing areas.
    pub fn alloc_iova(&self, user_va: u64, length: u64, min_align: u64, reserved: &[IovaRange]) -> Result<u64, Errno> {
        let va_align = if user_va == 0 {
            HPAGE_SIZE
        } else {
            1u64 << user_va.trailing_zeros().min(63)
        };
        let align = va_align
            .min(HPAGE_SIZE)
            .min(length.checked_next_power_of_two().unwrap_or(1 << 63))
            .max(min_align)
            .max(1);
        let windows = if self.allowed.is_empty() {
            vec![IovaRange {
                start: ALLOC_FLOOR,
                last: u64::MAX - 4096,
            }]
        } else {
            self.allowed.clone()
        };
        // Everything the allocator must avoid, merged.
        let mut used: Vec<IovaRange> = reserved.to_vec();
        used.extend(self.areas.iter().map(|(k, a)| IovaRange {
            start: *k,
            last: a.last(*k),
        }));
        let used = merge(used);
        for w in windows {
            let mut cand = w.start.max(ALLOC_FLOOR);
            loop {
                cand = match cand.checked_next_multiple_of(align) {
                    Some(c) => c,
                    None => break,
                };
                let Some(last) = cand.checked_add(length - 1) else {
                    break;
                };
                if last > w.last {
                    break;
                }
                let want = IovaRange { start: cand, last };
                match used.iter().find(|u| intersects(**u, want)) {
                    None => return Ok(cand),
                    Some(u) => match u.last.checked_add(1) {
                        Some(n) => cand = n,
                        None => break,
                    },
                }
            }
        }
        err(ENOSPC, "no free IOVA range fits")
    }

    /// Splits `[start, last]` into the contiguous runs of areas covering it from `start`.
    /// Returns the runs and whether they cover the whole range (no hole).
    pub fn contiguous_runs(&self, start: u64, last: u64) -> (Vec<(u64, u64)>, bool) {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut next = start;
        for (k, a) in self.areas_in(start, last) {
            if k > next {
                return (runs, false);
            }
            let s = k.max(start);
            let e = a.last(k).min(last);
            match runs.last_mut() {
                Some(r) if r.1 + 1 == s => r.1 = e,
                _ => runs.push((s, e)),
            }
            if e == last {
                return (runs, true);
            }
            next = e + 1;
        }
        (runs, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, last: u64) -> IovaRange {
        IovaRange { start, last }
    }

    #[test]
    fn merge_and_complement() {
        let m = merge(vec![r(10, 20), r(0, 5), r(6, 8), r(15, 30)]);
        assert_eq!(m, vec![r(0, 8), r(10, 30)]);
        assert_eq!(complement(&m), vec![r(9, 9), r(31, u64::MAX)]);
        assert_eq!(complement(&[r(0, u64::MAX)]), vec![]);
        assert_eq!(complement(&[]), vec![r(0, u64::MAX)]);
    }
}
