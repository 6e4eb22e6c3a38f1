//! Argument and result structs of the iommufd uAPI (Linux: include/uapi/linux/iommufd.h),
//! field for field. Where Linux passes a user pointer, the typed API takes a slice; the
//! raw-ABI dispatcher (`ioctl.rs`) turns pointers into slices of registered user memory.
//! Fields named `__reserved` keep Linux's names so that the checks on them read the same.
#![allow(non_snake_case)]

/// `_IO(';', nr)`.
pub const fn iommufd_cmd(nr: u32) -> u32 {
    ((b';' as u32) << 8) | nr
}

pub const IOMMU_DESTROY: u32 = iommufd_cmd(0x80);
pub const IOMMU_IOAS_ALLOC: u32 = iommufd_cmd(0x81);
pub const IOMMU_IOAS_ALLOW_IOVAS: u32 = iommufd_cmd(0x82);
pub const IOMMU_IOAS_IOVA_RANGES: u32 = iommufd_cmd(0x84);
pub const IOMMU_IOAS_MAP: u32 = iommufd_cmd(0x85);
pub const IOMMU_IOAS_UNMAP: u32 = iommufd_cmd(0x86);
pub const IOMMU_OPTION: u32 = iommufd_cmd(0x87);
pub const IOMMU_HWPT_ALLOC: u32 = iommufd_cmd(0x89);
pub const IOMMU_GET_HW_INFO: u32 = iommufd_cmd(0x8a);
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u32 = iommufd_cmd(0x8b);
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u32 = iommufd_cmd(0x8c);
pub const IOMMU_HWPT_INVALIDATE: u32 = iommufd_cmd(0x8d);
/// livemig extension (not in Linux; modelled on the 2022 dirty-tracking RFC's
/// `IOMMU_IOAS_UNMAP_DIRTY`, which was not merged): unmap an IOAS range and return, in a
/// bitmap, the dirty bits its translations carried (`docs/viommu.md#unmap-with-dirty`).
pub const LIVEMIG_IOAS_UNMAP_DIRTY: u32 = iommufd_cmd(0xe0);

pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = 1 << 2;
pub const IOMMU_HWPT_ALLOC_PASID: u32 = 1 << 3;
/// livemig extension (not in Linux): the eager split/collapse policy of huge leaves while
/// dirty tracking is on. A high bit, so it cannot collide with future Linux flags soon.
pub const LIVEMIG_HWPT_ALLOC_EAGER_SPLIT: u32 = 1 << 31;

pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;
pub const IOMMU_HW_CAP_PCI_PASID_EXEC: u64 = 1 << 1;
pub const IOMMU_HW_CAP_PCI_PASID_PRIV: u64 = 1 << 2;

pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1;

pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

pub const IOMMU_OPTION_RLIMIT_MODE: u32 = 0;
pub const IOMMU_OPTION_HUGE_PAGES: u32 = 1;
pub const IOMMU_OPTION_OP_SET: u16 = 0;
pub const IOMMU_OPTION_OP_GET: u16 = 1;

pub const IOMMU_HWPT_DATA_NONE: u32 = 0;
/// `struct iommu_hwpt_vtd_s1`: a VT-d first-stage table.
pub const IOMMU_HWPT_DATA_VTD_S1: u32 = 1;
/// livemig extension: an Arm LPAE stage-1 table given by its root, with the layout of
/// `struct iommu_hwpt_vtd_s1` (`flags` 0). Linux's SMMUv3 nesting passes a whole STE instead.
pub const LIVEMIG_HWPT_DATA_ARM_S1: u32 = 0x8000_0001;

/// `struct iommu_hwpt_vtd_s1` flags.
pub const IOMMU_VTD_S1_SRE: u64 = 1 << 0;
pub const IOMMU_VTD_S1_EAFE: u64 = 1 << 1;
pub const IOMMU_VTD_S1_WPE: u64 = 1 << 2;
/// Size of `struct iommu_hwpt_vtd_s1`: flags, pgtbl_addr, addr_width, __reserved.
pub const IOMMU_HWPT_VTD_S1_LEN: usize = 24;

/// `enum iommu_hwpt_invalidate_data_type` (note: 0 here, 1 in the allocation enum).
pub const IOMMU_HWPT_INVALIDATE_DATA_VTD_S1: u32 = 0;
/// `struct iommu_hwpt_vtd_s1_invalidate` flag: only leaf entries changed.
pub const IOMMU_VTD_INV_FLAGS_LEAF: u32 = 1 << 0;
/// Size of `struct iommu_hwpt_vtd_s1_invalidate`: addr, npages, flags, __reserved.
pub const IOMMU_HWPT_VTD_S1_INVALIDATE_LEN: u32 = 24;

pub const IOMMU_HW_INFO_TYPE_NONE: u32 = 0;
pub const IOMMU_HW_INFO_TYPE_INTEL_VTD: u32 = 1;
pub const IOMMU_HW_INFO_TYPE_ARM_SMMUV3: u32 = 2;
pub const IOMMU_HW_INFO_TYPE_AMD: u32 = 6;

/// `struct iommu_ioas_alloc`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoasAlloc {
    pub flags: u32,
    pub out_ioas_id: u32,
}

/// `struct iommu_iova_range`: an inclusive range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

/// `struct iommu_ioas_allow_iovas`.
#[derive(Clone, Copy, Debug)]
pub struct IoasAllowIovas<'a> {
    pub ioas_id: u32,
    pub __reserved: u32,
    pub allowed_iovas: &'a [IovaRange],
}

