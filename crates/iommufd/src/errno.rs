//! `Errno`: a failure whose value is the Linux errno of the same failure.

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
pub(crate) fn err<T>(code: i32, reason: &'static str) -> Result<T, Errno> {
    Err(Errno::new(code, reason))
}

/// The symbolic name of an errno.
pub fn name(code: i32) -> &'static str {
    use iommu::errno::*;
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

impl From<iommu::IommuError> for Errno {
    fn from(e: iommu::IommuError) -> Self {
        let reason = match e {
            iommu::IommuError::Exists { .. } => "overlaps an existing mapping",
            iommu::IommuError::NoDirtyOps => "domain has no dirty-tracking ops",
            iommu::IommuError::NotCapable => "IOMMU lacks dirty tracking",
            iommu::IommuError::TrackingDisabled => "dirty tracking is disabled",
            iommu::IommuError::Unaligned { .. } => "not aligned to the IOMMU page size",
            iommu::IommuError::ZeroLength { .. } => "zero length",
            iommu::IommuError::OutOfRange { .. } => "outside the IOMMU aperture",
            iommu::IommuError::HostRange { .. } => "outside the backing memory",
            iommu::IommuError::NoPermission => "no permission",
        };
        Errno::new(e.errno(), reason)
    }
}
