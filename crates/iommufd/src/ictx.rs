//! The iommufd context: its object table and one method per ioctl (Linux:
//! drivers/iommu/iommufd/{main,ioas,hw_pagetable,device}.c). Every check happens in the order
//! `docs/iommufd.md` gives for its ioctl, with the errno it gives.

use crate::bitmap::IovaBitmap;
use crate::errno::{err, Errno};
use crate::ioas::{complement, intersects, merge, Area, Ioas};
use crate::uapi::*;
use crate::user_memory::UserMemory;
use iommu::errno::*;
use iommu::{
    DirtyBitmap, Dma, Domain, DomainConfig, FormatKind, HostMemory, IotlbGather, Perm, SplitPolicy, DIRTY_NO_CLEAR,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

mod nesting;
mod unmap_dirty;

/// The IOVA width of every modelled IOMMU: a domain reserves everything above.
const APERTURE_LAST: u64 = (1 << iommu::format::IOVA_BITS) - 1;
/// The IOMMU page size of every modelled format (the IOAS alignment once a domain exists).
const IOMMU_PAGE: u64 = iommu::PAGE_SIZE;

/// What an emulated device brings when it is bound: which IOMMU sits in front of it and what
/// that IOMMU can do.
#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub name: String,
    /// Page-table format of the device's IOMMU.
    pub format: FormatKind,
    /// `device_iommu_capable(dev, IOMMU_CAP_DIRTY_TRACKING)`.
    pub dirty_tracking: bool,
    /// The IOMMU supports leaves larger than 4 KiB for this device.
    pub huge_iova: bool,
    /// IOTLB size of the device's IOMMU.
    pub iotlb_entries: usize,
}

impl DeviceSpec {
    pub fn new(name: &str, format: FormatKind) -> Self {
        Self {
            name: name.to_string(),
            format,
            dirty_tracking: true,
            huge_iova: true,
            iotlb_entries: 1024,
        }
    }

    /// The interrupt window the IOMMU driver reserves in every IOAS the device uses
    /// (IOMMU_RESV_MSI on x86, the software MSI window of the Arm SMMU driver).
    pub fn msi_window(&self) -> IovaRange {
        match self.format {
            FormatKind::AmdV1 | FormatKind::VtdSs => IovaRange {
                start: 0xfee0_0000,
                last: 0xfeef_ffff,
            },
            FormatKind::ArmLpaeS1 => IovaRange {
                start: 0x0800_0000,
                last: 0x080f_ffff,
            },
        }
    }
}

struct Device {
    spec: DeviceSpec,
    hwpt: Option<u32>,
    dma: Option<Dma>,
}

struct Hwpt {
    ioas: u32,
    domain: Domain,
    dirty_ops: bool,
    tracking: bool,
    devices: BTreeSet<u32>,
    /// Allocated by an attach to an IOAS; freed with its last device.
    auto: bool,
    /// Allocated with `NEST_PARENT`: nested HWPTs may use it as their stage 2.
    nest_parent: bool,
}

/// How a paging HWPT is allocated.
#[derive(Clone, Copy)]
struct HwptKind {
    dirty: bool,
    policy: SplitPolicy,
    nest_parent: bool,
    auto: bool,
}

/// A nested HWPT: a guest's stage-1 table on a paging HWPT (`nesting.rs`).
struct NestedHwpt {
    parent: u32,
    domain: iommu::NestedDomain,
    devices: BTreeSet<u32>,
    /// From `struct iommu_hwpt_vtd_s1`, checked when a device attaches, as Linux does.
    addr_width: u32,
    s1_flags: u64,
}

enum Obj {
    Ioas(Ioas),
    Hwpt(Hwpt),
    Nested(NestedHwpt),
    Device(Device),
}

#[derive(Default)]
struct State {
    next_id: u32,
    objs: BTreeMap<u32, Obj>,
    rlimit_mode: u64,
}

