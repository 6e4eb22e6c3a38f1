//! Device-side DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`, `docs/vfio.md#dma-logging`):
//! the core's validation of START, and [`DmaLog`], a ready-made log a device model updates on
//! each DMA write and the VMM reads and clears through REPORT.

use crate::device::DmaLogging;
use iommu::errno::*;
use iommu::Errno;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// `struct vfio_device_feature_dma_logging_range`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRange {
    pub iova: u64,
    pub length: u64,
}

/// `LOG_MAX_RANGES`: `PAGE_SIZE / sizeof(struct vfio_device_feature_dma_logging_range)`.
pub const LOG_MAX_RANGES: usize = 4096 / 16;

/// The core's checks of DMA_LOGGING_START, range by range in the caller's order, as Linux's
/// loop makes them: alignment (`EINVAL`), overflow (`EOVERFLOW`), overlap with an earlier
/// range (`EINVAL`). Zero ranges is `EINVAL`, more than 256 `E2BIG`.
pub fn validate_ranges(ranges: &[LogRange], page_size: u64) -> Result<(), Errno> {
    if ranges.is_empty() {
        return err(EINVAL, "no ranges");
    }
    if ranges.len() > LOG_MAX_RANGES {
        return err(E2BIG, "more than 256 ranges");
    }
    if page_size == 0 || !page_size.is_power_of_two() {
        return err(EINVAL, "page_size is not a power of two");
    }
    let mut seen: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.iova % page_size != 0 || r.length % page_size != 0 || r.length == 0 {
            return err(EINVAL, "range not aligned to page_size");
        }
        let Some(end) = r.iova.checked_add(r.length) else {
            return err(EOVERFLOW, "range wraps");
        };
        let last = end - 1;
        if seen.iter().any(|&(s, l)| r.iova <= l && s <= last) {
            return err(EINVAL, "overlapping ranges");
        }
        seen.push((r.iova, last));
    }
    Ok(())
}

struct Logged {
    range: LogRange,
    bits: Vec<AtomicU64>,
}

struct LogState {
    page_shift: u32,
    ranges: Vec<Logged>,
}

/// A device's DMA write log: one bit per logged page. Cheap to update from device threads
/// (a read lock and an atomic OR per page).
#[derive(Default)]
pub struct DmaLog {
    state: RwLock<Option<LogState>>,
    min_page_size: u64,
}

