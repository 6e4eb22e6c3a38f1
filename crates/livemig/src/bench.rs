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
    drop(bw);
    println!(
        "bandwidth pass over {} MiB: {} ({:.1} GiB/s of PTE array)\n",
        ((iova >> 12) * 8) >> 20,
        fmt_dur(bw_t),
        gib_per_s((iova >> 12) * 8, bw_t)
    );
    println!("| format | dirty | pages | walker | IOVA GiB/s | naive | naive ÷ walker | bandwidth pass ÷ walker |");
    println!("|---|---|---|---|---|---|---|---|");
    for &fmt in &a.formats {
        for &frac in &a.fractions {
            let b = HarvestBench::new(fmt, iova, frac, false);
            let expect = b.dirty_count() as u64;
            let t = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest(), expect));
            let (naive, ratio) = if a.naive {
                let n = min_time(a.runs, || b.redirty(), || assert_eq!(b.harvest_naive(), expect));
                (fmt_dur(n), fmt_ratio(n.as_secs_f64() / t.as_secs_f64()))
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "| {fmt} | {}% | {} | {} | {} | {} | {} | {} |",
                frac * 100.0,
                expect,
                fmt_dur(t),
                fmt_rate(gib_per_s(iova, t)),
                naive,
                ratio,
                fmt_ratio(bw_t.as_secs_f64() / t.as_secs_f64())
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
