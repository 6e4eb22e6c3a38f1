//! Nested HWPTs (Linux: drivers/iommu/iommufd/hw_pagetable.c, drivers/iommu/intel/nested.c):
//! allocation on a `NEST_PARENT` paging HWPT, device attach, and `IOMMU_HWPT_INVALIDATE`.
//! Checks and errnos in Linux's order (`docs/iommufd.md#nested-hwpts`).

use super::{Device, IommuFd, NestedHwpt, Obj, State};
use crate::errno::{err, Errno};
use crate::uapi::*;
use iommu::errno::*;
use iommu::{NestedConfig, NestedDomain, Stage1Kind};
use std::collections::BTreeSet;

/// The stage-1 data of a nested allocation, as `iommu_copy_struct_from_user` takes it: at
/// least the struct's size; a longer buffer only if the extra bytes are zero.
fn parse_s1(data: &[u8]) -> Result<VtdS1, Errno> {
    if data.len() < IOMMU_HWPT_VTD_S1_LEN {
        return err(EINVAL, "stage-1 data shorter than struct iommu_hwpt_vtd_s1");
    }
    if data[IOMMU_HWPT_VTD_S1_LEN..].iter().any(|&b| b != 0) {
        return err(E2BIG, "non-zero bytes past struct iommu_hwpt_vtd_s1");
    }
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("in bounds"));
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("in bounds"));
    Ok(VtdS1 {
        flags: u64_at(0),
        pgtbl_addr: u64_at(8),
        addr_width: u32_at(16),
        __reserved: u32_at(20),
    })
}

impl IommuFd {
    /// `IOMMU_HWPT_ALLOC` with a paging HWPT as `pt_id` (`iommufd_hwpt_nested_alloc`, then
    /// the driver's `domain_alloc_nested`). `data` is the user buffer, read by the caller.
    pub(super) fn hwpt_alloc_nested_locked(
        st: &mut State,
        cmd: &mut HwptAlloc,
        spec: &crate::DeviceSpec,
        data: Result<Vec<u8>, Errno>,
    ) -> Result<(), Errno> {
        // No fault queues are modelled, so FAULT_ID_VALID is unknown here too.
        if cmd.flags != 0 || cmd.data_len == 0 {
            return err(EOPNOTSUPP, "nested HWPTs take no flags and need stage-1 data");
        }
        let parent = st.hwpt(cmd.pt_id)?;
        if parent.auto || !parent.nest_parent {
            return err(EINVAL, "parent HWPT was not allocated with NEST_PARENT");
        }
        if parent.domain.format() != spec.format {
            return err(EINVAL, "parent HWPT belongs to another IOMMU");
        }
        let stage1 = match cmd.data_type {
            IOMMU_HWPT_DATA_VTD_S1 => Stage1Kind::VtdFs,
            LIVEMIG_HWPT_DATA_ARM_S1 => Stage1Kind::ArmLpaeS1,
            _ => return err(EOPNOTSUPP, "unknown stage-1 data type"),
        };
        // `iommu_copy_struct_from_user` checks the length before it copies anything.
        if (cmd.data_len as usize) < IOMMU_HWPT_VTD_S1_LEN {
            return err(EINVAL, "stage-1 data shorter than struct iommu_hwpt_vtd_s1");
        }
        let s1 = parse_s1(&data?)?;
        let domain = NestedDomain::new(&parent.domain, NestedConfig::new(stage1, s1.pgtbl_addr))?;
        cmd.out_hwpt_id = st.add(Obj::Nested(NestedHwpt {
            parent: cmd.pt_id,
            domain,
            devices: BTreeSet::new(),
            addr_width: s1.addr_width,
            s1_flags: s1.flags,
        }));
        Ok(())
    }