impl State {
    fn add(&mut self, o: Obj) -> u32 {
        self.next_id += 1;
        let id = self.next_id;
        self.objs.insert(id, o);
        id
    }
    fn ioas(&self, id: u32) -> Result<&Ioas, Errno> {
        match self.objs.get(&id) {
            Some(Obj::Ioas(i)) => Ok(i),
            _ => err(ENOENT, "no such IOAS"),
        }
    }
    fn ioas_mut(&mut self, id: u32) -> Result<&mut Ioas, Errno> {
        match self.objs.get_mut(&id) {
            Some(Obj::Ioas(i)) => Ok(i),
            _ => err(ENOENT, "no such IOAS"),
        }
    }
    fn hwpt(&self, id: u32) -> Result<&Hwpt, Errno> {
        match self.objs.get(&id) {
            Some(Obj::Hwpt(h)) => Ok(h),
            _ => err(ENOENT, "no such paging HWPT"),
        }
    }
    fn hwpt_mut(&mut self, id: u32) -> Result<&mut Hwpt, Errno> {
        match self.objs.get_mut(&id) {
            Some(Obj::Hwpt(h)) => Ok(h),
            _ => err(ENOENT, "no such paging HWPT"),
        }
    }
    fn device(&self, id: u32) -> Result<&Device, Errno> {
        match self.objs.get(&id) {
            Some(Obj::Device(d)) => Ok(d),
            _ => err(ENOENT, "no such device"),
        }
    }
    fn device_mut(&mut self, id: u32) -> Result<&mut Device, Errno> {
        match self.objs.get_mut(&id) {
            Some(Obj::Device(d)) => Ok(d),
            _ => err(ENOENT, "no such device"),
        }
    }

    fn domains(&self, ioas: &Ioas) -> Vec<Domain> {
        ioas.hwpts
            .iter()
            .filter_map(|h| self.hwpt(*h).ok())
            .map(|h| h.domain.clone())
            .collect()
    }

    /// Reserved ranges of an IOAS: outside the aperture of each domain, and the interrupt
    /// window of each device attached through it.
    fn reserved(&self, ioas: &Ioas) -> Vec<IovaRange> {
        let mut v = Vec::new();
        for h in ioas.hwpts.iter().filter_map(|h| self.hwpt(*h).ok()) {
            v.push(IovaRange {
                start: APERTURE_LAST + 1,
                last: u64::MAX,
            });
            for d in h.devices.iter().filter_map(|d| self.device(*d).ok()) {
                v.push(d.spec.msi_window());
            }
        }
        merge(v)
    }

    fn iova_alignment(&self, ioas: &Ioas) -> u64 {
        if ioas.hwpts.is_empty() {
            1
        } else {
            IOMMU_PAGE
        }
    }
}

/// An iommufd file: the object table and one method per ioctl. Methods take `&self` and
/// serialise on one lock; DMA never goes through here (devices hold [`Dma`] handles).
pub struct IommuFd {
    st: Mutex<State>,
    user: UserMemory,
}

impl Default for IommuFd {
    fn default() -> Self {
        Self::new()
    }
}

fn perm_of(flags: u32) -> Perm {
    let mut p = Perm::NONE;
    if flags & IOMMU_IOAS_MAP_READABLE != 0 {
        p = p.union(Perm::READ);
    }
    if flags & IOMMU_IOAS_MAP_WRITEABLE != 0 {
        p = p.union(Perm::WRITE);
    }
    p
}

