//! Following a migration through `query-migrate`, with a progress display, and printing its
//! summary.

use crate::control::Client;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::time::Duration;

fn u(v: &Value, path: &str) -> u64 {
    path.split('.').fold(v, |v, k| &v[k]).as_u64().unwrap_or(0)
}

fn f(v: &Value, path: &str) -> f64 {
    path.split('.').fold(v, |v, k| &v[k]).as_f64().unwrap_or(0.0)
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    path.split('.').fold(v, |v, k| &v[k]).as_str().unwrap_or("")
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1e3)
}

/// Polls `query-migrate` until the migration ends; returns its final state.
pub fn follow(c: &mut Client, show: bool) -> Result<Value> {
    let pb = if show {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    let mut last = String::from("setup");
    loop {
        let i = c.execute("query-migrate", json!({})).with_context(|| {
            format!("the control socket failed while following the migration (last seen: {last}); did the source process exit?")
        })?;
        last = s(&i, "status").to_string();
        let status = s(&i, "status").to_string();
        pb.set_message(format!(
            "{status} · iteration {} · pages left {} · {:.0} MiB/s · sent {}",
            u(&i, "ram.iteration-count"),
            u(&i, "ram.remaining") / 4096,
            f(&i, "ram.mbps") * 1e6 / 8.0 / 1048576.0,
            mib(u(&i, "ram.transferred")),
        ));
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            pb.finish_and_clear();
            return Ok(i);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What became of the source's guest, in words.
fn outcome(i: &Value) -> String {
    match s(i, "livemig.outcome") {
        "completed" => "the destination runs the guest; the source held a paused copy until released".into(),
        "rolled-back" => "rolled back: the source runs the guest".into(),
        "held" => format!(
            "the source holds the guest PAUSED and resumable; destination: {}; an operator must decide \
             (see query-status)",
            s(i, "livemig.destination")
        ),
        o => o.into(),
    }
}

/// Prints the human summary.
pub fn print(i: &Value) {
    let status = s(i, "status");
    out!(
        "migration {status} (mode {}, verify {}, {} device(s), {} page channel(s), transport {}, CPU dirty log {})",
        s(i, "livemig.mode"),
        s(i, "livemig.verify"),
        u(i, "livemig.devices"),
        u(i, "livemig.channels"),
        s(i, "livemig.transport"),
        s(i, "livemig.cpu-dirty-log")
    );
    out!("  outcome           {}", outcome(i));
    if status != "completed" {
        out!("  reason            {}", s(i, "error-desc"));
    }
    out!(
        "  total time        {} ms (setup {} ms)",
        u(i, "total-time"),
        u(i, "setup-time")
    );
    if !i["downtime-us"].is_null() {
        let p = &i["livemig"]["downtime-parts"];
        out!(
            "  downtime          {} from the source's pause to the destination's resume ({} clock; expected {} ms at \
             switchover, limit {} ms)",
            ms(u(i, "downtime-us")),
            s(i, "livemig.downtime-clock"),
            u(i, "livemig.expected-downtime-at-switchover-ms"),
            u(i, "livemig.downtime-limit-ms"),
        );
        out!(
            "    parts           pause {}, device state {}, final pages {} ({} pages), vCPU state {}, verification {}, \
             destination {}, commit {}",
            ms(u(p, "pause")),
            ms(u(p, "device-state")),
            ms(u(p, "final-pages")),
            u(i, "livemig.final-pages"),
            ms(u(p, "vcpu-state")),
            ms(u(p, "verification")),
            ms(u(p, "destination")),
            ms(u(p, "commit")),
        );
        if !i["livemig"]["guest-blackout-us"].is_null() {
            out!(
                "    as the guest saw it {} (its last progress here to its first there)",
                ms(u(i, "livemig.guest-blackout-us"))
            );
        }
    }
    out!(
        "  iterations        {} ({} dirty syncs; switchover: {}; CPU throttle {} %{})",
        u(i, "ram.iteration-count"),
        u(i, "ram.dirty-sync-count"),
        s(i, "livemig.switchover-reason"),
        u(i, "cpu-throttle-percentage"),
        match u(i, "livemig.dirty-ring-overruns") {
            0 => String::new(),
            n => format!("; {n} dirty-ring overrun(s): every page counted dirty"),
        }
    );
    out!(
        "  bytes sent        {} on the wire: {} pages with data ({} of them compressed into {}), {} zero; device \
         state {} B",
        mib(u(i, "ram.transferred")),
        u(i, "ram.normal"),
        u(i, "livemig.compressed-pages"),
        mib(u(i, "livemig.compressed-bytes")),
        u(i, "ram.duplicate"),
        u(i, "vfio.transferred"),
    );
    out!(
        "  dirty rates       CPU {:.1} MiB/s, device {:.1} MiB/s ({} and {} pages over pre-copy)",
        u(i, "livemig.cpu-dirty-pages-rate") as f64 * 4096.0 / 1048576.0,
        u(i, "livemig.device-dirty-pages-rate") as f64 * 4096.0 / 1048576.0,
        u(i, "livemig.cpu-dirty-pages"),
        u(i, "livemig.device-dirty-pages"),
    );
    out!(
        "  guest wrote       CPU {:.1} MiB/s, device DMA {:.1} MiB/s (achieved over pre-copy, by the guest's counters)",
        f(i, "livemig.guest-cpu-write-mib-s"),
        f(i, "livemig.guest-dma-write-mib-s"),
    );
    if u(i, "livemig.dest-pages-after") > 0 {
        out!(
            "  destination       guest pages written {} -> {}, accel jobs {} -> {}",
            u(i, "livemig.dest-pages-before"),
            u(i, "livemig.dest-pages-after"),
            u(i, "livemig.dest-jobs-before"),
            u(i, "livemig.dest-jobs-after"),
        );
    }
    match i["livemig"]["verified"].as_bool() {
        Some(true) => out!(
            "  verified          yes ({}): {}",
            s(i, "livemig.verify"),
            s(i, "livemig.verify-detail")
        ),
        Some(false) => out!(
            "  verified          NO ({}): {}",
            s(i, "livemig.verify"),
            s(i, "livemig.verify-detail")
        ),
        None if s(i, "livemig.verify") == "off" => out!("  verified          not asked (--verify off)"),
        None => out!("  verified          not reached"),
    }
}
