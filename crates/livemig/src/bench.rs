//! `livemig bench`: measurements printed as Markdown tables, each with a baseline from the
//! same run.

use anyhow::{bail, Result};
use iommu::bench_kit::{min_time, DmaBench, HarvestBench};
use iommu::FormatKind;
use std::time::Duration;
use vmm::DeviceSet;

fn gib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / d.as_secs_f64()
}

/// A ratio; huge ones (a skipped walk against a full one) in scientific notation.
pub(crate) fn fmt_ratio(x: f64) -> String {
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
    pub uapi: bool,
    pub threshold: bool,
}

/// read_and_clear over a 4 KiB-mapped IOVA space: the walker on all cores and on one, against
/// the read floor, a read+write bandwidth pass and the naive per-IOVA walk; then iommufd's
/// bitmap against the raw walker, and optionally 1 TiB spaces and the threading threshold.
pub fn harvest(a: &HarvestArgs) -> Result<()> {
    if a.iova_gib == 0 || a.runs == 0 {
        bail!("--iova-gib and --runs must be at least 1");
    }
    if let Some(f) = a.fractions.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        bail!("dirty fraction {f} is not between 0 and 1");
    }
    let iova = a.iova_gib << 30;
    println!(
        "read_and_clear over {} GiB of IOVA, 4 KiB leaves; minimum of {} runs each; {} cores\n",
        a.iova_gib,
        a.runs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // The baselines: one linear read+write pass over an array the size of the leaf-PTE array
    // (8 bytes per 4 KiB page), and a read-only pass over it on all cores.
    tracing::info!("measuring the bandwidth baselines");
    let mut bw = HarvestBench::new(FormatKind::AmdV1, iova, 0.0, true);
    let bw_t = bw.time_bandwidth(a.runs);
    let floor = bw.time_read_floor(a.runs);
    let read_one = bw.time_read_pass(a.runs, 1);
    drop(bw);
    println!(
        "bandwidth pass over {} MiB: {} ({:.1} GiB/s of PTE array); read-only pass on one core: {}; \
         on all cores (the floor for any harvest that reads every leaf PTE): {}\n",
        ((iova >> 12) * 8) >> 20,
        fmt_dur(bw_t),
        gib_per_s((iova >> 12) * 8, bw_t),
        fmt_dur(read_one),
        fmt_dur(floor)
    );
    println!(
        "| format | dirty | pages | walker | walker, cores idle before | one thread | read floor ÷ walker | bandwidth pass ÷ walker | naive | naive ÷ walker |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &fmt in &a.formats {
        for &frac in &a.fractions {
            tracing::info!(%fmt, dirty = frac, "harvest");
            let b = HarvestBench::new(fmt, iova, frac, false);
            let expect = b.dirty_count() as u64;
            let t = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
            let idle = min_time(a.runs, || b.redirty_then_idle(), || assert_eq!(b.harvest(), expect));
            b.set_threads(true);
            let one = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
            let (naive, ratio) = if a.naive {
                let n = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest_naive(), expect));
                (fmt_dur(n), fmt_ratio(n.as_secs_f64() / t.as_secs_f64()))
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "| {fmt} | {}% | {} | {} | {} | {} | {} | {} | {} | {} |",
                frac * 100.0,
                expect,
                fmt_dur(t),
                fmt_dur(idle),
                fmt_dur(one),
                fmt_ratio(floor.as_secs_f64() / t.as_secs_f64()),
                fmt_ratio(bw_t.as_secs_f64() / t.as_secs_f64()),
                naive,
                ratio,
            );
        }
    }
    if a.uapi {
        uapi_overhead(a, iova)?;
    }
    if a.tib {
        tib(a)?;
    }
    if a.threshold {
        threshold(a.runs);
    }
    Ok(())
}

/// iommufd's `HWPT_GET_DIRTY_BITMAP` against the raw walker on the HWPT's own domain.
fn uapi_overhead(a: &HarvestArgs, iova: u64) -> Result<()> {
    let Some(&frac) = a.fractions.iter().find(|&&f| f > 0.0 && f <= 0.01) else {
        return Ok(());
    };
    println!("\n| format | dirty | walker on the HWPT's domain | HWPT_GET_DIRTY_BITMAP | uAPI ÷ walker |");
    println!("|---|---|---|---|---|");
    for &fmt in &a.formats {
        tracing::info!(%fmt, "iommufd bitmap against the walker");
        let mut b = iommufd::bench_kit::BitmapBench::new(fmt, iova, frac);
        let expect = b.dirty_count() as u64;
        let mut best = [Duration::MAX; 2];
        for _ in 0..a.runs {
            for (i, best) in best.iter_mut().enumerate() {
                b.redirty();
                let t = std::time::Instant::now();
                let walked = if i == 0 {
                    Some(b.walker_get())
                } else {
                    b.iommufd_get();
                    None
                };
                *best = (*best).min(t.elapsed());
                // The bitmap's bits are counted outside the timing.
                let got = walked.unwrap_or_else(|| b.bits_set());
                if got != expect {
                    bail!("{fmt}: harvest found {got} dirty pages, {expect} were written");
                }
            }
        }
        println!(
            "| {fmt} | {}% | {} | {} | {} |",
            frac * 100.0,
            fmt_dur(best[0]),
            fmt_dur(best[1]),
            fmt_ratio(best[1].as_secs_f64() / best[0].as_secs_f64())
        );
    }
    Ok(())
}

