//! An accelerator modelled on HiSilicon's QM queue manager: a DMA-capable device whose writes
//! are what IOMMU dirty tracking has to catch.
//!
//! It owns the register block (see [`regs`] for the map), queue pairs of submission and
//! completion rings in guest memory, a worker thread that runs COPY, CRC32C, LZ4 COMPRESS and
//! DECOMPRESS, and FILL jobs with every byte through an `iommu::Dma` handle, device-side DMA
//! logging, and a VFIO migration v2 driver (`docs/accel.md`) with the hisi-style
//! match prefix. It knows nothing of KVM or of how the VMM maps its registers.

#![forbid(unsafe_code)]

pub mod client;
pub mod device;
mod jobs;
pub mod migration;
pub mod regs;

pub use device::{Accel, AccelConfig, Queue, Regs};
