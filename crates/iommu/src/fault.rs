//! The fault log: what the IOMMU reports when a DMA cannot be translated or is not allowed.

use crate::format::FaultReason;
use std::collections::VecDeque;
use std::sync::Mutex;

/// One fault record (the event-log entry of AMD, the fault-recording register of VT-d, the
/// event queue entry of SMMUv3, reduced to what they share).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub device: u32,
    pub iova: u64,
    pub write: bool,
    pub reason: FaultReason,
}

/// Bounded log; the oldest records drop off, the total keeps counting.
pub(crate) struct FaultLog {
    inner: Mutex<(VecDeque<Fault>, u64)>,
    cap: usize,
}

impl FaultLog {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new((VecDeque::new(), 0)),
            cap,
        }
    }
    pub fn push(&self, f: Fault) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0.len() == self.cap {
            g.0.pop_front();
        }
        g.0.push_back(f);
        g.1 += 1;
    }
    pub fn snapshot(&self) -> (Vec<Fault>, u64) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (g.0.iter().copied().collect(), g.1)
    }
    pub fn take(&self) -> Vec<Fault> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.drain(..).collect()
    }
}
