//! `livemig receive`: wait for one incoming VM, run it. Exits non-zero, with the VM
//! discarded, when the source never committed or the guest failed verification.

use anyhow::{bail, Context, Result};
use migration::DestOptions;
use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};
use vmm::progress::{JOBS, PAGES};
use vmm::GuestProbe;

pub fn receive(listen: &str, opts: DestOptions, exit_after_ms: Option<u64>) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    // The first line tells a parent process which port was chosen.
    out!("listening on {}", l.local_addr()?);
    let _ = std::io::stdout().flush();
    let inc = tracing::info_span!("receive")
        .in_scope(|| migration::receive(&l, &opts))
        .map_err(|e| anyhow::anyhow!("{}; no guest runs here", e.chain()))?;
    let r = &inc.report;
    out!(
        "received: {} pages, {} device bytes, {} iterations; guest running ({:.1} ms from switchover to running)",
        r.pages_received,
        r.device_bytes,
        r.iterations,
        r.resume_time.as_secs_f64() * 1e3
    );
    match (&r.report, &r.unverified) {
        (_, Some(why)) => out!("WARNING: the guest runs UNVERIFIED: {why}"),
        (Some(v), None) if v.checked => {
            out!("verified: memory, device and vCPU state match the source; the guest makes progress")
        }
        _ => {}
    }
    let _ = std::io::stdout().flush();
    let t = Instant::now();
    let mut last = Instant::now();
    loop {
        if let Some(ms) = exit_after_ms {
            if t.elapsed() >= Duration::from_millis(ms) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let p = inc.vm.progress();
            tracing::info!(
                pages_written = p.count(PAGES),
                jobs_completed = p.count(JOBS),
                errors = p.errors,
                "guest progress"
            );
            if let Some(s) = inc.vm.vcpu_stopped() {
                bail!("the guest stopped: {s:?}");
            }
        }
    }
    let p = inc.vm.progress();
    out!(
        "guest after {:.1} s on this host: {} pages written, {} accel jobs completed, {} errors",
        t.elapsed().as_secs_f64(),
        p.count(PAGES),
        p.count(JOBS),
        p.errors
    );
    Ok(())
}
