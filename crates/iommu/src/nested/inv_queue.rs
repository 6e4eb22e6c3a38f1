//! The guest's way to invalidate its stage-1 translations: a VT-d invalidation queue
//! (Intel VT-d specification 6.5.2, "Queued Invalidation"; `docs/viommu.md#invalidation-queue`).
//!
//! The guest keeps a ring of descriptors in its memory (base and size in IQA), writes
//! descriptors at the tail and then the tail register (IQT); the IOMMU consumes them from the
//! head (IQH). Two descriptor types are modelled, the ones a guest driver needs to invalidate
//! a nested domain and know it is done:
//! * **PASID-based IOTLB invalidate** (type 6, 6.5.2.4): one PASID's whole IOTLB (granularity
//!   2) or 2^AM pages at ADDR (granularity 3).
//! * **Invalidation wait** (type 5, 6.5.2.8): with SW set, writes its 32-bit status data to a
//!   guest address once every earlier descriptor has completed.
//!
//! Any other type, a reserved granularity or a reserved bit set is an invalidation queue error
//! (IQE): processing stops at that descriptor, the head stays on it, and nothing after it runs,
//! as the hardware does. This module only decodes and sequences; the caller (the VMM's
//! vIOMMU) applies each invalidation to the nested domain (`NestedDomain::invalidate`, the
//! iommufd `IOMMU_HWPT_INVALIDATE` path) and reads and writes guest memory.

/// Register offsets in the VT-d register page.
pub const IQH_REG: u64 = 0x80;
pub const IQT_REG: u64 = 0x88;
pub const IQA_REG: u64 = 0x90;

/// Descriptor type values (qw0 bits 3:0, with bits 11:9 as type bits 6:4).
pub const TYPE_WAIT: u64 = 0x5;
pub const TYPE_PIOTLB: u64 = 0x6;

/// PASID-based IOTLB granularity: every entry of the PASID.
pub const GRAN_PASID: u64 = 2;
/// PASID-based IOTLB granularity: 2^AM pages at ADDR within the PASID.
pub const GRAN_PAGES: u64 = 3;

/// Wait descriptor: status write.
pub const WAIT_SW: u64 = 1 << 5;
/// Wait descriptor: fence (later descriptors wait for this one).
pub const WAIT_FN: u64 = 1 << 6;

/// IQA: descriptor width (1 = 256-bit).
pub const IQA_DW: u64 = 1 << 11;
/// IQA: queue size, 2^QS pages of 4 KiB.
pub const IQA_QS_MASK: u64 = 7;

/// Reserved bits of a P_IOTLB qw0 (63:52, 15:12, 8:6) and qw1 (11:7).
const PIOTLB_RSVD0: u64 = 0xfff0_0000_0000_f1c0;
const PIOTLB_RSVD1: u64 = 0xf80;
/// Reserved bits of a wait descriptor: qw0 31:12 and 8 (bit 7 is the page-request drain,
/// which the model accepts and ignores; bits 11:9 are part of the type), qw1 1:0 (the status
/// address is 4-byte aligned).
const WAIT_RSVD0: u64 = 0xffff_f100;
const WAIT_RSVD1: u64 = 3;

/// Which pages a PASID-based IOTLB invalidation drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    /// Everything cached for the PASID.
    All,
    /// `npages` (a power of two) 4 KiB pages from `addr` (aligned to the size); `leaf_only`
    /// is the IH hint: only leaf entries changed.
    Range { addr: u64, npages: u64, leaf_only: bool },
}

/// A decoded descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    PasidIotlb { did: u16, pasid: u32, pages: Pages },
    Wait { status: Option<(u64, u32)>, fence: bool },
}

/// Why the queue stopped (the hardware's IQE, with the reason the model knows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QiError {
    #[error("descriptor type {0:#x} is not supported")]
    UnknownType(u64),
    #[error("reserved granularity {0} in a PASID-based IOTLB invalidation")]
    Granularity(u64),
    #[error("reserved bits set in a descriptor")]
    Reserved,
    #[error("descriptor at {0:#x} is not readable guest memory")]
    Fetch(u64),
    #[error("wait status address {0:#x} is not writable guest memory")]
    StatusWrite(u64),
    #[error("tail {0} is outside a queue of {1} descriptors")]
    Tail(u64, u64),
}