    /// Attaching a device to a nested HWPT: the PASID entry's checks
    /// (`intel_pasid_setup_nested`) happen here, not at allocation.
    pub(super) fn attach_nested_locked(st: &mut State, dev_id: u32, hwpt_id: u32) -> Result<u32, Errno> {
        let spec = st.device(dev_id)?.spec.clone();
        let Some(Obj::Nested(n)) = st.objs.get(&hwpt_id) else {
            return err(ENOENT, "no such nested HWPT");
        };
        let parent_format = st.hwpt(n.parent)?.domain.format();
        if parent_format != spec.format {
            return err(EINVAL, "nested HWPT of another IOMMU");
        }
        if n.addr_width != 48 {
            // 57 bits would need 5-level stage-1 tables, which the model has not.
            return err(EINVAL, "stage-1 address width is not 48");
        }
        if n.s1_flags & (IOMMU_VTD_S1_SRE | IOMMU_VTD_S1_EAFE) != 0 {
            return err(EINVAL, "SRE and EAFE are not supported by this IOMMU");
        }
        if st.device(dev_id)?.hwpt == Some(hwpt_id) {
            return Ok(hwpt_id);
        }
        Self::detach_locked(st, dev_id)?;
        let Some(Obj::Nested(n)) = st.objs.get_mut(&hwpt_id) else {
            return err(ENOENT, "no such nested HWPT");
        };
        n.devices.insert(dev_id);
        let dma = n.domain.attach(dev_id);
        let d: &mut Device = st.device_mut(dev_id)?;
        d.hwpt = Some(hwpt_id);
        d.dma = Some(dma);
        Ok(hwpt_id)
    }

    /// `IOMMU_HWPT_INVALIDATE` on a nested HWPT with VT-d stage-1 entries (also used for the
    /// Arm stage-1 model: both are "these IOVA pages"). Entries run in order and stop at the
    /// first bad one; `entry_num` comes back as the number handled, on success and failure.
    pub fn hwpt_invalidate(&self, cmd: &mut HwptInvalidate<'_>) -> Result<(), Errno> {
        let asked = cmd.entry_num;
        cmd.entry_num = 0;
        if cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "reserved field set");
        }
        // (The raw ABI turns a null `data_uptr` into `entry_len` 0 here, so both cases get
        // Linux's EINVAL in its place.)
        if asked != 0 && cmd.entry_len == 0 {
            return err(EINVAL, "entries without an array or an entry length");
        }
        let domain = {
            let st = self.lock();
            match st.objs.get(&cmd.hwpt_id) {
                None => return err(ENOENT, "no such object"),
                Some(Obj::Nested(n)) => n.domain.clone(),
                Some(_) => return err(EINVAL, "not a nested HWPT"),
            }
        };
        if asked == 0 {
            return Ok(()); // a probe: the data type is not even looked at
        }
        if cmd.data_type != IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 {
            return err(EINVAL, "unknown invalidation data type");
        }
        let len = cmd.entry_len as usize;
        if cmd.entry_len < IOMMU_HWPT_VTD_S1_INVALIDATE_LEN {
            return err(EINVAL, "entry_len below struct iommu_hwpt_vtd_s1_invalidate");
        }
        for i in 0..asked as usize {
            let Some(e) = cmd.data.get(i * len..(i + 1) * len) else {
                return err(EFAULT, "array shorter than entry_num entries");
            };
            if e[24..].iter().any(|&b| b != 0) {
                return err(E2BIG, "non-zero bytes past the entry");
            }
            let addr = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let npages = u64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
            let flags = u32::from_le_bytes(e[16..20].try_into().expect("4 bytes"));
            let reserved = u32::from_le_bytes(e[20..24].try_into().expect("4 bytes"));
            if flags & !IOMMU_VTD_INV_FLAGS_LEAF != 0 || reserved != 0 {
                return err(EOPNOTSUPP, "unknown flags or reserved field set");
            }
            if !addr.is_multiple_of(iommu::PAGE_SIZE) || (npages == u64::MAX && addr != 0) {
                return err(
                    EINVAL,
                    "address not page aligned, or everything from a non-zero address",
                );
            }
            domain.invalidate(addr, npages);
            cmd.entry_num += 1;
        }
        Ok(())
    }
}
