//! Where device writes come from during migration, in the three modes a VMM can have:
//! the IOMMU's dirty bits (iommufd HWPT), the device's own DMA log, or nothing, in which case
//! every DMA-mapped page counts as dirty at every sync (QEMU's fallback,
//! `docs/vfio.md#tracking-device-writes`).

use crate::error::MigError;
use iommufd::{HwptGetDirtyBitmap, HwptSetDirtyTracking, IommuFd, IOMMU_HWPT_DIRTY_TRACKING_ENABLE};
use std::sync::Arc;
use vfio::{LogRange, MigrationDevice};
use vmm::{PageBitmap, Vm};

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
    Iommu { fd: Arc<IommuFd>, hwpt: u32 },
    DeviceLog(MigrationDevice),
    Everything,
}

/// A started device-write tracker: one per IOMMU domain (HWPT dirty bits, or every page in
/// `none` mode), or one per device (DMA logging).
pub struct DeviceDirty {
    /// Each tracker with its IOAS areas: (iova, length); IOVA = guest-physical address.
    trackers: Vec<(Tracker, Vec<(u64, u64)>)>,
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
            // Guest RAM only: the IOAS also maps peers' windows (device memory, which moves
            // with the device's state, not as pages).
            let in_ram = |iova: u64, len: u64| vm.slots().iter().any(|s| s.gpa <= iova && iova + len <= s.gpa + s.size);
            let areas: Vec<(u64, u64)> =
                d.fd.ioas_areas(d.ioas)
                    .map_err(io("IOAS areas"))?
                    .into_iter()
                    .map(|(i, l, _)| (i, l))
                    .filter(|&(i, l)| in_ram(i, l))
                    .collect();
            if mode == DeviceTracking::None && me.trackers.iter().any(|(_, a)| *a == areas) {
                continue; // the same RAM, already counted whole at every sync
            }
            let tracker = match mode {
                DeviceTracking::Iommu => {
                    let cmd = HwptSetDirtyTracking {
                        flags: IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
                        hwpt_id: d.hwpt,
                        __reserved: 0,
                    };
                    d.fd.hwpt_set_dirty_tracking(&cmd)
                        .map_err(io("IOMMU_HWPT_SET_DIRTY_TRACKING"))?;
                    Tracker::Iommu {
                        fd: d.fd.clone(),
                        hwpt: d.hwpt,
                    }
                }
                DeviceTracking::DeviceLog => {
                    let dev = d.migration.clone();
                    let ranges: Vec<LogRange> = areas.iter().map(|&(iova, length)| LogRange { iova, length }).collect();
                    dev.dma_logging_start(&ranges, 4096).map_err(io("DMA_LOGGING_START"))?;
                    Tracker::DeviceLog(dev)
                }
                DeviceTracking::None => Tracker::Everything,
            };
            me.trackers.push((tracker, areas));
        }
        Ok(me)
    }

    /// Adds the pages devices wrote since the last harvest to `out` (and re-arms tracking).
    pub fn harvest(&mut self, out: &mut PageBitmap) -> Result<(), MigError> {
        for (tracker, areas) in &self.trackers {
            for &(iova, len) in areas {
                let bytes = (len / 4096).div_ceil(8) as usize;
                self.buf.clear();
                self.buf.resize(bytes, 0);
                match tracker {
                    Tracker::Iommu { fd, hwpt } => {
                        let mut cmd = HwptGetDirtyBitmap {
                            hwpt_id: *hwpt,
                            flags: 0,
                            __reserved: 0,
                            iova,
                            length: len,
                            page_size: 4096,
                            data: &mut self.buf,
                        };
                        fd.hwpt_get_dirty_bitmap(&mut cmd)
                            .map_err(io("IOMMU_HWPT_GET_DIRTY_BITMAP"))?;
                    }
                    Tracker::DeviceLog(dev) => {
                        dev.dma_logging_report(iova, len, 4096, &mut self.buf)
                            .map_err(io("DMA_LOGGING_REPORT"))?;
                    }
                    Tracker::Everything => {
                        for p in iova / 4096..(iova + len) / 4096 {
                            out.set(p);
                        }
                        continue;
                    }
                }
                out.set_from_bytes(iova / 4096, &self.buf);
            }
        }
        Ok(())
    }

    /// Stops tracking; safe to call twice, errors are ignored (this runs on failure paths).
    pub fn stop(&mut self) {
        if !std::mem::replace(&mut self.running, false) {
            return;
        }
        for (tracker, _) in &self.trackers {
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
                Tracker::Everything => {}
            }
        }
    }
}

impl Drop for DeviceDirty {
    fn drop(&mut self) {
        self.stop();
    }
}
