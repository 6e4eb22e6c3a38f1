//! `livemig bench migration`: real migrations of one guest shape, in-process over loopback,
//! per transport, device-tracking mode and verification mode; the downtime table against the
//! `none` mode, and the transport table against plain TCP, both from the same run.

use crate::bench::fmt_ratio;
use crate::vmopts::VmOpts;
use anyhow::{anyhow, bail, Result};
use migration::transport::throwaway;
use migration::{
    DestOptions, DeviceTracking, MigrationControl, MigrationInfo, Psk, Security, SourceOptions, TlsCreds, VerifyMode,
};
use std::sync::Arc;
use std::time::Duration;

/// What to run.
pub struct Args {
    pub vm: VmOpts,
    pub modes: Vec<String>,
    pub verify: Vec<String>,
    pub transports: Vec<String>,
    pub warmup_ms: u64,
    pub channels: u16,
    pub compress: bool,
    /// Fill RAM past the working set with incompressible bytes first.
    pub fill: bool,
    pub runs: usize,
}

/// Raw loopback TCP throughput in bytes/s: the ceiling for any migration stream.
fn loopback_tcp(bytes: u64) -> Result<f64> {
    loopback_tcp_n(1, bytes)
}

/// Raw loopback TCP throughput in bytes/s over `conns` connections sending `bytes` between
/// them at once: what a migration on as many connections is compared against.
pub(crate) fn loopback_tcp_n(conns: u16, bytes: u64) -> Result<f64> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let n = conns.max(1) as u64;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let readers: Vec<_> = (0..n)
            .map(|_| {
                let (mut s, _) = l.accept()?;
                Ok(std::thread::spawn(move || -> std::io::Result<u64> {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut got = 0u64;
                    loop {
                        match s.read(&mut buf)? {
                            0 => return Ok(got),
                            k => got += k as u64,
                        }
                    }
                }))
            })
            .collect::<std::io::Result<_>>()?;
        let mut total = 0;
        for r in readers {
            total += r.join().map_err(|_| std::io::Error::other("a reader panicked"))??;
        }
        Ok(total)
    });
    let socks = (0..n)
        .map(|_| std::net::TcpStream::connect(addr))
        .collect::<std::io::Result<Vec<_>>>()?;
    let t = std::time::Instant::now();
    let writers: Vec<_> = socks
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0x5au8; 1 << 20];
                for _ in 0..(bytes / n) >> 20 {
                    s.write_all(&buf)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        w.join().map_err(|_| anyhow!("a writer panicked"))??;
    }
    let got = rx.join().map_err(|_| anyhow!("receiver panicked"))??;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

/// Raw loopback TCP over `conns` connections into fresh guest memory, beside a busy core:
/// `bytes` split between the connections, each receiver copying what it reads into a region
/// of its own allocated as a destination VM's RAM is (untouched, huge pages advised), while a
/// spinning thread takes a core as a running guest's vCPU does. This is the floor under any
/// live migration on this host: every byte lands in memory touched for the first time, on
/// the cores the guest leaves. Bytes/s.
pub(crate) fn fresh_ram_tcp(conns: u16, bytes: u64) -> Result<f64> {
    use std::io::{Read, Write};
    use vm_memory::{Bytes, GuestAddress};
    let n = conns.max(1) as u64;
    let per = (bytes / n) >> 20 << 20;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let sinks = (0..n)
        .map(|_| vmm::bench_kit::fresh_ram(per).map_err(|e| anyhow!("{e}")))
        .collect::<Result<Vec<_>>>()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spin = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    };
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let readers: Vec<_> = sinks
            .into_iter()
            .map(|mem| {
                let (mut s, _) = l.accept()?;
                Ok(std::thread::spawn(move || -> std::io::Result<u64> {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut at = 0u64;
                    loop {
                        match s.read(&mut buf)? {
                            0 => return Ok(at),
                            k => {
                                mem.write_slice(&buf[..k], GuestAddress(at))
                                    .map_err(std::io::Error::other)?;
                                at += k as u64;
                            }
                        }
                    }
                }))
            })
            .collect::<std::io::Result<_>>()?;
        let mut total = 0;
        for r in readers {
            total += r.join().map_err(|_| std::io::Error::other("a reader panicked"))??;
        }
        Ok(total)
    });
    let socks = (0..n)
        .map(|_| std::net::TcpStream::connect(addr))
        .collect::<std::io::Result<Vec<_>>>()?;
    let t = std::time::Instant::now();
    let writers: Vec<_> = socks
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0x5au8; 1 << 20];
                for _ in 0..per >> 20 {
                    s.write_all(&buf)?;
                }
                Ok(())
            })
        })
        .collect();
    let mut r = Ok(());
    for w in writers {
        if let Err(e) = w.join().map_err(|_| anyhow!("a writer panicked")).and_then(|x| Ok(x?)) {
            r = Err(e);
        }
    }
    let got = rx.join().map_err(|_| anyhow!("receiver panicked"));
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = spin.join();
    r?;
    Ok(got?? as f64 / secs)
}

