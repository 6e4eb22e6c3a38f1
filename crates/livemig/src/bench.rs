//! `livemig bench`: measurements printed as Markdown tables, each with a baseline from the
//! same run.

use anyhow::{bail, Result};
use iommu::bench_kit::{min_time, DmaBench, HarvestBench};
use iommu::FormatKind;
use std::time::Duration;

fn gib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / d.as_secs_f64()
}

/// A ratio; huge ones (a skipped walk against a full one) in scientific notation.
fn fmt_ratio(x: f64) -> String {
    if x >= 1000.0 {
        format!("{x:.1e}×")
    } else {
        format!("{x:.2}×")
    }
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e5 {
        format!("{x:.1e}")
    } else {
        format!("{x:.0}")
    }
}

fn fmt_dur(d: Duration) -> String {
    if d.as_micros() < 10 {
        format!("{} ns", d.as_nanos())
    } else if d.as_secs_f64() >= 1.0 {
        format!("{:.2} s", d.as_secs_f64())
    } else if d.as_micros() >= 1000 {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

pub struct HarvestArgs {
    pub iova_gib: u64,
    pub fractions: Vec<f64>,
    pub formats: Vec<FormatKind>,
    pub runs: usize,
    pub tib: bool,
    pub naive: bool,
}

/// read_and_clear over a 4 KiB-mapped IOVA space: walker vs naive vs bandwidth pass.
pub fn harvest(a: &HarvestArgs) -> Result<()> {
    if a.iova_gib == 0 || a.runs == 0 {
        bail!("--iova-gib and --runs must be at least 1");
    }
    if let Some(f) = a.fractions.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        bail!("dirty fraction {f} is not between 0 and 1");
    }
    let iova = a.iova_gib << 30;
    println!(
        "read_and_clear over {} GiB of IOVA, 4 KiB leaves; minimum of {} runs each\n",
        a.iova_gib, a.runs
    );
    // The bandwidth baseline: one linear read+write pass over an array the size of the
    // leaf-PTE array (8 bytes per 4 KiB page).
    let mut bw = HarvestBench::new(FormatKind::AmdV1, iova, 0.0, true);
    let bw_t = bw.time_bandwidth(a.runs);
    let floor = bw.time_read_floor(a.runs);
    drop(bw);
    println!(
        "bandwidth pass over {} MiB: {} ({:.1} GiB/s of PTE array); read-only pass on all cores \
         (the floor for any harvest that reads every leaf PTE): {}\n",
        ((iova >> 12) * 8) >> 20,
        fmt_dur(bw_t),
        gib_per_s((iova >> 12) * 8, bw_t),
        fmt_dur(floor)
    );
    println!("| format | dirty | pages | walker | IOVA GiB/s | naive | naive ÷ walker | bandwidth pass ÷ walker | naive ÷ read floor |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &fmt in &a.formats {
        for &frac in &a.fractions {
            let b = HarvestBench::new(fmt, iova, frac, false);
            let expect = b.dirty_count() as u64;
            let t = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
            let (naive, ratio, best) = if a.naive {
                let n = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest_naive(), expect));
                (
                    fmt_dur(n),
                    fmt_ratio(n.as_secs_f64() / t.as_secs_f64()),
                    fmt_ratio(n.as_secs_f64() / floor.as_secs_f64()),
                )
            } else {
                ("-".into(), "-".into(), "-".into())
            };
            println!(
                "| {fmt} | {}% | {} | {} | {} | {} | {} | {} | {} |",
                frac * 100.0,
                expect,
                fmt_dur(t),
                fmt_rate(gib_per_s(iova, t)),
                naive,
                ratio,
                fmt_ratio(bw_t.as_secs_f64() / t.as_secs_f64()),
                best
            );
        }
    }
    if a.tib {
        println!();
        let tib = 1u64 << 40;
        let mut b = HarvestBench::new(FormatKind::VtdSs, tib, 0.001, true);
        let expect = b.dirty_count() as u64;
        let bw = b.time_bandwidth(a.runs);
        let t = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
        let n = if a.naive {
            Some(min_time(1, || b.redirty(), || assert_eq!(b.harvest_naive(), expect)))
        } else {
            None
        };
        println!(
            "| 1 TiB, 0.1% dirty (vtd-ss) | pages | walker | IOVA GiB/s | naive | naive ÷ walker | bandwidth pass ÷ walker |"
        );
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| | {expect} | {} | {} | {} | {} | {} |",
            fmt_dur(t),
            fmt_rate(gib_per_s(tib, t)),
            n.map_or("-".into(), fmt_dur),
            n.map_or("-".into(), |n| fmt_ratio(n.as_secs_f64() / t.as_secs_f64())),
            fmt_ratio(bw.as_secs_f64() / t.as_secs_f64())
        );
    }
    Ok(())
}

