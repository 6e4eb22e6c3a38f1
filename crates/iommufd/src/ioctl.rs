//! The raw ioctl ABI (`docs/iommufd.md#raw-ioctl-abi`): `ioctl(cmd, arg)` with `arg` the bytes
//! of the uAPI struct, `size` first. Unknown commands fail with `ENOTTY`; a `size` below the
//! struct's minimum with `EINVAL`; a larger `size` whose extra bytes are not all zero with
//! `E2BIG` (zero extra bytes are accepted as if absent). Outputs are written back into `arg`.
//!
//! Pointer fields (`allowed_iovas`, `data_uptr`, `data`) are user addresses resolved through
//! the registered user memory (`EFAULT` if unbacked). This path copies the pointed-to data in
//! and out; the typed methods of [`IommuFd`] are the copy-free path.

use crate::errno::{err, Errno};
use crate::uapi::*;
use crate::IommuFd;
use iommu::errno::*;
use iommu::mem::{host_read, host_write};

/// (command, struct size, minimum size)
const TABLE: [(u32, usize, usize); 13] = [
    (IOMMU_DESTROY, 8, 8),
    (IOMMU_IOAS_ALLOC, 12, 12),
    (IOMMU_IOAS_ALLOW_IOVAS, 24, 24),
    (IOMMU_IOAS_IOVA_RANGES, 32, 32),
    (IOMMU_IOAS_MAP, 40, 40),
    (IOMMU_IOAS_UNMAP, 24, 24),
    (IOMMU_OPTION, 24, 24),
    (IOMMU_HWPT_ALLOC, 48, 24),
    (IOMMU_GET_HW_INFO, 40, 32),
    (IOMMU_HWPT_SET_DIRTY_TRACKING, 16, 16),
    (IOMMU_HWPT_GET_DIRTY_BITMAP, 48, 48),
    (IOMMU_HWPT_INVALIDATE, 32, 32),
    (LIVEMIG_IOAS_UNMAP_DIRTY, 48, 48),
];

/// A struct image: reads past the caller's `size` are zero, as the kernel zero-fills.
struct Arg {
    b: Vec<u8>,
}

