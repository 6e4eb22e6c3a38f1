//! Linux's `iova_bitmap` (drivers/iommu/iommufd/iova_bitmap.c) over a caller-owned buffer.
//!
//! The buffer is handled as bytes, LSB first: bit `n` is `data[n / 8] >> (n % 8)` and stands
//! for `iova + n * page_size`. It is visited in windows of at most [`WINDOW_BYTES`] (what
//! Linux pins at once: 512 pages of bitmap, 16 Mi bits, 64 GiB of IOVA at 4 KiB), and bits are
//! set straight into the caller's bytes: there is no intermediate bitmap. Bits are only set.
//!
//! A harvest clears a dirty leaf whole, so a leaf that crosses a window's end must still be
//! reported whole within the range although the walk of that window stops at its end: the
//! part past the window is carried and set as soon as the next window is visited (Linux's
//! "set ahead"), through as many windows as it spans. Only the part outside the requested
//! range is dropped, as in Linux.

use crate::errno::{err, Errno};
use iommu::errno::EFAULT;
use iommu::RecordDirty;

/// Bytes of bitmap one window covers.
pub const WINDOW_BYTES: u64 = 512 * 4096;

pub struct IovaBitmap<'a> {
    data: &'a mut [u8],
    iova: u64,
    length: u64,
    pgshift: u32,
    /// Bits per window.
    window_bits: u64,
    /// Bit range of the current window, inclusive.
    win_first: u64,
    win_last: u64,
    /// Dirty IOVA past the current window, inclusive, still to be set.
    ahead: Option<(u64, u64)>,
}

impl<'a> IovaBitmap<'a> {
    /// `page_size` must be a power of two; the range is already validated.
    pub fn new(data: &'a mut [u8], iova: u64, length: u64, page_size: u64) -> Self {
        Self::with_window(data, iova, length, page_size, WINDOW_BYTES)
    }

    /// The same with windows of `window_bytes` bytes of bitmap, so that tests can cross window
    /// boundaries without 64 GiB of IOVA.
    pub(crate) fn with_window(data: &'a mut [u8], iova: u64, length: u64, page_size: u64, window_bytes: u64) -> Self {
        Self {
            data,
            iova,
            length,
            pgshift: page_size.trailing_zeros(),
            window_bits: window_bytes * 8,
            win_first: 0,
            win_last: 0,
            ahead: None,
        }
    }

    fn total_bits(&self) -> u64 {
        ((self.length - 1) >> self.pgshift) + 1
    }

    /// Calls `f(window_iova, window_length)` for each window in order. A window whose bytes
    /// do not fit the caller's buffer fails with `EFAULT`, as a failed pin does; bits written
    /// for earlier windows stay.
    pub fn for_each(&mut self, mut f: impl FnMut(&mut Self, u64, u64) -> Result<(), Errno>) -> Result<(), Errno> {
        let total = self.total_bits();
        let range_last = self.iova + (self.length - 1);
        let mut first = 0u64;
        while first < total {
            let last = (first + self.window_bits - 1).min(total - 1);
            if last / 8 >= self.data.len() as u64 {
                return err(EFAULT, "bitmap buffer too short for the range");
            }
            self.win_first = first;
            self.win_last = last;
            let w_iova = self.iova + (first << self.pgshift);
            let w_last = (self.iova + (last << self.pgshift)).saturating_add((1 << self.pgshift) - 1);
            let w_last = w_last.min(range_last);
            if let Some((s, l)) = self.ahead.take() {
                // Sets what fits here and carries the rest again.
                self.set(s, l - s + 1);
            }
            f(self, w_iova, w_last - w_iova + 1)?;
            first = last + 1;
        }
        Ok(())
    }

    /// Marks the bits covering `[iova, iova + len)` inside the requested range: those up to
    /// the end of the current window now, the rest when the following windows are visited.
    ///
    /// Bits before the current window are set too, unlike in Linux, which has unpinned those
    /// pages: their bytes were checked when their window was visited, and a leaf that crosses
    /// into this window from an earlier one, dirtied after that window was walked and cleared
    /// whole by this walk, is then still reported whole.
    #[inline]
    pub fn set(&mut self, iova: u64, len: u64) {
        // The common case first: a record inside the range and the current window.
        if iova >= self.iova && len != 0 {
            let first = (iova - self.iova) >> self.pgshift;
            if let Some(last_iova) = iova.checked_add(len - 1) {
                let last = (last_iova - self.iova) >> self.pgshift;
                if last_iova - self.iova < self.length && first >= self.win_first && last <= self.win_last {
                    set_bits(self.data, first, last);
                    return;
                }
            }
        }
        let range_last = self.iova + (self.length - 1);
        if len == 0 || iova > range_last {
            return;
        }
        let last_iova = iova.saturating_add(len - 1).min(range_last);
        if last_iova < self.iova {
            return;
        }
        let first = (iova.max(self.iova) - self.iova) >> self.pgshift;
        let last = (last_iova - self.iova) >> self.pgshift;
        if last > self.win_last {
            let next = self.iova + ((self.win_last + 1) << self.pgshift);
            let s = iova.max(next);
            self.ahead = Some(match self.ahead {
                Some((a, b)) => (a.min(s), b.max(last_iova)),
                None => (s, last_iova),
            });
        }
        let last = last.min(self.win_last);
        if first <= last {
            set_bits(self.data, first, last);
        }
    }
}