/// 4 KiB DMA writes through the IOTLB against memcpy of the same bytes.
pub fn dma(runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    println!("4 KiB DMA writes through the IOTLB (1024 entries), tracking on; minimum of {runs} runs\n");
    println!("| format | working set | DMA GiB/s | memcpy GiB/s | DMA ÷ memcpy |");
    println!("|---|---|---|---|---|");
    for fmt in FormatKind::ALL {
        for pages in [256u64, 16384] {
            let b = DmaBench::new(fmt, pages);
            let d = min_time(runs, || {}, || b.dma_pass());
            let m = min_time(runs, || {}, || b.memcpy_pass());
            println!(
                "| {fmt} | {} pages ({} MiB) | {:.2} | {:.2} | {:.2} |",
                pages,
                pages * 4 / 1024,
                gib_per_s(b.bytes(), d),
                gib_per_s(b.bytes(), m),
                m.as_secs_f64() / d.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Dirty bitmap through iommufd (copy-free, into the caller's buffer) against type1
/// (per-mapping bitmap, then a copy), same IOVA space and dirty pages.
pub fn bitmap(iova_gib: u64, dirty: f64, runs: usize) -> Result<()> {
    if iova_gib == 0 || runs == 0 || !(0.0..=1.0).contains(&dirty) {
        bail!("--iova-gib and --runs must be at least 1 and --dirty between 0 and 1");
    }
    let mut b = iommufd::bench_kit::BitmapBench::new(FormatKind::VtdSs, iova_gib << 30, dirty);
    let expect = b.dirty_count() as u64;
    let mut best = [Duration::MAX; 2];
    for _ in 0..runs {
        for (i, best) in best.iter_mut().enumerate() {
            b.redirty();
            let t = std::time::Instant::now();
            let got = if i == 0 { b.iommufd_get() } else { b.type1_get() };
            *best = (*best).min(t.elapsed());
            if got != expect {
                bail!("harvest found {got} dirty pages, {expect} were written");
            }
        }
    }
    println!(
        "dirty bitmap of {iova_gib} GiB at 4 KiB, {}% dirty ({expect} pages), vtd-ss; minimum of {runs} runs\n",
        dirty * 100.0
    );
    println!("| interface | time | IOVA GiB/s | type1 ÷ iommufd |");
    println!("|---|---|---|---|");
    println!(
        "| iommufd HWPT_GET_DIRTY_BITMAP | {} | {} | 1.00× |",
        fmt_dur(best[0]),
        fmt_rate(gib_per_s(iova_gib << 30, best[0]))
    );
    println!(
        "| type1 DIRTY_PAGES GET_BITMAP | {} | {} | {} |",
        fmt_dur(best[1]),
        fmt_rate(gib_per_s(iova_gib << 30, best[1])),
        fmt_ratio(best[1].as_secs_f64() / best[0].as_secs_f64())
    );
    Ok(())
}

/// CPU dirty harvest cost per GiB of guest RAM, ring against bitmap, at each rate.
pub fn cpu_dirty(memory_mib: u64, rates: &[f64], vcpus: u32, interval_ms: u64, ms: u64) -> Result<()> {
    use vmm::bench_kit::measure;
    use vmm::DirtyLogMode;
    if memory_mib < 64 || vcpus == 0 || interval_ms == 0 || ms < interval_ms {
        bail!("need --memory-mib >= 64, --vcpus >= 1, --interval-ms >= 1 and --ms >= --interval-ms");
    }
    if let Some(r) = rates.iter().find(|r| !(r.is_finite() && **r >= 0.0)) {
        bail!("rate {r} is not a non-negative number of MiB/s");
    }
    vmm::kvm_for_tests().map_err(|e| anyhow::anyhow!("KVM is needed: {e}"))?;
    let (interval, dur) = (Duration::from_millis(interval_ms), Duration::from_millis(ms));
    println!(
        "CPU dirty harvest, {memory_mib} MiB guest, {vcpus} vCPU(s) running the dirtier, harvest every {interval_ms} ms \
         for {ms} ms per point; cost includes ring collection by the reaper thread\n"
    );
    println!("| configured MiB/s | achieved MiB/s | pages/harvest | ring per GiB | bitmap per GiB | ring ÷ bitmap |");
    println!("|---|---|---|---|---|---|");
    for &rate in rates {
        eprintln!("measuring {rate} MiB/s ...");
        let ring = measure(
            DirtyLogMode::Ring { entries: 65536 },
            memory_mib,
            vcpus,
            rate,
            dur,
            interval,
        )?;
        let bm = measure(DirtyLogMode::Bitmap, memory_mib, vcpus, rate, dur, interval)?;
        println!(
            "| {rate} | {:.0} / {:.0} | {:.0} / {:.0} | {} | {} | {} |",
            ring.achieved_mib_s,
            bm.achieved_mib_s,
            ring.pages_per_harvest,
            bm.pages_per_harvest,
            fmt_dur(ring.per_gib()),
            fmt_dur(bm.per_gib()),
            fmt_ratio(ring.per_gib().as_secs_f64() / bm.per_gib().as_secs_f64())
        );
    }
    Ok(())
}

fn percentiles(mut v: Vec<Duration>) -> [Duration; 3] {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    [at(0.5), at(0.99), *v.last().unwrap_or(&Duration::ZERO)]
}

/// Pause/resume latency of running vCPUs, against a thread park/unpark round trip.
pub fn pause(vcpus: u32, cycles: u32) -> Result<()> {
    use vmm::{layout::WORKSET_BASE, DirtyLogMode, Pattern, Program, Vm, VmConfig};
    if vcpus == 0 || cycles == 0 {
        bail!("--vcpus and --cycles must be at least 1");
    }
    vmm::kvm_for_tests().map_err(|e| anyhow::anyhow!("KVM is needed: {e}"))?;
    let vm = Vm::new(VmConfig {
        mem_mib: 256,
        regions: 1,
        vcpus,
        dirty: DirtyLogMode::default(),
        accel: None,
    })?;
    for v in 0..vcpus {
        vm.load_program(
            v,
            &Program::dirtier(WORKSET_BASE + v as u64 * (16 << 20), 4096, 64.0, Pattern::Sequential),
        )?;
    }
    vm.set_cpu_dirty_logging(true)?;
    let (mut p, mut r) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        r.push(vm.resume()?);
        std::thread::sleep(Duration::from_millis(2));
        p.push(vm.pause()?);
    }
    // Baseline: wake a parked thread and wait for its answer, the floor for any handshake.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (btx, brx) = std::sync::mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        while rx.recv().is_ok() {
            let _ = btx.send(());
        }
    });
    let mut base = Vec::new();
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(2));
        let t = std::time::Instant::now();
        tx.send(())?;
        brx.recv()?;
        base.push(t.elapsed());
    }
    drop(tx);
    let _ = h.join();
    let [pm, p99, px] = percentiles(p);
    let [rm, r99, rx_] = percentiles(r);
    let [bm, b99, bx] = percentiles(base);
    println!("{vcpus} vCPU(s) running the dirtier at 64 MiB/s, {cycles} pause/resume cycles\n");
    println!("| operation | median | p99 | max | median ÷ thread wake-up |");
    println!("|---|---|---|---|---|");
    for (name, m, q, x) in [
        ("pause (all vCPUs parked)", pm, p99, px),
        ("resume (all vCPUs running)", rm, r99, rx_),
        ("thread wake-up round trip (baseline)", bm, b99, bx),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            fmt_dur(m),
            fmt_dur(q),
            fmt_dur(x),
            fmt_ratio(m.as_secs_f64() / bm.as_secs_f64())
        );
    }
    Ok(())
}

