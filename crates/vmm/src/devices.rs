//! The VM's DMA-capable devices: how they are described, attached behind the emulated IOMMU,
//! and shown to a migration engine, which sees only their VFIO migration interface and the
//! IOMMU objects their writes are tracked by (docs/vmm.md#devices).

use crate::layout::{accel_mmio, peer_window, viommu_area, viommu_mmio, MAX_DEVICES, VIOMMU_IOVA};
use crate::mmio::MmioBus;
use crate::viommu::{DmaSpace, IdentitySpace, NestedViommu, ShadowViommu, ViommuMode};
use crate::VmError;
use accel::{Accel, AccelConfig};
use iommu::mem::GuestRamRegion;
use iommu::{Errno, FormatKind, HostMemory};
use iommufd::*;
use std::sync::Arc;
use vfio::{MigFlags, MigrationDevice};
use vm_memory::GuestMemoryMmap;

/// One accelerator and the IOMMU in front of it.
#[derive(Clone, Debug)]
pub struct AccelSetup {
    pub format: FormatKind,
    pub config: AccelConfig,
    /// Allocate the HWPT with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
    pub dirty_tracking: bool,
    /// Use livemig's eager split/collapse policy on that HWPT.
    pub eager_split: bool,
    /// Allow huge IOMMU leaves.
    pub huge_pages: bool,
    /// The guest's own IOMMU in front of the device, if any (`docs/viommu.md`).
    pub viommu: ViommuMode,
}

impl Default for AccelSetup {
    fn default() -> Self {
        Self {
            format: FormatKind::VtdSs,
            config: AccelConfig::default(),
            dirty_tracking: true,
            eager_split: false,
            huge_pages: true,
            viommu: ViommuMode::Off,
        }
    }
}

/// A device as a migration engine sees it: its VFIO migration interface (save and load
/// streams, migration flags, the P2P and STOP states, DMA logging) and the iommufd objects
/// its DMA goes through (for HWPT dirty tracking). Devices that share an IOMMU domain share
/// `fd`, `ioas` and `hwpt`. `hwpt` is the paging HWPT whose dirty bits count: with a nested
/// vIOMMU, the stage-2 parent (indexed by GPA); with a shadow one, the HWPT the guest's
/// mappings are in (indexed by IOVA: `space` translates).
#[derive(Clone)]
pub struct AttachedDevice {
    pub name: String,
    pub migration: MigrationDevice,
    pub fd: Arc<IommuFd>,
    pub ioas: u32,
    pub hwpt: u32,
    /// The device's iommufd device id.
    pub dev: u32,
    pub viommu: ViommuMode,
    /// How the device's addresses lead to guest RAM.
    pub space: Arc<dyn DmaSpace>,
    pub(crate) accel: Arc<Accel>,
    pub(crate) shadow: Option<Arc<ShadowViommu>>,
    /// The vIOMMU's registers and tables that migrate with the vCPUs.
    pub(crate) viommu_state: Option<Arc<dyn crate::viommu::ViommuState>>,
}

impl AttachedDevice {
    /// Whether `self` and `other` are behind the same HWPT (one dirty bitmap serves both).
    pub fn same_domain(&self, other: &AttachedDevice) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd) && self.hwpt == other.hwpt
    }

    /// What the device's peer window holds now (the bytes peers wrote there by DMA).
    pub fn peer_window(&self) -> Vec<u8> {
        self.accel.peer_window_bytes()
    }

    /// Jobs the device has completed so far.
    pub fn jobs_done(&self) -> u64 {
        self.accel.jobs_done()
    }

    /// Sabotage for tests: the shadow vIOMMU's unmaps stop reading the dirty bits of what
    /// they remove, so device writes just before an unmap are lost. No effect otherwise.
    #[doc(hidden)]
    pub fn sabotage_skip_unmap_dirty(&self, on: bool) {
        if let Some(s) = &self.shadow {
            s.sabotage_skip_unmap_dirty(on);
        }
    }

    /// Sabotage for tests: the shadow vIOMMU reports its mappings as if IOVA were GPA, so the
    /// HWPT's bits are merged untranslated. No effect otherwise.
    #[doc(hidden)]
    pub fn sabotage_skip_translation(&self, on: bool) {
        if let Some(s) = &self.shadow {
            s.sabotage_skip_translation(on);
        }
    }
}