impl Arg {
    fn u16(&self, o: usize) -> u16 {
        u16::from_le_bytes(self.b[o..o + 2].try_into().expect("in bounds"))
    }
    fn u32(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.b[o..o + 4].try_into().expect("in bounds"))
    }
    fn u64(&self, o: usize) -> u64 {
        u64::from_le_bytes(self.b[o..o + 8].try_into().expect("in bounds"))
    }
    fn set_u16(&mut self, o: usize, v: u16) {
        self.b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u32(&mut self, o: usize, v: u32) {
        self.b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn set_u64(&mut self, o: usize, v: u64) {
        self.b[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
}

impl IommuFd {
    /// The ioctl entry point over raw argument bytes.
    pub fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<(), Errno> {
        let Some(&(_, full, min)) = TABLE.iter().find(|t| t.0 == cmd) else {
            return err(ENOTTY, "unknown ioctl");
        };
        if arg.len() < 4 {
            return err(EFAULT, "argument shorter than its size field");
        }
        let size = u32::from_le_bytes(arg[..4].try_into().expect("4 bytes")) as usize;
        if size < min {
            return err(EINVAL, "size below the struct's minimum");
        }
        if arg.len() < size {
            return err(EFAULT, "argument shorter than its size");
        }
        if size > full && arg[full..size].iter().any(|&b| b != 0) {
            return err(E2BIG, "non-zero bytes past the known struct");
        }
        let mut a = Arg { b: vec![0u8; full] };
        let n = size.min(full);
        a.b[..n].copy_from_slice(&arg[..n]);
        let r = self.dispatch(cmd, &mut a);
        // HWPT_INVALIDATE reports how many entries it handled even when one failed.
        if r.is_ok() || cmd == IOMMU_HWPT_INVALIDATE {
            arg[..n].copy_from_slice(&a.b[..n]);
        }
        r?;
        Ok(())
    }

    pub(crate) fn read_user(&self, va: u64, len: usize) -> Result<Vec<u8>, Errno> {
        // copy_from_user of nothing succeeds whatever the pointer.
        if len == 0 {
            return Ok(Vec::new());
        }
        // Resolve before allocating: the length comes from the caller, and a bogus one (a
        // count of 2^32 ranges, a bitmap for 2^64 bytes) must cost an EFAULT, not the heap.
        let Some((mem, off)) = self.user_memory().resolve(va, len as u64) else {
            return err(EFAULT, "bad user pointer");
        };
        let mut v = vec![0u8; len];
        if host_read(mem.as_ref(), off, &mut v) {
            Ok(v)
        } else {
            err(EFAULT, "bad user pointer")
        }
    }

    /// The caller's bitmap for `length` bytes of IOVA at `page_size` a bit, or nothing if the
    /// range is not sane or the pointer unbacked: the copy is sized from the range only once
    /// the range is known to be sane, and the typed call makes every check in Linux's order
    /// (a short or missing buffer is its `EFAULT`).
    fn read_bitmap(&self, ptr: u64, length: u64, page_size: u64) -> Vec<u8> {
        if !page_size.is_power_of_two() || length == 0 || length == u64::MAX {
            return Vec::new();
        }
        let bytes = (((length - 1) / page_size) + 1).div_ceil(8) as usize;
        self.read_user(ptr, bytes).unwrap_or_default()
    }

    pub(crate) fn write_user(&self, va: u64, data: &[u8]) -> Result<(), Errno> {
        // copy_to_user of nothing succeeds whatever the pointer.
        if data.is_empty() {
            return Ok(());
        }
        match self.user_memory().resolve(va, data.len() as u64) {
            Some((mem, off)) if host_write(mem.as_ref(), off, data) => Ok(()),
            _ => err(EFAULT, "bad user pointer"),
        }
    }

    fn dispatch(&self, cmd: u32, a: &mut Arg) -> Result<(), Errno> {
        match cmd {
            IOMMU_DESTROY => self.destroy(a.u32(4)),
            IOMMU_IOAS_ALLOC => {
                let mut c = IoasAlloc {
                    flags: a.u32(4),
                    out_ioas_id: 0,
                };
                self.ioas_alloc(&mut c)?;
                a.set_u32(8, c.out_ioas_id);
                Ok(())
            }
            IOMMU_IOAS_ALLOW_IOVAS => {
                let n = a.u32(8) as usize;
                let raw = self.read_user(
                    a.u64(16),
                    n.checked_mul(16).ok_or(Errno::new(EINVAL, "too many ranges"))?,
                )?;
                let ranges: Vec<IovaRange> = raw
                    .chunks_exact(16)
                    .map(|c| IovaRange {
                        start: u64::from_le_bytes(c[..8].try_into().expect("8")),
                        last: u64::from_le_bytes(c[8..].try_into().expect("8")),
                    })
                    .collect();
                self.ioas_allow_iovas(&IoasAllowIovas {
                    ioas_id: a.u32(4),
                    __reserved: a.u32(12),
                    allowed_iovas: &ranges,
                })
            }
            IOMMU_IOAS_IOVA_RANGES => {
                let cap = a.u32(8) as usize;
                let mut out = vec![IovaRange::default(); cap.min(1 << 16)];
                let mut c = IoasIovaRanges {
                    ioas_id: a.u32(4),
                    num_iovas: cap as u32,
                    __reserved: a.u32(12),
                    allowed_iovas: &mut out,
                    out_iova_alignment: 0,
                };
                let r = self.ioas_iova_ranges(&mut c);
                let (total, align) = (c.num_iovas, c.out_iova_alignment);
                if r.is_ok() || r.is_err_and(|e| e == EMSGSIZE) {
                    let bytes: Vec<u8> = out
                        .iter()
                        .take(total.min(cap as u32) as usize)
                        .flat_map(|r| r.start.to_le_bytes().into_iter().chain(r.last.to_le_bytes()))
                        .collect();
                    self.write_user(a.u64(16), &bytes)?;
                    a.set_u32(8, total);
                    a.set_u64(24, align);
                }
                r
            }
            IOMMU_IOAS_MAP => {
                let mut c = IoasMap {
                    flags: a.u32(4),
                    ioas_id: a.u32(8),
                    __reserved: a.u32(12),
                    user_va: a.u64(16),
                    length: a.u64(24),
                    iova: a.u64(32),
                };
                self.ioas_map(&mut c)?;
                a.set_u64(32, c.iova);
                Ok(())
            }
            IOMMU_IOAS_UNMAP => {
                let mut c = IoasUnmap {
                    ioas_id: a.u32(4),
                    iova: a.u64(8),
                    length: a.u64(16),
                };
                self.ioas_unmap(&mut c)?;
                a.set_u64(16, c.length);
                Ok(())
            }
            IOMMU_OPTION => {
                let mut c = IommuOption {
                    option_id: a.u32(4),
                    op: a.u16(8),
                    __reserved: a.u16(10),
                    object_id: a.u32(12),
                    val64: a.u64(16),
                };
                self.option(&mut c)?;
                a.set_u16(8, c.op);
                a.set_u64(16, c.val64);
                Ok(())
            }
            IOMMU_HWPT_ALLOC => {
                let mut c = HwptAlloc {
                    flags: a.u32(4),
                    dev_id: a.u32(8),
                    pt_id: a.u32(12),
                    out_hwpt_id: 0,
                    __reserved: a.u32(20),
                    data_type: a.u32(24),
                    data_len: a.u32(28),
                    data_uptr: a.u64(32),
                    fault_id: a.u32(40),
                };
                if a.u32(44) != 0 {
                    return err(EOPNOTSUPP, "__reserved2 set");
                }
                self.hwpt_alloc(&mut c)?;
                a.set_u32(16, c.out_hwpt_id);
                Ok(())
            }
            IOMMU_GET_HW_INFO => {
                let len = a.u32(12) as usize;
                let mut data = vec![0u8; len.min(4096)];
                let mut c = HwInfo {
                    flags: a.u32(4),
                    dev_id: a.u32(8),
                    data_len: len as u32,
                    data: &mut data,
                    out_data_type: 0,
                    __reserved: a.u32(28),
                    out_capabilities: 0,
                };
                self.get_hw_info(&mut c)?;
                let (dl, ty, caps) = (c.data_len, c.out_data_type, c.out_capabilities);
                if len > 0 {
                    self.write_user(a.u64(16), &data[..len.min(data.len())])?;
                }
                a.set_u32(12, dl);
                a.set_u32(24, ty);
                a.set_u64(32, caps);
                Ok(())
            }
            IOMMU_HWPT_SET_DIRTY_TRACKING => self.hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
                flags: a.u32(4),
                hwpt_id: a.u32(8),
                __reserved: a.u32(12),
            }),
            IOMMU_HWPT_GET_DIRTY_BITMAP => {
                let (iova, length, page_size, ptr) = (a.u64(16), a.u64(24), a.u64(32), a.u64(40));
                let mut data = self.read_bitmap(ptr, length, page_size);
                let mut c = HwptGetDirtyBitmap {
                    hwpt_id: a.u32(4),
                    flags: a.u32(8),
                    __reserved: a.u32(12),
                    iova,
                    length,
                    page_size,
                    data: &mut data,
                };
                let r = self.hwpt_get_dirty_bitmap(&mut c);
                if !data.is_empty() {
                    self.write_user(ptr, &data)?;
                }
                r
            }
            IOMMU_HWPT_INVALIDATE => {
                let (uptr, entry_len, entry_num) = (a.u64(8), a.u32(20), a.u32(24));
                // Entries are copied one by one, as Linux does: the array ends at the first one
                // the pointer does not back, and the typed call fails there (EFAULT) after
                // handling the ones before.
                let mut data = Vec::new();
                if uptr != 0 && entry_len != 0 {
                    for i in 0..entry_num as u64 {
                        let at = uptr.checked_add(i * entry_len as u64);
                        match at.map(|at| self.read_user(at, entry_len as usize)) {
                            Some(Ok(e)) => data.extend_from_slice(&e),
                            _ => break,
                        }
                    }
                }
                let mut c = HwptInvalidate {
                    hwpt_id: a.u32(4),
                    data_type: a.u32(16),
                    // A null array is refused where Linux refuses it (EINVAL, before the lookup).
                    entry_len: if uptr == 0 { 0 } else { entry_len },
                    entry_num,
                    __reserved: a.u32(28),
                    data: &data,
                };
                let r = self.hwpt_invalidate(&mut c);
                a.set_u32(24, c.entry_num);
                r
            }
            LIVEMIG_IOAS_UNMAP_DIRTY => {
                let (iova, length, page_size, ptr) = (a.u64(16), a.u64(24), a.u64(32), a.u64(40));
                let mut data = self.read_bitmap(ptr, length, page_size);
                let mut c = IoasUnmapDirty {
                    ioas_id: a.u32(4),
                    flags: a.u32(8),
                    __reserved: a.u32(12),
                    iova,
                    length,
                    page_size,
                    data: &mut data,
                };
                let r = self.ioas_unmap_dirty(&mut c);
                let unmapped = c.length;
                if r.is_ok() {
                    self.write_user(ptr, &data)?;
                    a.set_u64(24, unmapped);
                }
                r
            }
            _ => err(ENOTTY, "unknown ioctl"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceSpec;
    use iommu::{AnonMemory, FormatKind};
    use std::sync::Arc;

    fn hdr(size: u32, body: &[u8]) -> Vec<u8> {
        let mut v = size.to_le_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn size_rules() {
        let fd = IommuFd::new();
        let mut a = hdr(12, &[0; 8]);
        assert_eq!(fd.ioctl(iommufd_cmd(0x83), &mut a).unwrap_err(), ENOTTY);
        assert_eq!(fd.ioctl(iommufd_cmd(0x99), &mut a).unwrap_err(), ENOTTY);
        let mut short = hdr(8, &[0; 8]);
        assert_eq!(fd.ioctl(IOMMU_IOAS_ALLOC, &mut short).unwrap_err(), EINVAL);
        let mut big = hdr(16, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(fd.ioctl(IOMMU_IOAS_ALLOC, &mut big).unwrap_err(), E2BIG);
        let mut big_zero = hdr(16, &[0; 12]);
        fd.ioctl(IOMMU_IOAS_ALLOC, &mut big_zero).unwrap();
        assert_eq!(
            u32::from_le_bytes(big_zero[8..12].try_into().unwrap()),
            1,
            "out_ioas_id written back"
        );
        // HWPT_ALLOC accepts the 6.7 size (40), the minimum (24) and the current one (48).
        let dev = fd.bind_device(DeviceSpec::new("d", FormatKind::VtdSs));
        for size in [24u32, 40, 48] {
            let mut h = vec![0u8; size as usize];
            h[..4].copy_from_slice(&size.to_le_bytes());
            h[8..12].copy_from_slice(&dev.to_le_bytes());
            h[12..16].copy_from_slice(&1u32.to_le_bytes());
            fd.ioctl(IOMMU_HWPT_ALLOC, &mut h).unwrap();
            assert_ne!(u32::from_le_bytes(h[16..20].try_into().unwrap()), 0);
        }
        let mut h = hdr(20, &[0; 16]);
        assert_eq!(
            fd.ioctl(IOMMU_HWPT_ALLOC, &mut h).unwrap_err(),
            EINVAL,
            "below offsetofend(__reserved)"
        );
    }

    #[test]
    fn raw_map_and_bitmap_through_user_pointers() {
        let fd = IommuFd::new();
        let mem = Arc::new(AnonMemory::new(1 << 20, false).unwrap());
        let va = fd.register_user_memory(mem.clone());
        let mut a = hdr(12, &[0; 8]);
        fd.ioctl(IOMMU_IOAS_ALLOC, &mut a).unwrap();
        let ioas = u32::from_le_bytes(a[8..12].try_into().unwrap());
        let dev = fd.bind_device(DeviceSpec::new("d", FormatKind::VtdSs));
        let mut m = Arg { b: vec![0u8; 40] };
        m.set_u32(0, 40);
        m.set_u32(
            4,
            IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        );
        m.set_u32(8, ioas);
        m.set_u64(16, va);
        m.set_u64(24, 16 * 4096);
        m.set_u64(32, 0x10_0000);
        fd.ioctl(IOMMU_IOAS_MAP, &mut m.b).unwrap();
        let mut h = Arg { b: vec![0u8; 48] };
        h.set_u32(0, 48);
        h.set_u32(4, IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
        h.set_u32(8, dev);
        h.set_u32(12, ioas);
        fd.ioctl(IOMMU_HWPT_ALLOC, &mut h.b).unwrap();
        let hwpt = h.u32(16);
        fd.attach(dev, hwpt).unwrap();
        let mut t = Arg { b: vec![0u8; 16] };
        t.set_u32(0, 16);
        t.set_u32(4, 1);
        t.set_u32(8, hwpt);
        fd.ioctl(IOMMU_HWPT_SET_DIRTY_TRACKING, &mut t.b).unwrap();
        fd.device_dma(dev).unwrap().write(0x10_3000, &[1]).unwrap();
        // The bitmap lives in user memory at va + 64 KiB.
        let mut g = Arg { b: vec![0u8; 48] };
        g.set_u32(0, 48);
        g.set_u32(4, hwpt);
        g.set_u64(16, 0x10_0000);
        g.set_u64(24, 16 * 4096);
        g.set_u64(32, 4096);
        g.set_u64(40, va + 0x1_0000);
        fd.ioctl(IOMMU_HWPT_GET_DIRTY_BITMAP, &mut g.b).unwrap();
        let mut bm = [0u8; 2];
        mem.read(0x1_0000, &mut bm);
        assert_eq!(bm, [0x08, 0x00]);
        g.set_u64(40, 0xdead_0000);
        assert_eq!(
            fd.ioctl(IOMMU_HWPT_GET_DIRTY_BITMAP, &mut g.b).unwrap_err(),
            EFAULT,
            "unbacked bitmap pointer"
        );
        // Found by fuzzing: a range of 2^62 bytes asks for a 2^47-byte bitmap. The pointer
        // is checked before anything that size is allocated.
        g.set_u64(24, 1 << 62);
        g.set_u64(40, va);
        assert_eq!(
            fd.ioctl(IOMMU_HWPT_GET_DIRTY_BITMAP, &mut g.b).unwrap_err(),
            EFAULT,
            "a bitmap larger than user memory"
        );
    }

    #[test]
    fn allowed_iova_counts_are_bounded_by_user_memory_not_the_heap() {
        let fd = IommuFd::new();
        let mem = Arc::new(AnonMemory::new(1 << 16, false).unwrap());
        let va = fd.register_user_memory(mem.clone());
        let mut a = hdr(12, &[0; 8]);
        fd.ioctl(IOMMU_IOAS_ALLOC, &mut a).unwrap();
        let ioas = u32::from_le_bytes(a[8..12].try_into().unwrap());
        let mut r = Arg { b: vec![0u8; 24] };
        r.set_u32(0, 24);
        r.set_u32(4, ioas);
        // Found by fuzzing: 2^32 - 1 ranges of 16 bytes (64 GiB) were allocated before the
        // pointer was looked at.
        r.set_u32(8, u32::MAX);
        r.set_u64(16, va);
        assert_eq!(fd.ioctl(IOMMU_IOAS_ALLOW_IOVAS, &mut r.b).unwrap_err(), EFAULT);
        // Zero ranges copy nothing, so any pointer will do (Linux's copy_from_user of 0).
        r.set_u32(8, 0);
        r.set_u64(16, 0);
        fd.ioctl(IOMMU_IOAS_ALLOW_IOVAS, &mut r.b).unwrap();
        // One range from user memory is read.
        mem.write(0, &[0x00, 0x10, 0, 0, 0, 0, 0, 0, 0xff, 0x1f, 0, 0, 0, 0, 0, 0]);
        r.set_u32(8, 1);
        r.set_u64(16, va);
        fd.ioctl(IOMMU_IOAS_ALLOW_IOVAS, &mut r.b).unwrap();
    }
}