/// Both sides' transport for `name`: TLS with throwaway credentials in `dir`, a random key.
pub(crate) fn security(name: &str, dir: &std::path::Path) -> Result<(Security, Security)> {
    Ok(match name {
        "tcp" => (Security::Plain, Security::Plain),
        "tls" => {
            let f = throwaway::generate(dir).map_err(|e| anyhow!(e))?;
            let load = |s: &throwaway::Side| -> Result<Security> {
                Ok(Security::Tls(Arc::new(
                    TlsCreds::load(&s.cert, &s.key, &f.ca, None).map_err(|e| anyhow!(e))?,
                )))
            };
            (load(&f.source)?, load(&f.dest)?)
        }
        "psk" => {
            let hex: String = (0..4).map(|_| format!("{:016x}", rand::random::<u64>())).collect();
            let k = Arc::new(Psk::from_hex(&hex).map_err(|e| anyhow!(e))?);
            (Security::Psk(k.clone()), Security::Psk(k))
        }
        t => bail!("unknown transport '{t}' (tcp, tls, psk)"),
    })
}

/// CPU time of this process (every thread: both ends, their helpers and the guest's vCPUs).
pub(crate) fn cpu_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time of this process's vCPU threads, by thread id (from `/proc/self/task`).
fn vcpu_times() -> Vec<(u32, Duration)> {
    task_times("/proc/self/task", "vcpu")
}

/// CPU time of the threads under `tasks` (a `/proc/PID/task` directory) whose name starts
/// with `prefix`, by thread id.
pub(crate) fn task_times(tasks: &str, prefix: &str) -> Vec<(u32, Duration)> {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let Ok(dir) = std::fs::read_dir(tasks) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        if !comm.starts_with(prefix) {
            return None;
        }
        // utime and stime are fields 14 and 15, counted after the parenthesised name.
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((tid, Duration::from_nanos(ticks * 1_000_000_000 / hz)))
    })
    .collect()
}

/// The vCPU threads' CPU time between two samples (threads born in between count whole).
fn vcpu_delta(before: &[(u32, Duration)], after: &[(u32, Duration)]) -> Duration {
    after
        .iter()
        .map(|(tid, t)| {
            let t0 = before.iter().find(|(b, _)| b == tid).map_or(Duration::ZERO, |b| b.1);
            t.saturating_sub(t0)
        })
        .sum()
}

struct Row {
    transport: String,
    mode: DeviceTracking,
    verify: VerifyMode,
    info: MigrationInfo,
    /// CPU seconds the whole process used during the migration.
    cpu: f64,
    /// Of them, the guests' vCPUs'.
    vcpu: f64,
}

