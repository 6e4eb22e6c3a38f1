//! The process address space as iommufd sees it: `user_va` values resolve to registered
//! memory, the way `pin_user_pages` resolves them to pages. An address nothing backs is
//! `EFAULT`, as a failed pin is.

use iommu::HostMemory;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Registered user memory, keyed by start address.
#[derive(Default)]
pub struct UserMemory {
    regions: RwLock<BTreeMap<u64, Arc<dyn HostMemory>>>,
}

impl UserMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `mem` addressable and returns its user address (its real address here).
    pub fn register(&self, mem: Arc<dyn HostMemory>) -> u64 {
        let va = mem.host_ptr() as u64;
        self.regions.write().unwrap_or_else(|e| e.into_inner()).insert(va, mem);
        va
    }

    /// Forgets the region starting at `va`. Mappings keep what they already pinned.
    pub fn unregister(&self, va: u64) -> bool {
        self.regions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&va)
            .is_some()
    }

    /// The region holding all of `[va, va + len)` and the offset of `va` in it.
    pub fn resolve(&self, va: u64, len: u64) -> Option<(Arc<dyn HostMemory>, u64)> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let (&start, mem) = regions.range(..=va).next_back()?;
        let off = va - start;
        (off.checked_add(len)? <= mem.size() as u64).then(|| (mem.clone(), off))
    }
}