/// 1 TiB spaces: uniform sparse dirt, and dirt clustered in 2 MiB runs against a 1 GiB
/// mapping with the same dirt.
fn tib(a: &HarvestArgs) -> Result<()> {
    let tib = 1u64 << 40;
    println!();
    tracing::info!("1 TiB, 0.1 % dirty: mapping (about 2 GiB of page tables)");
    let mut b = HarvestBench::new(FormatKind::VtdSs, tib, 0.001, true);
    let expect = b.dirty_count() as u64;
    let bw = b.time_bandwidth(a.runs);
    let t = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
    let n = if a.naive {
        Some(min_time(1, || b.redirty(), || assert_eq!(b.harvest_naive(), expect)))
    } else {
        None
    };
    drop(b);
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

    println!(
        "\n| format | 1 GiB mapped, all dirty | 1 TiB mapped, 1 GiB dirty in 2 MiB runs | 1 TiB ÷ 1 GiB | 1 TiB on one thread |"
    );
    println!("|---|---|---|---|---|");
    for &fmt in &a.formats {
        tracing::info!(%fmt, "clustered dirt: 1 GiB against 1 TiB");
        let small = HarvestBench::clustered(fmt, 1 << 30, 1 << 30, 2 << 20);
        let expect = small.dirty_count() as u64;
        let s = min_time(a.runs, || small.redirty(), || assert_eq!(small.harvest(), expect));
        drop(small);
        let big = HarvestBench::clustered(fmt, tib, 1 << 30, 2 << 20);
        if big.dirty_count() as u64 != expect {
            bail!(
                "{fmt}: the 1 TiB pattern dirties {} pages, not {expect}",
                big.dirty_count()
            );
        }
        let l = min_time(a.runs, || big.redirty(), || assert_eq!(big.harvest(), expect));
        big.set_threads(true);
        let one = min_time(a.runs, || big.redirty(), || assert_eq!(big.harvest(), expect));
        println!(
            "| {fmt} | {} | {} | {} | {} |",
            fmt_dur(s),
            fmt_dur(l),
            fmt_ratio(l.as_secs_f64() / s.as_secs_f64()),
            fmt_dur(one)
        );
    }
    Ok(())
}

/// Where splitting a harvest over the cores starts to pay: one thread against all cores on
/// growing spaces at 1 % dirty.
fn threshold(runs: usize) {
    let runs = runs.max(20);
    println!("\n| IOVA | leaf tables | one thread | all cores | all ÷ one |");
    println!("|---|---|---|---|---|");
    let mut first_win = None;
    for mib in [128u64, 1024, 4096, 8192, 12288, 16384, 32768] {
        let b = HarvestBench::new(FormatKind::VtdSs, mib << 20, 0.01, false);
        let expect = b.dirty_count() as u64;
        b.set_threads(true);
        let one = min_time(runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
        b.set_threads(false);
        let all = min_time(runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
        let r = all.as_secs_f64() / one.as_secs_f64();
        if r < 1.0 {
            first_win.get_or_insert(mib);
        } else {
            first_win = None;
        }
        println!(
            "| {mib} MiB | {} | {} | {} | {} |",
            mib / 2,
            fmt_dur(one),
            fmt_dur(all),
            fmt_ratio(r)
        );
    }
    match first_win {
        Some(mib) => println!("\nall cores win from {mib} MiB ({} leaf tables) up", mib / 2),
        None => println!("\nall cores never won at every larger size"),
    }
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
            let mut b = DmaBench::new(fmt, pages);
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
            if i == 0 {
                b.iommufd_get()
            } else {
                b.type1_get()
            };
            *best = (*best).min(t.elapsed());
            let got = b.bits_set();
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
        tracing::info!("measuring {rate} MiB/s ...");
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
        devices: DeviceSet::default(),
    })?;
    for v in 0..vcpus {
        vm.programs().load(
            v,
            &Program::dirtier(WORKSET_BASE + v as u64 * (16 << 20), 4096, 64.0, Pattern::Sequential),
        )?;
    }
    vm.cpu_dirty_log().set_logging(true)?;
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