/// `struct iommu_ioas_iova_ranges`: `num_iovas` is the array's length on input and the total
/// number of ranges on output.
#[derive(Debug)]
pub struct IoasIovaRanges<'a> {
    pub ioas_id: u32,
    pub num_iovas: u32,
    pub __reserved: u32,
    pub allowed_iovas: &'a mut [IovaRange],
    pub out_iova_alignment: u64,
}

/// `struct iommu_ioas_map`. Without `FIXED_IOVA`, `iova` is an output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoasMap {
    pub flags: u32,
    pub ioas_id: u32,
    pub __reserved: u32,
    pub user_va: u64,
    pub length: u64,
    pub iova: u64,
}

/// `struct iommu_ioas_unmap`. `length` is rewritten with the bytes unmapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoasUnmap {
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}

/// `struct iommu_option`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuOption {
    pub option_id: u32,
    pub op: u16,
    pub __reserved: u16,
    pub object_id: u32,
    pub val64: u64,
}

/// `struct iommu_hwpt_alloc` (6.7 layout plus `fault_id`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwptAlloc {
    pub flags: u32,
    pub dev_id: u32,
    pub pt_id: u32,
    pub out_hwpt_id: u32,
    pub __reserved: u32,
    pub data_type: u32,
    pub data_len: u32,
    pub data_uptr: u64,
    pub fault_id: u32,
}

/// `struct iommu_hw_info`. `data` receives up to `data_len` bytes of the driver's info
/// struct; `data_len` is rewritten with the full length.
#[derive(Debug)]
pub struct HwInfo<'a> {
    pub flags: u32,
    pub dev_id: u32,
    pub data_len: u32,
    pub data: &'a mut [u8],
    pub out_data_type: u32,
    pub __reserved: u32,
    pub out_capabilities: u64,
}

/// `struct iommu_hwpt_set_dirty_tracking`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwptSetDirtyTracking {
    pub flags: u32,
    pub hwpt_id: u32,
    pub __reserved: u32,
}

/// `struct iommu_hwpt_get_dirty_bitmap`. `data` is the caller-owned bitmap: bit `n` (bytes,
/// LSB first) stands for `iova + n * page_size`.
#[derive(Debug)]
pub struct HwptGetDirtyBitmap<'a> {
    pub hwpt_id: u32,
    pub flags: u32,
    pub __reserved: u32,
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
    pub data: &'a mut [u8],
}

/// `struct iommu_hwpt_invalidate`. `data` holds `entry_num` entries of `entry_len` bytes;
/// `entry_num` is rewritten with the number of entries handled, also on failure.
#[derive(Debug)]
pub struct HwptInvalidate<'a> {
    pub hwpt_id: u32,
    pub data_type: u32,
    pub entry_len: u32,
    pub entry_num: u32,
    pub __reserved: u32,
    pub data: &'a [u8],
}

/// `struct iommu_hwpt_vtd_s1_invalidate`, one entry of an invalidation array.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtdS1Invalidate {
    pub addr: u64,
    pub npages: u64,
    pub flags: u32,
    pub __reserved: u32,
}

impl VtdS1Invalidate {
    /// The entry's bytes, as the uAPI lays them out.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.npages.to_le_bytes());
        b[16..20].copy_from_slice(&self.flags.to_le_bytes());
        b[20..].copy_from_slice(&self.__reserved.to_le_bytes());
        b
    }
}

/// `struct iommu_hwpt_vtd_s1`, the data of a nested allocation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtdS1 {
    pub flags: u64,
    pub pgtbl_addr: u64,
    pub addr_width: u32,
    pub __reserved: u32,
}

impl VtdS1 {
    /// The struct's bytes, as the uAPI lays them out.
    pub fn to_bytes(&self) -> [u8; IOMMU_HWPT_VTD_S1_LEN] {
        let mut b = [0u8; IOMMU_HWPT_VTD_S1_LEN];
        b[..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.pgtbl_addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.addr_width.to_le_bytes());
        b[20..].copy_from_slice(&self.__reserved.to_le_bytes());
        b
    }
}

/// livemig's `struct livemig_ioas_unmap_dirty`: `IOMMU_IOAS_UNMAP`'s range rules, plus a
/// caller-owned bitmap like `IOMMU_HWPT_GET_DIRTY_BITMAP`'s (bit `n` for
/// `iova + n * page_size`) that receives the dirty bits of every translation removed.
/// `length` is rewritten with the bytes unmapped.
#[derive(Debug)]
pub struct IoasUnmapDirty<'a> {
    pub ioas_id: u32,
    pub flags: u32,
    pub __reserved: u32,
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
    pub data: &'a mut [u8],
}

/// Hardware info of an AMD IOMMU (`struct iommu_hw_info_amd`).
pub fn hw_info_amd(efr: u64) -> Vec<u8> {
    let mut v = efr.to_le_bytes().to_vec();
    v.extend_from_slice(&0u64.to_le_bytes()); // efr2
    v
}

/// Hardware info of a VT-d IOMMU (`struct iommu_hw_info_vtd`): flags, reserved, cap, ecap.
pub fn hw_info_vtd(ecap: u64) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    v.extend_from_slice(&0u64.to_le_bytes()); // cap_reg: not modelled
    v.extend_from_slice(&ecap.to_le_bytes());
    v
}

/// Hardware info of an SMMUv3 (`struct iommu_hw_info_arm_smmuv3`): flags, reserved, idr[6],
/// iidr, aidr.
pub fn hw_info_smmuv3(idr0: u64) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    v.extend_from_slice(&(idr0 as u32).to_le_bytes());
    v.extend_from_slice(&[0u8; 4 * 7]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(IOMMU_DESTROY, 0x3b80);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3b8c);
        assert_eq!(IOMMU_HWPT_INVALIDATE, 0x3b8d);
        assert_eq!(LIVEMIG_IOAS_UNMAP_DIRTY, 0x3be0);
    }
}