impl DmaLog {
    /// A log that tracks at least at `min_page_size` granularity (the device raises smaller
    /// requests to it).
    pub fn new(min_page_size: u64) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(None),
            min_page_size: min_page_size.max(4096),
        })
    }

    pub fn active(&self) -> bool {
        self.state.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Records a device write of `[iova, iova + len)`.
    #[inline]
    pub fn record(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(st) = g.as_ref() else { return };
        let last = iova.saturating_add(len - 1);
        for l in &st.ranges {
            let (s, e) = (l.range.iova, l.range.iova + l.range.length - 1);
            if last < s || iova > e {
                continue;
            }
            let first = (iova.max(s) - s) >> st.page_shift;
            let lastp = (last.min(e) - s) >> st.page_shift;
            for p in first..=lastp {
                l.bits[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
    }
}

impl DmaLogging for Arc<DmaLog> {
    fn log_start(&mut self, ranges: &[LogRange], page_size: &mut u64) -> Result<(), Errno> {
        let mut g = self.state.write().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return err(EINVAL, "logging already started");
        }
        let ps = (*page_size).max(self.min_page_size);
        if ranges.iter().any(|r| r.iova % ps != 0 || r.length % ps != 0) {
            return err(EINVAL, "ranges not aligned to the device's page size");
        }
        *page_size = ps;
        let shift = ps.trailing_zeros();
        *g = Some(LogState {
            page_shift: shift,
            ranges: ranges
                .iter()
                .map(|r| Logged {
                    range: *r,
                    bits: (0..(r.length >> shift).div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect(),
                })
                .collect(),
        });
        Ok(())
    }

    fn log_stop(&mut self) -> Result<(), Errno> {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    fn log_read_and_clear(&mut self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u8]) -> Result<(), Errno> {
        let g = self.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(st) = g.as_ref() else {
            return err(EINVAL, "DMA logging is not started");
        };
        let shift = page_size.trailing_zeros();
        if (bitmap.len() as u64) < (((length - 1) >> shift) + 1).div_ceil(8) {
            return err(EINVAL, "bitmap too small for the range");
        }
        let qlast = iova + (length - 1);
        let lps = 1u64 << st.page_shift;
        for l in &st.ranges {
            let (s, e) = (l.range.iova, l.range.iova + l.range.length - 1);
            if qlast < s || iova > e {
                continue;
            }
            let first = (iova.max(s) - s) >> st.page_shift;
            let last = (qlast.min(e) - s) >> st.page_shift;
            // A logged page that sticks out of the queried range is reported but not cleared:
            // its one bit stands for the whole page, so clearing it would also forget a write
            // to the part outside, which the REPORT covering that part must still see. Seeing
            // the inside part again in a later REPORT is harmless; losing a write is not.
            let keep = [
                (s + (first << st.page_shift) < iova).then_some(first),
                (s + (last << st.page_shift) + (lps - 1) > qlast).then_some(last),
            ];
            let mut p = first;
            while p <= last {
                let w = (p / 64) as usize;
                let lo = p % 64;
                let hi = (last - (p - lo)).min(63);
                let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
                let kept = keep
                    .iter()
                    .flatten()
                    .filter(|&&k| k / 64 == w as u64)
                    .fold(0u64, |m, &k| m | 1 << (k % 64));
                let mut got = l.bits[w].fetch_and(!(mask & !kept), Ordering::Relaxed) & mask;
                while got != 0 {
                    let b = got.trailing_zeros() as u64;
                    got &= got - 1;
                    // Each logged page sets every report bit it overlaps.
                    let a = s + ((p - lo + b) << st.page_shift);
                    let from = (a.max(iova) - iova) >> shift;
                    let to = ((a + lps - 1).min(qlast) - iova) >> shift;
                    for bit in from..=to {
                        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
                    }
                }
                p = p - lo + hi + 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(iova: u64, length: u64) -> LogRange {
        LogRange { iova, length }
    }

    #[test]
    fn start_checks_in_linux_order() {
        assert_eq!(validate_ranges(&[], 4096).unwrap_err(), EINVAL);
        assert_eq!(validate_ranges(&vec![r(0, 4096); 257], 4096).unwrap_err(), E2BIG);
        assert_eq!(validate_ranges(&[r(0x800, 4096)], 4096).unwrap_err(), EINVAL);
        assert_eq!(validate_ranges(&[r(0, 0x1800)], 4096).unwrap_err(), EINVAL);
        assert_eq!(
            validate_ranges(&[r(u64::MAX - 4095, 8192)], 4096).unwrap_err(),
            EOVERFLOW
        );
        assert_eq!(
            validate_ranges(&[r(0, 0x2000), r(0x1000, 0x1000)], 4096).unwrap_err(),
            EINVAL
        );
        // The first bad range decides: an overflow before an unaligned one.
        assert_eq!(
            validate_ranges(&[r(u64::MAX - 4095, 8192), r(0x800, 4096)], 4096).unwrap_err(),
            EOVERFLOW
        );
        validate_ranges(&[r(0, 4096), r(8192, 4096)], 4096).unwrap();
    }

    #[test]
    fn record_report_clear() {
        let mut log = DmaLog::new(4096);
        let mut ps = 4096;
        log.log_start(&[r(0x10_0000, 0x10_0000), r(0x100_0000, 0x1_0000)], &mut ps)
            .unwrap();
        log.record(0x10_2000, 1);
        log.record(0x10_3ff0, 0x20); // crosses into the next page
        log.record(0x100_0000, 4096);
        log.record(0x900_0000, 4096); // outside every range: ignored
        let mut bm = [0u8; 32];
        log.log_read_and_clear(0x10_0000, 0x10_0000, 4096, &mut bm).unwrap();
        assert_eq!(&bm[..2], &[0x1c, 0]);
        // The other range's bit was not cleared by a report that did not cover it.
        let mut bm2 = [0u8; 4];
        log.log_read_and_clear(0x100_0000, 0x1_0000, 4096, &mut bm2).unwrap();
        assert_eq!(bm2, [1, 0, 0, 0]);
        let mut bm3 = [0u8; 32];
        log.log_read_and_clear(0x10_0000, 0x10_0000, 4096, &mut bm3).unwrap();
        assert_eq!(bm3, [0; 32], "read and cleared");
        // Coarser report granularity ORs pages.
        log.record(0x10_5000, 1);
        let mut bm4 = [0u8; 1];
        log.log_read_and_clear(0x10_0000, 0x10_0000, 1 << 17, &mut bm4).unwrap();
        assert_eq!(bm4, [1]);
        log.log_stop().unwrap();
        assert_eq!(log.log_read_and_clear(0, 4096, 4096, &mut bm4).unwrap_err(), EINVAL);
    }

    #[test]
    fn logged_page_across_the_report_edge_is_kept() {
        // The device logs 64 KiB pages; the VMM reports 4 KiB bits over ranges whose edges fall
        // inside logged pages. Before the fix, the first REPORT cleared logged page 1 whole
        // while showing only its first half, and the second REPORT came back empty.
        let mut log = DmaLog::new(64 << 10);
        let mut ps = 4096;
        log.log_start(&[r(0, 1 << 20)], &mut ps).unwrap();
        assert_eq!(ps, 64 << 10);
        log.record(0x1_c000, 8); // logged page 1: [0x1_0000, 0x2_0000)
        log.record(0x8, 8); // logged page 0, wholly inside the first report
        let mut a = [0u8; 5];
        log.log_read_and_clear(0, 0x1_8000, 4096, &mut a).unwrap();
        assert_eq!(
            a,
            [0xff, 0xff, 0xff, 0, 0],
            "page 0: bits 0..=15; page 1's inside half: 16..=23"
        );
        let mut b = [0u8; 2];
        log.log_read_and_clear(0x1_8000, 0x8000, 4096, &mut b).unwrap();
        assert_eq!(b, [0xff, 0], "bits 0..=7: its other half, still logged");
        // A report covering the page whole clears it.
        let mut c = [0u8; 32];
        log.log_read_and_clear(0, 1 << 20, 65536, &mut c[..2]).unwrap();
        assert_eq!(
            c[..2],
            [0x02, 0],
            "page 1 whole (page 0 was cleared by the first report)"
        );
        log.log_read_and_clear(0, 1 << 20, 65536, &mut c[2..4]).unwrap();
        assert_eq!(c[2..4], [0, 0], "nothing left");
        // Both edges in one logged page: reported, kept.
        log.record(0x3_0000, 1);
        let mut d = [0u8; 1];
        log.log_read_and_clear(0x3_4000, 0x8000, 4096, &mut d).unwrap();
        assert_eq!(d, [0xff]);
        let mut e = [0u8; 2];
        log.log_read_and_clear(0x3_0000, 0x1_0000, 4096, &mut e).unwrap();
        assert_eq!(e, [0xff, 0xff]);
        let mut f = [0u8; 2];
        log.log_read_and_clear(0x3_0000, 0x1_0000, 4096, &mut f).unwrap();
        assert_eq!(f, [0, 0]);
    }
}
