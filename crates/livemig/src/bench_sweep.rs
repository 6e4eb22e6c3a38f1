//! `livemig bench sweep`: real migrations over a grid of workloads, written to a directory as
//! CSV, JSON and charts (`docs/benchmarks.md#sweep`).
//!
//! The grid is a star through a base point: each axis (device DMA rate per mode, CPU dirty
//! rate, guest size, content, page connections) is swept with the others at their base
//! value, and a point that lies on several axes runs once. A full cartesian product of six
//! axes would take hours for the same five charts. Every point runs `--runs` times,
//! interleaved, so drift over the session falls on every point alike; the charts draw the
//! medians with the spread of the repetitions as error bars.

use crate::bench_migration::{fresh_ram_tcp, loopback_tcp_n, throughput};
use crate::sweep_charts::{self, Chart, Pt};
use crate::vmopts::VmOpts;
use anyhow::{anyhow, bail, Context, Result};
use migration::{DestOptions, DeviceTracking, MigrationControl, MigrationInfo, SourceOptions, VerifyMode};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::Content;

/// The dirtier's working set unless `--ws-mib` says otherwise.
const DEFAULT_WS_MIB: u64 = 128;

/// What to sweep. The first value of each list is the axis's base value.
pub struct Args {
    /// The base guest (memory, rates and content are overridden per point).
    pub vm: VmOpts,
    pub out: PathBuf,
    pub modes: Vec<DeviceTracking>,
    pub dma_rates: Vec<f64>,
    pub cpu_rates: Vec<f64>,
    pub sizes_mib: Vec<u64>,
    pub contents: Vec<Content>,
    pub channels: Vec<u16>,
    pub runs: usize,
    pub warmup_ms: u64,
    /// List the grid and write the CSV header, without migrating.
    pub dry: bool,
}

impl Args {
    /// The `--quick` preset: under three minutes on a 2-core machine.
    pub fn quick(vm: VmOpts, out: PathBuf) -> Args {
        Args {
            vm,
            out,
            modes: vec![DeviceTracking::Iommu, DeviceTracking::None],
            dma_rates: vec![64.0, 0.0, 128.0],
            cpu_rates: vec![32.0],
            sizes_mib: vec![512, 1024, 2048],
            contents: vec![Content::Random],
            channels: vec![1, 2, 4],
            runs: 2,
            warmup_ms: 300,
            dry: false,
        }
    }
}

/// One point of the grid.
#[derive(Clone, Debug, PartialEq)]
struct Point {
    mode: DeviceTracking,
    dma: f64,
    cpu: f64,
    mem_mib: u64,
    content: Content,
    channels: u16,
}

/// The star: the base point, then each axis's other values.
fn grid(a: &Args) -> Result<Vec<Point>> {
    let first = |n: &str, empty: bool| {
        if empty {
            Err(anyhow!("--{n} needs a value"))
        } else {
            Ok(())
        }
    };
    first("modes", a.modes.is_empty())?;
    first("dma-rates", a.dma_rates.is_empty())?;
    first("cpu-rates", a.cpu_rates.is_empty())?;
    first("sizes", a.sizes_mib.is_empty())?;
    first("contents", a.contents.is_empty())?;
    first("channels", a.channels.is_empty())?;
    let base = Point {
        mode: a.modes[0],
        dma: a.dma_rates[0],
        cpu: a.cpu_rates[0],
        mem_mib: a.sizes_mib[0],
        content: a.contents[0],
        channels: a.channels[0],
    };
    let mut out = Vec::new();
    let mut add = |p: Point| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for &mode in &a.modes {
        for &dma in &a.dma_rates {
            add(Point {
                mode,
                dma,
                ..base.clone()
            });
        }
    }
    for &cpu in &a.cpu_rates {
        add(Point { cpu, ..base.clone() });
    }
    for &mem_mib in &a.sizes_mib {
        add(Point {
            mem_mib,
            ..base.clone()
        });
    }
    for &content in &a.contents {
        add(Point {
            content,
            ..base.clone()
        });
    }
    for &channels in &a.channels {
        add(Point {
            channels,
            ..base.clone()
        });
    }
    Ok(out)
}

