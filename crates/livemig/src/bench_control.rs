//! `livemig bench control`: does a crowd of management clients polling `query-migrate` slow
//! a migration down? The same guest is migrated with and without N clients polling the
//! source's control socket, interleaved, and the downtimes and total times are compared; the
//! clients' own figures (requests served, errors, reply latency) come with them.

use crate::bench::fmt_ratio;
use crate::bench_net::{self, Once};
use crate::control::{Client, MigrateArgs};
use crate::vmopts::VmOpts;
use anyhow::{anyhow, Result};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the clients saw.
#[derive(Clone, Debug, Default)]
pub struct PollStats {
    pub clients: usize,
    pub requests: u64,
    pub errors: u64,
    /// Reply latencies, sorted.
    pub latencies: Vec<Duration>,
    /// How long the clients polled.
    pub wall: Duration,
    /// CPU time the clients' threads used (this process).
    pub client_cpu: Duration,
    /// CPU time the source's threads serving them used.
    pub server_cpu: Duration,
}

impl PollStats {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// N clients, each on its own connection, polling `query-migrate` every `interval`.
pub struct Pollers {
    started: Instant,
    cpu0: Duration,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<(u64, u64, Vec<Duration>)>>,
}

impl Pollers {
    /// Connects all clients before returning, so that every one is polling when the
    /// migration starts.
    pub fn start(sock: &Path, clients: usize, interval: Duration) -> Result<Pollers> {
        // Built first, so that a connection failing half-way stops the clients already
        // polling (on drop).
        let mut p = Pollers {
            started: Instant::now(),
            cpu0: crate::bench_migration::cpu_now(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(clients),
        };
        for i in 0..clients {
            let mut c = Client::connect(sock)?;
            let stop = p.stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("poller-{i}"))
                .spawn(move || {
                    let (mut ok, mut err, mut lat) = (0u64, 0u64, Vec::new());
                    while !stop.load(Ordering::Acquire) {
                        let t = Instant::now();
                        match c.execute("query-migrate", json!({})) {
                            Ok(_) => {
                                ok += 1;
                                lat.push(t.elapsed());
                            }
                            Err(_) => err += 1,
                        }
                        std::thread::sleep(interval);
                    }
                    (ok, err, lat)
                })
                .map_err(|e| anyhow!("starting poller {i}: {e}"))?;
            p.threads.push(t);
        }
        Ok(p)
    }

    /// Stops the clients; `server_cpu` is what the serving threads used, measured by the
    /// caller before the clients hang up (their threads, and their counts, go with them).
    pub fn stop(mut self, server_cpu: Duration) -> PollStats {
        self.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut self.threads);
        let mut s = PollStats {
            clients: threads.len(),
            wall: self.started.elapsed(),
            client_cpu: crate::bench_migration::cpu_now().saturating_sub(self.cpu0),
            server_cpu,
            ..Default::default()
        };
        for t in threads {
            if let Ok((ok, err, lat)) = t.join() {
                s.requests += ok;
                s.errors += err;
                s.latencies.extend(lat);
            } else {
                s.errors += 1;
            }
        }
        s.latencies.sort_unstable();
        s
    }
}

/// Clients left polling when a run fails half-way are stopped.
impl Drop for Pollers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

pub struct Args {
    pub vm: VmOpts,
    pub mig: MigrateArgs,
    pub clients: usize,
    pub interval_ms: u64,
    pub runs: usize,
    pub warmup_ms: u64,
}

/// CPU time of process `pid`'s threads whose name starts with `prefix`.
pub fn threads_cpu(pid: u32, prefix: &str) -> Duration {
    crate::bench_migration::task_times(&format!("/proc/{pid}/task"), prefix)
        .into_iter()
        .map(|(_, t)| t)
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(a: &Args) -> Result<()> {
    vmm::kvm_for_tests().map_err(|e| anyhow!("bench control needs KVM: {e}"))?;
    a.vm.validate()?;
    // [without, with]: downtimes and total times in ms.
    let mut down = [Vec::new(), Vec::new()];
    let mut total = [Vec::new(), Vec::new()];
    let mut stats = PollStats::default();
    let mut n = 0;
    for run in 0..a.runs {
        for (k, clients) in [0, a.clients].into_iter().enumerate() {
            n += 1;
            let once = Once {
                hosts: None,
                vm: &a.vm,
                mig: &a.mig,
                mode: &a.mig.mode,
                relay: None,
                warmup_ms: a.warmup_ms,
                n,
                pollers: (clients > 0).then_some((clients, Duration::from_millis(a.interval_ms))),
            };
            let (info, polled) = bench_net::migrate_once(&once)?;
            if info["status"] != "completed" {
                anyhow::bail!(
                    "run {run}: the migration ended {}: {}",
                    info["status"],
                    info["error-desc"]
                );
            }
            let dt = info["downtime-us"].as_u64().unwrap_or(0) as f64 / 1e3;
            let tt = info["total-time"].as_u64().unwrap_or(0) as f64;
            tracing::info!(
                "[bench control] run {}/{} with {clients} clients: downtime {dt:.1} ms ({}), total {tt:.0} ms",
                run + 1,
                a.runs,
                info["livemig"]["downtime-parts"]
            );
            down[k].push(dt);
            total[k].push(tt);
            if let Some(p) = polled {
                stats.clients = p.clients;
                stats.requests += p.requests;
                stats.errors += p.errors;
                stats.latencies.extend(p.latencies);
                stats.wall += p.wall;
                stats.client_cpu += p.client_cpu;
                stats.server_cpu += p.server_cpu;
            }
        }
    }
    stats.latencies.sort_unstable();
    let range = |v: &Vec<f64>| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.1}–{hi:.1}")
    };
    println!(
        "\n{} migrations of a {} MiB guest (mode {}), interleaved: without clients, then with {} clients each \
         polling query-migrate every {} ms on its own connection. Medians, with the range.\n",
        2 * a.runs,
        a.vm.memory_mib,
        a.mig.mode,
        a.clients,
        a.interval_ms
    );
    println!("| clients | downtime median | range | total time median | range |");
    println!("|---|---|---|---|---|");
    for (k, clients) in [0, a.clients].into_iter().enumerate() {
        println!(
            "| {clients} | {:.1} ms | {} ms | {:.0} ms | {} ms |",
            median(down[k].clone()),
            range(&down[k]),
            median(total[k].clone()),
            range(&total[k])
        );
    }
    println!(
        "\ndowntime with ÷ without: {}; total time with ÷ without: {}",
        fmt_ratio(median(down[1].clone()) / median(down[0].clone()).max(1e-9)),
        fmt_ratio(median(total[1].clone()) / median(total[0].clone()).max(1e-9)),
    );
    let per_s = |d: Duration| d.as_secs_f64() / stats.wall.as_secs_f64().max(1e-9);
    println!(
        "the clients: {:.0} requests/s; their threads used {:.2} CPU-s per s, the source's threads serving them {:.2}",
        stats.requests as f64 / stats.wall.as_secs_f64().max(1e-9),
        per_s(stats.client_cpu),
        per_s(stats.server_cpu),
    );
    println!(
        "the clients: {} replies, {} errors; reply latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        stats.requests,
        stats.errors,
        stats.percentile(0.5).as_secs_f64() * 1e3,
        stats.percentile(0.99).as_secs_f64() * 1e3,
        stats.percentile(1.0).as_secs_f64() * 1e3,
    );
    Ok(())
}
