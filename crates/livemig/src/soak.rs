//! `livemig soak`: one guest migrated back and forth between two long-lived
//! `livemig run --incoming` processes, A → B → A → …, every migration verified, with the
//! resident memory, open descriptors and threads of both processes sampled after each one
//! and held to stated bounds (`docs/soak.md`).

use crate::children::{connect_control, livemig, spawn_listening, vm_args, Children, Sockets};
use crate::control::{Client, MigrateArgs};
use crate::vmopts::VmOpts;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// What `livemig soak` was asked for.
pub struct Args {
    pub vm: VmOpts,
    pub mig: MigrateArgs,
    pub migrations: u32,
    /// How long the guest runs on each host before it moves on.
    pub dwell_ms: u64,
    pub json: bool,
    pub sabotage_leak: Option<crate::run::Leak>,
}

/// The bounds a process's figures must stay within, against the first sample taken in the
/// same state (holding the guest, or empty). The slack
/// covers what a healthy process does between two samples and nothing more
/// (`docs/soak.md`, "Bounds").
pub mod bounds {
    /// Resident memory may grow by this much ...
    pub const RSS_KIB: u64 = 32 << 10;
    /// ... or by this fraction of the baseline, whichever is larger.
    pub const RSS_FRACTION: f64 = 0.05;
    /// Descriptors: none may be left behind.
    pub const FDS: u64 = 0;
    /// Threads: none may be left behind.
    pub const THREADS: u64 = 0;
}

/// One look at a process in `/proc`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Sample {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

/// Reads a process's resident memory, thread count and open descriptors.
pub fn sample(pid: u32) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/status has no {name}"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count() as u64;
    Ok(Sample {
        rss_kib: field("VmRSS:")?,
        fds,
        threads: field("Threads:")?,
    })
}

/// A figure that left its bound.
#[derive(Debug, serde::Serialize)]
pub struct Breach {
    pub process: String,
    pub migration: u32,
    pub what: &'static str,
    pub baseline: u64,
    pub seen: u64,
    pub allowed: u64,
}

/// Tracks one process's samples per state and checks each against its baseline.
#[derive(Default)]
struct Watch {
    /// Samples by state: [empty, holding], each with the migration it followed.
    seen: [Vec<(u32, Sample)>; 2],
}

impl Watch {
    /// Records a sample and checks it against the first one of its state.
    fn add(&mut self, name: &str, migration: u32, holding: bool, s: Sample, out: &mut Vec<Breach>) {
        let v = &mut self.seen[holding as usize];
        v.push((migration, s));
        let base = v[0].1;
        let rss_allowed = bounds::RSS_KIB.max((base.rss_kib as f64 * bounds::RSS_FRACTION) as u64);
        for (what, b, seen, slack) in [
            ("rss-kib", base.rss_kib, s.rss_kib, rss_allowed),
            ("fds", base.fds, s.fds, bounds::FDS),
            ("threads", base.threads, s.threads, bounds::THREADS),
        ] {
            if seen > b + slack {
                out.push(Breach {
                    process: name.into(),
                    migration,
                    what,
                    baseline: b,
                    seen,
                    allowed: b + slack,
                });
            }
        }
    }

    fn summary(&self) -> Value {
        let state = |v: &Vec<(u32, Sample)>| {
            let col = |f: fn(&Sample) -> u64| {
                let xs: Vec<u64> = v.iter().map(|(_, s)| f(s)).collect();
                json!({
                    "baseline": xs.first(), "last": xs.last(),
                    "min": xs.iter().min(), "max": xs.iter().max(),
                })
            };
            json!({
                "samples": v.len(),
                "rss-kib": col(|s| s.rss_kib),
                "fds": col(|s| s.fds),
                "threads": col(|s| s.threads),
            })
        };
        json!({ "empty": state(&self.seen[0]), "holding": state(&self.seen[1]) })
    }
}

/// One of the two long-lived processes.
struct Host {
    name: &'static str,
    pid: u32,
    addr: String,
    client: Client,
    watch: Watch,
}

