//! Errors of the emulated IOMMU, each carrying the errno Linux returns for the same failure.

use crate::format::FaultReason;

/// Linux errno values used across livemig.
pub mod errno {
    pub const ENOENT: i32 = libc::ENOENT;
    pub const EFAULT: i32 = libc::EFAULT;
    pub const EBUSY: i32 = libc::EBUSY;
    pub const EEXIST: i32 = libc::EEXIST;
    pub const EINVAL: i32 = libc::EINVAL;
    pub const ENOSPC: i32 = libc::ENOSPC;
    pub const ENOMEM: i32 = libc::ENOMEM;
    pub const E2BIG: i32 = libc::E2BIG;
    pub const ENOTTY: i32 = libc::ENOTTY;
    pub const EOPNOTSUPP: i32 = libc::EOPNOTSUPP;
    pub const EOVERFLOW: i32 = libc::EOVERFLOW;
    pub const EMSGSIZE: i32 = libc::EMSGSIZE;
    pub const EADDRINUSE: i32 = libc::EADDRINUSE;
    pub const ENOMSG: i32 = libc::ENOMSG;
    pub const ENODEV: i32 = libc::ENODEV;
    pub const ENXIO: i32 = libc::ENXIO;

    use std::fmt;

    /// A Linux errno, with a short reason for humans. Two `Errno`s are equal when their codes are:
    /// the reason is documentation, the code is the contract.
    #[derive(Clone, Copy, thiserror::Error)]
    #[error("{} ({}): {reason}", name(self.code), self.code)]
    pub struct Errno {
        code: i32,
        reason: &'static str,
    }

    impl Errno {
        pub const fn new(code: i32, reason: &'static str) -> Self {
            Self { code, reason }
        }
        /// The Linux errno value.
        pub const fn code(&self) -> i32 {
            self.code
        }
        pub const fn reason(&self) -> &'static str {
            self.reason
        }
    }

    impl PartialEq for Errno {
        fn eq(&self, other: &Self) -> bool {
            self.code == other.code
        }
    }
    impl Eq for Errno {}

    impl PartialEq<i32> for Errno {
        fn eq(&self, other: &i32) -> bool {
            self.code == *other
        }
    }

    impl fmt::Debug for Errno {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}({})", name(self.code), self.reason)
        }
    }

    /// Shorthand used throughout the crate: `err(EINVAL, "why")`.
    pub fn err<T>(code: i32, reason: &'static str) -> Result<T, Errno> {
        Err(Errno::new(code, reason))
    }

    /// The symbolic name of an errno.
    pub fn name(code: i32) -> &'static str {
        match code {
            ENOENT => "ENOENT",
            EFAULT => "EFAULT",
            EBUSY => "EBUSY",
            EEXIST => "EEXIST",
            EINVAL => "EINVAL",
            ENOSPC => "ENOSPC",
            ENOMEM => "ENOMEM",
            E2BIG => "E2BIG",
            ENOTTY => "ENOTTY",
            EOPNOTSUPP => "EOPNOTSUPP",
            EOVERFLOW => "EOVERFLOW",
            EMSGSIZE => "EMSGSIZE",
            EADDRINUSE => "EADDRINUSE",
            ENOMSG => "ENOMSG",
            ENODEV => "ENODEV",
            ENXIO => "ENXIO",
            _ => "E?",
        }
    }
}

pub use errno::Errno;

impl From<IommuError> for Errno {
    fn from(e: IommuError) -> Self {
        let reason = match e {
            IommuError::Exists { .. } => "overlaps an existing mapping",
            IommuError::NoDirtyOps => "domain has no dirty-tracking ops",
            IommuError::NotCapable => "IOMMU lacks dirty tracking",
            IommuError::TrackingDisabled => "dirty tracking is disabled",
            IommuError::Unaligned { .. } => "not aligned to the IOMMU page size",
            IommuError::ZeroLength { .. } => "zero length",
            IommuError::OutOfRange { .. } => "outside the IOMMU aperture",
            IommuError::HostRange { .. } => "outside the backing memory",
            IommuError::NoPermission => "no permission",
            IommuError::NotNestParent => "parent was not allocated as a nesting parent",
        };
        Errno::new(e.errno(), reason)
    }
}

/// Failures of domain operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    /// IOVA, length or host offset not aligned to 4 KiB.
    #[error("range {iova:#x}+{len:#x} is not aligned to 4 KiB")]
    Unaligned { iova: u64, len: u64 },
    /// Zero-length range.
    #[error("zero-length range at {iova:#x}")]
    ZeroLength { iova: u64 },
    /// Range beyond the 48-bit IOVA space.
    #[error("range {iova:#x}+{len:#x} is outside the 48-bit IOVA space")]
    OutOfRange { iova: u64, len: u64 },
    /// The range overlaps an existing translation.
    #[error("range {iova:#x}+{len:#x} overlaps an existing mapping")]
    Exists { iova: u64, len: u64 },
    /// Host range outside the memory region.
    #[error("host offset {offset:#x}+{len:#x} is outside a region of {size:#x} bytes")]
    HostRange { offset: u64, len: u64, size: u64 },
    /// Neither read nor write permission.
    #[error("a mapping needs read or write permission")]
    NoPermission,
    /// The domain was not allocated for dirty tracking, so it has no dirty ops.
    #[error("domain has no dirty-tracking ops")]
    NoDirtyOps,
    /// Dirty tracking requested from an IOMMU without the capability.
    #[error("IOMMU lacks hardware dirty tracking")]
    NotCapable,
    /// A dirty bitmap was requested while tracking is disabled.
    #[error("dirty tracking is disabled")]
    TrackingDisabled,
    /// A nested domain on a parent not allocated with `NEST_PARENT`.
    #[error("the parent domain was not allocated as a nesting parent")]
    NotNestParent,
}

impl IommuError {
    /// The Linux errno for this failure.
    pub fn errno(&self) -> i32 {
        use errno::*;
        match self {
            IommuError::Exists { .. } => EEXIST,
            IommuError::NoDirtyOps | IommuError::NotCapable => EOPNOTSUPP,
            _ => EINVAL,
        }
    }
}

/// A failed DMA access.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// Translation or permission fault; recorded in the domain's fault log.
    #[error("DMA {} fault at IOVA {iova:#x}: {reason:?}", if *.write { "write" } else { "read" })]
    Fault {
        iova: u64,
        write: bool,
        reason: FaultReason,
    },
    /// The device is no longer attached to the domain.
    #[error("device {device} is detached")]
    Detached { device: u32 },
}

impl DmaError {
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Fault { .. } => errno::EFAULT,
            DmaError::Detached { .. } => errno::ENODEV,
        }
    }
}
