//! The device side of VFIO migration v2: a framework that walks multi-step transitions through
//! single-step arcs a driver implements, owns the data streams, and answers
//! `VFIO_DEVICE_FEATURE` (Linux: drivers/vfio/vfio_main.c, include/linux/vfio.h,
//! drivers/vfio/pci/vfio_pci_core.c).

use crate::dma_log::{validate_ranges, LogRange};
use crate::fsm::next_state;
use crate::state::{MigFlags, MigState};
use iommu::errno::*;
use iommu::Errno;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which stream an arc opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// Read-only stream of the device's state (RUNNING→PRE_COPY, RUNNING_P2P→PRE_COPY_P2P,
    /// STOP→STOP_COPY).
    Save,
    /// Write-only stream into a RESUMING device (STOP→RESUMING).
    Resume,
}

/// `struct vfio_precopy_info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    pub initial_bytes: u64,
    pub dirty_bytes: u64,
}

/// What a device model implements. Every method runs under the device's state lock.
pub trait MigrationDriver: Send + 'static {
    /// `VFIO_MIGRATION_*` flags; must be one of the defined combinations.
    fn migration_flags(&self) -> MigFlags;
    /// Performs the single-step arc `from → to`. Returns the stream it opens, if any.
    fn step(&mut self, from: MigState, to: MigState) -> Result<Option<StreamKind>, Errno>;
    /// The state the device is in after `step(from, to)` failed: `from` unless the device
    /// broke (then `MigState::Error`).
    fn failed_state(&self, from: MigState, _to: MigState) -> MigState {
        from
    }
    /// Next bytes of the save stream. `Ok(0)`: nothing now in pre-copy, the end in STOP_COPY.
    fn save_read(&mut self, state: MigState, buf: &mut [u8]) -> Result<usize, Errno>;
    /// Bytes for the resume stream, in any chunking.
    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, Errno>;
    /// `VFIO_MIG_GET_PRECOPY_INFO` (pre-copy states only; the framework checks).
    fn precopy_info(&mut self) -> PrecopyInfo;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: expected STOP_COPY length.
    fn stop_copy_size(&mut self) -> Result<u64, Errno>;
    /// `VFIO_DEVICE_RESET`: back to running, whatever the state.
    fn reset(&mut self);
    /// Device-side DMA logging (`log_ops`), if the device has it.
    fn dma_logging(&mut self) -> Option<&mut dyn DmaLogging> {
        None
    }
}

/// `struct vfio_log_ops`.
pub trait DmaLogging {
    /// Starts logging; may raise `page_size`.
    fn log_start(&mut self, ranges: &[LogRange], page_size: &mut u64) -> Result<(), Errno>;
    fn log_stop(&mut self) -> Result<(), Errno>;
    /// Reads and clears the pages written in `[iova, iova + length)` into `bitmap`.
    fn log_read_and_clear(&mut self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u8]) -> Result<(), Errno>;
}

struct Inner {
    driver: Box<dyn MigrationDriver>,
    state: MigState,
    /// The open stream: its id and kind.
    stream: Option<(u64, StreamKind)>,
    next_stream: u64,
}

/// A migratable device: a driver behind the migration framework. Cloning shares the device.
#[derive(Clone)]
pub struct MigrationDevice {
    inner: Arc<Mutex<Inner>>,
    name: Arc<str>,
}

impl std::fmt::Debug for MigrationDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MigrationDevice({})", self.name)
    }
}