/// Decodes one descriptor from its first two quadwords.
pub fn decode(qw0: u64, qw1: u64) -> Result<Descriptor, QiError> {
    let ty = ((qw0 >> 5) & 0x70) | (qw0 & 0xf);
    match ty {
        TYPE_PIOTLB => {
            if qw0 & PIOTLB_RSVD0 != 0 || qw1 & PIOTLB_RSVD1 != 0 {
                return Err(QiError::Reserved);
            }
            let did = (qw0 >> 16) as u16;
            let pasid = ((qw0 >> 32) & 0xf_ffff) as u32;
            let pages = match (qw0 >> 4) & 3 {
                GRAN_PASID => Pages::All,
                GRAN_PAGES => {
                    let am = qw1 & 0x3f;
                    // 2^36 pages already cover the 48-bit input range.
                    if am > 36 {
                        return Err(QiError::Reserved);
                    }
                    let npages = 1u64 << am;
                    // The address is naturally aligned to the size; low bits are ignored.
                    let addr = qw1 & !0xfff & !((npages << 12) - 1);
                    Pages::Range {
                        addr,
                        npages,
                        leaf_only: qw1 & (1 << 6) != 0,
                    }
                }
                g => return Err(QiError::Granularity(g)),
            };
            Ok(Descriptor::PasidIotlb { did, pasid, pages })
        }
        TYPE_WAIT => {
            if qw0 & WAIT_RSVD0 != 0 || qw1 & WAIT_RSVD1 != 0 {
                return Err(QiError::Reserved);
            }
            let status = (qw0 & WAIT_SW != 0).then_some((qw1, (qw0 >> 32) as u32));
            Ok(Descriptor::Wait {
                status,
                fence: qw0 & WAIT_FN != 0,
            })
        }
        t => Err(QiError::UnknownType(t)),
    }
}

/// Encodes a page-selective PASID-based IOTLB invalidation of `1 << am` pages at `addr`.
pub fn encode_piotlb_pages(did: u16, pasid: u32, addr: u64, am: u32, leaf_only: bool) -> [u64; 2] {
    let qw0 = TYPE_PIOTLB | (GRAN_PAGES << 4) | (did as u64) << 16 | ((pasid as u64) & 0xf_ffff) << 32;
    let qw1 = (addr & !0xfff) | (leaf_only as u64) << 6 | (am as u64 & 0x3f);
    [qw0, qw1]
}

/// Encodes a PASID-selective PASID-based IOTLB invalidation.
pub fn encode_piotlb_all(did: u16, pasid: u32) -> [u64; 2] {
    [
        TYPE_PIOTLB | (GRAN_PASID << 4) | (did as u64) << 16 | ((pasid as u64) & 0xf_ffff) << 32,
        0,
    ]
}

/// Encodes a wait descriptor that writes `data` at `addr` when it completes.
pub fn encode_wait(addr: u64, data: u32) -> [u64; 2] {
    [TYPE_WAIT | WAIT_SW | WAIT_FN | (data as u64) << 32, addr & !3]
}

/// The queue's registers and progress.
#[derive(Clone, Debug, Default)]
pub struct InvQueue {
    iqa: u64,
    head: u64,
    tail: u64,
    error: Option<QiError>,
    done: u64,
}

impl InvQueue {
    /// Writes IQA: base, width and size. The head goes back to 0, as when software sets it up.
    pub fn write_iqa(&mut self, v: u64) {
        self.iqa = v;
        self.head = 0;
        self.tail = 0;
        self.error = None;
    }
    pub fn iqa(&self) -> u64 {
        self.iqa
    }
    /// Bytes per descriptor (16, or 32 with DW).
    pub fn desc_size(&self) -> u64 {
        if self.iqa & IQA_DW != 0 {
            32
        } else {
            16
        }
    }
    fn shift(&self) -> u32 {
        self.desc_size().trailing_zeros()
    }
    /// Descriptors the ring holds.
    pub fn entries(&self) -> u64 {
        (4096u64 << (self.iqa & IQA_QS_MASK)) / self.desc_size()
    }
    /// Guest-physical base of the ring.
    pub fn base(&self) -> u64 {
        self.iqa & !0xfff
    }
    /// The IQH register value.
    pub fn iqh(&self) -> u64 {
        self.head << self.shift()
    }
    /// The IQT register value.
    pub fn iqt(&self) -> u64 {
        self.tail << self.shift()
    }
    /// The error that stopped the queue, if any (cleared by the next IQA write).
    pub fn error(&self) -> Option<QiError> {
        self.error
    }
    /// Descriptors completed since the queue was set up.
    pub fn completed(&self) -> u64 {
        self.done
    }

    /// The registers a migration carries: IQA, head and tail indices, and whether the queue
    /// stopped on an error.
    pub fn save(&self) -> (u64, u64, u64, bool) {
        (self.iqa, self.head, self.tail, self.error.is_some())
    }

