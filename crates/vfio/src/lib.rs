//! VFIO migration v2 for livemig: the device side (the migration state machine and its arc
//! table, data streams with PRECOPY_INFO and MIG_DATA_SIZE, `VFIO_DEVICE_FEATURE`, DMA logging)
//! and the VMM side (QEMU's driving sequence and a tagged stream framing).
//!
//! The facts it follows are in `docs/vfio.md` (the uAPI, the arc table and QEMU's sequence).
//! It owns no device: device models (the `accel` crate) implement [`MigrationDriver`]; it
//! knows nothing of IOMMUs beyond sharing the `Errno` type.

#![forbid(unsafe_code)]

pub mod device;
pub mod dma_log;
pub mod fsm;
pub mod state;
pub mod stream;
pub mod vmm;

pub use device::{
    DataStream, DmaLogging, FeatureArg, FeatureReply, MigrationDevice, MigrationDriver, PrecopyInfo, StreamKind,
};
pub use dma_log::{DmaLog, LogRange, LOG_MAX_RANGES};
pub use fsm::next_state;
pub use state::{MigFlags, MigState};