/// The transport baselines of one run at one connection count, MiB/s.
struct Tcp {
    channels: u16,
    run: usize,
    /// Raw loopback TCP into a reused buffer.
    raw: f64,
    /// Raw loopback TCP into fresh guest RAM beside a busy core (`fresh_ram_tcp`).
    fresh: f64,
}

/// What one migration measured.
struct Row {
    point: Point,
    run: usize,
    info: MigrationInfo,
}

/// The CSV's columns, in order (one row per migration).
pub const COLUMNS: [&str; 21] = [
    "mode",
    "dma_mib_s",
    "cpu_mib_s",
    "mem_mib",
    "content",
    "channels",
    "run",
    "downtime_ms",
    "total_ms",
    "wire_mib",
    "precopy_throughput_mib_s",
    "raw_tcp_mib_s",
    "fresh_ram_tcp_mib_s",
    "iterations",
    "switchover",
    "device_dirty_pages",
    "dma_achieved_mib_s",
    "cpu_achieved_mib_s",
    "final_pages",
    "verified",
    "blackout_ms",
];

impl Row {
    fn csv(&self, tcp: (f64, f64)) -> String {
        let (p, i) = (&self.point, &self.info);
        [
            p.mode.to_string(),
            p.dma.to_string(),
            p.cpu.to_string(),
            p.mem_mib.to_string(),
            p.content.to_string(),
            p.channels.to_string(),
            self.run.to_string(),
            format!("{:.3}", downtime_ms(i)),
            i.total_time.to_string(),
            format!("{:.3}", wire_mib(i)),
            format!("{:.1}", throughput(i)),
            format!("{:.1}", tcp.0),
            format!("{:.1}", tcp.1),
            i.ram.iteration_count.to_string(),
            i.livemig.switchover_reason.clone(),
            i.livemig.device_dirty_pages.to_string(),
            format!("{:.1}", i.livemig.guest_dma_write_mib_s),
            format!("{:.1}", i.livemig.guest_cpu_write_mib_s),
            i.livemig.final_pages.to_string(),
            i.livemig
                .verified
                .map_or("", |v| if v { "yes" } else { "no" })
                .to_string(),
            i.livemig
                .guest_blackout_us
                .map_or(String::new(), |b| format!("{:.3}", b as f64 / 1e3)),
        ]
        .join(",")
    }
}

fn downtime_ms(i: &MigrationInfo) -> f64 {
    i.downtime_us.unwrap_or(0) as f64 / 1e3
}

fn wire_mib(i: &MigrationInfo) -> f64 {
    i.ram.transferred as f64 / 1048576.0
}

/// The guest of `p`: the base options with the point's size, rates and content. With random
/// content, RAM past the working sets is filled with random bytes too, so that the guest's
/// size costs what it would if the guest used its memory.
fn guest(a: &Args, p: &Point) -> Result<VmOpts> {
    let mut vm = a.vm.clone();
    vm.memory_mib = p.mem_mib;
    vm.rate = p.cpu;
    vm.dma_rate = p.dma;
    vm.content = p.content;
    // The same working set at every size, so that size alone changes along that axis.
    vm.ws_mib = Some(a.vm.ws_mib.unwrap_or(DEFAULT_WS_MIB));
    if vm.device_count() == 0 {
        vm.devices = 1;
        vm.no_accel = false;
    }
    vm.validate()
        .with_context(|| format!("the guest of {} MiB at this point", p.mem_mib))?;
    Ok(vm)
}

