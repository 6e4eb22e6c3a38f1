//! Emulated IOMMU hardware with hardware dirty tracking.
//!
//! This crate owns what a real host has in silicon: bit-accurate page tables of three formats
//! (AMD IOMMU v1, Intel VT-d second stage, Arm SMMUv3 stage 1 with HTTU), their capability and
//! per-domain enable registers, one generic walker (map, unmap, translate, read-and-clear-dirty,
//! split, collapse), the DMA path with a bounded IOTLB, Accessed/Dirty updates by atomic
//! compare-exchange and a fault log. The hardware facts it follows (entry bits, registers,
//! IOTLB rules, read-and-clear-dirty semantics) are in `docs/iommu.md`. It also owns nested
//! translation: a guest's stage-1 table (VT-d first stage or Arm stage 1) walked on top of a
//! domain as stage 2, with the guest's invalidation queue (`nested`, `docs/viommu.md`).
//!
//! It does not own the uAPI (IOAS, HWPT objects, errno ordering, bitmaps in user buffers): that
//! is the `iommufd` crate. Nothing here knows about VFIO or migration.
//!
//! ```
//! use iommu::{AnonMemory, Domain, DomainConfig, DirtyBitmap, FormatKind, Perm};
//! use std::sync::Arc;
//!
//! let mem = Arc::new(AnonMemory::new(4 << 20, false).unwrap());
//! let dom = Domain::new(DomainConfig::new(FormatKind::VtdSs)).unwrap();
//! dom.map(0x10_0000, 4 << 20, mem.clone(), 0, Perm::RW).unwrap();
//! dom.set_dirty_tracking(true).unwrap();
//! let dma = dom.attach(1);
//! dma.write(0x10_3000, b"hello").unwrap();
//! let mut found = Vec::new();
//! let mut rec = |iova, len| found.push((iova, len));
//! dom.read_and_clear_dirty(0x10_0000, 4 << 20, 0, &mut DirtyBitmap { bitmap: Some(&mut rec), gather: None }).unwrap();
//! assert_eq!(found, vec![(0x10_3000, 0x1000)]);
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(feature = "bench")]
pub mod bench_kit;
pub mod dma;
pub mod domain;
pub mod error;
pub mod fault;
pub mod format;
pub mod iotlb;
pub mod mem;
pub mod nested;
pub mod vm_memory_iommu;
mod walker;

pub use dma::Dma;
pub use domain::{Domain, DomainConfig, SplitPolicy};
pub use error::{errno, DmaError, Errno, IommuError};
pub use fault::Fault;
pub use format::{FaultReason, FormatKind, Perm, PAGE_SIZE};
pub use mem::{AnonMemory, HostMemory};
pub use nested::stage1::Stage1Kind;
pub use nested::{NestedConfig, NestedDomain};
pub use walker::{DirtyBitmap, HarvestParallelism, IotlbGather, RecordDirty, DIRTY_NO_CLEAR};
