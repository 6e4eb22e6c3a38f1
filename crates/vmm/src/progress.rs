//! What a migration engine may ask of a guest to tell that it is alive, as a trait: the engine
//! learns whether the guest moves without knowing its programs or their control pages.

use crate::layout::ctrl_page;
use crate::programs::ctrl::{C_FLAGS, FLAG_ACCEL, FLAG_DIRTIER, FLAG_DMA};
use crate::Vm;
use vm_memory::{Bytes, GuestAddress};

/// What the dirtiers count.
pub const PAGES: &str = "pages written by the dirtier";
/// What the accel-clients count.
pub const JOBS: &str = "accelerator jobs completed";
/// What the DMA writers count.
pub const DMA_CHUNKS: &str = "DMA-writer chunks completed";

/// A guest whose progress can be watched.
pub trait GuestProbe {
    /// One number that changes whenever any vCPU's program makes progress.
    fn progress_word(&self) -> u64;
    /// What each running program has done so far, and the errors the guest counted.
    fn progress(&self) -> GuestProgress;
}

/// One running program's count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measure {
    /// What it counts ([`PAGES`], [`JOBS`]).
    pub what: &'static str,
    /// The vCPU it runs on.
    pub vcpu: u32,
    pub count: u64,
}

/// A guest's progress at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestProgress {
    /// One per running program (a vCPU may run a dirtier and an accel-client).
    pub measures: Vec<Measure>,
    /// Errors the guest's programs counted.
    pub errors: u64,
}

/// Bytes one count of `what` stands for (0: it does not count bytes).
pub fn unit_bytes(what: &str) -> u64 {
    match what {
        PAGES => 4096,
        DMA_CHUNKS => crate::programs::ctrl::DMA_CHUNK,
        _ => 0,
    }
}

impl GuestProgress {
    /// MiB per second of `what` written from `self` to `later`, `secs` apart.
    pub fn mib_s(&self, later: &GuestProgress, what: &str, secs: f64) -> f64 {
        let n = later.count(what).saturating_sub(self.count(what));
        (n * unit_bytes(what)) as f64 / 1048576.0 / secs.max(1e-9)
    }

    /// The total of `what` over every vCPU.
    pub fn count(&self, what: &str) -> u64 {
        self.measures.iter().filter(|m| m.what == what).map(|m| m.count).sum()
    }

    /// Why `later` shows no progress over `self`: one reason per program that stood still
    /// (each vCPU's on its own, so one stalled device or vCPU is seen however busy the others
    /// are), and the errors counted in between. Empty when every program moved and none
    /// counted an error.
    pub fn stalled_in(&self, later: &GuestProgress) -> Vec<String> {
        let mut why = Vec::new();
        for m in &self.measures {
            let after = later
                .measures
                .iter()
                .find(|n| n.what == m.what && n.vcpu == m.vcpu)
                .map_or(0, |n| n.count);
            if after <= m.count {
                why.push(format!(
                    "no progress in {} on vCPU {} ({} before, {after} after)",
                    m.what, m.vcpu, m.count
                ));
            }
        }
        if later.errors > self.errors {
            why.push(format!(
                "the guest counted {} new error(s) after resuming",
                later.errors - self.errors
            ));
        }
        why
    }
}

impl GuestProbe for Vm {
    fn progress_word(&self) -> u64 {
        (0..self.vcpu_count())
            .map(|v| {
                let c = self.programs().counters(v);
                c.pages_written
                    .wrapping_add(c.tsc_now)
                    .wrapping_add(c.jobs_completed)
                    .wrapping_add(c.dma_chunks)
            })
            .fold(0u64, u64::wrapping_add)
    }

    fn progress(&self) -> GuestProgress {
        let mut p = GuestProgress::default();
        for vcpu in 0..self.vcpu_count() {
            let c = self.programs().counters(vcpu);
            p.errors += c.errors;
            let flags = self
                .memory()
                .read_obj::<u64>(GuestAddress(ctrl_page(vcpu) + C_FLAGS))
                .unwrap_or(0);
            for (flag, what, count) in [
                (FLAG_DIRTIER, PAGES, c.pages_written),
                (FLAG_ACCEL, JOBS, c.jobs_completed),
                (FLAG_DMA, DMA_CHUNKS, c.dma_chunks),
            ] {
                if flags & flag != 0 {
                    p.measures.push(Measure { what, vcpu, count });
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(counts: &[(&'static str, u32, u64)], errors: u64) -> GuestProgress {
        GuestProgress {
            measures: counts
                .iter()
                .map(|&(what, vcpu, count)| Measure { what, vcpu, count })
                .collect(),
            errors,
        }
    }

    #[test]
    fn a_program_that_stood_still_or_new_errors_are_named() {
        let before = p(&[(PAGES, 0, 1), (JOBS, 0, 1), (JOBS, 1, 5)], 0);
        assert!(before
            .stalled_in(&p(&[(PAGES, 0, 2), (JOBS, 0, 2), (JOBS, 1, 6)], 0))
            .is_empty());
        // One vCPU's client stalled while the other's went on: seen.
        assert_eq!(
            before.stalled_in(&p(&[(PAGES, 0, 2), (JOBS, 0, 90), (JOBS, 1, 5)], 0)),
            ["no progress in accelerator jobs completed on vCPU 1 (5 before, 5 after)"]
        );
        assert_eq!(
            before
                .stalled_in(&p(&[(PAGES, 0, 2), (JOBS, 0, 2), (JOBS, 1, 6)], 3))
                .len(),
            1
        );
        // A program that vanished counts as standing still.
        assert_eq!(before.stalled_in(&p(&[(PAGES, 0, 2)], 0)).len(), 2);
        assert_eq!(before.count(JOBS), 6);
    }
}