fn migrate_point(a: &Args, p: &Point, run: usize) -> Result<Row> {
    let vm = guest(a, p)?;
    let mut vm = vm;
    vm.fill_ram |= p.content == Content::Random;
    let src = Arc::new(vm.build()?);
    src.resume()?;
    std::thread::sleep(Duration::from_millis(a.warmup_ms));
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let dest = std::thread::spawn(move || migration::receive(&l, &DestOptions::default()));
    let opts = SourceOptions {
        mode: p.mode,
        channels: p.channels,
        // The audit verifies every migration without adding its hashing to the downtime.
        verify: VerifyMode::Audit,
        ..Default::default()
    };
    let info = migration::migrate(&src, &addr, &opts, &MigrationControl::default());
    let inc = dest.join().map_err(|_| anyhow!("the destination panicked"))?;
    let (info, inc) = match (info, inc) {
        (Ok(i), Ok(d)) => (i, d),
        (i, d) => bail!(
            "{p:?}: source: {}; destination: {}",
            i.err().map_or("completed".into(), |e| e.chain()),
            d.err().map_or("completed".into(), |e| e.chain())
        ),
    };
    if info.livemig.verified != Some(true) {
        bail!("{p:?}: verification failed: {}", info.livemig.verify_detail);
    }
    drop(inc);
    drop(src);
    Ok(Row {
        point: p.clone(),
        run,
        info,
    })
}

