//! What a migration engine may ask of a guest to tell that it is alive, as a trait: the engine
//! learns whether the guest moves without knowing its programs or their control pages.

use crate::layout::ctrl_page;
use crate::programs::ctrl::{C_FLAGS, FLAG_ACCEL, FLAG_DIRTIER};
use crate::Vm;
use vm_memory::{Bytes, GuestAddress};

/// What the dirtier counts.
pub const PAGES: &str = "pages written by the dirtier";
/// What the accel-clients count.
pub const JOBS: &str = "accelerator jobs completed";

/// A guest whose progress can be watched.
pub trait GuestProbe {
    /// One number that changes whenever any vCPU's program makes progress.
    fn progress_word(&self) -> u64;
    /// What each running program has done so far, and the errors the guest counted.
    fn progress(&self) -> GuestProgress;
}

/// A guest's progress at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestProgress {
    /// Per running program: what it counts, and the count.
    pub measures: Vec<(&'static str, u64)>,
    /// Errors the guest's programs counted.
    pub errors: u64,
}

impl GuestProgress {
    /// The count of `what`, 0 if no running program counts it.
    pub fn count(&self, what: &str) -> u64 {
        self.measures.iter().find(|m| m.0 == what).map_or(0, |m| m.1)
    }

    /// Why `later` shows no progress over `self`: one reason per program that stood still,
    /// and the errors counted in between. Empty when the guest moved and counted none.
    pub fn stalled_in(&self, later: &GuestProgress) -> Vec<String> {
        let mut why = Vec::new();
        for &(what, before) in &self.measures {
            let after = later.count(what);
            if after <= before {
                why.push(format!("no progress in {what} ({before} before, {after} after)"));
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
                let c = self.counters(v);
                c.pages_written.wrapping_add(c.tsc_now).wrapping_add(c.jobs_completed)
            })
            .fold(0u64, u64::wrapping_add)
    }

    fn progress(&self) -> GuestProgress {
        let (mut pages, mut jobs, mut errors, mut flags) = (0, 0, 0, 0);
        for v in 0..self.vcpu_count() {
            let c = self.counters(v);
            pages += c.pages_written;
            jobs += c.jobs_completed;
            errors += c.errors;
            flags |= self
                .memory()
                .read_obj::<u64>(GuestAddress(ctrl_page(v) + C_FLAGS))
                .unwrap_or(0);
        }
        let mut measures = Vec::new();
        if flags & FLAG_DIRTIER != 0 {
            measures.push((PAGES, pages));
        }
        if flags & FLAG_ACCEL != 0 {
            measures.push((JOBS, jobs));
        }
        GuestProgress { measures, errors }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_stood_still_or_new_errors_are_named() {
        let p = |pages, jobs, errors| GuestProgress {
            measures: vec![("pages", pages), ("jobs", jobs)],
            errors,
        };
        assert!(p(1, 1, 0).stalled_in(&p(2, 2, 0)).is_empty());
        assert_eq!(
            p(1, 1, 0).stalled_in(&p(2, 1, 0)),
            ["no progress in jobs (1 before, 1 after)"]
        );
        assert_eq!(p(1, 1, 0).stalled_in(&p(2, 2, 3)).len(), 1);
        // A program that vanished counts as standing still.
        let gone = GuestProgress {
            measures: vec![("pages", 5)],
            errors: 0,
        };
        assert_eq!(p(1, 1, 0).stalled_in(&gone).len(), 1);
    }
}