impl IommuFd {
    pub fn new() -> Self {
        Self {
            st: Mutex::new(State::default()),
            user: UserMemory::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process memory `user_va` values refer to.
    pub fn user_memory(&self) -> &UserMemory {
        &self.user
    }

    /// Registers memory and returns its user address, for `IOAS_MAP.user_va`.
    pub fn register_user_memory(&self, mem: Arc<dyn HostMemory>) -> u64 {
        self.user.register(mem)
    }

    // ---- devices (the VFIO cdev side: bind, attach, detach) ----

    /// `VFIO_DEVICE_BIND_IOMMUFD`: binds an emulated device, returns its object id.
    pub fn bind_device(&self, spec: DeviceSpec) -> u32 {
        self.lock().add(Obj::Device(Device {
            spec,
            hwpt: None,
            dma: None,
        }))
    }

    /// Unbinds a device, detaching it first.
    pub fn unbind_device(&self, dev_id: u32) -> Result<(), Errno> {
        let mut st = self.lock();
        st.device(dev_id)?;
        Self::detach_locked(&mut st, dev_id)?;
        st.objs.remove(&dev_id);
        Ok(())
    }

    /// The device's spec.
    pub fn device_spec(&self, dev_id: u32) -> Result<DeviceSpec, Errno> {
        Ok(self.lock().device(dev_id)?.spec.clone())
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: attaches to a HWPT, or to an IOAS through an automatic
    /// (non-dirty-tracking) HWPT. Replaces an existing attachment. Returns the HWPT id.
    pub fn attach(&self, dev_id: u32, pt_id: u32) -> Result<u32, Errno> {
        let mut st = self.lock();
        let spec = st.device(dev_id)?.spec.clone();
        let hwpt_id = match st.objs.get(&pt_id) {
            Some(Obj::Nested(_)) => return Self::attach_nested_locked(&mut st, dev_id, pt_id),
            Some(Obj::Hwpt(_)) => pt_id,
            Some(Obj::Ioas(ioas)) => {
                let existing = ioas.hwpts.iter().copied().find(|h| {
                    st.hwpt(*h)
                        .map(|h| h.auto && h.domain.format() == spec.format && !h.dirty_ops)
                        .unwrap_or(false)
                });
                match existing {
                    Some(h) => h,
                    None => {
                        let kind = HwptKind {
                            dirty: false,
                            policy: SplitPolicy::Keep,
                            nest_parent: false,
                            auto: true,
                        };
                        Self::alloc_hwpt_locked(&mut st, &spec, pt_id, kind)?
                    }
                }
            }
            _ => return err(ENOENT, "no such IOAS or HWPT"),
        };
        let res = (|| {
            let h = st.hwpt(hwpt_id)?;
            if h.dirty_ops && !spec.dirty_tracking {
                return err(EINVAL, "dirty-tracking domain needs a dirty-capable device");
            }
            if h.domain.format() != spec.format {
                return err(EINVAL, "domain of another IOMMU format");
            }
            let ioas = st.ioas(h.ioas)?;
            let msi = spec.msi_window();
            if ioas.any_area_in(msi.start, msi.last) {
                return err(EADDRINUSE, "an area covers the device's reserved MSI window");
            }
            if ioas.allowed.iter().any(|a| intersects(*a, msi)) {
                return err(EADDRINUSE, "the device's MSI window is inside an allowed range");
            }
            Ok(())
        })();
        if let Err(e) = res {
            Self::free_unused_auto(&mut st, hwpt_id);
            return Err(e);
        }
        if st.device(dev_id)?.hwpt == Some(hwpt_id) {
            return Ok(hwpt_id);
        }
        Self::detach_locked(&mut st, dev_id)?;
        let h = st.hwpt_mut(hwpt_id)?;
        h.devices.insert(dev_id);
        let dma = h.domain.attach(dev_id);
        let d = st.device_mut(dev_id)?;
        d.hwpt = Some(hwpt_id);
        d.dma = Some(dma);
        Ok(hwpt_id)
    }

    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT`.
    pub fn detach(&self, dev_id: u32) -> Result<(), Errno> {
        let mut st = self.lock();
        if st.device(dev_id)?.hwpt.is_none() {
            return err(EINVAL, "device is not attached");
        }
        Self::detach_locked(&mut st, dev_id)
    }

    fn detach_locked(st: &mut State, dev_id: u32) -> Result<(), Errno> {
        let d = st.device_mut(dev_id)?;
        let Some(h) = d.hwpt.take() else { return Ok(()) };
        d.dma = None;
        if let Some(Obj::Nested(n)) = st.objs.get_mut(&h) {
            n.devices.remove(&dev_id);
            n.domain.detach(dev_id);
            return Ok(());
        }
        let hw = st.hwpt_mut(h)?;
        hw.devices.remove(&dev_id);
        hw.domain.detach(dev_id);
        Self::free_unused_auto(st, h);
        Ok(())
    }

    fn free_unused_auto(st: &mut State, hwpt_id: u32) {
        let Ok(h) = st.hwpt(hwpt_id) else { return };
        if h.auto && h.devices.is_empty() {
            let ioas = h.ioas;
            st.objs.remove(&hwpt_id);
            if let Ok(i) = st.ioas_mut(ioas) {
                i.hwpts.retain(|x| *x != hwpt_id);
            }
        }
    }

    /// The DMA handle of an attached device: how the device reaches memory.
    pub fn device_dma(&self, dev_id: u32) -> Result<Dma, Errno> {
        match &self.lock().device(dev_id)?.dma {
            Some(d) => Ok(d.clone()),
            None => err(EINVAL, "device is not attached"),
        }
    }

    /// The HWPT a device is attached to.
    pub fn device_hwpt(&self, dev_id: u32) -> Result<Option<u32>, Errno> {
        Ok(self.lock().device(dev_id)?.hwpt)
    }

    /// The domain behind a HWPT (for tests, benchmarks and the demo).
    pub fn hwpt_domain(&self, hwpt_id: u32) -> Result<Domain, Errno> {
        Ok(self.lock().hwpt(hwpt_id)?.domain.clone())
    }

    /// The nested domain behind a nested HWPT.
    pub fn hwpt_nested_domain(&self, hwpt_id: u32) -> Result<iommu::NestedDomain, Errno> {
        match self.lock().objs.get(&hwpt_id) {
            Some(Obj::Nested(n)) => Ok(n.domain.clone()),
            _ => err(ENOENT, "no such nested HWPT"),
        }
    }

    // ---- IOMMU_DESTROY ----

    /// `IOMMU_DESTROY`. `EBUSY` while the object is in use: an IOAS with HWPTs, a HWPT with
    /// devices, and any device (devices are released by [`Self::unbind_device`]).
    pub fn destroy(&self, id: u32) -> Result<(), Errno> {
        let mut st = self.lock();
        match st.objs.get(&id) {
            None => return err(ENOENT, "no such object"),
            Some(Obj::Ioas(i)) if !i.hwpts.is_empty() => return err(EBUSY, "IOAS has HWPTs"),
            Some(Obj::Hwpt(h)) if !h.devices.is_empty() => return err(EBUSY, "HWPT has attached devices"),
            Some(Obj::Nested(n)) if !n.devices.is_empty() => return err(EBUSY, "HWPT has attached devices"),
            Some(Obj::Hwpt(_)) if st.objs.values().any(|o| matches!(o, Obj::Nested(n) if n.parent == id)) => {
                return err(EBUSY, "HWPT is the parent of nested HWPTs")
            }
            Some(Obj::Nested(_)) => {}
            Some(Obj::Device(_)) => return err(EBUSY, "devices are released by unbind"),
            Some(Obj::Hwpt(h)) => {
                let ioas = h.ioas;
                st.ioas_mut(ioas)?.hwpts.retain(|x| *x != id);
            }
            Some(Obj::Ioas(_)) => {}
        }
        st.objs.remove(&id);
        Ok(())
    }

    // ---- IOAS ----

    /// `IOMMU_IOAS_ALLOC`.
    pub fn ioas_alloc(&self, cmd: &mut IoasAlloc) -> Result<(), Errno> {
        if cmd.flags != 0 {
            return err(EOPNOTSUPP, "unknown flags");
        }
        cmd.out_ioas_id = self.lock().add(Obj::Ioas(Ioas::default()));
        Ok(())
    }

    /// `IOMMU_IOAS_MAP`.
    pub fn ioas_map(&self, cmd: &mut IoasMap) -> Result<(), Errno> {
        let known = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;
        if cmd.flags & !known != 0 || cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "unknown flags or reserved field set");
        }
        if cmd.iova == u64::MAX || cmd.length == u64::MAX {
            return err(EOVERFLOW, "iova or length at ULONG_MAX");
        }
        let perm = perm_of(cmd.flags);
        if perm == Perm::NONE {
            return err(EINVAL, "neither READABLE nor WRITEABLE");
        }
        let mut st = self.lock();
        let ioas = st.ioas(cmd.ioas_id)?;
        if cmd.length == 0 {
            return err(EINVAL, "zero length");
        }
        let align = st.iova_alignment(ioas);
        if !cmd.length.is_multiple_of(align) || (align > 1 && !cmd.user_va.is_multiple_of(align)) {
            return err(EINVAL, "length or user_va not aligned to the IOAS");
        }
        let Some((mem, offset)) = self.user.resolve(cmd.user_va, cmd.length) else {
            return err(EFAULT, "user_va is not backed by registered memory");
        };
        let reserved = st.reserved(ioas);
        let iova = if cmd.flags & IOMMU_IOAS_MAP_FIXED_IOVA != 0 {
            if !cmd.iova.is_multiple_of(align) {
                return err(EINVAL, "iova not aligned to the IOAS");
            }
            let Some(last) = cmd.iova.checked_add(cmd.length - 1) else {
                return err(EOVERFLOW, "iova + length wraps");
            };
            let want = IovaRange { start: cmd.iova, last };
            if reserved.iter().any(|r| intersects(*r, want)) {
                return err(EINVAL, "range hits a reserved region");
            }
            if ioas.any_area_in(cmd.iova, last) {
                return err(EEXIST, "range overlaps an existing area");
            }
            cmd.iova
        } else {
            ioas.alloc_iova(cmd.user_va, cmd.length, align, &reserved)?
        };
        let domains = st.domains(ioas);
        for (i, d) in domains.iter().enumerate() {
            if let Err(e) = d.map(iova, cmd.length, mem.clone(), offset, perm) {
                for undo in &domains[..i] {
                    let _ = undo.unmap(iova, cmd.length);
                }
                return Err(e.into());
            }
        }
        let area = Area {
            length: cmd.length,
            user_va: cmd.user_va,
            mem,
            offset,
            perm,
        };
        st.ioas_mut(cmd.ioas_id)?.areas.insert(iova, area);
        cmd.iova = iova;
        Ok(())
    }

    /// `IOMMU_IOAS_UNMAP`. `iova = 0, length = u64::MAX` unmaps everything; any other range
    /// must cover whole areas. Unlike Linux, which unmaps the whole areas it meets before
    /// finding a bisected one, the check comes first so a failed unmap changes nothing.
    pub fn ioas_unmap(&self, cmd: &mut IoasUnmap) -> Result<(), Errno> {
        let mut st = self.lock();
        let ioas = st.ioas(cmd.ioas_id)?;
        let hit = areas_to_unmap(ioas, cmd.iova, cmd.length, true)?;
        cmd.length = unmap_areas(&mut st, cmd.ioas_id, &hit, |d, _, k, len| d.unmap(k, len).map(|_| ()))?;
        Ok(())
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replaces the allowed list atomically.
    pub fn ioas_allow_iovas(&self, cmd: &IoasAllowIovas<'_>) -> Result<(), Errno> {
        if cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "reserved field set");
        }
        let mut st = self.lock();
        let ioas = st.ioas(cmd.ioas_id)?;
        let mut sorted = cmd.allowed_iovas.to_vec();
        if sorted.iter().any(|r| r.start >= r.last) {
            return err(EINVAL, "range with start >= last");
        }
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| intersects(w[0], w[1])) {
            return err(EINVAL, "overlapping ranges");
        }
        let reserved = st.reserved(ioas);
        if sorted.iter().any(|a| reserved.iter().any(|r| intersects(*a, *r))) {
            return err(EADDRINUSE, "range touches a reserved region");
        }
        st.ioas_mut(cmd.ioas_id)?.allowed = sorted;
        Ok(())
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: the gaps between reserved regions. A short array gets what
    /// fits, `num_iovas` gets the total, and the call fails with `EMSGSIZE`.
    pub fn ioas_iova_ranges(&self, cmd: &mut IoasIovaRanges<'_>) -> Result<(), Errno> {
        if cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "reserved field set");
        }
        let st = self.lock();
        let ioas = st.ioas(cmd.ioas_id)?;
        let ranges = complement(&st.reserved(ioas));
        let cap = (cmd.num_iovas as usize).min(cmd.allowed_iovas.len());
        for (dst, src) in cmd.allowed_iovas.iter_mut().zip(&ranges).take(cap) {
            *dst = *src;
        }
        cmd.out_iova_alignment = st.iova_alignment(ioas);
        let short = ranges.len() > cap;
        cmd.num_iovas = ranges.len() as u32;
        if short {
            return err(EMSGSIZE, "array too short for every range");
        }
        Ok(())
    }

    /// `IOMMU_OPTION`: `RLIMIT_MODE` (context-wide) and `HUGE_PAGES` (per IOAS).
    pub fn option(&self, cmd: &mut IommuOption) -> Result<(), Errno> {
        if cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "reserved field set");
        }
        let mut st = self.lock();
        match cmd.option_id {
            IOMMU_OPTION_RLIMIT_MODE => {
                if cmd.object_id != 0 {
                    return err(EOPNOTSUPP, "RLIMIT_MODE takes no object");
                }
                match cmd.op {
                    IOMMU_OPTION_OP_GET => cmd.val64 = st.rlimit_mode,
                    IOMMU_OPTION_OP_SET if cmd.val64 <= 1 => st.rlimit_mode = cmd.val64,
                    IOMMU_OPTION_OP_SET => return err(EINVAL, "RLIMIT_MODE is 0 or 1"),
                    _ => return err(EOPNOTSUPP, "unknown op"),
                }
            }
            IOMMU_OPTION_HUGE_PAGES => {
                let ioas = st.ioas(cmd.object_id)?;
                match cmd.op {
                    IOMMU_OPTION_OP_GET => cmd.val64 = !ioas.disable_large_pages as u64,
                    IOMMU_OPTION_OP_SET => {
                        let disable = match cmd.val64 {
                            0 => true,
                            1 => false,
                            _ => return err(EINVAL, "HUGE_PAGES is 0 or 1"),
                        };
                        if disable && !ioas.disable_large_pages && !ioas.hwpts.is_empty() && !ioas.areas.is_empty() {
                            return err(EINVAL, "a domain is attached and an area is mapped");
                        }
                        let domains = st.domains(ioas);
                        for d in &domains {
                            d.set_huge_pages(!disable && d.config().huge_pages);
                        }
                        st.ioas_mut(cmd.object_id)?.disable_large_pages = disable;
                    }
                    _ => return err(EOPNOTSUPP, "unknown op"),
                }
            }
            _ => return err(EOPNOTSUPP, "unknown option"),
        }
        Ok(())
    }

    // ---- HWPT ----

    /// `IOMMU_HWPT_ALLOC`: a paging HWPT on an IOAS (flags `NEST_PARENT`, `DIRTY_TRACKING`,
    /// and livemig's `LIVEMIG_HWPT_ALLOC_EAGER_SPLIT`), or a nested HWPT on a paging HWPT
    /// allocated with `NEST_PARENT` (`nesting.rs`). PASID and fault queues are not modelled
    /// (`EOPNOTSUPP`).
    pub fn hwpt_alloc(&self, cmd: &mut HwptAlloc) -> Result<(), Errno> {
        if cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "reserved field set");
        }
        if (cmd.data_len != 0 && cmd.data_type == IOMMU_HWPT_DATA_NONE)
            || (cmd.data_len == 0 && cmd.data_type != IOMMU_HWPT_DATA_NONE)
        {
            return err(EINVAL, "data_len and data_type disagree");
        }
        let mut st = self.lock();
        let spec = st.device(cmd.dev_id)?.spec.clone();
        match st.objs.get(&cmd.pt_id) {
            Some(Obj::Ioas(_)) => {}
            Some(Obj::Hwpt(_)) => {
                let data = self.read_user(cmd.data_uptr, cmd.data_len as usize);
                return Self::hwpt_alloc_nested_locked(&mut st, cmd, &spec, data);
            }
            // A missing object is EINVAL too, not ENOENT: Linux looks pt_id up as any type.
            _ => return err(EINVAL, "pt_id is neither an IOAS nor a HWPT"),
        }
        let known = IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING | LIVEMIG_HWPT_ALLOC_EAGER_SPLIT;
        if cmd.flags & !known != 0 {
            return err(EOPNOTSUPP, "unsupported flags");
        }
        if cmd.data_type != IOMMU_HWPT_DATA_NONE {
            return err(EOPNOTSUPP, "no driver-specific data for paging domains");
        }
        let dirty = cmd.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
        if dirty && !spec.dirty_tracking {
            return err(EOPNOTSUPP, "device cannot track dirty pages");
        }
        let policy = if cmd.flags & LIVEMIG_HWPT_ALLOC_EAGER_SPLIT != 0 {
            SplitPolicy::EagerSplit
        } else {
            SplitPolicy::Keep
        };
        let kind = HwptKind {
            dirty,
            policy,
            nest_parent: cmd.flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0,
            auto: false,
        };
        cmd.out_hwpt_id = Self::alloc_hwpt_locked(&mut st, &spec, cmd.pt_id, kind)?;
        Ok(())
    }

    /// Creates a domain for `spec` on IOAS `ioas_id` and fills it with every area
    /// (`iopt_table_add_domain`).
    fn alloc_hwpt_locked(st: &mut State, spec: &DeviceSpec, ioas_id: u32, kind: HwptKind) -> Result<u32, Errno> {
        let HwptKind {
            dirty,
            policy,
            nest_parent,
            auto,
        } = kind;
        let ioas = st.ioas(ioas_id)?;
        let mut cfg = DomainConfig::new(spec.format);
        cfg.nest_parent = nest_parent;
        cfg.dirty_tracking = dirty;
        cfg.hw_dirty_capable = spec.dirty_tracking;
        cfg.huge_pages = spec.huge_iova && !ioas.disable_large_pages;
        cfg.split_policy = policy;
        cfg.iotlb_entries = spec.iotlb_entries;
        let domain = Domain::new(cfg)?;
        for (&iova, a) in &ioas.areas {
            if !iova.is_multiple_of(IOMMU_PAGE)
                || !a.length.is_multiple_of(IOMMU_PAGE)
                || !a.user_va.is_multiple_of(IOMMU_PAGE)
            {
                return err(EINVAL, "an area is not aligned to the IOMMU page size");
            }
            if a.last(iova) > APERTURE_LAST {
                return err(EADDRINUSE, "an area lies outside the IOMMU aperture");
            }
        }
        if ioas.allowed.iter().any(|r| r.last > APERTURE_LAST) {
            return err(EADDRINUSE, "an allowed range lies outside the IOMMU aperture");
        }
        for (&iova, a) in &ioas.areas {
            domain.map(iova, a.length, a.mem.clone(), a.offset, a.perm)?;
        }
        let id = st.add(Obj::Hwpt(Hwpt {
            ioas: ioas_id,
            domain,
            dirty_ops: dirty,
            tracking: false,
            devices: BTreeSet::new(),
            auto,
            nest_parent,
        }));
        st.ioas_mut(ioas_id)?.hwpts.push(id);
        Ok(id)
    }

    /// `IOMMU_GET_HW_INFO`.
    pub fn get_hw_info(&self, cmd: &mut HwInfo<'_>) -> Result<(), Errno> {
        if cmd.flags != 0 || cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "unknown flags or reserved field set");
        }
        let st = self.lock();
        let spec = &st.device(cmd.dev_id)?.spec;
        let cap = match spec.format {
            FormatKind::AmdV1 => iommu::format::AmdV1::capability_register(spec.dirty_tracking),
            FormatKind::VtdSs => iommu::format::VtdSs::capability_register(spec.dirty_tracking),
            FormatKind::ArmLpaeS1 => iommu::format::ArmLpaeS1::capability_register(spec.dirty_tracking),
        };
        let (ty, info) = match spec.format {
            FormatKind::AmdV1 => (IOMMU_HW_INFO_TYPE_AMD, hw_info_amd(cap)),
            FormatKind::VtdSs => (IOMMU_HW_INFO_TYPE_INTEL_VTD, hw_info_vtd(cap)),
            FormatKind::ArmLpaeS1 => (IOMMU_HW_INFO_TYPE_ARM_SMMUV3, hw_info_smmuv3(cap)),
        };
        let n = (cmd.data_len as usize).min(cmd.data.len());
        let copy = n.min(info.len());
        cmd.data[..copy].copy_from_slice(&info[..copy]);
        cmd.data[copy..n].fill(0);
        cmd.data_len = info.len() as u32;
        cmd.out_data_type = ty;
        cmd.out_capabilities = if spec.dirty_tracking {
            IOMMU_HW_CAP_DIRTY_TRACKING
        } else {
            0
        };
        Ok(())
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`. Every enable first clears all dirty state of every
    /// area and flushes the IOTLB; disabling clears nothing.
    pub fn hwpt_set_dirty_tracking(&self, cmd: &HwptSetDirtyTracking) -> Result<(), Errno> {
        if cmd.flags & !IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0 {
            return err(EOPNOTSUPP, "unknown flags");
        }
        let mut st = self.lock();
        let h = st.hwpt(cmd.hwpt_id)?;
        if !h.dirty_ops {
            return err(EOPNOTSUPP, "HWPT was allocated without DIRTY_TRACKING");
        }
        let enable = cmd.flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0;
        let domain = h.domain.clone();
        if enable {
            let ioas = st.ioas(h.ioas)?;
            let mut gather = IotlbGather::new();
            for (&iova, a) in &ioas.areas {
                domain.read_and_clear_dirty(
                    iova,
                    a.length,
                    0,
                    &mut DirtyBitmap {
                        bitmap: None,
                        gather: Some(&mut gather),
                    },
                )?;
            }
            domain.iotlb_sync(&gather);
            domain.flush_iotlb_all();
        }
        domain.set_dirty_tracking(enable)?;
        st.hwpt_mut(cmd.hwpt_id)?.tracking = enable;
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP`. Sets (never clears) the bits of dirty pages in the
    /// caller's buffer, window by window; a huge leaf that crosses a window's end is still
    /// reported whole within the range (see `bitmap.rs`), while the part of a leaf outside the
    /// range is cleared with it but not reported, as in Linux. Deviations from Linux
    /// (`docs/iommufd.md#deviations-from-linux`): a zero length, a non-power-of-two `page_size`,
    /// disabled tracking and holes fail with `EINVAL`, and a buffer too short for the range
    /// fails with `EFAULT`, instead of a silent partial result.
    pub fn hwpt_get_dirty_bitmap(&self, cmd: &mut HwptGetDirtyBitmap<'_>) -> Result<(), Errno> {
        if cmd.flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 || cmd.__reserved != 0 {
            return err(EOPNOTSUPP, "unknown flags or reserved field set");
        }
        let st = self.lock();
        let h = st.hwpt(cmd.hwpt_id)?;
        let ioas = st.ioas(h.ioas)?;
        // A zero length would pass Linux's check below at IOVA 0 as the whole 64-bit space, a
        // range no buffer can cover; it is refused before anything is walked instead.
        if cmd.length == 0 {
            return err(EINVAL, "zero length");
        }
        // iommufd_check_iova_range()
        let Some(last) = cmd.iova.checked_add(cmd.length - 1) else {
            return err(EOVERFLOW, "iova + length - 1 wraps");
        };
        let align = st.iova_alignment(ioas);
        if !cmd.iova.is_multiple_of(align) || !last.wrapping_add(1).is_multiple_of(align) {
            return err(EINVAL, "range not aligned to the IOAS");
        }
        if cmd.page_size == 0 {
            return err(EINVAL, "zero page_size");
        }
        let pmask = cmd.page_size - 1;
        if cmd.iova & pmask != 0 || last.wrapping_add(1) & pmask != 0 {
            return err(EINVAL, "range not aligned to page_size");
        }
        if !cmd.page_size.is_power_of_two() {
            return err(EINVAL, "page_size is not a power of two");
        }
        if !h.dirty_ops {
            return err(EOPNOTSUPP, "HWPT was allocated without DIRTY_TRACKING");
        }
        if !h.tracking {
            return err(EINVAL, "dirty tracking is disabled");
        }
        let flags = if cmd.flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 {
            DIRTY_NO_CLEAR
        } else {
            0
        };
        let domain = h.domain.clone();
        let mut gather = IotlbGather::new();
        let mut bitmap = IovaBitmap::new(cmd.data, cmd.iova, cmd.length, cmd.page_size);
        let res = bitmap.for_each(|bm, w_iova, w_len| {
            let (runs, complete) = ioas.contiguous_runs(w_iova, w_iova + w_len - 1);
            for (s, e) in runs {
                let mut out = DirtyBitmap {
                    bitmap: Some(bm),
                    gather: Some(&mut gather),
                };
                domain.read_and_clear_dirty(s, e - s + 1, flags, &mut out)?;
            }
            if complete {
                Ok(())
            } else {
                err(EINVAL, "a hole in the range")
            }
        });
        if flags & DIRTY_NO_CLEAR == 0 {
            domain.iotlb_sync(&gather);
        }
        res
    }

    /// Whether a HWPT's dirty tracking is enabled.
    pub fn hwpt_dirty_tracking(&self, hwpt_id: u32) -> Result<bool, Errno> {
        Ok(self.lock().hwpt(hwpt_id)?.tracking)
    }

    /// Areas of an IOAS: (iova, length, user_va).
    pub fn ioas_areas(&self, ioas_id: u32) -> Result<Vec<(u64, u64, u64)>, Errno> {
        Ok(self
            .lock()
            .ioas(ioas_id)?
            .areas
            .iter()
            .map(|(k, a)| (*k, a.length, a.user_va))
            .collect())
    }
}

use iommu::format::Format as _;

/// Unmaps `hit` (whole areas of IOAS `ioas_id`, from `areas_to_unmap`) from every HWPT of the
/// IOAS and forgets them. `unmap` takes one area out of one domain, told whether that HWPT
/// tracks dirty pages now. Returns the bytes unmapped.
fn unmap_areas(
    st: &mut State,
    ioas_id: u32,
    hit: &[(u64, u64)],
    mut unmap: impl FnMut(&Domain, bool, u64, u64) -> Result<(), iommu::IommuError>,
) -> Result<u64, Errno> {
    let targets: Vec<(Domain, bool)> = st
        .ioas(ioas_id)?
        .hwpts
        .iter()
        .filter_map(|h| st.hwpt(*h).ok())
        .map(|h| (h.domain.clone(), h.dirty_ops && h.tracking))
        .collect();
    let mut unmapped = 0;
    for &(k, len) in hit {
        for (d, tracking) in &targets {
            unmap(d, *tracking, k, len)?;
        }
        unmapped += len;
    }
    let ioas = st.ioas_mut(ioas_id)?;
    for (k, _) in hit {
        ioas.areas.remove(k);
    }
    Ok(unmapped)
}

/// The areas an unmap of `[iova, iova + length)` removes: whole areas only (`ENOENT` if the
/// range bisects one or holds none), checked before anything changes. With `allow_all`,
/// `iova = 0, length = u64::MAX` means every area.
fn areas_to_unmap(ioas: &Ioas, iova: u64, length: u64, allow_all: bool) -> Result<Vec<(u64, u64)>, Errno> {
    let all = allow_all && iova == 0 && length == u64::MAX;
    let (start, last) = if all {
        (0, u64::MAX)
    } else {
        if iova == u64::MAX || length == u64::MAX {
            return err(EOVERFLOW, "iova or length at ULONG_MAX");
        }
        if length == 0 {
            return err(EINVAL, "zero length");
        }
        match iova.checked_add(length - 1) {
            Some(l) => (iova, l),
            None => return err(EOVERFLOW, "iova + length wraps"),
        }
    };
    let hit: Vec<(u64, u64)> = ioas.areas_in(start, last).map(|(k, a)| (k, a.length)).collect();
    if hit.is_empty() && !all {
        return err(ENOENT, "no area in the range");
    }
    if hit.iter().any(|&(k, len)| k < start || k + len - 1 > last) {
        return err(ENOENT, "range bisects an area");
    }
    Ok(hit)
}
