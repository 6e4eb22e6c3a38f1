//! The iommufd object model and its dirty-tracking uAPI, over the emulated IOMMU.
//!
//! This crate owns what Linux's `drivers/iommu/iommufd` owns: IOAS, HWPT and device objects
//! with ids, one method per ioctl taking and returning structs that mirror the uAPI, the
//! checks in Linux's order with Linux's errnos (`docs/iommufd.md`), dirty bitmaps written
//! straight into caller-owned buffers in bounded windows, and a VFIO type1 container for
//! comparison. It does not own page-table formats or DMA (the `iommu` crate) and knows
//! nothing of VFIO migration.

#![forbid(unsafe_code)]

#[cfg(feature = "bench")]
pub mod bench_kit;
pub mod bitmap;
pub mod errno;
mod ictx;
pub mod ioas;
pub mod ioctl;
pub mod type1;
pub mod uapi;
pub mod user_memory;

pub use errno::Errno;
pub use ictx::{DeviceSpec, IommuFd};
pub use type1::Type1Container;
pub use uapi::*;