fn one(a: &Args, transport: &str, mode: DeviceTracking, verify: VerifyMode, dir: &std::path::Path) -> Result<Row> {
    let (src_sec, dst_sec) = security(transport, dir)?;
    let mut vm = a.vm.clone();
    vm.fill_ram |= a.fill;
    let src = Arc::new(vm.build()?);
    src.resume()?;
    std::thread::sleep(Duration::from_millis(a.warmup_ms));
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let dopts = DestOptions {
        security: dst_sec,
        ..Default::default()
    };
    let dest = std::thread::spawn(move || migration::receive(&l, &dopts));
    let ctl = MigrationControl::default();
    let opts = SourceOptions {
        mode,
        channels: a.channels,
        verify,
        compress: a.compress,
        security: src_sec,
        ..Default::default()
    };
    let (c0, v0) = (cpu_now(), vcpu_times());
    let info = migration::migrate(&src, &addr, &opts, &ctl).map_err(|e| anyhow!("{mode}: {}", e.chain()))?;
    let inc = dest
        .join()
        .map_err(|_| anyhow!("destination panicked"))?
        .map_err(|e| anyhow!("{}", e.chain()))?;
    let cpu = (cpu_now() - c0).as_secs_f64();
    let vcpu = vcpu_delta(&v0, &vcpu_times()).as_secs_f64();
    if verify != VerifyMode::Off && info.livemig.verified != Some(true) {
        bail!("{mode}: verification failed: {}", info.livemig.verify_detail);
    }
    drop(inc);
    drop(src);
    Ok(Row {
        transport: transport.into(),
        mode,
        verify,
        info,
        cpu,
        vcpu,
    })
}

/// GiB on the wire.
fn gib(i: &MigrationInfo) -> f64 {
    (i.ram.transferred as f64 / (1u64 << 30) as f64).max(1e-9)
}

