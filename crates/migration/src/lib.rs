//! The migration engine: the wire protocol (`frame`, `msg`, `pages`; documented in
//! `docs/protocol.md`), the source engine with QEMU's convergence and switchover sequence,
//! the destination, device-write tracking in three modes, and end-to-end verification.
//!
//! It owns nothing of the VM, the devices or the IOMMU: it drives `vmm::Vm`, the `vfio`
//! VMM-side sequence and the iommufd/DMA-logging uAPIs.

pub mod convergence;
pub mod destination;
pub mod dirty_source;
pub mod error;
pub mod frame;
pub mod info;
pub mod msg;
pub mod pages;
pub mod sender;
pub mod source;
pub mod throttle;
pub mod verify;

pub use destination::{receive, DestOptions, DestReport, Incoming};
pub use dirty_source::DeviceTracking;
pub use error::{MigError, WireError};
pub use info::{MigrationInfo, Status};
pub use source::{migrate, MigrationControl, SourceOptions};