/// The devices of a VM as its configuration lists them.
#[derive(Clone, Debug, Default)]
pub struct DeviceSet {
    pub accels: Vec<AccelSetup>,
    /// All devices behind one IOMMU domain (one HWPT) instead of one each. Their formats and
    /// page-size options must then agree.
    pub shared_domain: bool,
}

impl DeviceSet {
    /// One accelerator with `setup`.
    pub fn one(setup: AccelSetup) -> Self {
        Self {
            accels: vec![setup],
            shared_domain: false,
        }
    }

    pub fn check(&self) -> Result<(), VmError> {
        if self.accels.len() > MAX_DEVICES as usize {
            return Err(VmError::Config(format!(
                "{} devices asked for; the layout has room for {MAX_DEVICES}",
                self.accels.len()
            )));
        }
        for a in &self.accels {
            if a.config.qp_num == 0 || a.config.qp_num > 64 {
                return Err(VmError::Config("device queue count must be 1 to 64".into()));
            }
            if !MigFlags::DEFINED.contains(&a.config.flags) {
                return Err(VmError::Config(format!(
                    "device migration flags {:#x} are not a defined set",
                    a.config.flags.bits()
                )));
            }
        }
        // A device without P2P can only go from running to stopped, so it must be the last to
        // stop that may still write to a peer: with two of them, the first to stop could miss
        // the other's writes (docs/vfio.md#several-devices).
        let no_p2p = self
            .accels
            .iter()
            .filter(|a| !a.config.flags.contains(MigFlags::P2P))
            .count();
        if self.accels.len() > 1 && no_p2p > 1 {
            return Err(VmError::Config(format!(
                "{no_p2p} devices without P2P: with several devices, at most one may lack it"
            )));
        }
        if self.accels.len() > 1 && self.accels.iter().any(|a| a.viommu != ViommuMode::Off) {
            return Err(VmError::Config(
                "a vIOMMU is modelled for a VM with one device (its peer windows are not in the guest's IOVA space)"
                    .into(),
            ));
        }
        if self.shared_domain {
            if let Some(first) = self.accels.first() {
                let key = |a: &AccelSetup| (a.format, a.huge_pages, a.dirty_tracking, a.eager_split);
                if self.accels.iter().any(|a| key(a) != key(first)) {
                    return Err(VmError::Config(
                        "devices sharing one IOMMU domain must have the same format, page sizes and tracking".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The set as bytes, for a migration destination to rebuild it from (`decode`).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![WIRE_VERSION, self.shared_domain as u8, self.accels.len() as u8];
        for a in &self.accels {
            let format = FormatKind::ALL.iter().position(|k| *k == a.format).unwrap_or(0) as u8;
            b.push(format);
            b.push(a.huge_pages as u8);
            b.push(a.viommu.register() as u8);
            let c = &a.config;
            for v in [c.flags.bits() as u32, c.qp_num, c.dev_id, c.que_iso_cfg, c.qp_base] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.push(c.dma_logging as u8);
        }
        b
    }

    /// Reads `encode`'s bytes, as a destination builds them: every HWPT with dirty tracking
    /// (so that this VM can migrate on), the default split policy, and `dev_id` when this
    /// host's accelerators carry another identity. Refuses what `check` refuses.
    pub fn decode(b: &[u8], dev_id: Option<u32>) -> Result<Self, String> {
        let mut cut = Cut(b);
        let mut take = |n: usize| cut.take(n);
        let head = take(3)?;
        if head[0] != WIRE_VERSION {
            return Err(format!(
                "device list version {} (this VMM reads {WIRE_VERSION})",
                head[0]
            ));
        }
        let (shared, n) = (head[1], head[2]);
        if shared > 1 || n as u32 > MAX_DEVICES {
            return Err(format!(
                "a device list of {n} devices (at most {MAX_DEVICES}), shared {shared}"
            ));
        }
        let mut accels = Vec::new();
        for _ in 0..n {
            let h = take(3)?;
            let format = *FormatKind::ALL
                .get(h[0] as usize)
                .ok_or_else(|| format!("unknown IOMMU format {}", h[0]))?;
            let huge = match h[1] {
                0 | 1 => h[1] == 1,
                v => return Err(format!("huge-page flag {v}")),
            };
            let viommu = *ViommuMode::ALL
                .get(h[2] as usize)
                .ok_or_else(|| format!("unknown vIOMMU mode {}", h[2]))?;
            let w = take(20)?;
            let u = |i: usize| u32::from_le_bytes(w[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            let dma_logging = match take(1)?[0] {
                0 => false,
                1 => true,
                v => return Err(format!("DMA-logging flag {v}")),
            };
            accels.push(AccelSetup {
                format,
                config: AccelConfig {
                    flags: MigFlags(u(0) as u64),
                    qp_num: u(1),
                    dev_id: dev_id.unwrap_or(u(2)),
                    que_iso_cfg: u(3),
                    qp_base: u(4),
                    dma_logging,
                },
                dirty_tracking: true,
                eager_split: false,
                huge_pages: huge,
                viommu,
            });
        }
        if !cut.0.is_empty() {
            return Err("bytes after the device list".into());
        }
        let set = Self {
            accels,
            shared_domain: shared == 1,
        };
        set.check().map_err(|e| e.to_string())?;
        Ok(set)
    }
}

const WIRE_VERSION: u8 = 2;

/// The unread rest of an encoded device list.
struct Cut<'a>(&'a [u8]);

impl<'a> Cut<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let Some((h, t)) = self.0.split_at_checked(n) else {
            return Err("the device list is cut short".into());
        };
        self.0 = t;
        Ok(h)
    }
}

/// Allocates the IOMMU objects of device `idx` (or joins the first device's domain), maps
/// guest RAM into its IOAS at IOVA = GPA around the device's reserved regions, and puts its
/// registers on the MMIO bus at [`accel_mmio`]`(idx)`.
///
/// The device is attached before anything is mapped, as a VMM on iommufd does, so the IOAS
/// knows the device's reserved regions (the x86 interrupt window, the Arm SMMU's software
/// MSI window at 128 MiB) and RAM is mapped only in the ranges `IOMMU_IOAS_IOVA_RANGES`
/// allows. Guest RAM inside a reserved region stays CPU-only: a DMA there faults, as it
/// would on real hardware (the guest programs never DMA there; see `layout`).
pub(crate) fn attach(
    idx: u32,
    a: &AccelSetup,
    join: Option<&AttachedDevice>,
    mem: &Arc<GuestMemoryMmap>,
    slots: &[crate::Slot],
    bus: &MmioBus,
    dirty: &Arc<crate::dirty::CpuDirty>,
) -> Result<AttachedDevice, VmError> {
    let io = |what: &'static str| move |e: Errno| VmError::Iommu { what, errno: e };
    let name = format!("accel{idx}");
    let mut spec = DeviceSpec::new(&name, a.format);
    spec.huge_iova = a.huge_pages;
    let (fd, ioas, dev, hwpt) = if let Some(first) = join {
        let dev = first.fd.bind_device(spec);
        first
            .fd
            .attach(dev, first.hwpt)
            .map_err(io("ATTACH to the shared HWPT"))?;
        (first.fd.clone(), first.ioas, dev, first.hwpt)
    } else {
        let fd = Arc::new(IommuFd::new());
        let mut alloc = IoasAlloc::default();
        fd.ioas_alloc(&mut alloc).map_err(io("IOAS_ALLOC"))?;
        let ioas = alloc.out_ioas_id;
        if !a.huge_pages {
            let mut o = IommuOption {
                option_id: IOMMU_OPTION_HUGE_PAGES,
                op: IOMMU_OPTION_OP_SET,
                object_id: ioas,
                ..Default::default()
            };
            fd.option(&mut o).map_err(io("OPTION HUGE_PAGES"))?;
        }
        let dev = fd.bind_device(spec);
        let mut flags = 0;
        if a.dirty_tracking {
            flags |= IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
        }
        if a.eager_split {
            flags |= LIVEMIG_HWPT_ALLOC_EAGER_SPLIT;
        }
        if a.viommu == ViommuMode::Nested {
            flags |= IOMMU_HWPT_ALLOC_NEST_PARENT;
        }
        let mut h = HwptAlloc {
            flags,
            dev_id: dev,
            pt_id: ioas,
            ..Default::default()
        };
        fd.hwpt_alloc(&mut h).map_err(io("HWPT_ALLOC"))?;
        fd.attach(dev, h.out_hwpt_id).map_err(io("ATTACH"))?;
        // With a shadow vIOMMU the guest maps what the device may reach; otherwise all RAM.
        if a.viommu != ViommuMode::Shadow {
            map_ram(&fd, ioas, mem, slots)?;
        }
        (fd, ioas, dev, h.out_hwpt_id)
    };
    let mut shadow = None;
    let mut viommu_state: Option<Arc<dyn crate::viommu::ViommuState>> = None;
    let space: Arc<dyn DmaSpace> = match a.viommu {
        ViommuMode::Off => Arc::new(IdentitySpace {
            fd: fd.clone(),
            ioas,
            slots: slots.to_vec(),
            nested: false,
        }),
        ViommuMode::Nested => {
            let nested = attach_nested(&fd, dev, hwpt, idx, mem)?;
            let v = Arc::new(NestedViommu::new(fd.clone(), nested, mem.clone(), dirty.clone()));
            viommu_state = Some(v.clone());
            if !bus.register(viommu_mmio(idx), crate::viommu::MMIO_SIZE, v) {
                return Err(VmError::Internal("MMIO range taken"));
            }
            Arc::new(IdentitySpace {
                fd: fd.clone(),
                ioas,
                slots: slots.to_vec(),
                nested: true,
            })
        }
        ViommuMode::Shadow => {
            let ram = register_ram(&fd, mem, slots)?;
            let v = Arc::new(ShadowViommu::new(fd.clone(), ioas, mem.clone(), ram, dirty.clone()));
            if !bus.register(viommu_mmio(idx), crate::viommu::MMIO_SIZE, v.clone()) {
                return Err(VmError::Internal("MMIO range taken"));
            }
            shadow = Some(v.clone());
            viommu_state = Some(v.clone());
            v
        }
    };
    let dma = fd.device_dma(dev).map_err(io("device DMA"))?;
    let accel = Arc::new(Accel::new(a.config.clone(), dma).map_err(io("accel"))?);
    if !bus.register(accel_mmio(idx), accel::regs::MMIO_SIZE, accel.clone()) {
        return Err(VmError::Internal("MMIO range taken"));
    }
    Ok(AttachedDevice {
        name,
        migration: accel.migration().clone(),
        fd,
        ioas,
        hwpt,
        dev,
        viommu: a.viommu,
        space,
        accel,
        shadow,
        viommu_state,
    })
}

/// The nested design's host side: the guest firmware's stage-1 tables in its vIOMMU area, a
/// nested HWPT on `parent` pointing at them (`IOMMU_HWPT_DATA_VTD_S1`), and the device
/// attached to it. Returns the nested HWPT.
fn attach_nested(
    fd: &Arc<IommuFd>,
    dev: u32,
    parent: u32,
    idx: u32,
    mem: &Arc<GuestMemoryMmap>,
) -> Result<u32, VmError> {
    let io = |what: &'static str| move |e: Errno| VmError::Iommu { what, errno: e };
    let base = viommu_area(idx);
    NestedViommu::write_firmware_tables(mem, base, VIOMMU_IOVA).map_err(VmError::Memory)?;
    let data = VtdS1 {
        flags: 0,
        pgtbl_addr: base + crate::viommu::area::S1,
        addr_width: 48,
        __reserved: 0,
    }
    .to_bytes();
    // The driver data goes through user memory, as a pointer in the ioctl does.
    let buf = Arc::new(iommu::AnonMemory::new(4096, false).map_err(|e| VmError::Memory(e.to_string()))?);
    buf.write(0, &data);
    let va = fd.register_user_memory(buf.clone() as Arc<dyn HostMemory>);
    let mut h = HwptAlloc {
        dev_id: dev,
        pt_id: parent,
        data_type: IOMMU_HWPT_DATA_VTD_S1,
        data_len: data.len() as u32,
        data_uptr: va,
        ..Default::default()
    };
    let r = fd.hwpt_alloc(&mut h);
    fd.user_memory().unregister(va);
    r.map_err(io("HWPT_ALLOC of the nested HWPT"))?;
    fd.attach(dev, h.out_hwpt_id).map_err(io("ATTACH to the nested HWPT"))?;
    Ok(h.out_hwpt_id)
}

/// Registers every RAM slot as user memory: (gpa, size, user va).
fn register_ram(
    fd: &IommuFd,
    mem: &Arc<GuestMemoryMmap>,
    slots: &[crate::Slot],
) -> Result<Vec<(u64, u64, u64)>, VmError> {
    slots
        .iter()
        .map(|s| {
            let region = GuestRamRegion::new(mem.clone(), s.gpa).ok_or(VmError::Internal("guest RAM region"))?;
            let va = fd.register_user_memory(Arc::new(region) as Arc<dyn HostMemory>);
            Ok((s.gpa, s.size, va))
        })
        .collect()
}

/// Peer-to-peer: maps every device's peer window into the IOAS of every other device, at the
/// window's guest-physical address (its register block's [`accel_mmio`] + `PEER_WINDOW`), as
/// a VMM on VFIO maps the devices' BARs into the container. A job of one device can then
/// write another's window, as real P2P DMA does. Devices that share a domain share one IOAS:
/// each window is mapped there once.
pub(crate) fn map_peer_windows(devices: &[AttachedDevice]) -> Result<(), VmError> {
    let io = |what: &'static str| move |e: Errno| VmError::Iommu { what, errno: e };
    let mut mapped: Vec<(*const IommuFd, u32, usize)> = Vec::new();
    for d in devices {
        for (j, peer) in devices.iter().enumerate() {
            let key = (Arc::as_ptr(&d.fd), d.ioas, j);
            if std::ptr::eq(d, peer) || mapped.contains(&key) {
                continue;
            }
            mapped.push(key);
            let va = d.fd.register_user_memory(peer.accel.peer_window());
            let mut m = IoasMap {
                flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
                ioas_id: d.ioas,
                user_va: va,
                length: accel::regs::PEER_WINDOW_SIZE,
                iova: peer_window(j as u32),
                ..Default::default()
            };
            d.fd.ioas_map(&mut m).map_err(io("IOAS_MAP of a peer window"))?;
        }
    }
    Ok(())
}

/// Maps every RAM slot into `ioas` at IOVA = GPA, inside the ranges the IOAS allows.
fn map_ram(fd: &IommuFd, ioas: u32, mem: &Arc<GuestMemoryMmap>, slots: &[crate::Slot]) -> Result<(), VmError> {
    let io = |what: &'static str| move |e: Errno| VmError::Iommu { what, errno: e };
    let allowed = allowed_iovas(fd, ioas).map_err(io("IOAS_IOVA_RANGES"))?;
    for s in slots {
        let region = GuestRamRegion::new(mem.clone(), s.gpa).ok_or(VmError::Internal("guest RAM region"))?;
        let va = fd.register_user_memory(Arc::new(region) as Arc<dyn HostMemory>);
        for (start, end) in clip(s.gpa, s.gpa + s.size, &allowed) {
            let mut m = IoasMap {
                flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
                ioas_id: ioas,
                user_va: va + (start - s.gpa),
                length: end - start,
                iova: start,
                ..Default::default()
            };
            fd.ioas_map(&mut m).map_err(io("IOAS_MAP"))?;
        }
    }
    Ok(())
}

/// The IOVA ranges an IOAS allows, as half-open `(start, end)` pairs.
fn allowed_iovas(fd: &IommuFd, ioas: u32) -> Result<Vec<(u64, u64)>, Errno> {
    let mut ranges = vec![IovaRange::default(); 16];
    let mut cmd = IoasIovaRanges {
        ioas_id: ioas,
        num_iovas: ranges.len() as u32,
        __reserved: 0,
        allowed_iovas: &mut ranges,
        out_iova_alignment: 0,
    };
    fd.ioas_iova_ranges(&mut cmd)?;
    let n = cmd.num_iovas as usize;
    Ok(ranges[..n]
        .iter()
        .map(|r| (r.start, r.last.saturating_add(1)))
        .collect())
}

/// The parts of `[start, end)` inside `allowed` (half-open, sorted, disjoint).
fn clip(start: u64, end: u64, allowed: &[(u64, u64)]) -> Vec<(u64, u64)> {
    allowed
        .iter()
        .filter_map(|&(a, b)| {
            let (s, e) = (start.max(a), end.min(b));
            (s < e).then_some((s, e))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> DeviceSet {
        let mut a = AccelSetup::default();
        a.config.dev_id = 7;
        a.config.qp_base = 3;
        DeviceSet {
            accels: vec![a; n],
            shared_domain: n > 1,
        }
    }

    #[test]
    fn the_wire_form_round_trips() {
        for n in 0..=MAX_DEVICES as usize {
            let s = set(n);
            let back = DeviceSet::decode(&s.encode(), None).expect("decodes");
            assert_eq!(back.encode(), s.encode());
            assert_eq!(back.accels.len(), n);
        }
        let back = DeviceSet::decode(&set(2).encode(), Some(9)).expect("decodes");
        assert!(back.accels.iter().all(|a| a.config.dev_id == 9));
    }

    #[test]
    fn several_devices_need_p2p_on_all_but_one() {
        let mut s = set(3);
        s.shared_domain = false;
        s.check().expect("all with P2P");
        s.accels[1].config.flags = MigFlags::STOP_COPY;
        s.check().expect("one without P2P stops first");
        s.accels[2].config.flags = MigFlags::STOP_COPY | MigFlags::PRE_COPY;
        assert!(s.check().unwrap_err().to_string().contains("2 devices without P2P"));
        // A device alone needs no peer protocol.
        let mut one = set(1);
        one.accels[0].config.flags = MigFlags::STOP_COPY;
        one.check().expect("one device");
    }

    #[test]
    fn every_cut_or_extended_list_is_refused() {
        let b = set(2).encode();
        for n in 0..b.len() {
            assert!(DeviceSet::decode(&b[..n], None).is_err(), "cut at {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(DeviceSet::decode(&long, None).is_err());
        let mut many = b;
        many[2] = MAX_DEVICES as u8 + 1;
        assert!(DeviceSet::decode(&many, None).unwrap_err().contains("at most"));
    }
}
