//! Following a migration through `query-migrate`, with a progress display, and printing its
//! summary.

use crate::control::Client;
use anyhow::{bail, Result};
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
    loop {
        let i = c.execute("query-migrate", json!({}))?;
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

/// Prints the human summary; fails when the migration failed or did not verify.
pub fn print(i: &Value) -> Result<()> {
    let status = s(i, "status");
    println!(
        "migration {status} (mode {}, {} page channel(s), CPU dirty log {})",
        s(i, "livemig.mode"),
        u(i, "livemig.channels"),
        s(i, "livemig.cpu-dirty-log")
    );
    if status != "completed" {
        println!("  reason: {}", s(i, "error-desc"));
        println!(
            "  source vCPUs running: {}",
            i["livemig"]["source-vcpus-running"].as_bool().unwrap_or(false)
        );
        bail!("migration {status}: {}", s(i, "error-desc"));
    }
    let downtime_us = u(i, "downtime-us");
    println!(
        "  total time        {} ms (setup {} ms)",
        u(i, "total-time"),
        u(i, "setup-time")
    );
    println!(
        "  downtime          {:.1} ms (expected {} ms at switchover, limit {} ms; {} pages sent while paused)",
        downtime_us as f64 / 1e3,
        u(i, "livemig.expected-downtime-at-switchover-ms"),
        u(i, "livemig.downtime-limit-ms"),
        u(i, "livemig.final-pages")
    );
    println!(
        "  iterations        {} ({} dirty syncs; switchover: {}; CPU throttle {} %)",
        u(i, "ram.iteration-count"),
        u(i, "ram.dirty-sync-count"),
        s(i, "livemig.switchover-reason"),
        u(i, "cpu-throttle-percentage")
    );
    println!(
        "  bytes sent        {} on the wire: {} pages normal ({}), {} zero, {} compressed into {}; device state {} B",
        mib(u(i, "ram.transferred")),
        u(i, "ram.normal"),
        mib(u(i, "ram.normal-bytes")),
        u(i, "ram.duplicate"),
        u(i, "livemig.compressed-pages"),
        mib(u(i, "livemig.compressed-bytes")),
        u(i, "vfio.transferred"),
    );
    println!(
        "  dirty rates       CPU {:.1} MiB/s, device {:.1} MiB/s ({} and {} pages over pre-copy)",
        u(i, "livemig.cpu-dirty-pages-rate") as f64 * 4096.0 / 1048576.0,
        u(i, "livemig.device-dirty-pages-rate") as f64 * 4096.0 / 1048576.0,
        u(i, "livemig.cpu-dirty-pages"),
        u(i, "livemig.device-dirty-pages"),
    );
    println!(
        "  destination       guest pages written {} -> {}, accel jobs {} -> {} (verification took {:.1} ms, outside the downtime)",
        u(i, "livemig.dest-pages-before"),
        u(i, "livemig.dest-pages-after"),
        u(i, "livemig.dest-jobs-before"),
        u(i, "livemig.dest-jobs-after"),
        f(i, "livemig.dest-verify-ms"),
    );
    match i["livemig"]["verified"].as_bool() {
        Some(true) => println!("  verified          yes: {}", s(i, "livemig.verify-detail")),
        Some(false) => {
            println!("  verified          NO: {}", s(i, "livemig.verify-detail"));
            bail!("verification failed");
        }
        None => println!("  verified          not asked (--verify)"),
    }
    Ok(())
}
