//! CPU throttling for auto-converge: in every 10 ms slice the vCPUs are paused for the
//! throttle percentage, as QEMU's `cpu_throttle_set` sleeps each vCPU.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm::Vm;

const SLICE: Duration = Duration::from_millis(10);

pub struct Throttle {
    pct: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    pub fn new(vm: Arc<Vm>) -> Self {
        let pct = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (pct.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("cpu-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let pct = p.load(Ordering::Relaxed) as u32;
                    if pct == 0 {
                        std::thread::sleep(SLICE);
                        continue;
                    }
                    if vm.pause().is_err() {
                        return;
                    }
                    std::thread::sleep(SLICE * pct / 100);
                    if vm.resume().is_err() {
                        return;
                    }
                    std::thread::sleep(SLICE * (100 - pct) / 100);
                }
            })
            .ok();
        Self { pct, stop, thread }
    }

    pub fn set(&self, pct: u8) {
        self.pct.store(pct.min(99), Ordering::Relaxed);
    }

    pub fn pct(&self) -> u8 {
        self.pct.load(Ordering::Relaxed)
    }

    /// Stops throttling and leaves the vCPUs running.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}