/// Pre-copy throughput in MiB/s: what pre-copy sent over how long it took.
pub(crate) fn throughput(i: &MigrationInfo) -> f64 {
    i.ram.precopy_bytes as f64 / 1048576.0 / (i.livemig.precopy_ms / 1e3).max(1e-6)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(a: &Args) -> Result<()> {
    vmm::kvm_for_tests().map_err(|e| anyhow!("KVM is needed: {e}"))?;
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let modes = a
        .modes
        .iter()
        .map(|m| DeviceTracking::parse(m).ok_or_else(|| anyhow!("unknown mode '{m}' (iommu, device-log, none)")))
        .collect::<Result<Vec<_>>>()?;
    let verifies = a
        .verify
        .iter()
        .map(|v| VerifyMode::parse(v).ok_or_else(|| anyhow!("unknown verify mode '{v}' (gate, audit, off)")))
        .collect::<Result<Vec<_>>>()?;
    let dir = std::env::temp_dir().join(format!("livemig-bench-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());
    for t in &a.transports {
        security(t, &dir)?;
    }
    // Runs interleave the transports, so drift over the session falls on all of them alike.
    let mut rows = Vec::new();
    let total = a.runs * a.transports.len() * modes.len() * verifies.len();
    for run in 0..a.runs {
        for &v in &verifies {
            for &m in &modes {
                for t in &a.transports {
                    tracing::info!(
                        "[{}/{total}] migrating: transport {t}, mode {m}, verify {v}, run {} ...",
                        rows.len() + 1,
                        run + 1
                    );
                    rows.push(one(a, t, m, v, &dir)?);
                }
            }
        }
    }
    let tcp = loopback_tcp(2 << 30)?;
    let vm = &a.vm;
    println!(
        "{} MiB guest, dirtier at {} MiB/s over {} MiB ({:?}), accelerator {}; CPU dirty log {}; {} page channel(s); \
         {}; {}; downtime limit 300 ms; {} run(s) each, medians. Raw loopback TCP in the same run: {:.2} GiB/s. \
         Downtime: the source's pause to the destination's resume on the shared monotonic clock; blackout: the \
         guest's last progress on the source to its first on the destination.\n",
        vm.memory_mib,
        vm.rate,
        vm.ws()?,
        vm.pattern,
        if vm.device_count() == 0 { "absent" } else { "busy" },
        vm.dirty_log,
        a.channels,
        if a.compress { "LZ4" } else { "no compression" },
        if a.fill {
            "RAM past the working set filled with incompressible bytes"
        } else {
            "RAM past the working set zero"
        },
        a.runs,
        tcp / (1u64 << 30) as f64
    );
    // One line per configuration: the medians of its runs.
    struct Med {
        transport: String,
        mode: DeviceTracking,
        verify: VerifyMode,
        downtime: f64,
        verification: f64,
        blackout: Option<f64>,
        expected: f64,
        total: f64,
        iterations: f64,
        dev_dirty: f64,
        sent: f64,
        wire: f64,
        throughput: f64,
        cpu_per_gib: f64,
        engine_per_gib: f64,
    }
    let mut meds: Vec<Med> = Vec::new();
    for r in &rows {
        if meds
            .iter()
            .any(|m| m.transport == r.transport && m.mode == r.mode && m.verify == r.verify)
        {
            continue;
        }
        let same: Vec<&Row> = rows
            .iter()
            .filter(|x| x.transport == r.transport && x.mode == r.mode && x.verify == r.verify)
            .collect();
        let m = |f: &dyn Fn(&Row) -> f64| median(same.iter().map(|x| f(x)).collect());
        let blackouts: Vec<f64> = same
            .iter()
            .filter_map(|x| x.info.livemig.guest_blackout_us.map(|b| b as f64 / 1e3))
            .collect();
        meds.push(Med {
            transport: r.transport.clone(),
            mode: r.mode,
            verify: r.verify,
            downtime: m(&|x| x.info.downtime_us.unwrap_or(0) as f64 / 1e3),
            verification: m(&|x| {
                (x.info.livemig.downtime_parts.verification as f64 + x.info.livemig.dest_verify_ms * 1e3) / 1e3
            }),
            blackout: (!blackouts.is_empty()).then(|| median(blackouts)),
            expected: m(&|x| x.info.livemig.expected_downtime_at_switchover_ms as f64),
            total: m(&|x| x.info.total_time as f64),
            iterations: m(&|x| x.info.ram.iteration_count as f64),
            dev_dirty: m(&|x| x.info.livemig.device_dirty_pages as f64),
            sent: m(&|x| (x.info.ram.normal + x.info.ram.duplicate) as f64),
            wire: m(&|x| x.info.ram.transferred as f64 / 1048576.0),
            throughput: m(&|x| throughput(&x.info)),
            cpu_per_gib: m(&|x| x.cpu / gib(&x.info)),
            engine_per_gib: m(&|x| (x.cpu - x.vcpu).max(0.0) / gib(&x.info)),
        });
    }
    println!("| transport | mode | verify | downtime | of it: verification | blackout | expected | total time | iterations | device-dirtied pages | pages sent | wire MiB | downtime ÷ none | wire bytes ÷ none |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &meds {
        let base = meds
            .iter()
            .find(|b| b.mode == DeviceTracking::None && b.verify == r.verify && b.transport == r.transport);
        let (rd, rb) = match base {
            Some(b) => (
                fmt_ratio(r.downtime / b.downtime.max(1e-3)),
                fmt_ratio(r.wire / b.wire.max(1e-9)),
            ),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {} | {:.1} ms | {:.1} ms | {} | {:.0} ms | {:.0} ms | {:.0} | {:.0} | {:.0} | {:.1} | {rd} | {rb} |",
            r.transport,
            r.mode,
            r.verify,
            r.downtime,
            r.verification,
            r.blackout.map_or("–".into(), |b| format!("{b:.1} ms")),
            r.expected,
            r.total,
            r.iterations,
            r.dev_dirty,
            r.sent,
            r.wire,
        );
    }
    println!(
        "\nTransports (pre-copy throughput: the bytes pre-copy sent over its duration; CPU: this process's CPU time \
         during the migration per GiB on the wire, all of it (both ends and the guests' vCPUs) and without the \
         vCPUs (the migration's own threads)):\n"
    );
    println!(
        "| transport | mode | verify | pre-copy throughput | ÷ tcp | CPU per GiB | without vCPUs | ÷ tcp | downtime | ÷ tcp |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &meds {
        let base = meds
            .iter()
            .find(|b| b.transport == "tcp" && b.mode == r.mode && b.verify == r.verify);
        let ratio = |x: f64, b: Option<f64>| b.map_or("–".into(), |b| fmt_ratio(x / b.max(1e-9)));
        println!(
            "| {} | {} | {} | {:.0} MiB/s | {} | {:.2} s | {:.2} s | {} | {:.1} ms | {} |",
            r.transport,
            r.mode,
            r.verify,
            r.throughput,
            ratio(r.throughput, base.map(|b| b.throughput)),
            r.cpu_per_gib,
            r.engine_per_gib,
            ratio(r.engine_per_gib, base.map(|b| b.engine_per_gib)),
            r.downtime,
            ratio(r.downtime, base.map(|b| b.downtime)),
        );
    }
    Ok(())
}

/// Removes the throwaway credentials.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