impl RecordDirty for IovaBitmap<'_> {
    fn record(&mut self, iova: u64, len: u64) {
        self.set(iova, len);
    }

    fn record_leaf(&mut self, _iova: u64, _len: u64, leaf: u64, leaf_len: u64) {
        // A dirty leaf is dirty as a whole and a clearing walk resets all of it, so report
        // all of it that lies in the range, not only the part this window's walk covered.
        self.set(leaf, leaf_len);
    }
}

/// Sets bits `first..=last` of an LSB-first byte bitmap.
#[inline]
pub fn set_bits(data: &mut [u8], first: u64, last: u64) {
    let (fb, lb) = ((first / 8) as usize, (last / 8) as usize);
    let head = 0xffu8 << (first % 8);
    let tail = 0xffu8 >> (7 - last % 8);
    if fb == lb {
        data[fb] |= head & tail;
        return;
    }
    data[fb] |= head;
    data[fb + 1..lb].fill(0xff);
    data[lb] |= tail;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_lsb_first() {
        let mut d = [0u8; 4];
        set_bits(&mut d, 3, 3);
        assert_eq!(d, [0x08, 0, 0, 0]);
        set_bits(&mut d, 6, 17);
        assert_eq!(d, [0xc8, 0xff, 0x03, 0]);
        set_bits(&mut d, 31, 31);
        assert_eq!(d, [0xc8, 0xff, 0x03, 0x80]);
    }

    #[test]
    fn windows_and_clipping() {
        let mut d = vec![0u8; 3];
        let mut b = IovaBitmap::new(&mut d, 0x10000, 20 * 8192, 8192);
        let mut wins = Vec::new();
        b.for_each(|b, i, l| {
            wins.push((i, l));
            b.set(0x10000 + 8192 + 4096, 4096); // inside page 1
            b.set(0x10000 + 19 * 8192, 1 << 20); // past the end: only bit 19
            Ok(())
        })
        .unwrap();
        assert_eq!(wins, vec![(0x10000, 20 * 8192)]);
        assert_eq!(d, vec![0x02, 0x00, 0x08]);
        let mut short = vec![0u8; 2];
        let mut b = IovaBitmap::new(&mut short, 0, 20 * 4096, 4096);
        assert_eq!(b.for_each(|_, _, _| Ok(())).unwrap_err(), EFAULT);
    }

    use iommu::{AnonMemory, DirtyBitmap, Domain, DomainConfig, FormatKind, IotlbGather, Perm};
    use std::sync::Arc;

    const BASE: u64 = 0x4000_0000;
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    /// A tracking domain with two 2 MiB leaves at `BASE`.
    fn two_leaves(fmt: FormatKind) -> (Domain, iommu::Dma) {
        let mem = Arc::new(AnonMemory::new(4 * MIB as usize, false).unwrap());
        let dom = Domain::new(DomainConfig::new(fmt)).unwrap();
        // Two maps, so that AMD cannot use one 4 MiB leaf.
        dom.map(BASE, 2 * MIB, mem.clone(), 0, Perm::RW).unwrap();
        dom.map(BASE + 2 * MIB, 2 * MIB, mem, 2 * MIB, Perm::RW).unwrap();
        assert_eq!(dom.leaf_histogram().into_iter().collect::<Vec<_>>(), vec![(21, 2)]);
        // Arm leaves are born dirty: start clean, as iommufd's enable does.
        dom.read_and_clear_dirty(BASE, 4 * MIB, 0, &mut DirtyBitmap::default())
            .unwrap();
        dom.set_dirty_tracking(true).unwrap();
        let dma = dom.attach(1);
        (dom, dma)
    }

    /// The part of a walk's report a recorder that ignores leaf extents keeps: what this
    /// bitmap did before it carried leaves across windows.
    struct ClippedOnly<'x, 'y>(&'x mut IovaBitmap<'y>);

    impl RecordDirty for ClippedOnly<'_, '_> {
        fn record(&mut self, iova: u64, len: u64) {
            self.0.set(iova, len);
        }
    }

    /// One clearing GET_DIRTY_BITMAP over `[iova, iova + len)`, windows of `window_bytes`, as
    /// `hwpt_get_dirty_bitmap` runs it; `clipped_only` reproduces the old behaviour.
    fn harvest(dom: &Domain, iova: u64, len: u64, ps: u64, window_bytes: u64, clipped_only: bool) -> Vec<u64> {
        let mut data = vec![0u8; (len / ps).div_ceil(8) as usize];
        let mut gather = IotlbGather::new();
        IovaBitmap::with_window(&mut data, iova, len, ps, window_bytes)
            .for_each(|bm, w_iova, w_len| {
                let mut old;
                let rec: &mut dyn RecordDirty = if clipped_only {
                    old = ClippedOnly(bm);
                    &mut old
                } else {
                    bm
                };
                let mut out = DirtyBitmap {
                    bitmap: Some(rec),
                    gather: Some(&mut gather),
                };
                dom.read_and_clear_dirty(w_iova, w_len, 0, &mut out).unwrap();
                Ok(())
            })
            .unwrap();
        dom.iotlb_sync(&gather);
        (0..data.len() as u64 * 8)
            .filter(|n| data[(n / 8) as usize] >> (n % 8) & 1 != 0)
            .collect()
    }

    #[test]
    fn leaf_across_windows_is_reported_whole_within_the_range() {
        // The range starts 64 KiB into the first leaf and ends 64 KiB before the second one
        // ends, so both leaves also stick out of the range, where nothing may be reported.
        let (iova, len) = (BASE + 64 * KIB, 4 * MIB - 128 * KIB);
        for fmt in FormatKind::ALL {
            for (ps, window_bytes) in [(4096, 8), (4096, 3), (8192, 4), (64 * KIB, 1)] {
                let wbits = window_bytes * 8;
                let nbits = len / ps;
                // (written IOVA, first bit of its leaf in range, last bit of its leaf in range)
                let cases = [
                    (BASE + 0x5123, 0, (2 * MIB - 64 * KIB) / ps - 1),
                    (BASE + 3 * MIB + 0x7000, (2 * MIB - 64 * KIB) / ps, nbits - 1),
                ];
                for (at, first, last) in cases {
                    let ctx = format!("{fmt}, page {ps}, window {window_bytes} B, write at {at:#x}");
                    assert!(last / wbits > first / wbits, "{ctx}: the leaf must cross a window");
                    let (dom, dma) = two_leaves(fmt);
                    dma.write(at, &[1]).unwrap();
                    let want: Vec<u64> = (first..=last).collect();
                    assert_eq!(harvest(&dom, iova, len, ps, window_bytes, false), want, "{ctx}");
                    assert_eq!(
                        harvest(&dom, iova, len, ps, window_bytes, false),
                        Vec::<u64>::new(),
                        "{ctx}: cleared"
                    );

                    // Sabotage: the old behaviour keeps only the first window's part and loses
                    // the rest for good, which the assertions above would catch.
                    dma.write(at, &[2]).unwrap();
                    let clipped: Vec<u64> = (first..=last.min((first / wbits + 1) * wbits - 1)).collect();
                    assert_eq!(harvest(&dom, iova, len, ps, window_bytes, true), clipped, "{ctx}: old");
                    assert_ne!(clipped, want, "{ctx}");
                    assert_eq!(
                        harvest(&dom, iova, len, ps, window_bytes, false),
                        Vec::<u64>::new(),
                        "{ctx}: lost"
                    );
                }
            }
        }
    }

    #[test]
    fn leaf_reaching_back_into_an_earlier_window() {
        // 4 KiB pages, one byte (8 pages) per window. In the third window a walk reports a leaf
        // that began in the first: the earlier windows' bits are set too.
        let mut d = vec![0u8; 4];
        let mut b = IovaBitmap::with_window(&mut d, 0x10_0000, 32 * 4096, 4096, 1);
        let mut wins = Vec::new();
        b.for_each(|b, i, l| {
            wins.push((i, l));
            if i == 0x10_0000 + 16 * 4096 {
                b.record_leaf(i, 4 * 4096, 0x10_0000 + 4 * 4096, 16 * 4096);
            }
            Ok(())
        })
        .unwrap();
        let w = 8 * 4096;
        assert_eq!(
            wins,
            vec![
                (0x10_0000, w),
                (0x10_0000 + w, w),
                (0x10_0000 + 2 * w, w),
                (0x10_0000 + 3 * w, w)
            ]
        );
        assert_eq!(d, vec![0xf0, 0xff, 0x0f, 0x00]);
    }
}