/// Raw loopback TCP throughput in bytes/s: the ceiling for any migration stream.
fn loopback_tcp(bytes: u64) -> Result<f64> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(n),
                k => n += k as u64,
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let t = std::time::Instant::now();
    for _ in 0..bytes >> 20 {
        s.write_all(&buf)?;
    }
    drop(s);
    let got = rx.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

/// One migration per (mode, verification) of the same guest shape; a table with the `none`
/// mode (no device-write tracking) of the same verification as the baseline.
pub fn migration(
    vm: &crate::vmopts::VmOpts,
    modes: &[String],
    verifies: &[String],
    warmup_ms: u64,
    channels: u16,
) -> Result<()> {
    use migration::{DestOptions, DeviceTracking, MigrationControl, SourceOptions, VerifyMode};
    vmm::kvm_for_tests().map_err(|e| anyhow::anyhow!("KVM is needed: {e}"))?;
    let mut rows = Vec::new();
    let pairs = verifies.iter().flat_map(|v| modes.iter().map(move |m| (m, v)));
    for (m, v) in pairs {
        let mode =
            DeviceTracking::parse(m).ok_or_else(|| anyhow::anyhow!("unknown mode '{m}' (iommu, device-log, none)"))?;
        let verify =
            VerifyMode::parse(v).ok_or_else(|| anyhow::anyhow!("unknown verify mode '{v}' (gate, audit, off)"))?;
        eprintln!("migrating with mode {mode}, verify {verify} ...");
        let src = std::sync::Arc::new(vm.build()?);
        src.resume()?;
        std::thread::sleep(Duration::from_millis(warmup_ms));
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let dest = std::thread::spawn(move || migration::receive(&l, &DestOptions::default(), &|_| {}));
        let ctl = MigrationControl::default();
        let opts = SourceOptions {
            mode,
            channels,
            verify,
            ..Default::default()
        };
        let info =
            migration::migrate(&src, &addr, &opts, &ctl).map_err(|e| anyhow::anyhow!("{mode}: {}", e.chain()))?;
        let inc = dest
            .join()
            .map_err(|_| anyhow::anyhow!("destination panicked"))?
            .map_err(|e| anyhow::anyhow!("{}", e.chain()))?;
        if verify != VerifyMode::Off && info.livemig.verified != Some(true) {
            bail!("{mode}: verification failed: {}", info.livemig.verify_detail);
        }
        drop(inc);
        drop(src);
        rows.push((mode, verify, info));
    }
    let tcp = loopback_tcp(2 << 30)?;
    println!(
        "{} MiB guest, dirtier at {} MiB/s over {} MiB ({:?}), accelerator {}; CPU dirty log {}; {} page channel(s); \
         downtime limit 300 ms. Raw loopback TCP in the same run: {:.2} GiB/s. Downtime: the source's pause to the \
         destination's resume on the shared monotonic clock; blackout: the guest's last progress on the source to \
         its first on the destination.\n",
        vm.memory_mib,
        vm.rate,
        vm.ws()?,
        vm.pattern,
        if vm.no_accel { "absent" } else { "busy" },
        vm.dirty_log,
        channels,
        tcp / (1u64 << 30) as f64
    );
    println!("| mode | verify | downtime | of it: verification | blackout | expected | total time | iterations | device-dirtied pages | pages sent | wire MiB | downtime ÷ none | wire bytes ÷ none |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (m, v, i) in &rows {
        let base = rows
            .iter()
            .find(|(bm, bv, _)| *bm == DeviceTracking::None && bv == v)
            .map(|(_, _, i)| i);
        let sent = i.ram.normal + i.ram.duplicate;
        let d = i.downtime_us.unwrap_or(0) as f64 / 1e3;
        let (rd, rb) = match base {
            Some(b) => (
                fmt_ratio(d / (b.downtime_us.unwrap_or(1).max(1) as f64 / 1e3)),
                fmt_ratio(i.ram.transferred as f64 / b.ram.transferred.max(1) as f64),
            ),
            None => ("–".into(), "–".into()),
        };
        let blackout = i
            .livemig
            .guest_blackout_us
            .map_or("–".into(), |b| format!("{:.1} ms", b as f64 / 1e3));
        println!(
            "| {m} | {v} | {d:.1} ms | {:.1} ms | {blackout} | {} ms | {} ms | {} | {} | {sent} | {:.1} | {rd} | {rb} |",
            (i.livemig.downtime_parts.verification as f64 + i.livemig.dest_verify_ms * 1e3) / 1e3,
            i.livemig.expected_downtime_at_switchover_ms,
            i.total_time,
            i.ram.iteration_count,
            i.livemig.device_dirty_pages,
            i.ram.transferred as f64 / 1048576.0,
        );
    }
    Ok(())
}