impl MigrationDevice {
    /// Registers a driver (`vfio_pci_core_register_device`): its flags must include STOP_COPY
    /// and be a defined combination.
    pub fn new(name: &str, driver: impl MigrationDriver) -> Result<Self, Errno> {
        if !MigFlags::DEFINED.contains(&driver.migration_flags()) {
            return err(EINVAL, "migration flags must be a defined combination with STOP_COPY");
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                driver: Box::new(driver),
                state: MigState::Running,
                stream: None,
                next_stream: 1,
            })),
            name: name.into(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn migration_flags(&self) -> MigFlags {
        self.lock().driver.migration_flags()
    }

    /// `MIG_DEVICE_STATE` GET.
    pub fn get_state(&self) -> MigState {
        self.lock().state
    }

    /// `MIG_DEVICE_STATE` SET: walks the path one arc at a time under the state lock. Only the
    /// final arc may open a stream, which is returned. On failure the device is in the
    /// original state, a state on the path, or ERROR.
    pub fn set_state(&self, new: MigState) -> Result<Option<DataStream>, Errno> {
        let mut g = self.lock();
        let flags = g.driver.migration_flags();
        let mut opened = None;
        while g.state != new {
            let cur = g.state;
            let next = next_state(cur, new, flags)?;
            let kind = match g.driver.step(cur, next) {
                Ok(k) => k,
                Err(e) => {
                    let after = g.driver.failed_state(cur, next);
                    g.state = after;
                    if !after.has_stream() {
                        g.stream = None;
                    }
                    return Err(e);
                }
            };
            g.state = next;
            if !next.has_stream() {
                g.stream = None;
            }
            if let Some(kind) = kind {
                let id = g.next_stream;
                g.next_stream += 1;
                g.stream = Some((id, kind));
                if next != new {
                    // Only the last arc may return a file: Linux closes it and fails.
                    g.stream = None;
                    return err(EINVAL, "an intermediate arc opened a data stream");
                }
                opened = Some(DataStream {
                    dev: self.inner.clone(),
                    id,
                    kind,
                });
            }
        }
        Ok(opened)
    }

    /// `VFIO_DEVICE_RESET`: back to RUNNING from any state (the only way out of ERROR), and
    /// every open stream fails with `ENODEV` from now on.
    pub fn reset(&self) {
        let mut g = self.lock();
        g.driver.reset();
        g.state = MigState::Running;
        g.stream = None;
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` GET.
    pub fn mig_data_size(&self) -> Result<u64, Errno> {
        self.lock().driver.stop_copy_size()
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`, with the core's checks first. Returns the
    /// page size the device chose.
    pub fn dma_logging_start(&self, ranges: &[LogRange], page_size: u64) -> Result<u64, Errno> {
        let mut g = self.lock();
        let Some(log) = g.driver.dma_logging() else {
            return err(ENOTTY, "device has no DMA logging");
        };
        validate_ranges(ranges, page_size)?;
        let mut ps = page_size;
        log.log_start(ranges, &mut ps)?;
        Ok(ps)
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    pub fn dma_logging_stop(&self) -> Result<(), Errno> {
        let mut g = self.lock();
        match g.driver.dma_logging() {
            Some(log) => log.log_stop(),
            None => err(ENOTTY, "device has no DMA logging"),
        }
    }

    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: reads and clears; `page_size` is a power of
    /// two of at least 4 KiB.
    pub fn dma_logging_report(&self, iova: u64, length: u64, page_size: u64, bitmap: &mut [u8]) -> Result<(), Errno> {
        let mut g = self.lock();
        let Some(log) = g.driver.dma_logging() else {
            return err(ENOTTY, "device has no DMA logging");
        };
        if page_size < 4096 || !page_size.is_power_of_two() {
            return err(EINVAL, "page_size must be a power of two of at least 4 KiB");
        }
        if length == 0 || iova.checked_add(length - 1).is_none() {
            return err(EINVAL, "empty or wrapping range");
        }
        log.log_read_and_clear(iova, length, page_size, bitmap)
    }

    /// Whether the device has DMA logging (what QEMU detects with a PROBE).
    pub fn has_dma_logging(&self) -> bool {
        self.lock().driver.dma_logging().is_some()
    }

    /// `VFIO_DEVICE_FEATURE`: `flags` holds the feature number in bits 15:0 and GET (bit 16),
    /// SET (bit 17), PROBE (bit 18); `argsz` is the whole argument's size, 8 bytes of header
    /// plus the payload.
    pub fn feature(&self, flags: u32, argsz: u32, arg: FeatureArg<'_>) -> Result<FeatureReply, Errno> {
        if argsz < 8 {
            return err(EINVAL, "argsz below the header");
        }
        if flags & !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE) != 0 {
            return err(EINVAL, "undefined flag bits");
        }
        if flags & FEATURE_PROBE == 0 && flags & FEATURE_GET != 0 && flags & FEATURE_SET != 0 {
            return err(EINVAL, "GET and SET without PROBE");
        }
        let feature = flags & FEATURE_MASK;
        let (ops, payload) = match feature {
            FEATURE_MIGRATION => (FEATURE_GET, 8),
            FEATURE_MIG_DEVICE_STATE => (FEATURE_GET | FEATURE_SET, 8),
            FEATURE_MIG_DATA_SIZE => (FEATURE_GET, 8),
            FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP | FEATURE_DMA_LOGGING_REPORT => {
                if !self.has_dma_logging() {
                    return err(ENOTTY, "device has no DMA logging");
                }
                match feature {
                    FEATURE_DMA_LOGGING_START => (FEATURE_SET, 24),
                    FEATURE_DMA_LOGGING_STOP => (FEATURE_SET, 0),
                    _ => (FEATURE_GET, 32),
                }
            }
            _ => return err(ENOTTY, "unknown feature"),
        };
        // vfio_check_feature()
        if flags & FEATURE_GET != 0 && ops & FEATURE_GET == 0 {
            return err(EINVAL, "feature has no GET");
        }
        if flags & FEATURE_SET != 0 && ops & FEATURE_SET == 0 {
            return err(EINVAL, "feature has no SET");
        }
        if flags & FEATURE_PROBE != 0 {
            return Ok(FeatureReply::Probed);
        }
        if flags & (FEATURE_GET | FEATURE_SET) == 0 {
            return err(EINVAL, "neither GET nor SET");
        }
        if (argsz as usize) < 8 + payload {
            return err(EINVAL, "argsz short of the payload");
        }
        let get = flags & FEATURE_GET != 0;
        match (feature, arg) {
            (FEATURE_MIGRATION, _) => Ok(FeatureReply::Migration(self.migration_flags())),
            (FEATURE_MIG_DATA_SIZE, _) => Ok(FeatureReply::MigDataSize(self.mig_data_size()?)),
            (FEATURE_MIG_DEVICE_STATE, _) if get => Ok(FeatureReply::MigDeviceState {
                device_state: self.get_state(),
                stream: None,
            }),
            (FEATURE_MIG_DEVICE_STATE, FeatureArg::DeviceState(s)) => {
                let Some(new) = MigState::from_u32(s) else {
                    return err(EINVAL, "no such state");
                };
                let stream = self.set_state(new)?;
                Ok(FeatureReply::MigDeviceState {
                    device_state: new,
                    stream,
                })
            }
            (FEATURE_DMA_LOGGING_START, FeatureArg::LoggingStart { ranges, page_size }) => {
                Ok(FeatureReply::LoggingStarted {
                    page_size: self.dma_logging_start(ranges, page_size)?,
                })
            }
            (FEATURE_DMA_LOGGING_STOP, _) => self.dma_logging_stop().map(|_| FeatureReply::Done),
            (
                FEATURE_DMA_LOGGING_REPORT,
                FeatureArg::LoggingReport {
                    iova,
                    length,
                    page_size,
                    bitmap,
                },
            ) => self
                .dma_logging_report(iova, length, page_size, bitmap)
                .map(|_| FeatureReply::Done),
            _ => err(EINVAL, "payload does not match the feature"),
        }
    }
}

pub const FEATURE_MASK: u32 = 0xffff;
pub const FEATURE_GET: u32 = 1 << 16;
pub const FEATURE_SET: u32 = 1 << 17;
pub const FEATURE_PROBE: u32 = 1 << 18;
pub const FEATURE_MIGRATION: u32 = 1;
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
pub const FEATURE_MIG_DATA_SIZE: u32 = 9;

/// The payload of a `VFIO_DEVICE_FEATURE` call (what follows the header in Linux).
#[derive(Debug, Default)]
pub enum FeatureArg<'a> {
    #[default]
    None,
    /// `struct vfio_device_feature_mig_state.device_state` for SET.
    DeviceState(u32),
    LoggingStart {
        ranges: &'a [LogRange],
        page_size: u64,
    },
    LoggingReport {
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &'a mut [u8],
    },
}

