//! `LIVEMIG_IOAS_UNMAP_DIRTY`: an IOAS unmap that hands back the dirty bits of what it
//! removes (`docs/viommu.md#unmap-with-dirty`). Linux has no such ioctl: it was proposed in
//! the 2022 iommufd dirty-tracking RFC (`IOMMU_IOAS_UNMAP_DIRTY`) and not merged; VFIO type1
//! has the same idea as `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`. A VMM whose guest unmaps a
//! DMA buffer during migration needs it: reading the bitmap first and unmapping after leaves
//! a window in which the device's writes are lost.

use super::{areas_to_unmap, unmap_areas, IommuFd};
use crate::bitmap::set_bits;
use crate::errno::{err, Errno};
use crate::uapi::*;
use iommu::errno::*;

impl IommuFd {
    /// Unmaps whole areas in the range from every HWPT of the IOAS and sets, in `cmd.data`,
    /// the bit of every page a dirty-tracking HWPT held dirty there, without ever clearing a
    /// bit. Checks: flags and reserved (`EOPNOTSUPP`), the IOAS (`ENOENT`), the range as
    /// `IOMMU_IOAS_UNMAP` checks it except that "everything" is refused (`EINVAL`: no bitmap
    /// covers it), `page_size` a power of two the range is aligned to (`EINVAL`), a bitmap
    /// long enough for the range (`EFAULT`). HWPTs with tracking disabled just unmap.
    pub fn ioas_unmap_dirty(&self, cmd: &mut IoasUnmapDirty<'_>) -> Result<(), Errno> {
        if cmd.flags != 0 || cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "unknown flags or reserved field set");
        }
        let mut st = self.lock();
        let ioas = st.ioas(cmd.ioas_id)?;
        if cmd.iova == 0 && cmd.length == u64::MAX {
            return err(EINVAL, "no bitmap covers the whole IOVA space");
        }
        let hit = areas_to_unmap(ioas, cmd.iova, cmd.length, false)?;
        let ps = cmd.page_size;
        if ps == 0 || !ps.is_power_of_two() {
            return err(EINVAL, "page_size is not a power of two");
        }
        if cmd.iova & (ps - 1) != 0 || cmd.length & (ps - 1) != 0 {
            return err(EINVAL, "range not aligned to page_size");
        }
        if (cmd.data.len() as u64) < (cmd.length / ps).div_ceil(8) {
            return err(EFAULT, "bitmap shorter than the range");
        }
        let (base, data) = (cmd.iova, &mut *cmd.data);
        cmd.length = unmap_areas(&mut st, cmd.ioas_id, &hit, |d, tracking, k, len| {
            if tracking {
                d.unmap_read_dirty(k, len, &mut |a, l| {
                    set_bits(data, (a - base) / ps, (a + l - 1 - base) / ps);
                })
            } else {
                d.unmap(k, len)
            }
            .map(|_| ())
        })?;
        Ok(())
    }
}