    /// Loads what [`InvQueue::save`] returned; `None` if the indices do not fit the queue.
    /// A queue that had stopped stays stopped (on a generic reserved-field error).
    pub fn restore(iqa: u64, head: u64, tail: u64, stopped: bool) -> Option<InvQueue> {
        let mut q = InvQueue::default();
        q.write_iqa(iqa);
        if head >= q.entries() || tail >= q.entries() {
            return None;
        }
        q.head = head;
        q.tail = tail;
        q.error = stopped.then_some(QiError::Reserved);
        Some(q)
    }

    /// Writes IQT and runs every descriptor from the head to the new tail: `read` fetches
    /// guest memory, `apply` carries out an invalidation (and must return only once it has
    /// drained), `write` stores a wait's status. Returns the descriptors run.
    pub fn write_iqt(
        &mut self,
        v: u64,
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
        write: &mut dyn FnMut(u64, &[u8]) -> bool,
        apply: &mut dyn FnMut(&Descriptor),
    ) -> Result<u64, QiError> {
        let tail = (v >> self.shift()) & 0x7fff;
        if tail >= self.entries() {
            self.error = Some(QiError::Tail(tail, self.entries()));
            return Err(QiError::Tail(tail, self.entries()));
        }
        self.tail = tail;
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut ran = 0;
        while self.head != self.tail {
            let Some(at) = self.base().checked_add(self.head << self.shift()) else {
                self.error = Some(QiError::Fetch(self.base()));
                return Err(QiError::Fetch(self.base()));
            };
            let mut b = [0u8; 16];
            if !read(at, &mut b) {
                self.error = Some(QiError::Fetch(at));
                return Err(QiError::Fetch(at));
            }
            let qw0 = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            let qw1 = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
            let d = match decode(qw0, qw1) {
                Ok(d) => d,
                Err(e) => {
                    self.error = Some(e);
                    return Err(e);
                }
            };
            match d {
                Descriptor::Wait {
                    status: Some((addr, data)),
                    ..
                } => {
                    // Descriptors run in order and each invalidation drained before `apply`
                    // returned, so everything before this wait is complete.
                    if !write(addr, &data.to_le_bytes()) {
                        self.error = Some(QiError::StatusWrite(addr));
                        return Err(QiError::StatusWrite(addr));
                    }
                }
                Descriptor::Wait { status: None, .. } => {}
                Descriptor::PasidIotlb { .. } => apply(&d),
            }
            self.head = (self.head + 1) % self.entries();
            self.done += 1;
            ran += 1;
        }
        Ok(ran)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_descriptors_decode() {
        // Page-selective, DID 1, PASID 5, 4 pages at 0x7f_0000_4000 with IH.
        let d = encode_piotlb_pages(1, 5, 0x7f_0000_4000, 2, true);
        assert_eq!(d, [0x0000_0005_0001_0036, 0x0000_007f_0000_4042]);
        assert_eq!(
            decode(d[0], d[1]),
            Ok(Descriptor::PasidIotlb {
                did: 1,
                pasid: 5,
                pages: Pages::Range {
                    addr: 0x7f_0000_4000,
                    npages: 4,
                    leaf_only: true
                }
            })
        );
        // A misaligned address is taken down to the size.
        let d = encode_piotlb_pages(1, 5, 0x7f_0000_5000, 2, false);
        assert!(matches!(
            decode(d[0], d[1]),
            Ok(Descriptor::PasidIotlb {
                pages: Pages::Range {
                    addr: 0x7f_0000_4000,
                    ..
                },
                ..
            })
        ));
        assert_eq!(encode_piotlb_all(2, 0), [0x0000_0000_0002_0026, 0]);
        assert_eq!(
            decode(0x0000_0000_0002_0026, 0),
            Ok(Descriptor::PasidIotlb {
                did: 2,
                pasid: 0,
                pages: Pages::All
            })
        );
        let w = encode_wait(0x9000, 0xabcd);
        assert_eq!(w, [0x0000_abcd_0000_0065, 0x9000]);
        assert_eq!(
            decode(w[0], w[1]),
            Ok(Descriptor::Wait {
                status: Some((0x9000, 0xabcd)),
                fence: true
            })
        );
        // Errors: granularity 0 and 1, a reserved bit, an unknown type, a type in bits 11:9.
        assert_eq!(decode(0x06, 0), Err(QiError::Granularity(0)));
        assert_eq!(decode(0x16, 0), Err(QiError::Granularity(1)));
        assert_eq!(decode(0x26 | 1 << 12, 0), Err(QiError::Reserved));
        assert_eq!(decode(0x36, 1 << 8), Err(QiError::Reserved));
        assert_eq!(decode(0x36, 37), Err(QiError::Reserved), "AM beyond the 48-bit space");
        assert_eq!(decode(0x36, 52), Err(QiError::Reserved));
        assert!(decode(0x36, 36).is_ok());
        assert_eq!(decode(0x2, 0), Err(QiError::UnknownType(2)));
        assert_eq!(decode(0x6 | 1 << 9, 0), Err(QiError::UnknownType(0x16)));
        assert_eq!(decode(w[0], 0x9002), Err(QiError::Reserved));
    }

    /// The ring wraps, waits write their status after the invalidations before them, and a bad
    /// descriptor stops the queue on itself until IQA is written again.
    #[test]
    fn the_queue_runs_in_order_wraps_and_stops_on_an_error() {
        let mut mem = vec![0u8; 0x3000];
        let mut q = InvQueue::default();
        q.write_iqa(0x1000); // one page, 128-bit descriptors: 256 entries
        assert_eq!(q.entries(), 256);
        let put = |mem: &mut Vec<u8>, idx: u64, d: [u64; 2]| {
            let at = 0x1000 + idx as usize * 16;
            mem[at..at + 8].copy_from_slice(&d[0].to_le_bytes());
            mem[at + 8..at + 16].copy_from_slice(&d[1].to_le_bytes());
        };
        let mut log = Vec::new();
        let run = |q: &mut InvQueue, mem: &mut Vec<u8>, tail: u64, log: &mut Vec<String>| {
            let snapshot = mem.clone();
            let mut writes = Vec::new();
            let events = std::cell::RefCell::new(Vec::new());
            let r = q.write_iqt(
                tail << 4,
                &mut |a, b| {
                    let a = a as usize;
                    a + b.len() <= snapshot.len() && {
                        b.copy_from_slice(&snapshot[a..a + b.len()]);
                        true
                    }
                },
                &mut |a, b| {
                    writes.push((a, b.to_vec()));
                    events.borrow_mut().push(format!("status {a:#x}"));
                    true
                },
                &mut |d| events.borrow_mut().push(format!("{d:?}")),
            );
            log.extend(events.into_inner());
            for (a, b) in writes {
                mem[a as usize..a as usize + b.len()].copy_from_slice(&b);
            }
            r
        };
        for i in 0..254 {
            put(&mut mem, i, encode_wait(0x2000, i as u32));
        }
        assert_eq!(run(&mut q, &mut mem, 254, &mut log), Ok(254));
        log.clear();
        put(&mut mem, 254, encode_piotlb_pages(1, 0, 0x5000, 0, false));
        put(&mut mem, 255, encode_piotlb_all(1, 0));
        put(&mut mem, 0, encode_wait(0x2000, 77));
        assert_eq!(run(&mut q, &mut mem, 1, &mut log), Ok(3), "wrapped");
        assert_eq!(log.len(), 3);
        assert!(log[0].contains("npages: 1"));
        assert!(log[1].contains("All"));
        assert_eq!(log[2], "status 0x2000");
        assert_eq!(u32::from_le_bytes(mem[0x2000..0x2004].try_into().unwrap()), 77);
        assert_eq!(q.iqh(), 1 << 4);

        put(&mut mem, 1, [0x2, 0]);
        put(&mut mem, 2, encode_wait(0x2000, 78));
        assert_eq!(run(&mut q, &mut mem, 3, &mut log), Err(QiError::UnknownType(2)));
        assert_eq!(q.iqh(), 1 << 4, "the head stays on the bad descriptor");
        assert_eq!(
            u32::from_le_bytes(mem[0x2000..0x2004].try_into().unwrap()),
            77,
            "nothing after it ran"
        );
        assert_eq!(
            run(&mut q, &mut mem, 3, &mut log),
            Err(QiError::UnknownType(2)),
            "stays stopped"
        );
        assert_eq!(run(&mut q, &mut mem, 300, &mut log), Err(QiError::Tail(300, 256)));
        // A ring whose end is past the top of the address space stops, it does not wrap.
        let mut q = InvQueue::restore(0xffff_ffff_ffff_f000 | 7, 1000, 1001, false).unwrap();
        let r = q.write_iqt(1001 << 4, &mut |_, _| true, &mut |_, _| true, &mut |_| {});
        assert!(matches!(r, Err(QiError::Fetch(_))), "{r:?}");
    }
}
