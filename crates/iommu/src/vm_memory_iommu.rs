//! vm-memory's `iommu` feature, backed by a livemig domain.
//!
//! [`DomainIommu`] implements [`vm_memory::Iommu`], so a device model written against
//! vm-memory's `Bytes` API (through [`vm_memory::IommuMemory`]) can DMA through a livemig
//! domain. The PTE dirty bits stay the single source of truth:
//! * `translate` receives the access type, so a write translation runs the same hardware walk
//!   as [`crate::Dma`], setting A/D with compare-exchange, and faults land in the domain's
//!   fault log;
//! * the returned IOTLB guard holds an in-flight access marker until vm-memory drops the
//!   translation iterator, which `Bytes::read`/`write` do only after copying; an invalidation
//!   therefore waits for those copies exactly as it waits for [`crate::Dma`] accesses;
//! * use `()` as `IommuMemory`'s bitmap: a second, IOVA-indexed bitmap would only duplicate
//!   what the PTEs record.
//!
//! Limits: the vm-memory `Iotlb` built per call is a throw-away view, not a cache (the domain's
//! own IOTLB does the caching); and a `VolatileSlice` kept by the caller after the iterator is
//! gone is outside the in-flight window, so writes through it may race a harvest. Copy through
//! `Bytes`, do not hold slices.

use crate::domain::Domain;
use crate::error::DmaError;
use crate::fault::Fault;
use crate::format::PAGE_SIZE;
use crate::iotlb::AccessSeq;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use vm_memory::iommu::{Error, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, Iotlb, Permissions};

/// A livemig domain seen through vm-memory's `Iommu` trait, for one device. Translations map
/// IOVAs to guest-physical addresses of the guest memory the domain's mappings point into.
pub struct DomainIommu {
    domain: Domain,
    device: u32,
    /// (host address, length, guest-physical address), sorted by host address.
    regions: Vec<(u64, u64, u64)>,
    streams: Mutex<Vec<Arc<AccessSeq>>>,
}

impl std::fmt::Debug for DomainIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainIommu")
            .field("domain", &self.domain)
            .field("device", &self.device)
            .finish()
    }
}

impl DomainIommu {
    /// Translations through `domain` for `device`, into the address space of `mem`.
    pub fn new(domain: Domain, device: u32, mem: &vm_memory::GuestMemoryMmap) -> Self {
        let mut regions: Vec<(u64, u64, u64)> = mem
            .iter()
            .filter_map(|r| {
                let hva = mem.get_host_address(r.start_addr()).ok()? as u64;
                Some((hva, r.len(), r.start_addr().0))
            })
            .collect();
        regions.sort_unstable();
        Self {
            domain,
            device,
            regions,
            streams: Mutex::new(Vec::new()),
        }
    }

    fn host_to_gpa(&self, hva: u64) -> Option<u64> {
        let i = self.regions.partition_point(|r| r.0 <= hva).checked_sub(1)?;
        let (h, len, gpa) = self.regions[i];
        (hva < h + len).then_some(gpa + (hva - h))
    }
}

/// The IOTLB view of one translation, holding the access in flight until dropped.
pub struct AccessGuard<'a> {
    iotlb: Iotlb,
    stream: Option<Arc<AccessSeq>>,
    owner: &'a DomainIommu,
}

impl Deref for AccessGuard<'_> {
    type Target = Iotlb;
    fn deref(&self) -> &Iotlb {
        &self.iotlb
    }
}

impl Drop for AccessGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            s.end();
            self.owner.streams.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        }
    }
}