pub fn run(a: &Args) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let points = grid(a)?;
    for p in &points {
        guest(a, p)?;
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let csv_path = a.out.join("sweep.csv");
    let total = points.len() * a.runs;
    eprintln!(
        "sweep: {} point(s) × {} run(s) = {total} migrations, into {}",
        points.len(),
        a.runs,
        a.out.display()
    );
    if a.dry {
        for p in &points {
            println!(
                "{} dma {} cpu {} mem {} {} channels {}",
                p.mode, p.dma, p.cpu, p.mem_mib, p.content, p.channels
            );
        }
        std::fs::write(&csv_path, COLUMNS.join(",") + "\n")?;
        return Ok(());
    }
    vmm::kvm_for_tests().map_err(|e| anyhow!("KVM is needed: {e}"))?;
    // Before hours of migrations, not after: the charts need a font.
    sweep_charts::font()?;
    let t0 = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut tcp: Vec<Tcp> = Vec::new();
    // Rows go to the CSV run by run, so an interrupted sweep keeps what it measured.
    let mut csv = std::fs::File::create(&csv_path).with_context(|| format!("creating {}", csv_path.display()))?;
    writeln!(csv, "{}", COLUMNS.join(","))?;
    for run in 0..a.runs {
        let first = rows.len();
        for (k, p) in points.iter().enumerate() {
            let done = run * points.len() + k + 1;
            let eta = t0.elapsed().as_secs_f64() / done as f64 * (total - done) as f64;
            let what = format!(
                "[{done}/{total}] {} DMA {} MiB/s, CPU {} MiB/s, {} MiB, {}, {} channel(s)",
                p.mode, p.dma, p.cpu, p.mem_mib, p.content, p.channels
            );
            match migrate_point(a, p, run) {
                Ok(r) => {
                    eprintln!(
                        "{what}: downtime {:.1} ms, total {} ms, {:.0} MiB sent (about {eta:.0} s left)",
                        downtime_ms(&r.info),
                        r.info.total_time,
                        wire_mib(&r.info)
                    );
                    rows.push(r);
                }
                // One failed point does not cost the others; the sweep fails at the end.
                Err(e) => {
                    eprintln!("{what}: FAILED: {e:#}");
                    failed.push(format!("{what}: {e:#}"));
                }
            }
        }
        // Raw TCP on as many connections, once per run: the same drift as the migrations.
        for &c in &a.channels {
            tcp.push(Tcp {
                channels: c,
                run,
                raw: loopback_tcp_n(c, 2 << 30)? / 1048576.0,
                fresh: fresh_ram_tcp(c, 1 << 30)? / 1048576.0,
            });
        }
        for r in &rows[first..] {
            let t = tcp
                .iter()
                .find(|t| t.channels == r.point.channels && t.run == r.run)
                .map_or((0.0, 0.0), |t| (t.raw, t.fresh));
            writeln!(csv, "{}", r.csv(t))?;
        }
        csv.flush()?;
    }
    let json = json!({
        "base": base_json(a),
        "runs": a.runs,
        "migrations": rows.iter().map(|r| json!({
            "point": {
                "mode": r.point.mode.to_string(), "dma-mib-s": r.point.dma, "cpu-mib-s": r.point.cpu,
                "mem-mib": r.point.mem_mib, "content": r.point.content.to_string(), "channels": r.point.channels,
            },
            "run": r.run,
            "info": serde_json::to_value(&r.info).unwrap_or_default(),
        })).collect::<Vec<_>>(),
        "failed": failed,
        "raw-tcp": tcp.iter().map(|t| json!({
            "channels": t.channels, "run": t.run, "mib-s": t.raw, "fresh-ram-mib-s": t.fresh,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(a.out.join("sweep.json"), serde_json::to_string_pretty(&json)?)?;
    let mut summary = summary(a, &rows, &tcp);
    if !failed.is_empty() {
        summary += &format!("\n{} migration(s) failed:\n\n", failed.len());
        for f in &failed {
            summary += &format!("- {f}\n");
        }
    }
    std::fs::write(a.out.join("summary.md"), &summary)?;
    println!("{summary}");
    let charts = charts(a, &rows, &tcp);
    let mut drawn = 0;
    for c in &charts {
        // A chart whose points all failed has nothing to draw; the others still are.
        match sweep_charts::draw(c, &a.out) {
            Ok(()) => drawn += 1,
            Err(e) if rows.is_empty() || !failed.is_empty() => eprintln!("sweep: {e:#}"),
            Err(e) => return Err(e),
        }
    }
    eprintln!(
        "sweep: {} migrations in {:.0} s; wrote sweep.csv, sweep.json, summary.md and {drawn} charts (PNG and SVG) to {}",
        rows.len(),
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    if !failed.is_empty() {
        bail!("{} of {total} migrations failed (listed in summary.md)", failed.len());
    }
    Ok(())
}

fn base_json(a: &Args) -> serde_json::Value {
    json!({
        "mode": a.modes[0].to_string(), "dma-mib-s": a.dma_rates[0], "cpu-mib-s": a.cpu_rates[0],
        "mem-mib": a.sizes_mib[0], "content": a.contents[0].to_string(), "channels": a.channels[0],
        "ws-mib": a.vm.ws_mib, "dma-mib": a.vm.dma_mib, "devices": a.vm.device_count().max(1),
    })
}

/// Points along `x`, each the median and spread of `y` over the rows that `keep`.
fn line(rows: &[Row], keep: impl Fn(&Point) -> bool, x: impl Fn(&Point) -> f64, y: impl Fn(&Row) -> f64) -> Vec<Pt> {
    let mut xs: Vec<f64> = rows.iter().filter(|r| keep(&r.point)).map(|r| x(&r.point)).collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    xs.into_iter()
        .filter_map(|xv| {
            let ys: Vec<f64> = rows
                .iter()
                .filter(|r| keep(&r.point) && x(&r.point) == xv)
                .map(&y)
                .collect();
            Pt::of(xv, &ys)
        })
        .collect()
}

fn charts<'a>(a: &Args, rows: &[Row], tcp: &[Tcp]) -> Vec<Chart<'a>> {
    let per_mode = |y: &dyn Fn(&Row) -> f64| {
        a.modes
            .iter()
            .map(|&m| {
                let keep = |p: &Point| p.mode == m && at_base_but(a, p, &["mode", "dma"]);
                (m.to_string(), line(rows, keep, |p| p.dma, y))
            })
            .collect::<Vec<_>>()
    };
    let base = format!(
        "{} MiB guest, CPU {} MiB/s, {}",
        a.sizes_mib[0], a.cpu_rates[0], a.contents[0]
    );
    let mut out = vec![
        Chart {
            file: "downtime_vs_dma",
            title: format!("Downtime against device DMA rate ({base})"),
            x_label: "device DMA rate (MiB/s)",
            y_label: "downtime (ms)",
            log_y: true,
            lines: per_mode(&|r| downtime_ms(&r.info)),
        },
        Chart {
            file: "total_vs_dma",
            title: format!("Total time against device DMA rate ({base})"),
            x_label: "device DMA rate (MiB/s)",
            y_label: "total time (ms)",
            log_y: true,
            lines: per_mode(&|r| r.info.total_time as f64),
        },
        Chart {
            file: "wire_vs_dma",
            title: format!("Bytes on the wire against device DMA rate ({base})"),
            x_label: "device DMA rate (MiB/s)",
            y_label: "sent (MiB)",
            log_y: true,
            lines: per_mode(&|r| wire_mib(&r.info)),
        },
        Chart {
            file: "downtime_vs_size",
            title: format!(
                "Downtime against guest size ({}, DMA {} MiB/s, CPU {} MiB/s)",
                a.modes[0], a.dma_rates[0], a.cpu_rates[0]
            ),
            x_label: "guest RAM (GiB)",
            y_label: "downtime (ms)",
            log_y: false,
            lines: vec![(
                a.modes[0].to_string(),
                line(
                    rows,
                    |p| at_base_but(a, p, &["mem"]),
                    |p| p.mem_mib as f64 / 1024.0,
                    |r| downtime_ms(&r.info),
                ),
            )],
        },
    ];
    let tcp_line = |y: fn(&Tcp) -> f64| {
        let mut v: Vec<Pt> = a
            .channels
            .iter()
            .filter_map(|&c| {
                let ys: Vec<f64> = tcp.iter().filter(|t| t.channels == c).map(y).collect();
                Pt::of(c as f64, &ys)
            })
            .collect();
        v.sort_by(|a, b| a.x.total_cmp(&b.x));
        v
    };
    out.push(Chart {
        file: "throughput_vs_channels",
        title: format!("Pre-copy throughput against page connections ({base})"),
        x_label: "page connections",
        y_label: "MiB/s",
        log_y: false,
        lines: vec![
            (
                "migration".into(),
                line(
                    rows,
                    |p| at_base_but(a, p, &["channels"]),
                    |p| p.channels as f64,
                    |r| throughput(&r.info),
                ),
            ),
            ("raw TCP".into(), tcp_line(|t| t.raw)),
            ("TCP into fresh guest RAM, a core busy".into(), tcp_line(|t| t.fresh)),
        ],
    });
    out
}

/// Whether every axis of `p` but those in `except` is at its base value.
fn at_base_but(a: &Args, p: &Point, except: &[&str]) -> bool {
    (except.contains(&"mode") || p.mode == a.modes[0])
        && (except.contains(&"dma") || p.dma == a.dma_rates[0])
        && (except.contains(&"cpu") || p.cpu == a.cpu_rates[0])
        && (except.contains(&"mem") || p.mem_mib == a.sizes_mib[0])
        && (except.contains(&"content") || p.content == a.contents[0])
        && (except.contains(&"channels") || p.channels == a.channels[0])
}

/// The medians as a Markdown table, with the ratios: each mode against `none` at
/// every DMA rate, migration throughput against raw TCP per connection count, and downtime
/// and total time against the smallest guest.
fn summary(a: &Args, rows: &[Row], tcp: &[Tcp]) -> String {
    let med = |keep: &dyn Fn(&Point) -> bool, y: &dyn Fn(&Row) -> f64| {
        Pt::of(0.0, &rows.iter().filter(|r| keep(&r.point)).map(y).collect::<Vec<_>>()).map(|p| p.med)
    };
    let mut s = format!(
        "Sweep: base {} MiB guest, CPU dirtier {} MiB/s, device DMA {} MiB/s, {}, {} page connection(s), mode {}; \
         {} run(s) per point, medians (charts: spread as error bars). Verification: audit (every migration \
         verified, outside the downtime).\n\n",
        a.sizes_mib[0], a.cpu_rates[0], a.dma_rates[0], a.contents[0], a.channels[0], a.modes[0], a.runs
    );
    s += "| mode | DMA MiB/s | DMA achieved | downtime ms | total ms | wire MiB | downtime ÷ none | total ÷ none |\n";
    s += "|---|---|---|---|---|---|---|---|\n";
    for &m in &a.modes {
        for &d in &a.dma_rates {
            let keep = |p: &Point| p.mode == m && p.dma == d && at_base_but(a, p, &["mode", "dma"]);
            let none = |p: &Point| p.mode == DeviceTracking::None && p.dma == d && at_base_but(a, p, &["mode", "dma"]);
            let (Some(dt), Some(tt), Some(w), Some(ach)) = (
                med(&keep, &|r| downtime_ms(&r.info)),
                med(&keep, &|r| r.info.total_time as f64),
                med(&keep, &|r| wire_mib(&r.info)),
                med(&keep, &|r| r.info.livemig.guest_dma_write_mib_s),
            ) else {
                continue;
            };
            let ratio = |x: f64, b: Option<f64>| b.map_or("–".into(), |b| format!("{:.3}", x / b.max(1e-9)));
            s += &format!(
                "| {m} | {d} | {ach:.1} | {dt:.1} | {tt:.0} | {w:.0} | {} | {} |\n",
                ratio(dt, med(&none, &|r| downtime_ms(&r.info))),
                ratio(tt, med(&none, &|r| r.info.total_time as f64)),
            );
        }
    }
    s += "\n| page connections | migration MiB/s | raw TCP MiB/s | ÷ raw TCP | TCP into fresh guest RAM, a core busy | ÷ that |\n";
    s += "|---|---|---|---|---|---|\n";
    for &c in &a.channels {
        let keep = |p: &Point| p.channels == c && at_base_but(a, p, &["channels"]);
        let base = |y: fn(&Tcp) -> f64| {
            Pt::of(0.0, &tcp.iter().filter(|t| t.channels == c).map(y).collect::<Vec<_>>()).map(|p| p.med)
        };
        if let (Some(m), Some(r), Some(f)) = (med(&keep, &|r| throughput(&r.info)), base(|t| t.raw), base(|t| t.fresh))
        {
            s += &format!(
                "| {c} | {m:.0} | {r:.0} | {:.2} | {f:.0} | {:.2} |\n",
                m / r.max(1e-9),
                m / f.max(1e-9)
            );
        }
    }
    s += "\n| guest MiB | downtime ms | total ms | downtime ÷ smallest | total ÷ smallest |\n|---|---|---|---|---|\n";
    let mut sizes = a.sizes_mib.clone();
    sizes.sort_unstable();
    let at = |m: u64, y: &dyn Fn(&Row) -> f64| med(&|p: &Point| p.mem_mib == m && at_base_but(a, p, &["mem"]), y);
    let first = sizes
        .first()
        .map(|&m| (at(m, &|r| downtime_ms(&r.info)), at(m, &|r| r.info.total_time as f64)));
    for &m in &sizes {
        if let (Some(d), Some(t), Some((Some(d0), Some(t0)))) = (
            at(m, &|r| downtime_ms(&r.info)),
            at(m, &|r| r.info.total_time as f64),
            first,
        ) {
            s += &format!(
                "| {m} | {d:.1} | {t:.0} | {:.2} | {:.2} |\n",
                d / d0.max(1e-9),
                t / t0.max(1e-9)
            );
        }
    }
    s
}
