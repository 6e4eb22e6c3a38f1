//! `Errno` lives in `iommu::errno` so every layer shares it; this module re-exports it.

pub use iommu::errno::{err, name, Errno};
