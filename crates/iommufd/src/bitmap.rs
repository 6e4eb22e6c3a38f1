//! Linux's `iova_bitmap` (drivers/iommu/iommufd/iova_bitmap.c) over a caller-owned buffer.
//!
//! The buffer is handled as bytes, LSB first: bit `n` is `data[n / 8] >> (n % 8)` and stands
//! for `iova + n * page_size`. It is visited in windows of at most [`WINDOW_BYTES`] (what
//! Linux pins at once: 512 pages of bitmap, 16 Mi bits, 64 GiB of IOVA at 4 KiB), and bits are
//! set straight into the caller's bytes: there is no intermediate bitmap. Bits are only set.

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
    /// Bit range of the current window, inclusive.
    win_first: u64,
    win_last: u64,
}

impl<'a> IovaBitmap<'a> {
    /// `page_size` must be a power of two; the range is already validated.
    pub fn new(data: &'a mut [u8], iova: u64, length: u64, page_size: u64) -> Self {
        Self {
            data,
            iova,
            length,
            pgshift: page_size.trailing_zeros(),
            win_first: 0,
            win_last: 0,
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
        let per_window = WINDOW_BYTES * 8;
        let mut first = 0u64;
        while first < total {
            let last = (first + per_window - 1).min(total - 1);
            if last / 8 >= self.data.len() as u64 {
                return err(EFAULT, "bitmap buffer too short for the range");
            }
            self.win_first = first;
            self.win_last = last;
            let w_iova = self.iova + (first << self.pgshift);
            let w_end = (self.iova + ((last + 1) << self.pgshift)).min(self.iova + self.length);
            f(self, w_iova, w_end - w_iova)?;
            first = last + 1;
        }
        Ok(())
    }

    /// Marks the bits covering `[iova, iova + len)` in the current window.
    pub fn set(&mut self, iova: u64, len: u64) {
        if len == 0 || iova + len <= self.iova {
            return;
        }
        let first = ((iova.max(self.iova) - self.iova) >> self.pgshift).max(self.win_first);
        let last = ((iova + len - 1 - self.iova) >> self.pgshift).min(self.win_last);
        if first > last {
            return;
        }
        set_bits(self.data, first, last);
    }
}

impl RecordDirty for IovaBitmap<'_> {
    fn record(&mut self, iova: u64, len: u64) {
        self.set(iova, len);
    }
}

/// Sets bits `first..=last` of an LSB-first byte bitmap.
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
}