/// What a `VFIO_DEVICE_FEATURE` call returns.
#[derive(Debug)]
pub enum FeatureReply {
    /// PROBE: the feature and operation are supported.
    Probed,
    Migration(MigFlags),
    /// `data_fd` is the stream when the transition opened one.
    MigDeviceState {
        device_state: MigState,
        stream: Option<DataStream>,
    },
    MigDataSize(u64),
    LoggingStarted {
        page_size: u64,
    },
    Done,
}

/// A migration data stream (the `data_fd` of Linux). Valid until the device leaves the
/// stream's states or is reset; after that every call fails with `ENODEV`.
pub struct DataStream {
    dev: Arc<Mutex<Inner>>,
    id: u64,
    kind: StreamKind,
}

impl std::fmt::Debug for DataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataStream({}, {:?})", self.id, self.kind)
    }
}

impl DataStream {
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, Errno> {
        let g = self.dev.lock().unwrap_or_else(|e| e.into_inner());
        if g.stream.map(|s| s.0) != Some(self.id) {
            return err(ENODEV, "stream closed by a transition or a reset");
        }
        Ok(g)
    }

    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    /// Whether the stream is still open.
    pub fn is_open(&self) -> bool {
        self.lock().is_ok()
    }

    /// `read()`: in a pre-copy state `ENOMSG` means "nothing for now"; in STOP_COPY `Ok(0)` is
    /// the true end.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        let mut g = self.lock()?;
        if self.kind != StreamKind::Save {
            return err(EINVAL, "not a save stream");
        }
        let state = g.state;
        let n = g.driver.save_read(state, buf)?;
        if n == 0 && state.is_precopy() && !buf.is_empty() {
            return err(ENOMSG, "no pre-copy data for now");
        }
        Ok(n)
    }

    /// `write()` into a RESUMING device.
    pub fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        let mut g = self.lock()?;
        if self.kind != StreamKind::Resume {
            return err(EINVAL, "not a resume stream");
        }
        g.driver.resume_write(buf)
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO`: `EINVAL` outside the pre-copy states.
    pub fn precopy_info(&self) -> Result<PrecopyInfo, Errno> {
        let mut g = self.lock()?;
        if self.kind != StreamKind::Save || !g.state.is_precopy() {
            return err(EINVAL, "not in a pre-copy state");
        }
        Ok(g.driver.precopy_info())
    }
}