fn status(c: &mut Client) -> Result<Value> {
    c.execute("query-status", json!({}))
}

/// Waits until `c` reports `want` as its status, within `limit`.
fn wait_status(c: &mut Client, want: &str, limit: Duration, who: &str) -> Result<Value> {
    let t = Instant::now();
    loop {
        let st = status(c)?;
        if st["status"] == want {
            return Ok(st);
        }
        if t.elapsed() > limit {
            bail!("{who} did not reach '{want}' within {limit:?}: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Migrates the guest from `from` to `to_addr` and checks the outcome: completed, verified.
fn migrate(from: &mut Client, to_addr: &str, mig: &MigrateArgs) -> Result<Value> {
    let args = MigrateArgs {
        uri: to_addr.to_string(),
        ..mig.clone()
    };
    from.execute("migrate", serde_json::to_value(&args)?)?;
    let info = crate::summary::follow(from, false)?;
    if info["status"] != "completed" {
        bail!(
            "the migration ended {} ({}): {}",
            info["status"],
            info["livemig"]["outcome"],
            info["error-desc"]
        );
    }
    if info["livemig"]["verify"] != "off" && info["livemig"]["verified"] != true {
        bail!("the migration was not verified: {}", info["livemig"]["verify-detail"]);
    }
    Ok(info)
}

/// The logs of the children, kept only if the soak fails.
struct Logs(PathBuf, bool);

impl Drop for Logs {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File> {
    let p = dir.join(format!("{name}.log"));
    std::fs::File::create(&p).with_context(|| p.display().to_string())
}

/// Runs the soak; the exit status is 0 only if every migration completed verified and no
/// figure left its bound.
pub fn run(a: &Args) -> Result<i32> {
    vmm::kvm_for_tests().map_err(|e| anyhow!("the soak needs KVM: {e}"))?;
    a.vm.validate()?;
    a.vm.config()?;
    if a.migrations < 4 {
        bail!("--migrations must be at least 4: each process is then compared in both of its states");
    }
    let me = std::process::id();
    let mut logs = Logs(std::env::temp_dir().join(format!("livemig-soak-{me}")), false);
    std::fs::create_dir_all(&logs.0).with_context(|| logs.0.display().to_string())?;
    let res = soak(a, &logs.0);
    if res.as_ref().map_or(true, |v| v["passed"] != true) {
        logs.1 = true;
        tracing::warn!(dir = %logs.0.display(), "the processes' logs are kept");
    }
    let mut v = res?;
    if logs.1 {
        v["logs"] = json!(logs.0);
    }
    if a.json {
        out!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print(&v);
    }
    Ok(if v["passed"] == true { 0 } else { 1 })
}

fn soak(a: &Args, logs: &Path) -> Result<Value> {
    let me = std::process::id();
    let sock = |name: &str| PathBuf::from(format!("/tmp/livemig-soak-{me}-{name}.sock"));
    // Declared before the children, so dropped after them.
    let _sockets = Sockets(["A", "B", "origin"].iter().map(|n| sock(n)).collect());
    let mut kids = Children::default();
    let mut hosts = Vec::new();
    for name in ["A", "B"] {
        let sock = sock(name);
        let mut cmd = livemig()?;
        cmd.args(["run", "--incoming", "127.0.0.1:0", "--control"])
            .arg(&sock)
            .args(["--peer-timeout", &format!("{}", a.mig.peer_timeout as f64 / 1000.0)])
            .stderr(Stdio::from(log_file(logs, name)?));
        if let Some(leak) = a.sabotage_leak {
            cmd.args(["--sabotage-leak", &format!("{leak:?}").to_lowercase()]);
        }
        let (addr, _out) = spawn_listening(cmd, &mut kids, &format!("host {name}"))?;
        let i = kids.0.len() - 1;
        let pid = kids.0[i].id();
        let client = connect_control(&sock, &mut kids.0[i], &format!("host {name}"))?;
        tracing::info!(host = name, pid, %addr, "host waiting for the guest");
        hosts.push(Host {
            name,
            pid,
            addr,
            client,
            watch: Watch::default(),
        });
    }

    // The guest starts in an origin process, which hands it to A and leaves.
    let sock = sock("origin");
    let origin = livemig()?
        .arg("run")
        .args(vm_args(&a.vm))
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file(logs, "origin")?))
        .spawn()
        .context("starting the origin VM process")?;
    kids.0.push(origin);
    let oi = kids.0.len() - 1;
    let mut oc = connect_control(&sock, &mut kids.0[oi], "origin VM")?;
    std::thread::sleep(Duration::from_millis(a.dwell_ms));
    migrate(&mut oc, &hosts[0].addr, &a.mig).context("migration 0 (origin → A)")?;
    oc.execute("quit", json!({}))?;
    let t = Instant::now();
    while kids.0[oi].try_wait()?.is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the origin process did not exit within 30 s of quit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_status(&mut hosts[0].client, "running", Duration::from_secs(30), "host A")?;
    tracing::info!(
        migrations = a.migrations,
        "migration 0: origin → A, verified; the ping-pong migrations follow"
    );

    let mut breaches = Vec::new();
    let mut runs = Vec::new();
    let started = Instant::now();
    for m in 1..=a.migrations {
        let (f, t) = if m % 2 == 1 { (0, 1) } else { (1, 0) };
        std::thread::sleep(Duration::from_millis(a.dwell_ms));
        let before = status(&mut hosts[f].client)?;
        let to = hosts[t].addr.clone();
        let info = migrate(&mut hosts[f].client, &to, &a.mig)
            .with_context(|| format!("migration {m} ({} → {})", hosts[f].name, hosts[t].name))?;
        hosts[f]
            .client
            .execute("release", json!({}))
            .with_context(|| format!("releasing the guest held by {}", hosts[f].name))?;
        let (fname, tname) = (hosts[f].name, hosts[t].name);
        wait_status(&mut hosts[f].client, "inmigrate", Duration::from_secs(30), fname)?;
        let after = wait_status(&mut hosts[t].client, "running", Duration::from_secs(30), tname)?;
        // The guest must be making progress on its new host, its accelerator too.
        std::thread::sleep(Duration::from_millis(a.dwell_ms));
        let after = {
            let now = status(&mut hosts[t].client)?;
            if u(&now, "pages-written") <= u(&after, "pages-written") && a.vm.rate > 0.0 {
                bail!(
                    "migration {m}: the guest wrote no pages on {} after it arrived",
                    hosts[t].name
                );
            }
            if u(&now, "jobs-completed") <= u(&after, "jobs-completed") && a.vm.device_count() > 0 {
                bail!(
                    "migration {m}: the accelerator completed no jobs on {} after it arrived",
                    hosts[t].name
                );
            }
            now
        };
        if u(&after, "guest-errors") != 0 {
            bail!("migration {m}: the guest reports {} errors", u(&after, "guest-errors"));
        }
        let mut line = format!(
            "migration {m}/{}: {} → {}, verified, downtime {:.1} ms, total {} ms",
            a.migrations,
            hosts[f].name,
            hosts[t].name,
            u(&info, "downtime-us") as f64 / 1e3,
            u(&info, "total-time"),
        );
        for (i, h) in hosts.iter_mut().enumerate() {
            let s = sample(h.pid)?;
            h.watch.add(h.name, m, i == t, s, &mut breaches);
            line += &format!(
                "; {} {} MiB {} fds {} threads",
                h.name,
                s.rss_kib >> 10,
                s.fds,
                s.threads
            );
        }
        tracing::info!("{line}");
        runs.push(json!({
            "migration": m,
            "from": hosts[f].name,
            "to": hosts[t].name,
            "downtime-us": u(&info, "downtime-us"),
            "total-time-ms": u(&info, "total-time"),
            "pages-before": u(&before, "pages-written"),
            "jobs-before": u(&before, "jobs-completed"),
            "pages-after": u(&after, "pages-written"),
            "jobs-after": u(&after, "jobs-completed"),
        }));
        if !breaches.is_empty() {
            break;
        }
    }
    let mut downtimes: Vec<u64> = runs.iter().map(|r| u(r, "downtime-us")).collect();
    downtimes.sort_unstable();
    let mut totals: Vec<u64> = runs.iter().map(|r| u(r, "total-time-ms")).collect();
    totals.sort_unstable();
    Ok(json!({
        "passed": breaches.is_empty() && runs.len() == a.migrations as usize,
        "migrations": runs.len(),
        "memory-mib": a.vm.memory_mib,
        "mode": a.mig.mode,
        "seconds": started.elapsed().as_secs_f64(),
        "downtime-us": { "min": downtimes.first(), "median": downtimes.get(downtimes.len() / 2), "max": downtimes.last() },
        "total-time-ms": { "min": totals.first(), "median": totals.get(totals.len() / 2), "max": totals.last() },
        "bounds": {
            "rss-kib": format!("baseline + max({} KiB, {} %)", bounds::RSS_KIB, bounds::RSS_FRACTION * 100.0),
            "fds": format!("baseline + {}", bounds::FDS),
            "threads": format!("baseline + {}", bounds::THREADS),
        },
        "processes": hosts.iter().map(|h| (h.name.to_string(), h.watch.summary())).collect::<serde_json::Map<_, _>>(),
        "breaches": breaches,
        "runs": runs,
    }))
}

fn print(v: &Value) {
    let ms = |k: &str, q: &str| v[k][q].as_u64().unwrap_or(0) as f64 / 1e3;
    out!(
        "soak {}: {} migrations of a {} MiB guest (mode {}) in {:.0} s, every one verified{}",
        if v["passed"] == true { "PASSED" } else { "FAILED" },
        v["migrations"],
        v["memory-mib"],
        v["mode"].as_str().unwrap_or(""),
        v["seconds"].as_f64().unwrap_or(0.0),
        if v["passed"] == true {
            ""
        } else {
            "; stopped at the first figure out of bounds"
        }
    );
    out!(
        "  downtime          min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms("downtime-us", "min"),
        ms("downtime-us", "median"),
        ms("downtime-us", "max")
    );
    out!(
        "  total time        min {} ms, median {} ms, max {} ms",
        v["total-time-ms"]["min"],
        v["total-time-ms"]["median"],
        v["total-time-ms"]["max"]
    );
    out!("  process  state    samples  RSS MiB (baseline → max)  fds (baseline → max)  threads (baseline → max)");
    if let Some(ps) = v["processes"].as_object() {
        for (name, p) in ps {
            for state in ["holding", "empty"] {
                let s = &p[state];
                let f = |k: &str, q: &str| s[k][q].as_u64().unwrap_or(0);
                out!(
                    "  {name:<8} {state:<8} {:>7}  {:>8} → {:<14} {:>6} → {:<13} {:>6} → {}",
                    s["samples"],
                    f("rss-kib", "baseline") >> 10,
                    f("rss-kib", "max") >> 10,
                    f("fds", "baseline"),
                    f("fds", "max"),
                    f("threads", "baseline"),
                    f("threads", "max"),
                );
            }
        }
    }
    out!(
        "  bounds            RSS {}, fds {}, threads {}",
        v["bounds"]["rss-kib"].as_str().unwrap_or(""),
        v["bounds"]["fds"].as_str().unwrap_or(""),
        v["bounds"]["threads"].as_str().unwrap_or("")
    );
    if let Some(b) = v["breaches"].as_array() {
        for b in b {
            out!(
                "  BREACH            {} after migration {}: {} {} (baseline {}, allowed {})",
                b["process"].as_str().unwrap_or(""),
                b["migration"],
                b["what"].as_str().unwrap_or(""),
                b["seen"],
                b["baseline"],
                b["allowed"]
            );
        }
    }
}
