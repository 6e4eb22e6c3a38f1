//! The `livemig` command line.

mod bench;
mod iommu_demo;

use anyhow::Result;
use clap::{Parser, Subcommand};
use iommu::FormatKind;

#[derive(Parser)]
#[command(
    name = "livemig",
    version,
    about = "Live migration of a KVM VM with a DMA device behind an emulated IOMMU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Map a guest-sized space in every IOMMU format, DMA from device threads with dirty
    /// tracking on, harvest, and compare what was found with what was written.
    Demo {
        /// Guest-sized IOVA space to map, in MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// Device threads per format.
        #[arg(long, default_value_t = 2)]
        threads: u32,
        /// DMA writes per thread.
        #[arg(long, default_value_t = 20_000)]
        writes: u64,
    },
    /// Benchmarks, printed as Markdown tables with same-run baselines.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// read_and_clear over 4 KiB-mapped IOVA: cursor walker vs naive root walk vs a linear
    /// read+write pass over an array the size of the leaf-PTE array.
    Harvest {
        /// IOVA to map, in GiB.
        #[arg(long, default_value_t = 64)]
        iova_gib: u64,
        /// Dirty fractions (0..=1), comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 0.01, 1.0])]
        dirty: Vec<f64>,
        /// Formats, comma separated (amd-v1, vtd-ss, arm-lpae-s1).
        #[arg(long, value_delimiter = ',', value_parser = parse_format, default_values_t = FormatKind::ALL.to_vec())]
        formats: Vec<FormatKind>,
        /// Runs per measurement; the minimum is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also measure 1 TiB mapped with 0.1 % dirty (needs about 4.5 GiB of RAM).
        #[arg(long)]
        tib: bool,
        /// Skip the naive baseline (slow on large spaces).
        #[arg(long)]
        no_naive: bool,
    },
    /// Dirty bitmap through iommufd against type1 GET_BITMAP (same space, same pages).
    Bitmap {
        #[arg(long, default_value_t = 64)]
        iova_gib: u64,
        #[arg(long, default_value_t = 0.01)]
        dirty: f64,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// CPU dirty harvest under a real KVM guest: ring against bitmap, per GiB of guest RAM,
    /// at several dirty rates (the guest reports the rate it achieved).
    CpuDirty {
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 1024)]
        memory_mib: u64,
        /// Configured dirty rates in MiB/s, comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![0.0, 64.0, 512.0, 4096.0])]
        rates: Vec<f64>,
        /// vCPUs running the dirtier.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Harvest interval in milliseconds.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Measurement time per point in milliseconds.
        #[arg(long, default_value_t = 1500)]
        ms: u64,
    },
    /// vCPU pause and resume latency with the dirtier running, against a bare thread
    /// park/unpark round trip measured in the same run.
    Pause {
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 200)]
        cycles: u32,
    },
    /// 4 KiB DMA writes through the IOTLB against memcpy.
    Dma {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
}

fn parse_format(s: &str) -> Result<FormatKind, String> {
    FormatKind::parse(s).ok_or_else(|| format!("unknown format '{s}' (amd-v1, vtd-ss, arm-lpae-s1)"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo {
            memory_mib,
            threads,
            writes,
        } => iommu_demo::run(memory_mib, threads, writes),
        Cmd::Bench { what } => match what {
            BenchCmd::Harvest {
                iova_gib,
                dirty,
                formats,
                runs,
                tib,
                no_naive,
            } => bench::harvest(&bench::HarvestArgs {
                iova_gib,
                fractions: dirty,
                formats,
                runs,
                tib,
                naive: !no_naive,
            }),
            BenchCmd::Dma { runs } => bench::dma(runs),
            BenchCmd::Pause { vcpus, cycles } => bench::pause(vcpus, cycles),
            BenchCmd::CpuDirty {
                memory_mib,
                rates,
                vcpus,
                interval_ms,
                ms,
            } => bench::cpu_dirty(memory_mib, &rates, vcpus, interval_ms, ms),
            BenchCmd::Bitmap { iova_gib, dirty, runs } => bench::bitmap(iova_gib, dirty, runs),
        },
    }
}
