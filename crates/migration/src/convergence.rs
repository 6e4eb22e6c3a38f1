//! When to switch over, the way QEMU decides (`docs/vfio.md#convergence`; QEMU:
//! migration/migration.c and ram.c): bandwidth is bytes sent per millisecond over periods of
//! at least 100 ms; the threshold is `bandwidth × downtime_limit`; the expected downtime is the
//! dirty bytes of the last sync over the bandwidth; auto-converge throttles the vCPUs after two
//! successive syncs that dirtied more than half of what was sent in their period (initial
//! 20 %, step 10, max 99).
//!
//! One deliberate difference: "bytes" here are guest bytes of the data pages moved (raw or
//! compressed pages × 4096, plus device data), not bytes on the wire. QEMU counts wire bytes,
//! so with compression its bandwidth falls far below the rate at which guest memory moves
//! while the pending amount it compares against is counted in whole pages, and a
//! compressible guest would not converge. Zero pages are left out: they cost almost nothing,
//! so a bulk round of mostly zero memory would report a bandwidth no dirty page could see.

use std::time::{Duration, Instant};

pub const PERIOD: Duration = Duration::from_millis(100);
pub const THROTTLE_TRIGGER_PCT: u64 = 50;
pub const THROTTLE_INITIAL: u8 = 20;
pub const THROTTLE_STEP: u8 = 10;
pub const THROTTLE_MAX: u8 = 99;

/// The convergence state of one migration.
#[derive(Clone, Debug)]
pub struct Convergence {
    pub downtime_limit: Duration,
    period_start: Instant,
    period_bytes: u64,
    /// Bytes per millisecond, from the last completed period.
    pub bandwidth: f64,
    pub expected_downtime: Duration,
    // auto-converge
    pub auto_converge: bool,
    sync_bytes_start: u64,
    dirty_rate_high: u32,
    pub throttle_pct: u8,
}

impl Convergence {
    pub fn new(downtime_limit: Duration, auto_converge: bool, now: Instant, bytes: u64) -> Self {
        Self {
            downtime_limit,
            period_start: now,
            period_bytes: bytes,
            bandwidth: 0.0,
            expected_downtime: Duration::ZERO,
            auto_converge,
            sync_bytes_start: bytes,
            dirty_rate_high: 0,
            throttle_pct: 0,
        }
    }

    /// Feeds the total bytes sent so far; closes a period once 100 ms have passed.
    pub fn update(&mut self, now: Instant, total_bytes: u64) {
        let dt = now.saturating_duration_since(self.period_start);
        if dt >= PERIOD {
            let ms = dt.as_secs_f64() * 1e3;
            self.bandwidth = total_bytes.saturating_sub(self.period_bytes) as f64 / ms;
            self.period_start = now;
            self.period_bytes = total_bytes;
        }
    }

    /// Bytes that fit in the downtime limit at the measured bandwidth.
    pub fn threshold(&self) -> u64 {
        (self.bandwidth * self.downtime_limit.as_secs_f64() * 1e3) as u64
    }

    /// A dirty sync found `dirty_bytes`; `total_bytes` have been sent so far. Updates the
    /// expected downtime and returns the new throttle percentage if auto-converge moved it.
    pub fn on_sync(&mut self, dirty_bytes: u64, total_bytes: u64) -> Option<u8> {
        if self.bandwidth > 0.0 && total_bytes > 10_000 {
            self.expected_downtime = Duration::from_secs_f64(dirty_bytes as f64 / self.bandwidth / 1e3);
        }
        let sent = total_bytes.saturating_sub(self.sync_bytes_start);
        self.sync_bytes_start = total_bytes;
        if !self.auto_converge {
            return None;
        }
        if dirty_bytes > sent * THROTTLE_TRIGGER_PCT / 100 {
            self.dirty_rate_high += 1;
            if self.dirty_rate_high >= 2 {
                self.dirty_rate_high = 0;
                self.throttle_pct = if self.throttle_pct == 0 {
                    THROTTLE_INITIAL
                } else {
                    (self.throttle_pct + THROTTLE_STEP).min(THROTTLE_MAX)
                };
                return Some(self.throttle_pct);
            }
        } else {
            self.dirty_rate_high = 0;
        }
        None
    }

    /// QEMU's completion test: switchover allowed and the pending bytes fit.
    pub fn can_switch(&self, pending: u64, switchover_allowed: bool) -> bool {
        switchover_allowed && pending <= self.threshold()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_threshold_and_expected_downtime() {
        let t0 = Instant::now();
        let mut c = Convergence::new(Duration::from_millis(300), false, t0, 0);
        c.update(t0 + Duration::from_millis(50), 1 << 20);
        assert_eq!(c.bandwidth, 0.0, "no period closed before 100 ms");
        c.update(t0 + Duration::from_millis(200), 200_000_000);
        assert_eq!(c.bandwidth, 1_000_000.0, "200 MB over 200 ms");
        assert_eq!(c.threshold(), 300_000_000);
        c.on_sync(50_000_000, 200_000_000);
        assert_eq!(c.expected_downtime, Duration::from_millis(50));
        assert!(c.can_switch(300_000_000, true));
        assert!(!c.can_switch(300_000_001, true));
        assert!(
            !c.can_switch(0, false),
            "no switchover before the destination acknowledged"
        );
    }

    #[test]
    fn auto_converge_needs_two_high_syncs() {
        let t0 = Instant::now();
        let mut c = Convergence::new(Duration::from_millis(300), true, t0, 0);
        assert_eq!(c.on_sync(600, 1000), None, "first high sync");
        assert_eq!(c.on_sync(600, 2000), Some(20), "second: initial throttle");
        assert_eq!(c.on_sync(100, 3000), None, "a low sync resets the count");
        assert_eq!(c.on_sync(600, 4000), None);
        assert_eq!(c.on_sync(600, 5000), Some(30));
        for _ in 0..20 {
            c.on_sync(600, 0);
        }
        assert_eq!(c.throttle_pct, 99);
    }
}