impl vm_memory::Iommu for DomainIommu {
    type IotlbGuard<'a> = AccessGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<AccessGuard<'_>>, Error> {
        let stream = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| self.domain.register_stream());
        stream.begin();
        let mut guard = AccessGuard {
            iotlb: Iotlb::new(),
            stream: Some(stream),
            owner: self,
        };
        let range = IovaRange { base: iova, length };
        if length == 0 {
            return Iotlb::lookup(guard, iova, 0, access).map_err(|_| Error::CannotResolve {
                iova_range: range,
                reason: "empty range".into(),
            });
        }
        let Some(end) = iova.0.checked_add(length as u64) else {
            return Err(Error::CannotResolve {
                iova_range: range,
                reason: "range wraps".into(),
            });
        };
        let (read, write) = match access {
            Permissions::No => (false, false),
            Permissions::Read => (true, false),
            Permissions::Write => (false, true),
            Permissions::ReadWrite => (true, true),
        };
        let mut page = iova.0 & !(PAGE_SIZE - 1);
        while page < end {
            let mut hva = None;
            for (wanted, is_write) in [(read, false), (write, true)] {
                if !wanted {
                    continue;
                }
                match self.domain.translate(page, is_write) {
                    Ok(h) => hva = Some(h),
                    Err(reason) => {
                        self.domain.log_fault(Fault {
                            device: self.device,
                            iova: page,
                            write: is_write,
                            reason,
                        });
                        let e = DmaError::Fault {
                            iova: page,
                            write: is_write,
                            reason,
                        };
                        return Err(Error::CannotResolve {
                            iova_range: range,
                            reason: e.to_string(),
                        });
                    }
                }
            }
            let Some(hva) = hva.or_else(|| self.domain.iova_to_phys(page)) else {
                return Err(Error::CannotResolve {
                    iova_range: range,
                    reason: format!("IOVA {page:#x} is not mapped"),
                });
            };
            let Some(gpa) = self.host_to_gpa(hva) else {
                return Err(Error::IommuMisconfigured {
                    reason: format!("IOVA {page:#x} maps outside guest memory"),
                });
            };
            guard
                .iotlb
                .set_mapping(GuestAddress(page), GuestAddress(gpa), PAGE_SIZE as usize, access)?;
            page += PAGE_SIZE;
        }
        Iotlb::lookup(guard, iova, length, access).map_err(|f| Error::CannotResolve {
            iova_range: range,
            reason: format!(
                "{} unmapped and {} forbidden subranges",
                f.misses.len(),
                f.access_fails.len()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mem::GuestRamRegion, DirtyBitmap, DomainConfig, FormatKind, Perm};
    use vm_memory::{Bytes, GuestMemoryMmap, IommuMemory};

    #[test]
    fn vm_memory_device_dmas_through_the_domain() {
        let gm = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
        let region = Arc::new(GuestRamRegion::new(gm.clone(), 0).unwrap());
        for fmt in FormatKind::ALL {
            let mut cfg = DomainConfig::new(fmt);
            cfg.huge_pages = false;
            let dom = Domain::new(cfg).unwrap();
            dom.map(0x1000_0000, 2 << 20, region.clone(), 1 << 20, Perm::RW)
                .unwrap();
            dom.map(0x2000_0000, 4096, region.clone(), 0, Perm::READ).unwrap();
            dom.read_and_clear_dirty(0x1000_0000, 2 << 20, 0, &mut DirtyBitmap::default())
                .unwrap();
            dom.set_dirty_tracking(true).unwrap();

            let iommu = DomainIommu::new(dom.clone(), 5, &gm);
            let mem = IommuMemory::new((*gm).clone(), iommu, true, ());
            // A write spanning two pages lands at GPA 1 MiB + 0x1ffc and dirties both.
            mem.write_obj(0xdead_beef_cafe_f00du64, GuestAddress(0x1000_1ffc))
                .unwrap();
            let back: u64 = gm.read_obj(GuestAddress((1 << 20) + 0x1ffc)).unwrap();
            assert_eq!(back, 0xdead_beef_cafe_f00d, "{fmt}");
            let v: u64 = mem.read_obj(GuestAddress(0x1000_1ffc)).unwrap();
            assert_eq!(v, back);

            let mut got = Vec::new();
            let mut rec = |i, l| got.push((i, l));
            dom.read_and_clear_dirty(
                0x1000_0000,
                2 << 20,
                0,
                &mut DirtyBitmap {
                    bitmap: Some(&mut rec),
                    gather: None,
                },
            )
            .unwrap();
            // Adjacent dirty leaves are reported as one run.
            assert_eq!(got, vec![(0x1000_1000, 8192)], "{fmt}");

            // Faults surface as vm-memory errors and in the domain's log.
            assert!(
                mem.write_obj(1u32, GuestAddress(0x2000_0000)).is_err(),
                "{fmt}: read-only"
            );
            assert!(
                mem.read_obj::<u32>(GuestAddress(0x3000_0000)).is_err(),
                "{fmt}: unmapped"
            );
            assert_eq!(dom.faults().1, 2, "{fmt}");
        }
    }
}
