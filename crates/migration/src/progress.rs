//! The guest's blackout as the guest sees it: the host watches the guest's progress word
//! (`vmm::GuestProbe`) and notes, on the monotonic
//! clock, the last change before the source pauses and the first after the destination
//! resumes.

use crate::session::mono_ns;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm::{GuestProbe, Vm};

/// How often the watcher looks; its resolution.
const PERIOD: Duration = Duration::from_micros(20);

/// Watches a running guest until stopped; remembers the time of the last change it saw.
pub struct LastProgress {
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl LastProgress {
    pub fn start(vm: Arc<Vm>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let (s, l) = (stop.clone(), last.clone());
        let thread = std::thread::Builder::new()
            .name("progress-last".into())
            .spawn(move || {
                let mut w = vm.progress_word();
                while !s.load(Ordering::Acquire) {
                    std::thread::sleep(PERIOD);
                    let now = vm.progress_word();
                    if now != w {
                        w = now;
                        l.store(mono_ns(), Ordering::Release);
                    }
                }
            })
            .ok();
        Self { stop, last, thread }
    }

    /// Waits until the watcher has seen the guest move once (at most `limit`), so the last
    /// change before a pause is one the watcher saw; an idle guest gives up after `limit`.
    pub fn wait_active(&self, limit: Duration) {
        let end = mono_ns() + limit.as_nanos() as u64;
        while self.last.load(Ordering::Acquire) == 0 && mono_ns() < end {
            std::thread::sleep(PERIOD);
        }
    }

    /// Stops watching (call once the guest is paused); the time of the last change, if any.
    pub fn stop(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Some(self.last.load(Ordering::Acquire)).filter(|&t| t != 0)
    }
}

/// Waits (at most `limit`) for the first change after `baseline` was read; its time.
pub fn first_change(vm: &Vm, baseline: u64, limit: Duration) -> Option<u64> {
    let end = mono_ns() + limit.as_nanos() as u64;
    while mono_ns() < end {
        if vm.progress_word() != baseline {
            return Some(mono_ns());
        }
        std::thread::sleep(PERIOD);
    }
    None
}
