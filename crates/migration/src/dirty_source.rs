//! Where device writes come from during migration, in the three modes a VMM can have:
//! the IOMMU's dirty bits (iommufd HWPT), the device's own DMA log, or nothing, in which case
//! every DMA-mapped page counts as dirty at every sync (QEMU's fallback,
//! `docs/vfio.md#tracking-device-writes`). Bits indexed by a device's addresses reach the
//! page bitmap through the VM's [`vmm::DmaSpace`]: the identity without a vIOMMU or behind a
//! nested one, the guest's mappings behind a shadow one (`docs/viommu.md`).

use crate::error::MigError;
use iommufd::{HwptSetDirtyTracking, IommuFd, IOMMU_HWPT_DIRTY_TRACKING_ENABLE};
use std::sync::Arc;
use vfio::{LogRange, MigrationDevice};
use vmm::viommu::{harvest_hwpt, harvest_translated, UnmapLog};
use vmm::{DmaSpace, PageBitmap, Vm};

/// How device writes are tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceTracking {
    /// HWPT dirty tracking (`IOMMU_HWPT_SET_DIRTY_TRACKING`, `IOMMU_HWPT_GET_DIRTY_BITMAP`).
    Iommu,
    /// The device's DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
    DeviceLog,
    /// No tracker: all DMA-mapped memory is dirty at every sync.
    None,
}

impl DeviceTracking {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "iommu" => Some(Self::Iommu),
            "device-log" => Some(Self::DeviceLog),
            "none" => Some(Self::None),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Iommu => "iommu",
            Self::DeviceLog => "device-log",
            Self::None => "none",
        }
    }
}

impl std::fmt::Display for DeviceTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

enum Tracker {
    Iommu {
        fd: Arc<IommuFd>,
        hwpt: u32,
    },
    DeviceLog(MigrationDevice),
    /// Every page of these guest-physical ranges, at every sync.
    Everything(Vec<(u64, u64)>),
}

/// A started device-write tracker: one per IOMMU domain (HWPT dirty bits, or every page in
/// `none` mode), or one per device (DMA logging), each with the address space its bits are
/// indexed by.
pub struct DeviceDirty {
    trackers: Vec<(Tracker, Arc<dyn DmaSpace>)>,
    buf: Vec<u8>,
    running: bool,
}

fn io(op: &'static str) -> impl Fn(iommu::Errno) -> MigError {
    move |errno| MigError::Iommu { op, errno }
}

impl DeviceDirty {
    /// Starts tracking the writes of every device of `vm` in `mode`. A VM without devices
    /// tracks nothing. If one device's tracking fails to start, the ones started are stopped.
    pub fn start(vm: &Vm, mode: DeviceTracking) -> Result<Self, MigError> {
        let mut me = Self {
            trackers: Vec::new(),
            buf: Vec::new(),
            running: true,
        };
        let devices = vm.devices();
        for (i, d) in devices.iter().enumerate() {
            // Devices behind one domain share its dirty bits and its mappings.
            let first_of_domain = !devices[..i].iter().any(|p| p.same_domain(d));
            if !first_of_domain && mode != DeviceTracking::DeviceLog {
                continue;
            }
            let space = d.space.clone();
            let tracker = match mode {
                DeviceTracking::Iommu => {
                    // Unmaps keep their dirt from before tracking starts: no unmap can fall
                    // between the two and take a bit with it.
                    space.set_unmap_log(Some(UnmapLog::Hwpt));
                    let cmd = HwptSetDirtyTracking {
                        flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                        hwpt_id: d.hwpt,
                        __reserved: 0,
                    };
                    if let Err(e) = d.fd.hwpt_set_dirty_tracking(&cmd) {
                        space.set_unmap_log(None);
                        return Err(io("IOMMU_HWPT_SET_DIRTY_TRACKING")(e));
                    }
                    Tracker::Iommu {
                        fd: d.fd.clone(),
                        hwpt: d.hwpt,
                    }
                }
                DeviceTracking::DeviceLog => {
                    let dev = d.migration.clone();
                    let ranges: Vec<LogRange> = space
                        .log_ranges()
                        .map_err(|why| MigError::Other(format!("{}: {why}", d.name)))?
                        .into_iter()
                        .map(|(iova, length)| LogRange { iova, length })
                        .collect();
                    space.set_unmap_log(Some(UnmapLog::Device(dev.clone())));
                    if let Err(e) = dev.dma_logging_start(&ranges, 4096) {
                        space.set_unmap_log(None);
                        return Err(io("DMA_LOGGING_START")(e));
                    }
                    Tracker::DeviceLog(dev)
                }
                DeviceTracking::None => {
                    // Behind a vIOMMU the device may reach any page the guest maps, now or
                    // later: all of RAM.
                    let ranges: Vec<(u64, u64)> = if space.identity() && d.viommu == vmm::ViommuMode::Off {
                        let mut v = Vec::new();
                        space.with_ram_mappings(&mut |m| v = m.iter().map(|&(_, l, g)| (g, l)).collect());
                        v
                    } else {
                        vm.slots().iter().map(|s| (s.gpa, s.size)).collect()
                    };
                    if me
                        .trackers
                        .iter()
                        .any(|(t, _)| matches!(t, Tracker::Everything(r) if *r == ranges))
                    {
                        continue; // the same RAM, already counted whole at every sync
                    }
                    Tracker::Everything(ranges)
                }
            };
            me.trackers.push((tracker, space));
        }
        Ok(me)
    }

    /// Adds the pages devices wrote since the last harvest to `out` (and re-arms tracking).
    pub fn harvest(&mut self, out: &mut PageBitmap) -> Result<(), MigError> {
        for (tracker, space) in &self.trackers {
            match tracker {
                Tracker::Iommu { fd, hwpt } => harvest_hwpt(fd, *hwpt, space.as_ref(), &mut self.buf, out)
                    .map_err(io("IOMMU_HWPT_GET_DIRTY_BITMAP"))?,
                Tracker::DeviceLog(dev) => {
                    harvest_translated(space.as_ref(), &mut self.buf, out, &mut |iova, len, bits| {
                        dev.dma_logging_report(iova, len, 4096, bits)
                    })
                    .map_err(io("DMA_LOGGING_REPORT"))?
                }
                Tracker::Everything(ranges) => {
                    for &(gpa, len) in ranges {
                        out.set_range(gpa / 4096, len / 4096);
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops tracking; safe to call twice, errors are ignored (this runs on failure paths).
    pub fn stop(&mut self) {
        if !std::mem::replace(&mut self.running, false) {
            return;
        }
        for (tracker, space) in &self.trackers {
            space.set_unmap_log(None);
            match tracker {
                Tracker::Iommu { fd, hwpt } => {
                    let _ = fd.hwpt_set_dirty_tracking(&HwptSetDirtyTracking {
                        flags: 0,
                        hwpt_id: *hwpt,
                        __reserved: 0,
                    });
                }
                Tracker::DeviceLog(dev) => {
                    let _ = dev.dma_logging_stop();
                }
                Tracker::Everything(_) => {}
            }
        }
    }
}

impl Drop for DeviceDirty {
    fn drop(&mut self) {
        self.stop();
    }
}
